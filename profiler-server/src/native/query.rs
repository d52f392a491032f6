//! The query routes of `/api/v1` (and `/metrics`): flame graphs, exports, diffs,
//! timelines, the fleet overview, changes and events.

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::config::Limits;
use crate::http::params::{matchers, points_step, selector, time_range, MAX_POINTS};

/// Most points of the overview's sparklines.
const MAX_SPARKLINE_POINTS: i64 = 1_000;
use crate::http::{auth, blocking, run_query, ApiError, ApiResult, AppState, Params};
use crate::query::{self, Tree};
use crate::render;
use crate::query::requests::{Pick, Requests};
use crate::store::{Aggregate, Cancel, GroupBy, Matcher, Selector, StoreResult};

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/services", get(services))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/labels", get(labels))
        .route("/api/v1/label_values", get(label_values))
        .route("/api/v1/timeline", get(timeline))
        .route("/api/v1/flamegraph", get(flamegraph))
        .route("/api/v1/folded", get(folded))
        .route("/api/v1/pprof", get(pprof))
        .route("/api/v1/svg", get(svg))
        .route("/api/v1/diff", get(diff))
        .route("/api/v1/top", get(top))
        .route("/api/v1/waits", get(waits))
        .route("/api/v1/requests", get(requests))
        .route("/api/v1/changes", get(changes))
        .route("/api/v1/events", get(events))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state, auth::read))
}

async fn services(State(s): State<AppState>) -> ApiResult<Json<Vec<String>>> {
    blocking(move || Ok(Json(s.store.services()?))).await
}

#[derive(serde::Serialize)]
struct ChangesReply {
    service: String,
    from: i64,
    until: i64,
    base_from: i64,
    base_until: i64,
    filter: String,
    base_filter: String,
    #[serde(flatten)]
    changes: query::changes::Changes,
}

/// Functions that changed between a base and a target: the target is
/// `from`..`until` with `filter`; the base is `base_from`..`base_until`
/// (default: the previous period, or the same range when `base_filter`
/// names another label value) with `base_filter` (default: `filter`).
async fn changes(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<ChangesReply>> {
    let p = Params::new(q);
    let target = selector(&p, "from", "until", &s.config.limits)?;
    let len = target.until_ms - target.from_ms;
    let same_range = p.get("base_filter").is_some();
    let (base_from, base_until) = if p.get("base_from").is_some() || p.get("base_until").is_some() {
        time_range(&p, "base_from", "base_until", &s.config.limits)?
    } else if same_range {
        (target.from_ms, target.until_ms)
    } else {
        (target.from_ms - len, target.from_ms)
    };
    let base = Selector {
        from_ms: base_from,
        until_ms: base_until,
        matchers: match p.get("base_filter") {
            Some(f) => matchers(f)?,
            None => target.matchers.clone(),
        },
        ..target.clone()
    };
    let mut opts = query::changes::ChangeOptions::default();
    opts.alpha = p.num("alpha", opts.alpha)?;
    opts.min_share = p.num("min_share", opts.min_share)?;
    opts.min_relative = p.num("min_relative", opts.min_relative)?;
    opts.min_rate = p.num("min_rate", opts.min_rate)?;
    opts.limit = p.num("limit", opts.limit)?;
    if !(0.0..1.0).contains(&opts.alpha) || opts.alpha == 0.0 {
        return Err(ApiError::bad("`alpha` must be within (0, 1)"));
    }
    let window = s.config.storage.window_ms;
    let reply = |sel: &Selector| (sel.from_ms, sel.until_ms, sel.matchers.clone());
    let (t, b) = (reply(&target), reply(&base));
    let cancel = target.cancel.clone();
    run_query(s.clone(), cancel, move || {
        let changes = query::changes::compare_ranges(&*s.store, &s.names, &base, &target, window, &opts)?;
        let text = |m: &[Matcher]| m.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
        Ok(Json(ChangesReply {
            service: target.service.clone(),
            from: t.0,
            until: t.1,
            base_from: b.0,
            base_until: b.1,
            filter: text(&t.2),
            base_filter: text(&b.2),
            changes,
        }))
    })
    .await
}

/// Deploys and alerts with their comparisons, newest first; `service=` narrows.
async fn events(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<Vec<crate::events::Event>>> {
    let p = Params::new(q);
    let service = p.get("service").map(str::to_owned);
    blocking(move || Ok(Json(s.events.events(service.as_deref())))).await
}

/// The fleet overview: all services over `from`..`until`, at most 60 points
/// per sparkline unless `step` says otherwise.
async fn overview(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<query::Fleet>> {
    let p = Params::new(q);
    let (from, until) = time_range(&p, "from", "until", &s.config.limits)?;
    let window = s.config.storage.window_ms;
    // At most 60 points, in whole windows.
    let default_step = (((until - from) / 60 + window - 1) / window).max(1) * window;
    let step = points_step(p.num("step", default_step)?, (from, until), MAX_SPARKLINE_POINTS)?;
    let grid = crate::store::Grid { from_ms: from, until_ms: until, step_ms: step };
    let cancel = Cancel::default();
    run_query(s.clone(), cancel.clone(), move || {
        let overview = s.store.overview(grid, &cancel)?;
        Ok(Json(query::fleet(grid, overview)))
    })
    .await
}

async fn labels(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<Vec<String>>> {
    let p = Params::new(q);
    let service = p.req("service")?.to_owned();
    blocking(move || {
        let mut names: Vec<String> = s
            .store
            .series(&service)?
            .iter()
            .flat_map(|l| l.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        names.retain(|n| n != "service");
        Ok(Json(names))
    })
    .await
}

async fn label_values(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<Vec<String>>> {
    let p = Params::new(q);
    let service = p.req("service")?.to_owned();
    let name = p.req("name")?.to_owned();
    blocking(move || {
        let values: std::collections::BTreeSet<String> = s
            .store
            .series(&service)?
            .iter()
            .filter_map(|l| l.get(&name).cloned())
            .collect();
        Ok(Json(values.into_iter().collect()))
    })
    .await
}

async fn timeline(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<query::Timeline>> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let window = s.config.storage.window_ms;
    // Default: about 200 points, in whole windows.
    let default_step = (((sel.until_ms - sel.from_ms) / 200).max(window) / window) * window;
    let step = points_step(p.num("step", default_step)?, (sel.from_ms, sel.until_ms), MAX_POINTS)?;
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = s
            .store
            .aggregate(&sel, GroupBy::Time { step_ms: step })?;
        Ok(Json(query::timeline(&agg, sel.from_ms, sel.until_ms, step)))
    })
    .await
}

/// `max_nodes` is capped by the server's limit; what is cut shows as
/// `[pruned]` nodes, so totals stay exact.
fn tree_params(p: &Params, limits: &Limits) -> ApiResult<(usize, f64)> {
    let max_nodes: usize = p.num::<usize>("max_nodes", 2048)?.min(limits.max_nodes);
    let min_share: f64 = p.num("min_share", 0.0)?;
    if !(0.0..=1.0).contains(&min_share) {
        return Err(ApiError::bad("`min_share` must be within 0..=1"));
    }
    Ok((max_nodes.max(1), min_share))
}

async fn flamegraph(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<query::FlameNode>> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let pick = requests_pick(&p, "requests")?;
    let (max_nodes, min_share) = tree_params(&p, &s.config.limits)?;
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = stack_aggregate(&s, &sel, pick)?;
        let kind_roots = agg.values().filter(|m| !m.is_empty()).count() > 1;
        let tree = Tree::build(&s.names, &*s.store, &[&agg], kind_roots)?;
        Ok(Json(tree.to_json(max_nodes, min_share, false)))
    })
    .await
}

async fn folded(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let pick = requests_pick(&p, "requests")?;
    // Inverse of Pyroscope ingest: nanoseconds back to samples at this rate.
    let rate: i64 = p.num("sample_rate", 0)?;
    let divisor = if rate > 0 { 1_000_000_000 / rate } else { 1 };
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = stack_aggregate(&s, &sel, pick)?;
        let (stacks, cut) = query::heaviest(query::stacks(&*s.store, &agg)?, s.config.limits.max_stacks);
        let text = render::folded(&stacks, divisor);
        Ok((truncated(cut), [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
    })
    .await
}

async fn pprof(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let pick = requests_pick(&p, "requests")?;
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = stack_aggregate(&s, &sel, pick)?;
        let (stacks, cut) = query::heaviest(query::stacks(&*s.store, &agg)?, s.config.limits.max_stacks);
        let bytes = render::pprof(&stacks, sel.until_ms - sel.from_ms, sel.until_ms);
        Ok((
            truncated(cut),
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile.pb.gz\"",
                ),
            ],
            bytes,
        )
            .into_response())
    })
    .await
}

async fn svg(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Response> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let pick = requests_pick(&p, "requests")?;
    let title = p
        .get("title")
        .map_or_else(|| sel.service.clone(), str::to_owned);
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = stack_aggregate(&s, &sel, pick)?;
        let (stacks, cut) = query::heaviest(query::stacks(&*s.store, &agg)?, s.config.limits.max_stacks);
        let bytes = render::svg(&stacks, &title).map_err(ApiError::internal)?;
        Ok((truncated(cut), [(header::CONTENT_TYPE, "image/svg+xml")], bytes).into_response())
    })
    .await
}

async fn diff(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<query::FlameNode>> {
    let p = Params::new(q);
    let target = selector(&p, "from", "until", &s.config.limits)?;
    let mut base = selector(&p, "base_from", "base_until", &s.config.limits)?;
    base.cancel = target.cancel.clone();
    if p.get("base_from").is_none() || p.get("base_until").is_none() {
        return Err(ApiError::bad("diff needs `base_from` and `base_until`"));
    }
    let (pick, base_pick) = (requests_pick(&p, "requests")?, requests_pick(&p, "base_requests")?);
    let normalize = p.flag("normalize", true)?;
    let (max_nodes, min_share) = tree_params(&p, &s.config.limits)?;
    let same_selection = (target.from_ms, target.until_ms, &target.kinds, &target.matchers)
        == (base.from_ms, base.until_ms, &base.kinds, &base.matchers);
    run_query(s.clone(), target.cancel.clone(), move || {
        let (a, b) = match (&pick, &base_pick) {
            // Some requests against others of the same selection (the slowest 1% against
            // the rest): one read of the request table serves both sides.
            (Some((pick, key)), Some((base_pick, _))) if same_selection => {
                let read = read_requests(&s, &target, key.as_deref())?;
                (read.aggregate(*pick), read.aggregate(*base_pick))
            }
            _ => {
                let (a, b) = std::thread::scope(|sc| {
                    let h = sc.spawn(|| stack_aggregate(&s, &base, base_pick));
                    let a = stack_aggregate(&s, &target, pick);
                    (a, h.join().expect("diff scan panicked"))
                });
                (a?, b?)
            }
        };
        let kinds: std::collections::HashSet<&String> = a.keys().chain(b.keys()).collect();
        let mut tree = Tree::build(&s.names, &*s.store, &[&a, &b], kinds.len() > 1)?;
        if normalize {
            tree.normalize_base();
        }
        Ok(Json(tree.to_json(max_nodes, min_share, true)))
    })
    .await
}

async fn top(
    State(s): State<AppState>,
    RawQuery(q): RawQuery,
) -> ApiResult<Json<serde_json::Value>> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let pick = requests_pick(&p, "requests")?;
    let limit: usize = p.num::<usize>("limit", 50)?.min(MAX_TOP_LIMIT);
    let by_total = match p.get("by").unwrap_or("self") {
        "self" => false,
        "total" => true,
        other => {
            return Err(ApiError::bad(format!(
                "`by` must be self or total, not {other:?}"
            )))
        }
    };
    run_query(s.clone(), sel.cancel.clone(), move || {
        let agg = stack_aggregate(&s, &sel, pick)?;
        let total: i64 = agg.values().flat_map(|m| m.values()).sum();
        let functions = query::top(&s.names, &*s.store, &agg, by_total, limit)?;
        Ok(Json(json!({ "by": if by_total { "total" } else { "self" }, "total": total, "functions": functions })))
    })
    .await
}

/// How long individual off-CPU waits lasted: percentiles and buckets of the
/// waits of the selected off-CPU kinds (`kind=off-cpu:sleep,...`, default all),
/// series (`filter`) and range, only those whose stack has a frame matching
/// `frame` (a regex) when given. `by=function` ranks functions by their p99
/// wait instead (`limit`, default 50).
async fn waits(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<serde_json::Value>> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let frame = match p.get("frame").filter(|f| !f.is_empty()) {
        Some(pattern) => Some(
            regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|err| ApiError::bad(format!("`frame` is not a valid regex: {err}")))?,
        ),
        None => None,
    };
    let by_function = match p.get("by") {
        None => false,
        Some("function") => true,
        Some(other) => return Err(ApiError::bad(format!("`by` must be function or absent, not {other:?}"))),
    };
    let limit: usize = p.num::<usize>("limit", 50)?.min(MAX_TOP_LIMIT);
    run_query(s.clone(), sel.cancel.clone(), move || {
        let found = query::waits::stack_waits(&s.names, &*s.store, &sel, frame.as_ref(), by_function)?;
        if by_function {
            return Ok(Json(json!({ "functions": query::waits::by_function(&found, limit) })));
        }
        let summary = query::waits::summary(&query::waits::merged(&found));
        let mut reply = serde_json::to_value(summary).map_err(ApiError::internal)?;
        reply["stacks"] = json!(found.by_stack.len());
        Ok(Json(reply))
    })
    .await
}

fn request_table_metrics(stats: &crate::store::RequestTableStats) -> String {
    let metric = |name: &str, kind: &str, help: &str, value: u64| format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    metric("profiler_request_rows_written_total", "counter", "Rows written to the request table (a request's share of one ingest part).", stats.rows_written)
        + &metric("profiler_request_rows_deleted_total", "counter", "Request table rows deleted past retention.", stats.rows_deleted)
        + &metric("profiler_request_table_bytes", "gauge", "Size of the request table's file.", stats.disk_bytes)
}

/// `requests=slowest:P` (or `rest:P`, see [`Pick`]) of a query: its profile merges
/// only those requests' stacks; `request_key=` names the label requests are told
/// apart by (default: the first of the server's `request_labels` the service has).
fn requests_pick(p: &Params, param: &str) -> ApiResult<Option<(Pick, Option<String>)>> {
    let Some(text) = p.get(param) else { return Ok(None) };
    let pick = Pick::parse(text).map_err(ApiError::bad)?;
    Ok(Some((pick, p.get("request_key").map(str::to_owned))))
}

/// The stacks a profile query merges: the store's, or the picked requests'.
fn stack_aggregate(s: &AppState, sel: &Selector, pick: Option<(Pick, Option<String>)>) -> StoreResult<Aggregate> {
    match pick {
        None => s.store.aggregate(sel, GroupBy::Stack),
        Some((pick, key)) => Ok(read_requests(s, sel, key.as_deref())?.aggregate(pick)),
    }
}

fn read_requests(s: &AppState, sel: &Selector, key: Option<&str>) -> StoreResult<Requests> {
    let limits = &s.config.limits;
    Requests::read(&s.requests, &*s.store, sel, key, &limits.request_labels, limits.max_query_requests)
}

#[derive(serde::Serialize)]
struct RequestsReply {
    service: String,
    from: i64,
    until: i64,
    /// Requests selected.
    count: usize,
    /// Of their total time (on-CPU plus off-CPU), nanoseconds.
    total_ns: query::requests::Percentiles,
    /// The slowest `limit`, slowest first.
    requests: Vec<query::requests::Request>,
}

/// Requests of a service (custom labels `request_id`, `trace_id`, `span_id`, ...) over
/// `from`..`until`, whose series match `filter`: the percentiles of their total time
/// and the slowest `limit` (default 100) with their time per kind and labels. One key
/// at a time: `request_key`, by default the first of the server's `request_labels`
/// the service has.
async fn requests(State(s): State<AppState>, RawQuery(q): RawQuery) -> ApiResult<Json<RequestsReply>> {
    let p = Params::new(q);
    let sel = selector(&p, "from", "until", &s.config.limits)?;
    let limit: usize = p.num::<usize>("limit", 100)?.min(MAX_TOP_LIMIT);
    let key = p.get("request_key").map(str::to_owned);
    run_query(s.clone(), sel.cancel.clone(), move || {
        let mut read = read_requests(&s, &sel, key.as_deref())?;
        let (count, total_ns) = (read.requests.len(), read.percentiles());
        read.requests.truncate(limit);
        Ok(Json(RequestsReply { service: sel.service.clone(), from: sel.from_ms, until: sel.until_ms, count, total_ns, requests: read.requests }))
    })
    .await
}

/// Most rows `/top` returns.
const MAX_TOP_LIMIT: usize = 10_000;

/// The `X-Profiler-Truncated` header of an export that merged its lightest
/// stacks into one `[truncated]` stack, if it did.
fn truncated(cut: usize) -> axum::response::AppendHeaders<Option<(&'static str, String)>> {
    axum::response::AppendHeaders(
        (cut > 0).then(|| ("x-profiler-truncated", format!("{cut} stacks merged into [truncated]"))),
    )
}

async fn metrics(State(s): State<AppState>) -> ApiResult<Response> {
    blocking(move || {
        let text = s
            .metrics
            .render(s.store.disk_bytes(), s.store.buffered_rows(), &s.store.stats())
            + &s.events.render_metrics()
            + &s.names.render_metrics()
            + &request_table_metrics(&s.requests.stats());
        Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
    })
    .await
}

