//! The Kubernetes cache: who owns an IP address, and since when.
//!
//! [`start`] spawns one task that watches Pods, Services, EndpointSlices
//! and Nodes (whole objects) and ReplicaSets and Jobs (metadata only, to
//! name workloads) with kube-runtime watchers. It keeps a compact record of
//! each ([`PodInfo`], [`ServiceInfo`], [`NodeInfo`]), far smaller than the
//! objects, and publishes an immutable [`Snapshot`] at most every 250 ms
//! while something changes. Readers take the current snapshot with
//! [`KubeHandle::snapshot`] and look addresses up without locking.
//!
//! Workloads are named by following `ownerReferences` with
//! `controller: true` (Pod → ReplicaSet → Deployment, Pod → Job → CronJob,
//! Pod → StatefulSet/DaemonSet), never by guessing from names.
//!
//! # Addresses over time
//!
//! Each address keeps a short history of holders, so a flow is named after
//! the pod that had the address when the flow was seen ([`Snapshot::lookup`]
//! takes that time):
//!
//! * a holder lets an address go when flowtel sees it deleted, finished
//!   (`Succeeded`/`Failed` pods keep `podIP` in the API but not the
//!   address), missing from a re-list, or replaced by a newcomer whose
//!   address it still claimed; that old claim is kept for `ip_retention`;
//! * the next holder's claim starts at that moment, or at the beginning of
//!   time when flowtel knows of no earlier holder. Kubernetes timestamps
//!   are not used: they come from the API server's clock, flows are timed
//!   by the node's, and a pod gets its address some unknown time after
//!   both; the order of holders is what flowtel sees itself.
//!
//! The cache holds at most `kubernetes.max_objects` objects of all kinds
//! together: past it, new objects are shed (counted in
//! `flowtel.k8s.objects.shed`) while those held still change and go, so a
//! cluster larger than planned costs a bounded amount of memory and names
//! only part of its pods. `flowtel.k8s.objects.cached` shows how full it is.
//!
//! Nothing about the API server is fatal: unreachable at start, gone
//! mid-run, `410 Gone`, a re-list: the watchers retry with client-go's
//! backoff and the last snapshot stays in use meanwhile. How the task is
//! doing is in [`KubeStats`].
//!
//! The RBAC rules this needs are in `deploy/rbac.yaml`.

pub(crate) mod cache;
mod config;
mod convert;
mod events;
mod index;
mod intern;
mod ips;
mod model;
mod owners;
mod watch;

use std::sync::Arc;

use anyhow::Context as _;
use kube::config::Kubeconfig;
use tokio::sync::{oneshot, watch as channel};
use tokio::task::JoinHandle;

use crate::telemetry::{catalogue, Counter, Gauge, Telemetry};

pub use config::{KubernetesConfig, KubernetesMode, DEFAULT_MAX_OBJECTS};
pub use index::{Counts, Snapshot};
pub use model::{
    mesh_of, NodeInfo, Peer, PodInfo, PodMesh, Protocol, ServiceInfo, ServicePort, Workload,
    WorkloadKind,
};

/// How the cache task is doing, for self-telemetry and `/readyz`. Every
/// counter only grows.
#[derive(Debug)]
pub struct KubeStats {
    watch_errors: Counter,
    relists: Counter,
    applied: Counter,
    rejected: Counter,
    shed: Counter,
    cached: Gauge,
    synced: Gauge,
}

impl KubeStats {
    fn new(telemetry: &Telemetry) -> Self {
        Self {
            watch_errors: telemetry.counter(&catalogue::K8S_WATCH_ERRORS),
            relists: telemetry.counter(&catalogue::K8S_RELISTS),
            applied: Counter::default(),
            rejected: telemetry.counter(&catalogue::K8S_OBJECTS_REJECTED),
            shed: telemetry.counter(&catalogue::K8S_OBJECTS_SHED),
            cached: telemetry.gauge(&catalogue::K8S_OBJECTS_CACHED),
            synced: telemetry.gauge(&catalogue::K8S_SYNCED),
        }
    }

    /// Failed list, watch or connection attempts (each retried).
    pub fn watch_errors(&self) -> u64 {
        self.watch_errors.get()
    }

    /// Complete lists after the first of each kind: after a `410 Gone`, an
    /// API server restart or a broken watch that could not resume.
    pub fn relists(&self) -> u64 {
        self.relists.get()
    }

    /// Objects listed, added, modified or deleted that the cache took in.
    pub fn objects_applied(&self) -> u64 {
        self.applied.get()
    }

    /// Objects skipped because a field flowtel needs is missing or wrong
    /// (a missing name, an address that does not parse).
    pub fn objects_rejected(&self) -> u64 {
        self.rejected.get()
    }

    /// New objects not cached because the cache held
    /// `kubernetes.max_objects` already.
    pub fn objects_shed(&self) -> u64 {
        self.shed.get()
    }

    /// Objects of all kinds in the last published snapshot.
    pub fn objects_cached(&self) -> u64 {
        self.cached.get()
    }

    /// Every kind has been listed completely at least once.
    pub fn synced(&self) -> bool {
        self.synced.flag()
    }
}

/// The running cache. Dropping it stops the task too; [`KubeHandle::stop`]
/// also waits for it to end.
#[derive(Debug)]
pub struct KubeHandle {
    snapshots: channel::Receiver<Arc<Snapshot>>,
    stats: Arc<KubeStats>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl KubeHandle {
    /// The latest snapshot: empty and not [`Snapshot::synced`] until the
    /// first lists are in.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// A receiver of the snapshots, for another task that reads the cache
    /// (the Istio source) while this handle keeps the cache's lifetime.
    pub fn snapshots(&self) -> channel::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// The task's counters.
    pub fn stats(&self) -> Arc<KubeStats> {
        self.stats.clone()
    }

    /// Stops the watchers and waits for the task to end.
    pub async fn stop(self) {
        let Self { stop, task, .. } = self;
        // The task may have ended already; then there is nothing to stop.
        let _ = stop.send(());
        if let Err(e) = task.await {
            tracing::warn!("the Kubernetes cache task ended abnormally: {e}");
        }
    }
}

/// Where the client comes from; also installs the rustls provider kube's
/// TLS uses (flowtel's is ring).
fn client_source(cfg: &KubernetesConfig) -> anyhow::Result<watch::ClientSource> {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    Ok(match &cfg.kubeconfig {
        Some(path) => watch::ClientSource::File(Box::new(
            Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?,
        )),
        None => watch::ClientSource::Infer,
    })
}

/// Starts the watcher of networking Events about `node`'s pods when the
/// cache is enabled and `kubernetes.network_events` is on; they go into
/// `events` as WARN log events (see `events.rs`). The task ends when the
/// pipeline is gone; abort it to stop it sooner.
pub fn watch_network_events(
    cfg: &KubernetesConfig,
    node: Option<String>,
    events: tokio::sync::mpsc::Sender<crate::flow::SourceEvent>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    if !cfg.is_enabled() || !cfg.network_events {
        return Ok(None);
    }
    let source = client_source(cfg)?;
    let runtime = tokio::runtime::Handle::try_current()
        .context("the Kubernetes Events watcher must be started within a tokio runtime")?;
    Ok(Some(runtime.spawn(events::run(source, node, events))))
}

/// Where the pod address events go: `node`'s pods (every pod's when
/// `None`) into `events`.
pub struct IpEvents {
    pub node: Option<String>,
    pub events: tokio::sync::mpsc::Sender<crate::flow::SourceEvent>,
}

/// Starts the cache when `cfg` enables it (`None` otherwise), reporting its
/// counters to `telemetry`. Must be called within a tokio runtime. Returns
/// at once: the API server is only contacted by the spawned task, and one
/// that cannot be reached is retried, never an error. Only a configured
/// kubeconfig file that cannot be read is.
pub fn start(cfg: &KubernetesConfig, telemetry: &Telemetry) -> anyhow::Result<Option<KubeHandle>> {
    start_with(cfg, telemetry, None)
}

/// [`start`], also sending pod address allocation and release events
/// (`ips.rs`) into `ip_events` when `kubernetes.ip_events` is on.
pub fn start_with(
    cfg: &KubernetesConfig,
    telemetry: &Telemetry,
    ip_events: Option<IpEvents>,
) -> anyhow::Result<Option<KubeHandle>> {
    if !cfg.is_enabled() {
        return Ok(None);
    }
    let source = client_source(cfg)?;
    let runtime = tokio::runtime::Handle::try_current()
        .context("the Kubernetes cache must be started within a tokio runtime")?;
    let mut cache =
        cache::Cache::new(&cfg.pod_labels, cfg.ip_retention).with_max_objects(cfg.max_objects);
    let ips = ip_events.filter(|_| cfg.ip_events).map(|target| {
        cache.watch_ips(target.node.as_deref());
        ips::IpReporter::new(target.events)
    });
    let (publish, snapshots) = channel::channel(Arc::new(Snapshot::default()));
    let stats = Arc::new(KubeStats::new(telemetry));
    let (stop, stopped) = oneshot::channel();
    let task = runtime.spawn(watch::run(
        source,
        cache,
        publish,
        stats.clone(),
        ips,
        stopped,
    ));
    Ok(Some(KubeHandle {
        snapshots,
        stats,
        stop,
        task,
    }))
}
