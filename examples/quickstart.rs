use std::time::Duration;

use axum::{body::Body, extract::State, http::Request, response::Response, routing::get, Router};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceExt};
use upstream_guard::{BreakerPolicy, RequestBody, RetryPolicy, UpstreamGuard, UpstreamGuardLayer};

/// A hyper-util client behind the guard: what the route calls its upstream with.
type Upstream = UpstreamGuard<Client<HttpConnector, RequestBody<Body>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let guard = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(800)) // per attempt, until response headers
        .deadline(Duration::from_secs(3)) // all attempts and backoff sleeps
        .retry(RetryPolicy::default().max_attempts(3)) // 25 ms..1 s full-jitter backoff, 20 % budget
        .circuit_breaker(BreakerPolicy::consecutive_failures(5).open_for(Duration::from_secs(10)))
        .build()?; // a bad value is an error naming the field
    let upstream: Upstream = guard.layer(Client::builder(TokioExecutor::new()).build_http());

    let app = Router::new()
        .route("/orders", get(orders))
        .with_state(upstream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000/orders");
    axum::serve(listener, app).await?;
    Ok(())
}

/// Asks the upstream for the orders. Whatever goes wrong there, the caller gets
/// a well-formed answer: the upstream's own, or the guard's 502/503/504 with a
/// problem+json body (the guard's error type is `Infallible`).
async fn orders(State(upstream): State<Upstream>) -> Response {
    let request = Request::get("http://127.0.0.1:8080/orders").body(Body::empty());
    let Ok(request) = request else {
        unreachable!("a static, valid request")
    };
    let Ok(response) = upstream.oneshot(request).await;
    response.map(Body::new)
}
