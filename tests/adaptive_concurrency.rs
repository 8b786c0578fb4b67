//! Adaptive concurrency: the limit follows a model upstream's latency (tokio's
//! paused time, so the runs are deterministic and take no real time), sheds
//! what is over it with fast 503s, restarts when the breaker closes, and a real
//! socket shows what a shed caller gets.
//!
//! The model upstream serves `N` requests at once, each in a fixed service
//! time, and queues the rest in arrival order (a tokio semaphore and a sleep):
//! its capacity is `N / service time`. Load arrives open-loop, at a fixed rate
//! whatever the answers, like independent clients.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::guard::{get, guarded, send};
use support::upstream::Upstream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use upstream_guard::adaptive::AdaptiveConcurrency;
use upstream_guard::observe::{CircuitEvent, ConcurrencyLimitEvent};
use upstream_guard::{
    BreakerPolicy, CircuitState, FailureKind, GuardFailure, Observer, RequestBody, RetryPolicy,
    UpstreamGuardLayer,
};

const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------
// The model upstream
// ---------------------------------------------------------------------------

/// Serves `slots` requests at once in `service` time each (±10 %, from a
/// seeded generator: the same every run); queues the rest.
///
/// Without the jitter, the slots would keep the phases they started with
/// for ever (a queued request starts the very instant another ends, and ends
/// one service time later): the first ten requests, arriving within 25 ms,
/// would make every slot end within the same 25 ms of each 100, and whoever
/// queues would wait for that stretch to come round. A real server drifts.
#[derive(Clone)]
struct Model {
    slots: Arc<Semaphore>,
    service_ms: Arc<AtomicU64>,
    jitter: Arc<Mutex<fastrand::Rng>>,
    /// While set, answers `500` at once (to trip the breaker).
    failing: Arc<AtomicBool>,
}

impl Model {
    fn new(slots: usize, service: Duration) -> Model {
        Model {
            slots: Arc::new(Semaphore::new(slots)),
            service_ms: Arc::new(AtomicU64::new(service.as_millis() as u64)),
            jitter: Arc::new(Mutex::new(fastrand::Rng::with_seed(14))),
            failing: Arc::new(AtomicBool::new(false)),
        }
    }

    fn set_service(&self, service: Duration) {
        self.service_ms
            .store(service.as_millis() as u64, Ordering::Relaxed);
    }

    async fn serve(self) -> Result<Response<Full<Bytes>>, Infallible> {
        if self.failing.load(Ordering::Relaxed) {
            return Ok(status(StatusCode::INTERNAL_SERVER_ERROR));
        }
        let _slot = self.slots.acquire().await.expect("never closed");
        let service = Duration::from_millis(self.service_ms.load(Ordering::Relaxed));
        let factor = 0.9 + 0.2 * self.jitter.lock().unwrap().f64();
        tokio::time::sleep(service.mul_f64(factor)).await;
        Ok(status(StatusCode::OK))
    }
}

impl Service<Request<RequestBody<Full<Bytes>>>> for Model {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<RequestBody<Full<Bytes>>>) -> Self::Future {
        Box::pin(self.clone().serve())
    }
}

fn status(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
    *response.status_mut() = status;
    response
}

// ---------------------------------------------------------------------------
// What the guard reports
// ---------------------------------------------------------------------------

/// One recomputed limit: when, the limit, and the latencies behind it.
#[derive(Clone, Copy, Debug)]
struct Limit {
    at: Instant,
    limit: u32,
    previous: u32,
    rtt: Duration,
    baseline: Duration,
}

/// Records recomputed limits and breaker transitions.
#[derive(Clone, Default)]
struct Recording {
    limits: Arc<Mutex<Vec<Limit>>>,
    transitions: Arc<Mutex<Vec<(Instant, CircuitState)>>>,
}

impl Recording {
    /// The limits recomputed from `from` on.
    fn limits_since(&self, from: Instant) -> Vec<Limit> {
        let limits = self.limits.lock().unwrap();
        limits.iter().filter(|l| l.at >= from).copied().collect()
    }

    fn closed_at(&self) -> Option<Instant> {
        let transitions = self.transitions.lock().unwrap();
        (transitions.iter())
            .find(|(_, to)| *to == CircuitState::Closed)
            .map(|(at, _)| *at)
    }
}

impl Observer for Recording {
    fn on_concurrency_limit(&self, event: &ConcurrencyLimitEvent<'_>) {
        self.limits.lock().unwrap().push(Limit {
            at: Instant::now(),
            limit: event.limit(),
            previous: event.previous(),
            rtt: event.rtt(),
            baseline: event.baseline(),
        });
    }

    fn on_circuit_transition(&self, event: &CircuitEvent<'_>) {
        let transition = (Instant::now(), event.to());
        self.transitions.lock().unwrap().push(transition);
    }
}

// ---------------------------------------------------------------------------
// Driving load
// ---------------------------------------------------------------------------

/// What the callers got, from when `measured_from` on.
#[derive(Debug, Default)]
struct Run {
    /// Latencies of the `200`s.
    ok: Vec<Duration>,
    /// Latencies of the `503 concurrency-limited`.
    shed: Vec<Duration>,
    /// `504`s: the deadline passed while the request waited.
    timed_out: usize,
    other: usize,
    seconds: f64,
}

impl Run {
    fn p99_ok(&self) -> Duration {
        percentile(&self.ok, 0.99)
    }

    fn goodput(&self) -> f64 {
        self.ok.len() as f64 / self.seconds
    }
}

fn percentile(latencies: &[Duration], p: f64) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}

type ModelGuard = upstream_guard::UpstreamGuard<Model>;

/// The guard in front of `model`, with `breaker` (and its limit, if any).
fn guard(model: &Model, breaker: BreakerPolicy, observer: Recording) -> ModelGuard {
    let layer = UpstreamGuardLayer::builder()
        .attempt_timeout(Duration::from_secs(10))
        .deadline(Duration::from_secs(10))
        .retry(RetryPolicy::disabled())
        .circuit_breaker(breaker)
        .observer(observer)
        .build()
        .expect("a valid configuration");
    layer.layer(model.clone())
}

fn adaptive(config: AdaptiveConcurrency) -> BreakerPolicy {
    BreakerPolicy::default().adaptive_concurrency(config)
}

/// Sends `rate` requests per second for `length`, open-loop, and collects
/// what the requests sent from `measured_from` on got.
async fn drive(guard: &ModelGuard, rate: u32, length: Duration, measured_from: Duration) -> Run {
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut tasks = JoinSet::new();
    while start.elapsed() < length {
        ticker.tick().await;
        let measured = start.elapsed() >= measured_from;
        let guard = guard.clone();
        tasks.spawn(async move {
            let sent = Instant::now();
            let request = Request::get("http://model/").body(Full::default()).unwrap();
            let response = guard.oneshot(request).await.expect("infallible");
            let kind = response
                .extensions()
                .get::<GuardFailure>()
                .map(|f| f.kind());
            (measured, response.status(), kind, sent.elapsed())
        });
    }
    let mut run = Run {
        seconds: (length - measured_from).as_secs_f64(),
        ..Run::default()
    };
    while let Some(joined) = tasks.join_next().await {
        let (measured, status, kind, latency) = joined.expect("a request task");
        if !measured {
            continue;
        }
        match (status, kind) {
            (StatusCode::OK, None) => run.ok.push(latency),
            (_, Some(FailureKind::ConcurrencyLimited)) => run.shed.push(latency),
            (_, Some(FailureKind::DeadlineExceeded)) => run.timed_out += 1,
            _ => run.other += 1,
        }
    }
    run
}

/// The model of the tests: 10 at once, 100 ms each; 100 requests/s capacity.
const SLOTS: usize = 10;
const SERVICE: Duration = Duration::from_millis(100);
const CAPACITY: f64 = 100.0;
/// Four times the capacity.
const OVERLOAD: u32 = 400;

// ---------------------------------------------------------------------------
// Convergence
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn under_four_times_the_capacity_the_limit_settles_near_what_the_upstream_serves_at_once() {
    let model = Model::new(SLOTS, SERVICE);
    let recording = Recording::default();
    let guard = guard(
        &model,
        adaptive(AdaptiveConcurrency::default()),
        recording.clone(),
    );
    let start = Instant::now();

    let run = drive(
        &guard,
        OVERLOAD,
        Duration::from_secs(20),
        Duration::from_secs(5),
    )
    .await;

    // From 5 s on, between N and (1 + tolerance) × N = 12, plus the two the
    // controller may add when it probes upwards.
    let settled = recording.limits_since(start + Duration::from_secs(5));
    assert!(settled.len() > 30, "{} windows", settled.len());
    let limits = settled.iter().map(|l| l.limit);
    let (low, high) = (limits.clone().min().unwrap(), limits.max().unwrap());
    assert!(
        low >= SLOTS as u32 && high <= 14,
        "limits from {low} to {high}"
    );
    // The admitted requests queue at most about the tolerance (20 %) on top
    // of the service time (100 ms ± 10 %), and the upstream stays busy.
    assert!(percentile(&run.ok, 0.5) <= SERVICE * 13 / 10);
    assert!(run.p99_ok() <= SERVICE * 17 / 10, "p99 {:?}", run.p99_ok());
    assert!(run.goodput() >= 0.95 * CAPACITY, "{} / s", run.goodput());
    // The rest, about three in four, are turned away at once.
    let sent = f64::from(OVERLOAD) * run.seconds;
    assert!(
        run.shed.len() as f64 >= 0.7 * sent,
        "{} shed",
        run.shed.len()
    );
    assert_eq!(percentile(&run.shed, 1.0), Duration::ZERO, "shed at once");
    assert_eq!((run.timed_out, run.other), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn without_a_limit_the_same_load_queues_until_every_request_times_out() {
    let model = Model::new(SLOTS, SERVICE);
    let guard = guard(&model, BreakerPolicy::default(), Recording::default());

    let run = drive(
        &guard,
        OVERLOAD,
        Duration::from_secs(6),
        Duration::from_secs(5),
    )
    .await;

    // The contrast to the test above: 300 more requests queue every second,
    // and by 5 s a new one would wait 15 s, past its 10 s deadline.
    assert!(run.ok.is_empty(), "{} answered", run.ok.len());
    assert!(
        run.timed_out >= 390,
        "{} of about 400 timed out",
        run.timed_out
    );
    assert!(run.shed.is_empty() && run.other == 0);
}

#[tokio::test(start_paused = true)]
async fn the_limit_falls_when_the_upstream_slows_and_grows_back_after_it_recovers() {
    let model = Model::new(SLOTS, SERVICE);
    let recording = Recording::default();
    let guard = guard(
        &model,
        adaptive(AdaptiveConcurrency::default()),
        recording.clone(),
    );
    let start = Instant::now();
    let slow_at = start + Duration::from_secs(5);
    let recovered_at = start + Duration::from_secs(15);

    let load = drive(
        &guard,
        OVERLOAD,
        Duration::from_secs(30),
        Duration::from_secs(25),
    );
    let faults = async {
        tokio::time::sleep_until(slow_at).await;
        model.set_service(SERVICE * 5);
        tokio::time::sleep_until(recovered_at).await;
        model.set_service(SERVICE);
    };
    let (run, ()) = tokio::join!(load, faults);

    let before = recording.limits_since(start + Duration::from_secs(4));
    let before = before.iter().take_while(|l| l.at < slow_at).last().unwrap();
    let slow = recording.limits_since(slow_at);
    let slow = slow.iter().take_while(|l| l.at < recovered_at);
    let grown = recording.limits_since(recovered_at + Duration::from_secs(5));
    assert!(before.limit >= SLOTS as u32, "{before:?}");
    // Five times slower at the same baseline: the limit backs off to its
    // minimum (2) and the upstream's queue drains.
    assert_eq!(slow.map(|l| l.limit).min(), Some(2));
    // Within 5 s of the recovery, the limit is back to what the upstream
    // serves, and the upstream is as busy as before.
    assert!(grown.iter().all(|l| l.limit >= SLOTS as u32), "{grown:?}");
    assert!(run.goodput() >= 0.9 * CAPACITY, "{} / s", run.goodput());
}

#[tokio::test(start_paused = true)]
async fn a_limit_never_drops_below_its_minimum() {
    let model = Model::new(SLOTS, SERVICE);
    let recording = Recording::default();
    let config = AdaptiveConcurrency::default().min_limit(4);
    let guard = guard(&model, adaptive(config), recording.clone());
    let start = Instant::now();

    let load = drive(
        &guard,
        OVERLOAD,
        Duration::from_secs(30),
        Duration::from_secs(30),
    );
    let faults = async {
        // Ever slower: every window looks worse than the last.
        for step in 2..=20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            model.set_service(SERVICE * step);
        }
    };
    tokio::join!(load, faults);

    let limits = recording.limits_since(start);
    let lowest = limits.iter().map(|l| l.limit).min();
    assert_eq!(lowest, Some(4), "reached the minimum, never below");
    assert!(limits.iter().all(|l| l.rtt >= l.baseline));
}

// ---------------------------------------------------------------------------
// The circuit breaker decides first
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_open_circuit_answers_circuit_open_and_the_limit_restarts_when_it_closes() {
    let model = Model::new(SLOTS, SERVICE);
    let recording = Recording::default();
    let config = AdaptiveConcurrency::default().initial_limit(5);
    let breaker = adaptive(config)
        .with_consecutive_failures(5)
        .open_for(Duration::from_secs(1));
    let guard = guard(&model, breaker, recording.clone());

    // Grown beyond its initial 5 under load.
    drive(
        &guard,
        OVERLOAD,
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .await;
    let grown = recording.limits.lock().unwrap().last().copied().unwrap();
    assert!(grown.limit >= SLOTS as u32, "{grown:?}");

    // The upstream fails: the breaker opens and answers, not the limit.
    model.failing.store(true, Ordering::Relaxed);
    for _ in 0..5 {
        let answer = model_get(&guard).await;
        assert_eq!(answer, (StatusCode::INTERNAL_SERVER_ERROR, None));
    }
    let answer = model_get(&guard).await;
    assert_eq!(
        answer,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(FailureKind::CircuitOpen)
        )
    );

    // Recovered; after the open period a probe closes the circuit.
    model.failing.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(model_get(&guard).await, (StatusCode::OK, None));
    let closed = recording.closed_at().expect("the circuit closed");

    // The first window after it closed started from the initial limit.
    drive(
        &guard,
        OVERLOAD,
        Duration::from_secs(1),
        Duration::from_secs(1),
    )
    .await;
    let after = recording.limits_since(closed);
    assert_eq!(after.first().map(|l| l.previous), Some(5), "{after:?}");
}

async fn model_get(guard: &ModelGuard) -> (StatusCode, Option<FailureKind>) {
    let request = Request::get("http://model/").body(Full::default()).unwrap();
    let response = guard.clone().oneshot(request).await.expect("infallible");
    let kind = response
        .extensions()
        .get::<GuardFailure>()
        .map(|f| f.kind());
    (response.status(), kind)
}

// ---------------------------------------------------------------------------
// What a shed caller sees, over a real socket
// ---------------------------------------------------------------------------

#[tokio::test]
async fn requests_over_the_limit_get_a_fast_503_problem_with_retry_after() {
    let upstream = Upstream::start().await;
    let config = AdaptiveConcurrency::default().min_limit(1).initial_limit(2);
    let layer = UpstreamGuardLayer::builder()
        .retry(RetryPolicy::disabled())
        .circuit_breaker(adaptive(config))
        .build()
        .unwrap();
    let client = guarded(&layer);

    let slow = || send(&client, get(&upstream.url("/slow/500")));
    let (first, second, (shed, took)) = tokio::join!(slow(), slow(), async {
        // Let the two slow requests take the limit's two places first.
        tokio::time::sleep(100 * MS).await;
        let started = std::time::Instant::now();
        let shed = send(&client, get(&upstream.url("/ok"))).await;
        (shed, started.elapsed())
    });
    assert_eq!(
        (first.status, second.status),
        (StatusCode::OK, StatusCode::OK)
    );
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    let problem = shed.problem();
    assert_eq!(
        problem["type"],
        "urn:upstream-guard:problem:concurrency-limited"
    );
    assert_eq!(
        shed.headers["retry-after"], "1",
        "nothing measured yet: 1 s"
    );
    assert!(took < 100 * MS, "answered at once, took {took:?}");
    assert_eq!(upstream.count("/ok"), 0, "never reached the upstream");
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[test]
fn a_fixed_and_an_adaptive_limit_together_are_a_config_error() {
    let breaker = BreakerPolicy::default()
        .concurrency_limit(10)
        .adaptive_concurrency(AdaptiveConcurrency::default());
    let error = UpstreamGuardLayer::builder()
        .circuit_breaker(breaker)
        .build()
        .expect_err("one or the other");
    assert_eq!(error.field(), "circuit_breaker.adaptive_concurrency");
}

#[test]
fn an_invalid_adaptive_limit_is_a_config_error_naming_its_field() {
    let breaker = adaptive(AdaptiveConcurrency::default().min_limit(0));
    let error = UpstreamGuardLayer::builder()
        .circuit_breaker(breaker)
        .build()
        .expect_err("a minimum of 0 would shed everything");
    assert_eq!(
        error.field(),
        "circuit_breaker.adaptive_concurrency.min_limit"
    );
}

#[cfg(feature = "serde")]
#[test]
fn a_config_file_sets_the_adaptive_limit_in_its_own_table() {
    let config: upstream_guard::GuardConfig = toml::from_str(
        r#"
        [circuit_breaker.adaptive_concurrency]
        min_limit = 4
        max_limit = 200
        tolerance = 0.1
        sample_window = "50ms"
        "#,
    )
    .expect("a valid file");
    let expected = adaptive(
        AdaptiveConcurrency::default()
            .min_limit(4)
            .max_limit(200)
            .tolerance(0.1)
            .sample_window(50 * MS),
    );
    assert_eq!(config.circuit_breaker, Some(expected));
    UpstreamGuardLayer::from_config(config).expect("builds");
}
