//! `profiler-agent run`: continuous profiling in fixed windows, shipped to the server.
//!
//! Threads and tasks: the sampling thread owns the BPF session and turns each window into
//! payloads; a tokio task ships them (retries, then the spool) and replays the spool when
//! the server is back; another serves /metrics. SIGTERM ends the current window early,
//! and its payloads are shipped or spooled before exit.
//!
//! Once the BPF programs are attached, and before any other thread starts, the daemon
//! drops the capabilities it no longer needs (see [`crate::privileges`]).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use profiler_pprof::kind::Kind;
use tokio::sync::mpsc;

use crate::{
    classify::classify,
    config::{AgentConfig, LimitsConfig},
    identity::{Identity, Rule, identify, unknown_process},
    metrics::Metrics,
    privileges,
    process::ProcessInfo,
    runs::{Applied, Poller, Report, RunControl, RunOnHost as _},
    sample::RawValue,
    session::{Session, Settings, Window},
    ship::{Payload, ShipError, Shipper, Stacks, WindowMeta, build_payload, jitter, now_ms},
    spool::{Spool, Spooled},
    symbolize::comm_name,
};
use profiler_common::Stat;

/// Windows queued between sampling and shipping before they go straight to the spool.
const QUEUE_WINDOWS: usize = 4;
/// How often the spool is retried while the server is away (jittered to 50-100%).
const REPLAY_INTERVAL: Duration = Duration::from_secs(5);

pub fn run(config: AgentConfig) -> anyhow::Result<()> {
    config.validate()?;
    let rules = config.rules()?;
    let host_labels = host_labels(&config.labels);
    let (open_files, open_files_hard) = privileges::raise_open_files_limit()?;
    tracing::info!(soft = open_files, hard = open_files_hard, "open files limit");
    let spool = Arc::new(Mutex::new(Spool::open(&config.spool.dir, config.spool.max_bytes)?));
    let metrics = Arc::new(Metrics::default());
    let shipper = Shipper::new(
        &config.server.url,
        config.server.token.clone(),
        config.server.timeout,
        config.server.max_attempts,
        metrics.clone(),
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stop = Arc::new(AtomicBool::new(false));

    runtime.block_on(async {
        if let Some(addr) = config.metrics_addr()? {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics listening");
            let metrics = metrics.clone();
            let app = axum::Router::new().route("/metrics", axum::routing::get(move || {
                let metrics = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], metrics.render()) }
            }));
            tokio::spawn(async move {
                if let Err(err) = axum::serve(listener, app).await {
                    tracing::error!("metrics server failed: {err}");
                }
            });
        }
        spawn_signal_handler(stop.clone())?;

        let loaded = Session::load(&config.sampler_options(), config.off_cpu.budget())?;
        privileges::drop_privileges(config.privileges.user()?, &[&config.spool.dir])?;
        let session = loaded.start()?;
        tracing::info!(server = %config.server.url, window = ?config.sampling.window, "agent running");
        let control = RunControl::default();
        let (report_sender, report_receiver) = mpsc::unbounded_channel();
        if !config.server.poll_interval.is_zero() {
            let poller = Poller {
                client: reqwest::Client::builder().timeout(config.server.timeout).build()?,
                base_url: config.server.url.trim_end_matches('/').to_string(),
                token: config.server.token.clone(),
                host: host_labels.get("host").cloned().unwrap_or_default(),
                labels: host_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                interval: config.server.poll_interval,
            };
            tokio::spawn(poller.run(control.clone(), report_receiver));
        }
        let (sender, receiver) = mpsc::channel(QUEUE_WINDOWS);
        let sampling = {
            let (stop, spool, metrics) = (stop.clone(), spool.clone(), metrics.clone());
            let runs = RunSwitch { control, reports: report_sender, baseline: config.baseline_settings(), limits: config.limits };
            let window = config.sampling.window;
            std::thread::Builder::new().name("sampling".into()).spawn(move || {
                sampling_loop(session, window, &rules, &host_labels, runs, sender, &stop, &spool, &metrics)
            })?
        };
        ship_loop(receiver, &shipper, &spool, &metrics, config.spool.dead_letter_after).await;
        sampling.join().map_err(|_| anyhow::anyhow!("sampling thread panicked"))?
    })
}

fn spawn_signal_handler(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stopping: finishing the current window");
        stop.store(true, Relaxed);
    });
    Ok(())
}

/// The agent's aggregate is drained and symbolized this often within a window:
/// `max_stack_keys` then bounds one second of distinct stacks, and processes are
/// symbolized while their snapshots are fresh.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// What the sampling thread needs to follow deep-profile runs.
struct RunSwitch {
    control: RunControl,
    reports: mpsc::UnboundedSender<Report>,
    baseline: Settings,
    limits: LimitsConfig,
}

impl RunSwitch {
    /// Switches settings when a run starts or ends (right after a drain).
    fn follow(&self, applied: &mut Applied, session: &mut Session) {
        let mut reports = Vec::new();
        if let Some(next) = applied.step(self.control.wanted(), now_ms() as i64, &self.limits, &mut reports) {
            match next {
                None => {
                    if let Err(err) = session.apply(&self.baseline) {
                        tracing::error!("returning to baseline settings: {err:#}");
                    }
                }
                Some(run) => {
                    tracing::info!(run = %run.id, "deep-profile run starting");
                    match session.apply(&run.host_settings(&self.baseline, &self.limits)) {
                        Ok(()) => applied.started(run, &mut reports),
                        Err(err) => {
                            tracing::error!(run = %run.id, "deep-profile run failed: {err:#}");
                            applied.failed(run, &err, &mut reports);
                            if let Err(err) = session.apply(&self.baseline) {
                                tracing::error!("returning to baseline settings: {err:#}");
                            }
                        }
                    }
                }
            }
        }
        for report in reports {
            let _ = self.reports.send(report);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sampling_loop(
    mut session: Session,
    window: Duration,
    rules: &[Rule],
    host_labels: &BTreeMap<String, String>,
    runs: RunSwitch,
    sender: mpsc::Sender<Payload>,
    stop: &AtomicBool,
    spool: &Mutex<Spool>,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let window_ms = window.as_millis() as u64;
    let mut start_ms = now_ms();
    let mut applied = Applied::default();
    // Batch ids are `<this run>-<window start>`: a random run id keeps them unique
    // across restarts and hosts, whose windows start at the same instants.
    let run_id = format!("{:016x}", fastrand::u64(..));
    loop {
        // Windows end on wall-clock multiples of their length, like the server's buckets.
        let end_ms = (start_ms / window_ms + 1) * window_ms;
        let mut groups = WindowGroups::default();
        loop {
            let remaining = Duration::from_millis(end_ms.saturating_sub(now_ms()));
            let drained = session.next_window(Instant::now() + remaining.min(DRAIN_INTERVAL), stop)?;
            record_drain_metrics(&session, &drained, metrics);
            groups.add(&session, &drained, rules);
            runs.follow(&mut applied, &mut session);
            if now_ms() >= end_ms || stop.load(Relaxed) {
                break;
            }
        }
        let end_ms = now_ms().min(end_ms).max(start_ms + 1);
        let meta = WindowMeta { start_ms };
        let payload = groups.payload(host_labels, &meta, &run_id);
        *runs.control.services.lock().unwrap() = groups.services();
        metrics.windows.fetch_add(1, Relaxed);
        metrics.requests_dropped.fetch_add(groups.requests_dropped, Relaxed);
        if let Some(payload) = payload {
            metrics.profiles_produced.fetch_add(1, Relaxed);
            metrics.value_produced_ns.fetch_add(payload.value, Relaxed);
            if let Err(err) = sender.try_send(payload) {
                let payload = match err {
                    mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
                };
                // The shipper is stuck retrying: keep memory bounded, let the spool hold it.
                tracing::warn!("ship queue full; spooling window directly");
                spool_payload(&mut spool.lock().unwrap(), &payload, None, metrics);
            }
        }
        start_ms = end_ms;
        if stop.load(Relaxed) {
            return Ok(());
        }
    }
}

fn record_drain_metrics(session: &Session, window: &Window, metrics: &Metrics) {
    let stats = &window.stats;
    metrics.samples.fetch_add(stats.get(Stat::Samples), Relaxed);
    metrics.samples_lost.fetch_add(stats.get(Stat::SampleRingFull), Relaxed);
    metrics.stacks_lost.fetch_add(stats.get(Stat::UserStackLost) + stats.get(Stat::KernelStackLost), Relaxed);
    metrics.switches.fetch_add(window.switches, Relaxed);
    metrics.switches_recorded.fetch_add(stats.get(Stat::SwitchOutsRecorded), Relaxed);
    metrics.switches_recorded_by_quota.fetch_add(stats.get(Stat::SwitchOutsByQuota), Relaxed);
    metrics.kernel_stacks_reused.fetch_add(stats.get(Stat::KernelStacksReused), Relaxed);
    metrics.kernel_stacks_changed.fetch_add(stats.get(Stat::KernelStacksChanged), Relaxed);
    metrics.switches_stamped.fetch_add(stats.get(Stat::SwitchOutsStamped), Relaxed);
    metrics.stamped_long_waits.fetch_add(stats.get(Stat::StampedLongWaits), Relaxed);
    metrics.off_cpu_switch_in.store(session.off_cpu_switch_in() as u64, Relaxed);
    let off_cpu_lost = stats.get(Stat::OffCpuRingFull) + stats.get(Stat::SwitchOutMapFull) + stats.get(Stat::SwitchInMissed);
    metrics.off_cpu_lost.fetch_add(off_cpu_lost, Relaxed);
    let losses = session.agent_losses();
    metrics.off_cpu_waits_expired.store(losses.pending_expired, Relaxed);
    metrics.stamped_without_stack.store(losses.stamped_without_stack, Relaxed);
    metrics.python_stacks.fetch_add(stats.get(Stat::PythonStacks), Relaxed);
    metrics.python_processes.store(losses.python.processes, Relaxed);
    metrics.python_unknown_version.store(losses.python.unknown_version, Relaxed);
    metrics.python_frames_unnamed.store(losses.python.code_unreadable, Relaxed);
    metrics.labelled_snapshots.fetch_add(stats.get(Stat::Labelled), Relaxed);
    metrics.label_processes.store(losses.labels.processes, Relaxed);
    metrics.labels_high_cardinality_dropped.store(losses.labels.high_cardinality_dropped, Relaxed);
    metrics.request_snapshots.store(losses.labels.requests, Relaxed);
    metrics.map_fill_permille.store((window.map_fill * 1000.0) as u64, Relaxed);
    metrics.stacks_unwound.fetch_add(window.unwind.complete, Relaxed);
    metrics.stacks_truncated.fetch_add(window.unwind.truncated, Relaxed);
    metrics.stacks_partly_unknown.fetch_add(window.partly_unknown, Relaxed);
    if let Some(quota) = session.off_cpu_thread_quota() {
        metrics.off_cpu_thread_quota.store(quota as u64, Relaxed);
    }
    if let Some(limit) = session.off_cpu_stamp_limit() {
        metrics.off_cpu_stamp_limit.store(limit as u64, Relaxed);
    }
    if let Some(sampling) = session.off_cpu_effective_sampling() {
        metrics.off_cpu_sampling_permille.store((sampling * 1000.0) as u64, Relaxed);
    }
    for (program, cost) in session.program_costs() {
        metrics.bpf_run_time_ns[program].store(cost.run_time_ns, Relaxed);
        metrics.bpf_runs[program].store(cost.runs, Relaxed);
    }
    let (hits, misses) = session.processes().cache_stats();
    metrics.symbol_cache_hits.store(hits, Relaxed);
    metrics.symbol_cache_misses.store(misses, Relaxed);
}

/// `identity` with the application's custom labels added: those the identity has
/// already (and `service`) keep the identity's value, so an application cannot relabel
/// whose its profiles are.
fn with_custom_labels(identity: &Identity, labels: &[(String, String)]) -> Identity {
    let mut labelled = identity.clone();
    for (key, value) in labels {
        if key != "service" {
            labelled.labels.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    labelled
}

/// A window's stacks grouped per (service, labels, kind), values in nanoseconds.
#[derive(Default)]
struct WindowGroups {
    identities: HashMap<u32, Arc<Identity>>,
    /// A process's identity with a set of its custom labels added, by (tgid, set id).
    labelled: HashMap<(u32, u32), Arc<Identity>>,
    groups: BTreeMap<(Arc<Identity>, Kind), Stacks>,
    /// (stack, request) pairs held, against [`MAX_REQUEST_ENTRIES`].
    request_entries: usize,
    /// Time not attributed to its request: the window held too many pairs already.
    requests_dropped: u64,
}

/// (stack, request) pairs one window holds at most (about 100 bytes each): far above
/// what a host serves in a window (a thousand requests a second of a few stacks each),
/// and a bound when an application labels every wait with a new id.
const MAX_REQUEST_ENTRIES: usize = 200_000;

impl WindowGroups {
    fn add(&mut self, session: &Session, drained: &Window, rules: &[Rule]) {
        let period_ns = session.period_ns();
        let label_sets = session.label_sets();
        for sample in &drained.samples {
            let identity = self
                .identities
                .entry(sample.key.tgid)
                .or_insert_with(|| {
                    let processes = session.processes();
                    let identified = |tgid: u32, process: &ProcessInfo| {
                        let leader = (process.session != tgid && process.session != 0)
                            .then(|| processes.get(process.session))
                            .flatten();
                        identify(process, leader.as_ref(), rules)
                    };
                    // A command that exited before its /proc entry was read (or its
                    // session) is named after the nearest ancestor that was read.
                    let mut tgid = sample.key.tgid;
                    let (mut found, mut without_session) = (None, None);
                    for _ in 0..4 {
                        match processes.get(tgid) {
                            Some(process) if process.session != 0 || process.cmdline.is_empty() => {
                                found = Some(identified(tgid, &process));
                                break;
                            }
                            Some(process) => without_session = without_session.or_else(|| Some(identified(tgid, &process))),
                            None => {}
                        }
                        match session.parent_of(tgid) {
                            Some(parent) if parent != tgid => tgid = parent,
                            _ => break,
                        }
                    }
                    Arc::new(
                        found
                            .or(without_session)
                            .unwrap_or_else(|| unknown_process(&comm_name(&sample.key.comm))),
                    )
                })
                .clone();
            let identity = match sample.key.labels {
                0 => identity,
                set => self
                    .labelled
                    .entry((sample.key.tgid, set))
                    .or_insert_with(|| Arc::new(with_custom_labels(&identity, label_sets.get(set).as_deref().unwrap_or(&[]))))
                    .clone(),
            };
            let (kind, ns, durations) = match &sample.value {
                RawValue::OnCpuSamples(count) => (Kind::OnCpu, count * period_ns, None),
                RawValue::OffCpu { ns, durations, .. } => {
                    (Kind::OffCpu(classify(sample.key.state, &sample.kernel_frames)), *ns, Some(durations))
                }
            };
            if ns == 0 {
                continue;
            }
            let mut frames = Vec::with_capacity(1 + sample.user_frames.len() + sample.kernel_frames.len());
            frames.push(Arc::from(sample.process.as_str()));
            frames.extend(sample.user_frames.iter().cloned());
            frames.extend(sample.kernel_frames.iter().cloned());
            let stack = self.groups.entry((identity, kind)).or_default().entry(frames).or_default();
            stack.ns += ns;
            if let Some(durations) = durations {
                stack.durations.merge(durations);
            }
            if let Some(request) = label_sets.request(sample.key.request) {
                match stack.requests.get_mut(&request) {
                    Some(spent) => *spent += ns,
                    None if self.request_entries < MAX_REQUEST_ENTRIES => {
                        self.request_entries += 1;
                        stack.requests.insert(request, ns);
                    }
                    None => self.requests_dropped += 1,
                }
            }
        }
    }

    fn services(&self) -> std::collections::BTreeSet<String> {
        self.identities.values().map(|identity| identity.service.clone()).collect()
    }

    /// The window's one payload; None for a window without samples.
    fn payload(&self, host_labels: &BTreeMap<String, String>, meta: &WindowMeta, run_id: &str) -> Option<Payload> {
        if self.groups.is_empty() {
            return None;
        }
        let parts = self.groups.iter().map(|((identity, kind), stacks)| (&**identity, *kind, stacks));
        Some(build_payload(parts, host_labels, meta, &format!("{run_id}-{}", meta.start_ms)))
    }
}

/// Runs blocking spool I/O off the async thread.
async fn with_spool<T: Send + 'static>(spool: &Arc<Mutex<Spool>>, f: impl FnOnce(&mut Spool) -> T + Send + 'static) -> T {
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || f(&mut spool.lock().unwrap())).await.expect("spool task panicked")
}

fn spool_payload(spool: &mut Spool, payload: &Payload, unanswered_since: Option<u64>, metrics: &Metrics) {
    match spool.push(payload, unanswered_since) {
        Ok(dropped) => {
            metrics.profiles_spooled.fetch_add(1, Relaxed);
            if dropped.profiles > 0 {
                tracing::warn!(profiles = dropped.profiles, ns = dropped.value, "spool full: dropped the oldest profiles");
                metrics.profiles_dropped.fetch_add(dropped.profiles, Relaxed);
                metrics.value_dropped_ns.fetch_add(dropped.value, Relaxed);
            }
        }
        Err(err) => {
            tracing::error!("could not spool a profile, dropping it: {err:#}");
            metrics.profiles_dropped.fetch_add(1, Relaxed);
            metrics.value_dropped_ns.fetch_add(payload.value, Relaxed);
        }
    }
    metrics.spool_profiles.store(spool.len() as u64, Relaxed);
    metrics.spool_bytes.store(spool.bytes(), Relaxed);
}

async fn ship_loop(
    mut receiver: mpsc::Receiver<Payload>,
    shipper: &Shipper,
    spool: &Arc<Mutex<Spool>>,
    metrics: &Arc<Metrics>,
    dead_letter_after: u32,
) {
    // Not after each window: windows end at the same wall-clock instants on every host,
    // and a fleet that lost the server would replay in lockstep.
    let mut next_replay = tokio::time::Instant::now() + jitter(REPLAY_INTERVAL);
    loop {
        tokio::select! {
            payload = receiver.recv() => {
                let Some(payload) = payload else { break };
                ship_or_spool(payload, shipper, spool, metrics).await;
            }
            _ = tokio::time::sleep_until(next_replay) => {
                replay_spool(shipper, spool, metrics, dead_letter_after).await;
                next_replay = tokio::time::Instant::now() + jitter(REPLAY_INTERVAL);
            }
        }
    }
    // The sampling thread is done: one last try for the spool, the rest stays on disk.
    replay_spool(shipper, spool, metrics, dead_letter_after).await;
    let left = with_spool(spool, |s| s.len()).await;
    let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Relaxed);
    tracing::info!(
        windows = count(&metrics.windows),
        profiles_produced = count(&metrics.profiles_produced),
        profiles_shipped = count(&metrics.profiles_shipped),
        profiles_spooled = count(&metrics.profiles_spooled),
        profiles_dropped = count(&metrics.profiles_dropped),
        profiles_rejected = count(&metrics.profiles_rejected),
        profiles_dead_lettered = count(&metrics.profiles_dead_lettered),
        profiles_unverifiable = count(&metrics.profiles_unverifiable),
        value_produced_ns = count(&metrics.value_produced_ns),
        value_shipped_ns = count(&metrics.value_shipped_ns),
        value_dropped_ns = count(&metrics.value_dropped_ns),
        value_dead_lettered_ns = count(&metrics.value_dead_lettered_ns),
        ship_auth_failures = count(&metrics.ship_auth_failures),
        bytes_shipped = count(&metrics.bytes_shipped),
        stacks_shipped_by_id = count(&metrics.stacks_shipped_by_id),
        stacks_shipped_with_frames = count(&metrics.stacks_shipped_with_frames),
        left_in_spool = left,
        "agent stopped"
    );
}

async fn ship_or_spool(payload: Payload, shipper: &Shipper, spool: &Arc<Mutex<Spool>>, metrics: &Arc<Metrics>) {
    let mut unanswered_since = None;
    // Older windows wait in the spool: queue behind them to keep the order.
    if with_spool(spool, |s| s.is_empty()).await {
        match shipper.send_with_retries(&payload, &mut unanswered_since).await {
            Ok(()) => return shipped(&payload, metrics),
            Err(ShipError::Rejected(err)) => return rejected(&payload, err, metrics),
            Err(ShipError::Unverifiable(err)) => return unverifiable(&payload, err, metrics),
            // The shipper said so already, once a minute rather than once a window.
            Err(ShipError::Misconfigured(_)) => {}
            Err(err) => tracing::warn!("could not ship, spooling: {err}"),
        }
    }
    let metrics = metrics.clone();
    with_spool(spool, move |s| spool_payload(s, &payload, unanswered_since, &metrics)).await;
}

fn shipped(payload: &Payload, metrics: &Metrics) {
    metrics.profiles_shipped.fetch_add(1, Relaxed);
    metrics.value_shipped_ns.fetch_add(payload.value, Relaxed);
}

fn rejected(payload: &Payload, err: anyhow::Error, metrics: &Metrics) {
    tracing::error!(query = %payload.query, "server rejected a profile: {err:#}");
    metrics.profiles_rejected.fetch_add(1, Relaxed);
}

fn unverifiable(payload: &Payload, err: anyhow::Error, metrics: &Metrics) {
    tracing::warn!(query = %payload.query, ns = payload.value, "dropping a profile the server may have stored already: {err:#}");
    metrics.profiles_unverifiable.fetch_add(1, Relaxed);
    metrics.value_unverifiable_ns.fetch_add(payload.value, Relaxed);
}

/// Poison suspects one replay passes over at most: bounds the requests a replay sends
/// to a server that fails everything.
const MAX_PASSED_OVER: usize = 16;

/// Sends spooled windows oldest first, one attempt each.
///
/// A failure that says nothing about the payload (no answer; 408, 429, 502, 503, 504;
/// 401, 403, 404) ends the replay: the next one starts again from the oldest window, so
/// the order is kept and a server that is away gets one request per replay.
///
/// When the server fails a payload itself (500 or another 5xx), the failure is counted
/// in the spool, on disk. Below `dead_letter_after` failures it ends the replay too. At
/// that count the payload is a poison suspect: the replay passes over it (it stays in
/// place) to the next window. If the server accepts a later window in the same replay,
/// it works and only fails the suspects: they are dead-lettered, that is removed and
/// counted (`profiles_dead_lettered_total`, `value_dead_lettered_nanoseconds_total`). A
/// server that fails everything accepts nothing, so it never costs a window, however
/// long it lasts. Suspects are passed over on each replay until one is accepted or
/// dead-lettered, at most [`MAX_PASSED_OVER`] per replay.
///
/// The risk left: a server that failed everything for `dead_letter_after` replays and,
/// coming back, fails a suspect once more while accepting the next window costs that
/// one window, counted.
async fn replay_spool(shipper: &Shipper, spool: &Arc<Mutex<Spool>>, metrics: &Arc<Metrics>, dead_letter_after: u32) {
    let mut after = None;
    let mut suspects: Vec<Spooled> = Vec::new();
    while let Some(spooled) = with_spool(spool, move |s| s.next_after(after)).await {
        after = Some(spooled.seq);
        let mut unanswered_since = spooled.unanswered_since;
        let result = shipper.send(&spooled.payload, &mut unanswered_since).await;
        if let (None, Some(since)) = (spooled.unanswered_since, unanswered_since) {
            let seq = spooled.seq;
            if let Err(err) = with_spool(spool, move |s| s.mark_unanswered(seq, since)).await {
                tracing::error!("recording an unanswered attempt in the spool: {err:#}");
            }
        }
        match result {
            Ok(()) => {
                shipped(&spooled.payload, metrics);
                for suspect in suspects.drain(..) {
                    tracing::error!(
                        query = %suspect.payload.query,
                        failures = suspect.failures,
                        ns = suspect.payload.value,
                        "dead-lettering a profile the server keeps failing while it accepts later ones"
                    );
                    metrics.profiles_dead_lettered.fetch_add(1, Relaxed);
                    metrics.value_dead_lettered_ns.fetch_add(suspect.payload.value, Relaxed);
                    unspool(spool, suspect.seq, metrics).await;
                }
            }
            Err(ShipError::Rejected(err)) => rejected(&spooled.payload, err, metrics),
            Err(ShipError::Unverifiable(err)) => unverifiable(&spooled.payload, err, metrics),
            Err(ShipError::ServerFailed(err)) => {
                let seq = spooled.seq;
                match with_spool(spool, move |s| s.count_failure(seq)).await {
                    Ok(failures) if failures >= dead_letter_after && suspects.len() < MAX_PASSED_OVER => {
                        tracing::warn!(query = %spooled.payload.query, failures, "server keeps failing a profile, trying later ones: {err:#}");
                        suspects.push(Spooled { failures, ..spooled });
                        continue;
                    }
                    Ok(_) => break,
                    Err(count_err) => {
                        tracing::error!("counting a failure in the spool: {count_err:#}");
                        break;
                    }
                }
            }
            Err(ShipError::Unavailable(_) | ShipError::Unanswered(_) | ShipError::Misconfigured(_)) => break,
        }
        unspool(spool, spooled.seq, metrics).await;
    }
}

/// Removes a window the server is done with from the spool.
async fn unspool(spool: &Arc<Mutex<Spool>>, seq: u64, metrics: &Arc<Metrics>) {
    let metrics = metrics.clone();
    with_spool(spool, move |s| {
        if let Err(err) = s.remove(seq) {
            tracing::error!("removing a profile from the spool: {err:#}");
        }
        metrics.spool_profiles.store(s.len() as u64, Relaxed);
        metrics.spool_bytes.store(s.bytes(), Relaxed);
    })
    .await;
}

/// host, kernel and CPU count from sysinfo, plus the configured labels (which win).
fn host_labels(configured: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if let Ok(host) = sysinfo::System::host_name() {
        labels.insert("host".to_string(), host);
    }
    if let Ok(kernel) = sysinfo::System::kernel_version() {
        labels.insert("kernel".to_string(), kernel);
    }
    if let Ok(cpus) = std::thread::available_parallelism() {
        labels.insert("cpus".to_string(), cpus.to_string());
    }
    labels.extend(configured.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels
}
