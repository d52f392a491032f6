//! Ids of recently stored batches, so a client's retry of a batch the store
//! already acknowledged (its answer was lost) is not counted twice.
//!
//! Retries come within seconds or minutes of the original (the agent retries,
//! then spools and replays), so ids are kept for a window and a bounded
//! count, oldest first out. Beyond that a retry cannot be told from a first
//! delivery: [`RecentBatches::horizon_ms`] says from when on the answer is
//! sure, and a client says when its batch may first have been stored, so a
//! retry from before the horizon is refused rather than counted twice.

use std::collections::{HashMap, VecDeque};

use super::Refused;

/// A batch id as stored: a 128-bit hash, so memory per id does not depend on
/// what a client sends.
pub type BatchKey = u128;

pub fn key(id: &str) -> BatchKey {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

pub struct RecentBatches {
    window_ms: i64,
    max_ids: usize,
    seen: HashMap<BatchKey, i64>,
    order: VecDeque<(i64, BatchKey)>,
    /// When the newest id forgotten for the count was stored: ids from then
    /// on are all remembered, within the window.
    forgotten_for_count_ms: i64,
}

impl RecentBatches {
    pub fn new(window_ms: i64, max_ids: usize) -> Self {
        RecentBatches {
            window_ms,
            max_ids: max_ids.max(1),
            seen: HashMap::new(),
            order: VecDeque::new(),
            forgotten_for_count_ms: i64::MIN,
        }
    }

    pub fn contains(&self, key: BatchKey) -> bool {
        self.seen.contains_key(&key)
    }

    /// Records `key` as stored at `at_ms`, forgetting what fell out of the
    /// window or over the count.
    pub fn insert(&mut self, key: BatchKey, at_ms: i64) {
        if self.seen.insert(key, at_ms).is_none() {
            self.order.push_back((at_ms, key));
        }
        self.expire(at_ms);
    }

    pub fn expire(&mut self, now_ms: i64) {
        while let Some(&(at, key)) = self.order.front() {
            if at >= now_ms - self.window_ms && self.order.len() <= self.max_ids {
                break;
            }
            self.order.pop_front();
            if self.order.len() >= self.max_ids {
                self.forgotten_for_count_ms = self.forgotten_for_count_ms.max(at);
            }
            if self.seen.get(&key) == Some(&at) {
                self.seen.remove(&key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Every batch stored after this time (ms) is remembered: a batch that
    /// is not, and may have been stored only then or before, is unknowable.
    pub fn horizon_ms(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.window_ms).max(self.forgotten_for_count_ms)
    }
}

/// The refusal of a retry from before what the store remembers.
pub fn unverifiable(since_ms: i64, horizon_ms: i64) -> Refused {
    Refused::Unverifiable(format!(
        "this batch may have been stored {}s before the oldest batch id this server remembers: \
         it cannot tell a retry from a first delivery, so it does not store it again",
        horizon_ms.saturating_sub(since_ms) / 1000
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_expire_by_age_and_by_count() {
        let mut r = RecentBatches::new(1_000, 3);
        r.insert(key("a"), 0);
        r.insert(key("b"), 500);
        assert!(r.contains(key("a")) && r.contains(key("b")));
        r.insert(key("c"), 1_200);
        assert!(!r.contains(key("a")), "a is older than the window");
        r.insert(key("d"), 1_300);
        r.insert(key("e"), 1_400);
        assert!(!r.contains(key("b")), "over the count, the oldest goes");
        assert_eq!(r.len(), 3);
        assert!(r.contains(key("e")));
        // b (at 500) went for the count: batches stored then are unknowable,
        // and the window alone would say 400.
        assert_eq!(r.horizon_ms(1_400), 500);
        assert_eq!(RecentBatches::new(1_000, 3).horizon_ms(5_000), 4_000);
    }
}
