//! A profiling session: the BPF sampler plus everything that turns its windows into
//! symbolized samples (process snapshots, symbolizer thread, off-CPU rate control).
//! `record` and the daemon both drive one.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use profiler_common::Stat;

use crate::{
    process::ProcessTable,
    sample::{OffCpuOptions, ProgramCost, Sampler, SamplerOptions, StatCounts},
    symbolize::{SymbolizedSample, Symbolizer},
    unwind::UnwindCounts,
};

/// What a session samples; a deep-profile run changes it for a while.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub frequency_hz: u64,
    pub off_cpu: Option<OffCpuOptions>,
    /// Recorded switch-outs per second that rate control stays under.
    pub off_cpu_budget: u64,
}

/// One drained and symbolized window.
pub struct Window {
    pub samples: Vec<SymbolizedSample>,
    pub stats: StatCounts,
    pub map_fill: f64,
    pub unwind: UnwindCounts,
    /// Aggregated stacks with at least one user frame that has no name.
    pub partly_unknown: u64,
}

pub struct Session {
    sampler: Sampler,
    processes: ProcessTable,
    symbolizer: Symbolizer,
    rate: Option<RateControl>,
    _watcher: WatcherGuard,
    totals: StatCounts,
    windows: u64,
    max_map_fill: f64,
    unwind: UnwindCounts,
    partly_unknown: u64,
}

/// `--stats` counters of each program in [`crate::sample::PROGRAMS`]: run time, runs.
const PROGRAM_COUNTERS: [(&str, &str); 2] = [
    ("bpf_on_cpu_sample_run_time_ns", "bpf_on_cpu_sample_runs"),
    ("bpf_sched_switch_run_time_ns", "bpf_sched_switch_runs"),
];

/// How often rate control looks at the switch rate while waiting for a window to end.
const TICK: Duration = Duration::from_millis(250);

impl Session {
    pub fn start(options: &SamplerOptions, off_cpu_budget: u64) -> anyhow::Result<Self> {
        let processes = ProcessTable::default();
        let sampler = Sampler::start(options, processes.clone())?;
        let watcher = spawn_process_watcher(processes.clone())?;
        let symbolizer = Symbolizer::spawn(processes.clone())?;
        let switches = sampler.stat_total(Stat::Switches)?;
        let rate = options.off_cpu.as_ref().map(|off| RateControl::new(off, off_cpu_budget, switches));
        // Tests and scripts wait for this line before starting their workload.
        tracing::info!(frequency_hz = options.frequency_hz, off_cpu = options.off_cpu.is_some(), "sampling started");
        Ok(Self {
            sampler,
            processes,
            symbolizer,
            rate,
            _watcher: watcher,
            totals: StatCounts::default(),
            windows: 0,
            max_map_fill: 0.0,
            unwind: UnwindCounts::default(),
            partly_unknown: 0,
        })
    }

    /// Waits until `until` (or until `stop` is set), then drains and symbolizes the window.
    pub fn next_window(&mut self, until: Instant, stop: &AtomicBool) -> anyhow::Result<Window> {
        loop {
            let now = Instant::now();
            if now >= until || stop.load(Ordering::Relaxed) {
                break;
            }
            if let Some(rate) = self.rate.as_mut() {
                rate.tick(&mut self.sampler)?;
            }
            thread::sleep(TICK.min(until - now));
        }
        let raw = self.sampler.drain()?;
        self.totals.add(&raw.stats);
        self.windows += 1;
        self.max_map_fill = self.max_map_fill.max(raw.map_fill);
        if raw.map_fill > 0.9 {
            tracing::warn!(fill = raw.map_fill, "window aggregate nearly full; raise max_stack_keys or shorten the window");
        }
        self.unwind.add(&raw.unwind);
        let samples = self.symbolizer.symbolize(raw.samples)?;
        self.processes.evict();
        let partly_unknown = samples
            .iter()
            .filter(|sample| sample.user_frames.iter().any(|frame| frame.starts_with(crate::symbolize::UNKNOWN)))
            .count() as u64;
        self.partly_unknown += partly_unknown;
        Ok(Window { samples, stats: raw.stats, map_fill: raw.map_fill, unwind: raw.unwind, partly_unknown })
    }

    /// Switches to other settings. Call right after a window was drained, so the counts
    /// already taken convert with the period they were taken at.
    pub fn apply(&mut self, settings: &Settings) -> anyhow::Result<()> {
        if self.sampler.period_ns != 1_000_000_000 / settings.frequency_hz.max(1) {
            self.sampler.set_frequency(settings.frequency_hz)?;
        }
        self.sampler.set_off_cpu(settings.off_cpu.as_ref())?;
        // The kernel's switch counter is cumulative: rate control starts from its value now,
        // or its first tick would see every switch since start as one second's worth.
        let switches = self.sampler.stat_total(Stat::Switches)?;
        self.rate = settings.off_cpu.as_ref().map(|off| RateControl::new(off, settings.off_cpu_budget, switches));
        tracing::info!(frequency_hz = settings.frequency_hz, off_cpu = settings.off_cpu.is_some(), "sampling settings changed");
        Ok(())
    }

    /// In-kernel cost of each loaded BPF program since start, by index in
    /// [`crate::sample::PROGRAMS`] (empty without BPF statistics).
    pub fn program_costs(&self) -> Vec<(usize, ProgramCost)> {
        self.sampler.program_costs()
    }

    pub fn period_ns(&self) -> u64 {
        self.sampler.period_ns
    }

    pub fn processes(&self) -> &ProcessTable {
        &self.processes
    }

    pub fn windows(&self) -> u64 {
        self.windows
    }

    pub fn max_map_fill(&self) -> f64 {
        self.max_map_fill
    }

    /// Every BPF counter since the start, plus the agent's own losses.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let mut counters: BTreeMap<&'static str, u64> =
            Stat::ALL.iter().map(|stat| (stat.name(), self.totals.get(*stat))).collect();
        let losses = self.sampler.agent_losses();
        counters.insert("aggregate_full", losses.aggregate_full);
        counters.insert("wait_without_snapshot", losses.wait_without_snapshot);
        counters.insert("malformed_records", losses.malformed);
        counters.insert("stacks_unwound", self.unwind.complete);
        counters.insert("stacks_truncated", self.unwind.truncated);
        counters.insert("binaries_unreadable", self.unwind.binaries_unreadable);
        counters.insert("stacks_partly_unknown", self.partly_unknown);
        for (program, cost) in self.sampler.program_costs() {
            let (time, runs) = PROGRAM_COUNTERS[program];
            counters.insert(time, cost.run_time_ns);
            counters.insert(runs, cost.runs);
        }
        counters
    }

    /// Share of switch-outs recorded so far (1 = every switch), when off-CPU is on.
    pub fn off_cpu_effective_sampling(&self) -> Option<f64> {
        self.rate.as_ref().map(RateControl::effective)
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
    fn new(options: &OffCpuOptions, budget: u64, switches_so_far: u64) -> Self {
        Self {
            budget_per_s: budget.max(1) as f64,
            max_probability: options.sample_probability,
            probability: options.sample_probability,
            last: Instant::now(),
            last_switches: switches_so_far,
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
fn spawn_process_watcher(processes: ProcessTable) -> anyhow::Result<WatcherGuard> {
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    let thread = thread::Builder::new().name("proc-watcher".into()).spawn(move || {
        while !flag.load(Ordering::Relaxed) {
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
