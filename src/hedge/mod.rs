//! Hedging: another attempt sent while the first is still out, so one slow
//! replica's tail does not become the caller's latency.
//!
//! The mechanism is in the response future (several attempts in flight); this
//! module holds the policy ([`HedgePolicy`]), the per-key latency window a
//! percentile delay is read from, the pure decision whether a hedge may go,
//! and the set of extra attempts in flight.

mod decision;
mod flight;
mod latency;

use std::time::Duration;

use tokio::time::Instant;

use crate::breaker::Target;
use crate::error::ConfigError;
use crate::keyed::PerKey;

pub(crate) use decision::{decide, HedgeDecision};
pub(crate) use flight::{Flight, InFlight};
use latency::LatencyConfig;
pub(crate) use latency::LatencyWindow;

/// When and how often to hedge; see [`Builder::hedge`](crate::Builder::hedge).
///
/// A hedge is another attempt of the same request, sent while the earlier
/// ones are still in flight. The first answer that is not a failure wins; the
/// others are dropped (their connections closed). Hedging spends upstream
/// capacity to cut tail latency, so it is bounded three ways: only requests
/// that are safe to resend are hedged (the retry rule: idempotent method or an
/// `Idempotency-Key`, and a body buffered for replay), every hedge is paid from
/// the retry budget, and no hedge starts when the deadline has less time left
/// than the hedge delay, while the breaker is not closed, or when the
/// upstream's concurrency limit has no place for it.
///
/// ```
/// use std::time::Duration;
/// use upstream_guard::{HedgePolicy, UpstreamGuardLayer};
///
/// // A second attempt when the first has taken longer than 95 % of recent
/// // attempts did, but never sooner than 20 ms.
/// let layer = UpstreamGuardLayer::builder()
///     .hedge(HedgePolicy::at_percentile(0.95).min_delay(Duration::from_millis(20)))
///     .build()?;
/// # Ok::<(), upstream_guard::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(try_from = "section::HedgeSection", into = "section::HedgeSection")
)]
pub struct HedgePolicy {
    delay: Delay,
    max_hedges: u32,
    min_samples: u32,
    window: Duration,
}

/// How long to wait before a hedge.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Delay {
    Fixed(Duration),
    Percentile {
        percentile: f64,
        min: Duration,
        max: Duration,
    },
}

/// A guard's hedging: its policy, and the latencies a percentile delay is read
/// from (per breaker key), if it uses one.
#[derive(Debug)]
pub(crate) struct Hedging {
    pub(crate) policy: HedgePolicy,
    pub(crate) latencies: Option<PerKey<LatencyWindow>>,
}

impl Hedging {
    pub(crate) fn new(policy: HedgePolicy, keys: usize) -> Hedging {
        let latencies = policy
            .measures()
            .then(|| PerKey::new(policy.latency_config(), keys));
        Hedging { policy, latencies }
    }

    /// The latencies of `target`'s upstream, if they are measured.
    pub(crate) fn latencies(&self, target: Option<Target>) -> Option<&LatencyWindow> {
        self.latencies.as_ref()?.of(target)
    }
}

/// The `[hedge]` section of a config file: exactly one of `after` (a fixed
/// delay) and `percentile`, and the optional bounds.
#[cfg(feature = "serde")]
mod section {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::{Delay, HedgePolicy};

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct HedgeSection {
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        after: Option<Duration>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        percentile: Option<f64>,
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        min_delay: Option<Duration>,
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        max_delay: Option<Duration>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_hedges: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_samples: Option<u32>,
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        window: Option<Duration>,
    }

    impl TryFrom<HedgeSection> for HedgePolicy {
        type Error = String;

        fn try_from(section: HedgeSection) -> Result<Self, String> {
            let mut policy = match (section.after, section.percentile) {
                (Some(after), None) => HedgePolicy::after(after),
                (None, Some(percentile)) => HedgePolicy::at_percentile(percentile),
                _ => return Err("set exactly one of `after` and `percentile`".into()),
            };
            if let Some(min) = section.min_delay {
                policy = policy.min_delay(min);
            }
            if let Some(max) = section.max_delay {
                policy = policy.max_delay(max);
            }
            if let Some(hedges) = section.max_hedges {
                policy = policy.max_hedges(hedges);
            }
            if let Some(samples) = section.min_samples {
                policy = policy.min_samples(samples);
            }
            if let Some(window) = section.window {
                policy = policy.window(window);
            }
            Ok(policy)
        }
    }

    impl From<HedgePolicy> for HedgeSection {
        fn from(policy: HedgePolicy) -> Self {
            let (after, percentile, min_delay, max_delay) = match policy.delay {
                Delay::Fixed(after) => (Some(after), None, None, None),
                Delay::Percentile {
                    percentile,
                    min,
                    max,
                } => (
                    None,
                    Some(percentile),
                    Some(min),
                    (max != Duration::MAX).then_some(max),
                ),
            };
            HedgeSection {
                after,
                percentile,
                min_delay,
                max_delay,
                max_hedges: Some(policy.max_hedges),
                min_samples: Some(policy.min_samples),
                window: Some(policy.window),
            }
        }
    }
}

/// The most hedges a request may send (besides its first attempt).
const MAX_HEDGES: u32 = 4;

impl HedgePolicy {
    /// Hedges after a fixed delay: when an attempt has had no answer for
    /// `delay`, another is sent.
    pub fn after(delay: Duration) -> Self {
        HedgePolicy::with(Delay::Fixed(delay))
    }

    /// Hedges after the `percentile` (e.g. `0.95`) of the latency of recent
    /// attempts to the same upstream (the breaker key), measured to response
    /// headers. Until an upstream has [`min_samples`](Self::min_samples)
    /// answers in the window, its requests are not hedged.
    pub fn at_percentile(percentile: f64) -> Self {
        HedgePolicy::with(Delay::Percentile {
            percentile,
            min: Duration::from_millis(1),
            max: Duration::MAX,
        })
    }

    fn with(delay: Delay) -> Self {
        HedgePolicy {
            delay,
            max_hedges: 1,
            min_samples: 20,
            window: Duration::from_secs(10),
        }
    }

    /// The shortest delay a percentile may give (default 1 ms): a percentile
    /// of very fast answers would otherwise hedge nearly every request.
    pub fn min_delay(mut self, min: Duration) -> Self {
        if let Delay::Percentile { min: m, .. } = &mut self.delay {
            *m = min;
        }
        self
    }

    /// The longest delay a percentile may give (default: no limit).
    pub fn max_delay(mut self, max: Duration) -> Self {
        if let Delay::Percentile { max: m, .. } = &mut self.delay {
            *m = max;
        }
        self
    }

    /// How many hedges one request may send, besides its first attempt
    /// (default 1, at most 4). Each waits the delay after the one before.
    pub fn max_hedges(mut self, hedges: u32) -> Self {
        self.max_hedges = hedges;
        self
    }

    /// How many answers an upstream must have in the window before a
    /// percentile is trusted (default 20).
    pub fn min_samples(mut self, samples: u32) -> Self {
        self.min_samples = samples;
        self
    }

    /// How far back latencies count for a percentile (default 10 s): the
    /// percentile reads the current and the previous window.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    pub(crate) fn max_hedges_per_request(&self) -> u32 {
        self.max_hedges
    }

    /// Whether the delay is read from measured latencies (they must be kept).
    pub(crate) fn measures(&self) -> bool {
        matches!(self.delay, Delay::Percentile { .. })
    }

    pub(crate) fn latency_config(&self) -> LatencyConfig {
        LatencyConfig {
            window: self.window,
        }
    }

    /// The delay before the next hedge, or `None` while a percentile has too
    /// few samples to be trusted.
    pub(crate) fn delay(
        &self,
        latencies: Option<&LatencyWindow>,
        now: Instant,
    ) -> Option<Duration> {
        match self.delay {
            Delay::Fixed(delay) => Some(delay),
            Delay::Percentile {
                percentile,
                min,
                max,
            } => {
                let measured = latencies?.percentile(now, percentile, self.min_samples)?;
                Some(measured.clamp(min, max.max(min)))
            }
        }
    }

    /// Checks every value, naming the offending one by its config file key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        match self.delay {
            Delay::Fixed(delay) if delay.is_zero() => {
                return Err(ConfigError::new("hedge.delay", "must be greater than zero"))
            }
            Delay::Percentile {
                percentile,
                min,
                max,
            } => {
                if !(percentile.is_finite() && percentile > 0.0 && percentile < 1.0) {
                    return Err(ConfigError::new(
                        "hedge.percentile",
                        format!("must be between 0 and 1, exclusive (got {percentile})"),
                    ));
                }
                if min > max {
                    return Err(ConfigError::new(
                        "hedge.min_delay",
                        format!("({min:?}) must not be longer than hedge.max_delay ({max:?})"),
                    ));
                }
            }
            Delay::Fixed(_) => {}
        }
        if !(1..=MAX_HEDGES).contains(&self.max_hedges) {
            return Err(ConfigError::new(
                "hedge.max_hedges",
                format!(
                    "must be between 1 and {MAX_HEDGES} (got {})",
                    self.max_hedges
                ),
            ));
        }
        if self.min_samples == 0 {
            return Err(ConfigError::new("hedge.min_samples", "must be at least 1"));
        }
        if self.window < Duration::from_millis(100) {
            return Err(ConfigError::new("hedge.window", "must be at least 100ms"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(policy: HedgePolicy) -> &'static str {
        policy.validate().expect_err("invalid").field()
    }

    #[test]
    fn invalid_policies_name_their_field() {
        assert_eq!(field(HedgePolicy::after(Duration::ZERO)), "hedge.delay");
        assert_eq!(field(HedgePolicy::at_percentile(1.0)), "hedge.percentile");
        assert_eq!(
            field(HedgePolicy::at_percentile(f64::NAN)),
            "hedge.percentile"
        );
        let inverted = HedgePolicy::at_percentile(0.9)
            .min_delay(Duration::from_secs(2))
            .max_delay(Duration::from_secs(1));
        assert_eq!(field(inverted), "hedge.min_delay");
        let many = HedgePolicy::after(Duration::from_millis(5)).max_hedges(5);
        assert_eq!(field(many), "hedge.max_hedges");
        let none = HedgePolicy::after(Duration::from_millis(5)).max_hedges(0);
        assert_eq!(field(none), "hedge.max_hedges");
        let blind = HedgePolicy::at_percentile(0.9).min_samples(0);
        assert_eq!(field(blind), "hedge.min_samples");
    }

    #[test]
    fn a_fixed_delay_needs_no_measurements() {
        let policy = HedgePolicy::after(Duration::from_millis(30));
        assert_eq!(
            policy.delay(None, Instant::now()),
            Some(Duration::from_millis(30))
        );
        assert!(!policy.measures());
    }

    #[test]
    fn a_percentile_is_clamped_to_its_bounds() {
        let now = Instant::now();
        let window = LatencyWindow::starting_at(
            LatencyConfig {
                window: Duration::from_secs(10),
            },
            now,
        );
        for _ in 0..100 {
            window.record(now, Duration::from_micros(100));
        }
        let policy = HedgePolicy::at_percentile(0.9).min_delay(Duration::from_millis(5));
        assert_eq!(
            policy.delay(Some(&window), now),
            Some(Duration::from_millis(5))
        );
        let capped = HedgePolicy::at_percentile(0.9)
            .min_delay(Duration::from_micros(10))
            .max_delay(Duration::from_micros(50));
        assert_eq!(
            capped.delay(Some(&window), now),
            Some(Duration::from_micros(50))
        );
    }
}
