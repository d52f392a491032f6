//! Unwind stage: turns a stack snapshot (user registers plus a copy of the top of the user
//! stack, taken by the BPF programs) into a leaf-first list of return addresses.
//!
//! Rules come from each mapped binary's `.eh_frame` (and `.debug_frame` when present),
//! read by framehop, the unwinder of samply. Code without unwind info (JIT code, hand
//! written assembly) falls back to its frame-pointer chain. Binaries are memory-mapped
//! once per (device, inode) and shared by every process that maps them; the maps are
//! file-backed, so their pages can be reclaimed, and both caches are bounded.

use std::{
    collections::HashMap,
    fs::File,
    ops::{Deref, Range},
    sync::Arc,
    time::{Duration, Instant},
};

use framehop::{
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
    ExplicitModuleSectionInfo, Module, Unwinder as _,
};
use memmap2::Mmap;
use object::{Object as _, ObjectSection as _};
use profiler_common::MAX_STACK_DEPTH;

use crate::{
    elf_layout::CodeSegments,
    process::{Mapping, ProcessInfo, ProcessTable},
};

/// Binaries kept mapped with their unwind sections located.
const MAX_BINARIES: usize = 256;
/// Processes whose module list is kept ready.
const MAX_PROCESSES: usize = 1024;
/// A process whose instruction pointer falls outside every known mapping (dlopen, JIT)
/// is re-read at most this often.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How far an unwind got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Reached the outermost frame, reading this many bytes of the stack copy.
    Complete { stack_bytes: u64 },
    /// Stopped early: a frame had no usable rule, or the stack was deeper than allowed.
    Truncated,
    /// Stopped where the stack copy ended: the copy was too short for this stack.
    CopyTooShort,
    /// Not a user stack (kernel thread) or nothing was copied.
    Empty,
}

/// A slice of a memory-mapped binary, shared by every module that uses it.
#[derive(Clone)]
pub struct Section {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl Deref for Section {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// What framehop needs of one binary, located once.
struct Binary {
    sections: ExplicitModuleSectionInfo<Section>,
    segments: CodeSegments,
    last_used: Instant,
}

impl Binary {
    fn open(mapping: &Mapping) -> Option<Self> {
        let file = File::open(&mapping.file.handle_path).ok()?;
        // SAFETY: the mapping is read-only; a binary rewritten in place while mapped
        // (which the loader also forbids) could only make unwinding wrong, not unsound
        // for framehop, which treats all input as untrusted.
        let map = Arc::new(unsafe { Mmap::map(&file) }.ok()?);
        let elf = object::File::parse(&map[..]).ok()?;
        let section = |name: &str| -> Option<(Section, Range<u64>)> {
            let section = elf.section_by_name(name)?;
            let (offset, size) = section.file_range()?;
            let range = usize::try_from(offset).ok()?..usize::try_from(offset.checked_add(size)?).ok()?;
            let svma = section.address()..section.address().checked_add(section.size())?;
            (range.end <= map.len()).then(|| (Section { map: map.clone(), range }, svma))
        };
        let text_svma = section(".text").map(|(_, svma)| svma);
        let (eh_frame, eh_frame_svma) = section(".eh_frame").unzip();
        let (eh_frame_hdr, eh_frame_hdr_svma) = section(".eh_frame_hdr").unzip();
        let got_svma = section(".got").map(|(_, svma)| svma);
        let debug_frame = section(".debug_frame").map(|(data, _)| data);
        let segments = CodeSegments::of(&elf);
        Some(Self {
            sections: ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma,
                // Without the code bytes framehop cannot analyse prologues, which CFI from
                // gcc, clang and rustc describes anyway; mapping them would add every
                // sampled code page to the agent's resident memory.
                text: None,
                got_svma,
                eh_frame_svma,
                eh_frame,
                eh_frame_hdr_svma,
                eh_frame_hdr,
                debug_frame,
                stubs_svma: None,
                stub_helper_svma: None,
                unwind_info: None,
                text_segment_svma: None,
                text_segment: None,
            },
            segments,
            last_used: Instant::now(),
        })
    }

    /// The address the binary's virtual address 0 is loaded at, in a process that maps
    /// `mapping` of it.
    fn base_avma(&self, mapping: &Mapping) -> Option<u64> {
        mapping.start.checked_sub(self.segments.virtual_address(mapping.file_offset)?)
    }
}

struct ProcessModules {
    mappings: Arc<[Mapping]>,
    unwinder: UnwinderX86_64<Section>,
    refreshed: Instant,
    last_used: Instant,
}

/// Counters of one unwinder since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindCounts {
    pub complete: u64,
    pub truncated: u64,
    /// Binaries whose unwind sections could not be read (not ELF, unreadable).
    pub binaries_unreadable: u64,
}

impl UnwindCounts {
    pub fn add(&mut self, other: &UnwindCounts) {
        self.complete += other.complete;
        self.truncated += other.truncated;
        self.binaries_unreadable += other.binaries_unreadable;
    }

    pub fn since(&self, earlier: &UnwindCounts) -> UnwindCounts {
        UnwindCounts {
            complete: self.complete - earlier.complete,
            truncated: self.truncated - earlier.truncated,
            binaries_unreadable: self.binaries_unreadable - earlier.binaries_unreadable,
        }
    }
}

pub struct Unwinder {
    processes: ProcessTable,
    binaries: HashMap<(u64, u64), Option<Binary>>,
    modules: HashMap<u32, ProcessModules>,
    cache: CacheX86_64,
    pub counts: UnwindCounts,
}

impl Unwinder {
    pub fn new(processes: ProcessTable) -> Self {
        Self {
            processes,
            binaries: HashMap::new(),
            modules: HashMap::new(),
            cache: CacheX86_64::new(),
            counts: UnwindCounts::default(),
        }
    }

    /// Unwinds one snapshot. `stack` is the copy of user memory starting at `sp`.
    pub fn unwind(
        &mut self,
        tgid: u32,
        ip: u64,
        sp: u64,
        bp: u64,
        stack: &[u8],
    ) -> (Vec<u64>, Outcome) {
        if ip == 0 {
            return (Vec::new(), Outcome::Empty);
        }
        let mut highest_read = sp;
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            highest_read = highest_read.max(addr.saturating_add(8));
            let offset = addr.checked_sub(sp).ok_or(())? as usize;
            let bytes = stack
                .get(offset..offset.checked_add(8).ok_or(())?)
                .ok_or(())?;
            Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
        };
        if !self.prepare_modules(tgid, ip) {
            self.counts.truncated += 1;
            return (vec![ip], Outcome::Truncated);
        }
        let modules = &self.modules[&tgid];
        let mut frames = Vec::with_capacity(32);
        let mut iter = modules.unwinder.iter_frames(
            ip,
            UnwindRegsX86_64::new(ip, sp, bp),
            &mut self.cache,
            &mut read_stack,
        );
        let outcome = loop {
            match iter.next() {
                Ok(Some(frame)) => {
                    frames.push(frame.address());
                    if frames.len() >= MAX_STACK_DEPTH {
                        break Outcome::Truncated;
                    }
                }
                Ok(None) => break Outcome::Complete { stack_bytes: 0 },
                Err(framehop::Error::CouldNotReadStack(addr)) if addr >= sp.saturating_add(stack.len() as u64) => {
                    break Outcome::CopyTooShort;
                }
                Err(_) => break Outcome::Truncated,
            }
        };
        let outcome = match outcome {
            Outcome::Complete { .. } => Outcome::Complete { stack_bytes: highest_read - sp },
            other => other,
        };
        match outcome {
            Outcome::Complete { .. } => self.counts.complete += 1,
            _ => self.counts.truncated += 1,
        }
        (frames, outcome)
    }

    /// Makes the process's module list ready, rebuilt when its mappings changed. Re-reads
    /// the process when `ip` is outside every known mapping (a library loaded since the
    /// last look). False when the process is unknown.
    fn prepare_modules(&mut self, tgid: u32, ip: u64) -> bool {
        let now = Instant::now();
        let stale = match self.modules.get(&tgid) {
            None => true,
            Some(modules) => {
                !modules
                    .mappings
                    .iter()
                    .any(|m| (m.start..m.end).contains(&ip))
                    && now.duration_since(modules.refreshed) > REFRESH_INTERVAL
            }
        };
        if stale {
            let known = self
                .processes
                .get(tgid)
                .filter(|info| info.mapping_for(ip).is_some());
            let info = match known {
                Some(info) => Some(info),
                None => {
                    self.processes.refresh(tgid);
                    self.processes.get(tgid)
                }
            };
            let rebuild = match (&info, self.modules.get(&tgid)) {
                (Some(info), Some(modules)) => !Arc::ptr_eq(&info.mappings, &modules.mappings),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if rebuild {
                let info = info.expect("checked above");
                let unwinder = self.build(&info);
                self.evict_processes();
                self.modules.insert(
                    tgid,
                    ProcessModules {
                        mappings: info.mappings.clone(),
                        unwinder,
                        refreshed: now,
                        last_used: now,
                    },
                );
            } else if let Some(modules) = self.modules.get_mut(&tgid) {
                modules.refreshed = now;
            }
        }
        let Some(modules) = self.modules.get_mut(&tgid) else {
            return false;
        };
        modules.last_used = now;
        true
    }

    fn build(&mut self, info: &ProcessInfo) -> UnwinderX86_64<Section> {
        let mut unwinder = UnwinderX86_64::new();
        for mapping in info.mappings.iter() {
            let id = mapping.file.id;
            if !self.binaries.contains_key(&id) {
                self.evict_binaries();
                let binary = Binary::open(mapping);
                if binary.is_none() {
                    self.counts.binaries_unreadable += 1;
                }
                self.binaries.insert(id, binary);
            }
            let Some(Some(binary)) = self.binaries.get_mut(&id) else {
                continue;
            };
            binary.last_used = Instant::now();
            let Some(base_avma) = binary.base_avma(mapping) else {
                continue;
            };
            unwinder.add_module(Module::new(
                mapping.file.name.clone(),
                mapping.start..mapping.end,
                base_avma,
                binary.sections.clone(),
            ));
        }
        // framehop keys its rule cache by a 16-bit module-set generation that wraps; a
        // fresh cache per new module set can never apply one process's rules to another.
        self.cache = CacheX86_64::new();
        unwinder
    }

    fn evict_binaries(&mut self) {
        if self.binaries.len() < MAX_BINARIES {
            return;
        }
        // Modules of live unwinders hold their own references, so dropping an entry here
        // only unmaps binaries nobody uses any more.
        let mut by_age: Vec<((u64, u64), Instant)> = self
            .binaries
            .iter()
            .map(|(id, binary)| {
                (
                    *id,
                    binary
                        .as_ref()
                        .map_or(Instant::now() - Duration::from_secs(3600), |b| b.last_used),
                )
            })
            .collect();
        by_age.sort_by_key(|(_, used)| *used);
        for (id, _) in by_age.into_iter().take(MAX_BINARIES / 4) {
            self.binaries.remove(&id);
        }
    }

    fn evict_processes(&mut self) {
        if self.modules.len() < MAX_PROCESSES {
            return;
        }
        let mut by_age: Vec<(u32, Instant)> = self
            .modules
            .iter()
            .map(|(pid, m)| (*pid, m.last_used))
            .collect();
        by_age.sort_by_key(|(_, used)| *used);
        for (pid, _) in by_age.into_iter().take(MAX_PROCESSES / 4) {
            self.modules.remove(&pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registers and stack of this very thread, as the BPF programs would copy them.
    /// Read through `process_vm_readv`, which stops at the end of the stack mapping
    /// instead of faulting.
    #[inline(never)]
    fn snapshot_here() -> (u64, u64, u64, Vec<u8>) {
        let (ip, sp, bp): (u64, u64, u64);
        unsafe {
            std::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp", ip = out(reg) ip, sp = out(reg) sp, bp = out(reg) bp);
        }
        let mut stack = vec![0u8; profiler_common::MAX_USER_STACK];
        let mut copied = 0;
        for chunk in stack.chunks_mut(profiler_common::USER_STACK_CHUNK) {
            let local = libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() };
            let remote = libc::iovec { iov_base: (sp as usize + copied) as *mut _, iov_len: chunk.len() };
            let read = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
            if read != chunk.len() as isize {
                break;
            }
            copied += chunk.len();
        }
        stack.truncate(copied);
        (ip, sp, bp, stack)
    }

    #[inline(never)]
    fn middle() -> (u64, u64, u64, Vec<u8>) {
        std::hint::black_box(snapshot_here())
    }

    #[inline(never)]
    fn outer() -> (u64, u64, u64, Vec<u8>) {
        std::hint::black_box(middle())
    }

    #[test]
    fn unwinds_this_thread_through_its_callers_to_the_root() {
        let (ip, sp, bp, stack) = std::thread::spawn(outer).join().unwrap();
        let mut unwinder = Unwinder::new(ProcessTable::default());
        let (frames, outcome) = unwinder.unwind(std::process::id(), ip, sp, bp, &stack);
        // Each address belongs to the nearest of these functions that starts below it.
        let functions = [("snapshot_here", snapshot_here as *const () as u64), ("middle", middle as *const () as u64), ("outer", outer as *const () as u64)];
        let owner = |addr: u64| functions.iter().filter(|(_, start)| (*start..start + 4096).contains(&addr)).max_by_key(|(_, start)| *start).map(|(name, _)| *name);
        let names: Vec<Option<&str>> = frames.iter().take(3).map(|&addr| owner(addr)).collect();
        assert_eq!(names, [Some("snapshot_here"), Some("middle"), Some("outer")], "{frames:x?}");
        assert!(matches!(outcome, Outcome::Complete { stack_bytes } if stack_bytes > 0), "{outcome:?}");
        assert_eq!(unwinder.counts.complete, 1);
    }

    #[test]
    fn a_copy_too_short_is_told_apart() {
        let (ip, sp, bp, stack) = std::thread::spawn(outer).join().unwrap();
        let mut unwinder = Unwinder::new(ProcessTable::default());
        let (_, outcome) = unwinder.unwind(std::process::id(), ip, sp, bp, &stack[..64]);
        assert_eq!(outcome, Outcome::CopyTooShort);
        let (frames, outcome) = unwinder.unwind(std::process::id(), 0, 0, 0, &[]);
        assert_eq!((frames.len(), outcome), (0, Outcome::Empty));
    }
}
