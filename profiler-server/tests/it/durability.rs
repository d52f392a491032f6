//! Acknowledged means on disk: a power cut right after the answers loses
//! nothing. The data dir sits on ext4 over a loop device; the "power cut" is
//! a copy of the loop device's backing file taken while the server runs, so
//! it holds only what reached the device: whatever the server did not fsync
//! is still in the page cache above it (ext4 mounted with a 10-minute journal
//! commit interval, and the test takes seconds, well inside the kernel's
//! 30-second dirty writeback). Unlike a kill -9, this fails if the fsync
//! before the acknowledgement is removed.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{client, folded_total, now_ms, Proc};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// An ext4 file system on a loop device over `image`, mounted at `at`.
struct LoopMount {
    device: String,
    at: PathBuf,
}

impl LoopMount {
    fn attach(image: &Path, at: &Path) -> LoopMount {
        let device = run("losetup", &["--find", "--show", image.to_str().unwrap()])
            .trim()
            .to_owned();
        std::fs::create_dir_all(at).unwrap();
        run(
            "mount",
            &["-o", "commit=600", &device, at.to_str().unwrap()],
        );
        LoopMount {
            device,
            at: at.to_owned(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.at).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

#[test]
fn acknowledged_batches_survive_a_power_cut() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
    let cfg = work.path().join("server.toml");
    std::fs::write(&cfg, "[storage]\nflush_interval_secs = 3600\n").unwrap();
    let cfg = cfg.to_str().unwrap();

    let mount = LoopMount::attach(&image, &work.path().join("mnt"));
    let data = mount.at.join("data");
    let srv = Proc::spawn(&data, &["--config", cfg]);
    let c = client();
    let t0 = now_ms();
    let mut acked = 0;
    for batch in 0..50 {
        let url = format!(
            "/api/v1/ingest?service=power&kind=on-cpu&format=folded&from={t0}&batch_id=p{batch}"
        );
        let r = c
            .post(srv.url(&url))
            .body(format!("main;batch_{batch} 10\n"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        acked += 10;
    }
    // The power cut: what the device holds right now.
    let snapshot = work.path().join("after-power-cut.img");
    run(
        "cp",
        &[
            "--sparse=always",
            image.to_str().unwrap(),
            snapshot.to_str().unwrap(),
        ],
    );
    srv.kill9();
    drop(mount);

    let mount = LoopMount::attach(&snapshot, &work.path().join("mnt2"));
    let srv = Proc::spawn(&mount.at.join("data"), &["--config", cfg]);
    let total = folded_total(&srv.folded_around(&c, "power", t0));
    assert_eq!(total, acked, "acknowledged data lost in the power cut");
}
