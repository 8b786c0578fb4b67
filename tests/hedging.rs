//! Hedging: a second attempt while the first is still out, bounded by the
//! retry rule, the budget, the deadline and the breaker; the first answer that
//! is not a failure wins, and a loser never counts against a breaker.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::guard::{get, guarded, request, send};
use support::observer::Recording;
use support::spans::Recorder;
use support::upstream::Upstream;
use upstream_guard::observe::{HedgeDenied, HedgeOutcome};
use upstream_guard::{BreakerPolicy, CircuitState, HedgePolicy, RetryPolicy, UpstreamGuardLayer};

const HEDGE_AFTER: Duration = Duration::from_millis(50);

/// A guard that hedges after `HEDGE_AFTER`, with a budget that never runs out
/// in these tests unless a test says otherwise.
fn hedging(observer: Recording) -> upstream_guard::Builder {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(5))
        .deadline(Duration::from_secs(10))
        .retry(RetryPolicy::default().budget(0.2, 100))
        .hedge(HedgePolicy::after(HEDGE_AFTER))
        .observer(observer)
}

/// Hedging, and one quick retry after a round that failed.
fn two_attempts(observer: Recording) -> UpstreamGuardLayer {
    let retry = RetryPolicy::default()
        .max_attempts(2)
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .budget(0.2, 100);
    hedging(observer).retry(retry).build().unwrap()
}

#[tokio::test]
async fn a_slow_first_attempt_is_hedged_and_the_hedge_answers() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&hedging(observer.clone()).build().unwrap());
    let started = Instant::now();
    let answer = send(&client, get(&upstream.url("/seq/a/slow3000,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.count("/seq/a/"), 2);
    let hedges = observer.hedges();
    assert_eq!(hedges[0], (2, HedgeOutcome::Sent { after: HEDGE_AFTER }));
    assert_eq!(hedges[1], (2, HedgeOutcome::Won));
}

#[tokio::test]
async fn a_fast_answer_sends_no_hedge() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&hedging(observer.clone()).build().unwrap());
    for _ in 0..5 {
        assert_eq!(
            send(&client, get(&upstream.url("/ok"))).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(upstream.count("/ok"), 5);
    assert!(observer.hedges().is_empty());
}

#[tokio::test]
async fn the_first_attempt_can_still_win_and_the_hedge_is_dropped() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&hedging(observer.clone()).build().unwrap());
    // The first attempt answers at 150 ms; the hedge (at 50 ms) hangs.
    let answer = send(&client, get(&upstream.url("/seq/b/slow150,hang"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(observer.hedge_count("sent"), 1);
    assert_eq!(observer.hedge_count("won"), 0);
    // The hanging hedge's connection is closed once the request is answered.
    wait_until(|| upstream.open_connections() <= 1).await;
}

#[tokio::test]
async fn a_losing_attempt_is_dropped_and_its_connection_closed() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&hedging(observer.clone()).build().unwrap());
    let answer = send(&client, get(&upstream.url("/seq/c/hang,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(observer.hedge_count("won"), 1);
    // The hanging first attempt's connection closes: the guard dropped it.
    wait_until(|| upstream.open_connections() <= 1).await;
}

#[tokio::test]
async fn a_post_without_an_idempotency_key_is_never_hedged() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&hedging(observer.clone()).build().unwrap());
    let post = request("POST", &upstream.url("/seq/d/slow300"), "charge");
    assert_eq!(send(&client, post).await.status, StatusCode::OK);
    assert_eq!(upstream.count("/seq/d/"), 1);
    assert!(observer.hedges().is_empty());
}

#[tokio::test]
async fn a_post_with_an_idempotency_key_is_hedged_with_the_same_body() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&hedging(observer.clone()).build().unwrap());
    let mut post = request("POST", &upstream.url("/seq/e/slow3000,ok"), "charge #7");
    post.headers_mut()
        .insert("idempotency-key", "k-7".parse().unwrap());
    assert_eq!(send(&client, post).await.status, StatusCode::OK);
    let bodies: Vec<_> = upstream.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, vec![b"charge #7".to_vec(), b"charge #7".to_vec()]);
}

#[tokio::test]
async fn a_losers_failure_never_opens_the_breaker() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let layer = hedging(observer.clone())
        .circuit_breaker(BreakerPolicy::consecutive_failures(3))
        .build()
        .unwrap();
    let client = guarded(&layer);
    // Each time: the first attempt answers at 150 ms, its hedge fails at once.
    for i in 0..8 {
        let url = upstream.url(&format!("/seq/f{i}/slow150,503"));
        assert_eq!(send(&client, get(&url)).await.status, StatusCode::OK);
    }
    assert_eq!(observer.hedge_count("sent"), 8);
    let snapshots = layer.breaker_handle().unwrap().snapshots();
    assert!(!snapshots.is_empty());
    assert!(
        snapshots
            .iter()
            .all(|(_, s)| s.state == CircuitState::Closed),
        "{snapshots:?}"
    );
}

#[tokio::test]
async fn when_no_attempt_wins_every_failure_counts_against_the_breaker() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let layer = hedging(observer.clone())
        .retry(RetryPolicy::disabled().budget(0.2, 100))
        .circuit_breaker(BreakerPolicy::consecutive_failures(2))
        .build()
        .unwrap();
    let client = guarded(&layer);
    // The hedge fails at once (held), then the first attempt fails at 150 ms:
    // one request, two failures, and the breaker opens.
    let answer = send(&client, get(&upstream.url("/seq/g/slow150:503,503"))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(observer.hedge_count("sent"), 1);
    let snapshots = layer.breaker_handle().unwrap().snapshots();
    assert_eq!(snapshots.len(), 1);
    assert_eq!(snapshots[0].1.state, CircuitState::Open);
}

#[tokio::test]
async fn a_failed_hedge_while_the_first_is_out_sends_the_next_hedge_at_once() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let delay = Duration::from_millis(400);
    let layer = hedging(observer.clone())
        .hedge(HedgePolicy::after(delay).max_hedges(2))
        .build()
        .unwrap();
    let client = guarded(&layer);
    let started = Instant::now();
    let answer = send(&client, get(&upstream.url("/seq/j/slow5000,503,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    // Without the rule the third attempt would go at 800 ms.
    assert!(
        started.elapsed() < Duration::from_millis(750),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(observer.hedge_count("sent"), 2);
    assert_eq!(observer.hedges().last(), Some(&(3, HedgeOutcome::Won)));
}

#[tokio::test]
async fn no_hedge_starts_when_the_deadline_is_closer_than_the_delay() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let layer = hedging(observer.clone())
        .attempt_timeout(Duration::from_millis(150))
        .deadline(Duration::from_millis(150))
        .hedge(HedgePolicy::after(Duration::from_millis(100)))
        .build()
        .unwrap();
    let client = guarded(&layer);
    let answer = send(&client, get(&upstream.url("/hang"))).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(upstream.count("/hang"), 1);
    let denied = HedgeOutcome::Denied(HedgeDenied::Deadline);
    assert_eq!(observer.hedges(), vec![(2, denied)]);
}

#[tokio::test]
async fn under_a_full_outage_the_budget_stops_hedges() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(100))
        .deadline(Duration::from_millis(300))
        .retry(RetryPolicy::disabled().budget(0.1, 0))
        .no_circuit_breaker()
        .hedge(HedgePolicy::after(Duration::from_millis(10)))
        .observer(observer.clone())
        .build()
        .unwrap();
    let client = guarded(&layer);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (client, url) = (client.clone(), upstream.url("/hang"));
        tasks.spawn(async move { send(&client, get(&url)).await.status });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::GATEWAY_TIMEOUT);
    }
    // 10 % of 40 requests: at most 4 hedges; the rest were denied.
    let sent = observer.hedge_count("sent");
    assert!(sent <= 4, "{sent} hedges");
    let budget = HedgeOutcome::Denied(HedgeDenied::Budget);
    let denied = observer
        .hedges()
        .iter()
        .filter(|(_, o)| *o == budget)
        .count();
    assert_eq!(sent + denied, 40);
    assert_eq!(upstream.count("/hang"), 40 + sent);
}

#[tokio::test]
async fn an_open_breaker_denies_hedges() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let layer = hedging(observer.clone())
        .circuit_breaker(BreakerPolicy::consecutive_failures(1))
        .build()
        .unwrap();
    let handle = layer.breaker_handle().unwrap();
    let client = guarded(&layer);
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), upstream.url("/seq/k/slow300,ok"));
        async move { send(&client, get(&url)).await.status }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    handle.force_open();
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    let denied = HedgeOutcome::Denied(HedgeDenied::CircuitOpen);
    assert_eq!(observer.hedges(), vec![(2, denied)]);
}

#[tokio::test]
async fn every_attempt_has_its_own_span_and_a_hedge_says_so() {
    let recorder = Recorder::default();
    let upstream = Upstream::start().await;
    let answer = {
        let _installed = recorder.install();
        let client = guarded(&hedging(Recording::default()).build().unwrap());
        send(&client, get(&upstream.url("/seq/l/slow3000,ok"))).await
    };
    assert_eq!(answer.status, StatusCode::OK);
    let attempts = recorder.spans_named("upstream_guard.attempt");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let hedge = attempts
        .iter()
        .find(|s| s.field("upstream_guard.attempt") == Some("2"))
        .expect("the hedge's span");
    assert_eq!(hedge.field("upstream_guard.hedge"), Some("true"));
    assert_eq!(hedge.field("http.response.status_code"), Some("200"));
    let first = attempts
        .iter()
        .find(|s| s.field("upstream_guard.attempt") == Some("1"))
        .expect("the first attempt's span");
    assert_eq!(first.field("upstream_guard.hedge"), None);
}

#[tokio::test]
async fn a_percentile_delay_waits_for_samples_then_hedges_the_tail() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let layer = hedging(observer.clone())
        .hedge(
            HedgePolicy::at_percentile(0.9)
                .min_samples(20)
                .min_delay(Duration::from_millis(20)),
        )
        .build()
        .unwrap();
    let client = guarded(&layer);
    // Too few samples: a slow request is not hedged.
    let answer = send(&client, get(&upstream.url("/seq/m/slow200,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(observer.hedges().is_empty());
    for _ in 0..30 {
        send(&client, get(&upstream.url("/ok"))).await;
    }
    // Fast answers: the 90th percentile is well under the slow one's time.
    let started = Instant::now();
    let answer = send(&client, get(&upstream.url("/seq/n/slow3000,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(observer.hedge_count("won"), 1);
}

#[tokio::test]
async fn each_upstream_is_hedged_after_its_own_percentile() {
    let observer = Recording::default();
    let (slow, fast) = (Upstream::start().await, Upstream::start().await);
    let layer = hedging(observer.clone())
        .hedge(
            HedgePolicy::at_percentile(0.9)
                .min_samples(20)
                .min_delay(Duration::from_millis(5)),
        )
        .build()
        .unwrap();
    let client = guarded(&layer);
    // One upstream always takes 150 ms, the other answers at once.
    for _ in 0..25 {
        send(&client, get(&slow.url("/slow/150"))).await;
        send(&client, get(&fast.url("/ok"))).await;
    }
    assert!(
        observer.hedges().is_empty(),
        "the slow one's own p90 is its normal time"
    );
    // The fast upstream's p90 is about a millisecond: its slow request is
    // hedged after the 5 ms floor. A percentile shared with the slow upstream
    // would wait at least 164 ms (the upper edge of 150 ms's bucket).
    let started = Instant::now();
    let answer = send(&client, get(&fast.url("/seq/s/slow2000,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(140), "{elapsed:?}");
    assert_eq!(observer.hedge_count("won"), 1);
}

#[tokio::test]
async fn hedges_do_not_use_up_retries() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&two_attempts(observer.clone()));
    // Round one: the hedge fails at once, the first attempt at 150 ms. The
    // retry allowed by `max_attempts(2)` is still there, and answers.
    let answer = send(&client, get(&upstream.url("/seq/o/slow150:503,503,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(upstream.count("/seq/o/"), 3);
    assert_eq!(observer.retries(), 1);
    // The retry's own attempt answered: no hedge won.
    assert_eq!(observer.hedge_count("won"), 0);
}

#[tokio::test]
async fn a_retry_is_hedged_like_the_first_attempt() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let client = guarded(&two_attempts(observer.clone()));
    // The first attempt fails before its hedge is due; the retry (attempt 2)
    // is slow, and its hedge (attempt 3) answers.
    let answer = send(&client, get(&upstream.url("/seq/p/slow10:503,slow3000,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let won = observer
        .hedges()
        .into_iter()
        .filter(|(_, o)| *o == HedgeOutcome::Won);
    assert_eq!(won.collect::<Vec<_>>(), vec![(3, HedgeOutcome::Won)]);
    let success = upstream_guard::observe::Outcome::Success;
    assert_eq!(observer.responses(), vec![(200, success, 3)]);
}

#[tokio::test]
async fn a_hedge_takes_a_place_under_the_concurrency_limit() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let layer = hedging(observer.clone())
        .circuit_breaker(BreakerPolicy::default().concurrency_limit(1))
        .build()
        .unwrap();
    let client = guarded(&layer);
    // The request holds the one place: its hedge would be a second request in
    // flight, and is not sent.
    let answer = send(&client, get(&upstream.url("/seq/q/slow300,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(upstream.count("/seq/q/"), 1);
    let denied = HedgeOutcome::Denied(HedgeDenied::ConcurrencyLimited);
    assert_eq!(observer.hedges(), vec![(2, denied)]);
}

#[tokio::test]
async fn a_hedge_goes_when_the_concurrency_limit_has_room_and_gives_its_place_back() {
    let observer = Recording::default();
    let upstream = Upstream::start().await;
    let layer = hedging(observer.clone())
        .circuit_breaker(BreakerPolicy::default().concurrency_limit(2))
        .build()
        .unwrap();
    let handle = layer.breaker_handle().unwrap();
    let client = guarded(&layer);
    let answer = send(&client, get(&upstream.url("/seq/r/hang,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(observer.hedge_count("won"), 1);
    drop(answer);
    let key = upstream.authority();
    assert_eq!(handle.snapshot_for(&key).unwrap().in_flight, 0);
}

/// Waits (bounded) until `done` holds.
async fn wait_until(done: impl Fn() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(done(), "condition not met within 2 s");
}
