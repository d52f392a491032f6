//! Deep-profile runs scheduled on the server: the agent polls for the runs that apply to
//! it, the sampling thread switches to a run's settings for its duration and back after
//! (on its own clock, so a server that goes away mid-run cannot leave the host at a high
//! rate), and each run's state is reported back.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{config::LimitsConfig, sample::OffCpuOptions, session::{OffCpuBudget, Settings}};

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct RunSettings {
    pub frequency_hz: u64,
    pub off_cpu: bool,
    pub off_cpu_sampling: f64,
}

/// A run as the server describes it.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Run {
    pub id: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub settings: RunSettings,
}

impl Run {
    /// The run's settings within this host's limits.
    pub fn settings(&self, baseline: &Settings, limits: &LimitsConfig) -> Settings {
        let off_cpu = self.settings.off_cpu.then(|| OffCpuOptions {
            min_block: baseline.off_cpu.as_ref().map_or_else(|| OffCpuOptions::default().min_block, |o| o.min_block),
            sample_probability: self.settings.off_cpu_sampling.clamp(1e-4, 1.0),
        });
        Settings {
            frequency_hz: self.settings.frequency_hz.clamp(1, limits.max_frequency_hz),
            off_cpu,
            // "Every switch" means exactly that: no rate control.
            off_cpu_budget: if self.settings.off_cpu_sampling >= 1.0 { OffCpuBudget::UNLIMITED } else { baseline.off_cpu_budget },
        }
    }

    /// When this host ends the run: its end, or earlier if it is longer than allowed.
    pub fn local_end_ms(&self, limits: &LimitsConfig) -> i64 {
        self.end_ms.min(self.start_ms + limits.max_run_duration.as_millis() as i64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Done,
    Failed,
}

impl RunState {
    fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Done => "done",
            RunState::Failed => "failed",
        }
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

/// The sampling thread's side: which run is applied, and the switches between runs.
#[derive(Default)]
pub struct Applied {
    run: Option<Run>,
    failed: BTreeSet<String>,
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
        if wanted.as_ref().map(|r| &r.id) == self.run.as_ref().map(|r| &r.id) {
            return None;
        }
        if let Some(finished) = self.run.take() {
            reports.push(Report { run_id: finished.id, state: RunState::Done, message: String::new() });
        }
        Some(wanted)
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
        let limits = LimitsConfig { max_frequency_hz: 999, max_run_duration: Duration::from_secs(10) };
        let baseline = Settings { frequency_hz: 99, off_cpu: None, off_cpu_budget: OffCpuBudget::default() };
        let settings = run("a", 60_000).settings(&baseline, &limits);
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
}
