//! Smoke tests for the shared test support (`tests/support`): real private
//! redis-server processes, no mocks, never the shared Redis on 6379.

mod support;

use std::time::{Duration, Instant};

use support::{wait_until, RedisOptions, RedisServer};

fn get(conn: &mut redis::Connection, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(key).query(conn)
}

fn set(conn: &mut redis::Connection, key: &str, value: &str) {
    redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query::<()>(conn)
        .expect("SET");
}

fn config_get(conn: &mut redis::Connection, name: &str) -> redis::RedisResult<Vec<String>> {
    redis::cmd("CONFIG").arg("GET").arg(name).query(conn)
}

#[test]
fn starts_private_server_on_loopback() {
    let server = RedisServer::start();
    assert_ne!(server.port(), 6379);
    assert_eq!(
        server.url(),
        format!("redis://127.0.0.1:{}/", server.port())
    );
    assert!(server.is_running());
    assert!(server.dir().join("redis.conf").is_file());

    let mut conn = server.conn();
    set(&mut conn, "k", "v");
    assert_eq!(get(&mut conn, "k").unwrap().as_deref(), Some("v"));

    // It really is a fresh, private server: our process, only our key.
    let info: String = redis::cmd("INFO").arg("server").query(&mut conn).unwrap();
    assert!(
        info.contains(&format!("process_id:{}", server.pid().unwrap())),
        "{info}"
    );
    assert!(
        info.contains(&format!("tcp_port:{}", server.port())),
        "{info}"
    );
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut conn).unwrap();
    assert_eq!(dbsize, 1);
    let save = config_get(&mut conn, "save").unwrap();
    assert_eq!(save, vec!["save".to_string(), String::new()]);
}

#[test]
fn kill_then_restart_keeps_acked_writes_via_aof() {
    let mut server = RedisServer::start();
    let port = server.port();
    let mut conn = server.conn();
    for i in 0..100 {
        set(&mut conn, &format!("key:{i}"), &format!("value:{i}"));
    }
    redis::cmd("RPUSH")
        .arg("list")
        .arg(&["a", "b", "c"])
        .query::<()>(&mut conn)
        .unwrap();

    server.kill();
    assert!(!server.is_running());
    server.kill(); // idempotent
    let err = get(&mut conn, "key:1").expect_err("old connection must fail after kill");
    assert!(err.is_io_error() || err.is_connection_dropped(), "{err:?}");
    let refused = server
        .client()
        .get_connection()
        .err()
        .expect("new connection must fail");
    assert!(refused.is_connection_refusal(), "{refused:?}");

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port, "restart keeps the port");
    let mut conn = server.conn();
    for i in 0..100 {
        assert_eq!(
            get(&mut conn, &format!("key:{i}")).unwrap(),
            Some(format!("value:{i}"))
        );
    }
    let list: Vec<String> = redis::cmd("LRANGE")
        .arg("list")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(list, ["a", "b", "c"]);

    // restart() while running also works (kills first).
    set(&mut conn, "after", "restart");
    server.restart();
    assert_eq!(
        get(&mut server.conn(), "after").unwrap().as_deref(),
        Some("restart")
    );
}

#[test]
fn appendonly_off_loses_data_on_restart() {
    let mut server = RedisServer::start_with(RedisOptions::new().appendonly(false));
    set(&mut server.conn(), "k", "v");
    server.restart();
    assert_eq!(get(&mut server.conn(), "k").unwrap(), None);
}

#[test]
fn pause_makes_commands_time_out_and_resume_recovers() {
    let server = RedisServer::start();
    let mut conn = server.conn();
    set(&mut conn, "k", "v");

    server.pause();
    assert!(server.is_running(), "a paused server is still running");
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let err = get(&mut conn, "k").expect_err("paused server must not answer");
    assert!(err.is_timeout(), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "{:?}",
        started.elapsed()
    );

    server.resume();
    // The timed-out connection may still have a stale reply in flight: use a new one.
    let mut conn = server.conn();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert_eq!(get(&mut conn, "k").unwrap().as_deref(), Some("v"));
}

#[test]
fn paused_server_can_be_dropped_and_killed() {
    let mut server = RedisServer::start();
    server.pause();
    server.kill();
    assert!(!server.is_running());
    server.restart();
    assert_eq!(get(&mut server.conn(), "nope").unwrap(), None);
    server.pause(); // Drop must SIGKILL a stopped process as well
}

#[test]
fn config_disabled_makes_config_an_unknown_command() {
    let server = RedisServer::start_with(RedisOptions::new().config_disabled(true));
    let mut conn = server.conn();
    let err = config_get(&mut conn, "notify-keyspace-events").expect_err("CONFIG must be disabled");
    assert!(
        err.to_string().to_lowercase().contains("unknown command"),
        "{err}"
    );
    // The harness itself does not need CONFIG.
    set(&mut conn, "k", "v");
    assert!(server.command_calls("set") >= 1);
}

#[test]
fn default_notifications_are_on_and_none_leaves_them_off() {
    let server = RedisServer::start();
    let flags = config_get(&mut server.conn(), "notify-keyspace-events").unwrap();
    assert_eq!(flags[0], "notify-keyspace-events");
    assert!(flags[1].contains('K'), "{flags:?}");
    assert!(flags[1].contains('E'), "{flags:?}");

    let server = RedisServer::start_with(RedisOptions::new().notifications(None));
    let flags = config_get(&mut server.conn(), "notify-keyspace-events").unwrap();
    assert_eq!(flags[1], "", "{flags:?}");

    let server = RedisServer::start_with(RedisOptions::new().notifications(Some("Ex")));
    let flags = config_get(&mut server.conn(), "notify-keyspace-events").unwrap();
    assert_eq!(flags[1], "xE", "{flags:?}");
}

#[test]
fn debug_command_and_extra_options() {
    let server = RedisServer::start();
    let err = redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg(0)
        .query::<()>(&mut server.conn());
    assert!(err.is_err(), "DEBUG is disabled by default");

    let server = RedisServer::start_with(
        RedisOptions::new()
            .debug_command(true)
            .extra("maxmemory", "10mb")
            .extra("hz", "50"),
    );
    let mut conn = server.conn();
    redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg(0)
        .query::<()>(&mut conn)
        .unwrap();
    assert_eq!(config_get(&mut conn, "maxmemory").unwrap()[1], "10485760");
    assert_eq!(config_get(&mut conn, "hz").unwrap()[1], "50");
}

#[test]
fn command_calls_and_total_commands_processed() {
    let server = RedisServer::start();
    assert_eq!(server.command_calls("set"), 0);
    let mut conn = server.conn();
    let before = server.total_commands_processed();
    for i in 0..5 {
        set(&mut conn, &format!("k{i}"), "v");
    }
    let _ = get(&mut conn, "k1").unwrap();
    assert_eq!(server.command_calls("set"), 5);
    assert_eq!(server.command_calls("SET"), 5, "name is lowercased");
    assert_eq!(server.command_calls("get"), 1);
    assert_eq!(server.command_calls("pttl"), 0);
    // 5 SET + 1 GET + the 5 helper INFOs since `before` was read (its own
    // INFO included; the final INFO doing the read is not counted yet).
    assert_eq!(server.total_commands_processed() - before, 6 + 5);
}

#[tokio::test]
async fn wait_until_polls_until_true_or_timeout() {
    let server = RedisServer::start();
    let client = server.client();
    let mut async_conn = client.get_multiplexed_async_connection().await.unwrap();

    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        redis::cmd("SET")
            .arg("flag")
            .arg("1")
            .query_async::<()>(&mut async_conn)
            .await
            .unwrap();
    });
    let mut conn = server.conn();
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || get(&mut conn, "flag")
            .unwrap()
            .is_some())
        .await
    );
    assert!(started.elapsed() >= Duration::from_millis(40));
    writer.await.unwrap();

    let started = Instant::now();
    assert!(!wait_until(Duration::from_millis(100), || false).await);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(100) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );

    let mut calls = 0;
    assert!(
        wait_until(Duration::from_millis(100), || {
            calls += 1;
            calls == 3
        })
        .await
    );
}

#[test]
fn drop_kills_and_cleans_up() {
    let server = RedisServer::start();
    let pid = server.pid().unwrap();
    let dir = server.dir().to_path_buf();
    let port = server.port();
    drop(server);
    assert!(!dir.exists(), "temp dir removed");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || !cfg!(target_os = "linux"));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn many_servers_in_parallel_get_distinct_ports() {
    let servers: Vec<RedisServer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(RedisServer::start)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), servers.len());
    for s in &servers {
        set(&mut s.conn(), "k", &s.port().to_string());
    }
    for s in &servers {
        assert_eq!(get(&mut s.conn(), "k").unwrap(), Some(s.port().to_string()));
    }
}

#[test]
fn restart_waits_for_a_briefly_busy_port() {
    let mut server = RedisServer::start();
    set(&mut server.conn(), "k", "v");
    server.kill();
    // Someone else holds the port for a moment; restart() keeps retrying.
    let blocker =
        std::net::TcpListener::bind(("127.0.0.1", server.port())).expect("bind freed port");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(blocker);
    });
    let started = Instant::now();
    server.restart();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    release.join().unwrap();
    assert_eq!(get(&mut server.conn(), "k").unwrap().as_deref(), Some("v"));
}

#[test]
#[should_panic(expected = "exited during startup")]
fn bad_config_panics_with_the_server_log() {
    let _server = RedisServer::start_with(RedisOptions::new().extra("no-such-option", "1"));
}
