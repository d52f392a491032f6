//! `cargo bench -p profiler-server --bench server`: ingest throughput of the
//! embedded store and query latency on one hour of one service
//! (100 series x 250 stacks every 10 s, about 9M rows), plus bytes per row, and the
//! request table with 100k request ids in an hour (`BENCH_ONLY=requests` for it alone).
//!
//! `BENCH_CLICKHOUSE=1 cargo bench -p profiler-server --bench server` also
//! loads the same hour into ClickHouse (chdb behind tests/chdb_bridge, needs
//! python3 with chdb) and prints both backends side by side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use profiler_server::config::Limits;
use profiler_server::ingest::{self, BatchBuilder, Target};
use profiler_server::query::{self, Names, Tree};
use profiler_server::store::{
    series_id, stack_id, Aggregate, Batch, ClickHouseOptions, ClickHouseStore, EmbeddedStore,
    Frames, GroupBy, Labels, Matcher, Row, Selector, Store, StoreOptions,
};

#[path = "../tests/chdb_bridge/mod.rs"]
mod chdb_bridge;
mod common;

use common::Rng;

const SERIES: usize = 100;
const STACKS: usize = 250;
const WINDOW_MS: i64 = 10_000;
const HOUR_MS: i64 = 3_600_000;
const T0: i64 = 1_700_000_000_000;


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
            f.into_iter().map(Arc::from).collect()
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
        id: None,
        maybe_stored_since_ms: None,
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

/// An hour of 9M rows is loaded before the first flush, past the buffer
/// limit that makes a live server refuse ingest.
fn opts() -> StoreOptions {
    StoreOptions {
        max_buffered_rows: usize::MAX,
        max_wal_bytes: u64::MAX,
        ..StoreOptions::default()
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
        cancel: Default::default(),
    }
}

/// Query latencies (medians) on one hour of the bench service.
struct Figures {
    flame: Duration,
    flame_json_bytes: usize,
    scan: Duration,
    diff: Duration,
    top: Duration,
    top_name: String,
    filtered: Duration,
    partial: Duration,
    timeline: Duration,
    timeline_points: usize,
}

fn measure(store: &dyn Store) -> Figures {
    let names = &Names::default();
    let whole = sel(T0, T0 + HOUR_MS);
    let (flame, json) = time(7, || {
        let agg = store.aggregate(&whole, GroupBy::Stack).unwrap();
        let tree = Tree::build(names, store, &[&agg], false).unwrap();
        serde_json::to_string(&tree.to_json(2048, 0.0, false)).unwrap()
    });
    let (scan, _) = time(7, || store.aggregate(&whole, GroupBy::Stack).unwrap());
    let first = sel(T0, T0 + HOUR_MS / 2);
    let second = sel(T0 + HOUR_MS / 2, T0 + HOUR_MS);
    let (diff, _) = time(7, || {
        let (a, b): (Aggregate, Aggregate) = std::thread::scope(|s| {
            let h = s.spawn(|| store.aggregate(&first, GroupBy::Stack).unwrap());
            (
                store.aggregate(&second, GroupBy::Stack).unwrap(),
                h.join().unwrap(),
            )
        });
        let mut tree = Tree::build(names, store, &[&a, &b], false).unwrap();
        tree.normalize_base();
        serde_json::to_string(&tree.to_json(2048, 0.0, true)).unwrap()
    });
    let (top, top_fns) = time(7, || {
        let agg = store.aggregate(&whole, GroupBy::Stack).unwrap();
        query::top(names, store, &agg, false, 50).unwrap()
    });
    let mut filtered_sel = whole.clone();
    filtered_sel.matchers = vec![Matcher::Eq("host".into(), "host-3".into())];
    let (filtered, _) = time(5, || {
        store.aggregate(&filtered_sel, GroupBy::Stack).unwrap()
    });
    let partial_sel = sel(T0 + 5 * 60_000, T0 + 25 * 60_000);
    let (partial, _) = time(5, || store.aggregate(&partial_sel, GroupBy::Stack).unwrap());
    let (timeline, tl) = time(5, || {
        let agg = store
            .aggregate(&whole, GroupBy::Time { step_ms: 60_000 })
            .unwrap();
        query::timeline(&agg, whole.from_ms, whole.until_ms, 60_000)
    });
    Figures {
        flame,
        flame_json_bytes: json.len(),
        scan,
        diff,
        top,
        top_name: top_fns[0].name.clone(),
        filtered,
        partial,
        timeline,
        timeline_points: tl.series["on-cpu"].len(),
    }
}

fn main() {
    // `BENCH_ONLY=requests`: the request table's figures alone.
    if std::env::var("BENCH_ONLY").as_deref() == Ok("requests") {
        request_table();
        return;
    }
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

    let f = measure(&store);
    println!(
        "flame graph, 1 h:           {:>10.2?}  (goal < 150 ms; {} KiB JSON)",
        f.flame,
        f.flame_json_bytes / 1024
    );
    println!("  of which scan+aggregate:  {:>10.2?}", f.scan);
    println!(
        "diff of two half-hours:     {:>10.2?}  (goal < 250 ms)",
        f.diff
    );
    println!(
        "top functions by self:      {:>10.2?}  (goal < 150 ms; #1 {})",
        f.top, f.top_name
    );
    println!(
        "flame graph scan, host=h:   {:>10.2?}  (label filter: reads the series column)",
        f.filtered
    );
    println!(
        "flame graph scan, 20 min:   {:>10.2?}  (partial segments: reads the ts column)",
        f.partial
    );
    println!(
        "timeline, 1 h @ 1 min:      {:>10.2?}  ({} points)",
        f.timeline, f.timeline_points
    );

    // The same flame graph through HTTP (JSON encoding, compression off).
    drop(store);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let srv = rt.block_on(profiler_server::start(common::server_config(dir.path()))).unwrap();
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

    request_table();

    if std::env::var_os("BENCH_CLICKHOUSE").is_some_and(|v| v != "0") {
        clickhouse(&stacks, &series, total_rows, &f);
    } else {
        println!("(ClickHouse figures: BENCH_CLICKHOUSE=1, needs python3 with chdb)");
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.parse::<u64>().ok()).unwrap_or(0) * 1024
}

/// The request table over an hour: 100,080 distinct request ids of one series (278
/// per 10 s window, an on-CPU and two off-CPU stacks each), as the agent's windows
/// write them. The series count does not move; the table's disk, the memory a
/// query over the hour holds, and the query times are printed.
fn request_table() {
    use profiler_server::query::requests::{Pick, Requests};
    use profiler_server::store::{RequestRow, RequestTable};
    const WINDOWS: i64 = 360;
    const PER_WINDOW: u64 = 278;
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), opts()).unwrap();
    let labels = Labels::from([("service".to_string(), "shop".to_string()), ("endpoint".to_string(), "checkout".to_string())]);
    let series = series_id(&labels);
    let frames: Vec<Frames> = ["work", "base_wait", "slow_dependency"].iter().map(|f| Arc::from([Arc::from("main"), Arc::from(*f)])).collect();
    let ids: Vec<u64> = frames.iter().map(|f| stack_id(f)).collect();
    for w in 0..WINDOWS {
        store
            .append(Batch {
                service: "shop".into(),
                kind: "off-cpu:sleep".into(),
                stacks: ids.iter().copied().zip(frames.iter().cloned()).collect(),
                series: vec![(series, labels.clone())],
                rows: ids.iter().map(|&stack_id| Row { ts_ms: T0 + w * WINDOW_MS, series_id: series, stack_id, value: 1 }).collect(),
                ..Batch::default()
            })
            .unwrap();
    }
    let series_before = store.series("shop").unwrap().len();
    let table = RequestTable::open(dir.path(), None).unwrap();
    let ms = 1_000_000i64;
    let t = Instant::now();
    for w in 0..WINDOWS {
        let mut rows = Vec::new();
        for j in w as u64 * PER_WINDOW..(w as u64 + 1) * PER_WINDOW {
            let row = |kind: &str, stacks: Vec<(u64, i64)>| RequestRow {
                service: "shop".into(),
                ts_ms: T0 + w * WINDOW_MS,
                key: "request_id".into(),
                value: format!("{j:016x}"),
                part: format!("run-{w}/0"),
                series_id: series,
                kind: kind.into(),
                stacks,
            };
            rows.push(row("on-cpu", vec![(ids[0], ms)]));
            let extra = if j % 100 == 99 { vec![(ids[2], 40 * ms)] } else { vec![] };
            rows.push(row("off-cpu:sleep", [vec![(ids[1], (20 + (j % 20) as i64) * ms)], extra].concat()));
        }
        table.append(&rows).unwrap();
    }
    let append = t.elapsed();
    let n = WINDOWS as u64 * PER_WINDOW;
    let sel = Selector { service: "shop".into(), ..sel(T0, T0 + HOUR_MS) };
    let order = ["request_id".to_string()];
    // Resident memory grown by one read, its answer alive: an upper bound of what it
    // holds (the allocator keeps what the scan freed).
    let rss = rss_bytes();
    let requests = Requests::read(&table, &store, &sel, None, &order, usize::MAX).unwrap();
    let held = rss_bytes().saturating_sub(rss);
    let (read, _) = time(3, || Requests::read(&table, &store, &sel, None, &order, usize::MAX).unwrap().requests.len());
    let (slowest, agg) = time(3, || requests.aggregate(Pick::Slowest(1.0)));
    assert_eq!(requests.requests.len() as u64, n);
    assert_eq!(store.series("shop").unwrap().len(), series_before, "request ids made series");
    assert!(agg["off-cpu:sleep"].contains_key(&ids[2]));
    let disk = table.stats().disk_bytes;
    println!("\nrequest table, {n} request ids in an hour (2 rows each), series before/after: {series_before}/{}", store.series("shop").unwrap().len());
    println!("  append, 360 windows:       {append:>10.2?}  ({:.1} µs a request)", append.as_secs_f64() * 1e6 / n as f64);
    println!("  on disk:                   {:>10.1} MB  ({:.0} B a request)", disk as f64 / 1e6, disk as f64 / n as f64);
    println!("  /requests over the hour:   {read:>10.2?}  (resident memory grew {:.1} MB: {:.0} B a request)", held as f64 / 1e6, held as f64 / n as f64);
    println!("  slowest 1% aggregate:      {slowest:>10.2?}  p99 {:.1} ms", requests.percentiles().p99 as f64 / 1e6);
}

/// The same hour in ClickHouse (real engine: chdb behind the test bridge,
/// one process on this machine), printed next to the embedded store.
fn clickhouse(stacks: &[Frames], series: &[Labels], total_rows: usize, emb: &Figures) {
    let bridge = chdb_bridge::start();
    let store = ClickHouseStore::open(ClickHouseOptions {
        url: bridge.url.clone(),
        database: "bench".into(),
        user: None,
        password: None,
        retention_ms: None,
        rollup_retention_ms: None,
        async_insert: false,
    })
    .unwrap();
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let windows = HOUR_MS / WINDOW_MS;
    let t = Instant::now();
    for w in 0..windows {
        store
            .append(window_batch(
                T0 + w * WINDOW_MS,
                stacks,
                series,
                &mut rng,
                w == 0,
            ))
            .unwrap();
    }
    let load = t.elapsed();
    println!(
        "ClickHouse load 1 h:        {total_rows} rows in {load:.2?} ({:.0} rows/s, one INSERT per 10 s window, via the chdb bridge)",
        total_rows as f64 / load.as_secs_f64()
    );
    let bytes = store.disk_bytes();
    println!(
        "ClickHouse on disk:         {:.3} bytes/row (all tables incl. the 1-minute rollup, {} bytes)",
        bytes as f64 / total_rows as f64,
        bytes
    );
    let ch = measure(&store);
    println!();
    println!("1 h, {total_rows} rows         embedded     ClickHouse (chdb bridge)");
    let rows: [(&str, Duration, Duration); 7] = [
        ("flame graph", emb.flame, ch.flame),
        ("  scan+aggregate", emb.scan, ch.scan),
        ("diff of half-hours", emb.diff, ch.diff),
        ("top by self", emb.top, ch.top),
        ("scan, host=h", emb.filtered, ch.filtered),
        ("scan, 20 min", emb.partial, ch.partial),
        ("timeline @ 1 min", emb.timeline, ch.timeline),
    ];
    for (name, e, c) in rows {
        println!("{name:<26}{e:>10.2?}   {c:>10.2?}");
    }
    assert_eq!(
        emb.top_name, ch.top_name,
        "both backends agree on the top function"
    );
    drop(store);
}
