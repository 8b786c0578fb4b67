//! Every row of the failure → response table, through a guarded hyper-util client
//! calling a real fault-injecting upstream on 127.0.0.1.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::guard::{get, guarded, request, send};
use support::upstream::{refused_addr, Upstream};
use upstream_guard::{FailureKind, RetryPolicy, UpstreamGuardLayer};

fn no_retry() -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(300))
        .deadline(Duration::from_secs(2))
        .retry(RetryPolicy::disabled())
        .build()
        .unwrap()
}

#[tokio::test]
async fn connection_refused_is_502_connect() {
    let client = guarded(&no_retry());
    let url = format!("http://{}/ok", refused_addr());
    let answer = send(&client, get(&url)).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let problem = answer.problem();
    assert_eq!(problem["type"], "urn:upstream-guard:problem:connect");
    assert_eq!(problem["title"], "Bad Gateway");
    assert_eq!(problem["attempts"], 1);
    assert_eq!(problem["upstream"], refused_addr_authority(&url));
    assert_eq!(answer.failure.unwrap().kind(), FailureKind::Connect);
}

fn refused_addr_authority(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches("/ok")
        .to_string()
}

#[tokio::test]
async fn reset_before_response_is_502_transport() {
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&no_retry()), get(&upstream.url("/reset"))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        answer.problem()["type"],
        "urn:upstream-guard:problem:transport"
    );
    assert_eq!(upstream.count("/reset"), 1);
}

#[tokio::test]
async fn connection_closed_without_response_is_502_transport() {
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&no_retry()), get(&upstream.url("/close"))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.failure.unwrap().kind(), FailureKind::Transport);
}

// Telling a parse error from a reset needs hyper's error kinds (feature `hyper`).
#[cfg(feature = "hyper")]
#[tokio::test]
async fn garbage_response_is_502_malformed() {
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&no_retry()), get(&upstream.url("/garbage"))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        answer.problem()["type"],
        "urn:upstream-guard:problem:malformed-response"
    );
}

// Telling a parse error from a reset needs hyper's error kinds (feature `hyper`).
#[cfg(feature = "hyper")]
#[tokio::test]
async fn bad_content_length_is_502_malformed() {
    let upstream = Upstream::start().await;
    let answer = send(
        &guarded(&no_retry()),
        get(&upstream.url("/bad-content-length")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        answer.failure.unwrap().kind(),
        FailureKind::MalformedResponse
    );
}

#[tokio::test]
async fn attempt_timeout_on_the_last_attempt_is_504() {
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&no_retry()), get(&upstream.url("/hang"))).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        answer.problem()["type"],
        "urn:upstream-guard:problem:attempt-timeout"
    );
}

#[tokio::test]
async fn deadline_exceeded_is_504() {
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(300))
        .deadline(Duration::from_millis(300))
        .retry(RetryPolicy::disabled())
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&layer), get(&upstream.url("/hang"))).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        answer.problem()["type"],
        "urn:upstream-guard:problem:deadline-exceeded"
    );
}

#[tokio::test]
async fn upstream_5xx_passes_through_unchanged() {
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&no_retry()), get(&upstream.url("/status/500"))).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.body, "status 500");
    assert_eq!(answer.headers["x-upstream"], "fault");
    assert!(answer.failure.is_none());
}

#[tokio::test]
async fn upstream_503_after_retries_are_spent_is_the_upstreams_own() {
    let layer = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::default().backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&layer), get(&upstream.url("/status/503"))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body, "status 503");
    assert_eq!(upstream.count("/status/503"), 3);
}

#[tokio::test]
async fn healthy_responses_pass_through_byte_identical() {
    let upstream = Upstream::start().await;
    let client = guarded(&no_retry());
    let answer = send(&client, get(&upstream.url("/big/300000"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let expected: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(answer.body.as_ref(), expected.as_slice());
}

#[tokio::test]
async fn streamed_response_bodies_pass_through_whole() {
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&no_retry()), get(&upstream.url("/stream/5/20"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let expected: String = (0..5).map(|i| format!("chunk-{i}\n")).collect();
    assert_eq!(answer.body, expected);
}

#[tokio::test]
async fn the_body_is_not_subject_to_the_attempt_timeout() {
    // Headers arrive at once; the body takes longer than the attempt timeout.
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&no_retry()), get(&upstream.url("/stream/3/200"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "chunk-0\nchunk-1\nchunk-2\n");
}

#[tokio::test]
async fn head_gets_no_body_but_a_failure_status() {
    let client = guarded(&no_retry());
    let url = format!("http://{}/ok", refused_addr());
    let answer = send(&client, request("HEAD", &url, "")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(answer.body.is_empty());
    assert_eq!(answer.headers["content-type"], "application/problem+json");
    let advertised: usize = answer.headers["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(advertised > 0, "HEAD advertises the GET body's length");
}

#[tokio::test]
async fn grpc_requests_get_trailers_only_unavailable() {
    let client = guarded(&no_retry());
    let url = format!("http://{}/pkg.Service/Method", refused_addr());
    let mut req = request("POST", &url, "");
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let answer = send(&client, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["grpc-status"], "14");
    assert_eq!(answer.headers["content-type"], "application/grpc");
    assert!(answer.headers["grpc-message"]
        .to_str()
        .unwrap()
        .contains("connect"));
    assert!(answer.body.is_empty());
}

#[tokio::test]
async fn grpc_timeouts_get_deadline_exceeded() {
    let upstream = Upstream::start().await;
    let mut req = request("POST", &upstream.url("/hang"), "");
    req.headers_mut()
        .insert("content-type", "application/grpc+proto".parse().unwrap());
    let answer = send(&guarded(&no_retry()), req).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["grpc-status"], "4");
}

#[tokio::test]
async fn request_id_is_echoed_and_error_text_is_hidden() {
    let client = guarded(&no_retry());
    let url = format!("http://{}/ok", refused_addr());
    let mut req = get(&url);
    req.headers_mut()
        .insert("x-request-id", "req-\"quoted\"-1".parse().unwrap());
    let answer = send(&client, req).await;
    let problem = answer.problem();
    assert_eq!(problem["request_id"], "req-\"quoted\"-1");
    let text = String::from_utf8_lossy(&answer.body);
    assert!(
        !text.to_lowercase().contains("refused"),
        "internal error text leaked: {text}"
    );
    assert!(
        !text.contains("tcp connect"),
        "internal error text leaked: {text}"
    );
}

#[tokio::test]
async fn error_details_are_shown_when_opted_in() {
    let layer = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .expose_error_details(true)
        .build()
        .unwrap();
    let url = format!("http://{}/ok", refused_addr());
    let answer = send(&guarded(&layer), get(&url)).await;
    let detail = answer.problem()["detail"].as_str().unwrap().to_string();
    assert!(detail.to_lowercase().contains("refused"), "{detail}");
}

#[tokio::test]
async fn a_hook_can_replace_the_synthesized_response() {
    let layer = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .map_failure_response(|failure, response| {
            *response =
                http::Response::new(bytes::Bytes::from(format!("custom {}", failure.kind())));
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        })
        .build()
        .unwrap();
    let url = format!("http://{}/ok", refused_addr());
    let answer = send(&guarded(&layer), get(&url)).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body, "custom connect");
}

#[tokio::test]
async fn a_configured_upstream_name_is_used_in_the_body() {
    let layer = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .upstream_name("payments")
        .build()
        .unwrap();
    let url = format!("http://{}/ok", refused_addr());
    let answer = send(&guarded(&layer), get(&url)).await;
    assert_eq!(answer.problem()["upstream"], "payments");
}

#[tokio::test]
async fn a_stalled_body_fails_after_the_idle_timeout_instead_of_hanging() {
    use http_body_util::BodyExt;
    let layer = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .body_idle_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let response = tower::ServiceExt::oneshot(guarded(&layer), get(&upstream.url("/stall-body")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "headers arrived");
    let started = std::time::Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the body ends instead of hanging")
        .expect_err("a stalled body is an error, not a short success");
    assert!(error.is::<upstream_guard::BodyIdleTimeout>(), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_slow_body_that_keeps_sending_is_not_cut_off_by_the_idle_timeout() {
    let layer = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .body_idle_timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    // Five chunks 100 ms apart: 500 ms in all, but never 150 ms of silence.
    let answer = send(&guarded(&layer), get(&upstream.url("/stream/5/100"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), 5 * "chunk-0\n".len());
}

#[tokio::test]
async fn a_truncated_body_is_an_error_not_a_short_success() {
    use http_body_util::BodyExt;
    let upstream = Upstream::start().await;
    let response =
        tower::ServiceExt::oneshot(guarded(&no_retry()), get(&upstream.url("/truncated")))
            .await
            .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the body ends");
    assert!(collected.is_err(), "50 of 100 bytes must not look complete");
}
