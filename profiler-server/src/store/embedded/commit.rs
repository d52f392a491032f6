//! The write path: WAL records, group commit (one fsync for every record written
//! before it), settling records into the buffer, and the refusals of a store that
//! cannot take more.

use super::*;

pub(super) fn apply(mem: &mut Mem, dict: &mut Dict, b: Batch) {
    for (id, frames) in b.stacks {
        if let std::collections::hash_map::Entry::Vacant(e) = dict.stacks.entry(id) {
            e.insert(dict.names.share(&frames));
            dict.new_stacks.push(id);
        }
    }
    for (id, labels) in b.series {
        dict.add_series(id, Arc::new(labels), false);
    }
    dict.saw(&b.rows);
    mem.active_rows += b.rows.len();
    mem.active
        .entry((b.service, b.kind))
        .or_default()
        .extend(b.rows);
}

/// Applies a replayed batch unless its id was already applied (a retry
/// whose first attempt reached the disk although its fsync failed). Returns
/// whether it was applied.
pub(super) fn apply_new(mem: &mut Mem, dict: &mut Dict, recent: &mut RecentBatches, b: Batch, now: i64) -> bool {
    if let Some(key) = b.id.as_deref().map(recent::key) {
        if recent.contains(key) {
            return false;
        }
        recent.insert(key, now);
        mem.active_ids.push((key, now));
    }
    apply(mem, dict, b);
    true
}


impl EmbeddedStore {
    /// The WAL state once no fsync runs without the lock: the file may
    /// then be switched or cut.
    pub(super) fn settled_wal(&self) -> MutexGuard<'_, WalState> {
        self.wait_for_fsync(lock(&self.wal))
    }

    pub(super) fn wait_for_fsync<'a>(&'a self, mut w: MutexGuard<'a, WalState>) -> MutexGuard<'a, WalState> {
        while w.syncing {
            w = self.sync_done.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        w
    }

    /// Starts a new WAL file and turns the active buffer into a pending one.
    pub(super) fn rotate(&self) -> anyhow::Result<()> {
        let mut w = self.settled_wal();
        // Written records must be in the buffer before it is set aside, or
        // their WAL file could be deleted with their rows still unflushed.
        // Synced with the lock held, so none is written to this file after.
        self.sync_unsynced(&mut w);
        let mut mem = write(&self.mem);
        if mem.active_rows == 0 {
            return Ok(());
        }
        let old = w.writer.seq;
        self.start_new_file(&mut w)?;
        let buf = std::mem::take(&mut mem.active);
        let ids = std::mem::take(&mut mem.active_ids);
        mem.active_rows = 0;
        mem.flushing.push(Pending {
            wal_upto: old,
            buf: Arc::new(buf),
            ids: Arc::new(ids),
        });
        Ok(())
    }

    /// Switches to WAL file `seq + 1`; if that fails, ingest is refused
    /// until a later attempt succeeds.
    pub(super) fn start_new_file(&self, w: &mut WalState) -> anyhow::Result<()> {
        debug_assert!(!w.syncing, "the file is switched under an fsync");
        let seq = w.writer.seq + 1;
        match wal::create(&self.wal_dir(), seq) {
            Ok(file) => {
                w.writer = wal::Writer::new(seq, file);
                w.len = 0;
                w.synced_len = 0;
                w.broken = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot start a WAL file; refusing ingest until it works");
                w.broken = Some((format!("cannot write the WAL: {e:#}"), Instant::now()));
                Err(e)
            }
        }
    }

    /// Fsyncs every written record with the lock held, then settles them.
    pub(super) fn sync_unsynced(&self, w: &mut WalState) {
        if w.unsynced.is_empty() {
            return;
        }
        let records = std::mem::take(&mut w.unsynced);
        let len = w.len;
        let synced = w.writer.sync();
        self.settle(w, records, len, synced);
    }

    /// Fsyncs every written record without holding the lock, so writers
    /// keep writing meanwhile (group commit), then settles them.
    pub(super) fn sync_shared<'a>(&'a self, mut w: MutexGuard<'a, WalState>) -> MutexGuard<'a, WalState> {
        let records = std::mem::take(&mut w.unsynced);
        let len = w.len;
        let file = w.writer.file();
        w.syncing = true;
        drop(w);
        let synced = file.sync_data();
        let mut w = lock(&self.wal);
        w.syncing = false;
        self.settle(&mut w, records, len, synced);
        self.sync_done.notify_all();
        w
    }

    /// Applies the batches of records fsynced up to `len` (success) or
    /// abandons the file (failure); records each outcome for its writer.
    pub(super) fn settle(&self, w: &mut WalState, records: Vec<(u64, Batch, Option<BatchKey>)>, len: u64, synced: std::io::Result<()>) {
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        match synced {
            Ok(()) => {
                w.synced_len = len;
                let now = now_ms();
                let mut changed = Vec::with_capacity(records.len());
                {
                    let mut mem = write(&self.mem);
                    let mut dict = write(&self.dict);
                    for (n, batch, key) in records {
                        if let Some(key) = key {
                            w.in_flight.remove(&key);
                            w.recent.insert(key, now);
                            mem.active_ids.push((key, now));
                        }
                        let windows = batch.rows.iter().map(|r| r.ts_ms);
                        if let (Some(first), Some(last)) = (windows.clone().min(), windows.max()) {
                            changed.push((batch.service.clone(), first, last));
                        }
                        apply(&mut mem, &mut dict, batch);
                        w.outcomes.insert(n, Ok(()));
                    }
                }
                // Only once the rows are visible, so a query that starts
                // after this sees them.
                for (service, first, last) in changed {
                    self.results.changed(&service, first, last);
                }
            }
            Err(e) => {
                self.counters.fsync_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, records = records.len(), file = w.writer.seq, "WAL fsync failed; not acknowledging, abandoning the file");
                for (n, _, key) in records {
                    if let Some(key) = key {
                        w.in_flight.remove(&key);
                    }
                    w.outcomes.insert(n, Err(format!("storing the batch failed (WAL fsync: {e}); retry")));
                }
                self.abandon_file(w);
            }
        }
    }

    /// Cuts the current file back to its synced length (the rest may or may
    /// not be on disk) and moves on to a new file. Records written since the
    /// last fsync (another writer's, waiting for theirs) went with the rest,
    /// or are in a file no later fsync covers: they fail, never to be
    /// acknowledged.
    pub(super) fn abandon_file(&self, w: &mut WalState) {
        if let Err(e) = w.writer.truncate(w.synced_len) {
            tracing::error!(error = %e, file = w.writer.seq, "cannot cut the WAL file back to its synced length");
        }
        let cut = w.len - w.synced_len;
        self.wal_bytes.fetch_sub(cut.min(self.wal_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        w.len = w.synced_len;
        for (n, _, key) in std::mem::take(&mut w.unsynced) {
            if let Some(key) = key {
                w.in_flight.remove(&key);
            }
            w.outcomes.insert(n, Err("storing the batch failed (its WAL file was abandoned); retry".into()));
        }
        let _ = self.start_new_file(w);
    }

    /// Why ingest must wait, if it must.
    pub(super) fn busy(&self, w: &mut WalState) -> Option<String> {
        if let Some((why, since)) = &w.broken {
            if since.elapsed() < REOPEN_BACKOFF {
                return Some(why.clone());
            }
            if self.start_new_file(w).is_err() {
                return w.broken.as_ref().map(|(why, _)| why.clone());
            }
        }
        if self.flush_failing.load(Ordering::Relaxed) {
            return Some("writing segments failed; ingest resumes once a flush succeeds".into());
        }
        let rows = read(&self.mem).buffered_rows();
        if rows > self.opts.max_buffered_rows {
            return Some(format!("{rows} rows wait for a flush (limit {})", self.opts.max_buffered_rows));
        }
        let bytes = self.wal_bytes.load(Ordering::Relaxed);
        if bytes > self.opts.max_wal_bytes {
            return Some(format!("the WAL holds {bytes} bytes (limit {})", self.opts.max_wal_bytes));
        }
        None
    }

    /// Writes a batch's WAL record: the number to settle it by, or None for
    /// a batch already stored.
    pub(super) fn write_record(&self, batch: Batch) -> StoreResult<Option<u64>> {
        let framed = wal::frame(&wal::encode(&batch));
        if framed.len() > wal::MAX_RECORD {
            return Err(Refused::TooLarge(format!(
                "the batch encodes to {} bytes, over the {} bytes a WAL record may hold",
                framed.len(),
                wal::MAX_RECORD
            ))
            .into());
        }
        let key = batch.id.as_deref().map(recent::key);
        let my = {
            let mut w = lock(&self.wal);
            if let Some(key) = key {
                if w.recent.contains(key) {
                    return Ok(None);
                }
                if w.in_flight.contains(&key) {
                    return Err(Refused::Busy("a batch with this id is being stored right now".into()).into());
                }
                if let Some(since) = batch.maybe_stored_since_ms {
                    let horizon = w.recent.horizon_ms(now_ms());
                    if since <= horizon {
                        return Err(recent::unverifiable(since, horizon).into());
                    }
                }
            }
            if let Some(why) = self.busy(&mut w) {
                return Err(Refused::Busy(why).into());
            }
            // A failed write left a partial record that waits to be cut.
            if w.cutting {
                return Err(Refused::Busy("the WAL is being cut back after a failed write".into()).into());
            }
            if let Err(e) = w.writer.write(&framed) {
                self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                // A partial record must not stay in front of later ones.
                let len = w.len;
                if w.writer.truncate(len).is_err() {
                    // An fsync in flight covers records before this one:
                    // it ends before the file is cut back, and no other starts.
                    w.cutting = true;
                    w = self.wait_for_fsync(w);
                    self.abandon_file(&mut w);
                    w.cutting = false;
                    self.sync_done.notify_all();
                }
                return Err(Refused::Busy(format!("writing the WAL failed: {e}")).into());
            }
            w.len += framed.len() as u64;
            self.wal_bytes.fetch_add(framed.len() as u64, Ordering::Relaxed);
            w.appended += 1;
            let my = w.appended;
            if let Some(key) = key {
                w.in_flight.insert(key);
            }
            w.unsynced.push((my, batch, key));
            my
        };
        Ok(Some(my))
    }

    /// Waits until record `my` is durable (or failed). Group commit: it is
    /// settled, or in the fsync running now, or waiting for the next, which
    /// this thread runs if nobody else does.
    pub(super) fn wait_durable(&self, my: u64) -> StoreResult<()> {
        let mut w = lock(&self.wal);
        loop {
            if let Some(outcome) = w.outcomes.remove(&my) {
                return outcome.map_err(|why| Refused::Busy(why).into());
            }
            if w.syncing || w.cutting {
                w = self.sync_done.wait(w).unwrap_or_else(|e| e.into_inner());
            } else {
                w = self.sync_shared(w);
            }
        }
    }
}
