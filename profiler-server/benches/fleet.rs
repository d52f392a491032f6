//! `cargo bench -p profiler-server --bench fleet`: the fleet overview
//! (`GET /api/v1/overview`) of 1,000 services on two hosts each, over the
//! last 15 min, 1 h and 6 h, on the embedded store behind a real server.
//!
//! Each service has on-CPU and two off-CPU kinds every 10 s for 1 h. The
//! first 50 minutes are flushed to segments every 10 minutes (the way a
//! server's flushes cut them, at a coarser cadence to keep set-up short);
//! the last 10 minutes stay in the WAL and are replayed into the buffer,
//! where recent data lives on a running server.

use std::time::{Duration, Instant};

use profiler_server::query;
use profiler_server::store::{
    series_id, stack_id, Batch, Cancel, EmbeddedStore, Frames, Grid, Labels, Row, Store,
    StoreOptions,
};

mod common;

use common::Rng;

const SERVICES: usize = 1_000;
const HOSTS: usize = 2;
const WINDOW_MS: i64 = 10_000;
const HOUR_MS: i64 = 3_600_000;
const FLUSH_MS: i64 = 600_000;
const KINDS: [(&str, usize); 3] = [("on-cpu", 10), ("off-cpu:blocked-io", 3), ("off-cpu:lock", 3)];

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One (service, kind) over `[from, until)`: `stacks` stacks per host per window.
fn batch(rng: &mut Rng, service: &str, kind: &str, stacks: usize, from: i64, until: i64) -> Batch {
    let frames: Vec<Frames> = (0..stacks)
        .map(|i| Frames::from(["main".into(), format!("{service}::handler_{i}").into()]))
        .collect();
    let series: Vec<Labels> = (0..HOSTS)
        .map(|h| {
            Labels::from([
                ("service".to_string(), service.to_string()),
                ("host".to_string(), format!("host-{h}")),
            ])
        })
        .collect();
    let mut rows = Vec::new();
    for ts in (from..until).step_by(WINDOW_MS as usize) {
        for l in &series {
            for f in &frames {
                rows.push(Row {
                    ts_ms: ts,
                    series_id: series_id(l),
                    stack_id: stack_id(f),
                    value: (rng.next() % 50_000_000) as i64,
                });
            }
        }
    }
    Batch {
        id: None,
        maybe_stored_since_ms: None,
        service: service.into(),
        kind: kind.into(),
        stacks: frames.iter().map(|f| (stack_id(f), f.clone())).collect(),
        series: series.iter().map(|l| (series_id(l), l.clone())).collect(),
        rows,
    }
}

fn load(dir: &std::path::Path, start: i64) -> usize {
    let store = EmbeddedStore::open(
        dir,
        StoreOptions {
            max_buffered_rows: usize::MAX,
            max_wal_bytes: u64::MAX,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let mut rng = Rng(0x5eed);
    let mut rows = 0;
    for from in (start..start + HOUR_MS).step_by(FLUSH_MS as usize) {
        for s in 0..SERVICES {
            let service = format!("svc-{s:04}");
            for (kind, stacks) in KINDS {
                let b = batch(&mut rng, &service, kind, stacks, from, from + FLUSH_MS);
                rows += b.rows.len();
                store.append(b).unwrap();
            }
        }
        if from + FLUSH_MS < start + HOUR_MS {
            store.flush().unwrap();
        }
    }
    println!(
        "loaded {rows} rows of {SERVICES} services: {} segments, the last 10 min in the WAL",
        store.segment_count()
    );
    let until = start + HOUR_MS;
    let grid = Grid { from_ms: until - HOUR_MS, until_ms: until, step_ms: 60_000 };
    let mut phases = [Duration::ZERO; 3];
    for _ in 0..5 {
        let t = Instant::now();
        let o = store.overview(grid, &Cancel::default()).unwrap();
        let t1 = Instant::now();
        let f = query::fleet(grid, o);
        let t2 = Instant::now();
        let json = serde_json::to_vec(&f).unwrap();
        let t3 = Instant::now();
        assert!(!json.is_empty());
        phases = [t1 - t, t2 - t1, t3 - t2];
    }
    println!(
        "1 h in-process: store {:.1?}, shaping {:.1?}, JSON {:.1?}",
        phases[0], phases[1], phases[2]
    );
    rows
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // Set-up writes thousands of fsynced files: on tmpfs it takes seconds.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    let now = now_ms();
    let start = (now - HOUR_MS).div_euclid(WINDOW_MS) * WINDOW_MS;
    let t = Instant::now();
    load(dir.path(), start);
    println!("set-up: {:.1?}", t.elapsed());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let srv = rt.block_on(profiler_server::start(common::server_config(dir.path()))).unwrap();
    let base = format!("http://{}", srv.addr);
    let client = reqwest::blocking::Client::new();
    println!();
    println!("GET /api/v1/overview, {SERVICES} services, release build, median of 15 after one warm-up");
    for (label, range_ms) in [("15 min", 900_000), ("1 h", HOUR_MS), ("6 h", 6 * HOUR_MS)] {
        let url = format!("{base}/api/v1/overview?from={}&until={now}", now - range_ms);
        let mut times = Vec::new();
        let mut body = String::new();
        for i in 0..16 {
            let t = Instant::now();
            let r = client.get(&url).send().unwrap();
            assert_eq!(r.status(), 200);
            body = r.text().unwrap();
            if i > 0 {
                times.push(t.elapsed());
            }
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let services = v["services"].as_array().unwrap();
        assert_eq!(services.len(), SERVICES);
        assert!(services.iter().all(|s| s["hosts"] == HOSTS && s["on_cpu_cores"].as_f64().unwrap() > 0.0));
        println!(
            "  {label:<7} {:>8.1?}   ({} KB of JSON)",
            median(times),
            body.len() / 1024
        );
    }
    rt.block_on(srv.shutdown()).unwrap();
}
