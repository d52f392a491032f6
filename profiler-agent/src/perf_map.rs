//! Names of JIT-compiled and interpreted code from perf map files
//! (`/tmp/perf-PID.map`: one `START SIZE name` line per code region, in hex), written by
//! Node.js `--perf-basic-prof`, Python 3.12+ `-X perf` and JVM perf-map agents.
//!
//! A process in another mount and PID namespace writes the file in its own `/tmp`, named
//! with its own pid: it is read through `/proc/PID/root` under the namespaced pid. The
//! file only grows while the runtime runs, so it is re-read when its size changed.
//! (blazesym reads perf maps only for a live process under its host pid, hence this.)

use std::{
    collections::HashMap,
    fs::{self, File},
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

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
        let Some((file, size)) = locate(tgid) else { return };
        if self.maps.get(&tgid).is_some_and(|map| map.size == size) {
            return;
        }
        let Some(text) = read_lines(file, size) else { return };
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

/// The perf map of a process, open, and its size: in the process's own root under its
/// own pid first, then in ours (a process that already exited).
fn locate(tgid: u32) -> Option<(File, u64)> {
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
    candidates.into_iter().find_map(|path| open_trusted(&path, owner))
}

/// Opens `path` if it is a perf map `owner`'s process may have written: a regular file
/// of that user or root, at most [`MAX_FILE_BYTES`]; returns it with its size.
///
/// The checks are made on the open file (fstat), so the file checked is the file read;
/// the last component is not followed if it is a symlink (the process's user could link
/// to any file of root's), and the open does not wait for a writer if it is a FIFO.
fn open_trusted(path: &Path, owner: u32) -> Option<(File, u64)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).ok()?;
    let meta = file.metadata().ok()?;
    let trusted = meta.is_file() && (meta.uid() == owner || meta.uid() == 0) && meta.size() <= MAX_FILE_BYTES;
    trusted.then(|| (file, meta.size()))
}

/// The whole lines among the first `size` bytes of a perf map: the size checked when it
/// was opened bounds the read, however much the file grew since (the runtime appends;
/// the rest is read at the next refresh).
fn read_lines(file: File, size: u64) -> Option<String> {
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(size).read_to_end(&mut bytes).ok()?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |last| last + 1);
    bytes.truncate(whole);
    String::from_utf8(bytes).ok()
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

    /// A process's user can put a link, a FIFO or another user's file where the agent
    /// (root) looks for the perf map: none is read.
    #[test]
    fn only_a_regular_file_of_the_owner_or_root_is_opened() {
        use std::os::unix::fs::{chown, symlink};
        let dir = tempfile::tempdir().unwrap();
        let (user, other) = (65534, 4242);
        let roots = dir.path().join("roots.map");
        fs::write(&roots, "1000 10 secret\n").unwrap();
        let link = dir.path().join("perf-1.map");
        symlink(&roots, &link).unwrap();
        assert!(open_trusted(&link, user).is_none(), "followed a symlink to a file of root's");

        let others = dir.path().join("perf-2.map");
        fs::write(&others, "1000 10 theirs\n").unwrap();
        chown(&others, Some(other), None).unwrap();
        assert!(open_trusted(&others, user).is_none(), "trusted another user's file");

        let fifo = dir.path().join("perf-3.map");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        chown(&fifo, Some(user), None).unwrap();
        // Would block forever in open(2) without O_NONBLOCK, had the stat been a file's.
        assert!(open_trusted(&fifo, user).is_none(), "opened a FIFO");

        let own = dir.path().join("perf-4.map");
        fs::write(&own, "1000 10 mine\n").unwrap();
        chown(&own, Some(user), None).unwrap();
        assert_eq!(open_trusted(&own, user).map(|(_, size)| size), Some(13));
    }

    /// What is read is what was checked: a file that grows after it was opened is read up
    /// to the size seen then, in whole lines (the rest at the next refresh).
    #[test]
    fn reads_at_most_the_size_checked_in_whole_lines() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-5.map");
        fs::write(&path, "1000 10 first\n2000 10 sec").unwrap();
        let (file, size) = open_trusted(&path, 0).unwrap();
        fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&vec![b'x'; 1 << 20]).unwrap();
        let text = read_lines(file, size).unwrap();
        assert_eq!(text, "1000 10 first\n");
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
