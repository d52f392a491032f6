//! Sample stage: loads the BPF programs, attaches them, and drains the in-kernel
//! aggregates window by window.
//!
//! The aggregates and stack maps are double-buffered: the programs write into buffer
//! `generation % 2`. A drain flips the generation, waits a grace period so programs that
//! read the old generation finish, and then reads and clears the idle buffer. Samples
//! taken during a drain land in the other buffer and are never lost.
//!
//! Off-CPU waits span flips: a wait that started in generation g and ends in g+1 is added
//! to buffer g, whose stack map stays intact until the next drain reads those late
//! entries and only then clears it. Before clearing it, the drain also saves the stacks
//! of threads that went off-CPU in g and are still waiting; when such a long wait ends,
//! the kernel tags its entry (`STATE_LONG_WAIT`) and the saved stacks are used.

use std::{collections::HashMap, path::Path, thread, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, StackTraceMap},
    programs::{
        PerfEvent, TracePoint,
        perf_event::{PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent},
        trace_point::TracePointLinkId,
    },
};
use profiler_common::{Config, OffCpuValue, STATE_LONG_WAIT, Stat, StackKey, SwitchOut, maps};

static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// Programs run to completion with preemption disabled; this is ample for any that read
/// the previous generation to finish writing.
const FLIP_GRACE: Duration = Duration::from_millis(5);

/// What to sample and how much kernel memory the maps may use.
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    /// On-CPU sampling frequency per CPU, in Hz.
    pub frequency_hz: u64,
    /// Only this process when set.
    pub pid: Option<u32>,
    pub off_cpu: Option<OffCpuOptions>,
    /// Entries of each aggregate map (per buffer).
    pub max_stack_keys: u32,
    /// Entries of each stack map (per buffer).
    pub max_stacks: u32,
    /// Threads that can be off-CPU at once and still be attributed.
    pub max_switched_out: u32,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            frequency_hz: 99,
            pid: None,
            off_cpu: None,
            max_stack_keys: 16384,
            max_stacks: 16384,
            max_switched_out: 65536,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct OffCpuOptions {
    /// Waits shorter than this are dropped in the kernel.
    pub min_block: Duration,
    /// Probability of recording a switch-out, in (0, 1]. Recorded waits are weighted by its
    /// inverse, so totals stay unbiased.
    pub sample_probability: f64,
}

impl Default for OffCpuOptions {
    fn default() -> Self {
        Self {
            min_block: Duration::from_micros(1000),
            sample_probability: 1.0,
        }
    }
}

/// An address stack, leaf first, as the kernel records it.
pub type Addrs = std::sync::Arc<[u64]>;

/// One aggregated entry of a window, with stacks resolved to addresses.
#[derive(Clone, Debug)]
pub struct RawSample {
    pub key: StackKey,
    pub user: Option<Addrs>,
    pub kernel: Option<Addrs>,
    pub value: RawValue,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawValue {
    OnCpuSamples(u64),
    OffCpu { ns: u64, waits: u64 },
}

/// The aggregates of one window plus the counter deltas since the previous drain.
#[derive(Debug, Default)]
pub struct RawWindow {
    pub samples: Vec<RawSample>,
    pub stats: StatCounts,
    /// Fill of the busiest aggregate map, in [0, 1].
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
    stacks: [StackTraceMap<MapData>; 2],
    on_cpu: [BpfHashMap<MapData, StackKey, u64>; 2],
    off_cpu: [BpfHashMap<MapData, StackKey, OffCpuValue>; 2],
    switched_out: BpfHashMap<MapData, u32, SwitchOut>,
    /// Stacks of threads still off-CPU whose stack map was cleared, by (tid, generation).
    long_waits: HashMap<(u32, u32), (Option<Addrs>, Option<Addrs>)>,
    /// Long waits whose saved stacks were missing (the thread was not seen by a drain).
    long_waits_unresolved: u64,
    last_stats: StatCounts,
    max_stack_keys: u32,
    perf_links: Vec<PerfEventLinkId>,
    off_cpu_link: Option<TracePointLinkId>,
    off_cpu_loaded: bool,
    pub period_ns: u64,
}

impl Sampler {
    /// Loads and attaches the programs. Fails with a one-line reason when the host cannot
    /// run them (not root, no BTF, no tracefs).
    pub fn start(options: &SamplerOptions) -> anyhow::Result<Self> {
        preflight(options)?;
        let mut loader = EbpfLoader::new();
        for name in maps::ONCPU.iter().chain(&maps::OFFCPU) {
            loader.map_max_entries(name, options.max_stack_keys);
        }
        for name in maps::STACKS {
            loader.map_max_entries(name, options.max_stacks);
        }
        loader.map_max_entries(maps::SWITCH_OUT, options.max_switched_out);
        let mut bpf = loader
            .load(BPF_OBJECT)
            .map_err(|err| anyhow!("loading the BPF programs failed: {}", chain(&err)))?;

        let config = Config { filter_tgid: options.pid.unwrap_or(0), ..Config::default() };
        let mut config_map: Array<MapData, Config> = take(&mut bpf, maps::CONFIG)?;
        config_map.set(0, config, 0).context("writing the BPF config")?;
        let program: &mut PerfEvent = bpf
            .program_mut("on_cpu_sample")
            .ok_or_else(|| anyhow!("BPF object has no on_cpu_sample program"))?
            .try_into()?;
        program
            .load()
            .map_err(|err| anyhow!("the kernel rejected the on-CPU program: {}", chain(&err)))?;

        let mut sampler = Self {
            config_map,
            config,
            stats: take(&mut bpf, maps::STATS)?,
            stacks: [take(&mut bpf, maps::STACKS[0])?, take(&mut bpf, maps::STACKS[1])?],
            on_cpu: [take(&mut bpf, maps::ONCPU[0])?, take(&mut bpf, maps::ONCPU[1])?],
            off_cpu: [take(&mut bpf, maps::OFFCPU[0])?, take(&mut bpf, maps::OFFCPU[1])?],
            switched_out: take(&mut bpf, maps::SWITCH_OUT)?,
            long_waits: HashMap::new(),
            long_waits_unresolved: 0,
            bpf,
            last_stats: StatCounts::default(),
            max_stack_keys: options.max_stack_keys,
            perf_links: Vec::new(),
            off_cpu_link: None,
            off_cpu_loaded: false,
            period_ns: 0,
        };
        sampler.set_frequency(options.frequency_hz)?;
        sampler.set_off_cpu(options.off_cpu.as_ref())?;
        Ok(sampler)
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
        let cpus = aya::util::online_cpus().map_err(|(path, err)| anyhow!("reading {path}: {err}"))?;
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
        let program: &mut TracePoint = self
            .bpf
            .program_mut("sched_switch")
            .ok_or_else(|| anyhow!("BPF object has no sched_switch program"))?
            .try_into()?;
        match options {
            Some(off) => {
                let (threshold, weight) = sampling_threshold(off.sample_probability)?;
                self.config.offcpu_sample_threshold = threshold;
                self.config.offcpu_weight_q16 = weight;
                self.config.offcpu_min_ns = off.min_block.as_nanos() as u64;
                self.config_map.set(0, self.config, 0)?;
                if self.off_cpu_link.is_none() {
                    if !tracefs_has_sched_switch() {
                        bail!("tracefs is not mounted (need /sys/kernel/tracing/events/sched/sched_switch); mount it with `mount -t tracefs nodev /sys/kernel/tracing`");
                    }
                    if !self.off_cpu_loaded {
                        program
                            .load()
                            .map_err(|err| anyhow!("the kernel rejected the off-CPU program: {}", chain(&err)))?;
                        self.off_cpu_loaded = true;
                    }
                    let link = program
                        .attach("sched", "sched_switch")
                        .map_err(|err| anyhow!("attaching to sched/sched_switch: {}", chain(&err)))?;
                    self.off_cpu_link = Some(link);
                }
            }
            None => {
                if let Some(link) = self.off_cpu_link.take() {
                    program.detach(link)?;
                }
                self.config.offcpu_sample_threshold = 0;
                self.config_map.set(0, self.config, 0)?;
            }
        }
        Ok(())
    }

    /// Changes the share of switch-outs that are recorded (rate control).
    pub fn set_off_cpu_probability(&mut self, probability: f64) -> anyhow::Result<()> {
        let (threshold, weight) = sampling_threshold(probability)?;
        self.config.offcpu_sample_threshold = threshold;
        self.config.offcpu_weight_q16 = weight;
        self.config_map.set(0, self.config, 0)?;
        Ok(())
    }

    /// Ends the current window and returns everything aggregated in it.
    pub fn drain(&mut self) -> anyhow::Result<RawWindow> {
        let filling = (self.config.generation % 2) as usize;
        let idle = 1 - filling;
        let mut window = RawWindow::default();
        let mut resolver = StackResolver::default();

        let still_waiting = self.save_long_waits(idle, &mut resolver)?;
        // Waits that began two generations ago and ended after the last drain were added to
        // the idle buffer; its stack map is still theirs until it is cleared just below.
        self.drain_off_cpu(idle, &mut resolver, &mut window.samples)?;
        clear_stacks(&mut self.stacks[idle])?;
        resolver.forget(idle);

        self.config.generation += 1;
        self.config_map.set(0, self.config, 0)?;
        thread::sleep(FLIP_GRACE);

        let on_cpu_len = self.drain_on_cpu(filling, &mut resolver, &mut window.samples)?;
        let off_cpu_len = self.drain_off_cpu(filling, &mut resolver, &mut window.samples)?;
        window.map_fill = on_cpu_len.max(off_cpu_len) as f64 / self.max_stack_keys.max(1) as f64;
        // Saved stacks of waits that ended were used above; the rest still wait.
        if let Some(still_waiting) = still_waiting {
            self.long_waits.retain(|key, _| still_waiting.contains(key));
        }

        let stats = self.read_stats()?;
        window.stats = stats.delta_since(&self.last_stats);
        self.last_stats = stats;
        Ok(window)
    }

    /// Saves the stacks of threads that went off-CPU in the idle buffer's generation and
    /// are still waiting, before that buffer's stack map is cleared. Returns every
    /// (tid, generation) still off-CPU, or `None` when off-CPU tracing is off.
    fn save_long_waits(
        &mut self,
        idle: usize,
        resolver: &mut StackResolver,
    ) -> anyhow::Result<Option<std::collections::HashSet<(u32, u32)>>> {
        if self.config.offcpu_sample_threshold == 0 {
            return Ok(None);
        }
        let Some(idle_generation) = self.config.generation.checked_sub(1) else { return Ok(None) };
        let mut waiting = std::collections::HashSet::new();
        for entry in self.switched_out.iter() {
            // Entries may vanish while we iterate: those threads just woke up.
            let Ok((tid, out)) = entry else { continue };
            let key = (tid, out.generation as u32);
            waiting.insert(key);
            if out.generation == idle_generation && !self.long_waits.contains_key(&key) {
                let stack_key = StackKey {
                    user_stack_id: out.user_stack_id,
                    kernel_stack_id: out.kernel_stack_id,
                    ..zero_key()
                };
                let stacks = resolver.resolve(&self.stacks[idle], idle, &stack_key);
                self.long_waits.insert(key, stacks);
            }
        }
        Ok(Some(waiting))
    }

    fn drain_on_cpu(
        &mut self,
        buffer: usize,
        resolver: &mut StackResolver,
        out: &mut Vec<RawSample>,
    ) -> anyhow::Result<usize> {
        let entries = take_all(&mut self.on_cpu[buffer]).context("reading on-CPU counts")?;
        let len = entries.len();
        for (key, count) in entries {
            let (user, kernel) = resolver.resolve(&self.stacks[buffer], buffer, &key);
            out.push(RawSample { key, user, kernel, value: RawValue::OnCpuSamples(count) });
        }
        Ok(len)
    }

    fn drain_off_cpu(
        &mut self,
        buffer: usize,
        resolver: &mut StackResolver,
        out: &mut Vec<RawSample>,
    ) -> anyhow::Result<usize> {
        let entries = take_all(&mut self.off_cpu[buffer]).context("reading off-CPU times")?;
        let len = entries.len();
        for (mut key, value) in entries {
            let (user, kernel) = if key.state & STATE_LONG_WAIT != 0 {
                let saved = self.long_waits.remove(&(key.pid, key._pad));
                if saved.is_none() {
                    self.long_waits_unresolved += 1;
                }
                key.state &= !STATE_LONG_WAIT;
                key._pad = 0;
                saved.unwrap_or((None, None))
            } else {
                resolver.resolve(&self.stacks[buffer], buffer, &key)
            };
            out.push(RawSample {
                key,
                user,
                kernel,
                value: RawValue::OffCpu { ns: value.total_ns, waits: value.count },
            });
        }
        Ok(len)
    }

    /// Long waits that ended without saved stacks (reported as `[unknown]` frames).
    pub fn long_waits_unresolved(&self) -> u64 {
        self.long_waits_unresolved
    }

    /// Running total of one counter since the programs were loaded.
    pub fn stat_total(&self, stat: Stat) -> anyhow::Result<u64> {
        let per_cpu = self.stats.get(&(stat as u32), 0).context("reading BPF stats")?;
        Ok(per_cpu.iter().sum())
    }

    fn read_stats(&self) -> anyhow::Result<StatCounts> {
        let mut counts = StatCounts::default();
        for stat in Stat::ALL {
            counts.0[stat as usize] = self.stat_total(stat)?;
        }
        Ok(counts)
    }
}

/// Reads and empties an aggregate map that no program writes to any more.
fn take_all<V: aya::Pod>(map: &mut BpfHashMap<MapData, StackKey, V>) -> Result<Vec<(StackKey, V)>, aya::maps::MapError> {
    let entries = map.iter().collect::<Result<Vec<_>, _>>()?;
    for (key, _) in &entries {
        map.remove(key).ok();
    }
    Ok(entries)
}

fn zero_key() -> StackKey {
    StackKey { tgid: 0, pid: 0, user_stack_id: -1, kernel_stack_id: -1, state: 0, _pad: 0, comm: [0; 16] }
}

/// Reads each stack id once per buffer and drain.
#[derive(Default)]
struct StackResolver {
    cache: HashMap<(usize, i32), Option<Addrs>>,
}

impl StackResolver {
    fn resolve(
        &mut self,
        map: &StackTraceMap<MapData>,
        buffer: usize,
        key: &StackKey,
    ) -> (Option<Addrs>, Option<Addrs>) {
        let mut lookup = |id: i32| -> Option<Addrs> {
            if id < 0 {
                return None;
            }
            self.cache
                .entry((buffer, id))
                .or_insert_with(|| {
                    map.get(&(id as u32), 0)
                        .ok()
                        .map(|trace| trace.frames().iter().map(|frame| frame.ip).collect())
                })
                .clone()
        };
        (lookup(key.user_stack_id), lookup(key.kernel_stack_id))
    }

    fn forget(&mut self, buffer: usize) {
        self.cache.retain(|(b, _), _| *b != buffer);
    }
}

fn clear_stacks(map: &mut StackTraceMap<MapData>) -> anyhow::Result<()> {
    let ids = map.stack_ids().collect::<Result<Vec<_>, _>>().context("listing stack ids")?;
    for id in ids {
        map.remove(&id).ok();
    }
    Ok(())
}

/// Threshold on `bpf_get_prandom_u32()` and the matching weight (1/p in Q16).
fn sampling_threshold(probability: f64) -> anyhow::Result<(u32, u64)> {
    if !(probability > 0.0 && probability <= 1.0) {
        bail!("off-CPU sampling probability must be in (0, 1], got {probability}");
    }
    let threshold = if probability >= 1.0 {
        u32::MAX
    } else {
        (probability * u32::MAX as f64) as u32
    };
    // The weight must match the probability actually applied by the threshold.
    let effective = (threshold as f64 + 1.0) / (u32::MAX as f64 + 1.0);
    Ok((threshold, (65536.0 / effective).round() as u64))
}

fn take<T>(bpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = bpf.take_map(name).ok_or_else(|| anyhow!("BPF object has no map {name}"))?;
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
    if unsafe { libc::geteuid() } != 0 {
        bail!("the profiler agent must run as root (it loads BPF programs)");
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
    if options.off_cpu.is_some() && !tracefs_has_sched_switch() {
        bail!("tracefs is not mounted (need /sys/kernel/tracing/events/sched/sched_switch); mount it with `mount -t tracefs nodev /sys/kernel/tracing`");
    }
    Ok(())
}

fn check_frequency(frequency_hz: u64) -> anyhow::Result<()> {
    if frequency_hz == 0 || frequency_hz > 10_000 {
        bail!("sampling frequency must be between 1 and 10000 Hz, got {frequency_hz}");
    }
    Ok(())
}

fn tracefs_has_sched_switch() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|root| Path::new(root).join("events/sched/sched_switch/id").exists())
}
