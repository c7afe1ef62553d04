//! The crate behind Sentinel (1 primary, 1 replica, 3 sentinels, started by
//! the test): a failover in the middle of buffering, and what `WAIT` changes
//! about what a failover can take.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::layer_rig::{call, stored, Buffered};
use support::{hyper_client, wait_until, HttpTarget, SentinelSetup};
use tower_heartbeat_buffer::{Backend, Health, HeartbeatBufferLayer, Target, Watcher};
use tower_layer::Layer;

const MASTER: &str = "thb-primary";

async fn service(watcher: &Watcher, target: &Target, wait: Option<Duration>) -> Buffered {
    let mut builder =
        HeartbeatBufferLayer::builder(target.clone()).redis_timeout(Duration::from_millis(500));
    if let Some(wait) = wait {
        builder = builder.wait_for_replicas(1, wait);
    }
    builder.build(watcher).await.unwrap().layer(hyper_client())
}

async fn post(service: &mut Buffered, http: &HttpTarget, key: &str) -> StatusCode {
    let request = Request::post(format!("{}/o", http.url()))
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from(key.to_owned())))
        .unwrap();
    call(service, request).await.unwrap().status
}

/// The idempotency keys stored in the target's buffer on the server at `port`.
fn stored_keys(setup: &SentinelSetup, port: u16, target: &Target) -> HashSet<String> {
    stored(setup.server_by_port(port), target)
        .into_iter()
        .map(|e| e.id)
        .collect()
}

/// What a caller sending POSTs in a loop saw.
#[derive(Default)]
struct Tally {
    accepted: Vec<(String, Instant)>,
    refused: usize,
}

/// A caller buffering in a loop; the primary SIGKILLed after 200 `202`s;
/// the old primary restarted (it comes back as a replica); returns the
/// keys answered `202` that the new primary does not hold, after 100 more
/// `202`s from it.
async fn failover_mid_buffering(wait: Option<Duration>) -> Vec<String> {
    let mut setup = SentinelSetup::start(MASTER);
    let backend = Backend::sentinel(MASTER, setup.sentinel_urls()).unwrap();
    let watcher = Watcher::connect(backend).await.unwrap();
    let http = HttpTarget::start().await;
    // No heartbeat: the target is down, every POST is buffered.
    let target = Target::new("orders").unwrap();
    let mut service = service(&watcher, &target, wait).await;

    // The caller: POSTs in a loop until told to stop.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let caller = tokio::spawn({
        let tally = Arc::clone(&tally);
        async move {
            let mut i = 0usize;
            while !*stopped.borrow_and_update() {
                let key = format!("k-{i:05}");
                i += 1;
                match post(&mut service, &http, &key).await {
                    StatusCode::ACCEPTED => {
                        tally.lock().unwrap().accepted.push((key, Instant::now()))
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        tally.lock().unwrap().refused += 1;
                        // The caller's own pacing while Redis fails over.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
        }
    });
    let accepted = |tally: &Mutex<Tally>| tally.lock().unwrap().accepted.len();
    assert!(wait_until(Duration::from_secs(30), || accepted(&tally) >= 200).await);

    let killed_at = Instant::now();
    let old_port = setup.kill_primary();
    let new_port =
        tokio::task::block_in_place(|| setup.wait_for_failover(old_port, Duration::from_secs(30)));
    assert_ne!(new_port, old_port);
    let failover_took = killed_at.elapsed();
    // With `WAIT 1` the new primary accepts again once it has a replica:
    // the old primary, restarted, which the sentinels turn into one.
    setup.restart_server(old_port);
    let at_kill = tally
        .lock()
        .unwrap()
        .accepted
        .iter()
        .filter(|(_, at)| *at < killed_at)
        .count();
    let resumed = wait_until(Duration::from_secs(60), || {
        accepted(&tally) >= at_kill + 100
    })
    .await;
    let resumed_after = killed_at.elapsed();
    stop.send_replace(true);
    caller.await.unwrap();
    assert!(
        resumed,
        "calls did not resume after the failover\n{}",
        setup.diagnostics()
    );

    let tally = tally.lock().unwrap();
    let present = stored_keys(&setup, new_port, &target);
    let lost: Vec<String> = tally
        .accepted
        .iter()
        .map(|(k, _)| k.clone())
        .filter(|k| !present.contains(k))
        .collect();
    println!(
        "sentinel failover mid-buffering, wait_for_replicas={wait:?}: accepted={} refused={} lost={} failover={failover_took:?} 100_more_accepted_after={resumed_after:?}",
        tally.accepted.len(),
        tally.refused,
        lost.len(),
    );
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_resume_on_the_new_primary_and_every_202_survives_with_wait() {
    let lost = failover_mid_buffering(Some(Duration::from_millis(500))).await;
    assert!(
        lost.is_empty(),
        "answered 202 but gone after the failover: {lost:?}"
    );
}

/// Without `WAIT`, a failover can lose what was answered `202` within the
/// replication lag; on loopback that window is tiny. The figure is printed
/// (`--nocapture`), not asserted: it depends on timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_resume_on_the_new_primary_without_wait() {
    let lost = failover_mid_buffering(None).await;
    println!("lost without WAIT: {}", lost.len());
}

/// A replica cut off from its primary (a partition, or one that fell
/// behind): without `WAIT`, what the primary accepts meanwhile dies with it;
/// with `WAIT`, those calls are refused instead of acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_a_failover_loses_what_the_replica_never_got() {
    let mut setup = SentinelSetup::start(MASTER);
    let backend = Backend::sentinel(MASTER, setup.sentinel_urls()).unwrap();
    let watcher = Watcher::connect(backend).await.unwrap();
    let http = HttpTarget::start().await;
    let target = Target::new("orders").unwrap();
    let mut plain = service(&watcher, &target, None).await;
    let mut waiting = service(&watcher, &target, Some(Duration::from_millis(200))).await;

    // Replicated before the trouble starts: survives either way.
    for i in 0..20 {
        assert_eq!(
            post(&mut plain, &http, &format!("before-{i}")).await,
            StatusCode::ACCEPTED
        );
    }
    setup.wait_replica_synced(Duration::from_secs(10));

    // Cut the replica off: stopped, and its link closed by the primary, so
    // nothing written from now on reaches it.
    let old_port = setup.current_primary_port();
    setup.pause_replica();
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query(&mut setup.server_by_port(old_port).conn())
        .unwrap();
    let mut unreplicated_202 = Vec::new();
    for i in 0..20 {
        let key = format!("cut-off-{i}");
        assert_eq!(post(&mut plain, &http, &key).await, StatusCode::ACCEPTED);
        unreplicated_202.push(key);
    }
    // With WAIT the same situation is a 503, not an acknowledgement.
    for i in 0..2 {
        let status = post(&mut waiting, &http, &format!("waited-{i}")).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "WAIT 1 without a replica"
        );
    }
    setup.kill_primary();
    setup.resume_replica();
    let new_port =
        tokio::task::block_in_place(|| setup.wait_for_failover(old_port, Duration::from_secs(30)));
    let present = stored_keys(&setup, new_port, &target);
    let before_kept = (0..20)
        .filter(|i| present.contains(&format!("before-{i}")))
        .count();
    let lost = unreplicated_202
        .iter()
        .filter(|k| !present.contains(*k))
        .count();
    println!(
        "sentinel failover, replica cut off: without WAIT {lost} of {} acknowledged lost; with WAIT 0 acknowledged (2 refused with 503)",
        unreplicated_202.len()
    );
    assert_eq!(before_kept, 20, "entries replicated before the cut survive");
    assert_eq!(
        lost,
        unreplicated_202.len(),
        "the loss window WAIT closes is real"
    );

    // And the layer carries on against the new primary by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    while post(&mut plain, &http, "after-plain").await != StatusCode::ACCEPTED {
        assert!(Instant::now() < deadline, "no 202 from the new primary");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_follows_the_new_primary() {
    let mut setup = SentinelSetup::start(MASTER);
    let watcher = Watcher::builder()
        // Only notifications (or the re-read after a switch) can be quick.
        .reconcile_interval(Duration::from_secs(30))
        .connect(Backend::sentinel(MASTER, setup.sentinel_urls()).unwrap())
        .await
        .unwrap();
    let target = Target::new("orders").unwrap();
    let view = watcher.watch(&target).await;
    let primary = setup.current_primary_port();
    let _: () = redis::cmd("SET")
        .arg(target.heartbeat_key())
        .arg(1)
        .query(&mut setup.server_by_port(primary).conn())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), view.wait_for(Health::Up))
        .await
        .expect("heartbeat seen on the first primary");
    setup.wait_replica_synced(Duration::from_secs(10));

    let old = setup.kill_primary();
    let new = tokio::task::block_in_place(|| setup.wait_for_failover(old, Duration::from_secs(30)));
    // The heartbeat was replicated: still up. Its deletion on the new
    // primary is notified there.
    assert!(
        wait_until(Duration::from_secs(10), || view.redis_reachable()).await,
        "the watcher reaches the new primary"
    );
    assert_eq!(view.health(), Health::Up);
    let _: () = redis::cmd("DEL")
        .arg(target.heartbeat_key())
        .query(&mut setup.server_by_port(new).conn())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), view.wait_for(Health::Down))
        .await
        .expect("DEL on the new primary not seen");
}

/// The sentinels are asked in turn: one that hangs (stopped, not dead: it
/// accepts connections and never answers) must not stall the lookup of the
/// new primary behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sentinel_does_not_hide_the_new_primary() {
    let mut setup = SentinelSetup::start(MASTER);
    let watcher = Watcher::connect(Backend::sentinel(MASTER, setup.sentinel_urls()).unwrap())
        .await
        .unwrap();
    let http = HttpTarget::start().await;
    let target = Target::new("orders").unwrap();
    let mut plain = service(&watcher, &target, None).await;
    assert_eq!(post(&mut plain, &http, "first").await, StatusCode::ACCEPTED);

    // The first sentinel of the list hangs; the other two still make a
    // quorum and fail over.
    let hung = setup.sentinels()[0].pid().unwrap();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &hung.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    setup.kill_primary();
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut after = 0;
    while after < 10 {
        assert!(
            Instant::now() < deadline,
            "no 202 from the new primary with the first sentinel hung"
        );
        let request = Request::post(format!("{}/o", http.url()))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let out = call(&mut plain, request).await.unwrap();
        match out.status {
            StatusCode::ACCEPTED => after += 1,
            _ => {
                eprintln!("{:?} {}", out.status, String::from_utf8_lossy(&out.body));
                tokio::time::sleep(Duration::from_millis(500)).await
            }
        }
    }
    signal("-CONT");
}
