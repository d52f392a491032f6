//! Change detection: which functions changed between a base and a target,
//! and which of those changes are larger than the noise between windows.
//!
//! Each side is cut into observations (runs of whole windows). In each one a
//! function's self and total value is measured per kind: as a share of that
//! observation's on-CPU time for on-CPU (so a change in load moves nothing),
//! and as time per second of wall time for every other kind (off-CPU waits
//! are latency: 20 ms more per request is a change whatever the load).
//! Welch's t-test compares the two sides' observations per (function, kind,
//! self/total); Benjamini-Hochberg holds the false-discovery rate over all of
//! them; and a change counts only if it is also large enough to matter
//! (functions too small for that on both sides are not tested at all).
//!
//! Tails are compared per off-CPU stack, on the histograms of its waits'
//! lengths over each whole side ([`tails`]): a stack whose p99 wait grew
//! while its total stayed is a latency regression no total shows.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, StudentsT};

use super::names::{NameId, Table};
use super::{round, Names};
use crate::store::{Aggregate, GroupBy, Selector, Store, StoreError};

/// Observations per side: enough for the test's power, few enough that each
/// side costs a few flame-graph scans.
const OBSERVATIONS: usize = 30;

/// One observation: what a run of windows summed to, and how long it was.
pub struct Observation {
    pub agg: Aggregate,
    pub span_ms: i64,
}

#[derive(Debug, Clone)]
pub struct ChangeOptions {
    /// False-discovery rate over all tested (function, kind, measure).
    pub alpha: f64,
    /// Smallest on-CPU share change reported as significant (0.01 = 1 point).
    pub min_share: f64,
    /// Smallest change of a rate, relative to the larger side, reported as
    /// significant; and at least `min_rate` (time per second) in absolute terms.
    pub min_relative: f64,
    pub min_rate: f64,
    pub limit: usize,
}

impl Default for ChangeOptions {
    fn default() -> Self {
        ChangeOptions {
            alpha: 0.05,
            min_share: 0.01,
            min_relative: 0.1,
            // 20 ms per second: below that, off-CPU time moves with whatever
            // else the host runs (preemption, other writers to the disk).
            min_rate: 0.02,
            limit: 100,
        }
    }
}

/// Whether a function's time grew or shrank. The order is the names': what
/// grew sorts first when reversed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Improvement,
    Regression,
}

/// Which time of a function was compared: its own, or with its callees'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    #[serde(rename = "self")]
    OwnTime,
    Total,
}

/// What was tested: the `share` of on-CPU time, or the `rate` (time per second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Share,
    Rate,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Change {
    pub function: String,
    /// `on-cpu` (CPU profiles of SDKs included) or the kind, e.g. `off-cpu:blocked-io`.
    pub kind: String,
    pub measure: Measure,
    pub metric: Metric,
    /// Share of the kind's time (on-CPU share for on-CPU), whole ranges.
    pub base_share: f64,
    pub target_share: f64,
    /// Cores (on-CPU) or threads (off-CPU) on average, whole ranges.
    pub base_rate: f64,
    pub target_rate: f64,
    pub delta_rate: f64,
    pub p: f64,
    /// p adjusted for the false-discovery rate (Benjamini-Hochberg).
    pub q: f64,
    pub significant: bool,
    pub direction: Direction,
    /// The tested metric per observation of each side, for sparklines.
    pub base_series: Vec<f64>,
    pub target_series: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Changes {
    pub observations: (usize, usize),
    /// (function, kind, measure) triples tested: those reaching the smallest
    /// change that counts (`min_share`, `min_rate`) on at least one side.
    pub tested: usize,
    /// Significant first: regressions, then improvements, each with self
    /// changes before totals and by the largest change of time per second;
    /// then the rest by q.
    pub changes: Vec<Change>,
    /// Off-CPU stacks whose wait-length tail moved, ordered like `changes`.
    pub tails: Vec<TailChange>,
}

/// An off-CPU stack whose p99 wait changed.
#[derive(Debug, Serialize, PartialEq)]
pub struct TailChange {
    /// The deepest frame that is not the kernel's.
    pub function: String,
    pub kind: String,
    /// Root first.
    pub stack: Vec<String>,
    pub base_p99_ns: u64,
    pub target_p99_ns: u64,
    /// Waits (weighted) on each side.
    pub base_waits: f64,
    pub target_waits: f64,
    /// Share of the side's waits beyond the other side's p99 bucket: about
    /// 1% or less when nothing changed.
    pub beyond_base_p99: f64,
    pub p: f64,
    pub q: f64,
    pub significant: bool,
    pub direction: Direction,
}

/// Fewest waits on each side for a stack's p99 to mean anything.
const MIN_TAIL_WAITS: f64 = 100.0;
/// Smallest growth (or shrink) of p99 that counts: two buckets of the
/// histograms' resolution, so an A/A pair's neighbouring buckets never do.
const MIN_TAIL_RATIO: f64 = 1.25;

/// Tail changes per off-CPU stack between the whole base and target ranges.
///
/// For a regression, the test is how many of the target's waits lie beyond the
/// bucket of the base's p99: at most 1% of them if both sides draw from one
/// distribution, so a one-sided binomial test against 1% gives p; an
/// improvement is the same with the sides swapped. Benjamini-Hochberg holds the
/// false-discovery rate over the stacks tested, and a change counts only if p99
/// also moved by [`MIN_TAIL_RATIO`].
pub fn tails(names: &Names, store: &dyn Store, base: &Selector, target: &Selector, opts: &ChangeOptions) -> Result<Vec<TailChange>, StoreError> {
    use profiler_pprof::waits::{bucket_of, upper_ns, Histogram, ONE};
    let b = super::waits::stack_waits(names, store, base, None, false)?;
    // With frames: the target's stacks name the stacks that changed.
    let t = super::waits::stack_waits(names, store, target, None, true)?;
    let waits = |h: &Histogram| h.count() as f64 / ONE as f64;
    // P(X >= k) for X ~ Binomial(n, 1%), on whole waits.
    let beyond = |other: &Histogram, this: &Histogram| -> (f64, f64) {
        let threshold = upper_ns(bucket_of(other.quantile_ns(0.99).unwrap_or(0)));
        let (over, all) = this.above(threshold);
        let (k, n) = ((over as f64 / ONE as f64).round() as u64, (all as f64 / ONE as f64).round() as u64);
        let p = match (k, Binomial::new(0.01, n)) {
            (0, _) | (_, Err(_)) => 1.0,
            (k, Ok(d)) => d.sf(k - 1),
        };
        (over as f64 / all.max(1) as f64, p)
    };
    let mut found = Vec::new();
    for ((kind, high), th) in &t.by_stack {
        let Some(bh) = b.by_stack.get(&(kind.clone(), *high)) else { continue };
        if waits(bh) < MIN_TAIL_WAITS || waits(th) < MIN_TAIL_WAITS {
            continue;
        }
        let (bp, tp) = (bh.quantile_ns(0.99).unwrap_or(0), th.quantile_ns(0.99).unwrap_or(0));
        let regression = tp >= bp;
        let (share, p) = if regression { beyond(bh, th) } else { beyond(th, bh) };
        let ratio = bp.max(tp) as f64 / bp.min(tp).max(1) as f64;
        found.push((kind.clone(), *high, bp, tp, waits(bh), waits(th), share, p, ratio >= MIN_TAIL_RATIO, regression));
    }
    let q = fdr(&found.iter().map(|f| f.7).collect::<Vec<_>>());
    let mut out = Vec::new();
    for (f, q) in found.into_iter().zip(q) {
        let (kind, high, bp, tp, bw, tw, share, p, large, regression) = f;
        let frames: Vec<String> = match t.stack_ids.get(&(kind.clone(), high)) {
            Some(&id) => store.stack(id)?.map_or_else(Vec::new, |f| f.iter().map(|n| n.to_string()).collect()),
            None => Vec::new(),
        };
        let function = frames.iter().rev().find(|f| !f.ends_with("_[k]")).or(frames.last()).cloned().unwrap_or_default();
        out.push(TailChange {
            function,
            kind,
            stack: frames,
            base_p99_ns: bp,
            target_p99_ns: tp,
            base_waits: round(bw),
            target_waits: round(tw),
            beyond_base_p99: round(share),
            p,
            q,
            significant: q < opts.alpha && large,
            direction: if regression { Direction::Regression } else { Direction::Improvement },
        });
    }
    out.sort_by(|a, b| {
        b.significant
            .cmp(&a.significant)
            .then_with(|| a.direction.cmp(&b.direction).reverse())
            .then_with(|| a.q.total_cmp(&b.q))
            .then_with(|| {
                let growth = |c: &TailChange| c.target_p99_ns.max(c.base_p99_ns) as f64 / c.target_p99_ns.min(c.base_p99_ns).max(1) as f64;
                growth(b).total_cmp(&growth(a))
            })
    });
    out.truncate(opts.limit);
    Ok(out)
}

/// On-CPU time of our agent and of SDK CPU profiles is one class; every
/// other kind is its own.
fn class_of(kind: &str) -> &str {
    profiler_pprof::kind::canonical(kind)
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Feature {
    class: u16,
    name: NameId,
    total: bool,
}

/// One side: per feature and class, the value of each observation.
struct Side {
    values: FxHashMap<Feature, Vec<i64>>,
    class_totals: Vec<Vec<i64>>,
    spans_s: Vec<f64>,
}

fn measure(table: &Table, store: &dyn Store, obs: &[Observation], classes: &mut Vec<String>) -> Result<Side, StoreError> {
    table.intern_stacks(store, obs.iter().flat_map(|o| o.agg.values().flat_map(|m| m.keys().copied())))?;
    let interned = table.read();
    let n = obs.len();
    let mut side = Side {
        values: FxHashMap::default(),
        class_totals: vec![vec![0; n]; classes.len()],
        spans_s: obs.iter().map(|o| o.span_ms as f64 / 1e3).collect(),
    };
    let mut seen: FxHashMap<NameId, usize> = FxHashMap::default();
    let mut stack_no = 0usize;
    for (i, o) in obs.iter().enumerate() {
        for (kind, m) in &o.agg {
            let class_name = class_of(kind);
            let class = match classes.iter().position(|c| c == class_name) {
                Some(c) => c,
                None => {
                    classes.push(class_name.to_owned());
                    classes.len() - 1
                }
            };
            if side.class_totals.len() <= class {
                side.class_totals.resize(class + 1, vec![0; n]);
            }
            for (&id, &v) in m.iter().filter(|(_, &v)| v != 0) {
                let Some(frames) = interned.stack(id) else { continue };
                side.class_totals[class][i] += v;
                stack_no += 1;
                let mut add = |name: NameId, total: bool| {
                    let key = Feature { class: class as u16, name, total };
                    side.values.entry(key).or_insert_with(|| vec![0; n])[i] += v;
                };
                for &f in frames {
                    // A recursive function counts once per stack.
                    if seen.insert(f, stack_no) != Some(stack_no) {
                        add(f, true);
                    }
                }
                if let Some(&leaf) = frames.last() {
                    add(leaf, false);
                }
            }
        }
    }
    Ok(side)
}

/// Welch's two-sided t-test; p = 1 when either side has fewer than two
/// observations, 0 when both sides are constant and differ.
fn welch(x: &[f64], y: &[f64]) -> f64 {
    let stats = |v: &[f64]| {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (n, mean, var)
    };
    if x.len() < 2 || y.len() < 2 {
        return 1.0;
    }
    let ((nx, mx, vx), (ny, my, vy)) = (stats(x), stats(y));
    let (sx, sy) = (vx / nx, vy / ny);
    let se = (sx + sy).sqrt();
    if se == 0.0 {
        return if mx == my { 1.0 } else { 0.0 };
    }
    let t = (mx - my).abs() / se;
    let df = (sx + sy).powi(2) / (sx * sx / (nx - 1.0) + sy * sy / (ny - 1.0));
    match StudentsT::new(0.0, 1.0, df) {
        Ok(d) => (2.0 * (1.0 - d.cdf(t))).clamp(0.0, 1.0),
        Err(_) => 1.0,
    }
}

/// Benjamini-Hochberg adjusted p-values, in the order of `p`.
fn fdr(p: &[f64]) -> Vec<f64> {
    let m = p.len() as f64;
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut q = vec![1.0; p.len()];
    let mut running = 1.0f64;
    for (rank, &i) in order.iter().enumerate().rev() {
        running = running.min(p[i] * m / (rank as f64 + 1.0));
        q[i] = running.min(1.0);
    }
    q
}

pub fn changes(
    names: &Names,
    store: &dyn Store,
    base: &[Observation],
    target: &[Observation],
    opts: &ChangeOptions,
) -> Result<Changes, StoreError> {
    let mut classes: Vec<String> = vec![profiler_pprof::kind::ON_CPU.into()];
    // One table for the whole comparison: its name ids stay valid.
    let table = names.table();
    let b = measure(&table, store, base, &mut classes)?;
    let t = measure(&table, store, target, &mut classes)?;
    let on_cpu = 0u16;
    let mut features: Vec<Feature> = b.values.keys().chain(t.values.keys()).copied().collect();
    features.sort_unstable();
    features.dedup();
    // Per feature: (share or rate per observation) on each side.
    let per_obs = |side: &Side, f: &Feature| -> Vec<f64> {
        let zeros;
        let v = match side.values.get(f) {
            Some(v) => v,
            None => {
                zeros = vec![0; side.spans_s.len()];
                &zeros
            }
        };
        let totals = side.class_totals.get(f.class as usize);
        v.iter()
            .enumerate()
            .filter_map(|(i, &x)| {
                if f.class == on_cpu {
                    // An observation without on-CPU time has no shares.
                    let total = totals.map_or(0, |t| t[i]);
                    (total > 0).then(|| x as f64 / total as f64)
                } else {
                    Some(x as f64 / 1e9 / side.spans_s[i].max(1e-9))
                }
            })
            .collect()
    };
    let whole = |side: &Side, f: &Feature| -> (f64, f64) {
        let v: i64 = side.values.get(f).map_or(0, |v| v.iter().sum());
        let total: i64 = side.class_totals.get(f.class as usize).map_or(0, |t| t.iter().sum());
        let span: f64 = side.spans_s.iter().sum();
        let share = if total > 0 { v as f64 / total as f64 } else { 0.0 };
        (share, v as f64 / 1e9 / span.max(1e-9))
    };
    // A function smaller than the smallest change that counts on both sides
    // can never count: leaving it out of the family keeps the FDR
    // correction from paying for hundreds of tiny kernel frames.
    features.retain(|f| {
        let ((bs, br), (ts, tr)) = (whole(&b, f), whole(&t, f));
        if f.class == on_cpu {
            bs.max(ts) >= opts.min_share
        } else {
            br.max(tr) >= opts.min_rate
        }
    });
    let observed: Vec<(Vec<f64>, Vec<f64>)> = features.iter().map(|f| (per_obs(&b, f), per_obs(&t, f))).collect();
    let p: Vec<f64> = observed.iter().map(|(base, target)| welch(target, base)).collect();
    let q = fdr(&p);
    let interned = table.read();
    let mut out: Vec<Change> = features
        .iter()
        .zip(observed)
        .zip(p.iter().zip(&q))
        .map(|((f, (base_series, target_series)), (&p, &q))| {
            let (base_share, base_rate) = whole(&b, f);
            let (target_share, target_rate) = whole(&t, f);
            let delta_rate = target_rate - base_rate;
            let large = if f.class == on_cpu {
                (target_share - base_share).abs() >= opts.min_share
            } else {
                delta_rate.abs() >= opts.min_rate
                    && delta_rate.abs() >= opts.min_relative * base_rate.max(target_rate)
            };
            let growth = if f.class == on_cpu { target_share - base_share } else { delta_rate };
            Change {
                function: interned.name(f.name).to_owned(),
                kind: classes[f.class as usize].clone(),
                measure: if f.total { Measure::Total } else { Measure::OwnTime },
                metric: if f.class == on_cpu { Metric::Share } else { Metric::Rate },
                base_share,
                target_share,
                base_rate,
                target_rate,
                delta_rate,
                p,
                q,
                significant: q < opts.alpha && large,
                direction: if growth >= 0.0 { Direction::Regression } else { Direction::Improvement },
                base_series: base_series.into_iter().map(round).collect(),
                target_series: target_series.into_iter().map(round).collect(),
            }
        })
        .collect();
    let tested = out.len();
    out.sort_by(|a, b| {
        b.significant
            .cmp(&a.significant)
            .then_with(|| {
                if !a.significant {
                    return a.q.total_cmp(&b.q);
                }
                // What grew is what a user hunts for; what shrank explains
                // it. Self changes say where time moved, totals only which
                // callers contain it, so they follow.
                a.direction
                    .cmp(&b.direction)
                    .reverse()
                    // Own time sorts before total.
                    .then_with(|| a.measure.cmp(&b.measure))
                    .then_with(|| b.delta_rate.abs().total_cmp(&a.delta_rate.abs()))
            })
            .then_with(|| a.function.cmp(&b.function))
    });
    out.truncate(opts.limit);
    Ok(Changes {
        observations: (base.len(), target.len()),
        tested,
        changes: out,
        tails: Vec::new(),
    })
}

/// A side of a comparison shorter than two windows: a bad request, not a
/// store fault.
#[derive(Debug, thiserror::Error)]
#[error("the {which} range must span at least two {window_ms} ms windows")]
pub struct TooShort {
    which: String,
    window_ms: i64,
}

/// Why a comparison has no answer.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error(transparent)]
    TooShort(#[from] TooShort),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Compares the `target` selection with the `base` one, each cut into
/// observations of whole `window_ms` windows. Both ranges must hold at least
/// two windows.
pub fn compare_ranges(
    store: &dyn Store,
    names: &Names,
    base: &Selector,
    target: &Selector,
    window_ms: i64,
    opts: &ChangeOptions,
) -> Result<Changes, CompareError> {
    let observe = |sel: &Selector, which: &str| -> Result<Vec<Observation>, CompareError> {
        let cuts = observations(sel.from_ms, sel.until_ms, window_ms, OBSERVATIONS)
            .ok_or(TooShort { which: which.to_owned(), window_ms })?;
        cuts.into_iter()
            .map(|(from_ms, until_ms)| {
                let part = Selector { from_ms, until_ms, ..sel.clone() };
                let agg = store.aggregate(&part, GroupBy::Stack)?;
                Ok(Observation { agg, span_ms: until_ms - from_ms })
            })
            .collect()
    };
    let base_obs = observe(base, "base")?;
    let target_obs = observe(target, "target")?;
    let mut found = changes(names, store, &base_obs, &target_obs, opts)?;
    found.tails = tails(names, store, base, target, opts)?;
    Ok(found)
}

/// Observation boundaries: at most `max` runs of whole windows over
/// `[from, until)`; None if the range holds fewer than two windows.
pub fn observations(from: i64, until: i64, window_ms: i64, max: usize) -> Option<Vec<(i64, i64)>> {
    let windows = (until - from) / window_ms;
    if windows < 2 {
        return None;
    }
    let per = (windows as usize).div_ceil(max.max(2)) as i64 * window_ms;
    let mut out = Vec::new();
    let mut a = from;
    while a < until {
        let b = (a + per).min(until);
        out.push((a, b));
        a = b;
    }
    // A sliver at the end is no observation of its own.
    if out.len() > 2 && out.last().is_some_and(|&(a, b)| b - a < per / 2) {
        let (_, end) = out.pop().expect("checked above");
        out.last_mut().expect("more than two").1 = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welch_separates_shifted_means_and_not_noise() {
        let a = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0];
        let b = [1.5, 1.6, 1.4, 1.55, 1.45, 1.5];
        assert!(welch(&a, &b) < 1e-6);
        let c = [1.02, 1.08, 0.92, 1.0, 0.97, 1.01];
        assert!(welch(&a, &c) > 0.5);
        assert_eq!(welch(&[1.0, 1.0], &[2.0, 2.0]), 0.0);
        assert_eq!(welch(&[1.0], &[2.0, 2.0]), 1.0);
    }

    #[test]
    fn fdr_adjusts_in_rank_order() {
        let q = fdr(&[0.01, 0.04, 0.03, 0.5]);
        // m = 4: 0.01*4/1 = 0.04; 0.03*4/2 = 0.06; 0.04*4/3 = 0.0533 -> 0.0533; 0.5.
        assert!((q[0] - 0.04).abs() < 1e-12);
        assert!((q[2] - 0.053_333).abs() < 1e-5);
        assert!((q[1] - 0.053_333).abs() < 1e-5);
        assert_eq!(q[3], 0.5);
    }

    #[test]
    fn observations_are_whole_windows() {
        assert_eq!(observations(0, 10_000, 10_000, 30), None);
        assert_eq!(observations(0, 20_000, 10_000, 30), Some(vec![(0, 10_000), (10_000, 20_000)]));
        let o = observations(0, 3_600_000, 10_000, 30).unwrap();
        assert_eq!(o.len(), 30);
        assert!(o.iter().all(|(a, b)| b - a == 120_000));
        let o = observations(0, 3_610_000, 10_000, 30).unwrap();
        assert_eq!(o.last().unwrap().1, 3_610_000);
        assert!(o.windows(2).all(|w| w[0].1 == w[1].0 && (w[0].1 - w[0].0) % 10_000 == 0));
    }
}
