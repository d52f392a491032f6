//! ClickHouse backend beyond the shared query suite: several server
//! instances on one database, restarts and migrations, the 1-minute rollup.
//! Runs real ClickHouse SQL through the chdb bridge (`pip install chdb`).

use crate::chdb_bridge;
use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use common::{client, folded_total, now_ms, Proc};
use profiler_server::config::Config;
use profiler_server::store::{
    series_id, stack_id, Appended, Batch, ClickHouseOptions, ClickHouseStore, Frames, GroupBy,
    Labels, Refused, Row, Selector, Store, StoreError,
};
use serde_json::{json, Value};

const MIN: i64 = 60_000;

/// Runs SQL on the bridge directly (TabSeparated reply).
fn sql(bridge: &chdb_bridge::Bridge, q: &str) -> String {
    let r = client()
        .post(&bridge.url)
        .body(q.to_owned())
        .send()
        .unwrap();
    let status = r.status();
    let text = r.text().unwrap();
    assert!(status.is_success(), "{q}: {text}");
    text
}

fn write_config(
    dir: &std::path::Path,
    bridge: &chdb_bridge::Bridge,
    db: &str,
    extra: &str,
) -> String {
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\nbackend = \"clickhouse\"\n{extra}\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{db}\"\n",
            bridge.url
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn ingest(p: &Proc, query: &str, body: &str) {
    let r = client()
        .post(p.url(&format!("/api/v1/ingest?{query}")))
        .body(body.to_owned())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
}

fn get(p: &Proc, path: &str) -> String {
    let r = client().get(p.url(path)).send().unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().unwrap()
}

#[test]
fn two_instances_share_one_database() {
    let bridge = chdb_bridge::shared();
    let db = chdb_bridge::fresh_database("scaleout");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let cfg = write_config(dirs[0].path(), bridge, &db, "");
    // Started together: both run the (idempotent) migrations at once.
    let (a, b) = std::thread::scope(|s| {
        let ha = s.spawn(|| Proc::spawn(dirs[0].path(), &["--config", &cfg]));
        let hb = s.spawn(|| Proc::spawn(dirs[1].path(), &["--config", &cfg]));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_ne!(a.base, b.base);
    let t0 = (now_ms() - 30 * MIN).div_euclid(MIN) * MIN;
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..12i64 {
        let p = if i % 2 == 0 { &a } else { &b };
        // The same stacks and series reach both instances: the content-hashed
        // ids agree, so dictionaries written twice collapse.
        let host = format!("h{}", i % 3);
        let body = format!(
            "main;serve;parse {}\nmain;serve;reply {}\nmain;gc 1\n",
            i + 1,
            2 * i
        );
        ingest(
            p,
            &format!(
                "service=web&kind=on-cpu&format=folded&from={}&label=host:{host}",
                t0 + i * 10_000
            ),
            &body,
        );
        *expected.entry("main;serve;parse".into()).or_default() += i + 1;
        *expected.entry("main;serve;reply".into()).or_default() += 2 * i;
        *expected.entry("main;gc".into()).or_default() += 1;
    }
    ingest(
        &b,
        &format!("service=batch&kind=off-cpu:sleep&format=folded&from={t0}"),
        "main;wait 9\n",
    );
    let want: String = expected.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    let range = format!("from={}&until={}", t0, t0 + 10 * MIN);
    for p in [&a, &b] {
        assert_eq!(get(p, "/api/v1/services"), r#"["batch","web"]"#);
        assert_eq!(
            get(p, "/api/v1/label_values?service=web&name=host"),
            r#"["h0","h1","h2"]"#
        );
        assert_eq!(get(p, &format!("/api/v1/folded?service=web&{range}")), want);
        assert_eq!(
            folded_total(&get(
                p,
                &format!("/api/v1/folded?service=web&{range}&filter=host=h1")
            )),
            (1..12).step_by(3).map(|i| i + 1 + 2 * i + 1).sum::<i64>()
        );
        assert_eq!(
            get(p, &format!("/api/v1/folded?service=batch&{range}")),
            "main;wait 9\n"
        );
    }
    // Flame graphs and tops agree between the instances.
    for route in [
        format!("/api/v1/flamegraph?service=web&{range}"),
        format!("/api/v1/top?service=web&{range}&by=total"),
        format!("/api/v1/timeline?service=web&{range}&step=30000"),
    ] {
        assert_eq!(get(&a, &route), get(&b, &route), "{route}");
    }
    // Stacks were written by both, yet every id has one set of frames.
    let dup = sql(
        bridge,
        &format!("SELECT count() FROM (SELECT stack_id FROM {db}.stacks GROUP BY stack_id HAVING uniqExact(frames) > 1)"),
    );
    assert_eq!(dup.trim(), "0");
    a.terminate();
    b.terminate();
}

/// The request table lives in ClickHouse with the profiles: windows of requests
/// ingested through one instance, one of them retried through the other, are listed,
/// ranked and profiled alike by both, each request once, and neither instance keeps a
/// table of its own.
#[test]
fn requests_are_shared_across_instances() {
    use crate::requests::{request, window, PER_WINDOW};
    let bridge = chdb_bridge::shared();
    let db = chdb_bridge::fresh_database("requests");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let cfg = write_config(dirs[0].path(), bridge, &db, "");
    let a = Proc::spawn(dirs[0].path(), &["--config", &cfg]);
    let b = Proc::spawn(dirs[1].path(), &["--config", &cfg]);
    let windows = 6u64;
    let start = (now_ms() - 10 * MIN) / 10_000 * 10_000;
    let post = |p: &Proc, w: u64| {
        let at = start + w as i64 * 10_000;
        let r = client()
            .post(p.url(&format!("/api/v1/ingest?format=bundle3&from={at}&batch_id=r{w}&label=host:h1")))
            .body(window(w * PER_WINDOW))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    };
    for w in 0..windows {
        post(&a, w);
    }
    post(&b, 0);
    let range = format!("service=api&from={start}&until={}", start + windows as i64 * 10_000);
    let tables: Vec<Value> = [&a, &b]
        .iter()
        .map(|p| serde_json::from_str(&get(p, &format!("/api/v1/requests?{range}&limit=3"))).unwrap())
        .collect();
    let n = windows * PER_WINDOW;
    assert_eq!(tables[0]["count"], n, "{}", tables[0]);
    assert_eq!(tables[0], tables[1], "the instances disagree");
    let mut totals: Vec<u64> = (0..n).map(|j| request(j).0 + request(j).1 + request(j).2).collect();
    totals.sort_unstable();
    let rank = |q: f64| totals[((q * n as f64).ceil() as usize).clamp(1, n as usize) - 1];
    assert_eq!(tables[1]["total_ns"]["p99"], rank(0.99));
    assert_eq!(tables[1]["total_ns"]["p50"], rank(0.5));
    // Every slow request (every 100th: 16 of them) is among the slowest 1%, with its
    // 40 ms extra wait; none of the rest has one.
    let slow_wait = |pick: &str| {
        let text = get(&b, &format!("/api/v1/folded?{range}&kinds=off-cpu:sleep&requests={pick}"));
        text.lines().filter_map(|l| l.rsplit_once(' ')).filter(|(stack, _)| stack.ends_with("slow_dependency")).map(|(_, v)| v.parse::<i64>().unwrap()).sum::<i64>()
    };
    assert_eq!(slow_wait("slowest:1"), 16 * 40_000_000);
    assert_eq!(slow_wait("rest:1"), 0);
    for dir in &dirs {
        assert!(!dir.path().join("requests.redb").exists(), "an instance kept a local request table");
    }
    a.terminate();
    b.terminate();
}

struct InProc {
    rt: tokio::runtime::Runtime,
    srv: Option<profiler_server::Server>,
    base: String,
}

impl InProc {
    fn start(cfg: Config) -> InProc {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let srv = rt.block_on(profiler_server::start(cfg)).unwrap();
        InProc {
            base: format!("http://{}", srv.addr),
            rt,
            srv: Some(srv),
        }
    }
    fn post(&self, path: &str, body: &str) {
        let r = client()
            .post(format!("{}{path}", self.base))
            .body(body.to_owned())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }
    fn post_bytes(&self, path: &str, body: Vec<u8>) {
        let r = client().post(format!("{}{path}", self.base)).body(body).send().unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }
    fn text(&self, path: &str) -> String {
        let r = client().get(format!("{}{path}", self.base)).send().unwrap();
        let status = r.status();
        let text = r.text().unwrap();
        assert_eq!(status, 200, "{path}: {text}");
        text
    }
    fn json(&self, path: &str) -> Value {
        serde_json::from_str(&self.text(path)).unwrap()
    }
    fn stop(mut self) {
        let s = self.srv.take().unwrap();
        self.rt.block_on(s.shutdown()).unwrap();
    }
}

fn ch_config(bridge: &chdb_bridge::Bridge, db: &str, dir: &std::path::Path) -> Config {
    chdb_bridge::clickhouse_config(
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_owned(),
            ..Config::default()
        },
        bridge,
        db,
    )
}

#[test]
fn restart_keeps_data_and_migrations_run_once() {
    let bridge = chdb_bridge::shared();
    let db = chdb_bridge::fresh_database("restart");
    let dir = tempfile::tempdir().unwrap();
    let t0 = (now_ms() - 10 * MIN).div_euclid(MIN) * MIN;
    let s = InProc::start(ch_config(bridge, &db, dir.path()));
    s.post(
        &format!("/api/v1/ingest?service=svc&kind=on-cpu&format=folded&from={t0}"),
        "main;work 12\n",
    );
    s.stop();
    let s = InProc::start(ch_config(bridge, &db, dir.path()));
    let f = s.json(&format!(
        "/api/v1/flamegraph?service=svc&from={t0}&until={}",
        t0 + MIN
    ));
    assert_eq!(f["value"], 12);
    s.stop();
    assert_eq!(
        sql(
            bridge,
            &format!("SELECT count(), max(version) FROM {db}.schema_migrations")
        )
        .trim(),
        "3\t3"
    );
    let tables = sql(
        bridge,
        &format!("SELECT name, engine FROM system.tables WHERE database = '{db}' ORDER BY name"),
    );
    assert_eq!(
        tables,
        "request_rows\tReplacingMergeTree\nsamples\tMergeTree\nsamples_1m\tSummingMergeTree\nsamples_1m_mv\tMaterializedView\n\
         schema_migrations\tReplacingMergeTree\nseries\tReplacingMergeTree\nstacks\tReplacingMergeTree\n"
    );
    let ddl = sql(
        bridge,
        &format!("SHOW CREATE TABLE {db}.samples FORMAT TabSeparatedRaw"),
    );
    for want in ["PARTITION BY toDate(ts)", "TTL", "CODEC(Delta", "CODEC(T64"] {
        assert!(ddl.contains(want), "{want} missing from {ddl}");
    }
    // Both tables a retry reaches keep deduplication tokens.
    for table in ["samples", "samples_1m"] {
        let ddl = sql(
            bridge,
            &format!("SHOW CREATE TABLE {db}.{table} FORMAT TabSeparatedRaw"),
        );
        assert!(
            ddl.contains("non_replicated_deduplication_window = 10000"),
            "{ddl}"
        );
    }
}

/// A server keeping raw rows for an hour (older ones are read from the rollup), its
/// database, and two window starts: three hours ago (rollup) and ten minutes ago (raw).
fn one_hour_raw(name: &str) -> (InProc, String, tempfile::TempDir, i64, i64) {
    let bridge = chdb_bridge::shared();
    let db = chdb_bridge::fresh_database(name);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ch_config(bridge, &db, dir.path());
    cfg.storage.retention_hours = 1;
    let old = (now_ms() - 3 * 3_600_000).div_euclid(MIN) * MIN;
    let recent = (now_ms() - 10 * MIN).div_euclid(MIN) * MIN;
    (InProc::start(cfg), db, dir, old, recent)
}

#[test]
fn ranges_past_raw_retention_are_read_from_the_rollup() {
    let bridge = chdb_bridge::shared();
    let (s, db, _dir, old, recent) = one_hour_raw("rollup");
    for (at, body) in [
        (old, "main;a 5\nmain;b 1\n"),
        (old + 20_000, "main;a 7\n"),
        (old + 70_000, "main;b 2\n"),
        (recent, "main;a 100\n"),
    ] {
        s.post(
            &format!("/api/v1/ingest?service=svc&kind=on-cpu&format=folded&from={at}&label=host:x"),
            body,
        );
    }
    // The rollup holds one row per (minute, series, stack).
    assert_eq!(
        sql(bridge, &format!("SELECT toUnixTimestamp(minute) * 1000 - {old}, sum(value) FROM {db}.samples_1m WHERE stack_id IN (SELECT stack_id FROM {db}.stacks WHERE frames = ['main', 'a']) GROUP BY minute ORDER BY minute")),
        format!("0\t12\n{}\t100\n", recent - old)
    );
    let from = old - 5 * MIN;
    let until = now_ms();
    let f = s.json(&format!(
        "/api/v1/flamegraph?service=svc&from={from}&until={until}&filter=host=x"
    ));
    assert_eq!(f["value"], 115);
    let t = s.json(&format!(
        "/api/v1/timeline?service=svc&from={old}&until={}&step=60000",
        old + 3 * MIN
    ));
    assert_eq!(t["series"], json!({"on-cpu": [13, 2, 0]}));
    s.stop();
}

/// Wait histograms are rows like any other here too: stored raw, merged in the
/// rollup past raw retention, read back per frame, and outside the totals.
#[test]
fn wait_histograms_merge_across_raw_rows_and_the_rollup() {
    let (s, _db, _dir, old, recent) = one_hour_raw("waits");
    let durations: Vec<u64> = [2_000_000; 90].into_iter().chain([60_000_000; 10]).collect();
    for at in [old, old + 20_000, recent] {
        let body = profiler_pprof::gzip(&crate::waits::window(&durations));
        s.post_bytes(&format!("/api/v1/ingest?format=bundle2&from={at}&batch_id=w{at}"), body);
    }
    let range = format!("service=db&from={}&until={}", old - 5 * MIN, now_ms());
    let v = s.json(&format!("/api/v1/waits?{range}&frame=query_db"));
    assert_eq!((v["count"].as_f64(), v["stacks"].as_u64()), (Some(300.0), Some(1)), "{v}");
    let ms = |key: &str| v[key].as_f64().unwrap() / 1e6;
    assert!((1.9..2.1).contains(&ms("p50_ns")) && (57.0..63.0).contains(&ms("p95_ns")), "{v}");
    let recent_only = s.json(&format!("/api/v1/waits?service=db&from={recent}&until={}&frame=query_db", recent + MIN));
    assert_eq!(recent_only["count"], 100.0);
    let folded = s.text(&format!("/api/v1/folded?{range}"));
    assert!(!folded.contains("waits:") && folded.lines().count() == 2, "{folded}");
    s.stop();
}

#[test]
fn a_flame_graph_over_50k_stacks_works_right_after_a_restart() {
    const STACKS: i64 = 50_000;
    let bridge = chdb_bridge::shared();
    let db = chdb_bridge::fresh_database("many_stacks");
    let dir = tempfile::tempdir().unwrap();
    let t0 = (now_ms() - 10 * MIN).div_euclid(MIN) * MIN;
    let body: String = (0..STACKS)
        .map(|i| format!("main;mod_{};fn_{i} {}\n", i / 100, i % 7 + 1))
        .collect();
    let total: i64 = (0..STACKS).map(|i| i % 7 + 1).sum();
    let s = InProc::start(ch_config(bridge, &db, dir.path()));
    s.post(
        &format!("/api/v1/ingest?service=big&kind=on-cpu&format=folded&from={t0}"),
        &body,
    );
    s.stop();
    // A new instance has seen none of the stacks: all 50,000 are looked up.
    let s = InProc::start(ch_config(bridge, &db, dir.path()));
    let range = format!("from={t0}&until={}", t0 + MIN);
    let flame_graph = || {
        let started = Instant::now();
        let f = s.json(&format!("/api/v1/flamegraph?service=big&{range}"));
        (f, started.elapsed())
    };
    let (f, cold) = flame_graph();
    assert_eq!(f["value"], total);
    let (f, warm) = flame_graph();
    assert_eq!(f["value"], total);
    eprintln!("flame graph over {STACKS} stacks: {cold:?} with a cold stack cache, {warm:?} warm");
    let folded = s.text(&format!("/api/v1/folded?service=big&{range}"));
    assert_eq!(folded.lines().count(), STACKS as usize);
    assert_eq!(folded_total(&folded), total);
    assert!(folded.contains("main;mod_499;fn_49999 6\n"));
    s.stop();
}

#[test]
fn an_ingest_retried_on_another_instance_is_counted_once() {
    let bridge = chdb_bridge::shared();
    let db = chdb_bridge::fresh_database("ingest_retries");
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let t0 = (now_ms() - 10 * MIN).div_euclid(MIN) * MIN;
    let a = InProc::start(ch_config(bridge, &db, dirs[0].path()));
    let b = InProc::start(ch_config(bridge, &db, dirs[1].path()));
    let ingest = |p: &InProc, batch_id: &str| {
        p.post(
            &format!(
                "/api/v1/ingest?service=svc&kind=on-cpu&format=folded&from={t0}&batch_id={batch_id}"
            ),
            "main;work 4\n",
        )
    };
    // The agent's answer from `a` was lost; its retry reached `b`.
    ingest(&a, "agent-1:1");
    ingest(&b, "agent-1:1");
    ingest(&a, "agent-1:2");
    for p in [&a, &b] {
        let f = p.json(&format!(
            "/api/v1/flamegraph?service=svc&from={t0}&until={}",
            t0 + MIN
        ));
        assert_eq!(f["value"], 8);
    }
    a.stop();
    b.stop();
}

fn open_store(bridge: &chdb_bridge::Bridge, db: &str, async_insert: bool) -> ClickHouseStore {
    ClickHouseStore::open(ClickHouseOptions {
        url: bridge.url.clone(),
        database: db.to_owned(),
        user: None,
        password: None,
        retention_ms: None,
        rollup_retention_ms: None,
        async_insert,
    })
    .unwrap()
}

/// One stack of one series at `ts_ms`, as ingest builds it.
fn one_row_batch(id: Option<&str>, ts_ms: i64, value: i64) -> Batch {
    let frames: Frames = ["main", "work"].map(Arc::from).into();
    let labels = Labels::from([("service".to_string(), "svc".to_string())]);
    let row = Row {
        ts_ms,
        series_id: series_id(&labels),
        stack_id: stack_id(&frames),
        value,
    };
    Batch {
        id: id.map(str::to_owned),
        maybe_stored_since_ms: None,
        service: "svc".into(),
        kind: "on-cpu".into(),
        stacks: vec![(row.stack_id, frames)],
        series: vec![(row.series_id, labels)],
        rows: vec![row],
    }
}

#[test]
fn a_retried_batch_is_counted_once() {
    retried_batches_are_counted_once(false);
}

/// The bridge inserts through INSERT SELECT, which ClickHouse never batches:
/// this checks that the deduplication settings sent with async inserts are
/// accepted and keep the same answers.
#[test]
fn a_retried_batch_is_counted_once_with_async_insert_settings() {
    retried_batches_are_counted_once(true);
}

fn retried_batches_are_counted_once(async_insert: bool) {
    let bridge = chdb_bridge::shared();
    let db = chdb_bridge::fresh_database("retries");
    let t0 = (now_ms() - 10 * MIN).div_euclid(MIN) * MIN;
    let store = open_store(bridge, &db, async_insert);
    let total = |store: &ClickHouseStore| -> i64 {
        let sel = Selector {
            service: "svc".into(),
            from_ms: t0,
            until_ms: t0 + MIN,
            kinds: None,
            matchers: vec![],
            cancel: Default::default(),
        };
        let agg = store.aggregate(&sel, GroupBy::Stack).unwrap();
        agg.values().flat_map(|m| m.values()).sum()
    };
    // ClickHouse drops the retry silently, so both are acknowledged alike.
    for _ in 0..2 {
        let appended = store.append(one_row_batch(Some("agent-1:7"), t0, 5));
        assert_eq!(appended.unwrap(), Appended::Stored);
    }
    assert_eq!(total(&store), 5);
    // Same rows, another id: another batch.
    store
        .append(one_row_batch(Some("agent-1:8"), t0, 5))
        .unwrap();
    assert_eq!(total(&store), 10);
    // Without an id nothing is deduplicated, not even identical rows.
    for _ in 0..2 {
        store.append(one_row_batch(None, t0, 5)).unwrap();
    }
    assert_eq!(total(&store), 20);
    // A retry that reaches another instance is dropped all the same.
    let other = open_store(bridge, &db, async_insert);
    other
        .append(one_row_batch(Some("agent-1:8"), t0, 5))
        .unwrap();
    assert_eq!(total(&other), 20);
    // The 1-minute rollup counts each batch once too.
    assert_eq!(
        sql(bridge, &format!("SELECT sum(value) FROM {db}.samples_1m")).trim(),
        "20"
    );
    // A retry whose attempt went unanswered before this instance started may be
    // among tokens it cannot vouch for: refused, not counted twice.
    let mut before = one_row_batch(Some("agent-1:9"), t0, 5);
    before.maybe_stored_since_ms = Some(now_ms() - 3_600_000);
    let refused = other.append(before).unwrap_err();
    assert!(matches!(refused, StoreError::Refused(Refused::Unverifiable(_))), "{refused:#}");
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut since = one_row_batch(Some("agent-1:9"), t0, 5);
    since.maybe_stored_since_ms = Some(now_ms());
    other.append(since).unwrap();
    assert_eq!(total(&other), 25);
}

/// A TCP relay to the bridge that can be cut, like a ClickHouse outage: new
/// connections are dropped, and open ones are closed.
struct Relay {
    url: String,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn to(bridge: &chdb_bridge::Bridge) -> Relay {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let target = bridge.url.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if flag.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        from.set_read_timeout(Some(std::time::Duration::from_millis(50))).unwrap();
                        let mut buf = [0u8; 16 << 10];
                        while !flag.load(Ordering::Relaxed) {
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { url, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// While ClickHouse is unreachable, reads answer 503 (the store failed), never
/// an empty export or label list, and a schedule for a known service is not
/// refused as naming an unknown one.
#[test]
fn a_clickhouse_outage_answers_503_not_empty_answers() {
    let bridge = chdb_bridge::shared();
    let db = chdb_bridge::fresh_database("outage");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::to(bridge);
    let t0 = (now_ms() - 10 * MIN).div_euclid(MIN) * MIN;
    let mut cfg = ch_config(bridge, &db, dir.path());
    cfg.clickhouse.url = relay.url.clone();
    let s = InProc::start(cfg);
    s.post(&format!("/api/v1/ingest?service=svc&kind=on-cpu&format=folded&from={t0}&label=host:h1"), "main;work 12\n");
    let range = format!("service=svc&from={t0}&until={}", t0 + MIN);
    assert!(s.text(&format!("/api/v1/folded?{range}")).contains("main;work 12"));

    relay.cut();
    for path in [format!("/api/v1/folded?{range}"), format!("/api/v1/pprof?{range}"), "/api/v1/labels?service=svc".to_owned(), "/api/v1/services".to_owned()] {
        let r = client().get(format!("{}{path}", s.base)).send().unwrap();
        let status = r.status().as_u16();
        let body = r.text().unwrap();
        assert_eq!(status, 503, "{path} during the outage: {body}");
        assert!(body.contains("store failed"), "{path}: {body}");
    }
    let schedule = json!({
        "name": "nightly", "cron": "0 3 * * *", "duration_s": 60,
        "selector": {"service": "svc"}, "settings": {"frequency_hz": 499}
    });
    let r = client().post(format!("{}/api/v1/schedules", s.base)).json(&schedule).send().unwrap();
    assert_eq!(r.status().as_u16(), 503, "creating a schedule during the outage: {}", r.text().unwrap());
    s.stop();
}
