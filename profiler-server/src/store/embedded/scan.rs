//! The read path: sums of the rows a query selects, from buffers, per-segment
//! totals and segment files.

use super::*;

pub(super) fn scan_rows(
    rows: &[Row],
    sel: &Selector,
    allowed: Option<&HashSet<u64>>,
    by: GroupBy,
    out: &mut HashMap<u64, i64>,
) {
    for r in rows {
        if r.ts_ms < sel.from_ms || r.ts_ms >= sel.until_ms {
            continue;
        }
        if allowed.is_some_and(|a| !a.contains(&r.series_id)) {
            continue;
        }
        let key = match by {
            GroupBy::Stack => r.stack_id,
            GroupBy::Time { step_ms } => segment::bucket(r.ts_ms, sel.from_ms, step_ms),
        };
        *out.entry(key).or_insert(0) += r.value;
    }
}

impl EmbeddedStore {
    /// Sums the rows of buffers and segments that a query selects.
    pub(super) fn scan(&self, sel: &Selector, by: GroupBy) -> StoreResult<Aggregate> {
        let allowed: Option<HashSet<u64>> = (!sel.matchers.is_empty()).then(|| {
            let d = read(&self.dict);
            d.by_service
                .get(&sel.service)
                .into_iter()
                .flatten()
                .filter(|id| sel.matchers.iter().all(|m| m.matches(&d.series[*id])))
                .copied()
                .collect()
        });
        let mut out = Aggregate::new();
        let segs: Vec<SegmentMeta> = {
            let mem = read(&self.mem);
            let bufs = std::iter::once(&mem.active).chain(mem.flushing.iter().map(|p| &*p.buf));
            for buf in bufs {
                for ((service, kind), rows) in buf {
                    if *service == sel.service && sel.wants_kind(kind) {
                        let dst = out.entry(kind.clone()).or_default();
                        scan_rows(rows, sel, allowed.as_ref(), by, dst);
                    }
                }
            }
            read(&self.segments)
                .iter()
                .filter(|m| {
                    m.service == sel.service
                        && sel.wants_kind(&m.kind)
                        && m.min_ts < sel.until_ms
                        && m.max_ts >= sel.from_ms
                })
                .cloned()
                .collect()
        };
        if segs.is_empty() {
            return Ok(out);
        }
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(segs.len());
        // Deal the largest segments out first so threads finish together.
        let mut order: Vec<&SegmentMeta> = segs.iter().collect();
        order.sort_by_key(|m| std::cmp::Reverse(m.rows));
        let partials = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let mine: Vec<&SegmentMeta> =
                        order.iter().skip(t).step_by(threads).copied().collect();
                    let allowed = allowed.as_ref();
                    s.spawn(move || -> StoreResult<Aggregate> {
                        let mut part = Aggregate::new();
                        for m in mine {
                            sel.cancel.check()?;
                            let inside = m.min_ts >= sel.from_ms && m.max_ts < sel.until_ms;
                            let dst = part.entry(m.kind.clone()).or_default();
                            if inside && allowed.is_none() && self.add_precomputed(m, by, sel.from_ms, dst)? {
                                continue;
                            }
                            let scan = Scan {
                                time: (!inside).then_some((sel.from_ms, sel.until_ms)),
                                series: allowed,
                                by,
                                from_ms: sel.from_ms,
                            };
                            segment::aggregate(&self.seg_path(m), &scan, dst)
                                .with_context(|| format!("reading segment {}", m.id))?;
                        }
                        Ok(part)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("scan thread panicked"))
                .collect::<Vec<_>>()
        });
        for p in partials {
            crate::store::merge_into(&mut out, p?);
        }
        Ok(out)
    }

    /// Adds a segment's whole content from what was computed when it was
    /// written, without opening its file: the per-stack totals, or the
    /// summary's windows for a timeline. False when there is none.
    pub(super) fn add_precomputed(
        &self,
        meta: &SegmentMeta,
        by: GroupBy,
        from_ms: i64,
        out: &mut HashMap<u64, i64>,
    ) -> anyhow::Result<bool> {
        match by {
            GroupBy::Stack => {
                let Some(totals) = self.stack_totals(meta)? else { return Ok(false) };
                out.reserve(totals.len());
                for &(stack, value) in totals.iter().filter(|(_, v)| *v != 0) {
                    *out.entry(stack).or_insert(0) += value;
                }
            }
            GroupBy::Time { step_ms } => {
                let Some(summary) = &meta.summary else { return Ok(false) };
                for &(ts, value) in summary.windows.iter().filter(|(_, v)| *v != 0) {
                    *out.entry(segment::bucket(ts, from_ms, step_ms)).or_insert(0) += value;
                }
            }
        }
        Ok(true)
    }

    /// A segment's per-stack totals, if its entry has them and they read
    /// back whole; None sends the query to the rows.
    pub(super) fn stack_totals(&self, meta: &SegmentMeta) -> anyhow::Result<Option<totals::Totals>> {
        if meta.stack_totals != Some(true) {
            return Ok(None);
        }
        if let Some(t) = self.totals.get(meta.id) {
            return Ok(Some(t));
        }
        let txn = self.catalog().begin_read()?;
        let Some(bytes) = txn.open_table(STACK_TOTALS)?.get(meta.id)? else {
            // Compacted or expired after the query listed it.
            return Ok(None);
        };
        let Some(t) = totals::decode(bytes.value()) else {
            tracing::warn!(segment = meta.id, "corrupt stack totals in the catalog; reading the segment's rows");
            return Ok(None);
        };
        self.totals.insert(meta.id, t.clone());
        Ok(Some(t))
    }

    pub(super) fn summarize(&self, rows: &[Row]) -> Summary {
        let d = read(&self.dict);
        Summary::of(rows, |id| d.series.get(&id)?.get("host").cloned())
    }
}
