//! Per-stack totals of a segment, kept in the catalog beside its entry.
//!
//! A segment holds one row per (stack, series, window); a query whose range
//! holds the segment whole and filters no labels needs only one sum per
//! stack. Those sums are computed once, when the segment is written, so such
//! a query reads them instead of the rows. They are written only where that
//! pays: when the segment has at least twice as many rows as stacks.
//! Decoded totals stay in memory, least recently used out first, within a
//! byte budget: segments never change, so an entry is never stale.

use std::sync::{Arc, Mutex};

use super::lru::Lru;
use super::Row;

/// (stack id, summed value), ascending by stack id.
pub type Totals = Arc<[(u64, i64)]>;

/// The totals of normalized rows (sorted by stack id), or None when they
/// would not save a query at least half of the rows.
pub fn of(rows: &[Row]) -> Option<Vec<(u64, i64)>> {
    let mut out: Vec<(u64, i64)> = Vec::new();
    for r in rows {
        match out.last_mut() {
            Some((id, sum)) if *id == r.stack_id => *sum += r.value,
            _ => {
                if (out.len() + 1) * 2 > rows.len() {
                    return None;
                }
                out.push((r.stack_id, r.value));
            }
        }
    }
    Some(out)
}

/// Varints of the gaps between ids and of the zigzagged values: about ten
/// bytes per stack instead of sixteen.
pub fn encode(totals: &[(u64, i64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(totals.len() * 10 + 10);
    prost::encoding::encode_varint(totals.len() as u64, &mut out);
    let mut last = 0u64;
    for &(id, value) in totals {
        prost::encoding::encode_varint(id.wrapping_sub(last), &mut out);
        prost::encoding::encode_varint(((value << 1) ^ (value >> 63)) as u64, &mut out);
        last = id;
    }
    out
}

pub fn decode(mut bytes: &[u8]) -> Option<Totals> {
    let varint = |b: &mut &[u8]| prost::encoding::decode_varint(b).ok();
    let n = varint(&mut bytes)?;
    // Each entry takes at least two bytes: a corrupt count cannot allocate more
    // than the value holds.
    if n > bytes.len() as u64 / 2 {
        return None;
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut last = 0u64;
    for _ in 0..n {
        let id = last.wrapping_add(varint(&mut bytes)?);
        let zigzag = varint(&mut bytes)?;
        out.push((id, (zigzag >> 1) as i64 ^ -((zigzag & 1) as i64)));
        last = id;
    }
    bytes.is_empty().then(|| out.into())
}

/// Decoded totals by segment id, within a byte budget.
pub struct Cache(Mutex<Lru<u64, Totals>>);

impl Cache {
    pub fn new(budget_bytes: usize) -> Cache {
        Cache(Mutex::new(Lru::new(budget_bytes)))
    }

    pub fn get(&self, segment: u64) -> Option<Totals> {
        self.lock().get(&segment)
    }

    pub fn insert(&self, segment: u64, totals: Totals) {
        let bytes = totals.len() * size_of::<(u64, i64)>() + 64;
        self.lock().insert(segment, totals, bytes);
    }

    /// Drops the totals of segments that were deleted.
    pub fn forget(&self, segments: impl IntoIterator<Item = u64>) {
        let mut lru = self.lock();
        for id in segments {
            lru.remove(&id);
        }
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru<u64, Totals>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(stack_id: u64, series_id: u64, ts_ms: i64, value: i64) -> Row {
        Row { ts_ms, series_id, stack_id, value }
    }

    #[test]
    fn totals_sum_each_stack_and_round_trip() {
        let rows = [
            row(3, 1, 0, 5),
            row(3, 1, 10, -2),
            row(3, 2, 0, 7),
            row(u64::MAX, 1, 0, i64::MIN / 2),
            row(u64::MAX, 1, 10, 1),
        ];
        let totals = of(&rows).expect("two stacks in five rows");
        assert_eq!(totals, vec![(3, 10), (u64::MAX, i64::MIN / 2 + 1)]);
        let bytes = encode(&totals);
        assert_eq!(&*decode(&bytes).unwrap(), totals.as_slice());
        assert!(decode(&bytes[..bytes.len() - 1]).is_none(), "a cut value is refused");
        assert!(decode(&[0xff, 0xff, 0xff, 0x7f]).is_none(), "a count larger than the value is refused");
    }

    #[test]
    fn totals_are_kept_only_where_they_halve_the_rows() {
        assert!(of(&[row(1, 1, 0, 1), row(2, 1, 0, 1), row(2, 1, 10, 1)]).is_none());
        assert!(of(&[row(1, 1, 0, 1), row(1, 1, 10, 1), row(2, 1, 0, 1), row(2, 1, 10, 1)]).is_some());
    }
}
