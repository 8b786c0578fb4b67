//! An observer that records what the guard reports, for assertions.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use upstream_guard::observe::{
    AttemptEvent, AttemptOutcome, HedgeEvent, HedgeOutcome, Outcome, ResponseEvent, RetryDenied,
    RetryDeniedEvent, RetryEvent,
};
use upstream_guard::Observer;

#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    Attempt {
        attempt: u32,
        outcome: AttemptOutcome,
    },
    Retry {
        failed_attempt: u32,
        backoff: Duration,
    },
    Denied {
        failed_attempt: u32,
        reason: RetryDenied,
    },
    Response {
        status: u16,
        outcome: Outcome,
        attempts: u32,
    },
    Hedge {
        attempt: u32,
        outcome: HedgeOutcome,
    },
}

/// Records every event; clones share the record.
#[derive(Clone, Default)]
pub struct Recording(Arc<Mutex<Vec<Seen>>>);

impl Recording {
    pub fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    pub fn attempts(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| matches!(s, Seen::Attempt { .. }))
            .count()
    }

    pub fn retries(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| matches!(s, Seen::Retry { .. }))
            .count()
    }

    pub fn responses(&self) -> Vec<(u16, Outcome, u32)> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Response {
                    status,
                    outcome,
                    attempts,
                } => Some((status, outcome, attempts)),
                _ => None,
            })
            .collect()
    }

    pub fn denials(&self) -> Vec<RetryDenied> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Denied { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    }

    /// Every hedge event, in order: the attempt number and what happened.
    pub fn hedges(&self) -> Vec<(u32, HedgeOutcome)> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Hedge { attempt, outcome } => Some((attempt, outcome)),
                _ => None,
            })
            .collect()
    }

    /// How many hedge events had this outcome name (`sent`, `won`, `denied`).
    pub fn hedge_count(&self, outcome: &str) -> usize {
        self.hedges()
            .iter()
            .filter(|(_, o)| o.as_str() == outcome)
            .count()
    }

    fn push(&self, seen: Seen) {
        self.0.lock().unwrap().push(seen);
    }
}

impl Observer for Recording {
    fn on_attempt(&self, event: &AttemptEvent<'_>) {
        self.push(Seen::Attempt {
            attempt: event.attempt(),
            outcome: event.outcome(),
        });
    }

    fn on_retry(&self, event: &RetryEvent<'_>) {
        self.push(Seen::Retry {
            failed_attempt: event.failed_attempt(),
            backoff: event.backoff(),
        });
    }

    fn on_retry_denied(&self, event: &RetryDeniedEvent<'_>) {
        self.push(Seen::Denied {
            failed_attempt: event.failed_attempt(),
            reason: event.reason(),
        });
    }

    fn on_hedge(&self, event: &HedgeEvent<'_>) {
        self.push(Seen::Hedge {
            attempt: event.attempt(),
            outcome: event.outcome(),
        });
    }

    fn on_response(&self, event: &ResponseEvent<'_>) {
        self.push(Seen::Response {
            status: event.status().as_u16(),
            outcome: event.outcome(),
            attempts: event.attempts(),
        });
    }
}
