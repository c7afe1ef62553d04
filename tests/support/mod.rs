//! Shared integration-test / bench support: a REAL private `redis-server`
//! process per [`RedisServer`], started on a free loopback port in its own
//! temp dir. Never touches the machine's shared Redis on port 6379.
//!
//! Use from tests with `mod support;` and from benches with
//! `#[path = "../tests/support/mod.rs"] mod support;`.
//!
//! Depends only on std + redis + tokio + tempfile (never on the crate under test).
//!
//! ```ignore
//! let mut server = RedisServer::start();                 // AOF always, KEA notifications
//! let mut conn = server.conn();                          // sync, for setup/asserts
//! redis::cmd("SET").arg("k").arg("v").query::<()>(&mut conn)?;
//! server.kill();                                         // SIGKILL
//! server.restart();                                      // same port/dir, AOF reloaded
//! server.pause(); /* ... */ server.resume();             // SIGSTOP / SIGCONT
//! assert_eq!(server.command_calls("set"), 1);
//! ```
//!
//! Notes: each `command_calls` / `total_commands_processed` / `info` call runs
//! one INFO on a cached helper connection (which skips CLIENT SETINFO), so it
//! shows up in `total_commands_processed` of later reads and in
//! `cmdstat_info`; compare before/after deltas. Startup readiness also runs
//! one PING + one INFO. Redis 7.0 rejects redis-rs' `CLIENT SETINFO`
//! handshake (added in 7.2): that costs nothing in `total_commands_processed`,
//! only `errorstat_ERR` / `total_error_replies` grow by 2 per connection.
#![allow(dead_code)]
#![allow(unused_imports)]

mod options;
mod redis_cluster;
mod redis_sentinel;
mod redis_server;

pub use options::RedisOptions;
pub use redis_cluster::{NodeState, RedisCluster};
pub use redis_sentinel::{SentinelProcess, SentinelSetup};
pub use redis_server::RedisServer;

mod examples;
mod http_target;
pub mod layer_rig;
pub use examples::example_binary;
pub use http_target::*;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Message used when no `redis-server` binary can be found.
pub const REDIS_NOT_FOUND: &str = "redis-server not found: install it with `sudo apt-get install redis-server` (Debian/Ubuntu) or `brew install redis`, or set REDIS_SERVER_BIN=/path/to/redis-server";

/// Location of the `redis-server` binary: `$REDIS_SERVER_BIN` if set (and
/// non-empty), else the first `redis-server` on `$PATH`. Panics with one clear
/// message ([`REDIS_NOT_FOUND`]) if neither exists.
pub fn redis_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return bin;
        }
        panic!(
            "REDIS_SERVER_BIN={} is not a file. {REDIS_NOT_FOUND}",
            bin.display()
        );
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("redis-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("{REDIS_NOT_FOUND}");
}

/// Async poll-until helper: evaluates `cond` every 2 ms until it returns
/// `true` (=> `true`) or `timeout` of REAL (wall-clock) time has passed
/// (=> `false`, after one last check). The deadline uses `std::time::Instant`
/// on purpose, so it also behaves with tokio's paused test clock.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut cond: F) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
