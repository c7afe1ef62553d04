//! One process, many targets: connections are shared, not opened per
//! target (counted by the real Redis server).

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::layer_rig::call;
use support::{hyper_client, wait_until, HttpTarget, RedisServer};
use tower_heartbeat_buffer::{HeartbeatBufferLayer, RequestBody, Target, Watcher};
use tower_layer::Layer;

/// Clients connected to `redis`, not counting the harness' own.
fn clients(redis: &RedisServer) -> u64 {
    let info = redis.info("clients");
    let connected: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    connected - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_targets_share_two_connections_and_wait_adds_one_pool() {
    let redis = RedisServer::start();
    let http = HttpTarget::start().await;
    let watcher = Watcher::connect(redis.client()).await.unwrap();
    let mut replayers = Vec::new();
    for (i, wait) in (0..50).map(|i| (i, i % 2 == 0)) {
        let target = Target::new(&format!("t{i}")).unwrap();
        let mut builder = HeartbeatBufferLayer::builder(target);
        if wait {
            // No replica here: WAIT 0 answers at once, but the layer still
            // writes through the connections kept for WAIT.
            builder = builder.wait_for_replicas(1, Duration::from_millis(1));
        }
        let layer = builder.build(&watcher).await.unwrap();
        // Down target: one buffered call opens whatever the layer writes through.
        let mut service = layer.clone().layer(hyper_client());
        let request = Request::post(format!("{}/x", http.url()))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let status = call(&mut service, request).await.unwrap().status;
        let expected = if wait {
            StatusCode::SERVICE_UNAVAILABLE // no replica confirmed
        } else {
            StatusCode::ACCEPTED
        };
        assert_eq!(status, expected);
        replayers.push(
            layer
                .replayer()
                .spawn(hyper_client::<RequestBody<Full<Bytes>>>()),
        );
    }
    // The watcher's connection, the shared data connection, the pool of 8
    // for WAIT: whatever the number of targets.
    assert!(
        wait_until(Duration::from_secs(10), || clients(&redis) == 10).await,
        "{} connections for 50 targets",
        clients(&redis)
    );
}
