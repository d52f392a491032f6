//! Profiles that are small on the wire but huge once decoded are refused
//! before they are decoded: eight at a time, each answered 4xx within 2 s,
//! while the server's peak RSS stays under 512 MB and queries keep working.

use crate::common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{client, now_ms, Proc};

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field `number` of wire type 2 holding `body`.
fn field(out: &mut Vec<u8>, number: u64, body: &[u8]) {
    varint(out, number << 3 | 2);
    varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

fn gzip(raw: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(raw).unwrap();
    enc.finish().unwrap()
}

/// A valid header: sample type `cpu`/`nanoseconds`, function 1 named by
/// string 3, location 1 calling it.
fn header(names: &[&[u8]]) -> Vec<u8> {
    let mut p = Vec::new();
    field(&mut p, 1, &[0x08, 0x01, 0x10, 0x02]);
    for s in [b"".as_slice(), b"cpu", b"nanoseconds"].iter().chain(names) {
        field(&mut p, 6, s);
    }
    field(&mut p, 5, &[0x08, 0x01, 0x10, 0x03]);
    field(&mut p, 4, &[0x08, 0x01, 0x22, 0x02, 0x08, 0x01]);
    p
}

/// 15M empty samples: 30 MB on the wire, over 1 GB decoded.
fn empty_samples() -> Vec<u8> {
    let mut p = header(&[b"main"]);
    p.reserve(30 << 20);
    for _ in 0..15_000_000 {
        p.extend_from_slice(&[0x12, 0x00]);
    }
    gzip(&p)
}

/// One sample repeating location 1 thirty million times: 30 MB packed on
/// the wire, 240 MB as ids, and once a frame name per id.
fn repeated_locations() -> Vec<u8> {
    let mut p = header(&[b"main"]);
    let mut sample = Vec::new();
    field(&mut sample, 1, &vec![1u8; 30_000_000]);
    sample.extend_from_slice(&[0x10, 0x01]);
    field(&mut p, 2, &sample);
    gzip(&p)
}

/// A frame name of 30 MB.
fn huge_name() -> Vec<u8> {
    let name = vec![b'x'; 30 << 20];
    let mut p = header(&[&name]);
    field(&mut p, 2, &[0x0a, 0x01, 0x01, 0x10, 0x01]);
    gzip(&p)
}

fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

/// Posts `body` to `route` eight times at once, with `headers`, and checks that the
/// folded export of `victim` (stored at `t0` as `main;work 10`) still answers while they
/// are in flight; returns each answer's status, text and time.
fn eight_at_once(
    srv: &Proc,
    c: &reqwest::blocking::Client,
    t0: i64,
    route: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<(u16, String, Duration)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (c, url) = (c.clone(), srv.url(route));
                s.spawn(move || {
                    let start = Instant::now();
                    let mut request = c.post(url);
                    for (name, value) in headers {
                        request = request.header(*name, *value);
                    }
                    let r = request.body(body.to_vec()).send().unwrap();
                    let status = r.status().as_u16();
                    (status, r.text().unwrap(), start.elapsed())
                })
            })
            .collect();
        // Queries keep working while the bombs are in flight.
        let q = c
            .get(srv.url(&format!(
                "/api/v1/folded?service=victim&from={}&until={}",
                t0 - 60_000,
                t0 + 60_000
            )))
            .send()
            .unwrap();
        assert_eq!(q.status(), 200);
        assert_eq!(q.text().unwrap(), "main;work 10\n");
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn amplification_bombs_are_refused_within_a_memory_cap() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &[]);
    let c = client();
    let t0 = now_ms();
    let good = profiler_pprof::encode_gzip(&profiler_pprof::from_folded(
        &[(vec!["main".into(), "work".into()], 10)],
        "cpu",
        "nanoseconds",
        1,
    ));
    let r = c
        .post(srv.url(&format!("/api/v1/ingest?service=victim&from={t0}")))
        .body(good)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    let bombs = [
        ("empty samples", empty_samples(), "once decoded"),
        (
            "repeated location ids",
            repeated_locations(),
            "once decoded",
        ),
        ("huge name", huge_name(), "a string of"),
    ];
    for (name, body, _) in &bombs {
        assert!(
            body.len() < 1 << 20,
            "{name} is {} bytes on the wire",
            body.len()
        );
    }
    for (name, body, reason) in &bombs {
        for (status, text, took) in eight_at_once(&srv, &c, t0, "/api/v1/ingest?service=bomb", &[], body) {
            assert_eq!(status, 413, "{name}: {text}");
            assert!(text.contains(reason), "{name}: {text}");
            assert!(
                took < Duration::from_secs(2),
                "{name}: answered after {took:?}"
            );
        }
        let rss = peak_rss_mb(srv.child.id());
        println!("{name}: 8 concurrent bombs refused; server peak RSS so far {rss} MB");
        assert!(rss < 512, "{name}: peak RSS {rss} MB");
    }
    let services: Vec<String> = c
        .get(srv.url("/api/v1/services"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(services, ["victim"], "nothing of the bombs was stored");
}

/// `n` copies of `unit`, gzipped.
fn repeated(unit: &[u8], n: usize) -> Vec<u8> {
    gzip(&unit.repeat(n))
}

/// An OTLP request of `profiles` profiles, each with one sample of an empty stack,
/// sharing a dictionary of `strings` strings: small on the wire, and converting it
/// with a copy of the dictionary per profile asked for `profiles` × `strings`.
fn otlp_dictionary_bomb(
    profiles: usize,
    strings: usize,
) -> opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest {
    use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
    use opentelemetry_proto::tonic::profiles::v1development::{
        Profile, ProfilesDictionary, ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
    };
    let profile = Profile {
        sample_type: Some(ValueType { type_strindex: 1, unit_strindex: 1 }),
        samples: vec![Sample { stack_index: 0, values: vec![1], ..Sample::default() }],
        ..Profile::default()
    };
    let mut string_table = vec![String::new()];
    string_table.extend(std::iter::repeat_n("x".to_string(), strings));
    ExportProfilesServiceRequest {
        resource_profiles: vec![ResourceProfiles {
            scope_profiles: vec![ScopeProfiles {
                profiles: vec![profile; profiles],
                ..ScopeProfiles::default()
            }],
            ..ResourceProfiles::default()
        }],
        dictionary: Some(ProfilesDictionary {
            string_table,
            stack_table: vec![Stack::default()],
            ..ProfilesDictionary::default()
        }),
    }
}

/// Every ingest route, each with a bomb of at most 64 KB on the wire, eight at once:
/// each refused (4xx, or 503 when the memory budget is taken), none stored, the
/// server's peak RSS under 512 MiB, and queries answering while the bombs land.
#[test]
fn every_ingest_route_refuses_bombs_within_a_memory_cap() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Proc::spawn(dir.path(), &[]);
    let c = client();
    let t0 = now_ms();
    let r = c
        .post(srv.url(&format!("/api/v1/ingest?service=victim&format=folded&kind=cpu&from={t0}")))
        .body("main;work 10\n")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    // 40 MB of text or zeros: over the 32 MiB a body may decompress to.
    let zeros = repeated(&[0], 40 << 20);
    let folded = repeated(b"a", 40 << 20);
    let otlp_request = otlp_dictionary_bomb(200_000, 50_000);
    let otlp = gzip(&prost::Message::encode_to_vec(&otlp_request));
    let bombs: Vec<(&str, String, &str, Vec<u8>)> = vec![
        ("pprof, empty samples", "/api/v1/ingest?service=bomb".into(), "application/octet-stream", empty_samples()),
        ("folded, decompression", "/api/v1/ingest?service=bomb&kind=cpu&format=folded".into(), "text/plain", folded.clone()),
        ("stacks, decompression", "/api/v1/ingest?service=bomb&kind=cpu&format=stacks".into(), "application/octet-stream", zeros.clone()),
        ("bundle, decompression", "/api/v1/ingest?format=bundle".into(), "application/octet-stream", zeros.clone()),
        ("Pyroscope /ingest, folded", "/ingest?name=bomb.cpu&format=folded".into(), "text/plain", folded.clone()),
        (
            "Pyroscope push, empty series",
            "/push.v1.PusherService/Push".into(),
            "application/proto",
            repeated(&[0x0a, 0x00], 16 << 20),
        ),
        ("Pyroscope push JSON, empty series", "/push.v1.PusherService/Push".into(), "application/json", {
            let mut json = b"{\"series\":[".to_vec();
            json.extend_from_slice(&b"{},".repeat(10 << 20));
            json.extend_from_slice(b"{}]}");
            gzip(&json)
        }),
        ("OTLP over HTTP, profiles x dictionary", "/v1development/profiles".into(), "application/x-protobuf", otlp),
    ];
    for (name, _, _, body) in &bombs {
        assert!(body.len() <= 64 << 10, "{name} is {} bytes on the wire", body.len());
    }
    for (name, route, content_type, body) in &bombs {
        let headers = [("content-type", *content_type), ("content-encoding", "gzip")];
        for (status, text, _) in eight_at_once(&srv, &c, t0, route, &headers, body) {
            assert!((400..500).contains(&status) || status == 503, "{name}: {status} {text}");
        }
        let rss = peak_rss_mb(srv.child.id());
        println!("{name}: 8 concurrent bombs refused; server peak RSS so far {rss} MB");
        assert!(rss < 512, "{name}: peak RSS {rss} MB");
    }

    // OTLP over gRPC, gzip-compressed by the client as OTel exporters do.
    let request = otlp_request;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let codes: Vec<tonic::Code> = runtime.block_on(async {
        let calls = (0..8).map(|_| {
            let (request, base) = (request.clone(), srv.base.clone());
            tokio::spawn(async move {
                use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_client::ProfilesServiceClient;
                let mut grpc = ProfilesServiceClient::connect(base)
                    .await
                    .unwrap()
                    .send_compressed(tonic::codec::CompressionEncoding::Gzip);
                grpc.export(tonic::Request::new(request)).await.map_or_else(|e| e.code(), |_| tonic::Code::Ok)
            })
        });
        let mut codes = Vec::new();
        for call in calls.collect::<Vec<_>>() {
            codes.push(call.await.unwrap());
        }
        codes
    });
    assert!(codes.iter().all(|&code| code != tonic::Code::Ok), "OTLP over gRPC: {codes:?}");
    let rss = peak_rss_mb(srv.child.id());
    println!("OTLP over gRPC: 8 concurrent bombs refused ({codes:?}); server peak RSS {rss} MB");
    assert!(rss < 512, "OTLP over gRPC: peak RSS {rss} MB");

    let services: Vec<String> = c.get(srv.url("/api/v1/services")).send().unwrap().json().unwrap();
    assert_eq!(services, ["victim"], "nothing of the bombs was stored");
}
