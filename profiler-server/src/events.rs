//! Change events: comparisons the server runs by itself
//! ([`crate::query::changes`]), kept in `events.json` in the data directory,
//! listed by `GET /api/v1/events`, counted on `/metrics`, and posted as JSON
//! to a webhook when one is configured.
//!
//! - Deploys: profiles of a service carrying a `version` label it has not
//!   shown before mean a deploy. (`build_id` alone does not: a service's short
//!   commands each bring their own, which would read as a deploy per command;
//!   it stays a label to compare builds by.) Once the new version has run for
//!   the deploy window, that window is compared with the one before the deploy.
//! - Alerts: each rule compares, every period, the last period of its
//!   services with a baseline (the period before, or the same period a day or
//!   a week earlier); enough significant regressions make an event. Rules come
//!   from the config file (`[[alerts]]`, read-only) or from the API
//!   (`/api/v1/alerts`, kept in `events.json` with the events).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::json_file;
use crate::query::changes::{self, ChangeOptions, Direction, Measure};
use crate::query::Names;
use crate::store::{Batch, Cancel, Selector, Store};

/// Versions remembered per service. A version seen before is no deploy: during
/// a rolling deploy old and new versions report side by side (so a rollback
/// to a remembered version is not one either).
const MAX_VERSIONS: usize = 64;
/// Events kept; the oldest go first.
const MAX_EVENTS: usize = 10_000;
/// Changes an event lists.
const TOP_CHANGES: usize = 10;
/// Rules the API keeps: each costs change detections every period.
const MAX_API_RULES: usize = 200;
/// The longest alert period: a week (a week's baseline is the furthest back).
const MAX_PERIOD_SECS: u64 = 7 * 86_400;
/// Events waiting for the webhook to accept them; past it the oldest are dropped
/// (counted): a webhook down for days must not grow `events.json` without bound.
const MAX_WEBHOOK_QUEUE: usize = 1_000;
/// The longest wait between two tries of a failing webhook.
const MAX_WEBHOOK_BACKOFF: Duration = Duration::from_secs(300);
/// How often an idle delivery task looks for queued events.
const WEBHOOK_IDLE_POLL: Duration = Duration::from_secs(1);

/// Why an alert rule was not changed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The change conflicts with the rules there are (one of the config file, too many).
    #[error("{0}")]
    Conflict(String),
    /// The rules file could not be written.
    #[error("saving alert rules: {0:#}")]
    Save(#[from] anyhow::Error),
}

/// What an event marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A new version of a service was seen.
    Deploy,
    /// An alert rule's comparison found regressions.
    Alert,
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EventKind::Deploy => "deploy",
            EventKind::Alert => "alert",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: u64,
    pub service: String,
    pub kind: EventKind,
    /// The alert rule's name.
    pub alert: Option<String>,
    /// A deploy's new and previous version.
    pub version: Option<String>,
    pub previous: Option<String>,
    /// A deploy: the start of the first window of the new version. An alert:
    /// the start of the compared period. Unix ms.
    pub at_ms: i64,
    /// Filled once the window after the deploy is complete.
    pub comparison: Option<Comparison>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Comparison {
    pub base_from: i64,
    pub base_until: i64,
    pub from: i64,
    pub until: i64,
    pub significant: usize,
    pub regressions: usize,
    /// The significant changes, as `/api/v1/changes` ranks them.
    pub top: Vec<ChangeSummary>,
    /// Why there is no result, e.g. too little data on one side.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChangeSummary {
    pub function: String,
    pub kind: String,
    pub measure: Measure,
    pub direction: Direction,
    pub base_share: f64,
    pub target_share: f64,
    pub delta_rate: f64,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct Book {
    next_id: u64,
    deploys: u64,
    /// service -> versions seen, the latest last.
    versions: BTreeMap<String, Vec<String>>,
    /// (alert, service) -> (end of the last period compared, its regressions).
    alerts: BTreeMap<String, BTreeMap<String, (i64, usize)>>,
    /// Rules created through the API.
    rules: Vec<AlertRule>,
    /// Ids of completed events the webhook has not accepted yet, oldest first: kept
    /// here, so a restart or an outage of the receiver loses none.
    webhook_queue: std::collections::VecDeque<u64>,
    /// Events dropped from the queue: refused for good (a 4xx other than 408 and 429)
    /// or pushed out by newer ones.
    webhook_dropped: u64,
    events: Vec<Event>,
}

#[derive(Debug, Clone)]
pub struct EventOptions {
    /// How long after (and before) a deploy is compared.
    pub deploy_window: Duration,
    /// Observation length of the comparisons: the store's window.
    pub store_window_ms: i64,
    pub webhook: Option<String>,
    pub alerts: Vec<AlertRule>,
}

pub struct Events {
    path: PathBuf,
    options: EventOptions,
    book: Mutex<Book>,
}

/// What a batch says about versions: (service, version, first window).
pub struct Seen(Vec<(String, String, i64)>);

impl Seen {
    pub fn of(batch: &Batch) -> Seen {
        let versions: BTreeSet<&String> = batch
            .series
            .iter()
            .filter_map(|(_, labels)| labels.get("version"))
            .collect();
        // Every ingest passes here: read the rows only when a version is there.
        if versions.is_empty() {
            return Seen(Vec::new());
        }
        let Some(at) = batch.rows.iter().map(|r| r.ts_ms).min() else { return Seen(Vec::new()) };
        Seen(versions.into_iter().map(|v| (batch.service.clone(), v.clone(), at)).collect())
    }
}

impl Events {
    pub fn open(data_dir: &Path, options: EventOptions) -> anyhow::Result<Events> {
        let path = data_dir.join("events.json");
        let book = json_file::load(&path)?;
        Ok(Events { path, options, book: Mutex::new(book) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, book: &Book) -> anyhow::Result<()> {
        json_file::save(&self.path, book)
    }

    /// Records the versions of a stored batch; a version new to a service that
    /// had another one is a deploy.
    pub fn observe(&self, seen: Seen) {
        if seen.0.is_empty() {
            return;
        }
        let mut book = self.lock();
        let mut changed = false;
        for (service, version, at_ms) in seen.0 {
            let known = book.versions.entry(service.clone()).or_default();
            if known.last() == Some(&version) || known.contains(&version) {
                continue;
            }
            let previous = known.last().cloned();
            known.push(version.clone());
            if known.len() > MAX_VERSIONS {
                known.remove(0);
            }
            changed = true;
            let Some(previous) = previous else { continue };
            tracing::info!(%service, %version, %previous, "deploy noticed");
            book.deploys += 1;
            let event = Event {
                id: 0,
                service,
                kind: EventKind::Deploy,
                alert: None,
                version: Some(version),
                previous: Some(previous),
                at_ms,
                comparison: None,
            };
            push(&mut book, event);
        }
        if changed {
            if let Err(e) = self.save(&book) {
                tracing::error!(error = %format!("{e:#}"), "saving deploy events");
            }
        }
    }

    /// Events, newest first, optionally of one service.
    pub fn events(&self, service: Option<&str>) -> Vec<Event> {
        let book = self.lock();
        book.events.iter().rev().filter(|e| service.is_none_or(|s| e.service == s)).cloned().collect()
    }

    /// Runs what is due: deploys whose window after has passed and alert
    /// periods that ended; returns the events completed. Blocking: runs store
    /// scans.
    pub fn compare_due(&self, store: &dyn Store, names: &Names, now_ms: i64) -> Vec<Event> {
        let mut done = self.compare_deploys(store, names, now_ms);
        done.extend(self.run_alerts(store, names, now_ms));
        done
    }

    /// Late windows of agents reach the server up to a window after the fact.
    fn grace_ms(&self) -> i64 {
        self.options.store_window_ms * 2
    }

    fn compare_deploys(&self, store: &dyn Store, names: &Names, now_ms: i64) -> Vec<Event> {
        let window = self.options.deploy_window.as_millis() as i64;
        let grace = self.grace_ms();
        let due: Vec<Event> = self
            .lock()
            .events
            .iter()
            .filter(|e| e.comparison.is_none() && e.at_ms + window + grace <= now_ms)
            .cloned()
            .collect();
        let mut done = Vec::new();
        for mut event in due {
            let (at, service) = (event.at_ms, event.service.clone());
            event.comparison = Some(self.compare(store, names, &service, (at - window, at), (at, at + window)));
            let mut book = self.lock();
            if let Some(slot) = book.events.iter_mut().find(|e| e.id == event.id) {
                *slot = event.clone();
            }
            if let Err(e) = self.save(&book) {
                tracing::error!(error = %format!("{e:#}"), "saving deploy events");
            }
            done.push(event);
        }
        done
    }

    /// The config file's rules, then the API's.
    pub fn rules(&self) -> Vec<ListedRule> {
        let config = self.options.alerts.iter().map(|rule| ListedRule { rule: rule.clone(), source: "config" });
        let api: Vec<ListedRule> = self.lock().rules.iter().map(|rule| ListedRule { rule: rule.clone(), source: "api" }).collect();
        config.chain(api).collect()
    }

    /// Why `rule` cannot run, if it cannot: an empty or overlong name, an unknown
    /// service (a typo would never alert), or a period outside two storage
    /// windows (the fewest observations a test needs) to a week.
    pub fn validate(&self, rule: &AlertRule, known_services: &[String]) -> Result<(), String> {
        if rule.name.trim().is_empty() || rule.name.len() > 100 {
            return Err("name must be 1 to 100 characters".into());
        }
        if rule.service != "*" && !known_services.contains(&rule.service) {
            return Err(format!("unknown service {:?} (no agent has reported it); use \"*\" for every service", rule.service));
        }
        let shortest = (2 * self.options.store_window_ms as u64).div_ceil(1000);
        if !(shortest..=MAX_PERIOD_SECS).contains(&rule.every_secs) {
            return Err(format!("every_secs must be in {shortest}..={MAX_PERIOD_SECS}, got {}", rule.every_secs));
        }
        if rule.min_regressions == 0 {
            return Err("min_regressions must be at least 1".into());
        }
        Ok(())
    }

    /// Creates or replaces the API rule of that name; `Ok(Err)` when the name
    /// is taken by the config file or the API already keeps its most rules.
    /// Returns whether the rule is new.
    pub fn put_rule(&self, rule: AlertRule) -> Result<bool, RuleError> {
        if self.options.alerts.iter().any(|r| r.name == rule.name) {
            return Err(RuleError::Conflict(format!("alert {:?} is defined in the server's config file; change it there", rule.name)));
        }
        let mut book = self.lock();
        let created = match book.rules.iter().position(|r| r.name == rule.name) {
            Some(at) => {
                book.rules[at] = rule.clone();
                false
            }
            None if book.rules.len() >= MAX_API_RULES => {
                return Err(RuleError::Conflict(format!("at most {MAX_API_RULES} alert rules can be created")))
            }
            None => {
                book.rules.push(rule.clone());
                true
            }
        };
        // Services the rule no longer covers leave its metrics.
        if let Some(state) = book.alerts.get_mut(&rule.name) {
            state.retain(|service, _| rule.service == "*" || *service == rule.service);
        }
        self.save(&book)?;
        Ok(created)
    }

    /// Deletes the API rule of that name and its metrics; `Ok(Err)` for a rule
    /// of the config file, `Ok(Ok(false))` when there is none.
    pub fn delete_rule(&self, name: &str) -> Result<bool, RuleError> {
        if self.options.alerts.iter().any(|r| r.name == name) {
            return Err(RuleError::Conflict(format!("alert {name:?} is defined in the server's config file; remove it there")));
        }
        let mut book = self.lock();
        let before = book.rules.len();
        book.rules.retain(|r| r.name != name);
        if book.rules.len() == before {
            return Ok(false);
        }
        book.alerts.remove(name);
        self.save(&book)?;
        Ok(true)
    }

    /// Every rule's last complete period, for each of its services, once.
    fn run_alerts(&self, store: &dyn Store, names: &Names, now_ms: i64) -> Vec<Event> {
        let mut done = Vec::new();
        for ListedRule { rule, .. } in self.rules() {
            let every = rule.every_secs as i64 * 1000;
            let until = (now_ms - self.grace_ms()).div_euclid(every) * every;
            let services = match rule.service.as_str() {
                "*" => match store.services() {
                    Ok(services) => services,
                    Err(e) => {
                        tracing::error!(error = %e, alert = %rule.name, "listing services for an alert; trying again next round");
                        continue;
                    }
                },
                _ => vec![rule.service.clone()],
            };
            for service in services {
                let last = self.lock().alerts.get(&rule.name).and_then(|m| m.get(&service)).map(|&(until, _)| until);
                if last.is_some_and(|last| last >= until) {
                    continue;
                }
                let base = rule.baseline.before(until - every, until);
                let comparison = self.compare(store, names, &service, base, (until - every, until));
                let mut book = self.lock();
                // Deleted while it was compared.
                if !self.options.alerts.iter().chain(&book.rules).any(|r| r.name == rule.name) {
                    break;
                }
                book.alerts.entry(rule.name.clone()).or_default().insert(service.clone(), (until, comparison.regressions));
                if comparison.regressions >= rule.min_regressions.max(1) {
                    tracing::info!(alert = %rule.name, %service, regressions = comparison.regressions, "alert");
                    let event = Event {
                        id: 0,
                        service,
                        kind: EventKind::Alert,
                        alert: Some(rule.name.clone()),
                        version: None,
                        previous: None,
                        at_ms: until - every,
                        comparison: Some(comparison),
                    };
                    done.push(push(&mut book, event).clone());
                }
                if let Err(e) = self.save(&book) {
                    tracing::error!(error = %format!("{e:#}"), "saving alert state");
                }
            }
        }
        done
    }

    fn compare(&self, store: &dyn Store, names: &Names, service: &str, (base_from, base_until): (i64, i64), (from, until): (i64, i64)) -> Comparison {
        let mut outcome = Comparison {
            base_from,
            base_until,
            from,
            until,
            significant: 0,
            regressions: 0,
            top: Vec::new(),
            error: None,
        };
        let sel = |from_ms, until_ms| Selector {
            service: service.to_owned(),
            from_ms,
            until_ms,
            kinds: None,
            matchers: Vec::new(),
            cancel: Cancel::default(),
        };
        let result = changes::compare_ranges(
            store,
            names,
            &sel(base_from, base_until),
            &sel(from, until),
            self.options.store_window_ms,
            &ChangeOptions::default(),
        );
        match result {
            Ok(c) => {
                let significant: Vec<_> = c.changes.into_iter().filter(|c| c.significant).collect();
                outcome.significant = significant.len();
                outcome.regressions = significant.iter().filter(|c| c.direction == Direction::Regression).count();
                outcome.top = significant
                    .into_iter()
                    .take(TOP_CHANGES)
                    .map(|c| ChangeSummary {
                        function: c.function,
                        kind: c.kind,
                        measure: c.measure,
                        direction: c.direction,
                        base_share: c.base_share,
                        target_share: c.target_share,
                        delta_rate: c.delta_rate,
                    })
                    .collect();
            }
            Err(e) => outcome.error = Some(format!("{e:#}")),
        }
        outcome
    }

    /// Prometheus lines: deploys seen; per service the regressions of its
    /// latest compared deploy, and per alert and service those of the latest
    /// period (page on either `> 0`).
    pub fn render_metrics(&self) -> String {
        let book = self.lock();
        let mut latest: BTreeMap<&str, &Comparison> = BTreeMap::new();
        for e in book.events.iter().filter(|e| e.kind == EventKind::Deploy) {
            if let Some(c) = &e.comparison {
                latest.insert(&e.service, c);
            }
        }
        let mut o = format!(
            "# HELP profiler_deploys_total Deploys noticed (a service's new version).\n# TYPE profiler_deploys_total counter\nprofiler_deploys_total {}\n",
            book.deploys
        );
        o.push_str("# HELP profiler_deploy_regressions Significant regressions of the latest compared deploy of a service.\n# TYPE profiler_deploy_regressions gauge\n");
        for (service, c) in latest {
            o.push_str(&format!("profiler_deploy_regressions{{service=\"{}\"}} {}\n", label_value(service), c.regressions));
        }
        o.push_str(&format!(
            "# HELP profiler_webhook_queued Completed events the webhook has not accepted yet.\n# TYPE profiler_webhook_queued gauge\nprofiler_webhook_queued {}\n\
             # HELP profiler_webhook_dropped_total Events the webhook refused for good, or that newer ones pushed out of a full queue.\n# TYPE profiler_webhook_dropped_total counter\nprofiler_webhook_dropped_total {}\n",
            book.webhook_queue.len(),
            book.webhook_dropped
        ));
        o.push_str("# HELP profiler_alert_regressions Significant regressions of the latest period an alert rule compared, per service.\n# TYPE profiler_alert_regressions gauge\n");
        for (alert, services) in &book.alerts {
            for (service, (_, regressions)) in services {
                o.push_str(&format!(
                    "profiler_alert_regressions{{alert=\"{}\",service=\"{}\"}} {regressions}\n",
                    label_value(alert),
                    label_value(service)
                ));
            }
        }
        o
    }

    pub fn webhook(&self) -> Option<&str> {
        self.options.webhook.as_deref()
    }

    /// Queues completed events for the webhook, when one is configured.
    pub fn queue_for_webhook(&self, done: &[Event]) {
        if self.options.webhook.is_none() || done.is_empty() {
            return;
        }
        let mut book = self.lock();
        book.webhook_queue.extend(done.iter().map(|e| e.id));
        while book.webhook_queue.len() > MAX_WEBHOOK_QUEUE {
            book.webhook_queue.pop_front();
            book.webhook_dropped += 1;
        }
        if let Err(e) = self.save(&book) {
            tracing::error!(error = %format!("{e:#}"), "saving the webhook queue");
        }
    }

    /// The oldest queued event still kept (events past `MAX_EVENTS` leave the queue).
    fn next_for_webhook(&self) -> Option<Event> {
        let mut book = self.lock();
        while let Some(&id) = book.webhook_queue.front() {
            if let Some(event) = book.events.iter().find(|e| e.id == id) {
                return Some(event.clone());
            }
            book.webhook_queue.pop_front();
        }
        None
    }

    /// Takes event `id` off the queue: accepted, or refused for good (counted).
    fn webhook_done(&self, id: u64, accepted: bool) {
        let mut book = self.lock();
        book.webhook_queue.retain(|&queued| queued != id);
        if !accepted {
            book.webhook_dropped += 1;
        }
        if let Err(e) = self.save(&book) {
            tracing::error!(error = %format!("{e:#}"), "saving the webhook queue");
        }
    }
}

/// A webhook URL as logs show it: scheme, host and port. Its path and query often
/// hold a secret (a Slack webhook's, a token).
fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!("{}://{}{}/…", u.scheme(), u.host_str().unwrap_or(""), u.port().map(|p| format!(":{p}")).unwrap_or_default()),
        Err(_) => "(a URL that does not parse)".into(),
    }
}

/// Posts queued events to the webhook, oldest first, until shutdown: each until it is
/// accepted (2xx) or refused for good (a 4xx other than 408 and 429), retrying others
/// and unreachable receivers with a backoff doubling from 1 s to 5 minutes.
async fn deliver(events: std::sync::Arc<Events>, url: String, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("a TLS backend is compiled in");
    let shown = redacted(&url);
    let mut backoff = Duration::ZERO;
    loop {
        let idle = backoff.is_zero() && events.next_for_webhook().is_none();
        let pause = if idle { WEBHOOK_IDLE_POLL } else { backoff };
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
        if *shutdown.borrow() {
            return;
        }
        // After a backoff, the same event again; after an idle pause, whatever came.
        let Some(event) = events.next_for_webhook() else { continue };
        let failure = match client.post(&url).json(&event).send().await {
            Ok(r) if r.status().is_success() => {
                done(&events, event.id, true).await;
                backoff = Duration::ZERO;
                continue;
            }
            Ok(r) if r.status().is_client_error() && !matches!(r.status().as_u16(), 408 | 429) => {
                tracing::warn!(status = %r.status(), webhook = %shown, event = event.id, "webhook refused the event; dropped");
                done(&events, event.id, false).await;
                backoff = Duration::ZERO;
                continue;
            }
            Ok(r) => format!("status {}", r.status()),
            // Without the URL: reqwest's errors name it, secret included.
            Err(e) => e.without_url().to_string(),
        };
        backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_WEBHOOK_BACKOFF);
        tracing::warn!(webhook = %shown, event = event.id, error = %failure, retry_in = ?backoff, "webhook failed; the event stays queued");
    }
}

/// Takes an event off the webhook queue, saving the book off the async threads.
async fn done(events: &std::sync::Arc<Events>, id: u64, accepted: bool) {
    let events = events.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || events.webhook_done(id, accepted)).await {
        tracing::error!(error = %e, "updating the webhook queue panicked");
    }
}

/// A Prometheus label value, escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Numbers and keeps an event, dropping the oldest past the limit.
fn push(book: &mut Book, mut event: Event) -> &Event {
    book.next_id += 1;
    event.id = book.next_id;
    book.events.push(event);
    if book.events.len() > MAX_EVENTS {
        book.events.remove(0);
    }
    book.events.last().expect("just pushed")
}

/// What an alert compares a period with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// The period just before.
    Previous,
    /// The same period a day earlier (daily cycles).
    Day,
    /// The same period a week earlier (weekly cycles).
    Week,
}

impl Baseline {
    fn before(self, from: i64, until: i64) -> (i64, i64) {
        let shift = match self {
            Baseline::Previous => until - from,
            Baseline::Day => 86_400_000,
            Baseline::Week => 7 * 86_400_000,
        };
        (from - shift, until - shift)
    }
}

/// A scheduled comparison, from `[[alerts]]` in the server's config or from
/// `PUT /api/v1/alerts/{name}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub name: String,
    /// A service, or `*` for every service.
    pub service: String,
    /// Length of the compared period, and how often one is compared.
    pub every_secs: u64,
    #[serde(default = "AlertRule::default_baseline")]
    pub baseline: Baseline,
    /// Significant regressions that make an event (at least 1).
    #[serde(default = "AlertRule::default_min_regressions")]
    pub min_regressions: usize,
}

/// A rule as `GET /api/v1/alerts` lists it: where it comes from (`config`
/// rules are read-only).
#[derive(Debug, Clone, Serialize)]
pub struct ListedRule {
    #[serde(flatten)]
    pub rule: AlertRule,
    pub source: &'static str,
}

impl AlertRule {
    fn default_baseline() -> Baseline {
        Baseline::Previous
    }
    fn default_min_regressions() -> usize {
        1
    }
}

/// Runs due comparisons every `every`, posting each completed event to the
/// webhook; stops with the server.
pub async fn run(
    events: std::sync::Arc<Events>,
    store: std::sync::Arc<dyn Store>,
    names: std::sync::Arc<Names>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let delivery = events.webhook().map(|url| tokio::spawn(deliver(events.clone(), url.to_owned(), shutdown.clone())));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => break,
        }
        let (d, s, n) = (events.clone(), store.clone(), names.clone());
        let now = crate::store::now_ms();
        let done = match tokio::task::spawn_blocking(move || d.compare_due(&*s, &n, now)).await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "comparison panicked");
                continue;
            }
        };
        for event in &done {
            tracing::info!(service = %event.service, kind = %event.kind, regressions = event.comparison.as_ref().map_or(0, |c| c.regressions), "event compared");
        }
        let queued = events.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || queued.queue_for_webhook(&done)).await {
            tracing::error!(error = %e, "queueing events for the webhook panicked");
        }
    }
    if let Some(delivery) = delivery {
        let _ = delivery.await;
    }
}
