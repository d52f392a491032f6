//! Store stage: the data model and the `Store` trait, with the embedded
//! WAL + Parquet + redb implementation as the default backend and ClickHouse
//! as the scale-out one.
//!
//! A row is (service, kind, ts_ms, series_id, stack_id, value). `service` and
//! `kind` partition the data (files, buffers), so rows themselves carry only
//! the four numeric columns. Series labels include `service` (so a series id is
//! unique across services) but not `kind`: the same process produces on-CPU and
//! off-CPU rows under one series.

mod clickhouse;
mod embedded;
mod lru;
mod recent;
mod requests;
mod results;
mod segment;
mod totals;
mod wal;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use clickhouse::{ClickHouseOptions, ClickHouseRequests, ClickHouseStore};
pub use embedded::{EmbeddedStore, StoreOptions};
pub use requests::{RequestRow, RequestTable, RequestTableStats};

pub type Labels = BTreeMap<String, String>;
/// A stack's root-first frame names. Names are `Arc<str>` so that the
/// dictionary can hold each distinct name once for all the stacks that
/// have it (see `embedded::FrameNames`).
pub type Frames = Arc<[Arc<str>]>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// Start of the aggregation window, unix milliseconds.
    pub ts_ms: i64,
    pub series_id: u64,
    pub stack_id: u64,
    pub value: i64,
}

/// One ingest request after parsing. It carries every series it references
/// and every stack it sent with frames; the stacks it refers to by id only
/// were in the store's dictionary when it was appended, so at replay an
/// earlier WAL record or the catalog defines them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Idempotency key of the request (the agent's `batch_id`): a batch whose
    /// id was already stored is acknowledged again but not counted twice.
    pub id: Option<String>,
    /// When an earlier delivery of this batch may have been stored (server
    /// time, ms): a client's attempt that got no answer. A store that no
    /// longer remembers ids from then cannot tell this delivery from a
    /// retry, and refuses it ([`Refused::Unverifiable`]) rather than count
    /// it twice. Not persisted: it matters only at append.
    pub maybe_stored_since_ms: Option<i64>,
    pub service: String,
    pub kind: String,
    pub stacks: Vec<(u64, Frames)>,
    pub series: Vec<(u64, Labels)>,
    pub rows: Vec<Row>,
}

/// Wall-clock time, unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Content hash of a root-first stack, the one our agent's ingest format
/// refers to stacks by.
pub use profiler_pprof::stacks::stack_id;

pub fn series_id(labels: &Labels) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (k, v) in labels {
        h.update(k.as_bytes());
        h.update(&[0xfe]);
        h.update(v.as_bytes());
        h.update(&[0xff]);
    }
    h.digest()
}

/// Why a store could not do what it was asked. Every method of [`Store`]
/// that can fail says so with this, and callers match on it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The batch was refused; the client learns why.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// Nobody waits for the answer any more (see [`Cancel`]).
    #[error("query cancelled")]
    Cancelled,
    /// The store's disk or backend failed: an outage, never an empty answer.
    #[error("{0:#}")]
    Backend(#[from] anyhow::Error),
}

impl From<Cancelled> for StoreError {
    fn from(_: Cancelled) -> Self {
        StoreError::Cancelled
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Why a store refused a batch.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The store is behind or its disk failed: the client should retry later.
    #[error("{0}")]
    Busy(String),
    /// The batch can never be stored (larger than a WAL record may be).
    #[error("{0}")]
    TooLarge(String),
    /// A retry of a batch that may have been stored before the oldest id the
    /// store still remembers: storing it could count it twice.
    #[error("{0}")]
    Unverifiable(String),
}

/// What `append` did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored,
    /// A retry of a batch already stored: acknowledged, not counted again.
    Duplicate,
}

/// Fault counters of a store, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Fsyncs of WAL records; concurrent requests share them.
    pub wal_fsyncs: u64,
    pub wal_fsync_failures: u64,
    pub wal_write_failures: u64,
    /// Corrupt records skipped at replay, in quarantined files.
    pub wal_corrupt_records: u64,
    pub wal_quarantined_files: u64,
    pub wal_bytes: u64,
    /// Batch ids remembered to drop retries.
    pub recent_batch_ids: u64,
    /// Whether ingest is refused right now, and why.
    pub busy: Option<String>,
    /// Entries of the stack and series dictionaries held in memory, and the
    /// distinct frame names the stacks share.
    pub dictionary_stacks: u64,
    pub dictionary_series: u64,
    pub dictionary_frame_names: u64,
    /// Memory held by segments' per-stack totals read by queries.
    pub totals_cache_bytes: u64,
    /// Memory held by answers to queries over settled ranges.
    pub result_cache_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    Eq(String, String),
    Ne(String, String),
}

impl std::fmt::Display for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Matcher::Eq(k, v) => write!(f, "{k}={v}"),
            Matcher::Ne(k, v) => write!(f, "{k}!={v}"),
        }
    }
}

impl Matcher {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Matcher::Eq(k, v) => labels.get(k) == Some(v),
            Matcher::Ne(k, v) => labels.get(k) != Some(v),
        }
    }
}

/// What a query reads: one service, a half-open time range, optionally some
/// kinds only, and series whose labels match every matcher; `cancel` stops
/// the scan once nobody waits for it.
#[derive(Debug, Clone)]
pub struct Selector {
    pub service: String,
    pub from_ms: i64,
    pub until_ms: i64,
    pub kinds: Option<Vec<String>>,
    pub matchers: Vec<Matcher>,
    pub cancel: Cancel,
}

/// Set when the asker of a query is gone (it disconnected or its time ran
/// out), so scans stop between segments instead of finishing for nobody.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

#[derive(Debug, thiserror::Error)]
#[error("query cancelled")]
pub struct Cancelled;

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn check(&self) -> Result<(), Cancelled> {
        if self.0.load(Ordering::Relaxed) {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

impl Selector {
    /// Whether the selector reads `kind`: one it names, or without names any
    /// kind of profile values. Wait histograms (`profiler_pprof::waits`) are read
    /// only by name: they are never part of a profile's totals.
    pub fn wants_kind(&self, kind: &str) -> bool {
        match &self.kinds {
            Some(kinds) => kinds.iter().any(|k| k == kind),
            None => !profiler_pprof::waits::is_waits_kind(kind),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Stack,
    /// Buckets of `step_ms` starting at the selector's `from_ms`.
    Time {
        step_ms: i64,
    },
}

/// kind -> (stack id or bucket start) -> summed value.
pub type Aggregate = BTreeMap<String, HashMap<u64, i64>>;

pub fn merge_into(into: &mut Aggregate, from: Aggregate) {
    for (kind, m) in from {
        let dst = into.entry(kind).or_default();
        for (k, v) in m {
            *dst.entry(k).or_insert(0) += v;
        }
    }
}

/// The time grid of an overview: buckets of `step_ms` from `from_ms`, the
/// last one cut at `until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub from_ms: i64,
    pub until_ms: i64,
    pub step_ms: i64,
}

impl Grid {
    pub fn buckets(&self) -> usize {
        ((self.until_ms - self.from_ms + self.step_ms - 1) / self.step_ms).max(0) as usize
    }

    /// The bucket of a time the grid contains.
    pub fn index(&self, ts_ms: i64) -> usize {
        ((ts_ms - self.from_ms) / self.step_ms) as usize
    }

    pub fn contains(&self, ts_ms: i64) -> bool {
        (self.from_ms..self.until_ms).contains(&ts_ms)
    }

    /// Whether `[first, last]` (inclusive) meets the grid's range.
    pub fn meets(&self, first_ms: i64, last_ms: i64) -> bool {
        first_ms < self.until_ms && last_ms >= self.from_ms
    }
}

/// One service over an overview's range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceTotals {
    /// kind -> summed value per bucket of the grid.
    pub kinds: BTreeMap<String, Vec<i64>>,
    /// `host` label values of the series with rows in the range.
    pub hosts: BTreeSet<String>,
    /// Start of the latest window with rows in the range, unix ms.
    pub last_seen_ms: i64,
}

impl ServiceTotals {
    /// Adds a row (or a window's total) at `ts_ms`, which must lie in the grid.
    pub fn add(&mut self, grid: &Grid, kind: &str, ts_ms: i64, value: i64) {
        self.buckets(grid, kind)[grid.index(ts_ms)] += value;
        self.last_seen_ms = self.last_seen_ms.max(ts_ms);
    }

    /// The buckets of `kind`, zeroed the first time.
    pub fn buckets(&mut self, grid: &Grid, kind: &str) -> &mut [i64] {
        if !self.kinds.contains_key(kind) {
            self.kinds.insert(kind.to_owned(), vec![0; grid.buckets()]);
        }
        self.kinds.get_mut(kind).expect("inserted above")
    }
}

/// service -> its totals; services without rows in the range are absent.
pub type Overview = BTreeMap<String, ServiceTotals>;

/// Storage backend. Methods block (disk I/O, CPU-heavy scans): async callers
/// must run them on `spawn_blocking`.
pub trait Store: Send + Sync + 'static {
    /// Durably appends a batch: when this returns Ok the data survives a crash.
    /// Returns false (and stores nothing) if a batch with the same id was
    /// already stored.
    fn append(&self, batch: Batch) -> StoreResult<Appended>;
    /// Appends batches like [`Self::append`] does each, in order; one
    /// request's parts. Err if any failed (the others may be stored: their
    /// ids make a retry of the whole count once).
    fn append_all(&self, batches: Vec<Batch>) -> StoreResult<Vec<Appended>> {
        batches.into_iter().map(|b| self.append(b)).collect()
    }
    fn aggregate(&self, sel: &Selector, by: GroupBy) -> StoreResult<Aggregate>;
    /// Every service's totals per kind and bucket, hosts and last window
    /// over the grid's range: the fleet overview, in one pass.
    fn overview(&self, grid: Grid, cancel: &Cancel) -> StoreResult<Overview>;
    /// The frames of a stack; None when the store has no such stack.
    fn stack(&self, id: u64) -> StoreResult<Option<Frames>>;
    /// How many of `ids` this server cannot vouch it has the frames of for
    /// `service`: ingest by id refuses windows with any.
    fn unknown_stacks(&self, service: &str, ids: &[u64]) -> usize;
    fn services(&self) -> StoreResult<Vec<String>>;
    /// Label sets of every series of a service.
    fn series(&self, service: &str) -> StoreResult<Vec<Arc<Labels>>>;
    /// Moves buffered rows into immutable segments.
    fn flush(&self) -> StoreResult<()>;
    /// Rows waiting in the buffer for the next flush.
    fn buffered_rows(&self) -> usize;
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    /// Retention and downsampling, relative to `now_ms`.
    fn maintain(&self, now_ms: i64) -> StoreResult<()>;
    fn disk_bytes(&self) -> u64;
}
