//! Our own API, `/api/v1`: ingest, queries, deep-profile schedules and runs, alert
//! rules. Each module is shaped like `ui::routes()`; none imports another.

pub mod alerts;
pub mod ingest;
pub mod query;
pub mod schedules;

use axum::Router;

use crate::http::AppState;

pub fn routes(state: AppState) -> Router<AppState> {
    ingest::routes(state.clone())
        .merge(query::routes(state.clone()))
        .merge(schedules::routes(state.clone()))
        .merge(alerts::routes(state))
}
