//! Sample stage: loads the BPF programs, attaches them, reads their records from the
//! ring buffer, unwinds user stacks and aggregates each window.
//!
//! Every on-CPU sample and every recorded switch-out arrives as a stack snapshot; a
//! reader thread drains the ring buffer every few milliseconds, so the buffer only needs
//! to absorb a short burst. Samples are unwound as they arrive, while the process and its
//! mappings are still there. A switch-out's snapshot waits for the record of its end: a
//! short wait drops it unread (most switch-outs), a long one is unwound and added to the
//! window in which it ended, weighted by the inverse of the sampling probability. Waits
//! still pending after [`COMPACT_AFTER`] are unwound early, so raw copies never pile up.
//!
//! This module loads, attaches and configures the programs; `reader` is the thread that
//! reads their records.

mod reader;

pub use reader::AgentLosses;
use reader::{Reader, StackBytes};

use std::{
    collections::HashMap,
    path::Path,
    sync::{mpsc, Arc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        kprobe::KProbeLinkId,
        raw_trace_point::RawTracePointLinkId,
        KProbe, PerfEvent, RawTracePoint, TracePoint,
    },
    Ebpf, EbpfLoader,
};
use profiler_pprof::waits::Histogram;
use profiler_common::{
    maps, Config, EVENT_LABELS, EVENT_PYTHON_STACK, EVENT_THREAD_CONTEXT, SnapshotHeader, Stat, SwitchOut, WaitEnd, EVENT_SAMPLE, EVENT_SWITCH_OUT, PENDING_SLOTS,
    StampedWait, ThreadQuota, EVENT_STAMPED_WAIT, THREAD_QUOTA_SLOTS,
    EVENT_WAIT_END, MAX_STACK_DEPTH, MAX_USER_STACK, TASK_COMM_LEN, USER_STACK_CHUNK,
};

use crate::{
    cost::{ProgramCost, RunStats, PROGRAMS},
    process::ProcessTable,
    labels::{LabelOptions, LabelSets, Labels},
    python::{self, Python, PythonNames, PythonOptions},
    unwind::{Outcome, UnwindCounts, Unwinder},
};

static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// How often the reader thread drains the ring buffer...
const POLL: Duration = Duration::from_millis(10);
/// ...and how soon again when the last drain found it busy: switch-outs of a thread
/// that blocks thousands of times a second (small synced writes) carry a stack copy
/// each and fill the ring in about a poll, so the reader keeps pace with the rate.
const BUSY_POLL: Duration = Duration::from_millis(1);
/// Records in one drain that mark the ring as busy.
const BUSY_RECORDS: usize = 64;
/// Records handled per poll at most: far more than a poll's worth at any sampling budget.
const MAX_RECORDS_PER_POLL: usize = 65536;
/// Switch-outs still waiting after this long are unwound and kept compact...
const COMPACT_AFTER: Duration = Duration::from_millis(200);
/// ...and sooner when their stack copies add up to this much (many threads blocking at
/// once), so the agent's memory stays bounded whatever the host does.
const MAX_RAW_BYTES: usize = 16 << 20;
/// The perf PMU aya opens kprobes with (kernels built without kprobes have none).
const KPROBE_PMU_TYPE: &str = "/sys/bus/event_source/devices/kprobe/type";

/// What to sample and how much memory the agent and the kernel may use for it.
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    /// On-CPU sampling frequency per CPU, in Hz.
    pub frequency_hz: u64,
    /// Only this process when set.
    pub pid: Option<u32>,
    pub off_cpu: Option<OffCpuOptions>,
    /// Distinct stacks aggregated per window; samples of further stacks are counted lost.
    pub max_stack_keys: u32,
    /// Most bytes of user stack copied per snapshot (rounded down to 1 KiB, at most 64
    /// KiB). A thread gets 16 KiB until its unwinds show what it needs (less, or up to
    /// this). Deeper stacks are unwound as far as the copy reaches.
    pub user_stack_bytes: u32,
    /// Size of the kernel ring buffer the snapshots pass through, in bytes: a power of two,
    /// or 0 for 1 MiB per CPU between 8 and 64 MiB. The agent maps it, so it counts in the
    /// agent's resident memory once written.
    pub ring_buffer_bytes: u32,
    /// Turn the kernel's BPF run-time statistics on (`BPF_ENABLE_STATS`), so the agent
    /// can report what its programs cost. Costs two clock reads per program run while on.
    pub bpf_stats: bool,
    /// Share of the time they are on, in (0, 1]; the costs are estimated from it (see
    /// [`crate::cost`]). 1 keeps them on and the costs exact.
    pub bpf_stats_share: f64,
    /// Threads that can be off-CPU at once and still be attributed.
    pub max_switched_out: u32,
    /// Environment variables a process's `version` label is read from, first set wins;
    /// empty reads no process's environment.
    pub version_env: Vec<String>,
    /// Python frames in the stacks of CPython processes.
    pub python: PythonOptions,
    /// Custom labels of processes that publish them.
    pub labels: LabelOptions,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            frequency_hz: 99,
            pid: None,
            off_cpu: None,
            max_stack_keys: 16384,
            user_stack_bytes: MAX_USER_STACK as u32,
            ring_buffer_bytes: 0,
            bpf_stats: true,
            bpf_stats_share: 0.1,
            max_switched_out: 65536,
            version_env: crate::process::default_version_env(),
            python: PythonOptions::default(),
            labels: LabelOptions::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct OffCpuOptions {
    /// Waits shorter than this are dropped.
    pub min_block: Duration,
    /// Probability of recording a switch-out, in (0, 1]. Recorded waits are weighted by its
    /// inverse, so totals stay unbiased.
    pub sample_probability: f64,
    /// Switch-outs each CPU records per 10 ms at `sample_probability` before the rest of
    /// those 10 ms records at 1/64 of it (0: no limit). The session sets it from its
    /// budget, for the bursts rate control has not caught up with yet.
    pub burst_quota: u32,
    /// A thread that switched out at most this many times in the last 100 ms has its
    /// switch-outs recorded at p = 1; one switching n times more at 1/n² (see
    /// `Config::offcpu_thread_quota`), or at `sample_probability` when that is higher.
    /// 0: all are sampled alike. Rate control lowers it when these records would take
    /// more than 9/10 of the budget.
    pub thread_quota: u32,
    /// A thread over `thread_quota` that switched out at most this many times in the
    /// last 100 ms has its switch-outs stamped once a long wait of it was found (see
    /// `Config::offcpu_stamp_limit`): each of its long waits then counts whole. 0: none.
    /// Rate control lowers it when stamps would take more than half of the CPU budget.
    pub stamp_limit: u32,
    /// How many switch-outs in a row of one thread from the same place (system call,
    /// user code address and stack pointer, state) take the kernel stack walked for the
    /// first (see `KernelStackCache`); the next is walked again. 0: every one is walked.
    pub kernel_stack_reuses: u32,
    pub path: OffCpuPath,
}

/// Where waits get their stacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OffCpuPath {
    /// At switch-in where the kernel allows a kprobe on the scheduler's
    /// `finish_task_switch` and is Linux 6.12 or newer (see [`SWITCH_IN_SINCE`]), else at
    /// switch-out.
    #[default]
    Auto,
    /// At switch-out, from `sched_switch` alone: the stacks of a sampled share of all
    /// switch-outs, before their waits' lengths are known.
    SwitchOut,
    /// At switch-in, or fail: only waits of at least `min_block` pay for stacks.
    SwitchIn,
}

/// Twenty switch-outs per 100 ms: every wait of a thread that blocks up to 200 times a
/// second (a lock holder, a sleeper on a 20 ms timer, a database call, a lock waiter
/// that wakes more than once per acquisition) is recorded.
pub const DEFAULT_THREAD_QUOTA: u32 = 20;

/// 2,500 switch-outs per 100 ms: a thread switching up to 25,000 times a second (the
/// windows bench's disk syncer, about 16,000) can have its long waits counted whole.
/// Stamps cost about 150 ns a switch-out on this project's VMs (two clock reads): one
/// such thread at the limit takes 3.8 ms/s, over the stamps' half of the default 5 ms/s,
/// and rate control then lowers the limit; the syncer takes about 2.1.
pub const DEFAULT_STAMP_LIMIT: u32 = 2_500;

/// At most 15 switch-outs from one place take the stack walked before them, the 16th
/// walks again: a kernel stack walk was two thirds of a record's in-kernel cost on this
/// project's VMs (11 of 16.5 µs; 22 to 31 µs a walk on slow days, against about 2 µs a
/// reuse), while a place that stops holding is found within 16 records. On a slow day of
/// the windows bench, at 7 the locker had 32 and 57 of its 97 long waits a second
/// recorded (two runs), at 15 it had 90 (README, "Kernel stacks reused").
pub const DEFAULT_KERNEL_STACK_REUSES: u32 = 15;

impl Default for OffCpuOptions {
    fn default() -> Self {
        Self {
            min_block: Duration::from_micros(1000),
            sample_probability: 1.0,
            burst_quota: 0,
            thread_quota: DEFAULT_THREAD_QUOTA,
            stamp_limit: DEFAULT_STAMP_LIMIT,
            kernel_stack_reuses: DEFAULT_KERNEL_STACK_REUSES,
            path: OffCpuPath::Auto,
        }
    }
}

/// An address stack, leaf first: the sampled instruction, then return addresses.
pub type Addrs = Arc<[u64]>;

/// Who a sample belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub tgid: u32,
    /// Thread id.
    pub pid: u32,
    /// `prev_state` of the switch-out (see [`profiler_common::SnapshotHeader::state`]);
    /// zero for on-CPU samples.
    pub state: u32,
    /// The thread's comm at sample time, so exited processes keep a name.
    pub comm: [u8; TASK_COMM_LEN],
    /// Its custom labels: an id of the sampler's [`LabelSets`], 0 for none.
    pub labels: u32,
    /// The request its labels named: a request id of the sampler's [`LabelSets`], 0
    /// for none.
    pub request: u32,
}

/// One aggregated entry of a window.
#[derive(Clone, Debug)]
pub struct RawSample {
    pub key: SampleKey,
    pub user: Option<Addrs>,
    pub kernel: Option<Addrs>,
    pub value: RawValue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawValue {
    OnCpuSamples(u64),
    /// Weighted off-CPU time, the waits behind it (sampled, not scaled) and each
    /// wait's length with its weight.
    OffCpu { ns: u64, waits: u64, durations: Histogram },
}

impl RawValue {
    /// One recorded wait of `elapsed_ns` weighted `weight_q16` (1/p in Q16).
    pub fn wait(elapsed_ns: u64, weight_q16: u64) -> Self {
        let mut durations = Histogram::default();
        durations.record(elapsed_ns, weight_q16);
        let ns = ((elapsed_ns as u128 * weight_q16 as u128) >> 16) as u64;
        RawValue::OffCpu { ns, waits: 1, durations }
    }
}

/// The aggregates of one window plus the counter deltas since the previous drain.
#[derive(Debug, Default)]
pub struct RawWindow {
    pub samples: Vec<RawSample>,
    pub stats: StatCounts,
    /// Unwinding results of the window.
    pub unwind: UnwindCounts,
    /// Share of `max_stack_keys` used, in [0, 1].
    pub map_fill: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatCounts(pub [u64; Stat::COUNT as usize]);

impl StatCounts {
    pub fn get(&self, stat: Stat) -> u64 {
        self.0[stat as usize]
    }

    fn delta_since(&self, earlier: &StatCounts) -> StatCounts {
        let mut out = StatCounts::default();
        for (i, slot) in out.0.iter_mut().enumerate() {
            *slot = self.0[i].saturating_sub(earlier.0[i]);
        }
        out
    }

    pub fn add(&mut self, other: &StatCounts) {
        for (slot, more) in self.0.iter_mut().zip(other.0) {
            *slot += more;
        }
    }
}

pub struct Sampler {
    bpf: Ebpf,
    config_map: Array<MapData, Config>,
    config: Config,
    stats: PerCpuArray<MapData, u64>,
    switched_out: BpfHashMap<MapData, u64, SwitchOut>,
    pending: Array<MapData, u64>,
    thread_quota: Array<MapData, ThreadQuota>,
    /// Child pid -> the tgid that forked it; None where tracefs gives no fork record layout.
    parents: Option<BpfHashMap<MapData, u32, u32>>,
    reader: Reader,
    last_stats: StatCounts,
    max_stack_keys: u32,
    perf_links: Vec<PerfEventLinkId>,
    off_cpu_link: Option<RawTracePointLinkId>,
    off_cpu_loaded: bool,
    /// Whether stamps may be on: the build with them loaded, the switch-out path, and a
    /// floor of at least [`STAMPS_MIN_BLOCK`].
    stamps: bool,
    /// The switch-in program's link while that path is on; why it cannot be, once tried.
    switch_in_link: Option<KProbeLinkId>,
    switch_in_unavailable: Option<String>,
    /// The kernel's BPF run-time statistics, on a share of the time while the sampler lives.
    run_stats: Option<RunStats>,
    pub period_ns: u64,
    python_names: PythonNames,
    label_sets: LabelSets,
}

impl Sampler {
    /// Loads and attaches the programs and starts reading their records. Fails with a
    /// one-line reason when the host cannot run them (not root, no BTF).
    pub fn start(options: &SamplerOptions, processes: ProcessTable) -> anyhow::Result<Self> {
        let mut sampler = Self::attach(options, processes)?;
        sampler.start_reading()?;
        Ok(sampler)
    }

    /// Loads and attaches the programs without starting a thread: records wait in the
    /// ring buffer until [`Sampler::start_reading`].
    pub fn attach(options: &SamplerOptions, processes: ProcessTable) -> anyhow::Result<Self> {
        preflight(options)?;
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::SWITCH_OUT, options.max_switched_out);
        loader.map_max_entries(maps::EVENTS, ring_buffer_bytes(options.ring_buffer_bytes)?);
        let mut bpf = loader
            .load(BPF_OBJECT)
            .map_err(|err| anyhow!("loading the BPF programs failed: {}", chain(&err)))?;

        let fork_child_pid_offset = fork_child_pid_offset();
        let config = Config {
            filter_tgid: options.pid.unwrap_or(0),
            offcpu_quota_epoch_factor: ((1u64 << 32) / quota_epoch_jiffies().max(2) as u64) as u32,
            user_stack_bytes: user_stack_bytes(options.user_stack_bytes),
            fork_child_pid_offset: fork_child_pid_offset.unwrap_or(0),
            python_timing: (options.bpf_stats && options.bpf_stats_share >= 1.0) as u32,
            // Without it no labels, and no frames of CPython before 3.11 (whose thread
            // states are found by thread pointer), are read; the rest works.
            fsbase_offset: if options.labels.enabled || options.python.enabled { crate::kernel_btf::fsbase_offset().unwrap_or(0) } else { 0 },
            ..Config::default()
        };
        let mut config_map: Array<MapData, Config> = take(&mut bpf, maps::CONFIG)?;
        config_map
            .set(0, config, 0)
            .context("writing the BPF config")?;
        let program: &mut PerfEvent = bpf
            .program_mut("on_cpu_sample")
            .ok_or_else(|| anyhow!("BPF object has no on_cpu_sample program"))?
            .try_into()?;
        program
            .load()
            .map_err(|err| anyhow!("the kernel rejected the on-CPU program: {}", chain(&err)))?;
        let parents = match fork_child_pid_offset {
            Some(_) => attach_fork_tracepoint(&mut bpf)
                .map_err(|err| tracing::warn!(error = %err, "short-lived processes are named by their command: the fork tracepoint did not attach"))
                .ok()
                .map(|()| take(&mut bpf, maps::PARENTS))
                .transpose()?,
            None => {
                tracing::warn!("short-lived processes are named by their command: tracefs has no sched_process_fork format");
                None
            }
        };
        let ring: RingBuf<MapData> = take(&mut bpf, maps::EVENTS)?;
        let mut stack_bytes_map: BpfHashMap<MapData, u32, u32> = take(&mut bpf, maps::STACK_BYTES)?;
        let stack_bytes = StackBytes {
            // A failed write only means the thread keeps getting full copies.
            write: Box::new(move |tid, bytes| {
                let _ = stack_bytes_map.insert(tid, bytes, 0);
            }),
            learnt: HashMap::new(),
            max: config.user_stack_bytes,
        };
        let python_names = PythonNames::default();
        let mut python =
            Python::new(options.python, python_names.clone(), per_process(take(&mut bpf, maps::PYTHON_PROCESSES)?, maps::PYTHON_PROCESSES));
        let label_sets = LabelSets::default();
        let mut labels = Labels::new(
            options.labels.clone(),
            label_sets.clone(),
            per_process(take(&mut bpf, maps::LABEL_PROCESSES)?, maps::LABEL_PROCESSES),
        );
        // Before the programs attach: the processes already running have their Python
        // frames and labels from their first sample on.
        let pids = match options.pid {
            Some(pid) => {
                processes.refresh(pid);
                vec![pid]
            }
            None => {
                processes.discover();
                processes.live_pids().into_iter().collect()
            }
        };
        for pid in pids {
            python.observe(pid, &processes);
            labels.observe(pid, &processes);
        }
        let reader = Reader::new(
            ring,
            Unwinder::new(processes.clone()),
            python,
            labels,
            processes,
            stack_bytes,
            options.max_stack_keys as usize,
            options.max_switched_out as usize,
        );

        let mut sampler = Self {
            config_map,
            config,
            stats: take(&mut bpf, maps::STATS)?,
            switched_out: take(&mut bpf, maps::SWITCH_OUT)?,
            pending: take(&mut bpf, maps::PENDING)?,
            thread_quota: take(&mut bpf, maps::THREAD_QUOTA)?,
            parents,
            reader,
            bpf,
            last_stats: StatCounts::default(),
            max_stack_keys: options.max_stack_keys,
            perf_links: Vec::new(),
            off_cpu_link: None,
            off_cpu_loaded: false,
            stamps: false,
            switch_in_link: None,
            switch_in_unavailable: None,
            run_stats: None,
            period_ns: 0,
            python_names,
            label_sets,
        };
        sampler.set_frequency(options.frequency_hz)?;
        sampler.set_off_cpu(options.off_cpu.as_ref())?;
        if options.bpf_stats {
            let bpf = &sampler.bpf;
            sampler.run_stats = RunStats::start(options.bpf_stats_share, || kernel_costs(bpf));
        }
        Ok(sampler)
    }

    /// The label sets samples' `labels` ids stand for.
    pub fn label_sets(&self) -> LabelSets {
        self.label_sets.clone()
    }

    /// Names of the Python frames in this sampler's stacks, for the symbolizer.
    pub fn python_names(&self) -> PythonNames {
        self.python_names.clone()
    }

    pub fn start_reading(&mut self) -> anyhow::Result<()> {
        self.reader.start()
    }

    /// (Re)attaches the on-CPU program at a new frequency. Call right after a drain: the
    /// samples already counted were taken at the old period.
    pub fn set_frequency(&mut self, frequency_hz: u64) -> anyhow::Result<()> {
        check_frequency(frequency_hz)?;
        let period_ns = 1_000_000_000 / frequency_hz;
        let program: &mut PerfEvent = self
            .bpf
            .program_mut("on_cpu_sample")
            .ok_or_else(|| anyhow!("BPF object has no on_cpu_sample program"))?
            .try_into()?;
        for link in self.perf_links.drain(..) {
            program.detach(link)?;
        }
        let cpus =
            aya::util::online_cpus().map_err(|(path, err)| anyhow!("reading {path}: {err}"))?;
        for cpu in cpus {
            // cpu-clock counts nanoseconds, so a fixed period gives exactly `frequency_hz`
            // samples per second of CPU time, and count × period converts to time.
            let link = program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(period_ns),
                    false,
                )
                .map_err(|err| anyhow!("attaching to cpu-clock on CPU {cpu}: {}", chain(&err)))?;
            self.perf_links.push(link);
        }
        self.period_ns = period_ns;
        Ok(())
    }

    /// Turns off-CPU tracing on (with these settings) or off.
    pub fn set_off_cpu(&mut self, options: Option<&OffCpuOptions>) -> anyhow::Result<()> {
        // The switch-in program goes first: once the config says so, `sched_switch` only
        // notes switch-outs, and they need it to end.
        let switch_in = match options.map(|off| off.path) {
            Some(OffCpuPath::Auto) => match switch_in_refused(&kernel_release()) {
                Some(reason) => {
                    tracing::info!(%reason, "off-CPU waits get their stacks at switch-out (sched_switch alone); --off-cpu-path switch-in forces the kprobe");
                    false
                }
                None => self.attach_switch_in().is_ok(),
            },
            Some(OffCpuPath::SwitchIn) => {
                self.attach_switch_in().map_err(|reason| anyhow!("off-CPU at switch-in is not available here: {reason}"))?;
                true
            }
            Some(OffCpuPath::SwitchOut) | None => false,
        };
        if !switch_in {
            self.detach_switch_in()?;
        }
        let path_changed = self.off_cpu_link.is_some() && (self.config.offcpu_switch_in != 0) != switch_in;
        self.config.offcpu_switch_in = switch_in as u32;
        let name = off_cpu_program(&kernel_release());
        let program: &mut RawTracePoint = self
            .bpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("BPF object has no {name} program"))?
            .try_into()?;
        match options {
            Some(off) => {
                let threshold = sampling_threshold(off.sample_probability)?;
                self.config.offcpu_sample_threshold = threshold;
                self.config.offcpu_min_ns = off.min_block.as_nanos() as u64;
                self.config.offcpu_burst_quota = off.burst_quota;
                self.config.offcpu_thread_quota = off.thread_quota;
                // The switch-in path measures every wait already; the build without stamps
                // has none; under the floor, a stamped thread's every wait would be a record.
                self.stamps = !switch_in && name == STAMPS_PROGRAM && off.min_block >= STAMPS_MIN_BLOCK;
                self.config.offcpu_stamp_limit = if self.stamps { off.stamp_limit } else { 0 };
                self.config.kernel_stack_reuses = off.kernel_stack_reuses;
                self.config_map.set(0, self.config, 0)?;
                if self.off_cpu_link.is_none() {
                    if !self.off_cpu_loaded {
                        program.load().map_err(|err| {
                            anyhow!("the kernel rejected the off-CPU program: {}", chain(&err))
                        })?;
                        self.off_cpu_loaded = true;
                        if name != STAMPS_PROGRAM {
                            tracing::info!(
                                "off-CPU without stamps on this kernel (older than {}.{}): the long waits of threads over their quota are sampled",
                                STAMPS_SINCE.0,
                                STAMPS_SINCE.1
                            );
                        }
                    }
                    let link = program.attach("sched_switch").map_err(|err| {
                        anyhow!(
                            "attaching to the sched_switch raw tracepoint (needs Linux 5.18 or later, which passes prev_state): {}",
                            chain(&err)
                        )
                    })?;
                    self.off_cpu_link = Some(link);
                }
            }
            None => {
                if let Some(link) = self.off_cpu_link.take() {
                    program.detach(link)?;
                    self.forget_switch_outs()?;
                }
                self.config.offcpu_sample_threshold = 0;
                self.config_map.set(0, self.config, 0)?;
            }
        }
        // Waits noted by one path are not closed by the other.
        if path_changed && self.off_cpu_link.is_some() {
            self.forget_switch_outs()?;
        }
        Ok(())
    }

    /// Whether off-CPU waits are recorded at switch-in.
    pub fn switch_in(&self) -> bool {
        self.switch_in_link.is_some() && self.config.offcpu_switch_in != 0
    }

    /// Loads and attaches the switch-in program once; remembers why it cannot be.
    fn attach_switch_in(&mut self) -> Result<(), String> {
        if self.switch_in_link.is_some() {
            return Ok(());
        }
        if let Some(reason) = &self.switch_in_unavailable {
            return Err(reason.clone());
        }
        let attached = (|| {
            // aya attaches kprobes through this PMU alone. Without it the attach fails, but
            // only after the program was verified (most of a second) and kallsyms read: a
            // deep-profile run's start would wait that long for nothing.
            if !Path::new(KPROBE_PMU_TYPE).exists() {
                return Err(format!("no kprobe PMU (`{KPROBE_PMU_TYPE}` is missing)"));
            }
            let symbol = switch_in_symbol()?;
            let program: &mut KProbe = self
                .bpf
                .program_mut("finish_task_switch")
                .ok_or_else(|| "the BPF object has no finish_task_switch program".to_string())?
                .try_into()
                .map_err(|err: aya::programs::ProgramError| err.to_string())?;
            if program.fd().is_err() {
                program.load().map_err(|err| format!("the kernel rejected the kprobe program: {}", chain(&err)))?;
            }
            let link = program.attach(&symbol, 0).map_err(|err| format!("kprobe on {symbol}: {}", chain(&err)))?;
            Ok::<_, String>((symbol, link))
        })();
        match attached {
            Ok((symbol, link)) => {
                tracing::info!(%symbol, "off-CPU waits get their stacks at switch-in (kprobe): only waits of at least min_block pay for them");
                self.switch_in_link = Some(link);
                Ok(())
            }
            Err(reason) => {
                tracing::info!(%reason, "off-CPU waits get their stacks at switch-out (sched_switch alone): this kernel takes no kprobe on the scheduler's switch-in");
                self.switch_in_unavailable = Some(reason.clone());
                Err(reason)
            }
        }
    }

    fn detach_switch_in(&mut self) -> anyhow::Result<()> {
        if let Some(link) = self.switch_in_link.take() {
            let program: &mut KProbe = self
                .bpf
                .program_mut("finish_task_switch")
                .ok_or_else(|| anyhow!("BPF object has no finish_task_switch program"))?
                .try_into()?;
            program.detach(link)?;
        }
        Ok(())
    }

    /// Empties `SWITCH_OUT`, `PENDING` and the quota slots (their stamps) once the program
    /// is detached: threads switched out before the detach would otherwise, after a
    /// re-attach, count the whole time in between as one wait.
    fn forget_switch_outs(&mut self) -> anyhow::Result<()> {
        let tasks: Vec<u64> = self.switched_out.keys().filter_map(Result::ok).collect();
        for task in tasks {
            self.switched_out.remove(&task).ok();
        }
        for slot in 0..PENDING_SLOTS {
            self.pending.set(slot, 0, 0).context("clearing PENDING")?;
        }
        for slot in 0..THREAD_QUOTA_SLOTS {
            self.thread_quota.set(slot, ThreadQuota::default(), 0).context("clearing THREAD_QUOTA")?;
        }
        Ok(())
    }

    /// Sets the share of switch-outs that are sampled and the threads' quota (rate
    /// control).
    pub fn set_off_cpu_rates(&mut self, probability: f64, thread_quota: u32, stamp_limit: u32) -> anyhow::Result<()> {
        let threshold = sampling_threshold(probability)?;
        self.config.offcpu_sample_threshold = threshold;
        self.config.offcpu_thread_quota = thread_quota;
        if self.stamps {
            self.config.offcpu_stamp_limit = stamp_limit;
        }
        self.config_map.set(0, self.config, 0)?;
        Ok(())
    }

    /// Ends the current window and returns everything aggregated in it.
    pub fn drain(&mut self) -> anyhow::Result<RawWindow> {
        let (samples, unwind) = self.reader.take_window()?;
        let stats = self.read_stats()?;
        let window = RawWindow {
            map_fill: samples.len() as f64 / self.max_stack_keys.max(1) as f64,
            samples,
            stats: stats.delta_since(&self.last_stats),
            unwind,
        };
        self.last_stats = stats;
        Ok(window)
    }

    /// Running total of one counter since the programs were loaded.
    pub fn stat_total(&self, stat: Stat) -> anyhow::Result<u64> {
        let per_cpu = self
            .stats
            .get(&(stat as u32), 0)
            .context("reading BPF stats")?;
        Ok(per_cpu.iter().sum())
    }

    /// The process that forked `pid` (its tgid), if the kernel recorded the fork.
    pub fn parent_of(&self, pid: u32) -> Option<u32> {
        self.parents.as_ref()?.get(&pid, 0).ok()
    }

    /// Run time and runs of each program, by index in [`PROGRAMS`], when BPF statistics
    /// are on (see [`RunStats::costs`]).
    pub fn program_costs(&self) -> Vec<(usize, ProgramCost)> {
        let Some(stats) = &self.run_stats else { return Vec::new() };
        stats.costs(|| kernel_costs(&self.bpf)).into_iter().enumerate().collect()
    }

    /// Turns BPF statistics on or off when their time comes; call every tick.
    pub fn tick_run_stats(&mut self) {
        let bpf = &self.bpf;
        if let Some(stats) = self.run_stats.as_mut() {
            stats.tick(|| kernel_costs(bpf));
        }
    }

    /// Records the agent itself lost: stacks beyond `max_stack_keys`, wait ends whose
    /// snapshot was missing.
    pub fn agent_losses(&self) -> AgentLosses {
        self.reader.losses()
    }

    fn read_stats(&self) -> anyhow::Result<StatCounts> {
        let mut counts = StatCounts::default();
        for stat in Stat::ALL {
            counts.0[stat as usize] = self.stat_total(stat)?;
        }
        Ok(counts)
    }
}

fn attach_fork_tracepoint(bpf: &mut Ebpf) -> anyhow::Result<()> {
    let program: &mut TracePoint = bpf
        .program_mut("sched_process_fork")
        .ok_or_else(|| anyhow!("BPF object has no sched_process_fork program"))?
        .try_into()?;
    program.load().map_err(|err| anyhow!("loading: {}", chain(&err)))?;
    // The link lives as long as the program, which lives as long as the sampler.
    program.attach("sched", "sched_process_fork").map_err(|err| anyhow!("attaching: {}", chain(&err)))?;
    Ok(())
}

/// Where `child_pid` sits in a `sched_process_fork` record: the comm fields before it are
/// fixed arrays on older kernels and `__data_loc` on newer ones, so it is read from
/// tracefs.
fn fork_child_pid_offset() -> Option<u32> {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].iter().find_map(|root| {
        let format = std::fs::read_to_string(format!("{root}/events/sched/sched_process_fork/format")).ok()?;
        child_pid_offset(&format)
    })
}

fn child_pid_offset(format: &str) -> Option<u32> {
    let line = format.lines().find(|line| line.contains(" child_pid;"))?;
    let offset = line.split("offset:").nth(1)?.split(';').next()?.trim().parse().ok()?;
    line.contains("size:4;").then_some(offset)
}

/// The kernel's run-time counters of each program, zero for one not loaded; the off-CPU
/// program's whichever build is loaded.
fn kernel_costs(bpf: &Ebpf) -> [ProgramCost; PROGRAMS.len()] {
    PROGRAMS.map(|name| {
        let builds: &[&str] = if name == "sched_switch" { &["sched_switch", STAMPS_PROGRAM] } else { &[name] };
        builds
            .iter()
            .find_map(|name| bpf.program(name).and_then(|program| program.info().ok()))
            .map(|info| ProgramCost { run_time_ns: info.run_time().as_nanos() as u64, runs: info.run_count() })
            .unwrap_or_default()
    })
}

/// Writes (Some) or removes (None) a process's entry in `map`, a kernel map by tgid (a
/// failure only means the process's extra frames or labels are not read).
fn per_process<V: aya::Pod + Send>(mut map: BpfHashMap<MapData, u32, V>, name: &'static str) -> Box<dyn FnMut(u32, Option<V>) + Send> {
    Box::new(move |tgid, entry| {
        let result = match entry {
            Some(entry) => map.insert(tgid, entry, 0),
            None => map.remove(&tgid),
        };
        if let Err(err) = result {
            tracing::debug!(pid = tgid, error = %err, map = name, "updating a per-process map");
        }
    })
}

/// Jiffies in a 100 ms quota epoch: the kernel's tick rate (CONFIG_HZ: 100 to 1000) from
/// two readings of /proc/timer_list, which prints jiffies and the monotonic clock; 250
/// Hz (Debian's) when it cannot be read. A wrong rate only changes the epoch's length.
fn quota_epoch_jiffies() -> u32 {
    fn reading() -> Option<(f64, f64)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let now_ns: f64 = text.lines().find_map(|l| l.strip_prefix("now at ")?.strip_suffix(" nsecs")?.parse().ok())?;
        let jiffies: f64 = text.lines().find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse().ok())?;
        Some((now_ns, jiffies))
    }
    let hz = (|| {
        let (t0, j0) = reading()?;
        std::thread::sleep(Duration::from_millis(100));
        let (t1, j1) = reading()?;
        let hz = (j1 - j0) / ((t1 - t0) / 1e9);
        (hz > 10.0 && hz < 10_000.0).then_some(hz)
    })()
    .unwrap_or(250.0);
    ((hz * QUOTA_EPOCH.as_secs_f64()).round() as u32).max(1)
}

/// How long a thread's switch-outs count towards its quota.
const QUOTA_EPOCH: Duration = Duration::from_millis(100);

/// The oldest kernel release on which `auto` takes the switch-in kprobe. Debian's 6.1
/// (6.1.192) under the kernel matrix's emulation oopsed in the scheduler while the kprobe
/// on `finish_task_switch` was attached or detached, several boots in ten on a loaded
/// host: the ftrace trampoline returned to address 0 (`RIP: 0010:0x0`, called from
/// `__schedule` where it calls `finish_task_switch.isra.0`), and a CPU then stuck holding
/// its run queue. Debian's 6.12 never did in the same harness. A kprobe on the
/// scheduler's hottest function is only worth it where it cannot take the host down, so
/// older kernels stay on the switch-out path unless asked.
const SWITCH_IN_SINCE: (u32, u32) = (6, 12);

/// The off-CPU program's build with stamps (see `OffCpuOptions::stamp_limit`), and the
/// oldest kernel release it is loaded on. Debian's 6.1 under the kernel matrix's
/// emulation took over 50 s to verify it (seven boots of nine never started recording
/// within its 48 s), where the build without stamps loads in seconds; 6.12 and this host's 6.18 load
/// it as fast as the other. Older kernels get `sched_switch`, without stamps.
const STAMPS_PROGRAM: &str = "sched_switch_stamps";
/// The lowest `min_block` stamps run with. A stamped wait of at least `min_block` is a
/// record without stacks, and stamps are for the rare long waits of a thread that
/// switches thousands of times a second: with a floor of zero every wait of it is one (the
/// fault tests' ping-pong at `--off-cpu-min-block 0s` filled the ring buffer with them
/// and lost a third of its waits).
const STAMPS_MIN_BLOCK: Duration = Duration::from_millis(1);
const STAMPS_SINCE: (u32, u32) = (6, 12);

/// The off-CPU program to load on a kernel of this release.
fn off_cpu_program(release: &str) -> &'static str {
    match release_version(release) {
        Some(version) if version >= STAMPS_SINCE => STAMPS_PROGRAM,
        _ => "sched_switch",
    }
}

/// (major, minor) of a kernel release string, None when it does not start with them.
fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(str::parse::<u32>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        _ => None,
    }
}

/// The running kernel's release (`uname -r`), or empty when it cannot be read.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|release| release.trim().to_owned()).unwrap_or_default()
}

/// Why `auto` keeps off the switch-in kprobe on a kernel of this release, if it does.
fn switch_in_refused(release: &str) -> Option<String> {
    let Some(version) = release_version(release) else {
        return Some(format!("kernel release {release:?} not understood"));
    };
    (version < SWITCH_IN_SINCE).then(|| {
        format!(
            "Linux {}.{} is older than {}.{}, the oldest kernel the switch-in kprobe is used on by default (6.1 oopsed under it in emulation)",
            version.0, version.1, SWITCH_IN_SINCE.0, SWITCH_IN_SINCE.1
        )
    })
}

/// The scheduler's switch-in function as this kernel names it: compilers clone it
/// (`finish_task_switch.isra.0` on Debian's 6.1 and 6.12), so the name is read from
/// /proc/kallsyms rather than assumed.
fn switch_in_symbol() -> Result<String, String> {
    let symbols = std::fs::read_to_string("/proc/kallsyms").map_err(|err| format!("reading /proc/kallsyms: {err}"))?;
    let mut found = None;
    for line in symbols.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next()) else { continue };
        if !matches!(kind, "t" | "T") {
            continue;
        }
        if name == "finish_task_switch" {
            return Ok(name.to_string());
        }
        if name.starts_with("finish_task_switch.") && found.is_none() {
            found = Some(name.to_string());
        }
    }
    found.ok_or_else(|| "no finish_task_switch in /proc/kallsyms".to_string())
}

fn ring_buffer_bytes(requested: u32) -> anyhow::Result<u32> {
    if requested == 0 {
        let cpus = aya::util::online_cpus().map_or(1, |cpus| cpus.len()) as u32;
        return Ok(cpus.saturating_mul(1 << 20).clamp(8 << 20, 64 << 20).next_power_of_two());
    }
    if !requested.is_power_of_two() || requested < 4096 {
        bail!("ring_buffer_bytes must be a power of two of at least 4096 (or 0 for automatic), got {requested}");
    }
    Ok(requested)
}

fn user_stack_bytes(requested: u32) -> u32 {
    let bytes = (requested as usize).min(MAX_USER_STACK);
    (bytes - bytes % USER_STACK_CHUNK) as u32
}

/// Threshold on `bpf_get_prandom_u32()` for a probability.
fn sampling_threshold(probability: f64) -> anyhow::Result<u32> {
    if !(probability > 0.0 && probability <= 1.0) {
        bail!("off-CPU sampling probability must be in (0, 1], got {probability}");
    }
    // The kernel weights each record by the inverse of the probability this threshold
    // applies (`profiler_common::weight_q16`), not of the one asked for.
    Ok(if probability >= 1.0 { u32::MAX } else { (probability * u32::MAX as f64) as u32 })
}

fn take<T>(bpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = bpf
        .take_map(name)
        .ok_or_else(|| anyhow!("BPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Checks what the kernel needs up front, so users get the cause instead of a verifier log.
fn preflight(options: &SamplerOptions) -> anyhow::Result<()> {
    let capable = |cap| caps::has_cap(None, caps::CapSet::Effective, cap).unwrap_or(false);
    if !(capable(caps::Capability::CAP_BPF) && capable(caps::Capability::CAP_PERFMON)) {
        bail!("the profiler agent must run as root, or with CAP_BPF and CAP_PERFMON (it loads BPF programs)");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); a kernel built with CONFIG_DEBUG_INFO_BTF=y is required");
    }
    check_frequency(options.frequency_hz)?;
    if let Some(pid) = options.pid {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid}");
        }
    }
    Ok(())
}

fn check_frequency(frequency_hz: u64) -> anyhow::Result<()> {
    if frequency_hz == 0 || frequency_hz > 10_000 {
        bail!("sampling frequency must be between 1 and 10000 Hz, got {frequency_hz}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::reader::*;

    #[test]
    fn reads_the_fork_record_layout_of_old_and_new_kernels() {
        let new = "\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        let old = "\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!((child_pid_offset(new), child_pid_offset(old)), (Some(20), Some(44)));
        assert_eq!(child_pid_offset("field:pid_t parent_pid;\toffset:12;\tsize:4;"), None);
        assert!(fork_child_pid_offset().is_some(), "this host's tracefs has the fork tracepoint");
    }

    #[test]
    fn auto_takes_the_switch_in_kprobe_from_6_12_on() {
        for release in ["6.1.0-57-cloud-amd64", "5.15.0-100-generic", "6.11.9", "4.19.0", "", "linux"] {
            assert!(switch_in_refused(release).is_some(), "{release}");
        }
        for release in ["6.12.118+deb12-cloud-amd64", "6.18.0", "7.0.1-arch1"] {
            assert_eq!(switch_in_refused(release), None, "{release}");
        }
    }

    #[test]
    fn stamps_are_loaded_from_6_12_on() {
        for release in ["6.1.0-57-cloud-amd64", "5.15.0-100-generic", "6.11.9", "", "linux"] {
            assert_eq!(off_cpu_program(release), "sched_switch", "{release}");
        }
        for release in ["6.12.118+deb12-cloud-amd64", "6.18.44-fc-v1300", "7.0.1-arch1"] {
            assert_eq!(off_cpu_program(release), STAMPS_PROGRAM, "{release}");
        }
    }

    /// (tid, bytes) written to the kernel's `STACK_BYTES`, in order.
    type Writes = Arc<std::sync::Mutex<Vec<(u32, u32)>>>;

    fn state(max_keys: usize) -> (ReaderState, Writes) {
        let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = writes.clone();
        let stack_bytes = StackBytes {
            write: Box::new(move |tid, bytes| seen.lock().unwrap().push((tid, bytes))),
            learnt: HashMap::new(),
            max: MAX_USER_STACK as u32,
        };
        let processes = ProcessTable::default();
        let unwinder = Unwinder::new(processes.clone());
        let python = Python::new(PythonOptions::default(), PythonNames::default(), Box::new(|_, _| {}));
        let labels = Labels::new(LabelOptions::default(), LabelSets::default(), Box::new(|_, _| {}));
        (ReaderState::new(unwinder, python, labels, processes, stack_bytes, max_keys, 65536, Default::default()), writes)
    }

    /// A ring record as the BPF programs write it: the header, then `stack_len` bytes of
    /// user stack, in 8-byte aligned memory like the ring buffer's.
    fn snapshot(kind: u32, tid: u32, ts_ns: u64, kernel: &[u64], stack_len: usize) -> Vec<u64> {
        let words = (size_of::<SnapshotHeader>() + stack_len).div_ceil(8);
        let mut record = vec![0u64; words];
        // SAFETY: the buffer is at least a header long and 8-byte aligned.
        let header = unsafe { &mut *(record.as_mut_ptr() as *mut SnapshotHeader) };
        header.kind = kind;
        header.tid = tid;
        header.tgid = tid;
        header.state = if kind == EVENT_SWITCH_OUT { profiler_common::TASK_INTERRUPTIBLE } else { 0 };
        header.ts_ns = ts_ns;
        header.kernel[..kernel.len()].copy_from_slice(kernel);
        header.kernel_len = (kernel.len() * 8) as u32;
        // No user registers: nothing to unwind, the bookkeeping is what is tested.
        header.user_len = stack_len as u32;
        record
    }

    fn bytes(record: &[u64]) -> &[u8] {
        unsafe { std::slice::from_raw_parts(record.as_ptr() as *const u8, record.len() * 8) }
    }

    fn wait_end(tid: u32, out_ts_ns: u64, elapsed_ns: u64, weight_q16: u64) -> Vec<u64> {
        let end = WaitEnd { kind: EVENT_WAIT_END, tid, out_ts_ns, elapsed_ns, weight_q16, stamped: 0, _pad: 0 };
        let mut record = vec![0u64; size_of::<WaitEnd>() / 8];
        unsafe { std::ptr::write(record.as_mut_ptr() as *mut WaitEnd, end) };
        record
    }

    #[test]
    fn long_waits_are_weighted_short_ones_dropped_and_losses_counted() {
        let (mut state, _) = state(100);
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 7, 1000, &[0xffff_1000], 4096)));
        assert_eq!(state.raw_bytes, 4096);
        // Recorded with probability 1/2 (weight 2 in Q16): 5 ms counts as 10 ms.
        state.handle(bytes(&wait_end(7, 1000, 5_000_000, 2 << 16)));
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 8, 2000, &[0xffff_1000], 4096)));
        state.handle(bytes(&wait_end(8, 2000, 0, 1 << 16)));
        state.handle(bytes(&wait_end(9, 3000, 5_000_000, 1 << 16)));
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 10, 4000, &[], 0)));
        state.handle(bytes(&wait_end(10, 3999, 5_000_000, 1 << 16)));
        // The end of an older wait does not take the newer one with it.
        state.handle(bytes(&wait_end(10, 4000, 3_000_000, 1 << 16)));
        // A switch-in the kernel never reported: the older wait is dropped, counted.
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 11, 5000, &[0xffff_1000], 4096)));
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 11, 6000, &[], 0)));
        state.handle(bytes(&wait_end(11, 6000, 0, 1 << 16)));
        state.handle(&[1, 0, 0, 0, 0]);

        let (mut samples, _) = state.take_window();
        samples.sort_by_key(|sample| sample.key.pid);
        assert_eq!(samples.len(), 2, "{samples:?}");
        assert_eq!(samples[0].key.pid, 7);
        assert_eq!(samples[0].value, RawValue::wait(5_000_000, 2 << 16));
        let RawValue::OffCpu { ns: 10_000_000, waits: 1, durations } = &samples[0].value else { panic!("{samples:?}") };
        assert_eq!(durations.quantile_ns(1.0), Some(profiler_pprof::waits::representative_ns(profiler_pprof::waits::bucket_of(5_000_000))));
        assert_eq!(samples[0].kernel.as_deref(), Some(&[0xffff_1000][..]));
        assert_eq!(samples[1].key.pid, 10);
        assert_eq!(samples[1].value, RawValue::wait(3_000_000, 1 << 16));
        assert_eq!(state.losses.wait_without_snapshot, 2, "no snapshot for tid 9, wrong one for tid 10");
        assert_eq!(state.losses.switch_out_without_end, 1);
        assert_eq!(state.losses.malformed, 1);
        assert!(state.pending.is_empty());
        assert_eq!(state.raw_bytes, 0);
    }

    fn stamped_end(tid: u32, out_ts_ns: u64, elapsed_ns: u64) -> Vec<u64> {
        let mut record = wait_end(tid, out_ts_ns, elapsed_ns, 1 << 16);
        unsafe { (*(record.as_mut_ptr() as *mut WaitEnd)).stamped = 1 };
        record
    }

    fn stamped_wait(tid: u32, state: u32, elapsed_ns: u64) -> Vec<u64> {
        let wait = StampedWait { kind: EVENT_STAMPED_WAIT, tid, tgid: tid, state, out_ts_ns: 1, elapsed_ns };
        let mut record = vec![0u64; size_of::<StampedWait>() / 8];
        unsafe { std::ptr::write(record.as_mut_ptr() as *mut StampedWait, wait) };
        record
    }

    /// A stamped thread's long waits count whole at weight 1, each at the stack of its
    /// latest recorded wait in the same state: a short one until a long one is recorded,
    /// then the long one's. One in a state no record gave a stack yet is shown at the
    /// thread alone, and counted.
    #[test]
    fn stamped_waits_take_the_threads_latest_recorded_stack() {
        let (mut state, _) = state(100);
        let sleeping = profiler_common::TASK_INTERRUPTIBLE;
        state.handle(bytes(&stamped_wait(7, sleeping, 4_000_000)));
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 7, 1000, &[0xffff_1000], 0)));
        state.handle(bytes(&stamped_end(7, 1000, 0)));
        state.handle(bytes(&stamped_wait(7, sleeping, 2_000_000)));
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 7, 2000, &[0xffff_2000], 0)));
        state.handle(bytes(&stamped_end(7, 2000, 3_000_000)));
        // A later short wait does not replace the long one's stack.
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 7, 3000, &[0xffff_3000], 0)));
        state.handle(bytes(&stamped_end(7, 3000, 0)));
        state.handle(bytes(&stamped_wait(7, sleeping, 5_000_000)));
        // Not stamped: a short wait gives no stack.
        state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, 8, 1000, &[0xffff_1000], 0)));
        state.handle(bytes(&wait_end(8, 1000, 0, 1 << 16)));

        let (samples, _) = state.take_window();
        let at = |frame: Option<u64>| -> RawValue {
            let matching: Vec<_> = samples.iter().filter(|s| s.kernel.as_deref().map(|k| k[0]) == frame).collect();
            assert_eq!(matching.len(), 1, "{samples:?}");
            matching[0].value.clone()
        };
        let RawValue::OffCpu { ns, waits: 1, .. } = at(None) else { panic!("{samples:?}") };
        assert_eq!(ns, 4_000_000, "before any record, at the thread alone");
        let RawValue::OffCpu { ns, waits: 1, .. } = at(Some(0xffff_1000)) else { panic!("{samples:?}") };
        assert_eq!(ns, 2_000_000, "at the short wait's stack until a long one's");
        let RawValue::OffCpu { ns, waits: 2, .. } = at(Some(0xffff_2000)) else { panic!("{samples:?}") };
        assert_eq!(ns, 8_000_000, "the recorded long wait and the stamped one after it");
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(state.losses.stamped_without_stack, 1);
        assert!(!state.latest.contains_key(&(8, sleeping)));

        // Without a record, a thread's waits are named by its comm from /proc, read once.
        let own = std::process::id();
        state.handle(bytes(&stamped_wait(own, sleeping, 2_000_000)));
        state.handle(bytes(&stamped_wait(own, sleeping, 3_000_000)));
        let (samples, _) = state.take_window();
        assert_eq!(samples.len(), 1, "{samples:?}");
        let comm = std::fs::read_to_string(format!("/proc/{own}/task/{own}/comm")).unwrap();
        let named = &samples[0].key.comm;
        assert_eq!(&named[..named.iter().position(|&b| b == 0).unwrap_or(named.len())], comm.trim().as_bytes());
        assert!(matches!(samples[0].value, RawValue::OffCpu { ns: 5_000_000, waits: 2, .. }), "{samples:?}");
        assert_eq!(state.losses.stamped_without_stack, 3);
    }

    /// A wait whose end was lost and whose thread exited is dropped and counted once it
    /// is a minute old; a wait of a thread that still exists is kept, however long.
    #[test]
    fn waits_of_threads_that_are_gone_expire() {
        let (mut state, _) = state(100);
        let alive = std::process::id();
        // No process has this pid: pid_max is at most 2^22.
        let gone = u32::MAX - 1;
        for tid in [alive, gone] {
            state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, tid, 1_000, &[], 4096)));
        }
        state.expire_pending(1_000 + PENDING_CHECK_NS - 1);
        assert_eq!(state.pending.len(), 2, "both are younger than a minute");
        state.expire_pending(1_000 + PENDING_CHECK_NS);
        assert_eq!(state.losses.pending_expired, 1);
        assert!(state.pending.contains_key(&alive) && !state.pending.contains_key(&gone));
        assert_eq!(state.raw_bytes, 4096, "the expired wait's copy is freed");
        state.expire_pending(10 * PENDING_CHECK_NS);
        assert_eq!(state.pending.len(), 1, "a blocked thread keeps its wait");
        assert_eq!(state.losses.pending_expired, 1);
    }

    #[test]
    fn stack_copies_of_waits_stay_under_their_memory_bound() {
        let (mut state, _) = state(100);
        let per_wait = MAX_USER_STACK;
        let waits = 2 * MAX_RAW_BYTES / per_wait;
        for tid in 0..waits as u32 {
            state.handle(bytes(&snapshot(EVENT_SWITCH_OUT, tid + 1, 1, &[], per_wait)));
        }
        assert!(state.raw_bytes > MAX_RAW_BYTES);
        state.compact();
        assert!(state.raw_bytes <= MAX_RAW_BYTES, "{} bytes of copies kept", state.raw_bytes);
        assert_eq!(state.pending.len(), waits, "compaction keeps every wait, only without its copy");
        // A compacted wait still ends and counts.
        state.handle(bytes(&wait_end(1, 1, 2_000_000, 1 << 16)));
        let (samples, _) = state.take_window();
        assert_eq!(samples.iter().map(|s| s.value.clone()).collect::<Vec<_>>(), [RawValue::wait(2_000_000, 1 << 16)]);
    }

    #[test]
    fn samples_aggregate_per_stack_up_to_the_key_limit() {
        let (mut state, _) = state(2);
        for kernel in [[1u64], [1], [2], [3]] {
            state.handle(bytes(&snapshot(EVENT_SAMPLE, 5, 0, &kernel, 0)));
        }
        let (mut samples, _) = state.take_window();
        samples.sort_by_key(|s| s.kernel.as_deref().map(<[u64]>::to_vec));
        let values: Vec<RawValue> = samples.iter().map(|s| s.value.clone()).collect();
        assert_eq!(values, [RawValue::OnCpuSamples(2), RawValue::OnCpuSamples(1)]);
        assert_eq!(state.losses.aggregate_full, 1, "the third distinct stack is over the limit");
    }

    #[test]
    fn learnt_stack_sizes_grow_in_chunks_with_a_margin() {
        let (mut state, writes) = state(10);
        state.stack_bytes.learn(1, 100);
        state.stack_bytes.learn(1, 50);
        state.stack_bytes.learn(1, 3000);
        state.stack_bytes.learn(2, u64::MAX);
        assert_eq!(*writes.lock().unwrap(), [(1, 3072), (1, 5120), (2, MAX_USER_STACK as u32)]);
    }
}
