//! The guard around a tonic `Channel`, against real gRPC servers on 127.0.0.1
//! (`grpc.health.v1.Health` from `tonic-health`), as `examples/tonic_client.rs`
//! shows it: a normal call, a slow server, a refused port, `grpc-timeout`
//! propagation, retried `UNAVAILABLE` answers, and an open circuit.

#[path = "support/grpc.rs"]
mod grpc;

use std::time::{Duration, Instant};

use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use upstream_guard::grpc::parse_grpc_timeout;
use upstream_guard::{BreakerPolicy, RetryPolicy, UpstreamGuardLayer};

use grpc::{guarded_client, health_check, refused_addr, Faults, GuardedChannel, HealthServer};

/// Slack for timing assertions: scheduling on a busy CI machine.
const SLACK: Duration = Duration::from_millis(400);
/// Upper bound for any one call, so a broken guard fails a test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_normal_call_is_ok() {
    let server = HealthServer::start(Faults::default()).await;
    let mut client = guarded_client(server.addr, &guard(&Guard::default()));

    let answer = call(&mut client, health_check()).await.expect("OK");

    assert_eq!(answer, ServingStatus::Serving);
    assert_eq!(server.faults.calls(), 1);
}

#[tokio::test]
async fn a_slow_server_is_deadline_exceeded_after_the_attempt_timeout() {
    let server =
        HealthServer::start_ignoring_deadlines(Faults::delay(Duration::from_secs(5))).await;
    let config = Guard {
        attempt_timeout: Duration::from_millis(200),
        deadline: Duration::from_secs(2),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    let started = Instant::now();
    let status = call(&mut client, health_check()).await.expect_err("fails");
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(190) && elapsed < config.attempt_timeout + SLACK,
        "answered after {elapsed:?}"
    );
    // A gRPC call is a POST: a timed-out attempt may have reached the server, so it
    // is not resent without an idempotency key.
    assert_eq!(server.faults.calls(), 1);
}

#[tokio::test]
async fn a_slow_server_is_deadline_exceeded_within_the_deadline_across_retries() {
    let server =
        HealthServer::start_ignoring_deadlines(Faults::delay(Duration::from_secs(5))).await;
    let config = Guard {
        attempt_timeout: Duration::from_millis(200),
        deadline: Duration::from_millis(500),
        retry: quick_retry(5),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    let started = Instant::now();
    let status = call(&mut client, idempotent(health_check()))
        .await
        .expect_err("fails");
    let elapsed = started.elapsed();

    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(390) && elapsed < config.deadline + SLACK,
        "answered after {elapsed:?}"
    );
    let calls = server.faults.calls();
    assert!((2..=3).contains(&calls), "{calls} server calls");
}

#[tokio::test]
async fn a_refused_port_is_unavailable() {
    let addr = refused_addr().await;
    let mut client = guarded_client(addr, &guard(&Guard::default()));

    let started = Instant::now();
    let status = call(&mut client, health_check()).await.expect_err("fails");

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "could not connect to the upstream");
    assert!(started.elapsed() < SLACK, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn the_server_receives_a_grpc_timeout_no_longer_than_the_attempt_timeout() {
    let server = HealthServer::start(Faults::default()).await;
    let config = Guard {
        attempt_timeout: Duration::from_millis(300),
        deadline: Duration::from_secs(2),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    call(&mut client, health_check()).await.expect("OK");
    let mut short = health_check();
    short.set_timeout(Duration::from_millis(100));
    call(&mut client, short).await.expect("OK");

    let seen = server.faults.grpc_timeouts();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let first = parse_grpc_timeout(seen[0].as_bytes()).expect("a valid grpc-timeout");
    assert!(
        first <= config.attempt_timeout && first > Duration::from_millis(250),
        "{first:?}"
    );
    let second = parse_grpc_timeout(seen[1].as_bytes()).expect("a valid grpc-timeout");
    assert!(
        second <= Duration::from_millis(100) && second > Duration::from_millis(50),
        "the caller's shorter timeout wins: {second:?}"
    );
}

#[tokio::test]
async fn unavailable_is_retried_until_ok_when_the_call_is_idempotent() {
    let (server, mut client) = retrying(Faults::unavailable_first(2), 3).await;

    let answer = call(&mut client, idempotent(health_check()))
        .await
        .expect("OK after two retries");

    assert_eq!(answer, ServingStatus::Serving);
    assert_eq!(server.faults.calls(), 3, "2 UNAVAILABLE answers, then OK");
}

#[tokio::test]
async fn an_upstream_deadline_exceeded_is_our_attempt_timeout_and_is_retried() {
    // We told the server how long it had (grpc-timeout); its DEADLINE_EXCEEDED
    // is our attempt timer firing at the server, so an idempotent call is
    // retried like any attempt timeout.
    let (server, mut client) = retrying(Faults::deadline_exceeded_first(1), 3).await;

    let answer = call(&mut client, idempotent(health_check()))
        .await
        .expect("OK after one retry");

    assert_eq!(answer, ServingStatus::Serving);
    assert_eq!(server.faults.calls(), 2, "DEADLINE_EXCEEDED, then OK");
}

#[tokio::test]
async fn an_upstream_deadline_exceeded_on_the_last_attempt_is_our_timeout_answer() {
    let (server, mut client) = retrying(Faults::deadline_exceeded_first(5), 2).await;

    let status = call(&mut client, idempotent(health_check()))
        .await
        .expect_err("fails");

    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(
        status.message(),
        "the upstream did not answer within the attempt timeout",
        "the guard's own answer for its attempt timeout"
    );
    assert_eq!(server.faults.calls(), 2);
}

#[tokio::test]
async fn unavailable_is_not_retried_without_an_idempotency_key() {
    let (server, mut client) = retrying(Faults::unavailable_first(2), 3).await;

    let status = call(&mut client, health_check()).await.expect_err("fails");

    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "warming up", "the server's own answer");
    assert_eq!(server.faults.calls(), 1);
}

#[tokio::test]
async fn retries_stop_at_max_attempts_with_the_servers_answer() {
    let (server, mut client) = retrying(Faults::unavailable_first(5), 3).await;

    let status = call(&mut client, idempotent(health_check()))
        .await
        .expect_err("fails");

    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "warming up");
    assert_eq!(server.faults.calls(), 3);
}

#[tokio::test]
async fn an_open_circuit_answers_unavailable_without_calling_the_server() {
    let server = HealthServer::start(Faults::unavailable_first(usize::MAX)).await;
    let config = Guard {
        breaker: BreakerPolicy::consecutive_failures(2).open_for(Duration::from_secs(30)),
        ..Guard::default()
    };
    let mut client = guarded_client(server.addr, &guard(&config));

    for _ in 0..2 {
        let status = call(&mut client, health_check()).await.expect_err("fails");
        assert_eq!(status.message(), "warming up", "the server answered");
    }
    assert_eq!(server.faults.calls(), 2);

    let status = call(&mut client, health_check()).await.expect_err("fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "the upstream is failing; calls are paused"
    );
    assert!(
        status.metadata().get("grpc-retry-pushback-ms").is_some(),
        "{:?}",
        status.metadata()
    );
    assert_eq!(server.faults.calls(), 2, "the server was not called");
}

#[tokio::test]
async fn a_forced_open_circuit_answers_unavailable_without_calling_the_server() {
    let server = HealthServer::start(Faults::default()).await;
    let layer = guard(&Guard::default());
    layer
        .breaker_handle()
        .expect("a breaker is on by default")
        .force_open();
    let mut client = guarded_client(server.addr, &layer);

    let status = call(&mut client, health_check()).await.expect_err("fails");

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(server.faults.calls(), 0);
}

#[tokio::test]
async fn one_guard_keeps_a_breaker_per_server() {
    let failing = HealthServer::start(Faults::unavailable_first(usize::MAX)).await;
    let healthy = HealthServer::start(Faults::default()).await;
    let config = Guard {
        breaker: BreakerPolicy::consecutive_failures(2).open_for(Duration::from_secs(30)),
        ..Guard::default()
    };
    let layer = guard(&config);
    let mut to_failing = guarded_client(failing.addr, &layer);
    let mut to_healthy = guarded_client(healthy.addr, &layer);

    for _ in 0..3 {
        call(&mut to_failing, health_check())
            .await
            .expect_err("fails");
    }
    let answer = call(&mut to_healthy, health_check()).await;

    assert_eq!(answer.expect("OK"), ServingStatus::Serving);
    assert_eq!(
        failing.faults.calls(),
        2,
        "the third call met an open circuit"
    );
    let handle = layer.breaker_handle().expect("a breaker");
    let states: Vec<(String, String)> = handle
        .snapshots()
        .into_iter()
        .map(|(key, snapshot)| (key, snapshot.state.as_str().to_string()))
        .collect();
    let mut expected = vec![
        (failing.addr.to_string(), "open".to_string()),
        (healthy.addr.to_string(), "closed".to_string()),
    ];
    expected.sort();
    assert_eq!(states, expected);
}

// ---------------------------------------------------------------------------
// The guarded client
// ---------------------------------------------------------------------------

/// A guard's settings in these tests.
#[derive(Clone, Debug)]
struct Guard {
    attempt_timeout: Duration,
    deadline: Duration,
    retry: RetryPolicy,
    breaker: BreakerPolicy,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            breaker: BreakerPolicy::default(),
        }
    }
}

fn guard(config: &Guard) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(config.attempt_timeout)
        .deadline(config.deadline)
        .retry(config.retry.clone())
        .circuit_breaker(config.breaker.clone())
        .build()
        .expect("a valid guard configuration")
}

/// A server with `faults`, and a client whose guard makes up to
/// `max_attempts` quick attempts.
async fn retrying(
    faults: Faults,
    max_attempts: u32,
) -> (HealthServer, HealthClient<GuardedChannel>) {
    let server = HealthServer::start(faults).await;
    let config = Guard {
        retry: quick_retry(max_attempts),
        ..Guard::default()
    };
    let client = guarded_client(server.addr, &guard(&config));
    (server, client)
}

fn quick_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(max_attempts)
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
}

/// Marks a call as safe to repeat, so the guard may resend it.
fn idempotent(
    mut request: tonic::Request<HealthCheckRequest>,
) -> tonic::Request<HealthCheckRequest> {
    request.metadata_mut().insert(
        "idempotency-key",
        "test-call".parse().expect("valid metadata"),
    );
    request
}

/// One health check, bounded by [`STEP`].
async fn call(
    client: &mut HealthClient<GuardedChannel>,
    request: tonic::Request<HealthCheckRequest>,
) -> Result<ServingStatus, Status> {
    let answer = tokio::time::timeout(STEP, client.check(request))
        .await
        .expect("the call ended within the step limit")?;
    Ok(answer.into_inner().status())
}
