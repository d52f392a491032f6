//! Code objects read from a Python process's memory: the function's qualified name, its
//! file and the line of an instruction, decoded once per code object and cached.

use super::layout::{CodeLayout, LineTable, ObjectLayout};
use crate::process::read_memory;

/// Characters of a name or file name read at most.
const MAX_STRING: usize = 1024;
/// Bytes of a line table read at most (a function of tens of thousands of lines).
const MAX_LINE_TABLE: usize = 64 << 10;

fn word(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// A decoded code object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub qualname: String,
    pub filename: String,
    pub first_line: u32,
    /// The raw line table, decoded per instruction on demand.
    line_table: Box<[u8]>,
    lines: LineTable,
    /// The [`profiler_common::python_fingerprint`] of the object, to tell a reused
    /// address apart.
    pub fingerprint: u32,
}

impl Code {
    /// Reads the code object at `addr` of `pid`. None when it is not one (its type is not
    /// `code_type`: freed and reused) or cannot be read.
    pub fn read(pid: u32, addr: u64, code_type: u64, layout: &CodeLayout, objects: &ObjectLayout, fingerprint_at: usize) -> Option<Code> {
        let mut header = vec![0u8; layout.header.max(fingerprint_at + 32)];
        if !read_memory(pid, addr, &mut header) || word(&header, layout.ob_type)? != code_type {
            return None;
        }
        let words = [0, 1, 2, 3].map(|i| word(&header, fingerprint_at + 8 * i).unwrap_or(0));
        let first_line = u32::from_le_bytes(header.get(layout.first_line..layout.first_line + 4)?.try_into().ok()?);
        Some(Code {
            qualname: read_str(pid, word(&header, layout.qualname)?, objects)?,
            filename: read_str(pid, word(&header, layout.filename)?, objects)?,
            first_line,
            line_table: read_bytes(pid, word(&header, layout.linetable)?, objects)?.into(),
            lines: layout.lines,
            fingerprint: profiler_common::python_fingerprint(words),
        })
    }

    /// The line of the instruction at byte offset `offset` of the bytecode; the first
    /// line for an offset before the first instruction (a frame just pushed).
    pub fn line(&self, offset: i64) -> u32 {
        let line = match self.lines {
            LineTable::Lnotab => lnotab_line(&self.line_table, self.first_line, offset),
            LineTable::Ranges => range_line(&self.line_table, self.first_line, offset),
            LineTable::Locations => location_line(&self.line_table, self.first_line, offset),
        };
        line.unwrap_or(self.first_line)
    }
}

/// The line of byte offset `offset` in a `co_lnotab` (CPython 3.8, 3.9,
/// `Objects/lnotab_notes.txt`): pairs of an unsigned bytecode increment and a signed line
/// increment, the line changing once the offset is reached.
fn lnotab_line(table: &[u8], first_line: u32, offset: i64) -> Option<u32> {
    if offset < 0 {
        return None;
    }
    let mut line = first_line as i64;
    let mut addr = 0i64;
    for pair in table.chunks_exact(2) {
        addr += pair[0] as i64;
        if addr > offset {
            break;
        }
        line += pair[1] as i8 as i64;
    }
    Some(line.max(0) as u32)
}

/// The line of byte offset `offset` in a 3.10 `co_linetable` (PEP 626): pairs of an
/// unsigned range length in bytes and a signed line increment, -128 for a range with
/// no line.
fn range_line(table: &[u8], first_line: u32, offset: i64) -> Option<u32> {
    if offset < 0 {
        return None;
    }
    let mut line = first_line as i64;
    let mut end = 0i64;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += pair[0] as i64;
        let delta = pair[1] as i8;
        let has_line = delta != -128;
        if has_line {
            line += delta as i64;
        }
        if start <= offset && offset < end {
            return has_line.then_some(line.max(0) as u32);
        }
    }
    None
}

/// A `str` object's text: compact ASCII, Latin-1, UCS-2 or UCS-4, at most [`MAX_STRING`]
/// characters.
pub fn read_str(pid: u32, addr: u64, layout: &ObjectLayout) -> Option<String> {
    let mut header = [0u8; 64];
    let header = &mut header[..layout.str_ascii_data.max(layout.str_state + 4)];
    if !read_memory(pid, addr, header) {
        return None;
    }
    let length = (word(header, layout.str_length)? as usize).min(MAX_STRING);
    let state = u32::from_le_bytes(header.get(layout.str_state..layout.str_state + 4)?.try_into().ok()?);
    let kind = ((state >> layout.state_kind_shift) & 7) as usize;
    let compact = state >> layout.state_compact_bit & 1 == 1;
    let ascii = state >> layout.state_ascii_bit & 1 == 1;
    if !compact || !matches!(kind, 1 | 2 | 4) {
        return None;
    }
    let data = if ascii { layout.str_ascii_data } else { layout.str_compact_data };
    let mut raw = vec![0u8; length * kind];
    if !read_memory(pid, addr + data as u64, &mut raw) {
        return None;
    }
    Some(match kind {
        1 => raw.iter().map(|&b| b as char).collect(),
        2 => char::decode_utf16(raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]))).map(|c| c.unwrap_or('\u{fffd}')).collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('\u{fffd}'))
            .collect(),
    })
}

/// A `bytes` object's contents, at most [`MAX_LINE_TABLE`].
fn read_bytes(pid: u32, addr: u64, layout: &ObjectLayout) -> Option<Vec<u8>> {
    let mut size = [0u8; 8];
    if !read_memory(pid, addr + layout.bytes_size as u64, &mut size) {
        return None;
    }
    let size = (u64::from_le_bytes(size) as usize).min(MAX_LINE_TABLE);
    let mut data = vec![0u8; size];
    read_memory(pid, addr + layout.bytes_data as u64, &mut data).then_some(data)
}

/// The line of byte offset `offset` in a PEP 657 location table (CPython 3.11+,
/// `Objects/locations.md`): entries of a first byte `1 cccc lll` (code `c`, `l + 1` code
/// units) and a body whose line delta depends on the code.
fn location_line(table: &[u8], first_line: u32, offset: i64) -> Option<u32> {
    if offset < 0 {
        return None;
    }
    let mut line = first_line as i64;
    let mut start = 0i64;
    let mut at = 0;
    while at < table.len() {
        let head = table[at];
        if head & 0x80 == 0 {
            return None;
        }
        let code = (head >> 3) & 15;
        let end = start + ((head & 7) as i64 + 1) * 2;
        let delta = match code {
            // No location, or one-line forms with the line unchanged.
            15 | 0..=10 => 0,
            11 => 1,
            12 => 2,
            // No columns, and the long form: a signed varint first.
            13 | 14 => signed_varint(table, at + 1)?,
            _ => unreachable!("four bits"),
        };
        line += delta;
        if offset < end {
            return (code != 15).then_some(line.max(0) as u32);
        }
        start = end;
        at += 1;
        while at < table.len() && table[at] & 0x80 == 0 {
            at += 1;
        }
    }
    None
}

fn varint(table: &[u8], mut at: usize) -> Option<i64> {
    let mut read = *table.get(at)?;
    let mut value = (read & 63) as i64;
    let mut shift = 0;
    while read & 64 != 0 && shift < 30 {
        at += 1;
        read = *table.get(at)?;
        shift += 6;
        value |= ((read & 63) as i64) << shift;
    }
    Some(value)
}

fn signed_varint(table: &[u8], at: usize) -> Option<i64> {
    let value = varint(table, at)?;
    Some(if value & 1 == 1 { -(value >> 1) } else { value >> 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_tables_give_each_instruction_its_line() {
        // Three entries: 2 units on the first line (short form), 1 unit one line down
        // (one-line form 11: +1), 3 units 5 lines down (no-column form, varint 10 = +5).
        let table = [0x80 | (0 << 3) | 1, 0x00, 0x80 | (11 << 3), 0x04, 0x08, 0x80 | (13 << 3) | 2, 10];
        assert_eq!(location_line(&table, 7, 0), Some(7));
        assert_eq!(location_line(&table, 7, 2), Some(7));
        assert_eq!(location_line(&table, 7, 4), Some(8));
        assert_eq!(location_line(&table, 7, 6), Some(13));
        assert_eq!(location_line(&table, 7, 10), Some(13));
        assert_eq!(location_line(&table, 7, 12), None, "past the table");
        assert_eq!(location_line(&table, 7, -2), None, "before the first instruction");
        // A negative delta (varint 3 = -1) and a no-location entry.
        let table = [0x80 | (13 << 3), 3, 0x80 | (15 << 3)];
        assert_eq!(location_line(&table, 20, 0), Some(19));
        assert_eq!(location_line(&table, 20, 2), None);
    }

    #[test]
    fn lnotabs_give_each_offset_its_line() {
        // Line 10 from offset 0, +2 at offset 6, -1 at 6+4 (a loop's jump back), and a
        // bytecode increment past 255 split as (255, 0), (5, 3).
        let table = [6, 2, 4, 0xff, 255, 0, 5, 3];
        assert_eq!(lnotab_line(&table, 10, 0), Some(10));
        assert_eq!(lnotab_line(&table, 10, 5), Some(10));
        assert_eq!(lnotab_line(&table, 10, 6), Some(12));
        assert_eq!(lnotab_line(&table, 10, 10), Some(11));
        assert_eq!(lnotab_line(&table, 10, 269), Some(11));
        assert_eq!(lnotab_line(&table, 10, 270), Some(14));
        assert_eq!(lnotab_line(&table, 10, -1), None);
    }

    #[test]
    fn pep_626_ranges_give_each_offset_its_line() {
        // 4 bytes on line 5 (+0), an empty range (+1, skipped), 6 bytes on line 7 (+1),
        // 2 bytes with no line, 2 bytes on line 4 (-3).
        let table = [4, 0, 0, 1, 6, 1, 2, 0x80, 2, 0xfd];
        assert_eq!(range_line(&table, 5, 0), Some(5));
        assert_eq!(range_line(&table, 5, 3), Some(5));
        assert_eq!(range_line(&table, 5, 4), Some(7));
        assert_eq!(range_line(&table, 5, 9), Some(7));
        assert_eq!(range_line(&table, 5, 10), None, "no line");
        assert_eq!(range_line(&table, 5, 12), Some(4));
        assert_eq!(range_line(&table, 5, 14), None, "past the table");
    }
}
