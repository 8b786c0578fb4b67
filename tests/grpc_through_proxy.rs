//! gRPC through the proxies, on real sockets: a tonic client calls a gRPC server
//! (`grpc.health.v1.Health`) through each proxy in this repository, which
//! serves h2c next to HTTP/1.1 and forwards gRPC calls upstream over h2c. Each
//! test runs against the `reverse_proxy` example, the `gateway` example in
//! proxy mode (both as child processes) and the tests' in-process gateway
//! (`tests/support/gateway.rs`): they share their proxying and their upstream
//! client (`examples/common/proxy.rs`), and serve alike.
//!
//! `cargo test` builds examples into `target/<profile>/examples/`; when running
//! only this test (`cargo test --test grpc_through_proxy`), build the examples
//! first with `cargo build --example reverse_proxy --example gateway`.

mod support;

#[path = "support/gateway.rs"]
mod gateway;
#[path = "support/grpc.rs"]
mod grpc;

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use upstream_guard::UpstreamGuardLayer;

use gateway::Gateway;
use grpc::{refused_addr, Faults, HealthServer, Script, ScriptedServer};
use support::example_process::{Example, ExampleProcess};
use support::upstream::Upstream;

/// Upper bound for any one call, so a broken proxy fails a test instead of
/// hanging it.
const STEP: Duration = Duration::from_secs(10);
/// Slack for timing assertions: scheduling on a busy CI machine.
const SLACK: Duration = Duration::from_millis(600);
/// The caller's own deadline in the deadline tests.
const CALLER_DEADLINE: Duration = Duration::from_millis(300);
/// How long a hanging upstream takes to answer: far beyond every deadline.
const HANG: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_grpc_call_through_the_proxy_is_answered_by_the_upstream() {
    for placement in Placement::ALL {
        let server = HealthServer::start(Faults::default()).await;
        let proxy = placement.start(server.addr, Timeouts::ROOMY).await;

        let answer = check(&mut channel_client(proxy.addr()), health_check("")).await;

        let answer = answer.unwrap_or_else(|status| panic!("{placement}: {status:?}"));
        assert_eq!(answer, ServingStatus::Serving, "{placement}");
        assert_eq!(server.faults.calls(), 1, "{placement}");
    }
}

#[tokio::test]
async fn an_upstream_error_status_reaches_the_client_unchanged() {
    for placement in Placement::ALL {
        let server = HealthServer::start(Faults::default()).await;
        let proxy = placement.start(server.addr, Timeouts::ROOMY).await;

        let answer = check(
            &mut channel_client(proxy.addr()),
            health_check("no.such.Service"),
        )
        .await;

        let status = answer.expect_err("the server does not know the service");
        assert_eq!(status.code(), Code::NotFound, "{placement}: {status:?}");
        assert_eq!(status.message(), "service not registered", "{placement}");
    }
}

#[tokio::test]
async fn a_status_in_the_trailers_after_a_message_reaches_the_client() {
    for placement in Placement::ALL {
        let server = ScriptedServer::start(Script {
            statuses: vec![ServingStatus::Serving],
            gap: Duration::ZERO,
            code: Code::FailedPrecondition,
            message: "widget 7 is not ready",
        })
        .await;
        let proxy = placement.start(server.addr, Timeouts::ROOMY).await;

        let answer = check(&mut channel_client(proxy.addr()), health_check("")).await;

        let status = answer.expect_err("the trailers carry a failure");
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{placement}: {status:?}"
        );
        assert_eq!(status.message(), "widget 7 is not ready", "{placement}");
    }
}

#[tokio::test]
async fn a_streamed_reply_arrives_message_by_message_then_its_status() {
    let gap = Duration::from_millis(250);
    for placement in Placement::ALL {
        let server = ScriptedServer::start(Script {
            statuses: vec![
                ServingStatus::Serving,
                ServingStatus::NotServing,
                ServingStatus::Serving,
            ],
            gap,
            code: Code::Aborted,
            message: "stream over",
        })
        .await;
        let proxy = placement.start(server.addr, Timeouts::ROOMY).await;

        let (arrivals, end) = tokio::time::timeout(STEP, watch(proxy.addr()))
            .await
            .unwrap_or_else(|_| panic!("{placement}: the stream did not end within {STEP:?}"));

        let statuses: Vec<ServingStatus> = arrivals.iter().map(|(status, _)| *status).collect();
        assert_eq!(
            statuses,
            [
                ServingStatus::Serving,
                ServingStatus::NotServing,
                ServingStatus::Serving
            ],
            "{placement}"
        );
        let (first, last) = (arrivals[0].1, arrivals[2].1);
        assert!(
            first + gap < last,
            "{placement}: the first message came at {first:?}, the last at {last:?}"
        );
        assert_eq!(end.code(), Code::Aborted, "{placement}: {end:?}");
        assert_eq!(end.message(), "stream over", "{placement}");
    }
}

#[tokio::test]
async fn the_upstream_receives_the_call_over_h2c_with_te_trailers() {
    for placement in Placement::ALL {
        let server = ScriptedServer::start(Script {
            statuses: vec![ServingStatus::Serving],
            gap: Duration::ZERO,
            code: Code::Ok,
            message: "",
        })
        .await;
        let proxy = placement.start(server.addr, Timeouts::ROOMY).await;

        let answer = check(&mut channel_client(proxy.addr()), health_check("")).await;
        assert_eq!(answer.ok(), Some(ServingStatus::Serving), "{placement}");

        let calls = server.calls();
        assert_eq!(calls.len(), 1, "{placement}: {calls:?}");
        let call = &calls[0];
        assert_eq!(call.version, Version::HTTP_2, "{placement}");
        let upstream = server.addr.to_string();
        assert_eq!(
            call.uri.authority().map(|a| a.as_str()),
            Some(upstream.as_str()),
            "{placement}: the upstream is addressed by its own name"
        );
        assert_eq!(call.headers.get("host"), None, "{placement}: {call:?}");
        assert_eq!(
            call.headers.get("te").map(|v| v.as_bytes()),
            Some(&b"trailers"[..]),
            "{placement}: {call:?}"
        );
        assert_eq!(
            call.headers.get("x-forwarded-for").map(|v| v.as_bytes()),
            Some(&b"127.0.0.1"[..]),
            "{placement}: {call:?}"
        );
    }
}

#[tokio::test]
async fn a_dead_upstream_is_unavailable() {
    for placement in Placement::ALL {
        let proxy = placement.start(refused_addr().await, Timeouts::ROOMY).await;

        let answer = check(&mut channel_client(proxy.addr()), health_check("")).await;

        let status = answer.expect_err("nothing listens upstream");
        assert_eq!(status.code(), Code::Unavailable, "{placement}: {status:?}");
    }
}

#[tokio::test]
async fn a_hanging_upstream_is_deadline_exceeded_within_the_callers_deadline() {
    for placement in Placement::ALL {
        let server = HealthServer::start_ignoring_deadlines(Faults::delay(HANG)).await;
        let proxy = placement.start(server.addr, Timeouts::ROOMY).await;
        // A client that leaves the deadline to the proxy: the answer is the
        // proxy's, not the client's own timer's.
        let mut client = bare_client(proxy.addr());
        let mut request = health_check("");
        request.set_timeout(CALLER_DEADLINE);

        let started = Instant::now();
        let answer = check(&mut client, request).await;
        let elapsed = started.elapsed();

        let status = answer.expect_err("the upstream hangs");
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{placement}: {status:?}"
        );
        assert!(
            elapsed >= CALLER_DEADLINE - Duration::from_millis(20)
                && elapsed < CALLER_DEADLINE + SLACK,
            "{placement}: answered after {elapsed:?}"
        );
    }
}

#[tokio::test]
async fn a_hanging_upstream_is_deadline_exceeded_at_the_proxys_deadline() {
    for placement in Placement::ALL {
        let server = HealthServer::start_ignoring_deadlines(Faults::delay(HANG)).await;
        let proxy = placement.start(server.addr, Timeouts::SHORT).await;

        let started = Instant::now();
        let answer = check(&mut channel_client(proxy.addr()), health_check("")).await;
        let elapsed = started.elapsed();

        let status = answer.expect_err("the upstream hangs");
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "{placement}: {status:?}"
        );
        let deadline = Duration::from_millis(Timeouts::SHORT.deadline_ms);
        assert!(
            elapsed >= deadline - Duration::from_millis(20) && elapsed < deadline + SLACK,
            "{placement}: answered after {elapsed:?}"
        );
    }
}

#[tokio::test]
async fn an_http2_callers_plain_request_goes_upstream_over_http_1_1() {
    for placement in Placement::ALL {
        // This upstream speaks HTTP/1.1 only.
        let upstream = Upstream::start().await;
        let proxy = placement.start(upstream.addr(), Timeouts::ROOMY).await;
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let request = Request::get(format!("http://{}/ok", proxy.addr()))
            .body(Full::new(Bytes::new()))
            .expect("a valid request");

        let exchange = async {
            let response = client.request(request).await.expect("an answer");
            let status = response.status();
            let version = response.version();
            let body = response.into_body().collect().await.expect("a body");
            (status, version, body.to_bytes())
        };
        let (status, version, body) = tokio::time::timeout(STEP, exchange)
            .await
            .unwrap_or_else(|_| panic!("{placement}: no answer within {STEP:?}"));

        assert_eq!(status, StatusCode::OK, "{placement}: {body:?}");
        assert_eq!(
            version,
            Version::HTTP_2,
            "{placement}: the caller's protocol"
        );
        assert_eq!(upstream.count("/ok"), 1, "{placement}");
    }
}

// ---------------------------------------------------------------------------
// The proxies
// ---------------------------------------------------------------------------

/// A proxy under test.
#[derive(Clone, Copy, Debug)]
enum Placement {
    /// `examples/reverse_proxy.rs`, with one route `/` to the upstream.
    ReverseProxy,
    /// `examples/gateway/` in proxy mode.
    GatewayExample,
    /// `tests/support/gateway.rs`, in this process.
    TestGateway,
}

impl Placement {
    const ALL: [Placement; 3] = [
        Placement::ReverseProxy,
        Placement::GatewayExample,
        Placement::TestGateway,
    ];

    /// Starts this proxy in front of `upstream` and waits until it listens.
    async fn start(self, upstream: SocketAddr, timeouts: Timeouts) -> Running {
        let attempt = timeouts.attempt_ms.to_string();
        let deadline = timeouts.deadline_ms.to_string();
        let guard_flags = ["--attempt-timeout-ms", &attempt, "--deadline-ms", &deadline];
        match self {
            Placement::ReverseProxy => {
                let route = format!("/=http://{upstream}");
                let mut args = vec!["--listen", "127.0.0.1:0", "--route", &route];
                args.extend(guard_flags);
                Running::Example(Example("reverse_proxy").start(&args).await)
            }
            Placement::GatewayExample => {
                let url = format!("http://{upstream}");
                let mut args = vec!["--listen", "127.0.0.1:0", "--upstream", &url];
                args.extend(guard_flags);
                Running::Example(Example("gateway").start(&args).await)
            }
            Placement::TestGateway => {
                let layer = UpstreamGuardLayer::builder()
                    .attempt_timeout(Duration::from_millis(timeouts.attempt_ms))
                    .deadline(Duration::from_millis(timeouts.deadline_ms))
                    .build()
                    .expect("a valid guard configuration");
                let refused = refused_addr().await.to_string();
                let gateway = Gateway::start(&upstream.to_string(), &refused, layer).await;
                Running::InProcess(gateway)
            }
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The guard's timeouts in a proxy under test.
#[derive(Clone, Copy, Debug)]
struct Timeouts {
    attempt_ms: u64,
    deadline_ms: u64,
}

impl Timeouts {
    /// Longer than any test's calls take, and than the caller's own deadline.
    const ROOMY: Timeouts = Timeouts {
        attempt_ms: 2_000,
        deadline_ms: 5_000,
    };
    /// The proxy's deadline is the one that ends a hanging call.
    const SHORT: Timeouts = Timeouts {
        attempt_ms: 300,
        deadline_ms: 300,
    };
}

/// A running proxy; dropping it stops it.
enum Running {
    Example(ExampleProcess),
    InProcess(Gateway),
}

impl Running {
    fn addr(&self) -> SocketAddr {
        match self {
            Running::Example(process) => process.addr(),
            Running::InProcess(gateway) => gateway.addr(),
        }
    }
}

// ---------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------

/// A tonic client on a `Channel` to the proxy, as an application makes one.
fn channel_client(proxy: SocketAddr) -> HealthClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{proxy}")).expect("a valid endpoint");
    HealthClient::new(endpoint.connect_lazy())
}

/// The tonic client on a bare hyper-util h2c client instead of a `Channel`. A
/// `Channel` enforces a call's timeout itself (and ends the call `CANCELLED`
/// the instant it passes, a moment before the proxy's answer for the same
/// deadline can arrive); this one only sends it as `grpc-timeout`, so what the
/// call returns is what the proxy answered.
fn bare_client(proxy: SocketAddr) -> HealthClient<Client<HttpConnector, tonic::body::Body>> {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin = format!("http://{proxy}").parse().expect("a valid URI");
    HealthClient::with_origin(client, origin)
}

/// A health check for `service` (`""`: the server as a whole).
fn health_check(service: &str) -> tonic::Request<HealthCheckRequest> {
    tonic::Request::new(HealthCheckRequest {
        service: service.to_string(),
    })
}

/// One health check, bounded by [`STEP`].
async fn check<T>(
    client: &mut HealthClient<T>,
    request: tonic::Request<HealthCheckRequest>,
) -> Result<ServingStatus, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let answer = tokio::time::timeout(STEP, client.check(request))
        .await
        .expect("the call ended within the step limit")?;
    Ok(answer.into_inner().status())
}

/// Watches the health of the server through the proxy at `proxy`: each
/// message's status and when it arrived (from the call's start), and the
/// status the stream ended with.
async fn watch(proxy: SocketAddr) -> (Vec<(ServingStatus, Duration)>, Status) {
    let started = Instant::now();
    let mut client = channel_client(proxy);
    let mut stream = match client.watch(health_check("")).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (Vec::new(), status),
    };
    let mut arrivals = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(message)) => arrivals.push((message.status(), started.elapsed())),
            Ok(None) => return (arrivals, Status::ok("")),
            Err(status) => return (arrivals, status),
        }
    }
}
