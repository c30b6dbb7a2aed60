//! Hubble's `flow.Flow` turned into flowtel's own plain [`HubbleFlow`], so
//! that no prost type reaches the aggregation, the exporter or the tests of
//! either. Nothing in a flow is trusted: absent or unparsable addresses,
//! out-of-range ports and enum numbers this build does not know are kept as
//! `None`/`UNKNOWN_<n>` and listed in [`Converted::anomalies`], never a
//! panic or a dropped flow.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use super::proto;
use crate::flow::model::Transport;

/// One Hubble flow event, in flowtel's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct HubbleFlow {
    /// When the agent saw it; `None` when absent or out of range.
    pub time: Option<SystemTime>,
    /// Hubble's flow UUID (empty on agents too old to send one).
    pub uuid: String,
    /// Hubble's verdict name: `FORWARDED`, `DROPPED`, `AUDIT`, ...;
    /// `VERDICT_UNKNOWN` for a number this build does not know.
    pub verdict: &'static str,
    /// For `DROPPED`: the reason's name (`POLICY_DENIED`), or `UNKNOWN_<n>`.
    pub drop_reason: Option<String>,
    /// `None` when the flow has no L4 section (e.g. an L7 record or a
    /// protocol Hubble does not parse).
    pub transport: Option<Transport>,
    /// ICMP type and code, for ICMP flows.
    pub icmp: Option<(u8, u8)>,
    pub source: HubbleEnd,
    pub destination: HubbleEnd,
    pub direction: Direction,
    /// `None` when Hubble could not tell (`is_reply` absent).
    pub is_reply: Option<bool>,
    /// `L3_L4`, `L7`, `SOCK` or `UNKNOWN_TYPE`.
    pub flow_type: &'static str,
    pub node_name: String,
    pub l7: Option<L7>,
}

/// One end of a flow, as Cilium knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubbleEnd {
    pub ip: Option<IpAddr>,
    /// For TCP, UDP and SCTP.
    pub port: Option<u16>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    /// The pod's top-level controller, as Cilium resolved it.
    pub workload: Option<Workload>,
    /// Cilium's security identity (1 host, 2 world, ...; ≥ 256 for pods).
    pub identity: u32,
    /// `source:key=value` labels (`k8s:app=nginx`, `reserved:world`).
    pub labels: Vec<String>,
    pub cluster: Option<String>,
    /// The Service the end was reached through or belongs to.
    pub service: Option<ServiceName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    pub name: String,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, ...
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

/// Which way the traffic crossed the endpoint's policy boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
    Unknown,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
            Self::Unknown => "unknown",
        }
    }
}

/// An L7 record from Cilium's proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct L7 {
    /// `request`, `response`, `sample` or `unknown`.
    pub l7_type: &'static str,
    /// Request to response, set on responses.
    pub latency: Option<Duration>,
    pub record: L7Record,
}

#[derive(Debug, Clone, PartialEq)]
pub enum L7Record {
    Http(Http),
    Dns(Dns),
    Kafka(Kafka),
}

impl L7Record {
    /// `http`, `dns` or `kafka`.
    pub fn protocol(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Dns(_) => "dns",
            Self::Kafka(_) => "kafka",
        }
    }
}

/// HTTP, without the query string or user info of the URL: those carry
/// tokens and personal data, and would make every URL unique.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http {
    pub method: String,
    /// Set on responses.
    pub status_code: Option<u16>,
    pub host: Option<String>,
    pub path: Option<String>,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    pub query: String,
    /// Set on responses: the IANA RCODE.
    pub rcode: Option<u32>,
    pub qtypes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kafka {
    /// `produce`, `fetch`, ...
    pub api_key: String,
    pub topic: String,
    pub error_code: i32,
}

/// A converted flow and what was wrong with it, by kind (`no_ip`,
/// `bad_ip`, `bad_port`, `bad_time`, `unknown_verdict`,
/// `unknown_drop_reason`, `unknown_direction`, `unknown_l7_type`,
/// `l7_without_record`); the caller counts these.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    pub flow: HubbleFlow,
    pub anomalies: Vec<&'static str>,
}

/// Converts one flow; never fails.
pub fn convert(flow: proto::Flow) -> Converted {
    let mut anomalies = Vec::new();
    let time = flow.time.and_then(|t| {
        let time = timestamp(t);
        if time.is_none() {
            anomalies.push("bad_time");
        }
        time
    });
    let verdict = match proto::Verdict::try_from(flow.verdict) {
        Ok(v) => v.as_str_name(),
        Err(_) => {
            anomalies.push("unknown_verdict");
            proto::Verdict::VERDICT_UNKNOWN.as_str_name()
        }
    };
    let drop_reason = drop_reason(&flow, verdict, &mut anomalies);
    let direction = match proto::TrafficDirection::try_from(flow.traffic_direction) {
        Ok(proto::TrafficDirection::INGRESS) => Direction::Ingress,
        Ok(proto::TrafficDirection::EGRESS) => Direction::Egress,
        Ok(proto::TrafficDirection::TRAFFIC_DIRECTION_UNKNOWN) => Direction::Unknown,
        Err(_) => {
            anomalies.push("unknown_direction");
            Direction::Unknown
        }
    };
    let flow_type = proto::FlowType::try_from(flow.r#type)
        .unwrap_or(proto::FlowType::UNKNOWN_TYPE)
        .as_str_name();

    let mut source = end(flow.source, flow.source_service);
    let mut destination = end(flow.destination, flow.destination_service);
    match &flow.ip {
        Some(ip) => {
            source.ip = address(&ip.source, &mut anomalies);
            destination.ip = address(&ip.destination, &mut anomalies);
        }
        None => anomalies.push("no_ip"),
    }

    let (transport, icmp) = match flow.l4.and_then(|l4| l4.protocol) {
        Some(proto::Protocol::Tcp(tcp)) => {
            source.port = port(tcp.source_port, &mut anomalies);
            destination.port = port(tcp.destination_port, &mut anomalies);
            (Some(Transport::Tcp), None)
        }
        Some(proto::Protocol::Udp(udp)) => {
            source.port = port(udp.source_port, &mut anomalies);
            destination.port = port(udp.destination_port, &mut anomalies);
            (Some(Transport::Udp), None)
        }
        Some(proto::Protocol::Sctp(sctp)) => {
            source.port = port(sctp.source_port, &mut anomalies);
            destination.port = port(sctp.destination_port, &mut anomalies);
            (Some(Transport::Sctp), None)
        }
        Some(proto::Protocol::IcmpV4(icmp)) => (Some(Transport::Icmp), icmp_fields(icmp)),
        Some(proto::Protocol::IcmpV6(icmp)) => (Some(Transport::Icmpv6), icmp_fields(icmp)),
        None => (None, None),
    };

    let l7 = flow.l7.and_then(|l7| layer7(l7, &mut anomalies));
    let is_reply = flow.is_reply.map(|b| b.value);

    Converted {
        flow: HubbleFlow {
            time,
            uuid: flow.uuid,
            verdict,
            drop_reason,
            transport,
            icmp,
            source,
            destination,
            direction,
            is_reply,
            flow_type,
            node_name: flow.node_name,
            l7,
        },
        anomalies,
    }
}

/// A protobuf timestamp as a `SystemTime`; `None` when it is out of the
/// protobuf range (nanos outside 0..1e9) or before the epoch.
pub fn timestamp(t: proto::Timestamp) -> Option<SystemTime> {
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    let seconds = u64::try_from(t.seconds).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// The inverse of [`timestamp`], for `since` in a request.
pub fn to_timestamp(time: SystemTime) -> proto::Timestamp {
    let since_epoch = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    proto::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        // Always below 1e9, so it fits.
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or(0),
    }
}

/// The drop reason of a `DROPPED` flow, from `drop_reason_desc`, else from
/// the deprecated numeric field older agents fill.
fn drop_reason(
    flow: &proto::Flow,
    verdict: &'static str,
    anomalies: &mut Vec<&'static str>,
) -> Option<String> {
    let number = if flow.drop_reason_desc != 0 {
        flow.drop_reason_desc
    } else {
        i32::try_from(flow.drop_reason).unwrap_or(i32::MAX)
    };
    if number == 0 {
        return (verdict == "DROPPED").then(|| "DROP_REASON_UNKNOWN".to_owned());
    }
    Some(match proto::DropReason::try_from(number) {
        Ok(reason) => reason.as_str_name().to_owned(),
        Err(_) => {
            anomalies.push("unknown_drop_reason");
            format!("UNKNOWN_{number}")
        }
    })
}

fn end(endpoint: Option<proto::Endpoint>, service: Option<proto::Service>) -> HubbleEnd {
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    let service = service.and_then(|s| {
        (!s.name.is_empty()).then_some(ServiceName {
            namespace: s.namespace,
            name: s.name,
        })
    });
    let Some(endpoint) = endpoint else {
        return HubbleEnd {
            service,
            ..HubbleEnd::default()
        };
    };
    HubbleEnd {
        ip: None,
        port: None,
        namespace: non_empty(endpoint.namespace),
        pod: non_empty(endpoint.pod_name),
        workload: endpoint
            .workloads
            .into_iter()
            .find(|w| !w.name.is_empty())
            .map(|w| Workload {
                name: w.name,
                kind: w.kind,
            }),
        identity: endpoint.identity,
        labels: endpoint.labels,
        cluster: non_empty(endpoint.cluster_name),
        service,
    }
}

fn address(text: &str, anomalies: &mut Vec<&'static str>) -> Option<IpAddr> {
    if text.is_empty() {
        anomalies.push("no_ip");
        return None;
    }
    let parsed = text.parse().ok();
    if parsed.is_none() {
        anomalies.push("bad_ip");
    }
    parsed
}

fn port(number: u32, anomalies: &mut Vec<&'static str>) -> Option<u16> {
    let port = u16::try_from(number).ok();
    if port.is_none() {
        anomalies.push("bad_port");
    }
    port
}

fn icmp_fields(icmp: proto::Icmp) -> Option<(u8, u8)> {
    Some((
        u8::try_from(icmp.r#type).ok()?,
        u8::try_from(icmp.code).ok()?,
    ))
}

fn layer7(l7: proto::Layer7, anomalies: &mut Vec<&'static str>) -> Option<L7> {
    let l7_type = match proto::L7FlowType::try_from(l7.r#type) {
        Ok(proto::L7FlowType::REQUEST) => "request",
        Ok(proto::L7FlowType::RESPONSE) => "response",
        Ok(proto::L7FlowType::SAMPLE) => "sample",
        Ok(proto::L7FlowType::UNKNOWN_L7_TYPE) => "unknown",
        Err(_) => {
            anomalies.push("unknown_l7_type");
            "unknown"
        }
    };
    let is_response = l7_type == "response";
    let record = match l7.record {
        Some(proto::Record::Http(http)) => {
            let (host, path) = split_url(&http.url);
            L7Record::Http(Http {
                method: http.method,
                status_code: u16::try_from(http.code).ok().filter(|c| *c != 0),
                host,
                path,
                protocol: http.protocol,
            })
        }
        Some(proto::Record::Dns(dns)) => L7Record::Dns(Dns {
            query: dns.query,
            rcode: is_response.then_some(dns.rcode),
            qtypes: dns.qtypes,
        }),
        Some(proto::Record::Kafka(kafka)) => L7Record::Kafka(Kafka {
            api_key: kafka.api_key,
            topic: kafka.topic,
            error_code: kafka.error_code,
        }),
        None => {
            anomalies.push("l7_without_record");
            return None;
        }
    };
    Some(L7 {
        l7_type,
        latency: (l7.latency_ns > 0).then(|| Duration::from_nanos(l7.latency_ns)),
        record,
    })
}

/// Host and path of a URL, never its query string, fragment or user info.
/// Cilium sends absolute URLs (`http://host/path?q`), but a bare path is
/// accepted too.
pub fn split_url(url: &str) -> (Option<String>, Option<String>) {
    if url.is_empty() {
        return (None, None);
    }
    if let Ok(parsed) = url::Url::parse(url) {
        let host = parsed.host_str().map(str::to_owned);
        let path = Some(parsed.path().to_owned()).filter(|p| !p.is_empty());
        return (host, path);
    }
    let end = url.find(['?', '#']).unwrap_or(url.len());
    let path = &url[..end];
    (None, Some(path.to_owned()).filter(|p| !p.is_empty()))
}

/// The name of a DNS RCODE (RFC 1035, 2136, 6895), `RCODE_<n>` otherwise.
pub fn rcode_name(rcode: u32) -> String {
    let name = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        other => return format!("RCODE_{other}"),
    };
    name.to_owned()
}

/// Cilium's reserved identities, by number, for ends without labels.
fn reserved_identity(identity: u32) -> Option<&'static str> {
    Some(match identity {
        1 => "host",
        2 => "world",
        3 => "unmanaged",
        4 => "health",
        5 => "init",
        6 => "remote-node",
        7 => "kube-apiserver",
        8 => "ingress",
        _ => return None,
    })
}

impl HubbleEnd {
    /// What the end is, in few enough values for a metric attribute:
    /// `(kind, name)` of its workload; a bare pod is `("Pod", pod)`; an end
    /// that is not a pod is `("reserved", "world" | "host" | ...)` from its
    /// `reserved:` label or identity; otherwise `("", "unknown")`. Never an
    /// address, so the series count stays bounded.
    pub fn workload_key(&self) -> (&str, &str) {
        if let Some(w) = &self.workload {
            return (&w.kind, &w.name);
        }
        if let Some(pod) = &self.pod {
            return ("Pod", pod);
        }
        let reserved: Vec<&str> = self
            .labels
            .iter()
            .filter_map(|l| l.strip_prefix("reserved:"))
            .collect();
        // `reserved:world` comes with more specific labels (kube-apiserver)
        // on CIDR identities; prefer those.
        if let Some(name) = reserved
            .iter()
            .find(|n| **n != "world")
            .or(reserved.first())
        {
            return ("reserved", name);
        }
        match reserved_identity(self.identity) {
            Some(name) => ("reserved", name),
            None => ("", "unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_query_and_credentials() {
        assert_eq!(
            split_url("http://user:pw@api.example:8080/v1/items?token=secret#x"),
            (Some("api.example".into()), Some("/v1/items".into()))
        );
        assert_eq!(
            split_url("/healthz?probe=1"),
            (None, Some("/healthz".into()))
        );
        assert_eq!(split_url(""), (None, None));
    }

    #[test]
    fn timestamps_out_of_range_are_rejected() {
        assert_eq!(
            timestamp(proto::Timestamp {
                seconds: 1,
                nanos: 1_000_000_000
            }),
            None
        );
        assert_eq!(
            timestamp(proto::Timestamp {
                seconds: -1,
                nanos: 0
            }),
            None
        );
        let t = proto::Timestamp {
            seconds: 1_771_990_000,
            nanos: 42,
        };
        assert_eq!(timestamp(t).map(to_timestamp), Some(t));
    }

    #[test]
    fn malformed_flow_is_kept_and_explained() {
        let converted = convert(proto::Flow {
            verdict: 99,
            drop_reason_desc: 250,
            traffic_direction: 7,
            l4: Some(proto::Layer4 {
                protocol: Some(proto::Protocol::Udp(proto::Udp {
                    source_port: 70_000,
                    destination_port: 53,
                })),
            }),
            ..proto::Flow::default()
        });
        let flow = converted.flow;
        assert_eq!(flow.verdict, "VERDICT_UNKNOWN");
        assert_eq!(flow.drop_reason.as_deref(), Some("UNKNOWN_250"));
        assert_eq!(flow.direction, Direction::Unknown);
        assert_eq!(flow.source.port, None);
        assert_eq!(flow.destination.port, Some(53));
        assert_eq!(flow.source.ip, None);
        assert_eq!(flow.source.workload_key(), ("", "unknown"));
        assert_eq!(
            converted.anomalies,
            vec![
                "unknown_verdict",
                "unknown_drop_reason",
                "unknown_direction",
                "no_ip",
                "bad_port"
            ]
        );
    }

    #[test]
    fn reserved_ends_are_named_by_label_then_identity() {
        let end = |labels: &[&str], identity| HubbleEnd {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            identity,
            ..HubbleEnd::default()
        };
        assert_eq!(
            end(&["reserved:kube-apiserver", "reserved:world"], 16_777_217).workload_key(),
            ("reserved", "kube-apiserver")
        );
        assert_eq!(
            end(&["reserved:world"], 2).workload_key(),
            ("reserved", "world")
        );
        assert_eq!(end(&[], 1).workload_key(), ("reserved", "host"));
    }
}
