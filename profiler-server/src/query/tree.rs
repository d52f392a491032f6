//! Merged call trees over interned frame names: the flame graph and diff
//! routes' work. Stacks are sorted as name-id slices and merged in one pass;
//! names become strings only for the nodes a response carries.

use std::sync::Arc;

use profiler_pprof::kind::root_frame;
use serde::Serialize;

use super::names::{Interned, NameId, Names, Table};
use crate::store::{Aggregate, Store, StoreResult};

/// No node: the end of a sibling list, or a node without a kind.
const NONE: u32 = u32::MAX;

struct Node {
    name: NameId,
    /// Index into `Tree::kinds` for the `[kind]` nodes below the root.
    kind: u32,
    // Slot 0 is the target (or only) profile, slot 1 the diff base.
    total: [i64; 2],
    self_: [i64; 2],
    first_child: u32,
    next_sibling: u32,
}

impl Node {
    fn new(name: NameId) -> Node {
        Node {
            name,
            kind: NONE,
            total: [0; 2],
            self_: [0; 2],
            first_child: NONE,
            next_sibling: NONE,
        }
    }

    fn size(&self) -> i64 {
        self.total[0].abs().max(self.total[1].abs())
    }
}

/// A merged call tree with up to two value slots.
pub struct Tree {
    table: Arc<Table>,
    kinds: Vec<String>,
    nodes: Vec<Node>,
}

impl Tree {
    /// With `kind_roots`, each kind hangs below the root under a `[kind]` node,
    /// so on- and off-CPU time never merge.
    pub fn build(names: &Names, store: &dyn Store, slots: &[&Aggregate], kind_roots: bool) -> StoreResult<Tree> {
        let slots = &slots[..slots.len().min(2)];
        let table = names.table();
        table.intern_stacks(
            store,
            slots.iter().flat_map(|agg| agg.values()).flat_map(|m| m.keys().copied()),
        )?;
        let root = table.intern_name("root");
        let kinds: Vec<String> = {
            let mut k: Vec<String> = slots.iter().flat_map(|agg| agg.keys().cloned()).collect();
            k.sort();
            k.dedup();
            k
        };
        let kind_names: Vec<NameId> = kinds.iter().map(|k| table.intern_name(&root_frame(k))).collect();
        let mut nodes = vec![Node::new(root)];
        {
            let interned = table.read();
            // Sorted stacks share each prefix with their neighbours, so one
            // pass that keeps the current path builds the merged tree with
            // slice comparisons instead of a hash lookup per frame.
            let mut stacks: Vec<(u32, &[NameId], usize, i64)> = Vec::new();
            for (slot, agg) in slots.iter().enumerate() {
                for (kind, values) in agg.iter() {
                    let k = kinds.binary_search(kind).expect("kinds of every slot") as u32;
                    let group = if kind_roots { k } else { 0 };
                    stacks.extend(values.iter().filter(|(_, &v)| v != 0).filter_map(|(&id, &v)| {
                        Some((group, interned.stack(id)?, slot, v))
                    }));
                }
            }
            stacks.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
            let mut path: Vec<u32> = Vec::new();
            let (mut prev_group, mut prev): (u32, &[NameId]) = (NONE, &[]);
            let mut base = 0;
            for (group, frames, slot, v) in stacks {
                let mut common = 0;
                if group != prev_group {
                    if kind_roots {
                        base = add_child(&mut nodes, 0, kind_names[group as usize]);
                        nodes[base as usize].kind = group;
                    }
                } else {
                    common = frames.iter().zip(prev).take_while(|(a, b)| a == b).count();
                }
                path.truncate(common);
                for &name in &frames[common..] {
                    let parent = path.last().copied().unwrap_or(base);
                    path.push(add_child(&mut nodes, parent, name));
                }
                (prev_group, prev) = (group, frames);
                nodes[0].total[slot] += v;
                if base != 0 {
                    nodes[base as usize].total[slot] += v;
                }
                for &n in &path {
                    nodes[n as usize].total[slot] += v;
                }
                nodes[path.last().copied().unwrap_or(base) as usize].self_[slot] += v;
            }
        }
        Ok(Tree { table, kinds, nodes })
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
        let root_size = self.nodes[0].size();
        let mut threshold = (root_size as f64 * min_share).ceil() as i64;
        if self.nodes.len() > max_nodes {
            // A child never outweighs its parent, so keeping every node at or
            // above the max_nodes-th largest size keeps a connected tree.
            let mut sizes: Vec<i64> = self.nodes.iter().map(Node::size).collect();
            let k = max_nodes.max(1) - 1;
            sizes.select_nth_unstable_by(k, |a, b| b.cmp(a));
            threshold = threshold.max(sizes[k]);
        }
        let interned = self.table.read();
        self.emit(&interned, 0, threshold.max(1), diff)
    }

    fn emit(&self, names: &Interned, i: u32, threshold: i64, diff: bool) -> FlameNode {
        let n = &self.nodes[i as usize];
        let mut kids = Vec::new();
        let mut c = n.first_child;
        while c != NONE {
            let cn = &self.nodes[c as usize];
            if cn.size() > 0 {
                kids.push(c);
            }
            c = cn.next_sibling;
        }
        kids.sort_by(|&a, &b| {
            names
                .name(self.nodes[a as usize].name)
                .cmp(names.name(self.nodes[b as usize].name))
        });
        let mut children = Vec::new();
        let mut pruned = ([0i64; 2], false);
        for c in kids {
            let cn = &self.nodes[c as usize];
            if cn.size() >= threshold {
                children.push(self.emit(names, c, threshold, diff));
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
            name: names.name(n.name).to_owned(),
            value: n.total[0],
            self_value: n.self_[0],
            kind: (n.kind != NONE).then(|| self.kinds[n.kind as usize].clone()),
            base: diff.then_some(n.total[1]),
            base_self: diff.then_some(n.self_[1]),
            children,
        }
    }
}

fn add_child(nodes: &mut Vec<Node>, parent: u32, name: NameId) -> u32 {
    let i = u32::try_from(nodes.len()).expect("fewer than 2^32 nodes");
    let mut node = Node::new(name);
    node.next_sibling = nodes[parent as usize].first_child;
    nodes[parent as usize].first_child = i;
    nodes.push(node);
    i
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{stack_id, Batch, EmbeddedStore, Frames, StoreOptions};

    /// A store holding the dictionary entries of `stacks`, and the aggregate
    /// (kind -> stack id -> value) of each slot.
    fn fixture(slots: &[&[(&str, &[&str], i64)]]) -> (tempfile::TempDir, EmbeddedStore, Vec<Aggregate>) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let mut aggs = Vec::new();
        for stacks in slots {
            let mut agg = Aggregate::new();
            for &(kind, frames, v) in *stacks {
                let frames: Frames = frames.iter().map(|&f| Arc::from(f)).collect();
                let id = stack_id(&frames);
                store
                    .append(Batch {
                        service: "s".into(),
                        kind: kind.into(),
                        stacks: vec![(id, frames)],
                        ..Batch::default()
                    })
                    .unwrap();
                *agg.entry(kind.to_string()).or_default().entry(id).or_insert(0) += v;
            }
            aggs.push(agg);
        }
        (dir, store, aggs)
    }

    fn child<'a>(n: &'a FlameNode, name: &str) -> &'a FlameNode {
        n.children.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no {name} under {}", n.name))
    }

    #[test]
    fn merges_shared_prefixes_per_kind_and_slot() {
        let target: &[(&str, &[&str], i64)] = &[
            ("on-cpu", &["a", "b", "c"], 5),
            ("on-cpu", &["a", "b"], 2),
            ("on-cpu", &["a", "d"], 3),
            ("off-cpu:sleep", &["a", "b"], 7),
            ("on-cpu", &["zero"], 0),
        ];
        let base: &[(&str, &[&str], i64)] = &[("on-cpu", &["a", "b", "c"], 1), ("on-cpu", &["x"], 4)];
        let (_dir, store, aggs) = fixture(&[target, base]);
        let names = Names::default();
        let tree = Tree::build(&names, &store, &[&aggs[0], &aggs[1]], true).unwrap();
        let json = tree.to_json(100, 0.0, true);
        assert_eq!((json.value, json.base), (17, Some(5)));
        let on = child(&json, "[on-cpu]");
        assert_eq!((on.kind.as_deref(), on.value, on.base), (Some("on-cpu"), 10, Some(5)));
        let b = child(child(on, "a"), "b");
        assert_eq!((b.value, b.self_value, b.base), (7, 2, Some(1)));
        assert_eq!((child(b, "c").value, child(b, "c").base_self), (5, Some(1)));
        assert_eq!((child(on, "x").value, child(on, "x").base), (0, Some(4)));
        let sleep = child(&json, "[off-cpu:sleep]");
        assert_eq!(child(child(sleep, "a"), "b").self_value, 7);
        assert!(on.children.iter().all(|c| c.name != "zero"));

        // Without kind roots the kinds merge into one tree.
        let merged = Tree::build(&names, &store, &[&aggs[0]], false).unwrap().to_json(100, 0.0, false);
        assert_eq!(child(child(&merged, "a"), "b").value, 14);
    }

    #[test]
    fn pruning_keeps_totals_exact_within_max_nodes() {
        let stacks: Vec<(String, i64)> = (0..50).map(|i| (format!("f{i:02}"), 1 + i as i64)).collect();
        let rows: Vec<(&str, Vec<&str>, i64)> =
            stacks.iter().map(|(f, v)| ("on-cpu", vec!["main", f.as_str()], *v)).collect();
        let rows: Vec<(&str, &[&str], i64)> = rows.iter().map(|(k, f, v)| (*k, f.as_slice(), *v)).collect();
        let (_dir, store, aggs) = fixture(&[&rows]);
        let json = Tree::build(&Names::default(), &store, &[&aggs[0]], false).unwrap().to_json(12, 0.0, false);
        let main = child(&json, "main");
        let pruned = child(main, "[pruned]");
        assert_eq!(main.children.len(), 10 + 1, "root, main and the 10 heaviest, plus [pruned]");
        assert_eq!(main.children.iter().map(|c| c.value).sum::<i64>(), main.value);
        assert_eq!(pruned.value, (1..=40).sum::<i64>());
        let names: Vec<&str> = main.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names[0], "f40", "children sorted by name: {names:?}");
    }
}
