//! The request table: what each request spent, stack by stack, kept apart from the
//! series so that a million request ids do not make a million series.
//!
//! A request is named by a high-cardinality label (`request_id`, `trace_id`,
//! `span_id`: an application's custom labels, read by our agent). The agent's window
//! says, per (service, labels, kind) part, how much of each stack's value each request
//! holds; the stacks themselves are stored in the part's series like any other, so the
//! profiles stay whole and the stack ids here resolve through the store's dictionary.
//!
//! One row is one request's share of one ingest part: keyed by (service, window,
//! request, part), so that a retried window writes the same keys again and is never
//! counted twice; its value is the part's series id, kind and (stack id, value) pairs.
//! With the embedded store, rows are appended in one redb transaction per ingest
//! request, committed (fsync'd) before the ingest is acknowledged, in the server's
//! data directory. With ClickHouse, they go to its `request_rows` table, acknowledged by
//! ClickHouse before the ingest is, so every instance on the database sees every
//! request (see `clickhouse::ClickHouseRequests`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::Cancel;
use super::StoreResult;

/// (service, window start ms, request as `key\0value`, ingest part) -> [`encode`]d row.
const ROWS: TableDefinition<(&str, i64, &str, &str), &[u8]> = TableDefinition::new("request_rows");
/// Sorts after any request or part name: the end of a service's keys.
const LAST: &str = "\u{10ffff}\u{10ffff}";

/// One request's share of one ingest part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRow {
    pub service: String,
    /// Start of the window, unix ms.
    pub ts_ms: i64,
    /// The label that names the request: its key (`request_id`, ...) and value.
    pub key: String,
    pub value: String,
    /// The ingest part this share came with (`<batch id>/<part>`): a retry of the
    /// same part overwrites its rows.
    pub part: String,
    /// The part's series and kind.
    pub series_id: u64,
    pub kind: String,
    /// (stack id, value) the request holds of the part's stacks.
    pub stacks: Vec<(u64, i64)>,
}

/// Counters of the table, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestTableStats {
    pub rows_written: u64,
    pub rows_deleted: u64,
    pub disk_bytes: u64,
}

pub struct RequestTable {
    backend: Backend,
    rows_written: AtomicU64,
    rows_deleted: AtomicU64,
}

enum Backend {
    /// `requests.redb` in the data directory.
    Local {
        db: Database,
        path: PathBuf,
        /// Rows older than this are deleted by [`RequestTable::maintain`].
        retention_ms: Option<i64>,
    },
    /// ClickHouse's `request_rows`, shared by the instances on its database.
    Shared(super::clickhouse::ClickHouseRequests),
}

impl RequestTable {
    /// Opens (or creates) the table in `dir`.
    pub fn open(dir: &Path, retention_ms: Option<i64>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("requests.redb");
        let db = Database::create(&path).with_context(|| format!("opening {}", path.display()))?;
        let txn = db.begin_write()?;
        txn.open_table(ROWS)?;
        txn.commit()?;
        Ok(Self::with(Backend::Local { db, path, retention_ms }))
    }

    /// The table in ClickHouse, next to the profiles of a [`super::ClickHouseStore`].
    pub fn shared(table: super::clickhouse::ClickHouseRequests) -> Self {
        Self::with(Backend::Shared(table))
    }

    fn with(backend: Backend) -> Self {
        Self { backend, rows_written: AtomicU64::new(0), rows_deleted: AtomicU64::new(0) }
    }

    /// Durably stores `rows`: when this returns Ok they survive a crash. Rows of a part
    /// stored before are replaced, not added to.
    pub fn append(&self, rows: &[RequestRow]) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let db = match &self.backend {
            Backend::Local { db, .. } => db,
            Backend::Shared(table) => {
                table.append(rows)?;
                self.rows_written.fetch_add(rows.len() as u64, Relaxed);
                return Ok(());
            }
        };
        let write = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(ROWS)?;
                let mut request = String::new();
                for row in rows {
                    request.clear();
                    request.push_str(&row.key);
                    request.push('\0');
                    request.push_str(&row.value);
                    table.insert((row.service.as_str(), row.ts_ms, request.as_str(), row.part.as_str()), encode(row).as_slice())?;
                }
            }
            // redb's default durability: the commit returns once fsync'd.
            txn.commit()?;
            Ok(())
        };
        write().context("writing the request table")?;
        self.rows_written.fetch_add(rows.len() as u64, Relaxed);
        Ok(())
    }

    /// Calls `each` with every row of `service` in `from_ms..until_ms`, in window order,
    /// until it returns false.
    pub fn scan(&self, service: &str, from_ms: i64, until_ms: i64, cancel: &Cancel, mut each: impl FnMut(RequestRow) -> bool) -> StoreResult<()> {
        let db = match &self.backend {
            Backend::Local { db, .. } => db,
            Backend::Shared(table) => return table.scan(service, from_ms, until_ms, cancel, each),
        };
        let txn = db.begin_read().context("reading the request table")?;
        let table = txn.open_table(ROWS).context("reading the request table")?;
        let range = table
            .range((service, from_ms, "", "")..(service, until_ms, "", ""))
            .context("reading the request table")?;
        for (n, entry) in range.enumerate() {
            if n % 4096 == 0 {
                cancel.check()?;
            }
            let (key, value) = entry.context("reading the request table")?;
            let (service, ts_ms, request, part) = key.value();
            let (key, value_of_key) = request.split_once('\0').unwrap_or((request, ""));
            let row = decode(value.value(), service, ts_ms, key, value_of_key, part)
                .ok_or_else(|| anyhow::anyhow!("a corrupt row in the request table at {ts_ms}"))?;
            if !each(row) {
                break;
            }
        }
        Ok(())
    }

    /// Deletes rows past retention, relative to `now_ms` (ClickHouse's TTL does it
    /// for the shared table).
    pub fn maintain(&self, now_ms: i64) -> StoreResult<()> {
        let Backend::Local { db, retention_ms: Some(retention), .. } = &self.backend else { return Ok(()) };
        let cutoff = now_ms.saturating_sub(*retention);
        // Per service, the range before the cutoff: no pass over the rows kept.
        let delete = || -> Result<u64, redb::Error> {
            let txn = db.begin_write()?;
            let mut deleted = 0u64;
            {
                let mut table = txn.open_table(ROWS)?;
                let mut after: Option<String> = None;
                loop {
                    let next = match &after {
                        None => table.first()?.map(|(k, _)| k.value().0.to_owned()),
                        Some(done) => table
                            .range((done.as_str(), i64::MAX, LAST, LAST)..)?
                            .next()
                            .transpose()?
                            .map(|(k, _)| k.value().0.to_owned()),
                    };
                    let Some(service) = next.filter(|s| Some(s) != after.as_ref()) else { break };
                    table.retain_in((service.as_str(), i64::MIN, "", "")..(service.as_str(), cutoff, "", ""), |_, _| {
                        deleted += 1;
                        false
                    })?;
                    after = Some(service);
                }
            }
            txn.commit()?;
            Ok(deleted)
        };
        let deleted = delete().context("deleting old requests")?;
        self.rows_deleted.fetch_add(deleted, Relaxed);
        Ok(())
    }

    pub fn stats(&self) -> RequestTableStats {
        RequestTableStats {
            rows_written: self.rows_written.load(Relaxed),
            rows_deleted: self.rows_deleted.load(Relaxed),
            // The shared table's size is ClickHouse's to tell (system.parts).
            disk_bytes: match &self.backend {
                Backend::Local { path, .. } => std::fs::metadata(path).map_or(0, |m| m.len()),
                Backend::Shared(_) => 0,
            },
        }
    }
}

/// A row's value: series id (8 bytes LE), the kind as a length byte and bytes, then
/// each (stack id, value) as 8 + 8 bytes LE.
fn encode(row: &RequestRow) -> Vec<u8> {
    let kind = &row.kind.as_bytes()[..row.kind.len().min(255)];
    let mut out = Vec::with_capacity(9 + kind.len() + 16 * row.stacks.len());
    out.extend_from_slice(&row.series_id.to_le_bytes());
    out.push(kind.len() as u8);
    out.extend_from_slice(kind);
    for &(stack, value) in &row.stacks {
        out.extend_from_slice(&stack.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

fn decode(bytes: &[u8], service: &str, ts_ms: i64, key: &str, value: &str, part: &str) -> Option<RequestRow> {
    let series_id = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let len = *bytes.get(8)? as usize;
    let kind = std::str::from_utf8(bytes.get(9..9 + len)?).ok()?.to_owned();
    let rest = bytes.get(9 + len..)?;
    if rest.len() % 16 != 0 {
        return None;
    }
    let stacks = rest
        .chunks_exact(16)
        .map(|c| (u64::from_le_bytes(c[..8].try_into().unwrap()), i64::from_le_bytes(c[8..].try_into().unwrap())))
        .collect();
    Some(RequestRow {
        service: service.to_owned(),
        ts_ms,
        key: key.to_owned(),
        value: value.to_owned(),
        part: part.to_owned(),
        series_id,
        kind,
        stacks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(service: &str, ts_ms: i64, value: &str, part: &str, stacks: Vec<(u64, i64)>) -> RequestRow {
        RequestRow {
            service: service.into(),
            ts_ms,
            key: "request_id".into(),
            value: value.into(),
            part: part.into(),
            series_id: 7,
            kind: "off-cpu:sleep".into(),
            stacks,
        }
    }

    fn scanned(table: &RequestTable, service: &str, from: i64, until: i64) -> Vec<RequestRow> {
        let mut rows = Vec::new();
        table
            .scan(service, from, until, &Cancel::default(), |r| {
                rows.push(r);
                true
            })
            .unwrap();
        rows
    }

    /// Rows come back per service and range, survive a reopen, and a retried part
    /// replaces its rows instead of adding to them.
    #[test]
    fn rows_round_trip_once_per_part_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let a = row("api", 10_000, "r1", "b/0", vec![(1, 40_000_000), (2, 5)]);
        let b = row("api", 20_000, "r1", "b2/0", vec![(1, 7)]);
        let other = row("db", 10_000, "r1", "b/1", vec![(3, 1)]);
        {
            let table = RequestTable::open(dir.path(), Some(60_000)).unwrap();
            table.append(&[a.clone(), b.clone(), other.clone()]).unwrap();
            table.append(&[a.clone()]).unwrap();
        }
        let table = RequestTable::open(dir.path(), Some(60_000)).unwrap();
        assert_eq!(scanned(&table, "api", 0, 30_000), [a.clone(), b.clone()]);
        assert_eq!(scanned(&table, "api", 10_001, 30_000), [b.clone()]);
        assert_eq!(scanned(&table, "db", 0, 30_000), [other]);
        table.maintain(75_000).unwrap();
        assert_eq!(scanned(&table, "api", 0, 30_000), [b]);
        assert_eq!(table.stats().rows_deleted, 2);
    }
}
