//! Spawns the real `profiler-server` binary on an ephemeral port.

pub mod sampled;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Proc {
    pub child: Child,
    pub base: String,
}

impl Proc {
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Proc {
        Self::spawn_logging_to(data_dir, extra, Stdio::inherit())
    }

    /// As [`Proc::spawn`], its log (warnings and worse) going to `log`.
    pub fn spawn_logging_to(data_dir: &Path, extra: &[&str], log: Stdio) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_profiler-server"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn profiler-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Proc {
            child,
            base: format!("http://{addr}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A counter or gauge from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = client().get(self.url("/metrics")).send().unwrap().text().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// The service's folded export over the two minutes around `t0` (unix ms).
    pub fn folded_around(&self, client: &reqwest::blocking::Client, service: &str, t0: i64) -> String {
        let path = format!("/api/v1/folded?service={service}&from={}&until={}", t0 - 60_000, t0 + 60_000);
        client.get(self.url(&path)).send().unwrap().text().unwrap()
    }

    /// SIGKILL: no flush, no graceful anything.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// No connection reuse: after an early 413 the server closes a connection
/// whose body it did not read, and a pooled client would race that close.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Sum of all values of a folded export.
pub fn folded_total(text: &str) -> i64 {
    text.lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<i64>().unwrap())
        .sum()
}
