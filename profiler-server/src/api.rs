//! API stage: the axum router, request parsing, auth and error mapping.
//!
//! Every handler does its store and CPU work on `spawn_blocking`; bad input
//! becomes a 4xx `{"error": "..."}` and never takes the server down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::compression::predicate::{NotForContentType, Predicate};
use tower_http::compression::{CompressionLayer, DefaultPredicate};
use tower_http::trace::TraceLayer;

use std::borrow::Cow;

use profiler_pprof::Profile;

use crate::auth;
use crate::budget::{Grant, MemoryBudget, OverBudget};
use crate::config::{Config, Limits};
use crate::ingest::{self, BatchBuilder, Rejected, Target};
use crate::metrics::Metrics;
use crate::query::{self, Tree};
use crate::render;
use crate::store::{Appended, Batch, Cancel, Cancelled, GroupBy, Labels, Matcher, Refused, Selector, Store};

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

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Seconds a client should wait before retrying (503, 429).
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn status(&self) -> StatusCode {
        self.status
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }
    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn busy(message: impl Into<String>, retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after_secs),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }
    fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see server log")
    }
    /// A scan error: a cancelled scan has nobody to answer; anything else is
    /// internal.
    fn scan(e: anyhow::Error) -> ApiError {
        if e.downcast_ref::<Cancelled>().is_some() {
            return ApiError::busy("query cancelled", 1);
        }
        ApiError::internal(format!("{e:#}"))
    }
    /// A store error: refusals keep their meaning (busy: 503, too large:
    /// 413), anything else is internal.
    fn store(e: anyhow::Error) -> ApiError {
        match e.downcast_ref::<Refused>() {
            Some(Refused::Busy(why)) => {
                tracing::warn!(reason = %why, "ingest refused: store busy");
                ApiError::busy(format!("the server cannot store profiles right now: {why}"), 5)
            }
            Some(Refused::TooLarge(why)) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, why.clone()),
            Some(Refused::Unverifiable(why)) => ApiError::new(StatusCode::GONE, why.clone()),
            None => ApiError::internal(format!("{e:#}")),
        }
    }
}

impl From<Rejected> for ApiError {
    fn from(r: Rejected) -> ApiError {
        let status = match r {
            Rejected::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejected::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Rejected::UnknownStacks(_) => StatusCode::CONFLICT,
        };
        ApiError::new(status, r.to_string())
    }
}

impl From<profiler_pprof::Error> for ApiError {
    fn from(e: profiler_pprof::Error) -> ApiError {
        match e {
            profiler_pprof::Error::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
            }
            e => ApiError::bad(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: AppState) -> Router {
    let ingest = Router::new()
        .route("/api/v1/ingest", post(ingest_native))
        .route("/ingest", post(ingest_pyroscope))
        .route(crate::push::ROUTE, post(crate::push::push))
        .route(crate::otlp::HTTP_ROUTE, post(crate::otlp::http_export))
        .route_service(crate::otlp::GRPC_ROUTE, crate::otlp::grpc(state.clone()))
        .route("/v1experimental/profiles", post(crate::otlp::other_version))
        .route("/v1/profiles", post(crate::otlp::other_version))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::ingest))
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.limits.max_body_bytes,
        ));
    let queries = Router::new()
        .route("/api/v1/services", get(services))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/labels", get(labels))
        .route("/api/v1/label_values", get(label_values))
        .route("/api/v1/timeline", get(timeline))
        .route("/api/v1/flamegraph", get(flamegraph))
        .route("/api/v1/folded", get(folded))
        .route("/api/v1/pprof", get(pprof))
        .route("/api/v1/svg", get(svg))
        .route("/api/v1/diff", get(diff))
        .route("/api/v1/top", get(top))
        .route("/api/v1/changes", get(changes))
        .route("/api/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::read))
        .route("/healthz", get(|| async { "ok\n" }));
    ingest
        .merge(queries)
        .merge(crate::ui::routes())
        .merge(crate::schedule_api::routes(state.clone()))
        .merge(crate::alert_api::routes(state.clone()))
        .merge(crate::grafana::routes(state.clone()))
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

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

/// Decoded query string; repeated keys are kept in order.
struct Params(Vec<(String, String)>);

impl Params {
    fn new(q: Option<String>) -> Params {
        Params(
            form_urlencoded::parse(q.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
    fn req(&self, k: &str) -> ApiResult<&str> {
        self.get(k)
            .ok_or_else(|| ApiError::bad(format!("missing query parameter `{k}`")))
    }
    fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> ApiResult<T> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::bad(format!("`{k}`: {v:?} is not a valid number"))),
        }
    }
    fn flag(&self, k: &str, default: bool) -> ApiResult<bool> {
        match self.get(k) {
            None => Ok(default),
            Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(v) => Err(ApiError::bad(format!("`{k}`: {v:?} is not true/false"))),
        }
    }
    /// Unix milliseconds, or `now`, `now-<n><s|m|h|d>`.
    fn time(&self, k: &str, now: i64, default: i64) -> ApiResult<i64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => parse_time(v, now).ok_or_else(|| {
                ApiError::bad(format!(
                    "`{k}`: {v:?} is neither unix milliseconds (1970 to 9999) nor now[-<n>(s|m|h|d)]"
                ))
            }),
        }
    }
}

/// The latest time a client may name, in unix milliseconds: the end of year 9999.
/// Times from clients outside `0..=MAX_CLIENT_TIME_MS` are refused, so the arithmetic
/// done on them (range lengths, defaults an hour back, steps, window alignment) cannot
/// overflow, whatever a request says.
pub(crate) const MAX_CLIENT_TIME_MS: i64 = 253_402_300_799_999;

/// `ms` when it is a time a client may name (see [`MAX_CLIENT_TIME_MS`]).
pub(crate) fn client_time_ms(ms: i64) -> Option<i64> {
    (0..=MAX_CLIENT_TIME_MS).contains(&ms).then_some(ms)
}

fn parse_time(v: &str, now: i64) -> Option<i64> {
    if let Ok(ms) = v.parse::<i64>() {
        return client_time_ms(ms);
    }
    let rest = v.strip_prefix("now")?;
    if rest.is_empty() {
        return Some(now);
    }
    let rel = rest.strip_prefix('-')?;
    let (n, unit) = rel.split_at(rel.len().checked_sub(1)?);
    let n: i64 = n.parse().ok()?;
    let mult = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    client_time_ms(now.checked_sub(n.checked_mul(mult)?)?)
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Query parameters of the native ingest route; anything else is refused, so
/// a stray parameter (a cache buster such as `_=<timestamp>`) cannot mint a new
/// series per request.
const INGEST_PARAMS: [&str; 8] = [
    "service",
    "kind",
    "from",
    "until",
    "sample_type",
    "label",
    "format",
    "batch_id",
];

/// Ingest labels: `label=name:value`, repeatable.
fn ingest_labels(p: &Params) -> ApiResult<Labels> {
    let mut labels = Labels::new();
    for (k, v) in &p.0 {
        if k == "label" {
            let (n, val) = v
                .split_once(':')
                .ok_or_else(|| ApiError::bad(format!("label {v:?} is not name:value")))?;
            labels.insert(n.to_owned(), val.to_owned());
        } else if !INGEST_PARAMS.contains(&k.as_str()) {
            return Err(ApiError::bad(format!(
                "unknown query parameter `{}`; labels are passed as `label=name:value`",
                ingest::truncate(k, 64)
            )));
        }
    }
    Ok(labels)
}

/// What makes a request's batches idempotent: the client's key, and when an
/// earlier attempt that got no answer may have stored them.
pub(crate) struct Idempotency {
    id: Option<String>,
    maybe_stored_since_ms: Option<i64>,
}

impl From<Option<String>> for Idempotency {
    fn from(id: Option<String>) -> Self {
        Idempotency { id, maybe_stored_since_ms: None }
    }
}

impl Idempotency {
    /// `batch_id` in the query or an `Idempotency-Key` header (for clients
    /// that cannot change the URL), and `Profiler-Unanswered-Age-Ms`: how long
    /// ago an attempt of this batch went unanswered. An age, not a time, so
    /// the client's clock does not matter.
    fn of(p: &Params, headers: &HeaderMap) -> ApiResult<Self> {
        let id = batch_id(p, headers)?;
        let maybe_stored_since_ms = match headers.get("profiler-unanswered-age-ms") {
            None => None,
            Some(v) => {
                let age: i64 = v
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .filter(|age| *age >= 0)
                    .ok_or_else(|| ApiError::bad("Profiler-Unanswered-Age-Ms must be milliseconds"))?;
                Some(now_ms().saturating_sub(age))
            }
        };
        Ok(Idempotency { id, maybe_stored_since_ms })
    }

    /// The key of part `i` of a request of several batches.
    fn part(&self, i: usize) -> Idempotency {
        Idempotency {
            id: self.id.as_ref().map(|id| format!("{id}/{i}")),
            maybe_stored_since_ms: self.maybe_stored_since_ms,
        }
    }

    fn apply(self, batch: &mut Batch) {
        batch.id = self.id;
        batch.maybe_stored_since_ms = self.maybe_stored_since_ms;
    }
}

/// The request's idempotency key: `batch_id` in the query or an
/// `Idempotency-Key` header.
fn batch_id(p: &Params, headers: &HeaderMap) -> ApiResult<Option<String>> {
    let header = headers.get("idempotency-key").map(|v| {
        v.to_str()
            .map(str::to_owned)
            .map_err(|_| ApiError::bad("Idempotency-Key is not visible ASCII"))
    });
    let id = match (p.get("batch_id"), header) {
        (Some(q), _) => q.to_owned(),
        (None, Some(h)) => h?,
        (None, None) => return Ok(None),
    };
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad(
            "batch id must be 1..=128 visible ASCII characters",
        ));
    }
    Ok(Some(id))
}

pub(crate) fn align(ts_ms: i64, window: i64) -> i64 {
    ts_ms.div_euclid(window) * window
}

pub(crate) fn body_bytes(r: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Bytes> {
    r.map_err(|e| ApiError::new(e.status(), format!("reading request body: {}", e.body_text())))
}

#[derive(serde::Serialize)]
pub(crate) struct IngestSummary {
    rows: usize,
    stacks: usize,
    series: usize,
    /// A retry of a batch already stored: acknowledged, not counted again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

pub(crate) fn store_batch(
    s: &AppState,
    b: BatchBuilder,
    body_len: usize,
    key: Idempotency,
) -> ApiResult<Json<IngestSummary>> {
    let mut batch = b.finish();
    key.apply(&mut batch);
    store_batches(s, vec![batch], body_len)
}

/// Stores one request's batches; duplicate when there were some and every
/// one of them was stored before.
fn store_batches(s: &AppState, batches: Vec<Batch>, body_len: usize) -> ApiResult<Json<IngestSummary>> {
    let seen: Vec<_> = batches.iter().map(crate::events::Seen::of).collect();
    let sizes: Vec<_> = batches.iter().map(|b| (b.rows.len(), b.stacks.len(), b.series.len())).collect();
    let outcomes = s.store.append_all(batches).map_err(ApiError::store)?;
    let duplicate = !outcomes.is_empty() && outcomes.iter().all(|o| *o == Appended::Duplicate);
    let mut summary = IngestSummary { rows: 0, stacks: 0, series: 0, duplicate };
    for ((outcome, (rows, stacks, series)), versions) in outcomes.into_iter().zip(sizes).zip(seen) {
        summary.rows += rows;
        summary.stacks += stacks;
        summary.series += series;
        if outcome == Appended::Duplicate {
            s.metrics.duplicate_batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        s.metrics.ingested_rows.fetch_add(rows as u64, std::sync::atomic::Ordering::Relaxed);
        s.events.observe(versions);
    }
    if !summary.duplicate {
        s.metrics.ingested_bytes.fetch_add(body_len as u64, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(Json(summary))
}

/// Reserves the memory to read a request's body: its declared length, or
/// the largest accepted body if it declares none.
pub(crate) async fn admit(s: &AppState, headers: &HeaderMap) -> ApiResult<Grant> {
    let max = s.config.limits.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .map_or(max, |n| n.min(max));
    s.budget.reserve(declared).await.map_err(over_budget)
}

pub(crate) fn over_budget(e: OverBudget) -> ApiError {
    ApiError::busy(
        format!("ingest is using all of its memory budget (this request needs {} KiB more); retry later", e.wanted >> 10),
        2,
    )
}

/// Gunzips within the limit, holding the memory it takes in `grant`.
pub(crate) fn decompress<'a>(grant: &mut Grant, body: &'a [u8], limits: &Limits) -> ApiResult<Cow<'a, [u8]>> {
    grant
        .grow_to_blocking(body.len() + limits.max_decompressed_bytes)
        .map_err(over_budget)?;
    let raw = profiler_pprof::gunzip(body, limits.max_decompressed_bytes)?;
    grant.shrink_to(body.len() + raw.len());
    Ok(raw)
}

/// Decodes a pprof after checking, on the wire, what decoding would
/// allocate; the grant grows by that (twice: the batch built from it).
pub(crate) fn decode_pprof(grant: &mut Grant, body_len: usize, raw: &[u8], limits: &Limits) -> ApiResult<Profile> {
    let cost = profiler_pprof::check_cost(raw, &limits.decode())?;
    grant
        .grow_to_blocking(body_len + raw.len() + 2 * cost.bytes)
        .map_err(over_budget)?;
    Ok(profiler_pprof::decode(raw)?)
}

async fn ingest_native(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
    req: Request,
) -> ApiResult<Json<IngestSummary>> {
    let p = Params::new(q);
    let id = Idempotency::of(&p, req.headers())?;
    let mut grant = admit(&s, req.headers()).await?;
    let body = body_bytes(Bytes::from_request(req, &s).await)?;
    grant.shrink_to(body.len());
    blocking(move || {
        if p.get("format") == Some("bundle") {
            return ingest_bundle(&s, &p, &mut grant, &body, id);
        }
        let service = p.req("service")?.to_owned();
        let labels = ingest_labels(&p)?;
        let limits = &s.config.limits;
        let window = s.config.storage.window_ms;
        let from = p.time("from", now_ms(), now_ms())?;
        let target = |kind: String| Target {
            service: service.clone(),
            kind,
            ts_ms: align(from, window),
            labels: labels.clone(),
        };
        if p.get("format") == Some("folded") {
            let kind = p.req("kind")?.to_owned();
            let text = decompress(&mut grant, &body, limits)?;
            grant
                .grow_to_blocking(body.len() + 3 * text.len())
                .map_err(over_budget)?;
            let mut b = BatchBuilder::new(limits, target(kind))?;
            ingest::folded(&text, 1, &mut b)?;
            return store_batch(&s, b, body.len(), id);
        }
        if p.get("format") == Some("stacks") {
            let kind = p.req("kind")?.to_owned();
            let raw = decompress(&mut grant, &body, limits)?;
            // Each entry is at least ten bytes on the wire and about sixty
            // once summed into the batch; frame names are bounded by
            // `max_batch_bytes` on their own.
            grant
                .grow_to_blocking(body.len() + 7 * raw.len())
                .map_err(over_budget)?;
            let mut b = BatchBuilder::new(limits, target(kind))?;
            ingest::stacks(&raw, &*s.store, &mut b)?;
            return store_batch(&s, b, body.len(), id);
        }
        if p.get("format").is_some_and(|f| f != "pprof") {
            return Err(ApiError::bad("`format` must be pprof (default), folded, stacks or bundle"));
        }
        let raw = decompress(&mut grant, &body, limits)?;
        let profile = decode_pprof(&mut grant, body.len(), &raw, limits)?;
        drop(raw);
        let idx = ingest::pick_sample_type(&profile, p.get("sample_type"), p.get("kind"))?;
        let kind = match p.get("kind") {
            Some(k) => k.to_owned(),
            None => ingest::sample_type_name(&profile, idx)?,
        };
        let mut t = target(kind);
        if p.get("from").is_none() && profile.time_nanos > 0 {
            t.ts_ms = align(profile.time_nanos / 1_000_000, window);
        }
        let mut b = BatchBuilder::new(limits, t)?;
        ingest::pprof(&profile, idx, &mut b)?;
        store_batch(&s, b, body.len(), id)
    })
    .await
}

/// `format=bundle`: every (service, labels, kind) of one agent window in one
/// request, stored with one WAL fsync; the query's labels are common to all
/// parts. Part `i` is stored under batch id `<batch_id>/<i>`, so a retry of
/// a bundle that was partly stored counts each part once.
fn ingest_bundle(s: &AppState, p: &Params, grant: &mut Grant, body: &[u8], key: Idempotency) -> ApiResult<Json<IngestSummary>> {
    if p.get("service").is_some() || p.get("kind").is_some() {
        return Err(ApiError::bad("a bundle names services and kinds in its parts, not in the query"));
    }
    let labels = ingest_labels(p)?;
    let limits = &s.config.limits;
    let from = p.time("from", now_ms(), now_ms())?;
    let raw = decompress(grant, body, limits)?;
    // As for one stacks window, plus the batch each part becomes.
    let parts = profiler_pprof::stacks::BundleReader::new(&raw).map_or(0, Iterator::count);
    grant
        .grow_to_blocking(body.len() + 7 * raw.len() + parts * 1024)
        .map_err(over_budget)?;
    let ts_ms = align(from, s.config.storage.window_ms);
    let mut batches = ingest::bundle(&raw, limits, ts_ms, &labels, &*s.store)?;
    for (i, batch) in batches.iter_mut().enumerate() {
        key.part(i).apply(batch);
    }
    store_batches(s, batches, body.len())
}

/// Pyroscope's `/ingest`: `name=app.cpu{k=v}`, `from`/`until` in unix
/// seconds, `format=folded|pprof`, `sampleRate`, `units`; the body is raw
/// (folded text or pprof) or multipart with a `profile` part.
async fn ingest_pyroscope(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
    req: Request,
) -> ApiResult<Json<IngestSummary>> {
    let p = Params::new(q);
    let id = Idempotency::of(&p, req.headers())?;
    let mut grant = admit(&s, req.headers()).await?;
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let body = if is_multipart {
        let mut mp = axum::extract::Multipart::from_request(req, &s)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        let mut profile = None;
        while let Some(field) = mp.next_field().await.map_err(|e| ApiError::new(e.status(), e.body_text()))? {
            if field.name() == Some("profile") {
                profile = Some(field.bytes().await.map_err(|e| ApiError::new(e.status(), e.body_text()))?);
            }
        }
        profile.ok_or_else(|| ApiError::bad("multipart body has no `profile` part"))?
    } else {
        body_bytes(Bytes::from_request(req, &s).await)?
    };
    blocking(move || {
        let (service, kind, labels) = ingest::pyroscope_name(p.req("name")?)?;
        let limits = &s.config.limits;
        let from_s: i64 = p.num("from", now_ms() / 1000)?;
        if client_time_ms(from_s.saturating_mul(1000)).is_none() {
            return Err(ApiError::bad("`from` must be unix seconds from 1970 to 9999"));
        }
        let target = Target {
            service,
            kind: kind.clone(),
            ts_ms: align(from_s.saturating_mul(1000), s.config.storage.window_ms),
            labels,
        };
        let mut b = BatchBuilder::new(limits, target)?;
        let format = if is_multipart {
            "pprof"
        } else {
            p.get("format").unwrap_or("folded")
        };
        match format {
            "folded" | "lines" => {
                let rate: i64 = p.num("sampleRate", 100)?;
                if rate <= 0 {
                    return Err(ApiError::bad("`sampleRate` must be positive"));
                }
                let samples = p.get("units").is_none_or(|u| u == "samples");
                let scale = if samples && ingest::is_time_kind(&kind) {
                    1_000_000_000 / rate
                } else {
                    1
                };
                let text = decompress(&mut grant, &body, limits)?;
                grant
                    .grow_to_blocking(body.len() + 3 * text.len())
                    .map_err(over_budget)?;
                if format == "lines" {
                    ingest::lines(&text, scale, &mut b)?;
                } else {
                    ingest::folded(&text, scale, &mut b)?;
                }
            }
            "pprof" => {
                let raw = decompress(&mut grant, &body, limits)?;
                let profile = decode_pprof(&mut grant, body.len(), &raw, limits)?;
                drop(raw);
                let idx = ingest::pick_sample_type(&profile, p.get("sample_type"), Some(&kind))?;
                ingest::pprof(&profile, idx, &mut b)?;
            }
            other => {
                return Err(ApiError::bad(format!(
                    "unsupported format {other:?}; use folded or pprof"
                )))
            }
        }
        store_batch(&s, b, body.len(), id)
    })
    .await
}

/// The common selection parameters of query routes.
/// `from_key`..`until_key`, by default the last hour, within the range a
/// query may cover.
fn time_range(p: &Params, from_key: &str, until_key: &str, limits: &Limits) -> ApiResult<(i64, i64)> {
    let now = now_ms();
    let until = p.time(until_key, now, now)?;
    let from = p.time(from_key, now, until - 3_600_000)?;
    if from >= until {
        return Err(ApiError::bad(format!(
            "`{from_key}` must be before `{until_key}`"
        )));
    }
    let max_range_ms = (limits.max_query_range_hours as i64).saturating_mul(3_600_000);
    if until.saturating_sub(from) > max_range_ms {
        return Err(ApiError::bad(format!(
            "`{from_key}`..`{until_key}` spans more than the {} hours a query may cover",
            limits.max_query_range_hours
        )));
    }
    Ok((from, until))
}

fn selector(p: &Params, from_key: &str, until_key: &str, limits: &Limits) -> ApiResult<Selector> {
    let service = p.req("service")?.to_owned();
    let (from, until) = time_range(p, from_key, until_key, limits)?;
    let kinds = p.get("kinds").or(p.get("kind")).map(|k| {
        k.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    });
    Ok(Selector {
        service,
        from_ms: from,
        until_ms: until,
        kinds,
        matchers: matchers(p.get("filter").unwrap_or(""))?,
        cancel: Cancel::default(),
    })
}

/// `host=a,pid!=7`: every one must match.
fn matchers(text: &str) -> ApiResult<Vec<Matcher>> {
    let mut out = Vec::new();
    for m in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        out.push(if let Some((k, v)) = m.split_once("!=") {
            Matcher::Ne(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = m.split_once('=') {
            Matcher::Eq(k.trim().to_owned(), v.trim().to_owned())
        } else {
            return Err(ApiError::bad(format!(
                "filter {m:?} is not name=value or name!=value"
            )));
        });
    }
    Ok(out)
}

/// Runs a query's store and CPU work on a blocking thread within the query
/// limits: at most `max_concurrent_queries` at once (503 if none frees up
/// soon), `query_timeout_secs` each (503), and its scan is cancelled once
/// nobody waits for it: on timeout, or when the client disconnects (axum
/// drops this future, and with it the guard).
pub(crate) async fn run_query<T: Send + 'static>(
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

async fn services(State(s): State<AppState>) -> ApiResult<Json<Vec<String>>> {
    blocking(move || Ok(Json(s.store.services()))).await
}

#[derive(serde::Serialize)]
struct ChangesReply {
    service: String,
    from: i64,
    until: i64,
    base_from: i64,
    base_until: i64,
    filter: String,
    base_filter: String,
    #[serde(flatten)]
    changes: query::changes::Changes,
}

/// Functions that changed between a base and a target: the target is
/// `from`..`until` with `filter`; the base is `base_from`..`base_until`
/// (default: the previous period, or the same range when `base_filter`
/// names another label value) with `base_filter` (default: `filter`).
async fn changes(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<ChangesReply>> {
    let p = Params::new(q);
    let target = selector(&p, "from", "until", &s.config.limits)?;
    let len = target.until_ms - target.from_ms;
    let same_range = p.get("base_filter").is_some();
    let (base_from, base_until) = if p.get("base_from").is_some() || p.get("base_until").is_some() {
        time_range(&p, "base_from", "base_until", &s.config.limits)?
    } else if same_range {
        (target.from_ms, target.until_ms)
    } else {
        (target.from_ms - len, target.from_ms)
    };
    let base = Selector {
        from_ms: base_from,
        until_ms: base_until,
        matchers: match p.get("base_filter") {
            Some(f) => matchers(f)?,
            None => target.matchers.clone(),
        },
        ..target.clone()
    };
    let mut opts = query::changes::ChangeOptions::default();
    opts.alpha = p.num("alpha", opts.alpha)?;
    opts.min_share = p.num("min_share", opts.min_share)?;
    opts.min_relative = p.num("min_relative", opts.min_relative)?;
    opts.min_rate = p.num("min_rate", opts.min_rate)?;
    opts.limit = p.num("limit", opts.limit)?;
    if !(0.0..1.0).contains(&opts.alpha) || opts.alpha == 0.0 {
        return Err(ApiError::bad("`alpha` must be within (0, 1)"));
    }
    let window = s.config.storage.window_ms;
    let reply = |sel: &Selector| (sel.from_ms, sel.until_ms, sel.matchers.clone());
    let (t, b) = (reply(&target), reply(&base));
    let cancel = target.cancel.clone();
    run_query(s.clone(), cancel, move || {
        let changes = query::changes::compare_ranges(&*s.store, &s.names, &base, &target, window, &opts)
            .map_err(|e| match e.downcast_ref::<query::changes::TooShort>() {
                Some(short) => ApiError::bad(short.to_string()),
                None => ApiError::scan(e),
            })?;
        let text = |m: &[Matcher]| m.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        Ok(Json(ChangesReply {
            service: target.service.clone(),
            from: t.0,
            until: t.1,
            base_from: b.0,
            base_until: b.1,
            filter: text(&t.2),
            base_filter: text(&b.2),
            changes,
        }))
    })
    .await
}

/// Deploys and alerts with their comparisons, newest first; `service=` narrows.
async fn events(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<Vec<crate::events::Event>>> {
    let p = Params::new(q);
    let service = p.get("service").map(str::to_owned);
    blocking(move || Ok(Json(s.events.events(service.as_deref())))).await
}

/// The fleet overview: all services over `from`..`until`, at most 60 points
/// per sparkline unless `step` says otherwise.
async fn overview(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<query::Fleet>> {
    let p = Params::new(q);
    let (from, until) = time_range(&p, "from", "until", &s.config.limits)?;
    let window = s.config.storage.window_ms;
    // At most 60 points, in whole windows.
    let default_step = (((until - from) / 60 + window - 1) / window).max(1) * window;
    let step: i64 = p.num("step", default_step)?;
    if step <= 0 || (until - from) / step > 1_000 {
        return Err(ApiError::bad("`step` must be positive and give at most 1000 points"));
    }
    let grid = crate::store::Grid { from_ms: from, until_ms: until, step_ms: step };
    let cancel = Cancel::default();
    run_query(s.clone(), cancel.clone(), move || {
        let overview = s.store.overview(grid, &cancel).map_err(ApiError::scan)?;
        Ok(Json(query::fleet(grid, overview)))
    })
    .await
}

async fn labels(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<Vec<String>>> {
    let p = Params::new(q);
    let service = p.req("service")?.to_owned();
    blocking(move || {
        let mut names: Vec<String> = s
            .store
            .series(&service)
            .iter()
            .flat_map(|l| l.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        names.retain(|n| n != "service");
        Ok(Json(names))
    })
    .await
}

async fn label_values(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<String>>> {
    let p = Params::new(q);
    let service = p.req("service")?.to_owned();
    let name = p.req("name")?.to_owned();
    blocking(move || {
        let values: std::collections::BTreeSet<String> = s
            .store
            .series(&service)
            .iter()
            .filter_map(|l| l.get(&name).cloned())
            .collect();
        Ok(Json(values.into_iter().collect()))
    })
    .await
}

async fn timeline(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<query::Timeline>> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let window = s.config.storage.window_ms;
    // Default: about 200 points, in whole windows.
    let default_step = (((sel.until_ms - sel.from_ms) / 200).max(window) / window) * window;
    let step: i64 = p.num("step", default_step)?;
    if step <= 0 || (sel.until_ms - sel.from_ms) / step > 100_000 {
        return Err(ApiError::bad(
            "`step` must be positive and give at most 100000 points",
        ));
    }
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = s
            .store
            .aggregate(&sel, GroupBy::Time { step_ms: step })
            .map_err(ApiError::scan)?;
        Ok(Json(query::timeline(&agg, sel.from_ms, sel.until_ms, step)))
    })
    .await
}

/// `max_nodes` is capped by the server's limit; what is cut shows as
/// `[pruned]` nodes, so totals stay exact.
fn tree_params(p: &Params, limits: &Limits) -> ApiResult<(usize, f64)> {
    let max_nodes: usize = p.num::<usize>("max_nodes", 2048)?.min(limits.max_nodes);
    let min_share: f64 = p.num("min_share", 0.0)?;
    if !(0.0..=1.0).contains(&min_share) {
        return Err(ApiError::bad("`min_share` must be within 0..=1"));
    }
    Ok((max_nodes.max(1), min_share))
}

async fn flamegraph(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<query::FlameNode>> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let (max_nodes, min_share) = tree_params(&p, &s.config.limits)?;
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = s
            .store
            .aggregate(&sel, GroupBy::Stack)
            .map_err(ApiError::scan)?;
        let kind_roots = agg.values().filter(|m| !m.is_empty()).count() > 1;
        let tree = Tree::build(&s.names, &*s.store, &[&agg], kind_roots);
        Ok(Json(tree.to_json(max_nodes, min_share, false)))
    })
    .await
}

async fn folded(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    // Inverse of Pyroscope ingest: nanoseconds back to samples at this rate.
    let rate: i64 = p.num("sample_rate", 0)?;
    let divisor = if rate > 0 { 1_000_000_000 / rate } else { 1 };
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = s
            .store
            .aggregate(&sel, GroupBy::Stack)
            .map_err(ApiError::scan)?;
        let (stacks, cut) = query::heaviest(query::stacks(&*s.store, &agg), s.config.limits.max_stacks);
        let text = render::folded(&stacks, divisor);
        Ok((truncated(cut), [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
    })
    .await
}

async fn pprof(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = s
            .store
            .aggregate(&sel, GroupBy::Stack)
            .map_err(ApiError::scan)?;
        let (stacks, cut) = query::heaviest(query::stacks(&*s.store, &agg), s.config.limits.max_stacks);
        let bytes = render::pprof(&stacks, sel.until_ms - sel.from_ms, sel.until_ms);
        Ok((
            truncated(cut),
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile.pb.gz\"",
                ),
            ],
            bytes,
        )
            .into_response())
    })
    .await
}

async fn svg(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let title = p
        .get("title")
        .map_or_else(|| sel.service.clone(), str::to_owned);
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = s
            .store
            .aggregate(&sel, GroupBy::Stack)
            .map_err(ApiError::scan)?;
        let (stacks, cut) = query::heaviest(query::stacks(&*s.store, &agg), s.config.limits.max_stacks);
        let bytes = render::svg(&stacks, &title).map_err(ApiError::internal)?;
        Ok((truncated(cut), [(header::CONTENT_TYPE, "image/svg+xml")], bytes).into_response())
    })
    .await
}

async fn diff(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<query::FlameNode>> {
    let p = Params::new(q);
    let target = selector(&p, "from", "until", &s.config.limits)?;
    let mut base = selector(&p, "base_from", "base_until", &s.config.limits)?;
    base.cancel = target.cancel.clone();
    if p.get("base_from").is_none() || p.get("base_until").is_none() {
        return Err(ApiError::bad("diff needs `base_from` and `base_until`"));
    }
    let normalize = p.flag("normalize", true)?;
    let (max_nodes, min_share) = tree_params(&p, &s.config.limits)?;
    run_query(s.clone(), target.cancel.clone(), move || {
        let (a, b) = std::thread::scope(|sc| {
            let h = sc.spawn(|| s.store.aggregate(&base, GroupBy::Stack));
            let a = s.store.aggregate(&target, GroupBy::Stack);
            (a, h.join().expect("diff scan panicked"))
        });
        let (a, b) = (
            a.map_err(ApiError::scan)?,
            b.map_err(ApiError::scan)?,
        );
        let kinds: std::collections::HashSet<&String> = a.keys().chain(b.keys()).collect();
        let mut tree = Tree::build(&s.names, &*s.store, &[&a, &b], kinds.len() > 1);
        if normalize {
            tree.normalize_base();
        }
        Ok(Json(tree.to_json(max_nodes, min_share, true)))
    })
    .await
}

async fn top(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<serde_json::Value>> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let limit: usize = p.num::<usize>("limit", 50)?.min(MAX_TOP_LIMIT);
    let by_total = match p.get("by").unwrap_or("self") {
        "self" => false,
        "total" => true,
        other => {
            return Err(ApiError::bad(format!(
                "`by` must be self or total, not {other:?}"
            )))
        }
    };
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = s.store.aggregate(&sel, GroupBy::Stack).map_err(ApiError::scan)?;
        let total: i64 = agg.values().flat_map(|m| m.values()).sum();
        let functions = query::top(&s.names, &*s.store, &agg, by_total, limit);
        Ok(Json(json!({ "by": if by_total { "total" } else { "self" }, "total": total, "functions": functions })))
    })
    .await
}

/// Most rows `/top` returns.
const MAX_TOP_LIMIT: usize = 10_000;

/// The `X-Profiler-Truncated` header of an export that merged its lightest
/// stacks into one `[truncated]` stack, if it did.
fn truncated(cut: usize) -> axum::response::AppendHeaders<Option<(&'static str, String)>> {
    axum::response::AppendHeaders(
        (cut > 0).then(|| ("x-profiler-truncated", format!("{cut} stacks merged into [truncated]"))),
    )
}

async fn metrics(State(s): State<AppState>) -> ApiResult<Response> {
    blocking(move || {
        let text = s
            .metrics
            .render(s.store.disk_bytes(), s.store.buffered_rows(), &s.store.stats())
            + &s.events.render_metrics()
            + &s.names.render_metrics();
        Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times() {
        assert_eq!(parse_time("123", 1000), Some(123));
        assert_eq!(parse_time("now", 1000), Some(1000));
        assert_eq!(parse_time("now-1s", 5000), Some(4000));
        assert_eq!(
            parse_time("now-2h", 10_000_000),
            Some(10_000_000 - 7_200_000)
        );
        assert_eq!(parse_time("now-1x", 0), None);
        assert_eq!(parse_time("yesterday", 0), None);
    }
}
