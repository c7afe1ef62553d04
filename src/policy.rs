//! The layer's decisions that users may change, as small traits with a
//! default and an implementation for closures.
//!
//! | question | trait | default |
//! | --- | --- | --- |
//! | may this request be stored and replayed later? | [`Bufferable`] | [`UnsafeMethods`]: all but GET, HEAD, OPTIONS, TRACE |
//! | does this answer count as a failure of the target? | [`IsFailure`] | [`FailureStatuses`]: 502, 503, 504 |
//! | what happens to a request while the target is down? | [`OnDown`] | [`WhenDown::Buffer`] |
//! | what happens when Redis cannot be reached? | [`OnRedisDown`] | [`WhenRedisDown::ForwardWhileUp`] |
//!
//! A single request can also opt in or out with the [`BufferOverride`]
//! extension or the `x-heartbeat-buffer: allow|never` header (removed before
//! the request is sent on).
//!
//! # Examples
//!
//! ```
//! use http::{Method, StatusCode};
//! use tower_heartbeat_buffer::policy::{Bufferable, IsFailure, OnDown, WhenDown};
//!
//! // Buffer only writes to /orders.
//! let bufferable = |req: &http::request::Parts| {
//!     req.method == Method::POST && req.uri.path().starts_with("/orders")
//! };
//! // A 500 from this target means "try later", too.
//! let is_failure = |status: StatusCode| status.is_server_error();
//! // Reports are not worth keeping: fail fast; everything else is buffered.
//! let on_down = |req: &http::request::Parts| {
//!     if req.uri.path().starts_with("/reports") { WhenDown::FailFast } else { WhenDown::Buffer }
//! };
//!
//! let (parts, ()) = http::Request::post("/orders/1").body(()).unwrap().into_parts();
//! assert!(bufferable.may_buffer(&parts));
//! assert!(is_failure.is_failure(StatusCode::INTERNAL_SERVER_ERROR));
//! assert_eq!(on_down.when_down(&parts), WhenDown::Buffer);
//! ```

use std::collections::HashSet;
use std::fmt;

use http::header::HeaderName;
use http::request::Parts;
use http::{Method, StatusCode};

/// Whether a request may be stored and replayed later.
pub trait Bufferable: Send + Sync + 'static {
    /// `true` when replaying `request` later, possibly more than once (with
    /// the same idempotency key), is acceptable.
    fn may_buffer(&self, request: &Parts) -> bool;
}

/// The default [`Bufferable`]: every method but the safe ones.
///
/// GET, HEAD, OPTIONS and TRACE ask for an answer now; a `202` and a replay
/// later answer nothing. Writes are what is worth keeping.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnsafeMethods;

impl Bufferable for UnsafeMethods {
    fn may_buffer(&self, request: &Parts) -> bool {
        !matches!(
            request.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        )
    }
}

impl<F> Bufferable for F
where
    F: Fn(&Parts) -> bool + Send + Sync + 'static,
{
    fn may_buffer(&self, request: &Parts) -> bool {
        self(request)
    }
}

/// Whether the target's answer means "the target is not coping": the
/// request is then diverted (when it may be buffered) and the failure counts
/// towards suspecting the target.
pub trait IsFailure: Send + Sync + 'static {
    /// `true` when `status` is a failure of the target rather than an answer.
    fn is_failure(&self, status: StatusCode) -> bool;
}

/// The default [`IsFailure`]: a fixed set of statuses, by default 502, 503
/// and 504 (what proxies and overloaded servers answer when the service
/// behind them is not there).
#[derive(Clone, Debug)]
pub struct FailureStatuses {
    statuses: Vec<StatusCode>,
}

impl FailureStatuses {
    /// Exactly these statuses.
    pub fn new(statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        Self {
            statuses: statuses.into_iter().collect(),
        }
    }
}

impl Default for FailureStatuses {
    fn default() -> Self {
        Self::new([
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        ])
    }
}

impl IsFailure for FailureStatuses {
    fn is_failure(&self, status: StatusCode) -> bool {
        self.statuses.contains(&status)
    }
}

impl<F> IsFailure for F
where
    F: Fn(StatusCode) -> bool + Send + Sync + 'static,
{
    fn is_failure(&self, status: StatusCode) -> bool {
        self(status)
    }
}

/// What happens to a request while the target is down (or suspect).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenDown {
    /// Store it and answer `202 Accepted` (requests that may not be buffered
    /// get `503`).
    #[default]
    Buffer,
    /// Send it to the fallback service, with the same idempotency key.
    Fallback,
    /// Answer `503 Service Unavailable` at once.
    FailFast,
}

/// Chooses a [`WhenDown`] per request.
pub trait OnDown: Send + Sync + 'static {
    /// What to do with `request` while the target is down.
    fn when_down(&self, request: &Parts) -> WhenDown;
}

impl OnDown for WhenDown {
    fn when_down(&self, _: &Parts) -> WhenDown {
        *self
    }
}

impl<F> OnDown for F
where
    F: Fn(&Parts) -> WhenDown + Send + Sync + 'static,
{
    fn when_down(&self, request: &Parts) -> WhenDown {
        self(request)
    }
}

/// What happens when Redis cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenRedisDown {
    /// Fail open: forward while the target is believed up; a request that
    /// needs the buffer gets a fast `503` (never a `202` for something not
    /// stored).
    #[default]
    ForwardWhileUp,
    /// Fail closed: `503` for every request until Redis answers again.
    RejectAll,
}

/// Chooses a [`WhenRedisDown`] per request.
pub trait OnRedisDown: Send + Sync + 'static {
    /// What to do with `request` while Redis cannot be reached.
    fn when_redis_down(&self, request: &Parts) -> WhenRedisDown;
}

impl OnRedisDown for WhenRedisDown {
    fn when_redis_down(&self, _: &Parts) -> WhenRedisDown {
        *self
    }
}

impl<F> OnRedisDown for F
where
    F: Fn(&Parts) -> WhenRedisDown + Send + Sync + 'static,
{
    fn when_redis_down(&self, request: &Parts) -> WhenRedisDown {
        self(request)
    }
}

/// A per-request override of [`Bufferable`], set as a request extension
/// (or with the `x-heartbeat-buffer` header: `allow` or `never`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferOverride {
    /// This request may be buffered, whatever the policy says.
    Allow,
    /// This request must never be buffered.
    Never,
}

/// The header form of [`BufferOverride`]; removed before forwarding.
pub const BUFFER_OVERRIDE_HEADER: HeaderName = HeaderName::from_static("x-heartbeat-buffer");

/// Headers that are never written to Redis.
///
/// The default leaves out:
///
/// - hop-by-hop headers (`connection`, `keep-alive`, `proxy-connection`,
///   `te`, `trailer`, `transfer-encoding`, `upgrade`) and `content-length`:
///   they describe one connection, not the request, and are recomputed when
///   the request is sent again;
/// - credentials (`authorization`, `proxy-authorization`, `cookie`): they
///   would sit at rest in Redis, and a short-lived token has often expired
///   by the time of the replay anyway. Add credentials *inside* (below) the
///   layer, with a layer of the client stack, so every attempt — the first
///   and each replay — gets fresh ones; or, if the target needs the caller's
///   own credentials, [`allow`](Self::allow) them knowingly.
/// - the layer's own `x-heartbeat-buffer` control header.
#[derive(Clone)]
pub struct NeverStore {
    names: HashSet<HeaderName>,
}

impl NeverStore {
    /// The default names, listed above.
    pub const DEFAULT: [&'static str; 12] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-heartbeat-buffer",
    ];

    /// Exactly these names (plus `content-length` and the hop-by-hop
    /// headers, which are never meaningful in storage).
    pub fn only(names: impl IntoIterator<Item = HeaderName>) -> Self {
        let mut names: HashSet<HeaderName> = names.into_iter().collect();
        for name in &Self::DEFAULT[..8] {
            names.insert(HeaderName::from_static(name));
        }
        Self { names }
    }

    /// Also leave out `name`.
    pub fn also(mut self, name: HeaderName) -> Self {
        self.names.insert(name);
        self
    }

    /// Store `name` after all (for instance `authorization`, when the target
    /// needs the caller's own credentials on replay).
    pub fn allow(mut self, name: &HeaderName) -> Self {
        self.names.remove(name);
        self
    }

    /// Whether `name` is left out.
    pub fn contains(&self, name: &HeaderName) -> bool {
        self.names.contains(name)
    }
}

impl Default for NeverStore {
    fn default() -> Self {
        Self {
            names: Self::DEFAULT
                .iter()
                .map(|n| HeaderName::from_static(n))
                .collect(),
        }
    }
}

impl fmt::Debug for NeverStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.names.iter().map(HeaderName::as_str).collect();
        names.sort_unstable();
        f.debug_set().entries(names).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method) -> Parts {
        http::Request::builder()
            .method(method)
            .uri("/")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn safe_methods_are_not_buffered_by_default() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(!UnsafeMethods.may_buffer(&parts(m)));
        }
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(UnsafeMethods.may_buffer(&parts(m)));
        }
    }

    #[test]
    fn default_failures_are_gateway_statuses() {
        let f = FailureStatuses::default();
        assert!(f.is_failure(StatusCode::BAD_GATEWAY));
        assert!(f.is_failure(StatusCode::SERVICE_UNAVAILABLE));
        assert!(f.is_failure(StatusCode::GATEWAY_TIMEOUT));
        assert!(!f.is_failure(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!f.is_failure(StatusCode::OK));
    }

    #[test]
    fn never_store_can_be_narrowed_but_keeps_hop_by_hop() {
        let d = NeverStore::default();
        assert!(d.contains(&http::header::AUTHORIZATION));
        let allowed = d.allow(&http::header::AUTHORIZATION);
        assert!(!allowed.contains(&http::header::AUTHORIZATION));
        let only = NeverStore::only([HeaderName::from_static("x-secret")]);
        assert!(only.contains(&HeaderName::from_static("x-secret")));
        assert!(only.contains(&http::header::TRANSFER_ENCODING));
        assert!(!only.contains(&http::header::COOKIE));
    }
}
