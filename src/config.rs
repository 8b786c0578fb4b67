//! [`GuardConfig`]: a layer's configuration from a config file (feature `serde`).
//!
//! The config file format is documented on [`GuardConfig`] (rendered docs) and
//! in `examples/config.toml` (every key, with its default).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerPolicy;
use crate::error::ConfigError;
use crate::layer::{Builder, UpstreamGuardLayer};
use crate::retry::RetryPolicy;

/// A whole [`UpstreamGuardLayer`] configuration, as read from a config file.
///
/// Operators tune timeouts, retries and breakers per deployment, so these
/// settings belong in a config file rather than in code. `GuardConfig`
/// deserializes with any serde format (TOML, YAML, JSON, ...), every field is
/// optional and falls back to the [`Builder`] default, and durations are written
/// the human way (`"800ms"`, `"3s"`, `"1m 30s"`). `examples/config.toml` in the
/// repository lists every key with its default.
///
/// ```
/// use upstream_guard::{GuardConfig, UpstreamGuardLayer};
///
/// let config: GuardConfig = toml::from_str(r#"
///     attempt_timeout = "800ms"
///     deadline = "3s"
///     upstream_name = "billing"
///
///     [retry]
///     max_attempts = 3
///     budget_ratio = 0.1
///
///     [circuit_breaker]
///     consecutive_failures = 5
///     open_for = "10s"
/// "#)?;
/// let layer = UpstreamGuardLayer::from_config(config)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Two kinds of mistakes are caught, each naming the offending key:
///
/// - **Shape** (unknown key, wrong type, a duration like `"3 parsecs"`): by the
///   deserializer, because unknown fields are denied, so a typo never silently
///   falls back to a default.
/// - **Values** (`max_attempts = 0`, a deadline shorter than the attempt
///   timeout): by [`UpstreamGuardLayer::from_config`], as a [`ConfigError`]
///   whose [`field`](ConfigError::field) is the key's dotted path, e.g.
///   `retry.max_attempts`.
///
/// Code can still add what a file cannot hold (an observer, a classifier, a
/// custom breaker key) through [`into_builder`](Self::into_builder).
///
/// The fields are public so code can adjust a loaded file (e.g. from a command
/// line flag); the type is `#[non_exhaustive]` so new settings can be added, so
/// start from [`GuardConfig::default()`] instead of a struct literal.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct GuardConfig {
    /// How long one attempt may wait for response headers (default `5s`); see
    /// [`Builder::attempt_timeout`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub attempt_timeout: Option<Duration>,
    /// How long the whole request may take, retries and backoff included
    /// (default `15s`); see [`Builder::deadline`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,
    /// Fails a response body that sends no data for this long (default: off);
    /// see [`Builder::body_idle_timeout`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub body_idle_timeout: Option<Duration>,
    /// The upstream's name in error bodies, spans and metrics (default: the
    /// request's authority); see [`Builder::upstream_name`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_name: Option<String>,
    /// Puts the inner error's text in synthesized bodies (default `false`); see
    /// [`Builder::expose_error_details`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expose_error_details: Option<bool>,
    /// The `[retry]` section (default: [`RetryPolicy::default()`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    /// The `[circuit_breaker]` section (default: [`BreakerPolicy::default()`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerConfig>,
}

/// The `[retry]` section of a [`GuardConfig`]; each key maps to a [`RetryPolicy`]
/// setting and defaults to [`RetryPolicy::default()`]'s value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// `false` allows one attempt per request whatever `max_attempts` says
    /// (default `true`). The other keys are still checked, so retries can be
    /// switched back on without surprises.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Attempts per request, the first included, 1 to 10 (default 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The first retry's backoff ceiling (default `25ms`); see [`RetryPolicy::backoff`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub backoff_base: Option<Duration>,
    /// The largest backoff (default `1s`); see [`RetryPolicy::backoff`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub backoff_max: Option<Duration>,
    /// `false` turns the retry budget off (default `true`); only do this when
    /// something else bounds retry load. The other `budget_*` keys are then
    /// ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_enabled: Option<bool>,
    /// Retries allowed as a fraction of recent requests (default `0.2`); see
    /// [`RetryPolicy::budget`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_ratio: Option<f64>,
    /// Retries per second allowed on top of the ratio (default 10); see
    /// [`RetryPolicy::budget`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_min_per_second: Option<u32>,
    /// How long requests count toward the budget, 1 to 60 s (default `10s`); see
    /// [`RetryPolicy::budget_window`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub budget_window: Option<Duration>,
    /// The longest upstream `Retry-After` waited for (default `5s`); see
    /// [`RetryPolicy::max_retry_after`].
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_retry_after: Option<Duration>,
    /// The largest request body, in bytes, buffered for replay (default 65536);
    /// see [`RetryPolicy::max_replay_body`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_replay_body: Option<usize>,
}

/// The `[circuit_breaker]` section of a [`GuardConfig`]; each key maps to a
/// [`BreakerPolicy`] setting and defaults to [`BreakerPolicy::default()`]'s
/// value.
///
/// The trip policies are independent: `consecutive_failures` stays on (5) when
/// a rate policy is added, unless it is set to `0`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// `false` turns the circuit breaker off (default `true`); see
    /// [`Builder::no_circuit_breaker`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Trips after this many failures in a row; `0` turns this policy off
    /// (default 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Trips when at least this fraction (above 0, at most 1) of the calls in
    /// `window` failed (default: off); see [`BreakerPolicy::with_failure_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<f64>,
    /// Trips when at least this fraction of the calls in `window` were slower
    /// than `slow_call_threshold` (default: off); see
    /// [`BreakerPolicy::with_slow_call_rate`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_call_rate: Option<f64>,
    /// What counts as slow for `slow_call_rate` (default `1s`).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub slow_call_threshold: Option<Duration>,
    /// The fewest calls in `window` before a rate policy may trip (default 20);
    /// ignored without `failure_rate` or `slow_call_rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_calls: Option<u32>,
    /// The sliding window of the rate policies, 100 ms to 1 h (default `10s`).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub window: Option<Duration>,
    /// How long the breaker stays open after tripping (default `5s`); doubles on
    /// each repeated trip up to `max_open_for`.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub open_for: Option<Duration>,
    /// The longest open period (default `60s`).
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_open_for: Option<Duration>,
    /// Probe requests let through when half-open (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub half_open_probes: Option<u32>,
    /// How requests are grouped into breakers (default `"authority"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<BreakerKeys>,
    /// The most keys with a breaker of their own (default 1024).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_keys: Option<usize>,
    /// At most this many requests in flight per key; more get `503` at once
    /// (default: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<u32>,
}

/// How a config file groups requests into circuit breakers. A custom key
/// function can only be set from code, with [`BreakerPolicy::per_key`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BreakerKeys {
    /// `"authority"`: one breaker per request URI authority (`host:port`); see
    /// [`BreakerPolicy::per_authority`].
    Authority,
    /// `"single"`: one breaker for every request; see [`BreakerPolicy::single`].
    Single,
}

/// [`BreakerPolicy::default()`]'s `min_calls`, needed to add a rate policy
/// without one. A unit test keeps it in step with the breaker's default.
const DEFAULT_MIN_CALLS: u32 = 20;

/// [`BreakerPolicy::default()`]'s slow-call threshold, needed to add a
/// slow-call policy without one. A unit test keeps it in step.
const DEFAULT_SLOW_CALL_THRESHOLD: Duration = Duration::from_secs(1);

impl GuardConfig {
    /// A [`Builder`] holding every setting of this configuration, so code can add
    /// what a file cannot (an observer, a classifier, a failure hook) before
    /// [`Builder::build`] checks it all.
    ///
    /// ```
    /// use upstream_guard::{GuardConfig};
    /// use upstream_guard::observe::{NoopObserver};
    ///
    /// let config: GuardConfig = toml::from_str(r#"deadline = "20s""#)?;
    /// let layer = config.into_builder().observer(NoopObserver).build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_builder(self) -> Builder {
        let mut builder = UpstreamGuardLayer::builder();
        if let Some(timeout) = self.attempt_timeout {
            builder = builder.attempt_timeout(timeout);
        }
        if let Some(deadline) = self.deadline {
            builder = builder.deadline(deadline);
        }
        if let Some(timeout) = self.body_idle_timeout {
            builder = builder.body_idle_timeout(timeout);
        }
        if let Some(name) = self.upstream_name {
            builder = builder.upstream_name(name);
        }
        if let Some(expose) = self.expose_error_details {
            builder = builder.expose_error_details(expose);
        }
        if let Some(retry) = self.retry {
            builder = builder.retry(retry.into_retry());
        }
        if let Some(breaker) = self.circuit_breaker {
            builder = match breaker.into_circuit_breaker() {
                Some(breaker) => builder.circuit_breaker(breaker),
                None => builder.no_circuit_breaker(),
            };
        }
        builder
    }
}

impl RetryConfig {
    /// The [`RetryPolicy`] policy this section describes, unvalidated (the
    /// [`Builder`] checks it).
    pub fn into_retry(self) -> RetryPolicy {
        let defaults = RetryPolicy::default();
        let mut retry = RetryPolicy::default();
        if let Some(attempts) = self.max_attempts {
            retry = retry.max_attempts(attempts);
        }
        if self.backoff_base.is_some() || self.backoff_max.is_some() {
            retry = retry.backoff(
                self.backoff_base.unwrap_or(defaults.backoff_base),
                self.backoff_max.unwrap_or(defaults.backoff_max),
            );
        }
        if self.budget_ratio.is_some() || self.budget_min_per_second.is_some() {
            // `RetryPolicy::default()` has a budget; the fallbacks only matter if it
            // ever stops having one.
            let (ratio, min_per_second) = defaults
                .budget
                .map_or((0.2, 10), |b| (b.ratio, b.min_per_second));
            retry = retry.budget(
                self.budget_ratio.unwrap_or(ratio),
                self.budget_min_per_second.unwrap_or(min_per_second),
            );
        }
        if let Some(window) = self.budget_window {
            retry = retry.budget_window(window);
        }
        // After the other budget keys: `budget_window` would bring a budget back.
        if self.budget_enabled == Some(false) {
            retry = retry.no_budget();
        }
        if let Some(cap) = self.max_retry_after {
            retry = retry.max_retry_after(cap);
        }
        if let Some(bytes) = self.max_replay_body {
            retry = retry.max_replay_body(bytes);
        }
        if self.enabled == Some(false) {
            // `RetryPolicy::disabled()` is exactly one attempt; keep the other values
            // so they are still validated.
            retry = retry.max_attempts(1);
        }
        retry
    }
}

impl CircuitBreakerConfig {
    /// The [`BreakerPolicy`] this section describes, unvalidated (the
    /// [`Builder`] checks it), or `None` when `enabled = false`. Code can add a
    /// custom key with [`BreakerPolicy::per_key`] before handing it to
    /// [`Builder::circuit_breaker`].
    pub fn into_circuit_breaker(self) -> Option<BreakerPolicy> {
        if self.enabled == Some(false) {
            return None;
        }
        let mut breaker = BreakerPolicy::default();
        if let Some(n) = self.consecutive_failures {
            breaker = breaker.with_consecutive_failures(n);
        }
        let min_calls = self.min_calls.unwrap_or(DEFAULT_MIN_CALLS);
        if let Some(rate) = self.failure_rate {
            breaker = breaker.with_failure_rate(rate, min_calls);
        }
        if let Some(rate) = self.slow_call_rate {
            let threshold = self
                .slow_call_threshold
                .unwrap_or(DEFAULT_SLOW_CALL_THRESHOLD);
            breaker = breaker.with_slow_call_rate(rate, threshold, min_calls);
        }
        if let Some(window) = self.window {
            breaker = breaker.window(window);
        }
        if let Some(open_for) = self.open_for {
            breaker = breaker.open_for(open_for);
        }
        if let Some(max) = self.max_open_for {
            breaker = breaker.max_open_for(max);
        }
        if let Some(probes) = self.half_open_probes {
            breaker = breaker.half_open_probes(probes);
        }
        match self.keys {
            Some(BreakerKeys::Single) => breaker = breaker.single(),
            Some(BreakerKeys::Authority) => breaker = breaker.per_authority(),
            None => {}
        }
        if let Some(max) = self.max_keys {
            breaker = breaker.max_keys(max);
        }
        if let Some(limit) = self.concurrency_limit {
            breaker = breaker.concurrency_limit(limit);
        }
        Some(breaker)
    }
}

impl UpstreamGuardLayer {
    /// Builds a layer from a configuration file's contents, checking every value;
    /// the error's [`field`](ConfigError::field) is the offending key's dotted
    /// path in the file (e.g. `retry.max_attempts`).
    ///
    /// ```
    /// use upstream_guard::{GuardConfig, UpstreamGuardLayer};
    ///
    /// let config: GuardConfig = toml::from_str("[retry]\nmax_attempts = 0")?;
    /// let err = UpstreamGuardLayer::from_config(config).unwrap_err();
    /// assert_eq!(err.field(), "retry.max_attempts");
    /// # Ok::<(), toml::de::Error>(())
    /// ```
    pub fn from_config(config: GuardConfig) -> Result<UpstreamGuardLayer, ConfigError> {
        // The builder names fields by their config keys, so its error is ours.
        config.into_builder().build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_defaults_match_the_breaker_defaults() {
        let defaults = format!("{:?}", BreakerPolicy::default());
        assert!(
            defaults.contains(&format!("min_calls: {DEFAULT_MIN_CALLS},")),
            "{defaults}"
        );
        assert!(
            defaults.contains(&format!(
                "slow_call_threshold: {DEFAULT_SLOW_CALL_THRESHOLD:?},"
            )),
            "{defaults}"
        );
    }

    #[test]
    fn an_empty_config_is_the_default_builder() {
        let built = format!("{:?}", GuardConfig::default().into_builder());
        assert_eq!(built, format!("{:?}", UpstreamGuardLayer::builder()));
    }

    #[test]
    fn disabled_retry_keeps_one_attempt_and_checks_the_rest() {
        let section = RetryConfig {
            enabled: Some(false),
            max_attempts: Some(5),
            ..RetryConfig::default()
        };
        assert_eq!(section.into_retry(), RetryPolicy::disabled());

        let section = RetryConfig {
            enabled: Some(false),
            budget_window: Some(Duration::from_secs(600)),
            ..RetryConfig::default()
        };
        let err = UpstreamGuardLayer::from_config(GuardConfig {
            retry: Some(section),
            ..GuardConfig::default()
        })
        .unwrap_err();
        assert_eq!(err.field(), "retry.budget_window");
    }

    #[test]
    fn budget_keys_map_onto_the_budget() {
        let section = RetryConfig {
            budget_ratio: Some(0.5),
            budget_window: Some(Duration::from_secs(30)),
            ..RetryConfig::default()
        };
        let retry = section.into_retry();
        let budget = retry.budget.expect("a budget");
        assert_eq!(budget.ratio, 0.5);
        assert_eq!(budget.min_per_second, 10);
        assert_eq!(budget.ttl, Duration::from_secs(30));

        let section = RetryConfig {
            budget_enabled: Some(false),
            budget_window: Some(Duration::from_secs(30)),
            ..RetryConfig::default()
        };
        assert_eq!(section.into_retry().budget, None);
    }

    #[test]
    fn budget_errors_name_the_config_keys() {
        let section = RetryConfig {
            budget_ratio: Some(-1.0),
            ..RetryConfig::default()
        };
        let err = UpstreamGuardLayer::from_config(GuardConfig {
            retry: Some(section),
            ..GuardConfig::default()
        })
        .unwrap_err();
        assert_eq!(err.field(), "retry.budget_ratio");
        assert!(err.to_string().contains("`retry.budget_ratio`"), "{err}");
    }

    #[test]
    fn disabled_breaker_is_none() {
        let section = CircuitBreakerConfig {
            enabled: Some(false),
            ..CircuitBreakerConfig::default()
        };
        assert!(section.into_circuit_breaker().is_none());
        let layer = UpstreamGuardLayer::from_config(GuardConfig {
            circuit_breaker: Some(CircuitBreakerConfig {
                enabled: Some(false),
                ..CircuitBreakerConfig::default()
            }),
            ..GuardConfig::default()
        })
        .unwrap();
        assert!(layer.breaker_handle().is_none());
    }
}
