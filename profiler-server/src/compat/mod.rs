//! Other vendors' protocols, each shaped like `ui::routes()`: Pyroscope's ingest and
//! push, OTLP profiles (HTTP and gRPC), Grafana's querier. They share the Connect
//! codec (`connect`) and nothing else of each other.

pub mod connect;
pub mod grafana;
pub mod otlp;
pub mod pyroscope;

use axum::Router;

use crate::http::AppState;

pub fn routes(state: AppState) -> Router<AppState> {
    pyroscope::routes(state.clone())
        .merge(otlp::routes(state.clone()))
        .merge(grafana::routes(state))
}
