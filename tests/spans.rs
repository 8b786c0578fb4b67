//! The guard's tracing spans and their OpenTelemetry-style fields.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::guard::{get, guarded, send};
use support::spans::Recorder;
use support::upstream::{refused_addr, Upstream};
use upstream_guard::{BreakerPolicy, RetryPolicy, UpstreamGuardLayer};

fn layer() -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(300))
        .retry(RetryPolicy::default().backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_retried_request_has_one_request_span_and_a_span_per_attempt() {
    let recorder = Recorder::default();
    let _installed = recorder.install();
    let upstream = Upstream::start().await;
    let answer = send(&guarded(&layer()), get(&upstream.url("/flaky/2/spans"))).await;
    assert_eq!(answer.status, StatusCode::OK);

    let requests = recorder.spans_named("upstream_guard.request");
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.field("http.request.method"), Some("GET"));
    assert_eq!(
        request.field("server.address"),
        Some(upstream.authority().as_str())
    );
    assert_eq!(request.field("http.response.status_code"), Some("200"));
    assert_eq!(request.field("upstream_guard.outcome"), Some("success"));
    assert_eq!(request.field("upstream_guard.attempts"), Some("3"));
    assert_eq!(request.field("error.type"), None);

    let attempts = recorder.spans_named("upstream_guard.attempt");
    assert_eq!(attempts.len(), 3);
    assert!(attempts
        .iter()
        .all(|a| a.parent.as_deref() == Some("upstream_guard.request")));
    let statuses: Vec<_> = attempts
        .iter()
        .map(|a| a.field("http.response.status_code").unwrap_or("-"))
        .collect();
    assert_eq!(statuses, ["503", "503", "200"]);
    let resends: Vec<_> = attempts
        .iter()
        .map(|a| a.field("http.request.resend_count"))
        .collect();
    assert_eq!(resends, [None, Some("1"), Some("2")]);
}

#[tokio::test]
async fn retries_are_debug_events_in_the_request_span() {
    let recorder = Recorder::default();
    let _installed = recorder.install();
    let upstream = Upstream::start().await;
    send(&guarded(&layer()), get(&upstream.url("/flaky/1/events"))).await;
    let retries: Vec<_> = recorder
        .events()
        .into_iter()
        .filter(|e| {
            e.fields.get("message").map(String::as_str) == Some("retrying upstream request")
        })
        .collect();
    assert_eq!(retries.len(), 1);
    assert_eq!(retries[0].level, "DEBUG");
    assert_eq!(retries[0].parent.as_deref(), Some("upstream_guard.request"));
    assert_eq!(
        retries[0].fields.get("reason").map(String::as_str),
        Some("503")
    );
}

#[tokio::test]
async fn a_failure_records_its_error_type() {
    let recorder = Recorder::default();
    let _installed = recorder.install();
    let url = format!("http://{}/x", refused_addr());
    let answer = send(&guarded(&layer()), get(&url)).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let request = &recorder.spans_named("upstream_guard.request")[0];
    assert_eq!(request.field("error.type"), Some("connect"));
    assert_eq!(request.field("upstream_guard.outcome"), Some("connect"));
    assert_eq!(request.field("http.response.status_code"), Some("502"));
    let attempts = recorder.spans_named("upstream_guard.attempt");
    assert_eq!(
        attempts.len(),
        3,
        "connect errors are retried for any method"
    );
    assert!(attempts
        .iter()
        .all(|a| a.field("error.type") == Some("connect")));
}

#[tokio::test]
async fn transitions_are_warn_events_and_the_span_has_the_circuit_state() {
    let recorder = Recorder::default();
    let _installed = recorder.install();
    let upstream = Upstream::start().await;
    let guard = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .circuit_breaker(BreakerPolicy::consecutive_failures(1))
        .build()
        .unwrap();
    let client = guarded(&guard);
    send(&client, get(&upstream.url("/status/500"))).await;
    send(&client, get(&upstream.url("/ok"))).await;
    let warnings: Vec<_> = recorder
        .events()
        .into_iter()
        .filter(|e| e.level == "WARN")
        .collect();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].fields["to"], "open");
    assert_eq!(warnings[0].fields["key"], upstream.authority());
    let spans = recorder.spans_named("upstream_guard.request");
    let states: Vec<_> = spans
        .iter()
        .map(|s| s.field("upstream_guard.circuit_state").unwrap_or("-"))
        .collect();
    assert_eq!(states, ["closed", "open"]);
    assert_eq!(
        spans[1].field("upstream_guard.outcome"),
        Some("circuit_open")
    );
}
