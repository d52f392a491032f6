//! Configuration: a TOML file with defaults for every field, overridden by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// Collection server for the continuous profiler: ingests pprof and folded
/// profiles, stores them in an embedded WAL + Parquet store and serves
/// merged flame graphs, diffs and exports over HTTP.
#[derive(Debug, clap::Parser)]
#[command(
    name = "profiler-server",
    version,
    after_help = "Examples:\n  profiler-server --data-dir /var/lib/profiler --listen 0.0.0.0:4040 --token $TOKEN --read-token $READ_TOKEN\n  profiler-server --config server.toml --print-config\n\nAPI: see profiler-server/README.md (ingest: POST /api/v1/ingest, Pyroscope POST /ingest;\nqueries: /api/v1/{services,labels,label_values,timeline,flamegraph,diff,top,folded,pprof,svg})."
)]
pub struct Args {
    /// Directory holding the WAL, Parquet segments and the catalog.
    #[arg(long, env = "PROFILER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:4040 (port 0 picks a free port).
    #[arg(long, env = "PROFILER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// TOML configuration file; flags override its values.
    #[arg(long, env = "PROFILER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Ingest bearer token for agents and SDKs (repeatable); adds to `tokens`
    /// from the file.
    #[arg(long = "token", env = "PROFILER_TOKENS", value_delimiter = ',')]
    pub tokens: Vec<String>,
    /// Admin bearer token (repeatable): changes schedules and runs, and may
    /// also ingest and read. Without one, schedules and runs cannot be changed
    /// once ingest tokens are set.
    #[arg(long = "admin-token", env = "PROFILER_ADMIN_TOKENS", value_delimiter = ',')]
    pub admin_tokens: Vec<String>,
    /// Read bearer token (repeatable): when any is set, queries, the UI's data
    /// and /metrics need a read or admin token.
    #[arg(long = "read-token", env = "PROFILER_READ_TOKENS", value_delimiter = ',')]
    pub read_tokens: Vec<String>,
    /// Allow listening on a non-loopback address without any token.
    #[arg(long)]
    pub insecure: bool,
    /// On a non-loopback address, serve queries, the UI's data and /metrics
    /// without a token (flame graphs show your code paths; change detection is
    /// costly). Without it such a server needs --read-token.
    #[arg(long)]
    pub public_reads: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Ingest bearer tokens (agents, SDKs). With neither these nor admin
    /// tokens, writes are open: allowed on loopback or with `insecure` only.
    pub tokens: Vec<String>,
    /// Tokens that change schedules and runs (and may ingest and read).
    pub admin_tokens: Vec<String>,
    /// When non-empty, reads need one of these or an admin token.
    pub read_tokens: Vec<String>,
    /// Listen on a non-loopback address without tokens (reads included).
    pub insecure: bool,
    /// Serve reads without a token on a non-loopback address; otherwise such a
    /// server needs `read_tokens`.
    pub public_reads: bool,
    pub limits: Limits,
    pub storage: Storage,
    /// Used when `storage.backend = "clickhouse"`.
    pub clickhouse: ClickHouse,
    pub deploys: Deploys,
    /// Scheduled comparisons (`[[alerts]]`): each period of a service
    /// against its baseline; events when it regressed.
    pub alerts: Vec<crate::events::AlertRule>,
}

/// Deploy awareness: a service's new `version` label is a deploy, and the
/// time after it is compared with the time before.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Deploys {
    /// Seconds after (and before) a deploy that are compared.
    pub compare_secs: u64,
    /// Seconds between checks for deploys whose time after has passed.
    pub check_secs: u64,
    /// URL that each compared deploy and each alert is POSTed to as JSON;
    /// empty: none.
    pub webhook: String,
}

impl Default for Deploys {
    fn default() -> Self {
        Deploys { compare_secs: 3600, check_secs: 30, webhook: String::new() }
    }
}

/// Which store holds the profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Backend {
    /// WAL + Parquet + redb in `data_dir` (one instance).
    #[serde(rename = "embedded")]
    Embedded,
    /// A ClickHouse database shared by any number of instances.
    #[serde(rename = "clickhouse")]
    ClickHouse,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouse {
    /// HTTP interface (port 8123, or 8443 with https).
    pub url: String,
    /// Created if missing; letters, digits and `_`.
    pub database: String,
    pub user: String,
    /// Also from the PROFILER_CLICKHOUSE_PASSWORD environment variable.
    pub password: String,
    /// TTL of the 1-minute rollup, days (0 = forever); raw samples use
    /// `storage.retention_hours`.
    pub rollup_retention_days: u64,
    /// Let ClickHouse batch small INSERTs (async_insert, waiting for the
    /// write before acknowledging an ingest).
    pub async_insert: bool,
}

impl Default for ClickHouse {
    fn default() -> Self {
        ClickHouse {
            url: "http://127.0.0.1:8123".into(),
            database: "profiler".into(),
            user: "default".into(),
            password: String::new(),
            rollup_retention_days: 90,
            async_insert: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest accepted request body (compressed), bytes.
    pub max_body_bytes: usize,
    /// Largest accepted decompressed profile, bytes.
    pub max_decompressed_bytes: usize,
    /// Largest memory a decoded pprof may take (estimated from the wire
    /// before decoding), bytes.
    pub max_decoded_bytes: usize,
    /// Samples one pprof may hold.
    pub max_samples: usize,
    /// Longest string a pprof may hold, bytes.
    pub max_string_len: usize,
    /// Frame names are cut to this many bytes (marked with `…`).
    pub max_frame_name_len: usize,
    /// Bytes of distinct stacks (frame names) one request may add.
    pub max_batch_bytes: usize,
    /// Memory all ingest requests together may hold (bodies, decompressed
    /// and decoded profiles, batches), bytes.
    pub ingest_memory_bytes: usize,
    /// How long a request waits for its share of that memory before 503.
    pub ingest_wait_secs: u64,
    /// Widest range one query may cover, hours.
    pub max_query_range_hours: u64,
    /// Most nodes a flame graph or diff returns (more `max_nodes` is capped).
    pub max_nodes: usize,
    /// Most stacks an export (folded, pprof, SVG) holds; the lightest rest is
    /// merged into one `[truncated]` stack.
    pub max_stacks: usize,
    /// A query running longer is answered 503 and its scan cancelled.
    pub query_timeout_secs: u64,
    /// Queries running at once; more wait briefly, then get 503.
    pub max_concurrent_queries: usize,
    /// Distinct label sets (series) one request may create.
    pub max_series_per_request: usize,
    /// Rows of the request table one ingest request may write: one per request and
    /// part (the agent sends at most 200,000 (stack, request) pairs a window).
    pub max_request_rows: usize,
    /// Sample labels (pprof, OTLP, Pyroscope) that name a request rather than a
    /// series: a sample's time goes to the request table under each of them it has,
    /// and its series is the one without them. The request views read one key at a
    /// time, by default the first of this list a service has.
    pub request_labels: Vec<String>,
    /// Requests one query over the request table may gather (a few hundred bytes
    /// each); more are refused (413) with a hint to narrow the range.
    pub max_query_requests: usize,
    /// Labels one series may carry.
    pub max_labels_per_series: usize,
    pub max_label_name_len: usize,
    pub max_label_value_len: usize,
    /// Frames kept per stack; deeper stacks are cut at the leaf end.
    pub max_stack_depth: usize,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// `embedded` (default) or `clickhouse` (see the `[clickhouse]` table).
    pub backend: Backend,
    /// Seconds between flushes of the WAL-backed buffer to Parquet.
    pub flush_interval_secs: u64,
    /// Buffered rows that trigger an early flush.
    pub flush_rows: usize,
    /// Ingest timestamps are aligned down to this window, milliseconds.
    pub window_ms: i64,
    /// Time span of one Parquet segment, milliseconds.
    pub segment_span_ms: i64,
    /// Segments entirely older than this are deleted, hours (0 = keep forever).
    pub retention_hours: u64,
    /// Data older than this many hours is downsampled to 1-minute windows.
    pub downsample_1m_after_hours: u64,
    /// Data older than this many hours is downsampled to 10-minute windows.
    pub downsample_10m_after_hours: u64,
    /// Seconds between retention/downsampling passes.
    pub maintenance_interval_secs: u64,
    /// A batch id (the agent's `batch_id`) seen within this many seconds is
    /// acknowledged without being stored again.
    pub dedup_window_secs: u64,
    /// At most this many batch ids are remembered (about 64 bytes each).
    pub dedup_max_ids: usize,
    /// Ingest answers 503 while more rows than this wait for a flush.
    pub max_buffered_rows: usize,
    /// Ingest answers 503 while the WAL holds more bytes than this.
    pub max_wal_bytes: u64,
    /// Memory for segments' per-stack totals, which spare wide queries the
    /// segments' rows (about 16 bytes per stack and segment).
    pub totals_cache_bytes: usize,
    /// Memory for answers to queries over ranges that ended over a minute
    /// ago (dashboards, diffs against a past range); late data drops them.
    pub result_cache_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:4040".parse().expect("valid literal"),
            data_dir: PathBuf::from("profiler-data"),
            tokens: Vec::new(),
            admin_tokens: Vec::new(),
            read_tokens: Vec::new(),
            insecure: false,
            public_reads: false,
            limits: Limits::default(),
            storage: Storage::default(),
            clickhouse: ClickHouse::default(),
            deploys: Deploys::default(),
            alerts: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 16 << 20,
            max_decompressed_bytes: 32 << 20,
            max_decoded_bytes: 128 << 20,
            max_samples: 2_000_000,
            max_string_len: 64 << 10,
            max_frame_name_len: 4096,
            max_batch_bytes: 64 << 20,
            ingest_memory_bytes: 384 << 20,
            ingest_wait_secs: 10,
            max_query_range_hours: 24 * 31,
            max_nodes: 100_000,
            max_stacks: 200_000,
            query_timeout_secs: 30,
            max_concurrent_queries: 8,
            max_series_per_request: 10_000,
            max_request_rows: 200_000,
            request_labels: ["request_id", "trace_id", "span_id"].map(String::from).to_vec(),
            max_query_requests: 1_000_000,
            max_labels_per_series: 64,
            max_label_name_len: 128,
            max_label_value_len: 1024,
            max_stack_depth: 1024,
        }
    }
}

impl Limits {
    /// Memory one request may need at its peak.
    pub fn max_request_memory(&self) -> usize {
        self.max_body_bytes
            .saturating_add(self.max_decompressed_bytes)
            .saturating_add(self.max_decoded_bytes)
            .saturating_add(self.max_batch_bytes)
    }

    pub fn decode(&self) -> profiler_pprof::DecodeLimits {
        profiler_pprof::DecodeLimits {
            max_decompressed_bytes: self.max_decompressed_bytes,
            max_decoded_bytes: self.max_decoded_bytes,
            max_samples: self.max_samples,
            max_string_len: self.max_string_len,
        }
    }
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            backend: Backend::Embedded,
            flush_interval_secs: 60,
            flush_rows: 2_000_000,
            window_ms: 10_000,
            segment_span_ms: 600_000,
            retention_hours: 24 * 14,
            downsample_1m_after_hours: 6,
            downsample_10m_after_hours: 48,
            maintenance_interval_secs: 300,
            dedup_window_secs: 3600,
            dedup_max_ids: 1_000_000,
            max_buffered_rows: 8_000_000,
            max_wal_bytes: 2 << 30,
            totals_cache_bytes: 128 << 20,
            result_cache_bytes: 64 << 20,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// File (if any) first, then flags on top.
    pub fn from_args(args: &Args) -> anyhow::Result<Config> {
        let mut cfg = match &args.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        if let Some(d) = &args.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(l) = args.listen {
            cfg.listen = l;
        }
        if let Ok(p) = std::env::var("PROFILER_CLICKHOUSE_PASSWORD") {
            cfg.clickhouse.password = p;
        }
        let given = |t: &Vec<String>| t.iter().filter(|t| !t.is_empty()).cloned().collect::<Vec<_>>();
        cfg.tokens.extend(given(&args.tokens));
        cfg.admin_tokens.extend(given(&args.admin_tokens));
        cfg.read_tokens.extend(given(&args.read_tokens));
        cfg.insecure |= args.insecure;
        cfg.public_reads |= args.public_reads;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let s = &self.storage;
        anyhow::ensure!(s.window_ms > 0, "storage.window_ms must be positive");
        anyhow::ensure!(
            self.deploys.compare_secs as i64 * 1000 >= 2 * s.window_ms && self.deploys.check_secs > 0,
            "deploys.compare_secs must cover two storage windows and deploys.check_secs be positive"
        );
        for (i, a) in self.alerts.iter().enumerate() {
            anyhow::ensure!(
                !a.name.is_empty() && !a.service.is_empty() && a.every_secs as i64 * 1000 >= 2 * s.window_ms,
                "alerts[{i}] needs a name, a service (or \"*\") and every_secs covering two storage windows"
            );
        }
        let mut names: Vec<&str> = self.alerts.iter().map(|a| a.name.as_str()).collect();
        names.sort_unstable();
        anyhow::ensure!(names.windows(2).all(|w| w[0] != w[1]), "alert names must be unique");
        anyhow::ensure!(
            s.segment_span_ms >= s.window_ms && s.segment_span_ms % s.window_ms == 0,
            "storage.segment_span_ms must be a positive multiple of window_ms"
        );
        anyhow::ensure!(
            s.flush_interval_secs > 0,
            "storage.flush_interval_secs must be positive"
        );
        let l = &self.limits;
        anyhow::ensure!(l.max_body_bytes > 0, "limits.max_body_bytes must be positive");
        let one_request = l.max_request_memory();
        anyhow::ensure!(
            l.ingest_memory_bytes >= one_request,
            "limits.ingest_memory_bytes ({}) must hold at least one request of the largest size: \
             max_body_bytes + max_decompressed_bytes + max_decoded_bytes + max_batch_bytes = {one_request}",
            l.ingest_memory_bytes
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_rejected_and_defaults_fill_gaps() {
        let cfg: Config =
            toml::from_str("tokens = [\"t\"]\n[limits]\nmax_body_bytes = 10\n").unwrap();
        assert_eq!(cfg.tokens, ["t"]);
        assert_eq!(cfg.limits.max_body_bytes, 10);
        assert_eq!(cfg.limits.max_decompressed_bytes, 32 << 20);
        assert!(toml::from_str::<Config>("listn = \"127.0.0.1:1\"").is_err());
        assert!(toml::from_str::<Config>("[storage]\nflush_secs = 1").is_err());
        assert_eq!(cfg.storage.backend, Backend::Embedded);
    }

    #[test]
    fn clickhouse_backend_is_selected_by_config() {
        let cfg: Config = toml::from_str(
            "[storage]\nbackend = \"clickhouse\"\n[clickhouse]\nurl = \"http://ch:8123\"\ndatabase = \"prof\"\n",
        )
        .unwrap();
        assert_eq!(cfg.storage.backend, Backend::ClickHouse);
        assert_eq!(cfg.clickhouse.url, "http://ch:8123");
        assert_eq!(cfg.clickhouse.database, "prof");
        assert_eq!(cfg.clickhouse.user, "default");
        assert!(toml::from_str::<Config>("[storage]\nbackend = \"mysql\"").is_err());
        assert!(toml::from_str::<Config>("[clickhouse]\nhost = \"x\"").is_err());
    }
}
