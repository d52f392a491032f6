//! Ingest stage: turns pprof and folded payloads into store batches,
//! enforcing the per-request limits. Everything here is pure CPU work on
//! untrusted input and returns `Rejected` (a 4xx) for anything malformed.

use profiler_pprof::folded::LineError;
use profiler_pprof::{cut_name, stacks, Profile, Resolver};
use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

use crate::config::Limits;
use crate::store::{series_id, stack_id, Batch, Frames, Labels, RequestRow, Row, Store};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Rejected {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    /// A stacks window referred to stacks by ids this server does not have:
    /// the sender should send them again with their frames.
    #[error("{0} stacks referred to by id are unknown to this server; send them with their frames")]
    UnknownStacks(usize),
}

fn bad(msg: impl Into<String>) -> Rejected {
    Rejected::BadRequest(msg.into())
}

/// Kinds whose values are durations, stored in nanoseconds.
pub fn is_time_kind(kind: &str) -> bool {
    profiler_pprof::kind::is_on_cpu(kind)
        || profiler_pprof::kind::off_cpu_reason(kind).is_some()
        || matches!(kind, "wall" | "itimer")
        || kind.ends_with("_duration")
}

/// Unit of a kind's stored values, for exports.
pub fn unit_of(kind: &str) -> &'static str {
    if is_time_kind(kind) {
        "nanoseconds"
    } else if kind.ends_with("_space") || kind.ends_with("bytes") {
        "bytes"
    } else {
        "count"
    }
}

pub fn validate_label(limits: &Limits, name: &str, value: &str) -> Result<(), Rejected> {
    if name.is_empty() || name.len() > limits.max_label_name_len {
        return Err(bad(format!(
            "label name {:?} must be 1..={} bytes",
            truncate(name, 64),
            limits.max_label_name_len
        )));
    }
    if !profiler_pprof::is_label_name(name) {
        return Err(bad(format!(
            "label name {:?} has characters outside [A-Za-z0-9_./-]",
            truncate(name, 64)
        )));
    }
    if value.len() > limits.max_label_value_len {
        return Err(bad(format!(
            "value of label {name:?} is longer than {} bytes",
            limits.max_label_value_len
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(bad(format!(
            "value of label {name:?} contains control characters"
        )));
    }
    Ok(())
}

pub fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Where a request's samples go: service, kind, window start and the
/// request-level labels (without `service`, which is added here).
#[derive(Debug, Clone)]
pub struct Target {
    pub service: String,
    pub kind: String,
    pub ts_ms: i64,
    pub labels: Labels,
}

/// Accumulates samples of one request, interning stacks and series and
/// summing duplicate (series, stack) pairs.
pub struct BatchBuilder<'a> {
    limits: &'a Limits,
    target: Target,
    base: Labels,
    base_id: u64,
    stacks: HashMap<u64, Frames>,
    /// Bytes of frame names in `stacks`, against `max_batch_bytes`.
    stack_bytes: usize,
    series: HashMap<u64, Labels>,
    /// Summed per (series, stack), for every row of the request: a fast
    /// hasher, seeded at random (see the store's `IdMap`).
    rows: HashMap<(u64, u64), i64, foldhash::fast::RandomState>,
    /// Samples whose labels name a request (`Limits::request_labels`): (stack,
    /// value) per (request key, request value, series), for the request table.
    requests: HashMap<(String, String, u64), HashMap<u64, i64>>,
    /// Request labels of the whole request (a Pyroscope SDK's tags, say): every
    /// sample's time goes to them.
    base_requests: Vec<(String, String)>,
}

impl<'a> BatchBuilder<'a> {
    pub fn new(limits: &'a Limits, target: Target) -> Result<Self, Rejected> {
        // The server makes those kinds from the histograms of our agent's bundles
        // only: rows sent as such would be misread.
        if profiler_pprof::waits::is_waits_kind(&target.kind) {
            return Err(bad(format!("kind {} is reserved for wait histograms", truncate(&target.kind, 64))));
        }
        Self::build(limits, target)
    }

    fn build(limits: &'a Limits, mut target: Target) -> Result<Self, Rejected> {
        if target.service.is_empty() {
            return Err(bad("service name is empty"));
        }
        validate_label(limits, "service", &target.service)?;
        if target.kind.is_empty() || target.kind.len() > limits.max_label_name_len {
            return Err(bad("kind must be 1..=max_label_name_len bytes"));
        }
        if target.labels.len() + 1 > limits.max_labels_per_series {
            return Err(bad(format!(
                "more than {} labels",
                limits.max_labels_per_series
            )));
        }
        for (k, v) in &target.labels {
            validate_label(limits, k, v)?;
        }
        // Labels naming a request are not the series'.
        let base_requests: Vec<(String, String)> =
            target.labels.iter().filter(|(k, _)| limits.request_labels.contains(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        target.labels.retain(|k, _| !limits.request_labels.contains(k));
        let mut base = target.labels.clone();
        base.insert("service".into(), target.service.clone());
        let base_id = series_id(&base);
        let mut b = BatchBuilder {
            limits,
            target,
            base: base.clone(),
            base_id,
            stacks: HashMap::new(),
            stack_bytes: 0,
            series: HashMap::new(),
            rows: HashMap::default(),
            requests: HashMap::new(),
            base_requests,
        };
        b.series.insert(base_id, base);
        Ok(b)
    }

    /// Adds a root-first stack; `extra` are per-sample labels (request labels win).
    pub fn add<S: AsRef<str>>(
        &mut self,
        frames: &[S],
        extra: &[(String, String)],
        value: i64,
    ) -> Result<(), Rejected> {
        if value == 0 {
            return Ok(());
        }
        let stack = self.stack(frames)?;
        let (series, requests) = self.series_and_requests(extra)?;
        self.add_row(series, stack, value);
        for request in &requests {
            self.add_request(request, series, stack, value)?;
        }
        Ok(())
    }

    /// Like [`Self::series_for`], with the labels that name a request
    /// (`Limits::request_labels`: a request id, a trace id, a span id) left out of
    /// the series and returned: the sample's time goes to each of them in the
    /// request table.
    pub fn series_and_requests(&mut self, extra: &[(String, String)]) -> Result<(u64, Vec<(String, String)>), Rejected> {
        let names_request = |key: &str| self.limits.request_labels.iter().any(|k| k == key);
        if !extra.iter().any(|(k, _)| names_request(k)) {
            return Ok((self.series_for(extra)?, Vec::new()));
        }
        let (requests, rest): (Vec<(String, String)>, Vec<(String, String)>) =
            extra.iter().cloned().partition(|(k, _)| names_request(k));
        for (key, value) in &requests {
            validate_label(self.limits, key, value)?;
        }
        Ok((self.series_for(&rest)?, requests))
    }

    /// Adds `value` of an interned series and stack to `request`'s share.
    pub fn add_request(&mut self, request: &(String, String), series: u64, stack: u64, value: i64) -> Result<(), Rejected> {
        if value == 0 {
            return Ok(());
        }
        let key = (request.0.clone(), request.1.clone(), series);
        if !self.requests.contains_key(&key) && self.requests.len() >= self.limits.max_request_rows {
            return Err(Rejected::TooLarge(format!(
                "more than {} (request, series) pairs in one request",
                self.limits.max_request_rows
            )));
        }
        let slot = self.requests.entry(key).or_default().entry(stack).or_insert(0);
        *slot = slot.saturating_add(value);
        Ok(())
    }

    /// The request table's rows of the samples that named a request, under the
    /// ingest part name `part`.
    pub fn take_requests(&mut self, part: &str) -> Vec<RequestRow> {
        for (key, value) in std::mem::take(&mut self.base_requests) {
            for (&(series, stack), &v) in &self.rows {
                let slot = self.requests.entry((key.clone(), value.clone(), series)).or_default().entry(stack).or_insert(0);
                *slot = slot.saturating_add(v);
            }
        }
        std::mem::take(&mut self.requests)
            .into_iter()
            .map(|((key, value, series_id), stacks)| RequestRow {
                service: self.target.service.clone(),
                ts_ms: self.target.ts_ms,
                key,
                value,
                part: part.to_owned(),
                series_id,
                kind: self.target.kind.clone(),
                stacks: stacks.into_iter().collect(),
            })
            .collect()
    }

    /// Interns a root-first stack, returning its id. A sample without
    /// frames still counts, under `[unknown]`. Deep stacks lose their leaf
    /// end, long frame names their tail.
    pub fn stack<S: AsRef<str>>(&mut self, frames: &[S]) -> Result<u64, Rejected> {
        self.intern(None, frames)
    }

    /// Interns a stack like [`Self::stack`] but under the id of its frames
    /// as sent, before any cut: the id a sender that later refers to the
    /// stack by id computed.
    pub fn stack_as_sent<S: AsRef<str>>(&mut self, frames: &[S]) -> Result<u64, Rejected> {
        self.intern(Some(stack_id(frames)), frames)
    }

    /// `id` None: the id of the frames kept.
    fn intern<S: AsRef<str>>(&mut self, id: Option<u64>, frames: &[S]) -> Result<u64, Rejected> {
        let frames = &frames[..frames.len().min(self.limits.max_stack_depth)];
        if frames.is_empty() {
            return self.intern(id, &["[unknown]"]);
        }
        let max_name = self.limits.max_frame_name_len;
        if frames.iter().any(|f| f.as_ref().len() > max_name) {
            let cut: Vec<String> = frames.iter().map(|f| cut_name(f.as_ref(), max_name)).collect();
            return self.intern(id, &cut);
        }
        let sid = id.unwrap_or_else(|| stack_id(frames));
        if !self.stacks.contains_key(&sid) {
            let bytes: usize = frames.iter().map(|f| f.as_ref().len() + size_of::<Arc<str>>()).sum();
            self.stack_bytes += bytes;
            if self.stack_bytes > self.limits.max_batch_bytes {
                return Err(Rejected::TooLarge(format!(
                    "the request's distinct stacks hold more than {} bytes of frame names",
                    self.limits.max_batch_bytes
                )));
            }
            self.stacks.insert(sid, frames.iter().map(|f| Arc::from(f.as_ref())).collect());
        }
        Ok(sid)
    }

    /// Adds `value` to the row of an interned series and stack.
    pub fn add_row(&mut self, series: u64, stack: u64, value: i64) {
        if value != 0 {
            let slot = self.rows.entry((series, stack)).or_insert(0);
            *slot = slot.saturating_add(value);
        }
    }

    /// Interns the series of the request labels plus `extra`, returning its id.
    pub fn series_for(&mut self, extra: &[(String, String)]) -> Result<u64, Rejected> {
        if extra.is_empty() {
            return Ok(self.base_id);
        }
        let mut labels = self.base.clone();
        for (k, v) in extra {
            if !labels.contains_key(k) {
                validate_label(self.limits, k, v)?;
                labels.insert(k.clone(), v.clone());
            }
        }
        if labels.len() > self.limits.max_labels_per_series {
            return Err(bad(format!(
                "more than {} labels in one series",
                self.limits.max_labels_per_series
            )));
        }
        let id = series_id(&labels);
        if !self.series.contains_key(&id) {
            if self.series.len() >= self.limits.max_series_per_request {
                return Err(bad(format!(
                    "more than {} distinct label sets (series) in one request",
                    self.limits.max_series_per_request
                )));
            }
            self.series.insert(id, labels);
        }
        Ok(id)
    }

    pub fn finish(self) -> Batch {
        let ts_ms = self.target.ts_ms;
        // Rows mostly share one series: one insert per run of it.
        let mut used = std::collections::HashSet::new();
        let mut last = None;
        for &(series, _) in self.rows.keys() {
            if last != Some(series) {
                used.insert(series);
                last = Some(series);
            }
        }
        Batch {
            id: None,
            maybe_stored_since_ms: None,
            service: self.target.service,
            kind: self.target.kind,
            stacks: self.stacks.into_iter().collect(),
            series: self
                .series
                .into_iter()
                .filter(|(id, _)| used.contains(id))
                .collect(),
            rows: self
                .rows
                .into_iter()
                .map(|((series_id, stack_id), value)| Row {
                    ts_ms,
                    series_id,
                    stack_id,
                    value,
                })
                .collect(),
        }
    }
}

/// Parses folded text (`frame;frame;leaf <count>` per line), multiplying each
/// count by `scale`.
pub fn folded(body: &[u8], scale: i64, b: &mut BatchBuilder) -> Result<(), Rejected> {
    let text =
        std::str::from_utf8(body).map_err(|e| bad(format!("folded body is not UTF-8: {e}")))?;
    let mut frames: Vec<&str> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (stack, count) = profiler_pprof::folded::parse_line(line).map_err(|e| match e {
            LineError::MissingValue => bad(format!("line {}: expected `stack count`", n + 1)),
            LineError::BadValue(count) => bad(format!(
                "line {}: count {:?} is not an integer",
                n + 1,
                truncate(count, 32)
            )),
        })?;
        frames.clear();
        frames.extend(stack);
        b.add(&frames, &[], count.saturating_mul(scale))?;
    }
    Ok(())
}

/// Parses Pyroscope's `lines` format: one stack per line, each one sample.
pub fn lines(body: &[u8], scale: i64, b: &mut BatchBuilder) -> Result<(), Rejected> {
    let text =
        std::str::from_utf8(body).map_err(|e| bad(format!("lines body is not UTF-8: {e}")))?;
    let mut frames: Vec<&str> = Vec::new();
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if line.trim().is_empty() {
            continue;
        }
        frames.clear();
        frames.extend(profiler_pprof::folded::frames(line));
        let stack = b.stack(&frames)?;
        let series = b.series_for(&[])?;
        b.add_row(series, stack, scale);
    }
    Ok(())
}

/// Index of the sample type to ingest: by name if given, else the one named
/// like the kind, else (for time kinds or no kind) the first with a time
/// unit, else the first.
pub fn pick_sample_type(
    profile: &Profile,
    name: Option<&str>,
    kind: Option<&str>,
) -> Result<usize, Rejected> {
    let r = Resolver::new(profile);
    let types = r.sample_types().map_err(|e| bad(e.to_string()))?;
    if types.is_empty() {
        return Err(bad("profile has no sample types"));
    }
    if let Some(name) = name {
        return types.iter().position(|(t, _)| *t == name).ok_or_else(|| {
            bad(format!(
                "profile has no sample type {name:?}; it has {:?}",
                types.iter().map(|t| t.0).collect::<Vec<_>>()
            ))
        });
    }
    if let Some(i) = kind.and_then(|k| types.iter().position(|(t, _)| *t == k)) {
        return Ok(i);
    }
    if kind.is_none_or(is_time_kind) {
        if let Some(i) = types.iter().position(|(_, u)| time_scale(u).is_some()) {
            return Ok(i);
        }
    }
    Ok(0)
}

/// The first sample type with a time unit, if any.
pub fn time_sample_type(profile: &Profile) -> Result<Option<usize>, Rejected> {
    let r = Resolver::new(profile);
    let types = r.sample_types().map_err(|e| bad(e.to_string()))?;
    Ok(types.iter().position(|(_, u)| time_scale(u).is_some()))
}

/// Whether `unit` is one of the time units ingest converts to nanoseconds.
pub fn is_time_unit(unit: &str) -> bool {
    time_scale(unit).is_some()
}

fn time_scale(unit: &str) -> Option<i64> {
    Some(match unit {
        "nanoseconds" | "ns" => 1,
        "microseconds" | "us" => 1_000,
        "milliseconds" | "ms" => 1_000_000,
        "seconds" | "s" => 1_000_000_000,
        _ => return None,
    })
}

/// Name of sample type `idx` (the default kind for pprof ingest).
pub fn sample_type_name(profile: &Profile, idx: usize) -> Result<String, Rejected> {
    let r = Resolver::new(profile);
    let types = r.sample_types().map_err(|e| bad(e.to_string()))?;
    Ok(types[idx].0.to_owned())
}

/// Adds the entries of our agent's stacks window (see
/// `profiler_pprof::stacks`). Stacks referred to by id must be in `store`,
/// or the whole window is refused. Returns each entry's stack id, in order.
pub fn stacks(body: &[u8], store: &dyn Store, b: &mut BatchBuilder) -> Result<Vec<u64>, Rejected> {
    let mut known = Vec::new();
    let mut frames = Vec::new();
    let mut ids = Vec::new();
    for entry in stacks::Reader::new(body).map_err(|e| bad(e.to_string()))? {
        match entry.map_err(|e| bad(e.to_string()))? {
            stacks::Entry::Framed { frames: names, value } => {
                names.read_into(&mut frames).map_err(|e| bad(e.to_string()))?;
                let id = b.stack_as_sent(&frames)?;
                b.add_row(b.base_id, id, value);
                ids.push(id);
            }
            stacks::Entry::Known { id, value } => {
                if value != 0 {
                    known.push((id, value));
                }
                ids.push(id);
            }
        }
    }
    let known_ids: Vec<u64> = known.iter().map(|&(id, _)| id).collect();
    let unknown = store.unknown_stacks(&b.target.service, &known_ids);
    if unknown > 0 {
        return Err(Rejected::UnknownStacks(unknown));
    }
    for (id, value) in known {
        b.add_row(b.base_id, id, value);
    }
    Ok(ids)
}

/// Most weighted waits (in units of `profiler_pprof::waits::ONE`) one bucket of one
/// histogram may hold.
const MAX_WAIT_COUNT: u64 = 1 << 40;

/// The batch of a part's wait histograms (see `profiler_pprof::waits`): one row per
/// stack and bucket, in the part's kind's histograms kind. `ids` are the stack ids of
/// the part's entries.
fn waits(section: &[u8], ids: &[u64], limits: &Limits, target: &Target) -> Result<Batch, Rejected> {
    if profiler_pprof::kind::off_cpu_reason(&target.kind).is_none() {
        return Err(bad(format!("wait histograms belong to off-CPU kinds, not {}", truncate(&target.kind, 64))));
    }
    let histograms = stacks::read_waits(section, ids.len() as u64).map_err(|e| bad(e.to_string()))?;
    let target = Target { kind: profiler_pprof::waits::waits_kind(&target.kind), ..target.clone() };
    let mut b = BatchBuilder::build(limits, target)?;
    for (index, histogram) in histograms {
        for (bucket, count) in histogram.buckets() {
            // 2^24 waits of one bucket in one window is far beyond any host (a thread
            // blocking every microsecond): sums over any range stay far from overflow.
            if count > MAX_WAIT_COUNT {
                return Err(bad("a wait count out of range"));
            }
            let count = count as i64;
            b.add_row(b.base_id, profiler_pprof::waits::row_id(ids[index as usize], bucket), count);
        }
    }
    Ok(b.finish())
}

/// A bundle once read: its batches, each with its name within the bundle (`i` for
/// part i, `i/waits` for its histograms), and the rows of the request table its
/// parts' requests sections make (named `i` in `part`).
#[derive(Debug, Default)]
pub struct BundleBatches {
    pub batches: Vec<(String, Batch)>,
    pub requests: Vec<RequestRow>,
}

/// The rows of a part's requests section (see `store::requests`): one per request,
/// its share of the part's stacks `ids` (by entry index).
fn requests(section: &[u8], ids: &[u64], limits: &Limits, target: &Target, series_id: u64, part: &str) -> Result<Vec<RequestRow>, Rejected> {
    let read = stacks::read_requests(section, ids.len() as u64).map_err(|e| bad(e.to_string()))?;
    let mut rows = Vec::with_capacity(read.len());
    for request in read {
        validate_label(limits, request.key, request.value)?;
        let mut stacks = Vec::with_capacity(request.entries.len());
        for (index, value) in request.entries {
            // A window's value is nanoseconds of a host's threads: far below this.
            if value > MAX_WAIT_COUNT {
                return Err(bad("a request's value out of range"));
            }
            stacks.push((ids[index as usize], value as i64));
        }
        rows.push(RequestRow {
            service: target.service.clone(),
            ts_ms: target.ts_ms,
            key: request.key.to_owned(),
            value: request.value.to_owned(),
            part: part.to_owned(),
            series_id,
            kind: target.kind.clone(),
            stacks,
        });
    }
    Ok(rows)
}

/// The batches of a bundle of stacks windows (see `profiler_pprof::stacks`),
/// one per part and one more per part with wait histograms, each part's labels
/// over `common`, and the request rows of parts with requests. Refused whole: if
/// any part is malformed or refers to a stack `store` does not have, nothing of it
/// is stored.
pub fn bundle(raw: &[u8], limits: &Limits, ts_ms: i64, common: &Labels, store: &dyn Store) -> Result<BundleBatches, Rejected> {
    let parts = stacks::BundleReader::new(raw)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if parts.len() > limits.max_series_per_request {
        return Err(bad(format!(
            "more than {} parts (series) in one bundle",
            limits.max_series_per_request
        )));
    }
    let mut out = BundleBatches { batches: Vec::with_capacity(parts.len()), requests: Vec::new() };
    let (mut unknown, mut stack_bytes) = (0, 0);
    for (i, part) in parts.into_iter().enumerate() {
        let mut labels = common.clone();
        labels.extend(part.labels.iter().map(|&(k, v)| (k.to_owned(), v.to_owned())));
        let target = Target { service: part.service.to_owned(), kind: part.kind.to_owned(), ts_ms, labels };
        let mut b = BatchBuilder::new(limits, target.clone())?;
        match self::stacks(part.window, store, &mut b) {
            Ok(ids) => {
                // Each part's frame names are bounded; so are all of them.
                stack_bytes += b.stack_bytes;
                if stack_bytes > limits.max_batch_bytes {
                    return Err(Rejected::TooLarge(format!(
                        "the bundle's distinct stacks hold more than {} bytes of frame names",
                        limits.max_batch_bytes
                    )));
                }
                if !part.requests.is_empty() {
                    out.requests.extend(requests(part.requests, &ids, limits, &target, b.base_id, &i.to_string())?);
                    if out.requests.len() > limits.max_request_rows {
                        return Err(Rejected::TooLarge(format!(
                            "more than {} (request, part) pairs in one bundle",
                            limits.max_request_rows
                        )));
                    }
                }
                out.batches.push((i.to_string(), b.finish()));
                if !part.waits.is_empty() {
                    out.batches.push((format!("{i}/waits"), waits(part.waits, &ids, limits, &target)?));
                }
            }
            // Counted over every part, for the answer.
            Err(Rejected::UnknownStacks(n)) => unknown += n,
            Err(e) => return Err(e),
        }
    }
    if unknown > 0 {
        return Err(Rejected::UnknownStacks(unknown));
    }
    Ok(out)
}

/// Adds every sample of a pprof profile, value `idx`, converted to
/// nanoseconds when the unit is a time or a count of nanosecond periods.
pub fn pprof(profile: &Profile, idx: usize, b: &mut BatchBuilder) -> Result<(), Rejected> {
    let mut r = Resolver::new(profile).cut_names(b.limits.max_frame_name_len);
    let types = r.sample_types().map_err(|e| bad(e.to_string()))?;
    let unit = types[idx].1;
    let period_unit = match &profile.period_type {
        Some(pt) => r.string(pt.unit).map_err(|e| bad(e.to_string()))?,
        None => "",
    };
    let scale = match time_scale(unit) {
        Some(s) => s,
        None if matches!(unit, "count" | "samples") && profile.period > 0 => {
            time_scale(period_unit).map_or(1, |s| s.saturating_mul(profile.period))
        }
        None => 1,
    };
    // Samples repeat location lists and label sets (one per series x stack),
    // so each distinct one is resolved and interned once.
    let mut stacks: HashMap<&[u64], u64> = HashMap::new();
    let mut series: HashMap<Vec<(i64, i64)>, (u64, Vec<(String, String)>)> = HashMap::new();
    let mut frames = Vec::new();
    for s in &profile.sample {
        if s.value.len() != types.len() {
            return Err(bad(format!(
                "sample has {} values, profile has {} sample types",
                s.value.len(),
                types.len()
            )));
        }
        let value = s.value[idx].saturating_mul(scale);
        if value == 0 {
            continue;
        }
        let stack = match stacks.get(s.location_id.as_slice()) {
            Some(&id) => id,
            None => {
                frames.clear();
                r.frames_upto(s, &mut frames, b.limits.max_stack_depth)
                    .map_err(|e| bad(e.to_string()))?;
                let id = b.stack(&frames)?;
                stacks.insert(&s.location_id, id);
                id
            }
        };
        let key: Vec<(i64, i64)> = s
            .label
            .iter()
            .filter(|l| l.str != 0)
            .map(|l| (l.key, l.str))
            .collect();
        let (series_id, requests) = match series.get(&key) {
            Some(found) => found,
            None => {
                let labels = r.labels(s).map_err(|e| bad(e.to_string()))?;
                let found = b.series_and_requests(&labels)?;
                series.entry(key).or_insert(found)
            }
        };
        b.add_row(*series_id, stack, value);
        for request in requests {
            b.add_request(request, *series_id, stack, value)?;
        }
    }
    Ok(())
}

/// Splits a Pyroscope application name `app.cpu{k=v,k2=v2}` into service,
/// kind (the suffix after the last dot; `cpu` if none) and labels.
pub fn pyroscope_name(name: &str) -> Result<(String, String, Labels), Rejected> {
    let (app, tags) = match name.find('{') {
        Some(i) => {
            let tags = name[i + 1..]
                .strip_suffix('}')
                .ok_or_else(|| bad("name: unterminated `{` label list"))?;
            (&name[..i], tags)
        }
        None => (name, ""),
    };
    let (service, kind) = match app.rsplit_once('.') {
        Some((s, k)) if !s.is_empty() && !k.is_empty() => (s, k),
        _ => (app, "cpu"),
    };
    let mut labels = Labels::new();
    for kv in tags.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("name: label {:?} is not k=v", truncate(kv, 64))))?;
        let k = k.trim();
        // Pyroscope's reserved labels (__name__, __session_id__) are not dimensions.
        if k.starts_with("__") {
            continue;
        }
        labels.insert(k.to_owned(), v.trim().to_owned());
    }
    Ok((service.to_owned(), kind.to_owned(), labels))
}

/// The start of the window `ts_ms` falls in.
pub fn align(ts_ms: i64, window: i64) -> i64 {
    ts_ms.div_euclid(window) * window
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            service: "app".into(),
            kind: "cpu".into(),
            ts_ms: 10_000,
            labels: Labels::new(),
        }
    }

    #[test]
    fn folded_sums_duplicates_and_reports_line_numbers() {
        let limits = Limits::default();
        let mut b = BatchBuilder::new(&limits, target()).unwrap();
        folded(b"a;b 2\n\na;b 3\r\na;c 1\n", 10, &mut b).unwrap();
        let batch = b.finish();
        assert_eq!(batch.stacks.len(), 2);
        assert_eq!(batch.series.len(), 1);
        let mut values: Vec<i64> = batch.rows.iter().map(|r| r.value).collect();
        values.sort();
        assert_eq!(values, [10, 50]);

        let mut b = BatchBuilder::new(&limits, target()).unwrap();
        assert_eq!(
            folded(b"a;b 2\na;b x\n", 1, &mut b),
            Err(bad("line 2: count \"x\" is not an integer"))
        );
    }

    #[test]
    fn lines_count_one_sample_each() {
        let limits = Limits::default();
        let mut b = BatchBuilder::new(&limits, target()).unwrap();
        lines(b"a;b\na;b\na;c\n", 5, &mut b).unwrap();
        let mut values: Vec<i64> = b.finish().rows.iter().map(|r| r.value).collect();
        values.sort();
        assert_eq!(values, [5, 10]);
    }

    #[test]
    fn series_limit_is_enforced() {
        let limits = Limits {
            max_series_per_request: 3,
            ..Limits::default()
        };
        let mut b = BatchBuilder::new(&limits, target()).unwrap();
        let mut err = None;
        for i in 0..10 {
            if let Err(e) = b.add(&["f"], &[("tid".into(), i.to_string())], 1) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(Rejected::BadRequest(m)) if m.contains("distinct label sets")));
    }

    #[test]
    fn pyroscope_names() {
        let (s, k, l) = pyroscope_name("my.app.cpu{env=prod, __session_id__=x,region=eu}").unwrap();
        assert_eq!((s.as_str(), k.as_str()), ("my.app", "cpu"));
        assert_eq!(
            l,
            Labels::from([
                ("env".into(), "prod".into()),
                ("region".into(), "eu".into())
            ])
        );
        assert_eq!(pyroscope_name("app").unwrap().1, "cpu");
        assert!(pyroscope_name("app.cpu{a=b").is_err());
    }

    #[test]
    fn pprof_count_with_period_becomes_nanoseconds() {
        let stacks = vec![(vec!["main".to_string(), "f".to_string()], 3)];
        let mut p = profiler_pprof::from_folded(&stacks, "samples", "count", 10_000_000);
        p.period_type = Some(profiler_pprof::ValueType {
            r#type: 1,
            unit: p.string_table.len() as i64,
        });
        p.string_table.push("nanoseconds".into());
        let limits = Limits::default();
        let idx = pick_sample_type(&p, None, Some("cpu")).unwrap();
        let mut b = BatchBuilder::new(&limits, target()).unwrap();
        pprof(&p, idx, &mut b).unwrap();
        assert_eq!(b.finish().rows[0].value, 30_000_000);
    }

    #[test]
    fn long_names_are_cut_and_batches_are_bounded() {
        let limits = Limits {
            max_frame_name_len: 8,
            max_batch_bytes: 1000,
            ..Limits::default()
        };
        let mut b = BatchBuilder::new(&limits, target()).unwrap();
        let id = b.stack(&["main", "ééééééé_long"]).unwrap();
        assert_eq!(&*b.stacks[&id], ["main", "éé…"].map(Arc::from));
        // By id, a sender knows only the frames it sent.
        let sent = ["main", "ééééééé_long"];
        assert_eq!(b.stack_as_sent(&sent).unwrap(), stack_id(&sent));
        assert_eq!(b.stacks[&stack_id(&sent)], b.stacks[&id]);
        let mut err = None;
        for i in 0..100 {
            if let Err(e) = b.stack(&[format!("f{i}")]) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(Rejected::TooLarge(m)) if m.contains("1000 bytes")));
    }

    #[test]
    fn labels_are_validated() {
        let l = Limits::default();
        assert!(validate_label(&l, "host", "a").is_ok());
        assert!(validate_label(&l, "", "a").is_err());
        assert!(validate_label(&l, "a b", "a").is_err());
        assert!(validate_label(&l, "host", &"x".repeat(2000)).is_err());
        assert!(validate_label(&l, "host", "a\nb").is_err());
    }
}
