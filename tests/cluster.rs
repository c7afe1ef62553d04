//! The crate on a real Redis Cluster (3 primaries, 3 replicas, started by the
//! test): targets whose keys live on different nodes buffer and replay, and a
//! primary SIGKILLed in the middle of a drain loses nothing that was
//! answered `202`.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::layer_rig::{call, fast_replay, Buffered};
use support::{hyper_client, wait_until, HttpTarget, RedisCluster, Reply};
use tower_heartbeat_buffer::replay::{ReplayConfig, ReplayHandle};
use tower_heartbeat_buffer::{
    Backend, Health, Heartbeat, HeartbeatBufferLayer, NotificationMode, RequestBody, Target,
    Watcher,
};
use tower_layer::Layer;

const EVENTUALLY: Duration = Duration::from_secs(60);

fn fast() -> ReplayConfig {
    let mut config = fast_replay();
    config.visibility_timeout = Duration::from_secs(3);
    config
}

async fn cluster_conn(cluster: &RedisCluster) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(cluster.seed_urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

struct Lane {
    target: Target,
    http: HttpTarget,
    service: Buffered,
    layer: HeartbeatBufferLayer,
}

/// A target with its HTTP server and layer; `replicas`: `WAIT` for that
/// many after each write.
async fn lane(watcher: &Watcher, name: &str, replicas: Option<u32>) -> Lane {
    let target = Target::new(name).unwrap();
    let http = HttpTarget::start().await;
    let mut builder =
        HeartbeatBufferLayer::builder(target.clone()).redis_timeout(Duration::from_secs(2));
    if let Some(replicas) = replicas {
        builder = builder.wait_for_replicas(replicas, Duration::from_secs(2));
    }
    let layer = builder.build(watcher).await.unwrap();
    let service = layer.clone().layer(hyper_client());
    Lane {
        target,
        http,
        service,
        layer,
    }
}

fn key(name: &str, i: usize) -> String {
    format!("{name}-{i:05}")
}

async fn buffer(lane: &mut Lane, n: usize) {
    for i in 0..n {
        let request = Request::post(format!("{}/o/{i}", lane.http.url()))
            .header("idempotency-key", key(lane.target.name(), i))
            .body(Full::new(Bytes::from(key(lane.target.name(), i))))
            .unwrap();
        let out = call(&mut lane.service, request).await.unwrap();
        assert_eq!(out.status, StatusCode::ACCEPTED, "{out:?}");
    }
}

fn spawn_replayer(lane: &Lane) -> ReplayHandle {
    lane.layer
        .replayer()
        .config(fast())
        .spawn(hyper_client::<RequestBody<Full<Bytes>>>())
}

/// The idempotency keys the target received, first arrivals only, in order.
fn first_arrivals(http: &HttpTarget) -> Vec<String> {
    let mut seen = HashSet::new();
    http.received()
        .iter()
        .filter_map(|r| r.headers.get("idempotency-key"))
        .map(|v| v.to_str().unwrap().to_owned())
        .filter(|k| seen.insert(k.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_on_three_nodes_drain_through_a_primary_kill() {
    const N: usize = 300;
    let mut cluster = RedisCluster::start(3, 1);
    let names = cluster.keys_on_distinct_primaries(3);
    let backend = Backend::cluster(cluster.seed_urls()).unwrap();
    let watcher = Watcher::connect(backend.clone()).await.unwrap();
    let mut lanes = Vec::new();
    for name in &names {
        // Every 202 is on a replica too, so a failover cannot take it.
        lanes.push(lane(&watcher, name, Some(1)).await);
    }
    let mut admin = cluster_conn(&cluster).await;
    let primaries: Vec<usize> = lanes
        .iter()
        .map(|l| cluster.primary_for_key(&l.target.queue_key()))
        .collect();
    assert_eq!(
        primaries.iter().collect::<HashSet<_>>().len(),
        3,
        "the three targets' keys live on three different primaries"
    );

    // Down (no heartbeat yet): everything is buffered, each on its node.
    for lane in &mut lanes {
        assert_eq!(lane.layer.view().health(), Health::Down);
        buffer(lane, N).await;
        let len: u64 = redis::cmd("XLEN")
            .arg(lane.target.queue_key())
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(len, N as u64);
    }

    // Slow targets, so the kill lands mid-drain.
    for lane in &lanes {
        lane.http.set_reply(Reply::Delay(Duration::from_millis(5)));
    }
    let replayers: Vec<ReplayHandle> = lanes.iter().map(spawn_replayer).collect();
    for lane in &lanes {
        let _: () = redis::cmd("SET")
            .arg(lane.target.heartbeat_key())
            .arg(1)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let victim = &lanes[0];
    assert!(
        wait_until(EVENTUALLY, || victim.http.received_count() >= N / 3).await,
        "the drain started"
    );
    let dead = primaries[0];
    cluster.kill_node(dead);
    // wait_for_failover blocks while it polls the live nodes.
    let new_primary =
        tokio::task::block_in_place(|| cluster.wait_for_failover(dead, Duration::from_secs(30)));
    assert_ne!(new_primary, dead);

    // Nothing answered 202 is lost, on any node; order holds per target.
    for lane in &lanes {
        let expected: Vec<String> = (0..N).map(|i| key(lane.target.name(), i)).collect();
        let done = wait_until(EVENTUALLY, || first_arrivals(&lane.http).len() >= N).await;
        let got = first_arrivals(&lane.http);
        assert!(
            done,
            "{}: {} of {N} delivered after the failover\n{}",
            lane.target,
            got.len(),
            cluster.diagnostics()
        );
        assert_eq!(
            got, expected,
            "{}: first arrivals in buffer order",
            lane.target
        );
    }
    // And the buffers empty out (acknowledged entries removed).
    let mut admin = cluster_conn(&cluster).await;
    for lane in &lanes {
        let mut len = u64::MAX;
        for _ in 0..300 {
            len = redis::cmd("XLEN")
                .arg(lane.target.queue_key())
                .query_async(&mut admin)
                .await
                .unwrap_or(u64::MAX);
            if len == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(len, 0, "{}: buffer emptied", lane.target);
    }
    for r in replayers {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_on_every_node_are_notified() {
    let cluster = RedisCluster::start(3, 0);
    let names = cluster.keys_on_distinct_primaries(3);
    let watcher = Watcher::builder()
        // A long reconciliation: only notifications can be this quick.
        .reconcile_interval(Duration::from_secs(30))
        .connect(Backend::cluster(cluster.seed_urls()).unwrap())
        .await
        .unwrap();
    let mut admin = cluster_conn(&cluster).await;
    for name in &names {
        let target = Target::new(name).unwrap();
        let view = watcher.watch(&target).await;
        assert_eq!(view.health(), Health::Down);
        let _: () = redis::cmd("SET")
            .arg(target.heartbeat_key())
            .arg(1)
            .query_async(&mut admin)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), view.wait_for(Health::Up))
            .await
            .unwrap_or_else(|_| panic!("{target}: set on its node not seen"));
        let _: () = redis::cmd("DEL")
            .arg(target.heartbeat_key())
            .query_async(&mut admin)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), view.wait_for(Health::Down))
            .await
            .unwrap_or_else(|_| panic!("{target}: del on its node not seen"));
    }
}

/// Moves `slot` from primary `from` to primary `to` the way
/// `redis-cli --cluster reshard` does (IMPORTING/MIGRATING, `MIGRATE` in
/// small batches so clients see `ASK` in between, then the new owner
/// announced), while the caller keeps working.
async fn migrate_slot(cluster: &RedisCluster, slot: u16, from: usize, to: usize) {
    let (from_id, to_id) = (
        cluster.node_id(from).to_owned(),
        cluster.node_id(to).to_owned(),
    );
    let to_port = cluster.node(to).port();
    let mut src = cluster.node(from).conn();
    let mut dst = cluster.node(to).conn();
    let setslot = |state: &str, id: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
        cmd
    };
    let _: () = setslot("IMPORTING", &from_id).query(&mut dst).unwrap();
    let _: () = setslot("MIGRATING", &to_id).query(&mut src).unwrap();
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(2)
            .query(&mut src)
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to_port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut src)
            .unwrap();
        // Let the layer and the replayer run between batches.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..cluster.len() {
        if cluster.node_state(i) == support::NodeState::Running {
            let _: () = setslot("NODE", &to_id)
                .query(&mut cluster.node(i).conn())
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_mid_drain_loses_nothing_and_notifications_follow_it() {
    const N: usize = 300;
    let cluster = RedisCluster::start(3, 0);
    let name = cluster.keys_on_distinct_primaries(1).remove(0);
    let watcher = Watcher::builder()
        .reconcile_interval(Duration::from_secs(30))
        .connect(Backend::cluster(cluster.seed_urls()).unwrap())
        .await
        .unwrap();
    let mut lane = lane(&watcher, &name, None).await;
    buffer(&mut lane, N).await;
    lane.http.set_reply(Reply::Delay(Duration::from_millis(5)));
    let replayer = spawn_replayer(&lane);
    let mut admin = cluster_conn(&cluster).await;
    let _: () = redis::cmd("SET")
        .arg(lane.target.heartbeat_key())
        .arg(1)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(wait_until(EVENTUALLY, || lane.http.received_count() >= N / 4).await);

    let slot = cluster.slot_of(&lane.target.queue_key());
    let from = cluster.primary_for_key(&lane.target.queue_key());
    let to = (0..cluster.len()).find(|&i| i != from).unwrap();
    migrate_slot(&cluster, slot, from, to).await;
    assert_eq!(cluster.primary_for_key(&lane.target.queue_key()), to);

    let expected: Vec<String> = (0..N).map(|i| key(lane.target.name(), i)).collect();
    let done = wait_until(EVENTUALLY, || first_arrivals(&lane.http).len() >= N).await;
    assert!(
        done,
        "{} of {N} delivered",
        first_arrivals(&lane.http).len()
    );
    assert_eq!(
        first_arrivals(&lane.http),
        expected,
        "first arrivals in order"
    );

    // The heartbeat's notifications now come from the new owner: a DEL
    // there is seen long before the 30 s reconciliation.
    let view = lane.layer.view().clone();
    let _: () = redis::cmd("DEL")
        .arg(lane.target.heartbeat_key())
        .query_async(&mut admin)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), view.wait_for(Health::Down))
        .await
        .expect("heartbeat DEL on the slot's new node not seen");
    replayer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_flags_are_checked_and_set_on_every_node() {
    let cluster = RedisCluster::start(3, 0);
    // One node of three without the flags: its keys would never notify.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("")
        .query(&mut cluster.node(2).conn())
        .unwrap();
    let backend = Backend::cluster(cluster.seed_urls()).unwrap();
    let checked = |watcher: Watcher| async move {
        let mut mode = watcher.notification_mode();
        for _ in 0..500 {
            if mode != NotificationMode::Unchecked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            mode = watcher.notification_mode();
        }
        mode
    };
    let reading = Watcher::connect(backend.clone()).await.unwrap();
    assert_eq!(checked(reading).await, NotificationMode::ReconcileOnly);

    let configuring = Watcher::builder()
        .configure_notifications(true)
        .connect(backend)
        .await
        .unwrap();
    assert_eq!(checked(configuring).await, NotificationMode::Notifications);
    let flags: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query(&mut cluster.node(2).conn())
        .unwrap();
    assert!(flags[1].contains('K'), "node 2 configured too: {flags:?}");
}

#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thb_lists_targets_on_every_node() {
    let cluster = RedisCluster::start(3, 0);
    let names = cluster.keys_on_distinct_primaries(3);
    let watcher = Watcher::connect(Backend::cluster(cluster.seed_urls()).unwrap())
        .await
        .unwrap();
    for (n, name) in names.iter().enumerate() {
        let mut lane = lane(&watcher, name, None).await;
        buffer(&mut lane, n + 1).await;
    }
    let hosts: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port()))
        .collect();
    let url = format!("redis+cluster://{}", hosts.join(","));
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_thb"))
            .args(["--redis", &url, "--json", "targets"])
            .env_remove("REDIS_URL")
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for (n, name) in names.iter().enumerate() {
        let row = json
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not listed: {json:#}"));
        assert_eq!(row["queue"], n + 1, "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_published_through_the_cluster_is_watched_there() {
    let cluster = RedisCluster::start(3, 0);
    let backend = Backend::cluster(cluster.seed_urls()).unwrap();
    let watcher = Watcher::connect(backend.clone()).await.unwrap();
    for name in cluster.keys_on_distinct_primaries(3) {
        let target = Target::new(&name).unwrap();
        let view = watcher.watch(&target).await;
        let heartbeat = Heartbeat::builder(target.clone())
            .ttl(Duration::from_secs(2))
            .start(backend.clone())
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), view.wait_for(Health::Up))
            .await
            .unwrap_or_else(|_| panic!("{target}: published heartbeat not seen"));
        // A graceful stop deletes the key: seen at once.
        heartbeat.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), view.wait_for(Health::Down))
            .await
            .unwrap_or_else(|_| panic!("{target}: stop not seen"));
    }
}
