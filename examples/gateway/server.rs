//! The reverse proxy itself (guarded, or with `--no-guard` not), the server
//! that runs it, and proxy mode.
//!
//! The proxy is a plain hyper service, one per connection: every request is
//! forwarded whatever its path or method, so there is nothing to route, and
//! each connection keeps its own copy of the forwarders (see [`Connection`]).
//!
//! Each connection is HTTP/1.1 or HTTP/2 without TLS (h2c, prior knowledge),
//! as the caller opens it, so gRPC clients call through the proxy. A gRPC call
//! (over HTTP/2) goes upstream over h2c, every other request over HTTP/1.1 (the
//! shared helper's rule, `examples/common/proxy.rs`), and the response streams back
//! with its trailers: the upstream's own `grpc-status` reaches the caller
//! unchanged, and the guard answers a failed call with a trailers-only
//! `UNAVAILABLE` (refused, reset, circuit open) or `DEADLINE_EXCEEDED` (no
//! answer by the call's `grpc-timeout` or the guard's deadline).

use std::convert::Infallible;
use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{self as client, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::util::Oneshot;
use tower::{Layer, Service, ServiceExt};
use upstream_guard::endpoints::Endpoints;
use upstream_guard::observe::NoopObserver;
use upstream_guard::{BoxError, RequestBody, ResponseBody, UpstreamGuard};

use crate::guard::{BreakerKeys, GuardSettings};
use crate::proxy::{self, Target, UpstreamClient};
use crate::Failure;

/// How long a stopping gateway waits for in-flight requests to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server pauses after a failed `accept` (out of file
/// descriptors, say) before it tries again, rather than spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The header the demo gateway uses to pick the upstream that is down.
pub const UPSTREAM_SWITCH: &str = "x-demo-upstream";

/// The guarded client, as every route's guarded forwarder holds it.
type GuardedClient = UpstreamGuard<UpstreamClient<RequestBody<Incoming>>>;

/// Replicas of one upstream (`--upstream` more than once), each behind its own
/// breaker, inside one guard.
type Replicas = Endpoints<UpstreamClient<RequestBody<Incoming>>>;
type GuardedReplicas = UpstreamGuard<Replicas>;

/// The one place the upstream client is configured, so that the guarded and
/// the unguarded proxy connect, pool and speak exactly alike: HTTP/1.1, and
/// h2c for gRPC calls (the shared [`UpstreamClient`]).
pub fn upstream_client<B>() -> UpstreamClient<B>
where
    B: Body + Send,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    UpstreamClient::new(&Client::builder(TokioExecutor::new()), connector)
}

/// What sends a forwarded request upstream.
#[derive(Clone, Debug)]
pub enum Forwarder {
    /// Through the guard; every failure is already a problem+json response.
    Guarded(GuardedClient),
    /// Through the guard to one of several replicas.
    Replicas(GuardedReplicas),
    /// Straight to the client (`--no-guard`): a failure is the proxy's own
    /// plain-text `502`.
    Plain(UpstreamClient<Incoming>),
}

impl Forwarder {
    /// The guarded forwarder for `settings`, reporting to no one.
    pub fn guarded(settings: &GuardSettings, upstream: &Authority) -> Result<Forwarder, Failure> {
        let layer = settings.layer(
            settings.retry(),
            BreakerKeys::PerUpstream,
            upstream.as_str(),
            NoopObserver,
        )?;
        Ok(Forwarder::Guarded(layer.layer(upstream_client())))
    }

    /// The guarded forwarder to replicas of one upstream: the guard's breaker
    /// is the whole upstream's (named after the first replica), and each
    /// replica has one of its own.
    pub fn replicas(
        settings: &GuardSettings,
        upstreams: &[Authority],
    ) -> Result<Forwarder, Failure> {
        let name = upstreams.first().map_or("upstream", Authority::as_str);
        let layer = settings.layer(
            settings.retry(),
            BreakerKeys::PerUpstream,
            name,
            NoopObserver,
        )?;
        let replicas = settings.replicas(upstream_client(), upstreams)?;
        Ok(Forwarder::Replicas(layer.layer(replicas)))
    }

    pub fn plain() -> Forwarder {
        Forwarder::Plain(upstream_client())
    }

    /// Sends `request`; what the returned [`Sending`] resolves to is the answer.
    fn send(&mut self, request: Request<Incoming>) -> Sending {
        match self {
            Forwarder::Guarded(guard) => send_guarded(
                guard,
                request,
                |future| Sending::Guarded { future },
                |future| Sending::GuardedWhenReady { future },
            ),
            Forwarder::Replicas(guard) => send_guarded(
                guard,
                request,
                |future| Sending::Replicas { future },
                |future| Sending::ReplicasWhenReady { future },
            ),
            Forwarder::Plain(client) => Sending::Plain {
                future: client.request(request),
            },
        }
    }
}

/// Sends through a guard, called in place, not on a clone: the guard keeps its
/// breaker key from the last call. The hyper-util client is always ready, and
/// so the guard is; should that ever change, a clone waits for readiness
/// instead.
fn send_guarded<S>(
    guard: &mut UpstreamGuard<S>,
    request: Request<Incoming>,
    now: fn(upstream_guard::ResponseFuture<S, Incoming>) -> Sending,
    when_ready: fn(Oneshot<UpstreamGuard<S>, Request<Incoming>>) -> Sending,
) -> Sending
where
    S: Service<Request<RequestBody<Incoming>>, Response = Response<Incoming>> + Clone,
    S::Error: Into<BoxError>,
{
    let mut cx = Context::from_waker(Waker::noop());
    match guard.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => now(guard.call(request)),
        Poll::Pending => when_ready(guard.clone().oneshot(request)),
    }
}

pin_project! {
    /// A request on its way upstream, or already answered: the future a
    /// connection's service returns. A future of its own rather than an `async`
    /// block: the guard's response future is large (about 1.5 KB), and an
    /// `async` block would move it once more on its way to hyper.
    #[project = SendingProj]
    enum Sending {
        Guarded { #[pin] future: upstream_guard::ResponseFuture<UpstreamClient<RequestBody<Incoming>>, Incoming> },
        GuardedWhenReady { #[pin] future: Oneshot<GuardedClient, Request<Incoming>> },
        Replicas { #[pin] future: upstream_guard::ResponseFuture<Replicas, Incoming> },
        ReplicasWhenReady { #[pin] future: Oneshot<GuardedReplicas, Request<Incoming>> },
        Plain { #[pin] future: client::ResponseFuture },
        Answered { response: Option<Response<GatewayBody>> },
    }
}

impl Future for Sending {
    type Output = Result<Response<GatewayBody>, Infallible>;

    /// The upstream's response, or what to answer instead, with the
    /// response's headers rewritten for the caller; never fails.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.project() {
            // The guard's error type is `Infallible`.
            SendingProj::Guarded { future } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => response.map(GatewayBody::guarded),
            },
            SendingProj::GuardedWhenReady { future } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => response.map(GatewayBody::guarded),
            },
            SendingProj::Replicas { future } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => response.map(GatewayBody::guarded),
            },
            SendingProj::ReplicasWhenReady { future } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => response.map(GatewayBody::guarded),
            },
            SendingProj::Plain { future } => match std::task::ready!(future.poll(cx)) {
                Ok(response) => response.map(GatewayBody::plain),
                Err(error) => {
                    tracing::warn!("upstream call failed: {error}");
                    plain_response(StatusCode::BAD_GATEWAY, "bad gateway\n")
                }
            },
            // Polled again after it answered: answer again rather than panic.
            SendingProj::Answered { response } => response.take().unwrap_or_else(|| {
                plain_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "polled after completion\n",
                )
            }),
        };
        let (mut parts, body) = response.into_parts();
        proxy::forward_response(&mut parts);
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}

pin_project! {
    /// What the gateway answers with: the upstream's body (through the guard, or
    /// not), or a short text of its own. An enum rather than a boxed body: no
    /// allocation per response.
    #[project = GatewayBodyProj]
    pub enum GatewayBody {
        Guarded { #[pin] body: ResponseBody<Incoming> },
        Plain { #[pin] body: Incoming },
        Own { #[pin] body: Full<Bytes> },
    }
}

impl GatewayBody {
    fn guarded(body: ResponseBody<Incoming>) -> GatewayBody {
        GatewayBody::Guarded { body }
    }

    fn plain(body: Incoming) -> GatewayBody {
        GatewayBody::Plain { body }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            GatewayBodyProj::Guarded { body } => body.poll_frame(cx),
            GatewayBodyProj::Plain { body } => body.poll_frame(cx).map_err(Into::into),
            GatewayBodyProj::Own { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            GatewayBody::Guarded { body } => body.is_end_stream(),
            GatewayBody::Plain { body } => body.is_end_stream(),
            GatewayBody::Own { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            GatewayBody::Guarded { body } => body.size_hint(),
            GatewayBody::Plain { body } => body.size_hint(),
            GatewayBody::Own { body } => body.size_hint(),
        }
    }
}

/// One upstream the gateway can forward to.
#[derive(Clone, Debug)]
pub struct Route {
    target: Target,
    forwarder: Forwarder,
}

impl Route {
    pub fn new(authority: Authority, forwarder: Forwarder) -> Result<Route, Failure> {
        let target = Target::new(authority.clone())
            .map_err(|e| Failure::runtime(&format!("bad upstream host `{authority}`"), e))?;
        Ok(Route { target, forwarder })
    }
}

/// Where requests go: the default upstream, or an alternate one named in the
/// [`UPSTREAM_SWITCH`] header (only the demo configures alternates).
#[derive(Clone, Debug)]
pub struct Routes {
    pub default: Route,
    pub alternates: Vec<(&'static str, Route)>,
}

impl Routes {
    pub fn single(route: Route) -> Routes {
        Routes {
            default: route,
            alternates: Vec::new(),
        }
    }

    /// Picks the route for a request; a switch header naming an alternate is
    /// consumed here and never forwarded.
    fn pick(&mut self, headers: &mut HeaderMap) -> &mut Route {
        let alternate = headers
            .get(UPSTREAM_SWITCH)
            .and_then(|value| self.alternates.iter().position(|(name, _)| value == name));
        match alternate {
            Some(index) => {
                headers.remove(UPSTREAM_SWITCH);
                &mut self.alternates[index].1
            }
            None => &mut self.default,
        }
    }
}

/// One connection's proxy: the caller, and the connection's own copy of the
/// routes. Its own copy, so that requests call their forwarder in place
/// through `&mut` (hyper calls a service through `&self`, hence the mutex,
/// never contended: it is held only while a request is handed over), rather
/// than on a clone per request. A clone made for one request and dropped would
/// cost atomic reference counting on the client's shared parts, and would throw
/// away the guard's cache of its breaker key, looked up anew every time.
struct Connection {
    routes: Mutex<Routes>,
    caller: SocketAddr,
}

impl Connection {
    fn new(routes: &Routes, caller: SocketAddr) -> Connection {
        Connection {
            routes: Mutex::new(routes.clone()),
            caller,
        }
    }

    /// Forwards one request (the shared helper in `examples/common/proxy.rs`
    /// does the URI and the headers): rewrites it for its upstream and hands it
    /// to the forwarder. A request that cannot be forwarded is answered `400`
    /// at once, and a failed upstream call is already a response, so this never
    /// fails.
    fn forward(&self, request: Request<Incoming>) -> Sending {
        // Nothing panics while the lock is held, but a poisoned lock would be
        // harmless anyway: the routes hold no invariant a panic could break.
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut parts, body) = request.into_parts();
        let route = routes.pick(&mut parts.headers);
        let path_and_query = proxy::path_and_query(&parts.uri);
        if let Err(error) =
            proxy::forward_request(&mut parts, &route.target, path_and_query, self.caller)
        {
            let response = plain_response(StatusCode::BAD_REQUEST, &format!("{error}\n"));
            return Sending::Answered {
                response: Some(response),
            };
        }
        route.forwarder.send(Request::from_parts(parts, body))
    }
}

fn plain_response(status: StatusCode, text: &str) -> Response<GatewayBody> {
    let body = Full::new(Bytes::from(text.to_owned()));
    let mut response = Response::new(GatewayBody::Own { body });
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A running gateway server, stopped with [`Server::stop`].
pub struct Server {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `listen` and serves the proxy for `routes` on it in the background.
    pub async fn start(listen: SocketAddr, routes: Routes) -> Result<Server, Failure> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| Failure::runtime(&format!("cannot listen on {listen}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::runtime("cannot read the bound address", e))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, routes, stopped));
        Ok(Server { addr, stop, task })
    }

    /// Stops accepting, and gives in-flight requests [`DRAIN_TIMEOUT`] to finish.
    pub async fn stop(self) -> Result<(), Failure> {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(Failure::runtime("the gateway task failed", error)),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}");
                task.abort();
                Ok(())
            }
        }
    }
}

/// Accepts connections until `stopped`, then lets the open ones finish what
/// they are doing (idle ones close at once).
async fn serve(listener: TcpListener, routes: Routes, mut stopped: oneshot::Receiver<()>) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, caller)) => serve_connection(stream, caller, &routes, &graceful),
                Err(error) => {
                    tracing::warn!("accept failed: {error}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = &mut stopped => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one connection in its own task: HTTP/1.1, or HTTP/2 with prior
/// knowledge.
fn serve_connection(
    stream: TcpStream,
    caller: SocketAddr,
    routes: &Routes,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let connection = Connection::new(routes, caller);
    let service = service_fn(move |request| connection.forward(request));
    let serving = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let serving = graceful.watch(serving);
    tokio::spawn(async move {
        if let Err(error) = serving.await {
            tracing::debug!("connection from {caller} ended: {error}");
        }
    });
}

// ---------------------------------------------------------------------------
// Proxy mode
// ---------------------------------------------------------------------------

/// Serves the proxy in front of `upstreams` (one, or replicas of one) until
/// Ctrl-C or SIGTERM: guarded by `settings`, or (`guarded == false`, one
/// upstream only) the same proxy without the guard.
pub async fn run_proxy(
    settings: &GuardSettings,
    listen: SocketAddr,
    upstreams: Vec<Authority>,
    guarded: bool,
) -> Result<(), Failure> {
    let Some(first) = upstreams.first().cloned() else {
        return Err(Failure::Runtime("no upstream to proxy to".into()));
    };
    let forwarder = match (guarded, upstreams.len()) {
        (true, 1) => Forwarder::guarded(settings, &first)?,
        (true, _) => Forwarder::replicas(settings, &upstreams)?,
        (false, 1) => Forwarder::plain(),
        (false, _) => {
            return Err(Failure::Runtime(
                "--no-guard proxies to one --upstream only (replicas need the guard)".into(),
            ))
        }
    };
    // Requests carry the first replica's name (URI and Host); `Endpoints` puts
    // in the replica's address for each attempt.
    let route = Route::new(first, forwarder)?;
    let server = Server::start(listen, Routes::single(route)).await?;
    announce(server.addr).map_err(|e| Failure::runtime("cannot write to stdout", e))?;
    let signal = shutdown_signal().await;
    eprintln!("shutting down");
    server.stop().await?;
    signal.map_err(|e| Failure::runtime("cannot listen for shutdown signals", e))
}

/// Tells whoever started us (a person, a script, a test) that we are ready.
fn announce(addr: SocketAddr) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "listening on http://{addr}")?;
    out.flush()
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() -> io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
