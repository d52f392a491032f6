//! What off-CPU tracing at default settings costs `perf bench sched pipe` pinned to one
//! CPU, the worst case for a `sched_switch` tracer (about 700,000 switches a second).
//!
//! This VM switches between a fast and a slow state for seconds at a time (round trips of
//! 2.5 or 3.6 µs): runs minutes apart, or an agent started afresh for each measurement,
//! straddle both, and a few percent cannot be told apart. So one agent session stays up
//! and turns off-CPU tracing on and off (as a deep-profile run does), and each run with it
//! on is paired with a run just before or after with it off, in ABBA order against drift.
//! On-CPU sampling at 99 Hz stays on throughout, so the ratio is off-CPU tracing's own.
//! Each measured run follows 300 ms of the same load under the same setting, so it sees
//! rate control settled, as on a host where the load runs on: the burst at attach is the
//! burst quota's to contain (see the README).
//!
//! `cargo bench -p profiler-agent --bench off_cpu_toggle` (root; `PAIRS`, `LOOPS` in the
//! environment override 300 pairs of 50,000 round trips; `SWITCHES_PER_S=1` leaves
//! almost nothing to record, which measures the program's unsampled path alone).

use std::{
    process::Command,
    sync::atomic::AtomicBool,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use profiler_agent::{
    sample::{OffCpuOptions, SamplerOptions},
    session::{OffCpuBudget, Session, Settings},
};

/// Round trips that keep the load up for about 300 ms before a measured run.
const SETTLE_LOOPS: u64 = 120_000;

fn main() -> anyhow::Result<()> {
    // The session starts its BPF statistics helper by running its own executable, this one.
    if let Some(helper) = profiler_agent::cost::serve_helper_if_started_as_one() {
        return helper;
    }
    let pairs: usize = std::env::var("PAIRS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let loops: u64 = std::env::var("LOOPS").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    if unsafe { libc::geteuid() } != 0 {
        bail!("this bench loads BPF programs: run it as root");
    }
    let options = SamplerOptions::default();
    let mut budget = OffCpuBudget::default();
    if let Some(rate) = std::env::var("SWITCHES_PER_S").ok().and_then(|v| v.parse().ok()) {
        budget.switches_per_s = rate;
    }
    let mut session = Session::start(&options, budget)
        .context("loading the agent's BPF programs (root, BTF and perf_event support are needed)")?;
    let settings = |off_cpu: Option<OffCpuOptions>| Settings {
        frequency_hz: options.frequency_hz,
        off_cpu,
        off_cpu_budget: budget,
    };
    let (traced, untraced) = (settings(Some(OffCpuOptions::default())), settings(None));

    let mut ratios = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        // ABBA: the traced run goes second in even pairs, first in odd ones.
        let order = if pair % 2 == 0 { [false, true] } else { [true, false] };
        // µs per round trip untraced, then traced.
        let mut figures = [0.0; 2];
        for on in order {
            session.apply(if on { &traced } else { &untraced })?;
            // The first run lets rate control settle on the load (its ticks are 100 ms
            // apart); the second is measured.
            run(&mut session, SETTLE_LOOPS)?;
            figures[on as usize] = run(&mut session, loops)?;
        }
        let [off, on] = figures;
        ratios.push(on / off);
        eprintln!("pair {}/{pairs}: off {off:.3} µs, on {on:.3} µs, {:+.1}%", pair + 1, (on / off - 1.0) * 100.0);
    }
    session.apply(&untraced)?;
    let recorded = session.counters().get("switch_outs_recorded").copied().unwrap_or(0);

    ratios.sort_by(f64::total_cmp);
    let percent = |ratio: f64| (ratio - 1.0) * 100.0;
    let (low, high) = median_interval(&ratios);
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    println!(
        "off-CPU tracing at the default settings, budget {} switch-outs/s and {:?} of kernel CPU/s, `taskset -c 0 perf bench sched pipe -l {loops}`, \
         {pairs} pairs toggled in one session: median slowdown {:+.2}% (95% interval {:+.2}%..{:+.2}%), mean {:+.2}%, \
         {recorded} switch-outs recorded",
        budget.switches_per_s,
        budget.kernel_cpu_per_s,
        percent(ratios[ratios.len() / 2]),
        percent(low),
        percent(high),
        percent(mean),
    );
    Ok(())
}

/// µs per round trip of one pinned `perf bench sched pipe`, as it reports it, while the
/// session drains its windows and runs rate control as the agent does.
fn run(session: &mut Session, loops: u64) -> anyhow::Result<f64> {
    let mut child = Command::new("taskset")
        .args(["-c", "0", "perf", "bench", "sched", "pipe", "-l", &loops.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting perf bench")?;
    let stop = AtomicBool::new(false);
    while child.try_wait()?.is_none() {
        session.next_window(Instant::now() + Duration::from_millis(200), &stop)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("perf bench sched pipe failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| line.trim().strip_suffix("usecs/op")?.trim().parse().ok())
        .with_context(|| format!("no usecs/op in perf bench's output: {text}"))
}

/// A distribution-free interval of at least 95% for the median of `sorted` (at least 6
/// values): the k-th smallest and largest, for the largest k with P(Binomial(n, 1/2) < k)
/// at most 2.5%.
fn median_interval(sorted: &[f64]) -> (f64, f64) {
    let n = sorted.len();
    let (mut below, mut term, mut k) = (0.0, 0.5f64.powi(n as i32), 0);
    for i in 0..n {
        if below + term > 0.025 {
            break;
        }
        below += term;
        term *= (n - i) as f64 / (i + 1) as f64;
        k = i + 1;
    }
    let k = k.max(1);
    (sorted[k - 1], sorted[n - k])
}
