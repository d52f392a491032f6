//! Answers of recent queries, by what was asked: a dashboard or a diff that
//! asks again about the same past range gets the answer without a scan.
//!
//! Late data is the one thing that changes a past range (agents retry and
//! replay their spool), so every batch that reaches the buffer drops the
//! answers whose range holds one of its windows, and so does every segment
//! that maintenance downsamples or expires. An answer computed while such a
//! change landed is not kept: each query takes a ticket before it scans, and
//! its answer is kept only if no overlapping change came after the ticket.
//! Ranges ending less than [`SETTLED_MS`] ago are not kept at all: the open
//! window would drop them at once.

use std::collections::VecDeque;
use std::sync::Mutex;

use super::lru::Lru;
use super::{Aggregate, GroupBy, Selector};

/// Ranges must end this long before now to be kept: agents ship a window
/// within seconds of its end.
pub const SETTLED_MS: i64 = 60_000;
/// Changes remembered for tickets; an older ticket keeps nothing.
const CHANGES_KEPT: usize = 4096;

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    service: String,
    kinds: Option<Vec<String>>,
    matchers: Vec<String>,
    from_ms: i64,
    until_ms: i64,
    step_ms: Option<i64>,
}

impl Key {
    fn of(sel: &Selector, by: GroupBy) -> Key {
        Key {
            service: sel.service.clone(),
            kinds: sel.kinds.clone(),
            matchers: sel.matchers.iter().map(ToString::to_string).collect(),
            from_ms: sel.from_ms,
            until_ms: sel.until_ms,
            step_ms: match by {
                GroupBy::Stack => None,
                GroupBy::Time { step_ms } => Some(step_ms),
            },
        }
    }
}

/// A change to the stored data: a service's windows from `first_ms` to
/// `last_ms` (inclusive).
struct Change {
    ticket: u64,
    service: String,
    first_ms: i64,
    last_ms: i64,
}

impl Change {
    fn touches(&self, key: &Key) -> bool {
        self.service == key.service
            && self.first_ms < key.until_ms
            && self.last_ms >= key.from_ms
    }
}

pub struct Results {
    inner: Mutex<Inner>,
}

struct Inner {
    answers: Lru<Key, std::sync::Arc<Aggregate>>,
    /// Tickets handed out so far; each change takes the next one.
    ticket: u64,
    changes: VecDeque<Change>,
}

fn footprint(agg: &Aggregate) -> usize {
    agg.values().map(|m| m.capacity() * 24 + 64).sum::<usize>() + 256
}

impl Results {
    pub fn new(budget_bytes: usize) -> Results {
        Results {
            inner: Mutex::new(Inner {
                answers: Lru::new(budget_bytes),
                ticket: 0,
                changes: VecDeque::new(),
            }),
        }
    }

    pub fn get(&self, sel: &Selector, by: GroupBy) -> Option<Aggregate> {
        let hit = self.lock().answers.get(&Key::of(sel, by))?;
        Some((*hit).clone())
    }

    /// Taken before a scan whose answer may be kept.
    pub fn ticket(&self) -> u64 {
        self.lock().ticket
    }

    /// Keeps an answer, unless its range is not settled at `now_ms` or the
    /// data it covers changed since `ticket`.
    pub fn put(&self, sel: &Selector, by: GroupBy, ticket: u64, answer: &Aggregate, now_ms: i64) {
        if sel.until_ms > now_ms - SETTLED_MS {
            return;
        }
        let key = Key::of(sel, by);
        let bytes = footprint(answer);
        let mut inner = self.lock();
        let remembered_since = inner.changes.front().map_or(inner.ticket, |c| c.ticket - 1);
        if ticket < remembered_since {
            return;
        }
        if inner.changes.iter().rev().take_while(|c| c.ticket > ticket).any(|c| c.touches(&key)) {
            return;
        }
        inner.answers.insert(key, std::sync::Arc::new(answer.clone()), bytes);
    }

    /// Windows `first_ms..=last_ms` of `service` changed.
    pub fn changed(&self, service: &str, first_ms: i64, last_ms: i64) {
        let mut inner = self.lock();
        inner.ticket += 1;
        let change = Change { ticket: inner.ticket, service: service.to_owned(), first_ms, last_ms };
        inner.answers.retain(|k| !change.touches(k));
        if inner.changes.len() == CHANGES_KEPT {
            inner.changes.pop_front();
        }
        inner.changes.push_back(change);
    }

    pub fn bytes(&self) -> usize {
        self.lock().answers.bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(service: &str, from_ms: i64, until_ms: i64) -> Selector {
        Selector {
            service: service.into(),
            from_ms,
            until_ms,
            kinds: None,
            matchers: vec![],
            cancel: Default::default(),
        }
    }

    fn answer(v: i64) -> Aggregate {
        Aggregate::from([("on-cpu".to_string(), [(1u64, v)].into())])
    }

    const NOW: i64 = 10_000_000;

    #[test]
    fn answers_are_dropped_by_changes_to_their_range_only() {
        let r = Results::new(1 << 20);
        let (a, b) = (sel("a", 0, 100_000), sel("b", 0, 100_000));
        for s in [&a, &b] {
            let t = r.ticket();
            r.put(s, GroupBy::Stack, t, &answer(1), NOW);
        }
        assert_eq!(r.get(&a, GroupBy::Stack), Some(answer(1)));
        assert_eq!(r.get(&a, GroupBy::Time { step_ms: 10_000 }), None, "another grouping is another question");
        r.changed("a", 100_000, 110_000);
        assert!(r.get(&a, GroupBy::Stack).is_some(), "a window after the range");
        r.changed("a", 90_000, 90_000);
        assert!(r.get(&a, GroupBy::Stack).is_none());
        assert!(r.get(&b, GroupBy::Stack).is_some(), "another service");
    }

    #[test]
    fn an_answer_scanned_across_a_change_is_not_kept() {
        let r = Results::new(1 << 20);
        let a = sel("a", 0, 100_000);
        let before = r.ticket();
        r.changed("a", 50_000, 50_000);
        r.put(&a, GroupBy::Stack, before, &answer(1), NOW);
        assert!(r.get(&a, GroupBy::Stack).is_none());
        let before = r.ticket();
        r.changed("b", 50_000, 50_000);
        r.changed("a", 200_000, 200_000);
        r.put(&a, GroupBy::Stack, before, &answer(2), NOW);
        assert_eq!(r.get(&a, GroupBy::Stack), Some(answer(2)), "changes elsewhere do not matter");
    }

    #[test]
    fn unsettled_ranges_and_forgotten_tickets_keep_nothing() {
        let r = Results::new(1 << 20);
        let recent = sel("a", 0, NOW - SETTLED_MS + 1);
        r.put(&recent, GroupBy::Stack, r.ticket(), &answer(1), NOW);
        assert!(r.get(&recent, GroupBy::Stack).is_none());
        let a = sel("a", 0, 100_000);
        let old = r.ticket();
        for _ in 0..CHANGES_KEPT + 1 {
            r.changed("b", 0, 0);
        }
        r.put(&a, GroupBy::Stack, old, &answer(1), NOW);
        assert!(r.get(&a, GroupBy::Stack).is_none(), "changes since the ticket are no longer known");
        r.put(&a, GroupBy::Stack, r.ticket(), &answer(1), NOW);
        assert!(r.get(&a, GroupBy::Stack).is_some());
    }
}
