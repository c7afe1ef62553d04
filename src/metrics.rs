//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: install
//! any recorder (a Prometheus exporter, for instance) **before** building
//! layers, watchers and replayers; they register their handles when built.
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `thb_forwarded_total` | counter | `target` | calls sent to the target |
//! | `thb_buffered_total` | counter | `target` | calls stored in the buffer (`202`) |
//! | `thb_diverted_total` | counter | `target` | of those, stored after a failed attempt |
//! | `thb_refused_total` | counter | `target`, `reason` | calls answered `503`/`413`/`400` by the layer |
//! | `thb_replayed_total` | counter | `target` | buffered calls delivered by a replayer |
//! | `thb_replay_retries_total` | counter | `target` | failed replay attempts that will be retried |
//! | `thb_dead_lettered_total` | counter | `target` | entries moved to the dead letters |
//! | `thb_queue_depth` | gauge | `target` | entries in the buffer, as last seen |
//! | `thb_queue_oldest_age_seconds` | gauge | `target` | age of the oldest entry (0 when empty) |
//! | `thb_target_up` | gauge | `target` | 1 while the target is believed up, else 0 |
//! | `thb_detection_latency_seconds` | histogram | `target`, `cause` | from a change (`notification` received, or TTL `deadline` passed) to the view showing it |
//!
//! The hot path increments pre-registered handles: an atomic add, no lookup.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

/// The layer's counters for one target.
#[derive(Clone)]
pub(crate) struct LayerMetrics {
    target: String,
    pub(crate) forwarded: Counter,
    pub(crate) buffered: Counter,
    pub(crate) diverted: Counter,
}

impl LayerMetrics {
    pub(crate) fn new(target: &str) -> Self {
        let label = target.to_owned();
        Self {
            forwarded: counter!("thb_forwarded_total", "target" => label.clone()),
            buffered: counter!("thb_buffered_total", "target" => label.clone()),
            diverted: counter!("thb_diverted_total", "target" => label.clone()),
            target: label,
        }
    }

    /// Refusals are off the hot path: looked up by reason when they happen.
    pub(crate) fn refused(&self, reason: &'static str) {
        counter!("thb_refused_total", "target" => self.target.clone(), "reason" => reason)
            .increment(1);
    }
}

/// The replayer's counters for one target.
#[derive(Clone)]
pub(crate) struct ReplayMetrics {
    pub(crate) replayed: Counter,
    pub(crate) retries: Counter,
    pub(crate) dead_lettered: Counter,
}

impl ReplayMetrics {
    pub(crate) fn new(target: &str) -> Self {
        let label = target.to_owned();
        Self {
            replayed: counter!("thb_replayed_total", "target" => label.clone()),
            retries: counter!("thb_replay_retries_total", "target" => label.clone()),
            dead_lettered: counter!("thb_dead_lettered_total", "target" => label),
        }
    }
}

/// What the watcher reports for one target.
#[derive(Clone)]
pub(crate) struct ViewMetrics {
    pub(crate) up: Gauge,
    pub(crate) queue_depth: Gauge,
    pub(crate) oldest_age: Gauge,
    pub(crate) after_notification: Histogram,
    pub(crate) after_deadline: Histogram,
}

impl ViewMetrics {
    pub(crate) fn new(target: &str) -> Self {
        let label = target.to_owned();
        Self {
            up: gauge!("thb_target_up", "target" => label.clone()),
            queue_depth: gauge!("thb_queue_depth", "target" => label.clone()),
            oldest_age: gauge!("thb_queue_oldest_age_seconds", "target" => label.clone()),
            after_notification: histogram!("thb_detection_latency_seconds", "target" => label.clone(), "cause" => "notification"),
            after_deadline: histogram!("thb_detection_latency_seconds", "target" => label, "cause" => "deadline"),
        }
    }
}
