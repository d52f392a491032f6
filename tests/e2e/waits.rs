//! Wait-duration percentiles end to end: a C service whose `query_db()` sleeps 2 ms
//! in 97 calls of 100 and 60 ms in 3 (one stack), four threads, 40 s under the daemon
//! at default settings, read back from the server's `/api/v1/waits`; bpftrace's
//! histogram of the same threads' switch-outs on the same run is the reference.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use profiler_tests::{agent_config, cgroup_root, free_port, host_alone, native_workload, now_ms, require_root, Bpftrace, Daemon, Server};


/// bpftrace over one process's switch-outs of 1 ms or more: a log2 histogram (µs) for
/// the record, and how many there were and how many lasted 20 ms or more.
const BPFTRACE: &str = r#"tracepoint:sched:sched_switch
{
  if (pid == $1) { @start[args->prev_pid] = nsecs; }
  $s = @start[args->next_pid];
  if ($s != 0) {
    $d = nsecs - $s;
    if ($d >= 1000000) {
      @wait_us = hist($d / 1000);
      @waits = count();
      if ($d >= 20000000) { @long = count(); }
    }
    delete(@start[args->next_pid]);
  }
}
END { clear(@start); }
"#;

#[test]
fn a_query_tail_of_three_percent_shows_as_p99_and_p50_stays_at_two_ms() {
    let _host = host_alone();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let program = native_workload(dir.path());
    let server = Server::start(&dir.path().join("server"), free_port());
    let config = agent_config(dir.path(), &server.url, "", "window = \"2s\"", "");
    let daemon = Daemon::start(&config);
    let started = now_ms();

    // In a cgroup named like a systemd unit: the service is `orders`.
    let cgroup = format!("{}/orders.service", cgroup_root());
    std::fs::create_dir_all(&cgroup).expect("create cgroup orders.service");
    let mut workload = Command::new("sh")
        .args(["-c", &format!("echo $$ > {cgroup}/cgroup.procs && exec {} --wait queries 40", program.display())])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let bpftrace = Bpftrace::start(BPFTRACE, &[workload.id().to_string()]);
    // The shell execs the workload under its own pid, and the workload starts on this
    // line: bpftrace, attached by now, sees all of its waits.
    std::io::Write::write_all(workload.stdin.as_mut().unwrap(), b"go\n").unwrap();
    assert!(workload.wait().unwrap().success());
    let reference = bpftrace.finish();
    let _ = std::fs::remove_dir(&cgroup);
    let counts: HashMap<&str, f64> = reference
        .lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            Some((name.trim_start_matches('@'), value.trim().parse().ok()?))
        })
        .collect();
    eprintln!("bpftrace, the same run:{reference}");
    let (waits, long) = (counts["waits"], counts["long"]);

    // The last window ships 2 s after the workload ends.
    std::thread::sleep(Duration::from_secs(6));
    let range = format!("service=orders&from={}&until={}", started - 20_000, now_ms() + 20_000);
    let v = server.get_json(&format!("/api/v1/waits?{range}&frame=query_db"));
    let ms = |key: &str| v[key].as_f64().unwrap_or(0.0) / 1e6;
    let count = v["count"].as_f64().unwrap();
    let ours_long: f64 = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["le_ns"].as_f64().unwrap() > 20e6)
        .map(|b| b["count"].as_f64().unwrap())
        .sum();
    eprintln!(
        "ours: {count:.0} waits, p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {:.2}% of 20 ms or more; \
         bpftrace: {waits} waits, {:.2}% of 20 ms or more",
        ms("p50_ns"),
        ms("p95_ns"),
        ms("p99_ns"),
        ms("max_ns"),
        100.0 * ours_long / count,
        100.0 * long / waits
    );
    daemon.stop();
    assert!((1.7..=2.5).contains(&ms("p50_ns")), "p50 {v}");
    assert!((51.0..=69.0).contains(&ms("p99_ns")), "p99 {v}");
    assert!((count / waits - 1.0).abs() < 0.15, "{count:.0} waits against bpftrace's {waits}");
    assert!((ours_long / count - long / waits).abs() < 0.01, "the tail's share against bpftrace's");
}
