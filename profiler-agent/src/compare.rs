//! The CI gate: two profiles (files or server URLs) compared by each
//! function's share of its kind's time (`profiler_pprof::compare`), a table
//! of what grew most, an optional differential flame graph, and a verdict.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::Context;
use profiler_pprof::compare::{self as shares, FunctionShares, Stack};

/// Bytes a profile may take once decompressed.
const MAX_PROFILE_BYTES: usize = 1 << 30;

#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub base: String,
    pub target: String,
    /// Largest growth of a share allowed (0.02 = 2 points).
    pub max_growth: f64,
    /// Gate on total shares as well as self.
    pub total: bool,
    /// Kinds gated and printed; empty: all.
    pub kinds: Vec<String>,
    pub svg: Option<PathBuf>,
    pub limit: usize,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            base: String::new(),
            target: String::new(),
            max_growth: 0.02,
            total: false,
            kinds: Vec::new(),
            svg: None,
            limit: 15,
        }
    }
}

/// Reads a file, or GETs an http(s) URL.
fn load(source: &str) -> anyhow::Result<Vec<Stack>> {
    let bytes = if source.starts_with("http://") || source.starts_with("https://") {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
            let response = client.get(source).send().await?;
            let status = response.status();
            let body = response.bytes().await?;
            anyhow::ensure!(status.is_success(), "HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(500)]));
            Ok(body.to_vec())
        })
        .with_context(|| format!("fetching {source}"))?
    } else {
        std::fs::read(source).with_context(|| format!("reading {source}"))?
    };
    let stacks = shares::read_profile(&bytes, MAX_PROFILE_BYTES).with_context(|| format!("{source}: neither folded stacks nor pprof"))?;
    anyhow::ensure!(stacks.iter().any(|s| s.value > 0), "{source}: the profile holds no samples");
    Ok(stacks)
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

fn growth(f: &FunctionShares, total: bool) -> f64 {
    if total { f.self_growth().max(f.total_growth()) } else { f.self_growth() }
}

/// Prints the comparison to `out`; Ok(true) when no function grew past the
/// limit.
pub fn run(options: &CompareOptions, out: &mut impl Write) -> anyhow::Result<bool> {
    let keep = |stacks: Vec<Stack>| -> Vec<Stack> {
        stacks.into_iter().filter(|s| options.kinds.is_empty() || options.kinds.contains(&s.kind)).collect()
    };
    let base = keep(load(&options.base)?);
    let target = keep(load(&options.target)?);
    anyhow::ensure!(!base.is_empty() && !target.is_empty(), "no samples of the kinds {:?} in both profiles", options.kinds);
    let mut functions = shares::compare(&base, &target);
    functions.sort_by(|a, b| growth(b, options.total).total_cmp(&growth(a, options.total)));
    let over: Vec<&FunctionShares> = functions.iter().filter(|f| growth(f, options.total) > options.max_growth).collect();
    writeln!(out, "{:<18} {:>9} {:>9} {:>9} {:>9} {:>9}  function", "kind", "self was", "self now", "change", "total was", "total now")?;
    for f in functions.iter().take(options.limit) {
        let flag = if growth(f, options.total) > options.max_growth { "  <-- over the limit" } else { "" };
        writeln!(
            out,
            "{:<18} {:>9} {:>9} {:>+8.2}p {:>9} {:>9}  {}{flag}",
            f.kind,
            pct(f.base_self),
            pct(f.target_self),
            f.self_growth() * 100.0,
            pct(f.base_total),
            pct(f.target_total),
            f.function
        )?;
    }
    if let Some(path) = &options.svg {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let title = format!("{} -> {}", options.base, options.target);
        shares::write_diff_svg(&base, &target, &title, std::io::BufWriter::new(file)).with_context(|| format!("writing {}", path.display()))?;
        writeln!(out, "differential flame graph: {}", path.display())?;
    }
    let limit = options.max_growth * 100.0;
    if over.is_empty() {
        writeln!(out, "ok: no function's share grew by more than {limit:.2} points")?;
    } else {
        writeln!(out, "FAIL: {} function(s) grew by more than {limit:.2} points of their kind's time", over.len())?;
    }
    Ok(over.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_on_growth_past_the_limit_and_passes_within() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_owned()
        };
        let base = write("base.folded", "app;main;parse 200\napp;main;render 800\n");
        let same = write("same.folded", "app;main;parse 410\napp;main;render 1590\n");
        let worse = write("worse.folded", "app;main;parse 300\napp;main;render 700\n");
        let svg = dir.path().join("diff.svg");
        let opts = |target: &str| CompareOptions { base: base.clone(), target: target.to_owned(), svg: Some(svg.clone()), ..CompareOptions::default() };
        let mut out = Vec::new();
        assert!(run(&opts(&same), &mut out).unwrap(), "{}", String::from_utf8_lossy(&out));
        let mut out = Vec::new();
        assert!(!run(&opts(&worse), &mut out).unwrap());
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().nth(1).unwrap().contains("parse") && text.contains("+10.00p") && text.contains("FAIL"), "{text}");
        assert!(std::fs::read_to_string(&svg).unwrap().contains("parse"));
        let missing = CompareOptions { base: dir.path().join("nope").to_str().unwrap().into(), ..opts(&same) };
        assert!(run(&missing, &mut Vec::new()).is_err());
    }
}
