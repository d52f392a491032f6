//! Hostile input gets a 4xx with a reason, and the server keeps serving.

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{client, now_ms, Proc};
use profiler_pprof::ProfileBuilder;

struct Case {
    name: &'static str,
    body: Vec<u8>,
    token: Option<&'static str>,
    status: u16,
    reason: &'static str,
}

/// A gzip member of 1 GiB of zeros, compressed by a streaming `gzip` so the
/// test never holds the decompressed gigabyte.
fn gzip_bomb() -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(["-c", "-1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip(1) is needed to build the bomb");
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            stdin.write_all(&zeros).unwrap();
        }
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn many_labels(n: usize) -> Vec<u8> {
    let mut b = ProfileBuilder::new(&[("cpu", "nanoseconds")]);
    for i in 0..n {
        b.add(&["main", "f"], &[1], &[("worker", &i.to_string())]);
    }
    let raw = prost::Message::encode_to_vec(&b.build());
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&raw).unwrap();
    enc.finish().unwrap()
}

#[test]
fn hostile_requests_get_4xx_and_server_survives() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &["--token", "good-token"]);
    let c = client();
    let good = profiler_pprof::encode_gzip(&profiler_pprof::from_folded(
        &[(vec!["main".into(), "work".into()], 10)],
        "cpu",
        "nanoseconds",
        1,
    ));
    let bomb = gzip_bomb();
    assert!(bomb.len() < 8 << 20, "bomb is {} bytes", bomb.len());

    let cases = vec![
        Case {
            name: "no token",
            body: good.clone(),
            token: None,
            status: 401,
            reason: "Bearer",
        },
        Case {
            name: "wrong token",
            body: good.clone(),
            token: Some("bad"),
            status: 401,
            reason: "invalid bearer token",
        },
        Case {
            name: "truncated gzip",
            body: good[..good.len() / 2].to_vec(),
            token: Some("good-token"),
            status: 400,
            reason: "gzip",
        },
        Case {
            name: "invalid protobuf",
            body: vec![0xff; 64],
            token: Some("good-token"),
            status: 400,
            reason: "protobuf",
        },
        Case {
            name: "1 GiB gzip bomb",
            body: bomb,
            token: Some("good-token"),
            status: 413,
            reason: "after decompression",
        },
        Case {
            name: "20,000 distinct labels",
            body: many_labels(20_000),
            token: Some("good-token"),
            status: 400,
            reason: "distinct label sets",
        },
        Case {
            name: "oversized body",
            body: vec![7u8; 17 << 20],
            token: Some("good-token"),
            status: 413,
            reason: "length limit",
        },
    ];
    let t0 = now_ms();
    for case in cases {
        let mut req = c
            .post(srv.url(&format!("/api/v1/ingest?service=victim&from={t0}")))
            .body(case.body);
        if let Some(t) = case.token {
            req = req.bearer_auth(t);
        }
        let r = req
            .send()
            .unwrap_or_else(|e| panic!("{}: request failed: {e}", case.name));
        assert_eq!(r.status().as_u16(), case.status, "{}", case.name);
        let body: serde_json::Value = r
            .json()
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", case.name));
        let msg = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no error field in {body}", case.name));
        assert!(
            msg.contains(case.reason),
            "{}: {msg:?} lacks {:?}",
            case.name,
            case.reason
        );
        let h = c.get(srv.url("/healthz")).send().unwrap();
        assert_eq!(h.status(), 200, "healthz after {}", case.name);
    }

    // Other malformed requests: bad labels, folded syntax, query parameters.
    for (url, body, reason) in [
        (
            "/api/v1/ingest?service=v&format=folded&kind=on-cpu&label=bad%20name:x",
            "a 1",
            "label name",
        ),
        (
            "/api/v1/ingest?service=v&format=folded&kind=on-cpu",
            "a;b notanumber",
            "line 1",
        ),
        ("/ingest?name=v.cpu%7Bbroken", "a 1", "unterminated"),
        ("/api/v1/ingest?format=folded&kind=x", "a 1", "service"),
    ] {
        let r = c
            .post(srv.url(url))
            .bearer_auth("good-token")
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 400, "{url}");
        let msg = r.json::<serde_json::Value>().unwrap()["error"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(msg.contains(reason), "{url}: {msg}");
    }
    for url in [
        "/api/v1/flamegraph?service=v&from=later",
        "/api/v1/top?service=v&by=color",
        "/api/v1/diff?service=v",
    ] {
        let r = c.get(srv.url(url)).send().unwrap();
        assert_eq!(r.status(), 400, "{url}");
    }

    // Nothing from the rejected requests was stored, and good input still works.
    let r = c
        .post(srv.url(&format!("/api/v1/ingest?service=victim&from={t0}")))
        .bearer_auth("good-token")
        .body(good)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let f = srv.folded_around(&c, "victim", t0);
    assert_eq!(f, "main;work 10\n");
    let m = c.get(srv.url("/metrics")).send().unwrap().text().unwrap();
    assert!(
        m.contains("profiler_http_requests_total{route=\"/api/v1/ingest\",status=\"413\"} 2"),
        "{m}"
    );
}

/// One Content-Encoding policy on every route with a body: anything but
/// absent, `identity` or `gzip` is refused with 415 before the body is read
/// (the native and Pyroscope routes used to read `br` bodies as raw bytes).
#[test]
fn every_route_with_a_body_refuses_unknown_content_encodings() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &[]);
    let c = client();
    let routes = [
        ("/api/v1/ingest?service=s&kind=on-cpu&format=folded", "text/plain"),
        ("/ingest?name=s.cpu&format=folded", "text/plain"),
        ("/push.v1.PusherService/Push", "application/json"),
        ("/v1development/profiles", "application/x-protobuf"),
        ("/querier.v1.QuerierService/ProfileTypes", "application/json"),
    ];
    for (route, content_type) in routes {
        let r = c
            .post(srv.url(route))
            .header("content-type", content_type)
            .header("content-encoding", "br")
            .body("main 1\n")
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let body = r.text().unwrap();
        assert_eq!(status, 415, "{route}: {body}");
        assert!(body.contains("gzip or identity"), "{route}: {body}");
    }
}

/// A label name with `:` cannot round-trip through `label=name:value`: every
/// route refuses it rather than store a name the native route would split.
#[test]
fn label_names_with_a_colon_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &[]);
    let c = client();
    let r = c.post(srv.url("/ingest?name=app.cpu%7Bteam%3Aa%3Dx%7D&format=folded")).body("main 1\n").send().unwrap();
    let (status, body) = (r.status().as_u16(), r.text().unwrap());
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("team:a"), "{body}");
    // The native route splits at the first colon: the name is `team`, and it is stored as such.
    let r = c.post(srv.url("/api/v1/ingest?service=s&kind=on-cpu&format=folded&label=team:a:x")).body("main 1\n").send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let labels = c.get(srv.url("/api/v1/labels?service=s")).send().unwrap().text().unwrap();
    assert_eq!(labels, r#"["team"]"#);
}
