//! Dead letters: entries that will not be delivered as they are, kept whole
//! with their reason in `ns:{t}:dead`, to be listed, requeued or purged.

use std::fmt;
use std::time::Duration;

use redis::{Script, Value};
use tokio::time::timeout;

use crate::backend::Conn;
use crate::envelope::Envelope;
use crate::error::{MalformedEntry, RedisError};
use crate::target::Target;

/// Copies a dead letter back to the end of the queue (without its
/// dead-letter fields) and removes it, in one step. KEYS[1] = queue,
/// KEYS[2] = dead; ARGV[1] = dead letter id. Returns the new entry id, or
/// false when there is no such dead letter.
const REQUEUE: &str = r#"
local found = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
if #found == 0 then return false end
local fields = found[1][2]
local out = {}
for i = 1, #fields, 2 do
  local name = fields[i]
  if name ~= 'reason' and name ~= 'dead_at' and name ~= 'source_id' then
    out[#out + 1] = name
    out[#out + 1] = fields[i + 1]
  end
end
if #out == 0 then out = {'v', ''} end
local id = redis.call('XADD', KEYS[1], '*', unpack(out))
redis.call('XDEL', KEYS[2], ARGV[1])
return id
"#;

/// One dead letter.
#[derive(Clone)]
pub struct DeadLetter {
    /// Its id in the dead-letter stream (what [`DeadLetters::requeue`] and
    /// [`DeadLetters::purge`] take).
    pub entry_id: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When, Unix milliseconds.
    pub dead_at_ms: u64,
    /// Its id in the queue when it was dead-lettered.
    pub source_id: String,
    /// The request, or why it cannot be decoded (a poison entry).
    pub request: Result<Envelope, MalformedEntry>,
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("entry_id", &self.entry_id)
            .field("reason", &self.reason)
            .field("dead_at_ms", &self.dead_at_ms)
            .field("source_id", &self.source_id)
            .field("request_id", &self.request.as_ref().map(|e| e.id.as_str()))
            .finish()
    }
}

/// A target's dead letters.
#[derive(Clone)]
pub struct DeadLetters {
    conn: Conn,
    queue: String,
    dead: String,
    timeout: Duration,
}

impl DeadLetters {
    /// The dead letters of `target` on `backend` (a [`Backend`](crate::Backend)
    /// or a `redis::Client`).
    pub fn new(backend: impl Into<crate::Backend>, target: &Target) -> Result<Self, RedisError> {
        Ok(Self::from_conn(backend.into().data()?, target))
    }

    pub(crate) fn from_conn(conn: Conn, target: &Target) -> Self {
        Self {
            conn,
            queue: target.queue_key(),
            dead: target.dead_letter_key(),
            timeout: Duration::from_secs(2),
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, RedisError> {
        let mut conn = self.conn.clone();
        match timeout(self.timeout, cmd.query_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| RedisError::new(operation, e)),
            Err(_) => Err(RedisError::timeout(operation)),
        }
    }

    /// How many dead letters there are.
    pub async fn len(&self) -> Result<u64, RedisError> {
        let mut cmd = redis::cmd("XLEN");
        cmd.arg(&self.dead);
        self.query("dead letters length", &cmd).await
    }

    /// Whether there are none.
    pub async fn is_empty(&self) -> Result<bool, RedisError> {
        Ok(self.len().await? == 0)
    }

    /// The oldest `count` dead letters.
    pub async fn list(&self, count: usize) -> Result<Vec<DeadLetter>, RedisError> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&self.dead)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count);
        let reply: Value = self.query("dead letters list", &cmd).await?;
        let Value::Array(entries) = reply else {
            return Ok(Vec::new());
        };
        Ok(entries.iter().filter_map(parse_dead_letter).collect())
    }

    /// Puts a dead letter back at the end of the queue, to be delivered
    /// again. Returns `false` if there was no such dead letter.
    pub async fn requeue(&self, entry_id: &str) -> Result<bool, RedisError> {
        let script = Script::new(REQUEUE);
        let mut invocation = script.key(&self.queue);
        invocation.key(&self.dead).arg(entry_id);
        let mut conn = self.conn.clone();
        let reply = match timeout(self.timeout, invocation.invoke_async::<Value>(&mut conn)).await {
            Ok(r) => r,
            Err(_) => return Err(RedisError::timeout("dead letter requeue")),
        };
        match reply {
            Ok(reply) => Ok(!matches!(reply, Value::Nil)),
            // Lua cannot unpack thousands of fields: move such an entry
            // with native commands (read, then append and delete in one
            // MULTI; not atomic with the read, which only matters if the
            // same dead letter is requeued twice at once).
            Err(e) if e.to_string().contains("unpack") => self.requeue_natively(entry_id).await,
            Err(e) => Err(RedisError::new("dead letter requeue", e)),
        }
    }

    async fn requeue_natively(&self, entry_id: &str) -> Result<bool, RedisError> {
        let mut range = redis::cmd("XRANGE");
        range.arg(&self.dead).arg(entry_id).arg(entry_id);
        let reply: Value = self.query("dead letter requeue", &range).await?;
        let Some(letter) = (match &reply {
            Value::Array(entries) => entries.first(),
            _ => None,
        }) else {
            return Ok(false);
        };
        let Value::Array(pair) = letter else {
            return Ok(false);
        };
        let Some(Value::Array(flat)) = pair.get(1) else {
            return Ok(false);
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        let xadd = pipe.cmd("XADD").arg(&self.queue).arg("*");
        let mut any = false;
        for kv in flat.chunks(2) {
            let name = bytes(&kv[0]);
            if matches!(name.as_slice(), b"reason" | b"dead_at" | b"source_id") {
                continue;
            }
            xadd.arg(name).arg(kv.get(1).map(bytes).unwrap_or_default());
            any = true;
        }
        if !any {
            xadd.arg("v").arg("");
        }
        pipe.ignore();
        pipe.cmd("XDEL").arg(&self.dead).arg(entry_id).ignore();
        let mut conn = self.conn.clone();
        match timeout(self.timeout, pipe.exec_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| RedisError::new("dead letter requeue", e))?,
            Err(_) => return Err(RedisError::timeout("dead letter requeue")),
        }
        Ok(true)
    }

    /// Deletes one dead letter. Returns `false` if there was none.
    pub async fn purge(&self, entry_id: &str) -> Result<bool, RedisError> {
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(&self.dead).arg(entry_id);
        let n: u64 = self.query("dead letter purge", &cmd).await?;
        Ok(n > 0)
    }

    /// Deletes every dead letter; returns how many there were.
    pub async fn purge_all(&self) -> Result<u64, RedisError> {
        let n = self.len().await?;
        let mut cmd = redis::cmd("DEL");
        cmd.arg(&self.dead);
        self.query::<u64>("dead letters purge", &cmd).await?;
        Ok(n)
    }
}

impl fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetters")
            .field("key", &self.dead)
            .finish()
    }
}

fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        _ => Vec::new(),
    }
}

fn parse_dead_letter(entry: &Value) -> Option<DeadLetter> {
    let Value::Array(pair) = entry else {
        return None;
    };
    let entry_id = String::from_utf8(bytes(pair.first()?)).ok()?;
    let Value::Array(flat) = pair.get(1)? else {
        return None;
    };
    let fields: Vec<(Vec<u8>, Vec<u8>)> = flat
        .chunks(2)
        .map(|kv| (bytes(&kv[0]), kv.get(1).map(bytes).unwrap_or_default()))
        .collect();
    let text = |name: &[u8]| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    Some(DeadLetter {
        entry_id,
        reason: text(b"reason"),
        dead_at_ms: text(b"dead_at").parse().unwrap_or(0),
        source_id: text(b"source_id"),
        request: Envelope::from_fields(fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))),
    })
}
