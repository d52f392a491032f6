//! Ship stage: turns a window into one gzip pprof per (service, labels, kind) and sends
//! it to the server's ingest API, with timeouts, retries and exponential backoff.

use std::{collections::BTreeMap, time::Duration};

use anyhow::anyhow;
use profiler_pprof::{ProfileBuilder, encode_gzip};

use crate::{aggregate::Kind, identity::Identity};

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

pub fn build_payload(identity: &Identity, host_labels: &BTreeMap<String, String>, kind: Kind, stacks: &Stacks, meta: &WindowMeta) -> Payload {
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
        .append_pair("until", &meta.end_ms.to_string());
    for (name, label_value) in host_labels.iter().chain(&identity.labels) {
        query.append_pair("label", &format!("{name}:{label_value}"));
    }
    Payload { query: query.finish(), body: encode_gzip(&builder.build()), value }
}

#[derive(Debug)]
pub enum ShipError {
    /// The server (or the network) may accept it later: keep the window.
    Retryable(anyhow::Error),
    /// The server refused this window for what it is; retrying cannot help.
    Rejected(anyhow::Error),
}

pub struct Shipper {
    client: reqwest::Client,
    ingest_url: String,
    token: Option<String>,
    max_attempts: u32,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

impl Shipper {
    pub fn new(base_url: &str, token: Option<String>, timeout: Duration, max_attempts: u32) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout).build()?;
        Ok(Self {
            client,
            ingest_url: format!("{}/api/v1/ingest", base_url.trim_end_matches('/')),
            token,
            max_attempts,
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
        let response = request.send().await.map_err(|err| ShipError::Retryable(anyhow!("sending: {err}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        let err = anyhow!("server answered {status}: {}", body.trim());
        // Timeouts, throttling and server errors pass; other 4xx describe this request.
        if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Err(ShipError::Retryable(err))
        } else {
            Err(ShipError::Rejected(err))
        }
    }

    /// Up to `max_attempts` attempts with exponential backoff and jitter.
    pub async fn send_with_retries(&self, payload: &Payload) -> Result<(), ShipError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.send(payload).await {
                Err(ShipError::Retryable(err)) if attempt < self.max_attempts => {
                    tracing::debug!(attempt, "ship failed, retrying: {err:#}");
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}

/// 50-100% of `base`, so agents that lost the server together do not retry together.
fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let mixed = (nanos ^ std::process::id().rotate_left(13)).wrapping_mul(2654435761);
    base / 2 + base.mul_f64((mixed % 1000) as f64 / 2000.0)
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
        let payload = build_payload(&identity, &host, Kind::OnCpu, &stacks, &meta);
        assert_eq!(payload.value, 100);
        assert!(payload.query.contains("service=checkout&kind=on-cpu&from=10000&until=20000"), "{}", payload.query);
        assert!(payload.query.contains("label=host%3Ah1") && payload.query.contains("label=systemd_unit%3Acheckout.service"));
        assert_eq!(Payload::decode(&payload.encode()), Some(payload.clone()));
        let profile = profiler_pprof::decode_gzip(&payload.body, 1 << 20).unwrap();
        let total: i64 = profile.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn jitter_stays_between_half_and_full() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
    }
}
