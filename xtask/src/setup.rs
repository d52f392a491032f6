//! `cargo xtask setup`: everything the build and the tests need, installed once.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::run as exec;

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    python_packages()?;
    pyroscope_sdk()?;
    py_spy()?;
    tracefs()?;
    println!("setup: done");
    Ok(())
}

fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"])).unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: installing rust-src (the BPF build compiles core from source)");
    exec(Command::new("rustup").args(["component", "add", "rust-src"]))
}

/// bpf-linker linked against rustc's own LLVM: Debian's LLVM is too old for it.
fn bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = output(Command::new("bpf-linker").arg("--version")) {
        if version.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against rustc's libLLVM (about a minute)");
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"])).context("rustc --print sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))))
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    let prefix = std::env::temp_dir().join("profiler-llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_string(), llvm.file_name().unwrap().to_string_lossy().into_owned()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
    }
    exec(Command::new("cargo")
        .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", &prefix))
}

/// perf and bpftrace are the reference tools of the cross-check tests and benchmarks;
/// Go's pprof tool checks the server's pprof exports; chromium and node run the web UI's
/// browser tests; libc6-dbg lets the tests check libc's internal frames are named from
/// a separate debug file; e2fsprogs and losetup give the server's durability test an
/// ext4 file system on a loop device. qemu, a static busybox and cpio boot Debian's
/// kernels for `cargo xtask kernels` (busybox-static's own doc directory: Debian's other
/// busybox package installs a `busybox` too, linked dynamically). libclang-dev lets
/// bindgen build the `custom-labels` crate for the custom-labels test app. Each entry is a command
/// or a path the package installs.
fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("perf", "linux-perf"),
        ("bpftrace", "bpftrace"),
        ("setpriv", "util-linux"),
        ("unshare", "util-linux"),
        ("go", "golang-go"),
        ("gzip", "gzip"),
        ("chromium", "chromium"),
        ("node", "nodejs"),
        ("npm", "npm"),
        ("curl", "curl"),
        ("/usr/share/doc/libc6-dbg", "libc6-dbg"),
        ("mkfs.ext4", "e2fsprogs"),
        ("losetup", "mount"),
        ("zstd", "zstd"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("/usr/share/doc/busybox-static", "busybox-static"),
        ("cpio", "cpio"),
        // Debian's CPython, whose frames the Python tests read.
        ("/usr/bin/python3.11", "python3.11"),
        // bindgen, for the custom-labels crate the request-context test app links.
        ("/usr/share/doc/libclang-dev", "libclang-dev"),
    ]
        .into_iter()
        .filter(|(binary, _)| output(Command::new("sh").args(["-c", &format!("command -v {binary} || test -e {binary}")])).is_none())
        .map(|(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
    }
    println!("setup: installing {missing:?}");
    exec(Command::new("apt-get").arg("update").arg("-qq"))?;
    exec(Command::new("apt-get").args(["install", "-y", "-qq"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// chdb embeds the ClickHouse engine the ClickHouse backend's tests run against.
/// The current Pyroscope Python SDK, in a virtual environment of its own
/// (`target/pyroscope-venv`): the server's push API is tested against it.
const PYROSCOPE_SDK: &str = "pyroscope-io==1.4.0";

fn pyroscope_sdk() -> anyhow::Result<()> {
    let venv = crate::root().join("target/pyroscope-venv");
    let python = venv.join("bin/python");
    if output(Command::new(&python).args(["-c", "import pyroscope"])).is_some() {
        return Ok(());
    }
    println!("setup: installing {PYROSCOPE_SDK} into {}", venv.display());
    exec(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    exec(Command::new(&python).args(["-m", "pip", "install", "--quiet", PYROSCOPE_SDK]))
}

/// py-spy, the reference the Python frames are compared with, in a virtual environment
/// of its own (`target/py-spy-venv`).
const PY_SPY: &str = "py-spy==0.4.3";

fn py_spy() -> anyhow::Result<()> {
    let venv = crate::root().join("target/py-spy-venv");
    if venv.join("bin/py-spy").exists() {
        return Ok(());
    }
    println!("setup: installing {PY_SPY} into {}", venv.display());
    exec(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    exec(Command::new(venv.join("bin/python")).args(["-m", "pip", "install", "--quiet", PY_SPY]))
}

fn python_packages() -> anyhow::Result<()> {
    if output(Command::new("python3").args(["-c", "import chdb"])).is_some() {
        return Ok(());
    }
    println!("setup: installing chdb (ClickHouse engine for the ClickHouse backend's tests)");
    let requirements = crate::root().join("profiler-server/tests/chdb_bridge/requirements.txt");
    exec(Command::new("python3").args(["-m", "pip", "install", "--quiet", "-r"]).arg(requirements))
}

/// perf and bpftrace, the references the tests compare against, find tracepoints through
/// tracefs (the agent's raw tracepoint does not need it).
fn tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("tracefs is not mounted; run `cargo xtask setup` as root");
    }
    println!("setup: mounting tracefs on /sys/kernel/tracing");
    exec(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}
