//! One server vs Redis Cluster vs replicas, in one process on one machine:
//! what spreading targets over primaries, and confirming each write on a
//! replica (`wait_for_replicas`), do to the layer's and the replayer's
//! throughput.
//!
//! Deployments, all started by the bench (private `redis-server`s on free
//! ports, `appendonly no` unless `AOF=1`, keyspace notifications `KEA`):
//!
//! - one server;
//! - a cluster of 3 primaries, no replicas;
//! - a cluster of 3 primaries with 1 replica each;
//! - one primary with 1 replica (`replicaof`).
//!
//! Three targets, whose keys land on three distinct primaries of the
//! clusters (`RedisCluster::keys_on_distinct_primaries`; the same names are
//! used everywhere). Every deployment is reached through one
//! [`Backend`] and one [`Watcher`], so all targets share the Backend's data
//! connection (one per node on a cluster).
//!
//! 1. Enqueue: `CALLS` (default 20 000) calls through the layer while the
//!    targets are down, 64 concurrent callers (caller `i` calls target
//!    `i % targets`), 1 KiB POST bodies, as in `benches/layer.rs`. Rows: one
//!    server with 1 and 3 targets, the 3-primary cluster, and with replicas
//!    with and without `wait_for_replicas(1, 1 s)` (one `WAIT` in the
//!    pipeline of each write). Every layer has `redis_timeout(2 s)` (above
//!    the `WAIT` timeout). Per row: calls/s, per-call latency p50/p99, CPU
//!    per call of this process and of all the deployment's `redis-server`s
//!    (/proc schedstat), calls not answered `202`, and Redis commands per
//!    call summed over every node (`INFO commandstats`).
//! 2. Drain: `ENTRIES` (default 20 000) entries buffered through the layer
//!    (split over the targets), then one replayer per target (`slow_start =
//!    0`; strict order, then relaxed order with the default 16 in flight)
//!    parked on the absent heartbeats; timed from the first heartbeat `SET`
//!    until the HTTP target (`support::HttpTarget`, a hyper server in this
//!    process) has received them all. One server (3 targets, and 1 target
//!    for scale) vs the 3-primary cluster (3 targets). Per row: entries/s,
//!    CPU per entry (this process, which includes the HTTP target, and the
//!    redis-servers), and Redis commands per entry.
//!
//! Cases run interleaved, one round of each case after the other, `ROUNDS`
//! times (default 5); the tables show medians. Every process shares this
//! machine's CPUs (the deployments' nodes, this process' two runtime
//! workers and the HTTP target): on a small machine the cluster's extra
//! nodes compete for the same cores, so the cluster's rate here is a floor,
//! not what separate hosts would give; the CPU-per-call columns do not
//! depend on that.
//!
//! Run with `cargo bench --bench cluster`. Env: `CALLS`, `ENTRIES`,
//! `ROUNDS`, `DRAIN` (default `strict,relaxed`), `AOF=1` (`appendonly yes`, `appendfsync always` on
//! every node).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{hyper_client, HttpTarget, HyperClient, RedisCluster, RedisOptions, RedisServer};
use tower::{Service, ServiceExt};
use tower_heartbeat_buffer::replay::{ReplayConfig, ReplayHandle};
use tower_heartbeat_buffer::{
    Backend, DeliveryOrder, Health, HeartbeatBuffer, HeartbeatBufferLayer, RequestBody, Target,
    Watcher,
};
use tower_layer::Layer;

const KIB: &[u8] = &[b'x'; 1024];
const CALLERS: usize = 64;
const STALL: Duration = Duration::from_secs(60);
/// Where buffered requests would go in the enqueue part (never contacted:
/// the targets stay down).
const NOWHERE: &str = "http://127.0.0.1:9/orders";

type Client = HyperClient<RequestBody<Full<Bytes>>>;
type Buffered = HeartbeatBuffer<Client, Client>;

// ---------------------------------------------------------------------------
// CPU time, ns (from /proc/<pid>/task/*/schedstat).

fn task_cpu(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// (this process, the given redis-servers), ns on CPU so far.
fn cpu(pids: &[u32]) -> (u64, u64) {
    (
        task_cpu("self"),
        pids.iter().map(|p| task_cpu(&p.to_string())).sum(),
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// Deployments.

/// An admin connection for setup and checks (not the Backend's).
#[derive(Clone)]
enum Admin {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Admin {
    async fn query<T: redis::FromRedisValue>(&self, c: &redis::Cmd) -> T {
        match self.clone() {
            Admin::Single(mut conn) => c.query_async(&mut conn).await.unwrap(),
            Admin::Cluster(mut conn) => c.query_async(&mut conn).await.unwrap(),
        }
    }
}

/// A running deployment, as the bench talks to it (the servers themselves
/// are owned by `main`).
struct Setup {
    label: &'static str,
    watcher: Watcher,
    admin: Admin,
    /// Every redis-server of the deployment, replicas included.
    pids: Vec<u32>,
    /// A connection to each of them, for `INFO commandstats`.
    nodes: Vec<std::sync::Mutex<redis::Connection>>,
}

type Stats = BTreeMap<String, u64>;

impl Setup {
    /// Calls per command, summed over every node (without `info`). Blocks
    /// briefly: only called outside timed sections.
    fn commandstats(&self) -> Stats {
        let mut out = Stats::new();
        for node in &self.nodes {
            let mut conn = node.lock().unwrap();
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut *conn)
                .unwrap();
            for line in info.lines() {
                let Some((name, stats)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let calls: u64 = stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if name != "info" {
                    *out.entry(name.to_owned()).or_default() += calls;
                }
            }
        }
        out
    }
}

/// Adds `after - before` to `total`.
fn add_delta(total: &mut Stats, before: &Stats, after: &Stats) {
    for (name, calls) in after {
        let d = calls - before.get(name).copied().unwrap_or(0);
        if d > 0 {
            *total.entry(name.clone()).or_default() += d;
        }
    }
}

/// "name x.xx, ..." per unit, busiest first.
fn per_unit(total: &Stats, units: usize) -> String {
    let mut v: Vec<(&String, &u64)> = total.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .map(|(name, calls)| (name, **calls as f64 / units as f64))
        // Not the background trickle (watcher reads, subscriptions...).
        .filter(|(_, rate)| *rate >= 0.01)
        .map(|(name, rate)| format!("{name} {rate:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn node_conns(servers: &[&RedisServer]) -> Vec<std::sync::Mutex<redis::Connection>> {
    servers
        .iter()
        .map(|s| std::sync::Mutex::new(s.conn()))
        .collect()
}

impl Setup {
    async fn single(label: &'static str, primary: &RedisServer, others: &[&RedisServer]) -> Self {
        let admin = primary
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut all = vec![primary];
        all.extend_from_slice(others);
        Setup {
            label,
            watcher: Watcher::connect(primary.client()).await.unwrap(),
            admin: Admin::Single(admin),
            pids: all.iter().filter_map(|s| s.pid()).collect(),
            nodes: node_conns(&all),
        }
    }

    async fn cluster(label: &'static str, cluster: &RedisCluster) -> Self {
        let backend = Backend::cluster(cluster.seed_urls()).unwrap();
        let admin = redis::cluster::ClusterClient::new(cluster.seed_urls())
            .unwrap()
            .get_async_connection()
            .await
            .unwrap();
        Setup {
            label,
            watcher: Watcher::connect(backend).await.unwrap(),
            admin: Admin::Cluster(admin),
            pids: cluster.nodes().iter().filter_map(|n| n.pid()).collect(),
            nodes: node_conns(&cluster.nodes().iter().collect::<Vec<_>>()),
        }
    }
}

/// Layers for `names` on `setup`, and the services through them.
struct Lanes {
    targets: Vec<Target>,
    layers: Vec<HeartbeatBufferLayer>,
    services: Vec<Buffered>,
}

async fn lanes(setup: &Setup, names: &[String], wait: bool) -> Lanes {
    let mut out = Lanes {
        targets: Vec::new(),
        layers: Vec::new(),
        services: Vec::new(),
    };
    for name in names {
        let target = Target::new(name).unwrap();
        let mut builder = HeartbeatBufferLayer::builder(target.clone())
            .max_queue_len(u64::MAX / 2)
            .redis_timeout(Duration::from_secs(2));
        if wait {
            builder = builder.wait_for_replicas(1, Duration::from_secs(1));
        }
        let layer = builder.build(&setup.watcher).await.unwrap();
        assert_ne!(layer.view().health(), Health::Up, "{name} must be down");
        out.services.push(layer.clone().layer(hyper_client()));
        out.layers.push(layer);
        out.targets.push(target);
    }
    out
}

// ---------------------------------------------------------------------------
// Enqueue.

struct Calls {
    rate: f64,
    /// Per-call latencies, µs, sorted.
    latencies: Vec<u32>,
    not_202: usize,
    /// CPU ns per call: this process, the redis-servers.
    cpu: (f64, f64),
}

/// `calls` calls over 64 callers; caller `i` calls `services[i % len]`.
async fn calls(services: &[Buffered], pids: &[u32], calls: usize, uri: &str) -> Calls {
    let (bench0, redis0) = cpu(pids);
    let start = Instant::now();
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let n = calls / CALLERS + usize::from(i < calls % CALLERS);
            let mut service = services[i % services.len()].clone();
            let uri = uri.to_owned();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(n);
                let mut not_202 = 0;
                for _ in 0..n {
                    let request = Request::post(&uri)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(KIB)))
                        .unwrap();
                    let t = Instant::now();
                    let response = service.ready().await.unwrap().call(request).await.unwrap();
                    latencies.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    if response.status() != StatusCode::ACCEPTED {
                        not_202 += 1;
                    }
                }
                (latencies, not_202)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(calls);
    let mut not_202 = 0;
    for t in tasks {
        let (l, n) = t.await.unwrap();
        latencies.extend(l);
        not_202 += n;
    }
    let secs = start.elapsed().as_secs_f64();
    let (bench1, redis1) = cpu(pids);
    latencies.sort_unstable();
    Calls {
        rate: calls as f64 / secs,
        latencies,
        not_202,
        cpu: (
            (bench1 - bench0) as f64 / calls as f64,
            (redis1 - redis0) as f64 / calls as f64,
        ),
    }
}

struct EnqueueCase {
    label: String,
    setup: usize,
    lanes: Lanes,
    rounds: Vec<Calls>,
    /// Commands on every node during the timed calls, all rounds.
    commands: Stats,
}

async fn enqueue_round(case: &mut EnqueueCase, setup: &Setup, n: usize) {
    let before = setup.commandstats();
    let result = calls(&case.lanes.services, &setup.pids, n, NOWHERE).await;
    add_delta(&mut case.commands, &before, &setup.commandstats());
    // What was answered 202 is in the buffers; then empty them.
    let mut stored = 0;
    for target in &case.lanes.targets {
        stored += setup
            .admin
            .query::<u64>(redis::cmd("XLEN").arg(target.queue_key()))
            .await;
        setup
            .admin
            .query::<()>(redis::cmd("DEL").arg(target.queue_key()))
            .await;
    }
    assert!(
        stored as usize >= n - result.not_202,
        "{}: {stored} stored, {} answered 202",
        case.label,
        n - result.not_202
    );
    println!(
        "  {:<52} {:>8.0} calls/s  p50 {:>6.2} ms  p99 {:>6.2} ms  CPU/call bench {:>5.1} µs redis {:>5.1} µs{}",
        case.label,
        result.rate,
        percentile(&result.latencies, 0.5),
        percentile(&result.latencies, 0.99),
        result.cpu.0 / 1e3,
        result.cpu.1 / 1e3,
        if result.not_202 > 0 {
            format!("  NOT 202: {}", result.not_202)
        } else {
            String::new()
        }
    );
    case.rounds.push(result);
}

// ---------------------------------------------------------------------------
// Drain.

struct DrainCase {
    label: String,
    setup: usize,
    lanes: Lanes,
    config: ReplayConfig,
    /// (entries/s, CPU ns per entry: this process, redis-servers)
    rounds: Vec<(f64, (f64, f64))>,
    /// Commands on every node from the heartbeat SET to the last arrival,
    /// all rounds.
    commands: Stats,
}

async fn drain_round(case: &mut DrainCase, setup: &Setup, http: &HttpTarget, n: usize) {
    let lanes = &case.lanes;
    for layer in &lanes.layers {
        tokio::time::timeout(Duration::from_secs(10), layer.view().wait_for(Health::Down))
            .await
            .expect("the view never saw the heartbeat go");
    }
    let filled = calls(&lanes.services, &[], n, &format!("{}/orders", http.url())).await;
    assert_eq!(filled.not_202, 0, "{}: fill not all buffered", case.label);
    http.clear();

    let client: Client = hyper_client();
    let replayers: Vec<ReplayHandle> = lanes
        .layers
        .iter()
        .map(|l| {
            l.replayer()
                .config(case.config.clone())
                .spawn(client.clone())
        })
        .collect();
    // Let them create their group and park on the absent heartbeat.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(http.received_count(), 0);

    let stats0 = setup.commandstats();
    let (bench0, redis0) = cpu(&setup.pids);
    let start = Instant::now();
    for target in &lanes.targets {
        setup
            .admin
            .query::<()>(redis::cmd("SET").arg(target.heartbeat_key()).arg(1))
            .await;
    }
    let mut progress = (Instant::now(), 0);
    loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let got = http.received_count();
        if got >= n {
            break;
        }
        if got != progress.1 {
            progress = (Instant::now(), got);
        } else if progress.0.elapsed() > STALL {
            panic!("{}: stalled at {got}/{n} delivered", case.label);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let (bench1, redis1) = cpu(&setup.pids);
    add_delta(&mut case.commands, &stats0, &setup.commandstats());

    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(http.received_count(), n, "{}: duplicates", case.label);
    let delivered: u64 = replayers.iter().map(ReplayHandle::delivered).sum();
    assert_eq!(delivered, n as u64);
    for replayer in replayers {
        replayer.shutdown().await;
    }
    for target in &lanes.targets {
        let left: u64 = setup
            .admin
            .query(redis::cmd("XLEN").arg(target.queue_key()))
            .await;
        assert_eq!(left, 0, "{}: entries left in {}", case.label, target);
        setup
            .admin
            .query::<()>(redis::cmd("DEL").arg(target.heartbeat_key()))
            .await;
    }
    let rate = n as f64 / secs;
    let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
    println!(
        "  {:<52} {:>8.0} entries/s ({:.2} s)  CPU/entry bench+target {:>5.1} µs redis {:>5.1} µs",
        case.label,
        rate,
        secs,
        per(bench0, bench1) / 1e3,
        per(redis0, redis1) / 1e3
    );
    case.rounds
        .push((rate, (per(bench0, bench1), per(redis0, redis1))));
}

// ---------------------------------------------------------------------------

fn wait_replica_linked(replica: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !replica
        .info("replication")
        .contains("master_link_status:up")
    {
        assert!(
            Instant::now() < deadline,
            "replica never linked:\n{}",
            replica.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let n_calls = env("CALLS", 20_000);
    let n_entries = env("ENTRIES", 20_000);
    let rounds = env("ROUNDS", 5).max(1);
    let drain_modes: Vec<String> = std::env::var("DRAIN")
        .unwrap_or_else(|_| "strict,relaxed".into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let aof = std::env::var("AOF").is_ok_and(|v| v == "1");
    let opts = RedisOptions::new().appendonly(aof);
    let started = Instant::now();

    // Every deployment up front (the idle ones cost little): rounds of all
    // cases can then be interleaved.
    let single = RedisServer::start_with(opts.clone());
    let primary = RedisServer::start_with(opts.clone().extra("repl-diskless-sync-delay", "0"));
    let replica = RedisServer::start_with(
        opts.clone()
            .extra("repl-diskless-sync-delay", "0")
            .extra("replicaof", &format!("127.0.0.1 {}", primary.port())),
    );
    let cluster = RedisCluster::start_with(3, 0, opts.clone());
    let replicated = RedisCluster::start_with(3, 1, opts.clone());
    wait_replica_linked(&replica);
    let names = cluster.keys_on_distinct_primaries(3);
    assert_eq!(
        replicated.keys_on_distinct_primaries(3),
        names,
        "both clusters split the slots the same way"
    );
    println!(
        "cluster bench (`cargo bench --bench cluster`): {} CPUs shared by every redis-server, this process' 2 runtime workers and the HTTP target; appendonly {}; {CALLERS} callers, 1 KiB POST bodies; targets {} (on 3 distinct primaries of each cluster); deployments up after {:.1} s; load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if aof { "yes (appendfsync always)" } else { "no" },
        names.join(", "),
        started.elapsed().as_secs_f64(),
        loadavg()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Everything runs as a task on the workers, like an application would.
    rt.block_on(async move {
        tokio::spawn(async move {
            let setups = [
                Setup::single("one server", &single, &[]).await,
                Setup::cluster("cluster 3 primaries", &cluster).await,
                Setup::single("one primary + 1 replica", &primary, &[&replica]).await,
                Setup::cluster("cluster 3 primaries + 3 replicas", &replicated).await,
            ];
            let one = &names[..1];
            let three = &names[..];
            let mut enqueue = Vec::new();
            for (setup, targets, wait) in [
                (0, one, false),
                (0, three, false),
                (1, three, false),
                (2, three, false),
                (2, three, true),
                (3, three, false),
                (3, three, true),
            ] {
                enqueue.push(EnqueueCase {
                    label: format!(
                        "{}, {} target{}{}",
                        setups[setup].label,
                        targets.len(),
                        if targets.len() == 1 { "" } else { "s" },
                        if wait { ", WAIT 1" } else { "" }
                    ),
                    setup,
                    lanes: lanes(&setups[setup], targets, wait).await,
                    rounds: Vec::new(),
                    commands: Stats::new(),
                });
            }

            println!("\n== 1. enqueue: {n_calls} calls through the layer, targets down ({rounds} rounds)");
            for round in 0..rounds {
                println!(" round {round}");
                for case in &mut enqueue {
                    let setup = &setups[case.setup];
                    enqueue_round(case, setup, n_calls).await;
                }
            }

            let http = HttpTarget::start().await;
            let mut drains = Vec::new();
            for mode in &drain_modes {
                let mut config = ReplayConfig::default();
                config.slow_start = Duration::ZERO;
                if mode == "relaxed" {
                    config.order = DeliveryOrder::Relaxed;
                } else {
                    assert_eq!(mode, "strict", "DRAIN takes strict and/or relaxed");
                }
                for (setup, targets) in [(0, one), (0, three), (1, three)] {
                    drains.push(DrainCase {
                        label: format!(
                            "{mode}, {}, {} target{}",
                            setups[setup].label,
                            targets.len(),
                            if targets.len() == 1 { "" } else { "s" },
                        ),
                        setup,
                        lanes: lanes(&setups[setup], targets, false).await,
                        config: config.clone(),
                        rounds: Vec::new(),
                        commands: Stats::new(),
                    });
                }
            }
            println!("\n== 2. drain: {n_entries} buffered entries -> HTTP target ({rounds} rounds)");
            for round in 0..rounds {
                println!(" round {round}");
                for case in &mut drains {
                    let setup = &setups[case.setup];
                    drain_round(case, setup, &http, n_entries).await;
                }
            }
            summary(&enqueue, &drains, n_calls, n_entries, rounds);
        })
        .await
        .unwrap()
    });
    println!(
        "\ntotal {:.0} s; load average at the end {}",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}

fn summary(
    enqueue: &[EnqueueCase],
    drains: &[DrainCase],
    n_calls: usize,
    n_entries: usize,
    rounds: usize,
) {
    println!();
    println!("============================== summary (medians of {rounds}) ==============================");
    println!("1. enqueue, {n_calls} calls, {CALLERS} callers, 1 KiB, targets down");
    println!(
        "   {:<52} {:>9} {:>9} {:>9} {:>13} {:>13} {:>8}",
        "deployment", "calls/s", "p50 ms", "p99 ms", "bench µs/call", "redis µs/call", "not 202"
    );
    let rate = |c: &EnqueueCase| median(c.rounds.iter().map(|r| r.rate).collect());
    for c in enqueue {
        println!(
            "   {:<52} {:>9.0} {:>9.2} {:>9.2} {:>13.1} {:>13.1} {:>8}",
            c.label,
            rate(c),
            median(
                c.rounds
                    .iter()
                    .map(|r| percentile(&r.latencies, 0.5))
                    .collect()
            ),
            median(
                c.rounds
                    .iter()
                    .map(|r| percentile(&r.latencies, 0.99))
                    .collect()
            ),
            median(c.rounds.iter().map(|r| r.cpu.0 / 1e3).collect()),
            median(c.rounds.iter().map(|r| r.cpu.1 / 1e3).collect()),
            c.rounds.iter().map(|r| r.not_202).sum::<usize>()
        );
    }
    let ratio = |a: usize, b: usize, what: &str| {
        println!("   {what:<62} {:.2}", rate(&enqueue[a]) / rate(&enqueue[b]));
    };
    println!("   Redis commands per call, all nodes (replicas included), all rounds:");
    for c in enqueue {
        println!(
            "   {:<52} {}",
            c.label,
            per_unit(&c.commands, n_calls * c.rounds.len())
        );
    }
    println!("   ratios of calls/s:");
    ratio(1, 0, "one server: 3 targets / 1 target");
    ratio(2, 1, "cluster 3 primaries / one server (3 targets)");
    ratio(3, 1, "one primary + replica / one server (3 targets)");
    ratio(4, 3, "one primary + replica: WAIT 1 / no WAIT");
    ratio(5, 2, "cluster with replicas / without (3 targets)");
    ratio(6, 5, "cluster with replicas: WAIT 1 / no WAIT");

    if drains.is_empty() {
        return;
    }
    println!("2. drain, {n_entries} entries (split over the targets) -> HTTP target, heartbeat SET -> last arrival");
    println!(
        "   {:<52} {:>10} {:>19} {:>15}",
        "mode, deployment", "entries/s", "bench+target µs/e", "redis µs/entry"
    );
    let rate = |c: &DrainCase| median(c.rounds.iter().map(|r| r.0).collect());
    for c in drains {
        println!(
            "   {:<52} {:>10.0} {:>19.1} {:>15.1}",
            c.label,
            rate(c),
            median(c.rounds.iter().map(|r| r.1 .0 / 1e3).collect()),
            median(c.rounds.iter().map(|r| r.1 .1 / 1e3).collect())
        );
    }
    println!("   Redis commands per entry, all nodes, heartbeat SET -> last arrival, all rounds:");
    for c in drains {
        println!(
            "   {:<52} {}",
            c.label,
            per_unit(&c.commands, n_entries * c.rounds.len())
        );
    }
    println!("   ratios of entries/s:");
    for group in drains.chunks(3) {
        let mode = group[0].label.split(',').next().unwrap_or("");
        println!(
            "   {:<66} {:.2}",
            format!("{mode}: one server 3 targets / 1 target"),
            rate(&group[1]) / rate(&group[0])
        );
        println!(
            "   {:<66} {:.2}",
            format!("{mode}: cluster 3 primaries / one server (3 targets)"),
            rate(&group[2]) / rate(&group[1])
        );
    }
}
