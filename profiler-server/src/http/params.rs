//! Query-string parameters, each parsed in one place: times (unix ms or
//! `now-<n><unit>`, within 1970..9999), ranges within the query limit, label filters.

use crate::config::Limits;
use crate::store::{now_ms, Cancel, Labels, Matcher, Selector};

use super::{ApiError, ApiResult};

/// Decoded query string; repeated keys are kept in order.
pub struct Params(pub(crate) Vec<(String, String)>);

impl Params {
    pub fn new(q: Option<String>) -> Params {
        Params(
            form_urlencoded::parse(q.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
    /// Every non-empty value of a repeated parameter, in order.
    pub fn all<'a>(&'a self, k: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(n, v)| n == k && !v.is_empty()).map(|(_, v)| v.as_str())
    }
    /// `label=name:value`, repeatable: the one parser of label parameters.
    /// A value may hold colons; a name cannot (see `profiler_pprof::is_label_name`).
    pub fn labels(&self) -> ApiResult<Labels> {
        let mut labels = Labels::new();
        for (_, v) in self.0.iter().filter(|(k, _)| k == "label") {
            let (n, val) = v
                .split_once(':')
                .ok_or_else(|| ApiError::bad(format!("label {v:?} is not name:value")))?;
            labels.insert(n.to_owned(), val.to_owned());
        }
        Ok(labels)
    }
    pub fn req(&self, k: &str) -> ApiResult<&str> {
        self.get(k)
            .ok_or_else(|| ApiError::bad(format!("missing query parameter `{k}`")))
    }
    pub fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> ApiResult<T> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::bad(format!("`{k}`: {v:?} is not a valid number"))),
        }
    }
    pub fn flag(&self, k: &str, default: bool) -> ApiResult<bool> {
        match self.get(k) {
            None => Ok(default),
            Some("true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(v) => Err(ApiError::bad(format!("`{k}`: {v:?} is not true/false"))),
        }
    }
    /// Unix milliseconds, or `now`, `now-<n><s|m|h|d>`.
    pub fn time(&self, k: &str, now: i64, default: i64) -> ApiResult<i64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => parse_time(v, now).ok_or_else(|| {
                ApiError::bad(format!(
                    "`{k}`: {v:?} is neither unix milliseconds (1970 to 9999) nor now[-<n>(s|m|h|d)]"
                ))
            }),
        }
    }
}

/// JSON bodies; anything malformed or unknown gets serde's reason, for a 400.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|err| format!("invalid request body: {err}"))
}

/// The latest time a client may name, in unix milliseconds: the end of year 9999.
/// Times from clients outside `0..=MAX_CLIENT_TIME_MS` are refused, so the arithmetic
/// done on them (range lengths, defaults an hour back, steps, window alignment) cannot
/// overflow, whatever a request says.
pub const MAX_CLIENT_TIME_MS: i64 = 253_402_300_799_999;

/// `ms` when it is a time a client may name (see [`MAX_CLIENT_TIME_MS`]).
pub fn client_time_ms(ms: i64) -> Option<i64> {
    (0..=MAX_CLIENT_TIME_MS).contains(&ms).then_some(ms)
}

fn parse_time(v: &str, now: i64) -> Option<i64> {
    if let Ok(ms) = v.parse::<i64>() {
        return client_time_ms(ms);
    }
    let rest = v.strip_prefix("now")?;
    if rest.is_empty() {
        return Some(now);
    }
    let rel = rest.strip_prefix('-')?;
    let (n, unit) = rel.split_at(rel.len().checked_sub(1)?);
    let n: i64 = n.parse().ok()?;
    let mult = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    client_time_ms(now.checked_sub(n.checked_mul(mult)?)?)
}

/// The common selection parameters of query routes.
/// `from_key`..`until_key`, by default the last hour, within the range a
/// query may cover.
pub fn time_range(p: &Params, from_key: &str, until_key: &str, limits: &Limits) -> ApiResult<(i64, i64)> {
    let now = now_ms();
    let until = p.time(until_key, now, now)?;
    let from = p.time(from_key, now, until - 3_600_000)?;
    within_query_range(from, until, limits, (from_key, until_key))
}

/// `from..until` if it is a range a query may cover: not empty, not longer
/// than `max_query_range_hours`. Every route's ranges pass here.
pub fn within_query_range(from: i64, until: i64, limits: &Limits, (from_key, until_key): (&str, &str)) -> ApiResult<(i64, i64)> {
    if from >= until {
        return Err(ApiError::bad(format!(
            "`{from_key}` must be before `{until_key}`"
        )));
    }
    let max_range_ms = (limits.max_query_range_hours as i64).saturating_mul(3_600_000);
    if until.saturating_sub(from) > max_range_ms {
        return Err(ApiError::bad(format!(
            "`{from_key}`..`{until_key}` spans more than the {} hours a query may cover",
            limits.max_query_range_hours
        )));
    }
    Ok((from, until))
}

/// Most points a time series may have (the timeline, Grafana's series).
pub const MAX_POINTS: i64 = 100_000;

/// `step_ms` if it is positive and gives at most `max_points` points over
/// `from..until`. Every route's steps pass here.
pub fn points_step(step_ms: i64, (from, until): (i64, i64), max_points: i64) -> ApiResult<i64> {
    if step_ms <= 0 || (until - from) / step_ms > max_points {
        return Err(ApiError::bad(format!("`step` must be positive and give at most {max_points} points")));
    }
    Ok(step_ms)
}

pub fn selector(p: &Params, from_key: &str, until_key: &str, limits: &Limits) -> ApiResult<Selector> {
    let service = p.req("service")?.to_owned();
    let (from, until) = time_range(p, from_key, until_key, limits)?;
    let kinds = p.get("kinds").or(p.get("kind")).map(|k| {
        k.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    });
    Ok(Selector {
        service,
        from_ms: from,
        until_ms: until,
        kinds,
        matchers: matchers(p.get("filter").unwrap_or(""))?,
        cancel: Cancel::default(),
    })
}

/// `host=a,pid!=7`: every one must match.
pub fn matchers(text: &str) -> ApiResult<Vec<Matcher>> {
    let mut out = Vec::new();
    for m in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        out.push(if let Some((k, v)) = m.split_once("!=") {
            Matcher::Ne(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = m.split_once('=') {
            Matcher::Eq(k.trim().to_owned(), v.trim().to_owned())
        } else {
            return Err(ApiError::bad(format!(
                "filter {m:?} is not name=value or name!=value"
            )));
        });
    }
    Ok(out)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times() {
        assert_eq!(parse_time("123", 1000), Some(123));
        assert_eq!(parse_time("now", 1000), Some(1000));
        assert_eq!(parse_time("now-1s", 5000), Some(4000));
        assert_eq!(
            parse_time("now-2h", 10_000_000),
            Some(10_000_000 - 7_200_000)
        );
        assert_eq!(parse_time("now-1x", 0), None);
        assert_eq!(parse_time("yesterday", 0), None);
    }
}

