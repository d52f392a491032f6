//! Pyroscope's push API against the real Pyroscope Python SDK (`pyroscope-io`,
//! installed by `cargo xtask setup` into `target/pyroscope-venv`), and its
//! protocol edges with hand-built requests: JSON, gzip, retries, errors.

use crate::common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use common::{client, folded_total, now_ms, Proc};
use profiler_pprof::pyroscope::push::v1::{PushRequest, RawProfileSeries, RawSample};
use profiler_pprof::pyroscope::types::v1::LabelPair;
use prost::Message;

fn venv_python() -> PathBuf {
    let python =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyroscope-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it installs the Pyroscope Python SDK)",
        python.display()
    );
    python
}

const APP: &str = r#"
import sys, time, pyroscope
pyroscope.configure(application_name="pyshop", server_address=sys.argv[1],
                    tags={"region": "eu"}, sample_rate=100)
def checkout_total():
    x = 0
    for i in range(200_000):
        x += i * i
    return x
def serve():
    end = time.time() + float(sys.argv[2])
    while time.time() < end:
        with pyroscope.tag_wrapper({"handler": "checkout"}):
            checkout_total()
serve()
pyroscope.shutdown()
"#;

#[test]
fn the_pyroscope_python_sdk_pushes_to_us() {
    let python = venv_python();
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &[]);
    let script = dir.path().join("app.py");
    std::fs::write(&script, APP).unwrap();
    let t0 = now_ms();
    let status = Command::new(python)
        .arg(&script)
        .arg(&srv.base)
        .arg("12")
        .status()
        .unwrap();
    assert!(status.success());
    let c = client();
    let services: Vec<String> = c
        .get(srv.url("/api/v1/services"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(services, ["pyshop"]);
    let range = format!("from={}&until={}", t0 - 20_000, now_ms() + 20_000);
    let folded = c
        .get(srv.url(&format!("/api/v1/folded?service=pyshop&{range}")))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let hot: i64 = folded
        .lines()
        .filter(|l| l.contains("serve") && l.contains("checkout_total"))
        .map(folded_total)
        .sum();
    let total = folded_total(&folded);
    println!(
        "pyshop: {:.2} s of CPU, {:.0}% in serve;checkout_total",
        total as f64 / 1e9,
        100.0 * hot as f64 / total as f64
    );
    assert!(
        hot as f64 > 0.5 * total as f64,
        "the program's functions make the flame graph:\n{folded}"
    );
    let kinds = c
        .get(srv.url(&format!("/api/v1/timeline?service=pyshop&{range}")))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(kinds.contains("\"cpu\""), "{kinds}");
    for (label, value) in [("region", "eu"), ("handler", "checkout")] {
        let values: Vec<String> = c
            .get(srv.url(&format!("/api/v1/label_values?service=pyshop&name={label}")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert!(values.contains(&value.to_string()), "{label}: {values:?}");
    }
    let filtered = c
        .get(srv.url(&format!(
            "/api/v1/folded?service=pyshop&{range}&filter=handler=checkout"
        )))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        folded_total(&filtered) > 0,
        "the dynamic tag filters the flame graph"
    );
}

const SPANS_APP: &str = r#"
import sys, time, pyroscope
pyroscope.configure(application_name="pyspans", server_address=sys.argv[1], sample_rate=100)
def checkout_total():
    x = 0
    for i in range(200_000):
        x += i * i
    return x
def search_total():
    x = 0
    for i in range(200_000):
        x ^= i * 7
    return x
end = time.time() + float(sys.argv[2])
while time.time() < end:
    with pyroscope.tag_wrapper({"span_id": "aaaaaaaaaaaaaaaa"}):
        checkout_total()
    with pyroscope.tag_wrapper({"span_id": "bbbbbbbbbbbbbbbb"}):
        search_total()
pyroscope.shutdown()
"#;

/// Span ids the real Python SDK sends as tags name requests, not series: each span is a
/// request of the request table, and Grafana's span profile of one holds its function
/// only.
#[test]
fn the_python_sdks_span_ids_answer_span_profiles() {
    let python = venv_python();
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &[]);
    let script = dir.path().join("spans.py");
    std::fs::write(&script, SPANS_APP).unwrap();
    let t0 = now_ms();
    let status = Command::new(python).arg(&script).arg(&srv.base).arg("8").status().unwrap();
    assert!(status.success());
    let c = client();
    let (from, until) = (t0 - 20_000, now_ms() + 20_000);
    let names: Vec<String> = c.get(srv.url("/api/v1/labels?service=pyspans")).send().unwrap().json().unwrap();
    assert!(!names.iter().any(|n| n == "span_id"), "span ids became series: {names:?}");
    let table: serde_json::Value = c
        .get(srv.url(&format!("/api/v1/requests?service=pyspans&from={from}&until={until}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(table["count"], 2, "{table}");
    for (span, mine, other) in [("aaaaaaaaaaaaaaaa", "checkout_total", "search_total"), ("bbbbbbbbbbbbbbbb", "search_total", "checkout_total")] {
        let body = serde_json::json!({
            "profileTypeID": "cpu:cpu:nanoseconds:cpu:nanoseconds",
            "labelSelector": "{service_name=\"pyspans\"}",
            "spanSelector": [span],
            "start": from.to_string(),
            "end": until.to_string(),
        });
        let r = c
            .post(srv.url("/querier.v1.QuerierService/SelectMergeSpanProfile"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let reply: serde_json::Value = r.json().unwrap();
        let fg = &reply["flamegraph"];
        let names: Vec<&str> = fg["names"].as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
        // Levels hold (x offset, total, self, name index) per bar: each function's total.
        let under = |function: &str| -> f64 {
            let mut sum = 0.0;
            for level in fg["levels"].as_array().unwrap() {
                let values: Vec<f64> = level["values"].as_array().unwrap().iter().map(|v| v.as_str().map_or_else(|| v.as_f64().unwrap(), |s| s.parse().unwrap())).collect();
                for bar in values.chunks(4) {
                    if names[bar[3] as usize].contains(function) {
                        sum += bar[1];
                    }
                }
            }
            sum
        };
        let total: f64 = fg["total"].as_str().unwrap().parse().unwrap();
        let (share, wrong) = (under(mine) / total, under(other) / total);
        println!("span {span}: {:.2} s, {:.1}% under {mine}, {:.1}% under {other}", total / 1e9, share * 100.0, wrong * 100.0);
        // The SDK's sampler reads the tags apart from the thread that sets them: a few
        // samples near a switch land in the other span.
        assert!(share >= 0.9 && wrong <= 0.1, "span {span}: {:.1}% under {mine}, {:.1}% under {other}", share * 100.0, wrong * 100.0);
    }
}

fn pprof(stacks: &[(&[&str], i64)], types: &[(&str, &str)]) -> Vec<u8> {
    let mut b =
        profiler_pprof::ProfileBuilder::new(types).time(now_ms() * 1_000_000, 10_000_000_000);
    for (frames, v) in stacks {
        let values: Vec<i64> = (0..types.len() as i64).map(|i| v * (i + 1)).collect();
        b.add(frames, &values, &[]);
    }
    b.build().encode_to_vec()
}

fn series(labels: &[(&str, &str)], profile: Vec<u8>, id: &str) -> RawProfileSeries {
    RawProfileSeries {
        labels: labels
            .iter()
            .map(|(n, v)| LabelPair {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        samples: vec![RawSample {
            raw_profile: profile,
            id: id.into(),
        }],
    }
}

fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(raw).unwrap();
    e.finish().unwrap()
}

#[test]
fn push_protocol_edges() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &["--token", "t"]);
    let c = client();
    let t0 = now_ms();
    let cpu = series(
        &[
            ("service_name", "api"),
            ("__name__", "process_cpu"),
            ("env", "prod"),
        ],
        pprof(
            &[(&["main", "handle"], 30_000_000)],
            &[("cpu", "nanoseconds")],
        ),
        "cpu-1",
    );
    let memory = series(
        &[("service_name", "api"), ("__name__", "memory")],
        pprof(
            &[(&["main", "alloc"], 100)],
            &[("alloc_objects", "count"), ("alloc_space", "bytes")],
        ),
        "mem-1",
    );
    let body = gzip(
        &PushRequest {
            series: vec![cpu, memory],
        }
        .encode_to_vec(),
    );
    let send = |body: Vec<u8>, ct: &str, token: &str| {
        c.post(srv.url("/push.v1.PusherService/Push"))
            .bearer_auth(token)
            .header("content-type", ct)
            .header("content-encoding", "gzip")
            .body(body)
            .send()
            .unwrap()
    };
    assert_eq!(
        send(body.clone(), "application/proto", "wrong").status(),
        401
    );
    let r = send(body.clone(), "application/proto", "t");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/proto");
    // The SDK retries with the same ids: counted once.
    assert_eq!(send(body, "application/proto", "t").status(), 200);
    let range = format!("from={}&until={}", t0 - 60_000, t0 + 60_000);
    let folded = |kind: &str| {
        c.get(srv.url(&format!("/api/v1/folded?service=api&kinds={kind}&{range}")))
            .send()
            .unwrap()
            .text()
            .unwrap()
    };
    assert_eq!(folded("cpu"), "main;handle 30000000\n");
    assert_eq!(folded("alloc_objects"), "main;alloc 100\n");
    assert_eq!(folded("alloc_space"), "main;alloc 200\n");
    let env: Vec<String> = c
        .get(srv.url("/api/v1/label_values?service=api&name=env"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(env, ["prod"]);

    // JSON, as Connect clients may send it.
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .encode(pprof(&[(&["main", "json"], 5)], &[("cpu", "nanoseconds")]));
    let json = format!(
        r#"{{"series":[{{"labels":[{{"name":"service_name","value":"api"}},{{"name":"__name__","value":"process_cpu"}}],"samples":[{{"rawProfile":"{raw}","ID":"json-1"}}]}}]}}"#
    );
    let r = send(gzip(json.as_bytes()), "application/json", "t");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "{}");
    assert!(folded("cpu").contains("main;json 5\n"));

    // Errors come as Connect errors.
    let nameless = gzip(
        &PushRequest {
            series: vec![series(
                &[("__name__", "process_cpu")],
                pprof(&[(&["x"], 1)], &[("cpu", "nanoseconds")]),
                "",
            )],
        }
        .encode_to_vec(),
    );
    let r = send(nameless, "application/proto", "t");
    assert_eq!(r.status(), 400);
    let e: serde_json::Value = r.json().unwrap();
    assert_eq!(e["code"], "invalid_argument");
    assert!(
        e["message"].as_str().unwrap().contains("service_name"),
        "{e}"
    );
    assert_eq!(send(gzip(b"x"), "text/plain", "t").status(), 415);
    assert_eq!(
        send(gzip(b"\xff\xff\xff"), "application/proto", "t").status(),
        400
    );
}
