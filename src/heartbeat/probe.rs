//! Reading heartbeat keys and judging what they say.
//!
//! One script reads every heartbeat key of a target in one round trip, whatever
//! their type, so that a plain `SET key 1 PX ttl` from a shell script and a
//! hash written by [`Heartbeat`](super::Heartbeat) are understood alike. The
//! judgement ([`assess`]) is pure, so it is tested without Redis.

use std::time::{Duration, Instant};

use redis::Script;

use super::view::Health;

/// Statuses that mean "alive but do not send me traffic".
const DOWN_STATUSES: [&str; 2] = ["draining", "down"];

/// Reads, for each key: its PTTL (-2 gone, -1 no TTL), its status, if it
/// states one (the `status` field of a hash, or a short string value), and
/// its type (a list or a set is not a heartbeat: it counts as down).
///
/// `TYPE` goes first because it makes Redis expire the key lazily if its TTL
/// has passed, so a read at our local deadline sees the truth even when the
/// server has not yet deleted the key on its own (nor sent `expired`).
const READ_SCRIPT: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  local pttl = -2
  local status = ''
  if kind ~= 'none' then
    pttl = redis.call('PTTL', key)
    if kind == 'hash' then
      status = redis.call('HGET', key, 'status') or ''
    elseif kind == 'string' then
      status = redis.call('GETRANGE', key, 0, 15)
    end
  end
  out[i] = {pttl, status, kind}
end
return out
"#;

pub(crate) fn read_script() -> Script {
    Script::new(READ_SCRIPT)
}

/// What one heartbeat key said when it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyReading {
    /// Milliseconds to live: -2 when the key is gone, -1 when it has no TTL.
    pub(crate) pttl_ms: i64,
    /// The stated status, lowercased; empty when none.
    pub(crate) status: String,
    /// The key's type when it is neither a string nor a hash (then it is
    /// not a heartbeat and counts as down).
    pub(crate) wrong_type: Option<String>,
    /// The key's type as Redis names it (`string`, `hash`, `none`...).
    pub(crate) kind: String,
}

impl KeyReading {
    pub(crate) fn new(pttl_ms: i64, status: &str) -> Self {
        Self {
            pttl_ms,
            status: status.trim().to_ascii_lowercase(),
            wrong_type: None,
            kind: String::new(),
        }
    }

    fn with_type(mut self, kind: &str) -> Self {
        self.kind = kind.to_owned();
        if !matches!(kind, "string" | "hash" | "none" | "") {
            self.wrong_type = Some(kind.to_owned());
        }
        self
    }

    fn exists(&self) -> bool {
        self.pttl_ms != -2
    }

    /// Alive, a heartbeat, and not announcing a stop.
    fn serving(&self) -> bool {
        self.exists() && self.wrong_type.is_none() && !DOWN_STATUSES.contains(&self.status.as_str())
    }
}

/// The verdict on a target from one reading of its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Assessment {
    pub(crate) health: Health,
    /// When the verdict turns to down unless a key is refreshed: the latest
    /// expiry among serving keys. `None` when down, or when a serving key has
    /// no TTL.
    pub(crate) deadline: Option<Instant>,
    /// How many keys are serving.
    pub(crate) serving: usize,
}

/// Judges a target from its keys, read at `read_at` (when the reply arrived:
/// a PTTL counted from then can only make the local deadline late by one
/// round trip, never early).
pub(crate) fn assess(readings: &[KeyReading], read_at: Instant) -> Assessment {
    let serving: Vec<&KeyReading> = readings.iter().filter(|r| r.serving()).collect();
    if serving.is_empty() {
        return Assessment {
            health: Health::Down,
            deadline: None,
            serving: 0,
        };
    }
    let deadline = if serving.iter().any(|r| r.pttl_ms < 0) {
        None
    } else {
        serving
            .iter()
            .map(|r| r.pttl_ms)
            .max()
            // Redis expires a key once its clock is strictly past the expiry
            // millisecond; one extra millisecond keeps the re-read at the
            // deadline from finding the key alive with PTTL 0.
            .map(|ms| read_at + Duration::from_millis(ms.unsigned_abs() + 1))
    };
    Assessment {
        health: Health::Up,
        deadline,
        serving: serving.len(),
    }
}

/// One heartbeat key as read now, judged as the [`Watcher`](super::Watcher)
/// judges it: for tools that show heartbeats (the `thb` admin tool).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeartbeatKeyState {
    /// The key.
    pub key: String,
    /// Its type as Redis names it: `string` or `hash` for a heartbeat,
    /// `none` when it does not exist; any other type counts as down.
    pub kind: String,
    /// Milliseconds to live: -2 when the key does not exist, -1 without TTL.
    pub pttl_ms: i64,
    /// The status it states (a hash's `status`, or a short string value),
    /// trimmed and lowercased; empty when none.
    pub status: String,
    /// Whether this key makes its target up.
    pub serving: bool,
}

/// Reads `keys` (one round trip, the watcher's own script) and judges each.
///
/// In a Redis Cluster the keys must share a slot (a target's own keys do).
pub async fn read_heartbeat_keys<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &[String],
) -> Result<Vec<HeartbeatKeyState>, crate::RedisError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let script = read_script();
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(key);
    }
    let reply: redis::Value = invocation
        .invoke_async(conn)
        .await
        .map_err(|e| crate::RedisError::new("heartbeat read", e))?;
    Ok(keys
        .iter()
        .zip(parse_reply(&reply, keys.len()))
        .map(|(key, reading)| HeartbeatKeyState {
            key: key.clone(),
            serving: reading.serving(),
            kind: if reading.exists() {
                reading.kind
            } else {
                "none".into()
            },
            pttl_ms: reading.pttl_ms,
            status: reading.status,
        })
        .collect())
}

/// Parses the script's reply. Anything unexpected reads as "gone" for that
/// key rather than failing the whole reading: a foreign program may store a
/// surprising value, and the safe reading of nonsense is "not alive".
pub(crate) fn parse_reply(value: &redis::Value, expected: usize) -> Vec<KeyReading> {
    let mut out = Vec::with_capacity(expected);
    if let redis::Value::Array(items) = value {
        for item in items {
            let reading = match item {
                redis::Value::Array(pair) if pair.len() >= 2 => {
                    let pttl = match &pair[0] {
                        redis::Value::Int(n) => *n,
                        _ => -2,
                    };
                    let status = match &pair[1] {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        redis::Value::SimpleString(s) => s.clone(),
                        _ => String::new(),
                    };
                    let kind = match pair.get(2) {
                        Some(redis::Value::BulkString(b)) => {
                            String::from_utf8_lossy(b).into_owned()
                        }
                        Some(redis::Value::SimpleString(s)) => s.clone(),
                        _ => String::new(),
                    };
                    KeyReading::new(pttl, &status).with_type(&kind)
                }
                _ => KeyReading::new(-2, ""),
            };
            out.push(reading);
        }
    }
    out.resize(expected, KeyReading::new(-2, ""));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_keys_is_down() {
        let a = assess(&[], Instant::now());
        assert_eq!(a.health, Health::Down);
        assert_eq!(a.deadline, None);
    }

    #[test]
    fn deadline_is_the_latest_serving_expiry() {
        let now = Instant::now();
        let a = assess(
            &[
                KeyReading::new(100, "1"),
                KeyReading::new(900, "draining"),
                KeyReading::new(300, "up"),
                KeyReading::new(-2, ""),
            ],
            now,
        );
        assert_eq!(a.health, Health::Up);
        assert_eq!(a.serving, 2);
        assert_eq!(a.deadline, Some(now + Duration::from_millis(301)));
    }

    #[test]
    fn a_key_without_ttl_has_no_deadline() {
        let a = assess(
            &[KeyReading::new(-1, ""), KeyReading::new(10, "")],
            Instant::now(),
        );
        assert_eq!(a.health, Health::Up);
        assert_eq!(a.deadline, None);
    }

    #[test]
    fn draining_and_down_count_as_down_whatever_the_case() {
        for status in ["draining", "DOWN", " Draining "] {
            let a = assess(&[KeyReading::new(5000, status)], Instant::now());
            assert_eq!(a.health, Health::Down, "{status}");
        }
        for status in ["", "1", "up", "ok", "starting"] {
            let a = assess(&[KeyReading::new(5000, status)], Instant::now());
            assert_eq!(a.health, Health::Up, "{status}");
        }
    }

    #[test]
    fn a_key_of_another_type_is_not_a_heartbeat() {
        let list = KeyReading::new(5000, "").with_type("list");
        assert_eq!(list.wrong_type.as_deref(), Some("list"));
        assert_eq!(assess(&[list], Instant::now()).health, Health::Down);
        let hash = KeyReading::new(5000, "up").with_type("hash");
        assert_eq!(assess(&[hash], Instant::now()).health, Health::Up);
    }

    #[test]
    fn malformed_replies_read_as_gone() {
        use redis::Value;
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(500), Value::BulkString(b"1".to_vec())]),
            Value::Nil,
        ]);
        let readings = parse_reply(&reply, 3);
        assert_eq!(readings[0], KeyReading::new(500, "1"));
        assert_eq!(readings[1], KeyReading::new(-2, ""));
        assert_eq!(readings[2], KeyReading::new(-2, ""));
        assert_eq!(parse_reply(&Value::Okay, 1), vec![KeyReading::new(-2, "")]);
    }
}
