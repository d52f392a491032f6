//! `cargo xtask layers`: the top-level modules of each library crate import each other
//! one way only. A module's imports are the `crate::name` paths in its files (in `use`
//! lines, braces included, and inline), comments aside; any strongly connected set of
//! more than one module is a cycle and fails the check.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// The crates whose modules must form layers.
const CRATES: [&str; 3] = ["profiler-server", "profiler-agent", "profiler-pprof"];

pub fn run(root: &Path) -> anyhow::Result<()> {
    let mut cycles = Vec::new();
    for krate in CRATES {
        let graph = module_graph(&root.join(krate).join("src"))?;
        for cycle in strongly_connected(&graph).into_iter().filter(|set| set.len() > 1) {
            let edges: Vec<String> = cycle
                .iter()
                .flat_map(|from| graph[from].iter().filter(|to| cycle.contains(*to)).map(move |to| format!("{from} → {to}")))
                .collect();
            cycles.push(format!("{krate}: {} ({})", cycle.join(", "), edges.join("; ")));
        }
        let edges: usize = graph.values().map(BTreeSet::len).sum();
        println!("{krate}: {} modules, {edges} imports between them", graph.len());
    }
    if !cycles.is_empty() {
        bail!("import cycles between top-level modules:\n  {}", cycles.join("\n  "));
    }
    println!("no import cycle between top-level modules");
    Ok(())
}

/// Each top-level module (a file or directory under `src`, but `lib` and `main`) and the
/// top-level modules it names.
fn module_graph(src: &Path) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else { continue };
        if path.is_dir() {
            files.entry(stem).or_default().extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") && stem != "lib" && stem != "main" {
            files.entry(stem).or_default().push(path);
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (module, paths) in &files {
        let mut imports = BTreeSet::new();
        for path in paths {
            let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            for name in crate_paths(&strip_comments(&text)) {
                if modules.contains(&name) && &name != module {
                    imports.insert(name);
                }
            }
        }
        graph.insert(module.clone(), imports);
    }
    Ok(graph)
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}

/// The text without `//` comments (doc comments name modules in links, which is no
/// import). String literals are left alone: none of ours spells `crate::`.
fn strip_comments(text: &str) -> String {
    text.lines().map(|line| line.split_once("//").map_or(line, |(code, _)| code)).collect::<Vec<_>>().join("\n")
}

/// The first segment of every path that starts with `crate::`; for `crate::{a, b::c}`
/// each item's first segment, at any depth of braces.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            rest = &group[i..];
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if depth == 1 && item_start && (c.is_alphanumeric() || c == '_') => {
                        out.push(identifier(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(identifier(rest));
        }
    }
    out
}

fn identifier(text: &str) -> String {
    text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// Tarjan's strongly connected components, each sorted.
fn strongly_connected(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.graph[v] {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut set = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                set.push(w.to_string());
                if w == v {
                    break;
                }
            }
            set.sort();
            s.out.push(set);
        }
    }
    let mut s = State { graph, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on_stack: BTreeSet::new(), out: Vec::new() };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_braces_and_inline_are_found_and_cycles_reported() {
        let code = "use crate::{a::{X, Y}, b, c::Z};\nfn f() { crate::d::g(); my_crate::e::h(); }";
        assert_eq!(crate_paths(code), ["a", "b", "c", "d"]);
        assert_eq!(strip_comments("x // crate::a\n/// [`crate::b`]"), "x \n");
        let graph: BTreeMap<String, BTreeSet<String>> = [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
            .collect();
        let cycles: Vec<Vec<String>> = strongly_connected(&graph).into_iter().filter(|c| c.len() > 1).collect();
        assert_eq!(cycles, [vec!["a".to_string(), "b".into(), "c".into()]]);
    }
}
