//! OTLP profiles ingest, over HTTP (`POST /v1development/profiles`,
//! `application/x-protobuf`, optionally gzipped) and gRPC
//! (`opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export`
//! on the same port). The layout accepted is
//! [`profiler_pprof::otlp::ACCEPTED_VERSION`]; each OTLP profile is converted
//! to pprof and ingested like any pprof: same ingest scope, limits and memory
//! budget as the native route, the profile id as batch id.
//!
//! Service: the resource's `service.name` (else `unknown_service`); the other
//! resource attributes are series labels; samples keep their attributes and
//! trace links (`trace_id`, `span_id`) as labels.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_server::{
    ProfilesService, ProfilesServiceServer,
};
use profiler_pprof::otlp::{self, ExportProfilesServiceRequest, ExportProfilesServiceResponse};
use prost::Message;

use crate::api::{self, ApiError, AppState};
use crate::budget::Grant;
use crate::ingest::{self, BatchBuilder, Target};
use crate::store::Labels;

pub const HTTP_ROUTE: &str = "/v1development/profiles";

/// Largest OTLP request, decompressed: an OTLP message can take far more memory
/// decoded than on the wire, and the whole request is decoded at once.
const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Memory reserved per wire byte while a request is decoded and converted: the
/// worst case, an empty `Sample`, is 2 bytes on the wire and about 80 bytes in
/// memory plus the vector's growth, so a request cannot outgrow its grant.
const DECODED_PER_WIRE_BYTE: usize = 80;

pub async fn http_export(State(s): State<AppState>, req: Request) -> Response {
    match http(s, req).await {
        Ok(()) => (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            ExportProfilesServiceResponse::default().encode_to_vec(),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Other OTLP profiles versions' paths (`/v1experimental/profiles`, a future
/// `/v1/profiles`) get the version this server takes.
pub async fn other_version() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "this OTLP profiles version is not supported; send {} to {HTTP_ROUTE}",
            otlp::ACCEPTED_VERSION
        ),
    )
}

async fn http(s: AppState, req: Request) -> Result<(), ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !ct.starts_with("application/x-protobuf") && !ct.starts_with("application/protobuf") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ct:?}: OTLP profiles are taken as application/x-protobuf"),
        ));
    }
    let mut grant = api::admit(&s, req.headers()).await?;
    let body = api::body_bytes(Bytes::from_request(req, &s).await)?;
    grant.shrink_to(body.len());
    api::blocking(move || {
        // Small enough that its decoded worst case fits the ingest budget.
        let max_bytes =
            MAX_REQUEST_BYTES.min(s.config.limits.ingest_memory_bytes / (2 * DECODED_PER_WIRE_BYTE));
        let limits = crate::config::Limits {
            max_decompressed_bytes: s.config.limits.max_decompressed_bytes.min(max_bytes),
            ..s.config.limits.clone()
        };
        let raw = api::decompress(&mut grant, &body, &limits)?;
        grant
            .grow_to_blocking(body.len() + raw.len() * DECODED_PER_WIRE_BYTE)
            .map_err(api::over_budget)?;
        let request = ExportProfilesServiceRequest::decode(raw.as_ref()).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid ExportProfilesServiceRequest: {e}"),
            )
        })?;
        ingest_request(&s, &request, raw.len())
    })
    .await
}

/// Converts and stores every profile of a request.
fn ingest_request(
    s: &AppState,
    request: &ExportProfilesServiceRequest,
    wire_len: usize,
) -> Result<(), ApiError> {
    let profiles = otlp::to_pprof(request)?;
    let limits = &s.config.limits;
    for rp in profiles {
        let mut service = None;
        let mut labels = Labels::new();
        for (k, v) in rp.resource {
            if k == "service.name" {
                service = Some(v);
            } else {
                ingest::validate_label(limits, &k, &v)?;
                labels.insert(k, v);
            }
        }
        let profile = rp.profile;
        let idx = ingest::pick_sample_type(&profile, None, None)?;
        let kind = kind_of(&profile, idx)?;
        let ts_ms = if profile.time_nanos > 0 {
            profile.time_nanos / 1_000_000
        } else {
            api::now_ms()
        };
        let target = Target {
            service: service.unwrap_or_else(|| "unknown_service".into()),
            kind,
            ts_ms: api::align(ts_ms, s.config.storage.window_ms),
            labels,
        };
        let mut b = BatchBuilder::new(limits, target)?;
        ingest::pprof(&profile, idx, &mut b)?;
        let _summary = api::store_batch(s, b, wire_len, rp.profile_id)?;
    }
    Ok(())
}

/// OTLP profilers sample `samples` (a count) with a `cpu` period: that is CPU
/// time, stored in nanoseconds as `cpu`. Other sample types keep their name.
fn kind_of(profile: &profiler_pprof::Profile, idx: usize) -> Result<String, ApiError> {
    let name = ingest::sample_type_name(profile, idx)?;
    let period = profile
        .period_type
        .as_ref()
        .and_then(|t| profile.string_table.get(usize::try_from(t.r#type).ok()?))
        .map(String::as_str);
    Ok(if name == "samples" && period == Some("cpu") {
        "cpu".into()
    } else {
        name
    })
}

/// The gRPC method's path.
pub const GRPC_ROUTE: &str =
    "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// The gRPC side: the same conversion and store, behind the ingest scope
/// (axum's middleware runs before tonic sees the call).
pub fn grpc(state: AppState) -> ProfilesServiceServer<Grpc> {
    ProfilesServiceServer::new(Grpc(state))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
}

pub struct Grpc(AppState);

#[tonic::async_trait]
impl ProfilesService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportProfilesServiceRequest>,
    ) -> Result<tonic::Response<ExportProfilesServiceResponse>, tonic::Status> {
        let s = self.0.clone();
        let request = request.into_inner();
        let wire_len = request.encoded_len();
        // tonic decoded the request already; hold its memory while converting.
        let grant: Result<Grant, _> = s.budget.reserve(wire_len * DECODED_PER_WIRE_BYTE).await;
        let _grant = grant.map_err(|e| {
            tonic::Status::resource_exhausted(api::over_budget(e).message().to_owned())
        })?;
        api::blocking(move || ingest_request(&s, &request, wire_len))
            .await
            .map_err(|e| {
                let message = e.message().to_owned();
                match e.status().as_u16() {
                    400 | 413 => tonic::Status::invalid_argument(message),
                    503 => tonic::Status::unavailable(message),
                    _ => tonic::Status::internal(message),
                }
            })?;
        Ok(tonic::Response::new(
            ExportProfilesServiceResponse::default(),
        ))
    }
}
