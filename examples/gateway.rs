//! A reverse proxy that keeps accepting writes while its target is down.
//!
//! Every request is forwarded to `--target` (same method, path, query, headers
//! and body) through [`HeartbeatBufferLayer`]. While the target's heartbeat
//! lives in Redis, calls go straight through; while it is gone, writes (POST,
//! PUT, PATCH, DELETE) are stored in the target's Redis stream and answered
//! `202 Accepted`, reads get `503`. Bodies stream, except that a write's body
//! (up to `--max-body-bytes`) is held so it can still be stored if the call
//! fails. This gateway only fills the buffer; it does not replay it.
//!
//! ```text
//! cargo run --example gateway -- --listen 127.0.0.1:8080 \
//!     --target http://127.0.0.1:9000 --redis redis://127.0.0.1:6379 \
//!     --service orders                       # watches thb:{orders}:hb
//! #   --heartbeat-key legacy:orders:alive    # or: any existing key
//! ```
//!
//! `--heartbeat-key` names the buffer after the key ([`target_name_for_key`]),
//! so replicas started with the same flags share one buffer.
//! `--redis` defaults to `$REDIS_URL`; logs follow `$RUST_LOG` (default
//! `info`) on stderr. Stdout gets two lines, `buffer target: <name> ...` and
//! `gateway listening on <addr>`. SIGINT or SIGTERM stop it gracefully.

use std::error::Error;
use std::io::IsTerminal;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use clap::{ArgGroup, Parser};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::ServiceExt;
use tower_heartbeat_buffer::{
    DeliveryOrder, Health, HeartbeatBuffer, HeartbeatBufferLayer, RequestBody, Target, Watcher,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE_LEN, DEFAULT_NAMESPACE,
};
use tower_http::trace::TraceLayer;
use tower_layer::Layer;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

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
    /// Redis URL holding the heartbeat and the buffer.
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
    /// Let new writes reach a live target while older ones still wait in the buffer.
    #[arg(long)]
    relaxed: bool,
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

/// The buffer's target name for an explicit heartbeat key, the same in every
/// replica started with the same key, so that they all share one buffer.
///
/// Rule: a key that is already a valid target name (at most 200 bytes, none
/// of `* ? [ ] \ { }`, no whitespace or control character) is the name as
/// is. Otherwise each invalid character becomes `_`, the result is cut to
/// 183 bytes, and `-` plus the 16 hex digits of the FNV-1a 64 hash of the
/// key's bytes is appended (so distinct keys keep distinct names).
fn target_name_for_key(key: &str) -> String {
    let invalid = |c: char| "*?[]\\{}".contains(c) || c.is_whitespace() || c.is_control();
    if key.len() <= 200 && !key.chars().any(invalid) {
        return key.to_owned();
    }
    let mut name = String::new();
    for c in key.chars().map(|c| if invalid(c) { '_' } else { c }) {
        if name.len() + c.len_utf8() > 183 {
            break;
        }
        name.push(c);
    }
    format!("{name}-{:016x}", fnv1a64(key.as_bytes()))
}

/// FNV-1a, 64 bits: stable across Rust versions and platforms, unlike std's hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();

    let target = match (&args.heartbeat_key, &args.service) {
        (Some(key), _) => Target::with_namespace(&args.namespace, &target_name_for_key(key))?
            .with_heartbeat_key(key)?,
        (None, Some(name)) => Target::with_namespace(&args.namespace, name)?,
        (None, None) => unreachable!("clap requires one of --heartbeat-key, --service"),
    };
    println!(
        "buffer target: {} (heartbeat key {}, buffer {})",
        target.name(),
        target.heartbeat_key(),
        target.queue_key()
    );

    // The first read of the heartbeat happens in `build`, before we listen.
    let watcher = Watcher::connect(redis::Client::open(args.redis.as_str())?).await?;
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

    let shutdown = shutdown_signal()?; // installed before anyone can see us ready
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("gateway listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    info!("stopped");
    Ok(())
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

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed now,
/// not when the future is first polled.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            info!("{name}: shutting down");
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        info!("Ctrl-C: shutting down");
    })
}
