//! [`MetricsObserver`]: the guard's events as metrics, through the
//! [`metrics`](https://docs.rs/metrics/0.24) facade (feature `metrics`).
//!
//! The observer records into whatever recorder the application installed
//! (`metrics-exporter-prometheus`, an OpenTelemetry bridge, StatsD, ...), so the
//! guard itself never picks an exporter.
//!
//! ```
//! use upstream_guard::{MetricsObserver, UpstreamGuardLayer};
//!
//! // Install your recorder first, e.g.
//! // metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
//! let layer = UpstreamGuardLayer::builder()
//!     .upstream_name("billing")
//!     .observer(MetricsObserver::new())
//!     .build()?;
//! # Ok::<(), upstream_guard::ConfigError>(())
//! ```
//!
//! # Metrics
//!
//! Names follow the Prometheus and OpenTelemetry conventions: a
//! `upstream_guard_` prefix, base units in the name (`_seconds`), and `_total` on
//! counters.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `upstream_guard_requests_total` | counter | `upstream`, `method`, `outcome`, `status` | requests answered by the guard, by how they ended and the status returned to the caller |
//! | `upstream_guard_request_duration_seconds` | histogram | `upstream`, `method`, `outcome` | time from the first attempt to the final response headers, all attempts and backoff included |
//! | `upstream_guard_attempts_total` | counter | `upstream`, `outcome`, `status` | attempts sent to the upstream (a request with two retries counts three) |
//! | `upstream_guard_attempt_duration_seconds` | histogram | `upstream`, `outcome` | time one attempt waited for response headers |
//! | `upstream_guard_retries_total` | counter | `upstream`, `reason` | retries scheduled, by what the failed attempt got |
//! | `upstream_guard_retries_denied_total` | counter | `upstream`, `reason` | retries wanted but not made, e.g. because the retry budget is spent |
//! | `upstream_guard_hedges_total` | counter | `upstream`, `outcome`, `reason` | hedges: `sent`, `won` (the hedge gave the answer) or `denied` (with `reason`; `none` otherwise) |
//! | `upstream_guard_rejections_total` | counter | `upstream`, `reason` | requests answered `503` without calling the upstream |
//! | `upstream_guard_circuit_transitions_total` | counter | `key`, `from`, `to` | circuit breaker state changes |
//! | `upstream_guard_circuit_state` | gauge | `key` | a breaker's state after its last change: `0` closed, `1` half-open, `2` open |
//! | `upstream_guard_concurrency_limit` | gauge | `key` | an [adaptive concurrency limit](crate::adaptive) after its last recomputation |
//! | `upstream_guard_concurrency_rtt_seconds` | gauge | `key` | the mean latency of the last sample window the limit was computed from |
//! | `upstream_guard_concurrency_baseline_seconds` | gauge | `key` | the baseline latency that window was compared with |
//!
//! Label values:
//!
//! | label | values |
//! |---|---|
//! | `upstream` | the configured [`upstream_name`](crate::Builder::upstream_name), else the request's authority (`host:port`), else `unknown` |
//! | `method` | `GET`, `HEAD`, `POST`, `PUT`, `DELETE`, `CONNECT`, `OPTIONS`, `TRACE`, `PATCH`; any other method is `other` |
//! | `outcome` | `success`, `upstream_failure` (the upstream answered with a failure, e.g. a 5xx), or a [`FailureKind`](crate::FailureKind) name: `connect`, `transport`, `malformed_response`, `attempt_timeout`, `deadline_exceeded`, `circuit_open`, `concurrency_limited`, `request_body` (see [`Outcome::as_str`](crate::observe::Outcome::as_str)) |
//! | `status` | the numeric HTTP status (`200`, `503`, ...); on attempts that got no response, `none` |
//! | `reason` (retries) | the failed attempt's status (`503`) or failure kind (`transport`, `attempt_timeout`, ...) |
//! | `reason` (retries denied) | `budget`, `deadline`, `not_idempotent`, `body_not_replayable`, `circuit_open` (see [`RetryDenied::as_str`](crate::observe::RetryDenied::as_str)) |
//! | `reason` (hedges denied) | `budget`, `deadline`, `circuit_open`, `concurrency_limited` (see [`HedgeDenied::as_str`](crate::observe::HedgeDenied::as_str)) |
//! | `reason` (rejections) | `circuit_open`, `concurrency_limited` |
//! | `key` | the breaker's key (by default the request authority, see [`BreakerPolicy::per_key`](crate::BreakerPolicy::per_key)), or `default` for the breaker shared by requests without a key |
//! | `from`, `to` | `closed`, `open`, `half_open` (see [`CircuitState::as_str`](crate::CircuitState::as_str)) |
//!
//! # Cardinality
//!
//! Every label but `upstream` and `key` has a small fixed set of values. Raw URLs
//! and paths are never used. `upstream` is bounded by the set of upstreams the
//! guard calls: one per configured name, or one per authority. That is right for
//! a service calling a handful of backends, but a proxy that forwards to many
//! hosts should use [`MetricsObserver::upstream_label`] (one fixed value) or
//! [`MetricsObserver::without_upstream_label`]. `key` is bounded by
//! [`BreakerPolicy::max_keys`](crate::BreakerPolicy::max_keys) at any one time,
//! but keys that come and go leave series behind in most recorders; for such
//! proxies use [`MetricsObserver::without_circuit_key_label`] too, or key the
//! breaker on something bounded.
//!
//! # Caveats
//!
//! - Durations are measured lazily (see [`crate::Observer`]): an inner service
//!   that answers on its first poll records `0`.
//! - The concurrency gauges are set at the end of each sample window, about
//!   every 100 ms per key under load, and stay where they were while a key
//!   sees no traffic.
//! - The circuit gauge follows the transitions the guard reports, so a breaker
//!   that never changed state has no series (read it as closed). Operator
//!   overrides through [`BreakerHandle`](crate::BreakerHandle) are not
//!   transitions and do not move it.
//! - Label values are static strings wherever the value set is fixed. An
//!   `upstream` label taken from the event costs one small string allocation per
//!   event (none with a fixed or no upstream label); beyond that, the `metrics`
//!   facade allocates each metric's label list.

use std::sync::Arc;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Label,
    SharedString, Unit,
};
use http::{Method, StatusCode};

use crate::observe::{
    AttemptEvent, AttemptOutcome, CircuitEvent, ConcurrencyLimitEvent, HedgeEvent, HedgeOutcome,
    Observer, RejectedEvent, RequestFacts, ResponseEvent, RetryDeniedEvent, RetryEvent,
};

const REQUESTS_TOTAL: &str = "upstream_guard_requests_total";
const REQUEST_DURATION: &str = "upstream_guard_request_duration_seconds";
const ATTEMPTS_TOTAL: &str = "upstream_guard_attempts_total";
const ATTEMPT_DURATION: &str = "upstream_guard_attempt_duration_seconds";
const RETRIES_TOTAL: &str = "upstream_guard_retries_total";
const RETRIES_DENIED_TOTAL: &str = "upstream_guard_retries_denied_total";
const HEDGES_TOTAL: &str = "upstream_guard_hedges_total";
const REJECTIONS_TOTAL: &str = "upstream_guard_rejections_total";
const CIRCUIT_TRANSITIONS_TOTAL: &str = "upstream_guard_circuit_transitions_total";
const CIRCUIT_STATE: &str = "upstream_guard_circuit_state";
const CONCURRENCY_LIMIT: &str = "upstream_guard_concurrency_limit";
const CONCURRENCY_RTT: &str = "upstream_guard_concurrency_rtt_seconds";
const CONCURRENCY_BASELINE: &str = "upstream_guard_concurrency_baseline_seconds";

/// The `upstream` label value when the guard knows no upstream name.
const UNKNOWN_UPSTREAM: &str = "unknown";
/// The `key` label value of the breaker shared by requests without a key.
const DEFAULT_KEY: &str = "default";

/// Records the guard's events as metrics through the
/// [`metrics`](https://docs.rs/metrics/0.24) facade; see the [module docs](self)
/// for every metric and label.
///
/// Register it with [`Builder::observer`](crate::Builder::observer). It holds no
/// state of its own: counts live in the installed recorder, so one observer per
/// layer and one shared by several layers report the same way.
#[derive(Clone, Debug)]
pub struct MetricsObserver {
    upstream: UpstreamLabel,
    circuit_key: bool,
}

/// Where the `upstream` label's value comes from.
#[derive(Clone, Debug)]
enum UpstreamLabel {
    /// The event's upstream (configured name or authority).
    FromEvent,
    /// One value for every event.
    Fixed(SharedString),
    /// No `upstream` label at all.
    Omitted,
}

impl Default for MetricsObserver {
    fn default() -> Self {
        MetricsObserver::new()
    }
}

impl MetricsObserver {
    /// An observer that labels metrics with each event's upstream.
    ///
    /// It also registers the metrics' descriptions and units (see
    /// [`describe`](Self::describe)) with the recorder installed at that moment.
    pub fn new() -> Self {
        Self::describe();
        MetricsObserver {
            upstream: UpstreamLabel::FromEvent,
            circuit_key: true,
        }
    }

    /// Uses `name` as the `upstream` label of every metric, whatever the request's
    /// host. For a proxy that forwards to many hosts, where one series per host
    /// would grow without bound.
    pub fn upstream_label(mut self, name: impl Into<String>) -> Self {
        let name: Arc<str> = Arc::from(name.into());
        self.upstream = UpstreamLabel::Fixed(SharedString::from(name));
        self
    }

    /// Leaves the `upstream` label out of every metric, for when the recorder
    /// already scopes metrics to one upstream, or hosts are unbounded.
    pub fn without_upstream_label(mut self) -> Self {
        self.upstream = UpstreamLabel::Omitted;
        self
    }

    /// Leaves the `key` label off the circuit metrics, for per-key breakers whose
    /// keys are many or short-lived. Without a key, one gauge could not tell the
    /// breakers apart, so `upstream_guard_circuit_state` is then not recorded; the
    /// transitions counter still is.
    pub fn without_circuit_key_label(mut self) -> Self {
        self.circuit_key = false;
        self
    }

    /// Registers every metric's description and unit with the installed recorder,
    /// so exporters can print `# HELP` lines. [`new`](Self::new) calls it; call it
    /// again if the observer was created before the recorder was installed.
    pub fn describe() {
        describe_counter!(
            REQUESTS_TOTAL,
            Unit::Count,
            "Requests answered by the upstream guard, by outcome and status returned."
        );
        describe_histogram!(
            REQUEST_DURATION,
            Unit::Seconds,
            "Time from the first attempt to the final response headers, retries included."
        );
        describe_counter!(
            ATTEMPTS_TOTAL,
            Unit::Count,
            "Attempts sent to the upstream, by outcome and upstream status."
        );
        describe_histogram!(
            ATTEMPT_DURATION,
            Unit::Seconds,
            "Time one attempt waited for upstream response headers."
        );
        describe_counter!(
            RETRIES_TOTAL,
            Unit::Count,
            "Retries scheduled, by what the failed attempt got."
        );
        describe_counter!(
            RETRIES_DENIED_TOTAL,
            Unit::Count,
            "Retries wanted but not made (budget spent, deadline, not idempotent, ...)."
        );
        describe_counter!(
            HEDGES_TOTAL,
            Unit::Count,
            "Hedges sent, won (gave the answer) or denied (budget, deadline, circuit open, concurrency limit)."
        );
        describe_counter!(
            REJECTIONS_TOTAL,
            Unit::Count,
            "Requests answered 503 without calling the upstream."
        );
        describe_counter!(
            CIRCUIT_TRANSITIONS_TOTAL,
            Unit::Count,
            "Circuit breaker state changes."
        );
        describe_gauge!(
            CIRCUIT_STATE,
            "Circuit breaker state after its last change: 0 closed, 1 half-open, 2 open."
        );
        describe_gauge!(
            CONCURRENCY_LIMIT,
            Unit::Count,
            "Adaptive concurrency limit: requests a key may have in flight."
        );
        describe_gauge!(
            CONCURRENCY_RTT,
            Unit::Seconds,
            "Mean latency of the last sample window of an adaptive concurrency limit."
        );
        describe_gauge!(
            CONCURRENCY_BASELINE,
            Unit::Seconds,
            "Baseline latency (lowest recent window mean) of an adaptive concurrency limit."
        );
    }

    /// A label list with room for `extra` more labels, starting with `upstream`.
    fn labels(&self, request: RequestFacts<'_>, extra: usize) -> Vec<Label> {
        let mut labels = Vec::with_capacity(extra + 1);
        match &self.upstream {
            UpstreamLabel::FromEvent => {
                let value = match request.upstream() {
                    // Shared, so the copy for the histogram is a reference count.
                    Some(upstream) => SharedString::from(Arc::<str>::from(upstream)),
                    None => SharedString::const_str(UNKNOWN_UPSTREAM),
                };
                labels.push(Label::new("upstream", value));
            }
            UpstreamLabel::Fixed(name) => labels.push(Label::new("upstream", name.clone())),
            UpstreamLabel::Omitted => {}
        }
        labels
    }

    /// The `key` label of circuit metrics, if keys are labelled.
    fn key_label(&self, key: Option<&str>) -> Option<Label> {
        if !self.circuit_key {
            return None;
        }
        let value = match key {
            Some(key) => SharedString::from(key.to_owned()),
            None => SharedString::const_str(DEFAULT_KEY),
        };
        Some(Label::new("key", value))
    }
}

impl Observer for MetricsObserver {
    fn on_attempt(&self, event: &AttemptEvent<'_>) {
        let (outcome, status) = attempt_labels(event.outcome());
        let mut labels = self.labels(event.request(), 2);
        labels.push(Label::from_static_parts("outcome", outcome));
        histogram!(ATTEMPT_DURATION, labels.clone()).record(event.elapsed().as_secs_f64());
        labels.push(Label::from_static_parts("status", status));
        counter!(ATTEMPTS_TOTAL, labels).increment(1);
    }

    fn on_retry(&self, event: &RetryEvent<'_>) {
        let mut labels = self.labels(event.request(), 1);
        labels.push(Label::from_static_parts(
            "reason",
            attempt_reason(event.reason()),
        ));
        counter!(RETRIES_TOTAL, labels).increment(1);
    }

    fn on_retry_denied(&self, event: &RetryDeniedEvent<'_>) {
        let mut labels = self.labels(event.request(), 1);
        labels.push(Label::from_static_parts("reason", event.reason().as_str()));
        counter!(RETRIES_DENIED_TOTAL, labels).increment(1);
    }

    fn on_hedge(&self, event: &HedgeEvent<'_>) {
        let mut labels = self.labels(event.request(), 2);
        let outcome = event.outcome();
        let reason = match outcome {
            HedgeOutcome::Denied(reason) => reason.as_str(),
            _ => "none",
        };
        labels.push(Label::from_static_parts("outcome", outcome.as_str()));
        labels.push(Label::from_static_parts("reason", reason));
        counter!(HEDGES_TOTAL, labels).increment(1);
    }

    fn on_circuit_transition(&self, event: &CircuitEvent<'_>) {
        let key = self.key_label(event.key());
        if let Some(key) = &key {
            gauge!(CIRCUIT_STATE, vec![key.clone()]).set(f64::from(event.to().gauge()));
        }
        let mut labels = Vec::with_capacity(3);
        labels.extend(key);
        labels.push(Label::from_static_parts("from", event.from().as_str()));
        labels.push(Label::from_static_parts("to", event.to().as_str()));
        counter!(CIRCUIT_TRANSITIONS_TOTAL, labels).increment(1);
    }

    fn on_concurrency_limit(&self, event: &ConcurrencyLimitEvent<'_>) {
        // Per key or not at all: one series for every key would mix them.
        let Some(key) = self.key_label(event.key()) else {
            return;
        };
        let labels = vec![key];
        gauge!(CONCURRENCY_LIMIT, labels.clone()).set(f64::from(event.limit()));
        gauge!(CONCURRENCY_RTT, labels.clone()).set(event.rtt().as_secs_f64());
        gauge!(CONCURRENCY_BASELINE, labels).set(event.baseline().as_secs_f64());
    }

    fn on_rejected(&self, event: &RejectedEvent<'_>) {
        let mut labels = self.labels(event.request(), 1);
        labels.push(Label::from_static_parts("reason", event.kind().as_str()));
        counter!(REJECTIONS_TOTAL, labels).increment(1);
    }

    fn on_response(&self, event: &ResponseEvent<'_>) {
        let mut labels = self.labels(event.request(), 3);
        labels.push(Label::from_static_parts(
            "method",
            method_label(event.request().method()),
        ));
        labels.push(Label::from_static_parts(
            "outcome",
            event.outcome().as_str(),
        ));
        histogram!(REQUEST_DURATION, labels.clone()).record(event.elapsed().as_secs_f64());
        labels.push(Label::from_static_parts(
            "status",
            status_label(event.status()),
        ));
        counter!(REQUESTS_TOTAL, labels).increment(1);
    }
}

/// The `outcome` and `status` labels of an attempt.
fn attempt_labels(outcome: AttemptOutcome) -> (&'static str, &'static str) {
    match outcome {
        AttemptOutcome::Response { status, class } => {
            let outcome = if class.is_failure() {
                "upstream_failure"
            } else {
                "success"
            };
            (outcome, status_label(status))
        }
        AttemptOutcome::Failure(kind) => (kind.as_str(), "none"),
    }
}

/// Why an attempt is retried: its status, or its failure kind.
fn attempt_reason(outcome: AttemptOutcome) -> &'static str {
    match outcome {
        AttemptOutcome::Response { status, .. } => status_label(status),
        AttemptOutcome::Failure(kind) => kind.as_str(),
    }
}

/// The `method` label: standard methods by name, anything else `other`, so a
/// client inventing methods cannot add series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Every status code from 100 to 999 as three ASCII digits, back to back, so a
/// status label is a `&'static str` slice instead of an allocation per event.
const STATUS_DIGITS: [u8; 2700] = {
    let mut digits = [0u8; 2700];
    let mut i = 0;
    while i < 900 {
        let code = i + 100;
        digits[i * 3] = b'0' + (code / 100) as u8;
        digits[i * 3 + 1] = b'0' + (code / 10 % 10) as u8;
        digits[i * 3 + 2] = b'0' + (code % 10) as u8;
        i += 1;
    }
    digits
};

static STATUS_TEXT: &str = match std::str::from_utf8(&STATUS_DIGITS) {
    Ok(text) => text,
    Err(_) => panic!("status digits are ASCII"),
};

/// The `status` label: the numeric code as a static string.
fn status_label(status: StatusCode) -> &'static str {
    // `StatusCode` is always 100..=999, so the slice is always in range; `get`
    // keeps a broken invariant from panicking on the request path.
    let start = usize::from(status.as_u16().saturating_sub(100)) * 3;
    STATUS_TEXT.get(start..start + 3).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ::metrics::with_local_recorder;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use metrics_util::MetricKind;

    use super::*;
    use crate::breaker::CircuitState;
    use crate::classify::ResponseClass;
    use crate::failure::FailureKind;
    use crate::observe::{Outcome, RetryDenied};

    /// One recorded metric: kind, name, sorted labels, value.
    type Row = (MetricKind, String, Vec<(String, String)>, DebugValue);

    fn rows(snapshotter: &Snapshotter) -> Vec<Row> {
        let mut rows: Vec<Row> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let (kind, key) = key.into_parts();
                let mut labels: Vec<_> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                labels.sort();
                (kind, key.name().to_owned(), labels, value)
            })
            .collect();
        rows.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        rows
    }

    fn find<'r>(rows: &'r [Row], name: &str, labels: &[(&str, &str)]) -> &'r DebugValue {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        rows.iter()
            .find(|r| r.1 == name && r.2 == want)
            .map(|r| &r.3)
            .unwrap_or_else(|| panic!("no {name} {want:?} in {rows:#?}"))
    }

    fn facts<'a>(method: &'a Method, upstream: Option<&'a str>) -> RequestFacts<'a> {
        RequestFacts { method, upstream }
    }

    /// Runs `f` with a fresh local recorder and returns what it recorded.
    fn record(f: impl FnOnce()) -> Vec<Row> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        with_local_recorder(&recorder, f);
        rows(&snapshotter)
    }

    #[test]
    fn responses_count_by_upstream_method_outcome_and_status() {
        let get = Method::GET;
        let purge = Method::from_bytes(b"PURGE").unwrap();
        let rows = record(|| {
            let observer = MetricsObserver::new();
            let event = |method, status: u16, outcome| ResponseEvent {
                request: facts(method, Some("billing")),
                status: StatusCode::from_u16(status).unwrap(),
                outcome,
                attempts: 1,
                started: None,
            };
            for _ in 0..3 {
                observer.on_response(&event(&get, 200, Outcome::Success));
            }
            observer.on_response(&event(
                &get,
                504,
                Outcome::Failure(FailureKind::AttemptTimeout),
            ));
            observer.on_response(&event(&purge, 503, Outcome::UpstreamFailure));
        });
        let base = [("upstream", "billing"), ("method", "GET")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut l = base.to_vec();
            l.extend_from_slice(extra);
            l
        };
        assert_eq!(
            find(
                &rows,
                REQUESTS_TOTAL,
                &with(&[("outcome", "success"), ("status", "200")])
            ),
            &DebugValue::Counter(3)
        );
        assert_eq!(
            find(
                &rows,
                REQUESTS_TOTAL,
                &with(&[("outcome", "attempt_timeout"), ("status", "504")])
            ),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(
                &rows,
                REQUESTS_TOTAL,
                &[
                    ("upstream", "billing"),
                    ("method", "other"),
                    ("outcome", "upstream_failure"),
                    ("status", "503")
                ]
            ),
            &DebugValue::Counter(1)
        );
        match find(&rows, REQUEST_DURATION, &with(&[("outcome", "success")])) {
            DebugValue::Histogram(values) => assert_eq!(values.len(), 3),
            other => panic!("not a histogram: {other:?}"),
        }
    }

    #[test]
    fn attempts_retries_denials_and_rejections() {
        let post = Method::POST;
        let rows = record(|| {
            let observer = MetricsObserver::new();
            let request = facts(&post, None);
            let failed = AttemptOutcome::Response {
                status: StatusCode::SERVICE_UNAVAILABLE,
                class: ResponseClass::Failure { retryable: true },
            };
            observer.on_attempt(&AttemptEvent {
                request,
                attempt: 1,
                outcome: failed,
                started: None,
            });
            observer.on_attempt(&AttemptEvent {
                request,
                attempt: 2,
                outcome: AttemptOutcome::Failure(FailureKind::Transport),
                started: Some(tokio::time::Instant::now()),
            });
            observer.on_retry(&RetryEvent {
                request,
                failed_attempt: 1,
                reason: failed,
                backoff: Duration::from_millis(10),
            });
            observer.on_retry(&RetryEvent {
                request,
                failed_attempt: 2,
                reason: AttemptOutcome::Failure(FailureKind::Connect),
                backoff: Duration::ZERO,
            });
            observer.on_retry_denied(&RetryDeniedEvent {
                request,
                failed_attempt: 3,
                reason: RetryDenied::Budget,
            });
            observer.on_rejected(&RejectedEvent {
                request,
                kind: FailureKind::CircuitOpen,
                retry_after: Duration::from_secs(1),
            });
        });
        let up = ("upstream", "unknown");
        assert_eq!(
            find(
                &rows,
                ATTEMPTS_TOTAL,
                &[up, ("outcome", "upstream_failure"), ("status", "503")]
            ),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(
                &rows,
                ATTEMPTS_TOTAL,
                &[up, ("outcome", "transport"), ("status", "none")]
            ),
            &DebugValue::Counter(1)
        );
        assert!(matches!(
            find(&rows, ATTEMPT_DURATION, &[up, ("outcome", "transport")]),
            DebugValue::Histogram(v) if v.len() == 1
        ));
        assert_eq!(
            find(&rows, RETRIES_TOTAL, &[up, ("reason", "503")]),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(&rows, RETRIES_TOTAL, &[up, ("reason", "connect")]),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(&rows, RETRIES_DENIED_TOTAL, &[up, ("reason", "budget")]),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(&rows, REJECTIONS_TOTAL, &[up, ("reason", "circuit_open")]),
            &DebugValue::Counter(1)
        );
    }

    #[test]
    fn circuit_transitions_move_the_gauge_per_key() {
        let rows = record(|| {
            let observer = MetricsObserver::new();
            let transition = |key, from, to| CircuitEvent {
                key,
                from,
                to,
                open_for: None,
            };
            observer.on_circuit_transition(&transition(
                Some("a:80"),
                CircuitState::Closed,
                CircuitState::Open,
            ));
            observer.on_circuit_transition(&transition(
                Some("a:80"),
                CircuitState::Open,
                CircuitState::HalfOpen,
            ));
            observer.on_circuit_transition(&transition(
                None,
                CircuitState::Closed,
                CircuitState::Open,
            ));
        });
        assert_eq!(
            find(&rows, CIRCUIT_STATE, &[("key", "a:80")]),
            &DebugValue::Gauge(1.0.into())
        );
        assert_eq!(
            find(&rows, CIRCUIT_STATE, &[("key", "default")]),
            &DebugValue::Gauge(2.0.into())
        );
        assert_eq!(
            find(
                &rows,
                CIRCUIT_TRANSITIONS_TOTAL,
                &[("key", "a:80"), ("from", "closed"), ("to", "open")]
            ),
            &DebugValue::Counter(1)
        );
        assert_eq!(
            find(
                &rows,
                CIRCUIT_TRANSITIONS_TOTAL,
                &[("key", "a:80"), ("from", "open"), ("to", "half_open")]
            ),
            &DebugValue::Counter(1)
        );
    }

    fn limit_event(key: Option<&str>) -> ConcurrencyLimitEvent<'_> {
        ConcurrencyLimitEvent {
            key,
            limit: 24,
            previous: 30,
            rtt: std::time::Duration::from_millis(60),
            baseline: std::time::Duration::from_millis(50),
            samples: 200,
            shed: 40,
            retry_after: std::time::Duration::from_secs(1),
        }
    }

    #[test]
    fn an_adaptive_limit_and_its_latencies_are_gauges_per_key() {
        let rows =
            record(|| MetricsObserver::new().on_concurrency_limit(&limit_event(Some("a:80"))));
        let key = [("key", "a:80")];
        assert_eq!(
            find(&rows, CONCURRENCY_LIMIT, &key),
            &DebugValue::Gauge(24.0.into())
        );
        assert_eq!(
            find(&rows, CONCURRENCY_RTT, &key),
            &DebugValue::Gauge(0.06.into())
        );
        assert_eq!(
            find(&rows, CONCURRENCY_BASELINE, &key),
            &DebugValue::Gauge(0.05.into())
        );
    }

    #[test]
    fn adaptive_limits_have_no_gauges_without_key_labels() {
        let rows = record(|| {
            let observer = MetricsObserver::new().without_circuit_key_label();
            observer.on_concurrency_limit(&limit_event(Some("a:80")));
        });
        assert!(
            rows.iter()
                .all(|r| !r.1.starts_with("upstream_guard_concurrency")),
            "{rows:#?}"
        );
    }

    #[test]
    fn fixed_and_omitted_labels_bound_cardinality() {
        let get = Method::GET;
        let rows = record(|| {
            let fixed = MetricsObserver::new().upstream_label("edge");
            let omitted = MetricsObserver::new()
                .without_upstream_label()
                .without_circuit_key_label();
            for host in ["a.example:443", "b.example:443"] {
                let event = RejectedEvent {
                    request: facts(&get, Some(host)),
                    kind: FailureKind::ConcurrencyLimited,
                    retry_after: Duration::from_secs(1),
                };
                fixed.on_rejected(&event);
                omitted.on_rejected(&event);
                omitted.on_circuit_transition(&CircuitEvent {
                    key: Some(host),
                    from: CircuitState::Closed,
                    to: CircuitState::Open,
                    open_for: None,
                });
            }
        });
        assert_eq!(
            find(
                &rows,
                REJECTIONS_TOTAL,
                &[("upstream", "edge"), ("reason", "concurrency_limited")]
            ),
            &DebugValue::Counter(2)
        );
        assert_eq!(
            find(
                &rows,
                REJECTIONS_TOTAL,
                &[("reason", "concurrency_limited")]
            ),
            &DebugValue::Counter(2)
        );
        assert_eq!(
            find(
                &rows,
                CIRCUIT_TRANSITIONS_TOTAL,
                &[("from", "closed"), ("to", "open")]
            ),
            &DebugValue::Counter(2)
        );
        assert!(
            rows.iter().all(|r| r.1 != CIRCUIT_STATE),
            "no gauge without keys"
        );
        assert!(
            rows.iter()
                .all(|r| r.2.iter().all(|(_, v)| !v.contains("example"))),
            "no host leaked into a label: {rows:#?}"
        );
    }

    #[test]
    fn every_status_code_has_its_digits() {
        for code in 100..=999u16 {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(status_label(status), code.to_string());
        }
    }

    #[test]
    fn only_standard_methods_are_named() {
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(
            method_label(&Method::from_bytes(b"get").unwrap()),
            "other",
            "methods are case-sensitive"
        );
        assert_eq!(
            method_label(&Method::from_bytes(b"X-ANYTHING").unwrap()),
            "other"
        );
    }

    #[test]
    fn descriptions_carry_units() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        with_local_recorder(&recorder, || {
            let observer = MetricsObserver::new();
            observer.on_response(&ResponseEvent {
                request: facts(&Method::GET, Some("x")),
                status: StatusCode::OK,
                outcome: Outcome::Success,
                attempts: 1,
                started: None,
            });
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let duration = snapshot
            .iter()
            .find(|(k, ..)| k.key().name() == REQUEST_DURATION)
            .expect("duration recorded");
        assert_eq!(duration.1, Some(Unit::Seconds));
        assert!(duration.2.is_some(), "described");
    }
}
