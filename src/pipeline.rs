//! `flowtel run`: builds the configured components and connects them. Data
//! moves one way: the sources send events into one bounded channel; the
//! flow stage applies them, names flow ends through the enrichment stage
//! and closes each interval into a report; each exporter takes the reports
//! from its own bounded queue (see docs/architecture.md).

use std::future::Future;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::enrich::{self, kubernetes, Namer};
use crate::export::{self, ExportContext};
use crate::flow::mesh::ProxyTargets;
use crate::flow::names::{Naming, PodNaming};
use crate::flow::{FlowStage, SourceEvent};
use crate::health;
use crate::source::{Sources, SourcesConfig};
use crate::telemetry::Telemetry;

/// Events the sources may have in flight before they wait for the flow
/// stage (a kernel dump of this many flows fits without waiting).
const EVENTS: usize = 65_536;

/// Runs until `shutdown` resolves, then exports the final interval.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let telemetry = Telemetry::default();
    let node = cfg.resource.node_name.clone();
    let (events, received) = mpsc::channel::<SourceEvent>(EVENTS);
    let ip_events = kubernetes::IpEvents {
        node: node.clone(),
        events: events.clone(),
    };
    let kube = kubernetes::start_with(&cfg.kubernetes, &telemetry, Some(ip_events))
        .context("starting the Kubernetes cache")?;
    if kube.is_some() {
        tracing::info!(node = ?node, "naming flow ends from the Kubernetes API");
    }
    let proxies = kube.as_ref().map(|k| {
        let (snapshots, node) = (k.snapshots(), node.clone());
        Box::new(move || enrich::proxy_targets(&snapshots.borrow(), node.as_deref()))
            as ProxyTargets
    });
    let network_events =
        kubernetes::watch_network_events(&cfg.kubernetes, node.clone(), events.clone())
            .context("starting the Kubernetes Events watcher")?;
    let sources_cfg = SourcesConfig {
        kernel: cfg.source,
        detect: &cfg.detect,
        ebpf: &cfg.ebpf,
        conntrack: &cfg.conntrack,
        hubble: &cfg.hubble,
        istio: &cfg.mesh.istio,
        felix: &cfg.mesh.felix,
        cni: &cfg.cni,
        firewall: &cfg.firewall,
    };
    let pods = kube.as_ref().map(|k| {
        std::sync::Arc::new(enrich::PodNamer::new(k.snapshots())) as std::sync::Arc<dyn PodNaming>
    });
    let mut sources = Sources::start(sources_cfg, events, &telemetry, proxies, pods).await?;
    if let Some(source) = telemetry.source() {
        tracing::info!(source = source.name, mode = source.mode, interval = ?cfg.interval, "flowtel started");
    }
    health::serve(&cfg.health, telemetry.clone()).await?;
    let exporters = export::start(&ExportContext {
        export: &cfg.export,
        resource: &cfg.resource,
        interval: cfg.interval,
        max_series: cfg.flows.max_series,
        telemetry: &telemetry,
    })?;
    let namer = Namer::new(
        &cfg.enrich,
        kube.as_ref().map(|k| k.snapshots()),
        node.as_deref(),
        &telemetry,
    )?;
    let naming = namer.map(|n| Box::new(n) as Box<dyn Naming>);
    FlowStage::new(&cfg.flows, exporters.records(), naming, &telemetry)
        .with_spans(exporters.spans())
        .with_dns_lookups(exporters.dns_lookups())
        .run(
            received,
            cfg.interval,
            |epoch| sources.request(epoch),
            |report| exporters.deliver(report),
            shutdown,
        )
        .await;
    exporters.stop().await;
    sources.stop().await;
    if let Some(task) = network_events {
        task.abort();
    }
    if let Some(k) = kube {
        k.stop().await;
    }
    Ok(())
}
