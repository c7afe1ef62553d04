//! Smoke tests for the real HTTP target server of the shared test support
//! (`tests/support/http_target.rs`): recording, programmable replies,
//! kill (connections really drop) and restart on the same port.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use support::{hyper_client, HttpTarget, HyperClient, Reply};
use tower::ServiceExt;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

fn request(method: Method, url: String, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body.into()))
        .unwrap()
}

/// Sends through the client used as a tower `Service`.
async fn call(
    client: &HyperClient<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    tokio::time::timeout(CALL_TIMEOUT, client.clone().oneshot(req))
        .await
        .expect("call timed out")
}

async fn body_of(res: Response<Incoming>) -> Bytes {
    res.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn records_post_with_body_and_query_and_answers_ok() {
    let target = HttpTarget::start().await;
    assert!(target.addr().ip().is_loopback());
    assert_eq!(
        target.url(),
        format!("http://127.0.0.1:{}", target.addr().port())
    );
    let client = hyper_client();
    let before = Instant::now();

    let mut req = request(
        Method::POST,
        format!("{}/hello/world?a=1&b=two", target.url()),
        "payload-1",
    );
    req.headers_mut()
        .insert("x-custom", "custom-value".parse().unwrap());
    let res = call(&client, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-target"], "yes");
    assert_eq!(body_of(res).await, "ok:/hello/world");

    let res = call(
        &client,
        request(Method::GET, format!("{}/second", target.url()), ""),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(body_of(res).await, "ok:/second");

    assert!(target.wait_for_requests(2, CALL_TIMEOUT).await);
    assert_eq!(target.received_count(), 2);
    let received = target.received();
    let first = &received[0];
    assert_eq!(first.method, Method::POST);
    assert_eq!(first.uri, "/hello/world?a=1&b=two");
    assert_eq!(first.uri.query(), Some("a=1&b=two"));
    assert_eq!(first.headers["x-custom"], "custom-value");
    assert_eq!(first.body, "payload-1");
    assert!(first.at >= before && first.at <= Instant::now());
    assert_eq!(received[1].method, Method::GET);
    assert_eq!(received[1].uri, "/second");
    assert!(received[1].body.is_empty());
    assert!(received[1].at >= first.at);

    target.clear();
    assert_eq!(target.received_count(), 0);
    assert!(!target.wait_for_requests(1, Duration::from_millis(50)).await);
}

#[tokio::test]
async fn echo_returns_body_byte_for_byte() {
    let target = HttpTarget::start().await;
    target.set_reply(Reply::Echo);
    let client = hyper_client();
    let payload: Vec<u8> = (0..=255u8).cycle().take(256 * 1024 + 7).collect();

    let mut req = request(
        Method::PUT,
        format!("{}/echo", target.url()),
        payload.clone(),
    );
    req.headers_mut()
        .insert("content-type", "application/x-custom".parse().unwrap());
    let res = call(&client, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-target"], "yes");
    assert_eq!(res.headers()["content-type"], "application/x-custom");
    assert_eq!(body_of(res).await, payload);
    assert_eq!(target.received()[0].body, payload);
}

#[tokio::test]
async fn status_replies_are_answered_and_recorded() {
    let target = HttpTarget::start().await;
    let client = hyper_client();

    target.set_reply(Reply::Status(StatusCode::SERVICE_UNAVAILABLE));
    let res = call(
        &client,
        request(Method::POST, format!("{}/down", target.url()), "x"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["x-target"], "yes");
    assert_eq!(body_of(res).await, "status:503");

    target.set_reply(Reply::StatusWithHeaders(
        StatusCode::TOO_MANY_REQUESTS,
        vec![("retry-after".into(), "3".into())],
    ));
    let res = call(
        &client,
        request(Method::GET, format!("{}/busy", target.url()), ""),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "3");
    assert_eq!(res.headers()["x-target"], "yes");

    target.set_reply(Reply::Delay(Duration::from_millis(100)));
    let started = Instant::now();
    let res = call(
        &client,
        request(Method::GET, format!("{}/slow", target.url()), ""),
    )
    .await
    .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(body_of(res).await, "ok:/slow");

    let paths: Vec<String> = target
        .received()
        .iter()
        .map(|r| r.uri.path().to_owned())
        .collect();
    assert_eq!(paths, ["/down", "/busy", "/slow"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_refuses_connections_and_breaks_in_flight_then_restart_serves_same_port() {
    let mut target = HttpTarget::start().await;
    let addr = target.addr();
    let client = hyper_client();

    // A request that worked before, on a pooled keep-alive connection.
    let res = call(
        &client,
        request(Method::GET, format!("{}/before", target.url()), ""),
    )
    .await
    .unwrap();
    assert_eq!(body_of(res).await, "ok:/before");

    // An in-flight request that never gets an answer.
    target.set_reply(Reply::Hang);
    let hang_req = request(Method::POST, format!("{}/hang", target.url()), "stuck");
    let hang_client = client.clone();
    let hanging = tokio::spawn(async move { call(&hang_client, hang_req).await });
    assert!(target.wait_for_requests(2, CALL_TIMEOUT).await);
    assert!(!hanging.is_finished());

    target.kill().await;
    assert!(!target.is_running());
    let err = hanging
        .await
        .unwrap()
        .expect_err("in-flight request must fail when the target is killed");
    eprintln!("in-flight error after kill: {err:?}");

    // New connections are refused, at TCP level and through the client.
    let err = tokio::net::TcpStream::connect(addr)
        .await
        .expect_err("connect after kill must fail");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let err = call(
        &client,
        request(Method::GET, format!("{}/dead", target.url()), ""),
    )
    .await
    .expect_err("request after kill must fail");
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(target.received_count(), 2);

    // Restart: same port, records and reply setting kept.
    target.restart().await;
    assert!(target.is_running());
    assert_eq!(target.addr(), addr);
    assert_eq!(target.received_count(), 2);
    let received = target.received();
    assert_eq!(received[0].uri, "/before");
    assert_eq!(received[1].uri, "/hang");
    assert_eq!(received[1].body, "stuck");

    target.set_reply(Reply::Status(StatusCode::CREATED));
    target.kill().await;
    target.kill().await; // idempotent
    target.restart().await;
    let res = call(
        &client,
        request(Method::POST, format!("{}/after", target.url()), "again"),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    target.set_reply(Reply::Ok);
    let res = call(
        &client,
        request(Method::GET, format!("{}/after2", target.url()), ""),
    )
    .await
    .unwrap();
    assert_eq!(body_of(res).await, "ok:/after2");
    assert_eq!(target.received_count(), 4);
    assert_eq!(target.received()[2].body, "again");
}

#[tokio::test]
async fn drop_closes_the_port() {
    let target = HttpTarget::start().await;
    let addr = target.addr();
    tokio::net::TcpStream::connect(addr).await.unwrap();
    drop(target);
    assert!(
        support::wait_until(CALL_TIMEOUT, || std::net::TcpStream::connect(addr).is_err()).await
    );
}
