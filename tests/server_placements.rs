//! The guard behind a server, on real sockets on 127.0.0.1: axum's
//! `Router::layer`, tonic's `Server::layer`, and tonic's `add_service` with
//! `GuardedService`. Breakers are keyed by what the server fixed (the route
//! axum matched, the gRPC service), never by what the caller sends, and a
//! panicking handler gets an answer.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use upstream_guard::tonic::GuardedService;
use upstream_guard::{BreakerPolicy, CircuitState, RetryPolicy, UpstreamGuardLayer};

/// Upper bound for any one exchange, so a broken guard fails a test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

/// Opens after 5 failures in a row; no retries, so each request is one call.
fn guard() -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .circuit_breaker(BreakerPolicy::consecutive_failures(5))
        .build()
        .expect("a valid guard configuration")
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    (listener, addr)
}

// ---------------------------------------------------------------------------
// axum: Router::layer
// ---------------------------------------------------------------------------

/// An axum app on 127.0.0.1, served until the test ends.
async fn serve(app: Router) -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// One HTTP/1.1 request to `addr` for `target` (a path, or an absolute URI
/// naming another host): the status and the body, or `None` when the server
/// closed the connection without an answer.
async fn http1(addr: SocketAddr, target: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {target} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        // A reset is no answer, like a clean close.
        let _ = stream.read_to_end(&mut answer).await;
        answer
    };
    let answer = tokio::time::timeout(STEP, exchange)
        .await
        .expect("the exchange ended in time");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.get(9..12)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Answers 502 and counts its calls.
fn failing_route(calls: &Arc<AtomicUsize>) -> axum::routing::MethodRouter {
    let calls = Arc::clone(calls);
    get(move || {
        calls.fetch_add(1, Ordering::SeqCst);
        async { StatusCode::BAD_GATEWAY }
    })
}

/// Five failures of `/fail`, each answered by the handler itself.
async fn fail_five_times(addr: SocketAddr, path: &str) {
    for _ in 0..5 {
        let (status, _) = http1(addr, path).await.expect("an answer");
        assert_eq!(status, 502);
    }
}

#[tokio::test]
async fn five_failures_on_one_axum_route_leave_the_other_routes_and_health_open() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/fail", failing_route(&calls))
        .route("/orders", get(|| async { "[]" }))
        .route("/health", get(|| async { "ok" }))
        .layer(guard());
    let addr = serve(app).await;

    fail_five_times(addr, "/fail").await;

    let (status, body) = http1(addr, "/fail").await.expect("an answer");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("urn:upstream-guard:problem:circuit-open"),
        "{body}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(http1(addr, "/orders").await, Some((200, "[]".into())));
    assert_eq!(http1(addr, "/health").await, Some((200, "ok".into())));
}

#[tokio::test]
async fn an_axum_breaker_is_keyed_by_the_route_pattern_not_the_path_sent() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let layer = guard();
    let app = Router::new()
        .route(
            "/items/{id}",
            get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::BAD_GATEWAY }
            }),
        )
        .layer(layer.clone());
    let addr = serve(app).await;

    for id in 1..=5 {
        let (status, _) = http1(addr, &format!("/items/{id}"))
            .await
            .expect("an answer");
        assert_eq!(status, 502);
    }
    let (status, _) = http1(addr, "/items/6").await.expect("an answer");

    assert_eq!(status, 503, "a new path is not a new breaker");
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    let breakers = layer.breaker_handle().expect("a breaker");
    assert_eq!(breakers.keys(), 1, "{:?}", breakers.snapshots());
    let route = breakers
        .snapshot_for("/items/{id}")
        .expect("keyed by the route");
    assert_eq!(route.state, CircuitState::Open);
}

#[tokio::test]
async fn a_caller_naming_another_host_cannot_get_past_an_open_axum_route_breaker() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/fail", failing_route(&calls))
        .layer(guard());
    let addr = serve(app).await;
    fail_five_times(addr, "/fail").await;

    // An absolute-form target gives the request URI an authority of the
    // caller's choosing, as HTTP/2's `:authority` does.
    let (status, body) = http1(addr, "http://elsewhere.example/fail")
        .await
        .expect("an answer");

    assert_eq!(status, 503, "{body}");
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

async fn handler_bug() -> &'static str {
    panic!("handler bug")
}

#[tokio::test]
async fn a_panicking_axum_handler_is_answered_500_problem_json() {
    let app = Router::new().route("/bug", get(handler_bug)).layer(guard());
    let addr = serve(app).await;

    let (status, body) = http1(addr, "/bug").await.expect("an answer, not a reset");

    assert_eq!(status, 500, "{body}");
    let problem: serde_json::Value = serde_json::from_str(&body).expect("problem+json");
    assert_eq!(problem["type"], "urn:upstream-guard:problem:panic");
    assert_eq!(problem["status"], 500);
}

// ---------------------------------------------------------------------------
// tonic: Server::layer and add_service(GuardedService)
// ---------------------------------------------------------------------------

/// A gRPC service that answers every call with a trailers-only
/// `UNAVAILABLE`, and counts its calls.
#[derive(Clone, Default)]
struct Failing {
    calls: Arc<AtomicUsize>,
}

impl NamedService for Failing {
    const NAME: &'static str = "test.v1.Failing";
}

impl<B> tower::Service<http::Request<B>> for Failing {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut response = http::Response::new(Body::empty());
        let headers = response.headers_mut();
        headers.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", http::HeaderValue::from_static("14"));
        std::future::ready(Ok(response))
    }
}

/// A gRPC service whose handler panics.
#[derive(Clone)]
struct Panicking;

impl NamedService for Panicking {
    const NAME: &'static str = "test.v1.Panicking";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<B> tower::Service<http::Request<B>> for Panicking {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<B>) -> Self::Future {
        Box::pin(async { panic!("handler bug") })
    }
}

/// A tonic server on 127.0.0.1, served until the test ends.
async fn serve_grpc<F>(server: F) -> SocketAddr
where
    F: FnOnce(TcpIncoming) -> BoxFuture<Result<(), tonic::transport::Error>>,
{
    let (listener, addr) = bind().await;
    let serving = server(TcpIncoming::from(listener));
    tokio::spawn(serving);
    addr
}

/// The `grpc-status` of one unary call to `path` over a fresh HTTP/2
/// connection to `addr`, with `authority` as `:authority`; `None` when the
/// stream was reset without an answer.
async fn grpc_status(addr: SocketAddr, authority: &str, path: &str) -> Option<String> {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("an HTTP/2 handshake");
        tokio::spawn(connection);
        let request = http::Request::post(format!("http://{authority}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            // One empty, uncompressed message.
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .expect("a valid request");
        let response = sender.send_request(request).await.ok()?;
        if let Some(status) = response.headers().get("grpc-status") {
            return Some(String::from_utf8_lossy(status.as_bytes()).into_owned());
        }
        let trailers = response
            .into_body()
            .collect()
            .await
            .ok()?
            .trailers()?
            .clone();
        let status = trailers.get("grpc-status")?;
        Some(String::from_utf8_lossy(status.as_bytes()).into_owned())
    };
    tokio::time::timeout(STEP, exchange)
        .await
        .expect("the exchange ended in time")
}

const FAILING: &str = "/test.v1.Failing/Do";

/// Five failed calls to the failing service.
async fn fail_five_grpc_calls(addr: SocketAddr) {
    for _ in 0..5 {
        let status = grpc_status(addr, &addr.to_string(), FAILING).await;
        assert_eq!(status.as_deref(), Some("14"));
    }
}

#[tokio::test]
async fn failures_of_one_grpc_service_leave_another_service_open() {
    let layer = guard();
    let failing = Failing::default();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let services = (
        GuardedService::new(&layer, failing.clone()),
        GuardedService::new(&layer, health),
    );
    let addr = serve_grpc(move |incoming| {
        Box::pin(
            Server::builder()
                .add_service(services.0)
                .add_service(services.1)
                .serve_with_incoming(incoming),
        )
    })
    .await;

    fail_five_grpc_calls(addr).await;
    let status = grpc_status(addr, &addr.to_string(), FAILING).await;
    let health = grpc_status(addr, &addr.to_string(), "/grpc.health.v1.Health/Check").await;

    assert_eq!(status.as_deref(), Some("14"));
    assert_eq!(
        failing.calls.load(Ordering::SeqCst),
        5,
        "the 6th call was not let through"
    );
    assert_eq!(
        health.as_deref(),
        Some("0"),
        "the health service still answers"
    );
    let breakers = layer.breaker_handle().expect("a breaker");
    let open = breakers.snapshot_for(Failing::NAME).map(|s| s.state);
    assert_eq!(open, Some(CircuitState::Open), "{:?}", breakers.snapshots());
}

#[tokio::test]
async fn a_caller_naming_another_authority_cannot_get_past_an_open_grpc_service_breaker() {
    let layer = guard();
    let failing = Failing::default();
    let service = GuardedService::new(&layer, failing.clone());
    let addr = serve_grpc(move |incoming| {
        Box::pin(
            Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        )
    })
    .await;
    fail_five_grpc_calls(addr).await;

    let status = grpc_status(addr, "elsewhere.example", FAILING).await;

    assert_eq!(status.as_deref(), Some("14"));
    assert_eq!(failing.calls.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_caller_naming_another_authority_cannot_get_past_an_open_breaker_of_server_layer() {
    let failing = Failing::default();
    let service = failing.clone();
    let addr = serve_grpc(move |incoming| {
        Box::pin(
            Server::builder()
                .layer(guard())
                .add_service(service)
                .serve_with_incoming(incoming),
        )
    })
    .await;
    fail_five_grpc_calls(addr).await;

    let status = grpc_status(addr, "elsewhere.example", FAILING).await;

    assert_eq!(status.as_deref(), Some("14"));
    assert_eq!(failing.calls.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_panicking_grpc_handler_is_answered_grpc_status_13() {
    let addr = serve_grpc(move |incoming| {
        Box::pin(
            Server::builder()
                .layer(guard())
                .add_service(Panicking)
                .serve_with_incoming(incoming),
        )
    })
    .await;

    let status = grpc_status(addr, &addr.to_string(), "/test.v1.Panicking/Do").await;

    assert_eq!(status.as_deref(), Some("13"), "an answer, not a reset");
}
