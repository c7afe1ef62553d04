//! The target's side: keep a heartbeat key alive while the service serves.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{debug, info, warn, Instrument};

use crate::backend::{Backend, Conn};
use crate::error::{InvalidConfig, RedisError};
use crate::sync::lock;
use crate::target::{HeartbeatSource, Target};

/// Default heartbeat TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

/// How long one write may take before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// First retry delay after a failed refresh; doubles up to the interval.
const RETRY_MIN: Duration = Duration::from_millis(100);

/// What a target announces about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Serving: send traffic.
    Up,
    /// Finishing what it has before a planned stop: callers divert now.
    Draining,
    /// Alive but not serving (maintenance, dependency down): callers divert.
    Down,
}

impl Status {
    /// The value written to the `status` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Up => "up",
            Status::Draining => "draining",
            Status::Down => "down",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the heartbeat key is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HeartbeatFormat {
    /// A hash with `status`, `instance`, `version`, `started_at` and any
    /// [extra fields](HeartbeatBuilder::field), plus `PEXPIRE`, in one
    /// `MULTI`.
    #[default]
    Hash,
    /// A plain string: `1` while up, else the status word, with `PX`. What
    /// a shell script would write: `SET key 1 PX 5000`.
    Marker,
}

/// Builds a [`Heartbeat`].
#[derive(Clone, Debug)]
pub struct HeartbeatBuilder {
    target: Target,
    instance: Option<String>,
    ttl: Duration,
    interval: Option<Duration>,
    format: HeartbeatFormat,
    version: Option<String>,
    fields: Vec<(String, String)>,
}

impl HeartbeatBuilder {
    /// Write `ns:{t}:hb:<instance>` instead of the shared `ns:{t}:hb`, so
    /// that each instance of a multi-instance target has its own key. The
    /// instance name is also written to the `instance` field.
    pub fn instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }

    /// Time to live of the key (default 5 s): how long callers keep
    /// believing in the target after it stops refreshing without a word.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Time between refreshes (default: a third of the TTL, so two refreshes
    /// may fail before the key expires).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// How the key is written (default [`HeartbeatFormat::Hash`]).
    pub fn format(mut self, format: HeartbeatFormat) -> Self {
        self.format = format;
        self
    }

    /// The `version` field (hash format only).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// An extra field (hash format only). Names `status`, `instance`,
    /// `version` and `started_at` are reserved.
    pub fn field(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.fields.push((name.into(), value.into()));
        self
    }

    /// Starts refreshing in the background and returns its handle.
    ///
    /// Does not wait for Redis: the first write is attempted at once, and
    /// retried with backoff while Redis is unreachable. Use
    /// [`Heartbeat::wait_published`] to wait for the first success. Must be
    /// called within a Tokio runtime.
    ///
    /// `backend` is a [`Backend`] (one server, a cluster, a Sentinel-managed
    /// primary) or a `redis::Client`.
    pub fn start(self, backend: impl Into<Backend>) -> Result<Heartbeat, InvalidConfig> {
        let key = match (&self.instance, self.target.heartbeat_source()) {
            (Some(instance), HeartbeatSource::Explicit(_)) => {
                return Err(InvalidConfig::new(format!(
                    "instance {instance:?} given for a target with an explicit heartbeat key"
                )))
            }
            (Some(instance), _) => self
                .target
                .instance_heartbeat_key(instance)
                .map_err(|e| InvalidConfig::new(e.to_string()))?,
            (None, HeartbeatSource::Instances) => {
                return Err(InvalidConfig::new(
                    "a multi-instance target needs an instance name for its heartbeat",
                ))
            }
            (None, _) => self.target.heartbeat_key(),
        };
        if self.ttl < Duration::from_millis(10) {
            return Err(InvalidConfig::new("heartbeat ttl below 10 ms"));
        }
        let interval = self.interval.unwrap_or(self.ttl / 3);
        if interval.is_zero() || interval >= self.ttl {
            return Err(InvalidConfig::new(format!(
                "heartbeat interval {interval:?} must be positive and shorter than the ttl {:?}",
                self.ttl
            )));
        }
        for (name, _) in &self.fields {
            if ["status", "instance", "version", "started_at"].contains(&name.as_str()) {
                return Err(InvalidConfig::new(format!(
                    "heartbeat field {name:?} is reserved"
                )));
            }
        }

        let conn = backend
            .into()
            .data()
            .map_err(|e| InvalidConfig::new(format!("redis client unusable: {e}")))?;

        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let writer = Writer {
            key,
            ttl: self.ttl,
            format: self.format,
            instance: self.instance,
            version: self.version,
            started_at: started_at.to_string(),
            fields: self.fields,
        };
        let shared = Arc::new(Shared {
            writer,
            status: Mutex::new(Status::Up),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let (published_tx, published) = watch::channel(false);
        let span =
            tracing::debug_span!("heartbeat", target = %self.target, key = %shared.writer.key);
        let task = tokio::spawn(
            refresh_loop(
                conn.clone(),
                Arc::clone(&shared),
                interval,
                stop_rx,
                published_tx,
            )
            .instrument(span),
        );
        Ok(Heartbeat {
            target: self.target,
            conn,
            shared,
            stop: stop_tx,
            published,
            task: Some(task),
        })
    }
}

/// Keeps a target's heartbeat key alive until shut down.
///
/// Refreshes in a background task; survives Redis outages (retries with
/// backoff, logs once per outage). [`shutdown`](Self::shutdown) deletes the
/// key so that callers divert at once; dropping the handle without it stops
/// refreshing and lets the key expire after its TTL.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use tower_heartbeat_buffer::{Heartbeat, Status, Target};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let heartbeat = Heartbeat::builder(Target::new("orders")?)
///     .ttl(Duration::from_secs(5))
///     .version(env!("CARGO_PKG_VERSION"))
///     .start(client)?;
///
/// // ... serve ...
///
/// heartbeat.set_status(Status::Draining).await?; // callers divert now
/// // ... finish in-flight work ...
/// heartbeat.shutdown().await?; // key deleted
/// # Ok(()) }
/// ```
pub struct Heartbeat {
    target: Target,
    conn: Conn,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    published: watch::Receiver<bool>,
    task: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// A builder for `target`'s heartbeat.
    pub fn builder(target: Target) -> HeartbeatBuilder {
        HeartbeatBuilder {
            target,
            instance: None,
            ttl: DEFAULT_TTL,
            interval: None,
            format: HeartbeatFormat::default(),
            version: None,
            fields: Vec::new(),
        }
    }

    /// The key this heartbeat writes.
    pub fn key(&self) -> &str {
        &self.shared.writer.key
    }

    /// The target this heartbeat is for.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The status currently announced.
    pub fn status(&self) -> Status {
        *lock(&self.shared.status)
    }

    /// Announces `status` now (and in every refresh after).
    ///
    /// On error the status is still kept and written by the next successful
    /// refresh.
    pub async fn set_status(&self, status: Status) -> Result<(), RedisError> {
        *lock(&self.shared.status) = status;
        let mut conn = self.conn.clone();
        self.shared.writer.write(&mut conn, status).await?;
        info!(target = %self.target, %status, "heartbeat status announced");
        Ok(())
    }

    /// Waits until the key has been written at least once.
    pub async fn wait_published(&self) {
        let mut published = self.published.clone();
        let _ = published.wait_for(|p| *p).await;
    }

    /// Stops refreshing and deletes the key, so that callers divert at once.
    ///
    /// If Redis is unreachable the key is left to expire after its TTL, and
    /// the error says so.
    pub async fn shutdown(mut self) -> Result<(), RedisError> {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            // The task only awaits Redis with a timeout, so this is short;
            // it must end before the DEL, or a late refresh could revive the
            // key.
            let _ = task.await;
        }
        let mut conn = self.conn.clone();
        let key = self.shared.writer.key.clone();
        match timeout(
            WRITE_TIMEOUT,
            redis::cmd("DEL").arg(&key).exec_async(&mut conn),
        )
        .await
        {
            Ok(Ok(())) => {
                info!(target = %self.target, %key, "heartbeat deleted");
                Ok(())
            }
            Ok(Err(e)) => Err(RedisError::new("heartbeat delete", e)),
            Err(_) => Err(RedisError::timeout("heartbeat delete")),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heartbeat")
            .field("target", &self.target)
            .field("key", &self.shared.writer.key)
            .field("ttl", &self.shared.writer.ttl)
            .field("status", &self.status())
            .finish()
    }
}

struct Shared {
    writer: Writer,
    status: Mutex<Status>,
}

/// Everything needed to write the key; immutable once started.
struct Writer {
    key: String,
    ttl: Duration,
    format: HeartbeatFormat,
    instance: Option<String>,
    version: Option<String>,
    started_at: String,
    fields: Vec<(String, String)>,
}

impl Writer {
    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// One atomic write of the whole heartbeat with its TTL.
    async fn write(&self, conn: &mut Conn, status: Status) -> Result<(), RedisError> {
        let ttl_ms = self.ttl_ms();
        let result = match self.format {
            HeartbeatFormat::Marker => {
                let value = if status == Status::Up {
                    "1"
                } else {
                    status.as_str()
                };
                let cmd = redis::cmd("SET")
                    .arg(&self.key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms)
                    .to_owned();
                timeout(WRITE_TIMEOUT, cmd.exec_async(conn)).await
            }
            HeartbeatFormat::Hash => {
                let mut pipe = redis::pipe();
                pipe.atomic();
                let mut hset = redis::cmd("HSET");
                hset.arg(&self.key)
                    .arg("status")
                    .arg(status.as_str())
                    .arg("started_at")
                    .arg(&self.started_at);
                if let Some(instance) = &self.instance {
                    hset.arg("instance").arg(instance);
                }
                if let Some(version) = &self.version {
                    hset.arg("version").arg(version);
                }
                for (name, value) in &self.fields {
                    hset.arg(name).arg(value);
                }
                pipe.add_command(hset).ignore();
                pipe.cmd("PEXPIRE").arg(&self.key).arg(ttl_ms).ignore();
                timeout(WRITE_TIMEOUT, pipe.exec_async(conn)).await
            }
        };
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RedisError::new("heartbeat refresh", e)),
            Err(_) => Err(RedisError::timeout("heartbeat refresh")),
        }
    }
}

async fn refresh_loop(
    mut conn: Conn,
    shared: Arc<Shared>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    published: watch::Sender<bool>,
) {
    let mut failing = false;
    let mut retry = RETRY_MIN;
    loop {
        let status = *lock(&shared.status);
        let next = match shared.writer.write(&mut conn, status).await {
            Ok(()) => {
                if failing {
                    info!("heartbeat refreshed again after an outage");
                    failing = false;
                }
                published.send_if_modified(|p| !std::mem::replace(p, true));
                retry = RETRY_MIN;
                interval
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "heartbeat refresh failed; retrying with backoff until redis answers");
                    failing = true;
                } else {
                    debug!(error = %e, "heartbeat refresh failed again");
                }
                let wait = retry.min(interval);
                retry = (retry * 2).min(interval);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = stop.changed() => return,
        }
    }
}
