//! Embedded store: WAL-backed memory buffer + immutable Parquet segments,
//! with the catalog (segments, stack and series dictionaries) in redb.
//!
//! Durability: `append` acknowledges only after its WAL record is fsynced
//! (group commit: one fsync covers every record written before it), and a
//! batch reaches the in-memory buffer (and so queries and flushes) only then:
//! a batch whose fsync failed is answered with an error and never counted, so
//! the client's retry is not a double count. After a failed write or fsync the
//! file is cut back to what was synced and abandoned for a new one, because
//! the kernel may have dropped the unsynced pages and cleared the error.
//! A flush rotates the WAL, writes the buffered rows to segments, and commits
//! the segments, any new dictionary entries, the ids of the flushed batches
//! and the highest flushed WAL sequence in one redb transaction; only then are
//! the covered WAL files deleted. Replay skips WAL files at or below that
//! sequence, so a crash between the commit and the deletion cannot
//! double-count.
//!
//! Back-pressure: while a flush keeps failing, or too many rows or WAL bytes
//! wait, `append` refuses with [`Refused::Busy`] instead of growing without
//! bound; it recovers on its own once a flush succeeds.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::recent::{self, BatchKey, RecentBatches};
use super::segment::{self, Scan, SegmentMeta, Summary};
use super::results::Results;
use super::totals;
use super::{
    now_ms, wal, Aggregate, Appended, Batch, Cancel, Frames, Grid, GroupBy, Labels, Overview, Refused,
    Row, Selector, Store, StoreResult, StoreStats,
};

const STACKS: TableDefinition<u64, &[u8]> = TableDefinition::new("stacks");
const SERIES: TableDefinition<u64, &str> = TableDefinition::new("series");
const SEGMENTS: TableDefinition<u64, &str> = TableDefinition::new("segments");
/// Segment id -> its per-stack totals ([`totals::encode`]), for the segments
/// whose entry says it has them.
const STACK_TOTALS: TableDefinition<u64, &[u8]> = TableDefinition::new("stack_totals");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Ids of flushed batches (their WAL records are gone) -> when stored, ms.
const BATCH_IDS: TableDefinition<u128, i64> = TableDefinition::new("batch_ids");
/// Latest row timestamp referencing a stack / series: once it is older than
/// retention (plus the widest segment), no segment can reference the entry.
const STACK_SEEN: TableDefinition<u64, i64> = TableDefinition::new("stack_seen");
const SERIES_SEEN: TableDefinition<u64, i64> = TableDefinition::new("series_seen");
const WAL_FLUSHED_UPTO: &str = "wal_flushed_upto";

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub segment_span_ms: i64,
    /// None keeps data forever.
    pub retention_ms: Option<i64>,
    /// (age after which, resolution in ms), ascending.
    pub downsample: Vec<(i64, i64)>,
    /// How long and how many batch ids are remembered to drop retries.
    pub dedup_window_ms: i64,
    pub dedup_max_ids: usize,
    /// Rows waiting for a flush beyond which ingest is refused (busy).
    pub max_buffered_rows: usize,
    /// WAL bytes beyond which ingest is refused (busy).
    pub max_wal_bytes: u64,
    /// Memory for segments' per-stack totals read by queries.
    pub totals_cache_bytes: usize,
    /// Memory for answers to queries over settled ranges.
    pub result_cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_span_ms: 600_000,
            retention_ms: None,
            downsample: Vec::new(),
            dedup_window_ms: 3_600_000,
            dedup_max_ids: 1_000_000,
            max_buffered_rows: 8_000_000,
            max_wal_bytes: 2 << 30,
            totals_cache_bytes: 128 << 20,
            result_cache_bytes: 64 << 20,
        }
    }
}

/// Segments from before per-stack totals that one maintenance pass gives them.
const LEGACY_TOTALS_PER_PASS: usize = 64;

/// How long a failed WAL file creation refuses ingest before trying again.
const REOPEN_BACKOFF: Duration = Duration::from_secs(1);

type Buffer = HashMap<(String, String), Vec<Row>>;

struct Pending {
    /// Every WAL file up to this sequence holds only rows of `buf` (or older).
    wal_upto: u64,
    buf: Arc<Buffer>,
    /// Ids of the batches in `buf`, persisted with it.
    ids: Arc<Vec<(BatchKey, i64)>>,
}

#[derive(Default)]
struct Mem {
    active: Buffer,
    active_rows: usize,
    active_ids: Vec<(BatchKey, i64)>,
    flushing: Vec<Pending>,
}

impl Mem {
    fn buffered_rows(&self) -> usize {
        let flushing: usize = self
            .flushing
            .iter()
            .flat_map(|p| p.buf.values())
            .map(Vec::len)
            .sum();
        self.active_rows + flushing
    }
}

/// Memory redb may keep of the catalog's pages. Its default (1 GiB) held
/// every page the start-up read of the dictionary touched: 260 MiB more
/// after a restart with the cargo-build recording's 115,714 stacks. The
/// dictionary is in memory anyway; the catalog is read once at start and
/// written at flushes.
const CATALOG_CACHE_BYTES: usize = 32 << 20;

/// Maps keyed by stack or series id, touched for every ingested row: a
/// hasher several times faster than SipHash, still seeded at random, so a
/// client cannot pick ids that collide without learning the seed.
type IdMap<V> = HashMap<u64, V, foldhash::fast::RandomState>;

/// The dictionary's frame names, each held once. Stacks repeat a few names in
/// many combinations: the cargo-build recording's 115,714 stacks hold 191 MB
/// of frames but only 62,437 distinct names (6 MB), so every stack in the
/// dictionary points at the names here instead of owning copies.
#[derive(Default)]
struct FrameNames {
    names: HashSet<Arc<str>, foldhash::fast::RandomState>,
    /// Stacks forgotten since names no stack uses were last dropped.
    forgotten: usize,
}

impl FrameNames {
    /// The shared copy of `name`; a new name is shared as `owned` makes it.
    fn name(&mut self, name: &str, owned: impl FnOnce() -> Arc<str>) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        let shared = owned();
        self.names.insert(shared.clone());
        shared
    }

    /// `frames` with every name replaced by the shared one; a new name is
    /// shared as the batch brought it.
    fn share(&mut self, frames: &[Arc<str>]) -> Frames {
        frames.iter().map(|f| self.name(f, || f.clone())).collect()
    }

    /// Frames as the catalog stores them, decoded onto the shared names.
    fn decode(&mut self, mut b: &[u8]) -> Option<Frames> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
            let name = std::str::from_utf8(b.get(4..4 + n)?).ok()?;
            out.push(self.name(name, || Arc::from(name)));
            b = &b[4 + n..];
        }
        Some(out.into())
    }

    /// Drops the names no stack holds any more, once as many stacks were
    /// forgotten as are left: a scan of the names per that many stacks.
    fn forgot(&mut self, stacks: usize, left: usize) {
        self.forgotten += stacks;
        if stacks > 0 && self.forgotten >= left {
            // A name only the set holds belongs to no stack. One a query or
            // an export still holds stays until a later pass.
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.forgotten = 0;
        }
    }
}

#[derive(Default)]
struct Dict {
    stacks: IdMap<Frames>,
    names: FrameNames,
    series: IdMap<Arc<Labels>>,
    by_service: HashMap<String, HashSet<u64>>,
    // Entries known only from the WAL, not yet in redb.
    new_stacks: Vec<u64>,
    new_series: Vec<u64>,
    // Latest row timestamp per entry, for garbage collection.
    stack_seen: IdMap<i64>,
    series_seen: IdMap<i64>,
}

impl Dict {
    fn saw(&mut self, rows: &[Row]) {
        // A batch's rows mostly share one series and window: its entry is
        // looked up once per run, not once per row.
        let mut last_series = None;
        for row in rows {
            let s = self.stack_seen.entry(row.stack_id).or_insert(row.ts_ms);
            *s = (*s).max(row.ts_ms);
            if last_series != Some((row.series_id, row.ts_ms)) {
                last_series = Some((row.series_id, row.ts_ms));
                let s = self.series_seen.entry(row.series_id).or_insert(row.ts_ms);
                *s = (*s).max(row.ts_ms);
            }
        }
    }

    /// Drops entries whose latest row is older than `cutoff_ms`; returns
    /// their ids.
    fn forget_before(&mut self, cutoff_ms: i64) -> (Vec<u64>, Vec<u64>) {
        let old = |seen: &IdMap<i64>| -> Vec<u64> {
            seen.iter().filter(|(_, &at)| at < cutoff_ms).map(|(&id, _)| id).collect()
        };
        let (stacks, series) = (old(&self.stack_seen), old(&self.series_seen));
        for id in &stacks {
            self.stacks.remove(id);
            self.stack_seen.remove(id);
        }
        self.names.forgot(stacks.len(), self.stacks.len());
        for id in &series {
            if let Some(labels) = self.series.remove(id) {
                let service = labels.get("service").map_or("", String::as_str);
                if let Some(ids) = self.by_service.get_mut(service) {
                    ids.remove(id);
                    if ids.is_empty() {
                        self.by_service.remove(service);
                    }
                }
            }
            self.series_seen.remove(id);
        }
        (stacks, series)
    }

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
    /// Records written since start, across files; numbers each record.
    appended: u64,
    /// Bytes in the current file, and how many of them are known durable.
    len: u64,
    synced_len: u64,
    /// Written, waiting for the fsync that acknowledges them.
    unsynced: Vec<(u64, Batch, Option<BatchKey>)>,
    /// Outcomes of records synced by another thread's fsync, until their
    /// own thread picks them up.
    outcomes: HashMap<u64, Result<(), String>>,
    recent: RecentBatches,
    /// Ids written but not yet acknowledged: a concurrent retry must wait.
    in_flight: HashSet<BatchKey>,
    /// Set when no WAL file can be written: why, and when to try again.
    broken: Option<(String, Instant)>,
    /// An fsync of records taken from `unsynced` runs without the lock:
    /// others keep writing, and the next fsync covers what they wrote.
    syncing: bool,
    /// A writer waits to abandon the file (see `append`): no new fsync starts.
    cutting: bool,
}

#[derive(Default)]
struct Counters {
    fsyncs: AtomicU64,
    fsync_failures: AtomicU64,
    write_failures: AtomicU64,
    corrupt_records: AtomicU64,
    quarantined_files: AtomicU64,
}

pub struct EmbeddedStore {
    dir: PathBuf,
    opts: StoreOptions,
    db: Database,
    // Lock order: wal -> mem -> segments -> dict.
    wal: Mutex<WalState>,
    wal_bytes: AtomicU64,
    flush_failing: AtomicBool,
    counters: Counters,
    mem: RwLock<Mem>,
    segments: RwLock<Vec<SegmentMeta>>,
    dict: RwLock<Dict>,
    // Serializes flush and maintenance, which both rewrite the catalog.
    flush_lock: Mutex<()>,
    /// Signalled when an fsync without the lock, or a cut, ends.
    sync_done: Condvar,
    next_segment: AtomicU64,
    totals: totals::Cache,
    results: Results,
}

/// A segment file just written, with the per-stack totals its catalog entry
/// gets when they pay.
struct Written {
    meta: SegmentMeta,
    totals: Option<Vec<u8>>,
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
        let db = Database::builder()
            .set_cache_size(CATALOG_CACHE_BYTES)
            .create(dir.join("catalog.redb"))
            .context("opening catalog")?;
        let txn = db.begin_write()?;
        txn.open_table(STACKS)?;
        txn.open_table(SERIES)?;
        txn.open_table(SEGMENTS)?;
        txn.open_table(STACK_TOTALS)?;
        txn.open_table(META)?;
        txn.open_table(BATCH_IDS)?;
        txn.open_table(STACK_SEEN)?;
        txn.open_table(SERIES_SEEN)?;
        txn.commit()?;
        let now = now_ms();
        let mut recent = RecentBatches::new(opts.dedup_window_ms, opts.dedup_max_ids);

        let mut dict = Dict::default();
        let mut segments = Vec::new();
        let flushed_upto;
        {
            let txn = db.begin_read()?;
            for e in txn.open_table(STACKS)?.iter()? {
                let (k, v) = e?;
                let frames = dict.names.decode(v.value()).context("corrupt stack in catalog")?;
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
            for e in txn.open_table(STACK_SEEN)?.iter()? {
                let (k, v) = e?;
                dict.stack_seen.insert(k.value(), v.value());
            }
            for e in txn.open_table(SERIES_SEEN)?.iter()? {
                let (k, v) = e?;
                dict.series_seen.insert(k.value(), v.value());
            }
            // Catalogs from before garbage collection have no timestamps:
            // such entries count as seen now, so they live one more retention.
            for id in dict.stacks.keys() {
                dict.stack_seen.entry(*id).or_insert(now);
            }
            for id in dict.series.keys() {
                dict.series_seen.entry(*id).or_insert(now);
            }
            let mut ids: Vec<(i64, u128)> = Vec::new();
            for e in txn.open_table(BATCH_IDS)?.iter()? {
                let (k, v) = e?;
                ids.push((v.value(), k.value()));
            }
            ids.sort_unstable();
            for (at, key) in ids {
                recent.insert(key, at);
            }
            recent.expire(now);
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
        let counters = Counters::default();
        let mut last_seq = flushed_upto;
        let (mut replayed, mut duplicates) = (0usize, 0usize);
        let mut quarantine: Vec<(PathBuf, Vec<Batch>)> = Vec::new();
        for (seq, path) in wal::list(&wal_dir)? {
            last_seq = last_seq.max(seq);
            if seq <= flushed_upto {
                std::fs::remove_file(&path)?;
                continue;
            }
            let mut batches = Vec::new();
            let found = wal::replay(&path, |b| batches.push(b))?;
            replayed += found.records;
            if found.corrupt > 0 {
                counters.corrupt_records.fetch_add(found.corrupt as u64, Ordering::Relaxed);
                quarantine.push((path, batches.clone()));
            }
            for b in batches {
                if !apply_new(&mut mem, &mut dict, &mut recent, b, now) {
                    duplicates += 1;
                }
            }
        }
        if replayed > 0 {
            tracing::info!(records = replayed, duplicates, rows = mem.active_rows, "replayed WAL");
        }
        let seq = last_seq + 1;
        let mut writer = wal::Writer::new(seq, wal::create(&wal_dir, seq)?);
        let mut len = 0;
        if !quarantine.is_empty() {
            // The intact records of a corrupt file move to the new file, so
            // the corrupt one can be set aside without losing them.
            for b in quarantine.iter().flat_map(|(_, bs)| bs) {
                let framed = wal::frame(&wal::encode(b));
                writer.write(&framed).context("rewriting records of a corrupt WAL file")?;
                len += framed.len() as u64;
            }
            writer.sync().context("rewriting records of a corrupt WAL file")?;
            let qdir = wal_dir.join("quarantine");
            std::fs::create_dir_all(&qdir)?;
            for (path, _) in &quarantine {
                let to = qdir.join(path.file_name().expect("WAL files have names"));
                std::fs::rename(path, &to)?;
                tracing::error!(from = %path.display(), to = %to.display(), "quarantined a corrupt WAL file; its intact records were kept");
                counters.quarantined_files.fetch_add(1, Ordering::Relaxed);
            }
            std::fs::File::open(&wal_dir)?.sync_all()?;
        }
        let wal_bytes: u64 = wal::list(&wal_dir)?
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let next_segment = segments.iter().map(|s| s.id + 1).max().unwrap_or(1);
        Ok(EmbeddedStore {
            dir: dir.to_owned(),
            opts: opts.clone(),
            db,
            wal: Mutex::new(WalState {
                writer,
                appended: 0,
                len,
                synced_len: len,
                unsynced: Vec::new(),
                outcomes: HashMap::new(),
                recent,
                in_flight: HashSet::new(),
                broken: None,
                syncing: false,
                cutting: false,
            }),
            wal_bytes: AtomicU64::new(wal_bytes),
            flush_failing: AtomicBool::new(false),
            counters,
            mem: RwLock::new(mem),
            segments: RwLock::new(segments),
            dict: RwLock::new(dict),
            flush_lock: Mutex::new(()),
            sync_done: Condvar::new(),
            next_segment: AtomicU64::new(next_segment),
            totals: totals::Cache::new(opts.totals_cache_bytes),
            results: Results::new(opts.result_cache_bytes),
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

    /// The WAL state once no fsync runs without the lock: the file may
    /// then be switched or cut.
    fn settled_wal(&self) -> MutexGuard<'_, WalState> {
        self.wait_for_fsync(lock(&self.wal))
    }

    fn wait_for_fsync<'a>(&'a self, mut w: MutexGuard<'a, WalState>) -> MutexGuard<'a, WalState> {
        while w.syncing {
            w = self.sync_done.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        w
    }

    /// Starts a new WAL file and turns the active buffer into a pending one.
    fn rotate(&self) -> anyhow::Result<()> {
        let mut w = self.settled_wal();
        // Written records must be in the buffer before it is set aside, or
        // their WAL file could be deleted with their rows still unflushed.
        // Synced with the lock held, so none is written to this file after.
        self.sync_unsynced(&mut w);
        let mut mem = write(&self.mem);
        if mem.active_rows == 0 {
            return Ok(());
        }
        let old = w.writer.seq;
        self.start_new_file(&mut w)?;
        let buf = std::mem::take(&mut mem.active);
        let ids = std::mem::take(&mut mem.active_ids);
        mem.active_rows = 0;
        mem.flushing.push(Pending {
            wal_upto: old,
            buf: Arc::new(buf),
            ids: Arc::new(ids),
        });
        Ok(())
    }

    /// Switches to WAL file `seq + 1`; if that fails, ingest is refused
    /// until a later attempt succeeds.
    fn start_new_file(&self, w: &mut WalState) -> anyhow::Result<()> {
        debug_assert!(!w.syncing, "the file is switched under an fsync");
        let seq = w.writer.seq + 1;
        match wal::create(&self.wal_dir(), seq) {
            Ok(file) => {
                w.writer = wal::Writer::new(seq, file);
                w.len = 0;
                w.synced_len = 0;
                w.broken = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot start a WAL file; refusing ingest until it works");
                w.broken = Some((format!("cannot write the WAL: {e:#}"), Instant::now()));
                Err(e)
            }
        }
    }

    /// Fsyncs every written record with the lock held, then settles them.
    fn sync_unsynced(&self, w: &mut WalState) {
        if w.unsynced.is_empty() {
            return;
        }
        let records = std::mem::take(&mut w.unsynced);
        let len = w.len;
        let synced = w.writer.sync();
        self.settle(w, records, len, synced);
    }

    /// Fsyncs every written record without holding the lock, so writers
    /// keep writing meanwhile (group commit), then settles them.
    fn sync_shared<'a>(&'a self, mut w: MutexGuard<'a, WalState>) -> MutexGuard<'a, WalState> {
        let records = std::mem::take(&mut w.unsynced);
        let len = w.len;
        let file = w.writer.file();
        w.syncing = true;
        drop(w);
        let synced = file.sync_data();
        let mut w = lock(&self.wal);
        w.syncing = false;
        self.settle(&mut w, records, len, synced);
        self.sync_done.notify_all();
        w
    }

    /// Applies the batches of records fsynced up to `len` (success) or
    /// abandons the file (failure); records each outcome for its writer.
    fn settle(&self, w: &mut WalState, records: Vec<(u64, Batch, Option<BatchKey>)>, len: u64, synced: std::io::Result<()>) {
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        match synced {
            Ok(()) => {
                w.synced_len = len;
                let now = now_ms();
                let mut changed = Vec::with_capacity(records.len());
                {
                    let mut mem = write(&self.mem);
                    let mut dict = write(&self.dict);
                    for (n, batch, key) in records {
                        if let Some(key) = key {
                            w.in_flight.remove(&key);
                            w.recent.insert(key, now);
                            mem.active_ids.push((key, now));
                        }
                        let windows = batch.rows.iter().map(|r| r.ts_ms);
                        if let (Some(first), Some(last)) = (windows.clone().min(), windows.max()) {
                            changed.push((batch.service.clone(), first, last));
                        }
                        apply(&mut mem, &mut dict, batch);
                        w.outcomes.insert(n, Ok(()));
                    }
                }
                // Only once the rows are visible, so a query that starts
                // after this sees them.
                for (service, first, last) in changed {
                    self.results.changed(&service, first, last);
                }
            }
            Err(e) => {
                self.counters.fsync_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = records.len(), file = w.writer.seq, "WAL fsync failed; not acknowledging, abandoning the file");
                for (n, _, key) in records {
                    if let Some(key) = key {
                        w.in_flight.remove(&key);
                    }
                    w.outcomes.insert(n, Err(format!("storing the batch failed (WAL fsync: {e}); retry")));
                }
                self.abandon_file(w);
            }
        }
    }

    /// Cuts the current file back to its synced length (the rest may or may
    /// not be on disk) and moves on to a new file. Records written since the
    /// last fsync (another writer's, waiting for theirs) went with the rest,
    /// or are in a file no later fsync covers: they fail, never to be
    /// acknowledged.
    fn abandon_file(&self, w: &mut WalState) {
        if let Err(e) = w.writer.truncate(w.synced_len) {
            tracing::error!(error = %e, file = w.writer.seq, "cannot cut the WAL file back to its synced length");
        }
        let cut = w.len - w.synced_len;
        self.wal_bytes.fetch_sub(cut.min(self.wal_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        w.len = w.synced_len;
        for (n, _, key) in std::mem::take(&mut w.unsynced) {
            if let Some(key) = key {
                w.in_flight.remove(&key);
            }
            w.outcomes.insert(n, Err("storing the batch failed (its WAL file was abandoned); retry".into()));
        }
        let _ = self.start_new_file(w);
    }

    /// Why ingest must wait, if it must.
    fn busy(&self, w: &mut WalState) -> Option<String> {
        if let Some((why, since)) = &w.broken {
            if since.elapsed() < REOPEN_BACKOFF {
                return Some(why.clone());
            }
            if self.start_new_file(w).is_err() {
                return w.broken.as_ref().map(|(why, _)| why.clone());
            }
        }
        if self.flush_failing.load(Ordering::Relaxed) {
            return Some("writing segments failed; ingest resumes once a flush succeeds".into());
        }
        let rows = read(&self.mem).buffered_rows();
        if rows > self.opts.max_buffered_rows {
            return Some(format!("{rows} rows wait for a flush (limit {})", self.opts.max_buffered_rows));
        }
        let bytes = self.wal_bytes.load(Ordering::Relaxed);
        if bytes > self.opts.max_wal_bytes {
            return Some(format!("the WAL holds {bytes} bytes (limit {})", self.opts.max_wal_bytes));
        }
        None
    }

    fn flush_pending(&self) -> anyhow::Result<()> {
        self.rotate()?;
        loop {
            let next = read(&self.mem).flushing.first().map(|p| Pending {
                wal_upto: p.wal_upto,
                buf: p.buf.clone(),
                ids: p.ids.clone(),
            });
            let Some(p) = next else { break };
            let rows: usize = p.buf.values().map(Vec::len).sum();
            self.persist(&p)?;
            for (seq, path) in wal::list(&self.wal_dir())? {
                if seq <= p.wal_upto {
                    let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                    std::fs::remove_file(path)?;
                    self.wal_bytes.fetch_sub(len.min(self.wal_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
                }
            }
            tracing::debug!(rows, wal_upto = p.wal_upto, "flushed buffer to segments");
        }
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
            for w in &written {
                let _ = std::fs::remove_file(self.seg_path(&w.meta));
            }
            let mut d = write(&self.dict);
            d.new_stacks.extend(stack_ids);
            d.new_series.extend(series_ids);
            return Err(e);
        }
        let mut mem = write(&self.mem);
        let mut segs = write(&self.segments);
        segs.extend(written.into_iter().map(|w| w.meta));
        mem.flushing.retain(|q| !Arc::ptr_eq(&q.buf, &p.buf));
        Ok(())
    }

    fn persist_inner(
        &self,
        p: &Pending,
        stack_ids: &[u64],
        series_ids: &[u64],
        written: &mut Vec<Written>,
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
                written.push(self.write_segment(service, kind, &rows, 0)?);
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
            catalog_segments(&txn, written)?;
            let mut t = txn.open_table(BATCH_IDS)?;
            for (key, at) in p.ids.iter() {
                t.insert(key, at)?;
            }
            let (mut stacks, mut series) = (HashSet::new(), HashSet::new());
            for r in p.buf.values().flatten() {
                stacks.insert(r.stack_id);
                series.insert(r.series_id);
            }
            let mut t = txn.open_table(STACK_SEEN)?;
            for id in stacks {
                if let Some(at) = d.stack_seen.get(&id) {
                    t.insert(id, at)?;
                }
            }
            let mut t = txn.open_table(SERIES_SEEN)?;
            for id in series {
                if let Some(at) = d.series_seen.get(&id) {
                    t.insert(id, at)?;
                }
            }
            txn.open_table(META)?.insert(WAL_FLUSHED_UPTO, p.wal_upto)?;
        }
        drop(d);
        txn.commit()?;
        Ok(())
    }

    /// Writes one segment file of normalized rows; `resolution_ms` 0 means
    /// ingest resolution.
    fn write_segment(
        &self,
        service: &str,
        kind: &str,
        rows: &[Row],
        resolution_ms: i64,
    ) -> anyhow::Result<Written> {
        let totals = totals::of(rows);
        let mut meta = SegmentMeta {
            id: self.next_segment.fetch_add(1, Ordering::SeqCst),
            service: service.to_owned(),
            kind: kind.to_owned(),
            min_ts: rows.iter().map(|r| r.ts_ms).min().unwrap_or(0),
            max_ts: rows.iter().map(|r| r.ts_ms).max().unwrap_or(0),
            rows: rows.len() as u64,
            bytes: 0,
            resolution_ms,
            summary: Some(self.summarize(rows)),
            stack_totals: Some(totals.is_some()),
        };
        meta.bytes = segment::write(&self.seg_path(&meta), rows)?;
        Ok(Written {
            meta,
            totals: totals.map(|t| totals::encode(&t)),
        })
    }

    /// Sums the rows of buffers and segments that a query selects.
    fn scan(&self, sel: &Selector, by: GroupBy) -> StoreResult<Aggregate> {
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
                    s.spawn(move || -> StoreResult<Aggregate> {
                        let mut part = Aggregate::new();
                        for m in mine {
                            sel.cancel.check()?;
                            let inside = m.min_ts >= sel.from_ms && m.max_ts < sel.until_ms;
                            let dst = part.entry(m.kind.clone()).or_default();
                            if inside && allowed.is_none() && self.add_precomputed(m, by, sel.from_ms, dst)? {
                                continue;
                            }
                            let scan = Scan {
                                time: (!inside).then_some((sel.from_ms, sel.until_ms)),
                                series: allowed,
                                by,
                                from_ms: sel.from_ms,
                            };
                            match segment::aggregate(&self.seg_path(m), &scan, dst) {
                                Ok(()) => {}
                                // Compacted or expired after we listed it.
                                Err(e) if is_not_found(&e) => {}
                                Err(e) => {
                                    return Err(e.context(format!("reading segment {}", m.id)).into())
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

    /// Adds a segment's whole content from what was computed when it was
    /// written, without opening its file: the per-stack totals, or the
    /// summary's windows for a timeline. False when there is none.
    fn add_precomputed(
        &self,
        meta: &SegmentMeta,
        by: GroupBy,
        from_ms: i64,
        out: &mut HashMap<u64, i64>,
    ) -> anyhow::Result<bool> {
        match by {
            GroupBy::Stack => {
                let Some(totals) = self.stack_totals(meta)? else { return Ok(false) };
                out.reserve(totals.len());
                for &(stack, value) in totals.iter().filter(|(_, v)| *v != 0) {
                    *out.entry(stack).or_insert(0) += value;
                }
            }
            GroupBy::Time { step_ms } => {
                let Some(summary) = &meta.summary else { return Ok(false) };
                for &(ts, value) in summary.windows.iter().filter(|(_, v)| *v != 0) {
                    *out.entry(segment::bucket(ts, from_ms, step_ms)).or_insert(0) += value;
                }
            }
        }
        Ok(true)
    }

    /// A segment's per-stack totals, if its entry has them and they read
    /// back whole; None sends the query to the rows.
    fn stack_totals(&self, meta: &SegmentMeta) -> anyhow::Result<Option<totals::Totals>> {
        if meta.stack_totals != Some(true) {
            return Ok(None);
        }
        if let Some(t) = self.totals.get(meta.id) {
            return Ok(Some(t));
        }
        let txn = self.db.begin_read()?;
        let Some(bytes) = txn.open_table(STACK_TOTALS)?.get(meta.id)? else {
            // Compacted or expired after the query listed it.
            return Ok(None);
        };
        let Some(t) = totals::decode(bytes.value()) else {
            tracing::warn!(segment = meta.id, "corrupt stack totals in the catalog; reading the segment's rows");
            return Ok(None);
        };
        self.totals.insert(meta.id, t.clone());
        Ok(Some(t))
    }

    fn summarize(&self, rows: &[Row]) -> Summary {
        let d = read(&self.dict);
        Summary::of(rows, |id| d.series.get(&id)?.get("host").cloned())
    }

    /// Summaries of segments written before summaries existed, read from
    /// their files once and kept in the catalog.
    fn summarize_legacy(&self, ids: &[u64]) -> anyhow::Result<()> {
        self.complete_legacy(|m| ids.contains(&m.id) && m.summary.is_none(), usize::MAX)
    }

    /// Per-stack totals for up to `max` segments written before totals
    /// existed.
    fn total_legacy(&self, max: usize) -> anyhow::Result<()> {
        self.complete_legacy(|m| m.stack_totals.is_none(), max)
    }

    /// Gives up to `max` segments that `wanted` picks what a segment written
    /// by an older version lacks (its summary, its per-stack totals), from
    /// one read of its rows, and keeps that in the catalog.
    fn complete_legacy(&self, wanted: impl Fn(&SegmentMeta) -> bool, max: usize) -> anyhow::Result<()> {
        let todo: Vec<SegmentMeta> = read(&self.segments)
            .iter()
            .filter(|m| wanted(m))
            .take(max)
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let mut done = Vec::new();
        for mut meta in todo {
            let mut rows = match segment::read_all(&self.seg_path(&meta)) {
                Ok(rows) => rows,
                // Compacted or expired after we listed it.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(e.context(format!("reading segment {}", meta.id))),
            };
            if meta.summary.is_none() {
                meta.summary = Some(self.summarize(&rows));
            }
            let mut stack_totals = None;
            if meta.stack_totals.is_none() {
                segment::normalize(&mut rows);
                stack_totals = totals::of(&rows).map(|t| totals::encode(&t));
                meta.stack_totals = Some(stack_totals.is_some());
            }
            done.push(Written { meta, totals: stack_totals });
        }
        let txn = self.db.begin_write()?;
        catalog_segments(&txn, &done)?;
        txn.commit()?;
        tracing::info!(segments = done.len(), "completed segments written by an older version");
        let mut segs = write(&self.segments);
        for w in done {
            if let Some(old) = segs.iter_mut().find(|s| s.id == w.meta.id) {
                *old = w.meta;
            }
        }
        Ok(())
    }

    /// Replaces `old` segments by `new` ones in catalog, list and disk.
    fn swap_segments(&self, old: &[SegmentMeta], new: Vec<Written>) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(SEGMENTS)?;
            let mut totals = txn.open_table(STACK_TOTALS)?;
            for m in old {
                t.remove(m.id)?;
                totals.remove(m.id)?;
            }
        }
        catalog_segments(&txn, &new)?;
        txn.commit()?;
        let gone: HashSet<u64> = old.iter().map(|m| m.id).collect();
        self.totals.forget(gone.iter().copied());
        {
            let mut segs = write(&self.segments);
            segs.retain(|m| !gone.contains(&m.id));
            segs.extend(new.iter().map(|w| w.meta.clone()));
        }
        // Downsampling moves rows to the start of their coarser window.
        for m in old.iter().chain(new.iter().map(|w| &w.meta)) {
            self.results.changed(&m.service, m.min_ts, m.max_ts);
        }
        for m in old {
            // A concurrent query may still read it: Unix keeps the inode alive.
            if let Err(e) = std::fs::remove_file(self.seg_path(m)) {
                tracing::warn!(error = %e, segment = m.id, "removing segment file");
            }
        }
        Ok(())
    }

    /// The widest time span one segment can cover: a segment lives until its
    /// newest row passes retention, so its oldest row may be this much older.
    fn widest_segment_ms(&self) -> i64 {
        let downsampled = self.opts.downsample.iter().map(|&(_, res)| res * 60);
        downsampled.fold(self.opts.segment_span_ms, i64::max)
    }

    /// Forgets stacks and series whose latest row is older than `cutoff_ms`:
    /// no segment can reference them any more, so the dictionaries hold only
    /// what retention keeps.
    fn collect_garbage(&self, cutoff_ms: i64) -> anyhow::Result<()> {
        let (stacks, series) = write(&self.dict).forget_before(cutoff_ms);
        if stacks.is_empty() && series.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(STACKS)?;
            let mut seen = txn.open_table(STACK_SEEN)?;
            for id in &stacks {
                t.remove(id)?;
                seen.remove(id)?;
            }
            let mut t = txn.open_table(SERIES)?;
            let mut seen = txn.open_table(SERIES_SEEN)?;
            for id in &series {
                t.remove(id)?;
                seen.remove(id)?;
            }
        }
        txn.commit()?;
        tracing::info!(stacks = stacks.len(), series = series.len(), "forgot dictionary entries past retention");
        Ok(())
    }

    fn forget_batch_ids_before(&self, before_ms: i64) -> anyhow::Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(BATCH_IDS)?;
            t.retain(|_, at| at >= before_ms)?;
        }
        txn.commit()?;
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
            let new = self.write_segment(&service, &kind, &rows, res_ms)?;
            tracing::info!(%service, %kind, segments = old.len(), rows_before = before, rows_after = new.meta.rows, res_ms, "downsampled");
            self.swap_segments(&old, vec![new])?;
        }
        Ok(())
    }
}

/// Adds catalog entries (and their totals) for segment files written.
fn catalog_segments(txn: &redb::WriteTransaction, written: &[Written]) -> anyhow::Result<()> {
    let mut t = txn.open_table(SEGMENTS)?;
    let mut totals = txn.open_table(STACK_TOTALS)?;
    for w in written {
        t.insert(w.meta.id, serde_json::to_string(&w.meta)?.as_str())?;
        if let Some(bytes) = &w.totals {
            totals.insert(w.meta.id, bytes.as_slice())?;
        }
    }
    Ok(())
}

fn apply(mem: &mut Mem, dict: &mut Dict, b: Batch) {
    for (id, frames) in b.stacks {
        if let std::collections::hash_map::Entry::Vacant(e) = dict.stacks.entry(id) {
            e.insert(dict.names.share(&frames));
            dict.new_stacks.push(id);
        }
    }
    for (id, labels) in b.series {
        dict.add_series(id, Arc::new(labels), false);
    }
    dict.saw(&b.rows);
    mem.active_rows += b.rows.len();
    mem.active
        .entry((b.service, b.kind))
        .or_default()
        .extend(b.rows);
}

/// Applies a replayed batch unless its id was already applied (a retry
/// whose first attempt reached the disk although its fsync failed). Returns
/// whether it was applied.
fn apply_new(mem: &mut Mem, dict: &mut Dict, recent: &mut RecentBatches, b: Batch, now: i64) -> bool {
    if let Some(key) = b.id.as_deref().map(recent::key) {
        if recent.contains(key) {
            return false;
        }
        recent.insert(key, now);
        mem.active_ids.push((key, now));
    }
    apply(mem, dict, b);
    true
}

/// The refusal of a retry from before what the store remembers.
pub(super) fn unverifiable(since_ms: i64, horizon_ms: i64) -> Refused {
    Refused::Unverifiable(format!(
        "this batch may have been stored {}s before the oldest batch id this server remembers: \
         it cannot tell a retry from a first delivery, so it does not store it again",
        horizon_ms.saturating_sub(since_ms) / 1000
    ))
}


fn encode_frames(frames: &[Arc<str>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
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

impl EmbeddedStore {
    /// Writes a batch's WAL record: the number to settle it by, or None for
    /// a batch already stored.
    fn write_record(&self, batch: Batch) -> StoreResult<Option<u64>> {
        let framed = wal::frame(&wal::encode(&batch));
        if framed.len() > wal::MAX_RECORD {
            return Err(Refused::TooLarge(format!(
                "the batch encodes to {} bytes, over the {} bytes a WAL record may hold",
                framed.len(),
                wal::MAX_RECORD
            ))
            .into());
        }
        let key = batch.id.as_deref().map(recent::key);
        let my = {
            let mut w = lock(&self.wal);
            if let Some(key) = key {
                if w.recent.contains(key) {
                    return Ok(None);
                }
                if w.in_flight.contains(&key) {
                    return Err(Refused::Busy("a batch with this id is being stored right now".into()).into());
                }
                if let Some(since) = batch.maybe_stored_since_ms {
                    let horizon = w.recent.horizon_ms(now_ms());
                    if since <= horizon {
                        return Err(unverifiable(since, horizon).into());
                    }
                }
            }
            if let Some(why) = self.busy(&mut w) {
                return Err(Refused::Busy(why).into());
            }
            // A failed write left a partial record that waits to be cut.
            if w.cutting {
                return Err(Refused::Busy("the WAL is being cut back after a failed write".into()).into());
            }
            if let Err(e) = w.writer.write(&framed) {
                self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                // A partial record must not stay in front of later ones.
                let len = w.len;
                if w.writer.truncate(len).is_err() {
                    // An fsync in flight covers records before this one:
                    // it ends before the file is cut back, and no other starts.
                    w.cutting = true;
                    w = self.wait_for_fsync(w);
                    self.abandon_file(&mut w);
                    w.cutting = false;
                    self.sync_done.notify_all();
                }
                return Err(Refused::Busy(format!("writing the WAL failed: {e}")).into());
            }
            w.len += framed.len() as u64;
            self.wal_bytes.fetch_add(framed.len() as u64, Ordering::Relaxed);
            w.appended += 1;
            let my = w.appended;
            if let Some(key) = key {
                w.in_flight.insert(key);
            }
            w.unsynced.push((my, batch, key));
            my
        };
        Ok(Some(my))
    }

    /// Waits until record `my` is durable (or failed). Group commit: it is
    /// settled, or in the fsync running now, or waiting for the next, which
    /// this thread runs if nobody else does.
    fn wait_durable(&self, my: u64) -> StoreResult<()> {
        let mut w = lock(&self.wal);
        loop {
            if let Some(outcome) = w.outcomes.remove(&my) {
                return outcome.map_err(|why| Refused::Busy(why).into());
            }
            if w.syncing || w.cutting {
                w = self.sync_done.wait(w).unwrap_or_else(|e| e.into_inner());
            } else {
                w = self.sync_shared(w);
            }
        }
    }
}

impl Store for EmbeddedStore {
    fn append(&self, batch: Batch) -> StoreResult<Appended> {
        match self.write_record(batch)? {
            None => Ok(Appended::Duplicate),
            Some(my) => self.wait_durable(my).map(|()| Appended::Stored),
        }
    }

    /// Every record is written before the first is waited for, so one fsync
    /// covers them all.
    fn append_all(&self, batches: Vec<Batch>) -> StoreResult<Vec<Appended>> {
        let mut written = Vec::with_capacity(batches.len());
        let mut failed = None;
        for batch in batches {
            match self.write_record(batch) {
                Ok(my) => written.push(my),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Records written before a failure are settled all the same, so
        // none is left waiting with its id marked in flight.
        let mut outcomes = Vec::with_capacity(written.len());
        for my in written {
            match my {
                None => outcomes.push(Appended::Duplicate),
                Some(my) => match self.wait_durable(my) {
                    Ok(()) => outcomes.push(Appended::Stored),
                    Err(e) => failed = failed.or(Some(e)),
                },
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(outcomes),
        }
    }

    fn aggregate(&self, sel: &Selector, by: GroupBy) -> StoreResult<Aggregate> {
        if let Some(answer) = self.results.get(sel, by) {
            return Ok(answer);
        }
        let ticket = self.results.ticket();
        let answer = self.scan(sel, by)?;
        self.results.put(sel, by, ticket, &answer, now_ms());
        Ok(answer)
    }

    fn overview(&self, grid: Grid, cancel: &Cancel) -> StoreResult<Overview> {
        let legacy: Vec<u64> = read(&self.segments)
            .iter()
            .filter(|m| m.summary.is_none() && grid.meets(m.min_ts, m.max_ts))
            .map(|m| m.id)
            .collect();
        if !legacy.is_empty() {
            self.summarize_legacy(&legacy)?;
        }
        cancel.check()?;
        let mut out = Overview::new();
        let mem = read(&self.mem);
        let mut buffered_series: HashMap<&str, HashSet<u64>> = HashMap::new();
        let bufs = std::iter::once(&mem.active).chain(mem.flushing.iter().map(|p| &*p.buf));
        for buf in bufs {
            for ((service, kind), rows) in buf {
                let mut inside = rows.iter().filter(|r| grid.contains(r.ts_ms)).peekable();
                if inside.peek().is_none() {
                    continue;
                }
                let t = out.entry(service.clone()).or_default();
                let series = buffered_series.entry(service).or_default();
                let buckets = t.buckets(&grid, kind);
                let (mut last_seen, mut last_series) = (i64::MIN, None);
                for r in inside {
                    buckets[grid.index(r.ts_ms)] += r.value;
                    last_seen = last_seen.max(r.ts_ms);
                    // Rows of a batch come in runs of one series.
                    if last_series != Some(r.series_id) {
                        series.insert(r.series_id);
                        last_series = Some(r.series_id);
                    }
                }
                t.last_seen_ms = t.last_seen_ms.max(last_seen);
            }
        }
        for m in read(&self.segments).iter() {
            let Some(summary) = m.summary.as_ref().filter(|_| grid.meets(m.min_ts, m.max_ts)) else {
                continue;
            };
            let mut inside = summary.windows.iter().filter(|(ts, _)| grid.contains(*ts)).peekable();
            if inside.peek().is_none() {
                continue;
            }
            let t = match out.get_mut(&m.service) {
                Some(t) => t,
                None => out.entry(m.service.clone()).or_default(),
            };
            let buckets = t.buckets(&grid, &m.kind);
            let mut last_seen = i64::MIN;
            for &(ts, value) in inside {
                buckets[grid.index(ts)] += value;
                last_seen = ts;
            }
            t.last_seen_ms = t.last_seen_ms.max(last_seen);
            let seen = summary.hosts.iter().filter(|(_, a, b)| grid.meets(*a, *b));
            t.hosts.extend(seen.map(|(h, _, _)| h.clone()));
        }
        let d = read(&self.dict);
        for (service, ids) in buffered_series {
            let t = out.get_mut(service).expect("buffered services have totals");
            let hosts = ids.iter().filter_map(|id| d.series.get(id)?.get("host"));
            t.hosts.extend(hosts.cloned());
        }
        Ok(out)
    }

    fn stack(&self, id: u64) -> StoreResult<Option<Frames>> {
        Ok(read(&self.dict).stacks.get(&id).cloned())
    }

    /// The dictionary is shared by all services.
    fn unknown_stacks(&self, _service: &str, ids: &[u64]) -> usize {
        let d = read(&self.dict);
        ids.iter().filter(|id| !d.stacks.contains_key(id)).count()
    }

    fn services(&self) -> StoreResult<Vec<String>> {
        let mut v: Vec<String> = read(&self.dict).by_service.keys().cloned().collect();
        v.sort();
        Ok(v)
    }

    fn series(&self, service: &str) -> StoreResult<Vec<Arc<Labels>>> {
        let d = read(&self.dict);
        Ok(d.by_service
            .get(service)
            .into_iter()
            .flatten()
            .map(|id| d.series[id].clone())
            .collect())
    }

    fn flush(&self) -> StoreResult<()> {
        let _f = lock(&self.flush_lock);
        let result = self.flush_pending();
        self.flush_failing.store(result.is_err(), Ordering::Relaxed);
        Ok(result?)
    }

    fn maintain(&self, now_ms: i64) -> StoreResult<()> {
        let _f = lock(&self.flush_lock);
        let window = {
            let mut w = lock(&self.wal);
            w.recent.expire(now_ms);
            w.recent.window_ms()
        };
        self.forget_batch_ids_before(now_ms - window)?;
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
        // A bounded share per pass keeps maintenance short after an upgrade.
        self.total_legacy(LEGACY_TOTALS_PER_PASS)?;
        if let Some(ret) = self.opts.retention_ms {
            self.collect_garbage(now_ms - ret - self.widest_segment_ms())?;
        }
        Ok(())
    }

    fn buffered_rows(&self) -> usize {
        read(&self.mem).buffered_rows()
    }

    fn stats(&self) -> StoreStats {
        let (recent_batch_ids, busy) = {
            let mut w = lock(&self.wal);
            (w.recent.len() as u64, self.busy(&mut w))
        };
        let c = &self.counters;
        let d = read(&self.dict);
        StoreStats {
            wal_fsyncs: c.fsyncs.load(Ordering::Relaxed),
            wal_fsync_failures: c.fsync_failures.load(Ordering::Relaxed),
            wal_write_failures: c.write_failures.load(Ordering::Relaxed),
            wal_corrupt_records: c.corrupt_records.load(Ordering::Relaxed),
            wal_quarantined_files: c.quarantined_files.load(Ordering::Relaxed),
            wal_bytes: self.wal_bytes.load(Ordering::Relaxed),
            recent_batch_ids,
            busy,
            dictionary_stacks: d.stacks.len() as u64,
            dictionary_series: d.series.len() as u64,
            dictionary_frame_names: d.names.names.len() as u64,
            totals_cache_bytes: self.totals.bytes() as u64,
            result_cache_bytes: self.results.bytes() as u64,
        }
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
    use crate::store::{series_id, stack_id, Matcher};
    use std::collections::BTreeSet;

    fn opts() -> StoreOptions {
        StoreOptions {
            segment_span_ms: 600_000,
            retention_ms: Some(86_400_000),
            downsample: vec![(3_600_000, 60_000)],
            ..StoreOptions::default()
        }
    }

    fn batch(ts: i64, value: i64) -> Batch {
        let frames: Frames = ["main", "f"].map(Arc::from).into();
        let labels = Labels::from([("service".to_string(), "svc".to_string())]);
        let (st, se) = (stack_id(&frames), series_id(&labels));
        Batch {
            id: None,
            maybe_stored_since_ms: None,
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
            cancel: Default::default(),
        };
        s.aggregate(&sel, GroupBy::Stack)
            .unwrap()
            .values()
            .flat_map(|m| m.values())
            .sum()
    }

    /// A batch of `service` on `host` with one row at `ts`.
    fn hosted(service: &str, host: &str, ts: i64, value: i64) -> Batch {
        let mut b = batch(ts, value);
        let labels = Labels::from([
            ("service".to_string(), service.to_string()),
            ("host".to_string(), host.to_string()),
        ]);
        let se = series_id(&labels);
        b.service = service.into();
        b.series = vec![(se, labels)];
        b.rows[0].series_id = se;
        b
    }

    #[test]
    fn overview_is_the_same_from_buffers_segments_and_old_segments() {
        let dir = tempfile::tempdir().unwrap();
        let base = now_ms().div_euclid(600_000) * 600_000 - 1_200_000;
        let grid = Grid { from_ms: base, until_ms: base + 1_200_000, step_ms: 300_000 };
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        s.append(hosted("web", "h1", base, 10)).unwrap();
        s.append(hosted("web", "h2", base + 700_000, 5)).unwrap();
        s.append(hosted("db", "h1", base + 10_000, 3)).unwrap();
        // Outside the grid on both sides.
        s.append(hosted("web", "h3", base - 10_000, 100)).unwrap();
        s.append(hosted("cron", "h3", base + 1_200_000, 100)).unwrap();
        let from_buffers = s.overview(grid, &Cancel::default()).unwrap();
        assert_eq!(from_buffers.keys().collect::<Vec<_>>(), ["db", "web"]);
        let web = &from_buffers["web"];
        assert_eq!(web.kinds["on-cpu"], vec![10, 0, 5, 0]);
        assert_eq!(web.hosts, BTreeSet::from(["h1".to_string(), "h2".to_string()]));
        assert_eq!(web.last_seen_ms, base + 700_000);

        s.flush().unwrap();
        assert!(s.segment_count() >= 4);
        assert_eq!(s.overview(grid, &Cancel::default()).unwrap(), from_buffers);
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert_eq!(s.overview(grid, &Cancel::default()).unwrap(), from_buffers);
        // Segments written before summaries existed are read once, then
        // carry a summary in the catalog too.
        let txn = s.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(SEGMENTS).unwrap();
            for m in read(&s.segments).iter() {
                let old = SegmentMeta { summary: None, ..m.clone() };
                t.insert(m.id, serde_json::to_string(&old).unwrap().as_str()).unwrap();
            }
        }
        txn.commit().unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert!(read(&s.segments).iter().all(|m| m.summary.is_none()));
        assert_eq!(s.overview(grid, &Cancel::default()).unwrap(), from_buffers);
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        for m in read(&s.segments).iter() {
            assert_eq!(m.summary.is_some(), grid.meets(m.min_ts, m.max_ts), "{m:?}");
        }
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
        // And past retention everything goes, dictionaries included.
        let stack = batch(0, 1).stacks[0].0;
        assert!(s.stack(stack).unwrap().is_some());
        s.maintain(100 * 3_600_000).unwrap();
        assert_eq!(total(&s, 0, i64::MAX), 0);
        assert_eq!(s.segment_count(), 0);
        assert!(s.stack(stack).unwrap().is_none(), "stack forgotten");
        assert!(s.services().unwrap().is_empty(), "series forgotten");
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert!(s.stack(stack).unwrap().is_none() && s.services().unwrap().is_empty(), "forgotten in the catalog too");
    }

    #[test]
    fn stacks_share_their_frame_names_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let stack = |leaf: &str, ts: i64| {
            let mut b = batch(ts, 1);
            let frames: Frames = ["main", leaf].map(Arc::from).into();
            b.stacks = vec![(stack_id(&frames), frames)];
            b.rows[0].stack_id = b.stacks[0].0;
            b
        };
        let (old, recent) = (stack("old_leaf", 0), stack("recent_leaf", 90 * 3_600_000));
        let (old_id, recent_id) = (old.stacks[0].0, recent.stacks[0].0);
        let shares_main = |s: &EmbeddedStore| Arc::ptr_eq(&s.stack(old_id).unwrap().unwrap()[0], &s.stack(recent_id).unwrap().unwrap()[0]);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        s.append(old).unwrap();
        s.append(recent).unwrap();
        assert!(shares_main(&s), "two batches' `main` are one name in the dictionary");
        assert_eq!(s.stats().dictionary_frame_names, 3);
        s.flush().unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert!(shares_main(&s), "and again when read back from the catalog");
        // Past retention of the old stack: its own name goes, `main` stays.
        s.maintain(100 * 3_600_000).unwrap();
        assert!(s.stack(old_id).unwrap().is_none());
        assert_eq!(s.stats().dictionary_frame_names, 2);
        assert_eq!(&*s.stack(recent_id).unwrap().unwrap()[1], "recent_leaf");
    }

    /// Two stacks over two series and twelve windows of one 10-minute segment.
    fn busy_segment(s: &EmbeddedStore, base: i64) {
        for window in 0..12 {
            for (host, leaf, value) in [("h1", "f", 1), ("h2", "f", 2), ("h1", "g", 10)] {
                let mut b = hosted("svc", host, base + window * 10_000, value);
                let frames: Frames = ["main", leaf].map(Arc::from).into();
                b.stacks = vec![(stack_id(&frames), frames)];
                b.rows[0].stack_id = b.stacks[0].0;
                s.append(b).unwrap();
            }
        }
    }

    #[test]
    fn whole_segments_are_answered_from_their_totals_without_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let base = 6_000_000;
        let opts = || StoreOptions { result_cache_bytes: 0, ..opts() };
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        busy_segment(&s, base);
        let query = |s: &EmbeddedStore, from: i64, until: i64, by: GroupBy, host: Option<&str>| {
            let sel = Selector {
                service: "svc".into(),
                from_ms: from,
                until_ms: until,
                kinds: None,
                matchers: host.map(|h| Matcher::Eq("host".into(), h.into())).into_iter().collect(),
                cancel: Default::default(),
            };
            s.aggregate(&sel, by).unwrap()
        };
        let by_time = GroupBy::Time { step_ms: 30_000 };
        let whole = base..base + 600_000;
        let from_rows = [
            query(&s, whole.start, whole.end, GroupBy::Stack, None),
            query(&s, whole.start, whole.end, by_time, None),
            query(&s, whole.start + 20_000, whole.end, GroupBy::Stack, None),
        ];
        assert_eq!(from_rows[0]["on-cpu"].values().sum::<i64>(), 12 * 13);
        s.flush().unwrap();
        let seg = read(&s.segments)[0].clone();
        assert_eq!(seg.stack_totals, Some(true), "36 rows over 2 stacks: totals pay");

        // Without the file, only what its totals and summary answer still works.
        let file = s.seg_path(&seg);
        let rows = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(query(&s, whole.start, whole.end, GroupBy::Stack, None), from_rows[0]);
        assert_eq!(query(&s, whole.start, whole.end, by_time, None), from_rows[1]);
        assert_eq!(query(&s, whole.start - 600_000, whole.end + 600_000, GroupBy::Stack, None), from_rows[0]);
        let cut = query(&s, whole.start + 20_000, whole.end, GroupBy::Stack, None);
        assert!(cut.values().all(|m| m.is_empty()), "a cut segment needs its rows");
        std::fs::write(&file, rows).unwrap();
        assert_eq!(query(&s, whole.start + 20_000, whole.end, GroupBy::Stack, None), from_rows[2]);
        let h2 = query(&s, whole.start, whole.end, GroupBy::Stack, Some("h2"));
        assert_eq!(h2["on-cpu"].values().sum::<i64>(), 12 * 2, "a label filter reads the rows");

        // Read back from the catalog after a restart, and dropped with the segment.
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert_eq!(s.totals.bytes(), 0);
        assert_eq!(query(&s, whole.start, whole.end, GroupBy::Stack, None), from_rows[0]);
        assert!(s.totals.bytes() > 0);
        s.maintain(100 * 3_600_000 + base).unwrap();
        assert_eq!(s.segment_count(), 0);
        assert_eq!(s.totals.bytes(), 0);
        let txn = s.db.begin_read().unwrap();
        assert!(txn.open_table(STACK_TOTALS).unwrap().get(seg.id).unwrap().is_none());
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        let (threads, each) = (8, 50);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let s = &s;
                scope.spawn(move || {
                    for i in 0..each {
                        let mut b = batch((t * each + i) * 10_000, 1);
                        b.id = Some(format!("{t}-{i}"));
                        assert_eq!(s.append(b).unwrap(), Appended::Stored);
                    }
                });
            }
        });
        let appends = (threads * each) as u64;
        assert_eq!(total(&s, 0, i64::MAX), appends as i64);
        let fsyncs = s.stats().wal_fsyncs;
        assert!(fsyncs < appends, "{fsyncs} fsyncs for {appends} appends: none shared");
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert_eq!(total(&s, 0, i64::MAX), appends as i64, "all of them in the WAL");
    }

    #[test]
    fn records_written_before_an_abandoned_file_are_never_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        s.append(batch(0, 1)).unwrap();
        // Another writer's record, written and waiting for its fsync when a
        // write fails and the file cannot be cut back (the path that abandons).
        let record = wal::frame(&wal::encode(&batch(10_000, 5)));
        let mut w = lock(&s.wal);
        w.writer.write(&record).unwrap();
        w.len += record.len() as u64;
        w.appended += 1;
        let waiting = w.appended;
        w.unsynced.push((waiting, batch(10_000, 5), None));
        s.abandon_file(&mut w);
        assert!(matches!(w.outcomes.remove(&waiting), Some(Err(_))), "its bytes were cut: it must fail");
        drop(w);
        assert_eq!(total(&s, 0, i64::MAX), 1);
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        assert_eq!(total(&s, 0, i64::MAX), 1, "nothing of it comes back either");
    }

    #[test]
    fn segments_from_before_totals_get_them_at_maintenance() {
        let dir = tempfile::tempdir().unwrap();
        let base = 6_000_000;
        let opts = || StoreOptions { result_cache_bytes: 0, ..opts() };
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        busy_segment(&s, base);
        s.flush().unwrap();
        let seg = read(&s.segments)[0].clone();
        let txn = s.db.begin_write().unwrap();
        {
            let legacy = SegmentMeta { stack_totals: None, ..seg.clone() };
            txn.open_table(SEGMENTS).unwrap().insert(seg.id, serde_json::to_string(&legacy).unwrap().as_str()).unwrap();
            txn.open_table(STACK_TOTALS).unwrap().remove(seg.id).unwrap();
        }
        txn.commit().unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        let whole = Selector {
            service: "svc".into(),
            from_ms: base,
            until_ms: base + 600_000,
            kinds: None,
            matchers: vec![],
            cancel: Default::default(),
        };
        let from_rows = s.aggregate(&whole, GroupBy::Stack).unwrap();
        assert_eq!(s.totals.bytes(), 0, "no totals yet");
        s.maintain(base + 60_000).unwrap();
        assert_eq!(read(&s.segments)[0].stack_totals, Some(true));
        std::fs::remove_file(s.seg_path(&seg)).unwrap();
        assert_eq!(s.aggregate(&whole, GroupBy::Stack).unwrap(), from_rows, "answered from the totals");
    }

    #[test]
    fn answers_over_settled_ranges_are_kept_until_late_data_or_maintenance_changes_them() {
        let dir = tempfile::tempdir().unwrap();
        let base = 6_000_000;
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        busy_segment(&s, base);
        s.flush().unwrap();
        let cut = Selector {
            service: "svc".into(),
            from_ms: base + 20_000,
            until_ms: base + 600_000,
            kinds: None,
            matchers: vec![],
            cancel: Default::default(),
        };
        let sum = |agg: &Aggregate| agg.values().flat_map(|m| m.values()).sum::<i64>();
        assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 10 * 13);
        // Kept: answered again without the rows.
        let file = s.seg_path(&read(&s.segments)[0]);
        let rows = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 10 * 13);
        assert!(s.stats().result_cache_bytes > 0);
        std::fs::write(&file, rows).unwrap();

        // A late window inside the range drops the answer; one outside does not.
        s.append(hosted("svc", "h1", base + 700_000, 1000)).unwrap();
        assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 10 * 13);
        s.append(hosted("svc", "h3", base + 30_000, 1000)).unwrap();
        assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 10 * 13 + 1000);

        // Downsampling to minutes moves the windows of the first minute,
        // the late one included, to its start: out of the range.
        s.flush().unwrap();
        s.maintain(base + 4 * 3_600_000).unwrap();
        assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 6 * 13);
    }
}
