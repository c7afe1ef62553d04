//! Keyspace-notification flags: what the watcher needs, and what to do when
//! the server's configuration lacks them.

use crate::backend::Conn;
use redis::Value;

/// `K`: keyspace channel; `g`: DEL/EXPIRE/RENAME; `$`: SET; `x`: expired.
const REQUIRED: &str = "Kg$x";
/// `h`: hash heartbeats (HSET status=draining); `e`: evictions; `t`: stream
/// appends and deletions on the buffer, which strict ordering follows.
const RECOMMENDED: &str = "het";
/// Classes that the alias `A` stands for.
const ALIAS_A: &str = "g$lshzxetd";

/// How the watcher learns of changes on this server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotificationMode {
    /// Not checked yet (Redis has not answered since start).
    Unchecked,
    /// Keyspace notifications carry every change: reaction in milliseconds,
    /// reconciliation only as a safety net.
    Notifications,
    /// Some changes are notified, not all (for instance hash writes, when `h`
    /// is missing): those are seen at the next reconciliation or deadline.
    Partial,
    /// No usable notifications (off, or `CONFIG` forbidden): changes are seen
    /// at the next reconciliation, expiries at their local deadline.
    ReconcileOnly,
}

/// The flags in `current` that the watcher needs and does not find there.
pub(crate) fn missing(current: &str, wanted: &str) -> String {
    let has = |c: char| current.contains(c) || (current.contains('A') && ALIAS_A.contains(c));
    wanted.chars().filter(|&c| !has(c)).collect()
}

pub(crate) fn mode_for(current: &str) -> NotificationMode {
    if !missing(current, REQUIRED).is_empty() {
        NotificationMode::ReconcileOnly
    } else if !missing(current, RECOMMENDED).is_empty() {
        NotificationMode::Partial
    } else {
        NotificationMode::Notifications
    }
}

/// What checking the server's configuration found.
#[derive(Debug)]
pub(crate) enum Check {
    /// The mode in force (after turning flags on, when allowed).
    Mode {
        mode: NotificationMode,
        /// Why it is not [`NotificationMode::Notifications`], for the warning.
        why: Option<String>,
    },
    /// Redis did not answer: try again later.
    Unreachable(redis::RedisError),
}

/// Reads `notify-keyspace-events` and, when `may_configure`, turns on what is
/// missing. `CONFIG` is often renamed or forbidden on managed Redis: that
/// gives [`NotificationMode::ReconcileOnly`], not an error.
pub(crate) async fn check(conn: &mut Conn, may_configure: bool) -> Check {
    // On a cluster every node is asked: notifications are node-local, so a
    // flag counts only when every node (replicas too, which a failover
    // promotes) has it.
    let mut get = redis::cmd("CONFIG");
    get.arg("GET").arg("notify-keyspace-events");
    let replies = match conn.query_on_all_nodes(&get).await {
        Ok(v) => v,
        Err(e) if is_transient(&e) => return Check::Unreachable(e),
        Err(e) => {
            return Check::Mode {
                mode: NotificationMode::ReconcileOnly,
                why: Some(format!(
                    "CONFIG GET is not allowed on this server ({e}); cannot tell whether keyspace notifications are on"
                )),
            }
        }
    };
    let current = common_flags(
        replies
            .iter()
            .map(|reply| config_value(reply).unwrap_or_default()),
    );
    let mode = mode_for(&current);
    if mode == NotificationMode::Notifications {
        return Check::Mode { mode, why: None };
    }
    let wanted = format!("{REQUIRED}{RECOMMENDED}");
    let lacking = missing(&current, &wanted);
    if !may_configure {
        return Check::Mode {
            mode,
            why: Some(format!(
                "notify-keyspace-events is {current:?} and lacks {lacking:?}; run `CONFIG SET notify-keyspace-events {current}{lacking}` or allow the watcher to configure notifications"
            )),
        };
    }
    let merged = format!("{current}{lacking}");
    let set: redis::RedisResult<()> = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(&merged)
        .query_async(conn)
        .await;
    match set {
        Ok(()) => Check::Mode {
            mode: mode_for(&merged),
            why: None,
        },
        Err(e) if is_transient(&e) => Check::Unreachable(e),
        Err(e) => Check::Mode {
            mode,
            why: Some(format!(
                "CONFIG SET notify-keyspace-events {merged} was refused ({e})"
            )),
        },
    }
}

/// Reads `maxmemory-policy`: `Some(policy)` when it may evict keys without
/// a TTL (the buffer streams have none), `None` when it cannot (or cannot be
/// read).
pub(crate) async fn risky_eviction_policy(conn: &mut Conn) -> Option<String> {
    let mut get = redis::cmd("CONFIG");
    get.arg("GET").arg("maxmemory-policy");
    let replies = conn.query_on_all_nodes(&get).await.ok()?;
    replies
        .iter()
        .filter_map(config_value)
        .find(|policy| policy.starts_with("allkeys"))
}

/// The flags that every one of `nodes` has (the `A` alias spelled out).
fn common_flags(nodes: impl Iterator<Item = String>) -> String {
    let mut common: Option<Vec<char>> = None;
    for flags in nodes {
        let mut has: Vec<char> = flags.chars().filter(|&c| c != 'A').collect();
        if flags.contains('A') {
            has.extend(ALIAS_A.chars());
        }
        common = Some(match common {
            None => has,
            Some(before) => before.into_iter().filter(|c| has.contains(c)).collect(),
        });
    }
    let mut common = common.unwrap_or_default();
    common.sort_unstable();
    common.dedup();
    common.into_iter().collect()
}

/// `CONFIG GET` answers a map in RESP3 and a flat array in RESP2.
fn config_value(reply: &Value) -> Option<String> {
    let value = match reply {
        Value::Map(pairs) => pairs.first().map(|(_, v)| v),
        Value::Array(items) => items.get(1),
        _ => None,
    }?;
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// Failures that say "Redis did not answer" rather than "Redis said no".
pub(crate) fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_read_with_the_a_alias() {
        assert_eq!(mode_for(""), NotificationMode::ReconcileOnly);
        assert_eq!(mode_for("Ex"), NotificationMode::ReconcileOnly);
        assert_eq!(mode_for("Kg$x"), NotificationMode::Partial);
        assert_eq!(mode_for("KA"), NotificationMode::Notifications);
        assert_eq!(mode_for("xeKhg$t"), NotificationMode::Notifications);
        assert_eq!(missing("KEg", "Kg$xhe"), "$xhe");
        assert_eq!(mode_for("Kg$xhe"), NotificationMode::Partial);
        assert_eq!(mode_for("Kg$xhet"), NotificationMode::Notifications);
        assert_eq!(missing("AK", "Kg$xhe"), "");
    }

    #[test]
    fn config_get_reply_is_understood_in_both_protocols() {
        let resp3 = Value::Map(vec![(
            Value::BulkString(b"notify-keyspace-events".to_vec()),
            Value::BulkString(b"xKE".to_vec()),
        )]);
        let resp2 = Value::Array(vec![
            Value::BulkString(b"notify-keyspace-events".to_vec()),
            Value::BulkString(b"".to_vec()),
        ]);
        assert_eq!(config_value(&resp3).as_deref(), Some("xKE"));
        assert_eq!(config_value(&resp2).as_deref(), Some(""));
        assert_eq!(config_value(&Value::Nil), None);
    }
}
