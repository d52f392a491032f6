//! Maintenance: totals for old segments, retention, downsampling and the
//! forgetting of dictionary entries and batch ids no data needs.

use super::*;

impl EmbeddedStore {
    /// Summaries of segments written before summaries existed, read from
    /// their files once and kept in the catalog.
    pub(super) fn summarize_legacy(&self, ids: &[u64]) -> anyhow::Result<()> {
        self.complete_legacy(|m| ids.contains(&m.id) && m.summary.is_none(), usize::MAX)
    }

    /// Per-stack totals for up to `max` segments written before totals
    /// existed.
    pub(super) fn total_legacy(&self, max: usize) -> anyhow::Result<()> {
        self.complete_legacy(|m| m.stack_totals.is_none(), max)
    }

    /// Gives up to `max` segments that `wanted` picks what a segment written
    /// by an older version lacks (its summary, its per-stack totals), from
    /// one read of its rows, and keeps that in the catalog.
    pub(super) fn complete_legacy(&self, wanted: impl Fn(&SegmentMeta) -> bool, max: usize) -> anyhow::Result<()> {
        let todo: Vec<SegmentMeta> = read(&self.segments)
            .iter()
            .filter(|m| wanted(m))
            .take(max)
            .cloned()
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let mut done = Vec::new();
        for mut meta in todo {
            // None: compacted or expired after we listed it.
            let read = segment::read_all(&self.seg_path(&meta)).with_context(|| format!("reading segment {}", meta.id))?;
            let Some(mut rows) = read else { continue };
            if meta.summary.is_none() {
                meta.summary = Some(self.summarize(&rows));
            }
            let mut stack_totals = None;
            if meta.stack_totals.is_none() {
                segment::normalize(&mut rows);
                stack_totals = totals::of(&rows).map(|t| totals::encode(&t));
                meta.stack_totals = Some(stack_totals.is_some());
            }
            done.push(Written { meta, totals: stack_totals });
        }
        let txn = self.catalog().begin_write()?;
        catalog_segments(&txn, &done)?;
        txn.commit()?;
        tracing::info!(segments = done.len(), "completed segments written by an older version");
        let mut segs = write(&self.segments);
        for w in done {
            if let Some(old) = segs.iter_mut().find(|s| s.id == w.meta.id) {
                *old = w.meta;
            }
        }
        Ok(())
    }

    /// Replaces `old` segments by `new` ones in catalog, list and disk.
    pub(super) fn swap_segments(&self, old: &[SegmentMeta], new: Vec<Written>) -> anyhow::Result<()> {
        let txn = self.catalog().begin_write()?;
        {
            let mut t = txn.open_table(SEGMENTS)?;
            let mut totals = txn.open_table(STACK_TOTALS)?;
            for m in old {
                t.remove(m.id)?;
                totals.remove(m.id)?;
            }
        }
        catalog_segments(&txn, &new)?;
        txn.commit()?;
        let gone: HashSet<u64> = old.iter().map(|m| m.id).collect();
        self.totals.forget(gone.iter().copied());
        {
            let mut segs = write(&self.segments);
            segs.retain(|m| !gone.contains(&m.id));
            segs.extend(new.iter().map(|w| w.meta.clone()));
        }
        // Downsampling moves rows to the start of their coarser window.
        for m in old.iter().chain(new.iter().map(|w| &w.meta)) {
            self.results.changed(&m.service, m.min_ts, m.max_ts);
        }
        for m in old {
            // A concurrent query may still read it: Unix keeps the inode alive.
            if let Err(e) = std::fs::remove_file(self.seg_path(m)) {
                tracing::warn!(error = %e, segment = m.id, "removing segment file");
            }
        }
        Ok(())
    }

    /// The widest time span one segment can cover: a segment lives until its
    /// newest row passes retention, so its oldest row may be this much older.
    pub(super) fn widest_segment_ms(&self) -> i64 {
        let downsampled = self.opts.downsample.iter().map(|&(_, res)| res * 60);
        downsampled.fold(self.opts.segment_span_ms, i64::max)
    }

    /// Forgets stacks and series whose latest row is older than `cutoff_ms`:
    /// no segment can reference them any more, so the dictionaries hold only
    /// what retention keeps.
    pub(super) fn collect_garbage(&self, cutoff_ms: i64) -> anyhow::Result<()> {
        let (stacks, series) = write(&self.dict).forget_before(cutoff_ms);
        if stacks.is_empty() && series.is_empty() {
            return Ok(());
        }
        let txn = self.catalog().begin_write()?;
        {
            let mut t = txn.open_table(STACKS)?;
            let mut seen = txn.open_table(STACK_SEEN)?;
            for id in &stacks {
                t.remove(id)?;
                seen.remove(id)?;
            }
            let mut t = txn.open_table(SERIES)?;
            let mut seen = txn.open_table(SERIES_SEEN)?;
            for id in &series {
                t.remove(id)?;
                seen.remove(id)?;
            }
        }
        txn.commit()?;
        tracing::info!(stacks = stacks.len(), series = series.len(), "forgot dictionary entries past retention");
        Ok(())
    }

    pub(super) fn forget_batch_ids_before(&self, before_ms: i64) -> anyhow::Result<()> {
        let txn = self.catalog().begin_write()?;
        {
            let mut t = txn.open_table(BATCH_IDS)?;
            t.retain(|_, at| at >= before_ms)?;
        }
        txn.commit()?;
        Ok(())
    }

    pub(super) fn downsample(&self, now_ms: i64, after_ms: i64, res_ms: i64) -> anyhow::Result<()> {
        // Groups span 60 windows, so a 1-minute level writes hourly files.
        let group_span = res_ms * 60;
        let mut groups: HashMap<(String, String, i64), Vec<SegmentMeta>> = HashMap::new();
        for m in read(&self.segments).iter() {
            if m.max_ts < now_ms - after_ms && m.resolution_ms < res_ms {
                let key = (
                    m.service.clone(),
                    m.kind.clone(),
                    m.min_ts.div_euclid(group_span),
                );
                groups.entry(key).or_default().push(m.clone());
            }
        }
        for ((service, kind, _), old) in groups {
            let mut rows = Vec::new();
            for m in &old {
                let read = segment::read_all(&self.seg_path(m))?;
                rows.extend(read.with_context(|| format!("segment {} is gone before it was downsampled", m.id))?);
            }
            for r in &mut rows {
                r.ts_ms = r.ts_ms.div_euclid(res_ms) * res_ms;
            }
            segment::normalize(&mut rows);
            let before: u64 = old.iter().map(|m| m.rows).sum();
            let new = self.write_segment(&service, &kind, &rows, res_ms)?;
            tracing::info!(%service, %kind, segments = old.len(), rows_before = before, rows_after = new.meta.rows, res_ms, "downsampled");
            self.swap_segments(&old, vec![new])?;
        }
        Ok(())
    }
}
