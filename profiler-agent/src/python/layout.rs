//! Where each CPython version keeps what the profiler reads: the structures the kernel
//! walks (thread states, frames) and those the agent decodes (code objects, strings,
//! bytes). Offsets are for 64-bit builds without `Py_DEBUG`, from CPython's headers of
//! each version (`Include/internal/pycore_frame.h`, `pycore_interp.h`,
//! `pycore_runtime.h`, `Include/cpython/pystate.h`, `code.h`, `unicodeobject.h`), and
//! for the versions a test can run here, checked against the live interpreter (see the
//! tests at the end).

use profiler_common::{PythonLayout, PYTHON_NO_FIELD};

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

/// What the agent reads of a code object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub ob_type: usize,
    pub filename: usize,
    pub qualname: usize,
    pub linetable: usize,
    pub first_line: usize,
    /// Start of the bytecode: instruction offsets are counted from here.
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
        (3, 11) => Some(V3_11),
        _ => None,
    }
}

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
        owner_cstack: 0,
        // co_argcount .. co_nplaincellvars: eight ints fixed at creation.
        code_fingerprint: 56,
        padding: 0,
    },
    runtime_interpreters_head: 40,
    code: CodeLayout {
        ob_type: 8,
        filename: 112,
        qualname: 128,
        linetable: 136,
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(for_version(Version { major: 2, minor: 7 }).is_none());
        assert!(for_version(Version { major: 3, minor: 99 }).is_none());
    }
}
