//! What the symbolizer needs from a process, captured while it is alive: its name and
//! its executable mappings, with an open handle on each mapped file. A process that
//! exits before its samples are symbolized is resolved from this snapshot; files that
//! were deleted or live in another mount namespace stay readable through the handle.

use std::{
    collections::HashMap,
    fs::{self, File},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How long a process unseen by a per-process reader (Python, custom labels) keeps its
/// entry before it is looked for in /proc.
pub const FORGET_UNSEEN_AFTER: Duration = Duration::from_secs(120);

/// Removes and returns the entries of processes that are gone: those unseen for
/// [`FORGET_UNSEEN_AFTER`] whose /proc entry no longer exists; one unseen but alive is
/// marked seen now. Per-process readers call it at each window, so only processes
/// quiet for two minutes cost a look at /proc.
pub fn remove_gone<S>(entries: &mut HashMap<u32, S>, seen_at: impl Fn(&mut S) -> &mut Instant) -> Vec<(u32, S)> {
    let now = Instant::now();
    let mut gone = Vec::new();
    for (&pid, entry) in entries.iter_mut() {
        let seen = seen_at(entry);
        if now.duration_since(*seen) > FORGET_UNSEEN_AFTER {
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                *seen = now;
            } else {
                gone.push(pid);
            }
        }
    }
    gone.into_iter().filter_map(|pid| entries.remove_entry(&pid)).collect()
}

/// One executable, file-backed mapping.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    pub file: Arc<MappedFile>,
}

/// A mapped binary, identified by device and inode so each is opened and parsed once.
#[derive(Debug)]
pub struct MappedFile {
    /// (device, inode): the file's identity, unlike `handle_path`, whose fd number is
    /// reused once the handle is closed.
    pub id: (u64, u64),
    /// `/proc/self/fd/N` of our open handle: stable for as long as we hold it.
    pub handle_path: PathBuf,
    /// File name as the process mapped it, for `[unknown]` frames.
    pub name: String,
    /// GNU build id, hex: which build of a binary this is.
    pub build_id: Option<String>,
    _handle: File,
}

#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub name: String,
    /// Path of the executable; empty for kernel threads.
    pub exe: String,
    /// Arguments joined by spaces.
    pub cmdline: String,
    /// cgroup v2 path (or the systemd hierarchy's path on cgroup v1).
    pub cgroup: String,
    /// Session id (the pid of the session's leader, as `setsid` made it); 0 for
    /// kernel threads.
    pub session: u32,
    /// Real user id.
    pub uid: u32,
    /// Build id of the main executable: changes with every deploy of a new build.
    pub build_id: Option<String>,
    /// The version the process says it runs, from its environment (see [`version_of`]).
    pub version: Option<String>,
    pub mappings: Arc<[Mapping]>,
    pub last_seen: Instant,
    pub alive: bool,
}

impl ProcessInfo {
    pub fn mapping_for(&self, addr: u64) -> Option<&Mapping> {
        let index = self.mappings.partition_point(|m| m.start <= addr);
        let mapping = self.mappings.get(index.checked_sub(1)?)?;
        (addr < mapping.end).then_some(mapping)
    }
}

/// Bounded cache of process snapshots, shared by the watcher and the symbolizer.
#[derive(Clone)]
pub struct ProcessTable {
    inner: Arc<Mutex<Inner>>,
    /// Environment variables a process's version is read from (see [`version_of`]).
    version_env: Arc<[String]>,
}

/// Where a process's version is read from unless configured: OpenTelemetry's convention
/// first, then the two names services commonly set.
const DEFAULT_VERSION_ENV: [&str; 3] = ["OTEL_RESOURCE_ATTRIBUTES", "SERVICE_VERSION", "APP_VERSION"];

pub fn default_version_env() -> Vec<String> {
    DEFAULT_VERSION_ENV.map(String::from).to_vec()
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self::new(default_version_env())
    }
}

#[derive(Default)]
struct Inner {
    processes: HashMap<u32, ProcessInfo>,
    files: HashMap<(u64, u64), Arc<MappedFile>>,
    hits: u64,
    misses: u64,
}

/// Snapshots of exited processes are kept this long after death, so the window they died
/// in can still be symbolized.
const DEAD_PROCESS_TTL: Duration = Duration::from_secs(120);
/// Hard bound on tracked processes; the oldest dead ones go first.
const MAX_PROCESSES: usize = 8192;

impl ProcessTable {
    /// A table that reads versions from `version_env`; empty reads no environment.
    pub fn new(version_env: Vec<String>) -> Self {
        Self { inner: Arc::default(), version_env: version_env.into() }
    }

    /// Snapshots every process not seen before; refreshes none. Meant to run often.
    pub fn discover(&self) {
        let Ok(dir) = fs::read_dir("/proc") else { return };
        let pids: Vec<u32> = dir
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let known: Vec<u32> = {
            let inner = self.inner.lock().unwrap();
            pids.iter().copied().filter(|pid| !inner.processes.contains_key(pid)).collect()
        };
        for pid in known {
            self.refresh(pid);
        }
    }

    /// Re-reads a live process (its mappings may have changed: dlopen, exec); keeps the
    /// old snapshot and marks it dead when the process is gone.
    pub fn refresh(&self, pid: u32) {
        let snapshot = read_process(pid, &self.inner, &self.version_env);
        let mut inner = self.inner.lock().unwrap();
        match snapshot {
            Some(info) => {
                inner.processes.insert(pid, info);
            }
            None => {
                if let Some(info) = inner.processes.get_mut(&pid) {
                    info.alive = false;
                }
            }
        }
    }

    /// The processes snapshotted and still alive.
    pub fn live_pids(&self) -> Vec<u32> {
        self.inner.lock().unwrap().processes.iter().filter(|(_, info)| info.alive).map(|(&pid, _)| pid).collect()
    }

    pub fn get(&self, pid: u32) -> Option<ProcessInfo> {
        let mut inner = self.inner.lock().unwrap();
        let found = inner.processes.get(&pid).cloned();
        if found.is_some() {
            inner.hits += 1;
        } else {
            inner.misses += 1;
        }
        found
    }

    /// What the process has mapped, as last read: no strings copied, no look-up counted
    /// (for a caller that looks at every record, such as the labels reader).
    pub fn mappings(&self, pid: u32) -> Option<Arc<[Mapping]>> {
        self.inner.lock().unwrap().processes.get(&pid).map(|info| info.mappings.clone())
    }

    /// (hits, misses) of snapshot look-ups.
    pub fn cache_stats(&self) -> (u64, u64) {
        let inner = self.inner.lock().unwrap();
        (inner.hits, inner.misses)
    }

    /// Drops snapshots of processes dead for a while and files no snapshot maps any more.
    pub fn evict(&self) {
        let mut inner = self.inner.lock().unwrap();
        let now = Instant::now();
        for (pid, info) in inner.processes.iter_mut() {
            if info.alive && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                info.alive = false;
                info.last_seen = now;
            }
        }
        inner
            .processes
            .retain(|_, info| info.alive || now.duration_since(info.last_seen) < DEAD_PROCESS_TTL);
        if inner.processes.len() > MAX_PROCESSES {
            let mut by_age: Vec<(Instant, u32)> =
                inner.processes.iter().map(|(pid, info)| (info.last_seen, *pid)).collect();
            by_age.sort();
            let excess = inner.processes.len() - MAX_PROCESSES;
            for (_, pid) in by_age.into_iter().take(excess) {
                inner.processes.remove(&pid);
            }
        }
        // A file is in use while some snapshot holds it besides this table.
        inner.files.retain(|_, file| Arc::strong_count(file) > 1);
    }
}

fn read_process(pid: u32, inner: &Mutex<Inner>, version_env: &[String]) -> Option<ProcessInfo> {
    let name = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim_end().to_string();
    // What names the process is read before the maps, which take longest: a short
    // command may exit meanwhile.
    let session = fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|stat| session_of(&stat)).unwrap_or(0);
    let uid = fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|status| uid_of(&status)).unwrap_or(0);
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).map(|text| cgroup_path(&text)).unwrap_or_default();
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().trim_end_matches(" (deleted)").to_string())
        .unwrap_or_default();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).trim_end_matches('\0').replace('\0', " "))
        .unwrap_or_default();
    // The environment holds secrets too: read only when a version is wanted from it.
    let version = if version_env.is_empty() { None } else { read_environ(pid).and_then(|environ| version_of(&environ, version_env)) };
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut mappings = Vec::new();
    let mut build_id = None;
    for line in maps.lines() {
        let Some(parsed) = parse_maps_line(line) else { continue };
        let file = {
            let existing = inner.lock().unwrap().files.get(&(parsed.dev, parsed.inode)).cloned();
            match existing {
                Some(file) => file,
                None => {
                    let Some(file) = open_mapped_file(pid, &parsed) else { continue };
                    let file = Arc::new(file);
                    inner.lock().unwrap().files.insert((parsed.dev, parsed.inode), file.clone());
                    file
                }
            }
        };
        if build_id.is_none() && !exe.is_empty() && parsed.path.trim_end_matches(" (deleted)") == exe {
            build_id = file.build_id.clone();
        }
        mappings.push(Mapping {
            start: parsed.start,
            end: parsed.end,
            file_offset: parsed.offset,
            file,
        });
    }
    mappings.sort_by_key(|m| m.start);
    Some(ProcessInfo {
        name,
        exe,
        cmdline,
        cgroup,
        session,
        uid,
        build_id,
        version,
        mappings: mappings.into(),
        last_seen: Instant::now(),
        alive: true,
    })
}

/// Bytes of a process's environment read at most: versions are set near the start.
const MAX_ENVIRON: u64 = 256 << 10;

fn read_environ(pid: u32) -> Option<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    File::open(format!("/proc/{pid}/environ")).ok()?.take(MAX_ENVIRON).read_to_end(&mut out).ok()?;
    Some(out)
}

/// Longest version kept: a label, not a document.
const MAX_VERSION: usize = 64;

/// The version a process declares: the first of `names` set to a non-empty value in its
/// environment; of `OTEL_RESOURCE_ATTRIBUTES`, the `service.version` attribute.
pub fn version_of(environ: &[u8], names: &[String]) -> Option<String> {
    let vars: HashMap<&[u8], &[u8]> = environ
        .split(|&b| b == 0)
        .filter_map(|entry| {
            let eq = entry.iter().position(|&b| b == b'=')?;
            Some((&entry[..eq], &entry[eq + 1..]))
        })
        .collect();
    names.iter().find_map(|name| {
        let raw = *vars.get(name.as_bytes())?;
        let raw = if name == "OTEL_RESOURCE_ATTRIBUTES" {
            raw.split(|&b| b == b',').find_map(|kv| kv.trim_ascii().strip_prefix(b"service.version=").map(<[u8]>::trim_ascii))?
        } else {
            raw
        };
        let value = String::from_utf8_lossy(raw).trim().to_string();
        (!value.is_empty()).then(|| value.chars().take(MAX_VERSION).collect())
    })
}

/// The GNU build id of an ELF file, hex.
fn build_id_of(file: &File) -> Option<String> {
    use object::Object as _;
    // SAFETY: read-only; a file changed underneath can only yield a wrong id.
    let map = unsafe { memmap2::Mmap::map(file) }.ok()?;
    let elf = object::File::parse(&map[..]).ok()?;
    let id = elf.build_id().ok()??;
    Some(id.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The unified (v2) hierarchy's path, else the systemd one's, else any: the first that
/// is not the root (hybrid hosts may leave the unified hierarchy flat).
fn cgroup_path(text: &str) -> String {
    let entries: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers, path))
        })
        .filter(|(_, path)| *path != "/")
        .collect();
    entries
        .iter()
        .find(|(controllers, _)| controllers.is_empty())
        .or_else(|| entries.iter().find(|(controllers, _)| *controllers == "name=systemd"))
        .or(entries.first())
        .map(|(_, path)| path.to_string())
        .unwrap_or_default()
}

/// The session id in /proc/PID/stat: the fourth field after the command name, which
/// ends at the last `)` (a name may hold spaces and parentheses).
fn session_of(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(3)?.parse().ok()
}

/// The real uid in /proc/PID/status.
fn uid_of(status: &str) -> Option<u32> {
    status.lines().find_map(|line| line.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

struct MapsLine<'a> {
    start: u64,
    end: u64,
    offset: u64,
    dev: u64,
    inode: u64,
    path: &'a str,
}

/// Reads `buf.len()` bytes at `addr` of process `pid` (`process_vm_readv`); false
/// unless all were read.
pub fn read_memory(pid: u32, addr: u64, buf: &mut [u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: `local` covers `buf`, which outlives the call; the remote side is only read.
    let read = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    read == buf.len() as isize
}

/// The 8-byte little-endian word at `addr` in process `pid`, if readable.
pub fn read_word(pid: u32, addr: u64) -> Option<u64> {
    let mut bytes = [0u8; 8];
    read_memory(pid, addr, &mut bytes).then(|| u64::from_le_bytes(bytes))
}

/// A hash of the mappings' (start, file): it changes with an exec or a library loaded,
/// when what was found in a process is looked for again.
fn signature(mappings: &[Mapping]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for mapping in mappings {
        (mapping.start, mapping.file.id).hash(&mut hasher);
    }
    hasher.finish()
}

/// What a process had mapped when a reader last looked at it. The Python and labels
/// readers look at a process on its records, again every few seconds, and at once when
/// this tells an exec or a library loaded since: a process first seen between its fork
/// and its exec has its parent's mappings, and a runtime or an SDK is ready within
/// milliseconds of the exec.
#[derive(Clone, Copy, Debug, Default)]
pub struct MappingsSeen {
    signature: u64,
    /// Address of the table's list last compared: the table makes a new list whenever it
    /// reads the process again, so only then is one hashed. (An address reused by a later
    /// list leaves that change to the reader's next periodic look.)
    at: usize,
}

impl MappingsSeen {
    pub fn of(mappings: &Arc<[Mapping]>) -> Self {
        Self { signature: signature(mappings), at: list_address(mappings) }
    }

    /// Whether `other` maps what these did.
    pub fn same(&self, other: &MappingsSeen) -> bool {
        self.signature == other.signature
    }

    /// Whether the table's mappings of `pid` differ from these: a look-up, and a hash
    /// only of a list not compared before.
    pub fn changed(&mut self, table: &ProcessTable, pid: u32) -> bool {
        table.mappings(pid).is_some_and(|current| {
            let at = list_address(&current);
            at != self.at && {
                self.at = at;
                signature(&current) != self.signature
            }
        })
    }
}

fn list_address(mappings: &Arc<[Mapping]>) -> usize {
    Arc::as_ptr(mappings) as *const Mapping as usize
}

/// Parses an executable, file-backed line of /proc/PID/maps.
fn parse_maps_line(line: &str) -> Option<MapsLine<'_>> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode: u64 = fields.next()?.parse().ok()?;
    let path = fields.next().unwrap_or("").trim_start();
    if !perms.contains('x') || inode == 0 || !path.starts_with('/') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    Some(MapsLine {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (u64::from_str_radix(major, 16).ok()? << 32) | u64::from_str_radix(minor, 16).ok()?,
        inode,
        path,
    })
}

/// Opens the mapped file through `map_files`, which works for deleted files and other
/// mount namespaces, falling back to the path seen from the process's root.
fn open_mapped_file(pid: u32, line: &MapsLine<'_>) -> Option<MappedFile> {
    let via_map_files = format!("/proc/{pid}/map_files/{:x}-{:x}", line.start, line.end);
    let via_root = format!("/proc/{pid}/root{}", line.path.trim_end_matches(" (deleted)"));
    let handle = File::open(&via_map_files).or_else(|_| File::open(&via_root)).ok()?;
    let meta = handle.metadata().ok()?;
    if meta.ino() != line.inode {
        return None;
    }
    let name = line
        .path
        .trim_end_matches(" (deleted)")
        .rsplit('/')
        .next()
        .unwrap_or(line.path)
        .to_string();
    Some(MappedFile {
        id: (line.dev, line.inode),
        handle_path: PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&handle))),
        name,
        build_id: build_id_of(&handle),
        _handle: handle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a process unseen for long and gone from /proc is removed; an unseen live one
    /// is kept and marked seen, a recently seen one is not looked at.
    #[test]
    fn only_processes_gone_from_proc_are_removed() {
        let long_ago = Instant::now().checked_sub(FORGET_UNSEEN_AFTER * 2).expect("uptime over four minutes");
        let me = std::process::id();
        // Above the largest pid_max (2^22): never a live process.
        let gone = 1 << 23;
        let mut entries: HashMap<u32, Instant> = [(me, long_ago), (gone, long_ago), (gone + 1, Instant::now())].into();
        let removed = remove_gone(&mut entries, |seen| seen);
        assert_eq!(removed.iter().map(|(pid, _)| *pid).collect::<Vec<_>>(), vec![gone]);
        assert!(entries[&me] > long_ago, "a live process unseen is marked seen");
        assert!(entries.contains_key(&(gone + 1)), "one seen lately is not looked for");
    }

    #[test]
    fn versions_from_the_environment() {
        let env = |vars: &[&str]| vars.iter().flat_map(|v| v.bytes().chain([0])).collect::<Vec<u8>>();
        let defaults = default_version_env();
        let version = |vars: &[&str]| version_of(&env(vars), &defaults);
        assert_eq!(version(&["PATH=/bin", "SERVICE_VERSION=1.4.2"]), Some("1.4.2".into()));
        assert_eq!(
            version(&["APP_VERSION=9", "OTEL_RESOURCE_ATTRIBUTES=deployment.environment=prod, service.version=2.0.1 ,x=y"]),
            Some("2.0.1".into())
        );
        assert_eq!(version(&["APP_VERSION=9"]), Some("9".into()));
        // An empty or attribute-less first source leaves the next one to speak.
        assert_eq!(version(&["OTEL_RESOURCE_ATTRIBUTES=x=y", "SERVICE_VERSION=", "APP_VERSION=3"]), Some("3".into()));
        assert_eq!(version(&["SERVICE_VERSION=", "HOME=/root"]), None);
        assert_eq!(version(&[&format!("SERVICE_VERSION={}", "x".repeat(500))]).map(|v| v.len()), Some(MAX_VERSION));
        // Configured names replace the defaults.
        let own = ["GIT_COMMIT".to_string()];
        assert_eq!(version_of(&env(&["SERVICE_VERSION=1", "GIT_COMMIT=ab12"]), &own), Some("ab12".into()));
        assert_eq!(version_of(&env(&["SERVICE_VERSION=1"]), &own), None);
    }

    #[test]
    fn snapshots_carry_the_build_id_and_the_declared_version() {
        let mut child = std::process::Command::new("sleep").arg("30").env("SERVICE_VERSION", "1.5.0").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let table = ProcessTable::default();
        table.refresh(child.id());
        let info = table.get(child.id()).unwrap();
        // Configured not to read environments: no version.
        let private = ProcessTable::new(Vec::new());
        private.refresh(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(info.version.as_deref(), Some("1.5.0"));
        assert_eq!(private.get(child.id()).unwrap().version, None);
        let expected = build_id_of(&File::open(&info.exe).unwrap());
        assert!(expected.as_ref().is_some_and(|id| id.len() >= 16), "sleep has no build id: {expected:?}");
        assert_eq!(info.build_id, expected);
    }

    #[test]
    fn reads_session_and_uid() {
        assert_eq!(session_of("4242 (a) b (c)) S 1 4242 4200 34816 4242 4194560"), Some(4200));
        assert_eq!(uid_of("Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t0\n"), Some(1000));
        let own = read_process(std::process::id(), &Mutex::default(), &[]).unwrap();
        // SAFETY: getsid and getuid have no preconditions.
        assert_eq!(own.session, unsafe { libc::getsid(0) } as u32);
        assert_eq!(own.uid, unsafe { libc::getuid() });
    }

    #[test]
    fn picks_the_unified_cgroup_path() {
        assert_eq!(cgroup_path("0::/system.slice/checkout.service\n"), "/system.slice/checkout.service");
        let v1 = "12:cpu,cpuacct:/docker/abc\n1:name=systemd:/system.slice/docker-abc.scope\n0::/\n";
        assert_eq!(cgroup_path(v1), "/system.slice/docker-abc.scope");
    }

    #[test]
    fn parses_executable_file_mappings_only() {
        let exec = "55d4c2a00000-55d4c2a21000 r-xp 00002000 fd:01 1835041                    /usr/bin/cat";
        let parsed = parse_maps_line(exec).unwrap();
        assert_eq!(parsed.start, 0x55d4c2a00000);
        assert_eq!(parsed.end, 0x55d4c2a21000);
        assert_eq!(parsed.offset, 0x2000);
        assert_eq!(parsed.dev, (0xfd << 32) | 1);
        assert_eq!(parsed.path, "/usr/bin/cat");
        assert!(parse_maps_line("7ffd1000-7ffd2000 r-xp 00000000 00:00 0   [vdso]").is_none());
        assert!(parse_maps_line("55d4c2a00000-55d4c2a21000 r--p 00000000 fd:01 1835041   /usr/bin/cat").is_none());
    }

    #[test]
    fn snapshot_of_self_resolves_own_code() {
        let table = ProcessTable::default();
        let pid = std::process::id();
        table.refresh(pid);
        let info = table.get(pid).expect("own process snapshot");
        let addr = snapshot_of_self_resolves_own_code as *const () as u64;
        let mapping = info.mapping_for(addr).expect("own code is mapped");
        assert!(mapping.file.handle_path.exists());
    }
}
