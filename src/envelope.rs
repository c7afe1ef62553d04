//! A request as it is stored in the buffer, and back.
//!
//! One buffered request is one Redis stream entry whose fields a
//! `redis-cli XRANGE` user can read:
//!
//! | field | value |
//! | --- | --- |
//! | `v` | encoding version, `1` |
//! | `id` | the idempotency key, sent again with every replay |
//! | `method` | `POST`, `PUT`, ... |
//! | `uri` | as the wrapped service received it: path and query, or absolute |
//! | `headers` | `name: value` lines joined by CRLF, as on the wire |
//! | `body` | the body, byte for byte |
//! | `enqueued_at` | Unix time in milliseconds |
//! | `attempts` | forward attempts made before it was stored (0 or 1) |
//!
//! Decoding refuses what it does not understand with [`MalformedEntry`]
//! rather than guessing: a later version's entry, or bytes written into the
//! queue by hand, become dead letters with the reason, never a wrong request.
//!
//! # Examples
//!
//! ```
//! use bytes::Bytes;
//! use tower_heartbeat_buffer::envelope::Envelope;
//!
//! let request = http::Request::post("/orders?tenant=7")
//!     .header("content-type", "application/json")
//!     .body(())
//!     .unwrap();
//! let (parts, ()) = request.into_parts();
//! let envelope = Envelope::capture("01J-example", &parts, Bytes::from_static(b"{}"), &Default::default(), 0);
//!
//! let fields = envelope.to_fields();
//! let back = Envelope::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_slice()))).unwrap();
//! assert_eq!(back, envelope);
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri};

use crate::error::MalformedEntry;
use crate::policy::NeverStore;

/// The encoding version written by this crate.
pub const VERSION: &str = "1";

/// The header that carries a request's identity across attempts.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// One buffered request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The idempotency key.
    pub id: String,
    /// The request method.
    pub method: Method,
    /// The request URI, as the wrapped service received it.
    pub uri: Uri,
    /// The stored headers (those not in the never-store list).
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// When it was stored, Unix milliseconds.
    pub enqueued_at_ms: u64,
    /// Forward attempts made before it was stored.
    pub attempts: u32,
}

impl Envelope {
    /// Captures a request for storage, leaving out the headers in
    /// `never_store`.
    pub fn capture(
        id: &str,
        parts: &http::request::Parts,
        body: Bytes,
        never_store: &NeverStore,
        attempts: u32,
    ) -> Self {
        let mut headers = HeaderMap::with_capacity(parts.headers.len());
        for (name, value) in &parts.headers {
            if !never_store.contains(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        Self {
            id: id.to_owned(),
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers,
            body,
            enqueued_at_ms: unix_ms(),
            attempts,
        }
    }

    /// The stream entry's fields, in a stable order.
    pub fn to_fields(&self) -> Vec<(&'static str, Vec<u8>)> {
        let encoded = Encoded {
            id: self.id.clone(),
            method: self.method.clone(),
            uri: self.uri.to_string(),
            headers: encode_headers(self.headers.iter(), |_| false),
            body: self.body.clone(),
            enqueued_at: self.enqueued_at_ms.to_string(),
            attempts: self.attempts.to_string(),
        };
        encoded
            .fields()
            .into_iter()
            .map(|(name, value)| (name, value.to_vec()))
            .collect()
    }

    /// Decodes a stream entry's fields (any order; unknown fields ignored, so
    /// that later versions may add some).
    pub fn from_fields<'a>(
        fields: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, MalformedEntry> {
        let (mut v, mut id, mut method, mut uri, mut headers, mut body, mut at, mut attempts) =
            (None, None, None, None, None, None, None, None);
        for (name, value) in fields {
            let slot = match name {
                b"v" => &mut v,
                b"id" => &mut id,
                b"method" => &mut method,
                b"uri" => &mut uri,
                b"headers" => &mut headers,
                b"body" => &mut body,
                b"enqueued_at" => &mut at,
                b"attempts" => &mut attempts,
                _ => continue,
            };
            *slot = Some(value);
        }
        let field = |value: Option<&'a [u8]>, name: &'static str| {
            value.ok_or_else(|| MalformedEntry::new(format!("missing field `{name}`")))
        };
        let text = |value: &'a [u8], name: &'static str| {
            std::str::from_utf8(value)
                .map_err(|_| MalformedEntry::new(format!("field `{name}` is not UTF-8")))
        };

        let version = text(field(v, "v")?, "v")?;
        if version != VERSION {
            return Err(MalformedEntry::new(format!(
                "unsupported encoding version {version:?} (this build reads {VERSION:?})"
            )));
        }
        let id = text(field(id, "id")?, "id")?;
        if id.is_empty() || HeaderValue::from_str(id).is_err() {
            return Err(MalformedEntry::new(
                "field `id` is not a valid header value",
            ));
        }
        let method = Method::from_bytes(field(method, "method")?)
            .map_err(|_| MalformedEntry::new("field `method` is not an HTTP method"))?;
        let uri = Uri::try_from(field(uri, "uri")?)
            .map_err(|e| MalformedEntry::new(format!("field `uri` is not a URI: {e}")))?;
        let headers = parse_headers(field(headers, "headers")?)?;
        let body = Bytes::copy_from_slice(field(body, "body")?);
        let enqueued_at_ms = text(field(at, "enqueued_at")?, "enqueued_at")?
            .parse()
            .map_err(|_| MalformedEntry::new("field `enqueued_at` is not a number"))?;
        let attempts = text(field(attempts, "attempts")?, "attempts")?
            .parse()
            .map_err(|_| MalformedEntry::new("field `attempts` is not a number"))?;
        Ok(Self {
            id: id.to_owned(),
            method,
            uri,
            headers,
            body,
            enqueued_at_ms,
            attempts,
        })
    }

    /// Bytes this entry occupies in its fields, roughly what Redis stores.
    pub fn stored_len(&self) -> usize {
        self.body.len()
            + self.uri.to_string().len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>()
            + self.id.len()
            + 64
    }

    /// The request to send again: same method, URI, stored headers and body,
    /// and the idempotency key.
    pub fn into_request(self) -> Request<Bytes> {
        let mut request = Request::new(self.body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        if let Ok(id) = HeaderValue::from_str(&self.id) {
            request.headers_mut().insert(IDEMPOTENCY_KEY, id);
        }
        request
    }
}

/// An entry ready to be written: the fields rendered once, the body shared
/// rather than copied. What the buffer writes on the hot path of a store.
#[derive(Debug)]
pub(crate) struct Encoded {
    id: String,
    method: Method,
    uri: String,
    headers: Vec<u8>,
    body: Bytes,
    enqueued_at: String,
    attempts: String,
}

impl Encoded {
    /// Encodes a request straight from its parts (no header map copy),
    /// leaving out the headers in `never_store`.
    pub(crate) fn request(
        id: String,
        parts: &http::request::Parts,
        body: Bytes,
        never_store: &NeverStore,
        attempts: u32,
    ) -> Self {
        Self {
            id,
            method: parts.method.clone(),
            uri: parts.uri.to_string(),
            headers: encode_headers(parts.headers.iter(), |name| never_store.contains(name)),
            body,
            enqueued_at: unix_ms().to_string(),
            attempts: attempts.to_string(),
        }
    }

    /// The fields, in the documented order.
    pub(crate) fn fields(&self) -> [(&'static str, &[u8]); 8] {
        [
            ("v", VERSION.as_bytes()),
            ("id", self.id.as_bytes()),
            ("method", self.method.as_str().as_bytes()),
            ("uri", self.uri.as_bytes()),
            ("headers", &self.headers),
            ("body", &self.body),
            ("enqueued_at", self.enqueued_at.as_bytes()),
            ("attempts", self.attempts.as_bytes()),
        ]
    }

    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

/// `name: value` lines joined by CRLF, skipping names `skip` refuses.
fn encode_headers<'a>(
    headers: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    skip: impl Fn(&HeaderName) -> bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    for (name, value) in headers {
        if skip(name) {
            continue;
        }
        if !out.is_empty() {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
    }
    out
}

fn parse_headers(raw: &[u8]) -> Result<HeaderMap, MalformedEntry> {
    let mut headers = HeaderMap::new();
    if raw.is_empty() {
        return Ok(headers);
    }
    for line in split_crlf(raw) {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| MalformedEntry::new("a header line has no colon"))?;
        let name = HeaderName::from_bytes(&line[..colon])
            .map_err(|_| MalformedEntry::new("a header name is invalid"))?;
        let value = line[colon + 1..]
            .strip_prefix(b" ")
            .unwrap_or(&line[colon + 1..]);
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| MalformedEntry::new(format!("header `{name}` has an invalid value")))?;
        headers.append(name, value);
    }
    Ok(headers)
}

fn split_crlf(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(raw);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.windows(2).position(|w| w == b"\r\n") {
            Some(at) => {
                rest = Some(&current[at + 2..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        let request = Request::put("http://svc.local/a/b?x=1&y=%20")
            .header("content-type", "application/json")
            .header("x-multi", "one")
            .header("x-multi", "two")
            .header("x-bytes", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .header("authorization", "Bearer secret")
            .header("connection", "keep-alive")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        Envelope::capture(
            "0191-id",
            &parts,
            Bytes::from_static(b"\x00\x01binary\r\n"),
            &NeverStore::default(),
            1,
        )
    }

    fn round_trip(e: &Envelope) -> Result<Envelope, MalformedEntry> {
        let fields = e.to_fields();
        Envelope::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())))
    }

    #[test]
    fn round_trip_keeps_everything_but_never_stored_headers() {
        let e = sample();
        assert!(!e.headers.contains_key("authorization"));
        assert!(!e.headers.contains_key("connection"));
        let back = round_trip(&e).unwrap();
        assert_eq!(back, e);
        let multi: Vec<_> = back.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["one", "two"]);
    }

    #[test]
    fn encoding_from_parts_matches_the_envelope() {
        let request = Request::post("/a?b=c")
            .header("x-one", "1")
            .header("cookie", "secret")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let encoded = Encoded::request(
            "k".into(),
            &parts,
            Bytes::from_static(b"body"),
            &NeverStore::default(),
            1,
        );
        let back = Envelope::from_fields(encoded.fields().iter().map(|(k, v)| (k.as_bytes(), *v)))
            .unwrap();
        let expected = Envelope::capture(
            "k",
            &parts,
            Bytes::from_static(b"body"),
            &NeverStore::default(),
            1,
        );
        assert_eq!(back.headers, expected.headers);
        assert_eq!(back.body, expected.body);
        assert_eq!(back.uri, expected.uri);
        assert_eq!(back.attempts, 1);
        assert!(!back.headers.contains_key("cookie"));
    }

    #[test]
    fn into_request_carries_the_idempotency_key() {
        let request = sample().into_request();
        assert_eq!(request.headers()[IDEMPOTENCY_KEY], "0191-id");
        assert_eq!(request.method(), Method::PUT);
        assert_eq!(request.uri(), "http://svc.local/a/b?x=1&y=%20");
        assert_eq!(&request.body()[..], b"\x00\x01binary\r\n");
    }

    #[test]
    fn malformed_entries_are_refused_with_a_reason() {
        let fields = sample().to_fields();
        let with = |name: &str, value: &[u8]| {
            let mut f: Vec<(&[u8], &[u8])> = fields
                .iter()
                .filter(|(k, _)| *k != name)
                .map(|(k, v)| (k.as_bytes(), v.as_slice()))
                .collect();
            f.push((name.as_bytes(), value));
            Envelope::from_fields(f).unwrap_err().to_string()
        };
        assert!(with("v", b"2").contains("unsupported encoding version"));
        assert!(with("method", b"GE T").contains("method"));
        assert!(with("uri", b"http://[::1").contains("uri"));
        assert!(with("headers", b"no-colon-here").contains("colon"));
        assert!(with("headers", b"x: a\nb").contains("invalid value"));
        assert!(with("enqueued_at", b"soon").contains("enqueued_at"));
        assert!(with("id", b"").contains("id"));
        let err = Envelope::from_fields([(&b"garbage"[..], &b"1"[..])]).unwrap_err();
        assert!(err.to_string().contains("missing field `v`"), "{err}");
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A cheap deterministic fuzz: every field gets assorted nasty values.
        let nasty: [&[u8]; 8] = [
            b"",
            b"\xff\xfe",
            b"\r\n",
            b":",
            b"a: b\r\n\r\nc: d",
            b"18446744073709551616",
            b"1",
            b"GET",
        ];
        let names = [
            "v",
            "id",
            "method",
            "uri",
            "headers",
            "body",
            "enqueued_at",
            "attempts",
        ];
        for (i, name) in names.iter().enumerate() {
            for value in nasty {
                let mut fields: Vec<(&[u8], &[u8])> = names
                    .iter()
                    .map(|n| (n.as_bytes(), nasty[(i + n.len()) % nasty.len()]))
                    .collect();
                fields.push((name.as_bytes(), value));
                let _ = Envelope::from_fields(fields);
            }
        }
    }
}
