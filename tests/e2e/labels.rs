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

/// The stacks of a folded profile, heaviest first.
fn heaviest_first(text: &str) -> Vec<(Vec<String>, u64)> {
    let mut stacks = parse_folded(text);
    stacks.sort_by(|a, b| b.1.cmp(&a.1));
    stacks
}

/// A service where every 80th request waits 40 ms more in `slow_dependency` (the
/// others 20 to 40 ms), each labelled with its `request_id`, under the daemon at
/// default settings: the request table holds the requests (but those served before
/// the agent found the process), its p99 of total time is within 15% of the app's
/// own, the slowest 1%'s profile has that wait as its largest off-CPU stack, and the
/// rest has it under 5% of their off-CPU time. The request ids make no series.
///
/// The off-CPU CPU budget is 20 ms/s, not the default 5: on this VM a recorded
/// switch-out costs 10 to 25 µs, and at 5 ms/s rate control may lower the per-thread
/// quota below the workers' switch rate, so some waits are sampled and weighted. The
/// totals stay unbiased, but one request's total is then its waits times their weights
/// (a 30 ms sleep counted 150 ms), which no per-request percentile survives. With
/// kernel stacks reused this test passed 5 of 7 runs at 5 ms/s (README, "Slowest
/// requests"): not reliably enough for the suite.
#[test]
fn the_slowest_requests_profile_shows_their_extra_wait() {
    let app = labels_app();
    let _host = host_alone();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), free_port());
    let config = agent_config(dir.path(), &server.url, "", "window = \"2s\"", "[off_cpu]\ncpu_budget = \"20ms\"\n");
    let daemon = Daemon::start(&config);
    let started = now_ms();
    let output = Command::new("setsid").arg(&app).args(["requests", "10", "4"]).output().unwrap();
    assert!(output.status.success());
    let measured: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    std::thread::sleep(Duration::from_secs(5));

    let range = format!("service=labels-app&from={}&until={}", started - 20_000, now_ms() + 20_000);
    let table = server.get_json(&format!("/api/v1/requests?{range}&limit=5"));
    let (served, count) = (measured["served"].as_u64().unwrap(), table["count"].as_u64().unwrap());
    let (app_p99, p99) = (measured["p99_ns"].as_f64().unwrap(), table["total_ns"]["p99"].as_f64().unwrap());
    eprintln!(
        "app: {served} requests, p50 {:.1} ms, p99 {:.1} ms; request table: {count} requests, p50 {:.1} ms, p99 {:.1} ms; slowest {}",
        measured["p50_ns"].as_f64().unwrap() / 1e6,
        app_p99 / 1e6,
        table["total_ns"]["p50"].as_f64().unwrap() / 1e6,
        p99 / 1e6,
        table["requests"][0]
    );
    assert!(count >= served * 95 / 100 && count <= served, "{count} requests in the table, {served} served");
    assert!((p99 - app_p99).abs() <= 0.15 * app_p99, "p99 {:.1} ms against the app's {:.1} ms", p99 / 1e6, app_p99 / 1e6);
    let slowest = &table["requests"][0];
    assert_eq!(slowest["labels"]["endpoint"], "checkout");
    assert_eq!(slowest["key"], "request_id");

    // Every wait of the app is a sleep.
    let waits = format!("{range}&kinds=off-cpu:sleep");
    let slow_text = String::from_utf8(server.get_bytes(&format!("/api/v1/folded?{waits}&requests=slowest:1"))).unwrap();
    let slow = heaviest_first(&slow_text);
    assert!(!slow.is_empty(), "no off-CPU stacks for the slowest 1%:\n{slow_text}");
    assert!(
        slow[0].0.iter().any(|f| f.contains("slow_dependency")),
        "the slowest 1%'s largest off-CPU stack is not the extra wait: {:?}",
        slow[0]
    );
    let rest = heaviest_first(&String::from_utf8(server.get_bytes(&format!("/api/v1/folded?{waits}&requests=rest:1"))).unwrap());
    let (share, total) = share_through(&rest, "slow_dependency");
    eprintln!("slowest 1%: largest off-CPU stack {:.0} ms; rest: {:.2} s off-CPU, {:.1}% under slow_dependency", slow[0].1 as f64 / 1e6, total as f64 / 1e9, share * 100.0);
    assert!(total > 0 && share < 0.05, "the rest has {:.1}% of its off-CPU time under slow_dependency", share * 100.0);

    let names = server.get_json("/api/v1/labels?service=labels-app");
    assert!(!names.as_array().unwrap().iter().any(|n| n == "request_id"), "request ids became series: {names}");
    assert!(daemon.metric("request_snapshots_total") > 0.0);
    daemon.stop();
}

/// The C library of the custom-labels crate (`libcustomlabels.so`, built as its Makefile
/// builds it: TLS descriptors) loaded with `dlopen` by a C program, with glibc left no
/// room for static TLS, so each thread's block of the library is allocated on first use
/// and found through its dynamic thread vector: the kernel reads the labels of (nearly)
/// every sample of the program's labelled thread.
#[test]
fn labels_of_a_dlopened_library_are_read_from_dynamic_tls() {
    let _host = profiler_tests::host_shared();
    let sources = custom_labels_sources();
    let dir = tempfile::tempdir().unwrap();
    let library = dir.path().join("libcustomlabels.so");
    let built = Command::new("g++")
        .args(["-O2", "-ftls-model=global-dynamic", "-mtls-dialect=gnu2", "-fPIC", "-shared", "-o"])
        .arg(&library)
        .arg(sources.join("customlabels.cpp"))
        .status()
        .unwrap();
    assert!(built.success(), "building libcustomlabels.so");
    let app = dir.path().join("app");
    let built = Command::new("gcc")
        .args(["-O2", "-fno-omit-frame-pointer", &format!("-I{}", sources.display()), "-o"])
        .arg(&app)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/labels-app/c/app.c"))
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(built.success(), "building the C app");
    let mut child = Command::new(&app)
        .arg(&library)
        .env("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=0")
        .env("SPIN_SECONDS", "6")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let module: u64 = line.split_whitespace().nth(2).and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("the app printed {line:?}"));
    assert!(module > 0, "the library has no TLS module id: {line:?}");

    let stats = dir.path().join("stats.json");
    let pid = child.id().to_string();
    let agent = profiler_tests::Agent::record(&["--pid", &pid, "--duration", "3s", "-o", "/dev/null", "--stats", stats.to_str().unwrap()]);
    agent.wait();
    child.kill().ok();
    child.wait().unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let counter = |name: &str| stats["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {stats}"));
    let (samples, labelled) = (counter("samples"), counter("labelled_snapshots"));
    eprintln!("module {module}: {labelled} of {samples} samples labelled, {} pending", counter("label_libraries_pending"));
    assert_eq!(counter("label_processes"), 1, "the process was not found to publish labels");
    assert!(samples >= 100, "only {samples} samples");
    // The first samples come before the agent has looked at the process.
    assert!(labelled as f64 >= 0.9 * samples as f64, "{labelled} of {samples} samples labelled");
}

/// OpenTelemetry's thread context (OTEP 4947) with the process context it relies on
/// (OTEP 4719), published by a C service as the two documents specify
/// (`labels-app/c/otel.c`: two threads serving `/checkout` and `/search` in turn, each
/// request with its own trace and span ids, the route an attribute named by the
/// process context's key map). Under the daemon at default settings, filtered by
/// `http_route=/checkout`, at least 95% of the on-CPU time is under `checkout_work`,
/// and the same for `/search`; trace and span ids are not series labels, and the trace
/// names each request in the request table.
#[test]
fn opentelemetry_thread_context_labels_profiles_and_requests() {
    let _host = host_alone();
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("otel-app");
    let built = Command::new("gcc")
        .args(["-O2", "-pthread", "-Wl,--export-dynamic-symbol=otel_thread_ctx_v1", "-o"])
        .arg(&app)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/labels-app/c/otel.c"))
        .status()
        .unwrap();
    assert!(built.success(), "building the OpenTelemetry thread-context app");
    let server = Server::start(&dir.path().join("server"), free_port());
    let config = agent_config(dir.path(), &server.url, "", "window = \"2s\"", "");
    let daemon = Daemon::start(&config);
    let started = now_ms();
    // In a session of its own, the service is named after its binary.
    let output = Command::new("setsid").arg(&app).args(["2", "6"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    std::thread::sleep(Duration::from_secs(5));

    let range = format!("service=otel-app&from={}&until={}", started - 20_000, now_ms() + 20_000);
    let names = server.get_json("/api/v1/labels?service=otel-app");
    let names: Vec<&str> = names.as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
    assert!(names.contains(&"http_route"), "no http_route label on otel-app's profiles: {names:?}");
    assert!(!names.contains(&"trace_id") && !names.contains(&"span_id"), "ids became series labels: {names:?}");
    let served: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // The app's own CPU time, not a fixed floor: on a loaded host (four busy loops on
    // two CPUs) it gets 5.8 s instead of 10.6 s.
    let app_ns = served["cpu_ns"].as_u64().unwrap();
    let mut labelled_ns = 0;
    for (route, function, other) in [("/checkout", "checkout_work", "search_work"), ("/search", "search_work", "checkout_work")] {
        let text = String::from_utf8(server.get_bytes(&format!("/api/v1/folded?{range}&kinds=on-cpu&filter=http_route={route}"))).unwrap();
        let stacks = parse_folded(&text);
        let (share, ns) = share_through(&stacks, function);
        let (wrong, _) = share_through(&stacks, other);
        eprintln!("http_route={route}: {:.2} s on-CPU, {:.1}% under {function}, {:.1}% under {other}", ns as f64 / 1e9, share * 100.0, wrong * 100.0);
        assert!(ns as f64 >= 0.3 * app_ns as f64, "only {:.2} s on-CPU with http_route={route} of the app's {:.2} s", ns as f64 / 1e9, app_ns as f64 / 1e9);
        assert!(share >= 0.95, "http_route={route}: {:.1}% of on-CPU time under {function}", share * 100.0);
        labelled_ns += ns;
    }
    // The context is read from the first samples on: the app's first 2 s unlabelled
    // would leave 67%.
    eprintln!("{:.2} s on-CPU labelled of the app's {:.2} s", labelled_ns as f64 / 1e9, app_ns as f64 / 1e9);
    assert!(labelled_ns as f64 >= 0.8 * app_ns as f64, "{labelled_ns} ns labelled of the app's {app_ns} ns");
    let table = server.get_json(&format!("/api/v1/requests?{range}&limit=3"));
    eprintln!("{} requests served, {} in the request table", served["served"], table["count"]);
    assert!(table["count"].as_u64().unwrap() > 100, "{table}");
    assert_eq!(table["requests"][0]["key"], "trace_id");
    assert!(daemon.metric("labelled_snapshots_total") > 0.0);
    daemon.stop();
}

/// The custom-labels crate's C sources (`customlabels.cpp`, `customlabels.h`), from the
/// copy cargo fetched for the test app.
fn custom_labels_sources() -> PathBuf {
    let metadata = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--filter-platform", "x86_64-unknown-linux-gnu", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/labels-app/Cargo.toml"))
        .output()
        .unwrap();
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).expect("cargo metadata");
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "custom-labels")
        .map(|p| PathBuf::from(p["manifest_path"].as_str().unwrap()).parent().unwrap().join("src"))
        .expect("the custom-labels crate (tests/labels-app depends on it)")
}
