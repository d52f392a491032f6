//! Finding a process's CPython: the binary that holds the interpreter (`python3.X`, or
//! `libpython3.X.so` in an embedding), its version, and the addresses the kernel and the
//! agent start from, from that binary's dynamic symbols and the process's mappings.

use std::os::unix::fs::MetadataExt as _;

use object::{Object as _, ObjectSymbol as _};

use super::{
    debug_offsets::{self, Refused},
    layout::{self, Layout, Version},
};
use crate::{
    elf_layout::CodeSegments,
    process::{read_memory, ProcessInfo},
};

/// What the agent knows of one process's interpreter.
#[derive(Clone, Debug)]
pub struct Interpreter {
    pub version: Version,
    pub layout: Layout,
    /// `_PyRuntime`'s address in the process.
    pub runtime: u64,
    /// `PyCode_Type`'s address: a code object's `ob_type`.
    pub code_type: u64,
    /// Where `_PyEval_EvalFrameDefault`'s code lies (its symbol, and the part the
    /// compiler split off it, if any: [`eval_loop`]): each native frame in it ran a run of
    /// Python frames.
    pub eval: Vec<std::ops::Range<u64>>,
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
    let eval = eval_loop(&elf, eval)
        .into_iter()
        .map(|range| bias.wrapping_add(range.start)..bias.wrapping_add(range.end))
        .collect();
    Ok(Interpreter {
        version,
        layout,
        described,
        runtime,
        code_type: bias.wrapping_add(code_type.0),
        eval,
        text: mapping.start..mapping.end,
        pid_ns: pid_namespace(pid),
    })
}

/// An eval loop's symbol shorter than this is not the whole loop (CPython's are
/// 50 to 200 KiB).
const SPLIT_LOOP_BELOW: u64 = 16 << 10;

/// Where the eval loop's code lies, as addresses of the binary: its symbol's range
/// (`(address, size)`), and, when the symbol is too short to hold the loop, the function
/// body its jumps lead into (the compiler partitioned the loop and put its bulk in
/// another section, with no symbol: Debian's 3.14 exports a 1,184-byte
/// `_PyEval_EvalFrameDefault` that jumps into an 84 KiB part). That part is the unwind
/// entry (`.eh_frame`) of at least [`SPLIT_LOOP_BELOW`] bytes that most of the symbol's
/// direct jumps land in, two at least. Both parts share one stack frame, so a native
/// call of the loop has one frame in either.
fn eval_loop(elf: &object::File, (address, size): (u64, u64)) -> Vec<std::ops::Range<u64>> {
    use object::ObjectSection as _;
    let mut ranges = vec![address..address + size.max(1)];
    if size >= SPLIT_LOOP_BELOW {
        return ranges;
    }
    let Some(code) = elf
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&address))
        .and_then(|s| Some(s.data().ok()?.get((address - s.address()) as usize..)?.get(..size as usize)?.to_vec()))
    else {
        return ranges;
    };
    let targets = jump_targets(address, &code);
    let Some(entries) = unwind_entries(elf) else { return ranges };
    let mut hits: std::collections::HashMap<(u64, u64), usize> = std::collections::HashMap::new();
    for target in targets.into_iter().filter(|t| !ranges[0].contains(t)) {
        if let Some(&entry) = entries.iter().find(|(start, len)| (*start..start + len).contains(&target)) {
            *hits.entry(entry).or_default() += 1;
        }
    }
    if let Some(((start, len), _)) = hits.into_iter().filter(|&((_, len), n)| len >= SPLIT_LOOP_BELOW && n >= 2).max_by_key(|&(entry, n)| (n, entry)) {
        ranges.push(start..start + len);
    }
    ranges
}

/// Targets of the direct near jumps (`jmp rel32`, `jcc rel32`) in x86-64 `code` at
/// `address`, read at every byte: a false one from the middle of another instruction is
/// weeded out by the unwind entries it must land in.
fn jump_targets(address: u64, code: &[u8]) -> Vec<u64> {
    let rel32 = |at: usize| code.get(at..at + 4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64);
    let mut targets = Vec::new();
    for i in 0..code.len() {
        let (len, rel) = match code[i] {
            0xe9 => (5, rel32(i + 1)),
            0x0f if code.get(i + 1).is_some_and(|b| (0x80..=0x8f).contains(b)) => (6, rel32(i + 2)),
            _ => continue,
        };
        if let Some(rel) = rel {
            targets.push((address as i64 + i as i64 + len + rel) as u64);
        }
    }
    targets
}

/// `(start, length)` of every function's unwind entry in `.eh_frame`.
fn unwind_entries(elf: &object::File) -> Option<Vec<(u64, u64)>> {
    use gimli::UnwindSection as _;
    use object::ObjectSection as _;
    let section = elf.section_by_name(".eh_frame")?;
    let data = section.data().ok()?;
    let eh_frame = gimli::EhFrame::new(data, gimli::LittleEndian);
    let mut bases = gimli::BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = elf.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    let mut entries = eh_frame.entries(&bases);
    let mut found = Vec::new();
    while let Ok(Some(entry)) = entries.next() {
        if let gimli::CieOrFde::Fde(partial) = entry {
            if let Ok(fde) = partial.parse(gimli::EhFrame::cie_from_offset) {
                found.push((fde.initial_address(), fde.len()));
            }
        }
    }
    Some(found)
}

/// The process's pid namespace when it differs from the agent's: thread states hold
/// thread ids as the process sees them.
fn pid_namespace(pid: u32) -> Option<(u64, u64)> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (theirs.ino() != ours.ino() || theirs.dev() != ours.dev()).then(|| (theirs.dev(), theirs.ino()))
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSymbol as _};

    /// A function whose bulk gcc partitions off into a `.cold` part of its own (three
    /// branches that end in a call of a cold function, 35 KiB of code): the loop's range is its symbol and that part,
    /// found from the symbol's jumps and the part's unwind entry, as with Debian's 3.14.
    #[test]
    fn an_eval_loop_split_by_the_compiler_is_found_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = String::from("volatile long sink;\n__attribute__((cold, noinline)) void rare(void) { sink = 0; }\n__attribute__((noinline)) long eval(long x) {\n");
        for branch in 0..3 {
            source.push_str(&format!("  if (x == {branch}) {{\n"));
            for i in 0..700 {
                source.push_str(&format!("    sink = sink * 3 + {};\n", branch * 1000 + i));
            }
            source.push_str("    rare();\n  }\n");
        }
        source.push_str("  return x + 1;\n}\n");
        std::fs::write(dir.path().join("loop.c"), source).unwrap();
        let library = dir.path().join("libloop.so");
        let status = std::process::Command::new("gcc")
            .args(["-O2", "-shared", "-fPIC", "-o"])
            .arg(&library)
            .arg(dir.path().join("loop.c"))
            .status()
            .unwrap();
        assert!(status.success());
        let data = std::fs::read(&library).unwrap();
        let elf = object::File::parse(&data[..]).unwrap();
        let symbol = |name: &str| elf.symbols().find(|s| s.name() == Ok(name)).map(|s| (s.address(), s.size())).unwrap_or_else(|| panic!("{name} in the test library"));
        let (eval, cold) = (symbol("eval"), symbol("eval.cold"));
        assert!(eval.1 < super::SPLIT_LOOP_BELOW && cold.1 >= super::SPLIT_LOOP_BELOW, "gcc split it as expected: {eval:?} {cold:?}");
        let ranges = super::eval_loop(&elf, eval);
        assert_eq!(ranges.len(), 2, "{ranges:x?}");
        assert_eq!(ranges[0], eval.0..eval.0 + eval.1);
        assert!(ranges[1].contains(&cold.0) && ranges[1].contains(&(cold.0 + cold.1 - 1)), "{ranges:x?} against the cold part {cold:x?}");
        // A whole loop is left as its symbol says.
        assert_eq!(super::eval_loop(&elf, cold), vec![cold.0..cold.0 + cold.1]);
    }
}
