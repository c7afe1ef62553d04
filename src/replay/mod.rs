//! The background drain: delivers buffered requests to the target once its
//! heartbeat is back — paced, in order, at least once, each with its
//! `Idempotency-Key`.
//!
//! # How it works
//!
//! The buffer is a Redis stream with a consumer group (`thb`). A replayer
//! reads entries into its own pending list (`XREADGROUP`), delivers them
//! through the same service the layer wraps, then acknowledges each one and
//! sets its processed-marker `ns:{t}:done:<id>` in one script. Entries a
//! replayer had claimed when it died stay pending, and are claimed again
//! (`XAUTOCLAIM`): by the next lease holder in strict order, after
//! [`visibility_timeout`](ReplayConfig::visibility_timeout) in relaxed order.
//! Before delivering, the markers of a batch are read in one `MGET`, so an
//! entry that was delivered but not removed (a crash between the two) is
//! skipped rather than sent twice.
//!
//! - **Strict order** (default): one replica at a time drains a target, the
//!   holder of the lease `ns:{t}:lease`; it delivers one request at a time,
//!   oldest first, retrying the head until it is delivered or dead-lettered.
//! - **Relaxed order**: every replica drains, up to
//!   [`max_in_flight`](ReplayConfig::max_in_flight) deliveries each.
//!
//! It never blocks a Redis connection (`XREADGROUP` without `BLOCK`): it
//! wakes when the heartbeat returns, when the buffer grows (this process's
//! writes, or the watcher seeing another's), and every
//! [`poll_interval`](ReplayConfig::poll_interval) as a safety net.
//!
//! # At least once
//!
//! A crash after a delivery and before its acknowledgement delivers that
//! request again, with the same `Idempotency-Key`: at most the entries of one
//! batch ([`batch`](ReplayConfig::batch)) in flight at the time. Targets
//! drop duplicates by that key.
//!
//! # Examples
//!
//! ```no_run
//! # use bytes::Bytes;
//! # use http_body_util::Full;
//! use tower_heartbeat_buffer::{HeartbeatBufferLayer, RequestBody, Target, Watcher};
//! use tower_heartbeat_buffer::replay::{ReplayConfig, ReplayEventKind};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! # let client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, RequestBody<Full<Bytes>>> =
//! #     hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
//! let watcher = Watcher::connect(redis::Client::open("redis://127.0.0.1/")?).await?;
//! let layer = HeartbeatBufferLayer::builder(Target::new("orders")?).build(&watcher).await?;
//!
//! // Replays go through the same client the layer wraps.
//! let replayer = layer.replayer().config(ReplayConfig::default()).spawn(client.clone());
//! let mut events = replayer.events();
//! tokio::spawn(async move {
//!     while let Ok(event) = events.recv().await {
//!         if let ReplayEventKind::DeadLettered { reason } = &event.kind {
//!             eprintln!("{} will not be delivered: {reason}", event.id);
//!         }
//!     }
//! });
//! // ... on shutdown:
//! replayer.shutdown().await;
//! # Ok(()) }
//! ```

mod dead;
mod policy;
mod store;
mod worker;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

pub use dead::{DeadLetter, DeadLetters};
pub use policy::{Attempt, DefaultReplayPolicy, ReplayPolicy, Verdict};
pub(crate) use store::Store;
/// The consumer group on `ns:{t}:queue` that replayers share (public: admin
/// tools read its pending list).
pub use store::GROUP as CONSUMER_GROUP;
pub use worker::{ATTEMPT_HEADER, REPLAY_HEADER};

use crate::error::RedisError;
use crate::heartbeat::{TargetView, Watcher};
use crate::layer::DeliveryOrder;
use crate::target::Target;

/// How a replayer drains. Start from [`ReplayConfig::default`] and change
/// fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReplayConfig {
    /// Strict (one replica, one delivery at a time, oldest first) or
    /// relaxed (competing replicas, concurrent deliveries). Default strict.
    pub order: DeliveryOrder,
    /// Entries read per round trip, and most redelivered after a crash.
    /// Default 32.
    pub batch: usize,
    /// Concurrent deliveries in relaxed order (strict order delivers one at
    /// a time). Default 16.
    pub max_in_flight: usize,
    /// Most deliveries per second; `None` for no limit. Default `None`.
    pub max_per_second: Option<f64>,
    /// Ramp after the heartbeat returns (and after each pause): the rate
    /// starts at 20 deliveries/s and doubles every 250 ms until this much
    /// time has passed. Default 2 s; zero disables it.
    pub slow_start: Duration,
    /// Attempts (by the replayer) before an entry is dead-lettered. Default 10.
    pub max_attempts: u32,
    /// Entries older than this are dead-lettered rather than delivered.
    /// Default 24 h.
    pub max_age: Option<Duration>,
    /// Entries larger than this (all fields together) are dead-lettered
    /// rather than delivered: the layer never writes one (its
    /// `max_body_bytes` is 1 MiB by default), so it was written by hand or
    /// by another program, and a batch of them would all sit in memory.
    /// Default 16 MiB; keep it above the layer's `max_body_bytes`.
    pub max_entry_bytes: usize,
    /// First retry delay; doubles (with jitter) up to `backoff_max`.
    /// Default 100 ms.
    pub backoff_base: Duration,
    /// Longest retry delay. Default 30 s.
    pub backoff_max: Duration,
    /// Strict order: how long the drain lease lives without renewal, so how
    /// fast another replica takes over from a dead one. Keep delivery
    /// timeouts below it. Default 10 s.
    pub lease_ttl: Duration,
    /// Relaxed order: how long an entry may stay claimed without an answer
    /// before another replica takes it. Default 30 s.
    pub visibility_timeout: Duration,
    /// Safety poll when no event wakes the replayer. Default 1 s.
    pub poll_interval: Duration,
    /// How long processed-markers live. Default 24 h.
    pub marker_ttl: Duration,
    /// Consumer name in the group; default a fresh UUIDv7 per process.
    pub consumer: Option<String>,
    /// Time allowed for in-flight deliveries at shutdown. Default 5 s.
    pub grace: Duration,
    /// Longest wait for one Redis command. Default 1 s.
    pub redis_timeout: Duration,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            order: DeliveryOrder::Strict,
            batch: 32,
            max_in_flight: 16,
            max_per_second: None,
            slow_start: Duration::from_secs(2),
            max_attempts: 10,
            max_age: Some(Duration::from_secs(24 * 3600)),
            max_entry_bytes: 16 * 1024 * 1024,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            lease_ttl: Duration::from_secs(10),
            visibility_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            marker_ttl: Duration::from_secs(24 * 3600),
            consumer: None,
            grace: Duration::from_secs(5),
            redis_timeout: Duration::from_secs(1),
        }
    }
}

/// What happened to one buffered request.
#[derive(Clone, Debug)]
pub struct ReplayEvent {
    /// The request's id (its `Idempotency-Key`), or empty for an entry too
    /// malformed to have one.
    pub id: String,
    /// The stream entry id.
    pub entry_id: String,
    /// What happened.
    pub kind: ReplayEventKind,
}

/// The kinds of [`ReplayEvent`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayEventKind {
    /// Delivered and acknowledged.
    Delivered {
        /// The target's answer.
        status: StatusCode,
        /// Which attempt of the replayer delivered it (1 = first).
        attempt: u32,
    },
    /// An attempt failed; another follows after `after`.
    Retrying {
        /// The attempt that failed.
        attempt: u32,
        /// The wait before the next one.
        after: Duration,
        /// Why it failed.
        reason: String,
    },
    /// Moved to the dead letters.
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// Already delivered before (its processed-marker was set): removed
    /// without a delivery.
    Skipped,
}

/// A replayer's event channel, allocated when the first receiver asks for
/// it: its 1024 slots were most of an idle replayer's memory (about 120 KiB),
/// paid by every replayer that nobody listens to.
#[derive(Clone, Default)]
pub(crate) struct Events(Arc<std::sync::OnceLock<broadcast::Sender<ReplayEvent>>>);

impl Events {
    /// Sends the event built by `event`, which runs only when someone listens.
    pub(crate) fn send(&self, event: impl FnOnce() -> ReplayEvent) {
        if let Some(tx) = self.0.get() {
            if tx.receiver_count() > 0 {
                let _ = tx.send(event());
            }
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<ReplayEvent> {
        self.0
            .get_or_init(|| broadcast::channel(1024).0)
            .subscribe()
    }
}

/// Counters of one replayer.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) delivered: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) skipped: AtomicU64,
}

/// Prepares a replayer; see [`HeartbeatBufferLayer::replayer`](crate::HeartbeatBufferLayer::replayer)
/// or [`Replayer::builder`].
pub struct ReplayerBuilder {
    view: TargetView,
    store: Store,
    config: ReplayConfig,
    policy: Arc<dyn ReplayPolicy>,
}

impl ReplayerBuilder {
    pub(crate) fn new(view: TargetView, conn: crate::backend::Conn) -> Self {
        let config = ReplayConfig::default();
        let store = Store::new(conn, view.target(), config.redis_timeout);
        Self {
            view,
            store,
            config,
            policy: Arc::new(DefaultReplayPolicy),
        }
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: ReplayConfig) -> Self {
        self.store = Store::new(self.store.conn(), self.view.target(), config.redis_timeout);
        self.config = config;
        self
    }

    /// Replaces the outcome policy (default [`DefaultReplayPolicy`]).
    pub fn policy(mut self, policy: impl ReplayPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Starts draining through `service` (the one the layer wraps, or an
    /// equivalent). Must be called within a Tokio runtime.
    pub fn spawn<S, B, RB>(self, service: S) -> ReplayHandle
    where
        S: tower_service::Service<
                http::Request<crate::RequestBody<B>>,
                Response = http::Response<RB>,
            > + Clone
            + Send
            + 'static,
        S::Future: Send,
        S::Error: Into<crate::BoxError>,
        B: Send + 'static,
        RB: http_body::Body + Send + 'static,
        RB::Data: Send,
    {
        let (shutdown_tx, shutdown) = watch::channel(false);
        let events = Events::default();
        let stats = Arc::new(Stats::default());
        let grace = self.config.grace;
        let consumer = self
            .config
            .consumer
            .clone()
            .unwrap_or_else(crate::id::new_id);
        let worker = worker::Worker::new(
            self.store,
            self.view.clone(),
            service,
            self.config,
            self.policy,
            consumer.clone(),
            events.clone(),
            shutdown,
            Arc::clone(&stats),
        );
        let span =
            tracing::debug_span!("replay", target = %self.view.target(), consumer = %consumer);
        let task = tokio::spawn(tracing::Instrument::instrument(worker.run(), span));
        ReplayHandle {
            target: self.view.target().clone(),
            consumer,
            grace,
            shutdown: shutdown_tx,
            events,
            stats,
            task: Some(task),
        }
    }
}

impl fmt::Debug for ReplayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayerBuilder")
            .field("target", self.view.target())
            .field("config", &self.config)
            .finish()
    }
}

/// Entry point for a replayer on its own (a process that only drains).
#[derive(Debug)]
pub struct Replayer;

impl Replayer {
    /// A replayer for `target`, watching it with `watcher` (loads its state
    /// first).
    pub async fn builder(
        watcher: &Watcher,
        target: &Target,
    ) -> Result<ReplayerBuilder, RedisError> {
        let view = watcher.watch(target).await;
        let conn = watcher.backend().data()?;
        Ok(ReplayerBuilder::new(view, conn))
    }
}

/// A running replayer. Dropping it asks it to stop (without waiting);
/// [`shutdown`](Self::shutdown) waits.
pub struct ReplayHandle {
    target: Target,
    consumer: String,
    grace: Duration,
    shutdown: watch::Sender<bool>,
    events: Events,
    stats: Arc<Stats>,
    task: Option<JoinHandle<()>>,
}

impl ReplayHandle {
    /// Every [`ReplayEvent`] from now on. A receiver that falls more than
    /// 1024 events behind loses the oldest (and is told so by `recv`).
    pub fn events(&self) -> broadcast::Receiver<ReplayEvent> {
        self.events.subscribe()
    }

    /// Requests delivered so far.
    pub fn delivered(&self) -> u64 {
        self.stats.delivered.load(Ordering::Relaxed)
    }

    /// Failed attempts that will be retried, so far.
    pub fn retried(&self) -> u64 {
        self.stats.retried.load(Ordering::Relaxed)
    }

    /// Requests moved to the dead letters so far.
    pub fn dead_lettered(&self) -> u64 {
        self.stats.dead_lettered.load(Ordering::Relaxed)
    }

    /// This replayer's consumer name in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Stops claiming, lets in-flight deliveries finish within the grace
    /// period, acknowledges what was delivered, gives the lease up; entries
    /// not delivered stay in the buffer for the next replayer.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        if let Some(mut task) = self.task.take() {
            // Deliveries under way get the grace period; a target that
            // hangs past it does not hold the shutdown. What was not
            // acknowledged stays pending and is delivered again later, with
            // its key.
            if tokio::time::timeout(self.grace, &mut task).await.is_err() {
                tracing::warn!(target = %self.target, "replayer did not stop within its grace period; stopped it");
                task.abort();
                let _ = task.await;
            }
        }
    }
}

impl Drop for ReplayHandle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl fmt::Debug for ReplayHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayHandle")
            .field("target", &self.target)
            .field("consumer", &self.consumer)
            .field("delivered", &self.delivered())
            .finish()
    }
}
