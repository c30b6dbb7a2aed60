//! The attributes of flow, TCP, drop and zone series, built in one place
//! so OTLP, Prometheus, the console's JSON and the flow records describe a
//! series alike. The names are the catalogue's
//! ([`crate::telemetry::catalogue`]).

use opentelemetry::KeyValue;

use crate::flow::dns::{qtype_name, rcode_name, DnsKey, DnsNamePoint};
use crate::flow::drops::DropKey;
use crate::flow::names::{EndName, Role};
use crate::flow::series::SeriesKey;
use crate::flow::zones::ZoneKey;
use crate::telemetry::catalogue::*;

/// The end on this node: semantic-conventions names, as a Collector's
/// k8sattributes processor would set them for a pod-local signal.
pub fn local_attributes(end: &EndName, attrs: &mut Vec<KeyValue>) {
    let mut put = |key: &'static str, v: &Option<std::sync::Arc<str>>| {
        if let Some(v) = v {
            attrs.push(KeyValue::new(key, v.to_string()));
        }
    };
    put(K8S_NAMESPACE, &end.namespace);
    put(K8S_POD, &end.pod);
    put(K8S_POD_UID, &end.pod_uid);
    put(K8S_WORKLOAD_KIND, &end.workload_kind);
    put(K8S_WORKLOAD, &end.workload);
    put(K8S_SERVICE, &end.service);
    put(ZONE, &end.zone);
    put(NETWORK, &end.network);
    if let (Some(kind), Some(name)) = (&end.workload_kind, &end.workload) {
        if let Some(key) = workload_attribute(kind) {
            attrs.push(KeyValue::new(key, name.to_string()));
        }
    }
    for (k, v) in end.labels.iter() {
        attrs.push(KeyValue::new(
            format!("{K8S_POD_LABEL_PREFIX}{k}"),
            v.to_string(),
        ));
    }
}

/// The other end: `flowtel.peer.*`, since no convention names a peer's
/// Kubernetes identity.
pub fn peer_attributes(end: &EndName, attrs: &mut Vec<KeyValue>) {
    let mut put = |key: &'static str, v: &Option<std::sync::Arc<str>>| {
        if let Some(v) = v {
            attrs.push(KeyValue::new(key, v.to_string()));
        }
    };
    put(PEER_K8S_NAMESPACE, &end.namespace);
    put(PEER_K8S_POD, &end.pod);
    put(PEER_K8S_WORKLOAD_KIND, &end.workload_kind);
    put(PEER_K8S_WORKLOAD, &end.workload);
    put(PEER_K8S_SERVICE, &end.service);
    put(PEER_K8S_NODE, &end.node);
    put(PEER_ZONE, &end.zone);
    put(PEER_NETWORK, &end.network);
    for (k, v) in end.labels.iter() {
        attrs.push(KeyValue::new(
            format!("{PEER_K8S_POD_LABEL_PREFIX}{k}"),
            v.to_string(),
        ));
    }
}

/// Which way the bytes of a data point travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientToServer => "client_to_server",
            Self::ServerToClient => "server_to_client",
        }
    }
}

/// The attributes of one series, and of one direction when given.
pub fn series_attributes(key: &SeriesKey, direction: Option<Direction>) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(12);
    attrs.push(KeyValue::new(SOURCE, key.source.as_str()));
    if key.overflow {
        attrs.push(KeyValue::new(OVERFLOW, true));
    }
    if let Some(t) = key.transport {
        attrs.push(KeyValue::new(NETWORK_TRANSPORT, t.as_str()));
    }
    if let Some(nt) = key.network_type {
        attrs.push(KeyValue::new(NETWORK_TYPE, nt));
    }
    if let Some(ip) = key.client {
        attrs.push(KeyValue::new(CLIENT_ADDRESS, ip.to_string()));
    }
    if let Some(port) = key.client_port {
        attrs.push(KeyValue::new(CLIENT_PORT, i64::from(port)));
    }
    if let Some(ip) = key.server {
        attrs.push(KeyValue::new(SERVER_ADDRESS, ip.to_string()));
    }
    if let Some(port) = key.server_port {
        attrs.push(KeyValue::new(SERVER_PORT, i64::from(port)));
    }
    if let Some(nat) = key.nat_server {
        attrs.push(KeyValue::new(NAT_SERVER_ADDRESS, nat.ip.to_string()));
        attrs.push(KeyValue::new(NAT_SERVER_PORT, i64::from(nat.port)));
    }
    if let Some(nat) = key.nat_client {
        attrs.push(KeyValue::new(NAT_CLIENT_ADDRESS, nat.ip.to_string()));
        attrs.push(KeyValue::new(NAT_CLIENT_PORT, i64::from(nat.port)));
    }
    if let Some(d) = direction {
        attrs.push(KeyValue::new(FLOW_DIRECTION, d.as_str()));
    }
    name_attributes(
        key.local,
        key.client_name.as_deref(),
        key.server_name.as_deref(),
        key.pending,
        &mut attrs,
    );
    attrs
}

/// What names a flow's two ends (only the named ones: `None` is keyed by
/// address), framed local/peer, plus the pending mark. Shared by the metrics
/// and the flow records so both describe an end the same way.
pub fn name_attributes(
    local: Option<Role>,
    client: Option<&EndName>,
    server: Option<&EndName>,
    pending: bool,
    attrs: &mut Vec<KeyValue>,
) {
    if pending {
        attrs.push(KeyValue::new(ENRICHMENT_PENDING, true));
    }
    if client.is_none() && server.is_none() {
        return;
    }
    // Routed traffic (neither end here) is described from the client.
    let role = local.unwrap_or(Role::Client);
    let (local, peer) = match role {
        Role::Client => (client, server),
        Role::Server => (server, client),
    };
    attrs.push(KeyValue::new(LOCAL_ROLE, role.as_str()));
    if let Some(end) = local {
        local_attributes(end, attrs);
    }
    if let Some(end) = peer {
        peer_attributes(end, attrs);
    }
}

/// The attributes of one drop series.
pub fn drop_attributes(key: &DropKey) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new(DROP_REASON, key.reason),
        KeyValue::new(NETWORK_TRANSPORT, key.transport.as_str()),
    ];
    if let Some(nt) = key.network_type {
        attrs.push(KeyValue::new(NETWORK_TYPE, nt));
    }
    attrs
}

/// The attributes of one DNS series: how the lookup ended, its type, the
/// server the client addressed, and the client's name (else its address).
pub fn dns_attributes(key: &DnsKey) -> Vec<KeyValue> {
    let rcode = key.rcode.map_or_else(|| "TIMEOUT".into(), rcode_name);
    let mut attrs = vec![
        KeyValue::new(DNS_RCODE, rcode.to_string()),
        KeyValue::new(DNS_QUESTION_TYPE, qtype_name(key.qtype).to_string()),
        KeyValue::new(NETWORK_TRANSPORT, key.transport.as_str()),
        KeyValue::new(SERVER_ADDRESS, key.server.ip.to_string()),
        KeyValue::new(SERVER_PORT, i64::from(key.server.port)),
    ];
    if let Some(ip) = key.client {
        attrs.push(KeyValue::new(CLIENT_ADDRESS, ip.to_string()));
    }
    if let Some(n) = &key.names {
        name_attributes(n.local, Some(&n.client), Some(&n.server), false, &mut attrs);
    }
    attrs
}

/// The attributes of one query-name series: the name, or the overflow
/// marker.
pub fn dns_name_attributes(p: &DnsNamePoint) -> Vec<KeyValue> {
    match &p.name {
        Some(name) => vec![KeyValue::new(DNS_QUESTION_NAME, name.to_string())],
        None => vec![KeyValue::new(OVERFLOW, true)],
    }
}

/// The attributes of one zone pair and direction.
pub fn zone_attributes(key: &ZoneKey, direction: Direction) -> Vec<KeyValue> {
    let crossing = if key.local == key.peer {
        "same_zone"
    } else {
        "cross_zone"
    };
    vec![
        KeyValue::new(ZONE, key.local.to_string()),
        KeyValue::new(PEER_ZONE, key.peer.to_string()),
        KeyValue::new(ZONE_CROSSING, crossing),
        KeyValue::new(FLOW_DIRECTION, direction.as_str()),
    ]
}
