//! [`BreakerPolicy`]: what trips a breaker, how long it stays open, how
//! requests are grouped into breakers, and the checks that a policy makes sense.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;

use super::state::{Policy, MAX_PROBES};
use crate::adaptive::AdaptiveConcurrency;
use crate::error::ConfigError;
use crate::placement::Placement;

/// Picks the breaker key of a request; see [`BreakerPolicy::per_key`].
type KeyFn = dyn for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync;

/// How requests are grouped into breakers.
#[derive(Clone)]
pub(super) enum Keying {
    /// One breaker for every request.
    Single,
    /// One breaker per upstream, the default: per URI authority in front of a
    /// client (requests without one share a breaker), per route the server
    /// fixed behind a server, never the authority a caller sent.
    Authority,
    /// One breaker per user-chosen key.
    Custom(Arc<KeyFn>),
}

impl Keying {
    /// The breaker key of a request; `None` for the shared breaker.
    pub(super) fn key<'a>(&self, parts: &'a Parts) -> Option<&'a str> {
        match self {
            Keying::Single => None,
            Keying::Authority => match Placement::of(parts) {
                Placement::Route(route) => Some(route),
                Placement::Server => None,
                Placement::Client => parts.uri.authority().map(|a| a.as_str()),
            },
            Keying::Custom(f) => f(parts),
        }
    }

    /// A key function: code only, it cannot be written to or read from a file.
    #[cfg(feature = "serde")]
    fn is_custom(&self) -> bool {
        matches!(self, Keying::Custom(_))
    }
}

/// Two custom keyings are equal when they share the key function.
impl PartialEq for Keying {
    fn eq(&self, other: &Keying) -> bool {
        match (self, other) {
            (Keying::Single, Keying::Single) | (Keying::Authority, Keying::Authority) => true,
            (Keying::Custom(a), Keying::Custom(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Debug for Keying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keying::Single => f.write_str("Single"),
            Keying::Authority => f.write_str("Authority"),
            Keying::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Circuit breaker configuration.
///
/// `BreakerPolicy::default()` trips after 5 consecutive failures, stays open
/// 5 s (doubling on each repeated trip up to 60 s), lets 1 probe through when
/// half-open, and keeps one breaker per upstream
/// ([`per_authority`](Self::per_authority)), at most 1024.
///
/// ```
/// use std::time::Duration;
/// use upstream_guard::{BreakerPolicy, UpstreamGuardLayer};
///
/// let breaker = BreakerPolicy::failure_rate(0.5, 20)
///     .window(Duration::from_secs(30))
///     .with_consecutive_failures(10)
///     .open_for(Duration::from_secs(10))
///     .half_open_probes(3);
/// let layer = UpstreamGuardLayer::builder().circuit_breaker(breaker).build()?;
/// # Ok::<(), upstream_guard::ConfigError>(())
/// ```
///
/// With the `serde` feature it is the `[circuit_breaker]` section of a
/// `GuardConfig` file: each key is a field below,
/// durations are written like `"800ms"`, a key left out keeps its
/// `BreakerPolicy::default()` value, and an unknown key is an error. The trip
/// policies are independent there: `consecutive_failures` stays 5 when a rate
/// policy is added, unless set to `0`. A [custom key](Self::per_key) is code
/// only: `keys` is `"authority"` or `"single"`, and a policy with a custom key
/// is written without `keys`, so that reading it back keys by authority.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default, deny_unknown_fields)
)]
pub struct BreakerPolicy {
    /// `consecutive_failures`; 0 turns this policy off.
    consecutive_failures: u32,
    /// `failure_rate`: above 0, at most 1; `None`: off.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    failure_rate: Option<f64>,
    /// `slow_call_rate`: above 0, at most 1; `None`: off.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub(super) slow_call_rate: Option<f64>,
    /// `slow_call_threshold`: what counts as slow for `slow_call_rate`.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub(super) slow_call_threshold: Duration,
    /// `min_calls`: the fewest calls in the window before a rate policy trips.
    min_calls: u32,
    /// `window`: the rate policies' sliding window.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    pub(super) window: Duration,
    /// `open_for`: the first open period.
    #[cfg_attr(feature = "serde", serde(with = "humantime_serde"))]
    open_for: Duration,
    /// `max_open_for`; `None`: 60 s, or `open_for` if that is longer.
    #[cfg_attr(
        feature = "serde",
        serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")
    )]
    max_open_for: Option<Duration>,
    /// `half_open_probes`.
    half_open_probes: u32,
    /// `keys`: `"authority"` or `"single"`, or a key function (code only).
    #[cfg_attr(
        feature = "serde",
        serde(with = "keying", skip_serializing_if = "Keying::is_custom")
    )]
    pub(super) keys: Keying,
    /// `max_keys`.
    pub(super) max_keys: usize,
    /// `concurrency_limit`; `None`: no cap.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    concurrency_limit: Option<u32>,
    /// `adaptive_concurrency`: a `[circuit_breaker.adaptive_concurrency]`
    /// table; `None`: no adaptive limit.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    adaptive_concurrency: Option<AdaptiveConcurrency>,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: 5,
            failure_rate: None,
            slow_call_rate: None,
            slow_call_threshold: Duration::from_secs(1),
            min_calls: 20,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            max_open_for: None,
            half_open_probes: 1,
            keys: Keying::Authority,
            max_keys: 1024,
            concurrency_limit: None,
            adaptive_concurrency: None,
        }
    }
}

impl BreakerPolicy {
    /// Trips after `n` consecutive failures.
    pub fn consecutive_failures(n: u32) -> Self {
        BreakerPolicy::default().with_consecutive_failures(n)
    }

    /// Trips when at least `rate` (0–1) of the calls in the window failed, once
    /// the window holds at least `min_calls` calls.
    pub fn failure_rate(rate: f64, min_calls: u32) -> Self {
        BreakerPolicy {
            consecutive_failures: 0,
            ..BreakerPolicy::default()
        }
        .with_failure_rate(rate, min_calls)
    }

    /// Trips when at least `rate` (0–1) of the calls in the window took longer
    /// than `slower_than` to answer, once the window holds `min_calls` calls.
    pub fn slow_call_rate(rate: f64, slower_than: Duration, min_calls: u32) -> Self {
        BreakerPolicy {
            consecutive_failures: 0,
            ..BreakerPolicy::default()
        }
        .with_slow_call_rate(rate, slower_than, min_calls)
    }

    /// Also trips after `n` consecutive failures (0 turns this policy off).
    pub fn with_consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = n;
        self
    }

    /// Also trips on a failure rate; see [`BreakerPolicy::failure_rate`].
    pub fn with_failure_rate(mut self, rate: f64, min_calls: u32) -> Self {
        self.failure_rate = Some(rate);
        self.min_calls = min_calls;
        self
    }

    /// Also trips on a slow-call rate; see [`BreakerPolicy::slow_call_rate`].
    pub fn with_slow_call_rate(mut self, rate: f64, slower_than: Duration, min_calls: u32) -> Self {
        self.slow_call_rate = Some(rate);
        self.slow_call_threshold = slower_than;
        self.min_calls = min_calls;
        self
    }

    /// The sliding window the rate policies look at (default 10 s). It slides in
    /// tenths: calls older than the window stop counting.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// How long the breaker stays open after tripping (default 5 s). Each trip
    /// in a row (a failed half-open probe) doubles it, up to
    /// [`max_open_for`](Self::max_open_for).
    pub fn open_for(mut self, open_for: Duration) -> Self {
        self.open_for = open_for;
        self
    }

    /// The longest open period (default 60 s, or `open_for` when that is longer).
    /// Set it equal to `open_for` for a fixed open period.
    pub fn max_open_for(mut self, max: Duration) -> Self {
        self.max_open_for = Some(max);
        self
    }

    /// How many probe requests a half-open breaker lets through (default 1). All
    /// must succeed to close it; any failure opens it again.
    pub fn half_open_probes(mut self, probes: u32) -> Self {
        self.half_open_probes = probes;
        self
    }

    /// One breaker for all requests, whatever their upstream.
    pub fn single(mut self) -> Self {
        self.keys = Keying::Single;
        self
    }

    /// One breaker per upstream, the default. In front of a client (a
    /// reverse proxy's hyper-util `Client`, a tonic `Channel`) that is one per
    /// request URI authority (`host:port`); requests without one share a
    /// breaker. Behind a server the authority is the caller's (HTTP/2's
    /// `:authority`, an absolute-form HTTP/1 target), so it is never the key
    /// there:
    ///
    /// - `axum::Router::layer` (feature `axum`): one breaker per route axum
    ///   matched (`/orders/{id}`); requests no route matched share one.
    /// - tonic `Server::add_service(GuardedService::new(..))` (feature
    ///   `tonic`): one breaker per gRPC service.
    /// - tonic `Server::layer` (feature `tonic`, TCP or Unix socket
    ///   listeners): one breaker for the server. It sits before routing, where
    ///   the caller alone names the method and the `:authority`.
    ///
    /// The guard knows it sits behind a server from request extensions that
    /// only the server sets; without those features it cannot tell, and keys
    /// every request by its URI authority. See the crate docs, "Placements".
    pub fn per_authority(mut self) -> Self {
        self.keys = Keying::Authority;
        self
    }

    /// One breaker per key chosen by `key`; `None` uses the shared breaker.
    ///
    /// ```
    /// use upstream_guard::BreakerPolicy;
    ///
    /// // One breaker per tenant.
    /// let breaker = BreakerPolicy::default()
    ///     .per_key(|req: &http::request::Parts| req.headers.get("x-tenant")?.to_str().ok());
    /// ```
    pub fn per_key<F>(mut self, key: F) -> Self
    where
        F: for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync + 'static,
    {
        self.keys = Keying::Custom(Arc::new(key));
        self
    }

    /// The most keys with a breaker of their own (default 1024). When full, a new
    /// key takes over the breaker of a key that has not been used recently.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max;
        self
    }

    /// At most `limit` requests in flight per key; more are answered `503` at once.
    ///
    /// A request holds its place from the moment it is admitted until the
    /// upstream's work is over: the end of its response body, not of its
    /// headers. The cap is counted per breaker key (the keys set by
    /// [`per_authority`](Self::per_authority), [`per_key`](Self::per_key) or
    /// [`single`](Self::single)), which is why it is set here; it applies even
    /// while an operator has [disabled](crate::BreakerHandle::disable) the
    /// breakers.
    pub fn concurrency_limit(mut self, limit: u32) -> Self {
        self.concurrency_limit = Some(limit);
        self
    }

    /// A concurrency limit per key that follows the upstream's latency,
    /// instead of a fixed [`concurrency_limit`](Self::concurrency_limit) (set
    /// one or the other). Requests over it are answered `503` at once, with a
    /// `Retry-After` derived from the latency measured; see
    /// [`AdaptiveConcurrency`] for how the limit moves.
    ///
    /// Like the fixed limit it is counted per breaker key, applies while an
    /// operator has disabled the breakers, and a request holds its place until
    /// its response body ends. The breaker decides first: an open circuit
    /// turns requests away before they count here, and when it lets probes
    /// through the limit restarts from its initial value.
    pub fn adaptive_concurrency(mut self, limit: AdaptiveConcurrency) -> Self {
        self.adaptive_concurrency = Some(limit);
        self
    }

    /// The per-key concurrency cap, for the bulkhead.
    pub(crate) fn concurrency_cap(&self) -> Option<u32> {
        self.concurrency_limit
    }

    /// The adaptive concurrency limit, for the bulkhead.
    pub(crate) fn adaptive(&self) -> Option<&AdaptiveConcurrency> {
        self.adaptive_concurrency.as_ref()
    }

    /// The longest open period: as set, else 60 s or `open_for` if longer (so
    /// `open_for(1h)` alone is valid and simply does not grow).
    fn effective_max_open_for(&self) -> Duration {
        self.max_open_for
            .unwrap_or(DEFAULT_MAX_OPEN_FOR.max(self.open_for))
    }

    /// How many keyed breakers there can be: `max_keys`, or 0 for a single
    /// breaker. Per-key state kept elsewhere (retry budgets) is sized by it.
    pub(crate) fn keyed_capacity(&self) -> usize {
        match self.keys {
            Keying::Single => 0,
            _ => self.max_keys,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let rate_ok = |r: Option<f64>| r.is_none_or(|r| r.is_finite() && r > 0.0 && r <= 1.0);
        if !rate_ok(self.failure_rate) {
            return Err(ConfigError::new(
                "circuit_breaker.failure_rate",
                "must be a number above 0 and at most 1",
            ));
        }
        if !rate_ok(self.slow_call_rate) {
            return Err(ConfigError::new(
                "circuit_breaker.slow_call_rate",
                "must be a number above 0 and at most 1",
            ));
        }
        if self.slow_call_rate.is_some() && self.slow_call_threshold.is_zero() {
            return Err(ConfigError::new(
                "circuit_breaker.slow_call_threshold",
                "must be greater than zero",
            ));
        }
        if (self.failure_rate.is_some() || self.slow_call_rate.is_some()) && self.min_calls == 0 {
            return Err(ConfigError::new(
                "circuit_breaker.min_calls",
                "must be at least 1",
            ));
        }
        if self.consecutive_failures == 0
            && self.failure_rate.is_none()
            && self.slow_call_rate.is_none()
            && self.concurrency_limit.is_none()
            && self.adaptive_concurrency.is_none()
        {
            return Err(ConfigError::new(
                "circuit_breaker.consecutive_failures",
                "must be at least 1 when no rate policy or concurrency limit is set (the breaker could never trip)",
            ));
        }
        if self.window < Duration::from_millis(100) || self.window > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "circuit_breaker.window",
                "must be from 100 ms to 1 hour",
            ));
        }
        if self.open_for.is_zero() {
            return Err(ConfigError::new(
                "circuit_breaker.open_for",
                "must be greater than zero",
            ));
        }
        if self.effective_max_open_for() < self.open_for {
            return Err(ConfigError::new(
                "circuit_breaker.max_open_for",
                "must not be shorter than circuit_breaker.open_for",
            ));
        }
        if self.half_open_probes == 0 || self.half_open_probes > MAX_PROBES {
            return Err(ConfigError::new(
                "circuit_breaker.half_open_probes",
                format!("must be from 1 to {MAX_PROBES}"),
            ));
        }
        if self.max_keys == 0 || self.max_keys > 1_000_000 {
            return Err(ConfigError::new(
                "circuit_breaker.max_keys",
                "must be from 1 to 1000000",
            ));
        }
        if self.concurrency_limit == Some(0) {
            return Err(ConfigError::new(
                "circuit_breaker.concurrency_limit",
                "must be at least 1",
            ));
        }
        if let Some(adaptive) = &self.adaptive_concurrency {
            if self.concurrency_limit.is_some() {
                return Err(ConfigError::new(
                    "circuit_breaker.adaptive_concurrency",
                    "cannot be set with circuit_breaker.concurrency_limit (a fixed limit); \
                     set adaptive_concurrency.max_limit for a ceiling",
                ));
            }
            adaptive.validate()?;
        }
        Ok(())
    }

    /// The state machine's view of the policy: durations in nanoseconds.
    pub(super) fn policy(&self) -> Policy {
        Policy {
            consecutive_failures: self.consecutive_failures,
            failure_rate: self.failure_rate,
            slow_call_rate: self.slow_call_rate,
            min_calls: self.min_calls,
            open_nanos: nanos(self.open_for),
            max_open_nanos: nanos(self.effective_max_open_for()),
            probes: self.half_open_probes,
        }
    }
}

/// The default cap on a growing open period.
const DEFAULT_MAX_OPEN_FOR: Duration = Duration::from_secs(60);

/// A duration in nanoseconds, saturating: the breakers keep time as `u64`
/// nanoseconds since their epoch.
pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The `keys` of a config file: how requests are grouped into breakers.
#[cfg(feature = "serde")]
mod keying {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Keying;

    /// The groupings a file can name; a key function is code only.
    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Named {
        /// One breaker per upstream: a client's request authority, a server's route.
        Authority,
        /// One breaker for every request.
        Single,
    }

    pub(super) fn serialize<S: Serializer>(keying: &Keying, s: S) -> Result<S::Ok, S::Error> {
        match keying {
            Keying::Authority => Named::Authority.serialize(s),
            Keying::Single => Named::Single.serialize(s),
            // Skipped by `skip_serializing_if`; an error rather than a wrong key.
            Keying::Custom(_) => Err(serde::ser::Error::custom(
                "a custom breaker key cannot be written to a config file",
            )),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Keying, D::Error> {
        Ok(match Named::deserialize(d)? {
            Named::Authority => Keying::Authority,
            Named::Single => Keying::Single,
        })
    }
}

#[cfg(all(test, feature = "axum"))]
mod tests {
    use super::*;

    /// A request as an axum `Router` passes it on, after it received `received`.
    fn routed(received: &str, uri: &str) -> Parts {
        let (mut parts, ()) = http::Request::get(uri)
            .body(())
            .expect("a valid request")
            .into_parts();
        let received = received.parse().expect("a valid URI");
        (parts.extensions).insert(axum::extract::OriginalUri(received));
        parts
    }

    #[test]
    fn a_routed_request_is_not_keyed_by_the_authority_its_caller_sent() {
        let parts = routed(
            "http://elsewhere.example/fail",
            "http://elsewhere.example/fail",
        );
        assert_eq!(Keying::Authority.key(&parts), None);
    }

    #[test]
    fn a_routed_request_forwarded_to_an_upstream_is_keyed_by_the_upstream() {
        // A reverse proxy's handler rewrites the URI and keeps the extensions.
        let parts = routed("/api/orders", "http://orders.internal:8080/orders");
        assert_eq!(Keying::Authority.key(&parts), Some("orders.internal:8080"));
    }
}
