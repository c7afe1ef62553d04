//! Small typed errors.
//!
//! Every error here is a leaf with a lowercase `Display` and, where it wraps
//! another failure, a [`source`](std::error::Error::source). Boxed into a
//! `tower::BoxError` they stay checkable with `err.is::<T>()`.

use std::fmt;

/// What kind of name an [`InvalidName`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameKind {
    /// A target's name: the `t` in `ns:{t}:hb`.
    Target,
    /// A key namespace: the `ns` in `ns:{t}:hb`.
    Namespace,
    /// An instance of a multi-instance target: the `i` in `ns:{t}:hb:i`.
    Instance,
    /// An explicit Redis key kept by some other system.
    Key,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Target => "target name",
            NameKind::Namespace => "namespace",
            NameKind::Instance => "instance name",
            NameKind::Key => "heartbeat key",
        })
    }
}

/// A name that cannot be used to build Redis keys.
///
/// Names end up inside key names, keyspace channels and glob patterns, so
/// glob characters, braces (which would move the Redis Cluster hash tag),
/// whitespace and control characters are refused up front rather than
/// producing keys that other programs cannot find.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidName {
    kind: NameKind,
    value: String,
    reason: &'static str,
}

impl InvalidName {
    pub(crate) fn new(kind: NameKind, value: &str, reason: &'static str) -> Self {
        Self {
            kind,
            value: value.to_owned(),
            reason,
        }
    }

    /// Which kind of name was refused.
    pub fn kind(&self) -> NameKind {
        self.kind
    }

    /// The refused name, as given.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why it was refused.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: {}", self.kind, self.value, self.reason)
    }
}

impl std::error::Error for InvalidName {}

/// A configuration that cannot work, found when a builder is finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidConfig {
    reason: String,
}

impl InvalidConfig {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.reason)
    }
}

impl std::error::Error for InvalidConfig {}

/// A Redis command that failed or timed out, with what it was for.
#[derive(Debug)]
pub struct RedisError {
    operation: &'static str,
    source: Option<redis::RedisError>,
}

impl RedisError {
    pub(crate) fn new(operation: &'static str, source: redis::RedisError) -> Self {
        Self {
            operation,
            source: Some(source),
        }
    }

    pub(crate) fn timeout(operation: &'static str) -> Self {
        Self {
            operation,
            source: None,
        }
    }

    /// What the command was for, e.g. `"heartbeat refresh"`.
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// Whether the command ran out of time (Redis paused, overloaded or
    /// unreachable) rather than failing with an answer.
    pub fn is_timeout(&self) -> bool {
        self.source.as_ref().is_none_or(|e| e.is_timeout())
    }
}

impl fmt::Display for RedisError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(_) => write!(f, "redis {} failed", self.operation),
            None => write!(f, "redis {} timed out", self.operation),
        }
    }
}

impl std::error::Error for RedisError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A stored entry that cannot be decoded: a later encoding version, or bytes
/// written into the queue by something else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MalformedEntry {
    reason: String,
}

impl MalformedEntry {
    pub(crate) fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }

    /// Why it was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for MalformedEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed buffer entry: {}", self.reason)
    }
}

impl std::error::Error for MalformedEntry {}
