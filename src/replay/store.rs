//! The replayer's Redis operations on one target's keys: the consumer group
//! on the buffer stream, acknowledgements with their processed-markers, dead
//! letters and the drain lease. Scripts where several keys must change
//! together; all keys share the target's hash tag.

use std::time::Duration;

use crate::backend::Conn;
use redis::{Script, Value};
use tokio::time::timeout;

use crate::error::RedisError;
use crate::target::Target;

/// The consumer group every replayer of a target joins.
pub const GROUP: &str = "thb";

/// Takes or renews the lease: ours if free or already ours.
/// KEYS[1] = lease; ARGV = holder, ttl (ms). Returns 1 when held.
const LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"#;

/// Releases the lease if ours. KEYS[1] = lease; ARGV[1] = holder.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// One entry read from the stream: its id and raw field/value pairs (raw,
/// so a poison entry cannot break the read of the others).
#[derive(Clone, Debug)]
pub(crate) struct RawEntry {
    pub(crate) entry_id: String,
    /// `None` when the entry was deleted while pending.
    pub(crate) fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl RawEntry {
    /// The `id` field (the request's idempotency key), if readable.
    pub(crate) fn request_id(&self) -> Option<&str> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k == b"id")
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

#[derive(Clone)]
pub(crate) struct Store {
    conn: Conn,
    queue: String,
    dead: String,
    lease: String,
    done_prefix: String,
    timeout: Duration,
    lease_script: Script,
    release: Script,
}

fn fail(operation: &'static str) -> impl Fn(redis::RedisError) -> RedisError {
    move |e| RedisError::new(operation, e)
}

impl Store {
    pub(crate) fn new(conn: Conn, target: &Target, command_timeout: Duration) -> Self {
        Self {
            conn,
            queue: target.queue_key(),
            dead: target.dead_letter_key(),
            lease: target.lease_key(),
            done_prefix: target.done_key(""),
            timeout: command_timeout,
            lease_script: Script::new(LEASE),
            release: Script::new(RELEASE),
        }
    }

    pub(crate) fn conn(&self) -> Conn {
        self.conn.clone()
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisError> {
        let mut conn = self.conn.clone();
        match timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(r) => r.map_err(fail(operation)),
            Err(_) => Err(RedisError::timeout(operation)),
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        let mut conn = self.conn.clone();
        match timeout(self.timeout, invocation.invoke_async::<T>(&mut conn)).await {
            Ok(r) => r.map_err(fail(operation)),
            Err(_) => Err(RedisError::timeout(operation)),
        }
    }

    /// Creates the consumer group (and the stream) if missing.
    pub(crate) async fn ensure_group(&self) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.queue)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.run::<()>("consumer group create", &cmd).await {
            Err(e) if e.to_string_with_source().contains("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Up to `count` entries: this consumer's pending ones (`new == false`),
    /// or never-delivered ones (`new == true`), oldest first.
    pub(crate) async fn read(
        &self,
        consumer: &str,
        count: usize,
        new: bool,
    ) -> Result<Vec<RawEntry>, RedisError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&self.queue)
            .arg(if new { ">" } else { "0" });
        let reply: Value = self.run("buffer read", &cmd).await?;
        Ok(parse_read(&reply))
    }

    /// Claims pending entries idle for at least `min_idle` from any consumer
    /// (all of them with zero). Returns how many were claimed.
    ///
    /// With `JUSTID`: the claim itself does not count as a delivery; the
    /// read of the pending entry that follows does (Redis counts every
    /// `XREADGROUP` of a pending entry), so an entry handed over after a
    /// crash remembers it was tried, and one that keeps crashing its
    /// replayers reaches `max_attempts`.
    pub(crate) async fn claim(
        &self,
        consumer: &str,
        min_idle: Duration,
    ) -> Result<usize, RedisError> {
        let mut claimed = 0;
        let mut cursor = String::from("0-0");
        loop {
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(&self.queue)
                .arg(GROUP)
                .arg(consumer)
                .arg(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX))
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000)
                .arg("JUSTID");
            let reply: Value = self.run("claim", &cmd).await?;
            let Value::Array(parts) = reply else { break };
            let next = parts
                .first()
                .and_then(as_text)
                .unwrap_or_else(|| "0-0".into());
            if let Some(Value::Array(ids)) = parts.get(1) {
                claimed += ids.len();
            }
            if next == "0-0" {
                break;
            }
            cursor = next;
        }
        Ok(claimed)
    }

    /// How many times each of this consumer's pending entries between
    /// `first` and `last` was handed to a consumer.
    pub(crate) async fn delivery_counts(
        &self,
        consumer: &str,
        first: &str,
        last: &str,
        count: usize,
    ) -> Result<std::collections::HashMap<String, u64>, RedisError> {
        let mut cmd = redis::cmd("XPENDING");
        cmd.arg(&self.queue)
            .arg(GROUP)
            .arg(first)
            .arg(last)
            .arg(count)
            .arg(consumer);
        let reply: Value = self.run("pending read", &cmd).await?;
        let mut counts = std::collections::HashMap::new();
        if let Value::Array(entries) = reply {
            for entry in entries {
                if let Value::Array(parts) = entry {
                    if let (Some(id), Some(Value::Int(n))) =
                        (parts.first().and_then(as_text), parts.get(3))
                    {
                        counts.insert(id, u64::try_from(*n).unwrap_or(1));
                    }
                }
            }
        }
        Ok(counts)
    }

    /// Removes `consumer` from the group if it holds nothing.
    pub(crate) async fn forget_if_idle(&self, consumer: &str) -> Result<bool, RedisError> {
        let mut pending = redis::cmd("XPENDING");
        pending
            .arg(&self.queue)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(1)
            .arg(consumer);
        let reply: Value = self.run("pending read", &pending).await?;
        if matches!(&reply, Value::Array(a) if !a.is_empty()) {
            return Ok(false);
        }
        let mut del = redis::cmd("XGROUP");
        del.arg("DELCONSUMER")
            .arg(&self.queue)
            .arg(GROUP)
            .arg(consumer);
        self.run::<Value>("consumer removal", &del).await?;
        Ok(true)
    }

    /// Removes other consumers that hold nothing and have not read for
    /// `older_than`: every replayer start adds one, and a group must not
    /// grow with every deploy. Returns how many were removed.
    pub(crate) async fn forget_idle_consumers(
        &self,
        me: &str,
        older_than: Duration,
    ) -> Result<usize, RedisError> {
        let mut info = redis::cmd("XINFO");
        info.arg("CONSUMERS").arg(&self.queue).arg(GROUP);
        let reply: Value = self.run("consumer list", &info).await?;
        let Value::Array(consumers) = reply else {
            return Ok(0);
        };
        let limit = i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
        let mut removed = 0;
        for consumer in consumers {
            let fields: Vec<(String, &Value)> = match &consumer {
                Value::Array(flat) => flat
                    .chunks(2)
                    .filter_map(|kv| Some((as_text(&kv[0])?, kv.get(1)?)))
                    .collect(),
                Value::Map(pairs) => pairs
                    .iter()
                    .filter_map(|(k, v)| Some((as_text(k)?, v)))
                    .collect(),
                _ => continue,
            };
            let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            let (Some(name), Some(Value::Int(pending)), Some(Value::Int(idle))) =
                (get("name").and_then(as_text), get("pending"), get("idle"))
            else {
                continue;
            };
            if name != me && *pending == 0 && *idle > limit && self.forget_if_idle(&name).await? {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Resets the idle time of an entry this consumer holds, so that other
    /// replicas do not take it for abandoned while it is being retried.
    pub(crate) async fn touch(&self, consumer: &str, entry_id: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.queue)
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(entry_id)
            .arg("JUSTID");
        self.run::<Value>("claim refresh", &cmd).await.map(drop)
    }

    /// Which of these request ids already carry a processed-marker.
    pub(crate) async fn done(&self, request_ids: &[&str]) -> Result<Vec<bool>, RedisError> {
        if request_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for id in request_ids {
            cmd.arg(format!("{}{id}", self.done_prefix));
        }
        let values: Vec<Option<Vec<u8>>> = self.run("processed-marker read", &cmd).await?;
        Ok(values.into_iter().map(|v| v.is_some()).collect())
    }

    /// Acknowledges entries and sets the processed-markers of delivered
    /// ones, in one `MULTI` (native commands: cheaper for Redis than a
    /// script looping over them). `(entry id, request id to mark)`.
    pub(crate) async fn ack(
        &self,
        entries: &[(&str, Option<&str>)],
        marker_ttl: Duration,
    ) -> Result<(), RedisError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        let xack = pipe.cmd("XACK").arg(&self.queue).arg(GROUP);
        for (entry_id, _) in entries {
            xack.arg(*entry_id);
        }
        pipe.ignore();
        let xdel = pipe.cmd("XDEL").arg(&self.queue);
        for (entry_id, _) in entries {
            xdel.arg(*entry_id);
        }
        pipe.ignore();
        for request_id in entries.iter().filter_map(|(_, r)| *r) {
            pipe.cmd("SET")
                .arg(format!("{}{request_id}", self.done_prefix))
                .arg(1)
                .arg("EX")
                .arg(marker_ttl.as_secs().max(1))
                .ignore();
        }
        let mut conn = self.conn.clone();
        match timeout(self.timeout, pipe.exec_async(&mut conn)).await {
            Ok(r) => r.map_err(fail("acknowledge")),
            Err(_) => Err(RedisError::timeout("acknowledge")),
        }
    }

    /// Moves an entry to the dead letters with `reason`: one `MULTI` of
    /// native commands (a script would have to `unpack` every field, which
    /// Lua limits to about 8 000 values).
    pub(crate) async fn dead_letter(
        &self,
        entry: &RawEntry,
        reason: &str,
        dead_at_ms: u64,
    ) -> Result<(), RedisError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let xadd = pipe.cmd("XADD").arg(&self.dead).arg("*");
        for (name, value) in entry.fields.iter().flatten() {
            xadd.arg(name.as_slice()).arg(value.as_slice());
        }
        xadd.arg("reason")
            .arg(reason)
            .arg("dead_at")
            .arg(dead_at_ms)
            .arg("source_id")
            .arg(&entry.entry_id);
        pipe.ignore();
        pipe.cmd("XACK")
            .arg(&self.queue)
            .arg(GROUP)
            .arg(&entry.entry_id)
            .ignore();
        pipe.cmd("XDEL")
            .arg(&self.queue)
            .arg(&entry.entry_id)
            .ignore();
        let mut conn = self.conn.clone();
        match timeout(self.timeout, pipe.exec_async(&mut conn)).await {
            Ok(r) => r.map_err(fail("dead-letter")),
            Err(_) => Err(RedisError::timeout("dead-letter")),
        }
    }

    /// Takes or renews the drain lease for `holder`.
    pub(crate) async fn lease(&self, holder: &str, ttl: Duration) -> Result<bool, RedisError> {
        let mut invocation = self.lease_script.key(&self.lease);
        invocation
            .arg(holder)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        self.invoke::<i64>("lease", &invocation)
            .await
            .map(|n| n == 1)
    }

    /// Gives the lease up if `holder` has it.
    pub(crate) async fn release(&self, holder: &str) -> Result<(), RedisError> {
        let mut invocation = self.release.key(&self.lease);
        invocation.arg(holder);
        self.invoke::<i64>("lease release", &invocation)
            .await
            .map(drop)
    }
}

trait WithSource {
    fn to_string_with_source(&self) -> String;
}

impl WithSource for RedisError {
    fn to_string_with_source(&self) -> String {
        match std::error::Error::source(self) {
            Some(s) => format!("{self}: {s}"),
            None => self.to_string(),
        }
    }
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn as_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// `XREADGROUP` answers `[[stream, [[id, [f, v, ...] | nil], ...]]]` (RESP2)
/// or a map of stream to entries (RESP3). Anything unexpected in one entry
/// stays confined to that entry.
fn parse_read(reply: &Value) -> Vec<RawEntry> {
    let streams: Vec<&Value> = match reply {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => Some(&pair[1]),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(pair) = entry else { continue };
            let Some(entry_id) = pair.first().and_then(as_text) else {
                continue;
            };
            let fields = match pair.get(1) {
                Some(Value::Array(flat)) => Some(
                    flat.chunks(2)
                        .map(|kv| {
                            (
                                as_bytes(&kv[0]),
                                kv.get(1).map(as_bytes).unwrap_or_default(),
                            )
                        })
                        .collect(),
                ),
                Some(Value::Map(pairs)) => Some(
                    pairs
                        .iter()
                        .map(|(k, v)| (as_bytes(k), as_bytes(v)))
                        .collect(),
                ),
                _ => None,
            };
            out.push(RawEntry { entry_id, fields });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn reads_are_parsed_entry_by_entry() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"q"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk(b"1-0"),
                    Value::Array(vec![bulk(b"id"), bulk(b"k1")]),
                ]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
                Value::Array(vec![
                    bulk(b"3-0"),
                    Value::Array(vec![bulk(b"\xff"), bulk(b"x"), bulk(b"odd")]),
                ]),
                Value::Int(7),
            ]),
        ])]);
        let entries = parse_read(&reply);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].request_id(), Some("k1"));
        assert!(entries[1].fields.is_none());
        assert_eq!(entries[2].fields.as_ref().unwrap().len(), 2);
        assert!(parse_read(&Value::Nil).is_empty());
    }
}
