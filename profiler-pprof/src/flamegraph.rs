//! Hot/cold SVG flame graphs via inferno: on-CPU (and third-party) frames in
//! inferno's warm palette, off-CPU frames cool, one hue family per wait
//! reason.
//!
//! inferno colours by frame name, and one function appears in both kinds of
//! stacks. Off-CPU frames are therefore renamed: a per-reason run of
//! zero-width spaces keeps the names of different reasons apart, and a `_[w]`
//! tag (which inferno strips from labels) marks them; the palette map then
//! gives every such name its cool colour.

use std::{collections::HashSet, io::Write};

use inferno::flamegraph::{
    self as inferno_flamegraph,
    color::{BasicPalette, Color, PaletteMap},
    Palette,
};

use crate::{
    folded::escaped_frames,
    kind::{off_cpu_reason, several_kinds, WaitReason},
};

/// Default values of [`Options`].
pub mod defaults {
    pub const TITLE: &str = "Flame Graph";
    pub const COUNT_NAME: &str = "samples";
}

/// How [`write_svg`] labels a flame graph.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// Heading of the graph, and of the placeholder drawn when there is
    /// nothing to draw. Default: [`defaults::TITLE`].
    pub title: String,
    /// Unit of the values in frame tooltips (`samples`, `ns`, ...).
    /// Default: [`defaults::COUNT_NAME`].
    pub count_name: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            title: defaults::TITLE.to_owned(),
            count_name: defaults::COUNT_NAME.to_owned(),
        }
    }
}

/// Writes the hot/cold flame graph of `stacks`, `(kind, frames root-first,
/// value)` triples; stacks valued zero or less are left out.
///
/// Stacks carry their kind's root frame when there are several kinds or any
/// off-CPU kind, so off-CPU time always shows under its reason. With no
/// stack left to draw, a one-line placeholder says so: inferno would refuse
/// the input, and an empty range is a valid answer.
pub fn write_svg<K, S, F>(
    stacks: &[(K, S, i64)],
    options: &Options,
    mut out: impl Write,
) -> std::io::Result<()>
where
    K: AsRef<str>,
    S: AsRef<[F]>,
    F: AsRef<str>,
{
    let kinds = || stacks.iter().map(|(kind, _, _)| kind.as_ref());
    let kind_roots = several_kinds(kinds()) || kinds().any(|kind| off_cpu_reason(kind).is_some());
    let mut palette = PaletteMap::default();
    let mut named = HashSet::new();
    let mut lines: Vec<String> = Vec::with_capacity(stacks.len());
    for (kind, frames, value) in stacks {
        if *value <= 0 {
            continue;
        }
        let kind = kind.as_ref();
        let reason = off_cpu_reason(kind);
        let mut line = String::new();
        for (i, frame) in escaped_frames(kind_roots.then_some(kind), frames.as_ref()).enumerate() {
            if i > 0 {
                line.push(';');
            }
            match reason {
                None => line.push_str(&frame),
                Some(reason) => {
                    let name = off_cpu_name(&frame, reason);
                    if named.insert(name.clone()) {
                        palette.insert(&name, cool_color(reason, &frame));
                    }
                    line.push_str(&name);
                }
            }
        }
        line.push(' ');
        line.push_str(&value.to_string());
        lines.push(line);
    }
    if lines.is_empty() {
        return writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"60\"><text x=\"600\" y=\"30\" text-anchor=\"middle\">{}: no samples in range</text></svg>",
            options.title.replace('&', "&amp;").replace('<', "&lt;")
        );
    }
    lines.sort_unstable();

    let mut flame = inferno_flamegraph::Options::default();
    flame.title = options.title.clone();
    flame.count_name = options.count_name.clone();
    flame.colors = Palette::Basic(BasicPalette::Hot);
    flame.hash = true;
    flame.deterministic = true;
    flame.palette_map = Some(&mut palette);
    inferno_flamegraph::from_lines(&mut flame, lines.iter().map(String::as_str), out)
}

/// Position of a reason in [`WaitReason::ALL`]; reasons the agent does not
/// produce share the position after the last.
fn reason_index(reason: &str) -> usize {
    WaitReason::ALL
        .iter()
        .position(|known| known.name() == reason)
        .unwrap_or(WaitReason::ALL.len())
}

fn off_cpu_name(frame: &str, reason: &str) -> String {
    format!("{frame}{}_[w]", "\u{200b}".repeat(reason_index(reason) + 1))
}

/// A blue-green family per reason (unknown reasons as `other`), varied per
/// frame so neighbours stay distinguishable.
fn cool_color(reason: &str, frame: &str) -> Color {
    let (r, g, b): (u8, u8, u8) = match WaitReason::from_name(reason) {
        Some(WaitReason::Runnable) => (150, 120, 230),
        Some(WaitReason::BlockedIo) => (60, 110, 230),
        Some(WaitReason::BlockedLock) => (40, 170, 210),
        Some(WaitReason::BlockedNet) => (50, 190, 150),
        Some(WaitReason::Sleep) => (110, 170, 240),
        Some(WaitReason::IdlePoll) => (170, 190, 200),
        Some(WaitReason::Other) | None => (120, 140, 170),
    };
    let jitter = (frame
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % 40) as u8;
    Color {
        r: r.saturating_add(jitter / 2),
        g: g.saturating_add(jitter),
        b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason, a frame with `;`, non-ASCII names and a zero value.
    fn hot_and_cold() -> Vec<(&'static str, Vec<&'static str>, i64)> {
        vec![
            ("on-cpu", vec!["app", "main", "burn;cpu"], 50),
            ("on-cpu", vec!["app", "<[u8; 8] as Debug>::fmt"], 30),
            ("on-cpu", vec!["app", "héllo", "wörld"], 25),
            ("on-cpu", vec!["app", "zero"], 0),
            (
                "off-cpu:sleep",
                vec!["app", "main", "nap", "do_nanosleep_[k]"],
                700,
            ),
            ("off-cpu:runnable", vec!["app", "main"], 5),
            (
                "off-cpu:blocked-io",
                vec!["app", "main", "read", "io_schedule_[k]"],
                300,
            ),
            (
                "off-cpu:blocked-lock",
                vec!["app", "main", "futex_wait_[k]"],
                200,
            ),
            (
                "off-cpu:blocked-net",
                vec!["app", "srv", "tcp_recvmsg_[k]"],
                150,
            ),
            ("off-cpu:idle-poll", vec!["app", "loop", "ep_poll_[k]"], 400),
            ("off-cpu:other", vec!["app", "main", "pipe_read_[k]"], 90),
        ]
    }

    fn render<K: AsRef<str>, S: AsRef<[F]>, F: AsRef<str>>(
        stacks: &[(K, S, i64)],
        title: &str,
        count_name: &str,
    ) -> String {
        let options = Options {
            title: title.to_owned(),
            count_name: count_name.to_owned(),
        };
        let mut svg = Vec::new();
        write_svg(stacks, &options, &mut svg).unwrap();
        String::from_utf8(svg).unwrap()
    }

    /// The fill of every frame whose title starts with `label`.
    fn fills<'a>(svg: &'a str, label: &str) -> Vec<&'a str> {
        svg.split("<g>")
            .filter(|g| g.contains(&format!("<title>{label}")))
            .filter_map(|g| g.split("fill=\"rgb(").nth(1)?.split(')').next())
            .collect()
    }

    /// Pins the whole SVG: the agent's `record --svg` and the server's
    /// `/api/v1/svg` drew exactly this before the renderers became this one.
    /// After an inferno upgrade, check the new drawing by eye and rewrite the
    /// fixture with `BLESS=1 cargo test -p profiler-pprof`.
    #[test]
    fn hot_cold_svg_matches_fixture() {
        let svg = render(&hot_and_cold(), "On-CPU and off-CPU time", "ns");
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/hot_cold.svg");
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(fixture, &svg).unwrap();
        }
        assert!(
            svg == std::fs::read_to_string(fixture).unwrap(),
            "SVG differs from {fixture}"
        );
    }

    #[test]
    fn off_cpu_frames_are_cool_per_reason_with_clean_labels() {
        let svg = render(&hot_and_cold(), "t", "ns");
        assert!(!svg.contains("_[w]"), "tags must be stripped from labels");
        assert!(svg.contains("[off-cpu:sleep]") && svg.contains("[on-cpu]"));
        // Blue is the reason's and never varied; red and green are.
        for (label, blue) in [
            ("[off-cpu:sleep]", 240),
            ("nap", 240),
            ("do_nanosleep_[k]", 240),
            ("[off-cpu:blocked-io]", 230),
            ("io_schedule_[k]", 230),
            ("tcp_recvmsg_[k]", 150),
            ("ep_poll_[k]", 200),
            ("pipe_read_[k]", 170),
        ] {
            let found = fills(&svg, label);
            assert!(!found.is_empty(), "no frame {label}");
            assert!(
                found.iter().all(|f| f.ends_with(&format!(",{blue}"))),
                "{label}: {found:?}"
            );
        }
        // The same function on-CPU keeps inferno's warm palette (red 205..255).
        let burn = fills(&svg, "burn:cpu");
        let red: u8 = burn[0].split(',').next().unwrap().parse().unwrap();
        assert!(red >= 205, "{burn:?}");
        // `main` is drawn once per kind, each in its own colour.
        assert!(fills(&svg, "main").len() >= 6);
    }

    #[test]
    fn kind_roots_only_when_several_kinds_or_off_cpu() {
        let on = [("on-cpu", ["main", "burn"], 5)];
        assert!(!render(&on, "t", "samples").contains("[on-cpu]"));
        let sleep = [("off-cpu:sleep", ["main", "nap"], 5)];
        assert!(render(&sleep, "t", "ns").contains("[off-cpu:sleep]"));
        let mixed = [("cpu", ["main"], 5), ("alloc_space", ["main"], 7)];
        let svg = render(&mixed, "t", "count");
        assert!(svg.contains("[cpu]") && svg.contains("[alloc_space]"));
    }

    #[test]
    fn unknown_off_cpu_reasons_are_drawn_as_other() {
        let svg = render(
            &[("off-cpu:weird", ["main"], 5), ("off-cpu", ["bare"], 5)],
            "t",
            "ns",
        );
        assert!(fills(&svg, "main")
            .iter()
            .chain(&fills(&svg, "bare"))
            .all(|f| f.ends_with(",170")));
    }

    #[test]
    fn nothing_to_draw_is_a_placeholder() {
        let stacks = [("on-cpu", ["main"], 0), ("on-cpu", ["neg"], -1)];
        assert_eq!(
            render(&stacks, "a & <b>", "samples"),
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"60\"><text x=\"600\" y=\"30\" text-anchor=\"middle\">a &amp; &lt;b>: no samples in range</text></svg>\n"
        );
    }
}
