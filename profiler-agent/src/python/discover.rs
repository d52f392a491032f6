//! Finding a process's CPython: the binary that holds the interpreter (`python3.X`, or
//! `libpython3.X.so` in an embedding), its version, and the addresses the kernel and the
//! agent start from, from that binary's dynamic symbols and the process's mappings.

use std::os::unix::fs::MetadataExt as _;

use object::{Object as _, ObjectSymbol as _};

use super::{
    code::read_memory,
    debug_offsets::{self, Refused},
    layout::{self, Layout, Version},
};
use crate::{elf_layout::CodeSegments, process::ProcessInfo};

/// What the agent knows of one process's interpreter.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub version: Version,
    pub layout: Layout,
    /// `_PyRuntime`'s address in the process.
    pub runtime: u64,
    /// `PyCode_Type`'s address: a code object's `ob_type`.
    pub code_type: u64,
    /// Where `_PyEval_EvalFrameDefault`'s code lies: each native frame in it ran a run of
    /// Python frames.
    pub eval: std::ops::Range<u64>,
    /// The interpreter binary's code: its frames between two Python frames are its call
    /// machinery.
    pub text: std::ops::Range<u64>,
    /// (device, inode) of the process's pid namespace when it is not the agent's.
    pub pid_ns: Option<(u64, u64)>,
    /// For a version that describes itself (`_Py_DebugOffsets`, 3.13+): the fields whose
    /// description differed from the table, and were taken from it.
    pub described: Option<Vec<&'static str>>,
}

/// Why a process's Python frames cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub enum NotReadable {
    /// No interpreter binary is mapped: not a Python process.
    NotPython,
    /// A CPython whose layout the agent does not have.
    UnknownVersion(Version),
    /// The binary lacks the symbols the walk starts from, or could not be read.
    NoSymbols,
    /// Its description of itself (`_Py_DebugOffsets`) is missing or does not hold.
    BadDescription(Version, Refused),
}

/// Looks for a CPython in process `pid` from its snapshot.
pub fn find(pid: u32, info: &ProcessInfo) -> Result<Interpreter, NotReadable> {
    let mut result = Err(NotReadable::NotPython);
    for mapping in info.mappings.iter() {
        let Some(named) = layout::version_from_file_name(&mapping.file.name) else { continue };
        let found = in_binary(pid, mapping, named);
        // A libpython mapped by a `python3.X` launcher: the library has the runtime.
        if found.is_ok() {
            return found;
        }
        if matches!(result, Err(NotReadable::NotPython)) {
            result = found;
        }
    }
    result
}

fn in_binary(pid: u32, mapping: &crate::process::Mapping, named: Version) -> Result<Interpreter, NotReadable> {
    let file = std::fs::File::open(&mapping.file.handle_path).map_err(|_| NotReadable::NoSymbols)?;
    // SAFETY: read-only; a file truncated while mapped reads as zeros (`mapped_files`),
    // which the ELF parser rejects like any malformed input.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|_| NotReadable::NoSymbols)?;
    let elf = object::File::parse(&map[..]).map_err(|_| NotReadable::NoSymbols)?;
    let symbol = |name: &str| elf.dynamic_symbols().find(|s| s.name() == Ok(name)).map(|s| (s.address(), s.size()));
    let vaddr = CodeSegments::of(&elf).virtual_address(mapping.file_offset).ok_or(NotReadable::NoSymbols)?;
    let bias = mapping.start.wrapping_sub(vaddr);
    let (Some(runtime), Some(eval), Some(code_type)) =
        (symbol("_PyRuntime"), symbol("_PyEval_EvalFrameDefault"), symbol("PyCode_Type"))
    else {
        return Err(NotReadable::NoSymbols);
    };
    // 3.11+ says its version in `Py_Version`; the file name is the fallback.
    let version = symbol("Py_Version")
        .and_then(|(addr, _)| {
            let mut hex = [0u8; 4];
            read_memory(pid, bias.wrapping_add(addr), &mut hex).then(|| layout::version_from_hex(u32::from_le_bytes(hex)))
        })
        .unwrap_or(named);
    let table = layout::for_version(version).ok_or(NotReadable::UnknownVersion(version))?;
    let runtime = bias.wrapping_add(runtime.0);
    // `_Py_DebugOffsets` starts `_PyRuntime`: its values over the table's.
    let (layout, described) = match debug_offsets::bytes_for(version) {
        None => (table, None),
        Some(bytes) => {
            let mut raw = vec![0u8; bytes];
            if !read_memory(pid, runtime, &mut raw) {
                return Err(NotReadable::NoSymbols);
            }
            let (layout, differed) = debug_offsets::apply(version, &table, &raw).map_err(|refused| NotReadable::BadDescription(version, refused))?;
            (layout, Some(differed))
        }
    };
    let eval_start = bias.wrapping_add(eval.0);
    Ok(Interpreter {
        version,
        layout,
        described,
        runtime,
        code_type: bias.wrapping_add(code_type.0),
        eval: eval_start..eval_start + eval.1.max(1),
        text: mapping.start..mapping.end,
        pid_ns: pid_namespace(pid),
    })
}

/// The process's pid namespace when it differs from the agent's: thread states hold
/// thread ids as the process sees them.
fn pid_namespace(pid: u32) -> Option<(u64, u64)> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (theirs.ino() != ours.ino() || theirs.dev() != ours.dev()).then(|| (theirs.dev(), theirs.ino()))
}
