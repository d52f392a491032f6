//! Small state files in the data directory (schedules, deploy events), kept
//! as JSON: read whole at start, replaced whole on every change through a
//! temporary file that is synced before it takes the real name.

use std::path::Path;

use anyhow::Context;
use serde::{de::DeserializeOwned, Serialize};

/// The file's content, or the default when there is no file yet.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> anyhow::Result<T> {
    match std::fs::read(path) {
        Ok(raw) => serde_json::from_slice(&raw).with_context(|| format!("reading {}", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn save<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
