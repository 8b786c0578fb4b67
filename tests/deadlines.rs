//! Attempt timeouts, the overall deadline, and gRPC deadline propagation.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::guard::{get, guarded, request, send};
use support::observer::Recording;
use support::upstream::Upstream;
use upstream_guard::observe::RetryDenied;
use upstream_guard::{FailureKind, RetryPolicy, UpstreamGuardLayer};

/// Loopback is fast, but the machine is shared: allow this much scheduling slack.
const SLACK: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn the_deadline_bounds_a_hanging_upstream_across_retries() {
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(200))
        .deadline(Duration::from_millis(500))
        .retry(
            RetryPolicy::default()
                .max_attempts(10)
                .backoff(Duration::from_millis(1), Duration::from_millis(2))
                .no_budget(),
        )
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let started = Instant::now();
    let answer = send(&guarded(&layer), get(&upstream.url("/hang"))).await;
    let elapsed = started.elapsed();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(elapsed >= Duration::from_millis(500), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(500) + SLACK, "{elapsed:?}");
    // 200 ms attempts in a 500 ms deadline: at most three attempts could start.
    assert!(upstream.count("/hang") <= 3, "{}", upstream.count("/hang"));
    assert!(answer.failure.unwrap().kind().is_timeout());
}

#[tokio::test]
async fn no_retry_sleeps_past_the_deadline() {
    // The upstream asks for a 1 s pause; the deadline is shorter: answer at once
    // with the upstream's own 503 instead of sleeping into the deadline.
    let observer = Recording::default();
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(300))
        .deadline(Duration::from_millis(600))
        .observer(observer.clone())
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let started = Instant::now();
    let answer = send(
        &guarded(&layer),
        get(&upstream.url("/status/503?retry_after=1")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.headers["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.count("/status/503"), 1);
    assert_eq!(observer.denials(), vec![RetryDenied::Deadline]);
}

fn grpc_request(
    url: &str,
    timeout: Option<&str>,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = request("POST", url, "");
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    if let Some(t) = timeout {
        req.headers_mut().insert("grpc-timeout", t.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn an_inbound_grpc_timeout_shortens_the_deadline() {
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(5))
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let started = Instant::now();
    let answer = send(
        &guarded(&layer),
        grpc_request(&upstream.url("/hang"), Some("200m")),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["grpc-status"], "4");
    assert_eq!(
        answer.failure.unwrap().kind(),
        FailureKind::DeadlineExceeded
    );
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(200) + SLACK, "{elapsed:?}");
}

#[tokio::test]
async fn each_attempt_tells_the_grpc_upstream_what_is_left() {
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(2))
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    send(
        &guarded(&layer),
        grpc_request(&upstream.url("/ok"), Some("1S")),
    )
    .await;
    send(&guarded(&layer), grpc_request(&upstream.url("/ok"), None)).await;
    let sent: Vec<Duration> = upstream
        .requests()
        .iter()
        .map(|r| {
            let v = r.header("grpc-timeout").expect("grpc-timeout propagated");
            upstream_guard::grpc::parse_grpc_timeout(v.as_bytes())
                .expect("well-formed grpc-timeout")
        })
        .collect();
    // Capped by the inbound 1 s, then by the 2 s attempt timeout.
    assert!(
        sent[0] <= Duration::from_secs(1) && sent[0] > Duration::from_millis(500),
        "{sent:?}"
    );
    assert!(
        sent[1] <= Duration::from_secs(2) && sent[1] > Duration::from_millis(1500),
        "{sent:?}"
    );
}

#[tokio::test]
async fn a_malformed_grpc_timeout_is_ignored() {
    let layer = UpstreamGuardLayer::builder().build().unwrap();
    let upstream = Upstream::start().await;
    let answer = send(
        &guarded(&layer),
        grpc_request(&upstream.url("/ok"), Some("soon")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn a_slow_upstream_within_the_attempt_timeout_is_not_cut_off() {
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(500))
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&layer), get(&upstream.url("/slow/100"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(upstream.count("/slow"), 1);
}

#[tokio::test]
async fn every_timed_out_attempt_is_retried_then_answered_504() {
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(150))
        .deadline(Duration::from_secs(3))
        .retry(RetryPolicy::default().backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .build()
        .unwrap();
    let upstream = Upstream::start().await;
    // /slow/400 always exceeds the attempt timeout: every attempt times out.
    let answer = send(&guarded(&layer), get(&upstream.url("/slow/400"))).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        answer.failure.as_ref().unwrap().kind(),
        FailureKind::AttemptTimeout
    );
    assert_eq!(upstream.count("/slow"), 3);
    assert_eq!(answer.problem()["attempts"], 3);
}
