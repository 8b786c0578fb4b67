//! The guard around a tonic `Channel`, against real gRPC servers on 127.0.0.1
//! (`grpc.health.v1.Health` from `tonic-health`), as `examples/tonic_client.rs`
//! shows it: a normal call, a slow server, a refused port, `grpc-timeout`
//! propagation, retried `UNAVAILABLE` answers, and an open circuit.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::layer::layer_fn;
use tower::util::MapRequest;
use tower::{Service, ServiceBuilder};
use upstream_guard::{
    parse_grpc_timeout, CircuitBreaker, RequestBody, Retry, UpstreamGuard, UpstreamGuardLayer,
};

/// Slack for timing assertions: scheduling on a busy CI machine.
const SLACK: Duration = Duration::from_millis(400);
/// Upper bound for any one call, so a broken guard fails a test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_normal_call_is_ok() {
    let server = TestServer::start(Faults::default()).await;
    let mut client = guarded_client(server.addr, &guard(&Guard::default()));

    let answer = call(&mut client, health_check()).await.expect("OK");

    assert_eq!(answer, ServingStatus::Serving);
    assert_eq!(server.faults.calls(), 1);
}

#[tokio::test]
async fn a_slow_server_is_deadline_exceeded_after_the_attempt_timeout() {
    let server = TestServer::start_ignoring_deadlines(Faults::delay(Duration::from_secs(5))).await;
    let config = Guard {
        attempt_timeout: Duration::from_millis(200),
        deadline: Duration::from_secs(2),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    let started = Instant::now();
    let status = call(&mut client, health_check()).await.expect_err("fails");
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(190) && elapsed < config.attempt_timeout + SLACK,
        "answered after {elapsed:?}"
    );
    // A gRPC call is a POST: a timed-out attempt may have reached the server, so it
    // is not resent without an idempotency key.
    assert_eq!(server.faults.calls(), 1);
}

#[tokio::test]
async fn a_slow_server_is_deadline_exceeded_within_the_deadline_across_retries() {
    let server = TestServer::start_ignoring_deadlines(Faults::delay(Duration::from_secs(5))).await;
    let config = Guard {
        attempt_timeout: Duration::from_millis(200),
        deadline: Duration::from_millis(500),
        retry: quick_retry(5),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    let started = Instant::now();
    let status = call(&mut client, idempotent(health_check()))
        .await
        .expect_err("fails");
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(390) && elapsed < config.deadline + SLACK,
        "answered after {elapsed:?}"
    );
    let calls = server.faults.calls();
    assert!((2..=3).contains(&calls), "{calls} server calls");
}

#[tokio::test]
async fn a_refused_port_is_unavailable() {
    let addr = refused_addr().await;
    let mut client = guarded_client(addr, &guard(&Guard::default()));

    let started = Instant::now();
    let status = call(&mut client, health_check()).await.expect_err("fails");

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "could not connect to the upstream");
    assert!(started.elapsed() < SLACK, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn the_server_receives_a_grpc_timeout_no_longer_than_the_attempt_timeout() {
    let server = TestServer::start(Faults::default()).await;
    let config = Guard {
        attempt_timeout: Duration::from_millis(300),
        deadline: Duration::from_secs(2),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    call(&mut client, health_check()).await.expect("OK");
    let mut short = health_check();
    short.set_timeout(Duration::from_millis(100));
    call(&mut client, short).await.expect("OK");

    let seen = server.faults.grpc_timeouts();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let first = parse_grpc_timeout(seen[0].as_bytes()).expect("a valid grpc-timeout");
    assert!(
        first <= config.attempt_timeout && first > Duration::from_millis(250),
        "{first:?}"
    );
    let second = parse_grpc_timeout(seen[1].as_bytes()).expect("a valid grpc-timeout");
    assert!(
        second <= Duration::from_millis(100) && second > Duration::from_millis(50),
        "the caller's shorter timeout wins: {second:?}"
    );
}

#[tokio::test]
async fn unavailable_is_retried_until_ok_when_the_call_is_idempotent() {
    let server = TestServer::start(Faults::unavailable_first(2)).await;
    let config = Guard {
        retry: quick_retry(3),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    let answer = call(&mut client, idempotent(health_check()))
        .await
        .expect("OK after two retries");

    assert_eq!(answer, ServingStatus::Serving);
    assert_eq!(server.faults.calls(), 3, "2 UNAVAILABLE answers, then OK");
}

#[tokio::test]
async fn unavailable_is_not_retried_without_an_idempotency_key() {
    let server = TestServer::start(Faults::unavailable_first(2)).await;
    let config = Guard {
        retry: quick_retry(3),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    let status = call(&mut client, health_check()).await.expect_err("fails");

    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "warming up", "the server's own answer");
    assert_eq!(server.faults.calls(), 1);
}

#[tokio::test]
async fn retries_stop_at_max_attempts_with_the_servers_answer() {
    let server = TestServer::start(Faults::unavailable_first(5)).await;
    let config = Guard {
        retry: quick_retry(3),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    let status = call(&mut client, idempotent(health_check()))
        .await
        .expect_err("fails");

    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "warming up");
    assert_eq!(server.faults.calls(), 3);
}

#[tokio::test]
async fn an_open_circuit_answers_unavailable_without_calling_the_server() {
    let server = TestServer::start(Faults::unavailable_first(usize::MAX)).await;
    let config = Guard {
        breaker: CircuitBreaker::consecutive_failures(2).open_for(Duration::from_secs(30)),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    for _ in 0..2 {
        let status = call(&mut client, health_check()).await.expect_err("fails");
        assert_eq!(status.message(), "warming up", "the server answered");
    }
    assert_eq!(server.faults.calls(), 2);

    let status = call(&mut client, health_check()).await.expect_err("fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "the upstream is failing; calls are paused"
    );
    assert!(
        status.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{:?}",
        status.metadata()
    );
    assert_eq!(server.faults.calls(), 2, "the server was not called");
}

#[tokio::test]
async fn a_forced_open_circuit_answers_unavailable_without_calling_the_server() {
    let server = TestServer::start(Faults::default()).await;
    let layer = guard(&Guard::default());
    layer
        .breaker_handle()
        .expect("a breaker is on by default")
        .force_open();
    let mut client = guarded_client(server.addr, &layer);

    let status = call(&mut client, health_check()).await.expect_err("fails");

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(server.faults.calls(), 0);
}

#[tokio::test]
async fn one_guard_keeps_a_breaker_per_server() {
    let failing = TestServer::start(Faults::unavailable_first(usize::MAX)).await;
    let healthy = TestServer::start(Faults::default()).await;
    let config = Guard {
        breaker: CircuitBreaker::consecutive_failures(2).open_for(Duration::from_secs(30)),
        ..Guard::default()
    };
    let layer = guard(&config);
    let mut to_failing = guarded_client(failing.addr, &layer);
    let mut to_healthy = guarded_client(healthy.addr, &layer);

    for _ in 0..3 {
        call(&mut to_failing, health_check())
            .await
            .expect_err("fails");
    }
    let answer = call(&mut to_healthy, health_check()).await;

    assert_eq!(answer.expect("OK"), ServingStatus::Serving);
    assert_eq!(
        failing.faults.calls(),
        2,
        "the third call met an open circuit"
    );
    let handle = layer.breaker_handle().expect("a breaker");
    let states: Vec<(String, String)> = handle
        .snapshots()
        .into_iter()
        .map(|(key, snapshot)| (key, snapshot.state.as_str().to_string()))
        .collect();
    let mut expected = vec![
        (failing.addr.to_string(), "open".to_string()),
        (healthy.addr.to_string(), "closed".to_string()),
    ];
    expected.sort();
    assert_eq!(states, expected);
}

// ---------------------------------------------------------------------------
// The guarded client
// ---------------------------------------------------------------------------

type TonicAdapter = fn(http::Request<RequestBody<Body>>) -> http::Request<Body>;
type GuardedChannel = UpstreamGuard<MapRequest<Channel, TonicAdapter>>;

/// A guard's settings in these tests.
#[derive(Clone, Debug)]
struct Guard {
    attempt_timeout: Duration,
    deadline: Duration,
    retry: Retry,
    breaker: CircuitBreaker,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(5),
            retry: Retry::default(),
            breaker: CircuitBreaker::default(),
        }
    }
}

fn guard(config: &Guard) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(config.attempt_timeout)
        .deadline(config.deadline)
        .retry(config.retry.clone())
        .circuit_breaker(config.breaker.clone())
        .build()
        .expect("a valid guard configuration")
}

fn quick_retry(max_attempts: u32) -> Retry {
    Retry::default()
        .max_attempts(max_attempts)
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
}

fn guarded_client(addr: SocketAddr, guard: &UpstreamGuardLayer) -> HealthClient<GuardedChannel> {
    let origin: Uri = format!("http://{addr}").parse().expect("a valid URI");
    let channel = Endpoint::from(origin.clone()).connect_lazy();
    let adapter: TonicAdapter = |request| request.map(Body::new);
    let guarded = ServiceBuilder::new()
        .layer(guard.clone())
        .map_request(adapter)
        .service(channel);
    HealthClient::with_origin(guarded, origin)
}

fn health_check() -> tonic::Request<HealthCheckRequest> {
    tonic::Request::new(HealthCheckRequest::default())
}

/// Marks a call as safe to repeat, so the guard may resend it.
fn idempotent(
    mut request: tonic::Request<HealthCheckRequest>,
) -> tonic::Request<HealthCheckRequest> {
    request.metadata_mut().insert(
        "idempotency-key",
        "test-call".parse().expect("valid metadata"),
    );
    request
}

/// One health check, bounded by [`STEP`].
async fn call(
    client: &mut HealthClient<GuardedChannel>,
    request: tonic::Request<HealthCheckRequest>,
) -> Result<ServingStatus, Status> {
    let answer = tokio::time::timeout(STEP, client.check(request))
        .await
        .expect("the call ended within the step limit")?;
    Ok(answer.into_inner().status())
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a bound listener's address");
    (listener, addr)
}

async fn refused_addr() -> SocketAddr {
    let (_listener, addr) = bind().await;
    addr
}

// ---------------------------------------------------------------------------
// The gRPC server, with injected faults
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Faults {
    delay: Duration,
    unavailable_first: usize,
    calls: AtomicUsize,
    grpc_timeouts: Mutex<Vec<String>>,
}

impl Faults {
    fn delay(delay: Duration) -> Faults {
        Faults {
            delay,
            ..Faults::default()
        }
    }

    fn unavailable_first(n: usize) -> Faults {
        Faults {
            unavailable_first: n,
            ..Faults::default()
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn grpc_timeouts(&self) -> Vec<String> {
        self.grpc_timeouts
            .lock()
            .map(|seen| seen.clone())
            .unwrap_or_default()
    }
}

struct TestServer {
    addr: SocketAddr,
    faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// A tonic `Server` (it enforces the `grpc-timeout` it receives).
    async fn start(faults: Faults) -> TestServer {
        let (listener, addr) = bind().await;
        let faults = Arc::new(faults);
        let layer_faults = Arc::clone(&faults);
        let (_reporter, health) = tonic_health::server::health_reporter();
        let server = Server::builder()
            .layer(layer_fn(move |inner| Faulty {
                inner,
                faults: Arc::clone(&layer_faults),
            }))
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener));
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        TestServer { addr, faults, task }
    }

    /// The same service on bare hyper HTTP/2 connections, which ignore
    /// `grpc-timeout`: a slow call is only ever cut off by the guard. (A tonic
    /// `Server` would cut it off itself at the same instant, racing the guard.)
    async fn start_ignoring_deadlines(faults: Faults) -> TestServer {
        let (listener, addr) = bind().await;
        let faults = Arc::new(faults);
        let (_reporter, health) = tonic_health::server::health_reporter();
        let service = ServiceBuilder::new()
            .map_request(|request: http::Request<Incoming>| request.map(Body::new))
            .layer_fn({
                let faults = Arc::clone(&faults);
                move |inner| Faulty {
                    inner,
                    faults: Arc::clone(&faults),
                }
            })
            .service(Routes::new(health).prepare());
        let task = tokio::spawn(async move {
            while let Ok((stream, _peer)) = listener.accept().await {
                let connection = http2::Builder::new(TokioExecutor::new()).serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(service.clone()),
                );
                tokio::spawn(connection);
            }
        });
        TestServer { addr, faults, task }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Faulty<S> {
    inner: S,
    faults: Arc<Faults>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Faulty<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Send + 'static,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = self.faults.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(timeout) = request.headers().get("grpc-timeout") {
            if let Ok(mut seen) = self.faults.grpc_timeouts.lock() {
                seen.push(String::from_utf8_lossy(timeout.as_bytes()).into_owned());
            }
        }
        if call <= self.faults.unavailable_first {
            return Box::pin(std::future::ready(Ok(trailers_only_unavailable())));
        }
        let delay = self.faults.delay;
        let response = self.inner.call(request);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            response.await
        })
    }
}

fn trailers_only_unavailable() -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-status",
        http::HeaderValue::from(Code::Unavailable as i32),
    );
    headers.insert("grpc-message", http::HeaderValue::from_static("warming up"));
    response
}
