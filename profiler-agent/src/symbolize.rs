//! Symbolize stage: turns address stacks into frame names.
//!
//! blazesym's `Symbolizer` is `!Send`, so it lives on a thread of its own and windows are
//! handed to it over a channel. It caches parsed binaries by path; on top of that, frame
//! names are cached per (binary, file offset) and kernel address. Addresses outside every
//! mapped file (JIT code) are named from the process's perf map, when it writes one.
//!
//! A frame that cannot be named stays visible as `[unknown] (binary+0xOFFSET)`: the file
//! offset, unlike the virtual address, is the same in every process and after restarts.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, mpsc},
    thread,
};

use anyhow::anyhow;
use blazesym::symbolize::{
    Input, Symbolized, Symbolizer as Blazesym,
    source::{Elf, Kernel, Source},
};

use crate::{
    elf_layout::CodeSegments,
    perf_map::PerfMaps,
    process::{ProcessInfo, ProcessTable},
    python::{self, PythonNames},
    sample::{RawSample, RawValue, SampleKey},
};

/// A sample with its stack as frame names, root first: user frames (outermost first)
/// and then kernel frames, suffixed `_[k]`.
#[derive(Clone, Debug)]
pub struct SymbolizedSample {
    pub key: SampleKey,
    pub process: String,
    pub user_frames: Vec<Arc<str>>,
    pub kernel_frames: Vec<Arc<str>>,
    pub value: RawValue,
}

pub const UNKNOWN: &str = "[unknown]";
pub const KERNEL_SUFFIX: &str = "_[k]";

/// Entries of the frame-name caches before they are reset; bounds agent memory.
const MAX_CACHED_FRAMES: usize = 200_000;
/// blazesym keeps every binary it parsed open, mapped and indexed (a large binary's
/// symbol index is megabytes). Past this many binaries since the last reset it is rebuilt,
/// so hosts with binary churn (CI, builds) keep a bounded footprint; the frame-name
/// cache survives resets, so only new addresses cost a re-parse.
const MAX_PARSED_BINARIES: usize = 32;
/// ...and at least this often, which returns the pages of binaries mapped for parsing
/// (file-backed, but resident and charged to the agent) to the system.
const BLAZESYM_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(300);

type Job = (Vec<RawSample>, mpsc::Sender<Vec<SymbolizedSample>>);

/// Handle on the symbolizer thread. Dropping it stops the thread.
pub struct Symbolizer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Symbolizer {
    /// `python_names` names the Python frames the sampler put in the stacks.
    pub fn spawn(processes: ProcessTable, python_names: PythonNames) -> anyhow::Result<Self> {
        let (jobs, receiver) = mpsc::channel::<Job>();
        let thread = thread::Builder::new().name("symbolizer".into()).spawn(move || {
            let mut state = State::new(processes, python_names);
            for (samples, reply) in receiver {
                let _ = reply.send(state.symbolize(samples));
            }
        })?;
        Ok(Self { jobs: Some(jobs), thread: Some(thread) })
    }

    pub fn symbolize(&self, samples: Vec<RawSample>) -> anyhow::Result<Vec<SymbolizedSample>> {
        let (reply, result) = mpsc::channel();
        self.jobs
            .as_ref()
            .ok_or_else(|| anyhow!("symbolizer stopped"))?
            .send((samples, reply))
            .map_err(|_| anyhow!("symbolizer thread died"))?;
        result.recv().map_err(|_| anyhow!("symbolizer thread died"))
    }
}

impl Drop for Symbolizer {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct State {
    blazesym: Blazesym,
    processes: ProcessTable,
    user_names: HashMap<((u64, u64), u64), Arc<str>>,
    parsed_binaries: std::collections::HashSet<(u64, u64)>,
    blazesym_since: std::time::Instant,
    kernel_names: HashMap<u64, Arc<str>>,
    perf_maps: PerfMaps,
    python_names: PythonNames,
    /// Separate debug files of stripped binaries, by binary; `None` when there is none.
    debug_files: HashMap<(u64, u64), Option<DebugFile>>,
    unknown: Arc<str>,
    unknown_kernel: Arc<str>,
}

impl State {
    fn new(processes: ProcessTable, python_names: PythonNames) -> Self {
        Self {
            python_names,
            blazesym: new_blazesym(),
            processes,
            user_names: HashMap::new(),
            parsed_binaries: Default::default(),
            blazesym_since: std::time::Instant::now(),
            kernel_names: HashMap::new(),
            perf_maps: PerfMaps::default(),
            debug_files: HashMap::new(),
            unknown: Arc::from(UNKNOWN),
            unknown_kernel: Arc::from(format!("{UNKNOWN}{KERNEL_SUFFIX}")),
        }
    }

    fn symbolize(&mut self, samples: Vec<RawSample>) -> Vec<SymbolizedSample> {
        if self.user_names.len() + self.kernel_names.len() > MAX_CACHED_FRAMES {
            self.user_names.clear();
            self.kernel_names.clear();
        }
        if self.parsed_binaries.len() > MAX_PARSED_BINARIES || self.blazesym_since.elapsed() > BLAZESYM_MAX_AGE {
            self.parsed_binaries.clear();
            self.debug_files.clear();
            self.blazesym = new_blazesym();
            self.blazesym_since = std::time::Instant::now();
        }
        // Live processes get a fresh snapshot (new libraries); dead ones keep their last.
        let mut tgids: Vec<u32> = samples.iter().map(|s| s.key.tgid).collect();
        tgids.sort_unstable();
        tgids.dedup();
        let mut snapshots = HashMap::new();
        for tgid in tgids {
            if let Some(info) = self.snapshot(tgid) {
                snapshots.insert(tgid, info);
            }
        }
        self.resolve_kernel(&samples);
        self.resolve_user(&samples, &snapshots);

        samples
            .into_iter()
            .map(|sample| {
                let info = snapshots.get(&sample.key.tgid);
                let process = info.map_or_else(|| comm_name(&sample.key.comm), |i| i.name.clone());
                let tgid = sample.key.tgid;
                let user_frames = root_first(sample.user.as_deref(), |addr| self.user_name(tgid, info, addr));
                let mut kernel_frames = root_first(sample.kernel.as_deref(), |addr| {
                    self.kernel_names.get(&addr).cloned().unwrap_or_else(|| self.unknown_kernel.clone())
                });
                drop_tracer_frames(&mut kernel_frames);
                SymbolizedSample { key: sample.key, process, user_frames, kernel_frames, value: sample.value.clone() }
            })
            .collect()
    }

    fn snapshot(&self, tgid: u32) -> Option<ProcessInfo> {
        self.processes.refresh(tgid);
        self.processes.get(tgid)
    }

    fn resolve_kernel(&mut self, samples: &[RawSample]) {
        let mut addrs: Vec<u64> = samples
            .iter()
            .filter_map(|s| s.kernel.as_deref())
            .flat_map(|addrs| addrs.iter().enumerate().map(|(depth, &addr)| call_site(depth, addr)))
            .filter(|addr| !self.kernel_names.contains_key(addr))
            .collect();
        if addrs.is_empty() {
            return;
        }
        addrs.sort_unstable();
        addrs.dedup();
        let source = Source::Kernel(Kernel { vmlinux: blazesym::MaybeDefault::None, debug_syms: false, ..Kernel::default() });
        let names = match self.blazesym.symbolize(&source, Input::AbsAddr(&addrs)) {
            Ok(names) => names,
            Err(err) => {
                tracing::warn!("kernel symbolization failed: {err}");
                return;
            }
        };
        for (addr, symbol) in addrs.into_iter().zip(names) {
            let name = match symbol {
                Symbolized::Sym(sym) => Arc::from(format!("{}{KERNEL_SUFFIX}", sym.name)),
                Symbolized::Unknown(_) => self.unknown_kernel.clone(),
            };
            self.kernel_names.insert(addr, name);
        }
    }

    fn resolve_user(&mut self, samples: &[RawSample], snapshots: &HashMap<u32, ProcessInfo>) {
        // Group the file offsets still missing from the cache by binary.
        let mut wanted: HashMap<(u64, u64), (PathBuf, Vec<u64>)> = HashMap::new();
        for sample in samples {
            let (Some(addrs), Some(info)) = (sample.user.as_deref(), snapshots.get(&sample.key.tgid)) else {
                continue;
            };
            let mut outside_files = false;
            for (depth, &addr) in addrs.iter().enumerate() {
                if python::is_frame(addr) {
                    continue;
                }
                let addr = call_site(depth, addr);
                let mapping = info.mapping_for(addr);
                outside_files |= mapping.is_none();
                if let Some(mapping) = mapping {
                    let offset = addr - mapping.start + mapping.file_offset;
                    let file = &mapping.file;
                    if !self.user_names.contains_key(&(file.id, offset)) {
                        wanted.entry(file.id).or_insert_with(|| (file.handle_path.clone(), Vec::new())).1.push(offset);
                    }
                }
            }
            if outside_files {
                self.perf_maps.load(sample.key.tgid);
            }
        }
        for (id, (path, mut offsets)) in wanted {
            self.parsed_binaries.insert(id);
            offsets.sort_unstable();
            offsets.dedup();
            let mut elf = Elf::new(&path);
            elf.debug_syms = false;
            let source = Source::Elf(elf);
            let names = match self.blazesym.symbolize(&source, Input::FileOffset(&offsets)) {
                Ok(names) => names,
                Err(err) => {
                    tracing::debug!("symbolizing {}: {err}", path.display());
                    Vec::new()
                }
            };
            let mut names = names.into_iter();
            let mut unnamed = Vec::new();
            for offset in offsets {
                match names.next() {
                    Some(Symbolized::Sym(sym)) => {
                        self.user_names.insert((id, offset), Arc::from(sym.name.as_ref()));
                    }
                    _ => unnamed.push(offset),
                }
            }
            if !unnamed.is_empty() {
                self.resolve_from_debug_file(id, &path, &unnamed);
            }
        }
    }

    /// Names what the stripped binary's own (dynamic) symbols could not, from its separate
    /// debug file: the C library's internals (`start_thread`, `__lll_lock_wait`) on a host
    /// with `libc6-dbg`.
    fn resolve_from_debug_file(&mut self, id: (u64, u64), binary: &std::path::Path, offsets: &[u64]) {
        let debug = self.debug_files.entry(id).or_insert_with(|| DebugFile::find(binary));
        let Some(debug) = debug else { return };
        let (offsets, addrs): (Vec<u64>, Vec<u64>) =
            offsets.iter().filter_map(|&offset| Some((offset, debug.segments.virtual_address(offset)?))).unzip();
        let debug_path = debug.path.clone();
        let mut elf = Elf::new(&debug_path);
        elf.debug_syms = false;
        let names = match self.blazesym.symbolize(&Source::Elf(elf), Input::VirtOffset(&addrs)) {
            Ok(names) => names,
            Err(err) => {
                tracing::debug!("symbolizing {} from {}: {err}", binary.display(), debug_path.display());
                return;
            }
        };
        for (offset, name) in offsets.into_iter().zip(names) {
            if let Symbolized::Sym(sym) = name {
                self.user_names.insert((id, offset), Arc::from(sym.name.as_ref()));
            }
        }
    }

    fn user_name(&self, tgid: u32, info: Option<&ProcessInfo>, addr: u64) -> Arc<str> {
        if let Some(name) = self.python_names.name(addr) {
            return name;
        }
        let Some(mapping) = info.and_then(|info| info.mapping_for(addr)) else {
            return self.perf_maps.lookup(tgid, addr).unwrap_or_else(|| self.unknown.clone());
        };
        let offset = addr - mapping.start + mapping.file_offset;
        match self.user_names.get(&(mapping.file.id, offset)) {
            Some(name) => name.clone(),
            None => Arc::from(format!("{UNKNOWN} ({}+{offset:#x})", mapping.file.name)),
        }
    }
}

/// Names of a leaf-first address stack, root first, each looked up at its call site.
fn root_first(addrs: Option<&[u64]>, mut name: impl FnMut(u64) -> Arc<str>) -> Vec<Arc<str>> {
    addrs.map_or_else(Vec::new, |addrs| addrs.iter().enumerate().rev().map(|(depth, &addr)| name(call_site(depth, addr))).collect())
}

/// Leaf frames of our own tracing: a stack taken in the `sched_switch` program starts in
/// the program and the kernel's code that ran it. They are the same on every off-CPU
/// stack, so they would only hide the function that switched out (`__schedule`).
/// On the switch-in path the stack starts in the probed `finish_task_switch` (or its
/// `.isra.0` clone), one frame above the `__schedule` the switch-out path starts in:
/// dropped too, so both paths give the same stacks.
const TRACER_FRAME_PREFIXES: &[&str] = &["bpf_prog_", "bpf_trace_run", "__bpf_trace_", "bpf_dispatcher_", "finish_task_switch"];

fn drop_tracer_frames(root_first: &mut Vec<Arc<str>>) {
    while root_first.last().is_some_and(|leaf| TRACER_FRAME_PREFIXES.iter().any(|p| leaf.starts_with(p))) {
        root_first.pop();
    }
}

/// Function names only: line numbers and inlined frames would cost DWARF parsing.
fn new_blazesym() -> Blazesym {
    Blazesym::builder().enable_code_info(false).enable_inlined_fns(false).build()
}

/// Return addresses point after the call; look up the call instruction instead, except
/// for the leaf, which is the interrupted instruction itself, and Python frames, which
/// are names.
fn call_site(depth: usize, addr: u64) -> u64 {
    if depth == 0 || python::is_frame(addr) { addr } else { addr.saturating_sub(1) }
}

pub fn comm_name(comm: &[u8]) -> String {
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

/// Where distributions install separate debug files by build id (Debian's `-dbg` and
/// `-dbgsym` packages, Fedora's `-debuginfo`), as gdb and perf look them up.
const DEBUG_ROOT: &str = "/usr/lib/debug/.build-id";

/// The separate debug file of a stripped binary.
struct DebugFile {
    path: PathBuf,
    /// The debug file's symbols are at virtual addresses, samples at file offsets.
    segments: CodeSegments,
}

impl DebugFile {
    /// The debug file of `binary` when it has no symbol table of its own and one is
    /// installed under its build id.
    fn find(binary: &std::path::Path) -> Option<Self> {
        use object::Object as _;
        let file = std::fs::File::open(binary).ok()?;
        // SAFETY: read-only; a binary changed underneath can only yield wrong names.
        let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let elf = object::File::parse(&map[..]).ok()?;
        if elf.section_by_name(".symtab").is_some() {
            return None;
        }
        let build_id = elf.build_id().ok()??;
        let hex: String = build_id.iter().map(|byte| format!("{byte:02x}")).collect();
        if hex.len() < 4 {
            return None;
        }
        let path = PathBuf::from(format!("{DEBUG_ROOT}/{}/{}.debug", &hex[..2], &hex[2..]));
        if !path.is_file() {
            return None;
        }
        Some(Self { path, segments: CodeSegments::of(&elf) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_cpu_stacks_end_where_the_task_switched_out() {
        let names = ["schedule_[k]", "__schedule_[k]", "bpf_trace_run4_[k]", "bpf_prog_f1d4c13283ddd300_sched_switch_[k]"];
        let mut frames: Vec<Arc<str>> = names.iter().map(|n| Arc::from(*n)).collect();
        drop_tracer_frames(&mut frames);
        assert_eq!(frames, vec![Arc::from("schedule_[k]"), Arc::from("__schedule_[k]")]);
        // Only at the leaf: a frame of that name elsewhere stays.
        let mut frames: Vec<Arc<str>> = vec![Arc::from("bpf_prog_run_[k]"), Arc::from("do_thing_[k]")];
        drop_tracer_frames(&mut frames);
        assert_eq!(frames.len(), 2);
    }
}
