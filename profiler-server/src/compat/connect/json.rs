//! The proto3 JSON form (Connect's `application/json`) of the Pyroscope
//! messages the server reads and writes (push and querier).
//!
//! Field names are the proto `json_name`s (lowerCamelCase: `profileTypeID`,
//! `labelSelector`); requests may also use the proto names, as proto3 JSON
//! parsers accept both. 64-bit integers are written as strings and read from
//! strings or numbers; enums are read by name or number.

use base64::Engine as _;
use profiler_pprof::pyroscope::push::v1 as push;
use profiler_pprof::pyroscope::querier::v1 as querier;
use profiler_pprof::pyroscope::types::v1 as types;
use serde_json::{json, Map, Value};

pub trait FromJson: Sized {
    fn from_json(fields: &Fields) -> Result<Self, String>;
}

pub trait ToJson {
    fn to_json(&self) -> Value;
}

pub fn decode<M: FromJson>(body: &[u8]) -> Result<M, String> {
    match serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))? {
        Value::Object(map) => M::from_json(&Fields(&map)),
        _ => Err("the request must be a JSON object".into()),
    }
}

/// A JSON object's fields, read by (json name, proto name).
pub struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    /// Null reads as absent, as in proto3 JSON.
    fn get(&self, (json, proto): (&str, &str)) -> Option<&Value> {
        self.0
            .get(json)
            .or_else(|| self.0.get(proto))
            .filter(|v| !v.is_null())
    }

    fn string(&self, name: (&str, &str)) -> Result<String, String> {
        match self.get(name) {
            None => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(format!("`{}` must be a string, not {v}", name.0)),
        }
    }

    fn strings(&self, name: (&str, &str)) -> Result<Vec<String>, String> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(format!("`{}` must hold strings, not {v}", name.0)),
                })
                .collect(),
            Some(v) => Err(format!("`{}` must be an array of strings, not {v}", name.0)),
        }
    }

    fn int64(&self, name: (&str, &str)) -> Result<Option<i64>, String> {
        let bad = |v: &Value| format!("`{}` must be a 64-bit integer, not {v}", name.0);
        match self.get(name) {
            None => Ok(None),
            Some(v @ Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| bad(v)),
            Some(v @ Value::String(s)) => s.parse().map(Some).map_err(|_| bad(v)),
            Some(v) => Err(bad(v)),
        }
    }

    fn double(&self, name: (&str, &str)) -> Result<f64, String> {
        let bad = |v: &Value| format!("`{}` must be a number, not {v}", name.0);
        match self.get(name) {
            None => Ok(0.0),
            Some(v @ Value::Number(n)) => n.as_f64().ok_or_else(|| bad(v)),
            Some(v @ Value::String(s)) => match s.as_str() {
                "NaN" => Ok(f64::NAN),
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                s => s.parse().map_err(|_| bad(v)),
            },
            Some(v) => Err(bad(v)),
        }
    }

    /// An enum by name (`from_name`) or number.
    fn enumeration(
        &self,
        name: (&str, &str),
        from_name: fn(&str) -> Option<i32>,
    ) -> Result<Option<i32>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => from_name(s)
                .map(Some)
                .ok_or_else(|| format!("`{}`: unknown value {s:?}", name.0)),
            Some(v @ Value::Number(n)) => n
                .as_i64()
                .and_then(|n| i32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| format!("`{}`: {v} is not an enum number", name.0)),
            Some(v) => Err(format!(
                "`{}` must be an enum name or number, not {v}",
                name.0
            )),
        }
    }

    /// Bytes, base64 as proto3 JSON writes them (standard or URL-safe).
    fn bytes(&self, name: (&str, &str)) -> Result<Vec<u8>, String> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => base64::engine::general_purpose::STANDARD
                .decode(s)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(s))
                .map_err(|e| format!("`{}` is not base64: {e}", name.0)),
            Some(v) => Err(format!("`{}` must be a base64 string, not {v}", name.0)),
        }
    }

    /// A repeated message field.
    fn messages<M: FromJson>(&self, name: (&str, &str)) -> Result<Vec<M>, String> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::Object(map) => M::from_json(&Fields(map)),
                    v => Err(format!("`{}` must hold objects, not {v}", name.0)),
                })
                .collect(),
            Some(v) => Err(format!("`{}` must be an array, not {v}", name.0)),
        }
    }

    fn object(&self, name: (&str, &str)) -> Result<Option<Fields<'_>>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields(map))),
            Some(v) => Err(format!("`{}` must be an object, not {v}", name.0)),
        }
    }
}

fn int64(v: i64) -> Value {
    Value::String(v.to_string())
}

fn label_pairs(labels: &[types::LabelPair]) -> Value {
    labels
        .iter()
        .map(|l| json!({ "name": l.name, "value": l.value }))
        .collect()
}

impl FromJson for push::PushRequest {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            series: f.messages(("series", "series"))?,
        })
    }
}

impl FromJson for push::RawProfileSeries {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            labels: f.messages(("labels", "labels"))?,
            samples: f.messages(("samples", "samples"))?,
        })
    }
}

impl FromJson for push::RawSample {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            raw_profile: f.bytes(("rawProfile", "raw_profile"))?,
            id: f.string(("ID", "ID"))?,
        })
    }
}

impl FromJson for types::LabelPair {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            name: f.string(("name", "name"))?,
            value: f.string(("value", "value"))?,
        })
    }
}

impl FromJson for querier::ProfileTypesRequest {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            start: f.int64(("start", "start"))?.unwrap_or(0),
            end: f.int64(("end", "end"))?.unwrap_or(0),
        })
    }
}

impl FromJson for types::LabelNamesRequest {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            matchers: f.strings(("matchers", "matchers"))?,
            start: f.int64(("start", "start"))?.unwrap_or(0),
            end: f.int64(("end", "end"))?.unwrap_or(0),
        })
    }
}

impl FromJson for types::LabelValuesRequest {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            name: f.string(("name", "name"))?,
            matchers: f.strings(("matchers", "matchers"))?,
            start: f.int64(("start", "start"))?.unwrap_or(0),
            end: f.int64(("end", "end"))?.unwrap_or(0),
        })
    }
}

impl FromJson for querier::SeriesRequest {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            matchers: f.strings(("matchers", "matchers"))?,
            label_names: f.strings(("labelNames", "label_names"))?,
            start: f.int64(("start", "start"))?.unwrap_or(0),
            end: f.int64(("end", "end"))?.unwrap_or(0),
        })
    }
}

impl FromJson for types::StackTraceSelector {
    fn from_json(f: &Fields) -> Result<Self, String> {
        let call_site = match f.get(("callSite", "call_site")) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::Object(map) => Ok(types::Location {
                        name: Fields(map).string(("name", "name"))?,
                    }),
                    v => Err(format!("`callSite` must hold objects, not {v}")),
                })
                .collect::<Result<_, String>>()?,
            Some(v) => return Err(format!("`callSite` must be an array, not {v}")),
        };
        let go_pgo = f
            .object(("goPgo", "go_pgo"))?
            .map(|_| types::GoPgo::default());
        Ok(Self { call_site, go_pgo })
    }
}

fn stack_trace_selector(f: &Fields) -> Result<Option<types::StackTraceSelector>, String> {
    f.object(("stackTraceSelector", "stack_trace_selector"))?
        .map(|s| types::StackTraceSelector::from_json(&s))
        .transpose()
}

impl FromJson for querier::SelectMergeStacktracesRequest {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            profile_type_id: f.string(("profileTypeID", "profile_typeID"))?,
            label_selector: f.string(("labelSelector", "label_selector"))?,
            start: f.int64(("start", "start"))?.unwrap_or(0),
            end: f.int64(("end", "end"))?.unwrap_or(0),
            max_nodes: f.int64(("maxNodes", "max_nodes"))?,
            format: profile_format(f)?,
            stack_trace_selector: stack_trace_selector(f)?,
            profile_id_selector: f.strings(("profileIdSelector", "profile_id_selector"))?,
            trace_id_selector: f.strings(("traceIdSelector", "trace_id_selector"))?,
            span_selector: f.strings(("spanSelector", "span_selector"))?,
        })
    }
}

/// A request's `format` (a `ProfileFormat` name); unspecified when absent.
fn profile_format(f: &Fields) -> Result<i32, String> {
    Ok(f.enumeration(("format", "format"), |n| querier::ProfileFormat::from_str_name(n).map(|e| e as i32))?.unwrap_or(0))
}

impl FromJson for querier::SelectMergeSpanProfileRequest {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            profile_type_id: f.string(("profileTypeID", "profile_typeID"))?,
            label_selector: f.string(("labelSelector", "label_selector"))?,
            span_selector: f.strings(("spanSelector", "span_selector"))?,
            start: f.int64(("start", "start"))?.unwrap_or(0),
            end: f.int64(("end", "end"))?.unwrap_or(0),
            max_nodes: f.int64(("maxNodes", "max_nodes"))?,
            format: profile_format(f)?,
        })
    }
}

impl FromJson for querier::SelectSeriesRequest {
    fn from_json(f: &Fields) -> Result<Self, String> {
        Ok(Self {
            profile_type_id: f.string(("profileTypeID", "profile_typeID"))?,
            label_selector: f.string(("labelSelector", "label_selector"))?,
            start: f.int64(("start", "start"))?.unwrap_or(0),
            end: f.int64(("end", "end"))?.unwrap_or(0),
            group_by: f.strings(("groupBy", "group_by"))?,
            step: f.double(("step", "step"))?,
            aggregation: f.enumeration(("aggregation", "aggregation"), |n| {
                types::TimeSeriesAggregationType::from_str_name(n).map(|e| e as i32)
            })?,
            stack_trace_selector: stack_trace_selector(f)?,
            limit: f.int64(("limit", "limit"))?,
        })
    }
}

impl ToJson for querier::ProfileTypesResponse {
    fn to_json(&self) -> Value {
        let types: Vec<Value> = self
            .profile_types
            .iter()
            .map(|t| {
                json!({
                    "ID": t.id,
                    "name": t.name,
                    "sampleType": t.sample_type,
                    "sampleUnit": t.sample_unit,
                    "periodType": t.period_type,
                    "periodUnit": t.period_unit,
                })
            })
            .collect();
        json!({ "profileTypes": types })
    }
}

impl ToJson for types::LabelNamesResponse {
    fn to_json(&self) -> Value {
        json!({ "names": self.names })
    }
}

impl ToJson for types::LabelValuesResponse {
    fn to_json(&self) -> Value {
        json!({ "names": self.names })
    }
}

impl ToJson for querier::SeriesResponse {
    fn to_json(&self) -> Value {
        let sets: Vec<Value> = self
            .labels_set
            .iter()
            .map(|s| json!({ "labels": label_pairs(&s.labels) }))
            .collect();
        json!({ "labelsSet": sets })
    }
}

impl ToJson for querier::SelectMergeStacktracesResponse {
    fn to_json(&self) -> Value {
        flamegraph_json(self.flamegraph.as_ref())
    }
}

impl ToJson for querier::SelectMergeSpanProfileResponse {
    fn to_json(&self) -> Value {
        flamegraph_json(self.flamegraph.as_ref())
    }
}

/// `{"flamegraph": …}`, or `{}` without one.
fn flamegraph_json(fg: Option<&querier::FlameGraph>) -> Value {
    let Some(fg) = fg else {
        return json!({});
    };
    let levels: Vec<Value> = fg
        .levels
        .iter()
        .map(|l| json!({ "values": l.values.iter().copied().map(int64).collect::<Vec<_>>() }))
        .collect();
    json!({
        "flamegraph": {
            "names": fg.names,
            "levels": levels,
            "total": int64(fg.total),
            "maxSelf": int64(fg.max_self),
        }
    })
}

impl ToJson for querier::SelectSeriesResponse {
    fn to_json(&self) -> Value {
        let series: Vec<Value> = self
            .series
            .iter()
            .map(|s| {
                let points: Vec<Value> = s
                    .points
                    .iter()
                    .map(|p| json!({ "value": p.value, "timestamp": int64(p.timestamp) }))
                    .collect();
                json!({ "labels": label_pairs(&s.labels), "points": points })
            })
            .collect();
        json!({ "series": series })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_json_and_proto_names_and_integers_as_strings() {
        let r: querier::SelectMergeStacktracesRequest = decode(
            br#"{"profileTypeID": "on-cpu:on-cpu:nanoseconds:cpu:nanoseconds", "label_selector": "{}",
                 "start": "1000", "end": 2000, "maxNodes": null, "format": "PROFILE_FORMAT_FLAMEGRAPH"}"#,
        )
        .unwrap();
        assert_eq!(
            r.profile_type_id,
            "on-cpu:on-cpu:nanoseconds:cpu:nanoseconds"
        );
        assert_eq!(r.label_selector, "{}");
        assert_eq!((r.start, r.end, r.max_nodes), (1000, 2000, None));
        assert_eq!(r.format, querier::ProfileFormat::Flamegraph as i32);
        let r: querier::SelectSeriesRequest =
            decode(br#"{"step": 15, "groupBy": ["host"], "aggregation": 1, "stackTraceSelector": {"callSite": [{"name": "main"}]}}"#)
                .unwrap();
        assert_eq!(
            (r.step, r.group_by.as_slice(), r.aggregation),
            (15.0, &["host".to_string()][..], Some(1))
        );
        assert_eq!(r.stack_trace_selector.unwrap().call_site[0].name, "main");
        for bad in [
            &br#"[]"#[..],
            br#"{"start": "x"}"#,
            br#"{"start": 1.5}"#,
            br#"{"format": "NOPE"}"#,
            b"{",
        ] {
            assert!(decode::<querier::SelectMergeStacktracesRequest>(bad).is_err());
        }
    }

    #[test]
    fn responses_use_json_names() {
        let r = querier::SelectMergeStacktracesResponse {
            flamegraph: Some(querier::FlameGraph {
                names: vec!["total".into()],
                levels: vec![querier::Level {
                    values: vec![0, 5, 0, 0],
                }],
                total: 5,
                max_self: 0,
            }),
        };
        assert_eq!(
            r.to_json(),
            json!({"flamegraph": {"names": ["total"], "levels": [{"values": ["0", "5", "0", "0"]}], "total": "5", "maxSelf": "0"}})
        );
    }
}
