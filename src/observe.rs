//! Observability: the [`Observer`] hook for metrics, and the events it receives.
//!
//! Every method of [`Observer`] has a no-op default, so an observer implements only
//! what it needs. Observers are called synchronously on the request path: keep them
//! cheap (increment a counter, record a histogram) and never block.
//!
//! Durations are measured lazily: the guard reads the clock only once an attempt
//! has to wait. An inner service that answers on the very first poll (an in-memory
//! service, a cached response) reports a zero duration, and costs no clock read.

use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;

use crate::breaker::CircuitState;
use crate::classify::ResponseClass;
use crate::failure::FailureKind;

/// Receives the guard's events, e.g. to record metrics.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use upstream_guard::{Observer};
/// use upstream_guard::observe::{ResponseEvent, Outcome};
///
/// #[derive(Default)]
/// struct Failures(AtomicU64);
///
/// impl Observer for Failures {
///     fn on_response(&self, event: &ResponseEvent<'_>) {
///         if !matches!(event.outcome(), Outcome::Success) {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
/// # let _ = upstream_guard::UpstreamGuardLayer::builder().observer(Failures::default());
/// ```
pub trait Observer: Send + Sync + 'static {
    /// An attempt finished: the upstream answered, the call failed, or it timed out.
    fn on_attempt(&self, event: &AttemptEvent<'_>) {
        let _ = event;
    }

    /// A retry was scheduled after a failed attempt.
    fn on_retry(&self, event: &RetryEvent<'_>) {
        let _ = event;
    }

    /// A retry was wanted but not made (retry budget spent, deadline too close,
    /// request not safe to retry, body not replayable, circuit open).
    fn on_retry_denied(&self, event: &RetryDeniedEvent<'_>) {
        let _ = event;
    }

    /// A hedge was sent, won the race, or was due and denied; see
    /// [`HedgePolicy`](crate::HedgePolicy).
    fn on_hedge(&self, event: &HedgeEvent<'_>) {
        let _ = event;
    }

    /// A circuit breaker changed state.
    fn on_circuit_transition(&self, event: &CircuitEvent<'_>) {
        let _ = event;
    }

    /// A request was answered without calling the upstream: circuit open or
    /// concurrency cap reached.
    fn on_rejected(&self, event: &RejectedEvent<'_>) {
        let _ = event;
    }

    /// The guard produced the final response for a request.
    fn on_response(&self, event: &ResponseEvent<'_>) {
        let _ = event;
    }

    /// An [adaptive concurrency limit](crate::adaptive) was recomputed at the
    /// end of a sample window (about every 100 ms per key under load), with
    /// the latencies it was computed from.
    fn on_concurrency_limit(&self, event: &ConcurrencyLimitEvent<'_>) {
        let _ = event;
    }
}

/// The observer used when none is configured: it does nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopObserver;

impl Observer for NoopObserver {}

/// How a request ended, as seen by the guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The upstream answered and the classifier called it a success.
    Success,
    /// The upstream answered with a failure (e.g. a 5xx), passed through as it was.
    UpstreamFailure,
    /// The guard answered with a synthesized response.
    Failure(FailureKind),
}

impl Outcome {
    /// A short, stable name: the `upstream_guard.outcome` span field and a metrics
    /// label value (`success`, `upstream_failure`, or the failure kind's name).
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::UpstreamFailure => "upstream_failure",
            Outcome::Failure(kind) => kind.as_str(),
        }
    }
}

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// The upstream answered with response headers.
    Response {
        /// The response status.
        status: StatusCode,
        /// How the classifier saw it.
        class: ResponseClass,
    },
    /// The attempt failed without a response (or timed out).
    Failure(FailureKind),
}

impl AttemptOutcome {
    /// Whether the attempt counts as a failure.
    pub fn is_failure(self) -> bool {
        match self {
            AttemptOutcome::Response { class, .. } => class.is_failure(),
            AttemptOutcome::Failure(_) => true,
        }
    }
}

impl std::fmt::Display for AttemptOutcome {
    /// The status code, or the failure kind's name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptOutcome::Response { status, .. } => f.write_str(status.as_str()),
            AttemptOutcome::Failure(kind) => f.write_str(kind.as_str()),
        }
    }
}

fn elapsed_since(start: Option<Instant>) -> Duration {
    start.map_or(Duration::ZERO, |s| s.elapsed())
}

/// Facts common to every event of one request.
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    pub(crate) method: &'a Method,
    pub(crate) upstream: Option<&'a str>,
}

impl<'a> RequestFacts<'a> {
    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The upstream name (configured name or URI authority), when known.
    pub fn upstream(&self) -> Option<&'a str> {
        self.upstream
    }
}

/// An attempt finished. See [`Observer::on_attempt`].
#[derive(Clone, Copy, Debug)]
pub struct AttemptEvent<'a> {
    pub(crate) request: RequestFacts<'a>,
    pub(crate) attempt: u32,
    pub(crate) outcome: AttemptOutcome,
    pub(crate) started: Option<Instant>,
}

impl<'a> AttemptEvent<'a> {
    /// The request this attempt belongs to.
    pub fn request(&self) -> RequestFacts<'a> {
        self.request
    }

    /// The attempt number, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How the attempt ended.
    pub fn outcome(&self) -> AttemptOutcome {
        self.outcome
    }

    /// How long the attempt took (zero if it completed on its first poll).
    pub fn elapsed(&self) -> Duration {
        elapsed_since(self.started)
    }
}

/// A retry was scheduled. See [`Observer::on_retry`].
#[derive(Clone, Copy, Debug)]
pub struct RetryEvent<'a> {
    pub(crate) request: RequestFacts<'a>,
    pub(crate) failed_attempt: u32,
    pub(crate) reason: AttemptOutcome,
    pub(crate) backoff: Duration,
}

impl<'a> RetryEvent<'a> {
    /// The request being retried.
    pub fn request(&self) -> RequestFacts<'a> {
        self.request
    }

    /// The number of the attempt that failed (the retry is attempt `n + 1`).
    pub fn failed_attempt(&self) -> u32 {
        self.failed_attempt
    }

    /// Why the attempt is retried.
    pub fn reason(&self) -> AttemptOutcome {
        self.reason
    }

    /// How long the guard waits before the retry.
    pub fn backoff(&self) -> Duration {
        self.backoff
    }
}

/// Why a wanted retry was not made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryDenied {
    /// The retry budget is spent.
    Budget,
    /// The backoff would end past the deadline.
    Deadline,
    /// The request may have reached the upstream and is not idempotent.
    NotIdempotent,
    /// The request body was streamed and cannot be sent again.
    BodyNotReplayable,
    /// The circuit breaker is open.
    CircuitOpen,
}

impl RetryDenied {
    /// A short, stable name for metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            RetryDenied::Budget => "budget",
            RetryDenied::Deadline => "deadline",
            RetryDenied::NotIdempotent => "not_idempotent",
            RetryDenied::BodyNotReplayable => "body_not_replayable",
            RetryDenied::CircuitOpen => "circuit_open",
        }
    }
}

/// Why a due hedge was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HedgeDenied {
    /// The retry budget, which hedges share, is spent.
    Budget,
    /// The deadline leaves less time than the hedge delay.
    Deadline,
    /// The circuit breaker is not closed.
    CircuitOpen,
    /// The upstream's concurrency limit (fixed or adaptive) is reached: a
    /// hedge is one more request in flight, and takes a place like any other.
    ConcurrencyLimited,
}

impl HedgeDenied {
    /// A short, stable name for metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            HedgeDenied::Budget => "budget",
            HedgeDenied::Deadline => "deadline",
            HedgeDenied::CircuitOpen => "circuit_open",
            HedgeDenied::ConcurrencyLimited => "concurrency_limited",
        }
    }
}

/// What happened to a hedge. See [`Observer::on_hedge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HedgeOutcome {
    /// The hedge was sent, this long after the attempt before it.
    Sent {
        /// How long the earlier attempt had been out.
        after: Duration,
    },
    /// The hedge gave the request's answer: the attempts before it were dropped.
    Won,
    /// The hedge was due and not sent.
    Denied(HedgeDenied),
}

impl HedgeOutcome {
    /// A short, stable name for metrics labels: `sent`, `won` or `denied`.
    pub const fn as_str(self) -> &'static str {
        match self {
            HedgeOutcome::Sent { .. } => "sent",
            HedgeOutcome::Won => "won",
            HedgeOutcome::Denied(_) => "denied",
        }
    }
}

/// A hedge was sent, won, or denied. See [`Observer::on_hedge`].
#[derive(Clone, Copy, Debug)]
pub struct HedgeEvent<'a> {
    pub(crate) request: RequestFacts<'a>,
    pub(crate) attempt: u32,
    pub(crate) outcome: HedgeOutcome,
}

impl<'a> HedgeEvent<'a> {
    /// The request being hedged.
    pub fn request(&self) -> RequestFacts<'a> {
        self.request
    }

    /// The hedge's attempt number (for a denial, the number it would have had).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// What happened.
    pub fn outcome(&self) -> HedgeOutcome {
        self.outcome
    }
}

/// A retry was wanted but not made. See [`Observer::on_retry_denied`].
#[derive(Clone, Copy, Debug)]
pub struct RetryDeniedEvent<'a> {
    pub(crate) request: RequestFacts<'a>,
    pub(crate) failed_attempt: u32,
    pub(crate) reason: RetryDenied,
}

impl<'a> RetryDeniedEvent<'a> {
    /// The request that was not retried.
    pub fn request(&self) -> RequestFacts<'a> {
        self.request
    }

    /// The number of the attempt that failed.
    pub fn failed_attempt(&self) -> u32 {
        self.failed_attempt
    }

    /// Why no retry was made.
    pub fn reason(&self) -> RetryDenied {
        self.reason
    }
}

/// The final response was produced. See [`Observer::on_response`].
#[derive(Clone, Copy, Debug)]
pub struct ResponseEvent<'a> {
    pub(crate) request: RequestFacts<'a>,
    pub(crate) status: StatusCode,
    pub(crate) outcome: Outcome,
    pub(crate) attempts: u32,
    pub(crate) started: Option<Instant>,
}

impl<'a> ResponseEvent<'a> {
    /// The request answered.
    pub fn request(&self) -> RequestFacts<'a> {
        self.request
    }

    /// The status of the response returned to the caller.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// How the request ended.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// How many attempts were made (zero if the request was rejected up front).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// How long the request took in the guard, until response headers (zero if it
    /// completed on its first poll).
    pub fn elapsed(&self) -> Duration {
        elapsed_since(self.started)
    }
}

/// A circuit breaker changed state. See [`Observer::on_circuit_transition`].
#[derive(Clone, Copy, Debug)]
pub struct CircuitEvent<'a> {
    pub(crate) key: Option<&'a str>,
    pub(crate) from: CircuitState,
    pub(crate) to: CircuitState,
    pub(crate) open_for: Option<Duration>,
}

impl<'a> CircuitEvent<'a> {
    /// The breaker's key (e.g. the upstream authority); `None` for the shared
    /// breaker of requests without a key.
    pub fn key(&self) -> Option<&'a str> {
        self.key
    }

    /// The state before.
    pub fn from(&self) -> CircuitState {
        self.from
    }

    /// The state after.
    pub fn to(&self) -> CircuitState {
        self.to
    }

    /// For a transition to open: how long it stays open.
    pub fn open_for(&self) -> Option<Duration> {
        self.open_for
    }
}

/// A request was rejected without calling the upstream. See
/// [`Observer::on_rejected`].
#[derive(Clone, Copy, Debug)]
pub struct RejectedEvent<'a> {
    pub(crate) request: RequestFacts<'a>,
    pub(crate) kind: FailureKind,
    pub(crate) retry_after: Duration,
}

impl<'a> RejectedEvent<'a> {
    /// The request rejected.
    pub fn request(&self) -> RequestFacts<'a> {
        self.request
    }

    /// Why: [`FailureKind::CircuitOpen`] or [`FailureKind::ConcurrencyLimited`].
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// When the caller may try again.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

/// An adaptive concurrency limit was recomputed. See
/// [`Observer::on_concurrency_limit`] and [`crate::adaptive`].
#[derive(Clone, Copy, Debug)]
pub struct ConcurrencyLimitEvent<'a> {
    pub(crate) key: Option<&'a str>,
    pub(crate) limit: u32,
    pub(crate) previous: u32,
    pub(crate) rtt: Duration,
    pub(crate) baseline: Duration,
    pub(crate) samples: u64,
    pub(crate) shed: u64,
    pub(crate) retry_after: Duration,
}

impl<'a> ConcurrencyLimitEvent<'a> {
    /// The breaker key the limit belongs to; `None` for requests without one.
    pub fn key(&self) -> Option<&'a str> {
        self.key
    }

    /// The limit now: how many requests of the key may be in flight.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The limit before this window.
    pub fn previous(&self) -> u32 {
        self.previous
    }

    /// The window's mean latency (time to response headers of successful
    /// attempts, and of attempts that timed out).
    pub fn rtt(&self) -> Duration {
        self.rtt
    }

    /// The baseline the window was compared with: the lowest window mean over
    /// the baseline window, the upstream's latency when nothing queues.
    pub fn baseline(&self) -> Duration {
        self.baseline
    }

    /// How many attempts the window measured.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// How many requests the limit turned away during the window.
    pub fn shed(&self) -> u64 {
        self.shed
    }

    /// The `Retry-After` requests turned away get until the next window.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}
