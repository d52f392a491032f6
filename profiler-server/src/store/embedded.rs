//! Embedded store: WAL-backed memory buffer + immutable Parquet segments,
//! with the catalog (segments, stack and series dictionaries) in redb.
//!
//! Durability: `append` acknowledges only after its WAL record is fsynced
//! (group commit: one fsync covers every record written before it). A flush
//! rotates the WAL, writes the buffered rows to segments, and commits the
//! segments, any new dictionary entries and the highest flushed WAL sequence
//! in one redb transaction; only then are the covered WAL files deleted.
//! Replay skips WAL files at or below that sequence, so a crash between the
//! commit and the deletion cannot double-count.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::segment::{self, Scan, SegmentMeta};
use super::{wal, Aggregate, Batch, Frames, GroupBy, Labels, Row, Selector, Store};

const STACKS: TableDefinition<u64, &[u8]> = TableDefinition::new("stacks");
const SERIES: TableDefinition<u64, &str> = TableDefinition::new("series");
const SEGMENTS: TableDefinition<u64, &str> = TableDefinition::new("segments");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const WAL_FLUSHED_UPTO: &str = "wal_flushed_upto";

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub segment_span_ms: i64,
    /// None keeps data forever.
    pub retention_ms: Option<i64>,
    /// (age after which, resolution in ms), ascending.
    pub downsample: Vec<(i64, i64)>,
}

type Buffer = HashMap<(String, String), Vec<Row>>;

struct Pending {
    /// Every WAL file up to this sequence holds only rows of `buf` (or older).
    wal_upto: u64,
    buf: Arc<Buffer>,
}

#[derive(Default)]
struct Mem {
    active: Buffer,
    active_rows: usize,
    flushing: Vec<Pending>,
}

#[derive(Default)]
struct Dict {
    stacks: HashMap<u64, Frames>,
    series: HashMap<u64, Arc<Labels>>,
    by_service: HashMap<String, HashSet<u64>>,
    // Entries known only from the WAL, not yet in redb.
    new_stacks: Vec<u64>,
    new_series: Vec<u64>,
}

impl Dict {
    fn add_series(&mut self, id: u64, labels: Arc<Labels>, persisted: bool) {
        if self.series.contains_key(&id) {
            return;
        }
        let service = labels.get("service").cloned().unwrap_or_default();
        self.by_service.entry(service).or_default().insert(id);
        self.series.insert(id, labels);
        if !persisted {
            self.new_series.push(id);
        }
    }
}

struct WalState {
    writer: wal::Writer,
    /// Records appended since start, across files; compared with `synced`.
    appended: u64,
    len: u64,
}

pub struct EmbeddedStore {
    dir: PathBuf,
    opts: StoreOptions,
    db: Database,
    // Lock order: sync_lock -> wal -> mem -> segments -> dict.
    sync_lock: Mutex<()>,
    synced: AtomicU64,
    wal: Mutex<WalState>,
    mem: RwLock<Mem>,
    segments: RwLock<Vec<SegmentMeta>>,
    dict: RwLock<Dict>,
    // Serializes flush and maintenance, which both rewrite the catalog.
    flush_lock: Mutex<()>,
    next_segment: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the store down with it; the protected
    // state is always left consistent between statements.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

impl EmbeddedStore {
    pub fn open(dir: &Path, opts: StoreOptions) -> anyhow::Result<EmbeddedStore> {
        let wal_dir = dir.join("wal");
        let seg_dir = dir.join("segments");
        std::fs::create_dir_all(&wal_dir)?;
        std::fs::create_dir_all(&seg_dir)?;
        let db = Database::create(dir.join("catalog.redb")).context("opening catalog")?;
        let txn = db.begin_write()?;
        txn.open_table(STACKS)?;
        txn.open_table(SERIES)?;
        txn.open_table(SEGMENTS)?;
        txn.open_table(META)?;
        txn.commit()?;

        let mut dict = Dict::default();
        let mut segments = Vec::new();
        let flushed_upto;
        {
            let txn = db.begin_read()?;
            for e in txn.open_table(STACKS)?.iter()? {
                let (k, v) = e?;
                let frames = decode_frames(v.value()).context("corrupt stack in catalog")?;
                dict.stacks.insert(k.value(), frames);
            }
            for e in txn.open_table(SERIES)?.iter()? {
                let (k, v) = e?;
                let labels: Labels = serde_json::from_str(v.value())?;
                dict.add_series(k.value(), Arc::new(labels), true);
            }
            for e in txn.open_table(SEGMENTS)?.iter()? {
                let (_, v) = e?;
                segments.push(serde_json::from_str::<SegmentMeta>(v.value())?);
            }
            flushed_upto = txn
                .open_table(META)?
                .get(WAL_FLUSHED_UPTO)?
                .map(|v| v.value())
                .unwrap_or(0);
        }

        // Files a crash left behind before their catalog commit.
        let known: HashSet<String> = segments.iter().map(|s| s.file_name()).collect();
        for e in std::fs::read_dir(&seg_dir)? {
            let p = e?.path();
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !known.contains(&name) {
                tracing::info!(file = %p.display(), "removing uncataloged segment file");
                std::fs::remove_file(&p)?;
            }
        }

        let mut mem = Mem::default();
        let mut last_seq = flushed_upto;
        let mut replayed = 0usize;
        for (seq, path) in wal::list(&wal_dir)? {
            last_seq = last_seq.max(seq);
            if seq <= flushed_upto {
                std::fs::remove_file(&path)?;
                continue;
            }
            replayed += wal::replay(&path, |b| apply(&mut mem, &mut dict, b))?;
        }
        if replayed > 0 {
            tracing::info!(records = replayed, rows = mem.active_rows, "replayed WAL");
        }
        let seq = last_seq + 1;
        let writer = wal::Writer::new(seq, wal::create(&wal_dir, seq)?);
        let next_segment = segments.iter().map(|s| s.id + 1).max().unwrap_or(1);
        Ok(EmbeddedStore {
            dir: dir.to_owned(),
            opts,
            db,
            sync_lock: Mutex::new(()),
            synced: AtomicU64::new(0),
            wal: Mutex::new(WalState {
                writer,
                appended: 0,
                len: 0,
            }),
            mem: RwLock::new(mem),
            segments: RwLock::new(segments),
            dict: RwLock::new(dict),
            flush_lock: Mutex::new(()),
            next_segment: AtomicU64::new(next_segment),
        })
    }

    pub fn segment_count(&self) -> usize {
        read(&self.segments).len()
    }

    fn wal_dir(&self) -> PathBuf {
        self.dir.join("wal")
    }

    fn seg_path(&self, meta: &SegmentMeta) -> PathBuf {
        self.dir.join("segments").join(meta.file_name())
    }

    /// Starts a new WAL file and turns the active buffer into a pending one.
    fn rotate(&self) -> anyhow::Result<()> {
        let _s = lock(&self.sync_lock);
        let mut w = lock(&self.wal);
        let mut mem = write(&self.mem);
        if mem.active_rows == 0 {
            return Ok(());
        }
        w.writer.handle()?.sync_data()?;
        self.synced.fetch_max(w.appended, Ordering::SeqCst);
        let old = w.writer.seq;
        w.writer = wal::Writer::new(old + 1, wal::create(&self.wal_dir(), old + 1)?);
        w.len = 0;
        let buf = std::mem::take(&mut mem.active);
        mem.active_rows = 0;
        mem.flushing.push(Pending {
            wal_upto: old,
            buf: Arc::new(buf),
        });
        Ok(())
    }

    fn persist(&self, p: &Pending) -> anyhow::Result<()> {
        let (stack_ids, series_ids) = {
            let mut d = write(&self.dict);
            (
                std::mem::take(&mut d.new_stacks),
                std::mem::take(&mut d.new_series),
            )
        };
        let mut written = Vec::new();
        let res = self.persist_inner(p, &stack_ids, &series_ids, &mut written);
        if let Err(e) = res {
            for m in &written {
                let _ = std::fs::remove_file(self.seg_path(m));
            }
            let mut d = write(&self.dict);
            d.new_stacks.extend(stack_ids);
            d.new_series.extend(series_ids);
            return Err(e);
        }
        let mut mem = write(&self.mem);
        let mut segs = write(&self.segments);
        segs.extend(written);
        mem.flushing.retain(|q| !Arc::ptr_eq(&q.buf, &p.buf));
        Ok(())
    }

    fn persist_inner(
        &self,
        p: &Pending,
        stack_ids: &[u64],
        series_ids: &[u64],
        written: &mut Vec<SegmentMeta>,
    ) -> anyhow::Result<()> {
        let span = self.opts.segment_span_ms;
        for ((service, kind), rows) in p.buf.iter() {
            let mut by_span: HashMap<i64, Vec<Row>> = HashMap::new();
            for r in rows {
                by_span
                    .entry(r.ts_ms.div_euclid(span))
                    .or_default()
                    .push(*r);
            }
            for (_, mut rows) in by_span {
                segment::normalize(&mut rows);
                let meta = self.write_segment(service, kind, &rows, 0)?;
                written.push(meta);
            }
        }
        let d = read(&self.dict);
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(STACKS)?;
            for id in stack_ids {
                t.insert(id, encode_frames(&d.stacks[id]).as_slice())?;
            }
            let mut t = txn.open_table(SERIES)?;
            for id in series_ids {
                t.insert(id, serde_json::to_string(&*d.series[id])?.as_str())?;
            }
            let mut t = txn.open_table(SEGMENTS)?;
            for m in written.iter() {
                t.insert(m.id, serde_json::to_string(m)?.as_str())?;
            }
            txn.open_table(META)?.insert(WAL_FLUSHED_UPTO, p.wal_upto)?;
        }
        drop(d);
        txn.commit()?;
        Ok(())
    }

    /// Writes one segment file; `resolution_ms` 0 means ingest resolution.
    fn write_segment(
        &self,
        service: &str,
        kind: &str,
        rows: &[Row],
        resolution_ms: i64,
    ) -> anyhow::Result<SegmentMeta> {
        let mut meta = SegmentMeta {
            id: self.next_segment.fetch_add(1, Ordering::SeqCst),
            service: service.to_owned(),
            kind: kind.to_owned(),
            min_ts: rows.iter().map(|r| r.ts_ms).min().unwrap_or(0),
            max_ts: rows.iter().map(|r| r.ts_ms).max().unwrap_or(0),
            rows: rows.len() as u64,
            bytes: 0,
            resolution_ms,
        };
        meta.bytes = segment::write(&self.seg_path(&meta), rows)?;
        Ok(meta)
    }

    /// Replaces `old` segments by `new` ones in catalog, list and disk.
    fn swap_segments(&self, old: &[SegmentMeta], new: Vec<SegmentMeta>) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(SEGMENTS)?;
            for m in old {
                t.remove(m.id)?;
            }
            for m in &new {
                t.insert(m.id, serde_json::to_string(m)?.as_str())?;
            }
        }
        txn.commit()?;
        let gone: HashSet<u64> = old.iter().map(|m| m.id).collect();
        {
            let mut segs = write(&self.segments);
            segs.retain(|m| !gone.contains(&m.id));
            segs.extend(new);
        }
        for m in old {
            // A concurrent query may still read it: Unix keeps the inode alive.
            if let Err(e) = std::fs::remove_file(self.seg_path(m)) {
                tracing::warn!(error = %e, segment = m.id, "removing segment file");
            }
        }
        Ok(())
    }

    fn downsample(&self, now_ms: i64, after_ms: i64, res_ms: i64) -> anyhow::Result<()> {
        // Groups span 60 windows, so a 1-minute level writes hourly files.
        let group_span = res_ms * 60;
        let mut groups: HashMap<(String, String, i64), Vec<SegmentMeta>> = HashMap::new();
        for m in read(&self.segments).iter() {
            if m.max_ts < now_ms - after_ms && m.resolution_ms < res_ms {
                let key = (
                    m.service.clone(),
                    m.kind.clone(),
                    m.min_ts.div_euclid(group_span),
                );
                groups.entry(key).or_default().push(m.clone());
            }
        }
        for ((service, kind, _), old) in groups {
            let mut rows = Vec::new();
            for m in &old {
                rows.extend(segment::read_all(&self.seg_path(m))?);
            }
            for r in &mut rows {
                r.ts_ms = r.ts_ms.div_euclid(res_ms) * res_ms;
            }
            segment::normalize(&mut rows);
            let before: u64 = old.iter().map(|m| m.rows).sum();
            let meta = self.write_segment(&service, &kind, &rows, res_ms)?;
            tracing::info!(%service, %kind, segments = old.len(), rows_before = before, rows_after = meta.rows, res_ms, "downsampled");
            self.swap_segments(&old, vec![meta])?;
        }
        Ok(())
    }
}

fn apply(mem: &mut Mem, dict: &mut Dict, b: Batch) {
    for (id, frames) in b.stacks {
        if let std::collections::hash_map::Entry::Vacant(e) = dict.stacks.entry(id) {
            e.insert(frames);
            dict.new_stacks.push(id);
        }
    }
    for (id, labels) in b.series {
        dict.add_series(id, Arc::new(labels), false);
    }
    mem.active_rows += b.rows.len();
    mem.active
        .entry((b.service, b.kind))
        .or_default()
        .extend(b.rows);
}

fn encode_frames(frames: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

fn decode_frames(mut b: &[u8]) -> Option<Frames> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        out.push(String::from_utf8(b.get(4..4 + n)?.to_vec()).ok()?);
        b = &b[4 + n..];
    }
    Some(out.into())
}

fn scan_rows(
    rows: &[Row],
    sel: &Selector,
    allowed: Option<&HashSet<u64>>,
    by: GroupBy,
    out: &mut HashMap<u64, i64>,
) {
    for r in rows {
        if r.ts_ms < sel.from_ms || r.ts_ms >= sel.until_ms {
            continue;
        }
        if allowed.is_some_and(|a| !a.contains(&r.series_id)) {
            continue;
        }
        let key = match by {
            GroupBy::Stack => r.stack_id,
            GroupBy::Time { step_ms } => segment::bucket(r.ts_ms, sel.from_ms, step_ms),
        };
        *out.entry(key).or_insert(0) += r.value;
    }
}

impl Store for EmbeddedStore {
    fn append(&self, batch: Batch) -> anyhow::Result<()> {
        let framed = wal::frame(&wal::encode(&batch));
        let my = {
            let mut w = lock(&self.wal);
            if let Err(e) = w.writer.write(&framed) {
                // Cut a partial record off, or it would hide later records from replay.
                let len = w.len;
                if let Ok(f) = w.writer.handle() {
                    let _ = f.set_len(len);
                }
                return Err(e).context("writing WAL");
            }
            w.len += framed.len() as u64;
            w.appended += 1;
            let mut mem = write(&self.mem);
            apply(&mut mem, &mut write(&self.dict), batch);
            w.appended
        };
        let _s = lock(&self.sync_lock);
        if self.synced.load(Ordering::SeqCst) >= my {
            return Ok(());
        }
        let (target, handle) = {
            let w = lock(&self.wal);
            (w.appended, w.writer.handle()?)
        };
        handle.sync_data().context("fsync WAL")?;
        self.synced.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    fn aggregate(&self, sel: &Selector, by: GroupBy) -> anyhow::Result<Aggregate> {
        let allowed: Option<HashSet<u64>> = (!sel.matchers.is_empty()).then(|| {
            let d = read(&self.dict);
            d.by_service
                .get(&sel.service)
                .into_iter()
                .flatten()
                .filter(|id| sel.matchers.iter().all(|m| m.matches(&d.series[*id])))
                .copied()
                .collect()
        });
        let mut out = Aggregate::new();
        let segs: Vec<SegmentMeta> = {
            let mem = read(&self.mem);
            let bufs = std::iter::once(&mem.active).chain(mem.flushing.iter().map(|p| &*p.buf));
            for buf in bufs {
                for ((service, kind), rows) in buf {
                    if *service == sel.service && sel.wants_kind(kind) {
                        let dst = out.entry(kind.clone()).or_default();
                        scan_rows(rows, sel, allowed.as_ref(), by, dst);
                    }
                }
            }
            read(&self.segments)
                .iter()
                .filter(|m| {
                    m.service == sel.service
                        && sel.wants_kind(&m.kind)
                        && m.min_ts < sel.until_ms
                        && m.max_ts >= sel.from_ms
                })
                .cloned()
                .collect()
        };
        if segs.is_empty() {
            return Ok(out);
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(segs.len());
        // Deal the largest segments out first so threads finish together.
        let mut order: Vec<&SegmentMeta> = segs.iter().collect();
        order.sort_by_key(|m| std::cmp::Reverse(m.rows));
        let partials = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let mine: Vec<&SegmentMeta> =
                        order.iter().skip(t).step_by(threads).copied().collect();
                    let allowed = allowed.as_ref();
                    s.spawn(move || -> anyhow::Result<Aggregate> {
                        let mut part = Aggregate::new();
                        for m in mine {
                            let inside = m.min_ts >= sel.from_ms && m.max_ts < sel.until_ms;
                            let scan = Scan {
                                time: (!inside).then_some((sel.from_ms, sel.until_ms)),
                                series: allowed,
                                by,
                                from_ms: sel.from_ms,
                            };
                            let dst = part.entry(m.kind.clone()).or_default();
                            match segment::aggregate(&self.seg_path(m), &scan, dst) {
                                Ok(()) => {}
                                // Compacted or expired after we listed it.
                                Err(e) if is_not_found(&e) => {}
                                Err(e) => {
                                    return Err(e.context(format!("reading segment {}", m.id)))
                                }
                            }
                        }
                        Ok(part)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("scan thread panicked"))
                .collect::<Vec<_>>()
        });
        for p in partials {
            super::merge_into(&mut out, p?);
        }
        Ok(out)
    }

    fn stack(&self, id: u64) -> Option<Frames> {
        read(&self.dict).stacks.get(&id).cloned()
    }

    fn services(&self) -> Vec<String> {
        let mut v: Vec<String> = read(&self.dict).by_service.keys().cloned().collect();
        v.sort();
        v
    }

    fn series(&self, service: &str) -> Vec<Arc<Labels>> {
        let d = read(&self.dict);
        d.by_service
            .get(service)
            .into_iter()
            .flatten()
            .map(|id| d.series[id].clone())
            .collect()
    }

    fn flush(&self) -> anyhow::Result<()> {
        let _f = lock(&self.flush_lock);
        self.rotate()?;
        loop {
            let next = read(&self.mem).flushing.first().map(|p| Pending {
                wal_upto: p.wal_upto,
                buf: p.buf.clone(),
            });
            let Some(p) = next else { break };
            let rows: usize = p.buf.values().map(Vec::len).sum();
            self.persist(&p)?;
            for (seq, path) in wal::list(&self.wal_dir())? {
                if seq <= p.wal_upto {
                    std::fs::remove_file(path)?;
                }
            }
            tracing::debug!(rows, wal_upto = p.wal_upto, "flushed buffer to segments");
        }
        Ok(())
    }

    fn maintain(&self, now_ms: i64) -> anyhow::Result<()> {
        let _f = lock(&self.flush_lock);
        if let Some(ret) = self.opts.retention_ms {
            let expired: Vec<SegmentMeta> = read(&self.segments)
                .iter()
                .filter(|m| m.max_ts < now_ms - ret)
                .cloned()
                .collect();
            if !expired.is_empty() {
                tracing::info!(segments = expired.len(), "deleting segments past retention");
                self.swap_segments(&expired, Vec::new())?;
            }
        }
        for &(after, res) in &self.opts.downsample {
            self.downsample(now_ms, after, res)?;
        }
        Ok(())
    }

    fn buffered_rows(&self) -> usize {
        read(&self.mem).active_rows
    }

    fn disk_bytes(&self) -> u64 {
        let seg: u64 = read(&self.segments).iter().map(|m| m.bytes).sum();
        let wal: u64 = wal::list(&self.wal_dir())
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let catalog = std::fs::metadata(self.dir.join("catalog.redb")).map_or(0, |m| m.len());
        seg + wal + catalog
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{series_id, stack_id};

    fn opts() -> StoreOptions {
        StoreOptions {
            segment_span_ms: 600_000,
            retention_ms: Some(86_400_000),
            downsample: vec![(3_600_000, 60_000)],
        }
    }

    fn batch(ts: i64, value: i64) -> Batch {
        let frames: Frames = Arc::from(vec!["main".to_string(), "f".to_string()]);
        let labels = Labels::from([("service".to_string(), "svc".to_string())]);
        let (st, se) = (stack_id(&frames), series_id(&labels));
        Batch {
            service: "svc".into(),
            kind: "on-cpu".into(),
            stacks: vec![(st, frames)],
            series: vec![(se, labels)],
            rows: vec![Row {
                ts_ms: ts,
                series_id: se,
                stack_id: st,
                value,
            }],
        }
    }

    fn total(s: &EmbeddedStore, from: i64, until: i64) -> i64 {
        let sel = Selector {
            service: "svc".into(),
            from_ms: from,
            until_ms: until,
            kinds: None,
            matchers: vec![],
        };
        s.aggregate(&sel, GroupBy::Stack)
            .unwrap()
            .values()
            .flat_map(|m| m.values())
            .sum()
    }

    #[test]
    fn data_survives_reopen_flush_and_downsampling() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
            for i in 0..10 {
                s.append(batch(i * 10_000, 1)).unwrap();
            }
            assert_eq!(total(&s, 0, i64::MAX), 10);
        }
        // Replayed from the WAL alone.
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert_eq!(total(&s, 0, i64::MAX), 10);
        s.flush().unwrap();
        assert_eq!(s.buffered_rows(), 0);
        assert_eq!(s.segment_count(), 1);
        s.append(batch(5_000_000, 7)).unwrap();
        assert_eq!(total(&s, 0, i64::MAX), 17);
        assert_eq!(total(&s, 20_000, 50_000), 3);
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert_eq!(
            total(&s, 0, i64::MAX),
            17,
            "no double counting after flush + replay"
        );
        s.flush().unwrap();
        assert_eq!(wal::list(&dir.path().join("wal")).unwrap().len(), 1);

        // Everything older than an hour at `now` goes to 1-minute windows.
        s.maintain(4 * 3_600_000).unwrap();
        assert_eq!(total(&s, 0, i64::MAX), 17);
        assert_eq!(
            total(&s, 0, 30_000),
            6,
            "windows 0..50 s now all sit at minute 0"
        );
        // And past retention everything goes.
        s.maintain(100 * 3_600_000).unwrap();
        assert_eq!(total(&s, 0, i64::MAX), 0);
        assert_eq!(s.segment_count(), 0);
    }
}
