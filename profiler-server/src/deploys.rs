//! Deploy awareness: profiles of a service carrying a `version` label it has
//! not shown before mean a deploy. (`build_id` alone does not: a service's
//! short commands each bring their own, which would read as a deploy per
//! command; it stays a label to compare builds by.) Once
//! the new version has run for `window`, the window after the deploy is
//! compared with the window before it ([`crate::query::changes`]), and the
//! outcome becomes an event: kept in `events.json` in the data directory,
//! listed by `GET /api/v1/events`, counted on `/metrics`, and posted as JSON
//! to a webhook when one is configured.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::json_file;
use crate::query::changes::{self, ChangeOptions};
use crate::query::Names;
use crate::store::{Batch, Cancel, Selector, Store};

/// Versions remembered per service; older ones may come back as deploys.
const MAX_VERSIONS: usize = 64;
/// Events kept; the oldest go first.
const MAX_EVENTS: usize = 10_000;
/// Changes an event lists.
const TOP_CHANGES: usize = 10;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: u64,
    pub service: String,
    /// `deploy`.
    pub kind: String,
    pub version: String,
    pub previous: String,
    /// Start of the first window of the new version, unix ms.
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
    pub measure: String,
    pub direction: String,
    pub base_share: f64,
    pub target_share: f64,
    pub delta_rate: f64,
}

#[derive(Default, Serialize, Deserialize)]
struct Book {
    next_id: u64,
    /// service -> versions seen, the latest last.
    versions: BTreeMap<String, Vec<String>>,
    events: Vec<Event>,
}

#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// How long after (and before) a deploy is compared.
    pub window: Duration,
    /// Observation length of the comparison: the store's window.
    pub store_window_ms: i64,
    pub webhook: Option<String>,
}

pub struct Deploys {
    path: PathBuf,
    options: DeployOptions,
    book: Mutex<Book>,
}

/// What a batch says about versions: (service, version, first window).
pub struct Seen(Vec<(String, String, i64)>);

impl Seen {
    pub fn of(batch: &Batch) -> Seen {
        let Some(at) = batch.rows.iter().map(|r| r.ts_ms).min() else { return Seen(Vec::new()) };
        let versions: BTreeSet<&String> = batch
            .series
            .iter()
            .filter_map(|(_, labels)| labels.get("version"))
            .collect();
        Seen(versions.into_iter().map(|v| (batch.service.clone(), v.clone(), at)).collect())
    }
}

impl Deploys {
    pub fn open(data_dir: &Path, options: DeployOptions) -> anyhow::Result<Deploys> {
        let path = data_dir.join("events.json");
        let book = json_file::load(&path)?;
        Ok(Deploys { path, options, book: Mutex::new(book) })
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
            book.next_id += 1;
            let id = book.next_id;
            book.events.push(Event { id, service, kind: "deploy".into(), version, previous, at_ms, comparison: None });
            if book.events.len() > MAX_EVENTS {
                book.events.remove(0);
            }
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

    /// Compares every deploy whose window after has passed; returns the events
    /// it completed. Blocking: runs store scans.
    pub fn compare_due(&self, store: &dyn Store, names: &Names, now_ms: i64) -> Vec<Event> {
        let window = self.options.window.as_millis() as i64;
        // Late windows of agents reach the server up to a window after the fact.
        let grace = self.options.store_window_ms * 2;
        let due: Vec<Event> = self
            .lock()
            .events
            .iter()
            .filter(|e| e.comparison.is_none() && e.at_ms + window + grace <= now_ms)
            .cloned()
            .collect();
        let mut done = Vec::new();
        for mut event in due {
            event.comparison = Some(self.compare(store, names, &event, window));
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

    fn compare(&self, store: &dyn Store, names: &Names, event: &Event, window: i64) -> Comparison {
        let (base_from, at) = (event.at_ms - window, event.at_ms);
        let mut outcome = Comparison {
            base_from,
            base_until: at,
            from: at,
            until: at + window,
            significant: 0,
            regressions: 0,
            top: Vec::new(),
            error: None,
        };
        let sel = |from_ms, until_ms| Selector {
            service: event.service.clone(),
            from_ms,
            until_ms,
            kinds: None,
            matchers: Vec::new(),
            cancel: Cancel::default(),
        };
        let result = changes::compare_ranges(
            store,
            names,
            &sel(base_from, at),
            &sel(at, at + window),
            self.options.store_window_ms,
            &ChangeOptions::default(),
        );
        match result {
            Ok(c) => {
                let significant: Vec<_> = c.changes.into_iter().filter(|c| c.significant).collect();
                outcome.significant = significant.len();
                outcome.regressions = significant.iter().filter(|c| c.direction == "regression").count();
                outcome.top = significant
                    .into_iter()
                    .take(TOP_CHANGES)
                    .map(|c| ChangeSummary {
                        function: c.function,
                        kind: c.kind,
                        measure: c.measure.into(),
                        direction: c.direction.into(),
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

    /// Prometheus lines: deploys seen, and per service the regressions of its
    /// latest compared deploy (alert on `profiler_deploy_regressions > 0`).
    pub fn render_metrics(&self) -> String {
        let book = self.lock();
        let mut latest: BTreeMap<&str, &Comparison> = BTreeMap::new();
        for e in &book.events {
            if let Some(c) = &e.comparison {
                latest.insert(&e.service, c);
            }
        }
        let mut o = format!(
            "# HELP profiler_deploys_total Deploys noticed (a service's new version or build).\n# TYPE profiler_deploys_total counter\nprofiler_deploys_total {}\n",
            book.next_id
        );
        o.push_str("# HELP profiler_deploy_regressions Significant regressions of the latest compared deploy of a service.\n# TYPE profiler_deploy_regressions gauge\n");
        for (service, c) in latest {
            let service = service.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            o.push_str(&format!("profiler_deploy_regressions{{service=\"{service}\"}} {}\n", c.regressions));
        }
        o
    }

    pub fn webhook(&self) -> Option<&str> {
        self.options.webhook.as_deref()
    }
}

/// Compares due deploys every `every`, posting each completed event to the
/// webhook; stops with the server.
pub async fn run(
    deploys: std::sync::Arc<Deploys>,
    store: std::sync::Arc<dyn Store>,
    names: std::sync::Arc<Names>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("a TLS backend is compiled in");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let (d, s, n) = (deploys.clone(), store.clone(), names.clone());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_millis() as i64);
        let done = match tokio::task::spawn_blocking(move || d.compare_due(&*s, &n, now)).await {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "deploy comparison panicked");
                continue;
            }
        };
        for event in done {
            tracing::info!(service = %event.service, version = %event.version, regressions = event.comparison.as_ref().map_or(0, |c| c.regressions), "deploy compared");
            if let Some(url) = deploys.webhook() {
                match client.post(url).json(&event).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => tracing::warn!(status = %r.status(), %url, "deploy webhook refused the event"),
                    Err(e) => tracing::warn!(error = %e, %url, "deploy webhook unreachable"),
                }
            }
        }
    }
}
