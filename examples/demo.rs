//! The whole story in one process, narrated: a service goes away (politely,
//! then by crashing), its callers keep getting answers, and nothing they
//! were told is accepted gets lost.
//!
//! ```text
//! cargo run --example demo                                  # private redis-server
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --example demo   # an existing one
//! ```
//!
//! Without `REDIS_URL` the demo starts its own `redis-server` (from
//! `$REDIS_SERVER_BIN` or `$PATH`) on a free loopback port, in a temp dir,
//! with the append-only file fsync'd on every write, and kills it at the
//! end; it never touches port 6379 unless `REDIS_URL` says so. With
//! `REDIS_URL`, its keys live under a namespace of their own
//! (`thb-demo-<ms>`) and are removed at the end.
//!
//! In this process:
//!
//! - `orders`, a small axum service on a free port: it records the
//!   `Idempotency-Key` of every order it receives (so a replayed duplicate
//!   would be recognised) and keeps its heartbeat with [`Heartbeat`] (TTL
//!   1 s);
//! - a caller: a hyper client wrapped in [`HeartbeatBufferLayer`], and the
//!   replayer that delivers what was buffered.
//!
//! The last line is `tally: sent=N forwarded=A buffered=B delivered=C
//! lost=L`: `forwarded` calls were answered by `orders` directly, `buffered`
//! ones got `202 Accepted`, `delivered` ones were replayed, and `lost`
//! counts requests answered `202` or 2xx whose key `orders` never saw. The
//! exit status is 0 when nothing was lost and everything buffered was
//! delivered. Logs (default level `warn`) follow `$RUST_LOG` on stderr.

#[allow(dead_code)]
#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeSet, HashMap};
use std::error::Error;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tower::{ServiceBuilder, ServiceExt};
use tower_heartbeat_buffer::replay::{ReplayEvent, ReplayEventKind};
use tower_heartbeat_buffer::{
    Buffered, Health, Heartbeat, HeartbeatBuffer, HeartbeatBufferLayer, NotificationMode,
    RequestBody, Target, TargetView, Unavailable, Watcher, DEFAULT_NAMESPACE,
};
use tracing_subscriber::EnvFilter;

use common::private_redis::PrivateRedis;

/// The heartbeat's time to live: how long a crashed `orders` is still
/// believed up.
const TTL: Duration = Duration::from_secs(1);
/// Longest wait for anything that should happen (then the demo fails).
const PATIENCE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    println!("tower-heartbeat-buffer demo: calls to a service that goes away and comes back");
    let redis = match Redis::from_env() {
        Ok(redis) => redis,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(1);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("a Tokio runtime");
    let code = runtime.block_on(async {
        let stop = common::shutdown_signal().expect("signal handlers");
        tokio::select! {
            result = run(&redis) => result.unwrap_or_else(|e| {
                eprintln!("demo failed: {e}");
                1
            }),
            _ = stop => {
                eprintln!("interrupted");
                130
            }
        }
    });
    // Every task (replayer, heartbeat, servers) stops before Redis does.
    drop(runtime);
    drop(redis);
    ExitCode::from(code)
}

async fn run(redis: &Redis) -> Result<u8, Box<dyn Error>> {
    let client = redis::Client::open(redis.url())?;
    let target = Target::with_namespace(redis.namespace(), "orders")?;
    let watcher = Watcher::builder()
        // Our own server: let the watcher turn keyspace notifications on.
        .configure_notifications(redis.is_private())
        .connect(client.clone())
        .await?;

    let mut orders = Orders::start(&client, &target).await?;
    println!(
        "orders: an axum service on http://{}, POST /orders\n        \
         heartbeat {} (TTL {} ms, refreshed every {} ms)\n        \
         it remembers every Idempotency-Key it gets",
        orders.addr,
        target.heartbeat_key(),
        TTL.as_millis(),
        (TTL / 3).as_millis()
    );

    let layer = HeartbeatBufferLayer::builder(target.clone())
        .build(&watcher)
        .await?;
    if let NotificationMode::ReconcileOnly | NotificationMode::Partial = watcher.notification_mode()
    {
        println!(
            "redis:  keyspace notifications are off or partial there, so the caller sees\n        \
             heartbeat changes at its next reconciliation (every second) or TTL deadline"
        );
    }
    let http: Client<HttpConnector, RequestBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let replayer = layer.replayer().spawn(http.clone());
    let delivered = print_replays(replayer.events());
    let view = layer.view().clone();
    let mut caller = Caller {
        service: ServiceBuilder::new().layer(layer).service(http),
        url: format!("http://{}/orders", orders.addr),
        sent: 0,
        forwarded: Vec::new(),
        buffered: Vec::new(),
        failed: 0,
    };
    println!(
        "caller: a hyper client wrapped in HeartbeatBufferLayer, and a replayer\n        \
         buffer {}",
        target.queue_key()
    );
    let mut redis_conn = client.get_multiplexed_async_connection().await?;

    println!();
    println!("1. orders is up: the caller's calls go straight to it (no Redis on this path)");
    view.wait_for(Health::Up).await;
    for _ in 0..3 {
        caller.send().await;
    }

    println!();
    println!("2. orders stops gracefully: it deletes its heartbeat first, then closes its port");
    let stopping = Instant::now();
    orders.delete_heartbeat().await?;
    within(
        view.wait_for(Health::Down),
        "the caller to see the heartbeat go",
    )
    .await?;
    println!(
        "   the caller saw the heartbeat go {:.1} ms later: writes are now stored, not sent",
        ms(stopping.elapsed())
    );
    orders.stop().await;
    let before = orders.received();
    for _ in 0..4 {
        caller.send().await;
    }
    println!(
        "   orders received {} of them; Redis holds them: XLEN {} = {}",
        orders.received() - before,
        target.queue_key(),
        xlen(&mut redis_conn, &target).await?
    );

    println!();
    println!("3. orders starts again on the same port and publishes its heartbeat:");
    println!("   the replayer delivers the buffer, oldest first, each with its Idempotency-Key");
    orders.restart(&client).await?;
    wait_delivered(&delivered, &caller.buffered).await?;
    wait_backlog_empty(&view).await?;
    println!("   the buffer is empty again, so calls go straight through:");
    caller.send().await;

    println!();
    println!(
        "4. orders crashes: its port closes at once, its heartbeat is left to expire ({} ms)",
        TTL.as_millis()
    );
    let crashed = Instant::now();
    orders.crash().await;
    match view.is_up() {
        true => println!(
            "   the heartbeat still says up, so the next call is tried; it fails and is stored:"
        ),
        false => println!("   the caller already sees orders down, so the next call is stored:"),
    }
    caller.send().await;
    println!(
        "   the replayer sees a live heartbeat and a stored request: it tries, fails, backs off"
    );
    println!("   later writes join the buffer behind it (strict order), without trying:");
    caller.send().await;
    caller.send().await;
    within(view.wait_for(Health::Down), "the heartbeat to expire").await?;
    println!(
        "   the heartbeat expired: the caller saw orders down {:.0} ms after the crash",
        ms(crashed.elapsed())
    );
    println!(
        "   from now on the replayer waits for the heartbeat to return, and writes are stored:"
    );
    caller.send().await;
    println!(
        "   Redis holds them: XLEN {} = {}",
        target.queue_key(),
        xlen(&mut redis_conn, &target).await?
    );

    println!();
    println!("5. orders restarts: the replayer resumes and delivers the rest");
    orders.restart(&client).await?;
    let drained = wait_delivered(&delivered, &caller.buffered).await;
    if let Err(e) = &drained {
        println!("   {e}");
    }
    let backlog = xlen(&mut redis_conn, &target).await?;

    replayer.shutdown().await;
    orders.delete_heartbeat().await?;
    orders.stop().await;

    // The tally, from the target's own record of idempotency keys.
    let seen = orders.seen();
    let delivered = delivered.borrow().clone();
    let answered = caller.forwarded.iter().chain(&caller.buffered);
    let lost: Vec<&String> = answered.filter(|key| !seen.contains_key(*key)).collect();
    let duplicates = seen.values().filter(|&&n| n > 1).count();
    let replayed = caller
        .buffered
        .iter()
        .filter(|key| delivered.contains(*key))
        .count();
    println!();
    let twice = match duplicates {
        0 => "none twice".to_owned(),
        n => format!("{n} more than once (answered from its record, not recorded again)"),
    };
    println!(
        "orders received {} distinct idempotency keys, {twice}; {backlog} left in the buffer",
        seen.len()
    );
    if !lost.is_empty() {
        println!("NOT RECEIVED by orders although answered 202 or 2xx: {lost:?}");
    }
    if caller.failed > 0 {
        println!("{} calls failed or were refused", caller.failed);
    }
    if !redis.is_private() {
        common::walkthrough::remove_keys(&client, &target).await?;
    }
    println!(
        "tally: sent={} forwarded={} buffered={} delivered={} lost={}",
        caller.sent,
        caller.forwarded.len(),
        caller.buffered.len(),
        replayed,
        lost.len()
    );
    let ok = lost.is_empty() && replayed == caller.buffered.len() && drained.is_ok();
    Ok(if ok { 0 } else { 1 })
}

// ------------------------------------------------------------------ caller

/// The caller's side: sends orders through the layer and keeps score.
struct Caller {
    service: HeartbeatBuffer<Client<HttpConnector, RequestBody<Full<Bytes>>>>,
    url: String,
    sent: usize,
    /// Keys answered 2xx by `orders` itself.
    forwarded: Vec<String>,
    /// Keys answered `202 Accepted` by the layer (stored in Redis).
    buffered: Vec<String>,
    failed: usize,
}

impl Caller {
    /// Sends order number `sent + 1`, with its own `Idempotency-Key`, and
    /// says what came back.
    async fn send(&mut self) {
        self.sent += 1;
        let key = format!("order-{}", self.sent);
        let request = http::Request::post(&self.url)
            .header("idempotency-key", &key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                "{{\"order\":{}}}",
                self.sent
            ))))
            .expect("a valid request");
        let response = match self.service.clone().oneshot(request).await {
            Ok(response) => response,
            Err(e) => {
                self.failed += 1;
                println!("   POST {key} -> error: {e}");
                return;
            }
        };
        let status = response.status();
        if let Some(buffered) = response.extensions().get::<Buffered>() {
            println!(
                "   POST {key} -> {status}: stored, buffer length {}",
                buffered.queue_len()
            );
            self.buffered.push(key);
        } else if let Some(unavailable) = response.extensions().get::<Unavailable>() {
            self.failed += 1;
            println!("   POST {key} -> {status}: {}", unavailable.reason());
        } else if status.is_success() {
            println!("   POST {key} -> {status} from orders");
            self.forwarded.push(key);
        } else {
            self.failed += 1;
            println!("   POST {key} -> {status} from orders");
        }
    }
}

/// Prints every replay event; the returned channel holds the keys delivered
/// so far.
fn print_replays(
    mut events: tokio::sync::broadcast::Receiver<ReplayEvent>,
) -> watch::Receiver<BTreeSet<String>> {
    let (delivered_tx, delivered) = watch::channel(BTreeSet::new());
    tokio::spawn(async move {
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let id = &event.id;
            match &event.kind {
                ReplayEventKind::Delivered { status, attempt } => {
                    println!("   replayed {id}: orders answered {status} (attempt {attempt})");
                    delivered_tx.send_modify(|keys| {
                        keys.insert(id.clone());
                    });
                }
                ReplayEventKind::Retrying {
                    attempt,
                    after,
                    reason,
                } => println!(
                    "   replay of {id} failed (attempt {attempt}: {}); next try in {} ms",
                    first_line(reason),
                    after.as_millis()
                ),
                ReplayEventKind::DeadLettered { reason } => {
                    println!("   replay of {id} gave up, dead letter: {reason}")
                }
                ReplayEventKind::Skipped => println!("   {id} was delivered before: skipped"),
                other => println!("   replay of {id}: {other:?}"),
            }
        }
    });
    delivered
}

/// Waits until every key in `keys` has been replayed.
async fn wait_delivered(
    delivered: &watch::Receiver<BTreeSet<String>>,
    keys: &[String],
) -> Result<(), String> {
    let mut delivered = delivered.clone();
    let all = delivered.wait_for(|done| keys.iter().all(|key| done.contains(key)));
    let done = matches!(tokio::time::timeout(PATIENCE, all).await, Ok(Ok(_)));
    match done {
        true => Ok(()),
        false => Err(format!("not everything was replayed within {PATIENCE:?}")),
    }
}

/// Waits until the caller's view of the buffer is empty again (the view
/// offers no change notification for the backlog: it is polled).
async fn wait_backlog_empty(view: &TargetView) -> Result<(), String> {
    let deadline = Instant::now() + PATIENCE;
    while view.backlog() != Some(0) {
        if Instant::now() >= deadline {
            return Err(format!("the buffer did not empty within {PATIENCE:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn within<F: std::future::Future>(future: F, what: &str) -> Result<F::Output, String> {
    tokio::time::timeout(PATIENCE, future)
        .await
        .map_err(|_| format!("waited {PATIENCE:?} for {what}"))
}

/// The buffer's length, straight from Redis.
async fn xlen(
    conn: &mut redis::aio::MultiplexedConnection,
    target: &Target,
) -> redis::RedisResult<u64> {
    redis::cmd("XLEN")
        .arg(target.queue_key())
        .query_async(conn)
        .await
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

// ------------------------------------------------------------------ orders

/// The `orders` service: an axum app on a fixed loopback port that can stop
/// gracefully, crash, and start again; it keeps its own heartbeat.
struct Orders {
    addr: SocketAddr,
    /// How many times each idempotency key was received: the service's own
    /// record, kept across restarts (as a database would).
    seen: Arc<Mutex<HashMap<String, u32>>>,
    server: Option<Server>,
    heartbeat: Option<Heartbeat>,
    target: Target,
}

struct Server {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Orders {
    async fn start(client: &redis::Client, target: &Target) -> Result<Self, Box<dyn Error>> {
        let listener = bind("127.0.0.1:0".parse()?)?;
        let mut orders = Orders {
            addr: listener.local_addr()?,
            seen: Arc::default(),
            server: None,
            heartbeat: None,
            target: target.clone(),
        };
        orders.serve(listener, client).await?;
        Ok(orders)
    }

    /// Serves on `listener`, then publishes the heartbeat: callers send
    /// traffic only once it can be answered.
    async fn serve(
        &mut self,
        listener: TcpListener,
        client: &redis::Client,
    ) -> Result<(), Box<dyn Error>> {
        let app = Router::new()
            .route("/orders", post(record_order))
            .with_state(self.seen.clone());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, app, stop_rx));
        self.server = Some(Server { task, stop });
        let heartbeat = Heartbeat::builder(self.target.clone())
            .ttl(TTL)
            .start(client.clone())?;
        within(heartbeat.wait_published(), "the heartbeat to be written").await?;
        self.heartbeat = Some(heartbeat);
        Ok(())
    }

    async fn restart(&mut self, client: &redis::Client) -> Result<(), Box<dyn Error>> {
        let deadline = Instant::now() + PATIENCE;
        let listener = loop {
            match bind(self.addr) {
                Ok(listener) => break listener,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot bind {} again: {e}", self.addr).into())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener, client).await
    }

    /// The planned stop, first step: the key is deleted, callers divert now.
    async fn delete_heartbeat(&mut self) -> Result<(), Box<dyn Error>> {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.shutdown().await?;
        }
        Ok(())
    }

    /// The planned stop, second step: stop accepting, let in-flight
    /// requests finish, close.
    async fn stop(&mut self) {
        if let Some(Server { mut task, stop }) = self.server.take() {
            stop.send_replace(true);
            if tokio::time::timeout(PATIENCE, &mut task).await.is_err() {
                task.abort();
            }
        }
    }

    /// A crash: the port and every connection close at once, and the
    /// heartbeat is no longer refreshed but stays until its TTL runs out.
    async fn crash(&mut self) {
        drop(self.heartbeat.take()); // dropping without `shutdown` keeps the key
        if let Some(Server { task, .. }) = self.server.take() {
            task.abort(); // drops the listener and the JoinSet of connections
            let _ = task.await;
        }
    }

    fn seen(&self) -> HashMap<String, u32> {
        self.seen.lock().unwrap().clone()
    }

    fn received(&self) -> u32 {
        self.seen.lock().unwrap().values().sum()
    }
}

/// `POST /orders`: records the idempotency key; a key seen before is a
/// duplicate delivery, answered 200 without recording the order again.
async fn record_order(
    State(seen): State<Arc<Mutex<HashMap<String, u32>>>>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let Some(key) = headers.get("idempotency-key").and_then(|k| k.to_str().ok()) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut seen = seen.lock().unwrap();
    let count = seen.entry(key.to_owned()).or_default();
    *count += 1;
    if *count == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// A listener with `SO_REUSEADDR`, so the port can be bound again right
/// after a stop.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The accept loop. Connections are tasks of a `JoinSet` owned by this
/// future: aborting it (a crash) drops them all; `stop` (a planned stop)
/// closes the listener and lets each connection finish its request.
async fn serve(listener: TcpListener, app: Router, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let app = app.clone();
                let mut stop = stop.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        app.clone().oneshot(request)
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        _ = stop.changed() => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

// ------------------------------------------------------------------- redis

/// The Redis the demo runs against: `$REDIS_URL`, or a private server.
enum Redis {
    External {
        url: String,
        namespace: String,
    },
    /// Killed, and its data dir removed, on drop.
    Private(PrivateRedis),
}

impl Redis {
    fn from_env() -> Result<Self, String> {
        if let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) {
            let ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let namespace = format!("thb-demo-{ms}");
            println!(
                "redis:  the one at REDIS_URL\n        \
                 this run's keys live under {namespace}: and are removed at the end"
            );
            return Ok(Redis::External { url, namespace });
        }
        const INSTALL: &str = "install it with `sudo apt-get install redis-server` \
            (or `brew install redis`), set REDIS_SERVER_BIN=/path/to/redis-server, \
            or point REDIS_URL at a running Redis";
        let redis = PrivateRedis::start("thb-demo-redis-", "the demo", INSTALL)?;
        println!(
            "redis:  no REDIS_URL, so a private redis-server (pid {}) on 127.0.0.1:{}\n        \
             data in {} (AOF, fsync on every write), stopped at the end",
            redis.pid(),
            redis.port(),
            redis.dir().display()
        );
        Ok(Redis::Private(redis))
    }

    fn url(&self) -> &str {
        match self {
            Redis::External { url, .. } => url,
            Redis::Private(redis) => redis.url(),
        }
    }

    fn namespace(&self) -> &str {
        match self {
            Redis::External { namespace, .. } => namespace,
            Redis::Private(_) => DEFAULT_NAMESPACE,
        }
    }

    fn is_private(&self) -> bool {
        matches!(self, Redis::Private(_))
    }
}
