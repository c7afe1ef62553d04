//! The durable buffer in Redis: one stream per target, `ns:{t}:queue`.
//!
//! # Bounding the queue without paying for it on every write
//!
//! A full queue refuses new entries (it is never trimmed: nothing
//! acknowledged is dropped). Checking the length and appending atomically
//! takes a script, and a script costs Redis about three times a plain
//! `XADD` (measured in `benches/layer.rs`). So an entry is written with a
//! plain `XADD` (pipelined with `XLEN`, one round trip) while the queue is
//! known to be far from full, and with the script within the last tenth of
//! `max_queue_len` (at least the last 64 entries), where the check must be
//! exact. "Known" is this process's view: the lengths its own writes return,
//! keyspace notifications and reconciliation; the bound can only be
//! overshot if other replicas add more than that headroom between two of
//! those readings.
//!
//! # Replication
//!
//! Redis replicates asynchronously: a primary that dies right after an
//! `XADD` may take the entry with it, and the replica promoted in its place
//! never saw it. With [`Replication`] (`WAIT n` in the same pipeline as the
//! write, so it runs on the very connection and node that took the write)
//! an entry counts as stored only once `n` replicas have it; when fewer
//! confirm in time the caller is told so instead of getting a `202`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{Script, Value};
use tokio::time::timeout;

use crate::backend::{Conn, ConnPool};
use crate::envelope::Encoded;
use crate::error::RedisError;
use crate::target::Target;

/// Refuses when the stream holds `ARGV[1]` entries or more; else appends the
/// fields in `ARGV[2..]` with an automatic id. Returns `{id, new length}`,
/// or `{0, length}` when full.
const ENQUEUE: &str = r#"
local len = redis.call('XLEN', KEYS[1])
if len >= tonumber(ARGV[1]) then
  return {0, len}
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
return {id, len + 1}
"#;

/// `WAIT replicas timeout` after every write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Replication {
    pub(crate) replicas: u32,
    pub(crate) timeout: Duration,
}

/// Where an entry went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Enqueued {
    /// The stream entry id, e.g. `1700000000000-0`.
    pub(crate) entry_id: String,
    /// The queue's length after the append.
    pub(crate) len: u64,
}

/// Why an entry was not stored.
#[derive(Debug)]
pub(crate) enum EnqueueError {
    /// The queue holds `max_queue_len` entries already.
    Full { len: u64 },
    /// Redis did not answer, or refused.
    Redis(RedisError),
    /// Written on the primary, but fewer replicas than asked confirmed it in
    /// time: it may or may not survive a failover.
    NotReplicated { acked: u64, wanted: u32 },
}

/// A target's buffer.
#[derive(Clone)]
pub(crate) struct Queue {
    /// The shared connection (handed to the replayer and the admin API).
    conn: Conn,
    /// What writes go through: the shared connection, or with `WAIT` a pool
    /// of dedicated ones (a `WAIT` holds its connection until the replicas
    /// answer, and every command behind it on that connection waits too).
    writers: Arc<ConnPool>,
    key: String,
    max_len: u64,
    timeout: Duration,
    script: Script,
    replication: Option<Replication>,
    /// Writes of this process under way, counted against the headroom.
    in_flight: Arc<AtomicU64>,
}

/// Decrements the in-flight count however the write ends.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Queue {
    /// `writers`: the connections for the writes (with `replication`);
    /// `None` to write through `conn`.
    pub(crate) fn new(
        conn: Conn,
        writers: Option<Arc<ConnPool>>,
        target: &Target,
        max_len: u64,
        command_timeout: Duration,
        replication: Option<Replication>,
    ) -> Self {
        let writers = writers.unwrap_or_else(|| Arc::new(ConnPool::new(conn.clone(), Vec::new())));
        Self {
            replication,
            conn,
            writers,
            key: target.queue_key(),
            max_len,
            timeout: command_timeout + replication.map_or(Duration::ZERO, |r| r.timeout),
            script: Script::new(ENQUEUE),
            in_flight: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The buffer's connection, shared with the replayer and the admin API.
    pub(crate) fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Stores one entry; `Ok` means it is in Redis. `known_len` is the
    /// queue's length as this process last saw it.
    pub(crate) async fn enqueue(
        &self,
        entry: &Encoded,
        known_len: Option<u64>,
    ) -> Result<Enqueued, EnqueueError> {
        let others = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let _in_flight = InFlight(&self.in_flight);
        let headroom = (self.max_len / 10).max(64);
        let far_from_full = known_len.is_some_and(|len| {
            len.saturating_add(others)
                .saturating_add(headroom)
                .saturating_add(1)
                <= self.max_len
        });
        let mut conn = self.writers.next();
        let wait = self.replication.map(|r| {
            let mut wait = redis::cmd("WAIT");
            wait.arg(r.replicas).arg(
                u64::try_from(r.timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
            wait
        });
        let query = if far_from_full {
            // Sized up front: growing the command buffer showed in profiles.
            let fields = entry.fields();
            let bytes: usize = fields.iter().map(|(n, v)| n.len() + v.len()).sum();
            let mut xadd = redis::Cmd::with_capacity(3 + 2 * fields.len(), bytes + 64);
            xadd.arg("XADD").arg(&self.key).arg("*");
            for (name, value) in fields {
                xadd.arg(name).arg(value);
            }
            let mut xlen = redis::Cmd::with_capacity(2, self.key.len() + 8);
            xlen.arg("XLEN").arg(&self.key);
            let mut pipe = redis::Pipeline::with_capacity(3);
            pipe.add_command(xadd).add_command(xlen);
            if let Some(wait) = wait {
                pipe.add_command(wait);
            }
            timeout(self.timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await
        } else if let Some(wait) = wait {
            // `EVAL` rather than the cached script: it must share a pipeline
            // (one node, one connection) with its `WAIT`, and this path only
            // runs near a full queue.
            let mut eval = redis::cmd("EVAL");
            eval.arg(ENQUEUE).arg(1).arg(&self.key).arg(self.max_len);
            for (name, value) in entry.fields() {
                eval.arg(name).arg(value);
            }
            let mut pipe = redis::Pipeline::with_capacity(2);
            pipe.add_command(eval).add_command(wait);
            timeout(self.timeout, pipe.query_async::<Vec<Value>>(&mut conn))
                .await
                .map(|reply| reply.map(flatten_script_reply))
        } else {
            let mut invocation = self.script.key(&self.key);
            invocation.arg(self.max_len);
            for (name, value) in entry.fields() {
                invocation.arg(name).arg(value);
            }
            timeout(
                self.timeout,
                invocation.invoke_async::<Vec<Value>>(&mut conn),
            )
            .await
        };
        let reply = match query {
            Ok(reply) => reply.map_err(|e| EnqueueError::Redis(RedisError::new("enqueue", e)))?,
            Err(_) => return Err(EnqueueError::Redis(RedisError::timeout("enqueue"))),
        };
        // Every path answers `[id, length]` (`[0, length]` when the script
        // found the queue full), then the replicas that confirmed if asked.
        let enqueued = match reply.as_slice() {
            [Value::BulkString(id), Value::Int(len), ..] => Enqueued {
                entry_id: String::from_utf8_lossy(id).into_owned(),
                len: u64::try_from(*len).unwrap_or(0),
            },
            [Value::Int(0), Value::Int(len), ..] => {
                return Err(EnqueueError::Full {
                    len: u64::try_from(*len).unwrap_or(0),
                })
            }
            _ => return Err(unexpected()),
        };
        if let Some(wanted) = self.replication.map(|r| r.replicas) {
            let acked = match reply.get(2) {
                Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                _ => return Err(unexpected()),
            };
            if acked < u64::from(wanted) {
                return Err(EnqueueError::NotReplicated { acked, wanted });
            }
        }
        Ok(enqueued)
    }
}

/// `[[id, len], acked]` -> `[id, len, acked]`.
fn flatten_script_reply(reply: Vec<Value>) -> Vec<Value> {
    let mut reply = reply.into_iter();
    let mut flat = match reply.next() {
        Some(Value::Array(items)) => items,
        other => other.into_iter().collect(),
    };
    flat.extend(reply);
    flat
}

fn unexpected() -> EnqueueError {
    EnqueueError::Redis(RedisError::new(
        "enqueue",
        redis::RedisError::from((
            redis::ErrorKind::Client,
            "unexpected reply from the enqueue script",
        )),
    ))
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("key", &self.key)
            .field("max_len", &self.max_len)
            .finish()
    }
}
