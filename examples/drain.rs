//! A process that only drains one target's buffer: it delivers the requests
//! stored while the target was down (by the `gateway` example, or any caller
//! through [`HeartbeatBufferLayer`](tower_heartbeat_buffer::HeartbeatBufferLayer))
//! once the target's heartbeat is back, and calls nothing else.
//!
//! ```text
//! cargo run --example drain -- --redis redis://127.0.0.1:6379 \
//!     --service orders                       # drains thb:{orders}:queue
//! #   --heartbeat-key legacy:orders:alive    # or: the gateway's --heartbeat-key
//! ```
//!
//! `--service` and `--heartbeat-key` name the buffer exactly as the gateway
//! does, so a drain started with the gateway's flags drains its buffer.
//! Stored requests carry their absolute target URI, so they go out as
//! stored. Several drains may run at once: in strict order (the default)
//! one holds the drain lease and the others wait to take over (after
//! `--lease-ttl-ms` if the holder dies without giving it up); with
//! `--relaxed` they all drain, and entries a dead one had claimed are taken
//! over after `--visibility-ms`. Each delivery is given `--timeout-ms`
//! (by default half the lease TTL, or the visibility timeout), so that a
//! hung target cannot keep an entry past its claim.
//!
//! Stdout gets `drain ready` once the replayer runs, then one line per event:
//! `delivered <id> <status>`, `retrying <id> attempt=<n> after=<ms>ms <reason>`,
//! `dead <id> <reason>`, `skipped <id>`, and `stopped delivered=<n>` at the
//! end. `--redis` defaults to `$REDIS_URL`; logs follow `$RUST_LOG` (default
//! `info`) on stderr. SIGINT or SIGTERM stop it cleanly (in-flight
//! deliveries finish and are acknowledged, the lease is given up), status 0.

#[path = "common/mod.rs"]
mod common;

use std::error::Error;
use std::time::Duration;

use bytes::Bytes;
use clap::{ArgGroup, Parser};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::broadcast::error::RecvError;
use tower::timeout::Timeout;
use tower_heartbeat_buffer::replay::{ReplayConfig, ReplayEvent, ReplayEventKind, Replayer};
use tower_heartbeat_buffer::{
    Backend, DeliveryOrder, Health, RequestBody, Watcher, DEFAULT_NAMESPACE,
};
use tracing::{info, warn};

/// Delivers the requests buffered for one target once its heartbeat is back.
#[derive(Parser, Debug)]
#[command(group(ArgGroup::new("heartbeat").required(true).args(["heartbeat_key", "service"])))]
struct Args {
    /// Redis URL holding the heartbeat and the buffer: `redis://`, `rediss://`,
    /// `redis+cluster://host:port,...` or
    /// `redis+sentinel://host:port,.../MASTER`.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis: String,
    /// Watch this exact key (string or hash); the buffer's name is derived from it as the gateway does.
    #[arg(long, value_name = "KEY")]
    heartbeat_key: Option<String>,
    /// Drain the target `NAME`, whose heartbeat key is `<namespace>:{NAME}:hb`.
    #[arg(long, value_name = "NAME")]
    service: Option<String>,
    /// Key namespace of the buffer (and of `--service`'s heartbeat key).
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// Relaxed order: every drain process delivers, several requests at a time.
    #[arg(long)]
    relaxed: bool,
    /// Strict order: how long the drain lease outlives its holder, so how soon another drain takes over from a dead one.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    lease_ttl_ms: u64,
    /// Relaxed order: how long an entry may stay claimed without an answer before another drain takes it.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    visibility_ms: u64,
    /// Entries read per round trip (and at most redelivered after a crash).
    #[arg(long, default_value_t = ReplayConfig::default().batch)]
    batch: usize,
    /// Consumer name in the buffer's consumer group (default: a fresh id per process).
    #[arg(long, value_name = "NAME")]
    consumer: Option<String>,
    /// Most deliveries per second (default: no limit beyond the slow start).
    #[arg(long, value_name = "N")]
    max_per_second: Option<f64>,
    /// Longest wait for one delivery before it counts as failed and is retried (default: half the lease TTL, or with `--relaxed` half the visibility timeout, so a hung target cannot outlast a claim).
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
}

/// Replays go out through a plain HTTP client (stored URIs are absolute),
/// with a time limit per delivery.
type Upstream = Client<HttpConnector, RequestBody<Full<Bytes>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    common::init_tracing();
    let args = Args::parse();
    if args.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    if args.max_per_second.is_some_and(|n| n.is_nan() || n <= 0.0) {
        return Err("--max-per-second must be positive".into());
    }
    let target = common::target_from_flags(
        &args.namespace,
        args.heartbeat_key.as_deref(),
        args.service.as_deref(),
    )?;
    println!(
        "drain target: {} (heartbeat key {}, buffer {})",
        target.name(),
        target.heartbeat_key(),
        target.queue_key()
    );

    let mut config = ReplayConfig::default();
    config.order = match args.relaxed {
        true => DeliveryOrder::Relaxed,
        false => DeliveryOrder::Strict,
    };
    config.lease_ttl = Duration::from_millis(args.lease_ttl_ms);
    config.visibility_timeout = Duration::from_millis(args.visibility_ms);
    config.batch = args.batch;
    config.consumer = args.consumer;
    config.max_per_second = args.max_per_second;
    let timeout = match (args.timeout_ms, args.relaxed) {
        (Some(ms), _) => Duration::from_millis(ms),
        (None, false) => config.lease_ttl / 2,
        (None, true) => config.visibility_timeout / 2,
    };

    let shutdown = common::shutdown_signal()?; // installed before anyone can see us ready
    let watcher = Watcher::connect(Backend::open(&args.redis)?).await?;
    let builder = Replayer::builder(&watcher, &target).await?.config(config);
    match watcher.watch(&target).await.health() {
        Health::Unknown => {
            warn!(key = %target.heartbeat_key(), "Redis did not answer yet: health unknown")
        }
        health => info!(key = %target.heartbeat_key(), %health, "heartbeat loaded"),
    }
    let client: Upstream = Client::builder(TokioExecutor::new()).build_http();
    let replayer = builder.spawn(Timeout::new(client, timeout));
    let mut events = replayer.events();
    let printer = tokio::spawn(async move {
        let mut delivered = 0u64;
        loop {
            match events.recv().await {
                Ok(event) => {
                    if matches!(event.kind, ReplayEventKind::Delivered { .. }) {
                        delivered += 1;
                    }
                    println!("{}", event_line(&event));
                }
                Err(RecvError::Lagged(n)) => warn!(missed = n, "event printer fell behind"),
                Err(RecvError::Closed) => return delivered,
            }
        }
    });
    info!(consumer = replayer.consumer(), "draining");
    println!("drain ready");

    shutdown.await;
    replayer.shutdown().await;
    // The replayer is gone, so its event channel closes once the printer
    // has written the last events.
    let delivered = printer.await?;
    println!("stopped delivered={delivered}");
    info!("stopped");
    Ok(())
}

/// One stdout line for `event`.
fn event_line(event: &ReplayEvent) -> String {
    let id = &event.id;
    match &event.kind {
        ReplayEventKind::Delivered { status, .. } => format!("delivered {id} {}", status.as_u16()),
        ReplayEventKind::Retrying {
            attempt,
            after,
            reason,
        } => format!(
            "retrying {id} attempt={attempt} after={}ms {reason}",
            after.as_millis()
        ),
        ReplayEventKind::DeadLettered { reason } => format!("dead {id} {reason}"),
        ReplayEventKind::Skipped => format!("skipped {id}"),
        other => format!("event {id} {other:?}"),
    }
}
