//! The `drain` example as a real process, SIGKILLed in the middle of a drain
//! (not a dropped task: nothing runs after the kill, no destructor, no
//! acknowledgement), then restarted: the rest is delivered, nothing is lost,
//! and the only duplicates are entries that were in flight when it died,
//! sent again with the same idempotency key.
//!
//! Requests are stored through the layer in this process while the
//! heartbeat key is absent; the drains are child processes on the same
//! private Redis (AOF on), delivering to a real HTTP target that records
//! every request. The example is built the way `tests/gateway.rs` builds
//! the gateway (see there): `cargo build --example drain
//! --message-format=json`, and the executable cargo reports.

mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::layer_rig::{call, Buffered, Rig};
use support::{wait_until, RedisServer, Reply};

/// Requests stored before each drain.
const N: usize = 300;
/// `--batch`: entries claimed per read, so the most a crash can redeliver.
const BATCH: usize = 8;
/// Startup of one drain process (the build is not counted).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for anything that should happen.
const EVENTUALLY: Duration = Duration::from_secs(60);
/// How long a killed drain is watched for deliveries it can no longer make.
const QUIET: Duration = Duration::from_millis(500);
/// A request the dead process had fully written before the kill may still
/// be read by the target just after: that much slack.
const KERNEL_SLACK: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------- harness

fn drain_bin() -> &'static Path {
    support::example_binary("drain")
}

/// One running drain process; killed (and its log shown, if the test is
/// failing) when dropped.
struct Drain {
    name: &'static str,
    child: Child,
    /// Every stdout line so far.
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    /// Read the pipes until the process exits.
    readers: Vec<JoinHandle<()>>,
}

impl Drain {
    /// Starts `drain --redis <redis> <flags>` and waits for `drain ready`.
    fn start(name: &'static str, redis: &RedisServer, flags: &[&str]) -> Self {
        let started = Instant::now();
        let mut child = Command::new(drain_bin())
            .args(["--redis", &redis.url()])
            .args(flags)
            .env("RUST_LOG", "info,tower_heartbeat_buffer=debug")
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the drain");

        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = mpsc::channel();
        let pipe = child.stdout.take().unwrap();
        let lines = Arc::clone(&stdout);
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line == "drain ready" {
                    let _ = ready_tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let log = Arc::clone(&stderr);
        let err_reader = std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut drain = Drain {
            name,
            child,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        };
        match ready.recv_timeout(READY_TIMEOUT) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("drain {name} not ready after {READY_TIMEOUT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = drain.child.wait().unwrap();
                panic!("drain {name} exited before ready ({status})");
            }
        }
        eprintln!(
            "drain {name} (pid {}) ready in {:?}",
            drain.child.id(),
            started.elapsed()
        );
        drain
    }

    /// `kill -<signal> <pid>`, as an operator or a supervisor would.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The exit status, once the process has exited within `timeout` (and
    /// its whole output has been read).
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for reader in self.readers.drain(..) {
                    reader.join().unwrap();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL, and wait until the process is gone.
    fn kill_hard(&mut self) {
        self.signal("KILL");
        let status = self
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("drain {} survived SIGKILL", self.name));
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(9), "{status}");
        }
        eprintln!("drain {} SIGKILLed", self.name);
    }

    /// SIGTERM, and expect a clean exit (status 0) within `timeout`.
    fn stop(&mut self, timeout: Duration) {
        let sent = Instant::now();
        self.signal("TERM");
        let status = self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "drain {} still running {timeout:?} after SIGTERM",
                self.name
            )
        });
        eprintln!(
            "drain {} exited {status} {:?} after SIGTERM",
            self.name,
            sent.elapsed()
        );
        assert!(status.success(), "{status}\n{}", self.log());
    }

    fn lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The ids of its `delivered <id> <status>` lines.
    fn delivered(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|l| l.strip_prefix("delivered "))
            .map(|rest| rest.split(' ').next().unwrap().to_owned())
            .collect()
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Drain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- drain {} (pid {}) stdout ---\n{}\n--- stderr ---\n{}",
                self.name,
                self.child.id(),
                self.lines().join("\n"),
                self.log()
            );
        }
    }
}

fn redis(server: &RedisServer, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut server.conn())
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn int(value: redis::Value) -> i64 {
    match value {
        redis::Value::Int(n) => n,
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// How many entries of the buffer are still pending in its consumer group.
fn pending(rig: &Rig) -> i64 {
    match redis(&rig.redis, &["XPENDING", &rig.target.queue_key(), "thb"]) {
        redis::Value::Array(summary) => match summary.first() {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("XPENDING: {other:?}"),
        },
        other => panic!("XPENDING: {other:?}"),
    }
}

/// How many consumers the buffer's consumer group knows.
fn consumers(rig: &Rig) -> usize {
    match redis(
        &rig.redis,
        &["XINFO", "CONSUMERS", &rig.target.queue_key(), "thb"],
    ) {
        redis::Value::Array(consumers) => consumers.len(),
        other => panic!("XINFO CONSUMERS: {other:?}"),
    }
}

/// Stores `n` POSTs (bodies and keys `prefix-00000`...) while the target is
/// down.
async fn buffer(rig: &Rig, service: &mut Buffered, prefix: &str, n: usize) {
    for i in 0..n {
        let key = format!("{prefix}-{i:05}");
        let request = Request::post(format!("{}/o/{i}", rig.http.url()))
            .header("idempotency-key", &key)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(key)))
            .unwrap();
        let out = call(service, request).await.unwrap();
        assert_eq!(out.status, StatusCode::ACCEPTED, "{out:?}");
    }
}

/// The bodies the target received, in arrival order.
fn bodies(rig: &Rig) -> Vec<String> {
    rig.http
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

fn unique(rig: &Rig) -> usize {
    bodies(rig).into_iter().collect::<HashSet<_>>().len()
}

fn expected(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Kills `drain` with SIGKILL once the target has `at_least` requests. When
/// it is the only drain (`alone`), checks that nothing arrives afterwards.
/// Returns what the target had received by then, and when it was dead.
async fn kill_mid_drain(
    rig: &Rig,
    drain: &mut Drain,
    at_least: usize,
    alone: bool,
) -> (Vec<String>, Instant) {
    assert!(
        rig.http.wait_for_requests(at_least, EVENTUALLY).await,
        "only {} delivered",
        rig.http.received_count()
    );
    drain.kill_hard();
    let dead_at = Instant::now();
    if !alone {
        return (bodies(rig), dead_at);
    }
    let late = wait_until(QUIET, || {
        rig.http
            .received()
            .iter()
            .any(|r| r.at > dead_at + KERNEL_SLACK)
    })
    .await;
    assert!(!late, "a delivery arrived after the drain was killed");
    (bodies(rig), dead_at)
}

/// The checks both scenarios share, once every key arrived: the buffer
/// ends empty, every key arrived, at most twice and with at most one
/// batch of duplicates, each a replay with the same key. Returns the
/// duplicated keys, sorted.
async fn check_end_state(rig: &Rig) -> Vec<String> {
    let queue = rig.target.queue_key();
    // The last batch is acknowledged (and removed) just after its delivery.
    assert!(
        wait_until(EVENTUALLY, || int(redis(&rig.redis, &["XLEN", &queue]))
            == 0)
        .await,
        "XLEN {:?}",
        redis(&rig.redis, &["XLEN", &queue])
    );
    assert_eq!(pending(rig), 0, "entries left pending");

    let received = rig.http.received();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &received {
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.headers["idempotency-key"], body.as_str(), "key kept");
        assert_eq!(r.headers["x-heartbeat-replay"], "1");
        *seen.entry(body).or_default() += 1;
    }
    let all: HashSet<String> = expected("k", N).into_iter().collect();
    assert_eq!(
        seen.keys().cloned().collect::<HashSet<_>>(),
        all,
        "every key delivered, nothing else"
    );
    let mut duplicates: Vec<String> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    duplicates.sort();
    assert!(
        seen.values().all(|n| *n <= 2),
        "delivered more than twice: {seen:?}"
    );
    assert!(
        received.len() - N <= BATCH,
        "{} duplicates: {duplicates:?}",
        received.len() - N
    );
    for key in &duplicates {
        let attempts: Vec<_> = received
            .iter()
            .filter(|r| r.body == key.as_bytes())
            .map(|r| {
                r.headers["x-heartbeat-attempt"]
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        eprintln!("duplicate {key}: x-heartbeat-attempt {attempts:?}");
    }
    duplicates
}

// ------------------------------------------------------------------ tests

/// Strict order: SIGKILL after about a third, restart, the rest follows in
/// order once the dead process's lease has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_drain_restarted_delivers_the_rest_in_order_duplicating_only_in_flight() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "k", N).await;
    // A few ms per delivery, so the drain takes a while.
    rig.http.set_reply(Reply::Delay(Duration::from_millis(3)));
    rig.up().await;
    let flags = [
        "--service",
        "orders",
        "--batch",
        "8",
        "--lease-ttl-ms",
        "1000",
    ];
    let started = Instant::now();
    let mut first = Drain::start("first", &rig.redis, &flags);

    let (before, _) = kill_mid_drain(&rig, &mut first, N / 3, true).await;
    let killed = started.elapsed();
    assert!(before.len() < N, "finished before the kill");
    assert_eq!(before, expected("k", before.len()), "FIFO before the kill");
    // Strict order acknowledges a batch at a time: what may come again is
    // the tail of what was delivered, at most one batch.
    let in_flight: HashSet<String> = before[before.len().saturating_sub(BATCH)..]
        .iter()
        .cloned()
        .collect();
    let restarted = Instant::now();
    let mut second = Drain::start("second", &rig.redis, &flags);
    assert!(
        wait_until(EVENTUALLY, || unique(&rig) == N).await,
        "only {} of {N} keys delivered",
        unique(&rig)
    );
    let finished = restarted.elapsed();
    let duplicates = check_end_state(&rig).await;
    for key in &duplicates {
        assert!(
            in_flight.contains(key),
            "{key} delivered twice but was not in flight at the kill {in_flight:?}"
        );
    }

    // First deliveries, in order: FIFO across the kill.
    let all = bodies(&rig);
    let mut firsts = Vec::new();
    let mut seen = HashSet::new();
    for body in &all {
        if seen.insert(body.clone()) {
            firsts.push(body.clone());
        }
    }
    assert_eq!(firsts, expected("k", N), "first deliveries in FIFO order");
    // The restarted drain starts with the entries the dead one held.
    let after = &all[before.len()..];
    assert_eq!(
        after[..duplicates.len()],
        duplicates[..],
        "redelivered first, in order"
    );

    // It stops cleanly, giving the lease up, and told every delivery.
    second.stop(Duration::from_secs(10));
    assert_eq!(
        int(redis(&rig.redis, &["EXISTS", &rig.target.lease_key()])),
        0,
        "lease given up"
    );
    assert_eq!(second.delivered(), after, "one stdout line per delivery");
    let lines = second.lines();
    assert_eq!(
        lines.last().map(String::as_str),
        Some(format!("stopped delivered={}", after.len()).as_str())
    );
    eprintln!(
        "strict: killed after {} deliveries ({killed:?} after start); restarted drain \
         delivered {} in {finished:?}; {} duplicates {duplicates:?}; \
         {} consumers left in the group",
        before.len(),
        after.len(),
        duplicates.len(),
        consumers(&rig)
    );
}

/// Relaxed order: two drains at once, one SIGKILLed mid-way; the survivor
/// takes over what the dead one had claimed (after `--visibility-ms`) and
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relaxed_drains_one_sigkilled_lose_nothing() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "k", N).await;
    rig.http.set_reply(Reply::Delay(Duration::from_millis(3)));
    let flags = [
        "--service",
        "orders",
        "--relaxed",
        "--batch",
        "8",
        "--visibility-ms",
        "1000",
        "--max-per-second",
        "100",
    ];
    // Both wait for the heartbeat, then start together.
    let mut a = Drain::start("a", &rig.redis, &flags);
    let mut b = Drain::start("b", &rig.redis, &flags);
    let started = Instant::now();
    rig.up().await;

    let (before, dead_at) = kill_mid_drain(&rig, &mut a, N / 3, false).await;
    let killed = started.elapsed();
    let b_at_kill: HashSet<String> = b.delivered().into_iter().collect();
    assert!(before.len() < N, "finished before the kill");
    let by_a = a.delivered();
    assert!(!by_a.is_empty(), "a delivered nothing before the kill");

    assert!(
        wait_until(EVENTUALLY, || unique(&rig) == N).await,
        "only {} of {N} keys delivered",
        unique(&rig)
    );
    let finished = started.elapsed();
    let duplicates = check_end_state(&rig).await;
    b.stop(Duration::from_secs(10));
    let by_b = b.delivered();
    assert!(by_b.len() > N - before.len(), "b drained the rest");
    // A relaxed drain acknowledges a batch once all of it is answered: what
    // a delivered in its last batch may come again, from b. So each
    // duplicate went first before a died and again after; b had not
    // reported it by then; and a had not reported it before its last batch
    // (its stdout may lag behind its deliveries, so not-reported-by-a is
    // allowed too).
    let acked_by_a: HashSet<&String> = by_a[..by_a.len().saturating_sub(BATCH)].iter().collect();
    let received = rig.http.received();
    for key in &duplicates {
        let at: Vec<Instant> = received
            .iter()
            .filter(|r| r.body == key.as_bytes())
            .map(|r| r.at)
            .collect();
        assert!(
            at[0] <= dead_at + KERNEL_SLACK && at[1] > dead_at,
            "{key}: not a redelivery of what a had in flight"
        );
        assert!(!b_at_kill.contains(key), "{key}: b delivered it twice");
        assert!(
            !acked_by_a.contains(key),
            "{key}: a delivered it before its last batch"
        );
    }
    eprintln!(
        "relaxed: a delivered {} (killed at {killed:?}, {} in all by then), b {}; \
         all {N} in {finished:?}; {} duplicates {duplicates:?}",
        by_a.len(),
        before.len(),
        by_b.len(),
        duplicates.len()
    );
}

/// The drain's stdout, line by line: a hung target times out (`--timeout-ms`
/// defaults to half the lease) and is retried, a 400 is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_tells_timeouts_retries_deliveries_and_dead_letters() {
    let rig = Rig::start().await;
    rig.down().await;
    let mut service = rig.service(|b| b).await;
    buffer(&rig, &mut service, "t", 1).await;
    rig.http.set_reply(Reply::Hang);
    let drain = Drain::start(
        "events",
        &rig.redis,
        &["--service", "orders", "--lease-ttl-ms", "1000"],
    );
    let has_line = |prefix: &str| drain.lines().iter().any(|l| l.starts_with(prefix));
    rig.up().await;

    assert!(wait_until(EVENTUALLY, || has_line("retrying t-00000 attempt=1 ")).await);
    let hung_at = rig.http.received()[0].at;
    let retrying = drain
        .lines()
        .into_iter()
        .find(|l| l.starts_with("retrying t-00000"))
        .unwrap();
    let waited = hung_at.elapsed();
    assert!(retrying.contains("no answer"), "{retrying}");
    assert!(
        waited >= Duration::from_millis(450),
        "gave up after {waited:?}"
    );
    rig.http.set_reply(Reply::Ok);
    assert!(wait_until(EVENTUALLY, || has_line("delivered t-00000 200")).await);
    let second = rig.http.received()[1].clone();
    assert_eq!(second.headers["idempotency-key"], "t-00000");
    assert_eq!(second.headers["x-heartbeat-attempt"], "2");

    // Down again, one more stored, and the target now refuses it.
    rig.down().await;
    buffer(&rig, &mut service, "d", 1).await;
    rig.http.set_reply(Reply::Status(StatusCode::BAD_REQUEST));
    rig.up().await;
    assert!(wait_until(EVENTUALLY, || has_line("dead d-00000 ")).await);
    let dead = drain
        .lines()
        .into_iter()
        .find(|l| l.starts_with("dead d-00000"))
        .unwrap();
    assert!(dead.contains("400"), "{dead}");
    assert_eq!(
        int(redis(&rig.redis, &["XLEN", &rig.target.dead_letter_key()])),
        1
    );
    eprintln!("{}", drain.lines().join("\n"));
}
