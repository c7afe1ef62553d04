//! A real Redis Sentinel setup for tests: 1 primary + 1 replica (each a
//! private [`RedisServer`]: own port, temp dir, AOF, KEA notifications) and 3
//! sentinels (`redis-server sentinel.conf --sentinel`, each with its own
//! free port and temp dir), quorum 2.
//!
//! ```ignore
//! let mut setup = SentinelSetup::start("thb");
//! let old = setup.kill_primary();                          // SIGKILL
//! let new = setup.wait_for_failover(old, Duration::from_secs(30));
//! assert_eq!(new, setup.current_primary_port());
//! ```
//!
//! Sentinel settings: `down-after-milliseconds 1000`, `failover-timeout 5000`,
//! `parallel-syncs 1`, so a killed primary is replaced after ~3-6 s. (If the
//! sentinels happen to split their votes, the next election is only after
//! 2 x failover-timeout: keep failover timeouts in tests at >= 30 s.) The
//! servers use `repl-diskless-sync-delay 0` so a replica syncs at once.
//!
//! Sentinel temp dirs are named like RedisServer's (`thb-redis-sentinel-*`,
//! with `owner.pid`/`server.pid`), so RedisServer's orphan sweep also kills
//! sentinels left behind by a test binary that died without running Drop.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

// Sentinels are `redis-server --sentinel`: launched, watched and logged the
// way RedisServer does it.
use super::redis_server::{
    admin_connection, info_field, kill_and_reap, launch, lock, log_tail, write_file, Launch,
    LOG_FILE, OWNER_PID_FILE, READY_TIMEOUT, START_ATTEMPTS,
};
use super::{redis_server_bin, RedisOptions, RedisServer};

/// `sentinel down-after-milliseconds`.
pub const DOWN_AFTER_MS: u64 = 1000;
/// `sentinel failover-timeout`.
pub const FAILOVER_TIMEOUT_MS: u64 = 5000;
const SENTINELS: usize = 3;
const QUORUM: usize = 2;
/// How long [`SentinelSetup::start`] waits for the sentinels to see everything.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Shares RedisServer's prefix so its orphan sweep covers sentinels too.
const DIR_PREFIX: &str = "thb-redis-sentinel-";
const CONF_FILE: &str = "sentinel.conf";

/// 1 primary + 1 replica + 3 sentinels; dropping it SIGKILLs everything and
/// deletes the temp dirs. See the module docs.
pub struct SentinelSetup {
    /// `[0]` started as primary, `[1]` started as its replica.
    servers: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
    master_name: String,
    /// Index into `servers` of the replica paused by `pause_replica`.
    paused: Option<usize>,
}

impl SentinelSetup {
    /// Starts primary, replica (linked and synced) and 3 sentinels monitoring
    /// `master_name`, and returns once every sentinel sees the master (flags
    /// `master`), its replica (link ok) and the 2 other sentinels. Panics with
    /// every process' log tail if that takes more than ~30 s.
    pub fn start(master_name: &str) -> Self {
        let base = RedisOptions::default().extra("repl-diskless-sync-delay", "0");
        let primary = RedisServer::start_with(base.clone());
        let replica = RedisServer::start_with(
            base.extra("replicaof", &format!("127.0.0.1 {}", primary.port())),
        );
        let mut setup = SentinelSetup {
            servers: vec![primary, replica],
            sentinels: Vec::new(),
            master_name: master_name.to_owned(),
            paused: None,
        };
        // Replica linked before the sentinels start: their first INFO of the
        // primary then already lists it (else they only learn it ~10 s later).
        let started = Instant::now();
        setup.wait_or_panic(started, "replica linked", || {
            setup.check_replication(setup.servers[0].port(), &setup.servers[1])
        });
        let primary_port = setup.servers[0].port();
        setup.sentinels = (0..SENTINELS)
            .map(|_| SentinelProcess::start(master_name, primary_port))
            .collect();
        setup.wait_or_panic(
            started,
            "sentinels see master, replica and each other",
            || setup.check_sentinels_converged(),
        );
        setup
    }

    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// `redis://127.0.0.1:PORT/` of the 3 sentinels, for
    /// `redis::sentinel::SentinelClient::build`.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels.iter().map(SentinelProcess::url).collect()
    }

    pub fn sentinels(&self) -> &[SentinelProcess] {
        &self.sentinels
    }

    pub fn sentinel_mut(&mut self, index: usize) -> &mut SentinelProcess {
        &mut self.sentinels[index]
    }

    /// Both data servers: `[0]` started as primary, `[1]` as replica (roles
    /// change with failovers; see [`Self::primary`] / [`Self::replica`]).
    pub fn servers(&self) -> &[RedisServer] {
        &self.servers
    }

    /// The data server listening on `port`. Panics if it is not one of ours.
    pub fn server_by_port(&self, port: u16) -> &RedisServer {
        &self.servers[self.index_of_port(port)]
    }

    /// The data server the sentinels currently name as primary (it may be
    /// dead if it was just killed and not failed over yet).
    pub fn primary(&self) -> &RedisServer {
        self.server_by_port(self.current_primary_port())
    }

    /// The data server the sentinels do not name as primary.
    pub fn replica(&self) -> &RedisServer {
        let primary = self.index_of_port(self.current_primary_port());
        &self.servers[1 - primary]
    }

    /// Port of the primary according to the first sentinel that answers
    /// `SENTINEL get-master-addr-by-name`.
    pub fn current_primary_port(&self) -> u16 {
        let mut errors = Vec::new();
        for s in self.sentinels.iter().filter(|s| s.is_running()) {
            match s.master_addr(&self.master_name) {
                Ok(Some(port)) => return port,
                Ok(None) => errors.push(format!("sentinel {}: master unknown", s.port())),
                Err(e) => errors.push(format!("sentinel {}: {e}", s.port())),
            }
        }
        panic!(
            "SentinelSetup::current_primary_port: no sentinel named the primary: {errors:?}\n{}",
            self.diagnostics()
        )
    }

    /// SIGKILLs the server the sentinels currently name as primary; returns
    /// its port (for [`Self::wait_for_failover`]).
    pub fn kill_primary(&mut self) -> u16 {
        let port = self.current_primary_port();
        let index = self.index_of_port(port);
        self.servers[index].kill();
        port
    }

    /// SIGSTOPs the current replica (the server not named as primary).
    pub fn pause_replica(&mut self) {
        assert!(self.paused.is_none(), "pause_replica: already paused");
        let primary = self.index_of_port(self.current_primary_port());
        let replica = 1 - primary;
        self.servers[replica].pause();
        self.paused = Some(replica);
    }

    /// SIGCONTs the replica paused by [`Self::pause_replica`].
    pub fn resume_replica(&mut self) {
        let index = self
            .paused
            .take()
            .expect("resume_replica: no replica was paused");
        self.servers[index].resume();
    }

    /// Restarts the data server on `port` (same port, dir and config file,
    /// which the sentinels may have rewritten; AOF reloaded). A former primary
    /// comes back as a primary and is turned into a replica by the sentinels
    /// ~8 s later (Sentinel's fixed grace period); they see its link up at
    /// their next INFO of it (every 10 s), so [`Self::wait_replica_synced`]
    /// takes up to ~20 s after such a restart: give it a 30 s timeout.
    pub fn restart_server(&mut self, port: u16) {
        let index = self.index_of_port(port);
        self.servers[index].restart();
    }

    /// Waits until every running sentinel names a primary other than
    /// `old_port` (all the same one) and that server answers `ROLE` as
    /// master. Returns its port. Panics with diagnostics after `timeout`.
    pub fn wait_for_failover(&self, old_port: u16, timeout: Duration) -> u16 {
        let started = Instant::now();
        let check = || -> Result<u16, String> {
            let port = self.agreed_master_port()?;
            if port == old_port {
                return Err(format!("sentinels still name {old_port}"));
            }
            let index = self
                .servers
                .iter()
                .position(|s| s.port() == port)
                .ok_or_else(|| format!("sentinels name an unknown server {port}"))?;
            match query::<redis::Role>(port, &redis::cmd("ROLE")) {
                Ok(redis::Role::Primary { .. }) => Ok(self.servers[index].port()),
                Ok(role) => Err(format!("{port} answers ROLE {role:?}")),
                Err(e) => Err(format!("{port}: ROLE: {e}")),
            }
        };
        loop {
            match check() {
                Ok(port) => return port,
                Err(why) if started.elapsed() >= timeout => panic!(
                    "SentinelSetup::wait_for_failover({old_port}): no failover within {timeout:?}: {why}\n{}",
                    self.diagnostics()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Waits until the server not named as primary is linked to the named
    /// primary (`master_link_status:up`) and every running sentinel lists it
    /// as a replica with link ok. Panics with diagnostics after `timeout`.
    pub fn wait_replica_synced(&self, timeout: Duration) {
        let started = Instant::now();
        let check = || -> Result<(), String> {
            let primary = self.agreed_master_port()?;
            let replica = &self.servers[1 - self.index_of_port(primary)];
            self.check_replication(primary, replica)?;
            for s in self.sentinels.iter().filter(|s| s.is_running()) {
                check_sentinel_replica(s, &self.master_name, replica.port())?;
            }
            Ok(())
        };
        loop {
            match check() {
                Ok(()) => return,
                Err(why) if started.elapsed() >= timeout => panic!(
                    "SentinelSetup::wait_replica_synced: not within {timeout:?}: {why}\n{}",
                    self.diagnostics()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// What each sentinel says about the master, plus every process' log tail.
    pub fn diagnostics(&self) -> String {
        let mut out = String::from("--- SentinelSetup ---\n");
        for (i, s) in self.servers.iter().enumerate() {
            let role = if s.is_running() && self.paused != Some(i) {
                query::<redis::Role>(s.port(), &redis::cmd("ROLE"))
                    .map(|r| format!("{r:?}"))
                    .unwrap_or_else(|e| format!("(error: {e})"))
            } else {
                "(not running / paused)".to_owned()
            };
            out.push_str(&format!("server {i}: port {} ROLE {role}\n", s.port()));
        }
        for s in &self.sentinels {
            let master = s
                .master_info(&self.master_name)
                .map(|m| {
                    let pick = |k: &str| m.get(k).cloned().unwrap_or_default();
                    format!(
                        "port={} flags={} num-slaves={} num-other-sentinels={} failover-state={}",
                        pick("port"),
                        pick("flags"),
                        pick("num-slaves"),
                        pick("num-other-sentinels"),
                        pick("failover-state")
                    )
                })
                .unwrap_or_else(|e| format!("(error: {e})"));
            out.push_str(&format!("sentinel {}: {master}\n", s.port()));
        }
        for (i, s) in self.servers.iter().enumerate() {
            out.push_str(&format!("\n=== log of server {i} ===\n{}", s.log_tail()));
        }
        for s in &self.sentinels {
            out.push_str(&format!(
                "\n=== log of sentinel {} ===\n{}",
                s.port(),
                s.log_tail()
            ));
        }
        out
    }

    // ---- internals ----

    fn index_of_port(&self, port: u16) -> usize {
        self.servers
            .iter()
            .position(|s| s.port() == port)
            .unwrap_or_else(|| panic!("SentinelSetup: port {port} is not one of the data servers"))
    }

    /// The master port every running sentinel names (they must agree).
    fn agreed_master_port(&self) -> Result<u16, String> {
        let mut agreed = None;
        for s in self.sentinels.iter().filter(|s| s.is_running()) {
            let port = s
                .master_addr(&self.master_name)
                .map_err(|e| format!("sentinel {}: {e}", s.port()))?
                .ok_or_else(|| format!("sentinel {}: master unknown", s.port()))?;
            match agreed {
                None => agreed = Some(port),
                Some(p) if p != port => return Err(format!("sentinels disagree: {p} vs {port}")),
                Some(_) => {}
            }
        }
        agreed.ok_or_else(|| "no sentinel running".to_owned())
    }

    /// `replica` reports `master_link_status:up` to the primary on `primary_port`.
    fn check_replication(&self, primary_port: u16, replica: &RedisServer) -> Result<(), String> {
        let info: String = query(replica.port(), redis::cmd("INFO").arg("replication"))
            .map_err(|e| format!("replica {}: {e}", replica.port()))?;
        let field = |k| info_field(&info, k).unwrap_or("");
        if field("role") != "slave" || field("master_port") != primary_port.to_string() {
            return Err(format!(
                "{} is not a replica of {primary_port}",
                replica.port()
            ));
        }
        if field("master_link_status") != "up" {
            return Err(format!("replica {}: link not up", replica.port()));
        }
        Ok(())
    }

    fn check_sentinels_converged(&self) -> Result<(), String> {
        let primary = self.servers[0].port();
        for s in &self.sentinels {
            let m = s
                .master_info(&self.master_name)
                .map_err(|e| format!("sentinel {}: {e}", s.port()))?;
            let field = |k: &str| m.get(k).map(String::as_str).unwrap_or("");
            if field("port") != primary.to_string()
                || field("flags") != "master"
                || field("num-slaves") != "1"
                || field("num-other-sentinels") != (SENTINELS - 1).to_string()
            {
                return Err(format!("sentinel {} sees {m:?}", s.port()));
            }
            check_sentinel_replica(s, &self.master_name, self.servers[1].port())?;
        }
        self.check_replication(primary, &self.servers[1])
    }

    fn wait_or_panic(&self, started: Instant, what: &str, check: impl Fn() -> Result<(), String>) {
        loop {
            match check() {
                Ok(()) => return,
                Err(why) if started.elapsed() >= CONVERGE_TIMEOUT => panic!(
                    "SentinelSetup did not converge within {CONVERGE_TIMEOUT:?} ({what}): {why}\n{}",
                    self.diagnostics()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }
}

impl std::fmt::Debug for SentinelSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelSetup")
            .field("master_name", &self.master_name)
            .field("servers", &self.servers)
            .field("sentinels", &self.sentinels)
            .finish()
    }
}

/// The sentinel lists the replica on `port` with flags `slave` and link ok.
fn check_sentinel_replica(s: &SentinelProcess, name: &str, port: u16) -> Result<(), String> {
    let replicas: Vec<HashMap<String, String>> =
        query(s.port(), redis::cmd("SENTINEL").arg("REPLICAS").arg(name))
            .map_err(|e| format!("sentinel {}: {e}", s.port()))?;
    let ok = replicas.iter().any(|r| {
        r.get("port").map(String::as_str) == Some(port.to_string().as_str())
            && r.get("flags").map(String::as_str) == Some("slave")
            && r.get("master-link-status").map(String::as_str) == Some("ok")
    });
    if ok {
        Ok(())
    } else {
        Err(format!("sentinel {} sees replicas {replicas:?}", s.port()))
    }
}

/// One `redis-server sentinel.conf --sentinel` child process with its own
/// free port and temp dir (config, log). The sentinel rewrites its config
/// (ID, known replicas and sentinels), which a restart reuses. Dropping it
/// SIGKILLs and reaps the process, then deletes the temp dir.
pub struct SentinelProcess {
    // Killed in Drop, before the temp dir (a field) is removed.
    child: Mutex<Option<Child>>,
    port: u16,
    bin: PathBuf,
    conf_path: PathBuf,
    dir: tempfile::TempDir,
}

impl SentinelProcess {
    /// Starts a sentinel monitoring `master_name` at 127.0.0.1:`primary_port`
    /// with quorum 2 and the module's timeouts; waits until it answers PING.
    pub fn start(master_name: &str, primary_port: u16) -> Self {
        let bin = redis_server_bin();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .unwrap_or_else(|e| panic!("test sentinel: cannot create temp dir: {e}"));
        write_file(
            &dir.path().join(OWNER_PID_FILE),
            &std::process::id().to_string(),
        );
        let conf_path = dir.path().join(CONF_FILE);
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            write_file(
                &conf_path,
                &render_conf(port, dir.path(), master_name, primary_port),
            );
            match launch(&bin, &conf_path, &["--sentinel"], dir.path(), port) {
                Launch::Ready(child) => {
                    return SentinelProcess {
                        child: Mutex::new(Some(child)),
                        port,
                        bin,
                        conf_path,
                        dir,
                    }
                }
                Launch::PortBusy(msg) => last_error = msg,
                Launch::Failed(msg) => panic!("{msg}"),
            }
        }
        panic!("test sentinel: no free port after {START_ATTEMPTS} attempts; last error:\n{last_error}")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        match lock(&self.child).as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL + reap. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = lock(&self.child).take() {
            kill_and_reap(&mut child);
        }
    }

    /// Kills the sentinel if running and starts it again on the same port
    /// with its (rewritten) config, so it keeps its ID and what it learned.
    pub fn restart(&mut self) {
        self.kill();
        let started = Instant::now();
        loop {
            match launch(
                &self.bin,
                &self.conf_path,
                &["--sentinel"],
                self.dir.path(),
                self.port,
            ) {
                Launch::Ready(child) => {
                    *lock(&self.child) = Some(child);
                    return;
                }
                Launch::PortBusy(_) if started.elapsed() < READY_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Launch::PortBusy(msg) | Launch::Failed(msg) => {
                    panic!(
                        "test sentinel: restart on port {} failed:\n{msg}",
                        self.port
                    )
                }
            }
        }
    }

    /// `SENTINEL get-master-addr-by-name <name>`: the port, or None if unknown.
    pub fn master_addr(&self, name: &str) -> redis::RedisResult<Option<u16>> {
        let addr: Option<(String, u16)> = query(
            self.port,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(name),
        )?;
        Ok(addr.map(|(_, port)| port))
    }

    /// `SENTINEL master <name>` as field => value.
    pub fn master_info(&self, name: &str) -> redis::RedisResult<HashMap<String, String>> {
        query(self.port, redis::cmd("SENTINEL").arg("MASTER").arg(name))
    }

    /// Last lines of its log and the process' stdout/stderr.
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path(), 0)
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut child) = child.take() {
            kill_and_reap(&mut child);
        }
    }
}

impl std::fmt::Debug for SentinelProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelProcess")
            .field("port", &self.port)
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

fn render_conf(port: u16, dir: &Path, name: &str, primary_port: u16) -> String {
    format!(
        "port {port}\n\
         bind 127.0.0.1\n\
         daemonize no\n\
         dir \"{dir}\"\n\
         logfile \"{log}\"\n\
         sentinel monitor {name} 127.0.0.1 {primary_port} {QUORUM}\n\
         sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}\n\
         sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}\n\
         sentinel parallel-syncs {name} 1\n",
        dir = dir.display(),
        log = dir.join(LOG_FILE).display(),
    )
}

/// One admin query on a fresh connection (no CLIENT SETINFO, short timeouts).
fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    cmd.query(&mut admin_connection(port, ADMIN_CONNECT_TIMEOUT)?)
}

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("test sentinel: cannot bind 127.0.0.1:0: {e}"))
}
