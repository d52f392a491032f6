//! The Connect protocol's unary calls, as Grafana Pyroscope's APIs use them
//! (the SDKs' push, Grafana's querier): a request's codec from its content
//! type, and errors as `{"code", "message"}` with the code's HTTP status.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::http::ApiError;

pub mod json;

/// Connect's error codes that this service answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    ResourceExhausted,
    Unimplemented,
    Unavailable,
    Internal,
}

impl Code {
    pub fn name(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            Code::NotFound => "not_found",
            Code::ResourceExhausted => "resource_exhausted",
            Code::Unimplemented => "unimplemented",
            Code::Unavailable => "unavailable",
            Code::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug)]
pub struct ConnectError {
    code: Code,
    /// The code's status, except where the protocol asks for another.
    status: StatusCode,
    message: String,
    /// Seconds before a retry may succeed (busy or timed-out queries).
    retry_after: Option<u64>,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> ConnectError {
        ConnectError {
            code,
            status: code.status(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// A request body the service cannot read: HTTP 415, as the Connect
    /// protocol asks of a content type or encoding it does not support.
    pub fn unsupported(message: impl Into<String>) -> ConnectError {
        ConnectError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ..ConnectError::invalid(message)
        }
    }

    pub fn invalid(message: impl Into<String>) -> ConnectError {
        ConnectError::new(Code::InvalidArgument, message)
    }
}

/// The routes' errors (auth, query limits, bodies) keep their meaning.
impl From<ApiError> for ConnectError {
    fn from(e: ApiError) -> ConnectError {
        if e.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE {
            return ConnectError::unsupported(e.message());
        }
        let code = match e.status() {
            StatusCode::BAD_REQUEST => Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => {
                Code::ResourceExhausted
            }
            StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
            _ => Code::Internal,
        };
        ConnectError {
            retry_after: e.retry_after(),
            ..ConnectError::new(code, e.message())
        }
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code.name(), "message": self.message });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Codec {
    Proto,
    Json,
}

impl Codec {
    /// The codec of a request's content type; another type gets HTTP 415, as
    /// the Connect protocol asks.
    pub fn of(headers: &HeaderMap) -> Result<Codec, ConnectError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/proto" | "application/protobuf" | "application/x-protobuf" => {
                Ok(Codec::Proto)
            }
            "application/json" => Ok(Codec::Json),
            other => Err(ConnectError::unsupported(format!(
                "content type {other:?}: send application/proto or application/json"
            ))),
        }
    }
}
