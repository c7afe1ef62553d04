//! Request ids: UUIDv7 (time-sortable), made without a system call.
//!
//! `Uuid::now_v7` asks the operating system for randomness on every call; on
//! the hot path that is a measurable share of the layer's cost. Here the
//! process draws one random seed, and each id mixes it with a counter: ids
//! are unique within the process (the counter never repeats), unpredictable
//! enough across processes (62 bits from the seeded mix), and sort by their
//! millisecond timestamp.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::envelope::unix_ms;

static SEED: OnceLock<u64> = OnceLock::new();
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new UUIDv7 in its usual 36-character form.
pub(crate) fn new_id() -> String {
    let seed = *SEED.get_or_init(|| {
        // RandomState is seeded from the OS once per process.
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.write_u64(unix_ms());
        hasher.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let a = splitmix64(seed ^ n);
    let b = splitmix64(a ^ n.rotate_left(32));
    let mut bytes = [0u8; 10];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes()[..2]);
    // The counter's low bits go first (the 12 "rand_a" bits), so ids from one
    // process within one millisecond also sort in creation order, mostly.
    let counter = (n & 0x0fff) as u16;
    bytes[0] = (counter >> 4) as u8;
    bytes[1] = ((counter & 0x0f) << 4) as u8 | (bytes[1] & 0x0f);
    uuid::Builder::from_unix_timestamp_millis(unix_ms(), &bytes)
        .into_uuid()
        .to_string()
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_unique_and_time_ordered() {
        let ids: Vec<String> = (0..10_000).map(|_| new_id()).collect();
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 7);
        }
        let first = uuid::Uuid::parse_str(&ids[0]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = uuid::Uuid::parse_str(&new_id()).unwrap();
        assert!(later > first, "a later millisecond sorts later");
    }
}
