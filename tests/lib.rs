//! Helpers for the end-to-end tests: locating the built binaries, running the agent as a
//! real process, reading folded stacks, and receiving webhooks.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

/// `target/<profile>` of the running test binary.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// A binary of the workspace; the test fails with a clear message if it is not built.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, done by `cargo xtask test`)",
        path.display()
    );
    path
}

/// The Rust workload built without frame pointers, as production Rust is (`cargo xtask
/// test` builds it; see `tests/workload/Cargo.toml`).
pub fn workload_without_frame_pointers() -> PathBuf {
    let path = target_dir()
        .parent()
        .expect("the target directory")
        .join("no-frame-pointers/release/workload");
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask test` builds it (`RUSTFLAGS='-C force-frame-pointers=no' cargo build --release -p profiler-workload --target-dir target/no-frame-pointers`)",
        path.display()
    );
    path
}

/// Builds `native/workload.c` with gcc at -O2 and explicitly without frame pointers.
pub fn native_workload(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("native/workload.c");
    let output = dir.join("native");
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-fomit-frame-pointer", "-pthread", "-o"])
        .arg(&output)
        .arg(&source)
        .status()
        .expect("gcc is required to build the native test workload");
    assert!(status.success(), "building {} failed", source.display());
    output
}

/// Who may use the host beside a test: the end-to-end tests share one binary, and
/// libtest runs its tests on several threads.
static HOST: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The host to this test alone: for tests that measure (CPU shares, rates, off-CPU time
/// against a reference or the wall clock, a comparison of two runs), which another test's
/// workload or agent would move.
pub fn host_alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    HOST.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The host shared with other tests of this kind: for tests whose checks are exact
/// accounting or behaviour (every window shipped once, a spool bounded, privileges
/// dropped), which other agents on the host cannot move, and which spend most of their
/// time waiting on the wall clock. None runs while a test has the host alone.
pub fn host_shared() -> std::sync::RwLockReadGuard<'static, ()> {
    HOST.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The BPF tests need root; never skip silently.
pub fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these end-to-end tests load BPF programs and must run as root (sudo cargo xtask test)"
    );
}

/// A running `profiler-agent record`, started and attached.
pub struct Agent {
    child: Child,
    stderr_lines: mpsc::Receiver<String>,
}

impl Agent {
    /// Starts `profiler-agent record ARGS` and waits until its programs are attached.
    pub fn record(args: &[&str]) -> Agent {
        require_root();
        let mut child = Command::new(binary("profiler-agent"))
            .arg("record")
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn profiler-agent");
        let stderr = child.stderr.take().expect("stderr");
        let (send, stderr_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let agent = Agent { child, stderr_lines };
        loop {
            match agent.stderr_lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains("sampling started") => return agent,
                Ok(_) => continue,
                Err(_) => panic!("profiler-agent did not start sampling (BPF could not load?); see its stderr above"),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs of the BPF programs whose descriptors the agent holds, summed (the kernel
    /// counts them only while BPF run-time statistics are on).
    pub fn bpf_runs(&self) -> u64 {
        let fdinfo = std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid())).expect("agent's fdinfo");
        fdinfo
            .filter_map(|fd| std::fs::read_to_string(fd.ok()?.path()).ok())
            .filter_map(|info| info.lines().find_map(|line| line.strip_prefix("run_cnt:")?.trim().parse::<u64>().ok()))
            .sum()
    }

    /// Ends the recording now (SIGINT: the agent drains and writes its output), however
    /// long it was asked to record: a loaded machine may stretch the workload.
    pub fn finish(self) {
        std::thread::sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait();
    }

    /// Waits for the agent to finish its recording and checks it succeeded.
    pub fn wait(mut self) {
        let status = self.child.wait().expect("wait for agent");
        while self.stderr_lines.try_recv().is_ok() {}
        assert!(status.success(), "profiler-agent failed: {status}");
    }
}

/// Wall-clock milliseconds since the epoch: the server's time ranges.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// An `agent.toml` in `dir` for a daemon shipping to `server_url`, its spool in `dir` and
/// its metrics on a free port: `server` and `sampling` are more lines of those sections
/// (`sampling` at least the window), `extra` more sections.
pub fn agent_config(dir: &Path, server_url: &str, server: &str, sampling: &str, extra: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let spool = dir.join("spool");
    let toml = format!(
        "[server]\nurl = \"{server_url}\"\n{server}\n[sampling]\n{sampling}\n[spool]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}",
        spool.display()
    );
    std::fs::write(&path, toml).expect("write agent.toml");
    path
}

/// Runs the test workload to completion and returns its JSON report.
pub fn run_workload(args: &[&str]) -> serde_json::Value {
    let output = Command::new(binary("workload"))
        .args(args)
        .env("WORKLOAD_DIR", std::env::temp_dir())
        .output()
        .expect("run workload");
    assert!(output.status.success(), "workload failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("workload report")
}

/// Folded stacks: frames root first, and the value.
pub fn read_folded(path: &Path) -> Vec<(Vec<String>, u64)> {
    let text = std::fs::read_to_string(path).expect("read folded output");
    parse_folded(&text)
}

pub fn parse_folded(text: &str) -> Vec<(Vec<String>, u64)> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (frames, value) = profiler_pprof::folded::parse_line(line).expect("folded line");
            (frames.map(str::to_string).collect(), u64::try_from(value).expect("folded value"))
        })
        .collect()
}

/// Sum of values of the stacks for which `keep` holds.
pub fn sum_where(stacks: &[(Vec<String>, u64)], keep: impl Fn(&[String]) -> bool) -> u64 {
    stacks.iter().filter(|(frames, _)| keep(frames)).map(|(_, v)| v).sum()
}

/// Rust symbol names without the legacy `::h<hash>` suffix, so different symbolizers agree.
pub fn normalize_function(name: &str) -> String {
    let name = name.strip_suffix("_[k]").unwrap_or(name);
    match name.rfind("::h") {
        Some(i) if name.len() - i == 19 && name[i + 3..].chars().all(|c| c.is_ascii_hexdigit()) => name[..i].to_string(),
        _ => name.to_string(),
    }
}

/// Share of self (leaf) value per function, over the stacks rooted at `process`.
pub fn self_shares(stacks: &[(Vec<String>, u64)], process: &str) -> HashMap<String, f64> {
    let mut by_leaf: HashMap<String, u64> = HashMap::new();
    let mut total = 0;
    for (frames, value) in stacks {
        let Some(pos) = frames.iter().position(|f| f == process) else { continue };
        let leaf = frames.last().filter(|_| frames.len() > pos + 1).map_or("[process]".to_string(), |f| normalize_function(f));
        *by_leaf.entry(leaf).or_default() += value;
        total += value;
    }
    by_leaf.into_iter().map(|(name, v)| (name, v as f64 / total.max(1) as f64)).collect()
}

/// Share of the total value of the stacks whose root satisfies `root` that has each
/// function anywhere on the stack (inclusive time), each function counted once per stack.
pub fn inclusive_shares(stacks: &[(Vec<String>, u64)], root: impl Fn(&str) -> bool) -> HashMap<String, f64> {
    let mut by_function: HashMap<String, u64> = HashMap::new();
    let mut total = 0;
    for (frames, value) in stacks {
        if !frames.first().is_some_and(|f| root(f)) {
            continue;
        }
        total += value;
        let mut seen: Vec<String> = frames[1..].iter().map(|f| normalize_function(f)).collect();
        seen.sort();
        seen.dedup();
        for function in seen {
            *by_function.entry(function).or_default() += value;
        }
    }
    by_function.into_iter().map(|(name, v)| (name, v as f64 / total.max(1) as f64)).collect()
}

/// `perf script ARGS` of a perf.data file, collapsed by inferno: frames root first, the
/// root named after the thread.
pub fn perf_folded(perf_data: &Path, args: &[&str]) -> Vec<(Vec<String>, u64)> {
    let script = Command::new("perf")
        .arg("script")
        .args(args)
        .arg("-i")
        .arg(perf_data)
        .stderr(Stdio::null())
        .output()
        .expect("perf is required (Debian package linux-perf; `cargo xtask setup` installs it)");
    assert!(script.status.success(), "perf script failed");
    let mut collapsed = Vec::new();
    let mut options = inferno::collapse::perf::Options::default();
    options.annotate_kernel = true;
    inferno::collapse::Collapse::collapse(&mut inferno::collapse::perf::Folder::from(options), &script.stdout[..], &mut collapsed)
        .unwrap();
    parse_folded(&String::from_utf8(collapsed).unwrap())
}

/// `perf record -F HZ ARGS -p PID`, running until [`PerfRecord::finish`].
pub struct PerfRecord {
    child: Child,
}

impl PerfRecord {
    pub fn start(pid: u32, hz: u32, output: &Path, args: &[&str]) -> PerfRecord {
        let child = Command::new("perf")
            .args(["record", "-q", "-F", &hz.to_string()])
            .args(args)
            .args(["-p", &pid.to_string(), "-o"])
            .arg(output)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf is required (Debian package linux-perf; `cargo xtask setup` installs it)");
        PerfRecord { child }
    }

    /// Waits for perf to end (it does when the process it follows exits).
    pub fn finish(mut self) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "perf record failed: {status}");
    }
}

/// A running bpftrace script, the reference many tests compare with.
pub struct Bpftrace {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
    _script: tempfile::NamedTempFile,
}

impl Bpftrace {
    /// Starts `script` with its positional arguments and waits until it is attached.
    pub fn start(script: &str, args: &[String]) -> Bpftrace {
        let file = tempfile::Builder::new().suffix(".bt").tempfile().unwrap();
        std::fs::write(file.path(), script).unwrap();
        let mut child = Command::new("bpftrace")
            .arg(file.path())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("bpftrace is required (Debian package bpftrace; `cargo xtask setup` installs it)");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains("Attaching"), "bpftrace did not start: {line}");
        Bpftrace { child, stdout, _script: file }
    }

    /// Stops bpftrace and returns what it printed after attaching (its maps).
    pub fn finish(mut self) -> String {
        // A CI run saw bpftrace take a SIGINT and stay in epoll_wait: ask again every few
        // seconds, and give up with a clear message rather than hang the suite.
        let pid = self.child.id() as i32;
        let asked = Instant::now();
        let mut last_ask = None::<Instant>;
        while self.child.try_wait().unwrap().is_none() {
            if asked.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                panic!("bpftrace did not exit within 30 s of SIGINT");
            }
            if last_ask.is_none_or(|at| at.elapsed() > Duration::from_secs(3)) {
                unsafe { libc::kill(pid, libc::SIGINT) };
                last_ask = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut rest).unwrap();
        rest
    }
}

/// A bpftrace reference for off-CPU time: the same sched_switch sum per thread of one
/// process, with the same floor as the agent's `--off-cpu-min-block`, to compare with our
/// figures on the same run.
pub struct BpftraceOffCpu(Bpftrace);

impl BpftraceOffCpu {
    /// Waits shorter than `min_block` are not counted.
    pub fn start(pid: u32, min_block: Duration) -> BpftraceOffCpu {
        let script = r#"tracepoint:sched:sched_switch
{
  if (pid == $1) { @start[args->prev_pid] = nsecs; }
  $s = @start[args->next_pid];
  if ($s != 0) {
    $d = nsecs - $s;
    if ($d >= $2) { @off[args->next_pid] = sum($d); }
    delete(@start[args->next_pid]);
  }
}
"#;
        BpftraceOffCpu(Bpftrace::start(script, &[pid.to_string(), min_block.as_nanos().to_string()]))
    }

    /// Stops bpftrace and returns its off-CPU nanoseconds per thread id.
    pub fn finish(self) -> HashMap<i64, f64> {
        // Lines like `@off[12345]: 4998712345`.
        self.0
            .finish()
            .lines()
            .filter_map(|line| {
                let (tid, value) = line.strip_prefix("@off[")?.split_once("]: ")?;
                Some((tid.parse().ok()?, value.trim().parse().ok()?))
            })
            .collect()
    }
}

/// Accepts HTTP requests and sends each body down the channel.
pub fn webhook_receiver() -> (String, mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    (url, receive_webhooks(listener, 0))
}

/// A receiver on `port` that answers its first `failures` requests 503 (their bodies
/// not sent down the channel), then accepts as [`webhook_receiver`] does.
pub fn failing_webhook_receiver(port: u16, failures: usize) -> mpsc::Receiver<String> {
    receive_webhooks(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap(), failures)
}

fn receive_webhooks(listener: std::net::TcpListener, mut failures: usize) -> mpsc::Receiver<String> {
    let (send, bodies) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            std::io::Read::read_exact(&mut reader, &mut body).unwrap();
            if failures > 0 {
                failures -= 1;
                let _ = std::io::Write::write_all(
                    &mut stream,
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                continue;
            }
            std::io::Write::write_all(&mut stream, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
            let _ = send.send(String::from_utf8_lossy(&body).into_owned());
        }
    });
    bodies
}

/// A port that was free a moment ago (the server must come back on the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Reads lines from a child's stream on a thread, echoing them to the test's stderr.
fn forward_lines(stream: impl std::io::Read + Send + 'static, prefix: &'static str) -> mpsc::Receiver<String> {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining after the receiver is gone: a closed pipe would kill the child.
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            eprintln!("[{prefix}] {line}");
            let _ = send.send(line);
        }
    });
    receive
}

fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str, what: &str) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => continue,
            Err(_) => panic!("{what} never printed {needle:?}; see its output above"),
        }
    }
}

/// A real `profiler-server` on its own data directory.
pub struct Server {
    child: Child,
    pub url: String,
}

impl Server {
    pub fn start(data_dir: &Path, port: u16) -> Server {
        Self::start_with(data_dir, port, &[])
    }

    /// With more command-line arguments, e.g. `["--config", path]`.
    pub fn start_with(data_dir: &Path, port: u16, args: &[&str]) -> Server {
        let mut child = Command::new(binary("profiler-server"))
            .args(["--data-dir", data_dir.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn profiler-server");
        let lines = forward_lines(child.stdout.take().unwrap(), "server");
        forward_lines(child.stderr.take().unwrap(), "server");
        wait_for_line(&lines, "listening on", "profiler-server");
        Server { child, url: format!("http://127.0.0.1:{port}") }
    }

    pub fn get_json(&self, path_and_query: &str) -> serde_json::Value {
        let response = reqwest::blocking::get(format!("{}{path_and_query}", self.url)).expect("query server");
        assert!(response.status().is_success(), "GET {path_and_query}: {}", response.status());
        response.json().expect("JSON reply")
    }

    pub fn get_bytes(&self, path_and_query: &str) -> Vec<u8> {
        let response = reqwest::blocking::get(format!("{}{path_and_query}", self.url)).expect("query server");
        assert!(response.status().is_success(), "GET {path_and_query}: {}", response.status());
        response.bytes().expect("reply body").to_vec()
    }

    /// SIGTERM and wait: the server flushes and exits.
    pub fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `profiler-agent run`.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub metrics_url: String,
}

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        Self::start_under(&[], config)
    }

    /// Runs the agent through `wrapper` (a command and its arguments, e.g. `setpriv` with
    /// other credentials), or directly when it is empty.
    pub fn start_under(wrapper: &[&str], config: &Path) -> Daemon {
        require_root();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary("profiler-agent"));
                command
            }
            None => Command::new(binary("profiler-agent")),
        };
        let mut child = command
            .args(["run", "--config", config.to_str().unwrap()])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn profiler-agent run");
        let lines = forward_lines(child.stderr.take().unwrap(), "agent");
        let metrics = wait_for_line(&lines, "metrics listening", "profiler-agent");
        let addr = metrics.rsplit("addr=").next().unwrap().trim().to_string();
        wait_for_line(&lines, "agent running", "profiler-agent");
        Daemon { child, lines, metrics_url: format!("http://{addr}/metrics") }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log lines printed since the last call (or since start, after the start lines).
    pub fn take_log(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let text = reqwest::blocking::get(&self.metrics_url).expect("agent metrics").text().unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("profiler_agent_{name} ")))
            .unwrap_or_else(|| panic!("no metric {name}"))
            .parse()
            .unwrap()
    }

    /// SIGTERM, then the fields of its final "agent stopped" line.
    pub fn stop(mut self) -> HashMap<String, u64> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let line = wait_for_line(&self.lines, "agent stopped", "profiler-agent");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "agent exited with {status}");
        line.split_whitespace()
            .filter_map(|field| field.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where to create test cgroups: the unified hierarchy of a hybrid host, else the root.
pub fn cgroup_root() -> &'static str {
    if Path::new("/sys/fs/cgroup/unified").exists() { "/sys/fs/cgroup/unified" } else { "/sys/fs/cgroup" }
}
