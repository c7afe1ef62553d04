//! The durable buffer in Redis: one stream per target, `ns:{t}:queue`.
//!
//! Enqueueing is one script — length check and `XADD` — so a full queue is
//! refused atomically (never trimmed: nothing acknowledged is dropped), in
//! one round trip.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::time::timeout;

use crate::envelope::Envelope;
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
}

/// A target's buffer.
#[derive(Clone)]
pub(crate) struct Queue {
    conn: ConnectionManager,
    key: String,
    max_len: u64,
    timeout: Duration,
    script: Script,
}

impl Queue {
    pub(crate) fn new(
        client: redis::Client,
        target: &Target,
        max_len: u64,
        command_timeout: Duration,
    ) -> Result<Self, RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(command_timeout))
            .set_connection_timeout(Some(command_timeout.max(Duration::from_secs(1))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| RedisError::new("buffer connect", e))?;
        Ok(Self {
            conn,
            key: target.queue_key(),
            max_len,
            timeout: command_timeout,
            script: Script::new(ENQUEUE),
        })
    }

    /// Stores `envelope`; `Ok` means it is in Redis.
    pub(crate) async fn enqueue(&self, envelope: &Envelope) -> Result<Enqueued, EnqueueError> {
        let mut invocation = self.script.key(&self.key);
        invocation.arg(self.max_len);
        for (name, value) in envelope.to_fields() {
            invocation.arg(name).arg(value);
        }
        let mut conn = self.conn.clone();
        let reply: Value = match timeout(self.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(EnqueueError::Redis(RedisError::new("enqueue", e))),
            Err(_) => return Err(EnqueueError::Redis(RedisError::timeout("enqueue"))),
        };
        match reply {
            Value::Array(items) => match items.as_slice() {
                [Value::BulkString(id), Value::Int(len)] => Ok(Enqueued {
                    entry_id: String::from_utf8_lossy(id).into_owned(),
                    len: u64::try_from(*len).unwrap_or(0),
                }),
                [Value::Int(0), Value::Int(len)] => Err(EnqueueError::Full {
                    len: u64::try_from(*len).unwrap_or(0),
                }),
                _ => Err(unexpected()),
            },
            _ => Err(unexpected()),
        }
    }
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
