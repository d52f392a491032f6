//! What every handler sees.

use std::sync::Arc;

use crate::budget::MemoryBudget;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::query;
use crate::store::Store;

use super::ApiResult;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// Time per request (see `store::requests`).
    pub requests: Arc<crate::store::RequestTable>,
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
    /// The services the store knows, read off the async threads. A store that
    /// cannot say fails the request: an empty list would call every service
    /// unknown.
    pub async fn known_services(&self) -> ApiResult<Vec<String>> {
        let store = self.store.clone();
        super::blocking(move || Ok(store.services()?)).await
    }
}
