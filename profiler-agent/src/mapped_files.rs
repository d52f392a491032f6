//! Reading files that other users can write, through memory maps, without dying of it.
//!
//! The agent maps the binaries, libraries and debug files of every process it profiles:
//! its unwinder (`unwind.rs`), its build-id reader (`process.rs`), its debug-file lookup
//! (`symbolize.rs`) and blazesym's symbolizer inside. Any of those files may belong to
//! another user, who can truncate it while it is mapped; reading a page of the mapping
//! past the file's new end raises SIGBUS, which kills the process (`catch_unwind` does
//! not catch signals), and this process runs as root on every host.
//!
//! [`guard`] installs a SIGBUS handler that puts a page of zeros in place of the page
//! that faulted (an anonymous private mapping over it) and returns, so the access is
//! retried and reads zeros where the file ended: the parsers then meet malformed data,
//! which they already reject (and whose panics are caught). Each such page is counted
//! ([`truncated_pages`]). Any other SIGBUS (a machine-check error, a fault the mapping
//! cannot take) gets the default action, as without the handler.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
static TRUNCATED_PAGES: AtomicU64 = AtomicU64::new(0);

/// Installs the handler once per process; later calls do nothing.
pub fn guard() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = install());
    result
}

/// Pages of mapped files found past their file's end (truncated while mapped) and read
/// as zeros, since the process started.
pub fn truncated_pages() -> u64 {
    TRUNCATED_PAGES.load(Ordering::Relaxed)
}

fn install() -> std::io::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    PAGE_SIZE.store(if page > 0 { page as usize } else { 4096 }, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is a valid start; the handler has the SA_SIGINFO
    // signature and only makes async-signal-safe calls (mmap, sigaction, raise are
    // system calls without user-space locks).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let info = unsafe { &*info };
    if info.si_code == libc::BUS_ADRERR {
        let page_size = PAGE_SIZE.load(Ordering::Relaxed);
        // SAFETY: reading the fault address of a SIGBUS siginfo.
        let page = unsafe { info.si_addr() } as usize & !(page_size - 1);
        // SAFETY: replaces one page of the mapping that faulted, in place; a page of a
        // file mapping past the file's end holds nothing anyone could still read.
        let zeros = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if zeros != libc::MAP_FAILED {
            TRUNCATED_PAGES.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not a page past a file's end: die of it as the default action does.
    // SAFETY: restoring the default disposition and re-raising are async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// A file mapped whole, then truncated by its owner: without the guard, reading its
    /// second page kills the test binary with SIGBUS; with it, the page reads as zeros
    /// and is counted, and the first page still holds the file's bytes.
    #[test]
    fn a_file_truncated_under_its_mapping_reads_as_zeros() {
        guard().unwrap();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![0xab; 4 * page]).unwrap();
        // SAFETY: the test owns the file; that it changes under the map is the point.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert_eq!(map[page], 0xab);
        file.set_len(page as u64).unwrap();
        let before = truncated_pages();
        let past_end: Vec<u8> = map[page..].iter().step_by(page).copied().collect();
        assert_eq!(past_end, vec![0; 3], "the three pages past the new end read as zeros");
        assert_eq!(truncated_pages() - before, 3);
        assert_eq!(map[0], 0xab, "the page still in the file is untouched");
    }
}
