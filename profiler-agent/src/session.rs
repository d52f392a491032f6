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

use anyhow::Context as _;
use profiler_common::{Stat, BURST_SLOT_NS};

use crate::{
    cost::ProgramCost,
    process::ProcessTable,
    sample::{OffCpuOptions, Sampler, SamplerOptions, StatCounts},
    symbolize::{SymbolizedSample, Symbolizer},
    unwind::UnwindCounts,
};

/// What a session samples; a deep-profile run changes it for a while.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub frequency_hz: u64,
    pub off_cpu: Option<OffCpuOptions>,
    pub off_cpu_budget: OffCpuBudget,
}

/// What off-CPU recording may cost per second; rate control lowers the share of
/// switch-outs recorded until both hold. The unsampled path (every switch, about 100 ns)
/// is not in it: no sampling probability can lower that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffCpuBudget {
    /// Recorded switch-outs per second: each one is a ring buffer record to read and,
    /// for long waits, a stack to unwind in the agent.
    pub switches_per_s: u64,
    /// In-kernel CPU time per second spent recording switch-outs (stack copies), across
    /// all CPUs, as measured by the BPF program itself.
    pub kernel_cpu_per_s: Duration,
}

impl OffCpuBudget {
    /// No rate control: "every switch" means exactly that.
    pub const UNLIMITED: Self = Self { switches_per_s: u64::MAX, kernel_cpu_per_s: Duration::MAX };

    /// Switch-outs per second that fit both budgets, counting each at
    /// [`ASSUMED_RECORD_NS`]: what to allow before rate control has measured the cost.
    fn assumed_rate(&self) -> f64 {
        let by_cpu = self.kernel_cpu_per_s.as_nanos() as f64 / ASSUMED_RECORD_NS;
        (self.switches_per_s as f64).min(by_cpu)
    }

    /// Switch-outs each CPU may record per 10 ms before the kernel lowers the probability
    /// on its own (0: never): twice its share of the budget, so steady recording under
    /// rate control stays clear of it and a burst records about 1/64 of its switches
    /// until rate control's next tick, instead of all of them.
    pub fn burst_quota(&self, cpus: usize) -> u32 {
        if *self == Self::UNLIMITED {
            return 0;
        }
        let per_cpu_slot = self.assumed_rate() * 2.0 * (BURST_SLOT_NS as f64 / 1e9) / cpus.max(1) as f64;
        per_cpu_slot.ceil().clamp(1.0, u32::MAX as f64) as u32
    }
}

/// What one recorded switch-out costs in the kernel before rate control has measured it:
/// the high end of what this machine measured, 2.2 µs for threads whose stack size is
/// learnt, 3 to 7 µs for new threads (16 KiB copied) on cold caches. Overestimating only
/// records fewer switch-outs until the first tick.
const ASSUMED_RECORD_NS: f64 = 5_000.0;

impl Default for OffCpuBudget {
    /// A recorded switch-out walks the kernel stack and copies 4 to 16 KiB of user stack,
    /// 2 to 7 µs (see the README's figures). 5 ms/s keeps it at 0.5% of one CPU, about
    /// 2,000 switch-outs a second; the agent's own cost of reading them (about 5 µs
    /// each) stays near 1% of one CPU.
    fn default() -> Self {
        Self { switches_per_s: 4000, kernel_cpu_per_s: Duration::from_millis(5) }
    }
}

/// One drained and symbolized window.
pub struct Window {
    pub samples: Vec<SymbolizedSample>,
    pub stats: StatCounts,
    pub map_fill: f64,
    pub unwind: UnwindCounts,
    /// Aggregated stacks with at least one user frame that has no name.
    pub partly_unknown: u64,
    /// Context switches on the host during the window, while off-CPU tracing was on.
    pub switches: u64,
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
    /// Host context switches at the last window's end, and their total while traced.
    last_switches: u64,
    switches_traced: u64,
}

/// `--stats` counters of each program in [`crate::cost::PROGRAMS`]: run time, runs.
const PROGRAM_COUNTERS: [(&str, &str); crate::cost::PROGRAMS.len()] = [
    ("bpf_on_cpu_sample_run_time_ns", "bpf_on_cpu_sample_runs"),
    ("bpf_sched_switch_run_time_ns", "bpf_sched_switch_runs"),
    ("bpf_sched_process_fork_run_time_ns", "bpf_sched_process_fork_runs"),
    ("bpf_finish_task_switch_run_time_ns", "bpf_finish_task_switch_runs"),
];

/// How often rate control looks at the switch rate while waiting for a window to end.
const TICK: Duration = Duration::from_millis(100);

/// A session whose BPF programs are loaded and attached, before any of its threads runs.
/// Whatever the process changes about its own thread now (dropping capabilities, which
/// belong to threads) holds for every thread [`Loaded::start`] starts.
pub struct Loaded {
    sampler: Sampler,
    processes: ProcessTable,
    options: SamplerOptions,
    started_off_cpu: Option<OffCpuOptions>,
    off_cpu_budget: OffCpuBudget,
}

impl Session {
    pub fn start(options: &SamplerOptions, off_cpu_budget: OffCpuBudget) -> anyhow::Result<Self> {
        Self::load(options, off_cpu_budget)?.start()
    }

    /// Loads and attaches the BPF programs, starting no thread.
    pub fn load(options: &SamplerOptions, off_cpu_budget: OffCpuBudget) -> anyhow::Result<Loaded> {
        // Before any file of another user is mapped (see `mapped_files`).
        crate::mapped_files::guard().context("installing the SIGBUS handler for mapped files")?;
        let processes = ProcessTable::new(options.version_env.clone());
        let started_off_cpu = starting_point(options.off_cpu.as_ref(), &off_cpu_budget)?;
        let started = SamplerOptions { off_cpu: started_off_cpu.clone(), ..options.clone() };
        let sampler = Sampler::attach(&started, processes.clone())?;
        Ok(Loaded { sampler, processes, options: options.clone(), started_off_cpu, off_cpu_budget })
    }
}

impl Loaded {
    /// Starts reading the programs' records, the process watcher and the symbolizer.
    pub fn start(self) -> anyhow::Result<Session> {
        let Loaded { mut sampler, processes, options, started_off_cpu, off_cpu_budget } = self;
        sampler.start_reading()?;
        let watcher = spawn_process_watcher(processes.clone())?;
        let symbolizer = Symbolizer::spawn(processes.clone(), sampler.python_names())?;
        let rate = RateControl::attached(options.off_cpu.as_ref(), started_off_cpu.as_ref(), off_cpu_budget, &sampler)?;
        // Tests and scripts wait for this line before starting their workload.
        tracing::info!(frequency_hz = options.frequency_hz, off_cpu = options.off_cpu.is_some(), "sampling started");
        Ok(Session {
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
            last_switches: host_context_switches()?,
            switches_traced: 0,
        })
    }
}

impl Session {
    /// Waits until `until` (or until `stop` is set), then drains and symbolizes the window.
    pub fn next_window(&mut self, until: Instant, stop: &AtomicBool) -> anyhow::Result<Window> {
        loop {
            let now = Instant::now();
            if now >= until || stop.load(Ordering::Relaxed) {
                break;
            }
            self.sampler.tick_run_stats();
            if let Some(rate) = self.rate.as_mut() {
                if rate.due() {
                    let before = rate.rates();
                    let rates = rate.tick(RateCounters::read(&self.sampler)?, Instant::now());
                    if rates != before {
                        self.sampler.set_off_cpu_rates(rates.probability, rates.thread_quota, rates.stamp_limit)?;
                    }
                }
            }
            thread::sleep(TICK.min(until - now));
        }
        let raw = self.sampler.drain()?;
        let switches_now = host_context_switches()?;
        let switches = if self.rate.is_some() { switches_now.saturating_sub(self.last_switches) } else { 0 };
        self.last_switches = switches_now;
        self.switches_traced += switches;
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
        Ok(Window { samples, stats: raw.stats, map_fill: raw.map_fill, unwind: raw.unwind, partly_unknown, switches })
    }

    /// Switches to other settings. Call right after a window was drained, so the counts
    /// already taken convert with the period they were taken at.
    pub fn apply(&mut self, settings: &Settings) -> anyhow::Result<()> {
        if self.sampler.period_ns != 1_000_000_000 / settings.frequency_hz.max(1) {
            self.sampler.set_frequency(settings.frequency_hz)?;
        }
        let start = starting_point(settings.off_cpu.as_ref(), &settings.off_cpu_budget)?;
        self.sampler.set_off_cpu(start.as_ref())?;
        self.rate = RateControl::attached(settings.off_cpu.as_ref(), start.as_ref(), settings.off_cpu_budget, &self.sampler)?;
        tracing::info!(frequency_hz = settings.frequency_hz, off_cpu = settings.off_cpu.is_some(), "sampling settings changed");
        Ok(())
    }

    /// In-kernel cost of each loaded BPF program since start, by index in
    /// [`crate::cost::PROGRAMS`] (empty without BPF statistics).
    pub fn program_costs(&self) -> Vec<(usize, ProgramCost)> {
        self.sampler.program_costs()
    }

    pub fn period_ns(&self) -> u64 {
        self.sampler.period_ns
    }

    pub fn processes(&self) -> &ProcessTable {
        &self.processes
    }

    /// The custom-label sets samples' `key.labels` stand for.
    pub fn label_sets(&self) -> crate::labels::LabelSets {
        self.sampler.label_sets()
    }

    /// The tgid that forked `pid`, if the kernel recorded the fork.
    pub fn parent_of(&self, pid: u32) -> Option<u32> {
        self.sampler.parent_of(pid)
    }

    pub fn windows(&self) -> u64 {
        self.windows
    }

    pub fn max_map_fill(&self) -> f64 {
        self.max_map_fill
    }

    /// The agent's own losses since the start.
    pub fn agent_losses(&self) -> crate::sample::AgentLosses {
        self.sampler.agent_losses()
    }

    /// Every BPF counter since the start, plus the agent's own losses.
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        let mut counters: BTreeMap<&'static str, u64> =
            Stat::ALL.iter().map(|stat| (stat.name(), self.totals.get(*stat))).collect();
        counters.insert("switches", self.switches_traced);
        counters.insert("off_cpu_switch_in", self.off_cpu_switch_in() as u64);
        let losses = self.sampler.agent_losses();
        counters.insert("aggregate_full", losses.aggregate_full);
        counters.insert("wait_without_snapshot", losses.wait_without_snapshot);
        counters.insert("switch_out_without_end", losses.switch_out_without_end);
        counters.insert("pending_expired", losses.pending_expired);
        counters.insert("stamped_without_stack", losses.stamped_without_stack);
        counters.insert("file_pages_truncated", crate::mapped_files::truncated_pages());
        counters.insert("malformed_records", losses.malformed);
        counters.insert("python_processes", losses.python.processes);
        counters.insert("python_unknown_version", losses.python.unknown_version);
        counters.insert("python_frames_unnamed", losses.python.code_unreadable);
        counters.insert("python_stacks_unmatched", losses.python.stacks_unmatched);
        counters.insert("label_processes", losses.labels.processes);
        counters.insert("labels_high_cardinality_dropped", losses.labels.high_cardinality_dropped);
        counters.insert("request_snapshots", losses.labels.requests);
        counters.insert("label_sets_dropped", losses.labels.sets_dropped);
        counters.insert("labels_unmatched", losses.labels.unmatched);
        counters.insert("label_libraries_pending", losses.labels.libraries_pending);
        counters.insert("thread_context_keys_unknown", losses.labels.thread_keys_unknown);
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

    /// Whether off-CPU waits get their stacks at switch-in.
    pub fn off_cpu_switch_in(&self) -> bool {
        self.sampler.switch_in()
    }

    /// Share of switch-outs recorded so far (1 = every switch), when off-CPU is on.
    pub fn off_cpu_effective_sampling(&self) -> Option<f64> {
        self.rate.as_ref().map(RateControl::effective)
    }

    /// The per-thread quota rate control set last (switch-outs per 100 ms recorded at
    /// p = 1); None without rate control.
    pub fn off_cpu_thread_quota(&self) -> Option<u32> {
        self.rate.as_ref().map(|rate| rate.rates().thread_quota)
    }

    /// The stamp limit rate control set last, while off-CPU tracing is on.
    pub fn off_cpu_stamp_limit(&self) -> Option<u32> {
        self.rate.as_ref().map(|rate| rate.rates().stamp_limit)
    }
}

/// The cumulative kernel counters rate control follows.
#[derive(Clone, Copy, Debug, Default)]
struct RateCounters {
    switches: u64,
    record_ns: u64,
    /// Switch-outs recorded, and those of them recorded at their thread's own probability.
    recorded: u64,
    by_quota: u64,
    /// The part of `record_ns` spent on the quotas' records.
    quota_record_ns: u64,
    /// Switch-outs stamped.
    stamped: u64,
}

impl RateCounters {
    /// On the switch-in path, only waits of at least `min_block` are candidates for a
    /// record: they stand for the switches, and no thread has a quota.
    fn read(sampler: &Sampler) -> anyhow::Result<Self> {
        if sampler.switch_in() {
            return Ok(Self {
                switches: sampler.stat_total(Stat::LongWaitsEnded)?,
                record_ns: sampler.stat_total(Stat::SwitchOutRecordNs)?,
                recorded: sampler.stat_total(Stat::SwitchOutsRecorded)?,
                by_quota: 0,
                quota_record_ns: 0,
                stamped: 0,
            });
        }
        Ok(Self {
            switches: host_context_switches()?,
            record_ns: sampler.stat_total(Stat::SwitchOutRecordNs)?,
            recorded: sampler.stat_total(Stat::SwitchOutsRecorded)?,
            by_quota: sampler.stat_total(Stat::SwitchOutsByQuota)?,
            quota_record_ns: sampler.stat_total(Stat::SwitchOutQuotaRecordNs)?,
            stamped: sampler.stat_total(Stat::SwitchOutsStamped)?,
        })
    }
}

/// Context switches on this host since boot (`ctxt` in /proc/stat), the rate the off-CPU
/// program runs at: the kernel counts them, so the program need not.
fn host_context_switches() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    stat.lines()
        .find_map(|line| line.strip_prefix("ctxt ")?.trim().parse().ok())
        .context("no ctxt line in /proc/stat")
}

/// The off-CPU options to attach with: the probability that fits the budget at the
/// host's switch rate now (measured over 100 ms), so tracing does not start by recording
/// every switch until rate control's first tick, and the burst quota of the budget.
fn starting_point(off_cpu: Option<&OffCpuOptions>, budget: &OffCpuBudget) -> anyhow::Result<Option<OffCpuOptions>> {
    let Some(off) = off_cpu else { return Ok(None) };
    let (before, since) = (host_context_switches()?, Instant::now());
    thread::sleep(Duration::from_millis(100));
    let rate = host_context_switches()?.saturating_sub(before) as f64 / since.elapsed().as_secs_f64();
    let probability = (budget.assumed_rate() / rate.max(1.0)).clamp(MIN_PROBABILITY, off.sample_probability);
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Some(OffCpuOptions { sample_probability: probability, burst_quota: budget.burst_quota(cpus), ..off.clone() }))
}

/// Keeps off-CPU recording under its [`OffCpuBudget`]. Each thread's first switch-outs
/// of a tick are recorded at p = 1 (its quota); rate control keeps the quotas' records
/// under half of the budget by lowering the quota, and the switch-outs past them under
/// the rest by lowering the sampling probability. Recorded waits carry the probability
/// they were recorded at, so totals stay unbiased while either moves.
struct RateControl {
    budget: OffCpuBudget,
    max_probability: f64,
    probability: f64,
    max_thread_quota: u32,
    thread_quota: u32,
    max_stamp_limit: u32,
    stamp_limit: u32,
    /// Smoothed in-kernel cost of the stamps, ns a second (NaN before the first tick).
    stamp_cpu_rate: f64,
    /// Smoothed share of the budget the quotas' records take (NaN before the first tick).
    quota_load: f64,
    /// Smoothed in-kernel cost of a record within the quotas, ns (NaN before the first).
    quota_record_ns: f64,
    last: Instant,
    last_counters: RateCounters,
    weighted: f64,
    switches_total: f64,
}

/// What rate control sets for the next tick.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rates {
    probability: f64,
    thread_quota: u32,
    stamp_limit: u32,
}

/// The lowest probability rate control goes to: one switch in 10,000.
const MIN_PROBABILITY: f64 = 1e-4;
/// The most rate control raises the probability or the quota by in one tick.
const RAISE_PER_TICK: f64 = 1.25;
/// The share of each budget the threads' quotas may take; sampling gets the rest, so a
/// host with thousands of threads waking often still has every thread sampled. 0.9:
/// at 0.75 the windows bench's worst window at defaults was +12.4% (records at 11 µs)
/// and +5.7% (6.8 µs); at 0.9, -1.6%, -7.9% and -3.4% (6.4 to 7.4 µs).
const QUOTA_SHARE: f64 = 0.9;
/// Weight of a tick in the smoothed quota load.
const QUOTA_SMOOTHING: f64 = 0.1;
/// The share of the CPU budget stamps may take (see `OffCpuOptions::stamp_limit`); the
/// quotas' share is of what they leave. At 0.4 (2 ms/s of the default 5) the windows
/// bench's syncer, about 14,000 stamps a second at 150 ns, kept its stamps only part of
/// the time and came out 15 to 42% under; at 0.5 the five threads within their quotas
/// (records at 10.6 µs) stayed within 1.1%.
const STAMP_SHARE: f64 = 0.5;
/// What a stamped switch-out costs in the kernel: a clock read as it leaves, one at its
/// switch-in, and a slot's update (the README's figures). Not measured per stamp: that
/// would take a third clock read.
const STAMP_NS: f64 = 150.0;
/// Weight of a tick in the smoothed cost of a record: about five seconds.
const COST_SMOOTHING: f64 = 0.02;

impl RateControl {
    /// Rate control for off-CPU tracing just attached with `started` (see
    /// [`starting_point`]), if it is on. The counters are cumulative: it starts from their
    /// values now, or its first tick would see every switch since start as one tick's worth.
    fn attached(
        options: Option<&OffCpuOptions>,
        started: Option<&OffCpuOptions>,
        budget: OffCpuBudget,
        sampler: &Sampler,
    ) -> anyhow::Result<Option<Self>> {
        let (Some(options), Some(started)) = (options, started) else {
            return Ok(None);
        };
        Ok(Some(Self::new(
            options,
            budget,
            RateCounters::read(sampler)?,
            started.sample_probability,
        )))
    }

    /// `options` hold the highest probability and quota; tracing was attached at
    /// `probability` and the highest quota.
    fn new(
        options: &OffCpuOptions,
        budget: OffCpuBudget,
        counters_now: RateCounters,
        probability: f64,
    ) -> Self {
        Self {
            budget,
            max_probability: options.sample_probability,
            probability,
            max_thread_quota: options.thread_quota,
            thread_quota: options.thread_quota,
            max_stamp_limit: options.stamp_limit,
            stamp_limit: options.stamp_limit,
            stamp_cpu_rate: f64::NAN,
            quota_load: f64::NAN,
            quota_record_ns: f64::NAN,
            last: Instant::now(),
            last_counters: counters_now,
            weighted: 0.0,
            switches_total: 0.0,
        }
    }

    /// Whether a tick's time has passed: a burst of switches (a load starting) is
    /// recorded at the old probability for at most this long.
    fn due(&self) -> bool {
        self.last.elapsed() >= TICK
    }

    /// Takes the counters' values at `now`; returns the probability and quota for the
    /// next tick.
    fn tick(&mut self, counters: RateCounters, now: Instant) -> Rates {
        let elapsed = now
            .saturating_duration_since(self.last)
            .as_secs_f64()
            .max(1e-3);
        let delta = |now: u64, then: u64| now.saturating_sub(then) as f64;
        let switches = delta(counters.switches, self.last_counters.switches);
        let record_ns = delta(counters.record_ns, self.last_counters.record_ns);
        let recorded = delta(counters.recorded, self.last_counters.recorded);
        let by_quota = delta(counters.by_quota, self.last_counters.by_quota).min(recorded);
        let quota_ns = delta(counters.quota_record_ns, self.last_counters.quota_record_ns).min(record_ns);
        let stamped = delta(counters.stamped, self.last_counters.stamped);
        self.weighted += by_quota + (switches - by_quota).max(0.0) * self.probability;
        self.switches_total += switches;
        self.last_counters = counters;
        self.last = now;

        // The quotas' share of each budget: their records' count, and their own part of
        // the recording time. Their records cost less than the sampled ones: mostly
        // sleeps and lock waits that take a kept kernel stack, where the sampled ones are
        // often a frequent switcher's I/O, walked every time. (Charged at the average,
        // the windows bench's quotas were cut for costs they did not have.)
        let quota_rate = by_quota / elapsed;
        let quota_cpu_rate = quota_ns / elapsed;
        let count_budget = self.budget.switches_per_s as f64;
        let stamp_cpu_rate = stamped * STAMP_NS / elapsed;
        self.stamp_limit = self.next_stamp_limit(stamp_cpu_rate);
        // Stamps are paid first: the quotas and sampling share what they leave.
        let cpu_budget = self.budget.kernel_cpu_per_s.as_nanos() as f64;
        let cpu_budget = cpu_budget - self.stamp_cpu_rate.min(cpu_budget * STAMP_SHARE);
        // The quotas' cost at their record's cost averaged over seconds: it swings from
        // tick to tick (ticks on a VM here measured 7 to 25 µs a record for the same
        // threads), and each quota step down on a costly tick thins the rarely-blocking
        // threads for a second. The budget is a rate over seconds; record counts, not
        // cost, are what jumps when a load starts.
        if by_quota > 0.0 {
            let cost = quota_ns / by_quota;
            self.quota_record_ns = if self.quota_record_ns.is_nan() {
                cost
            } else {
                self.quota_record_ns + COST_SMOOTHING * (cost - self.quota_record_ns)
            };
        }
        let cost_per_record = if self.quota_record_ns.is_nan() { ASSUMED_RECORD_NS } else { self.quota_record_ns };
        let tick_load = (quota_rate / count_budget).max(quota_rate * cost_per_record / cpu_budget);
        if tick_load > 2.0 * QUOTA_SHARE {
            // Far over its share (many new threads): down at once, by what this tick's
            // records at the quota cost.
            self.thread_quota = (self.thread_quota as f64 * QUOTA_SHARE / tick_load) as u32;
            self.quota_load = QUOTA_SHARE;
        } else {
            // Otherwise one step a tick, following the load smoothed over about a second:
            // a step of the quota changes the weights of the threads near it, and the
            // steadier it is, the steadier their totals from window to window.
            self.quota_load = if self.quota_load.is_nan() {
                tick_load
            } else {
                self.quota_load + QUOTA_SMOOTHING * (tick_load - self.quota_load)
            };
            if self.quota_load > QUOTA_SHARE {
                self.thread_quota = self.thread_quota.saturating_sub(1);
            } else if self.quota_load * RAISE_PER_TICK <= QUOTA_SHARE {
                self.thread_quota = (self.thread_quota + 1).min(self.max_thread_quota);
            }
        }

        // Sampling gets what the quotas leave of each budget.
        let sampled_switch_rate = (switches - by_quota).max(0.0) / elapsed;
        let by_count = (count_budget - quota_rate.min(count_budget * QUOTA_SHARE))
            / sampled_switch_rate.max(1.0);
        // Recording cost is proportional to the probability it was recorded at.
        let sampled_cpu_rate = (record_ns - quota_ns).max(0.0) / elapsed;
        let by_cpu = if sampled_cpu_rate > 0.0 {
            let left = cpu_budget - quota_cpu_rate.min(cpu_budget * QUOTA_SHARE);
            self.probability * left / sampled_cpu_rate
        } else {
            f64::INFINITY
        };
        let target = by_count
            .min(by_cpu)
            .min(self.max_probability)
            .max(MIN_PROBABILITY);
        // Down at once when over budget, back up by a quarter a tick: a tick measured
        // under budget by chance (100 ms of a bursty load) then moves the next one only a
        // little over it, where doubling could take it to twice the budget.
        let next = if target < self.probability {
            target
        } else {
            (self.probability * RAISE_PER_TICK).min(target)
        };
        if (next - self.probability).abs() > self.probability * 0.05 {
            self.probability = next;
        }
        self.rates()
    }

    /// The stamp limit for the next tick, from the stamps' cost: cut at once in
    /// proportion when a tick's is over twice their share of the CPU budget (many
    /// threads starting to wait long), otherwise by the cost smoothed over about a second,
    /// in proportion when over the share, raised by a quarter a tick when even that would
    /// stay within it. Smoothed, because one thread's switches come in bursts: cut on a
    /// tick's, the windows bench's syncer (2.1 ms/s of stamps for a 2.5 ms/s share)
    /// lost its stamps for a few ticks several times a minute, and those windows came out
    /// 4 to 16% under. A thread whose rate is just over a cut limit loses its stamps, its
    /// long waits are then sampled like its short ones.
    fn next_stamp_limit(&mut self, stamp_cpu_rate: f64) -> u32 {
        let share = self.budget.kernel_cpu_per_s.as_nanos() as f64 * STAMP_SHARE;
        if stamp_cpu_rate > 2.0 * share {
            self.stamp_cpu_rate = share;
            return (self.stamp_limit as f64 * share / stamp_cpu_rate) as u32;
        }
        self.stamp_cpu_rate = if self.stamp_cpu_rate.is_nan() {
            stamp_cpu_rate
        } else {
            self.stamp_cpu_rate + QUOTA_SMOOTHING * (stamp_cpu_rate - self.stamp_cpu_rate)
        };
        if self.stamp_cpu_rate > share {
            (self.stamp_limit as f64 * share / self.stamp_cpu_rate) as u32
        } else if self.stamp_cpu_rate * RAISE_PER_TICK <= share {
            ((self.stamp_limit as f64 * RAISE_PER_TICK) as u32).max(self.stamp_limit + 1).min(self.max_stamp_limit)
        } else {
            self.stamp_limit
        }
    }

    fn rates(&self) -> Rates {
        Rates {
            probability: self.probability,
            thread_quota: self.thread_quota,
            stamp_limit: self.stamp_limit,
        }
    }

    fn effective(&self) -> f64 {
        if self.switches_total == 0.0 {
            self.probability
        } else {
            self.weighted / self.switches_total
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{DEFAULT_STAMP_LIMIT, DEFAULT_THREAD_QUOTA};

    fn every_switch() -> OffCpuOptions {
        OffCpuOptions { sample_probability: 1.0, ..OffCpuOptions::default() }
    }

    /// Counters whose quota records cost what the others do.
    fn counters(switches: u64, record_ns: u64, recorded: u64, by_quota: u64) -> RateCounters {
        RateCounters {
            switches,
            record_ns,
            recorded,
            by_quota,
            quota_record_ns: record_ns * by_quota / recorded.max(1),
            stamped: 0,
        }
    }

    /// A deep-profile run starts and ends with new settings while the kernel's counters
    /// keep counting from the agent's start: the first tick must see one second's
    /// switches, not every switch since start.
    #[test]
    fn settings_switch_keeps_the_estimate() {
        let since_start = counters(3_000_000_000, 40_000_000_000, 20_000_000, 0);
        let mut rate = RateControl::new(&every_switch(), OffCpuBudget::default(), since_start, 1.0);
        let second_later = counters(
            since_start.switches + 1000,
            since_start.record_ns + 2_000_000,
            since_start.recorded + 1000,
            0,
        );
        let rates = rate.tick(second_later, rate.last + Duration::from_secs(1));
        assert_eq!(
            rates.probability, 1.0,
            "1000 switches/s at 2 ms/s is within budget"
        );
        assert!(
            (rate.effective() - 1.0).abs() <= 0.1,
            "weights would be off by {}x",
            1.0 / rate.effective()
        );
    }

    #[test]
    fn switch_rate_over_budget_lowers_the_probability() {
        let mut rate = RateControl::new(
            &every_switch(),
            OffCpuBudget::default(),
            RateCounters::default(),
            1.0,
        );
        let rates = rate.tick(
            counters(40_000, 0, 0, 0),
            rate.last + Duration::from_secs(1),
        );
        assert_eq!(rates.probability, 0.1);
    }

    /// Switch rate within budget, but the recorded switch-outs are expensive (deep stacks):
    /// the in-kernel CPU budget binds.
    #[test]
    fn in_kernel_cpu_over_budget_lowers_the_probability() {
        let budget = OffCpuBudget {
            switches_per_s: 4000,
            kernel_cpu_per_s: Duration::from_millis(10),
        };
        let mut rate = RateControl::new(&every_switch(), budget, RateCounters::default(), 1.0);
        let rates = rate.tick(
            counters(2000, 40_000_000, 2000, 0),
            rate.last + Duration::from_secs(1),
        );
        assert!(
            (rates.probability - 0.25).abs() < 1e-9,
            "40 ms/s is over a 10 ms/s budget: {}",
            rates.probability
        );
        // At the lower probability the cost fits, and nothing changes.
        let next = rate.last_counters;
        let within = counters(
            next.switches + 2000,
            next.record_ns + 10_000_000,
            next.recorded + 500,
            0,
        );
        assert_eq!(
            rate.tick(within, rate.last + Duration::from_secs(1))
                .probability,
            rates.probability
        );
    }

    /// Under budget, the probability comes back up a quarter at a time, not all at once.
    #[test]
    fn the_probability_rises_slowly() {
        let mut rate = RateControl::new(
            &every_switch(),
            OffCpuBudget::default(),
            RateCounters::default(),
            0.01,
        );
        let quiet = counters(1000, 100_000, 10, 0);
        assert_eq!(
            rate.tick(quiet, rate.last + Duration::from_secs(1))
                .probability,
            0.0125
        );
    }

    #[test]
    fn unlimited_budget_never_samples() {
        let mut rate = RateControl::new(
            &every_switch(),
            OffCpuBudget::UNLIMITED,
            RateCounters::default(),
            1.0,
        );
        let busy = counters(2_000_000, 4_000_000_000, 2_000_000, 20_000);
        let rates = rate.tick(busy, rate.last + Duration::from_secs(1));
        assert_eq!(
            rates,
            Rates {
                probability: 1.0,
                thread_quota: DEFAULT_THREAD_QUOTA,
                stamp_limit: DEFAULT_STAMP_LIMIT,
            }
        );
    }

    /// Stamps far over their share of the CPU budget (2.5 ms/s of a 5 ms/s budget): the
    /// limit is cut at once in proportion, and raised back a quarter a tick once their
    /// smoothed cost fits again. Their cost comes off what the quotas and sampling get.
    #[test]
    fn stamps_are_held_to_their_share_of_the_budget() {
        let mut rate = RateControl::new(&every_switch(), OffCpuBudget::default(), RateCounters::default(), 1.0);
        let tick = |rate: &mut RateControl, stamps: u64| {
            let last = rate.last_counters;
            let next = RateCounters { switches: last.switches + 10_000, stamped: last.stamped + stamps, ..last };
            rate.tick(next, rate.last + TICK)
        };
        // 6 ms/s of stamps: over twice their share.
        let rates = tick(&mut rate, 4_000);
        assert_eq!(rates.stamp_limit, DEFAULT_STAMP_LIMIT * 5 / 12);
        let mut limits = Vec::new();
        for _ in 0..20 {
            limits.push(tick(&mut rate, 100).stamp_limit);
        }
        assert!(limits.windows(2).all(|pair| pair[0] <= pair[1]), "{limits:?}");
        assert_eq!(limits.last(), Some(&DEFAULT_STAMP_LIMIT), "{limits:?}");
        // A tick at 1.5 times their share is not cut at once...
        assert_eq!(tick(&mut rate, 2_500).stamp_limit, DEFAULT_STAMP_LIMIT);
        // ...a share's worth smoothed over ticks is.
        let held: Vec<u32> = (0..20).map(|_| tick(&mut rate, 2_500).stamp_limit).collect();
        assert!(held.last().unwrap() < &DEFAULT_STAMP_LIMIT, "{held:?}");
        // Stamps at their whole share leave the quotas and sampling 2.5 ms/s, not 5.
        let by_cpu_alone = OffCpuBudget { switches_per_s: u64::MAX, ..OffCpuBudget::default() };
        let stamped = RateControl::new(&every_switch(), by_cpu_alone, RateCounters::default(), 1.0);
        let mut without = RateControl::new(&every_switch(), by_cpu_alone, RateCounters::default(), 1.0);
        let mut with = stamped;
        let sampled = |rate: &mut RateControl, stamps: u64| {
            let last = rate.last_counters;
            // 400 µs of sampled records in 100 ms: 4 ms/s.
            let next = RateCounters {
                switches: last.switches + 10_000,
                record_ns: last.record_ns + 400_000,
                recorded: last.recorded + 40,
                stamped: last.stamped + stamps,
                ..last
            };
            rate.tick(next, rate.last + TICK).probability
        };
        let (p_without, p_with) = (sampled(&mut without, 0), sampled(&mut with, 1_666));
        assert!((p_without - 1.0).abs() < 1e-9, "4 ms/s fits 5: {p_without}");
        assert!((p_with - 0.625).abs() < 0.01, "2.5 ms/s left for 4: {p_with}");
    }

    /// Thousands of threads each within their quota: the quota comes down at once to
    /// what fits its share of the budget, and sampling gets what is left.
    #[test]
    fn quotas_far_over_their_share_come_down_at_once() {
        let mut rate = RateControl::new(
            &every_switch(),
            OffCpuBudget::default(),
            RateCounters::default(),
            0.05,
        );
        // 4,000 quota records/s at 4 µs each: 16 ms/s of a 5 ms/s budget.
        let rates = rate.tick(
            counters(100_000, 16_000_000, 4000, 4000),
            rate.last + Duration::from_secs(1),
        );
        assert_eq!(
            rates.thread_quota,
            (DEFAULT_THREAD_QUOTA as f64 * QUOTA_SHARE / 3.2) as u32
        );
        // What the quotas leave of the 4,000/s for 96,000 switches/s.
        assert!(
            (rates.probability - 4000.0 * (1.0 - QUOTA_SHARE) / 96_000.0).abs() < 1e-9,
            "{}",
            rates.probability
        );
    }

    /// A little over its share, the quota comes down one step a tick.
    #[test]
    fn quotas_over_their_share_come_down_a_step_a_tick() {
        let mut rate = RateControl::new(
            &every_switch(),
            OffCpuBudget::default(),
            RateCounters::default(),
            0.05,
        );
        // 3,800 quota records/s of 4,000, at 1 µs each: 95% of the count budget.
        let rates = rate.tick(
            counters(100_000, 3_800_000, 3800, 3800),
            rate.last + Duration::from_secs(1),
        );
        assert_eq!(rates.thread_quota, DEFAULT_THREAD_QUOTA - 1);
    }

    /// One tick whose records cost five times more (a VM's neighbour, cold caches) does
    /// not cut the quota: the budget is a rate over seconds, and a cut thins the
    /// rarely-blocking threads for a second. Costly ticks that last do.
    #[test]
    fn quotas_follow_the_cost_of_a_record_over_seconds() {
        let mut rate = RateControl::new(&every_switch(), OffCpuBudget::default(), RateCounters::default(), 0.05);
        let tick = |rate: &mut RateControl, record_ns: u64| {
            let last = rate.last_counters;
            // 60 quota records in 100 ms: 600/s, 2.4 ms/s of 5 at 4 µs each.
            let next = counters(last.switches + 10_000, last.record_ns + 60 * record_ns, last.recorded + 60, last.by_quota + 60);
            rate.tick(next, rate.last + TICK).thread_quota
        };
        for _ in 0..50 {
            assert_eq!(tick(&mut rate, 4_000), DEFAULT_THREAD_QUOTA);
        }
        assert_eq!(tick(&mut rate, 20_000), DEFAULT_THREAD_QUOTA);
        let quotas: Vec<u32> = (0..100).map(|_| tick(&mut rate, 20_000)).collect();
        assert!(quotas.last().unwrap() < &(DEFAULT_THREAD_QUOTA / 2), "{quotas:?}");
    }

    /// The quotas are charged their own records' cost, not the average of all records:
    /// on the windows bench their sleeps and lock waits take kept kernel stacks (about
    /// 11 µs a record on a slow day) while the sampled records are mostly the syncer's
    /// I/O, walked every time (about 30 µs). Charged the average, 4 ms/s of quota
    /// records here look like 4.7 and the quota is cut below what fits.
    #[test]
    fn quotas_are_charged_their_own_records_cost() {
        let mut rate = RateControl::new(&every_switch(), OffCpuBudget::default(), RateCounters::default(), 0.05);
        let mut rates = rate.rates();
        for _ in 0..50 {
            let last = rate.last_counters;
            // In 100 ms: 40 quota records at 10 µs and 4 sampled ones at 30 µs, 4 and 1.2
            // ms/s of a 5 ms/s budget.
            let next = RateCounters {
                switches: last.switches + 5_000,
                record_ns: last.record_ns + 40 * 10_000 + 4 * 30_000,
                recorded: last.recorded + 44,
                by_quota: last.by_quota + 40,
                quota_record_ns: last.quota_record_ns + 40 * 10_000,
                stamped: 0,
            };
            rates = rate.tick(next, rate.last + TICK);
        }
        assert_eq!(rates.thread_quota, DEFAULT_THREAD_QUOTA, "4 ms/s of quota records is within their 4.5");
        assert!(rates.probability < 0.05, "the sampled 1.2 ms/s is over the 1 ms/s the quotas leave: {}", rates.probability);
    }

    /// A quota cut by a busy tick comes back once the load is gone, one step a tick, up
    /// to the configured one.
    #[test]
    fn quotas_come_back_up_a_step_a_tick() {
        let mut rate = RateControl::new(
            &every_switch(),
            OffCpuBudget::default(),
            RateCounters::default(),
            1.0,
        );
        let busy = rate.tick(
            counters(100_000, 16_000_000, 4000, 4000),
            rate.last + Duration::from_secs(1),
        );
        let mut quotas = vec![busy.thread_quota];
        for _ in 0..40 {
            let last = rate.last_counters;
            let quiet = counters(
                last.switches + 1000,
                last.record_ns + 100_000,
                last.recorded + 100,
                last.by_quota + 100,
            );
            quotas.push(
                rate.tick(quiet, rate.last + Duration::from_secs(1))
                    .thread_quota,
            );
        }
        assert!(
            quotas.windows(2).all(|q| q[1] == q[0] || q[1] == q[0] + 1),
            "{quotas:?}"
        );
        assert_eq!(quotas.last(), Some(&DEFAULT_THREAD_QUOTA), "{quotas:?}");
    }

    /// The kernel's burst quota is twice a CPU's share of the budget per 10 ms: steady
    /// recording under rate control stays below it; "every switch" has none.
    #[test]
    fn burst_quota_follows_the_budget() {
        let by_count = OffCpuBudget { switches_per_s: 4000, kernel_cpu_per_s: Duration::from_secs(1) };
        assert_eq!(by_count.burst_quota(2), 40);
        assert_eq!(by_count.burst_quota(64), 2);
        assert_eq!(OffCpuBudget { switches_per_s: 10, ..by_count }.burst_quota(8), 1);
        assert_eq!(OffCpuBudget::UNLIMITED.burst_quota(2), 0);
    }

    /// At 5 µs a record, 5 ms/s of kernel CPU is 1,000 switch-outs a second: the quota
    /// follows the tighter budget, so a burst of expensive records stays near the CPU
    /// budget before rate control has measured their cost.
    #[test]
    fn burst_quota_follows_the_cpu_budget_when_it_binds() {
        let budget = OffCpuBudget { switches_per_s: 4000, kernel_cpu_per_s: Duration::from_millis(5) };
        assert_eq!(budget.burst_quota(2), 10);
        assert_eq!(budget.burst_quota(1), 20);
        // Only a budget with no limit at all has no quota.
        assert_eq!(OffCpuBudget { kernel_cpu_per_s: Duration::MAX, ..budget }.burst_quota(2), 40);
    }
}
