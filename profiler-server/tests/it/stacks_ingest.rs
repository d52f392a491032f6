//! Our agent's stacks windows on the real server binary: stacks by frames,
//! then by id, across a restart; ids the server does not have are refused
//! whole (409) and malformed windows are 400. Bundles (a window's parts in
//! one request) the same, with one fsync and per-part batch ids.

use crate::common;

use common::{client, folded_total, now_ms, Proc};
use profiler_pprof::stacks::{stack_id, BundleWriter, Writer};

fn post(p: &Proc, batch: &str, body: Vec<u8>) -> reqwest::blocking::Response {
    let query = format!("/api/v1/ingest?service=api&kind=on-cpu&format=stacks&from={}&batch_id={batch}&label=host:h1", now_ms());
    client()
        .post(p.url(&query))
        .body(profiler_pprof::gzip(&body))
        .send()
        .unwrap()
}

#[test]
fn stacks_go_by_frames_then_by_id_and_unknown_ids_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), &[]);
    let t0 = now_ms();
    let (a, b) = (["main", "serve", "parse"], ["main", "serve", "write"]);

    let mut first = Writer::default();
    first.framed(&a, 100);
    first.framed(&b, 10);
    let r = post(&p, "w1", first.finish());
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());

    let mut by_id = Writer::default();
    by_id.known(stack_id(&a), 1000);
    by_id.known(stack_id(&b), 1);
    let r = post(&p, "w2", by_id.finish());
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    let folded = p.folded_around(&client(), "api", t0);
    assert!(folded.contains("main;serve;parse 1100"), "{folded}");
    assert_eq!(folded_total(&folded), 1111);

    // One id the server never saw refuses the whole window.
    let mut unknown = Writer::default();
    unknown.known(stack_id(&a), 5);
    unknown.known(stack_id(&["main", "never", "sent"]), 7);
    let r = post(&p, "w3", unknown.finish());
    assert_eq!(r.status(), 409);
    assert!(r.text().unwrap().contains("1 stacks referred to by id are unknown"));
    assert_eq!(folded_total(&p.folded_around(&client(), "api", t0)), 1111, "nothing of it stored");

    let mut cut = Writer::default();
    cut.framed(&a, 1);
    let body = cut.finish();
    let r = post(&p, "w4", body[..body.len() - 2].to_vec());
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("stacks window"));

    // The dictionary outlives the process: from the WAL, then from the catalog.
    p.kill9();
    let p = Proc::spawn(dir.path(), &[]);
    let mut again = Writer::default();
    again.known(stack_id(&b), 2);
    assert_eq!(post(&p, "w5", again.finish()).status(), 200);
    p.terminate();
    let p = Proc::spawn(dir.path(), &[]);
    let mut again = Writer::default();
    again.known(stack_id(&b), 4);
    assert_eq!(post(&p, "w6", again.finish()).status(), 200);
    let folded = p.folded_around(&client(), "api", t0);
    assert!(folded.contains("main;serve;write 17"), "{folded}");
}

fn post_bundle(p: &Proc, query: &str, body: Vec<u8>) -> reqwest::blocking::Response {
    let query = format!("/api/v1/ingest?format=bundle&from={}&label=host:h1{query}", now_ms());
    client().post(p.url(&query)).body(profiler_pprof::gzip(&body)).send().unwrap()
}

fn window(stacks: &[(&[&str], i64)]) -> Vec<u8> {
    let mut w = Writer::default();
    for (frames, value) in stacks {
        w.framed(frames, *value);
    }
    w.finish()
}

#[test]
fn a_bundle_stores_all_its_parts_with_one_fsync_or_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::spawn(dir.path(), &[]);
    let t0 = now_ms();
    let serve: &[&str] = &["main", "serve"];
    let query: &[&str] = &["main", "query"];

    // Part 1 of window b1 reached the server before, as a pprof does when
    // the agent falls back (same service, kind and labels, id `b1/1`).
    let mut pprof = profiler_pprof::ProfileBuilder::new(&[("off-cpu:blocked-io", "nanoseconds")]);
    pprof.add(query, &[40], &[]);
    let r = client()
        .post(p.url(&format!("/api/v1/ingest?service=db&kind=off-cpu:blocked-io&from={t0}&batch_id=b1/1&label=host:h1&label=pid:9")))
        .body(profiler_pprof::encode_gzip(&pprof.build()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());

    let fsyncs = p.metric("profiler_wal_fsyncs_total");
    let mut b = BundleWriter::default();
    b.part("api", "on-cpu", &[("pid", "7")], &window(&[(serve, 100)]));
    b.part("db", "off-cpu:blocked-io", &[("pid", "9")], &window(&[(query, 40)]));
    for service in ["web", "cron", "mail"] {
        b.part::<&str, &str>(service, "on-cpu", &[], &window(&[(serve, 1)]));
    }
    let bundle = b.finish();
    let r = post_bundle(&p, "&batch_id=b1", bundle.clone());
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    // One more only when a flush's rotation happened to land among the writes.
    let used = p.metric("profiler_wal_fsyncs_total") - fsyncs;
    assert!((1..=2).contains(&used), "{used} fsyncs for a bundle of 5 parts");
    assert_eq!(folded_total(&p.folded_around(&client(), "api", t0)), 100);
    assert_eq!(folded_total(&p.folded_around(&client(), "db", t0)), 40, "the part stored before counts once");
    let series = client().get(p.url("/api/v1/labels?service=api")).send().unwrap().text().unwrap();
    assert!(series.contains("host") && series.contains("pid"), "common and own labels: {series}");

    // A retry of the whole bundle changes nothing.
    let r = post_bundle(&p, "&batch_id=b1", bundle);
    assert_eq!(r.status(), 200);
    assert!(r.text().unwrap().contains("\"duplicate\":true"));
    assert_eq!(folded_total(&p.folded_around(&client(), "api", t0)), 100);

    // One unknown id in one part refuses every part.
    let mut unknown = Writer::default();
    unknown.known(stack_id(&["main", "never", "sent"]), 7);
    let mut b = BundleWriter::default();
    b.part::<&str, &str>("api", "on-cpu", &[], &window(&[(serve, 5)]));
    b.part::<&str, &str>("db", "on-cpu", &[], &unknown.finish());
    let r = post_bundle(&p, "&batch_id=b2", b.finish());
    assert_eq!(r.status(), 409);
    assert_eq!(folded_total(&p.folded_around(&client(), "api", t0)), 100, "nothing of it stored");

    // The parts name the services; a cut bundle is refused.
    let mut b = BundleWriter::default();
    b.part::<&str, &str>("api", "on-cpu", &[], &window(&[(serve, 5)]));
    let body = b.finish();
    assert_eq!(post_bundle(&p, "&service=api", body.clone()).status(), 400);
    let r = post_bundle(&p, "", body[..body.len() - 1].to_vec());
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("bundle"));
}
