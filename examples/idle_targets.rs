//! What watching and draining many targets costs while nothing happens.
//!
//! ```text
//! cargo run --release --example idle_targets
//! cargo run --release --example idle_targets -- --targets 1,10,100,500 --window 20
//! ```
//!
//! Starts a private `redis-server` (from `$REDIS_SERVER_BIN` or `$PATH`) on
//! a free loopback port in a temp dir (`appendonly yes`, `appendfsync
//! always`, keyspace notifications `KA`, as the demo runs it), and kills it
//! at the end; it never touches port 6379.
//!
//! For each count of targets (`--targets`, default `1,10,100`) and each
//! state (`--states`, default `up,down`) it builds, in this process, what an
//! application would: one [`Watcher`] on one [`Backend`], and per target a
//! [`HeartbeatBufferLayer`], the service it wraps (a hyper-util client) and
//! a replayer (`layer.replayer().spawn(client)`, default configuration).
//! `up`: every heartbeat key is set without a TTL; `down`: none is. After
//! `--settle` seconds (default 3) it measures over `--window` seconds
//! (default 10) of idle:
//!
//! - `conns`: client connections Redis sees (`CLIENT LIST`, without this
//!   example's own admin connection);
//! - `tasks`: alive Tokio tasks of the runtime
//!   (`Handle::metrics().num_alive_tasks()`);
//! - `CPU %`: this process' CPU time (utime + stime of `/proc/self/stat`)
//!   over wall time, 100 % = one core (10 ms ticks: ±0.1 % over 10 s);
//! - `RSS MiB`: this process' `VmRSS` at the end of the window;
//! - `cmds/s`: commands Redis executed per second (`INFO commandstats`
//!   deltas, without this example's own `INFO` and `CLIENT LIST`; like
//!   `total_commands_processed`, it counts the commands a script runs as
//!   well as the `EVALSHA`);
//! - `sent/s`: commands this process sent per second, scripts counted once
//!   (a `MONITOR` sample of 3 s taken after the window, since `MONITOR`
//!   slows Redis down);
//! - `redis CPU %`: the redis-server's CPU time over wall time.
//!
//! A first row with nothing built shows the floor (the runtime, an idle
//! redis-server). Then the commands that made up the traffic, per row, and
//! the cost of one more target (from the first and last counts).
//! Everything is torn down between rows (replayers shut down, layers and
//! watcher dropped, keys deleted).

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::error::Error;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use redis::aio::MultiplexedConnection;
use tower_heartbeat_buffer::replay::ReplayHandle;
use tower_heartbeat_buffer::{Backend, HeartbeatBufferLayer, RequestBody, Target, Watcher};
use tower_layer::Layer;

use common::private_redis::PrivateRedis;

type HttpClient = Client<HttpConnector, RequestBody<Full<Bytes>>>;

/// This example's own connection to Redis (for setup and INFO), by name, so
/// it can be left out of the connection count.
const ADMIN_NAME: &str = "idle-targets-admin";
/// How long `MONITOR` samples the commands sent, after each window.
const MONITOR_SAMPLE: Duration = Duration::from_secs(3);

struct Args {
    targets: Vec<usize>,
    states: Vec<bool>,
    settle: Duration,
    window: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: idle_targets [--targets 1,10,100] [--states up,down] [--settle SECS] [--window SECS]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        targets: vec![1, 10, 100],
        states: vec![true, false],
        settle: Duration::from_secs(3),
        window: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        let secs = |v: &str| Duration::from_secs_f64(v.parse().unwrap_or_else(|_| usage()));
        match flag.as_str() {
            "--targets" => {
                args.targets = value
                    .split(',')
                    .map(|n| n.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--states" => {
                args.states = value
                    .split(',')
                    .map(|s| match s.trim() {
                        "up" => true,
                        "down" => false,
                        _ => usage(),
                    })
                    .collect()
            }
            "--settle" => args.settle = secs(&value),
            "--window" => args.window = secs(&value),
            _ => usage(),
        }
    }
    if args.targets.is_empty() || args.states.is_empty() || args.window.is_zero() {
        usage();
    }
    args
}

// ------------------------------------------------------------- measuring

/// utime + stime of a process, in seconds (`/proc/<pid>/stat`, in ticks of
/// 1/100 s: USER_HZ is 100 on Linux).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces: the fields follow its last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 (utime) and 15 (stime); `fields[0]` is field 3 (state).
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `cmdstat_<name>` -> calls.
async fn commandstats(
    admin: &mut MultiplexedConnection,
) -> redis::RedisResult<BTreeMap<String, u64>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(admin)
        .await?;
    Ok(info
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, stats) = l.split_once(':')?;
            let calls = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect())
}

/// Connections Redis sees, without ours.
async fn connections(admin: &mut MultiplexedConnection) -> redis::RedisResult<usize> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(admin).await?;
    Ok(list
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains(&format!(" name={ADMIN_NAME} ")))
        .count())
}

struct Row {
    label: String,
    targets: usize,
    conns: usize,
    tasks: usize,
    cpu: f64,
    rss: f64,
    cmds: f64,
    redis_cpu: f64,
    /// Commands per second, by name, busiest first.
    by_command: Vec<(String, f64)>,
    /// Commands sent per second (MONITOR sample: not those run inside
    /// scripts), and by name, busiest first.
    sent: f64,
    sent_by_command: Vec<(String, f64)>,
}

/// Top-level commands per second over `sample` (`MONITOR`: commands that
/// scripts run are tagged `lua` and left out, as are this example's own),
/// in total and by name. Runs after the measuring window: MONITOR slows
/// Redis down.
async fn monitor_sample(
    url: &str,
    sample: Duration,
) -> redis::RedisResult<(f64, Vec<(String, f64)>)> {
    use futures_util::StreamExt;
    let mut monitor = redis::Client::open(url)?.get_async_monitor().await?;
    let mut lines = monitor.on_message::<String>();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + sample;
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, lines.next()).await {
        // `1700000000.123456 [0 127.0.0.1:5555] "XLEN" "key"`
        let Some((client, rest)) = line.split_once("] ") else {
            continue;
        };
        if client.ends_with(" lua") {
            continue;
        }
        let name = rest.split('"').nth(1).unwrap_or("?").to_ascii_lowercase();
        if matches!(name.as_str(), "info" | "client") {
            continue;
        }
        *counts.entry(name).or_default() += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let mut by_name: Vec<(String, f64)> = counts
        .into_iter()
        .map(|(name, n)| (name, n as f64 / secs))
        .collect();
    by_name.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok((
        by_name.iter().map(|(_, r)| r).fold(0.0, |a, b| a + b),
        by_name,
    ))
}

async fn measure(
    label: String,
    targets: usize,
    window: Duration,
    admin: &mut MultiplexedConnection,
    redis: &PrivateRedis,
) -> redis::RedisResult<Row> {
    let redis_pid = redis.pid();
    let redis_pid = redis_pid.to_string();
    let stats0 = commandstats(admin).await?;
    let (cpu0, redis0, t0) = (cpu_secs("self"), cpu_secs(&redis_pid), Instant::now());
    tokio::time::sleep(window).await;
    let (cpu1, redis1, secs) = (
        cpu_secs("self"),
        cpu_secs(&redis_pid),
        t0.elapsed().as_secs_f64(),
    );
    let stats1 = commandstats(admin).await?;
    let mut by_command: Vec<(String, f64)> = stats1
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "client|list"))
        .map(|(name, calls)| {
            let before = stats0.get(name).copied().unwrap_or(0);
            (name.clone(), (calls - before) as f64 / secs)
        })
        .filter(|(_, rate)| *rate > 0.0)
        .collect();
    by_command.sort_by(|a, b| b.1.total_cmp(&a.1));
    let conns = connections(admin).await?;
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let rss = rss_mib();
    let (sent, sent_by_command) = monitor_sample(redis.url(), MONITOR_SAMPLE).await?;
    Ok(Row {
        label,
        targets,
        conns,
        tasks,
        cpu: (cpu1 - cpu0) / secs * 100.0,
        rss,
        cmds: by_command.iter().map(|(_, r)| r).fold(0.0, |a, b| a + b),
        redis_cpu: (redis1 - redis0) / secs * 100.0,
        by_command,
        sent,
        sent_by_command,
    })
}

fn print_header() {
    println!(
        "{:>7} {:<6} {:>6} {:>6} {:>7} {:>8} {:>8} {:>8} {:>12}",
        "targets", "state", "conns", "tasks", "CPU %", "RSS MiB", "cmds/s", "sent/s", "redis CPU %"
    );
}

fn print_row(r: &Row) {
    println!(
        "{:>7} {:<6} {:>6} {:>6} {:>7.2} {:>8.1} {:>8.1} {:>8.1} {:>12.2}",
        r.targets, r.label, r.conns, r.tasks, r.cpu, r.rss, r.cmds, r.sent, r.redis_cpu
    );
}

// ------------------------------------------------------------- one case

async fn run_case(
    redis: &PrivateRedis,
    n: usize,
    up: bool,
    args: &Args,
    admin: &mut MultiplexedConnection,
) -> Result<Row, Box<dyn Error>> {
    let targets: Vec<Target> = (0..n)
        .map(|i| Target::new(&format!("idle-{i:04}")))
        .collect::<Result<_, _>>()?;
    for target in &targets {
        let mut cmd = redis::cmd(if up { "SET" } else { "DEL" });
        cmd.arg(target.heartbeat_key());
        if up {
            cmd.arg(1);
        }
        cmd.exec_async(admin).await?;
    }

    let backend = Backend::open(redis.url())?;
    let watcher = Watcher::connect(backend).await?;
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut services = Vec::with_capacity(n);
    let mut replayers: Vec<ReplayHandle> = Vec::with_capacity(n);
    for target in &targets {
        let layer = HeartbeatBufferLayer::builder(target.clone())
            .build(&watcher)
            .await?;
        // What the application would call through, held while idle.
        services.push(layer.clone().layer(client.clone()));
        replayers.push(layer.replayer().spawn(client.clone()));
    }

    tokio::time::sleep(args.settle).await;
    let row = measure(
        (if up { "up" } else { "down" }).into(),
        n,
        args.window,
        admin,
        redis,
    )
    .await?;

    for replayer in replayers {
        replayer.shutdown().await;
    }
    drop(services);
    drop(watcher);
    let mut keys = Vec::new();
    for target in &targets {
        let pattern = format!("{}:{{{}}}:*", target.namespace(), target.name());
        let found: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(admin).await?;
        keys.extend(found);
    }
    if !keys.is_empty() {
        redis::cmd("DEL").arg(&keys).exec_async(admin).await?;
    }
    // Let the dropped connections close before the next row counts them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while connections(admin).await? > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(row)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args();
    let redis = PrivateRedis::start(
        "thb-idle-redis-",
        "idle_targets",
        "install it with `sudo apt-get install redis-server` (or `brew install redis`) \
         or set REDIS_SERVER_BIN=/path/to/redis-server",
    )?;
    println!(
        "idle_targets: private redis-server (pid {}) on {}, appendfsync always; {} CPUs; settle {:?}, window {:?}",
        redis.pid(),
        redis.url(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.settle,
        args.window
    );
    let mut admin = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(ADMIN_NAME)
        .exec_async(&mut admin)
        .await?;

    let mut rows = Vec::new();
    print_header();
    let floor = measure("none".into(), 0, args.window, &mut admin, &redis).await?;
    print_row(&floor);
    rows.push(floor);
    for &n in &args.targets {
        for &up in &args.states {
            let row = run_case(&redis, n, up, &args, &mut admin).await?;
            print_row(&row);
            rows.push(row);
        }
    }

    let list = |v: &[(String, f64)]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.iter()
                .map(|(name, rate)| format!("{name} {rate:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    println!(
        "\ncommands/s by name: executed (INFO commandstats over the window; the commands scripts run count both as their own and in evalsha) | sent (MONITOR, {MONITOR_SAMPLE:?} after the window)"
    );
    for r in &rows {
        println!(
            "  {:>4} {:<5} executed: {}",
            r.targets,
            r.label,
            list(&r.by_command)
        );
        println!(
            "  {:>4} {:<5} sent:     {}",
            "",
            "",
            list(&r.sent_by_command)
        );
    }

    let (lo, hi) = (
        *args.targets.iter().min().unwrap_or(&0),
        *args.targets.iter().max().unwrap_or(&0),
    );
    if hi > lo {
        println!(
            "\nper additional target (rows {hi} minus {lo}, divided by {}):",
            hi - lo
        );
        for state in ["up", "down"] {
            let find = |n: usize| rows.iter().find(|r| r.targets == n && r.label == state);
            if let (Some(a), Some(b)) = (find(lo), find(hi)) {
                let d = (hi - lo) as f64;
                println!(
                    "  {state:<5} conns {:+.2}  tasks {:+.2}  CPU {:+.4} %  RSS {:+.1} KiB  cmds/s {:+.2}  sent/s {:+.2}  redis CPU {:+.4} %",
                    (b.conns as f64 - a.conns as f64) / d,
                    (b.tasks as f64 - a.tasks as f64) / d,
                    (b.cpu - a.cpu) / d,
                    (b.rss - a.rss) * 1024.0 / d,
                    (b.cmds - a.cmds) / d,
                    (b.sent - a.sent) / d,
                    (b.redis_cpu - a.redis_cpu) / d
                );
            }
        }
    }
    Ok(())
}
