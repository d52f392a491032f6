//! Label selectors as Grafana's Pyroscope data source writes them,
//! `{service_name="api", host!="b", pod=~"web-.*"}`, and how they become
//! store selections.
//!
//! Semantics are Prometheus': a missing label reads as the empty string,
//! regular expressions match the whole value. The data source sees the store's
//! service as the label `service_name`; the store's own `service` series label
//! is hidden (it repeats the service).
//!
//! The store selects series with `=` and `!=` only (`Matcher`), so each
//! matcher is rewritten against the series the service has: a regular
//! expression, or a matcher on the empty string, becomes `!=` for every known
//! value it rejects, or, when it also rejects series that lack the label, one
//! store selection per accepted value (their union is then scanned).

use std::collections::BTreeSet;
use std::sync::Arc;

use regex::Regex;

use crate::store::{Labels, Matcher};

/// The label naming the service, as Pyroscope calls it.
pub const SERVICE_LABEL: &str = "service_name";
/// The store's series label holding the service (a duplicate of the
/// partition), hidden from the data source.
const STORE_SERVICE_LABEL: &str = "service";

/// A label's value as the data source sees it.
pub fn label<'a>(service: &'a str, labels: &'a Labels, name: &str) -> Option<&'a str> {
    match name {
        SERVICE_LABEL => Some(service),
        STORE_SERVICE_LABEL => None,
        _ => labels.get(name).map(String::as_str),
    }
}

/// The label names of a series as the data source sees them.
pub fn label_names(labels: &Labels) -> impl Iterator<Item = &str> {
    std::iter::once(SERVICE_LABEL).chain(
        labels
            .keys()
            .map(String::as_str)
            .filter(|n| *n != STORE_SERVICE_LABEL && *n != SERVICE_LABEL),
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Re,
    NotRe,
}

#[derive(Debug, Clone)]
pub struct LabelMatcher {
    name: String,
    op: Op,
    value: String,
    /// Anchored: Prometheus matches the whole value.
    regex: Option<Regex>,
}

impl LabelMatcher {
    /// `name="value"`; an empty value matches series without the label.
    pub fn equal(name: &str, value: &str) -> LabelMatcher {
        LabelMatcher {
            name: name.to_owned(),
            op: Op::Eq,
            value: value.to_owned(),
            regex: None,
        }
    }

    fn new(name: String, op: Op, value: String) -> Result<LabelMatcher, String> {
        let regex = match op {
            Op::Re | Op::NotRe => Some(
                Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| format!("label {name:?}: invalid regular expression: {e}"))?,
            ),
            Op::Eq | Op::Ne => None,
        };
        Ok(LabelMatcher {
            name,
            op,
            value,
            regex,
        })
    }

    /// Whether a value passes; a missing label is the empty string.
    fn accepts(&self, value: &str) -> bool {
        match (self.op, &self.regex) {
            (Op::Eq, _) => value == self.value,
            (Op::Ne, _) => value != self.value,
            (Op::Re, Some(re)) => re.is_match(value),
            (Op::NotRe, Some(re)) => !re.is_match(value),
            (Op::Re | Op::NotRe, None) => unreachable!("regex matchers are built with their regex"),
        }
    }

    /// Store matcher sets, one per alternative, selecting exactly the series
    /// of `service` this matcher accepts; none if it accepts none.
    fn alternatives(&self, service: &str, series: &[Arc<Labels>]) -> Vec<Vec<Matcher>> {
        if self.name == SERVICE_LABEL || self.name == STORE_SERVICE_LABEL {
            let value = if self.name == SERVICE_LABEL {
                service
            } else {
                ""
            };
            return if self.accepts(value) {
                vec![vec![]]
            } else {
                vec![]
            };
        }
        let known: BTreeSet<&str> = series
            .iter()
            .filter_map(|l| l.get(&self.name).map(String::as_str))
            .collect();
        let some_lack = series.iter().any(|l| !l.contains_key(&self.name));
        let (accepted, rejected): (Vec<&str>, Vec<&str>) =
            known.into_iter().partition(|v| self.accepts(v));
        let missing_accepted = self.accepts("");
        if accepted.is_empty() && !missing_accepted {
            return vec![];
        }
        let eq = |v: &str| Matcher::Eq(self.name.clone(), v.to_owned());
        let ne = |v: &str| Matcher::Ne(self.name.clone(), v.to_owned());
        // `!=` lets series without the label through, so the "reject the
        // rest" form is exact when those series are wanted or absent; it
        // takes one scan where the other form takes one per accepted value.
        if missing_accepted || (!some_lack && accepted.len() != 1) {
            vec![rejected.into_iter().map(ne).collect()]
        } else {
            accepted.into_iter().map(|v| vec![eq(v)]).collect()
        }
    }
}

/// A parsed label selector: every matcher must accept.
#[derive(Debug, Clone, Default)]
pub struct Selector(Vec<LabelMatcher>);

/// The most store scans one selection may expand to (see the module doc).
pub const MAX_SCANS: usize = 256;

impl Selector {
    /// Parses `{name op "value", ...}`; an empty string selects everything.
    pub fn parse(text: &str) -> Result<Selector, String> {
        Parser::new(text)
            .selector()
            .map_err(|e| format!("label selector {text:?}: {e}"))
    }

    pub fn with(mut self, matcher: LabelMatcher) -> Selector {
        self.0.push(matcher);
        self
    }

    /// Whether a series of `service` with these labels is selected.
    pub fn matches(&self, service: &str, labels: &Labels) -> bool {
        self.0
            .iter()
            .all(|m| m.accepts(label(service, labels, &m.name).unwrap_or("")))
    }

    /// Whether this selector can select anything of `service`, judging by the
    /// service name alone.
    pub fn admits_service(&self, service: &str) -> bool {
        self.0
            .iter()
            .filter(|m| m.name == SERVICE_LABEL)
            .all(|m| m.accepts(service))
    }

    /// Store matcher sets whose union selects exactly the matching series of
    /// `service`, given the series it has; empty when nothing matches.
    pub fn plan(&self, service: &str, series: &[Arc<Labels>]) -> Result<Vec<Vec<Matcher>>, String> {
        let mut plan: Vec<Vec<Matcher>> = vec![vec![]];
        for m in &self.0 {
            let alternatives = m.alternatives(service, series);
            if plan.len() * alternatives.len() > MAX_SCANS {
                return Err(format!(
                    "the selector expands to more than {MAX_SCANS} store scans for service {service:?}; \
                     use = or != matchers, or regular expressions on labels every series has"
                ));
            }
            plan = plan
                .iter()
                .flat_map(|base| {
                    alternatives.iter().map(move |alt| {
                        let mut set = base.clone();
                        set.extend(alt.iter().cloned());
                        set
                    })
                })
                .collect();
        }
        Ok(plan)
    }
}

struct Parser<'a> {
    rest: &'a str,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Parser<'a> {
        Parser { rest: text }
    }

    fn skip_space(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_space();
        match self.rest.strip_prefix(token) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        self.skip_space();
        if self.rest.is_empty() {
            return Ok(Selector::default());
        }
        if !self.eat("{") {
            return Err("expected `{`".into());
        }
        let mut matchers = Vec::new();
        loop {
            if self.eat("}") {
                break;
            }
            matchers.push(self.matcher()?);
            if self.eat(",") {
                continue;
            }
            if !self.eat("}") {
                return Err(format!("expected `,` or `}}` at {:?}", self.rest));
            }
            break;
        }
        self.skip_space();
        if !self.rest.is_empty() {
            return Err(format!("unexpected {:?} after `}}`", self.rest));
        }
        Ok(Selector(matchers))
    }

    fn matcher(&mut self) -> Result<LabelMatcher, String> {
        self.skip_space();
        let text = self.rest;
        let end = text
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(text.len());
        let name = &text[..end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("expected a label name at {text:?}"));
        }
        self.rest = &text[end..];
        // Two-character operators first: `=~` must not read as `=`.
        let op = [
            ("=~", Op::Re),
            ("!~", Op::NotRe),
            ("!=", Op::Ne),
            ("=", Op::Eq),
        ]
        .into_iter()
        .find(|(token, _)| self.eat(token))
        .map(|(_, op)| op)
        .ok_or_else(|| format!("expected =, !=, =~ or !~ after {name:?}"))?;
        let value = self.string()?;
        LabelMatcher::new(name.to_owned(), op, value)
    }

    /// A double- or single-quoted string with backslash escapes, or a raw
    /// backquoted one.
    fn string(&mut self) -> Result<String, String> {
        self.skip_space();
        let text = self.rest;
        let mut chars = text.char_indices();
        let quote = match chars.next() {
            Some((_, q @ ('"' | '\'' | '`'))) => q,
            _ => return Err(format!("expected a quoted value at {text:?}")),
        };
        let mut out = String::new();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                self.rest = &text[i + 1..];
                return Ok(out);
            }
            if c != '\\' || quote == '`' {
                out.push(c);
                continue;
            }
            out.push(match chars.next().map(|(_, e)| e) {
                Some('n') => '\n',
                Some('t') => '\t',
                Some('r') => '\r',
                Some(e @ ('\\' | '"' | '\'')) => e,
                Some(e) => return Err(format!("unsupported escape `\\{e}`")),
                None => break,
            });
        }
        Err("unterminated string".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Arc<Labels> {
        Arc::new(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn parses_prometheus_style_selectors() {
        let s =
            Selector::parse(r#" { service_name="api", host != 'b', pod=~"web-.*" , x!~`a\d`, } "#)
                .unwrap();
        let ops: Vec<(&str, Op, &str)> =
            s.0.iter()
                .map(|m| (m.name.as_str(), m.op, m.value.as_str()))
                .collect();
        assert_eq!(
            ops,
            [
                ("service_name", Op::Eq, "api"),
                ("host", Op::Ne, "b"),
                ("pod", Op::Re, "web-.*"),
                ("x", Op::NotRe, r"a\d"),
            ]
        );
        assert!(Selector::parse("").unwrap().0.is_empty());
        assert!(Selector::parse("{}").unwrap().0.is_empty());
        assert_eq!(
            Selector::parse(r#"{a="q\"\\"}"#).unwrap().0[0].value,
            "q\"\\"
        );
        for bad in [
            "{",
            "{a}",
            "{a=b}",
            r#"{a="b""#,
            r#"{a="b"} x"#,
            r#"{a=~"("}"#,
            "cpu{}",
            r#"{1a="b"}"#,
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching_follows_prometheus() {
        let a = labels(&[("service", "api"), ("host", "a")]);
        let none = labels(&[("service", "api")]);
        let sel = |s: &str| Selector::parse(s).unwrap();
        assert!(sel(r#"{service_name="api", host="a"}"#).matches("api", &a));
        assert!(!sel(r#"{service_name="web"}"#).matches("api", &a));
        assert!(sel(r#"{host=""}"#).matches("api", &none));
        assert!(sel(r#"{host!="a"}"#).matches("api", &none));
        assert!(sel(r#"{host=~"a|b"}"#).matches("api", &a));
        assert!(!sel(r#"{host=~"a|b"}"#).matches("api", &none));
        assert!(!sel(r#"{host=~"a."}"#).matches("api", &a), "anchored");
        assert!(
            !sel(r#"{service="api"}"#).matches("api", &a),
            "the store's service label is hidden"
        );
        assert_eq!(
            label_names(&a).collect::<Vec<_>>(),
            ["service_name", "host"]
        );
    }

    /// Whatever form a plan takes, the store selects exactly the series the
    /// selector matches.
    #[test]
    fn plans_select_exactly_the_matching_series() {
        let series = vec![
            labels(&[("service", "api"), ("host", "a"), ("pod", "web-1")]),
            labels(&[("service", "api"), ("host", "b"), ("pod", "web-2")]),
            labels(&[("service", "api"), ("host", "c")]),
            labels(&[("service", "api"), ("pod", "db-1")]),
        ];
        let selectors = [
            "{}",
            r#"{host="a"}"#,
            r#"{host!="a"}"#,
            r#"{host=""}"#,
            r#"{host!=""}"#,
            r#"{host=~"a|b"}"#,
            r#"{host=~"a|"}"#,
            r#"{host!~"a|b"}"#,
            r#"{host!~"a|"}"#,
            r#"{pod=~"web-.*", host!="b"}"#,
            r#"{service_name=~"ap.", host=~".+"}"#,
            r#"{service_name="web"}"#,
            r#"{host="z"}"#,
        ];
        for text in selectors {
            let sel = Selector::parse(text).unwrap();
            let plan = sel.plan("api", &series).unwrap();
            for l in &series {
                let by_plan = plan.iter().any(|set| set.iter().all(|m| m.matches(l)));
                assert_eq!(
                    by_plan,
                    sel.matches("api", l),
                    "{text} on {l:?}: plan {plan:?}"
                );
                let hits = plan
                    .iter()
                    .filter(|set| set.iter().all(|m| m.matches(l)))
                    .count();
                assert!(hits <= 1, "{text}: alternatives overlap on {l:?}");
            }
        }
    }

    #[test]
    fn plans_that_would_scan_too_often_are_refused() {
        let series: Vec<_> = (0..MAX_SCANS + 1)
            .map(|i| labels(&[("host", &format!("h{i}"))]))
            .chain([labels(&[])])
            .collect();
        assert!(Selector::parse(r#"{host=~"h.*"}"#)
            .unwrap()
            .plan("api", &series)
            .is_err());
        // A label every series has needs one scan whatever the expression.
        assert_eq!(
            Selector::parse(r#"{host=~"h.*"}"#)
                .unwrap()
                .plan("api", &series[..MAX_SCANS + 1])
                .unwrap()
                .len(),
            1
        );
    }
}
