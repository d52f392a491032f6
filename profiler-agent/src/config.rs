//! `profiler-agent run` configuration: a TOML file (unknown keys are errors) with
//! defaults for everything but the server URL. Validated completely at start-up.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use regex::Regex;
use serde::Deserialize;

use crate::{identity::Rule, sample::{OffCpuOptions, OffCpuPath, SamplerOptions}, session::{OffCpuBudget, Settings}};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub server: ServerConfig,
    #[serde(default)]
    pub sampling: SamplingConfig,
    #[serde(default)]
    pub off_cpu: OffCpuConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub privileges: PrivilegesConfig,
    /// Labels added to every profile of this host (e.g. `env = "prod"`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Environment variables of a process its `version` label is read from, first set
    /// wins (`OTEL_RESOURCE_ATTRIBUTES` gives its `service.version`). Unset: that one,
    /// `SERVICE_VERSION`, `APP_VERSION`. `[]`: no process's environment is read.
    pub version_env: Option<Vec<String>>,
    #[serde(default)]
    pub python: PythonConfig,
    #[serde(default)]
    pub custom_labels: CustomLabelsConfig,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// `[custom_labels]`: labels applications publish per thread (ABI v1 of Parca's
/// `custom-labels`), made labels of their profiles.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CustomLabelsConfig {
    /// Read them (on by default; a process that does not publish any costs nothing).
    pub enabled: bool,
    /// Keys left out of the profiles' labels: each value would be a series of its own.
    pub high_cardinality: Vec<String>,
}

impl Default for CustomLabelsConfig {
    fn default() -> Self {
        let defaults = crate::labels::LabelOptions::default();
        Self { enabled: defaults.enabled, high_cardinality: defaults.high_cardinality }
    }
}

/// `[python]`: Python frames in CPython processes' stacks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PythonConfig {
    /// Read Python frames (on by default; nothing is asked of the processes).
    pub enabled: bool,
    /// Keep the interpreter's eval-loop frames beside the Python frames they ran.
    pub eval_frames: bool,
}

impl Default for PythonConfig {
    fn default() -> Self {
        let defaults = crate::python::PythonOptions::default();
        Self { enabled: defaults.enabled, eval_frames: defaults.eval_frames }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Base URL of the collection server, e.g. `http://profiler:4040`.
    pub url: String,
    /// Bearer token for ingest.
    pub token: Option<String>,
    /// Per-request timeout.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per window before it is spooled.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// How often deep-profile runs are polled from the server ("0s" disables).
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
}

/// What a deep-profile run may ask of this host, whatever the server says.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_frequency_hz: u64,
    /// Longest one run may last on this host.
    #[serde(with = "humantime_serde")]
    pub max_run_duration: Duration,
    /// Deep-profile time this host grants over any 24 hours, across runs: a
    /// server (or whoever holds its admin token) that starts run after run
    /// cannot keep the host at a high rate.
    #[serde(with = "humantime_serde")]
    pub max_deep_time_per_day: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frequency_hz: 999,
            max_run_duration: Duration::from_secs(3600),
            max_deep_time_per_day: Duration::from_secs(4 * 3600),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    pub frequency_hz: u64,
    pub max_stack_keys: u32,
    pub user_stack_bytes: u32,
    pub ring_buffer_bytes: u32,
    pub bpf_stats: bool,
    pub bpf_stats_share: f64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        let sampler = SamplerOptions::default();
        Self {
            window: Duration::from_secs(10),
            frequency_hz: sampler.frequency_hz,
            max_stack_keys: sampler.max_stack_keys,
            user_stack_bytes: sampler.user_stack_bytes,
            ring_buffer_bytes: sampler.ring_buffer_bytes,
            bpf_stats: sampler.bpf_stats,
            bpf_stats_share: sampler.bpf_stats_share,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffCpuConfig {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub min_block: Duration,
    /// Highest share of switches recorded; rate control may lower it to meet `budget`.
    pub sampling: f64,
    /// Recorded switches per second.
    pub budget: u64,
    /// In-kernel CPU time per second spent recording switch-outs.
    #[serde(with = "humantime_serde")]
    pub cpu_budget: Duration,
    /// Threads that switched out at most this many times in the last 100 ms have every
    /// switch-out recorded; the others are sampled.
    pub thread_quota: u32,
    /// Threads over their quota that switched out at most this many times in the last
    /// 100 ms and waited long lately have every long wait counted whole (0: none).
    pub stamp_limit: u32,
    /// Switch-outs of a thread from the same place that take the kernel stack walked at
    /// the first one, before it is walked again (0: every one is walked).
    pub kernel_stack_reuses: u32,
    /// Where waits get their stacks: `auto`, `switch-out` or `switch-in`.
    pub path: OffCpuPath,
}

impl Default for OffCpuConfig {
    fn default() -> Self {
        let defaults = OffCpuOptions::default();
        let budget = OffCpuBudget::default();
        Self {
            enabled: true,
            min_block: defaults.min_block,
            sampling: defaults.sample_probability,
            budget: budget.switches_per_s,
            cpu_budget: budget.kernel_cpu_per_s,
            thread_quota: defaults.thread_quota,
            stamp_limit: defaults.stamp_limit,
            kernel_stack_reuses: defaults.kernel_stack_reuses,
            path: defaults.path,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Windows that could not be shipped wait here, oldest dropped first past `max_bytes`.
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// Server failures (5xx) of one spooled window, while the server accepts later ones,
    /// before the window is given up on as poison and counted as dead-lettered.
    pub dead_letter_after: u32,
}

impl OffCpuConfig {
    pub fn budget(&self) -> OffCpuBudget {
        OffCpuBudget { switches_per_s: self.budget, kernel_cpu_per_s: self.cpu_budget }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("/var/lib/profiler-agent/spool"), max_bytes: 256 << 20, dead_letter_after: 10 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivilegesConfig {
    /// Who a daemon started as root runs as once its programs are loaded: a user name,
    /// or `UID:GID`. It keeps only the capabilities sampling needs; `root` keeps uid 0.
    /// The default, 65534:65534, is nobody on most distributions and needs no user
    /// database (minimal container images have none).
    pub user: String,
}

impl Default for PrivilegesConfig {
    fn default() -> Self {
        Self { user: "65534:65534".to_string() }
    }
}

impl PrivilegesConfig {
    pub fn user(&self) -> anyhow::Result<crate::privileges::User> {
        crate::privileges::User::resolve(&self.user).context("privileges.user")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where /metrics is served; empty to disable.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9464".into() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub comm: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub cgroup: Option<String>,
    pub service: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_attempts() -> u32 {
    4
}

fn default_poll() -> Duration {
    Duration::from_secs(5)
}

impl AgentConfig {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::load_str(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn load_str(text: &str) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|err| anyhow::anyhow!("{}", err.message()))
    }

    pub fn sampler_options(&self) -> SamplerOptions {
        SamplerOptions {
            frequency_hz: self.sampling.frequency_hz,
            pid: None,
            off_cpu: self.off_cpu.enabled.then_some(OffCpuOptions {
                min_block: self.off_cpu.min_block,
                sample_probability: self.off_cpu.sampling,
                thread_quota: self.off_cpu.thread_quota,
                stamp_limit: self.off_cpu.stamp_limit,
                kernel_stack_reuses: self.off_cpu.kernel_stack_reuses,
                path: self.off_cpu.path,
                ..OffCpuOptions::default()
            }),
            max_stack_keys: self.sampling.max_stack_keys,
            user_stack_bytes: self.sampling.user_stack_bytes,
            ring_buffer_bytes: self.sampling.ring_buffer_bytes,
            bpf_stats: self.sampling.bpf_stats,
            bpf_stats_share: self.sampling.bpf_stats_share,
            version_env: self.version_env.clone().unwrap_or_else(crate::process::default_version_env),
            python: crate::python::PythonOptions { enabled: self.python.enabled, eval_frames: self.python.eval_frames },
            labels: crate::labels::LabelOptions {
                enabled: self.custom_labels.enabled,
                high_cardinality: self.custom_labels.high_cardinality.clone(),
            },
            ..SamplerOptions::default()
        }
    }

    /// The settings outside deep-profile runs.
    pub fn baseline_settings(&self) -> Settings {
        let options = self.sampler_options();
        Settings { frequency_hz: options.frequency_hz, off_cpu: options.off_cpu, off_cpu_budget: self.off_cpu.budget() }
    }

    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.metrics.listen.is_empty() {
            return Ok(None);
        }
        let addr = self.metrics.listen.parse().with_context(|| format!("metrics.listen {:?} is not an address", self.metrics.listen))?;
        Ok(Some(addr))
    }

    /// Compiles the rules; a bad regex names the rule and the field.
    pub fn rules(&self) -> anyhow::Result<Vec<Rule>> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let compile = |field: &str, pattern: &Option<String>| -> anyhow::Result<Option<Regex>> {
                    pattern
                        .as_deref()
                        .map(|p| Regex::new(p).map_err(|err| anyhow::anyhow!("rules[{i}].{field}: bad regex {p:?}: {err}")))
                        .transpose()
                };
                if rule.service.is_none() && rule.labels.is_empty() {
                    bail!("rules[{i}] sets neither a service nor labels");
                }
                check_label_names(rule.labels.keys()).with_context(|| format!("rules[{i}].labels"))?;
                Ok(Rule {
                    comm: compile("comm", &rule.comm)?,
                    exe: compile("exe", &rule.exe)?,
                    cmdline: compile("cmdline", &rule.cmdline)?,
                    cgroup: compile("cgroup", &rule.cgroup)?,
                    service: rule.service.clone(),
                    labels: rule.labels.clone(),
                })
            })
            .collect()
    }

    /// Everything that can be checked before sampling starts.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.rules()?;
        check_label_names(self.labels.keys()).context("labels")?;
        self.metrics_addr()?;
        self.privileges.user()?;
        validate_url(&self.server.url)?;
        if self.sampling.window < Duration::from_secs(1) {
            bail!("sampling.window must be at least 1s");
        }
        if self.spool.max_bytes == 0 {
            bail!("spool.max_bytes must be positive");
        }
        if self.spool.dead_letter_after == 0 {
            bail!("spool.dead_letter_after must be at least 1");
        }
        if self.limits.max_frequency_hz == 0 || self.limits.max_frequency_hz > 10_000 {
            bail!("limits.max_frequency_hz must be in 1..=10000");
        }
        if self.server.max_attempts == 0 {
            bail!("server.max_attempts must be at least 1");
        }
        check_bpf_stats_share(self.sampling.bpf_stats_share).context("sampling.bpf_stats_share")?;
        if let Some(bad) = self.version_env.iter().flatten().find(|name| name.is_empty() || name.contains(['=', '\0'])) {
            bail!("version_env: {bad:?} is not an environment variable name");
        }
        Ok(())
    }
}

/// Label names the server accepts and that survive the ingest query
/// (`profiler_pprof::is_label_name`).
fn check_label_names<'a>(mut names: impl Iterator<Item = &'a String>) -> anyhow::Result<()> {
    match names.find(|name| !profiler_pprof::is_label_name(name)) {
        Some(bad) => bail!("label name {bad:?}: use ASCII letters, digits and _ . / - (no ':')"),
        None => Ok(()),
    }
}

/// A share of the time BPF statistics are on must be in (0, 1].
pub fn check_bpf_stats_share(share: f64) -> anyhow::Result<()> {
    if !(share > 0.0 && share <= 1.0) {
        bail!("must be in (0, 1], got {share} (to turn the statistics off, use bpf_stats = false)");
    }
    Ok(())
}

/// The URL must parse and its host must resolve; a server that is merely down is not a
/// configuration error (windows are spooled until it is back).
fn validate_url(url: &str) -> anyhow::Result<()> {
    let parsed = reqwest::Url::parse(url).map_err(|err| anyhow::anyhow!("server.url {url:?} is not a URL: {err}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("server.url {url:?} must be http or https");
    }
    let host = parsed.host_str().ok_or_else(|| anyhow::anyhow!("server.url {url:?} has no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|err| anyhow::anyhow!("server.url host {host:?} does not resolve: {err}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<AgentConfig> {
        let config = AgentConfig::load_str(text)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn shipped_example_config_parses() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let config = AgentConfig::load(&path).unwrap();
        config.rules().unwrap();
        assert_eq!(config.sampling.window, Duration::from_secs(10));
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse("[server]\nurl = \"http://127.0.0.1:4040\"\n").unwrap();
        assert_eq!(config.sampling.window, Duration::from_secs(10));
        assert!(config.off_cpu.enabled);
        assert_eq!(config.server.max_attempts, 4);
        assert_eq!(config.spool.dead_letter_after, 10);
        let nobody = crate::privileges::User { uid: 65534, gid: 65534 };
        assert_eq!(config.privileges.user().unwrap(), nobody);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = parse("[server]\nurl = \"http://127.0.0.1:1\"\nbogus = 1\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `bogus`"), "{err}");
        let err = parse("[server]\nurl = \"http://127.0.0.1:1\"\n[[rules]]\ncomm = \"(unclosed\"\nservice = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("rules[0].comm: bad regex"), "{err}");
        let err = parse("[server]\nurl = \"http://no-such-host.invalid:4040\"\n").unwrap_err().to_string();
        assert!(err.contains("does not resolve"), "{err}");
        let err = parse("[server]\nurl = \"ftp://127.0.0.1\"\n").unwrap_err().to_string();
        assert!(err.contains("must be http"), "{err}");
        let err = parse("version_env = [\"GIT=SHA\"]\n[server]\nurl = \"http://127.0.0.1:1\"\n").unwrap_err().to_string();
        assert!(err.contains("version_env: \"GIT=SHA\" is not an environment variable name"), "{err}");
        let own = parse("version_env = [\"GIT_COMMIT\"]\n[server]\nurl = \"http://127.0.0.1:1\"\n").unwrap();
        assert_eq!(own.sampler_options().version_env, ["GIT_COMMIT"]);
        let none = parse("version_env = []\n[server]\nurl = \"http://127.0.0.1:1\"\n").unwrap();
        assert!(none.sampler_options().version_env.is_empty());
    }
}
