//! `failure_kind_of` against errors built by the real clients — a tonic `Channel`
//! (plain and over TLS with tokio-rustls), reqwest, tower's `Timeout` — rather
//! than look-alike error types, so that a client changing how it reports a
//! failure breaks a test here. One test follows a failure through the guard, to
//! the retry that its kind allows.
//!
//! No test leaves the machine: servers listen on 127.0.0.1, and the one host name
//! used is refused by the resolver before any query is sent (see
//! [`unresolvable_host`]).

use std::error::Error;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tonic::body::Body;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tower::{ServiceBuilder, ServiceExt};
use upstream_guard::classify::failure_kind_of;
use upstream_guard::{
    BoxError, FailureKind, GuardFailure, RequestBody, RetryPolicy, UpstreamGuardLayer,
};

/// Upper bound for any one call, so that a client that hangs fails the test
/// instead of stalling it.
const STEP: Duration = Duration::from_secs(10);

/// A client-side timeout short enough to keep the tests fast.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------
// tonic
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_tonic_channel_whose_host_does_not_resolve_fails_with_a_connect_failure() {
    let uri = format!("http://{}:50051", unresolvable_host());
    let channel = Endpoint::from_shared(uri)
        .expect("a valid URI")
        .connect_lazy();

    let err = bounded(channel.oneshot(grpc_request()))
        .await
        .expect_err("the host does not resolve");

    assert!(format!("{err:?}").contains("dns error"), "{err:?}");
    assert_eq!(failure_kind_of(&err), FailureKind::Connect, "{err:?}");
}

#[tokio::test]
async fn a_tonic_channel_whose_tls_handshake_fails_fails_with_a_connect_failure() {
    // The server answers the ClientHello with plain HTTP, which rustls rejects.
    let server = Server::start(Answer::PlainHttp).await;
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .expect("a valid URI")
        .tls_config(ClientTlsConfig::new())
        .expect("a valid TLS config")
        .connect_lazy();

    let err = bounded(channel.oneshot(grpc_request()))
        .await
        .expect_err("the handshake fails");

    assert!(carries_a_rustls_error(&err), "{err:?}");
    assert_eq!(failure_kind_of(&err), FailureKind::Connect, "{err:?}");
}

#[tokio::test]
async fn a_tonic_channel_timeout_is_an_attempt_timeout() {
    let server = Server::start(Answer::Nothing).await;
    let channel = Endpoint::from_shared(format!("http://{}", server.addr))
        .expect("a valid URI")
        .timeout(CLIENT_TIMEOUT)
        .connect_lazy();

    let err = bounded(channel.oneshot(grpc_request()))
        .await
        .expect_err("the server never answers");

    assert_eq!(
        failure_kind_of(&err),
        FailureKind::AttemptTimeout,
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// reqwest
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_reqwest_request_whose_host_does_not_resolve_is_a_connect_failure() {
    let request = reqwest_client().get(format!("http://{}/", unresolvable_host()));

    let err = bounded(request.send())
        .await
        .expect_err("the host does not resolve");

    assert!(err.is_connect(), "{err:?}");
    assert_eq!(failure_kind_of(&err), FailureKind::Connect, "{err:?}");
}

#[tokio::test]
async fn a_reqwest_timeout_is_an_attempt_timeout() {
    let server = Server::start(Answer::Nothing).await;
    let request = reqwest_client()
        .get(format!("http://{}/", server.addr))
        .timeout(CLIENT_TIMEOUT);

    let err = bounded(request.send())
        .await
        .expect_err("the server never answers");

    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(
        failure_kind_of(&err),
        FailureKind::AttemptTimeout,
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// tower
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_tower_timeout_elapsing_is_an_attempt_timeout() {
    let never_answers = tower::service_fn(|()| std::future::pending::<Result<(), BoxError>>());
    let service = tower::timeout::Timeout::new(never_answers, CLIENT_TIMEOUT);

    let err = bounded(service.oneshot(()))
        .await
        .expect_err("the service never answers");

    assert_eq!(
        failure_kind_of(&*err),
        FailureKind::AttemptTimeout,
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// Through the guard
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_grpc_call_whose_host_does_not_resolve_is_retried_though_it_is_a_post() {
    let uri = format!("http://{}:50051", unresolvable_host());
    let channel = Endpoint::from_shared(uri)
        .expect("a valid URI")
        .connect_lazy();
    let guard = UpstreamGuardLayer::builder()
        .retry(
            RetryPolicy::default()
                .max_attempts(3)
                .backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
        .build()
        .expect("a valid guard configuration");
    let guarded = ServiceBuilder::new()
        .layer(guard)
        .map_request(|request: http::Request<RequestBody<Body>>| request.map(Body::new))
        .service(channel);

    let response = bounded(guarded.oneshot(grpc_request()))
        .await
        .expect("the guard answers");

    let failure = response
        .extensions()
        .get::<GuardFailure>()
        .expect("the guard answered for the upstream");
    // A gRPC call is a POST without an idempotency key: only a connect failure
    // lets the guard send it again.
    assert_eq!(
        (failure.kind(), failure.attempts()),
        (FailureKind::Connect, 3)
    );
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A host name that fails to resolve without a query leaving the machine: its
/// first label is 64 bytes, one more than DNS allows (RFC 1035), so the system
/// resolver cannot even encode the query and answers "not found" at once. (A
/// plain `.invalid` name would be sent to the configured DNS server.)
fn unresolvable_host() -> String {
    format!("{}.invalid", "a".repeat(64))
}

/// Runs `future` to completion, or fails the test after [`STEP`].
async fn bounded<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .expect("the client answered within the step bound")
}

/// A gRPC health check request for a bare `Channel`.
fn grpc_request() -> http::Request<Body> {
    http::Request::builder()
        .method(http::Method::POST)
        .uri("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .expect("a valid request")
}

/// A reqwest client that ignores proxy settings in the environment, so that it
/// only ever talks to the addresses a test gives it.
fn reqwest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a client without TLS builds")
}

/// Whether `err`'s chain holds an `io::Error` around a `rustls::Error`: how
/// tokio-rustls reports a failed handshake.
fn carries_a_rustls_error(err: &(dyn Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(link) = current {
        let inner = link.downcast_ref::<io::Error>().and_then(|io| io.get_ref());
        if inner.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        current = link.source();
    }
    false
}

/// What a [`Server`] does with a connection.
#[derive(Clone, Copy)]
enum Answer {
    /// Reads what the client sends and never answers.
    Nothing,
    /// Answers the client's first bytes with a plain HTTP/1.1 response.
    PlainHttp,
}

/// A TCP server on 127.0.0.1 that misbehaves as told; it stops when dropped.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(answer: Answer) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, answer));
            }
        });
        Server { addr, task }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection: answers as told, then holds the connection open until
/// the client closes it, so that the client sees the answer and not a reset.
async fn serve(mut stream: TcpStream, answer: Answer) {
    let mut buf = [0; 4096];
    if let Answer::PlainHttp = answer {
        if !matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
            return;
        }
        let response = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        if stream.write_all(response).await.is_err() {
            return;
        }
    }
    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
}
