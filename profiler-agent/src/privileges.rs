//! The daemon's own process: enough open files for a busy host, and no more privilege
//! than it needs once its BPF programs are loaded.
//!
//! Loading needs more than running (CAP_SYS_ADMIN turns on the kernel's BPF run-time
//! statistics). Once loaded, the daemon keeps only [`RUNTIME_CAPABILITIES`], in its
//! effective, permitted and bounding sets, with empty inheritable and ambient sets and
//! no_new_privs set. It stays uid 0, so files owned by root stay writable; what a bug in
//! the parsers of untrusted binaries and /proc files, or in the HTTP client, can no longer
//! do is everything else root can: override file permissions for writing, load kernel
//! modules, administer the system, or gain privileges through a program it runs.

use std::collections::BTreeSet;

use anyhow::{bail, Context as _};
use caps::{CapSet, Capability, CapsHashSet};

/// Open files the daemon asks for at most: it holds a handle on every binary mapped by
/// the processes it profiles, besides BPF maps, links and one perf event per CPU.
const WANTED_OPEN_FILES: u64 = 65536;

/// Raises the soft limit on open files to the hard limit, capped at [`WANTED_OPEN_FILES`]
/// (a higher soft limit is left alone). Returns the soft and hard limits now in force.
pub fn raise_open_files_limit() -> anyhow::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    let wanted = limit.rlim_max.min(WANTED_OPEN_FILES).max(limit.rlim_cur);
    if wanted > limit.rlim_cur {
        limit.rlim_cur = wanted;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
        }
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// The capabilities the daemon keeps after loading, and what each is for.
pub const RUNTIME_CAPABILITIES: [(Capability, &str); 6] = [
    (Capability::CAP_BPF, "loading the off-CPU program when a deep-profile run first turns it on"),
    (Capability::CAP_PERFMON, "re-attaching the perf events and the sched_switch raw tracepoint when a run changes the settings"),
    (Capability::CAP_SYS_PTRACE, "reading other processes' /proc/PID/maps, exe and root"),
    (Capability::CAP_DAC_READ_SEARCH, "reading binaries and perf maps of other users"),
    // Found missing by testing: with kptr_restrict >= 1, or perf_event_paranoid >= 2 as on
    // most distributions, /proc/kallsyms shows zero addresses to a reader without it, and
    // blazesym reads it when it names kernel frames.
    (Capability::CAP_SYSLOG, "naming kernel frames from /proc/kallsyms: without it they are [unknown] and off-CPU waits lose their reason"),
    // Found missing by testing: /proc/PID/map_files needs it (or CAP_SYS_ADMIN).
    (Capability::CAP_CHECKPOINT_RESTORE, "opening binaries deleted since they were mapped (upgraded packages) through /proc/PID/map_files"),
];

/// Keeps only [`RUNTIME_CAPABILITIES`] and sets no_new_privs; logs what is left.
///
/// Capabilities belong to threads, not to the process: this must run while the calling
/// thread is the only one, so that every thread started later inherits the reduced sets.
/// It fails otherwise. Started without some of the runtime capabilities (not as root),
/// it keeps those it has and says what will not work. Without CAP_SETPCAP the bounding
/// set cannot shrink; no_new_privs still stops a program it runs from gaining anything.
pub fn drop_capabilities() -> anyhow::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("listing /proc/self/task")?
        .count();
    if threads != 1 {
        bail!("capabilities must be dropped while the agent has one thread, it has {threads}: the others would keep theirs");
    }
    let wanted: Vec<Capability> = RUNTIME_CAPABILITIES.iter().map(|(cap, _)| *cap).collect();
    let permitted =
        caps::read(None, CapSet::Permitted).context("reading the permitted capabilities")?;
    for (cap, purpose) in RUNTIME_CAPABILITIES {
        if !permitted.contains(&cap) {
            tracing::warn!(capability = %cap, needed_for = purpose, "started without a capability sampling needs");
        }
    }
    keep_only(&wanted)?;

    let read = |set| caps::read(None, set).map(|caps| names(&caps));
    tracing::info!(
        effective = %read(CapSet::Effective)?,
        permitted = %read(CapSet::Permitted)?,
        bounding = %read(CapSet::Bounding)?,
        no_new_privs = true,
        "capabilities dropped to what sampling needs"
    );
    Ok(())
}

/// Keeps only those of `wanted` the calling thread has, in its effective, permitted and
/// bounding sets (the bounding set only with CAP_SETPCAP), clears the inheritable and
/// ambient sets and sets no_new_privs.
pub fn keep_only(wanted: &[Capability]) -> anyhow::Result<()> {
    let wanted: CapsHashSet = wanted.iter().copied().collect();
    let permitted =
        caps::read(None, CapSet::Permitted).context("reading the permitted capabilities")?;
    let bounding = caps::read(None, CapSet::Bounding).context("reading the bounding set")?;
    let extra: CapsHashSet = bounding.difference(&wanted).copied().collect();
    if !extra.is_empty() {
        if permitted.contains(&Capability::CAP_SETPCAP) {
            caps::raise(None, CapSet::Effective, Capability::CAP_SETPCAP)
                .context("raising CAP_SETPCAP")?;
            for &cap in &extra {
                caps::drop(None, CapSet::Bounding, cap)
                    .with_context(|| format!("dropping {cap} from the bounding set"))?;
            }
        } else {
            tracing::warn!(left = %names(&extra), "without CAP_SETPCAP the bounding set cannot shrink");
        }
    }

    let keep: CapsHashSet = permitted.intersection(&wanted).copied().collect();
    // The effective set must stay within the permitted one at every step.
    caps::set(None, CapSet::Effective, &keep).context("setting the effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting the permitted capabilities")?;
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable capabilities")?;
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    Ok(())
}

/// Sorted, comma-separated.
fn names(set: &CapsHashSet) -> String {
    set.iter()
        .map(ToString::to_string)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(",")
}
