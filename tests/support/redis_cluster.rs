//! A real Redis Cluster for tests: `primaries` primaries with
//! `replicas_per_primary` replicas each, every node a private
//! [`RedisServer`] (own free port, own temp dir, AOF, KEA notifications).
//!
//! ```ignore
//! let mut cluster = RedisCluster::start(3, 1);            // 3 primaries + 3 replicas
//! let targets = cluster.keys_on_distinct_primaries(3);    // ["t0", "t4", "t1"]-like
//! let victim = cluster.primary_for_key(&format!("ns:{{{}}}:q", targets[0]));
//! cluster.kill_node(victim);                              // SIGKILL
//! let promoted = cluster.wait_for_failover(victim, Duration::from_secs(20));
//! ```
//!
//! Layout at start: nodes `0..primaries` are the primaries (primary `p` owns
//! an equal, contiguous share of the 16384 slots), the `r`-th replica of
//! primary `p` is node `primaries + p * replicas_per_primary + r`. After a
//! failover the roles change: ask the cluster ([`RedisCluster::primary_for_key`],
//! [`RedisCluster::current_primaries`], [`RedisCluster::replicas_of`]) instead
//! of relying on the initial layout.
//!
//! Settings chosen for quick, deterministic failovers:
//! `cluster-node-timeout` [`NODE_TIMEOUT_MS`] (a dead primary is failed over
//! after ~2-3 s), `cluster-replica-validity-factor 0` (a replica may always
//! be promoted, however long its link was down), `cluster-allow-replica-migration no`
//! (replicas never move to another primary by themselves),
//! `repl-diskless-sync-delay 0` (replicas sync at once), and the default
//! `cluster-require-full-coverage yes` (the cluster refuses writes while a
//! slot has no live primary, instead of answering for part of the keys).
//! Automatic failover needs a majority of primaries alive to vote: with
//! fewer than 3 primaries a dead primary is never replaced.
//!
//! Use the methods of [`RedisCluster`] to kill/pause/restart nodes (not the
//! [`RedisServer`] methods directly): the cluster tracks which nodes are up
//! and never queries a killed or paused one.
//!
//! Admin queries use cached connections that skip redis-rs' `CLIENT SETINFO`
//! handshake and show up in the nodes' command stats (`cluster|nodes`,
//! `cluster|info`, `cluster|keyslot`, `info`, `role`).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{RedisOptions, RedisServer};

/// `cluster-node-timeout` of every node, in milliseconds.
pub const NODE_TIMEOUT_MS: u64 = 1000;
/// How long [`RedisCluster::start`] waits for the cluster to converge.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the nodes may disagree about a slot's owner before
/// [`RedisCluster::primary_for_slot`] gives up.
const AGREE_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(2);
const SLOT_COUNT: u32 = 16384;
/// Attempts to start a node when its chosen cluster-bus port was taken meanwhile.
const BUS_PORT_ATTEMPTS: usize = 4;

/// What the harness did last to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Running,
    /// SIGSTOPped by [`RedisCluster::pause_node`].
    Paused,
    /// SIGKILLed by [`RedisCluster::kill_node`].
    Killed,
}

/// A running Redis Cluster; dropping it SIGKILLs every node and deletes
/// their temp dirs. See the module docs.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// Node IDs (`CLUSTER MYID`), by index; kept across restarts (nodes.conf).
    ids: Vec<String>,
    bus_ports: Vec<u16>,
    state: Vec<NodeState>,
    primaries: usize,
    replicas_per_primary: usize,
    /// Cached admin connections, by index (None = connect on next use).
    admin: Vec<Mutex<Option<redis::Connection>>>,
    /// Role, slots and replicas of a node just before kill_node/pause_node.
    down_snapshots: HashMap<usize, DownSnapshot>,
}

#[derive(Clone, Debug)]
struct DownSnapshot {
    slots: Vec<(u16, u16)>,
    replicas: Vec<usize>,
}

/// One line of `CLUSTER NODES`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    master: Option<String>,
    connected: bool,
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
    fn is_master(&self) -> bool {
        self.has("master")
    }
    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }
}

impl RedisCluster {
    /// Starts `primaries` primaries with `replicas_per_primary` replicas each
    /// (default [`RedisOptions`]: AOF, KEA notifications) and returns once every
    /// node reports `cluster_state:ok`, all nodes agree on the full topology
    /// and every replica's link to its primary is up. Panics with diagnostics
    /// (every node's view and log tail) if that takes more than ~30 s.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> Self {
        Self::start_with(primaries, replicas_per_primary, RedisOptions::default())
    }

    /// [`Self::start`] with `base` options for every node; the cluster settings
    /// (see the module docs) are appended as extra config lines.
    pub fn start_with(primaries: usize, replicas_per_primary: usize, base: RedisOptions) -> Self {
        assert!(primaries >= 1, "RedisCluster needs at least one primary");
        let total = primaries * (1 + replicas_per_primary);
        let opts = base
            .extra("cluster-enabled", "yes")
            .extra("cluster-config-file", "nodes.conf") // relative to the node's own dir
            .extra("cluster-node-timeout", &NODE_TIMEOUT_MS.to_string())
            .extra("cluster-replica-validity-factor", "0")
            .extra("cluster-allow-replica-migration", "no")
            .extra("repl-diskless-sync-delay", "0");

        // Start every node in parallel (each waits for its own PING).
        let started: Vec<(RedisServer, u16)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..total).map(|_| s.spawn(|| start_node(&opts))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let (nodes, bus_ports): (Vec<_>, Vec<_>) = started.into_iter().unzip();
        let mut cluster = RedisCluster {
            admin: (0..total).map(|_| Mutex::new(None)).collect(),
            ids: Vec::new(),
            state: vec![NodeState::Running; total],
            nodes,
            bus_ports,
            primaries,
            replicas_per_primary,
            down_snapshots: HashMap::new(),
        };
        cluster.create();
        cluster
    }

    /// Forms the cluster by hand: epochs, slots, MEET, REPLICATE, then waits.
    fn create(&mut self) {
        let total = self.nodes.len();
        self.ids = (0..total)
            .map(|i| {
                self.query_ok::<String>(i, redis::cmd("CLUSTER").arg("MYID"))
                    .trim()
                    .to_owned()
            })
            .collect();
        for i in 0..total {
            // Distinct epochs up front: no epoch-collision resolution to wait for.
            self.query_ok::<()>(i, redis::cmd("CLUSTER").arg("SET-CONFIG-EPOCH").arg(i + 1));
        }
        for p in 0..self.primaries {
            let (first, last) = initial_slot_range(p, self.primaries);
            self.query_ok::<()>(
                p,
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(first)
                    .arg(last),
            );
        }
        for i in 1..total {
            self.query_ok::<()>(
                0,
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(self.nodes[i].port())
                    .arg(self.bus_ports[i]),
            );
        }
        let started = Instant::now();
        self.wait_or_panic(started, "every node knows every other node", || {
            self.check_all_known()
        });
        for r in self.primaries..total {
            let primary = self.initial_primary_of(r);
            self.query_ok::<()>(
                r,
                redis::cmd("CLUSTER")
                    .arg("REPLICATE")
                    .arg(&self.ids[primary]),
            );
        }
        self.wait_or_panic(
            started,
            "cluster_state:ok everywhere with the initial topology and every replica link up",
            || {
                self.check_initial_topology()
                    .and_then(|_| self.check_healthy())
            },
        );
    }

    /// Polls `check` until it returns Ok, panicking with diagnostics when
    /// CONVERGE_TIMEOUT (counted from `started`) has passed.
    fn wait_or_panic(&self, started: Instant, what: &str, check: impl Fn() -> Result<(), String>) {
        loop {
            let result = check();
            match result {
                Ok(()) => return,
                Err(why) if started.elapsed() >= CONVERGE_TIMEOUT => panic!(
                    "RedisCluster did not converge within {CONVERGE_TIMEOUT:?} ({what}): {why}\n{}",
                    self.diagnostics()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    fn initial_primary_of(&self, index: usize) -> usize {
        if index < self.primaries {
            index
        } else {
            (index - self.primaries) / self.replicas_per_primary
        }
    }

    /// Number of primaries the cluster was started with.
    pub fn primary_count(&self) -> usize {
        self.primaries
    }

    pub fn replicas_per_primary(&self) -> usize {
        self.replicas_per_primary
    }

    /// Number of nodes (primaries + replicas).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    pub fn node(&self, index: usize) -> &RedisServer {
        &self.nodes[index]
    }

    /// The node's cluster ID (`CLUSTER MYID`), stable across restarts.
    pub fn node_id(&self, index: usize) -> &str {
        &self.ids[index]
    }

    /// The node's cluster-bus port (`cluster-port`).
    pub fn bus_port(&self, index: usize) -> u16 {
        self.bus_ports[index]
    }

    pub fn node_state(&self, index: usize) -> NodeState {
        self.state[index]
    }

    /// Index of the node listening on `port`, if it is one of ours.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port() == port)
    }

    /// `redis://127.0.0.1:PORT/` of every node (dead ones included), for
    /// `redis::cluster::ClusterClient::new`.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Hash slot of `key` (`CLUSTER KEYSLOT` on a live node; honours `{tags}`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let mut last_err = String::new();
        for i in self.live() {
            match self.query::<u16>(i, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)) {
                Ok(slot) => return slot,
                Err(e) => last_err = format!("node {i}: {e}"),
            }
        }
        panic!("RedisCluster::slot_of({key:?}): no live node answered CLUSTER KEYSLOT ({last_err})")
    }

    /// Index of the node that currently serves `key`'s slot as primary,
    /// according to every live node (asked now, nothing cached). A dead
    /// primary that has not been failed over yet is still the answer.
    pub fn primary_for_key(&self, key: &str) -> usize {
        self.primary_for_slot(self.slot_of(key))
    }

    /// Index of the node that currently owns `slot` as primary, once all live
    /// nodes agree on it (polls up to 10 s, then panics with every view).
    pub fn primary_for_slot(&self, slot: u16) -> usize {
        let deadline = Instant::now() + AGREE_TIMEOUT;
        loop {
            let answer = self.agreed_views().and_then(|view| {
                view.iter()
                    .find(|n| n.is_master() && n.owns(slot))
                    .ok_or_else(|| format!("no node owns slot {slot}"))
                    .and_then(|n| self.index_of_id(&n.id))
            });
            match answer {
                Ok(index) => return index,
                Err(why) if Instant::now() >= deadline => panic!(
                    "RedisCluster::primary_for_slot({slot}): {why}\n{}",
                    self.diagnostics()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Indices of the nodes that currently own slots as primaries (sorted),
    /// in the view all live nodes agree on (polls up to 10 s).
    pub fn current_primaries(&self) -> Vec<usize> {
        let view = self.agreed_view_or_panic("current_primaries");
        let mut out: Vec<usize> = view
            .iter()
            .filter(|n| n.is_master() && !n.slots.is_empty())
            .filter_map(|n| self.index_of_id(&n.id).ok())
            .collect();
        out.sort_unstable();
        out
    }

    /// Indices of the nodes currently replicating `primary` (sorted), in the
    /// view all live nodes agree on (polls up to 10 s).
    pub fn replicas_of(&self, primary: usize) -> Vec<usize> {
        let view = self.agreed_view_or_panic("replicas_of");
        let mut out: Vec<usize> = view
            .iter()
            .filter(|n| n.master.as_deref() == Some(self.ids[primary].as_str()))
            .filter_map(|n| self.index_of_id(&n.id).ok())
            .collect();
        out.sort_unstable();
        out
    }

    /// `count` hash-tag names ("t0", "t1", ...): the i-th name's slot
    /// (`{name}`, i.e. CRC16 of the name) is served by the i-th primary of
    /// [`Self::current_primaries`], so the names land on `count` distinct
    /// primaries. Keys of the form `<ns>:{<name>}:...` follow their name.
    /// Panics if `count` exceeds the number of primaries.
    pub fn keys_on_distinct_primaries(&self, count: usize) -> Vec<String> {
        let view = self.agreed_view_or_panic("keys_on_distinct_primaries");
        let primaries = self.current_primaries();
        assert!(
            count <= primaries.len(),
            "keys_on_distinct_primaries({count}): the cluster has only {} primaries",
            primaries.len()
        );
        let owner_of = |slot: u16| {
            view.iter()
                .find(|n| n.is_master() && n.owns(slot))
                .and_then(|n| self.index_of_id(&n.id).ok())
        };
        let mut names: Vec<String> = Vec::with_capacity(count);
        for &primary in &primaries[..count] {
            let name = (0..100_000)
                .map(|n| format!("t{n}"))
                .filter(|name| !names.contains(name))
                .find(|name| owner_of(self.slot_of(&format!("{{{name}}}"))) == Some(primary))
                .unwrap_or_else(|| panic!("no hash tag t<n> lands on primary {primary}"));
            names.push(name);
        }
        names
    }

    /// SIGKILLs node `index` (its topology is recorded first, for
    /// [`Self::wait_for_failover`]). Idempotent.
    pub fn kill_node(&mut self, index: usize) {
        self.record_snapshot(index);
        *lock(&self.admin[index]) = None;
        self.nodes[index].kill();
        self.state[index] = NodeState::Killed;
    }

    /// (Re)starts node `index` on the same port, dir and nodes.conf (same
    /// node ID; AOF reloaded) and waits until it answers PING. It rejoins the
    /// cluster by itself; a former primary that was failed over comes back as
    /// a replica of its successor. Use [`Self::wait_healthy`] to wait for that.
    pub fn restart_node(&mut self, index: usize) {
        *lock(&self.admin[index]) = None;
        self.nodes[index].restart();
        self.state[index] = NodeState::Running;
        self.down_snapshots.remove(&index);
    }

    /// SIGSTOPs node `index` (topology recorded first, as for kill_node). A
    /// paused primary is failed over like a dead one after ~NODE_TIMEOUT_MS.
    pub fn pause_node(&mut self, index: usize) {
        assert_eq!(
            self.state[index],
            NodeState::Running,
            "pause_node({index}): node is not running"
        );
        self.record_snapshot(index);
        self.nodes[index].pause();
        self.state[index] = NodeState::Paused;
    }

    /// SIGCONTs a node paused with [`Self::pause_node`].
    pub fn resume_node(&mut self, index: usize) {
        assert_eq!(
            self.state[index],
            NodeState::Paused,
            "resume_node({index}): node is not paused"
        );
        self.nodes[index].resume();
        self.state[index] = NodeState::Running;
        // Its cached connection may hold a half-read reply from before the pause.
        *lock(&self.admin[index]) = None;
        self.down_snapshots.remove(&index);
    }

    /// Waits until a former replica of `dead` (a primary killed or paused
    /// through this harness) is primary for all of `dead`'s slots in the view
    /// of every live node, and the cluster is healthy again (see
    /// [`Self::wait_healthy`]). Returns the new primary's index. Panics with
    /// diagnostics after `timeout`.
    pub fn wait_for_failover(&self, dead: usize, timeout: Duration) -> usize {
        let snapshot = match self.down_snapshots.get(&dead) {
            Some(s) => s.clone(),
            None => panic!(
                "wait_for_failover({dead}): node {dead} was not stopped with kill_node/pause_node"
            ),
        };
        assert!(
            !snapshot.slots.is_empty(),
            "wait_for_failover({dead}): node {dead} owned no slots when it was stopped (not a primary)"
        );
        assert!(
            !snapshot.replicas.is_empty(),
            "wait_for_failover({dead}): node {dead} had no replica, nothing can take over"
        );
        let started = Instant::now();
        let check = || -> Result<usize, String> {
            let view = self.agreed_views()?;
            let owners: Vec<Option<&NodeLine>> = snapshot
                .slots
                .iter()
                .map(|&(first, _)| view.iter().find(|n| n.is_master() && n.owns(first)))
                .collect();
            let owner = owners[0].ok_or("a slot of the dead primary has no owner")?;
            if owners.iter().any(|o| o.map(|n| &n.id) != Some(&owner.id)) {
                return Err("the dead primary's slots have different owners".into());
            }
            let index = self.index_of_id(&owner.id)?;
            if !snapshot.replicas.contains(&index) {
                return Err(format!(
                    "slot {} is still owned by node {index}",
                    snapshot.slots[0].0
                ));
            }
            self.check_healthy()?;
            Ok(index)
        };
        loop {
            match check() {
                Ok(index) => return index,
                Err(why) if started.elapsed() >= timeout => panic!(
                    "RedisCluster::wait_for_failover({dead}): no failover to one of its replicas {:?} within {timeout:?}: {why}\n{}",
                    snapshot.replicas,
                    self.diagnostics()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Waits until the live part of the cluster is healthy: `cluster_state:ok`
    /// on every live node, all live nodes agree on who owns which slot, no live
    /// node is flagged failing by another, and every live replica's link to its
    /// primary is up. Panics with diagnostics after `timeout`.
    pub fn wait_healthy(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            match self.check_healthy() {
                Ok(()) => return,
                Err(why) if started.elapsed() >= timeout => panic!(
                    "RedisCluster::wait_healthy: not healthy within {timeout:?}: {why}\n{}",
                    self.diagnostics()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Raw `CLUSTER NODES` of node `index` (for diagnostics).
    pub fn cluster_nodes(&self, index: usize) -> String {
        self.query_ok(index, redis::cmd("CLUSTER").arg("NODES"))
    }

    /// State, role and log tail of every node, plus each live node's view.
    pub fn diagnostics(&self) -> String {
        let mut out = String::from("--- RedisCluster nodes ---\n");
        for (i, node) in self.nodes.iter().enumerate() {
            out.push_str(&format!(
                "node {i}: port {} bus {} id {} state {:?} (started as {})\n",
                node.port(),
                self.bus_ports[i],
                self.ids.get(i).map(String::as_str).unwrap_or("?"),
                self.state[i],
                if i < self.primaries {
                    "primary".to_owned()
                } else {
                    format!("replica of {}", self.initial_primary_of(i))
                }
            ));
        }
        for i in self.live() {
            let nodes = self
                .query::<String>(i, redis::cmd("CLUSTER").arg("NODES"))
                .unwrap_or_else(|e| format!("(error: {e})"));
            let state = self
                .query::<String>(i, redis::cmd("CLUSTER").arg("INFO"))
                .map(|info| info_field(&info, "cluster_state").unwrap_or("?").to_owned())
                .unwrap_or_else(|e| format!("(error: {e})"));
            out.push_str(&format!(
                "--- CLUSTER NODES of node {i} (cluster_state:{state}) ---\n{nodes}"
            ));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            out.push_str(&format!("\n=== log of node {i} ===\n{}", node.log_tail()));
        }
        out
    }

    // ---- internals ----

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.state[i] == NodeState::Running)
    }

    fn index_of_id(&self, id: &str) -> Result<usize, String> {
        self.ids
            .iter()
            .position(|x| x == id)
            .ok_or_else(|| format!("unknown node id {id}"))
    }

    fn record_snapshot(&mut self, index: usize) {
        if self.state[index] != NodeState::Running {
            return;
        }
        // Prefer the victim's own view; fall back to any live node.
        let view = std::iter::once(index)
            .chain(self.live().filter(|&i| i != index))
            .find_map(|i| self.view_of(i).ok());
        let Some(view) = view else { return };
        let id = &self.ids[index];
        let slots = view
            .iter()
            .find(|n| &n.id == id)
            .map(|n| n.slots.clone())
            .unwrap_or_default();
        let replicas = view
            .iter()
            .filter(|n| n.master.as_deref() == Some(id.as_str()))
            .filter_map(|n| self.index_of_id(&n.id).ok())
            .collect();
        self.down_snapshots
            .insert(index, DownSnapshot { slots, replicas });
    }

    fn view_of(&self, index: usize) -> Result<Vec<NodeLine>, String> {
        let text: String = self
            .query(index, redis::cmd("CLUSTER").arg("NODES"))
            .map_err(|e| format!("node {index}: CLUSTER NODES: {e}"))?;
        parse_cluster_nodes(&text).map_err(|e| format!("node {index}: {e}"))
    }

    /// The CLUSTER NODES view of the first live node, if every live node has
    /// the same slot map (owners and ranges) and the same master/replica links.
    fn agreed_views(&self) -> Result<Vec<NodeLine>, String> {
        let mut first: Option<(usize, Vec<NodeLine>, Vec<String>)> = None;
        for i in self.live() {
            let view = self.view_of(i)?;
            let key = topology_key(&view);
            match &first {
                None => first = Some((i, view, key)),
                Some((j, _, first_key)) if *first_key != key => {
                    return Err(format!(
                        "nodes {j} and {i} disagree: {first_key:?} vs {key:?}"
                    ))
                }
                Some(_) => {}
            }
        }
        first
            .map(|(_, view, _)| view)
            .ok_or_else(|| "no live node".to_owned())
    }

    fn agreed_view_or_panic(&self, what: &str) -> Vec<NodeLine> {
        let deadline = Instant::now() + AGREE_TIMEOUT;
        loop {
            match self.agreed_views() {
                Ok(view) => return view,
                Err(why) if Instant::now() >= deadline => panic!(
                    "RedisCluster::{what}: live nodes do not agree within {AGREE_TIMEOUT:?}: {why}\n{}",
                    self.diagnostics()
                ),
                Err(_) => std::thread::sleep(POLL),
            }
        }
    }

    /// Every node knows all others (no handshake/noaddr), bus links connected.
    fn check_all_known(&self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let view = self.view_of(i)?;
            if view.len() != self.nodes.len() {
                return Err(format!("node {i} knows {} nodes", view.len()));
            }
            if let Some(n) = view
                .iter()
                .find(|n| n.has("handshake") || n.has("noaddr") || !n.connected)
            {
                return Err(format!("node {i} sees {n:?}"));
            }
        }
        Ok(())
    }

    /// Every node's view matches the initial layout.
    fn check_initial_topology(&self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            let view = self.view_of(i)?;
            for (j, id) in self.ids.iter().enumerate() {
                let line = view
                    .iter()
                    .find(|n| &n.id == id)
                    .ok_or_else(|| format!("node {i} does not know node {j}"))?;
                if j < self.primaries {
                    let (first, last) = initial_slot_range(j, self.primaries);
                    if !line.is_master() || line.slots != [(first, last)] {
                        return Err(format!("node {i} sees primary {j} as {line:?}"));
                    }
                } else {
                    let primary = &self.ids[self.initial_primary_of(j)];
                    if !line.has("slave") || line.master.as_ref() != Some(primary) {
                        return Err(format!("node {i} sees replica {j} as {line:?}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// See [`Self::wait_healthy`].
    fn check_healthy(&self) -> Result<(), String> {
        self.agreed_views()?;
        for i in self.live() {
            let info: String = self
                .query(i, redis::cmd("CLUSTER").arg("INFO"))
                .map_err(|e| format!("node {i}: CLUSTER INFO: {e}"))?;
            if info_field(&info, "cluster_state") != Some("ok") {
                return Err(format!("node {i}: cluster_state is not ok"));
            }
            let view = self.view_of(i)?;
            for j in self.live() {
                let line = view
                    .iter()
                    .find(|n| n.id == self.ids[j])
                    .ok_or_else(|| format!("node {i} does not know node {j}"))?;
                if line.has("fail") || line.has("fail?") || !line.connected {
                    return Err(format!("node {i} sees node {j} as {line:?}"));
                }
            }
            let me = view
                .iter()
                .find(|n| n.has("myself"))
                .ok_or_else(|| format!("node {i}: no `myself` line"))?;
            if me.has("slave") {
                let repl: String = self
                    .query(i, redis::cmd("INFO").arg("replication"))
                    .map_err(|e| format!("node {i}: INFO replication: {e}"))?;
                if info_field(&repl, "master_link_status") != Some("up") {
                    return Err(format!("replica {i}: master_link_status is not up"));
                }
            }
        }
        Ok(())
    }

    fn query<T: redis::FromRedisValue>(
        &self,
        index: usize,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let mut guard = lock(&self.admin[index]);
        if guard.is_none() {
            *guard = Some(admin_connection(self.nodes[index].port())?);
        }
        let result = cmd.query(guard.as_mut().expect("admin connection"));
        if result.is_err() {
            // The connection may be broken or out of step (e.g. a timeout).
            *guard = None;
        }
        result
    }

    /// `query` that panics with diagnostics (used while building the cluster).
    fn query_ok<T: redis::FromRedisValue>(&self, index: usize, cmd: &redis::Cmd) -> T {
        self.query(index, cmd).unwrap_or_else(|e| {
            panic!(
                "RedisCluster: node {index} (port {}): {cmd:?} failed: {e}\n{}",
                self.nodes[index].port(),
                self.nodes[index].log_tail()
            )
        })
    }
}

impl std::fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCluster")
            .field(
                "ports",
                &self.nodes.iter().map(RedisServer::port).collect::<Vec<_>>(),
            )
            .field("state", &self.state)
            .field("primaries", &self.primaries)
            .field("replicas_per_primary", &self.replicas_per_primary)
            .finish()
    }
}

/// Slots `[first, last]` of primary `p` out of `n` at creation.
fn initial_slot_range(p: usize, n: usize) -> (u16, u16) {
    let n = n as u32;
    let p = p as u32;
    let first = p * SLOT_COUNT / n;
    let last = (p + 1) * SLOT_COUNT / n - 1;
    (first as u16, last as u16)
}

/// What all nodes must agree on: owners of slot ranges and replica links.
fn topology_key(view: &[NodeLine]) -> Vec<String> {
    let mut key: Vec<String> = view
        .iter()
        .map(|n| {
            let role = if n.is_master() { "master" } else { "slave" };
            format!(
                "{} {role} {} {:?}",
                n.id,
                n.master.as_deref().unwrap_or("-"),
                n.slots
            )
        })
        .collect();
    key.sort();
    key
}

fn parse_cluster_nodes(text: &str) -> Result<Vec<NodeLine>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return Err(format!("bad CLUSTER NODES line: {line:?}"));
            }
            // ip:port@cport[,hostname]
            let addr = fields[1].split(['@', ',']).next().unwrap_or("");
            let port = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let mut slots = Vec::new();
            for s in &fields[8..] {
                if s.starts_with('[') {
                    continue; // migrating / importing
                }
                let (a, b) = s.split_once('-').unwrap_or((s, s));
                match (a.parse(), b.parse()) {
                    (Ok(a), Ok(b)) => slots.push((a, b)),
                    _ => return Err(format!("bad slot {s:?} in {line:?}")),
                }
            }
            slots.sort_unstable();
            Ok(NodeLine {
                id: fields[0].to_owned(),
                port,
                flags: fields[2].split(',').map(str::to_owned).collect(),
                master: (fields[3] != "-").then(|| fields[3].to_owned()),
                connected: fields[7] == "connected",
                slots,
            })
        })
        .collect()
}

/// Starts one node with a freshly reserved cluster-bus port, retrying with
/// another bus port if it was taken between the check and the server's bind.
fn start_node(opts: &RedisOptions) -> (RedisServer, u16) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let bus = reserve_bus_port();
        let opts = opts.clone().extra("cluster-port", &bus.to_string());
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            RedisServer::start_with(opts)
        })) {
            Ok(server) => return (server, bus),
            Err(e)
                if attempt < BUS_PORT_ATTEMPTS
                    && panic_text(&*e).contains("Address already in use") => {}
            Err(e) => std::panic::resume_unwind(e),
        }
    }
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

/// A port for a cluster bus: random, below the kernel's ephemeral range (so
/// no other test server or outgoing connection is handed it), free right now,
/// and never handed out twice in this process. The default `port + 10000`
/// would not work: ephemeral ports go up to 60999.
fn reserve_bus_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let (from, to) = if low >= 21_000 {
        (20_000, low) // [from, to)
    } else {
        (high + 1, 65_536)
    };
    assert!(
        to > from + 100,
        "no room for cluster bus ports outside the ephemeral range {low}-{high}"
    );
    let mut handed_out = lock(&HANDED_OUT);
    for _ in 0..1000 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = (from + (h.finish() % u64::from(to - from)) as u32) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
    }
    panic!("RedisCluster: found no free cluster-bus port in {from}..{to}");
}

fn admin_connection(port: u16) -> redis::RedisResult<redis::Connection> {
    use redis::IntoConnectionInfo;
    let info = format!("redis://127.0.0.1:{port}/").into_connection_info()?;
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    let client = redis::Client::open(info.set_redis_settings(settings))?;
    let conn = client.get_connection_with_timeout(ADMIN_CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(ADMIN_IO_TIMEOUT))?;
    conn.set_write_timeout(Some(ADMIN_IO_TIMEOUT))?;
    Ok(conn)
}

fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
