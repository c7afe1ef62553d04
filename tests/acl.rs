//! The crate works with a Redis ACL user limited to its own keys, channels
//! and the commands it needs — the line documented in the README — and
//! Redis logs no denied command while it does everything.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::layer_rig::call;
use support::{hyper_client, wait_until, HttpTarget, RedisServer};
use tower_heartbeat_buffer::replay::{DeadLetters, ReplayConfig};
use tower_heartbeat_buffer::{
    Health, Heartbeat, HeartbeatBufferLayer, NotificationMode, RequestBody, Target, Watcher,
};

/// The README's ACL line, for namespace `thb` on database 0.
const ACL: &str = "thb on >s3cret resetkeys ~thb:* resetchannels &__keyspace@0__:thb:* \
    -@all +hello +ping +evalsha +eval +script|load \
    +type +pttl +hget +getrange +get +set +hset +pexpire +del +mget +multi +exec +discard \
    +xadd +xlen +xrange +xreadgroup +xack +xdel +xgroup|create +xgroup|delconsumer \
    +xpending +xautoclaim +xclaim +xinfo|consumers +scan \
    +subscribe +unsubscribe +psubscribe +punsubscribe +config|get";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_works_with_the_documented_acl_user() {
    let redis = RedisServer::start();
    let mut admin = redis.conn();
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER");
    for word in ACL.split_whitespace() {
        setuser.arg(word);
    }
    let _: () = setuser.query(&mut admin).unwrap();
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query(&mut admin)
        .unwrap();
    let url = format!("redis://thb:s3cret@127.0.0.1:{}/", redis.port());
    let client = redis::Client::open(url.as_str()).unwrap();

    let http = HttpTarget::start().await;
    let target = Target::new("orders").unwrap();
    let watcher = Watcher::connect(client.clone()).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || watcher.notification_mode()
            == NotificationMode::Notifications)
        .await
    );
    let layer = HeartbeatBufferLayer::builder(target.clone())
        .max_queue_len(5) // every write checked by the script
        .build(&watcher)
        .await
        .unwrap();
    let mut service = tower_layer::Layer::layer(&layer, hyper_client());
    let mut config = ReplayConfig::default();
    config.slow_start = Duration::ZERO;
    let replay = layer
        .replayer()
        .config(config)
        .spawn(hyper_client::<RequestBody<Full<Bytes>>>());

    // Down: stored.
    for i in 0..3 {
        let request = http::Request::post(format!("{}/o/{i}", http.url()))
            .body(Full::new(Bytes::from(format!("acl-{i}"))))
            .unwrap();
        assert_eq!(
            call(&mut service, request).await.unwrap().status,
            StatusCode::ACCEPTED
        );
    }
    // The target's own heartbeat, with the same user; the replay follows.
    let heartbeat = Heartbeat::builder(target.clone())
        .ttl(Duration::from_secs(2))
        .start(client.clone())
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), layer.view().wait_for(Health::Up))
        .await
        .unwrap();
    assert!(http.wait_for_requests(3, Duration::from_secs(10)).await);
    // Up and drained: forwarded.
    let view = layer.view().clone();
    assert!(wait_until(Duration::from_secs(10), || view.backlog() == Some(0)).await);
    let request = http::Request::post(format!("{}/o/3", http.url()))
        .body(Full::new(Bytes::from_static(b"acl-3")))
        .unwrap();
    assert_eq!(
        call(&mut service, request).await.unwrap().status,
        StatusCode::OK
    );
    // Dead letters: a 400 from the target.
    http.set_reply(support::Reply::Status(StatusCode::BAD_REQUEST));
    let _: () = redis::cmd("DEL")
        .arg(target.heartbeat_key())
        .query(&mut admin)
        .unwrap();
    heartbeat.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), layer.view().wait_for(Health::Down))
        .await
        .unwrap();
    let request = http::Request::post(format!("{}/o/4", http.url()))
        .body(Full::new(Bytes::from_static(b"acl-4")))
        .unwrap();
    assert_eq!(
        call(&mut service, request).await.unwrap().status,
        StatusCode::ACCEPTED
    );
    let heartbeat = Heartbeat::builder(target.clone())
        .start(client.clone())
        .unwrap();
    let dead = DeadLetters::new(client.clone(), &target).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(dead.len()))
                .unwrap_or(0)
                == 1
        })
        .await
    );
    let letter = dead.list(1).await.unwrap().remove(0);
    assert!(dead.purge(&letter.entry_id).await.unwrap());
    replay.shutdown().await;
    heartbeat.shutdown().await.unwrap();

    // Nothing was denied along the way.
    let log: Vec<redis::Value> = redis::cmd("ACL").arg("LOG").query(&mut admin).unwrap();
    assert!(log.is_empty(), "denied by the ACL: {log:?}");
}
