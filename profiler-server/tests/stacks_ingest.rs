//! Our agent's stacks windows on the real server binary: stacks by frames,
//! then by id, across a restart; ids the server does not have are refused
//! whole (409) and malformed windows are 400.

mod common;

use common::{client, folded_total, now_ms, Proc};
use profiler_pprof::stacks::{stack_id, Writer};

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
