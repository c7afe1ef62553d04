//! Where Redis lives — one server, a Redis Cluster, or a primary found
//! through Sentinel — and the one connection type the rest of the crate
//! talks through, so the layer, the watcher and the replayer never ask
//! which. The user-facing story is on [`Backend`].

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo, PushKind,
    RedisFuture, Value,
};

use crate::error::{InvalidConfig, RedisError};
use crate::sync::lock;

/// How long the shared data connection waits for one reply before it counts
/// the connection as broken and reconnects. Callers bound every command with
/// their own (usually shorter) timeout; this only catches a hung socket.
const DATA_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections (per server or cluster node) for writes followed by `WAIT`.
const WAIT_CONNECTIONS: usize = 8;
/// Sentinel: after a failed lookup, commands fail at once for this long
/// instead of each asking the sentinels again.
const SENTINEL_RETRY: Duration = Duration::from_millis(100);
/// Sentinel: longest lookup (sentinels asked, primary checked, subscriptions
/// re-made) before it counts as failed.
const SENTINEL_LOOKUP: Duration = Duration::from_secs(2);

/// Where the crate's Redis lives.
///
/// Build one from a URL with [`Backend::open`], from a
/// [`redis::Client`] (one server, `From`), or with [`Backend::cluster`] /
/// [`Backend::sentinel`]; pass it (or a `redis::Client`, which converts) to
/// [`Watcher::connect`](crate::heartbeat::Watcher::connect) and
/// [`Heartbeat::builder`](crate::heartbeat::Heartbeat)'s `start`. Clones
/// share one data connection.
///
/// ```
/// use tower_heartbeat_buffer::Backend;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let single = Backend::open("redis://127.0.0.1:6379/")?;
/// let cluster = Backend::open("redis+cluster://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000")?;
/// let sentinel = Backend::open("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster")?;
/// assert_eq!(cluster.kind(), "cluster");
/// # let _ = (single, sentinel);
/// # Ok(())
/// # }
/// ```
///
/// # Connections per process
///
/// Every clone of a [`Backend`] shares one *data* connection (one
/// multiplexed connection per server, or per cluster node), opened on first
/// use: the buffers of every target, the replayers, the dead letters and the
/// heartbeat publisher pipeline their commands on it. A [`Watcher`](crate::Watcher) adds one
/// more (per node) for the keyspace notifications it subscribes to. So a
/// process watching and draining a hundred targets holds two connections to
/// a single server, not two hundred. Nothing on them ever blocks (no
/// `BLOCK`), so sharing costs no head-of-line waits beyond the bytes
/// themselves. The one exception has connections of its own: `WAIT` holds
/// its connection until the replicas answer, so layers built with
/// [`wait_for_replicas`](crate::HeartbeatBufferBuilder::wait_for_replicas)
/// write through a pool of 8 more connections, shared by every clone.
///
/// # Cluster
///
/// Every key of a target carries the target's name as a hash tag
/// (`ns:{name}:...`), so one target's keys, scripts and `MULTI` blocks live
/// in one slot on one node; different targets spread over the nodes.
/// Redirections (`MOVED`, `ASK`) and slot-map refreshes after a failover are
/// redis-rs' `cluster-async` business. Keyspace notifications are local to
/// the node that owns a key; their channel names carry the same hash tag, so
/// the subscription follows the key's slot to whichever node serves it,
/// and moves with it after a failover or resharding.
///
/// # Sentinel
///
/// The primary's address is asked of the sentinels, and asked again when the
/// current primary stops answering or refuses writes (`READONLY` after a
/// demotion): the next command after a failover goes to the new primary, the
/// watcher's subscriptions are re-made there and every view re-reads.
#[derive(Clone)]
pub struct Backend {
    kind: Arc<Kind>,
    /// The data connection every clone shares, opened on first use.
    data: Arc<OnceLock<Conn>>,
    /// The connections for `WAIT`ed writes, opened on first use.
    waiting: Arc<OnceLock<Arc<ConnPool>>>,
}

enum Kind {
    Single(redis::Client),
    Cluster(Vec<ConnectionInfo>),
    Sentinel {
        master: String,
        sentinels: Vec<ConnectionInfo>,
        node: redis::RedisConnectionInfo,
    },
}

impl Backend {
    /// Parses a URL:
    ///
    /// - `redis://`, `rediss://` (feature `tls`), `unix://`: one server, as
    ///   [`redis::Client::open`] reads it.
    /// - `redis+cluster://[user:password@]host:port,host:port,...`: a Redis
    ///   Cluster, reached through any of the seed nodes listed
    ///   (`rediss+cluster://` for TLS, feature `tls`).
    /// - `redis+sentinel://[user:password@]host:port,host:port,.../master[/db]`:
    ///   the primary that the listed sentinels know as `master`. The
    ///   credentials and database are the primary's; the sentinels are
    ///   asked without authentication (see [`Backend::sentinel_with`]).
    pub fn open(url: &str) -> Result<Self, InvalidConfig> {
        let cluster = [
            ("redis+cluster://", "redis"),
            ("rediss+cluster://", "rediss"),
        ]
        .into_iter()
        .find_map(|(prefix, scheme)| url.strip_prefix(prefix).map(|rest| (rest, scheme)));
        if let Some((rest, scheme)) = cluster {
            let (auth, hosts) = split_auth(rest);
            let hosts = hosts.trim_end_matches('/');
            let nodes: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("{scheme}://{auth}{h}/"))
                .collect();
            if nodes.is_empty() {
                return Err(InvalidConfig::new(format!("{}: no seed node", redact(url))));
            }
            return Self::cluster(nodes);
        }
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (auth, rest) = split_auth(rest);
            let mut parts = rest.splitn(3, '/');
            let hosts = parts.next().unwrap_or_default();
            let master = parts.next().unwrap_or_default();
            let db = parts.next().unwrap_or_default().trim_end_matches('/');
            if master.is_empty() {
                return Err(InvalidConfig::new(format!(
                    "{}: no master name (redis+sentinel://host:port,.../<master>)",
                    redact(url)
                )));
            }
            let sentinels: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{h}/"))
                .collect();
            let node_url = format!("redis://{auth}sentinel-node/{db}");
            let node = node_url
                .into_connection_info()
                .map_err(|e| InvalidConfig::new(format!("{}: {e}", redact(url))))?
                .redis_settings()
                .clone();
            return Self::sentinel_with(master, sentinels, node);
        }
        let client = redis::Client::open(url)
            .map_err(|e| InvalidConfig::new(format!("{}: {e}", redact(url))))?;
        Ok(Self::from(client))
    }

    /// A Redis Cluster reached through `seeds` (any nodes of it; the rest
    /// are discovered).
    pub fn cluster<T: IntoConnectionInfo>(
        seeds: impl IntoIterator<Item = T>,
    ) -> Result<Self, InvalidConfig> {
        let seeds = addresses(seeds, "cluster seed")?;
        Ok(Self::with_kind(Kind::Cluster(seeds)))
    }

    /// The primary that `sentinels` know as `master`, with no
    /// authentication and database 0.
    pub fn sentinel<T: IntoConnectionInfo>(
        master: impl Into<String>,
        sentinels: impl IntoIterator<Item = T>,
    ) -> Result<Self, InvalidConfig> {
        Self::sentinel_with(master, sentinels, redis::RedisConnectionInfo::default())
    }

    /// Like [`Backend::sentinel`], with the primary's credentials, database
    /// and protocol in `node`. Sentinels' own credentials go into their
    /// connection infos.
    pub fn sentinel_with<T: IntoConnectionInfo>(
        master: impl Into<String>,
        sentinels: impl IntoIterator<Item = T>,
        node: redis::RedisConnectionInfo,
    ) -> Result<Self, InvalidConfig> {
        let master = master.into();
        let sentinels = addresses(sentinels, "sentinel")?;
        if master.is_empty() {
            return Err(InvalidConfig::new("sentinel mode needs a master name"));
        }
        Ok(Self::with_kind(Kind::Sentinel {
            master,
            sentinels,
            node,
        }))
    }

    fn with_kind(kind: Kind) -> Self {
        Self {
            kind: Arc::new(kind),
            data: Arc::new(OnceLock::new()),
            waiting: Arc::new(OnceLock::new()),
        }
    }

    /// `"single"`, `"cluster"` or `"sentinel"`.
    pub fn kind(&self) -> &'static str {
        match *self.kind {
            Kind::Single(_) => "single",
            Kind::Cluster(_) => "cluster",
            Kind::Sentinel { .. } => "sentinel",
        }
    }

    /// The logical database (always 0 on a cluster).
    pub(crate) fn db(&self) -> i64 {
        match &*self.kind {
            Kind::Single(client) => client.get_connection_info().redis_settings().db(),
            Kind::Cluster(_) => 0,
            Kind::Sentinel { node, .. } => node.db(),
        }
    }

    /// A handle on the data connection every clone shares, for commands of
    /// your own (admin tools, tests): it routes by key on a cluster and
    /// follows the primary behind Sentinel. Opened lazily; cheap to clone.
    pub fn connection(&self) -> Result<BackendConnection, RedisError> {
        self.data().map(BackendConnection)
    }

    /// The connections every clone shares for writes followed by a `WAIT`,
    /// which holds its connection until the replicas answer: several, so
    /// that concurrent waits run side by side, and apart from the data
    /// connection, so that nothing else queues behind them.
    pub(crate) fn waiting(&self) -> Result<Arc<ConnPool>, RedisError> {
        if let Some(pool) = self.waiting.get() {
            return Ok(Arc::clone(pool));
        }
        let first = self.connect(None, DATA_RESPONSE_TIMEOUT)?;
        let more = (1..WAIT_CONNECTIONS)
            .map(|_| self.connect(None, DATA_RESPONSE_TIMEOUT))
            .collect::<Result<Vec<Conn>, _>>()?;
        let pool = Arc::new(ConnPool::new(first, more));
        Ok(Arc::clone(self.waiting.get_or_init(|| pool)))
    }

    /// The connection every clone shares, for commands (no subscriptions).
    pub(crate) fn data(&self) -> Result<Conn, RedisError> {
        if let Some(conn) = self.data.get() {
            return Ok(conn.clone());
        }
        let conn = self.connect(None, DATA_RESPONSE_TIMEOUT)?;
        // Two first callers may race: the loser's connection is lazy and
        // never opened, so dropping it costs nothing.
        Ok(self.data.get_or_init(|| conn).clone())
    }

    /// A connection of its own, with RESP3 pushes delivered to `push`
    /// (keyspace notifications, and a `Disconnection` push whenever the
    /// connection, or the node or primary behind it, changed so that
    /// notifications may have been missed).
    pub(crate) fn subscriber(
        &self,
        push: PushHandler,
        response_timeout: Duration,
    ) -> Result<Conn, RedisError> {
        self.connect(Some(push), response_timeout)
    }

    fn connect(
        &self,
        push: Option<PushHandler>,
        response_timeout: Duration,
    ) -> Result<Conn, RedisError> {
        match &*self.kind {
            Kind::Single(client) => {
                single_manager(client, push.as_ref(), response_timeout).map(Conn::Single)
            }
            Kind::Cluster(seeds) => {
                let mut builder = ClusterClientBuilder::new(seeds.clone()).retries(3);
                let mut config = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(response_timeout);
                if let Some(push) = push {
                    builder = builder.use_protocol(ProtocolVersion::RESP3);
                    config = config.set_push_sender(move |info: PushInfo| {
                        push(info);
                        Ok::<(), Infallible>(())
                    });
                }
                let client = builder
                    .build()
                    .map_err(|e| RedisError::new("cluster connect", e))?;
                Ok(Conn::Cluster(
                    client.get_pending_async_connection_with_config(config),
                ))
            }
            Kind::Sentinel {
                master,
                sentinels,
                node,
            } => {
                let lookup = SentinelLookup::new(sentinels.clone(), master.clone(), node.clone())
                    .map_err(|e| RedisError::new("sentinel connect", e))?;
                Ok(Conn::Sentinel(Arc::new(SentinelConn {
                    sentinels: tokio::sync::Mutex::new(lookup),
                    db: node.db(),
                    current: Mutex::new(Current::default()),
                    push,
                    response_timeout,
                    subscriptions: Mutex::new(Subscriptions::default()),
                })))
            }
        }
    }
}

impl From<redis::Client> for Backend {
    fn from(client: redis::Client) -> Self {
        Self::with_kind(Kind::Single(client))
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Addresses only: never credentials.
        let mut s = f.debug_struct("Backend");
        s.field("kind", &self.kind());
        match &*self.kind {
            Kind::Single(client) => s.field("addr", &client.get_connection_info().addr()),
            Kind::Cluster(seeds) => s.field(
                "seeds",
                &seeds
                    .iter()
                    .map(|s| s.addr().to_string())
                    .collect::<Vec<_>>(),
            ),
            Kind::Sentinel {
                master, sentinels, ..
            } => s.field("master", master).field(
                "sentinels",
                &sentinels
                    .iter()
                    .map(|s| s.addr().to_string())
                    .collect::<Vec<_>>(),
            ),
        };
        s.finish()
    }
}

/// The connection infos of `items`: at least one, each valid.
fn addresses<T: IntoConnectionInfo>(
    items: impl IntoIterator<Item = T>,
    what: &str,
) -> Result<Vec<ConnectionInfo>, InvalidConfig> {
    let infos = items
        .into_iter()
        .map(|item| item.into_connection_info())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| InvalidConfig::new(format!("{what} address: {e}")))?;
    if infos.is_empty() {
        return Err(InvalidConfig::new(format!("no {what} address given")));
    }
    Ok(infos)
}

/// `user:pass@host,host` -> (`user:pass@`, `host,host`).
fn split_auth(rest: &str) -> (&str, &str) {
    match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    }
}

/// The URL without its credentials, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Receives RESP3 pushes; runs inside a connection's reader, so it must not
/// block.
pub(crate) type PushHandler = Arc<dyn Fn(PushInfo) + Send + Sync>;

fn single_manager(
    client: &redis::Client,
    push: Option<&PushHandler>,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    let mut config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        // One quick retry inside the manager; callers pace the rest.
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    let client = match push {
        Some(push) => {
            let push = Arc::clone(push);
            config = config
                .set_push_sender(move |info: PushInfo| {
                    push(info);
                    Ok::<(), Infallible>(())
                })
                .set_automatic_resubscription();
            // Pushes need RESP3 on the same connection that reads keys.
            let info = client.get_connection_info().clone();
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            redis::Client::open(info.set_redis_settings(settings))
                .map_err(|e| RedisError::new("connect", e))?
        }
        None => client.clone(),
    };
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| RedisError::new("connect", e))
}

/// A connection to wherever a [`Backend`] points, from
/// [`Backend::connection`]: use it as any redis-rs async connection
/// (`query_async(&mut conn)`). Commands are routed by their key on a
/// cluster; [`scan`](Self::scan) covers every primary.
#[derive(Clone)]
pub struct BackendConnection(Conn);

impl BackendConnection {
    /// Every key matching `pattern`, by `SCAN` (never `KEYS`) on the one
    /// server or on every primary of a cluster; sorted, without duplicates.
    pub async fn scan(&mut self, pattern: &str) -> Result<Vec<String>, RedisError> {
        self.0
            .scan_all(pattern)
            .await
            .map_err(|e| RedisError::new("scan", e))
    }
}

impl ConnectionLike for BackendConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

impl fmt::Debug for BackendConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0 {
            Conn::Single(_) => "single",
            Conn::Cluster(_) => "cluster",
            Conn::Sentinel(_) => "sentinel",
        };
        f.debug_struct("BackendConnection")
            .field("kind", &kind)
            .finish()
    }
}

/// The primaries' `(host, port)` in a `CLUSTER SLOTS` reply, whose ranges
/// read `[start, end, [host, port, id, ...], replicas...]`.
fn primary_addresses(slots: &Value) -> BTreeSet<(String, u16)> {
    let mut primaries = BTreeSet::new();
    let Value::Array(ranges) = slots else {
        return primaries;
    };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let Some(Value::Array(primary)) = parts.get(2) else {
            continue;
        };
        let host = match primary.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        if let Some(Value::Int(port)) = primary.get(1) {
            if let Ok(port) = u16::try_from(*port) {
                primaries.insert((host, port));
            }
        }
    }
    primaries
}

/// Connections handed out in turn (each opens on its first use).
pub(crate) struct ConnPool {
    conns: Vec<Conn>,
    next: std::sync::atomic::AtomicUsize,
}

impl ConnPool {
    /// A pool of `first` and `more` (never empty, by construction).
    pub(crate) fn new(first: Conn, more: Vec<Conn>) -> Self {
        let mut conns = Vec::with_capacity(1 + more.len());
        conns.push(first);
        conns.extend(more);
        Self {
            conns,
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The next connection in turn.
    pub(crate) fn next(&self) -> Conn {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns[i % self.conns.len()].clone()
    }
}

/// Keys per `SCAN` call.
const SCAN_COUNT: usize = 1000;

/// A connection to wherever the [`Backend`] points: cheap to clone (clones
/// share the underlying multiplexed connections), reconnects by itself.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConn>),
}

impl Conn {
    pub(crate) async fn subscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Conn::Single(c) => c.subscribe(channel).await,
            Conn::Cluster(c) => c.subscribe(channel).await,
            Conn::Sentinel(s) => s.subscription(Sub::Channel(channel.to_owned()), true).await,
        }
    }

    pub(crate) async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Conn::Single(c) => c.unsubscribe(channel).await,
            Conn::Cluster(c) => c.unsubscribe(channel).await,
            Conn::Sentinel(s) => {
                s.subscription(Sub::Channel(channel.to_owned()), false)
                    .await
            }
        }
    }

    pub(crate) async fn psubscribe(&mut self, pattern: &str) -> redis::RedisResult<()> {
        match self {
            Conn::Single(c) => c.psubscribe(pattern).await,
            Conn::Cluster(c) => c.psubscribe(pattern).await,
            Conn::Sentinel(s) => s.subscription(Sub::Pattern(pattern.to_owned()), true).await,
        }
    }

    /// Runs a keyless command on the node that serves `key`'s slot (on a
    /// cluster; elsewhere, on the one server). For `SCAN` of one target's
    /// keys, which a cluster would otherwise send to a random node.
    pub(crate) async fn query_on_node_of<T: redis::FromRedisValue>(
        &mut self,
        key: &str,
        cmd: &Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            Conn::Cluster(c) => {
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                let value = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                redis::FromRedisValue::from_redis_value(value).map_err(Into::into)
            }
            _ => cmd.query_async(self).await,
        }
    }

    /// `SCAN MATCH pattern` to the end, on every primary of a cluster.
    async fn scan_all(&mut self, pattern: &str) -> redis::RedisResult<Vec<String>> {
        let nodes: Vec<Option<(String, u16)>> = match self {
            Conn::Cluster(c) => {
                let slots: Value = c
                    .route_command(
                        redis::cmd("CLUSTER").arg("SLOTS").clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await?;
                let primaries = primary_addresses(&slots);
                primaries.into_iter().map(Some).collect()
            }
            _ => vec![None],
        };
        let mut keys = Vec::new();
        for node in nodes {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT);
                let (next, found): (u64, Vec<Vec<u8>>) = match (&node, &mut *self) {
                    (Some((host, port)), Conn::Cluster(c)) => {
                        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        });
                        let value = c.route_command(cmd, routing).await?;
                        redis::FromRedisValue::from_redis_value(value)?
                    }
                    _ => cmd.query_async(self).await?,
                };
                keys.extend(found.into_iter().filter_map(|k| String::from_utf8(k).ok()));
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Runs `cmd` on every node (every server of a cluster, primaries and
    /// replicas; the one server elsewhere) and returns each answer.
    pub(crate) async fn query_on_all_nodes(&mut self, cmd: &Cmd) -> redis::RedisResult<Vec<Value>> {
        match self {
            Conn::Cluster(c) => {
                let value = c
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None)),
                    )
                    .await?;
                Ok(match value {
                    Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
                    Value::Array(items) => items,
                    other => vec![other],
                })
            }
            _ => Ok(vec![cmd.query_async(self).await?]),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => {
                let s = Arc::clone(s);
                Box::pin(async move {
                    let (generation, mut conn) = s.primary().await?;
                    let result = conn.req_packed_command(cmd).await;
                    if let Err(e) = &result {
                        s.check_error(generation, e);
                    }
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => {
                let s = Arc::clone(s);
                Box::pin(async move {
                    let (generation, mut conn) = s.primary().await?;
                    let result = conn.req_packed_commands(pipeline, offset, count).await;
                    match &result {
                        Err(e) => s.check_error(generation, e),
                        Ok(values) => {
                            // A MULTI/EXEC block answers READONLY inside.
                            if let Some(e) = values.iter().find_map(readonly_in) {
                                s.check_error(generation, &e);
                            }
                        }
                    }
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(s) => s.db,
        }
    }
}

fn readonly_in(value: &Value) -> Option<redis::RedisError> {
    match value {
        Value::ServerError(e) if e.code() == "READONLY" => Some(e.clone().into()),
        Value::Array(items) => items.iter().find_map(readonly_in),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Sub {
    Channel(String),
    Pattern(String),
}

#[derive(Default)]
struct Subscriptions {
    channels: BTreeSet<String>,
    patterns: BTreeSet<String>,
}

#[derive(Default)]
struct Current {
    /// Bumped at every connection made, so a failure reported against an
    /// old connection does not throw away a new one; 0 before the first.
    generation: u64,
    conn: Option<ConnectionManager>,
    /// When the last lookup failed (commands fail fast for a moment).
    failed_at: Option<Instant>,
}

/// The primary behind a set of sentinels, looked up again when it fails.
/// Asks the sentinels, in turn.
struct SentinelLookup {
    client: SentinelClient,
    /// The sentinels, the first one asked first.
    addrs: Vec<ConnectionInfo>,
    master: String,
    node: redis::RedisConnectionInfo,
}

impl SentinelLookup {
    fn new(
        addrs: Vec<ConnectionInfo>,
        master: String,
        node: redis::RedisConnectionInfo,
    ) -> redis::RedisResult<Self> {
        let client = Self::client(&addrs, &master, &node)?;
        Ok(Self {
            client,
            addrs,
            master,
            node,
        })
    }

    fn client(
        addrs: &[ConnectionInfo],
        master: &str,
        node: &redis::RedisConnectionInfo,
    ) -> redis::RedisResult<SentinelClient> {
        // redis-rs takes a `String` here without TLS support and an
        // `AsRef<str>` with it: the owned copy serves both.
        #[allow(clippy::unnecessary_to_owned)]
        SentinelClient::build(
            addrs.to_vec(),
            master.to_owned(),
            Some(SentinelNodeConnectionInfo::default().set_redis_connection_info(node.clone())),
            SentinelServerType::Master,
        )
    }

    /// After a failed lookup, starts the next one at the next sentinel: the
    /// client asks them in order, so one that hangs (rather than refusing
    /// connections) would otherwise stall every lookup behind it.
    fn rotate(&mut self) {
        self.addrs.rotate_left(1);
        if let Ok(client) = Self::client(&self.addrs, &self.master, &self.node) {
            self.client = client;
        }
    }
}

pub(crate) struct SentinelConn {
    sentinels: tokio::sync::Mutex<SentinelLookup>,
    /// The primary's logical database.
    db: i64,
    current: Mutex<Current>,
    push: Option<PushHandler>,
    response_timeout: Duration,
    /// What to re-subscribe on a new primary.
    subscriptions: Mutex<Subscriptions>,
}

impl SentinelConn {
    /// The current primary's connection, looking it up when there is none.
    async fn primary(self: &Arc<Self>) -> redis::RedisResult<(u64, ConnectionManager)> {
        if let Some(known) = self.known()? {
            return Ok(known);
        }
        // The lookup runs in a task of its own: callers give up after their
        // own timeouts (often shorter than a lookup that must skip a hung
        // sentinel), and a lookup cancelled with them would never finish.
        let this = Arc::clone(self);
        match tokio::spawn(async move { this.look_up_once().await }).await {
            Ok(result) => result,
            Err(e) => Err(no_primary(&format!("the lookup task failed: {e}"))),
        }
    }

    /// The current primary; an error when a lookup failed moments ago.
    fn known(&self) -> redis::RedisResult<Option<(u64, ConnectionManager)>> {
        let current = lock(&self.current);
        if let Some(conn) = &current.conn {
            return Ok(Some((current.generation, conn.clone())));
        }
        if current
            .failed_at
            .is_some_and(|at| at.elapsed() < SENTINEL_RETRY)
        {
            return Err(no_primary("the last sentinel lookup failed moments ago"));
        }
        Ok(None)
    }

    async fn look_up_once(&self) -> redis::RedisResult<(u64, ConnectionManager)> {
        // One lookup at a time; whoever waited behind it uses its result.
        let mut sentinels = self.sentinels.lock().await;
        if let Some(known) = self.known()? {
            return Ok(known);
        }
        let looked_up =
            match tokio::time::timeout(SENTINEL_LOOKUP, self.look_up(&mut sentinels)).await {
                Ok(result) => result,
                Err(_) => Err(no_primary(
                    "the sentinels or the primary did not answer in time",
                )),
            };
        match looked_up {
            Ok(conn) => {
                let mut current = lock(&self.current);
                // Any connection after the first one is a switch.
                let failover = current.generation > 0;
                current.generation += 1;
                current.conn = Some(conn.clone());
                current.failed_at = None;
                let generation = current.generation;
                drop(current);
                if failover {
                    tracing::info!("connected to the primary named by the sentinels");
                    if let Some(push) = &self.push {
                        // Whatever changed meanwhile was not notified here.
                        push(PushInfo {
                            kind: PushKind::Disconnection,
                            data: vec![],
                        });
                    }
                }
                Ok((generation, conn))
            }
            Err(e) => {
                sentinels.rotate();
                lock(&self.current).failed_at = Some(Instant::now());
                Err(e)
            }
        }
    }

    async fn look_up(
        &self,
        sentinels: &mut SentinelLookup,
    ) -> redis::RedisResult<ConnectionManager> {
        // Asks the sentinels, then checks that the node they name says it
        // is a primary.
        let client = sentinels.client.async_get_client().await?;
        let conn = single_manager(&client, self.push.as_ref(), self.response_timeout)
            .map_err(|e| no_primary(&e.to_string()))?;
        let mut probe = conn.clone();
        let role: Value = redis::cmd("ROLE").query_async(&mut probe).await?;
        let is_master = matches!(&role, Value::Array(items)
            if matches!(items.first(), Some(Value::BulkString(b)) if b == b"master"));
        if !is_master {
            return Err(no_primary(
                "the node named by the sentinels is not a primary yet",
            ));
        }
        if self.push.is_some() {
            let (channels, patterns) = {
                let subs = lock(&self.subscriptions);
                (
                    subs.channels.iter().cloned().collect::<Vec<_>>(),
                    subs.patterns.iter().cloned().collect::<Vec<_>>(),
                )
            };
            let mut sub = conn.clone();
            if !channels.is_empty() {
                sub.subscribe(&channels).await?;
            }
            if !patterns.is_empty() {
                sub.psubscribe(&patterns).await?;
            }
        }
        Ok(conn)
    }

    /// Forgets the current primary when `e` says it is gone or demoted.
    fn check_error(&self, generation: u64, e: &redis::RedisError) {
        let demoted = matches!(e.code(), Some("READONLY" | "MASTERDOWN"));
        // A timeout too: a primary that hangs is failed over by the
        // sentinels like a dead one, and asking them again is cheap.
        let gone = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error();
        if demoted || gone {
            let mut current = lock(&self.current);
            if current.generation == generation && current.conn.is_some() {
                tracing::warn!(error = %e, "primary lost; asking the sentinels again");
                current.conn = None;
            }
        }
    }

    async fn subscription(self: &Arc<Self>, sub: Sub, on: bool) -> redis::RedisResult<()> {
        {
            let mut subs = lock(&self.subscriptions);
            let set = match &sub {
                Sub::Channel(c) => (&mut subs.channels, c),
                Sub::Pattern(p) => (&mut subs.patterns, p),
            };
            if on {
                set.0.insert(set.1.clone());
            } else {
                set.0.remove(set.1);
            }
        }
        let (generation, mut conn) = self.primary().await?;
        let result = match (&sub, on) {
            (Sub::Channel(c), true) => conn.subscribe(c).await,
            (Sub::Channel(c), false) => conn.unsubscribe(c).await,
            (Sub::Pattern(p), true) => conn.psubscribe(p).await,
            (Sub::Pattern(p), false) => conn.punsubscribe(p).await,
        };
        if let Err(e) = &result {
            self.check_error(generation, e);
        }
        result
    }
}

fn no_primary(why: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "no primary from the sentinels",
        why.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_choose_the_deployment() {
        assert_eq!(
            Backend::open("redis://127.0.0.1:6379/2").unwrap().kind(),
            "single"
        );
        assert_eq!(Backend::open("redis://127.0.0.1:6379/2").unwrap().db(), 2);
        let cluster = Backend::open("redis+cluster://u:p@a:7000,b:7001/").unwrap();
        assert_eq!(cluster.kind(), "cluster");
        let sentinel = Backend::open("redis+sentinel://a:26379,b:26379/mymaster/3").unwrap();
        assert_eq!(sentinel.kind(), "sentinel");
        assert_eq!(sentinel.db(), 3);
    }

    #[test]
    fn bad_urls_are_refused_without_leaking_credentials() {
        let e = Backend::open("redis+sentinel://user:secret@a:26379").unwrap_err();
        assert!(e.to_string().contains("master name"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = Backend::open("redis+cluster://").unwrap_err();
        assert!(e.to_string().contains("seed"), "{e}");
        assert!(Backend::open("nonsense").is_err());
    }

    #[test]
    fn cluster_slots_give_each_primary_once() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |start, end, primary, replica| {
            Value::Array(vec![Value::Int(start), Value::Int(end), primary, replica])
        };
        let reply = Value::Array(vec![
            range(0, 99, node("a", 7000), node("b", 7003)),
            range(100, 199, node("c", 7001), node("d", 7004)),
            range(200, 299, node("a", 7000), node("b", 7003)),
            Value::Nil,
        ]);
        let primaries: Vec<_> = primary_addresses(&reply).into_iter().collect();
        assert_eq!(primaries, [("a".to_owned(), 7000), ("c".to_owned(), 7001)]);
        assert!(primary_addresses(&Value::Nil).is_empty());
    }

    #[test]
    fn debug_shows_no_password() {
        let b = Backend::open("redis+cluster://user:secret@a:7000").unwrap();
        assert!(!format!("{b:?}").contains("secret"));
    }
}
