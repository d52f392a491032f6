//! Collection server of the continuous profiler: ingest (pprof, folded,
//! Pyroscope-compatible) -> embedded store (WAL + Parquet + redb) -> merged
//! flame graphs, diffs, top tables and exports over HTTP; change detection
//! between ranges, around deploys and on schedules ([`events`]).
//!
//! The binary is a thin wrapper around [`run`]; tests and benchmarks use
//! [`start`] to get a server on an ephemeral port.

//!
//! Modules import downwards only (checked by `cargo xtask layers`):
//! `lib → router → native | compat → http → ingest, events, schedule → query → store`.
//! `router` assembles the routes of `native` (our `/api/v1`), `compat` (other
//! vendors' protocols) and `ui`; `http` is the edge they share; below it nothing uses
//! axum.

pub mod budget;
pub mod compat;
pub mod config;
pub mod events;
pub mod http;
pub mod ingest;
pub mod json_file;
pub mod metrics;
pub mod native;
pub mod query;
pub mod render;
pub mod router;
pub mod schedule;
pub mod store;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::store::{ClickHouseOptions, ClickHouseStore, EmbeddedStore, Store, StoreOptions};

pub fn store_options(cfg: &Config) -> StoreOptions {
    let s = &cfg.storage;
    let hours = |h: u64| (h as i64).saturating_mul(3_600_000);
    StoreOptions {
        segment_span_ms: s.segment_span_ms,
        retention_ms: (s.retention_hours > 0).then(|| hours(s.retention_hours)),
        downsample: [
            (s.downsample_1m_after_hours, 60_000),
            (s.downsample_10m_after_hours, 600_000),
        ]
        .into_iter()
        .filter(|(h, _)| *h > 0)
        .map(|(h, res)| (hours(h), res))
        .collect(),
        dedup_window_ms: (s.dedup_window_secs as i64).saturating_mul(1000),
        dedup_max_ids: s.dedup_max_ids,
        max_buffered_rows: s.max_buffered_rows,
        max_wal_bytes: s.max_wal_bytes,
        totals_cache_bytes: s.totals_cache_bytes,
        result_cache_bytes: s.result_cache_bytes,
    }
}

/// Opens the configured backend (embedded: replays the WAL; ClickHouse:
/// connects and runs the schema migrations).
pub fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match cfg.storage.backend {
        config::Backend::Embedded => Arc::new(
            EmbeddedStore::open(&cfg.data_dir, store_options(cfg))
                .with_context(|| format!("opening store in {}", cfg.data_dir.display()))?,
        ),
        config::Backend::ClickHouse => Arc::new(ClickHouseStore::open(clickhouse_options(cfg))?),
    })
}

fn clickhouse_options(cfg: &Config) -> ClickHouseOptions {
    let ch = &cfg.clickhouse;
    let s = &cfg.storage;
    let hours = |h: u64| (h as i64).saturating_mul(3_600_000);
    ClickHouseOptions {
        url: ch.url.clone(),
        database: ch.database.clone(),
        user: (!ch.user.is_empty()).then(|| ch.user.clone()),
        password: (!ch.password.is_empty()).then(|| ch.password.clone()),
        retention_ms: (s.retention_hours > 0).then(|| hours(s.retention_hours)),
        rollup_retention_ms: (ch.rollup_retention_days > 0).then(|| hours(ch.rollup_retention_days.saturating_mul(24))),
        async_insert: ch.async_insert,
    }
}

/// Opens the request table next to the profiles: in the data directory with the
/// embedded store, in ClickHouse (shared by every instance) with it. The store's
/// migrations, which make ClickHouse's table, must have run.
pub fn open_requests(cfg: &Config) -> anyhow::Result<store::RequestTable> {
    Ok(match cfg.storage.backend {
        config::Backend::Embedded => store::RequestTable::open(&cfg.data_dir, store_options(cfg).retention_ms)?,
        config::Backend::ClickHouse => store::RequestTable::shared(store::ClickHouseRequests::open(&clickhouse_options(cfg))?),
    })
}

/// A running server; dropping it without [`Server::shutdown`] leaves the
/// tasks running until the runtime ends.
pub struct Server {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Stops accepting, drains in-flight requests, flushes the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("server task panicked")?
    }
}

/// Opens the store (replaying the WAL), binds and serves in the background.
pub async fn start(cfg: Config) -> anyhow::Result<Server> {
    let open = cfg.tokens.is_empty() && cfg.admin_tokens.is_empty();
    if open && !cfg.listen.ip().is_loopback() && !cfg.insecure {
        anyhow::bail!(
            "refusing to listen on {} without tokens: anyone on the network could write profiles and start runs; \
             set `tokens` and `admin_tokens` (or --token/--admin-token), or pass --insecure",
            cfg.listen
        );
    }
    let public_reads = cfg.read_tokens.is_empty() && !cfg.listen.ip().is_loopback();
    if public_reads && !cfg.public_reads && !cfg.insecure {
        anyhow::bail!(
            "refusing to serve reads on {} without read tokens: anyone on the network could read flame graphs \
             (your code paths) and run costly change detection; set `read_tokens` (or --read-token), \
             or pass --public-reads",
            cfg.listen
        );
    }
    if public_reads {
        tracing::warn!(listen = %cfg.listen, "reads are public: queries, the UI's data and /metrics need no token");
    }
    if open {
        tracing::warn!("no tokens configured: ingest, schedules and runs are open to anyone who can connect");
    } else if cfg.admin_tokens.is_empty() {
        tracing::info!("no admin tokens configured: schedules and runs cannot be changed over the API");
    }
    let store = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open_store(&cfg)).await??
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let schedules = Arc::new(schedule::Schedules::open(&cfg.data_dir, schedule::RunLimits::default())?);
    let budget = Arc::new(budget::MemoryBudget::new(
        cfg.limits.ingest_memory_bytes,
        Duration::from_secs(cfg.limits.ingest_wait_secs),
    ));
    let events = Arc::new(events::Events::open(
        &cfg.data_dir,
        events::EventOptions {
            deploy_window: Duration::from_secs(cfg.deploys.compare_secs),
            store_window_ms: cfg.storage.window_ms,
            webhook: (!cfg.deploys.webhook.is_empty()).then(|| cfg.deploys.webhook.clone()),
            alerts: cfg.alerts.clone(),
        },
    )?);
    let requests = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open_requests(&cfg)).await??
    };
    let state = http::AppState {
        store: store.clone(),
        requests: Arc::new(requests),
        names: Arc::default(),
        events: events.clone(),
        queries: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_concurrent_queries.max(1))),
        budget,
        config: Arc::new(cfg),
        metrics: Arc::new(metrics::Metrics::default()),
        schedules,
    };
    let (stop, stopped) = watch::channel(false);
    let background = tokio::spawn(background(state.clone(), stopped.clone()));
    let comparisons = tokio::spawn(events::run(
        events,
        store.clone(),
        state.names.clone(),
        Duration::from_secs(state.config.deploys.check_secs),
        stopped.clone(),
    ));
    let app = router::router(state.clone());
    let mut stopped_http = stopped;
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped_http.wait_for(|s| *s).await;
            })
            .await
            .context("serving HTTP")?;
        background.await.context("background task panicked")?;
        comparisons.await.context("event comparisons panicked")?;
        tokio::task::spawn_blocking(move || store.flush())
            .await?
            .context("final flush")?;
        tracing::info!("store flushed; bye");
        Ok(())
    });
    tracing::info!(%addr, "listening");
    Ok(Server { addr, stop, task })
}

/// After a failed flush, how soon it is tried again (ingest waits for it).
const FLUSH_RETRY: Duration = Duration::from_secs(2);

/// Periodic flushes (by age or size) and retention/downsampling passes.
async fn background(s: http::AppState, mut stopped: watch::Receiver<bool>) {
    let st = &s.config.storage;
    let flush_every = Duration::from_secs(st.flush_interval_secs);
    let maintain_every = Duration::from_secs(st.maintenance_interval_secs.max(1));
    let (mut last_flush, mut last_maintain) = (Instant::now(), Instant::now());
    let mut flush_failed = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        let rows = s.store.buffered_rows();
        let due = last_flush.elapsed() >= flush_every || (flush_failed && last_flush.elapsed() >= FLUSH_RETRY);
        if rows > 0 && (rows >= st.flush_rows || due) {
            last_flush = Instant::now();
            let store = s.store.clone();
            match tokio::task::spawn_blocking(move || store.flush()).await {
                Ok(Ok(())) => {
                    if flush_failed {
                        tracing::info!("flush succeeded again; ingest resumes");
                    }
                    flush_failed = false;
                    s.metrics
                        .flushes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    flush_failed = true;
                    s.metrics
                        .flush_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(error = %format!("{e:#}"), retry_in = ?FLUSH_RETRY, "flush failed; data stays in the WAL, ingest is refused until a retry succeeds");
                }
                Err(e) => tracing::error!(error = %e, "flush task panicked"),
            }
        }
        if last_maintain.elapsed() >= maintain_every {
            last_maintain = Instant::now();
            let (store, requests) = (s.store.clone(), s.requests.clone());
            let now = crate::store::now_ms();
            match tokio::task::spawn_blocking(move || store.maintain(now).and(requests.maintain(now))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "maintenance failed"),
                Err(e) => tracing::error!(error = %e, "maintenance task panicked"),
            }
        }
    }
}

/// Serves until SIGTERM or ctrl-c, then shuts down gracefully.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let server = start(cfg).await?;
    // Line-oriented marker for supervisors and tests that start on port 0.
    println!("listening on {}", server.addr);
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
