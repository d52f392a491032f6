//! Grafana Pyroscope's ingest: `/ingest` (folded, lines or pprof, as its SDKs and
//! agents send) and the Connect `PusherService/Push` (`push`).

pub mod push;

use axum::body::Bytes;
use axum::extract::{FromRequest, RawQuery, Request, State};
use axum::http::header;
use axum::routing::post;
use axum::{Json, Router};

use crate::http::{self, admit, blocking, body_bytes, client_time_ms, decode_pprof, decompress, over_budget, store_batch, ApiError, ApiResult, AppState, Idempotency, IngestSummary, Params};
use crate::ingest::{self, align, BatchBuilder, Target};
use crate::store::now_ms;

pub fn routes(state: AppState) -> Router<AppState> {
    let routes = Router::new().route("/ingest", post(ingest_pyroscope)).route(push::ROUTE, post(push::push));
    http::ingest_layers(routes, &state)
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

