//! Types shared between the BPF programs and the agent. Every struct is `#[repr(C)]` and
//! padded explicitly so both sides agree on the layout byte for byte.
#![no_std]

pub const TASK_COMM_LEN: usize = 16;

/// Maximum frames the kernel records per stack (PERF_MAX_STACK_DEPTH).
pub const MAX_STACK_DEPTH: usize = 127;

/// Bytes of user stack one snapshot can hold. Copied from the stack pointer upwards, so
/// the user-space unwinder can walk `.eh_frame` rules of code without frame pointers.
pub const MAX_USER_STACK: usize = 16384;
/// The copy falls back to chunks of this size when the whole range is not readable (the
/// top of a stack mapping is closer than the configured size).
pub const USER_STACK_CHUNK: usize = 1024;

/// Kinds of ring buffer records; each record starts with its kind as a `u32`.
pub const EVENT_SAMPLE: u32 = 1;
pub const EVENT_SWITCH_OUT: u32 = 2;
pub const EVENT_WAIT_END: u32 = 3;

/// Sizes of user stack a snapshot record can carry. Ring buffer records have a fixed size
/// per type, so a thread that needs a 3 KiB copy takes a 4 KiB record, not a 16 KiB one:
/// four times as many snapshots fit in the buffer.
pub const USER_STACK_CLASSES: [usize; 3] = [4096, 8192, MAX_USER_STACK];

/// A thread's stacks at one moment: an on-CPU sample, or a switch-out whose wait is
/// measured later by an [`WaitEnd`] record with the same (`tid`, `ts_ns`). The copy of
/// the user stack follows this header in the same record, `N` bytes of one of
/// [`USER_STACK_CLASSES`], of which `user_len` are valid.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SnapshotHeader {
    /// [`EVENT_SAMPLE`] or [`EVENT_SWITCH_OUT`].
    pub kind: u32,
    pub tid: u32,
    pub tgid: u32,
    /// `prev_state` of the switch-out as the sched_switch tracepoint reports it, with
    /// [`STATE_PREEMPTED`] set when the task was still runnable. Zero for samples.
    pub state: u32,
    /// `bpf_ktime_get_ns()` when taken.
    pub ts_ns: u64,
    /// The thread's comm at that moment, so exited processes keep a name.
    pub comm: [u8; TASK_COMM_LEN],
    /// User registers (saved at kernel entry), zero for kernel threads.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes of `kernel` written by `bpf_get_stack` (a multiple of 8).
    pub kernel_len: u32,
    /// Bytes of user stack copied from `sp` upwards, after the header.
    pub user_len: u32,
    /// Kernel return addresses, leaf first.
    pub kernel: [u64; MAX_STACK_DEPTH],
}

/// A snapshot record: the header and room for `N` bytes of user stack.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackSnapshot<const N: usize> {
    pub header: SnapshotHeader,
    pub user_stack: [u8; N],
}

/// The end of a recorded wait: sent at switch-in of a thread whose switch-out was
/// recorded, whatever the wait's length, so the agent can drop the snapshot of short ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WaitEnd {
    /// [`EVENT_WAIT_END`].
    pub kind: u32,
    pub tid: u32,
    /// `ts_ns` of the matching [`SnapshotHeader`].
    pub out_ts_ns: u64,
    /// Wall time off-CPU; zero when shorter than `offcpu_min_ns`.
    pub elapsed_ns: u64,
    /// Weight of this wait in 1/65536 units: 65536 / sampling probability.
    pub weight_q16: u64,
}

/// What the kernel keeps per switched-out thread until it comes back.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SwitchOut {
    pub ts_ns: u64,
    pub weight_q16: u64,
}

/// Set in [`SnapshotHeader::state`] for a task switched out while still runnable (preempted).
pub const STATE_PREEMPTED: u32 = 1 << 31;
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
    /// Only this process is recorded when non-zero.
    pub filter_tgid: u32,
    /// Switch-outs are recorded when `bpf_get_prandom_u32() <= offcpu_sample_threshold`.
    pub offcpu_sample_threshold: u32,
    /// 65536 / sampling probability, stored with each recorded switch-out.
    pub offcpu_weight_q16: u64,
    /// Waits shorter than this are not aggregated.
    pub offcpu_min_ns: u64,
    /// Bytes of user stack copied per snapshot, a multiple of [`USER_STACK_CHUNK`] up to
    /// [`MAX_USER_STACK`]; zero keeps only the registers.
    pub user_stack_bytes: u32,
    pub _pad: u32,
}

/// Indices of the per-CPU `STATS` counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Samples = 0,
    /// Samples lost because the ring buffer was full.
    SampleRingFull,
    /// Snapshots whose user stack could not be copied at all.
    UserStackLost,
    KernelStackLost,
    Switches,
    SwitchOutsRecorded,
    /// Switch-outs not recorded because `SWITCH_OUT` was full.
    SwitchOutMapFull,
    /// Switch-outs or wait ends lost because the ring buffer was full.
    OffCpuRingFull,
    OffCpuBelowMin,
}

impl Stat {
    pub const COUNT: u32 = 9;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::Samples,
        Stat::SampleRingFull,
        Stat::UserStackLost,
        Stat::KernelStackLost,
        Stat::Switches,
        Stat::SwitchOutsRecorded,
        Stat::SwitchOutMapFull,
        Stat::OffCpuRingFull,
        Stat::OffCpuBelowMin,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Samples => "samples",
            Stat::SampleRingFull => "sample_ring_full",
            Stat::UserStackLost => "user_stack_lost",
            Stat::KernelStackLost => "kernel_stack_lost",
            Stat::Switches => "switches",
            Stat::SwitchOutsRecorded => "switch_outs_recorded",
            Stat::SwitchOutMapFull => "switch_out_map_full",
            Stat::OffCpuRingFull => "offcpu_ring_full",
            Stat::OffCpuBelowMin => "offcpu_below_min",
        }
    }
}

/// Map names, shared so the agent sizes and opens exactly what the BPF object defines.
pub mod maps {
    pub const CONFIG: &str = "CONFIG";
    pub const STATS: &str = "STATS";
    pub const EVENTS: &str = "EVENTS";
    pub const SWITCH_OUT: &str = "SWITCH_OUT";
    pub const STACK_BYTES: &str = "STACK_BYTES";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)] plain integers with explicit padding.
    unsafe impl aya::Pod for SwitchOut {}
    unsafe impl aya::Pod for Config {}
}
