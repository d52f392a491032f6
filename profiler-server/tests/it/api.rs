//! Query API shapes on the in-process server (library `start`, port 0).

use std::collections::BTreeSet;

use profiler_server::config::Config;
use serde_json::Value;

struct Env {
    rt: tokio::runtime::Runtime,
    srv: Option<profiler_server::Server>,
    base: String,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let srv = rt.block_on(profiler_server::start(cfg)).unwrap();
        let base = format!("http://{}", srv.addr);
        Env {
            rt,
            srv: Some(srv),
            base,
            _dir: dir,
        }
    }
    fn post(&self, path: &str, body: &str) {
        let r = reqwest::blocking::Client::new()
            .post(format!("{}{path}", self.base))
            .body(body.to_owned())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }
    fn get(&self, path: &str) -> reqwest::blocking::Response {
        let r = reqwest::blocking::get(format!("{}{path}", self.base)).unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r
    }
    fn json(&self, path: &str) -> Value {
        self.get(path).json().unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(s) = self.srv.take() {
            self.rt.block_on(s.shutdown()).unwrap();
        }
    }
}

const T0: i64 = 1_700_000_000_000;

fn ingest(e: &Env, ts: i64, kind: &str, host: &str, folded: &str) {
    e.post(
        &format!("/api/v1/ingest?service=api&kind={kind}&format=folded&from={ts}&label=host:{host}"),
        folded,
    );
}

fn child<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {v}"))
}

#[test]
fn query_routes() {
    let e = Env::new();
    ingest(&e, T0, "on-cpu", "a", "main;a 10\nmain;b 30\n");
    ingest(
        &e,
        T0 + 10_000,
        "on-cpu",
        "b",
        "main;a 30\nmain;b 10\nmain;b;c 20\n",
    );
    ingest(&e, T0 + 20_000, "off-cpu:sleep", "a", "main;nap 50\n");
    let q = format!("service=api&from={T0}&until={}", T0 + 60_000);

    // Two kinds: each under its own [kind] root.
    let fg = e.json(&format!("/api/v1/flamegraph?{q}"));
    assert_eq!(fg["value"], 150);
    let on = child(&fg, "[on-cpu]");
    assert_eq!(
        (on["value"].as_i64(), on["kind"].as_str()),
        (Some(100), Some("on-cpu"))
    );
    assert_eq!(child(&fg, "[off-cpu:sleep]")["value"], 50);

    // Kind and label selection.
    let fg = e.json(&format!(
        "/api/v1/flamegraph?{q}&kinds=on-cpu&filter=host=b"
    ));
    let main = child(&fg, "main");
    assert_eq!(main["value"], 60);
    let b = child(main, "b");
    assert_eq!(
        (b["value"].as_i64(), b["self"].as_i64()),
        (Some(30), Some(10))
    );

    // Pruning keeps totals exact.
    let fg = e.json(&format!(
        "/api/v1/flamegraph?{q}&kinds=on-cpu&min_share=0.3"
    ));
    let main = child(&fg, "main");
    let names: BTreeSet<&str> = main["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["a", "b"]),
        "a (40 of 100) and b (60) are above 30%: {main}"
    );
    let pruned = &child(main, "b")["children"];
    assert_eq!(
        pruned,
        &serde_json::json!([{"name": "[pruned]", "value": 20, "self": 20, "children": []}])
    );

    // Top by self and by total.
    let top = e.json(&format!("/api/v1/top?{q}&kinds=on-cpu&by=total&limit=2"));
    assert_eq!(top["functions"][0]["name"], "main");
    assert_eq!(top["functions"][0]["total"], 100);
    assert_eq!(top["functions"].as_array().unwrap().len(), 2);
    let top = e.json(&format!("/api/v1/top?{q}&kinds=on-cpu"));
    // a and b tie on self (40); ties go alphabetically.
    assert_eq!(
        top["functions"][0],
        serde_json::json!({"name": "a", "self": 40, "total": 40})
    );
    assert_eq!(
        top["functions"][1],
        serde_json::json!({"name": "b", "self": 40, "total": 60})
    );
    assert_eq!(
        top["functions"][2],
        serde_json::json!({"name": "c", "self": 20, "total": 20})
    );

    // Timeline buckets.
    let tl = e.json(&format!("/api/v1/timeline?{q}&step=10000"));
    assert_eq!(
        tl["series"]["on-cpu"],
        serde_json::json!([40, 60, 0, 0, 0, 0])
    );
    assert_eq!(
        tl["series"]["off-cpu:sleep"],
        serde_json::json!([0, 0, 50, 0, 0, 0])
    );

    // Diff: window 2 (target) against window 1 (base), normalized to equal totals.
    let d = e.json(&format!(
        "/api/v1/diff?service=api&kinds=on-cpu&from={}&until={}&base_from={T0}&base_until={}&normalize=false",
        T0 + 10_000,
        T0 + 20_000,
        T0 + 10_000
    ));
    let a = child(child(&d, "main"), "a");
    assert_eq!(
        (a["value"].as_i64(), a["base"].as_i64()),
        (Some(30), Some(10))
    );
    let d = e.json(&format!(
        "/api/v1/diff?service=api&kinds=on-cpu&from={}&until={}&base_from={T0}&base_until={}",
        T0 + 10_000,
        T0 + 20_000,
        T0 + 10_000
    ));
    assert_eq!(
        (d["value"].as_i64(), d["base"].as_i64()),
        (Some(60), Some(60))
    );
    assert_eq!(child(child(&d, "main"), "a")["base"], 15);

    // SVG and mixed-kind folded.
    let svg = e.get(&format!("/api/v1/svg?{q}")).text().unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("[off-cpu:sleep]") && svg.contains("nap"));
    let folded = e.get(&format!("/api/v1/folded?{q}")).text().unwrap();
    assert!(folded.contains("[off-cpu:sleep];main;nap 50\n"), "{folded}");
    assert!(folded.contains("[on-cpu];main;b;c 20\n"), "{folded}");

    let values: Vec<String> = e
        .get("/api/v1/label_values?service=api&name=host")
        .json()
        .unwrap();
    assert_eq!(values, ["a", "b"]);
}

/// Interned frame names are the query routes' memory that outlives a query;
/// `/metrics` shows how much there is.
#[test]
fn metrics_show_the_interned_stacks_of_queries() {
    let e = Env::new();
    let gauge = |name: &str| -> u64 {
        let m = e.get("/metrics").text().unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} in /metrics"))
            .parse()
            .unwrap()
    };
    let folded: String = (0..500).map(|i| format!("main;handler_{i};leaf 1\n")).collect();
    ingest(&e, T0, "on-cpu", "a", &folded);
    assert_eq!((gauge("profiler_interned_stacks"), gauge("profiler_interned_name_bytes")), (0, 0));
    let fg = e.json(&format!("/api/v1/flamegraph?service=api&from={T0}&until={}", T0 + 60_000));
    assert_eq!(fg["value"], 500);
    assert_eq!(gauge("profiler_interned_stacks"), 500);
    // The frames, and the tree's own `root` and `[on-cpu]` nodes.
    let frames: u64 = ["main", "leaf"].iter().map(|f| f.len() as u64).sum::<u64>()
        + (0..500).map(|i| format!("handler_{i}").len() as u64).sum::<u64>();
    let names = frames + "root".len() as u64 + "[on-cpu]".len() as u64;
    assert_eq!(gauge("profiler_interned_name_bytes"), names);
}
