//! Query stage: aggregates from the store become merged call trees, diffs,
//! top-function tables and timelines.
//!
//! Rows are first summed per stack id by the store; only the distinct stacks
//! are then expanded here: into interned frame names ([`names`]) for trees
//! ([`tree`]) and top tables, into strings for exports. The fleet overview
//! ([`overview`]) needs no stacks at all; change detection ([`changes`])
//! compares functions between two sides, observation by observation.

pub mod changes;
mod names;
mod overview;
mod tree;
pub mod requests;
pub mod waits;

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::Serialize;

pub use names::Names;
pub use overview::{fleet, Fleet};
pub use tree::{FlameNode, Tree};

use crate::store::{Aggregate, Frames, Store, StoreResult};

/// (kind, root-first frames, value) for every non-zero stack.
pub fn stacks(store: &dyn Store, agg: &Aggregate) -> StoreResult<Vec<(String, Frames, i64)>> {
    let mut out = Vec::new();
    for (kind, m) in agg {
        for (&id, &v) in m {
            if v == 0 {
                continue;
            }
            match store.stack(id)? {
                Some(frames) => out.push((kind.clone(), frames, v)),
                None => tracing::warn!(stack = id, "stack id missing from dictionary"),
            }
        }
    }
    Ok(out)
}

/// Keeps the `max` heaviest stacks; the others are summed per kind into one
/// `[truncated]` stack, so totals stay exact. Returns how many were merged.
pub fn heaviest(
    mut stacks: Vec<(String, Frames, i64)>,
    max: usize,
) -> (Vec<(String, Frames, i64)>, usize) {
    if stacks.len() <= max {
        return (stacks, 0);
    }
    stacks.sort_unstable_by_key(|(_, _, v)| std::cmp::Reverse(v.unsigned_abs()));
    let cut = stacks.split_off(max);
    let mut rest: BTreeMap<String, i64> = BTreeMap::new();
    for (kind, _, v) in &cut {
        *rest.entry(kind.clone()).or_insert(0) += v;
    }
    let marker: Frames = Arc::from([Arc::from("[truncated]")]);
    stacks.extend(rest.into_iter().map(|(kind, v)| (kind, marker.clone(), v)));
    (stacks, cut.len())
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TopEntry {
    pub name: String,
    #[serde(rename = "self")]
    pub self_value: i64,
    pub total: i64,
}

/// Functions ranked by self or total value; a recursive function counts once
/// per stack towards its total.
pub fn top(names: &Names, store: &dyn Store, agg: &Aggregate, by_total: bool, limit: usize) -> StoreResult<Vec<TopEntry>> {
    let table = names.table();
    table.intern_stacks(store, agg.values().flat_map(|m| m.keys().copied()))?;
    let interned = table.read();
    // name -> (self, total, index of the last stack that counted its total)
    let mut m: FxHashMap<names::NameId, (i64, i64, usize)> = FxHashMap::default();
    let stacks = agg.values().flat_map(|m| m.iter()).filter(|(_, &v)| v != 0);
    for (n, (&id, &v)) in stacks.enumerate() {
        let Some(frames) = interned.stack(id) else { continue };
        for &f in frames {
            let e = m.entry(f).or_insert((0, 0, usize::MAX));
            if e.2 != n {
                e.1 += v;
                e.2 = n;
            }
        }
        if let Some(&leaf) = frames.last() {
            m.entry(leaf).or_default().0 += v;
        }
    }
    let key = |&(s, t, _): &(i64, i64, usize)| if by_total { t } else { s };
    let mut ranked: Vec<(names::NameId, (i64, i64, usize))> = m.into_iter().collect();
    ranked.sort_unstable_by(|a, b| {
        key(&b.1)
            .cmp(&key(&a.1))
            .then_with(|| interned.name(a.0).cmp(interned.name(b.0)))
    });
    ranked.truncate(limit);
    Ok(ranked
        .into_iter()
        .map(|(name, (s, t, _))| TopEntry {
            name: interned.name(name).to_owned(),
            self_value: s,
            total: t,
        })
        .collect())
}

/// Six significant digits: more than a table or a sparkline shows, and the
/// JSON of a thousand rows stays small.
pub(crate) fn round(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return 0.0;
    }
    let scale = 10f64.powi(5 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

#[derive(Debug, Serialize)]
pub struct Timeline {
    pub from: i64,
    pub until: i64,
    pub step: i64,
    /// kind -> one value per step starting at `from`.
    pub series: BTreeMap<String, Vec<i64>>,
}

pub fn timeline(agg: &Aggregate, from: i64, until: i64, step: i64) -> Timeline {
    let n = ((until - from) + step - 1).div_euclid(step).max(0) as usize;
    let series = agg
        .iter()
        .map(|(kind, m)| {
            let mut v = vec![0i64; n];
            for (&bucket, &val) in m {
                let i = (bucket as i64 - from).div_euclid(step);
                if (0..n as i64).contains(&i) {
                    v[i as usize] += val;
                }
            }
            (kind.clone(), v)
        })
        .collect();
    Timeline {
        from,
        until,
        step,
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_six_digits() {
        assert_eq!(round(1.23456789), 1.23457);
        assert_eq!(round(0.000123456789), 0.000123457);
        assert_eq!(round(0.0), 0.0);
    }
}
