//! A guarded reverse proxy: an axum gateway that forwards every request to an
//! upstream through a hyper-util client wrapped in [`UpstreamGuardLayer`].
//!
//! The guard gives each attempt a timeout, the whole request a deadline, retries
//! what is safe to retry (within a retry budget), stops calling an upstream that
//! keeps failing (circuit breaker), and turns every failure into a
//! `502`/`503`/`504` `application/problem+json` response, so the gateway never
//! hangs and never answers with an empty or broken response.
//!
//! # Demo mode
//!
//! ```text
//! cargo run --example gateway
//! ```
//!
//! Starts the fault-injecting upstream from `tests/support/upstream.rs` and a
//! guarded gateway in front of it (both on `127.0.0.1`), then sends a few hundred
//! requests through the gateway over real HTTP, spread over about eight seconds:
//!
//! | scenario    | upstream behaviour                   | what the guard does                         |
//! |-------------|--------------------------------------|---------------------------------------------|
//! | `healthy`   | `/ok` answers at once                | passes every `200` through                  |
//! | `slow`      | `/slow/{ms}`, below the timeout      | passes every `200` through                  |
//! | `hanging`   | `/hang` never answers                | `504` when time runs out; opens: `503`      |
//! | `resetting` | `/reset` resets the connection       | retries, `502`; opens: `503`                |
//! | `down`      | refused until halfway, then `200`    | `502`; opens: `503`; probes, closes: `200`  |
//! | `flaky`     | `/flaky/2/{key}`: two 503s, then 200 | retries until the `200` arrives             |
//!
//! It prints one row per scenario (responses per status, the guard's problem
//! types, attempts per request, p50/p99 latency), then the circuit breakers'
//! timeline: the `down` upstream starts listening halfway through (on the very
//! port that refused until then), and its breaker goes closed → open →
//! half-open → … → closed. It exits after about ten seconds.
//!
//! The report is meant for people, but it is also read by `tests/gateway_demo.rs`,
//! which checks the story above. Its cells are separated by at least two spaces
//! and never hold two spaces in a row (nor are they empty), so a line splits into
//! its cells on runs of two or more spaces: a scenario row into its eight
//! columns, with responses written `STATUS×COUNT` (`err×N`: no answer), and a
//! timeline line into time, breaker and event (`FROM → TO …`).
//!
//! # Proxy mode
//!
//! ```text
//! cargo run --example gateway -- --listen 127.0.0.1:8080 --upstream http://127.0.0.1:3000
//! ```
//!
//! Runs the same guarded proxy until Ctrl-C (or SIGTERM). It prints
//! `listening on http://ADDR` once it accepts connections (port 0 picks a free
//! port). Run with `--help` for every flag; `RUST_LOG=upstream_guard=debug` logs
//! the guard's retries, with their request spans, on stderr.

#[path = "../../tests/support/upstream.rs"]
mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{Request, Response, StatusCode, Uri, Version};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tower::{Layer, ServiceExt};
use tracing_subscriber::EnvFilter;
use upstream_guard::observe::{
    AttemptEvent, CircuitEvent, NoopObserver, RetryDeniedEvent, RetryEvent,
};
use upstream_guard::{
    BreakerPolicy, ConfigError, Observer, RequestBody, RetryPolicy, UpstreamGuard,
    UpstreamGuardLayer,
};

use crate::upstream::{ReservedPort, Upstream};

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

/// Default per-attempt timeout (`--attempt-timeout-ms`).
const DEFAULT_ATTEMPT_TIMEOUT_MS: u64 = 300;
/// Default overall deadline (`--deadline-ms`).
const DEFAULT_DEADLINE_MS: u64 = 1_000;
/// Default attempts per request, the first included (`--max-attempts`).
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default failures in a row that open a circuit (`--failure-threshold`).
const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// Default time a circuit stays open before a probe (`--open-ms`); each failed
/// probe doubles it, up to [`MAX_OPEN_FACTOR`] times.
const DEFAULT_OPEN_MS: u64 = 1_000;
const MAX_OPEN_FACTOR: u32 = 2;
/// Backoff between attempts: full jitter, from this base...
const BACKOFF_BASE: Duration = Duration::from_millis(10);
/// ...doubling up to this cap.
const BACKOFF_MAX: Duration = Duration::from_millis(100);
/// How long a stopping gateway waits for in-flight requests to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The header the demo gateway uses to pick the upstream that is down.
const UPSTREAM_SWITCH: &str = "x-demo-upstream";

const USAGE: &str = "\
usage: gateway [OPTIONS]
       gateway --listen ADDR --upstream URL [OPTIONS]

Without --listen/--upstream, runs a self-contained demo (about 10 s): a fault-injecting
upstream, a guarded gateway in front of it, and a few hundred requests through it.
With them, runs the guarded reverse proxy in front of URL until Ctrl-C.

options:
  --listen ADDR              address to serve on, e.g. 127.0.0.1:8080 (port 0 picks one)
  --upstream URL             upstream to proxy to, http only, e.g. http://127.0.0.1:3000
  --attempt-timeout-ms N     per-attempt timeout for response headers [default: 300]
  --deadline-ms N            deadline for the whole request, retries included [default: 1000]
  --max-attempts N           attempts per request, the first included (1 = no retries) [default: 3]
  --failure-threshold N      circuit breaker: failures in a row that open it [default: 5]
  --open-ms N                circuit breaker: how long it stays open before a probe [default: 1000]
  -h, --help                 print this help

Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=upstream_guard=debug) for more.
";

/// What the guard is configured with; the same in both modes.
#[derive(Clone, Copy, Debug)]
struct GuardSettings {
    attempt_timeout: Duration,
    deadline: Duration,
    max_attempts: u32,
    failure_threshold: u32,
    open_for: Duration,
}

impl Default for GuardSettings {
    fn default() -> Self {
        GuardSettings {
            attempt_timeout: Duration::from_millis(DEFAULT_ATTEMPT_TIMEOUT_MS),
            deadline: Duration::from_millis(DEFAULT_DEADLINE_MS),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            open_for: Duration::from_millis(DEFAULT_OPEN_MS),
        }
    }
}

/// How one guard groups requests into circuit breakers.
#[derive(Clone, Copy, Debug)]
enum BreakerKeys {
    /// One breaker per upstream authority (the library's default).
    PerUpstream,
    /// One breaker per first path segment (`/reset/...` → `reset`): the demo's
    /// fault upstream serves every scenario, and a failing route must not open
    /// the circuit of a healthy one.
    PerRoute,
}

impl GuardSettings {
    /// The retry policy: `max_attempts`, a short backoff, the default budget.
    fn retry(&self) -> RetryPolicy {
        RetryPolicy::default()
            .max_attempts(self.max_attempts)
            .backoff(BACKOFF_BASE, BACKOFF_MAX)
    }

    /// The circuit breaker: `failure_threshold` failures in a row open it for
    /// `open_for`, doubling on each failed probe up to [`MAX_OPEN_FACTOR`] times.
    fn breaker(&self, keys: BreakerKeys) -> BreakerPolicy {
        let breaker = BreakerPolicy::consecutive_failures(self.failure_threshold)
            .open_for(self.open_for)
            .max_open_for(self.open_for.saturating_mul(MAX_OPEN_FACTOR));
        match keys {
            BreakerKeys::PerUpstream => breaker.per_authority(),
            BreakerKeys::PerRoute => breaker.per_key(|request: &http::request::Parts| {
                request.uri.path().trim_start_matches('/').split('/').next()
            }),
        }
    }

    /// Builds a guard layer for one upstream. Invalid settings come back as a
    /// [`ConfigError`] that names the offending field.
    fn layer(
        &self,
        retry: RetryPolicy,
        keys: BreakerKeys,
        upstream_name: &str,
        observer: impl Observer,
    ) -> Result<UpstreamGuardLayer, ConfigError> {
        UpstreamGuardLayer::builder()
            .attempt_timeout(self.attempt_timeout)
            .deadline(self.deadline)
            .retry(retry)
            .circuit_breaker(self.breaker(keys))
            .upstream_name(upstream_name)
            .observer(observer)
            .build()
    }
}

/// Everything the command line asks for.
#[derive(Debug)]
struct Options {
    mode: Mode,
    guard: GuardSettings,
}

#[derive(Debug)]
enum Mode {
    Demo,
    Proxy {
        listen: SocketAddr,
        upstream: Authority,
    },
}

/// What the command line asks the program to do.
#[derive(Debug)]
enum Command {
    Help,
    Run(Options),
}

/// Why the program stops early; each maps to an exit code.
#[derive(Debug)]
enum Failure {
    /// A bad command line: exit code 2, with the usage text.
    Usage(String),
    /// A guard setting the builder rejected: exit code 2.
    Config(ConfigError),
    /// Anything that went wrong while running: exit code 1.
    Runtime(String),
}

impl Failure {
    fn runtime(what: &str, error: impl fmt::Display) -> Failure {
        Failure::Runtime(format!("{what}: {error}"))
    }

    fn report(&self) -> ExitCode {
        match self {
            Failure::Usage(message) => {
                eprintln!("error: {message}\n\n{USAGE}");
                ExitCode::from(2)
            }
            Failure::Config(error) => {
                eprintln!("error: {error}");
                ExitCode::from(2)
            }
            Failure::Runtime(message) => {
                eprintln!("error: {message}");
                ExitCode::FAILURE
            }
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Self {
        Failure::Config(error)
    }
}

// ---------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(failure) => return failure.report(),
    };
    // The demo prints its own circuit timeline; its breaker warnings would only
    // repeat it. Either way RUST_LOG decides.
    init_tracing(match options.mode {
        Mode::Demo => "error",
        Mode::Proxy { .. } => "warn",
    });
    let result = match options.mode {
        Mode::Demo => run_demo(&options.guard).await,
        Mode::Proxy { listen, upstream } => run_proxy(&options.guard, listen, upstream).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// Logs and spans go to stderr, filtered by `RUST_LOG` (default: `default`).
fn init_tracing(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// Parses the arguments (without the program name). Accepts `--flag value` and
/// `--flag=value`.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, Failure> {
    let mut args = args.into_iter();
    let mut guard = GuardSettings::default();
    let mut listen = None;
    let mut upstream = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = split_flag(arg);
        if flag == "-h" || flag == "--help" {
            return Ok(Command::Help);
        }
        let mut value = || flag_value(&flag, inline.clone(), &mut args);
        match flag.as_str() {
            "--listen" => listen = Some(parse_listen(&value()?)?),
            "--upstream" => upstream = Some(parse_upstream(&value()?)?),
            "--attempt-timeout-ms" => guard.attempt_timeout = millis(&flag, &value()?)?,
            "--deadline-ms" => guard.deadline = millis(&flag, &value()?)?,
            "--max-attempts" => guard.max_attempts = number(&flag, &value()?)?,
            "--failure-threshold" => guard.failure_threshold = number(&flag, &value()?)?,
            "--open-ms" => guard.open_for = millis(&flag, &value()?)?,
            _ => return Err(Failure::Usage(format!("unknown argument `{flag}`"))),
        }
    }
    let mode = match (listen, upstream) {
        (None, None) => Mode::Demo,
        (Some(listen), Some(upstream)) => Mode::Proxy { listen, upstream },
        (Some(_), None) => return Err(Failure::Usage("`--listen` needs `--upstream`".into())),
        (None, Some(_)) => return Err(Failure::Usage("`--upstream` needs `--listen`".into())),
    };
    Ok(Command::Run(Options { mode, guard }))
}

/// Splits `--flag=value` into the flag and its inline value.
fn split_flag(arg: String) -> (String, Option<String>) {
    match arg.split_once('=') {
        Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.to_owned())),
        _ => (arg, None),
    }
}

/// The flag's value: inline after `=`, or the next argument unless that is a flag.
fn flag_value(
    flag: &str,
    inline: Option<String>,
    rest: &mut impl Iterator<Item = String>,
) -> Result<String, Failure> {
    inline
        .or_else(|| rest.next().filter(|next| !next.starts_with("--")))
        .ok_or_else(|| Failure::Usage(format!("`{flag}` needs a value")))
}

fn number<T: FromStr>(flag: &str, value: &str) -> Result<T, Failure> {
    value
        .parse()
        .map_err(|_| Failure::Usage(format!("`{flag}` expects a whole number, got `{value}`")))
}

fn millis(flag: &str, value: &str) -> Result<Duration, Failure> {
    number(flag, value).map(Duration::from_millis)
}

fn parse_listen(value: &str) -> Result<SocketAddr, Failure> {
    value.parse().map_err(|_| {
        Failure::Usage(format!(
            "`--listen` expects an address like 127.0.0.1:8080, got `{value}`"
        ))
    })
}

/// Accepts `http://host:port` (a trailing `/` is fine) and returns its authority.
fn parse_upstream(value: &str) -> Result<Authority, Failure> {
    let invalid = |why: &str| Failure::Usage(format!("`--upstream {value}`: {why}"));
    let uri: Uri = value
        .parse()
        .map_err(|_| invalid("expected a URL like http://127.0.0.1:3000"))?;
    if uri.scheme() != Some(&Scheme::HTTP) {
        return Err(invalid("only http:// upstreams are supported"));
    }
    if !matches!(
        uri.path_and_query().map(PathAndQuery::as_str),
        None | Some("/")
    ) {
        return Err(invalid(
            "must not have a path or query; requests keep their own",
        ));
    }
    uri.authority()
        .cloned()
        .ok_or_else(|| invalid("missing host"))
}

// ---------------------------------------------------------------------------
// The guarded reverse proxy
// ---------------------------------------------------------------------------

/// The client that talks to upstreams; the guard hands it [`RequestBody`]s.
type UpstreamClient = Client<HttpConnector, RequestBody<Body>>;

/// The upstream client inside the guard.
type GuardedClient = UpstreamGuard<UpstreamClient>;

fn upstream_client() -> UpstreamClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One upstream the gateway can forward to.
#[derive(Clone, Debug)]
struct Route {
    authority: Authority,
    /// The `Host` header for requests to it.
    host: HeaderValue,
    client: GuardedClient,
}

impl Route {
    fn new(authority: Authority, client: GuardedClient) -> Result<Route, Failure> {
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| Failure::runtime(&format!("bad upstream host `{authority}`"), e))?;
        Ok(Route {
            authority,
            host,
            client,
        })
    }
}

/// Where requests go: the default upstream, or an alternate one named in the
/// [`UPSTREAM_SWITCH`] header (only the demo configures alternates).
#[derive(Clone, Debug)]
struct Routes {
    default: Route,
    alternates: Vec<(&'static str, Route)>,
}

impl Routes {
    fn single(route: Route) -> Routes {
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
fn gateway_router(routes: Routes) -> Router {
    Router::new().fallback(proxy).with_state(Arc::new(routes))
}

/// Forwards one request. A failed upstream call is already a response (the
/// guard's error type is `Infallible`), so this never fails.
async fn proxy(State(routes): State<Arc<Routes>>, request: Request<Body>) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let route = routes.pick(&mut parts.headers);
    let uri = match upstream_uri(&route.authority, &parts.uri) {
        Ok(uri) => uri,
        Err(error) => return plain_response(StatusCode::BAD_REQUEST, error.to_string()),
    };
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::HOST, route.host.clone());

    let Ok(response) = route
        .client
        .clone()
        .oneshot(Request::from_parts(parts, body))
        .await;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

/// The request's path and query, on the upstream's authority.
fn upstream_uri(authority: &Authority, original: &Uri) -> Result<Uri, axum::http::Error> {
    let path_and_query = original.path_and_query().map_or("/", PathAndQuery::as_str);
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority.clone())
        .path_and_query(path_and_query)
        .build()
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including any that `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_str(token.trim()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn plain_response(status: StatusCode, text: String) -> Response<Body> {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A running gateway server, stopped with [`Server::stop`].
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

impl Server {
    /// Binds `listen` and serves `app` on it in the background.
    async fn start(listen: SocketAddr, app: Router) -> Result<Server, Failure> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| Failure::runtime(&format!("cannot listen on {listen}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::runtime("cannot read the bound address", e))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move { serve.await });
        Ok(Server { addr, stop, task })
    }

    /// Stops accepting, and gives in-flight requests [`DRAIN_TIMEOUT`] to finish.
    async fn stop(self) -> Result<(), Failure> {
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

/// Serves the guarded proxy in front of `upstream` until Ctrl-C or SIGTERM.
async fn run_proxy(
    settings: &GuardSettings,
    listen: SocketAddr,
    upstream: Authority,
) -> Result<(), Failure> {
    let layer = settings.layer(
        settings.retry(),
        BreakerKeys::PerUpstream,
        upstream.as_str(),
        NoopObserver,
    )?;
    let route = Route::new(upstream, layer.layer(upstream_client()))?;
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

// ---------------------------------------------------------------------------
// Demo mode
// ---------------------------------------------------------------------------

/// How long the demo spreads its requests over.
const DEMO_SPREAD: Duration = Duration::from_secs(8);
/// At most this many demo requests are in flight at once.
const DEMO_IN_FLIGHT: usize = 16;
/// The demo's retry budget: retries may be up to 100 % of requests (plus 10 per
/// second). Most demo traffic fails on purpose, and the production default of
/// 20 % would rightly stop retrying much of it; this lets every scenario show
/// its retries. Proxy mode keeps the default.
const DEMO_BUDGET_RATIO: f64 = 1.0;
const DEMO_BUDGET_MIN_PER_SECOND: u32 = 10;
/// The upstream name the switch header selects for the `down` scenario.
const DOWN: &str = "down";

/// When the `down` upstream comes back, as a share of [`DEMO_SPREAD`].
const DOWN_RECOVERS_AT: f64 = 0.5;

/// Runs the demo: upstream, gateway, load, summary, circuit timeline.
async fn run_demo(settings: &GuardSettings) -> Result<(), Failure> {
    let started = Instant::now();
    let stats = GuardStats::new(started);
    let upstream = Upstream::start().await;
    let down = ReservedPort::new();
    let down_addr = down.addr();
    let routes = demo_routes(settings, &stats, upstream.addr(), down_addr)?;
    let server = Server::start(loopback(0), gateway_router(routes)).await?;
    let recovery = tokio::spawn(recover_down_upstream(down, stats.clone()));

    let plan = demo_plan();
    let write = |e| Failure::runtime("cannot write to stdout", e);
    print_intro(
        &mut io::stdout().lock(),
        settings,
        &upstream,
        down_addr,
        server.addr,
        plan.len(),
    )
    .map_err(write)?;
    let samples = drive_load(server.addr, plan, settings.deadline).await;
    server.stop().await?;
    recovery.abort();

    let rows: Vec<ScenarioRow> = Scenario::ALL
        .iter()
        .map(|&scenario| ScenarioRow::new(scenario, &samples, &upstream, &stats))
        .collect();
    let mut out = io::stdout().lock();
    print_summary(&mut out, &rows, &stats).map_err(write)?;
    print_circuit_timeline(&mut out, settings, &stats, down_addr).map_err(write)?;
    writeln!(out, "\ndone in {:.1} s", started.elapsed().as_secs_f64()).map_err(write)
}

/// The demo gateway's routes: the fault upstream by default, the refused port
/// when the switch header says `down`. Each upstream gets its own guard (and so
/// its own retry budget); both report to `stats`.
fn demo_routes(
    settings: &GuardSettings,
    stats: &GuardStats,
    fault: SocketAddr,
    down: SocketAddr,
) -> Result<Routes, Failure> {
    let retry = settings
        .retry()
        .budget(DEMO_BUDGET_RATIO, DEMO_BUDGET_MIN_PER_SECOND);
    let fault_layer = settings.layer(
        retry.clone(),
        BreakerKeys::PerRoute,
        "fault-upstream",
        stats.clone(),
    )?;
    let down_layer = settings.layer(retry, BreakerKeys::PerUpstream, DOWN, stats.clone())?;
    let client = upstream_client();
    Ok(Routes {
        default: Route::new(authority_of(fault)?, fault_layer.layer(client.clone()))?,
        alternates: vec![(
            DOWN,
            Route::new(authority_of(down)?, down_layer.layer(client))?,
        )],
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn authority_of(addr: SocketAddr) -> Result<Authority, Failure> {
    Authority::try_from(addr.to_string()).map_err(|e| Failure::runtime("bad address", e))
}

/// One kind of traffic the demo sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Healthy,
    Slow,
    Hanging,
    Resetting,
    Down,
    Flaky,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Healthy,
        Scenario::Slow,
        Scenario::Hanging,
        Scenario::Resetting,
        Scenario::Down,
        Scenario::Flaky,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Slow => "slow",
            Scenario::Hanging => "hanging",
            Scenario::Resetting => "resetting",
            Scenario::Down => "down",
            Scenario::Flaky => "flaky",
        }
    }

    /// How many requests the demo sends. Few hanging ones: each takes a whole
    /// deadline.
    fn requests(self) -> usize {
        match self {
            Scenario::Healthy => 120,
            Scenario::Slow => 60,
            Scenario::Hanging => 10,
            Scenario::Resetting => 40,
            Scenario::Down => 40,
            Scenario::Flaky => 50,
        }
    }

    /// The upstream route, as shown in the summary.
    fn route(self) -> &'static str {
        match self {
            Scenario::Healthy => "/ok",
            Scenario::Slow => "/slow/{50..150}",
            Scenario::Hanging => "/hang",
            Scenario::Resetting => "/reset",
            Scenario::Down => "(refused, then up)",
            Scenario::Flaky => "/flaky/2/{key}",
        }
    }

    /// The path of the demo's `seq`-th request.
    fn path(self, seq: usize) -> String {
        match self {
            Scenario::Healthy => "/ok".into(),
            // 50..=150 ms: slow, yet well below the default 300 ms attempt
            // timeout even on a busy machine, so every one passes through.
            Scenario::Slow => format!("/slow/{}", 50 + (seq * 37) % 101),
            Scenario::Hanging => "/hang".into(),
            Scenario::Resetting => "/reset".into(),
            Scenario::Down => format!("/down/{seq}"),
            // A fresh key per request: each fails twice, then succeeds.
            Scenario::Flaky => format!("/flaky/2/demo-{seq}"),
        }
    }

    /// The prefix of this scenario's requests as the fault upstream records them;
    /// `None` when they never reach it (`down`: the guard counts its attempts).
    fn upstream_prefix(self) -> Option<&'static str> {
        match self {
            Scenario::Healthy => Some("/ok"),
            Scenario::Slow => Some("/slow/"),
            Scenario::Hanging => Some("/hang"),
            Scenario::Resetting => Some("/reset"),
            Scenario::Down => None,
            Scenario::Flaky => Some("/flaky/"),
        }
    }

    fn request(self, gateway: SocketAddr, seq: usize) -> Result<Request<Full<Bytes>>, String> {
        let mut request = Request::get(format!("http://{gateway}{}", self.path(seq)));
        if self == Scenario::Down {
            request = request.header(UPSTREAM_SWITCH, DOWN);
        }
        request
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())
    }
}

/// The order of the demo's requests: each scenario's requests spread evenly over
/// the run, so the scenarios interleave as real traffic would.
fn demo_plan() -> Vec<Scenario> {
    let mut slots: Vec<(f64, Scenario)> = Scenario::ALL
        .iter()
        .flat_map(|&scenario| {
            let n = scenario.requests();
            (0..n).map(move |k| ((k as f64 + 0.5) / n as f64, scenario))
        })
        .collect();
    slots.sort_by(|a, b| a.0.total_cmp(&b.0));
    slots.into_iter().map(|(_, scenario)| scenario).collect()
}

/// What one demo request got back.
#[derive(Debug)]
struct Sample {
    scenario: Scenario,
    outcome: Result<Answer, String>,
    latency: Duration,
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    /// Set when the guard answered (a problem+json body).
    problem: Option<Problem>,
}

/// The parts of a problem+json body the summary shows.
#[derive(Debug)]
struct Problem {
    kind: String,
    attempts: u64,
}

impl Problem {
    fn parse(headers: &HeaderMap, body: &[u8]) -> Option<Problem> {
        let content_type = headers.get(header::CONTENT_TYPE)?;
        if content_type != "application/problem+json" {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let kind = value["type"].as_str()?;
        Some(Problem {
            kind: kind
                .trim_start_matches("urn:upstream-guard:problem:")
                .to_owned(),
            attempts: value["attempts"].as_u64()?,
        })
    }
}

/// The plain (unguarded) client the demo uses to call the gateway.
type LoadClient = Client<HttpConnector, Full<Bytes>>;

/// Sends `plan` to the gateway at a steady pace over [`DEMO_SPREAD`], with at
/// most [`DEMO_IN_FLIGHT`] requests in flight, and collects what came back.
async fn drive_load(gateway: SocketAddr, plan: Vec<Scenario>, deadline: Duration) -> Vec<Sample> {
    let client: LoadClient = Client::builder(TokioExecutor::new()).build_http();
    // The guard answers within its deadline; this only catches a broken gateway.
    let patience = deadline + Duration::from_secs(2);
    let in_flight = Arc::new(Semaphore::new(DEMO_IN_FLIGHT));
    let pace = DEMO_SPREAD / u32::try_from(plan.len().max(1)).unwrap_or(u32::MAX);
    let mut ticker = tokio::time::interval(pace);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = JoinSet::new();
    let total = plan.len();
    for (seq, scenario) in plan.into_iter().enumerate() {
        ticker.tick().await;
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let client = client.clone();
        tasks.spawn(async move {
            let sample = send(&client, scenario, gateway, seq, patience).await;
            drop(permit);
            sample
        });
    }
    let mut samples = Vec::with_capacity(total);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(sample) => samples.push(sample),
            Err(error) => tracing::warn!("a demo request task failed: {error}"),
        }
    }
    samples
}

/// Sends one demo request and reads the whole response, within `patience`.
async fn send(
    client: &LoadClient,
    scenario: Scenario,
    gateway: SocketAddr,
    seq: usize,
    patience: Duration,
) -> Sample {
    let started = Instant::now();
    let exchange = async {
        let response = client
            .request(scenario.request(gateway, seq)?)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body failed: {e}"))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            problem: Problem::parse(&parts.headers, &body),
        })
    };
    let outcome = tokio::time::timeout(patience, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {patience:?}")));
    Sample {
        scenario,
        outcome,
        latency: started.elapsed(),
    }
}

/// Counts what the guard reports, across both demo upstreams.
#[derive(Clone, Debug)]
struct GuardStats(Arc<GuardCounters>);

#[derive(Debug)]
struct GuardCounters {
    started: Instant,
    attempts: AtomicU64,
    /// Attempts to the `down` upstream: no server records the refused ones.
    down_attempts: AtomicU64,
    retries: AtomicU64,
    denied: Mutex<BTreeMap<&'static str, u64>>,
    timeline: Mutex<Vec<TimelineEntry>>,
}

/// A line of the circuit timeline.
#[derive(Clone, Debug)]
struct TimelineEntry {
    at: Duration,
    what: TimelineEvent,
}

#[derive(Clone, Debug)]
enum TimelineEvent {
    /// A breaker changed state: key, from, to, open period.
    Transition {
        key: String,
        from: &'static str,
        to: &'static str,
        open_for: Option<Duration>,
    },
    /// The `down` upstream started listening.
    Recovered,
}

impl GuardStats {
    fn new(started: Instant) -> GuardStats {
        GuardStats(Arc::new(GuardCounters {
            started,
            attempts: AtomicU64::new(0),
            down_attempts: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            denied: Mutex::default(),
            timeline: Mutex::default(),
        }))
    }

    fn note(&self, what: TimelineEvent) {
        let at = self.0.started.elapsed();
        if let Ok(mut timeline) = self.0.timeline.lock() {
            timeline.push(TimelineEntry { at, what });
        }
    }

    fn timeline(&self) -> Vec<TimelineEntry> {
        self.0
            .timeline
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default()
    }

    fn attempts(&self) -> u64 {
        self.0.attempts.load(Ordering::Relaxed)
    }

    fn down_attempts(&self) -> u64 {
        self.0.down_attempts.load(Ordering::Relaxed)
    }

    fn retries(&self) -> u64 {
        self.0.retries.load(Ordering::Relaxed)
    }

    /// Retries the guard wanted but did not make, by reason.
    fn denied(&self) -> BTreeMap<&'static str, u64> {
        self.0
            .denied
            .lock()
            .map(|denied| denied.clone())
            .unwrap_or_default()
    }
}

impl Observer for GuardStats {
    fn on_attempt(&self, event: &AttemptEvent<'_>) {
        self.0.attempts.fetch_add(1, Ordering::Relaxed);
        if event.request().upstream() == Some(DOWN) {
            self.0.down_attempts.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_retry(&self, _: &RetryEvent<'_>) {
        self.0.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn on_retry_denied(&self, event: &RetryDeniedEvent<'_>) {
        if let Ok(mut denied) = self.0.denied.lock() {
            *denied.entry(event.reason().as_str()).or_default() += 1;
        }
    }

    fn on_circuit_transition(&self, event: &CircuitEvent<'_>) {
        self.note(TimelineEvent::Transition {
            key: event.key().unwrap_or("-").to_owned(),
            from: event.from().as_str(),
            to: event.to().as_str(),
            open_for: event.open_for(),
        });
    }
}

// ---------------------------------------------------------------------------
// Demo summary
// ---------------------------------------------------------------------------

/// One row of the summary table.
#[derive(Debug)]
struct ScenarioRow {
    scenario: Scenario,
    requests: usize,
    /// Responses per status code.
    statuses: BTreeMap<u16, usize>,
    /// Requests that got no (complete) response at all.
    errors: usize,
    /// The problem types of the guard's answers.
    problems: BTreeSet<String>,
    /// Mean attempts per request, when known.
    attempts: Option<f64>,
    p50: Duration,
    p99: Duration,
}

impl ScenarioRow {
    fn new(
        scenario: Scenario,
        samples: &[Sample],
        upstream: &Upstream,
        stats: &GuardStats,
    ) -> ScenarioRow {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.scenario == scenario).collect();
        let answers: Vec<&Answer> = mine
            .iter()
            .filter_map(|s| s.outcome.as_ref().ok())
            .collect();
        let mut statuses = BTreeMap::new();
        for answer in &answers {
            *statuses.entry(answer.status.as_u16()).or_default() += 1;
        }
        let mut latencies: Vec<Duration> = mine.iter().map(|s| s.latency).collect();
        latencies.sort_unstable();
        ScenarioRow {
            scenario,
            requests: mine.len(),
            statuses,
            errors: mine.len() - answers.len(),
            problems: answers
                .iter()
                .filter_map(|a| a.problem.as_ref().map(|p| p.kind.clone()))
                .collect(),
            attempts: mean_attempts(scenario, &answers, upstream, stats),
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
        }
    }
}

/// Mean attempts per request. The guard's own answers say how many attempts they
/// took; responses it passed through do not, so when there are any, count the
/// requests the upstream received for this scenario instead (which covers every
/// attempt, failed or not). The `down` upstream records nothing (its refused
/// attempts never arrive anywhere), so for it the guard's own count is used.
fn mean_attempts(
    scenario: Scenario,
    answers: &[&Answer],
    upstream: &Upstream,
    stats: &GuardStats,
) -> Option<f64> {
    if answers.is_empty() {
        return None;
    }
    let passed_through = answers.iter().any(|a| a.problem.is_none());
    let total = match (passed_through, scenario.upstream_prefix()) {
        (true, Some(prefix)) => upstream.count(prefix) as u64,
        (true, None) => stats.down_attempts(),
        (false, _) => answers
            .iter()
            .filter_map(|a| a.problem.as_ref())
            .map(|p| p.attempts)
            .sum(),
    };
    Some(total as f64 / answers.len() as f64)
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_intro(
    out: &mut impl Write,
    settings: &GuardSettings,
    upstream: &Upstream,
    down: SocketAddr,
    gateway: SocketAddr,
    requests: usize,
) -> io::Result<()> {
    writeln!(out, "upstream-guard gateway demo")?;
    writeln!(
        out,
        "  fault upstream  http://{}  (tests/support/upstream.rs)",
        upstream.addr()
    )?;
    writeln!(
        out,
        "  down upstream   http://{down}  (refuses connections until {:.0} s in)",
        DEMO_SPREAD.as_secs_f64() * DOWN_RECOVERS_AT
    )?;
    writeln!(
        out,
        "  gateway         http://{gateway}  (axum -> UpstreamGuardLayer -> hyper-util client)"
    )?;
    writeln!(
        out,
        "  guard           attempt timeout {} ms, deadline {} ms, up to {} attempts, backoff {}-{} ms",
        settings.attempt_timeout.as_millis(),
        settings.deadline.as_millis(),
        settings.max_attempts,
        BACKOFF_BASE.as_millis(),
        BACKOFF_MAX.as_millis(),
    )?;
    writeln!(
        out,
        "  breaker         opens after {} failures in a row, for {} ms (doubling, at most {} ms)",
        settings.failure_threshold,
        settings.open_for.as_millis(),
        settings
            .open_for
            .saturating_mul(MAX_OPEN_FACTOR)
            .as_millis(),
    )?;
    writeln!(
        out,
        "\nsending {requests} requests over {} s, at most {DEMO_IN_FLIGHT} in flight...\n",
        DEMO_SPREAD.as_secs()
    )?;
    out.flush()
}

/// Prints the per-scenario table and the guard's retry counters.
fn print_summary(out: &mut impl Write, rows: &[ScenarioRow], stats: &GuardStats) -> io::Result<()> {
    let cells: Vec<[String; 8]> = rows.iter().map(summary_cells).collect();
    print_table(out, &SUMMARY_COLUMNS, &cells)?;
    writeln!(out)?;
    let requests: usize = rows.iter().map(|r| r.requests).sum();
    writeln!(
        out,
        "guard: {} upstream attempts for {requests} requests, {} retries; retries denied: {}",
        stats.attempts(),
        stats.retries(),
        denied_counts(&stats.denied()),
    )
}

/// The summary's columns: title, and whether it is right-aligned (numbers).
const SUMMARY_COLUMNS: [(&str, bool); 8] = [
    ("scenario", false),
    ("upstream", false),
    ("requests", true),
    ("responses", false),
    ("guard answer", false),
    ("attempts", true),
    ("p50 ms", true),
    ("p99 ms", true),
];

fn summary_cells(row: &ScenarioRow) -> [String; 8] {
    [
        row.scenario.name().to_owned(),
        row.scenario.route().to_owned(),
        row.requests.to_string(),
        status_counts(row),
        problem_kinds(row),
        row.attempts
            .map_or_else(|| "-".to_owned(), |a| format!("{a:.2}")),
        millis_text(row.p50),
        millis_text(row.p99),
    ]
}

/// Prints rows under a header, each column as wide as its widest cell.
fn print_table<const N: usize>(
    out: &mut impl Write,
    columns: &[(&str, bool); N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let widths: [usize; N] = std::array::from_fn(|i| {
        rows.iter()
            .map(|row| row[i].chars().count())
            .chain([columns[i].0.len()])
            .max()
            .unwrap_or(0)
    });
    let header: [String; N] = std::array::from_fn(|i| columns[i].0.to_owned());
    let line = |cells: &[String; N]| {
        let padded: Vec<String> = (0..N)
            .map(|i| match columns[i].1 {
                true => format!("{:>w$}", cells[i], w = widths[i]),
                false => format!("{:<w$}", cells[i], w = widths[i]),
            })
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    writeln!(out, "{}", line(&header))?;
    let total = widths.iter().sum::<usize>() + 2 * N.saturating_sub(1);
    writeln!(out, "{}", "-".repeat(total))?;
    for row in rows {
        writeln!(out, "{}", line(row))?;
    }
    Ok(())
}

fn millis_text(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1_000.0)
}

/// `200×118 502×2`, plus `err×N` for requests that got no response (`-` for
/// none at all: a cell is never empty, see the module docs).
fn status_counts(row: &ScenarioRow) -> String {
    let mut parts: Vec<String> = row
        .statuses
        .iter()
        .map(|(status, count)| format!("{status}×{count}"))
        .collect();
    if row.errors > 0 {
        parts.push(format!("err×{}", row.errors));
    }
    if parts.is_empty() {
        return "-".to_owned();
    }
    parts.join(" ")
}

/// The guard's problem types (without the URN prefix), or `-` if it answered none.
fn problem_kinds(row: &ScenarioRow) -> String {
    if row.problems.is_empty() {
        return "-".to_owned();
    }
    row.problems.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn denied_counts(denied: &BTreeMap<&'static str, u64>) -> String {
    if denied.is_empty() {
        return "none".to_owned();
    }
    denied
        .iter()
        .map(|(reason, count)| format!("{reason}×{count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Circuit breaker timeline
// ---------------------------------------------------------------------------

/// Halfway through the demo, the `down` upstream comes back: its port, bound
/// but refusing until now, starts listening, so its circuit can be seen closing
/// again. Listening on the reserved socket (rather than binding the address
/// anew) cannot lose the port to anyone else, nor fail with "address in use".
async fn recover_down_upstream(down: ReservedPort, stats: GuardStats) {
    tokio::time::sleep(DEMO_SPREAD.mul_f64(DOWN_RECOVERS_AT)).await;
    let addr = down.addr();
    let listener = match down.listen() {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!("the down upstream cannot come back on {addr}: {error}");
            return;
        }
    };
    stats.note(TimelineEvent::Recovered);
    let app = Router::new().fallback(|| async { "back" });
    if let Err(error) = axum::serve(listener, app).await {
        tracing::warn!("the recovered upstream stopped: {error}");
    }
}

/// Prints every circuit state change of the run, in order. Keys are route
/// names for the fault upstream (one breaker per route) and `down` for the
/// upstream that recovers.
fn print_circuit_timeline(
    out: &mut impl Write,
    settings: &GuardSettings,
    stats: &GuardStats,
    down: SocketAddr,
) -> io::Result<()> {
    writeln!(
        out,
        "\ncircuit breakers (--failure-threshold {}, --open-ms {}):",
        settings.failure_threshold,
        settings.open_for.as_millis()
    )?;
    let timeline = stats.timeline();
    if timeline.is_empty() {
        return writeln!(out, "  no state changes");
    }
    let down = down.to_string();
    for entry in timeline {
        let at = entry.at.as_secs_f64();
        match entry.what {
            TimelineEvent::Recovered => {
                timeline_line(out, at, DOWN, "upstream starts listening again")?;
            }
            TimelineEvent::Transition {
                key,
                from,
                to,
                open_for,
            } => {
                let key = if key == down { DOWN } else { key.as_str() };
                let open =
                    open_for.map_or_else(String::new, |d| format!(" for {} ms", d.as_millis()));
                timeline_line(out, at, key, &format!("{from} → {to}{open}"))?;
            }
        }
    }
    Ok(())
}

/// One timeline line: seconds since the start, the breaker, what happened.
fn timeline_line(out: &mut impl Write, at: f64, key: &str, what: &str) -> io::Result<()> {
    writeln!(out, "  {at:6.2} s  {key:<10}  {what}")
}
