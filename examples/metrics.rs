//! Prometheus metrics for a guarded upstream: an axum app whose `/api/{name}`
//! route calls an upstream through a guarded hyper-util client, and which serves
//! the guard's metrics on `/metrics` in the Prometheus text format.
//!
//! ```text
//! cargo run --example metrics --features metrics
//! cargo run --example metrics --features metrics -- --port 8080
//! cargo run --example metrics --features metrics -- --once
//! ```
//!
//! The upstream is a small in-process axum app with three routes: `items`
//! answers at once, `broken` answers `503`, `slow` takes two seconds (longer
//! than the guard's attempt timeout). Both apps listen on `127.0.0.1` only.
//!
//! By default it prints `listening on http://ADDR` and serves until Ctrl-C: try
//! `curl ADDR/api/items`, `curl ADDR/api/broken`, then `curl ADDR/metrics`.
//!
//! With `--once` it picks free ports, sends a few requests (some failing, until
//! the circuit breaker opens), prints the `/metrics` text it fetched over HTTP,
//! and exits: 0 if the guard's metrics are in it, 1 if not.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use upstream_guard::{
    BreakerPolicy, MetricsObserver, RequestBody, RetryPolicy, UpstreamGuard, UpstreamGuardLayer,
};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The client the guard wraps; the guard hands it [`RequestBody`]s.
type GuardedClient = UpstreamGuard<Client<HttpConnector, RequestBody<Empty<Bytes>>>>;

/// Histogram buckets for the guard's `_seconds` metrics: from a fast local
/// answer to the deadline.
const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Clone)]
struct App {
    client: GuardedClient,
    upstream: SocketAddr,
    metrics: PrometheusHandle,
}

#[tokio::main]
async fn main() -> ExitCode {
    let mode = match parse_args(std::env::args().skip(1)) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("{message}\nusage: metrics [--once | --port PORT]");
            return ExitCode::from(2);
        }
    };
    match run(mode).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

enum Mode {
    Serve { port: u16 },
    Once,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Mode, String> {
    let mut mode = Mode::Serve { port: 3000 };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--once" => mode = Mode::Once,
            "--port" => {
                let port = args.next().ok_or("--port needs a value")?;
                let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
                mode = Mode::Serve { port };
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(mode)
}

async fn run(mode: Mode) -> Result<ExitCode, Error> {
    // The recorder must be installed before the observer is created, so the
    // metrics' descriptions (the `# HELP` lines) reach it.
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install_recorder()?;

    let guard = UpstreamGuardLayer::builder()
        .upstream_name("catalog")
        .attempt_timeout(Duration::from_millis(300))
        .deadline(Duration::from_secs(1))
        .retry(RetryPolicy::default().max_attempts(3))
        .circuit_breaker(BreakerPolicy::consecutive_failures(5).open_for(Duration::from_secs(10)))
        .observer(MetricsObserver::new())
        .build()?;

    let upstream = spawn_upstream().await?;
    let client = guard.layer(Client::builder(TokioExecutor::new()).build_http());
    let app = Router::new()
        .route("/api/{name}", get(api))
        .route("/metrics", get(render_metrics))
        .with_state(App {
            client,
            upstream,
            metrics: metrics.clone(),
        });

    // Without the exporter's own HTTP listener, nothing else drains histogram
    // samples between scrapes: do it periodically so memory stays bounded.
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });

    match mode {
        Mode::Serve { port } => {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
            println!("listening on http://{}", listener.local_addr()?);
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Mode::Once => once(app).await,
    }
}

/// Calls the upstream route `name` through the guard. A failure comes back as a
/// well-formed 502/503/504 problem+json response, never as an error.
async fn api(State(app): State<App>, Path(name): Path<String>) -> Response<Body> {
    // Only known routes: the upstream URL is never built from raw client input.
    let path = match name.as_str() {
        "items" => "/items",
        "broken" => "/broken",
        "slow" => "/slow",
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let request = Request::get(format!("http://{}{path}", app.upstream)).body(Empty::new());
    let request = match request {
        Ok(request) => request,
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    match app.client.oneshot(request).await {
        Ok(response) => response.map(Body::new),
        Err(never) => match never {},
    }
}

async fn render_metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

/// The stand-in upstream, on a free loopback port.
async fn spawn_upstream() -> Result<SocketAddr, Error> {
    let upstream = Router::new()
        .route("/items", get(|| async { r#"["apple","pear"]"# }))
        .route(
            "/broken",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance") }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                "finally"
            }),
        );
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, upstream).await {
            eprintln!("upstream stopped: {err}");
        }
    });
    Ok(addr)
}

/// `--once`: serve on a free port, drive some traffic over HTTP, print the
/// scrape, exit.
async fn once(app: Router) -> Result<ExitCode, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("server stopped: {err}");
        }
    });

    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    // Healthy calls, one that times out, then an upstream that keeps failing
    // until the breaker opens and the guard answers 503 without calling it.
    let plan = [
        "items", "items", "items", "slow", "items", "broken", "broken", "broken", "items",
    ];
    for name in plan {
        let (status, _) = fetch(&client, addr, &format!("/api/{name}")).await?;
        println!("GET /api/{name:<7} -> {status}");
    }

    let (status, text) = fetch(&client, addr, "/metrics").await?;
    println!("\nGET /metrics -> {status}\n\n{text}");
    let complete = status == StatusCode::OK
        && [
            "upstream_guard_requests_total{",
            "upstream_guard_attempts_total{",
            "upstream_guard_retries_total{",
            "upstream_guard_rejections_total{",
            "upstream_guard_circuit_state{",
            "upstream_guard_request_duration_seconds_bucket{",
        ]
        .iter()
        .all(|series| text.contains(series));
    if complete {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: the scrape is missing some of the guard's metrics");
        Ok(ExitCode::FAILURE)
    }
}

async fn fetch(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String), Error> {
    let request = Request::get(format!("http://{addr}{path}")).body(Empty::new())?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| format!("GET {path} took over 10 s"))??;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
