//! [`Breakers`]: every breaker of one guard, and what a request does with them:
//! find its breaker ([`target`](Breakers::target)), ask to go ahead
//! ([`admit`](Breakers::admit), which hands out a [`Ticket`]), report how its
//! attempts ended ([`record`](Breakers::record)), and give back what it held
//! ([`release`](Breakers::release)).
//!
//! Only breaker things: the concurrency cap is the bulkhead's
//! (`crate::bulkhead`), which counts its permits on the same registry slots
//! through [`Breakers::tenancy`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use tokio::time::Instant;

use super::handle::{BreakerMode, ModeCell};
use super::policy::{nanos, BreakerPolicy, Keying};
use super::registry::{Entry, Keyed, Target};
use super::state::{Admission, CircuitState, Policy, Record, Transition};
use super::tenancy::{Tenancy, FIRST_GENERATION};

/// All breakers of a guard: the shared default one and the keyed registry.
pub(crate) struct Breakers {
    policy: Policy,
    slow_nanos: Option<u64>,
    keying: Keying,
    epoch: Instant,
    pub(super) mode: ModeCell,
    pub(super) default: Entry,
    pub(super) keyed: Option<Keyed>,
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
    /// Go ahead; keep this ticket to record the outcome and release the probe.
    Go(Ticket),
    /// Rejected: answer with this failure kind; retry after this long.
    Reject(crate::FailureKind, Duration),
}

/// A request's hold on its breaker: which one, and whether it is a probe.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(crate) target: Target,
    pub(crate) probe: Option<u64>,
    /// Breakers disabled by the operator: record nothing.
    pub(crate) counted: bool,
}

impl Ticket {
    /// A ticket that holds nothing and records nothing.
    fn uncounted(target: Target) -> Ticket {
        Ticket {
            target,
            probe: None,
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
            keyed: match config.keys {
                Keying::Single => None,
                _ => Some(Keyed::new(config.max_keys, window)),
            },
            keying: config.keys.clone(),
            epoch: Instant::now(),
            mode: ModeCell::new(),
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
    pub(crate) fn target(&self, parts: &Parts) -> Target {
        let Some(keyed) = &self.keyed else {
            return Target::Default;
        };
        let key = self.keying.key(parts);
        key.and_then(|k| keyed.target(k)).unwrap_or(Target::Default)
    }

    /// The breaker of `key` (keyed breakers: `Target::Default` without).
    pub(crate) fn target_for_key(&self, key: &str) -> Target {
        let keyed = self.keyed.as_ref();
        keyed.and_then(|k| k.target(key)).unwrap_or(Target::Default)
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

    /// The tenancy word of the registry slot a target names, and the
    /// generation the target holds it at, whether or not its key still holds
    /// it: the bulkhead counts its permits there, checking the generation in
    /// the same atomic step.
    pub(crate) fn tenancy(&self, target: Target) -> Option<(&Tenancy, u32)> {
        self.slot(target)
            .map(|(entry, generation)| (&entry.tenancy, generation))
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
        self.mode.get()
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
        let Some(entry) = self.entry(target) else {
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
        let ticket = Ticket {
            target,
            probe,
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

    /// Gives back the half-open probe a finished (or dropped) request held. A
    /// probe on an entry since given to another key is not given back:
    /// re-keying made its epoch stale.
    pub(crate) fn release(&self, ticket: &mut Ticket) {
        if let Some(epoch) = ticket.probe.take() {
            if let Some(entry) = self.entry(ticket.target) {
                entry.breaker.release_probe(epoch);
            }
        }
    }
}

#[cfg(test)]
impl Breakers {
    /// The breaker of a GET to `authority`, for tests.
    pub(crate) fn target_of(&self, authority: &str) -> Target {
        let (parts, ()) = http::Request::get(format!("http://{authority}/"))
            .body(())
            .expect("a valid request")
            .into_parts();
        self.target(&parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_admitted_on_an_evicted_key_is_not_counted() {
        let breakers = Breakers::new(&BreakerPolicy::default().max_keys(1));
        let old = breakers.target_of("a:80");
        breakers.target_of("b:80");
        match breakers.admit(old).0 {
            Admit::Go(ticket) => assert!(!ticket.counted, "{ticket:?}"),
            Admit::Reject(kind, _) => panic!("rejected: {kind:?}"),
        }
    }
}
