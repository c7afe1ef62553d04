//! [`HeartbeatBufferLayer`]: configuration only; the per-call decision lives
//! in [`HeartbeatBuffer`](crate::HeartbeatBuffer).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::breaker::Breaker;
use crate::error::RedisError;
use crate::heartbeat::{TargetView, Watcher};
use crate::policy::{
    Bufferable, FailureStatuses, IsFailure, NeverStore, OnDown, OnRedisDown, UnsafeMethods,
    WhenDown, WhenRedisDown,
};
use crate::queue::{Queue, Replication};
use crate::service::HeartbeatBuffer;
use crate::target::Target;

/// Default [`max_body_bytes`](HeartbeatBufferBuilder::max_body_bytes): 1 MiB.
///
/// A body that may have to be stored is held in memory while it is
/// forwarded, so the limit bounds memory per in-flight call (64 concurrent
/// calls hold at most 64 MiB) and the size of one Redis stream entry. API
/// writes are typically far smaller; uploads larger than this still stream
/// through while the target is up, and get `413` while it is down.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// Default [`max_queue_len`](HeartbeatBufferBuilder::max_queue_len): 100 000
/// entries per target. With 1 KiB requests that is about 100 MiB of Redis
/// memory: enough to ride out a long outage at a few hundred writes per
/// second, small enough not to take the Redis server down with the target.
pub const DEFAULT_MAX_QUEUE_LEN: u64 = 100_000;

/// Whether buffered requests keep their order against new ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeliveryOrder {
    /// While the target's buffer is not empty, bufferable requests join it
    /// even when the target is up, so nothing overtakes what is waiting.
    #[default]
    Strict,
    /// Bufferable requests go straight to a live target, even while older
    /// ones wait in the buffer.
    Relaxed,
}

/// No fallback service: [`WhenDown::Fallback`] answers `503`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFallback;

/// A fallback service, set with [`HeartbeatBufferBuilder::fallback`].
#[derive(Clone, Debug)]
pub struct WithFallback<F>(F);

/// Builds a [`HeartbeatBufferLayer`].
pub struct HeartbeatBufferBuilder<F = NoFallback> {
    target: Target,
    config: Config,
    suspect_after: u32,
    probe_interval: Duration,
    redis_timeout: Duration,
    replication: Option<Replication>,
    fallback: F,
}

/// Everything the per-call decision reads; shared by every clone.
pub(crate) struct Config {
    pub(crate) max_body_bytes: usize,
    pub(crate) max_queue_len: u64,
    pub(crate) order: DeliveryOrder,
    pub(crate) bufferable: Arc<dyn Bufferable>,
    pub(crate) is_failure: Arc<dyn IsFailure>,
    pub(crate) on_down: Arc<dyn OnDown>,
    pub(crate) on_redis_down: Arc<dyn OnRedisDown>,
    pub(crate) never_store: NeverStore,
}

impl<F> HeartbeatBufferBuilder<F> {
    /// Largest body held in memory so it can be stored (default
    /// [`DEFAULT_MAX_BODY_BYTES`]).
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.config.max_body_bytes = limit;
        self
    }

    /// Most entries the buffer may hold (default [`DEFAULT_MAX_QUEUE_LEN`]).
    /// When full, new requests get `503` with
    /// [`UnavailableReason::QueueFull`](crate::UnavailableReason::QueueFull):
    /// nothing already stored is ever dropped to make room.
    pub fn max_queue_len(mut self, limit: u64) -> Self {
        self.config.max_queue_len = limit;
        self
    }

    /// [`DeliveryOrder::Strict`] (default) or [`DeliveryOrder::Relaxed`].
    pub fn order(mut self, order: DeliveryOrder) -> Self {
        self.config.order = order;
        self
    }

    /// Which requests may be buffered (default [`UnsafeMethods`]).
    pub fn bufferable(mut self, policy: impl Bufferable) -> Self {
        self.config.bufferable = Arc::new(policy);
        self
    }

    /// Which answers count as a failure of the target (default
    /// [`FailureStatuses`]: 502, 503, 504).
    pub fn is_failure(mut self, policy: impl IsFailure) -> Self {
        self.config.is_failure = Arc::new(policy);
        self
    }

    /// What happens to a request while the target is down (default
    /// [`WhenDown::Buffer`]); a [`WhenDown`] value or a closure per request.
    pub fn when_down(mut self, policy: impl OnDown) -> Self {
        self.config.on_down = Arc::new(policy);
        self
    }

    /// What happens while Redis cannot be reached (default
    /// [`WhenRedisDown::ForwardWhileUp`]).
    pub fn when_redis_down(mut self, policy: impl OnRedisDown) -> Self {
        self.config.on_redis_down = Arc::new(policy);
        self
    }

    /// Headers never written to Redis (default: [`NeverStore::default`]).
    pub fn never_store(mut self, headers: NeverStore) -> Self {
        self.config.never_store = headers;
        self
    }

    /// Consecutive failed calls (transport errors or failure statuses) after
    /// which the target is suspect even though its heartbeat lives: calls
    /// then divert without trying it, and one call per
    /// [`probe_interval`](Self::probe_interval) probes it (default 3).
    pub fn suspect_after(mut self, failures: u32) -> Self {
        self.suspect_after = failures.max(1);
        self
    }

    /// Time between probes of a suspect target (default 1 s). A heartbeat
    /// that goes away and comes back clears suspicion at once.
    pub fn probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// Longest wait for one Redis write before the call gets `503` (default
    /// 500 ms).
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Confirms every buffered request on `replicas` replicas before
    /// answering `202` (`WAIT replicas timeout` after each write; default:
    /// off).
    ///
    /// Redis replicates asynchronously: without this, a primary that dies
    /// within its replication lag of a `202` (usually well under a
    /// millisecond, longer when a replica falls behind) loses that request,
    /// because the replica promoted in its place never received it. With
    /// it, such a request gets `503`
    /// ([`UnavailableReason::NotReplicated`](crate::UnavailableReason::NotReplicated))
    /// instead, and nothing answered `202` is lost to a failover. The entry
    /// may still be in the buffer and be delivered: a caller that retries
    /// should send the same `Idempotency-Key`. Each buffered call then
    /// waits for a replica's acknowledgement (one more replication round
    /// trip; figures in the README). Since a `WAIT` holds its connection
    /// until the replicas answer, these writes go through a pool of 8
    /// connections kept for them (one pool per [`Backend`](crate::Backend),
    /// shared by all its layers) rather than the shared data connection.
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replication = (replicas > 0).then_some(Replication {
            replicas,
            timeout: timeout.max(Duration::from_millis(1)),
        });
        self
    }

    /// Where [`WhenDown::Fallback`] sends requests: any service taking the
    /// same requests as the wrapped one (a secondary region, a degraded-mode
    /// handler...). Requests keep their idempotency key.
    pub fn fallback<G>(self, fallback: G) -> HeartbeatBufferBuilder<WithFallback<G>> {
        HeartbeatBufferBuilder {
            target: self.target,
            config: self.config,
            suspect_after: self.suspect_after,
            probe_interval: self.probe_interval,
            redis_timeout: self.redis_timeout,
            replication: self.replication,
            fallback: WithFallback(fallback),
        }
    }

    /// Watches the target with `watcher` (loading its state first) and opens
    /// the buffer's connection.
    ///
    /// Does not fail when Redis is unreachable: the layer then forwards
    /// while the target is believed up and answers `503` where it would
    /// buffer, until Redis answers.
    pub async fn build(self, watcher: &Watcher) -> Result<HeartbeatBufferLayer<F>, RedisError> {
        let view = watcher.watch(&self.target).await;
        // A `WAIT` holds its connection until the replicas answer: such
        // writes go through connections kept for them.
        let writers = match self.replication {
            Some(_) => Some(watcher.backend().waiting()?),
            None => None,
        };
        let queue = Queue::new(
            watcher.backend().data()?,
            writers,
            &self.target,
            self.config.max_queue_len,
            self.redis_timeout,
            self.replication,
        );
        Ok(HeartbeatBufferLayer {
            shared: Arc::new(Shared {
                view,
                queue,
                breaker: Breaker::new(self.suspect_after, self.probe_interval),
                metrics: crate::metrics::LayerMetrics::new(self.target.name()),
                config: self.config,
                redis_warned: std::sync::atomic::AtomicBool::new(false),
            }),
            fallback: self.fallback,
        })
    }
}

impl<F> fmt::Debug for HeartbeatBufferBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatBufferBuilder")
            .field("target", &self.target)
            .field("config", &self.config)
            .field("suspect_after", &self.suspect_after)
            .field("probe_interval", &self.probe_interval)
            .field("redis_timeout", &self.redis_timeout)
            .finish()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_queue_len", &self.max_queue_len)
            .field("order", &self.order)
            .field("never_store", &self.never_store)
            .finish_non_exhaustive()
    }
}

/// What every clone of the service shares: the target's view, the buffer,
/// the breaker and the configuration.
pub(crate) struct Shared {
    pub(crate) view: TargetView,
    pub(crate) queue: Queue,
    pub(crate) breaker: Breaker,
    pub(crate) metrics: crate::metrics::LayerMetrics,
    pub(crate) config: Config,
    /// Set while a Redis failure has been logged, so an outage logs once.
    pub(crate) redis_warned: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("view", &self.view)
            .field("queue", &self.queue)
            .field("suspect", &self.breaker.is_suspect())
            .field("config", &self.config)
            .finish()
    }
}

/// Forwards calls while the target's heartbeat lives; stores them in Redis
/// and answers `202 Accepted` while it does not.
///
/// Built with [`HeartbeatBufferLayer::builder`]; see the
/// [crate documentation](crate) for the whole story.
pub struct HeartbeatBufferLayer<F = NoFallback> {
    shared: Arc<Shared>,
    fallback: F,
}

impl HeartbeatBufferLayer {
    /// A builder for `target`, with the defaults.
    pub fn builder(target: Target) -> HeartbeatBufferBuilder {
        HeartbeatBufferBuilder {
            target,
            config: Config {
                max_body_bytes: DEFAULT_MAX_BODY_BYTES,
                max_queue_len: DEFAULT_MAX_QUEUE_LEN,
                order: DeliveryOrder::default(),
                bufferable: Arc::new(UnsafeMethods),
                is_failure: Arc::new(FailureStatuses::default()),
                on_down: Arc::new(WhenDown::default()),
                on_redis_down: Arc::new(WhenRedisDown::default()),
                never_store: NeverStore::default(),
            },
            suspect_after: 3,
            probe_interval: Duration::from_secs(1),
            redis_timeout: Duration::from_millis(500),
            replication: None,
            fallback: NoFallback,
        }
    }
}

impl<F> HeartbeatBufferLayer<F> {
    /// The shared view of the target's health.
    pub fn view(&self) -> &TargetView {
        &self.shared.view
    }

    /// A replayer for this layer's target, sharing its view and connection;
    /// [`spawn`](crate::replay::ReplayerBuilder::spawn) it with the service
    /// the layer wraps (a clone of the client).
    pub fn replayer(&self) -> crate::replay::ReplayerBuilder {
        crate::replay::ReplayerBuilder::new(self.shared.view.clone(), self.shared.queue.conn())
    }

    /// This target's dead letters.
    pub fn dead_letters(&self) -> crate::replay::DeadLetters {
        crate::replay::DeadLetters::from_conn(self.shared.queue.conn(), self.shared.view.target())
    }
}

impl<F: Clone> Clone for HeartbeatBufferLayer<F> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            fallback: self.fallback.clone(),
        }
    }
}

impl<F> fmt::Debug for HeartbeatBufferLayer<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatBufferLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S> Layer<S> for HeartbeatBufferLayer<NoFallback> {
    type Service = HeartbeatBuffer<S, S>;

    fn layer(&self, inner: S) -> Self::Service {
        HeartbeatBuffer::new(inner, None, Arc::clone(&self.shared))
    }
}

impl<S, F: Clone> Layer<S> for HeartbeatBufferLayer<WithFallback<F>> {
    type Service = HeartbeatBuffer<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        HeartbeatBuffer::new(
            inner,
            Some(self.fallback.0.clone()),
            Arc::clone(&self.shared),
        )
    }
}
