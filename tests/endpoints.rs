//! Replicas: `Endpoints` inside the guard. A bad replica is ejected by its own
//! breaker, retries and hedges go to a replica the request has not tried, and
//! an attempt dropped because another won counts against nobody.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::guard::{get, http_client, send, HttpClient};
use support::observer::Recording;
use support::upstream::{refused_addr, Silent, Upstream};
use tower::Layer;
use upstream_guard::endpoints::Endpoints;
use upstream_guard::{
    BreakerPolicy, CircuitState, HedgePolicy, RequestBody, RetryPolicy, UpstreamGuard,
    UpstreamGuardLayer,
};

type Replicas = Endpoints<HttpClient>;

fn replicas(builder: upstream_guard::endpoints::EndpointsBuilder, urls: &[String]) -> Replicas {
    builder.build(http_client(), urls).expect("valid replicas")
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy::default()
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .budget(0.2, 1000)
}

fn guard(observer: Recording) -> upstream_guard::Builder {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(500))
        .deadline(Duration::from_secs(5))
        .retry(quick_retries())
        .no_circuit_breaker()
        .observer(observer)
}

fn url(addr: std::net::SocketAddr) -> String {
    format!("http://{addr}")
}

/// A request for the logical upstream: `Endpoints` puts in the replica.
fn logical(path: &str) -> http::Request<Full<Bytes>> {
    get(&format!("http://backend{path}"))
}

async fn send_to(service: &UpstreamGuard<Replicas>, path: &str) -> StatusCode {
    send(service, logical(path)).await.status
}

#[tokio::test]
async fn a_refusing_replica_is_ejected_and_no_get_gets_a_502() {
    let good = Upstream::start().await;
    let bad = refused_addr();
    let set = replicas(
        Endpoints::builder().breaker(BreakerPolicy::consecutive_failures(2)),
        &[url(good.addr()), url(bad)],
    );
    let handle = set.breaker_handle();
    let service = guard(Recording::default()).build().unwrap().layer(set);
    for _ in 0..20 {
        assert_eq!(send_to(&service, "/ok").await, StatusCode::OK);
    }
    let bad_key = bad.to_string();
    assert_eq!(
        handle.snapshot_for(&bad_key).unwrap().state,
        CircuitState::Open
    );
    assert_eq!(good.count("/ok"), 20);
}

#[tokio::test]
async fn a_hanging_replica_is_ejected_by_the_replica_attempt_timeout() {
    let good = Upstream::start().await;
    let hanging = Silent::start().await;
    let set = replicas(
        Endpoints::builder()
            .breaker(BreakerPolicy::consecutive_failures(2).open_for(Duration::from_secs(30)))
            .attempt_timeout(Duration::from_millis(100)),
        &[url(good.addr()), url(hanging.addr())],
    );
    let handle = set.breaker_handle();
    let service = guard(Recording::default()).build().unwrap().layer(set);
    for _ in 0..20 {
        assert_eq!(send_to(&service, "/ok").await, StatusCode::OK);
    }
    let key = hanging.addr().to_string();
    assert_eq!(handle.snapshot_for(&key).unwrap().state, CircuitState::Open);
    // Two timeouts opened it; nothing was sent there after.
    assert_eq!(hanging.connections(), 2);
}

#[tokio::test]
async fn a_retry_goes_to_a_replica_the_request_has_not_tried() {
    let good = Upstream::start().await;
    let observer = Recording::default();
    // A breaker that never opens: only the pick keeps retries off the bad one.
    let set = replicas(
        Endpoints::builder().breaker(BreakerPolicy::consecutive_failures(1000)),
        &[url(good.addr()), url(refused_addr())],
    );
    let service = guard(observer.clone())
        .retry(quick_retries().max_attempts(2))
        .build()
        .unwrap()
        .layer(set);
    for _ in 0..30 {
        assert_eq!(send_to(&service, "/ok").await, StatusCode::OK);
    }
    // Every request took one or two attempts, never a third.
    assert!(observer
        .responses()
        .iter()
        .all(|(status, _, attempts)| *status == 200 && *attempts <= 2));
}

#[tokio::test]
async fn hedged_gets_answer_within_about_the_hedge_delay_plus_the_good_replicas_latency() {
    let good = Upstream::start().await;
    let hanging = Silent::start().await;
    let observer = Recording::default();
    let hedge_after = Duration::from_millis(50);
    let set = replicas(
        Endpoints::builder(),
        &[url(good.addr()), url(hanging.addr())],
    );
    let service = guard(observer.clone())
        .attempt_timeout(Duration::from_secs(3))
        .hedge(HedgePolicy::after(hedge_after))
        .build()
        .unwrap()
        .layer(set);
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(send_to(&service, "/ok").await, StatusCode::OK);
        slowest = slowest.max(started.elapsed());
    }
    // The good replica answers in about a millisecond: every GET, even those
    // whose first attempt went to the hanging replica, answers shortly after
    // the hedge delay (with room for a loaded machine), never at the 3 s timeout.
    assert!(
        slowest < hedge_after + Duration::from_millis(400),
        "{slowest:?}"
    );
    assert!(
        observer.hedge_count("won") > 0,
        "some first attempts went to the hanging one"
    );
}

#[tokio::test]
async fn an_attempt_dropped_because_a_hedge_won_counts_nothing_against_its_replica() {
    let good = Upstream::start().await;
    let hanging = Silent::start().await;
    let observer = Recording::default();
    let set = replicas(
        Endpoints::builder().breaker(BreakerPolicy::consecutive_failures(1)),
        &[url(good.addr()), url(hanging.addr())],
    );
    let handle = set.breaker_handle();
    let service = guard(observer.clone())
        .hedge(HedgePolicy::after(Duration::from_millis(30)))
        .build()
        .unwrap()
        .layer(set);
    for _ in 0..10 {
        assert_eq!(send_to(&service, "/ok").await, StatusCode::OK);
    }
    assert!(observer.hedge_count("won") > 0);
    let key = hanging.addr().to_string();
    let snapshot = handle.snapshot_for(&key).unwrap();
    assert_eq!(snapshot.state, CircuitState::Closed);
    assert_eq!(snapshot.consecutive_failures, 0);
}

#[tokio::test]
async fn when_every_replica_is_ejected_the_answer_is_a_fast_503() {
    let set = replicas(
        Endpoints::builder()
            .breaker(BreakerPolicy::consecutive_failures(1).open_for(Duration::from_secs(30))),
        &[url(refused_addr()), url(refused_addr())],
    );
    let service = guard(Recording::default())
        .retry(quick_retries().max_attempts(2))
        .build()
        .unwrap()
        .layer(set);
    // Both replicas fail once (first attempt and its retry) and are ejected.
    assert_eq!(send_to(&service, "/ok").await, StatusCode::BAD_GATEWAY);
    let started = Instant::now();
    let answer = send(&service, logical("/ok")).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer.problem()["type"],
        "urn:upstream-guard:problem:circuit-open"
    );
    assert!(started.elapsed() < Duration::from_millis(200));
}

#[tokio::test]
async fn an_ejected_replica_gets_a_probe_after_its_open_period_and_comes_back() {
    let good = Upstream::start().await;
    let port = support::upstream::ReservedPort::new();
    let comeback = port.addr();
    let set = replicas(
        Endpoints::builder()
            .breaker(BreakerPolicy::consecutive_failures(1).open_for(Duration::from_millis(200))),
        &[url(good.addr()), url(comeback)],
    );
    let handle = set.breaker_handle();
    let service = guard(Recording::default()).build().unwrap().layer(set);
    for _ in 0..10 {
        assert_eq!(send_to(&service, "/ok").await, StatusCode::OK);
    }
    let key = comeback.to_string();
    assert_eq!(handle.snapshot_for(&key).unwrap().state, CircuitState::Open);
    // The replica comes back on the same address.
    let listener = port.listen().unwrap();
    let back = Upstream::serve(listener);
    tokio::time::sleep(Duration::from_millis(250)).await;
    for _ in 0..40 {
        assert_eq!(send_to(&service, "/ok").await, StatusCode::OK);
        if back.count("/ok") > 0 {
            break;
        }
    }
    assert!(back.count("/ok") > 0, "the replica got traffic again");
    assert_eq!(
        handle.snapshot_for(&key).unwrap().state,
        CircuitState::Closed
    );
}

#[test]
fn replicas_must_be_absolute_distinct_and_at_least_one() {
    let build = |urls: &[&str]| Endpoints::builder().build(http_client(), urls).unwrap_err();
    let error = build(&["10.0.0.1:80"]);
    assert_eq!(error.field(), "endpoints");
    assert!(error.to_string().contains("replica 0"), "{error}");
    let error = build(&["http://a:80", "http://b:80", "http://a:80"]);
    assert!(error.to_string().contains("replica 2"), "{error}");
    assert!(error.to_string().contains("twice"), "{error}");
    assert_eq!(build(&[]).field(), "endpoints");
    let error = build(&["http://a:80/api"]);
    assert!(error.to_string().contains("path"), "{error}");
}

#[allow(dead_code)]
fn the_guarded_replicas_are_a_nameable_type(
    layer: &UpstreamGuardLayer,
    set: Replicas,
) -> UpstreamGuard<
    Endpoints<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            RequestBody<Full<Bytes>>,
        >,
    >,
> {
    layer.layer(set)
}
