//! The `gateway` example driven from outside Rust: `tests/blackbox/run.py`
//! (Python 3 standard library only) starts its own `redis-server`, a target
//! written with Python's `http.server` and the gateway binary, sets and
//! deletes the heartbeat with `redis-cli`, and talks HTTP with `urllib`.
//! See the script's docstring for the run itself.
//!
//! This test builds the example (as `tests/gateway.rs` does: `cargo build
//! --example gateway --message-format=json`, and the executable cargo
//! reports), runs the script with a time limit and checks its exit status
//! and its last line, `blackbox: forwarded=N buffered=M replayed=M lost=0`.
//!
//! It needs `python3` (3.7 or later; `$PYTHON` names another interpreter)
//! and `redis-cli` (`$REDIS_CLI_BIN`, `$PATH`, or next to `redis-server`)
//! besides `redis-server`. Without them it FAILS, saying what to install:
//! CI installs them, and a skipped black box would prove nothing.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The whole script run, startup of every process included (the build is not).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// After SIGTERM, how long the script gets to stop its children.
const CLEANUP_GRACE: Duration = Duration::from_secs(10);

/// The first file named `name` in `$PATH`.
fn gateway_bin() -> PathBuf {
    support::example_binary("gateway").to_path_buf()
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `$PYTHON`, else `python3` on `$PATH`; checked to be Python 3.7 or later
/// (`http.server.ThreadingHTTPServer`). Panics saying what to install.
fn python3() -> PathBuf {
    const INSTALL: &str = "the black-box test runs tests/blackbox/run.py with Python 3 \
         (standard library only): install it with `sudo apt-get install python3` \
         (Debian/Ubuntu) or `brew install python`, or set PYTHON=/path/to/python3";
    let python = match std::env::var_os("PYTHON").filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => on_path("python3").unwrap_or_else(|| panic!("python3 not found: {INSTALL}")),
    };
    let check = Command::new(&python)
        .args([
            "-c",
            "import sys; sys.exit(0 if sys.version_info >= (3, 7) else 1)",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL}", python.display()));
    assert!(
        check.status.success(),
        "{} is not Python 3.7 or later: {INSTALL}",
        python.display()
    );
    python
}

/// `$REDIS_CLI_BIN`, else `redis-cli` on `$PATH`, else next to
/// `redis_server`. Panics saying what to install.
fn redis_cli(redis_server: &Path) -> PathBuf {
    const INSTALL: &str = "the black-box test sets the heartbeat with redis-cli: install it \
         with `sudo apt-get install redis-tools` (Debian/Ubuntu; `redis-server` brings it) \
         or `brew install redis`, or set REDIS_CLI_BIN=/path/to/redis-cli";
    if let Some(path) = std::env::var_os("REDIS_CLI_BIN").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "REDIS_CLI_BIN={} is not a file: {INSTALL}",
            path.display()
        );
        return path;
    }
    on_path("redis-cli")
        .or_else(|| {
            let sibling = redis_server.with_file_name("redis-cli");
            sibling.is_file().then_some(sibling)
        })
        .unwrap_or_else(|| panic!("redis-cli not found: {INSTALL}"))
}

/// Reads `pipe` to its end into a shared string.
fn collect(mut pipe: impl Read + Send + 'static) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    let reader = std::thread::spawn(move || {
        let mut buf = [0; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (text, reader)
}

/// The exit status of `child`, if it exits within `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn python_client_python_target_and_redis_cli_drive_the_gateway_binary() {
    let redis_server = support::redis_server_bin();
    let redis_cli = redis_cli(&redis_server);
    let python = python3();
    let gateway = gateway_bin();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/blackbox/run.py");
    assert!(script.is_file(), "{} is missing", script.display());

    let started = Instant::now();
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(&gateway)
        .env("REDIS_SERVER_BIN", &redis_server)
        .env("REDIS_CLI_BIN", &redis_cli)
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", python.display()));
    let (stdout, stdout_reader) = collect(child.stdout.take().unwrap());
    let (stderr, stderr_reader) = collect(child.stderr.take().unwrap());

    let status = wait_exit(&mut child, RUN_TIMEOUT);
    let timed_out = status.is_none();
    let status = status.unwrap_or_else(|| {
        // SIGTERM first: the script then stops its redis-server and gateway.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        wait_exit(&mut child, CLEANUP_GRACE).unwrap_or_else(|| {
            let _ = child.kill();
            child.wait().expect("wait")
        })
    });
    stdout_reader.join().unwrap();
    stderr_reader.join().unwrap();
    let elapsed = started.elapsed();
    let stdout = stdout.lock().unwrap().clone();
    let stderr = stderr.lock().unwrap().clone();
    let report = format!(
        "python3 {} {}: {status} after {elapsed:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        script.display(),
        gateway.display()
    );
    eprintln!("{report}");

    assert!(!timed_out, "still running after {RUN_TIMEOUT:?}\n{report}");
    assert!(status.success(), "the black-box run failed\n{report}");
    let last = stdout.lines().last().unwrap_or_default();
    let counts: Vec<(&str, u64)> = last
        .strip_prefix("blackbox: ")
        .unwrap_or_else(|| panic!("last line is not the summary: {last:?}\n{report}"))
        .split(' ')
        .map(|field| {
            let (name, value) = field.split_once('=').expect("name=value");
            (name, value.parse().expect("a count"))
        })
        .collect();
    let names: Vec<&str> = counts.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        ["forwarded", "buffered", "replayed", "lost"],
        "{last}"
    );
    let [forwarded, buffered, replayed, lost] = [0, 1, 2, 3].map(|i| counts[i].1);
    assert!(forwarded > 0 && buffered > 0, "{last}");
    assert_eq!(replayed, buffered, "{last}");
    assert_eq!(lost, 0, "{last}");
    assert!(last.ends_with(" lost=0"), "{last}");
}
