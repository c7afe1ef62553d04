//! A reverse proxy that keeps accepting writes while its target is down.
//!
//! Every request is forwarded to `--target` (same method, path, query, headers
//! and body) through [`HeartbeatBufferLayer`]. While the target's heartbeat
//! lives in Redis, calls go straight through; while it is gone, writes (POST,
//! PUT, PATCH, DELETE) are stored in the target's Redis stream and answered
//! `202 Accepted`, reads get `503`. Bodies stream, except that a write's body
//! (up to `--max-body-bytes`) is held so it can still be stored if the call
//! fails.
//!
//! It also drains the buffer: a replayer delivers the stored requests
//! through the same client once the heartbeat is back (oldest first, each
//! with its `Idempotency-Key`; concurrently with `--relaxed`). Replicas share
//! the work: in strict order one of them drains at a time. `--no-replay`
//! leaves the buffer to a separate process (the `drain` example).
//!
//! ```text
//! cargo run --example gateway -- --listen 127.0.0.1:8080 \
//!     --target http://127.0.0.1:9000 --redis redis://127.0.0.1:6379 \
//!     --service orders                       # watches thb:{orders}:hb
//! #   --heartbeat-key legacy:orders:alive    # or: any existing key
//! ```
//!
//! `--heartbeat-key` names the buffer after the key
//! ([`common::target_name_for_key`]),
//! so replicas started with the same flags share one buffer.
//!
//! `--metrics-listen ADDR` (e.g. `127.0.0.1:9464`; port 0 picks a free one)
//! serves the crate's metrics ([`tower_heartbeat_buffer::metrics`]:
//! `thb_forwarded_total`, `thb_buffered_total`, `thb_target_up`,
//! `thb_queue_depth`, ...) in the Prometheus text format at `GET /metrics`
//! on a second, separate listener, stopped with the gateway. Without the
//! flag no recorder is installed and recording metrics is a no-op.
//!
//! `--redis` defaults to `$REDIS_URL`; logs follow `$RUST_LOG` (default
//! `info`) on stderr. Stdout gets `buffer target: <name> ...`, then
//! `metrics listening on <addr>` (with `--metrics-listen` only), then
//! `gateway listening on <addr>` once both are bound. SIGINT or SIGTERM stop
//! it gracefully: it stops accepting, lets in-flight calls and replays finish
//! (the replayer acknowledges what it delivered and gives up its lease),
//! stops the metrics listener, and exits 0.

#[path = "common/mod.rs"]
mod common;

use std::error::Error;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::{ArgGroup, Parser};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::timeout::Timeout;
use tower::ServiceExt;
use tower_heartbeat_buffer::replay::ReplayConfig;
use tower_heartbeat_buffer::{
    Backend, DeliveryOrder, Health, HeartbeatBuffer, HeartbeatBufferLayer, RequestBody, Watcher,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE_LEN, DEFAULT_NAMESPACE,
};
use tower_http::trace::TraceLayer;
use tower_layer::Layer;
use tracing::{info, warn};

/// Reverse proxy that buffers writes in Redis while the target's heartbeat is gone.
#[derive(Parser, Debug)]
#[command(group(ArgGroup::new("heartbeat").required(true).args(["heartbeat_key", "service"])))]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Base URL of the target, `http://host:port` (no path): requests keep their own path and query.
    #[arg(long, value_parser = parse_target)]
    target: Uri,
    /// Redis URL holding the heartbeat and the buffer: `redis://`, `rediss://`,
    /// `redis+cluster://host:port,...` or
    /// `redis+sentinel://host:port,.../MASTER`.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis: String,
    /// Watch this exact key (string or hash); the buffer's name is derived from it.
    #[arg(long, value_name = "KEY")]
    heartbeat_key: Option<String>,
    /// Watch the target `NAME`, whose heartbeat key is `<namespace>:{NAME}:hb`.
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    /// Key namespace of the buffer (and of `--service`'s heartbeat key).
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Largest body buffered while the target is down; larger ones get 413.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Most requests the buffer may hold; beyond it, writes get 503.
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUE_LEN)]
    max_queue_len: u64,
    /// Let new writes reach a live target while older ones still wait in the buffer (and replay concurrently).
    #[arg(long)]
    relaxed: bool,
    /// Only fill the buffer; leave replaying it to another process (e.g. the `drain` example).
    #[arg(long)]
    no_replay: bool,
    /// Strict order: how long the drain lease lives without renewal, so how fast another
    /// replica takes over from a dead one.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    lease_ttl_ms: u64,
    /// Relaxed order: how long an entry may stay claimed by a silent replica before another takes it.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    visibility_ms: u64,
    /// Also serve Prometheus metrics at `GET /metrics` on this address (port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

fn parse_target(value: &str) -> Result<Uri, String> {
    let uri: Uri = value.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme() != Some(&Scheme::HTTP) || uri.authority().is_none() {
        return Err("expected http://host:port".into());
    }
    if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
        return Err("must not have a path or query".into());
    }
    Ok(uri)
}

type Upstream = HeartbeatBuffer<Client<HttpConnector, RequestBody<Body>>>;

#[derive(Clone)]
struct Proxy {
    upstream: Upstream,
    scheme: Scheme,
    authority: Authority,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    common::init_tracing();
    let args = Args::parse();

    let target = common::target_from_flags(
        &args.namespace,
        args.heartbeat_key.as_deref(),
        args.service.as_deref(),
    )?;
    println!(
        "buffer target: {} (heartbeat key {}, buffer {})",
        target.name(),
        target.heartbeat_key(),
        target.queue_key()
    );

    // The recorder goes first: the watcher, the layer and the replayer
    // register their metrics when they are built.
    let prometheus = match args.metrics_listen {
        Some(addr) => Some((addr, install_prometheus_recorder()?)),
        None => None,
    };

    // The first read of the heartbeat happens in `build`, before we listen.
    let watcher = Watcher::connect(Backend::open(&args.redis)?).await?;
    let order = match args.relaxed {
        true => DeliveryOrder::Relaxed,
        false => DeliveryOrder::Strict,
    };
    let layer = HeartbeatBufferLayer::builder(target.clone())
        .max_body_bytes(args.max_body_bytes)
        .max_queue_len(args.max_queue_len)
        .order(order)
        .build(&watcher)
        .await?;
    match layer.view().health() {
        Health::Unknown => {
            warn!(key = %target.heartbeat_key(), "Redis did not answer yet: health unknown")
        }
        health => info!(key = %target.heartbeat_key(), %health, "heartbeat loaded"),
    }

    let client = Client::builder(TokioExecutor::new()).build_http();
    // Replays go through the same client; stored requests carry the
    // target's absolute URI (see `forward`), so they need no rewriting.
    // Each replay gets half the drain lease (strict) or of the visibility
    // timeout (relaxed): a hung target must not keep an entry past its claim.
    let replayer = (!args.no_replay).then(|| {
        let mut config = ReplayConfig::default();
        config.order = order;
        config.lease_ttl = Duration::from_millis(args.lease_ttl_ms.max(100));
        config.visibility_timeout = Duration::from_millis(args.visibility_ms.max(100));
        let timeout = match order {
            DeliveryOrder::Relaxed => config.visibility_timeout / 2,
            _ => config.lease_ttl / 2,
        };
        let replays = Timeout::new(client.clone(), timeout);
        layer.replayer().config(config).spawn(replays)
    });
    let parts = args.target.into_parts();
    let proxy = Proxy {
        upstream: layer.layer(client),
        scheme: parts.scheme.expect("checked by parse_target"),
        authority: parts.authority.expect("checked by parse_target"),
    };
    let app = Router::new()
        .fallback(forward)
        .with_state(proxy)
        .layer(TraceLayer::new_for_http());

    let shutdown = common::shutdown_signal()?; // installed before anyone can see us ready
    let metrics_server = match prometheus {
        Some((addr, handle)) => Some(serve_metrics(addr, handle).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("gateway listening on {}", listener.local_addr()?);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    // Calls are over (or serving failed): stop replaying too. In-flight
    // replays finish within the replayer's grace period and are
    // acknowledged; the rest stays in the buffer for the next replayer.
    if let Some(replayer) = replayer {
        replayer.shutdown().await;
        info!("replayer stopped");
    }
    // Metrics stay scrapable until the replayer has stopped.
    if let Some(metrics_server) = metrics_server {
        metrics_server.stop().await;
    }
    served?;
    info!("stopped");
    Ok(())
}

/// Installs a Prometheus recorder as the global `metrics` recorder; the
/// handle renders what it holds.
fn install_prometheus_recorder() -> Result<PrometheusHandle, Box<dyn Error>> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)?;
    Ok(handle)
}

/// How long the metrics listener may take to stop.
const METRICS_GRACE: Duration = Duration::from_secs(5);

/// The `--metrics-listen` server, running.
struct MetricsServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Stops accepting and lets a scrape in progress finish, for at most
    /// [`METRICS_GRACE`]: a stuck scraper does not hold the exit.
    async fn stop(mut self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(METRICS_GRACE, &mut self.task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "metrics server task failed"),
            Err(_) => {
                warn!("metrics connections still open after {METRICS_GRACE:?}: closed");
                self.task.abort();
            }
        }
    }
}

/// Binds `addr`, prints `metrics listening on <addr>`, and serves
/// `GET /metrics` (Prometheus text format) until stopped.
async fn serve_metrics(
    addr: SocketAddr,
    handle: PrometheusHandle,
) -> Result<MetricsServer, Box<dyn Error>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    println!("metrics listening on {bound}");
    info!(addr = %bound, "serving metrics at /metrics");

    // Without the exporter's own listener nobody runs its upkeep (which
    // keeps histograms from growing without bound): do it here.
    let upkeep = handle.clone();
    let upkeep_task = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });

    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    )],
                    handle.render(),
                )
            }
        }),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        upkeep_task.abort();
        if let Err(e) = served {
            warn!(error = %e, "metrics server failed");
        }
    });
    Ok(MetricsServer { stop, task })
}

/// Forwards one request to the target through the layer.
async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = match Uri::builder()
        .scheme(proxy.scheme.clone())
        .authority(proxy.authority.clone())
        .path_and_query(path_and_query)
        .build()
    {
        Ok(uri) => uri,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("bad request target: {e}")).into_response()
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    let host =
        HeaderValue::from_str(proxy.authority.as_str()).expect("an authority is a valid header");
    parts.headers.insert(header::HOST, host);

    match proxy
        .upstream
        .oneshot(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            warn!(error = %e, "target unreachable");
            (StatusCode::BAD_GATEWAY, "bad gateway: target unreachable\n").into_response()
        }
    }
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1):
/// the fixed list plus whatever `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    const HOP_BY_HOP: [HeaderName; 9] = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ];
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}
