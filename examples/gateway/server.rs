//! The reverse proxy itself (guarded, or with `--no-guard` not), the server
//! that runs it, and proxy mode.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::uri::Authority;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::{Layer, ServiceExt};
use upstream_guard::observe::NoopObserver;
use upstream_guard::{RequestBody, UpstreamGuard};

use crate::guard::{BreakerKeys, GuardSettings};
use crate::proxy::{self, Target};
use crate::Failure;

/// How long a stopping gateway waits for in-flight requests to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The header the demo gateway uses to pick the upstream that is down.
pub const UPSTREAM_SWITCH: &str = "x-demo-upstream";

/// The client that talks to upstreams, over whatever body it is handed.
type UpstreamClient<B> = Client<HttpConnector, B>;

/// The one place the upstream client is configured, so that the guarded and
/// the unguarded proxy connect, pool and speak exactly alike.
pub fn upstream_client<B>() -> UpstreamClient<B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// What sends a forwarded request upstream.
#[derive(Clone, Debug)]
pub enum Forwarder {
    /// Through the guard; every failure is already a problem+json response.
    Guarded(UpstreamGuard<UpstreamClient<RequestBody<Body>>>),
    /// Straight to the client (`--no-guard`): a failure is the proxy's own
    /// plain-text `502`.
    Plain(UpstreamClient<Body>),
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

    pub fn plain() -> Forwarder {
        Forwarder::Plain(upstream_client())
    }

    /// Sends `request` and returns what to answer; never fails.
    async fn send(&self, request: Request<Body>) -> Response<Body> {
        match self {
            Forwarder::Guarded(client) => {
                // The guard's error type is `Infallible`.
                let Ok(response) = client.clone().oneshot(request).await;
                response.map(Body::new)
            }
            Forwarder::Plain(client) => match client.request(request).await {
                Ok(response) => response.map(Body::new),
                Err(error) => {
                    tracing::warn!("upstream call failed: {error}");
                    plain_response(StatusCode::BAD_GATEWAY, "bad gateway\n")
                }
            },
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
    fn pick(&self, headers: &mut HeaderMap) -> &Route {
        let alternate = headers
            .get(UPSTREAM_SWITCH)
            .and_then(|value| self.alternates.iter().find(|(name, _)| value == name));
        match alternate {
            Some((_, route)) => {
                headers.remove(UPSTREAM_SWITCH);
                route
            }
            None => &self.default,
        }
    }
}

/// The gateway: every request, whatever its path or method, is proxied.
pub fn gateway_router(routes: Routes) -> Router {
    Router::new().fallback(forward).with_state(Arc::new(routes))
}

/// Forwards one request (the shared helper in `examples/common/proxy.rs` does
/// the URI and the headers). A failed upstream call is already a response, so
/// this never fails.
async fn forward(
    State(routes): State<Arc<Routes>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request<Body>,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let route = routes.pick(&mut parts.headers);
    let path_and_query = proxy::path_and_query(&parts.uri);
    if let Err(error) = proxy::forward_request(&mut parts, &route.target, path_and_query, client) {
        return plain_response(StatusCode::BAD_REQUEST, &format!("{error}\n"));
    }
    let response = route.forwarder.send(Request::from_parts(parts, body)).await;
    let (mut parts, body) = response.into_parts();
    proxy::forward_response(&mut parts);
    Response::from_parts(parts, body)
}

fn plain_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(text.to_owned()));
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
    task: JoinHandle<io::Result<()>>,
}

impl Server {
    /// Binds `listen` and serves `app` on it in the background; handlers see
    /// the caller's address (for the forwarding headers).
    pub async fn start(listen: SocketAddr, app: Router) -> Result<Server, Failure> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| Failure::runtime(&format!("cannot listen on {listen}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::runtime("cannot read the bound address", e))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move { serve.await });
        Ok(Server { addr, stop, task })
    }

    /// Stops accepting, and gives in-flight requests [`DRAIN_TIMEOUT`] to finish.
    pub async fn stop(self) -> Result<(), Failure> {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(Failure::runtime("the gateway failed", error)),
            Ok(Err(error)) => Err(Failure::runtime("the gateway task failed", error)),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}");
                task.abort();
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Proxy mode
// ---------------------------------------------------------------------------

/// Serves the proxy in front of `upstream` until Ctrl-C or SIGTERM: guarded by
/// `settings`, or (`guarded == false`) the same proxy without the guard.
pub async fn run_proxy(
    settings: &GuardSettings,
    listen: SocketAddr,
    upstream: Authority,
    guarded: bool,
) -> Result<(), Failure> {
    let forwarder = match guarded {
        true => Forwarder::guarded(settings, &upstream)?,
        false => Forwarder::plain(),
    };
    let route = Route::new(upstream, forwarder)?;
    let server = Server::start(listen, gateway_router(Routes::single(route))).await?;
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
