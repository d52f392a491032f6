//! Immutable Parquet segments: rows of one (service, kind) over one time span.
//!
//! Rows are sorted by (stack_id, series_id, ts_ms): stack and series ids then
//! form long runs that dictionary + RLE encoding shrink to almost nothing, the
//! timestamps within a run are an arithmetic progression (delta encoding), and
//! zstd squeezes what is left, mostly the values.
//!
//! Segments of wait histograms (kinds `waits:…`, see `profiler_pprof::waits`)
//! hold the same logical rows, one per (stack, bucket, series, window), but
//! store them grouped: one physical row per (stack, series, window) whose
//! `buckets` column packs that histogram's buckets and counts. Stored one row
//! per bucket, each costs about what a profile row does (four numbers); grouped,
//! a histogram (4.3 buckets on average in `cargo xtask bench server`) costs one
//! row's numbers and a few bytes per bucket.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{Array, ArrayRef, BinaryArray, Int64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use serde::{Deserialize, Serialize};

use super::{GroupBy, Row};

const TS: usize = 0;
const SERIES: usize = 1;
const STACK: usize = 2;
const VALUE: usize = 3;

/// Catalog entry of a segment file (stored as JSON in redb).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegmentMeta {
    pub id: u64,
    pub service: String,
    pub kind: String,
    /// Smallest and largest row timestamp (inclusive).
    pub min_ts: i64,
    pub max_ts: i64,
    pub rows: u64,
    pub bytes: u64,
    /// Width of the time windows the rows were aggregated into, ms.
    pub resolution_ms: i64,
    /// Totals for the fleet overview, so it never opens the file. None for
    /// segments written before summaries existed: computed when first needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// Whether the catalog holds the segment's per-stack totals (see
    /// `store::totals`); None for segments written before totals existed,
    /// which maintenance computes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_totals: Option<bool>,
}

/// What a segment holds, per window and host, without its stacks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// (window start, summed value), ascending.
    pub windows: Vec<(i64, i64)>,
    /// (`host` label, first window, last window) over the rows' series.
    pub hosts: Vec<(String, i64, i64)>,
}

impl Summary {
    pub fn of(rows: &[Row], host_of: impl Fn(u64) -> Option<String>) -> Summary {
        let mut windows: BTreeMap<i64, i64> = BTreeMap::new();
        let mut series: HashMap<u64, (i64, i64)> = HashMap::new();
        for r in rows {
            *windows.entry(r.ts_ms).or_insert(0) += r.value;
            let span = series.entry(r.series_id).or_insert((r.ts_ms, r.ts_ms));
            *span = (span.0.min(r.ts_ms), span.1.max(r.ts_ms));
        }
        let mut hosts: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        for (id, (first, last)) in series {
            if let Some(host) = host_of(id) {
                let span = hosts.entry(host).or_insert((first, last));
                *span = (span.0.min(first), span.1.max(last));
            }
        }
        Summary {
            windows: windows.into_iter().collect(),
            hosts: hosts.into_iter().map(|(h, (a, b))| (h, a, b)).collect(),
        }
    }
}

impl SegmentMeta {
    pub fn file_name(&self) -> String {
        format!("seg-{:016x}.parquet", self.id)
    }
}

/// The packed histogram column of wait histograms' segments.
const BUCKETS: usize = 3;
const BUCKETS_NAME: &str = "buckets";

fn waits_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("ts_ms", DataType::Int64, false),
        Field::new("series_id", DataType::UInt64, false),
        Field::new("stack_id", DataType::UInt64, false),
        Field::new(BUCKETS_NAME, DataType::Binary, false),
    ]))
}

/// A histogram's buckets and counts as bytes: per bucket the varint gap from
/// the previous one (the first: from 0) and its count, as `(c / ONE) << 1` when
/// it is whole waits (almost always: one byte), else `c << 1 | 1`.
fn pack(buckets: &[(u16, i64)], out: &mut Vec<u8>) {
    let mut last = 0u64;
    for &(bucket, count) in buckets {
        prost::encoding::encode_varint(bucket as u64 - last, out);
        last = bucket as u64;
        let count = count as u64;
        let one = profiler_pprof::waits::ONE;
        let coded = if count % one == 0 { (count / one) << 1 } else { count << 1 | 1 };
        prost::encoding::encode_varint(coded, out);
    }
}

/// Calls `f(bucket, count)` for each packed bucket; false when the bytes are corrupt.
fn unpack(mut bytes: &[u8], mut f: impl FnMut(u16, i64)) -> bool {
    let mut bucket = 0u64;
    while !bytes.is_empty() {
        let (Ok(gap), Ok(coded)) = (prost::encoding::decode_varint(&mut bytes), prost::encoding::decode_varint(&mut bytes)) else {
            return false;
        };
        bucket += gap;
        let count = if coded & 1 == 0 { (coded >> 1).saturating_mul(profiler_pprof::waits::ONE) } else { coded >> 1 };
        f(bucket.min(u16::MAX as u64) as u16, count as i64);
    }
    true
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("ts_ms", DataType::Int64, false),
        Field::new("series_id", DataType::UInt64, false),
        Field::new("stack_id", DataType::UInt64, false),
        Field::new("value", DataType::Int64, false),
    ]))
}

/// Sorts rows and merges duplicates of (stack, series, ts) in place.
pub fn normalize(rows: &mut Vec<Row>) {
    rows.sort_unstable_by_key(|r| (r.stack_id, r.series_id, r.ts_ms));
    rows.dedup_by(|next, kept| {
        if (next.stack_id, next.series_id, next.ts_ms)
            == (kept.stack_id, kept.series_id, kept.ts_ms)
        {
            kept.value += next.value;
            true
        } else {
            false
        }
    });
}

/// Writes normalized rows to `path` (via a temporary file and rename, then
/// fsync) and returns the file size.
pub fn write(path: &Path, rows: &[Row]) -> anyhow::Result<u64> {
    let col = |f: fn(&Row) -> i64| Int64Array::from_iter_values(rows.iter().map(f));
    let ucol = |f: fn(&Row) -> u64| UInt64Array::from_iter_values(rows.iter().map(f));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(col(|r| r.ts_ms)),
        Arc::new(ucol(|r| r.series_id)),
        Arc::new(ucol(|r| r.stack_id)),
        Arc::new(col(|r| r.value)),
    ];
    write_batch(path, RecordBatch::try_new(schema(), columns)?)
}

/// Writes the rows of a wait histograms' kind grouped (see the module's doc).
pub fn write_waits(path: &Path, rows: &[Row]) -> anyhow::Result<u64> {
    use profiler_pprof::waits::split_row_id;
    let mut sorted: Vec<(u64, u64, i64, u16, i64)> = rows
        .iter()
        .map(|r| {
            let (stack, bucket) = split_row_id(r.stack_id);
            (stack, r.series_id, r.ts_ms, bucket, r.value)
        })
        .collect();
    sorted.sort_unstable();
    let (mut ts, mut series, mut stacks) = (Vec::new(), Vec::new(), Vec::new());
    let (mut packed, mut offsets) = (Vec::new(), vec![0i32]);
    let mut group: Vec<(u16, i64)> = Vec::new();
    for (i, &(stack, s, t, bucket, value)) in sorted.iter().enumerate() {
        group.push((bucket, value));
        let last = sorted.get(i + 1).is_none_or(|n| (n.0, n.1, n.2) != (stack, s, t));
        if last {
            ts.push(t);
            series.push(s);
            stacks.push(stack);
            pack(&group, &mut packed);
            offsets.push(i32::try_from(packed.len()).context("a waits segment over 2 GiB")?);
            group.clear();
        }
    }
    let buckets = BinaryArray::try_new(arrow::buffer::OffsetBuffer::new(offsets.into()), packed.into(), None)?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(ts)),
        Arc::new(UInt64Array::from(series)),
        Arc::new(UInt64Array::from(stacks)),
        Arc::new(buckets),
    ];
    write_batch(path, RecordBatch::try_new(waits_schema(), columns)?)
}

fn write_batch(path: &Path, batch: RecordBatch) -> anyhow::Result<u64> {
    let schema = batch.schema();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_dictionary_enabled(true)
        // Timestamps are runs of evenly spaced values: delta beats a dictionary.
        .set_column_dictionary_enabled(ColumnPath::from("ts_ms"), false)
        .set_column_encoding(ColumnPath::from("ts_ms"), Encoding::DELTA_BINARY_PACKED)
        .set_max_row_group_size(1 << 20)
        .build();
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = ArrowWriter::try_new(file, schema, Some(props))?;
    w.write(&batch)?;
    let file = w.into_inner()?;
    file.sync_all()?;
    let bytes = file.metadata()?.len();
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(bytes)
}

/// A segment's file, or None when it is gone: compacted or expired after
/// whoever asked listed it.
fn open_segment(path: &Path) -> anyhow::Result<Option<File>> {
    match File::open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether a segment's file holds grouped wait histograms.
fn is_waits(builder: &ParquetRecordBatchReaderBuilder<File>) -> bool {
    builder.schema().fields().get(BUCKETS).is_some_and(|f| f.name() == BUCKETS_NAME)
}

fn binary(b: &RecordBatch, i: usize) -> anyhow::Result<&BinaryArray> {
    b.column(i)
        .as_any()
        .downcast_ref::<BinaryArray>()
        .context("segment column has an unexpected type")
}

/// Reads all rows of a segment (used by downsampling); None when it is gone.
pub fn read_all(path: &Path) -> anyhow::Result<Option<Vec<Row>>> {
    let Some(file) = open_segment(path)? else { return Ok(None) };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let waits = is_waits(&builder);
    let reader = builder.with_batch_size(1 << 16).build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        if waits {
            let (ts, series, stack, buckets) = (i64s(&batch, TS)?, u64s(&batch, SERIES)?, u64s(&batch, STACK)?, binary(&batch, BUCKETS)?);
            for i in 0..batch.num_rows() {
                let whole = unpack(buckets.value(i), |bucket, value| {
                    let stack_id = profiler_pprof::waits::row_id(stack.value(i), bucket);
                    out.push(Row { ts_ms: ts.value(i), series_id: series.value(i), stack_id, value });
                });
                anyhow::ensure!(whole, "corrupt wait histogram in {}", path.display());
            }
            continue;
        }
        let ts = i64s(&batch, TS)?;
        let series = u64s(&batch, SERIES)?;
        let stack = u64s(&batch, STACK)?;
        let value = i64s(&batch, VALUE)?;
        for i in 0..batch.num_rows() {
            out.push(Row {
                ts_ms: ts.value(i),
                series_id: series.value(i),
                stack_id: stack.value(i),
                value: value.value(i),
            });
        }
    }
    Ok(Some(out))
}

/// What to read from a segment: a time range (None if the segment lies
/// entirely inside it) and a series whitelist (None = all).
pub struct Scan<'a> {
    pub time: Option<(i64, i64)>,
    pub series: Option<&'a HashSet<u64>>,
    pub by: GroupBy,
    pub from_ms: i64,
}

/// Sums a segment's values into `out` by stack id or time bucket, decoding
/// only the columns the scan needs. A segment gone since it was listed adds
/// nothing.
pub fn aggregate(path: &Path, scan: &Scan, out: &mut HashMap<u64, i64>) -> anyhow::Result<()> {
    let Some(file) = open_segment(path)? else { return Ok(()) };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    if is_waits(&builder) {
        return aggregate_waits(builder, scan, out);
    }
    let need_ts = scan.time.is_some() || matches!(scan.by, GroupBy::Time { .. });
    let need_stack = scan.by == GroupBy::Stack;
    let mut cols = vec![VALUE];
    if need_ts {
        cols.push(TS);
    }
    if scan.series.is_some() {
        cols.push(SERIES);
    }
    if need_stack {
        cols.push(STACK);
    }
    cols.sort_unstable();
    let pos = |c: usize| cols.iter().position(|&x| x == c);
    let mask = ProjectionMask::roots(builder.parquet_schema(), cols.iter().copied());
    let reader = builder
        .with_projection(mask)
        .with_batch_size(1 << 16)
        .build()?;
    let (lo, hi) = scan.time.unwrap_or((i64::MIN, i64::MAX));
    let step = match scan.by {
        GroupBy::Time { step_ms } => step_ms,
        GroupBy::Stack => 1,
    };
    // Consecutive rows mostly share a stack (sort order), so a one-entry cache
    // in front of the hash map saves most lookups.
    let mut cur_key = u64::MAX;
    let mut cur_sum = 0i64;
    let mut last_series = (u64::MAX, false);
    let flush = |key: u64, sum: i64, out: &mut HashMap<u64, i64>| {
        if sum != 0 {
            *out.entry(key).or_insert(0) += sum;
        }
    };
    for batch in reader {
        let batch = batch?;
        let value = i64s(&batch, pos(VALUE).expect("value is always read"))?;
        let ts = pos(TS).map(|p| i64s(&batch, p)).transpose()?;
        let series = pos(SERIES).map(|p| u64s(&batch, p)).transpose()?;
        let stack = pos(STACK).map(|p| u64s(&batch, p)).transpose()?;
        for i in 0..batch.num_rows() {
            if let Some(ts) = ts {
                let t = ts.value(i);
                if t < lo || t >= hi {
                    continue;
                }
            }
            if let (Some(s), Some(allowed)) = (series, scan.series) {
                // Series come in runs (sort order), so remember the last verdict.
                let id = s.value(i);
                if id != last_series.0 {
                    last_series = (id, allowed.contains(&id));
                }
                if !last_series.1 {
                    continue;
                }
            }
            let key = match (stack, ts) {
                (Some(stack), _) => stack.value(i),
                (None, Some(ts)) => bucket(ts.value(i), scan.from_ms, step),
                (None, None) => unreachable!("time grouping always reads ts"),
            };
            if key != cur_key {
                flush(cur_key, cur_sum, out);
                cur_key = key;
                cur_sum = 0;
            }
            cur_sum += value.value(i);
        }
    }
    flush(cur_key, cur_sum, out);
    Ok(())
}

/// [`aggregate`] of a grouped wait histograms' segment: by stack, each bucket's row id.
fn aggregate_waits(builder: ParquetRecordBatchReaderBuilder<File>, scan: &Scan, out: &mut HashMap<u64, i64>) -> anyhow::Result<()> {
    let mask = ProjectionMask::roots(builder.parquet_schema(), [TS, SERIES, STACK, BUCKETS]);
    let reader = builder.with_projection(mask).with_batch_size(1 << 16).build()?;
    let (lo, hi) = scan.time.unwrap_or((i64::MIN, i64::MAX));
    for batch in reader {
        let batch = batch?;
        let (ts, series, stack, buckets) = (i64s(&batch, TS)?, u64s(&batch, SERIES)?, u64s(&batch, STACK)?, binary(&batch, BUCKETS)?);
        for i in 0..batch.num_rows() {
            let t = ts.value(i);
            if t < lo || t >= hi || scan.series.is_some_and(|allowed| !allowed.contains(&series.value(i))) {
                continue;
            }
            let whole = unpack(buckets.value(i), |b, value| {
                let key = match scan.by {
                    GroupBy::Stack => profiler_pprof::waits::row_id(stack.value(i), b),
                    GroupBy::Time { step_ms } => bucket(t, scan.from_ms, step_ms),
                };
                *out.entry(key).or_insert(0) += value;
            });
            anyhow::ensure!(whole, "corrupt wait histogram in a segment");
        }
    }
    Ok(())
}

pub fn bucket(ts: i64, from: i64, step: i64) -> u64 {
    (from + (ts - from).div_euclid(step) * step) as u64
}

fn i64s(b: &RecordBatch, i: usize) -> anyhow::Result<&Int64Array> {
    b.column(i)
        .as_any()
        .downcast_ref::<Int64Array>()
        .context("segment column is not Int64")
}

fn u64s(b: &RecordBatch, i: usize) -> anyhow::Result<&UInt64Array> {
    b.column(i)
        .as_any()
        .downcast_ref::<UInt64Array>()
        .context("segment column is not UInt64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_histograms_are_stored_grouped_and_read_back_as_rows() {
        use profiler_pprof::waits::{row_id, ONE};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.parquet");
        let stacks = [0xaaaa_0000_0000_0400u64, 0xbbbb_0000_0000_0800];
        let mut rows = Vec::new();
        for ts in [0, 10_000] {
            for (i, &stack) in stacks.iter().enumerate() {
                for (bucket, count) in [(150u16, 3 * ONE as i64), (190, ONE as i64 / 2 + 1)] {
                    rows.push(Row { ts_ms: ts, series_id: i as u64, stack_id: row_id(stack, bucket + i as u16), value: count });
                }
            }
        }
        normalize(&mut rows);
        write_waits(&path, &rows).unwrap();
        let mut back = read_all(&path).unwrap().unwrap();
        normalize(&mut back);
        assert_eq!(back, rows);
        let meta = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        assert_eq!(meta.metadata().file_metadata().num_rows(), 4, "one physical row per stack, series and window");

        let mut out = HashMap::new();
        let one_series = HashSet::from([1u64]);
        let scan = Scan { time: Some((5_000, 20_000)), series: Some(&one_series), by: GroupBy::Stack, from_ms: 0 };
        aggregate(&path, &scan, &mut out).unwrap();
        let want = HashMap::from([(row_id(stacks[1], 151), 3 * ONE as i64), (row_id(stacks[1], 191), ONE as i64 / 2 + 1)]);
        assert_eq!(out, want);
        let mut by_time = HashMap::new();
        aggregate(&path, &Scan { time: None, series: None, by: GroupBy::Time { step_ms: 10_000 }, from_ms: 0 }, &mut by_time).unwrap();
        assert_eq!(by_time[&10_000], 2 * (3 * ONE as i64 + ONE as i64 / 2 + 1));
    }

    #[test]
    fn write_then_aggregate_with_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.parquet");
        let mut rows = Vec::new();
        for ts in 0..10 {
            for stack in 0..3u64 {
                rows.push(Row {
                    ts_ms: ts * 1000,
                    series_id: stack % 2,
                    stack_id: stack,
                    value: 1,
                });
            }
        }
        rows.push(Row {
            ts_ms: 0,
            series_id: 0,
            stack_id: 0,
            value: 5,
        });
        normalize(&mut rows);
        assert_eq!(rows.len(), 30);
        write(&path, &rows).unwrap();
        assert_eq!(read_all(&path).unwrap(), Some(rows));

        let mut out = HashMap::new();
        let all = Scan {
            time: None,
            series: None,
            by: GroupBy::Stack,
            from_ms: 0,
        };
        aggregate(&path, &all, &mut out).unwrap();
        assert_eq!(out, HashMap::from([(0, 15), (1, 10), (2, 10)]));

        let only = HashSet::from([1u64]);
        let mut out = HashMap::new();
        let part = Scan {
            time: Some((2000, 5000)),
            series: Some(&only),
            by: GroupBy::Stack,
            from_ms: 0,
        };
        aggregate(&path, &part, &mut out).unwrap();
        assert_eq!(out, HashMap::from([(1, 3)]));

        let mut out = HashMap::new();
        let t = Scan {
            time: Some((0, 4000)),
            series: None,
            by: GroupBy::Time { step_ms: 2000 },
            from_ms: 0,
        };
        aggregate(&path, &t, &mut out).unwrap();
        assert_eq!(out, HashMap::from([(0, 11), (2000, 6)]));
    }
}
