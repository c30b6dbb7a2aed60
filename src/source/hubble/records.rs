//! Hubble flows as log events (`event.name` = `flowtel.hubble.flow`): one
//! per flow the agent reported, with its verdict, both ends as Cilium named
//! them and the L7 record. They sit next to the kernel source's flow
//! records and never replace them (see docs/telemetry.md, "Mesh and CNI
//! sources").

use std::time::SystemTime;

use super::convert::{HubbleEnd, HubbleFlow, L7Record};
use crate::flow::mesh::{LogEvent, Severity, Value};
use crate::telemetry::catalogue as cat;

/// The attribute keys of one side of a flow.
struct Side {
    address: &'static str,
    port: &'static str,
    namespace: &'static str,
    pod: &'static str,
    workload_kind: &'static str,
    workload: &'static str,
    identity: &'static str,
}

const SOURCE: Side = Side {
    address: cat::SOURCE_ADDRESS,
    port: cat::SOURCE_PORT,
    namespace: cat::SOURCE_K8S_NAMESPACE,
    pod: cat::SOURCE_K8S_POD,
    workload_kind: cat::SOURCE_K8S_WORKLOAD_KIND,
    workload: cat::SOURCE_K8S_WORKLOAD,
    identity: cat::HUBBLE_SOURCE_IDENTITY,
};

const DESTINATION: Side = Side {
    address: cat::DESTINATION_ADDRESS,
    port: cat::DESTINATION_PORT,
    namespace: cat::DESTINATION_K8S_NAMESPACE,
    pod: cat::DESTINATION_K8S_POD,
    workload_kind: cat::DESTINATION_K8S_WORKLOAD_KIND,
    workload: cat::DESTINATION_K8S_WORKLOAD,
    identity: cat::HUBBLE_DESTINATION_IDENTITY,
};

fn text(s: &str) -> Value {
    Value::Str(s.to_owned())
}

fn end(out: &mut Vec<(&'static str, Value)>, side: &Side, e: &HubbleEnd) {
    if let Some(ip) = e.ip {
        out.push((side.address, Value::Str(ip.to_string())));
    }
    if let Some(port) = e.port {
        out.push((side.port, Value::Int(i64::from(port))));
    }
    if let Some(ns) = &e.namespace {
        out.push((side.namespace, text(ns)));
    }
    if let Some(pod) = &e.pod {
        out.push((side.pod, text(pod)));
    }
    if let Some(wl) = &e.workload {
        out.push((side.workload_kind, text(&wl.kind)));
        out.push((side.workload, text(&wl.name)));
    }
    out.push((side.identity, Value::Int(i64::from(e.identity))));
}

/// One flow's log event; `observed` stands in for a flow without a time.
pub fn record(f: &HubbleFlow, observed: SystemTime) -> LogEvent {
    let addr = |e: &HubbleEnd| match (e.ip, e.port) {
        (Some(ip), Some(port)) => std::net::SocketAddr::new(ip, port).to_string(),
        (Some(ip), None) => ip.to_string(),
        _ => "?".to_owned(),
    };
    let body = format!(
        "{} {} {} -> {}",
        f.verdict,
        f.transport.map_or("-", |t| t.as_str()),
        addr(&f.source),
        addr(&f.destination)
    );
    let mut a = vec![(cat::HUBBLE_VERDICT, text(f.verdict))];
    if let Some(reason) = &f.drop_reason {
        a.push((cat::HUBBLE_DROP_REASON, text(reason)));
    }
    a.push((cat::HUBBLE_FLOW_TYPE, text(f.flow_type)));
    a.push((cat::HUBBLE_TRAFFIC_DIRECTION, text(f.direction.as_str())));
    if let Some(reply) = f.is_reply {
        a.push((cat::HUBBLE_IS_REPLY, Value::Bool(reply)));
    }
    if !f.uuid.is_empty() {
        a.push((cat::HUBBLE_UUID, text(&f.uuid)));
    }
    if !f.node_name.is_empty() {
        a.push((cat::K8S_NODE, text(&f.node_name)));
    }
    if let Some(t) = f.transport {
        a.push((cat::NETWORK_TRANSPORT, text(t.as_str())));
    }
    end(&mut a, &SOURCE, &f.source);
    end(&mut a, &DESTINATION, &f.destination);
    if let Some(l7) = &f.l7 {
        a.push((cat::HUBBLE_L7_PROTOCOL, text(l7.record.protocol())));
        a.push((cat::HUBBLE_L7_TYPE, text(l7.l7_type)));
        if let Some(latency) = l7.latency {
            a.push((
                cat::HUBBLE_L7_DURATION_ATTRIBUTE,
                Value::Double(latency.as_secs_f64()),
            ));
        }
        match &l7.record {
            L7Record::Http(h) => {
                if !h.method.is_empty() {
                    a.push((cat::HTTP_REQUEST_METHOD, text(&h.method)));
                }
                if let Some(code) = h.status_code {
                    a.push((cat::HTTP_RESPONSE_STATUS_CODE, Value::Int(i64::from(code))));
                }
                if let Some(host) = &h.host {
                    a.push((cat::SERVER_ADDRESS, text(host)));
                }
                if let Some(path) = &h.path {
                    a.push((cat::URL_PATH, text(path)));
                }
            }
            L7Record::Dns(d) => {
                a.push((cat::DNS_QUESTION_NAME, text(&d.query)));
                if let Some(rcode) = d.rcode {
                    a.push((cat::HUBBLE_DNS_RCODE, Value::Int(i64::from(rcode))));
                }
            }
            L7Record::Kafka(k) => {
                a.push((cat::HUBBLE_KAFKA_API_KEY, text(&k.api_key)));
                if !k.topic.is_empty() {
                    a.push((cat::MESSAGING_DESTINATION_NAME, text(&k.topic)));
                }
                a.push((
                    cat::HUBBLE_KAFKA_ERROR_CODE,
                    Value::Int(i64::from(k.error_code)),
                ));
            }
        }
    }
    LogEvent {
        time: f.time.unwrap_or(observed),
        severity: if f.verdict == "DROPPED" {
            Severity::Warn
        } else {
            Severity::Info
        },
        name: cat::EVENT_HUBBLE_FLOW,
        body,
        attributes: a,
    }
}
