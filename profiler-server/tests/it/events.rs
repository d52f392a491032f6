//! Change events on a real server.
//!
//! Deploys: a service's profiles switch from `version=1.4` to `version=1.5`,
//! which moves CPU into one function. The server notices the deploy, compares
//! the time after with the time before, and the outcome shows in
//! `/api/v1/events`, in `/metrics` and at a webhook; events survive a restart.
//!
//! Alerts: a rule over every service compares each period with the one
//! before; the service that regressed gets an event, the steady one none.
//! Rules made through the API run the same way, survive a restart, and leave
//! the config file's rules alone.

use crate::common;

use std::time::Duration;

use common::sampled::{window, Rng, Workload, STEADY};
use common::Proc;
use profiler_tests::{failing_webhook_receiver, free_port, webhook_receiver};
use serde_json::Value;

const WINDOW_MS: i64 = 2_000;

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

/// Unix ms now.
fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

const EVERY_MS: i64 = 600_000;

/// Stores two 10-minute periods of `checkout` and `search` (one observation window
/// every 20 s), checkout regressing in the second, and returns the end of that period:
/// the last one a server checking now compares.
fn two_periods(data: &std::path::Path) -> i64 {
    // The server compares the last period that ended a grace of two windows ago: stay
    // clear of a period boundary while the data goes in.
    let into = (now() - 2 * WINDOW_MS).rem_euclid(EVERY_MS);
    if into > EVERY_MS - 60_000 {
        std::thread::sleep(Duration::from_millis((EVERY_MS - into + 1_000) as u64));
    }
    let period_end = (now() - 2 * WINDOW_MS).div_euclid(EVERY_MS) * EVERY_MS;
    // The data goes in first, so no check runs over half of it.
    let loader = Proc::spawn(data, &[]);
    let client = reqwest::blocking::Client::new();
    let mut rng = Rng(0xa1e7);
    for i in 0..60i64 {
        let at = period_end - 2 * EVERY_MS + i * 20_000;
        for (service, w) in [("checkout", if i < 30 { STEADY } else { Workload { shifted: 0.08, ..STEADY } }), ("search", STEADY)] {
            let (on, _) = window(&mut rng, w);
            let url = loader.url(&format!("/api/v1/ingest?service={service}&kind=on-cpu&format=folded&from={at}&label=host:h1"));
            assert_eq!(client.post(url).body(on).send().unwrap().status(), 200);
        }
    }
    loader.terminate();
    period_end
}

/// A server config in `dir` that checks every second, posts events to `hook`, and has
/// one `[[alerts]]` rule of `EVERY_MS` with the given other fields.
fn alerting_config(dir: &std::path::Path, hook: &str, rule: &str) -> std::path::PathBuf {
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nwindow_ms = {WINDOW_MS}\n\n[deploys]\ncheck_secs = 1\nwebhook = \"{hook}\"\n\n\
             [[alerts]]\n{rule}\nevery_secs = {}\n",
            EVERY_MS / 1000
        ),
    )
    .unwrap();
    config
}

#[test]
fn an_alert_rule_flags_the_service_that_regressed_and_not_the_steady_one() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, bodies) = webhook_receiver();
    let config = alerting_config(dir.path(), &hook, "name = \"every 10 min\"\nservice = \"*\"\nbaseline = \"previous\"");
    let data = dir.path().join("data");
    let period_end = two_periods(&data);
    let server = Proc::spawn(&data, &["--config", config.to_str().unwrap()]);
    let hooked: Value = serde_json::from_str(&bodies.recv_timeout(Duration::from_secs(30)).expect("no webhook call")).unwrap();
    assert_eq!((&hooked["kind"], &hooked["alert"], &hooked["service"]), (&"alert".into(), &"every 10 min".into(), &"checkout".into()));
    let c = &hooked["comparison"];
    assert_eq!((c["from"].as_i64(), c["until"].as_i64(), c["base_from"].as_i64()), (Some(period_end - EVERY_MS), Some(period_end), Some(period_end - 2 * EVERY_MS)));
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

/// `PUT /api/v1/alerts/{name}` with the admin token; the status and the reply.
fn put_rule(server: &Proc, name: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut request = reqwest::blocking::Client::new().put(server.url(&format!("/api/v1/alerts/{name}"))).body(body.to_owned());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let reply = request.send().unwrap();
    (reply.status().as_u16(), reply.text().unwrap())
}

fn delete_rule(server: &Proc, name: &str) -> u16 {
    let reply = reqwest::blocking::Client::new().delete(server.url(&format!("/api/v1/alerts/{name}"))).bearer_auth("admin-secret").send().unwrap();
    reply.status().as_u16()
}

#[test]
fn alert_rules_made_through_the_api_run_persist_and_go_away() {
    let dir = tempfile::tempdir().unwrap();
    let (hook, bodies) = webhook_receiver();
    let config = alerting_config(dir.path(), &hook, "name = \"search steady\"\nservice = \"search\"");
    let data = dir.path().join("data");
    two_periods(&data);
    let args = ["--config", config.to_str().unwrap(), "--admin-token", "admin-secret"];
    let server = Proc::spawn(&data, &args);
    let rules: Value = serde_json::from_str(&get(&server, "/api/v1/alerts")).unwrap();
    assert_eq!((rules[0]["name"].as_str(), rules[0]["source"].as_str(), rules.as_array().unwrap().len()), (Some("search steady"), Some("config"), 1), "{rules:#}");

    let every = format!("{{\"service\":\"checkout\",\"every_secs\":{}}}", EVERY_MS / 1000);
    let (status, _) = put_rule(&server, "checkout%20rule", None, &every);
    assert_eq!(status, 401, "writes need the admin token");
    for (name, body, status, says) in [
        ("search%20steady", every.as_str(), 409, "config file"),
        ("typo", r#"{"service":"chekout","every_secs":600}"#, 400, "unknown service"),
        ("short", r#"{"service":"checkout","every_secs":1}"#, 400, "every_secs must be in 4..="),
        ("never", r#"{"service":"checkout","every_secs":600,"min_regressions":0}"#, 400, "min_regressions"),
        ("other", r#"{"name":"else","service":"checkout","every_secs":600}"#, 400, "the path"),
        ("extra", r#"{"service":"checkout","every_secs":600,"threshold":3}"#, 400, "unknown field"),
        ("bad", "not json", 400, "invalid request body"),
    ] {
        let (got, reply) = put_rule(&server, name, Some("admin-secret"), body);
        assert_eq!(got, status, "{name}: {reply}");
        assert!(reply.contains(says), "{name}: {reply}");
    }

    let (status, reply) = put_rule(&server, "checkout%20rule", Some("admin-secret"), &every);
    assert_eq!(status, 201, "{reply}");
    let hooked: Value = serde_json::from_str(&bodies.recv_timeout(Duration::from_secs(30)).expect("no webhook call")).unwrap();
    assert_eq!((&hooked["alert"], &hooked["service"]), (&"checkout rule".into(), &"checkout".into()), "{hooked:#}");
    assert_eq!(hooked["comparison"]["top"][0]["function"], "hot_loop");
    // The config rule watches the steady service: nothing from it.
    assert!(bodies.recv_timeout(Duration::from_secs(3)).is_err());
    assert!(get(&server, "/metrics").contains("profiler_alert_regressions{alert=\"checkout rule\",service=\"checkout\"}"));

    // Kept across a restart, with the period it compared: no second event.
    server.terminate();
    let server = Proc::spawn(&data, &args);
    let rules: Value = serde_json::from_str(&get(&server, "/api/v1/alerts")).unwrap();
    let listed: Vec<(&str, &str)> = rules.as_array().unwrap().iter().map(|r| (r["name"].as_str().unwrap(), r["source"].as_str().unwrap())).collect();
    assert_eq!(listed, [("search steady", "config"), ("checkout rule", "api")]);
    assert!(bodies.recv_timeout(Duration::from_secs(3)).is_err());

    assert_eq!(delete_rule(&server, "search%20steady"), 409);
    assert_eq!(delete_rule(&server, "checkout%20rule"), 204);
    assert_eq!(delete_rule(&server, "checkout%20rule"), 404);
    assert!(!get(&server, "/metrics").contains("checkout rule"));
    let rules: Value = serde_json::from_str(&get(&server, "/api/v1/alerts")).unwrap();
    assert_eq!(rules.as_array().unwrap().len(), 1);
}

/// An event the webhook does not take stays queued: through a receiver that is down,
/// across a restart, and through answers of 503, until it is accepted, once. The URL's
/// path (where webhooks keep their secret) is in no log line.
#[test]
fn webhook_deliveries_are_retried_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let hook = format!("http://127.0.0.1:{port}/hook/SECRET-7f3a");
    let config = alerting_config(dir.path(), &hook, "name = \"every 10 min\"\nservice = \"*\"\nbaseline = \"previous\"");
    let data = dir.path().join("data");
    two_periods(&data);
    let log_path = dir.path().join("server.log");
    let log = || std::process::Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap());

    // Nobody listens: the event is compared, and queued.
    let server = Proc::spawn_logging_to(&data, &["--config", config.to_str().unwrap()], log());
    let started = std::time::Instant::now();
    while server.metric("profiler_webhook_queued") == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no event was queued for the webhook");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A few failed tries, then a restart.
    std::thread::sleep(Duration::from_secs(2));
    server.terminate();

    // The receiver is back, answering 503 twice before it takes the event.
    let bodies = failing_webhook_receiver(port, 2);
    let server = Proc::spawn_logging_to(&data, &["--config", config.to_str().unwrap()], log());
    let hooked: Value = serde_json::from_str(&bodies.recv_timeout(Duration::from_secs(30)).expect("the queued event never arrived")).unwrap();
    assert_eq!((&hooked["kind"], &hooked["service"]), (&"alert".into(), &"checkout".into()));
    assert!(bodies.recv_timeout(Duration::from_secs(4)).is_err(), "the event was sent twice");
    assert_eq!(server.metric("profiler_webhook_queued"), 0);
    assert_eq!(server.metric("profiler_webhook_dropped_total"), 0);
    let events: Value = serde_json::from_str(&get(&server, "/api/v1/events")).unwrap();
    assert_eq!(events.as_array().unwrap().len(), 1, "compared once: {events:#}");
    drop(server);

    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(logged.contains("webhook failed"), "the failures were not logged:\n{logged}");
    assert!(!logged.contains("SECRET-7f3a"), "the webhook's secret is in the log:\n{logged}");
}
