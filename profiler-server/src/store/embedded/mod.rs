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

use profiler_pprof::waits::is_waits_kind;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

mod commit;
mod dict;
mod flush;
mod maintain;
mod scan;
#[cfg(test)]
mod tests;

use commit::apply_new;
use dict::encode_frames;
use flush::catalog_segments;

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
    /// The catalog; written (locked) only to compact it, see [`Self::compact_catalog`].
    db: RwLock<Database>,
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

impl EmbeddedStore {
    /// The catalog, to begin a transaction on (transactions do not borrow it).
    fn catalog(&self) -> std::sync::RwLockReadGuard<'_, Database> {
        read(&self.db)
    }

    /// redb keeps the pages that transactions freed in its file, and reuses them
    /// slowly: a catalog whose segments were swapped many times (downsampling)
    /// grew to twice the bytes it holds in the bench. When the file is over 64 MiB
    /// and more than half of it is free, it is compacted; a query reading the
    /// catalog at that moment puts it off to the next maintenance.
    fn compact_catalog(&self) -> anyhow::Result<()> {
        let path = self.dir.join("catalog.redb");
        let file = std::fs::metadata(&path).map_or(0, |m| m.len());
        if file < 64 << 20 {
            return Ok(());
        }
        let txn = self.catalog().begin_write()?;
        let stats = txn.stats()?;
        txn.abort()?;
        let held = stats.stored_bytes() + stats.metadata_bytes();
        if held * 2 > file {
            return Ok(());
        }
        let started = std::time::Instant::now();
        match write(&self.db).compact() {
            Ok(_) => {
                let now = std::fs::metadata(&path).map_or(0, |m| m.len());
                tracing::info!(before = file, after = now, took_ms = started.elapsed().as_millis() as u64, "compacted the catalog");
                Ok(())
            }
            Err(redb::CompactionError::TransactionInProgress) => Ok(()),
            Err(err) => Err(err).context("compacting the catalog"),
        }
    }
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
            db: RwLock::new(db),
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
            for ((service, kind), rows) in buf.iter().filter(|((_, kind), _)| !is_waits_kind(kind)) {
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
            let Some(summary) = m.summary.as_ref().filter(|_| grid.meets(m.min_ts, m.max_ts) && !is_waits_kind(&m.kind)) else {
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
        self.compact_catalog()?;
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
