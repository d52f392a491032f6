//! Bounded on-disk queue of windows the server has not acknowledged yet. Files are named
//! by a sequence number, so replay is in order and survives agent restarts. Past the
//! size limit the oldest windows are dropped, and counted.
//!
//! A file's name also carries how often the server failed that payload and when an
//! attempt of it went unanswered (`SEQ-FAILURES-SINCE.window`, renamed when either
//! changes), so the count that decides whether it is poison, and the age the server
//! judges a retry by, survive restarts too.

use std::{
    collections::VecDeque,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::ship::Payload;

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Oldest first.
    entries: VecDeque<Entry>,
    bytes: u64,
    next_seq: u64,
    dropped: u64,
}

const SUFFIX: &str = ".window";

#[derive(Clone, Copy, Debug)]
struct Entry {
    seq: u64,
    size: u64,
    /// The payload's value, so drops can be accounted in profiled time.
    value: u64,
    failures: u32,
    /// When (unix ms) an attempt went unanswered: the server may have stored it then.
    unanswered_since: Option<u64>,
}

/// A payload read back from the spool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spooled {
    pub seq: u64,
    /// Times the server failed it, as counted by [`Spool::count_failure`].
    pub failures: u32,
    /// See [`Spool::mark_unanswered`].
    pub unanswered_since: Option<u64>,
    pub payload: Payload,
}

/// Windows dropped to make room for a new one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub profiles: u64,
    pub value: u64,
}

impl Spool {
    /// Opens (creating) the spool directory and picks up windows left by an earlier run.
    pub fn open(dir: &Path, max_bytes: u64) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating spool directory {}", dir.display()))?;
        let mut entries = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some((seq, failures, unanswered_since)) = name.strip_suffix(SUFFIX).and_then(parse_name) {
                let raw = fs::read(entry.path())?;
                let value = Payload::decode(&raw).map_or(0, |p| p.value);
                entries.push(Entry { seq, size: raw.len() as u64, value, failures, unanswered_since });
            } else if name.ends_with(".tmp") {
                // A write interrupted by a crash: never acknowledged as spooled.
                let _ = fs::remove_file(entry.path());
            }
        }
        entries.sort_unstable_by_key(|e| e.seq);
        let bytes = entries.iter().map(|e| e.size).sum();
        let next_seq = entries.last().map_or(0, |e| e.seq + 1);
        Ok(Self { dir: dir.to_path_buf(), max_bytes, entries: entries.into(), bytes, next_seq, dropped: 0 })
    }

    fn path(&self, entry: &Entry) -> PathBuf {
        match (entry.failures, entry.unanswered_since) {
            (0, None) => self.dir.join(format!("{:020}{SUFFIX}", entry.seq)),
            (failures, None) => self.dir.join(format!("{:020}-{failures}{SUFFIX}", entry.seq)),
            (failures, Some(since)) => self.dir.join(format!("{:020}-{failures}-{since}{SUFFIX}", entry.seq)),
        }
    }

    fn position(&self, seq: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&seq, |e| e.seq).ok()
    }

    /// Appends a window, dropping the oldest ones to make room; says what was dropped.
    /// `unanswered_since` as for [`Spool::mark_unanswered`].
    pub fn push(&mut self, payload: &Payload, unanswered_since: Option<u64>) -> anyhow::Result<Dropped> {
        let encoded = payload.encode();
        let size = encoded.len() as u64;
        if size > self.max_bytes {
            self.dropped += 1;
            bail!("window of {size} bytes exceeds the whole spool ({} bytes)", self.max_bytes);
        }
        let mut dropped = Dropped::default();
        while self.bytes + size > self.max_bytes {
            let Some(old) = self.entries.pop_front() else { break };
            let _ = fs::remove_file(self.path(&old));
            self.bytes -= old.size;
            dropped.profiles += 1;
            dropped.value += old.value;
        }
        self.dropped += dropped.profiles;
        let seq = self.next_seq;
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&encoded)?;
        file.sync_all()?;
        let entry = Entry { seq, size, value: payload.value, failures: 0, unanswered_since };
        fs::rename(&tmp, self.path(&entry))?;
        self.entries.push_back(entry);
        self.bytes += size;
        self.next_seq += 1;
        Ok(dropped)
    }

    /// The oldest window after `after` (the oldest of all for `None`). A corrupt file is
    /// removed and skipped.
    pub fn next_after(&mut self, after: Option<u64>) -> Option<Spooled> {
        let index = after.map_or(0, |after| self.entries.partition_point(|e| e.seq <= after));
        while let Some(&entry) = self.entries.get(index) {
            match fs::read(self.path(&entry)).ok().and_then(|raw| Payload::decode(&raw)) {
                Some(payload) => {
                    let Entry { seq, failures, unanswered_since, .. } = entry;
                    return Some(Spooled { seq, failures, unanswered_since, payload });
                }
                None => {
                    tracing::warn!(seq = entry.seq, "dropping unreadable spooled window");
                    let _ = fs::remove_file(self.path(&entry));
                    self.entries.remove(index);
                    self.bytes -= entry.size;
                    self.dropped += 1;
                }
            }
        }
        None
    }

    /// Removes a window: the server acknowledged it, or it was given up on.
    pub fn remove(&mut self, seq: u64) -> anyhow::Result<()> {
        if let Some(index) = self.position(seq) {
            let entry = self.entries.remove(index).expect("index from position");
            self.bytes -= entry.size;
            fs::remove_file(self.path(&entry))?;
        }
        Ok(())
    }

    /// Records one more failure of a window, on disk; returns its failures so far.
    pub fn count_failure(&mut self, seq: u64) -> anyhow::Result<u32> {
        let after = self.rename(seq, |e| e.failures = e.failures.saturating_add(1))?;
        Ok(after.failures)
    }

    /// Records, on disk, when (unix ms) an attempt of a window went unanswered, unless
    /// an earlier one did: the server may have stored it from then on.
    pub fn mark_unanswered(&mut self, seq: u64, since: u64) -> anyhow::Result<()> {
        self.rename(seq, |e| {
            e.unanswered_since.get_or_insert(since);
        })?;
        Ok(())
    }

    fn rename(&mut self, seq: u64, change: impl FnOnce(&mut Entry)) -> anyhow::Result<Entry> {
        let index = self.position(seq).with_context(|| format!("no spooled window {seq}"))?;
        let before = self.entries[index];
        let mut after = before;
        change(&mut after);
        if self.path(&after) != self.path(&before) {
            fs::rename(self.path(&before), self.path(&after))?;
        }
        self.entries[index] = after;
        Ok(after)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Windows dropped for space (or unreadable) since the spool was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// `SEQ`, `SEQ-FAILURES` or `SEQ-FAILURES-SINCE`.
fn parse_name(stem: &str) -> Option<(u64, u32, Option<u64>)> {
    let mut fields = stem.split('-');
    let seq = fields.next()?.parse().ok()?;
    let failures = fields.next().map_or(Some(0), |f| f.parse().ok())?;
    let since = match fields.next() {
        Some(since) => Some(since.parse().ok()?),
        None => None,
    };
    fields.next().is_none().then_some((seq, failures, since))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: u8) -> Payload {
        Payload { query: format!("service=s&kind=on-cpu&from={n}"), body: vec![n; 100], value: n as u64 }
    }

    #[test]
    fn replays_in_order_across_reopen_and_drops_oldest_past_limit() {
        let dir = tempfile::tempdir().unwrap();
        let size = payload(0).encode().len() as u64;
        let mut spool = Spool::open(dir.path(), size * 3).unwrap();
        for n in 0..3 {
            assert_eq!(spool.push(&payload(n), None).unwrap(), Dropped::default());
        }
        assert_eq!(spool.push(&payload(3), None).unwrap(), Dropped { profiles: 1, value: 0 }, "oldest dropped to fit");
        assert_eq!(spool.push(&payload(4), None).unwrap(), Dropped { profiles: 1, value: 1 });
        assert_eq!(spool.dropped(), 2);
        drop(spool);

        let mut spool = Spool::open(dir.path(), size * 3).unwrap();
        assert_eq!(spool.len(), 3);
        let mut seen = Vec::new();
        while let Some(spooled) = spool.next_after(None) {
            seen.push(spooled.payload.value);
            spool.remove(spooled.seq).unwrap();
        }
        assert_eq!(seen, vec![2, 3, 4]);
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn failures_survive_reopen_and_windows_leave_from_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for n in 0..3 {
            spool.push(&payload(n), None).unwrap();
        }
        let first = spool.next_after(None).unwrap();
        assert_eq!(spool.count_failure(first.seq).unwrap(), 1);
        assert_eq!(spool.count_failure(first.seq).unwrap(), 2);
        let second = spool.next_after(Some(first.seq)).unwrap();
        assert_eq!((second.payload.value, second.failures), (1, 0));
        spool.remove(second.seq).unwrap();
        drop(spool);

        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(spool.len(), 2);
        assert_eq!(spool.bytes(), 2 * payload(0).encode().len() as u64);
        let first = spool.next_after(None).unwrap();
        assert_eq!((first.payload.value, first.failures), (0, 2));
        let last = spool.next_after(Some(first.seq)).unwrap();
        assert_eq!((last.payload.value, last.failures), (2, 0));
        assert_eq!(spool.next_after(Some(last.seq)), None);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "a renamed window leaves no copy behind");
    }

    #[test]
    fn when_an_attempt_went_unanswered_survives_reopen_and_only_the_first_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        spool.push(&payload(0), Some(1_000)).unwrap();
        spool.push(&payload(1), None).unwrap();
        let second = spool.next_after(Some(0)).unwrap();
        assert_eq!(second.unanswered_since, None);
        spool.count_failure(second.seq).unwrap();
        spool.mark_unanswered(second.seq, 5_000).unwrap();
        spool.mark_unanswered(second.seq, 9_000).unwrap();
        drop(spool);

        let mut spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let first = spool.next_after(None).unwrap();
        assert_eq!((first.failures, first.unanswered_since), (0, Some(1_000)));
        let second = spool.next_after(Some(first.seq)).unwrap();
        assert_eq!((second.failures, second.unanswered_since), (1, Some(5_000)));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        assert_eq!(parse_name("00000000000000000007-2-3-4"), None);
        assert_eq!(parse_name("00000000000000000007"), Some((7, 0, None)));
    }
}
