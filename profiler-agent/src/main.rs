//! `profiler-agent`: eBPF continuous profiler agent.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use profiler_agent::{
    compare::{self, CompareOptions},
    config::AgentConfig,
    record::{RecordOptions, record},
    session::OffCpuBudget,
    labels::LabelOptions,
    python::PythonOptions,
    sample::{OffCpuOptions, OffCpuPath, SamplerOptions},
};

/// eBPF profiler agent: samples on-CPU stacks (cpu-clock perf events) and off-CPU waits
/// (sched_switch) of every process on this host, with very low overhead. Needs root.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile for a fixed time, then write folded stacks and/or an SVG flame graph.
    ///
    /// Folded lines are `process;user frames...;kernel frames_[k] count`, root first.
    /// With --off-cpu, every stack starts with its kind (`[on-cpu]`, `[off-cpu:sleep]`, ...)
    /// and values are nanoseconds (on-CPU samples × sampling period).
    Record(RecordArgs),
    /// Profile continuously in fixed windows and ship each window to the collection server.
    ///
    /// Every process gets a service name from its cgroup (systemd unit, container,
    /// Kubernetes pod) or executable, unless a rule in the config says otherwise. Windows
    /// the server does not acknowledge are spooled on disk (bounded) and replayed in
    /// order. SIGTERM ships or spools the current window before exiting. Needs root.
    Run(RunArgs),
    /// Compare two profiles and fail when a function's share grew: a regression gate for CI.
    ///
    /// Each input is a file (folded text as `record -o` writes it, or pprof, either one
    /// optionally gzipped) or an http(s) URL of one, e.g. the server's
    /// `/api/v1/folded?service=...&from=...&until=...`. Shares are of each kind's time
    /// (on-CPU, each off-CPU reason), so runs of different lengths compare. Prints the
    /// functions that grew most; exit status 1 when one grew by more than
    /// --max-growth points, 2 when an input cannot be read.
    Compare(CompareArgs),
}

#[derive(Args)]
struct CompareArgs {
    /// The reference profile, e.g. of the main branch.
    base: String,
    /// The profile under test.
    target: String,
    /// Largest growth of a function's self share allowed, in percentage points.
    #[arg(long, default_value_t = 2.0)]
    max_growth: f64,
    /// Gate on total (inclusive) shares too, not only self.
    #[arg(long)]
    total: bool,
    /// Only these kinds (comma-separated, e.g. `on-cpu`); default all.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Write the differential flame graph (red grew, blue shrank) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Rows of the table printed.
    #[arg(long, default_value_t = 15)]
    limit: usize,
}

#[derive(Args)]
struct RunArgs {
    /// TOML configuration (see deploy/agent.toml); flags below override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Collection server base URL, e.g. http://profiler:4040.
    #[arg(long)]
    server_url: Option<String>,
    /// Bearer token for the server's ingest API.
    #[arg(long, env = "PROFILER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Window length (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    window: Option<Duration>,
    /// Directory of the on-disk spool.
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// Address of the /metrics endpoint ("" disables it).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Turn off-CPU tracing on or off.
    #[arg(long)]
    off_cpu: Option<bool>,
}

#[derive(Args)]
struct RecordArgs {
    /// How long to record, e.g. `10s`, `2m`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// On-CPU sampling frequency per CPU, in Hz (a prime-ish value such as 99 avoids
    /// lock-step with periodic work).
    #[arg(long, short = 'F', default_value_t = 99)]
    frequency: u64,
    /// Only profile this process id (filtered in the kernel).
    #[arg(long)]
    pid: Option<u32>,
    /// Only keep processes or threads with this name (comm).
    #[arg(long)]
    comm: Option<String>,
    /// Write folded stacks here.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Write an SVG flame graph here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Write counters (samples, losses, effective sampling) as JSON here.
    #[arg(long)]
    stats: Option<PathBuf>,
    /// Also record off-CPU time: where threads wait, and why.
    #[arg(long)]
    off_cpu: bool,
    /// Ignore off-CPU waits shorter than this.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    off_cpu_min_block: Duration,
    /// Highest share of context switches to record (1 = all); rate control may lower it.
    #[arg(long, default_value_t = 1.0)]
    off_cpu_sampling: f64,
    /// Recorded context switches per second that rate control stays under.
    #[arg(long, default_value_t = OffCpuBudget::default().switches_per_s)]
    off_cpu_budget: u64,
    /// In-kernel CPU time per second that recording switch-outs may take (summed over all
    /// CPUs); rate control lowers the share recorded to stay under it.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    off_cpu_cpu_budget: Duration,
    /// Threads that switched out at most this many times in the last 100 ms have every
    /// switch-out recorded; one switching n times more is recorded at 1/n² (0: all are
    /// sampled alike). Threads that block rarely then have every wait counted exactly;
    /// rate control lowers it when their records would take over 9/10 of the budget.
    #[arg(long, default_value_t = OffCpuOptions::default().thread_quota)]
    off_cpu_thread_quota: u32,
    /// A thread over its quota that switched out at most this many times in the last
    /// 100 ms, and had a wait of --off-cpu-min-block or more lately, has its switch-outs
    /// stamped: each notes when it left (two clock reads a switch), so every long wait of
    /// it is counted whole, shown at the stack of its latest recorded wait. Above it,
    /// waits are only sampled. Rate control lowers it when stamps would take over half of
    /// --off-cpu-cpu-budget. 0: no stamps.
    #[arg(long, default_value_t = OffCpuOptions::default().stamp_limit)]
    off_cpu_stamp_limit: u32,
    /// A thread switching out again from the same place (the same system call from the
    /// same user code, stack pointer and state) takes the kernel stack walked at the
    /// first of these many switch-outs instead of walking it again, the one after walks
    /// anew (`kernel_stacks_changed` counts walks that found another stack). Walking is
    /// most of a record's in-kernel cost; 0 walks every time.
    #[arg(long, default_value_t = OffCpuOptions::default().kernel_stack_reuses)]
    off_cpu_kernel_stack_reuses: u32,
    /// Where waits get their stacks: at switch-in where the kernel takes a kprobe on the
    /// scheduler's finish_task_switch and is Linux 6.12 or newer (only waits of at least
    /// --off-cpu-min-block pay for stacks; Debian's 6.1 oopsed under that kprobe in
    /// emulation), else at switch-out; `switch-out` or `switch-in` forces one (the latter
    /// fails where it is not available).
    #[arg(long, value_enum, default_value_t = OffCpuPath::Auto)]
    off_cpu_path: OffCpuPath,
    /// How often the kernel maps are drained.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Distinct (thread, stack) entries per window before samples are counted as lost.
    #[arg(long, default_value_t = SamplerOptions::default().max_stack_keys)]
    max_stack_keys: u32,
    /// Most bytes of user stack copied per sample for unwinding (at most 65536; a thread
    /// gets 16384 until its unwinds show what it needs). Deeper stacks are cut where the
    /// copy ends.
    #[arg(long, default_value_t = SamplerOptions::default().user_stack_bytes)]
    user_stack_bytes: u32,
    /// Size of the kernel ring buffer snapshots pass through: a power of two, or 0 for
    /// 1 MiB per CPU between 8 and 64 MiB. Tracing every switch of a busy process may
    /// need more (losses show as `offcpu_ring_full`).
    #[arg(long, default_value_t = SamplerOptions::default().ring_buffer_bytes)]
    ring_buffer_bytes: u32,
    /// Leave the kernel's BPF run-time statistics off (they cost two clock reads per
    /// program run; without them the programs' cost is not reported).
    #[arg(long)]
    no_bpf_stats: bool,
    /// Share of the time the BPF run-time statistics are on, in (0, 1]: they come on for
    /// this share of every 10 s and the programs' cost is estimated from it. 1 keeps them
    /// on and makes the figures exact.
    #[arg(long, default_value_t = SamplerOptions::default().bpf_stats_share)]
    bpf_stats_share: f64,
    /// Do not read Python frames: CPython processes show only the interpreter's native
    /// frames.
    #[arg(long)]
    no_python: bool,
    /// Keep the interpreter's eval-loop frames (`_PyEval_EvalFrameDefault`) beside the
    /// Python frames they ran, instead of folding them away.
    #[arg(long)]
    python_eval_frames: bool,
    /// Do not read the custom labels applications publish per thread (Parca's
    /// `custom-labels` ABI v1); with them, samples carry them as labels.
    #[arg(long)]
    no_custom_labels: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match profiler_agent::cost::serve_helper_if_started_as_one() {
        Some(helper) => helper,
        None => match Cli::parse().command {
            Command::Record(args) => run_record(args),
            Command::Run(args) => run_daemon(args),
            Command::Compare(args) => {
                let options = CompareOptions {
                    base: args.base,
                    target: args.target,
                    max_growth: args.max_growth / 100.0,
                    total: args.total,
                    kinds: args.kinds,
                    svg: args.svg,
                    limit: args.limit,
                };
                return match compare::run(&options, &mut std::io::stdout()) {
                    Ok(true) => ExitCode::SUCCESS,
                    Ok(false) => ExitCode::from(1),
                    Err(err) => {
                        eprintln!("error: {err:#}");
                        ExitCode::from(2)
                    }
                };
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_daemon(args: RunArgs) -> anyhow::Result<()> {
    let mut config = match (&args.config, &args.server_url) {
        (Some(path), _) => AgentConfig::load(path)?,
        (None, Some(url)) => AgentConfig::load_str(&format!("[server]\nurl = {url:?}\n"))?,
        (None, None) => anyhow::bail!("pass --config FILE or --server-url URL"),
    };
    if let Some(url) = args.server_url {
        config.server.url = url;
    }
    if let Some(token) = args.token {
        config.server.token = Some(token);
    }
    if let Some(window) = args.window {
        config.sampling.window = window;
    }
    if let Some(dir) = args.spool_dir {
        config.spool.dir = dir;
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = listen;
    }
    if let Some(off_cpu) = args.off_cpu {
        config.off_cpu.enabled = off_cpu;
    }
    profiler_agent::daemon::run(config)
}

fn run_record(args: RecordArgs) -> anyhow::Result<()> {
    if args.output.is_none() && args.svg.is_none() && args.stats.is_none() {
        anyhow::bail!("nothing to write: pass --output, --svg and/or --stats");
    }
    profiler_agent::config::check_bpf_stats_share(args.bpf_stats_share).context("--bpf-stats-share")?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let options = RecordOptions {
        duration: args.duration,
        window: args.window.max(Duration::from_millis(100)),
        sampler: SamplerOptions {
            frequency_hz: args.frequency,
            pid: args.pid,
            off_cpu: args.off_cpu.then_some(OffCpuOptions {
                min_block: args.off_cpu_min_block,
                sample_probability: args.off_cpu_sampling,
                thread_quota: args.off_cpu_thread_quota,
                stamp_limit: args.off_cpu_stamp_limit,
                kernel_stack_reuses: args.off_cpu_kernel_stack_reuses,
                path: args.off_cpu_path,
                ..OffCpuOptions::default()
            }),
            max_stack_keys: args.max_stack_keys,
            user_stack_bytes: args.user_stack_bytes,
            ring_buffer_bytes: args.ring_buffer_bytes,
            bpf_stats: !args.no_bpf_stats,
            bpf_stats_share: args.bpf_stats_share,
            python: PythonOptions { enabled: !args.no_python, eval_frames: args.python_eval_frames },
            labels: LabelOptions { enabled: !args.no_custom_labels, ..LabelOptions::default() },
            ..SamplerOptions::default()
        },
        comm: args.comm,
        folded: args.output,
        svg: args.svg,
        stats: args.stats,
        off_cpu_budget: OffCpuBudget { switches_per_s: args.off_cpu_budget, kernel_cpu_per_s: args.off_cpu_cpu_budget },
    };
    record(&options, stop)?;
    Ok(())
}
