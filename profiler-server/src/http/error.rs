//! One error type for every route: `{"error": "..."}` with its status (and
//! `Retry-After` when busy). Domain errors map to it in one place each.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::events::RuleError;
use crate::ingest::Rejected;
use crate::query::changes::CompareError;
use crate::schedule::ScheduleError;
use crate::store::{Refused, StoreError};

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
    pub(crate) fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn busy(message: impl Into<String>, retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after_secs),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }
    pub(crate) fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see server log")
    }
}

/// Refusals keep their meaning (busy: 503, too large: 413, unverifiable:
/// 410); a cancelled scan has nobody to answer; a failed store or backend is
/// an outage (503), never an empty answer.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Refused(Refused::Busy(why)) => {
                tracing::warn!(reason = %why, "ingest refused: store busy");
                ApiError::busy(format!("the server cannot store profiles right now: {why}"), 5)
            }
            StoreError::Refused(Refused::TooLarge(why)) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, why),
            StoreError::Refused(Refused::Unverifiable(why)) => ApiError::new(StatusCode::GONE, why),
            StoreError::Cancelled => ApiError::busy("query cancelled", 1),
            StoreError::Backend(e) => {
                tracing::error!(error = %format!("{e:#}"), "store failed");
                ApiError::busy("the store failed; retry later (see the server log)", 5)
            }
        }
    }
}

impl From<CompareError> for ApiError {
    fn from(e: CompareError) -> ApiError {
        match e {
            CompareError::TooShort(short) => ApiError::bad(short.to_string()),
            CompareError::Store(e) => e.into(),
        }
    }
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> ApiError {
        match e {
            ScheduleError::Invalid(why) => ApiError::bad(why),
            ScheduleError::Save(e) => ApiError::internal(format!("{e:#}")),
        }
    }
}

impl From<RuleError> for ApiError {
    fn from(e: RuleError) -> ApiError {
        match e {
            RuleError::Conflict(why) => ApiError::new(StatusCode::CONFLICT, why),
            RuleError::Save(e) => ApiError::internal(format!("{e:#}")),
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

pub type ApiResult<T> = Result<T, ApiError>;
