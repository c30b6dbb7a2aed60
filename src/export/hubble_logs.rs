//! Hubble flows as OTLP log events (`event.name` = `flowtel.hubble.flow`):
//! one per flow the agent reported, with its verdict, both ends as Cilium
//! named them and the L7 record. They sit next to the kernel source's flow
//! records and never replace them (see docs/telemetry.md, "Mesh and CNI
//! sources").

use std::time::{SystemTime, UNIX_EPOCH};

use super::otlp_wire::{Any, Batcher, Envelope, LogRecordWriter};
use crate::source::hubble::{HubbleEnd, HubbleFlow, L7Record};

pub const EVENT_HUBBLE_FLOW: &str = "flowtel.hubble.flow";

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn end(w: &mut LogRecordWriter, side: &str, e: &HubbleEnd) {
    let key = |k: &str| format!("{side}.{k}");
    if let Some(ip) = e.ip {
        w.attribute(&key("address"), Any::Str(&ip.to_string()));
    }
    if let Some(port) = e.port {
        w.attribute(&key("port"), Any::Int(i64::from(port)));
    }
    if let Some(ns) = &e.namespace {
        w.attribute(&key("k8s.namespace.name"), Any::Str(ns));
    }
    if let Some(pod) = &e.pod {
        w.attribute(&key("k8s.pod.name"), Any::Str(pod));
    }
    if let Some(wl) = &e.workload {
        w.attribute(&key("k8s.workload.kind"), Any::Str(&wl.kind));
        w.attribute(&key("k8s.workload.name"), Any::Str(&wl.name));
    }
    w.attribute(
        &format!("flowtel.hubble.{side}.identity"),
        Any::Int(i64::from(e.identity)),
    );
}

/// Writes one flow's record into `w`.
pub fn record(w: &mut LogRecordWriter, f: &HubbleFlow, observed: u64) {
    let dropped = f.verdict == "DROPPED";
    let severity = if dropped { (13, "WARN") } else { (9, "INFO") };
    let time = f.time.map_or(observed, nanos);
    w.begin(time, observed, severity, EVENT_HUBBLE_FLOW);
    let addr = |e: &HubbleEnd| match (e.ip, e.port) {
        (Some(ip), Some(port)) => std::net::SocketAddr::new(ip, port).to_string(),
        (Some(ip), None) => ip.to_string(),
        _ => "?".to_owned(),
    };
    w.body(format_args!(
        "{} {} {} -> {}",
        f.verdict,
        f.transport.map_or("-", |t| t.as_str()),
        addr(&f.source),
        addr(&f.destination)
    ));
    w.attribute("event.name", Any::Str(EVENT_HUBBLE_FLOW));
    w.attribute("flowtel.hubble.verdict", Any::Str(f.verdict));
    if let Some(reason) = &f.drop_reason {
        w.attribute("flowtel.hubble.drop_reason", Any::Str(reason));
    }
    w.attribute("flowtel.hubble.flow_type", Any::Str(f.flow_type));
    w.attribute(
        "flowtel.hubble.traffic_direction",
        Any::Str(f.direction.as_str()),
    );
    if let Some(reply) = f.is_reply {
        w.attribute("flowtel.hubble.is_reply", Any::Bool(reply));
    }
    if !f.uuid.is_empty() {
        w.attribute("flowtel.hubble.uuid", Any::Str(&f.uuid));
    }
    if !f.node_name.is_empty() {
        w.attribute("k8s.node.name", Any::Str(&f.node_name));
    }
    if let Some(t) = f.transport {
        w.attribute("network.transport", Any::Str(t.as_str()));
    }
    end(w, "source", &f.source);
    end(w, "destination", &f.destination);
    let Some(l7) = &f.l7 else { return };
    w.attribute("flowtel.hubble.l7.protocol", Any::Str(l7.record.protocol()));
    w.attribute("flowtel.hubble.l7.type", Any::Str(l7.l7_type));
    if let Some(latency) = l7.latency {
        w.attribute(
            "flowtel.hubble.l7.duration",
            Any::Double(latency.as_secs_f64()),
        );
    }
    match &l7.record {
        L7Record::Http(h) => {
            if !h.method.is_empty() {
                w.attribute("http.request.method", Any::Str(&h.method));
            }
            if let Some(code) = h.status_code {
                w.attribute("http.response.status_code", Any::Int(i64::from(code)));
            }
            if let Some(host) = &h.host {
                w.attribute("server.address", Any::Str(host));
            }
            if let Some(path) = &h.path {
                w.attribute("url.path", Any::Str(path));
            }
        }
        L7Record::Dns(d) => {
            w.attribute("dns.question.name", Any::Str(&d.query));
            if let Some(rcode) = d.rcode {
                w.attribute("flowtel.hubble.dns.rcode", Any::Int(i64::from(rcode)));
            }
        }
        L7Record::Kafka(k) => {
            w.attribute("flowtel.hubble.kafka.api_key", Any::Str(&k.api_key));
            if !k.topic.is_empty() {
                w.attribute("messaging.destination.name", Any::Str(&k.topic));
            }
            w.attribute(
                "flowtel.hubble.kafka.error_code",
                Any::Int(i64::from(k.error_code)),
            );
        }
    }
}

/// The requests carrying `flows`, each below `limit` bytes.
pub fn encode(envelope: &Envelope, limit: usize, flows: &[HubbleFlow]) -> Vec<Vec<u8>> {
    let observed = nanos(SystemTime::now());
    let mut w = LogRecordWriter::default();
    let mut batch = Batcher::new(envelope, limit);
    for f in flows {
        record(&mut w, f, observed);
        batch.item(w.encoded());
    }
    batch.finish()
}
