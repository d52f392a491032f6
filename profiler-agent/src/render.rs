//! Render stage: an SVG flame graph via inferno. On-CPU frames use inferno's warm
//! palette; off-CPU frames are cool, one hue family per wait reason.
//!
//! inferno colours by frame name, and the same function appears in both kinds of stacks.
//! Off-CPU frames are therefore renamed: a per-reason run of zero-width spaces keeps the
//! names of different reasons apart, and a `_[w]` tag (which inferno strips from labels)
//! marks them; the palette map then gives every such name its cool colour.

use std::{collections::HashSet, io::Write};

use inferno::flamegraph::{self, Palette, color::{BasicPalette, PaletteMap}};

use crate::{aggregate::{Kind, Profile, Units}, classify::WaitReason};

pub struct RenderOptions {
    pub title: String,
    pub units: Units,
}

pub fn write_svg(profile: &Profile, options: &RenderOptions, out: impl Write) -> anyhow::Result<()> {
    let tag_kinds = profile.values.keys().any(|(kind, _)| *kind != Kind::OnCpu);
    let mut palette = PaletteMap::default();
    let mut named: HashSet<String> = HashSet::new();
    let mut lines = Vec::with_capacity(profile.values.len());
    for ((kind, stack), value) in &profile.values {
        if *value == 0 {
            continue;
        }
        let mut line = String::new();
        let frames = tag_kinds.then(|| kind.root_frame().into()).into_iter().chain(stack.iter().cloned());
        for (i, frame) in frames.enumerate() {
            if i > 0 {
                line.push(';');
            }
            let frame: String = frame.chars().map(|c| if c == ';' { ':' } else { c }).collect();
            match kind {
                Kind::OnCpu => line.push_str(&frame),
                Kind::OffCpu(reason) => {
                    let name = off_cpu_name(&frame, *reason);
                    if named.insert(name.clone()) {
                        palette.insert(&name, cool_color(*reason, &frame));
                    }
                    line.push_str(&name);
                }
            }
        }
        line.push(' ');
        line.push_str(&value.to_string());
        lines.push(line);
    }
    lines.sort_unstable();

    let mut flame = flamegraph::Options::default();
    flame.title = options.title.clone();
    flame.count_name = match options.units {
        Units::Samples => "samples".into(),
        Units::Nanoseconds => "ns".into(),
    };
    flame.colors = Palette::Basic(BasicPalette::Hot);
    flame.hash = true;
    flame.deterministic = true;
    flame.palette_map = Some(&mut palette);
    flamegraph::from_lines(&mut flame, lines.iter().map(String::as_str), out)?;
    Ok(())
}

fn off_cpu_name(frame: &str, reason: WaitReason) -> String {
    let index = WaitReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
    format!("{frame}{}_[w]", "\u{200b}".repeat(index + 1))
}

/// A blue-green family per reason, varied per frame so neighbours stay distinguishable.
fn cool_color(reason: WaitReason, frame: &str) -> flamegraph::color::Color {
    let (r, g, b): (u8, u8, u8) = match reason {
        WaitReason::Runnable => (150, 120, 230),
        WaitReason::BlockedIo => (60, 110, 230),
        WaitReason::BlockedLock => (40, 170, 210),
        WaitReason::BlockedNet => (50, 190, 150),
        WaitReason::Sleep => (110, 170, 240),
        WaitReason::IdlePoll => (170, 190, 200),
        WaitReason::Other => (120, 140, 170),
    };
    let jitter = (frame.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) % 40) as u8;
    flamegraph::color::Color { r: r.saturating_add(jitter / 2), g: g.saturating_add(jitter), b }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn off_cpu_frames_get_cool_colours_and_clean_labels() {
        let mut profile = Profile::default();
        let stack = |frames: &[&str]| frames.iter().map(|f| Arc::from(*f)).collect::<Vec<_>>();
        profile.values.insert((Kind::OnCpu, stack(&["app", "main", "burn_cpu"])), 50);
        profile.values.insert((Kind::OffCpu(WaitReason::Sleep), stack(&["app", "main", "wait_sleep"])), 70);
        let mut svg = Vec::new();
        write_svg(&profile, &RenderOptions { title: "t".into(), units: Units::Nanoseconds }, &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("[off-cpu:sleep]"));
        assert!(svg.contains(">burn_cpu<") || svg.contains("burn_cpu ("));
        // Every frame of the sleep stack is filled from the sleep family (blue 240), and
        // the on-CPU frames from inferno's warm palette (red channel 205..255).
        let fills: Vec<&str> = svg.match_indices("fill=\"rgb(").map(|(i, _)| &svg[i + 10..]).collect();
        let blue_240 = fills.iter().filter(|f| f.split(')').next().unwrap().ends_with(",240")).count();
        assert!(blue_240 >= 4, "expected cool fills for 4 sleep frames, got {blue_240}");
        assert!(!svg.contains("_[w]"), "tags must be stripped from labels");
    }
}
