//! The deep-profile run contract between agent and server, defined once for both:
//! what `GET /api/v1/agent/runs` answers (each [`AgentRun`] active for the agent) and
//! what `POST /api/v1/agent/runs/{id}?state=` reports ([`Reported`]).

use serde::{Deserialize, Serialize};

/// How a run samples.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunSettings {
    pub frequency_hz: u64,
    #[serde(default = "yes")]
    pub off_cpu: bool,
    /// Share of context switches recorded; 1 = every switch.
    #[serde(default = "one")]
    pub off_cpu_sampling: f64,
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

/// A run active for one agent now, with the server's limits applied to its settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct AgentRun {
    pub id: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub settings: RunSettings,
}

/// What an agent reports of a run on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reported {
    Running,
    Done,
    Failed,
}

impl Reported {
    pub fn as_str(self) -> &'static str {
        match self {
            Reported::Running => "running",
            Reported::Done => "done",
            Reported::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Reported::Running, Reported::Done, Reported::Failed].into_iter().find(|r| r.as_str() == text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_and_settings_take_defaults() {
        for r in [Reported::Running, Reported::Done, Reported::Failed] {
            assert_eq!(Reported::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reported::parse("planned"), None);
        let s: RunSettings = serde_json::from_str(r#"{"frequency_hz": 99}"#).unwrap();
        assert_eq!(s, RunSettings { frequency_hz: 99, off_cpu: true, off_cpu_sampling: 1.0 });
    }
}
