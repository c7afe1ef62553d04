//! The crate over `rediss://` (feature `tls`): a real `redis-server` with a
//! TLS port and a throwaway CA. Every connection of the crate goes to the TLS
//! port; the harness sets up and checks over the plain port.

#![cfg(feature = "tls")]

mod support;

use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Full;
use redis::Commands;
use support::layer_rig::{call, Rig};
use support::{wait_until, HttpTarget, RedisOptions, RedisServer};
use tokio::time::timeout;
use tower_heartbeat_buffer::{Buffered, Health, Heartbeat, Target, Watcher};

const EVENTUALLY: Duration = Duration::from_secs(10);

fn tls_server() -> RedisServer {
    RedisServer::start_with(RedisOptions::new().tls(true))
}

/// `CLIENT LIST` lines of the clients on `port`, not counting the
/// connection that asks.
fn clients_on(server: &RedisServer, port: u16) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut server.conn())
        .unwrap();
    let laddr = format!(" laddr=127.0.0.1:{port} ");
    list.lines()
        .filter(|l| l.contains(&laddr) && !l.contains(" cmd=client|list "))
        .map(str::to_owned)
        .collect()
}

/// Waits until no client but the asking one is left on the plain port and at
/// least `min_tls` are on the TLS port (closed setup connections take a moment
/// to leave the list); returns the TLS clients.
async fn assert_only_tls_clients(server: &RedisServer, min_tls: usize) -> Vec<String> {
    let tls_port = server.tls_port().unwrap();
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    let ok = wait_until(EVENTUALLY, || {
        plain = clients_on(server, server.port());
        tls = clients_on(server, tls_port);
        plain.is_empty() && tls.len() >= min_tls
    })
    .await;
    assert!(
        ok,
        "wanted no client on the plain port and >= {min_tls} on the TLS port:\nplain: {plain:#?}\ntls: {tls:#?}"
    );
    tls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_serves_tls_with_its_own_ca_only() {
    let mut server = tls_server();
    assert_eq!(
        server.tls_url(),
        format!("rediss://127.0.0.1:{}/", server.tls_port().unwrap())
    );
    let pem = std::fs::read_to_string(server.ca_cert_path()).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");

    let mut tls = server.tls_client().get_connection().unwrap();
    let _: () = tls.set("k", "over tls").unwrap();
    let got: String = server.conn().get("k").unwrap();
    assert_eq!(got, "over tls");

    // `localhost` is in the certificate too.
    let url = format!("rediss://localhost:{}/", server.tls_port().unwrap());
    let pong: String = redis::cmd("PING")
        .query(&mut server.tls_client_for(&url).get_connection().unwrap())
        .unwrap();
    assert_eq!(pong, "PONG");

    // The certificate is really checked: the system roots do not know the
    // throwaway CA.
    let untrusted = redis::Client::open(server.tls_url()).unwrap();
    let Err(err) = untrusted.get_connection_with_timeout(Duration::from_secs(5)) else {
        panic!("a server certificate from an unknown CA must be refused");
    };
    assert!(
        format!("{err:?}").contains("UnknownIssuer"),
        "unexpected error: {err:?}"
    );

    // restart() keeps TLS (same port, same certificate).
    server.restart();
    let got: String = server
        .tls_client()
        .get_connection()
        .unwrap()
        .get("k")
        .unwrap();
    assert_eq!(got, "over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_follows_the_heartbeat_over_tls() {
    let server = tls_server();
    let target = Target::new("orders").unwrap();
    // The watcher rebuilds the client for RESP3 from its ConnectionInfo: the
    // private CA given to build_with_tls must survive that.
    let watcher = Watcher::connect(server.tls_client()).await.unwrap();
    let view = watcher.watch(&target).await;
    assert!(
        view.redis_reachable(),
        "watcher could not reach Redis over TLS"
    );
    assert_eq!(view.health(), Health::Down);

    let mut conn = server.conn();
    let _: () = conn.set(target.heartbeat_key(), 1).unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .expect("set heartbeat seen over TLS");
    let _: () = conn.del(target.heartbeat_key()).unwrap();
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .expect("deleted heartbeat seen over TLS");
    drop(conn);

    // Pushes (keyspace notifications) arrive over TLS too, not only the
    // periodic re-reads.
    assert_eq!(
        watcher.notification_mode(),
        tower_heartbeat_buffer::NotificationMode::Notifications
    );
    let tls = assert_only_tls_clients(&server, 1).await;
    assert!(
        tls.iter().any(|c| c.split(' ').any(|f| f == "resp=3")),
        "the watcher's RESP3 connection is on the TLS port: {tls:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_publishes_over_tls() {
    let server = tls_server();
    let target = Target::new("orders").unwrap();
    let watcher = Watcher::connect(server.tls_client()).await.unwrap();
    let view = watcher.watch(&target).await;

    let heartbeat = Heartbeat::builder(target.clone())
        .ttl(Duration::from_secs(5))
        .start(server.tls_client())
        .unwrap();
    timeout(EVENTUALLY, heartbeat.wait_published())
        .await
        .expect("heartbeat written over TLS");
    let exists: bool = server.conn().exists(target.heartbeat_key()).unwrap();
    assert!(exists);
    timeout(EVENTUALLY, view.wait_for(Health::Up))
        .await
        .expect("watcher saw the heartbeat");
    // Watcher + heartbeat, all on the TLS port.
    assert_only_tls_clients(&server, 2).await;

    heartbeat.shutdown().await.unwrap();
    let exists: bool = server.conn().exists(target.heartbeat_key()).unwrap();
    assert!(!exists, "shutdown deletes the key over TLS");
    timeout(EVENTUALLY, view.wait_for(Health::Down))
        .await
        .expect("watcher saw the shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_stores_a_post_over_tls_while_the_target_is_down() {
    let redis = tls_server();
    let watcher = Watcher::connect(redis.tls_client()).await.unwrap();
    let mut rig = Rig {
        redis,
        http: HttpTarget::start().await,
        target: Target::new("orders").unwrap(),
        watcher,
    };
    // Heartbeat set and deleted over the plain port; seen over TLS.
    rig.up().await;
    rig.down().await;
    rig.http.kill().await;
    let mut service = rig.service(|b| b).await;

    let request = Request::post(format!("{}/orders?tenant=7", rig.http.url()))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from_static(b"{\"qty\":1}")))
        .unwrap();
    let out = call(&mut service, request).await.unwrap();
    assert_eq!(out.status, StatusCode::ACCEPTED, "{out:?}");
    let buffered = out.extensions.get::<Buffered>().expect("Buffered");
    assert_eq!(buffered.queue_len(), 1);

    let stored = rig.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, buffered.id());
    assert_eq!(stored[0].method, http::Method::POST);
    assert_eq!(stored[0].uri.path_and_query().unwrap(), "/orders?tenant=7");
    assert_eq!(&stored[0].body[..], b"{\"qty\":1}");
    // Watcher and buffer: nothing of the crate's on the plain port.
    assert_only_tls_clients(&rig.redis, 2).await;
}
