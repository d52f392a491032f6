//! HTTP routes of alert rules: scheduled comparisons of each period of a
//! service with its baseline (see `events`). Writes need an admin token, like
//! deep-profile schedules; reads follow the read scope.
//!
//! - `GET /api/v1/alerts`: the config file's rules (`"source": "config"`,
//!   read-only) and the API's (`"source": "api"`)
//! - `PUT /api/v1/alerts/{name}`: creates or replaces a rule; the body is the
//!   rule (`service`, `every_secs`, optional `baseline` and `min_regressions`)
//! - `DELETE /api/v1/alerts/{name}`

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    middleware,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use crate::{
    http::{auth, blocking, params::json_body, ApiError, ApiResult, AppState},
    events::AlertRule,
};

pub fn routes(state: AppState) -> Router<AppState> {
    let admin = Router::new()
        .route("/api/v1/alerts/{name}", put(put_rule).delete(delete_rule))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::admin));
    let reads = Router::new()
        .route("/api/v1/alerts", get(list_rules))
        .route_layer(middleware::from_fn_with_state(state, auth::read));
    admin.merge(reads)
}

async fn list_rules(State(state): State<AppState>) -> Response {
    Json(state.events.rules()).into_response()
}

/// The body names the rule or leaves the name to the path; a different name
/// is refused rather than guessed at.
fn rule_from(name: &str, body: &[u8]) -> Result<AlertRule, String> {
    let mut value: serde_json::Value = json_body(body)?;
    let object = value.as_object_mut().ok_or("the body must be a JSON object")?;
    match object.get("name") {
        None => {
            object.insert("name".into(), name.into());
        }
        Some(given) if given == name => {}
        Some(given) => return Err(format!("the body names the rule {given}, the path {name:?}")),
    }
    serde_json::from_value(value).map_err(|err| format!("invalid request body: {err}"))
}

async fn put_rule(State(state): State<AppState>, Path(name): Path<String>, body: axum::body::Bytes) -> ApiResult<Response> {
    let rule = rule_from(&name, &body).map_err(ApiError::bad)?;
    let known = state.known_services().await?;
    state.events.validate(&rule, &known).map_err(ApiError::bad)?;
    let events = state.events.clone();
    blocking(move || {
        let created = events.put_rule(rule.clone())?;
        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, Json(rule)).into_response())
    })
    .await
}

async fn delete_rule(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Response> {
    let events = state.events.clone();
    blocking(move || match events.delete_rule(&name)? {
        true => Ok(StatusCode::NO_CONTENT.into_response()),
        false => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no alert rule {name:?}"))),
    })
    .await
}
