//! Where each CPython version keeps what the profiler reads: the structures the kernel
//! walks (thread states, frames) and those the agent decodes (code objects, strings,
//! bytes). Offsets are for 64-bit builds without `Py_DEBUG`, from CPython's headers of
//! each version (`Include/internal/pycore_frame.h`, `pycore_interp.h`,
//! `pycore_runtime.h`, `Include/cpython/pystate.h`, `code.h`, `unicodeobject.h`), and
//! for the versions a test can run here, checked against the live interpreter (see the
//! tests at the end).

use profiler_common::{PythonLayout, PYTHON_NO_FIELD};

// A layout's thread-state read must fit the kernel's buffer.
const _: () = {
    let mut i = 0;
    while i < LAYOUTS.len() {
        assert!(LAYOUTS[i].kernel.tstate_bytes as usize <= profiler_common::PYTHON_TSTATE_BYTES);
        i += 1;
    }
};
const LAYOUTS: [Layout; 7] = [V3_8, V3_9, V3_10, V3_11, V3_12, V3_13, V3_14];

/// A CPython version, major and minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// How a code object maps instructions to lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTable {
    /// `co_lnotab` (3.8, 3.9): (bytes, lines) increments.
    Lnotab,
    /// `co_linetable` of 3.10 (PEP 626): (bytes, lines) increments, -128 lines for none.
    Ranges,
    /// `co_linetable` from 3.11 (PEP 657): locations with columns, in code units.
    Locations,
}

/// What the agent reads of a code object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub ob_type: usize,
    pub filename: usize,
    /// `co_qualname`, or `co_name` before 3.11, which has no qualified name.
    pub qualname: usize,
    /// `co_linetable`, or `co_lnotab` before 3.10; read as `lines` says.
    pub linetable: usize,
    pub lines: LineTable,
    pub first_line: usize,
    /// Start of the bytecode: instruction pointers are counted from here (3.11+; before,
    /// frames hold an offset into it).
    pub code: usize,
    /// Bytes read from the code object's start: every field above lies within them.
    pub header: usize,
}

/// What the agent reads of `str` and `bytes` objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectLayout {
    /// `PyASCIIObject::length`.
    pub str_length: usize,
    /// `PyASCIIObject::state`: bits of interned, kind, compact, ascii.
    pub str_state: usize,
    /// Where the characters of a compact ASCII string begin...
    pub str_ascii_data: usize,
    /// ...and those of a compact non-ASCII one.
    pub str_compact_data: usize,
    /// Bit positions of `kind` (3 bits), `compact` and `ascii` in `state`.
    pub state_kind_shift: u32,
    pub state_compact_bit: u32,
    pub state_ascii_bit: u32,
    /// `PyVarObject::ob_size` of a `bytes` object...
    pub bytes_size: usize,
    /// ...and where its bytes begin.
    pub bytes_data: usize,
}

/// Everything version-specific about reading one CPython.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub kernel: PythonLayout,
    /// Offset of `interpreters.head` in `_PyRuntime`.
    pub runtime_interpreters_head: u64,
    pub code: CodeLayout,
    pub objects: ObjectLayout,
}

/// The layout of `version`, or None for a version the agent cannot read: its processes
/// keep their native stacks, and are counted.
pub fn for_version(version: Version) -> Option<Layout> {
    match (version.major, version.minor) {
        (3, 8) => Some(V3_8),
        (3, 9) => Some(V3_9),
        (3, 10) => Some(V3_10),
        (3, 11) => Some(V3_11),
        (3, 12) => Some(V3_12),
        (3, 13) => Some(V3_13),
        (3, 14) => Some(V3_14),
        _ => None,
    }
}

/// CPython 3.8: frames are `PyFrameObject`s linked by `f_back`, each run by a native call
/// of the eval loop of its own; `f_lasti` is a byte offset into the bytecode, lines come
/// from `co_lnotab`, and thread states know their thread by `pthread_self()`.
const V3_8: Layout = Layout {
    kernel: PythonLayout {
        interp_threads_head: 8,
        tstate_next: 8,
        // `thread_id`.
        tstate_native_thread_id: 176,
        tstate_frame: 24,
        tstate_datastack_chunk: PYTHON_NO_FIELD,
        chunk_data: 0,
        cframe_current_frame: PYTHON_NO_FIELD,
        frame_code: 32,
        // `f_globals`: no function object in the frame.
        frame_function: 48,
        frame_previous: 24,
        frame_instr: 104,
        frame_is_entry: PYTHON_NO_FIELD,
        frame_owner: PYTHON_NO_FIELD,
        owner_shim: 0,
        // co_argcount .. co_firstlineno: seven ints fixed at creation, up to co_code.
        code_fingerprint: 16,
        // sizeof(PyThreadState) is 264; `thread_id` ends at 184.
        tstate_bytes: 184,
        legacy_frames: 1,
    },
    runtime_interpreters_head: 32,
    code: CodeLayout {
        ob_type: 8,
        filename: 104,
        qualname: 112,
        linetable: 120,
        lines: LineTable::Lnotab,
        first_line: 40,
        code: 0,
        header: 128,
    },
    objects: V3_11.objects,
};

/// CPython 3.9: as 3.8 where the profiler reads.
const V3_9: Layout = V3_8;

/// CPython 3.10: `f_lasti` counts code units (2 bytes), and PEP 626's line table.
const V3_10: Layout = Layout {
    kernel: PythonLayout { frame_instr: 96, legacy_frames: 2, ..V3_8.kernel },
    code: CodeLayout { lines: LineTable::Ranges, ..V3_8.code },
    ..V3_8
};

/// CPython 3.11: `_PyCFrame` between the thread state and the frame, `is_entry` on the
/// frame a native call of the eval loop was made for.
const V3_11: Layout = Layout {
    kernel: PythonLayout {
        interp_threads_head: 16,
        tstate_next: 8,
        tstate_native_thread_id: 160,
        tstate_frame: 56,
        tstate_datastack_chunk: 296,
        chunk_data: 24,
        cframe_current_frame: 8,
        frame_code: 32,
        frame_function: 0,
        frame_previous: 48,
        frame_instr: 56,
        frame_is_entry: 68,
        frame_owner: PYTHON_NO_FIELD,
        owner_shim: 0,
        // co_argcount .. co_nplaincellvars: eight ints fixed at creation.
        code_fingerprint: 56,
        // sizeof(PyThreadState) is 360; the fields read end at 312.
        tstate_bytes: 320,
        legacy_frames: 0,
    },
    runtime_interpreters_head: 40,
    code: CodeLayout {
        ob_type: 8,
        filename: 112,
        qualname: 128,
        linetable: 136,
        lines: LineTable::Locations,
        first_line: 72,
        code: 184,
        header: 184,
    },
    objects: ObjectLayout {
        str_length: 16,
        str_state: 32,
        str_ascii_data: 48,
        str_compact_data: 72,
        state_kind_shift: 2,
        state_compact_bit: 5,
        state_ascii_bit: 6,
        bytes_size: 16,
        bytes_data: 32,
    },
};

/// CPython 3.12: the code object first in the frame, and `is_entry` gone: a native call of
/// the eval loop pushes a shim frame owned by the C stack below the frame it runs.
/// Strings lost `wstr`, so their characters start 8 bytes sooner.
const V3_12: Layout = Layout {
    kernel: PythonLayout {
        interp_threads_head: 72,
        tstate_next: 8,
        tstate_native_thread_id: 144,
        tstate_frame: 56,
        tstate_datastack_chunk: 232,
        chunk_data: 24,
        cframe_current_frame: 0,
        frame_code: 0,
        frame_function: 16,
        frame_previous: 8,
        frame_instr: 56,
        frame_is_entry: PYTHON_NO_FIELD,
        frame_owner: 70,
        owner_shim: 3,
        // co_argcount .. co_nlocals, with co_framesize.
        code_fingerprint: 52,
        tstate_bytes: 288,
        legacy_frames: 0,
    },
    runtime_interpreters_head: 40,
    code: CodeLayout { first_line: 68, code: 192, header: 192, ..V3_11.code },
    objects: OBJECTS_3_12,
};

/// CPython 3.13: `_PyCFrame` gone (the thread state points at its frame), `f_executable`
/// and `instr_ptr` in the frame, and `_Py_DebugOffsets` at the start of `_PyRuntime`,
/// which moves the interpreter list.
const V3_13: Layout = Layout {
    kernel: PythonLayout {
        interp_threads_head: 7344,
        tstate_native_thread_id: 160,
        tstate_frame: 72,
        cframe_current_frame: PYTHON_NO_FIELD,
        tstate_bytes: 304,
        ..V3_12.kernel
    },
    runtime_interpreters_head: 632,
    code: CodeLayout { code: 200, header: 200, ..V3_12.code },
    ..V3_12
};

/// CPython 3.14: `f_executable` a tagged reference (the low bits, masked by the kernel),
/// the native call of the eval loop's entry frame owned by the interpreter (owner 3, the
/// C stack's 4), and the remote debugger's state in `_PyRuntime` before the interpreter
/// list.
const V3_14: Layout = Layout {
    kernel: PythonLayout { frame_owner: 74, owner_shim: 3, ..V3_13.kernel },
    runtime_interpreters_head: 808,
    code: CodeLayout { code: 208, header: 208, ..V3_13.code },
    ..V3_13
};

/// `str` and `bytes` from 3.12 on.
const OBJECTS_3_12: ObjectLayout = ObjectLayout {
    str_length: 16,
    str_state: 32,
    str_ascii_data: 40,
    str_compact_data: 56,
    state_kind_shift: 2,
    state_compact_bit: 5,
    state_ascii_bit: 6,
    bytes_size: 16,
    bytes_data: 32,
};

/// The version a binary's file name says it is: `python3.11`, `libpython3.11.so.1.0`,
/// `libpython3.11d.so`. None for anything else (`python3`, a symlink's target is what
/// gets mapped).
pub fn version_from_file_name(name: &str) -> Option<Version> {
    let base = name.rsplit('/').next()?;
    let rest = base.strip_prefix("libpython").or_else(|| base.strip_prefix("python"))?;
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = &rest[minor.len()..];
    // `python3.11`, `python3.11d`, `libpython3.11.so...`; not `python3.11-config`.
    if !(after.is_empty() || after.starts_with(".so") || after == "d" || after.starts_with("d.so") || after == "m") {
        return None;
    }
    Some(Version { major: major.parse().ok()?, minor: minor.parse().ok()? })
}

/// The version `Py_Version` (3.11+: `PY_VERSION_HEX` in a binary's read-only data) says.
pub fn version_from_hex(hex: u32) -> Version {
    Version { major: (hex >> 24) as u8, minor: (hex >> 16) as u8 }
}

/// Installed CPythons with their headers, `(version, prefix)`: pyenv's, where pyenv is
/// installed, for the tests that check layouts against the real thing.
#[cfg(test)]
pub(crate) fn installed() -> Vec<(Version, std::path::PathBuf)> {
    let Ok(out) = std::process::Command::new("pyenv").arg("root").output() else { return Vec::new() };
    let root = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let Ok(dirs) = std::fs::read_dir(root.join("versions")) else { return Vec::new() };
    let mut found: Vec<(Version, std::path::PathBuf)> = dirs
        .filter_map(|dir| {
            let prefix = dir.ok()?.path();
            let name = prefix.file_name()?.to_str()?.to_string();
            let mut parts = name.split('.');
            let version = Version { major: parts.next()?.parse().ok()?, minor: parts.next()?.parse().ok()? };
            Some((version, prefix))
        })
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every offset of the table against CPython's own headers (`offsetof` in
    /// `layout_check.c`, compiled with `Py_BUILD_CORE`), for each installed version the
    /// table has, and for those not installed here whose output was recorded against
    /// their headers (3.14).
    #[test]
    fn offsets_match_each_installed_cpythons_headers() {
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/src/python/layout_check.c");
        let dir = tempfile::tempdir().unwrap();
        let mut outputs: Vec<(Version, String)> = Vec::new();
        for (version, prefix) in installed() {
            if for_version(version).is_none() {
                continue;
            }
            let include = prefix.join(format!("include/python{version}"));
            let program = dir.path().join(format!("check-{version}"));
            let status = std::process::Command::new("gcc")
                .arg(format!("-I{}", include.display()))
                .arg(format!("-I{}", include.join("internal").display()))
                .arg("-o")
                .arg(&program)
                .arg(source)
                .status()
                .unwrap();
            assert!(status.success(), "compiling the layout check against {}", include.display());
            let out = std::process::Command::new(&program).output().unwrap();
            outputs.push((version, String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        let recorded = [(Version { major: 3, minor: 14 }, include_str!("layout_check_3.14.txt"))];
        for (version, out) in recorded {
            if !outputs.iter().any(|(v, _)| *v == version) {
                outputs.push((version, out.to_string()));
            }
        }
        let mut checked = Vec::new();
        for (version, out) in outputs {
            let layout = for_version(version).unwrap();
            let printed: std::collections::HashMap<String, u64> = out
                .lines()
                .filter(|line| !line.starts_with('#'))
                .filter_map(|line| {
                    let (name, value) = line.rsplit_once(' ')?;
                    Some((name.trim().to_string(), value.parse().ok()?))
                })
                .collect();
            let header = |name: &str| *printed.get(name).unwrap_or_else(|| panic!("{version}: {name} not printed"));
            let k = layout.kernel;
            let mut expect = vec![
                ("runtime.interpreters.head", layout.runtime_interpreters_head),
                ("interp.threads.head", k.interp_threads_head as u64),
                ("tstate.next", k.tstate_next as u64),
                ("tstate.native_thread_id", k.tstate_native_thread_id as u64),
                ("frame.previous", k.frame_previous as u64),
                ("code.ob_type", layout.code.ob_type as u64),
                ("code.co_argcount", k.code_fingerprint as u64),
                ("code.co_firstlineno", layout.code.first_line as u64),
                ("code.co_filename", layout.code.filename as u64),
                ("code.co_qualname", layout.code.qualname as u64),
                ("code.co_linetable", layout.code.linetable as u64),
                ("str.length", layout.objects.str_length as u64),
                ("str.state", layout.objects.str_state as u64),
                ("sizeof PyASCIIObject", layout.objects.str_ascii_data as u64),
                ("sizeof PyCompactUnicodeObject", layout.objects.str_compact_data as u64),
                ("bytes.ob_size", layout.objects.bytes_size as u64),
                ("bytes.ob_sval", layout.objects.bytes_data as u64),
            ];
            if k.legacy_frames != 0 {
                expect.push(("tstate.frame", k.tstate_frame as u64));
                expect.push(("frame.f_code", k.frame_code as u64));
                expect.push(("frame.f_globals", k.frame_function as u64));
                expect.push(("frame.f_lasti", k.frame_instr as u64));
                for (name, ours) in expect {
                    assert_eq!(ours, header(name), "{version}: {name}");
                }
                // The fingerprint's 32 bytes are the ints fixed at creation, up to the
                // first pointer; the thread state read holds `thread_id`, and the code
                // object read every field.
                assert_eq!(k.code_fingerprint as u64 + 32, header("code.co_code"), "{version}: fingerprint");
                assert!(k.tstate_bytes as u64 <= header("sizeof tstate") && k.tstate_bytes >= k.tstate_native_thread_id + 8, "{version}: tstate_bytes");
                assert!(layout.code.header as u64 >= header("code.co_linetable") + 8 && layout.code.header as u64 <= header("sizeof code"), "{version}: code header");
                assert_eq!(k.legacy_frames, if version.minor >= 10 { 2 } else { 1 }, "{version}: f_lasti's unit");
                checked.push(version.to_string());
                continue;
            }
            expect.extend([
                ("tstate.datastack_chunk", k.tstate_datastack_chunk as u64),
                ("tstate.datastack_top", k.tstate_datastack_chunk as u64 + 8),
                ("chunk.data", k.chunk_data as u64),
                ("code.co_code_adaptive", layout.code.code as u64),
            ]);
            if k.cframe_current_frame == PYTHON_NO_FIELD {
                expect.push(("tstate.current_frame", k.tstate_frame as u64));
                expect.push(("frame.f_executable", k.frame_code as u64));
                expect.push(("frame.instr_ptr", k.frame_instr as u64));
            } else {
                expect.push(("tstate.cframe", k.tstate_frame as u64));
                expect.push(("cframe.current_frame", k.cframe_current_frame as u64));
                expect.push(("frame.f_code", k.frame_code as u64));
                expect.push(("frame.prev_instr", k.frame_instr as u64));
            }
            if k.frame_owner != PYTHON_NO_FIELD {
                expect.push(("frame.owner", k.frame_owner as u64));
                expect.push(("frame.f_funcobj", k.frame_function as u64));
                expect.push(("first shim owner", k.owner_shim as u64));
            }
            for (name, ours) in expect {
                assert_eq!(ours, header(name), "{version}: {name}");
            }
            // The fingerprint's 32 bytes are ints fixed at creation: from co_argcount to
            // co_nlocals or the count after it.
            let end = k.code_fingerprint as u64 + 32;
            assert!(end == header("code.co_nlocals") + 4 || end == header("code.co_nlocals") + 8, "{version}: fingerprint bytes end at {end}");
            // The thread state read holds every field and does not run past the struct.
            assert!(k.tstate_bytes as u64 <= header("sizeof tstate"), "{version}: tstate_bytes");
            assert!(k.tstate_bytes as u64 >= header("tstate.datastack_top") + 8, "{version}: tstate_bytes");
            checked.push(version.to_string());
        }
        eprintln!("layouts checked against the headers of CPython {checked:?}");
        assert!(!checked.is_empty(), "no CPython with headers found (pyenv's): the layouts were not checked");
    }

    #[test]
    fn versions_from_binary_names() {
        let v = |minor| Some(Version { major: 3, minor });
        assert_eq!(version_from_file_name("/usr/bin/python3.11"), v(11));
        assert_eq!(version_from_file_name("/opt/lib/libpython3.12.so.1.0"), v(12));
        assert_eq!(version_from_file_name("libpython3.13d.so"), v(13));
        assert_eq!(version_from_file_name("/usr/bin/python3"), None);
        assert_eq!(version_from_file_name("/usr/bin/python3.11-config"), None);
        assert_eq!(version_from_file_name("/usr/lib/x86_64-linux-gnu/libc.so.6"), None);
        assert_eq!(version_from_hex(0x030b02f0), Version { major: 3, minor: 11 });
    }

    #[test]
    fn only_versions_with_a_layout_are_read() {
        assert!(for_version(Version { major: 3, minor: 11 }).is_some());
        assert!(for_version(Version { major: 3, minor: 13 }).is_some());
        assert!(for_version(Version { major: 3, minor: 8 }).is_some());
        assert!(for_version(Version { major: 3, minor: 7 }).is_none());
        assert!(for_version(Version { major: 2, minor: 7 }).is_none());
        assert!(for_version(Version { major: 3, minor: 99 }).is_none());
    }
}
