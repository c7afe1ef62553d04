//! The layer over a hyper-util client: up → forwarded, down → `202` and
//! stored, back up → replayed.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example hyper_client
//! ```
//!
//! The target is an axum app on a free port of this process; its heartbeat
//! is kept by this process too (target `orders-<pid>`, keys removed at the
//! end). Exits 0 once the stored request has been replayed.

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::{extract::State, http::StatusCode, routing::post, Router};
use bytes::Bytes;
use common::walkthrough::{describe, redis_from_env, remove_keys, run_target, wait_for_replays};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_heartbeat_buffer::{Health, Heartbeat, HeartbeatBufferLayer, RequestBody, Watcher};

/// The target's only handler: counts the orders it receives.
async fn create_order(State(received): State<Arc<AtomicUsize>>) -> StatusCode {
    received.fetch_add(1, Ordering::SeqCst);
    StatusCode::CREATED
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let redis = redis_from_env("hyper_client");
    let target = run_target("orders");

    // The target, on a free port, and its heartbeat.
    let received = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/orders", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let beat = || Heartbeat::builder(target.clone()).ttl(Duration::from_secs(2));
    let heartbeat = beat().start(redis.clone())?;
    heartbeat.wait_published().await;

    // The caller: the layer over the client the caller would use anyway. The
    // client is typed over the layer's body, `RequestBody<B>`.
    let watcher = Watcher::connect(redis.clone()).await?;
    let layer = HeartbeatBufferLayer::builder(target.clone())
        .build(&watcher)
        .await?;
    let client: Client<HttpConnector, RequestBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let orders = ServiceBuilder::new()
        .layer(layer.clone())
        .service(client.clone());
    // The replayer delivers through the same client once the target is back.
    let replayer = layer.replayer().spawn(client);
    let mut events = replayer.events();
    let received = || received.load(Ordering::SeqCst);
    let send = |body: &'static str| {
        let request =
            http::Request::post(&url).body(Full::new(Bytes::from_static(body.as_bytes())));
        orders.clone().oneshot(request.expect("a valid request"))
    };

    println!("orders is up ({}):", target.heartbeat_key());
    println!("  POST -> {}", describe(&send("{\"sku\":1}").await?));

    heartbeat.shutdown().await?; // deletes the key: callers divert at once
    layer.view().wait_for(Health::Down).await;
    println!("orders is down (heartbeat deleted):");
    println!("  POST -> {}", describe(&send("{\"sku\":2}").await?));
    println!("  the target has received {} order(s)", received());

    let heartbeat = beat().start(redis.clone())?;
    println!("orders is back (heartbeat published again):");
    wait_for_replays(&mut events, 1, Duration::from_secs(15)).await?;
    println!("  the target has received {} order(s)", received());

    replayer.shutdown().await;
    heartbeat.shutdown().await?;
    remove_keys(&redis, &target).await?;
    Ok(())
}
