//! A guarded axum gateway on real loopback sockets, a plain client for it, a
//! catalogue of upstream faults with everything the gateway may answer for each,
//! and the checks every answer must pass.
//!
//! - [`Gateway`]: an `axum::Router` whose fallback forwards every request to the
//!   fault upstream through an [`UpstreamGuard`] around the proxies' shared
//!   upstream client (HTTP/1.1, and h2c for gRPC calls), served by hyper on
//!   `127.0.0.1:0` (HTTP/1.1, and h2c with prior knowledge). A request with `x-chaos-upstream: refused`
//!   goes to a second authority where nothing listens. Dropping it aborts the
//!   accept loop and every connection task.
//! - [`Caller`]: the plain hyper-util client that callers use; [`exchange`] sends
//!   one request and reads the whole answer, bounded in time.
//! - [`Fault`] and [`Call`]: what a request asks the upstream to do; [`verify`]
//!   checks every answer (and what the upstream received) against [`Limits`].
//!
//! Its proxying (URI, hop-by-hop headers, forwarding headers, `Host`) is the
//! helper every proxy in this repository shares, `examples/common/proxy.rs`, so
//! what these tests check is what the examples do.
//!
//! Self-contained (it does not use the other support modules) so that
//! `examples/soak.rs` can include it with `#[path]`, like `upstream.rs`. It is
//! deliberately not declared in `support/mod.rs`: the tests that use it include
//! it themselves.
#![allow(dead_code)]

// Relative to this file's directory, whichever crate includes it.
#[path = "../../examples/common/proxy.rs"]
mod proxy;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::header::{self, HeaderMap};
use axum::http::{Method, Request, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::{Layer, ServiceExt};
use upstream_guard::observe::{
    AttemptEvent, CircuitEvent, RejectedEvent, ResponseEvent, RetryDeniedEvent, RetryEvent,
};
use upstream_guard::{
    FailureKind, Observer, RequestBody, RetryPolicy, UpstreamGuard, UpstreamGuardLayer,
};

use self::proxy::Target;

/// The header that sends a request to the authority where nothing listens.
pub const ROUTE_HEADER: &str = "x-chaos-upstream";
/// The header the mixes use as circuit breaker key (one breaker per fault family).
pub const KEY_HEADER: &str = "x-chaos-key";
/// The most idle connections the gateway keeps to its upstream: once requests
/// are over, no more than this may stay open.
pub const POOL_IDLE: usize = 32;
/// The upstream name every gateway configures: synthesized bodies name it, never
/// the internal `127.0.0.1:PORT`.
pub const UPSTREAM_NAME: &str = "fault-upstream";

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

/// The client inside the guard: HTTP/1.1, and h2c for gRPC calls.
pub type UpstreamClient = proxy::UpstreamClient<RequestBody<Body>>;

struct Routes {
    upstream: RwLock<Target>,
    refused: Target,
    client: UpstreamGuard<UpstreamClient>,
}

/// A guarded gateway serving on `127.0.0.1`.
pub struct Gateway {
    addr: SocketAddr,
    routes: Arc<Routes>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    layer: UpstreamGuardLayer,
    accept: JoinHandle<()>,
}

impl Gateway {
    /// Serves a gateway that forwards to `upstream` (`127.0.0.1:PORT`), or to
    /// `refused` for requests with `x-chaos-upstream: refused`, through `layer`.
    pub async fn start(upstream: &str, refused: &str, layer: UpstreamGuardLayer) -> Gateway {
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_max_idle_per_host(POOL_IDLE);
        let client = UpstreamClient::new(&builder, HttpConnector::new());
        let routes = Arc::new(Routes {
            upstream: RwLock::new(target(upstream)),
            refused: target(refused),
            client: layer.layer(client),
        });
        let router = Router::new().fallback(forward).with_state(routes.clone());
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("gateway: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("gateway: local_addr");
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(serve(listener, router, open.clone(), accepted.clone()));
        Gateway {
            addr,
            routes,
            open,
            accepted,
            layer,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends requests to another upstream from now on (the soak rotates them).
    pub fn set_upstream(&self, authority: &str) {
        let upstream = target(authority);
        match self.routes.upstream.write() {
            Ok(mut current) => *current = upstream,
            Err(poisoned) => *poisoned.into_inner() = upstream,
        }
    }

    /// Client connections the gateway has open right now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Client connections the gateway has accepted so far.
    pub fn accepted_connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The guard layer (for its breaker handle).
    pub fn layer(&self) -> &UpstreamGuardLayer {
        &self.layer
    }
}

/// The proxy target for `127.0.0.1:PORT` (a test's own address: it is valid).
fn target(authority: &str) -> Target {
    Target::new(authority.parse().expect("an upstream authority")).expect("a valid Host value")
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every
        // connection task, which drops the router and with it the guarded client.
        self.accept.abort();
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(
    listener: TcpListener,
    router: Router,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = listener.accept() => match incoming {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    accepted.fetch_add(1, Ordering::SeqCst);
                    open.fetch_add(1, Ordering::SeqCst);
                    let guard = OpenGuard(open.clone());
                    // What `into_make_service_with_connect_info` would do: the
                    // handler learns the caller's address (for X-Forwarded-For).
                    let service = TowerToHyperService::new(router.clone().map_request(
                        move |mut request: Request<Incoming>| {
                            request.extensions_mut().insert(ConnectInfo(peer));
                            request
                        },
                    ));
                    connections.spawn(async move {
                        let _guard = guard;
                        // HTTP/1.1, or h2c with prior knowledge (gRPC callers).
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Out of file descriptors, say: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Forwards a request with the shared proxy helper; the guard turns every
/// failure into a response.
async fn forward(
    State(routes): State<Arc<Routes>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request<Body>,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let refused = parts
        .headers
        .get(ROUTE_HEADER)
        .is_some_and(|v| v == "refused");
    parts.headers.remove(ROUTE_HEADER);
    let target = if refused {
        routes.refused.clone()
    } else {
        match routes.upstream.read() {
            Ok(target) => target.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    };
    let path_and_query = proxy::path_and_query(&parts.uri);
    if proxy::forward_request(&mut parts, &target, path_and_query, client).is_err() {
        let mut response = Response::new(Body::from("bad request target"));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return response;
    }
    let Ok(response) = routes
        .client
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await;
    let (mut parts, body) = response.into_parts();
    proxy::forward_response(&mut parts);
    Response::from_parts(parts, Body::new(body))
}

// ---------------------------------------------------------------------------
// The caller
// ---------------------------------------------------------------------------

/// The plain client that calls the gateway.
pub type Caller = Client<HttpConnector, Full<Bytes>>;

pub fn caller() -> Caller {
    Client::builder(TokioExecutor::new()).build_http()
}

/// What the gateway answered, read to the end of the body (or its error).
#[derive(Debug)]
pub struct Exchange {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `Err` when the body broke off after the head (reset, truncated, stalled).
    pub body: Result<Bytes, String>,
    /// From sending the request to the end of the body (or its error).
    pub elapsed: Duration,
}

impl Exchange {
    /// Whether the gateway's guard answered this itself (no `x-upstream` header).
    pub fn synthesized(&self) -> bool {
        self.headers.get("x-upstream").is_none()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A short label for tallies: `200`, `502 transport`, `grpc 14`, `200 broken`.
    pub fn label(&self) -> String {
        if let Some(code) = self.header("grpc-status") {
            return format!("grpc {code}");
        }
        let mut label = self.status.as_u16().to_string();
        if self.synthesized() {
            if let Ok(body) = &self.body {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
                    if let Some(t) = v["type"].as_str() {
                        label.push(' ');
                        label.push_str(t.trim_start_matches(PROBLEM_PREFIX));
                    }
                }
            }
        } else if self.body.is_err() {
            label.push_str(" broken");
        }
        label
    }
}

/// Sends one request and reads the whole answer. `Err` if there was no answer
/// (connection failed, or no complete answer within `bound`).
pub async fn exchange(
    caller: &Caller,
    request: Request<Full<Bytes>>,
    bound: Duration,
) -> Result<Exchange, String> {
    let started = Instant::now();
    let attempt = async {
        let response = caller
            .request(request)
            .await
            .map_err(|e| format!("no response: {e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .map_err(|e| format!("{e:?}"));
        Ok(Exchange {
            status: parts.status,
            headers: parts.headers,
            body,
            elapsed: started.elapsed(),
        })
    };
    match tokio::time::timeout(bound, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no complete answer within {bound:?}")),
    }
}

// ---------------------------------------------------------------------------
// Counting observer
// ---------------------------------------------------------------------------

/// Counts what the guard reports; clones share the counts.
#[derive(Clone, Default)]
pub struct Counters(Arc<CountersInner>);

#[derive(Default)]
pub struct CountersInner {
    pub attempts: AtomicU64,
    pub retries: AtomicU64,
    pub denied: AtomicU64,
    pub rejected: AtomicU64,
    pub responses: AtomicU64,
    pub transitions: AtomicU64,
}

impl Counters {
    pub fn attempts(&self) -> u64 {
        self.0.attempts.load(Ordering::SeqCst)
    }
    pub fn retries(&self) -> u64 {
        self.0.retries.load(Ordering::SeqCst)
    }
    pub fn denied(&self) -> u64 {
        self.0.denied.load(Ordering::SeqCst)
    }
    pub fn rejected(&self) -> u64 {
        self.0.rejected.load(Ordering::SeqCst)
    }
    pub fn responses(&self) -> u64 {
        self.0.responses.load(Ordering::SeqCst)
    }
    pub fn transitions(&self) -> u64 {
        self.0.transitions.load(Ordering::SeqCst)
    }
}

impl Observer for Counters {
    fn on_attempt(&self, _: &AttemptEvent<'_>) {
        self.0.attempts.fetch_add(1, Ordering::SeqCst);
    }
    fn on_retry(&self, _: &RetryEvent<'_>) {
        self.0.retries.fetch_add(1, Ordering::SeqCst);
    }
    fn on_retry_denied(&self, _: &RetryDeniedEvent<'_>) {
        self.0.denied.fetch_add(1, Ordering::SeqCst);
    }
    fn on_rejected(&self, _: &RejectedEvent<'_>) {
        self.0.rejected.fetch_add(1, Ordering::SeqCst);
    }
    fn on_response(&self, _: &ResponseEvent<'_>) {
        self.0.responses.fetch_add(1, Ordering::SeqCst);
    }
    fn on_circuit_transition(&self, _: &CircuitEvent<'_>) {
        self.0.transitions.fetch_add(1, Ordering::SeqCst);
    }
}

/// The most retries a budget of `ratio` and `min_per_second` over `window` can
/// grant to `requests` requests sent within `elapsed`: `ratio × requests` plus
/// the reserve (`min_per_second × window`) once per window the run touched.
pub fn budget_bound(
    requests: u64,
    ratio: f64,
    min_per_second: u32,
    window: Duration,
    elapsed: Duration,
) -> u64 {
    let window_secs = window.as_secs().max(1);
    // Deposits live in one-second slots: a run within one window (plus the slot
    // it started in) only ever sees one reserve.
    let spanned = elapsed.as_secs() + 2;
    let windows = if spanned <= window_secs {
        1
    } else {
        spanned.div_ceil(window_secs) + 1
    };
    (requests as f64 * ratio) as u64 + u64::from(min_per_second) * window_secs * windows
}

// ---------------------------------------------------------------------------
// Faults and calls
// ---------------------------------------------------------------------------

/// What a request asks the fault upstream (or the refused authority) to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Ok,
    Echo,
    Status(u16),
    Hang,
    Slow(u64),
    SlowBody(u64),
    StallBody,
    Reset,
    ResetAfterHeaders,
    Close,
    Garbage,
    Truncated,
    BadContentLength,
    /// `/flaky/{n}/{request id}`: n 503s, then 200.
    Flaky(u32),
    /// `/flaky-reset/{n}/{request id}`: n resets, then 200.
    FlakyReset(u32),
    /// `/flaky-status/{n}/{code}/{request id}`: n × code, then 200.
    FlakyStatus(u32, u16),
    Stream(u32, u64),
    Big(u64),
    /// Nothing listens.
    Refused,
}

impl Fault {
    /// The path for a request with this id (flaky counters are per request).
    pub fn path(&self, id: &str) -> String {
        match *self {
            Fault::Ok | Fault::Refused => "/ok".into(),
            Fault::Echo => "/echo".into(),
            Fault::Status(code) => format!("/status/{code}"),
            Fault::Hang => "/hang".into(),
            Fault::Slow(ms) => format!("/slow/{ms}"),
            Fault::SlowBody(ms) => format!("/slow-body/{ms}"),
            Fault::StallBody => "/stall-body".into(),
            Fault::Reset => "/reset".into(),
            Fault::ResetAfterHeaders => "/reset-after-headers".into(),
            Fault::Close => "/close".into(),
            Fault::Garbage => "/garbage".into(),
            Fault::Truncated => "/truncated".into(),
            Fault::BadContentLength => "/bad-content-length".into(),
            Fault::Flaky(n) => format!("/flaky/{n}/{id}"),
            Fault::FlakyReset(n) => format!("/flaky-reset/{n}/{id}"),
            Fault::FlakyStatus(n, code) => format!("/flaky-status/{n}/{code}/{id}"),
            Fault::Stream(chunks, ms) => format!("/stream/{chunks}/{ms}"),
            Fault::Big(bytes) => format!("/big/{bytes}"),
        }
    }

    /// The fault family: the breaker key in mixes, and the tally row.
    pub fn family(&self) -> String {
        match *self {
            Fault::Refused => "refused".into(),
            Fault::Big(_) => "big".into(),
            Fault::Stream(..) => "stream".into(),
            Fault::SlowBody(_) => "slow-body".into(),
            Fault::Flaky(n) => format!("flaky/{n}"),
            Fault::FlakyReset(n) => format!("flaky-reset/{n}"),
            Fault::FlakyStatus(n, code) => format!("flaky-status/{n}/{code}"),
            other => other.path("").trim_start_matches('/').to_string(),
        }
    }

    /// The body a healthy answer carries.
    fn healthy_body(&self, call: &Call) -> Option<Bytes> {
        match *self {
            Fault::Ok | Fault::Slow(_) => Some(Bytes::from_static(b"ok")),
            Fault::Echo => Some(call.body.clone()),
            Fault::Status(code) => Some(Bytes::from(format!("status {code}"))),
            Fault::SlowBody(_) => Some(Bytes::from_static(b"0123456789")),
            Fault::Flaky(_) | Fault::FlakyReset(_) | Fault::FlakyStatus(..) => {
                Some(Bytes::from_static(b"ok"))
            }
            Fault::Stream(chunks, _) => Some(Bytes::from(
                (0..chunks)
                    .map(|i| format!("chunk-{i}\n"))
                    .collect::<String>(),
            )),
            Fault::Big(n) => Some((0..n).map(|i| (i % 251) as u8).collect()),
            _ => None,
        }
    }
}

/// One request of a run.
#[derive(Clone, Debug)]
pub struct Call {
    /// Sent as `x-request-id`; the upstream records it on every attempt.
    pub id: String,
    pub fault: Fault,
    pub method: Method,
    pub body: Bytes,
    /// `content-type: application/grpc` (and POST).
    pub grpc: bool,
    pub grpc_timeout: Option<&'static str>,
    pub idempotency_key: bool,
    /// Extra query string, e.g. `retry_after=5`.
    pub query: Option<String>,
}

impl Call {
    pub fn new(id: impl Into<String>, fault: Fault) -> Call {
        Call {
            id: id.into(),
            fault,
            method: Method::GET,
            body: Bytes::new(),
            grpc: false,
            grpc_timeout: None,
            idempotency_key: false,
            query: None,
        }
    }

    pub fn method(mut self, method: Method, body: impl Into<Bytes>) -> Call {
        self.method = method;
        self.body = body.into();
        self
    }

    /// A gRPC call: POST with `content-type: application/grpc`.
    pub fn grpc(mut self, timeout: Option<&'static str>) -> Call {
        self.method = Method::POST;
        self.grpc = true;
        self.grpc_timeout = timeout;
        self
    }

    pub fn idempotency_key(mut self) -> Call {
        self.idempotency_key = true;
        self
    }

    pub fn query(mut self, query: impl Into<String>) -> Call {
        self.query = Some(query.into());
        self
    }

    /// Whether the guard may send it again after it may have reached the upstream.
    pub fn retry_safe(&self) -> bool {
        self.idempotency_key
            || matches!(
                self.method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::PUT
                    | Method::DELETE
            )
    }

    pub fn request(&self, gateway: &Gateway) -> Request<Full<Bytes>> {
        let mut path = self.fault.path(&self.id);
        if let Some(query) = &self.query {
            path.push('?');
            path.push_str(query);
        }
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(gateway.url(&path))
            .header("x-request-id", self.id.as_str())
            .header(KEY_HEADER, self.fault.family());
        if self.fault == Fault::Refused {
            builder = builder.header(ROUTE_HEADER, "refused");
        }
        if self.grpc {
            builder = builder.header(header::CONTENT_TYPE, "application/grpc");
        }
        if let Some(timeout) = self.grpc_timeout {
            builder = builder.header("grpc-timeout", timeout);
        }
        if self.idempotency_key {
            builder = builder.header("idempotency-key", format!("key-{}", self.id));
        }
        builder
            .body(Full::new(self.body.clone()))
            .expect("a valid request")
    }
}

// ---------------------------------------------------------------------------
// Limits and what may be answered
// ---------------------------------------------------------------------------

/// The guard settings of a run, and what the checks may allow for.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub attempt_timeout: Duration,
    pub deadline: Duration,
    pub idle_timeout: Duration,
    pub max_attempts: u32,
    /// Extra time every answer may take beyond its bound (a shared machine).
    pub slack: Duration,
    /// A breaker is configured: failing faults may be answered 503 circuit-open.
    pub breaker: bool,
    /// The retry budget may run out: a retryable failure may come back unretried.
    pub budget_may_deny: bool,
    /// Bodies longer than this are sent once and never retried.
    pub max_replay_body: usize,
    /// The breaker of the fault upstream is known to be open: every call to it
    /// must be answered 503 circuit-open without reaching it.
    pub circuit_open: bool,
}

impl Limits {
    /// The guard configured with these limits (add a breaker, observer, budget).
    pub fn builder(&self) -> upstream_guard::Builder {
        UpstreamGuardLayer::builder()
            .attempt_timeout(self.attempt_timeout)
            .deadline(self.deadline)
            .body_idle_timeout(self.idle_timeout)
            .upstream_name(UPSTREAM_NAME)
            .retry(self.retry())
    }

    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy::default()
            .max_attempts(self.max_attempts)
            .backoff(Duration::from_millis(5), Duration::from_millis(50))
            .max_replay_body(self.max_replay_body)
    }

    /// Whether a retry the policy allows may still be denied (budget or breaker).
    fn may_stop_retrying(&self) -> bool {
        self.budget_may_deny || self.breaker
    }

    /// Whether `/slow/{ms}` answers within the attempt timeout, with a wide margin.
    fn slow_is_fast(&self, ms: u64) -> bool {
        Duration::from_millis(ms) * 3 < self.attempt_timeout
    }

    /// How long a call may take from send to the end of its body.
    pub fn time_bound(&self, call: &Call) -> Duration {
        let mut headers_by = self.deadline;
        if let Some(t) = call
            .grpc_timeout
            .and_then(|t| parse_grpc_timeout(t.as_bytes()))
        {
            headers_by = headers_by.min(t);
        }
        let body = match call.fault {
            Fault::SlowBody(ms) => Duration::from_millis(ms).min(self.idle_timeout * 2),
            Fault::StallBody | Fault::ResetAfterHeaders | Fault::Truncated => self.idle_timeout,
            Fault::Stream(chunks, ms) => Duration::from_millis(u64::from(chunks) * ms),
            Fault::Big(bytes) => Duration::from_millis(bytes / 1024),
            _ => Duration::ZERO,
        };
        headers_by + body + self.slack
    }

    /// Everything the gateway may answer to `call`.
    pub fn allowed(&self, call: &Call) -> Vec<Allowed> {
        if self.circuit_open && call.fault != Fault::Refused {
            return vec![Allowed::Guard(&[FailureKind::CircuitOpen])];
        }
        let retries =
            call.retry_safe() && self.max_attempts > 1 && call.body.len() <= self.max_replay_body;
        let mut allowed = Vec::new();
        let healthy = |allowed: &mut Vec<Allowed>| {
            let body = call.fault.healthy_body(call).unwrap_or_default();
            let body = if call.method == Method::HEAD {
                Bytes::new()
            } else {
                body
            };
            allowed.push(Allowed::Upstream(200, Some(body)));
        };
        let mut can_fail = true;
        match call.fault {
            Fault::Ok | Fault::Echo | Fault::Stream(..) | Fault::Big(_) => {
                healthy(&mut allowed);
                can_fail = false;
            }
            Fault::Status(code) => {
                let body = Bytes::from(format!("status {code}"));
                allowed.push(Allowed::Upstream(code, Some(body)));
                can_fail = code >= 500;
            }
            Fault::Slow(ms) if self.slow_is_fast(ms) => {
                healthy(&mut allowed);
                can_fail = false;
            }
            Fault::Slow(_) | Fault::Hang => allowed.push(Allowed::Guard(&[
                FailureKind::AttemptTimeout,
                FailureKind::DeadlineExceeded,
            ])),
            Fault::SlowBody(ms) if Duration::from_millis(ms) * 3 < self.idle_timeout => {
                healthy(&mut allowed);
                can_fail = false;
            }
            Fault::SlowBody(_) | Fault::StallBody | Fault::ResetAfterHeaders | Fault::Truncated => {
                allowed.push(Allowed::Broken(200));
                can_fail = false;
            }
            Fault::Reset | Fault::Close => {
                allowed.push(Allowed::Guard(&[FailureKind::Transport]));
            }
            Fault::Garbage | Fault::BadContentLength => {
                if cfg!(feature = "hyper") {
                    allowed.push(Allowed::Guard(&[FailureKind::MalformedResponse]));
                } else {
                    // Without the `hyper` feature a parse error is not recognised.
                    allowed.push(Allowed::Guard(&[
                        FailureKind::MalformedResponse,
                        FailureKind::Transport,
                    ]));
                }
            }
            Fault::Flaky(n) => {
                if n == 0 || (retries && n < self.max_attempts) {
                    healthy(&mut allowed);
                }
                if n > 0 && (!retries || n >= self.max_attempts || self.may_stop_retrying()) {
                    allowed.push(Allowed::Upstream(503, Some(Bytes::from_static(b"flaky"))));
                }
            }
            Fault::FlakyStatus(n, code) => {
                let retryable = matches!(code, 502..=504);
                if (retries && retryable && n < self.max_attempts) || n == 0 {
                    healthy(&mut allowed);
                }
                if n > 0
                    && (!retries
                        || !retryable
                        || n >= self.max_attempts
                        || self.may_stop_retrying())
                {
                    allowed.push(Allowed::Upstream(code, Some(Bytes::from_static(b"flaky"))));
                }
                can_fail = code >= 500;
            }
            Fault::FlakyReset(n) => {
                if n == 0 || (retries && n < self.max_attempts) {
                    healthy(&mut allowed);
                }
                if n > 0 && (!retries || n >= self.max_attempts || self.may_stop_retrying()) {
                    allowed.push(Allowed::Guard(&[FailureKind::Transport]));
                }
            }
            Fault::Refused => allowed.push(Allowed::Guard(&[FailureKind::Connect])),
        }
        if self.breaker && can_fail {
            allowed.push(Allowed::Guard(&[FailureKind::CircuitOpen]));
        }
        allowed
    }
}

/// One acceptable answer.
#[derive(Clone)]
pub enum Allowed {
    /// The upstream's own response, with this status and (if `Some`) exactly this body.
    Upstream(u16, Option<Bytes>),
    /// The upstream's head with this status, then a body that fails.
    Broken(u16),
    /// A response the guard synthesized for one of these kinds.
    Guard(&'static [FailureKind]),
}

impl std::fmt::Debug for Allowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Allowed::Upstream(status, None) => write!(f, "upstream {status}"),
            Allowed::Upstream(status, Some(body)) => {
                write!(f, "upstream {status} with a {}-byte body", body.len())
            }
            Allowed::Broken(status) => write!(f, "upstream {status} with a broken body"),
            Allowed::Guard(kinds) => write!(f, "guard {kinds:?}"),
        }
    }
}

const PROBLEM_PREFIX: &str = "urn:upstream-guard:problem:";

/// The problem `type` the README documents for each kind.
pub fn documented_problem_type(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Connect => "urn:upstream-guard:problem:connect",
        FailureKind::Transport => "urn:upstream-guard:problem:transport",
        FailureKind::MalformedResponse => "urn:upstream-guard:problem:malformed-response",
        FailureKind::AttemptTimeout => "urn:upstream-guard:problem:attempt-timeout",
        FailureKind::DeadlineExceeded => "urn:upstream-guard:problem:deadline-exceeded",
        FailureKind::CircuitOpen => "urn:upstream-guard:problem:circuit-open",
        FailureKind::ConcurrencyLimited => "urn:upstream-guard:problem:concurrency-limited",
        FailureKind::RequestBody => "urn:upstream-guard:problem:request-body",
        FailureKind::RequestBodyTimeout => "urn:upstream-guard:problem:request-body-timeout",
        FailureKind::Panic => "urn:upstream-guard:problem:panic",
        _ => "unknown",
    }
}

/// The status the README documents for each kind.
pub fn documented_status(kind: FailureKind) -> u16 {
    match kind {
        FailureKind::Connect | FailureKind::Transport | FailureKind::MalformedResponse => 502,
        FailureKind::AttemptTimeout | FailureKind::DeadlineExceeded => 504,
        FailureKind::CircuitOpen | FailureKind::ConcurrencyLimited => 503,
        FailureKind::RequestBody => 400,
        FailureKind::RequestBodyTimeout => 408,
        FailureKind::Panic => 500,
        _ => 0,
    }
}

/// gRPC's percent-decoding of `grpc-message`.
pub fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    upstream_guard::grpc::parse_grpc_timeout(value)
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Sent {
    pub request_id: Option<String>,
    pub body: Vec<u8>,
}

/// Checks one answer against everything the call allows. `Err` says why not.
pub fn check(
    call: &Call,
    answer: &Result<Exchange, String>,
    limits: &Limits,
) -> Result<(), String> {
    let answer = answer.as_ref().map_err(|e| format!("not answered: {e}"))?;
    let bound = limits.time_bound(call);
    if answer.elapsed > bound {
        return Err(format!(
            "answered in {:?}, over its bound of {bound:?}",
            answer.elapsed
        ));
    }
    let allowed = limits.allowed(call);
    let mut why = Vec::new();
    for option in &allowed {
        match matches(call, answer, option, limits) {
            Ok(()) => return Ok(()),
            Err(e) => why.push(e),
        }
    }
    Err(format!(
        "answer {} {:?} (body {}) matches none of {allowed:?}: {}",
        answer.status,
        answer.headers,
        match &answer.body {
            Ok(b) => format!("{:?}", String::from_utf8_lossy(&b[..b.len().min(240)])),
            Err(e) => format!("error {e}"),
        },
        why.join("; ")
    ))
}

fn matches(
    call: &Call,
    answer: &Exchange,
    allowed: &Allowed,
    limits: &Limits,
) -> Result<(), String> {
    match allowed {
        Allowed::Upstream(status, body) => {
            if answer.synthesized() {
                return Err("synthesized, not the upstream's".into());
            }
            if answer.status.as_u16() != *status {
                return Err(format!("status {} is not {status}", answer.status));
            }
            if answer.header("x-request-id") != Some(call.id.as_str()) {
                return Err("the upstream's x-request-id echo is missing".into());
            }
            let got = answer
                .body
                .as_ref()
                .map_err(|e| format!("body broke: {e}"))?;
            if let Some(body) = body {
                if got != body {
                    return Err(format!(
                        "body differs ({} bytes, expected {})",
                        got.len(),
                        body.len()
                    ));
                }
            }
            Ok(())
        }
        Allowed::Broken(status) => {
            if answer.synthesized() {
                return Err("synthesized, not the upstream's".into());
            }
            if answer.status.as_u16() != *status {
                return Err(format!("status {} is not {status}", answer.status));
            }
            match &answer.body {
                Err(_) => Ok(()),
                Ok(body) => Err(format!(
                    "a broken upstream body ended as a {}-byte success",
                    body.len()
                )),
            }
        }
        Allowed::Guard(kinds) => {
            if !answer.synthesized() {
                return Err("the upstream's, not synthesized".into());
            }
            if call.grpc {
                check_grpc(answer, kinds)
            } else {
                check_problem(call, answer, kinds, limits)
            }
        }
    }
}

fn check_common_synthesized(answer: &Exchange) -> Result<(), String> {
    for (name, value) in &answer.headers {
        if value.as_bytes().windows(9).any(|w| w == b"127.0.0.1") {
            return Err(format!("header {name} leaks an internal address"));
        }
    }
    if let Ok(body) = &answer.body {
        if body.windows(9).any(|w| w == b"127.0.0.1") {
            return Err("the body leaks an internal address".into());
        }
    }
    Ok(())
}

fn check_problem(
    call: &Call,
    answer: &Exchange,
    kinds: &[FailureKind],
    limits: &Limits,
) -> Result<(), String> {
    check_common_synthesized(answer)?;
    if answer.header("content-type") != Some("application/problem+json") {
        return Err(format!(
            "content-type {:?} is not problem+json",
            answer.header("content-type")
        ));
    }
    if answer.header("cache-control") != Some("no-store") {
        return Err("no Cache-Control: no-store".into());
    }
    let body = answer
        .body
        .as_ref()
        .map_err(|e| format!("a synthesized body broke: {e}"))?;
    if call.method == Method::HEAD {
        return if body.is_empty() {
            let kind = kinds
                .iter()
                .find(|k| documented_status(**k) == answer.status.as_u16());
            kind.map(|_| ())
                .ok_or_else(|| format!("HEAD status {}", answer.status))
        } else {
            Err("a HEAD answer has a body".into())
        };
    }
    if answer.header("content-length") != Some(body.len().to_string().as_str()) {
        return Err("content-length does not match the body".into());
    }
    let problem: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("problem body is not JSON: {e}"))?;
    if problem["status"] != answer.status.as_u16() {
        return Err(format!(
            "problem status {} is not the HTTP status {}",
            problem["status"], answer.status
        ));
    }
    let kind = kinds
        .iter()
        .find(|k| problem["type"] == documented_problem_type(**k))
        .ok_or_else(|| format!("problem type {} not allowed", problem["type"]))?;
    if answer.status.as_u16() != documented_status(*kind) {
        return Err(format!("{kind} answered with {}", answer.status));
    }
    if problem["title"] != answer.status.canonical_reason().unwrap_or_default() {
        return Err(format!("title {}", problem["title"]));
    }
    if problem["detail"] != kind.description() {
        return Err(format!(
            "detail {} is not the fixed description (inner error text leaked?)",
            problem["detail"]
        ));
    }
    if problem["upstream"] != UPSTREAM_NAME {
        return Err(format!("upstream {}", problem["upstream"]));
    }
    if problem["request_id"] != call.id.as_str() {
        return Err(format!("request_id {}", problem["request_id"]));
    }
    let attempts = problem["attempts"]
        .as_u64()
        .ok_or("attempts is not a number")?;
    if attempts > u64::from(limits.max_attempts) {
        return Err(format!("{attempts} attempts > {}", limits.max_attempts));
    }
    if *kind == FailureKind::CircuitOpen {
        let after: u64 = answer
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .ok_or("circuit-open without a numeric Retry-After")?;
        if after == 0 {
            return Err("Retry-After: 0 on an open circuit".into());
        }
    }
    Ok(())
}

fn check_grpc(answer: &Exchange, kinds: &[FailureKind]) -> Result<(), String> {
    check_common_synthesized(answer)?;
    if answer.status != StatusCode::OK {
        return Err(format!("gRPC failure with HTTP {}", answer.status));
    }
    if answer.header("content-type") != Some("application/grpc") {
        return Err("gRPC failure without content-type application/grpc".into());
    }
    let code: u8 = answer
        .header("grpc-status")
        .and_then(|v| v.parse().ok())
        .ok_or("no numeric grpc-status")?;
    let message = answer.header("grpc-message").ok_or("no grpc-message")?;
    if !message.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("grpc-message is not printable ASCII".into());
    }
    let decoded = percent_decode(message).ok_or("grpc-message is badly percent-encoded")?;
    let kind = kinds
        .iter()
        .find(|k| k.grpc_code() == code && decoded == k.description().as_bytes())
        .ok_or_else(|| format!("grpc-status {code} / message {message:?} not allowed"))?;
    let expected = if kind.is_timeout() { 4 } else { 14 };
    if code != expected {
        return Err(format!("{kind} mapped to grpc-status {code}"));
    }
    match &answer.body {
        Ok(body) if body.is_empty() => Ok(()),
        _ => Err("a trailers-only gRPC answer has a body".into()),
    }
}

/// What is kept of an answer once it has been checked: enough to check what the
/// upstream received for it, and to tally. (Keeping whole answers of thousands
/// of calls would make the test's own memory the biggest thing in RSS.)
#[derive(Debug)]
pub struct Checked {
    pub call: Call,
    pub label: String,
    /// `attempts` of a synthesized problem+json body.
    pub attempts: Option<u64>,
    pub verdict: Result<(), String>,
}

impl Checked {
    pub fn new(call: Call, answer: &Result<Exchange, String>, limits: &Limits) -> Checked {
        let verdict = check(&call, answer, limits);
        let (label, attempts) = match answer {
            Ok(answer) => (answer.label(), answer.problem_attempts()),
            Err(_) => ("unanswered".to_string(), None),
        };
        Checked {
            call,
            label,
            attempts,
            verdict,
        }
    }
}

impl Exchange {
    /// `attempts` from a synthesized problem+json body.
    fn problem_attempts(&self) -> Option<u64> {
        if !self.synthesized() || self.header("content-type") != Some("application/problem+json") {
            return None;
        }
        let body = self.body.as_ref().ok()?;
        serde_json::from_slice::<serde_json::Value>(body).ok()?["attempts"].as_u64()
    }
}

/// Checks every answer of a run and what the upstream received for each: the
/// upstream saw at most `max_attempts` requests per call, each with the body the
/// caller sent, and no more than the guard reports as attempts.
pub fn verify(
    results: &[(Call, Result<Exchange, String>)],
    sent: &[Sent],
    limits: &Limits,
) -> Vec<String> {
    let checked: Vec<Checked> = results
        .iter()
        .map(|(call, answer)| Checked::new(call.clone(), answer, limits))
        .collect();
    verify_checked(&checked, sent, limits)
}

/// [`verify`] for answers already checked by [`run_checked`].
pub fn verify_checked(checked: &[Checked], sent: &[Sent], limits: &Limits) -> Vec<String> {
    let mut by_id: HashMap<&str, Vec<&Sent>> = HashMap::new();
    for s in sent {
        if let Some(id) = &s.request_id {
            by_id.entry(id.as_str()).or_default().push(s);
        }
    }
    let mut violations = Vec::new();
    for c in checked {
        let call = &c.call;
        let mut fail =
            |what: String| violations.push(format!("{} {:?}: {what}", call.id, call.fault));
        if let Err(e) = &c.verdict {
            fail(e.clone());
        }
        let received = by_id.get(call.id.as_str()).map_or(&[][..], Vec::as_slice);
        if received.len() > limits.max_attempts as usize {
            fail(format!(
                "the upstream received {} attempts (max {})",
                received.len(),
                limits.max_attempts
            ));
        }
        if received.iter().any(|s| s.body != call.body) {
            fail("an attempt reached the upstream with a different body".into());
        }
        if let Some(attempts) = c.attempts {
            if (received.len() as u64) > attempts {
                fail(format!(
                    "the upstream received {} requests but the guard reports {attempts} attempts",
                    received.len()
                ));
            }
        }
    }
    violations
}

/// Sends `calls` through the gateway, at most `in_flight` at a time.
pub async fn run(
    gateway: &Gateway,
    caller: &Caller,
    calls: Vec<Call>,
    in_flight: usize,
    limits: &Limits,
) -> Vec<(Call, Result<Exchange, String>)> {
    futures_util::stream::iter(calls)
        .map(|call| async move {
            let answer = exchange(caller, call.request(gateway), hard_bound(&call, limits)).await;
            (call, answer)
        })
        .buffer_unordered(in_flight.max(1))
        .collect()
        .await
}

/// [`run`], checking each answer as it arrives and keeping only the verdict.
pub async fn run_checked(
    gateway: &Gateway,
    caller: &Caller,
    calls: Vec<Call>,
    in_flight: usize,
    limits: &Limits,
) -> Vec<Checked> {
    futures_util::stream::iter(calls)
        .map(|call| async move {
            let answer = exchange(caller, call.request(gateway), hard_bound(&call, limits)).await;
            Checked::new(call, &answer, limits)
        })
        .buffer_unordered(in_flight.max(1))
        .collect()
        .await
}

/// How long to wait for an answer at all: above the checked bound, so that a
/// slow answer is reported as slow rather than as missing.
pub fn hard_bound(call: &Call, limits: &Limits) -> Duration {
    limits.time_bound(call) + Duration::from_secs(10)
}

/// Answers per fault family and label, for printing.
pub fn tally(checked: &[Checked]) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut rows: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for c in checked {
        let family = if c.call.grpc {
            format!("grpc {}", c.call.fault.family())
        } else {
            c.call.fault.family()
        };
        *rows
            .entry(family)
            .or_default()
            .entry(c.label.clone())
            .or_default() += 1;
    }
    rows
}

/// Answers per label over the whole run.
pub fn status_mix(checked: &[Checked]) -> BTreeMap<String, usize> {
    let mut mix = BTreeMap::new();
    for c in checked {
        *mix.entry(c.label.clone()).or_default() += 1;
    }
    mix
}

// ---------------------------------------------------------------------------
// Random mixes
// ---------------------------------------------------------------------------

/// A random call: a fault (weighted towards healthy traffic), a method, maybe a
/// body, maybe gRPC. Timings are relative to `limits`, so that a slow route is
/// clearly fast or clearly too slow, never borderline.
pub fn random_call(rng: &mut fastrand::Rng, id: String, limits: &Limits) -> Call {
    let fast_ms = (limits.attempt_timeout.as_millis() as u64 / 10).max(1);
    let too_slow_ms = limits.attempt_timeout.as_millis() as u64 * 4;
    let idle_ms = limits.idle_timeout.as_millis() as u64;
    let fault = match rng.u32(0..100) {
        0..=19 => Fault::Ok,
        20..=27 => Fault::Echo,
        28..=30 => Fault::Stream(rng.u32(1..6), rng.u64(0..=idle_ms / 10)),
        31..=33 => Fault::Big(rng.u64(0..=256 * 1024)),
        34..=36 => Fault::Slow(fast_ms),
        37..=38 => Fault::Slow(too_slow_ms),
        39..=41 => Fault::Status([200, 404, 500, 502, 503, 504][rng.usize(0..6)]),
        42..=44 => Fault::Hang,
        45..=47 => Fault::SlowBody(rng.u64(0..=idle_ms / 10)),
        48..=49 => Fault::SlowBody(idle_ms * 3),
        50..=52 => Fault::StallBody,
        53..=56 => Fault::Reset,
        57..=59 => Fault::ResetAfterHeaders,
        60..=62 => Fault::Close,
        63..=65 => Fault::Garbage,
        66..=68 => Fault::Truncated,
        69..=71 => Fault::BadContentLength,
        72..=78 => Fault::Flaky(rng.u32(0..=limits.max_attempts)),
        79..=84 => Fault::FlakyReset(rng.u32(0..=limits.max_attempts)),
        85..=91 => Fault::FlakyStatus(
            rng.u32(0..=limits.max_attempts),
            [500, 502, 503, 504, 429][rng.usize(0..5)],
        ),
        _ => Fault::Refused,
    };
    let mut call = Call::new(id, fault);
    let body_allowed = !matches!(fault, Fault::Refused);
    match rng.u32(0..100) {
        0..=9 if body_allowed => {
            let body: Vec<u8> = (0..rng.usize(0..=8 * 1024)).map(|_| rng.u8(..)).collect();
            call = call.method(Method::PUT, body);
        }
        10..=17 if body_allowed => {
            let body: Vec<u8> = (0..rng.usize(1..=2048)).map(|_| rng.u8(..)).collect();
            call = call.method(Method::POST, body);
            if rng.bool() {
                call = call.idempotency_key();
            }
        }
        18..=21
            if matches!(
                fault,
                Fault::Ok | Fault::Hang | Fault::Reset | Fault::Refused
            ) =>
        {
            call = call.method(Method::HEAD, Bytes::new());
        }
        22..=29
            if matches!(
                fault,
                Fault::Ok
                    | Fault::Hang
                    | Fault::Reset
                    | Fault::Close
                    | Fault::Garbage
                    | Fault::Refused
            ) =>
        {
            let timeout = [None, Some("200m"), Some("5S")][rng.usize(0..3)];
            call = call.grpc(timeout);
        }
        _ => {}
    }
    if fault == Fault::Echo && call.method == Method::GET {
        let body: Vec<u8> = (0..rng.usize(0..=512)).map(|_| rng.u8(..)).collect();
        call = call.method(Method::PUT, body);
    }
    call
}
