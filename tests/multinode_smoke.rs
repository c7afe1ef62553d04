//! Smoke tests of the multi-node harnesses (support::RedisCluster,
//! support::SentinelSetup): real processes, real failovers, observed through
//! plain redis-rs clients only (no code of the crate under test).

mod support;

use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;
use redis::sentinel::{SentinelClient, SentinelServerType};
use support::{RedisCluster, SentinelSetup};
use tokio::task::block_in_place;

/// Upper bound for a failover (typically ~2-3 s for the cluster, ~3-6 s for
/// the sentinels); generous for a loaded 2-core machine.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for a client to reach the new primary after the failover.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Retries `op` until it returns Ok or `timeout` passes (then panics with the
/// last error). Returns the value and the number of attempts.
async fn retry<T, F, Fut>(what: &str, timeout: Duration, mut op: F) -> (T, usize)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match op().await {
            Ok(v) => return (v, attempts),
            Err(e) if started.elapsed() >= timeout => {
                panic!("{what}: still failing after {timeout:?} ({attempts} attempts): {e}")
            }
            Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_promotes_the_replica_and_writes_resume() {
    let t_start = Instant::now();
    let mut cluster = block_in_place(|| RedisCluster::start(3, 1));
    let startup = t_start.elapsed();
    assert_eq!(cluster.len(), 6);
    assert_eq!(cluster.current_primaries(), vec![0, 1, 2]);

    // Three hash tags, three primaries.
    let tags = cluster.keys_on_distinct_primaries(3);
    let keys: Vec<String> = tags.iter().map(|t| format!("thb:{{{t}}}:smoke")).collect();
    let owners: Vec<usize> = keys.iter().map(|k| cluster.primary_for_key(k)).collect();
    assert_eq!(owners, vec![0, 1, 2], "tags {tags:?}");
    for (key, tag) in keys.iter().zip(&tags) {
        assert_eq!(cluster.slot_of(key), cluster.slot_of(&format!("{{{tag}}}")));
    }

    let client = ClusterClient::builder(cluster.seed_urls())
        .build()
        .expect("cluster client");
    let mut conn = client.get_async_connection().await.expect("cluster conn");
    for key in &keys {
        redis::cmd("SET")
            .arg(key)
            .arg("before")
            .query_async::<()>(&mut conn)
            .await
            .expect("SET before failover");
    }

    // Make sure the victim's value reached its replica before the kill.
    let victim = owners[0];
    let replicas = cluster.replicas_of(victim);
    assert_eq!(replicas.len(), 1);
    let mut direct = cluster.node(victim).conn();
    redis::cmd("SET")
        .arg(&keys[0])
        .arg("acked")
        .query::<()>(&mut direct)
        .expect("direct SET");
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut direct)
        .expect("WAIT");
    assert_eq!(acked, 1, "replica did not ack");
    drop(direct);

    cluster.kill_node(victim);
    let t_kill = Instant::now();
    let promoted = block_in_place(|| cluster.wait_for_failover(victim, FAILOVER_TIMEOUT));
    let failover = t_kill.elapsed();
    assert_eq!(vec![promoted], replicas);
    assert_eq!(cluster.primary_for_key(&keys[0]), promoted);
    assert_eq!(cluster.current_primaries().len(), 3);

    // The same cluster connection finds the new primary and writes again.
    let t_client = Instant::now();
    let (value, attempts) = retry("GET after failover", CLIENT_TIMEOUT, || {
        let mut conn = conn.clone();
        let key = keys[0].clone();
        async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut conn)
                .await
        }
    })
    .await;
    assert_eq!(value.as_deref(), Some("acked"));
    for key in &keys {
        redis::cmd("SET")
            .arg(key)
            .arg("after")
            .query_async::<()>(&mut conn)
            .await
            .expect("SET after failover");
    }
    let client_time = t_client.elapsed();
    let mut direct = cluster.node(promoted).conn();
    let on_promoted: Option<String> = redis::cmd("GET")
        .arg(&keys[0])
        .query(&mut direct)
        .expect("direct GET");
    assert_eq!(on_promoted.as_deref(), Some("after"));

    eprintln!(
        "cluster: startup {startup:?}, failover {failover:?}, client back after {client_time:?} ({attempts} attempt(s)), total {:?}",
        t_start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_promotes_the_replica_and_the_client_follows() {
    const NAME: &str = "thb-smoke";
    let t_start = Instant::now();
    let mut setup = block_in_place(|| SentinelSetup::start(NAME));
    let startup = t_start.elapsed();
    assert_eq!(setup.master_name(), NAME);
    assert_eq!(setup.sentinel_urls().len(), 3);
    let first_primary = setup.servers()[0].port();
    let first_replica = setup.servers()[1].port();
    assert_eq!(setup.current_primary_port(), first_primary);
    assert_eq!(setup.primary().port(), first_primary);
    assert_eq!(setup.replica().port(), first_replica);

    // A String: `build` takes `String` without the `tls` feature, `impl AsRef<str>` with it.
    let service_name = String::from(NAME);
    let mut client = SentinelClient::build(
        setup.sentinel_urls(),
        service_name,
        None,
        SentinelServerType::Master,
    )
    .expect("sentinel client");
    let mut conn = client.get_async_connection().await.expect("sentinel conn");
    redis::cmd("SET")
        .arg("thb:smoke")
        .arg("acked")
        .query_async::<()>(&mut conn)
        .await
        .expect("SET before failover");
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "replica did not ack");

    let old = setup.kill_primary();
    assert_eq!(old, first_primary);
    let t_kill = Instant::now();
    let new = block_in_place(|| setup.wait_for_failover(old, FAILOVER_TIMEOUT));
    let failover = t_kill.elapsed();
    assert_eq!(new, first_replica);
    assert_eq!(setup.current_primary_port(), first_replica);

    // A new connection through the sentinels reaches the promoted replica.
    let t_client = Instant::now();
    let mut attempts = 0;
    let mut conn = loop {
        attempts += 1;
        match client.get_async_connection().await {
            Ok(conn) => break conn,
            Err(e) if t_client.elapsed() >= CLIENT_TIMEOUT => {
                panic!("connect after failover: still failing after {CLIENT_TIMEOUT:?}: {e}")
            }
            Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
        }
    };
    let value: Option<String> = redis::cmd("GET")
        .arg("thb:smoke")
        .query_async(&mut conn)
        .await
        .expect("GET after failover");
    assert_eq!(value.as_deref(), Some("acked"));
    redis::cmd("SET")
        .arg("thb:smoke")
        .arg("after")
        .query_async::<()>(&mut conn)
        .await
        .expect("SET after failover");
    let client_time = t_client.elapsed();
    let on_new: Option<String> = redis::cmd("GET")
        .arg("thb:smoke")
        .query(&mut setup.server_by_port(new).conn())
        .expect("direct GET");
    assert_eq!(on_new.as_deref(), Some("after"));

    eprintln!(
        "sentinel: startup {startup:?}, failover {failover:?}, client back after {client_time:?} ({attempts} attempt(s)), total {:?}",
        t_start.elapsed()
    );
}
