//! BPF side of the profiler: on-CPU sampling from the cpu-clock perf event and off-CPU
//! accounting from the sched_switch tracepoint. Both aggregate in the kernel into
//! double-buffered maps; the agent flips `CONFIG.generation` and drains the idle buffer.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has no `AtomicU64::fetch_add`; the intrinsic lowers to BPF_XADD.
#![cfg_attr(target_arch = "bpf", allow(internal_features), feature(core_intrinsics))]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};

    use aya_ebpf::{
        bindings::BPF_F_USER_STACK,
        helpers::{
            bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        },
        macros::{map, perf_event, tracepoint},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, StackTrace},
        programs::{tracing::StackIdContext, PerfEventContext, TracePointContext},
    };
    use profiler_common::{
        Config, OffCpuValue, Stat, StackKey, SwitchOut, EXIT_DEAD, EXIT_ZOMBIE, STATE_LONG_WAIT, STATE_PREEMPTED,
        TASK_COMM_LEN,
    };

    // Sizes are defaults; the agent overrides them at load time.
    #[map]
    static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
    #[map]
    static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
    #[map]
    static STACKS_0: StackTrace = StackTrace::with_max_entries(16384, 0);
    #[map]
    static STACKS_1: StackTrace = StackTrace::with_max_entries(16384, 0);
    #[map]
    static ONCPU_0: HashMap<StackKey, u64> = HashMap::with_max_entries(10240, 0);
    #[map]
    static ONCPU_1: HashMap<StackKey, u64> = HashMap::with_max_entries(10240, 0);
    #[map]
    static OFFCPU_0: HashMap<StackKey, OffCpuValue> = HashMap::with_max_entries(10240, 0);
    #[map]
    static OFFCPU_1: HashMap<StackKey, OffCpuValue> = HashMap::with_max_entries(10240, 0);
    /// Keyed by thread id and shared by all CPUs, so a thread that wakes up on another CPU
    /// still finds its switch-out. LRU: threads that die off-CPU cannot fill it.
    #[map]
    static SWITCH_OUT: LruHashMap<u32, SwitchOut> = LruHashMap::with_max_entries(32768, 0);

    const EFAULT: i64 = 14;
    const EEXIST: i64 = 17;

    #[inline(always)]
    fn count(stat: Stat) {
        if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
            unsafe { *slot += 1 };
        }
    }

    #[inline(always)]
    fn atomic_add(dst: *mut u64, value: u64) {
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, value) };
    }

    #[inline(always)]
    fn config() -> Option<&'static Config> {
        CONFIG.get(0)
    }

    #[inline(always)]
    fn stacks(generation: u64) -> &'static StackTrace {
        if generation & 1 == 0 { &STACKS_0 } else { &STACKS_1 }
    }

    #[inline(always)]
    fn comm() -> [u8; TASK_COMM_LEN] {
        bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN])
    }

    /// Stack id, or the negated errno. An empty stack (-EFAULT: a user-mode sample has no
    /// kernel stack, a kernel thread no user stack) is normal; anything else is a loss.
    #[inline(always)]
    fn stack_id<C: StackIdContext>(ctx: &C, map: &StackTrace, flags: u64, lost: Stat) -> i32 {
        match ctx.get_stackid(map, flags) {
            Ok(id) => id as i32,
            Err(err) => {
                if -(err as i64) != EFAULT {
                    count(lost);
                }
                err
            }
        }
    }

    #[perf_event]
    pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tgid = (pid_tgid >> 32) as u32;
        let pid = pid_tgid as u32;
        // The idle task is not CPU use.
        if pid == 0 {
            return 0;
        }
        let Some(cfg) = config() else { return 0 };
        if cfg.filter_tgid != 0 && cfg.filter_tgid != tgid {
            return 0;
        }
        count(Stat::Samples);
        let generation = cfg.generation;
        let stacks = stacks(generation);
        let key = StackKey {
            tgid,
            pid,
            user_stack_id: stack_id(&ctx, stacks, BPF_F_USER_STACK as u64, Stat::UserStackLost),
            kernel_stack_id: stack_id(&ctx, stacks, 0, Stat::KernelStackLost),
            state: 0,
            _pad: 0,
            comm: comm(),
        };
        let counts = if generation & 1 == 0 { &ONCPU_0 } else { &ONCPU_1 };
        add_count(counts, &key);
        0
    }

    #[inline(always)]
    fn add_count(counts: &HashMap<StackKey, u64>, key: &StackKey) {
        if let Some(value) = counts.get_ptr_mut(key) {
            atomic_add(value, 1);
            return;
        }
        match counts.insert(key, 1, aya_ebpf::bindings::BPF_NOEXIST as u64) {
            Ok(()) => {}
            // Another CPU inserted the same key in between.
            Err(err) if -(err as i64) == EEXIST => {
                if let Some(value) = counts.get_ptr_mut(key) {
                    atomic_add(value, 1);
                }
            }
            Err(_) => count(Stat::SampleMapFull),
        }
    }

    /// `ns * weight / 65536` without 128-bit arithmetic (BPF has none). Waits are clamped to
    /// 2^44 ns (~4.9 h) so the product fits for any weight up to 2^32.
    #[inline(always)]
    fn scale_q16(ns: u64, weight_q16: u64) -> u64 {
        let ns = if ns > 1 << 44 { 1 << 44 } else { ns };
        (ns >> 16) * weight_q16 + (((ns & 0xffff) * weight_q16) >> 16)
    }

    // Field offsets of sched/sched_switch (see its tracefs `format`; stable ABI).
    const PREV_PID: usize = 24;
    const PREV_STATE: usize = 32;
    const NEXT_PID: usize = 56;
    /// TASK_REPORT_MAX: set in prev_state when the task was preempted while running.
    const PREEMPT_BIT: u64 = 0x100;

    #[tracepoint]
    pub fn sched_switch(ctx: TracePointContext) -> u32 {
        let Some(cfg) = config() else { return 0 };
        count(Stat::Switches);
        let now = unsafe { bpf_ktime_get_ns() };
        let prev_pid: i32 = unsafe { ctx.read_at(PREV_PID) }.unwrap_or(0);
        if prev_pid != 0 {
            switch_out(&ctx, cfg, now, prev_pid as u32);
        }
        let next_pid: i32 = unsafe { ctx.read_at(NEXT_PID) }.unwrap_or(0);
        if next_pid != 0 {
            switch_in(cfg, now, next_pid as u32);
        }
        0
    }

    /// `current` is still the task leaving the CPU, so its stacks can be taken here.
    #[inline(always)]
    fn switch_out(ctx: &TracePointContext, cfg: &Config, now: u64, pid: u32) {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        if cfg.filter_tgid != 0 && cfg.filter_tgid != tgid {
            return;
        }
        if unsafe { bpf_get_prandom_u32() } > cfg.offcpu_sample_threshold {
            return;
        }
        let raw_state: i64 = unsafe { ctx.read_at(PREV_STATE) }.unwrap_or(0);
        let raw_state = raw_state as u64;
        // A dying task never comes back.
        if raw_state & (EXIT_DEAD | EXIT_ZOMBIE) as u64 != 0 {
            return;
        }
        let state = if raw_state & PREEMPT_BIT != 0 || raw_state & 0xff == 0 {
            STATE_PREEMPTED
        } else {
            (raw_state & 0xff) as u32
        };
        let generation = cfg.generation;
        let stacks = stacks(generation);
        let out = SwitchOut {
            ts_ns: now,
            generation,
            weight_q16: cfg.offcpu_weight_q16,
            tgid,
            user_stack_id: stack_id(ctx, stacks, BPF_F_USER_STACK as u64, Stat::UserStackLost),
            kernel_stack_id: stack_id(ctx, stacks, 0, Stat::KernelStackLost),
            state,
            comm: comm(),
        };
        match SWITCH_OUT.insert(&pid, &out, 0) {
            Ok(()) => count(Stat::SwitchOutsRecorded),
            Err(_) => count(Stat::SwitchOutMapFull),
        }
    }

    #[inline(always)]
    fn switch_in(cfg: &Config, now: u64, pid: u32) {
        let Some(out) = (unsafe { SWITCH_OUT.get(&pid) }) else { return };
        let out = *out;
        let _ = SWITCH_OUT.remove(&pid);
        let elapsed = now.saturating_sub(out.ts_ns);
        if elapsed < cfg.offcpu_min_ns {
            count(Stat::OffCpuBelowMin);
            return;
        }
        let current = cfg.generation;
        let mut key = StackKey {
            tgid: out.tgid,
            pid,
            user_stack_id: out.user_stack_id,
            kernel_stack_id: out.kernel_stack_id,
            state: out.state,
            _pad: 0,
            comm: out.comm,
        };
        // Stack ids live in the stack map of the switch-out's generation. One flip back, that
        // map is still intact and the agent drains its aggregate before clearing it. Older
        // maps are gone, but the agent saved the stacks of threads still switched out before
        // clearing them: tag the entry so it can find them.
        let generation = if out.generation + 1 >= current {
            out.generation
        } else {
            count(Stat::OffCpuLongWait);
            key.state |= STATE_LONG_WAIT;
            key._pad = out.generation as u32;
            current
        };
        let totals = if generation & 1 == 0 { &OFFCPU_0 } else { &OFFCPU_1 };
        let ns = scale_q16(elapsed, out.weight_q16);
        if let Some(value) = totals.get_ptr_mut(&key) {
            unsafe {
                atomic_add(&raw mut (*value).total_ns, ns);
                atomic_add(&raw mut (*value).count, 1);
            }
            return;
        }
        let value = OffCpuValue { total_ns: ns, count: 1 };
        if totals.insert(&key, &value, aya_ebpf::bindings::BPF_NOEXIST as u64).is_err() {
            if let Some(value) = totals.get_ptr_mut(&key) {
                unsafe {
                    atomic_add(&raw mut (*value).total_ns, ns);
                    atomic_add(&raw mut (*value).count, 1);
                }
            } else {
                count(Stat::OffCpuMapFull);
            }
        }
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
