//! Keeps one target's heartbeat alive in Redis until stopped: what a target
//! service runs beside its work (or a sidecar runs for it), here on its own.
//!
//! ```text
//! cargo run --example heartbeat -- --redis redis://127.0.0.1:6379 \
//!     --service orders                      # writes thb:{orders}:hb
//! #   --instance a                          # or one key per instance: thb:{orders}:hb:a
//! ```
//!
//! The key is a hash (`status up`, `instance`, `version`, `started_at`)
//! with a TTL of `--ttl-ms`, refreshed every third of it. Stdout gets
//! `heartbeat <key> up` once the key has been written. SIGINT (Ctrl-C) or
//! SIGTERM deletes the key, so callers divert at once rather than after the
//! TTL, and exits 0 (1 if Redis could not be reached to delete it: the key
//! then expires by itself). Killing it any other way leaves the key to
//! expire. `--redis` defaults to `$REDIS_URL`; logs follow `$RUST_LOG`
//! (default `info`) on stderr.

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use std::error::Error;
use std::time::Duration;

use clap::Parser;
use tower_heartbeat_buffer::{Backend, Heartbeat, Target, DEFAULT_NAMESPACE};
use tracing::error;

/// Keeps a target's heartbeat key alive in Redis until stopped.
#[derive(Parser, Debug)]
struct Args {
    /// Redis URL holding the heartbeat: `redis://`, `rediss://`,
    /// `redis+cluster://host:port,...` or
    /// `redis+sentinel://host:port,.../MASTER`.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis: String,
    /// The target `NAME`: its heartbeat key is `<namespace>:{NAME}:hb`.
    #[arg(long, value_name = "NAME")]
    service: String,
    /// Write the instance's own key `<namespace>:{NAME}:hb:<INSTANCE>` (for
    /// callers watching a multi-instance target).
    #[arg(long)]
    instance: Option<String>,
    /// Time to live of the key: how long callers keep believing in the
    /// target after this process dies without a word.
    #[arg(long, value_name = "MS", default_value_t = 5_000)]
    ttl_ms: u64,
    /// Key namespace.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    namespace: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    common::init_tracing();
    let args = Args::parse();
    let target = Target::with_namespace(&args.namespace, &args.service)?;
    let mut builder = Heartbeat::builder(target).ttl(Duration::from_millis(args.ttl_ms));
    if let Some(instance) = args.instance {
        builder = builder.instance(instance);
    }
    builder = builder.version(env!("CARGO_PKG_VERSION"));

    let shutdown = common::shutdown_signal()?; // installed before the key exists
    let heartbeat = builder.start(Backend::open(&args.redis)?)?;
    tokio::pin!(shutdown);
    // While Redis does not answer, the heartbeat keeps retrying (and logs
    // it); a signal stops the wait.
    tokio::select! {
        _ = heartbeat.wait_published() => println!("heartbeat {} up", heartbeat.key()),
        _ = &mut shutdown => {
            let _ = heartbeat.shutdown().await;
            return Ok(());
        }
    }

    shutdown.await;
    let key = heartbeat.key().to_owned();
    if let Err(e) = heartbeat.shutdown().await {
        error!(%key, error = %e, "could not delete the heartbeat; it expires after its TTL");
        std::process::exit(1);
    }
    println!("heartbeat {key} deleted");
    Ok(())
}
