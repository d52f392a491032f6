//! Developer tasks: `cargo xtask setup | test | demo | kernels | bench ...`.

mod bench;
mod demo;
mod kernels;
mod layers;
mod setup;
mod test;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer tasks for the profiler workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (rust-src, bpf-linker, perf, bpftrace,
    /// qemu, tracefs). Idempotent: does nothing that is already done.
    Setup,
    /// Build every test once and run the whole suite, including the tests that load BPF
    /// programs (needs root) and the web UI's browser tests; prints where the time went.
    Test {
        /// The inner loop: unit tests, the server's integration tests and one end-to-end
        /// smoke test (no browser tests).
        #[arg(long)]
        quick: bool,
        /// Arguments for every test binary, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the whole product on this host: server (embedded store), agent, a demo
    /// workload, and the web UI address. Needs root. Ctrl-C stops everything.
    Demo {
        #[arg(long, default_value_t = 4040)]
        port: u16,
        #[arg(long, default_value = "target/demo-data")]
        data_dir: std::path::PathBuf,
    },
    /// Boot Debian's own kernels under qemu and check the agent's off-CPU recording of a
    /// test workload in each (and on this host): per-thread totals against the threads'
    /// own clocks, wait reasons, BPF programs' costs. Needs root for the host row.
    Kernels {
        /// `6.1`, `6.12`, `host` or `all`.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Keep the work directory (initramfs, console logs) under target/kernels/work.
        #[arg(long)]
        keep: bool,
        /// Check this agent binary instead of building the workspace's.
        #[arg(long)]
        agent: Option<std::path::PathBuf>,
    },
    /// Check that the top-level modules of each library crate import each other one way
    /// only (no import cycle); `test` runs it first.
    Layers,
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { quick, args } => test::run_tests(test::Options { quick, args }),
        Task::Demo { port, data_dir } => demo::run(demo::Options { port, data_dir: root().join(data_dir) }),
        Task::Kernels { kernel, keep, agent } => {
            let options = kernels::Options { kernel, keep, agent: agent.map(|a| root().join(a)) };
            kernels::ensure_passed(&kernels::run(&options)?)
        }
        Task::Bench { bench } => bench::run(bench),
        Task::Layers => layers::run(&root()),
    }
}

pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(cargo_command().args(args))
}

/// The cargo that runs xtask.
pub fn cargo_command() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}
