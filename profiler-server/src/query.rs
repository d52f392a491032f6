//! Query stage: aggregates from the store become merged call trees, diffs,
//! top-function tables and timelines.
//!
//! Rows are first summed per stack id by the store; only the (few thousand)
//! distinct stacks are then expanded into frames here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use profiler_pprof::kind::root_frame;
use serde::Serialize;

use crate::store::{Aggregate, Frames, Store};

/// (kind, root-first frames, value) for every non-zero stack.
pub fn stacks(store: &dyn Store, agg: &Aggregate) -> Vec<(String, Frames, i64)> {
    let mut out = Vec::new();
    for (kind, m) in agg {
        for (&id, &v) in m {
            if v == 0 {
                continue;
            }
            match store.stack(id) {
                Some(frames) => out.push((kind.clone(), frames, v)),
                None => tracing::warn!(stack = id, "stack id missing from dictionary"),
            }
        }
    }
    out
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
    let marker: Frames = Arc::from(vec!["[truncated]".to_string()]);
    stacks.extend(rest.into_iter().map(|(kind, v)| (kind, marker.clone(), v)));
    (stacks, cut.len())
}

struct Node {
    name: String,
    kind: Option<String>,
    // Slot 0 is the target (or only) profile, slot 1 the diff base.
    total: [i64; 2],
    self_: [i64; 2],
    children: Vec<usize>,
}

/// A merged call tree with up to two value slots.
pub struct Tree {
    nodes: Vec<Node>,
    index: HashMap<(usize, String), usize>,
}

impl Tree {
    /// With `kind_roots`, each kind hangs below the root under a `[kind]` node,
    /// so on- and off-CPU time never merge.
    pub fn build(store: &dyn Store, slots: &[&Aggregate], kind_roots: bool) -> Tree {
        let mut t = Tree {
            nodes: vec![Node {
                name: "root".into(),
                kind: None,
                total: [0; 2],
                self_: [0; 2],
                children: vec![],
            }],
            index: HashMap::new(),
        };
        for (slot, agg) in slots.iter().enumerate().take(2) {
            for (kind, frames, v) in stacks(store, agg) {
                let mut at = 0;
                t.nodes[0].total[slot] += v;
                if kind_roots {
                    at = t.child(at, &root_frame(&kind));
                    t.nodes[at].kind = Some(kind.clone());
                    t.nodes[at].total[slot] += v;
                }
                for f in frames.iter() {
                    at = t.child(at, f);
                    t.nodes[at].total[slot] += v;
                }
                t.nodes[at].self_[slot] += v;
            }
        }
        t
    }

    fn child(&mut self, parent: usize, name: &str) -> usize {
        if let Some(&i) = self.index.get(&(parent, name.to_owned())) {
            return i;
        }
        let i = self.nodes.len();
        self.nodes.push(Node {
            name: name.to_owned(),
            kind: None,
            total: [0; 2],
            self_: [0; 2],
            children: vec![],
        });
        self.nodes[parent].children.push(i);
        self.index.insert((parent, name.to_owned()), i);
        i
    }

    pub fn total(&self, slot: usize) -> i64 {
        self.nodes[0].total[slot]
    }

    /// Multiplies slot 1 so its total equals slot 0's (diff normalization).
    pub fn normalize_base(&mut self) {
        let (t, b) = (self.total(0), self.total(1));
        if t == 0 || b == 0 {
            return;
        }
        let f = t as f64 / b as f64;
        for n in &mut self.nodes {
            n.total[1] = (n.total[1] as f64 * f).round() as i64;
            n.self_[1] = (n.self_[1] as f64 * f).round() as i64;
        }
    }

    /// d3-flame-graph style JSON. Nodes smaller than `min_share` of the root,
    /// or than needed to stay within about `max_nodes`, are folded into one
    /// `[pruned]` child per parent so totals stay exact.
    pub fn to_json(&self, max_nodes: usize, min_share: f64, diff: bool) -> FlameNode {
        let size = |n: &Node| n.total[0].abs().max(n.total[1].abs());
        let root_size = size(&self.nodes[0]);
        let mut threshold = (root_size as f64 * min_share).ceil() as i64;
        if self.nodes.len() > max_nodes {
            // A child never outweighs its parent, so keeping every node at or
            // above the max_nodes-th largest size keeps a connected tree.
            let mut sizes: Vec<i64> = self.nodes.iter().map(size).collect();
            let k = max_nodes.max(1) - 1;
            sizes.select_nth_unstable_by(k, |a, b| b.cmp(a));
            threshold = threshold.max(sizes[k]);
        }
        self.emit(0, threshold.max(1), diff, &size)
    }

    fn emit(&self, i: usize, threshold: i64, diff: bool, size: &dyn Fn(&Node) -> i64) -> FlameNode {
        let n = &self.nodes[i];
        let mut kids: Vec<usize> = n
            .children
            .iter()
            .copied()
            .filter(|&c| size(&self.nodes[c]) > 0)
            .collect();
        kids.sort_by(|a, b| self.nodes[*a].name.cmp(&self.nodes[*b].name));
        let mut children = Vec::new();
        let mut pruned = ([0i64; 2], false);
        for c in kids {
            let cn = &self.nodes[c];
            if size(cn) >= threshold {
                children.push(self.emit(c, threshold, diff, size));
            } else {
                pruned.0[0] += cn.total[0];
                pruned.0[1] += cn.total[1];
                pruned.1 = true;
            }
        }
        if pruned.1 {
            children.push(FlameNode {
                name: "[pruned]".into(),
                value: pruned.0[0],
                self_value: pruned.0[0],
                kind: None,
                base: diff.then_some(pruned.0[1]),
                base_self: diff.then_some(pruned.0[1]),
                children: vec![],
            });
        }
        FlameNode {
            name: n.name.clone(),
            value: n.total[0],
            self_value: n.self_[0],
            kind: n.kind.clone(),
            base: diff.then_some(n.total[1]),
            base_self: diff.then_some(n.self_[1]),
            children,
        }
    }
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct FlameNode {
    pub name: String,
    /// Total (inclusive) value; in a diff, of the target range.
    pub value: i64,
    #[serde(rename = "self")]
    pub self_value: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kind: Option<String>,
    /// Diff only: inclusive value in the base range.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub base: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub base_self: Option<i64>,
    pub children: Vec<FlameNode>,
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
pub fn top(store: &dyn Store, agg: &Aggregate, by_total: bool, limit: usize) -> Vec<TopEntry> {
    let mut m: HashMap<&str, (i64, i64)> = HashMap::new();
    let stacks = stacks(store, agg);
    let mut seen = HashSet::new();
    for (_, frames, v) in &stacks {
        seen.clear();
        for f in frames.iter() {
            if seen.insert(f.as_str()) {
                m.entry(f).or_default().1 += v;
            }
        }
        if let Some(leaf) = frames.last() {
            m.entry(leaf).or_default().0 += v;
        }
    }
    let mut out: Vec<TopEntry> = m
        .into_iter()
        .map(|(name, (s, t))| TopEntry {
            name: name.to_owned(),
            self_value: s,
            total: t,
        })
        .collect();
    out.sort_by(|a, b| {
        let key = |e: &TopEntry| if by_total { e.total } else { e.self_value };
        key(b).cmp(&key(a)).then_with(|| a.name.cmp(&b.name))
    });
    out.truncate(limit);
    out
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
