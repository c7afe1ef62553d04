//! The layer in front of axum handlers: an orders API whose handlers need a
//! `ledger` service. While the ledger's heartbeat lives, requests reach the
//! handlers; while it is gone, the router stores them in Redis and answers
//! `202 Accepted`; once it is back, the replayer runs the stored requests
//! through the same handlers.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example axum_router
//! ```
//!
//! The API is served on a free port of this process and called over HTTP;
//! the ledger's heartbeat is kept by this process too (target
//! `ledger-<pid>`, keys removed at the end). Exits 0 once the stored request
//! has been replayed.

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::{body::Body, extract::State, http::StatusCode, routing::post, Router};
use bytes::Bytes;
use common::walkthrough::{redis_from_env, remove_keys, run_target, wait_for_replays};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_heartbeat_buffer::{Health, Heartbeat, HeartbeatBufferLayer, Watcher};

/// Records the order in the ledger (here: counts it).
async fn create_order(State(ledger): State<Arc<AtomicUsize>>) -> StatusCode {
    ledger.fetch_add(1, Ordering::SeqCst);
    StatusCode::CREATED
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let redis = redis_from_env("axum_router");
    let ledger = run_target("ledger");
    let beat = || Heartbeat::builder(ledger.clone()).ttl(Duration::from_secs(2));
    let heartbeat = beat().start(redis.clone())?;
    heartbeat.wait_published().await;

    let watcher = Watcher::connect(redis.clone()).await?;
    let layer = HeartbeatBufferLayer::builder(ledger.clone())
        .build(&watcher)
        .await?;
    let recorded = Arc::new(AtomicUsize::new(0));
    let handlers = Router::new()
        .route("/orders", post(create_order))
        .with_state(recorded.clone());
    // `route_layer`, not `layer`: it wraps the matched routes only. With
    // `layer` the fallback is wrapped too, so while the ledger is down a
    // POST to a path nobody handles would be stored and answered 202 (and
    // replayed into a 404 later); with `route_layer` it gets its 404 now.
    let app = handlers.clone().route_layer(layer.clone());
    // Stored requests are replayed into the handlers themselves (the router
    // without the layer), in this process. The router accepts any body type,
    // so name the one the replayer should build.
    let replayer = layer.replayer().spawn::<_, Body, _>(handlers);
    let mut events = replayer.events();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    // Any HTTP client calls the API; it knows nothing of the layer.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let call = async |path: &str| -> Result<(), Box<dyn Error>> {
        let request = http::Request::post(format!("{base}{path}")).body(Full::default())?;
        let response = client.request(request).await?;
        let key = response.headers().get("idempotency-key");
        let key = key.map(|k| format!(", idempotency-key {}", k.to_str().unwrap_or("?")));
        println!(
            "  POST {path} -> {}{}",
            response.status(),
            key.unwrap_or_default()
        );
        Ok(())
    };
    let recorded = || recorded.load(Ordering::SeqCst);

    println!(
        "ledger is up ({}): the handler runs",
        ledger.heartbeat_key()
    );
    call("/orders").await?;

    heartbeat.shutdown().await?; // deletes the key: the layer diverts at once
    layer.view().wait_for(Health::Down).await;
    println!("ledger is down: orders are stored and answered 202, unknown paths still 404");
    call("/orders").await?;
    call("/no-such-path").await?;
    println!("  the handler has recorded {} order(s)", recorded());

    let heartbeat = beat().start(redis.clone())?;
    println!("ledger is back: the stored order runs through the handler");
    wait_for_replays(&mut events, 1, Duration::from_secs(15)).await?;
    println!("  the handler has recorded {} order(s)", recorded());

    replayer.shutdown().await;
    heartbeat.shutdown().await?;
    remove_keys(&redis, &ledger).await?;
    Ok(())
}
