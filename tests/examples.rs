//! Every example a user meets first, run as a child process the way a user
//! runs it, against a private `redis-server` ([`RedisServer`]) named by
//! `REDIS_URL` — or, for the demo, with no `REDIS_URL` at all, so that it
//! starts its own.
//!
//! The examples are built the way `tests/gateway.rs` builds the gateway:
//! one `$CARGO build --example ... --message-format=json-render-diagnostics`
//! for all of them (once per test binary), taking the `executable` path
//! cargo reports for each. Every run has a time limit; waits are on the
//! child's own output and exit, never fixed sleeps.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use support::{RedisOptions, RedisServer};

/// Longest run of the demo (it promises under 30 s).
const DEMO_LIMIT: Duration = Duration::from_secs(40);
/// Longest run of a wiring example, or wait for the heartbeat's line.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// Longest wait for an exit after a signal.
const EXIT_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- harness

/// The executable of example `name`, built (with all the others) on first use.
fn example(name: &str) -> &'static Path {
    support::example_binary(name)
}

/// One running example. Killed (and its output shown, if the test is
/// failing) when dropped.
struct Proc {
    name: &'static str,
    pid: u32,
    started: Instant,
    /// Stdout lines as they come.
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    /// The exit status, sent by the thread that waits for the child.
    exit: mpsc::Receiver<ExitStatus>,
    status: Option<ExitStatus>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// What an example printed, and how it ended.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Proc {
    /// Starts example `name` with `args`; `REDIS_URL` is removed from its
    /// environment unless `env` sets it (as are all `remove`d variables).
    fn start(name: &'static str, args: &[&str], env: &[(&str, &str)], remove: &[&str]) -> Self {
        let mut command = Command::new(example(name));
        command
            .args(args)
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for variable in remove {
            command.env_remove(variable);
        }
        for (variable, value) in env {
            command.env(variable, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {name} example: {e}"));
        let pid = child.id();
        let started = Instant::now();

        let (lines_tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().unwrap();
        let all = Arc::clone(&stdout);
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut all = all.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
                let _ = lines_tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let all = Arc::clone(&stderr);
        let err_reader = std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                all.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (exit_tx, exit) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait().expect("wait for the example");
            let _ = exit_tx.send(status);
        });
        Proc {
            name,
            pid,
            started,
            lines,
            stdout,
            stderr,
            exit,
            status: None,
            readers: vec![out_reader, err_reader],
        }
    }

    /// Waits for a stdout line starting with `prefix`, and returns it.
    fn wait_line(&self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{}: no line `{prefix}...` within {limit:?}", self.name)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("{}: exited before printing `{prefix}...`", self.name)
                }
            }
        }
    }

    /// `kill -<signal> <pid>`, as a terminal or a supervisor would. The pid
    /// is still ours: the child is reaped only by the thread waiting for it.
    fn signal(&self, signal: &str) {
        if self.status.is_some() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .stderr(Stdio::null())
            .status();
    }

    /// The exit within `limit`; otherwise SIGTERM (so that the example can
    /// clean up, e.g. stop its private Redis), SIGKILL, and a panic.
    fn finish(mut self, limit: Duration) -> Finished {
        let status = match self.exit.recv_timeout(limit) {
            Ok(status) => status,
            Err(_) => {
                self.signal("TERM");
                match self.exit.recv_timeout(EXIT_LIMIT) {
                    Ok(status) => self.status = Some(status),
                    Err(_) => self.signal("KILL"), // and Drop waits for it
                }
                panic!("{} did not exit within {limit:?}", self.name);
            }
        };
        self.status = Some(status);
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        Finished {
            status,
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.signal("KILL");
            let _ = self.exit.recv_timeout(EXIT_LIMIT);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
                self.name,
                self.stdout.lock().unwrap(),
                self.name,
                self.stderr.lock().unwrap()
            );
        }
    }
}

/// Runs example `name` to its end within `limit`.
fn run(name: &'static str, env: &[(&str, &str)], remove: &[&str], limit: Duration) -> Finished {
    let finished = Proc::start(name, &[], env, remove).finish(limit);
    eprintln!(
        "{name}: {} in {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        finished.status, finished.elapsed, finished.stdout, finished.stderr
    );
    finished
}

/// The numbers of the demo's last line, `tally: sent=N forwarded=A ...`.
fn tally(stdout: &str) -> HashMap<String, u64> {
    let last = stdout.lines().last().unwrap_or_default();
    let fields = last
        .strip_prefix("tally: ")
        .unwrap_or_else(|| panic!("the last line is not the tally: {last:?}"));
    let tally: HashMap<String, u64> = fields
        .split(' ')
        .map(|field| {
            let (name, value) = field.split_once('=').expect("name=value");
            (name.to_owned(), value.parse().expect("a count"))
        })
        .collect();
    for name in ["sent", "forwarded", "buffered", "delivered", "lost"] {
        assert!(tally.contains_key(name), "no {name} in {last:?}");
    }
    tally
}

/// What every successful demo run shows.
fn assert_demo_succeeded(finished: &Finished) {
    assert!(finished.status.success(), "demo: {}", finished.status);
    assert!(
        finished.elapsed < Duration::from_secs(30),
        "the demo took {:?}",
        finished.elapsed
    );
    let tally = tally(&finished.stdout);
    assert_eq!(tally["lost"], 0, "{tally:?}");
    assert!(tally["buffered"] > 0, "{tally:?}");
    assert!(tally["delivered"] >= tally["buffered"], "{tally:?}");
    assert!(tally["forwarded"] > 0, "{tally:?}");
    assert_eq!(
        tally["sent"],
        tally["forwarded"] + tally["buffered"],
        "{tally:?}"
    );
}

fn dbsize(server: &RedisServer) -> u64 {
    redis::cmd("DBSIZE").query(&mut server.conn()).unwrap()
}

fn exists(server: &RedisServer, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query(&mut server.conn())
        .unwrap()
}

// ------------------------------------------------------------------ demo

#[test]
fn demo_against_redis_url() {
    let server = RedisServer::start();
    let finished = run("demo", &[("REDIS_URL", &server.url())], &[], DEMO_LIMIT);
    assert_demo_succeeded(&finished);
    assert_eq!(dbsize(&server), 0, "the demo left keys behind");
}

#[test]
fn demo_starts_its_own_redis_without_redis_url() {
    let bin = support::redis_server_bin();
    let finished = run(
        "demo",
        &[("REDIS_SERVER_BIN", bin.to_str().unwrap())],
        &["REDIS_URL"],
        DEMO_LIMIT,
    );
    assert_demo_succeeded(&finished);

    // `redis:  no REDIS_URL, so a private redis-server (pid N) on 127.0.0.1:PORT`
    // `        data in DIR (AOF, ...`
    let out = &finished.stdout;
    assert!(out.contains("private redis-server"), "{out}");
    let after = |marker: &str| {
        let rest = &out[out.find(marker).expect(marker) + marker.len()..];
        rest.split([' ', ')', '\n']).next().unwrap().to_owned()
    };
    let pid = after("(pid ");
    let port: u16 = after("on 127.0.0.1:").parse().unwrap();
    let dir = after("data in ");
    assert_ne!(port, 6379);
    if Path::new("/proc/self").exists() {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "the demo's redis-server (pid {pid}) outlived it"
        );
    }
    assert!(!Path::new(&dir).exists(), "{dir} was not removed");
}

#[test]
fn demo_without_any_redis_says_how_to_install_one() {
    let finished = run(
        "demo",
        &[("PATH", ""), ("REDIS_SERVER_BIN", "")],
        &["REDIS_URL"],
        RUN_LIMIT,
    );
    assert!(!finished.status.success());
    assert!(
        finished
            .stderr
            .contains("sudo apt-get install redis-server"),
        "{}",
        finished.stderr
    );
}

/// Without keyspace notifications the watcher must still see the heartbeat
/// come back (at its reconciliation) while the buffer is not empty. (It once
/// did not: the 100 ms backlog polls postponed every reconciliation, so the
/// replayer never resumed and the demo ended with `lost=4`.)
#[test]
fn demo_against_redis_without_keyspace_notifications() {
    let server = RedisServer::start_with(RedisOptions::new().notifications(None));
    let finished = run("demo", &[("REDIS_URL", &server.url())], &[], DEMO_LIMIT);
    assert_demo_succeeded(&finished);
}

// ------------------------------------------------------------- heartbeat

#[test]
fn heartbeat_lives_until_sigterm_then_is_deleted() {
    let server = RedisServer::start();
    let url = server.url();
    let heartbeat = Proc::start(
        "heartbeat",
        &["--service", "billing", "--ttl-ms", "3000"],
        &[("REDIS_URL", &url)],
        &[],
    );
    let key = "thb:{billing}:hb";
    heartbeat.wait_line(&format!("heartbeat {key} up"), RUN_LIMIT);
    assert!(exists(&server, key));
    let pttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query(&mut server.conn())
        .unwrap();
    assert!((1..=3000).contains(&pttl), "PTTL {pttl}");

    heartbeat.signal("TERM");
    let finished = heartbeat.finish(EXIT_LIMIT);
    assert!(finished.status.success(), "{}", finished.status);
    assert!(!exists(&server, key), "the heartbeat outlived SIGTERM");
}

#[test]
fn heartbeat_of_an_instance_is_deleted_on_ctrl_c() {
    let server = RedisServer::start();
    let heartbeat = Proc::start(
        "heartbeat",
        &[
            "--redis",
            &server.url(),
            "--service",
            "billing",
            "--instance",
            "b-1",
            "--namespace",
            "acme",
        ],
        &[],
        &[],
    );
    let key = "acme:{billing}:hb:b-1";
    heartbeat.wait_line(&format!("heartbeat {key} up"), RUN_LIMIT);
    let status: String = redis::cmd("HGET")
        .arg(key)
        .arg("status")
        .query(&mut server.conn())
        .unwrap();
    assert_eq!(status, "up");

    heartbeat.signal("INT");
    let finished = heartbeat.finish(EXIT_LIMIT);
    assert!(finished.status.success(), "{}", finished.status);
    assert!(!exists(&server, key), "the heartbeat outlived SIGINT");
}

// ------------------------------------------------------- wiring examples

/// Runs a wiring example against a fresh server: exit 0, the three steps
/// shown, and no key left behind. Returns its stdout.
fn wiring_example(name: &'static str) -> String {
    let server = RedisServer::start();
    let finished = run(name, &[("REDIS_URL", &server.url())], &[], RUN_LIMIT);
    assert!(finished.status.success(), "{name}: {}", finished.status);
    let out = &finished.stdout;
    assert!(out.contains("201 Created"), "{name}: nothing forwarded");
    assert!(out.contains("202 Accepted"), "{name}: nothing buffered");
    assert!(out.contains("replayed "), "{name}: nothing replayed");
    assert_eq!(dbsize(&server), 0, "{name} left keys behind");
    finished.stdout
}

#[test]
fn hyper_client_example() {
    wiring_example("hyper_client");
}

#[test]
fn reqwest_client_example() {
    wiring_example("reqwest_client");
}

#[test]
fn axum_router_example() {
    let out = wiring_example("axum_router");
    // `route_layer`: an unknown path gets its 404 even while the ledger is down.
    assert!(out.contains("POST /no-such-path -> 404 Not Found"), "{out}");
}

#[test]
fn wiring_examples_need_redis_url() {
    for name in ["hyper_client", "reqwest_client", "axum_router"] {
        let finished = run(name, &[], &["REDIS_URL"], RUN_LIMIT);
        assert_eq!(finished.status.code(), Some(2), "{name}");
        assert!(finished.stderr.contains("REDIS_URL="), "{name}");
    }
}
