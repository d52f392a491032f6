//! Assembles every module's routes and the layers all of them get: same-origin
//! checks, request metrics, compression, tracing. Nothing imports this module but
//! `lib`.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tower_http::compression::predicate::{NotForContentType, Predicate};
use tower_http::compression::{CompressionLayer, DefaultPredicate};
use tower_http::trace::TraceLayer;

use crate::http::{auth, ApiError, AppState};

pub fn router(state: AppState) -> Router {
    crate::native::routes(state.clone())
        .merge(crate::compat::routes(state.clone()))
        .merge(crate::ui::routes())
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such route")
        })
        .layer(middleware::from_fn_with_state(state.clone(), auth::same_origin))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .layer(CompressionLayer::new().compress_when(
            DefaultPredicate::new().and(NotForContentType::const_new("application/octet-stream")),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .record_request(&route, resp.status().as_u16(), start.elapsed());
    resp
}

