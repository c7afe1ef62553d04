//! The layer composed with the ecosystem, with real parts only: a real
//! `redis-server`, real HTTP targets on loopback, real hyper / reqwest
//! clients, real axum routers served by hyper.
//!
//! Each test checks what a user of the composition sees: the target's own
//! status and body while it is up; `202 Accepted` (with the
//! [`Buffered`] extension where the response does not cross the wire) and
//! the entry in the Redis buffer while it is down.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{any, post};
use axum::Router;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::HOST;
use http::{Extensions, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use support::layer_rig::Rig;
use support::{hyper_client, HyperClient, Reply};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_heartbeat_buffer::{
    BoxError, Buffered, DeliveryOrder, HeartbeatBuffer, HeartbeatBufferLayer, RequestBody,
};

/// Longest wait for any single step; tests never sleep to synchronise.
const STEP: Duration = Duration::from_secs(10);
/// The deadline the timeout layers give a hanging target.
const DEADLINE: Duration = Duration::from_millis(300);

/// A response read to the end.
#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: HeaderMap,
    extensions: Extensions,
    body: Bytes,
}

/// Sends one request through `service` (ready first) and reads the whole
/// response, within [`STEP`].
async fn send<S, RB>(service: &mut S, request: Request<Full<Bytes>>) -> Result<Got, S::Error>
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>>,
    RB: http_body::Body,
    RB::Error: std::fmt::Debug,
{
    tokio::time::timeout(STEP, async {
        let response = service.ready().await?.call(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Ok(Got {
            status: parts.status,
            headers: parts.headers,
            extensions: parts.extensions,
            body,
        })
    })
    .await
    .expect("the call did not finish in time")
}

fn post_to(url: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------
// 1. ServiceBuilder: trace + our layer + a timeout, over a hyper client.
// ---------------------------------------------------------------------------

/// Where the timeout sits decides what a hanging target means:
///
/// - **Below** the layer (between it and the client), the timeout is a
///   failure of *this attempt*: the layer sees it as a transport error
///   (`tower::timeout`, which turns the error type into [`BoxError`]) or as
///   a status (`tower_http::timeout`, which answers itself with the status
///   given to `with_status_code`: 408 must be declared a failure with
///   `is_failure`, 504 already is one by default). Either way a
///   bufferable request is diverted to the buffer: `202`, stored with
///   `attempts == 1`, and the failure counts towards suspecting the target.
/// - **Above** the layer, the timeout is a deadline for *the whole call*,
///   storing included: when it fires, the layer's future is dropped
///   mid-forward, so nothing is stored and the caller sees the timeout
///   (`Elapsed` error, or tower-http's status). A cancelled forward is not
///   counted as a failure of the target either.
///
/// So: timeout below the layer to buffer slow targets; a (longer) one above
/// to bound the caller's wait, buffer write included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_builder_with_trace_and_timeout_layers_on_a_hyper_client() {
    init_tracing();
    let rig = Rig::start().await;
    rig.up().await;
    let url = format!("{}/orders", rig.http.url());
    // Relaxed order: an entry diverted by one stack must not make the next
    // stack's bufferable calls join the backlog without trying the target.
    let builder =
        || HeartbeatBufferLayer::builder(rig.target.clone()).order(DeliveryOrder::Relaxed);

    // A. tower::timeout BELOW the layer: a timeout is a transport error.
    let layer = builder().build(&rig.watcher).await.unwrap();
    let mut stack = ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(layer)
        .layer(tower::timeout::TimeoutLayer::new(DEADLINE))
        .service(hyper_client::<RequestBody<Full<Bytes>>>());
    rig.http.set_reply(Reply::Echo);
    let up = send(&mut stack, post_to(&url, "a-up")).await.unwrap();
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(up.body, "a-up");
    assert_eq!(up.headers["x-target"], "yes");
    assert!(up.extensions.get::<Buffered>().is_none());

    rig.http.set_reply(Reply::Hang);
    let seen = rig.http.received_count();
    let hung = send(&mut stack, post_to(&url, "a-hang")).await.unwrap();
    assert_eq!(hung.status, StatusCode::ACCEPTED);
    let buffered = hung
        .extensions
        .get::<Buffered>()
        .expect("Buffered extension");
    assert_eq!(rig.http.received_count(), seen + 1, "the target was tried");
    let stored = rig.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, buffered.id());
    assert_eq!(stored[0].body, "a-hang");
    assert_eq!(stored[0].attempts, 1, "diverted after one attempt");
    assert_eq!(stored[0].uri.to_string(), url);

    // B. tower_http::timeout BELOW the layer: it answers 408 itself, which
    // the layer must be told is a failure. hyper's `Incoming` has no
    // `Default` (tower-http needs one to write its 408), so the client's
    // body is boxed first.
    let layer = builder()
        .is_failure(|s: StatusCode| s == StatusCode::REQUEST_TIMEOUT || s.is_server_error())
        .build(&rig.watcher)
        .await
        .unwrap();
    let mut stack = ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(layer)
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            DEADLINE,
        ))
        .map_response(|r: Response<Incoming>| r.map(BodyExt::boxed_unsync))
        .service(hyper_client::<RequestBody<Full<Bytes>>>());
    rig.http.set_reply(Reply::Echo);
    let up = send(&mut stack, post_to(&url, "b-up")).await.unwrap();
    assert_eq!((up.status, &up.body[..]), (StatusCode::OK, &b"b-up"[..]));
    rig.http.set_reply(Reply::Hang);
    let hung = send(&mut stack, post_to(&url, "b-hang")).await.unwrap();
    assert_eq!(hung.status, StatusCode::ACCEPTED);
    assert!(hung.extensions.get::<Buffered>().is_some());
    let stored = rig.stored();
    assert_eq!(stored.len(), 2);
    assert_eq!(
        (&stored[1].body[..], stored[1].attempts),
        (&b"b-hang"[..], 1)
    );

    // B'. The default policy (502/503/504): tower-http's 408 is passed on
    // as the target's answer and nothing is stored; with 504 as its timeout
    // status the same stack diverts without configuring the layer.
    for (status, body, stored_after) in [
        (StatusCode::REQUEST_TIMEOUT, "b'-408", 2),
        (StatusCode::GATEWAY_TIMEOUT, "b'-504", 3),
    ] {
        let layer = builder().build(&rig.watcher).await.unwrap();
        let mut stack = ServiceBuilder::new()
            .layer(layer)
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                status, DEADLINE,
            ))
            .map_response(|r: Response<Incoming>| r.map(BodyExt::boxed_unsync))
            .service(hyper_client::<RequestBody<Full<Bytes>>>());
        let hung = send(&mut stack, post_to(&url, body)).await.unwrap();
        let stored = rig.stored();
        assert_eq!(stored.len(), stored_after, "{status}");
        if status == StatusCode::REQUEST_TIMEOUT {
            assert_eq!(hung.status, StatusCode::REQUEST_TIMEOUT);
        } else {
            assert_eq!(hung.status, StatusCode::ACCEPTED);
            assert_eq!(
                (&stored[2].body[..], stored[2].attempts),
                (body.as_bytes(), 1)
            );
        }
    }

    // C. tower::timeout ABOVE the layer: a deadline for the whole call. The
    // forward is cancelled, nothing is stored, the caller sees `Elapsed`.
    let layer = builder().build(&rig.watcher).await.unwrap();
    let mut stack = ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(tower::timeout::TimeoutLayer::new(DEADLINE))
        .layer(layer)
        .service(hyper_client::<RequestBody<Full<Bytes>>>());
    let seen = rig.http.received_count();
    let err = send(&mut stack, post_to(&url, "c-hang")).await.unwrap_err();
    assert!(
        err.is::<tower::timeout::error::Elapsed>(),
        "expected Elapsed, got {err}"
    );
    assert!(rig.http.wait_for_requests(seen + 1, STEP).await);
    assert_eq!(rig.stored().len(), 3, "a cancelled call is not stored");

    // D. tower_http::timeout ABOVE the layer: 408 from tower-http, nothing
    // stored. Our `ResponseBody` has no `Default`, so it must be boxed for
    // tower-http to write its own answer.
    let layer = builder().build(&rig.watcher).await.unwrap();
    let mut stack = ServiceBuilder::new()
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            DEADLINE,
        ))
        .map_response(|r: Response<_>| r.map(BodyExt::boxed_unsync))
        .layer(layer)
        .service(hyper_client::<RequestBody<Full<Bytes>>>());
    let hung = send(&mut stack, post_to(&url, "d-hang")).await.unwrap();
    assert_eq!(hung.status, StatusCode::REQUEST_TIMEOUT);
    assert!(hung.extensions.get::<Buffered>().is_none());
    assert_eq!(rig.stored().len(), 3, "a cancelled call is not stored");

    // Down: every stack answers 202 at once, without trying the target.
    rig.down().await;
    rig.http.set_reply(Reply::Echo);
    let seen = rig.http.received_count();
    let layer = builder().build(&rig.watcher).await.unwrap();
    let mut stack = ServiceBuilder::new()
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(layer)
        .layer(tower::timeout::TimeoutLayer::new(DEADLINE))
        .service(hyper_client::<RequestBody<Full<Bytes>>>());
    let down = send(&mut stack, post_to(&url, "down")).await.unwrap();
    assert_eq!(down.status, StatusCode::ACCEPTED);
    assert!(down.extensions.get::<Buffered>().is_some());
    let stored = rig.stored();
    assert_eq!((&stored[3].body[..], stored[3].attempts), (&b"down"[..], 0));
    assert_eq!(
        rig.http.received_count(),
        seen,
        "nothing reached the target"
    );
}

// ---------------------------------------------------------------------------
// 2. reqwest through the layer.
// ---------------------------------------------------------------------------

/// Lets a [`reqwest::Client`] (a `Service<reqwest::Request>`) be wrapped by
/// the layer, which speaks `http::Request` / `http::Response`.
///
/// - request: `reqwest::Body::wrap` takes any `http_body::Body` that is
///   `Send + Sync` (so `RequestBody<B>` with a `Sync` caller body `B`, e.g.
///   `Full<Bytes>`; a non-`Sync` body such as axum's must be collected or
///   wrapped first), then `reqwest::Request::try_from` (absolute URI needed);
/// - response: `http::Response::<reqwest::Body>::from(reqwest::Response)`;
/// - error: `reqwest::Error`, which becomes the stack's error type.
#[derive(Clone, Debug)]
struct Reqwest(reqwest::Client);

impl<B> Service<Request<B>> for Reqwest
where
    B: http_body::Body + Send + Sync + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Service::<reqwest::Request>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::wrap));
        let response = request.map(|request| self.0.call(request));
        Box::pin(async move { Ok(Response::from(response?.await?)) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_client_through_the_layer() {
    let mut rig = Rig::start().await;
    rig.up().await;
    rig.http.set_reply(Reply::Echo);
    let url = format!("{}/orders/9?tenant=7", rig.http.url());
    let layer = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&rig.watcher)
        .await
        .unwrap();
    // No proxy: the environment's HTTP_PROXY must not catch loopback calls.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut service: HeartbeatBuffer<Reqwest> = tower_layer::Layer::layer(&layer, Reqwest(client));

    // Up: forwarded, the target's answer comes back through reqwest.
    let up = send(&mut service, post_to(&url, "via reqwest"))
        .await
        .unwrap();
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(up.body, "via reqwest");
    assert_eq!(up.headers["x-target"], "yes");
    let seen = rig.http.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/orders/9?tenant=7");
    assert_eq!(seen[0].body, "via reqwest");
    assert!(seen[0].headers.contains_key("idempotency-key"));

    // Down: 202 and stored, nothing sent.
    rig.down().await;
    let mut request = post_to(&url, "stored via reqwest");
    request
        .headers_mut()
        .insert("idempotency-key", "rq-1".parse().unwrap());
    let down = send(&mut service, request).await.unwrap();
    assert_eq!(down.status, StatusCode::ACCEPTED);
    assert_eq!(down.extensions.get::<Buffered>().unwrap().id(), "rq-1");
    let stored = rig.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, "rq-1");
    assert_eq!(stored[0].method, Method::POST);
    assert_eq!(stored[0].uri.to_string(), url);
    assert_eq!(stored[0].body, "stored via reqwest");
    assert_eq!(stored[0].attempts, 0);
    assert_eq!(rig.http.received_count(), 1);

    // A reqwest transport error (heartbeat alive, target process gone) is
    // diverted like hyper's: reqwest::Error is the stack's error type.
    let _: () = redis::Commands::del(&mut rig.redis.conn(), rig.target.queue_key()).unwrap();
    let view = rig.watcher.watch(&rig.target).await;
    assert!(support::wait_until(STEP, || view.backlog() == Some(0)).await);
    rig.up().await;
    rig.http.kill().await;
    let gone = send(&mut service, post_to(&url, "target gone"))
        .await
        .unwrap();
    assert_eq!(gone.status, StatusCode::ACCEPTED);
    let stored = rig.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (&stored[0].body[..], stored[0].attempts),
        (&b"target gone"[..], 1)
    );
    // A GET cannot be diverted: the caller gets reqwest's own error.
    let get = Request::get(&url).body(Full::new(Bytes::new())).unwrap();
    let err = send(&mut service, get).await.unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");
}

// ---------------------------------------------------------------------------
// 3. An axum gateway forwarding through the layered hyper client.
// ---------------------------------------------------------------------------

/// The layered client as the gateway holds it: the caller's axum body goes
/// through untouched (or held, when it may have to be stored).
type GatewayClient = HeartbeatBuffer<HyperClient<RequestBody<axum::body::Body>>>;

#[derive(Clone)]
struct Gateway {
    client: GatewayClient,
    /// `http://127.0.0.1:PORT` of the target.
    target: String,
}

/// Forwards any request to the target, through the layer.
async fn proxy(
    State(gateway): State<Gateway>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("{}{path}", gateway.target).parse() {
        Ok(uri) => uri,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    // The client sets the target's Host itself.
    parts.headers.remove(HOST);
    match gateway
        .client
        .oneshot(Request::from_parts(parts, body))
        .await
    {
        // The target's answer, or the layer's own (202, 503, 413).
        Ok(response) => response.into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_router_proxies_through_the_layer() {
    let rig = Rig::start().await;
    rig.up().await;
    rig.http.set_reply(Reply::Echo);
    let layer = HeartbeatBufferLayer::builder(rig.target.clone())
        .build(&rig.watcher)
        .await
        .unwrap();
    let gateway = Gateway {
        client: tower_layer::Layer::layer(&layer, hyper_client()),
        target: rig.http.url(),
    };
    let app = Router::new()
        .route("/{*path}", any(proxy))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // A plain hyper client, as any caller of the gateway.
    let mut caller = hyper_client::<Full<Bytes>>();

    // Up: the target's answer, through the gateway.
    let up = send(
        &mut caller,
        post_to(&format!("{gateway_url}/orders/7?x=1"), "hello"),
    )
    .await
    .unwrap();
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(up.body, "hello");
    assert_eq!(up.headers["x-target"], "yes");
    let seen = rig.http.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/orders/7?x=1");
    assert_eq!(seen[0].headers[HOST], rig.http.addr().to_string());

    // Down: 202 from the gateway; the request sits in the buffer, addressed
    // to the target.
    rig.down().await;
    let mut request = post_to(&format!("{gateway_url}/orders/8"), "keep me");
    request
        .headers_mut()
        .insert("idempotency-key", "gw-1".parse().unwrap());
    let down = send(&mut caller, request).await.unwrap();
    assert_eq!(down.status, StatusCode::ACCEPTED);
    assert_eq!(down.headers["idempotency-key"], "gw-1");
    assert!(
        std::str::from_utf8(&down.body)
            .unwrap()
            .contains("\"status\":\"buffered\""),
        "{down:?}"
    );
    let stored = rig.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, "gw-1");
    assert_eq!(
        stored[0].uri.to_string(),
        format!("{}/orders/8", rig.http.url())
    );
    assert_eq!(stored[0].body, "keep me");
    assert_eq!(stored[0].headers["content-type"], "text/plain");
    assert_eq!(rig.http.received_count(), 1, "nothing reached the target");

    // A read cannot be buffered: 503 from the gateway.
    let get = Request::get(format!("{gateway_url}/orders/8"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&mut caller, get).await.unwrap();
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);

    server.abort();
}

// ---------------------------------------------------------------------------
// 4. The layer in front of an axum app's handlers.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_layer_wraps_an_axum_app() {
    let rig = Rig::start().await;
    rig.up().await;
    // The heartbeat watched is the one of whatever the handlers depend on
    // (here the rig's "orders" target).
    let layer = HeartbeatBufferLayer::builder(rig.target.clone())
        .order(DeliveryOrder::Relaxed)
        .build(&rig.watcher)
        .await
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let handler = {
        let hits = Arc::clone(&hits);
        move |body: Bytes| async move {
            hits.fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::CREATED,
                format!("created:{}", String::from_utf8_lossy(&body)),
            )
        }
    };
    // `Router::layer` also wraps the fallback (unknown paths); see below.
    let app = Router::new()
        .route("/orders", post(handler.clone()))
        .layer(layer.clone());
    // `route_layer` wraps matched routes only.
    let routes_only = Router::new()
        .route("/orders", post(handler))
        .route_layer(layer);

    let call = |router: Router, path: &str, body: &'static str| {
        let request = Request::post(path)
            .body(axum::body::Body::from(body))
            .unwrap();
        async move {
            let response: Result<_, Infallible> =
                tokio::time::timeout(STEP, router.oneshot(request))
                    .await
                    .expect("the router did not answer in time");
            let (parts, body) = response.unwrap().into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            (parts, body)
        }
    };

    // Up: the handler answers.
    let (parts, body) = call(app.clone(), "/orders", "one").await;
    assert_eq!(parts.status, StatusCode::CREATED);
    assert_eq!(body, "created:one");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // Down: 202, stored, the handler is not run.
    rig.down().await;
    let (parts, body) = call(app.clone(), "/orders", "two").await;
    assert_eq!(parts.status, StatusCode::ACCEPTED, "{body:?}");
    let buffered = parts.extensions.get::<Buffered>().expect("Buffered");
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the handler ran");
    let stored = rig.stored();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, buffered.id());
    assert_eq!(stored[0].uri, "/orders");
    assert_eq!(stored[0].body, "two");

    // Unknown path while down: with `Router::layer` the fallback is wrapped
    // too, so a POST nobody would handle is stored (and answered 202);
    // with `route_layer` it gets the router's 404.
    let (parts, _) = call(app.clone(), "/no-such-route", "stray").await;
    assert_eq!(parts.status, StatusCode::ACCEPTED);
    assert_eq!(rig.stored().len(), 2);
    let (parts, _) = call(routes_only.clone(), "/no-such-route", "stray").await;
    assert_eq!(parts.status, StatusCode::NOT_FOUND);
    let (parts, _) = call(routes_only.clone(), "/orders", "three").await;
    assert_eq!(parts.status, StatusCode::ACCEPTED);
    assert_eq!(rig.stored().len(), 3);

    // Up again: handlers answer again.
    rig.up().await;
    let (parts, body) = call(routes_only, "/orders", "four").await;
    assert_eq!(parts.status, StatusCode::CREATED);
    assert_eq!(body, "created:four");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
