//! What every benchmark shares: the requests, the trivial inner service, the peers
//! built the same way for every scenario, and two ways to drive a call.
//!
//! To add a peer: add a [`Peer`] variant, its name, and an arm in [`with_peer!`].
//! To add a scenario (a kind of request): add a [`Scenario`] variant and its head
//! and body in [`Template::new`]; every benchmark picks it up from
//! [`Scenario::ALL`].

// Each bench target uses a different part of this module.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::{poll_fn, ready, Future, Ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
};
use http_body::Body as HttpBody;
use http_body_util::Full;
use tower::retry::Policy;
use tower::Service;

/// The request body type every peer is called with.
pub type Body = Full<Bytes>;

/// Size of the POST body.
pub const POST_BODY_LEN: usize = 4096;

/// The per-attempt timeout every peer is configured with: the guard's default.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A kind of request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// GET without a body, with realistic headers.
    Get,
    /// POST with a 4 KiB `Full<Bytes>` body: an exact size hint, so the guard
    /// keeps it for replay.
    Post4k,
}

impl Scenario {
    pub const ALL: [Scenario; 2] = [Scenario::Get, Scenario::Post4k];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Get => "get",
            Scenario::Post4k => "post_4k",
        }
    }
}

/// A request to copy for each call. Header values are parsed (not `from_static`),
/// as a server would; after the first copy they are reference-counted `Bytes`, as
/// hyper's are (they share the connection's read buffer). Build one per thread:
/// copies made on two threads from one template would share reference counts.
pub struct Template {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

fn parsed(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).expect("valid header value")
}

impl Template {
    pub fn new(scenario: Scenario) -> Template {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, parsed("api.internal:8080"));
        headers.insert(
            header::USER_AGENT,
            parsed("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        );
        headers.insert(header::ACCEPT, parsed("application/json"));
        headers.insert(header::ACCEPT_ENCODING, parsed("gzip, br"));
        headers.insert(
            HeaderName::from_static("x-request-id"),
            parsed("5f0c6e1a-9b7d-4c1e-8a43-2d9f3b6c7e10"),
        );
        headers.insert(HeaderName::from_static("x-tenant-id"), parsed("acme-eu-1"));
        headers.insert(
            HeaderName::from_static("x-forwarded-for"),
            parsed("203.0.113.7"),
        );
        headers.insert(
            HeaderName::from_static("traceparent"),
            parsed("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let (method, uri, body) = match scenario {
            Scenario::Get => (
                Method::GET,
                "http://api.internal:8080/v1/items/42?include=owner",
                Bytes::new(),
            ),
            Scenario::Post4k => {
                headers.insert(header::CONTENT_TYPE, parsed("application/json"));
                headers.insert(header::CONTENT_LENGTH, parsed("4096"));
                (
                    Method::POST,
                    "http://api.internal:8080/v1/orders",
                    Bytes::from(vec![b'x'; POST_BODY_LEN]),
                )
            }
        };
        let template = Template {
            method,
            uri: uri.parse().expect("valid uri"),
            headers,
            body,
        };
        // Make every later copy a reference-count bump, as with hyper's headers.
        drop(template.request());
        template
    }

    /// Adds a header to every request made from this template.
    pub fn with_header(mut self, name: &'static str, value: &str) -> Template {
        self.headers
            .insert(HeaderName::from_static(name), parsed(value));
        drop(self.request());
        self
    }

    /// A fresh request: the head copied, the body sharing the template's bytes.
    pub fn request(&self) -> Request<Body> {
        self.request_with(Full::new(self.body.clone()))
    }

    /// A fresh request to `uri` (instead of the template's), as [`Template::request`].
    pub fn request_to(&self, uri: &Uri) -> Request<Body> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }

    /// A fresh request with the head copied and `body`.
    pub fn request_with<B>(&self, body: B) -> Request<B> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }

    /// The body's bytes, to check that peers pass them on without copying.
    pub fn body(&self) -> &Bytes {
        &self.body
    }
}

/// A benchmark upstream: a `service_fn` that answers at once (its future is
/// `Ready`), never fails, and clones freely.
pub trait Upstream<B>:
    Service<
        Request<B>,
        Response = Response<Body>,
        Error = Infallible,
        Future = Ready<Result<Response<Body>, Infallible>>,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<B, S> Upstream<B> for S where
    S: Service<
            Request<B>,
            Response = Response<Body>,
            Error = Infallible,
            Future = Ready<Result<Response<Body>, Infallible>>,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// The upstream: a trivial, always-ready `service_fn` answering 200 at once.
pub fn inner<B>() -> impl Upstream<B> {
    tower::service_fn(|_request: Request<B>| ready(Ok(Response::new(ok_body()))))
}

pub fn ok_body() -> Body {
    Full::new(Bytes::from_static(b"ok"))
}

/// tower `Retry`'s policy for the comparison: retry 5xx and errors up to `retries`
/// times, cloning the request with `clone_request`.
#[derive(Clone, Debug)]
pub struct RetryServerErrors {
    retries: usize,
}

impl RetryServerErrors {
    pub fn new(retries: usize) -> Self {
        RetryServerErrors { retries }
    }
}

impl<ResB, E> Policy<Request<Body>, Response<ResB>, E> for RetryServerErrors {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _request: &mut Request<Body>,
        result: &mut Result<Response<ResB>, E>,
    ) -> Option<Self::Future> {
        let failed = match result {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        if failed && self.retries > 0 {
            self.retries -= 1;
            Some(ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        let mut clone = Request::new(request.body().clone());
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        *clone.extensions_mut() = request.extensions().clone();
        Some(clone)
    }
}

/// One row of every table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The inner service alone.
    Bare,
    /// tower `Timeout`.
    Timeout,
    /// tower `Retry` (5xx, 2 retries, `clone_request`) over tower `Timeout`.
    RetryTimeout,
    /// tower-resilience's circuit breaker over its time limiter.
    ResilienceBreaker,
    /// upstream-guard, `UpstreamGuardLayer::new()`.
    Guard,
    /// upstream-guard with `RetryPolicy::disabled()`: a diagnostic row that shows what
    /// keeping a request replayable costs.
    GuardNoRetry,
    /// Diagnostic: upstream-guard with `no_circuit_breaker()` (retries on).
    GuardNoBreaker,
    /// Diagnostic: upstream-guard with neither retries nor breaker: timeouts,
    /// classification and failure mapping only (the guard's base cost).
    GuardLean,
    /// upstream-guard with `max_keys(16_384)`: for the many-keys scenario, a
    /// registry that holds every key (no evictions).
    GuardMaxKeys,
}

impl Peer {
    pub const ALL: [Peer; 6] = [
        Peer::Bare,
        Peer::Timeout,
        Peer::RetryTimeout,
        Peer::ResilienceBreaker,
        Peer::Guard,
        Peer::GuardNoRetry,
    ];

    /// Extra rows of the GET tables that take the guard apart, to see where its
    /// time goes.
    pub const DIAGNOSTIC: [Peer; 2] = [Peer::GuardNoBreaker, Peer::GuardLean];

    /// The rows of the many-keys scenario.
    pub const MANY_KEYS: [Peer; 4] = [
        Peer::Bare,
        Peer::RetryTimeout,
        Peer::Guard,
        Peer::GuardMaxKeys,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Bare => "bare",
            Peer::Timeout => "tower_timeout",
            Peer::RetryTimeout => "tower_retry_timeout",
            Peer::ResilienceBreaker => "resilience_breaker_timelimiter",
            Peer::Guard => "upstream_guard",
            Peer::GuardNoRetry => "upstream_guard_no_retry",
            Peer::GuardNoBreaker => "upstream_guard_no_breaker",
            Peer::GuardLean => "upstream_guard_no_retry_no_breaker",
            Peer::GuardMaxKeys => "upstream_guard_max_keys_16384",
        }
    }

    /// Whether this row retries a failed request.
    pub fn retries(self) -> bool {
        matches!(
            self,
            Peer::RetryTimeout | Peer::Guard | Peer::GuardNoBreaker | Peer::GuardMaxKeys
        )
    }
}

/// Builds `$peer`'s service around the upstream `$inner` (a generic function
/// `fn<B>() -> impl Service<Request<B>>`, turbofished per peer), binds it to
/// `$svc`, and evaluates `$body` with it. Each arm has its own service type, so
/// `$body` is usually a call of a generic function.
macro_rules! with_peer {
    ($peer:expr, $inner:ident, $svc:ident => $body:expr) => {{
        use $crate::support::{Body, Peer, RetryServerErrors, ATTEMPT_TIMEOUT};
        match $peer {
            Peer::Bare => {
                let $svc = $inner::<Body>();
                $body
            }
            Peer::Timeout => {
                let $svc = tower::ServiceBuilder::new()
                    .timeout(ATTEMPT_TIMEOUT)
                    .service($inner::<Body>());
                $body
            }
            Peer::RetryTimeout => {
                let $svc = tower::ServiceBuilder::new()
                    .retry(RetryServerErrors::new(2))
                    .timeout(ATTEMPT_TIMEOUT)
                    .service($inner::<Body>());
                $body
            }
            Peer::ResilienceBreaker => {
                use tower_resilience::circuitbreaker::CircuitBreakerLayer;
                use tower_resilience::timelimiter::{TimeLimiterError, TimeLimiterLayer};
                let breaker = CircuitBreakerLayer::builder()
                    .failure_classifier(
                        |result: &Result<
                            http::Response<Body>,
                            TimeLimiterError<std::convert::Infallible>,
                        >| {
                            match result {
                                Ok(response) => response.status().is_server_error(),
                                Err(_) => true,
                            }
                        },
                    )
                    .build()
                    .expect("valid breaker config");
                let limiter = TimeLimiterLayer::builder()
                    .timeout_duration(ATTEMPT_TIMEOUT)
                    .build();
                let $svc = tower::ServiceBuilder::new()
                    .layer(breaker)
                    .layer(limiter)
                    .service($inner::<Body>());
                $body
            }
            Peer::Guard => {
                let $svc = tower::Layer::layer(
                    &upstream_guard::UpstreamGuardLayer::new(),
                    $inner::<upstream_guard::RequestBody<Body>>(),
                );
                $body
            }
            Peer::GuardNoRetry => {
                let layer = upstream_guard::UpstreamGuardLayer::builder()
                    .retry(upstream_guard::RetryPolicy::disabled())
                    .build()
                    .expect("valid guard config");
                let $svc =
                    tower::Layer::layer(&layer, $inner::<upstream_guard::RequestBody<Body>>());
                $body
            }
            Peer::GuardNoBreaker => {
                let layer = upstream_guard::UpstreamGuardLayer::builder()
                    .no_circuit_breaker()
                    .build()
                    .expect("valid guard config");
                let $svc =
                    tower::Layer::layer(&layer, $inner::<upstream_guard::RequestBody<Body>>());
                $body
            }
            Peer::GuardLean => {
                let layer = upstream_guard::UpstreamGuardLayer::builder()
                    .retry(upstream_guard::RetryPolicy::disabled())
                    .no_circuit_breaker()
                    .build()
                    .expect("valid guard config");
                let $svc =
                    tower::Layer::layer(&layer, $inner::<upstream_guard::RequestBody<Body>>());
                $body
            }
            Peer::GuardMaxKeys => {
                let layer = upstream_guard::UpstreamGuardLayer::builder()
                    .circuit_breaker(
                        upstream_guard::BreakerPolicy::default()
                            .max_keys($crate::support::MANY_KEYS_MAX),
                    )
                    .build()
                    .expect("valid guard config");
                let $svc =
                    tower::Layer::layer(&layer, $inner::<upstream_guard::RequestBody<Body>>());
                $body
            }
        }
    }};
}

/// Waits for readiness, then calls: the way a server drives a service.
pub async fn call<S, ReqB, ResB>(svc: &mut S, request: Request<ReqB>) -> Response<ResB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    if poll_fn(|cx| svc.poll_ready(cx)).await.is_err() {
        panic!("service failed to become ready");
    }
    match svc.call(request).await {
        Ok(response) => response,
        Err(_) => panic!("service failed"),
    }
}

/// Drives one call to completion without an executor: every peer answers on the
/// first poll here, so a no-op waker is enough. The caller must be inside a tokio
/// runtime context (`Runtime::enter`): timeouts create tokio timers.
pub fn call_now<S, ReqB, ResB>(svc: &mut S, request: Request<ReqB>) -> Response<ResB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("service not ready at once"),
    }
    let mut future = pin!(svc.call(request));
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(response)) => response,
        Poll::Ready(Err(_)) => panic!("service failed"),
        Poll::Pending => panic!("service did not answer on the first poll"),
    }
}

/// Calls clones of `svc` from `threads` threads at once, `iters` GET requests
/// each, inside the multi-thread runtime of `handle` (`Handle::block_on` on each
/// thread, after a warm-up call and a barrier). Gives the slowest thread's time:
/// with perfect scaling it stays what one thread takes.
pub fn run_threads<S, ResB>(
    handle: &tokio::runtime::Handle,
    svc: &S,
    threads: usize,
    iters: u64,
) -> Duration
where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send,
{
    run_threads_with(
        handle,
        svc,
        threads,
        iters,
        |_thread| Template::new(Scenario::Get),
        |template, _i| template.request(),
    )
}

/// Like [`run_threads`], with requests from a per-thread source: `source(thread)`
/// is built on each thread before the barrier (not timed), and `request(&source,
/// i)` makes the `i`-th request of that thread.
pub fn run_threads_with<S, ResB, R>(
    handle: &tokio::runtime::Handle,
    svc: &S,
    threads: usize,
    iters: u64,
    source: impl Fn(usize) -> R + Sync,
    request: impl Fn(&R, u64) -> Request<Body> + Sync,
) -> Duration
where
    S: Service<Request<Body>, Response = Response<ResB>> + Clone + Send,
{
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|thread| {
                let mut svc = svc.clone();
                let (barrier, source, request) = (&barrier, &source, &request);
                scope.spawn(move || {
                    let from = source(thread);
                    handle.block_on(async {
                        std::hint::black_box(call(&mut svc, request(&from, 0)).await);
                        barrier.wait();
                        let start = std::time::Instant::now();
                        for i in 1..=iters {
                            std::hint::black_box(call(&mut svc, request(&from, i)).await);
                        }
                        start.elapsed()
                    })
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("bench thread"))
            .max()
            .unwrap_or_default()
    })
}

/// The runtime of the single-threaded benchmarks.
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The runtime shared by the threads of the "threads hammering one guard" runs.
pub fn multi_thread_runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Reads a body to its end without an executor (every body here is complete at
/// once), as a server writing the response out would; gives its length. Bounded:
/// a body of more than 64 frames, or one that is not ready, is a harness bug.
pub fn drain<B: HttpBody>(body: B) -> usize {
    let mut body = pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    let mut len = 0;
    for _ in 0..64 {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    len += data.remaining();
                }
            }
            Poll::Ready(Some(Err(_))) => panic!("response body failed"),
            Poll::Ready(None) => return len,
            Poll::Pending => panic!("response body not ready at once"),
        }
    }
    panic!("response body of more than 64 frames");
}

// ---------------------------------------------------------------------------
// Open circuit: requests rejected without calling the upstream.
// ---------------------------------------------------------------------------

/// How long the open-circuit rows stay open: longer than any benchmark.
pub const OPEN_FOR: Duration = Duration::from_secs(3600);

/// An upstream that always answers 503 (to trip a breaker).
pub fn failing<B>() -> impl Upstream<B> {
    tower::service_fn(|_request: Request<B>| {
        let mut response = Response::new(Full::new(Bytes::from_static(b"unavailable")));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        ready(Ok(response))
    })
}

/// A row of the open-circuit table. Every row answers the same GET request
/// without calling the upstream; the response body is read to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenPeer {
    /// Reference: the upstream alone answering 200 (body read too).
    Bare,
    /// upstream-guard whose breaker tripped: `consecutive_failures(1)`, open for
    /// an hour, tripped by one failed call in the setup.
    GuardTripped,
    /// upstream-guard (default config) forced open with
    /// `breaker_handle().force_open()`.
    GuardForcedOpen,
    /// tower-resilience's breaker (over its time limiter) forced open, its
    /// `CircuitBreakerError::OpenCircuit` mapped to a 503 problem+json response
    /// with a static body (tower `MapResult`), as a user of it would.
    ResilienceForcedOpen,
}

impl OpenPeer {
    pub const ALL: [OpenPeer; 4] = [
        OpenPeer::Bare,
        OpenPeer::GuardTripped,
        OpenPeer::GuardForcedOpen,
        OpenPeer::ResilienceForcedOpen,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpenPeer::Bare => "bare_200",
            OpenPeer::GuardTripped => "upstream_guard_tripped",
            OpenPeer::GuardForcedOpen => "upstream_guard_forced_open",
            OpenPeer::ResilienceForcedOpen => "resilience_forced_open_mapped",
        }
    }

    /// The status every call of this row answers with.
    pub fn status(self) -> StatusCode {
        match self {
            OpenPeer::Bare => StatusCode::OK,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks that `response` is the guard's open-circuit rejection.
pub fn assert_guard_rejection<B>(response: &Response<B>) {
    let kind = response
        .extensions()
        .get::<upstream_guard::GuardFailure>()
        .map(upstream_guard::GuardFailure::kind);
    assert_eq!(
        kind,
        Some(upstream_guard::FailureKind::CircuitOpen),
        "not a circuit-open rejection"
    );
}

/// The guard with a breaker that one failure trips, tripped.
pub fn guard_tripped() -> impl Service<
    Request<Body>,
    Response = Response<upstream_guard::ResponseBody<Body>>,
    Error = Infallible,
> + Clone
       + Send {
    let breaker = upstream_guard::BreakerPolicy::consecutive_failures(1)
        .open_for(OPEN_FOR)
        .max_open_for(OPEN_FOR);
    let layer = upstream_guard::UpstreamGuardLayer::builder()
        .circuit_breaker(breaker)
        .build()
        .expect("valid guard config");
    let mut svc = tower::Layer::layer(&layer, failing::<upstream_guard::RequestBody<Body>>());
    let template = Template::new(Scenario::Get);
    let rt = current_thread_runtime();
    let _entered = rt.enter();
    // The upstream's 503 trips the breaker; its retry is denied (circuit open).
    let first = call_now(&mut svc, template.request());
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        first
            .extensions()
            .get::<upstream_guard::GuardFailure>()
            .is_none(),
        "the first call must reach the upstream"
    );
    assert_guard_rejection(&call_now(&mut svc, template.request()));
    svc
}

/// The guard (default config) forced open by an operator.
pub fn guard_forced_open() -> impl Service<
    Request<Body>,
    Response = Response<upstream_guard::ResponseBody<Body>>,
    Error = Infallible,
> + Clone
       + Send {
    let layer = upstream_guard::UpstreamGuardLayer::new();
    layer
        .breaker_handle()
        .expect("a breaker is on by default")
        .force_open();
    tower::Layer::layer(&layer, inner::<upstream_guard::RequestBody<Body>>())
}

/// The body of the 503 a tower-resilience user would map an open circuit to.
const RESILIENCE_PROBLEM: &[u8] = br#"{"type":"urn:example:problem:circuit-open","title":"Service Unavailable","status":503,"detail":"The upstream is failing; the request was not sent."}"#;

type ResilienceResult = Result<
    Response<Body>,
    tower_resilience::circuitbreaker::CircuitBreakerError<
        tower_resilience::timelimiter::TimeLimiterError<Infallible>,
    >,
>;

/// Maps tower-resilience's open-circuit error (and, for completeness, any other
/// error) to a 503 problem+json response. (The error type stays `BoxError`:
/// `MapResult` needs `From` of the inner error for `poll_ready`'s.)
fn resilience_to_response(result: ResilienceResult) -> Result<Response<Body>, tower::BoxError> {
    Ok(result.unwrap_or_else(|_error| {
        let mut response = Response::new(Full::new(Bytes::from_static(RESILIENCE_PROBLEM)));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("3600"));
        response
    }))
}

/// tower-resilience's breaker over its time limiter, forced open, its rejection
/// mapped to a response.
pub fn resilience_forced_open(
) -> impl Service<Request<Body>, Response = Response<Body>, Error = tower::BoxError> + Clone + Send
{
    use futures_util::FutureExt;
    use tower_resilience::circuitbreaker::CircuitBreakerLayer;
    use tower_resilience::timelimiter::{TimeLimiterError, TimeLimiterLayer};
    let breaker = CircuitBreakerLayer::builder()
        .failure_classifier(
            |result: &Result<Response<Body>, TimeLimiterError<Infallible>>| match result {
                Ok(response) => response.status().is_server_error(),
                Err(_) => true,
            },
        )
        .wait_duration_in_open(OPEN_FOR)
        .build()
        .expect("valid breaker config");
    let limiter = TimeLimiterLayer::builder()
        .timeout_duration(ATTEMPT_TIMEOUT)
        .build();
    let svc = tower::Layer::layer(&breaker, tower::Layer::layer(&limiter, inner::<Body>()));
    // An uncontended tokio mutex: ready on the first poll.
    svc.force_open()
        .now_or_never()
        .expect("force_open completes at once");
    tower::ServiceBuilder::new()
        .map_result(resilience_to_response as fn(ResilienceResult) -> _)
        .service(svc)
}

/// Builds `$peer`'s open-circuit service (an [`OpenPeer`]), binds it to `$svc`,
/// and evaluates `$body` with it.
#[allow(unused_macros)] // Not every bench target has an open-circuit scenario.
macro_rules! with_open_peer {
    ($peer:expr, $svc:ident => $body:expr) => {{
        use $crate::support::{
            guard_forced_open, guard_tripped, inner, resilience_forced_open, Body, OpenPeer,
        };
        match $peer {
            OpenPeer::Bare => {
                let $svc = inner::<Body>();
                $body
            }
            OpenPeer::GuardTripped => {
                let $svc = guard_tripped();
                $body
            }
            OpenPeer::GuardForcedOpen => {
                let $svc = guard_forced_open();
                $body
            }
            OpenPeer::ResilienceForcedOpen => {
                let $svc = resilience_forced_open();
                $body
            }
        }
    }};
}

// ---------------------------------------------------------------------------
// Many keys: requests spread over many upstream authorities.
// ---------------------------------------------------------------------------

/// Distinct authorities of the many-keys scenario.
pub const MANY_KEYS: usize = 10_000;

/// `max_keys` of the [`Peer::GuardMaxKeys`] row: above [`MANY_KEYS`].
pub const MANY_KEYS_MAX: usize = 16_384;

/// GET requests (the `get` scenario's head) to `http://host-{i}.test/...`, `i`
/// cycling over `keys` authorities. The URIs are parsed once and shared, as a
/// proxy's routing table would hold them. Build one per thread.
pub struct ManyKeys {
    template: Template,
    uris: Vec<Uri>,
}

impl ManyKeys {
    pub fn new(keys: usize) -> ManyKeys {
        let uris: Vec<Uri> = (0..keys.max(1))
            .map(|i| {
                let uri: Uri = format!("http://host-{i}.test/v1/items/42?include=owner")
                    .parse()
                    .expect("valid uri");
                // Make later copies reference-count bumps (see `Template::new`).
                drop(uri.clone());
                uri
            })
            .collect();
        ManyKeys {
            template: Template::new(Scenario::Get),
            uris,
        }
    }

    pub fn keys(&self) -> usize {
        self.uris.len()
    }

    /// The `i`-th request: to authority `i % keys`.
    pub fn request(&self, i: u64) -> Request<Body> {
        let at = (i % self.uris.len() as u64) as usize;
        self.template.request_to(&self.uris[at])
    }
}

/// A guard over an upstream that always answers 503, with per-authority breakers
/// that one failure trips (`consecutive_failures(1)`, default open period) in a
/// registry of `max_keys`, and no retries: once every key was called, every
/// breaker in the registry is open, as when many upstreams fail at once.
pub fn guard_failing_keys(
    max_keys: usize,
) -> impl Service<
    Request<Body>,
    Response = Response<upstream_guard::ResponseBody<Body>>,
    Error = Infallible,
> + Clone
       + Send {
    let layer = upstream_guard::UpstreamGuardLayer::builder()
        .retry(upstream_guard::RetryPolicy::disabled())
        .circuit_breaker(upstream_guard::BreakerPolicy::consecutive_failures(1).max_keys(max_keys))
        .build()
        .expect("valid guard config");
    tower::Layer::layer(&layer, failing::<upstream_guard::RequestBody<Body>>())
}
