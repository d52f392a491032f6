//! The fleet overview: every service's on-CPU cores, off-CPU waiting per
//! reason, hosts and activity over a range, from one store pass.

use std::collections::BTreeMap;

use profiler_pprof::kind;
use serde::Serialize;

use super::round;
use crate::store::{Grid, Overview, ServiceTotals};

/// Hosts listed by name per service; the count covers all of them.
const HOST_NAMES: usize = 10;

#[derive(Debug, Serialize)]
pub struct Fleet {
    pub from: i64,
    pub until: i64,
    pub step: i64,
    /// Heaviest on-CPU first.
    pub services: Vec<ServiceSummary>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ServiceSummary {
    pub service: String,
    /// Cores busy on average: on-CPU time per second of the range.
    pub on_cpu_cores: f64,
    /// Threads waiting on average, per off-CPU reason (`blocked-io`, ...).
    pub off_cpu: BTreeMap<String, f64>,
    pub off_cpu_threads: f64,
    pub hosts: usize,
    /// The first hosts by name.
    pub host_names: Vec<String>,
    /// Start of the latest window with data in the range, unix ms.
    pub last_seen: i64,
    /// On-CPU cores and off-CPU threads per step, for sparklines.
    pub on_cpu_series: Vec<f64>,
    pub off_cpu_series: Vec<f64>,
    /// Kinds that are neither on- nor off-CPU time (memory profiles, ...).
    pub other_kinds: Vec<String>,
}

pub fn fleet(grid: Grid, overview: Overview) -> Fleet {
    let ns = |ms: i64| ms.max(1) as f64 * 1e6;
    let range_ns = ns(grid.until_ms - grid.from_ms);
    let widths: Vec<f64> = (0..grid.buckets() as i64)
        .map(|i| {
            let start = grid.from_ms + i * grid.step_ms;
            ns((start + grid.step_ms).min(grid.until_ms) - start)
        })
        .collect();
    let per_bucket = |sum: &[i64]| -> Vec<f64> {
        sum.iter().zip(&widths).map(|(&v, w)| round(v as f64 / w)).collect()
    };
    let mut services: Vec<ServiceSummary> = overview
        .into_iter()
        .map(|(service, t)| {
            let ServiceTotals { kinds, hosts, last_seen_ms } = t;
            let mut on = vec![0i64; widths.len()];
            let mut off = vec![0i64; widths.len()];
            let mut off_cpu = BTreeMap::new();
            let mut other_kinds = Vec::new();
            for (kind, buckets) in kinds {
                let into = if kind::is_on_cpu(&kind) {
                    &mut on
                } else if let Some(reason) = kind::off_cpu_reason(&kind) {
                    let total: i64 = buckets.iter().sum();
                    off_cpu.insert(reason.to_owned(), round(total as f64 / range_ns));
                    &mut off
                } else {
                    other_kinds.push(kind);
                    continue;
                };
                for (a, b) in into.iter_mut().zip(&buckets) {
                    *a += b;
                }
            }
            ServiceSummary {
                service,
                on_cpu_cores: round(on.iter().sum::<i64>() as f64 / range_ns),
                off_cpu_threads: round(off.iter().sum::<i64>() as f64 / range_ns),
                off_cpu,
                hosts: hosts.len(),
                host_names: hosts.into_iter().take(HOST_NAMES).collect(),
                last_seen: last_seen_ms,
                on_cpu_series: per_bucket(&on),
                off_cpu_series: per_bucket(&off),
                other_kinds,
            }
        })
        .collect();
    services.sort_by(|a, b| {
        b.on_cpu_cores
            .total_cmp(&a.on_cpu_cores)
            .then(b.off_cpu_threads.total_cmp(&a.off_cpu_threads))
            .then_with(|| a.service.cmp(&b.service))
    });
    Fleet {
        from: grid.from_ms,
        until: grid.until_ms,
        step: grid.step_ms,
        services,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_and_waits_per_second_of_range() {
        let grid = Grid { from_ms: 0, until_ms: 25_000, step_ms: 10_000 };
        let mut t = ServiceTotals::default();
        // 10 s of range-time per bucket: 5e9 ns of CPU in one is half a core.
        t.add(&grid, "on-cpu", 0, 5_000_000_000);
        t.add(&grid, "cpu", 20_000, 2_500_000_000);
        t.add(&grid, "off-cpu:blocked-io", 10_000, 25_000_000_000);
        t.add(&grid, "alloc_space", 10_000, 77);
        t.hosts.extend(["b".to_string(), "a".to_string()]);
        let quiet = ServiceTotals { last_seen_ms: 0, ..ServiceTotals::default() };
        let f = fleet(grid, Overview::from([("busy".into(), t), ("quiet".into(), quiet)]));
        let s = &f.services[0];
        assert_eq!(s.service, "busy");
        assert_eq!(s.on_cpu_cores, 0.3);
        assert_eq!(s.off_cpu["blocked-io"], 1.0);
        assert_eq!(s.off_cpu_threads, 1.0);
        // The last bucket is 5 s wide.
        assert_eq!(s.on_cpu_series, vec![0.5, 0.0, 0.5]);
        assert_eq!(s.off_cpu_series, vec![0.0, 2.5, 0.0]);
        assert_eq!((s.hosts, s.host_names.clone()), (2, vec!["a".to_string(), "b".to_string()]));
        assert_eq!(s.last_seen, 20_000);
        assert_eq!(s.other_kinds, vec!["alloc_space".to_string()]);
        assert_eq!(f.services[1].service, "quiet");
    }

}
