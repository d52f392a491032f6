//! The request table on the real server binary: an hour of 10 s windows from one
//! service, 100,080 distinct request ids, sent as our agent sends them (bundle3). They
//! make no series; the table survives a kill -9; `/api/v1/requests` ranks them with
//! exact percentiles; the slowest 1%'s profile holds the slow requests' extra wait and
//! the rest's does not. Prints the table's disk size, the server's memory and the query
//! time (the figures in the README's "Slowest requests").

use std::time::Instant;

use crate::common;

use common::{client, now_ms, Proc};
use profiler_pprof::stacks::{BundleWriter, RequestsWriter, Writer};

const WINDOWS: u64 = 360;
pub(crate) const PER_WINDOW: u64 = 278;
const MS: u64 = 1_000_000;

/// Request `j`'s (on-CPU, base wait, extra wait) in ns: every 100th waits 40 ms more.
pub(crate) fn request(j: u64) -> (u64, u64, u64) {
    (MS, (20 + j % 20) * MS, if j % 100 == 99 { 40 * MS } else { 0 })
}

/// One window of bundle3: an on-CPU part and an off-CPU part, each with its requests.
pub(crate) fn window(first: u64) -> Vec<u8> {
    let ids = first..first + PER_WINDOW;
    let name = |j: u64| format!("req-{j}");
    let mut bundle = BundleWriter::default();
    let labels = [("endpoint", "checkout")];

    let mut on = Writer::default();
    on.framed(&["main", "handle", "work"], ids.clone().map(|j| request(j).0 as i64).sum());
    let mut on_requests = RequestsWriter::default();
    for j in ids.clone() {
        on_requests.request("request_id", &name(j), &[(0, request(j).0)]);
    }
    bundle.part_with_requests("api", "on-cpu", &labels, &on.finish(), &[], &on_requests.finish());

    let mut off = Writer::default();
    off.framed(&["main", "handle", "base_wait"], ids.clone().map(|j| request(j).1 as i64).sum());
    off.framed(&["main", "handle", "slow_dependency"], ids.clone().map(|j| request(j).2 as i64).sum());
    let mut off_requests = RequestsWriter::default();
    for j in ids {
        let (_, base, extra) = request(j);
        let entries: Vec<(u64, u64)> = [(0, base), (1, extra)].into_iter().filter(|&(_, v)| v > 0).collect();
        off_requests.request("request_id", &name(j), &entries);
    }
    bundle.part_with_requests("api", "off-cpu:sleep", &labels, &off.finish(), &[], &off_requests.finish());
    profiler_pprof::gzip(&bundle.finish())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.parse().ok()).unwrap()
}

#[test]
fn a_hundred_thousand_request_ids_make_no_series_and_rank_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), &[]);
    let start = (now_ms() - 3_700_000) / 10_000 * 10_000;
    let rss_before = rss_kib(p.child.id());
    let t = Instant::now();
    for w in 0..WINDOWS {
        let at = start + w as i64 * 10_000;
        let r = client()
            .post(p.url(&format!("/api/v1/ingest?format=bundle3&from={at}&batch_id=b{w}&label=host:h1")))
            .body(window(w * PER_WINDOW))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }
    let ingest_s = t.elapsed().as_secs_f64();
    // A retried window is not counted twice.
    let r = client().post(p.url(&format!("/api/v1/ingest?format=bundle3&from={start}&batch_id=b0&label=host:h1"))).body(window(0)).send().unwrap();
    assert_eq!(r.status(), 200);
    let rss_after = rss_kib(p.child.id());
    // What was acknowledged survives a crash.
    p.kill9();
    let p = Proc::spawn(dir.path(), &[]);

    let range = format!("service=api&from={start}&until={}", start + WINDOWS as i64 * 10_000);
    let labels: Vec<String> = client().get(p.url(&format!("/api/v1/labels?service=api"))).send().unwrap().json().unwrap();
    assert!(!labels.contains(&"request_id".to_string()), "{labels:?}");
    let t = Instant::now();
    let table: serde_json::Value = client().get(p.url(&format!("/api/v1/requests?{range}&limit=3"))).send().unwrap().json().unwrap();
    let query_ms = t.elapsed().as_secs_f64() * 1e3;
    let n = WINDOWS * PER_WINDOW;
    assert_eq!(table["count"], n);
    let mut totals: Vec<u64> = (0..n).map(|j| request(j).0 + request(j).1 + request(j).2).collect();
    totals.sort_unstable();
    let rank = |q: f64| totals[((q * n as f64).ceil() as usize).clamp(1, n as usize) - 1];
    assert_eq!(table["total_ns"]["p99"], rank(0.99));
    assert_eq!(table["total_ns"]["p50"], rank(0.5));
    assert_eq!(table["total_ns"]["max"], *totals.last().unwrap());
    assert_eq!(table["requests"][0]["labels"]["endpoint"], "checkout");

    let folded = |pick: &str| -> Vec<(String, i64)> {
        let text = client().get(p.url(&format!("/api/v1/folded?{range}&kinds=off-cpu:sleep&requests={pick}"))).send().unwrap().text().unwrap();
        let mut stacks: Vec<(String, i64)> = text.lines().filter_map(|l| l.rsplit_once(' ')).map(|(s, v)| (s.to_owned(), v.parse().unwrap())).collect();
        stacks.sort_by_key(|(_, v)| -v);
        stacks
    };
    let slowest = folded("slowest:1");
    assert!(slowest[0].0.ends_with("slow_dependency"), "{slowest:?}");
    assert!(folded("rest:1").iter().all(|(s, _)| !s.ends_with("slow_dependency")));

    let series = p.metric("profiler_dictionary_entries{dictionary=\"series\"}");
    assert!(series <= 2, "{series} series for one service with 100k request ids");
    let disk = p.metric("profiler_request_table_bytes");
    println!(
        "REQUESTS {n} request ids over {WINDOWS} windows: ingest {ingest_s:.1} s; request table {:.1} MB on disk ({:.0} B a request); \
         server RSS {:.0} MB before, {:.0} MB after ingest; /api/v1/requests over the hour {query_ms:.0} ms; {series} series",
        disk as f64 / 1e6,
        disk as f64 / n as f64,
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
    );
}
