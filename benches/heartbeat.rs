//! What knowing a target's health costs, and how fast a change is known.
//!
//! Two parts, each a ratio against a baseline measured in the same run:
//!
//! 1. `state_read`: one [`TargetView::is_up`] next to a plain atomic load
//!    (criterion).
//! 2. Detection latency, p50/p99 over `TRIALS` trials on a private
//!    `redis-server`: DEL -> view down, next to a raw subscriber receiving
//!    the `del` keyspace event; TTL expiry -> view down (counted from the
//!    deadline), next to Redis's own `expired` event for a key nobody reads.
//!
//! Run with `cargo bench --bench heartbeat`; `TRIALS=500` for more trials.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use redis::Commands;
use support::RedisServer;
use tower_heartbeat_buffer::{Health, Target, TargetView, Watcher};

fn state_read(c: &mut Criterion, view: &TargetView) {
    let mut group = c.benchmark_group("state_read");
    let plain = AtomicU8::new(1);
    group.bench_function("atomic_load_baseline", |b| {
        b.iter(|| black_box(&plain).load(Ordering::Acquire) == 1)
    });
    group.bench_function("target_view_is_up", |b| b.iter(|| black_box(view).is_up()));
    group.bench_function("target_view_health", |b| {
        b.iter(|| black_box(view).health())
    });
    group.finish();
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |p: usize| v[(v.len() - 1) * p / 100];
    (at(50), at(99), at(100))
}

fn report(name: &str, ours: Vec<Duration>, baseline_name: &str, baseline: Vec<Duration>) {
    let (o50, o99, omax) = percentiles(ours);
    let (b50, b99, bmax) = percentiles(baseline);
    println!("{name}: p50 {o50:>10.3?}  p99 {o99:>10.3?}  max {omax:>10.3?}");
    println!("{baseline_name}: p50 {b50:>10.3?}  p99 {b99:>10.3?}  max {bmax:>10.3?}");
    println!(
        "  ratio ours/baseline: p50 {:.2}  p99 {:.2}",
        o50.as_secs_f64() / b50.as_secs_f64().max(1e-9),
        o99.as_secs_f64() / b99.as_secs_f64().max(1e-9)
    );
}

/// Waits for the next message on `pubsub` whose payload or channel ends
/// with `needle`; returns when it arrived.
fn next_event(pubsub: &mut redis::PubSub<'_>, needle: &str, bound: Duration) -> Option<Instant> {
    let until = Instant::now() + bound;
    while Instant::now() < until {
        if let Ok(msg) = pubsub.get_message() {
            let payload: String = msg.get_payload().unwrap_or_default();
            if payload == needle || msg.get_channel_name().ends_with(needle) {
                return Some(Instant::now());
            }
        }
    }
    None
}

fn detection(rt: &tokio::runtime::Runtime, server: &RedisServer, trials: usize) {
    let watcher = rt.block_on(Watcher::connect(server.client())).unwrap();
    let target = Target::new("bench").unwrap();
    let key = target.heartbeat_key();
    let view = rt.block_on(watcher.watch(&target));
    let mut conn = server.conn();

    // A raw subscriber on the same key's keyspace channel: the floor that
    // any notification-driven watcher sits on.
    let mut raw = server.client().get_connection().unwrap();
    raw.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut raw = raw.as_pubsub();
    raw.subscribe(format!("__keyspace@0__:{key}")).unwrap();

    let mut ours_del = Vec::with_capacity(trials);
    let mut raw_del = Vec::with_capacity(trials);
    for _ in 0..trials {
        let _: () = conn.set(&key, 1).unwrap();
        rt.block_on(view.wait_for(Health::Up));
        next_event(&mut raw, &key, Duration::from_secs(1));
        let mut changes = view.changes();
        changes.mark_unchanged();
        let start = Instant::now();
        let _: () = conn.del(&key).unwrap();
        let raw_at = next_event(&mut raw, &key, Duration::from_secs(5)).expect("del event");
        rt.block_on(view.wait_for(Health::Down));
        ours_del.push(start.elapsed());
        raw_del.push(raw_at - start);
    }
    report(
        "DEL -> view down            ",
        ours_del,
        "DEL -> raw keyspace event   ",
        raw_del,
    );

    // TTL expiry, counted from the deadline (taken when SET returned, so it
    // is never early).
    let ttl = Duration::from_millis(50);
    let mut ours_exp = Vec::with_capacity(trials);
    for _ in 0..trials {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(1)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query(&mut conn)
            .unwrap();
        let deadline = Instant::now() + ttl;
        rt.block_on(view.wait_for(Health::Up));
        rt.block_on(view.wait_for(Health::Down));
        ours_exp.push(Instant::now().saturating_duration_since(deadline));
    }

    // Redis's own `expired` event for a key nobody reads (reading it would
    // make Redis expire it lazily, and emit the event, at once).
    let mut events = server.client().get_connection().unwrap();
    events
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut events = events.as_pubsub();
    events.subscribe("__keyevent@0__:expired").unwrap();
    let mut redis_exp = Vec::with_capacity(trials);
    for i in 0..trials {
        let lonely = format!("lonely:{i}");
        let _: () = redis::cmd("SET")
            .arg(&lonely)
            .arg(1)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query(&mut conn)
            .unwrap();
        let deadline = Instant::now() + ttl;
        let at = next_event(&mut events, &lonely, Duration::from_secs(10)).expect("expired event");
        redis_exp.push(at.saturating_duration_since(deadline));
    }
    report(
        "TTL deadline -> view down   ",
        ours_exp,
        "TTL deadline -> redis expired",
        redis_exp,
    );
}

fn main() {
    let trials: usize = std::env::var("TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let target = Target::new("hot").unwrap();
    let _: () = server.conn().set(target.heartbeat_key(), 1).unwrap();
    let watcher = rt.block_on(Watcher::connect(server.client())).unwrap();
    let view = rt.block_on(watcher.watch(&target));
    assert!(view.is_up());

    let mut criterion = Criterion::default().configure_from_args();
    state_read(&mut criterion, &view);
    criterion.final_summary();

    println!("\ndetection latency, {trials} trials each, private redis-server:");
    detection(&rt, &server, trials);
}
