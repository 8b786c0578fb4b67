//! [`Shared`]: the state every service of one layer shares.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{Admit, BreakerHandle, Breakers, CircuitState, Target, Ticket, Transition};
use crate::bulkhead::{Bulkhead, Full, Permit};
use crate::classify::Classify;
use crate::failure::FailureKind;
use crate::hedge::Hedging;
use crate::observe::Observer;
use crate::response::FailureHook;
use crate::retry::Budgets;
use crate::retry::RetryPolicy;

/// Everything every service built from one layer shares: configuration and state
/// (budget, breakers, observer). Created once in [`Builder::build`], so that axum's
/// per-route `Layer::layer` calls and per-request service clones all see one state.
pub(crate) struct Shared {
    pub(crate) attempt_timeout: Duration,
    pub(crate) deadline: Duration,
    pub(crate) body_idle_timeout: Option<Duration>,
    pub(crate) retry: RetryPolicy,
    pub(crate) upstream_name: Option<Arc<str>>,
    pub(crate) expose_error_details: bool,
    pub(crate) classifier: Box<dyn Classify>,
    /// `None` when nobody listens: no event is built. Shared with the
    /// bulkhead, which reports adaptive limits.
    pub(crate) observer: Option<Arc<dyn Observer>>,
    pub(crate) failure_hook: Option<Box<FailureHook>>,
    pub(crate) budget: Option<Budgets>,
    /// Behind their own reference count, which operator handles share.
    pub(crate) breakers: Option<Arc<Breakers>>,
    /// The concurrency cap per breaker key; `None` without one. Behind a
    /// reference count that each permit holds.
    pub(crate) bulkhead: Option<Arc<Bulkhead>>,
    /// `None`: requests are never hedged.
    pub(crate) hedge: Option<Hedging>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("attempt_timeout", &self.attempt_timeout)
            .field("deadline", &self.deadline)
            .field("body_idle_timeout", &self.body_idle_timeout)
            .field("retry", &self.retry)
            .field("upstream_name", &self.upstream_name)
            .field("expose_error_details", &self.expose_error_details)
            .field("budget", &self.budget)
            .field("breakers", &self.breakers)
            .field("bulkhead", &self.bulkhead)
            .field("hedge", &self.hedge)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Operator access to the breakers; `None` if the breaker was turned off.
    pub(crate) fn breaker_handle(&self) -> Option<BreakerHandle> {
        self.breakers.clone().map(BreakerHandle::new)
    }
}

/// What a request was told right before its first attempt.
pub(crate) enum Admission {
    /// Go ahead, holding the breaker's ticket and, under a concurrency cap, a
    /// permit: two holds, given back separately (the permit travels on with the
    /// response body).
    Go(Ticket, Option<Permit>),
    /// Turned away: answer with this failure kind; retry after this long.
    Reject(FailureKind, Duration),
}

impl Shared {
    /// Admits a request to `target`'s breaker, then to the bulkhead: a request
    /// the breaker turns away takes no permit, and one the bulkhead turns away
    /// gives its breaker probe back. With the breaker's state and the
    /// transition its admission made, if any, for events.
    #[inline]
    pub(crate) fn admit(
        &self,
        breakers: &Arc<Breakers>,
        target: Target,
    ) -> (Admission, Option<Transition>, CircuitState) {
        let (admit, transition, state) = breakers.admit(target);
        let admission = match admit {
            Admit::Reject(kind, retry_after) => Admission::Reject(kind, retry_after),
            Admit::Go(mut ticket) => match self.bulkhead.as_ref() {
                None => Admission::Go(ticket, None),
                Some(bulkhead) => match bulkhead.acquire(target, state) {
                    Ok(permit) => Admission::Go(ticket, permit),
                    Err(Full(retry_after)) => {
                        breakers.release(&mut ticket);
                        Admission::Reject(FailureKind::ConcurrencyLimited, retry_after)
                    }
                },
            },
        };
        (admission, transition, state)
    }
}
