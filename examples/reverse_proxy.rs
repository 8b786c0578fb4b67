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
//! - removes hop-by-hop headers (`Connection`, `Keep-Alive`, `TE`, `Upgrade`, …,
//!   and every header `Connection` names), in both directions;
//! - sets `Host` to the upstream's authority, appends the client's IP to
//!   `X-Forwarded-For`, and sets `X-Forwarded-Proto` and `X-Forwarded-Host`;
//! - streams the request and response bodies (nothing is collected; the guard
//!   buffers only small bodies of known length, so that it can retry them);
//! - answers `/_guard/breakers` itself with the routes and each upstream's
//!   breaker state as JSON (a breaker appears once its upstream got a request).
//!
//! Upgrades (WebSocket) are not proxied.

use std::error::Error;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{StatusCode, Uri, Version};
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

/// The shared upstream client; the guard hands it the caller's body, or a
/// buffered copy of it when a request may be retried.
type UpstreamClient = UpstreamGuard<Client<HttpConnector, RequestBody<Body>>>;

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
        .service(Client::builder(TokioExecutor::new()).build_http());
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
    client: UpstreamClient,
    breakers: BreakerHandle,
}

/// Forwards one request to its upstream. The guard never fails (every upstream
/// failure is already a `502`/`503`/`504` problem+json response), so neither
/// does this.
async fn forward(
    State(proxy): State<Arc<Proxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let Some(route) = pick_route(&proxy.routes, &parts.headers, &parts.uri) else {
        return (StatusCode::NOT_FOUND, "no route for this request\n").into_response();
    };
    let Ok(uri) = route.upstream_uri(&parts.uri) else {
        return (StatusCode::BAD_REQUEST, "cannot map this path upstream\n").into_response();
    };
    let original_host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| a.as_str().parse().ok()));

    strip_hop_by_hop(&mut parts.headers);
    set_forwarded(&mut parts.headers, peer, original_host);
    parts.headers.insert(header::HOST, route.host.clone());
    parts.uri = uri;
    parts.version = Version::HTTP_11;

    let Ok(response) = proxy
        .client
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The upstream's HTTP version is its own connection's business, not ours.
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, Body::new(body))
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including every header `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_str(token.trim()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP.map(HeaderName::from_static)) {
        headers.remove(name);
    }
}

/// Appends the client to `X-Forwarded-For`; sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host`.
fn set_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: Option<HeaderValue>) {
    const FOR: &str = "x-forwarded-for";
    let client = peer.ip().to_string();
    let chain = match headers.get(FOR).and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client,
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(FOR, value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    match host {
        Some(host) => headers.insert("x-forwarded-host", host),
        None => headers.remove("x-forwarded-host"),
    };
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
    authority: Authority,
    /// Replaces `prefix` in the forwarded path, if the URL had a path.
    rewrite: Option<String>,
    /// The upstream's `Host` header.
    host: HeaderValue,
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
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| format!("route `{spec}`: bad host: {e}"))?;
        Ok(Route {
            host_match,
            prefix: prefix.to_string(),
            rewrite: has_path.then(|| uri.path().to_string()),
            authority,
            host,
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

    /// The request's URI on this route's upstream, with the prefix rewritten.
    fn upstream_uri(&self, original: &Uri) -> Result<Uri, axum::http::Error> {
        let path = original.path();
        let path = match (&self.rewrite, path.strip_prefix(&self.prefix)) {
            (Some(base), Some(rest)) => join_path(base, rest),
            _ => path.to_string(),
        };
        let path_and_query = match original.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(path_and_query)?)
            .build()
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
