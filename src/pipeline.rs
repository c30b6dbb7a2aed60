//! `flowtel run`: wires a source, the flow table and the exporters.
//!
//! One task owns the flow table and aggregator (no locks on the hot path).
//! Each interval it asks the source for a dump, applies everything the
//! source sends, and when the dump is complete hands the finished interval
//! to the exporter task over a channel.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config::{Config, ConsoleMode, SourceChoice};
use crate::enrich::{kubernetes, Namer};
use crate::export::console::ConsoleExporter;
use crate::export::mesh::{ActiveSourcesCell, MeshExporter, MeshSources};
use crate::export::otlp_logs::OtlpLogsExporter;
use crate::export::otlp_metrics::OtlpMetricsExporter;
use crate::export::transport::SignalTransport;
use crate::flow::aggregate::{Aggregator, IntervalReport, KeySpec};
use crate::flow::table::FlowTable;
use crate::flow::SourceEvent;
use crate::source::detect::{self, Detection};
use crate::source::{conntrack, ebpf, hubble, SourceInfo};
use crate::stats::SelfStats;

/// How long shutdown waits for the final dump before exporting what it has.
const FINAL_DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until `shutdown` resolves, then exports the final interval.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let stats = Arc::new(SelfStats::default());
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(65_536);
    let source = Source::start(&cfg, &stats, tx)?;
    let info = SourceInfo {
        name: source.name(),
        mode: source.mode(),
    };
    tracing::info!(source = info.name, mode = info.mode, interval = ?cfg.interval, "flowtel started");

    let kube = kubernetes::start(&cfg.kubernetes).context("starting the Kubernetes cache")?;
    if kube.is_some() {
        tracing::info!(node = ?cfg.resource.node_name, "naming flow ends from the Kubernetes API");
    }
    let (detection, _detect_task) =
        detect::watch(cfg.detect.clone(), detect::DEFAULT_POLL_INTERVAL).await;
    log_detection(&detection.borrow());
    let active = ActiveSourcesCell::default();
    if let Ok(mut a) = active.lock() {
        a.sources = vec![info.name];
        a.cni = detection
            .borrow()
            .cni
            .active
            .as_ref()
            .map(|c| c.kind.as_str().to_owned());
    }
    let hubble = hubble::start(&cfg.hubble);
    let pods: Option<crate::source::mesh::PodSource> = kube.as_ref().map(|k| {
        let snapshots = k.snapshots();
        Box::new(move || snapshots.borrow().clone()) as crate::source::mesh::PodSource
    });
    let mesh = crate::source::mesh::start(
        &cfg.mesh,
        cfg.resource.node_name.clone(),
        pods,
        detection.clone(),
    )
    .map_err(|e| anyhow::anyhow!("starting the mesh scrapes: {e}"))?;
    if !cfg.health.listen.is_empty() {
        let listen = cfg
            .health
            .listen
            .parse()
            .with_context(|| format!("health.listen {:?}", cfg.health.listen))?;
        let local = crate::health::serve(
            listen,
            stats.clone(),
            info,
            kube.as_ref().map(|k| k.stats()),
            active.clone(),
        )
        .await?;
        tracing::info!("health checks on http://{local}/healthz and /readyz");
    }
    let transport = SignalTransport::resolve(&cfg.export.otlp, &cfg.export.otlp.metrics, "metrics");
    if let Some(t) = &transport {
        tracing::info!(endpoint = %t.url, protocol = ?t.protocol, "exporting OTLP metrics");
    }
    let otlp = if transport.is_some() || !cfg.export.prometheus.listen.is_empty() {
        Some(
            OtlpMetricsExporter::build(
                &cfg,
                transport.as_ref(),
                stats.clone(),
                source.ebpf_stats(),
                kube.as_ref().map(|k| k.stats()),
                info,
            )
            .await?,
        )
    } else {
        None
    };
    // Read every interval whatever the exporters: for /readyz, the
    // Prometheus endpoint and OTLP alike.
    let sources = MeshSources::new(
        cfg.hubble.clone(),
        hubble,
        mesh,
        detection.clone(),
        info.name,
        active.clone(),
    );
    let mesh_exporter = match &transport {
        Some(t) => Some(MeshExporter::build(&cfg, t, stats.clone())?),
        None => None,
    };
    let logs = if cfg.export.logs.enabled {
        SignalTransport::resolve(&cfg.export.otlp, &cfg.export.otlp.logs, "logs")
    } else {
        None
    };
    let logs = match logs {
        Some(t) => {
            tracing::info!(endpoint = %t.url, protocol = ?t.protocol, "exporting OTLP log events");
            Some(OtlpLogsExporter::build(&cfg, &t, stats.clone())?)
        }
        None => None,
    };
    let console = match cfg.export.console.mode {
        ConsoleMode::Always => true,
        ConsoleMode::Never => false,
        // A Prometheus-only node should not also flood its log with tables.
        ConsoleMode::Auto => transport.is_none() && cfg.export.prometheus.listen.is_empty(),
    }
    .then(|| ConsoleExporter::new(&cfg.export.console));
    if otlp.is_none() && console.is_none() {
        tracing::warn!(
            "no OTLP endpoint and the console is off: flows are counted but not shown anywhere"
        );
    }

    let (report_tx, report_rx) = mpsc::channel::<Arc<IntervalReport>>(2);
    let records = logs.as_ref().map_or(0, |_| cfg.export.logs.max_records);
    let exporter = tokio::spawn(export_loop(
        report_rx,
        Exporters {
            otlp,
            logs,
            console,
            sources,
            mesh: mesh_exporter,
        },
        stats.clone(),
        info,
    ));

    let namer = Namer::new(
        &cfg.enrich,
        kube.is_some(),
        cfg.resource.node_name.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("enrich.networks: {e}"))?;
    let mut table = FlowTable::new(cfg.flows.max_flows, stats.clone());
    let mut agg = Aggregator::new(
        KeySpec::from_fields(&cfg.flows.key),
        cfg.flows.max_series,
        cfg.flows.series_idle_timeout,
        stats.clone(),
    )
    .with_namer(namer)
    .with_records(records);
    let refresh_names = |agg: &mut Aggregator| {
        if let Some(k) = &kube {
            agg.set_snapshot(k.snapshot());
        }
    };
    refresh_names(&mut agg);
    let mut epoch = 1;
    source.request_dump(epoch);
    let mut pending = Some(epoch);
    let mut report_due = false;
    let mut ticker =
        tokio::time::interval_at(tokio::time::Instant::now() + cfg.interval, cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else {
                    tracing::error!("the source stopped unexpectedly");
                    break;
                };
                let finished = matches!(event, SourceEvent::DumpFinished { epoch: e, .. } if Some(e) == pending);
                table.apply(event, &mut agg);
                if finished {
                    pending = None;
                    stats.ready.store(true, Ordering::Relaxed);
                    if std::mem::take(&mut report_due) {
                        send_report(&report_tx, &mut agg);
                    }
                }
            }
            _ = ticker.tick() => {
                if pending.is_some() {
                    tracing::warn!("the previous dump is still running after a whole interval; exporting what was counted so far");
                    send_report(&report_tx, &mut agg);
                    report_due = false;
                } else {
                    epoch += 1;
                    refresh_names(&mut agg);
                    if source.request_dump(epoch) {
                        pending = Some(epoch);
                        report_due = true;
                    }
                }
            }
            _ = &mut shutdown => break,
        }
    }

    tracing::info!("shutting down: final dump and export");
    epoch += 1;
    if source.request_dump(epoch) {
        let deadline = tokio::time::Instant::now() + FINAL_DUMP_TIMEOUT;
        while let Ok(Some(event)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            let finished =
                matches!(event, SourceEvent::DumpFinished { epoch: e, .. } if e == epoch);
            table.apply(event, &mut agg);
            if finished {
                break;
            }
        }
    }
    let _ = report_tx.send(Arc::new(agg.finish_interval())).await;
    drop(report_tx);
    if let Err(e) = exporter.await {
        tracing::error!("exporter task failed: {e}");
    }
    tokio::task::spawn_blocking(move || source.stop())
        .await
        .ok();
    if let Some(k) = kube {
        k.stop().await;
    }
    Ok(())
}

/// Says once at start what the node runs besides the kernel.
fn log_detection(d: &Detection) {
    match &d.cni.active {
        Some(c) => tracing::info!(
            cni = %c.kind,
            chained_on = ?c.chained_on.as_ref().map(|k| k.as_str()),
            file = %c.file.display(),
            hubble = d.hubble,
            felix = d.felix,
            "detected the node's CNI"
        ),
        None => tracing::info!(
            reason = d
                .cni
                .dir_error
                .as_deref()
                .unwrap_or("no valid configuration"),
            hubble = d.hubble,
            felix = d.felix,
            "no CNI configuration found"
        ),
    }
}

/// The kernel source in use.
enum Source {
    Conntrack(conntrack::ConntrackHandle),
    Ebpf(ebpf::EbpfHandle),
}

impl Source {
    fn start(
        cfg: &Config,
        stats: &Arc<SelfStats>,
        tx: mpsc::Sender<SourceEvent>,
    ) -> anyhow::Result<Self> {
        let start_conntrack = |tx| {
            conntrack::start(&cfg.conntrack, stats.clone(), tx)
                .map(Self::Conntrack)
                .context("starting the conntrack source")
        };
        match cfg.source {
            SourceChoice::Conntrack => start_conntrack(tx),
            SourceChoice::Ebpf => ebpf::start(&cfg.ebpf, stats.clone(), tx)
                .map(Self::Ebpf)
                .context("starting the eBPF source"),
            SourceChoice::Auto => match ebpf::start(&cfg.ebpf, stats.clone(), tx.clone()) {
                Ok(h) => Ok(Self::Ebpf(h)),
                Err(e) => {
                    tracing::warn!(
                        "eBPF source unavailable, counting with conntrack instead: {e:#}"
                    );
                    start_conntrack(tx)
                }
            },
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Conntrack(_) => "conntrack",
            Self::Ebpf(_) => "ebpf",
        }
    }

    fn mode(&self) -> &'static str {
        match self {
            Self::Conntrack(h) => h.mode(),
            Self::Ebpf(h) => h.mode(),
        }
    }

    fn request_dump(&self, epoch: u64) -> bool {
        match self {
            Self::Conntrack(h) => h.request_dump(epoch),
            Self::Ebpf(h) => h.request_dump(epoch),
        }
    }

    fn ebpf_stats(&self) -> Option<Arc<ebpf::EbpfStats>> {
        match self {
            Self::Conntrack(_) => None,
            Self::Ebpf(h) => Some(h.stats()),
        }
    }

    fn stop(self) {
        match self {
            Self::Conntrack(h) => h.stop(),
            Self::Ebpf(h) => h.stop(),
        }
    }
}

fn send_report(tx: &mpsc::Sender<Arc<IntervalReport>>, agg: &mut Aggregator) {
    // A slow exporter skips an interval rather than stalling the table: the
    // next report carries the cumulative totals anyway.
    if tx.try_send(Arc::new(agg.finish_interval())).is_err() {
        tracing::debug!("exporter busy; interval folded into the next one");
    }
}

/// Where finished intervals go.
struct Exporters {
    otlp: Option<OtlpMetricsExporter>,
    logs: Option<OtlpLogsExporter>,
    console: Option<ConsoleExporter>,
    /// Hubble, Istio, Felix and the detection self-metrics, read each
    /// interval into a snapshot for the Prometheus endpoint and `mesh`.
    sources: MeshSources,
    /// Their OTLP export.
    mesh: Option<MeshExporter>,
}

async fn export_loop(
    mut rx: mpsc::Receiver<Arc<IntervalReport>>,
    mut to: Exporters,
    stats: Arc<SelfStats>,
    source: SourceInfo,
) {
    while let Some(report) = rx.recv().await {
        let (snapshot, hubble_flows) = to.sources.collect();
        let snapshot = Arc::new(snapshot);
        if let Some(o) = &to.otlp {
            o.publish_mesh(Arc::clone(&snapshot));
        }
        if let Some(c) = &to.console {
            if let Err(e) = c.export(&report, &stats.snapshot(), source) {
                tracing::warn!("stopped printing flows to the terminal: {e}");
                to.console = None;
            }
        }
        let metrics = async {
            if let Some(o) = &mut to.otlp {
                o.export(&report).await;
            }
        };
        let logs = async {
            if let Some(l) = &mut to.logs {
                l.export(&report).await;
            }
        };
        let mesh = async {
            if let Some(m) = &to.mesh {
                m.export(&snapshot, &hubble_flows).await;
            }
        };
        tokio::join!(metrics, logs, mesh);
    }
    // The final interval's records were flushed above; shutdown releases
    // the exporters once nothing is left.
    let metrics = async {
        if let Some(o) = to.otlp {
            o.shutdown().await;
        }
    };
    let logs = async {
        if let Some(l) = to.logs {
            l.shutdown().await;
        }
    };
    tokio::join!(metrics, logs);
}
