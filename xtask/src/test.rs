//! `cargo xtask test`: builds every test once, runs each test binary itself, then the web
//! UI's browser tests, and prints where the time went.
//!
//! cargo would run the test binaries one after another too; running them here lets each
//! be timed, lets the end-to-end binary overlap its tests that only wait on the wall
//! clock, and keeps going after a failure so one run shows every failing binary.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{root, run};

/// The end-to-end test that `--quick` runs: the agent's programs load on this kernel, a
/// workload's on- and off-CPU stacks reach a real server under the service its cgroup
/// names, and the server answers queries on them.
const SMOKE_TEST: &str = "daemon::workload_in_checkout_service_cgroup_shows_up_as_checkout";

pub struct Options {
    /// Unit tests, the server's integration tests and one end-to-end smoke test.
    pub quick: bool,
    /// Passed to every test binary (a name filter, `--nocapture`, ...).
    pub args: Vec<String>,
}

/// One test binary cargo built.
struct TestBinary {
    /// `profiler-server it`, `profiler-pprof (unit)`.
    name: String,
    executable: PathBuf,
    /// The package's directory: cargo runs tests there, and some read files next to them.
    package_dir: PathBuf,
    unit: bool,
}

/// What a step took and whether it passed.
struct Step {
    name: String,
    took: Duration,
    passed: bool,
    /// The first line of why it failed, where the step knows: CI keeps a log's head and
    /// tail, and a kernel's report sits in the part it cuts.
    why: Option<String>,
}

pub fn run_tests(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut steps = Vec::new();
    let layers = crate::layers::run(&root());
    if let Err(err) = &layers {
        eprintln!("{err:#}");
    }
    steps.push(Step { name: "module layers".into(), took: started.elapsed(), passed: layers.is_ok(), why: None });

    let build = Instant::now();
    let Built { tests, server } = build_all()?;
    if !options.quick {
        build_workload_without_frame_pointers()?;
    }
    steps.push(Step { name: "build".into(), took: build.elapsed(), passed: true, why: None });

    for binary in &tests {
        let mut args = options.args.clone();
        if options.quick && !binary.unit {
            match binary.name.as_str() {
                "profiler-server it" => {}
                "profiler-tests e2e" => args.extend([SMOKE_TEST.into(), "--exact".into()]),
                _ => continue,
            }
        }
        steps.push(run_binary(binary, &args));
    }

    if !options.quick {
        steps.push(browser_tests(&server));
        steps.extend(kernel_matrix());
    }
    print_table(&steps, started.elapsed());
    let failed: Vec<&str> = steps.iter().filter(|s| !s.passed).map(|s| s.name.as_str()).collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The Rust workload as production Rust is built, without frame pointers, into
/// `target/no-frame-pointers/release` (where the unwinding test looks for it): the
/// workspace forces them on everything, and a test of unwinding through `.eh_frame` on
/// a binary that has them cannot tell it from following the frame pointers. A target
/// directory of its own, as other flags rebuild every crate (here libc and the workload).
fn build_workload_without_frame_pointers() -> anyhow::Result<()> {
    let target_dir = crate::root().join("target/no-frame-pointers");
    crate::run(
        crate::cargo_command()
            .args(["build", "--release", "--quiet", "-p", "profiler-workload", "--target-dir"])
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C force-frame-pointers=no"),
    )
}

struct Built {
    /// Unit tests first: the quickest to fail. Then by name, so runs compare line by line.
    tests: Vec<TestBinary>,
    /// The server binary the browser tests run.
    server: PathBuf,
}

/// Builds the binaries the tests run and every test binary in one cargo invocation: one
/// resolution of features, so no crate is built twice (a separate `cargo build --bins`
/// resolves without the dev-dependencies' features, and `cargo test` then rebuilt the
/// agent, its BPF programs and the server). The dev profile, tuned for the tests in the
/// workspace's Cargo.toml.
fn build_all() -> anyhow::Result<Built> {
    let mut cargo = crate::cargo_command();
    cargo
        // The BPF crate is built by the agent's build script, for its own target.
        .args(["build", "--workspace", "--exclude", "profiler-ebpf", "--bins", "--tests"])
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped());
    let mut child = cargo.spawn().context("running cargo build")?;
    let mut tests = Vec::new();
    let mut server = None;
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let message: serde_json::Value = serde_json::from_str(&line?)?;
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else { continue };
        if message["profile"]["test"] != true {
            if message["target"]["name"] == "profiler-server" {
                server = Some(PathBuf::from(executable));
            }
            continue;
        }
        let package_dir = Path::new(message["manifest_path"].as_str().context("manifest_path")?)
            .parent()
            .context("manifest's directory")?
            .to_path_buf();
        let package = message["package_id"].as_str().and_then(package_name).context("package_id")?;
        let target = message["target"]["name"].as_str().context("target name")?;
        let unit = message["target"]["kind"][0] != "test";
        let name = if unit { format!("{package} (unit)") } else { format!("{package} {target}") };
        tests.push(TestBinary { name, executable: executable.into(), package_dir, unit });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo build failed: {status}");
    }
    tests.sort_by(|a, b| (!a.unit, &a.name).cmp(&(!b.unit, &b.name)));
    Ok(Built { tests, server: server.context("cargo built no profiler-server binary")? })
}

/// The name in a package id: `path+file:///src/tests#profiler-tests@0.1.0`, or
/// `path+file:///src/profiler-agent#0.1.0` when the directory has the package's name.
fn package_name(id: &str) -> Option<String> {
    let (path, fragment) = id.rsplit_once('#')?;
    match fragment.split_once('@') {
        Some((name, _)) => Some(name.to_string()),
        None => Some(path.rsplit('/').next()?.to_string()),
    }
}

fn run_binary(binary: &TestBinary, args: &[String]) -> Step {
    let mut command = Command::new(&binary.executable);
    command.args(args).current_dir(&binary.package_dir);
    // The end-to-end tests that only wait on the wall clock overlap (they take the host
    // shared); four threads let most of them wait together on two CPUs.
    if binary.name == "profiler-tests e2e" {
        command.env("RUST_TEST_THREADS", "4");
    }
    timed(&binary.name, &mut command)
}

/// `cargo xtask kernels` with the agent the tests used: a step per kernel.
fn kernel_matrix() -> Vec<Step> {
    let options = crate::kernels::Options { agent: Some(crate::root().join("target/debug/profiler-agent")), ..Default::default() };
    let started = Instant::now();
    match crate::kernels::run(&options) {
        Ok(reports) => reports
            .iter()
            .map(|report| Step {
                name: format!("kernel {}", report.name),
                took: report.took,
                passed: report.passed(),
                why: report.failures.first().and_then(|failure| failure.lines().next()).map(str::to_owned),
            })
            .collect(),
        Err(err) => {
            eprintln!("kernel matrix: {err:#}");
            vec![Step { name: "kernel matrix".into(), took: started.elapsed(), passed: false, why: Some(format!("{err:#}")) }]
        }
    }
}

/// The web UI in a real browser, against the server binary the tests used.
fn browser_tests(server: &Path) -> Step {
    let mut command = Command::new("bash");
    command.arg(root().join("profiler-server/ui-tests/run.sh")).env("PROFILER_SERVER_BIN", server);
    timed("web UI (browser)", &mut command)
}

/// Runs `command` as the step `name`: a failure is printed and the run goes on.
fn timed(name: &str, command: &mut Command) -> Step {
    println!("\n== {name} ({command:?})");
    let started = Instant::now();
    let passed = run(command).map_err(|e| eprintln!("{e:#}")).is_ok();
    Step { name: name.to_string(), took: started.elapsed(), passed, why: None }
}

fn print_table(steps: &[Step], total: Duration) {
    println!("\nwhere the time went");
    for step in steps {
        let why = step.why.as_deref().map(|why| format!(": {why}")).unwrap_or_default();
        println!("  {:<34} {:>8.1} s  {}{why}", step.name, step.took.as_secs_f64(), if step.passed { "ok" } else { "FAILED" });
    }
    println!("  {:<34} {:>8.1} s", "total", total.as_secs_f64());
}
