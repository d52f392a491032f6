//! The agent as a daemon shipping to a real server over loopback.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use profiler_tests::{cgroup_root, now_ms, Daemon, Server, binary, host_alone, host_shared, free_port, require_root};


fn config(dir: &std::path::Path, server_url: &str, spool_bytes: u64) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"[server]
url = "{server_url}"
timeout = "2s"
max_attempts = 2

[sampling]
window = "2s"

[spool]
dir = "{}"
max_bytes = {spool_bytes}

[metrics]
listen = "127.0.0.1:0"

[labels]
env = "test"
"#,
            dir.join("spool").display()
        ),
    )
    .unwrap();
    path
}

/// Tree nodes named `name`, anywhere under `node`: their summed value.
fn value_of(node: &serde_json::Value, name: &str) -> u64 {
    let own = if node["name"] == name { node["value"].as_u64().unwrap_or(0) } else { 0 };
    own + node["children"].as_array().map_or(0, |children| children.iter().map(|c| value_of(c, name)).sum())
}

#[test]
fn workload_in_checkout_service_cgroup_shows_up_as_checkout() {
    let _host = host_alone();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), free_port());
    let agent_config = config(dir.path(), &server.url, 64 << 20);
    // Every switch traced: this test is about naming the service, and at the default
    // budget a host with a fast disk samples the sleeper's few hundred waits at about
    // 10%, which moves its off-CPU total by ±20% from run to run.
    let mut toml = std::fs::read_to_string(&agent_config).unwrap();
    toml.push_str("\n[off_cpu]\nbudget = 1000000\ncpu_budget = \"1s\"\n");
    std::fs::write(&agent_config, toml).unwrap();
    let daemon = Daemon::start(&agent_config);
    let started = now_ms();

    // A cgroup named like a systemd unit, in the unified hierarchy (or the only one).
    let cgroup = format!("{}/checkout.service", cgroup_root());
    std::fs::create_dir_all(&cgroup).expect("create cgroup checkout.service");
    let status = Command::new("sh")
        .args(["-c", &format!("echo $$ > {cgroup}/cgroup.procs && exec {} mixed 4 >/dev/null", binary("workload").display())])
        .env("WORKLOAD_DIR", std::env::temp_dir())
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_secs(5));
    let _ = std::fs::remove_dir(&cgroup);

    let services = server.get_json("/api/v1/services");
    assert!(services.as_array().unwrap().iter().any(|s| s == "checkout"), "no checkout service in {services}");
    let range = format!("service=checkout&from={}&until={}", started - 20_000, now_ms() + 20_000);
    let on_cpu = server.get_json(&format!("/api/v1/flamegraph?{range}&kinds=on-cpu&max_nodes=100000"));
    let sleep = server.get_json(&format!("/api/v1/flamegraph?{range}&kinds=off-cpu:sleep&max_nodes=100000"));
    let burn = value_of(&on_cpu, "workload::burn_cpu") as f64 / 1e9;
    let slept = value_of(&sleep, "workload::wait_sleep") as f64 / 1e9;
    eprintln!("checkout: burn_cpu on-CPU {burn:.2} s, wait_sleep off-CPU {slept:.2} s");
    assert!(burn > 1.0, "burn_cpu on-CPU only {burn:.2} s");
    assert!(slept > 3.0, "wait_sleep off-CPU only {slept:.2} s");
    let labels = server.get_json("/api/v1/labels?service=checkout");
    assert!(labels.as_array().unwrap().iter().any(|l| l == "systemd_unit"), "labels {labels}");
    daemon.stop();
}

/// A cron-like job: a script in its own session running hundreds of short commands,
/// next to a long-lived service in its own cgroup. The commands belong to the script,
/// so the host shows the script and the service, not one service per command.
#[test]
fn short_commands_group_under_their_script() {
    let _host = host_alone();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), free_port());
    let daemon = Daemon::start(&config(dir.path(), &server.url, 64 << 20));
    let started = now_ms();

    let cgroup = format!("{}/inventory.service", cgroup_root());
    std::fs::create_dir_all(&cgroup).expect("create cgroup inventory.service");
    let mut service = Command::new("sh")
        .args(["-c", &format!("echo $$ > {cgroup}/cgroup.procs && exec {} burn 12 1", binary("workload").display())])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // 200 rounds of five different commands, each a few milliseconds of CPU.
    const COMMANDS: [&str; 5] = ["gzip", "sha256sum", "md5sum", "sort", "cksum"];
    let script = dir.path().join("nightly-report.sh");
    std::fs::write(
        &script,
        format!(
            "head -c 300000 /dev/urandom > {data}\n\
             for i in $(seq 200); do\n\
               gzip -c {data} > /dev/null; sha256sum {data} > /dev/null; md5sum {data} > /dev/null\n\
               od -An -tx1 -N 20000 {data} | sort > /dev/null; cksum {data} > /dev/null\n\
             done\n",
            data = dir.path().join("data").display()
        ),
    )
    .unwrap();
    let status = Command::new("setsid").args(["-w", "sh"]).arg(&script).status().unwrap();
    assert!(status.success());
    assert!(service.wait().unwrap().success());
    std::thread::sleep(Duration::from_secs(5));
    let _ = std::fs::remove_dir(&cgroup);
    daemon.stop();

    let services: Vec<String> = server
        .get_json("/api/v1/services")
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    eprintln!("services: {services:?}");
    let range = format!("from={}&until={}&max_nodes=100000", started - 20_000, now_ms() + 20_000);
    let report = server.get_json(&format!("/api/v1/flamegraph?service=nightly-report&{range}"));
    let per_command: Vec<(&str, f64)> =
        COMMANDS.iter().map(|c| (*c, value_of(&report, c) as f64 / 1e9)).collect();
    eprintln!("nightly-report: seconds per command {per_command:?}");
    assert!(services.iter().any(|s| s == "inventory"), "no inventory service in {services:?}");
    let strays: Vec<&String> = services.iter().filter(|s| COMMANDS.contains(&s.as_str()) || *s == "od").collect();
    assert!(strays.is_empty(), "commands of the script became services: {strays:?} (all: {services:?})");
    assert!(
        per_command.iter().filter(|(_, seconds)| *seconds > 0.0).count() >= 4,
        "the script's commands are not under nightly-report: {per_command:?}"
    );
}

/// Sum over every service of everything the server holds in the range.
fn server_total(server: &Server, from: u64, until: u64) -> u64 {
    let services = server.get_json("/api/v1/services");
    services
        .as_array()
        .unwrap()
        .iter()
        .map(|service| {
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("service", service.as_str().unwrap())
                .append_pair("from", &from.to_string())
                .append_pair("until", &until.to_string())
                .append_pair("limit", "1")
                .finish();
            let top = server.get_json(&format!("/api/v1/top?{query}"));
            top["total"].as_u64().unwrap()
        })
        .sum()
}

/// Long enough for every retry of a window to fail and the spool to fill and back off;
/// what is checked is the accounting, which an outage's length does not change.
#[test]
fn a_server_outage_of_twenty_seconds_loses_nothing() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("server");
    let server = Server::start(&data, port);
    let daemon = Daemon::start(&config(dir.path(), &server.url, 256 << 20));
    let started = now_ms();
    std::thread::sleep(Duration::from_secs(6));

    server.stop();
    std::thread::sleep(Duration::from_secs(20));
    assert!(daemon.metric("spool_profiles") > 0.0, "nothing was spooled during the outage");
    let server = Server::start(&data, port);

    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.metric("spool_profiles") > 0.0 {
        assert!(Instant::now() < deadline, "spool not drained a minute after the server came back");
        std::thread::sleep(Duration::from_secs(1));
    }
    let counters = daemon.stop();
    eprintln!("agent counters: {counters:?}");
    assert_eq!(counters["profiles_dropped"], 0);
    assert_eq!(counters["left_in_spool"], 0);
    assert!(counters["profiles_spooled"] > 0);
    assert!(counters["windows"] >= 13, "the agent ran ~30 s in 2 s windows");
    assert_eq!(counters["profiles_shipped"], counters["profiles_produced"]);
    assert_eq!(counters["value_shipped_ns"], counters["value_produced_ns"]);

    let total = server_total(&server, started - 60_000, now_ms() + 60_000);
    assert_eq!(total, counters["value_shipped_ns"], "server holds {total} ns, agent shipped {}", counters["value_shipped_ns"]);
}

#[test]
fn a_server_that_lost_its_data_is_sent_every_stack_again() {
    let _host = host_shared();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (first_data, second_data) = (dir.path().join("first"), dir.path().join("second"));
    let server = Server::start(&first_data, port);
    let daemon = Daemon::start(&config(dir.path(), &server.url, 256 << 20));
    let started = now_ms();
    std::thread::sleep(Duration::from_secs(8));
    assert!(daemon.metric("stacks_shipped_by_id_total") > 0.0, "windows after the first refer to stacks by id");

    // The same address, an empty store: every id the agent sends is unknown there.
    server.stop();
    let server = Server::start(&second_data, port);
    std::thread::sleep(Duration::from_secs(8));
    let counters = daemon.stop();
    eprintln!("agent counters: {counters:?}");
    assert_eq!(counters["profiles_dropped"] + counters["profiles_rejected"] + counters["left_in_spool"], 0);
    assert_eq!(counters["value_shipped_ns"], counters["value_produced_ns"]);
    let second = server_total(&server, started - 60_000, now_ms() + 60_000);
    server.stop();
    let server = Server::start(&first_data, port);
    let first = server_total(&server, started - 60_000, now_ms() + 60_000);
    assert!(first > 0 && second > 0, "both servers got windows: {first} and {second} ns");
    assert_eq!(first + second, counters["value_shipped_ns"], "every window is in one store, whole");
}

#[test]
fn a_full_spool_drops_oldest_and_says_so() {
    // The spool is sized against the windows of a quiet host: with other tests' workloads
    // on it (Python interpreters, custom-labels apps), whole windows ran 12 to 55 kB, none
    // fitted, and nothing was spooled to be dropped oldest first.
    let _host = host_alone();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: every window goes to a spool that holds only a few. A window
    // of this quiet host is one request of 2 to 5 kB.
    let url = format!("http://127.0.0.1:{}", free_port());
    let daemon = Daemon::start(&config(dir.path(), &url, 10_000));
    std::thread::sleep(Duration::from_secs(13));
    let counters = daemon.stop();
    eprintln!("agent counters: {counters:?}");
    let on_disk: u64 = std::fs::read_dir(dir.path().join("spool")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    eprintln!("left in the spool: {} windows, {on_disk} bytes", counters["left_in_spool"]);
    assert!(counters["profiles_dropped"] > 0, "a 10 kB spool should have overflowed");
    assert_eq!(counters["profiles_shipped"], 0);
    // Every profile is accounted for: dropped (oldest first, or alone when larger than the
    // whole spool) or still in the spool.
    assert!(counters["profiles_spooled"] > 0);
    assert_eq!(counters["profiles_produced"], counters["profiles_dropped"] + counters["left_in_spool"]);
    assert!(on_disk <= 10_000, "spool holds {on_disk} bytes");
}

#[test]
fn bad_configs_fail_at_start_with_a_reason() {
    let _host = host_shared();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nurl = \"http://127.0.0.1:1\"\nspeed = 3\n", "unknown field `speed`"),
        ("[server]\nurl = \"http://127.0.0.1:1\"\n[[rules]]\nexe = \"[oops\"\nservice = \"x\"\n", "rules[0].exe: bad regex"),
        ("[server]\nurl = \"http://no-such-host.invalid:4040\"\n", "does not resolve"),
        ("[server]\nurl = \"not a url\"\n", "is not a URL"),
        // `label=name:value` in transit could not carry the name whole.
        ("[server]\nurl = \"http://127.0.0.1:1\"\n[labels]\n\"team:a\" = \"x\"\n", "label name \"team:a\""),
        ("[server]\nurl = \"http://127.0.0.1:1\"\n[[rules]]\ncomm = \"x\"\nlabels = { \"a:b\" = \"c\" }\n", "rules[0].labels"),
        ("[server]\nurl = \"http://127.0.0.1:1\"\n[privileges]\nuser = \"no-such-user-here\"\n", "no user \"no-such-user-here\""),
    ];
    for (text, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let output = Command::new(binary("profiler-agent")).args(["run", "--config", path.to_str().unwrap()]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "accepted bad config {text:?}");
        assert!(stderr.contains(needle), "error for {text:?} should mention {needle:?}: {stderr}");
    }
}
