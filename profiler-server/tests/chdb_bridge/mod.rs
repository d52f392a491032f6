//! Starts `bridge.py` (ClickHouse HTTP interface over chdb, the embedded
//! ClickHouse engine) for tests and benchmarks. Missing python3 or chdb is a
//! test failure with the install hint, never a skip.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use profiler_server::config::{Backend, Config};

pub struct Bridge {
    child: Child,
    /// Held open: the bridge exits when it closes (our process ended).
    _stdin: ChildStdin,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chdb_bridge/bridge.py")
}

/// A new bridge on a free port with its own chdb data directory.
pub fn start() -> Bridge {
    let dir = tempfile::tempdir().unwrap();
    let mut child = match Command::new("python3")
        .arg(script())
        .args(["--port", "0", "--exit-with-stdin", "--path"])
        .arg(dir.path().join("chdb"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run python3 ({e}): the ClickHouse backend tests need python3 with chdb \
             (`pip install chdb`)"
        ),
    };
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let Some(port) = line.trim().strip_prefix("listening on ") else {
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        let _ = child.wait();
        panic!(
            "the chdb bridge did not start: {}\nThe ClickHouse backend tests need python3 \
             with chdb: `pip install chdb`",
            err.trim()
        );
    };
    // Forward the bridge's stderr (errors only, unless BRIDGE_VERBOSE).
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut stderr, &mut std::io::stderr());
    });
    Bridge {
        url: format!("http://127.0.0.1:{}", port.trim()),
        _stdin: child.stdin.take().unwrap(),
        child,
        _dir: dir,
    }
}

/// One bridge per test process, shared by its tests (each uses its own
/// database).
pub fn shared() -> &'static Bridge {
    static B: OnceLock<Bridge> = OnceLock::new();
    B.get_or_init(start)
}

/// A database name no other test of this run uses.
pub fn fresh_database(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        tag.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    )
}

/// `cfg` switched to the ClickHouse backend on `bridge`, database `db`.
pub fn clickhouse_config(mut cfg: Config, bridge: &Bridge, db: &str) -> Config {
    cfg.storage.backend = Backend::ClickHouse;
    cfg.clickhouse.url = bridge.url.clone();
    cfg.clickhouse.database = db.to_owned();
    cfg
}
