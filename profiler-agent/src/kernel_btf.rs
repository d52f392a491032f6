//! Offsets of kernel struct members, from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`): the programs read a few fields aya 0.14 has no CO-RE
//! relocation for, at offsets the agent finds here and writes into their config.
//!
//! A reader of the format's few parts this needs (the header, the type section's
//! records, the string section), not a BTF library: aya-obj parses BTF but keeps
//! struct members private.

use std::path::Path;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// One type record: its name, kind, member count, and where its members start.
struct Type {
    name: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    members: usize,
}

/// The byte offset of the member reached by `path` from struct `root`, each step a
/// member of the struct (or union) the one before names: `["thread", "fsbase"]` from
/// `task_struct`. None when the file is not BTF or a step is missing.
pub fn member_offset(btf: &[u8], root: &str, path: &[&str]) -> Option<u32> {
    let u16_at = |at: usize| btf.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| btf.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    if u16_at(0)? != MAGIC {
        return None;
    }
    let header_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let types_at = header_len.checked_add(type_off)?;
    let strings = btf.get(header_len.checked_add(str_off)?..header_len.checked_add(str_off)?.checked_add(str_len)?)?;
    let name = |offset: u32| {
        let rest = strings.get(offset as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    };

    // Type ids start at 1, in file order.
    let mut types = vec![Type { name: 0, kind: 0, vlen: 0, kind_flag: false, members: 0 }];
    let mut at = types_at;
    let end = types_at.checked_add(type_len)?;
    while at < end {
        let info = u32_at(at + 4)?;
        let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
        let extra = match kind {
            1 | 14 | 17 => 4,                  // INT, VAR, DECL_TAG
            3 => 12,                           // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen as usize, // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen as usize,       // ENUM, FUNC_PROTO
            _ => 0,                            // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
        };
        types.push(Type { name: u32_at(at)?, kind, vlen, kind_flag: info >> 31 != 0, members: at + 12 });
        at += 12 + extra;
    }

    let mut current = types.iter().position(|t| t.kind == KIND_STRUCT && name(t.name) == Some(root))?;
    let mut offset = 0u32;
    for step in path {
        let t = types.get(current)?;
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        let member = (0..t.vlen as usize).map(|i| t.members + 12 * i).find(|&m| u32_at(m).and_then(name) == Some(*step))?;
        let bits = u32_at(member + 8)?;
        // With kind_flag the offset's low 24 bits are the bit offset (the high 8, a
        // bitfield's size); a member that is a struct is never a bitfield.
        let bits = if t.kind_flag { bits & 0x00ff_ffff } else { bits };
        offset += bits / 8;
        current = u32_at(member + 4)? as usize;
        // Through typedefs and qualifiers to the member's struct.
        while let Some(t) = types.get(current) {
            match t.kind {
                8..=11 | 18 => current = u32_at(t.members - 12 + 8)? as usize,
                _ => break,
            }
        }
    }
    Some(offset)
}

/// The offset of `task_struct.thread.fsbase` in the running kernel: where a thread's
/// thread pointer is kept while it is off the CPU, and set at its creation.
pub fn fsbase_offset() -> Option<u32> {
    let btf = std::fs::read(Path::new("/sys/kernel/btf/vmlinux")).ok()?;
    member_offset(&btf, "task_struct", &["thread", "fsbase"])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_members_through_nested_structs_in_this_kernel() {
        let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("the kernel's BTF (CONFIG_DEBUG_INFO_BTF)");
        // `pid` and `tgid` sit next to each other, 4 bytes apart.
        let pid = member_offset(&btf, "task_struct", &["pid"]).unwrap();
        let tgid = member_offset(&btf, "task_struct", &["tgid"]).unwrap();
        assert_eq!(tgid, pid + 4);
        // `thread` is task_struct's last member, so fsbase lies deep in it, after `thread`.
        let thread = member_offset(&btf, "task_struct", &["thread"]).unwrap();
        let fsbase = fsbase_offset().unwrap();
        assert!(fsbase > thread && fsbase < thread + 256, "thread at {thread}, fsbase at {fsbase}");
        assert_eq!(member_offset(&btf, "task_struct", &["thread", "no_such_member"]), None);
        assert_eq!(member_offset(b"not btf", "task_struct", &["pid"]), None);
    }
}
