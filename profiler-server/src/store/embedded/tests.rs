use super::*;
use crate::store::{series_id, stack_id, Matcher};
use std::collections::BTreeSet;

fn opts() -> StoreOptions {
    StoreOptions {
        segment_span_ms: 600_000,
        retention_ms: Some(86_400_000),
        downsample: vec![(3_600_000, 60_000)],
        ..StoreOptions::default()
    }
}

fn batch(ts: i64, value: i64) -> Batch {
    let frames: Frames = ["main", "f"].map(Arc::from).into();
    let labels = Labels::from([("service".to_string(), "svc".to_string())]);
    let (st, se) = (stack_id(&frames), series_id(&labels));
    Batch {
        id: None,
        maybe_stored_since_ms: None,
        service: "svc".into(),
        kind: "on-cpu".into(),
        stacks: vec![(st, frames)],
        series: vec![(se, labels)],
        rows: vec![Row {
            ts_ms: ts,
            series_id: se,
            stack_id: st,
            value,
        }],
    }
}

fn total(s: &EmbeddedStore, from: i64, until: i64) -> i64 {
    let sel = Selector {
        service: "svc".into(),
        from_ms: from,
        until_ms: until,
        kinds: None,
        matchers: vec![],
        cancel: Default::default(),
    };
    s.aggregate(&sel, GroupBy::Stack)
        .unwrap()
        .values()
        .flat_map(|m| m.values())
        .sum()
}

/// A batch of `service` on `host` with one row at `ts`.
fn hosted(service: &str, host: &str, ts: i64, value: i64) -> Batch {
    let mut b = batch(ts, value);
    let labels = Labels::from([
        ("service".to_string(), service.to_string()),
        ("host".to_string(), host.to_string()),
    ]);
    let se = series_id(&labels);
    b.service = service.into();
    b.series = vec![(se, labels)];
    b.rows[0].series_id = se;
    b
}

#[test]
fn overview_is_the_same_from_buffers_segments_and_old_segments() {
    let dir = tempfile::tempdir().unwrap();
    let base = now_ms().div_euclid(600_000) * 600_000 - 1_200_000;
    let grid = Grid { from_ms: base, until_ms: base + 1_200_000, step_ms: 300_000 };
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    s.append(hosted("web", "h1", base, 10)).unwrap();
    s.append(hosted("web", "h2", base + 700_000, 5)).unwrap();
    s.append(hosted("db", "h1", base + 10_000, 3)).unwrap();
    // Outside the grid on both sides.
    s.append(hosted("web", "h3", base - 10_000, 100)).unwrap();
    s.append(hosted("cron", "h3", base + 1_200_000, 100)).unwrap();
    let from_buffers = s.overview(grid, &Cancel::default()).unwrap();
    assert_eq!(from_buffers.keys().collect::<Vec<_>>(), ["db", "web"]);
    let web = &from_buffers["web"];
    assert_eq!(web.kinds["on-cpu"], vec![10, 0, 5, 0]);
    assert_eq!(web.hosts, BTreeSet::from(["h1".to_string(), "h2".to_string()]));
    assert_eq!(web.last_seen_ms, base + 700_000);

    s.flush().unwrap();
    assert!(s.segment_count() >= 4);
    assert_eq!(s.overview(grid, &Cancel::default()).unwrap(), from_buffers);
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.overview(grid, &Cancel::default()).unwrap(), from_buffers);
    // Segments written before summaries existed are read once, then
    // carry a summary in the catalog too.
    let txn = s.catalog().begin_write().unwrap();
    {
        let mut t = txn.open_table(SEGMENTS).unwrap();
        for m in read(&s.segments).iter() {
            let old = SegmentMeta { summary: None, ..m.clone() };
            t.insert(m.id, serde_json::to_string(&old).unwrap().as_str()).unwrap();
        }
    }
    txn.commit().unwrap();
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert!(read(&s.segments).iter().all(|m| m.summary.is_none()));
    assert_eq!(s.overview(grid, &Cancel::default()).unwrap(), from_buffers);
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    for m in read(&s.segments).iter() {
        assert_eq!(m.summary.is_some(), grid.meets(m.min_ts, m.max_ts), "{m:?}");
    }
}

#[test]
fn data_survives_reopen_flush_and_downsampling() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
        for i in 0..10 {
            s.append(batch(i * 10_000, 1)).unwrap();
        }
        assert_eq!(total(&s, 0, i64::MAX), 10);
    }
    // Replayed from the WAL alone.
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert_eq!(total(&s, 0, i64::MAX), 10);
    s.flush().unwrap();
    assert_eq!(s.buffered_rows(), 0);
    assert_eq!(s.segment_count(), 1);
    s.append(batch(5_000_000, 7)).unwrap();
    assert_eq!(total(&s, 0, i64::MAX), 17);
    assert_eq!(total(&s, 20_000, 50_000), 3);
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert_eq!(
        total(&s, 0, i64::MAX),
        17,
        "no double counting after flush + replay"
    );
    s.flush().unwrap();
    assert_eq!(wal::list(&dir.path().join("wal")).unwrap().len(), 1);

    // Everything older than an hour at `now` goes to 1-minute windows.
    s.maintain(4 * 3_600_000).unwrap();
    assert_eq!(total(&s, 0, i64::MAX), 17);
    assert_eq!(
        total(&s, 0, 30_000),
        6,
        "windows 0..50 s now all sit at minute 0"
    );
    // And past retention everything goes, dictionaries included.
    let stack = batch(0, 1).stacks[0].0;
    assert!(s.stack(stack).unwrap().is_some());
    s.maintain(100 * 3_600_000).unwrap();
    assert_eq!(total(&s, 0, i64::MAX), 0);
    assert_eq!(s.segment_count(), 0);
    assert!(s.stack(stack).unwrap().is_none(), "stack forgotten");
    assert!(s.services().unwrap().is_empty(), "series forgotten");
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert!(s.stack(stack).unwrap().is_none() && s.services().unwrap().is_empty(), "forgotten in the catalog too");
}

#[test]
fn stacks_share_their_frame_names_until_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let stack = |leaf: &str, ts: i64| {
        let mut b = batch(ts, 1);
        let frames: Frames = ["main", leaf].map(Arc::from).into();
        b.stacks = vec![(stack_id(&frames), frames)];
        b.rows[0].stack_id = b.stacks[0].0;
        b
    };
    let (old, recent) = (stack("old_leaf", 0), stack("recent_leaf", 90 * 3_600_000));
    let (old_id, recent_id) = (old.stacks[0].0, recent.stacks[0].0);
    let shares_main = |s: &EmbeddedStore| Arc::ptr_eq(&s.stack(old_id).unwrap().unwrap()[0], &s.stack(recent_id).unwrap().unwrap()[0]);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    s.append(old).unwrap();
    s.append(recent).unwrap();
    assert!(shares_main(&s), "two batches' `main` are one name in the dictionary");
    assert_eq!(s.stats().dictionary_frame_names, 3);
    s.flush().unwrap();
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert!(shares_main(&s), "and again when read back from the catalog");
    // Past retention of the old stack: its own name goes, `main` stays.
    s.maintain(100 * 3_600_000).unwrap();
    assert!(s.stack(old_id).unwrap().is_none());
    assert_eq!(s.stats().dictionary_frame_names, 2);
    assert_eq!(&*s.stack(recent_id).unwrap().unwrap()[1], "recent_leaf");
}

/// Two stacks over two series and twelve windows of one 10-minute segment.
fn busy_segment(s: &EmbeddedStore, base: i64) {
    for window in 0..12 {
        for (host, leaf, value) in [("h1", "f", 1), ("h2", "f", 2), ("h1", "g", 10)] {
            let mut b = hosted("svc", host, base + window * 10_000, value);
            let frames: Frames = ["main", leaf].map(Arc::from).into();
            b.stacks = vec![(stack_id(&frames), frames)];
            b.rows[0].stack_id = b.stacks[0].0;
            s.append(b).unwrap();
        }
    }
}

#[test]
fn whole_segments_are_answered_from_their_totals_without_their_rows() {
    let dir = tempfile::tempdir().unwrap();
    let base = 6_000_000;
    let opts = || StoreOptions { result_cache_bytes: 0, ..opts() };
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    busy_segment(&s, base);
    let query = |s: &EmbeddedStore, from: i64, until: i64, by: GroupBy, host: Option<&str>| {
        let sel = Selector {
            service: "svc".into(),
            from_ms: from,
            until_ms: until,
            kinds: None,
            matchers: host.map(|h| Matcher::Eq("host".into(), h.into())).into_iter().collect(),
            cancel: Default::default(),
        };
        s.aggregate(&sel, by).unwrap()
    };
    let by_time = GroupBy::Time { step_ms: 30_000 };
    let whole = base..base + 600_000;
    let from_rows = [
        query(&s, whole.start, whole.end, GroupBy::Stack, None),
        query(&s, whole.start, whole.end, by_time, None),
        query(&s, whole.start + 20_000, whole.end, GroupBy::Stack, None),
    ];
    assert_eq!(from_rows[0]["on-cpu"].values().sum::<i64>(), 12 * 13);
    s.flush().unwrap();
    let seg = read(&s.segments)[0].clone();
    assert_eq!(seg.stack_totals, Some(true), "36 rows over 2 stacks: totals pay");

    // Without the file, only what its totals and summary answer still works.
    let file = s.seg_path(&seg);
    let rows = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(query(&s, whole.start, whole.end, GroupBy::Stack, None), from_rows[0]);
    assert_eq!(query(&s, whole.start, whole.end, by_time, None), from_rows[1]);
    assert_eq!(query(&s, whole.start - 600_000, whole.end + 600_000, GroupBy::Stack, None), from_rows[0]);
    let cut = query(&s, whole.start + 20_000, whole.end, GroupBy::Stack, None);
    assert!(cut.values().all(|m| m.is_empty()), "a cut segment needs its rows");
    std::fs::write(&file, rows).unwrap();
    assert_eq!(query(&s, whole.start + 20_000, whole.end, GroupBy::Stack, None), from_rows[2]);
    let h2 = query(&s, whole.start, whole.end, GroupBy::Stack, Some("h2"));
    assert_eq!(h2["on-cpu"].values().sum::<i64>(), 12 * 2, "a label filter reads the rows");

    // Read back from the catalog after a restart, and dropped with the segment.
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert_eq!(s.totals.bytes(), 0);
    assert_eq!(query(&s, whole.start, whole.end, GroupBy::Stack, None), from_rows[0]);
    assert!(s.totals.bytes() > 0);
    s.maintain(100 * 3_600_000 + base).unwrap();
    assert_eq!(s.segment_count(), 0);
    assert_eq!(s.totals.bytes(), 0);
    let txn = s.catalog().begin_read().unwrap();
    assert!(txn.open_table(STACK_TOTALS).unwrap().get(seg.id).unwrap().is_none());
}

#[test]
fn concurrent_appends_share_fsyncs_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    let (threads, each) = (8, 50);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let s = &s;
            scope.spawn(move || {
                for i in 0..each {
                    let mut b = batch((t * each + i) * 10_000, 1);
                    b.id = Some(format!("{t}-{i}"));
                    assert_eq!(s.append(b).unwrap(), Appended::Stored);
                }
            });
        }
    });
    let appends = (threads * each) as u64;
    assert_eq!(total(&s, 0, i64::MAX), appends as i64);
    let fsyncs = s.stats().wal_fsyncs;
    assert!(fsyncs < appends, "{fsyncs} fsyncs for {appends} appends: none shared");
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert_eq!(total(&s, 0, i64::MAX), appends as i64, "all of them in the WAL");
}

#[test]
fn records_written_before_an_abandoned_file_are_never_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    s.append(batch(0, 1)).unwrap();
    // Another writer's record, written and waiting for its fsync when a
    // write fails and the file cannot be cut back (the path that abandons).
    let record = wal::frame(&wal::encode(&batch(10_000, 5)));
    let mut w = lock(&s.wal);
    w.writer.write(&record).unwrap();
    w.len += record.len() as u64;
    w.appended += 1;
    let waiting = w.appended;
    w.unsynced.push((waiting, batch(10_000, 5), None));
    s.abandon_file(&mut w);
    assert!(matches!(w.outcomes.remove(&waiting), Some(Err(_))), "its bytes were cut: it must fail");
    drop(w);
    assert_eq!(total(&s, 0, i64::MAX), 1);
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    assert_eq!(total(&s, 0, i64::MAX), 1, "nothing of it comes back either");
}

#[test]
fn segments_from_before_totals_get_them_at_maintenance() {
    let dir = tempfile::tempdir().unwrap();
    let base = 6_000_000;
    let opts = || StoreOptions { result_cache_bytes: 0, ..opts() };
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    busy_segment(&s, base);
    s.flush().unwrap();
    let seg = read(&s.segments)[0].clone();
    let txn = s.catalog().begin_write().unwrap();
    {
        let legacy = SegmentMeta { stack_totals: None, ..seg.clone() };
        txn.open_table(SEGMENTS).unwrap().insert(seg.id, serde_json::to_string(&legacy).unwrap().as_str()).unwrap();
        txn.open_table(STACK_TOTALS).unwrap().remove(seg.id).unwrap();
    }
    txn.commit().unwrap();
    drop(s);
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    let whole = Selector {
        service: "svc".into(),
        from_ms: base,
        until_ms: base + 600_000,
        kinds: None,
        matchers: vec![],
        cancel: Default::default(),
    };
    let from_rows = s.aggregate(&whole, GroupBy::Stack).unwrap();
    assert_eq!(s.totals.bytes(), 0, "no totals yet");
    s.maintain(base + 60_000).unwrap();
    assert_eq!(read(&s.segments)[0].stack_totals, Some(true));
    std::fs::remove_file(s.seg_path(&seg)).unwrap();
    assert_eq!(s.aggregate(&whole, GroupBy::Stack).unwrap(), from_rows, "answered from the totals");
}

#[test]
fn answers_over_settled_ranges_are_kept_until_late_data_or_maintenance_changes_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = 6_000_000;
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    busy_segment(&s, base);
    s.flush().unwrap();
    let cut = Selector {
        service: "svc".into(),
        from_ms: base + 20_000,
        until_ms: base + 600_000,
        kinds: None,
        matchers: vec![],
        cancel: Default::default(),
    };
    let sum = |agg: &Aggregate| agg.values().flat_map(|m| m.values()).sum::<i64>();
    assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 10 * 13);
    // Kept: answered again without the rows.
    let file = s.seg_path(&read(&s.segments)[0]);
    let rows = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 10 * 13);
    assert!(s.stats().result_cache_bytes > 0);
    std::fs::write(&file, rows).unwrap();

    // A late window inside the range drops the answer; one outside does not.
    s.append(hosted("svc", "h1", base + 700_000, 1000)).unwrap();
    assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 10 * 13);
    s.append(hosted("svc", "h3", base + 30_000, 1000)).unwrap();
    assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 10 * 13 + 1000);

    // Downsampling to minutes moves the windows of the first minute,
    // the late one included, to its start: out of the range.
    s.flush().unwrap();
    s.maintain(base + 4 * 3_600_000).unwrap();
    assert_eq!(sum(&s.aggregate(&cut, GroupBy::Stack).unwrap()), 6 * 13);
}

/// Wait histograms are rows of their own kind, keyed by row ids that name no stack:
/// they survive flush and downsampling merged (summed per bucket), and only a
/// selector that names their kind reads them.
#[test]
fn wait_histograms_merge_through_downsampling_and_stay_out_of_totals() {
    use profiler_pprof::waits::{bucket_of, row_id, waits_kind};
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(dir.path(), opts()).unwrap();
    let kind = "off-cpu:sleep";
    for i in 0..10 {
        let mut b = batch(i * 10_000, 5_000_000);
        b.kind = kind.into();
        let (stack, series) = (b.rows[0].stack_id, b.rows[0].series_id);
        s.append(b).unwrap();
        let bucket = bucket_of(if i % 5 == 0 { 60_000_000 } else { 2_000_000 });
        let row = Row { ts_ms: i * 10_000, series_id: series, stack_id: row_id(stack, bucket), value: 1 << 16 };
        let waits = Batch { kind: waits_kind(kind), stacks: vec![], rows: vec![row], ..batch(0, 0) };
        s.append(waits).unwrap();
    }
    let read = |s: &EmbeddedStore| {
        let sel = Selector {
            service: "svc".into(),
            from_ms: 0,
            until_ms: i64::MAX,
            kinds: Some(vec![waits_kind(kind)]),
            matchers: vec![],
            cancel: Default::default(),
        };
        let agg = s.aggregate(&sel, GroupBy::Stack).unwrap();
        let mut rows: Vec<(u64, i64)> = agg.values().flat_map(|m| m.iter().map(|(&k, &v)| (k, v))).collect();
        rows.sort();
        rows
    };
    let before = read(&s);
    assert_eq!(before.iter().map(|r| r.1).sum::<i64>(), 10 << 16);
    assert_eq!(before.len(), 2, "two buckets of one stack");
    assert_eq!(total(&s, 0, i64::MAX), 50_000_000, "totals without the histograms");
    s.flush().unwrap();
    s.maintain(4 * 3_600_000).unwrap();
    assert_eq!(read(&s), before, "downsampled, merged, not dropped");
    assert_eq!(total(&s, 0, i64::MAX), 50_000_000);
    let grid = Grid { from_ms: 0, until_ms: 600_000, step_ms: 600_000 };
    let overview = s.overview(grid, &Cancel::default()).unwrap();
    assert_eq!(overview["svc"].kinds.keys().collect::<Vec<_>>(), [kind], "the overview shows profile kinds only");
}
