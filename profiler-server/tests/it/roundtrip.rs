//! Round trips through the real server: what goes in comes out, via the
//! in-memory buffer and again via Parquet after a restart.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{client, now_ms, Proc};
use profiler_pprof::ProfileBuilder;

const FOLDED: &str = "\
main;handle_request;parse_json 17
main;handle_request;std::vec::Vec<T>::push 3
main;handle_request;write 9
main;idle 120
main;ünïcode;leaf with spaces 5
";

fn query(base: &str, from: i64, until: i64) -> String {
    format!("service={base}&from={from}&until={until}")
}

#[test]
fn pyroscope_folded_in_equals_folded_out() {
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let t0 = (now_ms() / 1000 - 60) * 1000;
    let (from, until) = (t0 - 3_600_000, t0 + 3_600_000);

    let srv = Proc::spawn(dir.path(), &[]);
    let r = c
        .post(srv.url(&format!(
            "/ingest?name=shop.cpu%7Benv%3Dprod%2Chost%3Da%7D&from={}&until={}&format=folded&sampleRate=100&spyName=ebpfspy&units=samples",
            t0 / 1000,
            t0 / 1000 + 10
        )))
        .header("Content-Type", "text/plain")
        .body(FOLDED)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());

    let check = |srv: &Proc| {
        let q = query("shop", from, until);
        let out = c
            .get(srv.url(&format!("/api/v1/folded?{q}&sample_rate=100")))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert_eq!(out, FOLDED);
        // Stored as nanoseconds: 100 Hz -> 10 ms per sample.
        let ns = c
            .get(srv.url(&format!("/api/v1/folded?{q}")))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert_eq!(
            common::folded_total(&ns),
            common::folded_total(FOLDED) * 10_000_000
        );

        let tree: serde_json::Value = c
            .get(srv.url(&format!("/api/v1/flamegraph?{q}&filter=env=prod")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(tree["value"], 154 * 10_000_000i64);
        assert_eq!(tree["children"][0]["name"], "main");
        let none: serde_json::Value = c
            .get(srv.url(&format!("/api/v1/flamegraph?{q}&filter=env=dev")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(none["value"], 0);

        let labels: Vec<String> = c
            .get(srv.url("/api/v1/labels?service=shop"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(labels, ["env", "host"]);
        let services: Vec<String> = c
            .get(srv.url("/api/v1/services"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(services, ["shop"]);
    };
    check(&srv);
    // SIGTERM flushes the buffer into Parquet; the restarted server reads it from there.
    srv.terminate();
    let segments = std::fs::read_dir(dir.path().join("segments"))
        .unwrap()
        .count();
    assert!(segments >= 1, "shutdown should have written a segment");
    let srv = Proc::spawn(dir.path(), &[]);
    check(&srv);
}

fn crafted_profile() -> (profiler_pprof::Profile, i64) {
    let mut b = ProfileBuilder::new(&[("samples", "count"), ("cpu", "nanoseconds")]).period(
        "cpu",
        "nanoseconds",
        10_000_000,
    );
    let stacks: [(&[&str], i64); 4] = [
        (&["runtime.main", "main.main", "main.burnA"], 40),
        (&["runtime.main", "main.main", "main.burnB"], 25),
        (
            &["runtime.main", "main.main", "main.burnB", "runtime.memmove"],
            5,
        ),
        (&["runtime.goexit", "runtime.gcBgMarkWorker"], 3),
    ];
    let mut total = 0;
    for (frames, n) in stacks {
        b.add(frames, &[n, n * 10_000_000], &[("thread", "worker")]);
        total += n * 10_000_000;
    }
    (b.build(), total)
}

/// `go tool pprof -top` headline total, e.g. "730ms".
fn go_total(go: &Path, profile: &Path) -> String {
    let out = Command::new(go)
        .args(["tool", "pprof", "-top"])
        .arg(profile)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| {
            l.split(" of ")
                .nth(1)?
                .strip_suffix(" total")
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no total in:\n{text}"))
}

fn flat_of(go: &Path, profile: &Path, func: &str) -> String {
    let out = Command::new(go)
        .args(["tool", "pprof", "-top"])
        .arg(profile)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.split_whitespace().last() == Some(func))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| panic!("{func} not in:\n{text}"))
}

fn require_go() -> std::path::PathBuf {
    let go = Command::new("sh")
        .args(["-c", "command -v go"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&go.stdout).trim().to_owned();
    assert!(
        go.status.success() && !path.is_empty(),
        "the `go` toolchain is required for the pprof compatibility tests: apt-get install -y golang-go"
    );
    path.into()
}

#[test]
fn crafted_pprof_exports_same_totals() {
    let go = require_go();
    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let (profile, total) = crafted_profile();
    let t0 = now_ms() - 60_000;
    let srv = Proc::spawn(dir.path(), &["--token", "s3cret"]);
    let r = c
        .post(srv.url(&format!("/api/v1/ingest?service=svc&from={t0}&label=host:h1")))
        .bearer_auth("s3cret")
        .body(profiler_pprof::encode_gzip(&profile))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());

    let q = query("svc", t0 - 60_000, t0 + 60_000);
    let exported = c
        .get(srv.url(&format!("/api/v1/pprof?{q}")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let back = profiler_pprof::decode_gzip(&exported, 1 << 30).unwrap();
    let sum: i64 = profiler_pprof::to_stacks(&back)
        .unwrap()
        .iter()
        .map(|s| s.values[0])
        .sum();
    assert_eq!(sum, total);
    // The default kind is the time-valued sample type's name.
    let tl: serde_json::Value = c
        .get(srv.url(&format!("/api/v1/timeline?{q}&step=60000")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        tl["series"]["cpu"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .sum::<i64>(),
        total
    );
    let labels: Vec<String> = c
        .get(srv.url("/api/v1/label_values?service=svc&name=thread"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(labels, ["worker"]);

    let tmp = tempfile::tempdir().unwrap();
    let (orig, ours) = (tmp.path().join("orig.pb.gz"), tmp.path().join("ours.pb.gz"));
    std::fs::write(&orig, profiler_pprof::encode_gzip(&profile)).unwrap();
    std::fs::write(&ours, &exported).unwrap();
    assert_eq!(go_total(&go, &orig), go_total(&go, &ours));
    assert_eq!(
        flat_of(&go, &orig, "main.burnA"),
        flat_of(&go, &ours, "main.burnA")
    );

    // Pyroscope clients send pprof as multipart with a `profile` part.
    let form = reqwest::blocking::multipart::Form::new().part(
        "profile",
        reqwest::blocking::multipart::Part::bytes(profiler_pprof::encode_gzip(&profile))
            .file_name("profile.pprof"),
    );
    let r = c
        .post(srv.url(&format!(
            "/ingest?name=gosvc.cpu&from={}&until={}",
            t0 / 1000,
            t0 / 1000 + 10
        )))
        .bearer_auth("s3cret")
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    let f = c
        .get(srv.url(&format!(
            "/api/v1/folded?{}",
            query("gosvc", t0 - 60_000, t0 + 60_000)
        )))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(common::folded_total(&f), total);
}

const GO_PROGRAM: &str = r#"
package main

import (
	"os"
	"runtime/pprof"
	"time"
)

//go:noinline
func burnA(n int) int { s := 0; for i := 0; i < n; i++ { s += i * i % 7 }; return s }

//go:noinline
func burnB(n int) int { s := 1; for i := 0; i < n; i++ { s = s*31 + i }; return s }

func main() {
	f, err := os.Create(os.Args[1])
	if err != nil { panic(err) }
	if err := pprof.StartCPUProfile(f); err != nil { panic(err) }
	x := 0
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); {
		x += burnA(200000) + burnB(100000)
	}
	pprof.StopCPUProfile()
	f.Close()
	if x == 42 { println(x) }
}
"#;

#[test]
fn real_go_pprof_exports_same_totals() {
    let go = require_go();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("main.go");
    std::fs::write(&src, GO_PROGRAM).unwrap();
    let orig = tmp.path().join("go.pb.gz");
    let out = Command::new(&go)
        .arg("run")
        .arg(&src)
        .arg(&orig)
        .env("GOCACHE", tmp.path().join("gocache"))
        .env("GOPATH", tmp.path().join("gopath"))
        .env("GO111MODULE", "off")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "go run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let c = client();
    let srv = Proc::spawn(dir.path(), &[]);
    let t0 = now_ms() - 60_000;
    let r = c
        .post(srv.url(&format!("/api/v1/ingest?service=goapp&from={t0}")))
        .body(std::fs::read(&orig).unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    let ours = tmp.path().join("ours.pb.gz");
    let bytes = c
        .get(srv.url(&format!(
            "/api/v1/pprof?{}",
            query("goapp", t0 - 60_000, t0 + 60_000)
        )))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    std::fs::write(&ours, &bytes).unwrap();
    assert_eq!(go_total(&go, &orig), go_total(&go, &ours));
    assert_eq!(
        flat_of(&go, &orig, "main.burnA"),
        flat_of(&go, &ours, "main.burnA")
    );
}
