//! The layer against a real HTTP target and a real Redis: forward while up,
//! store while down, never both, never neither without saying so.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::layer_rig::{call, Rig};
use support::{hyper_client, wait_until, HttpTarget, Reply};
use tower_heartbeat_buffer::policy::{WhenDown, WhenRedisDown};
use tower_heartbeat_buffer::{Buffered, DeliveryOrder, Health, Unavailable, UnavailableReason};

fn reason(outcome: &support::layer_rig::Outcome) -> UnavailableReason {
    outcome
        .extensions
        .get::<Unavailable>()
        .unwrap_or_else(|| panic!("no Unavailable extension on {outcome:?}"))
        .reason()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_untouched_while_up() {
    let rig = Rig::start().await;
    rig.up().await;
    rig.http.set_reply(Reply::Echo);
    let mut service = rig.service(|b| b).await;

    let request = Request::post(format!("{}/orders?tenant=7", rig.http.url()))
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from_static(b"\x00\xffpayload")))
        .unwrap();
    let out = call(&mut service, request).await.unwrap();
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(&out.body[..], b"\x00\xffpayload");
    assert_eq!(out.headers["x-target"], "yes");
    assert!(out.extensions.get::<Buffered>().is_none());

    let seen = rig.http.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/orders?tenant=7");
    // An id was assigned before the first attempt, so a later replay of this
    // very request would carry the same key.
    let key = seen[0].headers["idempotency-key"].to_str().unwrap();
    assert_eq!(key.len(), 36, "a UUIDv7: {key}");

    // Statuses come back as the target gave them, even failures that cannot
    // be diverted (a GET is not bufferable).
    rig.http
        .set_reply(Reply::Status(StatusCode::SERVICE_UNAVAILABLE));
    let out = call(&mut service, rig.request("GET", "/x", b""))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&out.body[..], b"status:503");
    assert!(rig.stored().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_the_request_byte_for_byte_and_answers_202_while_down() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;

    let request = Request::put(format!("{}/orders/42?tenant=7&x=%20y", rig.http.url()))
        .header("content-type", "application/json")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("idempotency-key", "caller-key-1")
        .header("authorization", "Bearer secret")
        .body(Full::new(Bytes::from_static(b"{\"qty\":\x01}\r\n")))
        .unwrap();
    let out = call(&mut service, request).await.unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED);
    let buffered = out.extensions.get::<Buffered>().unwrap();
    assert_eq!(buffered.id(), "caller-key-1");
    assert_eq!(buffered.queue_len(), 1);
    assert_eq!(out.headers["idempotency-key"], "caller-key-1");

    let stored = rig.stored();
    assert_eq!(stored.len(), 1);
    let entry = &stored[0];
    assert_eq!(entry.id, "caller-key-1");
    assert_eq!(entry.method, Method::PUT);
    assert_eq!(
        entry.uri.to_string(),
        format!("{}/orders/42?tenant=7&x=%20y", rig.http.url())
    );
    assert_eq!(entry.headers["content-type"], "application/json");
    let multi: Vec<_> = entry.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["one", "two"]);
    assert_eq!(entry.headers["idempotency-key"], "caller-key-1");
    assert!(
        !entry.headers.contains_key("authorization"),
        "credentials are not stored by default"
    );
    assert_eq!(&entry.body[..], b"{\"qty\":\x01}\r\n");
    assert_eq!(entry.attempts, 0);
    assert_eq!(rig.http.received_count(), 0, "nothing reached the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_down_get_gets_503_and_oversize_bodies_get_413() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b.max_body_bytes(16)).await;

    let out = call(&mut service, rig.request("GET", "/x", b""))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reason(&out), UnavailableReason::TargetDown);

    // Declared too large.
    let out = call(
        &mut service,
        rig.request("POST", "/x", b"0123456789abcdefXYZ"),
    )
    .await
    .unwrap();
    assert_eq!(out.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reason(&out), UnavailableReason::BodyTooLarge { limit: 16 });

    // Too large without a declared length (streamed).
    let stream = http_body_util::StreamBody::new(futures_util::stream::iter((0..4).map(|_| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"0123456789")))
    })));
    let (parts, _) = rig.request("POST", "/x", b"").into_parts();
    let client: support::HyperClient<_> = hyper_client();
    let layer = tower_heartbeat_buffer::HeartbeatBufferLayer::builder(rig.target.clone())
        .max_body_bytes(16)
        .build(&rig.watcher)
        .await
        .unwrap();
    let mut streaming = tower_layer::Layer::layer(&layer, client);
    let response = tower::ServiceExt::oneshot(&mut streaming, Request::from_parts(parts, stream))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Exactly at the limit is fine.
    let out = call(&mut service, rig.request("POST", "/x", b"0123456789abcdef"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED);
    assert_eq!(rig.stored().len(), 1, "refused requests were not stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_forwards_are_diverted_and_the_target_becomes_suspect() {
    let rig = Rig::start().await;
    rig.up().await;
    rig.http.set_reply(Reply::Status(StatusCode::BAD_GATEWAY));
    // Relaxed order, so the first diverted call does not hold back the next
    // (strict order would, once the buffer is not empty).
    let mut service = rig
        .service(|b| {
            b.suspect_after(2)
                .probe_interval(Duration::from_millis(300))
                .order(DeliveryOrder::Relaxed)
        })
        .await;

    // Two failures reach the target and are diverted, not failed.
    for _ in 0..2 {
        let out = call(&mut service, rig.request("POST", "/o", b"x"))
            .await
            .unwrap();
        assert_eq!(out.status, StatusCode::ACCEPTED);
    }
    assert_eq!(rig.http.received_count(), 2);
    // Now suspect: calls divert without paying the failure first.
    let out = call(&mut service, rig.request("POST", "/o", b"x"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED);
    assert_eq!(
        rig.http.received_count(),
        2,
        "the suspect target was not called"
    );
    // A GET cannot be stored: 503, with when to try again.
    let out = call(&mut service, rig.request("GET", "/o", b""))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(out.headers.contains_key("retry-after"));
    assert_eq!(
        rig.http.received_count(),
        2,
        "the suspect target was not called"
    );

    let attempts: Vec<u32> = rig.stored().iter().map(|e| e.attempts).collect();
    assert_eq!(
        attempts,
        [1, 1, 0],
        "two diverted after trying, one without"
    );

    // After the probe interval one call probes; a good answer restores trust.
    rig.http.set_reply(Reply::Ok);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let out = call(&mut service, rig.request("GET", "/o", b""))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::OK);
    let out = call(&mut service, rig.request("GET", "/o", b""))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_errors_are_diverted_too() {
    let mut rig = Rig::start().await;
    rig.up().await;
    let mut service = rig.service(|b| b).await;
    rig.http.kill().await;
    let out = call(&mut service, rig.request("POST", "/o", b"kept"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED);
    assert_eq!(&rig.stored()[0].body[..], b"kept");
    // A GET cannot be diverted: the caller sees the transport error.
    assert!(call(&mut service, rig.request("GET", "/o", b""))
        .await
        .is_err());
}

/// The target dies in the middle of a stream of calls: every call either
/// got the target's answer, or a 202 with its entry stored, or an error —
/// none both failed and stored, none stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_mid_stream_every_call_is_answered_or_stored_exactly_once() {
    let mut rig = Rig::start().await;
    rig.up().await;
    let service = rig.service(|b| b).await;
    const CALLS: usize = 400;
    const WORKERS: usize = 8;

    let url = rig.http.url();
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let mut service = service.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in (worker..CALLS).step_by(WORKERS) {
                let key = format!("call-{i:04}");
                let request = Request::post(format!("{url}/o/{i}"))
                    .header("idempotency-key", &key)
                    .body(Full::new(Bytes::from(format!("body-{i}"))))
                    .unwrap();
                let outcome = call(&mut service, request).await;
                outcomes.push((key, outcome.map(|o| o.status).map_err(|e| e.to_string())));
                tokio::task::yield_now().await;
            }
            outcomes
        }));
    }
    assert!(
        rig.http
            .wait_for_requests(CALLS / 4, Duration::from_secs(10))
            .await
    );
    rig.http.kill().await;
    let mut outcomes = BTreeMap::new();
    for task in tasks {
        outcomes.extend(task.await.unwrap());
    }

    let stored = rig.stored();
    let stored_ids: Vec<&str> = stored.iter().map(|e| e.id.as_str()).collect();
    let unique: HashSet<&str> = stored_ids.iter().copied().collect();
    assert_eq!(unique.len(), stored_ids.len(), "an entry was stored twice");
    for entry in &stored {
        let i: usize = entry.id["call-".len()..].parse().unwrap();
        assert_eq!(entry.body, format!("body-{i}"), "stored body intact");
    }

    let delivered: HashSet<String> = rig
        .http
        .received()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    let (mut answered, mut accepted, mut failed) = (0, 0, 0);
    for (key, outcome) in &outcomes {
        match outcome {
            Ok(StatusCode::OK) => {
                answered += 1;
                assert!(delivered.contains(key), "{key}: 200 without delivery");
                assert!(!unique.contains(key.as_str()), "{key}: answered and stored");
            }
            Ok(StatusCode::ACCEPTED) => {
                accepted += 1;
                assert!(unique.contains(key.as_str()), "{key}: 202 but not stored");
            }
            other => {
                failed += 1;
                assert!(
                    !unique.contains(key.as_str()),
                    "{key}: failed ({other:?}) yet stored"
                );
            }
        }
    }
    assert_eq!(answered + accepted + failed, CALLS);
    assert!(answered >= CALLS / 4, "answered {answered}");
    assert!(accepted > 0, "nothing was buffered after the kill");
    assert_eq!(accepted, stored.len(), "every stored entry got its 202");
    eprintln!("answered {answered}, buffered {accepted}, failed {failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_503_fast_when_the_buffer_is_needed_forwards_while_up_and_recovers() {
    let mut rig = Rig::start().await;
    rig.up().await;
    let mut service = rig.service(|b| b).await;
    let view = rig.watcher.watch(&rig.target).await;

    // Redis dies while the target is up: calls still go through.
    rig.redis.kill();
    assert!(wait_until(Duration::from_secs(10), || !view.redis_reachable()).await);
    let out = call(&mut service, rig.request("POST", "/o", b"1"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::OK);

    // Redis back; the target goes down; Redis dies again.
    rig.redis.restart();
    assert!(wait_until(Duration::from_secs(10), || view.redis_reachable()).await);
    rig.down().await;
    rig.redis.kill();
    assert!(wait_until(Duration::from_secs(10), || !view.redis_reachable()).await);
    let start = Instant::now();
    let out = call(&mut service, rig.request("POST", "/o", b"2"))
        .await
        .unwrap();
    let took = start.elapsed();
    assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(matches!(
        reason(&out),
        UnavailableReason::RedisUnavailable { .. }
    ));
    assert!(
        took < Duration::from_millis(100),
        "503 took {took:?}: not fast"
    );

    // Everything recovers by itself.
    rig.redis.restart();
    assert!(wait_until(Duration::from_secs(10), || view.redis_reachable()).await);
    let out = call(&mut service, rig.request("POST", "/o", b"3"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED);
    let bodies: Vec<Bytes> = rig.stored().into_iter().map(|e| e.body).collect();
    assert_eq!(bodies, [Bytes::from_static(b"3")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_rejects_everything_while_redis_is_down() {
    let mut rig = Rig::start().await;
    rig.up().await;
    let mut service = rig
        .service(|b| b.when_redis_down(WhenRedisDown::RejectAll))
        .await;
    let view = rig.watcher.watch(&rig.target).await;
    rig.redis.kill();
    assert!(wait_until(Duration::from_secs(10), || !view.redis_reachable()).await);
    let out = call(&mut service, rig.request("GET", "/o", b""))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reason(&out), UnavailableReason::RejectedWhileRedisDown);
    assert_eq!(rig.http.received_count(), 0);
    rig.redis.restart();
    assert!(wait_until(Duration::from_secs(10), || view.redis_reachable()).await);
    let out = call(&mut service, rig.request("GET", "/o", b""))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_refuses_new_requests_and_drops_nothing() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b.max_queue_len(3)).await;
    let mut statuses = Vec::new();
    for i in 0..5u8 {
        let request = Request::post(format!("{}/o", rig.http.url()))
            .body(Full::new(Bytes::from(vec![b'0' + i])))
            .unwrap();
        let out = call(&mut service, request).await.unwrap();
        if out.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(reason(&out), UnavailableReason::QueueFull { len: 3 });
        }
        statuses.push(out.status.as_u16());
    }
    assert_eq!(statuses, [202, 202, 202, 503, 503]);
    let bodies: Vec<Bytes> = rig.stored().into_iter().map(|e| e.body).collect();
    assert_eq!(bodies, [&b"0"[..], b"1", b"2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_order_joins_the_backlog_while_relaxed_forwards() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut strict = rig.service(|b| b).await;
    let mut relaxed = rig.service(|b| b.order(DeliveryOrder::Relaxed)).await;
    let out = call(&mut strict, rig.request("POST", "/o", b"first"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED);

    rig.up().await;
    // Strict: "second" must not overtake "first", which waits in the buffer.
    let out = call(&mut strict, rig.request("POST", "/o", b"second"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED);
    // Non-bufferable calls are not held back.
    let out = call(&mut strict, rig.request("GET", "/o", b""))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::OK);
    // Relaxed: straight through.
    let out = call(&mut relaxed, rig.request("POST", "/o", b"third"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::OK);
    let bodies: Vec<Bytes> = rig.stored().into_iter().map(|e| e.body).collect();
    assert_eq!(bodies, [&b"first"[..], b"second"]);

    // The buffer drained by someone else (here: by hand): strict forwards
    // again as soon as the watcher sees the queue empty.
    let _: () = redis::Commands::del(&mut rig.redis.conn(), rig.target.queue_key()).unwrap();
    let view = rig.watcher.watch(&rig.target).await;
    assert!(wait_until(Duration::from_secs(5), || view.backlog() == Some(0)).await);
    let out = call(&mut strict, rig.request("POST", "/o", b"fourth"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_gets_requests_while_down_with_the_same_idempotency_key() {
    let rig = Rig::start().await;
    let secondary = HttpTarget::start().await;
    rig.down().await;
    // The fallback is any service taking the same requests: here a client
    // that sends them to a secondary region.
    let mut service = rig
        .service_with_fallback(hyper_client(), |b| b.when_down(WhenDown::Fallback))
        .await;
    let request = Request::post(format!("{}/o", secondary.url()))
        .header("idempotency-key", "k-1")
        .body(Full::new(Bytes::from_static(b"to secondary")))
        .unwrap();
    let out = call(&mut service, request).await.unwrap();
    assert_eq!(out.status, StatusCode::OK);
    let seen = secondary.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["idempotency-key"], "k-1");
    assert_eq!(&seen[0].body[..], b"to secondary");
    assert!(rig.stored().is_empty());

    // Per request class: reports fail fast, the rest is buffered.
    let mut per_class = rig
        .service(|b| {
            b.when_down(|req: &http::request::Parts| {
                if req.uri.path().starts_with("/reports") {
                    WhenDown::FailFast
                } else {
                    WhenDown::Buffer
                }
            })
        })
        .await;
    let out = call(&mut per_class, rig.request("POST", "/reports/1", b"r"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::SERVICE_UNAVAILABLE);
    let out = call(&mut per_class, rig.request("POST", "/orders/1", b"o"))
        .await
        .unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_can_opt_in_or_out_and_the_control_header_is_not_forwarded() {
    let rig = Rig::start().await;
    let mut service = rig.service(|b| b).await;
    rig.down().await;
    let mut get = rig.request("GET", "/report", b"");
    get.headers_mut()
        .insert("x-heartbeat-buffer", "allow".parse().unwrap());
    assert_eq!(
        call(&mut service, get).await.unwrap().status,
        StatusCode::ACCEPTED
    );
    let mut post = rig.request("POST", "/o", b"x");
    post.extensions_mut()
        .insert(tower_heartbeat_buffer::policy::BufferOverride::Never);
    assert_eq!(
        call(&mut service, post).await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(!rig.stored()[0].headers.contains_key("x-heartbeat-buffer"));

    // Up (relaxed, so the backlog does not hold it): the header never
    // reaches the target.
    let mut relaxed = rig.service(|b| b.order(DeliveryOrder::Relaxed)).await;
    rig.up().await;
    let mut post = rig.request("POST", "/o", b"y");
    post.headers_mut()
        .insert("x-heartbeat-buffer", "never".parse().unwrap());
    assert_eq!(
        call(&mut relaxed, post).await.unwrap().status,
        StatusCode::OK
    );
    assert!(!rig.http.received()[0]
        .headers
        .contains_key("x-heartbeat-buffer"));
}

/// Reads the per-command call counts from `INFO commandstats`.
fn command_counts(conn: &mut redis::Connection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?;
            Some((name.to_owned(), calls.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_redis_command_on_the_hot_path_while_up() {
    let redis = support::RedisServer::start();
    let http = HttpTarget::start().await;
    let target = tower_heartbeat_buffer::Target::new("hot").unwrap();
    let mut conn = redis.conn();
    let _: () = redis::Commands::set(&mut conn, target.heartbeat_key(), 1).unwrap();
    let watcher = tower_heartbeat_buffer::Watcher::builder()
        .reconcile_interval(Duration::from_secs(3600))
        .connect(redis.client())
        .await
        .unwrap();
    let layer = tower_heartbeat_buffer::HeartbeatBufferLayer::builder(target.clone())
        .build(&watcher)
        .await
        .unwrap();
    assert_eq!(layer.view().health(), Health::Up);
    let mut service = tower_layer::Layer::layer(&layer, hyper_client());
    tokio::time::sleep(Duration::from_millis(100)).await;

    let before = command_counts(&mut conn);
    for i in 0..100 {
        let method = if i % 2 == 0 { "POST" } else { "GET" };
        let request = Request::builder()
            .method(method)
            .uri(format!("{}/o/{i}", http.url()))
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        assert_eq!(
            call(&mut service, request).await.unwrap().status,
            StatusCode::OK
        );
    }
    let mut after = command_counts(&mut conn);
    *after.get_mut("info").unwrap() -= 1;
    assert_eq!(before, after, "a forwarded call reached Redis");
}

/// Far from full, entries are written with a plain XADD; near the limit, with
/// the checked script. Concurrent writers must still stop at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_holds_when_concurrent_fast_writes_give_way_to_checked_ones() {
    let rig = Rig::start().await;
    rig.down().await;
    let service = rig.service(|b| b.max_queue_len(100)).await;
    let url = rig.http.url();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let mut service = service.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..20 {
                let request = Request::post(format!("{url}/o"))
                    .body(Full::new(Bytes::from(format!("{worker}-{i}"))))
                    .unwrap();
                statuses.push(call(&mut service, request).await.unwrap().status);
            }
            statuses
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        for status in task.await.unwrap() {
            match status {
                StatusCode::ACCEPTED => accepted += 1,
                StatusCode::SERVICE_UNAVAILABLE => {}
                other => panic!("unexpected {other}"),
            }
        }
    }
    assert_eq!(accepted, 100, "exactly the limit accepted");
    assert_eq!(rig.stored().len(), 100, "exactly the limit stored");
}
