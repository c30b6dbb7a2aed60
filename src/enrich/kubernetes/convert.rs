//! From API objects to the compact records the cache keeps. Nothing from
//! the API is trusted: a missing name or an address that does not parse
//! makes the object [`Malformed`], which the cache counts and skips.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Container, Node, Pod, PodStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::intern::Interner;
use super::model::{NodeInfo, PodMesh, Protocol, ServiceInfo, ServicePort};
use super::owners::{controller_of, Controller};

/// The label that names a node's zone.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The label that names a node's region.
const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// What older clusters still set instead of [`ZONE_LABEL`].
const LEGACY_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";
/// What older clusters still set instead of [`REGION_LABEL`].
const LEGACY_REGION_LABEL: &str = "failure-domain.beta.kubernetes.io/region";
/// The label the EndpointSlice controller puts on every slice it manages.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// An object flowtel cannot use, and why, in words naming the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed {
    /// `Pod shop/checkout-7d4b5-x2x9z`, or as much of it as is there.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

impl std::error::Error for Malformed {}

/// How an object is named in messages.
fn describe(kind: &str, meta: &ObjectMeta) -> String {
    let name = meta.name.as_deref().unwrap_or("<no name>");
    match (meta.namespace.as_deref(), meta.uid.as_deref()) {
        (Some(ns), _) => format!("{kind} {ns}/{name}"),
        (None, Some(uid)) if meta.name.is_none() => format!("{kind} {name} (uid {uid})"),
        (None, _) => format!("{kind} {name}"),
    }
}

/// Checks the identity fields of an object.
struct Identity<'a> {
    kind: &'static str,
    meta: &'a ObjectMeta,
}

impl<'a> Identity<'a> {
    fn new(kind: &'static str, meta: &'a ObjectMeta) -> Self {
        Self { kind, meta }
    }

    fn malformed(&self, reason: impl Into<String>) -> Malformed {
        Malformed {
            object: describe(self.kind, self.meta),
            reason: reason.into(),
        }
    }

    fn field(&self, value: Option<&'a String>, path: &str) -> Result<&'a str, Malformed> {
        value
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| self.malformed(format!("{path} is missing")))
    }

    fn name(&self) -> Result<&'a str, Malformed> {
        self.field(self.meta.name.as_ref(), "metadata.name")
    }

    fn namespace(&self) -> Result<&'a str, Malformed> {
        self.field(self.meta.namespace.as_ref(), "metadata.namespace")
    }

    fn uid(&self) -> Result<&'a str, Malformed> {
        self.field(self.meta.uid.as_ref(), "metadata.uid")
    }

    fn ip(&self, text: &str, path: &str) -> Result<IpAddr, Malformed> {
        text.parse()
            .map_err(|_| self.malformed(format!("{path} {text:?} is not an IP address")))
    }

    fn port(&self, value: i32, path: &str) -> Result<u16, Malformed> {
        u16::try_from(value)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.malformed(format!("{path} {value} is not a port number")))
    }
}

/// The uid of an object, the cache's key for everything but nodes.
pub(crate) fn uid(meta: &ObjectMeta) -> Option<&str> {
    meta.uid.as_deref().filter(|u| !u.is_empty())
}

/// What the cache keeps of a pod, before its workload and zone are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodParts {
    pub uid: Arc<str>,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub node: Option<Arc<str>>,
    pub controller: Option<Controller>,
    pub labels: Box<[(Arc<str>, Arc<str>)]>,
    pub host_network: bool,
    /// `status.podIPs` (or `status.podIP` where only that is set).
    pub ips: Box<[IpAddr]>,
    /// For host-network pods only: every `containerPort` and `hostPort`,
    /// sorted, without duplicates.
    pub ports: Option<Arc<[u16]>>,
    /// Not `Succeeded` or `Failed`: a finished pod keeps `podIP` in the API
    /// but the address is free for the next pod.
    pub running: bool,
    pub mesh: Option<Arc<PodMesh>>,
    /// When the `PodScheduled` condition turned `True`.
    pub scheduled: Option<SystemTime>,
    /// When `PodReadyToStartContainers` (kubelet: sandbox and network set
    /// up) turned `True`.
    pub network_ready: Option<SystemTime>,
}

/// When the condition `kind` of a pod turned `True` (API server time, to
/// the second); `None` when it is not `True` or has no time.
fn condition_time(status: Option<&PodStatus>, kind: &str) -> Option<SystemTime> {
    let c = status?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind && c.status == "True")?;
    let ms = c.last_transition_time.as_ref()?.0.as_millisecond();
    Some(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).ok()?))
}

/// The parts of `pod` flowtel needs; `labels` are the configured keys.
pub(crate) fn pod(
    pod: &Pod,
    labels: &[Arc<str>],
    strings: &mut Interner,
) -> Result<PodParts, Malformed> {
    let id = Identity::new("Pod", &pod.metadata);
    let (uid, namespace, name) = (id.uid()?, id.namespace()?, id.name()?);
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);

    let mut ips = Vec::new();
    match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) if !list.is_empty() => {
            for (i, entry) in list.iter().enumerate() {
                ips.push(id.ip(&entry.ip, &format!("status.podIPs[{i}].ip"))?);
            }
        }
        _ => {
            if let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .filter(|ip| !ip.is_empty())
            {
                ips.push(id.ip(ip, "status.podIP")?);
            }
        }
    }
    ips.dedup();

    let mut ports = Vec::new();
    if host_network {
        let containers = spec.map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .collect::<Vec<&Container>>()
        });
        for container in containers.into_iter().flatten() {
            for p in container.ports.iter().flatten() {
                ports.push(id.port(p.container_port, "containerPort")?);
                if let Some(host_port) = p.host_port {
                    ports.push(id.port(host_port, "hostPort")?);
                }
            }
        }
        ports.sort_unstable();
        ports.dedup();
    }

    let running = !matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let node = spec
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
        .map(|n| strings.get(n));
    let selected = pod.metadata.labels.as_ref().map_or_else(Vec::new, |all| {
        labels
            .iter()
            .filter_map(|key| all.get(&**key).map(|v| (key.clone(), strings.get(v))))
            .collect()
    });
    Ok(PodParts {
        // Unique per pod: nothing to share.
        uid: Arc::from(uid),
        namespace: strings.get(namespace),
        name: Arc::from(name),
        node,
        controller: controller_of(pod.metadata.owner_references.as_deref(), strings),
        labels: selected.into_boxed_slice(),
        host_network,
        ips: ips.into_boxed_slice(),
        ports: host_network.then(|| ports.into()),
        running,
        mesh: mesh_of(pod),
        scheduled: condition_time(status, "PodScheduled"),
        network_ready: condition_time(status, "PodReadyToStartContainers"),
    })
}

/// The pod's Istio role, from its container names, annotations and `app`
/// label (see [`super::model::mesh_of`]).
fn mesh_of(pod: &Pod) -> Option<Arc<PodMesh>> {
    let containers: Vec<&str> = pod
        .spec
        .as_ref()
        .map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .map(|c| c.name.as_str())
                .collect()
        })
        .unwrap_or_default();
    let annotations: Vec<(&str, &str)> = pod
        .metadata
        .annotations
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let labels: Vec<(&str, &str)> = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == "app")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let role = super::model::mesh_of(&containers, &annotations, &labels)?;
    let annotation = |key: &str| annotations.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    Some(Arc::new(PodMesh {
        role,
        port: annotation("prometheus.io/port").and_then(|p| p.parse().ok()),
        path: annotation("prometheus.io/path")
            .filter(|p| p.starts_with('/'))
            .map(Arc::from),
    }))
}

/// A Service's uid and what names it.
pub(crate) fn service(
    service: &Service,
    strings: &mut Interner,
) -> Result<(Arc<str>, ServiceInfo), Malformed> {
    let id = Identity::new("Service", &service.metadata);
    let (uid, namespace, name) = (id.uid()?, id.namespace()?, id.name()?);
    let spec = service.spec.as_ref();
    let listed: Vec<&str> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec
            .and_then(|s| s.cluster_ip.as_deref())
            .into_iter()
            .collect(),
    };
    let mut cluster_ips = Vec::new();
    for (i, ip) in listed.into_iter().enumerate() {
        // Headless Services say "None"; ExternalName ones have none.
        if ip.is_empty() || ip == "None" {
            continue;
        }
        cluster_ips.push(id.ip(ip, &format!("spec.clusterIPs[{i}]"))?);
    }
    cluster_ips.dedup();
    let mut ports = Vec::new();
    for (i, p) in spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let protocol = match p.protocol.as_deref() {
            None | Some("TCP") => Protocol::Tcp,
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            Some(other) => {
                return Err(id.malformed(format!("spec.ports[{i}].protocol {other:?} is unknown")))
            }
        };
        ports.push(ServicePort {
            name: p
                .name
                .as_deref()
                .filter(|n| !n.is_empty())
                .map(|n| strings.get(n)),
            port: id.port(p.port, &format!("spec.ports[{i}].port"))?,
            protocol,
        });
    }
    Ok((
        Arc::from(uid),
        ServiceInfo {
            namespace: strings.get(namespace),
            name: strings.get(name),
            cluster_ips: cluster_ips.into_boxed_slice(),
            ports: ports.into_boxed_slice(),
        },
    ))
}

/// The value of the first of `keys` that `labels` has.
fn first_label(
    labels: Option<&BTreeMap<String, String>>,
    keys: &[&str],
    strings: &mut Interner,
) -> Option<Arc<str>> {
    let labels = labels?;
    keys.iter()
        .find_map(|k| labels.get(*k))
        .filter(|v| !v.is_empty())
        .map(|v| strings.get(v))
}

/// What names a node.
pub(crate) fn node(node: &Node, strings: &mut Interner) -> Result<NodeInfo, Malformed> {
    let id = Identity::new("Node", &node.metadata);
    let name = id.name()?;
    let mut addresses = Vec::new();
    let listed = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, a) in listed.into_iter().flatten().enumerate() {
        if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            addresses.push(id.ip(&a.address, &format!("status.addresses[{i}].address"))?);
        }
    }
    addresses.dedup();
    let labels = node.metadata.labels.as_ref();
    Ok(NodeInfo {
        name: strings.get(name),
        zone: first_label(labels, &[ZONE_LABEL, LEGACY_ZONE_LABEL], strings),
        region: first_label(labels, &[REGION_LABEL, LEGACY_REGION_LABEL], strings),
        addresses: addresses.into_boxed_slice(),
    })
}

/// What the cache keeps of an EndpointSlice: which Service its addresses
/// serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SliceParts {
    pub uid: Arc<str>,
    pub namespace: Arc<str>,
    /// From the `kubernetes.io/service-name` label; slices without it are
    /// not a Service's (custom endpoints).
    pub service: Option<Arc<str>>,
    pub addresses: Box<[IpAddr]>,
}

/// The backends an EndpointSlice lists.
pub(crate) fn endpoint_slice(
    slice: &EndpointSlice,
    strings: &mut Interner,
) -> Result<SliceParts, Malformed> {
    let id = Identity::new("EndpointSlice", &slice.metadata);
    let (uid, namespace) = (id.uid()?, id.namespace()?);
    id.name()?;
    let mut addresses = Vec::new();
    // FQDN slices list names, not addresses.
    if matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        for (i, endpoint) in slice.endpoints.iter().enumerate() {
            for (j, a) in endpoint.addresses.iter().enumerate() {
                addresses.push(id.ip(a, &format!("endpoints[{i}].addresses[{j}]"))?);
            }
        }
    }
    addresses.sort_unstable();
    addresses.dedup();
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .map(|s| strings.get(s));
    Ok(SliceParts {
        uid: Arc::from(uid),
        namespace: strings.get(namespace),
        service,
        addresses: addresses.into_boxed_slice(),
    })
}

/// A ReplicaSet's or Job's uid and controller, from its metadata alone.
pub(crate) fn owner(
    kind: &'static str,
    meta: &ObjectMeta,
    strings: &mut Interner,
) -> Result<(Arc<str>, Option<Controller>), Malformed> {
    let id = Identity::new(kind, meta);
    let uid = id.uid()?;
    id.namespace()?;
    id.name()?;
    Ok((
        strings.get(uid),
        controller_of(meta.owner_references.as_deref(), strings),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).expect("a well-formed test object")
    }

    #[test]
    fn pod_keeps_what_names_it_and_nothing_else() {
        let p: Pod = from_json(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "web-5f6c7-abcde", "namespace": "shop", "uid": "u-1",
                "labels": {"app.kubernetes.io/name": "web", "pod-template-hash": "5f6c7"},
                "annotations": {"big": "x".repeat(1000)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-5f6c7", "uid": "rs-1", "controller": true}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": "10.1.0.5",
                "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}
        }));
        let mut strings = Interner::default();
        let labels = [strings.get("app.kubernetes.io/name"), strings.get("team")];
        let parts = pod(&p, &labels, &mut strings).expect("valid pod");
        assert_eq!(&*parts.uid, "u-1");
        assert_eq!(&*parts.namespace, "shop");
        assert_eq!(parts.node.as_deref(), Some("n1"));
        assert_eq!(
            parts.ips.to_vec(),
            vec![
                "10.1.0.5".parse::<IpAddr>().expect("v4"),
                "fd00::5".parse().expect("v6")
            ]
        );
        assert_eq!(parts.labels.len(), 1);
        assert_eq!(
            (&*parts.labels[0].0, &*parts.labels[0].1),
            ("app.kubernetes.io/name", "web")
        );
        // Ports matter for host-network pods only.
        assert!(parts.ports.is_none());
        assert!(parts.running);
        assert_eq!(
            parts.controller.map(|c| c.name.to_string()).as_deref(),
            Some("web-5f6c7")
        );
    }

    #[test]
    fn host_network_pod_lists_its_ports() {
        let p: Pod = from_json(json!({
            "metadata": {"name": "exporter-x", "namespace": "mon", "uid": "u-2"},
            "spec": {"hostNetwork": true, "nodeName": "n1", "containers": [
                {"name": "a", "ports": [{"containerPort": 9100, "hostPort": 9100}]},
                {"name": "b", "ports": [{"containerPort": 8443}]}
            ]},
            "status": {"phase": "Succeeded", "podIP": "192.168.1.10", "hostIP": "192.168.1.10"}
        }));
        let parts = pod(&p, &[], &mut Interner::default()).expect("valid pod");
        assert!(parts.host_network);
        assert_eq!(parts.ports.as_deref(), Some(&[8443, 9100][..]));
        assert_eq!(
            parts.ips.to_vec(),
            vec!["192.168.1.10".parse::<IpAddr>().expect("v4")]
        );
        assert!(!parts.running);
    }

    #[test]
    fn malformed_objects_name_themselves() {
        let no_name: Pod = from_json(json!({"metadata": {"namespace": "ns", "uid": "u"}}));
        let err = pod(&no_name, &[], &mut Interner::default()).expect_err("no name");
        assert_eq!(
            err.to_string(),
            "Pod ns/<no name>: metadata.name is missing"
        );

        let bad_ip: Pod = from_json(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
            "status": {"podIPs": [{"ip": "10.0.0.300"}]}
        }));
        let err = pod(&bad_ip, &[], &mut Interner::default()).expect_err("bad ip");
        assert_eq!(
            err.to_string(),
            "Pod ns/p: status.podIPs[0].ip \"10.0.0.300\" is not an IP address"
        );

        let bad_svc: Service = from_json(json!({
            "metadata": {"name": "s", "namespace": "ns", "uid": "u"},
            "spec": {"clusterIP": "ten.zero"}
        }));
        let err = service(&bad_svc, &mut Interner::default()).expect_err("bad ip");
        assert!(
            err.to_string()
                .starts_with("Service ns/s: spec.clusterIPs[0]"),
            "{err}"
        );
    }

    #[test]
    fn dual_stack_and_headless_services() {
        let dual: Service = from_json(json!({
            "metadata": {"name": "api", "namespace": "shop", "uid": "s-1"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}
        }));
        let (_, info) = service(&dual, &mut Interner::default()).expect("valid service");
        assert_eq!(info.cluster_ips.len(), 2);
        assert_eq!(info.ports[1].protocol, Protocol::Udp);
        assert_eq!(info.ports[0].name.as_deref(), Some("http"));
        let headless: Service = from_json(json!({
            "metadata": {"name": "db", "namespace": "shop", "uid": "s-2"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"]}
        }));
        let (_, info) = service(&headless, &mut Interner::default()).expect("valid service");
        assert!(info.cluster_ips.is_empty());
    }

    #[test]
    fn node_zone_region_and_addresses() {
        let n: Node = from_json(json!({
            "metadata": {"name": "n1", "labels": {
                "topology.kubernetes.io/zone": "eu-west-1a",
                "failure-domain.beta.kubernetes.io/region": "eu-west-1"}},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "203.0.113.10"}]}
        }));
        let info = node(&n, &mut Interner::default()).expect("valid node");
        assert_eq!(info.zone.as_deref(), Some("eu-west-1a"));
        assert_eq!(info.region.as_deref(), Some("eu-west-1"));
        assert_eq!(info.addresses.len(), 2);
    }
}
