//! Off-CPU time with wait reasons, end to end: real sched_switch tracing, real waits.

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use profiler_tests::{Agent, BpftraceOffCpu, binary, host_alone, read_folded, require_root, sum_where};

/// Every switch traced (no sampling), so the figures are exact up to the 1 ms floor.
const EXACT: &[&str] = &["--off-cpu", "--off-cpu-sampling", "1", "--off-cpu-budget", "100000000", "--off-cpu-cpu-budget", "1000s"];

fn has(frames: &[String], name: &str) -> bool {
    frames.iter().any(|f| f == name)
}

fn kind(frames: &[String]) -> &str {
    frames.first().map(String::as_str).unwrap_or("")
}

fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= tolerance * expected
}

#[test]
fn waits_are_measured_and_classified() {
    let _host = host_alone();
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("out.folded");
    let svg = dir.path().join("out.svg");
    let mut args = vec!["--duration", "300s", "-o", folded.to_str().unwrap(), "--svg", svg.to_str().unwrap()];
    args.extend_from_slice(EXACT);
    let agent = Agent::record(&args);
    let report = profiler_tests::run_workload(&["mixed", "5"]);
    agent.finish();

    let stacks = read_folded(&folded);
    let ours = |f: &[String]| f.get(1).map(String::as_str) == Some("workload");
    let off = |f: &[String]| kind(f).starts_with("[off-cpu:");

    let sleep_off = sum_where(&stacks, |f| ours(f) && off(f) && has(f, "workload::wait_sleep")) as f64 / 1e9;
    let sleep_wall = report["sleep_wall_s"].as_f64().unwrap();
    eprintln!("wait_sleep off-CPU {sleep_off:.3} s, wall {sleep_wall:.3} s");
    assert!(within(sleep_off, sleep_wall, 0.10), "wait_sleep off-CPU {sleep_off:.3} s vs wall {sleep_wall:.3} s");

    let sleep_as_sleep = sum_where(&stacks, |f| ours(f) && kind(f) == "[off-cpu:sleep]" && has(f, "workload::wait_sleep")) as f64 / 1e9;
    assert!(sleep_as_sleep >= 0.9 * sleep_off, "only {sleep_as_sleep:.3} s of wait_sleep classified sleep");

    let burn_on = sum_where(&stacks, |f| ours(f) && kind(f) == "[on-cpu]" && has(f, "workload::burn_cpu")) as f64 / 1e9;
    let burn_cpu = report["burn_cpu_s"].as_f64().unwrap();
    eprintln!("burn_cpu on-CPU {burn_on:.3} s, CPU time {burn_cpu:.3} s");
    assert!(within(burn_on, burn_cpu, 0.15), "burn_cpu on-CPU {burn_on:.3} s vs CPU time {burn_cpu:.3} s");

    let disk_off = sum_where(&stacks, |f| ours(f) && off(f) && has(f, "workload::wait_disk")) as f64;
    let disk_blocked = sum_where(&stacks, |f| ours(f) && kind(f).starts_with("[off-cpu:blocked-") && has(f, "workload::wait_disk")) as f64;
    eprintln!("wait_disk off-CPU {:.3} s, blocked-* {:.3} s", disk_off / 1e9, disk_blocked / 1e9);
    assert!(disk_off > 0.0 && disk_blocked >= 0.5 * disk_off, "wait_disk not mostly blocked-*: {disk_blocked} of {disk_off} ns");

    // The main thread waits in pthread_join for the whole run: one wait spanning several
    // drain windows, which must keep its stack and reason.
    let join = sum_where(&stacks, |f| ours(f) && kind(f) == "[off-cpu:blocked-lock]" && has(f, "futex_wait_[k]")) as f64 / 1e9;
    eprintln!("main thread join wait {join:.3} s");
    assert!(join >= 0.8 * sleep_wall, "long futex wait lost its stack or reason: {join:.3} s");

    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.contains("[off-cpu:sleep]") && svg.contains("[on-cpu]"), "hot/cold SVG lacks kind frames");
}

#[test]
fn oversubscribed_thread_shows_runnable_time() {
    let _host = host_alone();
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("out.folded");
    let mut args = vec!["--duration", "300s", "-o", folded.to_str().unwrap()];
    args.extend_from_slice(EXACT);
    let agent = Agent::record(&args);
    // Twice as many spinning threads as CPUs, whatever the host: each waits for a CPU
    // about half of the time.
    let cpus = std::thread::available_parallelism().unwrap().get();
    let extra = (2 * cpus - 1).to_string();
    let report = profiler_tests::run_workload(&["mixed", "4", &extra]);
    agent.finish();
    let stacks = read_folded(&folded);
    let burn_cpu_runnable = |f: &[String]| f.get(1).map(String::as_str) == Some("workload") && kind(f) == "[off-cpu:runnable]" && has(f, "workload::burn_cpu");
    let runnable = sum_where(&stacks, burn_cpu_runnable) as f64 / 1e9;
    let wall = report["wall_s"].as_f64().unwrap();
    eprintln!("burn_cpu runnable {runnable:.3} s over {wall:.3} s");
    // Preempted by the timer while spinning in user mode: the kernel stack would be the
    // interrupt's return path only, so it is not walked. Preempted in a syscall, it is.
    let first_kernel_frame = |f: &[String]| f.iter().find(|frame| frame.ends_with("_[k]")).cloned();
    let user_only = sum_where(&stacks, |f| burn_cpu_runnable(f) && first_kernel_frame(f).is_none()) as f64 / 1e9;
    let interrupt_paths = sum_where(&stacks, |f| {
        burn_cpu_runnable(f) && first_kernel_frame(f).is_some_and(|frame| frame.starts_with("asm_sysvec_"))
    });
    eprintln!("burn_cpu runnable without a kernel stack {user_only:.3} s");
    assert!(user_only > 0.0, "no preemption in user mode was recorded without its kernel stack");
    assert_eq!(interrupt_paths, 0, "a preemption in user mode has its interrupt's kernel stack walked");
    assert!(runnable >= 0.2 * wall, "burn_cpu waited for a CPU only {runnable:.3} s of {wall:.3} s with {} spinning threads on {cpus} CPUs", 2 * cpus);
}

/// bpftrace sums the same sched_switch off-CPU time per thread, with the same 1 ms floor,
/// over the same run: per-thread totals must agree within 10%.
#[test]
fn off_cpu_totals_agree_with_bpftrace() {
    totals_agree_with_bpftrace(EXACT, "5", 0.10);
}

/// The same with seven switch-outs in ten recorded, each weighted by 10/7: sampling must
/// not bias the totals. Over 10 s, the sleeper has about a thousand waits of 10 ms, the
/// disk thread about 150 of 1 ms or more, of uneven lengths: their estimates spread
/// about 2% and 6% (seen: +0.4 to +1.8%, +6 to +13%), and without the weights both
/// would be 30% short (seen: the sleeper −31%). So 20%: the test fails if the weighting
/// is removed, which at 0.9 and 10% it did only half the time.
#[test]
fn sampled_off_cpu_totals_agree_with_bpftrace() {
    // Quotas off: with them, the sleeper (a rarely-blocking thread) is recorded at p = 1
    // whatever the sampled probability, and only the disk thread would be sampled.
    let settings = [
        "--off-cpu", "--off-cpu-sampling", "0.7", "--off-cpu-thread-quota", "0", "--off-cpu-budget", "100000000",
        "--off-cpu-cpu-budget", "1000s",
    ];
    totals_agree_with_bpftrace(&settings, "10", 0.20);
}

/// Runs the `mixed` workload for `seconds` under the agent with `settings` and bpftrace;
/// each waiting thread's total must be within `tolerance` of bpftrace's.
fn totals_agree_with_bpftrace(settings: &[&str], seconds: &str, tolerance: f64) {
    let _host = host_alone();
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("out.folded");

    let mut workload = Command::new(binary("workload"))
        .args(["--wait", "mixed", seconds])
        .env("WORKLOAD_DIR", std::env::temp_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = workload.id().to_string();
    // The agent's default floor.
    let bpftrace = BpftraceOffCpu::start(workload.id(), Duration::from_millis(1));

    let mut args = vec!["--duration", "300s", "--pid", &pid, "-o", folded.to_str().unwrap()];
    args.extend_from_slice(settings);
    let agent = Agent::record(&args);
    std::thread::sleep(Duration::from_millis(500));
    workload.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let output = workload.wait_with_output().unwrap();
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let theirs = bpftrace.finish();
    agent.finish();

    let stacks = read_folded(&folded);
    for (function, tid_field) in [("workload::wait_sleep", "sleep_tid"), ("workload::wait_disk", "disk_tid")] {
        let ours = sum_where(&stacks, |f| kind(f).starts_with("[off-cpu:") && has(f, function)) as f64;
        let tid = report[tid_field].as_i64().unwrap();
        let reference = theirs.get(&tid).copied().unwrap_or(0.0);
        eprintln!("{function}: ours {:.3} s, bpftrace {:.3} s", ours / 1e9, reference / 1e9);
        assert!(reference > 0.0, "bpftrace saw no off-CPU time for {function} (tid {tid})");
        assert!(within(ours, reference, tolerance), "{function}: ours {ours} ns vs bpftrace {reference} ns");
    }
}
