//! [`HeartbeatBuffer`]: the per-call decision.

use std::fmt;
use std::mem;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH};
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;
use tracing::{debug, info, trace, warn};

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::breaker::Admit;
use crate::envelope::{Encoded, IDEMPOTENCY_KEY};
use crate::future::{ResponseFuture, StoreFuture, Then};
use crate::heartbeat::Health;
use crate::layer::{DeliveryOrder, Shared};
use crate::outcome::{Answer, UnavailableReason};
use crate::policy::{BufferOverride, WhenDown, WhenRedisDown, BUFFER_OVERRIDE_HEADER};
use crate::queue::EnqueueError;

/// The service built by [`HeartbeatBufferLayer`](crate::HeartbeatBufferLayer).
///
/// The wrapped service `S` receives [`RequestBody<B>`]: the caller's body
/// untouched, or held in memory when the request may have to be stored. The
/// caller receives [`ResponseBody<RB>`]: the target's body untouched, or a
/// short one the layer wrote. Errors are the wrapped service's own: the
/// layer's outcomes are responses (`202`, `503`, `413`), as in tower-http.
pub struct HeartbeatBuffer<S, F = S> {
    inner: S,
    fallback: Option<F>,
    shared: Arc<Shared>,
}

impl<S, F> HeartbeatBuffer<S, F> {
    pub(crate) fn new(inner: S, fallback: Option<F>, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            fallback,
            shared,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, F: Clone> Clone for HeartbeatBuffer<S, F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            fallback: self.fallback.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, F> fmt::Debug for HeartbeatBuffer<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeartbeatBuffer")
            .field("inner", &self.inner)
            .field("fallback", &self.fallback.is_some())
            .field("shared", &self.shared)
            .finish()
    }
}

/// Where a call goes, decided from memory only.
enum Decision {
    /// The target is trusted (or this call probes it).
    Forward,
    /// The target is down or suspect.
    Down { retry_after: Option<Duration> },
    /// Strict order: older requests wait in the buffer, join them.
    JoinBacklog,
    /// Nothing may go anywhere.
    Refuse(UnavailableReason),
}

impl<S, F, B, RB> Service<Request<B>> for HeartbeatBuffer<S, F>
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>> + Clone,
    F: Service<Request<RequestBody<B>>, Response = Response<RB>, Error = S::Error> + Clone,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, F, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let span = tracing::trace_span!(
            "heartbeat_buffer",
            target = %self.shared.view.target(),
            method = %request.method(),
            id = tracing::field::Empty,
        );
        let future = {
            let _entered = span.enter();
            self.decide(request)
        };
        future.in_span(span)
    }
}

impl<S, F> HeartbeatBuffer<S, F> {
    /// The per-call decision, from memory only.
    fn decide<B, RB>(&mut self, request: Request<B>) -> ResponseFuture<S, F, B>
    where
        S: Service<Request<RequestBody<B>>, Response = Response<RB>> + Clone,
        F: Service<Request<RequestBody<B>>, Response = Response<RB>, Error = S::Error> + Clone,
        B: Body + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let shared = Arc::clone(&self.shared);
        let (mut parts, body) = request.into_parts();
        let bufferable = classify(&shared, &mut parts);
        let id = if bufferable {
            match identify(&mut parts) {
                Some(id) => {
                    tracing::Span::current().record("id", id.as_str());
                    Some(id)
                }
                None => {
                    return refuse(
                        &shared,
                        Answer::refused(UnavailableReason::InvalidIdempotencyKey, None),
                    )
                }
            }
        } else {
            None
        };
        let limit = shared.config.max_body_bytes;
        let fits = declared_len(&parts).is_none_or(|len| len <= limit as u64);
        let on_down = shared.config.on_down.when_down(&parts);
        let generation = shared.view.up_generation();

        match decide(&shared, &parts, bufferable) {
            Decision::Forward => {
                shared.metrics.forwarded.increment(1);
                // Call the instance that was polled ready; the clone left
                // behind is polled ready before the next call.
                let clone = self.inner.clone();
                let inner = mem::replace(&mut self.inner, clone);
                // Hold the body only when a failed forward could divert it.
                let divertable = bufferable && fits && on_down != WhenDown::FailFast;
                let fallback = (on_down == WhenDown::Fallback)
                    .then(|| self.fallback.clone())
                    .flatten();
                let ctx = Ctx {
                    shared,
                    id,
                    on_down,
                    generation,
                    fallback,
                };
                if !divertable {
                    let request = Request::from_parts(parts, RequestBody::streaming(body));
                    ResponseFuture::forwarding(ctx, inner.call_into(request), None)
                } else if body.is_end_stream() {
                    let held = (parts.clone(), Bytes::new());
                    let request = Request::from_parts(parts, RequestBody::full(Bytes::new()));
                    ResponseFuture::forwarding(ctx, inner.call_into(request), Some(held))
                } else {
                    ResponseFuture::collecting(ctx, parts, body, limit, Then::Forward(inner))
                }
            }
            Decision::Down { retry_after } => match on_down {
                WhenDown::Fallback => match self.fallback.clone() {
                    Some(fallback) => {
                        trace!(target = %shared.view.target(), "target down: to the fallback");
                        let request = Request::from_parts(parts, RequestBody::streaming(body));
                        ResponseFuture::fallback(fallback, request)
                    }
                    None => refuse(
                        &shared,
                        Answer::Refused {
                            reason: UnavailableReason::NoFallback,
                            id,
                            retry_after,
                        },
                    ),
                },
                WhenDown::Buffer if bufferable => {
                    store_path(shared, id.unwrap_or_default(), parts, body, fits)
                }
                _ => refuse(
                    &shared,
                    Answer::Refused {
                        reason: UnavailableReason::TargetDown,
                        id,
                        retry_after,
                    },
                ),
            },
            Decision::JoinBacklog => store_path(shared, id.unwrap_or_default(), parts, body, fits),
            Decision::Refuse(reason) => refuse(
                &shared,
                Answer::Refused {
                    reason,
                    id,
                    retry_after: None,
                },
            ),
        }
    }
}

/// Answers by itself, counting the refusal.
fn refuse<S, F, B>(shared: &Shared, answer: Answer) -> ResponseFuture<S, F, B>
where
    S: Service<Request<RequestBody<B>>>,
    F: Service<Request<RequestBody<B>>>,
{
    if let Answer::Refused { reason, .. } = &answer {
        shared.metrics.refused(reason.code());
    }
    ResponseFuture::done(answer)
}

/// What a response future needs to finish a call that was forwarded.
pub(crate) struct Ctx<F> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: Option<String>,
    pub(crate) on_down: WhenDown,
    /// The target's up-generation when the call was decided.
    pub(crate) generation: u64,
    pub(crate) fallback: Option<F>,
}

trait CallInto<R>: Service<R> {
    fn call_into(self, request: R) -> Self::Future;
}

impl<S: Service<R>, R> CallInto<R> for S {
    fn call_into(mut self, request: R) -> Self::Future {
        self.call(request)
    }
}

/// Reads the per-request override, then the policy.
fn classify(shared: &Shared, parts: &mut Parts) -> bool {
    let header = parts.headers.remove(BUFFER_OVERRIDE_HEADER);
    let explicit = parts
        .extensions
        .get::<BufferOverride>()
        .copied()
        .or_else(|| match header.as_ref().map(HeaderValue::as_bytes) {
            Some(b"allow") => Some(BufferOverride::Allow),
            Some(b"never") => Some(BufferOverride::Never),
            _ => None,
        });
    match explicit {
        Some(BufferOverride::Allow) => true,
        Some(BufferOverride::Never) => false,
        None => shared.config.bufferable.may_buffer(parts),
    }
}

/// The caller's idempotency key, or a new time-sortable one (UUIDv7) set
/// before the first attempt, so that every attempt carries the same key.
/// `None` when the caller's key cannot be stored unchanged.
fn identify(parts: &mut Parts) -> Option<String> {
    if let Some(value) = parts.headers.get(IDEMPOTENCY_KEY) {
        return value
            .to_str()
            .ok()
            .filter(|id| !id.is_empty() && id.trim_matches([' ', '\t']).len() == id.len())
            .map(str::to_owned);
    }
    let id = crate::id::new_id();
    parts
        .headers
        .insert(IDEMPOTENCY_KEY, HeaderValue::from_str(&id).ok()?);
    Some(id)
}

fn declared_len(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The decision, from memory only: no Redis round trip.
fn decide(shared: &Shared, parts: &Parts, bufferable: bool) -> Decision {
    let view = &shared.view;
    if !view.redis_reachable()
        && shared.config.on_redis_down.when_redis_down(parts) == WhenRedisDown::RejectAll
    {
        return Decision::Refuse(UnavailableReason::RejectedWhileRedisDown);
    }
    if view.health() == Health::Down {
        return Decision::Down { retry_after: None };
    }
    if bufferable
        && shared.config.order == DeliveryOrder::Strict
        && view.backlog().is_some_and(|n| n > 0)
    {
        return Decision::JoinBacklog;
    }
    match shared.breaker.admit(view.up_generation()) {
        Admit::Forward => Decision::Forward,
        Admit::Probe => {
            debug!(target = %view.target(), "probing a suspect target");
            Decision::Forward
        }
        Admit::Divert { retry_after } => Decision::Down {
            retry_after: Some(retry_after),
        },
    }
}

/// The target is down (or older requests wait): store this one.
fn store_path<S, F, B>(
    shared: Arc<Shared>,
    id: String,
    parts: Parts,
    body: B,
    fits: bool,
) -> ResponseFuture<S, F, B>
where
    S: Service<Request<RequestBody<B>>>,
    F: Service<Request<RequestBody<B>>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let limit = shared.config.max_body_bytes;
    if !fits {
        return refuse(
            &shared,
            Answer::refused(UnavailableReason::BodyTooLarge { limit }, Some(&id)),
        );
    }
    if !shared.view.redis_reachable() {
        // Known unreachable: answer now rather than wait for a timeout.
        return refuse(
            &shared,
            Answer::refused(
                UnavailableReason::RedisUnavailable {
                    detail: "redis is not answering".into(),
                },
                Some(&id),
            ),
        );
    }
    if body.is_end_stream() {
        return ResponseFuture::storing(store(shared, id, parts, Bytes::new(), 0));
    }
    let ctx = Ctx {
        shared,
        id: Some(id),
        on_down: WhenDown::Buffer,
        generation: 0,
        fallback: None,
    };
    ResponseFuture::collecting(ctx, parts, body, limit, Then::Store)
}

/// Writes one entry; the future's answer is the response to give.
pub(crate) fn store(
    shared: Arc<Shared>,
    id: String,
    parts: Parts,
    body: Bytes,
    attempts: u32,
) -> StoreFuture {
    Box::pin(async move {
        let entry = Encoded::request(id, &parts, body, &shared.config.never_store, attempts);
        let id = entry.id();
        let target = shared.view.target();
        match shared.queue.enqueue(&entry, shared.view.backlog()).await {
            Ok(enqueued) => {
                shared.view.note_backlog(enqueued.len);
                shared.metrics.buffered.increment(1);
                if attempts > 0 {
                    shared.metrics.diverted.increment(1);
                }
                if shared.redis_warned.swap(false, Ordering::AcqRel) {
                    info!(target = %target, "buffer writable again");
                }
                trace!(target = %target, id = %id, entry = %enqueued.entry_id, "buffered");
                Answer::Buffered {
                    id: id.to_owned(),
                    queue_len: enqueued.len,
                }
            }
            Err(EnqueueError::Full { len }) => {
                shared.metrics.refused("queue_full");
                debug!(target = %target, id = %id, len, "buffer full: refused");
                Answer::refused(UnavailableReason::QueueFull { len }, Some(id))
            }
            Err(EnqueueError::NotReplicated { acked, wanted }) => {
                shared.metrics.refused("not_replicated");
                debug!(target = %target, id = %id, acked, wanted, "buffered but not replicated in time");
                Answer::refused(UnavailableReason::NotReplicated { acked, wanted }, Some(id))
            }
            Err(EnqueueError::Redis(e)) => {
                shared.metrics.refused("redis_unavailable");
                if !shared.redis_warned.swap(true, Ordering::AcqRel) {
                    warn!(target = %target, error = %e, "cannot write to the buffer; answering 503 until redis answers");
                }
                let detail = match std::error::Error::source(&e) {
                    Some(source) => format!("{e}: {source}"),
                    None => e.to_string(),
                };
                Answer::refused(UnavailableReason::RedisUnavailable { detail }, Some(id))
            }
        }
    })
}
