//! Properties of the stored encoding (`Envelope`), over generated input:
//!
//! - any request a caller can make (standard and extension methods, origin-
//!   and absolute-form URIs of valid characters, any header names and values
//!   `http` accepts, binary bodies, any idempotency key the layer accepts)
//!   round-trips through `capture` → `to_fields` → `from_fields`, minus the
//!   never-stored headers;
//! - any byte strings as field names and values decode to an envelope or to
//!   a `MalformedEntry`, never a panic;
//! - an envelope decoded from anything re-encodes to fields that decode to
//!   the same envelope, and encoding again gives the same fields (stable).

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use tower_heartbeat_buffer::envelope::Envelope;
use tower_heartbeat_buffer::policy::NeverStore;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// 512 cases per property unless `PROPTEST_CASES` says otherwise (e.g. a
/// long run: `PROPTEST_CASES=100000 cargo test --release --test encoding_props`).
fn config() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 512;
    }
    config
}

fn decode(fields: &Fields) -> Result<Envelope, tower_heartbeat_buffer::MalformedEntry> {
    Envelope::from_fields(fields.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
}

fn encode(envelope: &Envelope) -> Fields {
    envelope
        .to_fields()
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v))
        .collect()
}

// ---------------------------------------------------------------------------
// Generators of valid requests.
// ---------------------------------------------------------------------------

/// Standard methods and extension methods (any token: RFC 9110 `tchar`s).
fn method() -> impl Strategy<Value = Method> {
    let standard = select(vec![
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::CONNECT,
    ]);
    let extension = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}"
        .prop_map(|m| Method::from_bytes(m.as_bytes()).expect("a token is a method"));
    let named = select(vec!["PURGE", "MKCOL", "PROPFIND", "LINK", "get", "Post"])
        .prop_map(|m| Method::from_bytes(m.as_bytes()).unwrap());
    prop_oneof![4 => standard, 2 => extension, 1 => named]
}

/// One path segment: unreserved, sub-delims, `:`, `@`, percent-escapes and
/// some non-ASCII text (which `http` accepts in paths and queries).
fn segment() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            8 => "[A-Za-z0-9._~!$&'()*+,;=:@-]",
            1 => "%[0-9A-Fa-f]{2}",
            1 => select(vec!["é", "日本", "😀", "ß"]).prop_map(str::to_owned),
        ],
        0..12,
    )
    .prop_map(|parts| parts.concat())
}

fn query() -> impl Strategy<Value = String> {
    vec(
        prop_oneof![
            8 => "[A-Za-z0-9._~!$&'()*+,;=:@/?-]",
            1 => "%[0-9A-Fa-f]{2}",
            1 => select(vec!["é", "日本"]).prop_map(str::to_owned),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

/// Origin form (`/a/b?q`) or absolute form (`http://host:port/a?q`), as the
/// wrapped service may receive either.
fn uri() -> impl Strategy<Value = http::Uri> {
    let path = vec(segment(), 0..6).prop_map(|segments| format!("/{}", segments.join("/")));
    let query = proptest::option::of(query());
    let authority = proptest::option::of((
        select(vec!["http", "https"]),
        "[a-z0-9][a-z0-9.-]{0,20}",
        proptest::option::of(1u16..),
    ));
    (authority, path, query).prop_map(|(authority, path, query)| {
        let mut uri = String::new();
        if let Some((scheme, host, port)) = authority {
            uri.push_str(&format!("{scheme}://{host}"));
            if let Some(port) = port {
                uri.push_str(&format!(":{port}"));
            }
        }
        uri.push_str(&path);
        if let Some(query) = query {
            uri.push('?');
            uri.push_str(&query);
        }
        uri.parse()
            .unwrap_or_else(|e| panic!("generated {uri:?}: {e}"))
    })
}

/// Any header name `http` accepts (tokens, lowercased by `http`), the
/// never-stored ones included so that leaving them out is exercised.
fn header_name() -> impl Strategy<Value = HeaderName> {
    let token = "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,30}"
        .prop_map(|n| HeaderName::from_bytes(n.as_bytes()).expect("a token is a header name"));
    let known = select(
        NeverStore::DEFAULT
            .iter()
            .chain(&["content-type", "idempotency-key", "x-multi", "accept"])
            .map(|n| HeaderName::from_static(n))
            .collect::<Vec<_>>(),
    );
    prop_oneof![3 => token, 2 => known]
}

/// Any header value `http` accepts: visible ASCII, space, tab and obs-text
/// (0x80-0xFF), empty or with leading/trailing whitespace.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![
        6 => 0x20u8..0x7f,
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    vec(byte, 0..64)
        .prop_map(|bytes| HeaderValue::from_bytes(&bytes).expect("valid header value bytes"))
}

/// An id the layer accepts: a non-empty `Idempotency-Key` of visible ASCII,
/// spaces and tabs inside (not around it: the wire would strip them), or a
/// UUIDv7-looking one.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[!-~]",
        "[!-~][\\t\\x20-\\x7e]{0,78}[!-~]",
        "[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
    ]
}

fn body() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..256),
        1 => vec(any::<u8>(), 0..4096),
        1 => Just(b"\r\nx: y\r\n\r\n".to_vec()),
    ]
    .prop_map(Bytes::from)
}

fn request_parts() -> impl Strategy<Value = http::request::Parts> {
    (method(), uri(), vec((header_name(), header_value()), 0..16)).prop_map(
        |(method, uri, headers)| {
            let mut request = Request::new(());
            *request.method_mut() = method;
            *request.uri_mut() = uri;
            for (name, value) in headers {
                request.headers_mut().append(name, value);
            }
            request.into_parts().0
        },
    )
}

// ---------------------------------------------------------------------------
// Generators of hostile fields.
// ---------------------------------------------------------------------------

const NAMES: [&str; 8] = [
    "v",
    "id",
    "method",
    "uri",
    "headers",
    "body",
    "enqueued_at",
    "attempts",
];

/// A value that is sometimes right, often nearly right, sometimes garbage.
fn hostile_value() -> impl Strategy<Value = Vec<u8>> {
    let nasty = select(vec![
        &b""[..],
        b"1",
        b"2",
        b"01",
        b" 1",
        b"+7",
        b"-1",
        b"18446744073709551615",
        b"18446744073709551616",
        b"4294967296",
        b"\xff\xfe",
        b"\xc3(",
        b"\r\n",
        b":",
        b": ",
        b"a: b\r\n",
        b"a: b\r\n\r\nc: d",
        b"a:b\r\nA: c\r\nb:  d\r\nc:\t",
        b"x: \x80\xff",
        b"x: a\nb",
        b"x: a\rb",
        b"\x00",
        b"POST",
        b"GE T",
        b"/a?b#c",
        b"*",
        b"http://[::1",
        b"http://[::1]:8080/x?y",
        b"http://h:99999999/",
        b"http://u@h/",
        b"//h/p",
        b"h:80",
        b"\xe6\x97\xa5/\xf0\x9f\x98\x80",
        b"/%zz",
        b"http://h?q",
        b"HTTP://H/",
    ])
    .prop_map(<[u8]>::to_vec);
    prop_oneof![
        3 => nasty,
        2 => vec(any::<u8>(), 0..48),
        1 => "[ -~]{0,40}".prop_map(String::into_bytes),
    ]
}

/// Field lists around the real names: each known field present with a
/// plausible value (mostly: about one list in five decodes) or a hostile one,
/// missing, or twice; plus unknown fields with arbitrary names.
fn hostile_fields() -> impl Strategy<Value = Fields> {
    let field = |name: &'static str, good: BoxedStrategy<Vec<u8>>| {
        prop_oneof![
            24 => good.prop_map(move |v| vec![(name.as_bytes().to_vec(), v)]),
            3 => hostile_value().prop_map(move |v| vec![(name.as_bytes().to_vec(), v)]),
            1 => Just(Vec::new()),
            1 => (hostile_value(), hostile_value()).prop_map(move |(a, b)| vec![
                (name.as_bytes().to_vec(), a),
                (name.as_bytes().to_vec(), b)
            ]),
        ]
    };
    let good_headers = vec((header_name(), header_value()), 0..6).prop_map(|headers| {
        headers
            .iter()
            .map(|(n, v)| {
                let mut line = n.as_str().as_bytes().to_vec();
                line.extend_from_slice(b": ");
                line.extend_from_slice(v.as_bytes());
                line
            })
            .collect::<Vec<_>>()
            .join(&b"\r\n"[..])
    });
    let parts = (
        field("v", Just(b"1".to_vec()).boxed()),
        field("id", id().prop_map(String::into_bytes).boxed()),
        field(
            "method",
            method()
                .prop_map(|m| m.as_str().as_bytes().to_vec())
                .boxed(),
        ),
        field(
            "uri",
            uri().prop_map(|u| u.to_string().into_bytes()).boxed(),
        ),
        field("headers", good_headers.boxed()),
        field("body", vec(any::<u8>(), 0..64).boxed()),
        field(
            "enqueued_at",
            any::<u64>()
                .prop_map(|n| n.to_string().into_bytes())
                .boxed(),
        ),
        field(
            "attempts",
            any::<u32>()
                .prop_map(|n| n.to_string().into_bytes())
                .boxed(),
        ),
    );
    let extra = vec((vec(any::<u8>(), 0..12), hostile_value()), 0..4);
    (parts, extra, any::<bool>()).prop_map(|((a, b, c, d, e, f, g, h), extra, reverse)| {
        let mut fields: Fields = [a, b, c, d, e, f, g, h].concat();
        fields.extend(extra);
        if reverse {
            fields.reverse();
        }
        fields
    })
}

/// Arbitrary pairs, names often among the real ones.
fn random_fields() -> impl Strategy<Value = Fields> {
    let name = prop_oneof![
        select(NAMES.to_vec()).prop_map(|n| n.as_bytes().to_vec()),
        vec(any::<u8>(), 0..16),
    ];
    vec((name, vec(any::<u8>(), 0..64)), 0..20)
}

// ---------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Any request the layer may store comes back as it was, but for the
    /// never-stored headers.
    #[test]
    fn any_request_round_trips_minus_never_stored_headers(
        parts in request_parts(),
        body in body(),
        id in id(),
        attempts in 0u32..=1,
    ) {
        let never_store = NeverStore::default();
        let envelope = Envelope::capture(&id, &parts, body.clone(), &never_store, attempts);

        // What capture keeps: every header but the never-stored ones, values
        // in their order.
        let mut expected = http::HeaderMap::new();
        for (name, value) in &parts.headers {
            if !never_store.contains(name) {
                expected.append(name.clone(), value.clone());
            }
        }
        prop_assert_eq!(&envelope.headers, &expected);
        for name in NeverStore::DEFAULT {
            prop_assert!(!envelope.headers.contains_key(name), "{} was kept", name);
        }

        let fields = encode(&envelope);
        let back = decode(&fields);
        prop_assert!(back.is_ok(), "{:?} for {:?}", back, envelope);
        let back = back.unwrap();
        prop_assert_eq!(&back, &envelope);
        prop_assert_eq!(&back.id, &id);
        prop_assert_eq!(&back.method, &parts.method);
        prop_assert_eq!(&back.uri, &parts.uri);
        prop_assert_eq!(back.uri.to_string(), parts.uri.to_string());
        prop_assert_eq!(&back.body, &body);
        prop_assert_eq!(back.attempts, attempts);
        // Per name, values keep their order (HeaderMap's equality ignores
        // the order across names only).
        for name in expected.keys() {
            let want: Vec<_> = expected.get_all(name).iter().collect();
            let got: Vec<_> = back.headers.get_all(name).iter().collect();
            prop_assert_eq!(want, got);
        }
        // The request sent on replay carries the same method, URI, headers
        // and body, plus the id as Idempotency-Key.
        let replayed = back.into_request();
        prop_assert_eq!(replayed.method(), &parts.method);
        prop_assert_eq!(replayed.uri(), &parts.uri);
        prop_assert_eq!(&replayed.headers()["idempotency-key"], id.as_str());
        prop_assert_eq!(replayed.body(), &body);
    }

    /// Bytes found in the queue, whatever they are, decode or are refused;
    /// what decodes re-encodes stably.
    #[test]
    fn hostile_fields_decode_or_fail_and_what_decodes_is_stable(fields in hostile_fields()) {
        if let Ok(first) = decode(&fields) {
            check_stable(&first)?;
        }
    }

    /// Entirely arbitrary field names and values never panic the decoder.
    #[test]
    fn arbitrary_fields_never_panic_the_decoder(fields in random_fields()) {
        if let Ok(first) = decode(&fields) {
            check_stable(&first)?;
        }
    }

    /// A refusal always says why, naming something.
    #[test]
    fn refusals_carry_a_reason(fields in hostile_fields()) {
        if let Err(e) = decode(&fields) {
            prop_assert!(!e.reason().is_empty());
            prop_assert!(e.to_string().starts_with("malformed buffer entry: "), "{}", e);
        }
    }
}

/// Decoding the encoding of a decoded envelope gives it back, and encoding
/// again gives the same fields.
fn check_stable(first: &Envelope) -> Result<(), TestCaseError> {
    let encoded = encode(first);
    let second = decode(&encoded);
    prop_assert!(
        second.is_ok(),
        "re-encoded {:?} does not decode: {:?}",
        first,
        second
    );
    let second = second.unwrap();
    prop_assert_eq!(&second, first);
    prop_assert_eq!(encode(&second), encoded);
    Ok(())
}

/// Cases found worth keeping as plain examples (they also document what the
/// decoder accepts and refuses).
#[test]
fn hand_picked_edge_cases() {
    let valid = |overrides: &[(&str, &[u8])]| -> Fields {
        let mut fields: Fields = vec![
            (b"v".to_vec(), b"1".to_vec()),
            (b"id".to_vec(), b"k".to_vec()),
            (b"method".to_vec(), b"POST".to_vec()),
            (b"uri".to_vec(), b"/a".to_vec()),
            (b"headers".to_vec(), b"".to_vec()),
            (b"body".to_vec(), b"".to_vec()),
            (b"enqueued_at".to_vec(), b"0".to_vec()),
            (b"attempts".to_vec(), b"0".to_vec()),
        ];
        for (name, value) in overrides {
            fields.retain(|(k, _)| k != name.as_bytes());
            fields.push((name.as_bytes().to_vec(), value.to_vec()));
        }
        fields
    };
    // Accepted, and stable.
    for overrides in [
        &[][..],
        &[("headers", &b"x:  spaced \r\ny:\tt\r\nZ: upper"[..])],
        &[("uri", &b"http://h?q"[..])],
        &[("uri", &b"*"[..])],
        &[("uri", &b"h:80"[..])],
        &[("method", &b"purge"[..])],
        &[("id", &b"key with\tinner spaces"[..])],
        &[("headers", &b"x: \x80\xff"[..])],
        &[("unknown", &b"\xff"[..])],
    ] {
        let fields = valid(overrides);
        let e = decode(&fields).unwrap_or_else(|e| panic!("{overrides:?}: {e}"));
        check_stable(&e).unwrap();
    }
    // An unknown field with a name that is not UTF-8 is ignored too.
    let mut fields = valid(&[]);
    fields.push((b"\xff\xfe".to_vec(), b"\xff".to_vec()));
    check_stable(&decode(&fields).unwrap()).unwrap();
    // Refused, with the field named.
    for (overrides, says) in [
        (&[("v", &b"2"[..])][..], "version"),
        (&[("v", &b"\xff"[..])], "`v`"),
        (&[("id", &b"a\nb"[..])], "`id`"),
        (&[("id", &b"\xff"[..])], "`id`"),
        (&[("method", &b""[..])], "`method`"),
        (&[("uri", &b""[..])], "`uri`"),
        (&[("uri", &b"/a b"[..])], "`uri`"),
        (&[("headers", &b"a: b\r\n"[..])], "colon"),
        (&[("headers", &b"a b: c"[..])], "name"),
        (
            &[("enqueued_at", &b"18446744073709551616"[..])],
            "enqueued_at",
        ),
        (&[("attempts", &b"4294967296"[..])], "attempts"),
        (&[("attempts", &b"-1"[..])], "attempts"),
    ] {
        let err = decode(&valid(overrides)).unwrap_err();
        assert!(err.to_string().contains(says), "{overrides:?}: {err}");
    }
}

/// The hostile generator must produce both entries that decode and entries
/// that are refused, or the stability property above would test nothing.
#[test]
fn hostile_generator_covers_both_outcomes() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = hostile_fields();
    let (mut ok, mut err) = (0, 0);
    for _ in 0..2000 {
        let fields = strategy.new_tree(&mut runner).unwrap().current();
        match decode(&fields) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    eprintln!("hostile fields: {ok} decoded, {err} refused");
    assert!(ok >= 100, "only {ok} of 2000 decoded");
    assert!(err >= 100, "only {err} of 2000 refused");
}
