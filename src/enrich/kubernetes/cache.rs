//! The mutable cache: compact records of the watched objects and the
//! per-address history, owned by one task, published as [`Snapshot`]s.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::convert::{self, Malformed, PodParts, SliceParts};
use super::index::{self, Claim, Counts, History, Holder, PodsByName, Snapshot};
use super::intern::{Interner, Map, Set};
use super::ips::{seconds_between, IpChange, IpChangeKind};
use super::model::{NodeInfo, PodInfo, ServiceInfo};
use super::owners::{Controller, OwnerRecord, Owners};

/// The watched kinds of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Pod,
    Service,
    EndpointSlice,
    Node,
    ReplicaSet,
    Job,
}

impl Kind {
    #[cfg(test)]
    pub(crate) const ALL: [Kind; 6] = [
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ReplicaSet,
        Kind::Job,
    ];

    /// Its position in [`Kind::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The resource name, as in RBAC rules and API paths.
    pub(crate) fn resource(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::ReplicaSet => "replicasets",
            Kind::Job => "jobs",
        }
    }
}

/// One object from a watch event. ReplicaSets and Jobs are watched for
/// their metadata only.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    ReplicaSet(Box<ObjectMeta>),
    Job(Box<ObjectMeta>),
}

impl Object {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
            Object::ReplicaSet(_) => Kind::ReplicaSet,
            Object::Job(_) => Kind::Job,
        }
    }
}

#[derive(Debug)]
struct PodRecord {
    info: Arc<PodInfo>,
    controller: Option<Controller>,
    ips: Box<[IpAddr]>,
    /// `Some` for host-network pods only.
    ports: Option<Arc<[u16]>>,
    running: bool,
    generation: u64,
    /// `PodScheduled` and `PodReadyToStartContainers`, when `True`.
    scheduled: Option<SystemTime>,
    network_ready: Option<SystemTime>,
}

impl PodRecord {
    /// The addresses the pod holds: none once it has finished.
    fn held(&self) -> &[IpAddr] {
        if self.running {
            &self.ips
        } else {
            &[]
        }
    }

    fn holder(&self) -> Holder {
        match &self.ports {
            Some(ports) => Holder::HostPod {
                pod: self.info.clone(),
                ports: ports.clone(),
            },
            None => Holder::Pod(self.info.clone()),
        }
    }
}

#[derive(Debug)]
struct ServiceRecord {
    info: Arc<ServiceInfo>,
    generation: u64,
}

#[derive(Debug)]
struct NodeRecord {
    info: Arc<NodeInfo>,
    generation: u64,
}

#[derive(Debug)]
struct SliceRecord {
    parts: SliceParts,
    generation: u64,
}

/// The progress of one kind's lists.
#[derive(Debug, Default, Clone, Copy)]
struct ListState {
    /// Bumped at each (re-)list; records not seen by the current one are
    /// gone when it completes.
    generation: u64,
    /// A complete list has been seen at least once.
    synced: bool,
}

/// What [`Cache::apply`] did with a well-formed object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// Taken in (or already known and updated).
    Taken,
    /// Not taken in: the object is new and the cache holds
    /// `max_objects` objects already.
    Shed,
}

/// What [`Cache::end_list`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListEnd {
    /// The kind's first complete list.
    First,
    /// A later one (after a 410 Gone or a restart).
    Again,
}

/// The cache. Every method takes `now`, the wall-clock time the change was
/// seen, which is what claims are timed with.
#[derive(Debug)]
pub(crate) struct Cache {
    labels: Box<[Arc<str>]>,
    retention: Duration,
    /// The most objects of all kinds together the cache holds.
    max_objects: usize,
    strings: Interner,
    pods: Map<Arc<str>, PodRecord>,
    services: Map<Arc<str>, ServiceRecord>,
    slices: Map<Arc<str>, SliceRecord>,
    nodes: Map<Arc<str>, NodeRecord>,
    replicasets: Map<Arc<str>, OwnerRecord>,
    jobs: Map<Arc<str>, OwnerRecord>,
    addresses: Map<IpAddr, History>,
    /// Addresses with an ended claim, for pruning.
    ended: Set<IpAddr>,
    /// When the earliest ended claim expires.
    next_prune: Option<SystemTime>,
    lists: [ListState; 6],
    /// Something a snapshot shows changed since the last one.
    changed: bool,
    /// ReplicaSets and Jobs (by uid) whose pods must be named again.
    stale_owners: Set<Arc<str>>,
    /// Nodes whose pods must take their zone again.
    stale_nodes: Set<Arc<str>>,
    nodes_changed: bool,
    backends_changed: bool,
    pods_changed: bool,
    nodes_view: Arc<Map<Arc<str>, Arc<NodeInfo>>>,
    pods_view: Arc<PodsByName>,
    backends_view: Arc<Map<IpAddr, Box<[Arc<ServiceInfo>]>>>,
    /// Address changes of which pods are reported, and those not taken yet.
    ips: Option<IpWatch>,
}

/// Which pods' address changes [`Cache::take_ip_changes`] reports.
#[derive(Debug)]
struct IpWatch {
    /// This node (every node when `None`).
    node: Option<Arc<str>>,
    changes: Vec<IpChange>,
}

impl Cache {
    /// An empty cache copying `pod_labels` into pod identities and keeping
    /// ended claims for `retention`.
    pub(crate) fn new(pod_labels: &[String], retention: Duration) -> Self {
        let mut strings = Interner::default();
        let labels = pod_labels.iter().map(|l| strings.get(l)).collect();
        Self {
            labels,
            retention,
            max_objects: super::config::DEFAULT_MAX_OBJECTS,
            strings,
            pods: Map::default(),
            services: Map::default(),
            slices: Map::default(),
            nodes: Map::default(),
            replicasets: Map::default(),
            jobs: Map::default(),
            addresses: Map::default(),
            ended: Set::default(),
            next_prune: None,
            lists: [ListState::default(); 6],
            changed: false,
            stale_owners: Set::default(),
            stale_nodes: Set::default(),
            nodes_changed: false,
            backends_changed: false,
            pods_changed: false,
            nodes_view: Arc::default(),
            pods_view: Arc::default(),
            backends_view: Arc::default(),
            ips: None,
        }
    }

    /// Reports the address changes of `node`'s pods (every pod's when
    /// `None`) from now on: host-network pods excluded, and only once pods
    /// have been listed completely.
    pub(crate) fn watch_ips(&mut self, node: Option<&str>) {
        self.ips = Some(IpWatch {
            node: node.map(Arc::from),
            changes: Vec::new(),
        });
    }

    /// The address changes since the last call.
    pub(crate) fn take_ip_changes(&mut self) -> Vec<IpChange> {
        self.ips
            .as_mut()
            .map(|w| std::mem::take(&mut w.changes))
            .unwrap_or_default()
    }

    /// Notes a change of `info`'s addresses, if they are watched.
    fn ip_change(
        &mut self,
        kind: IpChangeKind,
        info: &Arc<PodInfo>,
        ips: &[IpAddr],
        scheduled_to_ip: Option<f64>,
    ) {
        let listed = self.lists[Kind::Pod.index()].synced;
        let Some(w) = &mut self.ips else {
            return;
        };
        if !listed
            || ips.is_empty()
            || info.host_network
            || (w.node.is_some() && info.node != w.node)
        {
            return;
        }
        w.changes.push(IpChange {
            kind,
            pod: info.clone(),
            ips: ips.into(),
            scheduled_to_ip,
        });
    }

    /// The same cache holding at most `max_objects` objects of all kinds
    /// together: past it, new objects are shed (updates and deletions of
    /// the objects held still apply).
    pub(crate) fn with_max_objects(mut self, max_objects: usize) -> Self {
        self.max_objects = max_objects;
        self
    }

    /// Objects of all kinds held.
    pub(crate) fn len(&self) -> usize {
        self.pods.len()
            + self.services.len()
            + self.slices.len()
            + self.nodes.len()
            + self.replicasets.len()
            + self.jobs.len()
    }

    /// Whether the cache holds `object` already (by the key it keys it
    /// by; an object without one is not held).
    fn holds(&self, object: &Object) -> bool {
        match object {
            Object::Pod(p) => convert::uid(&p.metadata).is_some_and(|u| self.pods.contains_key(u)),
            Object::Service(s) => {
                convert::uid(&s.metadata).is_some_and(|u| self.services.contains_key(u))
            }
            Object::EndpointSlice(e) => {
                convert::uid(&e.metadata).is_some_and(|u| self.slices.contains_key(u))
            }
            Object::Node(n) => n
                .metadata
                .name
                .as_deref()
                .is_some_and(|name| self.nodes.contains_key(name)),
            Object::ReplicaSet(meta) => {
                convert::uid(meta).is_some_and(|u| self.replicasets.contains_key(u))
            }
            Object::Job(meta) => convert::uid(meta).is_some_and(|u| self.jobs.contains_key(u)),
        }
    }

    /// Whether a snapshot taken now would differ from the last one.
    pub(crate) fn changed(&self) -> bool {
        self.changed
    }

    /// Whether every kind has been listed completely.
    pub(crate) fn synced(&self) -> bool {
        self.lists.iter().all(|l| l.synced)
    }

    /// When [`Cache::snapshot`] next has ended claims to forget.
    pub(crate) fn next_prune(&self) -> Option<SystemTime> {
        self.next_prune
    }

    fn generation(&self, kind: Kind) -> u64 {
        self.lists[kind.index()].generation
    }

    /// A (re-)list of `kind` starts.
    pub(crate) fn begin_list(&mut self, kind: Kind) {
        self.lists[kind.index()].generation += 1;
    }

    /// A (re-)list of `kind` is complete: what it did not list is gone.
    pub(crate) fn end_list(&mut self, kind: Kind, now: SystemTime) -> ListEnd {
        let current = self.generation(kind);
        let stale = |generation: u64| generation != current;
        match kind {
            Kind::Pod => {
                let gone: Vec<Arc<str>> = self
                    .pods
                    .iter()
                    .filter(|(_, r)| stale(r.generation))
                    .map(|(k, _)| k.clone())
                    .collect();
                for uid in gone {
                    self.remove_pod(&uid, now);
                }
            }
            Kind::Service => {
                let gone: Vec<Arc<str>> = self
                    .services
                    .iter()
                    .filter(|(_, r)| stale(r.generation))
                    .map(|(k, _)| k.clone())
                    .collect();
                for uid in gone {
                    self.remove_service(&uid, now);
                }
            }
            Kind::Node => {
                let gone: Vec<Arc<str>> = self
                    .nodes
                    .iter()
                    .filter(|(_, r)| stale(r.generation))
                    .map(|(k, _)| k.clone())
                    .collect();
                for name in gone {
                    self.remove_node(&name, now);
                }
            }
            Kind::EndpointSlice => {
                let before = self.slices.len();
                self.slices.retain(|_, r| !stale(r.generation));
                if self.slices.len() != before {
                    self.backends_changed = true;
                    self.changed = true;
                }
            }
            Kind::ReplicaSet | Kind::Job => {
                let owners = if kind == Kind::Job {
                    &mut self.jobs
                } else {
                    &mut self.replicasets
                };
                let stale_owners = &mut self.stale_owners;
                owners.retain(|uid, r| {
                    let keep = !stale(r.generation);
                    if !keep {
                        stale_owners.insert(uid.clone());
                    }
                    keep
                });
                if !self.stale_owners.is_empty() {
                    self.changed = true;
                }
            }
        }
        let list = &mut self.lists[kind.index()];
        if list.synced {
            ListEnd::Again
        } else {
            list.synced = true;
            self.changed = true;
            ListEnd::First
        }
    }

    /// An object was listed, added or modified. A new object finds the
    /// cache full when it holds `max_objects` already, and is shed.
    pub(crate) fn apply(&mut self, object: &Object, now: SystemTime) -> Result<Applied, Malformed> {
        if self.len() >= self.max_objects && !self.holds(object) {
            return Ok(Applied::Shed);
        }
        match object {
            Object::Pod(p) => self.apply_pod(p, now),
            Object::Service(s) => self.apply_service(s, now),
            Object::EndpointSlice(e) => self.apply_slice(e),
            Object::Node(n) => self.apply_node(n, now),
            Object::ReplicaSet(meta) => self.apply_owner(Kind::ReplicaSet, meta),
            Object::Job(meta) => self.apply_owner(Kind::Job, meta),
        }
        .map(|()| Applied::Taken)
    }

    /// An object was deleted. One without the key the cache knows it by
    /// cannot have been applied, and is ignored.
    pub(crate) fn delete(&mut self, object: &Object, now: SystemTime) {
        match object {
            Object::Pod(p) => {
                if let Some(uid) = convert::uid(&p.metadata) {
                    self.remove_pod(uid, now);
                }
            }
            Object::Service(s) => {
                if let Some(uid) = convert::uid(&s.metadata) {
                    self.remove_service(uid, now);
                }
            }
            Object::EndpointSlice(e) => {
                if let Some(uid) = convert::uid(&e.metadata) {
                    if self.slices.remove(uid).is_some() {
                        self.backends_changed = true;
                        self.changed = true;
                    }
                }
            }
            Object::Node(n) => {
                if let Some(name) = n.metadata.name.as_deref() {
                    self.remove_node(name, now);
                }
            }
            Object::ReplicaSet(meta) | Object::Job(meta) => {
                let owners = if object.kind() == Kind::Job {
                    &mut self.jobs
                } else {
                    &mut self.replicasets
                };
                if let Some((uid, _)) = convert::uid(meta).and_then(|u| owners.remove_entry(u)) {
                    self.stale_owners.insert(uid);
                    self.changed = true;
                }
            }
        }
    }

    /// Rewrites the history of `ip` with `edit`.
    fn edit(&mut self, ip: IpAddr, edit: impl FnOnce(&mut Vec<Claim>)) {
        let mut claims = self
            .addresses
            .get(&ip)
            .map(|h| h.claims().to_vec())
            .unwrap_or_default();
        edit(&mut claims);
        if let Some(end) = index::earliest_end(&claims) {
            self.ended.insert(ip);
            let expiry = end + self.retention;
            self.next_prune = Some(self.next_prune.map_or(expiry, |t| t.min(expiry)));
        }
        if claims.is_empty() {
            self.addresses.remove(&ip);
        } else {
            self.addresses.insert(ip, claims.into());
        }
        self.changed = true;
    }

    fn claim(&mut self, ip: IpAddr, holder: Holder, now: SystemTime) {
        self.edit(ip, |claims| index::claim(claims, holder, now));
    }

    fn release(&mut self, ip: IpAddr, holder: &Holder, now: SystemTime) {
        if self.addresses.contains_key(&ip) {
            self.edit(ip, |claims| {
                index::release(claims, holder, now);
            });
        }
    }

    fn pod_info(&self, parts: &PodParts) -> PodInfo {
        let owners = Owners {
            replicasets: &self.replicasets,
            jobs: &self.jobs,
        };
        let node = parts.node.as_ref().and_then(|n| self.nodes.get(n));
        PodInfo {
            uid: parts.uid.clone(),
            namespace: parts.namespace.clone(),
            name: parts.name.clone(),
            node: parts.node.clone(),
            workload: owners.workload(&parts.name, parts.controller.as_ref()),
            labels: parts.labels.clone(),
            host_network: parts.host_network,
            zone: node.and_then(|n| n.info.zone.clone()),
            region: node.and_then(|n| n.info.region.clone()),
            mesh: parts.mesh.clone(),
        }
    }

    fn apply_pod(&mut self, pod: &Pod, now: SystemTime) -> Result<(), Malformed> {
        let parts = convert::pod(pod, &self.labels, &mut self.strings)?;
        let generation = self.generation(Kind::Pod);
        let info = self.pod_info(&parts);
        if let Some(old) = self.pods.get_mut(&parts.uid) {
            if *old.info == info
                && old.ips == parts.ips
                && old.ports == parts.ports
                && old.running == parts.running
                && old.controller == parts.controller
            {
                old.generation = generation;
                return Ok(());
            }
        }
        let record = PodRecord {
            info: Arc::new(info),
            controller: parts.controller,
            ips: parts.ips,
            ports: parts.ports,
            running: parts.running,
            generation,
            scheduled: parts.scheduled,
            network_ready: parts.network_ready,
        };
        let mut had: Vec<IpAddr> = Vec::new();
        if let Some(old) = self.pods.remove(&record.info.uid) {
            let old_holder = old.holder();
            for ip in old.held() {
                if !record.held().contains(ip) {
                    self.release(*ip, &old_holder, now);
                }
            }
            had = old.held().to_vec();
        }
        if had.is_empty() && !record.held().is_empty() {
            // kubelet sets the addresses and PodReadyToStartContainers in
            // one status update; without that condition, when flowtel saw
            // them.
            let delay = record
                .scheduled
                .map(|scheduled| seconds_between(scheduled, record.network_ready.unwrap_or(now)));
            let held = record.held().to_vec();
            self.ip_change(IpChangeKind::Allocated, &record.info, &held, delay);
        } else if !had.is_empty() && record.held().is_empty() {
            let why = if record.running {
                "removed"
            } else {
                "finished"
            };
            self.ip_change(IpChangeKind::Released(why), &record.info, &had, None);
        }
        let holder = record.holder();
        for ip in record.held() {
            self.claim(*ip, holder.clone(), now);
        }
        self.pods.insert(record.info.uid.clone(), record);
        self.pods_changed = true;
        self.changed = true;
        Ok(())
    }

    fn remove_pod(&mut self, uid: &str, now: SystemTime) {
        if let Some(old) = self.pods.remove(uid) {
            let holder = old.holder();
            for ip in old.held() {
                self.release(*ip, &holder, now);
            }
            self.ip_change(
                IpChangeKind::Released("deleted"),
                &old.info,
                old.held(),
                None,
            );
            self.pods_changed = true;
            self.changed = true;
        }
    }

    fn apply_service(&mut self, service: &Service, now: SystemTime) -> Result<(), Malformed> {
        let (uid, info) = convert::service(service, &mut self.strings)?;
        let generation = self.generation(Kind::Service);
        if let Some(old) = self.services.get_mut(&uid) {
            if *old.info == info {
                old.generation = generation;
                return Ok(());
            }
        }
        let info = Arc::new(info);
        if let Some(old) = self.services.remove(&uid) {
            let holder = Holder::Service(old.info.clone());
            for ip in old.info.cluster_ips.iter() {
                if !info.cluster_ips.contains(ip) {
                    self.release(*ip, &holder, now);
                }
            }
        }
        for ip in info.cluster_ips.iter() {
            self.claim(*ip, Holder::Service(info.clone()), now);
        }
        self.services
            .insert(uid, ServiceRecord { info, generation });
        self.backends_changed = true;
        self.changed = true;
        Ok(())
    }

    fn remove_service(&mut self, uid: &str, now: SystemTime) {
        if let Some(old) = self.services.remove(uid) {
            let holder = Holder::Service(old.info.clone());
            for ip in old.info.cluster_ips.iter() {
                self.release(*ip, &holder, now);
            }
            self.backends_changed = true;
            self.changed = true;
        }
    }

    fn apply_node(&mut self, node: &Node, now: SystemTime) -> Result<(), Malformed> {
        let info = convert::node(node, &mut self.strings)?;
        let generation = self.generation(Kind::Node);
        if let Some(old) = self.nodes.get_mut(&info.name) {
            if *old.info == info {
                old.generation = generation;
                return Ok(());
            }
        }
        let info = Arc::new(info);
        match self.nodes.remove(&info.name) {
            Some(old) => {
                let holder = Holder::Node(old.info.clone());
                for ip in old.info.addresses.iter() {
                    if !info.addresses.contains(ip) {
                        self.release(*ip, &holder, now);
                    }
                }
                if old.info.zone != info.zone || old.info.region != info.region {
                    self.stale_nodes.insert(info.name.clone());
                }
            }
            None => {
                self.stale_nodes.insert(info.name.clone());
            }
        }
        for ip in info.addresses.iter() {
            self.claim(*ip, Holder::Node(info.clone()), now);
        }
        self.nodes
            .insert(info.name.clone(), NodeRecord { info, generation });
        self.nodes_changed = true;
        self.changed = true;
        Ok(())
    }

    fn remove_node(&mut self, name: &str, now: SystemTime) {
        if let Some(old) = self.nodes.remove(name) {
            let holder = Holder::Node(old.info.clone());
            for ip in old.info.addresses.iter() {
                self.release(*ip, &holder, now);
            }
            self.stale_nodes.insert(old.info.name.clone());
            self.nodes_changed = true;
            self.changed = true;
        }
    }

    fn apply_slice(&mut self, slice: &EndpointSlice) -> Result<(), Malformed> {
        let parts = convert::endpoint_slice(slice, &mut self.strings)?;
        let generation = self.generation(Kind::EndpointSlice);
        if let Some(old) = self.slices.get_mut(&parts.uid) {
            if old.parts == parts {
                old.generation = generation;
                return Ok(());
            }
        }
        self.slices
            .insert(parts.uid.clone(), SliceRecord { parts, generation });
        self.backends_changed = true;
        self.changed = true;
        Ok(())
    }

    fn apply_owner(&mut self, kind: Kind, meta: &ObjectMeta) -> Result<(), Malformed> {
        let what = if kind == Kind::Job {
            "Job"
        } else {
            "ReplicaSet"
        };
        let (uid, controller) = convert::owner(what, meta, &mut self.strings)?;
        let generation = self.generation(kind);
        let owners = if kind == Kind::Job {
            &mut self.jobs
        } else {
            &mut self.replicasets
        };
        let record = OwnerRecord {
            controller,
            generation,
        };
        if owners.get(&uid).map(|r| &r.controller) != Some(&record.controller) {
            self.stale_owners.insert(uid.clone());
            self.changed = true;
        }
        owners.insert(uid, record);
        Ok(())
    }

    /// Names again the pods whose owner or node changed.
    fn refresh_pods(&mut self, now: SystemTime) {
        if self.stale_owners.is_empty() && self.stale_nodes.is_empty() {
            return;
        }
        let mut renamed = Vec::new();
        let owners = Owners {
            replicasets: &self.replicasets,
            jobs: &self.jobs,
        };
        for record in self.pods.values_mut() {
            let by_owner = record
                .controller
                .as_ref()
                .is_some_and(|c| self.stale_owners.contains(&c.uid));
            let by_node = record
                .info
                .node
                .as_ref()
                .is_some_and(|n| self.stale_nodes.contains(n));
            if !by_owner && !by_node {
                continue;
            }
            let node = record.info.node.as_ref().and_then(|n| self.nodes.get(n));
            let info = PodInfo {
                workload: owners.workload(&record.info.name, record.controller.as_ref()),
                zone: node.and_then(|n| n.info.zone.clone()),
                region: node.and_then(|n| n.info.region.clone()),
                ..(*record.info).clone()
            };
            if info != *record.info {
                record.info = Arc::new(info);
                renamed.push((record.held().to_vec(), record.holder()));
            }
        }
        self.stale_owners.clear();
        self.stale_nodes.clear();
        if !renamed.is_empty() {
            self.pods_changed = true;
        }
        for (ips, holder) in renamed {
            for ip in ips {
                self.claim(ip, holder.clone(), now);
            }
        }
    }

    /// Forgets claims that ended more than `retention` before `now`.
    fn prune(&mut self, now: SystemTime) {
        if self.next_prune.is_none_or(|t| t > now) {
            return;
        }
        let cutoff = now.checked_sub(self.retention).unwrap_or(now);
        self.next_prune = None;
        let ended: Vec<IpAddr> = self.ended.drain().collect();
        for ip in ended {
            let Some(history) = self.addresses.get(&ip) else {
                continue;
            };
            let mut claims = history.claims().to_vec();
            let pruned = index::prune(&mut claims, cutoff);
            if let Some(end) = index::earliest_end(&claims) {
                self.ended.insert(ip);
                let expiry = end + self.retention;
                self.next_prune = Some(self.next_prune.map_or(expiry, |t| t.min(expiry)));
            }
            if pruned {
                if claims.is_empty() {
                    self.addresses.remove(&ip);
                } else {
                    self.addresses.insert(ip, claims.into());
                }
                self.changed = true;
            }
        }
    }

    fn rebuild_views(&mut self) {
        if self.pods_changed {
            let mut pods = PodsByName::default();
            for r in self.pods.values() {
                pods.entry(r.info.namespace.clone())
                    .or_default()
                    .insert(r.info.name.clone(), r.info.clone());
            }
            self.pods_view = Arc::new(pods);
            self.pods_changed = false;
        }
        if self.nodes_changed {
            self.nodes_view = Arc::new(
                self.nodes
                    .iter()
                    .map(|(name, r)| (name.clone(), r.info.clone()))
                    .collect(),
            );
            self.nodes_changed = false;
        }
        if self.backends_changed {
            let by_name: Map<(&str, &str), &Arc<ServiceInfo>> = self
                .services
                .values()
                .map(|s| ((&*s.info.namespace, &*s.info.name), &s.info))
                .collect();
            let mut backends: Map<IpAddr, Vec<Arc<ServiceInfo>>> = Map::default();
            for slice in self.slices.values() {
                let Some(service) = slice.parts.service.as_deref() else {
                    continue;
                };
                let Some(info) = by_name.get(&(&*slice.parts.namespace, service)) else {
                    continue;
                };
                for ip in slice.parts.addresses.iter() {
                    let services = backends.entry(*ip).or_default();
                    if !services.iter().any(|s| Arc::ptr_eq(s, info)) {
                        services.push((*info).clone());
                    }
                }
            }
            self.backends_view = Arc::new(
                backends
                    .into_iter()
                    .map(|(ip, s)| (ip, s.into_boxed_slice()))
                    .collect(),
            );
            self.backends_changed = false;
        }
    }

    /// Object counts.
    pub(crate) fn counts(&self) -> Counts {
        Counts {
            pods: self.pods.len(),
            services: self.services.len(),
            endpoint_slices: self.slices.len(),
            nodes: self.nodes.len(),
            replicasets: self.replicasets.len(),
            jobs: self.jobs.len(),
        }
    }

    /// Brings derived state up to date and returns the view to publish.
    pub(crate) fn snapshot(&mut self, now: SystemTime) -> Snapshot {
        self.refresh_pods(now);
        self.prune(now);
        self.rebuild_views();
        self.strings.sweep();
        self.changed = false;
        Snapshot {
            addresses: self.addresses.clone(),
            nodes: self.nodes_view.clone(),
            backends: self.backends_view.clone(),
            pods: self.pods_view.clone(),
            counts: self.counts(),
            synced: self.synced(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use serde_json::{json, Value};

    use super::super::model::{Peer, WorkloadKind};
    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("a literal address")
    }

    fn owner(kind: &str, name: &str) -> Value {
        let api = match kind {
            "Job" | "CronJob" => "batch/v1",
            _ => "apps/v1",
        };
        json!([{"apiVersion": api, "kind": kind, "name": name, "uid": format!("uid-{name}"),
            "controller": true, "blockOwnerDeletion": true}])
    }

    fn pod(name: &str, node: &str, ips: &[&str], owner: Option<Value>) -> Object {
        let mut p = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                "labels": {"app.kubernetes.io/name": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIPs": ips.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>()}
        });
        if let Some(o) = owner {
            p["metadata"]["ownerReferences"] = o;
        }
        Object::Pod(Box::new(serde_json::from_value(p).expect("test pod")))
    }

    fn host_pod(name: &str, node: &str, ip: &str, port: u16) -> Object {
        Object::Pod(Box::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "kube-system", "uid": format!("uid-{name}"),
                    "ownerReferences": owner("DaemonSet", name)},
                "spec": {"nodeName": node, "hostNetwork": true,
                    "containers": [{"name": "c", "ports": [{"containerPort": port, "hostPort": port}]}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip}
            }))
            .expect("test pod"),
        ))
    }

    fn meta(name: &str, owner: Option<Value>) -> Box<ObjectMeta> {
        let mut m = json!({"name": name, "namespace": "shop", "uid": format!("uid-{name}")});
        if let Some(o) = owner {
            m["ownerReferences"] = o;
        }
        Box::new(serde_json::from_value(m).expect("test metadata"))
    }

    fn node(name: &str, zone: &str, ip: &str) -> Object {
        Object::Node(Box::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {
                    "topology.kubernetes.io/zone": zone, "topology.kubernetes.io/region": "eu-west-1"}},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
            }))
            .expect("test node"),
        ))
    }

    fn service(name: &str, ips: &[&str]) -> Object {
        Object::Service(Box::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
                "spec": {"clusterIP": ips[0], "clusterIPs": ips, "ports": [{"port": 80}]}
            }))
            .expect("test service"),
        ))
    }

    fn slice(service: &str, ips: &[&str]) -> Object {
        Object::EndpointSlice(Box::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{service}-x1"), "namespace": "shop",
                    "uid": format!("uid-{service}-x1"),
                    "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "endpoints": ips.iter().map(|i| json!({"addresses": [i]})).collect::<Vec<_>>()
            }))
            .expect("test slice"),
        ))
    }

    fn synced_cache() -> Cache {
        let mut cache = Cache::new(&["app.kubernetes.io/name".into()], Duration::from_secs(60));
        for kind in Kind::ALL {
            cache.begin_list(kind);
            assert_eq!(cache.end_list(kind, t(0)), ListEnd::First);
        }
        cache
    }

    fn apply(cache: &mut Cache, object: Object, now: SystemTime) {
        cache.apply(&object, now).expect("a valid object");
    }

    fn workload(peer: Option<Peer>) -> (String, String) {
        match peer {
            Some(Peer::Pod(p)) => (p.workload.kind.to_string(), p.workload.name.to_string()),
            other => panic!("expected a pod, got {other:?}"),
        }
    }

    #[test]
    fn workloads_resolve_whatever_the_order_objects_arrive_in() {
        let mut cache = synced_cache();
        apply(
            &mut cache,
            pod(
                "web-5f6c7-aaaaa",
                "n1",
                &["10.1.0.1"],
                Some(owner("ReplicaSet", "web-5f6c7")),
            ),
            t(1),
        );
        apply(
            &mut cache,
            pod(
                "nightly-28911-bbbbb",
                "n1",
                &["10.1.0.2"],
                Some(owner("Job", "nightly-28911")),
            ),
            t(1),
        );
        apply(
            &mut cache,
            pod(
                "db-0",
                "n1",
                &["10.1.0.3"],
                Some(owner("StatefulSet", "db")),
            ),
            t(1),
        );
        apply(&mut cache, pod("debug", "n1", &["10.1.0.4"], None), t(1));
        let snap = cache.snapshot(t(1));
        assert_eq!(
            workload(snap.lookup(ip("10.1.0.1"), None, t(2))),
            ("ReplicaSet".into(), "web-5f6c7".into())
        );
        assert_eq!(
            workload(snap.lookup(ip("10.1.0.2"), None, t(2))),
            ("Job".into(), "nightly-28911".into())
        );

        // The owners arrive later: the next snapshot names the top workload.
        cache
            .apply(
                &Object::ReplicaSet(meta("web-5f6c7", Some(owner("Deployment", "web")))),
                t(2),
            )
            .expect("rs");
        cache
            .apply(
                &Object::Job(meta("nightly-28911", Some(owner("CronJob", "nightly")))),
                t(2),
            )
            .expect("job");
        node_zone_and_workloads(&cache.snapshot(t(2)), None);
        apply(&mut cache, node("n1", "eu-west-1a", "192.168.0.1"), t(3));
        let snap = cache.snapshot(t(3));
        node_zone_and_workloads(&snap, Some("eu-west-1a"));
        assert_eq!(
            workload(snap.lookup(ip("10.1.0.3"), None, t(4))),
            ("StatefulSet".into(), "db".into())
        );
        assert_eq!(
            workload(snap.lookup(ip("10.1.0.4"), None, t(4))),
            ("Pod".into(), "debug".into())
        );
        match snap.lookup(ip("10.1.0.1"), None, t(4)) {
            Some(Peer::Pod(p)) => assert_eq!(
                p.label("app.kubernetes.io/name").map(|v| &**v),
                Some("web-5f6c7-aaaaa")
            ),
            other => panic!("expected a pod, got {other:?}"),
        }

        // A zone change reaches the pods on the node.
        apply(&mut cache, node("n1", "eu-west-1b", "192.168.0.1"), t(5));
        node_zone_and_workloads(&cache.snapshot(t(5)), Some("eu-west-1b"));
    }

    fn node_zone_and_workloads(snap: &Snapshot, zone: Option<&str>) {
        for (address, kind, name) in [
            ("10.1.0.1", WorkloadKind::Deployment, "web"),
            ("10.1.0.2", WorkloadKind::CronJob, "nightly"),
        ] {
            match snap.lookup(ip(address), None, t(10)) {
                Some(Peer::Pod(p)) => {
                    assert_eq!(p.workload.kind, kind);
                    assert_eq!(&*p.workload.name, name);
                    assert_eq!(p.zone.as_deref(), zone);
                    assert_eq!(p.region.as_deref(), zone.map(|_| "eu-west-1"));
                }
                other => panic!("expected a pod at {address}, got {other:?}"),
            }
        }
    }

    #[test]
    fn pods_are_found_by_name_without_an_address_and_renamed_with_their_owner() {
        let mut cache = synced_cache();
        // Scheduled, no address yet; its ReplicaSet arrives later.
        apply(
            &mut cache,
            pod(
                "web-5f6c-abcde",
                "n1",
                &[],
                Some(owner("ReplicaSet", "web-5f6c")),
            ),
            t(1),
        );
        let snap = cache.snapshot(t(1));
        let p = snap.pod("shop", "web-5f6c-abcde").expect("the pod");
        assert_eq!(p.workload.kind, WorkloadKind::ReplicaSet);
        assert!(snap.pod("shop", "other").is_none());
        assert!(snap.pod("other", "web-5f6c-abcde").is_none());
        cache
            .apply(
                &Object::ReplicaSet(meta("web-5f6c", Some(owner("Deployment", "web")))),
                t(2),
            )
            .expect("a valid ReplicaSet");
        let snap = cache.snapshot(t(2));
        let p = snap.pod("shop", "web-5f6c-abcde").expect("the pod");
        assert_eq!(p.workload.kind, WorkloadKind::Deployment);
        assert_eq!(&*p.workload.name, "web");
        cache.delete(&pod("web-5f6c-abcde", "n1", &[], None), t(3));
        assert!(cache.snapshot(t(3)).pod("shop", "web-5f6c-abcde").is_none());
    }

    /// A pod on `node` with `ips`, scheduled at `t(scheduled)` and, when
    /// given, its network ready at `t(ready)`.
    fn timed_pod(
        name: &str,
        node: &str,
        ips: &[&str],
        phase: &str,
        scheduled: u64,
        ready: Option<u64>,
    ) -> Object {
        let at = |secs: u64| {
            let ts = k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + secs as i64)
                .expect("a time");
            ts.to_string()
        };
        let mut conditions = vec![
            json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": at(scheduled)}),
        ];
        conditions.push(match ready {
            Some(r) => json!({"type": "PodReadyToStartContainers", "status": "True",
                "lastTransitionTime": at(r)}),
            None => json!({"type": "PodReadyToStartContainers", "status": "False",
                "lastTransitionTime": at(scheduled)}),
        });
        Object::Pod(Box::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                    "ownerReferences": owner("StatefulSet", "db")},
                "spec": {"nodeName": node, "containers": [{"name": "c"}]},
                "status": {"phase": phase, "conditions": conditions,
                    "podIPs": ips.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>()}
            }))
            .expect("test pod"),
        ))
    }

    fn changes(cache: &mut Cache) -> Vec<(IpChangeKind, String, usize, Option<f64>)> {
        cache
            .take_ip_changes()
            .into_iter()
            .map(|c| {
                (
                    c.kind,
                    c.pod.name.to_string(),
                    c.ips.len(),
                    c.scheduled_to_ip,
                )
            })
            .collect()
    }

    #[test]
    fn address_changes_of_this_nodes_pods_after_the_first_list() {
        let mut cache = Cache::new(&[], Duration::from_secs(60));
        cache.watch_ips(Some("n1"));
        for kind in Kind::ALL {
            cache.begin_list(kind);
        }
        // Listed with its address: allocated before flowtel watched.
        apply(
            &mut cache,
            timed_pod("db-0", "n1", &["10.0.0.1"], "Running", 0, Some(2)),
            t(10),
        );
        for kind in Kind::ALL {
            cache.end_list(kind, t(10));
        }
        assert!(changes(&mut cache).is_empty());

        apply(
            &mut cache,
            timed_pod("db-1", "n1", &[], "Pending", 20, None),
            t(20),
        );
        apply(
            &mut cache,
            timed_pod("db-2", "n2", &["10.0.0.9"], "Running", 20, Some(21)),
            t(21),
        );
        apply(
            &mut cache,
            host_pod("agent", "n1", "192.0.2.1", 9100),
            t(21),
        );
        assert!(changes(&mut cache).is_empty());
        // Its network is ready 3 s after it was scheduled.
        apply(
            &mut cache,
            timed_pod(
                "db-1",
                "n1",
                &["10.0.0.2", "fd00::2"],
                "Running",
                20,
                Some(23),
            ),
            t(25),
        );
        // Without the condition: when flowtel saw the address.
        apply(
            &mut cache,
            timed_pod("db-3", "n1", &["10.0.0.3"], "Running", 20, None),
            t(27),
        );
        assert_eq!(
            changes(&mut cache),
            vec![
                (IpChangeKind::Allocated, "db-1".into(), 2, Some(3.0)),
                (IpChangeKind::Allocated, "db-3".into(), 1, Some(7.0)),
            ]
        );
        // The same addresses again: nothing new.
        apply(
            &mut cache,
            timed_pod(
                "db-1",
                "n1",
                &["10.0.0.2", "fd00::2"],
                "Running",
                20,
                Some(23),
            ),
            t(26),
        );
        apply(
            &mut cache,
            timed_pod(
                "db-1",
                "n1",
                &["10.0.0.2", "fd00::2"],
                "Succeeded",
                20,
                Some(23),
            ),
            t(30),
        );
        cache.delete(&timed_pod("db-0", "n1", &[], "Running", 0, None), t(31));
        cache.delete(&timed_pod("db-2", "n2", &[], "Running", 0, None), t(31));
        // A finished pod deleted has nothing more to release.
        cache.delete(&timed_pod("db-1", "n1", &[], "Running", 0, None), t(32));
        assert_eq!(
            changes(&mut cache),
            vec![
                (IpChangeKind::Released("finished"), "db-1".into(), 2, None),
                (IpChangeKind::Released("deleted"), "db-0".into(), 1, None),
            ]
        );
    }

    #[test]
    fn host_network_pods_share_their_node_address() {
        let mut cache = synced_cache();
        apply(&mut cache, node("n1", "a", "192.168.0.1"), t(1));
        apply(
            &mut cache,
            host_pod("node-exporter-x", "n1", "192.168.0.1", 9100),
            t(1),
        );
        let snap = cache.snapshot(t(1));
        let at = t(2);
        match snap.lookup(ip("192.168.0.1"), Some(9100), at) {
            Some(Peer::Pod(p)) => {
                assert!(p.host_network);
                assert_eq!(p.workload.kind, WorkloadKind::DaemonSet);
                assert_eq!(p.zone.as_deref(), Some("a"));
            }
            other => panic!("expected the exporter, got {other:?}"),
        }
        for port in [None, Some(22), Some(10250)] {
            match snap.lookup(ip("192.168.0.1"), port, at) {
                Some(Peer::Node(n)) => assert_eq!(&*n.name, "n1"),
                other => panic!("expected the node for {port:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn dual_stack_pods_and_services() {
        let mut cache = synced_cache();
        apply(
            &mut cache,
            pod(
                "api-0",
                "n1",
                &["10.1.0.9", "fd00:1::9"],
                Some(owner("StatefulSet", "api")),
            ),
            t(1),
        );
        apply(
            &mut cache,
            service("api", &["10.96.0.9", "fd00:96::9"]),
            t(1),
        );
        apply(&mut cache, slice("api", &["10.1.0.9"]), t(1));
        let snap = cache.snapshot(t(1));
        for address in ["10.1.0.9", "fd00:1::9"] {
            assert_eq!(workload(snap.lookup(ip(address), None, t(2))).1, "api");
        }
        for address in ["10.96.0.9", "fd00:96::9"] {
            match snap.lookup(ip(address), Some(80), t(2)) {
                Some(Peer::Service(s)) => assert_eq!((&*s.namespace, &*s.name), ("shop", "api")),
                other => panic!("expected the service at {address}, got {other:?}"),
            }
        }
        let behind: Vec<&str> = snap
            .services_backed_by(ip("10.1.0.9"))
            .iter()
            .map(|s| &*s.name)
            .collect();
        assert_eq!(behind, ["api"]);
        assert_eq!(snap.counts().endpoint_slices, 1);
    }

    #[test]
    fn a_reused_pod_address_is_named_by_time() {
        let mut cache = synced_cache();
        apply(&mut cache, pod("old", "n1", &["10.1.0.7"], None), t(1));
        cache.delete(&pod("old", "n1", &["10.1.0.7"], None), t(100));
        apply(&mut cache, pod("new", "n1", &["10.1.0.7"], None), t(110));
        let snap = cache.snapshot(t(110));
        assert_eq!(workload(snap.lookup(ip("10.1.0.7"), None, t(50))).1, "old");
        assert_eq!(workload(snap.lookup(ip("10.1.0.7"), None, t(105))).1, "new");
        assert_eq!(snap.counts().pods, 1);
        assert_eq!(cache.next_prune(), Some(t(160)));
        // Past the retention the old pod is forgotten.
        let snap = cache.snapshot(t(161));
        assert_eq!(workload(snap.lookup(ip("10.1.0.7"), None, t(50))).1, "new");
        assert_eq!(cache.next_prune(), None);
    }

    #[test]
    fn a_finished_pod_lets_its_address_go() {
        let mut cache = synced_cache();
        apply(&mut cache, pod("job-a", "n1", &["10.1.0.6"], None), t(1));
        let mut done = pod("job-a", "n1", &["10.1.0.6"], None);
        if let Object::Pod(p) = &mut done {
            if let Some(status) = p.status.as_mut() {
                status.phase = Some("Succeeded".into());
            }
        }
        apply(&mut cache, done, t(20));
        apply(&mut cache, pod("next", "n1", &["10.1.0.6"], None), t(30));
        let snap = cache.snapshot(t(30));
        assert_eq!(
            workload(snap.lookup(ip("10.1.0.6"), None, t(10))).1,
            "job-a"
        );
        assert_eq!(workload(snap.lookup(ip("10.1.0.6"), None, t(25))).1, "next");
        assert_eq!(snap.counts().pods, 2);
    }

    #[test]
    fn a_relist_drops_what_it_no_longer_lists() {
        let mut cache = synced_cache();
        apply(&mut cache, pod("stays", "n1", &["10.1.0.1"], None), t(1));
        apply(&mut cache, pod("goes", "n1", &["10.1.0.2"], None), t(1));
        apply(&mut cache, service("svc", &["10.96.0.1"]), t(1));
        cache.snapshot(t(1));
        assert!(!cache.changed());
        cache.begin_list(Kind::Pod);
        apply(&mut cache, pod("stays", "n1", &["10.1.0.1"], None), t(2));
        assert!(
            !cache.changed(),
            "re-listing an unchanged pod changes nothing"
        );
        assert_eq!(cache.end_list(Kind::Pod, t(3)), ListEnd::Again);
        cache.begin_list(Kind::Service);
        assert_eq!(cache.end_list(Kind::Service, t(3)), ListEnd::Again);
        let snap = cache.snapshot(t(3));
        assert_eq!(snap.counts().pods, 1);
        assert_eq!(snap.counts().services, 0);
        assert_eq!(workload(snap.lookup(ip("10.1.0.2"), None, t(2))).1, "goes");
        assert_eq!(snap.lookup(ip("10.1.0.2"), None, t(4)), None);
        assert_eq!(snap.lookup(ip("10.96.0.1"), None, t(4)), None);
    }

    #[test]
    fn malformed_objects_leave_the_rest_alone() {
        let mut cache = synced_cache();
        apply(&mut cache, pod("good", "n1", &["10.1.0.1"], None), t(1));
        let bad = pod("bad", "n1", &["10.1.0.500"], None);
        let err = cache.apply(&bad, t(1)).expect_err("a bad address");
        assert!(err.to_string().contains("Pod shop/bad"), "{err}");
        let snap = cache.snapshot(t(1));
        assert_eq!(snap.counts().pods, 1);
        assert_eq!(workload(snap.lookup(ip("10.1.0.1"), None, t(2))).1, "good");
    }

    #[test]
    fn new_objects_past_max_objects_are_shed_and_held_ones_still_change() {
        let mut cache = synced_cache().with_max_objects(3);
        let taken = |cache: &mut Cache, o: Object| cache.apply(&o, t(1)).expect("well formed");
        assert_eq!(
            taken(&mut cache, node("n1", "a", "192.168.0.1")),
            Applied::Taken
        );
        assert_eq!(
            taken(&mut cache, service("svc", &["10.96.0.1"])),
            Applied::Taken
        );
        assert_eq!(
            taken(&mut cache, pod("p1", "n1", &["10.1.0.1"], None)),
            Applied::Taken
        );
        assert_eq!(cache.len(), 3);
        // Full: every new kind of object is shed.
        assert_eq!(
            taken(&mut cache, pod("p2", "n1", &["10.1.0.2"], None)),
            Applied::Shed
        );
        assert_eq!(
            taken(&mut cache, service("svc2", &["10.96.0.2"])),
            Applied::Shed
        );
        assert_eq!(
            taken(&mut cache, slice("svc", &["10.1.0.1"])),
            Applied::Shed
        );
        assert_eq!(
            taken(&mut cache, node("n2", "b", "192.168.0.2")),
            Applied::Shed
        );
        assert_eq!(
            cache.apply(&Object::ReplicaSet(meta("rs", None)), t(1)),
            Ok(Applied::Shed)
        );
        assert_eq!(
            cache.apply(&Object::Job(meta("job", None)), t(1)),
            Ok(Applied::Shed)
        );
        // A held pod still moves to its new address.
        assert_eq!(
            taken(&mut cache, pod("p1", "n1", &["10.1.0.9"], None)),
            Applied::Taken
        );
        let snap = cache.snapshot(t(2));
        assert_eq!(snap.counts().pods, 1);
        assert_eq!(snap.counts().services, 1);
        assert_eq!(snap.counts().nodes, 1);
        assert_eq!(workload(snap.lookup(ip("10.1.0.9"), None, t(2))).1, "p1");
        assert_eq!(snap.lookup(ip("10.1.0.2"), None, t(2)), None);
        // A deletion makes room for the next new object.
        cache.delete(&service("svc", &["10.96.0.1"]), t(3));
        assert_eq!(
            taken(&mut cache, pod("p2", "n1", &["10.1.0.2"], None)),
            Applied::Taken
        );
        assert_eq!(cache.len(), 3);
        let snap = cache.snapshot(t(3));
        assert_eq!(workload(snap.lookup(ip("10.1.0.2"), None, t(3))).1, "p2");
    }

    /// 20,000 pods created and deleted, 200 alive at a time, 10 replaced
    /// a second (time as the cache sees it), ended claims kept 10 s: what
    /// the cache holds stays proportional to what is alive or retained,
    /// not to the churn (the soak's pod churn, without the rest).
    #[test]
    fn churn_leaves_nothing_behind() {
        let mut cache = Cache::new(&["app.kubernetes.io/name".into()], Duration::from_secs(10));
        for kind in Kind::ALL {
            cache.begin_list(kind);
            cache.end_list(kind, t(0));
        }
        let pod_n = |n: usize| {
            let ip = format!("10.{}.{}.{}", 100 + (n >> 16), (n >> 8) & 0xff, n & 0xff);
            pod(&format!("churn-{n}"), "n1", &[&ip], None)
        };
        let mut most = (0, 0, 0);
        for n in 0..20_000 {
            let now = t(n as u64 / 10);
            apply(&mut cache, pod_n(n), now);
            if n >= 200 {
                cache.delete(&pod_n(n - 200), now);
            }
            if n % 10 == 9 {
                cache.snapshot(now);
                most = (
                    most.0.max(cache.addresses.len()),
                    most.1.max(cache.ended.len()),
                    most.2.max(cache.strings.len()),
                );
            }
        }
        assert_eq!(cache.counts().pods, 200);
        // 200 alive, and the ~100 deleted in the last 10 s (plus the
        // interval until the next prune).
        assert!(most.0 <= 200 + 120, "addresses: {most:?}");
        assert!(most.1 <= 120, "ended claims: {most:?}");
        // Interned names and uids of live and retained pods, swept when
        // the set doubles: far below the 40,000 of the churn.
        assert!(
            most.2 <= 2 * 2 * 320 + 1024 + 16,
            "interned strings: {most:?}"
        );
    }

    #[test]
    fn synced_only_when_every_kind_listed() {
        let mut cache = Cache::new(&[], Duration::from_secs(1));
        for kind in &Kind::ALL[..5] {
            cache.begin_list(*kind);
            cache.end_list(*kind, t(0));
        }
        assert!(!cache.snapshot(t(0)).synced());
        cache.begin_list(Kind::Job);
        cache.end_list(Kind::Job, t(0));
        assert!(cache.snapshot(t(0)).synced());
    }
}
