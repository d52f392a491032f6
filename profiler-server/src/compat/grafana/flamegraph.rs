//! A merged call tree in Pyroscope's flame graph encoding
//! (`querier.v1.FlameGraph`), the one Grafana turns back into a tree.
//!
//! `names[0]` is the root, named `total`. `levels[d]` holds the bars at depth
//! d from left to right, four numbers each: x offset, total, self, index into
//! `names`. A bar's self part comes first and its children follow it in
//! order, so a child lies within its parent; each x offset is stored relative
//! to the end of the previous bar on the same level (whatever its parent).

use std::collections::HashMap;

use profiler_pprof::pyroscope::querier::v1::{FlameGraph, Level};

use crate::query::FlameNode;

const ROOT_NAME: &str = "total";

pub fn encode(root: &FlameNode) -> FlameGraph {
    let mut names = vec![ROOT_NAME.to_owned()];
    let mut index: HashMap<&str, i64> = HashMap::from([(ROOT_NAME, 0)]);
    let mut levels: Vec<Vec<i64>> = Vec::new();
    let mut max_self = 0;
    // Depth first, children left to right: each level fills left to right.
    let mut todo = vec![(root, 0usize, 0i64)];
    while let Some((node, depth, x)) = todo.pop() {
        let name = if depth == 0 {
            0
        } else {
            *index.entry(&node.name).or_insert_with(|| {
                names.push(node.name.clone());
                names.len() as i64 - 1
            })
        };
        if levels.len() == depth {
            levels.push(Vec::new());
        }
        levels[depth].extend([x, node.value, node.self_value, name]);
        max_self = max_self.max(node.self_value);
        let mut child_x = x + node.self_value;
        let first_child = todo.len();
        for child in &node.children {
            todo.push((child, depth + 1, child_x));
            child_x += child.value;
        }
        todo[first_child..].reverse();
    }
    for level in &mut levels {
        let mut previous_end = 0;
        for bar in level.chunks_exact_mut(4) {
            let start = bar[0];
            bar[0] = start - previous_end;
            previous_end = start + bar[1];
        }
    }
    FlameGraph {
        names,
        levels: levels.into_iter().map(|values| Level { values }).collect(),
        total: root.value,
        max_self,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, self_value: i64, children: Vec<FlameNode>) -> FlameNode {
        let value = self_value + children.iter().map(|c| c.value).sum::<i64>();
        FlameNode {
            name: name.into(),
            value,
            self_value,
            kind: None,
            base: None,
            base_self: None,
            children,
        }
    }

    #[test]
    fn levels_are_delta_encoded_quadruples() {
        // root(0) -> main(5) -> [api(0) -> [db 20, handle 30], gc 5]
        let tree = node(
            "root",
            0,
            vec![node(
                "main",
                5,
                vec![
                    node(
                        "api",
                        0,
                        vec![node("db", 20, vec![]), node("handle", 30, vec![])],
                    ),
                    node("gc", 5, vec![]),
                ],
            )],
        );
        let fg = encode(&tree);
        assert_eq!(fg.names, ["total", "main", "api", "db", "handle", "gc"]);
        let levels: Vec<&[i64]> = fg.levels.iter().map(|l| l.values.as_slice()).collect();
        assert_eq!(
            levels,
            [
                &[0, 60, 0, 0][..],
                &[0, 60, 5, 1],
                // api at x=5 (after main's self), gc at x=55: 0 after api's end.
                &[5, 50, 0, 2, 0, 5, 5, 5],
                &[5, 20, 20, 3, 0, 30, 30, 4],
            ]
        );
        assert_eq!((fg.total, fg.max_self), (60, 30));
    }

    #[test]
    fn an_empty_tree_is_one_empty_root() {
        let fg = encode(&node("root", 0, vec![]));
        assert_eq!(fg.names, ["total"]);
        assert_eq!(fg.levels.len(), 1);
        assert_eq!(fg.levels[0].values, [0, 0, 0, 0]);
    }
}
