//! Every acknowledged sample survives `kill -9`, with flushes racing the kill.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{client, now_ms, Proc};

#[test]
fn acked_samples_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    // Tiny flush thresholds so WAL rotation and segment writes happen mid-run.
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        "[storage]\nflush_interval_secs = 1\nflush_rows = 50\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let cfg_arg = cfg.to_str().unwrap().to_owned();
    let srv = Proc::spawn(&data, &["--config", &cfg_arg]);
    let t0 = now_ms() - 10_000;

    // Each request carries unique stacks, so each acked value can be checked exactly.
    let acked: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..4 {
        let (acked, stop, base) = (acked.clone(), stop.clone(), srv.base.clone());
        threads.push(std::thread::spawn(move || {
            let c = client();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let leaf = format!("req_{t}_{i}");
                let value = (i % 97 + 1) as i64;
                let body = format!("main;handler;{leaf} {value}\nmain;shared {value}\n");
                let url = format!("{base}/api/v1/ingest?service=crash&kind=on-cpu&format=folded&from={t0}&label=worker:{t}");
                match c.post(url).body(body).send() {
                    Ok(r) if r.status() == 200 => {
                        let mut a = acked.lock().unwrap();
                        a.insert(format!("main;handler;{leaf}"), value);
                        *a.entry("main;shared".into()).or_insert(0) += value;
                    }
                    _ => {} // the server died under us: not acknowledged
                }
                i += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(2500));
    srv.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "too few acked requests ({}) to mean anything",
        acked.len()
    );
    let segments = std::fs::read_dir(data.join("segments")).unwrap().count();
    assert!(
        segments > 0,
        "expected flushes to have happened before the kill"
    );

    let srv = Proc::spawn(&data, &["--config", &cfg_arg]);
    let c = client();
    let out = srv.folded_around(&c, "crash", t0);
    let got: HashMap<&str, i64> = out
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap())
        .map(|(s, v)| (s, v.parse().unwrap()))
        .collect();
    let mut missing = 0;
    for (stack, v) in &acked {
        if stack == "main;shared" {
            // Requests in flight at the kill may or may not have landed.
            assert!(
                got[stack.as_str()] >= *v,
                "shared total {} < acked {}",
                got[stack.as_str()],
                v
            );
        } else if got.get(stack.as_str()) != Some(v) {
            missing += 1;
        }
    }
    assert_eq!(
        missing,
        0,
        "{missing} of {} acked stacks lost or changed",
        acked.len()
    );
    // Nothing was counted twice: unacked requests add at most one value each.
    let extra = got.len() as i64 - acked.len() as i64;
    assert!((0..=4).contains(&extra), "unexpected extra stacks: {extra}");
}
