//! What flowtel keeps of each Kubernetes object: only what names a flow end.
//! Shared strings (namespaces, nodes, workloads, label keys and values) are
//! interned, so ten thousand pods of one Deployment hold its name once.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::flow::mesh::MeshRole;

/// The kind of workload that runs a pod, found through `ownerReferences`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Deployment,
    /// A ReplicaSet that no Deployment controls.
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    /// A Job that no CronJob controls.
    Job,
    CronJob,
    /// A pod that no controller owns is its own workload.
    Pod,
    /// Any other controller (an operator's custom resource, for example),
    /// named by its `kind`.
    Other(Arc<str>),
}

impl WorkloadKind {
    /// The Kubernetes `kind` as written in manifests.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Deployment => "Deployment",
            Self::ReplicaSet => "ReplicaSet",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
            Self::Pod => "Pod",
            Self::Other(kind) => kind,
        }
    }

    /// The kind named by an owner reference; `Pod` is never an owner.
    pub(crate) fn from_owner_kind(kind: &Arc<str>) -> Self {
        match &**kind {
            "Deployment" => Self::Deployment,
            "ReplicaSet" => Self::ReplicaSet,
            "StatefulSet" => Self::StatefulSet,
            "DaemonSet" => Self::DaemonSet,
            "Job" => Self::Job,
            "CronJob" => Self::CronJob,
            _ => Self::Other(kind.clone()),
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The workload a pod belongs to: what users name in dashboards.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: Arc<str>,
}

/// A pod, as far as naming a flow end needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// `spec.nodeName`; `None` until the pod is scheduled.
    pub node: Option<Arc<str>>,
    pub workload: Workload,
    /// The configured `pod_labels` the pod has, in configuration order.
    pub labels: Box<[(Arc<str>, Arc<str>)]>,
    /// The pod shares its node's network namespace and addresses.
    pub host_network: bool,
    /// `topology.kubernetes.io/zone` of the pod's node.
    pub zone: Option<Arc<str>>,
    /// `topology.kubernetes.io/region` of the pod's node.
    pub region: Option<Arc<str>>,
    /// How the pod takes part in an Istio mesh, for scraping its proxy;
    /// `None` for the (many) pods outside a mesh, which cost nothing more.
    pub mesh: Option<Arc<PodMesh>>,
}

/// What the Istio source needs of a meshed pod: its role, and the scrape
/// port and path its `prometheus.io/*` annotations set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMesh {
    pub role: MeshRole,
    pub port: Option<u16>,
    pub path: Option<Arc<str>>,
}

impl PodInfo {
    /// The value of one of the configured labels.
    pub fn label(&self, key: &str) -> Option<&Arc<str>> {
        self.labels
            .iter()
            .find_map(|(k, v)| (&**k == key).then_some(v))
    }
}

/// The transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Required by Kubernetes only when a Service has several ports.
    pub name: Option<Arc<str>>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A Service: what a flow to a ClusterIP was sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// `spec.clusterIPs` (one per IP family); empty for headless and
    /// ExternalName Services.
    pub cluster_ips: Box<[IpAddr]>,
    pub ports: Box<[ServicePort]>,
}

/// A node: the other end of flows to kubelets, host-network pods and
/// anything outside the pod network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: Arc<str>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<Arc<str>>,
    /// `topology.kubernetes.io/region`.
    pub region: Option<Arc<str>>,
    /// Its `InternalIP` and `ExternalIP` addresses.
    pub addresses: Box<[IpAddr]>,
}

/// What owns an address at a given time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Pod(Arc<PodInfo>),
    Service(Arc<ServiceInfo>),
    Node(Arc<NodeInfo>),
}

/// The container Istio injects, and ztunnel's own container name.
const ISTIO_PROXY: &str = "istio-proxy";

/// Tells a pod's mesh role from its container names (init containers
/// included, since native sidecars are init containers), annotations and
/// labels: the annotations `sidecar.istio.io/status` and
/// `ambient.istio.io/redirection`, and the `app` label.
pub fn mesh_of(
    containers: &[&str],
    annotations: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> Option<MeshRole> {
    let annotation = |key: &str| annotations.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let has_proxy = containers.contains(&ISTIO_PROXY);
    if has_proxy && labels.contains(&("app", "ztunnel")) {
        Some(MeshRole::IstioZtunnel)
    } else if has_proxy && annotation("sidecar.istio.io/status").is_some() {
        Some(MeshRole::IstioSidecar)
    } else if annotation("ambient.istio.io/redirection") == Some("enabled") {
        Some(MeshRole::IstioAmbient)
    } else {
        None
    }
}
