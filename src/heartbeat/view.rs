//! The shared, always-current view of one target's health.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::target::Target;

/// What the watcher believes about a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Health {
    /// Not known yet: Redis has not answered since the target was first
    /// watched.
    Unknown,
    /// A heartbeat key lives and does not announce a stop.
    Up,
    /// No heartbeat key lives, or every live one says `draining`/`down`.
    Down,
}

impl Health {
    fn to_u8(self) -> u8 {
        match self {
            Health::Unknown => 0,
            Health::Up => 1,
            Health::Down => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        })
    }
}

/// One target's health as this process sees it, shared by every clone.
///
/// Reading it ([`health`](Self::health), [`is_up`](Self::is_up)) is one
/// atomic load: no lock, no Redis command. A background task of the
/// [`Watcher`](super::Watcher) keeps it current; [`changes`](Self::changes)
/// lets a task await transitions.
///
/// The view keeps its watcher's background tasks alive: they stop when the
/// watcher and every view of it are dropped.
#[derive(Clone)]
pub struct TargetView {
    state: Arc<ViewState>,
    _keepalive: Arc<dyn Send + Sync>,
}

impl TargetView {
    pub(crate) fn new(state: Arc<ViewState>, keepalive: Arc<dyn Send + Sync>) -> Self {
        Self {
            state,
            _keepalive: keepalive,
        }
    }

    /// The current belief. One atomic load.
    #[inline]
    pub fn health(&self) -> Health {
        Health::from_u8(self.state.health.load(Ordering::Acquire))
    }

    /// Whether the target is believed up. One atomic load.
    #[inline]
    pub fn is_up(&self) -> bool {
        self.state.health.load(Ordering::Acquire) == Health::Up.to_u8()
    }

    /// How many requests wait in the target's buffer (`ns:{t}:queue`), as
    /// last seen; `None` before the first reading. One atomic load.
    ///
    /// Kept current by keyspace notifications on the queue key (flag `t`),
    /// by this process's own enqueues, and by reconciliation.
    #[inline]
    pub fn backlog(&self) -> Option<u64> {
        match self.state.backlog.load(Ordering::Acquire) {
            UNKNOWN_BACKLOG => None,
            n => Some(n),
        }
    }

    /// How many times the target has turned up since it was first watched:
    /// a new value means a new life (restart, return after an outage), so
    /// local suspicion from an earlier life can be dropped.
    #[inline]
    pub fn up_generation(&self) -> u64 {
        self.state.up_generation.load(Ordering::Acquire)
    }

    /// Records the queue length that an enqueue by this process returned.
    pub(crate) fn note_backlog(&self, len: u64) {
        self.state.backlog_epoch.fetch_add(1, Ordering::AcqRel);
        self.state.set_backlog(len);
    }

    /// Resolves after the backlog grew (an entry was added by this process,
    /// or seen added by another). Keeps one wake-up if nobody waits.
    pub(crate) async fn backlog_grew(&self) {
        self.state.backlog_grew.notified().await;
    }

    /// Whether the last attempt to read the heartbeat from Redis succeeded.
    ///
    /// While Redis is unreachable the view holds its last known health: the
    /// target cannot refresh its heartbeat either, so an expiring TTL then
    /// says nothing about the target itself.
    pub fn redis_reachable(&self) -> bool {
        self.state.reachable.load(Ordering::Acquire)
    }

    /// The target this view is about.
    pub fn target(&self) -> &Target {
        &self.state.target
    }

    /// A receiver that sees every change of [`Health`]; `changed().await`
    /// wakes on the next transition.
    pub fn changes(&self) -> watch::Receiver<Health> {
        self.state.changes.subscribe()
    }

    /// Waits until the health is `wanted` (returns at once if it already is).
    pub async fn wait_for(&self, wanted: Health) {
        let mut rx = self.changes();
        // The sender lives in `self.state`, which we hold: `wait_for` cannot
        // see a closed channel, but treat it as "stop waiting" all the same.
        let _ = rx.wait_for(|h| *h == wanted).await;
    }
}

impl fmt::Debug for TargetView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetView")
            .field("target", &self.state.target.name())
            .field("health", &self.health())
            .field("redis_reachable", &self.redis_reachable())
            .field("backlog", &self.backlog())
            .finish()
    }
}

/// The memory behind a [`TargetView`], written only by the watcher task.
pub(crate) struct ViewState {
    target: Target,
    health: AtomicU8,
    reachable: AtomicBool,
    backlog: AtomicU64,
    up_generation: AtomicU64,
    changes: watch::Sender<Health>,
    backlog_grew: tokio::sync::Notify,
    /// Counts this process's own writes to the buffer (see `set_backlog_read`).
    backlog_epoch: AtomicU64,
}

const UNKNOWN_BACKLOG: u64 = u64::MAX;

impl ViewState {
    pub(crate) fn new(target: Target) -> Self {
        Self {
            target,
            health: AtomicU8::new(Health::Unknown.to_u8()),
            reachable: AtomicBool::new(false),
            backlog: AtomicU64::new(UNKNOWN_BACKLOG),
            up_generation: AtomicU64::new(0),
            backlog_grew: tokio::sync::Notify::new(),
            backlog_epoch: AtomicU64::new(0),
            changes: watch::Sender::new(Health::Unknown),
        }
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// Stores `health`; returns whether it changed.
    pub(crate) fn set_health(&self, health: Health) -> bool {
        let previous = self.health.swap(health.to_u8(), Ordering::AcqRel);
        if previous == health.to_u8() {
            return false;
        }
        if health == Health::Up {
            self.up_generation.fetch_add(1, Ordering::AcqRel);
        }
        self.changes.send_replace(health);
        true
    }

    pub(crate) fn backlog(&self) -> Option<u64> {
        match self.backlog.load(Ordering::Acquire) {
            UNKNOWN_BACKLOG => None,
            n => Some(n),
        }
    }

    pub(crate) fn backlog_epoch(&self) -> u64 {
        self.backlog_epoch.load(Ordering::Acquire)
    }

    /// Stores a length read from Redis by a read that started at `epoch`:
    /// if this process wrote to the buffer meanwhile, the reading may predate
    /// that write, so it may raise the value but not lower it.
    pub(crate) fn set_backlog_read(&self, len: u64, epoch: u64) {
        if self.backlog_epoch() != epoch && self.backlog().is_some_and(|current| len < current) {
            return;
        }
        self.set_backlog(len);
    }

    pub(crate) fn set_backlog(&self, len: u64) {
        let len = len.min(UNKNOWN_BACKLOG - 1);
        let previous = self.backlog.swap(len, Ordering::AcqRel);
        if len > 0 && (previous == UNKNOWN_BACKLOG || len > previous) {
            self.backlog_grew.notify_one();
        }
    }

    pub(crate) fn set_reachable(&self, reachable: bool) -> bool {
        self.reachable.swap(reachable, Ordering::AcqRel) != reachable
    }
}
