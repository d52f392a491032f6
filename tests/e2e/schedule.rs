//! Scheduled deep-profile runs, from the server's API to the agent's sampling rate.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use profiler_tests::{agent_config, cgroup_root, Daemon, Server, binary, host_alone, free_port, require_root};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn post_json(url: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = reqwest::blocking::Client::new().post(url).json(&body).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(serde_json::Value::Null))
}

/// On-CPU samples per second the agent takes over `seconds`.
/// Samples per second over `windows` whole windows. The agent's counters move once per
/// window, so the count runs from one drain to another: over a fixed number of seconds it
/// would catch one window more or less depending on the phase.
fn sample_rate(daemon: &Daemon, windows: u64) -> f64 {
    let drain_after = |seen: f64| loop {
        let drained = daemon.metric("windows_total");
        if drained > seen {
            return (drained, daemon.metric("samples_total"), std::time::Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (first, samples_before, start) = drain_after(daemon.metric("windows_total"));
    let (_, samples_after, end) = drain_after(first + windows as f64 - 1.0);
    (samples_after - samples_before) / (end - start).as_secs_f64()
}

/// Waits (up to 30 s) until a host reports the schedule's run in `state`; returns the run's id.
fn wait_for_host_state(server: &Server, schedule_id: &serde_json::Value, state: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let runs = server.get_json("/api/v1/runs");
        let run = runs.as_array().unwrap().iter().find(|r| &r["schedule_id"] == schedule_id).cloned();
        if let Some(run) = &run {
            if run["hosts"].as_object().is_some_and(|hosts| hosts.values().any(|h| h["state"] == state)) {
                return run["id"].as_str().unwrap().to_string();
            }
        }
        assert!(std::time::Instant::now() < deadline, "no host reported the run {state} in 30 s: {run:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn scheduled_run_raises_the_rate_then_returns_to_baseline() {
    let _host = host_alone();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("server"), free_port());
    let config = agent_config(dir.path(), &server.url, "poll_interval = \"1s\"", "window = \"2s\"", "[off_cpu]\nenabled = false\n");
    let daemon = Daemon::start(&config);

    // Two threads spinning for the whole test, as the service `deep`: the sample rate is
    // then frequency × 2 CPUs, before, during and after the run.
    let cgroup = format!("{}/deep.service", cgroup_root());
    std::fs::create_dir_all(&cgroup).unwrap();
    let _burners = Kill(
        Command::new("sh")
            .args(["-c", &format!("echo $$ > {cgroup}/cgroup.procs && exec {} burn 60 2", binary("workload").display())])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(5));
    let baseline = sample_rate(&daemon, 2);

    // Misconfigured schedules are refused with a reason.
    let schedules = format!("{}/api/v1/schedules", server.url);
    let spec = |cron: &str, duration: u64, service: &str| {
        serde_json::json!({
            "name": "deep", "cron": cron, "timezone": "UTC", "duration_s": duration,
            "selector": { "service": service },
            "settings": { "frequency_hz": 499, "off_cpu": true, "off_cpu_sampling": 1.0 }
        })
    };
    for (body, needle) in [
        (spec("not a cron", 10, "deep"), "bad cron"),
        (spec("* * * * *", 0, "deep"), "at least 1"),
        (spec("* * * * *", 100_000, "deep"), "exceeds the limit"),
        (spec("* * * * *", 10, "no-such-service"), "unknown service"),
    ] {
        let (status, reply) = post_json(&schedules, body);
        assert_eq!(status, 400, "{reply}");
        assert!(reply["error"].as_str().unwrap().contains(needle), "{reply} should mention {needle}");
    }

    // A run starting in a few seconds, for 10 s, at 499 Hz with off-CPU on.
    let start = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 5;
    let (s, m, h) = (start % 60, start / 60 % 60, start / 3600 % 24);
    let (status, schedule) = post_json(&schedules, spec(&format!("{s} {m} {h} * * *"), 10, "deep"));
    assert_eq!(status, 201, "{schedule}");

    // Measured from the first window end after the agent reports the run running: it
    // reports that once the run's settings are in place, which takes it a poll (1 s) and
    // their application (loading the off-CPU program: 0.6 to 0.8 s here, 1.7 s before
    // the kprobe PMU was checked first), so a fixed delay after the start could take in
    // the window they were applied in, late by that time, and count its samples over
    // half its length (10.7× measured).
    let run_id = wait_for_host_state(&server, &schedule["id"], "running");
    let during = sample_rate(&daemon, 2);
    // The same after the agent reports it done, which it does back at baseline settings.
    wait_for_host_state(&server, &schedule["id"], "done");
    let after = sample_rate(&daemon, 2);
    eprintln!("samples/s: baseline {baseline:.0}, during the run {during:.0}, after {after:.0}");
    let ratio = during / baseline;
    // 499 against 99 Hz is 5.04×; a window whose end is drained late shortens the
    // measured time (the first with off-CPU records symbolizes every process on the host:
    // its end was drained 0.6 s late here, which would read 5.9×).
    assert!((4.0..=6.5).contains(&ratio), "run rate {during:.0}/s is {ratio:.2}× baseline {baseline:.0}/s, want ~5×");
    assert!((0.7..=1.4).contains(&(after / baseline)), "after the run {after:.0}/s vs baseline {baseline:.0}/s");

    // The run is recorded, done, and its profile (with off-CPU time) is queryable.
    let id = run_id;
    let mut state = server.get_json(&format!("/api/v1/runs/{id}"))["state"].clone();
    for _ in 0..20 {
        if state == "done" {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        state = server.get_json(&format!("/api/v1/runs/{id}"))["state"].clone();
    }
    assert_eq!(state, "done", "run {id} not marked done");
    let tree = server.get_json(&format!("/api/v1/runs/{id}/flamegraph"));
    assert!(tree["value"].as_u64().unwrap() > 0, "empty run profile");
    let kinds: Vec<String> = tree["children"].as_array().unwrap().iter().filter_map(|c| c["kind"].as_str().map(String::from)).collect();
    assert!(kinds.iter().any(|k| k.starts_with("off-cpu")), "no off-CPU time in the run's profile: {kinds:?}");

    // "Profile now": an ad-hoc run the agent picks up within a poll.
    let (status, adhoc) = post_json(
        &format!("{}/api/v1/runs", server.url),
        serde_json::json!({ "selector": { "service": "deep" }, "duration_s": 4, "settings": { "frequency_hz": 199, "off_cpu": false } }),
    );
    assert_eq!(status, 201, "{adhoc}");
    let adhoc_id = adhoc["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(8));
    let adhoc = server.get_json(&format!("/api/v1/runs/{adhoc_id}"));
    assert_eq!(adhoc["state"], "done", "{adhoc}");
    assert!(adhoc["hosts"].as_object().unwrap().values().all(|h| h["state"] == "done"), "{adhoc}");

    daemon.stop();
    let _ = std::fs::remove_dir(&cgroup);
}
