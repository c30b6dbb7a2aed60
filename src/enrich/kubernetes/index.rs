//! Who held an IP address when: the per-address history behind
//! [`Snapshot::lookup`].
//!
//! # When a claim starts and ends
//!
//! Every address keeps a short list of claims, each `[from, until)`.
//!
//! * A claim **ends** when flowtel sees its holder let the address go: the
//!   object deleted, a pod finished (`Succeeded`/`Failed` pods keep their
//!   `podIP` in the API but the address is free), or a re-list without it.
//!   The ended claim stays for `ip_retention`, then is forgotten.
//! * A claim **starts** when the previous holder's claim ended. If flowtel
//!   knows of no previous holder, it starts at the beginning of time.
//!   Kubernetes timestamps (`creationTimestamp`, `status.startTime`) are
//!   deliberately not used: they come from the API server's clock, flows are
//!   timed by the node's, and a pod gets its address some unknown time after
//!   both. Only the order of consecutive holders matters, and flowtel sees
//!   that itself.
//! * If a new holder shows up while the previous claim is still open (its
//!   deletion was not seen yet), the previous claim ends, and the new one
//!   starts, at the moment flowtel sees the newcomer.
//!
//! Host-network pods do not take their node's address from the node: they
//! add claims naming the ports they listen on, which win only when a flow's
//! port is one of them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::intern::Map;
use super::model::{NodeInfo, Peer, PodInfo, ServiceInfo};

/// What claims an address.
#[derive(Debug, Clone)]
pub(crate) enum Holder {
    Pod(Arc<PodInfo>),
    /// A host-network pod: the address is its node's; the pod owns only
    /// the ports it lists (`containerPort`/`hostPort`, sorted).
    HostPod {
        pod: Arc<PodInfo>,
        ports: Arc<[u16]>,
    },
    Service(Arc<ServiceInfo>),
    Node(Arc<NodeInfo>),
}

impl Holder {
    /// The same object (a later version of it, possibly).
    fn same_object(&self, other: &Holder) -> bool {
        match (self, other) {
            (
                Self::Pod(a) | Self::HostPod { pod: a, .. },
                Self::Pod(b) | Self::HostPod { pod: b, .. },
            ) => a.uid == b.uid,
            (Self::Service(a), Self::Service(b)) => a.namespace == b.namespace && a.name == b.name,
            (Self::Node(a), Self::Node(b)) => a.name == b.name,
            _ => false,
        }
    }

    /// Whether the two cannot hold the address at once: two ordinary
    /// holders, or two host-network pods listening on a common port.
    fn excludes(&self, other: &Holder) -> bool {
        match (self, other) {
            (Self::HostPod { ports: a, .. }, Self::HostPod { ports: b, .. }) => {
                a.iter().any(|p| b.binary_search(p).is_ok())
            }
            (Self::HostPod { .. }, _) | (_, Self::HostPod { .. }) => false,
            _ => true,
        }
    }

    fn peer(&self) -> Peer {
        match self {
            Self::Pod(p) | Self::HostPod { pod: p, .. } => Peer::Pod(p.clone()),
            Self::Service(s) => Peer::Service(s.clone()),
            Self::Node(n) => Peer::Node(n.clone()),
        }
    }
}

/// One holder's time with an address.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub from: SystemTime,
    /// `None` while the holder still has the address.
    pub until: Option<SystemTime>,
    pub holder: Holder,
}

impl Claim {
    fn covers(&self, at: SystemTime) -> bool {
        self.from <= at && self.until.is_none_or(|until| at < until)
    }
}

/// An address's claims, shared between the cache and its snapshots. Most
/// addresses have had one holder: that claim is kept inline, which saves a
/// memory access on every lookup.
#[derive(Debug, Clone)]
pub(crate) enum History {
    One(Claim),
    Many(Arc<[Claim]>),
}

impl History {
    pub(crate) fn claims(&self) -> &[Claim] {
        match self {
            Self::One(claim) => std::slice::from_ref(claim),
            Self::Many(claims) => claims,
        }
    }
}

impl From<Vec<Claim>> for History {
    fn from(mut claims: Vec<Claim>) -> Self {
        match claims.pop() {
            Some(only) if claims.is_empty() => Self::One(only),
            Some(last) => {
                claims.push(last);
                Self::Many(claims.into())
            }
            None => Self::Many(Arc::from([])),
        }
    }
}

/// Adds `holder`'s claim at `now`, or refreshes it (a newer version of the
/// object) if it already has an open one.
pub(crate) fn claim(history: &mut Vec<Claim>, holder: Holder, now: SystemTime) {
    if let Some(open) = history
        .iter_mut()
        .find(|c| c.until.is_none() && c.holder.same_object(&holder))
    {
        open.holder = holder;
        return;
    }
    // A claim that ended and comes back (a pod re-listed after being
    // dropped) starts over.
    history.retain(|c| !c.holder.same_object(&holder));
    let mut from = UNIX_EPOCH;
    let host = matches!(holder, Holder::HostPod { .. });
    for other in history.iter_mut().filter(|c| c.holder.excludes(&holder)) {
        match other.until {
            Some(until) => from = from.max(until),
            None => {
                // Two host-network pods may both exist while one of them
                // stops; only ordinary holders push each other out.
                if !host {
                    other.until = Some(now);
                }
                from = from.max(now);
            }
        }
    }
    history.push(Claim {
        from,
        until: None,
        holder,
    });
}

/// Ends the open claim of the object `holder` is a version of.
pub(crate) fn release(history: &mut [Claim], holder: &Holder, now: SystemTime) -> bool {
    match history
        .iter_mut()
        .find(|c| c.until.is_none() && c.holder.same_object(holder))
    {
        Some(open) => {
            open.until = Some(now);
            true
        }
        None => false,
    }
}

/// Forgets claims that ended before `cutoff`. A claim left with no earlier
/// rival is then the first known holder and reaches back to the beginning
/// of time. Returns whether anything was forgotten.
pub(crate) fn prune(history: &mut Vec<Claim>, cutoff: SystemTime) -> bool {
    let before = history.len();
    history.retain(|c| c.until.is_none_or(|until| until >= cutoff));
    if history.len() == before {
        return false;
    }
    for i in 0..history.len() {
        let first = !history.iter().enumerate().any(|(j, other)| {
            j != i && other.holder.excludes(&history[i].holder) && other.from < history[i].from
        });
        if first {
            history[i].from = UNIX_EPOCH;
        }
    }
    true
}

/// The earliest end among ended claims, for scheduling [`prune`].
pub(crate) fn earliest_end(history: &[Claim]) -> Option<SystemTime> {
    history.iter().filter_map(|c| c.until).min()
}

/// Object counts, for logs and self-telemetry. Deleted objects whose
/// addresses are still retained are not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Finished pods included: they are still objects.
    pub pods: usize,
    pub services: usize,
    pub endpoint_slices: usize,
    pub nodes: usize,
    /// Known by their metadata only.
    pub replicasets: usize,
    /// Known by their metadata only.
    pub jobs: usize,
}

/// Pods by namespace, then name.
pub(crate) type PodsByName = Map<Arc<str>, Map<Arc<str>, Arc<PodInfo>>>;

/// An immutable view of the cluster, published by the cache task. Readers
/// hold an `Arc` to it and never lock or wait for the cache.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub(crate) addresses: Map<IpAddr, History>,
    pub(crate) nodes: Arc<Map<Arc<str>, Arc<NodeInfo>>>,
    pub(crate) backends: Arc<Map<IpAddr, Box<[Arc<ServiceInfo>]>>>,
    /// Every pod by namespace, then name.
    pub(crate) pods: Arc<PodsByName>,
    pub(crate) counts: Counts,
    pub(crate) synced: bool,
}

impl Snapshot {
    /// What owned `ip` at time `at` (when the flow was seen, by this
    /// node's clock), with `port` the flow's port on that side (it picks a
    /// host-network pod out of its node's address).
    ///
    /// Service ClusterIPs name the Service, pod IPs the pod, node
    /// `InternalIP`/`ExternalIP` the node. An address shared by a node and
    /// its host-network pods is the node, unless `port` is one a
    /// host-network pod there declares.
    /// The pods that still hold an address and carry an Istio role, on
    /// `node` when given, one address each: the Istio source's targets.
    pub fn mesh_pods(&self, node: Option<&str>) -> Vec<(IpAddr, Arc<PodInfo>)> {
        let mut out: Vec<(IpAddr, Arc<PodInfo>)> = self
            .addresses
            .iter()
            .flat_map(|(ip, history)| history.claims().iter().map(move |c| (*ip, c)))
            .filter(|(_, c)| c.until.is_none())
            .filter_map(|(ip, c)| match &c.holder {
                Holder::Pod(pod) | Holder::HostPod { pod, .. } => Some((ip, pod)),
                _ => None,
            })
            .filter(|(_, pod)| pod.mesh.is_some())
            .filter(|(_, pod)| node.is_none_or(|n| pod.node.as_deref() == Some(n)))
            .map(|(ip, pod)| (ip, Arc::clone(pod)))
            .collect();
        // One target per pod (a dual-stack pod has two addresses), in a
        // stable order.
        out.sort_by(|a, b| (&a.1.uid, a.0).cmp(&(&b.1.uid, b.0)));
        out.dedup_by(|a, b| a.1.uid == b.1.uid);
        out
    }

    pub fn lookup(&self, ip: IpAddr, port: Option<u16>, at: SystemTime) -> Option<Peer> {
        let history = self.addresses.get(&ip)?;
        let mut host_port: Option<&Claim> = None;
        let mut host_any: Option<&Claim> = None;
        let mut ordinary: Option<&Claim> = None;
        let latest = |best: Option<&Claim>, c: &'_ Claim| best.is_none_or(|b| c.from > b.from);
        for c in history.claims().iter().filter(|c| c.covers(at)) {
            match &c.holder {
                Holder::HostPod { ports, .. } => {
                    if port.is_some_and(|p| ports.binary_search(&p).is_ok()) && latest(host_port, c)
                    {
                        host_port = Some(c);
                    }
                    if latest(host_any, c) {
                        host_any = Some(c);
                    }
                }
                _ => {
                    if latest(ordinary, c) {
                        ordinary = Some(c);
                    }
                }
            }
        }
        if let Some(c) = host_port.or(ordinary) {
            return Some(c.holder.peer());
        }
        // A host-network pod's address that its node does not list (or a
        // node not known yet): the address is still the node's.
        match &host_any?.holder {
            Holder::HostPod { pod, .. } => {
                let node = self.nodes.get(pod.node.as_deref()?)?;
                Some(Peer::Node(node.clone()))
            }
            _ => None,
        }
    }

    /// The Services whose EndpointSlices list `ip` as a backend, so a flow
    /// that reached a pod can also name the Service it came through.
    pub fn services_backed_by(&self, ip: IpAddr) -> &[Arc<ServiceInfo>] {
        self.backends
            .get(&ip)
            .map_or(&[][..], |services| &services[..])
    }

    /// The pod `namespace/name` (finished pods included), e.g. the pod a
    /// CNI plugin execution names in `CNI_ARGS`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<PodInfo>> {
        self.pods.get(namespace)?.get(name)
    }

    /// A node by name, e.g. this flowtel's own node.
    pub fn node(&self, name: &str) -> Option<&Arc<NodeInfo>> {
        self.nodes.get(name)
    }

    /// How many objects of each kind the cache holds.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Whether every watched kind has been listed completely at least once.
    /// Until then a miss may only mean "not listed yet".
    pub fn synced(&self) -> bool {
        self.synced
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::model::{Workload, WorkloadKind};
    use super::*;

    fn pod(uid: &str, node: &str) -> Arc<PodInfo> {
        Arc::new(PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            node: Some(node.into()),
            workload: Workload {
                kind: WorkloadKind::Pod,
                name: uid.into(),
            },
            labels: Box::new([]),
            host_network: false,
            zone: None,
            region: None,
            mesh: None,
        })
    }

    fn node(name: &str) -> Arc<NodeInfo> {
        Arc::new(NodeInfo {
            name: name.into(),
            zone: None,
            region: None,
            addresses: Box::new([]),
        })
    }

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn snapshot(ip: IpAddr, history: Vec<Claim>, nodes: &[Arc<NodeInfo>]) -> Snapshot {
        Snapshot {
            addresses: [(ip, History::from(history))].into_iter().collect(),
            nodes: Arc::new(nodes.iter().map(|n| (n.name.clone(), n.clone())).collect()),
            ..Snapshot::default()
        }
    }

    fn pod_name(peer: Option<Peer>) -> Option<String> {
        match peer {
            Some(Peer::Pod(p)) => Some(p.name.to_string()),
            _ => None,
        }
    }

    #[test]
    fn reused_address_is_named_by_time() {
        let ip: IpAddr = "10.1.0.7".parse().expect("literal");
        let mut h = Vec::new();
        claim(&mut h, Holder::Pod(pod("old", "n1")), t(0));
        assert!(release(&mut h, &Holder::Pod(pod("old", "n1")), t(100)));
        claim(&mut h, Holder::Pod(pod("new", "n1")), t(130));
        let snap = snapshot(ip, h.clone(), &[]);
        // Before flowtel saw "old", "old" is the first known holder.
        assert_eq!(
            pod_name(snap.lookup(ip, None, t(0) - Duration::from_secs(5))).as_deref(),
            Some("old")
        );
        assert_eq!(
            pod_name(snap.lookup(ip, None, t(99))).as_deref(),
            Some("old")
        );
        // From the release on, the address is the next holder's.
        assert_eq!(
            pod_name(snap.lookup(ip, None, t(100))).as_deref(),
            Some("new")
        );
        assert_eq!(
            pod_name(snap.lookup(ip, None, t(500))).as_deref(),
            Some("new")
        );

        // After the retention, "old" is forgotten and "new" reaches back.
        assert!(prune(&mut h, t(101)));
        assert_eq!(h.len(), 1);
        let snap = snapshot(ip, h, &[]);
        assert_eq!(
            pod_name(snap.lookup(ip, None, t(50))).as_deref(),
            Some("new")
        );
    }

    #[test]
    fn a_newcomer_ends_a_claim_whose_end_was_missed() {
        let ip: IpAddr = "10.1.0.8".parse().expect("literal");
        let mut h = Vec::new();
        claim(&mut h, Holder::Pod(pod("old", "n1")), t(0));
        claim(&mut h, Holder::Pod(pod("new", "n1")), t(50));
        // The late deletion changes nothing.
        assert!(!release(&mut h, &Holder::Pod(pod("old", "n1")), t(60)));
        let snap = snapshot(ip, h, &[]);
        assert_eq!(
            pod_name(snap.lookup(ip, None, t(49))).as_deref(),
            Some("old")
        );
        assert_eq!(
            pod_name(snap.lookup(ip, None, t(50))).as_deref(),
            Some("new")
        );
    }

    #[test]
    fn refreshing_keeps_the_start_and_takes_the_new_version() {
        let ip: IpAddr = "10.1.0.9".parse().expect("literal");
        let mut h = Vec::new();
        claim(&mut h, Holder::Pod(pod("a", "n1")), t(0));
        claim(&mut h, Holder::Pod(pod("a", "n2")), t(10));
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].from, UNIX_EPOCH);
        let snap = snapshot(ip, h, &[]);
        match snap.lookup(ip, None, t(5)) {
            Some(Peer::Pod(p)) => assert_eq!(p.node.as_deref(), Some("n2")),
            other => panic!("expected the pod, got {other:?}"),
        }
    }

    #[test]
    fn host_network_pods_own_only_their_ports() {
        let ip: IpAddr = "192.168.10.4".parse().expect("literal");
        let n1 = node("n1");
        let exporter = Holder::HostPod {
            pod: pod("exporter", "n1"),
            ports: Arc::from([9100]),
        };
        let proxy = Holder::HostPod {
            pod: pod("proxy", "n1"),
            ports: Arc::from([80, 443]),
        };
        let mut h = Vec::new();
        claim(&mut h, Holder::Node(n1.clone()), t(0));
        claim(&mut h, exporter, t(1));
        claim(&mut h, proxy, t(2));
        let snap = snapshot(ip, h, std::slice::from_ref(&n1));
        let now = t(10);
        assert_eq!(
            pod_name(snap.lookup(ip, Some(9100), now)).as_deref(),
            Some("exporter")
        );
        assert_eq!(
            pod_name(snap.lookup(ip, Some(443), now)).as_deref(),
            Some("proxy")
        );
        assert_eq!(snap.lookup(ip, Some(22), now), Some(Peer::Node(n1.clone())));
        assert_eq!(snap.lookup(ip, None, now), Some(Peer::Node(n1.clone())));

        // Without the node claiming the address, the pod's node still names it.
        let mut h = Vec::new();
        claim(
            &mut h,
            Holder::HostPod {
                pod: pod("exporter", "n1"),
                ports: Arc::from([9100]),
            },
            t(1),
        );
        let snap = snapshot(ip, h.clone(), std::slice::from_ref(&n1));
        assert_eq!(snap.lookup(ip, Some(22), now), Some(Peer::Node(n1)));
        let unknown_node = snapshot(ip, h, &[]);
        assert_eq!(unknown_node.lookup(ip, Some(22), now), None);
        assert_eq!(
            pod_name(unknown_node.lookup(ip, Some(9100), now)).as_deref(),
            Some("exporter")
        );
    }

    #[test]
    fn a_host_network_pod_replaced_on_the_same_port() {
        let ip: IpAddr = "192.168.10.5".parse().expect("literal");
        let old = Holder::HostPod {
            pod: pod("old", "n1"),
            ports: Arc::from([9100]),
        };
        let mut h = Vec::new();
        claim(&mut h, old.clone(), t(0));
        claim(
            &mut h,
            Holder::HostPod {
                pod: pod("new", "n1"),
                ports: Arc::from([9100]),
            },
            t(20),
        );
        assert!(release(&mut h, &old, t(30)));
        let snap = snapshot(ip, h, &[]);
        assert_eq!(
            pod_name(snap.lookup(ip, Some(9100), t(10))).as_deref(),
            Some("old")
        );
        assert_eq!(
            pod_name(snap.lookup(ip, Some(9100), t(25))).as_deref(),
            Some("new")
        );
        assert_eq!(
            pod_name(snap.lookup(ip, Some(9100), t(40))).as_deref(),
            Some("new")
        );
    }

    #[test]
    fn unknown_addresses_miss() {
        let snap = Snapshot::default();
        assert_eq!(
            snap.lookup("10.9.9.9".parse().expect("literal"), None, t(0)),
            None
        );
        assert!(snap
            .services_backed_by("10.9.9.9".parse().expect("literal"))
            .is_empty());
        assert!(snap.node("n1").is_none());
        assert!(!snap.synced());
    }
}
