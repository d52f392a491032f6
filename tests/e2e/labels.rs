//! Custom labels, end to end: a Rust service built with Parca's real `custom-labels`
//! crate (`tests/labels-app`) labels each request with its endpoint and a request id;
//! the daemon at default settings ships its profiles to a real server, where each
//! endpoint's profile holds that endpoint's function.

use std::{
    path::PathBuf,
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use profiler_tests::{Daemon, Server, agent_config, free_port, host_alone, now_ms, parse_folded, target_dir};

/// The test app, built on first use (it needs libclang for the crate's bindgen, which
/// `cargo xtask setup` installs, and a target directory of its own).
fn labels_app() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/labels-app/Cargo.toml");
            let target = target_dir().parent().expect("target directory").join("labels-app");
            let status = Command::new(env!("CARGO"))
                .args(["build", "--release", "--quiet", "--manifest-path", manifest, "--target-dir"])
                .arg(&target)
                .status()
                .expect("running cargo");
            assert!(status.success(), "building tests/labels-app failed (libclang-dev is needed: `cargo xtask setup`)");
            target.join("release/labels-app")
        })
        .clone()
}

/// The share of `stacks`' time whose stack passes through `function`, and the time (ns).
fn share_through(stacks: &[(Vec<String>, u64)], function: &str) -> (f64, u64) {
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    let through: u64 = stacks.iter().filter(|(frames, _)| frames.iter().any(|f| f.contains(function))).map(|(_, n)| n).sum();
    (through as f64 / total.max(1) as f64, total)
}

/// Two endpoints on the same threads, each request labelled `endpoint=checkout` or
/// `endpoint=search` while it burns CPU in its own function: filtered by endpoint, at
/// least 95% of each profile's on-CPU time is under that endpoint's function. The
/// request id, a high-cardinality key, is not made a label.
#[test]
fn profiles_filtered_by_a_custom_label_hold_that_requests_work() {
    let app = labels_app();
    let _host = host_alone();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), free_port());
    let config = agent_config(dir.path(), &server.url, "", "window = \"2s\"", "");
    let daemon = Daemon::start(&config);
    let started = now_ms();
    // In a session of its own, the service is named after its binary.
    let status = Command::new("setsid").arg(&app).arg("6").status().unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_secs(5));

    let range = format!("service=labels-app&from={}&until={}&kinds=on-cpu", started - 20_000, now_ms() + 20_000);
    let names = server.get_json("/api/v1/labels?service=labels-app");
    let names: Vec<&str> = names.as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
    assert!(names.contains(&"endpoint"), "no endpoint label on labels-app's profiles: {names:?}");
    assert!(!names.contains(&"request_id"), "request_id became a series label: {names:?}");
    for (endpoint, function, other) in [("checkout", "checkout_work", "search_work"), ("search", "search_work", "checkout_work")] {
        let text = String::from_utf8(server.get_bytes(&format!("/api/v1/folded?{range}&filter=endpoint={endpoint}"))).unwrap();
        let stacks = parse_folded(&text);
        let (share, ns) = share_through(&stacks, function);
        let (wrong, _) = share_through(&stacks, other);
        eprintln!("endpoint={endpoint}: {:.2} s on-CPU, {:.1}% under {function}, {:.1}% under {other}", ns as f64 / 1e9, share * 100.0, wrong * 100.0);
        // Two threads for 6 s, half of each endpoint's.
        assert!(ns >= 2_000_000_000, "only {:.2} s on-CPU with endpoint={endpoint}", ns as f64 / 1e9);
        assert!(share >= 0.95, "endpoint={endpoint}: {:.1}% of on-CPU time under {function}", share * 100.0);
    }
    assert!(daemon.metric("labelled_snapshots_total") > 0.0);
    assert!(daemon.metric("labels_high_cardinality_dropped_total") > 0.0);
    daemon.stop();
}
