//! A REAL HTTP target server for tests and benches: an axum app on a free
//! loopback port that records every request it receives and answers the way
//! the test programs it ([`Reply`]). It can be killed (listener closed AND
//! every open connection dropped at once) and restarted on the same port.
//!
//! ```ignore
//! let mut target = HttpTarget::start().await;
//! let client = hyper_client::<Full<Bytes>>();
//! // ... send requests to target.url() ...
//! target.set_reply(Reply::Status(StatusCode::SERVICE_UNAVAILABLE));
//! target.kill().await;                 // connects are refused, in-flight calls fail
//! target.restart().await;              // same port, records and reply kept
//! assert!(target.wait_for_requests(3, Duration::from_secs(5)).await);
//! ```
//!
//! The accept loop is our own (not `axum::serve`): every accepted connection
//! is served by `hyper::server::conn::http1` on a task in a
//! [`tokio::task::JoinSet`] owned by the server task, so stopping the server
//! task really drops every connection (a spawned-and-forgotten connection
//! task would survive it).
//!
//! Depends only on axum + hyper + hyper-util + tokio + http/bytes/http-body
//! (never on the crate under test).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

use super::wait_until;

/// Header set on every answer of the target (`x-target: yes`).
pub const TARGET_HEADER: &str = "x-target";
/// How long [`HttpTarget::restart`] keeps retrying to bind the old port.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
const REBIND_POLL: Duration = Duration::from_millis(10);
/// How long [`HttpTarget::kill`] waits for the server task to drop its
/// listener and connections before aborting it outright.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const LISTEN_BACKLOG: u32 = 1024;

/// One request as the target saw it.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: Method,
    /// Path and query as received (origin form, e.g. `/a/b?x=1`).
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the handler got the request head (before reading the body).
    pub at: Instant,
}

/// How the target answers. Every answer carries `x-target: yes`.
#[derive(Clone, Debug, Default)]
pub enum Reply {
    /// 200, body `ok:<path>`, `content-type: text/plain`.
    #[default]
    Ok,
    /// The given status, body `status:<code>` (e.g. `status:503`).
    Status(StatusCode),
    /// Like [`Reply::Status`], plus these headers (appended).
    StatusWithHeaders(StatusCode, Vec<(String, String)>),
    /// 200, body = request body byte for byte, `content-type` copied (if any).
    Echo,
    /// Sleep, then answer like [`Reply::Ok`].
    Delay(Duration),
    /// Never answers (the request is still recorded).
    Hang,
}

#[derive(Debug, Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    reply: Mutex<Reply>,
}

/// A real HTTP/1 server on `127.0.0.1:PORT`. Dropping it aborts the server
/// task (and with it every connection).
pub struct HttpTarget {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<Server>,
}

struct Server {
    task: JoinHandle<()>,
    /// Sending (or dropping) asks the task to stop: it drops the listener,
    /// aborts every connection task and waits for them, then returns.
    stop: oneshot::Sender<()>,
}

impl fmt::Debug for HttpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpTarget")
            .field("addr", &self.addr)
            .field("running", &self.is_running())
            .field("reply", &*lock(&self.shared.reply))
            .field("received_count", &self.received_count())
            .finish()
    }
}

impl HttpTarget {
    /// Binds `127.0.0.1:0` and starts serving (every method and path go to
    /// one handler).
    pub async fn start() -> Self {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap_or_else(|e| panic!("test http target: cannot bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("test http target: local_addr: {e}"));
        let shared = Arc::new(Shared::default());
        let server = Some(spawn_server(listener, shared.clone()));
        HttpTarget {
            addr,
            shared,
            server,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// True between `start`/`restart` and `kill`.
    pub fn is_running(&self) -> bool {
        self.server.as_ref().is_some_and(|s| !s.task.is_finished())
    }

    /// How the target answers all following requests (requests already
    /// waiting in a `Delay` or `Hang` keep their old reply).
    pub fn set_reply(&self, reply: Reply) {
        *lock(&self.shared.reply) = reply;
    }

    /// Snapshot of the recorded requests, in the order they were recorded
    /// (a request is recorded once its body has been read, before it is
    /// answered; a request whose body could not be read is not recorded).
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    pub fn received_count(&self) -> usize {
        lock(&self.shared.received).len()
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        lock(&self.shared.received).clear();
    }

    /// Stops accepting AND drops every open connection at once: when this
    /// returns, the listening socket is closed (connecting is refused) and
    /// every connection task has been aborted and dropped (in-flight requests
    /// see a closed/reset connection). No-op if already killed.
    pub async fn kill(&mut self) {
        let Some(Server { mut task, stop }) = self.server.take() else {
            return;
        };
        let _ = stop.send(());
        if tokio::time::timeout(KILL_TIMEOUT, &mut task).await.is_err() {
            // Should not happen; make sure the listener and connections go.
            task.abort();
            let _ = task.await;
        }
    }

    /// Serves again on the SAME port (retrying the bind for up to 5 s),
    /// keeping the recorded requests and the reply setting. Kills first if
    /// still running. Panics if the port cannot be bound again.
    pub async fn restart(&mut self) {
        self.kill().await;
        let deadline = Instant::now() + REBIND_TIMEOUT;
        let listener = loop {
            match bind(self.addr) {
                Ok(listener) => break listener,
                Err(e) if Instant::now() >= deadline => panic!(
                    "test http target: cannot bind {} again within {REBIND_TIMEOUT:?}: {e}",
                    self.addr
                ),
                Err(_) => tokio::time::sleep(REBIND_POLL).await,
            }
        };
        self.server = Some(spawn_server(listener, self.shared.clone()));
    }

    /// Polls every 2 ms (real time) until `received_count() >= n`; false on
    /// timeout.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.received_count() >= n).await
    }
}

impl Drop for HttpTarget {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            // Aborting drops the task's JoinSet, which aborts every connection.
            server.task.abort();
        }
    }
}

/// A hyper-util legacy client (HTTP/1, tokio) usable as a tower Service.
pub type HyperClient<B> = Client<HttpConnector, B>;

/// A fresh [`HyperClient`] with default settings (connection pool on).
pub fn hyper_client<B>() -> HyperClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Listener with SO_REUSEADDR, so the port can be bound again right after a
/// kill even with server-side connections in TIME_WAIT.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn spawn_server(listener: TcpListener, shared: Arc<Shared>) -> Server {
    let (stop, stop_rx) = oneshot::channel();
    let app = Router::new().fallback(handle).with_state(shared);
    let task = tokio::spawn(serve(listener, app, stop_rx));
    Server { task, stop }
}

/// The accept loop. Connection tasks live in a JoinSet owned by this future:
/// if the task is aborted, dropping the JoinSet aborts them all; on `stop`
/// the listener is dropped first, then every connection is aborted and
/// awaited.
async fn serve(listener: TcpListener, app: Router, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let app = app.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            app.clone().oneshot(req)
                        });
                        // Errors (client went away, ...) are not interesting here.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // E.g. EMFILE or a connection reset before accept: keep going.
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(e) => {
            return response(StatusCode::BAD_REQUEST, Body::from(format!("body: {e}")));
        }
    };
    let reply = lock(&shared.reply).clone();
    let path = parts.uri.path().to_owned();
    let content_type = parts.headers.get(CONTENT_TYPE).cloned();
    lock(&shared.received).push(Received {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body: body.clone(),
        at,
    });

    match reply {
        Reply::Ok => ok(&path),
        Reply::Status(status) => status_reply(status),
        Reply::StatusWithHeaders(status, headers) => {
            let mut res = status_reply(status);
            for (name, value) in headers {
                let name = HeaderName::try_from(name.as_str())
                    .unwrap_or_else(|e| panic!("Reply header name {name:?}: {e}"));
                let value = HeaderValue::try_from(value.as_str())
                    .unwrap_or_else(|e| panic!("Reply header value {value:?}: {e}"));
                res.headers_mut().append(name, value);
            }
            res
        }
        Reply::Echo => {
            let mut res = response(StatusCode::OK, Body::from(body));
            if let Some(content_type) = content_type {
                res.headers_mut().insert(CONTENT_TYPE, content_type);
            }
            res
        }
        Reply::Delay(delay) => {
            tokio::time::sleep(delay).await;
            ok(&path)
        }
        Reply::Hang => std::future::pending().await,
    }
}

fn ok(path: &str) -> Response {
    let mut res = response(StatusCode::OK, Body::from(format!("ok:{path}")));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

fn status_reply(status: StatusCode) -> Response {
    response(status, Body::from(format!("status:{}", status.as_u16())))
}

fn response(status: StatusCode, body: Body) -> Response {
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res.headers_mut()
        .insert(TARGET_HEADER, HeaderValue::from_static("yes"));
    res
}
