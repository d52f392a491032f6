//! ClickHouse store: the scale-out backend. Any number of server instances
//! write to and read from one ClickHouse database over its HTTP interface
//! (the official `clickhouse` crate).
//!
//! Tables (created by versioned, idempotent migrations at start-up):
//! - `stacks` (ReplacingMergeTree, ORDER BY (service, stack_id)): frames of a
//!   content-hashed stack id; every instance computes the same id for the
//!   same frames, so duplicates written by several instances are identical
//!   and collapse on merge (readers take `any(frames)` per id).
//! - `series` (ReplacingMergeTree, ORDER BY (service, series_id)): label sets.
//! - `samples` (MergeTree, PARTITION BY toDate(ts), ORDER BY (service, kind,
//!   ts, series_id, stack_id), Delta/T64/ZSTD codecs, TTL = retention).
//! - `samples_1m` (SummingMergeTree, 1-minute rollup with its own longer TTL)
//!   fed by the materialized view `samples_1m_mv`. Queries read raw samples
//!   for the part of the range inside raw retention and the rollup for the
//!   part before it, so long ranges keep working after the raw TTL.
//!
//! `append` returns once ClickHouse acknowledged the inserts (durability is
//! ClickHouse's). Every table name is qualified with the database, and the
//! database name is restricted to `[A-Za-z0-9_]`.
//!
//! Retries are counted once by ClickHouse's insert deduplication: samples
//! are inserted with an `insert_deduplication_token` derived from the batch
//! id, and `samples` and `samples_1m` remember the last
//! [`DEDUPLICATION_WINDOW`] tokens (plain MergeTree tables keep none unless
//! `non_replicated_deduplication_window` is set). Dictionary rows need no
//! deduplication: a stack or series id always carries the same frames or
//! labels, and readers take `any()` per id.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::{
    now_ms, Aggregate, Appended, Batch, Cancel, Frames, Grid, GroupBy, Labels, Matcher, Overview, Selector,
    Store, StoreResult,
};

#[derive(Debug, Clone)]
pub struct ClickHouseOptions {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Raw samples TTL; None keeps them forever.
    pub retention_ms: Option<i64>,
    /// 1-minute rollup TTL; None keeps it forever.
    pub rollup_retention_ms: Option<i64>,
    /// Server-side batching of the many small INSERTs that many instances
    /// and agents make (`async_insert=1, wait_for_async_insert=1`: an ingest
    /// is still acknowledged only once its rows are written). False sends
    /// `async_insert=0`, overriding servers that batch by default (26.2+).
    pub async_insert: bool,
}

/// Inserts per table whose deduplication tokens ClickHouse keeps: a retry
/// that comes after this many other inserts is counted again. The default
/// window of replicated tables.
const DEDUPLICATION_WINDOW: u32 = 10_000;

/// Schema versions, applied in order; every statement is idempotent so
/// instances starting together cannot trip over each other. `{db}`,
/// `{samples_ttl}`, `{rollup_ttl}` and `{dedup_window}` are substituted.
const MIGRATIONS: &[(u32, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE IF NOT EXISTS {db}.stacks (
                service LowCardinality(String),
                stack_id UInt64,
                frames Array(String) CODEC(ZSTD(3)),
                INDEX stack_id_idx stack_id TYPE bloom_filter GRANULARITY 4
            ) ENGINE = ReplacingMergeTree ORDER BY (service, stack_id)",
            "CREATE TABLE IF NOT EXISTS {db}.series (
                service LowCardinality(String),
                series_id UInt64,
                label_names Array(String),
                label_values Array(String)
            ) ENGINE = ReplacingMergeTree ORDER BY (service, series_id)",
            "CREATE TABLE IF NOT EXISTS {db}.samples (
                service LowCardinality(String),
                kind LowCardinality(String),
                ts DateTime64(3) CODEC(Delta, ZSTD(1)),
                series_id UInt64 CODEC(ZSTD(1)),
                stack_id UInt64 CODEC(ZSTD(1)),
                value Int64 CODEC(T64, ZSTD(1))
            ) ENGINE = MergeTree
            PARTITION BY toDate(ts)
            ORDER BY (service, kind, ts, series_id, stack_id)
            {samples_ttl}",
            "CREATE TABLE IF NOT EXISTS {db}.samples_1m (
                service LowCardinality(String),
                kind LowCardinality(String),
                minute DateTime CODEC(Delta, ZSTD(1)),
                series_id UInt64 CODEC(ZSTD(1)),
                stack_id UInt64 CODEC(ZSTD(1)),
                value Int64 CODEC(T64, ZSTD(1))
            ) ENGINE = SummingMergeTree(value)
            PARTITION BY toYYYYMM(minute)
            ORDER BY (service, kind, minute, series_id, stack_id)
            {rollup_ttl}",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.samples_1m_mv TO {db}.samples_1m AS
            SELECT service, kind, toStartOfMinute(ts) AS minute, series_id, stack_id,
                   sum(value) AS value
            FROM {db}.samples
            GROUP BY service, kind, minute, series_id, stack_id",
        ],
    ),
    // Retries counted once. The rollup keeps tokens too: since 24.7 a block
    // `samples` drops as a duplicate still goes through the view, and the
    // view's table must drop it as well.
    (
        2,
        &[
            "ALTER TABLE {db}.samples
                MODIFY SETTING non_replicated_deduplication_window = {dedup_window}",
            "ALTER TABLE {db}.samples_1m
                MODIFY SETTING non_replicated_deduplication_window = {dedup_window}",
        ],
    ),
    // The request table (see `requests`), shared by every instance like the
    // profiles: one row per (service, window, request, ingest part), a
    // retried part replacing its rows on merge (readers ask for FINAL).
    (
        3,
        &["CREATE TABLE IF NOT EXISTS {db}.request_rows (
                service LowCardinality(String),
                ts_ms Int64 CODEC(Delta, ZSTD(1)),
                key LowCardinality(String),
                value String,
                part String,
                series_id UInt64,
                kind LowCardinality(String),
                stack_ids Array(UInt64),
                stack_values Array(Int64)
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toDate(toDateTime(intDiv(ts_ms, 1000)))
            ORDER BY (service, ts_ms, key, value, part)
            {requests_ttl}"],
    ),
];

#[derive(Row, Serialize)]
struct SampleRow<'a> {
    service: &'a str,
    kind: &'a str,
    ts: i64,
    series_id: u64,
    stack_id: u64,
    value: i64,
}

#[derive(Row, Serialize)]
struct StackRow<'a> {
    service: &'a str,
    stack_id: u64,
    frames: Vec<&'a str>,
}

#[derive(Row, Serialize)]
struct SeriesRow<'a> {
    service: &'a str,
    series_id: u64,
    label_names: Vec<&'a str>,
    label_values: Vec<&'a str>,
}

struct AggRow {
    kind: String,
    key: u64,
    v: i64,
}

#[derive(Row, Deserialize)]
struct KeyRow {
    key: u64,
    v: i64,
}

#[derive(Row, Deserialize)]
struct FramesRow {
    stack_id: u64,
    frames: Vec<String>,
}

#[derive(Row, Deserialize)]
struct LabelsRow {
    label_names: Vec<String>,
    label_values: Vec<String>,
}

#[derive(Row, Deserialize)]
struct OverviewRow {
    service: String,
    kind: String,
    bucket: i64,
    last: i64,
    v: i64,
}

#[derive(Row, Deserialize)]
struct HostsRow {
    service: String,
    hosts: Vec<String>,
}

/// Where rows of a time range live: raw samples (ms timestamps) or the
/// per-minute rollup (second timestamps).
struct Source {
    table: &'static str,
    /// SQL of a row's time in unix ms.
    ts_ms: &'static str,
    ts_col: &'static str,
    /// SQL turning one bound ms placeholder into the column's type.
    to_ts: (&'static str, &'static str),
}

impl Source {
    fn of(rollup: bool) -> Source {
        if rollup {
            Source {
                table: "samples_1m",
                ts_ms: "toInt64(toUnixTimestamp(minute)) * 1000",
                ts_col: "minute",
                to_ts: ("toDateTime(intDiv(toInt64(", "), 1000))"),
            }
        } else {
            Source {
                table: "samples",
                ts_ms: "toUnixTimestamp64Milli(ts)",
                ts_col: "ts",
                to_ts: ("fromUnixTimestamp64Milli(toInt64(", "))"),
            }
        }
    }

    /// `ts_col >= from AND ts_col < until`.
    fn range(&self, sql: &mut Sql, from: i64, until: i64) {
        let (a, b) = self.to_ts;
        sql.push(&format!("{} >= ", self.ts_col)).push(a).i(from.clamp(MIN_TS, MAX_TS)).push(b);
        sql.push(&format!(" AND {} < ", self.ts_col)).push(a).i(until.clamp(MIN_TS, MAX_TS)).push(b);
    }
}

#[derive(Row, Deserialize)]
struct NameRow {
    name: String,
}

#[derive(Row, Deserialize)]
struct VersionRow {
    version: u32,
}

#[derive(Row, Deserialize)]
struct BytesRow {
    bytes: u64,
}

/// A bound argument of a `?` placeholder.
enum Arg {
    S(String),
    I(i64),
}

/// SQL text with `?` placeholders and their values, bound in order by the
/// crate (which escapes them).
#[derive(Default)]
struct Sql {
    text: String,
    args: Vec<Arg>,
}

impl Sql {
    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }
    fn s(&mut self, v: &str) -> &mut Self {
        self.text.push('?');
        self.args.push(Arg::S(v.to_owned()));
        self
    }
    fn i(&mut self, v: i64) -> &mut Self {
        self.text.push('?');
        self.args.push(Arg::I(v));
        self
    }
    fn query(self, client: &Client) -> clickhouse::query::Query {
        let mut q = client.query(&self.text);
        for a in self.args {
            q = match a {
                Arg::S(s) => q.bind(s),
                Arg::I(i) => q.bind(i),
            };
        }
        q
    }
}

/// Stack ids per dictionary lookup. ClickHouse parses at most
/// `max_query_size` bytes of SQL (256 KiB by default) and an id is up to 21
/// bytes with its comma, so 4,096 ids stay under 90 KB: a third of the
/// default, leaving room for the service name. The ids are SQL literals
/// because this crate version (0.15) has no other way to send them that
/// avoids a limit: no external-data upload, temporary tables need an HTTP
/// session (one request at a time, pinned to one server behind a load
/// balancer), and query parameters travel as form fields capped by
/// `http_max_field_value_size` (128 KiB).
const STACK_IDS_PER_QUERY: usize = 4_096;

// DateTime64(3) covers 1900..2299; clamp so open-ended ranges stay valid.
const MIN_TS: i64 = -2_208_988_800_000;
const MAX_TS: i64 = 10_413_792_000_000;

pub struct ClickHouseStore {
    client: Client,
    /// `client` with the insert settings.
    insert_client: Client,
    db: String,
    opts: ClickHouseOptions,
    rt: Option<tokio::runtime::Runtime>,
    /// Stack frames seen (written or read) by this instance; at most
    /// `MAX_CACHED` entries (see `must_start_over`).
    stacks: RwLock<HashMap<u64, Frames>>,
    /// (service, id) already inserted by this instance, to skip re-sending
    /// dictionaries with every batch.
    /// (xxh3 of the service, stack id).
    written_stacks: Mutex<HashSet<(u64, u64)>>,
    written_series: Mutex<HashSet<u64>>,
    /// Random per instance, so tokens of batches without an id never
    /// collide across instances.
    instance_nonce: u64,
    batches_without_id: AtomicU64,
    /// When this instance inserted its last [`DEDUPLICATION_WINDOW`]
    /// keyed sample blocks, oldest first, and when it started: ClickHouse
    /// forgets tokens by count, so the oldest of these (or the start, before
    /// there are that many) is how far back a retry can be recognised.
    /// Other instances' inserts on the same table shorten it further; run
    /// one writer per database, or accept that a replay may count twice.
    keyed_inserts: Mutex<(std::collections::VecDeque<i64>, i64)>,
}

impl Drop for ClickHouseStore {
    fn drop(&mut self) {
        // May be dropped inside an async context, where a blocking runtime
        // shutdown would panic.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn ttl(column: &str, ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms > 0 => {
            let secs = (ms / 1000).max(1);
            format!("TTL toDateTime({column}) + INTERVAL {secs} SECOND SETTINGS ttl_only_drop_parts = 1")
        }
        _ => String::new(),
    }
}

fn matcher_sql(sql: &mut Sql, m: &Matcher) {
    let (k, v, neg) = match m {
        Matcher::Eq(k, v) => (k, v, false),
        Matcher::Ne(k, v) => (k, v, true),
    };
    sql.push(if neg { " AND NOT (" } else { " AND (" })
        .push("has(label_names, ")
        .s(k)
        .push(") AND label_values[indexOf(label_names, ")
        .s(k)
        .push(")] = ")
        .s(v)
        .push(")");
}

/// The runtime a connection's futures run on, from plain threads and
/// `spawn_blocking` alike.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("clickhouse")
        .enable_all()
        .build()
}

/// A client for queries, and one with the insert settings.
fn clients(opts: &ClickHouseOptions) -> (Client, Client) {
    let mut client = Client::default().with_url(&opts.url);
    if let Some(u) = &opts.user {
        client = client.with_user(u);
    }
    if let Some(p) = &opts.password {
        client = client.with_password(p);
    }
    let insert_client = if opts.async_insert {
        // `async_insert_deduplicate` is for servers older than the
        // `deduplicate_insert` setting: they deduplicate async inserts
        // only with it. Nothing asks the rollup view to deduplicate:
        // servers before 26.1 refuse that for async inserts, later ones
        // do it by default.
        client
            .clone()
            .with_setting("async_insert", "1")
            .with_setting("wait_for_async_insert", "1")
            .with_setting("async_insert_deduplicate", "1")
    } else {
        // `async_insert=0` because async inserts are the default since
        // 26.2. From 24.7 on, a block `samples` drops as a duplicate
        // still goes through the rollup view, and only this setting (off
        // by default on older servers) makes the view's table drop it.
        client
            .clone()
            .with_setting("async_insert", "0")
            .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1")
    };
    (client, insert_client)
}

/// Runs a future on `rt` and waits for it.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().context("ClickHouse task was dropped")?
}

impl ClickHouseStore {
    /// Connects, creates the database and runs pending migrations.
    pub fn open(opts: ClickHouseOptions) -> anyhow::Result<ClickHouseStore> {
        anyhow::ensure!(
            valid_ident(&opts.database),
            "clickhouse.database {:?} must be letters, digits and _",
            opts.database
        );
        let rt = runtime()?;
        let (client, insert_client) = clients(&opts);
        let store = ClickHouseStore {
            client,
            insert_client,
            db: opts.database.clone(),
            opts,
            rt: Some(rt),
            stacks: RwLock::new(HashMap::new()),
            written_stacks: Mutex::new(HashSet::new()),
            written_series: Mutex::new(HashSet::new()),
            instance_nonce: std::collections::hash_map::RandomState::new()
                .hash_one(std::time::SystemTime::now()),
            batches_without_id: AtomicU64::new(0),
            keyed_inserts: Mutex::new((std::collections::VecDeque::new(), now_ms())),
        };
        store
            .migrate()
            .with_context(|| format!("ClickHouse at {}: running migrations", store.opts.url))?;
        Ok(store)
    }

    /// Runs a future on the store's own runtime and waits for it; safe from
    /// plain threads and `spawn_blocking` alike.
    fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        run_on(self.rt.as_ref().expect("runtime lives until drop"), f)
    }

    fn execute(&self, sql: String) -> anyhow::Result<()> {
        let c = self.client.clone();
        self.run(async move {
            c.query(&sql)
                .execute()
                .await
                .with_context(|| format!("executing {}", sql.lines().next().unwrap_or("")))
        })
    }

    fn migrate(&self) -> anyhow::Result<()> {
        let db = &self.db;
        self.execute(format!("CREATE DATABASE IF NOT EXISTS {db}"))?;
        self.execute(format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
                version UInt32, applied_at DateTime DEFAULT now()
            ) ENGINE = ReplacingMergeTree ORDER BY version"
        ))?;
        let c = self.client.clone();
        let q = format!("SELECT max(version) AS version FROM {db}.schema_migrations");
        let current = self.run(async move { Ok(c.query(&q).fetch_all::<VersionRow>().await?) })?;
        let current = current.first().map_or(0, |r| r.version);
        let samples_ttl = ttl("ts", self.opts.retention_ms);
        let requests_ttl = ttl("intDiv(ts_ms, 1000)", self.opts.retention_ms);
        let rollup_ttl = ttl("minute", self.opts.rollup_retention_ms);
        for (version, stmts) in MIGRATIONS {
            if *version <= current {
                continue;
            }
            for s in *stmts {
                let sql = s
                    .replace("{db}", db)
                    .replace("{samples_ttl}", &samples_ttl)
                    .replace("{rollup_ttl}", &rollup_ttl)
                    .replace("{requests_ttl}", &requests_ttl)
                    .replace("{dedup_window}", &DEDUPLICATION_WINDOW.to_string());
                self.execute(sql)?;
            }
            self.execute(format!(
                "INSERT INTO {db}.schema_migrations (version) VALUES ({version})"
            ))?;
            tracing::info!(version, database = %db, "ClickHouse schema migrated");
        }
        Ok(())
    }

    /// Start of the range still held in raw samples (minute aligned), if
    /// raw samples expire.
    fn raw_cutoff(&self) -> Option<i64> {
        let ret = self.opts.retention_ms?;
        Some((now_ms() - ret).div_euclid(60_000) * 60_000 + 60_000)
    }

    /// One query over raw samples or the rollup in `[from, until)`:
    /// `kind` None lists the kinds with rows (label and kind filters
    /// ignored: the caller picks the wanted kinds, so no SQL grows with the
    /// request's kind list); Some sums that kind's values by `by`. One
    /// query per kind keeps the GROUP BY key a single UInt64, several times
    /// faster in ClickHouse than grouping by (kind, key), and `kind` leads
    /// the sort key after `service`, so each query reads only its own rows.
    fn select_part(
        &self,
        sel: &Selector,
        by: GroupBy,
        kind: Option<&str>,
        (from, until, rollup): (i64, i64, bool),
    ) -> anyhow::Result<Vec<AggRow>> {
        let db = &self.db;
        let Source { table, ts_ms, .. } = Source::of(rollup);
        let mut sql = Sql::default();
        match (kind, by) {
            (None, _) => {
                sql.push("SELECT DISTINCT toString(kind) AS name");
            }
            (Some(_), GroupBy::Stack) => {
                sql.push("SELECT stack_id AS key, sum(value) AS v");
            }
            (Some(_), GroupBy::Time { step_ms }) => {
                sql.push("SELECT toUInt64(toInt64(")
                    .i(sel.from_ms)
                    .push(") + intDiv(")
                    .push(ts_ms)
                    .push(" - toInt64(")
                    .i(sel.from_ms)
                    .push("), toInt64(")
                    .i(step_ms)
                    .push(")) * toInt64(")
                    .i(step_ms)
                    .push(")) AS key, sum(value) AS v");
            }
        }
        sql.push(&format!(" FROM {db}.{table} WHERE service = "))
            .s(&sel.service)
            .push(" AND ");
        Source::of(rollup).range(&mut sql, from, until);
        let Some(kind) = kind else {
            let q = sql.query(&self.client);
            let rows = self.run(async move { Ok(q.fetch_all::<NameRow>().await?) })?;
            return Ok(rows
                .into_iter()
                .map(|r| AggRow {
                    kind: r.name,
                    key: 0,
                    v: 0,
                })
                .collect());
        };
        sql.push(" AND kind = ").s(kind);
        if !sel.matchers.is_empty() {
            sql.push(&format!(
                " AND series_id IN (SELECT series_id FROM {db}.series WHERE service = "
            ))
            .s(&sel.service);
            for m in &sel.matchers {
                matcher_sql(&mut sql, m);
            }
            sql.push(")");
        }
        sql.push(" GROUP BY key");
        let q = sql.query(&self.client);
        let rows = self.run(async move { Ok(q.fetch_all::<KeyRow>().await?) })?;
        Ok(rows
            .into_iter()
            .map(|r| AggRow {
                kind: kind.to_owned(),
                key: r.key,
                v: r.v,
            })
            .collect())
    }

    /// The overview over one part of the range (raw samples or the rollup):
    /// totals by service, kind and bucket, then the hosts of the series seen.
    fn overview_part(
        &self,
        grid: &Grid,
        (from, until, rollup): (i64, i64, bool),
        out: &mut Overview,
    ) -> anyhow::Result<()> {
        let db = &self.db;
        let src = Source::of(rollup);
        let mut sql = Sql::default();
        sql.push("SELECT toString(service) AS service, toString(kind) AS kind, toInt64(")
            .i(grid.from_ms)
            .push(") + intDiv(")
            .push(src.ts_ms)
            .push(" - toInt64(")
            .i(grid.from_ms)
            .push("), toInt64(")
            .i(grid.step_ms)
            .push(")) * toInt64(")
            .i(grid.step_ms)
            .push(&format!(
                ") AS bucket, max({}) AS last, sum(value) AS v FROM {db}.{} WHERE ",
                src.ts_ms, src.table
            ));
        src.range(&mut sql, from, until);
        sql.push(" GROUP BY service, kind, bucket");
        let q = sql.query(&self.client);
        let rows = self.run(async move { Ok(q.fetch_all::<OverviewRow>().await?) })?;
        // Wait histograms are not totals (see `Selector::wants_kind`).
        for r in rows.into_iter().filter(|r| !profiler_pprof::waits::is_waits_kind(&r.kind)) {
            let t = out.entry(r.service).or_default();
            t.add(grid, &r.kind, r.bucket, r.v);
            t.last_seen_ms = t.last_seen_ms.max(r.last);
        }
        let mut sql = Sql::default();
        sql.push(&format!(
            "SELECT toString(service) AS service,
                    groupUniqArray(label_values[indexOf(label_names, 'host')]) AS hosts
             FROM {db}.series
             WHERE has(label_names, 'host')
               AND series_id IN (SELECT DISTINCT series_id FROM {db}.{} WHERE ",
            src.table
        ));
        src.range(&mut sql, from, until);
        sql.push(") GROUP BY service");
        let q = sql.query(&self.client);
        let rows = self.run(async move { Ok(q.fetch_all::<HostsRow>().await?) })?;
        for r in rows {
            if let Some(t) = out.get_mut(&r.service) {
                t.hosts.extend(r.hosts);
            }
        }
        Ok(())
    }

    /// The raw table for recent data and the rollup for what raw retention
    /// dropped: (from, until, rollup) parts of a range.
    fn parts(&self, from: i64, until: i64) -> Vec<(i64, i64, bool)> {
        match self.raw_cutoff() {
            Some(cut) if from < cut => {
                let mut parts = vec![(from, until.min(cut), true)];
                if until > cut {
                    parts.push((cut, until, false));
                }
                parts
            }
            _ => vec![(from, until, false)],
        }
    }

    /// `insert_deduplication_token` of a batch's samples. A batch id gives
    /// the same token on every delivery, hashed because ids are the
    /// client's and unbounded while the token travels in the URL. A batch
    /// without an id gets a token never used before: with no token,
    /// ClickHouse would deduplicate by content instead and drop a second
    /// batch that happens to hold the same rows.
    fn deduplication_token(&self, id: Option<&str>) -> String {
        match id {
            Some(id) => format!("batch-{:032x}", xxhash_rust::xxh3::xxh3_128(id.as_bytes())),
            None => format!(
                "unkeyed-{:016x}-{}",
                self.instance_nonce,
                self.batches_without_id.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// Loads frames of stacks this instance has not seen yet, in bulk, so
    /// `stack()` after `aggregate()` never asks per id.
    fn prefetch_stacks(&self, service: &str, ids: impl Iterator<Item = u64>) -> anyhow::Result<()> {
        let missing: Vec<u64> = {
            let s = self.stacks.read().unwrap_or_else(|e| e.into_inner());
            ids.filter(|id| !s.contains_key(id)).collect()
        };
        for chunk in missing.chunks(STACK_IDS_PER_QUERY) {
            let mut sql = Sql::default();
            sql.push(&format!(
                "SELECT stack_id, any(frames) AS frames FROM {}.stacks WHERE service = ",
                self.db
            ))
            .s(service)
            .push(" AND stack_id IN (");
            let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
            sql.push(&list.join(",")).push(") GROUP BY stack_id");
            let q = sql.query(&self.client);
            let rows = self.run(async move { Ok(q.fetch_all::<FramesRow>().await?) })?;
            let mut s = self.stacks.write().unwrap_or_else(|e| e.into_inner());
            if must_start_over(s.len(), rows.len()) {
                s.clear();
            }
            for r in rows {
                s.insert(r.stack_id, r.frames.into_iter().map(Arc::from).collect());
            }
        }
        Ok(())
    }
}

impl Store for ClickHouseStore {
    /// Always [`Appended::Stored`]: ClickHouse drops a retry of a stored
    /// batch id silently, so it cannot be told from a first delivery.
    fn append(&self, batch: Batch) -> StoreResult<Appended> {
        if let (Some(_), Some(since)) = (&batch.id, batch.maybe_stored_since_ms) {
            let (inserts, started) = &*self.keyed_inserts.lock().unwrap_or_else(|e| e.into_inner());
            // Full, the oldest insert is the oldest token ClickHouse still has.
            let horizon = match inserts.front() {
                Some(&oldest) if inserts.len() == DEDUPLICATION_WINDOW as usize => oldest,
                _ => *started,
            };
            if since <= horizon {
                return Err(super::recent::unverifiable(since, horizon).into());
            }
        }
        let svc = xxhash_rust::xxh3::xxh3_64(batch.service.as_bytes());
        let new_stacks: Vec<(u64, Frames)> = {
            let w = self
                .written_stacks
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            batch
                .stacks
                .iter()
                .filter(|(id, _)| !w.contains(&(svc, *id)))
                .cloned()
                .collect()
        };
        let new_series: Vec<(u64, Labels)> = {
            let w = self
                .written_series
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            batch
                .series
                .iter()
                .filter(|(id, _)| !w.contains(id))
                .cloned()
                .collect()
        };
        {
            let mut s = self.stacks.write().unwrap_or_else(|e| e.into_inner());
            if must_start_over(s.len(), batch.stacks.len()) {
                s.clear();
            }
            for (id, f) in &batch.stacks {
                s.entry(*id).or_insert_with(|| f.clone());
            }
        }
        let (c, db) = (self.insert_client.clone(), self.db.clone());
        let token = self.deduplication_token(batch.id.as_deref());
        let keyed = batch.id.is_some() && !batch.rows.is_empty();
        let (stack_ids, series_ids): (Vec<u64>, Vec<u64>) = (
            new_stacks.iter().map(|(id, _)| *id).collect(),
            new_series.iter().map(|(id, _)| *id).collect(),
        );
        self.run(async move {
            // Dictionaries first: a reader never sees a sample whose stack
            // or series is missing.
            if !new_stacks.is_empty() {
                let mut ins = c
                    .insert_unescaped::<StackRow<'_>>(&format!("{db}.stacks"))
                    .await?;
                for (id, frames) in &new_stacks {
                    ins.write(&StackRow {
                        service: &batch.service,
                        stack_id: *id,
                        frames: frames.iter().map(|f| &**f).collect(),
                    })
                    .await?;
                }
                ins.end().await.context("inserting stacks")?;
            }
            if !new_series.is_empty() {
                let mut ins = c
                    .insert_unescaped::<SeriesRow<'_>>(&format!("{db}.series"))
                    .await?;
                for (id, labels) in &new_series {
                    let service = labels.get("service").map_or(batch.service.as_str(), |s| s);
                    ins.write(&SeriesRow {
                        service,
                        series_id: *id,
                        label_names: labels.keys().map(String::as_str).collect(),
                        label_values: labels.values().map(String::as_str).collect(),
                    })
                    .await?;
                }
                ins.end().await.context("inserting series")?;
            }
            if !batch.rows.is_empty() {
                let mut ins = c
                    .insert_unescaped::<SampleRow<'_>>(&format!("{db}.samples"))
                    .await?
                    .with_setting("insert_deduplication_token", token);
                for r in &batch.rows {
                    ins.write(&SampleRow {
                        service: &batch.service,
                        kind: &batch.kind,
                        ts: r.ts_ms.clamp(MIN_TS, MAX_TS),
                        series_id: r.series_id,
                        stack_id: r.stack_id,
                        value: r.value,
                    })
                    .await?;
                }
                ins.end().await.context("inserting samples")?;
            }
            Ok(())
        })?;
        if keyed {
            let (inserts, _) = &mut *self.keyed_inserts.lock().unwrap_or_else(|e| e.into_inner());
            if inserts.len() == DEDUPLICATION_WINDOW as usize {
                inserts.pop_front();
            }
            inserts.push_back(now_ms());
        }
        {
            let mut w = self
                .written_stacks
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if must_start_over(w.len(), stack_ids.len()) {
                w.clear();
            }
            w.extend(stack_ids.into_iter().map(|id| (svc, id)));
        }
        let mut w = self
            .written_series
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if must_start_over(w.len(), series_ids.len()) {
            w.clear();
        }
        w.extend(series_ids);
        drop(w);
        Ok(Appended::Stored)
    }

    fn aggregate(&self, sel: &Selector, by: GroupBy) -> StoreResult<Aggregate> {
        let mut out = Aggregate::new();
        for part in self.parts(sel.from_ms, sel.until_ms) {
            // Like the embedded store, every kind with data in the range is
            // present, possibly empty when the label filter removes all its
            // rows: diffs and flame graphs decide on `[kind]` roots by the
            // kinds present.
            let kinds = self.select_part(sel, by, None, part)?;
            for k in kinds.into_iter().filter(|k| sel.wants_kind(&k.kind)) {
                sel.cancel.check()?;
                let rows = self.select_part(sel, by, Some(&k.kind), part)?;
                let dst = out.entry(k.kind).or_default();
                for r in rows {
                    *dst.entry(r.key).or_insert(0) += r.v;
                }
            }
        }
        if by == GroupBy::Stack {
            // Wait histograms' keys are row ids, not stacks.
            let stacks = out.iter().filter(|(kind, _)| !profiler_pprof::waits::is_waits_kind(kind));
            let ids: HashSet<u64> = stacks.flat_map(|(_, m)| m.keys().copied()).collect();
            self.prefetch_stacks(&sel.service, ids.into_iter())?;
        }
        Ok(out)
    }

    fn overview(&self, grid: Grid, cancel: &Cancel) -> StoreResult<Overview> {
        let mut out = Overview::new();
        for part in self.parts(grid.from_ms, grid.until_ms) {
            cancel.check()?;
            self.overview_part(&grid, part, &mut out)?;
        }
        Ok(out)
    }

    /// Only what this instance inserted for the service counts: ClickHouse
    /// keeps stacks per service, and asking it for every id of a window
    /// would cost more than the frames the ids save.
    fn unknown_stacks(&self, service: &str, ids: &[u64]) -> usize {
        let svc = xxhash_rust::xxh3::xxh3_64(service.as_bytes());
        let w = self.written_stacks.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter().filter(|&&id| !w.contains(&(svc, id))).count()
    }

    fn stack(&self, id: u64) -> StoreResult<Option<Frames>> {
        if let Some(f) = self
            .stacks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Ok(Some(f.clone()));
        }
        let q = self
            .client
            .query(&format!(
                "SELECT stack_id, any(frames) AS frames FROM {}.stacks WHERE stack_id = ? GROUP BY stack_id",
                self.db
            ))
            .bind(id);
        let rows = self.run(async move { Ok(q.fetch_all::<FramesRow>().await?) }).context("loading a stack")?;
        let Some(r) = rows.into_iter().next() else { return Ok(None) };
        let f: Frames = r.frames.into_iter().map(Arc::from).collect();
        let mut s = self.stacks.write().unwrap_or_else(|e| e.into_inner());
        if must_start_over(s.len(), 1) {
            s.clear();
        }
        s.insert(id, f.clone());
        Ok(Some(f))
    }

    fn services(&self) -> StoreResult<Vec<String>> {
        let q = self.client.query(&format!(
            "SELECT DISTINCT toString(service) AS name FROM {}.series ORDER BY name",
            self.db
        ));
        let rows = self.run(async move { Ok(q.fetch_all::<NameRow>().await?) }).context("listing services")?;
        Ok(rows.into_iter().map(|r| r.name).collect())
    }

    fn series(&self, service: &str) -> StoreResult<Vec<Arc<Labels>>> {
        let q = self
            .client
            .query(&format!(
                "SELECT any(label_names) AS label_names, any(label_values) AS label_values
                 FROM {}.series WHERE service = ? GROUP BY series_id",
                self.db
            ))
            .bind(service);
        let rows = self.run(async move { Ok(q.fetch_all::<LabelsRow>().await?) }).context("listing series")?;
        Ok(rows
            .into_iter()
            .map(|r| Arc::new(r.label_names.into_iter().zip(r.label_values).collect()))
            .collect())
    }

    /// Nothing is buffered here: every append is already in ClickHouse.
    fn flush(&self) -> StoreResult<()> {
        Ok(())
    }

    fn buffered_rows(&self) -> usize {
        0
    }

    /// Retention and rollups are ClickHouse's job (TTL, materialized view).
    fn maintain(&self, _now_ms: i64) -> StoreResult<()> {
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        let q = self
            .client
            .query("SELECT toUInt64(sum(bytes_on_disk)) AS bytes FROM system.parts WHERE database = ? AND active")
            .bind(self.db.clone());
        self.run(async move { Ok(q.fetch_all::<BytesRow>().await?) })
            .ok()
            .and_then(|v| v.first().map(|r| r.bytes))
            .unwrap_or(0)
    }
}

/// Entries each cache of this instance holds at most.
const MAX_CACHED: usize = 1_000_000;

/// Whether a cache of `len` entries must start over before taking `adding`
/// more. The caches only save round trips (stacks are read back from
/// ClickHouse, dictionary rows are re-sent and merged by their
/// ReplacingMergeTree), so starting over is correct, and it keeps memory
/// bounded however many stacks pass through.
fn must_start_over(len: usize, adding: usize) -> bool {
    let full = len + adding > MAX_CACHED;
    if full {
        tracing::info!(entries = len, "ClickHouse cache full; starting it over");
    }
    full
}

/// The request table in ClickHouse (`request_rows`, see [`super::requests`]),
/// shared by every instance on the database, as the profiles are: whichever
/// instance ingested a request's windows, any instance lists it. Retention is
/// the table's TTL, the samples' own.
pub struct ClickHouseRequests {
    client: Client,
    insert_client: Client,
    db: String,
    rt: Option<tokio::runtime::Runtime>,
}

#[derive(Row, Serialize, Deserialize)]
struct RequestRowCh {
    service: String,
    ts_ms: i64,
    key: String,
    value: String,
    part: String,
    series_id: u64,
    kind: String,
    stack_ids: Vec<u64>,
    stack_values: Vec<i64>,
}

/// Rows a scan has read ahead of the caller at most.
const SCAN_AHEAD: usize = 1024;

impl ClickHouseRequests {
    /// Connects; the table is made by the store's migrations, which run first.
    pub fn open(opts: &ClickHouseOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(valid_ident(&opts.database), "clickhouse.database {:?} must be letters, digits and _", opts.database);
        let (client, insert_client) = clients(opts);
        Ok(Self { client, insert_client, db: opts.database.clone(), rt: Some(runtime()?) })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    /// Inserts `rows`; returns once ClickHouse acknowledged them.
    pub(super) fn append(&self, rows: &[super::RequestRow]) -> StoreResult<()> {
        let rows: Vec<RequestRowCh> = rows
            .iter()
            .map(|r| RequestRowCh {
                service: r.service.clone(),
                ts_ms: r.ts_ms,
                key: r.key.clone(),
                value: r.value.clone(),
                part: r.part.clone(),
                series_id: r.series_id,
                kind: r.kind.clone(),
                stack_ids: r.stacks.iter().map(|&(id, _)| id).collect(),
                stack_values: r.stacks.iter().map(|&(_, v)| v).collect(),
            })
            .collect();
        let (c, table) = (self.insert_client.clone(), format!("{}.request_rows", self.db));
        run_on(self.rt(), async move {
            let mut ins = c.insert_unescaped::<RequestRowCh>(&table).await?;
            for row in &rows {
                ins.write(row).await?;
            }
            ins.end().await.context("inserting request rows")
        })?;
        Ok(())
    }

    /// Calls `each` with the rows of `service` in `from_ms..until_ms`, in window
    /// order, until it returns false. Rows stream from ClickHouse at most
    /// [`SCAN_AHEAD`] ahead of `each`; a retried part's rows count once (FINAL).
    pub(super) fn scan(
        &self,
        service: &str,
        from_ms: i64,
        until_ms: i64,
        cancel: &Cancel,
        mut each: impl FnMut(super::RequestRow) -> bool,
    ) -> StoreResult<()> {
        let mut sql = Sql::default();
        sql.push(&format!(
            "SELECT service, ts_ms, key, value, part, series_id, toString(kind) AS kind, stack_ids, stack_values \
             FROM {}.request_rows FINAL WHERE service = ",
            self.db
        ))
        .s(service)
        .push(" AND ts_ms >= ")
        .i(from_ms)
        .push(" AND ts_ms < ")
        .i(until_ms)
        .push(" ORDER BY ts_ms, key, value, part");
        let query = sql.query(&self.client);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<RequestRowCh>>(SCAN_AHEAD);
        self.rt().spawn(async move {
            let mut cursor = match query.fetch::<RequestRowCh>() {
                Ok(cursor) => cursor,
                Err(err) => {
                    let _ = tx.send(Err(err.into())).await;
                    return;
                }
            };
            loop {
                let next = match cursor.next().await {
                    Ok(Some(row)) => Ok(row),
                    Ok(None) => return,
                    Err(err) => Err(err.into()),
                };
                // The reader stopped (or failed): so does the query.
                if tx.send(next).await.is_err() {
                    return;
                }
            }
        });
        let mut n = 0usize;
        while let Some(row) = rx.blocking_recv() {
            n += 1;
            if n % 4096 == 0 {
                cancel.check()?;
            }
            let row = row.context("reading the request table")?;
            let stacks = row.stack_ids.into_iter().zip(row.stack_values).collect();
            let row = super::RequestRow {
                service: row.service,
                ts_ms: row.ts_ms,
                key: row.key,
                value: row.value,
                part: row.part,
                series_id: row.series_id,
                kind: row.kind,
                stacks,
            };
            if !each(row) {
                break;
            }
        }
        Ok(())
    }
}

impl Drop for ClickHouseRequests {
    fn drop(&mut self) {
        // As the store's: may be dropped inside an async context.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_plain_identifiers() {
        let opts = |db: &str| ClickHouseOptions {
            url: "http://127.0.0.1:1".into(),
            database: db.into(),
            user: None,
            password: None,
            retention_ms: None,
            rollup_retention_ms: None,
            async_insert: false,
        };
        for bad in ["", "a.b", "x; DROP TABLE y", "a b", "`q`"] {
            let e = ClickHouseStore::open(opts(bad)).err().expect(bad);
            assert!(e.to_string().contains("letters, digits"), "{e}");
        }
        assert!(valid_ident("profiler_2"));
    }

    #[test]
    fn ttl_clauses() {
        assert_eq!(ttl("ts", None), "");
        assert_eq!(ttl("ts", Some(0)), "");
        assert_eq!(
            ttl("ts", Some(3_600_000)),
            "TTL toDateTime(ts) + INTERVAL 3600 SECOND SETTINGS ttl_only_drop_parts = 1"
        );
    }
}
