//! Two profiles side by side, for a CI gate: each function's share of its
//! kind's time, self and total, before and after; and the differential flame
//! graph of the two (inferno's: red grew, blue shrank, widths of the after
//! profile).
//!
//! Shares, not absolute values, are compared: a benchmark run in CI is not
//! the same length twice, but where its time goes should stay put.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;

use crate::{folded, kind, Error};

/// One stack of a profile: its kind (`on-cpu`, `off-cpu:sleep`, a pprof
/// sample type...), root-first frames and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub kind: String,
    pub frames: Vec<String>,
    pub value: i64,
}

/// The kind of folded stacks without a `[kind]` root: what `perf`,
/// `profiler-agent record` without `--off-cpu` and most tools write.
pub const FOLDED_KIND: &str = "on-cpu";

/// Reads a profile: folded text (with or without `[kind]` roots) or pprof,
/// either one optionally gzipped; at most `max_decompressed` bytes decoded.
pub fn read_profile(bytes: &[u8], max_decompressed: usize) -> Result<Vec<Stack>, Error> {
    let raw = crate::gunzip(bytes, max_decompressed)?;
    if let Ok(text) = std::str::from_utf8(&raw) {
        if let Some(stacks) = parse_folded(text) {
            return Ok(stacks);
        }
    }
    let profile = crate::decode(&raw)?;
    let sample_type = profile
        .sample_type
        .first()
        .and_then(|t| profile.string_table.get(t.r#type as usize))
        .cloned()
        .unwrap_or_else(|| FOLDED_KIND.to_owned());
    let stacks = crate::to_stacks(&profile)?;
    Ok(stacks
        .into_iter()
        .map(|s| with_kind(s.frames, s.values.first().copied().unwrap_or(0), &sample_type))
        .collect())
}

/// Folded text, or None if a non-empty line is not `frames value`.
fn parse_folded(text: &str) -> Option<Vec<Stack>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (frames, value) = folded::parse_line(line).ok()?;
        out.push(with_kind(frames.map(str::to_owned).collect(), value, FOLDED_KIND));
    }
    Some(out)
}

/// Moves a `[kind]` root frame into the kind.
fn with_kind(mut frames: Vec<String>, value: i64, default_kind: &str) -> Stack {
    let root_kind = frames
        .first()
        .and_then(|f| f.strip_prefix('[')?.strip_suffix(']'))
        .filter(|k| !k.is_empty() && !k.contains(';'))
        .map(str::to_owned);
    let kind = match root_kind {
        Some(k) => {
            frames.remove(0);
            k
        }
        None => default_kind.to_owned(),
    };
    Stack { kind, frames, value }
}

/// A function's shares of its kind's time in both profiles.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionShares {
    pub kind: String,
    pub function: String,
    pub base_self: f64,
    pub target_self: f64,
    pub base_total: f64,
    pub target_total: f64,
}

impl FunctionShares {
    pub fn self_growth(&self) -> f64 {
        self.target_self - self.base_self
    }

    pub fn total_growth(&self) -> f64 {
        self.target_total - self.base_total
    }
}

/// (kind, function) -> (self, total) shares of the kind's time.
fn shares(stacks: &[Stack]) -> HashMap<(&str, &str), (f64, f64)> {
    let mut kind_totals: HashMap<&str, i64> = HashMap::new();
    let mut values: HashMap<(&str, &str), (i64, i64)> = HashMap::new();
    for s in stacks.iter().filter(|s| s.value > 0) {
        *kind_totals.entry(&s.kind).or_insert(0) += s.value;
        // A recursive function counts once per stack towards its total.
        let mut seen = HashSet::new();
        for f in &s.frames {
            if seen.insert(f.as_str()) {
                values.entry((&s.kind, f)).or_default().1 += s.value;
            }
        }
        if let Some(leaf) = s.frames.last() {
            values.entry((&s.kind, leaf)).or_default().0 += s.value;
        }
    }
    values
        .into_iter()
        .map(|(key, (own, total))| {
            let all = kind_totals[key.0] as f64;
            (key, (own as f64 / all, total as f64 / all))
        })
        .collect()
}

/// Every function of either profile, the largest growth of self share first
/// (ties: of total share, then by kind and name).
pub fn compare(base: &[Stack], target: &[Stack]) -> Vec<FunctionShares> {
    let (b, t) = (shares(base), shares(target));
    let keys: HashSet<&(&str, &str)> = b.keys().chain(t.keys()).collect();
    let mut out: Vec<FunctionShares> = keys
        .into_iter()
        .map(|key| {
            let (base_self, base_total) = b.get(key).copied().unwrap_or_default();
            let (target_self, target_total) = t.get(key).copied().unwrap_or_default();
            FunctionShares {
                kind: key.0.to_owned(),
                function: key.1.to_owned(),
                base_self,
                target_self,
                base_total,
                target_total,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.self_growth()
            .total_cmp(&a.self_growth())
            .then(b.total_growth().total_cmp(&a.total_growth()))
            .then_with(|| (&a.kind, &a.function).cmp(&(&b.kind, &b.function)))
    });
    out
}

/// The differential flame graph: the target's stacks, red where a stack's
/// share grew and blue where it shrank (both profiles normalized to the same
/// total); with several kinds, each under its `[kind]` root.
pub fn write_diff_svg(base: &[Stack], target: &[Stack], title: &str, out: impl Write) -> std::io::Result<()> {
    let kinds: Vec<&str> = base.iter().chain(target).map(|s| s.kind.as_str()).collect();
    let kind_roots = kind::several_kinds(kinds.iter().copied());
    let text = |stacks: &[Stack]| -> String {
        let mut merged: BTreeMap<String, i64> = BTreeMap::new();
        for s in stacks.iter().filter(|s| s.value > 0) {
            let frames: Vec<_> = folded::escaped_frames(kind_roots.then_some(s.kind.as_str()), &s.frames).collect();
            *merged.entry(frames.join(";")).or_insert(0) += s.value;
        }
        merged.into_iter().map(|(stack, v)| format!("{stack} {v}\n")).collect()
    };
    let mut diff = Vec::new();
    let opts = inferno::differential::Options { normalize: true, ..Default::default() };
    inferno::differential::from_readers(opts, text(base).as_bytes(), text(target).as_bytes(), &mut diff)?;
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.subtitle = Some("red: share grew, blue: share shrank (both normalized)".to_owned());
    if diff.is_empty() {
        options.title = format!("{title}: no samples");
        diff = b"no samples 1 1\n".to_vec();
    }
    inferno::flamegraph::from_reader(&mut options, diff.as_slice(), out).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(text: &str) -> Vec<Stack> {
        read_profile(text.as_bytes(), 1 << 20).unwrap()
    }

    #[test]
    fn shares_per_kind_self_and_total() {
        let base = folded("[on-cpu];main;work;hot 20\n[on-cpu];main;work 30\n[on-cpu];main;other 50\n[off-cpu:sleep];main;nap 1000\n");
        let target = folded("[on-cpu];main;work;hot 30\n[on-cpu];main;work 30\n[on-cpu];main;other 40\n[off-cpu:sleep];main;nap 5\n");
        let c = compare(&base, &target);
        let top = &c[0];
        assert_eq!((top.kind.as_str(), top.function.as_str()), ("on-cpu", "hot"));
        assert!((top.self_growth() - 0.10).abs() < 1e-9);
        assert!((top.total_growth() - 0.10).abs() < 1e-9);
        // Off-CPU shares are within their own kind: nap is all of sleep in both.
        let nap = c.iter().find(|f| f.function == "nap").unwrap();
        assert_eq!((nap.base_self, nap.target_self), (1.0, 1.0));
        let last = c.last().unwrap();
        assert_eq!(last.function, "other");
    }

    #[test]
    fn folded_without_kinds_pprof_and_gzip_read_alike() {
        let text = "main;work;hot 3\nmain;idle 1\n";
        let plain = folded(text);
        assert_eq!(plain[0], Stack { kind: FOLDED_KIND.into(), frames: vec!["main".into(), "work".into(), "hot".into()], value: 3 });
        let stacks: Vec<(Vec<String>, i64)> = plain.iter().map(|s| (s.frames.clone(), s.value)).collect();
        let pprof = crate::encode_gzip(&crate::from_folded(&stacks, "cpu", "nanoseconds", 1));
        let from_pprof = read_profile(&pprof, 1 << 20).unwrap();
        assert_eq!(from_pprof.iter().map(|s| (&s.frames, s.value)).collect::<Vec<_>>(), plain.iter().map(|s| (&s.frames, s.value)).collect::<Vec<_>>());
        assert_eq!(from_pprof[0].kind, "cpu");
        assert!(read_profile(b"\x00\x01garbage", 1 << 20).is_err());
    }

    #[test]
    fn diff_svg_marks_growth() {
        let base = folded("main;hot 10\nmain;cold 90\n");
        let target = folded("main;hot 50\nmain;cold 50\n");
        let mut svg = Vec::new();
        write_diff_svg(&base, &target, "bench", &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("hot") && svg.contains("cold") && svg.contains("<svg"));
        // inferno's differential colours: red shades for growth, blue for shrinkage.
        assert!(svg.contains("rgb(255,"), "no red frame");
        assert!(svg.contains(",255)"), "no blue frame");
    }
}
