//! What the layer answers by itself, and the typed extensions that let Rust
//! callers tell those answers from the target's.
//!
//! | status | when | extension |
//! | --- | --- | --- |
//! | `202 Accepted` | the request is stored in Redis | [`Buffered`] |
//! | `503 Service Unavailable` | the target is down and the request cannot be stored | [`Unavailable`] |
//! | `413 Payload Too Large` | the target is down and the body exceeds `max_body_bytes` | [`Unavailable`] |
//! | `400 Bad Request` | the caller's body failed while being read | [`Unavailable`] |
//!
//! Every synthetic response carries a short JSON body
//! (`{"status":"buffered","id":"..."}` or `{"error":"...","message":"..."}`),
//! and the request's id in the `idempotency-key` header when it has one.
//!
//! # Examples
//!
//! ```
//! use tower_heartbeat_buffer::{Buffered, Unavailable};
//!
//! fn describe<B>(response: &http::Response<B>) -> String {
//!     if let Some(buffered) = response.extensions().get::<Buffered>() {
//!         format!("stored as {}, will be delivered later", buffered.id())
//!     } else if let Some(unavailable) = response.extensions().get::<Unavailable>() {
//!         format!("not delivered: {}", unavailable.reason())
//!     } else {
//!         format!("answered by the target: {}", response.status())
//!     }
//! }
//! # let _ = describe(&http::Response::new(()));
//! ```

use std::fmt;
use std::time::Duration;

use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::ResponseBody;
use crate::envelope::IDEMPOTENCY_KEY;

/// On a `202 Accepted`: the request is in the buffer and will be replayed
/// with this id as its `Idempotency-Key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffered {
    id: String,
    queue_len: u64,
}

impl Buffered {
    /// The request's id: its `Idempotency-Key` now and on every replay.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How many requests the buffer held after this one was added.
    pub fn queue_len(&self) -> u64 {
        self.queue_len
    }
}

/// On a response the layer wrote instead of delivering: why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    reason: UnavailableReason,
    retry_after: Option<Duration>,
}

impl Unavailable {
    /// Why the request was not delivered nor stored.
    pub fn reason(&self) -> &UnavailableReason {
        &self.reason
    }

    /// When trying again makes sense, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// Why a request was neither delivered nor stored.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UnavailableReason {
    /// The target is down and this request may not be buffered (a GET, by
    /// default), or the policy said to fail fast.
    TargetDown,
    /// The target is down and the body is larger than `max_body_bytes`.
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The buffer holds `max_queue_len` entries already.
    QueueFull {
        /// The buffer's length when the request was refused.
        len: u64,
    },
    /// Redis could not be reached or refused the write.
    RedisUnavailable {
        /// What went wrong, for logs.
        detail: String,
    },
    /// Redis cannot be reached and the layer fails closed.
    RejectedWhileRedisDown,
    /// Written on the primary, but fewer replicas than
    /// [`wait_for_replicas`](crate::HeartbeatBufferBuilder::wait_for_replicas)
    /// asks for confirmed it in time. It may still be delivered (retry with
    /// the same `Idempotency-Key`), or lost if the primary fails now.
    NotReplicated {
        /// Replicas that confirmed.
        acked: u64,
        /// Replicas asked for.
        wanted: u32,
    },
    /// The policy chose a fallback but none is configured.
    NoFallback,
    /// The caller's request body failed while being read.
    BodyReadFailed {
        /// What went wrong.
        detail: String,
    },
    /// The caller's `Idempotency-Key` is not visible ASCII, so it cannot be
    /// stored and sent again unchanged.
    InvalidIdempotencyKey,
}

impl UnavailableReason {
    /// A short machine-readable code, used in the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TargetDown => "target_down",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::QueueFull { .. } => "queue_full",
            Self::RedisUnavailable { .. } => "redis_unavailable",
            Self::RejectedWhileRedisDown => "redis_down_fail_closed",
            Self::NotReplicated { .. } => "not_replicated",
            Self::NoFallback => "no_fallback",
            Self::BodyReadFailed { .. } => "body_read_failed",
            Self::InvalidIdempotencyKey => "invalid_idempotency_key",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyReadFailed { .. } | Self::InvalidIdempotencyKey => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl fmt::Display for UnavailableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TargetDown => f.write_str("the target is down and this request is not buffered"),
            Self::BodyTooLarge { limit } => write!(
                f,
                "the target is down and the body exceeds the {limit}-byte buffering limit"
            ),
            Self::QueueFull { len } => write!(f, "the buffer is full ({len} requests wait)"),
            Self::RedisUnavailable { detail } => {
                write!(f, "the buffer cannot be reached: {detail}")
            }
            Self::RejectedWhileRedisDown => {
                f.write_str("redis cannot be reached and the layer fails closed")
            }
            Self::NotReplicated { acked, wanted } => write!(
                f,
                "stored, but confirmed by {acked} of {wanted} replicas in time: it may be lost in a failover (retry with the same idempotency-key)"
            ),
            Self::NoFallback => f.write_str("the target is down and no fallback is configured"),
            Self::BodyReadFailed { detail } => {
                write!(f, "the request body could not be read: {detail}")
            }
            Self::InvalidIdempotencyKey => {
                f.write_str("the idempotency-key header must be visible ASCII")
            }
        }
    }
}

/// An answer the layer gives by itself, before its body type is known.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Stored: `202`.
    Buffered { id: String, queue_len: u64 },
    /// Neither delivered nor stored.
    Refused {
        reason: UnavailableReason,
        id: Option<String>,
        retry_after: Option<Duration>,
    },
}

impl Answer {
    pub(crate) fn refused(reason: UnavailableReason, id: Option<&str>) -> Self {
        Self::Refused {
            reason,
            id: id.map(str::to_owned),
            retry_after: None,
        }
    }

    pub(crate) fn into_response<B>(self) -> Response<ResponseBody<B>> {
        match self {
            Answer::Buffered { id, queue_len } => accepted(&id, queue_len),
            Answer::Refused {
                reason,
                id,
                retry_after,
            } => unavailable(reason, id.as_deref(), retry_after),
        }
    }
}

/// `202 Accepted` for a stored request.
pub(crate) fn accepted<B>(id: &str, queue_len: u64) -> Response<ResponseBody<B>> {
    let body = format!(
        "{{\"status\":\"buffered\",\"id\":\"{}\",\"queue_len\":{queue_len}}}",
        json_escape(id)
    );
    let mut response = Response::new(ResponseBody::synthetic(body));
    *response.status_mut() = StatusCode::ACCEPTED;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(value) = HeaderValue::from_str(id) {
        headers.insert(IDEMPOTENCY_KEY, value);
    }
    response.extensions_mut().insert(Buffered {
        id: id.to_owned(),
        queue_len,
    });
    response
}

/// The layer's refusal for `reason`.
pub(crate) fn unavailable<B>(
    reason: UnavailableReason,
    id: Option<&str>,
    retry_after: Option<Duration>,
) -> Response<ResponseBody<B>> {
    let body = format!(
        "{{\"error\":\"{}\",\"message\":\"{}\"}}",
        reason.code(),
        json_escape(&reason.to_string())
    );
    let mut response = Response::new(ResponseBody::synthetic(body));
    *response.status_mut() = reason.status();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(value) = id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert(IDEMPOTENCY_KEY, value);
    }
    if let Some(after) = retry_after {
        // Whole seconds, rounded up: "Retry-After: 0" would invite a storm.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response.extensions_mut().insert(Unavailable {
        reason,
        retry_after,
    });
    response
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_carries_id_in_header_body_and_extension() {
        let r = accepted::<()>("abc", 3);
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        assert_eq!(r.headers()[IDEMPOTENCY_KEY], "abc");
        assert_eq!(r.extensions().get::<Buffered>().unwrap().id(), "abc");
        assert_eq!(r.extensions().get::<Buffered>().unwrap().queue_len(), 3);
    }

    #[test]
    fn refusals_map_to_statuses_and_retry_after() {
        let r = unavailable::<()>(UnavailableReason::BodyTooLarge { limit: 10 }, None, None);
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let r = unavailable::<()>(
            UnavailableReason::TargetDown,
            Some("id"),
            Some(Duration::from_millis(1500)),
        );
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        assert_eq!(
            r.extensions().get::<Unavailable>().unwrap().reason(),
            &UnavailableReason::TargetDown
        );
        assert_eq!(json_escape("a\"b\\\n"), "a\\\"b\\\\\\u000a");
    }
}
