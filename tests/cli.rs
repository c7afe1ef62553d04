#![cfg(feature = "cli")]
//! The `thb` admin tool as a child process, against a real Redis holding
//! what the library wrote: a buffer filled while the target was down, dead
//! letters made by a replayer, heartbeats of a multi-instance target.

mod support;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use redis::Commands;
use serde_json::Value as Json;
use support::layer_rig::{call, fast_replay, Buffered, Rig};
use support::{hyper_client, wait_until, RedisServer, Reply};
use tower_heartbeat_buffer::replay::{DeadLetters, ReplayHandle};
use tower_heartbeat_buffer::{HeartbeatBufferLayer, Status, Target};

const EVENTUALLY: Duration = Duration::from_secs(30);

/// What one run of `thb` gave.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "thb failed: {self:?}");
        assert!(self.stderr.is_empty(), "{self:?}");
        self
    }

    fn json(self) -> Json {
        let run = self.ok();
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout))
    }

    /// The table line whose first cell is `first`, split on whitespace.
    fn row(&self, first: &str) -> Vec<String> {
        self.stdout
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|cells| cells.first().map(String::as_str) == Some(first))
            .unwrap_or_else(|| panic!("no row {first:?} in:\n{}", self.stdout))
    }
}

/// Runs `thb ARGS` (with `$REDIS_URL` unset).
fn thb(args: &[&str]) -> Run {
    let run = || {
        let output = Command::new(env!("CARGO_BIN_EXE_thb"))
            .args(args)
            .env_remove("REDIS_URL")
            .output()
            .expect("run thb");
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(run),
        Err(_) => run(),
    }
}

/// Runs `thb --redis URL ARGS`.
fn thb_at(redis: &RedisServer, args: &[&str]) -> Run {
    let url = redis.url();
    let mut all = vec!["--redis", url.as_str()];
    all.extend_from_slice(args);
    thb(&all)
}

/// Stores one request per `(method, path)` while the target is down, with
/// keys and bodies `{prefix}-{i}`.
async fn buffer(rig: &Rig, service: &mut Buffered, prefix: &str, calls: &[(&str, &str)]) {
    for (i, (method, path)) in calls.iter().enumerate() {
        let request = Request::builder()
            .method(*method)
            .uri(format!("{}{path}", rig.http.url()))
            .header("idempotency-key", format!("{prefix}-{i}"))
            .body(Full::new(Bytes::from(format!("{prefix}-{i}\nbody"))))
            .unwrap();
        let out = call(service, request).await.unwrap();
        assert_eq!(out.status, StatusCode::ACCEPTED, "{out:?}");
    }
}

/// Bytes written into the queue by hand: not an entry the library can read.
fn add_poison(redis: &RedisServer, target: &Target) -> String {
    redis
        .conn()
        .xadd(
            target.queue_key(),
            "*",
            &[("v", "99"), ("id", "from-the-future")],
        )
        .unwrap()
}

fn stream_ids(redis: &RedisServer, key: &str) -> Vec<String> {
    let reply: redis::streams::StreamRangeReply = redis.conn().xrange_all(key).unwrap();
    reply.ids.into_iter().map(|e| e.id).collect()
}

fn xlen(redis: &RedisServer, key: &str) -> u64 {
    redis.conn().xlen(key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_status_and_peek_show_what_the_library_stored() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(
        &rig,
        &mut service,
        "k",
        &[
            ("POST", "/orders/0"),
            ("PUT", "/orders/1?x=1"),
            ("DELETE", "/orders/2"),
        ],
    )
    .await;
    add_poison(&rig.redis, &rig.target);
    let ids = stream_ids(&rig.redis, &rig.target.queue_key());
    assert_eq!(ids.len(), 4);

    // A replayer that read one entry and has not answered yet.
    let mut conn = rig.redis.conn();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(rig.target.queue_key())
        .arg("thb")
        .arg("0")
        .query(&mut conn)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("thb")
        .arg("inspector")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(rig.target.queue_key())
        .arg(">")
        .query(&mut conn)
        .unwrap();

    // A second target with two instances, one of them draining.
    let billing = Target::new("billing").unwrap();
    let pod1 = tower_heartbeat_buffer::Heartbeat::builder(billing.clone())
        .instance("pod-1")
        .ttl(Duration::from_secs(30))
        .start(rig.redis.client())
        .unwrap();
    let pod2 = tower_heartbeat_buffer::Heartbeat::builder(billing.clone())
        .instance("pod-2")
        .ttl(Duration::from_secs(30))
        .start(rig.redis.client())
        .unwrap();
    pod1.wait_published().await;
    pod2.wait_published().await;
    pod2.set_status(Status::Draining).await.unwrap();

    // The table.
    let run = thb_at(&rig.redis, &["targets"]).ok();
    let header = run.stdout.lines().next().unwrap().to_owned();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["TARGET", "STATE", "ALIVE", "TTL", "QUEUE", "OLDEST", "PENDING", "DEAD"],
        "{}",
        run.stdout
    );
    let orders = run.row("orders");
    assert_eq!(
        &orders[..5],
        ["orders", "down", "0/0", "-", "4"],
        "{}",
        run.stdout
    );
    assert_ne!(orders[5], "-", "an oldest age: {}", run.stdout);
    assert_eq!(&orders[6..], ["1", "0"], "{}", run.stdout);
    let billing_row = run.row("billing");
    assert_eq!(
        &billing_row[..3],
        ["billing", "up", "1/2"],
        "{}",
        run.stdout
    );
    assert_eq!(&billing_row[4..], ["0", "-", "0", "0"], "{}", run.stdout);
    // Columns line up: every row is as wide as the header up to DEAD.
    let dead_end = header.len();
    for line in run.stdout.lines() {
        assert_eq!(line.len(), dead_end, "misaligned:\n{}", run.stdout);
    }

    // The same as JSON.
    let json = thb_at(&rig.redis, &["--json", "targets"]).json();
    let all = json.as_array().unwrap();
    assert_eq!(all.len(), 2, "{json:#}");
    let orders = all.iter().find(|t| t["target"] == "orders").unwrap();
    assert_eq!(orders["state"], "down");
    assert_eq!(orders["queue"], 4);
    assert_eq!(orders["pending"], 1);
    assert_eq!(orders["dead"], 0);
    assert_eq!(orders["oldest_entry_id"], ids[0].as_str());
    assert!(
        orders["oldest_age_ms"].as_u64().unwrap() < 60_000,
        "{orders}"
    );
    assert_eq!(orders["ttl_ms"], Json::Null);
    let billing_json = all.iter().find(|t| t["target"] == "billing").unwrap();
    assert_eq!(billing_json["state"], "up");
    assert_eq!(billing_json["alive"], 1);
    assert_eq!(billing_json["heartbeat_keys"], 2);
    let ttl = billing_json["ttl_ms"].as_i64().unwrap();
    assert!(ttl > 0 && ttl <= 30_000, "{billing_json}");
    // `--json` may come first or after the command; another namespace is empty.
    let json = thb_at(&rig.redis, &["targets", "--json", "--namespace", "other"]).json();
    assert_eq!(json, Json::Array(Vec::new()));
    let run = thb_at(&rig.redis, &["--namespace", "other", "targets"]).ok();
    assert_eq!(run.stdout, "no targets in namespace other\n");

    // Status: heartbeat keys, consumers.
    let run = thb_at(&rig.redis, &["status", "billing"]).ok();
    assert!(
        run.stdout.contains("thb:{billing}:hb:pod-1"),
        "{}",
        run.stdout
    );
    assert_eq!(run.row("state"), ["state", "up"]);
    let pod2_row = run.row("thb:{billing}:hb:pod-2");
    assert_eq!(pod2_row[2], "draining", "{}", run.stdout);
    assert_eq!(pod2_row[4], "no", "{}", run.stdout);
    let run = thb_at(&rig.redis, &["status", "orders"]).ok();
    let inspector = run.row("inspector");
    assert_eq!(inspector[1], "1", "{}", run.stdout);
    let json = thb_at(&rig.redis, &["status", "orders", "--json"]).json();
    assert_eq!(json["target"], "orders");
    assert_eq!(json["queue"], 4);
    assert_eq!(json["lease"], Json::Null);
    assert_eq!(json["consumers"][0]["name"], "inspector");
    assert_eq!(json["consumers"][0]["pending"], 1);

    // Peek: oldest first, decoded; the poison entry shown with its error.
    let run = thb_at(&rig.redis, &["peek", "orders", "-n", "2"]).ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    let first = run.row(&ids[0]);
    assert_eq!(first[2], "POST");
    assert!(first[3].ends_with("/orders/0"), "{}", run.stdout);
    assert_eq!(first[4], "k-0");
    assert!(
        run.stdout.contains("k-0\\nbody"),
        "escaped body: {}",
        run.stdout
    );
    let second = run.row(&ids[1]);
    assert_eq!(second[2], "PUT");
    assert!(second[3].ends_with("/orders/1?x=1"), "{}", run.stdout);
    assert!(!run.stdout.contains("/orders/2"), "{}", run.stdout);

    let run = thb_at(&rig.redis, &["peek", "orders"]).ok();
    assert_eq!(run.stdout.lines().count(), 5, "{}", run.stdout);
    assert_eq!(run.row(&ids[2])[2], "DELETE");
    let poison = run.row(&ids[3]);
    assert_eq!(poison[2], "MALFORMED", "{}", run.stdout);
    assert!(
        run.stdout.contains("unsupported encoding version"),
        "{}",
        run.stdout
    );

    let json = thb_at(&rig.redis, &["--json", "peek", "orders"]).json();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 4);
    let methods: Vec<&str> = entries[..3]
        .iter()
        .map(|e| e["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["POST", "PUT", "DELETE"]);
    assert_eq!(entries[0]["entry_id"], ids[0].as_str());
    assert_eq!(entries[0]["id"], "k-0");
    assert_eq!(entries[0]["body_bytes"], 8);
    assert_eq!(entries[0]["body_preview"], "k-0\\nbody");
    assert_eq!(entries[0]["attempts"], 0);
    assert!(entries[3]["error"]
        .as_str()
        .unwrap()
        .contains("unsupported encoding version"));

    // Read-only: nothing changed.
    assert_eq!(xlen(&rig.redis, &rig.target.queue_key()), 4);
    pod1.shutdown().await.unwrap();
    pod2.shutdown().await.unwrap();
}

/// Dead-letters what the queue holds: the target answers 422 to everything.
async fn dead_letter_everything(rig: &Rig, expected: u64) {
    rig.http
        .set_reply(Reply::Status(StatusCode::UNPROCESSABLE_ENTITY));
    let layer = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&rig.watcher)
        .await
        .unwrap();
    let replay: ReplayHandle = layer.replayer().config(fast_replay()).spawn(hyper_client::<
        tower_heartbeat_buffer::RequestBody<Full<Bytes>>,
    >());
    rig.up().await;
    let dead_key = rig.target.dead_letter_key();
    let queue_key = rig.target.queue_key();
    assert!(
        wait_until(EVENTUALLY, || xlen(&rig.redis, &dead_key) == expected
            && xlen(&rig.redis, &queue_key) == 0)
        .await,
        "dead letters: {}",
        xlen(&rig.redis, &dead_key)
    );
    replay.shutdown().await;
    rig.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_requeued_and_purged() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(
        &rig,
        &mut service,
        "d",
        &[("POST", "/d/0"), ("PATCH", "/d/1"), ("POST", "/d/2")],
    )
    .await;
    add_poison(&rig.redis, &rig.target);
    dead_letter_everything(&rig, 4).await;
    let dead_key = rig.target.dead_letter_key();
    let queue_key = rig.target.queue_key();
    let dead_ids = stream_ids(&rig.redis, &dead_key);

    // List.
    let run = thb_at(&rig.redis, &["dead", "list", "orders"]).ok();
    assert_eq!(run.stdout.lines().count(), 5, "{}", run.stdout);
    let first = run.row(&dead_ids[0]);
    let uri = format!("{}/d/0", rig.http.url());
    assert_eq!(
        &first[2..5],
        ["d-0", "POST", uri.as_str()],
        "{}",
        run.stdout
    );
    assert!(first[5..].join(" ").contains("422"), "{}", run.stdout);
    assert!(run
        .row(&dead_ids[3])
        .join(" ")
        .contains("unsupported encoding version"));
    let run = thb_at(&rig.redis, &["dead", "list", "orders", "-n", "2"]).ok();
    assert_eq!(run.stdout.lines().count(), 4, "{}", run.stdout);
    assert!(run.stdout.ends_with("(2 more; see -n)\n"), "{}", run.stdout);

    let json = thb_at(&rig.redis, &["--json", "dead", "list", "orders"]).json();
    let letters = json.as_array().unwrap();
    assert_eq!(letters.len(), 4);
    assert_eq!(letters[1]["entry_id"], dead_ids[1].as_str());
    assert_eq!(letters[1]["id"], "d-1");
    assert_eq!(letters[1]["method"], "PATCH");
    assert!(letters[1]["reason"].as_str().unwrap().contains("422"));
    assert!(letters[3]["error"].as_str().unwrap().contains("malformed"));
    assert!(letters[3]["source_id"].as_str().unwrap().contains('-'));

    let summary = thb_at(&rig.redis, &["--json", "targets"]).json();
    assert_eq!(summary[0]["dead"], 4);
    assert_eq!(summary[0]["queue"], 0);

    // Requeue one: back at the end of the queue, decodable, same key.
    let run = thb_at(&rig.redis, &["dead", "requeue", "orders", &dead_ids[0]]).ok();
    assert!(
        run.stdout.contains("requeued 1 dead letter"),
        "{}",
        run.stdout
    );
    assert_eq!(xlen(&rig.redis, &queue_key), 1);
    assert_eq!(xlen(&rig.redis, &dead_key), 3);
    let stored = rig.stored();
    assert_eq!(stored[0].id, "d-0");
    let again = thb_at(&rig.redis, &["dead", "requeue", "orders", &dead_ids[0]]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("no such dead letter"), "{again:?}");
    assert!(again.stdout.is_empty());

    // Purge one.
    let json = thb_at(
        &rig.redis,
        &["--json", "dead", "purge", "orders", &dead_ids[1]],
    )
    .json();
    assert_eq!(json["purged"], 1);
    assert_eq!(xlen(&rig.redis, &dead_key), 2);
    let again = thb_at(&rig.redis, &["dead", "purge", "orders", &dead_ids[1]]);
    assert_eq!(again.code, 1, "{again:?}");

    // Requeue the rest.
    let run = thb_at(&rig.redis, &["dead", "requeue", "orders", "--all"]).ok();
    assert!(
        run.stdout.contains("requeued 2 dead letters"),
        "{}",
        run.stdout
    );
    assert_eq!(xlen(&rig.redis, &dead_key), 0);
    assert_eq!(xlen(&rig.redis, &queue_key), 3);
    let run = thb_at(&rig.redis, &["dead", "list", "orders"]).ok();
    assert_eq!(run.stdout, "orders has no dead letters\n");

    // Dead-lettered again, then purged all at once.
    dead_letter_everything(&rig, 3).await;
    let dead = DeadLetters::new(rig.redis.client(), &rig.target).unwrap();
    assert_eq!(dead.len().await.unwrap(), 3);
    let json = thb_at(&rig.redis, &["dead", "purge", "orders", "--all", "--json"]).json();
    assert_eq!(json["purged"], 3);
    assert!(dead.is_empty().await.unwrap());

    // Neither an id nor --all, or both: a usage error.
    assert_eq!(thb_at(&rig.redis, &["dead", "purge", "orders"]).code, 2);
    let both = thb_at(&rig.redis, &["dead", "purge", "orders", "1-0", "--all"]);
    assert_eq!(both.code, 2, "{both:?}");
    let bad_id = thb_at(&rig.redis, &["dead", "requeue", "orders", "latest"]);
    assert_eq!(bad_id.code, 2, "{bad_id:?}");
    assert!(
        bad_id
            .stderr
            .starts_with("thb: invalid entry id \"latest\""),
        "{bad_id:?}"
    );
}

/// One line on stderr, `thb: cannot reach redis at <url>: <reason>`, exit 1.
fn assert_unreachable(run: &Run, shown_url: &str) {
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    let prefix = format!("thb: cannot reach redis at {shown_url}: ");
    assert!(run.stderr.starts_with(&prefix), "{run:?}");
    assert!(run.stderr.len() > prefix.len() + 1, "a reason: {run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
}

#[test]
fn a_wrong_url_is_one_clear_line_and_exit_1() {
    // Refused: a port that was free a moment ago.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let started = Instant::now();
    let run = thb(&["--redis", &url, "targets"]);
    assert_unreachable(&run, &url);
    assert!(started.elapsed() < Duration::from_secs(10));

    // Not a URL.
    assert_unreachable(&thb(&["--redis", "not a url", "targets"]), "not a url");
    assert_unreachable(
        &thb(&["--redis", "http://127.0.0.1:1/", "peek", "orders"]),
        "http://127.0.0.1:1/",
    );

    // A server that refuses the credentials: the password is not printed.
    let redis = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("admin")
        .arg("on")
        .arg(">right")
        .arg("~*")
        .arg("+@all")
        .query(&mut redis.conn())
        .unwrap();
    let url = format!("redis://admin:wrong@127.0.0.1:{}/", redis.port());
    let run = thb(&["--redis", &url, "targets"]);
    assert_unreachable(
        &run,
        &format!("redis://admin:***@127.0.0.1:{}/", redis.port()),
    );
    assert!(!run.stderr.contains("wrong"), "{run:?}");
    // The right one works.
    let url = format!("redis://admin:right@127.0.0.1:{}/", redis.port());
    thb(&["--redis", &url, "targets"]).ok();

    // From $REDIS_URL too; and none at all is a usage error.
    let output = Command::new(env!("CARGO_BIN_EXE_thb"))
        .arg("targets")
        .env("REDIS_URL", redis.url())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let run = thb(&["targets"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        run.stderr,
        "thb: no redis URL: pass --redis URL or set REDIS_URL\n"
    );
}

#[test]
fn invalid_names_exit_2_and_unknown_targets_exit_1() {
    let redis = RedisServer::start();

    let run = thb_at(&redis, &["--namespace", "my ns", "targets"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        run.stderr,
        "thb: invalid namespace \"my ns\": contains whitespace\n"
    );
    let run = thb_at(&redis, &["--namespace", "a*", "status", "orders"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.starts_with("thb: invalid namespace \"a*\""),
        "{run:?}"
    );
    for args in [
        &["status", "or{d}ers"][..],
        &["peek", "a b"],
        &["dead", "list", "x*"],
        &["dead", "purge", "", "--all"],
    ] {
        let run = thb_at(&redis, args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
        assert!(
            run.stderr.starts_with("thb: invalid target name"),
            "{run:?}"
        );
    }
    // Names are checked before Redis is needed.
    let run = thb(&[
        "--redis",
        "redis://127.0.0.1:1/",
        "--namespace",
        "a b",
        "targets",
    ]);
    assert_eq!(run.code, 2, "{run:?}");

    for args in [
        &["status", "nobody"][..],
        &["peek", "nobody"],
        &["dead", "list", "nobody"],
        &["dead", "requeue", "nobody", "--all"],
    ] {
        let run = thb_at(&redis, args);
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert!(
            run.stderr.starts_with("thb: no such target \"nobody\""),
            "{run:?}"
        );
    }
    // A target in another namespace is not this one's.
    let _: () = redis.conn().set("thb:{nobody}:hb", 1).unwrap();
    thb_at(&redis, &["status", "nobody"]).ok();
    let run = thb_at(&redis, &["--namespace", "other", "status", "nobody"]);
    assert_eq!(run.code, 1, "{run:?}");
}
