//! The auth model end to end: scopes per token, browsers kept out of writes
//! from other sites and out of loopback by DNS rebinding, and no open server
//! on the network unless asked for.

use crate::common;

use std::process::{Command, Stdio};

use std::io::{BufRead, BufReader};

use common::{client, now_ms, Proc};

#[test]
fn tokens_have_scopes_and_browsers_cannot_write_cross_site() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(
        dir.path(),
        &[
            "--token",
            "agent",
            "--admin-token",
            "boss",
            "--read-token",
            "viewer",
        ],
    );
    let c = client();
    let t0 = now_ms();
    let ingest = |token: Option<&str>| {
        let url = srv.url(&format!(
            "/api/v1/ingest?service=auth&kind=on-cpu&format=folded&from={t0}"
        ));
        let mut r = c.post(url).body("main;a 1\n");
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().unwrap().status().as_u16()
    };
    assert_eq!(ingest(None), 401);
    assert_eq!(ingest(Some("viewer")), 403);
    assert_eq!(ingest(Some("agent")), 200);
    assert_eq!(ingest(Some("boss")), 200);

    let run = |token: &str| {
        c.post(srv.url("/api/v1/runs"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(
                r#"{"selector":{"service":"auth"},"duration_s":60,"settings":{"frequency_hz":99}}"#,
            )
            .send()
            .unwrap()
    };
    let refused = run("agent");
    assert_eq!(refused.status(), 403, "an agent's token cannot start runs");
    assert!(refused.text().unwrap().contains("admin token"));
    assert_eq!(run("boss").status(), 201);

    let read = |path: &str, token: Option<&str>| {
        let mut r = c.get(srv.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().unwrap().status().as_u16()
    };
    let flame = format!(
        "/api/v1/flamegraph?service=auth&from={}&until={}",
        t0 - 60_000,
        t0 + 60_000
    );
    for path in [
        flame.as_str(),
        "/api/v1/services",
        "/api/v1/runs",
        "/metrics",
    ] {
        assert_eq!(read(path, None), 401, "{path}");
        assert_eq!(read(path, Some("agent")), 403, "{path}");
        assert_eq!(read(path, Some("viewer")), 200, "{path}");
        assert_eq!(read(path, Some("boss")), 200, "{path}");
    }
    assert_eq!(read("/healthz", None), 200);
    assert_eq!(
        read("/", None),
        200,
        "the UI's own files are public; its data is not"
    );

    // A page on another site posting with the victim's browser.
    let r = c
        .post(srv.url("/api/v1/runs"))
        .bearer_auth("boss")
        .header("origin", "https://evil.example")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .post(srv.url(&format!(
            "/api/v1/ingest?service=auth&kind=on-cpu&format=folded&from={t0}"
        )))
        .bearer_auth("agent")
        .header("sec-fetch-site", "cross-site")
        .header("content-type", "text/plain")
        .body("main;evil 1\n")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // DNS rebinding: a foreign name resolving to 127.0.0.1.
    let r = c
        .get(srv.url("/api/v1/services"))
        .header("host", "evil.example")
        .bearer_auth("viewer")
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[test]
fn an_open_server_is_refused_on_the_network_unless_insecure_and_reads_need_tokens_or_public_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_profiler-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "0.0.0.0:0"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without tokens") && err.contains("--insecure"),
        "{err}"
    );

    // Writes need tokens, and reads need read tokens or an explicit --public-reads.
    let out = Command::new(env!("CARGO_BIN_EXE_profiler-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", "0.0.0.0:0", "--token", "t"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without read tokens") && err.contains("--public-reads"), "{err}");

    let starting: [&[&str]; 3] = [&["--insecure"], &["--token", "t", "--read-token", "r"], &["--token", "t", "--public-reads"]];
    for extra in starting {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_profiler-server"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", "0.0.0.0:0"])
            .args(extra.iter().filter(|a| !a.is_empty()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            line.starts_with("listening on 0.0.0.0:"),
            "{extra:?}: {line:?}"
        );
    }
}
