//! The gradient rule, as plain arithmetic: the next limit from the current one
//! and a closed window's measurements, and the `Retry-After` the window gives.
//! No atomics, no clock: the limiter feeds it numbers.

use std::time::Duration;

use super::AdaptiveConcurrency;

/// The most a limit shrinks in one window: a single bad window (a burst of
/// slow requests, a GC pause) halves it at most.
const MIN_GRADIENT: f64 = 0.5;

/// Growth goes half way to the gradient's target each window: the queue the
/// limit lets build shows a round trip later, and a full step overshoots.
const GROWTH_SMOOTHING: f64 = 0.5;

/// The bounds `Retry-After` is kept in: HTTP counts it in whole seconds, and a
/// caller told to wait minutes would rather get an error.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// What the rule needs of the configuration.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rule {
    min: f64,
    max: f64,
    tolerance: f64,
}

/// What a closed window measured.
#[derive(Clone, Copy, Debug)]
pub(super) struct Measured {
    /// The window's mean latency.
    pub(super) rtt: u64,
    /// The lowest window mean over the baseline window, this one included.
    pub(super) baseline: u64,
    /// The most requests in flight any measurement of the window saw.
    pub(super) peak_in_flight: u32,
}

impl Rule {
    pub(super) fn new(config: &AdaptiveConcurrency) -> Rule {
        Rule {
            min: f64::from(config.min_limit),
            max: f64::from(config.max_limit),
            tolerance: config.tolerance,
        }
    }

    /// The limit after a window; see the module docs of `adaptive`.
    pub(super) fn next(&self, limit: f64, measured: Measured) -> f64 {
        if measured.rtt == 0 {
            return limit;
        }
        let gradient = (1.0 + self.tolerance) * measured.baseline as f64 / measured.rtt as f64;
        let next = if gradient < 1.0 {
            limit * gradient.max(MIN_GRADIENT)
        } else if f64::from(measured.peak_in_flight) * 2.0 < limit {
            // Not limited by us: the window shows nothing about more load.
            limit
        } else {
            limit + (limit * gradient + 1.0 - limit) * GROWTH_SMOOTHING
        };
        next.clamp(self.min, self.max)
    }
}

/// The whole limit a fractional one allows (at least 1).
pub(super) fn whole(limit: f64) -> u32 {
    // In range: the limit is clamped to `min_limit..=max_limit`, both `u32`.
    (limit.floor() as u32).max(1)
}

/// `Retry-After` for a request turned away: one round trip for a place to
/// free up, plus one for each `limit` requests turned away per round trip;
/// rounded up to whole seconds, from 1 s to 60 s.
pub(super) fn retry_after(rtt: Duration, shed: u64, window: Duration, limit: u32) -> Duration {
    if window.is_zero() {
        return MIN_RETRY_AFTER;
    }
    let shed_per_rtt = shed as f64 * rtt.as_secs_f64() / window.as_secs_f64();
    let wait = rtt.as_secs_f64() * (1.0 + shed_per_rtt / f64::from(limit.max(1)));
    let secs = wait
        .ceil()
        .clamp(MIN_RETRY_AFTER.as_secs_f64(), MAX_RETRY_AFTER.as_secs_f64());
    Duration::from_secs(secs as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn rule() -> Rule {
        Rule::new(
            &AdaptiveConcurrency::default()
                .min_limit(2)
                .max_limit(100)
                .tolerance(0.2),
        )
    }

    fn measured(rtt_ms: u64, baseline_ms: u64, peak: u32) -> Measured {
        Measured {
            rtt: rtt_ms * MS,
            baseline: baseline_ms * MS,
            peak_in_flight: peak,
        }
    }

    #[test]
    fn a_limit_in_use_grows_half_way_to_its_target_while_latency_stays_at_the_baseline() {
        // The target is 10 × 1.2 + 1 = 13.
        let next = rule().next(10.0, measured(50, 50, 10));
        assert!((next - 11.5).abs() < 1e-9, "{next}");
    }

    #[test]
    fn a_limit_barely_used_does_not_grow() {
        assert_eq!(rule().next(10.0, measured(50, 50, 4)), 10.0);
    }

    #[test]
    fn a_queue_shrinks_the_limit_to_what_the_upstream_serves_plus_the_tolerance() {
        // 40 in flight, 50 ms baseline, 100 ms measured: the upstream serves
        // 20 at once; 20 × 1.2 = 24.
        let next = rule().next(40.0, measured(100, 50, 40));
        assert!((next - 24.0).abs() < 1e-9, "{next}");
    }

    #[test]
    fn one_window_at_most_halves_the_limit() {
        assert_eq!(rule().next(40.0, measured(1000, 50, 40)), 20.0);
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        assert_eq!(rule().next(3.0, measured(1000, 50, 3)), 2.0);
        assert_eq!(rule().next(95.0, measured(50, 50, 95)), 100.0);
    }

    #[test]
    fn a_window_without_latency_changes_nothing() {
        assert_eq!(rule().next(7.5, measured(0, 0, 7)), 7.5);
    }

    #[test]
    fn retry_after_is_at_least_a_second() {
        let d = retry_after(Duration::from_millis(50), 0, Duration::from_millis(100), 10);
        assert_eq!(d, Duration::from_secs(1));
    }

    #[test]
    fn retry_after_grows_with_the_requests_turned_away_per_round_trip() {
        // 1 s round trips, 40 turned away per second, a limit of 10:
        // 1 s × (1 + 40 / 10) = 5 s.
        let d = retry_after(Duration::from_secs(1), 80, Duration::from_secs(2), 10);
        assert_eq!(d, Duration::from_secs(5));
    }

    #[test]
    fn retry_after_rounds_up_and_is_capped() {
        let d = retry_after(Duration::from_millis(1500), 0, Duration::from_secs(2), 10);
        assert_eq!(d, Duration::from_secs(2));
        let d = retry_after(Duration::from_secs(30), 1000, Duration::from_secs(30), 1);
        assert_eq!(d, Duration::from_secs(60));
    }

    #[test]
    fn a_fractional_limit_admits_its_whole_part() {
        assert_eq!(whole(2.9), 2);
        assert_eq!(whole(0.2), 1);
    }
}
