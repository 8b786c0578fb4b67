//! [`GuardConfig`]: a layer's configuration from a config file (feature `serde`).
//!
//! The config file format is documented on [`GuardConfig`] (rendered docs) and
//! in `examples/config.toml` (every key, with its default).
//!
//! The sections are the policy types themselves ([`RetryPolicy`],
//! [`BreakerPolicy`]), deserialized with their `Default` filling in what a
//! file leaves out: a default is written down once, where the builder takes
//! it from.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerPolicy;
use crate::error::ConfigError;
use crate::hedge::HedgePolicy;
use crate::layer::{Builder, UpstreamGuardLayer, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_DEADLINE};
use crate::retry::RetryPolicy;

/// A whole [`UpstreamGuardLayer`] configuration, as read from a config file.
///
/// Operators tune timeouts, retries and breakers per deployment, so these
/// settings belong in a config file rather than in code. `GuardConfig`
/// deserializes with any self-describing serde format (TOML, YAML, JSON, ...),
/// every key is optional and falls back to the [`Builder`] default, and
/// durations are written the human way (`"800ms"`, `"3s"`, `"1m 30s"`).
/// `examples/config.toml` in the repository lists every key with its default.
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
/// The `[retry]` section is a [`RetryPolicy`] (`max_attempts = 1` turns retries
/// off), the `[circuit_breaker]` section a [`BreakerPolicy`]; each documents its
/// keys. `circuit_breaker = false` (instead of the section) turns the breaker
/// off.
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
/// custom breaker key) through [`into_builder`](Self::into_builder), or by
/// setting [`circuit_breaker`](Self::circuit_breaker) to a policy with
/// [`BreakerPolicy::per_key`]. Such a key is not written when the config is
/// serialized: read back, that breaker keys by authority.
///
/// The fields are public so code can adjust a loaded file (e.g. from a command
/// line flag); the type is `#[non_exhaustive]` so new settings can be added, so
/// start from [`GuardConfig::default()`] instead of a struct literal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct GuardConfig {
    /// How long one attempt may wait for response headers (default `5s`); see
    /// [`Builder::attempt_timeout`].
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// How long the whole request may take, retries and backoff included
    /// (default `15s`); see [`Builder::deadline`].
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
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
    pub expose_error_details: bool,
    /// The circuit breaker (default: [`BreakerPolicy::default()`]); `None`, or
    /// `circuit_breaker = false` in a file, turns it off.
    #[serde(with = "breaker_section")]
    pub circuit_breaker: Option<BreakerPolicy>,
    /// The `[retry]` section (default: [`RetryPolicy::default()`]).
    pub retry: RetryPolicy,
    /// The `[hedge]` section (default: no hedging): `after = "50ms"` or
    /// `percentile = 0.95`, and `min_delay`, `max_delay`, `max_hedges`,
    /// `min_samples`, `window`; see [`HedgePolicy`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgePolicy>,
}

impl Default for GuardConfig {
    /// The [`Builder`]'s defaults.
    fn default() -> Self {
        GuardConfig {
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
            body_idle_timeout: None,
            upstream_name: None,
            expose_error_details: false,
            circuit_breaker: Some(BreakerPolicy::default()),
            retry: RetryPolicy::default(),
            hedge: None,
        }
    }
}

/// `circuit_breaker`: a `[circuit_breaker]` table, or `false` for no breaker
/// (`true`: the default breaker).
mod breaker_section {
    use std::fmt;

    use serde::de::value::MapAccessDeserializer;
    use serde::de::{MapAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::breaker::BreakerPolicy;

    pub(super) fn serialize<S: Serializer>(
        breaker: &Option<BreakerPolicy>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match breaker {
            Some(policy) => policy.serialize(s),
            None => s.serialize_bool(false),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<BreakerPolicy>, D::Error> {
        d.deserialize_any(Section)
    }

    struct Section;

    impl<'de> Visitor<'de> for Section {
        type Value = Option<BreakerPolicy>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a circuit breaker table, or false for no circuit breaker")
        }

        fn visit_bool<E>(self, on: bool) -> Result<Self::Value, E> {
            Ok(on.then(BreakerPolicy::default))
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            // The policy's own derive: its keys, defaults and error messages.
            BreakerPolicy::deserialize(MapAccessDeserializer::new(map)).map(Some)
        }
    }
}

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
        let mut builder = UpstreamGuardLayer::builder()
            .attempt_timeout(self.attempt_timeout)
            .deadline(self.deadline)
            .expose_error_details(self.expose_error_details)
            .retry(self.retry);
        if let Some(timeout) = self.body_idle_timeout {
            builder = builder.body_idle_timeout(timeout);
        }
        if let Some(name) = self.upstream_name {
            builder = builder.upstream_name(name);
        }
        if let Some(hedge) = self.hedge {
            builder = builder.hedge(hedge);
        }
        match self.circuit_breaker {
            Some(breaker) => builder.circuit_breaker(breaker),
            None => builder.no_circuit_breaker(),
        }
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
    fn an_empty_config_is_the_default_builder() {
        let built = format!("{:?}", GuardConfig::default().into_builder());
        assert_eq!(built, format!("{:?}", UpstreamGuardLayer::builder()));
    }

    #[test]
    fn budget_keys_map_onto_the_budget() {
        let retry: RetryPolicy =
            toml::from_str("budget_ratio = 0.5\nbudget_window = \"30s\"").unwrap();
        let budget = retry.budget_config().expect("a budget");
        assert_eq!(budget.ratio, 0.5);
        assert_eq!(budget.min_per_second, 10);
        assert_eq!(budget.ttl, Duration::from_secs(30));

        let retry: RetryPolicy =
            toml::from_str("budget_enabled = false\nbudget_window = \"30s\"").unwrap();
        assert_eq!(retry.budget_config(), None);
    }

    #[test]
    fn a_disabled_budget_is_not_checked() {
        let config: GuardConfig =
            toml::from_str("[retry]\nbudget_enabled = false\nbudget_ratio = -1.0").unwrap();
        UpstreamGuardLayer::from_config(config).expect("the budget is off");
    }

    #[test]
    fn a_custom_breaker_key_is_left_out_of_a_written_config() {
        let config = GuardConfig {
            circuit_breaker: Some(BreakerPolicy::default().per_key(|_| Some("tenant"))),
            ..GuardConfig::default()
        };
        let text = toml::to_string(&config).expect("serializes");
        assert!(!text.contains("\nkeys ="), "{text}");
        let read: GuardConfig = toml::from_str(&text).unwrap();
        assert_eq!(read, GuardConfig::default(), "{text}");
    }

    #[test]
    fn a_hedge_section_is_a_hedge_policy_and_reads_back() {
        let config: GuardConfig =
            toml::from_str("[hedge]\npercentile = 0.95\nmin_delay = \"5ms\"\nmax_hedges = 2")
                .unwrap();
        let expected = HedgePolicy::at_percentile(0.95)
            .min_delay(Duration::from_millis(5))
            .max_hedges(2);
        assert_eq!(config.hedge, Some(expected));
        let text = toml::to_string(&config).expect("serializes");
        assert_eq!(
            toml::from_str::<GuardConfig>(&text).unwrap(),
            config,
            "{text}"
        );
        UpstreamGuardLayer::from_config(config).expect("valid");
    }

    #[test]
    fn a_hedge_section_needs_exactly_one_delay() {
        let neither = toml::from_str::<GuardConfig>("[hedge]\nmax_hedges = 2").unwrap_err();
        assert!(
            neither
                .to_string()
                .contains("exactly one of `after` and `percentile`"),
            "{neither}"
        );
        let both = "[hedge]\nafter = \"10ms\"\npercentile = 0.9";
        assert!(toml::from_str::<GuardConfig>(both).is_err());
        let bad: GuardConfig = toml::from_str("[hedge]\nafter = \"10ms\"\nmax_hedges = 9").unwrap();
        let error = UpstreamGuardLayer::from_config(bad).unwrap_err();
        assert_eq!(error.field(), "hedge.max_hedges");
    }

    #[test]
    fn circuit_breaker_false_is_no_breaker_and_true_the_default_one() {
        let config: GuardConfig = toml::from_str("circuit_breaker = false").unwrap();
        assert_eq!(config.circuit_breaker, None);
        let layer = UpstreamGuardLayer::from_config(config.clone()).unwrap();
        assert!(layer.breaker_handle().is_none());
        let text = toml::to_string(&config).expect("serializes");
        assert_eq!(
            toml::from_str::<GuardConfig>(&text).unwrap(),
            config,
            "{text}"
        );

        let config: GuardConfig = toml::from_str("circuit_breaker = true").unwrap();
        assert_eq!(config.circuit_breaker, Some(BreakerPolicy::default()));
    }
}
