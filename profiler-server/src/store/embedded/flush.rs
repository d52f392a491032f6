//! Flushing: buffered rows become Parquet segments, committed to the catalog with
//! the new dictionary entries and batch ids in one redb transaction.

use super::*;

/// Adds catalog entries (and their totals) for segment files written.
pub(super) fn catalog_segments(txn: &redb::WriteTransaction, written: &[Written]) -> anyhow::Result<()> {
    let mut t = txn.open_table(SEGMENTS)?;
    let mut totals = txn.open_table(STACK_TOTALS)?;
    for w in written {
        t.insert(w.meta.id, serde_json::to_string(&w.meta)?.as_str())?;
        if let Some(bytes) = &w.totals {
            totals.insert(w.meta.id, bytes.as_slice())?;
        }
    }
    Ok(())
}

impl EmbeddedStore {
    pub(super) fn flush_pending(&self) -> anyhow::Result<()> {
        self.rotate()?;
        loop {
            let next = read(&self.mem).flushing.first().map(|p| Pending {
                wal_upto: p.wal_upto,
                buf: p.buf.clone(),
                ids: p.ids.clone(),
            });
            let Some(p) = next else { break };
            let rows: usize = p.buf.values().map(Vec::len).sum();
            self.persist(&p)?;
            for (seq, path) in wal::list(&self.wal_dir())? {
                if seq <= p.wal_upto {
                    let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                    std::fs::remove_file(path)?;
                    self.wal_bytes.fetch_sub(len.min(self.wal_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
                }
            }
            tracing::debug!(rows, wal_upto = p.wal_upto, "flushed buffer to segments");
        }
        Ok(())
    }

    pub(super) fn persist(&self, p: &Pending) -> anyhow::Result<()> {
        let (stack_ids, series_ids) = {
            let mut d = write(&self.dict);
            (
                std::mem::take(&mut d.new_stacks),
                std::mem::take(&mut d.new_series),
            )
        };
        let mut written = Vec::new();
        let res = self.persist_inner(p, &stack_ids, &series_ids, &mut written);
        if let Err(e) = res {
            for w in &written {
                let _ = std::fs::remove_file(self.seg_path(&w.meta));
            }
            let mut d = write(&self.dict);
            d.new_stacks.extend(stack_ids);
            d.new_series.extend(series_ids);
            return Err(e);
        }
        let mut mem = write(&self.mem);
        let mut segs = write(&self.segments);
        segs.extend(written.into_iter().map(|w| w.meta));
        mem.flushing.retain(|q| !Arc::ptr_eq(&q.buf, &p.buf));
        Ok(())
    }

    pub(super) fn persist_inner(
        &self,
        p: &Pending,
        stack_ids: &[u64],
        series_ids: &[u64],
        written: &mut Vec<Written>,
    ) -> anyhow::Result<()> {
        let span = self.opts.segment_span_ms;
        for ((service, kind), rows) in p.buf.iter() {
            let mut by_span: HashMap<i64, Vec<Row>> = HashMap::new();
            for r in rows {
                by_span
                    .entry(r.ts_ms.div_euclid(span))
                    .or_default()
                    .push(*r);
            }
            for (_, mut rows) in by_span {
                segment::normalize(&mut rows);
                written.push(self.write_segment(service, kind, &rows, 0)?);
            }
        }
        let d = read(&self.dict);
        let txn = self.catalog().begin_write()?;
        {
            let mut t = txn.open_table(STACKS)?;
            for id in stack_ids {
                t.insert(id, encode_frames(&d.stacks[id]).as_slice())?;
            }
            let mut t = txn.open_table(SERIES)?;
            for id in series_ids {
                t.insert(id, serde_json::to_string(&*d.series[id])?.as_str())?;
            }
            catalog_segments(&txn, written)?;
            let mut t = txn.open_table(BATCH_IDS)?;
            for (key, at) in p.ids.iter() {
                t.insert(key, at)?;
            }
            let (mut stacks, mut series) = (HashSet::new(), HashSet::new());
            for r in p.buf.values().flatten() {
                stacks.insert(r.stack_id);
                series.insert(r.series_id);
            }
            let mut t = txn.open_table(STACK_SEEN)?;
            for id in stacks {
                if let Some(at) = d.stack_seen.get(&id) {
                    t.insert(id, at)?;
                }
            }
            let mut t = txn.open_table(SERIES_SEEN)?;
            for id in series {
                if let Some(at) = d.series_seen.get(&id) {
                    t.insert(id, at)?;
                }
            }
            txn.open_table(META)?.insert(WAL_FLUSHED_UPTO, p.wal_upto)?;
        }
        drop(d);
        txn.commit()?;
        Ok(())
    }

    /// Writes one segment file of normalized rows; `resolution_ms` 0 means
    /// ingest resolution.
    pub(super) fn write_segment(
        &self,
        service: &str,
        kind: &str,
        rows: &[Row],
        resolution_ms: i64,
    ) -> anyhow::Result<Written> {
        // A histograms' segment would have a total per stack and bucket, about one per
        // row: the catalog would hold the segment again, for queries it reads quickly.
        let waits = profiler_pprof::waits::is_waits_kind(kind);
        let totals = if waits { None } else { totals::of(rows) };
        let mut meta = SegmentMeta {
            id: self.next_segment.fetch_add(1, Ordering::SeqCst),
            service: service.to_owned(),
            kind: kind.to_owned(),
            min_ts: rows.iter().map(|r| r.ts_ms).min().unwrap_or(0),
            max_ts: rows.iter().map(|r| r.ts_ms).max().unwrap_or(0),
            rows: rows.len() as u64,
            bytes: 0,
            resolution_ms,
            summary: Some(self.summarize(rows)),
            stack_totals: Some(totals.is_some()),
        };
        meta.bytes = match waits {
            true => segment::write_waits(&self.seg_path(&meta), rows)?,
            false => segment::write(&self.seg_path(&meta), rows)?,
        };
        Ok(Written {
            meta,
            totals: totals.map(|t| totals::encode(&t)),
        })
    }
}
