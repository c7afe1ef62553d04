//! What the layer costs, as ratios against baselines run in the same process.
//!
//! 1. `hot_path` (criterion): one call through the layer while the target is
//!    up, next to the bare inner service and next to tower's in-memory
//!    `Buffer` layer; POST with a 1 KiB body (held in memory in case it must
//!    be diverted) and GET (streamed through).
//! 2. Buffered calls per second while the target is down, 64 concurrent
//!    callers, 1 KiB bodies, next to `redis-benchmark -c 64` issuing `XADD`
//!    with a 1 KiB value on the same server, and next to a plain redis-rs loop
//!    of 64 tasks issuing that `XADD` on one multiplexed connection.
//!
//! Run with `cargo bench --bench layer`; `CALLS=100000` for longer runs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use redis::Commands;
use support::{RedisOptions, RedisServer};
use tower::{Service, ServiceExt};
use tower_heartbeat_buffer::{HeartbeatBufferLayer, RequestBody, Target, Watcher};
use tower_layer::Layer;

const KIB: &[u8] = &[b'x'; 1024];

fn post() -> Request<Full<Bytes>> {
    Request::post("http://target.invalid/orders")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(KIB)))
        .unwrap()
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://target.invalid/orders/1")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn answer<B>(_: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

async fn through<S, R>(service: &mut S, request: R)
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    black_box(response);
}

fn hot_path(c: &mut Criterion, rt: &tokio::runtime::Runtime, watcher: &Watcher, target: &Target) {
    let layer = rt
        .block_on(HeartbeatBufferLayer::builder(target.clone()).build(watcher))
        .unwrap();
    assert!(layer.view().is_up());

    let bare = tower::service_fn(answer::<Full<Bytes>>);
    let layered = layer.layer(tower::service_fn(answer::<RequestBody<Full<Bytes>>>));
    let buffered = {
        let _guard = rt.enter();
        tower::buffer::Buffer::new(tower::service_fn(answer::<Full<Bytes>>), 1024)
    };

    /// Times `iters` calls in a row on one clone of `service`.
    fn timed<S, R>(
        service: &S,
        make: fn() -> R,
        iters: u64,
    ) -> impl std::future::Future<Output = Duration>
    where
        S: Service<R> + Clone,
        S::Error: std::fmt::Debug,
    {
        let mut service = service.clone();
        async move {
            let start = Instant::now();
            for _ in 0..iters {
                through(&mut service, make()).await;
            }
            start.elapsed()
        }
    }

    let mut group = c.benchmark_group("hot_path");
    for (name, make) in [("post_1k", post as fn() -> _), ("get", get as fn() -> _)] {
        group.bench_function(format!("{name}/bare_inner_baseline"), |b| {
            b.to_async(rt)
                .iter_custom(|iters| timed(&bare, make, iters))
        });
        group.bench_function(format!("{name}/tower_buffer_peer"), |b| {
            b.to_async(rt)
                .iter_custom(|iters| timed(&buffered, make, iters))
        });
        group.bench_function(format!("{name}/heartbeat_buffer"), |b| {
            b.to_async(rt)
                .iter_custom(|iters| timed(&layered, make, iters))
        });
    }
    group.finish();
}

/// Calls per second of `calls` calls spread over 64 tasks.
async fn rate<F, Fut>(calls: usize, task: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|i| tokio::spawn(task(calls / 64 + usize::from(i < calls % 64))))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

fn redis_benchmark(server: &RedisServer, calls: usize) -> Option<f64> {
    let value = String::from_utf8(KIB.to_vec()).unwrap();
    let output = std::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
        .args(["-c", "64", "-n", &calls.to_string(), "-q"])
        .args(["XADD", "bench:redis-benchmark", "*", "body", &value])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "XADD ...: 81234.57 requests per second, p50=..." (lines are
    // overwritten with \r while it runs; the last one holds the result).
    let last = text
        .rsplit(['\r', '\n'])
        .find(|l| l.contains("requests per second"))?;
    let before = last.split(" requests per second").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

fn throughput(rt: &tokio::runtime::Runtime, calls: usize) {
    // No AOF fsync here: the figure is about the client path, and every
    // contender writes to the same server with the same settings.
    let server = RedisServer::start_with(RedisOptions::new().appendonly(false));
    let target = Target::new("down").unwrap();
    let watcher = rt.block_on(Watcher::connect(server.client())).unwrap();
    let layer = rt
        .block_on(
            HeartbeatBufferLayer::builder(target.clone())
                .max_queue_len(u64::MAX / 2)
                .build(&watcher),
        )
        .unwrap();
    assert!(!layer.view().is_up());
    let service = layer.layer(tower::service_fn(answer::<RequestBody<Full<Bytes>>>));

    let mut results = Vec::new();
    for round in 0..3 {
        let ours = rt.block_on(rate(calls, |n| {
            let mut service = service.clone();
            async move {
                for _ in 0..n {
                    let response = service.ready().await.unwrap().call(post()).await.unwrap();
                    assert_eq!(response.status(), StatusCode::ACCEPTED);
                }
            }
        }));
        let _: () = server.conn().del(target.queue_key()).unwrap();
        if std::env::var_os("ONLY_LAYER").is_some() {
            // For profiling the layer alone.
            println!("round {round}: layer {ours:>9.0}/s");
            continue;
        }

        let conn = rt
            .block_on(redis::aio::ConnectionManager::new(server.client()))
            .unwrap();
        let plain = rt.block_on(rate(calls, |n| {
            let mut conn = conn.clone();
            async move {
                for _ in 0..n {
                    let _: String = redis::cmd("XADD")
                        .arg("bench:plain")
                        .arg("*")
                        .arg("body")
                        .arg(KIB)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                }
            }
        }));
        let _: () = server.conn().del("bench:plain").unwrap();

        // Diagnostic: the layer's own enqueue script with the same fields,
        // issued by a plain loop (server-side cost of the script, without
        // the layer's client-side work).
        let fields: Vec<(&str, Vec<u8>)> = {
            let (parts, _) = post().into_parts();
            tower_heartbeat_buffer::envelope::Envelope::capture(
                "0192a0b0-0000-7000-8000-000000000000",
                &parts,
                Bytes::from_static(KIB),
                &Default::default(),
                0,
            )
            .to_fields()
        };
        let fields = std::sync::Arc::new(fields);
        let script = std::sync::Arc::new(redis::Script::new(
            "local len = redis.call('XLEN', KEYS[1]) if len >= tonumber(ARGV[1]) then return {0, len} end local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2)) return {id, len + 1}",
        ));
        let scripted = rt.block_on(rate(calls, |n| {
            let mut conn = conn.clone();
            let fields = fields.clone();
            let script = script.clone();
            async move {
                for _ in 0..n {
                    let mut invocation = script.key("bench:script");
                    invocation.arg(u64::MAX / 2);
                    for (k, v) in fields.iter() {
                        invocation.arg(*k).arg(v.as_slice());
                    }
                    let _: redis::Value = invocation.invoke_async(&mut conn).await.unwrap();
                }
            }
        }));
        let _: () = server.conn().del("bench:script").unwrap();
        println!("  (diagnostic: plain loop running the enqueue script {scripted:>9.0}/s)");
        let xadd_fields = rt.block_on(rate(calls, |n| {
            let mut conn = conn.clone();
            let fields = fields.clone();
            async move {
                for _ in 0..n {
                    let mut pipe = redis::pipe();
                    let cmd = pipe.cmd("XADD").arg("bench:fields").arg("*");
                    for (k, v) in fields.iter() {
                        cmd.arg(*k).arg(v.as_slice());
                    }
                    pipe.cmd("XLEN").arg("bench:fields");
                    let _: (String, u64) = pipe.query_async(&mut conn).await.unwrap();
                }
            }
        }));
        let _: () = server.conn().del("bench:fields").unwrap();
        println!("  (diagnostic: plain loop pipelining XADD 8 fields + XLEN {xadd_fields:>9.0}/s)");

        let benchmark = redis_benchmark(&server, calls);
        let _: () = server.conn().del("bench:redis-benchmark").unwrap();
        println!(
            "round {round}: layer {ours:>9.0}/s   plain redis-rs XADD {plain:>9.0}/s   redis-benchmark XADD {}",
            benchmark.map_or("unavailable".into(), |b| format!("{b:>9.0}/s"))
        );
        results.push((ours, plain, benchmark));
    }
    if results.is_empty() {
        return;
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ours = median(results.iter().map(|r| r.0).collect());
    let plain = median(results.iter().map(|r| r.1).collect());
    println!("buffered calls/s, 64 callers, 1 KiB bodies (median of 3):");
    println!("  layer           {ours:>9.0}/s");
    println!(
        "  plain redis-rs  {plain:>9.0}/s   ratio layer/plain {:.2}",
        ours / plain
    );
    let benchmarks: Vec<f64> = results.iter().filter_map(|r| r.2).collect();
    if benchmarks.len() == results.len() {
        let benchmark = median(benchmarks);
        println!(
            "  redis-benchmark {benchmark:>9.0}/s   ratio layer/redis-benchmark {:.2}",
            ours / benchmark
        );
    } else {
        println!("  redis-benchmark not found: install redis-tools for that baseline");
    }
}

fn main() {
    let calls: usize = std::env::var("CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let server = RedisServer::start();
    let target = Target::new("up").unwrap();
    let _: () = server.conn().set(target.heartbeat_key(), 1).unwrap();
    let watcher = rt
        .block_on(
            Watcher::builder()
                .reconcile_interval(Duration::from_secs(3600))
                .connect(server.client()),
        )
        .unwrap();
    let mut criterion = Criterion::default().configure_from_args();
    hot_path(&mut criterion, &rt, &watcher, &target);
    criterion.final_summary();

    println!();
    throughput(&rt, calls);
}
