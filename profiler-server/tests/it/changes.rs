//! `GET /api/v1/changes` on a real server with sampled data: every 10 s window
//! draws 2,000 on-CPU samples (two cores at 99 Hz) and off-CPU waits with the
//! noise of real sampling. A/A comparisons of a steady workload must report
//! nothing (at most 1 in 20), and a 5-point CPU shift into one function or
//! 20 ms more blocked-io per request must come out on top with its kind.

use crate::common;

use common::sampled::{window, Rng, Workload, STEADY};
use common::Proc;
use serde_json::Value;

const WINDOW_MS: i64 = 10_000;

struct Server {
    proc: Proc,
    _dir: tempfile::TempDir,
    client: reqwest::blocking::Client,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        Server { proc: Proc::spawn(dir.path(), &[]), _dir: dir, client: reqwest::blocking::Client::new() }
    }

    fn post(&self, service: &str, kind: &str, at: i64, body: String) {
        let url = format!(
            "{}/api/v1/ingest?service={service}&kind={kind}&format=folded&from={at}&label=host:h1",
            self.proc.base
        );
        let r = self.client.post(url).body(body).send().unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }

    /// `windows` windows of `service` from `from`, each drawn from `w`.
    fn run(&self, rng: &mut Rng, service: &str, from: i64, windows: i64, w: Workload) {
        for i in 0..windows {
            let (on, off) = window(rng, w);
            let at = from + i * WINDOW_MS;
            self.post(service, "on-cpu", at, on);
            self.post(service, "off-cpu:blocked-io", at, off.lines().next().unwrap().to_owned() + "\n");
            self.post(service, "off-cpu:sleep", at, off.lines().nth(1).unwrap().to_owned() + "\n");
        }
    }

    fn changes(&self, query: &str) -> Value {
        let r = self.client.get(format!("{}/api/v1/changes?{query}", self.proc.base)).send().unwrap();
        assert_eq!(r.status(), 200);
        r.json().unwrap()
    }
}

fn start_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    (now - 6 * 3_600_000).div_euclid(60_000) * 60_000
}

fn significant(v: &Value) -> Vec<&Value> {
    v["changes"].as_array().unwrap().iter().filter(|c| c["significant"] == true).collect()
}

#[test]
fn steady_workload_reports_nothing_in_a_a_comparisons() {
    let srv = Server::start();
    let mut rng = Rng(0x0a0a);
    let t0 = start_ms();
    // 20 comparisons of back-to-back 5-minute ranges: 200 minutes.
    let range = 5 * 60_000;
    srv.run(&mut rng, "steady", t0, 40 * range / WINDOW_MS, STEADY);
    let mut flagged = Vec::new();
    for i in 0..20 {
        let from = t0 + (2 * i + 1) * range;
        let v = srv.changes(&format!("service=steady&from={from}&until={}", from + range));
        assert_eq!(v["base_from"], from - range);
        assert_eq!(v["observations"], serde_json::json!([30, 30]));
        assert!(v["tested"].as_u64().unwrap() >= 20, "{v}");
        let s = significant(&v);
        if !s.is_empty() {
            flagged.push(format!("{i}: {:?}", s.iter().map(|c| (&c["function"], &c["kind"], &c["q"])).collect::<Vec<_>>()));
        }
    }
    println!("A/A comparisons with a significant change: {} of 20 {flagged:?}", flagged.len());
    assert!(flagged.len() <= 1, "{flagged:#?}");
}

#[test]
fn a_cpu_shift_and_more_blocked_io_come_out_on_top_with_their_kind() {
    let srv = Server::start();
    let mut rng = Rng(0xb0b0);
    let t0 = start_ms();
    let range = 5 * 60_000;
    let windows = range / WINDOW_MS;
    srv.run(&mut rng, "cpu", t0, windows, STEADY);
    srv.run(&mut rng, "cpu", t0 + range, windows, Workload { shifted: 0.05, ..STEADY });
    srv.run(&mut rng, "io", t0, windows, STEADY);
    srv.run(&mut rng, "io", t0 + range, windows, Workload { io_ms: 50.0, ..STEADY });

    let v = srv.changes(&format!("service=cpu&from={}&until={}", t0 + range, t0 + 2 * range));
    let top = &v["changes"][0];
    assert_eq!(
        (&top["function"], &top["kind"], &top["measure"], &top["direction"], &top["significant"]),
        (&"hot_loop".into(), &"on-cpu".into(), &"self".into(), &"regression".into(), &true.into()),
        "{v:#}"
    );
    let moved = top["target_share"].as_f64().unwrap() - top["base_share"].as_f64().unwrap();
    assert!((moved - 0.05).abs() < 0.01, "{moved}");
    // render gave the time: an improvement; nothing off-CPU changed.
    let s = significant(&v);
    assert!(s.iter().any(|c| c["function"] == "render" && c["direction"] == "improvement"));
    assert!(s.iter().all(|c| c["kind"] == "on-cpu"), "{s:#?}");

    let v = srv.changes(&format!("service=io&from={}&until={}", t0 + range, t0 + 2 * range));
    let top = &v["changes"][0];
    assert_eq!(
        (&top["function"], &top["kind"], &top["measure"], &top["significant"]),
        (&"read".into(), &"off-cpu:blocked-io".into(), &"self".into(), &true.into()),
        "{v:#}"
    );
    // 10 requests per second, 20 ms more each: 0.2 threads more waiting.
    assert!((top["delta_rate"].as_f64().unwrap() - 0.2).abs() < 0.03, "{top}");
    assert!(significant(&v).iter().all(|c| c["kind"] != "on-cpu"), "{v:#}");
}

#[test]
fn versions_compare_by_label_and_bad_ranges_are_refused() {
    let srv = Server::start();
    let mut rng = Rng(0xc0c0);
    let t0 = start_ms();
    let windows = 30;
    // Two versions side by side on different hosts over the same range.
    for (i, (version, w)) in [("1.4", STEADY), ("1.5", Workload { shifted: 0.08, ..STEADY })].into_iter().enumerate() {
        for k in 0..windows {
            let (on, _) = window(&mut rng, w);
            let url = format!(
                "{}/api/v1/ingest?service=ab&kind=on-cpu&format=folded&from={}&label=host:h{i}&label=version:{version}",
                srv.proc.base,
                t0 + k * WINDOW_MS
            );
            assert_eq!(srv.client.post(url).body(on).send().unwrap().status(), 200);
        }
    }
    let until = t0 + windows * WINDOW_MS;
    let v = srv.changes(&format!("service=ab&from={t0}&until={until}&filter=version=1.5&base_filter=version=1.4"));
    assert_eq!((v["base_from"].as_i64(), v["base_until"].as_i64()), (Some(t0), Some(until)));
    assert_eq!((&v["filter"], &v["base_filter"]), (&"version=1.5".into(), &"version=1.4".into()));
    assert_eq!(v["changes"][0]["function"], "hot_loop");
    assert_eq!(v["changes"][0]["significant"], true);

    let r = srv.client.get(format!("{}/api/v1/changes?service=ab&from={t0}&until={}", srv.proc.base, t0 + 5_000)).send().unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("at least two"));
    let r = srv.client.get(format!("{}/api/v1/changes?service=ab&from={t0}&until={until}&alpha=2", srv.proc.base)).send().unwrap();
    assert_eq!(r.status(), 400);
}
