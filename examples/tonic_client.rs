//! # A guarded tonic client
//!
//! Puts [`UpstreamGuardLayer`] around a tonic [`Channel`] and calls the standard
//! gRPC health service (`grpc.health.v1.Health`, from `tonic-health`: no protoc
//! needed) on servers this example starts on 127.0.0.1. It shows, and prints:
//!
//! - **(a)** a normal call;
//! - **(b)** a server slower than the attempt timeout: the guard answers
//!   `grpc-status: 4` and the client sees `Code::DeadlineExceeded`;
//! - **(c)** a server that is down (connection refused): `Code::Unavailable`;
//! - **(d)** the `grpc-timeout` header the server receives: the guard sets it to
//!   what the attempt may still take (the attempt timeout, or what is left of the
//!   deadline or of the caller's own `grpc-timeout` if that is less);
//! - **(e)** a server that answers the first calls with a trailers-only
//!   `UNAVAILABLE`: the guard retries a call marked idempotent, and the client
//!   gets `OK`.
//!
//! ```sh
//! cargo run --features tonic --example tonic_client
//! ```
//!
//! ## The wiring
//!
//! The `tonic` feature's [`GuardedChannel`] is a `Channel` behind the guard,
//! with a name a struct field or a function's return type can use:
//!
//! ```ignore
//! fn health_client(guard: &UpstreamGuardLayer) -> Result<HealthClient<GuardedChannel>, BoxError> {
//!     let origin: http::Uri = "http://127.0.0.1:50051".parse()?;
//!     let channel = Endpoint::from(origin.clone()).connect_lazy();
//!     let guarded = GuardedChannel::new(guard, channel, origin.clone())?;
//!     Ok(HealthClient::with_origin(guarded, origin))
//! }
//! ```
//!
//! It asks for the server's origin because the origin keys the circuit breaker
//! (one per server: a dead one never opens another's) and names the upstream
//! in failures; it puts it on every request, so a stub built with `new` is
//! keyed right too.
//!
//! That wiring (`guarded_client`) and the gRPC servers with injected faults live
//! in `tests/support/grpc.rs`, which this example shares with
//! `tests/tonic_client.rs`.
//!
//! [`GuardedChannel`]: upstream_guard::tonic::GuardedChannel
//!
//! ## Three things to know for gRPC
//!
//! - **Retries need an `idempotency-key`.** Every gRPC call is an HTTP `POST`, and
//!   the guard only resends a request that may have reached the upstream when it is
//!   idempotent. A call that is safe to repeat (like a health check) says so with
//!   `idempotency-key` metadata; without it an `UNAVAILABLE` answer is passed to
//!   the caller as it is. (A refused connection is retried either way: nothing was
//!   sent.) A unary request body is buffered for replay: tonic's encoder yields the
//!   one message and then the end of the body without ever returning `Pending`.
//! - **The channel enforces the `grpc-timeout` the guard sets**, with a timer of its
//!   own that ends at about the same instant as the guard's. The guard takes an
//!   inner failure at the end of the attempt's time for its own timeout, so a slow
//!   server comes out as `DEADLINE_EXCEEDED`, never as `UNAVAILABLE`.
//! - **A tonic server enforces it too**: it cuts a slow call off itself, answering
//!   `CANCELLED`, at about the instant the guard gives up. On loopback that answer
//!   sometimes arrives first (a few calls in a hundred) and passes through as the
//!   upstream's own answer. So the slow server in (b) ignores `grpc-timeout`, to
//!   show the guard's answer every time.

#[path = "../tests/support/grpc.rs"]
mod grpc;

use std::error::Error;
use std::time::{Duration, Instant};

use tonic::Status;
use tonic_health::pb::HealthCheckRequest;
use upstream_guard::observe::{AttemptOutcome, RetryDeniedEvent, RetryEvent};
use upstream_guard::{Observer, RetryPolicy, UpstreamGuardLayer};

use grpc::{guarded_client, health_check, refused_addr, Faults, HealthServer};

const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(300);
const DEADLINE: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    normal_call().await?;
    slow_server().await?;
    server_down().await?;
    grpc_timeout_propagation().await?;
    unavailable_is_retried().await?;
    println!("\nall scenarios done");
    Ok(())
}

/// (a) A healthy server answers `SERVING`.
async fn normal_call() -> Result<(), Box<dyn Error>> {
    println!("(a) normal call");
    let server = HealthServer::start(Faults::default()).await;
    let mut client = guarded_client(server.addr, &guard(RetryPolicy::default()));
    let started = Instant::now();
    let answer = client.check(health_check()).await?;
    println!(
        "    OK: {:?} in {:?}",
        answer.into_inner().status(),
        started.elapsed()
    );
    Ok(())
}

/// (b) A server slower than the attempt timeout: `DEADLINE_EXCEEDED`.
async fn slow_server() -> Result<(), Box<dyn Error>> {
    println!("(b) a server that takes 2 s and ignores grpc-timeout; attempt timeout {ATTEMPT_TIMEOUT:?}, 1 attempt");
    let server =
        HealthServer::start_ignoring_deadlines(Faults::delay(Duration::from_secs(2))).await;
    let mut client = guarded_client(server.addr, &guard(RetryPolicy::disabled()));
    let started = Instant::now();
    let status = expect_error(client.check(health_check()).await)?;
    println!(
        "    {:?} after {:?}: {:?}",
        status.code(),
        started.elapsed(),
        status.message()
    );
    Ok(())
}

/// (c) Nothing listens: `UNAVAILABLE`, after the guard retried the refused
/// connection (a request that never left is safe to resend).
async fn server_down() -> Result<(), Box<dyn Error>> {
    println!("(c) a server that is down (connection refused)");
    let addr = refused_addr().await;
    let mut client = guarded_client(addr, &guard(quick_retry()));
    let started = Instant::now();
    let status = expect_error(client.check(health_check()).await)?;
    println!(
        "    {:?} after {:?}: {:?}",
        status.code(),
        started.elapsed(),
        status.message()
    );
    Ok(())
}

/// (d) What the server is told about its time: the `grpc-timeout` it receives.
async fn grpc_timeout_propagation() -> Result<(), Box<dyn Error>> {
    println!("(d) grpc-timeout seen by the server");
    let server = HealthServer::start(Faults::default()).await;
    let mut client = guarded_client(server.addr, &guard(RetryPolicy::default()));

    client.check(health_check()).await?;
    let mut short = tonic::Request::new(HealthCheckRequest::default());
    short.set_timeout(Duration::from_millis(120));
    client.check(short).await?;

    let seen = server.faults.grpc_timeouts();
    println!(
        "    no client timeout       -> {} (attempt timeout {ATTEMPT_TIMEOUT:?})",
        describe_timeout(seen.first())
    );
    println!(
        "    client timeout of 120ms -> {}",
        describe_timeout(seen.get(1))
    );
    Ok(())
}

/// (e) A server that answers `UNAVAILABLE` twice, then serves: retried when the
/// call says it is safe to repeat.
async fn unavailable_is_retried() -> Result<(), Box<dyn Error>> {
    println!("(e) a server that answers UNAVAILABLE to its first 2 calls, 3 attempts");
    let guard = guard(quick_retry());

    let server = HealthServer::start(Faults::unavailable_first(2)).await;
    let mut client = guarded_client(server.addr, &guard);
    let plain = client.check(health_check()).await;
    println!(
        "    without idempotency-key: {} after {} server call(s)",
        describe(&plain),
        server.faults.calls()
    );

    let server = HealthServer::start(Faults::unavailable_first(2)).await;
    let mut client = guarded_client(server.addr, &guard);
    let mut keyed = health_check();
    keyed
        .metadata_mut()
        .insert("idempotency-key", "health-check-1".parse()?);
    let retried = client.check(keyed).await;
    println!(
        "    with idempotency-key:    {} after {} server call(s)",
        describe(&retried),
        server.faults.calls()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The guarded client
// ---------------------------------------------------------------------------

/// The guard used in every scenario, with the given retry policy.
fn guard(retry: RetryPolicy) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(ATTEMPT_TIMEOUT)
        .deadline(DEADLINE)
        .retry(retry)
        .observer(PrintRetries)
        .build()
        .expect("a valid guard configuration")
}

fn quick_retry() -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(3)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
}

/// Prints the guard's retry decisions.
struct PrintRetries;

impl Observer for PrintRetries {
    fn on_retry(&self, event: &RetryEvent<'_>) {
        // A trailers-only gRPC error is an HTTP 200 whose `grpc-status` header
        // the classifier found retryable (14, UNAVAILABLE).
        let why = match event.reason() {
            AttemptOutcome::Response { status, .. } => {
                format!("HTTP {status} with a retryable grpc-status")
            }
            other => other.to_string(),
        };
        println!(
            "    guard: attempt {} failed ({why}), retrying in {:?}",
            event.failed_attempt(),
            event.backoff()
        );
    }

    fn on_retry_denied(&self, event: &RetryDeniedEvent<'_>) {
        println!(
            "    guard: attempt {} failed, not retried: {}",
            event.failed_attempt(),
            event.reason().as_str()
        );
    }
}

fn expect_error<T>(result: Result<T, Status>) -> Result<Status, Box<dyn Error>> {
    match result {
        Ok(_) => Err("the call succeeded, but this scenario expects an error".into()),
        Err(status) => Ok(status),
    }
}

fn describe<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "OK".to_string(),
        Err(status) => format!("{:?}", status.code()),
    }
}

fn describe_timeout(value: Option<&String>) -> String {
    let Some(value) = value else {
        return "no grpc-timeout header".to_string();
    };
    match upstream_guard::grpc::parse_grpc_timeout(value.as_bytes()) {
        Some(timeout) => format!("grpc-timeout: {value} ({timeout:?})"),
        None => format!("grpc-timeout: {value} (malformed)"),
    }
}
