//! Validated target names and the Redis keys derived from them.
//!
//! Every key of one target shares the hash tag `{t}`, so the whole target
//! lives in one Redis Cluster slot and multi-key scripts stay legal there.
//! The layout is public: other programs read and write these keys.
//!
//! | key | what |
//! | --- | --- |
//! | `ns:{t}:hb` | heartbeat of a single-instance target |
//! | `ns:{t}:hb:<instance>` | heartbeat of one instance of a multi-instance target |
//! | `ns:{t}:queue` | buffered requests, oldest first |
//! | `ns:{t}:dead` | dead letters |
//! | `ns:{t}:lease` | which replica drains, in strict order mode |
//! | `ns:{t}:done:<id>` | processed-marker for dedup |
//!
//! # Examples
//!
//! ```
//! use tower_heartbeat_buffer::Target;
//!
//! let orders = Target::new("orders")?;
//! assert_eq!(orders.heartbeat_key(), "thb:{orders}:hb");
//! assert_eq!(orders.instance_heartbeat_key("pod-1")?, "thb:{orders}:hb:pod-1");
//! assert_eq!(orders.queue_key(), "thb:{orders}:queue");
//!
//! // Braces would move the cluster hash tag; glob characters would leak into
//! // patterns. Both are refused with a typed error.
//! assert!(Target::new("or{ders}").is_err());
//! assert!(Target::new("orders*").is_err());
//! # Ok::<(), tower_heartbeat_buffer::InvalidName>(())
//! ```

use std::fmt;
use std::sync::Arc;

use crate::error::{InvalidName, NameKind};

/// The namespace used when none is given: keys start with `thb:`.
pub const DEFAULT_NAMESPACE: &str = "thb";

/// Longest accepted name, in bytes. Keys stay short enough to read in
/// `redis-cli` and to never approach Redis's limits.
const MAX_NAME_LEN: usize = 200;

/// Where a target's heartbeat lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeartbeatSource {
    /// One key, `ns:{t}:hb`, refreshed by the target (or by any of its
    /// instances, which then share it).
    Shared,
    /// One key per instance, `ns:{t}:hb:<instance>`: the target is up while
    /// at least one instance key lives with a status that is not
    /// `draining`/`down`.
    Instances,
    /// An exact key kept by some other system, string or hash.
    Explicit(String),
}

/// A named service that callers watch and buffer for, with its key layout.
///
/// Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Target {
    inner: Arc<TargetInner>,
}

#[derive(PartialEq, Eq, Hash)]
struct TargetInner {
    namespace: String,
    name: String,
    heartbeat: HeartbeatSource,
}

impl Target {
    /// A target in the [default namespace](DEFAULT_NAMESPACE).
    pub fn new(name: &str) -> Result<Self, InvalidName> {
        Self::with_namespace(DEFAULT_NAMESPACE, name)
    }

    /// A target in the namespace `namespace`.
    pub fn with_namespace(namespace: &str, name: &str) -> Result<Self, InvalidName> {
        validate_segment(NameKind::Namespace, namespace)?;
        validate_segment(NameKind::Target, name)?;
        Ok(Self {
            inner: Arc::new(TargetInner {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                heartbeat: HeartbeatSource::Shared,
            }),
        })
    }

    /// Watch one key per instance (`ns:{t}:hb:<instance>`) instead of the
    /// shared key: the target is up while any instance is.
    pub fn with_instances(self) -> Self {
        self.with_source(HeartbeatSource::Instances)
    }

    /// Watch `key`, kept by some other system, instead of `ns:{t}:hb`.
    ///
    /// The key may be a string or a hash and may live outside the target's
    /// hash tag; it must be non-empty and free of whitespace and control
    /// characters.
    pub fn with_heartbeat_key(self, key: &str) -> Result<Self, InvalidName> {
        validate_key(key)?;
        Ok(self.with_source(HeartbeatSource::Explicit(key.to_owned())))
    }

    fn with_source(self, heartbeat: HeartbeatSource) -> Self {
        Self {
            inner: Arc::new(TargetInner {
                namespace: self.inner.namespace.clone(),
                name: self.inner.name.clone(),
                heartbeat,
            }),
        }
    }

    /// The target's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The key namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Where this target's heartbeat is read from.
    pub fn heartbeat_source(&self) -> &HeartbeatSource {
        &self.inner.heartbeat
    }

    /// `ns:{t}:hb`, or the explicit key when one was given.
    pub fn heartbeat_key(&self) -> String {
        match &self.inner.heartbeat {
            HeartbeatSource::Explicit(key) => key.clone(),
            HeartbeatSource::Shared | HeartbeatSource::Instances => self.key("hb"),
        }
    }

    /// `ns:{t}:hb:<instance>`.
    pub fn instance_heartbeat_key(&self, instance: &str) -> Result<String, InvalidName> {
        validate_segment(NameKind::Instance, instance)?;
        Ok(format!("{}:{instance}", self.key("hb")))
    }

    /// The prefix shared by every instance key: `ns:{t}:hb:`.
    pub fn instance_key_prefix(&self) -> String {
        format!("{}:", self.key("hb"))
    }

    /// `ns:{t}:queue`: the buffer.
    pub fn queue_key(&self) -> String {
        self.key("queue")
    }

    /// `ns:{t}:dead`: dead letters.
    pub fn dead_letter_key(&self) -> String {
        self.key("dead")
    }

    /// `ns:{t}:lease`: the drain lease in strict order mode.
    pub fn lease_key(&self) -> String {
        self.key("lease")
    }

    /// `ns:{t}:done:<id>`: the processed-marker of one message.
    pub fn done_key(&self, id: &str) -> String {
        format!("{}:{id}", self.key("done"))
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.inner.namespace, self.inner.name)
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("namespace", &self.inner.namespace)
            .field("name", &self.inner.name)
            .field("heartbeat", &self.inner.heartbeat)
            .finish()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.name)
    }
}

/// A namespace, target or instance name: it sits inside keys, channels and
/// glob patterns, so it must be plain.
fn validate_segment(kind: NameKind, value: &str) -> Result<(), InvalidName> {
    if value.is_empty() {
        return Err(InvalidName::new(kind, value, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(InvalidName::new(kind, value, "longer than 200 bytes"));
    }
    for c in value.chars() {
        let reason = match c {
            '*' | '?' | '[' | ']' | '\\' => "contains a glob character (* ? [ ] \\)",
            '{' | '}' => "contains a brace, which would change the cluster hash tag",
            c if c.is_whitespace() => "contains whitespace",
            c if c.is_control() => "contains a control character",
            _ => continue,
        };
        return Err(InvalidName::new(kind, value, reason));
    }
    Ok(())
}

/// An explicit key is only ever used exactly (never in a pattern), so only
/// what makes it unusable or unreadable is refused.
fn validate_key(value: &str) -> Result<(), InvalidName> {
    if value.is_empty() {
        return Err(InvalidName::new(NameKind::Key, value, "must not be empty"));
    }
    if value.len() > 4 * MAX_NAME_LEN {
        return Err(InvalidName::new(
            NameKind::Key,
            value,
            "longer than 800 bytes",
        ));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InvalidName::new(
            NameKind::Key,
            value,
            "contains whitespace or a control character",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let t = Target::with_namespace("ns", "billing").unwrap();
        assert_eq!(t.heartbeat_key(), "ns:{billing}:hb");
        assert_eq!(t.instance_heartbeat_key("a").unwrap(), "ns:{billing}:hb:a");
        assert_eq!(t.instance_key_prefix(), "ns:{billing}:hb:");
        assert_eq!(t.queue_key(), "ns:{billing}:queue");
        assert_eq!(t.dead_letter_key(), "ns:{billing}:dead");
        assert_eq!(t.lease_key(), "ns:{billing}:lease");
        assert_eq!(t.done_key("01J"), "ns:{billing}:done:01J");
    }

    #[test]
    fn names_with_glob_braces_or_whitespace_are_refused() {
        for bad in [
            "", "a*", "a?", "a[b]", "a\\b", "{a}", "a}", "a b", "a\tb", "a\nb",
        ] {
            let err = Target::new(bad).unwrap_err();
            assert_eq!(err.kind(), NameKind::Target, "{bad:?}");
            assert_eq!(err.value(), bad);
        }
        assert_eq!(
            Target::with_namespace("n s", "a").unwrap_err().kind(),
            NameKind::Namespace
        );
        let t = Target::new("a").unwrap();
        assert_eq!(
            t.instance_heartbeat_key("x*").unwrap_err().kind(),
            NameKind::Instance
        );
        assert!(Target::new(&"x".repeat(201)).is_err());
    }

    #[test]
    fn names_may_hold_punctuation_that_is_not_special() {
        for ok in ["orders", "orders.v2", "eu-west:orders", "svc_1", "ünïcode"] {
            Target::new(ok).unwrap();
        }
    }

    #[test]
    fn explicit_key_replaces_the_heartbeat_key_only() {
        let t = Target::new("pay")
            .unwrap()
            .with_heartbeat_key("legacy:payments:alive")
            .unwrap();
        assert_eq!(t.heartbeat_key(), "legacy:payments:alive");
        assert_eq!(t.queue_key(), "thb:{pay}:queue");
        assert!(Target::new("pay").unwrap().with_heartbeat_key("").is_err());
        assert!(Target::new("pay")
            .unwrap()
            .with_heartbeat_key("a key")
            .is_err());
    }

    #[test]
    fn invalid_name_reads_well() {
        let err = Target::new("a*").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid target name \"a*\": contains a glob character (* ? [ ] \\)"
        );
    }
}
