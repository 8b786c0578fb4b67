//! State kept per breaker key: retry budgets, hedging latencies, adaptive
//! concurrency limits; and [`Target`], which names a key's registry slot.
//!
//! A budget shared by a whole layer lets one failing upstream of a proxy spend
//! the retries that the traffic to every other upstream paid for; a latency
//! percentile shared by a whole layer hedges a fast upstream after the slow
//! one's tail. So when the circuit breaker is keyed, each breaker key gets its
//! own state, held beside the breaker's registry slot and bounded the same way:
//! one per slot, allocated in chunks on first use, reset when the slot is given
//! to a new key. Requests without a key (and guards with a single breaker, or
//! none) share one.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// How many states are allocated at once, as the registry allocates breakers.
const CHUNK: usize = 64;

/// Which breaker a request belongs to, and which generation of it: the
/// registry's own breaker (requests without a key), or a keyed registry slot
/// as it was when the request was keyed. A slot given to another key gets a
/// newer generation, so state kept for the old key is never the new key's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The registry's own breaker, for requests without a key.
    Default,
    /// A keyed entry.
    Keyed { index: u32, generation: u32 },
}

/// State that can live per key: made from a config, reset for a new key.
pub(crate) trait KeyState {
    /// What each new state is made from.
    type Config;
    fn new(config: &Self::Config) -> Self;
    /// Forgets everything, as if new: the slot now belongs to another key.
    fn reset(&self, config: &Self::Config);
}

/// One `T` per breaker key, and one for requests without a key.
#[derive(Debug)]
pub(crate) struct PerKey<T: KeyState> {
    config: T::Config,
    /// For requests without a key.
    shared: T,
    /// One per registry slot; empty without keyed breakers.
    keyed: Box<[Chunk<T>]>,
}

/// `CHUNK` slots, allocated on first use.
type Chunk<T> = OnceLock<Box<[Slot<T>]>>;

/// A keyed state and the registry generation it belongs to.
#[derive(Debug)]
struct Slot<T> {
    generation: AtomicU32,
    state: T,
}

impl<T: KeyState> PerKey<T> {
    /// States for `keys` breaker keys (`0`: one state for everything).
    pub(crate) fn new(config: T::Config, keys: usize) -> PerKey<T> {
        PerKey {
            shared: T::new(&config),
            config,
            keyed: (0..keys.div_ceil(CHUNK)).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The state of the breaker `target` (the shared one without breakers).
    ///
    /// `None` for a request whose registry slot was given to another key since
    /// it was admitted: it neither reads nor changes the new key's state.
    pub(crate) fn of(&self, target: Option<Target>) -> Option<&T> {
        let (index, generation) = match target {
            Some(Target::Keyed { index, generation }) => (index as usize, generation),
            _ => return Some(&self.shared),
        };
        let Some(chunk) = self.keyed.get(index / CHUNK) else {
            return Some(&self.shared);
        };
        let slot = chunk
            .get_or_init(|| (0..CHUNK).map(|_| Slot::new(&self.config)).collect())
            .get(index % CHUNK)?;
        (slot.for_generation(generation, &self.config)).then_some(&slot.state)
    }

    /// What every state is made from.
    pub(crate) fn config(&self) -> &T::Config {
        &self.config
    }
}

impl<T: KeyState> Slot<T> {
    fn new(config: &T::Config) -> Slot<T> {
        Slot {
            generation: AtomicU32::new(0),
            state: T::new(config),
        }
    }

    /// Makes the slot belong to `generation` if that is newer (a new key took
    /// the registry slot: its state starts afresh); whether it belongs to it.
    /// Generations only move forward (32-bit, compared as serial numbers across
    /// the wrap), so a straggler of an older key never resets the state of the
    /// key that replaced it.
    fn for_generation(&self, generation: u32, config: &T::Config) -> bool {
        let mut current = self.generation.load(Ordering::Acquire);
        loop {
            if current == generation {
                return true;
            }
            if !is_newer(generation, current) {
                return false;
            }
            match self.generation.compare_exchange(
                current,
                generation,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.state.reset(config);
                    return true;
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// Whether generation `a` came after `b` (RFC 1982 serial number arithmetic:
/// correct while the two are less than 2^31 re-keys apart).
fn is_newer(a: u32, b: u32) -> bool {
    // The cast reinterprets the wrapped difference as signed, on purpose.
    (a.wrapping_sub(b) as i32) > 0
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// A state that counts, and remembers whether it was reset.
    #[derive(Debug)]
    struct Count(AtomicU64);

    impl KeyState for Count {
        type Config = u64;

        fn new(start: &u64) -> Count {
            Count(AtomicU64::new(*start))
        }

        fn reset(&self, start: &u64) {
            self.0.store(*start, Ordering::SeqCst);
        }
    }

    impl Count {
        fn add(&self, n: u64) {
            self.0.fetch_add(n, Ordering::SeqCst);
        }

        fn get(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn key(index: u32, generation: u32) -> Option<Target> {
        Some(Target::Keyed { index, generation })
    }

    #[test]
    fn each_key_has_its_own_state() {
        let states = PerKey::<Count>::new(0, 8);
        states.of(key(0, 0)).unwrap().add(1000);
        states.of(key(1, 0)).unwrap().add(1);
        assert_eq!(states.of(key(1, 0)).unwrap().get(), 1);
        assert_eq!(states.of(key(0, 0)).unwrap().get(), 1000);
        assert_eq!(states.of(None).unwrap().get(), 0);
    }

    #[test]
    fn a_slot_given_to_a_new_key_starts_afresh() {
        let states = PerKey::<Count>::new(7, 8);
        states.of(key(3, 0)).unwrap().add(100);
        assert_eq!(states.of(key(3, 1)).unwrap().get(), 7);
    }

    #[test]
    fn a_straggler_of_the_old_key_gets_nothing_and_resets_nothing() {
        let states = PerKey::<Count>::new(0, 8);
        states.of(key(3, 1)).unwrap().add(100);
        assert!(states.of(key(3, 0)).is_none());
        assert_eq!(states.of(key(3, 1)).unwrap().get(), 100);
    }

    #[test]
    fn a_generation_that_wrapped_around_is_still_newer() {
        assert!(is_newer(0, u32::MAX));
        assert!(!is_newer(u32::MAX, 0));
        let states = PerKey::<Count>::new(0, 8);
        // A slot re-keyed all the way round, in steps of under 2^31.
        for generation in [0, 1 << 30, 1 << 31, 3 << 30, u32::MAX, 0] {
            assert!(states.of(key(1, generation)).is_some(), "{generation}");
        }
        assert!(states.of(key(1, u32::MAX)).is_none(), "a straggler");
    }

    #[test]
    fn requests_without_a_key_share_one_state() {
        let states = PerKey::<Count>::new(0, 0);
        states.of(None).unwrap().add(2);
        assert_eq!(states.of(Some(Target::Default)).unwrap().get(), 2);
        assert_eq!(
            states.of(key(5, 0)).unwrap().get(),
            2,
            "no keyed slots: shared"
        );
    }
}
