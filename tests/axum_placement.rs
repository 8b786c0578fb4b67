//! The guard as `axum::Router::layer` over handlers that call upstreams: handler
//! responses are classified, retried and timed out like upstream responses.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use support::observer::Recording;
use tower::ServiceExt;
use upstream_guard::observe::Outcome;
use upstream_guard::{RetryPolicy, UpstreamGuardLayer};

fn layer(observer: Recording) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(200))
        .deadline(Duration::from_secs(1))
        .retry(RetryPolicy::default().backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .upstream_name("handlers")
        .observer(observer)
        .build()
        .unwrap()
}

async fn call(app: &Router, method: &str, path: &str, body: Bytes) -> (StatusCode, Bytes) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-length", body.len())
        .body(Body::from(body))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(request))
        .await
        .expect("answered")
        .expect("infallible");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body)
}

/// Fails with 503 until it has been called `n` times, then answers 200.
async fn flaky(State((calls, n)): State<(Arc<AtomicUsize>, usize)>) -> (StatusCode, &'static str) {
    if calls.fetch_add(1, Ordering::SeqCst) < n {
        (StatusCode::SERVICE_UNAVAILABLE, "not yet")
    } else {
        (StatusCode::OK, "ok")
    }
}

#[tokio::test]
async fn a_handler_failing_twice_is_retried_into_a_200() {
    let calls = Arc::new(AtomicUsize::new(0));
    let observer = Recording::default();
    let app = Router::new()
        .route("/flaky", get(flaky))
        .with_state((calls.clone(), 2))
        .layer(layer(observer.clone()));
    let (status, body) = call(&app, "GET", "/flaky", Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "ok");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(observer.responses(), vec![(200, Outcome::Success, 3)]);
}

#[tokio::test]
async fn a_handler_500_is_classified_as_a_failure_and_passed_through() {
    let observer = Recording::default();
    let app = Router::new()
        .route(
            "/boom",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "handler failed") }),
        )
        .layer(layer(observer.clone()));
    let (status, body) = call(&app, "GET", "/boom", Bytes::new()).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body, "handler failed");
    assert_eq!(
        observer.responses(),
        vec![(500, Outcome::UpstreamFailure, 1)]
    );
}

#[tokio::test]
async fn a_hanging_handler_gets_a_504_problem() {
    let app = Router::new()
        .route(
            "/hang",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "too late"
            }),
        )
        .layer(layer(Recording::default()));
    let started = Instant::now();
    let (status, body) = call(&app, "GET", "/hang", Bytes::new()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["status"], 504);
    assert_eq!(problem["upstream"], "handlers");
    assert!(started.elapsed() < Duration::from_millis(1000 + 1500));
}

#[tokio::test]
async fn a_retried_handler_receives_the_same_body_each_time() {
    let bodies = Arc::new(std::sync::Mutex::new(Vec::<Bytes>::new()));
    let seen = bodies.clone();
    let app = Router::new()
        .route(
            "/store",
            put(move |body: Bytes| {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().unwrap();
                    seen.push(body);
                    if seen.len() < 2 {
                        StatusCode::BAD_GATEWAY
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        )
        .layer(layer(Recording::default()));
    let payload: Bytes = (0..10_240u32).map(|i| (i * 7 % 256) as u8).collect();
    let (status, _) = call(&app, "PUT", "/store", payload.clone()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().all(|b| *b == payload));
}

#[tokio::test]
async fn a_post_handler_that_fails_is_not_retried() {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/create", post(flaky))
        .with_state((calls.clone(), 5))
        .layer(layer(Recording::default()));
    let (status, _) = call(&app, "POST", "/create", Bytes::from_static(b"{}")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn every_route_of_one_layer_reports_to_one_shared_state() {
    // axum calls Layer::layer once per route; all of them must share one state.
    let observer = Recording::default();
    let app = Router::new()
        .route("/a", get(|| async { "a" }))
        .route("/b", get(|| async { "b" }))
        .route("/c", post(|| async { "c" }))
        .layer(layer(observer.clone()));
    for path in ["/a", "/b"] {
        assert_eq!(
            call(&app, "GET", path, Bytes::new()).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(
        call(&app, "POST", "/c", Bytes::new()).await.0,
        StatusCode::OK
    );
    assert_eq!(observer.responses().len(), 3);
}

#[tokio::test]
async fn every_method_of_a_route_feeds_one_breaker() {
    // axum wraps each method of a route in a service of its own and clones it
    // per request; they must share one breaker, or it would never see enough
    // failures to open. (Other routes have breakers of their own with the
    // `axum` feature: tests/server_placements.rs.)
    let guard = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .circuit_breaker(upstream_guard::BreakerPolicy::consecutive_failures(4))
        .build()
        .unwrap();
    let failing = || async { StatusCode::BAD_GATEWAY };
    let app = Router::new()
        .route("/a", get(failing).put(failing))
        .layer(guard.clone());
    for method in ["GET", "PUT", "GET", "PUT"] {
        assert_eq!(
            call(&app, method, "/a", Bytes::new()).await.0,
            StatusCode::BAD_GATEWAY
        );
    }
    let (status, body) = call(&app, "GET", "/a", Bytes::new()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:upstream-guard:problem:circuit-open");
}

/// The README's axum snippet, kept compiling and working.
#[tokio::test]
async fn the_readme_axum_snippet_builds_a_working_app() {
    use upstream_guard::{BreakerPolicy, ConfigError};

    async fn list_orders() -> &'static str {
        "[]"
    }

    fn app() -> Result<Router, ConfigError> {
        let guard = UpstreamGuardLayer::builder()
            .attempt_timeout(Duration::from_millis(800))
            .deadline(Duration::from_secs(3))
            .retry(RetryPolicy::default().max_attempts(3))
            .circuit_breaker(
                BreakerPolicy::consecutive_failures(5).open_for(Duration::from_secs(10)),
            )
            .build()?;
        Ok(Router::new()
            .route("/api/orders", get(list_orders))
            .layer(guard))
    }

    let (status, body) = call(&app().unwrap(), "GET", "/api/orders", Bytes::new()).await;
    assert_eq!((status, body.as_ref()), (StatusCode::OK, &b"[]"[..]));
}
