//! The `tonic` feature's client side: `GuardedChannel`, a guarded tonic
//! `Channel` with a name, against a real gRPC server on 127.0.0.1.

#[path = "support/grpc.rs"]
mod grpc;

use std::time::Duration;

use http::Uri;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use upstream_guard::tonic::GuardedChannel;
use upstream_guard::{BreakerPolicy, RetryPolicy, UpstreamGuardLayer};

use grpc::{health_check, refused_addr, Faults, HealthServer};

/// Upper bound for any one call, so a broken guard fails a test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

/// What a service that keeps a guarded client looks like: the type is
/// written out, in a field and in a function's return type.
struct Checker {
    health: HealthClient<GuardedChannel>,
}

/// A guarded health client for `addr`, built the plain way (`new`): the
/// channel stamps its origin on each request.
fn checker(addr: std::net::SocketAddr, guard: &UpstreamGuardLayer) -> Checker {
    let origin: Uri = format!("http://{addr}").parse().expect("a valid URI");
    let channel: Channel = Endpoint::from(origin.clone()).connect_lazy();
    let guarded = GuardedChannel::new(guard, channel, origin).expect("an absolute origin");
    Checker {
        health: HealthClient::new(guarded),
    }
}

fn guard(breaker: BreakerPolicy) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .circuit_breaker(breaker)
        .build()
        .expect("a valid guard configuration")
}

#[tokio::test]
async fn a_client_returned_from_a_function_calls_the_server_from_a_spawned_task() {
    let server = HealthServer::start(Faults::default()).await;
    let mut checker = checker(server.addr, &guard(BreakerPolicy::default()));

    // Spawning needs the call's future to be `Send`: the bound an `impl
    // GrpcService` return type could not promise.
    let call = tokio::spawn(async move { checker.health.check(health_check()).await });
    let answer = tokio::time::timeout(STEP, call)
        .await
        .expect("answered in time")
        .expect("the task ran")
        .expect("OK");

    assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
    assert_eq!(server.faults.calls(), 1);
}

#[tokio::test]
async fn a_stub_built_with_new_is_keyed_by_the_channels_origin() {
    let addr = refused_addr().await;
    let guard = guard(BreakerPolicy::consecutive_failures(1));
    let mut checker = checker(addr, &guard);

    let status = tokio::time::timeout(STEP, checker.health.check(health_check()))
        .await
        .expect("answered in time")
        .expect_err("nothing listens");

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let breakers = guard.breaker_handle().expect("a breaker");
    let keyed = breakers.snapshot_for(&addr.to_string());
    assert_eq!(
        keyed.map(|snapshot| snapshot.state),
        Some(upstream_guard::CircuitState::Open),
        "keys: {:?}",
        breakers.snapshots()
    );
}

#[tokio::test]
async fn an_origin_without_a_host_is_a_configuration_error() {
    let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let guard = guard(BreakerPolicy::default());

    let error = GuardedChannel::new(&guard, channel, Uri::from_static("/just/a/path"))
        .expect_err("no authority");

    assert_eq!(error.field(), "origin");
}
