//! A per-thread cache of recent key lookups: (registry, key) → (slot,
//! generation), consulted before the registry's map.
//!
//! axum's router and hyper's `TowerToHyperService` clone the service for every
//! request, so nothing a service keeps between calls survives to the next
//! request; the thread that runs it does. A hit takes no lock, writes nothing
//! shared and touches no reference count; only a miss reads the registry's map
//! (under its read lock) and fills a line.
//!
//! The line of the last hit is checked first, by comparing the key alone: a
//! thread calling one upstream finds it there. Otherwise the key is hashed to
//! one of [`SETS`] sets of [`WAYS`] lines. The cache is allocated on a
//! thread's first lookup (about 5 KiB), so threads that never see a keyed
//! breaker pay nothing; a thread that sends to more hot keys than it holds
//! still finds them, through the map.
//!
//! A line is only a hint. The registry checks a hit against the slot's
//! generation, which it bumps whenever it gives the slot to another key, so the
//! line of an evicted key misses, and the lookup falls back to the map. Lines
//! name their registry by an id that is never reused, so a line of a dropped
//! guard can never match another's. (Thirty-two bits of generation wrap after
//! 2³² re-keys of one slot; a line would have to sit unused through exactly
//! that many to be taken for the new key's.)

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Sets: chosen by the key's hash.
const SETS: usize = 32;

/// Lines per set, replaced oldest first.
const WAYS: usize = 4;

/// One remembered lookup.
struct Line {
    /// The registry's id; 0 for an empty line (ids start at 1).
    registry: u64,
    hash: u64,
    key: Option<Arc<str>>,
    slot: u32,
    generation: u32,
}

impl Line {
    const EMPTY: Line = Line {
        registry: 0,
        hash: 0,
        key: None,
        slot: 0,
        generation: 0,
    };

    fn holds(&self, registry: u64, key: &str) -> bool {
        self.registry == registry && self.key.as_deref() == Some(key)
    }

    fn found(&self) -> (u32, u32) {
        (self.slot, self.generation)
    }
}

/// One thread's cache.
struct Recent {
    /// `SETS` sets of `WAYS` lines, set after set.
    lines: [Line; SETS * WAYS],
    /// The line last hit or filled.
    last: usize,
    /// Each set's next line to fill: its oldest.
    next: [u8; SETS],
}

impl Recent {
    fn set(&self, hash: u64) -> Option<&[Line]> {
        let first = set_of(hash) * WAYS;
        self.lines.get(first..first + WAYS)
    }
}

thread_local! {
    /// Boxed on first use: an array here would sit in every thread's static
    /// TLS block, used or not.
    static RECENT: RefCell<Option<Box<Recent>>> = const { RefCell::new(None) };
}

/// A new registry's id: never 0, never reused.
pub(super) fn registry_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The slot and generation this thread last saw `key` at in `registry`.
///
/// Inlined for the line last hit (one comparison of the key); the sets are
/// searched out of line.
#[inline]
pub(super) fn get(registry: u64, key: &str) -> Option<(u32, u32)> {
    let last = RECENT.try_with(|recent| {
        let recent = recent.try_borrow().ok()?;
        let recent = recent.as_deref()?;
        let line = recent.lines.get(recent.last)?;
        line.holds(registry, key).then(|| line.found())
    });
    match last {
        Ok(Some(found)) => Some(found),
        _ => search(registry, key),
    }
}

/// [`get`] past the line last hit: the key's set, by its hash.
#[inline(never)]
fn search(registry: u64, key: &str) -> Option<(u32, u32)> {
    RECENT
        .try_with(|recent| {
            let mut recent = recent.try_borrow_mut().ok()?;
            let recent = recent.as_mut()?;
            let hash = hash(key);
            let way = recent
                .set(hash)?
                .iter()
                .position(|line| line.hash == hash && line.holds(registry, key))?;
            recent.last = set_of(hash) * WAYS + way;
            recent.lines.get(recent.last).map(Line::found)
        })
        .ok()
        .flatten()
}

/// Remembers where `key` is in `registry`: in place of its own line if it has
/// one (a stale generation), else in place of its set's oldest line.
pub(super) fn put(registry: u64, key: Arc<str>, slot: u32, generation: u32) {
    // A thread being torn down has no cache: nothing to remember.
    let _ = RECENT.try_with(|recent| {
        let Ok(mut recent) = recent.try_borrow_mut() else {
            return;
        };
        let recent = recent.get_or_insert_with(|| {
            Box::new(Recent {
                lines: [const { Line::EMPTY }; SETS * WAYS],
                last: 0,
                next: [0; SETS],
            })
        });
        let hash = hash(&key);
        let set = set_of(hash);
        let first = set * WAYS;
        let Some(lines) = recent.lines.get(first..first + WAYS) else {
            return;
        };
        let own = lines
            .iter()
            .position(|line| line.hash == hash && line.holds(registry, &key));
        let way = match (own, recent.next.get_mut(set)) {
            (Some(way), _) => way,
            (None, Some(next)) => {
                let oldest = usize::from(*next);
                *next = ((oldest + 1) % WAYS) as u8;
                oldest
            }
            (None, None) => return,
        };
        if let Some(line) = recent.lines.get_mut(first + way) {
            *line = Line {
                registry,
                hash,
                key: Some(key),
                slot,
                generation,
            };
            recent.last = first + way;
        }
    });
}

/// The key's hash: FxHash over 8-byte words (keys are short, and need no
/// defence against chosen collisions here: the worst a crafted key can do to
/// a 128-line cache is miss it). A key's last bytes are read as the word that
/// ends it, overlapping the one before: no copy of a partial word.
pub(super) fn hash(key: &str) -> u64 {
    let bytes = key.as_bytes();
    let mut hash = mix(0, bytes.len() as u64);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        hash = mix(hash, word_at(word));
    }
    if !words.remainder().is_empty() {
        let last = match bytes.len().checked_sub(8) {
            Some(start) => bytes.get(start..).map_or(0, word_at),
            None => bytes.iter().fold(0, |word, &b| word << 8 | u64::from(b)),
        };
        hash = mix(hash, last);
    }
    hash
}

fn mix(hash: u64, word: u64) -> u64 {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    (hash.rotate_left(5) ^ word).wrapping_mul(SEED)
}

/// The first 8 bytes of `bytes` (which has at least 8) as a word.
fn word_at(bytes: &[u8]) -> u64 {
    bytes
        .first_chunk::<8>()
        .map_or(0, |word| u64::from_le_bytes(*word))
}

fn set_of(hash: u64) -> usize {
    // The multiply leaves the high bits the best mixed.
    (hash >> (64 - SETS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_key_is_found_only_in_its_registry() {
        let (mine, other) = (registry_id(), registry_id());
        let key = "api.example.com:443";
        put(mine, Arc::from(key), 7, 3);
        assert_eq!(get(mine, key), Some((7, 3)));
        assert_eq!(get(other, key), None);
        assert_eq!(get(mine, "b:80"), None);
    }

    #[test]
    fn a_key_seen_again_replaces_its_line() {
        let registry = registry_id();
        let key = "a:80";
        put(registry, Arc::from(key), 1, 1);
        put(registry, Arc::from(key), 2, 5);
        assert_eq!(get(registry, key), Some((2, 5)));
    }

    #[test]
    fn a_set_keeps_its_newest_lines() {
        let registry = registry_id();
        // Keys of one set, more than it has ways.
        let keys: Vec<String> = (0..)
            .map(|i| format!("host-{i}:443"))
            .filter(|k| set_of(hash(k)) == 0)
            .take(WAYS + 1)
            .collect();
        for (slot, key) in (0..).zip(&keys) {
            put(registry, Arc::from(key.as_str()), slot, 0);
        }
        assert_eq!(get(registry, &keys[0]), None, "the oldest left");
        for (slot, key) in (0..).zip(&keys).skip(1) {
            assert_eq!(get(registry, key), Some((slot, 0)), "{key}");
        }
    }

    #[test]
    fn hashes_differ_for_keys_that_differ_anywhere() {
        let keys = [
            "a",
            "b",
            "ab",
            "ba",
            "api-1.internal:8080",
            "api-2.internal:8080",
        ];
        let hashes: std::collections::HashSet<u64> = keys.iter().map(|k| hash(k)).collect();
        assert_eq!(hashes.len(), keys.len());
    }
}
