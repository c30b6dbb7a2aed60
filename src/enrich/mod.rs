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

use crate::flow::{Endpoint, FlowId, Nat};
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

/// What one end of a flow is, as far as flowtel can tell. Fields that do
/// not apply (or that the level leaves out) are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EndName {
    pub namespace: Option<Arc<str>>,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `CronJob`, `Job`,
    /// `ReplicaSet` or `Pod` (a pod nothing owns).
    pub workload_kind: Option<Arc<str>>,
    pub workload: Option<Arc<str>>,
    pub pod: Option<Arc<str>>,
    pub pod_uid: Option<Arc<str>>,
    /// The Service whose address the flow was sent to.
    pub service: Option<Arc<str>>,
    /// The node the pod runs on, or the node itself.
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    /// The named network of an address nothing else names.
    pub network: Option<Arc<str>>,
    /// The pod's labels listed in `kubernetes.pod_labels`.
    pub labels: Box<[(Arc<str>, Arc<str>)]>,
    /// A pod on this node, or this node itself.
    pub local: bool,
}

impl EndName {
    /// Whether a Kubernetes object (pod, Service or node) names this end.
    pub fn is_kubernetes(&self) -> bool {
        self.namespace.is_some() || self.node.is_some()
    }

    /// Whether anything names this end; an unnamed end is keyed by address.
    pub fn is_named(&self) -> bool {
        *self != Self::default()
    }

    /// A short text for the terminal: `ns/workload`, `ns/pod` at pod
    /// level, `ns/svc → ns/workload` behind a Service, `node/NAME`, or
    /// `[network]`.
    pub fn label(&self) -> String {
        let ns = self.namespace.as_deref().unwrap_or("");
        let who = match (&self.pod, &self.workload) {
            (Some(pod), _) => Some(format!("{ns}/{pod}")),
            (None, Some(w)) => Some(format!("{ns}/{w}")),
            (None, None) if !ns.is_empty() => Some(ns.to_string()),
            (None, None) => None,
        };
        match (&self.service, who) {
            (Some(svc), Some(who)) => format!("{ns}/{svc} → {who}"),
            (Some(svc), None) => format!("{ns}/{svc}"),
            (None, Some(who)) => who,
            (None, None) => match (&self.node, &self.network) {
                (Some(node), _) => format!("node/{node}"),
                (None, Some(net)) => format!("[{net}]"),
                (None, None) => "?".into(),
            },
        }
    }
}

/// Which end of a flow is on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    /// The value of the `flowtel.local.role` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// Both ends of one flow, named.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlowNames {
    pub client: Arc<EndName>,
    pub server: Arc<EndName>,
    /// The end on this node; `None` when neither is (routed traffic).
    pub local: Option<Role>,
    /// Named with a synced Kubernetes cache (or without Kubernetes): the
    /// name is final. Otherwise it is tried again at the next report.
    pub settled: bool,
}

/// Names flows. Owned by the task that owns the flow table; the Kubernetes
/// view it reads is an immutable snapshot swapped in once per interval.
#[derive(Debug)]
pub struct Namer {
    networks: NamedNetworks,
    classify_unknown: bool,
    level: Level,
    /// This node's name (`resource.node_name`): its pods are the local end.
    node: Option<Arc<str>>,
    /// `Some` when Kubernetes enrichment is on.
    kube: Option<Arc<Snapshot>>,
}

impl Namer {
    /// `None` when nothing would be named: no Kubernetes and addresses kept.
    pub fn new(
        cfg: &EnrichConfig,
        kubernetes: bool,
        node: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let networks = NamedNetworks::new(&cfg.networks, &cfg.unmatched_network)?;
        let classify_unknown = match cfg.unknown_addresses {
            UnknownAddresses::Auto => kubernetes,
            UnknownAddresses::Network => true,
            UnknownAddresses::Address => false,
        };
        if !classify_unknown && !kubernetes {
            return Ok(None);
        }
        Ok(Some(Self {
            networks,
            classify_unknown,
            level: cfg.level,
            node: node.map(Arc::from),
            kube: kubernetes.then(|| Arc::new(Snapshot::default())),
        }))
    }

    /// Whether ends are looked up in the Kubernetes cache.
    pub fn uses_kubernetes(&self) -> bool {
        self.kube.is_some()
    }

    /// Takes the Kubernetes cache's latest snapshot (once per interval).
    pub fn set_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        if self.kube.is_some() {
            self.kube = Some(snapshot);
        }
    }

    /// Names both ends of `id`. Behind NAT the server is named by the
    /// address the client used (a Service) and by the one that answered
    /// (the pod behind it).
    pub fn name(&self, id: &FlowId, nat: &Nat) -> FlowNames {
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
        FlowNames {
            client: Arc::new(client),
            server: Arc::new(server),
            local,
            settled: self.kube.as_ref().is_none_or(|k| k.synced()),
        }
    }

    /// One end, from the address the flow was sent to (or from) and the one
    /// that really answered (the same without NAT).
    fn name_end(&self, addressed: Endpoint, actual: Endpoint, at: SystemTime) -> EndName {
        let kube = self.kube.as_deref();
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
