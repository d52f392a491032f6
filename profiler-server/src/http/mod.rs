//! The edge every protocol shares: the state handlers see, one error type, auth,
//! one parser per query parameter, admission (memory budget, blocking pool, query
//! slots) and storing a request's batches. Nothing here knows a route: `native` and
//! `compat` build theirs on it, and `router` assembles them. Below this module nothing
//! uses axum.

pub mod admit;
pub mod auth;
pub mod batches;
pub mod error;
pub mod params;
pub mod state;

pub use admit::{admit, blocking, body_bytes, check_content_encoding, decode_pprof, decompress, ingest_layers, over_budget, run_query};
pub use batches::{store_batch, store_batches, Idempotency, IngestSummary};
pub use error::{ApiError, ApiResult};
pub use params::{client_time_ms, Params};
pub use state::AppState;
