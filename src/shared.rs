//! [`Shared`]: the state every service of one layer shares.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{BreakerHandle, Breakers};
use crate::budgets::Budgets;
use crate::classify::Classify;
use crate::observe::Observer;
use crate::response::FailureHook;
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
    pub(crate) observer: Box<dyn Observer>,
    pub(crate) failure_hook: Option<Box<FailureHook>>,
    pub(crate) budget: Option<Budgets>,
    /// Behind their own reference count, which operator handles share.
    pub(crate) breakers: Option<Arc<Breakers>>,
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
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Operator access to the breakers; `None` if the breaker was turned off.
    pub(crate) fn breaker_handle(&self) -> Option<BreakerHandle> {
        self.breakers.clone().map(BreakerHandle::new)
    }
}
