//! gRPC scaffolding shared by `tests/tonic_client.rs` and
//! `examples/tonic_client.rs`: a tonic `Channel` behind the guard (the `tonic`
//! feature's `GuardedChannel`), and
//! `grpc.health.v1.Health` servers (from `tonic-health`) on 127.0.0.1 with
//! injected faults (a delay, trailers-only `UNAVAILABLE` answers) that record the
//! `grpc-timeout` each call carries.
//!
//! Self-contained (dev-dependencies and the `tonic` feature only) so that the
//! example can include it with `#[path]`. It is deliberately not declared in `support/mod.rs`, so that only
//! the tonic test compiles tonic code: the users include it themselves.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::layer::layer_fn;
use tower::{Service, ServiceBuilder};
pub use upstream_guard::tonic::GuardedChannel;
use upstream_guard::UpstreamGuardLayer;

// ---------------------------------------------------------------------------
// The guarded client
// ---------------------------------------------------------------------------

/// A health client whose channel to `addr` is behind the guard. The channel
/// connects lazily, so a server that is down fails the call, not this function.
pub fn guarded_client(
    addr: SocketAddr,
    guard: &UpstreamGuardLayer,
) -> HealthClient<GuardedChannel> {
    let origin: Uri = format!("http://{addr}").parse().expect("a valid URI");
    let channel: Channel = Endpoint::from(origin.clone()).connect_lazy();
    // The origin keys the guard's per-upstream circuit breaker and names the
    // upstream in its failures.
    let guarded = GuardedChannel::new(guard, channel, origin.clone()).expect("an absolute origin");
    HealthClient::with_origin(guarded, origin)
}

/// A plain health check request.
pub fn health_check() -> tonic::Request<HealthCheckRequest> {
    tonic::Request::new(HealthCheckRequest::default())
}

/// A listener on 127.0.0.1 and its address.
pub async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a bound listener's address");
    (listener, addr)
}

/// A port on 127.0.0.1 where nothing listens: bound, never listening, and kept
/// so until the process exits (a freed port could go to the next `bind(0)`).
pub async fn refused_addr() -> SocketAddr {
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let addr = socket.local_addr().expect("a bound socket's address");
    if let Ok(mut held) = HELD.lock() {
        held.push(socket);
    }
    addr
}

// ---------------------------------------------------------------------------
// The gRPC server, with injected faults
// ---------------------------------------------------------------------------

/// What a test server does wrong, and what it saw.
#[derive(Debug, Default)]
pub struct Faults {
    /// Wait this long before answering.
    delay: Duration,
    /// Answer this many first calls with a trailers-only `UNAVAILABLE`.
    unavailable_first: usize,
    /// Answer this many first calls with a trailers-only `DEADLINE_EXCEEDED`,
    /// as a server does whose own deadline (from our `grpc-timeout`) fired
    /// first.
    deadline_exceeded_first: usize,
    calls: AtomicUsize,
    grpc_timeouts: Mutex<Vec<String>>,
}

impl Faults {
    pub fn delay(delay: Duration) -> Faults {
        Faults {
            delay,
            ..Faults::default()
        }
    }

    pub fn unavailable_first(n: usize) -> Faults {
        Faults {
            unavailable_first: n,
            ..Faults::default()
        }
    }

    pub fn deadline_exceeded_first(n: usize) -> Faults {
        Faults {
            deadline_exceeded_first: n,
            ..Faults::default()
        }
    }

    /// Calls that reached the server so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The `grpc-timeout` of each call, in order.
    pub fn grpc_timeouts(&self) -> Vec<String> {
        self.grpc_timeouts
            .lock()
            .map(|seen| seen.clone())
            .unwrap_or_default()
    }
}

/// A `grpc.health.v1.Health` server on 127.0.0.1, with faults; dropping it stops
/// accepting connections.
pub struct HealthServer {
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl HealthServer {
    /// A tonic `Server`. Like any gRPC server should, it enforces the
    /// `grpc-timeout` it receives: it cuts a slow call off itself (with
    /// `CANCELLED`), at about the instant the guard gives up too.
    pub async fn start(faults: Faults) -> HealthServer {
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
            if let Err(error) = server.await {
                eprintln!("test server failed: {error}");
            }
        });
        HealthServer { addr, faults, task }
    }

    /// The same service on bare hyper HTTP/2 connections, which ignore
    /// `grpc-timeout`: a slow call runs to its end, so it is only ever cut off by
    /// the guard and what the client sees is the guard's own answer. (A tonic
    /// `Server` would cut it off itself at the same instant, racing the guard.)
    pub async fn start_ignoring_deadlines(faults: Faults) -> HealthServer {
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
        HealthServer { addr, faults, task }
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A server-side tower service that counts calls, records `grpc-timeout`, and
/// injects the configured faults before the real service.
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
            let response = trailers_only(Code::Unavailable, "warming up");
            return Box::pin(std::future::ready(Ok(response)));
        }
        if call <= self.faults.deadline_exceeded_first {
            let response = trailers_only(Code::DeadlineExceeded, "deadline exceeded");
            return Box::pin(std::future::ready(Ok(response)));
        }
        let delay = self.faults.delay;
        let response = self.inner.call(request);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            response.await
        })
    }
}

/// A trailers-only gRPC response: HTTP 200 with `grpc-status` in the headers.
fn trailers_only(code: Code, message: &'static str) -> http::Response<Body> {
    let mut response = http::Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from(code as i32));
    headers.insert("grpc-message", http::HeaderValue::from_static(message));
    response
}

// ---------------------------------------------------------------------------
// A scripted gRPC server: messages, then a status in the trailers
// ---------------------------------------------------------------------------

/// What a [`ScriptedServer`] answers every call with: one
/// `grpc.health.v1.HealthCheckResponse` message per entry of `statuses`, `gap`
/// apart (the first at once), then trailers with `code` and `message`. What a
/// tonic server cannot be made to do on cue: a status that follows messages
/// (tonic's own errors are trailers-only), and a stream that takes its time.
#[derive(Clone, Debug)]
pub struct Script {
    pub statuses: Vec<ServingStatus>,
    pub gap: Duration,
    pub code: Code,
    pub message: &'static str,
}

/// The head of a call a [`ScriptedServer`] received.
#[derive(Clone, Debug)]
pub struct SeenCall {
    pub version: http::Version,
    pub uri: Uri,
    pub headers: http::HeaderMap,
}

/// A gRPC server on bare hyper HTTP/2 connections (h2c, prior knowledge, as
/// every gRPC server without TLS) that answers every call by its [`Script`];
/// dropping it stops accepting connections.
pub struct ScriptedServer {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<SeenCall>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedServer {
    pub async fn start(script: Script) -> ScriptedServer {
        let (listener, addr) = bind().await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _peer)) = listener.accept().await {
                let (script, recorder) = (script.clone(), Arc::clone(&recorder));
                let service = service_fn(move |request: http::Request<Incoming>| {
                    record(&recorder, &request);
                    std::future::ready(Ok::<_, Infallible>(scripted_response(script.clone())))
                });
                let connection = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                tokio::spawn(connection);
            }
        });
        ScriptedServer { addr, seen, task }
    }

    /// The calls received so far, in order.
    pub fn calls(&self) -> Vec<SeenCall> {
        self.seen
            .lock()
            .map(|seen| seen.clone())
            .unwrap_or_default()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(seen: &Mutex<Vec<SeenCall>>, request: &http::Request<Incoming>) {
    if let Ok(mut seen) = seen.lock() {
        seen.push(SeenCall {
            version: request.version(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        });
    }
}

/// HTTP 200, `application/grpc`, and the script's messages and trailers as
/// the body.
fn scripted_response(script: Script) -> http::Response<UnsyncBoxBody<Bytes, Infallible>> {
    let mut response = http::Response::new(scripted_body(script).boxed_unsync());
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The script's frames: each message (after `gap`, but the first), then the
/// trailers.
fn scripted_body(
    script: Script,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    let frames = futures_util::stream::unfold((script, 0), |(script, sent)| async move {
        let frame = match script.statuses.get(sent) {
            Some(&status) => {
                if sent > 0 {
                    tokio::time::sleep(script.gap).await;
                }
                Frame::data(health_response(status))
            }
            None if sent == script.statuses.len() => {
                Frame::trailers(status_trailers(script.code, script.message))
            }
            None => return None,
        };
        Some((Ok(frame), (script, sent + 1)))
    });
    StreamBody::new(frames)
}

/// One length-prefixed gRPC message: an uncompressed `HealthCheckResponse`
/// whose field 1 (`status`, a varint below 128) is `status`.
fn health_response(status: ServingStatus) -> Bytes {
    Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status as u8])
}

/// `grpc-status` and `grpc-message` (which must need no percent-encoding).
fn status_trailers(code: Code, message: &'static str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(code as i32));
    trailers.insert("grpc-message", http::HeaderValue::from_static(message));
    trailers
}
