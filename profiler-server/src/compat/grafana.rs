//! Grafana's Pyroscope data source, served: the query side of Grafana
//! Pyroscope's API (`querier.v1.QuerierService`), so this server can be
//! added to Grafana as a Pyroscope data source.
//!
//! Each call is a Connect unary call, `POST /querier.v1.QuerierService/<Method>`
//! with the request as protobuf (`application/proto`) or proto3 JSON
//! (`application/json`), optionally gzipped (`Content-Encoding: gzip`); the
//! answer uses the request's codec. Errors are Connect's
//! `{"code": "...", "message": "..."}` with the code's HTTP status. The
//! calls need the read scope and run within the query limits.
//!
//! What the data source calls (Grafana's `pkg/tsdb/grafana-pyroscope-datasource`),
//! and what is served:
//! - `ProfileTypes` (query editor, health check): one type per kind with data
//!   in the range (see [`profile_type`] for the ids);
//! - `LabelNames`, `LabelValues` (editor autocompletion): `service_name` is
//!   the service, the other names are series labels;
//! - `SelectMergeStacktraces` (flame graph), honouring `max_nodes`;
//! - `SelectSeries` (time series), with `group_by`, `step` and `limit`;
//! - `SelectMergeSpanProfile` (span profiles, for queries from a trace): the
//!   merged stacks of the requests whose `span_id` is one of the span ids, from
//!   the request table (`store::requests`: custom labels read by our agent);
//! - `SelectHeatmap` (behind a Grafana feature toggle) is `unimplemented`, as
//!   this server keeps no per-profile values; Grafana shows the error on that
//!   panel only. So is the rest of the service.
//!
//! `Series` is served too, for other clients. Label selectors are described
//! in [`selector`]. The series dictionary is not indexed by time, so label
//! names, values and series ignore `start`/`end`: they list every series
//! retention keeps.

mod flamegraph;
mod profile_type;
mod selector;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use profiler_pprof::pyroscope::querier::v1::{
    ProfileFormat, ProfileTypesRequest, ProfileTypesResponse, SelectMergeSpanProfileRequest,
    SelectMergeSpanProfileResponse, SelectMergeStacktracesRequest, SelectMergeStacktracesResponse, SelectSeriesRequest, SelectSeriesResponse, SeriesRequest,
    SeriesResponse,
};
use profiler_pprof::pyroscope::types::v1::{
    LabelNamesRequest, LabelNamesResponse, LabelPair, LabelValuesRequest, LabelValuesResponse,
    Labels as LabelSet, Point, Series, StackTraceSelector, TimeSeriesAggregationType,
};
use prost::Message;

use crate::http::{self, ApiError, AppState};
use crate::http::auth;
use crate::compat::connect::{Code, Codec, ConnectError};
use crate::query::Tree;
use crate::store::{self, Aggregate, Cancel, GroupBy, Labels, Matcher, Store, StoreError};
use crate::compat::connect::json::{self, FromJson, ToJson};
use selector::{LabelMatcher, Selector};

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/querier.v1.QuerierService/{method}", post(call))
        .route_layer(middleware::from_fn_with_state(state, authorize))
}

/// The methods answered; the others are `unimplemented`.
const SERVED: [&str; 7] = [
    "ProfileTypes",
    "LabelNames",
    "LabelValues",
    "Series",
    "SelectMergeStacktraces",
    "SelectMergeSpanProfile",
    "SelectSeries",
];

/// The request key span profiles select by: what the agent's custom labels and
/// Pyroscope's SDKs call a span's id.
const SPAN_ID: &str = "span_id";
/// Most span ids one span profile may name.
const MAX_SPANS: usize = 10_000;

/// Largest request once decompressed; the requests are a few strings.
const MAX_REQUEST_BYTES: usize = 1 << 20;
/// `max_nodes` when a request leaves it out, as in Pyroscope.
const DEFAULT_MAX_NODES: usize = 8192;
/// The range of a request without one (`start` and `end` zero).
const DEFAULT_RANGE_MS: i64 = 3_600_000;
/// The range `ProfileTypes` looks at without one: a profile type seen today
/// should be offered even by Grafana versions that send no range.
const RECENT_MS: i64 = 24 * 3_600_000;
/// Most series `SelectSeries` may group into: each costs a store scan.
const MAX_GROUPS: usize = 256;

async fn authorize(State(s): State<AppState>, req: Request, next: Next) -> Response {
    match auth::check(&s.config, auth::Scope::Read, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => ConnectError::from(e).into_response(),
    }
}

async fn call(
    State(s): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    dispatch(&s, &method, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn dispatch(
    s: &AppState,
    method: &str,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ConnectError> {
    if !SERVED.contains(&method) {
        return Err(ConnectError::new(
            Code::Unimplemented,
            format!(
                "querier.v1.QuerierService/{method} is not served here; this server answers {}",
                SERVED.join(", ")
            ),
        ));
    }
    let codec = Codec::of(headers)?;
    let body = body.map_err(|e| {
        ConnectError::from(ApiError::new(
            e.status(),
            format!("reading the request body: {}", e.body_text()),
        ))
    })?;
    let body = decompress(headers, &body)?;
    match method {
        "ProfileTypes" => unary(codec, &body, |r| profile_types(s, r)).await,
        "LabelNames" => unary(codec, &body, |r| label_names(s, r)).await,
        "LabelValues" => unary(codec, &body, |r| label_values(s, r)).await,
        "Series" => unary(codec, &body, |r| series(s, r)).await,
        "SelectMergeStacktraces" => unary(codec, &body, |r| select_merge_stacktraces(s, r)).await,
        "SelectMergeSpanProfile" => unary(codec, &body, |r| select_merge_span_profile(s, r)).await,
        "SelectSeries" => unary(codec, &body, |r| select_series(s, r)).await,
        _ => unreachable!("every served method has a handler"),
    }
}

/// A failed store scan: a cancelled one has nobody to answer; a failed store
/// is an outage, never an empty answer.
fn scan_error(e: StoreError) -> ConnectError {
    match e {
        StoreError::Cancelled => ConnectError::new(Code::Unavailable, "query cancelled"),
        e => {
            tracing::error!(error = %format!("{e:#}"), "grafana query failed");
            ConnectError::new(Code::Unavailable, "the store failed; retry later (see the server log)")
        }
    }
}

/// Decodes the request, runs the handler, encodes its answer.
async fn unary<Req, Resp, Fut>(
        codec: Codec,
        body: &[u8],
        handler: impl FnOnce(Req) -> Fut,
    ) -> Result<Response, ConnectError>
    where
        Req: Message + Default + FromJson,
        Resp: Message + ToJson,
        Fut: Future<Output = Result<Resp, ConnectError>>,
    {
        let request = match codec {
            Codec::Proto => Req::decode(body)
                .map_err(|e| ConnectError::invalid(format!("invalid protobuf request: {e}")))?,
            Codec::Json => json::decode(body).map_err(ConnectError::invalid)?,
        };
        let response = handler(request).await?;
        Ok(match codec {
            Codec::Proto => (
                [(header::CONTENT_TYPE, "application/proto")],
                response.encode_to_vec(),
            )
                .into_response(),
            Codec::Json => (
                [(header::CONTENT_TYPE, "application/json")],
                response.to_json().to_string(),
            )
                .into_response(),
        })
    }

/// The request body under the one Content-Encoding policy (see
/// [`http::check_content_encoding`]).
fn decompress<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, ConnectError> {
    http::check_content_encoding(headers)?;
    profiler_pprof::gunzip(body, MAX_REQUEST_BYTES).map_err(|e| ConnectError::from(ApiError::from(e)))
}

/// Runs a handler's store and CPU work within the query limits (slots,
/// timeout, cancellation when the caller goes away).
async fn query<T: Send + 'static>(
    s: &AppState,
    work: impl FnOnce(&AppState, &Cancel) -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    let cancel = Cancel::default();
    let (state, scan_cancel) = (s.clone(), cancel.clone());
    http::run_query(s.clone(), cancel, move || Ok(work(&state, &scan_cancel))).await?
}

/// A request's `[start, end)` in unix milliseconds: `end` zero is now,
/// `start` zero an hour before `end`; longer than the query range limit is
/// refused.
fn range(s: &AppState, start: i64, end: i64) -> Result<(i64, i64), ConnectError> {
    client_times(start, end)?;
    let until = if end == 0 { crate::store::now_ms() } else { end };
    let from = if start == 0 {
        until - DEFAULT_RANGE_MS
    } else {
        start
    };
    Ok(http::params::within_query_range(from, until, &s.config.limits, ("start", "end"))?)
}

/// Refuses a `start` or `end` outside the times a client may name, before any
/// arithmetic on them.
fn client_times(start: i64, end: i64) -> Result<(), ConnectError> {
    if http::client_time_ms(start).is_none() || http::client_time_ms(end).is_none() {
        return Err(ConnectError::invalid(
            "`start` and `end` must be unix milliseconds from 1970 to 9999 (0: the default)",
        ));
    }
    Ok(())
}

/// The selectors of a `matchers` list: a series matching any counts, and an
/// empty list matches every series.
fn parse_selectors(texts: &[String]) -> Result<Vec<Selector>, ConnectError> {
    if texts.is_empty() {
        return Ok(vec![Selector::default()]);
    }
    texts
        .iter()
        .map(|t| Selector::parse(t).map_err(ConnectError::invalid))
        .collect()
}

/// The series of the services some selector may touch.
struct Catalog(Vec<(String, Vec<Arc<Labels>>)>);

impl Catalog {
    fn load(store: &dyn Store, selectors: &[Selector]) -> Result<Catalog, ConnectError> {
        let mut catalog = Vec::new();
        for service in store.services().map_err(scan_error)? {
            if selectors.iter().any(|s| s.admits_service(&service)) {
                let series = store.series(&service).map_err(scan_error)?;
                catalog.push((service, series));
            }
        }
        Ok(Catalog(catalog))
    }

    /// (service, labels) of every series some selector matches.
    fn matching<'a>(
        &'a self,
        selectors: &'a [Selector],
    ) -> impl Iterator<Item = (&'a str, &'a Labels)> {
        self.0.iter().flat_map(move |(service, series)| {
            series
                .iter()
                .filter(move |l| selectors.iter().any(|s| s.matches(service, l)))
                .map(move |l| (service.as_str(), &**l))
        })
    }

    /// The store selections (service, matchers) whose union is exactly what
    /// the selector matches.
    fn plan(&self, selector: &Selector) -> Result<Vec<(String, Vec<Matcher>)>, ConnectError> {
        let mut plans = Vec::new();
        for (service, series) in &self.0 {
            for matchers in selector
                .plan(service, series)
                .map_err(ConnectError::invalid)?
            {
                plans.push((service.clone(), matchers));
            }
        }
        Ok(plans)
    }
}

/// One kind over a time range, summed over store selections.
fn aggregate(
    store: &dyn Store,
    plans: &[(String, Vec<Matcher>)],
    kind: &str,
    (from, until): (i64, i64),
    by: GroupBy,
    cancel: &Cancel,
) -> Result<Aggregate, ConnectError> {
    let mut total = Aggregate::new();
    for (service, matchers) in plans {
        let selection = store::Selector {
            service: service.clone(),
            from_ms: from,
            until_ms: until,
            kinds: Some(vec![kind.to_owned()]),
            matchers: matchers.clone(),
            cancel: cancel.clone(),
        };
        store::merge_into(
            &mut total,
            store.aggregate(&selection, by).map_err(scan_error)?,
        );
    }
    Ok(total)
}

async fn profile_types(
    s: &AppState,
    r: ProfileTypesRequest,
) -> Result<ProfileTypesResponse, ConnectError> {
    client_times(r.start, r.end)?;
    let (from, until) = if r.start == 0 && r.end == 0 {
        let now = crate::store::now_ms();
        (now - RECENT_MS, now)
    } else {
        // The latest part of a range longer than a query may cover: the
        // editor still needs its list.
        let until = if r.end == 0 { crate::store::now_ms() } else { r.end };
        let max = (s.config.limits.max_query_range_hours as i64).saturating_mul(3_600_000);
        (r.start.max(until - max), until)
    };
    if from >= until {
        return Err(ConnectError::invalid("`start` must be before `end`"));
    }
    query(s, move |s, cancel| {
        let mut kinds = BTreeSet::new();
        for service in s.store.services().map_err(scan_error)? {
            let selection = store::Selector {
                service,
                from_ms: from,
                until_ms: until,
                kinds: None,
                matchers: vec![],
                cancel: cancel.clone(),
            };
            let by_kind = s
                .store
                .aggregate(
                    &selection,
                    GroupBy::Time {
                        step_ms: until - from,
                    },
                )
                .map_err(scan_error)?;
            kinds.extend(
                by_kind
                    .into_iter()
                    .filter(|(_, buckets)| buckets.values().any(|v| *v != 0))
                    .map(|(kind, _)| kind),
            );
        }
        Ok(ProfileTypesResponse {
            profile_types: kinds.iter().map(|k| profile_type::of_kind(k)).collect(),
        })
    })
    .await
}

async fn label_names(
    s: &AppState,
    r: LabelNamesRequest,
) -> Result<LabelNamesResponse, ConnectError> {
    let selectors = parse_selectors(&r.matchers)?;
    query(s, move |s, _| {
        let catalog = Catalog::load(&*s.store, &selectors)?;
        let names: BTreeSet<&str> = catalog
            .matching(&selectors)
            .flat_map(|(_, labels)| selector::label_names(labels))
            .collect();
        Ok(LabelNamesResponse {
            names: names.into_iter().map(str::to_owned).collect(),
        })
    })
    .await
}

async fn label_values(
    s: &AppState,
    r: LabelValuesRequest,
) -> Result<LabelValuesResponse, ConnectError> {
    if r.name.is_empty() {
        return Err(ConnectError::invalid("`name` (the label) is required"));
    }
    let selectors = parse_selectors(&r.matchers)?;
    query(s, move |s, _| {
        let catalog = Catalog::load(&*s.store, &selectors)?;
        let values: BTreeSet<&str> = catalog
            .matching(&selectors)
            .filter_map(|(service, labels)| selector::label(service, labels, &r.name))
            .filter(|v| !v.is_empty())
            .collect();
        Ok(LabelValuesResponse {
            names: values.into_iter().map(str::to_owned).collect(),
        })
    })
    .await
}

async fn series(s: &AppState, r: SeriesRequest) -> Result<SeriesResponse, ConnectError> {
    let selectors = parse_selectors(&r.matchers)?;
    query(s, move |s, _| {
        let catalog = Catalog::load(&*s.store, &selectors)?;
        let wanted =
            |name: &str| r.label_names.is_empty() || r.label_names.iter().any(|n| n == name);
        let sets: BTreeSet<BTreeMap<&str, &str>> = catalog
            .matching(&selectors)
            .map(|(service, labels)| {
                selector::label_names(labels)
                    .filter(|name| wanted(name))
                    .filter_map(|name| Some((name, selector::label(service, labels, name)?)))
                    .collect()
            })
            .collect();
        Ok(SeriesResponse {
            labels_set: sets
                .into_iter()
                .map(|set| LabelSet {
                    labels: set
                        .into_iter()
                        .map(|(name, value)| pair(name, value))
                        .collect(),
                })
                .collect(),
        })
    })
    .await
}

fn pair(name: &str, value: &str) -> LabelPair {
    LabelPair {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

/// Refuses a stack trace filter rather than answer as if there were none.
fn no_stack_trace_selector(s: &Option<StackTraceSelector>) -> Result<(), ConnectError> {
    match s {
        Some(s) if !s.call_site.is_empty() || s.go_pgo.is_some() => Err(ConnectError::new(
            Code::Unimplemented,
            "stack_trace_selector (call site or Go PGO filtering) is not supported",
        )),
        _ => Ok(()),
    }
}

async fn select_merge_stacktraces(
    s: &AppState,
    r: SelectMergeStacktracesRequest,
) -> Result<SelectMergeStacktracesResponse, ConnectError> {
    if !matches!(
        r.format(),
        ProfileFormat::Unspecified | ProfileFormat::Flamegraph
    ) {
        return Err(ConnectError::new(
            Code::Unimplemented,
            format!(
                "format {}: only flame graphs are served",
                r.format().as_str_name()
            ),
        ));
    }
    no_stack_trace_selector(&r.stack_trace_selector)?;
    if !(r.profile_id_selector.is_empty()
        && r.trace_id_selector.is_empty()
        && r.span_selector.is_empty())
    {
        return Err(ConnectError::new(
            Code::Unimplemented,
            "selecting by profile, trace or span id is not supported: this server keeps no such ids",
        ));
    }
    let kind = profile_type::kind_of(&r.profile_type_id).map_err(ConnectError::invalid)?;
    let selector = Selector::parse(&r.label_selector).map_err(ConnectError::invalid)?;
    let range = range(s, r.start, r.end)?;
    let max_nodes = match r.max_nodes {
        None | Some(0) => DEFAULT_MAX_NODES,
        Some(n) => usize::try_from(n)
            .map_err(|_| ConnectError::invalid("`max_nodes` must not be negative"))?,
    }
    .min(s.config.limits.max_nodes);
    query(s, move |s, cancel| {
        let catalog = Catalog::load(&*s.store, std::slice::from_ref(&selector))?;
        let plans = catalog.plan(&selector)?;
        let stacks = aggregate(&*s.store, &plans, &kind, range, GroupBy::Stack, cancel)?;
        let tree = Tree::build(&s.names, &*s.store, &[&stacks], false).map_err(scan_error)?;
        Ok(SelectMergeStacktracesResponse {
            flamegraph: Some(flamegraph::encode(&tree.to_json(max_nodes, 0.0, false))),
        })
    })
    .await
}

/// Span profiles: the stacks of the requests whose `span_id` is one of
/// `span_selector`, over the series the label selector matches.
async fn select_merge_span_profile(
    s: &AppState,
    r: SelectMergeSpanProfileRequest,
) -> Result<SelectMergeSpanProfileResponse, ConnectError> {
    if !matches!(r.format(), ProfileFormat::Unspecified | ProfileFormat::Flamegraph) {
        return Err(ConnectError::new(
            Code::Unimplemented,
            format!("format {}: only flame graphs are served", r.format().as_str_name()),
        ));
    }
    if r.span_selector.len() > MAX_SPANS {
        return Err(ConnectError::invalid(format!("more than {MAX_SPANS} span ids")));
    }
    let kind = profile_type::kind_of(&r.profile_type_id).map_err(ConnectError::invalid)?;
    let selector = Selector::parse(&r.label_selector).map_err(ConnectError::invalid)?;
    let range = range(s, r.start, r.end)?;
    let max_nodes = match r.max_nodes {
        None | Some(0) => DEFAULT_MAX_NODES,
        Some(n) => usize::try_from(n).map_err(|_| ConnectError::invalid("`max_nodes` must not be negative"))?,
    }
    .min(s.config.limits.max_nodes);
    query(s, move |s, cancel| {
        let spans: std::collections::HashSet<&str> = r.span_selector.iter().map(String::as_str).collect();
        let catalog = Catalog::load(&*s.store, std::slice::from_ref(&selector))?;
        let mut stacks = Aggregate::new();
        for (service, matchers) in catalog.plan(&selector)? {
            let selection = store::Selector {
                service,
                from_ms: range.0,
                until_ms: range.1,
                kinds: Some(vec![kind.clone()]),
                matchers,
                cancel: cancel.clone(),
            };
            let max = s.config.limits.max_query_requests;
            let requests = crate::query::requests::Requests::read(&s.requests, &*s.store, &selection, Some(SPAN_ID), &[], max)
                .map_err(scan_error)?;
            store::merge_into(&mut stacks, requests.aggregate_named(&spans));
        }
        let tree = Tree::build(&s.names, &*s.store, &[&stacks], false).map_err(scan_error)?;
        Ok(SelectMergeSpanProfileResponse { flamegraph: Some(flamegraph::encode(&tree.to_json(max_nodes, 0.0, false))) })
    })
    .await
}

/// `step` (seconds) in milliseconds; zero gives about 200 points.
fn step_ms(step: f64, (from, until): (i64, i64)) -> Result<i64, ConnectError> {
    let ms = if step == 0.0 {
        ((until - from) / 200).max(1)
    } else if step.is_finite() && step * 1000.0 >= 1.0 {
        (step * 1000.0).round() as i64
    } else {
        return Err(ConnectError::invalid(
            "`step` must be at least 0.001 seconds",
        ));
    };
    Ok(http::params::points_step(ms, (from, until), http::params::MAX_POINTS)?)
}

async fn select_series(
    s: &AppState,
    r: SelectSeriesRequest,
) -> Result<SelectSeriesResponse, ConnectError> {
    if r.aggregation() == TimeSeriesAggregationType::Average {
        return Err(ConnectError::new(
            Code::Unimplemented,
            "aggregation AVERAGE is not supported: points are sums",
        ));
    }
    no_stack_trace_selector(&r.stack_trace_selector)?;
    let kind = profile_type::kind_of(&r.profile_type_id).map_err(ConnectError::invalid)?;
    let selector = Selector::parse(&r.label_selector).map_err(ConnectError::invalid)?;
    let range = range(s, r.start, r.end)?;
    let step_ms = step_ms(r.step, range)?;
    query(s, move |s, cancel| {
        let catalog = Catalog::load(&*s.store, std::slice::from_ref(&selector))?;
        // One series per combination of group-by values that some selected
        // series has; an empty value is a missing label.
        let groups: BTreeSet<Vec<Option<&str>>> = catalog
            .matching(std::slice::from_ref(&selector))
            .map(|(service, labels)| {
                r.group_by
                    .iter()
                    .map(|name| selector::label(service, labels, name).filter(|v| !v.is_empty()))
                    .collect()
            })
            .collect();
        if groups.len() > MAX_GROUPS {
            return Err(ConnectError::invalid(format!(
                "group_by {:?} gives {} series; at most {MAX_GROUPS} are served: narrow the selector",
                r.group_by,
                groups.len()
            )));
        }
        let mut series = Vec::new();
        for values in groups {
            let mut group = selector.clone();
            let mut labels = Vec::new();
            for (name, value) in r.group_by.iter().zip(values) {
                group = group.with(LabelMatcher::equal(name, value.unwrap_or("")));
                labels.extend(value.map(|v| pair(name, v)));
            }
            let plans = catalog.plan(&group)?;
            let by_time = aggregate(&*s.store, &plans, &kind, range, GroupBy::Time { step_ms }, cancel)?;
            let mut buckets: BTreeMap<u64, i64> = BTreeMap::new();
            for (start, value) in by_time.into_values().flatten() {
                *buckets.entry(start).or_default() += value;
            }
            let points: Vec<Point> = buckets
                .into_iter()
                .map(|(start, value)| Point {
                    value: value as f64,
                    timestamp: start as i64,
                })
                .collect();
            if !points.is_empty() {
                series.push(Series { labels, points });
            }
        }
        if let Some(limit) = r.limit.filter(|n| *n > 0) {
            let total = |s: &Series| s.points.iter().map(|p| p.value).sum::<f64>();
            series.sort_by(|a, b| total(b).total_cmp(&total(a)));
            series.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        let key = |s: &Series| -> Vec<(String, String)> {
            s.labels.iter().map(|l| (l.name.clone(), l.value.clone())).collect()
        };
        series.sort_by_key(key);
        Ok(SelectSeriesResponse { series })
    })
    .await
}
