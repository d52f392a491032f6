//! BPF side of the profiler: on-CPU samples from the cpu-clock perf event and off-CPU
//! waits from the sched_switch raw tracepoint.
//!
//! Each sample and each recorded switch-out is a [`StackSnapshot`] in the `EVENTS` ring
//! buffer: the kernel stack, the user registers and a copy of the top of the user stack.
//! The agent unwinds the user stack from `.eh_frame`, so code built without frame pointers
//! (gcc/clang `-O2`, Rust release builds, the C library) keeps its callers. A recorded
//! wait is closed by a small [`WaitEnd`] record at switch-in.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ffi::c_void;

    use aya_ebpf::{
        bindings::{bpf_pidns_info, BPF_RB_NO_WAKEUP},
        helpers::{
            bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
            bpf_probe_read_kernel,
            generated::{
                bpf_get_current_task, bpf_get_current_task_btf, bpf_get_ns_current_pid_tgid, bpf_get_stack, bpf_jiffies64, bpf_loop,
                bpf_probe_read_kernel as probe_read_kernel_raw, bpf_probe_read_user, bpf_task_pt_regs,
            },
        },
        macros::{kprobe, map, perf_event, raw_tracepoint, tracepoint},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
        programs::{PerfEventContext, ProbeContext, RawTracePointContext, TracePointContext},
        EbpfContext,
    };
    use profiler_common::{
        pending_slot, quota_epoch, reported_state, thread_quota_slot, BurstSlot, Config, StackSnapshot, Stat, SwitchOut, ThreadQuota,
        WaitEnd, StampedWait, EVENT_STAMPED_WAIT, PENDING_STAMP, STAMP_EPOCHS, STAMP_PROBES, BURST_SHIFT, BURST_SLOT_NS, QUOTA_BURST_FACTOR, EVENT_SAMPLE, EVENT_SWITCH_OUT, EVENT_WAIT_END, MAX_STACK_DEPTH,
        MAX_USER_STACK, PENDING_SLOTS, RAW_TASK_DEAD, STATE_PREEMPTED, THREAD_QUOTA_SLOTS, UNLEARNT_USER_STACK, thread_quota_tag,
        USER_STACK_CHUNK, USER_STACK_CLASSES, weight_q16, python_fingerprint, PythonFrame, PythonProcess, PythonStack, PythonStackOf, PYTHON_STACK_CLASSES,
        EVENT_PYTHON_STACK, MAX_PYTHON_FRAMES, MAX_PYTHON_THREADS, PYTHON_ENTRY, PYTHON_FINGERPRINT_BYTES, PYTHON_FRAME_BYTES,
        PythonLayout, PYTHON_NO_FIELD, PYTHON_READ_FAILED, PYTHON_STACK_WINDOW, PYTHON_TRUNCATED, PYTHON_TSTATE_BYTES,
        Label, LabelsProcess, LabelsRecord, EVENT_LABELS, LABELS_HEADER_BYTES, LABELS_CUT, LABELS_READ_FAILED, LABEL_KEY_BYTES, LABEL_VALUE_BYTES, MAX_LABELS,
        DTV_ENTRY_BYTES, DTV_OFFSET, DTV_UNALLOCATED, MAX_TLS_MODULE, KernelStackCache, KERNEL_STACK_CACHE_ENTRIES,
        reusable_wait, WaitPlace, ThreadContextRecord, EVENT_THREAD_CONTEXT, LABELS_FORMAT_OTEL, THREAD_CONTEXT_ATTR_BYTES,
        THREAD_CONTEXT_HEADER_BYTES, THREAD_CONTEXT_RECORD_HEADER_BYTES,
    };

    // Sizes are defaults; the agent overrides them at load time.
    #[map]
    static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
    #[map]
    static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);
    /// Keyed by task address and shared by all CPUs, so a thread that wakes up on another
    /// CPU still finds its switch-out. Not an LRU: evicting the longest sleepers would
    /// bias the profile silently; a full map is counted instead. The agent empties it
    /// (and `PENDING`) when it detaches the program.
    #[map]
    static SWITCH_OUT: HashMap<u64, SwitchOut> = HashMap::with_max_entries(32768, 0);
    /// Places' last walked wait stacks (see [`KernelStackCache`]).
    #[map]
    static KERNEL_STACKS: LruHashMap<WaitPlace, KernelStackCache> = LruHashMap::with_max_entries(KERNEL_STACK_CACHE_ENTRIES, 0);
    /// One entry never written: the zeroes a thread's first `KERNEL_STACKS` entry starts
    /// from (a value of 1 KiB does not fit the program's stack).
    #[map]
    static KERNEL_STACK_BLANK: Array<KernelStackCache> = Array::with_max_entries(1, 0);
    /// Each CPU's count of switch-outs recorded in its current burst slot.
    #[map]
    static BURST: PerCpuArray<BurstSlot> = PerCpuArray::with_max_entries(1, 0);
    /// See [`PENDING_SLOTS`]: read on every switch-in, written only by recorded switches.
    #[map]
    static PENDING: Array<u64> = Array::with_max_entries(PENDING_SLOTS, 0);
    /// Each thread's switch-outs recorded at p = 1 in the current quota epoch, by hash of
    /// its task address (see [`Config::offcpu_thread_quota`]). An array, not a hash map:
    /// it is read on every switch-out of a traced thread, and an array lookup is a few
    /// instructions.
    #[map]
    static THREAD_QUOTA: Array<ThreadQuota> = Array::with_max_entries(THREAD_QUOTA_SLOTS, 0);
    /// Bytes of user stack each thread needs copied, learnt by the agent from complete
    /// unwinds: most threads use a few KiB, and the copy is most of a snapshot's cost.
    /// Threads not in it (new, or evicted) get [`UNLEARNT_USER_STACK`]; a copy found too
    /// short raises a thread to the most `Config::user_stack_bytes` allows.
    #[map]
    static STACK_BYTES: LruHashMap<u32, u32> = LruHashMap::with_max_entries(65536, 0);

    /// The process that forked each new task (child pid -> parent tgid), so the agent
    /// can name a short-lived command after its parent when it exited before the agent
    /// read its /proc entry.
    #[map]
    static PARENTS: LruHashMap<u32, u32> = LruHashMap::with_max_entries(32768, 0);

    /// Python processes the agent found, by tgid: where their frames are and how to read
    /// them (see `profiler_agent::python`).
    #[map]
    static PYTHON_PROCESSES: HashMap<u32, PythonProcess> = HashMap::with_max_entries(4096, 0);
    /// Processes that publish custom labels, by tgid (see `profiler_agent::labels`).
    #[map]
    static LABEL_PROCESSES: HashMap<u32, LabelsProcess> = HashMap::with_max_entries(4096, 0);
    /// Each CPU's labels record while it is filled.
    #[map]
    static LABELS: PerCpuArray<LabelsRecord> = PerCpuArray::with_max_entries(1, 0);
    /// Each CPU's thread-context record while it is filled.
    #[map]
    static THREAD_CONTEXT: PerCpuArray<ThreadContextRecord> = PerCpuArray::with_max_entries(1, 0);

    /// Each Python thread's `PyThreadState` address, found by walking its interpreter's
    /// thread list once and checked against the thread's id on every use, by hash of
    /// its id. An array, not an LRU hash map: its lookup is a few instructions, where
    /// the hash map's cost a tenth of the walk. Two threads of one slot take it from
    /// each other, and walk the list again.
    #[map]
    static PYTHON_THREADS: Array<PythonThread> = Array::with_max_entries(PYTHON_THREAD_SLOTS, 0);
    const PYTHON_THREAD_SLOTS: u32 = 16384;

    /// A `PYTHON_THREADS` slot: whose thread state it holds. The process too, so a thread
    /// id reused by another process never has an address of the first one read in it.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct PythonThread {
        tstate: u64,
        tgid: u32,
        tid: u32,
    }
    /// Each CPU's walk of a Python stack: the record being built, and room to read one
    /// frame and one code object's fingerprint into (fields sit at offsets known only at
    /// run time, which a map value can be indexed by).
    #[map]
    static PYTHON_WALK: PerCpuArray<PythonWalk> = PerCpuArray::with_max_entries(1, 0);

    #[repr(C)]
    struct PythonWalk {
        stack: PythonStack,
        layout: PythonLayout,
        /// The next frame to read; zero once the walk is over.
        frame: u64,
        depth: u32,
        fingerprint: u32,
        /// The code object `fingerprint` is of: recursion reads it once.
        last_code: u64,
        /// Where the thread's current chunk of frames starts, and its top.
        chunk_start: u64,
        chunk_top: u64,
        /// The part of the chunk `window` holds.
        window_start: u64,
        window_end: u64,
        window: [u8; PYTHON_STACK_WINDOW + HEADER_ROOM],
        tstate: [u8; TSTATE_ROOM],
        scratch: [u8; HEADER_ROOM],
        fingerprint_words: [u64; PYTHON_FINGERPRINT_BYTES / 8],
        /// When the walk started, for the fingerprints' age.
        now_ns: u64,
        /// Fingerprints read lately on this CPU, by hash of the code object's address:
        /// a stack of distinct functions would cost a read per frame otherwise.
        fingerprints: [CachedFingerprint; PYTHON_FINGERPRINT_SLOTS],
    }

    const PYTHON_FINGERPRINT_SLOTS: usize = 256;
    const PYTHON_FINGERPRINT_TTL_NS: u64 = 1_000_000_000;

    #[repr(C)]
    struct CachedFingerprint {
        code: u64,
        function: u64,
        read_ns: u64,
        fingerprint: u32,
        padding: u32,
    }

    const EFAULT: i64 = 14;
    /// Records are consumed by polling; a wake-up per record would cost more than the record.
    const NO_WAKEUP: u64 = BPF_RB_NO_WAKEUP as u64;

    // x86_64 `struct pt_regs` (arch/x86/include/asm/ptrace.h), in u64 words.
    const PT_REGS_WORDS: usize = 21;
    const REG_BP: usize = 4;
    /// The syscall number on syscall entry; negative for interrupts (and exceptions
    /// without an error code).
    const REG_ORIG_AX: usize = 15;
    const REG_IP: usize = 16;
    const REG_CS: usize = 17;
    const REG_SP: usize = 19;
    /// `__USER_CS`: the code segment of a 64-bit task in user mode.
    const USER_CS_64: u64 = 0x33;

    #[inline(always)]
    fn count(stat: Stat) {
        add(stat, 1);
    }

    #[inline(always)]
    fn add(stat: Stat, amount: u64) {
        if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
            unsafe { *slot += amount };
        }
    }

    /// BPF's atomic add (`lock xadd`): the BPF target offers no atomic read-modify-write
    /// types, and `PENDING` slots are shared by all CPUs. Adding `u64::MAX` subtracts one.
    #[inline(always)]
    fn atomic_add(target: *mut u64, amount: u64) {
        unsafe {
            core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) target, in(reg) amount, options(nostack));
        }
    }

    #[inline(always)]
    fn config() -> Option<&'static Config> {
        CONFIG.get(0)
    }

    /// The sampled probability's threshold, read once: the agent rewrites the config in
    /// place, and the draw and the weight must come from the same value.
    #[inline(always)]
    fn sample_threshold(cfg: &Config) -> u32 {
        unsafe { core::ptr::read_volatile(&cfg.offcpu_sample_threshold) }
    }

    /// Who a snapshot is of, and why it is taken.
    struct Subject {
        kind: u32,
        tid: u32,
        tgid: u32,
        state: u32,
        ts_ns: u64,
    }

    /// Sends the current task's stacks in a record of the smallest class that holds the
    /// user stack this thread needs. False when the ring buffer is full. `ctx` is the
    /// program's context, from which `bpf_get_stack` takes the kernel stack.
    ///
    /// A thread preempted by an interrupt while in user mode gets no kernel stack: it
    /// would hold only that interrupt's return path (`asm_sysvec_apic_timer_interrupt`
    /// ... `schedule`), the same for every such wait and already told by its reason,
    /// and walking it is most of a record's cost (1 to 2.5 µs of about 2.2). Preempted
    /// inside a syscall or a fault, the kernel stack says where, and is walked.
    #[inline(always)]
    fn emit_snapshot(ctx: *mut c_void, cfg: &Config, subject: &Subject) -> bool {
        if let Some(process) = unsafe { PYTHON_PROCESSES.get(&subject.tgid) } {
            let timed = cfg.python_timing != 0;
            let start = if timed { unsafe { bpf_ktime_get_ns() } } else { 0 };
            emit_python_stack(cfg, process, subject);
            if timed {
                add(Stat::PythonNs, unsafe { bpf_ktime_get_ns() }.saturating_sub(start));
            }
        }
        if let Some(process) = unsafe { LABEL_PROCESSES.get(&subject.tgid) } {
            if process.format == LABELS_FORMAT_OTEL {
                emit_thread_context(cfg, process, subject);
            } else {
                emit_labels(cfg, process, subject);
            }
        }
        let needed = unsafe { STACK_BYTES.get(&subject.tid) }.copied().unwrap_or(UNLEARNT_USER_STACK);
        let wanted = (cfg.user_stack_bytes.min(needed) as usize).min(MAX_USER_STACK);
        // On-CPU samples and preemptions are taken wherever the thread is: only a thread
        // that blocks repeats a place.
        let blocked = subject.kind == EVENT_SWITCH_OUT && subject.state & STATE_PREEMPTED == 0;
        let reuses = if blocked { cfg.kernel_stack_reuses } else { 0 };
        if wanted == 0 {
            emit::<0>(ctx, subject, reuses)
        } else if wanted <= USER_STACK_CLASSES[0] {
            emit::<{ USER_STACK_CLASSES[0] }>(ctx, subject, reuses)
        } else if wanted <= USER_STACK_CLASSES[1] {
            emit::<{ USER_STACK_CLASSES[1] }>(ctx, subject, reuses)
        } else if wanted <= USER_STACK_CLASSES[2] {
            emit::<{ USER_STACK_CLASSES[2] }>(ctx, subject, reuses)
        } else {
            emit::<{ USER_STACK_CLASSES[3] }>(ctx, subject, reuses)
        }
    }

    /// Copies exactly the class size `N`: a constant length the verifier can check against
    /// the record (a variable one, merged across classes by the compiler, it cannot).
    #[inline(always)]
    fn emit<const N: usize>(ctx: *mut c_void, subject: &Subject, reuses: u32) -> bool {
        let Some(mut entry) = EVENTS.reserve::<StackSnapshot<N>>(0) else { return false };
        let snapshot = unsafe { &mut *entry.as_mut_ptr() };
        let header = &mut snapshot.header;
        header.kind = subject.kind;
        header.tid = subject.tid;
        header.tgid = subject.tgid;
        header.state = subject.state;
        header.ts_ns = subject.ts_ns;
        header.comm = bpf_get_current_comm().unwrap_or([0; 16]);

        // The user registers the task entered the kernel with (syscall, interrupt or
        // fault), wherever in the kernel it is now.
        let regs: [u64; PT_REGS_WORDS] = unsafe {
            let task = bpf_get_current_task_btf();
            let pt_regs = bpf_task_pt_regs(task) as *const [u64; PT_REGS_WORDS];
            bpf_probe_read_kernel(pt_regs).unwrap_or([0; PT_REGS_WORDS])
        };
        let from_user = regs[REG_CS] & 3 == 3;
        let preempted_in_user_mode = subject.state & STATE_PREEMPTED != 0 && from_user && (regs[REG_ORIG_AX] as i64) < 0;
        header.kernel_len = 0;
        if preempted_in_user_mode {
            count(Stat::KernelStacksNotWalked);
        } else {
            let kernel_len = if reuses == 0 {
                walk_kernel_stack(ctx, header.kernel.as_mut_ptr())
            } else {
                wait_kernel_stack(ctx, subject, &regs, reuses, &mut header.kernel)
            };
            header.kernel_len = if kernel_len > 0 { kernel_len as u32 } else { 0 };
            if kernel_len < 0 && -kernel_len != EFAULT {
                count(Stat::KernelStackLost);
            }
        }
        header.user_len = 0;
        // Kernel threads have no user mode to return to.
        if !from_user {
            header.ip = 0;
            header.sp = 0;
            header.bp = 0;
        } else {
            header.ip = regs[REG_IP];
            header.sp = regs[REG_SP];
            header.bp = regs[REG_BP];
            header.user_len = copy_user_stack(&mut snapshot.user_stack, regs[REG_SP]);
            if header.user_len == 0 && N > 0 {
                count(Stat::UserStackLost);
            }
        }
        entry.submit(NO_WAKEUP);
        true
    }

    /// Walks the current task's kernel stack into `frames` (room for
    /// [`MAX_STACK_DEPTH`]); returns its bytes, or `bpf_get_stack`'s error.
    #[inline(always)]
    fn walk_kernel_stack(ctx: *mut c_void, frames: *mut u64) -> i64 {
        unsafe { bpf_get_stack(ctx, frames as *mut c_void, (MAX_STACK_DEPTH * 8) as u32, 0) }
    }

    /// The kernel stack of a recorded wait, into `frames`: the one last walked at the
    /// same place of the thread (see [`WaitPlace`]), fewer times since it was walked than
    /// the walks in a row from there found that stack (after the first), and than
    /// `reuses` (see [`KernelStackCache`]); otherwise walked now and kept for the next
    /// ones. Returns its bytes, or `bpf_get_stack`'s error.
    #[inline(always)]
    fn wait_kernel_stack(
        ctx: *mut c_void,
        subject: &Subject,
        regs: &[u64; PT_REGS_WORDS],
        reuses: u32,
        frames: &mut [u64; MAX_STACK_DEPTH],
    ) -> i64 {
        let syscall = regs[REG_ORIG_AX];
        // 64-bit user code segment: the numbers are x86-64's.
        if regs[REG_CS] != USER_CS_64 || !reusable_wait(syscall, subject.state) {
            return walk_kernel_stack(ctx, frames.as_mut_ptr());
        }
        let place = WaitPlace { tid: subject.tid, state: subject.state, syscall, ip: regs[REG_IP], sp: regs[REG_SP] };
        let Some(kept) = kernel_stack_entry(&place) else { return walk_kernel_stack(ctx, frames.as_mut_ptr()) };
        let same_place = kept.len > 0 && kept.tgid == subject.tgid;
        let whole = (MAX_STACK_DEPTH * 8) as u32;
        if same_place && kept.uses < reuses.min(kept.agreed) {
            let copied = unsafe {
                probe_read_kernel_raw(frames.as_mut_ptr() as *mut c_void, whole, kept.frames.as_ptr() as *const c_void)
            };
            if copied == 0 {
                kept.uses += 1;
                count(Stat::KernelStacksReused);
                return kept.len as i64;
            }
        }
        let len = walk_kernel_stack(ctx, kept.frames.as_mut_ptr());
        if len <= 0 {
            kept.len = 0;
            return len;
        }
        let hash = frames_hash(&kept.frames, len);
        kept.agreed = if same_place && hash == kept.hash {
            kept.agreed.saturating_add(1)
        } else {
            if same_place && kept.uses > 0 {
                count(Stat::KernelStacksChanged);
            }
            0
        };
        // Field by field: the frames are already in place, and a whole value would not
        // fit the program's stack.
        (kept.tgid, kept.uses, kept.len, kept.hash) = (subject.tgid, 0, len as u32, hash);
        let copied =
            unsafe { probe_read_kernel_raw(frames.as_mut_ptr() as *mut c_void, whole, kept.frames.as_ptr() as *const c_void) };
        if copied == 0 { len } else { walk_kernel_stack(ctx, frames.as_mut_ptr()) }
    }

    /// The place's `KERNEL_STACKS` entry, made (empty) if it has none.
    #[inline(always)]
    fn kernel_stack_entry(place: &WaitPlace) -> Option<&'static mut KernelStackCache> {
        if let Some(kept) = KERNEL_STACKS.get_ptr_mut(place) {
            return Some(unsafe { &mut *kept });
        }
        let blank = KERNEL_STACK_BLANK.get(0)?;
        KERNEL_STACKS.insert(place, blank, 0).ok()?;
        KERNEL_STACKS.get_ptr_mut(place).map(|kept| unsafe { &mut *kept })
    }

    /// FNV-1a over the first `len` bytes of `frames`, a word at a time.
    #[inline(always)]
    fn frames_hash(frames: &[u64; MAX_STACK_DEPTH], len: i64) -> u64 {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for (i, frame) in frames.iter().enumerate() {
            if (i * 8) as i64 >= len {
                break;
            }
            hash = (hash ^ frame).wrapping_mul(0x100_0000_01b3);
        }
        hash
    }

    /// Sends the custom labels of the current thread (ABI v1 of `custom-labels`), in a
    /// record of their own just before its snapshot: its label set is found from the
    /// thread pointer, at the offset the agent computed for the process. A thread with no
    /// set, or an empty one, sends nothing. Keys and values are cut to their room, labels
    /// past [`MAX_LABELS`] dropped, both marked and counted.
    #[inline(always)]
    fn emit_labels(cfg: &Config, process: &LabelsProcess, subject: &Subject) {
        let Some(fsbase) = thread_pointer(cfg) else { return };
        let Some(record) = LABELS.get_ptr_mut(0) else { return };
        let record = unsafe { &mut *record };
        let Some(variable) = labels_variable(fsbase, process) else { return };
        let Some(set) = read_user(variable) else { return };
        if set == 0 {
            return;
        }
        // custom_labels_labelset_t: storage, count, capacity.
        let mut header = [0u64; 2];
        if unsafe { bpf_probe_read_user(header.as_mut_ptr() as *mut c_void, 16, set as *const c_void) } != 0 {
            return;
        }
        let [storage, entries] = header;
        record.kind = EVENT_LABELS;
        record.tid = subject.tid;
        record.ts_ns = subject.ts_ns;
        record.count = 0;
        record.flags = if entries > MAX_LABELS as u64 { LABELS_CUT } else { 0 };
        for i in 0..MAX_LABELS {
            if i as u64 >= entries {
                break;
            }
            // custom_labels_label_t: key {len, buf}, value {len, buf}.
            let mut raw = [0u64; 4];
            let at = storage.wrapping_add(i as u64 * 32);
            if unsafe { bpf_probe_read_user(raw.as_mut_ptr() as *mut c_void, 32, at as *const c_void) } != 0 {
                record.flags |= LABELS_READ_FAILED;
                continue;
            }
            let [key_len, key_buf, value_len, value_buf] = raw;
            // An absent key marks an unused slot.
            if key_buf == 0 || value_buf == 0 {
                continue;
            }
            let slot = record.count as usize;
            if slot >= MAX_LABELS {
                break;
            }
            let label = &mut record.labels[slot];
            let key_n = opaque(key_len.min(LABEL_KEY_BYTES as u64) as usize) & (LABEL_KEY_BYTES * 2 - 1);
            let value_n = opaque(value_len.min(LABEL_VALUE_BYTES as u64) as usize) & (LABEL_VALUE_BYTES * 2 - 1);
            if key_n > LABEL_KEY_BYTES || value_n > LABEL_VALUE_BYTES {
                continue;
            }
            if key_len as usize > key_n || value_len as usize > value_n {
                record.flags |= LABELS_CUT;
            }
            let read_key = unsafe { bpf_probe_read_user(label.key.as_mut_ptr() as *mut c_void, key_n as u32, key_buf as *const c_void) };
            let read_value =
                unsafe { bpf_probe_read_user(label.value.as_mut_ptr() as *mut c_void, value_n as u32, value_buf as *const c_void) };
            if read_key != 0 || read_value != 0 {
                record.flags |= LABELS_READ_FAILED;
                continue;
            }
            label.key_len = key_n as u16;
            label.value_len = value_n as u16;
            record.count += 1;
        }
        if record.count == 0 {
            return;
        }
        count(Stat::Labelled);
        if record.flags != 0 {
            count(Stat::LabelsCut);
        }
        // Only the labels used: the copy into the ring costs by the byte.
        let used = (record.count as usize).min(MAX_LABELS);
        let len = LABELS_HEADER_BYTES + used * size_of::<Label>();
        let bytes = unsafe { core::slice::from_raw_parts(record as *const LabelsRecord as *const u8, len) };
        let _ = EVENTS.output::<[u8]>(bytes, NO_WAKEUP);
    }

    /// Sends the OpenTelemetry thread context of the current thread (OTEP 4947), in a
    /// record of its own just before its snapshot: `otel_thread_ctx_v1` points to the
    /// thread's record, whose fixed part (trace and span ids, valid, flags, attributes'
    /// size) and first [`THREAD_CONTEXT_ATTR_BYTES`] of attributes are copied as they
    /// are; the agent decodes them. No record, or one not marked valid (being written),
    /// sends nothing.
    #[inline(always)]
    fn emit_thread_context(cfg: &Config, process: &LabelsProcess, subject: &Subject) {
        let Some(fsbase) = thread_pointer(cfg) else { return };
        let Some(variable) = labels_variable(fsbase, process) else { return };
        let Some(at) = read_user(variable) else { return };
        if at == 0 {
            return;
        }
        let Some(record) = THREAD_CONTEXT.get_ptr_mut(0) else { return };
        let record = unsafe { &mut *record };
        let header = record.header.as_mut_ptr() as *mut c_void;
        if unsafe { bpf_probe_read_user(header, THREAD_CONTEXT_HEADER_BYTES as u32, at as *const c_void) } != 0 {
            return;
        }
        // valid: 1, anything else is being written or reserved.
        if record.header[24] != 1 {
            return;
        }
        let size = u16::from_ne_bytes([record.header[26], record.header[27]]) as usize;
        let n = opaque(size.min(THREAD_CONTEXT_ATTR_BYTES)) & (THREAD_CONTEXT_ATTR_BYTES * 2 - 1);
        if n > THREAD_CONTEXT_ATTR_BYTES {
            return;
        }
        record.attrs_len = 0;
        if n > 0 {
            let attrs = record.attrs.as_mut_ptr() as *mut c_void;
            let from = at.wrapping_add(THREAD_CONTEXT_HEADER_BYTES as u64) as *const c_void;
            if unsafe { bpf_probe_read_user(attrs, n as u32, from) } == 0 {
                record.attrs_len = n as u32;
            }
        }
        record.kind = EVENT_THREAD_CONTEXT;
        record.tid = subject.tid;
        record.tgid = subject.tgid;
        record.ts_ns = subject.ts_ns;
        count(Stat::Labelled);
        // Only the attributes read: the copy into the ring costs by the byte.
        let len = opaque(THREAD_CONTEXT_RECORD_HEADER_BYTES + record.attrs_len as usize) & 1023;
        if len > size_of::<ThreadContextRecord>() {
            return;
        }
        let bytes = unsafe { core::slice::from_raw_parts(record as *const ThreadContextRecord as *const u8, len) };
        let _ = EVENTS.output::<[u8]>(bytes, NO_WAKEUP);
    }

    /// Where the thread's `custom_labels_current_set` lies: at a fixed offset from the
    /// thread pointer (static TLS), or in the block of a `dlopen`ed library's module,
    /// which glibc allocates on the thread's first use of it and lists in its dynamic
    /// thread vector. None when the thread has no block for that module yet: it never
    /// touched the library's thread-locals, so has set no labels through it.
    #[inline(always)]
    fn labels_variable(fsbase: u64, process: &LabelsProcess) -> Option<u64> {
        let module = process.tls_module;
        if module == 0 {
            return Some(fsbase.wrapping_add(process.tls_offset));
        }
        let dtv = read_user(fsbase.wrapping_add(DTV_OFFSET))?;
        // A vector not grown since the library was loaded has no entry for it.
        let room = read_user(dtv.wrapping_sub(DTV_ENTRY_BYTES))?;
        if module > room || module > MAX_TLS_MODULE {
            return None;
        }
        let block = read_user(dtv.wrapping_add(module * DTV_ENTRY_BYTES))?;
        (block != 0 && block != DTV_UNALLOCATED).then(|| block.wrapping_add(process.tls_offset))
    }

    /// Sends the Python frames of the current thread of a Python process, leaf first, in a
    /// record of their own just before its snapshot: the frames live in the heap, not on
    /// the stack the snapshot copies, so they are read now. A thread not running Python
    /// code sends nothing.
    #[inline(always)]
    fn emit_python_stack(cfg: &Config, process: &PythonProcess, subject: &Subject) {
        let Some(walk) = PYTHON_WALK.get_ptr_mut(0) else { return };
        let walk = unsafe { &mut *walk };
        let layout = process.layout;
        if !python_thread(cfg, process, subject.tgid, subject.tid, walk) {
            count(Stat::PythonThreadUnknown);
            return;
        }
        let tstate = walk.tstate.as_ptr();
        let Some(mut frame) = tstate_word(tstate, layout.tstate_frame) else { return };
        if layout.cframe_current_frame != PYTHON_NO_FIELD && frame != 0 {
            let Some(current) = read_user(frame + layout.cframe_current_frame as u64) else { return };
            frame = current;
        }
        if frame == 0 {
            return;
        }
        let chunk = tstate_word(tstate, layout.tstate_datastack_chunk).unwrap_or(0);
        walk.chunk_start = if chunk == 0 { 0 } else { chunk + layout.chunk_data as u64 };
        walk.chunk_top = tstate_word(tstate, layout.tstate_datastack_chunk.saturating_add(8)).unwrap_or(0);
        walk.window_start = 0;
        walk.window_end = 0;
        walk.frame = frame;
        walk.depth = 0;
        walk.last_code = 0;
        walk.fingerprint = 0;
        walk.layout = layout;
        walk.now_ns = subject.ts_ns;
        walk.stack.kind = EVENT_PYTHON_STACK;
        walk.stack.tid = subject.tid;
        walk.stack.ts_ns = subject.ts_ns;
        walk.stack.flags = 0;
        // One frame per call of a callback the verifier checks once, where a loop of
        // 128 steps is checked step by step, past its instruction limit. The callback
        // gets the walk through its context rather than a lookup per frame.
        let mut context: *mut PythonWalk = walk;
        unsafe {
            bpf_loop(
                (MAX_PYTHON_FRAMES + 8) as u32 / 2,
                walk_python_frames as *mut c_void,
                &mut context as *mut *mut PythonWalk as *mut c_void,
                0,
            );
        }
        let walk = unsafe { &mut *context };
        if walk.frame != 0 {
            walk.stack.flags |= PYTHON_TRUNCATED;
            count(Stat::PythonTruncated);
        }
        if walk.stack.flags & PYTHON_READ_FAILED != 0 {
            count(Stat::PythonReadFailed);
        }
        walk.stack.depth = walk.depth;
        // The smallest record class that holds the frames: a constant length per class
        // (a length known only at run time cost more than the bytes it saves here).
        let sent = if walk.depth as usize <= PYTHON_STACK_CLASSES[0] {
            send_python_stack::<{ PYTHON_STACK_CLASSES[0] }>(&walk.stack)
        } else if walk.depth as usize <= PYTHON_STACK_CLASSES[1] {
            send_python_stack::<{ PYTHON_STACK_CLASSES[1] }>(&walk.stack)
        } else {
            send_python_stack::<{ PYTHON_STACK_CLASSES[2] }>(&walk.stack)
        };
        if !sent {
            count(Stat::SampleRingFull);
            return;
        }
        count(Stat::PythonStacks);
    }

    /// Sends the first `N` frames of the record (`N` of [`PYTHON_STACK_CLASSES`]).
    #[inline(always)]
    fn send_python_stack<const N: usize>(stack: &PythonStack) -> bool {
        // SAFETY: both are repr(C) with the same fields up to `frames`, and N is at most
        // MAX_PYTHON_FRAMES: the smaller record is a prefix of the larger.
        let prefix = unsafe { &*(stack as *const PythonStack as *const PythonStackOf<N>) };
        EVENTS.output::<PythonStackOf<N>>(prefix, NO_WAKEUP).is_ok()
    }

    /// One step of the walk in `PYTHON_WALK`, reached through the context: reads the frame
    /// at `walk.frame`, appends it (or marks the entry frame, for a shim) and moves to its
    /// caller. Returns 1 to stop.
    ///
    /// Frames of the thread's frame stack are taken from a copy of up to
    /// [`PYTHON_STACK_WINDOW`] bytes ending at the frame, which then holds its callers
    /// too; frames elsewhere (generators, an older chunk) are read one by one.
    extern "C" fn walk_python_frames(_index: u32, context: *mut c_void) -> i64 {
        let walk = unsafe { &mut **(context as *mut *mut PythonWalk) };
        // Two frames a call: a call costs about what a frame read from the copy does.
        if python_frame(walk) != 0 {
            return 1;
        }
        python_frame(walk)
    }

    #[inline(always)]
    fn python_frame(walk: &mut PythonWalk) -> i64 {
        let frame = walk.frame;
        let depth = walk.depth as usize;
        if frame == 0 || depth >= MAX_PYTHON_FRAMES {
            return 1;
        }
        let end = frame + PYTHON_FRAME_BYTES as u64;
        if !(walk.window_start <= frame && end <= walk.window_end) {
            if walk.chunk_start != 0 && walk.chunk_start <= frame && end <= walk.chunk_top {
                // From the frame down to the chunk's first frame, or as much as the window
                // holds: copying costs by the byte (about 0.1 ns here), so no more.
                let start = walk.chunk_start.max(end.saturating_sub(PYTHON_STACK_WINDOW as u64));
                // At most the window, in a form the verifier bounds whatever the compiler
                // keeps on the stack (start is at most a window below end).
                let len = (opaque((end - start).wrapping_sub(1) as usize) as u32 & (PYTHON_STACK_WINDOW as u32 - 1)) + 1;
                let window = walk.window.as_mut_ptr() as *mut c_void;
                if unsafe { bpf_probe_read_user(window, len, start as *const c_void) } == 0 {
                    walk.window_start = start;
                    walk.window_end = start + len as u64;
                } else {
                    walk.window_end = 0;
                }
            }
        }
        let offset = frame.wrapping_sub(walk.window_start);
        let header: *const u8 = if walk.window_start <= frame && end <= walk.window_end && offset <= (PYTHON_STACK_WINDOW - PYTHON_FRAME_BYTES) as u64 {
            unsafe { walk.window.as_ptr().add(opaque(offset as usize) & (PYTHON_STACK_WINDOW - 1)) }
        } else {
            let scratch = walk.scratch.as_mut_ptr();
            if unsafe { bpf_probe_read_user(scratch as *mut c_void, PYTHON_FRAME_BYTES as u32, frame as *const c_void) } != 0 {
                walk.stack.flags |= PYTHON_READ_FAILED;
                walk.frame = 0;
                return 1;
            }
            scratch
        };
        let layout = &walk.layout;
        let (Some(code), Some(previous), Some(instr)) = (
            header_word(header, layout.frame_code),
            header_word(header, layout.frame_previous),
            header_word(header, layout.frame_instr),
        ) else {
            walk.frame = 0;
            return 1;
        };
        let shim = layout.frame_owner != PYTHON_NO_FIELD && header_byte(header, layout.frame_owner).is_some_and(|owner| owner >= layout.owner_shim as u8);
        let legacy = layout.legacy_frames != 0;
        let is_entry = legacy || header_byte(header, layout.frame_is_entry).is_some_and(|b| b != 0);
        walk.frame = previous;
        // A shim frame of the C stack (3.12, 3.13) or the interpreter's entry frame
        // (3.14): the frame before it was the one its native call of the eval loop was
        // made for.
        if shim {
            if let Some(entry_frame) = depth.checked_sub(1).and_then(|i| walk.stack.frames.get_mut(opaque(i) & (MAX_PYTHON_FRAMES - 1))) {
                entry_frame.tag |= PYTHON_ENTRY;
            }
            return 0;
        }
        // 3.14 tags the low bits of `f_executable`; code objects are 16-byte aligned.
        let code = code & !15;
        // Stored before the fingerprint's read, so few values live across it: the
        // callback's stack counts with its caller's against 512 bytes on older kernels.
        let index = opaque(depth) & (MAX_PYTHON_FRAMES - 1);
        if let Some(slot) = walk.stack.frames.get_mut(index) {
            let instr_offset = if legacy { instr as u32 } else { instr.wrapping_sub(code).min(u32::MAX as u64) as u32 };
            *slot = PythonFrame { code, instr_offset, tag: if is_entry { PYTHON_ENTRY } else { 0 } };
        }
        walk.depth = depth as u32 + 1;
        if code != walk.last_code {
            let function = header_word(header, walk.layout.frame_function).unwrap_or(0);
            let Some(fingerprint) = code_fingerprint(walk, code, function) else {
                walk.stack.flags |= PYTHON_READ_FAILED;
                walk.frame = 0;
                walk.depth = depth as u32;
                return 1;
            };
            walk.fingerprint = fingerprint;
            walk.last_code = code;
        }
        if let Some(slot) = walk.stack.frames.get_mut(opaque(depth) & (MAX_PYTHON_FRAMES - 1)) {
            slot.tag |= walk.fingerprint;
        }
        0
    }

    /// The fingerprint of the code object at `code`, run by `function`: read from the
    /// code object, or this CPU's cache of those read in the last
    /// [`PYTHON_FINGERPRINT_TTL_NS`] for the same code object and function. A code object
    /// freed and its address reused within that time would also need its function's
    /// address reused to be taken for the old one; past it, every one is read again.
    #[inline(always)]
    fn code_fingerprint(walk: &mut PythonWalk, code: u64, function: u64) -> Option<u32> {
        let slot = ((code >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as usize & (PYTHON_FINGERPRINT_SLOTS - 1);
        let now = walk.now_ns;
        let cached = walk.fingerprints.get_mut(slot)?;
        if cached.code == code && cached.function == function && now.wrapping_sub(cached.read_ns) < PYTHON_FINGERPRINT_TTL_NS {
            return Some(cached.fingerprint);
        }
        let words = walk.fingerprint_words.as_mut_ptr();
        let read = unsafe {
            bpf_probe_read_user(words as *mut c_void, PYTHON_FINGERPRINT_BYTES as u32, (code + walk.layout.code_fingerprint as u64) as *const c_void)
        };
        if read != 0 {
            return None;
        }
        let fingerprint = python_fingerprint(walk.fingerprint_words);
        let cached = walk.fingerprints.get_mut(slot)?;
        cached.code = code;
        cached.function = function;
        cached.read_ns = now;
        cached.fingerprint = fingerprint;
        Some(fingerprint)
    }

    /// Reads the `PyThreadState` of thread `tid` into `walk.tstate`: the cached one,
    /// checked against the thread's id, or the one found in the main interpreter's thread
    /// list. False when the thread has none (a native thread) or it was not found.
    #[inline(always)]
    fn python_thread(cfg: &Config, process: &PythonProcess, tgid: u32, tid: u32, walk: &mut PythonWalk) -> bool {
        let layout = &process.layout;
        // Thread states hold the thread's id in the process's own pid namespace, or
        // before 3.11 its thread pointer.
        let ns_tid = if layout.legacy_frames != 0 {
            let Some(fsbase) = thread_pointer(cfg) else { return false };
            fsbase
        } else if process.pid_ns_ino == 0 {
            tid as u64
        } else {
            let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
            let size = core::mem::size_of::<bpf_pidns_info>() as u32;
            if unsafe { bpf_get_ns_current_pid_tgid(process.pid_ns_dev, process.pid_ns_ino, &mut ns, size) } != 0 {
                return false;
            }
            ns.pid as u64
        };
        let tstate = walk.tstate.as_mut_ptr();
        // What the version's struct holds, bounded for the verifier (1 to 512 bytes).
        let tstate_bytes = (opaque((layout.tstate_bytes as usize).wrapping_sub(1)) as u32 & (PYTHON_TSTATE_BYTES as u32 - 1)) + 1;
        let read_tstate = |addr: u64| unsafe { bpf_probe_read_user(tstate as *mut c_void, tstate_bytes, addr as *const c_void) } == 0;
        let slot = (tid.wrapping_mul(0x9E37_79B9) >> (32 - PYTHON_THREAD_SLOTS.trailing_zeros())) & (PYTHON_THREAD_SLOTS - 1);
        if let Some(&cached) = PYTHON_THREADS.get(slot) {
            if cached.tid == tid
                && cached.tgid == tgid
                && read_tstate(cached.tstate)
                && tstate_word(tstate, layout.tstate_native_thread_id) == Some(ns_tid)
            {
                return true;
            }
        }
        let Some(interp) = read_user(process.interpreters_head) else { return false };
        let Some(mut candidate) = read_user(interp + layout.interp_threads_head as u64) else { return false };
        for _ in 0..MAX_PYTHON_THREADS {
            if candidate == 0 {
                return false;
            }
            if read_user(candidate + layout.tstate_native_thread_id as u64) == Some(ns_tid) {
                if let Some(cached) = PYTHON_THREADS.get_ptr_mut(slot) {
                    unsafe { *cached = PythonThread { tstate: candidate, tgid, tid } };
                }
                return read_tstate(candidate);
            }
            let Some(next) = read_user(candidate + layout.tstate_next as u64) else { return false };
            candidate = next;
        }
        false
    }

    /// The current thread's thread pointer (`task_struct.thread.fsbase`, set when the
    /// thread was created), None when the kernel's offset is unknown or it has none.
    #[inline(always)]
    fn thread_pointer(cfg: &Config) -> Option<u64> {
        if cfg.fsbase_offset == 0 {
            return None;
        }
        let task = unsafe { bpf_get_current_task() };
        let fsbase = unsafe { bpf_probe_read_kernel((task + cfg.fsbase_offset as u64) as *const u64) }.ok()?;
        (fsbase != 0).then_some(fsbase)
    }

    #[inline(always)]
    fn read_user(addr: u64) -> Option<u64> {
        let mut value = 0u64;
        let read = unsafe { bpf_probe_read_user(&mut value as *mut u64 as *mut c_void, 8, addr as *const c_void) };
        (read == 0).then_some(value)
    }

    // Offsets into the walk's buffers are checked against what was read, then masked to a
    // power of two the buffers have room past: the verifier of older kernels (6.1) does
    // not carry a comparison's bound to a copy the compiler keeps on the stack, and would
    // see an unbounded offset. The mask goes through `opaque`, or the compiler, knowing
    // the comparison, drops it.

    /// `value`, unknown to the compiler from here on.
    #[inline(always)]
    fn opaque(mut value: usize) -> usize {
        unsafe { core::arch::asm!("{0} = {0}", inout(reg) value, options(nomem, nostack, preserves_flags)) };
        value
    }

    /// Room past the start of a frame's header in the buffers it is read from.
    const HEADER_ROOM: usize = 128 + 8;
    /// The thread-state buffer: up to [`PYTHON_TSTATE_BYTES`] read, masked offsets below it.
    const TSTATE_ROOM: usize = PYTHON_TSTATE_BYTES + 8;

    /// The word at `offset` of the thread state read into `walk.tstate`.
    #[inline(always)]
    fn tstate_word(tstate: *const u8, offset: u16) -> Option<u64> {
        if offset as usize > PYTHON_TSTATE_BYTES - 8 {
            return None;
        }
        Some(unsafe { (tstate.add(opaque(offset as usize) & (PYTHON_TSTATE_BYTES - 1)) as *const u64).read_unaligned() })
    }

    /// The word at `offset` of a frame's header; None past the bytes read of it.
    #[inline(always)]
    fn header_word(header: *const u8, offset: u16) -> Option<u64> {
        if offset as usize > PYTHON_FRAME_BYTES - 8 {
            return None;
        }
        Some(unsafe { (header.add(opaque(offset as usize) & 127) as *const u64).read_unaligned() })
    }

    /// The byte at `offset` of a frame's header; None for [`PYTHON_NO_FIELD`].
    #[inline(always)]
    fn header_byte(header: *const u8, offset: u16) -> Option<u8> {
        if offset as usize >= PYTHON_FRAME_BYTES {
            return None;
        }
        Some(unsafe { *header.add(opaque(offset as usize) & 127) })
    }

    /// Copies `N` bytes from the user stack pointer up. When the range runs past the end
    /// of the stack mapping, copies chunk by chunk as far as it is readable.
    #[inline(always)]
    fn copy_user_stack<const N: usize>(dst: &mut [u8; N], sp: u64) -> u32 {
        if N == 0 {
            return 0;
        }
        let dst = dst.as_mut_ptr();
        if unsafe { bpf_probe_read_user(dst as *mut c_void, N as u32, sp as *const c_void) } == 0 {
            return N as u32;
        }
        let mut copied = 0usize;
        for chunk in 0..N / USER_STACK_CHUNK {
            let offset = chunk * USER_STACK_CHUNK;
            let ok = unsafe {
                bpf_probe_read_user(
                    dst.add(offset) as *mut c_void,
                    USER_STACK_CHUNK as u32,
                    (sp as usize + offset) as *const c_void,
                )
            } == 0;
            if !ok {
                break;
            }
            copied = offset + USER_STACK_CHUNK;
        }
        copied as u32
    }

    /// Tracepoint `sched/sched_process_fork`: `current` is the parent.
    #[tracepoint]
    pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
        let Some(cfg) = config() else { return 0 };
        if cfg.fork_child_pid_offset == 0 {
            return 0;
        }
        let Ok(child) = (unsafe { ctx.read_at::<u32>(cfg.fork_child_pid_offset as usize) }) else { return 0 };
        let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
        let _ = PARENTS.insert(&child, &parent, 0);
        0
    }

    #[perf_event]
    pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tgid = (pid_tgid >> 32) as u32;
        let tid = pid_tgid as u32;
        // The idle task is not CPU use.
        if tid == 0 {
            return 0;
        }
        let Some(cfg) = config() else { return 0 };
        if cfg.filter_tgid != 0 && cfg.filter_tgid != tgid {
            return 0;
        }
        count(Stat::Samples);
        let subject = Subject { kind: EVENT_SAMPLE, tid, tgid, state: 0, ts_ns: unsafe { bpf_ktime_get_ns() } };
        if !emit_snapshot(ctx.as_ptr(), cfg, &subject) {
            count(Stat::SampleRingFull);
        }
        0
    }

    /// Raw tracepoint `sched_switch(bool preempt, struct task_struct *prev, struct
    /// task_struct *next, unsigned int prev_state)` (Linux 5.18+). Unlike the classic
    /// tracepoint, nothing is formatted before the program runs, and most switches return
    /// after reading the arguments, one random number and two array slots.
    #[raw_tracepoint(tracepoint = "sched_switch")]
    pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
        off_cpu::<false>(ctx)
    }

    /// The same with stamps (see [`Config::offcpu_stamp_limit`]): a build of its own,
    /// which the agent loads where the kernel verifies it fast enough. Debian's 6.1
    /// under the kernel matrix's emulation took over 50 s to load it, against seconds
    /// for the build without.
    #[raw_tracepoint(tracepoint = "sched_switch")]
    pub fn sched_switch_stamps(ctx: RawTracePointContext) -> i32 {
        off_cpu::<true>(ctx)
    }

    #[inline(always)]
    fn off_cpu<const STAMPS: bool>(ctx: RawTracePointContext) -> i32 {
        let Some(cfg) = config() else { return 0 };
        let prev: u64 = ctx.arg(1);
        if cfg.offcpu_switch_in != 0 {
            note_switch_out(&ctx, cfg, prev);
            return 0;
        }
        let next: u64 = ctx.arg(2);
        switch_out::<STAMPS>(&ctx, cfg, prev);
        switch_in::<STAMPS>(cfg, next);
        0
    }

    /// The switch-in path's program, on the scheduler's `finish_task_switch` (whatever
    /// clone name the compiler gave it, resolved by the agent): `current` is the task
    /// coming back, its user stack readable and its kernel stack still the wait's.
    #[kprobe]
    pub fn finish_task_switch(ctx: ProbeContext) -> u32 {
        let Some(cfg) = config() else { return 0 };
        if cfg.offcpu_switch_in != 0 {
            let task = unsafe { bpf_get_current_task() };
            switch_in_with_stacks(ctx.as_ptr(), cfg, task);
        }
        0
    }

    /// Switch-in path: notes when the current task (`prev`) switched out and why, for
    /// every switch-out of a traced task. No stack, no sampling: whether the wait is
    /// worth its stacks is decided when it ends.
    #[inline(always)]
    fn note_switch_out(ctx: &RawTracePointContext, cfg: &Config, task: u64) {
        let Some(pending) = forget_missed_switch_in(task) else { return };
        let Some((tid, _, raw_state)) = traced_switch_out(ctx, cfg) else { return };
        let preempted: u64 = ctx.arg(0);
        let out = SwitchOut {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            weight_q16: 0,
            tid,
            state: reported_state(raw_state, preempted & 0xff != 0),
            stamped: 0,
            _pad: 0,
        };
        if SWITCH_OUT.insert(&task, &out, 0).is_err() {
            count(Stat::SwitchOutMapFull);
            return;
        }
        atomic_add(pending, 1);
    }

    /// Switch-in path: a task back from a wait of at least `offcpu_min_ns` is recorded
    /// now, with the probability rate control sets (1 while the long waits fit the
    /// budget): its stacks, then the wait's end, the same two records the switch-out
    /// path sends, so the agent reads both paths alike.
    #[inline(always)]
    fn switch_in_with_stacks(ctx: *mut c_void, cfg: &Config, task: u64) {
        let Some(pending) = PENDING.get_ptr_mut(pending_slot(task)) else { return };
        if unsafe { core::ptr::read_volatile(pending) } == 0 {
            return;
        }
        let Some(out) = (unsafe { SWITCH_OUT.get(&task) }) else { return };
        let out = *out;
        if SWITCH_OUT.remove(&task).is_err() {
            return;
        }
        atomic_add(pending, u64::MAX);
        let now = unsafe { bpf_ktime_get_ns() };
        let elapsed = now.saturating_sub(out.ts_ns);
        if elapsed < cfg.offcpu_min_ns {
            count(Stat::OffCpuBelowMin);
            return;
        }
        count(Stat::LongWaitsEnded);
        let draw = unsafe { bpf_get_prandom_u32() };
        let threshold = sample_threshold(cfg);
        if draw > threshold {
            return;
        }
        let Some(weight_q16) = burst_weight(cfg, threshold, draw, now) else { return };
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let subject = Subject { kind: EVENT_SWITCH_OUT, tid: out.tid, tgid, state: out.state, ts_ns: out.ts_ns };
        if !emit_snapshot(ctx, cfg, &subject) {
            count(Stat::OffCpuRingFull);
            return;
        }
        let end = WaitEnd { kind: EVENT_WAIT_END, tid: out.tid, out_ts_ns: out.ts_ns, elapsed_ns: elapsed, weight_q16, stamped: 0, _pad: 0 };
        if EVENTS.output::<WaitEnd>(&end, NO_WAKEUP).is_err() {
            count(Stat::OffCpuRingFull);
            return;
        }
        count(Stat::SwitchOutsRecorded);
        add(Stat::SwitchOutRecordNs, unsafe { bpf_ktime_get_ns() }.saturating_sub(now));
    }

    /// Records the switch-out of the current task (`prev`): at p = 1 while the thread is
    /// within its quota (see [`Config::offcpu_thread_quota`]), otherwise with the sampled
    /// probability p; its stacks now, the length of the wait at its switch-in. A thread
    /// over its quota whose switch-outs are stamped (see [`Config::offcpu_stamp_limit`])
    /// has this one stamped when it is not recorded, and weighted 1 when it is: either
    /// way, a long wait of it counts once, whole. The agent counts switches from
    /// /proc/stat, so an unrecorded one costs no counter here.
    #[inline(always)]
    fn switch_out<const STAMPS: bool>(ctx: &RawTracePointContext, cfg: &Config, task: u64) {
        let Some(pending) = forget_missed_switch_in(task) else { return };
        let draw = unsafe { bpf_get_prandom_u32() };
        let threshold = sample_threshold(cfg);
        let sampled = draw <= threshold;
        if !sampled && cfg.offcpu_thread_quota == 0 && (!STAMPS || cfg.offcpu_stamp_limit == 0) {
            return;
        }
        let quota = thread_quota::<STAMPS>(ctx, cfg, threshold, task, pending);
        // Most switch-outs of a busy host end here: a frequent switcher not drawn. The
        // clock is read only past this point (it costs this VM 60 to 80 ns a read), and
        // whose switch-out this is too (a helper call): a task that is not traced (idle,
        // dying, of another process than `filter_tgid`) only counts in its quota slot,
        // which costs less than telling it apart first.
        if quota.own == 0 && !sampled && quota.stamp.is_null() {
            return;
        }
        let Some((tid, tgid, raw_state)) = traced_switch_out(ctx, cfg) else { return };
        let now = unsafe { bpf_ktime_get_ns() };
        let preempted: u64 = ctx.arg(0);
        let state = reported_state(raw_state, preempted & 0xff != 0);
        let unrecorded = |quota: &Quota| {
            if STAMPS && !quota.stamp.is_null() {
                stamp(unsafe { &mut *quota.stamp }, pending, tid, tgid, state, now);
            }
        };
        // The thread's own probability when it is higher than the sampled one and this
        // CPU has room for it; both are known before the draw decides.
        let by_quota = if quota.own > threshold && burst_room(cfg, now) {
            if draw > quota.own {
                return unrecorded(&quota);
            }
            Some(quota.own_weight_q16)
        } else {
            None
        };
        let weight_q16 = match by_quota {
            Some(weight_q16) => {
                count_burst_quota(now);
                count(Stat::SwitchOutsByQuota);
                weight_q16
            }
            None if sampled => {
                let Some(weight_q16) = burst_weight(cfg, threshold, draw, now) else { return unrecorded(&quota) };
                weight_q16
            }
            None => return unrecorded(&quota),
        };
        let stamped = STAMPS && !quota.stamp.is_null();
        let weight_q16 = if stamped { 1 << 16 } else { weight_q16 };
        let out = SwitchOut { ts_ns: now, weight_q16, tid, state, stamped: stamped as u32, _pad: 0 };
        // A stamped thread's wait that cannot be recorded is stamped instead: it still
        // counts, without its stacks.
        if SWITCH_OUT.insert(&task, &out, 0).is_err() {
            count(Stat::SwitchOutMapFull);
            return unrecorded(&quota);
        }
        let subject = Subject { kind: EVENT_SWITCH_OUT, tid, tgid, state, ts_ns: now };
        if !emit_snapshot(ctx.as_ptr(), cfg, &subject) {
            // Without its snapshot the wait cannot be attributed: forget it.
            let _ = SWITCH_OUT.remove(&task);
            count(Stat::OffCpuRingFull);
            return unrecorded(&quota);
        }
        // Counted only once the entry is sure to stay, so a slot is never below the
        // number of entries it covers (the switch-in decrements what it removes).
        atomic_add(pending, 1);
        count(Stat::SwitchOutsRecorded);
        let spent = unsafe { bpf_ktime_get_ns() }.saturating_sub(now);
        add(Stat::SwitchOutRecordNs, spent);
        if by_quota.is_some() {
            add(Stat::SwitchOutQuotaRecordNs, spent);
        }
    }

    /// Notes in the thread's slot when it switched out, for its switch-in to measure the
    /// wait (see [`StampedWait`]).
    #[inline(always)]
    fn stamp(slot: &mut ThreadQuota, pending: *mut u64, tid: u32, tgid: u32, state: u32, now: u64) {
        (slot.stamp_state, slot.stamp_tid, slot.stamp_tgid, slot.stamp_out_ns) = (state, tid, tgid, now);
        atomic_add(pending, PENDING_STAMP);
        count(Stat::SwitchOutsStamped);
    }

    /// The task's `PENDING` slot, once an entry left by its last switch-out is dropped.
    /// The kernel does not always report a switch-in (about one in 10,000 under heavy
    /// switching here, bpftrace misses it too): such an entry would later end as a wait
    /// spanning the time the task ran.
    #[inline(always)]
    fn forget_missed_switch_in(task: u64) -> Option<*mut u64> {
        let pending = PENDING.get_ptr_mut(pending_slot(task))?;
        if unsafe { core::ptr::read_volatile(pending) } & RECORDS_PENDING != 0 && SWITCH_OUT.remove(&task).is_ok() {
            atomic_add(pending, u64::MAX);
            count(Stat::SwitchInMissed);
        }
        Some(pending)
    }

    /// (tid, tgid, raw state) of the task switching out, when it is one to trace: not the
    /// idle task (tid 0, which does not wait), in the traced process if one is set, and
    /// not dying (a dying task never comes back). `current` is still `prev`.
    #[inline(always)]
    fn traced_switch_out(ctx: &RawTracePointContext, cfg: &Config) -> Option<(u32, u32, u64)> {
        let pid_tgid = bpf_get_current_pid_tgid();
        let (tid, tgid) = (pid_tgid as u32, (pid_tgid >> 32) as u32);
        if tid == 0 || (cfg.filter_tgid != 0 && cfg.filter_tgid != tgid) {
            return None;
        }
        let raw_state: u64 = ctx.arg(3);
        (raw_state & RAW_TASK_DEAD == 0).then_some((tid, tgid, raw_state))
    }

    /// How far a switch-out's own probability is shifted down: by 3 (an eighth,
    /// weighted 8) for a thread still runnable as it leaves the CPU (preempted, or woken
    /// before it got to sleep). It did not block: on a busy host each wakeup can preempt
    /// its waker for microseconds, so the budget stays with the thread's blocking while
    /// a run-queue wait still weighs little. (The windows bench recorded half its
    /// switch-outs at p = 1 for waits under 1 ms, and rate control cut the quota for
    /// them; sampled at the host's probability instead, one preemption weighed 400 and
    /// put a window 25% over.) Read only for a thread within reach of its quota: a
    /// frequent switcher not drawn pays none of it. Runnable by the state's other
    /// cases (flags without a reported bit) is left to the quota.
    #[inline(always)]
    fn runnable_shift(ctx: &RawTracePointContext) -> u32 {
        let (preempted, raw_state): (u64, u64) = (ctx.arg(0), ctx.arg(3));
        if preempted & 0xff != 0 || raw_state == 0 { 3 } else { 0 }
    }

    /// What a switch-out's thread quota decides: the threshold and weight of its own
    /// probability ((0, 0): none, below the sampled one or no quota), and its slot when
    /// the switch-out is stamped (null: not).
    struct Quota {
        own: u32,
        own_weight_q16: u64,
        stamp: *mut ThreadQuota,
    }

    const NO_QUOTA: Quota = Quota { own: 0, own_weight_q16: 0, stamp: core::ptr::null_mut() };

    /// The low half of a `PENDING` slot: its `SWITCH_OUT` entries (see [`PENDING_STAMP`]).
    const RECORDS_PENDING: u64 = 0xffff_ffff;

    /// Counts the task's switch-out; returns the threshold and weight of its own
    /// probability, times 2^-[`runnable_shift`]:
    /// (quota / n)², at most 1, where n is the larger of its switch-outs in
    /// the previous epoch and so far in this one, this one included. Squared, so a
    /// thread just over the quota is still recorded nearly whole, while one switching a
    /// hundred times more gets a ten-thousandth and leaves the budget to the others (and
    /// to the sampled probability, which is then higher). Counting this epoch's
    /// switch-outs too bounds a thread that just began switching far more than before to
    /// about twice its quota of records an epoch, and its probability falls smoothly:
    /// a hard cap would leave the rest of its epoch to the sampled probability, whose
    /// weight (hundreds) on one long wait is a window's error. A slot of another task
    /// starts afresh for this one, a slot of an earlier epoch rolls over; a slot with
    /// another task's stamp in flight is left to it. A thread over its quota and at most
    /// at the stamp limit has the switch-out stamped while a long wait of it was found
    /// lately, and for [`STAMP_PROBES`] of its switch-outs an epoch otherwise.
    #[inline(always)]
    fn thread_quota<const STAMPS: bool>(ctx: &RawTracePointContext, cfg: &Config, sample_threshold: u32, task: u64, pending: *mut u64) -> Quota {
        let quota = cfg.offcpu_thread_quota;
        if !STAMPS && quota == 0 {
            return NO_QUOTA;
        }
        let Some(slot) = THREAD_QUOTA.get_ptr_mut(thread_quota_slot(task)) else { return NO_QUOTA };
        let slot_ptr = slot;
        let slot = unsafe { &mut *slot };
        // Jiffies, not the clock: a read of a variable, where the clock costs tens of
        // nanoseconds on every traced switch-out.
        let epoch = quota_epoch(unsafe { bpf_jiffies64() }, cfg.offcpu_quota_epoch_factor);
        let tag = thread_quota_tag(task);
        if slot.tag != tag {
            if STAMPS && slot.stamp_out_ns != 0 {
                return NO_QUOTA;
            }
            *slot = ThreadQuota { tag, epoch, stamp_until: epoch.wrapping_sub(1), ..ThreadQuota::default() };
        } else {
            if STAMPS && slot.stamp_out_ns != 0 {
                // Its own stamp, whose switch-in the kernel did not report.
                slot.stamp_out_ns = 0;
                atomic_add(pending, PENDING_STAMP.wrapping_neg());
                count(Stat::SwitchInMissed);
            }
            if slot.epoch != epoch {
                slot.last_switches = if slot.epoch.wrapping_add(1) == epoch { slot.switches } else { 0 };
                slot.epoch = epoch;
                slot.switches = 0;
                slot.stamp_probes = 0;
            }
        }
        slot.switches = slot.switches.saturating_add(1);
        let n = slot.last_switches.max(slot.switches) as u32;
        if n <= quota {
            let shift = runnable_shift(ctx);
            return Quota { own: u32::MAX >> shift, own_weight_q16: 1 << (16 + shift), stamp: core::ptr::null_mut() };
        }
        let stamp = if !STAMPS || n > cfg.offcpu_stamp_limit {
            core::ptr::null_mut()
        } else if slot.stamp_until.wrapping_sub(epoch) as i16 >= 0 {
            slot_ptr
        } else if slot.stamp_probes < STAMP_PROBES {
            slot.stamp_probes += 1;
            slot_ptr
        } else {
            core::ptr::null_mut()
        };
        // p = (quota / n)²: the threshold rounds down, the weight is its exact inverse.
        // Divisions cost tens of nanoseconds, and a frequent switcher's probability is
        // below the sampled one: tell that by multiplying first. The counts saturate at
        // 65,535, where it is below any sampled probability (at least 10^-4), and the
        // products stay within 64 bits: quota² < 2^30, n² < 2^32.
        let quota_squared = (quota.min(1 << 15) as u64) * (quota.min(1 << 15) as u64);
        let n_squared = (n as u64) * (n as u64);
        if quota_squared << 32 <= sample_threshold as u64 * n_squared {
            return Quota { stamp, ..NO_QUOTA };
        }
        // Below 2^32: n > quota here.
        let threshold = (((quota_squared << 32) / n_squared.max(1)) as u32) >> runnable_shift(ctx);
        Quota { own: threshold, own_weight_q16: weight_q16(threshold), stamp }
    }

    /// This CPU's burst slot at `now`, started afresh when its 10 ms have passed.
    #[inline(always)]
    fn burst_slot(now: u64) -> Option<&'static mut BurstSlot> {
        let slot = unsafe { &mut *BURST.get_ptr_mut(0)? };
        if now.wrapping_sub(slot.start_ns) >= BURST_SLOT_NS {
            slot.start_ns = now;
            slot.recorded = 0;
            slot.by_quota = 0;
        }
        Some(slot)
    }

    /// Whether this CPU may record one more switch-out at its thread's own probability
    /// in its burst slot: a thousand new threads each within their quota would
    /// otherwise all be recorded until rate control's next tick lowers the quota.
    #[inline(always)]
    fn burst_room(cfg: &Config, now: u64) -> bool {
        let limit = cfg.offcpu_burst_quota as u64 * QUOTA_BURST_FACTOR as u64;
        limit == 0 || burst_slot(now).is_some_and(|slot| slot.by_quota < limit)
    }

    #[inline(always)]
    fn count_burst_quota(now: u64) {
        if let Some(slot) = burst_slot(now) {
            slot.by_quota += 1;
        }
    }

    /// The weight of a switch-out drawn with `draw`, or None when this CPU is over its
    /// burst quota and the draw misses the reduced probability (see [`BURST_SHIFT`]).
    #[inline(always)]
    fn burst_weight(cfg: &Config, threshold: u32, draw: u32, now: u64) -> Option<u64> {
        if cfg.offcpu_burst_quota == 0 {
            return Some(weight_q16(threshold));
        }
        let slot = burst_slot(now)?;
        let mut weight_q16 = weight_q16(threshold);
        if slot.recorded >= cfg.offcpu_burst_quota as u64 {
            if draw > threshold >> BURST_SHIFT {
                return None;
            }
            weight_q16 <<= BURST_SHIFT;
            count(Stat::SwitchOutsThrottled);
        }
        slot.recorded += 1;
        Some(weight_q16)
    }

    /// The switch-in of `task` (`next`): the end of its recorded wait, or of its stamped one.
    #[inline(always)]
    fn switch_in<const STAMPS: bool>(cfg: &Config, task: u64) {
        let Some(pending) = PENDING.get_ptr_mut(pending_slot(task)) else { return };
        let in_flight = unsafe { core::ptr::read_volatile(pending) };
        if in_flight == 0 {
            return;
        }
        if in_flight & RECORDS_PENDING != 0 && recorded_switch_in::<STAMPS>(cfg, task, pending) {
            return;
        }
        if STAMPS && in_flight >= PENDING_STAMP {
            stamped_switch_in(cfg, task, pending);
        }
    }

    /// Ends the task's recorded wait, if it has one.
    #[inline(always)]
    fn recorded_switch_in<const STAMPS: bool>(cfg: &Config, task: u64, pending: *mut u64) -> bool {
        let Some(out) = (unsafe { SWITCH_OUT.get(&task) }) else {
            return false;
        };
        let out = *out;
        // Only the program that removes the entry closes the wait and gives the slot back.
        if SWITCH_OUT.remove(&task).is_err() {
            return false;
        }
        atomic_add(pending, u64::MAX);
        let now = unsafe { bpf_ktime_get_ns() };
        let mut elapsed = now.saturating_sub(out.ts_ns);
        if elapsed < cfg.offcpu_min_ns {
            count(Stat::OffCpuBelowMin);
            elapsed = 0;
        } else if STAMPS {
            // A long wait found by a record: the thread's switch-outs are stamped from now
            // on, when within the limit.
            if let Some(slot) = THREAD_QUOTA.get_ptr_mut(thread_quota_slot(task)) {
                let slot = unsafe { &mut *slot };
                if slot.tag == thread_quota_tag(task) {
                    slot.stamp_until = stamp_until(cfg);
                }
            }
        }
        let end = WaitEnd {
            kind: EVENT_WAIT_END,
            tid: out.tid,
            out_ts_ns: out.ts_ns,
            elapsed_ns: elapsed,
            weight_q16: out.weight_q16,
            stamped: out.stamped,
            _pad: 0,
        };
        if EVENTS.output::<WaitEnd>(&end, NO_WAKEUP).is_err() {
            count(Stat::OffCpuRingFull);
        }
        true
    }

    /// Ends the task's stamped wait, if it has one: sends it when long, and keeps the
    /// thread's switch-outs stamped.
    #[inline(always)]
    fn stamped_switch_in(cfg: &Config, task: u64, pending: *mut u64) {
        let Some(slot) = THREAD_QUOTA.get_ptr_mut(thread_quota_slot(task)) else { return };
        let slot = unsafe { &mut *slot };
        if slot.tag != thread_quota_tag(task) || slot.stamp_out_ns == 0 {
            return;
        }
        let out_ns = slot.stamp_out_ns;
        slot.stamp_out_ns = 0;
        atomic_add(pending, PENDING_STAMP.wrapping_neg());
        let elapsed = unsafe { bpf_ktime_get_ns() }.saturating_sub(out_ns);
        if elapsed < cfg.offcpu_min_ns {
            return;
        }
        slot.stamp_until = stamp_until(cfg);
        count(Stat::StampedLongWaits);
        let wait = StampedWait {
            kind: EVENT_STAMPED_WAIT,
            tid: slot.stamp_tid,
            tgid: slot.stamp_tgid,
            state: slot.stamp_state,
            out_ts_ns: out_ns,
            elapsed_ns: elapsed,
        };
        if EVENTS.output::<StampedWait>(&wait, NO_WAKEUP).is_err() {
            count(Stat::OffCpuRingFull);
        }
    }

    /// The epoch up to which a thread with a long wait now has its switch-outs stamped.
    #[inline(always)]
    fn stamp_until(cfg: &Config) -> u16 {
        quota_epoch(unsafe { bpf_jiffies64() }, cfg.offcpu_quota_epoch_factor).wrapping_add(STAMP_EPOCHS)
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}
