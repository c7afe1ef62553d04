//! A chaos run: thousands of writes through two `gateway` processes (caller
//! replicas sharing one buffer) while everything around them fails.
//!
//! ```text
//! cargo run --release --example chaos -- --requests 10000 --seed 42
//! ```
//!
//! What it sets up, all private to the run (needs `redis-server`, like the
//! tests; `REDIS_SERVER_BIN` picks another one):
//!
//! - a real `redis-server` with `appendonly yes` + `appendfsync always`
//!   (the test support's [`RedisServer`]);
//! - a real HTTP target ([`HttpTarget`]) answering `200` and recording
//!   every request it receives, in arrival order; its heartbeat key
//!   `chaos:orders:alive` is kept by this process (`SET key 1 PX ttl`,
//!   refreshed every ttl/4 while the target is up);
//! - two `gateway` example processes (`--heartbeat-key chaos:orders:alive`,
//!   strict order, replay on), built with cargo unless `--gateway-bin` is
//!   given;
//! - `--clients` client tasks sending `--requests` POSTs, paced evenly over
//!   `--duration-secs`, each client sequential (a request is sent once the
//!   previous one was answered) and alternating between the two gateways.
//!   Request `n` has body `chaos <seed> <n>`; three in four carry an
//!   `Idempotency-Key` of their own (`chaos-<seed>-<n>`), the others get
//!   one from the layer.
//!
//! Faults, on a schedule drawn from the seed:
//!
//! - the target flaps for the whole load phase: up for 100–800 ms, then
//!   down for 100–800 ms (`--flap-min-ms`, `--flap-max-ms`); a death is
//!   graceful (`DEL` of the heartbeat key, then the server stops) or abrupt
//!   (the server stops with every connection, the key is left to expire).
//!   One up period in seven or so (`--long-up-chance`) lasts 2–4 s
//!   (`--long-up-ms`): under steady flapping the replayer, which restarts
//!   its slow start at every return, falls behind, and in strict order
//!   every new write then joins the buffer; the long periods let the buffer
//!   empty and forwarding resume, which is where strict order is at risk;
//! - Redis is SIGKILLed and restarted (same port and AOF) `--redis-kills`
//!   times, down for 0.2–1.5 s each time;
//! - a gateway is SIGKILLed and restarted (same port) `--caller-kills`
//!   times, down for 0.1–1 s each time; the first, third, ... kill hits the
//!   replica holding the strict drain lease (found from the lease's value,
//!   the consumer name its replayer logs), so that the other one has to
//!   take the drain over — after the gateway's lease TTL (10 s, it has no
//!   flag for it), during which nothing is replayed.
//!
//! Faults overlap: the target keeps flapping while Redis or a gateway is
//! down; Redis and gateway faults are one at a time (a gateway that starts
//! while Redis is down exits).
//!
//! Then the target comes up for good, and the run waits (at most
//! `--drain-timeout-secs`) until every acknowledged request was delivered
//! and the buffer is empty, stops both gateways with SIGTERM, and checks:
//!
//! - **lost**: requests answered `202` or `2xx` that the target never
//!   received;
//! - **duplicates**: receptions beyond the first of a request, counted;
//!   every reception of a request must carry the same idempotency key
//!   (the client's, or the one the layer assigned and returned with the
//!   `202`), otherwise it is a **key mismatch**;
//! - **order violations** (strict order only): for the acknowledged
//!   requests one client sent through one gateway (across its restarts),
//!   in send order, the first receptions at the target must come in that
//!   same order. That is what strict order promises: a request answered
//!   `202` is in the buffer, and while the buffer is not empty every later
//!   write through a replica that knows it (the one that stored it, or one
//!   started after) joins the buffer behind it; the buffer is delivered
//!   oldest first, one request at a time. Requests a client sent through
//!   *different* gateways are only ordered once the second gateway has seen
//!   the first one's append (a keyspace notification, about a millisecond,
//!   or its own poll of the buffer's length): their reorderings are counted
//!   as `cross_gateway_reorders`, information, not violations — unless
//!   `--cross-gateway-strict-ms MS` is given: then a reorder where the
//!   later request was sent more than `MS` after the earlier one was
//!   answered is a violation too;
//! - **stranded**: entries left in the buffer or claimed in the consumer
//!   group (`XLEN`, `XPENDING`) at the end; **dead letters** (entries the
//!   replayer gave up on).
//!
//! Stdout gets exactly one line, the summary:
//!
//! ```text
//! chaos seed=S requests=N acknowledged=A delivered=D lost=L duplicates=X order_violations=O faults=redis_kills:R caller_kills:C target_flaps:F stranded=0 dead_letters=0 key_mismatches=0 cross_gateway_reorders=0 result=ok elapsed=125.1s
//! ```
//!
//! Everything else (the seed first, progress, the outcome breakdown, the
//! evidence of a failure) goes to stderr. The exit status is 0 when every
//! check passed, 1 when one failed (lost, order violation, stranded or
//! dead-lettered entries, key mismatch, unknown bodies, drain timeout, too
//! few faults injected), 2 on a setup error. The run directory (gateway
//! logs, `timeline.log`, `requests.tsv`, `received.tsv`) is kept when a
//! check fails or with `--keep-logs`, and its path printed.
//!
//! The seed fixes the schedule (flaps, faults, which requests carry a key),
//! not the interleaving of real processes: a rerun with the same seed is a
//! similar run, not the same one.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use redis::aio::ConnectionManager;
use support::{hyper_client, HttpTarget, HyperClient, RedisServer};
use tower_heartbeat_buffer::{Target, DEFAULT_NAMESPACE};

/// The heartbeat key the target keeps and the gateways watch; a valid
/// target name as it is, so the gateways' buffer is `thb:{<key>}:queue`.
const HEARTBEAT_KEY: &str = "chaos:orders:alive";
/// The consumer group of the replayers.
const GROUP: &str = tower_heartbeat_buffer::replay::CONSUMER_GROUP;
/// Longest wait for one answer from a gateway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest start of one gateway process (until it listens).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest graceful stop of one gateway after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for one Redis command of the run itself.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// Once the buffer is empty and nothing is claimed for this long while
/// acknowledged requests are still missing, nothing will bring them: they
/// are lost, no need to wait for the drain timeout.
const QUIET_GIVE_UP: Duration = Duration::from_secs(5);

/// A seeded chaos run through two gateway replicas (see the module docs).
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Requests to send in all.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Seed of the schedule (default: drawn from the clock, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the load phase, over which the requests are paced evenly
    /// (default: requests / 80, at least 20 s).
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Concurrent clients, each sending one request at a time.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Redis SIGKILL + restarts (default: one per 30 s of load, at least 2).
    #[arg(long)]
    redis_kills: Option<u32>,
    /// Gateway SIGKILL + restarts (default: one per 30 s of load, at least 2).
    #[arg(long)]
    caller_kills: Option<u32>,
    /// Shortest up or down period of the target.
    #[arg(long, default_value_t = 100)]
    flap_min_ms: u64,
    /// Longest up or down period of the target.
    #[arg(long, default_value_t = 800)]
    flap_max_ms: u64,
    /// Chance that an up period is a long one (`--long-up-ms`): long enough
    /// for the replayer to empty the buffer, so that forwarding resumes and
    /// strict order is tested where the buffer empties and fills again.
    #[arg(long, default_value_t = 0.15)]
    long_up_chance: f64,
    /// Longest long up period (the shortest is half of it).
    #[arg(long, default_value_t = 4000)]
    long_up_ms: u64,
    /// TTL of the target's heartbeat key (refreshed every ttl/4 while up).
    #[arg(long, default_value_t = 400)]
    heartbeat_ttl_ms: u64,
    /// Share of the target's deaths that are abrupt (key left to expire).
    #[arg(long, default_value_t = 0.5)]
    abrupt: f64,
    /// Longest wait, after the load, for every acknowledged request to be
    /// delivered and the buffer to empty.
    #[arg(long, default_value_t = 90)]
    drain_timeout_secs: u64,
    /// The gateway executable (default: `cargo build --example gateway`,
    /// release if this run is a release build).
    #[arg(long, value_name = "PATH")]
    gateway_bin: Option<PathBuf>,
    /// Count a reorder of two requests a client sent through different
    /// gateways as an order violation when the later one was sent more than
    /// this many milliseconds after the earlier one was answered `202`
    /// (default: such reorders are information only; see the module docs).
    #[arg(long, value_name = "MS")]
    cross_gateway_strict_ms: Option<u64>,
    /// Run the gateways with `--relaxed` (order is then not checked).
    #[arg(long)]
    relaxed: bool,
    /// Where to write logs and the record of the run (default: a new
    /// directory under the system's temp dir, removed after a passing run
    /// unless `--keep-logs`).
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
    /// Keep the run directory even when every check passed.
    #[arg(long)]
    keep_logs: bool,
    /// `RUST_LOG` of the gateways (their logs are in the run directory).
    #[arg(long, default_value = "info,tower_heartbeat_buffer=debug")]
    gateway_log: String,
    /// Also print every flap and fault on stderr as it happens.
    #[arg(long)]
    verbose: bool,
}

fn main() {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        mix(now.as_nanos() as u64 ^ u64::from(std::process::id()))
    });
    eprintln!("chaos: seed {seed} (rerun with --seed {seed})");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(args, seed)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("chaos: setup failed: {e}");
            2
        }
    };
    // Every child (gateways, redis-server) was dropped, and so killed, by now.
    runtime.shutdown_timeout(Duration::from_secs(5));
    std::process::exit(code);
}

// ------------------------------------------------------------------ seeded

/// SplitMix64 finalizer: a well-mixed u64 from any u64.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small seeded generator (SplitMix64); one stream per component, so the
/// flap schedule does not depend on the fault schedule and so on.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Self {
        Rng(mix(seed ^ mix(stream)))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..1`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in `lo..=hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

/// Whether request `n` carries an idempotency key of its own (three in
/// four); the others get one from the layer.
fn has_own_key(seed: u64, n: usize) -> bool {
    !mix(seed ^ mix(n as u64 ^ 0x6b65_7973)).is_multiple_of(4)
}

fn own_key(seed: u64, n: usize) -> String {
    format!("chaos-{seed}-{n}")
}

fn body_of(seed: u64, n: usize) -> String {
    format!("chaos {seed} {n}")
}

/// The request number in a body sent by this run.
fn parse_body(seed: u64, body: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = text.strip_prefix("chaos ")?;
    let (s, n) = rest.split_once(' ')?;
    (s.parse::<u64>().ok()? == seed).then_some(())?;
    n.parse().ok()
}

// ---------------------------------------------------------------- timeline

/// What happened when, in milliseconds since the start: written to
/// `timeline.log`, shown next to the evidence of a failure.
struct Timeline {
    start: Instant,
    events: Mutex<Vec<(u64, String)>>,
    verbose: bool,
}

impl Timeline {
    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    fn note(&self, what: impl Into<String>) {
        let what = what.into();
        let ms = self.now_ms();
        if self.verbose {
            eprintln!("chaos: {:>8.3}s {what}", ms as f64 / 1000.0);
        }
        lock(&self.events).push((ms, what));
    }

    /// Important events: always on stderr.
    fn announce(&self, what: impl Into<String>) {
        let what = what.into();
        let ms = self.now_ms();
        eprintln!("chaos: {:>8.3}s {what}", ms as f64 / 1000.0);
        lock(&self.events).push((ms, what));
    }

    fn around(&self, from_ms: u64, to_ms: u64) -> Vec<String> {
        lock(&self.events)
            .iter()
            .filter(|(ms, _)| *ms + 1500 >= from_ms && *ms <= to_ms + 1500)
            .map(|(ms, what)| format!("{:>8.3}s {what}", *ms as f64 / 1000.0))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ------------------------------------------------------------------- redis

/// The run's own Redis connection (heartbeat, queue checks): reconnects
/// after a restart; every command has a deadline.
#[derive(Clone)]
struct Admin {
    conn: ConnectionManager,
}

impl Admin {
    async fn connect(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| format!("connecting to {url}: {e}"))?;
        Ok(Admin { conn })
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, String> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timeout".into()),
        }
    }

    async fn xlen(&self, key: &str) -> Result<u64, String> {
        self.query(redis::cmd("XLEN").arg(key)).await
    }

    /// Entries claimed in the consumer group and not acknowledged (0 when
    /// the group or the stream does not exist).
    async fn pending(&self, queue: &str) -> Result<u64, String> {
        let reply: Result<redis::Value, String> = self
            .query(redis::cmd("XPENDING").arg(queue).arg(GROUP))
            .await;
        match reply {
            Ok(redis::Value::Array(summary)) => match summary.first() {
                Some(redis::Value::Int(n)) => Ok(*n as u64),
                other => Err(format!("XPENDING: {other:?}")),
            },
            Ok(other) => Err(format!("XPENDING: {other:?}")),
            Err(e) if e.contains("NOGROUP") => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// Keeps the target's heartbeat key while `alive`; changes of `alive` and
/// the writes they need are serialized with the refreshes (one lock), so a
/// refresh can never land after the `DEL` of a graceful death.
struct Heartbeat {
    admin: Admin,
    ttl: Duration,
    /// Whether the key is being kept alive.
    alive: tokio::sync::Mutex<bool>,
}

impl Heartbeat {
    fn set_cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("SET");
        cmd.arg(HEARTBEAT_KEY)
            .arg("1")
            .arg("PX")
            .arg(self.ttl.as_millis() as u64);
        cmd
    }

    /// Up: set the key now and keep refreshing it.
    async fn up(&self) -> Result<(), String> {
        let mut alive = self.alive.lock().await;
        *alive = true;
        self.admin.query::<()>(&self.set_cmd()).await
    }

    /// Stop refreshing; with `delete`, also `DEL` the key (graceful).
    async fn down(&self, delete: bool) -> Result<(), String> {
        let mut alive = self.alive.lock().await;
        *alive = false;
        if delete {
            self.admin
                .query::<()>(redis::cmd("DEL").arg(HEARTBEAT_KEY))
                .await
        } else {
            Ok(())
        }
    }

    async fn refresh_forever(self: Arc<Self>) {
        let mut every = tokio::time::interval(self.ttl / 4);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let alive = self.alive.lock().await;
            if *alive {
                // Redis may be down: the key then expires, as it would.
                let _ = self.admin.query::<()>(&self.set_cmd()).await;
            }
            drop(alive);
        }
    }
}

// ----------------------------------------------------------------- gateway

/// The gateway executable: `--gateway-bin`, or built by cargo like the
/// tests do (`$CARGO build --example gateway`, json messages, the
/// `executable` cargo reports).
fn gateway_bin(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let started = Instant::now();
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").into()));
    cargo
        .args(["build", "--quiet", "--example", "gateway"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .stdin(Stdio::null());
    if !cfg!(debug_assertions) {
        cargo.arg("--release");
    }
    let output = cargo
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo build --example gateway failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .filter(|line| {
            line.contains(r#""reason":"compiler-artifact""#)
                && line.contains(r#""kind":["example"]"#)
                && line.contains(r#""name":"gateway""#)
        })
        .find_map(|line| json_string_after(line, r#""executable":""#))
        .ok_or_else(|| format!("no executable for the gateway example in:\n{stdout}"))?;
    eprintln!("chaos: gateway example built in {:?}", started.elapsed());
    Ok(PathBuf::from(path))
}

/// The JSON string that starts right after `marker`, unescaped.
fn json_string_after(line: &str, marker: &str) -> Option<String> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let mut out = String::new();
    let mut chars = rest.chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
}

/// How every gateway process of the run is started.
struct GatewayConfig {
    bin: PathBuf,
    target_url: String,
    redis_url: String,
    relaxed: bool,
    dir: PathBuf,
    log_filter: String,
}

/// One caller replica: a slot whose process is killed and replaced.
struct Gateway {
    slot: usize,
    /// Where clients send: the same port across restarts when possible.
    addr: RwLock<SocketAddr>,
    /// Incarnation of the process (0 = first).
    generation: AtomicU32,
    child: Mutex<Option<Child>>,
}

impl Gateway {
    /// Starts incarnation `generation` listening on `listen` (port 0: any)
    /// and waits for its `gateway listening on` line. Its stderr goes to
    /// `gateway-<slot>-<generation>.log`.
    fn spawn(
        config: &GatewayConfig,
        slot: usize,
        generation: u32,
        listen: SocketAddr,
    ) -> Result<(Child, SocketAddr), String> {
        let log_path = config.dir.join(format!("gateway-{slot}-{generation}.log"));
        let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut command = Command::new(&config.bin);
        command
            .arg("--listen")
            .arg(listen.to_string())
            .args(["--target", &config.target_url])
            .args(["--redis", &config.redis_url])
            .args(["--heartbeat-key", HEARTBEAT_KEY]);
        if config.relaxed {
            command.arg("--relaxed");
        }
        let mut child = command
            .env("RUST_LOG", &config.log_filter)
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", config.bin.display()))?;
        // Stdout is read until the process ends, so it never blocks on a
        // full pipe; only the listening line matters.
        let (lines_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("gateway listening on ") {
                        let addr = addr
                            .trim()
                            .parse()
                            .map_err(|e| format!("listening line {line:?}: {e}"))?;
                        return Ok((child, addr));
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    return Err(format!(
                        "gateway {slot}.{generation} not listening ({e:?}, exit {status:?}); log {}:\n{}",
                        log_path.display(),
                        tail(&log_path, 15)
                    ));
                }
            }
        }
    }

    fn start(config: &GatewayConfig, slot: usize) -> Result<Gateway, String> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let (child, addr) = Self::spawn(config, slot, 0, any)?;
        Ok(Gateway {
            slot,
            addr: RwLock::new(addr),
            generation: AtomicU32::new(0),
            child: Mutex::new(Some(child)),
        })
    }

    fn addr(&self) -> SocketAddr {
        *self.addr.read().unwrap_or_else(|p| p.into_inner())
    }

    fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// SIGKILL, and reap.
    fn kill(&self) {
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new incarnation on the same port (another one if that port cannot
    /// be bound, after a few tries).
    fn restart(&self, config: &GatewayConfig) -> Result<(), String> {
        self.kill();
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let mut last = String::new();
        for attempt in 0..4 {
            let listen = if attempt < 3 {
                self.addr()
            } else {
                SocketAddr::from(([127, 0, 0, 1], 0))
            };
            match Self::spawn(config, self.slot, generation, listen) {
                Ok((child, addr)) => {
                    *lock(&self.child) = Some(child);
                    *self.addr.write().unwrap_or_else(|p| p.into_inner()) = addr;
                    self.generation.store(generation, Ordering::Release);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// SIGTERM, and the exit status within [`STOP_TIMEOUT`] (SIGKILL after).
    fn stop(&self) -> Result<ExitStatus, String> {
        let Some(mut child) = lock(&self.child).take() else {
            return Err("not running".into());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running {STOP_TIMEOUT:?} after SIGTERM"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a file.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ----------------------------------------------------------------- clients

/// What a client got back.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// A 2xx other than 202: the target answered.
    Answered(u16),
    /// 202 from the layer: stored, with this idempotency key.
    Accepted(String),
    /// Any other status.
    Refused(u16),
    /// No answer (connection refused or reset, timeout).
    Failed(String),
}

impl Outcome {
    fn acknowledged(&self) -> bool {
        matches!(self, Outcome::Answered(_) | Outcome::Accepted(_))
    }

    fn label(&self) -> String {
        match self {
            Outcome::Answered(s) | Outcome::Refused(s) => s.to_string(),
            Outcome::Accepted(_) => "202".into(),
            Outcome::Failed(e) => format!("error({e})"),
        }
    }
}

/// One request, as sent.
#[derive(Clone, Debug)]
struct Sent {
    n: usize,
    client: usize,
    slot: usize,
    generation: u32,
    key: Option<String>,
    outcome: Outcome,
    sent_ms: u64,
    done_ms: u64,
}

struct Load {
    seed: u64,
    requests: usize,
    start: tokio::time::Instant,
    interval: Duration,
    next: AtomicUsize,
    gateways: Vec<Arc<Gateway>>,
    timeline: Arc<Timeline>,
    http: HyperClient<Full<Bytes>>,
}

/// One client: takes the next request number, waits for its turn on the
/// even schedule, sends it through the gateway after the one it used last,
/// and waits for the answer before taking another.
async fn client(load: Arc<Load>, id: usize) -> Vec<Sent> {
    let mut sent = Vec::new();
    let mut k = 0usize;
    loop {
        let n = load.next.fetch_add(1, Ordering::AcqRel);
        if n >= load.requests {
            return sent;
        }
        tokio::time::sleep_until(load.start + load.interval.mul_f64(n as f64)).await;
        let gateway = &load.gateways[(id + k) % load.gateways.len()];
        k += 1;
        let key = has_own_key(load.seed, n).then(|| own_key(load.seed, n));
        let generation = gateway.generation.load(Ordering::Acquire);
        let mut request = Request::post(format!("http://{}/orders/{n}", gateway.addr()))
            .header("content-type", "text/plain");
        if let Some(key) = &key {
            request = request.header("idempotency-key", key.as_str());
        }
        let request = request
            .body(Full::new(Bytes::from(body_of(load.seed, n))))
            .expect("a valid request");
        let sent_ms = load.timeline.now_ms();
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, async {
            let response = load.http.request(request).await.map_err(|e| {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    let _ = write!(text, ": {s}");
                    source = s.source();
                }
                text
            })?;
            let (parts, body) = response.into_parts();
            let _ = body.collect().await;
            Ok::<_, String>(parts)
        })
        .await
        {
            Err(_) => Outcome::Failed("timeout".into()),
            Ok(Err(e)) => Outcome::Failed(e),
            Ok(Ok(parts)) if parts.status == StatusCode::ACCEPTED => Outcome::Accepted(
                parts
                    .headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
            ),
            Ok(Ok(parts)) if parts.status.is_success() => Outcome::Answered(parts.status.as_u16()),
            Ok(Ok(parts)) => Outcome::Refused(parts.status.as_u16()),
        };
        sent.push(Sent {
            n,
            client: id,
            slot: gateway.slot,
            generation,
            key,
            outcome,
            sent_ms,
            done_ms: load.timeline.now_ms(),
        });
    }
}

// ------------------------------------------------------------------ faults

/// Flaps the target until `until`: up, then a graceful or abrupt death,
/// then down, then up again. Returns (deaths, abrupt ones).
async fn flap(
    target: Arc<tokio::sync::Mutex<HttpTarget>>,
    heartbeat: Arc<Heartbeat>,
    timeline: Arc<Timeline>,
    args: Args,
    seed: u64,
    until: tokio::time::Instant,
) -> (u32, u32) {
    let mut rng = Rng::new(seed, 1);
    let (mut deaths, mut abrupt_deaths) = (0, 0);
    loop {
        let long = rng.chance(args.long_up_chance);
        let up_for = if long {
            rng.millis(args.long_up_ms / 2, args.long_up_ms)
        } else {
            rng.millis(args.flap_min_ms, args.flap_max_ms)
        };
        let down_for = rng.millis(args.flap_min_ms, args.flap_max_ms);
        let abrupt = rng.chance(args.abrupt);
        if long {
            timeline.note(format!("target stays up for {up_for:?}"));
        }
        let wake = tokio::time::Instant::now() + up_for;
        if wake >= until {
            tokio::time::sleep_until(until).await;
            return (deaths, abrupt_deaths);
        }
        tokio::time::sleep_until(wake).await;
        deaths += 1;
        if abrupt {
            abrupt_deaths += 1;
            let _ = heartbeat.down(false).await;
            target.lock().await.kill().await;
            timeline.note(format!(
                "target dies abruptly (key left to expire), down {down_for:?}"
            ));
        } else {
            let deleted = heartbeat.down(true).await;
            target.lock().await.kill().await;
            timeline.note(format!(
                "target stops gracefully (DEL: {}), down {down_for:?}",
                match deleted {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => e,
                }
            ));
        }
        tokio::time::sleep(down_for).await;
        target.lock().await.restart().await;
        let set = heartbeat.up().await;
        timeline.note(format!(
            "target up (SET: {})",
            match set {
                Ok(()) => "ok".to_owned(),
                Err(e) => e,
            }
        ));
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Redis,
    Caller,
}

/// Counts of what the fault task did.
#[derive(Default, Debug)]
struct Faults {
    redis_kills: u32,
    caller_kills: u32,
}

/// What the fault task works with.
struct FaultPlan {
    redis: Arc<Mutex<RedisServer>>,
    gateways: Vec<Arc<Gateway>>,
    config: Arc<GatewayConfig>,
    timeline: Arc<Timeline>,
    admin: Admin,
    lease_key: String,
    seed: u64,
    start: tokio::time::Instant,
    load: Duration,
    redis_kills: u32,
    caller_kills: u32,
}

/// The gateway whose replayer holds the strict drain lease, if one does:
/// the lease's value is the holder's consumer name, which the replayer
/// logs (`consumer=<name>` in its span) when it takes the lease.
async fn lease_holder(plan: &FaultPlan) -> Option<Arc<Gateway>> {
    let holder: Option<String> = plan
        .admin
        .query(redis::cmd("GET").arg(&plan.lease_key))
        .await
        .ok()
        .flatten();
    let needle = format!("consumer={}", holder?);
    plan.gateways
        .iter()
        .find(|g| {
            let log = plan.config.dir.join(format!(
                "gateway-{}-{}.log",
                g.slot,
                g.generation.load(Ordering::Acquire)
            ));
            std::fs::read_to_string(log).is_ok_and(|text| text.contains(&needle))
        })
        .cloned()
}

/// Runs the fault schedule: the faults, shuffled, one in each equal slice
/// of 10%–80% of the load phase, at a seeded point of the first half of
/// its slice. One fault at a time (a gateway never restarts while Redis is
/// down: it would refuse to start). Every other gateway kill (the first,
/// the third, ...) hits the replica holding the strict drain lease when
/// one does, so that the other has to take the drain over; the others hit
/// a replica drawn from the seed.
async fn inject_faults(plan: FaultPlan) -> Result<Faults, String> {
    let FaultPlan {
        ref redis,
        ref gateways,
        ref config,
        ref timeline,
        seed,
        start,
        load,
        redis_kills,
        caller_kills,
        ..
    } = plan;
    let mut rng = Rng::new(seed, 2);
    let mut schedule: Vec<Fault> = std::iter::repeat_n(Fault::Redis, redis_kills as usize)
        .chain(std::iter::repeat_n(Fault::Caller, caller_kills as usize))
        .collect();
    for i in (1..schedule.len()).rev() {
        schedule.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let window_start = load.mul_f64(0.10);
    let slice = load.mul_f64(0.70) / schedule.len().max(1) as u32;
    let mut done = Faults::default();
    for (i, fault) in schedule.into_iter().enumerate() {
        let at = start + window_start + slice * i as u32 + slice.mul_f64(rng.unit() * 0.5);
        tokio::time::sleep_until(at).await;
        match fault {
            Fault::Redis => {
                let down_for = rng.millis(200, 1500);
                let pid = lock(redis).pid();
                let server = Arc::clone(redis);
                tokio::task::spawn_blocking(move || lock(&server).kill())
                    .await
                    .map_err(|e| e.to_string())?;
                timeline.announce(format!(
                    "fault: redis-server (pid {pid:?}) SIGKILLed, down {down_for:?}"
                ));
                tokio::time::sleep(down_for).await;
                let server = Arc::clone(redis);
                let started = Instant::now();
                tokio::task::spawn_blocking(move || lock(&server).restart())
                    .await
                    .map_err(|e| format!("redis restart: {e}"))?;
                done.redis_kills += 1;
                timeline.announce(format!(
                    "fault: redis-server restarted (pid {:?}, AOF loaded in {:?})",
                    lock(redis).pid(),
                    started.elapsed()
                ));
            }
            Fault::Caller => {
                let down_for = rng.millis(100, 1000);
                let drawn = Arc::clone(&gateways[rng.below(gateways.len() as u64) as usize]);
                let holder = lease_holder(&plan).await;
                let holds = |g: &Arc<Gateway>| holder.as_ref().is_some_and(|h| h.slot == g.slot);
                let gateway = match &holder {
                    Some(holder) if done.caller_kills.is_multiple_of(2) => Arc::clone(holder),
                    _ => drawn,
                };
                let pid = gateway.pid();
                gateway.kill();
                timeline.announce(format!(
                    "fault: gateway {}.{} (pid {pid:?}{}) SIGKILLed, down {down_for:?}",
                    gateway.slot,
                    gateway.generation.load(Ordering::Acquire),
                    if holds(&gateway) {
                        ", the drain lease holder"
                    } else {
                        ""
                    }
                ));
                tokio::time::sleep(down_for).await;
                let config = Arc::clone(config);
                let restarted = Arc::clone(&gateway);
                let started = Instant::now();
                tokio::task::spawn_blocking(move || restarted.restart(&config))
                    .await
                    .map_err(|e| e.to_string())??;
                done.caller_kills += 1;
                timeline.announce(format!(
                    "fault: gateway {}.{} (pid {:?}) listening on {} after {:?}",
                    gateway.slot,
                    gateway.generation.load(Ordering::Acquire),
                    gateway.pid(),
                    gateway.addr(),
                    started.elapsed()
                ));
            }
        }
    }
    Ok(done)
}

// --------------------------------------------------------------------- run

/// The target's record of one request.
struct Reception {
    n: Option<usize>,
    key: String,
    replay: bool,
    attempt: String,
    at_ms: u64,
}

fn receptions(target: &HttpTarget, seed: u64, timeline: &Timeline) -> Vec<Reception> {
    target
        .received()
        .iter()
        .map(|r| {
            let header = |name: &str| {
                r.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            Reception {
                n: parse_body(seed, &r.body),
                key: header("idempotency-key"),
                replay: r.headers.contains_key("x-heartbeat-replay"),
                attempt: header("x-heartbeat-attempt"),
                at_ms: timeline.ms(r.at),
            }
        })
        .collect()
}

async fn run(args: Args, seed: u64) -> Result<bool, String> {
    if args.requests == 0 || args.clients == 0 {
        return Err("--requests and --clients must be positive".into());
    }
    if args.flap_min_ms > args.flap_max_ms {
        return Err("--flap-min-ms is above --flap-max-ms".into());
    }
    let load_for = Duration::from_secs_f64(
        args.duration_secs
            .unwrap_or((args.requests as f64 / 80.0).max(20.0)),
    );
    let default_kills = ((load_for.as_secs_f64() / 30.0) as u32).max(2);
    let redis_kills = args.redis_kills.unwrap_or(default_kills);
    let caller_kills = args.caller_kills.unwrap_or(default_kills);
    let dir = match &args.logs {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("thb-chaos-{seed}-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    eprintln!(
        "chaos: {} requests over {load_for:?} by {} clients through 2 gateways ({} order); \
         {redis_kills} redis kills, {caller_kills} gateway kills, target flapping every {}-{} ms \
         (heartbeat ttl {} ms, {:.0}% abrupt); run directory {}",
        args.requests,
        args.clients,
        if args.relaxed { "relaxed" } else { "strict" },
        args.flap_min_ms,
        args.flap_max_ms,
        args.heartbeat_ttl_ms,
        args.abrupt * 100.0,
        dir.display()
    );

    let bin = tokio::task::spawn_blocking({
        let given = args.gateway_bin.clone();
        move || gateway_bin(given.as_deref())
    })
    .await
    .map_err(|e| e.to_string())??;

    // Everything private to the run.
    let redis = tokio::task::spawn_blocking(RedisServer::start)
        .await
        .map_err(|e| format!("redis-server: {e}"))?;
    let redis_url = redis.url();
    let redis = Arc::new(Mutex::new(redis));
    let admin = Admin::connect(&redis_url).await?;
    let buffer = Target::with_namespace(DEFAULT_NAMESPACE, HEARTBEAT_KEY)
        .and_then(|t| t.with_heartbeat_key(HEARTBEAT_KEY))
        .map_err(|e| e.to_string())?;
    let queue = buffer.queue_key();
    let dead = buffer.dead_letter_key();

    let target = HttpTarget::start().await;
    let target_url = target.url();
    let target = Arc::new(tokio::sync::Mutex::new(target));
    let heartbeat = Arc::new(Heartbeat {
        admin: admin.clone(),
        ttl: Duration::from_millis(args.heartbeat_ttl_ms.max(4)),
        alive: tokio::sync::Mutex::new(false),
    });
    heartbeat.up().await?;
    let refresher = tokio::spawn(Arc::clone(&heartbeat).refresh_forever());

    let config = Arc::new(GatewayConfig {
        bin,
        target_url,
        redis_url,
        relaxed: args.relaxed,
        dir: dir.clone(),
        log_filter: args.gateway_log.clone(),
    });
    let gateways: Vec<Arc<Gateway>> = tokio::task::spawn_blocking({
        let config = Arc::clone(&config);
        move || -> Result<Vec<Arc<Gateway>>, String> {
            (0..2)
                .map(|slot| Gateway::start(&config, slot).map(Arc::new))
                .collect()
        }
    })
    .await
    .map_err(|e| e.to_string())??;

    let timeline = Arc::new(Timeline {
        start: Instant::now(),
        events: Mutex::new(Vec::new()),
        verbose: args.verbose,
    });
    for g in &gateways {
        timeline.announce(format!(
            "gateway {}.0 (pid {:?}) listening on {}",
            g.slot,
            g.pid(),
            g.addr()
        ));
    }

    // ---- load phase
    let start = tokio::time::Instant::now();
    let until = start + load_for;
    let load = Arc::new(Load {
        seed,
        requests: args.requests,
        start,
        interval: load_for / args.requests as u32,
        next: AtomicUsize::new(0),
        gateways: gateways.clone(),
        timeline: Arc::clone(&timeline),
        http: hyper_client(),
    });
    let clients: Vec<_> = (0..args.clients)
        .map(|id| tokio::spawn(client(Arc::clone(&load), id)))
        .collect();
    let flapper = tokio::spawn(flap(
        Arc::clone(&target),
        Arc::clone(&heartbeat),
        Arc::clone(&timeline),
        args.clone(),
        seed,
        until,
    ));
    let faults = tokio::spawn(inject_faults(FaultPlan {
        redis: Arc::clone(&redis),
        gateways: gateways.clone(),
        config: Arc::clone(&config),
        timeline: Arc::clone(&timeline),
        admin: admin.clone(),
        lease_key: buffer.lease_key(),
        seed,
        start,
        load: load_for,
        redis_kills,
        caller_kills,
    }));
    let loading = Arc::new(AtomicBool::new(true));
    let progress = tokio::spawn({
        let (load, admin, queue, target, loading) = (
            Arc::clone(&load),
            admin.clone(),
            queue.clone(),
            Arc::clone(&target),
            Arc::clone(&loading),
        );
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            every.tick().await;
            while loading.load(Ordering::Acquire) {
                every.tick().await;
                let received = target.lock().await.received_count();
                eprintln!(
                    "chaos: {:>8.3}s sent {}/{}, target received {received}, buffer {}",
                    start.elapsed().as_secs_f64(),
                    load.next.load(Ordering::Acquire).min(load.requests),
                    load.requests,
                    admin
                        .xlen(&queue)
                        .await
                        .map_or_else(|e| format!("? ({e})"), |n| n.to_string()),
                );
            }
        }
    });

    let mut sent: Vec<Sent> = Vec::with_capacity(args.requests);
    for c in clients {
        sent.extend(c.await.map_err(|e| format!("client task: {e}"))?);
    }
    sent.sort_by_key(|s| s.n);
    let (deaths, abrupt_deaths) = flapper.await.map_err(|e| format!("flapper: {e}"))?;
    let injected = faults.await.map_err(|e| format!("faults: {e}"))??;
    loading.store(false, Ordering::Release);
    progress.abort();
    let load_took = start.elapsed();
    timeline.announce(format!(
        "load done in {load_took:?}: {} sent, target died {deaths} times ({abrupt_deaths} abruptly)",
        sent.len()
    ));

    // ---- drain: the target up for good, every acknowledged request home
    {
        let mut target = target.lock().await;
        if !target.is_running() {
            target.restart().await;
        }
    }
    // Redis was restarted a while ago, but the refresher keeps setting the
    // key anyway: a failure here only delays the return.
    if let Err(e) = heartbeat.up().await {
        timeline.announce(format!("heartbeat SET failed ({e}); the refresher retries"));
    }
    timeline.announce("target up for good; draining");
    let acked: Vec<usize> = sent
        .iter()
        .filter(|s| s.outcome.acknowledged())
        .map(|s| s.n)
        .collect();
    let drain_started = Instant::now();
    let drain_deadline = drain_started + Duration::from_secs(args.drain_timeout_secs);
    let mut seen_count = usize::MAX;
    let mut missing = acked.len();
    let mut quiet_since: Option<Instant> = None;
    let mut last_report = Instant::now();
    let drained = loop {
        let count = target.lock().await.received_count();
        if count != seen_count {
            seen_count = count;
            let got: HashSet<usize> = receptions(&*target.lock().await, seed, &timeline)
                .into_iter()
                .filter_map(|r| r.n)
                .collect();
            missing = acked.iter().filter(|n| !got.contains(n)).count();
        }
        let xlen = admin.xlen(&queue).await;
        let pending = admin.pending(&queue).await;
        let empty = xlen == Ok(0) && pending == Ok(0);
        if missing == 0 && empty {
            break true;
        }
        if empty {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= QUIET_GIVE_UP {
                timeline.announce(format!(
                    "buffer empty for {QUIET_GIVE_UP:?} with {missing} acknowledged requests undelivered: giving up"
                ));
                break false;
            }
        } else {
            quiet_since = None;
        }
        if Instant::now() >= drain_deadline {
            timeline.announce(format!(
                "drain timeout: {missing} undelivered, XLEN {xlen:?}, XPENDING {pending:?}"
            ));
            break false;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            eprintln!(
                "chaos: draining for {:?}: {missing} acknowledged not yet delivered, XLEN {xlen:?}, XPENDING {pending:?}",
                drain_started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drain_took = drain_started.elapsed();
    timeline.announce(format!(
        "drain {} in {drain_took:?}",
        if drained { "complete" } else { "incomplete" }
    ));

    // ---- stop the gateways gracefully, then look at what is left
    let stops = tokio::task::spawn_blocking({
        let gateways = gateways.clone();
        move || gateways.iter().map(|g| g.stop()).collect::<Vec<_>>()
    })
    .await
    .map_err(|e| e.to_string())?;
    for (slot, stop) in stops.iter().enumerate() {
        timeline.announce(format!("gateway {slot} stopped with SIGTERM: {stop:?}"));
    }
    refresher.abort();
    let xlen = admin.xlen(&queue).await;
    let pending = admin.pending(&queue).await;
    let dead_letters = admin.xlen(&dead).await;
    let received = receptions(&*target.lock().await, seed, &timeline);

    let report = Report::new(seed, &args, &sent, &received);
    let stranded = xlen
        .clone()
        .unwrap_or(u64::MAX)
        .saturating_add(pending.clone().unwrap_or(u64::MAX));
    let dead_count = dead_letters.clone().unwrap_or(u64::MAX);

    // ---- the verdict
    let mut failures = Vec::new();
    if report.lost > 0 {
        failures.push(format!("{} acknowledged requests lost", report.lost));
    }
    if !report.order_violations.is_empty() {
        failures.push(format!(
            "{} order violations",
            report.order_violations.len()
        ));
    }
    if !report.key_mismatches.is_empty() {
        failures.push(format!(
            "{} requests delivered under another idempotency key",
            report.key_mismatches.len()
        ));
    }
    if report.unknown > 0 {
        failures.push(format!("{} receptions of unknown bodies", report.unknown));
    }
    if stranded > 0 {
        failures.push(format!(
            "entries stranded: XLEN {xlen:?}, XPENDING {pending:?}"
        ));
    }
    if dead_count > 0 {
        failures.push(format!("dead letters: {dead_letters:?}"));
    }
    if !drained {
        failures.push("the drain did not complete".into());
    }
    if injected.redis_kills < redis_kills || injected.caller_kills < caller_kills {
        failures.push(format!(
            "faults injected {injected:?}, planned {redis_kills}/{caller_kills}"
        ));
    }
    if deaths == 0 {
        failures.push("the target never flapped".into());
    }

    report.details(&timeline, load_took, drain_took);
    report.information(&sent, &received);
    write_record(&dir, &timeline, &sent, &received);
    let passed = failures.is_empty();
    if !passed {
        eprintln!("chaos: FAILED (seed {seed}):");
        for failure in &failures {
            eprintln!("chaos:   - {failure}");
        }
        report.evidence(&timeline, &sent, &received);
        if stranded > 0 || dead_count > 0 {
            let entries: Result<redis::Value, String> = admin
                .query(
                    redis::cmd("XRANGE")
                        .arg(&queue)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(5),
                )
                .await;
            eprintln!("chaos: oldest entries left: {entries:?}");
            let consumers: Result<redis::Value, String> = admin
                .query(redis::cmd("XINFO").arg("CONSUMERS").arg(&queue).arg(GROUP))
                .await;
            eprintln!("chaos: consumers: {consumers:?}");
            let dead_entries: Result<redis::Value, String> = admin
                .query(
                    redis::cmd("XRANGE")
                        .arg(&dead)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(5),
                )
                .await;
            eprintln!("chaos: dead letters: {dead_entries:?}");
        }
        for g in &gateways {
            for generation in 0..=g.generation.load(Ordering::Acquire) {
                let path = dir.join(format!("gateway-{}-{generation}.log", g.slot));
                let warnings: Vec<String> = std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    // tower-http's trace layer logs every 5xx answer (a 503
                    // while Redis is down) as an error: not news here.
                    .filter(|l| !l.contains("tower_http::trace::on_failure"))
                    .map(str::to_owned)
                    .collect();
                eprintln!(
                    "chaos: {} ({} warnings/errors; last ones):\n{}",
                    path.display(),
                    warnings.len(),
                    warnings[warnings.len().saturating_sub(8)..].join("\n")
                );
            }
        }
    }
    if passed && !args.keep_logs && args.logs.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("chaos: run directory kept: {}", dir.display());
    }

    println!(
        "chaos seed={seed} requests={} acknowledged={} delivered={} lost={} duplicates={} \
         order_violations={} faults=redis_kills:{} caller_kills:{} target_flaps:{deaths} \
         stranded={stranded} dead_letters={dead_count} key_mismatches={} cross_gateway_reorders={} \
         result={} elapsed={:.1}s",
        report.requests,
        report.acknowledged,
        report.delivered,
        report.lost,
        report.duplicates,
        report.order_violations.len(),
        injected.redis_kills,
        injected.caller_kills,
        report.key_mismatches.len(),
        report.cross_gateway_reorders.len(),
        if passed { "ok" } else { "FAILED" },
        timeline.start.elapsed().as_secs_f64()
    );
    drop(gateways);
    drop(redis);
    Ok(passed)
}

// ------------------------------------------------------------------ report

/// A pair of requests one client sent in this order, received the other way.
struct Inversion {
    earlier: usize,
    later: usize,
}

struct Report {
    requests: usize,
    acknowledged: usize,
    delivered: usize,
    lost: usize,
    lost_requests: Vec<usize>,
    duplicates: usize,
    /// Duplicates whose every reception after the first was a replay.
    duplicates_replayed: usize,
    key_mismatches: Vec<usize>,
    unknown: usize,
    order_violations: Vec<Inversion>,
    /// Pairs sent by one client through different gateways, first received
    /// the other way round: information, not promised by strict order.
    cross_gateway_reorders: Vec<Inversion>,
    checked_order: bool,
    /// Relaxed order: reorders within a gateway (not promised).
    unchecked_reorders: usize,
    outcomes: Vec<(String, usize)>,
    delivered_unacknowledged: usize,
    first_by_replay: usize,
    /// Times a client's write through a gateway was answered by the target
    /// right after its previous one there had been buffered: the buffer had
    /// emptied and forwarding resumed, the edge strict order must get right.
    resumptions: usize,
}

impl Report {
    fn new(seed: u64, args: &Args, sent: &[Sent], received: &[Reception]) -> Report {
        let _ = seed;
        let requests = sent.len();
        let mut by_n: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut unknown = 0;
        for (i, r) in received.iter().enumerate() {
            match r.n {
                Some(n) if n < requests => by_n.entry(n).or_default().push(i),
                _ => unknown += 1,
            }
        }
        let first = |n: usize| by_n.get(&n).map(|v| v[0]);

        let acknowledged = sent.iter().filter(|s| s.outcome.acknowledged()).count();
        let lost_requests: Vec<usize> = sent
            .iter()
            .filter(|s| s.outcome.acknowledged() && first(s.n).is_none())
            .map(|s| s.n)
            .collect();
        let delivered = acknowledged - lost_requests.len();
        let delivered_unacknowledged = sent
            .iter()
            .filter(|s| !s.outcome.acknowledged() && first(s.n).is_some())
            .count();

        let mut duplicates = 0;
        let mut duplicates_replayed = 0;
        let mut key_mismatches = Vec::new();
        let mut first_by_replay = 0;
        for s in sent {
            let Some(indices) = by_n.get(&s.n) else {
                continue;
            };
            duplicates += indices.len() - 1;
            if indices.len() > 1 && indices[1..].iter().all(|&i| received[i].replay) {
                duplicates_replayed += indices.len() - 1;
            }
            if received[indices[0]].replay {
                first_by_replay += 1;
            }
            // One key per request: the client's own, or the one the layer
            // assigned (returned with a 202), on every reception.
            let expected = match (&s.key, &s.outcome) {
                (Some(own), _) => Some(own.clone()),
                (None, Outcome::Accepted(k)) => Some(k.clone()),
                _ => None,
            };
            let keys: HashSet<&str> = indices.iter().map(|&i| received[i].key.as_str()).collect();
            let consistent = keys.len() == 1
                && !keys.contains("")
                && expected.as_deref().is_none_or(|e| keys.contains(e));
            if !consistent {
                key_mismatches.push(s.n);
            }
        }

        // Order: per client, per gateway slot, acknowledged requests in
        // send order must be first received in that order.
        let mut order_violations = Vec::new();
        let mut cross_gateway_reorders = Vec::new();
        let mut resumptions = 0;
        let clients = sent.iter().map(|s| s.client).max().map_or(0, |c| c + 1);
        for c in 0..clients {
            let mine: Vec<&Sent> = sent
                .iter()
                .filter(|s| s.client == c && s.outcome.acknowledged())
                .collect();
            // Latest first reception so far: (index, n), per slot and overall.
            let mut per_slot: HashMap<usize, (usize, usize)> = HashMap::new();
            let mut overall: Option<(usize, usize, usize)> = None; // (index, n, slot)
            let mut last_buffered: HashMap<usize, bool> = HashMap::new();
            for s in mine {
                let buffered = matches!(s.outcome, Outcome::Accepted(_));
                if last_buffered.insert(s.slot, buffered) == Some(true) && !buffered {
                    resumptions += 1;
                }
                let Some(f) = first(s.n) else { continue };
                if let Some(&(max, earlier)) = per_slot.get(&s.slot) {
                    if f < max {
                        order_violations.push(Inversion {
                            earlier,
                            later: s.n,
                        });
                    }
                }
                if let Some((max, earlier, slot)) = overall {
                    if f < max && slot != s.slot {
                        cross_gateway_reorders.push(Inversion {
                            earlier,
                            later: s.n,
                        });
                    }
                }
                let entry = per_slot.entry(s.slot).or_insert((f, s.n));
                if f > entry.0 {
                    *entry = (f, s.n);
                }
                if overall.is_none_or(|(max, _, _)| f > max) {
                    overall = Some((f, s.n, s.slot));
                }
            }
        }
        if let (Some(tolerance), false) = (args.cross_gateway_strict_ms, args.relaxed) {
            let (late, within): (Vec<Inversion>, Vec<Inversion>) = cross_gateway_reorders
                .into_iter()
                .partition(|inv| sent[inv.later].sent_ms > sent[inv.earlier].done_ms + tolerance);
            order_violations.extend(late);
            cross_gateway_reorders = within;
        }
        // Relaxed order promises nothing: count, do not fail.
        let unchecked_reorders = if args.relaxed {
            std::mem::take(&mut order_violations).len()
        } else {
            0
        };

        let mut outcomes: HashMap<String, usize> = HashMap::new();
        for s in sent {
            let label = match &s.outcome {
                Outcome::Failed(_) => "error".to_owned(),
                other => other.label(),
            };
            *outcomes.entry(label).or_default() += 1;
        }
        let mut outcomes: Vec<(String, usize)> = outcomes.into_iter().collect();
        outcomes.sort();

        Report {
            requests,
            acknowledged,
            delivered,
            lost: lost_requests.len(),
            lost_requests,
            duplicates,
            duplicates_replayed,
            key_mismatches,
            unknown,
            order_violations,
            cross_gateway_reorders,
            checked_order: !args.relaxed,
            unchecked_reorders,
            outcomes,
            delivered_unacknowledged,
            first_by_replay,
            resumptions,
        }
    }

    /// The breakdown, on stderr.
    fn details(&self, timeline: &Timeline, load_took: Duration, drain_took: Duration) {
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(label, n)| format!("{label}: {n}"))
            .collect();
        eprintln!(
            "chaos: answers {{{}}}; load {load_took:?}, drain {drain_took:?}, total {:?}",
            outcomes.join(", "),
            timeline.start.elapsed()
        );
        eprintln!(
            "chaos: {} acknowledged delivered ({} first by a replay); {} not acknowledged but delivered anyway; \
             {} duplicates ({} of them replays, all with the request's own key unless counted in key_mismatches)",
            self.delivered,
            self.first_by_replay,
            self.delivered_unacknowledged,
            self.duplicates,
            self.duplicates_replayed
        );
        let within = if self.checked_order {
            format!(
                "checked (strict): {} violations",
                self.order_violations.len()
            )
        } else {
            format!(
                "not checked (relaxed): {} reorders",
                self.unchecked_reorders
            )
        };
        eprintln!(
            "chaos: order within a gateway {within}; {} cross-gateway reorders (information); \
             forwarding resumed after a buffered write {} times",
            self.cross_gateway_reorders.len(),
            self.resumptions
        );
    }

    /// The first few reorders that are not violations, on stderr.
    fn information(&self, sent: &[Sent], received: &[Reception]) {
        for inv in self.cross_gateway_reorders.iter().take(3) {
            eprintln!(
                "chaos: reordered (information; the later one sent {} ms after the earlier one was answered) earlier {}",
                sent[inv.later].sent_ms as i64 - sent[inv.earlier].done_ms as i64,
                describe(sent, received, inv.earlier)
            );
            eprintln!(
                "chaos:                         later   {}",
                describe(sent, received, inv.later)
            );
        }
    }

    /// The first few failures with what happened around them, on stderr.
    fn evidence(&self, timeline: &Timeline, sent: &[Sent], received: &[Reception]) {
        let describe = |n: usize| describe(sent, received, n);
        // What happened around the first few (the timeline is in the run
        // directory as a whole).
        for (i, &n) in self.lost_requests.iter().take(10).enumerate() {
            eprintln!("chaos: LOST {}", describe(n));
            if i == 0 {
                for line in timeline.around(sent[n].sent_ms, sent[n].done_ms) {
                    eprintln!("chaos:     {line}");
                }
            }
        }
        for (i, inv) in self.order_violations.iter().take(10).enumerate() {
            eprintln!("chaos: ORDER earlier {}", describe(inv.earlier));
            eprintln!("chaos:       later   {}", describe(inv.later));
            if i < 3 {
                for line in timeline.around(sent[inv.earlier].sent_ms, sent[inv.later].done_ms) {
                    eprintln!("chaos:     {line}");
                }
            }
        }
        for &n in self.key_mismatches.iter().take(10) {
            eprintln!("chaos: KEY {}", describe(n));
        }
    }
}

/// One request: how it was sent and answered, and every reception of it
/// (index in arrival order, time, replay or not, key, attempt header).
fn describe(sent: &[Sent], received: &[Reception], n: usize) -> String {
    let s = &sent[n];
    let got: Vec<String> = received
        .iter()
        .enumerate()
        .filter(|(_, r)| r.n == Some(n))
        .map(|(i, r)| {
            format!(
                "#{i}@{}ms{} key={} attempt={}",
                r.at_ms,
                if r.replay { " replay" } else { "" },
                r.key,
                r.attempt
            )
        })
        .collect();
    format!(
        "request {n} (client {}, gateway {}.{}, key {:?}) sent {}ms answered {}ms: {}; received [{}]",
        s.client,
        s.slot,
        s.generation,
        s.key,
        s.sent_ms,
        s.done_ms,
        s.outcome.label(),
        got.join(", ")
    )
}

/// `timeline.log`, `requests.tsv`, `received.tsv` in the run directory.
fn write_record(dir: &Path, timeline: &Timeline, sent: &[Sent], received: &[Reception]) {
    let mut text = String::new();
    for (ms, what) in lock(&timeline.events).iter() {
        let _ = writeln!(text, "{:>8.3}s {what}", *ms as f64 / 1000.0);
    }
    let _ = std::fs::write(dir.join("timeline.log"), text);

    let mut text = String::from("n\tclient\tgateway\tgeneration\tkey\toutcome\tsent_ms\tdone_ms\n");
    for s in sent {
        let _ = writeln!(
            text,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            s.n,
            s.client,
            s.slot,
            s.generation,
            s.key.as_deref().unwrap_or("-"),
            match &s.outcome {
                Outcome::Accepted(k) => format!("202 {k}"),
                other => other.label(),
            },
            s.sent_ms,
            s.done_ms
        );
    }
    let _ = std::fs::write(dir.join("requests.tsv"), text);

    let mut text = String::from("index\tn\tkey\treplay\tattempt\tat_ms\n");
    for (i, r) in received.iter().enumerate() {
        let _ = writeln!(
            text,
            "{i}\t{}\t{}\t{}\t{}\t{}",
            r.n.map_or("?".into(), |n| n.to_string()),
            r.key,
            u8::from(r.replay),
            r.attempt,
            r.at_ms
        );
    }
    let _ = std::fs::write(dir.join("received.tsv"), text);
}
