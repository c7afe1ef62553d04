//! Calls between services that survive the death of the service being called.
//!
//! A target service proves it is alive by keeping a **heartbeat key** in
//! Redis with a TTL ([`Heartbeat`]). Callers keep a local, always-current view
//! of that key ([`Watcher`], [`TargetView`]): reading it is one atomic load,
//! no Redis round trip.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_heartbeat_buffer::{Health, Heartbeat, Target, Watcher};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = redis::Client::open("redis://127.0.0.1:6379/")?;
//! let orders = Target::new("orders")?;
//!
//! // The caller's view, shared by every clone.
//! let watcher = Watcher::builder()
//!     .reconcile_interval(Duration::from_secs(1))
//!     .connect(client.clone())
//!     .await?;
//! let view = watcher.watch(&orders).await;
//!
//! // The target announces itself...
//! let heartbeat = Heartbeat::builder(orders.clone()).start(client)?;
//! view.wait_for(Health::Up).await;
//!
//! // ...and a graceful stop deletes the key: callers see it in milliseconds.
//! heartbeat.shutdown().await?;
//! view.wait_for(Health::Down).await;
//! # Ok(()) }
//! ```
//!
//! # Redis data layout
//!
//! See [`target`] for the keys; they are public, so programs in any language
//! can publish heartbeats or read the buffer.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod body;
mod breaker;
pub mod envelope;
pub mod error;
mod future;
pub mod heartbeat;
mod id;
mod layer;
mod outcome;
pub mod policy;
mod queue;
mod service;
pub mod target;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use error::{InvalidConfig, InvalidName, MalformedEntry, NameKind, RedisError};
pub use future::ResponseFuture;
pub use heartbeat::{
    Health, Heartbeat, HeartbeatBuilder, HeartbeatFormat, NotificationMode, Status, TargetView,
    Watcher, WatcherBuilder,
};
pub use layer::{
    DeliveryOrder, HeartbeatBufferBuilder, HeartbeatBufferLayer, NoFallback, WithFallback,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE_LEN,
};
pub use outcome::{Buffered, Unavailable, UnavailableReason};
pub use service::HeartbeatBuffer;
pub use target::{HeartbeatSource, Target, DEFAULT_NAMESPACE};
