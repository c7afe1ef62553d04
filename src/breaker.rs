//! Local suspicion of a target whose heartbeat says "up" but whose calls
//! fail: after a few consecutive failures, calls divert without paying the
//! failure first, and one call at a time probes whether the target copes
//! again.
//!
//! Shared by every clone of the service (atomics, no lock). The closed state
//! — the hot path — costs one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the breaker lets a call do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Trusted: forward.
    Forward,
    /// Suspect, and this call is the probe: forward, and its outcome decides.
    Probe,
    /// Suspect: divert; `retry_after` is when the next probe may go.
    Divert { retry_after: Duration },
}

#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    probe_interval: Duration,
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` + 1 when tripped (or last probed); 0 = closed.
    tripped_at: AtomicU64,
    /// The target's up-generation when tripped: a new life clears suspicion.
    generation: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, probe_interval: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            probe_interval,
            epoch: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            tripped_at: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Decides for one call. `generation` is the view's up-generation.
    #[inline]
    pub(crate) fn admit(&self, generation: u64) -> Admit {
        let tripped_at = self.tripped_at.load(Ordering::Acquire);
        if tripped_at == 0 {
            return Admit::Forward;
        }
        if self.generation.load(Ordering::Acquire) != generation {
            // The heartbeat went away and came back since: a new life.
            self.reset();
            return Admit::Forward;
        }
        let waited = Duration::from_millis(self.now().saturating_sub(tripped_at));
        if waited >= self.probe_interval
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // Restart the clock so a probe that never answers does not block
            // the next one forever.
            self.tripped_at.store(self.now(), Ordering::Release);
            return Admit::Probe;
        }
        Admit::Divert {
            retry_after: self.probe_interval.saturating_sub(waited),
        }
    }

    pub(crate) fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
        if self.tripped_at.load(Ordering::Acquire) != 0 {
            self.reset();
        }
    }

    /// Counts a failure; returns `true` when this one tripped the breaker.
    pub(crate) fn record_failure(&self, generation: u64) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        if failures >= self.threshold || was_probe {
            self.generation.store(generation, Ordering::Release);
            let previous = self.tripped_at.swap(self.now(), Ordering::AcqRel);
            return previous == 0;
        }
        false
    }

    fn reset(&self) {
        self.consecutive_failures.store(0, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        self.tripped_at.store(0, Ordering::Release);
    }

    /// Whether the breaker currently suspects the target.
    pub(crate) fn is_suspect(&self) -> bool {
        self.tripped_at.load(Ordering::Acquire) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_after_threshold_and_probes_after_interval() {
        let b = Breaker::new(2, Duration::from_millis(30));
        assert_eq!(b.admit(1), Admit::Forward);
        assert!(!b.record_failure(1));
        assert_eq!(b.admit(1), Admit::Forward);
        assert!(b.record_failure(1));
        assert!(matches!(b.admit(1), Admit::Divert { .. }));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(1), Admit::Probe);
        // Only one probe at a time.
        assert!(matches!(b.admit(1), Admit::Divert { .. }));
        // A failed probe keeps it open; a successful one closes it.
        b.record_failure(1);
        assert!(b.is_suspect());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(1), Admit::Probe);
        b.record_success();
        assert_eq!(b.admit(1), Admit::Forward);
    }

    #[test]
    fn a_new_heartbeat_life_clears_suspicion() {
        let b = Breaker::new(1, Duration::from_secs(60));
        b.record_failure(3);
        assert!(matches!(b.admit(3), Admit::Divert { .. }));
        assert_eq!(b.admit(4), Admit::Forward);
        assert!(!b.is_suspect());
    }
}
