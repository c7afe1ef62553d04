//! The replayer against a real Redis and a real HTTP target: everything that
//! got a 202 reaches the target once it is back — in order, once, intact.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use redis::Commands;
use support::layer_rig::{call, fast_replay, Buffered, Rig};
use support::{hyper_client, wait_until, RedisServer, Reply};
use tower_heartbeat_buffer::replay::{ReplayConfig, ReplayEventKind, ReplayHandle};
use tower_heartbeat_buffer::{DeliveryOrder, Health, HeartbeatBufferLayer, Target, Watcher};

const EVENTUALLY: Duration = Duration::from_secs(30);

/// Stores `n` POSTs (bodies `prefix-i`, keys `prefix-i`) while the target is down.
async fn buffer(rig: &Rig, service: &mut Buffered, prefix: &str, n: usize) {
    for i in 0..n {
        let request = Request::post(format!("{}/o/{i}", rig.http.url()))
            .header("idempotency-key", format!("{prefix}-{i:05}"))
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(format!("{prefix}-{i:05}"))))
            .unwrap();
        let out = call(service, request).await.unwrap();
        assert_eq!(out.status, StatusCode::ACCEPTED, "{out:?}");
    }
}

fn replayer(rig: &Rig, layer_service: &Buffered, config: ReplayConfig) -> ReplayHandle {
    let _ = layer_service;
    let layer =
        futures_block(HeartbeatBufferLayer::builder(rig.target.clone()).build(&rig.watcher))
            .unwrap();
    layer.replayer().config(config).spawn(hyper_client::<
        tower_heartbeat_buffer::RequestBody<Full<Bytes>>,
    >())
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// The bodies the target received, in arrival order.
fn received_bodies(rig: &Rig) -> Vec<String> {
    rig.http
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

fn expected(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_a_thousand_in_order_once_with_bodies_and_keys_intact() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "r", 1000).await;
    let replay = replayer(&rig, &service, fast_replay());
    // Nothing moves while the target is down.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rig.http.received_count(), 0);

    let back = Instant::now();
    rig.up().await;
    assert!(
        rig.http.wait_for_requests(1000, EVENTUALLY).await,
        "got {}",
        rig.http.received_count()
    );
    let drained = back.elapsed();
    assert_eq!(
        received_bodies(&rig),
        expected("r", 1000),
        "order and bodies"
    );
    for (i, r) in rig.http.received().iter().enumerate() {
        assert_eq!(r.headers["idempotency-key"], format!("r-{i:05}"));
        assert_eq!(r.headers["x-heartbeat-replay"], "1");
        assert_eq!(r.headers["x-heartbeat-attempt"], "1");
        assert_eq!(r.headers["content-type"], "text/plain");
        assert_eq!(r.uri.to_string(), format!("/o/{i}"));
    }
    // The buffer empties, and nothing is delivered twice.
    let view = rig.watcher.watch(&rig.target).await;
    assert!(wait_until(EVENTUALLY, || view.backlog() == Some(0)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.http.received_count(), 1000);
    assert_eq!(replay.delivered(), 1000);
    // Processed-markers are set.
    let marker: Option<String> = rig
        .redis
        .conn()
        .get(rig.target.done_key("r-00999"))
        .unwrap();
    assert_eq!(marker.as_deref(), Some("1"));
    eprintln!("1000 drained in {drained:?}");
    replay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_pauses_when_the_target_goes_down_again_and_resumes_in_order() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "p", 300).await;
    let mut config = fast_replay();
    config.max_per_second = Some(400.0);
    let replay = replayer(&rig, &service, config);
    rig.up().await;
    assert!(rig.http.wait_for_requests(50, EVENTUALLY).await);

    // Down again: the watcher sees it, and the drain stops within 50 ms.
    let _: () = rig.redis.conn().del(rig.target.heartbeat_key()).unwrap();
    rig.wait_for(Health::Down).await;
    let seen_down = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let at_pause = rig.http.received();
    let late: Vec<_> = at_pause
        .iter()
        .filter(|r| r.at > seen_down + Duration::from_millis(50))
        .collect();
    assert!(
        late.is_empty(),
        "{} deliveries more than 50 ms after down",
        late.len()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rig.http.received_count(), at_pause.len(), "paused");
    assert!(at_pause.len() < 300, "should not have finished already");

    rig.up().await;
    assert!(rig.http.wait_for_requests(300, EVENTUALLY).await);
    assert_eq!(
        received_bodies(&rig),
        expected("p", 300),
        "order kept across the pause"
    );
    replay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_a_400_is_dead_lettered_while_the_drain_goes_on() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "x", 3).await;
    rig.http.set_reply(Reply::StatusWithHeaders(
        StatusCode::TOO_MANY_REQUESTS,
        vec![("retry-after".into(), "1".into())],
    ));
    // Two deliveries a second: time for the test to change the target's
    // answers between them.
    let mut config = fast_replay();
    config.max_per_second = Some(2.0);
    let replay = replayer(&rig, &service, config);
    let mut events = replay.events();
    rig.up().await;
    assert!(rig.http.wait_for_requests(1, EVENTUALLY).await);
    let first = rig.http.received()[0].at;
    // The 429 asked for a second: nothing may come before it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(rig.http.received_count(), 1, "retried before Retry-After");
    rig.http.set_reply(Reply::Status(StatusCode::BAD_REQUEST));
    assert!(rig.http.wait_for_requests(2, EVENTUALLY).await);
    let second = rig.http.received()[1].clone();
    assert!(
        second.at - first >= Duration::from_millis(990),
        "retried after {:?}",
        second.at - first
    );
    assert_eq!(second.headers["x-heartbeat-attempt"], "2");
    // The 400 dead-letters x-00000; the others go on.
    rig.http.set_reply(Reply::Ok);
    assert!(rig.http.wait_for_requests(4, EVENTUALLY).await);
    let dead = futures_block(async {
        let layer = HeartbeatBufferLayer::builder(rig.target.clone())
            .build(&rig.watcher)
            .await
            .unwrap();
        layer.dead_letters().list(10).await.unwrap()
    });
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.contains("400"), "{}", dead[0].reason);
    assert_eq!(dead[0].request.as_ref().unwrap().id, "x-00000");
    assert_eq!(&dead[0].request.as_ref().unwrap().body[..], b"x-00000");
    let bodies = received_bodies(&rig);
    assert_eq!(&bodies[2..], ["x-00001", "x-00002"]);
    // Events told the story. (Delivered is told once acknowledged, which
    // may follow the delivery by a moment.)
    let mut kinds = Vec::new();
    let delivered_last = |kinds: &Vec<(String, ReplayEventKind)>| {
        kinds
            .iter()
            .any(|(id, k)| id == "x-00002" && matches!(k, ReplayEventKind::Delivered { .. }))
    };
    while !delivered_last(&kinds) {
        let event = tokio::time::timeout(EVENTUALLY, events.recv())
            .await
            .expect("events")
            .unwrap();
        kinds.push((event.id, event.kind));
    }
    assert!(kinds
        .iter()
        .any(|(id, k)| id == "x-00000" && matches!(k, ReplayEventKind::Retrying { .. })));
    assert!(kinds
        .iter()
        .any(|(id, k)| id == "x-00000" && matches!(k, ReplayEventKind::DeadLettered { .. })));
    assert!(kinds.iter().any(|(id, k)| id == "x-00002"
        && matches!(k, ReplayEventKind::Delivered { status, .. } if *status == StatusCode::OK)));
    replay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_is_dead_lettered_and_the_drain_goes_on() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "a", 2).await;
    // Bytes written into the queue by hand, between valid entries.
    let _: String = rig
        .redis
        .conn()
        .xadd(
            rig.target.queue_key(),
            "*",
            &[(&b"\xff\xfe"[..], &b"garbage"[..])],
        )
        .unwrap();
    let _: String = rig
        .redis
        .conn()
        .xadd(
            rig.target.queue_key(),
            "*",
            &[("v", "99"), ("id", "from-the-future")],
        )
        .unwrap();
    buffer(&rig, &mut service, "b", 2).await;
    let replay = replayer(&rig, &service, fast_replay());
    rig.up().await;
    assert!(rig.http.wait_for_requests(4, EVENTUALLY).await);
    assert_eq!(
        received_bodies(&rig),
        ["a-00000", "a-00001", "b-00000", "b-00001"]
    );
    let layer = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&rig.watcher)
        .await
        .unwrap();
    let dead = layer.dead_letters();
    assert!(wait_until(EVENTUALLY, || futures_block(dead.len()).unwrap() == 2).await);
    let letters = dead.list(10).await.unwrap();
    assert!(
        letters[0].reason.contains("malformed"),
        "{}",
        letters[0].reason
    );
    assert!(
        letters[1].reason.contains("unsupported encoding version"),
        "{}",
        letters[1].reason
    );

    // Requeue and purge work on dead letters.
    assert!(dead.purge(&letters[0].entry_id).await.unwrap());
    assert!(!dead.purge(&letters[0].entry_id).await.unwrap());
    assert_eq!(dead.purge_all().await.unwrap(), 1);
    assert!(dead.is_empty().await.unwrap());
    replay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requeued_dead_letter_is_delivered() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "q", 1).await;
    rig.http
        .set_reply(Reply::Status(StatusCode::UNPROCESSABLE_ENTITY));
    let replay = replayer(&rig, &service, fast_replay());
    rig.up().await;
    let layer = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&rig.watcher)
        .await
        .unwrap();
    let dead = layer.dead_letters();
    assert!(wait_until(EVENTUALLY, || futures_block(dead.len()).unwrap() == 1).await);
    rig.http.set_reply(Reply::Ok);
    let letter = dead.list(1).await.unwrap().remove(0);
    assert!(dead.requeue(&letter.entry_id).await.unwrap());
    assert!(rig.http.wait_for_requests(2, EVENTUALLY).await);
    let last = rig.http.received().pop().unwrap();
    assert_eq!(last.headers["idempotency-key"], "q-00000");
    assert!(dead.is_empty().await.unwrap());
    replay.shutdown().await;
}

async fn two_replicas(order: DeliveryOrder) {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    const N: usize = 500;
    buffer(&rig, &mut service, "m", N).await;
    // A second replica: its own watcher (connections) and replayer.
    let watcher_b = Watcher::connect(rig.redis.client()).await.unwrap();
    let layer_b = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&watcher_b)
        .await
        .unwrap();
    let mut config = fast_replay();
    config.order = order;
    config.batch = 16;
    rig.http.set_reply(Reply::Delay(Duration::from_millis(1)));
    let a = replayer(&rig, &service, config.clone());
    let b = layer_b.replayer().config(config).spawn(hyper_client::<
        tower_heartbeat_buffer::RequestBody<Full<Bytes>>,
    >());
    rig.up().await;
    assert!(rig.http.wait_for_requests(N, EVENTUALLY).await);
    let view = rig.watcher.watch(&rig.target).await;
    assert!(wait_until(EVENTUALLY, || view.backlog() == Some(0)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bodies = received_bodies(&rig);
    let unique: HashSet<&String> = bodies.iter().collect();
    assert_eq!(unique.len(), N, "lost entries");
    assert_eq!(bodies.len(), N, "duplicates");
    if order == DeliveryOrder::Strict {
        assert_eq!(bodies, expected("m", N), "strict order across replicas");
    }
    eprintln!(
        "{order:?}: replica a delivered {}, b {}",
        a.delivered(),
        b.delivered()
    );
    if order == DeliveryOrder::Relaxed {
        assert!(
            a.delivered() > 0 && b.delivered() > 0,
            "both replicas drained"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_in_strict_order_keep_order_and_deliver_nothing_twice() {
    two_replicas(DeliveryOrder::Strict).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_in_relaxed_order_lose_nothing_and_duplicate_nothing() {
    two_replicas(DeliveryOrder::Relaxed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_drain_loses_nothing() {
    // The rig's Redis runs with AOF on (`appendfsync always`).
    let mut rig = Rig::start().await;
    rig.down().await;
    // Every write waits for an fsync: on a loaded CI machine one can take
    // longer than the default 500 ms, which would answer 503, not lose.
    let mut service = rig
        .service(|b| b.redis_timeout(Duration::from_secs(3)))
        .await;
    const N: usize = 400;
    buffer(&rig, &mut service, "s", N).await;
    let mut config = fast_replay();
    config.max_per_second = Some(500.0);
    let replay = replayer(&rig, &service, config);
    rig.up().await;
    assert!(rig.http.wait_for_requests(100, EVENTUALLY).await);
    rig.redis.kill();
    rig.redis.restart();
    assert!(
        rig.http.wait_for_requests(N, EVENTUALLY).await,
        "got {}",
        rig.http.received_count()
    );
    let view = rig.watcher.watch(&rig.target).await;
    assert!(wait_until(EVENTUALLY, || view.backlog() == Some(0)).await);
    let bodies = received_bodies(&rig);
    let unique: HashSet<&String> = bodies.iter().collect();
    assert_eq!(unique.len(), N, "nothing lost");
    // Duplicates only of what was in flight when Redis died: one batch.
    assert!(bodies.len() - N <= 32, "{} duplicates", bodies.len() - N);
    replay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_replayer_drains_a_target_it_does_not_call() {
    let redis = RedisServer::start();
    let http = support::HttpTarget::start().await;
    let target = Target::new("solo").unwrap();
    let watcher = Watcher::connect(redis.client()).await.unwrap();
    // Entries written by a caller elsewhere.
    {
        let layer = HeartbeatBufferLayer::builder(target.clone())
            .build(&watcher)
            .await
            .unwrap();
        let mut service = tower_layer::Layer::layer(&layer, hyper_client());
        for i in 0..5 {
            let request = Request::post(format!("{}/solo/{i}", http.url()))
                .body(Full::new(Bytes::from(format!("solo-{i}"))))
                .unwrap();
            assert_eq!(
                call(&mut service, request).await.unwrap().status,
                StatusCode::ACCEPTED
            );
        }
    }
    let replay = tower_heartbeat_buffer::replay::Replayer::builder(&watcher, &target)
        .await
        .unwrap()
        .config(fast_replay())
        .spawn(hyper_client::<
            tower_heartbeat_buffer::RequestBody<Full<Bytes>>,
        >());
    let _: () = redis.conn().set(target.heartbeat_key(), 1).unwrap();
    assert!(http.wait_for_requests(5, EVENTUALLY).await);
    replay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_grace_period_then_leaves_the_entry_pending() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "g", 1).await;
    rig.http.set_reply(Reply::Hang);
    let mut config = fast_replay();
    config.grace = Duration::from_millis(300);
    let replay = replayer(&rig, &service, config);
    rig.up().await;
    assert!(rig.http.wait_for_requests(1, EVENTUALLY).await);
    let start = Instant::now();
    replay.shutdown().await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    // Not acknowledged: still in the buffer, for the next replayer.
    let len: u64 = rig.redis.conn().xlen(rig.target.queue_key()).unwrap();
    assert_eq!(len, 1);
    rig.http.set_reply(Reply::Ok);
    let again = replayer(&rig, &service, fast_replay());
    assert!(rig.http.wait_for_requests(2, EVENTUALLY).await);
    let keys: Vec<String> = rig
        .http
        .received()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        ["g-00000", "g-00000"],
        "redelivered with the same key"
    );
    let attempts: Vec<String> = rig
        .http
        .received()
        .iter()
        .map(|r| {
            r.headers["x-heartbeat-attempt"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        attempts,
        ["1", "2"],
        "the attempt count survives the takeover"
    );
    again.shutdown().await;
    // The second replayer left the consumer group on its clean shutdown,
    // holding nothing; the first (stopped mid-delivery) had its entry taken
    // over and holds nothing either, and is removed once quiet long enough.
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(rig.target.queue_key())
        .arg("thb")
        .query(&mut rig.redis.conn())
        .unwrap();
    assert_eq!(
        consumers.len(),
        1,
        "only the aborted replayer's name is left"
    );
}

/// Relaxed order: a request the target keeps refusing for a while is
/// retried by its replica without its neighbours, already answered, being
/// taken for abandoned and sent again by the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_replicas_do_not_resend_answered_entries_while_one_is_retried() {
    use std::sync::{Arc, Mutex};
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    // A target that refuses /o/0 with 503 for its first 1.5 s, answers the
    // rest at once, and records every key it answers 200 to.
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let app = {
        let answered = Arc::clone(&answered);
        axum::Router::new().fallback(move |request: axum::extract::Request| {
            let answered = Arc::clone(&answered);
            async move {
                let key = request.headers()["idempotency-key"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                if request.uri().path() == "/o/0" && started.elapsed() < Duration::from_millis(1500)
                {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                answered.lock().unwrap().push(key);
                StatusCode::OK
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    for i in 0..16 {
        let request = Request::post(format!("{url}/o/{i}"))
            .header("idempotency-key", format!("k-{i:02}"))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert_eq!(
            call(&mut service, request).await.unwrap().status,
            StatusCode::ACCEPTED
        );
    }
    let mut config = fast_replay();
    config.order = DeliveryOrder::Relaxed;
    config.visibility_timeout = Duration::from_millis(600);
    config.max_per_second = None;
    config.backoff_max = Duration::from_millis(100);
    config.max_attempts = 1000;
    // 503 pauses the whole drain: keep those pauses short.
    let policy = |attempt: tower_heartbeat_buffer::replay::Attempt<'_>| {
        match tower_heartbeat_buffer::replay::ReplayPolicy::judge(
            &tower_heartbeat_buffer::replay::DefaultReplayPolicy,
            attempt,
        ) {
            tower_heartbeat_buffer::replay::Verdict::Retry { after, reason, .. } => {
                tower_heartbeat_buffer::replay::Verdict::Retry {
                    after,
                    pause: false,
                    reason,
                }
            }
            other => other,
        }
    };
    let watcher_b = Watcher::connect(rig.redis.client()).await.unwrap();
    let layer_a = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&rig.watcher)
        .await
        .unwrap();
    let layer_b = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&watcher_b)
        .await
        .unwrap();
    let client = hyper_client::<tower_heartbeat_buffer::RequestBody<Full<Bytes>>>;
    let a = layer_a
        .replayer()
        .config(config.clone())
        .policy(policy)
        .spawn(client());
    let b = layer_b
        .replayer()
        .config(config)
        .policy(policy)
        .spawn(client());
    rig.up().await;
    assert!(
        wait_until(EVENTUALLY, || answered.lock().unwrap().len() >= 16).await,
        "answered: {:?}",
        answered.lock().unwrap()
    );
    // Leave time for a wrongful takeover to show.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let keys = answered.lock().unwrap().clone();
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), 16, "lost entries: {keys:?}");
    assert_eq!(keys.len(), 16, "answered entries sent again: {keys:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// Lua cannot unpack thousands of values: requeueing such a dead letter
/// takes the native path, and keeps every field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_with_thousands_of_fields_can_be_requeued() {
    let redis = RedisServer::start();
    let target = Target::new("wide").unwrap();
    let mut conn = redis.conn();
    let mut fields: Vec<(String, String)> = (0..5000)
        .map(|i| (format!("f{i}"), format!("v{i}")))
        .collect();
    fields.push(("reason".into(), "test".into()));
    let id: String = conn.xadd(target.dead_letter_key(), "*", &fields).unwrap();
    let dead = tower_heartbeat_buffer::replay::DeadLetters::new(redis.client(), &target).unwrap();
    assert!(dead.requeue(&id).await.unwrap());
    assert!(dead.is_empty().await.unwrap());
    let back: redis::streams::StreamRangeReply = conn.xrange_all(target.queue_key()).unwrap();
    assert_eq!(back.ids.len(), 1);
    assert_eq!(
        back.ids[0].map.len(),
        5000,
        "every field but the dead-letter ones"
    );
    assert!(!back.ids[0].map.contains_key("reason"));
}
