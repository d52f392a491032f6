//! Memory budget of ingest: every request holds a grant for the memory its
//! body, decompressed profile, decoded profile and batch may take, so
//! concurrent uploads cannot add up past a fixed bound. A request that cannot
//! get its grant in time is answered 503 with `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits are KiB so a `u32`-sized semaphore covers terabytes.
const UNIT: usize = 1024;

pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_units: usize,
    wait: Duration,
}

#[derive(Debug)]
pub struct OverBudget {
    pub wanted: usize,
}

/// Memory held by one request; released on drop.
pub struct Grant {
    budget: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    wait: Duration,
    total_units: usize,
}

fn units(bytes: usize) -> usize {
    bytes.div_ceil(UNIT).max(1)
}

impl MemoryBudget {
    pub fn new(bytes: usize, wait: Duration) -> Self {
        let total_units = units(bytes).min(Semaphore::MAX_PERMITS);
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total_units)),
            total_units,
            wait,
        }
    }

    pub async fn reserve(&self, bytes: usize) -> Result<Grant, OverBudget> {
        let mut grant = Grant {
            budget: self.permits.clone(),
            permit: None,
            wait: self.wait,
            total_units: self.total_units,
        };
        grant.add(bytes).await?;
        Ok(grant)
    }

    /// Bytes not granted right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits() * UNIT
    }
}

impl Grant {
    async fn add(&mut self, bytes: usize) -> Result<(), OverBudget> {
        let n = units(bytes);
        let held = self.permit.as_ref().map_or(0, |p| p.num_permits());
        if held + n > self.total_units {
            return Err(OverBudget { wanted: bytes });
        }
        let more =
            tokio::time::timeout(self.wait, self.budget.clone().acquire_many_owned(n as u32))
                .await
                .map_err(|_| OverBudget { wanted: bytes })?
                .expect("the budget semaphore is never closed");
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        Ok(())
    }

    /// Grows the grant to `bytes`, waiting for memory from other requests;
    /// for blocking threads (decoding runs there).
    pub fn grow_to_blocking(&mut self, bytes: usize) -> Result<(), OverBudget> {
        let held = self.permit.as_ref().map_or(0, |p| p.num_permits());
        let want = units(bytes);
        if want <= held {
            return Ok(());
        }
        tokio::runtime::Handle::current().block_on(self.add((want - held) * UNIT))
    }

    /// Gives back what is held beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = units(bytes);
        if let Some(p) = &mut self.permit {
            if p.num_permits() > keep {
                drop(p.split(p.num_permits() - keep));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grants_add_up_to_the_budget_and_are_returned() {
        let budget = MemoryBudget::new(10 << 20, Duration::from_millis(50));
        let mut a = budget.reserve(6 << 20).await.unwrap();
        assert!(
            budget.reserve(6 << 20).await.is_err(),
            "over the budget while a holds 6 MiB"
        );
        a.shrink_to(1 << 20);
        let b = budget.reserve(6 << 20).await.unwrap();
        assert_eq!(budget.available(), 3 << 20);
        drop((a, b));
        assert_eq!(budget.available(), 10 << 20);
        assert!(
            budget.reserve(11 << 20).await.is_err(),
            "never more than the whole budget"
        );
    }
}
