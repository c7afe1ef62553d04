//! Calls between services that survive the death of the service being called.
//!
//! A target service proves it is alive by keeping a **heartbeat key** in
//! Redis with a TTL ([`Heartbeat`]). Callers wrap their client for it in
//! [`HeartbeatBufferLayer`], which keeps a local, always-current view of that
//! key ([`Watcher`], [`TargetView`]) and decides each call from memory:
//!
//! - **target up:** the call goes straight through, untouched; no Redis
//!   round trip;
//! - **target down** (key deleted, expired, `status` `draining`/`down`, or
//!   calls failing at the transport level): a request that may be replayed
//!   later is stored in a durable Redis stream and the caller gets
//!   `202 Accepted` at once, with the request's `Idempotency-Key`
//!   ([`Buffered`]); anything else gets `503` ([`Unavailable`]);
//! - **heartbeat back:** a background [replayer](replay) delivers what was
//!   stored — paced, in order, at least once, with the same key.
//!
//! # Example
//!
//! The whole story, run as a doctest against a real `redis-server` (started
//! privately by the hidden lines) and a real HTTP service:
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use hyper_util::client::legacy::{connect::HttpConnector, Client};
//! use hyper_util::rt::TokioExecutor;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_heartbeat_buffer::{
//!     Buffered, Heartbeat, HeartbeatBufferLayer, RequestBody, Target, Watcher,
//! };
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # // A private redis-server on a Unix socket, and an HTTP service that
//! # // counts what it receives.
//! # let dir = std::env::temp_dir().join(format!("thb-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let socket = dir.join("redis.sock");
//! # let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
//! # let mut server = std::process::Command::new(bin)
//! #     .args(["--port", "0", "--save", "", "--notify-keyspace-events", "KA", "--unixsocket"])
//! #     .arg(&socket)
//! #     .stdout(std::process::Stdio::null())
//! #     .spawn()?;
//! # let started = std::time::Instant::now();
//! # while !socket.exists() && started.elapsed() < std::time::Duration::from_secs(10) {
//! #     std::thread::sleep(std::time::Duration::from_millis(5));
//! # }
//! # let redis_url = format!("redis+unix://{}", socket.display());
//! # let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! # let counter = received.clone();
//! # let app = axum::Router::new().fallback(move || {
//! #     counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
//! #     async { "ok" }
//! # });
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let orders_url = format!("http://{}", listener.local_addr()?);
//! # tokio::spawn(async move { axum::serve(listener, app).await });
//! let redis = redis::Client::open(redis_url)?; // e.g. "redis://127.0.0.1:6379/"
//! let orders = Target::new("orders")?; // watches `thb:{orders}:hb`
//!
//! // One watcher per process; every layer and clone shares its views.
//! let watcher = Watcher::connect(redis.clone()).await?;
//! let layer = HeartbeatBufferLayer::builder(orders.clone()).build(&watcher).await?;
//!
//! // The wrapped client receives `RequestBody<B>`: the caller's body, or the
//! // bytes held in memory in case the call must be stored.
//! let client: Client<HttpConnector, RequestBody<Full<Bytes>>> =
//!     Client::builder(TokioExecutor::new()).build_http();
//! let mut orders_client = ServiceBuilder::new()
//!     .layer(layer.clone())
//!     .service(client.clone());
//!
//! // Delivers what gets buffered once orders is back, through the same client.
//! let replayer = layer.replayer().spawn(client);
//!
//! // No heartbeat yet: orders counts as down, and the write is stored.
//! let request = http::Request::post(format!("{orders_url}/orders"))
//!     .body(Full::new(Bytes::from_static(b"{\"sku\":42}")))?;
//! let response = orders_client.ready().await?.call(request).await?;
//! assert_eq!(response.status(), http::StatusCode::ACCEPTED);
//! let buffered = response.extensions().get::<Buffered>().unwrap();
//! println!("orders is down; stored as {}", buffered.id());
//!
//! // Orders starts its heartbeat: the replayer delivers the stored write.
//! let heartbeat = Heartbeat::builder(orders).start(redis)?;
//! # while received.load(std::sync::atomic::Ordering::SeqCst) == 0 || replayer.delivered() == 0 {
//! #     assert!(started.elapsed() < std::time::Duration::from_secs(30), "not replayed");
//! #     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//! # }
//! # assert_eq!(received.load(std::sync::atomic::Ordering::SeqCst), 1);
//!
//! replayer.shutdown().await;
//! heartbeat.shutdown().await?;
//! # server.kill()?;
//! # let _ = server.wait();
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```
//!
//! The target keeps its heartbeat with [`Heartbeat`], or with anything that
//! can `SET thb:{orders}:hb 1 PX 5000` every second or two.
//!
//! # Guarantees
//!
//! - A `202` means the request is in Redis (as durable as the server's
//!   persistence settings and, across a failover, its replication). Anything that could not be stored gets an error
//!   response, never a `202`.
//! - Every request that may be buffered carries an `Idempotency-Key` (the
//!   caller's, or a UUIDv7 assigned before the first attempt), so a forward
//!   that failed ambiguously and is replayed later carries the same key.
//! - In strict order (the default), while the buffer is not empty, new
//!   bufferable requests join it rather than overtake it.
//! - Redis down: calls to a live target still go through; calls that would
//!   need the buffer get a fast `503`; everything resumes by itself.
//!
//! # Placing the layer
//!
//! - Put per-attempt timeouts *below* the layer (between it and the client):
//!   a timed-out attempt is then a failure the layer diverts. A deadline
//!   *above* it bounds the whole call, storing included.
//! - Add credentials below the layer too: `authorization` and `cookie` are
//!   not stored by default ([`policy::NeverStore`]), and each attempt gets
//!   fresh ones.
//! - In an axum app, prefer `Router::route_layer` to `Router::layer`, so
//!   requests for unknown paths get `404` rather than being stored.
//!
//! # One server, a cluster, or Sentinel
//!
//! [`Watcher::connect`] takes a [`Backend`]: `Backend::open` reads
//! `redis://`, `rediss://`, `redis+cluster://host:port,...` and
//! `redis+sentinel://host:port,.../master` (a `redis::Client` converts too).
//! A target's keys share one hash tag, so on a cluster each target lives on
//! one node and its notifications come from there; behind Sentinel the
//! primary is looked up again after a failover. A `202` is as safe as the
//! replication behind it: see
//! [`wait_for_replicas`](HeartbeatBufferBuilder::wait_for_replicas).
//!
//! # Redis data layout
//!
//! See [`target`] for the keys and [`envelope`] for the stored entries; both
//! are public, so programs in any language can publish heartbeats or read
//! the buffer.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod backend;
mod body;
mod breaker;
pub mod envelope;
pub mod error;
mod future;
pub mod heartbeat;
mod id;
mod layer;
pub mod metrics;
mod outcome;
pub mod policy;
mod queue;
pub mod replay;
mod service;
mod sync;
pub mod target;

pub use backend::{Backend, BackendConnection};
pub use body::{BoxError, RequestBody, ResponseBody};
pub use error::{InvalidConfig, InvalidName, MalformedEntry, NameKind, RedisError};
pub use future::ResponseFuture;
pub use heartbeat::{
    Health, Heartbeat, HeartbeatBuilder, HeartbeatFormat, NotificationMode, Status, TargetView,
    Watcher, WatcherBuilder,
};
pub use layer::{
    DeliveryOrder, HeartbeatBufferBuilder, HeartbeatBufferLayer, NoFallback, WithFallback,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE_LEN,
};
pub use outcome::{Buffered, Unavailable, UnavailableReason};
pub use service::HeartbeatBuffer;
pub use target::{HeartbeatSource, Target, DEFAULT_NAMESPACE};
