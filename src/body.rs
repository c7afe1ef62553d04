//! The bodies the layer hands on: [`RequestBody`] to the inner service,
//! [`ResponseBody`] to the caller.
//!
//! Like tower-http's own bodies, both are enums over "what came in" and "what
//! we made", so the layer adds no bounds beyond the ones hyper, reqwest and
//! axum bodies already meet: `Data` is [`Bytes`] on both sides, and the
//! response keeps the inner service's error type.
//!
//! # Examples
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::BodyExt;
//! use tower_heartbeat_buffer::RequestBody;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // What a replay (or a fallback service in a test) sends.
//! let body = RequestBody::<http_body_util::Empty<Bytes>>::full(Bytes::from_static(b"hello"));
//! let bytes = body.collect().await.unwrap().to_bytes();
//! assert_eq!(bytes, "hello");
//! # }
//! ```

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// The error type of [`RequestBody`]: whatever the caller's body failed with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// The request body the wrapped service receives.
    ///
    /// Either the caller's body untouched (requests that cannot be buffered,
    /// or too large to hold), or bytes held in memory (a request that may
    /// have to be stored, or a replay from the buffer).
    pub struct RequestBody<B> {
        #[pin]
        inner: RequestInner<B>,
    }
}

pin_project! {
    #[project = RequestProj]
    enum RequestInner<B> {
        Full { data: Option<Bytes> },
        Partial { prefix: Option<Bytes>, rest: Pin<Box<B>> },
        Streaming { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    /// A body of `data`, held in memory.
    pub fn full(data: Bytes) -> Self {
        Self {
            inner: RequestInner::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// The caller's body, passed on untouched.
    pub(crate) fn streaming(body: B) -> Self {
        Self {
            inner: RequestInner::Streaming { body },
        }
    }

    /// What was read of the caller's body before it proved too large, then
    /// the rest of it.
    pub(crate) fn partial(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            inner: RequestInner::Partial {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().inner.project() {
            RequestProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestProj::Partial { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                poll_inner(rest.as_mut(), cx).map_err(Into::into)
            }
            RequestProj::Streaming { body } => poll_inner(body, cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            RequestInner::Full { data } => data.is_none(),
            RequestInner::Partial { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            RequestInner::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            RequestInner::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestInner::Partial { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
            RequestInner::Streaming { body } => body.size_hint(),
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            RequestInner::Full { .. } => "full",
            RequestInner::Partial { .. } => "partial",
            RequestInner::Streaming { .. } => "streaming",
        };
        f.debug_struct("RequestBody").field("kind", &kind).finish()
    }
}

pin_project! {
    /// The response body the caller receives: the target's own, untouched,
    /// or a short one the layer wrote (`202 Accepted`, `503`, `413`).
    pub struct ResponseBody<B> {
        #[pin]
        inner: ResponseInner<B>,
    }
}

pin_project! {
    #[project = ResponseProj]
    enum ResponseInner<B> {
        Inner { #[pin] body: B },
        Synthetic { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// The inner service's body.
    pub(crate) fn inner(body: B) -> Self {
        Self {
            inner: ResponseInner::Inner { body },
        }
    }

    /// A body written by the layer.
    pub(crate) fn synthetic(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self {
            inner: ResponseInner::Synthetic {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// Whether the layer wrote this body (rather than the target).
    pub fn is_synthetic(&self) -> bool {
        matches!(self.inner, ResponseInner::Synthetic { .. })
    }
}

/// An empty synthetic body: what tower-http's own short-circuiting layers
/// (for instance its `TimeoutLayer`) need to be stacked above this one.
impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::synthetic(Bytes::new())
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().inner.project() {
            ResponseProj::Inner { body } => poll_inner(body, cx),
            ResponseProj::Synthetic { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ResponseInner::Inner { body } => body.is_end_stream(),
            ResponseInner::Synthetic { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            ResponseInner::Inner { body } => body.size_hint(),
            ResponseInner::Synthetic { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("synthetic", &self.is_synthetic())
            .finish()
    }
}

/// Reads a body into memory, up to a limit, without losing what does not
/// fit: a body that proves too large is handed back with what was read.
pub(crate) struct Collect<B> {
    body: Option<Pin<Box<B>>>,
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
}

/// What [`Collect`] found.
pub(crate) enum Collected<B> {
    /// The whole body (trailers, rare on requests, are not kept).
    Complete(Bytes),
    /// More than the limit: what was read, and the rest of the body.
    TooLarge { prefix: Bytes, rest: Pin<Box<B>> },
    /// The body failed while being read.
    Failed(BoxError),
}

impl<B> Collect<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(body: B, limit: usize) -> Self {
        Self {
            body: Some(Box::pin(body)),
            chunks: Vec::new(),
            len: 0,
            limit,
        }
    }

    pub(crate) fn poll_collect(&mut self, cx: &mut Context<'_>) -> Poll<Collected<B>> {
        loop {
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Collected::Failed("body polled after completion".into()));
            };
            match std::task::ready!(body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        let chunk = data.copy_to_bytes(data.remaining());
                        self.len += chunk.len();
                        self.chunks.push(chunk);
                        if self.len > self.limit {
                            let prefix = self.take_bytes();
                            return Poll::Ready(match self.body.take() {
                                Some(rest) => Collected::TooLarge { prefix, rest },
                                None => Collected::Failed("body vanished while read".into()),
                            });
                        }
                    }
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Poll::Ready(Collected::Failed(e.into()));
                }
                None => {
                    self.body = None;
                    return Poll::Ready(Collected::Complete(self.take_bytes()));
                }
            }
        }
    }

    fn take_bytes(&mut self) -> Bytes {
        match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.pop().unwrap_or_default(),
            _ => {
                let mut all = Vec::with_capacity(self.len);
                for chunk in self.chunks.drain(..) {
                    all.extend_from_slice(&chunk);
                }
                Bytes::from(all)
            }
        }
    }
}

/// Polls `body`, turning its data into [`Bytes`] (free when it already is).
fn poll_inner<B: Body>(
    body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    body.poll_frame(cx).map(|frame| {
        frame.map(|frame| frame.map(|f| f.map_data(|mut d| d.copy_to_bytes(d.remaining()))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn every_kind_yields_its_bytes_in_order() {
        let full = RequestBody::<Full<Bytes>>::full(Bytes::from_static(b"abc"));
        assert_eq!(full.size_hint().exact(), Some(3));
        assert_eq!(full.collect().await.unwrap().to_bytes(), "abc");

        let partial = RequestBody::partial(
            Bytes::from_static(b"ab"),
            Box::pin(Full::new(Bytes::from_static(b"cd"))),
        );
        assert_eq!(partial.size_hint().exact(), Some(4));
        assert_eq!(partial.collect().await.unwrap().to_bytes(), "abcd");

        let streaming = RequestBody::streaming(Full::new(Bytes::from_static(b"xyz")));
        assert_eq!(streaming.collect().await.unwrap().to_bytes(), "xyz");

        let empty = RequestBody::<Full<Bytes>>::full(Bytes::new());
        assert!(empty.is_end_stream());
    }

    #[tokio::test]
    async fn synthetic_responses_never_fail() {
        let body = ResponseBody::<Full<Bytes>>::synthetic("accepted");
        assert!(body.is_synthetic());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "accepted");
        let inner = ResponseBody::inner(Full::new(Bytes::from_static(b"target")));
        assert!(!inner.is_synthetic());
        assert_eq!(inner.collect().await.unwrap().to_bytes(), "target");
    }
}
