//! Ship stage: turns a window into one bundle of stacks windows, one per (service,
//! labels, kind), and sends it to the server's ingest API in one request, with
//! timeouts, retries and exponential backoff. One request per window, not per part:
//! the server then spends one HTTP exchange and one WAL fsync on the whole window.
//!
//! A payload holds every stack with its frames, so it can wait in the spool and go to any
//! server. What is sent refers by id to the stacks this server has acknowledged before
//! (see `profiler_pprof::stacks`): a window of stacks the server knows is a few bytes per
//! stack instead of kilobytes of frame names. A server that lost them answers 409, and
//! the window goes again with every frame; a server too old for bundles gets each part
//! as a pprof.
//!
//! What an answer means for the window is decided in one place, [`ShipError::from_status`]:
//! only a 4xx that describes the payload itself (400, 413, 415, 422, ...) drops it.
//! 401, 403 and 404 say the token, the URL or a proxy in between is wrong, which someone
//! will fix: the window is kept, like when the server is away.
//!
//! A request that was sent but got no answer (a timeout, a reset) may have been stored.
//! From then on every attempt of that window says how long ago that was
//! (`Profiler-Unanswered-Age-Ms`), and the spool keeps the time across restarts: the
//! server remembers batch ids for a while only, and refuses (410) a retry from before
//! what it remembers, which it could otherwise count twice. A window that never reached
//! the server (connection refused, a server that is down) carries no age and is
//! replayed however old it is.
//!
//! Off-CPU stacks carry the histogram of their waits' lengths (format `bundle2`); a
//! server too old for them is sent the same window without them, as `bundle`.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::Ordering::Relaxed,
    },
    time::{Duration, Instant},
};

use anyhow::anyhow;
use profiler_pprof::{ProfileBuilder, encode_gzip, gzip, kind::Kind, stacks, waits::Histogram};
use reqwest::StatusCode;

use crate::{identity::Identity, metrics::Metrics};

/// One request's worth: the ingest query string and the gzip body, a bundle of stacks
/// windows with every frame (or, spooled by an older agent, one stacks window or a pprof).
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

/// Stacks of one window for one (identity, kind): frames root first.
pub type Stacks = BTreeMap<Vec<std::sync::Arc<str>>, StackValue>;

/// A stack's value in a window: its time, and for off-CPU stacks how long each wait
/// behind it lasted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackValue {
    /// Nanoseconds.
    pub ns: u64,
    pub durations: Histogram,
    /// The requests (custom labels, see `labels`) `ns` was spent for, and how much of
    /// it each: the rest was spent for none.
    pub requests: BTreeMap<crate::labels::Request, u64>,
}

pub struct WindowMeta {
    pub start_ms: u64,
}

/// The window's payload: every (identity, kind) with stacks is a part. The host labels
/// go once, in the query, common to all parts.
///
/// `batch_id` names the payload for the server, which drops a part it already stored
/// (part `i` is `<batch_id>/<i>` there): an acknowledgement lost to a timeout must not
/// double the window when it is resent. It is in the query, so it survives retries, the
/// spool and agent restarts unchanged.
pub fn build_payload<'a>(
    parts: impl IntoIterator<Item = (&'a Identity, Kind, &'a Stacks)>,
    host_labels: &BTreeMap<String, String>,
    meta: &WindowMeta,
    batch_id: &str,
) -> Payload {
    let mut bundle = stacks::BundleWriter::default();
    let (mut value, mut with_waits, mut with_requests) = (0u64, false, false);
    for (identity, kind, stacks) in parts {
        let mut window = stacks::Writer::default();
        let mut waits = stacks::WaitsWriter::default();
        let mut requests: BTreeMap<&crate::labels::Request, Vec<(u64, u64)>> = BTreeMap::new();
        for (index, (frames, stack)) in stacks.iter().enumerate() {
            window.framed(frames, stack.ns as i64);
            waits.histogram(index as u64, &stack.durations);
            for (request, &ns) in &stack.requests {
                requests.entry(request).or_default().push((index as u64, ns));
            }
            value += stack.ns;
        }
        let mut section = stacks::RequestsWriter::default();
        for (request, entries) in requests {
            section.request(&request.0, &request.1, &entries);
        }
        let labels: Vec<_> = identity.labels.iter().collect();
        let (waits, requests) = (waits.finish(), section.finish());
        with_waits |= !waits.is_empty();
        with_requests |= !requests.is_empty();
        bundle.part_with_requests(&identity.service, &kind.name(), &labels, &window.finish(), &waits, &requests);
    }
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("from", &meta.start_ms.to_string())
        .append_pair("batch_id", batch_id)
        .append_pair(
            "format",
            match (with_waits, with_requests) {
                (_, true) => REQUESTS_BUNDLE_FORMAT,
                (true, false) => WAITS_BUNDLE_FORMAT,
                (false, false) => BUNDLE_FORMAT,
            },
        );
    for (name, label_value) in host_labels {
        query.append_pair("label", &format!("{name}:{label_value}"));
    }
    Payload { query: query.finish(), body: gzip(&bundle.finish()), value }
}

const BUNDLE_FORMAT: &str = "bundle";
/// A bundle whose parts may carry wait histograms.
const WAITS_BUNDLE_FORMAT: &str = "bundle2";
/// A bundle whose parts may carry wait histograms and requests.
const REQUESTS_BUNDLE_FORMAT: &str = "bundle3";

fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(query.as_bytes()).into_owned()
}

fn format(query: &str) -> Option<String> {
    query_pairs(query).find(|(k, _)| k == "format").map(|(_, v)| v)
}

fn is_bundle(query: &str) -> bool {
    format(query).is_some_and(|v| [BUNDLE_FORMAT, WAITS_BUNDLE_FORMAT, REQUESTS_BUNDLE_FORMAT].contains(&v.as_str()))
}

fn has_waits(query: &str) -> bool {
    format(query).is_some_and(|v| v == WAITS_BUNDLE_FORMAT || v == REQUESTS_BUNDLE_FORMAT)
}

fn has_requests(query: &str) -> bool {
    format(query).is_some_and(|v| v == REQUESTS_BUNDLE_FORMAT)
}

/// The window without its requests (format `bundle2`), or without its requests and
/// wait histograms (format `bundle`), for a server that cannot read them. The stacks'
/// values are whole without them.
fn downgraded(payload: &Payload, keep_waits: bool) -> anyhow::Result<Payload> {
    let raw = bundle_bytes(&payload.body)?;
    let mut bundle = stacks::BundleWriter::default();
    for part in stacks::BundleReader::new(&raw)? {
        let part = part?;
        let waits = if keep_waits { part.waits } else { &[] };
        bundle.part_with_waits(part.service, part.kind, &part.labels, part.window, waits);
    }
    let format = if keep_waits { WAITS_BUNDLE_FORMAT } else { BUNDLE_FORMAT };
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query_pairs(&payload.query) {
        query.append_pair(&k, if k == "format" { format } else { &v });
    }
    Ok(Payload { query: query.finish(), body: gzip(&bundle.finish()), value: payload.value })
}

/// A payload body after gunzip; our own, so the bound only guards against a corrupt spool.
fn bundle_bytes(body: &[u8]) -> anyhow::Result<std::borrow::Cow<'_, [u8]>> {
    Ok(profiler_pprof::gunzip(body, 256 << 20)?)
}

/// Each part of the window as a gzip pprof with its query, for a server without
/// bundles: part `i` keeps the batch id it has in a bundle, so a window the server
/// stored in part is not counted twice when it comes the other way.
fn as_pprof(payload: &Payload) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let pairs: Vec<(String, String)> = query_pairs(&payload.query).collect();
    let batch_id = pairs.iter().find(|(k, _)| k == "batch_id").map(|(_, v)| v.as_str());
    let raw = bundle_bytes(&payload.body)?;
    let mut out = Vec::new();
    let mut frames = Vec::new();
    for (index, part) in stacks::BundleReader::new(&raw)?.enumerate() {
        let part = part?;
        let mut builder = ProfileBuilder::new(&[(part.kind, "nanoseconds")]);
        for entry in stacks::Reader::new(part.window)? {
            if let stacks::Entry::Framed { frames: names, value } = entry? {
                names.read_into(&mut frames)?;
                builder.add(&frames, &[value], &[]);
            }
        }
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("service", part.service).append_pair("kind", part.kind);
        query.extend_pairs(pairs.iter().filter(|(k, _)| k != "format" && k != "batch_id"));
        if let Some(id) = batch_id {
            query.append_pair("batch_id", &format!("{id}/{index}"));
        }
        for (name, value) in &part.labels {
            query.append_pair("label", &format!("{name}:{value}"));
        }
        out.push((query.finish(), encode_gzip(&builder.build())));
    }
    Ok(out)
}

/// Stacks the server acknowledged, which later windows send by id.
struct KnownStacks {
    ids: HashSet<u64>,
    /// Forgotten now and then, so a server's retention (which forgets stacks no window
    /// used for its whole length) can never outlast what the agent believes it has.
    since: Instant,
    /// Set when the server refused stacks windows: until then, windows go as pprof.
    pprof_until: Option<Instant>,
    /// Set when the server refused wait histograms: until then, windows go without.
    no_waits_until: Option<Instant>,
    /// Set when the server refused requests: until then, windows go without.
    no_requests_until: Option<Instant>,
}

/// At most this many ids are remembered (8 bytes each plus the set's overhead).
const MAX_KNOWN_STACKS: usize = 200_000;
const FORGET_KNOWN_EVERY: Duration = Duration::from_secs(30 * 60);
/// How long a server that refused a format (stacks windows, or wait histograms) is sent
/// the older one before the newer is tried again.
const FALLBACK_FOR: Duration = Duration::from_secs(3600);

impl KnownStacks {
    fn new() -> Self {
        Self { ids: HashSet::new(), since: Instant::now(), pprof_until: None, no_waits_until: None, no_requests_until: None }
    }

    /// The window with the stacks the server has by id (None when it has none of them),
    /// and the ids of all its stacks.
    fn by_reference(&mut self, body: &[u8]) -> anyhow::Result<ByReference> {
        if self.since.elapsed() > FORGET_KNOWN_EVERY {
            self.forget();
        }
        let raw = bundle_bytes(body)?;
        let mut bundle = stacks::BundleWriter::default();
        let (mut ids, mut by_id) = (Vec::new(), 0);
        let mut frames = Vec::new();
        for part in stacks::BundleReader::new(&raw)? {
            let part = part?;
            let mut window = stacks::Writer::default();
            for entry in stacks::Reader::new(part.window)? {
                match entry? {
                    stacks::Entry::Framed { frames: names, value } => {
                        names.read_into(&mut frames)?;
                        let id = stacks::stack_id(&frames);
                        if self.ids.contains(&id) {
                            window.known(id, value);
                            by_id += 1;
                        } else {
                            window.framed(&frames, value);
                        }
                        ids.push(id);
                    }
                    stacks::Entry::Known { id, value } => window.known(id, value),
                }
            }
            bundle.part_with_requests(part.service, part.kind, &part.labels, &window.finish(), part.waits, part.requests);
        }
        Ok(ByReference { body: (by_id > 0).then(|| gzip(&bundle.finish())), ids, by_id })
    }

    fn learn(&mut self, ids: Vec<u64>) {
        if self.ids.len() + ids.len() > MAX_KNOWN_STACKS {
            self.forget();
        }
        self.ids.extend(ids);
    }

    fn forget(&mut self) {
        self.ids = HashSet::new();
        self.since = Instant::now();
    }
}

/// A window as this server is sent it.
struct ByReference {
    /// None when the server has none of its stacks: the payload goes as it is.
    body: Option<Vec<u8>>,
    /// Every stack of the window, for the server to have once it accepts it.
    ids: Vec<u64>,
    /// How many go by id.
    by_id: usize,
}

/// The server's answer to a request it read.
enum Answer {
    Accepted,
    Refused(StatusCode, String),
}

#[derive(Debug)]
pub enum ShipError {
    /// No connection, or an answer that says the server is busy or away (408, 429,
    /// 502, 503, 504): keep the window, try later.
    Unavailable(anyhow::Error),
    /// The request went out and no answer came (timeout, reset): keep the window, try
    /// later, and say from now on that the server may have stored it.
    Unanswered(anyhow::Error),
    /// 401, 403 or 404: the token, the URL or a proxy in between is wrong ("not ours").
    /// Nothing is wrong with the window: keep it until someone fixes the configuration.
    Misconfigured(anyhow::Error),
    /// Any other 5xx (500 mostly): the server failed on this request. Keep the window; a
    /// payload the server keeps failing while it accepts later ones is poison (see the
    /// spool replay in `daemon`).
    ServerFailed(anyhow::Error),
    /// Any other 4xx: the server refused this window for what it is; retrying cannot help.
    Rejected(anyhow::Error),
    /// 410: the window may have been stored by an unanswered attempt longer ago than the
    /// server remembers batch ids. Dropped, counted apart: resending could count it twice.
    Unverifiable(anyhow::Error),
}

impl ShipError {
    /// The outcome of an answer that is not a success.
    pub fn from_status(status: StatusCode, err: anyhow::Error) -> Self {
        match status.as_u16() {
            401 | 403 | 404 => Self::Misconfigured(err),
            408 | 429 | 502 | 503 | 504 => Self::Unavailable(err),
            410 => Self::Unverifiable(err),
            _ if status.is_server_error() => Self::ServerFailed(err),
            _ => Self::Rejected(err),
        }
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Rejected(_) | Self::Unverifiable(_))
    }
}

impl std::fmt::Display for ShipError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(err)
            | Self::Unanswered(err)
            | Self::Misconfigured(err)
            | Self::ServerFailed(err)
            | Self::Rejected(err)
            | Self::Unverifiable(err) => write!(f, "{err:#}"),
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
    known: Mutex<KnownStacks>,
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
            known: Mutex::new(KnownStacks::new()),
        })
    }

    /// One attempt (and, when the server lost stacks it had or cannot read bundles, the
    /// same window again in a form it can take).
    ///
    /// `unanswered_since` is when (unix ms) an earlier attempt of this window went
    /// unanswered; set here when this one does.
    pub async fn send(&self, payload: &Payload, unanswered_since: &mut Option<u64>) -> Result<(), ShipError> {
        let result = self.send_once(payload, *unanswered_since).await;
        if matches!(result, Err(ShipError::Unanswered(_))) && unanswered_since.is_none() {
            *unanswered_since = Some(now_ms());
        }
        result
    }

    async fn send_once(&self, payload: &Payload, unanswered_since: Option<u64>) -> Result<(), ShipError> {
        if !is_bundle(&payload.query) {
            // Spooled by an older agent, in a form the server of its time took.
            return self.settle(self.post(&payload.query, payload.body.clone(), unanswered_since).await?);
        }
        let pprof = self.known.lock().unwrap().pprof_until.is_some_and(|until| Instant::now() < until);
        if pprof {
            return self.send_as_pprof(payload, unanswered_since).await;
        }
        let mut payload = std::borrow::Cow::Borrowed(payload);
        loop {
            let (no_waits, no_requests) = {
                let known = self.known.lock().unwrap();
                let now = Instant::now();
                (known.no_waits_until.is_some_and(|until| now < until), known.no_requests_until.is_some_and(|until| now < until))
            };
            if (no_waits && has_waits(&payload.query)) || (no_requests && has_requests(&payload.query)) {
                let stripped =
                    downgraded(&payload, !no_waits).map_err(|err| ShipError::Rejected(err.context("reading the window")))?;
                payload = std::borrow::Cow::Owned(stripped);
            }
            let prepared = self.known.lock().unwrap().by_reference(&payload.body);
            let ByReference { body, ids, mut by_id } =
                prepared.map_err(|err| ShipError::Rejected(err.context("reading the window")))?;
            let answer = match self.post(&payload.query, body.unwrap_or_else(|| payload.body.clone()), unanswered_since).await? {
                Answer::Refused(StatusCode::CONFLICT, why) if by_id > 0 => {
                    tracing::info!("the server does not have stacks it acknowledged ({why}); sending them again with their frames");
                    self.known.lock().unwrap().forget();
                    by_id = 0;
                    self.post(&payload.query, payload.body.clone(), unanswered_since).await?
                }
                Answer::Refused(StatusCode::BAD_REQUEST, why) if why.contains("`format`") && has_requests(&payload.query) => {
                    tracing::warn!("the server cannot read requests ({why}); sending windows without them for an hour");
                    self.known.lock().unwrap().no_requests_until = Some(Instant::now() + FALLBACK_FOR);
                    continue;
                }
                Answer::Refused(StatusCode::BAD_REQUEST, why) if why.contains("`format`") && has_waits(&payload.query) => {
                    tracing::warn!("the server cannot read wait histograms ({why}); sending windows without them for an hour");
                    self.known.lock().unwrap().no_waits_until = Some(Instant::now() + FALLBACK_FOR);
                    continue;
                }
                Answer::Refused(StatusCode::BAD_REQUEST, why) if why.contains("`format`") => {
                    tracing::warn!("the server cannot read bundles of stacks windows ({why}); sending pprof for an hour");
                    self.known.lock().unwrap().pprof_until = Some(Instant::now() + FALLBACK_FOR);
                    return self.send_as_pprof(&payload, unanswered_since).await;
                }
                answer => answer,
            };
            if matches!(answer, Answer::Accepted) {
                self.metrics.stacks_shipped_by_id.fetch_add(by_id as u64, Relaxed);
                self.metrics.stacks_shipped_with_frames.fetch_add((ids.len() - by_id) as u64, Relaxed);
                self.known.lock().unwrap().learn(ids);
            }
            return self.settle(answer);
        }
    }

    /// Every part in turn; a refusal ends the attempt, and the next sends all parts
    /// again (the server drops the ones it stored by their batch id).
    async fn send_as_pprof(&self, payload: &Payload, unanswered_since: Option<u64>) -> Result<(), ShipError> {
        let parts = as_pprof(payload).map_err(|err| ShipError::Rejected(err.context("reading the window")))?;
        for (query, body) in parts {
            self.settle(self.post(&query, body, unanswered_since).await?)?;
        }
        Ok(())
    }

    /// Sends one request; Err when no answer came.
    async fn post(&self, query: &str, body: Vec<u8>, unanswered_since: Option<u64>) -> Result<Answer, ShipError> {
        let bytes = body.len() as u64;
        let mut request = self
            .client
            .post(format!("{}?{}", self.ingest_url, query))
            .header("content-type", "application/octet-stream")
            .header("content-encoding", "identity")
            .body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(since) = unanswered_since {
            request = request.header("profiler-unanswered-age-ms", now_ms().saturating_sub(since));
        }
        let response = request.send().await.map_err(|err| match err.is_connect() {
            true => ShipError::Unavailable(anyhow!("connecting: {err}")),
            false => ShipError::Unanswered(anyhow!("sending: {err}")),
        })?;
        let status = response.status();
        if status.is_success() {
            self.metrics.bytes_shipped.fetch_add(bytes, Relaxed);
            return Ok(Answer::Accepted);
        }
        Ok(Answer::Refused(status, response.text().await.unwrap_or_default()))
    }

    fn settle(&self, answer: Answer) -> Result<(), ShipError> {
        let Answer::Refused(status, body) = answer else { return Ok(()) };
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
    pub async fn send_with_retries(&self, payload: &Payload, unanswered_since: &mut Option<u64>) -> Result<(), ShipError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self.send(payload, unanswered_since).await {
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

/// Wall-clock time, unix milliseconds (it outlives the process, in window times and the spool).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
        let checkout = Identity { service: "checkout".into(), labels: [("systemd_unit".to_string(), "checkout.service".to_string())].into() };
        let batch = Identity { service: "batch".into(), labels: BTreeMap::new() };
        let host = [("host".to_string(), "h1".to_string())].into();
        let mut stacks = Stacks::new();
        let ns = |ns| StackValue { ns, ..Default::default() };
        stacks.insert(vec![Arc::from("app"), Arc::from("main")], ns(30));
        stacks.insert(vec![Arc::from("app"), Arc::from("burn")], ns(70));
        let mut waits = Stacks::new();
        waits.insert(vec![Arc::from("job"), Arc::from("read")], ns(5));
        let meta = WindowMeta { start_ms: 10_000 };
        let parts = [(&checkout, Kind::OnCpu, &stacks), (&batch, Kind::OffCpu(profiler_pprof::kind::WaitReason::BlockedIo), &waits)];
        let payload = build_payload(parts, &host, &meta, "00ff-10000");
        assert_eq!(payload.value, 105);
        assert_eq!(payload.query, "from=10000&batch_id=00ff-10000&format=bundle&label=host%3Ah1");
        assert_eq!(Payload::decode(&payload.encode()), Some(payload.clone()));
        let raw = profiler_pprof::gunzip(&payload.body, 1 << 20).unwrap();
        let parts: Vec<stacks::Part> = stacks::BundleReader::new(&raw).unwrap().map(Result::unwrap).collect();
        let heads: Vec<_> = parts.iter().map(|p| (p.service, p.kind, p.labels.clone())).collect();
        assert_eq!(
            heads,
            [("checkout", "on-cpu", vec![("systemd_unit", "checkout.service")]), ("batch", "off-cpu:blocked-io", vec![])]
        );
        let total: i64 = parts
            .iter()
            .flat_map(|p| stacks::Reader::new(p.window).unwrap())
            .map(|entry| match entry.unwrap() {
                stacks::Entry::Framed { value, .. } => value,
                stacks::Entry::Known { .. } => panic!("a payload carries every frame"),
            })
            .sum();
        assert_eq!(total, 105);

        // Converted for a server without bundles: one pprof per part, under the ids the
        // parts have in a bundle.
        let converted = as_pprof(&payload).unwrap();
        assert_eq!(converted.len(), 2);
        let (query, body) = &converted[0];
        assert_eq!(
            query,
            "service=checkout&kind=on-cpu&from=10000&label=host%3Ah1&batch_id=00ff-10000%2F0&label=systemd_unit%3Acheckout.service"
        );
        let profile = profiler_pprof::decode_gzip(body, 1 << 20).unwrap();
        assert_eq!(profile.sample.iter().map(|s| s.value[0]).sum::<i64>(), 100);
        assert!(converted[1].0.contains("service=batch&kind=off-cpu%3Ablocked-io") && converted[1].0.contains("batch_id=00ff-10000%2F1"));
    }

    #[test]
    fn wait_histograms_travel_as_bundle2_and_can_be_left_out() {
        let batch = Identity { service: "batch".into(), labels: BTreeMap::new() };
        let mut waits = Stacks::new();
        let mut durations = Histogram::default();
        durations.record(2_000_000, profiler_pprof::waits::ONE);
        durations.record(60_000_000, profiler_pprof::waits::ONE);
        waits.insert(vec![Arc::from("job"), Arc::from("a")], StackValue { ns: 1, ..Default::default() });
        waits.insert(vec![Arc::from("job"), Arc::from("b")], StackValue { ns: 62_000_000, durations: durations.clone(), ..Default::default() });
        let parts = [(&batch, Kind::OffCpu(profiler_pprof::kind::WaitReason::Sleep), &waits)];
        let payload = build_payload(parts, &BTreeMap::new(), &WindowMeta { start_ms: 0 }, "b-0");
        assert!(has_waits(&payload.query) && is_bundle(&payload.query));
        let raw = profiler_pprof::gunzip(&payload.body, 1 << 20).unwrap();
        let part = stacks::BundleReader::new(&raw).unwrap().next().unwrap().unwrap();
        assert_eq!(stacks::read_waits(part.waits, 2).unwrap(), [(1, durations)], "the second stack's waits");

        let plain = downgraded(&payload, false).unwrap();
        assert!(!has_waits(&plain.query) && is_bundle(&plain.query));
        let raw_plain = profiler_pprof::gunzip(&plain.body, 1 << 20).unwrap();
        let plain_part = stacks::BundleReader::new(&raw_plain).unwrap().next().unwrap().unwrap();
        assert_eq!((plain_part.window, plain_part.waits), (part.window, &[][..]));
        // By reference, the histograms stay with their entries.
        let mut known = KnownStacks::new();
        known.learn(vec![stacks::stack_id(&["job", "a"])]);
        let sent = known.by_reference(&payload.body).unwrap().body.unwrap();
        let raw_sent = profiler_pprof::gunzip(&sent, 1 << 20).unwrap();
        let sent_part = stacks::BundleReader::new(&raw_sent).unwrap().next().unwrap().unwrap();
        assert_eq!(sent_part.waits, part.waits);
    }

    /// Time spent for requests travels as `bundle3`, each request's share of each stack
    /// by the stack's index; a server that cannot read it gets `bundle2` with the same
    /// stacks and waits.
    #[test]
    fn requests_travel_as_bundle3_and_can_be_left_out() {
        let service = Identity { service: "api".into(), labels: BTreeMap::new() };
        let request = |id: &str| Arc::new(("request_id".to_string(), id.to_string()));
        let mut durations = Histogram::default();
        durations.record(40_000_000, profiler_pprof::waits::ONE);
        let mut waits = Stacks::new();
        waits.insert(vec![Arc::from("app"), Arc::from("a")], StackValue { ns: 5, ..Default::default() });
        waits.insert(
            vec![Arc::from("app"), Arc::from("b")],
            StackValue { ns: 50, durations: durations.clone(), requests: [(request("r1"), 40), (request("r2"), 6)].into() },
        );
        let parts = [(&service, Kind::OffCpu(profiler_pprof::kind::WaitReason::Sleep), &waits)];
        let payload = build_payload(parts, &BTreeMap::new(), &WindowMeta { start_ms: 0 }, "b-0");
        assert!(has_requests(&payload.query) && has_waits(&payload.query) && is_bundle(&payload.query));
        let raw = profiler_pprof::gunzip(&payload.body, 1 << 20).unwrap();
        let part = stacks::BundleReader::new(&raw).unwrap().next().unwrap().unwrap();
        let requests = stacks::read_requests(part.requests, 2).unwrap();
        let read: Vec<_> = requests.iter().map(|r| (r.key, r.value, r.entries.clone())).collect();
        assert_eq!(read, [("request_id", "r1", vec![(1, 40)]), ("request_id", "r2", vec![(1, 6)])]);

        let older = downgraded(&payload, true).unwrap();
        assert!(!has_requests(&older.query) && has_waits(&older.query));
        let raw_older = profiler_pprof::gunzip(&older.body, 1 << 20).unwrap();
        let older_part = stacks::BundleReader::new(&raw_older).unwrap().next().unwrap().unwrap();
        assert_eq!((older_part.window, older_part.waits, older_part.requests), (part.window, part.waits, &[][..]));
        // By reference, the requests stay with their entries.
        let mut known = KnownStacks::new();
        known.learn(vec![stacks::stack_id(&["app", "a"])]);
        let sent = known.by_reference(&payload.body).unwrap().body.unwrap();
        let raw_sent = profiler_pprof::gunzip(&sent, 1 << 20).unwrap();
        assert_eq!(stacks::BundleReader::new(&raw_sent).unwrap().next().unwrap().unwrap().requests, part.requests);
    }

    /// A bundle of one part per window given.
    fn bundle(windows: &[&[(&[&str], i64)]]) -> Vec<u8> {
        let mut b = stacks::BundleWriter::default();
        for stacks in windows {
            let mut w = stacks::Writer::default();
            for (frames, value) in stacks.iter() {
                w.framed(frames, *value);
            }
            b.part::<&str, &str>("svc", "on-cpu", &[], &w.finish());
        }
        gzip(&b.finish())
    }

    /// (frames of each framed stack, ids of the stacks sent by id), in order, over all parts.
    fn sent(body: &[u8]) -> (Vec<Vec<String>>, Vec<u64>) {
        let raw = profiler_pprof::gunzip(body, 1 << 20).unwrap();
        let (mut framed, mut by_id) = (Vec::new(), Vec::new());
        for part in stacks::BundleReader::new(&raw).unwrap() {
            for entry in stacks::Reader::new(part.unwrap().window).unwrap() {
                match entry.unwrap() {
                    stacks::Entry::Framed { frames, .. } => {
                        let mut names = Vec::new();
                        frames.read_into(&mut names).unwrap();
                        framed.push(names.iter().map(|n| n.to_string()).collect());
                    }
                    stacks::Entry::Known { id, .. } => by_id.push(id),
                }
            }
        }
        (framed, by_id)
    }

    #[test]
    fn acknowledged_stacks_go_by_id_until_forgotten() {
        let (a, b): (&[&str], &[&str]) = (&["main", "a"], &["main", "b"]);
        let mut known = KnownStacks::new();
        let first = known.by_reference(&bundle(&[&[(a, 1)], &[(b, 2)]])).unwrap();
        assert!(first.body.is_none(), "nothing is known yet: the window goes as it is");
        assert_eq!(first.ids, [stacks::stack_id(a), stacks::stack_id(b)]);
        known.learn(vec![stacks::stack_id(a)]);
        let second = known.by_reference(&bundle(&[&[(a, 3), (b, 4)], &[(a, 5)]])).unwrap();
        assert_eq!(second.by_id, 2);
        let (framed, by_id) = sent(&second.body.unwrap());
        assert_eq!(
            (framed, by_id),
            (vec![vec!["main".to_string(), "b".to_string()]], vec![stacks::stack_id(a), stacks::stack_id(a)])
        );
        known.forget();
        assert!(known.by_reference(&bundle(&[&[(a, 3)]])).unwrap().body.is_none());
        known.learn((0..MAX_KNOWN_STACKS as u64).collect());
        known.learn(vec![stacks::stack_id(a)]);
        assert_eq!(known.ids.len(), 1, "a full set starts over");
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
