//! What the examples share: how the flags name the target, logging, the
//! stop signals, the walkthrough helpers and a private `redis-server`. Not
//! an example itself (cargo only builds `examples/*.rs` and
//! `examples/*/main.rs`); each example includes it with
//! `#[path = "common/mod.rs"] mod common;`.

use std::io::IsTerminal;

use tower_heartbeat_buffer::{InvalidName, Target};
use tracing::info;
use tracing_subscriber::EnvFilter;

/// The target named by `--heartbeat-key KEY` or `--service NAME` (clap makes
/// sure exactly one is given), in `namespace`.
pub fn target_from_flags(
    namespace: &str,
    heartbeat_key: Option<&str>,
    service: Option<&str>,
) -> Result<Target, InvalidName> {
    match (heartbeat_key, service) {
        (Some(key), _) => {
            Target::with_namespace(namespace, &target_name_for_key(key))?.with_heartbeat_key(key)
        }
        (None, Some(name)) => Target::with_namespace(namespace, name),
        (None, None) => unreachable!("clap requires one of --heartbeat-key, --service"),
    }
}

/// The buffer's target name for an explicit heartbeat key, the same in every
/// process started with the same key, so that they all share one buffer.
///
/// Rule: a key that is already a valid target name (at most 200 bytes, none
/// of `* ? [ ] \ { }`, no whitespace or control character) is the name as
/// is. Otherwise each invalid character becomes `_`, the result is cut to
/// 183 bytes, and `-` plus the 16 hex digits of the FNV-1a 64 hash of the
/// key's bytes is appended (so distinct keys keep distinct names).
pub fn target_name_for_key(key: &str) -> String {
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

/// Logs to stderr, filtered by `$RUST_LOG` (default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed now,
/// not when the future is first polled.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
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

/// What the short wiring examples (`hyper_client`, `reqwest_client`,
/// `axum_router`) and the `demo` share: the Redis they run against, the way
/// they print an answer and the replay, and the cleanup of their keys.
/// Examples that do not use it (the gateway, the drain) ignore it.
#[allow(dead_code)]
pub mod walkthrough {
    use std::time::Duration;

    use tokio::sync::broadcast::{error::RecvError, Receiver};
    use tower_heartbeat_buffer::replay::{ReplayEvent, ReplayEventKind};
    use tower_heartbeat_buffer::{Buffered, Target, Unavailable};

    /// The Redis named by `$REDIS_URL`. Without it (or with a URL redis-rs
    /// cannot parse) prints what to do and exits with status 2.
    pub fn redis_from_env(example: &str) -> redis::Client {
        let url = std::env::var("REDIS_URL").unwrap_or_default();
        if url.trim().is_empty() {
            eprintln!(
                "the {example} example needs a Redis server: \
                 REDIS_URL=redis://127.0.0.1:6379/ cargo run --example {example}\n\
                 (`cargo run --example demo` starts a private one by itself)"
            );
            std::process::exit(2);
        }
        redis::Client::open(url.as_str()).unwrap_or_else(|e| {
            eprintln!("REDIS_URL={url} is not a Redis URL: {e}");
            std::process::exit(2);
        })
    }

    /// A target name of its own for this run (`<base>-<pid>`), so that runs
    /// against a shared Redis never see each other's buffer.
    pub fn run_target(base: &str) -> Target {
        Target::new(&format!("{base}-{}", std::process::id())).expect("a valid target name")
    }

    /// One line saying who answered `response` and what it means.
    pub fn describe<B>(response: &http::Response<B>) -> String {
        let status = response.status();
        if let Some(buffered) = response.extensions().get::<Buffered>() {
            format!(
                "{status}: stored in Redis as {} (buffer length {}), delivered later",
                buffered.id(),
                buffered.queue_len()
            )
        } else if let Some(unavailable) = response.extensions().get::<Unavailable>() {
            format!(
                "{status}: neither delivered nor stored ({})",
                unavailable.reason()
            )
        } else {
            format!("{status}: answered by the target")
        }
    }

    /// Reads replay events, printing each, until `n` requests were delivered;
    /// fails on a dead letter, or if `within` passes first.
    pub async fn wait_for_replays(
        events: &mut Receiver<ReplayEvent>,
        n: usize,
        within: Duration,
    ) -> Result<(), String> {
        let mut delivered = 0;
        let deadline = tokio::time::Instant::now() + within;
        while delivered < n {
            let event = match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return Err(format!("{delivered} of {n} replayed after {within:?}")),
                Ok(Err(RecvError::Lagged(_))) => continue,
                Ok(Err(RecvError::Closed)) => return Err("the replayer stopped".into()),
                Ok(Ok(event)) => event,
            };
            match event.kind {
                ReplayEventKind::Delivered { status, attempt } => {
                    delivered += 1;
                    println!("  replayed {}: {status} (attempt {attempt})", event.id);
                }
                ReplayEventKind::DeadLettered { reason } => {
                    return Err(format!("{} was dead-lettered: {reason}", event.id))
                }
                other => println!("  replay of {}: {other:?}", event.id),
            }
        }
        Ok(())
    }

    /// Deletes every key of `target` (heartbeat, buffer, dead letters, lease,
    /// processed-markers): `SCAN MATCH <namespace>:{<name>}:*`, then `DEL`.
    /// Target names and namespaces cannot hold glob characters.
    pub async fn remove_keys(client: &redis::Client, target: &Target) -> redis::RedisResult<()> {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let pattern = format!("{}:{{{}}}:*", target.namespace(), target.name());
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        if !keys.is_empty() {
            redis::cmd("DEL").arg(&keys).exec_async(&mut conn).await?;
        }
        Ok(())
    }
}

/// A private `redis-server`, as the `demo` and `idle_targets` run it: on a
/// free loopback port (never 6379), its data in a temp dir, the append-only
/// file fsync'd on every write, keyspace notifications `KA`. Examples that
/// do not use it ignore it.
#[allow(dead_code)]
pub mod private_redis {
    use std::io::{Read, Seek, SeekFrom};
    use std::net::TcpListener;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A running `redis-server`; killed (and reaped), and its temp dir
    /// removed, on drop.
    pub struct PrivateRedis {
        child: Child,
        port: u16,
        url: String,
        /// Holds redis.conf-less state: the AOF and the log; removed on drop,
        /// after the server is killed.
        dir: tempfile::TempDir,
    }

    impl PrivateRedis {
        /// Starts `redis-server` (`$REDIS_SERVER_BIN`, else the one on
        /// `$PATH`) in a new temp dir whose name starts with `prefix`, and
        /// waits (at most 5 s) until it answers `PING`; retries on another
        /// port, up to 5 times, when the one it picked was taken meanwhile.
        ///
        /// When there is no `redis-server`, the message says that
        /// `needed_by` (e.g. "the demo") needs one, followed by
        /// `install_hint`.
        pub fn start(prefix: &str, needed_by: &str, install_hint: &str) -> Result<Self, String> {
            let bin = redis_server_bin(needed_by, install_hint)?;
            let dir = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .map_err(|e| format!("cannot create a temp dir: {e}"))?;
            let mut last_error = String::new();
            for _ in 0..5 {
                let port = free_port()?;
                match start_redis(&bin, dir.path(), port) {
                    Ok(child) => {
                        return Ok(PrivateRedis {
                            child,
                            port,
                            url: format!("redis://127.0.0.1:{port}/"),
                            dir,
                        })
                    }
                    Err(StartError::PortBusy(log)) => last_error = log,
                    Err(StartError::Failed(message)) => return Err(message),
                }
            }
            Err(format!(
                "could not start redis-server on a free port:\n{last_error}"
            ))
        }

        /// `redis://127.0.0.1:PORT/`.
        pub fn url(&self) -> &str {
            &self.url
        }

        pub fn port(&self) -> u16 {
            self.port
        }

        /// The redis-server's process id.
        pub fn pid(&self) -> u32 {
            self.child.id()
        }

        /// Where its AOF and log are.
        pub fn dir(&self) -> &Path {
            self.dir.path()
        }
    }

    impl Drop for PrivateRedis {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// `$REDIS_SERVER_BIN`, else `redis-server` on `$PATH`.
    fn redis_server_bin(needed_by: &str, install_hint: &str) -> Result<PathBuf, String> {
        if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN").filter(|b| !b.is_empty()) {
            let bin = PathBuf::from(bin);
            return match bin.is_file() {
                true => Ok(bin),
                false => Err(format!(
                    "REDIS_SERVER_BIN={} is not a file: {install_hint}",
                    bin.display()
                )),
            };
        }
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| {
                format!("{needed_by} needs redis-server and found none on PATH: {install_hint}")
            })
    }

    /// A port that was free on 127.0.0.1 a moment ago (never 6379).
    fn free_port() -> Result<u16, String> {
        loop {
            let listener = TcpListener::bind(("127.0.0.1", 0))
                .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
            let port = listener.local_addr().map_err(|e| e.to_string())?.port();
            if port != 6379 {
                return Ok(port);
            }
        }
    }

    enum StartError {
        /// The port was taken meanwhile: the log says so.
        PortBusy(String),
        Failed(String),
    }

    /// Starts `redis-server` on `port` with its data in `dir`, and waits
    /// until it answers `PING`.
    fn start_redis(bin: &Path, dir: &Path, port: u16) -> Result<Child, StartError> {
        let log = dir.join("redis.log");
        let log_offset = std::fs::metadata(&log).map_or(0, |m| m.len());
        let mut child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--notify-keyspace-events", "KA", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| StartError::Failed(format!("cannot run {}: {e}", bin.display())))?;
        let tail = || {
            let mut text = String::new();
            if let Ok(mut file) = std::fs::File::open(&log) {
                let _ = file.seek(SeekFrom::Start(log_offset));
                let _ = file.read_to_string(&mut text);
            }
            text
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .map_err(|e| StartError::Failed(e.to_string()))?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = tail();
                return Err(match log.contains("Address already in use") {
                    true => StartError::PortBusy(log),
                    false => StartError::Failed(format!(
                        "redis-server exited at startup ({status}):\n{log}"
                    )),
                });
            }
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn));
            if pong.is_ok_and(|p| p == "PONG") {
                return Ok(child);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(StartError::Failed(format!(
                    "redis-server did not answer within 5 s:\n{}",
                    tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
