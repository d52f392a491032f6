//! `cargo bench -p profiler-server --bench real_profiles`: query and ingest
//! cost on real-shaped profiles.
//!
//! The stacks come from `data/cargo-build.folded.zst`: our agent recording
//! this workspace's release build (`profiler-agent record -F 999 --off-cpu
//! --duration 180s` while `cargo build --release -p profiler-agent` ran, on a
//! 2-CPU VM): 115k distinct stacks of rustc, cargo, cc and ld, 20 frames deep
//! at the median and up to 121, with Rust's long generic names.
//!
//! For 1k, 10k and 100k distinct stacks, one service gets 7 days of windows
//! shaped like the agent's output: about 2,000 samples per 10 s drawn from the
//! recording's own distribution, spread over a long-lived process and one
//! that changes every minute, stored at the resolutions the server's default
//! downsampling leaves (10 s for the last 6 h, 1 min up to 48 h, 10 min
//! beyond). The work of the flame graph, diff and top routes is then timed
//! over the last 1 h, 24 h and 7 d, first with no answers kept, then with the
//! answer kept. Last, one hour of ingest end to end, as gzip pprof, as our
//! agent's stacks windows one request each, and as it sends them: one bundle
//! per window, also through the real server's HTTP route. `BENCH_STACKS=30000` measures one pool size only,
//! `BENCH_STACKS=` none (ingest only). Wait histograms: the 7 days of 30,000
//! stacks loaded again with a histogram on every off-CPU row, what that adds to
//! the store's bytes, and `/api/v1/waits` over the last hour (`BENCH_WAITS=0`
//! skips it, `BENCH_WAITS=only` runs nothing else).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::Rng;
use profiler_server::config::Limits;
use profiler_server::ingest::{self, BatchBuilder, Target};
use profiler_server::query::{self, Names, Tree};
use profiler_server::store::{
    series_id, stack_id, Batch, EmbeddedStore, Frames, GroupBy, Labels, Row, Selector, Store,
    StoreOptions,
};

const SERVICE: &str = "build";
const SECOND: i64 = 1_000;
const HOUR: i64 = 3_600 * SECOND;
const DAY: i64 = 24 * HOUR;
const END: i64 = 1_700_000_000_000;
/// Samples per 10 s window: 99 Hz on two busy CPUs.
const DRAWS_PER_10S: usize = 2_000;
/// Draws per stored window at most; coarser windows weigh each draw more, so
/// loading 7 days stays quick and totals stay true.
const MAX_DRAWS: usize = 12_000;
/// One on-CPU sample at 99 Hz, in ns; off-CPU draws weigh the same so both
/// kinds keep the recording's proportions.
const SAMPLE_NS: i64 = 10_101_010;


struct Stack {
    kind: String,
    frames: Frames,
    id: u64,
    weight: i64,
}

fn recording() -> Vec<Stack> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/data/cargo-build.folded.zst");
    let file = std::fs::File::open(path).expect("bench data");
    let mut decoder = zstd::Decoder::new(file).unwrap();
    decoder.window_log_max(27).unwrap();
    let mut text = String::new();
    decoder.read_to_string(&mut text).unwrap();
    text.lines()
        .map(|line| {
            let (mut frames, value) = profiler_pprof::folded::parse_line(line).unwrap();
            let root = frames.next().unwrap();
            let kind = root.trim_start_matches('[').trim_end_matches(']').to_owned();
            let frames: Vec<String> = frames.map(str::to_owned).collect();
            Stack {
                kind,
                id: stack_id(&frames),
                frames: frames.iter().map(|f| Arc::from(f.as_str())).collect(),
                weight: value,
            }
        })
        .collect()
}

/// `n` stacks of the recording, picked at random, and their cumulative
/// weights for drawing samples.
struct Pool<'a> {
    stacks: Vec<&'a Stack>,
    cumulative: Vec<i64>,
}

impl<'a> Pool<'a> {
    fn new(all: &'a [Stack], n: usize, rng: &mut Rng) -> Pool<'a> {
        let mut picked: Vec<&Stack> = all.iter().collect();
        for i in (1..picked.len()).rev() {
            picked.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        picked.truncate(n);
        let mut sum = 0;
        let cumulative = picked
            .iter()
            .map(|s| {
                sum += s.weight.max(1);
                sum
            })
            .collect();
        Pool {
            stacks: picked,
            cumulative,
        }
    }

    fn draw(&self, rng: &mut Rng) -> usize {
        let total = *self.cumulative.last().unwrap();
        let x = (rng.next() % total as u64) as i64;
        self.cumulative.partition_point(|&c| c <= x)
    }
}

fn labels(pid: i64) -> Labels {
    Labels::from([
        ("service".to_string(), SERVICE.to_string()),
        ("host".to_string(), "builder-1".to_string()),
        ("pid".to_string(), pid.to_string()),
    ])
}

/// kind -> (stack index in the pool, pid) -> value: the rows of one window.
type Window = HashMap<String, HashMap<(usize, i64), i64>>;

/// One window of `res_ms` at `ts`: the samples of `res_ms / 10 s` agent
/// windows, plus a slice of the pool in turn so that every stack of the
/// pool shows up within an hour, the way rare stacks do.
fn window(pool: &Pool, ts: i64, res_ms: i64, rng: &mut Rng) -> Window {
    let windows_of_10s = (res_ms / (10 * SECOND)) as usize;
    let samples = DRAWS_PER_10S * windows_of_10s;
    let draws = samples.min(MAX_DRAWS);
    let weight = SAMPLE_NS * (samples / draws) as i64;
    let mut out = Window::new();
    let mut add = |i: usize, pid: i64| {
        let s = pool.stacks[i];
        *out.entry(s.kind.clone())
            .or_default()
            .entry((i, pid))
            .or_insert(0) += weight;
    };
    for d in 0..draws {
        // A quarter of the time in the long-lived process (cargo), the rest
        // in processes that last a minute (rustc).
        let at = ts + res_ms * d as i64 / draws as i64;
        let pid = if d % 4 == 0 { 1 } else { 2 + at / 60_000 % 10_000 };
        add(pool.draw(rng), pid);
    }
    let per_hour = pool.stacks.len().div_ceil(360);
    let turn = (ts / (10 * SECOND)) as usize * per_hour;
    for k in 0..(per_hour * windows_of_10s).min(pool.stacks.len()) {
        add((turn + k) % pool.stacks.len(), 2 + ts / 60_000 % 10_000);
    }
    out
}

/// Start and resolution of every window of the 7 days before `END`.
fn windows() -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let levels = [(7 * DAY, 2 * DAY, 600 * SECOND), (2 * DAY, 6 * HOUR, 60 * SECOND), (6 * HOUR, 0, 10 * SECOND)];
    for (from_age, to_age, res) in levels {
        let mut ts = END - from_age;
        while ts < END - to_age {
            out.push((ts, res));
            ts += res;
        }
    }
    out
}

/// The store of the bench. Its ranges lie in the past, so answers would be
/// kept: `cache_answers` false measures what a first query costs.
fn open(dir: &std::path::Path, cache_answers: bool) -> EmbeddedStore {
    let defaults = StoreOptions::default();
    let opts = StoreOptions {
        max_buffered_rows: usize::MAX,
        max_wal_bytes: u64::MAX,
        downsample: vec![(6 * HOUR, 60 * SECOND), (2 * DAY, 600 * SECOND)],
        result_cache_bytes: if cache_answers { defaults.result_cache_bytes } else { 0 },
        ..defaults
    };
    EmbeddedStore::open(dir, opts).unwrap()
}

/// The wait histogram our agent would send with an off-CPU row: one wait per
/// sample's worth of time (at most 64), each about the stack's own typical wait
/// (1 to 100 ms, fixed per stack) times a log-normal factor (σ ≈ 0.35), drawn from
/// a hash of (stack, window) so that loading them leaves the rows' draws alone.
fn histogram(stack: u64, ts: i64, value: i64) -> profiler_pprof::waits::Histogram {
    let mut h = profiler_pprof::waits::Histogram::default();
    let mut rng = Rng(stack ^ (ts as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut next = || (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
    let typical = 1e6 * 100f64.powf((stack >> 11) as f64 / (1u64 << 53) as f64);
    for _ in 0..(value / SAMPLE_NS).clamp(1, 64) {
        // Sum of four uniforms: about normal, σ ≈ 0.58 before scaling.
        let normal = (next() + next() + next() + next() - 2.0) / 0.577;
        h.record((typical * (0.35 * normal).exp()) as u64, profiler_pprof::waits::ONE);
    }
    h
}

/// Loads 7 days of the pool into a fresh store: one batch per kind and hour,
/// dictionaries sent with the first batch that uses them. With `waits`, every
/// off-CPU row also gets its wait histogram, stored as our server stores them.
/// Returns the store, its rows and its histogram rows.
fn load(pool: &Pool, dir: &std::path::Path, rng: &mut Rng, waits: bool) -> (EmbeddedStore, usize, usize) {
    let store = open(dir, false);
    let mut sent_stacks = HashSet::new();
    let mut sent_series = HashSet::new();
    let (mut rows_total, mut waits_total, mut off_cpu_rows) = (0, 0, 0);
    let mut pending: HashMap<String, Batch> = HashMap::new();
    let all = windows();
    for (i, &(ts, res)) in all.iter().enumerate() {
        for (kind, rows) in window(pool, ts, res, rng) {
            let waits_kind = (waits && kind.starts_with("off-cpu")).then(|| profiler_pprof::waits::waits_kind(&kind));
            if let Some(waits_kind) = &waits_kind {
                let w = pending.entry(waits_kind.clone()).or_insert_with(|| Batch {
                    service: SERVICE.into(),
                    kind: waits_kind.clone(),
                    ..Batch::default()
                });
                for (&(i, pid), &value) in &rows {
                    let id = pool.stacks[i].id;
                    for (bucket, count) in histogram(id, ts, value).buckets() {
                        let stack_id = profiler_pprof::waits::row_id(id, bucket);
                        w.rows.push(Row { ts_ms: ts, series_id: series_id(&labels(pid)), stack_id, value: count as i64 });
                    }
                }
            }
            let b = pending.entry(kind.clone()).or_insert_with(|| Batch {
                service: SERVICE.into(),
                kind,
                ..Batch::default()
            });
            for ((i, pid), value) in rows {
                let s = pool.stacks[i];
                if sent_stacks.insert(s.id) {
                    b.stacks.push((s.id, s.frames.clone()));
                }
                let l = labels(pid);
                let series = series_id(&l);
                if sent_series.insert(series) {
                    b.series.push((series, l));
                }
                b.rows.push(Row {
                    ts_ms: ts,
                    series_id: series,
                    stack_id: s.id,
                    value,
                });
            }
        }
        let hour_ends = all.get(i + 1).is_none_or(|&(next, _)| next / HOUR != ts / HOUR);
        if hour_ends {
            // Profile rows first: a histogram's series come with them.
            let mut batches: Vec<Batch> = pending.drain().map(|(_, b)| b).collect();
            batches.sort_by_key(|b| profiler_pprof::waits::is_waits_kind(&b.kind));
            for b in batches {
                match profiler_pprof::waits::is_waits_kind(&b.kind) {
                    true => waits_total += b.rows.len(),
                    false => rows_total += b.rows.len(),
                }
                if b.kind.starts_with("off-cpu") {
                    off_cpu_rows += b.rows.len();
                }
                store.append(b).unwrap();
            }
            if store.buffered_rows() > 4_000_000 {
                store.flush().unwrap();
            }
        }
    }
    store.flush().unwrap();
    // Compacts the older windows into the files a server's maintenance
    // leaves (hourly at 1 min, 10-hourly at 10 min).
    store.maintain(END).unwrap();
    if waits {
        println!("  (as loaded: {off_cpu_rows} of the {rows_total} profile rows off-CPU, {waits_total} histogram rows)");
    }
    (store, rows_total, waits_total)
}

/// What wait histograms cost: the same 7 days loaded without and with them (disk
/// bytes per profile row), and `/api/v1/waits`' work over the last hour.
fn waits_cost(all: &[Stack], n: usize) {
    let mut bytes = [0u64; 2];
    for (with, slot) in [false, true].into_iter().zip(&mut bytes) {
        let pool = Pool::new(all, n, &mut Rng(0x5eed));
        let dir = tempfile::tempdir().unwrap();
        let (store, rows, waits_rows) = load(&pool, dir.path(), &mut Rng(0x5eed), with);
        *slot = store.disk_bytes();
        let catalog = std::fs::metadata(dir.path().join("catalog.redb")).map_or(0, |m| m.len());
        let wal = store.stats().wal_bytes;
        println!(
            "{n:>7}    wait histograms {}: {rows} profile rows{}, {} MiB on disk (catalog {} MiB, WAL {} MiB), {:.1} bytes per profile row",
            if with { "on " } else { "off" },
            if with { format!(" and {waits_rows} histogram rows") } else { String::new() },
            *slot >> 20,
            catalog >> 20,
            wal >> 20,
            *slot as f64 / rows as f64
        );
        if !with {
            continue;
        }
        let names = Names::default();
        let hour = sel(END - HOUR, END);
        let frame = regex::Regex::new("futex|poll").unwrap();
        let mut found = 0;
        let framed = median(5, || {
            let w = query::waits::stack_waits(&names, &store, &hour, Some(&frame), false).unwrap();
            found = w.by_stack.len();
            serde_json::to_string(&query::waits::summary(&query::waits::merged(&w))).unwrap();
        });
        let all_waits = median(5, || {
            let w = query::waits::stack_waits(&names, &store, &hour, None, false).unwrap();
            serde_json::to_string(&query::waits::summary(&query::waits::merged(&w))).unwrap();
        });
        let by_function = median(5, || {
            let w = query::waits::stack_waits(&names, &store, &hour, None, true).unwrap();
            serde_json::to_string(&query::waits::by_function(&w, 50)).unwrap();
        });
        println!(
            "{n:>7}    /api/v1/waits over 1 h: frame=futex|poll ({found} stacks) {framed:.2?}, every off-CPU wait {all_waits:.2?}, by=function {by_function:.2?} (medians of 5)"
        );
    }
    println!("{n:>7}    wait histograms add {:+.1}% to the store's bytes", 100.0 * (bytes[1] as f64 / bytes[0] as f64 - 1.0));
}

fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn sel(from: i64, until: i64) -> Selector {
    Selector {
        service: SERVICE.into(),
        from_ms: from,
        until_ms: until,
        kinds: None,
        matchers: vec![],
        cancel: Default::default(),
    }
}

/// The work of `/api/v1/flamegraph`, `/diff` and `/top` over the range
/// ending at `END`, minus HTTP: the flame graph once with no frame names
/// interned yet (the first query after a start), then medians.
fn measure(store: &dyn Store, range: i64) -> [Duration; 5] {
    let whole = sel(END - range, END);
    let (first, second) = (sel(END - range, END - range / 2), sel(END - range / 2, END));
    let runs = if range > DAY { 3 } else { 5 };
    let names = Names::default();
    let scan = median(runs, || {
        store.aggregate(&whole, GroupBy::Stack).unwrap();
    });
    let flame_graph = || {
        let agg = store.aggregate(&whole, GroupBy::Stack).unwrap();
        let tree = Tree::build(&names, store, &[&agg], agg.len() > 1).unwrap();
        serde_json::to_string(&tree.to_json(2048, 0.0, false)).unwrap();
    };
    let cold = median(1, flame_graph);
    let flame = median(runs, flame_graph);
    let diff = median(runs, || {
        let (a, b) = std::thread::scope(|s| {
            let h = s.spawn(|| store.aggregate(&first, GroupBy::Stack).unwrap());
            (store.aggregate(&second, GroupBy::Stack).unwrap(), h.join().unwrap())
        });
        let mut tree = Tree::build(&names, store, &[&a, &b], true).unwrap();
        tree.normalize_base();
        serde_json::to_string(&tree.to_json(2048, 0.0, true)).unwrap();
    });
    let top = median(runs, || {
        let agg = store.aggregate(&whole, GroupBy::Stack).unwrap();
        query::top(&names, store, &agg, false, 50).unwrap();
    });
    [scan, cold, flame, diff, top]
}

/// CPU time this process has used (user + system), from /proc.
fn cpu_time() -> Duration {
    let (_, cpu) = stat_cpu(&std::fs::read_to_string("/proc/self/stat").unwrap());
    cpu
}

/// The command name and the user plus system time of a `/proc/.../stat`.
fn stat_cpu(stat: &str) -> (&str, Duration) {
    // Fields after the command name, which ends with the last ')'.
    let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    (&stat[open + 1..close], Duration::from_millis(ticks * 10))
}

/// What one hour of ingest cost, and what its requests carried.
struct Ingested {
    rows: usize,
    /// Wall, CPU, gunzip and decode, validation and batch, WAL and apply.
    times: [Duration; 5],
    requests: usize,
    gzip_bytes: usize,
    raw_bytes: usize,
    /// Gunzipping every request and nothing else: the floor of this ingest's cost.
    gunzip_alone: Duration,
}

/// How requests carry their windows.
#[derive(Clone, Copy, PartialEq)]
enum Wire {
    /// One gzip pprof per 10 s window and kind, process ids as sample labels.
    Pprof,
    /// Our agent's stacks windows, one per process, kind and 10 s: a stack
    /// with its frames the first time, by id afterwards.
    Stacks,
    /// The same stacks windows, all of a 10 s window in one bundle, as our
    /// agent sends them.
    Bundle,
}

/// One request: window start, kind, labels and the gzip body.
type Request = (i64, String, Labels, Vec<u8>);

/// The requests of the two hours before `END`, windows in order.
fn requests(pool: &Pool, rng: &mut Rng, wire: Wire) -> Vec<Request> {
    let mut out = Vec::new();
    let mut acknowledged = HashSet::new();
    for w in 0..720 {
        let ts = END - 2 * HOUR + w * 10 * SECOND;
        for (kind, rows) in window(pool, ts, 10 * SECOND, rng) {
            let host = ("host".to_string(), "builder-1".to_string());
            if wire == Wire::Pprof {
                let mut pb = profiler_pprof::ProfileBuilder::new(&[("cpu", "nanoseconds")]);
                for ((i, pid), value) in rows {
                    pb.add(&pool.stacks[i].frames, &[value], &[("pid", &pid.to_string())]);
                }
                out.push((ts, kind, Labels::from([host]), profiler_pprof::encode_gzip(&pb.build())));
                continue;
            }
            // A stack goes by id once a window before this one was acknowledged.
            let mut by_pid: HashMap<i64, profiler_pprof::stacks::Writer> = HashMap::new();
            let mut sent = Vec::new();
            for ((i, pid), value) in rows {
                let s = pool.stacks[i];
                let w = by_pid.entry(pid).or_default();
                if acknowledged.contains(&s.id) {
                    w.known(s.id, value);
                } else {
                    w.framed(&s.frames, value);
                    sent.push(s.id);
                }
            }
            acknowledged.extend(sent);
            for (pid, w) in by_pid {
                let labels = Labels::from([host.clone(), ("pid".to_string(), pid.to_string())]);
                out.push((ts, kind.clone(), labels, profiler_pprof::gzip(&w.finish())));
            }
        }
    }
    if wire == Wire::Bundle {
        return out.chunk_by(|a, b| a.0 == b.0).map(bundle).collect();
    }
    out
}

/// The stacks windows of one 10 s window as one bundle; the host label is
/// common to its parts.
fn bundle(parts: &[Request]) -> Request {
    let mut b = profiler_pprof::stacks::BundleWriter::default();
    for (_, kind, labels, gz) in parts {
        let own: Vec<(&String, &String)> = labels.iter().filter(|(k, _)| *k != "host").collect();
        b.part(SERVICE, kind, &own, &profiler_pprof::gunzip(gz, 256 << 20).unwrap());
    }
    let host = Labels::from([("host".to_string(), "builder-1".to_string())]);
    (parts[0].0, String::new(), host, profiler_pprof::gzip(&b.finish()))
}

/// Ingests one request as the route does, minus HTTP: its rows, and the
/// time spent in gunzip and decoding, and in validation and batch building.
fn ingest_one(store: &EmbeddedStore, limits: &Limits, wire: Wire, request: &Request) -> (usize, Duration, Duration) {
    let (ts, kind, labels, gz) = request;
    let target = Target {
        service: SERVICE.into(),
        kind: kind.clone(),
        ts_ms: *ts,
        labels: labels.clone(),
    };
    let phase = Instant::now();
    let (decode, build, batch) = match wire {
        Wire::Pprof => {
            let p = profiler_pprof::decode_gzip(gz, 256 << 20).unwrap();
            let decode = phase.elapsed();
            let phase = Instant::now();
            let mut b = BatchBuilder::new(limits, target).unwrap();
            ingest::pprof(&p, 0, &mut b).unwrap();
            (decode, phase.elapsed(), b.finish())
        }
        Wire::Bundle => {
            let raw = profiler_pprof::gunzip(gz, 256 << 20).unwrap();
            let decode = phase.elapsed();
            let phase = Instant::now();
            let batches: Vec<Batch> = ingest::bundle(&raw, limits, *ts, labels, store).unwrap().batches.into_iter().map(|(_, b)| b).collect();
            let build = phase.elapsed();
            let rows = batches.iter().map(|b| b.rows.len()).sum();
            store.append_all(batches).unwrap();
            return (rows, decode, build);
        }
        Wire::Stacks => {
            let raw = profiler_pprof::gunzip(gz, 256 << 20).unwrap();
            let decode = phase.elapsed();
            let phase = Instant::now();
            let mut b = BatchBuilder::new(limits, target).unwrap();
            ingest::stacks(&raw, store, &mut b).unwrap();
            (decode, phase.elapsed(), b.finish())
        }
    };
    let rows = batch.rows.len();
    store.append(batch).unwrap();
    (rows, decode, build)
}

/// End-to-end ingest of the second of two hours of agent windows (the first
/// only fills the store's dictionary, as a running server's is, and the
/// agent's knowledge of it): gunzip, decoding, validation, batch building
/// and the WAL append with its fsync. `clients` send each window's requests
/// at once, as a fleet's agents do; the store then shares fsyncs among them.
fn ingest_hour(pool: &Pool, rng: &mut Rng, wire: Wire, clients: usize) -> Ingested {
    let mut requests = requests(pool, rng, wire);
    let second_hour = requests.iter().position(|r| r.0 >= END - HOUR).unwrap();
    let first_hour: Vec<Request> = requests.drain(..second_hour).collect();
    let gzip_bytes = requests.iter().map(|r| r.3.len()).sum();
    let t = Instant::now();
    let raw_bytes = requests.iter().map(|r| profiler_pprof::gunzip(&r.3, 256 << 20).unwrap().len()).sum();
    let gunzip_alone = t.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
    let limits = Limits::default();
    for r in &first_hour {
        ingest_one(&store, &limits, wire, r);
    }
    let windows: Vec<&[Request]> = requests.chunk_by(|a, b| a.0 == b.0).collect();
    let barrier = std::sync::Barrier::new(clients);
    let (t, cpu) = (Instant::now(), cpu_time());
    let parts: Vec<(usize, Duration, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (store, limits, windows, barrier) = (&store, &limits, &windows, &barrier);
                s.spawn(move || {
                    let mut sum = (0, Duration::ZERO, Duration::ZERO);
                    for window in windows {
                        for r in window.iter().skip(c).step_by(clients) {
                            let (rows, decode, build) = ingest_one(store, limits, wire, r);
                            sum = (sum.0 + rows, sum.1 + decode, sum.2 + build);
                        }
                        barrier.wait();
                    }
                    sum
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let total = t.elapsed();
    let rows = parts.iter().map(|p| p.0).sum();
    let decode = parts.iter().map(|p| p.1).sum();
    let build = parts.iter().map(|p| p.2).sum();
    Ingested {
        rows,
        times: [total, cpu_time() - cpu, decode, build, total.saturating_sub(decode + build)],
        requests: requests.len(),
        gzip_bytes,
        raw_bytes,
        gunzip_alone,
    }
}

/// CPU time of this process's threads whose name starts with `prefix`
/// (`tokio-`: the server's workers and blocking pool; not the clients).
fn cpu_time_of(prefix: &str) -> Duration {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        // A thread that ended since the listing has no stat left.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (name, cpu) = stat_cpu(&stat);
        if name.starts_with(prefix) {
            total += cpu;
        }
    }
    total
}

/// The second hour's bundles through the server's HTTP route, as agents
/// post them: a real server in this process, on loopback, and `clients`
/// hosts each posting its window's bundle at once. Rows, wall time and the
/// server threads' CPU time. Like the runs in process, it leaves out the
/// flush to segments.
fn ingest_hour_http(pool: &Pool, rng: &mut Rng, clients: usize) -> (usize, Duration, Duration) {
    let requests = requests(pool, rng, Wire::Bundle);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = common::server_config(dir.path());
    // Writing segments is maintenance: no flush lands in the measured hour.
    cfg.storage.flush_interval_secs = 3600;
    let srv = rt.block_on(profiler_server::start(cfg.clone())).unwrap();
    // Windows of the last two hours, so maintenance finds nothing to expire.
    let shift = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64)
        .div_euclid(10 * SECOND)
        * (10 * SECOND)
        - END;
    let post = |addr: std::net::SocketAddr, client: &reqwest::blocking::Client, host: usize, (i, (ts, _, _, body)): (usize, &Request)| -> usize {
        let url = format!(
            "http://{addr}/api/v1/ingest?format=bundle&from={}&label=host:builder-{host}&batch_id=h{host}-w{i}",
            ts + shift
        );
        let answer: serde_json::Value = client.post(url).body(body.clone()).send().unwrap().error_for_status().unwrap().json().unwrap();
        answer["rows"].as_u64().unwrap() as usize
    };
    let second_hour = requests.iter().position(|r| r.0 >= END - HOUR).unwrap();
    let warm = reqwest::blocking::Client::new();
    for r in requests[..second_hour].iter().enumerate() {
        post(srv.addr, &warm, 0, r);
    }
    // The first hour's new stacks are flushed at shutdown; the server then
    // starts with them in its dictionary, as a running server has them.
    rt.block_on(srv.shutdown()).unwrap();
    let srv = rt.block_on(profiler_server::start(cfg)).unwrap();
    let addr = srv.addr;
    // Until the first server's teardown (freeing its dictionary) is over.
    loop {
        let before = cpu_time_of("tokio-");
        std::thread::sleep(Duration::from_millis(300));
        if cpu_time_of("tokio-") - before <= Duration::from_millis(10) {
            break;
        }
    }
    let barrier = std::sync::Barrier::new(clients);
    let (t, cpu) = (Instant::now(), cpu_time_of("tokio-"));
    let rows = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|host| {
                let (requests, barrier, post) = (&requests, &barrier, &post);
                s.spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let mut rows = 0;
                    for r in requests.iter().enumerate().skip(second_hour) {
                        rows += post(addr, &client, host, r);
                        barrier.wait();
                    }
                    rows
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let took = (t.elapsed(), cpu_time_of("tokio-") - cpu);
    rt.block_on(srv.shutdown()).unwrap();
    (rows, took.0, took.1)
}

/// Posts `stacks` to the server at `addr` as folded text, 3,000 per request,
/// in a window 20 minutes ago; returns that window's start.
fn post_folded<'a>(addr: &str, service: &str, stacks: impl Iterator<Item = &'a Stack>) -> i64 {
    let from = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 - 20 * 60 * SECOND;
    let client = reqwest::blocking::Client::new();
    let mut by_kind: HashMap<&str, Vec<&Stack>> = HashMap::new();
    for s in stacks {
        by_kind.entry(&s.kind).or_default().push(s);
    }
    for (kind, of_kind) in &by_kind {
        for chunk in of_kind.chunks(3000) {
            let url = format!("http://{addr}/api/v1/ingest?format=folded&service={service}&kind={kind}&from={from}");
            let folded = profiler_pprof::folded::write(chunk.iter().map(|s| (kind, &s.frames, s.weight)), false);
            client.post(url).body(folded).send().unwrap().error_for_status().unwrap();
        }
    }
    from
}

/// The first `/api/v1/flamegraph` over stacks a real server just took in
/// (every fourth stack of the recording, as the UI test posts them), then
/// the median of five more: what the first look at new data costs.
fn first_flame_graph_http(all: &[Stack]) -> (usize, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let srv = rt.block_on(profiler_server::start(common::server_config(dir.path()))).unwrap();
    let from = post_folded(&srv.addr.to_string(), "first-look", all.iter().step_by(4));
    let stacks = all.iter().step_by(4).count();
    let url = format!("http://{}/api/v1/flamegraph?service=first-look&from={}&until={}&max_nodes=5000", srv.addr, from - 10 * 60 * SECOND, from + 20 * 60 * SECOND);
    let client = reqwest::blocking::Client::new();
    let flame_graph = || {
        let t = Instant::now();
        client.get(&url).send().unwrap().error_for_status().unwrap().bytes().unwrap();
        t.elapsed()
    };
    let first = flame_graph();
    let next = median(5, || {
        flame_graph();
    });
    rt.block_on(srv.shutdown()).unwrap();
    (stacks, first, next)
}

/// The server binary's resident memory once it holds every stack of the
/// recording (posted as folded text), and again after a restart that reads
/// them back from its catalog; and how long that start took.
fn server_memory(all: &[Stack]) -> (u64, u64, Duration) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let t = Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_profiler-server"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let addr = stdout
            .lines()
            .find_map(|l| l.unwrap().strip_prefix("listening on ").map(str::to_owned))
            .expect("the server prints `listening on`");
        (child, addr, t.elapsed())
    };
    let rss_mib = |child: &std::process::Child| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
        kib >> 10
    };
    let stop = |mut child: std::process::Child| {
        // SIGTERM: the server flushes its buffer into the catalog on the way out.
        std::process::Command::new("kill").arg(child.id().to_string()).status().unwrap();
        child.wait().unwrap();
    };
    let (child, addr, _) = start();
    post_folded(&addr, "memory", all.iter());
    let ingested = rss_mib(&child);
    stop(child);
    let (child, _, took) = start();
    let restarted = rss_mib(&child);
    stop(child);
    (ingested, restarted, took)
}

fn main() {
    let t = Instant::now();
    let all = recording();
    println!(
        "recording: {} distinct stacks, read in {:.2?}",
        all.len(),
        t.elapsed()
    );
    if std::env::var("BENCH_WAITS").is_ok_and(|v| v == "only") {
        return waits_cost(&all, 30_000);
    }
    let mut rng = Rng(0x9e3779b97f4a7c15);
    println!("distinct  range  stacks in range   scan  flame graph (cold)  flame graph   diff    top   flame graph (answer kept)");
    // BENCH_STACKS=10000,100000 picks the pool sizes; empty, ingest only.
    let sizes: Vec<usize> = std::env::var("BENCH_STACKS").map_or_else(
        |_| vec![1_000, 10_000, 30_000, 100_000],
        |v| v.split(',').filter(|n| !n.trim().is_empty()).map(|n| n.trim().parse().expect("BENCH_STACKS: numbers")).collect(),
    );
    for n in sizes {
        let pool = Pool::new(&all, n, &mut rng);
        let dir = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let (store, rows, _) = load(&pool, dir.path(), &mut rng, false);
        println!(
            "{n:>7}    (7 d: {rows} rows in {} segments, loaded in {:.1?})",
            store.segment_count(),
            t.elapsed()
        );
        let ranges = [("1 h", HOUR), ("24 h", DAY), ("7 d", 7 * DAY)];
        let mut lines = Vec::new();
        for (name, range) in ranges {
            let agg = store.aggregate(&sel(END - range, END), GroupBy::Stack).unwrap();
            let distinct: usize = agg.values().map(HashMap::len).sum();
            let [scan, cold, flame, diff, top] = measure(&store, range);
            lines.push(format!(
                "{n:>7}   {name:<5}  {distinct:>8}   {scan:>9.2?}   {cold:>9.2?}   {flame:>9.2?}   {diff:>9.2?}   {top:>9.2?}"
            ));
        }
        let totals_mib = store.stats().totals_cache_bytes >> 20;
        drop(store);
        let store = open(dir.path(), true);
        let names = Names::default();
        for (line, (_, range)) in lines.iter().zip(ranges) {
            let whole = sel(END - range, END);
            let kept = median(5, || {
                let agg = store.aggregate(&whole, GroupBy::Stack).unwrap();
                let tree = Tree::build(&names, &store, &[&agg], agg.len() > 1).unwrap();
                serde_json::to_string(&tree.to_json(2048, 0.0, false)).unwrap();
            });
            println!("{line}   {kept:>9.2?}");
        }
        println!(
            "{n:>7}    (segments' per-stack totals held in memory: {totals_mib} MiB; answers kept: {} MiB)",
            store.stats().result_cache_bytes >> 20
        );
    }
    // BENCH_WAITS=0 skips the two extra 7-day loads (BENCH_WAITS=only: nothing else).
    if std::env::var("BENCH_WAITS").map_or(true, |v| v != "0") {
        waits_cost(&all, 30_000);
    }
    let (ingested, restarted, start) = server_memory(&all);
    println!(
        "server RSS holding {} stacks: {ingested} MiB after their ingest; {restarted} MiB after a restart, which took {start:.0?} to listen",
        all.len()
    );
    let (stacks, first, next) = first_flame_graph_http(&all);
    println!("first flame graph through HTTP over {stacks} stacks just ingested: {first:.2?}; the next ones {next:.2?} (median of 5)");
    let pool = Pool::new(&all, 100_000, &mut rng);
    let runs = [
        (Wire::Pprof, "gzip pprof", 1),
        (Wire::Stacks, "stacks windows", 1),
        (Wire::Stacks, "stacks windows", 4),
        (Wire::Bundle, "bundles of stacks windows", 1),
    ];
    for (wire, name, clients) in runs {
        let Ingested { rows, times: [took, cpu, decode, build, append], requests, gzip_bytes, raw_bytes, gunzip_alone } =
            ingest_hour(&pool, &mut rng, wire, clients);
        let phases = if clients == 1 {
            format!("gunzip+decode {decode:.2?}, validate+batch {build:.2?}, WAL+fsync+apply {append:.2?}")
        } else {
            format!("threads' gunzip+decode {decode:.2?}, validate+batch {build:.2?}")
        };
        println!(
            "ingest of {name} from {clients} client(s), end to end: {:.0} rows/s, {:.0} rows per CPU-second ({rows} rows of \
             one hour in {requests} requests' {} KiB, {took:.2?}: {phases})",
            rows as f64 / took.as_secs_f64(),
            rows as f64 / cpu.as_secs_f64(),
            gzip_bytes / 1024
        );
        if clients == 1 {
            println!(
                "  floor: gunzip alone {gunzip_alone:.2?} for {} MiB ({} bytes per row), at most {:.0} rows/s",
                raw_bytes >> 20,
                raw_bytes / rows.max(1),
                rows as f64 / gunzip_alone.as_secs_f64()
            );
        }
    }
    for clients in [1, 4] {
        let (rows, took, cpu) = ingest_hour_http(&pool, &mut rng, clients);
        println!(
            "ingest of bundles through HTTP from {clients} host(s) at once: {:.0} rows/s, {:.0} rows per server CPU-second \
             ({rows} rows in {took:.2?}, the server's threads {cpu:.2?} of CPU)",
            rows as f64 / took.as_secs_f64(),
            rows as f64 / cpu.as_secs_f64()
        );
    }
}
