//! The response future of [`HeartbeatBuffer`](crate::HeartbeatBuffer): one
//! named state per step of a call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;
use tracing::{debug, trace};

use crate::body::{BoxError, Collect, Collected, RequestBody, ResponseBody};
use crate::outcome::{Answer, UnavailableReason};
use crate::policy::WhenDown;
use crate::service::{store, Ctx};

/// Writing one entry to Redis; resolves to the answer to give.
pub(crate) type StoreFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// What to do once the body is in memory.
pub(crate) enum Then<S> {
    /// Forward it with this (ready) service, keeping a copy to divert.
    Forward(S),
    /// Store it.
    Store,
}

pin_project! {
    /// Response future of [`HeartbeatBuffer`](crate::HeartbeatBuffer).
    pub struct ResponseFuture<S, F, B>
    where
        S: Service<Request<RequestBody<B>>>,
        F: Service<Request<RequestBody<B>>>,
    {
        #[pin]
        state: State<S, F, B, S::Future, F::Future>,
        ctx: Option<Ctx<F>>,
        // The call's span (target, method, id), entered at every poll.
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, F, B, SF, FF> {
        /// Reading the caller's body into memory: it may have to be stored.
        Collecting {
            collect: Collect<B>,
            parts: Option<Parts>,
            then: Option<Then<S>>,
        },
        /// Waiting for the target; `held` is the request, kept to divert it
        /// if the target fails.
        Forwarding {
            #[pin]
            future: SF,
            held: Option<(Parts, Bytes)>,
        },
        /// Waiting for the fallback to be ready.
        FallbackReady {
            fallback: Option<F>,
            request: Option<Request<RequestBody<B>>>,
        },
        /// Waiting for the fallback.
        FallingBack {
            #[pin]
            future: FF,
        },
        /// Writing the request to Redis.
        Storing {
            future: StoreFuture,
        },
        /// Answered by the layer.
        Done {
            answer: Option<Answer>,
        },
    }
}

impl<S, F, B> ResponseFuture<S, F, B>
where
    S: Service<Request<RequestBody<B>>>,
    F: Service<Request<RequestBody<B>>>,
{
    pub(crate) fn collecting(
        ctx: Ctx<F>,
        parts: Parts,
        body: B,
        limit: usize,
        then: Then<S>,
    ) -> Self
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        Self {
            state: State::Collecting {
                collect: Collect::new(body, limit),
                parts: Some(parts),
                then: Some(then),
            },
            ctx: Some(ctx),
            span: tracing::Span::none(),
        }
    }

    pub(crate) fn forwarding(ctx: Ctx<F>, future: S::Future, held: Option<(Parts, Bytes)>) -> Self {
        Self {
            state: State::Forwarding { future, held },
            ctx: Some(ctx),
            span: tracing::Span::none(),
        }
    }

    pub(crate) fn fallback(fallback: F, request: Request<RequestBody<B>>) -> Self {
        Self {
            state: State::FallbackReady {
                fallback: Some(fallback),
                request: Some(request),
            },
            ctx: None,
            span: tracing::Span::none(),
        }
    }

    pub(crate) fn storing(future: StoreFuture) -> Self {
        Self {
            state: State::Storing { future },
            ctx: None,
            span: tracing::Span::none(),
        }
    }

    /// Runs the rest of the call in `span`.
    pub(crate) fn in_span(mut self, span: tracing::Span) -> Self {
        self.span = span;
        self
    }

    pub(crate) fn done(answer: Answer) -> Self {
        Self {
            state: State::Done {
                answer: Some(answer),
            },
            ctx: None,
            span: tracing::Span::none(),
        }
    }
}

impl<S, F, B, RB> Future for ResponseFuture<S, F, B>
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>>,
    F: Service<Request<RequestBody<B>>, Response = Response<RB>, Error = S::Error>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<RB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Collecting {
                    collect,
                    parts,
                    then,
                } => {
                    let collected = ready!(collect.poll_collect(cx));
                    let (Some(parts), Some(then), Some(ctx)) =
                        (parts.take(), then.take(), this.ctx.as_ref())
                    else {
                        return Poll::Ready(Ok(polled_after_completion()));
                    };
                    after_collect(ctx, parts, then, collected)
                }
                StateProj::Forwarding { future, held } => {
                    let result = ready!(future.poll(cx));
                    let Some(ctx) = this.ctx.as_mut() else {
                        return Poll::Ready(Ok(polled_after_completion()));
                    };
                    let failed = match &result {
                        Ok(response) => ctx.shared.config.is_failure.is_failure(response.status()),
                        Err(_) => true,
                    };
                    let breaker = &ctx.shared.breaker;
                    if !failed {
                        breaker.record_success();
                        return Poll::Ready(result.map(|r| r.map(ResponseBody::inner)));
                    }
                    if breaker.record_failure(ctx.generation) {
                        debug!(target = %ctx.shared.view.target(), "target suspect after failed calls");
                    }
                    match (held.take(), ctx.on_down) {
                        (Some((parts, body)), WhenDown::Buffer) => {
                            let id = ctx.id.clone().unwrap_or_default();
                            trace!(target = %ctx.shared.view.target(), id = %id, "forward failed: diverting to the buffer");
                            State::Storing {
                                future: store(Arc::clone(&ctx.shared), id, parts, body, 1),
                            }
                        }
                        (Some((parts, body)), WhenDown::Fallback) if ctx.fallback.is_some() => {
                            State::FallbackReady {
                                fallback: ctx.fallback.take(),
                                request: Some(Request::from_parts(parts, RequestBody::full(body))),
                            }
                        }
                        // Nothing to divert with: the caller gets the
                        // target's own answer or error.
                        _ => return Poll::Ready(result.map(|r| r.map(ResponseBody::inner))),
                    }
                }
                StateProj::FallbackReady { fallback, request } => {
                    let Some(service) = fallback.as_mut() else {
                        return Poll::Ready(Ok(polled_after_completion()));
                    };
                    ready!(service.poll_ready(cx))?;
                    let (Some(mut service), Some(request)) = (fallback.take(), request.take())
                    else {
                        return Poll::Ready(Ok(polled_after_completion()));
                    };
                    State::FallingBack {
                        future: service.call(request),
                    }
                }
                StateProj::FallingBack { future } => {
                    return future.poll(cx).map_ok(|r| r.map(ResponseBody::inner));
                }
                StateProj::Storing { future } => {
                    let answer = ready!(future.as_mut().poll(cx));
                    return Poll::Ready(Ok(answer.into_response()));
                }
                StateProj::Done { answer } => {
                    let answer = answer.take();
                    return Poll::Ready(Ok(
                        answer.map_or_else(polled_after_completion, |a| a.into_response())
                    ));
                }
            };
            this.state.set(next);
        }
    }
}

/// The body is in memory (or proved too large, or failed): the next step.
fn after_collect<S, F, B>(
    ctx: &Ctx<F>,
    parts: Parts,
    then: Then<S>,
    collected: Collected<B>,
) -> State<S, F, B, S::Future, F::Future>
where
    S: Service<Request<RequestBody<B>>>,
    F: Service<Request<RequestBody<B>>>,
{
    let id = ctx.id.as_deref();
    match (then, collected) {
        (Then::Forward(mut inner), Collected::Complete(body)) => {
            let held = Some((parts.clone(), body.clone()));
            let request = Request::from_parts(parts, RequestBody::full(body));
            State::Forwarding {
                future: inner.call(request),
                held,
            }
        }
        (Then::Forward(mut inner), Collected::TooLarge { prefix, rest }) => {
            // Too large to hold: it streams through, and cannot be diverted.
            let request = Request::from_parts(parts, RequestBody::partial(prefix, rest));
            State::Forwarding {
                future: inner.call(request),
                held: None,
            }
        }
        (Then::Store, Collected::Complete(body)) => State::Storing {
            future: store(
                Arc::clone(&ctx.shared),
                id.unwrap_or_default().to_owned(),
                parts,
                body,
                0,
            ),
        },
        (Then::Store, Collected::TooLarge { .. }) => {
            ctx.shared.metrics.refused("body_too_large");
            State::Done {
                answer: Some(Answer::refused(
                    UnavailableReason::BodyTooLarge {
                        limit: ctx.shared.config.max_body_bytes,
                    },
                    id,
                )),
            }
        }
        (_, Collected::Failed(e)) => {
            ctx.shared.metrics.refused("body_read_failed");
            State::Done {
                answer: Some(Answer::refused(
                    UnavailableReason::BodyReadFailed {
                        detail: e.to_string(),
                    },
                    id,
                )),
            }
        }
    }
}

/// What a future polled again after it finished answers. Futures must not be
/// polled after completion; this keeps the library free of panics if one is.
fn polled_after_completion<B>() -> Response<ResponseBody<B>> {
    Answer::refused(
        UnavailableReason::BodyReadFailed {
            detail: "response future polled after completion".into(),
        },
        None,
    )
    .into_response()
}

impl<S, F, B> fmt::Debug for ResponseFuture<S, F, B>
where
    S: Service<Request<RequestBody<B>>>,
    F: Service<Request<RequestBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Collecting { .. } => "collecting",
            State::Forwarding { .. } => "forwarding",
            State::FallbackReady { .. } => "fallback_ready",
            State::FallingBack { .. } => "falling_back",
            State::Storing { .. } => "storing",
            State::Done { .. } => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
