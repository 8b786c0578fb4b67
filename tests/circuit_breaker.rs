//! The circuit breaker: policies trip at their thresholds, open breakers answer
//! 503 without touching the upstream, half-open admits exactly N probes, keys are
//! isolated and bounded, and operators can override it.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::guard::{get, guarded, request, send};
use support::upstream::{refused_addr, Upstream};
use tower::{service_fn, Layer, Service, ServiceExt};
use upstream_guard::observe::CircuitEvent;
use upstream_guard::{
    BreakerPolicy, CircuitState, FailureKind, Observer, RequestBody, RetryPolicy,
    UpstreamGuardLayer,
};

/// One breaker transition: key, from, to.
type Seen = (Option<String>, CircuitState, CircuitState);

/// Records breaker transitions.
#[derive(Clone, Default)]
struct Transitions(Arc<std::sync::Mutex<Vec<Seen>>>);

impl Transitions {
    fn seen(&self) -> Vec<(CircuitState, CircuitState)> {
        self.0.lock().unwrap().iter().map(|t| (t.1, t.2)).collect()
    }
}

impl Observer for Transitions {
    fn on_circuit_transition(&self, event: &CircuitEvent<'_>) {
        self.0
            .lock()
            .unwrap()
            .push((event.key().map(str::to_string), event.from(), event.to()));
    }
}

fn layer(breaker: BreakerPolicy, observer: Transitions) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(500))
        .deadline(Duration::from_secs(5))
        .retry(RetryPolicy::disabled())
        .circuit_breaker(breaker)
        .observer(observer)
        .build()
        .unwrap()
}

#[tokio::test]
async fn consecutive_failures_trip_at_exactly_the_threshold() {
    let upstream = Upstream::start().await;
    let transitions = Transitions::default();
    let client = guarded(&layer(
        BreakerPolicy::consecutive_failures(3),
        transitions.clone(),
    ));
    for _ in 0..2 {
        send(&client, get(&upstream.url("/status/500"))).await;
    }
    assert!(transitions.seen().is_empty(), "two failures: still closed");
    send(&client, get(&upstream.url("/status/500"))).await;
    assert_eq!(
        transitions.seen(),
        vec![(CircuitState::Closed, CircuitState::Open)]
    );
    let answer = send(&client, get(&upstream.url("/ok"))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        upstream.count("/ok"),
        0,
        "an open breaker never calls the upstream"
    );
}

#[tokio::test]
async fn an_open_breaker_answers_503_with_retry_after_and_no_upstream_call() {
    let upstream = Upstream::start().await;
    let breaker = BreakerPolicy::consecutive_failures(1).open_for(Duration::from_secs(7));
    let client = guarded(&layer(breaker, Transitions::default()));
    send(&client, get(&upstream.url("/reset"))).await;
    for _ in 0..20 {
        let answer = send(&client, get(&upstream.url("/ok"))).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        let retry_after: u64 = answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=7).contains(&retry_after), "{retry_after}");
        let problem = answer.problem();
        assert_eq!(problem["type"], "urn:upstream-guard:problem:circuit-open");
        assert_eq!(problem["attempts"], 0);
        assert_eq!(answer.failure.unwrap().kind(), FailureKind::CircuitOpen);
    }
    assert_eq!(upstream.count("/ok"), 0);
}

#[tokio::test]
async fn an_open_breaker_answers_grpc_requests_with_unavailable() {
    let upstream = Upstream::start().await;
    let client = guarded(&layer(
        BreakerPolicy::consecutive_failures(1),
        Transitions::default(),
    ));
    send(&client, get(&upstream.url("/status/503"))).await;
    let mut req = request("POST", &upstream.url("/pkg.S/M"), "");
    req.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    let answer = send(&client, req).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["grpc-status"], "14");
    assert!(answer.headers.contains_key("grpc-retry-pushback-ms"));
}

#[tokio::test]
async fn failure_rate_trips_at_exactly_the_rate_once_min_calls_are_seen() {
    let upstream = Upstream::start().await;
    let transitions = Transitions::default();
    let breaker = BreakerPolicy::failure_rate(0.5, 10);
    let client = guarded(&layer(breaker, transitions.clone()));
    // 9 calls, 4 failing: too few calls to judge.
    for i in 0..9 {
        let path = if i % 2 == 1 { "/status/500" } else { "/ok" };
        send(&client, get(&upstream.url(path))).await;
    }
    assert!(transitions.seen().is_empty());
    // The 10th fails: 5 of 10.
    send(&client, get(&upstream.url("/status/500"))).await;
    assert_eq!(
        transitions.seen(),
        vec![(CircuitState::Closed, CircuitState::Open)]
    );
}

#[tokio::test]
async fn slow_call_rate_trips_on_slow_successes() {
    let upstream = Upstream::start().await;
    let transitions = Transitions::default();
    let breaker = BreakerPolicy::slow_call_rate(1.0, Duration::from_millis(40), 3);
    let client = guarded(&layer(breaker, transitions.clone()));
    for _ in 0..2 {
        let answer = send(&client, get(&upstream.url("/slow/80"))).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert!(transitions.seen().is_empty());
    send(&client, get(&upstream.url("/slow/80"))).await;
    assert_eq!(
        transitions.seen(),
        vec![(CircuitState::Closed, CircuitState::Open)]
    );
}

#[tokio::test]
async fn half_open_admits_exactly_n_probes_among_64_concurrent_requests() {
    const PROBES: usize = 3;
    let upstream = Upstream::start().await;
    let breaker = BreakerPolicy::consecutive_failures(1)
        .open_for(Duration::from_millis(200))
        .half_open_probes(PROBES as u32);
    let client = guarded(&layer(breaker, Transitions::default()));
    send(&client, get(&upstream.url("/status/500"))).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Probes hold for 300 ms, so all 64 arrive while the probes are out.
    let answers = futures_util::future::join_all(
        (0..64).map(|_| send(&client, get(&upstream.url("/slow/300")))),
    )
    .await;
    let ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    let rejected = answers
        .iter()
        .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!(ok, PROBES);
    assert_eq!(rejected, 64 - PROBES);
    assert_eq!(upstream.count("/slow"), PROBES);
}

#[tokio::test]
async fn a_recovered_upstream_closes_the_breaker_through_half_open() {
    let upstream = Upstream::start().await;
    let transitions = Transitions::default();
    let breaker = BreakerPolicy::consecutive_failures(2).open_for(Duration::from_millis(100));
    let guard = layer(breaker, transitions.clone());
    let client = guarded(&guard);
    for _ in 0..2 {
        send(&client, get(&upstream.url("/status/502"))).await;
    }
    assert_eq!(
        send(&client, get(&upstream.url("/ok"))).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        send(&client, get(&upstream.url("/ok"))).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&client, get(&upstream.url("/ok"))).await.status,
        StatusCode::OK
    );
    assert_eq!(
        transitions.seen(),
        vec![
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Closed),
        ]
    );
    let snapshot = guard
        .breaker_handle()
        .unwrap()
        .snapshot_for(&upstream.authority())
        .unwrap();
    assert_eq!(snapshot.state, CircuitState::Closed);
}

#[tokio::test]
async fn a_failed_probe_reopens_the_breaker() {
    let upstream = Upstream::start().await;
    let transitions = Transitions::default();
    let breaker = BreakerPolicy::consecutive_failures(1)
        .open_for(Duration::from_millis(100))
        .max_open_for(Duration::from_secs(10));
    let guard = layer(breaker, transitions.clone());
    let client = guarded(&guard);
    send(&client, get(&upstream.url("/status/500"))).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    send(&client, get(&upstream.url("/status/500"))).await;
    assert_eq!(
        transitions.seen(),
        vec![
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Open),
        ]
    );
    let snapshot = guard
        .breaker_handle()
        .unwrap()
        .snapshot_for(&upstream.authority())
        .unwrap();
    assert_eq!(snapshot.state, CircuitState::Open);
    assert_eq!(snapshot.trips, 2);
    let until = snapshot.until_half_open.unwrap();
    assert!(
        until > Duration::from_millis(100),
        "second trip doubles: {until:?}"
    );
}

#[tokio::test]
async fn one_dead_host_does_not_open_another_hosts_breaker() {
    let healthy = Upstream::start().await;
    let dead = format!("http://{}/ok", refused_addr());
    let guard = layer(
        BreakerPolicy::consecutive_failures(2),
        Transitions::default(),
    );
    let client = guarded(&guard);
    for _ in 0..5 {
        send(&client, get(&dead)).await;
    }
    let answer = send(&client, get(&dead)).await;
    assert_eq!(answer.failure.unwrap().kind(), FailureKind::CircuitOpen);
    for _ in 0..5 {
        assert_eq!(
            send(&client, get(&healthy.url("/ok"))).await.status,
            StatusCode::OK
        );
    }
    let handle = guard.breaker_handle().unwrap();
    let states: Vec<_> = handle
        .snapshots()
        .into_iter()
        .map(|(key, s)| (key, s.state))
        .collect();
    assert_eq!(states.len(), 2);
    assert!(states.contains(&(healthy.authority(), CircuitState::Closed)));
    assert!(states.contains(&(dead[7..dead.len() - 3].to_string(), CircuitState::Open)));
}

#[tokio::test]
async fn a_custom_key_separates_breakers() {
    let upstream = Upstream::start().await;
    let breaker = BreakerPolicy::consecutive_failures(1)
        .per_key(|req: &http::request::Parts| req.headers.get("x-tenant")?.to_str().ok());
    let client = guarded(&layer(breaker, Transitions::default()));
    let tenant = |t: &str, path: &str| {
        let mut req = get(&upstream.url(path));
        req.headers_mut().insert("x-tenant", t.parse().unwrap());
        req
    };
    send(&client, tenant("a", "/status/500")).await;
    assert_eq!(
        send(&client, tenant("a", "/ok")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&client, tenant("b", "/ok")).await.status,
        StatusCode::OK
    );
}

type Ready = Response<Full<Bytes>>;

#[tokio::test]
async fn the_registry_stays_bounded_under_100k_distinct_hosts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
        counter.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok::<Ready, Infallible>(Response::new(Full::new(
            Bytes::new(),
        ))))
    });
    let guard = UpstreamGuardLayer::builder()
        .circuit_breaker(BreakerPolicy::default().max_keys(256))
        .build()
        .unwrap();
    let mut service = guard.layer(inner);
    for i in 0..100_000u32 {
        let req = Request::get(format!("http://host-{i}.test/"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = ServiceExt::ready(&mut service)
            .await
            .unwrap()
            .call(req)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::Relaxed), 100_000);
    assert_eq!(guard.breaker_handle().unwrap().keys(), 256);
}

#[tokio::test]
async fn forced_open_rejects_everything_and_disabled_lets_everything_through() {
    let upstream = Upstream::start().await;
    let guard = layer(
        BreakerPolicy::consecutive_failures(1),
        Transitions::default(),
    );
    let client = guarded(&guard);
    let handle = guard.breaker_handle().unwrap();

    handle.force_open();
    let answer = send(&client, get(&upstream.url("/ok"))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.count("/ok"), 0);
    assert_eq!(handle.snapshot().state, CircuitState::ForcedOpen);

    handle.disable();
    for _ in 0..5 {
        send(&client, get(&upstream.url("/status/500"))).await;
    }
    assert_eq!(upstream.count("/status/500"), 5, "disabled: nothing trips");
    assert_eq!(
        send(&client, get(&upstream.url("/ok"))).await.status,
        StatusCode::OK
    );

    handle.resume();
    send(&client, get(&upstream.url("/status/500"))).await;
    assert_eq!(
        send(&client, get(&upstream.url("/ok"))).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn no_retries_are_made_once_the_breaker_opens() {
    let upstream = Upstream::start().await;
    let guard = UpstreamGuardLayer::builder()
        .retry(
            RetryPolicy::default()
                .max_attempts(5)
                .backoff(Duration::from_millis(1), Duration::from_millis(2)),
        )
        .circuit_breaker(BreakerPolicy::consecutive_failures(2))
        .build()
        .unwrap();
    let answer = send(&guarded(&guard), get(&upstream.url("/status/503"))).await;
    // Two attempts trip the breaker; the third is never made.
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.count("/status/503"), 2);
}

#[tokio::test]
async fn the_concurrency_cap_rejects_excess_requests_at_once() {
    let upstream = Upstream::start().await;
    let breaker = BreakerPolicy::default().concurrency_limit(2);
    let guard = layer(breaker, Transitions::default());
    let client = guarded(&guard);
    let answers = futures_util::future::join_all(
        (0..6).map(|_| send(&client, get(&upstream.url("/slow/200")))),
    )
    .await;
    let limited: Vec<_> = answers
        .iter()
        .filter_map(|a| a.failure.as_ref().map(|f| f.kind()))
        .collect();
    assert_eq!(limited, vec![FailureKind::ConcurrencyLimited; 4]);
    assert_eq!(upstream.count("/slow"), 2);
    // Permits come back: later requests go through.
    assert_eq!(
        send(&client, get(&upstream.url("/ok"))).await.status,
        StatusCode::OK
    );
    let snapshot = guard
        .breaker_handle()
        .unwrap()
        .snapshot_for(&upstream.authority())
        .unwrap();
    assert_eq!(snapshot.in_flight, 0);
}

#[tokio::test]
async fn the_concurrency_cap_still_applies_while_the_breakers_are_disabled() {
    let upstream = Upstream::start().await;
    let guard = layer(
        BreakerPolicy::default().concurrency_limit(1),
        Transitions::default(),
    );
    guard.breaker_handle().unwrap().disable();
    let client = guarded(&guard);
    let answers = futures_util::future::join_all(
        (0..3).map(|_| send(&client, get(&upstream.url("/slow/200")))),
    )
    .await;
    let limited: Vec<_> = answers
        .iter()
        .filter_map(|a| a.failure.as_ref().map(|f| f.kind()))
        .collect();
    assert_eq!(limited, vec![FailureKind::ConcurrencyLimited; 2]);
    assert_eq!(upstream.count("/slow"), 1);
}

#[tokio::test]
async fn a_dropped_request_gives_back_its_probe_and_permit() {
    let upstream = Upstream::start().await;
    let breaker = BreakerPolicy::consecutive_failures(1)
        .open_for(Duration::from_millis(50))
        .concurrency_limit(1);
    let guard = layer(breaker, Transitions::default());
    let client = guarded(&guard);
    send(&client, get(&upstream.url("/status/500"))).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    // The probe hangs; the caller gives up on it.
    let probe = client.clone().oneshot(get(&upstream.url("/hang")));
    assert!(tokio::time::timeout(Duration::from_millis(100), probe)
        .await
        .is_err());
    // Its probe and permit are free again: the next request is the new probe.
    assert_eq!(
        send(&client, get(&upstream.url("/ok"))).await.status,
        StatusCode::OK
    );
}

#[cfg(feature = "serde")]
#[tokio::test]
async fn snapshots_serialize_to_json_for_health_endpoints() {
    let upstream = Upstream::start().await;
    let breaker = BreakerPolicy::consecutive_failures(1).open_for(Duration::from_secs(30));
    let guard = layer(breaker, Transitions::default());
    send(&guarded(&guard), get(&upstream.url("/status/500"))).await;
    let snapshot = guard
        .breaker_handle()
        .unwrap()
        .snapshot_for(&upstream.authority())
        .unwrap();
    let json = serde_json::to_value(&snapshot).unwrap();
    assert_eq!(json["state"], "open");
    assert_eq!(json["trips"], 1);
    let ms = json["until_half_open_ms"].as_u64().unwrap();
    assert!(ms > 25_000 && ms <= 30_000, "{ms}");
}
