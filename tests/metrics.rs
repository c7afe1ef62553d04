//! Metrics through the `metrics` facade, read back with a debugging
//! recorder (installed once for this test binary, before anything is built).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use support::layer_rig::{call, Rig};
use support::{hyper_client, wait_until, Reply};
use tower_heartbeat_buffer::replay::ReplayConfig;
use tower_heartbeat_buffer::{HeartbeatBufferLayer, RequestBody};

/// The value of the series `name{labels}` in the Prometheus text output
/// (histograms: their `_count`).
fn value(handle: &PrometheusHandle, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = handle.render();
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())
            .flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_replays_and_the_view_are_counted() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    let rig = Rig::start().await;
    let t = [("target", "orders")];
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    for _ in 0..3 {
        assert_eq!(
            call(&mut service, rig.request("POST", "/o", b"x"))
                .await
                .unwrap()
                .status,
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(
        call(&mut service, rig.request("GET", "/o", b""))
            .await
            .unwrap()
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(value(&handle, "thb_buffered_total", &t), Some(3.0));
    assert_eq!(
        value(
            &handle,
            "thb_refused_total",
            &[("target", "orders"), ("reason", "target_down")]
        ),
        Some(1.0)
    );
    // The watcher reports depth and age of the oldest entry.
    assert!(
        wait_until(Duration::from_secs(10), || value(
            &handle,
            "thb_queue_depth",
            &t
        ) == Some(3.0))
        .await
    );

    rig.http.set_reply(Reply::Ok);
    let layer = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&rig.watcher)
        .await
        .unwrap();
    let mut config = ReplayConfig::default();
    config.slow_start = Duration::ZERO;
    let replay = layer
        .replayer()
        .config(config)
        .spawn(hyper_client::<RequestBody<Full<Bytes>>>());
    rig.up().await;
    assert!(rig.http.wait_for_requests(3, Duration::from_secs(10)).await);
    assert!(
        wait_until(Duration::from_secs(10), || value(
            &handle,
            "thb_replayed_total",
            &t
        ) == Some(3.0))
        .await
    );
    assert_eq!(value(&handle, "thb_target_up", &t), Some(1.0));
    assert!(
        wait_until(Duration::from_secs(10), || value(
            &handle,
            "thb_queue_depth",
            &t
        ) == Some(0.0))
        .await
    );
    replay.shutdown().await;

    // Forwarded once the buffer is empty (strict order).
    assert_eq!(
        call(&mut service, rig.request("POST", "/o", b"y"))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    assert_eq!(value(&handle, "thb_forwarded_total", &t), Some(1.0));

    // Transitions seen through a notification are timed. (A transition that
    // a reconciliation read happens to see first is not: its start is
    // unknown. Hence a few tries.)
    let notified = [("target", "orders"), ("cause", "notification")];
    for _ in 0..5 {
        rig.down().await;
        rig.up().await;
        if value(&handle, "thb_detection_latency_seconds_count", &notified).unwrap_or(0.0) >= 1.0 {
            return;
        }
    }
    panic!("no detection latency recorded:\n{}", handle.render());
}
