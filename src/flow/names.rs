//! What the two ends of a flow are called: the model the enrichment stage
//! fills in and the exporters read. The naming itself is behind [`Naming`],
//! so the flow stage can ask for names without knowing where they come
//! from (`crate::enrich` implements it).

use std::sync::Arc;

use super::model::{FlowId, Nat};

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

/// Names flows for the flow stage. Owned by the task that owns the flow
/// table, so it needs no locks.
pub trait Naming: Send {
    /// Names both ends of `id` (behind NAT, the server both by the address
    /// the client used and by the one that answered).
    fn name(&self, id: &FlowId, nat: &Nat) -> FlowNames;

    /// Takes in what changed since the last interval (a newer view of the
    /// cluster); called at the start of each interval.
    fn refresh(&mut self);
}

/// Names the pod a source's record is about by its namespace and name (a
/// CNI plugin execution knows only those, from `CNI_ARGS`), for sources,
/// which cannot import the enrichment stage. `crate::enrich` implements it
/// from the Kubernetes cache; `src/pipeline.rs` hands it to the sources.
pub trait PodNaming: Send + Sync {
    /// The pod with its workload (kind and name), uid, node and labels, as
    /// the cache knows it now; `None` when it does not (yet).
    fn pod(&self, namespace: &str, name: &str) -> Option<Arc<EndName>>;
}
