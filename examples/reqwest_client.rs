//! The layer over reqwest: up → forwarded, down → `202` and stored, back up
//! → replayed.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example reqwest_client
//! ```
//!
//! `reqwest::Client` is a `Service<reqwest::Request>`; the layer wraps a
//! `Service<http::Request<_>>`. The recommended wiring is the small adapter
//! below, [`Reqwest`]: it converts the request with `reqwest::Body::wrap` and
//! `reqwest::Request::try_from`, and the answer with `http::Response::from`,
//! keeping reqwest's own error type (so transport failures are diverted
//! like hyper's). reqwest needs a `Sync` body: `Full<Bytes>` is one.
//!
//! The target is an axum app on a free port of this process, and its
//! heartbeat is kept by this process too (target `orders-<pid>`, keys
//! removed at the end). Exits 0 once the stored request has been replayed.

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::error::Error;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::{http::StatusCode, routing::post, Router};
use bytes::Bytes;
use common::walkthrough::{describe, redis_from_env, remove_keys, run_target, wait_for_replays};
use futures_util::future::BoxFuture;
use http_body_util::Full;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_heartbeat_buffer::{BoxError, Health, Heartbeat, HeartbeatBufferLayer, Watcher};

/// A `reqwest::Client` as a `Service<http::Request<B>>`.
#[derive(Clone)]
struct Reqwest(reqwest::Client);

impl<B> Service<http::Request<B>> for Reqwest
where
    B: http_body::Body + Send + Sync + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<reqwest::Request>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::wrap));
        let response = request.map(|request| self.0.call(request));
        Box::pin(async move { Ok(http::Response::from(response?.await?)) })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let redis = redis_from_env("reqwest_client");
    let target = run_target("orders");

    // The target, on a free port.
    let app = Router::new().route("/orders", post(|| async { StatusCode::CREATED }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/orders", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let beat = || Heartbeat::builder(target.clone()).ttl(Duration::from_secs(2));
    let heartbeat = beat().start(redis.clone())?;
    heartbeat.wait_published().await;

    // The caller. `no_proxy`: an HTTP_PROXY in the environment must not
    // catch calls to loopback.
    let watcher = Watcher::connect(redis.clone()).await?;
    let layer = HeartbeatBufferLayer::builder(target.clone())
        .build(&watcher)
        .await?;
    let client = Reqwest(reqwest::Client::builder().no_proxy().build()?);
    let orders = ServiceBuilder::new()
        .layer(layer.clone())
        .service(client.clone());
    // Replays go out through the same adapter. `Reqwest` accepts any body
    // type, so name the one the replayer should build (`Full<Bytes>`).
    let replayer = layer.replayer().spawn::<_, Full<Bytes>, _>(client);
    let mut events = replayer.events();
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

    let heartbeat = beat().start(redis.clone())?;
    println!("orders is back (heartbeat published again):");
    wait_for_replays(&mut events, 1, Duration::from_secs(15)).await?;

    replayer.shutdown().await;
    heartbeat.shutdown().await?;
    remove_keys(&redis, &target).await?;
    Ok(())
}
