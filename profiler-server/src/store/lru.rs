//! A least-recently-used map within a byte budget, for the caches of the
//! embedded store. Not synchronized: owners keep it behind a lock.

use std::collections::HashMap;
use std::hash::Hash;

pub struct Lru<K, V> {
    budget_bytes: usize,
    entries: HashMap<K, Entry<V>>,
    bytes: usize,
    clock: u64,
}

struct Entry<V> {
    value: V,
    bytes: usize,
    used: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    pub fn new(budget_bytes: usize) -> Self {
        Lru {
            budget_bytes,
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
        }
    }

    pub fn get(&mut self, key: &K) -> Option<V> {
        self.clock += 1;
        let entry = self.entries.get_mut(key)?;
        entry.used = self.clock;
        Some(entry.value.clone())
    }

    /// Keeps `value`, which holds about `bytes`, then drops the least
    /// recently used entries until the budget holds; a value larger than the
    /// whole budget is not kept.
    pub fn insert(&mut self, key: K, value: V, bytes: usize) {
        if bytes > self.budget_bytes {
            return;
        }
        self.clock += 1;
        let entry = Entry { value, bytes, used: self.clock };
        if let Some(old) = self.entries.insert(key, entry) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        while self.bytes > self.budget_bytes {
            // A scan per eviction: the caches hold hundreds to thousands of
            // entries, each far larger than this bookkeeping.
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone()) else {
                break;
            };
            self.remove(&oldest);
        }
    }

    pub fn remove(&mut self, key: &K) {
        if let Some(gone) = self.entries.remove(key) {
            self.bytes -= gone.bytes;
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let bytes = &mut self.bytes;
        self.entries.retain(|k, e| {
            let kept = keep(k);
            if !kept {
                *bytes -= e.bytes;
            }
            kept
        });
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_recently_used_within_its_budget() {
        let mut lru = Lru::new(200);
        lru.insert(1, "a", 100);
        lru.insert(2, "b", 100);
        assert_eq!(lru.get(&1), Some("a"));
        lru.insert(3, "c", 100);
        assert_eq!(lru.get(&2), None, "the least recently used went");
        assert_eq!((lru.get(&1), lru.get(&3)), (Some("a"), Some("c")));
        assert_eq!(lru.bytes(), 200);
        lru.retain(|&k| k != 1);
        lru.remove(&3);
        assert_eq!(lru.bytes(), 0);
        lru.insert(4, "d", 1000);
        assert_eq!(lru.get(&4), None, "larger than the whole budget");
    }
}
