//! Frame names interned across queries, so trees, diffs and top tables hash
//! and compare `u32`s instead of strings.
//!
//! A stack id is the content hash of its frames, so the names of a stack id
//! never change: once interned, a stack is never read from the store's
//! dictionary again, and no ingest can make an entry stale. The cache is
//! bounded by dropping it whole: a [`Table`] is append-only (ids handed out
//! stay valid while a query holds it), and when one grows past its limits the
//! next query starts a fresh one.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use rustc_hash::FxHashMap;

use crate::store::{Store, StoreResult};

pub type NameId = u32;

/// Stacks a table interns before the next query starts a fresh one.
const MAX_STACKS: usize = 500_000;
/// Bytes of distinct frame names a table holds before the same.
const MAX_NAME_BYTES: usize = 128 << 20;

/// The server's interned frame names; see the module documentation.
#[derive(Default)]
pub struct Names {
    current: RwLock<Arc<Table>>,
}

impl Names {
    /// The table queries intern into now; it stays usable (and its ids
    /// valid) for as long as the caller holds it.
    pub fn table(&self) -> Arc<Table> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        if !current.is_full() {
            return current;
        }
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        if slot.is_full() {
            tracing::info!("interned frame names reached their limit; starting afresh");
            *slot = Arc::default();
        }
        slot.clone()
    }

    /// Prometheus gauges of the current table's size.
    pub fn render_metrics(&self) -> String {
        let table = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        let i = table.read();
        format!(
            "# HELP profiler_interned_stacks Stacks whose frame names queries hold interned (the table starts afresh past {MAX_STACKS}).\n\
             # TYPE profiler_interned_stacks gauge\nprofiler_interned_stacks {}\n\
             # HELP profiler_interned_name_bytes Bytes of distinct frame names interned for queries (the table starts afresh past {MAX_NAME_BYTES}).\n\
             # TYPE profiler_interned_name_bytes gauge\nprofiler_interned_name_bytes {}\n",
            i.stacks.len(),
            i.name_bytes
        )
    }
}

/// One generation of interned names and stacks.
#[derive(Default)]
pub struct Table {
    inner: RwLock<Interned>,
}

#[derive(Default)]
pub struct Interned {
    names: Vec<Arc<str>>,
    ids: FxHashMap<Arc<str>, NameId>,
    stacks: FxHashMap<u64, Box<[NameId]>>,
    name_bytes: usize,
}

impl Table {
    fn is_full(&self) -> bool {
        let i = self.read();
        i.stacks.len() > MAX_STACKS || i.name_bytes > MAX_NAME_BYTES
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Interned> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Interns the stacks of `ids` not seen before, reading their frames
    /// from `store`; ids the store does not know are logged and left out.
    pub fn intern_stacks(&self, store: &dyn Store, ids: impl IntoIterator<Item = u64>) -> StoreResult<()> {
        let missing: Vec<u64> = {
            let i = self.read();
            ids.into_iter().filter(|id| !i.stacks.contains_key(id)).collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        // Read the store's dictionary before locking, so concurrent queries
        // keep reading this table meanwhile.
        let mut frames = Vec::with_capacity(missing.len());
        for id in missing {
            match store.stack(id)? {
                Some(stack) => frames.push((id, stack)),
                None => tracing::warn!(stack = id, "stack id missing from dictionary"),
            }
        }
        let mut i = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (id, frames) in frames {
            if i.stacks.contains_key(&id) {
                continue;
            }
            let interned = frames.iter().map(|f| i.intern_shared(f)).collect();
            i.stacks.insert(id, interned);
        }
        Ok(())
    }

    /// The id of `name`, interning it if new.
    pub fn intern_name(&self, name: &str) -> NameId {
        if let Some(&id) = self.read().ids.get(name) {
            return id;
        }
        self.inner.write().unwrap_or_else(|e| e.into_inner()).intern(name)
    }
}

impl Interned {
    fn intern(&mut self, name: &str) -> NameId {
        match self.ids.get(name) {
            Some(&id) => id,
            None => self.insert(Arc::from(name)),
        }
    }

    /// Like [`Self::intern`], holding the store's own copy of a new name.
    fn intern_shared(&mut self, name: &Arc<str>) -> NameId {
        match self.ids.get(&**name) {
            Some(&id) => id,
            None => self.insert(name.clone()),
        }
    }

    fn insert(&mut self, name: Arc<str>) -> NameId {
        let id = NameId::try_from(self.names.len()).expect("fewer than 2^32 names per table");
        self.name_bytes += name.len();
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    /// Root-first name ids of an interned stack.
    pub fn stack(&self, id: u64) -> Option<&[NameId]> {
        self.stacks.get(&id).map(|s| &**s)
    }

    pub fn name(&self, id: NameId) -> &str {
        &self.names[id as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{stack_id, Batch, EmbeddedStore, Frames, Row, StoreOptions};

    #[test]
    fn stacks_share_name_ids_and_unknown_ids_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let a: Frames = ["main", "run", "spin"].map(Arc::from).into();
        let b: Frames = ["main", "spin"].map(Arc::from).into();
        let (ia, ib) = (stack_id(&a), stack_id(&b));
        store
            .append(Batch {
                service: "s".into(),
                kind: "on-cpu".into(),
                stacks: vec![(ia, a), (ib, b)],
                rows: vec![Row { ts_ms: 0, series_id: 1, stack_id: ia, value: 1 }],
                ..Batch::default()
            })
            .unwrap();
        let names = Names::default();
        let table = names.table();
        table.intern_stacks(&store, [ia, ib, 42]).unwrap();
        let i = table.read();
        let (sa, sb) = (i.stack(ia).unwrap(), i.stack(ib).unwrap());
        assert_eq!(sa.len(), 3);
        assert_eq!((sa[0], sa[2]), (sb[0], sb[1]));
        assert_eq!(i.name(sa[1]), "run");
        assert!(i.stack(42).is_none());
    }

    #[test]
    fn a_full_table_is_replaced_but_stays_valid_for_its_holder() {
        let names = Names::default();
        let old = names.table();
        let id = old.intern_name("kept");
        old.inner.write().unwrap().name_bytes = MAX_NAME_BYTES + 1;
        let fresh = names.table();
        assert!(!Arc::ptr_eq(&old, &fresh));
        assert_eq!(old.read().name(id), "kept");
        assert!(fresh.read().ids.is_empty());
    }
}
