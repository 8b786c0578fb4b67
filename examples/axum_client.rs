//! # An axum handler calling a downstream API through the guard
//!
//! The app serves `GET /price/{symbol}` by calling a downstream JSON API through a
//! guarded hyper-util client, built once and kept in the app state. The handler
//! looks for an [`upstream_guard::GuardFailure`] in the response extensions to
//! tell the guard's answers from the API's own, and decides what its callers see:
//!
//! | what happened | the handler answers |
//! |---|---|
//! | the API answered (any status) | the API's answer, as it is (a `200` is also cached) |
//! | the API timed out | `504` with its own JSON |
//! | the API's circuit is open | the last good value, from the cache, with `x-quote-source: cache` |
//! | anything else the guard answered | the guard's `502`/`503` problem+json |
//!
//! ```sh
//! cargo run --example axum_client
//! ```
//!
//! Self-contained: it starts the downstream API (which can be told to be
//! healthy, slow or broken) and the app on 127.0.0.1, calls the app a few times,
//! prints what came back, and exits.

use std::collections::HashMap;
use std::error::Error;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use tokio::net::TcpListener;
use tower::{Layer, ServiceExt};
use upstream_guard::{
    BreakerPolicy, FailureKind, GuardFailure, RequestBody, ResponseBody, RetryPolicy,
    UpstreamGuard, UpstreamGuardLayer,
};

/// The guarded client to the downstream API.
type ApiClient = UpstreamGuard<Client<HttpConnector, RequestBody<Empty<Bytes>>>>;

/// What it answers: the API's response, or one the guard made up.
type ApiResponse = axum::http::Response<ResponseBody<Incoming>>;

#[derive(Clone)]
struct AppState {
    api: ApiClient,
    api_url: String,
    /// The last good answer per symbol.
    cache: Arc<Mutex<HashMap<String, Bytes>>>,
}

/// The guard: 200 ms per attempt, two attempts, and a breaker that opens after
/// three failures in a row, for 300 ms.
fn api_client() -> ApiClient {
    let guard = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(200))
        .deadline(Duration::from_secs(1))
        .retry(RetryPolicy::default().max_attempts(2))
        .circuit_breaker(
            BreakerPolicy::consecutive_failures(3).open_for(Duration::from_millis(300)),
        )
        .upstream_name("quotes-api")
        .build()
        .expect("a valid guard configuration");
    guard.layer(Client::builder(TokioExecutor::new()).build_http())
}

/// `GET /price/{symbol}`.
async fn price(State(app): State<AppState>, Path(symbol): Path<String>) -> Response {
    if symbol.is_empty() || !symbol.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return error_json(StatusCode::BAD_REQUEST, "a symbol is letters and digits");
    }
    let Some(response) = app.fetch(&symbol).await else {
        return error_json(StatusCode::INTERNAL_SERVER_ERROR, "bad quote service URL");
    };
    // A `GuardFailure` marks a response the guard made up: the API did not answer.
    match response
        .extensions()
        .get::<GuardFailure>()
        .map(GuardFailure::kind)
    {
        None if response.status() == StatusCode::OK => app.remember(symbol, response).await,
        None => response.map(Body::new),
        Some(FailureKind::CircuitOpen) => match app.cached(&symbol) {
            Some(body) => quote_response(body, "cache"),
            None => response.map(Body::new),
        },
        Some(kind) if kind.is_timeout() => {
            error_json(StatusCode::GATEWAY_TIMEOUT, "the quote service is too slow")
        }
        Some(_) => response.map(Body::new),
    }
}

impl AppState {
    /// Asks the API, through the guard; `None` if no request could be built.
    async fn fetch(&self, symbol: &str) -> Option<ApiResponse> {
        let uri = format!("{}/quote/{symbol}", self.api_url);
        let request = Request::get(uri).body(Empty::new()).ok()?;
        let Ok(response) = self.api.clone().oneshot(request).await;
        Some(response)
    }

    /// Reads a good answer, caches it, and passes it on.
    async fn remember(&self, symbol: String, response: ApiResponse) -> Response {
        let Ok(body) = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
        else {
            return error_json(StatusCode::BAD_GATEWAY, "the quote service broke off");
        };
        let body = body.to_bytes();
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(symbol, body.clone());
        }
        quote_response(body, "live")
    }

    /// The last good answer for `symbol`.
    fn cached(&self, symbol: &str) -> Option<Bytes> {
        self.cache.lock().ok()?.get(symbol).cloned()
    }
}

fn quote_response(body: Bytes, source: &'static str) -> Response {
    let mut response = ([("content-type", "application/json")], body).into_response();
    response
        .headers_mut()
        .insert("x-quote-source", HeaderValue::from_static(source));
    response
}

fn error_json(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let downstream = Arc::new(Downstream::default());
    let api_url = serve(downstream_api(Arc::clone(&downstream))).await?;
    let app = Router::new()
        .route("/price/{symbol}", get(price))
        .with_state(AppState {
            api: api_client(),
            api_url,
            cache: Arc::default(),
        });
    let app_url = serve(app).await?;

    let steps = [
        (Mode::Healthy, "ACME", "a live quote (now cached)"),
        (Mode::Healthy, "NOPE", "the API's own 404, passed on"),
        (Mode::Slow, "ACME", "2 attempts time out: our own 504"),
        (
            Mode::Broken,
            "ACME",
            "the API's 500, passed on; 3rd failure: the breaker opens",
        ),
        (Mode::Broken, "ACME", "circuit open: the cached quote"),
    ];
    for (mode, symbol, what) in steps {
        downstream.set(mode);
        call(&app_url, symbol, what).await?;
    }
    println!("... 400 ms later, the API is healthy again and the breaker lets a probe through");
    downstream.set(Mode::Healthy);
    tokio::time::sleep(Duration::from_millis(400)).await;
    call(&app_url, "ACME", "a live quote again").await?;
    Ok(())
}

/// Calls the app and prints what came back.
async fn call(app_url: &str, symbol: &str, what: &str) -> Result<(), Box<dyn Error>> {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .get(format!("{app_url}/price/{symbol}").parse()?)
        .await?;
    let status = response.status();
    let source = response.headers().get("x-quote-source").cloned();
    let body = response.into_body().collect().await?.to_bytes();
    println!("GET /price/{symbol:<4} -> {status}    # {what}");
    if let Some(source) = source {
        println!("    x-quote-source: {}", source.to_str()?);
    }
    println!("    {}", String::from_utf8_lossy(&body));
    Ok(())
}

/// Serves `app` on 127.0.0.1 in the background; its base URL.
async fn serve(app: Router) -> Result<String, Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

// ---------------------------------------------------------------------------
// The downstream API
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
#[repr(u8)]
enum Mode {
    Healthy,
    Slow,
    Broken,
}

/// The API's behaviour, switched by the demo, and a price that moves.
#[derive(Default)]
struct Downstream {
    mode: AtomicU8,
    ticks: AtomicU32,
}

impl Downstream {
    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            1 => Mode::Slow,
            2 => Mode::Broken,
            _ => Mode::Healthy,
        }
    }
}

fn downstream_api(downstream: Arc<Downstream>) -> Router {
    Router::new()
        .route("/quote/{symbol}", get(quote))
        .with_state(downstream)
}

async fn quote(State(api): State<Arc<Downstream>>, Path(symbol): Path<String>) -> Response {
    match api.mode() {
        Mode::Slow => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            StatusCode::OK.into_response()
        }
        Mode::Broken => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": "database unavailable" })),
        )
            .into_response(),
        Mode::Healthy if symbol == "ACME" => {
            let tick = api.ticks.fetch_add(1, Ordering::SeqCst);
            let price = 100.0 + f64::from(tick) * 0.25;
            Json(json!({ "symbol": symbol, "price": price })).into_response()
        }
        Mode::Healthy => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("unknown symbol {symbol}") })),
        )
            .into_response(),
    }
}
