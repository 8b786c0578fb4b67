//! # A guarded reverse proxy
//!
//! An axum server that forwards requests to several upstream hosts, chosen by
//! path prefix or by `Host`, through one shared hyper-util client wrapped in one
//! [`UpstreamGuardLayer`]. The guard's circuit breaker is keyed per upstream
//! authority, so an upstream that is down gets its own open breaker (and fast
//! `503`s) while the others keep serving.
//!
//! ```sh
//! cargo run --example reverse_proxy -- \
//!     --listen 127.0.0.1:8080 \
//!     --route /api/=http://127.0.0.1:3001/ \
//!     --route shop.local/=http://127.0.0.1:3003 \
//!     --route /=http://127.0.0.1:3002
//! curl -s http://127.0.0.1:8080/_guard/breakers
//! ```
//!
//! It prints `listening on http://ADDR` once it accepts connections (port 0
//! picks a free port) and runs until Ctrl-C. `RUST_LOG=upstream_guard=debug`
//! logs the guard's retries; breaker state changes are logged by default.
//!
//! ## Routes
//!
//! `--route [HOST]PREFIX=URL`, repeatable. A request goes to the route with the
//! longest prefix that matches its path at a segment boundary (`/api` matches
//! `/api` and `/api/x`, not `/apix`), preferring routes whose `HOST` equals the
//! request's `Host` (port ignored). If `URL` has a path (even just `/`), the
//! matched prefix is replaced by it, as nginx's `proxy_pass` does; otherwise the
//! path is forwarded unchanged. No route: `404`.
//!
//! ## What the proxy does to each request
//!
//! The URI and headers are rewritten by the helper every proxy here shares
//! (`examples/common/proxy.rs`, which documents its choices):
//!
//! - removes hop-by-hop headers (`Connection`, `Keep-Alive`, `TE`, `Upgrade`,
//!   `Proxy-Authorization`, …, and every header `Connection` names), in both
//!   directions;
//! - sets `Host` to the upstream's authority, appends the client's IP to
//!   `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto` and
//!   `X-Forwarded-Host`;
//! - streams the request and response bodies (nothing is collected; the guard
//!   buffers only small bodies of known length, so that it can retry them);
//! - answers `/_guard/breakers` itself with the routes and each upstream's
//!   breaker state as JSON (a breaker appears once its upstream got a request).
//!
//! Upgrades (WebSocket) are not proxied.
//!
//! ## gRPC
//!
//! The proxy serves HTTP/1.1 and HTTP/2 without TLS (h2c, prior knowledge) on
//! the same port, so a gRPC client pointed at `http://ADDR` calls through it. A
//! gRPC call (an HTTP/2 `POST` with `content-type: application/grpc`,
//! `…/grpc+proto`, …; not gRPC-Web) goes to its upstream over h2c, with
//! `te: trailers`; every other request goes over HTTP/1.1, from HTTP/2 callers
//! too, so upstreams that speak only HTTP/1.1 keep working for them. The response
//! streams back frame by frame, trailers included: the upstream's own
//! `grpc-status` and `grpc-message`, in the headers or in the trailers, reach
//! the client unchanged. When the upstream fails, the guard answers with a
//! gRPC status (HTTP 200, trailers-only) instead of a problem+json:
//!
//! - `UNAVAILABLE` (14): nothing listens at the upstream, the connection broke
//!   before an answer, or the upstream's breaker is open;
//! - `DEADLINE_EXCEEDED` (4): no answer by the call's deadline. The client's
//!   own deadline (its `grpc-timeout`) wins when it is shorter than
//!   `--deadline-ms`, and the upstream is told what is left of it.
//!
//! The route is chosen by path as for any request (gRPC paths are
//! `/package.Service/Method`), so `--route /=URL` sends every service to `URL`.

#[path = "common/proxy.rs"]
mod proxy;

use std::error::Error;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap};
use axum::http::uri::{Authority, InvalidUri, PathAndQuery, Scheme};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tracing_subscriber::EnvFilter;
use upstream_guard::breaker::BreakerSnapshot;
use upstream_guard::{
    BreakerHandle, BreakerPolicy, RequestBody, UpstreamGuard, UpstreamGuardLayer,
};

use crate::proxy::{Target, UpstreamClient};

const USAGE: &str = "\
usage: reverse_proxy [--listen ADDR] --route [HOST]PREFIX=URL [--route ...]
                     [--attempt-timeout-ms N] [--deadline-ms N]
                     [--breaker-failures N] [--breaker-open-ms N]

  --listen ADDR            where to listen (default 127.0.0.1:8080)
  --route [HOST]PREFIX=URL forward PREFIX (on HOST only, if given) to URL,
                           e.g. /api/=http://127.0.0.1:3001/ or shop.local/=http://127.0.0.1:3003
  --attempt-timeout-ms N   per-attempt timeout (default 5000)
  --deadline-ms N          whole-request deadline (default 15000)
  --breaker-failures N     consecutive failures that open an upstream's breaker (default 5)
  --breaker-open-ms N      how long a breaker stays open (default 5000)";

/// The shared upstream client (HTTP/1.1, and h2c for gRPC calls); the guard
/// hands it the caller's body, or a buffered copy of it when a request may be
/// retried.
type GuardedClient = UpstreamGuard<UpstreamClient<RequestBody<Body>>>;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::parse(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("reverse_proxy: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_tracing();
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("reverse_proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Serves the proxy until Ctrl-C.
async fn run(config: Config) -> Result<(), Box<dyn Error>> {
    let guard = UpstreamGuardLayer::builder()
        .attempt_timeout(config.attempt_timeout)
        .deadline(config.deadline)
        .circuit_breaker(
            BreakerPolicy::consecutive_failures(config.breaker_failures)
                .open_for(config.breaker_open_for)
                .per_authority(),
        )
        .build()?;
    let breakers = guard
        .breaker_handle()
        .ok_or("the guard was built without a circuit breaker")?;
    let client = ServiceBuilder::new()
        .layer(guard)
        .service(UpstreamClient::new(
            &Client::builder(TokioExecutor::new()),
            HttpConnector::new(),
        ));
    let proxy = Arc::new(Proxy {
        routes: config.routes,
        client,
        breakers,
    });
    let app = Router::new()
        .route("/_guard/breakers", get(breakers_json))
        .fallback(forward)
        .with_state(proxy);

    let listener = TcpListener::bind(config.listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("shutting down");
    })
    .await?;
    Ok(())
}

fn init_tracing() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("upstream_guard=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

// ---------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------

/// What every request handler shares.
struct Proxy {
    routes: Vec<Route>,
    client: GuardedClient,
    breakers: BreakerHandle,
}

/// Forwards one request to its upstream. The guard never fails (every upstream
/// failure is already a `502`/`503`/`504` problem+json response), so neither
/// does this.
async fn forward(
    State(gateway): State<Arc<Proxy>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let Some(route) = pick_route(&gateway.routes, &parts.headers, &parts.uri) else {
        return (StatusCode::NOT_FOUND, "no route for this request\n").into_response();
    };
    let Ok(path) = route.upstream_path(&parts.uri) else {
        return cannot_map();
    };
    if proxy::forward_request(&mut parts, &route.target, path, client).is_err() {
        return cannot_map();
    }

    let Ok(response) = gateway
        .client
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await;
    let (mut parts, body) = response.into_parts();
    proxy::forward_response(&mut parts);
    Response::from_parts(parts, Body::new(body))
}

fn cannot_map() -> Response {
    (StatusCode::BAD_REQUEST, "cannot map this path upstream\n").into_response()
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

/// `[HOST]PREFIX=URL`.
#[derive(Clone, Debug)]
struct Route {
    /// Only for requests with this `Host` (lowercase, no port), if set.
    host_match: Option<String>,
    prefix: String,
    /// The upstream.
    target: Target,
    /// Replaces `prefix` in the forwarded path, if the URL had a path.
    rewrite: Option<String>,
    url: String,
}

impl FromStr for Route {
    type Err = String;

    fn from_str(spec: &str) -> Result<Route, String> {
        let (matcher, url) = spec
            .split_once('=')
            .ok_or_else(|| format!("route `{spec}`: expected [HOST]PREFIX=URL"))?;
        let (host_match, prefix) = match matcher.find('/') {
            Some(0) => (None, matcher),
            Some(i) => (Some(matcher[..i].to_ascii_lowercase()), &matcher[i..]),
            None => return Err(format!("route `{spec}`: the prefix must start with `/`")),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("route `{spec}`: bad URL: {e}"))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(format!(
                "route `{spec}`: only http:// upstreams are supported"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("route `{spec}`: the URL needs a host"))?;
        let has_path = url
            .split_once("://")
            .is_some_and(|(_, rest)| rest.contains('/'));
        let target =
            Target::new(authority).map_err(|e| format!("route `{spec}`: bad host: {e}"))?;
        Ok(Route {
            host_match,
            prefix: prefix.to_string(),
            rewrite: has_path.then(|| uri.path().to_string()),
            target,
            url: url.to_string(),
        })
    }
}

impl Route {
    /// Whether `path` is under this route's prefix, at a segment boundary.
    fn matches_path(&self, path: &str) -> bool {
        match path.strip_prefix(&self.prefix) {
            Some(rest) => self.prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    /// The request's path and query for this route's upstream, with the prefix
    /// rewritten.
    fn upstream_path(&self, original: &Uri) -> Result<PathAndQuery, InvalidUri> {
        let path = original.path();
        let path = match (&self.rewrite, path.strip_prefix(&self.prefix)) {
            (Some(base), Some(rest)) => join_path(base, rest),
            _ => path.to_string(),
        };
        let path_and_query = match original.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        PathAndQuery::try_from(path_and_query)
    }
}

/// `base` and `rest` with exactly one `/` between them.
fn join_path(base: &str, rest: &str) -> String {
    let joined = match (base.ends_with('/'), rest.starts_with('/')) {
        (true, true) => format!("{base}{}", &rest[1..]),
        (false, false) if !rest.is_empty() => format!("{base}/{rest}"),
        _ => format!("{base}{rest}"),
    };
    if joined.is_empty() {
        "/".to_string()
    } else {
        joined
    }
}

/// The best route: one for this `Host` before a generic one, then the longest
/// matching prefix.
fn pick_route<'a>(routes: &'a [Route], headers: &HeaderMap, uri: &Uri) -> Option<&'a Route> {
    let host = request_host(headers, uri);
    routes
        .iter()
        .filter(|route| match &route.host_match {
            Some(wanted) => host.as_deref() == Some(wanted.as_str()),
            None => true,
        })
        .filter(|route| route.matches_path(uri.path()))
        .max_by_key(|route| (route.host_match.is_some(), route.prefix.len()))
}

/// The request's host name, lowercase and without a port.
fn request_host(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let raw = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(Authority::as_str))?;
    let authority = Authority::from_str(raw).ok()?;
    Some(authority.host().to_ascii_lowercase())
}

// ---------------------------------------------------------------------------
// /_guard/breakers
// ---------------------------------------------------------------------------

/// The routes, and each upstream's breaker, as JSON.
async fn breakers_json(State(proxy): State<Arc<Proxy>>) -> Json<Value> {
    let routes: Vec<Value> = proxy
        .routes
        .iter()
        .map(|route| {
            json!({
                "host": route.host_match,
                "prefix": route.prefix,
                "upstream": route.url,
            })
        })
        .collect();
    let breakers: serde_json::Map<String, Value> = proxy
        .breakers
        .snapshots()
        .into_iter()
        .map(|(key, snapshot)| (key, snapshot_json(&snapshot)))
        .collect();
    Json(json!({ "routes": routes, "breakers": breakers }))
}

fn snapshot_json(snapshot: &BreakerSnapshot) -> Value {
    json!({
        "state": snapshot.state.as_str(),
        "consecutive_failures": snapshot.consecutive_failures,
        "trips": snapshot.trips,
        "until_half_open_ms": snapshot.until_half_open.map(|d| d.as_millis() as u64),
        "in_flight": snapshot.in_flight,
    })
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

struct Config {
    listen: SocketAddr,
    routes: Vec<Route>,
    attempt_timeout: Duration,
    deadline: Duration,
    breaker_failures: u32,
    breaker_open_for: Duration,
}

impl Config {
    /// The configuration, or `None` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Config>, String> {
        let mut config = Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            routes: Vec::new(),
            attempt_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(15),
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(5),
        };
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            if flag == "--help" || flag == "-h" {
                return Ok(None);
            }
            let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--listen" => config.listen = parse(&flag, &value()?)?,
                "--route" => config.routes.push(value()?.parse()?),
                "--attempt-timeout-ms" => config.attempt_timeout = millis(&flag, &value()?)?,
                "--deadline-ms" => config.deadline = millis(&flag, &value()?)?,
                "--breaker-failures" => config.breaker_failures = parse(&flag, &value()?)?,
                "--breaker-open-ms" => config.breaker_open_for = millis(&flag, &value()?)?,
                _ => return Err(format!("unknown flag {flag}")),
            }
        }
        if config.routes.is_empty() {
            return Err("at least one --route is needed".to_string());
        }
        Ok(Some(config))
    }
}

fn parse<T: FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: cannot parse `{value}`"))
}

fn millis(flag: &str, value: &str) -> Result<Duration, String> {
    parse(flag, value).map(Duration::from_millis)
}
