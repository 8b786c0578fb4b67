//! Which key holds a registry slot, and how many of its requests are in flight,
//! in one atomic word.
//!
//! A request keeps the generation of the slot it was admitted on, not a
//! reference: when the slot is given to another key, the generation changes and
//! the old key's requests must no longer touch it. With the generation and the
//! count in separate atomics, "check the generation, then change the count" is
//! two steps, and a re-key landing between them reset the count for the new key
//! just before an old request decremented it (wrapping it to `u32::MAX`: the new
//! key refused everything) or incremented it (a permit the new key never gets
//! back). Packed in one word, every change of the count is a compare-and-swap
//! that also checks the generation, so a stale request cannot touch the new
//! key's count.
//!
//! ```text
//!  bits 0..32   requests in flight (holding a concurrency permit)
//!  bits 32..64  generation: bumped each time the slot is given to another key
//! ```
//!
//! Thirty-two bits of generation wrap after 2³² re-keys of one slot; a request
//! would have to stay in flight through all of them to be mistaken for the new
//! key's, and even then the count cannot wrap: a release never takes it below 0.

use super::sync::{AtomicU64, Ordering};

const GENERATION_SHIFT: u32 = 32;
const IN_FLIGHT_MASK: u64 = (1 << GENERATION_SHIFT) - 1;

/// The generation of a slot never given to another key.
pub(crate) const FIRST_GENERATION: u32 = 0;

fn generation_of(word: u64) -> u32 {
    (word >> GENERATION_SHIFT) as u32
}

fn in_flight_of(word: u64) -> u32 {
    (word & IN_FLIGHT_MASK) as u32
}

/// What [`Tenancy::acquire`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Acquired {
    /// A permit was taken; give it back with [`Tenancy::release`].
    Permit,
    /// The key already has `limit` requests in flight.
    Full,
    /// The slot was given to another key: nothing was taken.
    Stale,
}

/// A slot's generation and in-flight count; see the module docs.
#[derive(Debug)]
pub(crate) struct Tenancy {
    word: AtomicU64,
}

impl Tenancy {
    pub(crate) fn new() -> Tenancy {
        Tenancy {
            word: AtomicU64::new(u64::from(FIRST_GENERATION) << GENERATION_SHIFT),
        }
    }

    /// The generation of the key that holds the slot now.
    pub(crate) fn generation(&self) -> u32 {
        generation_of(self.word.load(Ordering::Acquire))
    }

    /// Requests of the current key holding a permit.
    pub(crate) fn in_flight(&self) -> u32 {
        in_flight_of(self.word.load(Ordering::Acquire))
    }

    /// Takes a permit for the key of `generation`, if it is still the slot's key
    /// and has fewer than `limit` requests in flight.
    pub(crate) fn acquire(&self, generation: u32, limit: u32) -> Acquired {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            if generation_of(word) != generation {
                return Acquired::Stale;
            }
            if in_flight_of(word) >= limit {
                return Acquired::Full;
            }
            // Below `limit`, a `u32`: the count cannot carry into the generation.
            match self
                .word
                .compare_exchange(word, word + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Acquired::Permit,
                Err(actual) => word = actual,
            }
        }
    }

    /// Gives back a permit taken for the key of `generation`. Returns whether it
    /// was counted: a permit of a key that lost the slot meanwhile was already
    /// dropped by [`rekey`](Self::rekey) and is not taken from the new key.
    pub(crate) fn release(&self, generation: u32) -> bool {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            if generation_of(word) != generation || in_flight_of(word) == 0 {
                return false;
            }
            match self
                .word
                .compare_exchange(word, word - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(actual) => word = actual,
            }
        }
    }

    /// Gives the slot to a new key: the next generation, nothing in flight, in
    /// one step. Returns the new generation.
    pub(crate) fn rekey(&self) -> u32 {
        let mut word = self.word.load(Ordering::Acquire);
        loop {
            let generation = generation_of(word).wrapping_add(1);
            let next = u64::from(generation) << GENERATION_SHIFT;
            match self
                .word
                .compare_exchange(word, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return generation,
                Err(actual) => word = actual,
            }
        }
    }
}

#[cfg(all(test, not(upstream_guard_loom)))]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_up_to_the_limit() {
        let t = Tenancy::new();
        let g = t.generation();
        assert_eq!(t.acquire(g, 2), Acquired::Permit);
        assert_eq!(t.acquire(g, 2), Acquired::Permit);
        assert_eq!(t.acquire(g, 2), Acquired::Full);
        assert_eq!(t.in_flight(), 2);
        assert!(t.release(g));
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn a_release_after_a_rekey_leaves_the_new_key_at_zero() {
        let t = Tenancy::new();
        let old = t.generation();
        assert_eq!(t.acquire(old, 1), Acquired::Permit);
        let new = t.rekey();
        assert_ne!(new, old);
        assert!(!t.release(old));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn an_acquire_after_a_rekey_takes_nothing_from_the_new_key() {
        let t = Tenancy::new();
        let old = t.generation();
        let new = t.rekey();
        assert_eq!(t.acquire(old, 1), Acquired::Stale);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(
            t.acquire(new, 1),
            Acquired::Permit,
            "the new key's one permit"
        );
    }

    #[test]
    fn a_release_with_nothing_in_flight_does_not_wrap() {
        let t = Tenancy::new();
        assert!(!t.release(t.generation()));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn the_count_never_carries_into_the_generation() {
        let t = Tenancy::new();
        let g = t.generation();
        t.word.store(u64::from(u32::MAX - 1), Ordering::Release);
        assert_eq!(t.acquire(g, u32::MAX), Acquired::Permit);
        assert_eq!(t.acquire(g, u32::MAX), Acquired::Full);
        assert_eq!((t.generation(), t.in_flight()), (g, u32::MAX));
    }

    #[test]
    fn the_generation_wraps_around_to_zero() {
        let t = Tenancy::new();
        t.word
            .store(u64::from(u32::MAX) << GENERATION_SHIFT, Ordering::Release);
        assert_eq!(t.rekey(), 0);
        assert_eq!(t.in_flight(), 0);
    }
}
