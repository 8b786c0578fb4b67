//! The guard's settings, the same in both modes, and the layer they build.

use std::time::Duration;

use upstream_guard::adaptive::AdaptiveConcurrency;
use upstream_guard::endpoints::{Endpoints, EndpointsBuilder};
use upstream_guard::observe::NoopObserver;
use upstream_guard::{
    BreakerPolicy, ConfigError, HedgePolicy, Observer, RetryPolicy, UpstreamGuardLayer,
};

/// Default per-attempt timeout (`--attempt-timeout-ms`).
pub const DEFAULT_ATTEMPT_TIMEOUT_MS: u64 = 300;
/// Default overall deadline (`--deadline-ms`).
pub const DEFAULT_DEADLINE_MS: u64 = 1_000;
/// Default attempts per request, the first included (`--max-attempts`).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default failures in a row that open a circuit (`--failure-threshold`).
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// Default time a circuit stays open before a probe (`--open-ms`); each failed
/// probe doubles it, up to [`MAX_OPEN_FACTOR`] times.
pub const DEFAULT_OPEN_MS: u64 = 1_000;
pub const MAX_OPEN_FACTOR: u32 = 2;
/// Backoff between attempts: full jitter, from this base...
pub const BACKOFF_BASE: Duration = Duration::from_millis(10);
/// ...doubling up to this cap.
pub const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// What the guard is configured with; the same in both modes.
#[derive(Clone, Copy, Debug)]
pub struct GuardSettings {
    pub attempt_timeout: Duration,
    pub deadline: Duration,
    pub max_attempts: u32,
    pub failure_threshold: u32,
    pub open_for: Duration,
    /// Hedge after this long without an answer; `None`: no hedging.
    pub hedge_after: Option<Duration>,
    /// `--adaptive-concurrency [TOLERANCE]`: a limit per upstream that follows
    /// its latency.
    pub adaptive_concurrency: Option<f64>,
    /// `--concurrency-limit`: a fixed limit per upstream.
    pub concurrency_limit: Option<u32>,
}

/// How one guard groups requests into circuit breakers.
#[derive(Clone, Copy, Debug)]
pub enum BreakerKeys {
    /// One breaker per upstream authority (the library's default).
    PerUpstream,
    /// One breaker per first path segment (`/reset/...` → `reset`): the demo's
    /// fault upstream serves every scenario, and a failing route must not open
    /// the circuit of a healthy one.
    PerRoute,
}

impl GuardSettings {
    /// Checks the settings by building a layer from them: the builder names the
    /// offending field of a bad one. Done before anything starts, in both modes
    /// (and with `--no-guard` too, so one command line runs both ways).
    pub fn check(&self) -> Result<(), ConfigError> {
        self.layer(
            self.retry(),
            BreakerKeys::PerUpstream,
            "check",
            NoopObserver,
        )
        .map(drop)
    }

    /// The retry policy: `max_attempts`, a short backoff, the default budget.
    pub fn retry(&self) -> RetryPolicy {
        RetryPolicy::default()
            .max_attempts(self.max_attempts)
            .backoff(BACKOFF_BASE, BACKOFF_MAX)
    }

    /// The circuit breaker: `failure_threshold` failures in a row open it for
    /// `open_for`, doubling on each failed probe up to [`MAX_OPEN_FACTOR`] times.
    fn breaker(&self, keys: BreakerKeys) -> BreakerPolicy {
        let mut breaker = BreakerPolicy::consecutive_failures(self.failure_threshold)
            .open_for(self.open_for)
            .max_open_for(self.max_open_for());
        if let Some(tolerance) = self.adaptive_concurrency {
            let limit = AdaptiveConcurrency::default().tolerance(tolerance);
            breaker = breaker.adaptive_concurrency(limit);
        }
        if let Some(limit) = self.concurrency_limit {
            breaker = breaker.concurrency_limit(limit);
        }
        match keys {
            BreakerKeys::PerUpstream => breaker.per_authority(),
            BreakerKeys::PerRoute => breaker.per_key(|request: &http::request::Parts| {
                request.uri.path().trim_start_matches('/').split('/').next()
            }),
        }
    }

    /// The longest an open circuit waits before a probe.
    pub fn max_open_for(&self) -> Duration {
        self.open_for.saturating_mul(MAX_OPEN_FACTOR)
    }

    /// Builds a guard layer for one upstream. Invalid settings come back as a
    /// [`ConfigError`] that names the offending field.
    pub fn layer(
        &self,
        retry: RetryPolicy,
        keys: BreakerKeys,
        upstream_name: &str,
        observer: impl Observer,
    ) -> Result<UpstreamGuardLayer, ConfigError> {
        let mut builder = UpstreamGuardLayer::builder()
            .attempt_timeout(self.attempt_timeout)
            .deadline(self.deadline)
            .retry(retry)
            .circuit_breaker(self.breaker(keys))
            .upstream_name(upstream_name)
            .observer(observer);
        if let Some(after) = self.hedge_after {
            builder = builder.hedge(HedgePolicy::after(after));
        }
        builder.build()
    }

    /// How replicas of one upstream are guarded each: the same breaker
    /// settings per replica, and an attempt timeout of their own a hair under
    /// the guard's, so that a replica that hangs is counted (and ejected)
    /// before the guard drops its attempt.
    pub fn replicas<S: Clone>(
        &self,
        client: S,
        upstreams: &[http::uri::Authority],
    ) -> Result<Endpoints<S>, ConfigError> {
        let timeout = self
            .attempt_timeout
            .saturating_sub(Duration::from_millis(1))
            .max(Duration::from_millis(1));
        let urls = upstreams
            .iter()
            .map(|authority| format!("http://{authority}"));
        EndpointsBuilder::default()
            .breaker(self.breaker(BreakerKeys::PerUpstream))
            .attempt_timeout(timeout)
            .build(client, urls)
    }
}
