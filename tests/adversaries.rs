//! Promises that hold against adversaries: what a slow, silent or departing
//! client, or a caller-chosen deadline, can make the guard do to everyone else.
//!
//! Each test drives a real guarded axum gateway (`support/gateway.rs`) on
//! 127.0.0.1 in front of the fault upstream (`support/upstream.rs`), as an
//! attacker or an unlucky caller would: raw TCP when the attack is in how the
//! bytes arrive, a plain HTTP client otherwise. The rules under test are the
//! crate docs' "Who pays for a failure":
//!
//! - nothing a client does before its request reaches the upstream holds a
//!   half-open probe or a concurrency permit, and reading a body to replay is
//!   bounded by the deadline (a body that does not arrive is answered `408`);
//! - only failures the upstream caused count against its breaker: not a
//!   deadline the caller chose, not the caller's body, not the caller leaving;
//! - a concurrency permit is held until the response body is over.

mod support;

#[path = "support/gateway.rs"]
mod gateway;

use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::{caller, exchange, Exchange, Gateway};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::upstream::{refused_addr, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use upstream_guard::{BreakerPolicy, Builder, RetryPolicy, UpstreamGuardLayer};

/// The longest any one exchange may take before the test calls it a hang.
const BOUND: Duration = Duration::from_secs(10);

/// A guard whose breaker opens on the first failure and half-opens after
/// 200 ms with a single probe.
fn fragile() -> Builder {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(2))
        .deadline(Duration::from_secs(5))
        .retry(RetryPolicy::default().backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .circuit_breaker(
            BreakerPolicy::consecutive_failures(1)
                .open_for(Duration::from_millis(200))
                .half_open_probes(1),
        )
}

async fn start(builder: Builder) -> (Upstream, Gateway) {
    let upstream = Upstream::start().await;
    let refused = refused_addr();
    let layer = builder.build().expect("a valid guard configuration");
    let gateway = Gateway::start(&upstream.authority(), &refused.to_string(), layer).await;
    (upstream, gateway)
}

async fn send(request: Request<Full<Bytes>>) -> Exchange {
    exchange(&caller(), request, BOUND)
        .await
        .expect("the gateway answered")
}

async fn get(gateway: &Gateway, path: &str) -> Exchange {
    let request = Request::get(gateway.url(path))
        .body(Full::default())
        .expect("a valid request");
    send(request).await
}

/// The problem `type` of a synthesized answer, without the common prefix.
fn problem(answer: &Exchange) -> String {
    let body = answer.body.as_ref().expect("a complete body");
    let value: serde_json::Value = serde_json::from_slice(body).expect("problem+json");
    value["type"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("urn:upstream-guard:problem:")
        .to_string()
}

/// Opens the breaker (one 502 from the upstream), then waits out its open
/// period so the next request is the half-open probe.
async fn open_then_half_open(gateway: &Gateway) {
    let failed = get(gateway, "/status/502").await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    let rejected = get(gateway, "/ok").await;
    assert_eq!(rejected.status, StatusCode::SERVICE_UNAVAILABLE, "open");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A client that sends a request head announcing a body, then `sent` bytes of
/// it, and then nothing: the connection stays open as long as the value lives.
async fn silent_client(gateway: &Gateway, head: &str, sent: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(gateway.addr())
        .await
        .expect("connect to the gateway");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    stream.write_all(sent).await.expect("send part of the body");
    // Let the gateway read the head and start the guarded request.
    tokio::time::sleep(Duration::from_millis(150)).await;
    stream
}

/// Reads what the gateway answers on a raw connection until it closes or the
/// head and `Content-Length` bytes of body are in, bounded by `bound`.
async fn raw_answer(stream: &mut TcpStream, bound: Duration) -> Option<String> {
    let read = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse::<usize>().ok());
                if length.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
        }
        Some(String::from_utf8_lossy(&seen).into_owned())
    };
    tokio::time::timeout(bound, read).await.ok().flatten()
}

// ---------------------------------------------------------------------------
// 1. A slow client holds nothing
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_client_that_never_sends_its_body_holds_no_half_open_probe() {
    let (_upstream, gateway) = start(fragile()).await;
    open_then_half_open(&gateway).await;

    // The attacker's PUT would be buffered for replay; its body never comes.
    let head = "PUT /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 10\r\n\r\n";
    let _attacker = silent_client(&gateway, head, b"").await;

    let probe = get(&gateway, "/ok").await;
    assert_eq!(
        probe.status,
        StatusCode::OK,
        "the probe was still free: {}",
        probe.label()
    );
    let after = get(&gateway, "/ok").await;
    assert_eq!(after.status, StatusCode::OK, "the breaker closed");
}

#[tokio::test]
async fn a_client_that_never_sends_its_body_holds_no_concurrency_permit() {
    let builder = UpstreamGuardLayer::builder()
        .deadline(Duration::from_secs(5))
        .circuit_breaker(BreakerPolicy::default().concurrency_limit(1));
    let (_upstream, gateway) = start(builder).await;

    let head = "PUT /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 10\r\n\r\n";
    let _attacker = silent_client(&gateway, head, b"0123").await;

    let answer = get(&gateway, "/ok").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.label());
}

#[tokio::test]
async fn a_body_that_does_not_arrive_by_the_deadline_is_answered_408() {
    let builder = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(300))
        .deadline(Duration::from_millis(600));
    let (upstream, gateway) = start(builder).await;

    let head = "PUT /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 10\r\n\r\n";
    let started = Instant::now();
    let mut attacker = silent_client(&gateway, head, b"0123").await;
    let answer = raw_answer(&mut attacker, Duration::from_secs(5))
        .await
        .expect("an answer while the client is still connected");

    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("urn:upstream-guard:problem:request-body-timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "about the deadline"
    );
    assert_eq!(upstream.count("/echo"), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn an_inbound_grpc_timeout_bounds_reading_the_body() {
    let builder = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(20))
        .deadline(Duration::from_secs(30));
    let (upstream, gateway) = start(builder).await;

    let head = "POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/grpc\r\n\
                grpc-timeout: 300m\r\ncontent-length: 10\r\n\r\n";
    let started = Instant::now();
    let mut attacker = silent_client(&gateway, head, b"01").await;
    let answer = raw_answer(&mut attacker, Duration::from_secs(5))
        .await
        .expect("an answer within the caller's own deadline");

    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("grpc-status: 4"),
        "DEADLINE_EXCEEDED: {answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(upstream.count("/echo"), 0);
}

// ---------------------------------------------------------------------------
// 2. Only the upstream's own failures count against it
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_caller_chosen_grpc_timeout_never_opens_the_breaker() {
    let builder = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(2))
        .deadline(Duration::from_secs(5))
        .retry(RetryPolicy::disabled())
        .circuit_breaker(BreakerPolicy::consecutive_failures(3));
    let (_upstream, gateway) = start(builder).await;

    for _ in 0..5 {
        // A healthy upstream that takes 100 ms, a caller that allows 1 ms.
        let request = Request::post(gateway.url("/slow/100"))
            .header("content-type", "application/grpc")
            .header("grpc-timeout", "1m")
            .body(Full::default())
            .expect("a valid request");
        let answer = send(request).await;
        assert_eq!(
            answer.header("grpc-status"),
            Some("4"),
            "{}",
            answer.label()
        );
    }

    let after = get(&gateway, "/ok").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.label());
}

/// No retries, so request bodies stream through and the attempt timer covers
/// them; the breaker opens on the second failure in a row.
fn streaming(attempt_timeout: Duration) -> Builder {
    UpstreamGuardLayer::builder()
        .attempt_timeout(attempt_timeout)
        .deadline(Duration::from_secs(5))
        .retry(RetryPolicy::disabled())
        .circuit_breaker(BreakerPolicy::consecutive_failures(2))
}

#[tokio::test]
async fn a_stalled_streamed_body_is_answered_408_and_does_not_count() {
    let (_upstream, gateway) = start(streaming(Duration::from_millis(300))).await;

    for _ in 0..3 {
        let head = "POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 100\r\n\r\n";
        let mut slow = silent_client(&gateway, head, b"0123456789").await;
        let answer = raw_answer(&mut slow, Duration::from_secs(5))
            .await
            .expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("urn:upstream-guard:problem:request-body-timeout"));
    }

    let after = get(&gateway, "/ok").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.label());
}

#[tokio::test]
async fn a_caller_that_leaves_mid_body_does_not_count() {
    let (upstream, gateway) = start(streaming(Duration::from_secs(2))).await;

    for _ in 0..3 {
        let head = "POST /echo HTTP/1.1\r\nhost: gateway\r\ncontent-length: 100\r\n\r\n";
        let leaving = silent_client(&gateway, head, b"0123456789").await;
        drop(leaving);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let after = get(&gateway, "/ok").await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.label());
    assert_eq!(upstream.count("/ok"), 1);
}

// ---------------------------------------------------------------------------
// 4. The concurrency permit lives as long as the upstream's work
// ---------------------------------------------------------------------------

fn limited_to_one() -> Builder {
    UpstreamGuardLayer::builder()
        .deadline(Duration::from_secs(5))
        .circuit_breaker(BreakerPolicy::default().concurrency_limit(1))
}

#[tokio::test]
async fn a_streaming_response_holds_its_permit_until_the_body_ends() {
    let (_upstream, gateway) = start(limited_to_one()).await;
    let client = caller();

    // 10 chunks, 50 ms apart: the upstream is busy for about half a second.
    let request = Request::get(gateway.url("/stream/10/50"))
        .body(Full::default())
        .expect("a valid request");
    let streaming = tokio::time::timeout(BOUND, client.request(request))
        .await
        .expect("headers in time")
        .expect("a response");
    assert_eq!(streaming.status(), StatusCode::OK);

    let second = get(&gateway, "/ok").await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem(&second), "concurrency-limited");

    let body = tokio::time::timeout(BOUND, streaming.into_body().collect())
        .await
        .expect("the stream ended in time")
        .expect("a complete body")
        .to_bytes();
    assert!(body.ends_with(b"chunk-9\n"));

    let third = get(&gateway, "/ok").await;
    assert_eq!(third.status, StatusCode::OK, "{}", third.label());
}

#[tokio::test]
async fn three_endless_bodies_under_a_limit_of_one_get_one_200() {
    let (_upstream, gateway) = start(limited_to_one()).await;
    let client = caller();
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for _ in 0..3 {
        let request = Request::get(gateway.url("/stream/1000/50"))
            .body(Full::default())
            .expect("a valid request");
        let response = tokio::time::timeout(BOUND, client.request(request))
            .await
            .expect("headers in time")
            .expect("a response");
        statuses.push(response.status());
        open.push(response);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE
        ]
    );
}

#[tokio::test]
async fn a_dropped_response_body_gives_its_permit_back() {
    let (_upstream, gateway) = start(limited_to_one()).await;
    let client = caller();
    let request = Request::get(gateway.url("/stream/1000/50"))
        .body(Full::default())
        .expect("a valid request");
    let endless = tokio::time::timeout(BOUND, client.request(request))
        .await
        .expect("headers in time")
        .expect("a response");
    assert_eq!(endless.status(), StatusCode::OK);
    drop(endless);

    // The gateway notices the caller left when its next write fails: poll,
    // bounded, until the permit is back.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = get(&gateway, "/ok").await;
        if answer.status == StatusCode::OK {
            break;
        }
        assert_eq!(problem(&answer), "concurrency-limited");
        assert!(Instant::now() < deadline, "the permit never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// 5. A failure hook cannot break the response it edits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_failure_hook_that_rewrites_the_body_is_framed_by_its_length() {
    let replacement = Bytes::from(vec![b'x'; 322]);
    let body = replacement.clone();
    let builder = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .map_failure_response(move |_, response| *response.body_mut() = body.clone());
    let (_upstream, gateway) = start(builder).await;

    let answer = get(&gateway, "/reset").await;

    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.header("content-length"), Some("322"));
    assert_eq!(answer.body.as_ref().expect("a complete body"), &replacement);
}

#[tokio::test]
async fn a_head_failure_has_no_body_even_when_the_hook_sets_one() {
    use tower::{service_fn, Layer, ServiceExt};
    let layer = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .map_failure_response(|_, response| {
            *response.body_mut() = Bytes::from_static(b"a body for HEAD");
        })
        .build()
        .expect("a valid guard configuration");
    let refused = service_fn(
        |_: Request<upstream_guard::RequestBody<Full<Bytes>>>| async {
            Err::<http::Response<Full<Bytes>>, _>(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))
        },
    );
    let request = Request::builder()
        .method(Method::HEAD)
        .uri("http://upstream.internal/")
        .body(Full::default())
        .expect("a valid request");

    let response = layer
        .layer(refused)
        .oneshot(request)
        .await
        .expect("infallible");

    assert_eq!(response.headers()["content-length"], "15");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    assert!(body.is_empty());
}

// ---------------------------------------------------------------------------
// 3. Retries are paid for per upstream, over a window that slides
// ---------------------------------------------------------------------------

/// Sends `n` GETs to `path` with breaker key `key`, one after the other.
async fn traffic(gateway: &Gateway, key: &str, path: &str, n: usize) {
    for _ in 0..n {
        let request = Request::get(gateway.url(path))
            .header(gateway::KEY_HEADER, key)
            .body(Full::default())
            .expect("a valid request");
        send(request).await;
    }
}

/// A guard retrying 503s once, with a budget of `ratio` and no per-second
/// reserve, and one breaker (that never opens) per `x-chaos-key`.
fn budgeted(ratio: f64, window: Duration) -> Builder {
    UpstreamGuardLayer::builder()
        .retry(
            RetryPolicy::default()
                .max_attempts(2)
                .backoff(Duration::from_millis(1), Duration::from_millis(2))
                .budget(ratio, 0)
                .budget_window(window),
        )
        .circuit_breaker(
            BreakerPolicy::consecutive_failures(1_000_000)
                .per_key(|parts| parts.headers.get(gateway::KEY_HEADER)?.to_str().ok()),
        )
}

#[tokio::test]
async fn a_failing_upstream_cannot_spend_the_retry_budget_others_paid_for() {
    let (upstream, gateway) = start(budgeted(0.2, Duration::from_secs(60))).await;

    traffic(&gateway, "healthy", "/ok", 100).await;
    traffic(&gateway, "failing", "/status/503", 20).await;

    // 20 first attempts; retries at most 20 % of the failing key's own 20
    // requests (4). One shared budget would have granted all 20.
    let sent = upstream.count("/status/503");
    assert!(sent <= 24, "{sent} requests reached the failing upstream");
    assert!(
        sent >= 21,
        "its own deposits still pay for some retries: {sent}"
    );
}

#[tokio::test]
async fn deposits_survive_a_spell_without_retries() {
    // Steady healthy traffic for 3 s with no retry (nobody reads the budget's
    // clock), then a burst of failures: the last 2 s of deposits still count.
    let (upstream, gateway) = start(budgeted(0.5, Duration::from_secs(2))).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        traffic(&gateway, "one", "/ok", 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    traffic(&gateway, "one", "/status/503", 10).await;

    let retries = upstream.count("/status/503") - 10;
    assert_eq!(retries, 10, "each failure retried once");
}
