//! State kept per breaker key: retry budgets, hedging latencies.
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

use crate::breaker::Target;
use crate::retry::{BudgetConfig, RetryBudget};

/// How many states are allocated at once, as the registry allocates breakers.
const CHUNK: usize = 64;

/// State that can live per key: made from a config, reset for a new key.
pub(crate) trait KeyState {
    /// What each new state is made from.
    type Config: Copy;
    fn new(config: Self::Config) -> Self;
    /// Forgets everything, as if new: the slot now belongs to another key.
    fn reset(&self);
}

/// The retry budgets of one guard.
pub(crate) type Budgets = PerKey<RetryBudget>;

impl KeyState for RetryBudget {
    type Config = BudgetConfig;

    fn new(config: BudgetConfig) -> Self {
        RetryBudget::new(config)
    }

    fn reset(&self) {
        RetryBudget::reset(self);
    }
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
            config,
            shared: T::new(config),
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
            .get_or_init(|| (0..CHUNK).map(|_| Slot::new(self.config)).collect())
            .get(index % CHUNK)?;
        slot.for_generation(generation).then_some(&slot.state)
    }
}

impl<T: KeyState> Slot<T> {
    fn new(config: T::Config) -> Slot<T> {
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
    fn for_generation(&self, generation: u32) -> bool {
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
                    self.state.reset();
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
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    fn config() -> BudgetConfig {
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 0,
            ttl: Duration::from_secs(10),
        }
    }

    fn key(index: u32, generation: u32) -> Option<Target> {
        Some(Target::Keyed { index, generation })
    }

    /// Withdrawals granted from `budget` out of `n` tries.
    fn granted(budget: &RetryBudget, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| budget.withdraw(now)).count()
    }

    #[test]
    fn a_failing_key_cannot_spend_what_other_keys_paid_in() {
        let budgets = Budgets::new(config(), 8);
        let now = Instant::now();
        for _ in 0..1000 {
            budgets.of(key(0, 0)).unwrap().deposit(now);
        }
        budgets.of(key(1, 0)).unwrap().deposit(now);
        assert_eq!(granted(budgets.of(key(1, 0)).unwrap(), 100, now), 0);
        assert_eq!(granted(budgets.of(key(0, 0)).unwrap(), 500, now), 200);
    }

    #[test]
    fn a_slot_given_to_a_new_key_starts_with_an_empty_budget() {
        let budgets = Budgets::new(config(), 8);
        let now = Instant::now();
        for _ in 0..100 {
            budgets.of(key(3, 0)).unwrap().deposit(now);
        }
        let new_key = budgets.of(key(3, 1)).unwrap();
        assert_eq!(granted(new_key, 10, now), 0);
    }

    #[test]
    fn a_straggler_of_the_old_key_gets_no_budget_and_resets_nothing() {
        let budgets = Budgets::new(config(), 8);
        let now = Instant::now();
        for _ in 0..100 {
            budgets.of(key(3, 1)).unwrap().deposit(now);
        }
        assert!(budgets.of(key(3, 0)).is_none());
        assert_eq!(granted(budgets.of(key(3, 1)).unwrap(), 50, now), 20);
    }

    #[test]
    fn a_generation_that_wrapped_around_is_still_newer() {
        assert!(is_newer(0, u32::MAX));
        assert!(!is_newer(u32::MAX, 0));
        let budgets = Budgets::new(config(), 8);
        // A slot re-keyed all the way round, in steps of under 2^31.
        for generation in [0, 1 << 30, 1 << 31, 3 << 30, u32::MAX, 0] {
            assert!(budgets.of(key(1, generation)).is_some(), "{generation}");
        }
        assert!(budgets.of(key(1, u32::MAX)).is_none(), "a straggler");
    }

    #[test]
    fn requests_without_a_key_share_one_budget() {
        let budgets = Budgets::new(config(), 0);
        let now = Instant::now();
        for _ in 0..10 {
            budgets.of(None).unwrap().deposit(now);
        }
        assert_eq!(
            granted(budgets.of(Some(Target::Default)).unwrap(), 10, now),
            2
        );
    }
}
