//! Disk faults with real files: a full disk mid-ingest, a corrupt WAL record,
//! a flush that fails, and retries of one batch id. After each: no
//! acknowledged row lost, no row counted twice, ingest refused with 503 while
//! broken, and recovery on its own once the fault clears.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, folded_total, now_ms, Proc};
use reqwest::blocking::Client;

/// Folded text of one batch: `frames` distinct stacks whose names are
/// padded so the WAL fills up quickly, each worth `value`.
fn batch_text(batch: usize, frames: usize, value: i64) -> String {
    (0..frames)
        .map(|f| format!("main;batch_{batch}_frame_{f}_{} {value}\n", "x".repeat(200)))
        .collect()
}

fn post(c: &Client, srv: &Proc, service: &str, t0: i64, id: &str, body: &str) -> (u16, String) {
    let url = format!(
        "/api/v1/ingest?service={service}&kind=on-cpu&format=folded&from={t0}&batch_id={id}"
    );
    match c.post(srv.url(&url)).body(body.to_owned()).send() {
        Ok(r) => {
            let status = r.status().as_u16();
            if status == 503 {
                assert!(
                    r.headers().contains_key("retry-after"),
                    "503 without Retry-After"
                );
            }
            (status, r.text().unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

fn config(dir: &Path, flush_secs: u64) -> String {
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        format!("[storage]\nflush_interval_secs = {flush_secs}\n"),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "mounting a tmpfs needs root (the test suite runs as root in CI)"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn full_disk_refuses_then_recovers_without_losing_or_doubling_rows() {
    let fs = Tmpfs::mount("24m");
    let data = fs.0.path().join("data");
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(cfg_dir.path(), 1);
    let srv = Proc::spawn(&data, &["--config", &cfg]);
    let c = client();
    let t0 = now_ms();
    // Leave about a megabyte free, so the disk fills while batches come in.
    let filler = fs.0.path().join("filler");
    let free = fs2_free(fs.0.path());
    std::fs::write(&filler, vec![0u8; (free - (1 << 20)) as usize]).unwrap();

    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for batch in 0..60 {
        let body = batch_text(batch, 300, 1000 + batch as i64);
        match post(&c, &srv, "disk", t0, &format!("b{batch}"), &body) {
            (200, _) => acked.push(batch),
            (503, _) => refused.push(batch),
            (status, text) => panic!("batch {batch}: {status} {text}"),
        }
    }
    assert!(!refused.is_empty(), "the disk never filled up");
    assert!(!acked.is_empty());
    let busy = srv.metric("profiler_ingest_refused");
    println!(
        "acked {}, refused {} (refused now: {busy})",
        acked.len(),
        refused.len()
    );

    // Free the disk: the refused batches go through on retry, on their own.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending = refused.clone();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "ingest did not recover: {pending:?} still refused"
        );
        pending.retain(|&batch| {
            let body = batch_text(batch, 300, 1000 + batch as i64);
            post(&c, &srv, "disk", t0, &format!("b{batch}"), &body).0 != 200
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    // Every batch exactly once, before and after a crash.
    let expected: i64 = (0..60).map(|b| 300 * (1000 + b as i64)).sum();
    assert_eq!(folded_total(&srv.folded_around(&c, "disk", t0)), expected);
    srv.kill9();
    let srv = Proc::spawn(&data, &["--config", &cfg]);
    assert_eq!(
        folded_total(&srv.folded_around(&c, "disk", t0)),
        expected,
        "after kill -9 and replay"
    );
}

fn fs2_free(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn corrupt_wal_record_is_quarantined_and_later_records_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(cfg_dir.path(), 3600);
    let srv = Proc::spawn(dir.path(), &["--config", &cfg]);
    let c = client();
    let t0 = now_ms();
    for (i, leaf) in ["first", "middle", "last"].iter().enumerate() {
        let (status, text) = post(
            &c,
            &srv,
            "wal",
            t0,
            &format!("w{i}"),
            &format!("main;{leaf} 10\n"),
        );
        assert_eq!(status, 200, "{text}");
    }
    srv.kill9();
    // Flip one byte inside the middle record's payload.
    let wal: Vec<_> = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let file = wal
        .iter()
        .find(|p| std::fs::metadata(p).unwrap().len() > 0)
        .expect("a WAL file with records");
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes
        .windows(6)
        .position(|w| w == b"middle")
        .expect("middle record");
    bytes[at] ^= 0x20;
    std::fs::write(file, &bytes).unwrap();

    let srv = Proc::spawn(dir.path(), &["--config", &cfg]);
    assert_eq!(
        srv.folded_around(&c, "wal", t0),
        "main;first 10\nmain;last 10\n"
    );
    assert_eq!(srv.metric("profiler_wal_corrupt_records_total"), 1);
    assert_eq!(srv.metric("profiler_wal_quarantined_files_total"), 1);
    let quarantined = std::fs::read_dir(dir.path().join("wal/quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1);
    // The kept records were rewritten: another crash neither loses nor doubles them.
    srv.kill9();
    let srv = Proc::spawn(dir.path(), &["--config", &cfg]);
    assert_eq!(
        srv.folded_around(&c, "wal", t0),
        "main;first 10\nmain;last 10\n"
    );
    assert_eq!(
        srv.metric("profiler_wal_corrupt_records_total"),
        0,
        "nothing corrupt left"
    );
}

#[test]
fn failing_flush_refuses_ingest_until_it_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(cfg_dir.path(), 1);
    let srv = Proc::spawn(dir.path(), &["--config", &cfg]);
    let c = client();
    let t0 = now_ms();
    // Segments cannot be written while their directory is a file.
    let segments = dir.path().join("segments");
    let aside = dir.path().join("segments.aside");
    std::fs::rename(&segments, &aside).unwrap();
    std::fs::write(&segments, b"not a directory").unwrap();
    assert_eq!(post(&c, &srv, "flush", t0, "f0", "main;a 5\n").0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 1;
    loop {
        let (status, text) = post(&c, &srv, "flush", t0, &format!("f{n}"), "main;a 5\n");
        if status == 503 {
            assert!(text.contains("flush"), "{text}");
            break;
        }
        assert_eq!(status, 200, "{text}");
        n += 1;
        assert!(
            Instant::now() < deadline,
            "ingest never pushed back while flushes failed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(srv.metric("profiler_flush_errors_total") >= 1);
    // Acknowledged rows stay queryable meanwhile.
    assert_eq!(folded_total(&srv.folded_around(&c, "flush", t0)), 5 * n);

    std::fs::remove_file(&segments).unwrap();
    std::fs::rename(&aside, &segments).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while post(&c, &srv, "flush", t0, &format!("f{n}"), "main;a 5\n").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "ingest did not resume after the fault cleared"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let stored = 5 * (n + 1);
    assert_eq!(folded_total(&srv.folded_around(&c, "flush", t0)), stored);
    srv.kill9();
    let srv = Proc::spawn(dir.path(), &["--config", &cfg]);
    assert_eq!(
        folded_total(&srv.folded_around(&c, "flush", t0)),
        stored,
        "after kill -9"
    );
}

#[test]
fn a_batch_id_is_counted_once_across_retries_flushes_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = config(cfg_dir.path(), 3600);
    let srv = Proc::spawn(dir.path(), &["--config", &cfg]);
    let c = client();
    let t0 = now_ms();
    let (status, first) = post(&c, &srv, "dedup", t0, "same", "main;a 7\n");
    assert_eq!(status, 200);
    assert!(!first.contains("duplicate"), "{first}");
    let (status, again) = post(&c, &srv, "dedup", t0, "same", "main;a 7\n");
    assert_eq!(status, 200);
    assert!(again.contains("\"duplicate\":true"), "{again}");
    // The Idempotency-Key header is the same key.
    let r = c
        .post(srv.url(&format!(
            "/api/v1/ingest?service=dedup&kind=on-cpu&format=folded&from={t0}"
        )))
        .header("Idempotency-Key", "same")
        .body("main;a 7\n")
        .send()
        .unwrap();
    assert!(r.text().unwrap().contains("\"duplicate\":true"));
    assert_eq!(post(&c, &srv, "dedup", t0, "other", "main;a 7\n").0, 200);
    assert_eq!(folded_total(&srv.folded_around(&c, "dedup", t0)), 14);
    assert_eq!(srv.metric("profiler_duplicate_batches_total"), 2);

    // Replayed from the WAL, the ids are still known.
    srv.kill9();
    let srv = Proc::spawn(dir.path(), &["--config", &cfg]);
    assert!(post(&c, &srv, "dedup", t0, "same", "main;a 7\n")
        .1
        .contains("\"duplicate\":true"));
    // Flushed to segments (graceful stop), the ids live on in the catalog.
    srv.terminate();
    let srv = Proc::spawn(dir.path(), &["--config", &cfg]);
    assert!(post(&c, &srv, "dedup", t0, "other", "main;a 7\n")
        .1
        .contains("\"duplicate\":true"));
    assert_eq!(folded_total(&srv.folded_around(&c, "dedup", t0)), 14);
}

/// A retry that says an earlier attempt went unanswered (`Profiler-Unanswered-Age-Ms`)
/// is deduplicated while the server remembers ids from then, and refused with 410 once
/// it cannot: storing it could count it twice. Ids forgotten for the count move that
/// horizon as much as age does.
#[test]
fn a_retry_from_before_the_remembered_ids_is_refused_not_counted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("server.toml");
    std::fs::write(&cfg, "[storage]\ndedup_window_secs = 3600\ndedup_max_ids = 3\n").unwrap();
    let srv = Proc::spawn(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let c = client();
    let t0 = now_ms();
    let retry = |id: &str, age_ms: i64| {
        let r = c
            .post(srv.url(&format!(
                "/api/v1/ingest?service=replay&kind=on-cpu&format=folded&from={t0}&batch_id={id}"
            )))
            .header("Profiler-Unanswered-Age-Ms", age_ms.to_string())
            .body("main;a 1\n")
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let before_a = now_ms();
    assert_eq!(post(&c, &srv, "replay", t0, "a", "main;a 1\n").0, 200);
    // Remembered: a duplicate, however old the client says its attempt was.
    let (status, body) = retry("a", 7_200_000);
    assert_eq!((status, body.contains("\"duplicate\":true")), (200, true), "{body}");
    // Not remembered, and its attempt is within the window: a first delivery.
    assert_eq!(retry("b", 10_000).0, 200);
    // Not remembered, and its attempt older than the window: unknowable.
    let (status, body) = retry("c", 7_200_000);
    assert_eq!(status, 410, "{body}");
    assert!(body.contains("cannot tell a retry"), "{body}");

    // Three ids at most: e pushes a out, so a batch whose attempt went unanswered
    // before a was stored cannot be verified any more, even within the hour.
    for id in ["d", "e"] {
        assert_eq!(post(&c, &srv, "replay", t0, id, "main;a 1\n").0, 200);
    }
    assert_eq!(retry("f", now_ms() - before_a + 1_000).0, 410);
    // Its attempt went unanswered after a was forgotten (a few ms ago).
    std::thread::sleep(Duration::from_millis(20));
    let (status, body) = retry("g", 0);
    assert_eq!(status, 200, "{body}");
    assert_eq!(srv.metric("profiler_duplicate_batches_total"), 1);
    assert_eq!(folded_total(&srv.folded_around(&c, "replay", t0)), 5, "a, b, d, e and g");
    let (status, _) = retry("h", -5);
    assert_eq!(status, 400, "a negative age");
}
