//! The daemon's own process: enough open files for a busy host, and no more privilege
//! than it needs once its BPF programs are loaded.
//!
//! Loading needs more than running (CAP_SYS_ADMIN turns on the kernel's BPF run-time
//! statistics). Once loaded, a daemon started as root becomes an unprivileged user
//! (`privileges.user`, 65534:65534, nobody, by default) and keeps only [`RUNTIME_CAPABILITIES`], in
//! its effective, permitted and bounding sets, with empty inheritable and ambient sets,
//! no supplementary groups and no_new_privs set. What a bug in the parsers of untrusted
//! binaries and /proc files, or in the HTTP client, can no longer do is what root can:
//! write files root owns (/etc, the agent's own binary), override file permissions for
//! writing, load kernel modules, administer the system, or gain privileges through a
//! program it runs. Changing uid also makes the process non-dumpable, so other processes
//! of that user cannot ptrace it or read its memory.

use std::{collections::BTreeSet, ffi::CString, path::Path};

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
    (Capability::CAP_SYS_PTRACE, "reading other processes' /proc/PID/maps, exe and root, and Python code objects from their memory"),
    (Capability::CAP_DAC_READ_SEARCH, "reading binaries and perf maps of other users"),
    // Found missing by testing: with kptr_restrict >= 1, or perf_event_paranoid >= 2 as on
    // most distributions, /proc/kallsyms shows zero addresses to a reader without it, and
    // blazesym reads it when it names kernel frames.
    (Capability::CAP_SYSLOG, "naming kernel frames from /proc/kallsyms: without it they are [unknown] and off-CPU waits lose their reason"),
    // Found missing by testing: /proc/PID/map_files needs it (or CAP_SYS_ADMIN).
    (Capability::CAP_CHECKPOINT_RESTORE, "opening binaries deleted since they were mapped (upgraded packages) through /proc/PID/map_files"),
];

/// A user to run as: its uid and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl User {
    /// `UID:GID`, or a user name: its uid and primary group from the user database.
    pub fn resolve(spec: &str) -> anyhow::Result<Self> {
        if let Some((uid, gid)) = spec.split_once(':') {
            let number = |n: &str| n.parse::<u32>().with_context(|| format!("{n:?} in {spec:?} is not a number"));
            return Ok(User { uid: number(uid)?, gid: number(gid)? });
        }
        let name = CString::new(spec).context("a user name with a NUL byte")?;
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let mut buffer = vec![0 as libc::c_char; 16 << 10];
        let err = unsafe { libc::getpwnam_r(name.as_ptr(), &mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found) };
        if err != 0 {
            return Err(std::io::Error::from_raw_os_error(err)).with_context(|| format!("looking up user {spec:?}"));
        }
        if found.is_null() {
            bail!("no user {spec:?} on this host: create it, or give UID:GID");
        }
        Ok(User { uid: entry.pw_uid, gid: entry.pw_gid })
    }
}

/// Becomes `user` (uid, gid, no supplementary groups), keeping the permitted
/// capabilities for [`keep_only`] to trim, and hands it `own` first: directories the
/// daemon writes to, with their entries. Does nothing when not running as root (started
/// as a user with ambient capabilities, there is nothing to leave) or when `user` is
/// root, which it warns about.
fn become_user(user: User, own: &[&Path]) -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    if user.uid == 0 {
        tracing::warn!("privileges.user is root: the agent keeps uid 0, and with it every file root owns");
        return Ok(());
    }
    for dir in own {
        let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        for path in entries.map(|e| e.map(|e| e.path())).chain([Ok(dir.to_path_buf())]) {
            let path = path?;
            std::os::unix::fs::lchown(&path, Some(user.uid), Some(user.gid))
                .with_context(|| format!("handing {} to uid {}", path.display(), user.uid))?;
        }
    }
    let check = |result: libc::c_int, what: &str| match result {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()).context(what.to_string()),
    };
    unsafe {
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0), "keeping capabilities across the uid change")?;
        check(libc::setgroups(0, std::ptr::null()), "dropping supplementary groups")?;
        check(libc::setresgid(user.gid, user.gid, user.gid), "changing group")?;
        check(libc::setresuid(user.uid, user.uid, user.uid), "changing user")?;
        check(libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0), "clearing keep-capabilities")?;
    }
    Ok(())
}

/// Becomes `user` (see [`become_user`]), keeps only [`RUNTIME_CAPABILITIES`] and sets
/// no_new_privs; logs what is left.
///
/// Capabilities and credentials belong to threads, not to the process: this must run
/// while the calling thread is the only one, so that every thread started later inherits
/// them. It fails otherwise. Started without some of the runtime capabilities (not as
/// root), it keeps those it has and says what will not work. Without CAP_SETPCAP the
/// bounding set cannot shrink; no_new_privs still stops a program it runs from gaining
/// anything.
pub fn drop_privileges(user: User, own: &[&Path]) -> anyhow::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("listing /proc/self/task")?
        .count();
    if threads != 1 {
        bail!("privileges must be dropped while the agent has one thread, it has {threads}: the others would keep theirs");
    }
    become_user(user, own)?;
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
        uid = unsafe { libc::geteuid() },
        gid = unsafe { libc::getegid() },
        effective = %read(CapSet::Effective)?,
        permitted = %read(CapSet::Permitted)?,
        bounding = %read(CapSet::Bounding)?,
        no_new_privs = true,
        "privileges dropped to what sampling needs"
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_resolve_by_name_or_number() {
        assert_eq!(User::resolve("root").unwrap(), User { uid: 0, gid: 0 });
        assert_eq!(User::resolve("123:456").unwrap(), User { uid: 123, gid: 456 });
        assert!(User::resolve("12:x").is_err());
        let err = User::resolve("no-such-user-here").unwrap_err();
        assert!(format!("{err:#}").contains("UID:GID"), "{err:#}");
    }
}
