//! [`Endpoints`]: one upstream served by several replicas, each behind its own
//! circuit breaker.
//!
//! It goes *inside* the guard: the guard keeps the request-level promises
//! (deadline, retries, hedges, problem+json) and `Endpoints` picks the replica
//! for each attempt.
//!
//! ```text
//!  request ──▶ [ UpstreamGuard ] ──▶ [ Endpoints ] ──▶ replica a  (breaker a)
//!              deadline, retries,     p2c by load,  └─▶ replica b  (breaker b)
//!              hedges, answers        skips open breakers
//! ```
//!
//! Each attempt goes to the less loaded (fewer requests in flight) of two
//! replicas picked at random among those whose breaker admits it — the
//! power-of-two-choices rule of `tower::balance::p2c`, with an ejected replica
//! skipped until its breaker lets a probe through. Unlike tower's balancer,
//! the pick is made when the request is known: the guard gives every request
//! its own clone of the inner service for its retries and hedges, and a clone
//! of `Endpoints` remembers which replicas it has sent to, so a retry or a
//! hedge goes to a replica the request has not tried yet while there is one.
//!
//! A replica's breaker counts what its attempts got: errors, responses the
//! classifier calls failures, and, with [`EndpointsBuilder::attempt_timeout`],
//! attempts that took too long. An attempt dropped before it ended (it lost to
//! a hedge, or the caller left) counts nothing.

mod future;

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Uri};
use tower_service::Service;

use crate::breaker::{Admit, BreakerHandle, BreakerPolicy, Breakers, Target, Ticket};
use crate::classify::{Classify, DefaultClassifier};
use crate::error::ConfigError;
use crate::observe::Observer;
use crate::BoxError;

pub use crate::failure::{EndpointTimeout, NoEndpoint};
pub use future::EndpointFuture;

/// The most replicas one [`Endpoints`] may have.
const MAX_ENDPOINTS: usize = 64;

/// A set of replicas of one upstream; see the [module docs](self).
///
/// ```
/// use std::time::Duration;
/// use upstream_guard::endpoints::Endpoints;
/// use upstream_guard::{BreakerPolicy, HedgePolicy, UpstreamGuardLayer};
/// use tower::Layer;
///
/// # fn client() -> tower::util::BoxCloneService<http::Request<upstream_guard::RequestBody<String>>, http::Response<String>, std::io::Error> { unimplemented!() }
/// # fn demo() -> Result<(), upstream_guard::ConfigError> {
/// let replicas = Endpoints::builder()
///     .breaker(BreakerPolicy::consecutive_failures(3).open_for(Duration::from_secs(10)))
///     .attempt_timeout(Duration::from_millis(700))
///     .build(client(), ["http://10.0.0.1:8080", "http://10.0.0.2:8080"])?;
/// let guard = UpstreamGuardLayer::builder()
///     .attempt_timeout(Duration::from_millis(800))
///     .hedge(HedgePolicy::after(Duration::from_millis(50)))
///     .build()?;
/// let service = guard.layer(replicas);
/// # let _ = service; Ok(()) }
/// ```
pub struct Endpoints<S> {
    set: Arc<Set<S>>,
    /// The replicas this value has sent to (bit `i`: replica `i`), so that a
    /// request's own clone prefers replicas it has not tried.
    tried: u64,
}

/// What every clone shares.
struct Set<S> {
    replicas: Box<[Replica<S>]>,
    breakers: Arc<Breakers>,
    classifier: Box<dyn Classify>,
    observer: Option<Box<dyn Observer>>,
    attempt_timeout: Option<Duration>,
}

/// One replica.
struct Replica<S> {
    scheme: Scheme,
    authority: Authority,
    service: S,
    target: Target,
    /// Attempts in flight, the load the pick compares.
    in_flight: AtomicU32,
}

impl<S> Clone for Endpoints<S> {
    /// A clone shares the replicas and breakers, and has tried none of them.
    fn clone(&self) -> Self {
        Endpoints {
            set: Arc::clone(&self.set),
            tried: 0,
        }
    }
}

impl<S> fmt::Debug for Endpoints<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let replicas: Vec<_> = self
            .set
            .replicas
            .iter()
            .map(|r| r.authority.as_str())
            .collect();
        f.debug_struct("Endpoints")
            .field("replicas", &replicas)
            .field("tried", &self.tried)
            .finish_non_exhaustive()
    }
}

impl Endpoints<()> {
    /// Starts configuring a set of replicas.
    pub fn builder() -> EndpointsBuilder {
        EndpointsBuilder::default()
    }
}

impl<S> Endpoints<S> {
    /// Operator access to the replicas' breakers, keyed by `host:port`.
    pub fn breaker_handle(&self) -> BreakerHandle {
        BreakerHandle::new(Arc::clone(&self.set.breakers))
    }

    /// Picks the replica for an attempt and admits it to that replica's
    /// breaker: two at random among the replicas not tried yet (all of them,
    /// once all were), the less loaded first; then any other that admits,
    /// untried ones first.
    fn pick(&mut self) -> Option<(usize, Ticket)> {
        let replicas = &self.set.replicas;
        let n = replicas.len();
        let all = u64::MAX >> (64 - n);
        if self.tried & all == all {
            self.tried = 0;
        }
        let untried = all & !self.tried;
        let a = nth_bit(untried, fastrand::usize(..untried.count_ones() as usize));
        let others = untried & !(1 << a);
        let b =
            (others != 0).then(|| nth_bit(others, fastrand::usize(..others.count_ones() as usize)));
        let load = |i: usize| replicas[i].in_flight.load(Ordering::Relaxed);
        let (first, second) = match b {
            Some(b) if load(b) < load(a) => (b, Some(a)),
            _ => (a, b),
        };
        let start = fastrand::usize(..n);
        let round = (0..n).map(move |k| (start + k) % n);
        let order = [first].into_iter().chain(second);
        let order = order.chain(round.clone().filter(|&i| untried & (1 << i) != 0));
        let mut asked = 0u64;
        for i in order.chain(round) {
            if asked & (1 << i) != 0 {
                continue;
            }
            asked |= 1 << i;
            if let Some(ticket) = self.admit(i) {
                self.tried |= 1 << i;
                return Some((i, ticket));
            }
        }
        None
    }

    fn admit(&self, i: usize) -> Option<Ticket> {
        let set = &self.set;
        let (admit, transition, _) = set.breakers.admit(set.replicas[i].target);
        if let Some(transition) = transition {
            set.report(i, transition);
        }
        match admit {
            Admit::Go(ticket) => Some(ticket),
            Admit::Reject(..) => None,
        }
    }
}

impl<S> Set<S> {
    /// Tells the observer a replica's breaker changed state.
    fn report(&self, i: usize, transition: crate::breaker::Transition) {
        let key = self.replicas[i].authority.as_str();
        let open_for = transition.open_nanos.map(Duration::from_nanos);
        if let Some(observer) = &self.observer {
            observer.on_circuit_transition(&crate::observe::CircuitEvent {
                key: Some(key),
                from: transition.from,
                to: transition.to,
                open_for,
            });
        }
        tracing::warn!(
            replica = key,
            from = transition.from.as_str(),
            to = transition.to.as_str(),
            "replica circuit breaker state changed"
        );
    }
}

impl<S, B, ResB> Service<Request<B>> for Endpoints<S>
where
    S: Service<Request<B>, Response = http::Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ResB>;
    type Error = BoxError;
    type Future = EndpointFuture<S, Request<B>>;

    /// Always ready: each attempt's replica is made ready in its future, once
    /// the replica is picked.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some((i, ticket)) = self.pick() else {
            return EndpointFuture::unavailable();
        };
        let replica = &self.set.replicas[i];
        let path = (request.uri().path_and_query().cloned())
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme(replica.scheme.clone())
            .authority(replica.authority.clone())
            .path_and_query(path)
            .build();
        if let Ok(uri) = uri {
            *request.uri_mut() = uri;
        }
        let service = replica.service.clone();
        EndpointFuture::new(Arc::clone(&self.set), i, ticket, service, request)
    }
}

/// Configures [`Endpoints`].
pub struct EndpointsBuilder {
    breaker: BreakerPolicy,
    attempt_timeout: Option<Duration>,
    classifier: Box<dyn Classify>,
    observer: Option<Box<dyn Observer>>,
}

impl Default for EndpointsBuilder {
    /// Five failures in a row eject a replica for 5 s (growing while it keeps
    /// failing, as [`BreakerPolicy`] does); no attempt timeout of its own.
    fn default() -> Self {
        EndpointsBuilder {
            breaker: BreakerPolicy::default(),
            attempt_timeout: None,
            classifier: Box::new(DefaultClassifier::new()),
            observer: None,
        }
    }
}

impl fmt::Debug for EndpointsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointsBuilder")
            .field("breaker", &self.breaker)
            .field("attempt_timeout", &self.attempt_timeout)
            .finish_non_exhaustive()
    }
}

impl EndpointsBuilder {
    /// The breaker each replica gets (keyed by the replica; its keying and
    /// concurrency settings are not used).
    pub fn breaker(mut self, breaker: BreakerPolicy) -> Self {
        self.breaker = breaker;
        self
    }

    /// Fails an attempt that has had no response for this long with
    /// [`EndpointTimeout`], which counts against its replica. Without it, a
    /// replica that hangs is never ejected: the guard's own attempt timeout
    /// drops the attempt, and a dropped attempt counts nothing. Set it at or
    /// just under the guard's attempt timeout.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// What counts as a replica's failure (default [`DefaultClassifier`]: 5xx).
    pub fn classifier(mut self, classifier: impl Classify) -> Self {
        self.classifier = Box::new(classifier);
        self
    }

    /// Receives the replicas' breaker transitions (keyed by `host:port`).
    pub fn observer(mut self, observer: impl Observer) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Builds the set: `service` sends to each replica of `replicas` (absolute
    /// URIs such as `http://10.0.0.1:8080`; the request's scheme and authority
    /// are replaced by the replica's, its path and query kept).
    pub fn build<S, U>(self, service: S, replicas: U) -> Result<Endpoints<S>, ConfigError>
    where
        S: Clone,
        U: IntoIterator,
        U::Item: AsRef<str>,
    {
        self.breaker.validate()?;
        if self.attempt_timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new(
                "endpoints.attempt_timeout",
                "must be greater than zero",
            ));
        }
        let mut parsed = Vec::new();
        for (i, replica) in replicas.into_iter().enumerate() {
            parsed.push(parse_replica(i, replica.as_ref())?);
        }
        if parsed.is_empty() || parsed.len() > MAX_ENDPOINTS {
            return Err(ConfigError::new(
                "endpoints",
                format!(
                    "must list 1 to {MAX_ENDPOINTS} replicas (got {})",
                    parsed.len()
                ),
            ));
        }
        let policy = self.breaker.per_authority().max_keys(parsed.len());
        let breakers = Arc::new(Breakers::new(&policy));
        let mut replicas = Vec::with_capacity(parsed.len());
        for (i, (scheme, authority)) in parsed.into_iter().enumerate() {
            if replicas
                .iter()
                .any(|r: &Replica<S>| r.authority == authority)
            {
                let why = format!("replica {i} ({authority}) is listed twice");
                return Err(ConfigError::new("endpoints", why));
            }
            let target = breakers.target_for_key(authority.as_str());
            replicas.push(Replica {
                scheme,
                authority,
                service: service.clone(),
                target,
                in_flight: AtomicU32::new(0),
            });
        }
        let set = Set {
            replicas: replicas.into_boxed_slice(),
            breakers,
            classifier: self.classifier,
            observer: self.observer,
            attempt_timeout: self.attempt_timeout,
        };
        Ok(Endpoints {
            set: Arc::new(set),
            tried: 0,
        })
    }
}

/// The index of the `k`-th set bit of `mask` (which has more than `k`).
fn nth_bit(mut mask: u64, k: usize) -> usize {
    for _ in 0..k {
        mask &= mask - 1;
    }
    mask.trailing_zeros() as usize
}

fn parse_replica(i: usize, replica: &str) -> Result<(Scheme, Authority), ConfigError> {
    let invalid =
        |why: &str| ConfigError::new("endpoints", format!("replica {i} ({replica:?}) {why}"));
    let uri: Uri = replica.parse().map_err(|_| invalid("is not a URI"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| invalid("has no scheme"))?;
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| invalid("has no host"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(invalid("must not have a path"));
    }
    Ok((scheme, authority))
}
