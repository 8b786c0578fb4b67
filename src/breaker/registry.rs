//! Breakers by key, in a bounded registry.
//!
//! Entries live in fixed chunks that are allocated on first use and never move,
//! so a request holds only an index and a generation, not a reference count:
//! nothing on the hot path writes a shared cache line. The key → index map is
//! behind a `RwLock`, but each thread remembers the keys it looked up recently
//! (see `recent`), so calls to upstreams a thread has seen skip the map, its
//! lock and any reference count, however the service is cloned.
//!
//! When every entry is taken, a new key evicts one that was not used since the
//! clock hand last passed it (second-chance / CLOCK eviction), preferring closed
//! breakers with nothing in flight. Memory is bounded by `max_keys` whatever
//! the number of distinct keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use super::recent;
use super::state::Breaker;
use super::tenancy::Tenancy;

const CHUNK: usize = 64;

/// The most slots one eviction looks at.
const EVICTION_SCAN: usize = 64;

/// One keyed breaker with its bookkeeping.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) breaker: Breaker,
    /// Which key holds the entry (a generation, bumped each time the entry is
    /// given to another key) and its requests admitted and not yet answered (for
    /// the concurrency cap), changed together so that a request of the previous
    /// key cannot touch the new key's count.
    pub(crate) tenancy: Tenancy,
    /// Set on use, cleared by the eviction hand: "used recently".
    referenced: AtomicBool,
}

impl Entry {
    pub(crate) fn new(window_nanos: u64) -> Entry {
        Entry {
            breaker: Breaker::new(window_nanos),
            tenancy: Tenancy::new(),
            referenced: AtomicBool::new(false),
        }
    }

    pub(crate) fn touch(&self) {
        // Read first: in the steady state this never writes.
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }
}

pub(crate) use crate::keyed::Target;

struct Index {
    map: HashMap<Arc<str>, u32>,
    keys: Vec<Option<Arc<str>>>,
    hand: usize,
}

/// The keyed entries.
pub(crate) struct Keyed {
    /// Names the registry in the threads' caches of recent lookups.
    id: u64,
    window_nanos: u64,
    max_keys: usize,
    chunks: Box<[OnceLock<Box<[Entry]>>]>,
    index: RwLock<Index>,
}

impl std::fmt::Debug for Keyed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed")
            .field("max_keys", &self.max_keys)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Keyed {
    pub(crate) fn new(max_keys: usize, window_nanos: u64) -> Keyed {
        let chunks = max_keys.div_ceil(CHUNK);
        Keyed {
            id: recent::registry_id(),
            window_nanos,
            max_keys,
            chunks: (0..chunks).map(|_| OnceLock::new()).collect(),
            index: RwLock::new(Index {
                map: HashMap::new(),
                keys: Vec::new(),
                hand: 0,
            }),
        }
    }

    pub(crate) fn entry(&self, index: u32) -> Option<&Entry> {
        let i = index as usize;
        self.chunks.get(i / CHUNK)?.get()?.get(i % CHUNK)
    }

    fn entry_or_init(&self, index: usize) -> Option<&Entry> {
        let chunk = self.chunks.get(index / CHUNK)?.get_or_init(|| {
            (0..CHUNK)
                .map(|_| Entry::new(self.window_nanos))
                .collect::<Vec<_>>()
                .into_boxed_slice()
        });
        chunk.get(index % CHUNK)
    }

    /// The entry for `key`: from the thread's recent lookups, the map, or a new
    /// (or evicted) slot.
    pub(crate) fn target(&self, key: &str) -> Option<Target> {
        if let Some((index, generation)) = recent::get(self.id, key) {
            if let Some(entry) = self.entry(index) {
                // Still the key's slot: the generation moves on when the slot
                // is given to another key.
                if entry.tenancy.generation() == generation {
                    entry.touch();
                    return Some(Target::Keyed { index, generation });
                }
            }
        }
        let found = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            self.held_by(&index, key)
        };
        let (key, index, generation) = match found {
            Some(found) => found,
            None => self.insert(key)?,
        };
        self.entry(index)?.touch();
        recent::put(self.id, key, index, generation);
        Some(Target::Keyed { index, generation })
    }

    /// The slot `key` holds and its generation. Read under the index lock, which
    /// re-keying holds for writing: read after it, the generation could be that
    /// of the next key given the slot.
    fn held_by(&self, index: &Index, key: &str) -> Option<(Arc<str>, u32, u32)> {
        let (key, slot) = index.map.get_key_value(key)?;
        let generation = self.entry(*slot)?.tenancy.generation();
        Some((key.clone(), *slot, generation))
    }

    fn insert(&self, key: &str) -> Option<(Arc<str>, u32, u32)> {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = self.held_by(&index, key) {
            return Some(found);
        }
        let key: Arc<str> = Arc::from(key);
        let slot = if index.keys.len() < self.max_keys {
            index.keys.push(None);
            index.keys.len() - 1
        } else {
            self.evict(&mut index)?
        };
        let entry = self.entry_or_init(slot)?;
        if let Some(old) = index.keys[slot].take() {
            index.map.remove(&old);
            entry.tenancy.rekey();
            entry.breaker.reset();
        }
        let slot32 = u32::try_from(slot).ok()?;
        index.keys[slot] = Some(key.clone());
        index.map.insert(key.clone(), slot32);
        Some((key, slot32, entry.tenancy.generation()))
    }

    /// Picks a slot to reuse: from the hand on, the first slot not used since the
    /// hand last passed and idle (closed, nothing in flight); failing that, the
    /// first slot not used recently; failing that, the hand's slot.
    ///
    /// The walk is bounded ([`EVICTION_SCAN`] slots): when every upstream fails at
    /// once and no breaker is idle, an insert must not walk the whole registry
    /// under the write lock.
    fn evict(&self, index: &mut Index) -> Option<usize> {
        let len = index.keys.len();
        if len == 0 {
            return None;
        }
        let mut fallback = None;
        for _ in 0..EVICTION_SCAN.min(len) {
            let slot = index.hand;
            index.hand = (index.hand + 1) % len;
            let Some(entry) = self.entry(u32::try_from(slot).ok()?) else {
                return Some(slot);
            };
            if entry.referenced.swap(false, Ordering::Relaxed) {
                continue;
            }
            let idle = entry.tenancy.in_flight() == 0 && entry.breaker.is_closed();
            if idle {
                return Some(slot);
            }
            fallback.get_or_insert(slot);
        }
        Some(fallback.unwrap_or(index.hand))
    }

    pub(crate) fn len(&self) -> usize {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.map.len()
    }

    /// The key of an entry, for events and snapshots.
    pub(crate) fn key_of(&self, slot: u32) -> Option<Arc<str>> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.keys.get(slot as usize).cloned().flatten()
    }

    pub(crate) fn lookup(&self, key: &str) -> Option<&Entry> {
        let slot = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            *index.map.get(key)?
        };
        self.entry(slot)
    }

    pub(crate) fn keys(&self) -> Vec<(Arc<str>, u32)> {
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        index.map.iter().map(|(k, i)| (k.clone(), *i)).collect()
    }
}

#[cfg(all(test, not(upstream_guard_loom)))]
mod tests {
    use super::*;

    const WINDOW: u64 = 10_000_000_000;

    #[test]
    fn the_same_key_gets_the_same_entry() {
        let keyed = Keyed::new(8, WINDOW);
        let a = keyed.target("a:80").unwrap();
        let from_another_thread = std::thread::scope(|s| s.spawn(|| keyed.target("a:80")).join());
        assert_eq!(from_another_thread.unwrap(), Some(a));
        assert_eq!(keyed.target("a:80"), Some(a));
        assert_ne!(keyed.target("b:80"), Some(a));
    }

    #[test]
    fn a_thread_finds_a_key_it_looked_up_before_without_the_maps_lock() {
        let keyed = &Keyed::new(8, WINDOW);
        let (ask, asked) = std::sync::mpsc::channel();
        let (tell, told) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(move || {
                tell.send(keyed.target("a:80")).unwrap();
                asked.recv().unwrap();
                tell.send(keyed.target("a:80")).unwrap();
            });
            let first = told.recv().unwrap();
            let writing = keyed.index.write().unwrap();
            ask.send(()).unwrap();
            let again = told.recv_timeout(std::time::Duration::from_secs(1));
            drop(writing);
            assert_eq!(again.ok(), Some(first), "found while the map was locked");
        });
    }

    #[test]
    fn a_key_evicted_since_this_thread_saw_it_is_looked_up_again() {
        let keyed = Keyed::new(1, WINDOW);
        let a = keyed.target("a").unwrap();
        keyed.target("b").unwrap();
        let again = keyed.target("a").unwrap();
        assert_ne!(again, a, "not the slot's old generation");
        assert!(keyed.lookup("a").is_some() && keyed.lookup("b").is_none());
    }

    #[test]
    fn the_registry_never_grows_past_max_keys() {
        let keyed = Keyed::new(100, WINDOW);
        for i in 0..100_000 {
            assert!(keyed.target(&format!("host-{i}:443")).is_some());
        }
        assert_eq!(keyed.len(), 100);
        assert_eq!(
            keyed.chunks.iter().filter(|c| c.get().is_some()).count(),
            2,
            "only the chunks for 100 entries are allocated"
        );
    }

    #[test]
    fn an_evicted_entry_gets_a_new_generation() {
        let keyed = Keyed::new(1, WINDOW);
        let first = keyed.target("a").unwrap();
        // Clear the "recently used" mark so the hand can take it.
        let second = keyed.target("b").unwrap();
        match (first, second) {
            (
                Target::Keyed {
                    index: i1,
                    generation: g1,
                },
                Target::Keyed {
                    index: i2,
                    generation: g2,
                },
            ) => {
                assert_eq!(i1, i2);
                assert_ne!(g1, g2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(keyed.len(), 1);
        assert!(keyed.lookup("a").is_none());
    }

    #[test]
    fn a_full_registry_of_open_breakers_still_takes_new_keys() {
        use crate::breaker::state::{Policy, Record};
        let policy = Policy {
            consecutive_failures: 1,
            failure_rate: None,
            slow_call_rate: None,
            min_calls: 1,
            open_nanos: u64::MAX / 2,
            max_open_nanos: u64::MAX / 2,
            probes: 1,
        };
        let keyed = Keyed::new(256, WINDOW);
        let fail = Record {
            failure: true,
            slow: false,
        };
        for i in 0..2_000 {
            let target = keyed.target(&format!("dead-{i}")).unwrap();
            let Target::Keyed { index, .. } = target else {
                panic!("{target:?}")
            };
            keyed
                .entry(index)
                .unwrap()
                .breaker
                .record(&policy, fail, None, || 0);
        }
        assert_eq!(keyed.len(), 256);
    }
}
