//! HTTP routes of scheduled deep-profile runs. Schedules and "profile now" need an
//! admin token; agents poll and report with their ingest token; reads follow the
//! read scope like the other queries (see `auth`).
//!
//! - `GET/POST /api/v1/schedules`, `PUT/DELETE /api/v1/schedules/{id}`
//! - `GET/POST /api/v1/runs` (POST = profile now), `GET /api/v1/runs/{id}`,
//!   `GET /api/v1/runs/{id}/flamegraph` (redirects to the run's flame graph query)
//! - `GET /api/v1/agent/runs?host=&service=...&label=k:v...` (agents poll),
//!   `POST /api/v1/agent/runs/{id}?host=&state=running|done|failed&message=`

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    extract::{Path, RawQuery, State},
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::json;

use crate::{
    http::{auth, error::reply, params::json_body, AppState},
    schedule::{AdHocSpec, AgentInfo, RunState, ScheduleSpec},
};

pub fn routes(state: AppState) -> Router<AppState> {
    let admin = Router::new()
        .route("/api/v1/schedules", post(create_schedule))
        .route("/api/v1/schedules/{id}", put(replace_schedule).delete(delete_schedule))
        .route("/api/v1/runs", post(profile_now))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::admin));
    let agents = Router::new()
        .route("/api/v1/agent/runs", get(agent_runs))
        .route("/api/v1/agent/runs/{id}", post(agent_report))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::ingest));
    let reads = Router::new()
        .route("/api/v1/schedules", get(list_schedules))
        .route("/api/v1/runs", get(list_runs))
        .route("/api/v1/runs/{id}", get(get_run))
        .route("/api/v1/runs/{id}/flamegraph", get(run_flamegraph))
        .route_layer(middleware::from_fn_with_state(state, auth::read));
    admin.merge(agents).merge(reads)
}

fn internal(err: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{err:#}"), "schedule store failed");
    reply(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see server log")
}

async fn list_schedules(State(state): State<AppState>) -> Response {
    Json(state.schedules.list()).into_response()
}

async fn create_schedule(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let spec: ScheduleSpec = match json_body(&body) {
        Ok(spec) => spec,
        Err(reason) => return reply(StatusCode::BAD_REQUEST, reason),
    };
    let known = match state.known_services().await {
        Ok(known) => known,
        Err(err) => return err.into_response(),
    };
    if let Err(reason) = state.schedules.validate(&spec, &known) {
        return reply(StatusCode::BAD_REQUEST, reason);
    }
    match state.schedules.create(spec) {
        Ok(schedule) => (StatusCode::CREATED, Json(schedule)).into_response(),
        Err(err) => internal(err),
    }
}

async fn replace_schedule(State(state): State<AppState>, Path(id): Path<u64>, body: axum::body::Bytes) -> Response {
    let spec: ScheduleSpec = match json_body(&body) {
        Ok(spec) => spec,
        Err(reason) => return reply(StatusCode::BAD_REQUEST, reason),
    };
    let known = match state.known_services().await {
        Ok(known) => known,
        Err(err) => return err.into_response(),
    };
    if let Err(reason) = state.schedules.validate(&spec, &known) {
        return reply(StatusCode::BAD_REQUEST, reason);
    }
    match state.schedules.replace(id, spec) {
        Ok(Some(schedule)) => Json(schedule).into_response(),
        Ok(None) => reply(StatusCode::NOT_FOUND, format!("no schedule {id}")),
        Err(err) => internal(err),
    }
}

async fn delete_schedule(State(state): State<AppState>, Path(id): Path<u64>) -> Response {
    match state.schedules.delete(id) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => reply(StatusCode::NOT_FOUND, format!("no schedule {id}")),
        Err(err) => internal(err),
    }
}

async fn profile_now(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let spec: AdHocSpec = match json_body(&body) {
        Ok(spec) => spec,
        Err(reason) => return reply(StatusCode::BAD_REQUEST, reason),
    };
    let known = match state.known_services().await {
        Ok(known) => known,
        Err(err) => return err.into_response(),
    };
    match state.schedules.profile_now(spec, &known) {
        Err(reason) => reply(StatusCode::BAD_REQUEST, reason),
        Ok(Ok(run)) => (StatusCode::CREATED, Json(run)).into_response(),
        Ok(Err(err)) => internal(err),
    }
}

async fn list_runs(State(state): State<AppState>) -> Response {
    Json(state.schedules.runs()).into_response()
}

async fn get_run(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.schedules.run(&id) {
        Some(run) => Json(run).into_response(),
        None => reply(StatusCode::NOT_FOUND, format!("no run {id:?}")),
    }
}

/// The run's profile is the selected service's data in the run's window.
async fn run_flamegraph(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let Some(run) = state.schedules.run(&id) else { return reply(StatusCode::NOT_FOUND, format!("no run {id:?}")) };
    let Some(service) = &run.selector.service else {
        return reply(StatusCode::BAD_REQUEST, format!("run {id:?} selects no service; query /api/v1/flamegraph per service"));
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("service", service).append_pair("from", &run.start_ms.to_string()).append_pair("until", &run.end_ms.to_string());
    let mut filters: Vec<String> = run.selector.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if let Some(host) = &run.selector.host {
        filters.push(format!("host={host}"));
    }
    if !filters.is_empty() {
        query.append_pair("filter", &filters.join(","));
    }
    (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, format!("/api/v1/flamegraph?{}", query.finish()))]).into_response()
}

fn query_pairs(raw: Option<String>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned().collect()
}

async fn agent_runs(State(state): State<AppState>, RawQuery(raw): RawQuery) -> Response {
    let pairs = query_pairs(raw);
    let Some(host) = pairs.iter().find(|(k, _)| k == "host").map(|(_, v)| v.clone()) else {
        return reply(StatusCode::BAD_REQUEST, "missing host parameter");
    };
    let services = pairs.iter().filter(|(k, _)| k == "service").map(|(_, v)| v.clone()).collect();
    let labels: BTreeMap<String, String> = pairs
        .iter()
        .filter(|(k, _)| k == "label")
        .filter_map(|(_, v)| v.split_once(':').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let runs = state.schedules.for_agent(&AgentInfo { host, services, labels });
    Json(json!({ "runs": runs, "limits": state.schedules.limits })).into_response()
}

async fn agent_report(State(state): State<AppState>, Path(id): Path<String>, RawQuery(raw): RawQuery) -> Response {
    let pairs = query_pairs(raw);
    let get = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let Some(host) = get("host") else { return reply(StatusCode::BAD_REQUEST, "missing host parameter") };
    let run_state = match get("state").as_deref() {
        Some("running") => RunState::Running,
        Some("done") => RunState::Done,
        Some("failed") => RunState::Failed,
        other => return reply(StatusCode::BAD_REQUEST, format!("state must be running, done or failed, got {other:?}")),
    };
    match state.schedules.report(&id, &host, run_state, get("message").unwrap_or_default()) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => reply(StatusCode::NOT_FOUND, format!("no run {id:?}")),
        Err(err) => internal(err),
    }
}
