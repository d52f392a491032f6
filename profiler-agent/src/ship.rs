//! Ship stage: turns a window into one gzip pprof per (service, labels, kind) and sends
//! it to the server's ingest API, with timeouts, retries and exponential backoff.
//!
//! What an answer means for the window is decided in one place, [`ShipError::from_status`]:
//! only a 4xx that describes the payload itself (400, 413, 415, 422, ...) drops it.
//! 401, 403 and 404 say the token, the URL or a proxy in between is wrong, which someone
//! will fix: the window is kept, like when the server is away.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::Ordering::Relaxed,
    },
    time::{Duration, Instant},
};

use anyhow::anyhow;
use profiler_pprof::{ProfileBuilder, encode_gzip, kind::Kind};
use reqwest::StatusCode;

use crate::{identity::Identity, metrics::Metrics};

/// One request's worth: the ingest query string and the gzip pprof body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    pub query: String,
    pub body: Vec<u8>,
    /// Sum of the profile's values (ns), for accounting.
    pub value: u64,
}

impl Payload {
    /// `[query length u32 LE][query][value u64 LE][body]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.query.len() + self.body.len());
        out.extend_from_slice(&(self.query.len() as u32).to_le_bytes());
        out.extend_from_slice(self.query.as_bytes());
        out.extend_from_slice(&self.value.to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(raw: &[u8]) -> Option<Self> {
        let len = u32::from_le_bytes(raw.get(..4)?.try_into().ok()?) as usize;
        let query = std::str::from_utf8(raw.get(4..4 + len)?).ok()?.to_string();
        let value = u64::from_le_bytes(raw.get(4 + len..12 + len)?.try_into().ok()?);
        Some(Self { query, value, body: raw.get(12 + len..)?.to_vec() })
    }
}

/// Stacks of one window for one (identity, kind): frames root first, value in ns.
pub type Stacks = BTreeMap<Vec<std::sync::Arc<str>>, u64>;

pub struct WindowMeta {
    pub start_ms: u64,
    pub end_ms: u64,
    pub period_ns: u64,
}

/// `batch_id` names the payload for the server, which drops a batch it already stored:
/// an acknowledgement lost to a timeout must not double the window when it is resent.
/// It is in the query, so it survives retries, the spool and agent restarts unchanged.
pub fn build_payload(
    identity: &Identity,
    host_labels: &BTreeMap<String, String>,
    kind: Kind,
    stacks: &Stacks,
    meta: &WindowMeta,
    batch_id: &str,
) -> Payload {
    let kind_name = kind.name();
    let mut builder = ProfileBuilder::new(&[(kind_name.as_str(), "nanoseconds")])
        .period("cpu", "nanoseconds", meta.period_ns as i64)
        .time(meta.start_ms as i64 * 1_000_000, (meta.end_ms - meta.start_ms) as i64 * 1_000_000);
    let mut value = 0u64;
    for (frames, ns) in stacks {
        builder.add(frames, &[*ns as i64], &[]);
        value += ns;
    }
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("service", &identity.service)
        .append_pair("kind", &kind_name)
        .append_pair("from", &meta.start_ms.to_string())
        .append_pair("until", &meta.end_ms.to_string())
        .append_pair("batch_id", batch_id);
    for (name, label_value) in host_labels.iter().chain(&identity.labels) {
        query.append_pair("label", &format!("{name}:{label_value}"));
    }
    Payload { query: query.finish(), body: encode_gzip(&builder.build()), value }
}

#[derive(Debug)]
pub enum ShipError {
    /// No answer (connection, timeout), or one that says the server is busy or away
    /// (408, 429, 502, 503, 504): keep the window, try later.
    Unavailable(anyhow::Error),
    /// 401, 403 or 404: the token, the URL or a proxy in between is wrong ("not ours").
    /// Nothing is wrong with the window: keep it until someone fixes the configuration.
    Misconfigured(anyhow::Error),
    /// Any other 5xx (500 mostly): the server failed on this request. Keep the window; a
    /// payload the server keeps failing while it accepts later ones is poison (see the
    /// spool replay in `daemon`).
    ServerFailed(anyhow::Error),
    /// Any other 4xx: the server refused this window for what it is; retrying cannot help.
    Rejected(anyhow::Error),
}

impl ShipError {
    /// The outcome of an answer that is not a success.
    pub fn from_status(status: StatusCode, err: anyhow::Error) -> Self {
        match status.as_u16() {
            401 | 403 | 404 => Self::Misconfigured(err),
            408 | 429 | 502 | 503 | 504 => Self::Unavailable(err),
            _ if status.is_server_error() => Self::ServerFailed(err),
            _ => Self::Rejected(err),
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Rejected(_))
    }
}

impl std::fmt::Display for ShipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(err) | Self::Misconfigured(err) | Self::ServerFailed(err) | Self::Rejected(err) => {
                write!(f, "{err:#}")
            }
        }
    }
}

pub struct Shipper {
    client: reqwest::Client,
    ingest_url: String,
    token: Option<String>,
    max_attempts: u32,
    metrics: Arc<Metrics>,
    misconfigured_log: Throttle,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// A server that refuses the token or the route refuses every request: say so about
/// once a minute, loud enough to be seen, without flooding the log.
const MISCONFIGURED_LOG_EVERY: Duration = Duration::from_secs(60);

impl Shipper {
    pub fn new(
        base_url: &str,
        token: Option<String>,
        timeout: Duration,
        max_attempts: u32,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build()?;
        Ok(Self {
            client,
            ingest_url: format!("{}/api/v1/ingest", base_url.trim_end_matches('/')),
            token,
            max_attempts,
            metrics,
            misconfigured_log: Throttle::new(MISCONFIGURED_LOG_EVERY),
        })
    }

    /// One attempt.
    pub async fn send(&self, payload: &Payload) -> Result<(), ShipError> {
        let mut request = self
            .client
            .post(format!("{}?{}", self.ingest_url, payload.query))
            .header("content-type", "application/octet-stream")
            .header("content-encoding", "identity")
            .body(payload.body.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|err| ShipError::Unavailable(anyhow!("sending: {err}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        let error = ShipError::from_status(status, anyhow!("server answered {status}: {}", body.trim()));
        if let ShipError::Misconfigured(err) = &error {
            self.metrics.ship_auth_failures.fetch_add(1, Relaxed);
            if let Some(suppressed) = self.misconfigured_log.ready() {
                tracing::error!(
                    url = %self.ingest_url,
                    status = status.as_u16(),
                    suppressed,
                    "authentication or route failed ({err:#}): check server.url and the token; profiles are kept in the spool until the server accepts them"
                );
            }
        }
        Err(error)
    }

    /// Up to `max_attempts` attempts with exponential backoff and jitter.
    pub async fn send_with_retries(&self, payload: &Payload) -> Result<(), ShipError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.send(payload).await {
                Err(err) if err.is_retryable() && attempt < self.max_attempts => {
                    tracing::debug!(attempt, "ship failed, retrying: {err}");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

/// Lets an event through at most once per `every`, and counts the ones it held back.
struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Self { every, state: Mutex::new((None, 0)) }
    }

    /// `Some(events held back since the last one let through)`, or `None` to hold this one.
    fn ready(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap();
        let (last, held) = &mut *state;
        if last.is_some_and(|last| last.elapsed() < self.every) {
            *held += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(held))
    }
}

/// 50-100% of `base`, drawn afresh each time, so agents that lost the server together do
/// not retry together.
pub fn jitter(base: Duration) -> Duration {
    base.mul_f64(0.5 + fastrand::f64() / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn payload_round_trips_and_carries_labels() {
        let identity = Identity { service: "checkout".into(), labels: [("systemd_unit".to_string(), "checkout.service".to_string())].into() };
        let host = [("host".to_string(), "h1".to_string())].into();
        let mut stacks = Stacks::new();
        stacks.insert(vec![Arc::from("app"), Arc::from("main")], 30);
        stacks.insert(vec![Arc::from("app"), Arc::from("burn")], 70);
        let meta = WindowMeta { start_ms: 10_000, end_ms: 20_000, period_ns: 10 };
        let payload = build_payload(&identity, &host, Kind::OnCpu, &stacks, &meta, "00ff-10000-0");
        assert_eq!(payload.value, 100);
        assert!(
            payload.query.contains("service=checkout&kind=on-cpu&from=10000&until=20000&batch_id=00ff-10000-0"),
            "{}",
            payload.query
        );
        assert!(payload.query.contains("label=host%3Ah1") && payload.query.contains("label=systemd_unit%3Acheckout.service"));
        assert_eq!(Payload::decode(&payload.encode()), Some(payload.clone()));
        let profile = profiler_pprof::decode_gzip(&payload.body, 1 << 20).unwrap();
        let total: i64 = profile.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn only_answers_about_the_payload_itself_drop_it() {
        let outcome = |code: u16| ShipError::from_status(StatusCode::from_u16(code).unwrap(), anyhow!("{code}"));
        for code in [401, 403, 404] {
            assert!(matches!(outcome(code), ShipError::Misconfigured(_)), "{code}");
        }
        for code in [408, 429, 502, 503, 504] {
            assert!(matches!(outcome(code), ShipError::Unavailable(_)), "{code}");
        }
        for code in [500, 501, 507] {
            assert!(matches!(outcome(code), ShipError::ServerFailed(_)), "{code}");
        }
        for code in [400, 405, 413, 415, 422] {
            assert!(matches!(outcome(code), ShipError::Rejected(_)), "{code}");
            assert!(!outcome(code).is_retryable());
        }
    }

    #[test]
    fn throttle_lets_one_through_per_period_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_millis(200));
        assert_eq!(throttle.ready(), Some(0));
        assert_eq!(throttle.ready(), None);
        assert_eq!(throttle.ready(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.ready(), Some(2));
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
    }
}
