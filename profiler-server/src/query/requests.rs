//! Requests (see `store::requests`): each request's time merged over the windows it
//! spanned, ranked by total time (on-CPU plus off-CPU: its latency as its threads
//! lived it), the percentiles of that distribution, and the merged profile of the
//! slowest share of them or of the rest.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::store::{series_id, Aggregate, Labels, Refused, RequestTable, Selector, Store, StoreResult};

/// Which requests a profile merges: the slowest `percent` of the selected requests
/// by total time, or all the others.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pick {
    Slowest(f64),
    Rest(f64),
}

impl Pick {
    /// `slowest:P` or `rest:P`, P in (0, 100].
    pub fn parse(text: &str) -> Result<Pick, String> {
        let bad = || format!("`requests` must be slowest:P or rest:P with P a percentage in (0, 100], not {text:?}");
        let (which, percent) = text.split_once(':').ok_or_else(bad)?;
        let percent: f64 = percent.parse().map_err(|_| bad())?;
        if !(percent > 0.0 && percent <= 100.0) {
            return Err(bad());
        }
        match which {
            "slowest" => Ok(Pick::Slowest(percent)),
            "rest" => Ok(Pick::Rest(percent)),
            _ => Err(bad()),
        }
    }
}

/// One request over the range.
#[derive(Debug, Clone, Serialize, PartialEq)]
///
/// A range may hold a million of them: names and labels are shared, and the rest kept
/// in short vectors (about 300 bytes a request of a few stacks, measured in the
/// server bench).
pub struct Request {
    #[serde(serialize_with = "as_str")]
    pub key: Arc<str>,
    #[serde(serialize_with = "as_str")]
    pub value: Arc<str>,
    /// On-CPU plus off-CPU nanoseconds.
    pub total_ns: i64,
    pub on_cpu_ns: i64,
    /// Off-CPU nanoseconds per wait reason.
    #[serde(serialize_with = "as_map")]
    pub off_cpu_ns: Vec<(Arc<str>, i64)>,
    /// Starts of the first and last windows it was seen in, unix ms.
    pub first_ms: i64,
    pub last_ms: i64,
    /// The labels of the series its time went to (the first seen, if several), but
    /// `service`.
    #[serde(serialize_with = "without_service")]
    pub labels: Arc<Labels>,
    /// (kind, stack id, value) as read, repeats included: summed by [`merged`].
    #[serde(skip)]
    stacks: Vec<(Arc<str>, u64, i64)>,
}

fn as_str<S: serde::Serializer>(text: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(text)
}

fn as_map<S: serde::Serializer>(pairs: &[(Arc<str>, i64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (&**k, v)))
}

fn without_service<S: serde::Serializer>(labels: &Arc<Labels>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(labels.iter().filter(|(k, _)| *k != "service"))
}

/// Percentiles (nearest rank) of requests' total time, nanoseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: i64,
    pub p90: i64,
    pub p99: i64,
    pub max: i64,
}

/// The selected requests, slowest first.
pub struct Requests {
    pub requests: Vec<Request>,
}

/// The request key a view reads when none is asked for: the first of `order` (the
/// server's `request_labels`) that the table has in the range, else the first it has.
fn main_key<'a>(keys: &std::collections::BTreeSet<&'a str>, order: &[String]) -> Option<&'a str> {
    order.iter().find_map(|k| keys.get(k.as_str()).copied()).or_else(|| keys.first().copied())
}

impl Requests {
    /// Every request named by `key` (None: the main key, see [`main_key`], of
    /// `order`) of the selector's service and range whose series match its matchers,
    /// merged over windows, slowest first (ties by value). More than `max` requests of
    /// any key are refused: each holds a few hundred bytes until the answer is sent.
    pub fn read(table: &RequestTable, store: &dyn Store, sel: &Selector, key: Option<&str>, order: &[String], max: usize) -> StoreResult<Requests> {
        let labels: HashMap<u64, Arc<Labels>> = store.series(&sel.service)?.into_iter().map(|l| (series_id(&l), l)).collect();
        // Kinds, reasons and keys, each held once.
        let mut names: HashMap<String, Arc<str>> = HashMap::new();
        let mut name = |text: &str| -> Arc<str> {
            match names.get(text) {
                Some(n) => n.clone(),
                None => names.entry(text.to_owned()).or_insert_with(|| Arc::from(text)).clone(),
            }
        };
        let mut by_name: HashMap<(Arc<str>, Arc<str>), Request> = HashMap::new();
        let mut too_many = false;
        table.scan(&sel.service, sel.from_ms, sel.until_ms, &sel.cancel, |row| {
            let Some(series) = labels.get(&row.series_id) else { return true };
            if !sel.matchers.iter().all(|m| m.matches(series)) {
                return true;
            }
            let id = (name(&row.key), Arc::<str>::from(row.value));
            if by_name.len() >= max && !by_name.contains_key(&id) {
                too_many = true;
                return false;
            }
            let request = by_name.entry(id).or_insert_with_key(|(key, value)| Request {
                key: key.clone(),
                value: value.clone(),
                total_ns: 0,
                on_cpu_ns: 0,
                off_cpu_ns: Vec::new(),
                first_ms: row.ts_ms,
                last_ms: row.ts_ms,
                labels: series.clone(),
                stacks: Vec::new(),
            });
            request.first_ms = request.first_ms.min(row.ts_ms);
            request.last_ms = request.last_ms.max(row.ts_ms);
            let sum: i64 = row.stacks.iter().map(|&(_, v)| v).fold(0i64, |a, v| a.saturating_add(v));
            let kind = name(&row.kind);
            if profiler_pprof::kind::is_on_cpu(&row.kind) {
                request.on_cpu_ns = request.on_cpu_ns.saturating_add(sum);
            } else if let Some(reason) = profiler_pprof::kind::off_cpu_reason(&row.kind) {
                match request.off_cpu_ns.iter_mut().find(|(r, _)| **r == *reason) {
                    Some((_, ns)) => *ns = ns.saturating_add(sum),
                    None => request.off_cpu_ns.push((name(reason), sum)),
                }
            } else {
                // Neither time kind (an allocation profile's request, say): not latency.
                return true;
            }
            request.total_ns = request.total_ns.saturating_add(sum);
            if sel.wants_kind(&row.kind) {
                request.stacks.extend(row.stacks.into_iter().map(|(stack, value)| (kind.clone(), stack, value)));
            }
            true
        })?;
        if too_many {
            return Err(Refused::TooLarge(format!(
                "more than {max} requests in {}'s range: narrow the range or filter (limits.max_query_requests)",
                sel.service
            ))
            .into());
        }
        let keys: std::collections::BTreeSet<&str> = by_name.keys().map(|(k, _)| &**k).collect();
        let Some(key) = key.or_else(|| main_key(&keys, order)).map(str::to_owned) else {
            return Ok(Requests { requests: Vec::new() });
        };
        let mut requests: Vec<Request> = by_name.into_values().filter(|r| *r.key == *key).collect();
        requests.sort_unstable_by(|a, b| b.total_ns.cmp(&a.total_ns).then_with(|| a.value.cmp(&b.value)));
        Ok(Requests { requests })
    }

    pub fn percentiles(&self) -> Percentiles {
        let n = self.requests.len();
        if n == 0 {
            return Percentiles::default();
        }
        // Slowest first: the q-quantile by nearest rank is at ascending rank ceil(q n).
        let at = |q: f64| self.requests[n - ((q * n as f64).ceil() as usize).clamp(1, n)].total_ns;
        Percentiles { p50: at(0.50), p90: at(0.90), p99: at(0.99), max: self.requests[0].total_ns }
    }

    /// How many requests the slowest `percent` are: at least one of any.
    pub fn slowest_count(&self, percent: f64) -> usize {
        let n = self.requests.len();
        ((percent / 100.0 * n as f64).ceil() as usize).clamp(n.min(1), n)
    }

    /// The merged stacks of the picked requests, per kind, like a store's aggregate.
    pub fn aggregate(&self, pick: Pick) -> Aggregate {
        let picked = match pick {
            Pick::Slowest(percent) => &self.requests[..self.slowest_count(percent)],
            Pick::Rest(percent) => &self.requests[self.slowest_count(percent)..],
        };
        merged(picked)
    }

    /// The merged stacks of the requests named any of `values` (span ids, say).
    pub fn aggregate_named(&self, values: &std::collections::HashSet<&str>) -> Aggregate {
        merged(self.requests.iter().filter(|r| values.contains(&*r.value)))
    }
}

fn merged<'a>(requests: impl IntoIterator<Item = &'a Request>) -> Aggregate {
    let mut agg = Aggregate::new();
    for request in requests {
        for (kind, stack, value) in &request.stacks {
            let slot = agg.entry(kind.to_string()).or_default().entry(*stack).or_insert(0);
            *slot = slot.saturating_add(*value);
        }
    }
    agg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(value: &str, total_ns: i64) -> Request {
        Request {
            key: "request_id".into(),
            value: value.into(),
            total_ns,
            on_cpu_ns: 0,
            off_cpu_ns: Vec::new(),
            first_ms: 0,
            last_ms: 0,
            labels: Arc::default(),
            stacks: vec![(Arc::from("off-cpu:sleep"), total_ns as u64, total_ns)],
        }
    }

    #[test]
    fn percentiles_by_nearest_rank_and_the_slowest_share() {
        // 200 requests of 1..=200 ms, slowest first.
        let requests = Requests { requests: (1..=200).rev().map(|ms| request(&ms.to_string(), ms * 1_000_000)).collect() };
        let p = requests.percentiles();
        assert_eq!((p.p50, p.p90, p.p99, p.max), (100_000_000, 180_000_000, 198_000_000, 200_000_000));
        assert_eq!(requests.slowest_count(1.0), 2);
        assert_eq!(requests.slowest_count(0.1), 1, "at least one");
        let slowest = requests.aggregate(Pick::Slowest(1.0));
        assert_eq!(slowest["off-cpu:sleep"].values().sum::<i64>(), 399_000_000);
        let rest = requests.aggregate(Pick::Rest(1.0));
        assert_eq!(rest["off-cpu:sleep"].len(), 198);
        assert_eq!(Requests { requests: vec![] }.percentiles(), Percentiles::default());
    }

    /// Read from a real table and store: requests merge over windows and parts, the
    /// filter applies to their series, and past `max` requests the read is refused.
    #[test]
    fn reads_merge_filter_and_refuse_past_the_bound() {
        use crate::store::{Batch, EmbeddedStore, Matcher, RequestRow, StoreError, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), StoreOptions::default()).unwrap();
        let labels = |endpoint: &str| Labels::from([("service".to_string(), "api".to_string()), ("endpoint".to_string(), endpoint.to_string())]);
        for endpoint in ["checkout", "search"] {
            let l = labels(endpoint);
            store
                .append(Batch { service: "api".into(), kind: "on-cpu".into(), series: vec![(series_id(&l), l)], ..Batch::default() })
                .unwrap();
        }
        let table = RequestTable::open(dir.path(), None).unwrap();
        let row = |value: &str, endpoint: &str, ts_ms: i64, kind: &str, ns: i64| RequestRow {
            service: "api".into(),
            ts_ms,
            key: "request_id".into(),
            value: value.into(),
            part: format!("{ts_ms}/{kind}"),
            series_id: series_id(&labels(endpoint)),
            kind: kind.into(),
            stacks: vec![(1, ns)],
        };
        table
            .append(&[
                row("a", "checkout", 0, "on-cpu", 5),
                row("a", "checkout", 10_000, "off-cpu:sleep", 40),
                row("b", "checkout", 0, "on-cpu", 7),
                row("c", "search", 0, "off-cpu:blocked-io", 100),
            ])
            .unwrap();
        let sel = |matchers: Vec<Matcher>| Selector {
            service: "api".into(),
            from_ms: 0,
            until_ms: 20_000,
            kinds: None,
            matchers,
            cancel: Default::default(),
        };
        let read = Requests::read(&table, &store, &sel(vec![]), None, &[], 10).unwrap();
        let totals: Vec<(&str, i64)> = read.requests.iter().map(|r| (&*r.value, r.total_ns)).collect();
        assert_eq!(totals, [("c", 100), ("a", 45), ("b", 7)]);
        assert_eq!((read.requests[1].first_ms, read.requests[1].last_ms), (0, 10_000));
        let checkout = Requests::read(&table, &store, &sel(vec![Matcher::Eq("endpoint".into(), "checkout".into())]), None, &[], 10).unwrap();
        assert_eq!(checkout.requests.len(), 2);
        assert!(matches!(
            Requests::read(&table, &store, &sel(vec![]), None, &[], 2),
            Err(StoreError::Refused(Refused::TooLarge(_)))
        ));
    }

    #[test]
    fn the_main_key_follows_the_configured_order() {
        let order = ["request_id", "trace_id", "span_id"].map(String::from);
        let keys = |ks: &[&'static str]| ks.iter().copied().collect::<std::collections::BTreeSet<&str>>();
        assert_eq!(main_key(&keys(&["span_id", "trace_id"]), &order), Some("trace_id"));
        assert_eq!(main_key(&keys(&["job_id"]), &order), Some("job_id"));
        assert_eq!(main_key(&keys(&[]), &order), None);
    }

    #[test]
    fn picks_parse() {
        assert_eq!(Pick::parse("slowest:1"), Ok(Pick::Slowest(1.0)));
        assert_eq!(Pick::parse("rest:0.5"), Ok(Pick::Rest(0.5)));
        for bad in ["slowest", "slowest:0", "slowest:101", "fastest:1", "slowest:x"] {
            assert!(Pick::parse(bad).is_err(), "{bad}");
        }
    }
}
