//! HTTP routes of scheduled deep-profile runs. Schedules and "profile now" need an
//! admin token; agents poll and report with their ingest token; reads follow the
//! read scope like the other queries (see `auth`).
//!
//! - `GET/POST /api/v1/schedules`, `PUT/DELETE /api/v1/schedules/{id}`
//! - `GET/POST /api/v1/runs` (POST = profile now), `GET /api/v1/runs/{id}`,
//!   `GET /api/v1/runs/{id}/flamegraph` (redirects to the run's flame graph query)
//! - `GET /api/v1/agent/runs?host=&service=...&label=k:v...` (agents poll),
//!   `POST /api/v1/agent/runs/{id}?host=&state=running|done|failed&message=`

use axum::{
    Json, Router,
    extract::{Path, RawQuery, State},
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use profiler_pprof::runs::Reported;
use serde_json::json;

use crate::{
    http::{auth, blocking, params::json_body, ApiError, ApiResult, AppState, Params},
    schedule::{AdHocSpec, AgentInfo, RunState, ScheduleSpec, Schedules},
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

/// Runs schedule bookkeeping off the async threads: it writes and fsyncs the
/// schedules file, reads included (runs due now are materialized).
async fn book<T: Send + 'static>(state: &AppState, f: impl FnOnce(&Schedules) -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    let schedules = state.schedules.clone();
    blocking(move || f(&schedules)).await
}

async fn list_schedules(State(state): State<AppState>) -> ApiResult<Response> {
    book(&state, |s| Ok(Json(s.list()).into_response())).await
}

async fn create_schedule(State(state): State<AppState>, body: axum::body::Bytes) -> ApiResult<Response> {
    let spec: ScheduleSpec = json_body(&body).map_err(ApiError::bad)?;
    let known = state.known_services().await?;
    book(&state, move |s| {
        s.validate(&spec, &known).map_err(ApiError::bad)?;
        let schedule = s.create(spec)?;
        Ok((StatusCode::CREATED, Json(schedule)).into_response())
    })
    .await
}

async fn replace_schedule(State(state): State<AppState>, Path(id): Path<u64>, body: axum::body::Bytes) -> ApiResult<Response> {
    let spec: ScheduleSpec = json_body(&body).map_err(ApiError::bad)?;
    let known = state.known_services().await?;
    book(&state, move |s| {
        s.validate(&spec, &known).map_err(ApiError::bad)?;
        match s.replace(id, spec)? {
            Some(schedule) => Ok(Json(schedule).into_response()),
            None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no schedule {id}"))),
        }
    })
    .await
}

async fn delete_schedule(State(state): State<AppState>, Path(id): Path<u64>) -> ApiResult<Response> {
    book(&state, move |s| match s.delete(id)? {
        true => Ok(StatusCode::NO_CONTENT.into_response()),
        false => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no schedule {id}"))),
    })
    .await
}

async fn profile_now(State(state): State<AppState>, body: axum::body::Bytes) -> ApiResult<Response> {
    let spec: AdHocSpec = json_body(&body).map_err(ApiError::bad)?;
    let known = state.known_services().await?;
    book(&state, move |s| Ok((StatusCode::CREATED, Json(s.profile_now(spec, &known)?)).into_response())).await
}

async fn list_runs(State(state): State<AppState>) -> ApiResult<Response> {
    book(&state, |s| Ok(Json(s.runs()).into_response())).await
}

async fn get_run(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let run = book(&state, move |s| Ok(s.run(&id).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}")))?)).await?;
    Ok(Json(run).into_response())
}

/// The run's profile is the selected service's data in the run's window.
async fn run_flamegraph(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let wanted = id.clone();
    let run = book(&state, move |s| Ok(s.run(&wanted))).await?;
    let Some(run) = run else { return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}"))) };
    let Some(service) = &run.selector.service else {
        return Err(ApiError::bad(format!("run {id:?} selects no service; query /api/v1/flamegraph per service")));
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
    Ok((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, format!("/api/v1/flamegraph?{}", query.finish()))]).into_response())
}

async fn agent_runs(State(state): State<AppState>, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    let p = Params::new(raw);
    let host = p.req("host")?.to_owned();
    let services = p.all("service").map(str::to_owned).collect();
    let labels = p.labels()?;
    book(&state, move |s| {
        let runs = s.for_agent(&AgentInfo { host, services, labels });
        Ok(Json(json!({ "runs": runs, "limits": s.limits })).into_response())
    })
    .await
}

async fn agent_report(State(state): State<AppState>, Path(id): Path<String>, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    let p = Params::new(raw);
    let host = p.req("host")?.to_owned();
    let run_state: RunState = match p.get("state").and_then(Reported::parse) {
        Some(reported) => reported.into(),
        None => return Err(ApiError::bad(format!("state must be running, done or failed, got {:?}", p.get("state")))),
    };
    let message = p.get("message").unwrap_or_default().to_owned();
    book(&state, move |s| match s.report(&id, &host, run_state, message)? {
        true => Ok(StatusCode::NO_CONTENT.into_response()),
        false => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no run {id:?}"))),
    })
    .await
}
