//! Grafana's Pyroscope data source against the real server binary: the
//! requests its backend sends (querier.v1 over Connect, built here with the
//! same messages) answered as our own routes answer the same range and
//! filter.

use crate::common;

use std::collections::BTreeMap;
use std::io::Write;

use common::{client, now_ms, Proc};
use profiler_pprof::pyroscope::querier::v1::{
    FlameGraph, Level, ProfileTypesRequest, ProfileTypesResponse, SelectMergeSpanProfileRequest,
    SelectMergeSpanProfileResponse, SelectMergeStacktracesRequest,
    SelectMergeStacktracesResponse, SelectSeriesRequest, SelectSeriesResponse, SeriesRequest,
    SeriesResponse,
};
use profiler_pprof::pyroscope::types::v1::{
    LabelNamesRequest, LabelNamesResponse, LabelValuesRequest, LabelValuesResponse,
};
use prost::Message;
use serde_json::{json, Value};

const MIN: i64 = 60_000;
const READER: &str = "viewer";
const AGENT: &str = "agent";
const ON_CPU: &str = "on-cpu:on-cpu:nanoseconds:cpu:nanoseconds";
const BLOCKED_IO: &str = "off-cpu:blocked-io:nanoseconds:cpu:nanoseconds";
const SLEEP: &str = "off-cpu:sleep:nanoseconds:cpu:nanoseconds";

struct Env {
    srv: Proc,
    http: reqwest::blocking::Client,
    /// The data set's range: [from, until).
    from: i64,
    until: i64,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A server holding on-CPU and two off-CPU kinds of `shop` on hosts a
    /// and b, and on-CPU of `auth`, ingested through the native route.
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let srv = Proc::spawn(dir.path(), &["--token", AGENT, "--read-token", READER]);
        let t0 = (now_ms() - 20 * MIN).div_euclid(MIN) * MIN;
        let env = Env {
            srv,
            http: client(),
            from: t0,
            until: t0 + 10 * MIN,
            _dir: dir,
        };
        let data = [
            (
                "shop",
                "on-cpu",
                0,
                "host:a",
                "main;api;handle 30\nmain;api;db 20\nmain;gc 5\n",
            ),
            (
                "shop",
                "on-cpu",
                1,
                "host:b",
                "main;api;handle 10\nmain;idle 1\n",
            ),
            ("shop", "on-cpu", 5, "host:a", "main;api;render 25\n"),
            (
                "shop",
                "off-cpu:blocked-io",
                2,
                "host:a",
                "main;api;db;read 40\n",
            ),
            (
                "shop",
                "off-cpu:sleep",
                3,
                "host:b",
                "main;worker;sleep 70\n",
            ),
            (
                "auth",
                "on-cpu",
                1,
                "host:a&label=region:eu",
                "main;login 7\n",
            ),
        ];
        for (service, kind, minute, labels, folded) in data {
            let url = env.srv.url(&format!(
                "/api/v1/ingest?service={service}&kind={kind}&format=folded&from={}&label={labels}",
                t0 + minute * MIN
            ));
            let r = env
                .http
                .post(url)
                .bearer_auth(AGENT)
                .body(folded)
                .send()
                .unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().unwrap());
        }
        env
    }

    fn post(&self, method: &str, content_type: &str, body: Vec<u8>) -> reqwest::blocking::Response {
        self.http
            .post(
                self.srv
                    .url(&format!("/querier.v1.QuerierService/{method}")),
            )
            .bearer_auth(READER)
            .header("content-type", content_type)
            .header("connect-protocol-version", "1")
            .body(body)
            .send()
            .unwrap()
    }

    /// A Connect unary call with protobuf, as Grafana's connect-go client
    /// makes it.
    fn call<Resp: Message + Default>(&self, method: &str, request: &impl Message) -> Resp {
        let r = self.post(method, "application/proto", request.encode_to_vec());
        assert_eq!(r.status(), 200, "{method}: {}", r.text().unwrap());
        assert_eq!(r.headers()["content-type"], "application/proto");
        Resp::decode(r.bytes().unwrap()).unwrap()
    }

    /// (HTTP status, Connect error body) of a failing call.
    fn error(&self, method: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self.post(method, content_type, body);
        (r.status().as_u16(), r.json().unwrap())
    }

    fn get(&self, path_and_query: &str) -> reqwest::blocking::Response {
        let r = self
            .http
            .get(self.srv.url(path_and_query))
            .bearer_auth(READER)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path_and_query}");
        r
    }

    /// Our own folded export: stack -> value.
    fn folded(&self, query: &str) -> BTreeMap<String, i64> {
        let text = self
            .get(&format!(
                "/api/v1/folded?from={}&until={}&{query}",
                self.from, self.until
            ))
            .text()
            .unwrap();
        text.lines()
            .map(|l| {
                let (stack, v) = l.rsplit_once(' ').unwrap();
                (stack.to_owned(), v.parse().unwrap())
            })
            .collect()
    }

    fn flame_graph(
        &self,
        profile_type: &str,
        selector: &str,
        max_nodes: Option<i64>,
    ) -> FlameGraph {
        let r: SelectMergeStacktracesResponse = self.call(
            "SelectMergeStacktraces",
            &SelectMergeStacktracesRequest {
                profile_type_id: profile_type.into(),
                label_selector: selector.into(),
                start: self.from,
                end: self.until,
                max_nodes,
                ..Default::default()
            },
        );
        r.flamegraph.expect("a flame graph")
    }
}

/// Stack (root first, `;`-joined) -> self value, read back from the levels
/// the way Grafana does: x offsets are relative to the previous bar's end on
/// the same level, and a bar's parent is the bar above that contains it.
fn stacks(fg: &FlameGraph) -> BTreeMap<String, i64> {
    struct Bar {
        x: i64,
        total: i64,
        path: String,
    }
    assert_eq!(fg.names[0], "total");
    let mut out = BTreeMap::new();
    let mut above: Vec<Bar> = Vec::new();
    for (depth, level) in fg.levels.iter().enumerate() {
        let mut bars = Vec::new();
        let mut end = 0;
        for q in level.values.chunks_exact(4) {
            let (x, total, self_value, name) = (end + q[0], q[1], q[2], &fg.names[q[3] as usize]);
            end = x + total;
            let path = if depth == 0 {
                String::new()
            } else {
                let parent = above
                    .iter()
                    .find(|p| p.x <= x && x + total <= p.x + p.total)
                    .unwrap_or_else(|| panic!("bar {name} at x={x} lies in no parent"));
                if parent.path.is_empty() {
                    name.clone()
                } else {
                    format!("{};{name}", parent.path)
                }
            };
            if self_value > 0 {
                *out.entry(path.clone()).or_insert(0) += self_value;
            }
            bars.push(Bar { x, total, path });
        }
        above = bars;
    }
    out
}

fn bars(fg: &FlameGraph) -> usize {
    fg.levels.iter().map(|l| l.values.len() / 4).sum()
}

#[test]
fn grafana_pyroscope_data_source_requests() {
    let env = Env::new();
    let range = |start, end| ProfileTypesRequest { start, end };

    // The query editor's profile type list, and the health check (no range).
    let types: ProfileTypesResponse = env.call("ProfileTypes", &range(env.from, env.until));
    let ids: Vec<&str> = types.profile_types.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, [BLOCKED_IO, SLEEP, ON_CPU]);
    let io = &types.profile_types[0];
    assert_eq!(
        (
            io.name.as_str(),
            io.sample_type.as_str(),
            io.sample_unit.as_str()
        ),
        ("off-cpu", "blocked-io", "nanoseconds")
    );
    let recent: ProfileTypesResponse = env.call("ProfileTypes", &range(0, 0));
    assert_eq!(recent, types);
    let before: ProfileTypesResponse =
        env.call("ProfileTypes", &range(env.from - 10 * MIN, env.from));
    assert!(before.profile_types.is_empty());

    // Autocompletion: label names and values, as the editor asks for them.
    let names = |matcher: &str| -> Vec<String> {
        let r: LabelNamesResponse = env.call(
            "LabelNames",
            &LabelNamesRequest {
                matchers: vec![matcher.into()],
                start: env.from,
                end: env.until,
            },
        );
        r.names
    };
    assert_eq!(names(r#"{service_name="shop"}"#), ["host", "service_name"]);
    assert_eq!(names("{}"), ["host", "region", "service_name"]);
    let values = |name: &str, matcher: &str| -> Vec<String> {
        let r: LabelValuesResponse = env.call(
            "LabelValues",
            &LabelValuesRequest {
                name: name.into(),
                matchers: vec![matcher.into()],
                start: env.from,
                end: env.until,
            },
        );
        r.names
    };
    assert_eq!(values("service_name", "{}"), ["auth", "shop"]);
    assert_eq!(values("host", r#"{service_name="shop"}"#), ["a", "b"]);
    assert_eq!(
        values("region", r#"{service_name="shop"}"#),
        Vec::<String>::new()
    );
    assert_eq!(values("service_name", r#"{region="eu"}"#), ["auth"]);
    let series: SeriesResponse = env.call(
        "Series",
        &SeriesRequest {
            matchers: vec![r#"{service_name="auth"}"#.into()],
            ..Default::default()
        },
    );
    let sets: Vec<Vec<(String, String)>> = series
        .labels_set
        .iter()
        .map(|s| {
            s.labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect()
        })
        .collect();
    assert_eq!(
        sets,
        [[("host", "a"), ("region", "eu"), ("service_name", "auth")]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))]
    );

    // Flame graphs: the same stacks and totals as our folded export of the
    // same service, kind and filter.
    let cases = [
        (
            ON_CPU,
            r#"{service_name="shop"}"#,
            "service=shop&kind=on-cpu",
        ),
        (
            ON_CPU,
            r#"{service_name="shop", host="a"}"#,
            "service=shop&kind=on-cpu&filter=host=a",
        ),
        (
            ON_CPU,
            r#"{service_name="shop",host!="a"}"#,
            "service=shop&kind=on-cpu&filter=host!=a",
        ),
        (
            BLOCKED_IO,
            r#"{service_name="shop"}"#,
            "service=shop&kind=off-cpu:blocked-io",
        ),
        (
            SLEEP,
            r#"{service_name=~"sh.+", host=~"b|c"}"#,
            "service=shop&kind=off-cpu:sleep&filter=host=b",
        ),
        (
            ON_CPU,
            r#"{service_name="auth", region!~"us-.*"}"#,
            "service=auth&kind=on-cpu",
        ),
    ];
    for (profile_type, selector, ours) in cases {
        let fg = env.flame_graph(profile_type, selector, None);
        let expected = env.folded(ours);
        assert!(!expected.is_empty(), "{ours}");
        assert_eq!(stacks(&fg), expected, "{profile_type} {selector}");
        assert_eq!(fg.total, expected.values().sum::<i64>(), "{selector}");
    }
    // Every service at once: what Grafana sends before a service is picked.
    let mut both = env.folded("service=shop&kind=on-cpu");
    for (stack, v) in env.folded("service=auth&kind=on-cpu") {
        *both.entry(stack).or_insert(0) += v;
    }
    assert_eq!(stacks(&env.flame_graph(ON_CPU, "{}", None)), both);
    let none = env.flame_graph(ON_CPU, r#"{service_name="shop", host="z"}"#, None);
    assert_eq!((none.total, stacks(&none).len()), (0, 0));

    // max_nodes: the lightest nodes merge into [pruned], totals stay exact.
    let full = env.flame_graph(ON_CPU, r#"{service_name="shop"}"#, None);
    let cut = env.flame_graph(ON_CPU, r#"{service_name="shop"}"#, Some(3));
    assert_eq!(bars(&full), 8);
    assert!(bars(&cut) <= 5, "{cut:?}");
    assert!(cut.names.iter().any(|n| n == "[pruned]"));
    assert_eq!(cut.total, full.total);
    assert_eq!(stacks(&cut).values().sum::<i64>(), full.total);

    // The same call as JSON, integers as strings the way protojson writes them.
    let body = json!({
        "profileTypeID": BLOCKED_IO,
        "labelSelector": r#"{service_name="shop"}"#,
        "start": env.from.to_string(),
        "end": env.until.to_string(),
    });
    let r = env.post(
        "SelectMergeStacktraces",
        "application/json",
        body.to_string().into_bytes(),
    );
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().unwrap();
    let fg = &answer["flamegraph"];
    let int = |v: &Value| v.as_str().unwrap().parse::<i64>().unwrap();
    let from_json = FlameGraph {
        names: serde_json::from_value(fg["names"].clone()).unwrap(),
        levels: fg["levels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| Level {
                values: l["values"].as_array().unwrap().iter().map(int).collect(),
            })
            .collect(),
        total: int(&fg["total"]),
        max_self: int(&fg["maxSelf"]),
    };
    assert_eq!(
        from_json,
        env.flame_graph(BLOCKED_IO, r#"{service_name="shop"}"#, None)
    );

    // A gzipped request body.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&range(env.from, env.until).encode_to_vec())
        .unwrap();
    let r = env
        .http
        .post(env.srv.url("/querier.v1.QuerierService/ProfileTypes"))
        .bearer_auth(READER)
        .header("content-type", "application/proto")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        ProfileTypesResponse::decode(r.bytes().unwrap()).unwrap(),
        types
    );
}

#[test]
fn grafana_time_series_match_the_timeline() {
    let env = Env::new();
    let select = |selector: &str, group_by: &[&str], limit: Option<i64>| -> SelectSeriesResponse {
        env.call(
            "SelectSeries",
            &SelectSeriesRequest {
                profile_type_id: ON_CPU.into(),
                label_selector: selector.into(),
                start: env.from,
                end: env.until,
                group_by: group_by.iter().map(|g| g.to_string()).collect(),
                step: 60.0,
                limit,
                ..Default::default()
            },
        )
    };
    // Our timeline of the same selection: one value per minute from `from`.
    let timeline = |filter: &str| -> Vec<i64> {
        let t: Value = env
            .get(&format!(
                "/api/v1/timeline?service=shop&kind=on-cpu&from={}&until={}&step=60000{filter}",
                env.from, env.until
            ))
            .json()
            .unwrap();
        serde_json::from_value(t["series"]["on-cpu"].clone()).unwrap()
    };
    let dense = |s: &profiler_pprof::pyroscope::types::v1::Series| -> Vec<i64> {
        let mut v = vec![0; 10];
        for p in &s.points {
            assert_eq!(
                (p.timestamp - env.from) % MIN,
                0,
                "points start at whole steps from `start`"
            );
            v[((p.timestamp - env.from) / MIN) as usize] += p.value as i64;
        }
        v
    };

    let by_host = select(r#"{service_name="shop"}"#, &["host"], None);
    let hosts: Vec<&str> = by_host
        .series
        .iter()
        .map(|s| s.labels[0].value.as_str())
        .collect();
    assert_eq!(hosts, ["a", "b"]);
    for s in &by_host.series {
        assert_eq!(s.labels.len(), 1);
        assert_eq!(s.labels[0].name, "host");
        assert_eq!(
            dense(s),
            timeline(&format!("&filter=host={}", s.labels[0].value))
        );
    }
    let all = select(r#"{service_name="shop"}"#, &[], None);
    assert_eq!(all.series.len(), 1);
    assert!(all.series[0].labels.is_empty());
    assert_eq!(dense(&all.series[0]), timeline(""));
    assert_eq!(dense(&all.series[0]).iter().sum::<i64>(), 91);

    // The heaviest series only; and grouping by service across services.
    let top = select(r#"{service_name="shop"}"#, &["host"], Some(1));
    assert_eq!(top.series.len(), 1);
    assert_eq!(top.series[0].labels[0].value, "a");
    let services = select("{}", &["service_name"], None);
    let totals: Vec<(String, f64)> = services
        .series
        .iter()
        .map(|s| {
            (
                s.labels[0].value.clone(),
                s.points.iter().map(|p| p.value).sum(),
            )
        })
        .collect();
    assert_eq!(
        totals,
        [("auth".to_owned(), 7.0), ("shop".to_owned(), 91.0)]
    );
}

#[test]
fn grafana_calls_fail_with_connect_errors() {
    let env = Env::new();
    let flame = |selector: &str, profile_type: &str| {
        SelectMergeStacktracesRequest {
            profile_type_id: profile_type.into(),
            label_selector: selector.into(),
            start: env.from,
            end: env.until,
            ..Default::default()
        }
        .encode_to_vec()
    };
    let proto = "application/proto";

    let (status, body) = env.error("NoSuchMethod", proto, vec![]);
    assert_eq!(
        (status, body["code"].as_str()),
        (501, Some("unimplemented"))
    );
    // Heatmaps: nothing to answer them with.
    assert_eq!(env.error("SelectHeatmap", proto, vec![]).0, 501);

    let (status, body) = env.error("SelectMergeStacktraces", proto, flame("{host=a}", ON_CPU));
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("label selector"),
        "{body}"
    );
    let (status, body) = env.error("SelectMergeStacktraces", proto, flame("{}", "on-cpu"));
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument"))
    );
    assert!(
        body["message"].as_str().unwrap().contains("profile type"),
        "{body}"
    );
    let (status, _) = env.error("SelectMergeStacktraces", proto, b"\xff\xff".to_vec());
    assert_eq!(status, 400);
    let (status, body) = env.error("ProfileTypes", "text/plain", vec![]);
    assert_eq!(
        (status, body["code"].as_str()),
        (415, Some("invalid_argument"))
    );

    // Auth: the read scope, refused the Connect way.
    let no_token = env
        .http
        .post(env.srv.url("/querier.v1.QuerierService/ProfileTypes"))
        .header("content-type", proto)
        .send()
        .unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(no_token.json::<Value>().unwrap()["code"], "unauthenticated");
    let agent = env
        .http
        .post(env.srv.url("/querier.v1.QuerierService/ProfileTypes"))
        .bearer_auth(AGENT)
        .header("content-type", proto)
        .send()
        .unwrap();
    assert_eq!(agent.status(), 403);
    assert_eq!(agent.json::<Value>().unwrap()["code"], "permission_denied");
}

/// Times at the ends of `i64` on every query route, Grafana's and ours: each refused
/// with a clear 400, none wrapping past the query range limit (release builds) or
/// panicking (debug builds), and the server keeps answering.
#[test]
fn extreme_times_are_refused_on_every_query_route() {
    let env = Env::new();
    let json = "application/json";
    let (min, max) = (i64::MIN, i64::MAX);
    let extremes = [(min, 0), (min, max), (0, min), (max, 0), (1, max), (-1, 1000), (min + 1, -1)];
    for (start, end) in extremes {
        for method in ["ProfileTypes", "SelectMergeStacktraces", "SelectSeries"] {
            let body = serde_json::json!({
                "start": start.to_string(),
                "end": end.to_string(),
                "profileTypeID": "on-cpu:samples:count:cpu:nanoseconds",
                "labelSelector": "{service_name=\"shop\"}",
                "step": 1.0,
            });
            let (status, error) = env.error(method, json, body.to_string().into_bytes());
            assert_eq!(status, 400, "{method} {start}..{end}: {error}");
        }
        for route in ["flamegraph", "folded", "pprof", "svg", "top", "timeline", "overview", "changes"] {
            let url = format!("/api/v1/{route}?service=shop&name=host&from={start}&until={end}");
            let r = env.http.get(env.srv.url(&url)).bearer_auth(READER).send().unwrap();
            assert_eq!(r.status(), 400, "{url}: {}", r.text().unwrap());
        }
        let relative = format!("/api/v1/folded?service=shop&from=now-{}d&until=now", max / 2);
        let r = env.http.get(env.srv.url(&relative)).bearer_auth(READER).send().unwrap();
        assert_eq!(r.status(), 400, "{relative}");
    }
    for seconds in [min, max, -1] {
        let url = format!("/ingest?name=shop.cpu&from={seconds}&format=folded");
        let r = env.http.post(env.srv.url(&url)).bearer_auth(AGENT).body("main;a 1\n").send().unwrap();
        assert_eq!(r.status(), 400, "{url}: {}", r.text().unwrap());
    }
    assert!(!env.folded("service=shop").is_empty(), "the server stopped answering");
}

/// Span profiles: requests labelled with a `span_id` (as our agent reads custom labels,
/// sent as bundle3) answer `SelectMergeSpanProfile` with the stacks of the spans named,
/// and only theirs; in proto and in JSON.
#[test]
fn span_profiles_hold_the_named_spans_stacks() {
    use profiler_pprof::stacks::{BundleWriter, RequestsWriter, Writer};
    let env = Env::new();
    let mut window = Writer::default();
    window.framed(&["main", "checkout", "charge_card"], 30);
    window.framed(&["main", "checkout", "render"], 12);
    let mut requests = RequestsWriter::default();
    requests.request("span_id", "9a517183f26a089d", &[(0, 30)]);
    requests.request("span_id", "5a4fe264a9c987fe", &[(1, 12)]);
    let mut bundle = BundleWriter::default();
    bundle.part_with_requests("shop", "on-cpu", &[("host", "a")], &window.finish(), &[], &requests.finish());
    let r = env
        .http
        .post(env.srv.url(&format!("/api/v1/ingest?format=bundle3&from={}&batch_id=spans", env.from + 4 * MIN)))
        .bearer_auth(AGENT)
        .body(profiler_pprof::gzip(&bundle.finish()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());

    let request = |spans: &[&str]| SelectMergeSpanProfileRequest {
        profile_type_id: ON_CPU.into(),
        label_selector: "{service_name=\"shop\"}".into(),
        span_selector: spans.iter().map(|s| s.to_string()).collect(),
        start: env.from,
        end: env.until,
        ..Default::default()
    };
    let names = |r: SelectMergeSpanProfileResponse| {
        let fg = r.flamegraph.unwrap();
        (fg.total, fg.names)
    };
    let (total, found) = names(env.call("SelectMergeSpanProfile", &request(&["9a517183f26a089d"])));
    assert_eq!(total, 30);
    assert!(found.contains(&"charge_card".to_string()) && !found.contains(&"render".to_string()), "{found:?}");
    let (total, _) = names(env.call("SelectMergeSpanProfile", &request(&["9a517183f26a089d", "5a4fe264a9c987fe", "0000000000000000"])));
    assert_eq!(total, 42);
    let (total, _) = names(env.call("SelectMergeSpanProfile", &request(&["0000000000000000"])));
    assert_eq!(total, 0, "an unknown span has no stacks");
    // Grafana's JSON codec too.
    let body = json!({"profileTypeID": ON_CPU, "labelSelector": "{}", "spanSelector": ["5a4fe264a9c987fe"], "start": env.from.to_string(), "end": env.until.to_string()});
    let r = env.post("SelectMergeSpanProfile", "application/json", body.to_string().into_bytes());
    assert_eq!(r.status(), 200);
    let reply: Value = r.json().unwrap();
    assert_eq!(reply["flamegraph"]["total"], "12", "{reply}");
}
