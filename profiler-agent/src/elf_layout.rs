//! Where a binary's code lies in its file and in its virtual address space. Samples carry
//! file offsets (the same in every process); unwind tables and symbol tables use the
//! binary's virtual addresses.

/// Mappings are page-aligned (x86_64 user space uses 4 KiB pages).
const PAGE: u64 = 4096;

/// The executable loadable segments of a binary: (file offset, virtual address, size).
pub struct CodeSegments(Vec<(u64, u64, u64)>);

impl CodeSegments {
    pub fn of(elf: &object::File<'_>) -> Self {
        use object::{Object as _, ObjectSegment as _};
        let executable = |segment: &object::Segment<'_, '_>| {
            matches!(segment.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0)
        };
        Self(
            elf.segments()
                .filter(executable)
                .map(|segment| {
                    let (offset, size) = segment.file_range();
                    (offset, segment.address(), size)
                })
                .collect(),
        )
    }

    /// The virtual address of a file offset in code, or of the start of a mapping of it.
    pub fn virtual_address(&self, file_offset: u64) -> Option<u64> {
        // The kernel maps whole pages: a mapping starts at the page holding the segment's
        // first byte, which may lie before the segment (lld, Rust binaries). A mapping may
        // also start inside the segment (a runtime that remapped part of its text, as
        // Node.js does onto huge pages).
        let (offset, vaddr, _) =
            self.0.iter().find(|(offset, _, size)| (offset & !(PAGE - 1)..offset + size).contains(&file_offset))?;
        Some(vaddr.wrapping_add(file_offset.wrapping_sub(*offset)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_offsets_of_page_aligned_and_shifted_segments() {
        // As lld lays out a Rust binary: text at file offset 0x737b40, address 0x738b40.
        let segments = CodeSegments(vec![(0x737b40, 0x738b40, 0x1029170)]);
        assert_eq!(segments.virtual_address(0x737000), Some(0x738000), "mapping starts at the page");
        assert_eq!(segments.virtual_address(0x800000), Some(0x801000));
        assert_eq!(segments.virtual_address(0x736000), None);
        assert_eq!(segments.virtual_address(0x737b40 + 0x1029170), None);
    }
}
