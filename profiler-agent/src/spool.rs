//! Bounded on-disk queue of windows the server has not acknowledged yet. Files are named
//! by a sequence number, so replay is in order and survives agent restarts. Past the
//! size limit the oldest windows are dropped, and counted.

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
            if let Some(seq) = name.strip_suffix(SUFFIX).and_then(|s| s.parse::<u64>().ok()) {
                let raw = fs::read(entry.path())?;
                let value = Payload::decode(&raw).map_or(0, |p| p.value);
                entries.push(Entry { seq, size: raw.len() as u64, value });
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

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{SUFFIX}"))
    }

    /// Appends a window, dropping the oldest ones to make room; says what was dropped.
    pub fn push(&mut self, payload: &Payload) -> anyhow::Result<Dropped> {
        let encoded = payload.encode();
        let size = encoded.len() as u64;
        if size > self.max_bytes {
            self.dropped += 1;
            bail!("window of {size} bytes exceeds the whole spool ({} bytes)", self.max_bytes);
        }
        let mut dropped = Dropped::default();
        while self.bytes + size > self.max_bytes {
            let Some(old) = self.entries.pop_front() else { break };
            let _ = fs::remove_file(self.path(old.seq));
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
        fs::rename(&tmp, self.path(seq))?;
        self.entries.push_back(Entry { seq, size, value: payload.value });
        self.bytes += size;
        self.next_seq += 1;
        Ok(dropped)
    }

    /// The oldest window, if any. A corrupt file is removed and skipped.
    pub fn oldest(&mut self) -> Option<Payload> {
        while let Some(&Entry { seq, size, .. }) = self.entries.front() {
            match fs::read(self.path(seq)).ok().and_then(|raw| Payload::decode(&raw)) {
                Some(payload) => return Some(payload),
                None => {
                    tracing::warn!(seq, "dropping unreadable spooled window");
                    let _ = fs::remove_file(self.path(seq));
                    self.entries.pop_front();
                    self.bytes -= size;
                    self.dropped += 1;
                }
            }
        }
        None
    }

    /// Removes the oldest window once the server acknowledged it.
    pub fn remove_oldest(&mut self) -> anyhow::Result<()> {
        if let Some(entry) = self.entries.pop_front() {
            fs::remove_file(self.path(entry.seq))?;
            self.bytes -= entry.size;
        }
        Ok(())
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
            assert_eq!(spool.push(&payload(n)).unwrap(), Dropped::default());
        }
        assert_eq!(spool.push(&payload(3)).unwrap(), Dropped { profiles: 1, value: 0 }, "oldest dropped to fit");
        assert_eq!(spool.push(&payload(4)).unwrap(), Dropped { profiles: 1, value: 1 });
        assert_eq!(spool.dropped(), 2);
        drop(spool);

        let mut spool = Spool::open(dir.path(), size * 3).unwrap();
        assert_eq!(spool.len(), 3);
        let mut seen = Vec::new();
        while let Some(p) = spool.oldest() {
            seen.push(p.value);
            spool.remove_oldest().unwrap();
        }
        assert_eq!(seen, vec![2, 3, 4]);
        assert_eq!(spool.bytes(), 0);
    }
}
