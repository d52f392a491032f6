//! Test workload with known hot and waiting functions. Built with frame pointers (see
//! .cargo/config.toml), and once more without them for the unwinding test (see its
//! Cargo.toml). Prints a JSON report on stdout.
//!
//! Modes:
//! - `burn SECONDS [THREADS]`: THREADS (default 1) threads spin in `burn_cpu` (which calls
//!   `step_a`, `step_b`, `step_c` in a 5:3:2 ratio) until each used SECONDS of CPU time.
//! - `mixed SECONDS [EXTRA_BURNERS]`: threads `wl-burn` (burn_cpu), `wl-sleep`
//!   (nanosleep loop in wait_sleep) and `wl-disk` (write + fsync + read in wait_disk) for
//!   SECONDS of wall time; EXTRA_BURNERS more spinning threads oversubscribe the CPUs.
//! - `hash ITERATIONS THREADS`: fixed amount of hashing per thread, for overhead benchmarks.
//! - `serve SECONDS VARIANT [THREADS]`: THREADS (default 2) threads `wl-serve` handle
//!   requests for SECONDS: each burns about 5 ms in `handle_request` (`step_a`, `step_b`,
//!   `step_c` at 5:3:2). VARIANT `base` is that; `cpu` gives `step_c` 3/2 of its work (6
//!   to 8 points more of the CPU); `io` adds `slow_read` to every request: O_DIRECT reads
//!   until 20 ms of wall time passed. No variant waits for the disk otherwise: how long
//!   an fsync takes changes with whatever else the host writes, so two runs of the same
//!   variant would not be alike.
//!
//! The workload waits for a line on stdin before starting when `--wait` is first, so a
//! profiler can attach to its pid first.

use std::{
    hint::black_box,
    io::{BufRead as _, Read as _, Seek as _, Write as _},
    time::{Duration, Instant},
};

/// Inlined into each caller, so self time lands in step_a/b/c in a 5:3:2 ratio.
#[inline(always)]
fn step(rounds: u64, seed: u64) -> u64 {
    let mut x = seed;
    for _ in 0..rounds {
        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
        x ^= x >> 29;
    }
    x
}

/// `scale` is in eighths, so an iteration's length varies while the 5:3:2 ratio holds.
#[inline(never)]
fn step_a(seed: u64, scale: u64) -> u64 {
    step(50_000 * scale / 8, seed)
}

#[inline(never)]
fn step_b(seed: u64, scale: u64) -> u64 {
    step(30_000 * scale / 8, seed)
}

#[inline(never)]
fn step_c(seed: u64, scale: u64) -> u64 {
    step(20_000 * scale / 8, seed)
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Spins until `cpu` of this thread's CPU time is used or `wall` has passed.
#[inline(never)]
fn burn_cpu(cpu: Duration, wall: Duration) -> Duration {
    let start_cpu = thread_cpu_time();
    let start = Instant::now();
    let mut x = 1u64;
    while thread_cpu_time() - start_cpu < cpu && start.elapsed() < wall {
        // A loop of fixed length can alias with a fixed sampling period and put most
        // samples in one step; a random length (4/8 to 12/8) spreads them by time spent.
        let scale = 4 + (x >> 32) % 9;
        x = step_a(x, scale);
        x = step_b(x, scale);
        x = step_c(x, scale);
    }
    black_box(x);
    thread_cpu_time() - start_cpu
}

/// Sleeps in 10 ms naps until `wall` has passed; returns the time spent.
#[inline(never)]
fn wait_sleep(wall: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < wall {
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// Synchronous writes with fsync and reads back, until `wall` has passed.
#[inline(never)]
fn wait_disk(wall: Duration) -> anyhow::Result<Duration> {
    let mut file = tempfile::tempfile_in(std::env::var("WORKLOAD_DIR").unwrap_or_else(|_| "/var/tmp".into()))?;
    let block = vec![0x5au8; 64 * 1024];
    let mut read_back = vec![0u8; block.len()];
    let start = Instant::now();
    while start.elapsed() < wall {
        file.write_all(&block)?;
        file.sync_all()?;
        file.seek(std::io::SeekFrom::Start(0))?;
        file.read_exact(&mut read_back)?;
        file.seek(std::io::SeekFrom::End(0))?;
        if file.stream_position()? > 64 << 20 {
            file.set_len(0)?;
            file.seek(std::io::SeekFrom::Start(0))?;
        }
    }
    Ok(start.elapsed())
}

#[inline(never)]
fn hash_rounds(iterations: u64, seed: u64) -> u64 {
    step(iterations, seed)
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Base,
    Cpu,
    Io,
}

#[inline(never)]
fn handle_request(seed: u64, variant: Variant) -> u64 {
    let scale = 4 + (seed >> 32) % 9;
    let mut x = step_a(seed, scale);
    x = step_b(x, scale);
    step_c(x, if variant == Variant::Cpu { scale * 3 / 2 } else { scale })
}

/// Bytes of one O_DIRECT read: large enough that the device takes over the
/// agent's 1 ms `min_block` to serve it.
const DIRECT_READ: usize = 4 << 20;

/// A page-aligned buffer, as O_DIRECT reads need.
struct Aligned(*mut u8);

impl Aligned {
    const LAYOUT: std::alloc::Layout = match std::alloc::Layout::from_size_align(DIRECT_READ, 4096) {
        Ok(l) => l,
        Err(_) => panic!("a page-aligned read buffer is a valid layout"),
    };
    fn new() -> Aligned {
        Aligned(unsafe { std::alloc::alloc_zeroed(Self::LAYOUT) })
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.0, Self::LAYOUT) };
    }
}

/// Reads with O_DIRECT (past the page cache, so the thread waits for the device in D
/// state: blocked-io) until 20 ms of wall time passed.
#[inline(never)]
fn slow_read(fd: i32, buf: &Aligned, seed: &mut u64) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(20) {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let offset = ((*seed >> 33) % 4) as i64 * DIRECT_READ as i64;
        let n = unsafe { libc::pread(fd, buf.0.cast(), DIRECT_READ, offset) };
        anyhow::ensure!(n == DIRECT_READ as isize, "O_DIRECT read: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A file of four reads to read back with O_DIRECT, removed when dropped.
fn direct_file(dir: &std::path::Path) -> anyhow::Result<(tempfile::TempPath, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&vec![0x5au8; 4 * DIRECT_READ])?;
    tmp.as_file().sync_all()?;
    let path = tmp.into_temp_path();
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path)?;
    Ok((path, file))
}

/// Handles requests until `wall` has passed; returns how many.
fn serve(wall: Duration, variant: Variant) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let dir = std::path::PathBuf::from(std::env::var("WORKLOAD_DIR").unwrap_or_else(|_| "/var/tmp".into()));
    let (_direct_path, direct) = direct_file(&dir)?;
    let buf = Aligned::new();
    let start = Instant::now();
    let (mut requests, mut x) = (0u64, 1u64);
    while start.elapsed() < wall {
        // About 5 ms of CPU per request at this machine's speed.
        let cpu = thread_cpu_time();
        while thread_cpu_time() - cpu < Duration::from_millis(5) {
            x = handle_request(x, variant);
        }
        if variant == Variant::Io {
            slow_read(direct.as_raw_fd(), &buf, &mut x)?;
        }
        requests += 1;
    }
    black_box(x);
    Ok(requests)
}

fn named<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new().name(name.into()).spawn(f).expect("spawn")
}

fn gettid() -> i64 {
    unsafe { libc::syscall(libc::SYS_gettid) }
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--wait") {
        args.remove(0);
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
    }
    let arg = |i: usize, default: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let started = Instant::now();
    let report = match args.first().map(String::as_str) {
        Some("burn") => {
            let seconds = Duration::from_secs_f64(arg(1, 3.0));
            let threads = arg(2, 1.0) as usize;
            let burners: Vec<_> = (0..threads)
                .map(|_| named("wl-burn", move || burn_cpu(seconds, seconds * 3)))
                .collect();
            let cpu: Duration = burners.into_iter().map(|b| b.join().expect("burner")).sum();
            serde_json::json!({ "burn_cpu_s": cpu.as_secs_f64() })
        }
        Some("mixed") => {
            let wall = Duration::from_secs_f64(arg(1, 5.0));
            let extra = arg(2, 0.0) as usize;
            let burner = named("wl-burn", move || (gettid(), burn_cpu(wall * 10, wall)));
            let sleeper = named("wl-sleep", move || (gettid(), wait_sleep(wall)));
            let disk = named("wl-disk", move || (gettid(), wait_disk(wall)));
            let extras: Vec<_> = (0..extra).map(|_| named("wl-extra", move || burn_cpu(wall * 10, wall))).collect();
            let (burn_tid, burn_cpu_time) = burner.join().expect("burner");
            let (sleep_tid, sleep_wall) = sleeper.join().expect("sleeper");
            let (disk_tid, disk_wall) = disk.join().expect("disk");
            let disk_wall = disk_wall?;
            for extra in extras {
                extra.join().expect("extra burner");
            }
            serde_json::json!({
                "burn_tid": burn_tid, "burn_cpu_s": burn_cpu_time.as_secs_f64(),
                "sleep_tid": sleep_tid, "sleep_wall_s": sleep_wall.as_secs_f64(),
                "disk_tid": disk_tid, "disk_wall_s": disk_wall.as_secs_f64(),
            })
        }
        Some("hash") => {
            let iterations = arg(1, 2e8) as u64;
            let threads = arg(2, 2.0) as u64;
            let workers: Vec<_> = (0..threads).map(|t| named("wl-hash", move || hash_rounds(iterations, t))).collect();
            for worker in workers {
                black_box(worker.join().expect("hasher"));
            }
            serde_json::json!({})
        }
        Some("serve") => {
            let wall = Duration::from_secs_f64(arg(1, 10.0));
            let variant = match args.get(2).map(String::as_str) {
                Some("base") | None => Variant::Base,
                Some("cpu") => Variant::Cpu,
                Some("io") => Variant::Io,
                Some(other) => anyhow::bail!("unknown serve variant {other:?}: base, cpu or io"),
            };
            let threads = arg(3, 2.0) as usize;
            let workers: Vec<_> = (0..threads).map(|_| named("wl-serve", move || serve(wall, variant))).collect();
            let mut requests = 0;
            for worker in workers {
                requests += worker.join().expect("server thread")?;
            }
            serde_json::json!({ "requests": requests })
        }
        _ => anyhow::bail!("usage: workload [--wait] burn SECONDS [THREADS] | mixed SECONDS [EXTRA_BURNERS] | hash ITERATIONS THREADS | serve SECONDS base|cpu|io [THREADS]"),
    };
    let mut report = report;
    report["pid"] = std::process::id().into();
    report["wall_s"] = started.elapsed().as_secs_f64().into();
    report["process_cpu_s"] = process_cpu_time().as_secs_f64().into();
    println!("{report}");
    Ok(())
}
