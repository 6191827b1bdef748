//! Snapshots of sequence state keyed by token prefixes, so a request that starts like an
//! earlier one (a shared system prompt, the next turn of a chat) resumes from the cached state
//! instead of recomputing it.
//!
//! Snapshots are taken at multiples of `block` tokens. A prefix is identified by a chain hash
//! over its blocks (hash of block k folds in the hash of blocks 0..k), so one pass over a prompt
//! yields the key of every candidate prefix; the stored tokens are compared before a hit counts.
//! Memory is bounded by the states' bytes with least-recently-used eviction.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

struct Entry<S> {
    tokens: Vec<u32>,
    state: S,
    bytes: usize,
    last_used: u64,
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Lookups that found a cached prefix.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Prompt tokens served from the cache instead of being computed.
    pub hit_tokens: u64,
    pub entries: usize,
    pub bytes: usize,
}

pub struct PrefixCache<S> {
    block: usize,
    capacity: usize,
    entries: HashMap<u64, Entry<S>>,
    bytes: usize,
    clock: u64,
    stats: PrefixStats,
}

impl<S> PrefixCache<S> {
    /// A cache of snapshots every `block` tokens holding at most `capacity` bytes of state
    /// (0 disables it).
    pub fn new(block: usize, capacity: usize) -> Self {
        PrefixCache {
            block: block.max(1),
            capacity,
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    /// Snapshot spacing in tokens.
    pub fn block(&self) -> usize {
        self.block
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            entries: self.entries.len(),
            bytes: self.bytes,
            ..self.stats
        }
    }

    /// Chain keys of every whole block of `tokens`: `keys[k]` identifies `tokens[..(k+1)·block]`.
    fn keys(&self, tokens: &[u32]) -> Vec<u64> {
        let mut prev = 0u64;
        tokens
            .chunks_exact(self.block)
            .map(|b| {
                let mut h = DefaultHasher::new();
                prev.hash(&mut h);
                b.hash(&mut h);
                prev = h.finish();
                prev
            })
            .collect()
    }

    /// The longest cached prefix of `tokens` no longer than `max_len`: its length and its
    /// state (for the caller to copy). Counts a hit or a miss.
    pub fn lookup(&mut self, tokens: &[u32], max_len: usize) -> Option<(usize, &S)> {
        let usable = &tokens[..max_len.min(tokens.len())];
        let keys = self.keys(usable);
        self.clock += 1;
        let found = keys.iter().enumerate().rev().find_map(|(k, key)| {
            let len = (k + 1) * self.block;
            self.entries
                .get(key)
                .is_some_and(|e| e.tokens[..] == usable[..len])
                .then_some((len, *key))
        });
        match found.and_then(|(len, key)| Some((len, self.entries.get_mut(&key)?))) {
            Some((len, e)) => {
                self.stats.hits += 1;
                self.stats.hit_tokens += len as u64;
                e.last_used = self.clock;
                Some((len, &e.state))
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Recounts the last hit, of `len` tokens, as a miss: its state could not be copied.
    pub fn hit_unusable(&mut self, len: usize) {
        self.stats.hits = self.stats.hits.saturating_sub(1);
        self.stats.hit_tokens = self.stats.hit_tokens.saturating_sub(len as u64);
        self.stats.misses += 1;
    }

    /// True when a snapshot of `bytes` after exactly `tokens` would be stored (a boundary not
    /// yet cached, and room for it), so the caller copies a state only then.
    pub fn would_keep(&self, tokens: &[u32], bytes: usize) -> bool {
        self.capacity > 0 && bytes <= self.capacity && !self.contains(tokens)
    }

    /// True when `len` is a snapshot position.
    pub fn is_boundary(&self, len: usize) -> bool {
        len > 0 && len.is_multiple_of(self.block)
    }

    /// True when the state after exactly `tokens` is already cached.
    pub fn contains(&self, tokens: &[u32]) -> bool {
        self.is_boundary(tokens.len())
            && self
                .keys(tokens)
                .last()
                .and_then(|k| self.entries.get(k))
                .is_some_and(|e| e.tokens == tokens)
    }

    /// Stores `state`, the state after exactly `tokens` (a whole number of blocks), evicting
    /// the least recently used snapshots to stay within the capacity.
    pub fn insert(&mut self, tokens: &[u32], state: S, bytes: usize) {
        if !self.is_boundary(tokens.len()) || bytes > self.capacity {
            return;
        }
        let Some(&key) = self.keys(tokens).last() else {
            return;
        };
        self.clock += 1;
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
        }
        while self.bytes + bytes > self.capacity {
            let Some((&victim, _)) = self.entries.iter().min_by_key(|(_, e)| e.last_used) else {
                break;
            };
            if let Some(e) = self.entries.remove(&victim) {
                self.bytes -= e.bytes;
            }
        }
        self.bytes += bytes;
        self.entries.insert(
            key,
            Entry {
                tokens: tokens.to_vec(),
                state,
                bytes,
                last_used: self.clock,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn finds_the_longest_cached_prefix_within_the_limit() {
        let mut c = PrefixCache::<usize>::new(4, 1000);
        let t = toks(20, 0);
        c.insert(&t[..4], 4, 10);
        c.insert(&t[..12], 12, 10);
        c.insert(&t[..7], 7, 10); // not a boundary: ignored
        assert_eq!(c.lookup(&t, 20), Some((12, &12)));
        assert_eq!(c.lookup(&t, 11), Some((4, &4)), "limited to 11 tokens");
        assert_eq!(c.lookup(&t, 3), None);
        // A different prompt sharing only the first block.
        let mut u = t.clone();
        u[5] = 999;
        assert_eq!(c.lookup(&u, 20), Some((4, &4)));
        assert_eq!(c.lookup(&toks(20, 1), 20), None);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.hit_tokens), (3, 2, 20));
        assert_eq!((s.entries, s.bytes), (2, 20));
        assert!(c.contains(&t[..12]) && !c.contains(&t[..8]));
    }

    #[test]
    fn evicts_least_recently_used_within_capacity() {
        let mut c = PrefixCache::<u32>::new(2, 30);
        let (a, b, d) = (toks(2, 0), toks(2, 1), toks(2, 2));
        c.insert(&a, 1, 10);
        c.insert(&b, 2, 10);
        c.insert(&d, 3, 10);
        assert!(c.lookup(&a, 2).is_some()); // a is now the most recent
        c.insert(&toks(2, 3), 4, 10); // evicts b
        assert!(c.lookup(&b, 2).is_none());
        assert!(c.lookup(&a, 2).is_some() && c.lookup(&d, 2).is_some());
        assert_eq!(c.stats().bytes, 30);
        // What the engine asks before copying a state: kept only when new and it fits.
        assert!(!c.would_keep(&a, 10), "already cached");
        assert!(
            !c.would_keep(&toks(2, 4), 31),
            "larger than the whole cache"
        );
        assert!(c.would_keep(&toks(2, 4), 30));
        c.insert(&toks(2, 4), 5, 31); // larger than the whole cache: not stored
        assert_eq!(c.stats().entries, 3);
        let mut off = PrefixCache::<u32>::new(2, 0);
        assert!(!off.would_keep(&a, 1), "a cache of no bytes keeps nothing");
        off.insert(&a, 1, 1);
        assert!(off.lookup(&a, 2).is_none());
    }
}
