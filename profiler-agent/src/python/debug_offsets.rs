//! CPython's own description of its structures for debuggers (3.13+): `_Py_DebugOffsets`,
//! the first member of `_PyRuntime`, filled by the interpreter with the offsets of its
//! build. Where present, its values are preferred to the table's ([`super::layout`]): a
//! patch release or a build option that moved a field is read right, and a process whose
//! description does not hold together is not read at all.
//!
//! The struct itself changes with each minor version (3.14 added fields and sections), so
//! where each value sits in it is known per version, from that version's
//! `Include/internal/pycore_debug_offsets.h` (3.14) or `pycore_runtime.h` (3.13).

use super::layout::{Layout, Version};
use profiler_common::{PYTHON_FRAME_BYTES, PYTHON_TSTATE_BYTES};

/// `_Py_DebugOffsets::cookie`.
const COOKIE: &[u8; 8] = b"xdebugpy";

/// Where the values the profiler uses sit in one version's `_Py_DebugOffsets` (byte
/// positions of its `uint64_t` fields).
struct Positions {
    size: usize,
    interpreters_head: usize,
    threads_head: usize,
    tstate_size: usize,
    tstate_next: usize,
    tstate_current_frame: usize,
    tstate_native_thread_id: usize,
    tstate_datastack_chunk: usize,
    frame_previous: usize,
    frame_executable: usize,
    frame_instr_ptr: usize,
    frame_owner: usize,
    code_size: usize,
    code_filename: usize,
    code_qualname: usize,
    code_linetable: usize,
    code_firstlineno: usize,
    code_argcount: usize,
    code_adaptive: usize,
    ob_type: usize,
    bytes_ob_size: usize,
    bytes_ob_sval: usize,
    str_state: usize,
    str_length: usize,
    str_ascii_size: usize,
}

/// 3.13: `_Py_DebugOffsets` in `pycore_runtime.h`, 584 bytes.
const V3_13: Positions = Positions {
    size: 584,
    interpreters_head: 40,
    threads_head: 72,
    tstate_size: 152,
    tstate_next: 168,
    tstate_current_frame: 184,
    tstate_native_thread_id: 200,
    tstate_datastack_chunk: 208,
    frame_previous: 232,
    frame_executable: 240,
    frame_instr_ptr: 248,
    frame_owner: 264,
    code_size: 272,
    code_filename: 280,
    code_qualname: 296,
    code_linetable: 304,
    code_firstlineno: 312,
    code_argcount: 320,
    code_adaptive: 344,
    ob_type: 360,
    bytes_ob_size: 520,
    bytes_ob_sval: 528,
    str_state: 544,
    str_length: 552,
    str_ascii_size: 560,
};

/// 3.14: `pycore_debug_offsets.h`, 760 bytes: `free_threaded` after the version, more
/// interpreter and thread state fields, and new sections, moving everything after.
const V3_14: Positions = Positions {
    size: 760,
    interpreters_head: 40,
    threads_head: 72,
    tstate_size: 176,
    tstate_next: 192,
    tstate_current_frame: 208,
    tstate_native_thread_id: 224,
    tstate_datastack_chunk: 232,
    frame_previous: 256,
    frame_executable: 264,
    frame_instr_ptr: 272,
    frame_owner: 288,
    code_size: 312,
    code_filename: 320,
    code_qualname: 336,
    code_linetable: 344,
    code_firstlineno: 352,
    code_argcount: 360,
    code_adaptive: 384,
    ob_type: 408,
    bytes_ob_size: 600,
    bytes_ob_sval: 608,
    str_state: 624,
    str_length: 632,
    str_ascii_size: 640,
};

fn positions(version: Version) -> Option<&'static Positions> {
    match (version.major, version.minor) {
        (3, 13) => Some(&V3_13),
        (3, 14) => Some(&V3_14),
        _ => None,
    }
}

/// Bytes of `_PyRuntime` to read for `version`'s description; None before 3.13.
pub fn bytes_for(version: Version) -> Option<usize> {
    positions(version).map(|p| p.size)
}

/// Why a process's description was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// No cookie: the runtime does not start with the description.
    NoCookie,
    /// It describes another version than the binary says it is.
    OtherVersion(u64),
    /// A value the walk cannot use: past the bytes the kernel reads of a structure, or
    /// past the structure's own size.
    OutOfRange(&'static str),
}

/// `layout` (the table's, for `version`) with the values of the description `raw` (the
/// first [`bytes_for`] bytes of `_PyRuntime`) in place of the table's, and the names of
/// those that differed. Unchanged, with an empty list, for a version without one.
pub fn apply(version: Version, layout: &Layout, raw: &[u8]) -> Result<(Layout, Vec<&'static str>), Refused> {
    let Some(p) = positions(version) else { return Ok((*layout, Vec::new())) };
    if raw.get(..8) != Some(&COOKIE[..]) {
        return Err(Refused::NoCookie);
    }
    let value = |at: usize| raw.get(at..at + 8).map_or(u64::MAX, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let described = value(8);
    if described >> 16 != ((version.major as u64) << 8 | version.minor as u64) {
        return Err(Refused::OtherVersion(described));
    }
    let mut out = *layout;
    let mut differed = Vec::new();
    // The description's value at `at` in place of the table's `current`, if it lies below
    // `limit` (a value past the bytes read of its structure would be read from the wrong
    // place, or not at all).
    let mut take = |name: &'static str, at: usize, limit: u64, current: u64| -> Result<u64, Refused> {
        let v = value(at);
        if v >= limit {
            return Err(Refused::OutOfRange(name));
        }
        if v != current {
            differed.push(name);
        }
        Ok(v)
    };
    let tstate_size = value(p.tstate_size);
    let code_size = value(p.code_size);
    let k = &mut out.kernel;
    // The kernel's fields are u16, every limit below one.
    let tstate_limit = tstate_size.min(PYTHON_TSTATE_BYTES as u64).saturating_sub(8);
    k.tstate_next = take("thread_state.next", p.tstate_next, tstate_limit, k.tstate_next as u64)? as u16;
    k.tstate_frame = take("thread_state.current_frame", p.tstate_current_frame, tstate_limit, k.tstate_frame as u64)? as u16;
    k.tstate_native_thread_id = take("thread_state.native_thread_id", p.tstate_native_thread_id, tstate_limit, k.tstate_native_thread_id as u64)? as u16;
    // `datastack_top` follows the chunk.
    k.tstate_datastack_chunk = take("thread_state.datastack_chunk", p.tstate_datastack_chunk, tstate_limit.saturating_sub(8), k.tstate_datastack_chunk as u64)? as u16;
    k.interp_threads_head = take("interpreter_state.threads_head", p.threads_head, u16::MAX as u64, k.interp_threads_head as u64)? as u16;
    let frame_limit = PYTHON_FRAME_BYTES as u64 - 8;
    k.frame_previous = take("interpreter_frame.previous", p.frame_previous, frame_limit, k.frame_previous as u64)? as u16;
    k.frame_code = take("interpreter_frame.executable", p.frame_executable, frame_limit, k.frame_code as u64)? as u16;
    k.frame_instr = take("interpreter_frame.instr_ptr", p.frame_instr_ptr, frame_limit, k.frame_instr as u64)? as u16;
    k.frame_owner = take("interpreter_frame.owner", p.frame_owner, PYTHON_FRAME_BYTES as u64, k.frame_owner as u64)? as u16;
    // The fingerprint is 32 bytes from the argument count.
    k.code_fingerprint = take("code_object.argcount", p.code_argcount, code_size.saturating_sub(32).min(u16::MAX as u64), k.code_fingerprint as u64)? as u16;
    // What the kernel reads of a thread state: up to its last field, within the struct.
    let fields_end = [k.tstate_next, k.tstate_frame, k.tstate_native_thread_id].iter().map(|&f| f as u64 + 8).chain([k.tstate_datastack_chunk as u64 + 16]).max().unwrap();
    k.tstate_bytes = (k.tstate_bytes as u64).max(fields_end).min(tstate_size) as u16;
    out.runtime_interpreters_head = take("runtime_state.interpreters_head", p.interpreters_head, 1 << 20, out.runtime_interpreters_head)?;
    let c = &mut out.code;
    c.filename = take("code_object.filename", p.code_filename, code_size.saturating_sub(8), c.filename as u64)? as usize;
    c.qualname = take("code_object.qualname", p.code_qualname, code_size.saturating_sub(8), c.qualname as u64)? as usize;
    c.linetable = take("code_object.linetable", p.code_linetable, code_size.saturating_sub(8), c.linetable as u64)? as usize;
    c.first_line = take("code_object.firstlineno", p.code_firstlineno, code_size.saturating_sub(4), c.first_line as u64)? as usize;
    c.code = take("code_object.co_code_adaptive", p.code_adaptive, code_size.saturating_add(1), c.code as u64)? as usize;
    c.ob_type = take("pyobject.ob_type", p.ob_type, 64, c.ob_type as u64)? as usize;
    c.header = c.header.max(c.filename.max(c.qualname).max(c.linetable) + 8).max(c.code);
    let o = &mut out.objects;
    o.bytes_size = take("bytes_object.ob_size", p.bytes_ob_size, 64, o.bytes_size as u64)? as usize;
    o.bytes_data = take("bytes_object.ob_sval", p.bytes_ob_sval, 64, o.bytes_data as u64)? as usize;
    o.str_state = take("unicode_object.state", p.str_state, 60, o.str_state as u64)? as usize;
    o.str_length = take("unicode_object.length", p.str_length, 56, o.str_length as u64)? as usize;
    let str_ascii = take("unicode_object.asciiobject_size", p.str_ascii_size, 64, o.str_ascii_data as u64)? as usize;
    // A compact non-ASCII string's characters follow its own header, which grows with
    // the ASCII one.
    o.str_compact_data = o.str_compact_data + str_ascii - o.str_ascii_data;
    o.str_ascii_data = str_ascii;
    Ok((out, differed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::layout::for_version;

    fn put(raw: &mut [u8], at: usize, value: u64) {
        raw[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// A description of `version` holding the table's own values.
    fn described(version: Version) -> Vec<u8> {
        let p = positions(version).unwrap();
        let layout = for_version(version).unwrap();
        let k = layout.kernel;
        let mut raw = vec![0u8; p.size];
        raw[..8].copy_from_slice(COOKIE);
        put(&mut raw, 8, (version.major as u64) << 24 | (version.minor as u64) << 16 | 0x00f0);
        for (at, value) in [
            (p.interpreters_head, layout.runtime_interpreters_head),
            (p.threads_head, k.interp_threads_head as u64),
            (p.tstate_size, 304),
            (p.tstate_next, k.tstate_next as u64),
            (p.tstate_current_frame, k.tstate_frame as u64),
            (p.tstate_native_thread_id, k.tstate_native_thread_id as u64),
            (p.tstate_datastack_chunk, k.tstate_datastack_chunk as u64),
            (p.frame_previous, k.frame_previous as u64),
            (p.frame_executable, k.frame_code as u64),
            (p.frame_instr_ptr, k.frame_instr as u64),
            (p.frame_owner, k.frame_owner as u64),
            (p.code_size, layout.code.code as u64 + 8),
            (p.code_filename, layout.code.filename as u64),
            (p.code_qualname, layout.code.qualname as u64),
            (p.code_linetable, layout.code.linetable as u64),
            (p.code_firstlineno, layout.code.first_line as u64),
            (p.code_argcount, k.code_fingerprint as u64),
            (p.code_adaptive, layout.code.code as u64),
            (p.ob_type, layout.code.ob_type as u64),
            (p.bytes_ob_size, layout.objects.bytes_size as u64),
            (p.bytes_ob_sval, layout.objects.bytes_data as u64),
            (p.str_state, layout.objects.str_state as u64),
            (p.str_length, layout.objects.str_length as u64),
            (p.str_ascii_size, layout.objects.str_ascii_data as u64),
        ] {
            put(&mut raw, at, value);
        }
        raw
    }

    /// 3.14's positions against its header (compiled, recorded: no 3.14 runs here; 3.13's
    /// are checked against a live interpreter by the tests in `python`), and the
    /// values it recorded against the table.
    #[test]
    fn positions_of_3_14_match_its_header() {
        let recorded: std::collections::HashMap<&str, (usize, u64)> = include_str!("debug_offsets_3.14.txt")
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (name, rest) = line.split_once(' ')?;
                let offset = rest.split("offset=").nth(1)?.split_whitespace().next()?.parse().ok()?;
                let value = rest.split("value=").nth(1)?.split_whitespace().next()?.parse().unwrap_or(0);
                Some((name, (offset, value)))
            })
            .collect();
        let p = &V3_14;
        let version = Version { major: 3, minor: 14 };
        let mut raw = vec![0u8; p.size];
        raw[..8].copy_from_slice(COOKIE);
        put(&mut raw, 8, 0x030e0af0);
        for (name, at) in [
            ("runtime_state.interpreters_head", p.interpreters_head),
            ("interpreter_state.threads_head", p.threads_head),
            ("thread_state.size", p.tstate_size),
            ("thread_state.next", p.tstate_next),
            ("thread_state.current_frame", p.tstate_current_frame),
            ("thread_state.native_thread_id", p.tstate_native_thread_id),
            ("thread_state.datastack_chunk", p.tstate_datastack_chunk),
            ("interpreter_frame.previous", p.frame_previous),
            ("interpreter_frame.executable", p.frame_executable),
            ("interpreter_frame.instr_ptr", p.frame_instr_ptr),
            ("interpreter_frame.owner", p.frame_owner),
            ("code_object.size", p.code_size),
            ("code_object.filename", p.code_filename),
            ("code_object.qualname", p.code_qualname),
            ("code_object.linetable", p.code_linetable),
            ("code_object.firstlineno", p.code_firstlineno),
            ("code_object.argcount", p.code_argcount),
            ("code_object.co_code_adaptive", p.code_adaptive),
            ("pyobject.ob_type", p.ob_type),
            ("bytes_object.ob_size", p.bytes_ob_size),
            ("bytes_object.ob_sval", p.bytes_ob_sval),
            ("unicode_object.state", p.str_state),
            ("unicode_object.length", p.str_length),
            ("unicode_object.asciiobject_size", p.str_ascii_size),
        ] {
            let (offset, value) = recorded.get(name).copied().unwrap_or_else(|| panic!("{name} not recorded"));
            assert_eq!(at, offset, "{name}");
            put(&mut raw, at, value);
        }
        // The description the header's initializer fills in agrees with the table.
        let table = for_version(version).unwrap();
        assert_eq!(apply(version, &table, &raw), Ok((table, vec![])));
    }

    #[test]
    fn a_description_is_taken_where_it_differs_from_the_table_and_refused_where_it_cannot_be_read() {
        for minor in [13, 14] {
            let version = Version { major: 3, minor };
            let table = for_version(version).unwrap();
            let raw = described(version);
            assert_eq!(apply(version, &table, &raw), Ok((table, vec![])), "3.{minor}: the table's own values");

            // A build whose thread state and code objects have 16 bytes more in front
            // (as with a field added in a patch release).
            let p = positions(version).unwrap();
            let mut moved = raw.clone();
            put(&mut moved, p.tstate_native_thread_id, table.kernel.tstate_native_thread_id as u64 + 16);
            put(&mut moved, p.code_qualname, table.code.qualname as u64 + 16);
            let (layout, differed) = apply(version, &table, &moved).unwrap();
            assert_eq!(differed, ["thread_state.native_thread_id", "code_object.qualname"]);
            assert_eq!(layout.kernel.tstate_native_thread_id, table.kernel.tstate_native_thread_id + 16);
            assert_eq!(layout.code.qualname, table.code.qualname + 16);

            let mut cookie = raw.clone();
            cookie[0] = b'X';
            assert_eq!(apply(version, &table, &cookie), Err(Refused::NoCookie));
            let mut other = raw.clone();
            put(&mut other, 8, 0x030f00f0);
            assert_eq!(apply(version, &table, &other), Err(Refused::OtherVersion(0x030f00f0)));
            // A frame field past what the kernel reads of a frame.
            let mut far = raw.clone();
            put(&mut far, p.frame_instr_ptr, 4096);
            assert_eq!(apply(version, &table, &far), Err(Refused::OutOfRange("interpreter_frame.instr_ptr")));
            // Cut short.
            assert!(apply(version, &table, &raw[..100]).is_err());
        }
        // Before 3.13 there is no description: the table as it is.
        let v = Version { major: 3, minor: 11 };
        assert_eq!(apply(v, &for_version(v).unwrap(), &[]), Ok((for_version(v).unwrap(), vec![])));
    }
}
