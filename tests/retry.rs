//! Retries: which requests, how often, how long apart, with which bodies, and how
//! the budget bounds them.

mod support;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use support::guard::{get, guarded, request, send, HttpClient};
use support::observer::Recording;
use support::upstream::{refused_addr, Upstream};
use tower::{Layer, ServiceExt};
use upstream_guard::observe::RetryDenied;
use upstream_guard::{FailureKind, RequestBody, RetryPolicy, UpstreamGuardLayer};

fn fast_retry() -> RetryPolicy {
    RetryPolicy::default().backoff(Duration::from_millis(1), Duration::from_millis(10))
}

fn layer_with(retry: RetryPolicy, observer: Recording) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(500))
        .deadline(Duration::from_secs(5))
        .retry(retry)
        .observer(observer)
        .build()
        .unwrap()
}

/// For tests that hammer a failing upstream on purpose: without a breaker, only
/// the retry policy limits the load.
fn layer_without_breaker(retry: RetryPolicy, observer: Recording) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(500))
        .deadline(Duration::from_secs(5))
        .retry(retry)
        .no_circuit_breaker()
        .observer(observer)
        .build()
        .unwrap()
}

fn payload(len: usize) -> Bytes {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn a_get_that_fails_twice_then_succeeds_takes_exactly_three_requests() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&layer_with(fast_retry(), observer.clone()));
    let answer = send(&client, get(&upstream.url("/flaky/2/get"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "ok");
    assert_eq!(upstream.count("/flaky/2/get"), 3);
    assert_eq!(observer.retries(), 2);
}

#[tokio::test]
async fn a_put_body_is_replayed_byte_identical() {
    let upstream = Upstream::start().await;
    let client = guarded(&layer_with(fast_retry(), Recording::default()));
    let body = payload(10 * 1024);
    let answer = send(
        &client,
        request(
            "PUT",
            &upstream.url("/flaky-status/1/503/put"),
            body.clone(),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let sent = upstream.requests();
    assert_eq!(sent.len(), 2);
    for r in &sent {
        assert_eq!(r.method, "PUT");
        assert_eq!(r.body, body.as_ref(), "attempt body differs");
        assert_eq!(r.header("content-length"), Some("10240"));
    }
}

#[tokio::test]
async fn a_post_reset_after_sending_is_not_retried() {
    let upstream = Upstream::start().await;
    let observer = Recording::default();
    let client = guarded(&layer_with(fast_retry(), observer.clone()));
    let answer = send(
        &client,
        request("POST", &upstream.url("/flaky-reset/1/post"), "order #1"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(upstream.count("/flaky-reset/1/post"), 1);
    assert_eq!(observer.denials(), vec![RetryDenied::NotIdempotent]);
}

#[tokio::test]
async fn a_post_with_an_idempotency_key_is_retried() {
    let upstream = Upstream::start().await;
    let client = guarded(&layer_with(fast_retry(), Recording::default()));
    let mut req = request("POST", &upstream.url("/flaky-reset/1/keyed"), "order #2");
    req.headers_mut()
        .insert("idempotency-key", "5b7d0c".parse().unwrap());
    let answer = send(&client, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    let sent = upstream.requests();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|r| r.body == b"order #2"));
    assert!(sent
        .iter()
        .all(|r| r.header("idempotency-key") == Some("5b7d0c")));
}

#[tokio::test]
async fn a_post_to_a_refused_upstream_is_retried_since_it_never_left() {
    let observer = Recording::default();
    let client = guarded(&layer_with(fast_retry(), observer.clone()));
    let url = format!("http://{}/orders", refused_addr());
    let answer = send(&client, request("POST", &url, "order #3")).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        answer.failure.as_ref().unwrap().kind(),
        FailureKind::Connect
    );
    assert_eq!(answer.problem()["attempts"], 3);
    assert_eq!(observer.attempts(), 3);
}

#[tokio::test]
async fn a_one_mebibyte_put_is_sent_once_and_whole() {
    let upstream = Upstream::start().await;
    let observer = Recording::default();
    let client = guarded(&layer_with(fast_retry(), observer.clone()));
    let body = payload(1024 * 1024);
    let answer = send(
        &client,
        request("PUT", &upstream.url("/status/503"), body.clone()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let sent = upstream.requests();
    assert_eq!(sent.len(), 1, "a body over the replay cap is not retried");
    assert_eq!(sent[0].body, body.as_ref(), "and it arrives whole");
    assert_eq!(observer.denials(), vec![RetryDenied::BodyNotReplayable]);
}

#[tokio::test]
async fn retry_after_one_second_is_waited_for() {
    let upstream = Upstream::start().await;
    let client = guarded(&layer_with(fast_retry(), Recording::default()));
    let started = Instant::now();
    let answer = send(
        &client,
        get(&upstream.url("/flaky-status/1/503/wait?retry_after=1")),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(upstream.count("/flaky-status/1/503/wait"), 2);
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
}

#[tokio::test]
async fn a_huge_retry_after_is_capped() {
    let upstream = Upstream::start().await;
    let retry = fast_retry().max_retry_after(Duration::from_millis(50));
    let client = guarded(&layer_with(retry, Recording::default()));
    let started = Instant::now();
    let answer = send(
        &client,
        get(&upstream.url("/flaky-status/1/503/cap?retry_after=86400")),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_budget_bounds_load_on_a_fully_failing_upstream() {
    const REQUESTS: usize = 200;
    let upstream = Upstream::start().await;
    let observer = Recording::default();
    // 20 % of requests plus a floor of 1 retry/s over a 10 s window (10 retries).
    let retry = fast_retry().budget(0.2, 1);
    let client = guarded(&layer_without_breaker(retry, observer.clone()));
    for _ in 0..REQUESTS {
        let answer = send(&client, get(&upstream.url("/status/503"))).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let sent = upstream.count("/status/503");
    let bound = (REQUESTS as f64 * 1.2) as usize + 10;
    assert!(sent <= bound, "{sent} upstream requests > {bound}");
    assert!(sent > REQUESTS, "the budget still allows some retries");
    assert!(observer.denials().contains(&RetryDenied::Budget));
}

#[tokio::test]
async fn without_a_budget_every_failure_gets_every_attempt() {
    let upstream = Upstream::start().await;
    let client = guarded(&layer_without_breaker(
        fast_retry().no_budget(),
        Recording::default(),
    ));
    for _ in 0..20 {
        send(&client, get(&upstream.url("/status/502"))).await;
    }
    assert_eq!(upstream.count("/status/502"), 60);
}

#[tokio::test]
async fn a_500_is_not_retried_by_default() {
    let upstream = Upstream::start().await;
    let client = guarded(&layer_with(fast_retry(), Recording::default()));
    let answer = send(&client, get(&upstream.url("/status/500"))).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(upstream.count("/status/500"), 1);
}

// Telling a parse error from a reset needs hyper's error kinds (feature `hyper`).
#[cfg(feature = "hyper")]
#[tokio::test]
async fn a_malformed_response_is_not_retried_by_default() {
    let upstream = Upstream::start().await;
    let client = guarded(&layer_with(fast_retry(), Recording::default()));
    let answer = send(&client, get(&upstream.url("/garbage"))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(upstream.count("/garbage"), 1);
}

#[tokio::test]
async fn max_attempts_one_never_retries() {
    let upstream = Upstream::start().await;
    let client = guarded(&layer_with(RetryPolicy::disabled(), Recording::default()));
    send(&client, get(&upstream.url("/status/503"))).await;
    assert_eq!(upstream.count("/status/503"), 1);
}

#[tokio::test]
async fn backoff_sleeps_grow_but_stay_under_the_cap() {
    let upstream = Upstream::start().await;
    let observer = Recording::default();
    let retry = RetryPolicy::default()
        .max_attempts(5)
        .backoff(Duration::from_millis(2), Duration::from_millis(5))
        .no_budget();
    let client = guarded(&layer_with(retry, observer.clone()));
    send(&client, get(&upstream.url("/status/503"))).await;
    let backoffs: Vec<Duration> = observer
        .seen()
        .into_iter()
        .filter_map(|s| match s {
            support::observer::Seen::Retry { backoff, .. } => Some(backoff),
            _ => None,
        })
        .collect();
    assert_eq!(backoffs.len(), 4);
    let ceilings = [2, 4, 5, 5].map(Duration::from_millis);
    for (b, c) in backoffs.iter().zip(ceilings) {
        assert!(*b <= c, "{backoffs:?}");
    }
}

type Streamed =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

#[tokio::test]
async fn an_unknown_length_body_that_is_complete_in_memory_is_replayed() {
    // A body with no size hint whose frames are all ready at once (like a tonic
    // unary request) is buffered and replayed.
    let upstream = Upstream::start().await;
    let layer = layer_with(fast_retry(), Recording::default());
    let client = layer.layer(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<RequestBody<Streamed>>(),
    );
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"part one, "))),
        Ok(Frame::data(Bytes::from_static(b"part two"))),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let req = http::Request::put(upstream.url("/flaky-status/1/503/stream"))
        .body(body)
        .unwrap();
    let response = client.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let sent = upstream.requests();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|r| r.body == b"part one, part two"));
}

#[tokio::test]
async fn a_body_still_streaming_is_sent_once_and_not_retried() {
    let upstream = Upstream::start().await;
    let observer = Recording::default();
    let layer = layer_with(fast_retry(), observer.clone());
    let client = layer.layer(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<RequestBody<http_body_util::combinators::BoxBody<Bytes, Infallible>>>(),
    );
    // The body's second chunk only arrives later: buffering must not wait for it.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(2);
    tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
        .await
        .unwrap();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"second"))))
            .await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|frame| (frame, rx))
    });
    let body = StreamBody::new(stream).boxed();
    let req = http::Request::put(upstream.url("/status/503"))
        .body(body)
        .unwrap();
    let response = client.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let sent = upstream.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].body, b"first second",
        "streamed whole, nothing lost"
    );
    assert_eq!(observer.denials(), vec![RetryDenied::BodyNotReplayable]);
}

#[tokio::test]
async fn a_client_body_that_fails_is_a_400_and_never_reaches_the_upstream() {
    #[derive(Debug)]
    struct Broken;
    impl std::fmt::Display for Broken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client went away")
        }
    }
    impl std::error::Error for Broken {}

    let upstream = Upstream::start().await;
    let layer = layer_with(fast_retry(), Recording::default());
    let client = layer.layer(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<RequestBody<http_body_util::combinators::BoxBody<Bytes, Broken>>>(),
    );
    let frames: Vec<Result<Frame<Bytes>, Broken>> =
        vec![Ok(Frame::data(Bytes::from_static(b"half"))), Err(Broken)];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let req = http::Request::put(upstream.url("/echo"))
        .header("x-request-id", "req-broken-body")
        .body(body)
        .unwrap();
    let response = client.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let failure = response
        .extensions()
        .get::<upstream_guard::GuardFailure>()
        .unwrap();
    assert_eq!(failure.kind(), FailureKind::RequestBody);
    // The request failed while its body was being buffered: the answer still
    // names the upstream and echoes the request id.
    assert_eq!(failure.upstream(), Some(upstream.authority().as_str()));
    assert_eq!(failure.request_id(), Some("req-broken-body"));
    assert_eq!(upstream.requests().len(), 0);
}

/// Keep the type alias used so an unused-import lint never hides a change.
#[allow(dead_code)]
fn _client_type(_: HttpClient, _: Full<Bytes>) {}
