//! Queries cannot take the server down: ranges, node counts and export sizes
//! are bounded, and a crowd of heavy queries neither fails nor stops ingest.

use crate::common;

use std::time::{Duration, Instant};

use common::{client, folded_total, now_ms, Proc};

fn count_nodes(node: &serde_json::Value) -> usize {
    1 + node["children"]
        .as_array()
        .map_or(0, |c| c.iter().map(count_nodes).sum())
}

fn spawn(dir: &std::path::Path, config: &str) -> Proc {
    let path = dir.join("server.toml");
    std::fs::write(&path, config).unwrap();
    Proc::spawn(&dir.join("data"), &["--config", path.to_str().unwrap()])
}

#[test]
fn ranges_nodes_and_exports_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let srv = spawn(dir.path(), "[limits]\nmax_nodes = 50\nmax_stacks = 10\n");
    let c = client();
    let t0 = now_ms();
    let body: String = (0..300)
        .map(|i| format!("main;f{};g{} {}\n", i % 30, i, i + 1))
        .collect();
    let url = format!("/api/v1/ingest?service=big&kind=on-cpu&format=folded&from={t0}");
    assert_eq!(
        c.post(srv.url(&url)).body(body).send().unwrap().status(),
        200
    );
    let total: i64 = (1..=300).sum();
    let range = format!("from={}&until={}", t0 - 60_000, t0 + 60_000);

    let ten_years = c
        .get(srv.url("/api/v1/flamegraph?service=big&from=now-3650d&until=now"))
        .send()
        .unwrap();
    assert_eq!(ten_years.status(), 400);
    assert!(ten_years
        .text()
        .unwrap()
        .contains("hours a query may cover"));

    let flame: serde_json::Value = c
        .get(srv.url(&format!(
            "/api/v1/flamegraph?service=big&{range}&max_nodes=1000000000"
        )))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let nodes = count_nodes(&flame);
    assert!(
        nodes <= 50 + 31,
        "{nodes} nodes: max_nodes is capped (plus one [pruned] per parent)"
    );
    assert_eq!(
        flame["value"].as_i64().unwrap(),
        total,
        "pruning keeps the total"
    );

    let r = c
        .get(srv.url(&format!("/api/v1/folded?service=big&{range}")))
        .send()
        .unwrap();
    assert_eq!(
        r.headers()["x-profiler-truncated"].to_str().unwrap(),
        "290 stacks merged into [truncated]"
    );
    let text = r.text().unwrap();
    assert_eq!(text.lines().count(), 11);
    assert!(text.contains("[truncated] "), "{text}");
    assert_eq!(folded_total(&text), total);

    let top: serde_json::Value = c
        .get(srv.url(&format!("/api/v1/top?service=big&{range}&limit=99999999")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(top["functions"].as_array().unwrap().len(), 300 + 30 + 1);
}

#[test]
fn fifty_heavy_queries_do_not_stop_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let srv = spawn(dir.path(), "[limits]\nmax_concurrent_queries = 4\n");
    let c = client();
    let t0 = now_ms() - 3_600_000;
    // An hour of 10 s windows, 2,000 distinct stacks each.
    for w in 0..360 {
        let body: String = (0..2000)
            .map(|i| format!("main;h{};f{} {}\n", i % 40, i, w + 1))
            .collect();
        let url = format!(
            "/api/v1/ingest?service=heavy&kind=on-cpu&format=folded&from={}",
            t0 + w * 10_000
        );
        assert_eq!(
            c.post(srv.url(&url)).body(body).send().unwrap().status(),
            200
        );
    }
    let query = srv.url(&format!(
        "/api/v1/flamegraph?service=heavy&from={t0}&until={}&max_nodes=100000",
        t0 + 3_600_000
    ));
    let start = Instant::now();
    let (answers, ingest_times) = std::thread::scope(|s| {
        let queries: Vec<_> = (0..50)
            .map(|_| {
                let (c, url) = (c.clone(), query.clone());
                s.spawn(move || c.get(url).send().map(|r| r.status().as_u16()).unwrap_or(0))
            })
            .collect();
        let mut ingest_times = Vec::new();
        for i in 0..10 {
            let url = format!(
                "/api/v1/ingest?service=live&kind=on-cpu&format=folded&from={}",
                now_ms()
            );
            let t = Instant::now();
            let status = c
                .post(srv.url(&url))
                .body(format!("main;tick{i} 1\n"))
                .send()
                .unwrap()
                .status();
            assert_eq!(status, 200, "ingest {i} during the query storm");
            ingest_times.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
        let answers: Vec<u16> = queries.into_iter().map(|q| q.join().unwrap()).collect();
        (answers, ingest_times)
    });
    let ok = answers.iter().filter(|&&s| s == 200).count();
    let busy = answers.iter().filter(|&&s| s == 503).count();
    let slowest = ingest_times.iter().max().unwrap();
    println!(
        "50 queries in {:?}: {ok} answered, {busy} told to retry (503); slowest ingest meanwhile {slowest:?}",
        start.elapsed()
    );
    assert_eq!(ok + busy, 50, "only 200 or 503: {answers:?}");
    assert!(ok >= 4, "{answers:?}");
    assert!(
        *slowest < Duration::from_secs(3),
        "ingest stalled for {slowest:?}"
    );
}
