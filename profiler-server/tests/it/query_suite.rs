//! One query test suite, run against both storage backends: the embedded
//! store and ClickHouse (through the chdb bridge, a real ClickHouse engine).
//! Every check asserts exact values over the same data set, and
//! `backends_answer_identically` compares every route's reply byte for byte.
//!
//! The ClickHouse half needs python3 with chdb (`pip install chdb`).

use crate::chdb_bridge;

use std::collections::BTreeMap;

use profiler_server::config::Config;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Embedded,
    ClickHouse,
}

struct Srv {
    rt: tokio::runtime::Runtime,
    srv: Option<profiler_server::Server>,
    base: String,
    /// Start of the data set (minute aligned, 20 minutes ago).
    t0: i64,
    _dir: tempfile::TempDir,
}

const MIN: i64 = 60_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

impl Srv {
    fn start(backend: Backend, tag: &str) -> Srv {
        Srv::start_at(backend, tag, (now_ms() - 20 * MIN).div_euclid(MIN) * MIN)
    }

    fn start_at(backend: Backend, tag: &str, t0: i64) -> Srv {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        if let Backend::ClickHouse = backend {
            let bridge = chdb_bridge::shared();
            cfg = chdb_bridge::clickhouse_config(cfg, bridge, &chdb_bridge::fresh_database(tag));
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        let srv = rt.block_on(profiler_server::start(cfg)).unwrap();
        let s = Srv {
            base: format!("http://{}", srv.addr),
            rt,
            srv: Some(srv),
            t0,
            _dir: dir,
        };
        s.load();
        s
    }

    fn post(&self, path: &str, body: Vec<u8>) {
        let r = reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.base))
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}: {}", r.text().unwrap());
    }

    fn folded(&self, service: &str, kind: &str, at: i64, labels: &str, text: &str) {
        self.post(
            &format!(
                "/api/v1/ingest?service={service}&kind={kind}&format=folded&from={at}{labels}"
            ),
            text.as_bytes().to_vec(),
        );
    }

    /// The data set: two services, two hosts, on-CPU and off-CPU, folded and
    /// pprof ingest, early (first 5 min) and late (minute 10) windows.
    fn load(&self) {
        let t0 = self.t0;
        self.folded(
            "shop",
            "on-cpu",
            t0,
            "&label=host:a&label=pid:1",
            "main;api;handle 30\nmain;api;db 20\nmain;gc 5\n",
        );
        self.folded(
            "shop",
            "on-cpu",
            t0 + MIN,
            "&label=host:b&label=pid:2",
            "main;api;handle 10\nmain;idle 1\n",
        );
        self.folded(
            "shop",
            "off-cpu:blocked-io",
            t0 + 2 * MIN,
            "&label=host:a&label=pid:1",
            "main;api;db;read 40\n",
        );
        self.folded(
            "shop",
            "on-cpu",
            t0 + 10 * MIN,
            "&label=host:a&label=pid:1",
            "main;api;handle 50\nmain;api;render 25\n",
        );
        self.folded(
            "auth",
            "on-cpu",
            t0 + 3 * MIN,
            "&label=region:eu",
            "main;login 7\n",
        );
        // pprof with a sample label: a series of its own (host=b, pid=2, worker=w1).
        let mut pb = profiler_pprof::ProfileBuilder::new(&[("cpu", "nanoseconds")]);
        pb.add(&["main", "api", "handle"], &[4], &[("worker", "w1")]);
        pb.add(&["main", "api", "db"], &[6], &[("worker", "w1")]);
        self.post(
            &format!(
                "/api/v1/ingest?service=shop&kind=on-cpu&from={}&label=host:b&label=pid:2",
                t0 + 11 * MIN
            ),
            profiler_pprof::encode_gzip(&pb.build()),
        );
    }

    fn get(&self, path: &str) -> reqwest::blocking::Response {
        let r = reqwest::blocking::get(format!("{}{path}", self.base)).unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r
    }

    fn json(&self, path: &str) -> Value {
        self.get(path).json().unwrap()
    }

    fn text(&self, path: &str) -> String {
        self.get(path).text().unwrap()
    }

    /// `from`/`until` covering the whole data set.
    fn range(&self) -> String {
        format!("from={}&until={}", self.t0, self.t0 + 15 * MIN)
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        if let Some(s) = self.srv.take() {
            self.rt.block_on(s.shutdown()).unwrap();
        }
    }
}

/// name -> (value, self) over a flame graph, paths joined by `;`.
fn flatten(node: &Value, prefix: &str, out: &mut BTreeMap<String, (i64, i64)>) {
    let name = node["name"].as_str().unwrap();
    let path = if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix};{name}")
    };
    out.insert(
        path.clone(),
        (
            node["value"].as_i64().unwrap(),
            node["self"].as_i64().unwrap(),
        ),
    );
    for c in node["children"].as_array().unwrap() {
        flatten(c, &path, out);
    }
}

// ---- the checks: each runs against one server holding the data set ----

fn services(s: &Srv) {
    assert_eq!(s.json("/api/v1/services"), json!(["auth", "shop"]));
}

fn labels(s: &Srv) {
    assert_eq!(
        s.json("/api/v1/labels?service=shop"),
        json!(["host", "pid", "worker"])
    );
    assert_eq!(s.json("/api/v1/labels?service=auth"), json!(["region"]));
    assert_eq!(s.json("/api/v1/labels?service=none"), json!([]));
}

fn label_values(s: &Srv) {
    assert_eq!(
        s.json("/api/v1/label_values?service=shop&name=host"),
        json!(["a", "b"])
    );
    assert_eq!(
        s.json("/api/v1/label_values?service=shop&name=worker"),
        json!(["w1"])
    );
    assert_eq!(
        s.json("/api/v1/label_values?service=shop&name=nope"),
        json!([])
    );
}

fn timeline(s: &Srv) {
    let t = s.json(&format!(
        "/api/v1/timeline?service=shop&{}&step=60000",
        s.range()
    ));
    assert_eq!(t["step"], 60000);
    let mut on = vec![0; 15];
    on[0] = 55;
    on[1] = 11;
    on[10] = 75;
    on[11] = 10;
    let mut off = vec![0; 15];
    off[2] = 40;
    assert_eq!(t["series"]["on-cpu"], json!(on));
    assert_eq!(t["series"]["off-cpu:blocked-io"], json!(off));
    // Steps not aligned to the data, one kind, a label filter.
    let t = s.json(&format!(
        "/api/v1/timeline?service=shop&from={}&until={}&step=300000&kinds=on-cpu&filter=host=a",
        s.t0 - 2 * MIN,
        s.t0 + 13 * MIN
    ));
    assert_eq!(t["series"]["on-cpu"], json!([55, 0, 75]));
    assert!(t["series"].get("off-cpu:blocked-io").is_none());
}

fn flamegraph(s: &Srv) {
    let f = s.json(&format!("/api/v1/flamegraph?service=shop&{}", s.range()));
    let mut m = BTreeMap::new();
    flatten(&f, "", &mut m);
    assert_eq!(m["root"], (191, 0));
    assert_eq!(m["root;[on-cpu]"], (151, 0));
    assert_eq!(m["root;[on-cpu];main;api;handle"], (94, 94));
    assert_eq!(m["root;[on-cpu];main;api;db"], (26, 26));
    assert_eq!(m["root;[off-cpu:blocked-io];main;api;db;read"], (40, 40));
    // One kind: no [kind] level.
    let f = s.json(&format!(
        "/api/v1/flamegraph?service=shop&{}&kinds=on-cpu",
        s.range()
    ));
    let mut m = BTreeMap::new();
    flatten(&f, "", &mut m);
    assert_eq!(m["root;main"], (151, 0));
    assert_eq!(m["root;main;api"], (145, 0));
    // Label filters: equal, not equal, a pprof sample label.
    let v = |q: &str| {
        s.json(&format!(
            "/api/v1/flamegraph?service=shop&{}&{q}",
            s.range()
        ))["value"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(v("filter=host=b"), 21);
    assert_eq!(v("filter=host!=b"), 170);
    assert_eq!(v("filter=worker=w1"), 10);
    assert_eq!(v("filter=host=b,worker!=w1"), 11);
    assert_eq!(v("filter=host=zzz"), 0);
    // Half-open range: the window at t0 + 10 min is out.
    let f = s.json(&format!(
        "/api/v1/flamegraph?service=shop&from={}&until={}",
        s.t0,
        s.t0 + 10 * MIN
    ));
    assert_eq!(f["value"], 106);
    // Another service, pruning.
    assert_eq!(
        s.json(&format!("/api/v1/flamegraph?service=auth&{}", s.range()))["value"],
        7
    );
    let f = s.json(&format!(
        "/api/v1/flamegraph?service=shop&{}&kinds=on-cpu&min_share=0.2",
        s.range()
    ));
    let mut m = BTreeMap::new();
    flatten(&f, "", &mut m);
    assert!(m.contains_key("root;main;[pruned]"), "{m:?}");
}

fn diff(s: &Srv) {
    let q = format!(
        "/api/v1/diff?service=shop&kinds=on-cpu&from={}&until={}&base_from={}&base_until={}",
        s.t0 + 5 * MIN,
        s.t0 + 15 * MIN,
        s.t0,
        s.t0 + 5 * MIN
    );
    let d = s.json(&format!("{q}&normalize=false"));
    assert_eq!(
        (d["value"].as_i64(), d["base"].as_i64()),
        (Some(85), Some(66))
    );
    let main = &d["children"][0];
    assert_eq!(main["name"], "main");
    let api = &main["children"][0];
    let handle = api["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "handle")
        .unwrap();
    assert_eq!(
        (handle["value"].as_i64(), handle["base"].as_i64()),
        (Some(54), Some(40))
    );
    let render = api["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "render")
        .unwrap();
    assert_eq!(render["base"], 0);
    // Normalized: the base is scaled to the target total.
    let d = s.json(&q);
    assert_eq!(d["base"], 85);
}

fn top(s: &Srv) {
    let t = s.json(&format!("/api/v1/top?service=shop&{}", s.range()));
    assert_eq!(t["total"], 191);
    assert_eq!(t["by"], "self");
    assert_eq!(
        t["functions"][0],
        json!({"name": "handle", "self": 94, "total": 94})
    );
    assert_eq!(
        t["functions"][1],
        json!({"name": "read", "self": 40, "total": 40})
    );
    let t = s.json(&format!(
        "/api/v1/top?service=shop&{}&by=total&limit=3",
        s.range()
    ));
    let names: Vec<&str> = t["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main", "api", "handle"]);
    assert_eq!(t["functions"][0]["total"], 191);
}

fn folded(s: &Srv) {
    assert_eq!(
        s.text(&format!(
            "/api/v1/folded?service=shop&{}&kinds=on-cpu",
            s.range()
        )),
        "main;api;db 26\nmain;api;handle 94\nmain;api;render 25\nmain;gc 5\nmain;idle 1\n"
    );
    let all = s.text(&format!("/api/v1/folded?service=shop&{}", s.range()));
    assert!(
        all.contains("[off-cpu:blocked-io];main;api;db;read 40\n"),
        "{all}"
    );
    assert!(all.contains("[on-cpu];main;api;handle 94\n"), "{all}");
    assert_eq!(
        s.text(&format!("/api/v1/folded?service=auth&{}", s.range())),
        "main;login 7\n"
    );
}

fn pprof_totals(s: &Srv) {
    let bytes = s
        .get(&format!(
            "/api/v1/pprof?service=shop&{}&kinds=on-cpu",
            s.range()
        ))
        .bytes()
        .unwrap();
    let p = profiler_pprof::decode_gzip(&bytes, 64 << 20).unwrap();
    let total: i64 = p.sample.iter().map(|x| x.value[0]).sum();
    assert_eq!(total, 151);
    assert_eq!(p.sample.len(), 5);
    let svg = s.text(&format!("/api/v1/svg?service=shop&{}", s.range()));
    assert!(svg.contains("<svg") && svg.contains("handle"));
}

macro_rules! suite {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $( #[test] fn $check() { super::$check(&super::Srv::start(super::Backend::Embedded, stringify!($check))); } )*
        }
        mod clickhouse {
            $( #[test] fn $check() { super::$check(&super::Srv::start(super::Backend::ClickHouse, stringify!($check))); } )*
        }
    };
}

fn overview(s: &Srv) {
    let t0 = s.t0;
    let o = s.json(&format!("/api/v1/overview?{}&step=300000", s.range()));
    assert_eq!(o["step"], 300_000);
    let names: Vec<&str> = o["services"].as_array().unwrap().iter().map(|x| x["service"].as_str().unwrap()).collect();
    // Heaviest on-CPU first.
    assert_eq!(names, ["shop", "auth"]);
    let shop = &o["services"][0];
    // Values are per nanosecond of the range: back to the ingested sums.
    let ns = |v: &Value, range_ns: f64| (v.as_f64().unwrap() * range_ns).round() as i64;
    let range_ns = 15.0 * 60e9;
    assert_eq!(ns(&shop["on_cpu_cores"], range_ns), 55 + 11 + 75 + 10);
    assert_eq!(ns(&shop["off_cpu"]["blocked-io"], range_ns), 40);
    assert_eq!(ns(&shop["off_cpu_threads"], range_ns), 40);
    let on: Vec<i64> = shop["on_cpu_series"].as_array().unwrap().iter().map(|v| ns(v, 300e9)).collect();
    assert_eq!(on, [66, 0, 85]);
    let off: Vec<i64> = shop["off_cpu_series"].as_array().unwrap().iter().map(|v| ns(v, 300e9)).collect();
    assert_eq!(off, [40, 0, 0]);
    assert_eq!(shop["hosts"], 2);
    assert_eq!(shop["host_names"], json!(["a", "b"]));
    assert_eq!(shop["last_seen"], t0 + 11 * MIN);
    let auth = &o["services"][1];
    assert_eq!((auth["hosts"].clone(), auth["last_seen"].clone()), (json!(0), json!(t0 + 3 * MIN)));

    // Minutes 2..9 hold shop's wait on host a and auth's CPU only.
    let o = s.json(&format!("/api/v1/overview?from={}&until={}", t0 + 2 * MIN, t0 + 9 * MIN));
    let names: Vec<&str> = o["services"].as_array().unwrap().iter().map(|x| x["service"].as_str().unwrap()).collect();
    assert_eq!(names, ["auth", "shop"]);
    assert_eq!(o["services"][1]["host_names"], json!(["a"]));
    assert_eq!(o["services"][1]["on_cpu_cores"], 0.0);
    let o = s.json(&format!("/api/v1/overview?from={}&until={}", t0 - 10 * MIN, t0));
    assert_eq!(o["services"], json!([]));
}

suite!(
    overview,
    services,
    labels,
    label_values,
    timeline,
    flamegraph,
    diff,
    top,
    folded,
    pprof_totals
);

/// Every route, same data, both backends: identical replies.
#[test]
fn backends_answer_identically() {
    let t0 = (now_ms() - 20 * MIN).div_euclid(MIN) * MIN;
    let e = Srv::start_at(Backend::Embedded, "same", t0);
    let c = Srv::start_at(Backend::ClickHouse, "same", t0);
    let r = e.range();
    let routes = [
        "/api/v1/services".to_string(),
        format!("/api/v1/overview?{r}"),
        format!("/api/v1/overview?from={}&until={}&step=70000", t0 + 2 * MIN, t0 + 12 * MIN),
        "/api/v1/labels?service=shop".into(),
        "/api/v1/label_values?service=shop&name=pid".into(),
        format!("/api/v1/timeline?service=shop&{r}"),
        format!("/api/v1/timeline?service=shop&{r}&step=70000&filter=pid!=1"),
        format!("/api/v1/flamegraph?service=shop&{r}"),
        format!("/api/v1/flamegraph?service=shop&{r}&max_nodes=4"),
        format!("/api/v1/flamegraph?service=shop&{r}&filter=host=a&kinds=off-cpu:blocked-io"),
        format!(
            "/api/v1/diff?service=shop&{r}&base_from={}&base_until={}",
            t0 - 30 * MIN,
            t0 + 5 * MIN
        ),
        format!("/api/v1/top?service=shop&{r}&by=total"),
        format!("/api/v1/top?service=shop&{r}&by=self&limit=2"),
        format!("/api/v1/folded?service=shop&{r}&sample_rate=1"),
        format!("/api/v1/folded?service=nobody&{r}"),
        format!("/api/v1/svg?service=shop&{r}&title=x"),
    ];
    for route in routes {
        assert_eq!(e.text(&route), c.text(&route), "{route}");
    }
    // pprof: same samples (the encoding's order may differ).
    let p = |s: &Srv| {
        let b = s
            .get(&format!("/api/v1/pprof?service=shop&{r}"))
            .bytes()
            .unwrap();
        let p = profiler_pprof::decode_gzip(&b, 64 << 20).unwrap();
        let mut v: Vec<i64> = p.sample.iter().map(|x| x.value[0]).collect();
        v.sort();
        v
    };
    assert_eq!(p(&e), p(&c));
}
