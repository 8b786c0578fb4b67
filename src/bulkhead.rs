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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{Acquired, Breakers, Target};

/// The concurrency cap of one guard: `limit` permits per breaker key.
#[derive(Debug)]
pub(crate) struct Bulkhead {
    limit: u32,
}

/// The key already has as many requests in flight as the cap allows.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full;

impl Bulkhead {
    /// How long a request turned away should wait before trying again: in
    /// flight requests usually end well within a second.
    pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

    pub(crate) fn new(limit: u32) -> Bulkhead {
        Bulkhead { limit }
    }

    /// A permit for a request to `target`, counted on `breakers`' slot for it.
    ///
    /// `Ok(None)`: the slot was given to another key since the request was
    /// keyed, so there is nothing of its key left to count against; it goes
    /// ahead without a permit, as the breaker lets it through uncounted.
    pub(crate) fn acquire(
        &self,
        breakers: &Arc<Breakers>,
        target: Target,
    ) -> Result<Option<Permit>, Full> {
        let Some((tenancy, generation)) = breakers.tenancy(target) else {
            return Ok(None);
        };
        match tenancy.acquire(generation, self.limit) {
            Acquired::Permit => Ok(Some(Permit {
                breakers: Arc::clone(breakers),
                target,
            })),
            Acquired::Full => Err(Full),
            Acquired::Stale => Ok(None),
        }
    }
}

/// A held concurrency permit. Dropping it gives it back.
pub(crate) struct Permit {
    /// Where the count lives (a reference count, so the body can hold it).
    breakers: Arc<Breakers>,
    /// The slot and the generation the permit was counted at.
    target: Target,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((tenancy, generation)) = self.breakers.tenancy(self.target) {
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
    use crate::breaker::BreakerPolicy;

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
        let bulkhead = Bulkhead::new(2);
        let target = breakers.target_of("a:80");
        let first = bulkhead.acquire(&breakers, target).expect("a permit");
        let second = bulkhead.acquire(&breakers, target).expect("a permit");
        assert!(first.is_some() && second.is_some());
        assert_eq!(bulkhead.acquire(&breakers, target).err(), Some(Full));
        drop(first);
        assert_eq!(in_flight(&breakers, target), 1);
        assert!(matches!(bulkhead.acquire(&breakers, target), Ok(Some(_))));
    }

    #[test]
    fn a_permit_of_an_evicted_key_gives_nothing_back_to_the_new_key() {
        let breakers = one_key();
        let bulkhead = Bulkhead::new(1);
        let old = breakers.target_of("a:80");
        let old_permit = bulkhead.acquire(&breakers, old).expect("a permit");
        let new = breakers.target_of("b:80");
        let new_permit = bulkhead.acquire(&breakers, new).expect("a permit");
        assert!(
            new_permit.is_some(),
            "the old key's permit is not the new key's"
        );
        drop(old_permit);
        assert_eq!(in_flight(&breakers, new), 1);
        drop(new_permit);
        assert_eq!(in_flight(&breakers, new), 0);
    }

    #[test]
    fn a_request_keyed_before_an_eviction_takes_no_permit_of_the_new_key() {
        let breakers = one_key();
        let bulkhead = Bulkhead::new(1);
        let old = breakers.target_of("a:80");
        let new = breakers.target_of("b:80");
        assert!(matches!(bulkhead.acquire(&breakers, old), Ok(None)));
        assert_eq!(in_flight(&breakers, new), 0);
    }
}
