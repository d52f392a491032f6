//! What the agent's BPF programs cost in the kernel, from the kernel's BPF run-time
//! statistics (`BPF_ENABLE_STATS`), kept on only a share of the time.
//!
//! While on, the statistics add two clock reads to every run of every BPF program on the
//! host: about 3% of a benchmark that switches context 700,000 times a second on one
//! CPU, more than the unsampled off-CPU path itself. So they are on for `share` of each
//! [`CYCLE`], and each program's runs and run time over a cycle are estimated from the
//! time they were on.
//!
//! Turning them on takes CAP_SYS_ADMIN, which the daemon gives up once its programs are
//! loaded. A helper process started before that keeps it and nothing else: the agent's
//! own executable run as `bpf-stats-helper`, which reads one byte at a time from its
//! standard input (`1` on, `0` off), answers each with one byte, and exits when its input
//! closes. It parses nothing else, so what a bug in the agent's parsers could do with
//! it is turn the statistics on or off.
//!
//! Any executable that embeds a sampler must opt in to serving as its own helper, by
//! calling [`serve_helper_if_started_as_one`] first thing in `main`. Without it the
//! sampler reports no costs: starting an executable that does not know the command
//! would run its `main` again, which for a program that starts a sampler repeats
//! without end.

use std::{
    io::{Read, Write},
    os::fd::OwnedFd,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};


/// In-kernel cost of one of the agent's BPF programs since it was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramCost {
    pub run_time_ns: u64,
    pub runs: u64,
}

/// The agent's BPF programs, by name.
pub const PROGRAMS: [&str; 4] = ["on_cpu_sample", "sched_switch", "sched_process_fork", "finish_task_switch"];

/// How often the statistics come on.
pub const CYCLE: Duration = Duration::from_secs(10);

/// The argument the helper is started with.
pub const HELPER_COMMAND: &str = "bpf-stats-helper";

/// Set once this executable has shown it runs the helper when started as one.
static SERVES_HELPER: AtomicBool = AtomicBool::new(false);

/// For the start of `main` in every executable that embeds a sampler: when started as
/// the statistics helper, serves it and returns its result, for `main` to return;
/// otherwise returns None, and the sampler may from then on start this executable as
/// its helper.
pub fn serve_helper_if_started_as_one() -> Option<anyhow::Result<()>> {
    if std::env::args_os().nth(1).is_some_and(|arg| arg == HELPER_COMMAND) {
        return Some(serve_helper());
    }
    SERVES_HELPER.store(true, Ordering::Relaxed);
    None
}

/// Whether the kernel's BPF run-time statistics are on for the whole host (the sysctl,
/// not a descriptor): then every program's counters count all the time, exact, and a
/// helper toggling its own share would only estimate them.
fn on_host_wide() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|value| value.trim() == "1")
}

/// Turns the kernel's BPF run-time statistics on: they stay on while the returned
/// descriptor is open.
fn enable() -> anyhow::Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|err| anyhow::anyhow!("BPF_ENABLE_STATS: {err}"))
}

/// Each program's estimated runs and run time since the sampler started.
pub struct RunStats {
    switch: Switch,
    /// Share of each cycle the statistics are on, in (0, 1].
    share: f64,
    /// When the statistics came on, while they are.
    on_since: Option<Instant>,
    cycle_start: Instant,
    /// The kernel's counters when the statistics came on.
    at_on: [ProgramCost; PROGRAMS.len()],
    estimate: [ProgramCost; PROGRAMS.len()],
}

enum Switch {
    /// On for good (share 1): the counters are exact. The statistics stay on while the
    /// descriptor is open.
    Held { _fd: OwnedFd },
    /// On host-wide already (`kernel.bpf_stats_enabled`): exact, and left alone.
    Host,
    Helper(Helper),
    /// The helper failed: the estimate stays where it was.
    Failed,
}

impl RunStats {
    /// Statistics on for `share` of the time (1: always), starting now; None, after a
    /// warning, when the kernel or the helper refuses.
    pub fn start(share: f64, read: impl FnOnce() -> [ProgramCost; PROGRAMS.len()]) -> Option<Self> {
        let switch = if on_host_wide() {
            // Someone turned them on for the whole host (bpftool, an SRE): the counters
            // are exact while they stay on, and turning them off is not ours to do.
            tracing::info!("BPF run-time statistics are on host-wide (kernel.bpf_stats_enabled): the programs' cost is read, not estimated");
            Ok(Switch::Host)
        } else if share >= 1.0 { enable().map(|fd| Switch::Held { _fd: fd }) } else { Helper::spawn().map(Switch::Helper) };
        let switch = match switch {
            Ok(switch) => switch,
            Err(err) => {
                tracing::warn!("cannot turn on BPF run-time statistics, the programs' cost is not reported: {err:#}");
                return None;
            }
        };
        let now = Instant::now();
        Some(Self { switch, share, on_since: Some(now), cycle_start: now, at_on: read(), estimate: Default::default() })
    }

    /// Turns the statistics off once their share of the cycle has passed, and on again
    /// when the next cycle starts. Call often (every 100 ms); `read` gives the kernel's
    /// counters.
    pub fn tick(&mut self, read: impl FnOnce() -> [ProgramCost; PROGRAMS.len()]) {
        let Switch::Helper(helper) = &mut self.switch else { return };
        let now = Instant::now();
        let result = match self.on_since {
            Some(since) if now - since >= CYCLE.mul_f64(self.share) => {
                let counters = read();
                // Runs while they were on stand for the whole cycle.
                let scale = CYCLE.as_secs_f64() / (now - since).as_secs_f64();
                for ((estimate, now), before) in self.estimate.iter_mut().zip(counters).zip(self.at_on) {
                    estimate.runs += (now.runs.saturating_sub(before.runs) as f64 * scale) as u64;
                    estimate.run_time_ns += (now.run_time_ns.saturating_sub(before.run_time_ns) as f64 * scale) as u64;
                }
                self.on_since = None;
                helper.set(false)
            }
            None if now - self.cycle_start >= CYCLE => {
                let result = helper.set(true);
                self.at_on = read();
                self.cycle_start = now;
                self.on_since = Some(now);
                result
            }
            _ => Ok(()),
        };
        if let Err(err) = result {
            tracing::warn!("BPF run-time statistics helper failed, the programs' cost is no longer updated: {err:#}");
            self.switch = Switch::Failed;
        }
    }

    /// Each program's runs and run time: exact when the statistics are always on,
    /// otherwise estimated from the cycles completed so far.
    pub fn costs(&self, read: impl FnOnce() -> [ProgramCost; PROGRAMS.len()]) -> [ProgramCost; PROGRAMS.len()] {
        match self.switch {
            Switch::Held { .. } | Switch::Host => read(),
            Switch::Helper(_) | Switch::Failed => self.estimate,
        }
    }
}

/// The privileged helper process, seen from the agent.
struct Helper {
    child: Child,
    /// Always Some but in `drop`, which closes it first.
    input: Option<ChildStdin>,
    output: ChildStdout,
}

impl Helper {
    /// Starts the helper and has it turn the statistics on.
    fn spawn() -> anyhow::Result<Self> {
        if !SERVES_HELPER.load(Ordering::Relaxed) {
            bail!(
                "this executable cannot serve as the statistics helper: its main must call \
                 profiler_agent::cost::serve_helper_if_started_as_one first (or use a share of 1)"
            );
        }
        let mut child = Command::new("/proc/self/exe")
            .arg(HELPER_COMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the statistics helper")?;
        let input = child.stdin.take().expect("piped");
        let output = child.stdout.take().expect("piped");
        let mut helper = Self { child, input: Some(input), output };
        helper.set(true)?;
        Ok(helper)
    }

    fn set(&mut self, on: bool) -> anyhow::Result<()> {
        let input = self.input.as_mut().expect("open until drop");
        input.write_all(if on { b"1" } else { b"0" }).context("writing to the statistics helper")?;
        let mut answer = [0u8];
        self.output.read_exact(&mut answer).context("reading the statistics helper's answer")?;
        if answer[0] != b'+' {
            bail!("the statistics helper could not turn them {}", if on { "on" } else { "off" });
        }
        Ok(())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // It exits once its input closes. The kill spares waiting for that, but fails
        // once the agent runs as another user than the helper (root): closing comes
        // first, so the wait ends either way.
        drop(self.input.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The helper's main: keeps only CAP_SYS_ADMIN, then serves `1`/`0` from standard input
/// until it closes, which it does when the agent exits, however it exits.
fn serve_helper() -> anyhow::Result<()> {
    crate::privileges::keep_only(&[caps::Capability::CAP_SYS_ADMIN])?;
    let (mut input, mut output) = (std::io::stdin().lock(), std::io::stdout().lock());
    let mut held: Option<OwnedFd> = None;
    let mut command = [0u8];
    while input.read_exact(&mut command).is_ok() {
        let ok = match command[0] {
            b'1' if held.is_some() => true,
            b'1' => match enable() {
                Ok(fd) => {
                    held = Some(fd);
                    true
                }
                Err(_) => false,
            },
            b'0' => {
                held = None;
                true
            }
            _ => false,
        };
        output.write_all(if ok { b"+" } else { b"-" })?;
        output.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_executable_that_did_not_opt_in_is_never_started_as_the_helper() {
        // This test binary's main does not serve the helper: started with the helper's
        // argument it would run its tests again instead.
        let err = Helper::spawn().err().expect("the helper was started");
        assert!(format!("{err:#}").contains("cannot serve as the statistics helper"), "{err:#}");
    }
}
