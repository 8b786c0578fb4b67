//! The bulkhead: at most N requests in flight per breaker key, more answered
//! `503` at once, so one slow upstream cannot take every connection and task of
//! the guard (see [`BreakerPolicy::concurrency_limit`](crate::BreakerPolicy::concurrency_limit)).
//!
//! A concept of its own beside the breaker: the breaker decides whether an
//! upstream is healthy enough to call, the bulkhead how many calls it may have
//! at once. A request takes a breaker ticket, then a permit here; neither knows
//! of the other. The count lives in the breakers' registry slot of the
//! request's key, packed with the slot's generation (`breaker::Tenancy`): when
//! the slot is given to another key, the old key's permits are dropped with it
//! and a straggler's release cannot touch the new key's count.
//!
//! A permit stands for work the upstream is doing for one request. That work
//! does not end with the response headers: a streamed body keeps the upstream
//! (and the connection to it) busy until its last frame. So the permit moves
//! from the response future into the [`ResponseBody`](crate::ResponseBody), and
//! is given back when the body ends, fails, idles out, or is dropped — whichever
//! comes first, and exactly once (it is given back by its `Drop`).
//!
//! The cap is a fixed number per key, or an adaptive one
//! ([`crate::adaptive`]): a per-key limit read from an atomic on admission and
//! moved by the latency the permits report ([`Permit::attempt_ended`]) — the
//! time to headers, not the body's: a body streams at the caller's pace, which
//! says nothing about how loaded the upstream is.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::adaptive::{Limiter, Limits, Update};
use crate::breaker::{Acquired, BreakerPolicy, Breakers, CircuitState, Target};
use crate::observe::{AttemptOutcome, ConcurrencyLimitEvent, Observer};

/// The concurrency cap of one guard, per breaker key.
pub(crate) struct Bulkhead {
    /// Where the permits are counted: the registry slots' tenancy words.
    breakers: Arc<Breakers>,
    limit: Limit,
    /// Told when an adaptive limit is recomputed.
    observer: Option<Arc<dyn Observer>>,
}

/// How many permits a key has.
#[derive(Debug)]
enum Limit {
    /// The same number, always ([`BreakerPolicy::concurrency_limit`]).
    Fixed(u32),
    /// A number per key that follows the upstream's latency
    /// ([`BreakerPolicy::adaptive_concurrency`]). Boxed: the limiter of
    /// requests without a key is held inline and is large.
    Adaptive(Box<Limits>),
}

/// The key already has as many requests in flight as the cap allows; the
/// request should wait this long before trying again.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full(pub(crate) Duration);

impl Bulkhead {
    /// How long a request turned away by a fixed cap should wait before trying
    /// again: in flight requests usually end well within a second.
    pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

    /// The bulkhead `policy` asks for, counting on `breakers`; `None` without a
    /// concurrency limit.
    pub(crate) fn for_policy(
        policy: &BreakerPolicy,
        breakers: &Arc<Breakers>,
        observer: Option<Arc<dyn Observer>>,
    ) -> Option<Bulkhead> {
        let limit = match (policy.concurrency_cap(), policy.adaptive()) {
            (Some(cap), _) => Limit::Fixed(cap),
            (None, Some(adaptive)) => {
                Limit::Adaptive(Box::new(Limits::new(adaptive, policy.keyed_capacity())))
            }
            (None, None) => return None,
        };
        Some(Bulkhead {
            breakers: Arc::clone(breakers),
            limit,
            observer,
        })
    }

    #[cfg(test)]
    fn fixed(breakers: &Arc<Breakers>, limit: u32) -> Arc<Bulkhead> {
        Arc::new(Bulkhead {
            breakers: Arc::clone(breakers),
            limit: Limit::Fixed(limit),
            observer: None,
        })
    }

    #[cfg(test)]
    fn adaptive(
        breakers: &Arc<Breakers>,
        config: &crate::adaptive::AdaptiveConcurrency,
    ) -> Arc<Bulkhead> {
        Arc::new(Bulkhead {
            breakers: Arc::clone(breakers),
            limit: Limit::Adaptive(Box::new(Limits::new(config, 64))),
            observer: None,
        })
    }

    /// A permit for a request to `target`, whose breaker is in `state`.
    ///
    /// `Ok(None)`: the slot was given to another key since the request was
    /// keyed, so there is nothing of its key left to count against; it goes
    /// ahead without a permit, as the breaker lets it through uncounted.
    ///
    /// A half-open breaker restarts an adaptive limit: the circuit will close
    /// on an upstream that just recovered, whose latency is to be learnt anew.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        target: Target,
        state: CircuitState,
    ) -> Result<Option<Permit>, Full> {
        let Some((tenancy, generation)) = self.breakers.tenancy(target) else {
            return Ok(None);
        };
        let (limit, limiter) = match &self.limit {
            Limit::Fixed(limit) => (*limit, None),
            Limit::Adaptive(limits) => {
                let Some(limiter) = limits.of(target) else {
                    return Ok(None);
                };
                if state == CircuitState::HalfOpen {
                    limits.restart(limiter);
                }
                (limiter.limit(), Some(limiter))
            }
        };
        match tenancy.acquire(generation, limit) {
            Acquired::Permit => Ok(Some(Permit {
                bulkhead: Arc::clone(self),
                target,
            })),
            Acquired::Full => Err(Full(limiter.map_or(Self::RETRY_AFTER, Limiter::shed))),
            Acquired::Stale => Ok(None),
        }
    }

    /// Feeds an attempt's latency to the key's adaptive limit, if it measures
    /// something: a success's time to headers, or a timeout's.
    fn attempt_ended(&self, target: Target, outcome: AttemptOutcome, started: Option<Instant>) {
        let Limit::Adaptive(limits) = &self.limit else {
            return;
        };
        // An attempt answered on its first poll waited for nothing: no clock
        // was read, and it says nothing about a queue.
        let Some(started) = started.filter(|_| measures_latency(outcome)) else {
            return;
        };
        let Some(limiter) = limits.of(target) else {
            return;
        };
        let in_flight =
            (self.breakers.tenancy(target)).map_or(0, |(tenancy, _)| tenancy.in_flight());
        let timed_out = matches!(outcome, AttemptOutcome::Failure(_));
        if let Some(update) = limits.record(limiter, started, in_flight, timed_out) {
            self.report(target, update);
        }
    }

    /// Tells the observer, and the debug log, about a recomputed limit.
    fn report(&self, target: Target, update: Update) {
        tracing::debug!(
            limit = update.limit,
            previous = update.previous,
            rtt_ms = update.rtt.as_secs_f64() * 1e3,
            baseline_ms = update.baseline.as_secs_f64() * 1e3,
            "adaptive concurrency limit recomputed"
        );
        let Some(observer) = &self.observer else {
            return;
        };
        let key = self.breakers.key_of(target);
        observer.on_concurrency_limit(&ConcurrencyLimitEvent {
            key: key.as_deref(),
            limit: update.limit,
            previous: update.previous,
            rtt: update.rtt,
            baseline: update.baseline,
            samples: update.samples,
            shed: update.shed,
            retry_after: update.retry_after,
        });
    }
}

/// Whether an attempt's duration says how long the upstream takes: a
/// success's does, and a timeout's is a lower bound; a refused connection or
/// a `500` are the breaker's business.
fn measures_latency(outcome: AttemptOutcome) -> bool {
    match outcome {
        AttemptOutcome::Response { class, .. } => !class.is_failure(),
        AttemptOutcome::Failure(kind) => kind.is_timeout(),
    }
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// A held concurrency permit. Dropping it gives it back.
pub(crate) struct Permit {
    /// Where the count lives (a reference count, so the body can hold it).
    bulkhead: Arc<Bulkhead>,
    /// The slot and the generation the permit was counted at.
    target: Target,
}

impl Permit {
    /// An attempt made under this permit ended with `outcome`; it started
    /// waiting at `started` (`None`: it never had to wait). Feeds an adaptive
    /// limit.
    pub(crate) fn attempt_ended(&self, outcome: AttemptOutcome, started: Option<Instant>) {
        self.bulkhead.attempt_ended(self.target, outcome, started);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((tenancy, generation)) = self.bulkhead.breakers.tenancy(self.target) {
            // Not counted if the slot has changed keys since: re-keying
            // dropped this permit already.
            tenancy.release(generation);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("target", &self.target)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adaptive::AdaptiveConcurrency;

    const CLOSED: CircuitState = CircuitState::Closed;

    /// Breakers with room for one key, so each new key evicts the last one.
    fn one_key() -> Arc<Breakers> {
        Arc::new(Breakers::new(&BreakerPolicy::default().max_keys(1)))
    }

    fn in_flight(breakers: &Breakers, target: Target) -> u32 {
        let (tenancy, _) = breakers.tenancy(target).expect("a slot");
        tenancy.in_flight()
    }

    #[test]
    fn permits_are_counted_per_key_up_to_the_limit() {
        let breakers = one_key();
        let bulkhead = Bulkhead::fixed(&breakers, 2);
        let target = breakers.target_of("a:80");
        let first = bulkhead.acquire(target, CLOSED).expect("a permit");
        let second = bulkhead.acquire(target, CLOSED).expect("a permit");
        assert!(first.is_some() && second.is_some());
        assert_eq!(
            bulkhead.acquire(target, CLOSED).err(),
            Some(Full(Bulkhead::RETRY_AFTER))
        );
        drop(first);
        assert_eq!(in_flight(&breakers, target), 1);
        assert!(matches!(bulkhead.acquire(target, CLOSED), Ok(Some(_))));
    }

    #[test]
    fn a_permit_of_an_evicted_key_gives_nothing_back_to_the_new_key() {
        let breakers = one_key();
        let bulkhead = Bulkhead::fixed(&breakers, 1);
        let old = breakers.target_of("a:80");
        let old_permit = bulkhead.acquire(old, CLOSED).expect("a permit");
        let new = breakers.target_of("b:80");
        let new_permit = bulkhead.acquire(new, CLOSED).expect("a permit");
        assert!(
            new_permit.is_some(),
            "the old key's permit is not the new key's"
        );
        drop(old_permit);
        assert_eq!(in_flight(&breakers, new), 1);
        drop(new_permit);
        assert_eq!(in_flight(&breakers, new), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_limit_turns_away_what_is_over_it_with_its_retry_after() {
        let breakers = one_key();
        let config = AdaptiveConcurrency::default().min_limit(1).initial_limit(2);
        let bulkhead = Bulkhead::adaptive(&breakers, &config);
        let target = breakers.target_of("a:80");
        let _held: Vec<_> = (0..2)
            .map(|_| bulkhead.acquire(target, CLOSED).expect("a permit"))
            .collect();
        assert_eq!(
            bulkhead.acquire(target, CLOSED).err(),
            Some(Full(Duration::from_secs(1)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_open_breaker_restarts_the_adaptive_limit() {
        let breakers = one_key();
        let config = AdaptiveConcurrency::default().initial_limit(4);
        let bulkhead = Bulkhead::adaptive(&breakers, &config);
        let target = breakers.target_of("a:80");
        let latency = Duration::from_millis(50);
        // Windows at the baseline with the limit in use: it grows.
        for _ in 0..3 {
            let permits: Vec<_> = (0..4)
                .filter_map(|_| bulkhead.acquire(target, CLOSED).ok().flatten())
                .collect();
            tokio::time::advance(Duration::from_millis(100)).await;
            let started = Instant::now() - latency;
            for permit in &permits {
                for _ in 0..3 {
                    permit.attempt_ended(success(), Some(started));
                }
            }
        }
        let Limit::Adaptive(limits) = &bulkhead.limit else {
            unreachable!("an adaptive bulkhead")
        };
        let limit = || limits.of(target).expect("the key's limiter").limit();
        assert!(limit() > 4, "grew to {}", limit());
        bulkhead
            .acquire(target, CircuitState::HalfOpen)
            .expect("a probe's permit");
        assert_eq!(limit(), 4);
    }

    fn success() -> AttemptOutcome {
        AttemptOutcome::Response {
            status: http::StatusCode::OK,
            class: crate::classify::ResponseClass::Success,
        }
    }

    #[test]
    fn a_request_keyed_before_an_eviction_takes_no_permit_of_the_new_key() {
        let breakers = one_key();
        let bulkhead = Bulkhead::fixed(&breakers, 1);
        let old = breakers.target_of("a:80");
        let new = breakers.target_of("b:80");
        assert!(matches!(bulkhead.acquire(old, CLOSED), Ok(None)));
        assert_eq!(in_flight(&breakers, new), 0);
    }
}
