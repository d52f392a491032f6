//! Metrics stage: counters and latency histograms in Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::store::StoreStats;

const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    pub ingested_rows: AtomicU64,
    pub ingested_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_errors: AtomicU64,
    pub duplicate_batches: AtomicU64,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
}

impl Metrics {
    pub fn record_request(&self, route: &str, status: u16, elapsed: Duration) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((route.to_owned(), status)).or_insert(0) += 1;
        drop(r);
        let secs = elapsed.as_secs_f64();
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let h = l.entry(route.to_owned()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn render(&self, disk_bytes: u64, buffered_rows: usize, store: &StoreStats) -> String {
        let mut o = String::new();
        let c = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        c(
            &mut o,
            "profiler_ingested_rows_total",
            "Sample rows accepted.",
            self.ingested_rows.load(Ordering::Relaxed),
        );
        c(
            &mut o,
            "profiler_ingested_bytes_total",
            "Request body bytes accepted.",
            self.ingested_bytes.load(Ordering::Relaxed),
        );
        c(
            &mut o,
            "profiler_flushes_total",
            "Buffer flushes to segments.",
            self.flushes.load(Ordering::Relaxed),
        );
        c(
            &mut o,
            "profiler_flush_errors_total",
            "Failed flushes.",
            self.flush_errors.load(Ordering::Relaxed),
        );
        c(
            &mut o,
            "profiler_duplicate_batches_total",
            "Ingest retries of a batch id already stored: acknowledged, not counted again.",
            self.duplicate_batches.load(Ordering::Relaxed),
        );
        c(&mut o, "profiler_wal_fsyncs_total", "WAL fsyncs; batches written while one runs share the next.", store.wal_fsyncs);
        c(&mut o, "profiler_wal_fsync_failures_total", "WAL fsyncs that failed (the batches were refused).", store.wal_fsync_failures);
        c(&mut o, "profiler_wal_write_failures_total", "WAL writes that failed (the batches were refused).", store.wal_write_failures);
        c(&mut o, "profiler_wal_corrupt_records_total", "Corrupt WAL records skipped at start; their files are in wal/quarantine.", store.wal_corrupt_records);
        c(&mut o, "profiler_wal_quarantined_files_total", "WAL files moved to wal/quarantine at start.", store.wal_quarantined_files);
        let _ = writeln!(o, "# HELP profiler_wal_bytes Bytes in WAL files not yet flushed.\n# TYPE profiler_wal_bytes gauge\nprofiler_wal_bytes {}", store.wal_bytes);
        let _ = writeln!(o, "# HELP profiler_recent_batch_ids Batch ids remembered to drop retries.\n# TYPE profiler_recent_batch_ids gauge\nprofiler_recent_batch_ids {}", store.recent_batch_ids);
        let _ = writeln!(o, "# HELP profiler_dictionary_entries Stacks, series and the stacks' distinct frame names held in memory (entries past retention are forgotten).\n# TYPE profiler_dictionary_entries gauge\nprofiler_dictionary_entries{{dictionary=\"stacks\"}} {}\nprofiler_dictionary_entries{{dictionary=\"series\"}} {}\nprofiler_dictionary_entries{{dictionary=\"frame_names\"}} {}", store.dictionary_stacks, store.dictionary_series, store.dictionary_frame_names);
        let _ = writeln!(o, "# HELP profiler_totals_cache_bytes Memory held by segments' per-stack totals, which wide queries read instead of rows.\n# TYPE profiler_totals_cache_bytes gauge\nprofiler_totals_cache_bytes {}", store.totals_cache_bytes);
        let _ = writeln!(o, "# HELP profiler_result_cache_bytes Memory held by answers to queries over settled ranges.\n# TYPE profiler_result_cache_bytes gauge\nprofiler_result_cache_bytes {}", store.result_cache_bytes);
        let _ = writeln!(o, "# HELP profiler_ingest_refused 1 while the store refuses ingest (503).\n# TYPE profiler_ingest_refused gauge\nprofiler_ingest_refused {}", u8::from(store.busy.is_some()));
        let _ = writeln!(o, "# HELP profiler_disk_bytes Bytes used by WAL, segments and catalog.\n# TYPE profiler_disk_bytes gauge\nprofiler_disk_bytes {disk_bytes}");
        let _ = writeln!(o, "# HELP profiler_buffered_rows Rows in the WAL-backed buffer.\n# TYPE profiler_buffered_rows gauge\nprofiler_buffered_rows {buffered_rows}");
        let _ = writeln!(o, "# HELP profiler_http_requests_total HTTP requests by route and status.\n# TYPE profiler_http_requests_total counter");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "profiler_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(o, "# HELP profiler_http_request_seconds HTTP request latency by route.\n# TYPE profiler_http_request_seconds histogram");
        for (route, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "profiler_http_request_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                o,
                "profiler_http_request_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                o,
                "profiler_http_request_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                o,
                "profiler_http_request_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets() {
        let m = Metrics::default();
        m.record_request("/x", 200, Duration::from_millis(20));
        m.record_request("/x", 400, Duration::from_millis(200));
        let t = m.render(5, 0, &StoreStats::default());
        assert!(t.contains("profiler_http_requests_total{route=\"/x\",status=\"400\"} 1"));
        assert!(t.contains("profiler_http_request_seconds_bucket{route=\"/x\",le=\"0.025\"} 1"));
        assert!(t.contains("profiler_http_request_seconds_bucket{route=\"/x\",le=\"0.25\"} 2"));
        assert!(t.contains("profiler_disk_bytes 5"));
    }
}
