//! OTLP profiles ingest, over HTTP (`POST /v1development/profiles`,
//! `application/x-protobuf`, optionally gzipped) and gRPC
//! (`opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export`
//! on the same port). The layout accepted is
//! [`profiler_pprof::otlp::ACCEPTED_VERSION`]; each OTLP profile is converted
//! to pprof and ingested like any pprof: same ingest scope, limits and memory
//! budget as the native route, the profile id as batch id. Both transports
//! reserve a request's decoded size from the ingest budget before decoding it,
//! and convert its profiles one at a time.
//!
//! Service: the resource's `service.name` (else `unknown_service`); the other
//! resource attributes are series labels; samples keep their attributes and
//! trace links (`trace_id`, `span_id`) as labels.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Buf as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::UnaryService;
use profiler_pprof::otlp::{self, ExportProfilesServiceRequest, ExportProfilesServiceResponse};
use prost::Message;

use crate::http::{self as edge, ApiError, AppState};
use crate::budget::Grant;
use crate::ingest::{self, BatchBuilder, Target};
use crate::store::Labels;

/// OTLP over HTTP at [`HTTP_ROUTE`] and gRPC at [`GRPC_ROUTE`]; other versions of
/// the HTTP route get a 404 that names the one served.
pub fn routes(state: AppState) -> axum::Router<AppState> {
    let routes = axum::Router::new()
        .route(HTTP_ROUTE, axum::routing::post(http_export))
        .route_service(GRPC_ROUTE, grpc(state.clone()))
        .route("/v1experimental/profiles", axum::routing::post(other_version))
        .route("/v1/profiles", axum::routing::post(other_version));
    edge::ingest_layers(routes, &state)
}

pub const HTTP_ROUTE: &str = "/v1development/profiles";

/// Largest OTLP request, decompressed: an OTLP message can take far more memory
/// decoded than on the wire, and the whole request is decoded at once.
const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Most profiles in one request: each is converted and stored as a batch of its
/// own, and an exporter sends one per resource and scope of a reporting
/// interval, far fewer. 200,000 tiny profiles fit in 2 MB.
const MAX_PROFILES: usize = 10_000;
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
    let mut grant = edge::admit(&s, req.headers()).await?;
    let body = edge::body_bytes(Bytes::from_request(req, &s).await)?;
    grant.shrink_to(body.len());
    edge::blocking(move || {
        let limits = crate::config::Limits {
            max_decompressed_bytes: s.config.limits.max_decompressed_bytes.min(max_request_bytes(&s)),
            ..s.config.limits.clone()
        };
        let raw = edge::decompress(&mut grant, &body, &limits)?;
        grant
            .grow_to_blocking(body.len() + raw.len() * DECODED_PER_WIRE_BYTE)
            .map_err(edge::over_budget)?;
        decode_and_ingest(&s, &raw)
    })
    .await
}

/// The largest request taken, decompressed: small enough that its decoded worst case
/// fits the ingest budget.
fn max_request_bytes(s: &AppState) -> usize {
    MAX_REQUEST_BYTES.min(s.config.limits.ingest_memory_bytes / (2 * DECODED_PER_WIRE_BYTE))
}

/// Decodes a request whose decoded size is already reserved, and ingests it.
fn decode_and_ingest(s: &AppState, wire: &[u8]) -> Result<(), ApiError> {
    let request = ExportProfilesServiceRequest::decode(wire).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid ExportProfilesServiceRequest: {e}"))
    })?;
    ingest_request(s, &request, wire.len())
}

/// Converts and stores the profiles of a request, one at a time.
fn ingest_request(
    s: &AppState,
    request: &ExportProfilesServiceRequest,
    wire_len: usize,
) -> Result<(), ApiError> {
    let profiles: usize = request
        .resource_profiles
        .iter()
        .flat_map(|r| &r.scope_profiles)
        .map(|s| s.profiles.len())
        .sum();
    if profiles > MAX_PROFILES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("an OTLP request of {profiles} profiles: at most {MAX_PROFILES}; split it"),
        ));
    }
    let limits = &s.config.limits;
    otlp::for_each_profile(request, |rp| {
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
            crate::store::now_ms()
        };
        let target = Target {
            service: service.unwrap_or_else(|| "unknown_service".into()),
            kind,
            ts_ms: crate::ingest::align(ts_ms, s.config.storage.window_ms),
            labels,
        };
        let mut b = BatchBuilder::new(limits, target)?;
        ingest::pprof(&profile, idx, &mut b)?;
        edge::store_batch(s, b, wire_len, rp.profile_id.into()).map(drop)
    })
}

/// OTLP profilers sample `samples` (a count) with a `cpu` period: that is CPU
/// time, stored in nanoseconds as `cpu`, when the period says how long a sample
/// is (non-zero, in a time unit). Counts without one are stored as counts under
/// their sample type's name (`samples`), never as nanoseconds they do not
/// measure; other sample types keep their name.
fn kind_of(profile: &profiler_pprof::Profile, idx: usize) -> Result<String, ApiError> {
    let name = ingest::sample_type_name(profile, idx)?;
    let string = |i: i64| usize::try_from(i).ok().and_then(|i| profile.string_table.get(i)).map(String::as_str);
    let period = profile.period_type.as_ref();
    let cpu_period = period.and_then(|t| string(t.r#type)) == Some("cpu")
        && profile.period > 0
        && period.and_then(|t| string(t.unit)).is_some_and(ingest::is_time_unit);
    Ok(if name == "samples" && cpu_period { "cpu".into() } else { name })
}

/// The gRPC method's path.
pub const GRPC_ROUTE: &str =
    "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// The gRPC side: the same conversion and store, behind the ingest scope (axum's
/// middleware runs before tonic sees the call). tonic hands over the request's bytes,
/// decompressed within [`MAX_REQUEST_BYTES`], not the decoded message: its memory is
/// reserved from the ingest budget before decoding, as on the HTTP route (a decoded
/// request takes up to [`DECODED_PER_WIRE_BYTE`] times its wire size).
pub fn grpc(state: AppState) -> Grpc {
    Grpc(state)
}

#[derive(Clone)]
pub struct Grpc(AppState);

impl Service<Request> for Grpc {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let export = Export(self.0.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WireCodec)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_REQUEST_BYTES);
            Ok(grpc.unary(export, req).await)
        })
    }
}

struct Export(AppState);

impl UnaryService<Bytes> for Export {
    type Response = ExportProfilesServiceResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let s = self.0.clone();
        Box::pin(async move {
            let wire = request.into_inner();
            let max_bytes = max_request_bytes(&s);
            if wire.len() > max_bytes {
                return Err(tonic::Status::resource_exhausted(format!(
                    "an OTLP request of {} bytes decompressed is over the {max_bytes} this server's ingest memory budget can decode",
                    wire.len()
                )));
            }
            let grant: Result<Grant, _> = s.budget.reserve(wire.len() * DECODED_PER_WIRE_BYTE).await;
            let _grant = grant.map_err(|e| tonic::Status::resource_exhausted(edge::over_budget(e).message().to_owned()))?;
            edge::blocking(move || decode_and_ingest(&s, &wire))
            .await
            .map_err(|e| {
                let message = e.message().to_owned();
                match e.status().as_u16() {
                    400 | 413 => tonic::Status::invalid_argument(message),
                    503 => tonic::Status::unavailable(message),
                    _ => tonic::Status::internal(message),
                }
            })?;
            Ok(tonic::Response::new(ExportProfilesServiceResponse::default()))
        })
    }
}

/// Requests as their bytes, responses as protobuf.
struct WireCodec;

impl Codec for WireCodec {
    type Encode = ExportProfilesServiceResponse;
    type Decode = Bytes;
    type Encoder = WireCodec;
    type Decoder = WireCodec;

    fn encoder(&mut self) -> Self::Encoder {
        WireCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireCodec
    }
}

impl Encoder for WireCodec {
    type Item = ExportProfilesServiceResponse;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst).map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl Decoder for WireCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
