//! A caller wired through the layer to a real HTTP target, with a real
//! Redis: the common setup of the layer tests.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use redis::Commands;
use tower::{Service, ServiceExt};
use tower_heartbeat_buffer::envelope::Envelope;
use tower_heartbeat_buffer::{
    Health, HeartbeatBuffer, HeartbeatBufferBuilder, HeartbeatBufferLayer, RequestBody,
    ResponseBody, Target, Watcher, WithFallback,
};
use tower_layer::Layer;

use super::{hyper_client, HttpTarget, HyperClient, RedisServer};

/// The client the layer wraps in these tests.
pub type Client = HyperClient<RequestBody<Full<Bytes>>>;
/// The client through the layer.
pub type Buffered = HeartbeatBuffer<Client, Client>;

/// What a call through the layer came back with.
#[derive(Debug)]
pub struct Outcome {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub extensions: http::Extensions,
    pub body: Bytes,
}

pub struct Rig {
    pub redis: RedisServer,
    pub http: HttpTarget,
    pub target: Target,
    pub watcher: Watcher,
}

impl Rig {
    pub async fn start() -> Self {
        let redis = RedisServer::start();
        let http = HttpTarget::start().await;
        let target = Target::new("orders").unwrap();
        let watcher = Watcher::connect(redis.client()).await.unwrap();
        Rig {
            redis,
            http,
            target,
            watcher,
        }
    }

    /// Starts the target's heartbeat (a key without TTL) and waits for the
    /// watcher to see it.
    pub async fn up(&self) {
        let _: () = self
            .redis
            .conn()
            .set(self.target.heartbeat_key(), 1)
            .unwrap();
        self.wait_for(Health::Up).await;
    }

    /// Deletes the heartbeat and waits for the watcher to see it.
    pub async fn down(&self) {
        let _: () = self.redis.conn().del(self.target.heartbeat_key()).unwrap();
        self.wait_for(Health::Down).await;
    }

    pub async fn wait_for(&self, health: Health) {
        let view = self.watcher.watch(&self.target).await;
        tokio::time::timeout(Duration::from_secs(10), view.wait_for(health))
            .await
            .unwrap_or_else(|_| panic!("view never became {health}"));
    }

    pub async fn service(
        &self,
        configure: impl FnOnce(HeartbeatBufferBuilder) -> HeartbeatBufferBuilder,
    ) -> Buffered {
        let layer = configure(HeartbeatBufferLayer::builder(self.target.clone()))
            .build(&self.watcher)
            .await
            .unwrap();
        layer.layer(hyper_client())
    }

    pub async fn service_with_fallback(
        &self,
        fallback: Client,
        configure: impl FnOnce(HeartbeatBufferBuilder) -> HeartbeatBufferBuilder,
    ) -> Buffered {
        let layer: HeartbeatBufferLayer<WithFallback<Client>> =
            configure(HeartbeatBufferLayer::builder(self.target.clone()))
                .fallback(fallback)
                .build(&self.watcher)
                .await
                .unwrap();
        layer.layer(hyper_client())
    }

    /// A request to the target at `path_and_query`.
    pub fn request(
        &self,
        method: &str,
        path_and_query: &str,
        body: &'static [u8],
    ) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.http.url()))
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    }

    /// Every entry in the buffer, oldest first.
    pub fn stored(&self) -> Vec<Envelope> {
        stored(&self.redis, &self.target)
    }
}

pub fn stored(redis: &RedisServer, target: &Target) -> Vec<Envelope> {
    let reply: redis::streams::StreamRangeReply =
        redis.conn().xrange_all(target.queue_key()).unwrap();
    reply
        .ids
        .iter()
        .map(|entry| {
            let fields = entry.map.iter().map(|(k, v)| {
                let bytes: &[u8] = match v {
                    redis::Value::BulkString(b) => b,
                    other => panic!("unexpected field value {other:?}"),
                };
                (k.as_bytes(), bytes)
            });
            Envelope::from_fields(fields).unwrap()
        })
        .collect()
}

/// Calls `service` once (ready first) and reads the whole response.
pub async fn call<S, B>(service: &mut S, request: Request<Full<Bytes>>) -> Result<Outcome, S::Error>
where
    S: Service<Request<Full<Bytes>>, Response = Response<ResponseBody<B>>>,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let response = service.ready().await?.call(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Ok(Outcome {
        status: parts.status,
        headers: parts.headers,
        extensions: parts.extensions,
        body,
    })
}

/// A replayer configuration for tests: no slow start, quick polls, retries
/// and lease takeovers.
pub fn fast_replay() -> tower_heartbeat_buffer::replay::ReplayConfig {
    let mut config = tower_heartbeat_buffer::replay::ReplayConfig::default();
    config.slow_start = Duration::ZERO;
    config.poll_interval = Duration::from_millis(200);
    config.backoff_base = Duration::from_millis(20);
    config.lease_ttl = Duration::from_secs(2);
    config
}
