//! Pyroscope's push API, the ingest route of the current Pyroscope SDKs (those
//! built on pyroscope-rs: Python, Ruby, Rust, .NET) and of Grafana Alloy's
//! `pyroscope.write`: `POST /push.v1.PusherService/Push`, a Connect unary call
//! with a `PushRequest` as protobuf (`application/proto`) or JSON
//! (`application/json`), optionally gzipped (`Content-Encoding: gzip`).
//!
//! Each series names its service (`service_name`) and profile type
//! (`__name__`); its other labels become series labels, and each raw pprof
//! sample is ingested like the native route does (same auth scope, limits,
//! memory budget), with the sample's `ID` as its batch id so a retried push
//! is counted once.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use profiler_pprof::pyroscope::push::v1::{PushRequest, PushResponse, RawProfileSeries};
use prost::Message;

use crate::http::{self, ApiError, AppState};
use crate::budget::Grant;
use crate::compat::connect::{json, Codec, ConnectError};
use crate::ingest::{self, BatchBuilder, Target};
use crate::store::Labels;

pub const ROUTE: &str = "/push.v1.PusherService/Push";

pub async fn push(State(s): State<AppState>, req: Request) -> Response {
    let codec = match Codec::of(req.headers()) {
        Ok(codec) => codec,
        Err(e) => return e.into_response(),
    };
    match handle(s, req, codec).await {
        Ok(()) => match codec {
            Codec::Proto => (
                [(header::CONTENT_TYPE, "application/proto")],
                PushResponse {}.encode_to_vec(),
            )
                .into_response(),
            Codec::Json => ([(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
        },
        Err(e) => ConnectError::from(e).into_response(),
    }
}

async fn handle(s: AppState, req: Request, codec: Codec) -> Result<(), ApiError> {
    let mut grant = http::admit(&s, req.headers()).await?;
    let body = http::body_bytes(Bytes::from_request(req, &s).await)?;
    grant.shrink_to(body.len());
    http::blocking(move || {
        let limits = &s.config.limits;
        let raw = http::decompress(&mut grant, &body, limits)?;
        // What decoding allocates, found before it does.
        let decoded = match codec {
            Codec::Proto => profiler_pprof::push_request_cost(&raw)?,
            Codec::Json => json_cost(&raw),
        };
        grant
            .grow_to_blocking(body.len() + raw.len() + decoded)
            .map_err(http::over_budget)?;
        let request = match codec {
            Codec::Proto => PushRequest::decode(raw.as_ref()).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("invalid PushRequest: {e}"))
            })?,
            Codec::Json => json::decode(&raw).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid PushRequest JSON: {e}"),
                )
            })?,
        };
        let held = body.len() + raw.len();
        drop(raw);
        for series in request.series {
            ingest_series(&s, &mut grant, held, series)?;
        }
        Ok(())
    })
    .await
}

/// Where a series goes: service, profile type and labels.
fn series_target(
    s: &AppState,
    labels: &[(String, String)],
) -> Result<(String, String, Labels), ApiError> {
    let mut service = None;
    let mut name = None;
    let mut rest = Labels::new();
    for (k, v) in labels {
        match k.as_str() {
            "service_name" => service = Some(v.clone()),
            "__name__" => name = Some(v.clone()),
            // Pyroscope's other reserved labels (`__session_id__`, ...) are not dimensions.
            k if k.starts_with("__") => {}
            k => {
                ingest::validate_label(&s.config.limits, k, v)?;
                rest.insert(k.to_owned(), v.clone());
            }
        }
    }
    let service = service.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "series has no `service_name` label",
        )
    })?;
    Ok((service, name.unwrap_or_else(|| "process_cpu".into()), rest))
}

fn ingest_series(
    s: &AppState,
    grant: &mut Grant,
    held: usize,
    series: RawProfileSeries,
) -> Result<(), ApiError> {
    let labels: Vec<(String, String)> = series
        .labels
        .into_iter()
        .map(|l| (l.name, l.value))
        .collect();
    let (service, profile_type, labels) = series_target(s, &labels)?;
    let limits = &s.config.limits;
    for sample in series.samples {
        let raw = http::decompress(grant, &sample.raw_profile, limits)?;
        let profile = http::decode_pprof(grant, held + sample.raw_profile.len(), &raw, limits)?;
        drop(raw);
        let ts_ms = if profile.time_nanos > 0 {
            profile.time_nanos / 1_000_000
        } else {
            crate::store::now_ms()
        };
        let id = (!sample.id.is_empty()).then_some(sample.id);
        for (kind, idx) in kinds(&profile, &profile_type)? {
            let target = Target {
                service: service.clone(),
                kind,
                ts_ms: crate::ingest::align(ts_ms, s.config.storage.window_ms),
                labels: labels.clone(),
            };
            let mut b = BatchBuilder::new(limits, target)?;
            ingest::pprof(&profile, idx, &mut b)?;
            // One batch per sample type: the id is per profile. The push API
            // answers an empty PushResponse, so the summary is not needed.
            let batch_id = id.as_ref().map(|id| format!("{id}:{idx}"));
            let _summary = http::store_batch(s, b, sample.raw_profile.len(), batch_id.into())?;
        }
    }
    Ok(())
}

/// The kinds a profile is stored as, with their sample type: a profile with
/// a time sample type (CPU, wall) is stored once under that time, a CPU
/// profile as `cpu`; any other (memory, goroutines, locks) once per sample
/// type under the sample type's name (`alloc_space`, `inuse_objects`, ...).
fn kinds(
    profile: &profiler_pprof::Profile,
    profile_type: &str,
) -> Result<Vec<(String, usize)>, ApiError> {
    let time = ingest::time_sample_type(profile)?;
    if let Some(idx) = time {
        let kind = match profile_type {
            "process_cpu" => "cpu".to_owned(),
            other => other.to_owned(),
        };
        return Ok(vec![(kind, idx)]);
    }
    let n = profile.sample_type.len();
    (0..n)
        .map(|idx| Ok((ingest::sample_type_name(profile, idx)?, idx)))
        .collect()
}

/// Upper bound of what decoding a JSON `PushRequest` allocates: each object (`{`) at
/// most the largest struct of the request, and the strings at most their text, twice
/// (repeated fields grow by doubling). `{"series":[{},{},...]}` is 3 bytes on the wire
/// per series and about 50 in memory.
fn json_cost(raw: &[u8]) -> usize {
    use profiler_pprof::pyroscope::push::v1::{RawProfileSeries, RawSample};
    use profiler_pprof::pyroscope::types::v1::LabelPair;
    let largest = size_of::<RawProfileSeries>().max(size_of::<RawSample>()).max(size_of::<LabelPair>());
    let objects = raw.iter().filter(|&&b| b == b'{').count();
    objects.saturating_mul(largest).saturating_add(raw.len()).saturating_mul(2)
}
