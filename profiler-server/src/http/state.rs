//! What every handler sees.

use std::sync::Arc;

use crate::budget::MemoryBudget;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::query;
use crate::store::Store;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// Frame names interned for the query routes.
    pub names: Arc<query::Names>,
    pub events: Arc<crate::events::Events>,
    /// Slots of `max_concurrent_queries`.
    pub queries: Arc<tokio::sync::Semaphore>,
    pub budget: Arc<MemoryBudget>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub schedules: Arc<crate::schedule::Schedules>,
}


impl AppState {
    /// The services the store knows, read off the async threads.
    pub async fn known_services(&self) -> Vec<String> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.services()).await.unwrap_or_default()
    }
}
