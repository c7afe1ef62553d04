//! The drain loop of one replayer.

use std::future::poll_fn;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt};
use http::header::HeaderValue;
use http::{HeaderName, Request, Response};
use http_body::Body;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::policy::{Attempt, ReplayPolicy, Verdict};
use super::store::{RawEntry, Store};
use super::{ReplayConfig, ReplayEvent, ReplayEventKind, Stats};
use crate::body::{BoxError, RequestBody};
use crate::envelope::{unix_ms, Envelope};
use crate::heartbeat::{Health, TargetView};
use crate::layer::DeliveryOrder;
use crate::metrics::ReplayMetrics;
use crate::sync::lock;

/// Tells the target this request is a replay from the buffer.
pub const REPLAY_HEADER: HeaderName = HeaderName::from_static("x-heartbeat-replay");
/// Which attempt this is, counting the original one if it was tried.
pub const ATTEMPT_HEADER: HeaderName = HeaderName::from_static("x-heartbeat-attempt");

/// Response bodies are read (so connections can be reused) up to this much.
const DRAIN_LIMIT: usize = 64 * 1024;

pub(crate) struct Worker<S, B> {
    store: Store,
    view: TargetView,
    /// Cloned for each call; behind a lock only so the worker can be shared
    /// by concurrent deliveries whatever `S` is.
    service: Mutex<S>,
    config: ReplayConfig,
    policy: Arc<dyn ReplayPolicy>,
    consumer: String,
    events: super::Events,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
    metrics: ReplayMetrics,
    pacer: Mutex<Pacer>,
    /// Until when every delivery waits (the target asked for a pause).
    paused_until: Mutex<Option<Instant>>,
    /// Strict order: the lease is ours; cleared when a renewal fails.
    leader: AtomicBool,
    last_renewal: Mutex<Instant>,
    /// Settled entries handed to the acknowledger and not yet acknowledged.
    outstanding: AtomicUsize,
    /// An acknowledgement failed: those entries are pending again.
    ack_failed: AtomicBool,
    _body: PhantomData<fn(B)>,
}

impl<S, B, RB> Worker<S, B>
where
    S: tower_service::Service<Request<RequestBody<B>>, Response = Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
    RB: Body + Send + 'static,
    RB::Data: Send,
{
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Store,
        view: TargetView,
        service: S,
        config: ReplayConfig,
        policy: Arc<dyn ReplayPolicy>,
        consumer: String,
        events: super::Events,
        shutdown: watch::Receiver<bool>,
        stats: Arc<Stats>,
    ) -> Self {
        let pacer = Pacer::new(config.max_per_second, config.slow_start);
        let metrics = ReplayMetrics::new(view.target().name());
        Self {
            store,
            view,
            service: Mutex::new(service),
            config,
            policy,
            consumer,
            events,
            shutdown,
            stats,
            metrics,
            pacer: Mutex::new(pacer),
            paused_until: Mutex::new(None),
            leader: AtomicBool::new(false),
            last_renewal: Mutex::new(Instant::now()),
            outstanding: AtomicUsize::new(0),
            ack_failed: AtomicBool::new(false),
            _body: PhantomData,
        }
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn strict(&self) -> bool {
        self.config.order == DeliveryOrder::Strict
    }

    /// Sleeps `d`, or less if shutdown comes; returns false on shutdown.
    async fn nap(&self, d: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.stopping(),
            _ = shutdown.wait_for(|s| *s) => false,
        }
    }

    pub(crate) async fn run(self) {
        let (acks, settled) = mpsc::unbounded_channel();
        // Deliveries never wait for their acknowledgements: a second loop
        // acknowledges whatever has been delivered meanwhile, in one
        // round trip.
        tokio::join!(self.drain_loop(acks), self.ack_loop(settled));
        if self.strict() && self.leader.load(Ordering::Acquire) {
            let _ = self.store.release(&self.consumer).await;
        }
        // Leave the group if nothing stays claimed in our name; otherwise the
        // next replayer takes those entries over first.
        match self.store.forget_if_idle(&self.consumer).await {
            Ok(true) => debug!("left the consumer group"),
            Ok(false) => debug!("entries stay claimed for the next replayer"),
            Err(e) => debug!(error = %e, "could not leave the consumer group"),
        }
        debug!("replayer stopped");
    }

    async fn drain_loop(&self, acks: mpsc::UnboundedSender<Settled>) {
        let mut retry = RetryDelay::new(Duration::from_millis(50), Duration::from_secs(2));
        while let Err(e) = self.store.ensure_group().await {
            debug!(error = %e, "cannot create the consumer group yet");
            if !self.nap(retry.next()).await {
                return;
            }
        }
        retry.reset();
        let mut last_reclaim: Option<Instant> = None;
        let mut health = self.view.changes();
        let mut generation = self.view.up_generation();
        // Whether entries may wait in this consumer's own pending list
        // (from an earlier life, a takeover, an interrupted batch, a failed
        // acknowledgement): then it is read before new entries.
        let mut pending = true;
        // The next batch, read while the previous one was delivered.
        let mut ahead: Option<Vec<Item>> = None;

        while !self.stopping() {
            // Pause while the target is not known to be up.
            if *health.borrow_and_update() != Health::Up {
                debug!("target not up: drain paused");
                let mut shutdown = self.shutdown.clone();
                tokio::select! {
                    _ = health.wait_for(|h| *h == Health::Up) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
                continue;
            }
            // A new life of the target (even a blip the loop did not see):
            // ramp up again.
            let now_generation = self.view.up_generation();
            if now_generation != generation {
                generation = now_generation;
                lock(&self.pacer).restart();
            }

            if self.strict() {
                match self.hold_lease().await {
                    Lease::Held { taken_over } => pending |= taken_over,
                    Lease::Elsewhere => {
                        // Another replica drains; check again within a
                        // lease period so a dead one is replaced in time.
                        ahead = None;
                        if !self.nap(self.config.lease_ttl / 3).await {
                            break;
                        }
                        continue;
                    }
                    Lease::Unknown => {
                        if !self.nap(retry.next()).await {
                            break;
                        }
                        continue;
                    }
                }
            } else if last_reclaim
                .is_none_or(|at| at.elapsed() >= self.config.visibility_timeout / 2)
            {
                last_reclaim = Some(Instant::now());
                match self
                    .store
                    .claim(&self.consumer, self.config.visibility_timeout)
                    .await
                {
                    Ok(n) if n > 0 => {
                        info!(
                            claimed = n,
                            "took over entries idle past the visibility timeout"
                        );
                        pending = true;
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "reclaim failed"),
                }
                self.forget_stale_consumers().await;
            }
            pending |= self.ack_failed.swap(false, Ordering::AcqRel);

            let batch = match ahead.take() {
                Some(batch) => Ok(batch),
                None if pending => {
                    // Entries delivered but not yet acknowledged are pending
                    // too: let the acknowledgements land before reading.
                    self.acks_settled().await;
                    match self.fetch(false).await {
                        Ok(batch) if batch.is_empty() => {
                            pending = false;
                            self.fetch(true).await
                        }
                        other => other,
                    }
                }
                None => self.fetch(true).await,
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    debug!(error = %e, "cannot read the buffer");
                    // Redis may have handed entries over before the reply
                    // was lost: read our pending list first next time.
                    pending = true;
                    if !self.nap(retry.next()).await {
                        break;
                    }
                    continue;
                }
            };
            retry.reset();
            if batch.is_empty() {
                self.idle(&mut health).await;
                continue;
            }

            // Deliver this batch while reading the next (new entries only:
            // the pending list is never read while acknowledgements fly).
            let prefetch = async {
                if pending {
                    None
                } else {
                    Some(self.fetch(true).await)
                }
            };
            let (completed, next) = tokio::join!(self.drain_batch(batch, &acks), prefetch);
            if !completed {
                // Stopped mid-batch (shutdown, lease lost): what was not
                // delivered stays claimed in our name.
                pending = true;
            }
            match next {
                Some(Ok(next)) if !next.is_empty() => ahead = Some(next),
                Some(Err(e)) => {
                    debug!(error = %e, "cannot read ahead");
                    pending = true;
                }
                _ => {}
            }
        }
        // Whatever was read ahead stays pending for the next replayer. Let
        // the acknowledgements of what was delivered land, within the grace.
        let _ = tokio::time::timeout(self.config.grace, self.acks_settled()).await;
    }

    /// Strict order: takes or renews the drain lease when due.
    async fn hold_lease(&self) -> Lease {
        let due = !self.leader.load(Ordering::Acquire)
            || lock(&self.last_renewal).elapsed() >= self.config.lease_ttl / 3;
        if !due {
            return Lease::Held { taken_over: false };
        }
        match self
            .store
            .lease(&self.consumer, self.config.lease_ttl)
            .await
        {
            Ok(true) => {
                *lock(&self.last_renewal) = Instant::now();
                if self.leader.swap(true, Ordering::AcqRel) {
                    return Lease::Held { taken_over: false };
                }
                // A new leader takes over whatever the previous one had
                // claimed: those entries are the oldest.
                match self.store.claim(&self.consumer, Duration::ZERO).await {
                    Ok(n) if n > 0 => {
                        info!(claimed = n, "drain lease taken; took over pending entries")
                    }
                    Ok(_) => debug!("drain lease taken"),
                    Err(e) => {
                        warn!(error = %e, "cannot claim pending entries");
                        self.leader.store(false, Ordering::Release);
                        return Lease::Unknown;
                    }
                }
                self.forget_stale_consumers().await;
                Lease::Held { taken_over: true }
            }
            Ok(false) => {
                self.leader.store(false, Ordering::Release);
                Lease::Elsewhere
            }
            Err(e) => {
                debug!(error = %e, "lease unavailable");
                self.leader.store(false, Ordering::Release);
                Lease::Unknown
            }
        }
    }

    /// One batch: this consumer's pending entries (`new == false`) or new
    /// ones, each with how many times it was handed to a consumer before
    /// (crashes, takeovers: attempts count across processes) and whether
    /// its processed-marker is already set.
    async fn fetch(&self, new: bool) -> Result<Vec<Item>, crate::RedisError> {
        let entries = self
            .store
            .read(&self.consumer, self.config.batch, new)
            .await?;
        let priors: Vec<u32> = match (new, entries.first(), entries.last()) {
            (false, Some(first), Some(last)) => {
                let counts = self
                    .store
                    .delivery_counts(
                        &self.consumer,
                        &first.entry_id,
                        &last.entry_id,
                        entries.len(),
                    )
                    .await?;
                entries
                    .iter()
                    .map(|e| {
                        let handed = counts.get(&e.entry_id).copied().unwrap_or(1);
                        u32::try_from(handed.saturating_sub(1)).unwrap_or(u32::MAX)
                    })
                    .collect()
            }
            _ => vec![0; entries.len()],
        };
        // Entries delivered before (marker set) but not removed, or the same
        // request stored twice: skipped, not sent again.
        let ids: Vec<&str> = entries
            .iter()
            .map(|e| e.request_id().unwrap_or(""))
            .collect();
        let done = self.store.done(&ids).await?;
        Ok(entries
            .into_iter()
            .zip(priors)
            .zip(done)
            .map(|((entry, prior), done)| Item { entry, prior, done })
            .collect())
    }

    /// Nothing to do: wait for the buffer to grow, the heartbeat to change,
    /// the safety poll or shutdown.
    async fn idle(&self, health: &mut watch::Receiver<Health>) {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            _ = self.view.backlog_grew() => {}
            _ = health.changed() => {}
            _ = tokio::time::sleep(self.config.poll_interval) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }

    /// Delivers a batch, handing each settled entry to the acknowledger.
    /// Returns whether the whole batch was dealt with.
    async fn drain_batch(&self, batch: Vec<Item>, acks: &mpsc::UnboundedSender<Settled>) -> bool {
        let ack = |settled: Settled| {
            self.outstanding.fetch_add(1, Ordering::AcqRel);
            if acks.send(settled).is_err() {
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
            }
        };
        let mut todo = Vec::with_capacity(batch.len());
        for item in batch {
            if item.done {
                ack(Settled {
                    request_id: item.entry.request_id().unwrap_or("").to_owned(),
                    entry_id: item.entry.entry_id,
                    delivered: None,
                    skipped: true,
                });
            } else {
                todo.push(item);
            }
        }
        if self.strict() {
            // One at a time, in order.
            for item in todo {
                match self.deliver_in_span(item.entry, item.prior).await {
                    Some(settled) => ack(settled),
                    None if self.stopping() || !self.still_leader() => return false,
                    None => {}
                }
            }
            true
        } else {
            let limit = self.config.max_in_flight.max(1);
            stream::iter(todo)
                .for_each_concurrent(limit, |item| async move {
                    if let Some(settled) = self.deliver_in_span(item.entry, item.prior).await {
                        ack(settled);
                    }
                })
                .await;
            !self.stopping()
        }
    }

    /// Acknowledges settled entries as they come, in batches of whatever
    /// arrived meanwhile.
    async fn ack_loop(&self, mut settled: mpsc::UnboundedReceiver<Settled>) {
        while let Some(first) = settled.recv().await {
            let mut batch = vec![first];
            while batch.len() < 512 {
                match settled.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            let n = batch.len();
            self.settle(batch).await;
            self.outstanding.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// Waits until every delivered entry handed to the acknowledger has been
    /// dealt with.
    async fn acks_settled(&self) {
        while self.outstanding.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Acknowledges entries (setting the markers of delivered ones), then
    /// tells what happened: an entry counts as delivered once acknowledged.
    async fn settle(&self, settled: Vec<Settled>) {
        if settled.is_empty() {
            return;
        }
        let acks: Vec<(&str, Option<&str>)> = settled
            .iter()
            .map(|s| {
                let marker = s.delivered.is_some().then_some(s.request_id.as_str());
                (s.entry_id.as_str(), marker)
            })
            .collect();
        if let Err(e) = self.store.ack(&acks, self.config.marker_ttl).await {
            // They stay pending and are delivered again (same key): at least
            // once.
            warn!(error = %e, entries = acks.len(), "cannot acknowledge delivered entries; they will be delivered again");
            self.ack_failed.store(true, Ordering::Release);
            return;
        }
        for s in settled {
            let kind = match s.delivered {
                Some((status, attempt)) => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    self.metrics.replayed.increment(1);
                    ReplayEventKind::Delivered { status, attempt }
                }
                None if s.skipped => {
                    self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                    ReplayEventKind::Skipped
                }
                None => continue,
            };
            self.events.send(|| ReplayEvent {
                id: s.request_id,
                entry_id: s.entry_id,
                kind,
            });
        }
    }

    /// Removes consumers of dead or stopped replayers that hold nothing
    /// (each replayer start adds one), once they have been quiet for ten
    /// lease or visibility periods.
    async fn forget_stale_consumers(&self) {
        let quiet = self.config.lease_ttl.max(self.config.visibility_timeout) * 10;
        match self
            .store
            .forget_idle_consumers(&self.consumer, quiet)
            .await
        {
            Ok(0) => {}
            Ok(n) => debug!(removed = n, "removed idle consumers from the group"),
            Err(e) => debug!(error = %e, "could not list consumers"),
        }
    }

    fn still_leader(&self) -> bool {
        !self.strict() || self.leader.load(Ordering::Acquire)
    }

    /// Strict order: renews the lease between deliveries when due.
    async fn renew_if_due(&self) {
        if !self.strict() {
            return;
        }
        let due = lock(&self.last_renewal).elapsed() >= self.config.lease_ttl / 3;
        if !due {
            return;
        }
        match self
            .store
            .lease(&self.consumer, self.config.lease_ttl)
            .await
        {
            Ok(true) => *lock(&self.last_renewal) = Instant::now(),
            Ok(false) => {
                warn!("drain lease lost to another replica: stopping this batch");
                self.leader.store(false, Ordering::Release);
            }
            Err(e) => {
                // Keep going while the lease may still be ours; give up when
                // it must have expired.
                if lock(&self.last_renewal).elapsed() >= self.config.lease_ttl {
                    warn!(error = %e, "drain lease could not be renewed in time: stopping this batch");
                    self.leader.store(false, Ordering::Release);
                }
            }
        }
    }

    /// Waits until a delivery may go: target up, no pause, pacing. Returns
    /// false when it must not (shutdown, lease lost).
    async fn wait_turn(&self) -> bool {
        loop {
            if self.stopping() || !self.still_leader() {
                return false;
            }
            if self.view.health() != Health::Up {
                let mut shutdown = self.shutdown.clone();
                tokio::select! {
                    _ = self.view.wait_for(Health::Up) => {}
                    _ = shutdown.wait_for(|s| *s) => return false,
                }
                lock(&self.pacer).restart();
                continue;
            }
            let paused = *lock(&self.paused_until);
            if let Some(until) = paused.filter(|u| *u > Instant::now()) {
                if !self.nap(until - Instant::now()).await {
                    return false;
                }
                continue;
            }
            let slot = lock(&self.pacer).next_slot();
            if let Some(at) = slot.filter(|at| *at > Instant::now()) {
                if !self.nap(at - Instant::now()).await {
                    return false;
                }
            }
            return true;
        }
    }

    /// [`deliver_entry`](Self::deliver_entry) in a span naming the entry.
    async fn deliver_in_span(&self, entry: RawEntry, prior: u32) -> Option<Settled> {
        let span = tracing::debug_span!(
            "replay_entry",
            id = entry.request_id().unwrap_or(""),
            entry = %entry.entry_id,
        );
        tracing::Instrument::instrument(self.deliver_entry(entry, prior), span).await
    }

    /// Delivers one entry until answered, dead-lettered, or stopped, and
    /// returns what to acknowledge. `prior` counts the times the entry was
    /// handed to a replayer before this one (attempts survive crashes).
    async fn deliver_entry(&self, entry: RawEntry, prior: u32) -> Option<Settled> {
        let Some(fields) = &entry.fields else {
            // Deleted while pending (by hand, or a purge): only clear it.
            return Some(Settled {
                entry_id: entry.entry_id,
                request_id: String::new(),
                delivered: None,
                skipped: false,
            });
        };
        let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > self.config.max_entry_bytes {
            let reason = format!(
                "entry of {size} bytes exceeds max_entry_bytes ({})",
                self.config.max_entry_bytes
            );
            self.dead_letter(&entry, entry.request_id().unwrap_or(""), reason)
                .await;
            return None;
        }
        let envelope =
            match Envelope::from_fields(fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))) {
                Ok(envelope) => envelope,
                Err(malformed) => {
                    self.dead_letter(&entry, "", malformed.to_string()).await;
                    return None;
                }
            };
        if let Some(max_age) = self.config.max_age {
            let age = Duration::from_millis(unix_ms().saturating_sub(envelope.enqueued_at_ms));
            if age > max_age {
                let reason = format!(
                    "expired: waited {}s, max_age is {}s",
                    age.as_secs(),
                    max_age.as_secs()
                );
                self.dead_letter(&entry, &envelope.id, reason).await;
                return None;
            }
        }

        let mut delay = RetryDelay::new(self.config.backoff_base, self.config.backoff_max);
        let mut attempt: u32 = prior;
        let mut held_since = Instant::now();
        loop {
            self.renew_if_due().await;
            if !self.strict() && held_since.elapsed() >= self.config.visibility_timeout / 3 {
                // Still ours: a long series of retries must not look
                // abandoned to the other replicas.
                if let Err(e) = self.store.touch(&self.consumer, &entry.entry_id).await {
                    debug!(error = %e, "could not refresh the claim");
                }
                held_since = Instant::now();
            }
            if !self.wait_turn().await {
                return None;
            }
            attempt += 1;
            let request = replay_request(&envelope, attempt);
            let mut service = lock(&self.service).clone();
            // The service is polled ready before every call.
            let ready: Result<(), BoxError> = poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into);
            let verdict = match ready {
                Err(e) => self.policy.judge(Attempt::Failed(&*e)),
                Ok(()) => match service.call(request).await.map_err(Into::<BoxError>::into) {
                    Ok(response) => {
                        let (parts, body) = response.into_parts();
                        drain(body).await;
                        let verdict = self.policy.judge(Attempt::Answered(&parts));
                        if verdict == Verdict::Acknowledge {
                            return Some(Settled {
                                entry_id: entry.entry_id.clone(),
                                request_id: envelope.id.clone(),
                                delivered: Some((parts.status, attempt)),
                                skipped: false,
                            });
                        }
                        verdict
                    }
                    Err(e) => self.policy.judge(Attempt::Failed(&*e)),
                },
            };
            match verdict {
                Verdict::Acknowledge => {
                    // A policy may acknowledge a failed call (for instance
                    // a target known to have received it).
                    return Some(Settled {
                        entry_id: entry.entry_id.clone(),
                        request_id: envelope.id.clone(),
                        delivered: Some((http::StatusCode::OK, attempt)),
                        skipped: false,
                    });
                }
                Verdict::DeadLetter { reason } => {
                    self.dead_letter(&entry, &envelope.id, reason).await;
                    return None;
                }
                Verdict::Retry {
                    after,
                    pause,
                    reason,
                } => {
                    if attempt >= self.config.max_attempts {
                        let reason = format!("{reason}; gave up after {attempt} attempts");
                        self.dead_letter(&entry, &envelope.id, reason).await;
                        return None;
                    }
                    let wait = after.unwrap_or_else(|| delay.next());
                    if pause {
                        *lock(&self.paused_until) = Some(Instant::now() + wait);
                    }
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    self.metrics.retries.increment(1);
                    debug!(id = %envelope.id, attempt, ?wait, %reason, "delivery failed; retrying");
                    self.emit(
                        &entry,
                        &envelope.id,
                        ReplayEventKind::Retrying {
                            attempt,
                            after: wait,
                            reason,
                        },
                    );
                    if !self.nap(wait).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn dead_letter(&self, entry: &RawEntry, id: &str, reason: String) {
        // Retried here, in place: skipping it would let the next entry
        // overtake it, and nothing would read it again.
        let mut delay = RetryDelay::new(self.config.backoff_base, self.config.backoff_max);
        loop {
            match self.store.dead_letter(entry, &reason, unix_ms()).await {
                Ok(()) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    self.metrics.dead_lettered.increment(1);
                    warn!(id = %id, entry = %entry.entry_id, %reason, "dead-lettered");
                    self.emit(entry, id, ReplayEventKind::DeadLettered { reason });
                    return;
                }
                Err(e) => {
                    let cause = std::error::Error::source(&e).map(|s| s.to_string());
                    warn!(id = %id, error = %e, cause = ?cause, "cannot dead-letter; will retry");
                }
            }
            self.renew_if_due().await;
            if !self.still_leader() || !self.nap(delay.next()).await {
                // Stays pending for whoever drains next.
                return;
            }
        }
    }

    fn emit(&self, entry: &RawEntry, id: &str, kind: ReplayEventKind) {
        self.events.send(|| ReplayEvent {
            id: id.to_owned(),
            entry_id: entry.entry_id.clone(),
            kind,
        });
    }
}

/// What the lease said.
enum Lease {
    Held { taken_over: bool },
    Elsewhere,
    Unknown,
}

/// An entry read from the buffer, with what the replayer needs to know.
struct Item {
    entry: RawEntry,
    /// Times it was handed to a consumer before this read.
    prior: u32,
    /// Its processed-marker is set: delivered before.
    done: bool,
}

/// An entry done with, to acknowledge.
struct Settled {
    entry_id: String,
    request_id: String,
    /// Delivered: the target's status and the attempt. `None`: removed
    /// without a delivery (already processed, or deleted while pending).
    delivered: Option<(http::StatusCode, u32)>,
    /// Removed because its processed-marker was already set.
    skipped: bool,
}

/// The stored request, as sent again.
fn replay_request<B>(envelope: &Envelope, attempt: u32) -> Request<RequestBody<B>> {
    let mut request = envelope.clone().into_request().map(RequestBody::full);
    let headers = request.headers_mut();
    headers.insert(REPLAY_HEADER, HeaderValue::from_static("1"));
    headers.insert(
        ATTEMPT_HEADER,
        HeaderValue::from(envelope.attempts + attempt),
    );
    request
}

/// Reads a response body so its connection can be reused; gives up past
/// [`DRAIN_LIMIT`].
async fn drain<RB: Body>(body: RB) {
    let mut body = std::pin::pin!(body);
    let mut read = 0usize;
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    read += bytes::Buf::remaining(data);
                }
                if read > DRAIN_LIMIT {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// Exponential backoff with jitter.
struct RetryDelay {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl RetryDelay {
    fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            current: base,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        // Full jitter on the upper half: spreads retries of many entries
        // and replicas without ever waiting less than half the step.
        let jitter = jitter_fraction();
        d / 2 + d.mul_f64(jitter / 2.0)
    }

    fn reset(&mut self) {
        self.current = self.base;
    }
}

fn jitter_fraction() -> f64 {
    // Derived from a fresh id: no randomness dependency, varies per call.
    let id = crate::id::new_id();
    let tail = u64::from_str_radix(&id.replace('-', "")[20..32], 16).unwrap_or(0);
    (tail % 10_000) as f64 / 10_000.0
}

/// Rate limit with a slow start after each resume.
struct Pacer {
    max_per_second: Option<f64>,
    slow_start: Duration,
    started: Instant,
    next: Instant,
}

impl Pacer {
    fn new(max_per_second: Option<f64>, slow_start: Duration) -> Self {
        Self {
            max_per_second,
            slow_start,
            started: Instant::now(),
            next: Instant::now(),
        }
    }

    fn restart(&mut self) {
        self.started = Instant::now();
        self.next = self.started;
    }

    fn rate(&self) -> Option<f64> {
        let elapsed = self.started.elapsed();
        let ramp =
            (elapsed < self.slow_start).then(|| 20.0 * 2f64.powf(elapsed.as_secs_f64() / 0.25));
        match (ramp, self.max_per_second) {
            (Some(r), Some(m)) => Some(r.min(m)),
            (r, m) => r.or(m),
        }
    }

    /// When the next delivery may go (`None`: now, no limit).
    fn next_slot(&mut self) -> Option<Instant> {
        let rate = self.rate()?.max(0.001);
        let now = Instant::now();
        let at = self.next.max(now);
        self.next = at + Duration::from_secs_f64(1.0 / rate);
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut d = RetryDelay::new(Duration::from_millis(100), Duration::from_millis(400));
        let a = d.next();
        assert!(
            a >= Duration::from_millis(50) && a <= Duration::from_millis(100),
            "{a:?}"
        );
        let b = d.next();
        assert!(
            b >= Duration::from_millis(100) && b <= Duration::from_millis(200),
            "{b:?}"
        );
        d.next();
        let capped = d.next();
        assert!(capped <= Duration::from_millis(400), "{capped:?}");
    }

    #[test]
    fn pacer_ramps_then_lets_go() {
        let mut p = Pacer::new(None, Duration::from_millis(0));
        assert_eq!(p.next_slot(), None);
        let mut p = Pacer::new(Some(10.0), Duration::ZERO);
        let a = p.next_slot().unwrap();
        let b = p.next_slot().unwrap();
        assert!(b - a >= Duration::from_millis(99));
        let mut p = Pacer::new(None, Duration::from_secs(10));
        let a = p.next_slot().unwrap();
        let b = p.next_slot().unwrap();
        assert!(b - a >= Duration::from_millis(40), "starts near 20/s");
    }
}
