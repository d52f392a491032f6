//! The dictionaries in memory: stacks with their frame names shared, series,
//! and when each was last seen.

use super::*;

pub(super) fn encode_frames(frames: &[Arc<str>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

impl FrameNames {
    /// The shared copy of `name`; a new name is shared as `owned` makes it.
    pub(super) fn name(&mut self, name: &str, owned: impl FnOnce() -> Arc<str>) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        let shared = owned();
        self.names.insert(shared.clone());
        shared
    }

    /// `frames` with every name replaced by the shared one; a new name is
    /// shared as the batch brought it.
    pub(super) fn share(&mut self, frames: &[Arc<str>]) -> Frames {
        frames.iter().map(|f| self.name(f, || f.clone())).collect()
    }

    /// Frames as the catalog stores them, decoded onto the shared names.
    pub(super) fn decode(&mut self, mut b: &[u8]) -> Option<Frames> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
            let name = std::str::from_utf8(b.get(4..4 + n)?).ok()?;
            out.push(self.name(name, || Arc::from(name)));
            b = &b[4 + n..];
        }
        Some(out.into())
    }

    /// Drops the names no stack holds any more, once as many stacks were
    /// forgotten as are left: a scan of the names per that many stacks.
    pub(super) fn forgot(&mut self, stacks: usize, left: usize) {
        self.forgotten += stacks;
        if stacks > 0 && self.forgotten >= left {
            // A name only the set holds belongs to no stack. One a query or
            // an export still holds stays until a later pass.
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.forgotten = 0;
        }
    }
}

impl Dict {
    pub(super) fn saw(&mut self, rows: &[Row]) {
        // A batch's rows mostly share one series and window: its entry is
        // looked up once per run, not once per row.
        let mut last_series = None;
        for row in rows {
            let s = self.stack_seen.entry(row.stack_id).or_insert(row.ts_ms);
            *s = (*s).max(row.ts_ms);
            if last_series != Some((row.series_id, row.ts_ms)) {
                last_series = Some((row.series_id, row.ts_ms));
                let s = self.series_seen.entry(row.series_id).or_insert(row.ts_ms);
                *s = (*s).max(row.ts_ms);
            }
        }
    }

    /// Drops entries whose latest row is older than `cutoff_ms`; returns
    /// their ids.
    pub(super) fn forget_before(&mut self, cutoff_ms: i64) -> (Vec<u64>, Vec<u64>) {
        let old = |seen: &IdMap<i64>| -> Vec<u64> {
            seen.iter().filter(|(_, &at)| at < cutoff_ms).map(|(&id, _)| id).collect()
        };
        let (stacks, series) = (old(&self.stack_seen), old(&self.series_seen));
        for id in &stacks {
            self.stacks.remove(id);
            self.stack_seen.remove(id);
        }
        self.names.forgot(stacks.len(), self.stacks.len());
        for id in &series {
            if let Some(labels) = self.series.remove(id) {
                let service = labels.get("service").map_or("", String::as_str);
                if let Some(ids) = self.by_service.get_mut(service) {
                    ids.remove(id);
                    if ids.is_empty() {
                        self.by_service.remove(service);
                    }
                }
            }
            self.series_seen.remove(id);
        }
        (stacks, series)
    }

    pub(super) fn add_series(&mut self, id: u64, labels: Arc<Labels>, persisted: bool) {
        if self.series.contains_key(&id) {
            return;
        }
        let service = labels.get("service").cloned().unwrap_or_default();
        self.by_service.entry(service).or_default().insert(id);
        self.series.insert(id, labels);
        if !persisted {
            self.new_series.push(id);
        }
    }
}
