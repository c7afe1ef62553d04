//! A private, real `redis-server` child process for tests and benches.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

use super::options::TlsFiles;
use super::{redis_server_bin, RedisOptions};

/// Prefix of every server's temp dir (used to sweep orphans of killed test runs).
const DIR_PREFIX: &str = "thb-redis-";
const CONF_FILE: &str = "redis.conf";
pub(super) const LOG_FILE: &str = "redis.log";
const STDIO_FILE: &str = "stdio.log";
pub(super) const OWNER_PID_FILE: &str = "owner.pid";
const SERVER_PID_FILE: &str = "server.pid";
/// Subdirectory of the temp dir holding the TLS material (CA, server cert, keys).
const TLS_DIR: &str = "tls";
/// How long one launch may take until PING answers.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(5);
const READY_POLL: Duration = Duration::from_millis(5);
/// Fresh ports tried by `start_with` when the chosen port was taken meanwhile.
pub(super) const START_ATTEMPTS: usize = 5;
/// Read/write timeout of the harness' own admin connection (INFO queries).
const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A real `redis-server` process owned by the test: its own free port on
/// 127.0.0.1, its own temp dir (config, log, AOF). Dropping it SIGKILLs and
/// reaps the process, then deletes the temp dir.
///
/// With [`RedisOptions::tls`] it also listens with TLS on a second port
/// ([`Self::tls_url`], trusting [`Self::ca_cert_path`]); [`Self::url`],
/// [`Self::conn`] and the INFO helpers keep using the plain port.
pub struct RedisServer {
    // NB: field order matters for Drop: the child is killed in `Drop::drop`,
    // the temp dir is removed afterwards when the fields are dropped.
    child: Mutex<Option<Child>>,
    /// Cached helper connection for INFO queries (no CLIENT SETINFO on connect).
    admin: Mutex<Option<redis::Connection>>,
    port: u16,
    /// The TLS port and PEM files, when started with [`RedisOptions::tls`].
    tls: Option<(u16, TlsFiles)>,
    bin: PathBuf,
    conf_path: PathBuf,
    dir: tempfile::TempDir,
}

pub(super) enum Launch {
    Ready(Child),
    /// The child exited because it could not bind its port.
    PortBusy(String),
    Failed(String),
}

impl RedisServer {
    /// Starts a server with [`RedisOptions::default()`].
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server with `opts`; panics with a clear message (including the
    /// tail of the server log) if it does not come up.
    pub fn start_with(opts: RedisOptions) -> Self {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(sweep_orphans);

        let bin = redis_server_bin();
        let dir = tempfile::Builder::new()
            .prefix(DIR_PREFIX)
            .tempdir()
            .unwrap_or_else(|e| panic!("test redis-server: cannot create temp dir: {e}"));
        write_file(
            &dir.path().join(OWNER_PID_FILE),
            &std::process::id().to_string(),
        );
        let conf_path = dir.path().join(CONF_FILE);
        let tls_files = opts
            .tls
            .then(|| generate_tls_files(&dir.path().join(TLS_DIR)));

        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let (port, tls_port) = free_port_pair();
            let tls = tls_files.as_ref().map(|files| (tls_port, files));
            write_file(
                &conf_path,
                &opts.render_conf_with_tls(port, tls, dir.path()),
            );
            match launch(&bin, &conf_path, &[], dir.path(), port) {
                Launch::Ready(child) => {
                    return RedisServer {
                        child: Mutex::new(Some(child)),
                        admin: Mutex::new(None),
                        port,
                        tls: tls_files.map(|files| (tls_port, files)),
                        bin,
                        conf_path,
                        dir,
                    };
                }
                Launch::PortBusy(msg) => last_error = msg,
                Launch::Failed(msg) => panic!("{msg}"),
            }
        }
        panic!(
            "test redis-server: could not get a free port after {START_ATTEMPTS} attempts; last error:\n{last_error}"
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("test redis-server: invalid url")
    }

    /// The TLS port, when started with [`RedisOptions::tls`].
    pub fn tls_port(&self) -> Option<u16> {
        self.tls.as_ref().map(|(port, _)| *port)
    }

    /// `rediss://127.0.0.1:PORT/` (the TLS port). Panics unless the server
    /// was started with [`RedisOptions::tls`].
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_state("tls_url").0)
    }

    /// PEM file of the throwaway CA that signed the server's certificate (for
    /// `127.0.0.1` and `localhost`). Panics unless started with
    /// [`RedisOptions::tls`].
    pub fn ca_cert_path(&self) -> PathBuf {
        self.tls_state("ca_cert_path").1.ca_cert.clone()
    }

    /// A client for [`Self::tls_url`] that trusts [`Self::ca_cert_path`]
    /// (needs the crate's `tls` feature, which turns on redis-rs' rustls).
    #[cfg(feature = "tls")]
    pub fn tls_client(&self) -> redis::Client {
        self.tls_client_for(&self.tls_url())
    }

    /// A client for `url` (a `rediss://` URL of this server, e.g. with
    /// `?protocol=resp3`) that trusts [`Self::ca_cert_path`].
    #[cfg(feature = "tls")]
    pub fn tls_client_for(&self, url: &str) -> redis::Client {
        let ca = fs::read(self.ca_cert_path()).unwrap_or_else(|e| {
            panic!(
                "test redis-server: cannot read {}: {e}",
                self.ca_cert_path().display()
            )
        });
        redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        )
        .unwrap_or_else(|e| panic!("test redis-server: TLS client for {url}: {e}"))
    }

    fn tls_state(&self, what: &str) -> &(u16, TlsFiles) {
        self.tls.as_ref().unwrap_or_else(|| {
            panic!(
                "test redis-server: {what}() needs a server started with RedisOptions::tls(true)"
            )
        })
    }

    /// A fresh sync connection (no read/write timeout), for test setup/asserts.
    pub fn conn(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| {
                panic!(
                    "test redis-server on port {}: cannot connect: {e}",
                    self.port
                )
            })
    }

    /// Temp dir holding redis.conf, redis.log and the AOF (`appendonlydir/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PID of the running server process, if any.
    pub fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    /// Last lines of the server's log file (and its stdout/stderr), for diagnostics.
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path(), 0)
    }

    /// SIGKILL + reap the process. Idempotent.
    pub fn kill(&mut self) {
        *lock(&self.admin) = None;
        if let Some(mut child) = lock(&self.child).take() {
            kill_and_reap(&mut child);
        }
    }

    /// Kills the server if running, then starts it again on the SAME port, dir
    /// and config (so AOF data is reloaded), and waits until PING answers
    /// (i.e. also until the AOF is loaded). Retries for up to ~5 s if the port
    /// is briefly unavailable.
    pub fn restart(&mut self) {
        self.kill();
        let started = Instant::now();
        loop {
            match launch(&self.bin, &self.conf_path, &[], self.dir.path(), self.port) {
                Launch::Ready(child) => {
                    *lock(&self.child) = Some(child);
                    return;
                }
                Launch::PortBusy(_) if started.elapsed() < READY_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Launch::PortBusy(msg) => panic!(
                    "test redis-server: restart on port {} failed, port stayed busy for {:?}:\n{msg}",
                    self.port,
                    started.elapsed()
                ),
                Launch::Failed(msg) => panic!("test redis-server: restart failed: {msg}"),
            }
        }
    }

    /// SIGSTOP: the process freezes (the kernel still accepts TCP connections
    /// into the listen backlog, but nothing is answered) until [`Self::resume`].
    pub fn pause(&self) {
        let pid = self.running_pid("pause");
        signal(pid, "STOP");
        wait_proc_state(pid, |s| s == 'T' || s == 't');
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) {
        let pid = self.running_pid("resume");
        signal(pid, "CONT");
        wait_proc_state(pid, |s| s != 'T' && s != 't');
    }

    /// Whether the process is alive (a paused process counts as running).
    pub fn is_running(&self) -> bool {
        match lock(&self.child).as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `calls` of `cmdstat_<name>` in INFO commandstats (name is lowercased,
    /// e.g. "get", "pttl", "evalsha", "client|setinfo"); 0 if absent.
    /// Uses one INFO on a cached helper connection (counted as `info` itself).
    pub fn command_calls(&self, name: &str) -> u64 {
        let prefix = format!("cmdstat_{}:", name.to_ascii_lowercase());
        let info = self.info("commandstats");
        info.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|stats| {
                stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls="))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// `total_commands_processed` from INFO stats. The value excludes the INFO
    /// doing the query, but includes earlier helper INFO calls (+1 per call of
    /// `command_calls` / `total_commands_processed`).
    pub fn total_commands_processed(&self) -> u64 {
        let info = self.info("stats");
        info_field(&info, "total_commands_processed")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no total_commands_processed in INFO stats:\n{info}"))
    }

    /// Raw `INFO <section>` via the cached helper connection (reconnects once).
    pub fn info(&self, section: &str) -> String {
        let mut admin = lock(&self.admin);
        let mut last_err = None;
        for _ in 0..2 {
            if admin.is_none() {
                match admin_connection(self.port, Duration::from_secs(1)) {
                    Ok(c) => *admin = Some(c),
                    Err(e) => {
                        last_err = Some(e);
                        continue;
                    }
                }
            }
            let conn = admin.as_mut().expect("admin connection");
            match redis::cmd("INFO").arg(section).query::<String>(conn) {
                Ok(info) => return info,
                Err(e) => {
                    *admin = None;
                    last_err = Some(e);
                }
            }
        }
        panic!(
            "test redis-server on port {}: INFO {section} failed (killed or paused?): {}",
            self.port,
            last_err.map(|e| e.to_string()).unwrap_or_default()
        )
    }

    fn running_pid(&self, what: &str) -> u32 {
        let mut child = lock(&self.child);
        match child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(None) => c.id(),
                _ => panic!("test redis-server: {what}() called but the server has exited"),
            },
            None => panic!("test redis-server: {what}() called but the server is not running"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let admin = self.admin.get_mut().unwrap_or_else(PoisonError::into_inner);
        *admin = None;
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut child) = child.take() {
            kill_and_reap(&mut child);
        }
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("tls_port", &self.tls_port())
            .field("pid", &self.pid())
            .field("dir", &self.dir.path())
            .finish()
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn write_file(path: &Path, content: &str) {
    fs::write(path, content)
        .unwrap_or_else(|e| panic!("test redis-server: cannot write {}: {e}", path.display()));
}

/// Two distinct ports that were free on 127.0.0.1 a moment ago (the second
/// is only used with TLS).
fn free_port_pair() -> (u16, u16) {
    let bind = || {
        TcpListener::bind(("127.0.0.1", 0))
            .unwrap_or_else(|e| panic!("test redis-server: cannot bind 127.0.0.1:0: {e}"))
    };
    // Both held at once, so the kernel cannot hand out the same port twice.
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local_addr").port();
    (port(&a), port(&b))
}

/// OpenSSL config for the throwaway CA and the server certificate.
const OPENSSL_CONF: &str = "\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = tower-heartbeat-buffer test

[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Generates a throwaway CA and a server certificate for 127.0.0.1 and
/// localhost (P-256 keys, valid for two days) in `dir`, with the `openssl` CLI.
fn generate_tls_files(dir: &Path) -> TlsFiles {
    fs::create_dir_all(dir)
        .unwrap_or_else(|e| panic!("test redis-server: cannot create {}: {e}", dir.display()));
    let path = |name: &str| dir.join(name).display().to_string();
    let (conf, ca_key, ca_cert) = (path("openssl.cnf"), path("ca.key"), path("ca.crt"));
    let (key, csr, cert) = (path("server.key"), path("server.csr"), path("server.crt"));
    write_file(Path::new(&conf), OPENSSL_CONF);
    let genkey = |out: &str| {
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            out,
        ])
    };
    genkey(&ca_key);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-sha256",
        "-days",
        "2",
        "-config",
        &conf,
        "-extensions",
        "ca",
        "-subj",
        "/CN=tower-heartbeat-buffer test CA",
        "-key",
        &ca_key,
        "-out",
        &ca_cert,
    ]);
    genkey(&key);
    openssl(&[
        "req",
        "-new",
        "-sha256",
        "-config",
        &conf,
        "-subj",
        "/CN=localhost",
        "-key",
        &key,
        "-out",
        &csr,
    ]);
    openssl(&[
        "x509",
        "-req",
        "-sha256",
        "-days",
        "2",
        "-set_serial",
        "2",
        "-extfile",
        &conf,
        "-extensions",
        "server",
        "-in",
        &csr,
        "-CA",
        &ca_cert,
        "-CAkey",
        &ca_key,
        "-out",
        &cert,
    ]);
    TlsFiles {
        ca_cert: ca_cert.into(),
        server_cert: cert.into(),
        server_key: key.into(),
    }
}

/// Runs `openssl <args>`; panics with its stderr if it fails.
fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "test redis-server: RedisOptions::tls needs the `openssl` CLI \
                 (`apt-get install openssl`): cannot run it: {e}"
            )
        });
    assert!(
        output.status.success(),
        "test redis-server: `openssl {}` failed ({}):\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

pub(super) fn kill_and_reap(child: &mut Child) {
    let _ = child.kill(); // SIGKILL; also works on a SIGSTOPped process
    let _ = child.wait();
}

/// Spawns `redis-server <conf> <extra_args>` (`--sentinel` for a sentinel)
/// and waits until it answers PING (and is really our process), the process
/// exits, or READY_TIMEOUT passes.
pub(super) fn launch(
    bin: &Path,
    conf: &Path,
    extra_args: &[&str],
    dir: &Path,
    port: u16,
) -> Launch {
    let log_offset = fs::metadata(dir.join(LOG_FILE))
        .map(|m| m.len())
        .unwrap_or(0);
    let stdio = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(STDIO_FILE))
        .unwrap_or_else(|e| panic!("test redis-server: cannot open stdio log: {e}"));
    let stdio2 = stdio.try_clone().expect("clone stdio log handle");
    let mut child = match Command::new(bin)
        .arg(conf)
        .args(extra_args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdio)
        .stderr(stdio2)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return Launch::Failed(format!(
                "test redis-server: cannot spawn {}: {e}",
                bin.display()
            ))
        }
    };
    write_file(&dir.join(SERVER_PID_FILE), &child.id().to_string());

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = log_tail(dir, log_offset);
            if log.contains("Address already in use")
                || log.contains("Could not create server TCP listening socket")
            {
                return Launch::PortBusy(log);
            }
            return Launch::Failed(format!(
                "test redis-server ({}) on port {port} exited during startup ({status}); log tail:\n{log}",
                bin.display()
            ));
        }
        if ping_ours(port, child.id()) {
            return Launch::Ready(child);
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            return Launch::Failed(format!(
                "test redis-server ({}) on port {port} did not answer PING within {READY_TIMEOUT:?}; log tail:\n{}",
                bin.display(),
                log_tail(dir, log_offset)
            ));
        }
        std::thread::sleep(READY_POLL);
    }
}

/// Connection used by the harness itself: no CLIENT SETINFO on connect, so it
/// adds nothing but its own commands to the server's stats.
pub(super) fn admin_connection(
    port: u16,
    connect_timeout: Duration,
) -> redis::RedisResult<redis::Connection> {
    use redis::IntoConnectionInfo;
    let info = format!("redis://127.0.0.1:{port}/").into_connection_info()?;
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    let client = redis::Client::open(info.set_redis_settings(settings))?;
    let conn = client.get_connection_with_timeout(connect_timeout)?;
    conn.set_read_timeout(Some(ADMIN_IO_TIMEOUT))?;
    conn.set_write_timeout(Some(ADMIN_IO_TIMEOUT))?;
    Ok(conn)
}

/// PING answers PONG (not LOADING) and INFO says the process is `pid`
/// (guards against some other server having grabbed the port).
fn ping_ours(port: u16, pid: u32) -> bool {
    let Ok(mut conn) = admin_connection(port, Duration::from_millis(200)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    match redis::cmd("PING").query::<String>(&mut conn) {
        Ok(pong) if pong == "PONG" => {}
        _ => return false,
    }
    match redis::cmd("INFO").arg("server").query::<String>(&mut conn) {
        Ok(info) => info_field(&info, "process_id") == Some(pid.to_string().as_str()),
        Err(_) => false,
    }
}

pub(super) fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// Tail of redis.log (from byte `log_offset`) plus the process' stdout/stderr.
pub(super) fn log_tail(dir: &Path, log_offset: u64) -> String {
    fn tail(path: &Path, offset: u64, lines: usize) -> String {
        let mut buf = String::new();
        if let Ok(mut f) = File::open(path) {
            let _ = f.seek(SeekFrom::Start(offset));
            let _ = f.read_to_string(&mut buf);
        }
        let all: Vec<&str> = buf.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
    let mut out = format!(
        "--- {} ---\n{}",
        dir.join(LOG_FILE).display(),
        tail(&dir.join(LOG_FILE), log_offset, 40)
    );
    let stdio = tail(&dir.join(STDIO_FILE), 0, 20);
    if !stdio.trim().is_empty() {
        out.push_str(&format!("\n--- stdout/stderr ---\n{stdio}"));
    }
    out
}

/// Sends a signal via the `kill` utility (no libc dependency).
fn signal(pid: u32, sig: &str) {
    let pid_s = pid.to_string();
    let status = Command::new("kill")
        .args(["-s", sig, &pid_s])
        .stderr(Stdio::null())
        .status()
        .or_else(|_| {
            Command::new("sh")
                .args(["-c", &format!("kill -s {sig} {pid_s}")])
                .stderr(Stdio::null())
                .status()
        })
        .unwrap_or_else(|e| panic!("test redis-server: cannot run `kill -s {sig} {pid}`: {e}"));
    assert!(
        status.success(),
        "test redis-server: `kill -s {sig} {pid}` failed: {status}"
    );
}

/// Process state letter from /proc/<pid>/stat (Linux only; None elsewhere).
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Waits (max 1 s) until the signal took effect; no-op without /proc.
fn wait_proc_state(pid: u32, ok: impl Fn(char) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while let Some(state) = proc_state(pid) {
        if ok(state) || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Best effort (Linux): kill servers and remove temp dirs left behind by test
/// processes that died without running Drop (e.g. SIGKILLed test binaries).
/// Only touches `thb-redis-*` dirs whose owner process is gone, and only kills
/// a process whose cwd is that dir.
fn sweep_orphans() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let read_pid = |p: PathBuf| -> Option<u32> { fs::read_to_string(p).ok()?.trim().parse().ok() };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let dir = entry.path();
        let Some(owner) = read_pid(dir.join(OWNER_PID_FILE)) else {
            continue; // being created right now, or not ours
        };
        if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        if let Some(server) = read_pid(dir.join(SERVER_PID_FILE)) {
            let cwd = fs::read_link(format!("/proc/{server}/cwd")).ok();
            let ours = match (cwd, fs::canonicalize(&dir)) {
                (Some(cwd), Ok(dir)) => cwd == dir,
                _ => false,
            };
            if ours {
                let _ = Command::new("kill")
                    .args(["-s", "KILL", &server.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

#[allow(unused)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<RedisServer>();
}
