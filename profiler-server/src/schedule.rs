//! Scheduled deep-profile runs: schedules (cron + time zone + duration + selector +
//! settings) and the runs they produce, persisted as one JSON file in the data
//! directory. Agents poll for the runs that apply to them and report each run's state.
//!
//! A run is a time window with heavier settings; its profile is the ordinary data of the
//! selected service in that window, so it needs no storage of its own.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Mutex,
};

use chrono::TimeZone as _;
use croner::{Cron, parser::{CronParser, Seconds}};
use serde::{Deserialize, Serialize};

pub use profiler_pprof::runs::{AgentRun, RunSettings};

fn yes() -> bool {
    true
}

use crate::json_file;
use crate::store::now_ms;

/// Guards every host against a schedule asking too much.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunLimits {
    pub max_frequency_hz: u64,
    pub max_duration_s: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self { max_frequency_hz: 999, max_duration_s: 3600 }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}



/// What a client sends to create or replace a schedule.
/// Why a schedule or run was not made.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// What was asked for is invalid; the reason says why.
    #[error("{0}")]
    Invalid(String),
    /// The schedules file could not be written.
    #[error("saving schedules: {0:#}")]
    Save(#[from] anyhow::Error),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub name: String,
    /// Five fields (minute hour day month weekday), or six with seconds first.
    pub cron: String,
    #[serde(default = "utc")]
    pub timezone: String,
    pub duration_s: u64,
    pub selector: RunSelector,
    pub settings: RunSettings,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Schedule {
    pub id: u64,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub duration_s: u64,
    pub selector: RunSelector,
    pub settings: RunSettings,
    pub enabled: bool,
    /// Next start, unix ms (filled in on reads).
    #[serde(default, skip_deserializing)]
    pub next_start_ms: Option<i64>,
}

/// An ad-hoc "profile now" request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdHocSpec {
    pub selector: RunSelector,
    pub duration_s: u64,
    pub settings: RunSettings,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Planned,
    Running,
    Done,
    Failed,
}

impl From<profiler_pprof::runs::Reported> for RunState {
    fn from(reported: profiler_pprof::runs::Reported) -> Self {
        use profiler_pprof::runs::Reported;
        match reported {
            Reported::Running => RunState::Running,
            Reported::Done => RunState::Done,
            Reported::Failed => RunState::Failed,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct HostRun {
    pub state: RunState,
    pub updated_ms: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Run {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<u64>,
    pub name: String,
    pub selector: RunSelector,
    pub settings: RunSettings,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Per host, as the agents report it.
    pub hosts: BTreeMap<String, HostRun>,
    /// Overall state (filled in on reads).
    #[serde(default, skip_deserializing)]
    pub state: Option<RunState>,
}

/// Agents report `done` within this long after a run's end, or it is failed.
const REPORT_GRACE_MS: i64 = 60_000;

impl Run {
    fn overall(&self, now_ms: i64) -> RunState {
        if self.hosts.values().any(|h| h.state == RunState::Failed) {
            return RunState::Failed;
        }
        if now_ms < self.start_ms {
            return RunState::Planned;
        }
        let all_done = !self.hosts.is_empty() && self.hosts.values().all(|h| h.state == RunState::Done);
        if all_done && now_ms >= self.end_ms {
            return RunState::Done;
        }
        if now_ms >= self.end_ms + REPORT_GRACE_MS {
            // No agent took it, or one never reported back.
            return if all_done { RunState::Done } else { RunState::Failed };
        }
        RunState::Running
    }

    fn with_state(mut self, now_ms: i64) -> Run {
        self.state = Some(self.overall(now_ms));
        self
    }
}

#[derive(Default, Deserialize, Serialize)]
struct Book {
    next_id: u64,
    schedules: Vec<Schedule>,
    runs: Vec<Run>,
}


/// Everything about an agent that selectors can match.
pub struct AgentInfo {
    pub host: String,
    pub services: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// Finished runs kept for the UI and queries.
const MAX_RUNS: usize = 1000;

pub struct Schedules {
    path: PathBuf,
    book: Mutex<Book>,
    pub limits: RunLimits,
}

impl Schedules {
    pub fn open(data_dir: &Path, limits: RunLimits) -> anyhow::Result<Self> {
        let path = data_dir.join("schedules.json");
        let book = json_file::load(&path)?;
        Ok(Self { path, book: Mutex::new(book), limits })
    }

    fn save(&self, book: &Book) -> anyhow::Result<()> {
        json_file::save(&self.path, book)
    }

    /// Checks a schedule; `known_services` are the services the store has seen.
    pub fn validate(&self, spec: &ScheduleSpec, known_services: &[String]) -> Result<(), String> {
        if spec.name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        parse_cron(&spec.cron)?;
        parse_timezone(&spec.timezone)?;
        self.validate_run(&spec.selector, &spec.settings, spec.duration_s, known_services)
    }

    fn validate_run(&self, selector: &RunSelector, settings: &RunSettings, duration_s: u64, known_services: &[String]) -> Result<(), String> {
        if duration_s == 0 {
            return Err("duration_s must be at least 1".into());
        }
        if duration_s > self.limits.max_duration_s {
            return Err(format!("duration_s {duration_s} exceeds the limit of {} s", self.limits.max_duration_s));
        }
        if settings.frequency_hz == 0 || settings.frequency_hz > self.limits.max_frequency_hz {
            return Err(format!("frequency_hz must be in 1..={}, got {}", self.limits.max_frequency_hz, settings.frequency_hz));
        }
        if !(settings.off_cpu_sampling > 0.0 && settings.off_cpu_sampling <= 1.0) {
            return Err(format!("off_cpu_sampling must be in (0, 1], got {}", settings.off_cpu_sampling));
        }
        if selector.service.is_none() && selector.host.is_none() && selector.labels.is_empty() {
            return Err("selector must name a service, a host or labels".into());
        }
        if let Some(service) = &selector.service {
            if !known_services.iter().any(|s| s == service) {
                return Err(format!("unknown service {service:?} in selector (no agent has reported it)"));
            }
        }
        Ok(())
    }

    pub fn create(&self, spec: ScheduleSpec) -> Result<Schedule, ScheduleError> {
        let mut book = self.book.lock().unwrap();
        book.next_id += 1;
        let schedule = schedule_from(book.next_id, spec);
        book.schedules.push(schedule.clone());
        self.save(&book)?;
        Ok(with_next_start(schedule, now_ms()))
    }

    pub fn replace(&self, id: u64, spec: ScheduleSpec) -> Result<Option<Schedule>, ScheduleError> {
        let mut book = self.book.lock().unwrap();
        let Some(slot) = book.schedules.iter_mut().find(|s| s.id == id) else { return Ok(None) };
        *slot = schedule_from(id, spec);
        let schedule = slot.clone();
        self.save(&book)?;
        Ok(Some(with_next_start(schedule, now_ms())))
    }

    pub fn delete(&self, id: u64) -> Result<bool, ScheduleError> {
        let mut book = self.book.lock().unwrap();
        let before = book.schedules.len();
        book.schedules.retain(|s| s.id != id);
        let found = book.schedules.len() != before;
        if found {
            self.save(&book)?;
        }
        Ok(found)
    }

    pub fn list(&self) -> Vec<Schedule> {
        let now = now_ms();
        self.book.lock().unwrap().schedules.iter().cloned().map(|s| with_next_start(s, now)).collect()
    }

    pub fn profile_now(&self, spec: AdHocSpec, known_services: &[String]) -> Result<Run, ScheduleError> {
        self.validate_run(&spec.selector, &spec.settings, spec.duration_s, known_services).map_err(ScheduleError::Invalid)?;
        let mut book = self.book.lock().unwrap();
        book.next_id += 1;
        let start_ms = now_ms();
        let run = Run {
            id: format!("now-{}", book.next_id),
            schedule_id: None,
            name: "profile now".into(),
            selector: spec.selector,
            settings: spec.settings,
            start_ms,
            end_ms: start_ms + spec.duration_s as i64 * 1000,
            hosts: BTreeMap::new(),
            state: None,
        };
        book.runs.push(run.clone());
        self.save(&book)?;
        Ok(run.with_state(start_ms))
    }

    /// Runs, newest first, with the ones scheduled now materialized.
    pub fn runs(&self) -> Vec<Run> {
        let now = now_ms();
        let mut book = self.book.lock().unwrap();
        if self.materialize(&mut book, now) {
            let _ = self.save(&book);
        }
        let mut runs: Vec<Run> = book.runs.iter().cloned().map(|r| r.with_state(now)).collect();
        runs.sort_by_key(|r| std::cmp::Reverse(r.start_ms));
        runs
    }

    pub fn run(&self, id: &str) -> Option<Run> {
        self.runs().into_iter().find(|r| r.id == id)
    }

    /// The runs an agent should apply now.
    pub fn for_agent(&self, agent: &AgentInfo) -> Vec<AgentRun> {
        let now = now_ms();
        let mut book = self.book.lock().unwrap();
        if self.materialize(&mut book, now) {
            let _ = self.save(&book);
        }
        book.runs
            .iter()
            .filter(|run| run.start_ms <= now && now < run.end_ms && matches(&run.selector, agent))
            .filter(|run| run.hosts.get(&agent.host).is_none_or(|h| !matches!(h.state, RunState::Done | RunState::Failed)))
            .map(|run| AgentRun {
                id: run.id.clone(),
                start_ms: run.start_ms,
                end_ms: run.end_ms,
                settings: clamp(&run.settings, &self.limits),
            })
            .collect()
    }

    pub fn report(&self, id: &str, host: &str, state: RunState, message: String) -> Result<bool, ScheduleError> {
        let mut book = self.book.lock().unwrap();
        let Some(run) = book.runs.iter_mut().find(|r| r.id == id) else { return Ok(false) };
        run.hosts.insert(host.to_string(), HostRun { state, updated_ms: now_ms(), message });
        self.save(&book)?;
        Ok(true)
    }

    /// Creates the run of every enabled schedule that is active now. Returns whether
    /// anything changed.
    fn materialize(&self, book: &mut Book, now: i64) -> bool {
        let mut changed = false;
        let schedules = book.schedules.clone();
        for schedule in schedules.iter().filter(|s| s.enabled) {
            let Some(start) = latest_start(schedule, now) else { continue };
            let end = start + schedule.duration_s as i64 * 1000;
            if now >= end {
                continue;
            }
            let id = format!("s{}-{start}", schedule.id);
            if book.runs.iter().any(|r| r.id == id) {
                continue;
            }
            book.runs.push(Run {
                id,
                schedule_id: Some(schedule.id),
                name: schedule.name.clone(),
                selector: schedule.selector.clone(),
                settings: schedule.settings.clone(),
                start_ms: start,
                end_ms: end,
                hosts: BTreeMap::new(),
                state: None,
            });
            changed = true;
        }
        if book.runs.len() > MAX_RUNS {
            book.runs.sort_by_key(|r| r.start_ms);
            let excess = book.runs.len() - MAX_RUNS;
            book.runs.drain(..excess);
            changed = true;
        }
        changed
    }
}

fn schedule_from(id: u64, spec: ScheduleSpec) -> Schedule {
    Schedule {
        id,
        name: spec.name,
        cron: spec.cron,
        timezone: spec.timezone,
        duration_s: spec.duration_s,
        selector: spec.selector,
        settings: spec.settings,
        enabled: spec.enabled,
        next_start_ms: None,
    }
}

fn with_next_start(mut schedule: Schedule, now: i64) -> Schedule {
    schedule.next_start_ms = next_start(&schedule, now);
    schedule
}

fn matches(selector: &RunSelector, agent: &AgentInfo) -> bool {
    selector.host.as_ref().is_none_or(|h| *h == agent.host)
        && selector.service.as_ref().is_none_or(|s| agent.services.contains(s))
        && selector.labels.iter().all(|(k, v)| agent.labels.get(k) == Some(v))
}

fn clamp(settings: &RunSettings, limits: &RunLimits) -> RunSettings {
    RunSettings { frequency_hz: settings.frequency_hz.clamp(1, limits.max_frequency_hz), ..settings.clone() }
}

fn parse_cron(pattern: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(pattern)
        .map_err(|err| format!("bad cron expression {pattern:?}: {err}"))
}

fn parse_timezone(name: &str) -> Result<chrono_tz::Tz, String> {
    chrono_tz::Tz::from_str(name).map_err(|_| format!("unknown time zone {name:?}"))
}

/// Start of the schedule's most recent run that could still be active at `now`.
fn latest_start(schedule: &Schedule, now: i64) -> Option<i64> {
    let cron = parse_cron(&schedule.cron).ok()?;
    let tz = parse_timezone(&schedule.timezone).ok()?;
    let window_start = tz.timestamp_millis_opt(now - schedule.duration_s as i64 * 1000).single()?;
    let start = cron.find_next_occurrence(&window_start, false).ok()?;
    let start_ms = start.timestamp_millis();
    (start_ms <= now).then_some(start_ms)
}

fn next_start(schedule: &Schedule, now: i64) -> Option<i64> {
    let cron = parse_cron(&schedule.cron).ok()?;
    let tz = parse_timezone(&schedule.timezone).ok()?;
    let from = tz.timestamp_millis_opt(now).single()?;
    cron.find_next_occurrence(&from, false).ok().map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cron: &str, duration_s: u64, service: &str) -> ScheduleSpec {
        ScheduleSpec {
            name: "nightly".into(),
            cron: cron.into(),
            timezone: "Europe/Paris".into(),
            duration_s,
            selector: RunSelector { service: Some(service.into()), ..Default::default() },
            settings: RunSettings { frequency_hz: 499, off_cpu: true, off_cpu_sampling: 1.0 },
            enabled: true,
        }
    }

    #[test]
    fn rejects_misconfigured_schedules_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let book = Schedules::open(dir.path(), RunLimits::default()).unwrap();
        let known = vec!["api".to_string()];
        assert!(book.validate(&spec("0 3 * * *", 600, "api"), &known).is_ok());
        assert!(book.validate(&spec("61 3 * * *", 600, "api"), &known).unwrap_err().contains("bad cron"));
        assert!(book.validate(&spec("0 3 * * *", 0, "api"), &known).unwrap_err().contains("at least 1"));
        assert!(book.validate(&spec("0 3 * * *", 86400, "api"), &known).unwrap_err().contains("exceeds the limit"));
        assert!(book.validate(&spec("0 3 * * *", 60, "nope"), &known).unwrap_err().contains("unknown service"));
        let mut bad_tz = spec("0 3 * * *", 60, "api");
        bad_tz.timezone = "Mars/Olympus".into();
        assert!(book.validate(&bad_tz, &known).unwrap_err().contains("unknown time zone"));
    }

    #[test]
    fn active_schedule_becomes_a_run_for_matching_agents_only() {
        let dir = tempfile::tempdir().unwrap();
        let book = Schedules::open(dir.path(), RunLimits::default()).unwrap();
        // Every second, lasting 10 s: always active.
        book.create(spec("* * * * * *", 10, "api")).unwrap();
        let agent = AgentInfo { host: "h1".into(), services: vec!["api".into()], labels: BTreeMap::new() };
        let runs = book.for_agent(&agent);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].settings.frequency_hz, 499);
        let other = AgentInfo { host: "h2".into(), services: vec!["web".into()], labels: BTreeMap::new() };
        assert!(book.for_agent(&other).is_empty());
        // Reopening keeps schedules and runs.
        drop(book);
        let book = Schedules::open(dir.path(), RunLimits::default()).unwrap();
        assert_eq!(book.list().len(), 1);
        assert!(!book.runs().is_empty());
    }
}
