//! On-CPU sampling, end to end: real BPF programs on this kernel, a real workload.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use profiler_tests::{Agent, PerfRecord, binary, host_alone, perf_folded, read_folded, require_root, self_shares, sum_where};

const HZ: f64 = 99.0;

#[test]
fn burn_cpu_dominates_and_sample_count_matches_cpu_time() {
    let _host = host_alone();
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("out.folded");
    let svg = dir.path().join("out.svg");
    let agent = Agent::record(&["--duration", "300s", "-o", folded.to_str().unwrap(), "--svg", svg.to_str().unwrap()]);
    let report = profiler_tests::run_workload(&["burn", "3"]);
    agent.finish();

    let stacks = read_folded(&folded);
    let process_cpu_s = report["process_cpu_s"].as_f64().unwrap();
    let ours = |frames: &[String]| frames.first().map(String::as_str) == Some("workload");
    let total = sum_where(&stacks, ours) as f64;
    let in_burn = sum_where(&stacks, |f| ours(f) && f.iter().any(|frame| frame == "workload::burn_cpu")) as f64;
    let expected = HZ * process_cpu_s;
    eprintln!("samples {total}, expected {expected:.0} (99 Hz × {process_cpu_s:.2} s CPU), in burn_cpu {:.1}%", 100.0 * in_burn / total);
    assert!(in_burn / total >= 0.80, "only {:.1}% of samples in burn_cpu", 100.0 * in_burn / total);
    assert!((total - expected).abs() <= 0.15 * expected, "{total} samples, expected {expected:.0} ± 15%");

    // Kernel frames, when present, come after user frames and carry the _[k] suffix.
    for (frames, _) in &stacks {
        if let Some(first_kernel) = frames.iter().position(|f| f.ends_with("_[k]")) {
            assert!(frames[first_kernel..].iter().all(|f| f.ends_with("_[k]")), "user frame after kernel frames: {frames:?}");
        }
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("burn_cpu"), "SVG lacks burn_cpu");
}

/// The same run, sampled by us and by `perf record -F 99 -g`: the five hottest functions
/// (self time) must have the same share within 5 percentage points. 16 CPU-seconds give
/// ~1600 samples each, so sampling noise on a share stays under 2 points.
#[test]
fn top_functions_agree_with_perf() {
    let _host = host_alone();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("ours.folded");
    let perf_data = dir.path().join("perf.data");

    let mut workload = Command::new(binary("workload"))
        .args(["--wait", "burn", "8", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = workload.id().to_string();
    let agent = Agent::record(&["--duration", "300s", "--pid", &pid, "-o", folded.to_str().unwrap()]);
    let perf = PerfRecord::start(workload.id(), 99, &perf_data, &["-g"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    workload.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(workload.wait().unwrap().success());
    perf.finish();
    agent.finish();

    let theirs = perf_folded(&perf_data, &[]);
    // perf names the root after the thread; we name it after the process.
    let theirs_shares = self_shares(&theirs, "wl-burn");
    let ours_shares = self_shares(&read_folded(&folded), "workload");

    let mut top: Vec<(&String, &f64)> = theirs_shares.iter().collect();
    top.sort_by(|a, b| b.1.total_cmp(a.1));
    assert!(!top.is_empty(), "perf recorded nothing for the workload");
    for (function, perf_share) in top.into_iter().take(5) {
        let our_share = ours_shares.get(function).copied().unwrap_or(0.0);
        eprintln!("{function}: perf {:.1}%, ours {:.1}%", perf_share * 100.0, our_share * 100.0);
        assert!(
            (perf_share - our_share).abs() <= 0.05,
            "{function}: perf {:.1}% vs ours {:.1}%",
            perf_share * 100.0,
            our_share * 100.0
        );
    }
}

/// The agent reports what its BPF programs cost in the kernel (BPF run-time statistics):
/// with the statistics always on, one run per sample at least, and a run time that is
/// neither zero nor absurd.
#[test]
fn in_kernel_cost_is_reported() {
    let _host = host_alone();
    let (runs, time_ns, samples) = recorded_cost(&["--duration", "300s", "--bpf-stats-share", "1"], &["burn", "1"], |_| {});
    assert!(runs >= samples && samples > 0, "{runs} runs for {samples} samples");
    let per_run = time_ns as f64 / runs as f64;
    assert!(per_run > 100.0 && per_run < 1e6, "{per_run} ns per run");
}

/// At default settings the statistics are on a tenth of the time (the first second of
/// every ten: the kernel counts no run from 3 to 8 s), and the cost is estimated from it:
/// two 10 s cycles of both CPUs burning, whose samples the estimate of runs must match.
#[test]
fn in_kernel_cost_is_estimated_from_a_share_of_the_time() {
    let _host = host_alone();
    let host_wide = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    assert_eq!(
        host_wide.trim(),
        "0",
        "kernel.bpf_stats_enabled is on host-wide (bpftool or a `sysctl -w`): the agent then reads exact costs instead of estimating them, which this test checks; `sysctl -w kernel.bpf_stats_enabled=0` first"
    );
    let (runs, time_ns, samples) = recorded_cost(&["--duration", "20s"], &["burn", "21", "2"], |agent| {
        std::thread::sleep(Duration::from_secs(3));
        let early = agent.bpf_runs();
        std::thread::sleep(Duration::from_secs(5));
        let later = agent.bpf_runs();
        assert!(early > 0, "no run counted while the statistics were on");
        assert_eq!(early, later, "runs counted while the statistics should be off");
    });
    let ratio = runs as f64 / samples as f64;
    assert!((0.7..=1.3).contains(&ratio), "estimated {runs} runs for {samples} samples");
    let per_run = time_ns as f64 / runs as f64;
    assert!(per_run > 100.0 && per_run < 1e6, "{per_run} ns per run");
}

/// Runs of `on_cpu_sample`, their run time and the samples of a recording over `workload`,
/// during which `watch` looks at the agent.
fn recorded_cost(record: &[&str], workload: &[&str], watch: impl FnOnce(&Agent)) -> (u64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let agent = Agent::record(&[record, &["-o", "/dev/null", "--stats", stats.to_str().unwrap()]].concat());
    std::thread::scope(|scope| {
        scope.spawn(|| profiler_tests::run_workload(workload));
        watch(&agent);
    });
    // A recording whose duration ended before the workload did has exited already.
    agent.finish();
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    let counter = |name: &str| stats["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {stats}"));
    let (runs, time_ns, samples) = (counter("bpf_on_cpu_sample_runs"), counter("bpf_on_cpu_sample_run_time_ns"), counter("samples"));
    eprintln!("on_cpu_sample: {runs} runs, {:.0} ns per run, {samples} samples", time_ns as f64 / runs.max(1) as f64);
    (runs, time_ns, samples)
}
