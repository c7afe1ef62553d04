//! What a replay's outcome means: acknowledge, retry, or dead-letter.

use std::time::Duration;

use http::header::RETRY_AFTER;
use http::{response, StatusCode};

/// The outcome of one delivery attempt, as the policy sees it.
#[derive(Debug)]
pub enum Attempt<'a> {
    /// The target answered.
    Answered(&'a response::Parts),
    /// No answer: refused, reset, timed out...
    Failed(&'a (dyn std::error::Error + Send + Sync)),
}

/// What to do with an entry after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Delivered: acknowledge and mark processed.
    Acknowledge,
    /// Try again later; `after` is the target's own word (`Retry-After`), if
    /// any, and is honoured over the backoff. `pause` asks the replayer to
    /// hold every delivery to this target meanwhile (the target said it is
    /// overloaded), not just this entry's.
    Retry {
        /// The target's `Retry-After`, if it gave one.
        after: Option<Duration>,
        /// Hold all deliveries, not just this one.
        pause: bool,
        /// Why, for events and logs.
        reason: String,
    },
    /// Never deliverable as is: move to the dead letters with `reason`.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// Judges delivery attempts.
pub trait ReplayPolicy: Send + Sync + 'static {
    /// What `attempt` means for the entry.
    fn judge(&self, attempt: Attempt<'_>) -> Verdict;
}

/// The default [`ReplayPolicy`]:
///
/// | outcome | verdict |
/// | --- | --- |
/// | 2xx | acknowledge |
/// | 408, 429, 5xx, no answer | retry (429 and 503 pause the whole drain), honouring `Retry-After` |
/// | anything else (other 4xx, 3xx, 1xx) | dead-letter at once, with the status |
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultReplayPolicy;

impl ReplayPolicy for DefaultReplayPolicy {
    fn judge(&self, attempt: Attempt<'_>) -> Verdict {
        match attempt {
            Attempt::Answered(parts) if parts.status.is_success() => Verdict::Acknowledge,
            Attempt::Answered(parts)
                if parts.status == StatusCode::REQUEST_TIMEOUT
                    || parts.status == StatusCode::TOO_MANY_REQUESTS
                    || parts.status.is_server_error() =>
            {
                Verdict::Retry {
                    after: retry_after(parts),
                    pause: parts.status == StatusCode::TOO_MANY_REQUESTS
                        || parts.status == StatusCode::SERVICE_UNAVAILABLE,
                    reason: format!("status {}", parts.status),
                }
            }
            Attempt::Answered(parts) => Verdict::DeadLetter {
                reason: format!("status {}", parts.status),
            },
            Attempt::Failed(error) => Verdict::Retry {
                after: None,
                pause: false,
                reason: format!("no answer: {}", chain(error)),
            },
        }
    }
}

impl<F> ReplayPolicy for F
where
    F: Fn(Attempt<'_>) -> Verdict + Send + Sync + 'static,
{
    fn judge(&self, attempt: Attempt<'_>) -> Verdict {
        self(attempt)
    }
}

/// An error with its sources: "client error (Connect): tcp connect error:
/// Connection refused" says more than its first link.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured: it needs a
/// clock agreement the replayer cannot check).
pub(crate) fn retry_after(parts: &response::Parts) -> Option<Duration> {
    let value = parts.headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16, retry: Option<&str>) -> Verdict {
        let mut builder = http::Response::builder().status(status);
        if let Some(r) = retry {
            builder = builder.header(RETRY_AFTER, r);
        }
        let (parts, ()) = builder.body(()).unwrap().into_parts();
        DefaultReplayPolicy.judge(Attempt::Answered(&parts))
    }

    #[test]
    fn default_policy_follows_the_table() {
        assert_eq!(answered(200, None), Verdict::Acknowledge);
        assert_eq!(answered(204, None), Verdict::Acknowledge);
        assert!(matches!(
            answered(500, None),
            Verdict::Retry { pause: false, .. }
        ));
        assert!(matches!(
            answered(429, Some("3")),
            Verdict::Retry { after: Some(d), pause: true, .. } if d == Duration::from_secs(3)
        ));
        assert!(matches!(
            answered(503, None),
            Verdict::Retry { pause: true, .. }
        ));
        assert!(matches!(answered(408, None), Verdict::Retry { .. }));
        assert!(
            matches!(answered(400, None), Verdict::DeadLetter { reason } if reason.contains("400"))
        );
        assert!(matches!(answered(301, None), Verdict::DeadLetter { .. }));
        let err = std::io::Error::other("reset");
        assert!(matches!(
            DefaultReplayPolicy.judge(Attempt::Failed(&err)),
            Verdict::Retry { .. }
        ));
    }
}
