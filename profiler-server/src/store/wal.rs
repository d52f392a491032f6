//! Write-ahead log: numbered files `wal-<seq>.log` of records
//! `[len u32 LE][crc32 u32 LE][payload]`, payload = an encoded `Batch`.
//!
//! Records are bounded at write time ([`MAX_RECORD`]), so replay never meets a
//! valid record it must refuse. A bad record at the very end of a file is a
//! torn tail (only the record being written at a crash can be torn, and it was
//! never acknowledged because acknowledgement waits for fsync): it is cut off.
//! A bad record with intact records after it is corruption (a bad disk, a stray
//! write): replay skips it, keeps every intact record after it and reports the
//! file so the caller can quarantine it instead of silently losing the rest.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::{Batch, Frames, Labels, Row};

/// Largest payload a record may hold; the ingest limits keep batches far below.
pub const MAX_RECORD: usize = 256 << 20;

pub fn file_name(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("wal-{seq:016}.log"))
}

/// WAL files in `dir`, sorted by sequence number.
pub fn list(dir: &Path) -> anyhow::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let seq = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("wal-")?.strip_suffix(".log")?.parse().ok());
        if let Some(seq) = seq {
            out.push((seq, p));
        }
    }
    out.sort();
    Ok(out)
}

pub fn create(dir: &Path, seq: u64) -> anyhow::Result<File> {
    let path = file_name(dir, seq);
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The new directory entry must be durable too, or a crash could lose the
    // whole file with its fsynced contents.
    File::open(dir)?.sync_all()?;
    Ok(f)
}

pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// What replaying one file found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub records: usize,
    /// Bad records followed by intact ones: the file needs quarantine.
    pub corrupt: usize,
    /// Bytes skipped over corrupt records.
    pub corrupt_bytes: u64,
}

/// Reads every intact record of a file, skipping corrupt ones; truncates a
/// torn tail so later appends never follow garbage.
pub fn replay(path: &Path, mut apply: impl FnMut(Batch)) -> anyhow::Result<Replayed> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Replayed::default();
    let mut pos = 0usize;
    let mut good_end = 0usize;
    while pos < data.len() {
        if let Some((batch, len)) = record_at(&data, pos) {
            apply(batch);
            out.records += 1;
            pos += len;
            good_end = pos;
            continue;
        }
        // Corruption only if an intact record follows; otherwise a torn tail.
        match (pos + 1..data.len()).find(|&p| record_at(&data, p).is_some()) {
            Some(next) => {
                tracing::error!(path = %path.display(), offset = pos, bytes = next - pos, "corrupt WAL record; skipping to the next intact one");
                out.corrupt += 1;
                out.corrupt_bytes += (next - pos) as u64;
                pos = next;
            }
            None => break,
        }
    }
    if data.len() > good_end && out.corrupt == 0 {
        tracing::warn!(path = %path.display(), dropped = data.len() - good_end, "truncating torn WAL tail");
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(good_end as u64)?;
        f.sync_all()?;
    }
    Ok(out)
}

/// The record starting at `pos` if its header, checksum and payload are intact.
fn record_at(data: &[u8], pos: usize) -> Option<(Batch, usize)> {
    let head = data.get(pos..pos + 8)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let payload = data.get(pos + 8..pos + 8 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    Some((decode(payload)?, 8 + len))
}

pub fn encode(b: &Batch) -> Vec<u8> {
    let frames: usize = b
        .stacks
        .iter()
        .map(|(_, f)| f.iter().map(|s| s.len() + 4).sum::<usize>())
        .sum();
    let mut out = Vec::with_capacity(64 + frames + b.rows.len() * 32);
    out.push(2u8);
    put_str(&mut out, b.id.as_deref().unwrap_or(""));
    put_str(&mut out, &b.service);
    put_str(&mut out, &b.kind);
    out.extend_from_slice(&(b.stacks.len() as u32).to_le_bytes());
    for (id, frames) in &b.stacks {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
        for f in frames.iter() {
            put_str(&mut out, f);
        }
    }
    out.extend_from_slice(&(b.series.len() as u32).to_le_bytes());
    for (id, labels) in &b.series {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&(labels.len() as u32).to_le_bytes());
        for (k, v) in labels {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
    }
    out.extend_from_slice(&(b.rows.len() as u32).to_le_bytes());
    for r in &b.rows {
        out.extend_from_slice(&r.ts_ms.to_le_bytes());
        out.extend_from_slice(&r.series_id.to_le_bytes());
        out.extend_from_slice(&r.stack_id.to_le_bytes());
        out.extend_from_slice(&r.value.to_le_bytes());
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    /// A count of items each at least `min` bytes long; bounded by the
    /// remaining input so a corrupt count cannot trigger a huge allocation.
    fn count(&mut self, min: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n.saturating_mul(min) <= self.0.len()).then_some(n)
    }
}

pub fn decode(payload: &[u8]) -> Option<Batch> {
    let mut c = Cursor(payload);
    // Version 1 records (before batch ids) have no id field.
    let id = match c.take(1)? {
        [1] => None,
        [2] => Some(c.str()?).filter(|id| !id.is_empty()),
        _ => return None,
    };
    let service = c.str()?;
    let kind = c.str()?;
    let n = c.count(12)?;
    let mut stacks = Vec::with_capacity(n);
    for _ in 0..n {
        let id = c.u64()?;
        let nf = c.count(4)?;
        let frames = (0..nf).map(|_| c.str().map(Arc::from)).collect::<Option<Frames>>()?;
        stacks.push((id, frames));
    }
    let n = c.count(12)?;
    let mut series = Vec::with_capacity(n);
    for _ in 0..n {
        let id = c.u64()?;
        let nl = c.count(8)?;
        let labels = (0..nl)
            .map(|_| Some((c.str()?, c.str()?)))
            .collect::<Option<Labels>>()?;
        series.push((id, labels));
    }
    let n = c.count(32)?;
    let mut rows = Vec::with_capacity(n);
    for _ in 0..n {
        rows.push(Row {
            ts_ms: c.u64()? as i64,
            series_id: c.u64()?,
            stack_id: c.u64()?,
            value: c.u64()? as i64,
        });
    }
    c.0.is_empty().then_some(Batch {
        id,
        maybe_stored_since_ms: None,
        service,
        kind,
        stacks,
        series,
        rows,
    })
}

/// Appends framed records to one file and makes them durable.
pub struct Writer {
    pub seq: u64,
    file: Arc<File>,
}

impl Writer {
    pub fn new(seq: u64, file: File) -> Self {
        Writer { seq, file: Arc::new(file) }
    }

    pub fn write(&mut self, framed: &[u8]) -> std::io::Result<()> {
        (&*self.file).write_all(framed)
    }

    /// The file, to fsync without holding the writer.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Cuts the file back to `len` bytes (a partial or unsynced record).
    pub fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            id: Some("agent-1".into()),
            maybe_stored_since_ms: None,
            service: "svc".into(),
            kind: "on-cpu".into(),
            stacks: vec![(7, ["a", "b"].map(Arc::from).into())],
            series: vec![(9, Labels::from([("host".to_string(), "h".to_string())]))],
            rows: vec![Row {
                ts_ms: 10_000,
                series_id: 9,
                stack_id: 7,
                value: -3,
            }],
        }
    }

    #[test]
    fn torn_tail_is_dropped_and_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = create(dir.path(), 1).unwrap();
        let rec = frame(&encode(&batch()));
        f.write_all(&rec).unwrap();
        f.write_all(&rec).unwrap();
        f.write_all(&rec[..rec.len() - 3]).unwrap();
        let mut got = Vec::new();
        let path = file_name(dir.path(), 1);
        let replayed = replay(&path, |b| got.push(b)).unwrap();
        assert_eq!(replayed, Replayed { records: 2, corrupt: 0, corrupt_bytes: 0 });
        assert_eq!(got, vec![batch(), batch()]);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            2 * rec.len() as u64
        );
        assert_eq!(list(dir.path()).unwrap(), vec![(1, path)]);
    }

    #[test]
    fn a_corrupt_record_in_the_middle_keeps_the_records_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = create(dir.path(), 1).unwrap();
        let rec = frame(&encode(&batch()));
        for _ in 0..3 {
            f.write_all(&rec).unwrap();
        }
        let path = file_name(dir.path(), 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[rec.len() + 20] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let mut got = 0;
        let replayed = replay(&path, |_| got += 1).unwrap();
        assert_eq!(replayed.records, 2, "the first and the third");
        assert_eq!(replayed.corrupt, 1);
        assert_eq!(replayed.corrupt_bytes, rec.len() as u64);
        assert_eq!(got, 2);
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "left as found, for quarantine");
    }

    #[test]
    fn version_1_records_still_replay() {
        let mut v1 = encode(&batch());
        let id_field = 4 + "agent-1".len();
        v1.drain(1..1 + id_field);
        v1[0] = 1;
        assert_eq!(decode(&v1), Some(Batch { id: None, ..batch() }));
    }

    #[test]
    fn corrupt_payloads_do_not_decode() {
        let enc = encode(&batch());
        assert_eq!(decode(&enc), Some(batch()));
        for cut in 0..enc.len() {
            assert_eq!(decode(&enc[..cut]), None);
        }
    }
}
