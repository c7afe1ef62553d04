//! Hostile input and a Redis that answers with errors, against a real
//! `redis-server` and real HTTP servers:
//!
//! - malformed HTTP sent over raw TCP to a gateway built on the layer;
//! - queue entries that are garbage, truncated, from a future version or
//!   enormous, between valid ones;
//! - names that try to escape their namespace or inject glob patterns;
//! - Redis refusing writes: `OOM`, `READONLY`, `NOSCRIPT`, `LOADING`.
//!
//! Every wait is bounded; nothing sleeps to synchronise.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use futures_util::FutureExt;
use http::header::HOST;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use redis::Commands;
use support::layer_rig::{call, Outcome, Rig};
use support::{hyper_client, HttpTarget, HyperClient, RedisOptions, RedisServer, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;
use tower_heartbeat_buffer::replay::{DeadLetters, ReplayConfig, ReplayEventKind, ReplayHandle};
use tower_heartbeat_buffer::{
    Health, HeartbeatBuffer, HeartbeatBufferLayer, NameKind, RequestBody, Target, Unavailable,
    UnavailableReason, Watcher,
};
use tower_layer::Layer;

/// Longest wait for one step (a call, a state change, a delivery).
const STEP: Duration = Duration::from_secs(10);
/// Longest wait for a drain or a recovery.
const EVENTUALLY: Duration = Duration::from_secs(30);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 5 ms until it holds; panics naming `what` after
/// `timeout`.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn unavailable(outcome: &Outcome) -> UnavailableReason {
    outcome
        .extensions
        .get::<Unavailable>()
        .unwrap_or_else(|| panic!("no Unavailable extension on {outcome:?}"))
        .reason()
        .clone()
}

/// The `detail` of a `RedisUnavailable` refusal (panics on anything else).
fn redis_detail(outcome: &Outcome) -> String {
    assert_eq!(
        outcome.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{outcome:?}"
    );
    match unavailable(outcome) {
        UnavailableReason::RedisUnavailable { detail } => detail,
        other => panic!("expected RedisUnavailable, got {other:?} on {outcome:?}"),
    }
}

fn post(rig: &Rig, key: &str) -> Request<Full<Bytes>> {
    Request::post(format!("{}/orders", rig.http.url()))
        .header("idempotency-key", key)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(key.to_owned())))
        .unwrap()
}

/// One call through `service`, within [`STEP`].
async fn call_in_time(
    service: &mut support::layer_rig::Buffered,
    request: Request<Full<Bytes>>,
) -> Outcome {
    tokio::time::timeout(STEP, call(service, request))
        .await
        .expect("the call hung")
        .expect("the call failed")
}

fn xlen(redis: &RedisServer, target: &Target) -> u64 {
    redis.conn().xlen(target.queue_key()).unwrap()
}

fn fast_replay() -> ReplayConfig {
    let mut config = ReplayConfig::default();
    config.slow_start = Duration::ZERO;
    config.poll_interval = Duration::from_millis(100);
    config.backoff_base = Duration::from_millis(20);
    config.lease_ttl = Duration::from_secs(2);
    config
}

async fn replayer(watcher: &Watcher, target: &Target, config: ReplayConfig) -> ReplayHandle {
    let layer = HeartbeatBufferLayer::builder(target.clone())
        .build(watcher)
        .await
        .unwrap();
    layer
        .replayer()
        .config(config)
        .spawn(hyper_client::<RequestBody<Full<Bytes>>>())
}

fn bodies(http: &HttpTarget) -> Vec<String> {
    http.received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Malformed HTTP to a gateway built on the layer.
// ---------------------------------------------------------------------------

type GatewayClient = HeartbeatBuffer<HyperClient<RequestBody<axum::body::Body>>>;

#[derive(Clone)]
struct Gateway {
    client: GatewayClient,
    target: String,
    /// Panics caught in the handler (the layer included): must stay 0.
    panics: Arc<AtomicUsize>,
}

/// Forwards any request to the target through the layer, as
/// `examples/gateway.rs` does.
async fn proxy(
    State(gateway): State<Gateway>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let panics = Arc::clone(&gateway.panics);
    let forward = async move {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = match format!("{}{path}", gateway.target).parse() {
            Ok(uri) => uri,
            Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        };
        parts.headers.remove(HOST);
        match gateway
            .client
            .oneshot(Request::from_parts(parts, body))
            .await
        {
            Ok(response) => response.into_response(),
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        }
    };
    match AssertUnwindSafe(forward).catch_unwind().await {
        Ok(response) => response,
        Err(_) => {
            panics.fetch_add(1, Ordering::SeqCst);
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// What a raw exchange came to.
#[derive(Debug)]
struct RawAnswer {
    /// The status of the first response, if one came.
    status: Option<u16>,
    /// Everything read.
    text: String,
    /// The server closed the connection (rather than leaving it hanging).
    closed: bool,
}

/// Writes `bytes` on a fresh connection (half-closing it if `close_write`),
/// then reads until the server closes or [`STEP`] passes.
async fn raw(addr: SocketAddr, bytes: &[u8], close_write: bool) -> RawAnswer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may close before reading everything (oversized heads): a
    // failed write is part of the game.
    let _ = stream.write_all(bytes).await;
    if close_write {
        let _ = stream.shutdown().await;
    }
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(STEP, async {
        let mut chunk = [0u8; 8192];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    RawAnswer {
        status,
        text,
        closed,
    }
}

/// A client error or a closed connection: anything but a hang, a 2xx or a
/// 5xx.
fn refused_or_closed(what: &str, answer: &RawAnswer) {
    assert!(answer.closed, "{what}: the connection was left hanging");
    if let Some(status) = answer.status {
        assert!(
            (400..500).contains(&status),
            "{what}: answered {status}: {}",
            answer.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_to_a_gateway_is_refused_and_the_layer_stays_up() {
    init_tracing();
    let started = Instant::now();
    let rig = Rig::start().await;
    rig.http.set_reply(Reply::Echo);
    rig.down().await;
    let layer = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&rig.watcher)
        .await
        .unwrap();
    let panics = Arc::new(AtomicUsize::new(0));
    let gateway = Gateway {
        client: layer.layer(hyper_client()),
        target: rig.http.url(),
        panics: Arc::clone(&panics),
    };
    let app = Router::new()
        .route("/", any(proxy))
        .route("/{*path}", any(proxy))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut caller = hyper_client::<Full<Bytes>>();
    let gateway_url = format!("http://{addr}");

    // A well-formed call through the gateway, to check between the hostile
    // ones that the gateway and the layer still work.
    let mut normal = 0;
    let mut still_works = |caller: &mut HyperClient<Full<Bytes>>| {
        normal += 1;
        let key = format!("normal-{normal}");
        let request = Request::post(format!("{gateway_url}/orders"))
            .header("idempotency-key", &key)
            .body(Full::new(Bytes::from(key.clone())))
            .unwrap();
        let caller = caller.clone();
        async move {
            let response = tokio::time::timeout(STEP, caller.oneshot(request))
                .await
                .expect("a normal call hung")
                .expect("a normal call failed");
            assert_eq!(response.status(), StatusCode::ACCEPTED, "{key}");
            key
        }
    };
    let mut stored_keys = vec![still_works(&mut caller).await];

    let head = |extra: &[u8]| -> Vec<u8> {
        [
            &b"POST /orders HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"[..],
            extra,
            b"\r\n",
        ]
        .concat()
    };
    let mut huge_header = head(b"");
    huge_header.truncate(huge_header.len() - 2);
    huge_header.extend_from_slice(b"X-Absurd: ");
    huge_header.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    huge_header.extend_from_slice(b"\r\n\r\n");
    let many_headers = head(
        (0..500)
            .map(|i| format!("X-H{i}: {i}\r\n"))
            .collect::<String>()
            .as_bytes(),
    );
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "binary garbage",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\xff\r\n\r\n".to_vec(),
            false,
        ),
        ("NUL bytes", vec![0u8; 4096], true),
        (
            "garbage request line",
            b"GARBAGE \xff\xfe NOT-HTTP\r\n\r\n".to_vec(),
            false,
        ),
        (
            "space in the request target",
            b"POST /a b HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(),
            false,
        ),
        (
            "header without a colon",
            b"POST /orders HTTP/1.1\r\nHost: gw\r\nNoColonHere\r\n\r\n".to_vec(),
            false,
        ),
        (
            "truncated head",
            b"POST /orders HTTP/1.1\r\nHost: gw\r\nContent-Le".to_vec(),
            true,
        ),
        ("absurd header (1 MiB)", huge_header, false),
        ("500 headers", many_headers, false),
        (
            "bad chunk size",
            head(b"Transfer-Encoding: chunked\r\n")
                .into_iter()
                .chain(b"zz\r\nhello\r\n0\r\n\r\n".iter().copied())
                .collect(),
            false,
        ),
        (
            "two content lengths",
            head(b"Content-Length: 3\r\nContent-Length: 5\r\n")
                .into_iter()
                .chain(b"abcde".iter().copied())
                .collect(),
            false,
        ),
        (
            "content length that is not a number",
            head(b"Content-Length: lots\r\n"),
            false,
        ),
    ];
    for (what, bytes, close_write) in &cases {
        let answer = raw(addr, bytes, *close_write).await;
        refused_or_closed(what, &answer);
        eprintln!("{what}: {:?}", answer.status);
        stored_keys.push(still_works(&mut caller).await);
    }

    // Heads that parse, with bodies or keys the layer must refuse: a body
    // cut short, a key that is not visible ASCII, an empty key, a declared
    // length over the limit. Never stored, never forwarded.
    let truncated = [
        &head(b"Content-Length: 100\r\nIdempotency-Key: cut-short\r\n")[..],
        b"abc",
    ]
    .concat();
    let answer = raw(addr, &truncated, true).await;
    assert_eq!(answer.status, Some(400), "{answer:?}");
    assert!(answer.text.contains("body_read_failed"), "{answer:?}");
    let answer = raw(
        addr,
        &[
            &head(b"Transfer-Encoding: chunked\r\nIdempotency-Key: cut-chunk\r\n")[..],
            b"5\r\nab",
        ]
        .concat(),
        true,
    )
    .await;
    assert_eq!(answer.status, Some(400), "{answer:?}");
    let answer = raw(
        addr,
        &[
            &head(b"Content-Length: 2\r\nIdempotency-Key: \x80\xffkey\r\n")[..],
            b"{}",
        ]
        .concat(),
        false,
    )
    .await;
    assert_eq!(answer.status, Some(400), "{answer:?}");
    assert!(
        answer.text.contains("invalid_idempotency_key"),
        "{answer:?}"
    );
    let answer = raw(
        addr,
        &[
            &head(b"Content-Length: 2\r\nIdempotency-Key:\r\n")[..],
            b"{}",
        ]
        .concat(),
        false,
    )
    .await;
    assert_eq!(answer.status, Some(400), "{answer:?}");
    assert!(
        answer.text.contains("invalid_idempotency_key"),
        "{answer:?}"
    );
    let answer = raw(
        addr,
        &head(b"Content-Length: 99999999999999\r\nIdempotency-Key: huge\r\n"),
        false,
    )
    .await;
    assert_eq!(answer.status, Some(413), "{answer:?}");
    assert!(answer.closed, "{answer:?}");
    stored_keys.push(still_works(&mut caller).await);

    // Odd but valid header values (obs-text, colons, inner spaces) are
    // stored as received.
    let odd = [
        &head(b"Content-Length: 2\r\nIdempotency-Key: odd\r\nX-Odd: \x80\xff: a  b\r\n")[..],
        b"{}",
    ]
    .concat();
    let answer = raw(addr, &odd, false).await;
    assert_eq!(answer.status, Some(202), "{answer:?}");
    stored_keys.push("odd".into());

    // Only the well-formed requests were stored, in order; nothing reached
    // the target while it was down; nothing panicked.
    let stored = rig.stored();
    let ids: Vec<&str> = stored.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, stored_keys);
    let odd = stored.last().unwrap();
    assert_eq!(odd.headers["x-odd"].as_bytes(), b"\x80\xff: a  b");
    assert_eq!(rig.http.received_count(), 0);

    // Up: the gateway forwards again (a request kept out of the buffer: in
    // strict order a bufferable one would join the stored ones, which no
    // replayer drains here).
    rig.up().await;
    let up = Request::post(format!("{gateway_url}/orders"))
        .header("idempotency-key", "after")
        .header("x-heartbeat-buffer", "never")
        .body(Full::new(Bytes::from_static(b"after")))
        .unwrap();
    let response = tokio::time::timeout(STEP, caller.clone().oneshot(up))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"after");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "the handler panicked");
    server.abort();
    eprintln!("malformed http: {:?}", started.elapsed());
}

/// An `Idempotency-Key` that HTTP cannot carry unchanged (leading or
/// trailing spaces or tabs are optional whitespace, stripped by every
/// parser) is refused like one that is not visible ASCII: otherwise `" "`
/// and `"\t"` are both accepted as distinct ids, and the target receives the
/// same empty key for both (a deduplicating target drops the second), and
/// `" k "` arrives as `"k"`, not the id the caller was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_the_wire_would_change_is_refused() {
    init_tracing();
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    for key in [" ", "\t", "  ", " padded", "padded ", "padded\t"] {
        let out = call_in_time(&mut service, post(&rig, key)).await;
        assert_eq!(out.status, StatusCode::BAD_REQUEST, "{key:?}: {out:?}");
        assert_eq!(
            unavailable(&out),
            UnavailableReason::InvalidIdempotencyKey,
            "{key:?}"
        );
    }
    assert_eq!(xlen(&rig.redis, &rig.target), 0);
    // Inner spaces survive the wire: accepted.
    buffer_one(&rig, &mut service, "inner space").await;
}

// ---------------------------------------------------------------------------
// 2. Hostile queue entries.
// ---------------------------------------------------------------------------

async fn buffer_one(rig: &Rig, service: &mut support::layer_rig::Buffered, key: &str) {
    let out = call_in_time(service, post(rig, key)).await;
    assert_eq!(out.status, StatusCode::ACCEPTED, "{out:?}");
}

/// Like [`buffer_one`], but a `503` for Redis not answering is retried
/// (within [`STEP`]): nothing was stored, and writing 20 MiB by hand next to
/// it may stall Redis past the watcher's read timeout.
async fn buffer_one_patiently(rig: &Rig, service: &mut support::layer_rig::Buffered, key: &str) {
    let deadline = Instant::now() + STEP;
    loop {
        let out = call_in_time(service, post(rig, key)).await;
        if out.status == StatusCode::ACCEPTED {
            return;
        }
        redis_detail(&out);
        assert!(Instant::now() < deadline, "{key}: {out:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn xadd(rig: &Rig, fields: &[(&[u8], &[u8])]) -> String {
    rig.redis
        .conn()
        .xadd(rig.target.queue_key(), "*", fields)
        .unwrap()
}

/// Every field of a well-formed entry, with `overrides` replacing or adding.
fn entry_fields<'a>(id: &'a [u8], overrides: &[(&'a [u8], &'a [u8])]) -> Vec<(&'a [u8], &'a [u8])> {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (&b"v"[..], &b"1"[..]),
        (b"id", id),
        (b"method", b"POST"),
        (b"uri", b"/orders"),
        (b"headers", b"content-type: text/plain"),
        (b"body", id),
        (b"enqueued_at", b"0"),
        (b"attempts", b"0"),
    ];
    for &(name, value) in overrides {
        fields.retain(|&(k, _)| k != name);
        fields.push((name, value));
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_future_entries_are_dead_lettered_and_the_rest_delivered_in_order() {
    init_tracing();
    let started = Instant::now();
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;

    buffer_one(&rig, &mut service, "a-0").await;
    let garbage = xadd(
        &rig,
        &[
            (&b"\xff\xfe\x00"[..], &b"\xc3("[..]),
            (b"\x80", b"\xff\xff"),
        ],
    );
    buffer_one(&rig, &mut service, "a-1").await;
    let truncated = xadd(
        &rig,
        &[
            (&b"v"[..], &b"1"[..]),
            (b"id", b"truncated"),
            (b"method", b"POST"),
        ],
    );
    buffer_one(&rig, &mut service, "a-2").await;
    let future = xadd(
        &rig,
        &entry_fields(b"future", &[(&b"v"[..], &b"2"[..]), (b"priority", b"high")]),
    );
    buffer_one(&rig, &mut service, "a-3").await;
    let bad_uri = xadd(
        &rig,
        &entry_fields(b"bad-uri", &[(&b"uri"[..], &b"/a b"[..])]),
    );
    let bad_header = xadd(
        &rig,
        &entry_fields(b"bad-header", &[(&b"headers"[..], &b"x: a\nb"[..])]),
    );
    buffer_one(&rig, &mut service, "a-4").await;

    let replay = replayer(&rig.watcher, &rig.target, fast_replay()).await;
    let mut events = replay.events();
    rig.up().await;
    assert!(
        rig.http.wait_for_requests(5, EVENTUALLY).await,
        "{:?}",
        bodies(&rig.http)
    );
    assert_eq!(bodies(&rig.http), ["a-0", "a-1", "a-2", "a-3", "a-4"]);

    let dead = DeadLetters::new(rig.redis.client(), &rig.target).unwrap();
    eventually(EVENTUALLY, "five dead letters", || async {
        dead.len().await.unwrap() == 5
    })
    .await;
    let letters = dead.list(10).await.unwrap();
    let expect = [
        (&garbage, "missing field `v`"),
        (&truncated, "missing field `uri`"),
        (&future, "unsupported encoding version \"2\""),
        (&bad_uri, "field `uri` is not a URI"),
        (&bad_header, "header `x` has an invalid value"),
    ];
    for (letter, (source, reason)) in letters.iter().zip(expect) {
        assert_eq!(&letter.source_id, source);
        assert!(
            letter.reason.contains(reason),
            "{}: {}",
            letter.source_id,
            letter.reason
        );
        assert!(letter.reason.starts_with("malformed buffer entry"));
        assert!(letter.request.is_err(), "{letter:?}");
        assert!(letter.dead_at_ms > 0);
    }
    // The dead letters keep the entry's fields byte for byte.
    let raw: redis::Value = redis::cmd("XRANGE")
        .arg(rig.target.dead_letter_key())
        .arg(&letters[0].entry_id)
        .arg(&letters[0].entry_id)
        .query(&mut rig.redis.conn())
        .unwrap();
    let flat = format!("{raw:?}");
    for bytes in [&b"\xff\xfe\x00"[..], b"\xc3(", b"\x80", b"\xff\xff"] {
        let shown = format!("{:?}", redis::Value::BulkString(bytes.to_vec()));
        assert!(flat.contains(&shown), "{shown} not kept in {flat}");
    }
    // The queue is empty, every event was told.
    eventually(STEP, "an empty queue", || async {
        xlen(&rig.redis, &rig.target) == 0
    })
    .await;
    let mut dead_events = Vec::new();
    while dead_events.len() < 5 {
        let event = tokio::time::timeout(STEP, events.recv())
            .await
            .expect("events")
            .unwrap();
        if let ReplayEventKind::DeadLettered { reason } = event.kind {
            dead_events.push((event.entry_id, reason));
        }
    }
    let sources: Vec<&String> = dead_events.iter().map(|(id, _)| id).collect();
    assert_eq!(
        sources,
        [&garbage, &truncated, &future, &bad_uri, &bad_header]
    );
    assert_eq!(replay.dead_lettered(), 5);
    replay.shutdown().await;
    eprintln!("hostile entries: {:?}", started.elapsed());
}

/// 20 MiB of `body`, written by hand: one entry with nothing else (poison),
/// one well-formed around it. Neither may wedge the drain; the entries
/// around them are delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enormous_entries_do_not_wedge_the_drain() {
    init_tracing();
    let started = Instant::now();
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    let huge = vec![b'z'; 20 * 1024 * 1024];

    buffer_one(&rig, &mut service, "e-0").await;
    let poison = xadd(&rig, &[(&b"body"[..], &huge[..])]);
    buffer_one_patiently(&rig, &mut service, "e-1").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let uri = format!("{}/orders", rig.http.url());
    let big = xadd(
        &rig,
        &entry_fields(
            b"big",
            &[
                (&b"body"[..], &huge[..]),
                (b"enqueued_at", now.as_bytes()),
                (b"uri", uri.as_bytes()),
            ],
        ),
    );
    buffer_one_patiently(&rig, &mut service, "e-2").await;
    let written = started.elapsed();

    // Generous Redis timeouts: moving 20 MiB takes a while on a loaded
    // machine, and a timed-out dead-letter is a bug of its own (see
    // `a_dead_letter_refused_for_memory_is_retried_in_order_not_skipped`).
    let mut config = fast_replay();
    config.redis_timeout = Duration::from_secs(10);
    let replay = HeartbeatBufferLayer::builder(rig.target.clone())
        .redis_timeout(Duration::from_secs(10))
        .build(&rig.watcher)
        .await
        .unwrap()
        .replayer()
        .config(config)
        .spawn(hyper_client::<RequestBody<Full<Bytes>>>());
    let mut events = replay.events();
    let up = Instant::now();
    rig.up().await;
    // The poison entry is dead-lettered; the big one is settled one way or
    // the other (delivered intact, or dead-lettered with a reason); the
    // others are delivered in order.
    let mut outcome_of_big = None;
    let mut poison_reason = None;
    let deadline = Instant::now() + EVENTUALLY;
    while outcome_of_big.is_none() || poison_reason.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the drain is wedged: poison {poison_reason:?}, big {outcome_of_big:?}, delivered {:?}",
                    bodies(&rig.http).iter().map(|b| b.len()).collect::<Vec<_>>()
                )
            })
            .unwrap();
        if event.entry_id == poison {
            if let ReplayEventKind::DeadLettered { reason } = event.kind {
                poison_reason = Some(reason);
            }
        } else if event.entry_id == big {
            match event.kind {
                ReplayEventKind::Delivered { .. } | ReplayEventKind::DeadLettered { .. } => {
                    outcome_of_big = Some(event.kind)
                }
                _ => {}
            }
        }
    }
    // Dead-lettered for its size (checked before decoding) or, under a
    // larger `max_entry_bytes`, for being malformed.
    let reason = poison_reason.as_deref().unwrap();
    assert!(
        reason.contains("exceeds max_entry_bytes") || reason.contains("missing field `v`"),
        "{reason}"
    );
    let n = match &outcome_of_big {
        Some(ReplayEventKind::Delivered { .. }) => 4,
        _ => 3,
    };
    assert!(rig.http.wait_for_requests(n, EVENTUALLY).await);
    let received = bodies(&rig.http);
    let expected: Vec<&str> = if n == 4 {
        assert_eq!(received[2].len(), huge.len(), "the big body arrived whole");
        vec!["e-0", "e-1", received[2].as_str(), "e-2"]
    } else {
        vec!["e-0", "e-1", "e-2"]
    };
    assert_eq!(received, expected);
    eventually(STEP, "an empty queue", || async {
        xlen(&rig.redis, &rig.target) == 0
    })
    .await;
    eprintln!(
        "enormous entries: written in {written:?}, settled {:?} after up; big: {outcome_of_big:?}",
        up.elapsed()
    );
    replay.shutdown().await;
}

/// A garbage entry with 5 000 fields (the dead-letter script passes every
/// field to one `XADD`: Lua's `unpack` stops at about 8 000 values). It must
/// be dead-lettered like any other poison entry, and the valid entries
/// around it delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_with_thousands_of_fields_is_dead_lettered() {
    init_tracing();
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer_one(&rig, &mut service, "f-0").await;
    let names: Vec<String> = (0..5000).map(|i| format!("f{i}")).collect();
    let fields: Vec<(&[u8], &[u8])> = names.iter().map(|n| (n.as_bytes(), &b"x"[..])).collect();
    let wide = xadd(&rig, &fields);
    buffer_one(&rig, &mut service, "f-1").await;
    buffer_one(&rig, &mut service, "f-2").await;
    let replay = replayer(&rig.watcher, &rig.target, fast_replay()).await;
    rig.up().await;
    let dead = DeadLetters::new(rig.redis.client(), &rig.target).unwrap();
    let settled = rig.http.wait_for_requests(3, STEP).await;
    let letters = dead.list(1).await.unwrap();
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(rig.target.queue_key())
        .arg("thb")
        .query(&mut rig.redis.conn())
        .unwrap();
    assert!(
        settled && letters.len() == 1,
        "delivered {:?}, dead letters {letters:?}, XPENDING {pending:?}",
        bodies(&rig.http)
    );
    assert_eq!(bodies(&rig.http), ["f-0", "f-1", "f-2"]);
    assert_eq!(letters[0].source_id, wide);
    assert!(
        letters[0].reason.contains("missing field `v`"),
        "{letters:?}"
    );
    replay.shutdown().await;
}

/// Combined faults: the target answers 400 (dead-letter) while Redis refuses
/// writes for memory, so the dead-lettering fails. In strict order the entry
/// must be dead-lettered once memory is back, and the next entry must not be
/// delivered before it is settled; nothing may stay stranded in the pending
/// list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_refused_for_memory_is_retried_in_order_not_skipped() {
    init_tracing();
    let started = Instant::now();
    let rig = Rig::start().await;
    rig.down().await;
    rig.http.set_reply(Reply::Status(StatusCode::BAD_REQUEST));
    let mut config = fast_replay();
    // The lease is taken once, below, while writes are allowed; no renewal
    // is due during the test.
    config.lease_ttl = Duration::from_secs(60);
    let replay = replayer(&rig.watcher, &rig.target, config).await;
    rig.up().await;
    let mut conn = rig.redis.conn();
    eventually(STEP, "the drain lease", || {
        let lease: Option<String> = conn.get(rig.target.lease_key()).unwrap();
        async move { lease.is_some() }
    })
    .await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer_one(&rig, &mut service, "o-0").await;
    buffer_one(&rig, &mut service, "o-1").await;

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut conn)
        .unwrap();
    let oom_before = errorstat(&rig.redis, "OOM");
    // Up, and no write accepted from then on (one pipeline: the watcher
    // hears of the heartbeat only after both ran).
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(rig.target.heartbeat_key())
        .arg(1)
        .ignore()
        .cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1)
        .ignore()
        .query(&mut conn)
        .unwrap();
    assert!(rig.http.wait_for_requests(1, STEP).await);
    eventually(STEP, "a dead-letter refused for memory", || {
        let refused = errorstat(&rig.redis, "OOM") > oom_before;
        async move { refused }
    })
    .await;
    let restored = Instant::now();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query(&mut conn)
        .unwrap();

    let dead = DeadLetters::new(rig.redis.client(), &rig.target).unwrap();
    let settled = tokio::time::timeout(STEP, async {
        while dead.len().await.unwrap() < 2 || xlen(&rig.redis, &rig.target) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .is_ok();
    let received: Vec<(String, Duration)> = rig
        .http
        .received()
        .iter()
        .map(|r| {
            (
                String::from_utf8_lossy(&r.body).into_owned(),
                r.at.saturating_duration_since(restored),
            )
        })
        .collect();
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(rig.target.queue_key())
        .arg("thb")
        .query(&mut conn)
        .unwrap();
    assert!(
        settled,
        "not settled: {} dead letters, queue {}, XPENDING {pending:?}, received {received:?}",
        dead.len().await.unwrap(),
        xlen(&rig.redis, &rig.target)
    );
    // o-1 waited for o-0: none of its deliveries came before memory was back.
    for (body, after_restore) in &received {
        if body == "o-1" {
            assert!(!after_restore.is_zero(), "o-1 overtook o-0: {received:?}");
        }
    }
    let letters = dead.list(2).await.unwrap();
    let ids: Vec<&str> = letters
        .iter()
        .map(|l| l.request.as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(ids, ["o-0", "o-1"]);
    replay.shutdown().await;
    eprintln!("dead letter under OOM: {:?}", started.elapsed());
}

/// An entry that decodes but that the replay client can never send (an
/// origin-form URI, written by hand or by a caller that saw one, replayed
/// through a hyper client that needs absolute URIs) is retried up to
/// `max_attempts`, then dead-lettered naming the client's error; the valid
/// entries around it are delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_the_client_cannot_send_is_dead_lettered_naming_the_error() {
    init_tracing();
    let started = Instant::now();
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer_one(&rig, &mut service, "u-0").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let relative = xadd(
        &rig,
        &entry_fields(
            b"relative",
            &[
                (&b"uri"[..], &b"/orders"[..]),
                (b"enqueued_at", now.as_bytes()),
            ],
        ),
    );
    buffer_one(&rig, &mut service, "u-1").await;
    let mut config = fast_replay();
    config.max_attempts = 3;
    let replay = replayer(&rig.watcher, &rig.target, config).await;
    rig.up().await;
    assert!(rig.http.wait_for_requests(2, EVENTUALLY).await);
    let dead = DeadLetters::new(rig.redis.client(), &rig.target).unwrap();
    eventually(EVENTUALLY, "the dead letter", || async {
        dead.len().await.unwrap() == 1
    })
    .await;
    assert_eq!(bodies(&rig.http), ["u-0", "u-1"]);
    let letter = dead.list(1).await.unwrap().remove(0);
    assert_eq!(letter.source_id, relative);
    assert!(
        letter.reason.contains("UserAbsoluteUriRequired")
            && letter.reason.contains("gave up after 3 attempts"),
        "{}",
        letter.reason
    );
    assert_eq!(letter.request.as_ref().unwrap().id, "relative");
    replay.shutdown().await;
    eprintln!(
        "unsendable entry: {:?}; reason: {}",
        started.elapsed(),
        letter.reason
    );
}

// ---------------------------------------------------------------------------
// 3. Names.
// ---------------------------------------------------------------------------

#[test]
fn hostile_names_are_refused_with_their_kind_and_reason() {
    let long = "x".repeat(300);
    let cases: Vec<(&str, &str)> = vec![
        ("a}:x", "brace"),
        ("}", "brace"),
        ("{x}", "brace"),
        ("a{", "brace"),
        ("*", "glob character"),
        ("orders*", "glob character"),
        ("a?", "glob character"),
        ("[ab]", "glob character"),
        ("a\\*", "glob character"),
        ("a b", "whitespace"),
        ("\n", "whitespace"),
        ("a\r\nb", "whitespace"),
        ("a\tb", "whitespace"),
        ("\u{a0}", "whitespace"),
        ("a\u{2028}", "whitespace"),
        ("a\u{0}", "control character"),
        ("a\u{7f}", "control character"),
        ("a\u{1b}[31m", "control character"),
        ("", "must not be empty"),
        (&long, "longer than 200 bytes"),
    ];
    for (bad, reason) in &cases {
        let check = |err: tower_heartbeat_buffer::InvalidName, kind: NameKind, label: &str| {
            assert_eq!(err.kind(), kind, "{bad:?}");
            assert_eq!(err.value(), *bad);
            let text = err.to_string();
            assert!(text.starts_with(&format!("invalid {label} ")), "{text}");
            assert!(text.contains(reason), "{bad:?}: {text}");
            // The value is quoted (escaped), so a newline cannot forge log lines.
            assert!(!text.contains('\n'), "{text:?}");
        };
        check(
            Target::new(bad).unwrap_err(),
            NameKind::Target,
            "target name",
        );
        check(
            Target::with_namespace(bad, "orders").unwrap_err(),
            NameKind::Namespace,
            "namespace",
        );
        // The namespace is checked first.
        check(
            Target::with_namespace(bad, bad).unwrap_err(),
            NameKind::Namespace,
            "namespace",
        );
        check(
            Target::new("orders")
                .unwrap()
                .instance_heartbeat_key(bad)
                .unwrap_err(),
            NameKind::Instance,
            "instance name",
        );
    }
    // 200 bytes is the limit, counted in bytes (not characters).
    Target::new(&"x".repeat(200)).unwrap();
    assert!(Target::new(&"é".repeat(101)).is_err());
}

/// What is accepted stays inside its namespace: the hash tag is exactly the
/// target's name, and every key starts with `ns:{name}:`.
#[test]
fn accepted_odd_names_cannot_escape_their_namespace() {
    for (ns, name) in [
        ("thb", "eu-west:orders"),
        ("a:b", "c"),
        ("thb", "a/b"),
        ("thb", "q\"uote'"),
        ("thb", "%2A"),
        ("thb", "ünïcödé"),
        ("thb", "-"),
        ("n.s", "x|y&z"),
    ] {
        let t = Target::with_namespace(ns, name).unwrap();
        let prefix = format!("{ns}:{{{name}}}:");
        for key in [
            t.heartbeat_key(),
            t.queue_key(),
            t.dead_letter_key(),
            t.lease_key(),
            t.done_key("id"),
            t.instance_key_prefix(),
            t.instance_heartbeat_key("pod-1").unwrap(),
        ] {
            assert!(key.starts_with(&prefix), "{key} outside {prefix}");
            // The Redis Cluster hash tag: between the first `{` and the
            // first `}` after it.
            let open = key.find('{').unwrap();
            let close = open + key[open..].find('}').unwrap();
            assert_eq!(&key[open + 1..close], name, "{key}");
        }
    }
}

/// An explicit heartbeat key is only ever used exactly: glob characters and
/// braces are allowed in it (it is another system's key) and match nothing
/// but themselves; whitespace, control characters, empty and over 800 bytes
/// are refused with `NameKind::Key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_heartbeat_key_with_glob_characters_is_watched_exactly() {
    init_tracing();
    let orders = || Target::new("orders").unwrap();
    for bad in [
        "",
        "a b",
        "\n",
        "legacy:\t:alive",
        "a\u{0}",
        &"k".repeat(801),
    ] {
        let err = orders().with_heartbeat_key(bad).unwrap_err();
        assert_eq!(err.kind(), NameKind::Key, "{bad:?}");
        assert_eq!(err.value(), bad);
        assert!(
            err.to_string().starts_with("invalid heartbeat key "),
            "{err}"
        );
    }
    orders().with_heartbeat_key(&"k".repeat(800)).unwrap();
    let braces = orders().with_heartbeat_key("legacy:{x}:alive").unwrap();
    assert_eq!(braces.heartbeat_key(), "legacy:{x}:alive");

    let target = orders().with_heartbeat_key("legacy:*:alive").unwrap();
    assert_eq!(target.heartbeat_key(), "legacy:*:alive");
    assert_eq!(target.queue_key(), "thb:{orders}:queue");

    let redis = RedisServer::start();
    let mut conn = redis.conn();
    // Keys the pattern would match, were it used as one.
    for decoy in ["legacy:x:alive", "legacy:orders:alive", "legacy::alive"] {
        let _: () = conn.set(decoy, 1).unwrap();
    }
    let watcher = Watcher::connect(redis.client()).await.unwrap();
    let view = watcher.watch(&target).await;
    assert_eq!(view.health(), Health::Down, "a decoy counted as the key");
    let _: () = conn.set("legacy:*:alive", 1).unwrap();
    tokio::time::timeout(STEP, view.wait_for(Health::Up))
        .await
        .expect("the exact key was not seen");
    // Deleting the exact key is seen even though the decoys still live.
    let _: () = conn.del("legacy:*:alive").unwrap();
    tokio::time::timeout(STEP, view.wait_for(Health::Down))
        .await
        .expect("the decoys kept the target up");
    // A decoy's own events do not make it up either: `?` and `[` too.
    let qmark = orders().with_heartbeat_key("legacy:?:alive").unwrap();
    let view2 = watcher.watch(&qmark).await;
    let _: () = conn.set("legacy:a:alive", 1).unwrap();
    let _: () = conn.set("legacy:?:alive", 1).unwrap();
    tokio::time::timeout(STEP, view2.wait_for(Health::Up))
        .await
        .expect("the exact key was not seen");
    let _: () = conn.del("legacy:?:alive").unwrap();
    tokio::time::timeout(STEP, view2.wait_for(Health::Down))
        .await
        .expect("legacy:a:alive kept the target up");
}

// ---------------------------------------------------------------------------
// 4. Redis answering errors.
// ---------------------------------------------------------------------------

/// Fills the server with strings until even a tiny write is refused for
/// memory (64 KiB values, then smaller ones: a refused big write frees its
/// query buffer, leaving room for small ones); returns the last refusal.
fn fill_until_oom(conn: &mut redis::Connection) -> String {
    let mut refusal = String::new();
    let mut i = 0;
    for size in [64 * 1024, 4096, 256, 16] {
        let value = vec![b'f'; size];
        loop {
            i += 1;
            assert!(i < 100_000, "100 000 writes did not fill a 2 MB server");
            if let Err(e) = conn.set::<_, _, ()>(format!("filler:{i}"), &value) {
                refusal = e.to_string();
                break;
            }
        }
    }
    refusal
}

fn errorstat(redis: &RedisServer, code: &str) -> u64 {
    let info = redis.info("errorstats");
    let prefix = format!("errorstat_{code}:count=");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_gives_a_503_naming_it_writes_nothing_and_recovers() {
    init_tracing();
    let started = Instant::now();
    let rig = Rig::start().await;
    rig.down().await;
    // The plain path (XADD pipelined with XLEN, far from full) and the
    // checked path (the script, near the limit).
    let mut plain = rig.service(|b| b).await;
    let mut checked = rig.service(|b| b.max_queue_len(50)).await;
    buffer_one(&rig, &mut plain, "before-plain").await;
    buffer_one(&rig, &mut checked, "before-checked").await;

    let mut conn = rig.redis.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("2mb")
        .query(&mut conn)
        .unwrap();
    // The filling connection stays open: closing it would free its buffers.
    let refusal = fill_until_oom(&mut conn);
    assert!(refusal.contains("OOM"), "{refusal}");
    let probe = rig.redis.conn().set::<_, _, ()>("probe", "x").unwrap_err();
    assert!(probe.to_string().contains("OOM"), "{probe}");
    let before = xlen(&rig.redis, &rig.target);
    assert_eq!(before, 2);

    for (path, service) in [("plain", &mut plain), ("checked", &mut checked)] {
        let t = Instant::now();
        let out = call_in_time(service, post(&rig, &format!("oom-{path}"))).await;
        let detail = redis_detail(&out);
        assert!(detail.contains("OOM"), "{path}: {detail}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{path}: took {:?}",
            t.elapsed()
        );
        assert_eq!(out.headers["idempotency-key"], format!("oom-{path}"));
        assert_eq!(
            xlen(&rig.redis, &rig.target),
            before,
            "{path}: half-written"
        );
        eprintln!("OOM ({path}): {detail}");
    }

    // Memory back: the very next calls are stored.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query(&mut conn)
        .unwrap();
    buffer_one(&rig, &mut plain, "after-plain").await;
    buffer_one(&rig, &mut checked, "after-checked").await;
    let ids: Vec<String> = rig.stored().into_iter().map(|e| e.id).collect();
    assert_eq!(
        ids,
        [
            "before-plain",
            "before-checked",
            "after-plain",
            "after-checked"
        ]
    );
    eprintln!("oom: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_gives_a_503_naming_it_and_promotion_recovers() {
    init_tracing();
    let started = Instant::now();
    let rig = Rig::start().await;
    let primary = RedisServer::start();
    rig.down().await;
    let mut plain = rig.service(|b| b).await;
    let mut checked = rig.service(|b| b.max_queue_len(50)).await;
    buffer_one(&rig, &mut plain, "before").await;

    // Sync at once (a diskless sync waits 5 s for more replicas by default).
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("repl-diskless-sync-delay")
        .arg("0")
        .query(&mut primary.conn())
        .unwrap();
    let mut conn = rig.redis.conn();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(primary.port())
        .query(&mut conn)
        .unwrap();
    eventually(STEP, "the replica to sync", || async {
        rig.redis
            .info("replication")
            .contains("master_link_status:up")
    })
    .await;
    // The sync replaced the data set with the primary's (empty).
    let before = xlen(&rig.redis, &rig.target);

    for (path, service) in [("plain", &mut plain), ("checked", &mut checked)] {
        let out = call_in_time(service, post(&rig, &format!("ro-{path}"))).await;
        let detail = redis_detail(&out);
        assert!(
            detail.to_lowercase().contains("read only replica"),
            "{path}: {detail}"
        );
        assert_eq!(xlen(&rig.redis, &rig.target), before, "{path}");
        assert_eq!(xlen(&primary, &rig.target), 0, "{path}");
        eprintln!("READONLY ({path}): {detail}");
    }

    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query(&mut conn)
        .unwrap();
    buffer_one(&rig, &mut plain, "after-plain").await;
    buffer_one(&rig, &mut checked, "after-checked").await;
    let ids: Vec<String> = rig.stored().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["after-plain", "after-checked"]);
    eprintln!("readonly: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_between_calls_is_survived_by_the_bounded_enqueue() {
    init_tracing();
    let rig = Rig::start().await;
    rig.down().await;
    // Under the headroom on every write: every store runs the script.
    let mut service = rig.service(|b| b.max_queue_len(5)).await;
    let mut conn = rig.redis.conn();
    let noscript_before = errorstat(&rig.redis, "NOSCRIPT");
    for i in 0..5 {
        let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
        let out = call_in_time(&mut service, post(&rig, &format!("s-{i}"))).await;
        assert_eq!(out.status, StatusCode::ACCEPTED, "{i}: {out:?}");
        let buffered = out
            .extensions
            .get::<tower_heartbeat_buffer::Buffered>()
            .unwrap();
        assert_eq!(buffered.queue_len(), i + 1);
    }
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
    let out = call_in_time(&mut service, post(&rig, "s-full")).await;
    assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE, "{out:?}");
    assert_eq!(unavailable(&out), UnavailableReason::QueueFull { len: 5 });
    assert_eq!(xlen(&rig.redis, &rig.target), 5);
    // The flushes really forced reloads (6 calls, each after a flush).
    let reloads = errorstat(&rig.redis, "NOSCRIPT") - noscript_before;
    assert!(
        reloads >= 6,
        "only {reloads} NOSCRIPT errors: the script path was not taken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_is_survived_by_the_replayer_and_dead_letters() {
    init_tracing();
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    rig.http.set_reply(Reply::Status(StatusCode::BAD_REQUEST));
    buffer_one(&rig, &mut service, "d-0").await;
    let replay = replayer(&rig.watcher, &rig.target, fast_replay()).await;
    let dead = DeadLetters::new(rig.redis.client(), &rig.target).unwrap();
    rig.up().await;
    eventually(EVENTUALLY, "the first dead letter", || async {
        dead.len().await.unwrap() == 1
    })
    .await;

    // The scripts are loaded now; flush them, then make the replayer need
    // them again (lease renewal and dead-lettering).
    let mut conn = rig.redis.conn();
    let noscript_before = errorstat(&rig.redis, "NOSCRIPT");
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
    rig.down().await;
    buffer_one(&rig, &mut service, "d-1").await;
    rig.up().await;
    eventually(EVENTUALLY, "the second dead letter", || async {
        dead.len().await.unwrap() == 2
    })
    .await;
    let letters = dead.list(10).await.unwrap();
    for (letter, id) in letters.iter().zip(["d-0", "d-1"]) {
        assert_eq!(letter.request.as_ref().unwrap().id, id);
        assert!(letter.reason.contains("400"), "{}", letter.reason);
    }
    assert!(errorstat(&rig.redis, "NOSCRIPT") > noscript_before);

    // Requeue (a script too) after another flush: delivered.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
    rig.http.set_reply(Reply::Ok);
    assert!(dead.requeue(&letters[1].entry_id).await.unwrap());
    assert!(rig.http.wait_for_requests(3, EVENTUALLY).await);
    assert_eq!(bodies(&rig.http), ["d-0", "d-1", "d-1"]);
    assert_eq!(dead.len().await.unwrap(), 1);
    replay.shutdown().await;
}

/// A server restarted with a data set that takes 1-3 s to load (a per-key
/// load delay): while it answers `LOADING`, bufferable calls get a quick 503
/// (no hang, no panic); once loaded, calls are stored again and the
/// replayer delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_loading_calls_get_a_quick_503_and_everything_recovers() {
    init_tracing();
    let started = Instant::now();
    const KEYS: u64 = 10_000;
    let redis = RedisServer::start_with(
        RedisOptions::new()
            .appendonly(false)
            .debug_command(true)
            // 100 µs per key loaded: 1-3 s for the data set below (the
            // harness' restart gives a server 5 s to answer PING).
            .extra("key-load-delay", "100")
            // Answer clients (with LOADING) every KiB loaded.
            .extra("loading-process-events-interval-bytes", "1024"),
    );
    let http = HttpTarget::start().await;
    let target = Target::new("orders").unwrap();
    let watcher = Watcher::connect(redis.client()).await.unwrap();
    let layer = HeartbeatBufferLayer::builder(target.clone())
        .build(&watcher)
        .await
        .unwrap();
    let mut service = layer.layer(hyper_client());
    let view = watcher.watch(&target).await;
    assert_eq!(view.health(), Health::Down);
    let request = |key: &str| {
        Request::post(format!("{}/orders", http.url()))
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from(key.to_owned())))
            .unwrap()
    };
    let out = call_in_time(&mut service, request("before")).await;
    assert_eq!(out.status, StatusCode::ACCEPTED, "{out:?}");

    let mut conn = redis.conn();
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(KEYS)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SAVE").query(&mut conn).unwrap();
    drop(conn);

    let port = redis.port();
    let restarting = Instant::now();
    let restart = tokio::task::spawn_blocking(move || {
        let mut redis = redis;
        redis.restart();
        redis
    });
    // While it restarts: every call answers quickly, with a 503 (or a 202
    // once loaded).
    let mut during_loading = Vec::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut i = 0;
    while !restart.is_finished() {
        i += 1;
        let loading = is_loading(port);
        let t = Instant::now();
        let out = call_in_time(&mut service, request(&format!("during-{i}"))).await;
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "call {i} took {took:?}");
        *statuses.entry(out.status.as_u16()).or_default() += 1;
        match out.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                let detail = redis_detail(&out);
                if loading && is_loading(port) {
                    during_loading.push((took, detail));
                }
            }
            StatusCode::ACCEPTED => assert!(!loading || !is_loading(port), "{out:?}"),
            other => panic!("call {i} during the restart: {other}: {out:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redis = restart.await.unwrap();
    let loaded = restarting.elapsed();
    eprintln!(
        "restart took {loaded:?}; {} calls made ({statuses:?}); {} answered 503 while LOADING; details: {:?}",
        i,
        during_loading.len(),
        during_loading.iter().map(|(_, d)| d).collect::<std::collections::BTreeSet<_>>()
    );
    assert!(
        !during_loading.is_empty(),
        "LOADING was not observed ({i} calls over {loaded:?})"
    );

    // Loaded: calls are stored again.
    let mut n = 0;
    eventually(EVENTUALLY, "a 202 after loading", || {
        n += 1;
        let request = request(&format!("after-{n}"));
        let mut service = service.clone();
        async move { call_in_time(&mut service, request).await.status == StatusCode::ACCEPTED }
    })
    .await;
    let recovered = restarting.elapsed();
    let stored: Vec<String> = support::layer_rig::stored(&redis, &target)
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        stored.first().map(String::as_str),
        Some("before"),
        "{stored:?}"
    );
    assert_eq!(stored.last(), Some(&format!("after-{n}")));
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut redis.conn()).unwrap();
    assert!(dbsize >= KEYS, "{dbsize}");

    // And the replayer delivers them all once the target is up.
    let replay = replayer(&watcher, &target, fast_replay()).await;
    let _: () = redis.conn().set(target.heartbeat_key(), 1).unwrap();
    tokio::time::timeout(STEP, view.wait_for(Health::Up))
        .await
        .unwrap();
    assert!(http.wait_for_requests(stored.len(), EVENTUALLY).await);
    assert_eq!(bodies(&http), stored);
    replay.shutdown().await;
    eprintln!(
        "loading: recovered {recovered:?} after the restart began; test {:?}",
        started.elapsed()
    );
}

/// Whether the server answers `PING` with `LOADING` (raw RESP, so no
/// client handshake gets in the way).
fn is_loading(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 64];
    match stream.read(&mut reply) {
        Ok(n) => reply[..n].starts_with(b"-LOADING"),
        Err(_) => false,
    }
}

/// Combined fault: Redis stalls (`DEBUG SLEEP`) right after entries were
/// added, while the replayer polls. Its `XREADGROUP ... >` times out on the
/// client side, but Redis runs it when it wakes: the entries are then
/// claimed in the replayer's name with nobody waiting for the reply. They
/// must still be delivered (in order), not stranded in the pending list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_read_by_a_timed_out_buffer_read_are_not_stranded() {
    init_tracing();
    let started = Instant::now();
    let redis = RedisServer::start_with(RedisOptions::new().debug_command(true));
    let http = HttpTarget::start().await;
    let target = Target::new("orders").unwrap();
    let watcher = Watcher::connect(redis.client()).await.unwrap();
    let view = watcher.watch(&target).await;
    let _: () = redis.conn().set(target.heartbeat_key(), 1).unwrap();
    tokio::time::timeout(STEP, view.wait_for(Health::Up))
        .await
        .unwrap();
    let mut config = fast_replay();
    config.poll_interval = Duration::from_millis(20);
    config.redis_timeout = Duration::from_millis(200);
    // No lease renewal due during the test: the stalled command is a read.
    config.lease_ttl = Duration::from_secs(60);
    let replay = replayer(&watcher, &target, config).await;
    // The replayer is draining (an empty queue): one entry goes through.
    let uri = format!("{}/orders", http.url());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let entry = |id: &'static str| -> Vec<(&'static [u8], Vec<u8>)> {
        entry_fields(id.as_bytes(), &[])
            .into_iter()
            .map(|(k, v)| match k {
                b"uri" => (k, uri.clone().into_bytes()),
                b"enqueued_at" => (k, now.clone().into_bytes()),
                _ => (k, v.to_vec()),
            })
            .collect()
    };
    let _: String = redis
        .conn()
        .xadd(target.queue_key(), "*", &entry("t-0"))
        .unwrap();
    assert!(http.wait_for_requests(1, STEP).await);

    // Three entries, then a 1.5 s stall, in one pipeline: the keyspace
    // events reach the replayer only after the stall, its polls during it
    // time out.
    let mut pipe = redis::pipe();
    for id in ["t-1", "t-2", "t-3"] {
        pipe.cmd("XADD")
            .arg(target.queue_key())
            .arg("*")
            .arg(entry(id));
    }
    pipe.cmd("DEBUG").arg("SLEEP").arg("1.5").ignore();
    let mut conn = redis.conn();
    tokio::task::spawn_blocking(move || pipe.query::<Vec<String>>(&mut conn).unwrap())
        .await
        .unwrap();
    let stalled = Instant::now();
    // And one more after the stall: it must not overtake the three.
    let _: String = redis
        .conn()
        .xadd(target.queue_key(), "*", &entry("t-4"))
        .unwrap();
    let delivered = http.wait_for_requests(5, Duration::from_secs(15)).await;
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(target.queue_key())
        .arg("thb")
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        delivered,
        "after the stall only {:?} were delivered in {:?}; XPENDING: {pending:?}",
        bodies(&http),
        stalled.elapsed()
    );
    assert_eq!(bodies(&http), ["t-0", "t-1", "t-2", "t-3", "t-4"]);
    replay.shutdown().await;
    eprintln!(
        "stalled read: delivered {:?} after the stall; test {:?}",
        stalled.elapsed(),
        started.elapsed()
    );
}
