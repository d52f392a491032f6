//! Request context from the application: custom labels (ABI v1 of Parca's
//! `custom-labels`, <https://github.com/polarsignals/custom-labels>, crate
//! `custom-labels` 0.4 and its C library), read with every on-CPU sample and recorded
//! wait of a thread that has a label set installed.
//!
//! An application opts in by linking the library into its main executable, which then
//! exports `custom_labels_abi_version` (a 4-byte 1) and the thread-local
//! `custom_labels_current_set`, a pointer to the thread's current set: an array of
//! (key, value) byte strings. The executable's thread-local block sits at a fixed offset
//! below the thread pointer (x86-64, TLS variant II), so the agent computes, per process,
//! the offset from a thread's `fsbase` to its `custom_labels_current_set` and writes it
//! into the kernel's `LABEL_PROCESSES`. Or by using the C library, `libcustomlabels.so`,
//! linked or loaded with `dlopen`, which reaches the variable through a TLS descriptor
//! (`R_X86_64_TLSDESC`, as the ABI asks of a library) or `__tls_get_addr`'s GOT pair.
//! What the dynamic linker wrote there, read from the process, is either that same
//! static offset or (a library `dlopen`ed past glibc's room for static TLS) a module id
//! and an offset in the module's block, which the kernel finds through the thread's
//! dynamic thread vector. The BPF programs follow it and send the labels in a record
//! just before the snapshot. A process that does not export the symbols is never
//! published, and its samples cost one hash lookup that finds nothing.
//!
//! Labels become labels of the profile (see `daemon`), except high-cardinality keys
//! ([`LabelOptions::high_cardinality`]: request or trace ids), which would make a
//! million requests a million series. The first of those keys a set has (in the
//! configured order) names the snapshot's request instead: its time goes to the
//! server's request table, not to a series.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use object::{
    read::elf::{ElfFile64, ProgramHeader as _},
    Object as _, ObjectSection as _, ObjectSymbol as _,
};
use std::mem::offset_of;

use profiler_common::{Label, LabelsProcess, LabelsRecord, LABELS_CUT, LABELS_HEADER_BYTES, LABELS_READ_FAILED, MAX_LABELS};

use crate::process::{Mapping, MappingsSeen, ProcessInfo, ProcessTable};

/// What custom-label support does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelOptions {
    /// Read custom labels at all.
    pub enabled: bool,
    /// Keys not made profile labels: each value would be a series of its own. The
    /// first a label set has names its request.
    pub high_cardinality: Vec<String>,
}

impl Default for LabelOptions {
    fn default() -> Self {
        Self { enabled: true, high_cardinality: ["request_id", "trace_id", "span_id"].map(String::from).to_vec() }
    }
}

/// A snapshot's labels, sorted by key, keys unique (the first of a key wins, as the ABI
/// says).
pub type LabelSet = Arc<[(String, String)]>;

/// Distinct label sets kept at most; past it new sets are dropped and counted. Sets
/// are the low-cardinality labels' combinations, so the bound is far above a service's.
const MAX_SETS: usize = 16_384;
/// Label records whose snapshots never came (a full ring) pile up only to this bound.
const MAX_WAITING: usize = 16_384;
/// How often a process is looked at again (it may exec)...
const RECHECK: Duration = Duration::from_secs(2);
/// ...and how often one that published nothing is asked for its process context again:
/// an SDK publishes it when it starts, which may be after the agent first saw the
/// process, and the mapping it lives in is not among those whose change triggers a look.
/// Every [`RECHECK`] in a process's first [`YOUNG`], when SDKs start.
const CONTEXT_RECHECK: Duration = Duration::from_secs(30);
const YOUNG: Duration = Duration::from_secs(10);

/// Label sets by the id snapshots carry (`SampleKey::labels`, 0 for none). Shared by
/// the reader, which interns, and whoever turns samples into profiles.
#[derive(Clone, Default)]
pub struct LabelSets(Arc<RwLock<Interner>>);

#[derive(Default)]
struct Interner {
    sets: Vec<LabelSet>,
    ids: HashMap<LabelSet, u32>,
    requests: RequestIds,
}

/// A request: the key (`request_id`, `trace_id`, ...) and value of the label that
/// named it.
pub type Request = Arc<(String, String)>;

/// Requests by the id snapshots carry (`SampleKey::request`, 0 for none). Requests
/// come and go, so ids are handed out in generations of [`REQUESTS_PER_GENERATION`]:
/// when one is full the one before it is forgotten. An id outlives at least one whole
/// generation (more than a window's snapshots waiting to be grouped), and an id of a
/// forgotten generation resolves to nothing, never to another request.
#[derive(Default)]
struct RequestIds {
    generation: u32,
    current: Vec<Request>,
    previous: Vec<Request>,
    ids: HashMap<Request, u32>,
}

/// Requests per generation of ids: the low bits of an id hold the index plus one.
const REQUESTS_PER_GENERATION: usize = (1 << 16) - 1;
const GENERATION_SHIFT: u32 = 16;

impl RequestIds {
    fn intern(&mut self, request: Request) -> u32 {
        // Only the current generation's requests are in `ids`.
        if let Some(&id) = self.ids.get(&request) {
            return id;
        }
        if self.current.len() >= REQUESTS_PER_GENERATION {
            self.previous = std::mem::take(&mut self.current);
            self.generation = self.generation.wrapping_add(1);
            self.ids.clear();
        }
        self.current.push(request.clone());
        // The index plus one: 0 stays "none".
        let id = ((self.generation & 0xffff) << GENERATION_SHIFT) | self.current.len() as u32;
        self.ids.insert(request, id);
        id
    }

    fn get(&self, id: u32) -> Option<Request> {
        let index = ((id & ((1 << GENERATION_SHIFT) - 1)) as usize).checked_sub(1)?;
        let generation = id >> GENERATION_SHIFT;
        let list = if generation == self.generation & 0xffff {
            &self.current
        } else if generation == self.generation.wrapping_sub(1) & 0xffff {
            &self.previous
        } else {
            return None;
        };
        list.get(index).cloned()
    }
}

impl LabelSets {
    /// The id of `set`; None when the table is full.
    fn intern(&self, set: LabelSet) -> Option<u32> {
        if let Some(&id) = self.0.read().unwrap().ids.get(&set) {
            return Some(id);
        }
        let mut interner = self.0.write().unwrap();
        if let Some(&id) = interner.ids.get(&set) {
            return Some(id);
        }
        if interner.sets.len() >= MAX_SETS {
            return None;
        }
        interner.sets.push(set.clone());
        let id = interner.sets.len() as u32;
        interner.ids.insert(set, id);
        Some(id)
    }

    /// The set of id `id`; None for 0 (no labels).
    pub fn get(&self, id: u32) -> Option<LabelSet> {
        let index = (id as usize).checked_sub(1)?;
        self.0.read().unwrap().sets.get(index).cloned()
    }

    fn intern_request(&self, request: Request) -> u32 {
        self.0.write().unwrap().requests.intern(request)
    }

    /// The request of id `id`; None for 0 and for an id of a forgotten generation.
    pub fn request(&self, id: u32) -> Option<Request> {
        self.0.read().unwrap().requests.get(id)
    }
}

/// What custom-label support met, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LabelCounts {
    /// Processes whose labels are read.
    pub processes: u64,
    /// Labels of a high-cardinality key, left out of the profile's labels (the first
    /// of a set names its request).
    pub high_cardinality_dropped: u64,
    /// Snapshots that carried a request.
    pub requests: u64,
    /// Label sets dropped: the table of distinct sets was full.
    pub sets_dropped: u64,
    /// Label records without their snapshot, or malformed.
    pub unmatched: u64,
    /// Checks of a process whose `libcustomlabels.so` reference was not resolved yet (a
    /// lazy descriptor): not read, checked again.
    pub libraries_pending: u64,
    /// Thread-context attributes whose key index the process's key map lacked.
    pub thread_keys_unknown: u64,
}

struct Checked {
    /// The mappings it was checked with: an exec, or a library loaded since, is checked
    /// again at once.
    mappings: MappingsSeen,
    /// A library's descriptor was not resolved yet, or the process context was being
    /// written or lacks a key: checked again until it is.
    pending: bool,
    checked_at: Instant,
    /// When its process context was last looked for.
    context_checked_at: Instant,
    first_checked_at: Instant,
    seen_at: Instant,
    published: bool,
}

/// The reader's side: finds processes that publish labels, tells the kernel about them,
/// and matches the labels the kernel sends with their snapshots.
pub struct Labels {
    options: LabelOptions,
    /// Writes (Some) or removes (None) a process's entry in `LABEL_PROCESSES`.
    publish: Box<dyn FnMut(u32, Option<LabelsProcess>) + Send>,
    processes: HashMap<u32, Checked>,
    libraries: Libraries,
    /// Thread-context attribute names by key index, of the processes that publish one.
    thread_keys: HashMap<u32, Vec<String>>,
    /// (snapshot ts, set id, request id) by thread.
    waiting: HashMap<u32, (u64, u32, u32)>,
    sets: LabelSets,
    pub counts: LabelCounts,
}

impl Labels {
    pub fn new(options: LabelOptions, sets: LabelSets, publish: Box<dyn FnMut(u32, Option<LabelsProcess>) + Send>) -> Self {
        Self {
            options,
            publish,
            processes: HashMap::new(),
            libraries: Libraries::default(),
            thread_keys: HashMap::new(),
            waiting: HashMap::new(),
            sets,
            counts: LabelCounts::default(),
        }
    }

    /// Notes a snapshot of process `tgid`: one not checked lately is looked at (again,
    /// if its executable changed), and the kernel told what was found.
    pub fn observe(&mut self, tgid: u32, table: &ProcessTable) {
        if !self.options.enabled || tgid == 0 {
            return;
        }
        let now = Instant::now();
        if let Some(checked) = self.processes.get_mut(&tgid) {
            checked.seen_at = now;
            // A service's first requests are labelled: the recheck alone left the e2e
            // test's app, first seen before its exec, unlabelled for 2 s (4 runs of 26).
            if now.duration_since(checked.checked_at) < RECHECK && !checked.mappings.changed(table, tgid) {
                return;
            }
        }
        let Some(info) = table.get(tgid) else { return };
        let mappings = MappingsSeen::of(&info.mappings);
        let (mut context_checked_at, mut first_checked_at) = (now, now);
        if let Some(checked) = self.processes.get_mut(&tgid) {
            checked.checked_at = now;
            first_checked_at = checked.first_checked_at;
            let every = if now.duration_since(first_checked_at) < YOUNG { RECHECK } else { CONTEXT_RECHECK };
            let context_due = !checked.published && now.duration_since(checked.context_checked_at) >= every;
            if checked.mappings.same(&mappings) && !checked.pending && !context_due {
                return;
            }
            if !context_due {
                context_checked_at = checked.context_checked_at;
            }
        }
        let mut pending = false;
        let found = self.find(Abi::CustomLabels, &info, tgid, &mut pending).or_else(|| self.find_thread_context(&info, tgid, &mut pending));
        let was_published = self.processes.get(&tgid).is_some_and(|checked| checked.published);
        match found {
            Some(entry) => {
                // Checked again after a library was loaded: counted and logged once.
                if !was_published {
                    tracing::info!(pid = tgid, "reading custom labels");
                    self.counts.processes += 1;
                }
                (self.publish)(tgid, Some(entry));
            }
            None if was_published => (self.publish)(tgid, None),
            None => {}
        }
        self.processes.insert(
            tgid,
            Checked { mappings, pending, checked_at: now, context_checked_at, first_checked_at, seen_at: now, published: found.is_some() },
        );
    }

    /// The kernel's entry for the process's thread-local of `abi`, in its executable or
    /// a library; `pending` set when a library's reference is not resolved yet.
    fn find(&mut self, abi: Abi, info: &ProcessInfo, tgid: u32, pending: &mut bool) -> Option<LabelsProcess> {
        executable(info).and_then(|mapping| in_executable(&mapping.file.handle_path, abi)).or_else(|| {
            let resolved = self.libraries.find(info, abi)?.resolved(tgid);
            *pending = resolved.is_none();
            if *pending {
                self.counts.libraries_pending += 1;
            }
            resolved.map(|entry| LabelsProcess { format: abi.format(), ..entry })
        })
    }

    /// The kernel's entry for an OpenTelemetry thread context: the process context must
    /// publish one this reader decodes (its key map is kept for the records), and a
    /// binary export `otel_thread_ctx_v1`.
    fn find_thread_context(&mut self, info: &ProcessInfo, tgid: u32, pending: &mut bool) -> Option<LabelsProcess> {
        let context = match crate::thread_context::process_context(tgid) {
            Ok(context) => context,
            Err(crate::thread_context::Unreadable::Busy) => {
                *pending = true;
                return None;
            }
            Err(crate::thread_context::Unreadable::Schema(schema)) => {
                // Once per process: it is asked again every 30 s.
                if !self.processes.contains_key(&tgid) {
                    tracing::info!(pid = tgid, schema, "an OpenTelemetry thread context of another schema: not read");
                }
                return None;
            }
            Err(crate::thread_context::Unreadable::Absent) => return None,
        };
        let found = self.find(Abi::ThreadContext, info, tgid, pending)?;
        self.thread_keys.insert(tgid, context.thread_keys);
        Some(found)
    }

    /// Takes a labels record the kernel sent; it waits for its snapshot.
    pub fn record(&mut self, record: &[u8]) {
        let Some(record) = read_record(record) else {
            self.counts.unmatched += 1;
            return;
        };
        if record.flags & (LABELS_CUT | LABELS_READ_FAILED) != 0 {
            tracing::debug!(tid = record.tid, flags = record.flags, "custom labels cut or partly unreadable");
        }
        let labels = record.labels.iter().take(record.count as usize).map(|label| {
            let key = label_name(&label.key[..(label.key_len as usize).min(label.key.len())]);
            let value: String = String::from_utf8_lossy(&label.value[..(label.value_len as usize).min(label.value.len())])
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            (key, value)
        });
        let labels: Vec<(String, String)> = labels.collect();
        self.note(record.tid, record.ts_ns, labels);
    }

    /// Takes a thread-context record the kernel sent: its trace and span ids and its
    /// attributes, named from the process's key map, become its labels. An index the
    /// map lacks (keys are appended as an SDK meets them) is dropped, and the process
    /// context read again.
    pub fn thread_context(&mut self, record: &[u8]) {
        let Some(context) = crate::thread_context::decode(record) else {
            self.counts.unmatched += 1;
            return;
        };
        let keys = self.thread_keys.get(&context.tgid);
        let mut labels: Vec<(String, String)> = Vec::with_capacity(2 + context.attributes.len());
        labels.extend(context.trace_id.map(|id| ("trace_id".to_owned(), id)));
        labels.extend(context.span_id.map(|id| ("span_id".to_owned(), id)));
        let mut unknown = false;
        for (index, value) in context.attributes {
            match keys.and_then(|keys| keys.get(index as usize)).filter(|key| !key.is_empty()) {
                Some(key) => labels.push((label_name(key.as_bytes()), value)),
                None => unknown = true,
            }
        }
        if unknown {
            self.counts.thread_keys_unknown += 1;
            if let Some(checked) = self.processes.get_mut(&context.tgid) {
                checked.pending = true;
            }
        }
        self.note(context.tid, context.ts_ns, labels);
    }

    /// Notes the labels of the snapshot (`tid`, `ts_ns`) to come: high-cardinality keys
    /// name its request, the others make its label set.
    fn note(&mut self, tid: u32, ts_ns: u64, labels: Vec<(String, String)>) {
        let mut set: Vec<(String, String)> = Vec::with_capacity(labels.len());
        // (rank among the high-cardinality keys, key, value)
        let mut request: Option<(usize, String, String)> = None;
        for (key, value) in labels {
            if key.is_empty() {
                continue;
            }
            if let Some(rank) = self.options.high_cardinality.iter().position(|k| *k == key) {
                self.counts.high_cardinality_dropped += 1;
                if request.as_ref().is_none_or(|(best, _, _)| rank < *best) {
                    request = Some((rank, key, value));
                }
                continue;
            }
            // The first label of a key wins.
            if !set.iter().any(|(k, _)| *k == key) {
                set.push((key, value));
            }
        }
        let request = match request {
            Some((_, key, value)) => {
                self.counts.requests += 1;
                self.sets.intern_request(Arc::new((key, value)))
            }
            None => 0,
        };
        if set.is_empty() && request == 0 {
            return;
        }
        set.sort();
        let id = match set.is_empty() {
            true => 0,
            false => match self.sets.intern(set.into()) {
                Some(id) => id,
                None => {
                    self.counts.sets_dropped += 1;
                    0
                }
            },
        };
        if self.waiting.len() >= MAX_WAITING && !self.waiting.contains_key(&tid) {
            self.counts.unmatched += self.waiting.len() as u64;
            self.waiting.clear();
        }
        if self.waiting.insert(tid, (ts_ns, id, request)).is_some() {
            self.counts.unmatched += 1;
        }
    }

    /// The label set id and request id of the snapshot (`tid`, `ts_ns`): 0 for none.
    pub fn take(&mut self, tid: u32, ts_ns: u64) -> (u32, u32) {
        match self.waiting.remove(&tid) {
            Some((ts, id, request)) if ts == ts_ns => (id, request),
            Some(_) => {
                self.counts.unmatched += 1;
                (0, 0)
            }
            None => (0, 0),
        }
    }

    /// Forgets processes that are gone, and takes them out of the kernel's map (4,096
    /// entries) so that exited processes do not fill it.
    pub fn evict(&mut self) {
        for (tgid, checked) in crate::process::remove_gone(&mut self.processes, |checked| &mut checked.seen_at) {
            self.thread_keys.remove(&tgid);
            if checked.published {
                (self.publish)(tgid, None);
            }
        }
    }
}

/// A labels record as the kernel sent it, cut after its `count` labels.
fn read_record(bytes: &[u8]) -> Option<LabelsRecord> {
    let u32_at = |at: usize| Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let count = (u32_at(offset_of!(LabelsRecord, count))? as usize).min(MAX_LABELS);
    if bytes.len() < LABELS_HEADER_BYTES + count * size_of::<Label>() {
        return None;
    }
    let mut whole = [0u8; size_of::<LabelsRecord>()];
    whole[..LABELS_HEADER_BYTES + count * size_of::<Label>()].copy_from_slice(&bytes[..LABELS_HEADER_BYTES + count * size_of::<Label>()]);
    // SAFETY: plain old data (all bit patterns valid), the buffer exactly as long; read
    // unaligned. Labels past `count` are zeros and never read.
    let mut record = unsafe { std::ptr::read_unaligned(whole.as_ptr() as *const LabelsRecord) };
    record.count = count as u32;
    Some(record)
}

/// A key as a profile label name: bytes outside `[A-Za-z0-9_./-]` (which the server
/// refuses) become `_`.
fn label_name(key: &[u8]) -> String {
    let name: String = key
        .iter()
        .map(|&b| if b.is_ascii_alphanumeric() || b"_./-".contains(&b) { b as char } else { '_' })
        .collect();
    debug_assert!(name.is_empty() || profiler_pprof::is_label_name(&name));
    name
}

/// The mapping of the process's main executable (the ABI's labels live there).
fn executable(info: &ProcessInfo) -> Option<&Mapping> {
    // Mappings carry the file's base name.
    let name = info.exe.rsplit('/').next().filter(|name| !name.is_empty())?;
    info.mappings.iter().find(|mapping| mapping.file.name == name)
}

/// How libraries reach their `custom_labels_current_set`, by (file, file offset of the
/// mapping): each library is parsed once, however many processes map it.
#[derive(Default)]
struct Libraries(HashMap<((u64, u64), u64, Abi), Option<Reference>>);

/// Libraries remembered at most; past it the cache starts over.
const MAX_LIBRARIES: usize = 4096;

/// Where a library's code finds its thread's `custom_labels_current_set`: words the
/// dynamic linker fills in when it loads the library, at these offsets from the start of
/// its mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reference {
    /// A TLS descriptor (`R_X86_64_TLSDESC`, what the ABI asks of a library, gcc's
    /// `-mtls-dialect=gnu2`): the resolver, then its argument.
    Descriptor(u64),
    /// The traditional general-dynamic argument of `__tls_get_addr` (gcc's default
    /// dialect), a `tls_index` in the GOT: the module id (`R_X86_64_DTPMOD64`), then the
    /// offset in its block (`R_X86_64_DTPOFF64`, or written at link time).
    TlsIndex(u64),
}

impl Libraries {
    /// The first library mapped by the process that exports `abi`'s thread-local, with
    /// the address of its reference in the process.
    fn find(&mut self, info: &ProcessInfo, abi: Abi) -> Option<Reference> {
        if self.0.len() >= MAX_LIBRARIES {
            self.0.clear();
        }
        info.mappings.iter().find_map(|mapping| {
            let from_mapping = *self
                .0
                .entry((mapping.file.id, mapping.file_offset, abi))
                .or_insert_with(|| reference_in_library(&mapping.file.handle_path, mapping.file_offset, abi));
            Some(match from_mapping? {
                Reference::Descriptor(at) => Reference::Descriptor(mapping.start.wrapping_add(at)),
                Reference::TlsIndex(at) => Reference::TlsIndex(mapping.start.wrapping_add(at)),
            })
        })
    }
}

impl Reference {
    /// The kernel's entry, read from the words the dynamic linker filled in (`self` holds
    /// their addresses in process `pid`). A descriptor resolved to static TLS (a library
    /// loaded at start, or `dlopen`ed into the room glibc keeps for that,
    /// `_dl_tlsdesc_return`) holds the variable's offset from the thread pointer, negative
    /// under variant II. One resolved to dynamic TLS (`_dl_tlsdesc_dynamic`) points to
    /// the module id and offset, which the kernel follows through the thread's dynamic
    /// thread vector, as the `__tls_get_addr` pair does. Anything else (not resolved
    /// yet) is None.
    fn resolved(&self, pid: u32) -> Option<LabelsProcess> {
        let word = |at: u64| crate::process::read_word(pid, at);
        match *self {
            Reference::Descriptor(at) => {
                let argument = word(at.wrapping_add(8))?;
                if (-(1i64 << 32)..0).contains(&(argument as i64)) {
                    return Some(LabelsProcess { tls_offset: argument, ..LabelsProcess::default() });
                }
                // struct tlsdesc_dynamic_arg: tls_index { ti_module, ti_offset }, gen_count.
                in_module(word(argument)?, word(argument.wrapping_add(8))?)
            }
            Reference::TlsIndex(at) => in_module(word(at)?, word(at.wrapping_add(8))?),
        }
    }
}

/// The kernel's entry for a variable at `offset` in the TLS block of `module`, if both
/// are believable (a lazy descriptor's argument, a relocation, reads as neither).
fn in_module(module: u64, offset: u64) -> Option<LabelsProcess> {
    ((1..=profiler_common::MAX_TLS_MODULE).contains(&module) && offset < 1 << 32)
        .then_some(LabelsProcess { tls_offset: offset, tls_module: module, ..LabelsProcess::default() })
}

/// How the library's code, from the start of its mapping at `file_offset`, reaches
/// `custom_labels_current_set`: None unless it exports ABI v1 and has a dynamic
/// relocation of it.
fn reference_in_library(path: &std::path::Path, file_offset: u64, abi: Abi) -> Option<Reference> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: as in `in_executable`.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let elf = object::File::parse(&map[..]).ok()?;
    let symbol_index = abi.symbol(&elf, path)?.index();
    let slot = |wanted: u32| {
        elf.dynamic_relocations()?.find_map(|(offset, relocation)| {
            let matches = matches!(relocation.flags(), object::RelocationFlags::Elf { r_type } if r_type == wanted)
                && relocation.target() == object::RelocationTarget::Symbol(symbol_index);
            matches.then_some(offset)
        })
    };
    let vaddr = crate::elf_layout::CodeSegments::of(&elf).virtual_address(file_offset)?;
    let from_mapping = |offset: u64| offset.wrapping_sub(vaddr);
    if let Some(descriptor) = slot(object::elf::R_X86_64_TLSDESC) {
        return Some(Reference::Descriptor(from_mapping(descriptor)));
    }
    slot(object::elf::R_X86_64_DTPMOD64).map(|index| Reference::TlsIndex(from_mapping(index)))
}

/// What a process publishes through a thread-local.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Abi {
    /// Custom labels, ABI v1: `custom_labels_current_set`.
    CustomLabels,
    /// OpenTelemetry's thread context: `otel_thread_ctx_v1` (see `thread_context`).
    ThreadContext,
}

impl Abi {
    fn format(self) -> u32 {
        match self {
            Abi::CustomLabels => profiler_common::LABELS_FORMAT_CUSTOM,
            Abi::ThreadContext => profiler_common::LABELS_FORMAT_OTEL,
        }
    }

    /// The ABI's thread-local symbol, if the binary exports it (custom labels: and ABI
    /// v1, its version read from the file, where it was linked). Both ABIs ask for
    /// dynamic symbols: the full symbol table of a large binary would cost every new
    /// process a scan of it.
    fn symbol<'data, 'file>(self, elf: &'file object::File<'data>, path: &std::path::Path) -> Option<object::Symbol<'data, 'file>> {
        let symbol = |name: &str| elf.dynamic_symbols().find(|s| s.name() == Ok(name));
        let variable = match self {
            Abi::CustomLabels if custom_labels_v1(elf, path, symbol("custom_labels_abi_version")?) => symbol("custom_labels_current_set")?,
            Abi::CustomLabels => return None,
            Abi::ThreadContext => symbol(crate::thread_context::SYMBOL)?,
        };
        (variable.kind() == object::SymbolKind::Tls).then_some(variable)
    }
}

/// Whether `version` (custom labels' `custom_labels_abi_version`) says ABI v1, as
/// read from the file, where it was linked.
fn custom_labels_v1(elf: &object::File<'_>, path: &std::path::Path, version: object::Symbol<'_, '_>) -> bool {
    let read = || {
        let section = elf.sections().find(|s| (s.address()..s.address() + s.size()).contains(&version.address()))?;
        let data = section.data().ok()?;
        let at = (version.address() - section.address()) as usize;
        Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
    };
    match read() {
        Some(1) => true,
        Some(version) => {
            tracing::info!(path = %path.display(), version, "custom labels of an ABI version other than 1: not read");
            false
        }
        None => false,
    }
}

/// The kernel's entry for an executable that exports `abi`'s thread-local: the offset
/// from a thread's `fsbase` to it.
fn in_executable(path: &std::path::Path, abi: Abi) -> Option<LabelsProcess> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: read-only; a file truncated while mapped reads as zeros (`mapped_files`),
    // which the ELF parser rejects like any malformed input.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let variable = abi.symbol(&object::File::parse(&map[..]).ok()?, path)?.address();
    let elf = ElfFile64::<object::Endianness>::parse(&map[..]).ok()?;
    let endian = elf.endian();
    let tls = elf.elf_program_headers().iter().find(|header| header.p_type(endian) == object::elf::PT_TLS)?;
    Some(LabelsProcess {
        format: abi.format(),
        _pad: 0,
        tls_offset: tls_offset(tls.p_memsz(endian), tls.p_align(endian), tls.p_vaddr(endian), variable),
        tls_module: 0,
    })
}

/// The offset from the thread pointer to a thread-local variable of the main executable
/// (at `symbol`, an offset in its TLS segment) under x86-64's TLS variant II: the
/// executable's block ends at the thread pointer, its start aligned as glibc's
/// `_dl_determine_tlsoffset` places the first module.
fn tls_offset(memsz: u64, align: u64, vaddr: u64, symbol: u64) -> u64 {
    let align = align.max(1);
    let firstbyte = vaddr.wrapping_neg() & (align - 1);
    let block = memsz.saturating_sub(firstbyte).div_ceil(align) * align + firstbyte;
    symbol.wrapping_sub(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The custom-labels crate's own C source (`src/customlabels.cpp`, `customlabels.h`).
    fn crate_sources() -> std::path::PathBuf {
        let metadata = std::process::Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--filter-platform", "x86_64-unknown-linux-gnu", "--manifest-path"])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/labels-app/Cargo.toml"))
            .output()
            .unwrap();
        let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).expect("cargo metadata");
        metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "custom-labels")
            .map(|p| std::path::PathBuf::from(p["manifest_path"].as_str().unwrap()).parent().unwrap().join("src"))
            .expect("the custom-labels crate (tests/labels-app depends on it)")
    }

    /// How a test program gets the library.
    #[derive(Clone, Copy, Debug)]
    enum Load {
        /// Linked, so loaded at start (static TLS).
        Linked,
        /// `dlopen`ed, with glibc's defaults (a small TLS block gets static TLS).
        Dlopen,
        /// `dlopen`ed with no room left for static TLS: the block is allocated per thread.
        DlopenDynamic,
    }

    /// Runs a program that uses `libcustomlabels.so` built with `dialect` (`gnu2`, TLS
    /// descriptors, as the library's Makefile builds it; `gnu`, `__tls_get_addr`, gcc's
    /// default) and loaded as `load`, and sets a label; returns what the reader published,
    /// the address of the program's thread's `custom_labels_current_set` that entry leads
    /// to when followed as the kernel follows it, and the variable's real address (and
    /// module id) as the program prints them.
    fn published_for(dialect: &str, load: Load) -> (LabelsProcess, Option<u64>, u64, u64) {
        let sources = crate_sources();
        let dir = tempfile::tempdir().unwrap();
        let library = dir.path().join("libcustomlabels.so");
        let built = std::process::Command::new("g++")
            .args(["-O2", "-ftls-model=global-dynamic", &format!("-mtls-dialect={dialect}"), "-fPIC", "-shared", "-o"])
            .arg(&library)
            .arg(sources.join("customlabels.cpp"))
            .status()
            .unwrap();
        assert!(built.success(), "building libcustomlabels.so");
        let app = dir.path().join("app");
        let mut build = std::process::Command::new("gcc");
        build
            .arg(format!("-I{}", sources.display()))
            .arg("-o")
            .arg(&app)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/labels-app/c/app.c"));
        if matches!(load, Load::Linked) {
            build.arg("-DLINKED").arg(format!("-L{}", dir.path().display())).arg(format!("-Wl,-rpath,{}", dir.path().display())).arg("-lcustomlabels");
        } else {
            build.arg("-ldl");
        }
        assert!(build.status().unwrap().success(), "building the app");
        let mut run = std::process::Command::new(&app);
        if !matches!(load, Load::Linked) {
            run.arg(&library);
        }
        if matches!(load, Load::DlopenDynamic) {
            run.env("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=0");
        }
        let mut child = run.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        let printed: Vec<u64> = line.split_whitespace().map(|word| word.parse().unwrap()).collect();
        let [thread_pointer, variable, module] = printed[..] else { panic!("the app printed {line:?}") };

        let (table, mut labels, published) = reader_of(child.id());
        labels.observe(child.id(), &table);
        let entry = {
            let published = published.lock().unwrap();
            assert_eq!(published.len(), 1, "published once: {published:?}");
            published[0].1.expect("an entry")
        };
        let followed = follow(child.id(), thread_pointer, entry);
        drop(child.stdin.take());
        child.wait().unwrap();
        assert_eq!(labels.counts.libraries_pending, 0);
        (entry, followed, variable, module)
    }

    /// The kernel's `labels_variable`, on the process's memory.
    fn follow(pid: u32, thread_pointer: u64, entry: LabelsProcess) -> Option<u64> {
        use profiler_common::{DTV_ENTRY_BYTES, DTV_OFFSET, DTV_UNALLOCATED};
        if entry.tls_module == 0 {
            return Some(thread_pointer.wrapping_add(entry.tls_offset));
        }
        let word = |at: u64| crate::process::read_word(pid, at);
        let dtv = word(thread_pointer + DTV_OFFSET)?;
        let room = word(dtv - DTV_ENTRY_BYTES)?;
        if entry.tls_module > room {
            return None;
        }
        let block = word(dtv + entry.tls_module * DTV_ENTRY_BYTES)?;
        (block != 0 && block != DTV_UNALLOCATED).then(|| block + entry.tls_offset)
    }

    /// The library built as its Makefile builds it (TLS descriptors) and linked: the
    /// resolved descriptor holds the variable's static offset from the thread pointer.
    #[test]
    fn a_linked_libcustomlabels_so_is_read_through_its_tls_descriptor() {
        let (entry, followed, variable, _) = published_for("gnu2", Load::Linked);
        assert_eq!(entry.tls_module, 0, "static TLS: {entry:?}");
        assert_eq!(followed, Some(variable), "the variable's address from the thread pointer: {entry:?}");
    }

    /// Loaded with `dlopen`: in glibc's room for static TLS by default (a static
    /// offset, as linked), or, once that room is gone, in a block of its own per thread
    /// (a dynamic descriptor: module id and offset, found through the dynamic thread
    /// vector); and built with gcc's default dialect, through `__tls_get_addr`'s GOT pair.
    #[test]
    fn a_dlopened_libcustomlabels_so_is_read_in_static_or_dynamic_tls() {
        let (entry, followed, variable, _) = published_for("gnu2", Load::Dlopen);
        assert_eq!(entry.tls_module, 0, "static TLS: {entry:?}");
        assert_eq!(followed, Some(variable), "dlopen, static TLS: {entry:?}");
        for dialect in ["gnu2", "gnu"] {
            let (entry, followed, variable, module) = published_for(dialect, Load::DlopenDynamic);
            assert!(module > 0, "dlinfo gave no module id");
            assert_eq!(entry.tls_module, module, "{dialect}: the library's module: {entry:?}");
            assert_eq!(followed, Some(variable), "{dialect}: the variable through the dynamic thread vector: {entry:?}");
        }
    }

    /// A service publishing OpenTelemetry's thread context (`tests/labels-app/c/otel.c`):
    /// its process context is read (schema, key map, resource attributes), and its
    /// executable's `otel_thread_ctx_v1` is published to the kernel as a thread context.
    #[test]
    fn an_opentelemetry_thread_context_is_found_with_its_key_map() {
        let dir = tempfile::tempdir().unwrap();
        let app = otel_app(dir.path());
        let mut child = std::process::Command::new(&app).args(["1", "5"]).stdout(std::process::Stdio::null()).spawn().unwrap();
        let pid = child.id();
        let context = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                crate::thread_context::process_context(pid).ok()
            })
            .expect("the process context");
        assert_eq!(context.thread_schema.as_deref(), Some("tls_v1"));
        assert_eq!(context.thread_keys, ["http_route"]);
        assert_eq!(context.attributes, [("service.name".to_owned(), "otel-app".to_owned())]);

        let (table, mut labels, published) = reader_of(pid);
        labels.observe(pid, &table);
        let _ = child.kill();
        child.wait().unwrap();
        let published = published.lock().unwrap();
        let entry = published.first().and_then(|(_, entry)| *entry).expect("published");
        assert_eq!((entry.format, entry.tls_module), (profiler_common::LABELS_FORMAT_OTEL, 0), "{entry:?}");
        assert_eq!(labels.thread_keys.get(&pid).map(Vec::as_slice), Some(&["http_route".to_owned()][..]));
    }

    /// What a reader told the kernel, in order.
    type Published = Arc<std::sync::Mutex<Vec<(u32, Option<LabelsProcess>)>>>;

    /// A table holding `pid` as it is now, and a reader whose entries for the kernel are
    /// kept in the list returned.
    fn reader_of(pid: u32) -> (ProcessTable, Labels, Published) {
        let table = ProcessTable::default();
        table.refresh(pid);
        let published = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = published.clone();
        let labels = Labels::new(LabelOptions::default(), LabelSets::default(), Box::new(move |pid, entry| sink.lock().unwrap().push((pid, entry))));
        (table, labels, published)
    }

    /// `tests/labels-app/c/otel.c`, built into `dir`.
    fn otel_app(dir: &std::path::Path) -> std::path::PathBuf {
        let app = dir.join("otel-app");
        let built = std::process::Command::new("gcc")
            .args(["-O2", "-pthread", "-Wl,--export-dynamic-symbol=otel_thread_ctx_v1", "-o"])
            .arg(&app)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/labels-app/c/otel.c"))
            .status()
            .unwrap();
        assert!(built.success(), "building otel.c");
        app
    }

    /// A process first looked at between its fork and its exec (its parent's mappings,
    /// no SDK there) is looked at again once the table has read its new image, not at
    /// the next recheck 2 s later: its service's first requests are labelled.
    #[test]
    fn an_exec_is_looked_at_before_the_next_recheck() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let app = otel_app(dir.path());
        // A shell stands for the forked child: it execs the app once told to.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line; exec \"$0\" 1 5"])
            .arg(&app)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (table, mut labels, published) = reader_of(pid);
        labels.observe(pid, &table);
        assert!(published.lock().unwrap().is_empty(), "the shell published something");

        let looked_at = std::time::Instant::now();
        writeln!(child.stdin.as_mut().unwrap()).unwrap();
        (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                crate::thread_context::process_context(pid).ok()
            })
            .expect("the app's process context");
        // What the unwinder does when a sample's address is in none of the known mappings.
        table.refresh(pid);
        labels.observe(pid, &table);
        let elapsed = looked_at.elapsed();
        let _ = child.kill();
        child.wait().unwrap();
        assert!(elapsed < RECHECK, "the exec took {elapsed:?}: the test proves nothing past the recheck");
        let published = published.lock().unwrap();
        assert!(published.first().is_some_and(|(_, entry)| entry.is_some()), "not found right after the exec: {published:?}");
    }

    /// Placements as glibc computes them (the end-to-end test reads a real one).
    #[test]
    fn tls_offsets_match_glibcs_placement() {
        // A block of 0x48 bytes aligned to 8 ends at the thread pointer: 0x48 below it.
        assert_eq!(tls_offset(0x48, 8, 0x3df0, 0x10) as i64, 0x10 - 0x48);
        // Rounded up to the alignment.
        assert_eq!(tls_offset(0x41, 64, 0x3dc0, 0) as i64, -0x80);
    }

    /// A record cut after its labels, as the kernel sends it, reads back whole; one
    /// shorter than its count says is refused.
    #[test]
    fn records_cut_after_their_labels_read_back() {
        let mut record: LabelsRecord = unsafe { std::mem::zeroed() };
        record.kind = profiler_common::EVENT_LABELS;
        record.tid = 7;
        record.ts_ns = 42;
        record.count = 2;
        for (label, (key, value)) in record.labels.iter_mut().zip([("endpoint", "checkout"), ("request_id", "r-1")]) {
            label.key[..key.len()].copy_from_slice(key.as_bytes());
            label.key_len = key.len() as u16;
            label.value[..value.len()].copy_from_slice(value.as_bytes());
            label.value_len = value.len() as u16;
        }
        let whole = unsafe { std::slice::from_raw_parts(&record as *const LabelsRecord as *const u8, size_of::<LabelsRecord>()) };
        let sent = &whole[..LABELS_HEADER_BYTES + 2 * size_of::<Label>()];
        let read = read_record(sent).unwrap();
        assert_eq!((read.tid, read.ts_ns, read.count), (7, 42, 2));
        assert_eq!(&read.labels[1].value[..read.labels[1].value_len as usize], b"r-1");
        assert!(read_record(&sent[..sent.len() - 1]).is_none());

        let sets = LabelSets::default();
        let mut labels = Labels::new(LabelOptions::default(), sets.clone(), Box::new(|_, _| {}));
        labels.record(sent);
        let (id, request) = labels.take(7, 42);
        // request_id is high-cardinality: only the endpoint is a label, the id names
        // the request.
        assert_eq!(sets.get(id).as_deref(), Some(&[("endpoint".to_string(), "checkout".to_string())][..]));
        assert_eq!(labels.counts.high_cardinality_dropped, 1);
        assert_eq!(sets.request(request).as_deref(), Some(&("request_id".to_string(), "r-1".to_string())));
    }

    /// Ids of requests two generations old resolve to nothing, never to a newer
    /// request; the previous generation's still resolve.
    #[test]
    fn request_ids_never_resolve_to_another_request() {
        let sets = LabelSets::default();
        let request = |i: usize| Arc::new(("request_id".to_string(), i.to_string()));
        let first = sets.intern_request(request(0));
        assert_eq!(sets.intern_request(request(0)), first);
        for i in 1..REQUESTS_PER_GENERATION + 1 {
            sets.intern_request(request(i));
        }
        // One generation later: still there.
        assert_eq!(sets.request(first), Some(request(0)));
        let again = sets.intern_request(request(0));
        assert_ne!(again, first, "interned anew in the current generation");
        for i in 0..REQUESTS_PER_GENERATION {
            sets.intern_request(request(REQUESTS_PER_GENERATION + 1 + i));
        }
        assert_eq!(sets.request(first), None, "two generations old");
        assert_eq!(sets.request(0), None);
    }

    #[test]
    fn label_sets_intern_once() {
        let sets = LabelSets::default();
        let a: LabelSet = vec![("endpoint".to_string(), "checkout".to_string())].into();
        let id = sets.intern(a.clone()).unwrap();
        assert_eq!(sets.intern(a.clone()), Some(id));
        assert_eq!(sets.get(id).as_deref(), Some(&a[..]));
        assert_eq!(sets.get(0), None);
    }
}
