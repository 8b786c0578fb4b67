//! [`UpstreamGuardLayer`], its [`Builder`], and configuration validation.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use tower_layer::Layer;

use crate::breaker::{BreakerHandle, BreakerPolicy, Breakers};
use crate::bulkhead::Bulkhead;
use crate::classify::{Classify, DefaultClassifier};
use crate::error::ConfigError;
use crate::failure::GuardFailure;
use crate::hedge::{HedgePolicy, Hedging};
use crate::observe::Observer;
use crate::retry::Budgets;
use crate::retry::RetryPolicy;
use crate::service::UpstreamGuard;
use crate::shared::Shared;

use crate::response::FailureHook;

/// A [`Layer`] that wraps a service calling an upstream with timeouts, retries and
/// failure-to-response mapping. See the [crate docs](crate) for the whole picture.
///
/// Cloning is cheap (one reference count), and every clone, and every service it
/// makes, shares one state: circuit breakers, retry budget and observer.
///
/// ```
/// use std::time::Duration;
/// use upstream_guard::{RetryPolicy, UpstreamGuardLayer};
///
/// let layer = UpstreamGuardLayer::builder()
///     .attempt_timeout(Duration::from_millis(800))
///     .deadline(Duration::from_secs(3))
///     .retry(RetryPolicy::default().max_attempts(3))
///     .build()?;
/// # Ok::<(), upstream_guard::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct UpstreamGuardLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for UpstreamGuardLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamGuardLayer")
            .field("shared", &self.shared)
            .finish()
    }
}

impl UpstreamGuardLayer {
    /// A layer with the default configuration; see [`Builder`] for the defaults.
    pub fn new() -> Self {
        Builder::default().build_unchecked()
    }

    /// Starts configuring a layer.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Operator access to the circuit breakers (force open, disable, snapshots);
    /// `None` if the breaker was turned off.
    pub fn breaker_handle(&self) -> Option<BreakerHandle> {
        self.shared.breaker_handle()
    }
}

impl Default for UpstreamGuardLayer {
    fn default() -> Self {
        UpstreamGuardLayer::new()
    }
}

impl<S> Layer<S> for UpstreamGuardLayer {
    type Service = UpstreamGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamGuard::new(inner, self.shared.clone())
    }
}

/// [`Builder::attempt_timeout`]'s default (also a config file's).
pub(crate) const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// [`Builder::deadline`]'s default (also a config file's).
pub(crate) const DEFAULT_DEADLINE: Duration = Duration::from_secs(15);

/// Configures an [`UpstreamGuardLayer`].
///
/// Defaults, chosen to be safe in production:
///
/// | option | default | why |
/// |---|---|---|
/// | [`attempt_timeout`](Builder::attempt_timeout) | 5 s | three attempts fit in the deadline |
/// | [`deadline`](Builder::deadline) | 15 s | Envoy's route timeout; below most clients' own |
/// | [`retry`](Builder::retry) | [`RetryPolicy::default()`] | 3 attempts, jittered backoff, 20 % budget |
/// | [`circuit_breaker`](Builder::circuit_breaker) | [`BreakerPolicy::default()`] | 5 failures in a row open it for 5 s, per upstream |
/// | [`classifier`](Builder::classifier) | [`DefaultClassifier`] | 5xx fail, 502/503/504 retry |
/// | [`expose_error_details`](Builder::expose_error_details) | off | never leak internals |
///
/// [`build`](Builder::build) checks the configuration and names the offending
/// field in its error; it never panics.
pub struct Builder {
    attempt_timeout: Duration,
    deadline: Duration,
    body_idle_timeout: Option<Duration>,
    retry: RetryPolicy,
    circuit_breaker: Option<BreakerPolicy>,
    upstream_name: Option<Arc<str>>,
    expose_error_details: bool,
    classifier: Box<dyn Classify>,
    /// `None`: nobody listens, and no event is built.
    observer: Option<Box<dyn Observer>>,
    failure_hook: Option<Box<FailureHook>>,
    hedge: Option<HedgePolicy>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
            body_idle_timeout: None,
            retry: RetryPolicy::default(),
            circuit_breaker: Some(BreakerPolicy::default()),
            upstream_name: None,
            expose_error_details: false,
            classifier: Box::new(DefaultClassifier::new()),
            observer: None,
            failure_hook: None,
            hedge: None,
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("attempt_timeout", &self.attempt_timeout)
            .field("deadline", &self.deadline)
            .field("body_idle_timeout", &self.body_idle_timeout)
            .field("retry", &self.retry)
            .field("circuit_breaker", &self.circuit_breaker)
            .field("upstream_name", &self.upstream_name)
            .field("expose_error_details", &self.expose_error_details)
            .field("hedge", &self.hedge)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// How long one attempt may wait for response headers. Once headers arrive,
    /// the body streams without this limit.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// How long the whole request may take in the guard: all attempts and the
    /// backoff sleeps between them. An inbound `grpc-timeout` can shorten it.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Fails the response body with [`BodyIdleTimeout`](crate::BodyIdleTimeout) when
    /// the upstream sends no body data for this long (off by default: a body may
    /// legitimately stream slowly). Use it against upstreams that send headers and
    /// then stall, so a caller is never left waiting forever.
    pub fn body_idle_timeout(mut self, timeout: Duration) -> Self {
        self.body_idle_timeout = Some(timeout);
        self
    }

    /// The retry policy; [`RetryPolicy::disabled()`] turns retries off.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The circuit breaker (on by default; see [`BreakerPolicy`]).
    pub fn circuit_breaker(mut self, breaker: BreakerPolicy) -> Self {
        self.circuit_breaker = Some(breaker);
        self
    }

    /// Hedges requests that are safe to resend: sends another attempt when one
    /// has been out for the policy's delay, and answers with the first that is
    /// not a failure (off by default). See [`HedgePolicy`] for what it costs
    /// and how it is bounded.
    pub fn hedge(mut self, policy: HedgePolicy) -> Self {
        self.hedge = Some(policy);
        self
    }

    /// Turns the circuit breaker off: every request reaches the upstream.
    pub fn no_circuit_breaker(mut self) -> Self {
        self.circuit_breaker = None;
        self
    }

    /// Names the upstream in error bodies, spans and metrics, instead of the
    /// request URI's authority. Useful when the guard sits in an axum router, where
    /// requests carry only a path.
    pub fn upstream_name(mut self, name: impl Into<String>) -> Self {
        self.upstream_name = Some(Arc::from(name.into()));
        self
    }

    /// Puts the inner error's text in synthesized bodies (`detail`, `grpc-message`).
    /// Off by default: error texts can name internal hosts and addresses.
    pub fn expose_error_details(mut self, expose: bool) -> Self {
        self.expose_error_details = expose;
        self
    }

    /// Decides what counts as a failure and what may be retried.
    pub fn classifier(mut self, classifier: impl Classify) -> Self {
        self.classifier = Box::new(classifier);
        self
    }

    /// Receives events for metrics; see [`Observer`].
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Changes or replaces every response the guard synthesizes. The hook gets the
    /// failure and the ready-made response (problem+json or gRPC), and may edit it
    /// or assign a whole new one.
    ///
    /// ```
    /// use upstream_guard::UpstreamGuardLayer;
    ///
    /// let layer = UpstreamGuardLayer::builder()
    ///     .map_failure_response(|failure, response| {
    ///         response.headers_mut().insert("x-guard-failure", failure.kind().as_str().parse().unwrap());
    ///     })
    ///     .build();
    /// ```
    pub fn map_failure_response<F>(mut self, hook: F) -> Self
    where
        F: Fn(&GuardFailure, &mut Response<Bytes>) + Send + Sync + 'static,
    {
        self.failure_hook = Some(Box::new(hook));
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<UpstreamGuardLayer, ConfigError> {
        self.validate()?;
        Ok(self.build_unchecked())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.attempt_timeout.is_zero() {
            return Err(ConfigError::new(
                "attempt_timeout",
                "must be greater than zero",
            ));
        }
        if self.deadline.is_zero() {
            return Err(ConfigError::new("deadline", "must be greater than zero"));
        }
        if self.deadline < self.attempt_timeout {
            return Err(ConfigError::new(
                "deadline",
                format!(
                    "({:?}) must not be shorter than attempt_timeout ({:?})",
                    self.deadline, self.attempt_timeout
                ),
            ));
        }
        if self.body_idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new(
                "body_idle_timeout",
                "must be greater than zero",
            ));
        }
        if let Some(name) = &self.upstream_name {
            if name.is_empty() {
                return Err(ConfigError::new("upstream_name", "must not be empty"));
            }
        }
        self.retry.validate()?;
        if let Some(hedge) = &self.hedge {
            hedge.validate()?;
        }
        if let Some(breaker) = &self.circuit_breaker {
            breaker.validate()?;
        }
        Ok(())
    }

    fn build_unchecked(self) -> UpstreamGuardLayer {
        let keys = self
            .circuit_breaker
            .as_ref()
            .map_or(0, BreakerPolicy::keyed_capacity);
        let budget = self
            .retry
            .budget_config()
            .map(|config| Budgets::new(config, keys));
        let breakers = self
            .circuit_breaker
            .as_ref()
            .map(|policy| Arc::new(Breakers::new(policy)));
        let observer: Option<Arc<dyn Observer>> = self.observer.map(Arc::from);
        let bulkhead = (self.circuit_breaker.as_ref().zip(breakers.as_ref()))
            .and_then(|(policy, breakers)| Bulkhead::for_policy(policy, breakers, observer.clone()))
            .map(Arc::new);
        let hedge = self.hedge.map(|policy| Hedging::new(policy, keys));
        UpstreamGuardLayer {
            shared: Arc::new(Shared {
                attempt_timeout: self.attempt_timeout,
                deadline: self.deadline,
                body_idle_timeout: self.body_idle_timeout,
                retry: self.retry,
                upstream_name: self.upstream_name,
                expose_error_details: self.expose_error_details,
                classifier: self.classifier,
                observer,
                failure_hook: self.failure_hook,
                budget,
                breakers,
                bulkhead,
                hedge,
            }),
        }
    }
}
