//! Deep-profile runs scheduled on the server: the agent polls for the runs that apply to
//! it, the sampling thread switches to a run's settings for its duration and back after
//! (on its own clock, so a server that goes away mid-run cannot leave the host at a high
//! rate), and each run's state is reported back.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{config::LimitsConfig, sample::OffCpuOptions, session::{OffCpuBudget, Settings}};

/// A run as the server describes it (the contract both sides share).
pub use profiler_pprof::runs::{AgentRun as Run, Reported as RunState, RunSettings};

/// What this host makes of a run.
pub trait RunOnHost {
    /// The run's settings within this host's limits.
    fn host_settings(&self, baseline: &Settings, limits: &LimitsConfig) -> Settings;
    /// When this host ends the run: its end, or earlier if it is longer than allowed.
    fn local_end_ms(&self, limits: &LimitsConfig) -> i64;
}

impl RunOnHost for Run {
    fn host_settings(&self, baseline: &Settings, limits: &LimitsConfig) -> Settings {
        let off_cpu = self.settings.off_cpu.then(|| OffCpuOptions {
            min_block: baseline.off_cpu.as_ref().map_or_else(|| OffCpuOptions::default().min_block, |o| o.min_block),
            sample_probability: self.settings.off_cpu_sampling.clamp(1e-4, 1.0),
            ..OffCpuOptions::default()
        });
        Settings {
            frequency_hz: self.settings.frequency_hz.clamp(1, limits.max_frequency_hz),
            off_cpu,
            // "Every switch" means exactly that: no rate control.
            off_cpu_budget: if self.settings.off_cpu_sampling >= 1.0 { OffCpuBudget::UNLIMITED } else { baseline.off_cpu_budget },
        }
    }

    fn local_end_ms(&self, limits: &LimitsConfig) -> i64 {
        self.end_ms.min(self.start_ms + limits.max_run_duration.as_millis() as i64)
    }
}

#[derive(Debug)]
pub struct Report {
    pub run_id: String,
    pub state: RunState,
    pub message: String,
}

/// Shared between the poller (writes what the server wants) and the sampling thread.
#[derive(Clone, Default)]
pub struct RunControl {
    wanted: Arc<Mutex<Option<Run>>>,
    /// Services seen in the last window: the server matches run selectors against them.
    pub services: Arc<Mutex<BTreeSet<String>>>,
}

impl RunControl {
    pub fn wanted(&self) -> Option<Run> {
        self.wanted.lock().unwrap().clone()
    }
}

pub struct Poller {
    pub client: reqwest::Client,
    pub base_url: String,
    pub token: Option<String>,
    pub host: String,
    pub labels: Vec<(String, String)>,
    pub interval: Duration,
}

impl Poller {
    pub async fn run(self, control: RunControl, mut reports: mpsc::UnboundedReceiver<Report>) {
        let mut pending: Vec<Report> = Vec::new();
        let mut tick = tokio::time::interval(self.interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                report = reports.recv() => match report {
                    Some(report) => pending.push(report),
                    None => return,
                },
            }
            while let Ok(report) = reports.try_recv() {
                pending.push(report);
            }
            // Reports wait until the server takes them; a run's end is reported even when
            // the server was away at that moment.
            let mut unsent = Vec::new();
            for report in pending.drain(..) {
                if let Err(err) = self.report(&report).await {
                    tracing::debug!("reporting run {}: {err:#}", report.run_id);
                    unsent.push(report);
                }
            }
            pending = unsent;
            match self.fetch(&control).await {
                Ok(runs) => {
                    // Several runs may apply: the most detailed one wins.
                    let best = runs.into_iter().max_by_key(|r| (r.settings.frequency_hz, r.settings.off_cpu));
                    *control.wanted.lock().unwrap() = best;
                }
                // Keep the current run: the sampling thread ends it on time by itself.
                Err(err) => tracing::debug!("polling deep-profile runs: {err:#}"),
            }
        }
    }

    fn request(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn fetch(&self, control: &RunControl) -> anyhow::Result<Vec<Run>> {
        #[derive(Deserialize)]
        struct Reply {
            runs: Vec<Run>,
        }
        let url = {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("host", &self.host);
            for service in control.services.lock().unwrap().iter() {
                query.append_pair("service", service);
            }
            for (name, value) in &self.labels {
                query.append_pair("label", &format!("{name}:{value}"));
            }
            format!("{}/api/v1/agent/runs?{}", self.base_url, query.finish())
        };
        let response = self.request(self.client.get(url)).send().await?.error_for_status()?;
        Ok(response.json::<Reply>().await?.runs)
    }

    async fn report(&self, report: &Report) -> anyhow::Result<()> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("host", &self.host)
            .append_pair("state", report.state.as_str())
            .append_pair("message", &report.message)
            .finish();
        let url = format!("{}/api/v1/agent/runs/{}?{query}", self.base_url, report.run_id);
        let response = self.request(self.client.post(url)).send().await?;
        // An unknown run (deleted meanwhile) will never be accepted: drop the report.
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        response.error_for_status()?;
        Ok(())
    }
}

/// The window over which `max_deep_time_per_day` is counted.
const DEEP_TIME_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// The sampling thread's side: which run is applied, the switches between runs, and the
/// deep-profile time this host spent over the last 24 hours.
#[derive(Default)]
pub struct Applied {
    run: Option<Run>,
    /// When the current run was switched to, on the local clock.
    since_ms: i64,
    failed: BTreeSet<String>,
    /// (start, end) of earlier runs on this host, within the window.
    spent: VecDeque<(i64, i64)>,
}

impl Applied {
    /// Given what the server wants and the time, returns the settings to switch to (if they
    /// change) and records the reports to send.
    pub fn step(
        &mut self,
        wanted: Option<Run>,
        now_ms: i64,
        limits: &LimitsConfig,
        reports: &mut Vec<Report>,
    ) -> Option<Option<Run>> {
        let wanted = wanted.filter(|run| now_ms < run.local_end_ms(limits) && !self.failed.contains(&run.id));
        if self.deep_time_ms(now_ms) >= limits.max_deep_time_per_day.as_millis() as i64 {
            let mut switch = None;
            if let Some(current) = self.run.take() {
                self.spent.push_back((self.since_ms, now_ms));
                if wanted.as_ref().is_some_and(|w| w.id == current.id) {
                    self.refuse(current.id, limits, reports);
                } else {
                    reports.push(Report { run_id: current.id, state: RunState::Done, message: String::new() });
                }
                switch = Some(None);
            }
            if let Some(run) = wanted.filter(|w| !self.failed.contains(&w.id)) {
                self.refuse(run.id, limits, reports);
            }
            return switch;
        }
        if wanted.as_ref().map(|r| &r.id) == self.run.as_ref().map(|r| &r.id) {
            return None;
        }
        if let Some(finished) = self.run.take() {
            reports.push(Report { run_id: finished.id, state: RunState::Done, message: String::new() });
            self.spent.push_back((self.since_ms, now_ms));
        }
        self.since_ms = now_ms;
        Some(wanted)
    }

    fn refuse(&mut self, run_id: String, limits: &LimitsConfig, reports: &mut Vec<Report>) {
        let budget = humantime::format_duration(limits.max_deep_time_per_day);
        let message = format!("this host's deep-profile budget ({budget} per 24 h) is spent");
        reports.push(Report { run_id: run_id.clone(), state: RunState::Failed, message });
        self.failed.insert(run_id);
    }

    /// Deep-profile time within the last 24 hours, the current run included.
    fn deep_time_ms(&mut self, now_ms: i64) -> i64 {
        let window_start = now_ms - DEEP_TIME_WINDOW_MS;
        while self.spent.front().is_some_and(|&(_, end)| end <= window_start) {
            self.spent.pop_front();
        }
        let earlier: i64 = self.spent.iter().map(|&(start, end)| end - start.max(window_start)).sum();
        let current = if self.run.is_some() { now_ms - self.since_ms.max(window_start) } else { 0 };
        earlier + current
    }

    pub fn started(&mut self, run: Run, reports: &mut Vec<Report>) {
        reports.push(Report { run_id: run.id.clone(), state: RunState::Running, message: String::new() });
        self.run = Some(run);
    }

    pub fn failed(&mut self, run: Run, error: &anyhow::Error, reports: &mut Vec<Report>) {
        reports.push(Report { run_id: run.id.clone(), state: RunState::Failed, message: format!("{error:#}") });
        self.failed.insert(run.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(id: &str, end_ms: i64) -> Run {
        Run { id: id.into(), start_ms: 0, end_ms, settings: RunSettings { frequency_hz: 4999, off_cpu: true, off_cpu_sampling: 1.0 } }
    }

    #[test]
    fn runs_start_end_on_the_local_clock_and_respect_limits() {
        let limits = LimitsConfig { max_run_duration: Duration::from_secs(10), ..LimitsConfig::default() };
        let baseline = Settings { frequency_hz: 99, off_cpu: None, off_cpu_budget: OffCpuBudget::default() };
        let settings = run("a", 60_000).host_settings(&baseline, &limits);
        assert_eq!(settings.frequency_hz, 999, "clamped to the host's limit");
        assert_eq!(settings.off_cpu_budget, OffCpuBudget::UNLIMITED);
        assert_eq!(run("a", 60_000).local_end_ms(&limits), 10_000, "cut to max_run_duration");

        let mut applied = Applied::default();
        let mut reports = Vec::new();
        let switch = applied.step(Some(run("a", 60_000)), 1_000, &limits, &mut reports).expect("starts");
        applied.started(switch.unwrap(), &mut reports);
        assert_eq!(applied.step(Some(run("a", 60_000)), 2_000, &limits, &mut reports), None, "no change while running");
        // The server is gone (it still "wants" the run), but the local end has passed.
        assert_eq!(applied.step(Some(run("a", 60_000)), 10_000, &limits, &mut reports), Some(None));
        let states: Vec<RunState> = reports.iter().map(|r| r.state).collect();
        assert_eq!(states, vec![RunState::Running, RunState::Done]);
    }

    #[test]
    fn fresh_run_ids_cannot_escape_the_daily_budget() {
        const MIN: i64 = 60_000;
        let limits = LimitsConfig { max_deep_time_per_day: Duration::from_secs(30 * 60), ..LimitsConfig::default() };
        let mut applied = Applied::default();
        let mut reports = Vec::new();
        // A new 10-minute run every 10 minutes, each under max_run_duration.
        let mut deep_minutes = 0;
        for i in 0..12 {
            let now = i * 10 * MIN;
            let next = Run { start_ms: now, ..run(&format!("r{i}"), now + 10 * MIN) };
            if let Some(Some(started)) = applied.step(Some(next), now, &limits, &mut reports) {
                applied.started(started, &mut reports);
            }
            if applied.run.is_some() {
                deep_minutes += 10;
            }
        }
        assert_eq!(deep_minutes, 30, "three runs, then the budget is spent");
        let refused = reports.iter().filter(|r| r.message.contains("budget (30m per 24 h) is spent")).count();
        assert_eq!(refused, 9, "every later run is reported failed with the reason");
        // A day later the budget is back.
        let later = 12 * 10 * MIN + DEEP_TIME_WINDOW_MS;
        let fresh = Run { start_ms: later, ..run("tomorrow", later + 10 * MIN) };
        assert!(matches!(applied.step(Some(fresh), later, &limits, &mut reports), Some(Some(_))));
    }
}
