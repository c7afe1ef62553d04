//! The heartbeat protocol, both sides: a target keeps a key alive
//! ([`Heartbeat`]); callers keep a local view of it ([`Watcher`],
//! [`TargetView`]).
//!
//! # Examples
//!
//! ```no_run
//! use tower_heartbeat_buffer::{Heartbeat, Target, Watcher};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379/")?;
//! let orders = Target::new("orders")?;
//!
//! // In the target service:
//! let heartbeat = Heartbeat::builder(orders.clone()).start(client.clone())?;
//!
//! // In a caller:
//! let watcher = Watcher::connect(client).await?;
//! let view = watcher.watch(&orders).await;
//! if view.is_up() { /* one atomic load, no Redis round trip */ }
//! # heartbeat.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # What a heartbeat key may look like
//!
//! Anything that can `SET` a key with a TTL can be a target: a plain
//! `SET thb:{orders}:hb 1 PX 5000`, or a hash (`HSET` + `PEXPIRE`) whose
//! `status` field says `up`, `draining` or `down`. A string value of
//! `draining` or `down` counts as that status too. A key without a TTL
//! counts as alive until deleted.

pub(crate) mod notifications;
mod probe;
mod publisher;
mod view;
mod watcher;

pub use notifications::NotificationMode;
pub use probe::{read_heartbeat_keys, HeartbeatKeyState};
pub use publisher::{Heartbeat, HeartbeatBuilder, HeartbeatFormat, Status, DEFAULT_TTL};
pub use view::{Health, TargetView};
pub use watcher::{Watcher, WatcherBuilder, DEFAULT_READ_TIMEOUT, DEFAULT_RECONCILE_INTERVAL};
