//! Types shared between the BPF programs and the agent. Every struct is `#[repr(C)]` and
//! padded explicitly so both sides agree on the layout byte for byte.
#![no_std]

pub const TASK_COMM_LEN: usize = 16;

/// Maximum frames the kernel records per stack (PERF_MAX_STACK_DEPTH).
pub const MAX_STACK_DEPTH: usize = 127;

/// One aggregation key for both on-CPU samples and off-CPU waits.
/// Negative stack ids carry the kernel's error code (e.g. -EFAULT: no user stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tgid: u32,
    pub pid: u32,
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
    /// `prev_state` of the switch-out as reported by the sched_switch tracepoint,
    /// with [`STATE_PREEMPTED`] set when the task was still runnable. Zero for on-CPU.
    pub state: u32,
    /// Zero, except for [`STATE_LONG_WAIT`] entries.
    pub _pad: u32,
    /// The thread's comm at sample time, so exited processes keep a name.
    pub comm: [u8; TASK_COMM_LEN],
}

/// Off-CPU aggregate value: scaled nanoseconds and the number of (sampled) waits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuValue {
    pub total_ns: u64,
    pub count: u64,
}

/// What a thread was doing when it left the CPU, kept until it comes back.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SwitchOut {
    pub ts_ns: u64,
    pub generation: u64,
    /// Weight of this wait in 1/65536 units: 65536 / sampling probability.
    pub weight_q16: u64,
    pub tgid: u32,
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
    pub state: u32,
    pub comm: [u8; TASK_COMM_LEN],
}

/// Set in [`StackKey::state`] for a task switched out while still runnable (preempted).
pub const STATE_PREEMPTED: u32 = 1 << 31;
/// Set in [`StackKey::state`] for a wait that outlived the stack map its stack ids point
/// into; `_pad` then holds the low 32 bits of the switch-out generation and the agent
/// finds the stacks it saved from `SWITCH_OUT` under (pid, generation).
pub const STATE_LONG_WAIT: u32 = 1 << 30;
/// Task states of the sched_switch tracepoint (TASK_REPORT bits).
pub const TASK_INTERRUPTIBLE: u32 = 0x1;
pub const TASK_UNINTERRUPTIBLE: u32 = 0x2;
pub const EXIT_DEAD: u32 = 0x10;
pub const EXIT_ZOMBIE: u32 = 0x20;
pub const TASK_PARKED: u32 = 0x40;
pub const TASK_REPORT_IDLE: u32 = 0x80;

/// Runtime settings, written by the agent into `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Generation of the double buffers: buffer `generation % 2` is being filled.
    pub generation: u64,
    /// Only this process is recorded when non-zero.
    pub filter_tgid: u32,
    /// Switch-outs are recorded when `bpf_get_prandom_u32() <= offcpu_sample_threshold`.
    pub offcpu_sample_threshold: u32,
    /// 65536 / sampling probability, stored with each recorded switch-out.
    pub offcpu_weight_q16: u64,
    /// Waits shorter than this are not aggregated.
    pub offcpu_min_ns: u64,
}

/// Indices of the per-CPU `STATS` counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Samples = 0,
    SampleMapFull,
    UserStackLost,
    KernelStackLost,
    Switches,
    SwitchOutsRecorded,
    SwitchOutMapFull,
    OffCpuMapFull,
    OffCpuBelowMin,
    OffCpuLongWait,
}

impl Stat {
    pub const COUNT: u32 = 10;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::Samples,
        Stat::SampleMapFull,
        Stat::UserStackLost,
        Stat::KernelStackLost,
        Stat::Switches,
        Stat::SwitchOutsRecorded,
        Stat::SwitchOutMapFull,
        Stat::OffCpuMapFull,
        Stat::OffCpuBelowMin,
        Stat::OffCpuLongWait,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Samples => "samples",
            Stat::SampleMapFull => "sample_map_full",
            Stat::UserStackLost => "user_stack_lost",
            Stat::KernelStackLost => "kernel_stack_lost",
            Stat::Switches => "switches",
            Stat::SwitchOutsRecorded => "switch_outs_recorded",
            Stat::SwitchOutMapFull => "switch_out_map_full",
            Stat::OffCpuMapFull => "offcpu_map_full",
            Stat::OffCpuBelowMin => "offcpu_below_min",
            Stat::OffCpuLongWait => "offcpu_long_waits",
        }
    }
}

/// Map names, shared so the agent sizes and opens exactly what the BPF object defines.
pub mod maps {
    pub const CONFIG: &str = "CONFIG";
    pub const STATS: &str = "STATS";
    pub const STACKS: [&str; 2] = ["STACKS_0", "STACKS_1"];
    pub const ONCPU: [&str; 2] = ["ONCPU_0", "ONCPU_1"];
    pub const OFFCPU: [&str; 2] = ["OFFCPU_0", "OFFCPU_1"];
    pub const SWITCH_OUT: &str = "SWITCH_OUT";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)] plain integers with explicit padding.
    unsafe impl aya::Pod for StackKey {}
    unsafe impl aya::Pod for OffCpuValue {}
    unsafe impl aya::Pod for SwitchOut {}
    unsafe impl aya::Pod for Config {}
}
