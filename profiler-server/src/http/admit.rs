//! Admission: what a request may take before it is worked on. Bodies reserve their
//! size from the ingest memory budget and grow the grant to what decoding them costs;
//! work runs on the blocking pool; queries take one of the query slots and a deadline.

use std::borrow::Cow;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::Router;
use profiler_pprof::Profile;

use crate::budget::{Grant, OverBudget};
use crate::config::Limits;
use crate::store::Cancel;

use super::{auth, ApiError, ApiResult, AppState};

/// The layers of every ingest route: the ingest token, and bodies up to the limit.
pub fn ingest_layers(routes: Router<AppState>, state: &AppState) -> Router<AppState> {
    routes
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::ingest))
        .layer(axum::extract::DefaultBodyLimit::max(state.config.limits.max_body_bytes))
}

/// Runs `f` on the blocking pool: store, file and CPU work never runs on the
/// async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

pub fn body_bytes(r: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Bytes> {
    r.map_err(|e| ApiError::new(e.status(), format!("reading request body: {}", e.body_text())))
}

/// Reserves the memory to read a request's body: its declared length, or
/// the largest accepted body if it declares none. A body in an encoding no
/// route reads is refused first.
pub async fn admit(s: &AppState, headers: &HeaderMap) -> ApiResult<Grant> {
    check_content_encoding(headers)?;
    let max = s.config.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map_or(max, |n| n.min(max));
    s.budget.reserve(declared).await.map_err(over_budget)
}

pub fn over_budget(e: OverBudget) -> ApiError {
    ApiError::busy(
        format!("ingest is using all of its memory budget (this request needs {} KiB more); retry later", e.wanted >> 10),
        2,
    )
}

/// The one Content-Encoding policy of every route with a body: absent,
/// `identity` or `gzip`, anything else 415. What the body is decides how it
/// is read: gzip's magic bytes gunzip it, within the limit, whatever the
/// header says (our agent sends gzip as `identity`, as do some SDKs).
pub fn check_content_encoding(headers: &HeaderMap) -> ApiResult<()> {
    match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None | Some(Ok("identity" | "gzip")) => Ok(()),
        Some(other) => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content encoding {:?}: send gzip or identity", other.unwrap_or("(not text)")),
        )),
    }
}

/// Gunzips within the limit, holding the memory it takes in `grant`.
pub fn decompress<'a>(grant: &mut Grant, body: &'a [u8], limits: &Limits) -> ApiResult<Cow<'a, [u8]>> {
    grant
        .grow_to_blocking(body.len() + limits.max_decompressed_bytes)
        .map_err(over_budget)?;
    let raw = profiler_pprof::gunzip(body, limits.max_decompressed_bytes)?;
    grant.shrink_to(body.len() + raw.len());
    Ok(raw)
}

/// Decodes a pprof after checking, on the wire, what decoding would
/// allocate; the grant grows by that (twice: the batch built from it).
pub fn decode_pprof(grant: &mut Grant, body_len: usize, raw: &[u8], limits: &Limits) -> ApiResult<Profile> {
    let cost = profiler_pprof::check_cost(raw, &limits.decode())?;
    grant
        .grow_to_blocking(body_len + raw.len() + 2 * cost.bytes)
        .map_err(over_budget)?;
    Ok(profiler_pprof::decode(raw)?)
}

/// Runs a query's store and CPU work on a blocking thread within the query
/// limits: at most `max_concurrent_queries` at once (503 if none frees up
/// soon), `query_timeout_secs` each (503), and its scan is cancelled once
/// nobody waits for it: on timeout, or when the client disconnects (axum
/// drops this future, and with it the guard).
pub async fn run_query<T: Send + 'static>(
    s: AppState,
    cancel: Cancel,
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    struct CancelOnDrop(Cancel);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.cancel();
        }
    }
    let _guard = CancelOnDrop(cancel);
    let permit = tokio::time::timeout(QUERY_QUEUE_WAIT, s.queries.clone().acquire_owned())
        .await
        .map_err(|_| ApiError::busy("too many queries are running; retry shortly", 1))?
        .expect("the query semaphore is never closed");
    let limit = Duration::from_secs(s.config.limits.query_timeout_secs);
    let work = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    });
    match tokio::time::timeout(limit, work).await {
        Ok(joined) => joined.map_err(ApiError::internal)?,
        Err(_) => Err(ApiError::busy(
            format!("the query ran over {} s; narrow the range or add a filter", limit.as_secs()),
            5,
        )),
    }
}

/// How long a query waits for one of the `max_concurrent_queries` slots.
const QUERY_QUEUE_WAIT: Duration = Duration::from_secs(5);

