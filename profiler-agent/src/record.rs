//! `profiler-agent record`: profile for a fixed time and write folded stacks and/or an SVG.

use std::{
    fs,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use profiler_common::Stat;
use serde::Serialize;

use crate::{
    aggregate::{AggregateOptions, Profile, Units},
    process::ProcessTable,
    render::{RenderOptions, write_svg},
    sample::{OffCpuOptions, Sampler, SamplerOptions, StatCounts},
    symbolize::Symbolizer,
};

#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub duration: Duration,
    /// Drain interval; shorter windows bound kernel map fill.
    pub window: Duration,
    pub sampler: SamplerOptions,
    pub comm: Option<String>,
    pub folded: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub stats: Option<PathBuf>,
    /// Recorded switch-outs per second that rate control aims to stay under.
    pub off_cpu_budget: u64,
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            window: Duration::from_secs(1),
            sampler: SamplerOptions::default(),
            comm: None,
            folded: None,
            svg: None,
            stats: None,
            off_cpu_budget: DEFAULT_OFF_CPU_BUDGET,
        }
    }
}

/// Each recorded switch-out costs two stack walks (~1-3 µs); 4000/s keeps that near 1% of one CPU.
pub const DEFAULT_OFF_CPU_BUDGET: u64 = 4000;

/// What happened during a recording, for humans (logged) and tests (`--stats` JSON).
#[derive(Debug, Default, Serialize)]
pub struct RecordSummary {
    pub duration_s: f64,
    pub period_ns: u64,
    pub windows: u64,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    /// Share of switch-outs recorded, averaged over the run (1 = every switch).
    pub off_cpu_effective_sampling: Option<f64>,
    pub on_cpu_total: u64,
    pub off_cpu_total_ns: u64,
    pub max_map_fill: f64,
    pub symbol_cache_hits: u64,
    pub symbol_cache_misses: u64,
}

pub fn record(options: &RecordOptions, stop: Arc<AtomicBool>) -> anyhow::Result<RecordSummary> {
    let mut sampler = Sampler::start(&options.sampler)?;
    // Tests and scripts wait for this line before starting their workload.
    tracing::info!(frequency_hz = options.sampler.frequency_hz, off_cpu = options.sampler.off_cpu.is_some(), "sampling started");
    let processes = ProcessTable::default();
    let watcher = spawn_process_watcher(processes.clone(), stop.clone())?;
    let symbolizer = Symbolizer::spawn(processes.clone())?;
    let units = if options.sampler.off_cpu.is_some() { Units::Nanoseconds } else { Units::Samples };
    let aggregate = AggregateOptions { comm: options.comm.clone(), units, period_ns: sampler.period_ns };

    let mut profile = Profile::default();
    let mut totals = StatCounts::default();
    let mut summary = RecordSummary { period_ns: sampler.period_ns, ..Default::default() };
    let mut rate = options.sampler.off_cpu.as_ref().map(|off| RateControl::new(off, options.off_cpu_budget));
    let started = Instant::now();
    let mut next_drain = started + options.window;
    let deadline = started + options.duration;
    let tick = Duration::from_millis(250);

    loop {
        let now = Instant::now();
        let stopping = stop.load(Ordering::Relaxed) || now >= deadline;
        if stopping || now >= next_drain {
            let window = sampler.drain()?;
            totals.add(&window.stats);
            summary.windows += 1;
            summary.max_map_fill = summary.max_map_fill.max(window.map_fill);
            if window.map_fill > 0.9 {
                tracing::warn!(fill = window.map_fill, "BPF aggregate map nearly full; raise --max-stack-keys or shorten --window");
            }
            let symbolized = symbolizer.symbolize(window.samples)?;
            profile.add(&symbolized, &aggregate);
            processes.evict();
            next_drain = (now + options.window).min(deadline);
            if stopping {
                break;
            }
        }
        if let Some(rate) = rate.as_mut() {
            rate.tick(&mut sampler)?;
        }
        thread::sleep(tick.min(next_drain.saturating_duration_since(Instant::now())));
    }
    drop(watcher);

    summary.duration_s = started.elapsed().as_secs_f64();
    for stat in Stat::ALL {
        summary.counters.insert(stat.name(), totals.get(stat));
    }
    summary.counters.insert("long_wait_stack_missing", sampler.long_waits_unresolved());
    summary.off_cpu_effective_sampling = rate.map(|r| r.effective());
    summary.on_cpu_total = profile.total(|k| k == crate::aggregate::Kind::OnCpu);
    summary.off_cpu_total_ns = profile.total(|k| k != crate::aggregate::Kind::OnCpu);
    (summary.symbol_cache_hits, summary.symbol_cache_misses) = processes.cache_stats();
    report(&summary);

    if let Some(path) = &options.folded {
        fs::write(path, profile.folded(units == Units::Nanoseconds))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &options.svg {
        let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let title = if units == Units::Nanoseconds { "On-CPU and off-CPU time" } else { "On-CPU samples" };
        write_svg(&profile, &RenderOptions { title: title.into(), units }, std::io::BufWriter::new(file))?;
    }
    if let Some(path) = &options.stats {
        fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

fn report(summary: &RecordSummary) {
    let c = |name| summary.counters.get(name).copied().unwrap_or(0);
    tracing::info!(
        samples = c("samples"),
        lost_map_full = c("sample_map_full"),
        user_stacks_lost = c("user_stack_lost"),
        kernel_stacks_lost = c("kernel_stack_lost"),
        windows = summary.windows,
        "on-CPU sampling done"
    );
    if let Some(effective) = summary.off_cpu_effective_sampling {
        tracing::info!(
            switches = c("switches"),
            recorded = c("switch_outs_recorded"),
            effective_sampling = effective,
            below_min_block = c("offcpu_below_min"),
            lost_map_full = c("offcpu_map_full") + c("switch_out_map_full"),
            long_waits = c("offcpu_long_waits"),
            long_waits_without_stack = c("long_wait_stack_missing"),
            "off-CPU tracing done"
        );
    }
}

/// Keeps recorded switch-outs per second under a budget by lowering the sampling
/// probability; recorded waits carry 1/p as weight, so estimates stay unbiased.
struct RateControl {
    budget_per_s: f64,
    max_probability: f64,
    probability: f64,
    last: Instant,
    last_switches: u64,
    weighted: f64,
    switches_total: f64,
}

impl RateControl {
    fn new(options: &OffCpuOptions, budget: u64) -> Self {
        Self {
            budget_per_s: budget.max(1) as f64,
            max_probability: options.sample_probability,
            probability: options.sample_probability,
            last: Instant::now(),
            last_switches: 0,
            weighted: 0.0,
            switches_total: 0.0,
        }
    }

    fn tick(&mut self, sampler: &mut Sampler) -> anyhow::Result<()> {
        let elapsed = self.last.elapsed().as_secs_f64();
        if elapsed < 1.0 {
            return Ok(());
        }
        let switches = sampler.stat_total(Stat::Switches)?;
        let delta = switches.saturating_sub(self.last_switches) as f64;
        self.weighted += delta * self.probability;
        self.switches_total += delta;
        self.last_switches = switches;
        self.last = Instant::now();
        let rate = delta / elapsed;
        let target = (self.budget_per_s / rate.max(1.0)).min(self.max_probability).max(1e-4);
        // Move fast when over budget, slowly back up, to avoid oscillating.
        let next = if target < self.probability { target } else { (self.probability * 2.0).min(target) };
        if (next - self.probability).abs() > self.probability * 0.05 {
            sampler.set_off_cpu_probability(next)?;
            self.probability = next;
        }
        Ok(())
    }

    fn effective(&self) -> f64 {
        if self.switches_total == 0.0 { self.probability } else { self.weighted / self.switches_total }
    }
}

/// Snapshots new processes often, so short-lived ones can still be symbolized after exit.
fn spawn_process_watcher(processes: ProcessTable, stop: Arc<AtomicBool>) -> anyhow::Result<WatcherGuard> {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let thread = thread::Builder::new().name("proc-watcher".into()).spawn(move || {
        while !flag.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            processes.discover();
            thread::sleep(Duration::from_millis(200));
        }
    })?;
    Ok(WatcherGuard { done, thread: Some(thread) })
}

struct WatcherGuard {
    done: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
