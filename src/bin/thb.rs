//! `thb`: the admin tool of tower-heartbeat-buffer (feature `cli`).
//!
//! Reads the public Redis layout (see the crate's `target` and `envelope`
//! docs) of one namespace: targets and their heartbeat state, queue depth and
//! the age of the oldest entry, buffered entries, dead letters.
//!
//! ```text
//! thb [--redis URL] [--namespace NS] [--json] targets
//! thb status TARGET [--heartbeat-key KEY]
//! thb peek TARGET [-n 10]
//! thb dead list TARGET [-n 20]
//! thb dead requeue TARGET (ENTRY_ID | --all)
//! thb dead purge TARGET (ENTRY_ID | --all)
//! ```
//!
//! Exit status: 0 on success; 1 when Redis cannot be reached, the target or
//! dead letter does not exist, or a command fails; 2 for usage errors
//! (invalid names and ids, no Redis URL).
//!
//! Durations in `--json` output are milliseconds; `ttl_ms` is `-1` for a
//! key without TTL and `null` when there is nothing to expire. Ages are
//! measured against the Redis server's clock (`TIME`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use redis::{FromRedisValue, Value};
use serde_json::{json, Value as Json};
use tower_heartbeat_buffer::envelope::Envelope;
use tower_heartbeat_buffer::heartbeat::{read_heartbeat_keys, HeartbeatKeyState};
use tower_heartbeat_buffer::replay::{DeadLetter, DeadLetters};
use tower_heartbeat_buffer::{
    Backend, BackendConnection, HeartbeatSource, InvalidName, RedisError, Target, DEFAULT_NAMESPACE,
};

/// Longest wait for the connection (TCP, TLS, AUTH) to be established.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The consumer group the replayers of a target share on its queue.
const GROUP: &str = tower_heartbeat_buffer::replay::CONSUMER_GROUP;
/// Body bytes shown by `peek`.
const PREVIEW_BYTES: usize = 60;
/// Dead letters requeued per round of `dead requeue --all`.
const REQUEUE_BATCH: usize = 500;
/// The drain lease: `{holder, pttl}`, or nil when there is none. A key of
/// another type reads as holder `<TYPE>`.
const LEASE_READ: &str = r#"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return false end
local holder = '<' .. kind .. '>'
if kind == 'string' then holder = redis.call('GET', KEYS[1]) end
return {holder, redis.call('PTTL', KEYS[1])}
"#;

/// Admin tool for tower-heartbeat-buffer: targets, heartbeats, queues and
/// dead letters in Redis.
#[derive(Parser, Debug)]
#[command(name = "thb", version)]
struct Cli {
    /// Redis URL: redis://127.0.0.1:6379/, rediss://..., a cluster
    /// (redis+cluster://host:port,host:port) or Sentinel
    /// (redis+sentinel://host:port,host:port/MASTER)
    #[arg(
        long = "redis",
        value_name = "URL",
        env = "REDIS_URL",
        hide_env_values = true,
        global = true
    )]
    redis: Option<String>,
    /// Key namespace: keys are NS:{target}:...
    #[arg(long, value_name = "NS", default_value = DEFAULT_NAMESPACE, global = true)]
    namespace: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every target of the namespace: heartbeat state, queue depth, age of
    /// the oldest entry, pending and dead entries.
    Targets,
    /// One target in detail: its heartbeat keys, the drain lease and the
    /// replayers (consumers) of its queue.
    Status {
        /// The target's name.
        target: String,
        /// The target's heartbeat is this key, kept by some other system,
        /// rather than NS:{target}:hb.
        #[arg(long, value_name = "KEY")]
        heartbeat_key: Option<String>,
    },
    /// The oldest buffered entries of a target, decoded.
    Peek {
        /// The target's name.
        target: String,
        /// How many entries.
        #[arg(short = 'n', long = "count", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        count: u64,
    },
    /// List, requeue or purge dead letters.
    Dead {
        #[command(subcommand)]
        action: DeadCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DeadCommand {
    /// The oldest dead letters of a target, with their reasons.
    List {
        /// The target's name.
        target: String,
        /// How many dead letters.
        #[arg(short = 'n', long = "count", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        count: u64,
    },
    /// Put dead letters back at the end of the queue, to be delivered again.
    Requeue(Selection),
    /// Delete dead letters for good.
    Purge(Selection),
}

#[derive(Args, Debug)]
struct Selection {
    /// The target's name.
    target: String,
    /// The dead letter's entry id (as `dead list` shows it).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    entry_id: Option<String>,
    /// Every dead letter of the target.
    #[arg(long)]
    all: bool,
}

/// Why `thb` stops, and with which exit status.
#[derive(Debug)]
enum Failure {
    /// Bad invocation: exit 2.
    Usage(String),
    /// The URL does not lead to a usable Redis: exit 1.
    Unreachable { url: String, reason: String },
    /// Anything else: exit 1.
    Failed(String),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Usage(_) => ExitCode::from(2),
            Failure::Unreachable { .. } | Failure::Failed(_) => ExitCode::from(1),
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::Usage(m) | Failure::Failed(m) => m.clone(),
            Failure::Unreachable { url, reason } => {
                format!("cannot reach redis at {url}: {reason}")
            }
        }
    }
}

impl From<InvalidName> for Failure {
    fn from(e: InvalidName) -> Self {
        Failure::Usage(e.to_string())
    }
}

impl From<RedisError> for Failure {
    fn from(e: RedisError) -> Self {
        match std::error::Error::source(&e) {
            Some(source) => Failure::Failed(format!("{e}: {}", one_line(&source.to_string()))),
            None => Failure::Failed(e.to_string()),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match run(cli).await {
        Ok(output) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(output.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::SUCCESS,
                // `thb peek ... | head`: the reader has what it wanted.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "thb: cannot write the output: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(failure) => {
            // Not `eprintln!`, which panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "thb: {}", failure.message());
            failure.exit_code()
        }
    }
}

/// Runs one command; returns what to print.
async fn run(cli: Cli) -> Result<String, Failure> {
    // Names first: a bad one is a usage error whatever the server.
    let namespace = cli.namespace.as_str();
    let target = match &cli.command {
        Command::Targets => {
            // Validates the namespace with the library's rules.
            Target::with_namespace(namespace, "_")?;
            None
        }
        Command::Status {
            target,
            heartbeat_key,
        } => {
            let t = Target::with_namespace(namespace, target)?;
            Some(match heartbeat_key {
                Some(key) => t.with_heartbeat_key(key)?,
                None => t,
            })
        }
        Command::Peek { target, .. } => Some(Target::with_namespace(namespace, target)?),
        Command::Dead { action } => {
            let name = match action {
                DeadCommand::List { target, .. } => target,
                DeadCommand::Requeue(s) | DeadCommand::Purge(s) => {
                    if let Some(id) = &s.entry_id {
                        check_entry_id(id)?;
                    }
                    &s.target
                }
            };
            Some(Target::with_namespace(namespace, name)?)
        }
    };
    let url = cli
        .redis
        .as_deref()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            Failure::Usage("no redis URL: pass --redis URL or set REDIS_URL".to_owned())
        })?;
    let mut redis = Redis::connect(url).await?;
    let json = cli.json;

    match (cli.command, target) {
        (Command::Targets, _) => {
            let summaries = redis.discover(namespace).await?;
            Ok(if json {
                pretty(&Json::Array(
                    summaries.iter().map(Summary::to_json).collect(),
                ))
            } else if summaries.is_empty() {
                format!("no targets in namespace {namespace}\n")
            } else {
                targets_table(&summaries)
            })
        }
        (Command::Status { .. }, Some(target)) => {
            // An explicit heartbeat key replaces the per-instance keys.
            let instances = match target.heartbeat_source() {
                HeartbeatSource::Explicit(_) => Vec::new(),
                _ => redis.instance_keys(&target).await?,
            };
            let summary = redis.summary(&target, instances).await?;
            if !summary.exists {
                return Err(no_such_target(&target));
            }
            let details = redis.details(&target, summary.group_exists).await?;
            Ok(if json {
                let mut object = summary.to_json();
                if let Json::Object(map) = &mut object {
                    map.insert(
                        "heartbeats".into(),
                        summary
                            .heartbeat
                            .keys
                            .iter()
                            .map(HeartbeatKey::to_json)
                            .collect(),
                    );
                    map.insert("lease".into(), details.lease_json());
                    map.insert(
                        "consumers".into(),
                        details.consumers.iter().map(Consumer::to_json).collect(),
                    );
                }
                pretty(&object)
            } else {
                status_text(&summary, &details)
            })
        }
        (Command::Peek { count, .. }, Some(target)) => {
            redis.require(&target).await?;
            let now = redis.now_ms().await?;
            let entries = redis.peek(&target, count).await?;
            Ok(if json {
                pretty(&Json::Array(
                    entries.iter().map(|e| peek_json(e, now)).collect(),
                ))
            } else if entries.is_empty() {
                format!("the queue of {} is empty\n", target.name())
            } else {
                peek_table(&entries, now)
            })
        }
        (Command::Dead { action }, Some(target)) => {
            redis.require(&target).await?;
            let dead = DeadLetters::new(redis.backend.clone(), &target)?;
            match action {
                DeadCommand::List { count, .. } => {
                    let now = redis.now_ms().await?;
                    let letters = dead
                        .list(usize::try_from(count).unwrap_or(usize::MAX))
                        .await?;
                    let total = dead.len().await?;
                    Ok(if json {
                        pretty(&Json::Array(
                            letters.iter().map(|l| dead_json(l, now)).collect(),
                        ))
                    } else if letters.is_empty() {
                        format!("{} has no dead letters\n", target.name())
                    } else {
                        dead_table(&letters, total, now)
                    })
                }
                DeadCommand::Requeue(selection) => {
                    let (n, id) = match &selection.entry_id {
                        Some(id) => {
                            if !dead.requeue(id).await? {
                                return Err(no_such_dead_letter(&target, id));
                            }
                            (1, Some(id.as_str()))
                        }
                        None => (redis.requeue_all(&target, &dead).await?, None),
                    };
                    Ok(if json {
                        pretty(&json!({"target": target.name(), "requeued": n, "entry_id": id}))
                    } else {
                        format!(
                            "requeued {n} dead letter{} of {}{}\n",
                            plural(n),
                            target.name(),
                            id.map(|id| format!(" ({id})")).unwrap_or_default()
                        )
                    })
                }
                DeadCommand::Purge(selection) => {
                    let (n, id) = match &selection.entry_id {
                        Some(id) => {
                            if !dead.purge(id).await? {
                                return Err(no_such_dead_letter(&target, id));
                            }
                            (1, Some(id.as_str()))
                        }
                        None => (dead.purge_all().await?, None),
                    };
                    Ok(if json {
                        pretty(&json!({"target": target.name(), "purged": n, "entry_id": id}))
                    } else {
                        format!(
                            "purged {n} dead letter{} of {}{}\n",
                            plural(n),
                            target.name(),
                            id.map(|id| format!(" ({id})")).unwrap_or_default()
                        )
                    })
                }
            }
        }
        (_, None) => Err(Failure::Failed("internal error: no target".to_owned())),
    }
}

fn no_such_target(target: &Target) -> Failure {
    Failure::Failed(format!(
        "no such target {:?} in namespace {:?} (no heartbeat, queue or dead letters)",
        target.name(),
        target.namespace()
    ))
}

fn no_such_dead_letter(target: &Target, id: &str) -> Failure {
    Failure::Failed(format!(
        "no such dead letter {id} for target {:?}",
        target.name()
    ))
}

/// A stream entry id: `ms` or `ms-seq`.
fn check_entry_id(id: &str) -> Result<(), Failure> {
    if parse_stream_id(id).is_some() {
        Ok(())
    } else {
        Err(Failure::Usage(format!(
            "invalid entry id {id:?}: expected a stream id like 1715000000000-0"
        )))
    }
}

fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(ms) || !digits(seq) {
        return None;
    }
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

// ---------------------------------------------------------------------------
// Redis

/// The connection, and where it goes (for [`DeadLetters`]).
struct Redis {
    backend: Backend,
    conn: BackendConnection,
}

/// What one heartbeat key said, judged by the library (the watcher's own
/// read script and rules).
#[derive(Debug)]
struct HeartbeatKey(HeartbeatKeyState);

impl std::ops::Deref for HeartbeatKey {
    type Target = HeartbeatKeyState;

    fn deref(&self) -> &HeartbeatKeyState {
        &self.0
    }
}

impl HeartbeatKey {
    fn exists(&self) -> bool {
        self.pttl_ms != -2
    }

    fn serving(&self) -> bool {
        self.0.serving
    }

    fn to_json(&self) -> Json {
        json!({
            "key": self.key,
            "type": self.kind,
            "status": self.status,
            "ttl_ms": if self.exists() { json!(self.pttl_ms) } else { Json::Null },
            "serving": self.serving(),
        })
    }
}

/// A target's heartbeat, judged as the library judges it.
#[derive(Debug)]
struct HeartbeatState {
    /// Every heartbeat key that exists.
    keys: Vec<HeartbeatKey>,
}

impl HeartbeatState {
    fn alive(&self) -> usize {
        self.keys.iter().filter(|k| k.serving()).count()
    }

    /// `up` while a key serves; `draining` when a live key says so and none
    /// serves; else `down`.
    fn state(&self) -> &'static str {
        if self.alive() > 0 {
            "up"
        } else if self.keys.iter().any(|k| k.status == "draining") {
            "draining"
        } else {
            "down"
        }
    }

    /// Time until the verdict turns to down unless a key is refreshed: -1
    /// when a serving key has no TTL, `None` when down.
    fn ttl_ms(&self) -> Option<i64> {
        let mut serving = self.keys.iter().filter(|k| k.serving()).peekable();
        serving.peek()?;
        if self.keys.iter().any(|k| k.serving() && k.pttl_ms == -1) {
            Some(-1)
        } else {
            serving.map(|k| k.pttl_ms).max()
        }
    }
}

/// One target at a glance.
#[derive(Debug)]
struct Summary {
    name: String,
    namespace: String,
    heartbeat: HeartbeatState,
    /// `None` when the key is not a stream.
    queue: Option<u64>,
    oldest_entry_id: Option<String>,
    oldest_age_ms: Option<u64>,
    pending: u64,
    /// `None` when the key is not a stream.
    dead: Option<u64>,
    group_exists: bool,
    /// Keys of the layout that hold something unexpected.
    problems: Vec<String>,
    /// Whether any of its keys exists.
    exists: bool,
}

impl Summary {
    fn to_json(&self) -> Json {
        json!({
            "target": self.name,
            "namespace": self.namespace,
            "state": self.heartbeat.state(),
            "alive": self.heartbeat.alive(),
            "heartbeat_keys": self.heartbeat.keys.len(),
            "ttl_ms": self.heartbeat.ttl_ms(),
            "queue": self.queue,
            "oldest_entry_id": self.oldest_entry_id,
            "oldest_age_ms": self.oldest_age_ms,
            "pending": self.pending,
            "dead": self.dead,
            "problems": self.problems,
        })
    }
}

/// A replayer in the target's consumer group.
#[derive(Debug)]
struct Consumer {
    name: String,
    pending: u64,
    idle_ms: u64,
}

impl Consumer {
    fn to_json(&self) -> Json {
        json!({"name": self.name, "pending": self.pending, "idle_ms": self.idle_ms})
    }
}

/// What `status` adds to a summary.
#[derive(Debug)]
struct Details {
    /// Holder and PTTL of the drain lease.
    lease: Option<(String, i64)>,
    consumers: Vec<Consumer>,
}

impl Details {
    fn lease_json(&self) -> Json {
        match &self.lease {
            Some((holder, ttl)) => json!({"holder": holder, "ttl_ms": ttl}),
            None => Json::Null,
        }
    }
}

/// One entry read from a stream.
#[derive(Debug)]
struct RawEntry {
    entry_id: String,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Redis {
    /// Connects and checks the server answers (so that a wrong password or
    /// a server that is not Redis fails here, with one clear line).
    async fn connect(url: &str) -> Result<Self, Failure> {
        let unreachable = |reason: String| Failure::Unreachable {
            url: redact(url),
            reason,
        };
        // One server, a cluster or Sentinel, by the URL's scheme.
        let backend = Backend::open(url).map_err(|e| unreachable(e.to_string()))?;
        let mut conn = backend
            .connection()
            .map_err(|e| unreachable(e.to_string()))?;
        let attempt = async {
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok::<_, redis::RedisError>(())
        };
        // Name resolution is not covered by the connection timeout.
        let conn =
            match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), attempt).await {
                Ok(Ok(())) => conn,
                Ok(Err(e)) => return Err(unreachable(redis_reason(&e))),
                Err(_) => {
                    return Err(unreachable(format!(
                        "no answer within {}s",
                        CONNECT_TIMEOUT.as_secs() + 1
                    )))
                }
            };
        Ok(Self { backend, conn })
    }

    async fn query<T: FromRedisValue>(
        &mut self,
        what: &str,
        cmd: &redis::Cmd,
    ) -> Result<T, Failure> {
        cmd.query_async(&mut self.conn)
            .await
            .map_err(|e| failed(what, &e))
    }

    /// The server's clock, Unix milliseconds.
    async fn now_ms(&mut self) -> Result<u64, Failure> {
        let (secs, micros): (u64, u64) = self.query("TIME", &redis::cmd("TIME")).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Every key matching `pattern` (a whole `SCAN`, never `KEYS`); keys
    /// that are not UTF-8 cannot belong to a target and are skipped.
    async fn scan(&mut self, pattern: &str) -> Result<Vec<String>, Failure> {
        self.conn
            .scan(pattern)
            .await
            .map_err(|e| Failure::Failed(format!("redis {e}")))
    }

    /// Finds the targets of `namespace` from their heartbeat, queue and
    /// dead-letter keys, and sums each up.
    async fn discover(&mut self, namespace: &str) -> Result<Vec<Summary>, Failure> {
        let mut found: BTreeMap<String, (Target, Vec<String>)> = BTreeMap::new();
        for suffix in ["hb*", "queue", "dead"] {
            for key in self.scan(&format!("{namespace}:{{*}}:{suffix}")).await? {
                let Some((target, instance)) = parse_key(namespace, &key) else {
                    continue;
                };
                let slot = found
                    .entry(target.name().to_owned())
                    .or_insert_with(|| (target, Vec::new()));
                if instance {
                    slot.1.push(key);
                }
            }
        }
        let mut summaries = Vec::with_capacity(found.len());
        for (_, (target, instances)) in found {
            // A target whose only key expired since the scan is still
            // listed (down): it was there.
            summaries.push(self.summary(&target, instances).await?);
        }
        Ok(summaries)
    }

    /// The instance heartbeat keys of `target` (`ns:{t}:hb:*`).
    async fn instance_keys(&mut self, target: &Target) -> Result<Vec<String>, Failure> {
        let prefix = target.instance_key_prefix();
        let pattern = format!("{prefix}*");
        let keys = self.scan(&pattern).await?;
        Ok(keys
            .into_iter()
            .filter(|k| {
                k.strip_prefix(&prefix).is_some_and(|instance| {
                    target.instance_heartbeat_key(instance).as_deref() == Ok(k.as_str())
                })
            })
            .collect())
    }

    /// Fails with "no such target" unless one of the target's keys exists.
    async fn require(&mut self, target: &Target) -> Result<(), Failure> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(target.heartbeat_key())
            .arg(target.queue_key())
            .arg(target.dead_letter_key())
            .arg(target.lease_key());
        let n: u64 = self.query("EXISTS", &cmd).await?;
        if n > 0 || !self.instance_keys(target).await?.is_empty() {
            Ok(())
        } else {
            Err(no_such_target(target))
        }
    }

    async fn heartbeat(
        &mut self,
        target: &Target,
        instances: Vec<String>,
    ) -> Result<HeartbeatState, Failure> {
        let mut keys = vec![target.heartbeat_key()];
        keys.extend(instances);
        let keys = read_heartbeat_keys(&mut self.conn, &keys)
            .await
            .map_err(|e| {
                Failure::Failed(format!(
                    "redis heartbeat read failed: {}",
                    one_line(&error_chain(&e))
                ))
            })?
            .into_iter()
            .map(HeartbeatKey)
            .filter(HeartbeatKey::exists)
            .collect();
        Ok(HeartbeatState { keys })
    }

    async fn summary(
        &mut self,
        target: &Target,
        instances: Vec<String>,
    ) -> Result<Summary, Failure> {
        let heartbeat = self.heartbeat(target, instances).await?;
        let queue = target.queue_key();
        let dead_key = target.dead_letter_key();
        let mut pipe = redis::pipe();
        pipe.cmd("TIME")
            .cmd("TYPE")
            .arg(&queue)
            .cmd("TYPE")
            .arg(&dead_key)
            .cmd("EXISTS")
            .arg(target.lease_key());
        let ((secs, micros), queue_type, dead_type, lease): ((u64, u64), String, String, u64) =
            pipe.query_async(&mut self.conn)
                .await
                .map_err(|e| failed(&format!("reading the keys of {}", target.name()), &e))?;
        let now = secs * 1000 + micros / 1000;
        let mut problems = Vec::new();
        let mut wrong_type = |key: &str, kind: &str| {
            problems.push(format!("{key} is a {kind}, not a stream"));
        };

        let mut summary = Summary {
            name: target.name().to_owned(),
            namespace: target.namespace().to_owned(),
            exists: !heartbeat.keys.is_empty()
                || queue_type != "none"
                || dead_type != "none"
                || lease > 0,
            heartbeat,
            queue: Some(0),
            oldest_entry_id: None,
            oldest_age_ms: None,
            pending: 0,
            dead: Some(0),
            group_exists: false,
            problems: Vec::new(),
        };
        match dead_type.as_str() {
            "none" => {}
            "stream" => {
                let mut cmd = redis::cmd("XLEN");
                cmd.arg(&dead_key);
                summary.dead = Some(self.query("XLEN", &cmd).await?);
            }
            other => {
                summary.dead = None;
                wrong_type(&dead_key, other);
            }
        }
        match queue_type.as_str() {
            "none" => {}
            "stream" => {
                let mut pipe = redis::pipe();
                pipe.cmd("XLEN")
                    .arg(&queue)
                    .cmd("XRANGE")
                    .arg(&queue)
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(1);
                let (len, first): (u64, Value) = pipe
                    .query_async(&mut self.conn)
                    .await
                    .map_err(|e| failed("XLEN/XRANGE", &e))?;
                summary.queue = Some(len);
                summary.oldest_entry_id = stream_entries(&first)
                    .into_iter()
                    .next()
                    .map(|e| e.entry_id);
                summary.oldest_age_ms = summary
                    .oldest_entry_id
                    .as_deref()
                    .and_then(parse_stream_id)
                    .map(|(ms, _)| now.saturating_sub(ms));

                let mut cmd = redis::cmd("XPENDING");
                cmd.arg(&queue).arg(GROUP);
                match cmd.query_async::<Value>(&mut self.conn).await {
                    Ok(reply) => {
                        summary.group_exists = true;
                        if let Some(Value::Int(n)) = items(&reply).first() {
                            summary.pending = u64::try_from(*n).unwrap_or(0);
                        }
                    }
                    Err(e) if e.code() == Some("NOGROUP") => {}
                    Err(e) => return Err(failed("XPENDING", &e)),
                }
            }
            other => {
                summary.queue = None;
                wrong_type(&queue, other);
            }
        }
        summary.problems = problems;
        Ok(summary)
    }

    async fn details(&mut self, target: &Target, group_exists: bool) -> Result<Details, Failure> {
        // A lease is a string; anything else under its key is shown by type.
        let mut script = redis::cmd("EVAL");
        script.arg(LEASE_READ).arg(1).arg(target.lease_key());
        let reply: Value = self.query("lease read", &script).await?;
        let parts = items(&reply);
        let lease = match (parts.first(), parts.get(1)) {
            (Some(holder), Some(Value::Int(pttl))) => Some((text(holder), *pttl)),
            _ => None,
        };

        let mut consumers = Vec::new();
        if group_exists {
            let mut cmd = redis::cmd("XINFO");
            cmd.arg("CONSUMERS").arg(target.queue_key()).arg(GROUP);
            let reply = match cmd.query_async::<Value>(&mut self.conn).await {
                Ok(v) => v,
                // The group went away since XPENDING.
                Err(e) if e.code() == Some("NOGROUP") => Value::Nil,
                Err(e) => return Err(failed("XINFO CONSUMERS", &e)),
            };
            for consumer in items(&reply) {
                let fields = pairs(consumer);
                let get = |name: &[u8]| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
                let number = |name: &[u8]| match get(name) {
                    Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                    Some(v) => text(v).parse().unwrap_or(0),
                    None => 0,
                };
                consumers.push(Consumer {
                    name: get(b"name").map(text).unwrap_or_default(),
                    pending: number(b"pending"),
                    idle_ms: number(b"idle"),
                });
            }
        }
        Ok(Details { lease, consumers })
    }

    async fn peek(&mut self, target: &Target, count: u64) -> Result<Vec<RawEntry>, Failure> {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(target.queue_key())
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(count);
        let reply: Value = self.query("XRANGE", &cmd).await?;
        Ok(stream_entries(&reply))
    }

    /// Requeues the dead letters there are now (not those dead-lettered
    /// again meanwhile, which come after them); returns how many.
    async fn requeue_all(&mut self, target: &Target, dead: &DeadLetters) -> Result<u64, Failure> {
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(target.dead_letter_key())
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        let last: Value = self.query("XREVRANGE", &cmd).await?;
        let Some(cutoff) = stream_entries(&last)
            .first()
            .and_then(|e| parse_stream_id(&e.entry_id))
        else {
            return Ok(0);
        };
        let mut requeued = 0;
        loop {
            let batch = dead.list(REQUEUE_BATCH).await?;
            let mut progress = false;
            let mut past_cutoff = false;
            for letter in &batch {
                if parse_stream_id(&letter.entry_id).is_none_or(|id| id > cutoff) {
                    past_cutoff = true;
                    break;
                }
                if dead.requeue(&letter.entry_id).await? {
                    requeued += 1;
                    progress = true;
                }
            }
            if batch.is_empty() || past_cutoff || !progress {
                return Ok(requeued);
            }
        }
    }
}

/// The target (and whether the key is an instance heartbeat) a discovered
/// key belongs to, if it is one of the layout's keys with valid names.
fn parse_key(namespace: &str, key: &str) -> Option<(Target, bool)> {
    let rest = key.strip_prefix(namespace)?.strip_prefix(":{")?;
    let close = rest.find('}')?;
    let name = &rest[..close];
    let suffix = rest[close + 1..].strip_prefix(':')?;
    let target = Target::with_namespace(namespace, name).ok()?;
    let instance = match suffix {
        "hb" | "queue" | "dead" => false,
        _ => {
            let instance = suffix.strip_prefix("hb:")?;
            if target.instance_heartbeat_key(instance).ok()? != key {
                return None;
            }
            true
        }
    };
    Some((target, instance))
}

/// A failed command, as one line.
fn failed(what: &str, e: &redis::RedisError) -> Failure {
    Failure::Failed(format!("redis {what} failed: {}", redis_reason(e)))
}

/// An error and its sources, as one string.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A redis-rs error as one readable line.
fn redis_reason(e: &redis::RedisError) -> String {
    one_line(&e.to_string())
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `url` with its password (userinfo or `pass`/`password` query
/// parameter) replaced by `***`, fit to print.
fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(start) = url.find("://").map(|i| i + 3) {
        if let Some(at) = url.rfind('@').filter(|&at| at > start) {
            let userinfo = &url[start..at];
            if let Some(colon) = userinfo.find(':') {
                out = format!("{}{}:***{}", &url[..start], &userinfo[..colon], &url[at..]);
            }
        }
    }
    if let Some((base, query)) = out.split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((name, _)) if name == "pass" || name == "password" => format!("{name}=***"),
                _ => param.to_owned(),
            })
            .collect();
        out = format!("{base}?{}", query.join("&"));
    }
    out
}

// ---------------------------------------------------------------------------
// Replies

fn text(v: &Value) -> String {
    String::from_utf8_lossy(&bytes(v)).into_owned()
}

fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        Value::VerbatimString { text, .. } => text.clone().into_bytes(),
        Value::Int(n) => n.to_string().into_bytes(),
        Value::Okay => b"OK".to_vec(),
        _ => Vec::new(),
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// Field/value pairs of a map reply (RESP3) or a flat array (RESP2).
fn pairs(v: &Value) -> Vec<(Vec<u8>, &Value)> {
    match v {
        Value::Map(map) => map.iter().map(|(k, v)| (bytes(k), v)).collect(),
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|kv| Some((bytes(&kv[0]), kv.get(1)?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XRANGE` reply, raw (a poison entry cannot break the
/// read of the others).
fn stream_entries(reply: &Value) -> Vec<RawEntry> {
    items(reply)
        .iter()
        .filter_map(|entry| {
            let parts = items(entry);
            let entry_id = text(parts.first()?);
            let fields = parts
                .get(1)
                .map(pairs)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, bytes(v)))
                .collect();
            Some(RawEntry { entry_id, fields })
        })
        .collect()
}

fn decode(entry: &RawEntry) -> Result<Envelope, tower_heartbeat_buffer::MalformedEntry> {
    Envelope::from_fields(
        entry
            .fields
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice())),
    )
}

// ---------------------------------------------------------------------------
// Output

fn pretty(value: &Json) -> String {
    let mut out = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into());
    out.push('\n');
    out
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A duration for people: `850ms`, `4.2s`, `3m05s`, `2h10m`, `3d04h`.
fn human(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{}.{}s", s, (ms % 1000) / 100),
        60_000..=3_599_999 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..=86_399_999 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A TTL as Redis gives it: -1 none, -2 gone.
fn human_ttl(ttl: Option<i64>) -> String {
    match ttl {
        None | Some(-2) => "-".into(),
        Some(-1) => "none".into(),
        Some(ms) => human(u64::try_from(ms).unwrap_or(0)),
    }
}

/// Text from Redis made safe for a terminal line: control characters escaped.
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The first bytes of a body, printable ASCII as is, the rest escaped.
fn preview(body: &[u8]) -> String {
    let mut out = String::new();
    for &b in body.iter().take(PREVIEW_BYTES) {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    if body.len() > PREVIEW_BYTES {
        out.push('…');
    }
    out
}

/// Columns aligned on their widest cell; numbers right-aligned. A row may
/// have fewer cells than the header: its last cell then runs on.
struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, bool)]) -> Self {
        Self {
            header: columns.iter().map(|(h, _)| *h).collect(),
            right: columns.iter().map(|(_, r)| *r).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| clean(c)).collect());
    }

    fn render(&self) -> String {
        let width = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            // A short row's last cell runs on and does not widen its column.
            let full = row.len() == self.header.len();
            for (i, cell) in row.iter().enumerate() {
                if full || i + 1 < row.len() {
                    widths[i] = widths[i].max(width(cell));
                }
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let last = i + 1 == row.len();
                let pad = widths[i].saturating_sub(width(cell));
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right[i] {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if !last {
                        line.push_str(&" ".repeat(pad));
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn targets_table(summaries: &[Summary]) -> String {
    let mut table = Table::new(&[
        ("TARGET", false),
        ("STATE", false),
        ("ALIVE", true),
        ("TTL", true),
        ("QUEUE", true),
        ("OLDEST", true),
        ("PENDING", true),
        ("DEAD", true),
    ]);
    for s in summaries {
        table.row(vec![
            s.name.clone(),
            s.heartbeat.state().to_owned(),
            format!("{}/{}", s.heartbeat.alive(), s.heartbeat.keys.len()),
            human_ttl(s.heartbeat.ttl_ms()),
            count(s.queue),
            s.oldest_age_ms.map_or_else(|| "-".into(), human),
            s.pending.to_string(),
            count(s.dead),
        ]);
    }
    let mut out = table.render();
    for s in summaries {
        for problem in &s.problems {
            let _ = writeln!(out, "{}: {}", clean(&s.name), clean(problem));
        }
    }
    out
}

/// A length, or `?` when the key is not a stream.
fn count(n: Option<u64>) -> String {
    n.map_or_else(|| "?".into(), |n| n.to_string())
}

fn status_text(s: &Summary, d: &Details) -> String {
    let mut out = String::new();
    let mut line = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<10} {}", clean(&value));
    };
    line("target", s.name.clone());
    line("namespace", s.namespace.clone());
    line("state", s.heartbeat.state().to_owned());
    line(
        "alive",
        format!(
            "{} of {} heartbeat key{}",
            s.heartbeat.alive(),
            s.heartbeat.keys.len(),
            plural(s.heartbeat.keys.len() as u64)
        ),
    );
    line("ttl", human_ttl(s.heartbeat.ttl_ms()));
    line(
        "queue",
        match (&s.oldest_entry_id, s.oldest_age_ms) {
            (Some(id), Some(age)) => {
                format!("{} (oldest {id}, {} old)", count(s.queue), human(age))
            }
            _ => count(s.queue),
        },
    );
    line("pending", s.pending.to_string());
    line("dead", count(s.dead));
    line(
        "lease",
        match &d.lease {
            Some((holder, ttl)) => format!("{holder} (ttl {})", human_ttl(Some(*ttl))),
            None => "-".into(),
        },
    );
    for problem in &s.problems {
        line("problem", problem.clone());
    }
    if !s.heartbeat.keys.is_empty() {
        out.push_str("\nheartbeat keys:\n");
        let mut table = Table::new(&[
            ("KEY", false),
            ("TYPE", false),
            ("STATUS", false),
            ("TTL", true),
            ("SERVING", false),
        ]);
        for k in &s.heartbeat.keys {
            table.row(vec![
                k.key.clone(),
                k.kind.clone(),
                if k.status.is_empty() {
                    "-".into()
                } else {
                    k.status.clone()
                },
                human_ttl(Some(k.pttl_ms)),
                if k.serving() { "yes" } else { "no" }.into(),
            ]);
        }
        out.push_str(&table.render());
    }
    if !d.consumers.is_empty() {
        out.push_str("\nconsumers:\n");
        let mut table = Table::new(&[("NAME", false), ("PENDING", true), ("IDLE", true)]);
        for c in &d.consumers {
            table.row(vec![
                c.name.clone(),
                c.pending.to_string(),
                human(c.idle_ms),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

fn peek_table(entries: &[RawEntry], now: u64) -> String {
    let mut table = Table::new(&[
        ("ENTRY", false),
        ("AGE", true),
        ("METHOD", false),
        ("URI", false),
        ("ID", false),
        ("ATTEMPTS", true),
        ("BODY", true),
        ("PREVIEW", false),
    ]);
    for entry in entries {
        match decode(entry) {
            Ok(e) => table.row(vec![
                entry.entry_id.clone(),
                human(now.saturating_sub(e.enqueued_at_ms)),
                e.method.to_string(),
                e.uri.to_string(),
                e.id.clone(),
                e.attempts.to_string(),
                e.body.len().to_string(),
                preview(&e.body),
            ]),
            Err(err) => table.row(vec![
                entry.entry_id.clone(),
                entry_age(&entry.entry_id, now),
                "MALFORMED".into(),
                err.to_string(),
            ]),
        }
    }
    table.render()
}

fn entry_age(entry_id: &str, now: u64) -> String {
    parse_stream_id(entry_id).map_or_else(|| "-".into(), |(ms, _)| human(now.saturating_sub(ms)))
}

fn peek_json(entry: &RawEntry, now: u64) -> Json {
    match decode(entry) {
        Ok(e) => json!({
            "entry_id": entry.entry_id,
            "id": e.id,
            "method": e.method.as_str(),
            "uri": e.uri.to_string(),
            "enqueued_at_ms": e.enqueued_at_ms,
            "age_ms": now.saturating_sub(e.enqueued_at_ms),
            "attempts": e.attempts,
            "body_bytes": e.body.len(),
            "body_preview": preview(&e.body),
        }),
        Err(err) => json!({
            "entry_id": entry.entry_id,
            "error": err.to_string(),
        }),
    }
}

fn dead_table(letters: &[DeadLetter], total: u64, now: u64) -> String {
    let mut table = Table::new(&[
        ("ENTRY", false),
        ("DEAD FOR", true),
        ("ID", false),
        ("METHOD", false),
        ("URI", false),
        ("REASON", false),
    ]);
    for l in letters {
        let (id, method, uri) = match &l.request {
            Ok(e) => (e.id.clone(), e.method.to_string(), e.uri.to_string()),
            Err(_) => ("-".into(), "-".into(), "(undecodable)".into()),
        };
        table.row(vec![
            l.entry_id.clone(),
            human(now.saturating_sub(l.dead_at_ms)),
            id,
            method,
            uri,
            l.reason.clone(),
        ]);
    }
    let mut out = table.render();
    let shown = letters.len() as u64;
    if total > shown {
        let _ = writeln!(out, "({} more; see -n)", total - shown);
    }
    out
}

fn dead_json(l: &DeadLetter, now: u64) -> Json {
    let mut object = json!({
        "entry_id": l.entry_id,
        "reason": l.reason,
        "dead_at_ms": l.dead_at_ms,
        "dead_for_ms": now.saturating_sub(l.dead_at_ms),
        "source_id": l.source_id,
    });
    if let Json::Object(map) = &mut object {
        match &l.request {
            Ok(e) => {
                map.insert("id".into(), json!(e.id));
                map.insert("method".into(), json!(e.method.as_str()));
                map.insert("uri".into(), json!(e.uri.to_string()));
                map.insert("attempts".into(), json!(e.attempts));
                map.insert("body_bytes".into(), json!(e.body.len()));
                map.insert("body_preview".into(), json!(preview(&e.body)));
            }
            Err(err) => {
                map.insert("error".into(), json!(err.to_string()));
            }
        }
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_parsed_into_targets() {
        let (t, instance) = parse_key("thb", "thb:{orders}:queue").unwrap();
        assert_eq!(t.name(), "orders");
        assert!(!instance);
        assert!(parse_key("thb", "thb:{orders}:hb:pod-1").unwrap().1);
        assert!(parse_key("thb", "thb:{orders}:hbx").is_none());
        assert!(parse_key("thb", "thb:{orders}:hb:").is_none());
        assert!(parse_key("thb", "thb:{orders}:done:1").is_none());
        assert!(parse_key("thb", "thb:{a}b}:queue").is_none());
        assert!(parse_key("thb", "thbx:{a}:queue").is_none());
        assert!(parse_key("thb", "thb:{a b}:queue").is_none());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("redis://:s3cret@host"), "redis://:***@host");
        assert_eq!(redact("redis://host:6379/"), "redis://host:6379/");
        assert_eq!(
            redact("redis+unix:///tmp/r.sock?db=1&pass=x"),
            "redis+unix:///tmp/r.sock?db=1&pass=***"
        );
    }

    #[test]
    fn durations_and_bodies_read_well() {
        assert_eq!(human(850), "850ms");
        assert_eq!(human(4_250), "4.2s");
        assert_eq!(human(185_000), "3m05s");
        assert_eq!(human(7_800_000), "2h10m");
        assert_eq!(human(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(preview(b"a\x00\\\n\xff"), "a\\x00\\\\\\n\\xff");
        assert!(preview(&[b'x'; 61]).ends_with("x…"));
    }

    #[test]
    fn stream_ids_are_checked() {
        assert_eq!(parse_stream_id("1715-3"), Some((1715, 3)));
        assert_eq!(parse_stream_id("1715"), Some((1715, 0)));
        assert!(parse_stream_id("17a-0").is_none());
        assert!(parse_stream_id("-1").is_none());
        assert!(parse_stream_id("").is_none());
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&[("A", false), ("NUM", true), ("C", false)]);
        t.row(vec!["long".into(), "1".into(), "x".into()]);
        t.row(vec!["s".into(), "100".into()]);
        assert_eq!(t.render(), "A     NUM  C\nlong    1  x\ns     100\n");
    }
}
