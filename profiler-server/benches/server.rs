//! `cargo bench -p profiler-server --bench server`: ingest throughput of the
//! embedded store and query latency on one hour of one service
//! (100 series x 250 stacks every 10 s, about 9M rows), plus bytes per row.

use std::sync::Arc;
use std::time::{Duration, Instant};

use profiler_server::config::Limits;
use profiler_server::ingest::{self, BatchBuilder, Target};
use profiler_server::query::{self, Tree};
use profiler_server::store::{
    series_id, stack_id, Aggregate, Batch, EmbeddedStore, Frames, GroupBy, Labels, Matcher, Row,
    Selector, Store, StoreOptions,
};

const SERIES: usize = 100;
const STACKS: usize = 250;
const WINDOW_MS: i64 = 10_000;
const HOUR_MS: i64 = 3_600_000;
const T0: i64 = 1_700_000_000_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// 250 stacks 8..32 deep over a pool of function names, sharing prefixes
/// the way real call trees do.
fn stacks(rng: &mut Rng) -> Vec<Frames> {
    let names: Vec<String> = (0..400)
        .map(|i| format!("crate::module_{}::function_{i}", i % 17))
        .collect();
    (0..STACKS)
        .map(|i| {
            let depth = 8 + (rng.next() % 24) as usize;
            let mut f = vec!["main".to_string(), format!("worker_{}", i % 8)];
            for d in 2..depth {
                f.push(
                    names[((i / 4) * 7 + d * 13 + (rng.next() % 3) as usize) % names.len()].clone(),
                );
            }
            Arc::from(f)
        })
        .collect()
}

fn series() -> Vec<Labels> {
    (0..SERIES)
        .map(|i| {
            Labels::from([
                ("service".to_string(), "bench".to_string()),
                ("host".to_string(), format!("host-{}", i % 20)),
                ("pid".to_string(), format!("{}", 1000 + i)),
            ])
        })
        .collect()
}

fn window_batch(
    ts: i64,
    stacks: &[Frames],
    series: &[Labels],
    rng: &mut Rng,
    dicts: bool,
) -> Batch {
    let st: Vec<u64> = stacks.iter().map(|s| stack_id(s)).collect();
    let se: Vec<u64> = series.iter().map(series_id).collect();
    let mut rows = Vec::with_capacity(SERIES * STACKS);
    for &series_id in &se {
        for &stack_id in &st {
            // Heavy-tailed sample counts (1..~900 samples of 10 ms), like
            // a few hot stacks among many cold ones.
            let r = rng.next();
            let samples = 1 + (r % 8) as i64 * (1i64 << ((r >> 8) % 8));
            rows.push(Row {
                ts_ms: ts,
                series_id,
                stack_id,
                value: samples * 10_000_000,
            });
        }
    }
    Batch {
        service: "bench".into(),
        kind: "on-cpu".into(),
        stacks: if dicts {
            st.iter().copied().zip(stacks.iter().cloned()).collect()
        } else {
            vec![]
        },
        series: if dicts {
            se.iter().copied().zip(series.iter().cloned()).collect()
        } else {
            vec![]
        },
        rows,
    }
}

fn opts() -> StoreOptions {
    StoreOptions {
        segment_span_ms: 600_000,
        retention_ms: None,
        downsample: vec![],
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    (median(times), last.expect("runs > 0"))
}

fn sel(from: i64, until: i64) -> Selector {
    Selector {
        service: "bench".into(),
        from_ms: from,
        until_ms: until,
        kinds: None,
        matchers: vec![],
    }
}

fn main() {
    // `cargo bench` passes --bench; any other argument is a filter we ignore.
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let stacks = stacks(&mut rng);
    let series = series();

    // --- ingest: store.append (WAL write + fsync + buffer), one thread ---
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), opts()).unwrap();
    let batches: Vec<Batch> = (0..40)
        .map(|w| window_batch(T0 + w * WINDOW_MS, &stacks, &series, &mut rng, true))
        .collect();
    let rows: usize = batches.iter().map(|b| b.rows.len()).sum();
    let t = Instant::now();
    for b in batches {
        store.append(b).unwrap();
    }
    let el = t.elapsed();
    println!(
        "ingest store.append:        {:>10.0} rows/s  ({rows} rows in {} batches of {}, {:.2?}, fsync per batch)",
        rows as f64 / el.as_secs_f64(),
        40,
        SERIES * STACKS,
        el
    );

    // --- ingest pipeline: gzip pprof decode + batch building + append ---
    let mut pb = profiler_pprof::ProfileBuilder::new(&[("cpu", "nanoseconds")]);
    for s in &series {
        let pid = s["pid"].as_str();
        for f in &stacks {
            pb.add(f, &[10_000_000], &[("pid", pid)]);
        }
    }
    let gz = profiler_pprof::encode_gzip(&pb.build());
    let limits = Limits::default();
    let n = 20;
    let t = Instant::now();
    let mut ingested = 0;
    for w in 0..n {
        let p = profiler_pprof::decode_gzip(&gz, 256 << 20).unwrap();
        let target = Target {
            service: "bench2".into(),
            kind: "on-cpu".into(),
            ts_ms: T0 + w * WINDOW_MS,
            labels: Labels::new(),
        };
        let mut b = BatchBuilder::new(&limits, target).unwrap();
        ingest::pprof(&p, 0, &mut b).unwrap();
        let batch = b.finish();
        ingested += batch.rows.len();
        store.append(batch).unwrap();
    }
    let el = t.elapsed();
    println!(
        "ingest pprof end-to-end:    {:>10.0} rows/s  ({} KiB gzip pprof of {} samples per request, {:.2?})",
        ingested as f64 / el.as_secs_f64(),
        gz.len() / 1024,
        SERIES * STACKS,
        el
    );
    drop(store);

    // --- one hour of one service ---
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), opts()).unwrap();
    let windows = HOUR_MS / WINDOW_MS;
    let t = Instant::now();
    for w in 0..windows {
        // Dictionaries ride along on the first window only, like a warm agent.
        store
            .append(window_batch(
                T0 + w * WINDOW_MS,
                &stacks,
                &series,
                &mut rng,
                w == 0,
            ))
            .unwrap();
    }
    let load = t.elapsed();
    let total_rows = windows as usize * SERIES * STACKS;
    let t = Instant::now();
    store.flush().unwrap();
    let flush = t.elapsed();
    let seg_bytes: u64 = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "load 1 h:                   {total_rows} rows appended in {load:.2?} ({:.0} rows/s), flushed to {} Parquet segments in {flush:.2?}",
        total_rows as f64 / load.as_secs_f64(),
        store.segment_count()
    );
    println!(
        "on disk:                    {:.3} bytes/row in segments ({} bytes), {:.3} bytes/row incl. catalog + WAL",
        seg_bytes as f64 / total_rows as f64,
        seg_bytes,
        store.disk_bytes() as f64 / total_rows as f64
    );

    let whole = sel(T0, T0 + HOUR_MS);
    let (d, json) = time(7, || {
        let agg = store.aggregate(&whole, GroupBy::Stack).unwrap();
        let tree = Tree::build(&store, &[&agg], false);
        serde_json::to_string(&tree.to_json(2048, 0.0, false)).unwrap()
    });
    println!(
        "flame graph, 1 h:           {d:>10.2?}  (goal < 150 ms; {} KiB JSON)",
        json.len() / 1024
    );

    let (d, _) = time(7, || store.aggregate(&whole, GroupBy::Stack).unwrap());
    println!("  of which scan+aggregate:  {d:>10.2?}");

    let first = sel(T0, T0 + HOUR_MS / 2);
    let second = sel(T0 + HOUR_MS / 2, T0 + HOUR_MS);
    let (d, _) = time(7, || {
        let (a, b): (Aggregate, Aggregate) = std::thread::scope(|s| {
            let h = s.spawn(|| store.aggregate(&first, GroupBy::Stack).unwrap());
            (
                store.aggregate(&second, GroupBy::Stack).unwrap(),
                h.join().unwrap(),
            )
        });
        let mut tree = Tree::build(&store, &[&a, &b], false);
        tree.normalize_base();
        serde_json::to_string(&tree.to_json(2048, 0.0, true)).unwrap()
    });
    println!("diff of two half-hours:     {d:>10.2?}  (goal < 250 ms)");

    let (d, top) = time(7, || {
        let agg = store.aggregate(&whole, GroupBy::Stack).unwrap();
        query::top(&store, &agg, false, 50)
    });
    println!(
        "top functions by self:      {d:>10.2?}  (goal < 150 ms; #1 {})",
        top[0].name
    );

    let mut filtered = whole.clone();
    filtered.matchers = vec![Matcher::Eq("host".into(), "host-3".into())];
    let (d, _) = time(5, || store.aggregate(&filtered, GroupBy::Stack).unwrap());
    println!("flame graph scan, host=h:   {d:>10.2?}  (label filter: reads the series column)");

    let partial = sel(T0 + 5 * 60_000, T0 + 25 * 60_000);
    let (d, _) = time(5, || store.aggregate(&partial, GroupBy::Stack).unwrap());
    println!("flame graph scan, 20 min:   {d:>10.2?}  (partial segments: reads the ts column)");

    let (d, tl) = time(5, || {
        let agg = store
            .aggregate(&whole, GroupBy::Time { step_ms: 60_000 })
            .unwrap();
        query::timeline(&agg, whole.from_ms, whole.until_ms, 60_000)
    });
    println!(
        "timeline, 1 h @ 1 min:      {d:>10.2?}  ({} points)",
        tl.series["on-cpu"].len()
    );

    // The same flame graph through HTTP (JSON encoding, compression off).
    drop(store);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = profiler_server::config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    let srv = rt.block_on(profiler_server::start(cfg)).unwrap();
    let url = format!(
        "http://{}/api/v1/flamegraph?service=bench&from={T0}&until={}",
        srv.addr,
        T0 + HOUR_MS
    );
    let c = reqwest::blocking::Client::new();
    let (d, body) = time(7, || c.get(&url).send().unwrap().bytes().unwrap());
    println!(
        "flame graph via HTTP, 1 h:  {d:>10.2?}  ({} KiB)",
        body.len() / 1024
    );
    rt.block_on(srv.shutdown()).unwrap();
}
