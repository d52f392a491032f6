//! `profiler-agent record`: profile for a fixed time and write folded stacks and/or an SVG.

use std::{
    fs,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use profiler_pprof::{flamegraph, kind::Kind};
use serde::Serialize;

use crate::{
    aggregate::{AggregateOptions, Profile, Units},
    sample::SamplerOptions,
    session::{OffCpuBudget, Session},
};

#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub duration: Duration,
    /// Drain interval; shorter windows bound kernel map fill.
    pub window: Duration,
    pub sampler: SamplerOptions,
    pub comm: Option<String>,
    pub folded: Option<PathBuf>,
    pub svg: Option<PathBuf>,
    pub stats: Option<PathBuf>,
    pub off_cpu_budget: OffCpuBudget,
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            window: Duration::from_secs(1),
            sampler: SamplerOptions::default(),
            comm: None,
            folded: None,
            svg: None,
            stats: None,
            off_cpu_budget: OffCpuBudget::default(),
        }
    }
}

/// What happened during a recording, for humans (logged) and tests (`--stats` JSON).
#[derive(Debug, Serialize)]
pub struct RecordSummary {
    pub duration_s: f64,
    pub period_ns: u64,
    pub windows: u64,
    pub counters: std::collections::BTreeMap<&'static str, u64>,
    /// Share of switch-outs recorded, averaged over the run (1 = every switch).
    pub off_cpu_effective_sampling: Option<f64>,
    pub on_cpu_total: u64,
    pub off_cpu_total_ns: u64,
    pub max_map_fill: f64,
    /// (hits, misses) of process-snapshot look-ups while symbolizing.
    pub symbol_cache: (u64, u64),
}

pub fn record(options: &RecordOptions, stop: Arc<AtomicBool>) -> anyhow::Result<RecordSummary> {
    let mut session = Session::start(&options.sampler, options.off_cpu_budget)?;
    let units = if options.sampler.off_cpu.is_some() { Units::Nanoseconds } else { Units::Samples };
    let aggregate = AggregateOptions { comm: options.comm.clone(), units, period_ns: session.period_ns() };

    let mut profile = Profile::default();
    let started = Instant::now();
    let deadline = started + options.duration;
    loop {
        let until = (Instant::now() + options.window).min(deadline);
        let window = session.next_window(until, &stop)?;
        profile.add(&window.samples, &aggregate);
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
    }
    // What was recorded while the last window was symbolized (a second or more for the
    // first window of a big binary) would be lost without one more drain.
    let last = session.next_window(Instant::now(), &stop)?;
    profile.add(&last.samples, &aggregate);

    let summary = RecordSummary {
        duration_s: started.elapsed().as_secs_f64(),
        period_ns: session.period_ns(),
        windows: session.windows(),
        counters: session.counters(),
        off_cpu_effective_sampling: session.off_cpu_effective_sampling(),
        on_cpu_total: profile.total(|k| k == Kind::OnCpu),
        off_cpu_total_ns: profile.total(|k| k != Kind::OnCpu),
        max_map_fill: session.max_map_fill(),
        symbol_cache: session.processes().cache_stats(),
    };
    drop(session);
    report(&summary);

    if let Some(path) = &options.folded {
        fs::write(path, profile.folded(units == Units::Nanoseconds))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &options.svg {
        let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut flame = flamegraph::Options::default();
        (flame.title, flame.count_name) = match units {
            Units::Samples => ("On-CPU samples".into(), "samples".into()),
            Units::Nanoseconds => ("On-CPU and off-CPU time".into(), "ns".into()),
        };
        let stacks: Vec<_> = profile.stacks().collect();
        flamegraph::write_svg(&stacks, &flame, std::io::BufWriter::new(file))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &options.stats {
        fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary)
}

fn report(summary: &RecordSummary) {
    let c = |name| summary.counters.get(name).copied().unwrap_or(0);
    tracing::info!(
        samples = c("samples"),
        lost_ring_full = c("sample_ring_full"),
        user_stacks_lost = c("user_stack_lost"),
        kernel_stacks_lost = c("kernel_stack_lost"),
        stacks_unwound = c("stacks_unwound"),
        stacks_truncated = c("stacks_truncated"),
        stacks_partly_unknown = c("stacks_partly_unknown"),
        windows = summary.windows,
        "on-CPU sampling done"
    );
    if let Some(effective) = summary.off_cpu_effective_sampling {
        tracing::info!(
            switches = c("switches"),
            recorded = c("switch_outs_recorded"),
            effective_sampling = effective,
            below_min_block = c("offcpu_below_min"),
            lost_ring_full = c("offcpu_ring_full"),
            lost_map_full = c("switch_out_map_full"),
            lost_switch_in_missed = c("switch_in_missed"),
            waits_without_snapshot = c("wait_without_snapshot"),
            "off-CPU tracing done"
        );
    }
}
