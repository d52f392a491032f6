//! The agent's own counters, served in Prometheus text format on /metrics.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

#[derive(Default)]
pub struct Metrics {
    pub windows: AtomicU64,
    pub samples: AtomicU64,
    pub samples_lost: AtomicU64,
    pub stacks_lost: AtomicU64,
    pub switches: AtomicU64,
    pub switches_recorded: AtomicU64,
    pub off_cpu_lost: AtomicU64,
    /// Pending waits dropped because their thread is gone (their end was lost).
    pub off_cpu_waits_expired: AtomicU64,
    /// Samples and waits of Python threads that carried Python frames.
    pub python_stacks: AtomicU64,
    /// CPython processes whose frames are read, and those whose version has no layout.
    pub python_processes: AtomicU64,
    pub python_unknown_version: AtomicU64,
    /// Python frames not named: a code object unreadable, or no longer the kernel's.
    pub python_frames_unnamed: AtomicU64,
    pub labelled_snapshots: AtomicU64,
    pub label_processes: AtomicU64,
    pub labels_high_cardinality_dropped: AtomicU64,
    /// Samples and waits that named a request; those whose time was not attributed to it.
    pub request_snapshots: AtomicU64,
    pub requests_dropped: AtomicU64,
    pub stacks_unwound: AtomicU64,
    pub stacks_truncated: AtomicU64,
    pub stacks_partly_unknown: AtomicU64,
    /// Share of `max_stack_keys` used by the last window, in 1/1000.
    pub map_fill_permille: AtomicU64,
    /// The per-thread quota rate control set last.
    pub off_cpu_thread_quota: AtomicU64,
    /// The stamp limit rate control set last; stamped switch-outs, stamped long waits,
    /// and those of them shown without a stack.
    pub off_cpu_stamp_limit: AtomicU64,
    pub switches_stamped: AtomicU64,
    pub stamped_long_waits: AtomicU64,
    pub stamped_without_stack: AtomicU64,
    /// Off-CPU sampling share in the last window, in 1/1000.
    pub off_cpu_sampling_permille: AtomicU64,
    /// 1 while off-CPU waits get their stacks at switch-in, 0 at switch-out.
    pub off_cpu_switch_in: AtomicU64,
    /// Switch-outs recorded at their thread's own probability (quota).
    pub switches_recorded_by_quota: AtomicU64,
    pub kernel_stacks_reused: AtomicU64,
    pub kernel_stacks_changed: AtomicU64,
    pub profiles_produced: AtomicU64,
    pub profiles_shipped: AtomicU64,
    pub profiles_spooled: AtomicU64,
    pub profiles_dropped: AtomicU64,
    pub profiles_rejected: AtomicU64,
    pub profiles_dead_lettered: AtomicU64,
    pub profiles_unverifiable: AtomicU64,
    /// Requests the server refused with 401, 403 or 404.
    pub ship_auth_failures: AtomicU64,
    pub value_produced_ns: AtomicU64,
    pub value_shipped_ns: AtomicU64,
    pub value_dropped_ns: AtomicU64,
    pub value_dead_lettered_ns: AtomicU64,
    pub value_unverifiable_ns: AtomicU64,
    pub bytes_shipped: AtomicU64,
    pub stacks_shipped_by_id: AtomicU64,
    pub stacks_shipped_with_frames: AtomicU64,
    pub spool_profiles: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub symbol_cache_hits: AtomicU64,
    pub symbol_cache_misses: AtomicU64,
    /// Run time (ns) and runs of each BPF program, in the order of `cost::PROGRAMS`.
    pub bpf_run_time_ns: [AtomicU64; crate::cost::PROGRAMS.len()],
    pub bpf_runs: [AtomicU64; crate::cost::PROGRAMS.len()],
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP profiler_agent_{name} {help}\n# TYPE profiler_agent_{name} {kind}\nprofiler_agent_{name} {value}");
        };
        let get = |counter: &AtomicU64| counter.load(Relaxed) as f64;
        metric("windows_total", "counter", "Windows drained from the kernel.", get(&self.windows));
        metric("samples_total", "counter", "On-CPU samples taken.", get(&self.samples));
        metric("samples_lost_total", "counter", "On-CPU samples lost to a full ring buffer.", get(&self.samples_lost));
        metric("stacks_lost_total", "counter", "Kernel or user stacks that could not be copied.", get(&self.stacks_lost));
        metric("stacks_unwound_total", "counter", "User stacks unwound to their outermost frame.", get(&self.stacks_unwound));
        metric("stacks_truncated_total", "counter", "User stacks whose unwinding stopped early (stack copy too short, no rule).", get(&self.stacks_truncated));
        metric("stacks_partly_unknown_total", "counter", "Aggregated stacks with at least one frame that has no name.", get(&self.stacks_partly_unknown));
        metric("switches_total", "counter", "Context switches on the host while off-CPU tracing was on.", get(&self.switches));
        metric("switches_recorded_total", "counter", "Context switches recorded (sampled).", get(&self.switches_recorded));
        metric("off_cpu_lost_total", "counter", "Off-CPU waits lost to a full ring buffer or switch-out map, or to a switch-in the kernel did not report.", get(&self.off_cpu_lost));
        metric("off_cpu_waits_expired_total", "counter", "Off-CPU waits dropped because their end was lost and their thread exited.", get(&self.off_cpu_waits_expired));
        metric("python_stacks_total", "counter", "Samples and waits of Python threads that carried Python frames.", get(&self.python_stacks));
        metric("python_processes_total", "counter", "CPython processes whose Python frames are read.", get(&self.python_processes));
        metric("python_unknown_version_total", "counter", "CPython processes of a version without a layout here: native stacks only.", get(&self.python_unknown_version));
        metric("python_frames_unnamed_total", "counter", "Python frames whose code object could not be read or no longer matched.", get(&self.python_frames_unnamed));
        metric("labelled_snapshots_total", "counter", "Samples and waits that carried the application's custom labels.", get(&self.labelled_snapshots));
        metric("label_processes_total", "counter", "Processes whose custom labels are read.", get(&self.label_processes));
        metric("labels_high_cardinality_dropped_total", "counter", "Custom labels of a high-cardinality key left out of the profiles' labels.", get(&self.labels_high_cardinality_dropped));
        metric("request_snapshots_total", "counter", "Samples and waits whose custom labels named a request (request_id, trace_id, ...).", get(&self.request_snapshots));
        metric("requests_dropped_total", "counter", "Samples and waits whose time was not attributed to their request: a window held too many (stack, request) pairs.", get(&self.requests_dropped));
        metric("map_fill_ratio", "gauge", "Share of max_stack_keys used by the last window.", get(&self.map_fill_permille) / 1000.0);
        metric("off_cpu_sampling_ratio", "gauge", "Share of context switches recorded.", get(&self.off_cpu_sampling_permille) / 1000.0);
        metric("off_cpu_thread_quota", "gauge", "Switch-outs per 100 ms a thread may have and still have each recorded (rate control lowers it under load).", get(&self.off_cpu_thread_quota));
        metric("off_cpu_stamp_limit", "gauge", "Switch-outs per 100 ms up to which a thread over its quota that waits long has every switch-out stamped, its long waits counted whole (rate control lowers it under load).", get(&self.off_cpu_stamp_limit));
        metric("switches_stamped_total", "counter", "Switch-outs stamped: their wait measured at switch-in, without stacks.", get(&self.switches_stamped));
        metric("stamped_long_waits_total", "counter", "Stamped waits of at least min_block, counted whole at their thread's latest recorded stack.", get(&self.stamped_long_waits));
        metric("stamped_waits_without_stack_total", "counter", "Stamped long waits of a thread and state no recorded wait had given a stack yet: shown at the thread alone.", get(&self.stamped_without_stack));
        metric("off_cpu_switch_in", "gauge", "1 when off-CPU waits get their stacks at switch-in (kprobe on finish_task_switch), 0 at switch-out (sched_switch alone).", get(&self.off_cpu_switch_in));
        metric("switches_recorded_by_quota_total", "counter", "Switch-outs recorded at their thread's own probability (per-thread quota).", get(&self.switches_recorded_by_quota));
        metric("kernel_stacks_reused_total", "counter", "Recorded waits that took their thread's kernel stack walked at an earlier wait from the same place.", get(&self.kernel_stacks_reused));
        metric("kernel_stacks_changed_total", "counter", "Kernel stack walks after reuses that found another stack: reused stacks that may have been wrong.", get(&self.kernel_stacks_changed));
        metric("profiles_produced_total", "counter", "Profiles produced: one per window with samples, a part per service, labels and kind.", get(&self.profiles_produced));
        metric("profiles_shipped_total", "counter", "Profiles acknowledged by the server.", get(&self.profiles_shipped));
        metric("profiles_spooled_total", "counter", "Profiles written to the on-disk spool.", get(&self.profiles_spooled));
        metric("profiles_dropped_total", "counter", "Profiles dropped because the spool was full.", get(&self.profiles_dropped));
        metric("profiles_rejected_total", "counter", "Profiles the server refused (4xx).", get(&self.profiles_rejected));
        metric("profiles_dead_lettered_total", "counter", "Spooled profiles given up on: the server kept failing them (5xx) while it accepted later ones.", get(&self.profiles_dead_lettered));
        metric("profiles_unverifiable_total", "counter", "Profiles dropped because an attempt of theirs went unanswered longer ago than the server remembers batch ids (410): it may have stored them, and a resend could count them twice.", get(&self.profiles_unverifiable));
        metric("ship_auth_failures_total", "counter", "Ingest requests refused with 401, 403 or 404 (token, URL or proxy wrong); their profiles are kept.", get(&self.ship_auth_failures));
        metric("value_produced_nanoseconds_total", "counter", "Profiled time produced.", get(&self.value_produced_ns));
        metric("value_shipped_nanoseconds_total", "counter", "Profiled time acknowledged by the server.", get(&self.value_shipped_ns));
        metric("value_dropped_nanoseconds_total", "counter", "Profiled time dropped with full-spool profiles.", get(&self.value_dropped_ns));
        metric("value_dead_lettered_nanoseconds_total", "counter", "Profiled time in dead-lettered profiles.", get(&self.value_dead_lettered_ns));
        metric("value_unverifiable_nanoseconds_total", "counter", "Profiled time in unverifiable profiles.", get(&self.value_unverifiable_ns));
        metric("bytes_shipped_total", "counter", "Compressed profile bytes the server acknowledged, as sent (stacks it has go by id).", get(&self.bytes_shipped));
        metric("stacks_shipped_by_id_total", "counter", "Stacks of accepted windows sent by id: the server had their frames.", get(&self.stacks_shipped_by_id));
        metric("stacks_shipped_with_frames_total", "counter", "Stacks of accepted windows sent with their frames.", get(&self.stacks_shipped_with_frames));
        metric("spool_profiles", "gauge", "Profiles waiting in the spool.", get(&self.spool_profiles));
        metric("spool_bytes", "gauge", "Bytes in the spool.", get(&self.spool_bytes));
        metric("symbol_cache_hits_total", "counter", "Process snapshot look-ups that hit.", get(&self.symbol_cache_hits));
        metric("symbol_cache_misses_total", "counter", "Process snapshot look-ups that missed.", get(&self.symbol_cache_misses));
        metric("file_pages_truncated_total", "counter", "Pages of mapped binaries or debug files read as zeros because their owner truncated the file while it was mapped.", crate::mapped_files::truncated_pages() as f64);
        let usage = own_usage();
        metric("cpu_seconds_total", "counter", "CPU time used by the agent.", usage.cpu_seconds);
        metric("resident_memory_bytes", "gauge", "Resident memory of the agent, including mapped binaries.", usage.rss_bytes);
        metric("resident_anonymous_bytes", "gauge", "Resident memory of the agent that is its own heap (RssAnon).", usage.anon_bytes);
        let _ = writeln!(out, "# HELP profiler_agent_bpf_run_time_seconds_total CPU time spent in the agent's BPF programs, in the kernel: from BPF statistics, estimated every 10 s from the share of the time they are on (sampling.bpf_stats_share).\n# TYPE profiler_agent_bpf_run_time_seconds_total counter");
        for (name, ns) in crate::cost::PROGRAMS.iter().zip(&self.bpf_run_time_ns) {
            let _ = writeln!(out, "profiler_agent_bpf_run_time_seconds_total{{program=\"{name}\"}} {}", get(ns) / 1e9);
        }
        let _ = writeln!(out, "# HELP profiler_agent_bpf_runs_total Runs of the agent's BPF programs, estimated like the run time.\n# TYPE profiler_agent_bpf_runs_total counter");
        for (name, runs) in crate::cost::PROGRAMS.iter().zip(&self.bpf_runs) {
            let _ = writeln!(out, "profiler_agent_bpf_runs_total{{program=\"{name}\"}} {}", get(runs));
        }
        out
    }
}

struct Usage {
    cpu_seconds: f64,
    rss_bytes: f64,
    anon_bytes: f64,
}

fn own_usage() -> Usage {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some((fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib * 1024.0)
    };
    Usage { cpu_seconds, rss_bytes: kib("VmRSS:"), anon_bytes: kib("RssAnon:") }
}
