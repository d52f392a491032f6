//! Wait-duration histograms on the real server binary: our agent's `bundle2`
//! windows carry them, `/api/v1/waits` merges them per frame pattern, kind and
//! range, `/api/v1/changes` finds a tail that grew under an unchanged total, and
//! they never leak into profiles' totals.

use crate::common;

use common::{client, now_ms, Proc};
use profiler_pprof::stacks::{BundleWriter, WaitsWriter, Writer};
use profiler_pprof::waits::{Histogram, ONE};
use serde_json::Value;

const WINDOW_MS: i64 = 10_000;
const QUERY_DB: &[&str] = &["db", "main", "handle", "query_db", "do_nanosleep_[k]"];
const IDLE: &[&str] = &["db", "main", "idle", "ep_poll_[k]"];

/// Durations with ±2% of jitter, from a fixed seed.
struct Jitter(u64);

impl Jitter {
    fn around(&mut self, ns: f64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let unit = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        (ns * (0.98 + 0.04 * unit)) as u64
    }
}

/// One window of service `db`: `query_db` waits `durations`, the idle loop 100
/// waits of 10 ms.
pub fn window(durations: &[u64]) -> Vec<u8> {
    let mut stacks = Writer::default();
    let mut waits = WaitsWriter::default();
    let mut histogram = Histogram::default();
    for &d in durations {
        histogram.record(d, ONE);
    }
    stacks.framed(QUERY_DB, durations.iter().sum::<u64>() as i64);
    waits.histogram(0, &histogram);
    let mut idle = Histogram::default();
    for _ in 0..100 {
        idle.record(10_000_000, ONE);
    }
    stacks.framed(IDLE, 1_000_000_000);
    waits.histogram(1, &idle);
    let mut bundle = BundleWriter::default();
    bundle.part_with_waits("db", "off-cpu:sleep", &[("pid", "7")], &stacks.finish(), &waits.finish());
    bundle.finish()
}

fn post(p: &Proc, format: &str, at: i64, body: Vec<u8>) -> reqwest::blocking::Response {
    let url = p.url(&format!("/api/v1/ingest?format={format}&from={at}&batch_id=w{at}&label=host:h1"));
    client().post(url).body(profiler_pprof::gzip(&body)).send().unwrap()
}

fn get(p: &Proc, query: &str) -> Value {
    let r = client().get(p.url(query)).send().unwrap();
    assert_eq!(r.status(), 200, "{query}");
    r.json().unwrap()
}

fn start_ms() -> i64 {
    (now_ms() - 3 * 3_600_000).div_euclid(60_000) * 60_000
}

fn ms(v: &Value) -> f64 {
    v.as_f64().unwrap() / 1e6
}

#[test]
fn percentiles_per_frame_and_nothing_in_the_totals() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), &[]);
    let t0 = start_ms();
    let mut jitter = Jitter(7);
    // Four threads, 40 s: 97% of calls wait 2 ms, 3% wait 60 ms.
    for w in 0..4 {
        let durations: Vec<u64> = (0..1000).map(|i| jitter.around(if i % 100 < 3 { 60e6 } else { 2e6 })).collect();
        let r = post(&p, "bundle2", t0 + w * WINDOW_MS, window(&durations));
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }
    let range = format!("service=db&from={t0}&until={}", t0 + 4 * WINDOW_MS);
    let v = get(&p, &format!("/api/v1/waits?{range}&frame=query_db"));
    assert_eq!(v["count"], 4000.0, "{v}");
    assert_eq!(v["stacks"], 1);
    assert!((1.9..2.1).contains(&ms(&v["p50_ns"])), "{v}");
    assert!((57.0..63.0).contains(&ms(&v["p99_ns"])), "{v}");
    assert!(ms(&v["max_ns"]) >= 61.0, "{v}");
    let buckets = v["buckets"].as_array().unwrap();
    assert!(buckets.windows(2).all(|b| b[0]["le_ns"].as_u64() < b[1]["le_ns"].as_u64()));
    assert_eq!(buckets.iter().map(|b| b["count"].as_f64().unwrap()).sum::<f64>(), 4000.0);

    // Every off-CPU stack without a pattern; a kind or a filter narrows.
    let all = get(&p, &format!("/api/v1/waits?{range}"));
    assert_eq!((all["count"].as_f64(), all["stacks"].as_u64()), (Some(4400.0), Some(2)), "{all}");
    let none = get(&p, &format!("/api/v1/waits?{range}&kind=off-cpu:blocked-io"));
    assert_eq!(none["count"], 0.0);
    assert!(none["p99_ns"].is_null());
    let other_pid = get(&p, &format!("/api/v1/waits?{range}&filter=pid=8"));
    assert_eq!(other_pid["count"], 0.0);

    // Functions ranked by p99: query_db's stack first (60 ms), idle (10 ms) after.
    let f = get(&p, &format!("/api/v1/waits?{range}&by=function"));
    let names: Vec<&str> = f["functions"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    let at = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(at("query_db") < at("idle"), "{names:?}");

    // The histograms are not time: totals and exports do not see them.
    let folded = client().get(p.url(&format!("/api/v1/folded?{range}"))).send().unwrap().text().unwrap();
    assert!(!folded.contains("waits:") && folded.lines().count() == 2, "{folded}");
    let top = get(&p, &format!("/api/v1/top?{range}"));
    let query_db_ns: i64 = 4 * (1000.0 * (0.97 * 2e6 + 0.03 * 60e6)) as i64;
    let total = top["total"].as_i64().unwrap();
    assert!((total - query_db_ns - 4_000_000_000).abs() < query_db_ns / 50, "{total}");

    // Malformed or misplaced histograms are refused; nobody writes their kind.
    let mut cut = window(&[2_000_000]);
    cut.truncate(cut.len() - 3);
    assert_eq!(post(&p, "bundle2", t0, cut).status(), 400);
    let mut on_cpu = BundleWriter::default();
    let mut stacks = Writer::default();
    stacks.framed(QUERY_DB, 1);
    let mut waits = WaitsWriter::default();
    let mut h = Histogram::default();
    h.record(1, ONE);
    waits.histogram(0, &h);
    on_cpu.part_with_waits::<&str, &str>("db", "on-cpu", &[], &stacks.finish(), &waits.finish());
    let r = post(&p, "bundle2", t0, on_cpu.finish());
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("off-CPU kinds"));
    let r = client()
        .post(p.url(&format!("/api/v1/ingest?service=db&kind=waits:off-cpu:sleep&format=folded&from={t0}")))
        .body("a;b 1\n")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("reserved"));
    // A count no host could record, which sums over a range would overflow.
    let mut huge = BundleWriter::default();
    let mut stacks = Writer::default();
    stacks.framed(QUERY_DB, 1);
    let mut waits = WaitsWriter::default();
    let mut h = Histogram::default();
    h.add(150, 1 << 62);
    waits.histogram(0, &h);
    huge.part_with_waits::<&str, &str>("db", "off-cpu:sleep", &[], &stacks.finish(), &waits.finish());
    let r = post(&p, "bundle2", t0, huge.finish());
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("out of range"));
    let bad = client().get(p.url(&format!("/api/v1/waits?{range}&frame=(unclosed"))).send().unwrap();
    assert_eq!(bad.status(), 400);
}

/// The case: base, every call waits 5 ms; target, 95% wait 3.5 ms and 5%
/// 33.5 ms: the same mean and total, p99 from 5 to 33.5 ms. The changes API finds it,
/// on top; an A/A pair of the base finds nothing.
#[test]
fn a_tail_that_grew_under_the_same_total_is_a_change_and_a_a_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), &[]);
    let t0 = start_ms();
    let mut jitter = Jitter(11);
    let windows = 20;
    // Base A, base A' (A/A), then the target: 20 windows each, 4 threads' 2,000 calls a window.
    for w in 0..3 * windows {
        let target = w >= 2 * windows;
        let durations: Vec<u64> = (0..2000)
            .map(|i| match target {
                false => jitter.around(5e6),
                true if i % 20 == 0 => jitter.around(33.5e6),
                true => jitter.around(3.5e6),
            })
            .collect();
        let r = post(&p, "bundle2", t0 + w * WINDOW_MS, window(&durations));
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }
    let side = windows * WINDOW_MS;
    let changes = |from: i64| get(&p, &format!("/api/v1/changes?service=db&from={from}&until={}", from + side));

    let aa = changes(t0 + side);
    let flagged: Vec<&Value> = aa["tails"].as_array().unwrap().iter().filter(|t| t["significant"] == true).collect();
    assert!(flagged.is_empty(), "A/A flags nothing: {flagged:?}");
    assert!(!aa["tails"].as_array().unwrap().is_empty(), "the stacks were tested: {aa}");

    let v = changes(t0 + 2 * side);
    let top = &v["tails"][0];
    eprintln!("tail change: {top}");
    assert_eq!(top["significant"], true, "{v}");
    assert_eq!(top["direction"], "regression");
    assert_eq!(top["function"], "query_db");
    assert_eq!(top["stack"].as_array().unwrap().len(), QUERY_DB.len());
    assert!((4.5..5.6).contains(&ms(&top["base_p99_ns"])), "{top}");
    assert!((31.0..36.0).contains(&ms(&top["target_p99_ns"])), "{top}");
    // The total did not move: no rate change of query_db counts.
    let totals_flag = v["changes"].as_array().unwrap().iter().any(|c| c["function"] == "query_db" && c["significant"] == true);
    assert!(!totals_flag, "{v}");
}
