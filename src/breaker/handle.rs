//! Operator access: [`BreakerHandle`] forces a guard's breakers open, disables
//! them, and reads their snapshots; [`BreakerMode`] is the override in force.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use super::admission::Breakers;
use super::registry::Keyed;
use super::snapshot::BreakerSnapshot;

/// An operator's override of every breaker of a guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BreakerMode {
    /// The breakers follow their policies.
    Auto,
    /// Every request is rejected with 503.
    ForcedOpen,
    /// Every request goes through the breakers and nothing is counted. A
    /// [concurrency cap](super::BreakerPolicy::concurrency_limit) still applies:
    /// it is not the breakers'.
    Disabled,
}

const AUTO: u8 = 0;
const FORCED_OPEN: u8 = 1;
const DISABLED: u8 = 2;

/// The mode in force, readable on every request without a lock.
#[derive(Debug)]
pub(super) struct ModeCell(AtomicU8);

impl ModeCell {
    pub(super) fn new() -> ModeCell {
        ModeCell(AtomicU8::new(AUTO))
    }

    pub(super) fn get(&self) -> BreakerMode {
        match self.0.load(Ordering::Acquire) {
            FORCED_OPEN => BreakerMode::ForcedOpen,
            DISABLED => BreakerMode::Disabled,
            _ => BreakerMode::Auto,
        }
    }

    fn set(&self, mode: BreakerMode) {
        let value = match mode {
            BreakerMode::Auto => AUTO,
            BreakerMode::ForcedOpen => FORCED_OPEN,
            BreakerMode::Disabled => DISABLED,
        };
        self.0.store(value, Ordering::Release);
    }
}

/// Operator access to a guard's breakers: force them open, disable them, read
/// their state. Get one from
/// [`UpstreamGuardLayer::breaker_handle`](crate::UpstreamGuardLayer::breaker_handle);
/// clones share the breakers.
///
/// ```
/// use upstream_guard::{CircuitState, UpstreamGuardLayer};
///
/// let layer = UpstreamGuardLayer::new();
/// let handle = layer.breaker_handle().expect("a breaker is on by default");
/// handle.force_open();
/// assert_eq!(handle.snapshot().state, CircuitState::ForcedOpen);
/// handle.resume();
/// assert_eq!(handle.snapshot().state, CircuitState::Closed);
/// ```
#[derive(Clone)]
pub struct BreakerHandle {
    /// The guard's breakers themselves, not the guard's shared state: the
    /// handle needs nothing else, and the breaker module stays below the
    /// modules that hold it.
    breakers: Arc<Breakers>,
}

impl fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle").finish_non_exhaustive()
    }
}

impl BreakerHandle {
    pub(crate) fn new(breakers: Arc<Breakers>) -> BreakerHandle {
        BreakerHandle { breakers }
    }

    fn breakers(&self) -> &Breakers {
        &self.breakers
    }

    /// Rejects every request with 503 until [`resume`](Self::resume).
    pub fn force_open(&self) {
        self.breakers().mode.set(BreakerMode::ForcedOpen);
    }

    /// Lets every request through the breakers, counting nothing, until
    /// [`resume`](Self::resume). A concurrency cap still applies.
    pub fn disable(&self) {
        self.breakers().mode.set(BreakerMode::Disabled);
    }

    /// Returns to the configured policies.
    pub fn resume(&self) {
        self.breakers().mode.set(BreakerMode::Auto);
    }

    /// The operator override in force.
    pub fn mode(&self) -> BreakerMode {
        self.breakers().mode()
    }

    /// The shared breaker used by requests without a key.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let breakers = self.breakers();
        BreakerSnapshot::of(breakers, &breakers.default)
    }

    /// The breaker of one key (e.g. `"api.example.com:443"`), if it has one.
    pub fn snapshot_for(&self, key: &str) -> Option<BreakerSnapshot> {
        let breakers = self.breakers();
        let entry = breakers.keyed.as_ref()?.lookup(key)?;
        Some(BreakerSnapshot::of(breakers, entry))
    }

    /// Every keyed breaker, sorted by key.
    pub fn snapshots(&self) -> Vec<(String, BreakerSnapshot)> {
        let breakers = self.breakers();
        let Some(keyed) = &breakers.keyed else {
            return Vec::new();
        };
        let mut all: Vec<_> = keyed
            .keys()
            .into_iter()
            .filter_map(|(key, index)| {
                let entry = keyed.entry(index)?;
                Some((key.to_string(), BreakerSnapshot::of(breakers, entry)))
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// How many keys have a breaker of their own.
    pub fn keys(&self) -> usize {
        self.breakers().keyed.as_ref().map_or(0, Keyed::len)
    }
}
