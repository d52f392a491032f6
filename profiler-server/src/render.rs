//! Render stage: folded text, gzip pprof and SVG exports of merged stacks.

use std::collections::HashSet;

use inferno::flamegraph::{self, color::BasicPalette, color::PaletteMap, Palette};

use crate::ingest::unit_of;
use crate::store::Frames;

/// Stacks of several kinds are told apart by a synthetic `[kind]` root frame.
fn prefixed<'a>(
    kind: &'a str,
    frames: &'a Frames,
    tag: bool,
) -> impl Iterator<Item = std::borrow::Cow<'a, str>> {
    tag.then(|| std::borrow::Cow::Owned(format!("[{kind}]")))
        .into_iter()
        .chain(
            frames
                .iter()
                .map(|f| std::borrow::Cow::Borrowed(f.as_str())),
        )
}

fn several_kinds(stacks: &[(String, Frames, i64)]) -> bool {
    stacks.iter().map(|s| &s.0).collect::<HashSet<_>>().len() > 1
}

/// Folded lines sorted by stack; each value is divided by `divisor` (e.g. to
/// turn nanoseconds back into samples).
pub fn folded(stacks: &[(String, Frames, i64)], divisor: i64) -> String {
    let tag = several_kinds(stacks);
    let mut lines: Vec<String> = stacks
        .iter()
        .map(|(kind, frames, v)| {
            let stack: Vec<_> = prefixed(kind, frames, tag).collect();
            format!("{} {}", stack.join(";"), v / divisor.max(1))
        })
        .collect();
    lines.sort_unstable();
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// A gzip pprof profile with one sample type. With a single kind the type is
/// that kind; with several, values share the first kind's unit and each
/// stack is rooted at `[kind]`.
pub fn pprof(stacks: &[(String, Frames, i64)], duration_ms: i64, end_ms: i64) -> Vec<u8> {
    let tag = several_kinds(stacks);
    let kind = stacks.first().map_or("cpu", |s| s.0.as_str());
    let ty = if tag { "mixed" } else { kind };
    let unit = unit_of(kind);
    let mut b = profiler_pprof::ProfileBuilder::new(&[(ty, unit)])
        .period(ty, unit, 1)
        .time(
            (end_ms - duration_ms).saturating_mul(1_000_000),
            duration_ms.saturating_mul(1_000_000),
        );
    let mut frames: Vec<std::borrow::Cow<str>> = Vec::new();
    for (kind, f, v) in stacks {
        frames.clear();
        frames.extend(prefixed(kind, f, tag));
        b.add(&frames, &[*v], &[]);
    }
    profiler_pprof::encode_gzip(&b.build())
}

/// Hot/cold flame graph: on-CPU (and third-party) frames use inferno's warm
/// palette, off-CPU frames a cool hue per wait reason.
///
/// inferno colours by frame name and one function appears in both kinds of
/// stacks, so off-CPU frames get a per-reason run of zero-width spaces plus
/// a `_[w]` tag (which inferno strips from labels), and the palette map
/// assigns those names their cool colour.
pub fn svg(stacks: &[(String, Frames, i64)], title: &str) -> anyhow::Result<Vec<u8>> {
    let tag = several_kinds(stacks) || stacks.iter().any(|s| s.0.starts_with("off-cpu"));
    let mut palette = PaletteMap::default();
    let mut named = HashSet::new();
    let mut lines: Vec<String> = Vec::with_capacity(stacks.len());
    for (kind, frames, v) in stacks {
        if *v <= 0 {
            continue;
        }
        let reason = kind
            .strip_prefix("off-cpu")
            .map(|r| r.trim_start_matches(':'));
        let mut line = String::new();
        for (i, frame) in prefixed(kind, frames, tag).enumerate() {
            if i > 0 {
                line.push(';');
            }
            let frame = frame.replace(';', ":");
            match reason {
                None => line.push_str(&frame),
                Some(reason) => {
                    let name =
                        format!("{frame}{}_[w]", "\u{200b}".repeat(reason_index(reason) + 1));
                    if named.insert(name.clone()) {
                        palette.insert(&name, cool_color(reason, &frame));
                    }
                    line.push_str(&name);
                }
            }
        }
        line.push(' ');
        line.push_str(&v.to_string());
        lines.push(line);
    }
    lines.sort_unstable();
    let mut opts = flamegraph::Options::default();
    opts.title = title.to_owned();
    opts.count_name = stacks
        .first()
        .map_or("samples", |s| unit_of(&s.0))
        .to_owned();
    opts.colors = Palette::Basic(BasicPalette::Hot);
    opts.hash = true;
    opts.deterministic = true;
    opts.palette_map = Some(&mut palette);
    if lines.is_empty() {
        // inferno refuses empty input; an empty range is still a valid answer.
        return Ok(format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"60\"><text x=\"600\" y=\"30\" text-anchor=\"middle\">{}: no samples in range</text></svg>\n",
            title.replace('&', "&amp;").replace('<', "&lt;")
        )
        .into_bytes());
    }
    let mut out = Vec::new();
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out)?;
    Ok(out)
}

const REASONS: [&str; 7] = [
    "runnable",
    "blocked-io",
    "blocked-lock",
    "blocked-net",
    "sleep",
    "idle-poll",
    "other",
];

fn reason_index(reason: &str) -> usize {
    REASONS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(REASONS.len())
}

fn cool_color(reason: &str, frame: &str) -> flamegraph::color::Color {
    let (r, g, b): (u8, u8, u8) = match reason {
        "runnable" => (150, 120, 230),
        "blocked-io" => (60, 110, 230),
        "blocked-lock" => (40, 170, 210),
        "blocked-net" => (50, 190, 150),
        "sleep" => (110, 170, 240),
        "idle-poll" => (170, 190, 200),
        _ => (120, 140, 170),
    };
    // Vary neighbours a little so adjacent frames stay distinguishable.
    let jitter = (frame
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % 40) as u8;
    flamegraph::color::Color {
        r: r.saturating_add(jitter / 2),
        g: g.saturating_add(jitter),
        b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn f(v: &[&str]) -> Frames {
        Arc::from(v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn folded_tags_kinds_only_when_mixed() {
        let one = vec![
            ("on-cpu".to_string(), f(&["b", "c"]), 20),
            ("on-cpu".to_string(), f(&["a"]), 10),
        ];
        assert_eq!(folded(&one, 10), "a 1\nb;c 2\n");
        let two = vec![
            ("on-cpu".to_string(), f(&["a"]), 1),
            ("off-cpu:sleep".to_string(), f(&["a"]), 2),
        ];
        assert_eq!(folded(&two, 1), "[off-cpu:sleep];a 2\n[on-cpu];a 1\n");
    }

    #[test]
    fn svg_colours_off_cpu_cool() {
        let s = vec![
            ("on-cpu".to_string(), f(&["main", "burn"]), 50),
            ("off-cpu:sleep".to_string(), f(&["main", "nap"]), 70),
        ];
        let svg = String::from_utf8(svg(&s, "t").unwrap()).unwrap();
        assert!(svg.contains("[off-cpu:sleep]"));
        assert!(!svg.contains("_[w]"));
        let cool = svg.matches(",240)").count();
        assert!(
            cool >= 3,
            "expected the sleep frames in the sleep hue, got {cool}"
        );
        assert!(svg.contains("burn"));
    }
}
