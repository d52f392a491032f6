//! Bad input to the agent: a one-line clear error and a non-zero exit.

use std::process::Command;

use profiler_tests::{binary, host_shared, require_root};

fn run(command: &mut Command) -> (bool, String) {
    let output = command.env("NO_COLOR", "1").output().expect("run profiler-agent");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    (output.status.success(), stderr)
}

fn assert_one_line_error(success: bool, stderr: &str, needle: &str) {
    assert!(!success, "expected failure, stderr: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "want exactly one error line, got: {stderr}");
    assert!(errors[0].contains(needle), "error should mention {needle:?}: {}", errors[0]);
}

#[test]
fn unknown_pid_is_rejected() {
    let _host = host_shared();
    require_root();
    let (ok, stderr) = run(Command::new(binary("profiler-agent")).args(["record", "--duration", "1s", "--pid", "999999999", "-o", "/dev/null"]));
    assert_one_line_error(ok, &stderr, "no process with pid 999999999");
}

#[test]
fn non_root_is_rejected() {
    let _host = host_shared();
    require_root();
    let (ok, stderr) = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("profiler-agent"))
        .args(["record", "--duration", "1s", "-o", "/dev/null"]));
    assert_one_line_error(ok, &stderr, "must run as root");
}

/// In a private mount namespace, hide tracefs or BTF and run the agent there.
fn run_with_hidden(path: &str, extra: &[&str]) -> (bool, String) {
    let agent = binary("profiler-agent");
    let script = format!(
        "mount -t tmpfs none {path} && exec {} record --duration 1s -o /dev/null {}",
        agent.display(),
        extra.join(" ")
    );
    run(Command::new("unshare").args(["--mount", "--propagation", "private", "sh", "-c", &script]))
}

/// Off-CPU tracing uses a raw tracepoint, which needs no tracefs (hosts and containers
/// often have none mounted).
#[test]
fn off_cpu_runs_without_tracefs() {
    let _host = host_shared();
    require_root();
    let (ok, stderr) = run_with_hidden("/sys/kernel/tracing", &["--off-cpu"]);
    assert!(ok, "the agent failed without tracefs: {stderr}");
}

#[test]
fn missing_btf_is_reported() {
    let _host = host_shared();
    require_root();
    let (ok, stderr) = run_with_hidden("/sys/kernel/btf", &[]);
    assert_one_line_error(ok, &stderr, "no BTF");
}

#[test]
fn nothing_to_write_is_rejected() {
    let _host = host_shared();
    let (ok, stderr) = run(Command::new(binary("profiler-agent")).args(["record", "--duration", "1s"]));
    assert_one_line_error(ok, &stderr, "nothing to write");
}
