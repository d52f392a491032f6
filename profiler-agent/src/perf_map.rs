//! Names of JIT-compiled and interpreted code from perf map files
//! (`/tmp/perf-PID.map`: one `START SIZE name` line per code region, in hex), written by
//! Node.js `--perf-basic-prof`, Python 3.12+ `-X perf` and JVM perf-map agents.
//!
//! A process in another mount and PID namespace writes the file in its own `/tmp`, named
//! with its own pid: it is read through `/proc/PID/root` under the namespaced pid. The
//! file only grows while the runtime runs, so it is re-read when its size changed.
//! (blazesym reads perf maps only for a live process under its host pid, hence this.)

use std::{collections::HashMap, fs, os::unix::fs::MetadataExt as _, path::PathBuf, sync::Arc};

/// Regions kept per process; a runtime that compiles without end is cut here.
const MAX_REGIONS: usize = 500_000;
/// Processes whose perf map is kept parsed.
const MAX_PROCESSES: usize = 64;
/// Larger files are not read (a runtime that never stops compiling, or a hostile file).
const MAX_FILE_BYTES: u64 = 64 << 20;

#[derive(Default)]
struct PerfMap {
    /// (start, end, name), sorted by start.
    regions: Vec<(u64, u64, Arc<str>)>,
    size: u64,
}

impl PerfMap {
    fn lookup(&self, addr: u64) -> Option<&Arc<str>> {
        let index = self.regions.partition_point(|(start, _, _)| *start <= addr);
        let (_, end, name) = self.regions.get(index.checked_sub(1)?)?;
        (addr < *end).then_some(name)
    }
}

#[derive(Default)]
pub struct PerfMaps {
    maps: HashMap<u32, PerfMap>,
}

impl PerfMaps {
    /// Loads or refreshes the perf map of `tgid`, if it has one.
    pub fn load(&mut self, tgid: u32) {
        let Some((path, size)) = locate(tgid) else { return };
        if self.maps.get(&tgid).is_some_and(|map| map.size == size) {
            return;
        }
        let Ok(text) = fs::read_to_string(&path) else { return };
        let mut regions: Vec<(u64, u64, Arc<str>)> = text.lines().filter_map(parse_line).take(MAX_REGIONS).collect();
        regions.sort_by_key(|(start, _, _)| *start);
        if self.maps.len() >= MAX_PROCESSES && !self.maps.contains_key(&tgid) {
            self.maps.clear();
        }
        self.maps.insert(tgid, PerfMap { regions, size });
    }

    pub fn lookup(&self, tgid: u32, addr: u64) -> Option<Arc<str>> {
        self.maps.get(&tgid)?.lookup(addr).cloned()
    }
}

/// The perf map of a process and its size: in the process's own root under its own pid
/// first, then in ours (a process that already exited).
fn locate(tgid: u32) -> Option<(PathBuf, u64)> {
    let namespaced = fs::read_to_string(format!("/proc/{tgid}/status")).ok().and_then(|status| {
        let line = status.lines().find(|line| line.starts_with("NSpid:"))?;
        line.split_whitespace().last()?.parse::<u32>().ok()
    });
    let mut candidates = Vec::new();
    if let Some(nspid) = namespaced {
        candidates.push(PathBuf::from(format!("/proc/{tgid}/root/tmp/perf-{nspid}.map")));
    }
    candidates.push(PathBuf::from(format!("/tmp/perf-{tgid}.map")));
    // /tmp is world-writable: only a file of the process's own user (or root) is trusted
    // to name the process's code. Without /proc/PID (exited) that user is unknown.
    let owner = fs::metadata(format!("/proc/{tgid}")).ok()?.uid();
    candidates.into_iter().find_map(|path| {
        let meta = fs::metadata(&path).ok()?;
        let trusted = meta.is_file() && (meta.uid() == owner || meta.uid() == 0) && meta.size() <= MAX_FILE_BYTES;
        trusted.then(|| (path, meta.size()))
    })
}

fn parse_line(line: &str) -> Option<(u64, u64, Arc<str>)> {
    let mut fields = line.splitn(3, ' ');
    let start = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
    let size = u64::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
    let name = fields.next()?.trim();
    (!name.is_empty() && size > 0).then(|| (start, start.saturating_add(size), Arc::from(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_and_python_lines() {
        assert_eq!(
            parse_line("3a0c1e04a0 6c LazyCompile:*fib /app/fib.js:1").map(|(s, e, n)| (s, e, n.to_string())),
            Some((0x3a0c1e04a0, 0x3a0c1e050c, "LazyCompile:*fib /app/fib.js:1".to_string()))
        );
        assert_eq!(
            parse_line("0x7f3b2c0 0x10 py::work:/app/x.py").map(|(s, e, _)| (s, e)),
            Some((0x7f3b2c0, 0x7f3b2d0))
        );
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(parse_line("10 0 empty"), None);
    }

    #[test]
    fn looks_up_inside_regions_only() {
        let map = PerfMap {
            regions: vec![(0x100, 0x110, Arc::from("a")), (0x200, 0x280, Arc::from("b"))],
            size: 0,
        };
        assert_eq!(map.lookup(0x105).map(|n| n.to_string()), Some("a".into()));
        assert_eq!(map.lookup(0x110), None);
        assert_eq!(map.lookup(0x27f).map(|n| n.to_string()), Some("b".into()));
        assert_eq!(map.lookup(0x50), None);
    }
}
