//! Overhead benchmarks. Machines are noisy, so every figure is a ratio against a baseline
//! measured in the same round, rounds are interleaved, and the median is reported.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Subcommand;

use crate::{cargo, root};

#[derive(Subcommand)]
pub enum Bench {
    /// On-CPU sampling at 99 Hz vs no profiler, perf record and bpftrace, on a CPU-bound
    /// hashing workload on every core; plus the agent's own CPU and peak RSS.
    AgentOverhead {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Hash rounds per thread (sets the workload's length).
        #[arg(long, default_value_t = 3_000_000_000)]
        iterations: u64,
        /// Another build of the agent to measure in the same rounds (before/after a change).
        #[arg(long)]
        baseline_agent: Option<PathBuf>,
    },
    /// Off-CPU tracing on `perf bench sched pipe` (context-switch heavy, the worst case):
    /// default settings, every switch traced, and the bpftrace equivalent; then default
    /// settings toggled on and off in one agent session (profiler-agent's `off_cpu_toggle`
    /// bench), which pairs runs seconds apart.
    SchedPipe {
        #[arg(long, default_value_t = 15)]
        rounds: usize,
        /// Round trips per run; pinned to one CPU, 200,000 take about 0.6 s: long enough
        /// for the agent's rate control to settle on the load and learn its stacks.
        #[arg(long, default_value_t = 200_000)]
        loops: u64,
        /// Runs per measurement, of which the median counts.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Another build of the agent to measure in the same rounds (before/after a change).
        #[arg(long)]
        baseline_agent: Option<PathBuf>,
    },
    /// The daemon in steady state on a busy host: agent CPU per second, peak RSS, bytes
    /// shipped per window per service, against a real server on loopback.
    Daemon {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Off-CPU time per thread in every window at default settings, with two busy loops
    /// on the host: each rarely-blocking thread of the native `waits` workload against
    /// bpftrace, window by window (profiler-agent's `off_cpu_windows` test, run longer).
    /// Prints the table and the worst window.
    OffCpuWindows {
        #[arg(long, default_value_t = 10)]
        windows: usize,
        #[arg(long, default_value_t = 10.0)]
        window_seconds: f64,
        /// In-kernel CPU budget of the recording, ms per second (the agent's default is 5).
        #[arg(long, default_value_t = 5)]
        cpu_budget_ms: u64,
        /// Per-thread quota (0: uniform sampling, as before quotas).
        #[arg(long, default_value_t = 20)]
        thread_quota: u32,
        /// Switch-outs from one place that reuse its walked kernel stack (0: every one
        /// walked, as before reuse; the agent's default is 15).
        #[arg(long, default_value_t = 15)]
        kernel_stack_reuses: u32,
    },
    /// In-kernel cost per on-CPU sample of CPython processes, by BPF statistics: the
    /// program's run time without reading Python frames and the time reading them,
    /// measured in the same run (the agent times that part while the statistics are on
    /// all the time), for a 40-deep recursion and a shallow request handler
    /// (`tests/python/service.py`), one process pinned to each CPU so nearly every
    /// sample is one of theirs.
    Python {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds recorded per measurement.
        #[arg(long, default_value_t = 4)]
        seconds: u64,
        /// The CPython to run (another version: `$(pyenv root)/versions/3.9.18/bin/python3.9`).
        #[arg(long, default_value = "/usr/bin/python3.11")]
        python: PathBuf,
    },
    /// In-kernel cost per on-CPU sample of reading custom labels, by BPF statistics:
    /// `tests/labels-app` (two threads per CPU burning CPU, built on Parca's
    /// `custom-labels` crate) recorded at 999 Hz in three ways, one after the other each
    /// round: not published (`--no-custom-labels`: the programs' lookup misses, as for
    /// any process that does not opt in), published with no label set (`plain`), and
    /// with its two labels set.
    Labels {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds recorded per measurement.
        #[arg(long, default_value_t = 4)]
        seconds: u64,
    },
    /// The collection server's ingest and query benchmark.
    Server,
    /// Change detection on a steady workload (A/A): the agent records `workload serve
    /// base` for `comparisons + 1` consecutive ranges, and the server compares each range
    /// with the one before at default settings. Prints how many comparisons flag a change.
    ChangesAa {
        #[arg(long, default_value_t = 20)]
        comparisons: usize,
        /// Minutes per range.
        #[arg(long, default_value_t = 3)]
        minutes: u64,
    },
}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::AgentOverhead { rounds, iterations, baseline_agent } => {
            agent_overhead(rounds, iterations, baseline_agent)
        }
        Bench::SchedPipe { rounds, loops, runs, baseline_agent } => sched_pipe(rounds, loops, runs, baseline_agent),
        Bench::Daemon { minutes } => daemon(minutes),
        Bench::ChangesAa { comparisons, minutes } => changes_aa(comparisons, minutes),
        Bench::OffCpuWindows { windows, window_seconds, cpu_budget_ms, thread_quota, kernel_stack_reuses } => {
            let status = crate::cargo_command()
                .args(["test", "-p", "profiler-agent", "--test", "it", "off_cpu_windows", "--", "--nocapture"])
                .env("OFFCPU_WINDOWS", windows.to_string())
                .env("OFFCPU_WINDOW_S", window_seconds.to_string())
                .env("OFFCPU_CPU_BUDGET_MS", cpu_budget_ms.to_string())
                .env("OFFCPU_THREAD_QUOTA", thread_quota.to_string())
                .env("OFFCPU_KERNEL_STACK_REUSES", kernel_stack_reuses.to_string())
                .status()?;
            if !status.success() {
                bail!("a window was off by more than the tolerance (the table above says which)");
            }
            Ok(())
        }
        Bench::Python { rounds, seconds, python: interpreter } => python(rounds, seconds, &interpreter),
        Bench::Labels { rounds, seconds } => labels(rounds, seconds),
        Bench::Server => {
            cargo(&["bench", "-p", "profiler-server", "--bench", "server"])?;
            cargo(&["bench", "-p", "profiler-server", "--bench", "real_profiles"])?;
            cargo(&["bench", "-p", "profiler-server", "--bench", "fleet"])
        }
    }
}

fn python(rounds: usize, seconds: u64, interpreter: &Path) -> anyhow::Result<()> {
    let (agent, _) = release_binaries()?;
    let service = root().join("tests/python/service.py");
    let dir = std::env::temp_dir().join(format!("xtask-bench-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let stats = dir.join("stats.json");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("python: {rounds} rounds of {seconds} s at 999 Hz, one service.py per CPU ({cpus}), {}", interpreter.display());
    for mode in ["recursive", "cpu"] {
        let (mut python_ns, mut native_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let services: Vec<Child> = (0..cpus)
                .map(|cpu| {
                    Command::new("taskset")
                        .args(["-c", &cpu.to_string()])
                        .arg(interpreter)
                        .arg(&service)
                        .args([&(seconds + 3).to_string(), mode])
                        .stdout(Stdio::null())
                        .spawn()
                })
                .collect::<Result<_, _>>()?;
            std::thread::sleep(Duration::from_millis(500));
            // Statistics on all the time: the agent then also times the Python part.
            let status = Command::new(&agent)
                .args(["record", "--frequency", "999", "--duration", &format!("{seconds}s"), "--bpf-stats-share", "1", "--stats"])
                .arg(&stats)
                .stderr(Stdio::null())
                .status()?;
            for mut child in services {
                child.wait()?;
            }
            if !status.success() {
                bail!("the agent failed: {status}");
            }
            let counters: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats)?)?;
            let counter = |name: &str| counters["counters"][name].as_f64().unwrap_or(0.0);
            let runs = counter("bpf_on_cpu_sample_runs").max(1.0);
            let python = counter("python_ns");
            // Per sample: what the program costs without the Python part, and the Python
            // part per sample that carried frames.
            let native = (counter("bpf_on_cpu_sample_run_time_ns") - python) / runs;
            let per_python_sample = python / counter("python_stacks").max(1.0);
            python_ns.push(per_python_sample);
            native_ns.push(native);
            ratios.push((native + per_python_sample) / native);
        }
        println!(
            "  {mode}: {:.0} ns per sample without the Python part, {:.0} ns for its Python frames (medians); a Python sample costs {:.2}x a native one (median of rounds, {:.2}..{:.2})",
            median(&mut native_ns),
            median(&mut python_ns),
            median(&mut ratios.clone()),
            ratios.iter().cloned().fold(f64::MAX, f64::min),
            ratios.iter().cloned().fold(0.0, f64::max),
        );
    }
    Ok(())
}

fn labels(rounds: usize, seconds: u64) -> anyhow::Result<()> {
    let (agent, _) = release_binaries()?;
    let target = root().join("target/labels-app");
    crate::run(
        crate::cargo_command()
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(root().join("tests/labels-app/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target),
    )?;
    let app = target.join("release/labels-app");
    let dir = std::env::temp_dir().join(format!("xtask-bench-labels-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let stats = dir.join("stats.json");
    let threads = 2 * std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("labels: {rounds} rounds of {seconds} s at 999 Hz, labels-app with {threads} threads");
    // (name, app mode, agent flags)
    let variants: [(&str, &str, &[&str]); 3] =
        [("not published", "plain", &["--no-custom-labels"]), ("published, no label set", "plain", &[]), ("two labels set", "labels", &[])];
    let mut per_sample: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut labelled: Vec<f64> = vec![0.0; variants.len()];
    for _ in 0..rounds {
        for (i, (_, mode, flags)) in variants.iter().enumerate() {
            let mut child = Command::new(&app)
                .args([(seconds + 2).to_string().as_str(), threads.to_string().as_str(), mode])
                .stdout(Stdio::null())
                .spawn()?;
            let status = Command::new(&agent)
                .args(["record", "--pid", &child.id().to_string(), "--frequency", "999", "--duration", &format!("{seconds}s")])
                .args(*flags)
                .args(["--bpf-stats-share", "1", "-o", "/dev/null", "--stats"])
                .arg(&stats)
                .stderr(Stdio::null())
                .status()?;
            child.wait()?;
            if !status.success() {
                bail!("the agent failed: {status}");
            }
            let counters: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats)?)?;
            let counter = |name: &str| counters["counters"][name].as_f64().unwrap_or(0.0);
            per_sample[i].push(counter("bpf_on_cpu_sample_run_time_ns") / counter("bpf_on_cpu_sample_runs").max(1.0));
            labelled[i] = counter("labelled_snapshots") / counter("samples").max(1.0);
        }
    }
    let baseline = median(&mut per_sample[0].clone());
    for (i, (name, _, _)) in variants.iter().enumerate() {
        let ns = median(&mut per_sample[i].clone());
        println!(
            "  {name:<24} {ns:>6.0} ns per sample (median of rounds), {:.3}x not published; {:.0}% of the last round's samples carried labels",
            ns / baseline,
            labelled[i] * 100.0
        );
    }
    Ok(())
}

fn release_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    cargo(&["build", "--release", "-p", "profiler-agent", "-p", "profiler-workload", "--bins"])?;
    let dir = root().join("target/release");
    Ok((dir.join("profiler-agent"), dir.join("workload")))
}

/// A profiler to run in the background for the length of one measurement: its command
/// line and the text it prints once attached (perf prints nothing: it gets a second).
struct Profiler(Vec<String>, Option<&'static str>);

struct Running {
    child: Child,
    /// Highest RssAnon seen (KiB): the profiler's own memory, without mapped binaries.
    peak_anon_kib: std::sync::Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
    /// CPU seconds used before the measurement (start-up), excluded from `cpu_per_s`.
    cpu_at_start: f64,
}

impl Profiler {
    /// Starts the profiler and waits until it reports it is attached (`ready` on stderr or
    /// stdout), so start-up cost is not part of the measurement.
    fn start(&self) -> anyhow::Result<Running> {
        let Profiler(argv, ready) = self;
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))?;
        let (send, recv) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = send.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(ready) = ready {
            match recv.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(ready) => break,
                Ok(_) => {}
                Err(_) => bail!("{} did not become ready", argv[0]),
            }
        }
        if ready.is_none() {
            std::thread::sleep(Duration::from_secs(1));
        }
        // Let it settle (first drains, symbol loading) before measuring steady state.
        std::thread::sleep(Duration::from_secs(2));
        let cpu_at_start = process_cpu_seconds(child.id())?;
        let peak_anon_kib = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (peak, pid) = (peak_anon_kib.clone(), child.id());
        std::thread::spawn(move || {
            // Ends when the process is gone and its status file with it.
            while std::path::Path::new(&format!("/proc/{pid}/status")).exists() {
                peak.fetch_max(status_kib(pid, "RssAnon:") as u64, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Ok(Running { child, peak_anon_kib, started: Instant::now(), cpu_at_start })
    }
}

impl Drop for Running {
    /// A failed round must not leave a profiler attached to the host.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Turns on the kernel's BPF run-time statistics for `body`, so the cost of every BPF
/// program is measured exactly (run_time_ns / run_cnt), and restores the setting after.
fn with_bpf_stats<T>(body: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
    let before = std::fs::read_to_string(SYSCTL).unwrap_or_default();
    if std::fs::write(SYSCTL, "1").is_err() {
        eprintln!("cannot enable {SYSCTL}: in-kernel cost per run is not reported");
    }
    let result = body();
    if !before.trim().is_empty() {
        let _ = std::fs::write(SYSCTL, before.trim());
    }
    result
}

/// Nanoseconds per run of each BPF program a process holds, by program type, from the
/// `run_time_ns` and `run_cnt` of its descriptors' fdinfo.
fn bpf_costs(pid: u32) -> Vec<(&'static str, f64, u64)> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return Vec::new() };
    let mut costs = Vec::new();
    for fd in fds.filter_map(Result::ok) {
        let Ok(info) = std::fs::read_to_string(fd.path()) else { continue };
        let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
        let (Some(kind), Some(ns), Some(runs)) = (field("prog_type:"), field("run_time_ns:"), field("run_cnt:")) else { continue };
        let kind = match kind {
            5 => "tracepoint",
            7 => "perf_event",
            17 => "raw_tracepoint",
            _ => "other",
        };
        if runs > 0 {
            costs.push((kind, ns as f64 / runs as f64, runs));
        }
    }
    costs
}

/// CPU seconds and peak RSS (KiB) of a profiler process, stopped with SIGINT.
struct Usage {
    cpu_per_s: f64,
    max_rss_kib: i64,
    peak_anon_kib: u64,
    /// ns per run and runs, per BPF program type.
    bpf: Vec<(&'static str, f64, u64)>,
}

fn stop(running: Running) -> anyhow::Result<Usage> {
    let pid = running.child.id() as i32;
    let bpf = bpf_costs(pid as u32);
    // Reaped here with wait4 for its rusage; the guard must not signal a reused pid.
    let running = std::mem::ManuallyDrop::new(running);
    let wall = running.started.elapsed().as_secs_f64();
    unsafe { libc::kill(pid, libc::SIGINT) };
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // bpftrace has been seen to sit out a SIGINT: it gets a SIGKILL after 20 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) } {
            0 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            0 => {
                eprintln!("pid {pid} ignored SIGINT for 20 s, killing it");
                unsafe { libc::kill(pid, libc::SIGKILL) };
                if unsafe { libc::wait4(pid, &mut status, 0, &mut usage) } < 0 {
                    bail!("wait4 failed");
                }
                break;
            }
            n if n < 0 => bail!("wait4 failed"),
            _ => break,
        }
    }
    let cpu = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let steady = cpu(usage.ru_utime) + cpu(usage.ru_stime) - running.cpu_at_start;
    let peak_anon_kib = running.peak_anon_kib.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Usage { cpu_per_s: steady / wall, max_rss_kib: usage.ru_maxrss, peak_anon_kib, bpf })
}

/// utime + stime of a live process, from /proc/PID/stat.
fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised comm, which may itself contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').context("malformed stat")?.1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The fastest of all these runs.
fn fastest<'a>(runs: impl Iterator<Item = &'a Vec<f64>>) -> f64 {
    runs.flatten().copied().fold(f64::INFINITY, f64::min)
}

fn timed(command: &mut Command) -> anyhow::Result<f64> {
    let start = Instant::now();
    let status = command.stdout(Stdio::null()).status()?;
    if !status.success() {
        bail!("{command:?} failed");
    }
    Ok(start.elapsed().as_secs_f64())
}

struct Contender {
    name: &'static str,
    profiler: Profiler,
    /// Each round: the workload's runs alone, just before, and then under this profiler.
    pairs: Vec<(Vec<f64>, Vec<f64>)>,
    usage: Vec<Usage>,
}

impl Contender {
    fn new(name: &'static str, profiler: Profiler) -> Self {
        Self { name, profiler, pairs: Vec::new(), usage: Vec::new() }
    }
}

/// Runs `rounds` rounds in which each contender (in an order that rotates) is measured
/// right after a baseline of its own: on a VM whose neighbours slow it down for seconds
/// at a time, a pair close in time shares the disturbance that two runs minutes apart do
/// not. `workload` returns the figures of one or more runs, where lower is better
/// (seconds, or µs per operation); their median is the measurement's.
/// Every profiler runs at its own settings: the agent turns the kernel's BPF statistics
/// on a tenth of the time, bpftrace not at all. Then one more run each with the
/// statistics on, for the in-kernel cost per program run.
fn compare(contenders: &mut [Contender], rounds: usize, workload: impl Fn() -> anyhow::Result<Vec<f64>>) -> anyhow::Result<()> {
    let figure = |runs: &[f64]| median(&mut runs.to_vec());
    workload()?; // warm caches
    for round in 0..rounds {
        let count = contenders.len();
        let mut line = Vec::new();
        for index in (0..count).map(|i| (i + round) % count) {
            let contender = &mut contenders[index];
            let baseline = workload()?;
            let running = contender.profiler.start()?;
            let runs = workload()?;
            contender.usage.push(stop(running)?);
            line.push(format!("{} {:+.1}%", contender.name, (figure(&runs) / figure(&baseline) - 1.0) * 100.0));
            contender.pairs.push((baseline, runs));
        }
        eprintln!("round {}/{rounds}: {}", round + 1, line.join(", "));
    }
    let mut kernel_costs = Vec::new();
    with_bpf_stats(|| {
        for contender in contenders.iter() {
            let running = contender.profiler.start()?;
            workload()?;
            kernel_costs.push(stop(running)?.bpf);
        }
        Ok(())
    })?;
    // The fastest run under a contender against the fastest of its own baselines (as many
    // runs): on a VM that switches between a fast and a slow state for seconds at a time,
    // both are in the fast state, so their ratio is the profiler's cost in one state of the
    // machine, where the medians of a pair may straddle two.
    println!(
        "{:<30} {:>16} {:>18} {:>13} {:>14} {:>14} {:>16}  in-kernel ns/run (BPF statistics on)",
        "profiler", "median slowdown", "spread (min..max)", "fastest runs", "own CPU/s", "peak RSS", "peak heap (anon)"
    );
    let percent = |ratio: f64| format!("{:.1}%", (ratio - 1.0) * 100.0);
    for (index, contender) in contenders.iter().enumerate() {
        let mut ratios: Vec<f64> = contender.pairs.iter().map(|(baseline, runs)| figure(runs) / figure(baseline)).collect();
        let slowdown = median(&mut ratios);
        let spread = format!("{}..{}", percent(ratios[0]), percent(ratios[ratios.len() - 1]));
        let mut cpu: Vec<f64> = contender.usage.iter().map(|u| u.cpu_per_s).collect();
        let rss = contender.usage.iter().map(|u| u.max_rss_kib).max().unwrap_or(0);
        let anon = contender.usage.iter().map(|u| u.peak_anon_kib).max().unwrap_or(0);
        let cpu = if cpu.is_empty() { "-".to_string() } else { format!("{:.2} ms", median(&mut cpu) * 1e3) };
        let bpf: Vec<String> = kernel_costs[index].iter().map(|(kind, ns, _)| format!("{kind} {ns:.0}")).collect();
        println!(
            "{:<30} {:>16} {:>18} {:>13} {:>14} {:>11.1} MB {:>13.1} MB  {}",
            contender.name,
            percent(slowdown),
            spread,
            percent(fastest(contender.pairs.iter().map(|(_, runs)| runs)) / fastest(contender.pairs.iter().map(|(baseline, _)| baseline))),
            cpu,
            rss as f64 / 1024.0,
            anon as f64 / 1024.0,
            if bpf.is_empty() { "-".to_string() } else { bpf.join(", ") }
        );
    }
    Ok(())
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn agent_overhead(rounds: usize, iterations: u64, baseline_agent: Option<PathBuf>) -> anyhow::Result<()> {
    let (agent, workload) = release_binaries()?;
    let agent = agent.to_string_lossy().into_owned();
    let cpus = std::thread::available_parallelism()?.get().to_string();
    let perf_data = std::env::temp_dir().join("xtask-bench-perf.data");
    let mut contenders = vec![
        Contender::new("profiler-agent 99 Hz", Profiler(argv(&[&agent, "record", "--duration", "1h", "--frequency", "99", "-o", "/dev/null"]), Some("sampling started"))),
        Contender::new("perf record -F 99 -a -g", Profiler(argv(&["perf", "record", "-F", "99", "-a", "-g", "-o", perf_data.to_str().unwrap(), "--", "sleep", "3600"]), None)),
        Contender::new("bpftrace profile:hz:99", Profiler(argv(&["bpftrace", "-e", "profile:hz:99 { @[kstack, ustack, pid] = count(); }"]), Some("Attaching"))),
    ];
    if let Some(baseline) = baseline_agent {
        let baseline = baseline.to_string_lossy().into_owned();
        contenders.push(Contender::new("baseline agent 99 Hz", Profiler(argv(&[&baseline, "record", "--duration", "1h", "--frequency", "99", "-o", "/dev/null"]), Some("sampling started"))));
    }
    println!("agent overhead: hashing {iterations} rounds on each of {cpus} threads, {rounds} interleaved rounds");
    compare(&mut contenders, rounds, || Ok(vec![timed(Command::new(&workload).args(["hash", &iterations.to_string(), &cpus]))?]))?;
    let _ = std::fs::remove_file(perf_data);
    Ok(())
}

fn sched_pipe(rounds: usize, loops: u64, runs: usize, baseline_agent: Option<PathBuf>) -> anyhow::Result<()> {
    let (agent, _) = release_binaries()?;
    let agent = agent.to_string_lossy().into_owned();
    let offcpu_bt = r#"tracepoint:sched:sched_switch { if (args->prev_pid != 0) { @start[args->prev_pid] = nsecs; @ks[args->prev_pid] = kstack; @us[args->prev_pid] = ustack; } $s = @start[args->next_pid]; if ($s != 0) { @[@ks[args->next_pid], @us[args->next_pid]] = sum(nsecs - $s); delete(@start[args->next_pid]); } }"#;
    let mut contenders = vec![
        Contender::new("agent --off-cpu (default)", Profiler(argv(&[&agent, "record", "--duration", "1h", "--off-cpu", "-o", "/dev/null"]), Some("sampling started"))),
        Contender::new("agent --off-cpu every switch", Profiler(
                argv(&[&agent, "record", "--duration", "1h", "--off-cpu", "--off-cpu-sampling", "1", "--off-cpu-budget", "100000000", "--off-cpu-cpu-budget", "1000s", "-o", "/dev/null"]),
                Some("sampling started"),
            )),
        Contender::new("bpftrace offcputime", Profiler(argv(&["bpftrace", "-e", offcpu_bt]), Some("Attaching"))),
    ];
    if let Some(baseline) = baseline_agent {
        let baseline = baseline.to_string_lossy().into_owned();
        contenders.push(Contender::new("baseline agent --off-cpu", Profiler(argv(&[&baseline, "record", "--duration", "1h", "--off-cpu", "-o", "/dev/null"]), Some("sampling started"))));
    }
    // Both ends on one CPU: unpinned, the scheduler's placement varies more between runs
    // than any profiler's cost. Several runs, of which the median: a neighbour's burst on
    // the VM slows a few of them, not the figure.
    println!("sched pipe: median µs per round trip of {runs} runs of `taskset -c 0 perf bench sched pipe -l {loops}`, {rounds} interleaved rounds");
    compare(&mut contenders, rounds, || {
        (0..runs).map(|_| sched_pipe_run(loops)).collect()
    })?;
    // Defaults cost a few percent, less than this machine's swings between the rounds
    // above: one session toggling off-CPU tracing pairs runs seconds apart instead.
    cargo(&["bench", "-p", "profiler-agent", "--bench", "off_cpu_toggle"])
}

/// µs per round trip of one pinned `perf bench sched pipe`, as it reports it: the loop
/// alone, without starting its two processes.
fn sched_pipe_run(loops: u64) -> anyhow::Result<f64> {
    let out = Command::new("taskset").args(["-c", "0", "perf", "bench", "sched", "pipe", "-l", &loops.to_string()]).output()?;
    if !out.status.success() {
        bail!("perf bench sched pipe failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| line.trim().strip_suffix("usecs/op")?.trim().parse().ok())
        .with_context(|| format!("no usecs/op in perf bench's output: {text}"))
}

/// Scrapes one value from a Prometheus text page.
fn scrape(url: &str, name: &str) -> anyhow::Result<f64> {
    let out = Command::new("curl").args(["-sf", url]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {name} at {url}"))
}

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// A release `profiler-server` on loopback with its data under `dir`, stopped when dropped.
struct BenchServer(Child);

impl BenchServer {
    fn start(bin: &std::path::Path, dir: &std::path::Path, port: u16) -> anyhow::Result<BenchServer> {
        let child = Command::new(bin.join("profiler-server"))
            .args(["--data-dir", dir.join("server").to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(1));
        Ok(BenchServer(child))
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn daemon(minutes: u64) -> anyhow::Result<()> {
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let bin = root().join("target/release");
    let dir = std::env::temp_dir().join(format!("xtask-bench-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = 24040;
    let server = BenchServer::start(&bin, &dir, port)?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!("[server]\nurl = \"http://127.0.0.1:{port}\"\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:29464\"\n", dir.join("spool").display()),
    )?;
    let agent = Profiler(argv(&[bin.join("profiler-agent").to_str().unwrap(), "run", "--config", config.to_str().unwrap()]), Some("agent running")).start()?;
    let agent_pid = agent.child.id();
    // A busy host: three spinning threads on the CPUs, a sleeper and synchronous disk I/O.
    let mut load = Command::new(bin.join("workload"))
        .args(["mixed", &(minutes * 60 + 30).to_string(), "2"])
        .env("WORKLOAD_DIR", &dir)
        .stdout(Stdio::null())
        .spawn()?;
    let metrics = "http://127.0.0.1:29464/metrics";
    let start_cpu = scrape(metrics, "profiler_agent_cpu_seconds_total")?;
    let start_bytes = scrape(metrics, "profiler_agent_bytes_shipped_total")?;
    let start_windows = scrape(metrics, "profiler_agent_windows_total")?;
    let started = Instant::now();
    let mut peak_anon: f64 = 0.0;
    while started.elapsed() < Duration::from_secs(minutes * 60) {
        std::thread::sleep(Duration::from_secs(5));
        peak_anon = peak_anon.max(status_kib(agent_pid, "RssAnon:"));
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = scrape(metrics, "profiler_agent_cpu_seconds_total")? - start_cpu;
    let bytes = scrape(metrics, "profiler_agent_bytes_shipped_total")? - start_bytes;
    let windows = scrape(metrics, "profiler_agent_windows_total")? - start_windows;
    let switches = scrape(metrics, "profiler_agent_off_cpu_sampling_ratio")?;
    let peak_rss = status_kib(agent_pid, "VmHWM:");
    let usage = stop(agent)?;
    let _ = load.kill();
    let _ = load.wait();
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    println!("daemon steady state: {minutes} min, off-CPU on (default settings), 10 s windows, busy host");
    println!("  agent CPU:                 {:.1} ms per second ({:.2}% of one CPU)", cpu / seconds * 1e3, cpu / seconds * 100.0);
    println!("  peak RSS (VmHWM):          {:.1} MB (heap RssAnon peak {:.1} MB)", peak_rss / 1024.0, peak_anon / 1024.0);
    println!("  shipped:                   {:.0} bytes per window (one request each)", bytes / windows.max(1.0));
    println!("  off-CPU sampling at end:   {:.3}", switches);
    println!("  (agent CPU over the whole run incl. start-up: {:.1} ms/s)", usage.cpu_per_s * 1e3);
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("curl").args(["-sf", url]).output()?;
    anyhow::ensure!(out.status.success(), "GET {url} failed: {}", out.status);
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn changes_aa(comparisons: usize, minutes: u64) -> anyhow::Result<()> {
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let bin = root().join("target/release");
    let dir = std::env::temp_dir().join(format!("xtask-bench-changes-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = 24041;
    let server_url = format!("http://127.0.0.1:{port}");
    let server = BenchServer::start(&bin, &dir, port)?;
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nurl = \"{server_url}\"\n[spool]\ndir = \"{}\"\n[[rules]]\nexe = \"/workload$\"\nservice = \"aa-shop\"\n",
            dir.join("spool").display()
        ),
    )?;
    let agent = Profiler(argv(&[bin.join("profiler-agent").to_str().unwrap(), "run", "--config", config.to_str().unwrap()]), Some("agent running")).start()?;
    const WINDOW_MS: i64 = 10_000;
    let range_ms = minutes as i64 * 60_000;
    // The first whole window after a minute of warm-up: the workload's start is not steady.
    let warmup_s = 60;
    let seconds = warmup_s + (comparisons as u64 + 1) * minutes * 60 + 30;
    let started = now_ms();
    let mut load = Command::new(bin.join("workload"))
        .args(["serve", &seconds.to_string(), "base"])
        .env("WORKLOAD_DIR", &dir)
        .stdout(Stdio::null())
        .spawn()?;
    let first = (started + warmup_s as i64 * 1000).div_euclid(WINDOW_MS) * WINDOW_MS + WINDOW_MS;
    let ranges: Vec<(i64, i64)> = (0..=comparisons as i64).map(|i| (first + i * range_ms, first + (i + 1) * range_ms)).collect();
    println!("changes A/A: workload serve base, {comparisons} comparisons of consecutive {minutes}-minute ranges, default settings");
    let mut flagged = 0;
    for (i, pair) in ranges.windows(2).enumerate() {
        let (base, target) = (pair[0], pair[1]);
        // Wait until the target range is over and its last window has been shipped.
        while now_ms() < target.1 + 2 * WINDOW_MS {
            std::thread::sleep(Duration::from_secs(5));
        }
        let v = get_json(&format!(
            "{server_url}/api/v1/changes?service=aa-shop&from={}&until={}&base_from={}&base_until={}",
            target.0, target.1, base.0, base.1
        ))?;
        let significant: Vec<String> = v["changes"]
            .as_array()
            .context("no changes in reply")?
            .iter()
            .filter(|c| c["significant"] == true)
            .map(|c| format!("{} {} {} {:+.4}", c["kind"], c["function"], c["measure"], c["delta_rate"]))
            .collect();
        let closest = v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .min_by(|a, b| a["q"].as_f64().unwrap_or(1.0).total_cmp(&b["q"].as_f64().unwrap_or(1.0)))
            .cloned()
            .unwrap_or_default();
        flagged += usize::from(!significant.is_empty());
        println!(
            "  {:>2}: {} base and {} target observations, {} tested, {} significant{}; smallest q {:.3} ({} {})",
            i + 1,
            v["observations"][0],
            v["observations"][1],
            v["tested"],
            significant.len(),
            if significant.is_empty() { String::new() } else { format!(": {}", significant.join(", ")) },
            closest["q"].as_f64().unwrap_or(f64::NAN),
            closest["kind"],
            closest["function"],
        );
    }
    let _ = load.kill();
    let _ = load.wait();
    drop(agent);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    println!("changes A/A: {flagged} of {comparisons} comparisons flagged a change (goal: at most 1)");
    Ok(())
}
