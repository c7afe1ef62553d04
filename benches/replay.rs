//! What the replayer costs, as ratios against baselines run in the same
//! process, on the same private Redis and the same local HTTP target.
//!
//! Redis: a private `redis-server` with `appendonly no` (no AOF fsync: the
//! figures are about the replayer's path, and every contender uses the same
//! server with the same settings). HTTP target: a minimal hyper server inside
//! this bench that answers `200 ok` at once and only counts requests (an
//! `AtomicU64`, plus arrival times in a preallocated ring of atomics: no
//! lock, no growth), on its own thread and current-thread runtime. Client: the hyper-util legacy client of the tests
//! (`support::hyper_client`), shared by the replayer and the bare loops.
//!
//! 1. Drain rate (entries/s) of `ENTRIES` (default 20 000) buffered entries
//!    with 1 KiB bodies, written straight into the stream with pipelined
//!    `XADD`s of the fields the layer writes (`Envelope::to_fields`), timed
//!    from the `SET` of the heartbeat until the target has received them all
//!    (counter polled every 1 ms; the end is the arrival of the last one).
//!    Strict (default config, `slow_start = 0`) and relaxed (`order =
//!    Relaxed`, `max_in_flight` 16, `slow_start = 0`). Baselines, same N:
//!    (a) a plain redis-rs loop that drains a fresh copy of the stream
//!    (`XREADGROUP COUNT 32`, then `XACK` + `XDEL` of the batch pipelined in
//!    one round trip), (b) a bare HTTP loop sending the same requests (same
//!    method, URI, headers, body) with the same client, sequentially, and
//!    with 16 in flight for relaxed mode. Medians of `ROUNDS` (default 5),
//!    contenders interleaved in each round; also the median of per-round
//!    ratios. Per contender: CPU time per entry of the bench process, the
//!    target thread and redis-server (from /proc schedstat), Redis commands
//!    per 1000 entries (INFO commandstats), and the gaps between arrivals at
//!    the target (where the time between deliveries goes).
//! 2. Heartbeat back -> first delivery, p50/p99 over `TRIALS` (default 200)
//!    trials, strict (default config, and with `slow_start = 0`) and relaxed
//!    (default config otherwise): one entry buffered, the replayer running
//!    and parked on the absent heartbeat, `SET` the heartbeat, time until
//!    the target receives it (its arrival timestamp). For scale: in the same
//!    trial, the time until the watcher's `view.wait_for(Health::Up)`
//!    resolves.
//! 3. Backlog independence: drain rate with `SMALL` (default 1 000) vs `BIG`
//!    (default 200 000) waiting entries, strict and relaxed; the bench
//!    process's VmRSS before/after the big drain (peak VmHWM during it, after
//!    resetting it), the heap bytes allocated net/peak during it (a counting
//!    allocator, armed only during part 3's drains), and Redis `used_memory`.
//!
//! Run with `cargo bench --bench replay`. Env: `ENTRIES`, `ROUNDS`,
//! `TRIALS`, `SMALL`, `BIG`, `PARTS` (e.g. `PARTS=1,3`; default all);
//! `ONLY_REPLAYER=strict|relaxed` runs only `ROUNDS` drains (for profiling).
//!
//! Every party shares this machine's CPUs; other work on it moves the rates
//! (the start and end load averages are printed), not the CPU-per-entry and
//! commands-per-entry figures.

#[path = "../tests/support/mod.rs"]
mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use support::{hyper_client, HyperClient, RedisOptions, RedisServer};
use tower_heartbeat_buffer::envelope::Envelope;
use tower_heartbeat_buffer::replay::{ReplayConfig, Replayer, ATTEMPT_HEADER, REPLAY_HEADER};
use tower_heartbeat_buffer::{DeliveryOrder, Health, RequestBody, Target, Watcher};

const KIB: &[u8] = &[b'x'; 1024];
const STALL: Duration = Duration::from_secs(60);
const TARGET_THREAD: &str = "bench-target";

// ---------------------------------------------------------------------------
// Heap accounting (part 3 only): net bytes allocated while armed, and their
// peak. Disarmed, it costs one relaxed load per allocation.

struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static NET: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

fn note(delta: i64) {
    if ARMED.load(Ordering::Relaxed) {
        let now = NET.fetch_add(delta, Ordering::Relaxed) + delta;
        if delta > 0 && now > PEAK.load(Ordering::Relaxed) {
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            note(layout.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        note(-(layout.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new_size);
        if !q.is_null() {
            note(new_size as i64 - layout.size() as i64);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn arm_heap() {
    NET.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
}

/// (net, peak) bytes since `arm_heap`.
fn disarm_heap() -> (i64, i64) {
    ARMED.store(false, Ordering::Relaxed);
    (NET.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// CPU time (ns on CPU, from /proc/<pid>/task/*/schedstat): this process
// without the target's thread, the target's thread, and redis-server. Shows
// where the work goes whatever else runs on the machine.

#[derive(Clone, Copy, Default)]
struct Cpu {
    bench: u64,
    target: u64,
    redis: u64,
    /// Machine-wide busy time (all processes, /proc/stat, 10 ms ticks).
    machine: u64,
    /// Time the hypervisor ran something else on our vCPUs.
    steal: u64,
    at: u64,
}

/// (busy, steal) ns of the whole machine since boot.
fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is within user).
    let tick = 10_000_000; // USER_HZ = 100
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    (busy * tick, get(7) * tick)
}

fn task_cpu(pid: &str, mut keep: impl FnMut(&str) -> bool) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut sum = 0;
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !keep(comm.trim()) {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        sum += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    sum
}

fn cpu(redis_pid: Option<u32>) -> Cpu {
    let (machine, steal) = machine_cpu();
    Cpu {
        bench: task_cpu("self", |c| c != TARGET_THREAD),
        target: task_cpu("self", |c| c == TARGET_THREAD),
        redis: redis_pid.map_or(0, |p| task_cpu(&p.to_string(), |_| true)),
        machine,
        steal,
        at: now_ns(),
    }
}

impl Cpu {
    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            bench: self.bench.saturating_sub(before.bench),
            target: self.target.saturating_sub(before.target),
            redis: self.redis.saturating_sub(before.redis),
            machine: self.machine.saturating_sub(before.machine),
            steal: self.steal.saturating_sub(before.steal),
            at: self.at.saturating_sub(before.at),
        }
    }

    /// "bench x / target y / redis z µs" per entry, and what the rest of
    /// the machine used meanwhile (in CPUs; this box has few).
    fn per_entry(self, n: usize) -> String {
        let us = |ns: u64| ns as f64 / 1e3 / n as f64;
        let ours = self.bench + self.target + self.redis;
        let wall = self.at.max(1) as f64;
        format!(
            "CPU per entry: bench {:.1} µs, target {:.1} µs, redis-server {:.1} µs; meanwhile other processes {:.2} CPU, steal {:.2} CPU",
            us(self.bench),
            us(self.target),
            us(self.redis),
            self.machine.saturating_sub(ours) as f64 / wall,
            self.steal as f64 / wall
        )
    }
}

/// `VmRSS` and `VmHWM` of this process, KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets `VmHWM` to the current RSS (Linux >= 4.0); false if refused.
fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

// ---------------------------------------------------------------------------
// Time: nanoseconds since the first call, comparable across threads.

fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------
// The target: answers 200 at once and counts.

struct Hits {
    count: AtomicU64,
    /// Arrival (body read) of the latest request, `now_ns`.
    last_ns: AtomicU64,
    /// Arrival of request k at `k % ARRIVALS` (a preallocated ring: one
    /// relaxed store per request, no lock, no growth).
    arrivals: Box<[AtomicU64]>,
}

const ARRIVALS: usize = 1 << 19;

impl Default for Hits {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            arrivals: (0..ARRIVALS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Hits {
    /// Arrival times of requests `from..to` (at most the last `ARRIVALS`).
    fn arrivals(&self, from: u64, to: u64) -> Vec<u64> {
        let from = from.max(to.saturating_sub(ARRIVALS as u64));
        (from..to)
            .map(|k| self.arrivals[k as usize % ARRIVALS].load(Ordering::Relaxed))
            .collect()
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
    fn last_ns(&self) -> u64 {
        self.last_ns.load(Ordering::Acquire)
    }
}

fn start_target() -> (SocketAddr, Arc<Hits>) {
    let hits = Arc::new(Hits::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = hits.clone();
    std::thread::Builder::new()
        .name(TARGET_THREAD.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let hits = shared.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |request: Request<Incoming>| {
                                let hits = hits.clone();
                                async move {
                                    let _ = request.into_body().collect().await;
                                    let now = now_ns();
                                    hits.last_ns.fetch_max(now, Ordering::AcqRel);
                                    // One thread serves every connection: no
                                    // race between this load and the add.
                                    let k = hits.count.load(Ordering::Relaxed);
                                    hits.arrivals[k as usize % ARRIVALS]
                                        .store(now, Ordering::Relaxed);
                                    hits.count.fetch_add(1, Ordering::AcqRel);
                                    Ok::<_, Infallible>(Response::new(Full::new(
                                        Bytes::from_static(b"ok"),
                                    )))
                                }
                            });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        })
        .unwrap();
    (addr, hits)
}

// ---------------------------------------------------------------------------
// Shared rig.

type Client = HyperClient<RequestBody<Full<Bytes>>>;

struct Ctx {
    server: RedisServer,
    conn: ConnectionManager,
    watcher: Watcher,
    client: Client,
    hits: Arc<Hits>,
    /// The buffered request (its id replaced per entry).
    template: Envelope,
}

async fn cmd<T: redis::FromRedisValue>(conn: &ConnectionManager, c: &redis::Cmd) -> T {
    let mut conn = conn.clone();
    c.query_async(&mut conn).await.unwrap()
}

async fn set_heartbeat(ctx: &Ctx, target: &Target) {
    let _: () = cmd(
        &ctx.conn,
        redis::cmd("SET").arg(target.heartbeat_key()).arg(1),
    )
    .await;
}

async fn del(ctx: &Ctx, key: &str) {
    let _: () = cmd(&ctx.conn, redis::cmd("DEL").arg(key)).await;
}

/// Writes `n` entries (ids `prefix-000000`..) with the layer's fields, in
/// pipelines of 500 `XADD`s.
async fn fill(ctx: &Ctx, key: &str, prefix: &str, n: usize) {
    let mut conn = ctx.conn.clone();
    let mut i = 0;
    while i < n {
        let end = (i + 500).min(n);
        let mut pipe = redis::pipe();
        for j in i..end {
            let mut envelope = ctx.template.clone();
            envelope.id = format!("{prefix}-{j:07}");
            let c = pipe.cmd("XADD").arg(key).arg("*");
            for (k, v) in envelope.to_fields() {
                c.arg(k).arg(v);
            }
            c.ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
        i = end;
    }
}

fn used_memory(server: &RedisServer) -> u64 {
    server
        .info("memory")
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `cmdstat_<name>` -> (calls, usec).
fn commandstats(server: &RedisServer) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in server.info("commandstats").lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let get = |key: &str| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_owned(), (get("calls="), get("usec=")));
    }
    out
}

/// Per-command deltas, as "name calls/1000 entries (µs/call)".
fn command_delta(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    entries: usize,
) -> String {
    let mut parts = Vec::new();
    let mut total_usec = 0;
    for (name, (calls, usec)) in after {
        if name == "info" {
            continue;
        }
        let (c0, u0) = before.get(name).copied().unwrap_or((0, 0));
        let (dc, du) = (calls - c0, usec - u0);
        if dc == 0 {
            continue;
        }
        total_usec += du;
        parts.push(format!(
            "{name} {:.1} ({:.1} µs)",
            dc as f64 * 1000.0 / entries as f64,
            du as f64 / dc as f64
        ));
    }
    format!(
        "per 1000 entries: {}; Redis CPU in commands {:.1} µs/entry",
        parts.join(", "),
        total_usec as f64 / entries as f64
    )
}

// ---------------------------------------------------------------------------
// Configurations.

fn strict() -> ReplayConfig {
    let mut config = ReplayConfig::default();
    config.slow_start = Duration::ZERO;
    config
}

fn relaxed() -> ReplayConfig {
    let mut config = strict();
    config.order = DeliveryOrder::Relaxed;
    config
}

// ---------------------------------------------------------------------------
// One drain by the replayer.

struct Drain {
    /// From the heartbeat SET to the arrival of the last entry.
    secs: f64,
    /// (ns since SET, delivered so far), every ~1 ms.
    samples: Vec<(u64, u64)>,
    commands: String,
    /// Highest VmRSS seen while draining (KiB).
    max_rss: u64,
    /// Heap bytes (net, peak) allocated during the drain, if accounted.
    heap: (i64, i64),
    cpu: Cpu,
    gaps: String,
}

impl Drain {
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.secs
    }

    /// When `k` entries had arrived (ns since SET), from the samples.
    fn at(&self, k: u64) -> u64 {
        self.samples
            .iter()
            .find(|(_, c)| *c >= k)
            .map(|(t, _)| *t)
            .unwrap_or_else(|| (self.secs * 1e9) as u64)
    }

    /// From the heartbeat SET to the first arrival, ms (1 ms resolution).
    fn first_ms(&self) -> f64 {
        self.at(1) as f64 / 1e6
    }

    /// Entries/s from the first arrival to the last.
    fn steady(&self, n: usize) -> f64 {
        (n - 1) as f64 / (self.secs - self.at(1) as f64 / 1e9)
    }

    /// Entries/s between the `a`-th and the `b`-th arrival.
    fn window(&self, a: u64, b: u64) -> f64 {
        (b - a) as f64 / ((self.at(b) - self.at(a)).max(1) as f64 / 1e9)
    }
}

async fn drain(ctx: &Ctx, name: &str, n: usize, config: ReplayConfig, heap: bool) -> Drain {
    let target = Target::new(name).unwrap();
    del(ctx, &target.heartbeat_key()).await;
    del(ctx, &target.queue_key()).await;
    fill(ctx, &target.queue_key(), name, n).await;
    drain_filled(ctx, name, n, config, heap).await
}

/// [`drain`] of a buffer already filled (heartbeat absent). With `heap`,
/// the heap is accounted from the heartbeat SET to the last arrival.
async fn drain_filled(ctx: &Ctx, name: &str, n: usize, config: ReplayConfig, heap: bool) -> Drain {
    let target = Target::new(name).unwrap();
    let view = ctx.watcher.watch(&target).await;
    assert_ne!(view.health(), Health::Up);
    let replay = Replayer::builder(&ctx.watcher, &target)
        .await
        .unwrap()
        .config(config)
        .spawn(ctx.client.clone());
    // Let it create the group and park on the absent heartbeat.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = ctx.hits.count();
    assert_eq!(replay.delivered(), 0);

    let stats_before = commandstats(&ctx.server);
    // Allocated before the heap accounting starts (16 B per 1 ms sample).
    let mut samples = Vec::with_capacity(1 << 18);
    if heap {
        arm_heap();
    }
    let cpu0 = cpu(ctx.server.pid());
    let t0 = now_ns();
    set_heartbeat(ctx, &target).await;
    let mut last_progress = (Instant::now(), 0);
    let mut max_rss = 0;
    let mut last_rss = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let got = ctx.hits.count() - before;
        samples.push((now_ns() - t0, got));
        if got >= n as u64 {
            break;
        }
        if got != last_progress.1 {
            last_progress = (Instant::now(), got);
        } else if last_progress.0.elapsed() > STALL {
            panic!("{name}: stalled at {got}/{n} delivered");
        }
        if last_rss.elapsed() >= Duration::from_millis(100) {
            last_rss = Instant::now();
            max_rss = max_rss.max(rss_kib().0);
        }
    }
    let heap = if heap { disarm_heap() } else { (0, 0) };
    let gaps = gaps(&ctx.hits.arrivals(before, before + n as u64));
    let cpu = cpu(ctx.server.pid()).since(cpu0);
    let secs = (ctx.hits.last_ns() - t0) as f64 / 1e9;
    let stats_after = commandstats(&ctx.server);
    // Nothing delivered twice.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ctx.hits.count() - before, n as u64, "{name}: duplicates");
    assert_eq!(replay.delivered(), n as u64);
    replay.shutdown().await;
    let left: u64 = cmd(&ctx.conn, redis::cmd("XLEN").arg(target.queue_key())).await;
    assert_eq!(left, 0, "{name}: entries left in the buffer");
    del(ctx, &target.heartbeat_key()).await;
    del(ctx, &target.queue_key()).await;
    Drain {
        secs,
        samples,
        commands: command_delta(&stats_before, &stats_after, n),
        max_rss,
        heap,
        cpu,
        gaps,
    }
}

// ---------------------------------------------------------------------------
// Baselines.

/// Plain redis-rs drain of a fresh copy of the stream: `XREADGROUP COUNT 32`,
/// then `XACK` + `XDEL` of those ids (one pipelined round trip).
async fn redis_baseline(ctx: &Ctx, key: &str, n: usize) -> (f64, String, Cpu) {
    del(ctx, key).await;
    fill(ctx, key, key, n).await;
    let _: () = cmd(
        &ctx.conn,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("g")
            .arg("0"),
    )
    .await;
    let mut conn = ctx.conn.clone();
    let stats_before = commandstats(&ctx.server);
    let cpu0 = cpu(ctx.server.pid());
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(32)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let ids = entry_ids(&reply);
        assert!(!ids.is_empty(), "baseline: stream ran dry at {done}/{n}");
        let mut pipe = redis::pipe();
        pipe.cmd("XACK").arg(key).arg("g").arg(&ids).ignore();
        pipe.cmd("XDEL").arg(key).arg(&ids).ignore();
        let _: () = pipe.query_async(&mut conn).await.unwrap();
        done += ids.len();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu(ctx.server.pid()).since(cpu0);
    let stats_after = commandstats(&ctx.server);
    del(ctx, key).await;
    (rate, command_delta(&stats_before, &stats_after, n), cpu)
}

/// The replayer's own Redis protocol per batch, replayed by a plain loop
/// with no HTTP: (strict only) the lease script, `XREADGROUP .. 0` (this
/// consumer's pending entries), `XREADGROUP .. >`, `MGET` of the batch's
/// processed-markers, and the acknowledge script (`XACK` + `XDEL` + marker
/// `SET` per entry) — once per batch in strict order, once per entry (16 at
/// a time) in relaxed order. Copies of the scripts in `src/replay/store.rs`
/// at the time of writing. Diagnostic: the rate the Redis side alone allows.
async fn protocol_baseline(ctx: &Ctx, key: &str, n: usize, strict: bool) -> f64 {
    const ACK: &str = r#"
local n = 0
for i = 4, #ARGV, 2 do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  n = n + redis.call('XDEL', KEYS[1], ARGV[i])
  if ARGV[i + 1] ~= '' then
    redis.call('SET', ARGV[3] .. ARGV[i + 1], '1', 'EX', ARGV[2])
  end
end
return n
"#;
    const LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"#;
    del(ctx, key).await;
    fill(ctx, key, key, n).await;
    let _: () = cmd(
        &ctx.conn,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("g")
            .arg("0"),
    )
    .await;
    let ack = redis::Script::new(ACK);
    let lease_script = redis::Script::new(LEASE);
    let lease_key = format!("{key}:lease");
    let done_prefix = format!("{key}:done:");
    let mut conn = ctx.conn.clone();
    let read = |from: &'static str| {
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(32)
            .arg("STREAMS")
            .arg(key)
            .arg(from);
        c
    };
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        if strict {
            let held: i64 = lease_script
                .key(&lease_key)
                .arg("c")
                .arg(10_000)
                .invoke_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(held, 1);
        }
        let pending: Value = read("0").query_async(&mut conn).await.unwrap();
        assert!(entry_ids(&pending).is_empty());
        let reply: Value = read(">").query_async(&mut conn).await.unwrap();
        let entries = entries_with_ids(&reply);
        assert!(
            !entries.is_empty(),
            "protocol: stream ran dry at {done}/{n}"
        );
        let mut mget = redis::cmd("MGET");
        for (_, id) in &entries {
            mget.arg(format!("{done_prefix}{id}"));
        }
        let markers: Vec<Option<Vec<u8>>> = mget.query_async(&mut conn).await.unwrap();
        assert!(markers.iter().all(Option::is_none));
        if strict {
            let mut invocation = ack.key(key);
            invocation.arg("g").arg(60).arg(&done_prefix);
            for (entry_id, id) in &entries {
                invocation.arg(entry_id.as_slice()).arg(id.as_str());
            }
            let _: i64 = invocation.invoke_async(&mut conn).await.unwrap();
        } else {
            stream::iter(&entries)
                .for_each_concurrent(16, |(entry_id, id)| {
                    let mut conn = conn.clone();
                    let mut invocation = ack.key(key);
                    invocation
                        .arg("g")
                        .arg(60)
                        .arg(&done_prefix)
                        .arg(entry_id.as_slice())
                        .arg(id.as_str());
                    async move {
                        let _: i64 = invocation.invoke_async(&mut conn).await.unwrap();
                    }
                })
                .await;
        }
        done += entries.len();
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    del(ctx, key).await;
    rate
}

/// (entry id, `id` field) of each entry of an `XREADGROUP` reply (RESP2).
fn entries_with_ids(reply: &Value) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    let Value::Array(streams) = reply else {
        return out;
    };
    for stream in streams {
        let Value::Array(pair) = stream else { continue };
        let Some(Value::Array(entries)) = pair.get(1) else {
            continue;
        };
        for entry in entries {
            let Value::Array(entry) = entry else { continue };
            let (Some(Value::BulkString(entry_id)), Some(Value::Array(fields))) =
                (entry.first(), entry.get(1))
            else {
                continue;
            };
            let id = fields
                .chunks(2)
                .find(|kv| matches!(&kv[0], Value::BulkString(k) if k == b"id"))
                .and_then(|kv| match kv.get(1) {
                    Some(Value::BulkString(v)) => String::from_utf8(v.clone()).ok(),
                    _ => None,
                })
                .unwrap_or_default();
            out.push((entry_id.clone(), id));
        }
    }
    out
}

fn entry_ids(reply: &Value) -> Vec<Vec<u8>> {
    let streams: Vec<&Value> = match reply {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) if pair.len() == 2 => Some(&pair[1]),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let mut ids = Vec::new();
    for entries in streams {
        if let Value::Array(entries) = entries {
            for entry in entries {
                if let Value::Array(pair) = entry {
                    if let Some(Value::BulkString(id)) = pair.first() {
                        ids.push(id.clone());
                    }
                }
            }
        }
    }
    ids
}

/// The request the replayer sends for entry `i` (same method, URI, stored
/// headers, idempotency key, replay headers, body).
fn bare_request(template: &Envelope, id: &str) -> Request<RequestBody<Full<Bytes>>> {
    let mut request = Request::new(RequestBody::full(template.body.clone()));
    *request.method_mut() = template.method.clone();
    *request.uri_mut() = template.uri.clone();
    let mut headers = template.headers.clone();
    headers.insert("idempotency-key", HeaderValue::from_str(id).unwrap());
    headers.insert(REPLAY_HEADER, HeaderValue::from_static("1"));
    headers.insert(ATTEMPT_HEADER, HeaderValue::from(1u32));
    *request.headers_mut() = headers;
    request
}

/// The same `n` requests sent by a bare loop, `in_flight` at a time.
async fn http_baseline(ctx: &Ctx, prefix: &str, n: usize, in_flight: usize) -> (f64, Cpu, String) {
    let before = ctx.hits.count();
    let cpu0 = cpu(ctx.server.pid());
    let start = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let client = ctx.client.clone();
            let request = bare_request(&ctx.template, &format!("{prefix}-{i:07}"));
            async move {
                let response = client.request(request).await.unwrap();
                let _ = response.into_body().collect().await;
            }
        })
        .buffer_unordered(in_flight)
        .for_each(|()| async {})
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu(ctx.server.pid()).since(cpu0);
    assert_eq!(ctx.hits.count() - before, n as u64);
    (
        rate,
        cpu,
        gaps(&ctx.hits.arrivals(before, before + n as u64)),
    )
}

/// Where the time between arrivals goes: the median gap, and the "long"
/// gaps (> 4 x median and > 50 µs) — how often, how long, and their share of
/// the whole span.
fn gaps(arrivals: &[u64]) -> String {
    if arrivals.len() < 3 {
        return String::new();
    }
    let mut diffs: Vec<u64> = arrivals
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .collect();
    let span: u64 = diffs.iter().sum();
    let mut sorted = diffs.clone();
    sorted.sort_unstable();
    let median = sorted[sorted.len() / 2];
    let threshold = (median * 4).max(50_000);
    diffs.retain(|d| *d > threshold);
    let long: u64 = diffs.iter().sum();
    diffs.sort_unstable();
    let long_median = diffs.get(diffs.len() / 2).copied().unwrap_or(0);
    format!(
        "arrival gaps: median {:.1} µs; gaps > {:.0} µs: one per {:.1} entries, median {:.0} µs, {:.0}% of the time",
        median as f64 / 1e3,
        threshold as f64 / 1e3,
        arrivals.len() as f64 / diffs.len().max(1) as f64,
        long_median as f64 / 1e3,
        100.0 * long as f64 / span.max(1) as f64
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// Part 1.

struct RateRow {
    label: String,
    ours: f64,
    redis: f64,
    http: f64,
    /// Median over rounds of ours / (slower baseline of that round).
    round_ratio: f64,
    /// (min, max) over rounds: this box's scheduling is bimodal (see the
    /// target's CPU per entry), the spread shows it.
    ours_range: (f64, f64),
    http_range: (f64, f64),
    /// What the replayer's Redis protocol alone allows (no HTTP).
    protocol: f64,
}

fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

async fn part1(ctx: &Ctx, n: usize, rounds: usize) -> Vec<RateRow> {
    println!("== 1. drain rate, {n} entries of 1 KiB, median of {rounds} rounds");
    let mut strict_r = Vec::new();
    let mut relaxed_r = Vec::new();
    let mut redis_r = Vec::new();
    let mut seq_r = Vec::new();
    let mut par_r = Vec::new();
    for round in 0..rounds {
        let s = drain(ctx, &format!("strict-{round}"), n, strict(), false).await;
        let r = drain(ctx, &format!("relaxed-{round}"), n, relaxed(), false).await;
        let (plain, plain_cmds, plain_cpu) =
            redis_baseline(ctx, &format!("bench:plain-{round}"), n).await;
        let (seq, seq_cpu, seq_gaps) = http_baseline(ctx, &format!("seq-{round}"), n, 1).await;
        let (par, par_cpu, par_gaps) = http_baseline(ctx, &format!("par-{round}"), n, 16).await;
        println!(
            "round {round}: strict {:>8.0}/s  relaxed {:>8.0}/s  | redis-rs drain {plain:>8.0}/s  bare HTTP seq {seq:>8.0}/s  bare HTTP x16 {par:>8.0}/s",
            s.rate(n),
            r.rate(n)
        );
        println!(
            "  strict   first delivery after {:.0} ms, then {:.0}/s; {}",
            s.first_ms(),
            s.steady(n),
            s.cpu.per_entry(n)
        );
        println!(
            "  relaxed  first delivery after {:.0} ms, then {:.0}/s; {}",
            r.first_ms(),
            r.steady(n),
            r.cpu.per_entry(n)
        );
        println!("  redis-rs drain {}", plain_cpu.per_entry(n));
        println!("  bare HTTP seq  {}", seq_cpu.per_entry(n));
        println!("  bare HTTP x16  {}", par_cpu.per_entry(n));
        println!("  strict   {}", s.gaps);
        println!("  relaxed  {}", r.gaps);
        println!("  bare HTTP seq  {seq_gaps}");
        println!("  bare HTTP x16  {par_gaps}");
        if round == 0 {
            println!("  strict   Redis {}", s.commands);
            println!("  relaxed  Redis {}", r.commands);
            println!("  redis-rs Redis {plain_cmds}");
        }
        strict_r.push(s.rate(n));
        relaxed_r.push(r.rate(n));
        redis_r.push(plain);
        seq_r.push(seq);
        par_r.push(par);
    }
    // For scale only: the default slow start (2 s ramp from 20/s).
    let mut default_config = ReplayConfig::default();
    default_config.slow_start = Duration::from_secs(2);
    let d = drain(ctx, "strict-default", n, default_config, false).await;
    println!(
        "  (info: strict with the default slow_start of 2 s: {:.0}/s, {:.2} s for {n})",
        d.rate(n),
        d.secs
    );
    // The replayer's Redis protocol alone (no HTTP), and what it predicts
    // for strict order if nothing overlaps: 1 / (1/protocol + 1/bare HTTP).
    let with_lease = protocol_baseline(ctx, "bench:protocol-strict", n, true).await;
    let without = protocol_baseline(ctx, "bench:protocol-relaxed", n, false).await;
    println!(
        "  (diagnostic: the replayer's Redis protocol alone, plain loop, no HTTP: strict {with_lease:.0}/s, relaxed {without:.0}/s; strict if its Redis work and its deliveries never overlap: 1/(1/{with_lease:.0} + 1/bare HTTP seq {:.0}) = {:.0}/s)",
        median(seq_r.clone()),
        1.0 / (1.0 / with_lease + 1.0 / median(seq_r.clone()))
    );
    // Diagnostics, one run each: does the rate follow the batch size (per-batch
    // round trips and, in relaxed order, the wait for a whole batch)?
    for (label, base, batch, in_flight) in [
        ("strict", strict(), 128, 16),
        ("relaxed", relaxed(), 128, 16),
        ("relaxed", relaxed(), 512, 16),
        ("relaxed", relaxed(), 32, 32),
    ] {
        let mut config = base;
        config.batch = batch;
        config.max_in_flight = in_flight;
        let d = drain(
            ctx,
            &format!("diag-{label}-{batch}-{in_flight}"),
            n,
            config,
            false,
        )
        .await;
        println!(
            "  (diagnostic: {label} batch {batch} max_in_flight {in_flight}: {:.0}/s; {}; {})",
            d.rate(n),
            d.cpu.per_entry(n),
            d.gaps
        );
    }
    let ratios = |ours: &[f64], http: &[f64]| {
        median(
            (0..ours.len())
                .map(|i| ours[i] / redis_r[i].min(http[i]))
                .collect(),
        )
    };
    let strict_ratio = ratios(&strict_r, &seq_r);
    let relaxed_ratio = ratios(&relaxed_r, &par_r);
    let redis = median(redis_r);
    vec![
        RateRow {
            label: "strict  (vs bare HTTP sequential)".into(),
            ours: median(strict_r.clone()),
            redis,
            ours_range: range(&strict_r),
            http_range: range(&seq_r),
            protocol: with_lease,
            http: median(seq_r.clone()),
            round_ratio: strict_ratio,
        },
        RateRow {
            label: "relaxed (vs bare HTTP 16 in flight)".into(),
            ours: median(relaxed_r.clone()),
            redis,
            ours_range: range(&relaxed_r),
            http_range: range(&par_r),
            protocol: without,
            http: median(par_r.clone()),
            round_ratio: relaxed_ratio,
        },
    ]
}

// ---------------------------------------------------------------------------
// Part 2.

struct LatencyRow {
    label: String,
    delivery: Vec<f64>,
    detection: Vec<f64>,
}

async fn part2(ctx: &Ctx, trials: usize) -> Vec<LatencyRow> {
    println!("== 2. heartbeat back -> first delivery, {trials} trials");
    let mut rows = Vec::new();
    for (label, config) in [
        ("strict (default config)", ReplayConfig::default()),
        ("strict, slow_start 0", strict()),
        ("relaxed", {
            let mut c = ReplayConfig::default();
            c.order = DeliveryOrder::Relaxed;
            c
        }),
    ] {
        let target = Target::new(&format!("latency-{}", rows.len())).unwrap();
        del(ctx, &target.heartbeat_key()).await;
        let view = ctx.watcher.watch(&target).await;
        let replay = Replayer::builder(&ctx.watcher, &target)
            .await
            .unwrap()
            .config(config)
            .spawn(ctx.client.clone());
        let mut delivery = Vec::with_capacity(trials);
        let mut detection = Vec::with_capacity(trials);
        for trial in 0..trials {
            del(ctx, &target.heartbeat_key()).await;
            tokio::time::timeout(Duration::from_secs(10), view.wait_for(Health::Down))
                .await
                .expect("view never saw the heartbeat go");
            fill(ctx, &target.queue_key(), &format!("lat-{label}-{trial}"), 1).await;
            // The replayer is parked on the absent heartbeat.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let before = ctx.hits.count();
            assert_eq!(replay.delivered(), trial as u64);
            let mut changes = view.changes();
            let detected = tokio::spawn(async move {
                let _ = changes.wait_for(|h| *h == Health::Up).await;
                now_ns()
            });
            tokio::time::sleep(Duration::from_millis(2)).await;
            let t0 = now_ns();
            set_heartbeat(ctx, &target).await;
            let deadline = Instant::now() + Duration::from_secs(10);
            while ctx.hits.count() == before {
                assert!(Instant::now() < deadline, "no delivery in trial {trial}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let delivered_at = ctx.hits.last_ns();
            let detected_at = detected.await.unwrap();
            delivery.push((delivered_at - t0) as f64 / 1e6);
            detection.push(detected_at.saturating_sub(t0) as f64 / 1e6);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(replay.delivered(), trials as u64);
        replay.shutdown().await;
        del(ctx, &target.heartbeat_key()).await;
        del(ctx, &target.queue_key()).await;
        delivery.sort_by(f64::total_cmp);
        detection.sort_by(f64::total_cmp);
        println!(
            "  {label}: first delivery p50 {:.2} ms p99 {:.2} ms max {:.2} ms; watcher sees Up p50 {:.2} ms p99 {:.2} ms",
            percentile(&delivery, 0.5),
            percentile(&delivery, 0.99),
            delivery[delivery.len() - 1],
            percentile(&detection, 0.5),
            percentile(&detection, 0.99)
        );
        rows.push(LatencyRow {
            label: label.into(),
            delivery,
            detection,
        });
    }
    rows
}

// ---------------------------------------------------------------------------
// Part 3.

struct BacklogRow {
    label: String,
    small: f64,
    big: f64,
    /// From the first arrival to the last.
    small_steady: f64,
    big_steady: f64,
    big_first: f64,
    big_last: f64,
    rss_before: u64,
    rss_after: u64,
    rss_peak: u64,
    heap_net: i64,
    heap_peak: i64,
    redis_before: u64,
    redis_full: u64,
    redis_after: u64,
}

async fn part3(ctx: &Ctx, small: usize, big: usize, rounds: usize) -> Vec<BacklogRow> {
    println!("== 3. backlog independence: {small} vs {big} waiting entries");
    let mut rows = Vec::new();
    for (label, config) in [("strict", strict()), ("relaxed", relaxed())] {
        let mut smalls = Vec::new();
        let mut small_steadies = Vec::new();
        let small_rounds = rounds.max(5);
        for round in 0..small_rounds {
            let d = drain(
                ctx,
                &format!("small-{label}-{round}"),
                small,
                config.clone(),
                true, // heap accounting on, as in the big drain
            )
            .await;
            println!(
                "  {label} {small} waiting, run {round}: {:.0}/s (first delivery after {:.0} ms, then {:.0}/s); {}",
                d.rate(small),
                d.first_ms(),
                d.steady(small),
                d.cpu.per_entry(small)
            );
            smalls.push(d.rate(small));
            small_steadies.push(d.steady(small));
        }
        let small_rate = median(smalls);
        let small_steady = median(small_steadies);

        let name = format!("big-{label}");
        let target = Target::new(&name).unwrap();
        let redis_before = used_memory(&ctx.server);
        del(ctx, &target.heartbeat_key()).await;
        del(ctx, &target.queue_key()).await;
        fill(ctx, &target.queue_key(), &name, big).await;
        let redis_full = used_memory(&ctx.server);
        // Measured once the buffer is full, right before the drain.
        let (rss_before, _) = rss_kib();
        let hwm_reset = reset_hwm();
        let d = drain_filled(ctx, &name, big, config.clone(), true).await;
        let (heap_net, heap_peak) = d.heap;
        let (rss_after, hwm) = rss_kib();
        let redis_after = used_memory(&ctx.server);
        let rss_peak = if hwm_reset {
            hwm
        } else {
            d.max_rss.max(rss_after)
        };
        let b = big as u64;
        let row = BacklogRow {
            label: label.into(),
            small: small_rate,
            big: d.rate(big),
            small_steady,
            big_steady: d.steady(big),
            big_first: d.window(1, (small as u64).min(b)),
            big_last: d.window(b - (small as u64).min(b - 1), b),
            rss_before,
            rss_after,
            rss_peak,
            heap_net,
            heap_peak,
            redis_before,
            redis_full,
            redis_after,
        };
        println!(
            "  {label}: {small} waiting {:.0}/s (median of {small_rounds}); {big} waiting {:.0}/s ({:.1} s, first delivery after {:.0} ms, then {:.0}/s), first {small} of them {:.0}/s, last {small} {:.0}/s",
            row.small, row.big, d.secs, d.first_ms(), row.big_steady, row.big_first, row.big_last
        );
        println!("    big drain {}", d.cpu.per_entry(big));
        println!("    big drain {}", d.gaps);
        println!(
            "    10% windows of the big drain (entries/s): {}",
            (0..10)
                .map(|k| format!("{:.0}", d.window((b * k / 10).max(1), b * (k + 1) / 10)))
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("    Redis {}", d.commands);
        println!(
            "    bench VmRSS {} -> {} MiB (peak {} MiB{}), heap net {:+.1} MiB peak {:.1} MiB; Redis used_memory {} MiB -> {} MiB full -> {} MiB",
            rss_before / 1024,
            rss_after / 1024,
            rss_peak / 1024,
            if hwm_reset { ", VmHWM after reset" } else { ", sampled every 100 ms" },
            heap_net as f64 / 1048576.0,
            heap_peak as f64 / 1048576.0,
            row.redis_before / 1048576,
            row.redis_full / 1048576,
            row.redis_after / 1048576
        );
        rows.push(row);
    }
    rows
}

// ---------------------------------------------------------------------------

enum Results {
    Rates(Vec<RateRow>),
    Latencies(Vec<LatencyRow>),
    Backlog(Vec<BacklogRow>),
}

fn main() {
    let entries = env("ENTRIES", 20_000);
    let rounds = env("ROUNDS", 5).max(1);
    let trials = env("TRIALS", 200).max(1);
    let small = env("SMALL", 1_000);
    let big = env("BIG", 200_000);
    let parts: Vec<u32> = std::env::var("PARTS")
        .ok()
        .map(|p| p.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3]);
    // Ignore criterion-style arguments cargo bench passes (`--bench`).
    let _ = std::env::args();

    now_ns();
    let (addr, hits) = start_target();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // No AOF: the figures are about the replayer's path; every contender
    // uses this same server with the same settings.
    let server = RedisServer::start_with(RedisOptions::new().appendonly(false));
    let ctx = Arc::new(rt.block_on(async {
        let conn = ConnectionManager::new_with_config(
            server.client(),
            ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
        let watcher = Watcher::connect(server.client()).await.unwrap();
        let (parts, ()) = Request::post(format!("http://{addr}/orders"))
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts();
        let template = Envelope::capture(
            "template",
            &parts,
            Bytes::from_static(KIB),
            &Default::default(),
            0,
        );
        Ctx {
            server,
            conn,
            watcher,
            client: hyper_client(),
            hits,
            template,
        }
    }));
    println!(
        "replayer bench: private redis-server (appendonly no), hyper target answering 200 at once; {} CPUs shared by redis-server, the target thread and a 2-worker runtime",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if let Ok(mode) = std::env::var("ONLY_REPLAYER") {
        // For profiling the replayer alone: ROUNDS drains of ENTRIES.
        let config = if mode == "relaxed" {
            relaxed()
        } else {
            strict()
        };
        let ctx = ctx.clone();
        rt.block_on(rt.spawn(async move {
            for round in 0..rounds {
                let d = drain(
                    &ctx,
                    &format!("only-{mode}-{round}"),
                    entries,
                    config.clone(),
                    false,
                )
                .await;
                println!(
                    "{mode} round {round}: {:.0}/s; {}",
                    d.rate(entries),
                    d.cpu.per_entry(entries)
                );
            }
        }))
        .unwrap();
        return;
    }
    println!("load average at start: {}", loadavg());

    // Each part runs as a task on the runtime's workers, like the replayer
    // (a future driven by `block_on` on the main thread pays a cross-thread
    // wake-up per I/O event).
    let on_worker = |part: u32| {
        let ctx = ctx.clone();
        rt.block_on(async move {
            tokio::spawn(async move {
                match part {
                    1 => Results::Rates(part1(&ctx, entries, rounds).await),
                    2 => Results::Latencies(part2(&ctx, trials).await),
                    _ => Results::Backlog(part3(&ctx, small, big, rounds).await),
                }
            })
            .await
            .unwrap()
        })
    };
    let mut rates = None;
    let mut latencies = None;
    let mut backlog = None;
    for part in [1, 2, 3].into_iter().filter(|p| parts.contains(p)) {
        match on_worker(part) {
            Results::Rates(r) => rates = Some(r),
            Results::Latencies(r) => latencies = Some(r),
            Results::Backlog(r) => backlog = Some(r),
        }
    }

    println!();
    println!("================================ summary ================================");
    println!("load average at the end: {} (other work on this machine skews rates; the CPU-per-entry figures above do not depend on it)", loadavg());
    if let Some(rows) = rates {
        println!("1. drain rate, {entries} x 1 KiB (entries/s, median of {rounds}); goal ours >= 0.7 x slower baseline");
        println!(
            "   {:<36} {:>9} {:>11} {:>11} {:>12} {:>14}",
            "mode", "ours", "redis-rs", "bare HTTP", "ours/slower", "per-round med"
        );
        for r in &rows {
            let ratio = r.ours / r.redis.min(r.http);
            println!(
                "   {:<36} {:>9.0} {:>11.0} {:>11.0} {:>12.2} {:>14.2}  {}",
                r.label,
                r.ours,
                r.redis,
                r.http,
                ratio,
                r.round_ratio,
                if ratio >= 0.7 { "ok" } else { "BELOW 0.7" }
            );
        }
        for r in &rows {
            println!(
                "   {:<36} range over rounds: ours {:.0}-{:.0}, bare HTTP {:.0}-{:.0}; Redis protocol alone {:.0}/s",
                r.label.split(' ').next().unwrap_or(""),
                r.ours_range.0,
                r.ours_range.1,
                r.http_range.0,
                r.http_range.1,
                r.protocol
            );
        }
    }
    if let Some(rows) = latencies {
        println!("2. heartbeat SET -> first delivery (ms), {trials} trials");
        println!(
            "   {:<26} {:>8} {:>8} {:>8} {:>14} {:>14}",
            "mode", "p50", "p99", "max", "watcher p50", "watcher p99"
        );
        for r in rows {
            println!(
                "   {:<26} {:>8.2} {:>8.2} {:>8.2} {:>14.2} {:>14.2}",
                r.label,
                percentile(&r.delivery, 0.5),
                percentile(&r.delivery, 0.99),
                r.delivery[r.delivery.len() - 1],
                percentile(&r.detection, 0.5),
                percentile(&r.detection, 0.99)
            );
        }
    }
    if let Some(rows) = backlog {
        println!("3. backlog independence: {small} vs {big} waiting (entries/s); goal within 20 %");
        println!(
            "   total = heartbeat SET -> last arrival; steady = first arrival -> last arrival"
        );
        println!(
            "   {:<8} {:>11} {:>9} {:>7} {:>12} {:>10} {:>7} {:>10} {:>10} {:>17} {:>16}",
            "mode",
            "small total",
            "big total",
            "big/sm",
            "small steady",
            "big steady",
            "big/sm",
            "big first",
            "big last",
            "RSS MiB b/a/peak",
            "heap MiB net/pk"
        );
        let flag = |x: f64| if (x - 1.0).abs() <= 0.2 { ' ' } else { '!' };
        for r in rows {
            println!(
                "   {:<8} {:>11.0} {:>9.0} {:>6.2}{} {:>12.0} {:>10.0} {:>6.2}{} {:>10.0} {:>10.0} {:>17} {:>16}",
                r.label,
                r.small,
                r.big,
                r.big / r.small,
                flag(r.big / r.small),
                r.small_steady,
                r.big_steady,
                r.big_steady / r.small_steady,
                flag(r.big_steady / r.small_steady),
                r.big_first,
                r.big_last,
                format!(
                    "{}/{}/{}",
                    r.rss_before / 1024,
                    r.rss_after / 1024,
                    r.rss_peak / 1024
                ),
                format!(
                    "{:+.1}/{:.1}",
                    r.heap_net as f64 / 1048576.0,
                    r.heap_peak as f64 / 1048576.0
                )
            );
        }
    }
}
