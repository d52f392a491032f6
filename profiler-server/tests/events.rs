//! Change events on a real server.
//!
//! Deploys: a service's profiles switch from `version=1.4` to `version=1.5`,
//! which moves CPU into one function. The server notices the deploy, compares
//! the time after with the time before, and the outcome shows in
//! `/api/v1/events`, in `/metrics` and at a webhook; events survive a restart.
//!
//! Alerts: a rule over every service compares each period with the one
//! before; the service that regressed gets an event, the steady one none.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use common::sampled::{window, Rng, Workload, STEADY};
use common::Proc;
use serde_json::Value;

const WINDOW_MS: i64 = 2_000;

/// Accepts HTTP requests and sends each body down the channel.
fn webhook_receiver() -> (String, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (send, bodies) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
            let _ = send.send(String::from_utf8_lossy(&body).into_owned());
        }
    });
    (url, bodies)
}

fn get(p: &Proc, path: &str) -> String {
    reqwest::blocking::get(p.url(path)).unwrap().text().unwrap()
}

#[test]
fn a_new_version_is_compared_with_the_old_and_reported_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, bodies) = webhook_receiver();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!("[storage]\nwindow_ms = {WINDOW_MS}\n\n[deploys]\ncompare_secs = 40\ncheck_secs = 1\nwebhook = \"{hook}\"\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Proc::spawn(&data, &["--config", config.to_str().unwrap()]);
    let client = reqwest::blocking::Client::new();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let deployed_at = (now - 60_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    let mut rng = Rng(0xde91);
    // 40 s of 1.4 before the deploy, 40 s of 1.5 after it, on two hosts.
    for i in -20..20i64 {
        let at = deployed_at + i * WINDOW_MS;
        let (version, w) = if i < 0 { ("1.4", STEADY) } else { ("1.5", Workload { shifted: 0.08, ..STEADY }) };
        for host in ["h1", "h2"] {
            let (on, _) = window(&mut rng, w);
            let url = server.url(&format!(
                "/api/v1/ingest?service=shop&kind=on-cpu&format=folded&from={at}&label=host:{host}&label=version:{version}"
            ));
            let r = client.post(url).body(on).send().unwrap();
            assert_eq!(r.status(), 200);
        }
    }

    // The comparison is due at once: the deploy is a minute old.
    let hooked: Value = serde_json::from_str(&bodies.recv_timeout(Duration::from_secs(30)).expect("no webhook call")).unwrap();
    assert_eq!((&hooked["service"], &hooked["version"], &hooked["previous"]), (&"shop".into(), &"1.5".into(), &"1.4".into()));
    assert_eq!(hooked["at_ms"], deployed_at);
    let c = &hooked["comparison"];
    assert_eq!((c["base_from"].as_i64(), c["from"].as_i64(), c["until"].as_i64()), (Some(deployed_at - 40_000), Some(deployed_at), Some(deployed_at + 40_000)));
    assert!(c["regressions"].as_u64().unwrap() >= 1, "{c:#}");
    assert_eq!((&c["top"][0]["function"], &c["top"][0]["direction"]), (&"hot_loop".into(), &"regression".into()), "{c:#}");

    let events: Value = serde_json::from_str(&get(&server, "/api/v1/events?service=shop")).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 1, "{events:#}");
    assert_eq!(events[0], hooked);
    assert_eq!(get(&server, "/api/v1/events?service=other"), "[]");
    let metrics = get(&server, "/metrics");
    assert!(metrics.contains("profiler_deploys_total 1\n"), "{metrics}");
    let regressions = c["regressions"].as_u64().unwrap();
    assert!(metrics.contains(&format!("profiler_deploy_regressions{{service=\"shop\"}} {regressions}\n")), "{metrics}");

    // Kept across a restart, and not compared or sent again.
    server.terminate();
    let server = Proc::spawn(&data, &["--config", config.to_str().unwrap()]);
    let events: Value = serde_json::from_str(&get(&server, "/api/v1/events")).unwrap();
    assert_eq!(events[0], hooked);
    assert!(bodies.recv_timeout(Duration::from_secs(3)).is_err());
}

#[test]
fn an_alert_rule_flags_the_service_that_regressed_and_not_the_steady_one() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, bodies) = webhook_receiver();
    let config = dir.path().join("server.toml");
    let every_ms = 600_000i64;
    std::fs::write(
        &config,
        format!(
            "[storage]\nwindow_ms = {WINDOW_MS}\n\n[deploys]\ncheck_secs = 1\nwebhook = \"{hook}\"\n\n\
             [[alerts]]\nname = \"every 10 min\"\nservice = \"*\"\nevery_secs = {}\nbaseline = \"previous\"\n",
            every_ms / 1000
        ),
    )
    .unwrap();
    // The server compares the last period that ended a grace of two windows ago: stay
    // clear of a period boundary while the data goes in.
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let into = (now() - 2 * WINDOW_MS).rem_euclid(every_ms);
    if into > every_ms - 60_000 {
        std::thread::sleep(Duration::from_millis((every_ms - into + 1_000) as u64));
    }
    let period_end = (now() - 2 * WINDOW_MS).div_euclid(every_ms) * every_ms;
    let data = dir.path().join("data");
    // The data goes in first, so no check runs over half of it.
    let loader = Proc::spawn(&data, &[]);
    let client = reqwest::blocking::Client::new();
    let mut rng = Rng(0xa1e7);
    // Two periods, one observation window every 20 s: checkout regresses in the second.
    for i in 0..60i64 {
        let at = period_end - 2 * every_ms + i * 20_000;
        for (service, w) in [("checkout", if i < 30 { STEADY } else { Workload { shifted: 0.08, ..STEADY } }), ("search", STEADY)] {
            let (on, _) = window(&mut rng, w);
            let url = loader.url(&format!("/api/v1/ingest?service={service}&kind=on-cpu&format=folded&from={at}&label=host:h1"));
            assert_eq!(client.post(url).body(on).send().unwrap().status(), 200);
        }
    }
    loader.terminate();
    let server = Proc::spawn(&data, &["--config", config.to_str().unwrap()]);
    let hooked: Value = serde_json::from_str(&bodies.recv_timeout(Duration::from_secs(30)).expect("no webhook call")).unwrap();
    assert_eq!((&hooked["kind"], &hooked["alert"], &hooked["service"]), (&"alert".into(), &"every 10 min".into(), &"checkout".into()));
    let c = &hooked["comparison"];
    assert_eq!((c["from"].as_i64(), c["until"].as_i64(), c["base_from"].as_i64()), (Some(period_end - every_ms), Some(period_end), Some(period_end - 2 * every_ms)));
    assert_eq!(c["top"][0]["function"], "hot_loop", "{c:#}");
    // Once per period: no second event, none for the steady service.
    assert!(bodies.recv_timeout(Duration::from_secs(3)).is_err());
    let events: Value = serde_json::from_str(&get(&server, "/api/v1/events")).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 1, "{events:#}");
    let metrics = get(&server, "/metrics");
    let regressions = c["regressions"].as_u64().unwrap();
    assert!(metrics.contains(&format!("profiler_alert_regressions{{alert=\"every 10 min\",service=\"checkout\"}} {regressions}\n")), "{metrics}");
    assert!(metrics.contains("profiler_alert_regressions{alert=\"every 10 min\",service=\"search\"} 0\n"), "{metrics}");
}
