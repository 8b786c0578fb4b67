//! Circuit breaking: stop calling an upstream that keeps failing, answer at once
//! with `503` and `Retry-After`, and probe it again after a while.
//!
//! - **States**: closed (calls flow, failures are counted) → open (calls are
//!   rejected without touching the upstream) → half-open (a few probes go through;
//!   all succeed → closed, one fails → open again, for longer) → closed.
//! - **Trip policies**: consecutive failures (the default, 5); failure rate over a
//!   sliding time window with a minimum number of calls; slow-call rate. Any
//!   configured policy can trip the breaker. What counts as a failure comes from
//!   the [`Classify`](crate::Classify) implementation: by default transport errors,
//!   timeouts and 5xx.
//! - **Per key**: one breaker per request authority (`host:port`) by default, or
//!   per a key of your choosing, in a registry bounded by
//!   [`max_keys`](BreakerPolicy::max_keys). Requests without a key share one
//!   breaker.
//! - **Concurrency cap** (bulkhead): at most N requests in flight per key; more
//!   get `503` at once.
//! - **Operators** can force a breaker open, disable it, and read snapshots for
//!   health endpoints through a [`BreakerHandle`].

mod registry;
mod state;
mod sync;
mod tenancy;
mod window;

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use tokio::time::Instant;

pub use state::CircuitState;

pub(crate) use registry::{Entry, KeyCache, Keyed, Target};
pub(crate) use state::{Admission, Policy, Record, Transition, MAX_PROBES};
use tenancy::{Acquired, FIRST_GENERATION};

use crate::error::ConfigError;

/// Picks the breaker key of a request; see [`BreakerPolicy::per_key`].
type KeyFn = dyn for<'a> Fn(&'a Parts) -> Option<&'a str> + Send + Sync;

/// How requests are grouped into breakers.
#[derive(Clone)]
enum Keying {
    /// One breaker for every request.
    Single,
    /// One breaker per request URI authority; requests without one share a breaker.
    Authority,
    /// One breaker per user-chosen key.
    Custom(Arc<KeyFn>),
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
/// half-open, and keeps one breaker per request authority, at most 1024.
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
#[derive(Clone, Debug)]
pub struct BreakerPolicy {
    consecutive_failures: u32,
    failure_rate: Option<f64>,
    slow_call_rate: Option<f64>,
    slow_call_threshold: Duration,
    min_calls: u32,
    window: Duration,
    open_for: Duration,
    /// `None`: 60 s, or `open_for` if that is longer.
    max_open_for: Option<Duration>,
    probes: u32,
    keying: Keying,
    max_keys: usize,
    concurrency_limit: Option<u32>,
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
            probes: 1,
            keying: Keying::Authority,
            max_keys: 1024,
            concurrency_limit: None,
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
        self.probes = probes;
        self
    }

    /// One breaker for all requests, whatever their upstream.
    pub fn single(mut self) -> Self {
        self.keying = Keying::Single;
        self
    }

    /// One breaker per request URI authority (`host:port`), the default. Requests
    /// without an authority (e.g. behind `axum::Router::layer`, where URIs are
    /// paths) share one breaker.
    pub fn per_authority(mut self) -> Self {
        self.keying = Keying::Authority;
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
        self.keying = Keying::Custom(Arc::new(key));
        self
    }

    /// The most keys with a breaker of their own (default 1024). When full, a new
    /// key takes over the breaker of a key that has not been used recently.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max;
        self
    }

    /// At most `limit` requests in flight per key; more are answered `503` at once.
    pub fn concurrency_limit(mut self, limit: u32) -> Self {
        self.concurrency_limit = Some(limit);
        self
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
        match self.keying {
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
        if self.probes == 0 || self.probes > MAX_PROBES {
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
        Ok(())
    }

    fn policy(&self) -> Policy {
        Policy {
            consecutive_failures: self.consecutive_failures,
            failure_rate: self.failure_rate,
            slow_call_rate: self.slow_call_rate,
            min_calls: self.min_calls,
            open_nanos: nanos(self.open_for),
            max_open_nanos: nanos(self.effective_max_open_for()),
            probes: self.probes,
        }
    }
}

/// Serializes an optional duration as whole milliseconds.
fn millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        None => s.serialize_none(),
    }
}

/// The default cap on a growing open period.
const DEFAULT_MAX_OPEN_FOR: Duration = Duration::from_secs(60);

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// An operator's override of every breaker of a guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerMode {
    /// The breakers follow their policies.
    Auto,
    /// Every request is rejected with 503.
    ForcedOpen,
    /// Every request goes through and nothing is counted.
    Disabled,
}

const AUTO: u8 = 0;
const FORCED_OPEN: u8 = 1;
const DISABLED: u8 = 2;

/// All breakers of a guard: the shared default one and the keyed registry.
pub(crate) struct Breakers {
    policy: Policy,
    slow_nanos: Option<u64>,
    concurrency_limit: Option<u32>,
    keying: Keying,
    epoch: Instant,
    mode: AtomicU8,
    default: Entry,
    keyed: Option<Keyed>,
}

impl fmt::Debug for Breakers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breakers")
            .field("policy", &self.policy)
            .field("keying", &self.keying)
            .field("keyed", &self.keyed)
            .finish_non_exhaustive()
    }
}

/// What [`Breakers::admit`] decided for a request.
pub(crate) enum Admit {
    /// Go ahead; keep this ticket to record the outcome and release the permits.
    Go(Ticket),
    /// Rejected: answer with this failure kind; retry after this long.
    Reject(crate::FailureKind, Duration),
}

/// A request's hold on its breaker: which one, whether it is a probe, and
/// whether it holds a concurrency permit.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(crate) target: Target,
    pub(crate) probe: Option<u64>,
    pub(crate) permit: bool,
    /// Breakers disabled by the operator: record nothing.
    pub(crate) counted: bool,
}

impl Ticket {
    /// A ticket that holds nothing and records nothing.
    fn uncounted(target: Target) -> Ticket {
        Ticket {
            target,
            probe: None,
            permit: false,
            counted: false,
        }
    }
}

impl Breakers {
    pub(crate) fn new(config: &BreakerPolicy) -> Breakers {
        let window = nanos(config.window);
        Breakers {
            policy: config.policy(),
            slow_nanos: config
                .slow_call_rate
                .map(|_| nanos(config.slow_call_threshold)),
            concurrency_limit: config.concurrency_limit,
            keyed: match config.keying {
                Keying::Single => None,
                _ => Some(Keyed::new(config.max_keys, window)),
            },
            keying: config.keying.clone(),
            epoch: Instant::now(),
            mode: AtomicU8::new(AUTO),
            default: Entry::new(window),
        }
    }

    pub(crate) fn now_nanos(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.epoch))
    }

    /// Whether attempt durations matter (a slow-call policy is set).
    pub(crate) fn slow_threshold(&self) -> Option<Duration> {
        self.slow_nanos.map(Duration::from_nanos)
    }

    /// Which breaker a request belongs to.
    pub(crate) fn target(&self, parts: &Parts, cache: &mut KeyCache) -> Target {
        let Some(keyed) = &self.keyed else {
            return Target::Default;
        };
        let key = match &self.keying {
            Keying::Single => None,
            Keying::Authority => parts.uri.authority().map(|a| a.as_str()),
            Keying::Custom(f) => f(parts),
        };
        key.and_then(|k| keyed.target(k, cache))
            .unwrap_or(Target::Default)
    }

    /// The entry of a target, if the target's key still holds it.
    pub(crate) fn entry(&self, target: Target) -> Option<&Entry> {
        self.current(target).map(|(entry, _)| entry)
    }

    /// The entry of a target and the generation it holds it at, if the target's
    /// key still holds it.
    fn current(&self, target: Target) -> Option<(&Entry, u32)> {
        let (entry, generation) = self.slot(target)?;
        match target {
            Target::Default => Some((entry, generation)),
            Target::Keyed { .. } => {
                (entry.tenancy.generation() == generation).then_some((entry, generation))
            }
        }
    }

    /// The entry a target names and the generation the target holds it at,
    /// whether or not its key still holds it: for changes that check the
    /// generation themselves, in the same atomic step.
    fn slot(&self, target: Target) -> Option<(&Entry, u32)> {
        match target {
            // Never given to another key.
            Target::Default => Some((&self.default, FIRST_GENERATION)),
            Target::Keyed { index, generation } => {
                Some((self.keyed.as_ref()?.entry(index)?, generation))
            }
        }
    }

    /// The key of a target, for events.
    pub(crate) fn key_of(&self, target: Target) -> Option<Arc<str>> {
        match target {
            Target::Default => None,
            Target::Keyed { index, .. } => self.keyed.as_ref()?.key_of(index),
        }
    }

    pub(crate) fn mode(&self) -> BreakerMode {
        match self.mode.load(Ordering::Acquire) {
            FORCED_OPEN => BreakerMode::ForcedOpen,
            DISABLED => BreakerMode::Disabled,
            _ => BreakerMode::Auto,
        }
    }

    fn set_mode(&self, mode: BreakerMode) {
        let value = match mode {
            BreakerMode::Auto => AUTO,
            BreakerMode::ForcedOpen => FORCED_OPEN,
            BreakerMode::Disabled => DISABLED,
        };
        self.mode.store(value, Ordering::Release);
    }

    /// Lets a request through, or not. The closed-state path is a few loads.
    pub(crate) fn admit(&self, target: Target) -> (Admit, Option<Transition>, CircuitState) {
        match self.mode() {
            BreakerMode::Auto => {}
            BreakerMode::ForcedOpen => {
                let reject = Admit::Reject(crate::FailureKind::CircuitOpen, self.policy_open_for());
                return (reject, None, CircuitState::ForcedOpen);
            }
            BreakerMode::Disabled => {
                return (
                    Admit::Go(Ticket::uncounted(target)),
                    None,
                    CircuitState::Disabled,
                );
            }
        }
        let Some((entry, generation)) = self.current(target) else {
            // The entry was evicted between lookup and admission: let it through
            // uncounted rather than guess.
            return (
                Admit::Go(Ticket::uncounted(target)),
                None,
                CircuitState::Closed,
            );
        };
        let (admission, transition) = entry.breaker.admit(&self.policy, || self.now_nanos());
        let state = entry.breaker.state();
        let probe = match admission {
            Admission::Admitted { probe } => probe,
            Admission::Rejected { retry_after_nanos } => {
                let reject = Admit::Reject(
                    crate::FailureKind::CircuitOpen,
                    Duration::from_nanos(retry_after_nanos),
                );
                return (reject, transition, state);
            }
        };
        let mut permit = false;
        if let Some(limit) = self.concurrency_limit {
            match entry.tenancy.acquire(generation, limit) {
                Acquired::Permit => permit = true,
                refused => {
                    if let Some(epoch) = probe {
                        entry.breaker.release_probe(epoch);
                    }
                    let admit = match refused {
                        Acquired::Full => Admit::Reject(
                            crate::FailureKind::ConcurrencyLimited,
                            Duration::from_secs(1),
                        ),
                        // Evicted since the check above: as there, uncounted.
                        _ => Admit::Go(Ticket::uncounted(target)),
                    };
                    return (admit, transition, state);
                }
            }
        }
        let ticket = Ticket {
            target,
            probe,
            permit,
            counted: true,
        };
        (Admit::Go(ticket), transition, state)
    }

    fn policy_open_for(&self) -> Duration {
        Duration::from_nanos(self.policy.open_nanos)
    }

    /// Records how an attempt ended. Consumes the ticket's probe.
    pub(crate) fn record(&self, ticket: &mut Ticket, record: Record) -> Option<Transition> {
        if !ticket.counted {
            return None;
        }
        let entry = self.entry(ticket.target)?;
        entry
            .breaker
            .record(&self.policy, record, ticket.probe.take(), || {
                self.now_nanos()
            })
    }

    /// Whether a request on this target may be retried now (its breaker is closed).
    pub(crate) fn allows_retry(&self, ticket: &Ticket) -> bool {
        if !ticket.counted {
            return self.mode() != BreakerMode::ForcedOpen;
        }
        self.mode() == BreakerMode::Auto
            && self
                .entry(ticket.target)
                .is_none_or(|e| e.breaker.is_closed())
    }

    /// Gives back what a finished (or dropped) request held. What it held on
    /// an entry since given to another key is not given back: re-keying dropped
    /// it (the permit count) or made it stale (the probe's epoch).
    pub(crate) fn release(&self, ticket: &mut Ticket) {
        let Some((entry, generation)) = self.slot(ticket.target) else {
            return;
        };
        if let Some(epoch) = ticket.probe.take() {
            if entry.tenancy.generation() == generation {
                entry.breaker.release_probe(epoch);
            }
        }
        if std::mem::take(&mut ticket.permit) {
            entry.tenancy.release(generation);
        }
    }

    fn snapshot_of(&self, entry: &Entry) -> BreakerSnapshot {
        let now = self.now_nanos();
        let (calls, failures, slow) = entry.breaker.window_counts(now);
        let state = match self.mode() {
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

/// A point-in-time view of one breaker, e.g. for a health endpoint. Serializes
/// to JSON with durations in milliseconds (`until_half_open_ms`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
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
    #[serde(rename = "until_half_open_ms", serialize_with = "millis")]
    pub until_half_open: Option<Duration>,
    /// Trips in a row (the open period doubles with each).
    pub trips: u32,
    /// Requests in flight (counted only when a concurrency limit is set).
    pub in_flight: u32,
}

/// Operator access to a guard's breakers: force them open, disable them, read
/// their state. Get one from
/// [`UpstreamGuardLayer::breaker_handle`](crate::UpstreamGuardLayer::breaker_handle);
/// clones share the breakers.
///
/// ```
/// use upstream_guard::{CircuitState, UpstreamGuardLayer};
///
/// let layer = UpstreamGuardLayer::new();
/// let handle = layer.breaker_handle().expect("a breaker is on by default");
/// handle.force_open();
/// assert_eq!(handle.snapshot().state, CircuitState::ForcedOpen);
/// handle.resume();
/// assert_eq!(handle.snapshot().state, CircuitState::Closed);
/// ```
#[derive(Clone)]
pub struct BreakerHandle {
    shared: Arc<crate::shared::Shared>,
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle").finish_non_exhaustive()
    }
}

impl BreakerHandle {
    pub(crate) fn new(shared: Arc<crate::shared::Shared>) -> Option<BreakerHandle> {
        shared.breakers.as_ref()?;
        Some(BreakerHandle { shared })
    }

    fn breakers(&self) -> &Breakers {
        // `new` only makes a handle for a guard that has breakers.
        match &self.shared.breakers {
            Some(b) => b,
            None => unreachable!("a BreakerHandle always has breakers"),
        }
    }

    /// Rejects every request with 503 until [`resume`](Self::resume).
    pub fn force_open(&self) {
        self.breakers().set_mode(BreakerMode::ForcedOpen);
    }

    /// Lets every request through, counting nothing, until [`resume`](Self::resume).
    pub fn disable(&self) {
        self.breakers().set_mode(BreakerMode::Disabled);
    }

    /// Returns to the configured policies.
    pub fn resume(&self) {
        self.breakers().set_mode(BreakerMode::Auto);
    }

    /// The operator override in force.
    pub fn mode(&self) -> BreakerMode {
        self.breakers().mode()
    }

    /// The shared breaker used by requests without a key.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let breakers = self.breakers();
        breakers.snapshot_of(&breakers.default)
    }

    /// The breaker of one key (e.g. `"api.example.com:443"`), if it has one.
    pub fn snapshot_for(&self, key: &str) -> Option<BreakerSnapshot> {
        let breakers = self.breakers();
        let entry = breakers.keyed.as_ref()?.lookup(key)?;
        Some(breakers.snapshot_of(entry))
    }

    /// Every keyed breaker, sorted by key.
    pub fn snapshots(&self) -> Vec<(String, BreakerSnapshot)> {
        let breakers = self.breakers();
        let Some(keyed) = &breakers.keyed else {
            return Vec::new();
        };
        let mut all: Vec<_> = keyed
            .keys()
            .into_iter()
            .filter_map(|(key, index)| {
                let entry = keyed.entry(index)?;
                Some((key.to_string(), breakers.snapshot_of(entry)))
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// How many keys have a breaker of their own.
    pub fn keys(&self) -> usize {
        self.breakers().keyed.as_ref().map_or(0, Keyed::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Breakers with room for one key, so each new key evicts the last one,
    /// and a concurrency limit of one.
    fn one_key_one_permit() -> Breakers {
        Breakers::new(&BreakerPolicy::default().max_keys(1).concurrency_limit(1))
    }

    fn target_of(breakers: &Breakers, authority: &str) -> Target {
        let (parts, ()) = http::Request::get(format!("http://{authority}/"))
            .body(())
            .expect("a valid request")
            .into_parts();
        breakers.target(&parts, &mut KeyCache::default())
    }

    fn ticket(breakers: &Breakers, target: Target) -> Ticket {
        match breakers.admit(target).0 {
            Admit::Go(ticket) => ticket,
            Admit::Reject(kind, _) => panic!("rejected: {kind:?}"),
        }
    }

    fn in_flight(breakers: &Breakers, key: &str) -> u32 {
        let keyed = breakers.keyed.as_ref().expect("keyed breakers");
        keyed.lookup(key).expect("a key").tenancy.in_flight()
    }

    #[test]
    fn a_request_of_an_evicted_key_gives_nothing_back_to_the_new_key() {
        let breakers = one_key_one_permit();
        let old = target_of(&breakers, "a:80");
        let mut old_ticket = ticket(&breakers, old);
        assert!(old_ticket.permit);
        let new = target_of(&breakers, "b:80");
        let mut new_ticket = ticket(&breakers, new);
        assert!(
            new_ticket.permit,
            "the old key's permit is not the new key's"
        );
        breakers.release(&mut old_ticket);
        assert_eq!(in_flight(&breakers, "b:80"), 1);
        breakers.release(&mut new_ticket);
        assert_eq!(in_flight(&breakers, "b:80"), 0);
    }

    #[test]
    fn a_request_admitted_on_an_evicted_key_takes_no_permit_of_the_new_key() {
        let breakers = one_key_one_permit();
        let old = target_of(&breakers, "a:80");
        target_of(&breakers, "b:80");
        let stale = ticket(&breakers, old);
        assert!(!stale.permit && !stale.counted, "{stale:?}");
        assert_eq!(in_flight(&breakers, "b:80"), 0);
    }
}
