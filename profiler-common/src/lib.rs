//! Types shared between the BPF programs and the agent. Every struct is `#[repr(C)]` and
//! padded explicitly so both sides agree on the layout byte for byte.
#![no_std]

pub const TASK_COMM_LEN: usize = 16;

/// Maximum frames the kernel records per stack (PERF_MAX_STACK_DEPTH).
pub const MAX_STACK_DEPTH: usize = 127;

/// Bytes of user stack one snapshot can hold. Copied from the stack pointer upwards, so
/// the user-space unwinder can walk `.eh_frame` rules of code without frame pointers.
/// Deep call chains (a compiler's recursive passes, parsers, deep frameworks) need tens of
/// KiB; a thread gets this much only once a shorter copy was found too short for it.
pub const MAX_USER_STACK: usize = 65536;
/// What a thread whose needs are not learnt yet gets copied.
pub const UNLEARNT_USER_STACK: u32 = 16384;
/// The copy falls back to chunks of this size when the whole range is not readable (the
/// top of a stack mapping is closer than the configured size).
pub const USER_STACK_CHUNK: usize = 1024;

/// Kinds of ring buffer records; each record starts with its kind as a `u32`.
pub const EVENT_SAMPLE: u32 = 1;
pub const EVENT_SWITCH_OUT: u32 = 2;
pub const EVENT_WAIT_END: u32 = 3;
pub const EVENT_PYTHON_STACK: u32 = 4;
pub const EVENT_LABELS: u32 = 5;
pub const EVENT_THREAD_CONTEXT: u32 = 6;
pub const EVENT_STAMPED_WAIT: u32 = 7;

/// Sizes of user stack a snapshot record can carry. Ring buffer records have a fixed size
/// per type, so a thread that needs a 3 KiB copy takes a 4 KiB record, not a 16 KiB one:
/// four times as many snapshots fit in the buffer.
pub const USER_STACK_CLASSES: [usize; 4] = [4096, 8192, 16384, MAX_USER_STACK];

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
    /// State of the switch-out as the sched_switch tracepoint reports it (see
    /// [`reported_state`]). Zero for samples.
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
    /// Non-zero when the thread's waits were stamped as it switched out (see
    /// [`StampedWait`]): its snapshot is the stack its stamped waits are shown at, even
    /// when this wait was short.
    pub stamped: u32,
    pub _pad: u32,
}

/// A wait of at least `offcpu_min_ns` of a stamped thread whose switch-out was not
/// recorded: its exact length, without stacks. A thread switching out more often than its
/// quota allows (a disk syncer, thousands of times a second) has its switch-outs sampled,
/// and its rare long waits with them; while its switch-outs are stamped (see
/// [`Config::offcpu_stamp_limit`]), each one notes only when it left, and every wait of
/// it that turns out long is counted whole, this record for those not recorded with
/// their stacks. The agent shows it at the stack of the thread's latest recorded wait.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StampedWait {
    /// [`EVENT_STAMPED_WAIT`].
    pub kind: u32,
    pub tid: u32,
    pub tgid: u32,
    /// [`reported_state`] of the switch-out.
    pub state: u32,
    pub out_ts_ns: u64,
    pub elapsed_ns: u64,
}

/// What the kernel keeps per recorded switch-out until the thread comes back, keyed by
/// the address of its `task_struct`: the raw tracepoint hands over `next` as that
/// pointer, so the switch-in needs no read of `next->pid`. A task cannot be freed while
/// off-CPU (it runs to exit), so the key stays unique for the entry's life.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SwitchOut {
    pub ts_ns: u64,
    pub weight_q16: u64,
    pub tid: u32,
    /// [`reported_state`] of the switch-out, for the snapshot the switch-in path takes.
    pub state: u32,
    /// Non-zero when the thread's switch-outs are stamped (see [`WaitEnd::stamped`]).
    pub stamped: u32,
    pub _pad: u32,
}

/// Slots of the `PENDING` pre-check: counts of recorded switch-outs per hash of the task
/// address. A switch-in whose slot is zero has nothing to look up, which is most of them
/// when switch-outs are sampled; a non-zero slot costs one hash lookup.
pub const PENDING_SLOTS: u32 = 16384;

/// The `PENDING` slot of a task, from the address of its `task_struct`.
#[inline(always)]
pub const fn pending_slot(task: u64) -> u32 {
    task_hash(task, PENDING_SLOTS)
}

/// Added to a task's `PENDING` slot for a stamp in flight (see [`StampedWait`]): the low
/// 32 bits count `SWITCH_OUT` entries, the high ones stamps, so a switch-in whose slot is
/// zero still has nothing to look up.
pub const PENDING_STAMP: u64 = 1 << 32;

/// Slots of the `THREAD_QUOTA` map: one per hash of the task address. Two threads that
/// share a slot take it from each other, which only gives them more switch-outs at p = 1.
/// Twice [`PENDING_SLOTS`]: a slot's `PENDING` slot is its index halved (both are the
/// top bits of one hash), which a slot's stamp in flight is counted in.
pub const THREAD_QUOTA_SLOTS: u32 = 2 * PENDING_SLOTS;

/// The `THREAD_QUOTA` slot of a task, from the address of its `task_struct`.
#[inline(always)]
pub const fn thread_quota_slot(task: u64) -> u32 {
    task_hash(task, THREAD_QUOTA_SLOTS)
}

/// A hash of a task address below `slots` (a power of two).
#[inline(always)]
const fn task_hash(task: u64, slots: u32) -> u32 {
    // Fibonacci hashing: task_structs sit at regular slab offsets, the top bits of the
    // product mix all of the address.
    ((task >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - slots.trailing_zeros())) as u32
}

/// The tag a task leaves in its `THREAD_QUOTA` slot: the 16 bits of its hash below the
/// slot's. Two tasks of one slot share a tag once in 65,536 times, and then share
/// their count, which only gives them more switch-outs at p = 1.
#[inline(always)]
pub const fn thread_quota_tag(task: u64) -> u16 {
    ((task >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - THREAD_QUOTA_SLOTS.trailing_zeros() - 16)) as u16
}

/// The weight, in 1/65536ths, of a record drawn with `bpf_get_prandom_u32() <= threshold`:
/// the inverse of its probability, (threshold + 1) / 2^32.
#[inline(always)]
pub const fn weight_q16(threshold: u32) -> u64 {
    (1u64 << 48) / (threshold as u64 + 1)
}

/// A thread's switch-outs in the current quota epoch and the one before (see
/// [`Config::offcpu_thread_quota`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadQuota {
    /// The task the slot counts for ([`thread_quota_tag`]): another task hashing here
    /// starts it afresh.
    pub tag: u16,
    /// The epoch's low 16 bits: they wrap every 6,553 s, and a slot left alone that
    /// long only counts as current once more.
    pub epoch: u16,
    /// Saturating: past 65,535 an epoch a thread's own probability is below any
    /// sampled one anyway.
    pub switches: u16,
    /// Switch-outs in the previous epoch; zero when the thread had none, or is new.
    pub last_switches: u16,
    /// The epoch (low 16 bits) up to which the thread's switch-outs are stamped, renewed
    /// by each long wait a stamp or a record of it finds (see
    /// [`Config::offcpu_stamp_limit`]).
    pub stamp_until: u16,
    /// Switch-outs stamped this epoch while not stamping: up to [`STAMP_PROBES`] look for
    /// long waits in a thread not known to have any.
    pub stamp_probes: u16,
    /// The stamp in flight: [`reported_state`], thread and process of the switch-out...
    pub stamp_state: u32,
    pub stamp_tid: u32,
    pub stamp_tgid: u32,
    /// ...and when it was (`bpf_ktime_get_ns`); zero: none.
    pub stamp_out_ns: u64,
}

/// Switch-outs each quota epoch (about 100 ms) of a thread over its quota and within the
/// stamp limit that are stamped while it is not known to have long waits: a thread
/// whose waits are 0.4% long (the windows bench's syncer) shows one within about a
/// second, and one with none costs 16 stamps an epoch.
pub const STAMP_PROBES: u16 = 16;
/// Epochs a thread's switch-outs stay stamped after a long wait of it was found.
pub const STAMP_EPOCHS: u16 = 20;

/// Python frames read per snapshot at most: deeper recursion is cut at the leaf end's
/// first this many and marked [`PYTHON_TRUNCATED`].
pub const MAX_PYTHON_FRAMES: usize = 128;
/// Threads of one process the kernel looks through for the sampled thread's state when it
/// is not cached yet.
pub const MAX_PYTHON_THREADS: u32 = 64;
/// Set in [`PythonStack::flags`] when the chain went on past [`MAX_PYTHON_FRAMES`]...
pub const PYTHON_TRUNCATED: u32 = 1;
/// ...or when a frame could not be read (paged out, freed under us): the frames before it
/// are sent.
pub const PYTHON_READ_FAILED: u32 = 2;
/// Set in [`PythonFrame::tag`] on the last frame (root side) of each run of frames that
/// one native call of the eval loop executes (the frame it was called for): the native
/// unwinder finds one eval-loop frame per run.
pub const PYTHON_ENTRY: u32 = 1 << 31;
/// No such field in this version.
pub const PYTHON_NO_FIELD: u16 = u16::MAX;
/// Bytes of a frame the kernel reads in one go; every field it needs lies within them
/// (up to 3.10's `f_lasti`, 104 bytes into a `PyFrameObject`).
pub const PYTHON_FRAME_BYTES: usize = 112;
/// Bytes of a code object folded into its fingerprint, from [`PythonLayout::code_fingerprint`].
pub const PYTHON_FINGERPRINT_BYTES: usize = 32;
/// Most bytes of a thread state the kernel reads in one go, from its start.
pub const PYTHON_TSTATE_BYTES: usize = 512;
/// Bytes of a thread's frame stack (`datastack`) the kernel copies at most at a time:
/// frames are pushed there one above the other, so one copy holds tens of callers, where
/// reading each frame on its own costs a read each (about 40 ns).
pub const PYTHON_STACK_WINDOW: usize = 8192;

/// Where a CPython version keeps what the kernel reads, as offsets in bytes. Written by the
/// agent per process into `PYTHON_PROCESSES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonLayout {
    /// `PyInterpreterState::threads.head`.
    pub interp_threads_head: u16,
    /// `PyThreadState::next`.
    pub tstate_next: u16,
    /// `PyThreadState::native_thread_id`: the thread's id in its pid namespace; with
    /// [`PythonLayout::legacy_frames`], `thread_id`: its `pthread_self()`.
    pub tstate_native_thread_id: u16,
    /// `PyThreadState::frame` (3.8-3.10), `cframe` (3.11, 3.12) or `current_frame` (3.13+).
    pub tstate_frame: u16,
    /// `PyThreadState::datastack_chunk`, followed by `datastack_top`: the chunk of the
    /// frame stack in use and its end; [`PYTHON_NO_FIELD`] before 3.11, whose frames
    /// are objects of their own.
    pub tstate_datastack_chunk: u16,
    /// `_PyStackChunk::data`: where frames start in a chunk.
    pub chunk_data: u16,
    /// `_PyCFrame::current_frame`, or [`PYTHON_NO_FIELD`] when `tstate_frame` already
    /// points at the frame.
    pub cframe_current_frame: u16,
    /// `_PyInterpreterFrame::f_code` (`f_executable` from 3.13), `PyFrameObject::f_code`
    /// before 3.11.
    pub frame_code: u16,
    /// `f_func` (3.11) or `f_funcobj` (3.12+): the function object the frame runs;
    /// `f_globals` before 3.11, which has none. Keys the fingerprint cache with the code.
    pub frame_function: u16,
    /// `previous`, or `f_back` before 3.11.
    pub frame_previous: u16,
    /// `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13+), pointers into the bytecode;
    /// `f_lasti` before 3.11, an int (see [`PythonLayout::legacy_frames`]).
    pub frame_instr: u16,
    /// `is_entry` (3.11), or [`PYTHON_NO_FIELD`].
    pub frame_is_entry: u16,
    /// `owner`, or [`PYTHON_NO_FIELD`]; a frame owned by the C stack (3.12, 3.13) or the
    /// interpreter (3.14) is a shim that marks where a native call of the eval loop
    /// began, and is not sent.
    pub frame_owner: u16,
    /// The first `owner` value of those shims (the values after it are shims too).
    pub owner_shim: u16,
    /// Start of the [`PYTHON_FINGERPRINT_BYTES`] of a code object that identify it
    /// beside its address (argument counts, first line): a code object freed and its
    /// address reused by another is told apart.
    pub code_fingerprint: u16,
    /// Bytes of `PyThreadState` read: every field above lies within them, and the
    /// struct is at least this long. At most [`PYTHON_TSTATE_BYTES`].
    pub tstate_bytes: u16,
    /// Zero from 3.11. Before, frames are `PyFrameObject`s in the heap, and this is the
    /// unit of their `f_lasti` in bytes (1 in 3.8 and 3.9, 2 in 3.10); with them, each
    /// frame is run by a native call of the eval loop of its own (every frame is an
    /// entry), and the thread state holds `pthread_self()`, which is the thread pointer
    /// (`fsbase`) on x86-64, instead of a native thread id.
    pub legacy_frames: u16,
}

/// A Python process's state the kernel walks from: its layout, where its interpreter list
/// starts, and its pid namespace (thread ids in thread states are the namespace's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PythonProcess {
    pub layout: PythonLayout,
    /// Address of `_PyRuntime.interpreters.head` in the process.
    pub interpreters_head: u64,
    /// Device and inode of the process's pid namespace, or zero for the initial one.
    pub pid_ns_dev: u64,
    pub pid_ns_ino: u64,
}

/// One Python frame: its code object, where in it, and the fingerprint to validate it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonFrame {
    pub code: u64,
    /// Instruction pointer minus the code object's address (clamped to u32); before
    /// 3.11, `f_lasti` as it is.
    pub instr_offset: u32,
    /// [`python_fingerprint`] of the code object in the low 31 bits, [`PYTHON_ENTRY`].
    pub tag: u32,
}

/// The Python frames of a snapshot, sent just before it with the same (`tid`, `ts_ns`),
/// in a record with room for `N` of them, the smallest of [`PYTHON_STACK_CLASSES`] that
/// holds them: the copy into the ring costs by the byte.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PythonStackOf<const N: usize> {
    /// [`EVENT_PYTHON_STACK`].
    pub kind: u32,
    pub tid: u32,
    pub ts_ns: u64,
    /// Valid entries of `frames`, leaf first.
    pub depth: u32,
    /// [`PYTHON_TRUNCATED`], [`PYTHON_READ_FAILED`].
    pub flags: u32,
    pub frames: [PythonFrame; N],
}

/// The largest record: what the kernel builds before sending the part it needs.
pub type PythonStack = PythonStackOf<MAX_PYTHON_FRAMES>;

/// Frames a Python stack record has room for.
pub const PYTHON_STACK_CLASSES: [usize; 3] = [16, 48, MAX_PYTHON_FRAMES];

/// Labels read per snapshot at most; more are cut and marked [`LABELS_CUT`].
pub const MAX_LABELS: usize = 8;
/// Bytes of a label's key kept; a longer key is cut and marked [`LABELS_CUT`].
pub const LABEL_KEY_BYTES: usize = 32;
/// Bytes of a label's value kept (a UUID or a W3C trace id fits).
pub const LABEL_VALUE_BYTES: usize = 64;
/// Some labels, or part of a key or value, did not fit.
pub const LABELS_CUT: u32 = 1;
/// A label could not be read (paged out, or the set changing under the read).
pub const LABELS_READ_FAILED: u32 = 2;

/// A process that publishes request context in thread-local storage: custom labels (ABI
/// v1 of Parca's `custom-labels`: the thread-local `custom_labels_current_set`, of its
/// main executable or of a library), or OpenTelemetry's thread context (`format`
/// [`LABELS_FORMAT_OTEL`]: the thread-local `otel_thread_ctx_v1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabelsProcess {
    /// [`LABELS_FORMAT_CUSTOM`] or [`LABELS_FORMAT_OTEL`].
    pub format: u32,
    pub _pad: u32,
    /// With `tls_module` 0, added (wrapping) to a thread's `fsbase` to get the address of
    /// its `custom_labels_current_set` (static TLS: the executable's, or a library's
    /// loaded at start): minus the module's TLS block offset, plus the symbol's offset in
    /// it. Otherwise the symbol's offset in the module's own block.
    pub tls_offset: u64,
    /// 0, or the TLS module id of a library whose block glibc allocates per thread on
    /// first use (one loaded by `dlopen`): the block is then found through the thread's
    /// dynamic thread vector (see [`DTV_OFFSET`]).
    pub tls_module: u64,
}

/// glibc's dynamic thread vector on x86-64: its address is the word at the thread
/// pointer plus this (`tcbhead_t.dtv`); entry `m` (16 bytes: the block's address, then
/// what to free) is module `m`'s block, and entry -1's first word is the number of
/// modules the vector has room for. A block not allocated yet reads as
/// [`DTV_UNALLOCATED`].
pub const DTV_OFFSET: u64 = 8;
/// Bytes of one entry of the dynamic thread vector.
pub const DTV_ENTRY_BYTES: u64 = 16;
/// glibc's `TLS_DTV_UNALLOCATED`.
pub const DTV_UNALLOCATED: u64 = u64::MAX;
/// Module ids past this are not believed (glibc counts modules with TLS from 1).
pub const MAX_TLS_MODULE: u64 = 1 << 16;

/// One custom label as the kernel copied it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Label {
    /// Valid bytes of `key` and `value`.
    pub key_len: u16,
    pub value_len: u16,
    pub key: [u8; LABEL_KEY_BYTES],
    pub value: [u8; LABEL_VALUE_BYTES],
}

/// The custom labels of a snapshot, sent just before it with the same (`tid`, `ts_ns`).
/// A thread without a label set sends none. Sent cut after its `count` labels.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LabelsRecord {
    /// [`EVENT_LABELS`].
    pub kind: u32,
    pub tid: u32,
    pub ts_ns: u64,
    /// Valid entries of `labels`.
    pub count: u32,
    /// [`LABELS_CUT`], [`LABELS_READ_FAILED`].
    pub flags: u32,
    pub labels: [Label; MAX_LABELS],
}

/// Bytes of a [`LabelsRecord`] before its labels.
pub const LABELS_HEADER_BYTES: usize = core::mem::offset_of!(LabelsRecord, labels);

/// [`LabelsProcess::format`]: the variable points to a custom-labels set.
pub const LABELS_FORMAT_CUSTOM: u32 = 0;
/// [`LabelsProcess::format`]: the variable points to an OpenTelemetry thread-context
/// record (OTEP 4947, `otel_thread_ctx_v1`).
pub const LABELS_FORMAT_OTEL: u32 = 1;
/// Bytes of a thread-context record before its attributes: trace id (16), span id
/// (8), valid (1), trace flags (1), attributes' size (2, native order).
pub const THREAD_CONTEXT_HEADER_BYTES: usize = 28;
/// Bytes of a record's attributes read at most (the OTEP recommends records of at most
/// 640 bytes; keys are one byte, values at most 255).
pub const THREAD_CONTEXT_ATTR_BYTES: usize = 256;

/// A thread's OpenTelemetry thread context, sent just before its snapshot with the same
/// (`tid`, `ts_ns`) when the thread has a valid record. Sent cut after `attrs_len`
/// bytes of `attrs`; the agent names the attributes' keys from the process context's
/// key map.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ThreadContextRecord {
    /// [`EVENT_THREAD_CONTEXT`].
    pub kind: u32,
    pub tid: u32,
    pub ts_ns: u64,
    pub tgid: u32,
    /// Bytes of `attrs` valid.
    pub attrs_len: u32,
    /// The record's first [`THREAD_CONTEXT_HEADER_BYTES`] as read.
    pub header: [u8; THREAD_CONTEXT_HEADER_BYTES],
    pub attrs: [u8; THREAD_CONTEXT_ATTR_BYTES],
}

/// Bytes of a [`ThreadContextRecord`] before its attributes.
pub const THREAD_CONTEXT_RECORD_HEADER_BYTES: usize = core::mem::offset_of!(ThreadContextRecord, attrs);

/// The fingerprint of a code object from its [`PYTHON_FINGERPRINT_BYTES`] as four words:
/// the same in the kernel and the agent, 31 bits.
#[inline(always)]
pub const fn python_fingerprint(words: [u64; 4]) -> u32 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < 4 {
        hash = (hash ^ words[i]).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    ((hash >> 33) ^ hash) as u32 & !PYTHON_ENTRY
}

/// Set in [`SnapshotHeader::state`] for a task switched out while still runnable (preempted).
pub const STATE_PREEMPTED: u32 = 1 << 31;
/// Task states of the sched_switch tracepoint (TASK_REPORT bits).
pub const TASK_INTERRUPTIBLE: u32 = 0x1;
pub const TASK_UNINTERRUPTIBLE: u32 = 0x2;
pub const TASK_STOPPED: u32 = 0x4;
pub const EXIT_DEAD: u32 = 0x10;
pub const EXIT_ZOMBIE: u32 = 0x20;
pub const TASK_PARKED: u32 = 0x40;
pub const TASK_REPORT_IDLE: u32 = 0x80;

/// `task_struct::__state` values the raw tracepoint passes as `prev_state`.
pub const RAW_TASK_DEAD: u64 = 0x80;
const RAW_TASK_IDLE: u64 = 0x402;
const RAW_TASK_RTLOCK_WAIT: u64 = 0x1000;
const RAW_TASK_FROZEN: u64 = 0x8000;
/// TASK_REPORT: the state bits the tracepoint reports.
const RAW_TASK_REPORT: u64 = 0x7f;

/// The state the sched_switch tracepoint reports for a switch-out, computed from the raw
/// tracepoint's arguments the way the kernel's `__trace_sched_switch_state` does: the
/// highest TASK_REPORT bit of `__state`, TASK_IDLE as [`TASK_REPORT_IDLE`] and
/// TASK_RTLOCK_WAIT as uninterruptible whatever flags come with them (TASK_FREEZABLE), a
/// task still runnable as [`STATE_PREEMPTED`]. One departure: a task entering the
/// refrigerator (TASK_FROZEN, no TASK_REPORT bit) is reported by the kernel as running;
/// here it is stopped, since it waits for a thaw, not for a CPU.
#[inline(always)]
pub const fn reported_state(raw_state: u64, preempted: bool) -> u32 {
    if preempted || raw_state == 0 {
        return STATE_PREEMPTED;
    }
    if raw_state & RAW_TASK_IDLE == RAW_TASK_IDLE {
        return TASK_REPORT_IDLE;
    }
    if raw_state & RAW_TASK_RTLOCK_WAIT != 0 {
        return TASK_UNINTERRUPTIBLE;
    }
    if raw_state & RAW_TASK_FROZEN != 0 {
        return TASK_STOPPED;
    }
    let report = raw_state & RAW_TASK_REPORT;
    if report == 0 {
        return STATE_PREEMPTED;
    }
    // Branches rather than a leading-zero count, which BPF has no instruction for.
    let mut bit = 0x40;
    while bit > 1 && report & bit == 0 {
        bit >>= 1;
    }
    bit as u32
}

/// Runtime settings, written by the agent into `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Only this process is recorded when non-zero.
    pub filter_tgid: u32,
    /// Switch-outs are recorded when `bpf_get_prandom_u32() <= offcpu_sample_threshold`,
    /// weighted by [`weight_q16`] of it. The kernel reads this word once per switch-out
    /// and derives the weight from it: the agent rewrites the config in place, and a
    /// weight read separately could belong to another probability (up to ×10,000).
    pub offcpu_sample_threshold: u32,
    /// Waits shorter than this are not aggregated.
    pub offcpu_min_ns: u64,
    /// Most bytes of user stack copied per snapshot, a multiple of [`USER_STACK_CHUNK`] up
    /// to [`MAX_USER_STACK`]; zero keeps only the registers. Within it, a thread gets what
    /// the agent learnt it needs, or [`UNLEARNT_USER_STACK`].
    pub user_stack_bytes: u32,
    /// Offset of `child_pid` in the `sched_process_fork` tracepoint's record, read from
    /// tracefs at load time (the record's layout changed across kernels).
    pub fork_child_pid_offset: u32,
    /// Switch-outs each CPU records per [`BURST_SLOT_NS`] at the full probability; past
    /// it, the rest of the slot records at 2^-[`BURST_SHIFT`] of it with the weight to
    /// match. Zero: no limit.
    pub offcpu_burst_quota: u32,
    /// A thread whose switch-outs (n) in the previous quota epoch and so far in this one
    /// (this one included) are both at most Q has this switch-out recorded at p = 1;
    /// otherwise at (Q/n)² with the larger n, or at the sampled probability when that is
    /// higher. Zero: all are sampled alike. A thread that blocks rarely (a lock holder, a database call) then
    /// has every wait recorded, and the budget is not spent on the threads that switch
    /// thousands of times a second, whose waits are mostly too short to keep. Which
    /// probability applies is decided from the thread's switches before the wait
    /// starts, so weighting each record by its own 1/p keeps totals unbiased.
    pub offcpu_thread_quota: u32,
    /// Non-zero: the switch-in path. `sched_switch` only notes when each task switched
    /// out, and the program on the scheduler's switch-in function takes the stacks of a
    /// task coming back from a wait of at least `offcpu_min_ns`, in its own context: the
    /// wait's length is known before any stack is paid for. Needs a kprobe there.
    pub offcpu_switch_in: u32,
    /// 2^32 / jiffies per quota epoch: the epoch is the kernel's tick count in steps of
    /// about 100 ms (the agent measures the tick rate), so every thread's epochs are the
    /// same length whatever the agent is doing. See [`quota_epoch`].
    pub offcpu_quota_epoch_factor: u32,
    /// Non-zero: the time spent reading Python frames is counted (`PythonNs`), at two
    /// clock reads per Python snapshot; the agent sets it while the kernel's BPF run-time
    /// statistics are on all the time, so the share of the programs' cost that is
    /// Python's is measured in the same run.
    pub python_timing: u32,
    /// Offset of `thread.fsbase` in `task_struct`, from the kernel's BTF: where a thread's
    /// thread pointer is kept, from which its custom labels are found. Zero: unknown, no
    /// labels are read.
    pub fsbase_offset: u32,
    /// How many switch-outs in a row of one thread, from the same place (see
    /// [`KernelStackCache`]), take the kernel stack walked for the first of them instead
    /// of walking it again. Zero: every one is walked.
    pub kernel_stack_reuses: u32,
    /// Switch-outs an epoch up to which a thread over its quota has them stamped, once a
    /// long wait of it was found: each notes when it left (a clock read), and its switch-in
    /// measures the wait, so every long wait of it is counted whole (see [`StampedWait`])
    /// and its records only give the stacks. Above it, a thread is only sampled: stamps
    /// cost two clock reads a switch. Zero: no stamps.
    pub offcpu_stamp_limit: u32,
}

/// Places whose last walked wait stack the kernel keeps (an LRU map, about 1 KiB each):
/// a thread that waits in turns at a lock and a sleep (the windows bench's holder and
/// locker) keeps one for each.
pub const KERNEL_STACK_CACHE_ENTRIES: u32 = 2048;

/// The x86-64 system calls whose waits block in one place in the kernel, so that a
/// thread's switch-outs from one call site of theirs share one kernel stack: sleeps,
/// futexes, polls and waits for children or signals (`nanosleep`, `clock_nanosleep`,
/// `futex`, `futex_waitv`, `poll`, `ppoll`, `select`, `pselect6`, `epoll_wait`,
/// `epoll_pwait`, `epoll_pwait2`, `pause`, `rt_sigsuspend`, `rt_sigtimedwait`, `wait4`,
/// `waitid`). I/O is not among them: one `read` may wait for the pipe, its lock or a page
/// fault, one `fdatasync` for writeback, then the device's cache flush.
pub const SINGLE_WAIT_SYSCALLS: [u64; 16] = [35, 230, 202, 449, 7, 271, 23, 270, 232, 281, 441, 34, 130, 128, 61, 247];

/// Whether a blocking switch-out in x86-64 system call `syscall`, in reported `state`,
/// may take its place's kept kernel stack (see [`KernelStackCache`]): any wait of one of
/// [`SINGLE_WAIT_SYSCALLS`], and an interruptible sleep (S) in any other call. What makes
/// one I/O call wait in several places is uninterruptible (D): a pipe's or socket's lock
/// (`mutex_lock`, `lock_sock`), a page fault on the user's buffer, writeback and the
/// device's flush under `fdatasync`. The S sleeps are a call's wait for its event (a
/// pipe's or socket's data or room, a connection), one place each. Before, pipe reads and
/// writes walked every time (the windows bench's pipe reader and writer).
#[inline(always)]
pub fn reusable_wait(syscall: u64, state: u32) -> bool {
    state == TASK_INTERRUPTIBLE || SINGLE_WAIT_SYSCALLS.contains(&syscall)
}

/// Where a thread switched out from, the key of its [`KernelStackCache`]: the state it
/// left in and the user registers it entered the kernel with (the system call's number
/// and where in user code it was made, stack pointer included). Keyed by place, not by
/// thread: a thread kept one stack before, and one alternating between two places (a
/// mutex and a sleep) walked every time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WaitPlace {
    pub tid: u32,
    pub state: u32,
    pub syscall: u64,
    pub ip: u64,
    pub sp: u64,
}

/// A place's kernel stack as walked at one of its thread's switch-outs from there, with
/// the process the thread was in (a tid reused by another process starts afresh).
/// Walking the kernel stack is most of what a record costs, and a later blocking
/// switch-out of the same thread from the same place, in a call [`reusable_wait`]
/// allows, made in 64-bit mode, waits in the same kernel code. As a guard for what that
/// rule does not foresee, a place earns reuse walk by walk: after k walks in a row from it
/// found the same stack (the first not counted), its next k switch-outs, at most
/// [`Config::kernel_stack_reuses`], take that stack, and the one after walks again. A
/// walk that finds another stack takes the place back to walking every time
/// (`kernel_stacks_changed` counts those that followed reuses: the measured rate of
/// places that stopped holding).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KernelStackCache {
    pub tgid: u32,
    /// Switch-outs that took this stack since it was walked.
    pub uses: u32,
    /// Bytes of `frames`; zero: none.
    pub len: u32,
    /// Walks in a row from this place that found this stack, after the first.
    pub agreed: u32,
    /// Hash of the frames, to tell a walk that differs from the last one.
    pub hash: u64,
    pub frames: [u64; MAX_STACK_DEPTH],
}

/// The quota epoch of tick count `jiffies`: its low 32 bits times
/// [`Config::offcpu_quota_epoch_factor`], in 2^-32 units. A multiplication, where a
/// division by the jiffies per epoch cost a traced switch-out several nanoseconds. The
/// low 32 bits wrap every 49 days at 1,000 Hz: the epoch then jumps once, which only
/// starts every thread's count afresh.
#[inline(always)]
pub const fn quota_epoch(jiffies: u64, factor: u32) -> u16 {
    (((jiffies & 0xffff_ffff) * factor as u64) >> 32) as u16
}

/// The slot [`Config::offcpu_burst_quota`] counts in. Rate control in the agent adjusts
/// the probability every 100 ms; this keeps the first of a burst of switches (a load
/// starting on an idle host) from being recorded at the idle host's probability.
pub const BURST_SLOT_NS: u64 = 10_000_000;
/// A CPU over its quota records at 1/64 of the probability for the rest of the slot.
/// Which probability applies is decided by switch-outs already recorded, before the
/// draw, so weighting each record by its own inverse probability keeps totals unbiased.
pub const BURST_SHIFT: u32 = 6;
/// Switch-outs recorded within thread quotas each CPU may take per [`BURST_SLOT_NS`], in
/// multiples of [`Config::offcpu_burst_quota`]. Past it, a thread's switch-out falls
/// back to the sampled probability, whose weight (hundreds) on one long wait is a
/// window's error. Threads woken by timers expiring together come in bursts: the native
/// `waits` workload's sleeper, writer and pipe reader make 8 to 12 records on one CPU
/// within a millisecond every 20 ms. A thousand new threads within their quotas still
/// cost at most this many records per CPU per slot until rate control's next tick.
pub const QUOTA_BURST_FACTOR: u32 = 4;

/// Per-CPU state of the burst limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BurstSlot {
    pub start_ns: u64,
    /// Sampled switch-outs recorded in the slot...
    pub recorded: u64,
    /// ...and those recorded within their thread's quota, limited apart: sampling at the
    /// rate control's steady probability may fill the slot, and must not take the
    /// rarely-blocking threads' waits with it.
    pub by_quota: u64,
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
    SwitchOutsRecorded,
    /// Switch-outs not recorded because `SWITCH_OUT` was full.
    SwitchOutMapFull,
    /// Switch-outs or wait ends lost because the ring buffer was full.
    OffCpuRingFull,
    OffCpuBelowMin,
    /// Nanoseconds spent in the BPF program recording sampled switch-outs (the part of
    /// the off-CPU cost that the sampling probability controls).
    SwitchOutRecordNs,
    /// Recorded switch-outs whose switch-in the kernel never reported: found at the task's
    /// next switch-out and dropped, since the wait's end is unknown.
    SwitchInMissed,
    /// Switch-outs recorded at the reduced probability of a CPU over its burst quota.
    SwitchOutsThrottled,
    /// Recorded switch-outs of threads preempted while in user mode, whose kernel stack
    /// was not walked: it holds only the return path of the interrupt that preempted them.
    KernelStacksNotWalked,
    /// Switch-outs recorded at p = 1 within their thread's quota (part of
    /// `SwitchOutsRecorded`).
    SwitchOutsByQuota,
    /// Waits of at least `offcpu_min_ns` that ended, on the switch-in path: the records
    /// it would take to record every one.
    LongWaitsEnded,
    /// Snapshots of Python threads that carried Python frames...
    PythonStacks,
    /// ...of them, those cut at [`MAX_PYTHON_FRAMES`]...
    PythonTruncated,
    /// ...or at a frame that could not be read.
    PythonReadFailed,
    /// Snapshots of a Python process whose thread state was not found (a native thread,
    /// or more than [`MAX_PYTHON_THREADS`] threads).
    PythonThreadUnknown,
    /// Nanoseconds spent reading Python frames, while [`Config::python_timing`] is on.
    PythonNs,
    /// Snapshots that carried custom labels...
    Labelled,
    /// ...of them, those with labels cut ([`LABELS_CUT`]) or unreadable.
    LabelsCut,
    /// Recorded switch-outs that took their thread's last walked kernel stack (see
    /// [`KernelStackCache`]).
    KernelStacksReused,
    /// Walks after [`Config::kernel_stack_reuses`] reuses that found another stack than
    /// the one reused.
    KernelStacksChanged,
    /// The part of `SwitchOutRecordNs` spent on switch-outs recorded within their
    /// thread's quota: those are mostly sleeps and lock waits that take a kept kernel
    /// stack, the sampled ones often a frequent switcher's I/O, walked every time.
    SwitchOutQuotaRecordNs,
    /// Switch-outs stamped (see [`Config::offcpu_stamp_limit`]).
    SwitchOutsStamped,
    /// Stamped waits of at least `offcpu_min_ns`, sent as [`StampedWait`].
    StampedLongWaits,
}

impl Stat {
    pub const COUNT: u32 = 26;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::Samples,
        Stat::SampleRingFull,
        Stat::UserStackLost,
        Stat::KernelStackLost,
        Stat::SwitchOutsRecorded,
        Stat::SwitchOutMapFull,
        Stat::OffCpuRingFull,
        Stat::OffCpuBelowMin,
        Stat::SwitchOutRecordNs,
        Stat::SwitchInMissed,
        Stat::SwitchOutsThrottled,
        Stat::KernelStacksNotWalked,
        Stat::SwitchOutsByQuota,
        Stat::LongWaitsEnded,
        Stat::PythonStacks,
        Stat::PythonTruncated,
        Stat::PythonReadFailed,
        Stat::PythonThreadUnknown,
        Stat::PythonNs,
        Stat::Labelled,
        Stat::LabelsCut,
        Stat::KernelStacksReused,
        Stat::KernelStacksChanged,
        Stat::SwitchOutQuotaRecordNs,
        Stat::SwitchOutsStamped,
        Stat::StampedLongWaits,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Samples => "samples",
            Stat::SampleRingFull => "sample_ring_full",
            Stat::UserStackLost => "user_stack_lost",
            Stat::KernelStackLost => "kernel_stack_lost",
            Stat::SwitchOutsRecorded => "switch_outs_recorded",
            Stat::SwitchOutMapFull => "switch_out_map_full",
            Stat::OffCpuRingFull => "offcpu_ring_full",
            Stat::OffCpuBelowMin => "offcpu_below_min",
            Stat::SwitchOutRecordNs => "switch_out_record_ns",
            Stat::SwitchInMissed => "switch_in_missed",
            Stat::SwitchOutsThrottled => "switch_outs_throttled",
            Stat::KernelStacksNotWalked => "kernel_stacks_not_walked",
            Stat::SwitchOutsByQuota => "switch_outs_by_quota",
            Stat::LongWaitsEnded => "long_waits_ended",
            Stat::PythonStacks => "python_stacks",
            Stat::PythonTruncated => "python_truncated",
            Stat::PythonReadFailed => "python_read_failed",
            Stat::PythonThreadUnknown => "python_thread_unknown",
            Stat::PythonNs => "python_ns",
            Stat::Labelled => "labelled_snapshots",
            Stat::LabelsCut => "labels_cut",
            Stat::KernelStacksReused => "kernel_stacks_reused",
            Stat::KernelStacksChanged => "kernel_stacks_changed",
            Stat::SwitchOutQuotaRecordNs => "switch_out_quota_record_ns",
            Stat::SwitchOutsStamped => "switch_outs_stamped",
            Stat::StampedLongWaits => "stamped_long_waits",
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
    pub const PENDING: &str = "PENDING";
    pub const PARENTS: &str = "PARENTS";
    pub const THREAD_QUOTA: &str = "THREAD_QUOTA";
    pub const PYTHON_PROCESSES: &str = "PYTHON_PROCESSES";
    pub const LABEL_PROCESSES: &str = "LABEL_PROCESSES";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)] plain integers with explicit padding.
    unsafe impl aya::Pod for SwitchOut {}
    unsafe impl aya::Pod for ThreadQuota {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for PythonProcess {}
    unsafe impl aya::Pod for LabelsProcess {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_states_report_like_the_tracepoint() {
        assert_eq!(reported_state(0x1, false), TASK_INTERRUPTIBLE);
        assert_eq!(reported_state(0x2, false), TASK_UNINTERRUPTIBLE);
        // TASK_KILLABLE = TASK_WAKEKILL | TASK_UNINTERRUPTIBLE.
        assert_eq!(reported_state(0x102, false), TASK_UNINTERRUPTIBLE);
        assert_eq!(reported_state(0x402, false), TASK_REPORT_IDLE);
        assert_eq!(reported_state(0x1000, false), TASK_UNINTERRUPTIBLE);
        assert_eq!(reported_state(0x40, false), TASK_PARKED);
        // __TASK_STOPPED.
        assert_eq!(reported_state(0x4, false), 0x4);
        assert_eq!(reported_state(0x0, false), STATE_PREEMPTED);
        // Preempted while setting up a sleep: still runnable.
        assert_eq!(reported_state(0x1, true), STATE_PREEMPTED);
    }

    #[test]
    fn kept_kernel_stacks_serve_single_place_waits_only() {
        const READ: u64 = 0;
        const WRITE: u64 = 1;
        const FDATASYNC: u64 = 75;
        const FUTEX: u64 = 202;
        const NANOSLEEP: u64 = 35;
        // A pipe's or socket's wait for data or room.
        assert!(reusable_wait(READ, TASK_INTERRUPTIBLE));
        assert!(reusable_wait(WRITE, TASK_INTERRUPTIBLE));
        // Its lock, a page fault, a disk: several places from one call.
        assert!(!reusable_wait(READ, TASK_UNINTERRUPTIBLE));
        assert!(!reusable_wait(FDATASYNC, TASK_UNINTERRUPTIBLE));
        assert!(!reusable_wait(READ, TASK_REPORT_IDLE));
        // The listed calls in any state: a futex's wait is the same, S or D.
        assert!(reusable_wait(FUTEX, TASK_UNINTERRUPTIBLE));
        assert!(reusable_wait(NANOSLEEP, TASK_INTERRUPTIBLE));
    }

    /// Since 6.1 a sleep may carry TASK_FREEZABLE (0x2000), and a task entering the
    /// refrigerator switches out as TASK_FROZEN (0x8000), which has no TASK_REPORT bit.
    #[test]
    fn freezer_states_are_neither_disk_waits_nor_runnable() {
        // TASK_IDLE | TASK_FREEZABLE: a freezable kernel thread idling, not a disk wait.
        assert_eq!(reported_state(0x2402, false), TASK_REPORT_IDLE);
        // TASK_INTERRUPTIBLE | TASK_FREEZABLE: still an interruptible sleep.
        assert_eq!(reported_state(0x2001, false), TASK_INTERRUPTIBLE);
        // TASK_RTLOCK_WAIT with other flags is still a lock wait, uninterruptible.
        assert_eq!(reported_state(0x1000 | 0x2000, false), TASK_UNINTERRUPTIBLE);
        // Frozen: stopped by the freezer (a frozen cgroup, suspend), not waiting for a CPU.
        assert_eq!(reported_state(0x8000, false), TASK_STOPPED);
        assert_eq!(reported_state(0x8000 | 0x2000, false), TASK_STOPPED);
    }

    #[test]
    fn quota_epochs_step_every_epoch_of_jiffies() {
        // 250 Hz: 25 jiffies per 100 ms epoch.
        let factor = ((1u64 << 32) / 25) as u32;
        let start = 4_294_937_296u64 & 0xffff_ffff; // INITIAL_JIFFIES
        let mut changes = 0;
        for jiffies in start..start + 25_000 {
            if quota_epoch(jiffies + 1, factor) != quota_epoch(jiffies, factor) {
                changes += 1;
            }
        }
        assert!((999..=1001).contains(&changes), "{changes} epochs in 25,000 jiffies");
    }

    #[test]
    fn a_quota_slot_halved_is_its_tasks_pending_slot() {
        for i in 0..100_000u64 {
            let task = 0xffff_8880_0000_0000 + i * 0x2c40;
            assert_eq!(thread_quota_slot(task) >> 1, pending_slot(task));
        }
    }

    #[test]
    fn pending_slots_spread_slab_addresses() {
        // task_structs of one slab cache, about 10 KiB apart.
        let mut used = [false; PENDING_SLOTS as usize];
        let tasks = 2000u64;
        for i in 0..tasks {
            used[pending_slot(0xffff_8880_0400_0000 + i * 10_112) as usize] = true;
        }
        let distinct = used.iter().filter(|&&u| u).count() as u64;
        // Random placement of 2000 keys in 16384 slots leaves about 1880 distinct.
        assert!(distinct > tasks * 9 / 10, "{distinct} distinct slots for {tasks} tasks");
    }
}
