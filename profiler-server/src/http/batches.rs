//! Storing one request's batches: the client's idempotency key and when an
//! unanswered attempt may have stored them, the store's outcome, metrics, and
//! deploy detection on what was stored.

use axum::http::HeaderMap;
use axum::Json;

use crate::ingest::BatchBuilder;
use crate::store::{now_ms, Appended, Batch};

use super::{ApiError, ApiResult, AppState, Params};

/// What makes a request's batches idempotent: the client's key, and when an
/// earlier attempt that got no answer may have stored them.
pub struct Idempotency {
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
    pub fn of(p: &Params, headers: &HeaderMap) -> ApiResult<Self> {
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
    pub fn part(&self, i: impl std::fmt::Display) -> Idempotency {
        Idempotency {
            id: self.id.as_ref().map(|id| format!("{id}/{i}")),
            maybe_stored_since_ms: self.maybe_stored_since_ms,
        }
    }

    /// The name request-table rows of this batch are stored under: the batch id, so
    /// that a retry rewrites them, or without one a name no other request has (a retry
    /// cannot be told apart then anyway).
    pub fn part_name(&self) -> String {
        static ANONYMOUS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        match &self.id {
            Some(id) => id.clone(),
            None => format!("{}-{}", crate::store::now_ms(), ANONYMOUS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        }
    }

    pub fn apply(self, batch: &mut Batch) {
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

#[derive(serde::Serialize)]
pub struct IngestSummary {
    rows: usize,
    stacks: usize,
    series: usize,
    /// A retry of a batch already stored: acknowledged, not counted again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

pub fn store_batch(
    s: &AppState,
    mut b: BatchBuilder,
    body_len: usize,
    key: Idempotency,
) -> ApiResult<Json<IngestSummary>> {
    // Before the batch, as for bundles: an acknowledged request has both.
    s.requests.append(&b.take_requests(&key.part_name()))?;
    let mut batch = b.finish();
    key.apply(&mut batch);
    store_batches(s, vec![batch], body_len)
}

/// Stores one request's batches; duplicate when there were some and every
/// one of them was stored before.
pub fn store_batches(s: &AppState, batches: Vec<Batch>, body_len: usize) -> ApiResult<Json<IngestSummary>> {
    let seen: Vec<_> = batches.iter().map(crate::events::Seen::of).collect();
    let sizes: Vec<_> = batches.iter().map(|b| (b.rows.len(), b.stacks.len(), b.series.len())).collect();
    let outcomes = s.store.append_all(batches)?;
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

