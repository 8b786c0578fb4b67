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

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
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

/// The upstream: a trivial, always-ready `service_fn` answering 200 at once.
pub fn inner<B>() -> impl Service<
    Request<B>,
    Response = Response<Body>,
    Error = Infallible,
    Future = Ready<Result<Response<Body>, Infallible>>,
> + Clone
       + Send
       + Sync
       + 'static {
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
    /// upstream-guard with `Retry::disabled()`: a diagnostic row that shows what
    /// keeping a request replayable costs.
    GuardNoRetry,
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

    pub fn name(self) -> &'static str {
        match self {
            Peer::Bare => "bare",
            Peer::Timeout => "tower_timeout",
            Peer::RetryTimeout => "tower_retry_timeout",
            Peer::ResilienceBreaker => "resilience_breaker_timelimiter",
            Peer::Guard => "upstream_guard",
            Peer::GuardNoRetry => "upstream_guard_no_retry",
        }
    }

    /// Whether this row retries a failed request.
    pub fn retries(self) -> bool {
        matches!(self, Peer::RetryTimeout | Peer::Guard)
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
                    .retry(upstream_guard::Retry::disabled())
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
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let mut svc = svc.clone();
                let barrier = &barrier;
                scope.spawn(move || {
                    let template = Template::new(Scenario::Get);
                    handle.block_on(async {
                        std::hint::black_box(call(&mut svc, template.request()).await);
                        barrier.wait();
                        let start = std::time::Instant::now();
                        for _ in 0..iters {
                            std::hint::black_box(call(&mut svc, template.request()).await);
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
