//! Naming both ends of a flow: Kubernetes objects first, then named networks
//! for every address no object claims.
//!
//! A flow is named once, when the flow table first sees it, and keeps that
//! name for its life: a connection belongs to the pod that held the address
//! when it started, even if the address passes to another pod later. Flows
//! seen before the Kubernetes cache finished its first sync are named again
//! until it has.

pub mod cidr;
pub mod kubernetes;

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::component::ConfigError;
use crate::flow::mesh::{MeshRole, ProxyTarget};
use crate::flow::names::{EndName, FlowNames, Naming, PodNaming, Role};
use crate::flow::{Endpoint, FlowId, Nat};
use crate::telemetry::{catalogue, Counter, Telemetry};
use cidr::{NamedNetworks, NetworkConfig};
use kubernetes::{Peer, PodInfo, Snapshot};

/// How finely a Kubernetes end is named: the default, `workload`, keeps
/// series stable while pods come and go.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pod,
    #[default]
    Workload,
    Namespace,
}

/// What an address no Kubernetes object claims becomes.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownAddresses {
    /// `network` when Kubernetes enrichment is on, `address` otherwise: on a
    /// plain host the addresses are what the user wants to see.
    #[default]
    Auto,
    /// The name of its network (`enrich.networks`), never the address.
    Network,
    /// The address itself.
    Address,
}

/// The `enrich` section of the configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EnrichConfig {
    pub level: Level,
    pub unknown_addresses: UnknownAddresses,
    /// Named networks, most specific prefix first whatever their order.
    pub networks: Vec<NetworkConfig>,
    /// The network name of addresses in none of `networks`.
    pub unmatched_network: String,
}

impl EnrichConfig {
    /// Checks the named networks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        NamedNetworks::new(&self.networks, &self.unmatched_network)
            .map(|_| ())
            .map_err(|e| ConfigError::new("networks", e))
    }
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            level: Level::Workload,
            unknown_addresses: UnknownAddresses::Auto,
            networks: cidr::default_networks(),
            unmatched_network: cidr::DEFAULT_UNMATCHED.into(),
        }
    }
}

/// The Kubernetes view the namer reads, and how many ends it could name.
#[derive(Debug)]
struct Kube {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The snapshot in use: swapped in once per interval.
    current: Arc<Snapshot>,
    named: Counter,
    unknown: Counter,
}

/// Names flows. Owned by the flow stage's task; the Kubernetes view it
/// reads is an immutable snapshot swapped in once per interval.
#[derive(Debug)]
pub struct Namer {
    networks: NamedNetworks,
    classify_unknown: bool,
    level: Level,
    /// This node's name (`resource.node_name`): its pods are the local end.
    node: Option<Arc<str>>,
    /// `Some` when Kubernetes enrichment is on.
    kube: Option<Kube>,
}

impl Namer {
    /// `None` when nothing would be named: no Kubernetes and addresses
    /// kept. `kube` is the cache's snapshots when enrichment is on.
    pub fn new(
        cfg: &EnrichConfig,
        kube: Option<watch::Receiver<Arc<Snapshot>>>,
        node: Option<&str>,
        telemetry: &Telemetry,
    ) -> Result<Option<Self>, ConfigError> {
        let networks = NamedNetworks::new(&cfg.networks, &cfg.unmatched_network)
            .map_err(|e| ConfigError::new("enrich.networks", e))?;
        let classify_unknown = match cfg.unknown_addresses {
            UnknownAddresses::Auto => kube.is_some(),
            UnknownAddresses::Network => true,
            UnknownAddresses::Address => false,
        };
        if !classify_unknown && kube.is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            networks,
            classify_unknown,
            level: cfg.level,
            node: node.map(Arc::from),
            kube: kube.map(|snapshots| {
                let current = Arc::clone(&snapshots.borrow());
                Kube {
                    current,
                    snapshots,
                    named: telemetry.counter(&catalogue::K8S_ENDS_NAMED),
                    unknown: telemetry.counter(&catalogue::K8S_ENDS_UNKNOWN),
                }
            }),
        }))
    }

    fn snapshot(&self) -> Option<&Snapshot> {
        self.kube.as_ref().map(|k| &*k.current)
    }

    /// Names both ends of `id`. Behind NAT the server is named by the
    /// address the client used (a Service) and by the one that answered
    /// (the pod behind it).
    fn name_flow(&self, id: &FlowId, nat: &Nat) -> FlowNames {
        let at = SystemTime::now();
        let client = self.name_end(id.client, id.client, at);
        let server = self.name_end(id.server, nat.server.unwrap_or(id.server), at);
        let local = if client.local {
            Some(Role::Client)
        } else if server.local {
            Some(Role::Server)
        } else {
            None
        };
        if let Some(k) = &self.kube {
            for end in [&client, &server] {
                if end.is_kubernetes() {
                    k.named.inc();
                } else {
                    k.unknown.inc();
                }
            }
        }
        FlowNames {
            client: Arc::new(client),
            server: Arc::new(server),
            local,
            settled: self.snapshot().is_none_or(Snapshot::synced),
        }
    }

    /// One end, from the address the flow was sent to (or from) and the one
    /// that really answered (the same without NAT).
    fn name_end(&self, addressed: Endpoint, actual: Endpoint, at: SystemTime) -> EndName {
        let kube = self.snapshot();
        let lookup = |e: Endpoint| kube.and_then(|k| k.lookup(e.ip, Some(e.port), at));
        let addressed_peer = lookup(addressed);
        let actual_peer = if actual == addressed {
            addressed_peer.clone()
        } else {
            lookup(actual)
        };
        let mut end = match (&addressed_peer, actual_peer) {
            (Some(Peer::Service(svc)), Some(Peer::Pod(pod))) => {
                let mut end = self.pod_end(&pod);
                end.service = Some(svc.name.clone());
                end
            }
            (Some(Peer::Service(svc)), _) => EndName {
                namespace: Some(svc.namespace.clone()),
                service: Some(svc.name.clone()),
                ..EndName::default()
            },
            (_, Some(Peer::Pod(pod))) => self.pod_end(&pod),
            (_, Some(Peer::Node(node))) => EndName {
                local: self.node.as_deref() == Some(&*node.name),
                node: Some(node.name.clone()),
                zone: node.zone.clone(),
                ..EndName::default()
            },
            (_, Some(Peer::Service(svc))) => EndName {
                namespace: Some(svc.namespace.clone()),
                service: Some(svc.name.clone()),
                ..EndName::default()
            },
            (_, None) => EndName::default(),
        };
        if !end.is_named() && self.classify_unknown {
            end.network = Some(self.networks.classify(actual.ip).clone());
        }
        end
    }

    /// A pod end at the configured level. The node is left out: a
    /// workload's pods run on many nodes, and the local pods' node is the
    /// resource's `k8s.node.name` already.
    fn pod_end(&self, pod: &PodInfo) -> EndName {
        let pod_level = self.level == Level::Pod;
        let workload_level = self.level != Level::Namespace;
        EndName {
            namespace: Some(pod.namespace.clone()),
            workload_kind: workload_level.then(|| Arc::from(pod.workload.kind.as_str())),
            workload: workload_level.then(|| pod.workload.name.clone()),
            pod: pod_level.then(|| pod.name.clone()),
            pod_uid: pod_level.then(|| pod.uid.clone()),
            zone: pod.zone.clone(),
            labels: if workload_level {
                pod.labels.clone()
            } else {
                Box::default()
            },
            local: self.node.is_some() && pod.node == self.node,
            ..EndName::default()
        }
    }
}

impl Naming for Namer {
    fn name(&self, id: &FlowId, nat: &Nat) -> FlowNames {
        self.name_flow(id, nat)
    }

    fn refresh(&mut self) {
        if let Some(k) = &mut self.kube {
            k.current = k.snapshots.borrow().clone();
        }
    }
}

/// Names pods for the sources ([`PodNaming`]: the CNI source's plugin
/// executions) from the cache's latest snapshot, down to the pod whatever
/// `enrich.level`: a record is about one pod.
#[derive(Debug)]
pub struct PodNamer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl PodNamer {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Self { snapshots }
    }
}

impl PodNaming for PodNamer {
    fn pod(&self, namespace: &str, name: &str) -> Option<Arc<EndName>> {
        // Held only for the clone: the cache task never waits on readers.
        let snapshot = Arc::clone(&self.snapshots.borrow());
        let pod = snapshot.pod(namespace, name)?;
        Some(Arc::new(EndName {
            namespace: Some(pod.namespace.clone()),
            workload_kind: Some(Arc::from(pod.workload.kind.as_str())),
            workload: Some(pod.workload.name.clone()),
            pod: Some(pod.name.clone()),
            pod_uid: Some(pod.uid.clone()),
            node: pod.node.clone(),
            zone: pod.zone.clone(),
            labels: pod.labels.clone(),
            ..EndName::default()
        }))
    }
}

/// The Istio proxies of `node`'s pods in `snapshot`, each pod named down to
/// the pod whatever `enrich.level`: two replicas report series with the
/// same Istio labels.
pub fn proxy_targets(snapshot: &Snapshot, node: Option<&str>) -> Vec<ProxyTarget> {
    snapshot
        .mesh_pods(node)
        .into_iter()
        .filter_map(|(ip, pod)| {
            let mesh = pod.mesh.as_ref()?;
            if mesh.role == MeshRole::IstioAmbient {
                return None;
            }
            Some(ProxyTarget {
                pod: Arc::new(EndName {
                    namespace: Some(pod.namespace.clone()),
                    workload_kind: Some(Arc::from(pod.workload.kind.as_str())),
                    workload: Some(pod.workload.name.clone()),
                    pod: Some(pod.name.clone()),
                    pod_uid: Some(pod.uid.clone()),
                    node: pod.node.clone(),
                    ..EndName::default()
                }),
                ip,
                role: mesh.role,
                port: mesh.port,
                path: mesh.path.clone(),
            })
        })
        .collect()
}
