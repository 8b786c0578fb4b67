//! Adaptive concurrency: a per-upstream limit on requests in flight that
//! follows the upstream's measured latency, instead of a number picked once.
//!
//! A static [`concurrency_limit`](crate::BreakerPolicy::concurrency_limit) is a
//! guess: set too low, it sheds requests the upstream could have served; set
//! too high, the upstream queues what it cannot serve at once, every request
//! waits behind that queue, and at enough load they all time out. An
//! [`AdaptiveConcurrency`] limit, set with
//! [`BreakerPolicy::adaptive_concurrency`](crate::BreakerPolicy::adaptive_concurrency),
//! finds the concurrency at which the upstream stops answering as fast as it
//! can, keeps the limit a little above it, and moves it when the upstream
//! slows down or recovers.
//!
//! # How the limit moves
//!
//! Per breaker key, the guard measures the time to response headers of
//! attempts the upstream answered successfully, and of attempts that timed
//! out (a timeout's duration is a lower bound of the latency, and the clearest
//! sign of a queue). Failures that say nothing about queueing (a refused
//! connection, a `500`) are the breaker's business and are not measured.
//!
//! The measurements go into a sample window. A window closes once it is at
//! least [`sample_window`](AdaptiveConcurrency::sample_window) and three
//! round trips long and holds at least 8 measurements; the request whose
//! measurement closes it recomputes the limit (a gradient controller, after
//! Envoy's adaptive concurrency filter and Netflix's Gradient2):
//!
//! - `rtt`: the window's mean latency; `baseline`: the lowest window mean over
//!   the last [`baseline_window`](AdaptiveConcurrency::baseline_window) — the
//!   latency of the upstream when nothing queues.
//! - `gradient = (1 + tolerance) × baseline / rtt`, at least `0.5`: above `1`
//!   while the latency stays within the [`tolerance`](AdaptiveConcurrency::tolerance)
//!   of the baseline, below `1` once a queue makes it longer.
//! - Below `1`, the limit is multiplied by the gradient (at most halved per
//!   window). At `1` or above, and only if the window used at least half the
//!   limit (an idle upstream proves nothing about how much more it can take),
//!   the limit moves half way to `limit × gradient + 1`.
//! - The limit stays within [`min_limit`](AdaptiveConcurrency::min_limit) and
//!   [`max_limit`](AdaptiveConcurrency::max_limit).
//! - A window measures only attempts that started in it (and timeouts): those
//!   that started earlier were admitted under the previous limit, and
//!   answering for it again would make the limit swing past its mark.
//!
//! Against an upstream that serves `N` requests at once in a fixed time and
//! queues the rest, the limit settles around `(1 + tolerance) × N` (the tests
//! hold it between `N` and `1.2 × N + 2` with the default tolerance, 0.2): the
//! admitted requests wait about a `tolerance` of the service time in the
//! upstream's queue, no more, and the upstream is never idle for want of work.
//!
//! The baseline is a windowed minimum rather than a forced measurement at low
//! concurrency (Envoy's): the controller's own back-off drains the queue, so
//! windows at the true latency keep coming. If the upstream becomes slower for
//! good, the limit falls to the minimum until the old baseline has aged out of
//! the `baseline_window`, then grows back.
//!
//! # The circuit breaker decides first
//!
//! The breaker admits a request before the limit does: while the circuit is
//! open, requests get the breaker's `503 circuit-open` and never count here.
//! When the breaker lets half-open probes through, the limit restarts from
//! [`initial_limit`](AdaptiveConcurrency::initial_limit) with no baseline, so
//! the closed circuit starts conservatively and measures the recovered upstream
//! afresh. A key that takes over another key's registry slot starts afresh too.
//!
//! # What a turned-away caller sees
//!
//! `503` with `application/problem+json` of type
//! `urn:upstream-guard:problem:concurrency-limited` (a gRPC caller gets
//! `UNAVAILABLE`), and a `Retry-After` header derived from the last window:
//!
//! ```text
//! wait        = rtt × (1 + turned_away_per_rtt / limit)
//! Retry-After = wait rounded up to whole seconds, from 1 s to 60 s
//! ```
//!
//! One round trip for a place to free up, plus one more for each `limit`
//! requests that were turned away per round trip: the time the upstream would
//! need to serve them, were they all to come back. Before the first window has
//! closed, it is 1 s.
//!
//! # Cost
//!
//! Admission reads the limit from one atomic next to the in-flight count; each
//! measurement is three atomic additions. Recomputing is a few dozen
//! instructions, done once per window by whichever request closes it (a
//! compare-and-swap elects it); no lock is taken on the request path.

mod controller;
mod limiter;

use std::time::Duration;

use crate::error::ConfigError;

pub(crate) use limiter::{Limiter, Limits, Update};

/// An adaptive concurrency limit per breaker key; see the [module docs](self)
/// for how it moves and what a turned-away caller sees. Set it with
/// [`BreakerPolicy::adaptive_concurrency`](crate::BreakerPolicy::adaptive_concurrency).
///
/// ```
/// use std::time::Duration;
/// use upstream_guard::adaptive::AdaptiveConcurrency;
/// use upstream_guard::{BreakerPolicy, UpstreamGuardLayer};
///
/// let limit = AdaptiveConcurrency::default()
///     .min_limit(2)
///     .max_limit(500)
///     .tolerance(0.2);
/// let layer = UpstreamGuardLayer::builder()
///     .circuit_breaker(BreakerPolicy::default().adaptive_concurrency(limit))
///     .build()?;
/// # Ok::<(), upstream_guard::ConfigError>(())
/// ```
///
/// With the `serde` feature it is the `[circuit_breaker.adaptive_concurrency]`
/// table of a `GuardConfig` file: each key is a field below, durations written
/// like `"100ms"`; an empty table turns it on with the defaults.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct AdaptiveConcurrency {
    /// `min_limit` (default 2).
    pub(crate) min_limit: u32,
    /// `max_limit` (default 1000).
    pub(crate) max_limit: u32,
    /// `initial_limit` (default 20).
    pub(crate) initial_limit: u32,
    /// `tolerance` (default 0.2).
    pub(crate) tolerance: f64,
    /// `sample_window` (default 100 ms).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub(crate) sample_window: Duration,
    /// `baseline_window` (default 30 s).
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub(crate) baseline_window: Duration,
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        AdaptiveConcurrency {
            min_limit: 2,
            max_limit: 1000,
            initial_limit: 20,
            tolerance: 0.2,
            sample_window: Duration::from_millis(100),
            baseline_window: Duration::from_secs(30),
        }
    }
}

impl AdaptiveConcurrency {
    /// The lowest the limit goes (default 2): even an upstream that looks
    /// overloaded gets this many requests at once, so its latency keeps being
    /// measured and the limit can grow back.
    pub fn min_limit(mut self, min: u32) -> Self {
        self.min_limit = min;
        self
    }

    /// The highest the limit goes (default 1000).
    pub fn max_limit(mut self, max: u32) -> Self {
        self.max_limit = max;
        self
    }

    /// The limit of a key before anything was measured, and after its circuit
    /// breaker let probes through (default 20).
    pub fn initial_limit(mut self, initial: u32) -> Self {
        self.initial_limit = initial;
        self
    }

    /// How much longer than its baseline the upstream may take before the
    /// limit comes down, as a fraction (default 0.2, i.e. 20 %). It is also
    /// the queue the limit allows: about `tolerance × N` requests beyond the
    /// `N` the upstream serves at once. Raise it for an upstream whose latency
    /// varies widely from one window to the next.
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The shortest sample window (default 100 ms); a window also lasts at
    /// least three round trips and 8 measurements.
    pub fn sample_window(mut self, window: Duration) -> Self {
        self.sample_window = window;
        self
    }

    /// How long a window's latency can stand as the baseline (default 30 s):
    /// how long it takes the limit to accept an upstream that became slower
    /// for good.
    pub fn baseline_window(mut self, window: Duration) -> Self {
        self.baseline_window = window;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.min_limit == 0 {
            return Err(ConfigError::new(
                "circuit_breaker.adaptive_concurrency.min_limit",
                "must be at least 1",
            ));
        }
        if self.max_limit < self.min_limit {
            return Err(ConfigError::new(
                "circuit_breaker.adaptive_concurrency.max_limit",
                "must not be below min_limit",
            ));
        }
        if !(self.min_limit..=self.max_limit).contains(&self.initial_limit) {
            return Err(ConfigError::new(
                "circuit_breaker.adaptive_concurrency.initial_limit",
                "must be from min_limit to max_limit",
            ));
        }
        if !(self.tolerance.is_finite() && (0.0..=10.0).contains(&self.tolerance)) {
            return Err(ConfigError::new(
                "circuit_breaker.adaptive_concurrency.tolerance",
                "must be a number from 0 to 10",
            ));
        }
        let window = Duration::from_millis(1)..=Duration::from_secs(60);
        if !window.contains(&self.sample_window) {
            return Err(ConfigError::new(
                "circuit_breaker.adaptive_concurrency.sample_window",
                "must be from 1 ms to 60 s",
            ));
        }
        if self.baseline_window < self.sample_window
            || self.baseline_window > Duration::from_secs(3600)
        {
            return Err(ConfigError::new(
                "circuit_breaker.adaptive_concurrency.baseline_window",
                "must be from sample_window to 1 hour",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(AdaptiveConcurrency::default().validate(), Ok(()));
    }

    #[test]
    fn invalid_bounds_name_their_field() {
        let field = |c: AdaptiveConcurrency| c.validate().map_err(|e| e.field());
        let base = AdaptiveConcurrency::default;
        assert_eq!(
            field(base().min_limit(0)),
            Err("circuit_breaker.adaptive_concurrency.min_limit")
        );
        assert_eq!(
            field(base().min_limit(10).max_limit(5)),
            Err("circuit_breaker.adaptive_concurrency.max_limit")
        );
        assert_eq!(
            field(base().initial_limit(1)),
            Err("circuit_breaker.adaptive_concurrency.initial_limit")
        );
        assert_eq!(
            field(base().tolerance(f64::NAN)),
            Err("circuit_breaker.adaptive_concurrency.tolerance")
        );
        assert_eq!(
            field(base().sample_window(Duration::ZERO)),
            Err("circuit_breaker.adaptive_concurrency.sample_window")
        );
        assert_eq!(
            field(base().baseline_window(Duration::from_millis(10))),
            Err("circuit_breaker.adaptive_concurrency.baseline_window")
        );
    }
}
