//! The reader: the thread that drains the ring buffer, unwinds what arrives while the
//! process is still there, holds each switch-out's snapshot until its wait ends (or
//! expires), and aggregates the window the sampler asks for.

use super::*;

/// Losses on the agent's side of the ring buffer, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentLosses {
    /// Samples or waits of stacks beyond `max_stack_keys` in their window.
    pub aggregate_full: u64,
    /// Wait ends whose switch-out snapshot never arrived (ring buffer full at switch-out).
    pub wait_without_snapshot: u64,
    /// Switch-outs of a thread that arrived while its previous one still waited for its
    /// end (whose end record was lost): the older wait is dropped.
    pub switch_out_without_end: u64,
    /// Waits dropped because their thread is gone: its end record was lost (a full ring
    /// buffer, a switch-in the kernel did not report) and it exited before switching
    /// out again.
    pub pending_expired: u64,
    /// Stamped waits of a thread and state no recorded wait had given a stack yet: shown
    /// at the thread alone.
    pub stamped_without_stack: u64,
    /// Records too short for their kind, or whose unwinding panicked (a binary that broke
    /// the unwinder): never expected, counted rather than trusted.
    pub malformed: u64,
    /// What the Python support met.
    pub python: python::PythonCounts,
    /// What the custom-label support met.
    pub labels: crate::labels::LabelCounts,
}

pub(super) type Aggregate = HashMap<(SampleKey, Option<Addrs>, Option<Addrs>), RawValue>;
pub(super) type Reply = mpsc::Sender<(Vec<RawSample>, UnwindCounts)>;

/// The thread that owns the ring buffer and the unwinder, once started.
pub(super) struct Reader {
    /// The ring buffer and the reader's state until [`Reader::start`] hands them to the
    /// thread.
    pub(super) idle: Option<(RingBuf<MapData>, ReaderState)>,
    pub(super) requests: Option<mpsc::Sender<Reply>>,
    pub(super) losses: Arc<std::sync::Mutex<AgentLosses>>,
    pub(super) thread: Option<thread::JoinHandle<()>>,
}

impl Reader {
    pub(super) fn new(
        ring: RingBuf<MapData>,
        unwinder: Unwinder,
        python: Python,
        labels: Labels,
        processes: ProcessTable,
        stack_bytes: StackBytes,
        max_keys: usize,
        max_pending: usize,
    ) -> Self {
        let losses = Arc::new(std::sync::Mutex::new(AgentLosses::default()));
        let state = ReaderState::new(unwinder, python, labels, processes, stack_bytes, max_keys, max_pending, losses.clone());
        Self { idle: Some((ring, state)), requests: None, losses, thread: None }
    }

    /// Starts the thread; records wait in the ring buffer until then.
    pub(super) fn start(&mut self) -> anyhow::Result<()> {
        let Some((mut ring, mut state)) = self.idle.take() else { return Ok(()) };
        let (requests, receiver) = mpsc::channel::<Reply>();
        let thread = thread::Builder::new()
            .name("bpf-reader".into())
            .spawn(move || {
                let mut wait = POLL;
                loop {
                    let request = receiver.recv_timeout(wait);
                    let read = state.read_ring(&mut ring);
                    wait = if read >= BUSY_RECORDS { BUSY_POLL } else { POLL };
                    state.compact();
                    match request {
                        Ok(reply) => {
                            let _ = reply.send(state.take_window());
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            })?;
        self.requests = Some(requests);
        self.thread = Some(thread);
        Ok(())
    }

    pub(super) fn take_window(&self) -> anyhow::Result<(Vec<RawSample>, UnwindCounts)> {
        let (reply, result) = mpsc::channel();
        self.requests
            .as_ref()
            .ok_or_else(|| anyhow!("ring buffer reader stopped"))?
            .send(reply)
            .map_err(|_| anyhow!("ring buffer reader died"))?;
        result
            .recv()
            .map_err(|_| anyhow!("ring buffer reader died"))
    }

    pub(super) fn losses(&self) -> AgentLosses {
        *self.losses.lock().unwrap()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How much user stack each thread needs copied, told to the BPF programs through
/// `STACK_BYTES`. Grows only (a deeper call next time still fits), in whole chunks, with
/// room to spare; a copy found too short goes straight to the maximum.
pub(super) struct StackBytes {
    /// Writes one thread's size into the kernel's `STACK_BYTES` map.
    pub(super) write: Box<dyn FnMut(u32, u32) + Send>,
    /// What the map holds, so it is only written on change.
    pub(super) learnt: HashMap<u32, u32>,
    pub(super) max: u32,
}

/// Room above the deepest byte a thread's unwind read, for deeper calls.
pub(super) const STACK_MARGIN: u64 = 2048;
/// Threads whose learnt size is mirrored; the kernel map is an LRU of its own.
pub(super) const MAX_LEARNT_THREADS: usize = 65536;

impl StackBytes {
    pub(super) fn learn(&mut self, tid: u32, read: u64) {
        let chunk = USER_STACK_CHUNK as u64;
        let wanted = read.saturating_add(STACK_MARGIN).div_ceil(chunk).saturating_mul(chunk).min(self.max as u64) as u32;
        if self.learnt.get(&tid).is_some_and(|&known| known >= wanted) {
            return;
        }
        if self.learnt.len() >= MAX_LEARNT_THREADS {
            self.learnt.clear();
        }
        self.learnt.insert(tid, wanted);
        (self.write)(tid, wanted);
    }
}

/// A recorded switch-out waiting for its end.
pub(super) struct PendingWait {
    pub(super) ts_ns: u64,
    /// When to look again whether its thread still exists (monotonic ns, the clock of
    /// `ts_ns`).
    pub(super) check_ns: u64,
    pub(super) key: SampleKey,
    pub(super) kernel: Option<Addrs>,
    pub(super) user: PendingStack,
    /// The Python frames of the snapshot, named, until the native stack is unwound.
    pub(super) python: Option<python::Frames>,
}

/// A thread's comm from /proc (empty when it is gone), for a wait no record named.
fn thread_comm(tgid: u32, tid: u32) -> [u8; TASK_COMM_LEN] {
    let mut comm = [0u8; TASK_COMM_LEN];
    if let Ok(name) = std::fs::read(format!("/proc/{tgid}/task/{tid}/comm")) {
        let name = name.strip_suffix(b"\n").unwrap_or(&name);
        let len = name.len().min(TASK_COMM_LEN - 1);
        comm[..len].copy_from_slice(&name[..len]);
    }
    comm
}

/// A stamped thread's latest recorded wait in one state: the stack its stamped waits in
/// that state are shown at (see [`StampedWait`]). A long one is kept over a later short
/// one: its own long waits are what stamped ones are. Before any record, only the key
/// (its comm read from /proc once), without stacks.
pub(super) struct LatestStack {
    pub(super) key: SampleKey,
    pub(super) user: Option<Addrs>,
    pub(super) kernel: Option<Addrs>,
    pub(super) long: bool,
}

impl LatestStack {
    fn has_stack(&self) -> bool {
        self.user.is_some() || self.kernel.is_some()
    }
}

pub(super) enum PendingStack {
    /// The registers and stack copy, not unwound yet: most waits are short and dropped.
    Raw {
        ip: u64,
        sp: u64,
        bp: u64,
        stack: Box<[u8]>,
    },
    Unwound(Option<Addrs>),
}

pub(super) struct ReaderState {
    pub(super) unwinder: Unwinder,
    pub(super) python: Python,
    pub(super) labels: Labels,
    /// Where the Python support finds processes' mappings.
    pub(super) processes: ProcessTable,
    pub(super) stack_bytes: StackBytes,
    pub(super) window: Aggregate,
    pub(super) pending: HashMap<u32, PendingWait>,
    /// The stack each stamped thread's stamped waits are shown at, by (tid, state).
    pub(super) latest: HashMap<(u32, u32), LatestStack>,
    /// When `latest` was last cleared of gone threads (`bpf_ktime_get_ns` clock).
    pub(super) latest_checked_ns: u64,
    /// Pending waits still holding a stack copy, oldest first: (arrival, tid, ts_ns).
    /// Entries whose wait ended or was compacted are skipped when reached.
    pub(super) raw_order: std::collections::VecDeque<(Instant, u32, u64)>,
    /// Bytes of stack copies held by pending waits.
    pub(super) raw_bytes: usize,
    pub(super) max_keys: usize,
    pub(super) max_pending: usize,
    pub(super) losses: AgentLosses,
    pub(super) shared_losses: Arc<std::sync::Mutex<AgentLosses>>,
    /// Unwinder counts at the last window's end.
    pub(super) counted: UnwindCounts,
}

impl ReaderState {
    pub(super) fn new(
        unwinder: Unwinder,
        python: Python,
        labels: Labels,
        processes: ProcessTable,
        stack_bytes: StackBytes,
        max_keys: usize,
        max_pending: usize,
        shared_losses: Arc<std::sync::Mutex<AgentLosses>>,
    ) -> Self {
        Self {
            unwinder,
            python,
            labels,
            processes,
            stack_bytes,
            window: Aggregate::new(),
            pending: HashMap::new(),
            latest: HashMap::new(),
            latest_checked_ns: 0,
            raw_order: std::collections::VecDeque::new(),
            raw_bytes: 0,
            max_keys,
            max_pending,
            losses: AgentLosses::default(),
            shared_losses,
            counted: UnwindCounts::default(),
        }
    }

    /// Handles what the ring holds, up to [`MAX_RECORDS_PER_POLL`] so a flood of records
    /// cannot hold off the end of a window. Returns how many it handled.
    pub(super) fn read_ring(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let mut read = 0;
        while read < MAX_RECORDS_PER_POLL {
            let Some(record) = ring.next() else { break };
            self.handle(&record);
            read += 1;
        }
        self.losses.python = self.python.counts;
        self.losses.labels = self.labels.counts;
        *self.shared_losses.lock().unwrap() = self.losses;
        read
    }

    pub(super) fn handle(&mut self, record: &[u8]) {
        let kind = record
            .get(..4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()));
        match kind {
            Some(EVENT_SAMPLE) | Some(EVENT_SWITCH_OUT)
                if record.len() >= size_of::<SnapshotHeader>() =>
            {
                // SAFETY: the header is plain old data, the record at least as long, and
                // records are 8-byte aligned like the header.
                let header = unsafe { &*(record.as_ptr() as *const SnapshotHeader) };
                let stack = &record[size_of::<SnapshotHeader>()..];
                match stack.get(..header.user_len as usize) {
                    Some(stack) => self.snapshot(header, stack),
                    None => self.losses.malformed += 1,
                }
            }
            Some(EVENT_PYTHON_STACK) => match python::read_stack(record) {
                Some(stack) => self.python.stack(stack),
                None => self.losses.malformed += 1,
            },
            Some(EVENT_LABELS) => self.labels.record(record),
            Some(EVENT_THREAD_CONTEXT) => self.labels.thread_context(record),
            Some(EVENT_WAIT_END) if record.len() >= size_of::<WaitEnd>() => {
                // SAFETY: as above; read unaligned since the record is only 8-byte aligned.
                let end = unsafe { std::ptr::read_unaligned(record.as_ptr() as *const WaitEnd) };
                self.wait_end(&end);
            }
            Some(EVENT_STAMPED_WAIT) if record.len() >= size_of::<StampedWait>() => {
                // SAFETY: as above.
                let wait = unsafe { std::ptr::read_unaligned(record.as_ptr() as *const StampedWait) };
                self.stamped_wait(&wait);
            }
            _ => self.losses.malformed += 1,
        }
    }

    pub(super) fn snapshot(&mut self, snapshot: &SnapshotHeader, stack: &[u8]) {
        self.labels.observe(snapshot.tgid, &self.processes);
        let (labels, request) = self.labels.take(snapshot.tid, snapshot.ts_ns);
        let key = SampleKey {
            tgid: snapshot.tgid,
            pid: snapshot.tid,
            state: snapshot.state,
            comm: snapshot.comm,
            labels,
            request,
        };
        let kernel_frames = (snapshot.kernel_len as usize / 8).min(MAX_STACK_DEPTH);
        let kernel: Option<Addrs> =
            (kernel_frames > 0).then(|| Arc::from(&snapshot.kernel[..kernel_frames]));
        self.python.observe(snapshot.tgid, &self.processes);
        let python = self.python.take(snapshot.tgid, snapshot.tid, snapshot.ts_ns);
        if snapshot.kind == EVENT_SAMPLE {
            let user = self.unwind(snapshot.tgid, snapshot.tid, snapshot.ip, snapshot.sp, snapshot.bp, stack);
            let user = self.with_python(snapshot.tgid, user, python.as_ref());
            self.add(key, user, kernel, RawValue::OnCpuSamples(1));
            return;
        }
        if self.pending.len() >= self.max_pending && !self.pending.contains_key(&snapshot.tid) {
            self.losses.aggregate_full += 1;
            return;
        }
        // A thread has one switch-out at a time: a newer one replaces an entry whose end
        // was lost.
        self.raw_bytes += stack.len();
        self.raw_order.push_back((Instant::now(), snapshot.tid, snapshot.ts_ns));
        let wait = PendingWait {
            ts_ns: snapshot.ts_ns,
            check_ns: snapshot.ts_ns.saturating_add(PENDING_CHECK_NS),
            key,
            kernel,
            user: PendingStack::Raw { ip: snapshot.ip, sp: snapshot.sp, bp: snapshot.bp, stack: stack.into() },
            python,
        };
        if let Some(replaced) = self.pending.insert(snapshot.tid, wait) {
            self.losses.switch_out_without_end += 1;
            self.release(&replaced);
        }
    }

    /// Accounts for a pending wait that leaves with its stack copy.
    pub(super) fn release(&mut self, wait: &PendingWait) {
        if let PendingStack::Raw { stack, .. } = &wait.user {
            self.raw_bytes -= stack.len();
        }
    }

    pub(super) fn wait_end(&mut self, end: &WaitEnd) {
        // A different switch-out pending for the thread is a newer one, still waiting.
        if self.pending.get(&end.tid).is_none_or(|wait| wait.ts_ns != end.out_ts_ns) {
            self.losses.wait_without_snapshot += 1;
            return;
        }
        let wait = self.pending.remove(&end.tid).expect("checked above");
        self.release(&wait);
        let long = end.elapsed_ns != 0;
        // A short wait is dropped, unless it is the first stack of a stamped thread's state.
        let latest_key = (end.tid, wait.key.state);
        let has_stack = self.latest.get(&latest_key).is_some_and(LatestStack::has_stack);
        if !long && (end.stamped == 0 || has_stack) {
            return;
        }
        let user = match wait.user {
            PendingStack::Raw { ip, sp, bp, stack } => {
                let user = self.unwind(wait.key.tgid, end.tid, ip, sp, bp, &stack);
                self.with_python(wait.key.tgid, user, wait.python.as_ref())
            }
            PendingStack::Unwound(user) => user,
        };
        if end.stamped != 0 && (self.latest.len() < self.max_pending || self.latest.contains_key(&latest_key)) {
            let kept_long = self.latest.get(&latest_key).is_some_and(|latest| latest.long);
            if long || !kept_long {
                let latest = LatestStack { key: wait.key, user: user.clone(), kernel: wait.kernel.clone(), long };
                self.latest.insert(latest_key, latest);
            }
        }
        if long {
            self.add(wait.key, user, wait.kernel, RawValue::wait(end.elapsed_ns, end.weight_q16));
        }
    }

    /// A stamped thread's long wait that was not recorded: counted whole, at the stack of
    /// the thread's latest recorded wait in the same state (without the request that one
    /// served), or at the thread alone before it has one.
    pub(super) fn stamped_wait(&mut self, wait: &StampedWait) {
        let value = RawValue::wait(wait.elapsed_ns, 1 << 16);
        let latest_key = (wait.tid, wait.state);
        // Of the same process: a thread id reused since by another is not its stack.
        let latest = self.latest.get(&latest_key).filter(|latest| latest.key.tgid == wait.tgid);
        if let Some(latest) = latest.filter(|latest| latest.has_stack()) {
            let key = SampleKey { request: 0, ..latest.key };
            let (user, kernel) = (latest.user.clone(), latest.kernel.clone());
            self.add(key, user, kernel, value);
            return;
        }
        self.losses.stamped_without_stack += 1;
        let key = match latest {
            Some(latest) => latest.key,
            None => {
                let key = SampleKey { tgid: wait.tgid, pid: wait.tid, state: wait.state, comm: thread_comm(wait.tgid, wait.tid), labels: 0, request: 0 };
                if self.latest.len() < self.max_pending {
                    self.latest.insert(latest_key, LatestStack { key, user: None, kernel: None, long: false });
                }
                key
            }
        };
        self.add(key, None, None, value);
    }

    pub(super) fn unwind(&mut self, tgid: u32, tid: u32, ip: u64, sp: u64, bp: u64, stack: &[u8]) -> Option<Addrs> {
        // Unwinding parses the binaries of every process on the host, some of them hostile:
        // a parser panic costs that one stack, not the agent.
        let unwinder = &mut self.unwinder;
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unwinder.unwind(tgid, ip, sp, bp, stack)));
        let Ok((frames, outcome)) = unwound else {
            self.losses.malformed += 1;
            return Some(Arc::from([ip].as_slice()));
        };
        match outcome {
            Outcome::Complete { stack_bytes } => self.stack_bytes.learn(tid, stack_bytes),
            Outcome::CopyTooShort => self.stack_bytes.learn(tid, u64::MAX),
            Outcome::Truncated | Outcome::Empty => {}
        }
        (outcome != Outcome::Empty).then(|| Arc::from(frames))
    }

    /// The unwound native stack with the snapshot's Python frames in place.
    fn with_python(&self, tgid: u32, user: Option<Addrs>, python: Option<&python::Frames>) -> Option<Addrs> {
        let Some(python) = python else { return user };
        Some(Arc::from(self.python.merge(tgid, user.as_deref().unwrap_or(&[]), python)))
    }

    /// Drops the waits whose thread is gone, found among those pending for over a
    /// minute, each looked up in /proc at most once a minute: their end can no longer
    /// come, and they would stay until `max_pending` is reached and new threads' waits
    /// are refused. A thread still blocked keeps its wait, however long.
    pub(super) fn expire_pending(&mut self, now_ns: u64) {
        let gone: Vec<u32> = self
            .pending
            .iter_mut()
            .filter(|(_, wait)| wait.check_ns <= now_ns)
            .filter_map(|(&tid, wait)| {
                wait.check_ns = now_ns.saturating_add(PENDING_CHECK_NS);
                let task = format!("/proc/{}/task/{tid}", wait.key.tgid);
                (!std::path::Path::new(&task).exists()).then_some(tid)
            })
            .collect();
        for tid in gone {
            if let Some(wait) = self.pending.remove(&tid) {
                self.release(&wait);
                self.losses.pending_expired += 1;
            }
        }
        // Stacks of stamped threads that are gone. Their task directories are looked at
        // once per check period, like the pending waits'.
        if now_ns >= self.latest_checked_ns.saturating_add(PENDING_CHECK_NS) {
            self.latest_checked_ns = now_ns;
            self.latest
                .retain(|&(tid, _), latest| std::path::Path::new(&format!("/proc/{}/task/{tid}", latest.key.tgid)).exists());
        }
    }

    /// Unwinds long waits now, while their process is surely still known, and frees
    /// their stack copies.
    pub(super) fn compact(&mut self) {
        let now = Instant::now();
        while let Some(&(arrived, tid, ts_ns)) = self.raw_order.front() {
            if now - arrived <= COMPACT_AFTER && self.raw_bytes <= MAX_RAW_BYTES {
                break;
            }
            self.raw_order.pop_front();
            let Some(wait) = self
                .pending
                .get_mut(&tid)
                .filter(|wait| wait.ts_ns == ts_ns && matches!(wait.user, PendingStack::Raw { .. }))
            else {
                continue;
            };
            let PendingStack::Raw { ip, sp, bp, stack } = std::mem::replace(&mut wait.user, PendingStack::Unwound(None))
            else {
                unreachable!("checked above");
            };
            let tgid = wait.key.tgid;
            let python = wait.python.take();
            self.raw_bytes -= stack.len();
            let user = self.unwind(tgid, tid, ip, sp, bp, &stack);
            let user = self.with_python(tgid, user, python.as_ref());
            if let Some(wait) = self.pending.get_mut(&tid) {
                wait.user = PendingStack::Unwound(user);
            }
        }
    }

    pub(super) fn add(&mut self, key: SampleKey, user: Option<Addrs>, kernel: Option<Addrs>, value: RawValue) {
        let len = self.window.len();
        let entry = (key, user, kernel);
        if let Some(total) = self.window.get_mut(&entry) {
            match (total, value) {
                (RawValue::OnCpuSamples(a), RawValue::OnCpuSamples(b)) => *a += b,
                (
                    RawValue::OffCpu { ns, waits, durations },
                    RawValue::OffCpu { ns: more, waits: w, durations: d },
                ) => {
                    *ns += more;
                    *waits += w;
                    durations.merge(&d);
                }
                // On-CPU samples have state 0, so their keys never meet off-CPU keys.
                _ => {}
            }
        } else if len < self.max_keys {
            self.window.insert(entry, value);
        } else {
            self.losses.aggregate_full += 1;
        }
    }

    pub(super) fn take_window(&mut self) -> (Vec<RawSample>, UnwindCounts) {
        self.expire_pending(monotonic_ns());
        self.python.evict();
        self.labels.evict();
        let samples = self
            .window
            .drain()
            .map(|((key, user, kernel), value)| RawSample {
                key,
                user,
                kernel,
                value,
            })
            .collect();
        let now = self.unwinder.counts;
        let delta = now.since(&self.counted);
        self.counted = now;
        (samples, delta)
    }
}

/// How often a wait pending without its end has its thread looked up.
pub(super) const PENDING_CHECK_NS: u64 = 60_000_000_000;

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, which stamps the records.
pub(super) fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
