//! `MetricsObserver` end to end: real requests through a guarded hyper-util
//! client against the fault upstream, recorded by the Prometheus exporter's
//! recorder, checked in the rendered exposition text.
//!
//! The recorder is global, so every test labels its requests with its own
//! upstream name (or its own upstream's authority) and reads only those series.

mod support;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use http::StatusCode;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use support::guard::{get, guarded, send};
use support::upstream::Upstream;
use upstream_guard::{BreakerPolicy, MetricsObserver, RetryPolicy, UpstreamGuardLayer};

/// Installs the Prometheus recorder once for this test binary.
fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &[0.005, 0.05, 0.5, 5.0])
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("no other recorder in this binary");
        // Descriptions go to the recorder installed when they are registered.
        MetricsObserver::describe();
        handle
    })
}

/// One sample line of the exposition text.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once("=\"").expect("key=\"value\"");
                    (key.to_owned(), value.trim_end_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().expect("numeric sample"),
            }
        })
        .collect()
}

/// The value of the one series `name` whose labels include `labels`; 0 if none.
fn value(name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = prometheus().render();
    let matching: Vec<Sample> = samples(&text)
        .into_iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "{name} {labels:?} matches several series: {matching:#?}"
    );
    matching.first().map_or(0.0, |s| s.value)
}

fn layer(name: &str, retry: RetryPolicy) -> UpstreamGuardLayer {
    UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(500))
        .deadline(Duration::from_secs(5))
        .upstream_name(name)
        .retry(retry.backoff(Duration::from_millis(1), Duration::from_millis(5)))
        .no_circuit_breaker()
        .observer(MetricsObserver::new())
        .build()
        .expect("valid layer")
}

#[tokio::test]
async fn successes_count_requests_attempts_and_durations() {
    prometheus();
    let upstream = Upstream::start().await;
    let client = guarded(&layer("metrics-ok", RetryPolicy::default()));
    for _ in 0..3 {
        let answer = send(&client, get(&upstream.url("/ok"))).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let up = ("upstream", "metrics-ok");
    assert_eq!(
        value(
            "upstream_guard_requests_total",
            &[
                up,
                ("method", "GET"),
                ("outcome", "success"),
                ("status", "200")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            "upstream_guard_attempts_total",
            &[up, ("outcome", "success"), ("status", "200")]
        ),
        3.0
    );
    assert_eq!(
        value(
            "upstream_guard_request_duration_seconds_count",
            &[up, ("method", "GET"), ("outcome", "success")]
        ),
        3.0
    );
    assert_eq!(
        value(
            "upstream_guard_attempt_duration_seconds_count",
            &[up, ("outcome", "success")]
        ),
        3.0
    );
    // A real network round trip takes time: the histograms saw it.
    assert!(
        value(
            "upstream_guard_attempt_duration_seconds_sum",
            &[up, ("outcome", "success")]
        ) > 0.0
    );
    assert_eq!(
        value(
            "upstream_guard_attempt_duration_seconds_bucket",
            &[up, ("outcome", "success"), ("le", "+Inf")]
        ),
        3.0
    );
    assert_eq!(value("upstream_guard_retries_total", &[up]), 0.0);
}

#[tokio::test]
async fn retried_failures_count_each_attempt_and_retry() {
    prometheus();
    let upstream = Upstream::start().await;
    let client = guarded(&layer(
        "metrics-503",
        RetryPolicy::default().max_attempts(3),
    ));
    let answer = send(&client, get(&upstream.url("/status/503"))).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    let answer = send(&client, get(&upstream.url("/reset"))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);

    let up = ("upstream", "metrics-503");
    assert_eq!(
        value(
            "upstream_guard_requests_total",
            &[
                up,
                ("method", "GET"),
                ("outcome", "upstream_failure"),
                ("status", "503")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            "upstream_guard_requests_total",
            &[
                up,
                ("method", "GET"),
                ("outcome", "transport"),
                ("status", "502")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            "upstream_guard_attempts_total",
            &[up, ("outcome", "upstream_failure"), ("status", "503")]
        ),
        3.0
    );
    assert_eq!(
        value(
            "upstream_guard_attempts_total",
            &[up, ("outcome", "transport"), ("status", "none")]
        ),
        3.0
    );
    assert_eq!(
        value("upstream_guard_retries_total", &[up, ("reason", "503")]),
        2.0
    );
    assert_eq!(
        value(
            "upstream_guard_retries_total",
            &[up, ("reason", "transport")]
        ),
        2.0
    );
}

#[tokio::test]
async fn a_spent_budget_counts_as_a_denied_retry() {
    prometheus();
    let upstream = Upstream::start().await;
    // No ratio and no floor: the budget never allows a retry.
    let client = guarded(&layer(
        "metrics-budget",
        RetryPolicy::default().budget(0.0, 0),
    ));
    let answer = send(&client, get(&upstream.url("/status/502"))).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let up = ("upstream", "metrics-budget");
    assert_eq!(
        value(
            "upstream_guard_retries_denied_total",
            &[up, ("reason", "budget")]
        ),
        1.0
    );
    assert_eq!(value("upstream_guard_retries_total", &[up]), 0.0);
    assert_eq!(
        value(
            "upstream_guard_attempts_total",
            &[up, ("outcome", "upstream_failure"), ("status", "502")]
        ),
        1.0
    );
}

#[tokio::test]
async fn hedges_are_counted_sent_won_and_denied_by_reason() {
    prometheus();
    let upstream = Upstream::start().await;
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(2))
        .deadline(Duration::from_secs(5))
        .upstream_name("metrics-hedge")
        .retry(RetryPolicy::default().budget(0.2, 100))
        .circuit_breaker(upstream_guard::BreakerPolicy::default().concurrency_limit(1))
        .hedge(upstream_guard::HedgePolicy::after(Duration::from_millis(
            30,
        )))
        .observer(MetricsObserver::new())
        .build()
        .expect("valid layer");
    let client = guarded(&layer);
    // The one place under the limit is the request's: the hedge is denied.
    let answer = send(&client, get(&upstream.url("/slow/150"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let up = ("upstream", "metrics-hedge");
    let denied = [up, ("outcome", "denied"), ("reason", "concurrency_limited")];
    assert_eq!(value("upstream_guard_hedges_total", &denied), 1.0);
    assert_eq!(
        value("upstream_guard_hedges_total", &[up, ("outcome", "sent")]),
        0.0
    );
}

#[tokio::test]
async fn a_hedge_that_answers_is_counted_sent_and_won() {
    prometheus();
    let upstream = Upstream::start().await;
    let client = guarded(
        &UpstreamGuardLayer::builder()
            .attempt_timeout(Duration::from_secs(2))
            .deadline(Duration::from_secs(5))
            .upstream_name("metrics-hedge-won")
            .retry(RetryPolicy::default().budget(0.2, 100))
            .hedge(upstream_guard::HedgePolicy::after(Duration::from_millis(
                30,
            )))
            .observer(MetricsObserver::new())
            .build()
            .expect("valid layer"),
    );
    let answer = send(&client, get(&upstream.url("/seq/metrics/hang,ok"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let up = ("upstream", "metrics-hedge-won");
    let sent = [up, ("outcome", "sent"), ("reason", "none")];
    assert_eq!(value("upstream_guard_hedges_total", &sent), 1.0);
    assert_eq!(
        value("upstream_guard_hedges_total", &[up, ("outcome", "won")]),
        1.0
    );
}

#[tokio::test]
async fn an_open_circuit_counts_rejections_and_sets_the_gauge() {
    prometheus();
    let upstream = Upstream::start().await;
    let authority = upstream.authority();
    // No upstream name: the `upstream` label is the authority, like the key.
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_millis(500))
        .deadline(Duration::from_secs(5))
        .retry(RetryPolicy::disabled())
        .circuit_breaker(BreakerPolicy::consecutive_failures(2).open_for(Duration::from_secs(30)))
        .observer(MetricsObserver::new())
        .build()
        .expect("valid layer");
    let client = guarded(&layer);
    for _ in 0..2 {
        let answer = send(&client, get(&upstream.url("/reset"))).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    }
    for _ in 0..3 {
        let answer = send(&client, get(&upstream.url("/ok"))).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    let up = ("upstream", authority.as_str());
    let key = ("key", authority.as_str());
    assert_eq!(
        value(
            "upstream_guard_rejections_total",
            &[up, ("reason", "circuit_open")]
        ),
        3.0
    );
    assert_eq!(
        value(
            "upstream_guard_requests_total",
            &[
                up,
                ("method", "GET"),
                ("outcome", "circuit_open"),
                ("status", "503")
            ]
        ),
        3.0
    );
    assert_eq!(value("upstream_guard_circuit_state", &[key]), 2.0);
    assert_eq!(
        value(
            "upstream_guard_circuit_transitions_total",
            &[key, ("from", "closed"), ("to", "open")]
        ),
        1.0
    );
}

#[tokio::test]
async fn the_exposition_has_help_lines_and_no_paths() {
    prometheus();
    let upstream = Upstream::start().await;
    let client = guarded(&layer("metrics-hygiene", RetryPolicy::default()));
    send(&client, get(&upstream.url("/status/404?secret=1"))).await;
    let text = prometheus().render();
    assert!(
        text.contains("# HELP upstream_guard_requests_total "),
        "{text}"
    );
    assert!(
        text.contains("# TYPE upstream_guard_request_duration_seconds histogram"),
        "{text}"
    );
    for sample in samples(&text) {
        for value in sample.labels.values() {
            assert!(
                !value.contains('/') && !value.contains('?'),
                "a label holds a path: {sample:?}"
            );
        }
    }
}
