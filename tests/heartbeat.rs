//! The heartbeat protocol against real `redis-server` processes: the
//! watcher's view follows the key, fast, and survives Redis trouble.

mod support;

use std::time::{Duration, Instant};

use redis::Commands;
use support::{wait_until, RedisOptions, RedisServer};
use tokio::time::timeout;
use tower_heartbeat_buffer::{
    Health, Heartbeat, HeartbeatFormat, NotificationMode, Status, Target, TargetView, Watcher,
};

/// How fast a change must be seen: the promise in the README.
const REACTION: Duration = Duration::from_millis(50);
/// Bound for "eventually" checks; generous, because the machine is noisy.
const EVENTUALLY: Duration = Duration::from_secs(10);

async fn watcher(server: &RedisServer) -> Watcher {
    Watcher::connect(server.client()).await.expect("watcher")
}

/// Runs `change`, then waits for `view` to report `wanted`; returns how long
/// that took after `change` returned (None: not within `bound`).
async fn reaction(
    view: &TargetView,
    wanted: Health,
    bound: Duration,
    change: impl FnOnce(),
) -> Option<Duration> {
    change();
    let start = Instant::now();
    timeout(bound, view.wait_for(wanted)).await.ok()?;
    Some(start.elapsed())
}

/// p-th percentile (0..=100) of `samples`.
fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    samples[(samples.len() - 1) * p / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_key_is_seen_down_and_set_key_up_within_50ms() {
    let server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let key = target.heartbeat_key();
    let view = watcher(&server).await.watch(&target).await;
    assert_eq!(view.health(), Health::Down, "no key yet");

    let mut conn = server.conn();
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        ups.push(
            reaction(&view, Health::Up, EVENTUALLY, || {
                let _: () = conn.set_ex(&key, 1, 60).unwrap();
            })
            .await
            .expect("seen up"),
        );
        downs.push(
            reaction(&view, Health::Down, EVENTUALLY, || {
                let _: () = conn.del(&key).unwrap();
            })
            .await
            .expect("seen down"),
        );
    }
    // Every transition was seen; nearly all well inside the promise. The
    // percentile keeps one scheduler hiccup on a 2-core CI box from failing
    // the run while still failing a watcher that waits for reconciliation.
    let (up90, down90) = (percentile(&mut ups, 90), percentile(&mut downs, 90));
    assert!(up90 < REACTION, "set -> up p90 {up90:?}, samples {ups:?}");
    assert!(
        down90 < REACTION,
        "del -> down p90 {down90:?}, samples {downs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_key_is_seen_down_within_50ms_of_its_deadline() {
    let server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let view = watcher(&server).await.watch(&target).await;
    let mut conn = server.conn();
    let mut lateness = Vec::new();
    for _ in 0..5 {
        let _: () = redis::cmd("SET")
            .arg(target.heartbeat_key())
            .arg(1)
            .arg("PX")
            .arg(300)
            .query(&mut conn)
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(300);
        timeout(EVENTUALLY, view.wait_for(Health::Up))
            .await
            .expect("up");
        timeout(EVENTUALLY, view.wait_for(Health::Down))
            .await
            .expect("down");
        let now = Instant::now();
        assert!(
            now >= deadline - Duration::from_millis(5),
            "down before the TTL ran out"
        );
        lateness.push(now - deadline);
    }
    let worst = percentile(&mut lateness, 100);
    assert!(
        worst < REACTION,
        "seen down {worst:?} after the deadline: {lateness:?}"
    );
}

/// With a million volatile keys Redis may take minutes to notice that one of
/// them expired; the watcher must not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_seen_at_the_deadline_among_a_million_volatile_keys() {
    let server = RedisServer::start_with(RedisOptions::new().appendonly(false));
    let mut conn = server.conn();
    // Fill in batches so no single script blocks the server for long.
    let fill = redis::Script::new(
        "for i = ARGV[1], ARGV[2] do redis.call('SET', 'filler:' .. i, 'x', 'EX', 3600 + i % 600) end",
    );
    for batch in 0..10 {
        let _: () = fill
            .arg(batch * 100_000)
            .arg(batch * 100_000 + 99_999)
            .invoke(&mut conn)
            .unwrap();
    }
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(dbsize, 1_000_000);

    // Listen for Redis's own `expired` event, to show what we do not wait for.
    let mut events = server.client().get_connection().unwrap();
    events
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut pubsub = events.as_pubsub();
    pubsub.subscribe("__keyevent@0__:expired").unwrap();

    let target = Target::new("orders").unwrap();
    let view = watcher(&server).await.watch(&target).await;
    let _: () = redis::cmd("SET")
        .arg(target.heartbeat_key())
        .arg(1)
        .arg("PX")
        .arg(500)
        .query(&mut conn)
        .unwrap();
    // The same TTL on a key nobody reads: only Redis's own expiry finds it.
    // (The watched key is expired lazily by the watcher's confirming read,
    // which makes Redis emit its event then.)
    let _: () = redis::cmd("SET")
        .arg("unwatched")
        .arg(1)
        .arg("PX")
        .arg(500)
        .query(&mut conn)
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(500);
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
    let late = Instant::now().saturating_duration_since(deadline);
    assert!(late < REACTION, "seen down {late:?} after the deadline");

    // Redis's own event, for the record (not asserted: it may come at any
    // time, which is the point).
    let mut redis_event = None;
    let listen_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < listen_until {
        if let Ok(msg) = pubsub.get_message() {
            let key: String = msg.get_payload().unwrap();
            if key == "unwatched" {
                redis_event = Some(Instant::now() - deadline);
                break;
            }
        }
    }
    eprintln!("watcher: {late:?} after the deadline; redis `expired` event: {redis_event:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_alone_is_correct_when_notifications_are_off_and_config_is_forbidden() {
    let server = RedisServer::start_with(
        RedisOptions::new()
            .notifications(None)
            .config_disabled(true),
    );
    let interval = Duration::from_millis(200);
    let watcher = Watcher::builder()
        .reconcile_interval(interval)
        .configure_notifications(true)
        .connect(server.client())
        .await
        .unwrap();
    let target = Target::new("orders").unwrap();
    let key = target.heartbeat_key();
    let view = watcher.watch(&target).await;
    assert!(
        wait_until(EVENTUALLY, || watcher.notification_mode()
            == NotificationMode::ReconcileOnly)
        .await
    );

    let mut conn = server.conn();
    let bound = interval + Duration::from_millis(150);
    for _ in 0..3 {
        let up = reaction(&view, Health::Up, EVENTUALLY, || {
            let _: () = conn.set(&key, 1).unwrap();
        })
        .await
        .unwrap();
        assert!(up < bound, "set seen after {up:?}");
        let down = reaction(&view, Health::Down, EVENTUALLY, || {
            let _: () = conn.del(&key).unwrap();
        })
        .await
        .unwrap();
        assert!(down < bound, "del seen after {down:?}");
    }
    // Expiry needs no notification at all: the deadline is local.
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .arg("PX")
        .arg(500)
        .query(&mut conn)
        .unwrap();
    // The same TTL on a key nobody reads: only Redis's own expiry finds it.
    // (The watched key is expired lazily by the watcher's confirming read,
    // which makes Redis emit its event then.)
    let _: () = redis::cmd("SET")
        .arg("unwatched")
        .arg(1)
        .arg("PX")
        .arg(500)
        .query(&mut conn)
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(500);
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
    let late = Instant::now().saturating_duration_since(deadline);
    assert!(
        late < REACTION,
        "expiry seen {late:?} late without notifications"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notification_flags_are_turned_on_only_when_allowed() {
    let server = RedisServer::start_with(RedisOptions::new().notifications(None));
    let flags = |server: &RedisServer| -> String {
        let (_, v): (String, String) = redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query(&mut server.conn())
            .unwrap();
        v
    };

    let not_allowed = watcher(&server).await;
    assert!(
        wait_until(EVENTUALLY, || not_allowed.notification_mode()
            == NotificationMode::ReconcileOnly)
        .await
    );
    assert_eq!(
        flags(&server),
        "",
        "the watcher changed CONFIG without leave"
    );

    let allowed = Watcher::builder()
        .configure_notifications(true)
        .connect(server.client())
        .await
        .unwrap();
    assert!(
        wait_until(EVENTUALLY, || allowed.notification_mode()
            == NotificationMode::Notifications)
        .await
    );
    let now = flags(&server);
    for flag in ['K', 'x', 'e'] {
        assert!(now.contains(flag), "{flag} missing from {now:?}");
    }
    // With the flags on, a deletion is seen at once.
    let target = Target::new("orders").unwrap();
    let view = allowed.watch(&target).await;
    let mut conn = server.conn();
    let _: () = conn.set(target.heartbeat_key(), 1).unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    let down = reaction(&view, Health::Down, EVENTUALLY, || {
        let _: () = conn.del(target.heartbeat_key()).unwrap();
    })
    .await
    .unwrap();
    assert!(down < Duration::from_millis(500), "del seen after {down:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_publishers_are_understood() {
    let server = RedisServer::start();
    let watcher = watcher(&server).await;
    let mut conn = server.conn();

    // A shell script's `SET key 1 PX ttl`.
    let plain = Target::new("plain").unwrap();
    let view = watcher.watch(&plain).await;
    let _: () = redis::cmd("SET")
        .arg(plain.heartbeat_key())
        .arg(1)
        .arg("PX")
        .arg(5000)
        .query(&mut conn)
        .unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    let _: () = conn.set_ex(plain.heartbeat_key(), "draining", 5).unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();

    // A hash written with HSET + PEXPIRE, with a status field.
    let hashed = Target::new("hashed").unwrap();
    let key = hashed.heartbeat_key();
    let view = watcher.watch(&hashed).await;
    let _: () = redis::pipe()
        .hset(&key, "status", "up")
        .pexpire(&key, 5000)
        .query(&mut conn)
        .unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    let _: () = conn.hset(&key, "status", "draining").unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
    let _: () = conn.hset(&key, "status", "up").unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();

    // An explicit key kept by another system, outside our layout.
    let legacy = Target::new("legacy")
        .unwrap()
        .with_heartbeat_key("legacy:payments:alive")
        .unwrap();
    let view = watcher.watch(&legacy).await;
    assert_eq!(view.health(), Health::Down);
    let _: () = conn.set("legacy:payments:alive", "ok").unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_writes_the_documented_hash_and_deletes_it_on_shutdown() {
    let server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let heartbeat = Heartbeat::builder(target.clone())
        .instance("pod-1")
        .ttl(Duration::from_secs(3))
        .version("1.2.3")
        .field("region", "eu")
        .start(server.client())
        .unwrap();
    assert_eq!(heartbeat.key(), "thb:{orders}:hb:pod-1");
    timeout(EVENTUALLY, heartbeat.wait_published())
        .await
        .unwrap();

    let mut conn = server.conn();
    let fields: std::collections::HashMap<String, String> = conn.hgetall(heartbeat.key()).unwrap();
    assert_eq!(fields["status"], "up");
    assert_eq!(fields["instance"], "pod-1");
    assert_eq!(fields["version"], "1.2.3");
    assert_eq!(fields["region"], "eu");
    assert!(fields["started_at"].parse::<u64>().unwrap() > 1_600_000_000_000);
    let pttl: i64 = conn.pttl(heartbeat.key()).unwrap();
    assert!((1..=3000).contains(&pttl), "pttl {pttl}");

    heartbeat.set_status(Status::Draining).await.unwrap();
    let status: String = conn.hget(heartbeat.key(), "status").unwrap();
    assert_eq!(status, "draining");

    let key = heartbeat.key().to_owned();
    heartbeat.shutdown().await.unwrap();
    let exists: bool = conn.exists(&key).unwrap();
    assert!(!exists, "shutdown left the key behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_the_key_alive_and_the_watcher_sees_a_graceful_stop_at_once() {
    let server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let view = watcher(&server).await.watch(&target).await;
    let heartbeat = Heartbeat::builder(target.clone())
        .format(HeartbeatFormat::Marker)
        .ttl(Duration::from_millis(300))
        .start(server.client())
        .unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    let value: String = server.conn().get(target.heartbeat_key()).unwrap();
    assert_eq!(value, "1");

    // Several TTLs pass; refreshes keep the target up the whole time.
    let mut changes = view.changes();
    changes.mark_unchanged();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!changes.has_changed().unwrap(), "flapped while refreshed");
    assert_eq!(view.health(), Health::Up);

    let stop = Instant::now();
    heartbeat.shutdown().await.unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
    let seen = stop.elapsed();
    assert!(
        seen < REACTION + Duration::from_millis(20),
        "graceful stop seen after {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_instance_target_is_up_while_any_instance_serves() {
    let server = RedisServer::start();
    let target = Target::new("orders").unwrap().with_instances();
    let start = |instance: &str| {
        Heartbeat::builder(target.clone())
            .instance(instance)
            .ttl(Duration::from_secs(2))
            .start(server.client())
            .unwrap()
    };
    // One instance is already up before the watcher starts (found by scan),
    // the other appears later (found by its event).
    let a = start("a");
    timeout(EVENTUALLY, a.wait_published()).await.unwrap();
    let view = watcher(&server).await.watch(&target).await;
    assert_eq!(view.health(), Health::Up);
    let b = start("b");
    timeout(EVENTUALLY, b.wait_published()).await.unwrap();

    a.shutdown().await.unwrap();
    // b still serves: no transition may happen.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(view.health(), Health::Up);

    b.set_status(Status::Draining).await.unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
    b.set_status(Status::Up).await.unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    b.shutdown().await.unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watch_of_a_target_shares_one_view() {
    let server = RedisServer::start();
    let watcher = watcher(&server).await;
    let target = Target::new("orders").unwrap();
    let first = watcher.watch(&target).await;
    // The heartbeat channel, and the queue's while the queue is empty.
    assert!(wait_until(EVENTUALLY, || server.command_calls("subscribe") == 2).await);
    let second = watcher.clone().watch(&target).await;
    let _: () = server.conn().set(target.heartbeat_key(), 1).unwrap();
    timeout(EVENTUALLY, first.wait_for(Health::Up))
        .await
        .unwrap();
    assert_eq!(second.health(), Health::Up);
    assert_eq!(
        server.command_calls("subscribe"),
        2,
        "a second watch of a target subscribes to nothing new"
    );
}

/// Reads the per-command call counts from `INFO commandstats`.
fn command_counts(conn: &mut redis::Connection) -> std::collections::BTreeMap<String, u64> {
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
async fn reading_the_view_issues_no_redis_command() {
    let server = RedisServer::start();
    let watcher = Watcher::builder()
        .reconcile_interval(Duration::from_secs(3600))
        .connect(server.client())
        .await
        .unwrap();
    let target = Target::new("orders").unwrap();
    let mut conn = server.conn();
    // No TTL: no deadline, so the watcher has no reason to read again.
    let _: () = conn.set(target.heartbeat_key(), 1).unwrap();
    let view = watcher.watch(&target).await;
    assert_eq!(view.health(), Health::Up);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let before = command_counts(&mut conn);
    let mut up = 0u64;
    for _ in 0..1_000_000 {
        up += u64::from(view.is_up());
        std::hint::black_box(view.health());
    }
    assert_eq!(up, 1_000_000);
    let mut after = command_counts(&mut conn);
    // The only new call is our own first INFO.
    *after.get_mut("info").unwrap() -= 1;
    assert_eq!(before, after, "a state read reached Redis");
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_watcher_and_publisher_recover_without_spinning() {
    let mut server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let view = watcher(&server).await.watch(&target).await;
    let heartbeat = Heartbeat::builder(target.clone())
        .ttl(Duration::from_millis(600))
        .start(server.client())
        .unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();

    server.kill();
    assert!(wait_until(EVENTUALLY, || !view.redis_reachable()).await);
    // Redis is gone: the target cannot refresh either, so the view holds
    // its last belief instead of declaring the target dead.
    let cpu_before = cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_used = cpu_time() - cpu_before;
    assert_eq!(view.health(), Health::Up);
    assert!(
        cpu_used < Duration::from_millis(300),
        "{cpu_used:?} of CPU in 2 s while Redis was down: a busy loop"
    );

    server.restart();
    assert!(wait_until(EVENTUALLY, || view.redis_reachable()).await);
    // The key's TTL ran out during the outage; the publisher rewrites it and
    // the view converges on up.
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    // The publisher writes again: the key comes back with a fresh TTL.
    let mut conn = server.conn();
    assert!(
        wait_until(EVENTUALLY, || conn
            .pttl::<_, i64>(target.heartbeat_key())
            .unwrap()
            > 0)
        .await
    );
    // Notifications were resubscribed: a graceful stop is seen at once.
    let stop = Instant::now();
    heartbeat.shutdown().await.unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
    let seen = stop.elapsed();
    assert!(
        seen < Duration::from_millis(200),
        "after restart, stop seen in {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_holds_the_view_then_converges() {
    let server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let view = watcher(&server).await.watch(&target).await;
    let _: () = redis::cmd("SET")
        .arg(target.heartbeat_key())
        .arg(1)
        .arg("PX")
        .arg(400)
        .query(&mut server.conn())
        .unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();

    server.pause();
    // The deadline passes while Redis is frozen: the confirming read times
    // out, and the view holds rather than guess.
    assert!(wait_until(EVENTUALLY, || !view.redis_reachable()).await);
    assert_eq!(view.health(), Health::Up);
    server.resume();
    // Redis answers again: the key is expired there, and the view agrees.
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
    assert!(wait_until(EVENTUALLY, || view.redis_reachable()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_started_while_redis_is_down_catches_up() {
    let mut server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let _: () = server.conn().set(target.heartbeat_key(), 1).unwrap();
    server.kill();

    let watcher = watcher(&server).await;
    let view = watcher.watch(&target).await;
    assert_eq!(view.health(), Health::Unknown);
    assert!(!view.redis_reachable());

    server.restart();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    assert!(view.redis_reachable());
    // And its notifications work: the subscription was made late.
    let down = reaction(&view, Health::Down, EVENTUALLY, || {
        let _: () = server.conn().del(target.heartbeat_key()).unwrap();
    })
    .await
    .unwrap();
    assert!(down < Duration::from_millis(200), "del seen after {down:?}");
}

#[test]
fn invalid_heartbeat_configurations_are_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
    let target = Target::new("orders").unwrap();
    let err = Heartbeat::builder(target.clone())
        .ttl(Duration::from_secs(1))
        .interval(Duration::from_secs(2))
        .start(client.clone())
        .unwrap_err();
    assert!(err.to_string().contains("shorter than the ttl"), "{err}");
    let err = Heartbeat::builder(target.clone())
        .field("status", "x")
        .start(client.clone())
        .unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
    let err = Heartbeat::builder(target.clone().with_instances())
        .start(client)
        .unwrap_err();
    assert!(err.to_string().contains("instance name"), "{err}");
}

/// Strict ordering across replicas rests on this: an entry written by anyone
/// into an empty buffer is seen at once; a drained buffer soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_follows_the_buffer_filling_and_draining() {
    let server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let view = watcher(&server).await.watch(&target).await;
    assert_eq!(view.backlog(), Some(0));
    // Wait for the queue channel subscription (made while the queue is empty).
    assert!(wait_until(EVENTUALLY, || server.command_calls("subscribe") == 2).await);

    let mut conn = server.conn();
    let start = Instant::now();
    let _: String = conn.xadd(target.queue_key(), "*", &[("v", "1")]).unwrap();
    assert!(wait_until(EVENTUALLY, || view.backlog() == Some(1)).await);
    let seen = start.elapsed();
    assert!(seen < REACTION, "first entry seen after {seen:?}");

    // Many appends later (not followed one by one), the drain is seen.
    for _ in 0..100 {
        let _: String = conn.xadd(target.queue_key(), "*", &[("v", "1")]).unwrap();
    }
    let _: () = conn.del(target.queue_key()).unwrap();
    let start = Instant::now();
    assert!(wait_until(EVENTUALLY, || view.backlog() == Some(0)).await);
    let seen = start.elapsed();
    assert!(
        seen < Duration::from_millis(500),
        "drain seen after {seen:?}"
    );
}

/// Regression: while the buffer is not empty the watcher polls its length;
/// those polls must not postpone the heartbeat's reconciliation, or, without
/// notifications, a returning target is never seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_buffer_does_not_postpone_reconciliation_without_notifications() {
    let server = RedisServer::start_with(RedisOptions::new().notifications(None));
    let interval = Duration::from_millis(300);
    let watcher = Watcher::builder()
        .reconcile_interval(interval)
        .connect(server.client())
        .await
        .unwrap();
    let target = Target::new("orders").unwrap();
    let mut conn = server.conn();
    let _: String = conn.xadd(target.queue_key(), "*", &[("v", "1")]).unwrap();
    let view = watcher.watch(&target).await;
    assert_eq!(view.backlog(), Some(1));
    assert_eq!(view.health(), Health::Down);
    // Past the start-up re-reads: the backlog is being polled.
    assert!(
        wait_until(EVENTUALLY, || watcher.notification_mode()
            == NotificationMode::ReconcileOnly)
        .await
    );
    let polls = server.command_calls("xlen");
    assert!(wait_until(EVENTUALLY, || server.command_calls("xlen") >= polls + 3).await);
    let up = reaction(&view, Health::Up, EVENTUALLY, || {
        let _: () = conn.set(target.heartbeat_key(), 1).unwrap();
    })
    .await
    .expect("a returning target is seen");
    assert!(
        up < interval + Duration::from_millis(200),
        "seen after {up:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_key_of_the_wrong_type_counts_as_down() {
    let server = RedisServer::start();
    let target = Target::new("orders").unwrap();
    let view = watcher(&server).await.watch(&target).await;
    let mut conn = server.conn();
    let _: () = conn.set(target.heartbeat_key(), 1).unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .unwrap();
    // Something else writes a list where the heartbeat lives.
    let _: () = conn.del(target.heartbeat_key()).unwrap();
    let _: () = conn.rpush(target.heartbeat_key(), "1").unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .unwrap();
    let _: () = conn.sadd("thb:{other}:hb", "1").unwrap();
    let other = watcher(&server)
        .await
        .watch(&Target::new("other").unwrap())
        .await;
    assert_eq!(other.health(), Health::Down);
}

/// Captures what the crate logs on this thread (a current-thread runtime
/// keeps every task here).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_eviction_policy_that_could_drop_buffered_requests_is_reported_loudly() {
    let logs = Captured::default();
    let writer = logs.clone();
    let _guard = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(_guard);
    let server = RedisServer::start_with(
        RedisOptions::new()
            .extra("maxmemory", "100mb")
            .extra("maxmemory-policy", "allkeys-lru"),
    );
    let watcher = watcher(&server).await;
    assert!(
        wait_until(EVENTUALLY, || watcher.notification_mode()
            != NotificationMode::Unchecked)
        .await
    );
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("ERROR") && text.contains("allkeys-lru") && text.contains("noeviction"),
        "{text}"
    );
}
