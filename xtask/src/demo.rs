//! `cargo xtask demo`: the whole product on this host. Builds everything, starts the
//! server on its embedded store and the agent on this host, runs a demo workload as the
//! service `demo-shop`, and prints the web UI address. Ctrl-C stops it all.

use std::{
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;

use crate::{cargo, root};

pub struct Options {
    pub port: u16,
    pub data_dir: std::path::PathBuf,
}

/// Kills the child when the demo ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

pub fn run(options: Options) -> anyhow::Result<()> {
    crate::setup::run()?;
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let bin = root().join("target/release");
    std::fs::create_dir_all(&options.data_dir)?;
    let url = format!("http://127.0.0.1:{}", options.port);

    let _server = Guard(
        Command::new(bin.join("profiler-server"))
            .args(["--data-dir", options.data_dir.to_str().unwrap(), "--listen", &format!("127.0.0.1:{}", options.port)])
            .spawn()
            .context("starting profiler-server")?,
    );
    std::thread::sleep(Duration::from_secs(1));
    let config = options.data_dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nurl = \"{url}\"\n[sampling]\nwindow = \"5s\"\n[spool]\ndir = \"{}\"\n[[rules]]\ncomm = \"^workload$\"\nservice = \"demo-shop\"\nlabels = {{ tier = \"demo\" }}\n",
            options.data_dir.join("spool").display()
        ),
    )?;
    let _agent = Guard(
        Command::new(bin.join("profiler-agent")).args(["run", "--config", config.to_str().unwrap()]).spawn().context("starting profiler-agent")?,
    );

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    println!("\n  Web UI:   {url}/\n  API:      {url}/api/v1/services\n  Metrics:  {url}/metrics (server), http://127.0.0.1:9464/metrics (agent)\n  Data:     {}\n  Ctrl-C to stop.\n", options.data_dir.display());
    // A service that computes, sleeps and does disk I/O, so every kind of time shows up.
    while !stop.load(Ordering::Relaxed) {
        let _ = Command::new(bin.join("workload")).args(["mixed", "20", "1"]).env("WORKLOAD_DIR", &options.data_dir).stdout(std::process::Stdio::null()).status();
    }
    println!("stopping");
    Ok(())
}
