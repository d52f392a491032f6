//! Render stage: folded text, gzip pprof and SVG exports of merged stacks,
//! through `profiler_pprof`'s writers, which the agent uses too.

use profiler_pprof::{
    flamegraph,
    kind::{root_frame, several_kinds},
};

use crate::ingest::unit_of;
use crate::store::Frames;

/// Stacks of several kinds are told apart by a synthetic `[kind]` root frame.
fn several_kinds_in(stacks: &[(String, Frames, i64)]) -> bool {
    several_kinds(stacks.iter().map(|s| s.0.as_str()))
}

/// Folded lines sorted by stack; each value is divided by `divisor` (e.g. to
/// turn nanoseconds back into samples).
pub fn folded(stacks: &[(String, Frames, i64)], divisor: i64) -> String {
    let divisor = divisor.max(1);
    profiler_pprof::folded::write(
        stacks.iter().map(|(kind, frames, v)| (kind, frames, v / divisor)),
        several_kinds_in(stacks),
    )
}

/// A gzip pprof profile with one sample type. With a single kind the type is
/// that kind; with several, values share the first kind's unit and each
/// stack is rooted at `[kind]`.
pub fn pprof(stacks: &[(String, Frames, i64)], duration_ms: i64, end_ms: i64) -> Vec<u8> {
    let tag = several_kinds_in(stacks);
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
        frames.extend(tag.then(|| root_frame(kind).into()));
        frames.extend(f.iter().map(|f| std::borrow::Cow::Borrowed(&**f)));
        b.add(&frames, &[*v], &[]);
    }
    profiler_pprof::encode_gzip(&b.build())
}

/// The hot/cold flame graph (see `profiler_pprof::flamegraph`), its values
/// in the first kind's unit.
pub fn svg(stacks: &[(String, Frames, i64)], title: &str) -> anyhow::Result<Vec<u8>> {
    let mut options = flamegraph::Options::default();
    options.title = title.to_owned();
    if let Some((kind, _, _)) = stacks.first() {
        options.count_name = unit_of(kind).to_owned();
    }
    let mut out = Vec::new();
    flamegraph::write_svg(stacks, &options, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn f(v: &[&str]) -> Frames {
        v.iter().map(|&s| Arc::from(s)).collect()
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
    fn folded_frames_with_semicolons_stay_one_frame() {
        let rust = vec![("cpu".to_string(), f(&["main", "<[u8; 8] as Debug>::fmt"]), 3)];
        assert_eq!(folded(&rust, 1), "main;<[u8: 8] as Debug>::fmt 3\n");
    }
}
