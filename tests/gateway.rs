//! The `gateway` example as a black box: a child process between a hyper
//! client and a real HTTP target, with a private real Redis where the
//! heartbeat is set by hand, the way `redis-cli` would.
//!
//! # Finding the binary
//!
//! `CARGO_BIN_EXE_<name>` exists only for `[[bin]]` targets, and
//! `cargo test --test gateway` does not build examples. So the first test
//! that needs the gateway runs `$CARGO build --example gateway
//! --message-format=json` on this crate's manifest (once per test binary)
//! and takes the `executable` path cargo reports for that artifact. Cargo's
//! own answer follows `CARGO_TARGET_DIR`, `build.target-dir` and the like
//! with no guessing, and the build makes sure the binary matches the
//! current source (a path such as `target/debug/examples/gateway` could be
//! stale or missing); when the example is fresh it costs a fraction of a
//! second.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{hyper_client, HttpTarget, HyperClient, RedisServer, Reply};

/// The explicit heartbeat key the gateways watch.
const KEY: &str = "legacy:orders:alive";
/// The buffer of the target named after [`KEY`] (a valid name as it is).
const QUEUE: &str = "thb:{legacy:orders:alive}:queue";
/// Startup of one gateway process (the build is not counted).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a gateway may take to see a heartbeat change.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

type Client = HyperClient<Full<Bytes>>;

// ---------------------------------------------------------------- harness

fn gateway_bin() -> &'static Path {
    support::example_binary("gateway")
}

/// One running gateway process; killed (and its log shown, if the test is
/// failing) when dropped.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    /// From the `metrics listening on <addr>` line (`--metrics-listen` only).
    metrics_addr: Option<SocketAddr>,
    /// The name from the `buffer target: <name> ...` line.
    target_name: String,
    stderr: Arc<Mutex<String>>,
    /// Reads stderr into `stderr` until the process exits.
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    /// Starts `gateway --listen 127.0.0.1:0 --target <http> --redis <redis>
    /// <flags>` and waits for its `gateway listening on` line.
    fn start(redis: &RedisServer, http: &HttpTarget, flags: &[&str]) -> Self {
        let bin = gateway_bin();
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--target", &http.url()])
            .args(["--redis", &redis.url()])
            .args(flags)
            .env("RUST_LOG", "info,tower_heartbeat_buffer=debug")
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the gateway");

        // Stdout is read line by line until the process ends, so it never
        // blocks on a full pipe; stderr is kept for failure reports.
        let (lines_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let log = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });

        let mut gateway = Gateway {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            metrics_addr: None,
            target_name: String::new(),
            stderr,
            stderr_reader: Some(stderr_reader),
        };
        let deadline = started + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("buffer target: ") {
                        gateway.target_name = rest.split(' ').next().unwrap().to_owned();
                    } else if let Some(addr) = line.strip_prefix("metrics listening on ") {
                        gateway.metrics_addr = Some(addr.parse().expect("metrics address"));
                    } else if let Some(addr) = line.strip_prefix("gateway listening on ") {
                        gateway.addr = addr.parse().expect("listening address");
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("gateway not listening after {READY_TIMEOUT:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = gateway.child.wait().unwrap();
                    panic!("gateway exited before listening ({status})");
                }
            }
        }
        eprintln!(
            "gateway {} ready on {} in {:?}",
            gateway.pid(),
            gateway.addr,
            started.elapsed()
        );
        gateway
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -<signal> <pid>`, as an operator or a supervisor would.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The exit status, once the process has exited within `timeout` (and
    /// its whole log has been read).
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.stderr_reader.take() {
                    reader.join().unwrap();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- gateway {} log ---\n{}", self.pid(), self.log());
        }
    }
}

/// What came back through the gateway.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    /// Whether the target wrote this answer (it marks every answer).
    fn by_target(&self) -> bool {
        self.headers.contains_key(support::TARGET_HEADER)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(
    client: &Client,
    method: Method,
    url: String,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("no answer from the gateway within 10 s")
        .expect("gateway connection failed");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// Probes the gateway with GETs until it forwards them (`up`) or answers
/// by itself (down). Probes go to `/probe`.
async fn until_gateway_sees(client: &Client, gateway: &Gateway, up: bool) {
    let started = Instant::now();
    loop {
        let answer = send(client, Method::GET, gateway.url("/probe"), &[], b"").await;
        if answer.by_target() == up {
            eprintln!("gateway saw up={up} after {:?}", started.elapsed());
            return;
        }
        assert!(
            started.elapsed() < CHANGE_TIMEOUT,
            "gateway did not see up={up} within {CHANGE_TIMEOUT:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn redis(server: &RedisServer, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut server.conn())
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// The fields of every entry of the stream `key`, oldest first (`XRANGE`).
fn stream(server: &RedisServer, key: &str) -> Vec<HashMap<String, String>> {
    let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(&mut server.conn())
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
            fields.into_iter().map(|(k, v)| (k, text(v))).collect()
        })
        .collect()
}

/// Only the target's records of non-probe requests.
fn received(http: &HttpTarget) -> Vec<support::Received> {
    let mut seen = http.received();
    seen.retain(|r| r.uri.path() != "/probe");
    seen
}

/// FNV-1a 64, written again here: the derived name is a public contract.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x100_0000_01b3);
    }
    hash
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_every_method_path_query_and_body_while_up() {
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    redis(&redis_server, &["SET", KEY, "1"]);
    let gateway = Gateway::start(&redis_server, &http, &["--heartbeat-key", KEY]);
    assert_eq!(gateway.target_name, KEY, "a valid key is its own name");
    let client = hyper_client();

    // No waiting: the heartbeat was read before the gateway listened.
    http.set_reply(Reply::Echo);
    let answer = send(
        &client,
        Method::POST,
        gateway.url("/orders/7?tenant=a%20b&x=1"),
        &[
            ("content-type", "application/octet-stream"),
            ("x-custom", "kept"),
            ("connection", "x-hop"),
            ("x-hop", "dropped"),
        ],
        b"\x00\xffpayload\r\n",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert!(answer.by_target());
    assert_eq!(&answer.body[..], b"\x00\xffpayload\r\n");
    assert_eq!(answer.headers["content-type"], "application/octet-stream");

    http.set_reply(Reply::Ok);
    let answer = send(
        &client,
        Method::GET,
        gateway.url("/items?q=1&q=2"),
        &[],
        b"",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "ok:/items");

    let seen = received(&http);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].uri, "/orders/7?tenant=a%20b&x=1");
    assert_eq!(&seen[0].body[..], b"\x00\xffpayload\r\n");
    assert_eq!(seen[0].headers["host"], http.addr().to_string());
    assert_eq!(seen[0].headers["x-custom"], "kept");
    assert!(!seen[0].headers.contains_key("x-hop"), "hop-by-hop header");
    assert!(seen[0].headers.contains_key("idempotency-key"));
    assert_eq!(seen[1].method, Method::GET);
    assert_eq!(seen[1].uri, "/items?q=1&q=2");

    for method in ["PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PURGE"] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let answer = send(&client, method.clone(), gateway.url("/m?k=v"), &[], b"").await;
        assert_eq!(answer.status, StatusCode::OK, "{method}");
        let last = received(&http).pop().unwrap();
        assert_eq!(
            (last.method, last.uri.to_string()),
            (method, "/m?k=v".into())
        );
    }

    // The heartbeat lives but the target does not answer: a read fails with
    // 502, a write is diverted to the buffer.
    let mut http = http;
    http.kill().await;
    let answer = send(&client, Method::GET, gateway.url("/gone"), &[], b"").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{answer:?}");
    assert!(
        answer.text().starts_with("bad gateway"),
        "{}",
        answer.text()
    );
    let answer = send(&client, Method::POST, gateway.url("/gone"), &[], b"w").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    let entries = stream(&redis_server, QUEUE);
    assert_eq!((entries.len(), entries[0]["attempts"].as_str()), (1, "1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_key_is_deleted_writes_are_buffered_and_reads_refused() {
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    redis(&redis_server, &["SET", KEY, "1"]);
    let gateway = Gateway::start(
        &redis_server,
        &http,
        &["--heartbeat-key", KEY, "--max-body-bytes", "64"],
    );
    let client = hyper_client();
    until_gateway_sees(&client, &gateway, true).await;

    redis(&redis_server, &["DEL", KEY]);
    until_gateway_sees(&client, &gateway, false).await;

    let answer = send(
        &client,
        Method::POST,
        gateway.url("/orders?tenant=7"),
        &[
            ("idempotency-key", "order-1"),
            ("content-type", "application/json"),
        ],
        b"{\"qty\":1}",
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert_eq!(answer.headers["idempotency-key"], "order-1");
    assert!(!answer.by_target());

    // Without a key, the gateway gives one and says which.
    let answer = send(&client, Method::DELETE, gateway.url("/orders/3"), &[], b"").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    let generated = answer.headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();

    let answer = send(&client, Method::GET, gateway.url("/orders"), &[], b"").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!answer.by_target());
    assert!(answer.text().contains("target_down"), "{}", answer.text());

    // --max-body-bytes: too large to hold while down.
    let answer = send(&client, Method::PUT, gateway.url("/big"), &[], &[b'x'; 65]).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);

    let entries = stream(&redis_server, QUEUE);
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0]["id"], "order-1");
    assert_eq!(entries[0]["method"], "POST");
    assert_eq!(entries[0]["uri"], http.url() + "/orders?tenant=7");
    assert_eq!(entries[0]["body"], "{\"qty\":1}");
    assert!(entries[0]["headers"].contains("content-type: application/json"));
    assert_eq!(entries[1]["id"], generated);
    assert_eq!(entries[1]["method"], "DELETE");
    assert_eq!(entries[1]["uri"], http.url() + "/orders/3");
    assert!(
        received(&http).is_empty(),
        "nothing but probes reached the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_heartbeat_saying_draining_counts_as_down() {
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    redis(&redis_server, &["HSET", KEY, "status", "up"]);
    redis(&redis_server, &["PEXPIRE", KEY, "60000"]);
    // What stays in the buffer once the target is back is the point here:
    // nothing replays it.
    let gateway = Gateway::start(
        &redis_server,
        &http,
        &["--heartbeat-key", KEY, "--no-replay"],
    );
    let client = hyper_client();
    let answer = send(&client, Method::POST, gateway.url("/a"), &[], b"1").await;
    assert!(answer.by_target(), "hash with status up: {answer:?}");

    redis(&redis_server, &["HSET", KEY, "status", "draining"]);
    until_gateway_sees(&client, &gateway, false).await;
    let answer = send(&client, Method::POST, gateway.url("/b"), &[], b"2").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(stream(&redis_server, QUEUE).len(), 1);

    redis(&redis_server, &["HSET", KEY, "status", "up"]);
    until_gateway_sees(&client, &gateway, true).await;
    // Strict order (the default): a write does not overtake the one waiting.
    let answer = send(&client, Method::POST, gateway.url("/c"), &[], b"3").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    // --relaxed: it does.
    let relaxed = Gateway::start(
        &redis_server,
        &http,
        &["--heartbeat-key", KEY, "--relaxed", "--no-replay"],
    );
    let answer = send(&client, Method::POST, relaxed.url("/d"), &[], b"4").await;
    assert!(answer.by_target(), "{answer:?}");

    let paths: Vec<_> = received(&http).iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/a", "/d"]);
    let stored: Vec<_> = stream(&redis_server, QUEUE)
        .into_iter()
        .map(|e| e["body"].clone())
        .collect();
    assert_eq!(stored, ["2", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_buffered_while_the_key_is_gone_reach_the_target_in_order_when_it_returns() {
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    // No key yet: the target is down from the start.
    let mut gateway = Gateway::start(&redis_server, &http, &["--heartbeat-key", KEY]);
    let client = hyper_client();

    let mut keys = Vec::new();
    let mut sent = Vec::new();
    for i in 0..20 {
        let key = format!("order-{i:02}");
        let (method, path) = match i % 4 {
            0 => (Method::PUT, format!("/orders/{i}")),
            1 => (Method::PATCH, format!("/orders/{i}?v=2")),
            _ => (Method::POST, format!("/orders?n={i}")),
        };
        let answer = send(
            &client,
            method.clone(),
            gateway.url(&path),
            &[("idempotency-key", &key), ("content-type", "text/plain")],
            key.as_bytes(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
        assert_eq!(answer.headers["idempotency-key"], key.as_str());
        keys.push(key);
        sent.push((method, path));
    }
    // A write without a key gets one from the gateway, and keeps it.
    let answer = send(&client, Method::DELETE, gateway.url("/orders/1"), &[], b"").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    keys.push(
        answer.headers["idempotency-key"]
            .to_str()
            .unwrap()
            .to_owned(),
    );
    sent.push((Method::DELETE, "/orders/1".to_owned()));
    assert_eq!(stream(&redis_server, QUEUE).len(), keys.len());
    assert!(
        received(&http).is_empty(),
        "nothing reaches a target that is down"
    );

    let back = Instant::now();
    redis(&redis_server, &["SET", KEY, "1"]);
    let drained = support::wait_until(Duration::from_secs(30), || {
        received(&http).len() >= keys.len()
    })
    .await;
    assert!(
        drained,
        "replayed {} of {}",
        received(&http).len(),
        keys.len()
    );
    eprintln!(
        "{} replayed {:?} after the key came back",
        keys.len(),
        back.elapsed()
    );

    let seen = received(&http);
    assert_eq!(seen.len(), keys.len(), "each once: {seen:?}");
    for (i, ((method, path), r)) in sent.iter().zip(&seen).enumerate() {
        assert_eq!(r.headers["idempotency-key"], keys[i].as_str(), "in order");
        assert_eq!((&r.method, r.uri.to_string()), (method, path.clone()));
        assert_eq!(r.headers["x-heartbeat-replay"], "1");
        assert_eq!(r.headers["host"], http.addr().to_string());
        if *method != Method::DELETE {
            assert_eq!(r.body, keys[i].as_bytes());
            assert_eq!(r.headers["content-type"], "text/plain");
        }
    }
    // Delivered entries leave the buffer.
    assert!(
        support::wait_until(CHANGE_TIMEOUT, || stream(&redis_server, QUEUE).is_empty()).await,
        "{:?}",
        stream(&redis_server, QUEUE)
    );
    assert_eq!(received(&http).len(), keys.len(), "nothing twice");

    // It stops cleanly with its replayer.
    gateway.signal("TERM");
    let status = gateway.wait_exit(Duration::from_secs(10));
    let status = status.expect("still running 10 s after SIGTERM");
    assert!(status.success(), "{status}\n{}", gateway.log());
    assert!(
        gateway.log().contains("replayer stopped"),
        "{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_with_the_same_flags_share_one_buffer() {
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    // The key does not exist: both start down, and buffer from the first call.
    let flags = ["--heartbeat-key", KEY, "--max-queue-len", "2"];
    let a = Gateway::start(&redis_server, &http, &flags);
    let b = Gateway::start(&redis_server, &http, &flags);
    assert_eq!(a.target_name, b.target_name);
    let client = hyper_client();

    let answer = send(
        &client,
        Method::POST,
        a.url("/o"),
        &[("idempotency-key", "from-a")],
        b"A",
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert!(
        answer.text().contains("\"queue_len\":1"),
        "{}",
        answer.text()
    );
    let answer = send(
        &client,
        Method::POST,
        b.url("/o"),
        &[("idempotency-key", "from-b")],
        b"B",
    )
    .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert!(
        answer.text().contains("\"queue_len\":2"),
        "{}",
        answer.text()
    );
    // --max-queue-len counts both replicas' entries.
    let answer = send(&client, Method::POST, a.url("/o"), &[], b"C").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.text().contains("queue_full"), "{}", answer.text());

    let entries = stream(&redis_server, QUEUE);
    let ids: Vec<_> = entries.iter().map(|e| e["id"].as_str()).collect();
    assert_eq!(ids, ["from-a", "from-b"]);
    assert!(received(&http).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_key_gets_a_sanitized_name_with_a_stable_hash() {
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    let key = "legacy:{orders}:alive*";
    let expected = format!("legacy:_orders_:alive_-{:016x}", fnv1a64(key.as_bytes()));
    let gateway = Gateway::start(&redis_server, &http, &["--heartbeat-key", key]);
    assert_eq!(gateway.target_name, expected);

    let client = hyper_client();
    let answer = send(&client, Method::POST, gateway.url("/x"), &[], b"x").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "no such key: down");
    let queue = format!("thb:{{{expected}}}:queue");
    assert_eq!(stream(&redis_server, &queue).len(), 1);

    redis(&redis_server, &["SET", key, "1"]);
    until_gateway_sees(&client, &gateway, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_flag_watches_the_namespaced_key() {
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    redis(&redis_server, &["SET", "app:{orders}:hb", "1"]);
    let flags = ["--service", "orders", "--namespace", "app"];
    let gateway = Gateway::start(&redis_server, &http, &flags);
    assert_eq!(gateway.target_name, "orders");
    let client = hyper_client();
    let answer = send(&client, Method::POST, gateway.url("/x"), &[], b"x").await;
    assert!(answer.by_target(), "{answer:?}");

    redis(&redis_server, &["DEL", "app:{orders}:hb"]);
    until_gateway_sees(&client, &gateway, false).await;
    let answer = send(&client, Method::POST, gateway.url("/y"), &[], b"y").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(stream(&redis_server, "app:{orders}:queue").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_stop_it_cleanly_with_status_0() {
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    redis(&redis_server, &["SET", KEY, "1"]);
    for signal in ["TERM", "INT"] {
        let mut gateway = Gateway::start(&redis_server, &http, &["--heartbeat-key", KEY]);
        // Leave an idle keep-alive connection open: it must not hold the exit.
        let client = hyper_client();
        let answer = send(&client, Method::GET, gateway.url("/before"), &[], b"").await;
        assert!(answer.by_target());

        let sent = Instant::now();
        gateway.signal(signal);
        let status = gateway.wait_exit(Duration::from_secs(5));
        let status = status.unwrap_or_else(|| panic!("still running 5 s after SIG{signal}"));
        eprintln!("SIG{signal}: exited {status} after {:?}", sent.elapsed());
        assert!(status.success(), "SIG{signal}: {status}\n{}", gateway.log());
        assert!(
            gateway.log().contains(&format!("SIG{signal}")),
            "{}",
            gateway.log()
        );
    }
}

/// One `GET /metrics` from the gateway's metrics listener: the body, after
/// checking the status and the Prometheus text content type.
async fn scrape(client: &Client, metrics: SocketAddr) -> String {
    let answer = send(
        client,
        Method::GET,
        format!("http://{metrics}/metrics"),
        &[],
        b"",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let content_type = answer.headers["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    answer.text()
}

/// Whether `exposition` has the sample `line` (name, labels and value) as
/// one whole line.
fn has_sample(exposition: &str, line: &str) -> bool {
    exposition.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_serves_prometheus_text_at_slash_metrics() {
    let redis_server = RedisServer::start();
    let http = HttpTarget::start().await;
    redis(&redis_server, &["SET", KEY, "1"]);
    let mut gateway = Gateway::start(
        &redis_server,
        &http,
        &["--heartbeat-key", KEY, "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = gateway
        .metrics_addr
        .expect("a `metrics listening on <addr>` line before `gateway listening on`");
    assert_ne!(metrics.port(), 0, "the bound port, not the requested one");
    assert_ne!(metrics, gateway.addr, "a listener of its own");
    let client = hyper_client();
    let label = format!("{{target=\"{KEY}\"}}");

    // Registered when the layer was built: every series is there at 0.
    let text = scrape(&client, metrics).await;
    assert!(
        has_sample(&text, &format!("thb_forwarded_total{label} 0")),
        "{text}"
    );
    assert!(
        has_sample(&text, &format!("thb_target_up{label} 1")),
        "{text}"
    );

    // One forwarded call (the heartbeat was read before the gateway listened).
    let answer = send(&client, Method::POST, gateway.url("/a"), &[], b"1").await;
    assert!(answer.by_target(), "{answer:?}");

    // The key goes; the gauge says when the gateway has seen it. No probes
    // through the gateway here: one forwarded while up would count.
    redis(&redis_server, &["DEL", KEY]);
    let started = Instant::now();
    loop {
        let text = scrape(&client, metrics).await;
        if has_sample(&text, &format!("thb_target_up{label} 0")) {
            break;
        }
        assert!(
            started.elapsed() < CHANGE_TIMEOUT,
            "thb_target_up still not 0 after {CHANGE_TIMEOUT:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // One buffered call.
    let answer = send(&client, Method::POST, gateway.url("/b"), &[], b"2").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");

    let text = scrape(&client, metrics).await;
    eprintln!("--- /metrics ---\n{text}");
    for sample in [
        format!("thb_forwarded_total{label} 1"),
        format!("thb_buffered_total{label} 1"),
        format!("thb_diverted_total{label} 0"),
        format!("thb_target_up{label} 0"),
    ] {
        assert!(has_sample(&text, &sample), "no `{sample}` in:\n{text}");
    }
    assert!(
        text.contains("# TYPE thb_target_up gauge"),
        "thb_target_up missing:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("thb_queue_depth{label} "))),
        "thb_queue_depth missing:\n{text}"
    );
    assert!(
        text.contains("# TYPE thb_queue_depth gauge"),
        "thb_queue_depth missing:\n{text}"
    );
    // Only /metrics is served there.
    let answer = send(&client, Method::GET, format!("http://{metrics}/"), &[], b"").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(stream(&redis_server, QUEUE).len(), 1);
    assert_eq!(received(&http).len(), 1);

    // It stops with the gateway.
    gateway.signal("TERM");
    let status = gateway.wait_exit(Duration::from_secs(10));
    let status = status.expect("still running 10 s after SIGTERM");
    assert!(status.success(), "{status}\n{}", gateway.log());
}

#[test]
fn help_documents_every_flag_and_one_heartbeat_source_is_required() {
    let help = Command::new(gateway_bin()).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "--listen",
        "--target",
        "--redis",
        "[env: REDIS_URL",
        "--heartbeat-key",
        "--service",
        "--namespace",
        "--max-body-bytes",
        "--max-queue-len",
        "--relaxed",
        "--no-replay",
        "--metrics-listen",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
    let base = [
        "--target",
        "http://127.0.0.1:1",
        "--redis",
        "redis://127.0.0.1:1",
    ];
    for extra in [&[][..], &["--service", "a", "--heartbeat-key", "b"][..]] {
        let out = Command::new(gateway_bin())
            .args(base)
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
    }
}
