//! OTLP profiles built with the official definitions (opentelemetry-proto),
//! over HTTP and gRPC: totals, labels, trace links, retries, and a clear
//! refusal of other layouts and versions.

use crate::common;

use common::{client, now_ms, Proc};
use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_client::ProfilesServiceClient;
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::profiles::v1development::{
    Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile, ProfilesDictionary,
    ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

const TRACE: [u8; 16] = [0xab; 16];
const SPAN: [u8; 8] = [0x0c; 8];

fn text(s: &str) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(Value::StringValue(s.into())),
    })
}

/// `main;handle;db_query` 3 samples (linked to a trace, on thread worker-1)
/// and `main;handle` 2 samples, at 10 ms per sample.
fn request(service: &str, profile_id: u8) -> ExportProfilesServiceRequest {
    let strings = [
        "",
        "samples",
        "count",
        "cpu",
        "nanoseconds",
        "main",
        "handle",
        "db_query",
        "thread.name",
    ];
    let function = |name: i32| Function {
        name_strindex: name,
        ..Function::default()
    };
    let location = |f: i32| Location {
        lines: vec![Line {
            function_index: f,
            ..Line::default()
        }],
        ..Location::default()
    };
    let dictionary = ProfilesDictionary {
        string_table: strings.iter().map(|s| s.to_string()).collect(),
        mapping_table: vec![Mapping::default()],
        function_table: vec![Function::default(), function(5), function(6), function(7)],
        location_table: vec![Location::default(), location(1), location(2), location(3)],
        stack_table: vec![
            Stack::default(),
            Stack {
                location_indices: vec![3, 2, 1],
            },
            Stack {
                location_indices: vec![2, 1],
            },
        ],
        link_table: vec![
            Link::default(),
            Link {
                trace_id: TRACE.to_vec(),
                span_id: SPAN.to_vec(),
            },
        ],
        attribute_table: vec![
            KeyValueAndUnit::default(),
            KeyValueAndUnit {
                key_strindex: 8,
                value: text("worker-1"),
                unit_strindex: 0,
            },
        ],
    };
    let profile = Profile {
        sample_type: Some(ValueType {
            type_strindex: 1,
            unit_strindex: 2,
        }),
        period_type: Some(ValueType {
            type_strindex: 3,
            unit_strindex: 4,
        }),
        period: 10_000_000,
        time_unix_nano: now_ms() as u64 * 1_000_000,
        duration_nano: 10_000_000_000,
        profile_id: vec![profile_id; 16],
        samples: vec![
            Sample {
                stack_index: 1,
                values: vec![3],
                link_index: 1,
                attribute_indices: vec![1],
                ..Sample::default()
            },
            Sample {
                stack_index: 2,
                values: vec![2],
                ..Sample::default()
            },
        ],
        ..Profile::default()
    };
    let attribute = |k: &str, v: &str| KeyValue {
        key: k.into(),
        value: text(v),
        ..KeyValue::default()
    };
    ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles {
            resource: Some(Resource {
                attributes: vec![
                    attribute("service.name", service),
                    attribute("host.name", "h1"),
                ],
                ..Resource::default()
            }),
            scope_profiles: vec![ScopeProfiles {
                profiles: vec![profile],
                ..ScopeProfiles::default()
            }],
            ..ResourceProfiles::default()
        }],
        dictionary: Some(dictionary),
    }
}

#[test]
fn otlp_profiles_over_http_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &["--token", "t"]);
    let c = client();
    let t0 = now_ms();
    let post = |path: &str, body: Vec<u8>| {
        c.post(srv.url(path))
            .bearer_auth("t")
            .header("content-type", "application/x-protobuf")
            .body(body)
            .send()
            .unwrap()
    };
    let r = post(
        "/v1development/profiles",
        request("otel-http", 1).encode_to_vec(),
    );
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    // A retry of the same profile id is counted once.
    assert_eq!(
        post(
            "/v1development/profiles",
            request("otel-http", 1).encode_to_vec()
        )
        .status(),
        200
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut grpc = ProfilesServiceClient::connect(srv.base.clone())
            .await
            .unwrap();
        let mut call = tonic::Request::new(request("otel-grpc", 2));
        call.metadata_mut()
            .insert("authorization", "Bearer t".parse().unwrap());
        grpc.export(call).await.expect("gRPC export");
        let unauthenticated = grpc
            .export(tonic::Request::new(request("otel-grpc", 3)))
            .await
            .unwrap_err();
        assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    });

    let range = format!("from={}&until={}", t0 - 60_000, t0 + 60_000);
    let get = |q: &str| {
        c.get(srv.url(&format!("/api/v1/folded?{q}&{range}")))
            .send()
            .unwrap()
            .text()
            .unwrap()
    };
    for service in ["otel-http", "otel-grpc"] {
        assert_eq!(
            get(&format!("service={service}&kinds=cpu")),
            "main;handle 20000000\nmain;handle;db_query 30000000\n",
            "{service}: samples x 10 ms period, as cpu"
        );
    }
    // A profile id of zero bytes is no id: two such profiles are two profiles, not a
    // profile and its retry.
    for _ in 0..2 {
        let r = post("/v1development/profiles", request("otel-zero-id", 0).encode_to_vec());
        assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    }
    assert_eq!(
        get("service=otel-zero-id&kinds=cpu"),
        "main;handle 40000000\nmain;handle;db_query 60000000\n"
    );
    // Counts with no period are not CPU time: stored as counts, under `samples`.
    let mut counts = request("otel-counts", 7);
    counts.resource_profiles[0].scope_profiles[0].profiles[0].period = 0;
    let r = post("/v1development/profiles", counts.encode_to_vec());
    assert_eq!(r.status(), 200, "{}", r.text().unwrap());
    assert_eq!(get("service=otel-counts&kinds=cpu"), "");
    assert_eq!(get("service=otel-counts&kinds=samples"), "main;handle 2\nmain;handle;db_query 3\n");
    let trace: String = TRACE.iter().map(|b| format!("{b:02x}")).collect();
    let span: String = SPAN.iter().map(|b| format!("{b:02x}")).collect();
    // Trace links name requests, not series: each id is a request of the request
    // table, with the linked samples' time and stacks.
    for (key, id) in [("trace_id", &trace), ("span_id", &span)] {
        let table: serde_json::Value = c
            .get(srv.url(&format!("/api/v1/requests?service=otel-http&{range}&request_key={key}")))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(table["count"], 1, "{table}");
        assert_eq!(table["requests"][0]["value"], id.as_str());
        assert_eq!(table["requests"][0]["total_ns"], 30_000_000);
        assert_eq!(
            get(&format!("service=otel-http&requests=slowest:100&request_key={key}")),
            "main;handle;db_query 30000000\n"
        );
    }
    let names: Vec<String> = c.get(srv.url("/api/v1/labels?service=otel-http")).send().unwrap().json().unwrap();
    assert!(!names.iter().any(|n| n == "trace_id" || n == "span_id"), "{names:?}");
    assert_eq!(
        get("service=otel-http&filter=thread.name=worker-1"),
        "main;handle;db_query 30000000\n"
    );
    let hosts: Vec<String> = c
        .get(srv.url("/api/v1/label_values?service=otel-http&name=host.name"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(hosts, ["h1"]);

    // An earlier development layout (tables per profile, no shared dictionary).
    let mut old = request("otel-http", 4);
    old.dictionary = None;
    let r = post("/v1development/profiles", old.encode_to_vec());
    assert_eq!(r.status(), 400);
    assert!(r.text().unwrap().contains("opentelemetry-proto v1.10.0"));
    let r = post(
        "/v1experimental/profiles",
        request("otel-http", 5).encode_to_vec(),
    );
    assert_eq!(r.status(), 404);
    assert!(r.text().unwrap().contains("/v1development/profiles"));
    let r = c
        .post(srv.url("/v1development/profiles"))
        .bearer_auth("t")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 415);
}
