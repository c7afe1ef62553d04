//! The caller's side: one background task per watched target keeps a
//! [`TargetView`] current from keyspace notifications, local deadlines and
//! periodic reconciliation.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, error, info, trace, warn, Instrument};

use super::notifications::{self, Check, NotificationMode};
use super::probe::{self, Assessment};
use super::view::{Health, TargetView, ViewState};
use crate::backend::{Backend, Conn};
use crate::error::RedisError;
use crate::sync::{lock, read, write};
use crate::target::{HeartbeatSource, Target};

/// Default time between two reconciliations of a target (a full re-read that
/// covers lost notifications).
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(1);
/// Default time allowed for one Redis read before it counts as failed.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// Retry pacing while Redis does not answer: short at first (a restart is
/// quick), then slow enough that an outage costs no measurable CPU.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Instance discovery scans this many keys per `SCAN` call.
const SCAN_COUNT: usize = 1000;
/// How often a non-empty queue's length is read, to see it drain.
const BACKLOG_POLL: Duration = Duration::from_millis(100);

/// Builds a [`Watcher`].
#[derive(Clone, Debug)]
pub struct WatcherBuilder {
    reconcile_interval: Duration,
    read_timeout: Duration,
    configure_notifications: bool,
}

impl Default for WatcherBuilder {
    fn default() -> Self {
        Self {
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            read_timeout: DEFAULT_READ_TIMEOUT,
            configure_notifications: false,
        }
    }
}

impl WatcherBuilder {
    /// How often each target is re-read even when nothing was notified
    /// (default 1 s). This bounds how late a change is seen when
    /// notifications are lost or off; expiries are seen at their deadline
    /// regardless.
    pub fn reconcile_interval(mut self, interval: Duration) -> Self {
        self.reconcile_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How long one read may take before Redis counts as unreachable
    /// (default 500 ms).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Allow the watcher to turn on the keyspace-notification flags it needs
    /// with `CONFIG SET` (default: off; the watcher only reads the setting
    /// and warns once when flags are missing). The flags are re-checked after
    /// every reconnect, since a restarted server forgets a `CONFIG SET`.
    pub fn configure_notifications(mut self, allow: bool) -> Self {
        self.configure_notifications = allow;
        self
    }

    /// Starts the watcher on `backend`: a [`Backend`] (one server, a
    /// cluster, a Sentinel-managed primary) or a `redis::Client`.
    ///
    /// Does not wait for Redis: when it is unreachable the watcher starts
    /// anyway, views report [`Health::Unknown`] and everything catches up
    /// when Redis answers. Must be called within a Tokio runtime.
    ///
    /// Fails only when `backend` cannot be used at all (for instance, an
    /// unsupported connection type).
    pub async fn connect(self, backend: impl Into<Backend>) -> Result<Watcher, RedisError> {
        Watcher::start(self, backend.into())
    }
}

/// Keeps one shared [`TargetView`] per watched target, current without any
/// Redis round trip on the reading side.
///
/// Create one per process and clone it: clones share the connection, the
/// background tasks and the views.
///
/// # How it knows
///
/// - **Keyspace notifications** on the exact channel of each heartbeat key
///   (`__keyspace@<db>__:<key>`; a pattern for multi-instance targets) wake
///   the target's task, which re-reads the key: a notification is a hint, the
///   key is the truth.
/// - **Local deadlines.** Each read takes the key's `PTTL`; the view turns
///   down at that deadline after one confirming read, not when Redis gets
///   round to deleting the key and emitting `expired` (which can be seconds
///   to minutes late on a server with many volatile keys).
/// - **Reconciliation** every [`reconcile_interval`](WatcherBuilder::reconcile_interval)
///   and after every reconnect covers lost notifications, and servers where
///   notifications are off or `CONFIG` is forbidden.
///
/// While Redis is unreachable, views hold their last known health: the
/// target cannot refresh its heartbeat then either, so a passing TTL says
/// nothing about the target. [`TargetView::redis_reachable`] tells.
#[derive(Clone)]
pub struct Watcher {
    inner: Arc<WatcherInner>,
}

struct WatcherInner {
    /// Where Redis is, as given; its data connection is shared with the
    /// layers and replayers built on this watcher.
    backend: Backend,
    /// This watcher's own connection, which carries the subscriptions.
    conn: Conn,
    config: WatcherBuilder,
    db: i64,
    router: Arc<Router>,
    views: Mutex<HashMap<Target, Arc<ViewState>>>,
    mode: watch::Receiver<NotificationMode>,
    shutdown: watch::Sender<bool>,
}

impl Drop for WatcherInner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl Watcher {
    /// A builder with the defaults.
    pub fn builder() -> WatcherBuilder {
        WatcherBuilder::default()
    }

    /// A watcher with the defaults on `backend`. See
    /// [`WatcherBuilder::connect`].
    pub async fn connect(backend: impl Into<Backend>) -> Result<Watcher, RedisError> {
        Self::builder().connect(backend).await
    }

    fn start(config: WatcherBuilder, backend: Backend) -> Result<Watcher, RedisError> {
        // Notifications arrive as RESP3 pushes on the same multiplexed
        // connection that reads the keys (on a cluster, one per node: the
        // node that owns each key's slot); the connection reconnects and
        // resubscribes by itself, and tells us of each disconnection.
        let db = backend.db();

        let (disconnects_tx, disconnects_rx) = mpsc::unbounded_channel();
        let router = Arc::new(Router {
            routes: RwLock::new(HashMap::new()),
            disconnects: disconnects_tx,
        });
        let push_router = Arc::clone(&router);
        let conn = backend.subscriber(
            Arc::new(move |push: PushInfo| push_router.dispatch(push)),
            config.read_timeout,
        )?;

        let (shutdown, shutdown_rx) = watch::channel(false);
        let (mode_tx, mode) = watch::channel(NotificationMode::Unchecked);
        let supervisor = Supervisor {
            conn: conn.clone(),
            router: Arc::clone(&router),
            may_configure: config.configure_notifications,
            reconcile_interval: config.reconcile_interval,
            mode: mode_tx,
            disconnects: disconnects_rx,
            shutdown: shutdown_rx,
        };
        tokio::spawn(supervisor.run().instrument(tracing::Span::current()));

        Ok(Watcher {
            inner: Arc::new(WatcherInner {
                backend,
                conn,
                config,
                db,
                router,
                views: Mutex::new(HashMap::new()),
                mode,
                shutdown,
            }),
        })
    }

    /// The shared view of `target`, watched from now on.
    ///
    /// The first call for a target subscribes to its heartbeat, reads it once
    /// (waiting at most about one read timeout) and starts its task; later
    /// calls return the same view at once.
    pub async fn watch(&self, target: &Target) -> TargetView {
        let (state, first_read) = {
            let mut views = lock(&self.inner.views);
            if let Some(state) = views.get(target) {
                (Arc::clone(state), None)
            } else {
                let state = Arc::new(ViewState::new(target.clone()));
                views.insert(target.clone(), Arc::clone(&state));
                let first_read = self.spawn_target_task(Arc::clone(&state));
                (state, Some(first_read))
            }
        };
        if let Some(first_read) = first_read {
            // The task answers after its first read attempt, success or not;
            // the bound only guards against a stalled runtime.
            let bound = self.inner.config.read_timeout * 3 + Duration::from_millis(100);
            let _ = timeout(bound, first_read).await;
        }
        TargetView::new(state, Arc::clone(&self.inner) as Arc<dyn Send + Sync>)
    }

    /// Where this watcher's Redis is.
    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// How this watcher currently learns of changes.
    pub fn notification_mode(&self) -> NotificationMode {
        *self.inner.mode.borrow()
    }

    fn spawn_target_task(&self, state: Arc<ViewState>) -> oneshot::Receiver<()> {
        let target = state.target().clone();
        let channel_prefix = format!("__keyspace@{}__:", self.inner.db);
        let subscription = match target.heartbeat_source() {
            HeartbeatSource::Instances => {
                Subscription::Pattern(format!("{channel_prefix}{}*", target.instance_key_prefix()))
            }
            _ => Subscription::Channel(format!("{channel_prefix}{}", target.heartbeat_key())),
        };
        let keys = match target.heartbeat_source() {
            HeartbeatSource::Instances => BTreeSet::new(),
            _ => BTreeSet::from([target.heartbeat_key()]),
        };
        let queue_key = target.queue_key();
        let queue_channel = format!("{channel_prefix}{queue_key}");
        let (hints_tx, hints) = mpsc::unbounded_channel();
        let router = &self.inner.router;
        router.add(
            subscription.route(),
            channel_prefix.clone(),
            hints_tx.clone(),
        );
        router.add(
            format!("c:{queue_channel}"),
            channel_prefix.clone(),
            hints_tx,
        );
        let (ready_tx, ready) = oneshot::channel();
        let task = TargetTask {
            conn: self.inner.conn.clone(),
            state,
            script: probe::read_script(),
            subscription,
            subscribed: false,
            keys,
            queue_key,
            queue_channel,
            queue_subscribed: false,
            last_backlog_read: Instant::now(),
            heartbeat_dirty: true,
            queue_dirty: true,
            queue_type_warned: false,
            wrong_type_warned: BTreeSet::new(),
            last: probe::assess(&[], std::time::Instant::now()),
            metrics: crate::metrics::ViewMetrics::new(target.name()),
            reconcile_interval: self.inner.config.reconcile_interval,
            read_timeout: self.inner.config.read_timeout,
            hints,
            shutdown: self.inner.shutdown.subscribe(),
            ready: Some(ready_tx),
        };
        let span = tracing::debug_span!("heartbeat_watch", target = %target);
        tokio::spawn(task.run().instrument(span));
        ready
    }
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("config", &self.inner.config)
            .field("db", &self.inner.db)
            .field("targets", &lock(&self.inner.views).len())
            .field("notification_mode", &self.notification_mode())
            .finish()
    }
}

/// A hint for a target's task: something may have changed.
#[derive(Debug)]
enum Hint {
    /// A keyspace event (`set`, `del`, `xadd`, ...) on `key`.
    Event { key: String, event: String },
    /// The connection was re-established (or the server's notification
    /// setup re-checked): re-read everything.
    Resync,
}

/// Routes RESP3 pushes to target tasks. Runs inside the connection's reader,
/// so it only looks up a map and sends on unbounded channels.
struct Router {
    /// `c:<channel>` or `p:<pattern>` -> (channel prefix, task).
    routes: RwLock<HashMap<String, (String, mpsc::UnboundedSender<Hint>)>>,
    disconnects: mpsc::UnboundedSender<()>,
}

impl Router {
    fn add(&self, route: String, channel_prefix: String, tx: mpsc::UnboundedSender<Hint>) {
        write(&self.routes).insert(route, (channel_prefix, tx));
    }

    fn dispatch(&self, push: PushInfo) {
        let (route, channel, event) = match (&push.kind, push.data.as_slice()) {
            (PushKind::Message, [channel, event, ..]) => {
                (format!("c:{}", text(channel)), text(channel), text(event))
            }
            (PushKind::PMessage, [pattern, channel, event, ..]) => {
                (format!("p:{}", text(pattern)), text(channel), text(event))
            }
            (PushKind::Disconnection, _) => {
                let _ = self.disconnects.send(());
                return;
            }
            _ => return,
        };
        let routes = read(&self.routes);
        if let Some((prefix, tx)) = routes.get(&route) {
            let key = channel.strip_prefix(prefix.as_str()).unwrap_or(&channel);
            let _ = tx.send(Hint::Event {
                key: key.to_owned(),
                event,
            });
        }
    }

    fn broadcast_resync(&self) {
        for (_, tx) in read(&self.routes).values() {
            let _ = tx.send(Hint::Resync);
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    }
}

#[derive(Debug)]
enum Subscription {
    Channel(String),
    Pattern(String),
}

impl Subscription {
    fn route(&self) -> String {
        match self {
            Subscription::Channel(c) => format!("c:{c}"),
            Subscription::Pattern(p) => format!("p:{p}"),
        }
    }
}

/// Checks the notification setup at start and after every reconnect, then
/// asks every target to re-read: whatever changed while the connection was
/// down was not notified.
struct Supervisor {
    conn: Conn,
    router: Arc<Router>,
    may_configure: bool,
    reconcile_interval: Duration,
    mode: watch::Sender<NotificationMode>,
    disconnects: mpsc::UnboundedReceiver<()>,
    shutdown: watch::Receiver<bool>,
}

impl Supervisor {
    async fn run(mut self) {
        let mut warned_for: Option<NotificationMode> = None;
        let mut eviction_warned = false;
        loop {
            let mut delay = RETRY_MIN;
            loop {
                match notifications::check(&mut self.conn, self.may_configure).await {
                    Check::Mode { mode, why } => {
                        if let Some(why) = why {
                            if warned_for != Some(mode) {
                                warn!(
                                    reconcile_interval = ?self.reconcile_interval,
                                    "keyspace notifications incomplete: {why}; \
                                     changes they would carry are seen at the next reconciliation"
                                );
                                warned_for = Some(mode);
                            }
                        } else if warned_for.take().is_some() {
                            info!("keyspace notifications complete again");
                        }
                        debug!(?mode, "notification mode");
                        self.mode.send_replace(mode);
                        if let Some(policy) =
                            notifications::risky_eviction_policy(&mut self.conn).await
                        {
                            if !std::mem::replace(&mut eviction_warned, true) {
                                error!(
                                    %policy,
                                    "maxmemory-policy {policy} lets Redis evict buffered requests under memory pressure; \
                                     use noeviction (a full Redis then refuses new entries with 503, and loses none)"
                                );
                            }
                        }
                        break;
                    }
                    Check::Unreachable(e) => {
                        trace!(error = %e, "notification check: redis unreachable");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = self.shutdown.changed() => return,
                        }
                        delay = (delay * 2).min(RETRY_MAX);
                    }
                }
            }
            self.router.broadcast_resync();
            tokio::select! {
                d = self.disconnects.recv() => {
                    if d.is_none() { return; }
                    debug!("redis connection lost; re-checking after reconnect");
                    self.router.broadcast_resync();
                }
                _ = self.shutdown.changed() => return,
            }
        }
    }
}

/// Keeps one target's view current.
struct TargetTask {
    conn: Conn,
    state: Arc<ViewState>,
    script: redis::Script,
    subscription: Subscription,
    subscribed: bool,
    /// Heartbeat keys known to exist (multi-instance) or the one key.
    keys: BTreeSet<String>,
    /// The target's buffer, whose length strict ordering needs.
    queue_key: String,
    queue_channel: String,
    queue_subscribed: bool,
    last_backlog_read: Instant,
    heartbeat_dirty: bool,
    queue_dirty: bool,
    queue_type_warned: bool,
    /// Heartbeat keys already reported as being of the wrong type.
    wrong_type_warned: BTreeSet<String>,
    /// The verdict of the last heartbeat read.
    last: Assessment,
    metrics: crate::metrics::ViewMetrics,
    reconcile_interval: Duration,
    read_timeout: Duration,
    hints: mpsc::UnboundedReceiver<Hint>,
    shutdown: watch::Receiver<bool>,
    ready: Option<oneshot::Sender<()>>,
}

/// What the task waits for between reads.
struct Schedule {
    deadline: Option<Instant>,
    next_reconcile: Instant,
    retry_at: Option<Instant>,
}

impl TargetTask {
    async fn run(mut self) {
        let mut schedule = Schedule {
            deadline: None,
            next_reconcile: Instant::now(),
            retry_at: None,
        };
        let mut retry_delay = RETRY_MIN;
        let mut discover = true;
        // What woke this round, for the detection-latency histogram.
        let mut hinted_at: Option<Instant> = None;
        let mut deadline_passed: Option<Instant> = None;
        loop {
            let before = self.last.health;
            // Whether this round reads the heartbeat, or only the queue's
            // length: only a heartbeat read counts as a reconciliation.
            let reads_heartbeat = self.heartbeat_dirty || discover;
            match self.refresh(discover).await {
                Ok(assessment) => {
                    if assessment.health != before {
                        self.metrics
                            .up
                            .set(f64::from(u8::from(assessment.health == Health::Up)));
                        if let Some(at) = hinted_at {
                            self.metrics
                                .after_notification
                                .record(at.elapsed().as_secs_f64());
                        } else if let Some(deadline) = deadline_passed {
                            self.metrics
                                .after_deadline
                                .record(deadline.elapsed().as_secs_f64());
                        }
                    }
                    retry_delay = RETRY_MIN;
                    schedule.retry_at = None;
                    schedule.deadline = assessment.deadline.map(Instant::from_std);
                    if reads_heartbeat {
                        schedule.next_reconcile = Instant::now() + self.reconcile_interval;
                    }
                }
                Err(e) => {
                    if self.state.set_reachable(false) {
                        warn!(error = %e, "cannot read heartbeat; holding last known health until redis answers");
                    }
                    // The deadline stays armed: reaching it triggers one more
                    // read attempt, never a verdict without Redis.
                    schedule.retry_at = Some(Instant::now() + retry_delay);
                    retry_delay = (retry_delay * 2).min(RETRY_MAX);
                }
            }
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(());
            }
            discover = false;

            self.heartbeat_dirty = false;
            self.queue_dirty = false;
            let backlog_poll = self
                .state
                .backlog()
                .is_some_and(|n| n > 0)
                .then_some(self.last_backlog_read + BACKLOG_POLL);
            let wake_at = schedule
                .retry_at
                .unwrap_or(schedule.next_reconcile)
                .min(schedule.deadline.unwrap_or(schedule.next_reconcile))
                .min(backlog_poll.unwrap_or(schedule.next_reconcile));
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => return,
                hint = self.hints.recv() => {
                    let Some(hint) = hint else { return };
                    hinted_at = Some(Instant::now());
                    deadline_passed = None;
                    discover |= self.absorb(hint);
                    while let Ok(hint) = self.hints.try_recv() {
                        discover |= self.absorb(hint);
                    }
                    // After a failure, a hint does not shorten the backoff:
                    // an event proves the connection works, but the reader
                    // of a dead one must not spin on a storm of hints.
                    if let Some(retry_at) = schedule.retry_at {
                        tokio::select! {
                            _ = sleep_until(retry_at) => {}
                            _ = self.shutdown.changed() => return,
                        }
                        self.heartbeat_dirty = true;
                        self.queue_dirty = true;
                    }
                }
                _ = sleep_until(wake_at) => {
                    let now = Instant::now();
                    hinted_at = None;
                    deadline_passed = schedule.deadline.filter(|d| now >= *d);
                    if backlog_poll.is_some_and(|at| now >= at) {
                        self.queue_dirty = true;
                    }
                    self.heartbeat_dirty |= schedule.deadline.is_some_and(|d| now >= d)
                        || schedule.retry_at.is_some_and(|r| now >= r)
                        || now >= schedule.next_reconcile;
                    self.queue_dirty |= schedule.retry_at.is_some_and(|r| now >= r);
                    if now >= schedule.next_reconcile {
                        discover = true;
                        self.queue_dirty = true;
                    }
                }
            }
        }
    }

    /// Takes in a hint; returns whether instance keys should be rediscovered.
    fn absorb(&mut self, hint: Hint) -> bool {
        match hint {
            Hint::Event { key, event } => {
                trace!(%key, %event, "keyspace event");
                if key == self.queue_key {
                    // An append cannot empty a queue we know to be non-empty;
                    // anything else (xdel, xtrim, del, ...) may change the
                    // answer that strict ordering depends on.
                    let known_busy = self.state.backlog().is_some_and(|n| n > 0);
                    self.queue_dirty |= !(event == "xadd" && known_busy);
                } else {
                    if matches!(self.subscription, Subscription::Pattern(_)) {
                        self.keys.insert(key);
                    }
                    self.heartbeat_dirty = true;
                }
                false
            }
            Hint::Resync => {
                self.heartbeat_dirty = true;
                self.queue_dirty = true;
                true
            }
        }
    }

    /// Reads the heartbeat and publishes the verdict.
    async fn refresh(&mut self, discover: bool) -> Result<Assessment, RedisError> {
        if !self.subscribed {
            self.subscribe().await?;
        }
        if self.queue_dirty {
            self.read_backlog().await?;
            self.last_backlog_read = Instant::now();
            if self.follow_queue_while_empty().await {
                // An append between the read and the subscription would
                // have gone unnotified: read once more, now that any later
                // append is notified.
                self.read_backlog().await?;
            }
        }
        if !self.heartbeat_dirty && !discover {
            return Ok(self.last);
        }
        let multi_instance = matches!(self.subscription, Subscription::Pattern(_));
        if multi_instance && discover {
            self.discover_instances().await?;
        }
        let mut assessment = self.read().await?;
        if multi_instance && assessment.health == Health::Down && !discover {
            // Never conclude "down" from the instances we happen to know:
            // one we have not heard of may be serving.
            if self.discover_instances().await? {
                assessment = self.read().await?;
            }
        }
        if self.state.set_reachable(true) {
            info!("heartbeat readable again");
        }
        if self.state.set_health(assessment.health) {
            debug!(health = %assessment.health, serving = assessment.serving, "target health changed");
        }
        self.last = assessment;
        Ok(assessment)
    }

    /// Reads the queue's length for strict ordering.
    async fn read_backlog(&mut self) -> Result<(), RedisError> {
        // A write of this process may land while the read is under way: its
        // length must not be overwritten by an older, smaller reading.
        let epoch = self.state.backlog_epoch();
        // The length, and the oldest entry's id (whose first part is the
        // millisecond it was added) for the age gauge.
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&self.queue_key);
        pipe.cmd("XRANGE")
            .arg(&self.queue_key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        let read = pipe.query_async::<(u64, Value)>(&mut self.conn);
        match timeout(self.read_timeout, read).await {
            Ok(Ok((len, oldest))) => {
                self.state.set_backlog_read(len, epoch);
                self.metrics.queue_depth.set(len as f64);
                let age = oldest_entry_ms(&oldest)
                    .map(|ms| crate::envelope::unix_ms().saturating_sub(ms) as f64 / 1000.0)
                    .unwrap_or(0.0);
                self.metrics.oldest_age.set(age);
                Ok(())
            }
            Ok(Err(e)) if notifications::is_transient(&e) => {
                Err(RedisError::new("queue length read", e))
            }
            Ok(Err(e)) => {
                // Not a stream (someone wrote something else there): the
                // buffer will report it when it writes; do not stop watching.
                if !std::mem::replace(&mut self.queue_type_warned, true) {
                    warn!(key = %self.queue_key, error = %e, "cannot read the queue length");
                }
                Ok(())
            }
            Err(_) => Err(RedisError::timeout("queue length read")),
        }
    }

    async fn subscribe(&mut self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let heartbeat = async {
            match &self.subscription {
                Subscription::Channel(c) => conn.subscribe(c).await,
                Subscription::Pattern(p) => conn.psubscribe(p).await,
            }
        };
        match timeout(self.read_timeout, heartbeat).await {
            Ok(Ok(())) => {
                self.subscribed = true;
                Ok(())
            }
            Ok(Err(e)) => Err(RedisError::new("heartbeat subscribe", e)),
            Err(_) => Err(RedisError::timeout("heartbeat subscribe")),
        }
    }

    /// Follows the queue's keyspace channel only while the queue is empty.
    ///
    /// Then one event (the first `xadd`, by any replica or program) is what
    /// strict ordering must see at once. While the queue is not empty, every
    /// append would be an event to parse for nothing — at buffering rates
    /// that cost a third of the throughput — so the channel is left and the
    /// length is polled every [`BACKLOG_POLL`] until it reaches zero.
    ///
    /// Returns whether it has just subscribed.
    async fn follow_queue_while_empty(&mut self) -> bool {
        let want = self.state.backlog().is_none_or(|n| n == 0);
        if want == self.queue_subscribed {
            return false;
        }
        let mut conn = self.conn.clone();
        let change = async {
            if want {
                conn.subscribe(&self.queue_channel).await
            } else {
                conn.unsubscribe(&self.queue_channel).await
            }
        };
        // On failure nothing changes: the next read tries again.
        if let Ok(Ok(())) = timeout(self.read_timeout, change).await {
            self.queue_subscribed = want;
            return want;
        }
        false
    }

    /// Reads every known key in one round trip.
    async fn read(&mut self) -> Result<Assessment, RedisError> {
        if self.keys.is_empty() {
            return Ok(probe::assess(&[], std::time::Instant::now()));
        }
        let mut invocation = self.script.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        let reply: Value =
            match timeout(self.read_timeout, invocation.invoke_async(&mut self.conn)).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(RedisError::new("heartbeat read", e)),
                Err(_) => return Err(RedisError::timeout("heartbeat read")),
            };
        let read_at = std::time::Instant::now();
        let readings = probe::parse_reply(&reply, self.keys.len());
        for (key, reading) in self.keys.iter().zip(&readings) {
            if let Some(kind) = &reading.wrong_type {
                if self.wrong_type_warned.insert(key.clone()) {
                    warn!(%key, %kind, "heartbeat key is a {kind}, not a string or hash: the target counts as down");
                }
            }
        }
        if matches!(self.subscription, Subscription::Pattern(_)) {
            // Forget instances whose key is gone; events re-add them.
            let gone: Vec<String> = self
                .keys
                .iter()
                .zip(&readings)
                .filter(|(_, r)| r.pttl_ms == -2)
                .map(|(k, _)| k.clone())
                .collect();
            for key in gone {
                self.keys.remove(&key);
            }
        }
        Ok(probe::assess(&readings, read_at))
    }

    /// Scans for instance keys; returns whether new ones were found.
    async fn discover_instances(&mut self) -> Result<bool, RedisError> {
        let pattern = format!("{}*", self.state.target().instance_key_prefix());
        let before = self.keys.len();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            // On a cluster, the node that owns the target's slot (every
            // instance key carries the target's hash tag).
            let scan = self
                .conn
                .query_on_node_of::<(u64, Vec<String>)>(&pattern, &cmd);
            let (next, found) = match timeout(self.read_timeout, scan).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Err(RedisError::new("instance discovery", e)),
                Err(_) => return Err(RedisError::timeout("instance discovery")),
            };
            self.keys.extend(found);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(self.keys.len() > before)
    }
}

/// The millisecond part of the first entry id in an `XRANGE` reply.
fn oldest_entry_ms(reply: &Value) -> Option<u64> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    let id = text(entry.first()?);
    id.split('-').next()?.parse().ok()
}
