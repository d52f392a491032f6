//! Wait-duration percentiles: the histograms of individual off-CPU waits
//! (`profiler_pprof::waits`), merged over a range, a label filter, some
//! off-CPU kinds and the stacks with a frame matching a pattern.
//!
//! The store keeps a histogram as rows of the kind `waits:<kind>`, keyed by
//! the stack id with the bucket in its low bits; a row finds its stack by the
//! high bits among the stacks of the same kind, range and filter.

use std::collections::{BTreeMap, HashMap, HashSet};

use profiler_pprof::kind::{self, Kind, WaitReason, OFF_CPU};
use profiler_pprof::waits::{self, Histogram};
use regex::Regex;
use rustc_hash::FxHashMap;
use serde::Serialize;

use std::sync::Arc;

use super::names::{NameId, Names, Table};
use crate::store::{GroupBy, Selector, Store, StoreResult};

/// The off-CPU kinds a selector asks for: those it names, or every kind
/// the agent records.
fn off_cpu_kinds(sel: &Selector) -> Vec<String> {
    match &sel.kinds {
        Some(kinds) => kinds.iter().filter(|k| kind::off_cpu_reason(k).is_some()).cloned().collect(),
        None => WaitReason::ALL.into_iter().map(|r| Kind::OffCpu(r).name()).chain([OFF_CPU.to_string()]).collect(),
    }
}

/// Each selected stack's histogram: (profile kind, stack id's high bits) ->
/// histogram, and each stack's root-first frames (as interned names) when a
/// pattern or a per-function answer needs them.
pub struct StackWaits {
    pub by_stack: HashMap<(String, u64), Histogram>,
    /// (kind, high bits) -> stack id, for the stacks with frames.
    pub stack_ids: HashMap<(String, u64), u64>,
    /// The names those stacks were interned in.
    table: Arc<Table>,
}

/// Reads the histograms of the off-CPU stacks `sel` selects. With `frame`, only
/// the stacks with a frame matching it count; `with_frames` also resolves every
/// stack (for per-function answers).
pub fn stack_waits(names: &Names, store: &dyn Store, sel: &Selector, frame: Option<&Regex>, with_frames: bool) -> StoreResult<StackWaits> {
    let kinds = off_cpu_kinds(sel);
    let mut stack_ids: HashMap<(String, u64), u64> = HashMap::new();
    let table = names.table();
    if frame.is_some() || with_frames {
        let totals = store.aggregate(&Selector { kinds: Some(kinds.clone()), ..sel.clone() }, GroupBy::Stack)?;
        table.intern_stacks(store, totals.values().flat_map(|m| m.keys().copied()))?;
        let interned = table.read();
        let mut matches: FxHashMap<NameId, bool> = FxHashMap::default();
        for (kind, stacks) in &totals {
            for &id in stacks.keys() {
                let Some(frames) = interned.stack(id) else { continue };
                let wanted = frame.is_none_or(|re| {
                    frames.iter().any(|&f| *matches.entry(f).or_insert_with(|| re.is_match(interned.name(f))))
                });
                if wanted {
                    stack_ids.insert((kind.clone(), waits::split_row_id(id).0), id);
                }
            }
        }
    }
    let waits_kinds: Vec<String> = kinds.iter().map(|k| waits::waits_kind(k)).collect();
    let rows = store.aggregate(&Selector { kinds: Some(waits_kinds), ..sel.clone() }, GroupBy::Stack)?;
    let mut by_stack: HashMap<(String, u64), Histogram> = HashMap::new();
    for (waits_kind, buckets) in rows {
        let Some(kind) = waits::profile_kind(&waits_kind) else { continue };
        for (row_id, count) in buckets {
            let (high, bucket) = waits::split_row_id(row_id);
            let key = (kind.to_owned(), high);
            if count <= 0 || (frame.is_some() && !stack_ids.contains_key(&key)) {
                continue;
            }
            by_stack.entry(key).or_default().add(bucket, count as u64);
        }
    }
    Ok(StackWaits { by_stack, stack_ids, table })
}

/// Percentiles and buckets of a histogram, in nanoseconds; counts in waits
/// (weighted: a wait recorded with probability p counts 1/p).
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    pub count: f64,
    pub p50_ns: Option<u64>,
    pub p95_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub max_ns: Option<u64>,
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Bucket {
    /// The bucket holds waits up to this long (and longer than the previous one's).
    pub le_ns: u64,
    pub count: f64,
}

pub fn summary(h: &Histogram) -> Summary {
    let waits = |count: u64| super::round(count as f64 / waits::ONE as f64);
    Summary {
        count: waits(h.count()),
        p50_ns: h.quantile_ns(0.50),
        p95_ns: h.quantile_ns(0.95),
        p99_ns: h.quantile_ns(0.99),
        max_ns: h.max_ns(),
        buckets: h.buckets().map(|(i, c)| Bucket { le_ns: waits::upper_ns(i), count: waits(c) }).collect(),
    }
}

/// One histogram of everything `stack_waits` found.
pub fn merged(found: &StackWaits) -> Histogram {
    let mut all = Histogram::default();
    for h in found.by_stack.values() {
        all.merge(h);
    }
    all
}

/// A function's waits: the merged histograms of every stack it is on (once per
/// stack, however often it recurses).
#[derive(Debug, Serialize, PartialEq)]
pub struct FunctionWaits {
    pub name: String,
    #[serde(flatten)]
    pub waits: Summary,
}

/// Functions by their p99 wait, longest first (ties by count), at most `limit`.
pub fn by_function(found: &StackWaits, limit: usize) -> Vec<FunctionWaits> {
    let interned = found.table.read();
    let mut per: BTreeMap<NameId, Histogram> = BTreeMap::new();
    for (key, h) in &found.by_stack {
        let Some(frames) = found.stack_ids.get(key).and_then(|&id| interned.stack(id)) else { continue };
        let distinct: HashSet<NameId> = frames.iter().copied().collect();
        for f in distinct {
            per.entry(f).or_default().merge(h);
        }
    }
    let mut out: Vec<FunctionWaits> =
        per.into_iter().map(|(f, h)| FunctionWaits { name: interned.name(f).to_owned(), waits: summary(&h) }).collect();
    out.sort_by(|a, b| {
        b.waits.p99_ns.cmp(&a.waits.p99_ns).then(b.waits.count.total_cmp(&a.waits.count)).then_with(|| a.name.cmp(&b.name))
    });
    out.truncate(limit);
    out
}
