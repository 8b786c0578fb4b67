//! [`BreakerSnapshot`]: a point-in-time view of one breaker, for health
//! endpoints and operators.

use std::time::Duration;

use super::admission::Breakers;
use super::handle::BreakerMode;
use super::registry::Entry;
use super::state::CircuitState;

/// A point-in-time view of one breaker, e.g. for a health endpoint. With the
/// `serde` feature it serializes (e.g. to JSON) with durations in milliseconds
/// (`until_half_open_ms`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BreakerSnapshot {
    /// The state, including an operator's override.
    pub state: CircuitState,
    /// Failures in a row since the last success.
    pub consecutive_failures: u32,
    /// Calls in the rate window (counted only when a rate policy is set).
    pub window_calls: u64,
    /// Failed calls in the rate window.
    pub window_failures: u64,
    /// Slow calls in the rate window.
    pub window_slow_calls: u64,
    /// For an open breaker: how long until it lets a probe through.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "until_half_open_ms", serialize_with = "millis")
    )]
    pub until_half_open: Option<Duration>,
    /// Trips in a row (the open period doubles with each).
    pub trips: u32,
    /// Requests in flight (counted only when a concurrency limit is set).
    pub in_flight: u32,
}

impl BreakerSnapshot {
    /// The view of `entry`, one of `breakers`' entries, now.
    pub(super) fn of(breakers: &Breakers, entry: &Entry) -> BreakerSnapshot {
        let now = breakers.now_nanos();
        let (calls, failures, slow) = entry.breaker.window_counts(now);
        let state = match breakers.mode() {
            BreakerMode::Auto => entry.breaker.state(),
            BreakerMode::ForcedOpen => CircuitState::ForcedOpen,
            BreakerMode::Disabled => CircuitState::Disabled,
        };
        let until = entry.breaker.nanos_until_half_open(now);
        BreakerSnapshot {
            state,
            consecutive_failures: entry.breaker.consecutive_failures(),
            window_calls: calls,
            window_failures: failures,
            window_slow_calls: slow,
            until_half_open: (state == CircuitState::Open).then(|| Duration::from_nanos(until)),
            trips: entry.breaker.trips(),
            in_flight: entry.tenancy.in_flight(),
        }
    }
}

/// Serializes an optional duration as whole milliseconds.
#[cfg(feature = "serde")]
fn millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}
