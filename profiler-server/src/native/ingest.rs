//! `POST /api/v1/ingest`: our agent's bundles of stacks windows, and pprof, folded
//! or stacks windows from anything else.

use axum::body::Bytes;
use axum::extract::{FromRequest, RawQuery, Request, State};
use axum::routing::post;
use axum::{Json, Router};

use crate::budget::Grant;
use crate::http::{self, admit, blocking, body_bytes, decode_pprof, decompress, over_budget, store_batch, store_batches, ApiError, ApiResult, AppState, Idempotency, IngestSummary, Params};
use crate::ingest::{self, align, BatchBuilder, Target};
use crate::store::{now_ms, Labels};

pub fn routes(state: AppState) -> Router<AppState> {
    http::ingest_layers(Router::new().route("/api/v1/ingest", post(ingest_native)), &state)
}

/// Query parameters of the native ingest route; anything else is refused, so
/// a stray parameter (a cache buster such as `_=<timestamp>`) cannot mint a new
/// series per request.
const INGEST_PARAMS: [&str; 8] = [
    "service",
    "kind",
    "from",
    // Sent by agents before 2026-12 and never read: windows are placed by `from`.
    "until",
    "sample_type",
    "label",
    "format",
    "batch_id",
];

/// Ingest labels: `label=name:value`, repeatable.
fn ingest_labels(p: &Params) -> ApiResult<Labels> {
    if let Some((k, _)) = p.0.iter().find(|(k, _)| !INGEST_PARAMS.contains(&k.as_str())) {
        return Err(ApiError::bad(format!(
            "unknown query parameter `{}`; labels are passed as `label=name:value`",
            ingest::truncate(k, 64)
        )));
    }
    p.labels()
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
        if matches!(p.get("format"), Some("bundle" | "bundle2" | "bundle3")) {
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
            return Err(ApiError::bad("`format` must be pprof (default), folded, stacks, bundle, bundle2 or bundle3"));
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
/// a bundle that was partly stored counts each part once. `format=bundle2`
/// is the same with wait histograms on off-CPU parts, stored as `<batch_id>/<i>/waits`;
/// `format=bundle3` adds requests, written to the request table (under part names
/// `<batch_id>/<i>`, so a retry rewrites them) before the batches are stored: an
/// acknowledged window has both.
fn ingest_bundle(s: &AppState, p: &Params, grant: &mut Grant, body: &[u8], key: Idempotency) -> ApiResult<Json<IngestSummary>> {
    if p.get("service").is_some() || p.get("kind").is_some() {
        return Err(ApiError::bad("a bundle names services and kinds in its parts, not in the query"));
    }
    let labels = ingest_labels(p)?;
    let limits = &s.config.limits;
    let from = p.time("from", now_ms(), now_ms())?;
    let raw = decompress(grant, body, limits)?;
    // As for one stacks window, plus the batch each part becomes.
    let (mut parts, mut waits_bytes, mut requests_bytes) = (0, 0, 0);
    for part in profiler_pprof::stacks::BundleReader::new(&raw).into_iter().flatten().flatten() {
        parts += 1;
        waits_bytes += part.waits.len();
        requests_bytes += part.requests.len();
    }
    // A histogram bucket is at least two bytes on the wire and a row of about
    // sixty bytes once in the batch; a request at least five bytes and a row of
    // about 150 (its names, kind and one stack).
    grant
        .grow_to_blocking(body.len() + 7 * raw.len() + 30 * waits_bytes + 30 * requests_bytes + parts * 1024)
        .map_err(over_budget)?;
    let ts_ms = align(from, s.config.storage.window_ms);
    let read = ingest::bundle(&raw, limits, ts_ms, &labels, &*s.store)?;
    let mut rows = read.requests;
    for row in &mut rows {
        row.part = key.part(&row.part).part_name();
    }
    s.requests.append(&rows)?;
    let batches = read
        .batches
        .into_iter()
        .map(|(name, mut batch)| {
            key.part(name).apply(&mut batch);
            batch
        })
        .collect();
    store_batches(s, batches, body.len())
}

