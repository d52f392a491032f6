//! Python frames in native stacks, for CPython processes, with nothing asked of them.
//!
//! For each process the agent finds running a CPython it has a layout for
//! ([`layout`], found by [`discover`]), it writes into the kernel's `PYTHON_PROCESSES`
//! where that process's interpreter state is. From then on the BPF programs read, with
//! every on-CPU sample and recorded wait of its threads, the chain of the thread's
//! Python frames (code object and instruction of each, leaf first) from its heap, and
//! send them in a record just before the snapshot.
//!
//! Here those frames become names, `qualname (file.py:line)`, from the code objects read
//! out of the process's memory once each ([`code`]), and take the place of the native
//! frames of the eval loop (`_PyEval_EvalFrameDefault`) that ran them: each native call
//! of the loop runs the frames up to the one marked as its entry. So Python frames sit
//! between the native frames that called into Python and those Python called, in their
//! true order. A code object whose address now holds another object, or one whose
//! fingerprint differs from the kernel's, is read afresh: a name is never taken from a
//! freed object's successor.
//!
//! Frames are carried through the rest of the pipeline as tagged addresses
//! ([`is_frame`]) whose names [`PythonNames`] holds.

pub mod code;
pub mod debug_offsets;
pub mod discover;
pub mod layout;

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use profiler_common::{PythonFrame, PythonProcess, PythonStackOf, MAX_PYTHON_FRAMES, PYTHON_ENTRY, PYTHON_READ_FAILED, PYTHON_TRUNCATED};

use crate::process::{MappingsSeen, ProcessTable};
use code::Code;
use discover::{Interpreter, NotReadable};

/// What Python support does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PythonOptions {
    /// Read Python frames at all.
    pub enabled: bool,
    /// Keep the interpreter's own eval-loop frames beside the Python frames they ran.
    pub eval_frames: bool,
}

impl Default for PythonOptions {
    fn default() -> Self {
        Self { enabled: true, eval_frames: false }
    }
}

/// Tagged addresses of Python frames: above every user address (47 bits) and below
/// every kernel one, with the name's index in the low 32 bits.
const FRAME_TAG: u64 = 0x8000 << 48;

/// Whether an address of a user stack is a Python frame.
pub fn is_frame(addr: u64) -> bool {
    addr >> 48 == 0x8000
}

/// Distinct Python frame names kept; past it, new ones share one name saying so.
const MAX_NAMES: usize = 262_144;
/// Decoded code objects cached, over all processes.
const MAX_CODES: usize = 65_536;
/// Python stacks waiting for their snapshot: one per thread at most, and a snapshot
/// follows its stack within the same drain of the ring unless the ring was full.
const MAX_WAITING_STACKS: usize = 16_384;
/// How often a process's interpreter is looked for again (it may exec, or load
/// libpython late).
const RECHECK: Duration = Duration::from_secs(2);

const TABLE_FULL: &str = "[python: frame name table full]";
const UNREADABLE: &str = "[python: code object unreadable]";
const CUT: &str = "[python: deeper frames cut]";

/// Names of Python frames, by the index their tagged address carries. Shared by the
/// reader, which adds them, and the symbolizer, which reads them.
#[derive(Clone, Default)]
pub struct PythonNames(Arc<RwLock<NameTable>>);

#[derive(Default)]
struct NameTable {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
}

impl PythonNames {
    /// The name of a tagged address, None for any other address.
    pub fn name(&self, addr: u64) -> Option<Arc<str>> {
        if !is_frame(addr) {
            return None;
        }
        let table = self.0.read().unwrap();
        Some(table.names.get(addr as u32 as usize).cloned().unwrap_or_else(|| Arc::from(UNREADABLE)))
    }

    fn intern(&self, name: &str) -> u64 {
        if let Some(&id) = self.0.read().unwrap().ids.get(name) {
            return FRAME_TAG | id as u64;
        }
        let mut table = self.0.write().unwrap();
        if let Some(&id) = table.ids.get(name) {
            return FRAME_TAG | id as u64;
        }
        let name: Arc<str> = if table.names.len() < MAX_NAMES { Arc::from(name) } else { Arc::from(TABLE_FULL) };
        if let Some(&id) = table.ids.get(&name) {
            return FRAME_TAG | id as u64;
        }
        let id = table.names.len() as u32;
        table.names.push(name.clone());
        table.ids.insert(name, id);
        FRAME_TAG | id as u64
    }
}

/// Counts of what Python support met, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PythonCounts {
    /// Processes whose Python frames are read.
    pub processes: u64,
    /// Processes running a CPython without a layout here: native stacks only.
    pub unknown_version: u64,
    /// Code objects that could not be read or no longer matched their frame.
    pub code_unreadable: u64,
    /// Stacks of Python frames sent without their snapshot (a full ring).
    pub stacks_unmatched: u64,
}

/// One Python frame of a snapshot, named.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    addr: u64,
    entry: bool,
}

/// The Python frames of one snapshot, named, leaf first.
#[derive(Clone, Debug, Default)]
pub struct Frames {
    frames: Vec<Frame>,
    cut: bool,
}

enum Checked {
    Python(Interpreter),
    Not,
}

struct ProcessState {
    checked: Checked,
    /// The mappings it was checked with: a process that exec'd or loaded a library
    /// since is checked again at once.
    mappings: MappingsSeen,
    checked_at: Instant,
    seen_at: Instant,
}

struct CachedCode {
    code: Code,
    lines: HashMap<u32, u64>,
}

/// The reader's side: finds Python processes, tells the kernel about them, and names
/// and places the frames the kernel sends.
pub struct Python {
    options: PythonOptions,
    /// Writes (Some) or removes (None) a process's entry in `PYTHON_PROCESSES`.
    publish: Box<dyn FnMut(u32, Option<PythonProcess>) + Send>,
    processes: HashMap<u32, ProcessState>,
    codes: HashMap<(u32, u64), CachedCode>,
    waiting: HashMap<u32, RawStack>,
    names: PythonNames,
    pub counts: PythonCounts,
}

impl Python {
    pub fn new(options: PythonOptions, names: PythonNames, publish: Box<dyn FnMut(u32, Option<PythonProcess>) + Send>) -> Self {
        Self { options, publish, processes: HashMap::new(), codes: HashMap::new(), waiting: HashMap::new(), names, counts: PythonCounts::default() }
    }

    /// Notes a snapshot of process `tgid`: a process not checked lately is looked at
    /// (again, if its mappings changed), and the kernel told what was found.
    pub fn observe(&mut self, tgid: u32, table: &ProcessTable) {
        if !self.options.enabled || tgid == 0 {
            return;
        }
        let now = Instant::now();
        if let Some(state) = self.processes.get_mut(&tgid) {
            state.seen_at = now;
            if now.duration_since(state.checked_at) < RECHECK && !state.mappings.changed(table, tgid) {
                return;
            }
            state.checked_at = now;
        }
        let Some(info) = table.get(tgid) else { return };
        let mappings = MappingsSeen::of(&info.mappings);
        if self.processes.get(&tgid).is_some_and(|state| state.mappings.same(&mappings)) {
            return;
        }
        let checked = match discover::find(tgid, &info) {
            Ok(interpreter) => {
                tracing::info!(pid = tgid, version = %interpreter.version, "reading Python frames");
                if let Some(differed) = interpreter.described.as_ref().filter(|d| !d.is_empty()) {
                    tracing::info!(pid = tgid, fields = ?differed, "the interpreter's own debug offsets differ from the table's: reading with its own");
                }
                self.counts.processes += 1;
                (self.publish)(tgid, Some(kernel_entry(&interpreter)));
                Checked::Python(interpreter)
            }
            Err(not) => {
                match &not {
                    NotReadable::UnknownVersion(version) => {
                        tracing::info!(pid = tgid, %version, "no layout for this Python version: its stacks stay native");
                        self.counts.unknown_version += 1;
                    }
                    NotReadable::BadDescription(version, refused) => {
                        tracing::info!(pid = tgid, %version, ?refused, "the interpreter's debug offsets cannot be used: its stacks stay native");
                        self.counts.unknown_version += 1;
                    }
                    NotReadable::NotPython | NotReadable::NoSymbols => {}
                }
                if matches!(self.processes.get(&tgid).map(|s| &s.checked), Some(Checked::Python(_))) {
                    (self.publish)(tgid, None);
                }
                Checked::Not
            }
        };
        self.processes.insert(tgid, ProcessState { checked, mappings, checked_at: now, seen_at: now });
    }

    /// Takes a stack of Python frames the kernel sent; it waits for its snapshot.
    pub fn stack(&mut self, (tid, stack): (u32, RawStack)) {
        // Stacks whose snapshots never came (a full ring) pile up only to this bound.
        if self.waiting.len() >= MAX_WAITING_STACKS && !self.waiting.contains_key(&tid) {
            self.counts.stacks_unmatched += self.waiting.len() as u64;
            self.waiting.clear();
        }
        if self.waiting.insert(tid, stack).is_some() {
            self.counts.stacks_unmatched += 1;
        }
    }

    /// The named Python frames of the snapshot (`tgid`, `tid`, `ts_ns`), if the kernel
    /// sent any.
    pub fn take(&mut self, tgid: u32, tid: u32, ts_ns: u64) -> Option<Frames> {
        let raw = self.waiting.remove(&tid)?;
        if raw.ts_ns != ts_ns {
            self.counts.stacks_unmatched += 1;
            return None;
        }
        let Some(ProcessState { checked: Checked::Python(interpreter), .. }) = self.processes.get(&tgid) else { return None };
        let interpreter = interpreter.clone();
        if self.codes.len() >= MAX_CODES {
            self.codes.clear();
        }
        let frames = raw
            .frames
            .iter()
            .map(|frame| Frame { addr: self.name(tgid, &interpreter, frame), entry: frame.tag & PYTHON_ENTRY != 0 })
            .collect();
        Some(Frames { frames, cut: raw.cut })
    }

    /// The tagged address naming one frame.
    fn name(&mut self, tgid: u32, interpreter: &Interpreter, frame: &PythonFrame) -> u64 {
        let fingerprint = frame.tag & !PYTHON_ENTRY;
        let key = (tgid, frame.code);
        if self.codes.get(&key).is_none_or(|cached| cached.code.fingerprint != fingerprint) {
            let layout = &interpreter.layout;
            let read = Code::read(tgid, frame.code, interpreter.code_type, &layout.code, &layout.objects, layout.kernel.code_fingerprint as usize);
            match read {
                // The object read now must be the one the kernel saw.
                Some(code) if code.fingerprint == fingerprint => {
                    self.codes.insert(key, CachedCode { code, lines: HashMap::new() });
                }
                _ => {
                    self.codes.remove(&key);
                    self.counts.code_unreadable += 1;
                    return self.names.intern(UNREADABLE);
                }
            }
        }
        let cached = self.codes.get_mut(&key).expect("inserted above");
        if let Some(&addr) = cached.lines.get(&frame.instr_offset) {
            return addr;
        }
        let code = &cached.code;
        let line = code.line(bytecode_offset(&interpreter.layout, frame.instr_offset));
        let name = format!("{} ({}:{})", code.qualname, code.filename, line);
        let addr = self.names.intern(&name);
        cached.lines.insert(frame.instr_offset, addr);
        addr
    }

    /// `native` (leaf first) with each native frame of the eval loop replaced by the
    /// Python frames it ran, and the interpreter's own frames between two Python frames
    /// (its call machinery: `call_function`, `_PyFunction_Vectorcall`, ...) left out;
    /// both kept with `eval_frames`. Python frames left over (a native stack cut short)
    /// go at the root end; a cut Python stack is marked there.
    pub fn merge(&self, tgid: u32, native: &[u64], python: &Frames) -> Vec<u64> {
        let (eval, text) = match self.processes.get(&tgid) {
            Some(ProcessState { checked: Checked::Python(interpreter), .. }) => (interpreter.eval.clone(), interpreter.text.clone()),
            _ => (Vec::new(), 0..0),
        };
        let mut merged = Vec::with_capacity(native.len() + python.frames.len() + 1);
        let mut frames = python.frames.iter().peekable();
        let mut placed = false;
        for (depth, &addr) in native.iter().enumerate() {
            // Return addresses point after the call, which may be the function's end.
            let at = if depth == 0 { addr } else { addr.saturating_sub(1) };
            if !eval.iter().any(|range| range.contains(&at)) || frames.peek().is_none() {
                let machinery = placed && frames.peek().is_some() && text.contains(&at);
                if !machinery || self.options.eval_frames {
                    merged.push(addr);
                }
                continue;
            }
            placed = true;
            for frame in frames.by_ref() {
                merged.push(frame.addr);
                if frame.entry {
                    break;
                }
            }
            if self.options.eval_frames {
                merged.push(addr);
            }
        }
        merged.extend(frames.map(|frame| frame.addr));
        if python.cut {
            merged.push(self.names.intern(CUT));
        }
        merged
    }

    /// Forgets processes unseen for a while that are gone, and takes them out of the
    /// kernel's map, which has room for a bounded number. A live one stays however idle:
    /// its first sample after a long sleep still has its frames.
    pub fn evict(&mut self) {
        for (tgid, state) in crate::process::remove_gone(&mut self.processes, |state| &mut state.seen_at) {
            if let Checked::Python(_) = state.checked {
                (self.publish)(tgid, None);
            }
            self.codes.retain(|&(pid, _), _| pid != tgid);
        }
    }
}

/// A stack of Python frames as the kernel sent it.
pub struct RawStack {
    ts_ns: u64,
    frames: Vec<PythonFrame>,
    cut: bool,
}

/// The thread and stack of a [`profiler_common::PythonStack`] record, which carries only the frames read;
/// None for a record too short for what it says it holds.
pub fn read_stack(record: &[u8]) -> Option<(u32, RawStack)> {
    // The header is the record type with room for no frame.
    if record.len() < size_of::<PythonStackOf<0>>() {
        return None;
    }
    // SAFETY: plain old data, the record at least as long; read unaligned since records
    // are only 8-byte aligned.
    let header = unsafe { std::ptr::read_unaligned(record.as_ptr() as *const PythonStackOf<0>) };
    let depth = (header.depth as usize).min(MAX_PYTHON_FRAMES);
    let frames = record.get(size_of::<PythonStackOf<0>>()..size_of::<PythonStackOf<0>>() + depth * size_of::<PythonFrame>())?;
    let frames = frames
        .chunks_exact(size_of::<PythonFrame>())
        // SAFETY: as above, one frame's bytes each.
        .map(|raw| unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const PythonFrame) })
        .collect();
    let cut = header.flags & (PYTHON_TRUNCATED | PYTHON_READ_FAILED) != 0;
    Some((header.tid, RawStack { ts_ns: header.ts_ns, frames, cut }))
}

/// The byte offset into its bytecode of the instruction a frame is at, from what the
/// kernel sent.
fn bytecode_offset(layout: &layout::Layout, instr_offset: u32) -> i64 {
    match layout.kernel.legacy_frames {
        0 => instr_offset as i64 - layout.code.code as i64,
        // `f_lasti`, -1 before the first instruction.
        units => instr_offset as i32 as i64 * units as i64,
    }
}

fn kernel_entry(interpreter: &Interpreter) -> PythonProcess {
    let (pid_ns_dev, pid_ns_ino) = interpreter.pid_ns.unwrap_or((0, 0));
    PythonProcess {
        layout: interpreter.layout.kernel,
        interpreters_head: interpreter.runtime + interpreter.layout.runtime_interpreters_head,
        pid_ns_dev,
        pid_ns_ino,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        process::{Command, Stdio},
    };

    use super::*;

    fn read_word(pid: u32, addr: u64) -> u64 {
        let mut word = [0u8; 8];
        assert!(crate::process::read_memory(pid, addr, &mut word), "reading {addr:#x} of {pid}");
        u64::from_le_bytes(word)
    }

    /// The CPythons of this host with a layout: Debian's, and pyenv's (each runs from
    /// its libpython3.X.so).
    fn pythons() -> Vec<String> {
        let mut found = vec!["/usr/bin/python3.11".to_string()];
        for (version, prefix) in layout::installed() {
            if layout::for_version(version).is_some() {
                found.push(prefix.join(format!("bin/python{version}")).display().to_string());
            }
        }
        found
    }

    /// Walks a live interpreter's thread state and frames with the offsets the kernel
    /// gets, and decodes its code objects as the agent does, against what the interpreter
    /// says of itself: a wrong offset for any version run here fails.
    #[test]
    fn a_live_interpreter_reads_as_it_describes_itself() {
        for python in pythons() {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/src/python/live_check.py");
            let mut child = Command::new(&python)
                .arg(script)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|err| panic!("{python} is needed for this test: {err}"));
            let pid = child.id();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            let described: serde_json::Value = serde_json::from_str(&line).unwrap();
            // The main thread is blocked in target() once it printed; give it a moment
            // to get there.
            std::thread::sleep(Duration::from_millis(200));

            let table = ProcessTable::default();
            table.refresh(pid);
            let info = table.get(pid).expect("snapshot of the interpreter");
            let interpreter = discover::find(pid, &info).unwrap_or_else(|err| panic!("{python}: {err:?}"));
            assert_eq!(
                [interpreter.version.major as u64, interpreter.version.minor as u64],
                [described["version"][0].as_u64().unwrap(), described["version"][1].as_u64().unwrap()]
            );
            // From 3.13 the interpreter describes its layout itself, as the table does.
            assert_eq!(interpreter.described, (interpreter.version.minor >= 13).then(Vec::new), "{python}: its debug offsets against the table");
            let layout = interpreter.layout;
            let k = layout.kernel;
            // As `python_thread` in the BPF programs: the thread list, by native id.
            let interp = read_word(pid, interpreter.runtime + layout.runtime_interpreters_head);
            let mut tstate = read_word(pid, interp + k.interp_threads_head as u64);
            // Before 3.11, by `pthread_self()`.
            let tid = described[if k.legacy_frames != 0 { "ident" } else { "tid" }].as_u64().unwrap();
            while tstate != 0 && read_word(pid, tstate + k.tstate_native_thread_id as u64) != tid {
                tstate = read_word(pid, tstate + k.tstate_next as u64);
            }
            assert_ne!(tstate, 0, "{python}: no thread state with the main thread's id");
            let mut frame = read_word(pid, tstate + k.tstate_frame as u64);
            if k.cframe_current_frame != profiler_common::PYTHON_NO_FIELD {
                frame = read_word(pid, frame + k.cframe_current_frame as u64);
            }
            // The frames lie in the thread's current chunk of its frame stack (3.11+); the
            // shims of 3.12+ (owned by the C stack) mark where a native call of the eval
            // loop began, as the kernel reads them.
            let (chunk, top) = if k.legacy_frames != 0 {
                (0, 0)
            } else {
                (read_word(pid, tstate + k.tstate_datastack_chunk as u64) + k.chunk_data as u64, read_word(pid, tstate + k.tstate_datastack_chunk as u64 + 8))
            };
            let byte = |addr: u64| {
                let mut byte = [0u8];
                assert!(crate::process::read_memory(pid, addr, &mut byte));
                byte[0]
            };
            let mut walked: Vec<(u64, bool)> = Vec::new();
            let mut instrs = Vec::new();
            while frame != 0 && walked.len() < 3 {
                let shim = k.frame_owner != profiler_common::PYTHON_NO_FIELD && byte(frame + k.frame_owner as u64) >= k.owner_shim as u8;
                if shim {
                    if let Some(last) = walked.last_mut() {
                        last.1 = true;
                    }
                } else {
                    // Frames are objects of their own before 3.11, each an entry.
                    assert!(k.legacy_frames != 0 || (chunk..top).contains(&frame), "{python}: frame {frame:#x} outside {chunk:#x}..{top:#x}");
                    let entry = k.legacy_frames != 0 || (k.frame_is_entry != profiler_common::PYTHON_NO_FIELD && byte(frame + k.frame_is_entry as u64) != 0);
                    // 3.14 tags the low bits, as the kernel masks them.
                    let code = read_word(pid, frame + k.frame_code as u64) & !15;
                    walked.push((code, entry));
                    // As the kernel sends it.
                    let instr = read_word(pid, frame + k.frame_instr as u64);
                    instrs.push(if k.legacy_frames != 0 { instr as u32 } else { instr.wrapping_sub(code) as u32 });
                }
                frame = read_word(pid, frame + k.frame_previous as u64);
            }
            if walked.len() == 3 && !walked[2].1 && frame != 0 && k.frame_owner != profiler_common::PYTHON_NO_FIELD {
                // The module's shim comes after it.
                walked[2].1 = byte(frame + k.frame_owner as u64) >= k.owner_shim as u8;
            }
            let stack: Vec<u64> = described["stack"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            // target() and method() run in the module's native call of the eval loop
            // (from 3.11; before, each frame had its own).
            let legacy = k.legacy_frames != 0;
            assert_eq!(walked, vec![(stack[0], legacy), (stack[1], legacy), (stack[2], true)], "{python}");
            // The instruction each frame is at reads as the line it is on: target()'s
            // return, method()'s call, the module's last line.
            for (((code, _), instr), line) in walked.iter().zip(&instrs).zip(described["stack_lines"].as_array().unwrap()) {
                let read = Code::read(pid, *code, interpreter.code_type, &layout.code, &layout.objects, k.code_fingerprint as usize).unwrap();
                assert_eq!(read.line(bytecode_offset(&layout, *instr)) as u64, line.as_u64().unwrap(), "{python}: the line {} is at", read.qualname);
            }

            for described in described["codes"].as_array().unwrap() {
                let addr = described["addr"].as_u64().unwrap();
                let code = Code::read(pid, addr, interpreter.code_type, &layout.code, &layout.objects, k.code_fingerprint as usize)
                    .unwrap_or_else(|| panic!("{python}: code object at {addr:#x} unreadable"));
                assert_eq!(code.qualname, described["qualname"].as_str().unwrap(), "{python}");
                assert_eq!(code.filename, described["filename"].as_str().unwrap(), "{python}");
                assert_eq!(code.first_line as u64, described["first_line"].as_u64().unwrap(), "{python}");
                for range in described["lines"].as_array().unwrap() {
                    let [start, end, line] = [0, 1, 2].map(|i| range[i].as_i64().unwrap());
                    for offset in (start..end).step_by(2) {
                        assert_eq!(code.line(offset) as i64, line, "{python}: {} at offset {offset}", code.qualname);
                    }
                }
            }
            drop(child.stdin.take());
            child.wait().unwrap();
            eprintln!("{python} {}: read as it describes itself", interpreter.version);
        }
    }

    /// A CPython of a version without a layout (here a stand-in `libpython3.99.so` with the
    /// symbols a real one exports and `Py_Version` saying 3.99) is counted and left to
    /// its native stacks: the kernel is told nothing of it.
    #[test]
    fn an_unknown_version_is_counted_and_left_native() {
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libpython3.99.so");
        let program = dir.path().join("embedder");
        std::fs::write(
            dir.path().join("lib.c"),
            "char _PyRuntime[4096]; char PyCode_Type[256];\n\
             const unsigned long Py_Version = 0x036300f0;\n\
             int _PyEval_EvalFrameDefault(int x) { return x + 1; }\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("main.c"), "#include <unistd.h>\nint _PyEval_EvalFrameDefault(int);\nint main(void) { pause(); return _PyEval_EvalFrameDefault(0); }\n").unwrap();
        let gcc = |args: &[&str]| assert!(Command::new("gcc").current_dir(dir.path()).args(args).status().unwrap().success());
        gcc(&["-shared", "-fPIC", "-o", library.to_str().unwrap(), "lib.c"]);
        gcc(&["-o", program.to_str().unwrap(), "main.c", "-L.", "-lpython3.99", "-Wl,-rpath,$ORIGIN"]);
        let mut child = Command::new(&program).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(200));

        let table = ProcessTable::default();
        table.refresh(child.id());
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = published.clone();
        let mut python = Python::new(PythonOptions::default(), PythonNames::default(), Box::new(move |pid, entry: Option<PythonProcess>| seen.lock().unwrap().push((pid, entry.is_some()))));
        python.observe(child.id(), &table);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(python.counts.unknown_version, 1);
        assert_eq!(python.counts.processes, 0);
        assert!(published.lock().unwrap().is_empty(), "the kernel was told of it");
        let info = table.get(child.id()).unwrap();
        assert!(matches!(discover::find(child.id(), &info), Err(NotReadable::UnknownVersion(layout::Version { major: 3, minor: 99 }))));
    }

    /// A process first looked at before it exec'd the interpreter (a shell, or any
    /// launcher's fork) is looked at again once the table has read its new image, not at
    /// the next recheck 2 s later: its first seconds get Python frames too.
    #[test]
    fn an_exec_of_python_is_looked_at_before_the_next_recheck() {
        use std::io::Write as _;
        let mut child = Command::new("sh")
            .args(["-c", "read line; exec python3 -c 'import time; time.sleep(5)'"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let table = ProcessTable::default();
        table.refresh(pid);
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = published.clone();
        let mut python = Python::new(PythonOptions::default(), PythonNames::default(), Box::new(move |pid, entry: Option<PythonProcess>| seen.lock().unwrap().push((pid, entry.is_some()))));
        python.observe(pid, &table);
        assert!(published.lock().unwrap().is_empty(), "the shell was taken for Python");

        let looked_at = Instant::now();
        writeln!(child.stdin.as_mut().unwrap()).unwrap();
        let exec = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        // Until the interpreter runs its loop: its thread state is there by then.
        (0..100)
            .find(|_| {
                std::thread::sleep(Duration::from_millis(20));
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe != exec)
                    && std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|wchan| wchan.contains("nanosleep") || wchan.contains("hrtimer"))
            })
            .expect("python3 sleeping");
        // What the unwinder does when a sample's address is in none of the known mappings.
        table.refresh(pid);
        python.observe(pid, &table);
        let elapsed = looked_at.elapsed();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(elapsed < RECHECK, "the exec took {elapsed:?}: the test proves nothing past the recheck");
        assert_eq!(*published.lock().unwrap(), [(pid, true)], "not found right after the exec");
    }

    /// A record of the class that holds its frames, as the kernel sends it.
    #[test]
    fn stack_records_read_back_their_frames() {
        let frame = |code, tag| PythonFrame { code, instr_offset: 200, tag };
        let record = PythonStackOf::<2> {
            kind: profiler_common::EVENT_PYTHON_STACK,
            tid: 42,
            ts_ns: 7,
            depth: 2,
            flags: PYTHON_TRUNCATED,
            frames: [frame(0x1000, PYTHON_ENTRY | 5), frame(0x2000, 6)],
        };
        // SAFETY: plain old data, viewed as its bytes.
        let bytes = unsafe { std::slice::from_raw_parts(&record as *const _ as *const u8, size_of::<PythonStackOf<2>>()) };
        let (tid, stack) = read_stack(bytes).unwrap();
        assert_eq!((tid, stack.ts_ns, stack.cut), (42, 7, true));
        assert_eq!(stack.frames, vec![frame(0x1000, PYTHON_ENTRY | 5), frame(0x2000, 6)]);
        assert!(read_stack(&bytes[..bytes.len() - 1]).is_none(), "a record shorter than its depth says");
    }

    #[test]
    fn python_frames_replace_the_eval_loop_frames_that_ran_them() {
        let names = PythonNames::default();
        let mut python = Python::new(PythonOptions::default(), names.clone(), Box::new(|_, _| {}));
        let eval = 0x1000..0x2000;
        let interpreter = Interpreter {
            version: layout::Version { major: 3, minor: 11 },
            layout: layout::for_version(layout::Version { major: 3, minor: 11 }).unwrap(),
            runtime: 0,
            code_type: 0,
            eval: vec![eval.clone()],
            text: 0x1000..0x8000,
            pid_ns: None,
            described: None,
        };
        let now = Instant::now();
        python.processes.insert(7, ProcessState { checked: Checked::Python(interpreter), mappings: MappingsSeen::default(), checked_at: now, seen_at: now });
        let frame = |name: &str, entry| Frame { addr: names.intern(name), entry };
        // Leaf first: two frames run by the inner eval call, two by the outer.
        let frames = Frames {
            frames: vec![frame("leaf (a.py:1)", false), frame("mid (a.py:2)", true), frame("caller (a.py:3)", false), frame("<module> (a.py:4)", true)],
            cut: false,
        };
        // Native, leaf first: a C function, eval, the interpreter's call machinery, a C
        // extension's call, eval, the interpreter's main.
        let native = [0x9000, 0x1100, 0x7800, 0xa000, 0x1200, 0x7000];
        let merged = python.merge(7, &native, &frames);
        let named: Vec<String> = merged.iter().map(|&a| names.name(a).map_or(format!("{a:#x}"), |n| n.to_string())).collect();
        assert_eq!(named, ["0x9000", "leaf (a.py:1)", "mid (a.py:2)", "0xa000", "caller (a.py:3)", "<module> (a.py:4)", "0x7000"]);

        python.options.eval_frames = true;
        let kept = python.merge(7, &native, &frames);
        assert_eq!(kept.len(), merged.len() + 3, "both eval frames and the machinery kept");
        python.options.eval_frames = false;
        // A native stack cut short: the Python frames left go at the root end, and a
        // cut Python stack is marked.
        let cut = Frames { cut: true, ..frames };
        let merged = python.merge(7, &[0x9000, 0x1100], &cut);
        let named: Vec<String> = merged.iter().map(|&a| names.name(a).map_or(format!("{a:#x}"), |n| n.to_string())).collect();
        assert_eq!(named, ["0x9000", "leaf (a.py:1)", "mid (a.py:2)", "caller (a.py:3)", "<module> (a.py:4)", CUT]);
    }
}
