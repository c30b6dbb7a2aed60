//! Mesh and CNI sources end to end: the flowtel binary, the test Kubernetes
//! API holding Istio-meshed pods whose addresses are 127.0.0.x, local HTTP
//! servers at those addresses serving Envoy sidecar, ztunnel and Felix
//! exposition text (`tests/common/mesh.rs`), and the test Hubble Observer on
//! a Unix socket.
//!
//! `istio_felix_hubble_and_bad_targets_to_otlp` asserts on what the test
//! OTLP receiver got, and on the Prometheus endpoint of the same run:
//! * Istio families with OTel names on the node's resource, each point
//!   naming its pod (`k8s.*`, `flowtel.k8s.workload.*`), the exposition's
//!   labels (escaped values unescaped) and the exact values, histograms
//!   included;
//! * Felix families on the node's resource, exact values;
//! * Hubble flows, L7 requests and durations, exact, with the stream broken
//!   mid-way once (counted in `flowtel.hubble.stream.errors`);
//! * the bad targets (truncated, non-UTF-8, 100 MB, slow-loris, wrong
//!   content type) each counted in `flowtel.scrape.errors` by kind, the good
//!   targets' metrics arriving anyway, and flowtel still running;
//! * the detected CNI and the active sources, in `/readyz` and in
//!   `flowtel.sources.active` / `flowtel.cni.detected`;
//! * every mesh point received over OTLP is a series of `/metrics` under
//!   the name and labels the OTLP→Prometheus translation gives it (names
//!   from a table here, not from flowtel's code), with the same value, and
//!   `/metrics` has no other mesh series.
//!
//! `mesh_sources_on_the_prometheus_endpoint_alone`: with no OTLP endpoint,
//! the sources still run: `/metrics` serves the exact Istio and Felix
//! values with the pods' labels, `/readyz` names the active sources, and
//! `promtool check metrics` accepts the text.
//!
//! Also, without root: the fixtures parse as real scrapes do, and the
//! growing fixture of `tests/dashboards.rs` grows as it says.
//!
//! Needs root, `ip` and `nft` (flowtel's kernel source reads a throwaway
//! namespace; see `tests/common/mod.rs`); the second test also `promtool`.

mod common;
// Only part of the Hubble test server is used here.
#[allow(dead_code)]
#[path = "common/hubble_server.rs"]
mod hubble_server;
#[path = "common/prometheus.rs"]
#[allow(dead_code)]
mod prometheus;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::flowtel::{Flowtel, FlowtelArgs};
use common::kubeapi::{fx, KubeApi};
use common::mesh::{
    self as mesh, advanced, meshed_pod, serve, Behaviour, ENVOY, FELIX, OPENMETRICS, TEXT, ZTUNNEL,
};
use common::netns::NetnsGuard;
use common::otlp_receiver::{attrs_of, AttrValue, Attrs, OtlpReceiver};
use flowtel::flow::mesh::PointValue;
use flowtel::source::hubble::proto;
use flowtel::source::scrape::{parse, Format};
use hubble_server::{respond, HubbleServer, Step};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prometheus::{http_get, promtool_check_metrics, PROMTOOL};
use serde_json::json;

const NODE: &str = "node-m";

// ---------- fixtures parse as the real scrapes do ----------

#[test]
fn fixtures_parse_with_their_values() {
    let envoy = parse(ENVOY, Format::Text, flowtel::source::istio::ISTIO_FAMILIES)
        .expect("the Envoy fixture parses");
    let names: Vec<&str> = envoy.iter().map(|f| f.metric.name).collect();
    assert_eq!(
        names,
        [
            "istio.requests",
            "istio.request.duration",
            "istio.tcp.sent",
            "istio.tcp.received",
            "istio.tcp.connections.opened",
            "istio.tcp.connections.closed"
        ]
    );
    let sent = &envoy[2].points[0];
    assert!(sent.labels.contains(&(
        "destination_service_name".into(),
        "legacy \"billing\" \\ v2\nblue".into()
    )));
    assert_eq!(sent.value, PointValue::Number(52_428_800.0));
    let ztunnel = parse(
        ZTUNNEL,
        Format::OpenMetrics,
        flowtel::source::istio::ISTIO_FAMILIES,
    )
    .expect("the ztunnel fixture parses");
    let opened = ztunnel
        .iter()
        .find(|f| f.metric.name == "istio.tcp.connections.opened")
        .expect("ztunnel has opened connections");
    assert_eq!(opened.points.len(), 3);
    assert_eq!(opened.points[0].value, PointValue::Number(831.0));
    let felix = parse(FELIX, Format::Text, flowtel::source::felix::FELIX_FAMILIES)
        .expect("the Felix fixture parses");
    let rules = felix
        .iter()
        .find(|f| f.metric.name == "felix.iptables.rules")
        .expect("felix has iptables rules");
    assert_eq!(rules.points.len(), 4);
}

#[test]
fn the_growing_fixture_grows_counters_and_histograms_only() {
    let text = "# TYPE c counter\nc_total{a=\"x y\"} 3\nc_total{a=\"z\"} 0\n\
                # TYPE g gauge\ng 4\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_sum 1.5\nh_count 2\n# EOF\n";
    assert_eq!(advanced(text, 0), text);
    assert_eq!(
        advanced(text, 2),
        "# TYPE c counter\nc_total{a=\"x y\"} 11\nc_total{a=\"z\"} 2\n\
         # TYPE g gauge\ng 4\n# TYPE h histogram\nh_bucket{le=\"1\"} 6\nh_sum 4.5\nh_count 6\n# EOF\n"
    );
    // The fixtures keep parsing, with their counters grown.
    let envoy = parse(
        &advanced(ENVOY, 3),
        Format::Text,
        flowtel::source::istio::ISTIO_FAMILIES,
    )
    .expect("the grown Envoy fixture parses");
    let requests = &envoy[0].points;
    assert_eq!(
        requests.iter().map(|p| p.value.clone()).collect::<Vec<_>>(),
        [
            PointValue::Number(1042.0 * 4.0 + 3.0),
            PointValue::Number(7.0 * 4.0 + 3.0)
        ]
    );
    let felix = parse(
        &advanced(FELIX, 1),
        Format::Text,
        flowtel::source::felix::FELIX_FAMILIES,
    )
    .expect("the grown Felix fixture parses");
    let value = |name: &str| {
        felix
            .iter()
            .find(|f| f.metric.name == name)
            .map(|f| f.points[0].value.clone())
    };
    assert_eq!(
        value("felix.dataplane.failures"),
        Some(PointValue::Number(1.0))
    );
    assert_eq!(
        value("felix.active.local.endpoints"),
        Some(PointValue::Number(4.0))
    );
    assert!(parse(
        &advanced(ZTUNNEL, 5),
        Format::OpenMetrics,
        flowtel::source::istio::ISTIO_FAMILIES
    )
    .is_ok());
}

// ---------- Hubble ----------

fn endpoint(namespace: &str, pod: &str, workload: &str, identity: u32) -> proto::Endpoint {
    proto::Endpoint {
        id: identity % 1000,
        identity,
        namespace: namespace.into(),
        labels: vec![format!("k8s:app={workload}")],
        pod_name: pod.into(),
        workloads: vec![proto::Workload {
            name: workload.into(),
            kind: "Deployment".into(),
        }],
        cluster_name: "default".into(),
    }
}

fn web() -> proto::Endpoint {
    endpoint("shop", "web-6d9f7c8b5-x2k4q", "web", 41_231)
}

fn api() -> proto::Endpoint {
    endpoint("shop", "api-77b9d6f4c-p8zlm", "api", 18_944)
}

/// Forwarded TCP web → api, numbered; `l7` makes it an HTTP record.
fn hubble_flow(n: u32, l7: Option<(proto::L7FlowType, u64)>) -> Step {
    let reply = matches!(l7, Some((proto::L7FlowType::RESPONSE, _)));
    let (web, api) = ((web(), "10.0.1.5", 40_000 + n), (api(), "10.0.2.7", 8080));
    let (src, dst) = if reply { (api, web) } else { (web, api) };
    let time = proto::Timestamp {
        seconds: 1_771_990_000 + i64::from(n),
        nanos: 0,
    };
    let mut flow = hubble_server::flow(
        &format!("00000000-0000-4000-8000-{n:012}"),
        time,
        src,
        dst,
        false,
        proto::TrafficDirection::EGRESS,
        reply,
    );
    flow.node_name = NODE.into();
    if let Some((kind, latency_ms)) = l7 {
        let record = proto::Record::Http(proto::Http {
            code: if reply { 200 } else { 0 },
            method: "GET".into(),
            url: "http://api.shop:8080/v1/items?id=7".into(),
            protocol: "HTTP/1.1".into(),
            headers: Vec::new(),
        });
        flow = hubble_server::l7(flow, kind, latency_ms, record);
    }
    respond(flow)
}

/// First stream: 3 L3/L4 flows, an HTTP request, then an error status.
/// Second stream: 2 more flows and the response (30 ms), then it stays open.
fn hubble_script() -> Vec<Vec<Step>> {
    vec![
        vec![
            hubble_flow(1, None),
            hubble_flow(2, None),
            hubble_flow(3, None),
            hubble_flow(4, Some((proto::L7FlowType::REQUEST, 0))),
            Step::Fail(tonic::Status::internal("agent restarting")),
        ],
        vec![
            hubble_flow(5, None),
            hubble_flow(6, None),
            hubble_flow(7, Some((proto::L7FlowType::RESPONSE, 30))),
            Step::Wait(Duration::from_secs(3600)),
        ],
    ]
}

// ---------- what the receiver got ----------

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(i64),
    Double(f64),
    Histogram {
        bounds: Vec<f64>,
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

#[derive(Debug, Clone)]
struct Point {
    metric: String,
    unit: String,
    scope: String,
    resource: Attrs,
    attrs: Attrs,
    value: Value,
    time: u64,
}

fn points(receiver: &OtlpReceiver) -> Vec<Point> {
    let mut out = Vec::new();
    for r in receiver.received(0) {
        for rm in &r.request.resource_metrics {
            let resource = rm
                .resource
                .as_ref()
                .map(|r| attrs_of(&r.attributes))
                .unwrap_or_default();
            for (sm, m) in rm
                .scope_metrics
                .iter()
                .flat_map(|s| s.metrics.iter().map(move |m| (s, m)))
            {
                let scope = sm
                    .scope
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                let mut push = |attrs, value, time| {
                    out.push(Point {
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        scope: scope.clone(),
                        resource: resource.clone(),
                        attrs,
                        value,
                        time,
                    })
                };
                let number = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsInt(i)) => Value::Int(*i),
                    Some(number_data_point::Value::AsDouble(d)) => Value::Double(*d),
                    None => Value::Int(i64::MIN),
                };
                match &m.data {
                    Some(metric::Data::Sum(s)) => {
                        for p in &s.data_points {
                            push(attrs_of(&p.attributes), number(&p.value), p.time_unix_nano);
                        }
                    }
                    Some(metric::Data::Gauge(g)) => {
                        for p in &g.data_points {
                            push(attrs_of(&p.attributes), number(&p.value), p.time_unix_nano);
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            push(
                                attrs_of(&p.attributes),
                                Value::Histogram {
                                    bounds: p.explicit_bounds.clone(),
                                    counts: p.bucket_counts.clone(),
                                    sum: p.sum.unwrap_or(f64::NAN),
                                    count: p.count,
                                },
                                p.time_unix_nano,
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// The newest point of `metric` whose resource and attributes include
/// every pair of `resource` and `attrs`.
fn find<'a>(
    all: &'a [Point],
    metric: &str,
    resource: &[(&str, &str)],
    attrs: &[(&str, &str)],
) -> Option<&'a Point> {
    let has = |set: &Attrs, pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .all(|(k, v)| set.get(*k) == Some(&AttrValue::Str((*v).into())))
    };
    all.iter()
        .filter(|p| p.metric == metric && has(&p.resource, resource) && has(&p.attrs, attrs))
        .max_by_key(|p| p.time)
}

/// The newest value of each attribute set of `metric`, on any resource.
fn latest(all: &[Point], metric: &str) -> BTreeMap<Attrs, Value> {
    let mut newest: BTreeMap<Attrs, (u64, Value)> = BTreeMap::new();
    for p in all.iter().filter(|p| p.metric == metric) {
        let key = p.attrs.clone();
        if newest.get(&key).is_none_or(|(t, _)| *t <= p.time) {
            newest.insert(key, (p.time, p.value.clone()));
        }
    }
    newest.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

fn int_sum(values: &BTreeMap<Attrs, Value>) -> i64 {
    values
        .values()
        .map(|v| match v {
            Value::Int(i) => *i,
            _ => 0,
        })
        .sum()
}

fn scrape_errors(all: &[Point]) -> BTreeMap<(String, String), i64> {
    latest(all, "flowtel.scrape.errors")
        .into_iter()
        .filter_map(|(attrs, v)| {
            let s = |k: &str| match attrs.get(k) {
                Some(AttrValue::Str(s)) => s.clone(),
                _ => String::new(),
            };
            match v {
                Value::Int(i) => Some(((s("flowtel.scrape.target"), s("error.type")), i)),
                _ => None,
            }
        })
        .collect()
}

// ---------- the Prometheus endpoint ----------

/// The Prometheus name of every mesh metric, written out (docs/telemetry.md
/// lists the same): what a Collector's Prometheus exporters make of the
/// OTLP metric (the unit as a word unless the name holds it, `_total` on
/// counters, `ratio` on gauges in `1`). Histograms are `NAME_bucket`,
/// `NAME_sum` and `NAME_count`.
const PROMETHEUS_NAMES: [(&str, &str); 57] = [
    ("istio.requests", "istio_requests_total"),
    (
        "istio.request.duration",
        "istio_request_duration_milliseconds",
    ),
    ("istio.tcp.sent", "istio_tcp_sent_bytes_total"),
    ("istio.tcp.received", "istio_tcp_received_bytes_total"),
    (
        "istio.tcp.connections.opened",
        "istio_tcp_connections_opened_total",
    ),
    (
        "istio.tcp.connections.closed",
        "istio_tcp_connections_closed_total",
    ),
    ("calico.denied.packets", "calico_denied_packets"),
    ("calico.denied.bytes", "calico_denied_bytes"),
    (
        "felix.active.local.endpoints",
        "felix_active_local_endpoints",
    ),
    ("felix.active.local.policies", "felix_active_local_policies"),
    ("felix.cluster.policies", "felix_cluster_policies"),
    ("felix.iptables.rules", "felix_iptables_rules"),
    ("felix.ipsets", "felix_ipsets"),
    (
        "felix.bpf.dataplane.endpoints",
        "felix_bpf_dataplane_endpoints",
    ),
    (
        "felix.bpf.dataplane.endpoints.dirty",
        "felix_bpf_dataplane_endpoints_dirty",
    ),
    ("felix.resync.state", "felix_resync_state_ratio"),
    ("felix.dataplane.failures", "felix_dataplane_failures_total"),
    ("felix.dataplane.messages", "felix_dataplane_messages_total"),
    (
        "felix.iptables.restore.errors",
        "felix_iptables_restore_errors_total",
    ),
    (
        "felix.iptables.save.errors",
        "felix_iptables_save_errors_total",
    ),
    ("felix.ipset.errors", "felix_ipset_errors_total"),
    ("felix.resyncs.started", "felix_resyncs_started_total"),
    ("flowtel.hubble.flows", "flowtel_hubble_flows_total"),
    (
        "flowtel.hubble.l7.requests",
        "flowtel_hubble_l7_requests_total",
    ),
    (
        "flowtel.hubble.l7.duration",
        "flowtel_hubble_l7_duration_seconds",
    ),
    (
        "flowtel.hubble.lost_events",
        "flowtel_hubble_lost_events_total",
    ),
    (
        "flowtel.hubble.stream.errors",
        "flowtel_hubble_stream_errors_total",
    ),
    (
        "flowtel.hubble.stream.connected",
        "flowtel_hubble_stream_connected_ratio",
    ),
    (
        "flowtel.hubble.stream.reconnects",
        "flowtel_hubble_stream_reconnects_total",
    ),
    (
        "flowtel.hubble.flows.duplicates",
        "flowtel_hubble_flows_duplicates_total",
    ),
    (
        "flowtel.hubble.flows.malformed",
        "flowtel_hubble_flows_malformed_total",
    ),
    (
        "flowtel.hubble.records.dropped",
        "flowtel_hubble_records_dropped_total",
    ),
    ("flowtel.scrape.errors", "flowtel_scrape_errors_total"),
    ("flowtel.scrape.successes", "flowtel_scrape_successes_total"),
    ("flowtel.sources.active", "flowtel_sources_active_ratio"),
    ("flowtel.cni.detected", "flowtel_cni_detected_ratio"),
    ("flowtel.firewall.packets", "flowtel_firewall_packets_total"),
    ("flowtel.firewall.bytes", "flowtel_firewall_bytes_total"),
    ("flowtel.firewall.drops", "flowtel_firewall_drops_total"),
    ("flowtel.firewall.rules", "flowtel_firewall_rules"),
    (
        "flowtel.firewall.read.failures",
        "flowtel_firewall_read_failures_total",
    ),
    (
        "flowtel.firewall.decode.errors",
        "flowtel_firewall_decode_errors_total",
    ),
    (
        "flowtel.firewall.counter.resets",
        "flowtel_firewall_counter_resets_total",
    ),
    (
        "flowtel.firewall.series.folded",
        "flowtel_firewall_series_folded_total",
    ),
    (
        "flowtel.firewall.events.dropped",
        "flowtel_firewall_events_dropped_total",
    ),
    (
        "flowtel.cni.config.changes",
        "flowtel_cni_config_changes_total",
    ),
    ("flowtel.cni.operations", "flowtel_cni_operations_total"),
    (
        "flowtel.cni.operation.duration",
        "flowtel_cni_operation_duration_seconds",
    ),
    ("flowtel.cni.events.lost", "flowtel_cni_events_lost_total"),
    (
        "flowtel.cni.records.dropped",
        "flowtel_cni_records_dropped_total",
    ),
    ("flowtel.cni.running", "flowtel_cni_running"),
    ("flowtel.cni.k8s_events", "flowtel_cni_k8s_events_total"),
    (
        "flowtel.cni.series.folded",
        "flowtel_cni_series_folded_total",
    ),
    (
        "flowtel.cni.ips.allocated",
        "flowtel_cni_ips_allocated_total",
    ),
    ("flowtel.cni.ips.released", "flowtel_cni_ips_released_total"),
    (
        "flowtel.cni.scheduled_to_ip.duration",
        "flowtel_cni_scheduled_to_ip_duration_seconds",
    ),
    (
        "flowtel.cni.ip_events.dropped",
        "flowtel_cni_ip_events_dropped_total",
    ),
];

/// One sample of the text format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a `/metrics` answer, label values unescaped.
fn exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            let (mut key, mut value, mut in_value) = (String::new(), String::new(), false);
            let mut end = inner.len();
            while let Some((i, c)) = chars.next() {
                match (in_value, c) {
                    (false, '}') => {
                        end = i + 1;
                        break;
                    }
                    (false, '=' | ',') => {}
                    (false, '"') => in_value = true,
                    (false, c) => key.push(c),
                    (true, '\\') => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => {}
                    },
                    (true, '"') => {
                        labels.insert(std::mem::take(&mut key), std::mem::take(&mut value));
                        in_value = false;
                    }
                    (true, c) => value.push(c),
                }
            }
            rest = &inner[end..];
        }
        let value = match rest.trim() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or(f64::NAN),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// `key` as a label name: what is not a letter, digit or `_` becomes `_`,
/// no two `_` in a row.
fn label_name(key: &str) -> String {
    let mut out = String::new();
    for c in key.chars() {
        let c = if c.is_ascii_alphanumeric() { c } else { '_' };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out
}

/// A Prometheus series: its name and sorted labels.
type Series = (String, Vec<(String, String)>);

/// Where the newest OTLP point of each mesh series should be on
/// `/metrics`: its sample (`_count` for a histogram) and value.
fn expected_samples(otlp: &[Point]) -> Result<BTreeMap<Series, f64>, String> {
    let mut newest: BTreeMap<(String, Attrs), &Point> = BTreeMap::new();
    for p in otlp.iter().filter(|p| p.scope == "flowtel.mesh") {
        let key = (p.metric.clone(), p.attrs.clone());
        if newest.get(&key).is_none_or(|q| q.time <= p.time) {
            newest.insert(key, p);
        }
    }
    let mut out = BTreeMap::new();
    for ((metric, attrs), p) in newest {
        let name = PROMETHEUS_NAMES
            .iter()
            .find(|(otel, _)| *otel == metric)
            .map(|(_, prom)| *prom)
            .ok_or_else(|| format!("{metric}: not a documented mesh metric"))?;
        let mut labels: Vec<(String, String)> = attrs
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    AttrValue::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                (label_name(k), v)
            })
            .collect();
        labels.push(("otel_scope_name".into(), "flowtel.mesh".into()));
        labels.push((
            "otel_scope_version".into(),
            env!("CARGO_PKG_VERSION").into(),
        ));
        labels.sort();
        let (name, value) = match &p.value {
            Value::Int(i) => (name.to_string(), *i as f64),
            Value::Double(d) => (name.to_string(), *d),
            Value::Histogram { count, .. } => (format!("{name}_count"), *count as f64),
        };
        out.insert((name, labels), value);
    }
    Ok(out)
}

/// Every mesh point received over OTLP is a sample of `/metrics` with the
/// translated name and labels, and the same value where the value cannot
/// move between the two reads (scrape counters can); `/metrics` has no
/// other mesh series. Returns what differs.
fn compare_with_prometheus(otlp: &[Point], samples: &[Sample]) -> Vec<String> {
    let expected = match expected_samples(otlp) {
        Ok(e) => e,
        Err(e) => return vec![e],
    };
    let served: BTreeMap<Series, f64> = samples
        .iter()
        .filter(|s| s.labels.get("otel_scope_name").map(String::as_str) == Some("flowtel.mesh"))
        .filter(|s| !s.name.ends_with("_bucket") && !s.name.ends_with("_sum"))
        .map(|s| {
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            ((s.name.clone(), labels), s.value)
        })
        .collect();
    let mut problems = Vec::new();
    for (key, want) in &expected {
        match served.get(key) {
            None => problems.push(format!("missing on /metrics: {key:?}")),
            Some(got) if key.0.starts_with("flowtel_scrape_") && got >= want => {}
            Some(got) if got != want => {
                problems.push(format!("{key:?}: OTLP {want}, /metrics {got}"))
            }
            Some(_) => {}
        }
    }
    for key in served.keys().filter(|k| !expected.contains_key(*k)) {
        problems.push(format!("only on /metrics: {key:?}"));
    }
    if expected.len() < 30 {
        problems.push(format!("only {} mesh series over OTLP", expected.len()));
    }
    problems
}

// ---------- the cluster ----------

const CALICO_CONFLIST: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "info", "datastore_type": "kubernetes", "nodename": "node-m",
     "mtu": 0, "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}
"#;

const CILIUM_CONFLIST: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    {"type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log"}
  ]
}
"#;

#[test]
fn istio_felix_hubble_and_bad_targets_to_otlp() {
    let test = "istio_felix_hubble_and_bad_targets_to_otlp";
    let Some(tools) = common::prerequisites(test, false) else {
        return;
    };
    let mut guard = NetnsGuard::new(&tools);
    let ns = guard
        .add("mesh")
        .expect("a namespace for the kernel source");
    guard.enable_conntrack(&ns).expect("conntrack in it");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the servers");
    let dir = tempfile::tempdir().expect("a temporary directory");

    // Targets: each on its own loopback address, as pods have their own.
    let at = |last: u8| SocketAddr::new(IpAddr::from([127, 0, 0, last]), 0);
    let (sidecar, ztunnel, truncated, not_utf8, huge, slow, wrong, felix) = rt.block_on(async {
        (
            serve(at(2), Behaviour::Serve(TEXT, ENVOY)).await,
            serve(at(3), Behaviour::Serve(OPENMETRICS, ZTUNNEL)).await,
            serve(at(4), Behaviour::Truncated).await,
            serve(at(5), Behaviour::NotUtf8).await,
            serve(at(6), Behaviour::Huge).await,
            serve(at(7), Behaviour::SlowLoris).await,
            serve(at(8), Behaviour::WrongType).await,
            serve(at(1), Behaviour::Serve(TEXT, FELIX)).await,
        )
    });

    let api = KubeApi::new();
    rt.block_on(api.start());
    let pods = [
        meshed_pod(
            "shop",
            "api-77b9d6f4c-p8zlm",
            NODE,
            "127.0.0.2",
            sidecar.port(),
            false,
        ),
        meshed_pod(
            "istio-system",
            "ztunnel-x7k2p",
            NODE,
            "127.0.0.3",
            ztunnel.port(),
            true,
        ),
        meshed_pod(
            "shop",
            "truncated",
            NODE,
            "127.0.0.4",
            truncated.port(),
            false,
        ),
        meshed_pod(
            "shop",
            "not-utf8",
            NODE,
            "127.0.0.5",
            not_utf8.port(),
            false,
        ),
        meshed_pod("shop", "huge", NODE, "127.0.0.6", huge.port(), false),
        meshed_pod("shop", "slow-loris", NODE, "127.0.0.7", slow.port(), false),
        meshed_pod("shop", "wrong-type", NODE, "127.0.0.8", wrong.port(), false),
        // On another node: never scraped from this one (nothing listens).
        meshed_pod("shop", "elsewhere", "node-n", "127.0.0.9", 15090, false),
    ];
    let api_pod_uid = pods[0]["metadata"]["uid"]
        .as_str()
        .expect("a uid")
        .to_owned();
    api.load(
        std::iter::once(fx::node(NODE, "zone-a", "region-1", &["192.0.2.10"], None))
            .chain(pods.iter().cloned()),
    );
    let kubeconfig = api.write_kubeconfig(dir.path());

    let socket = dir.path().join("hubble.sock");
    let hubble = rt.block_on(async { HubbleServer::start(&socket, hubble_script()) });
    let cni_dir = dir.path().join("net.d");
    std::fs::create_dir(&cni_dir).expect("the CNI directory");
    std::fs::write(cni_dir.join("10-calico.conflist"), CALICO_CONFLIST).expect("a conflist");

    let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = ns.path();
    let mut ft = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            (
                "FLOWTEL_KUBERNETES__KUBECONFIG",
                kubeconfig.display().to_string(),
            ),
            ("FLOWTEL_RESOURCE__NODE_NAME", NODE.into()),
            ("FLOWTEL_HUBBLE__SOCKET", socket.display().to_string()),
            (
                "FLOWTEL_DETECT__HUBBLE_SOCKET",
                socket.display().to_string(),
            ),
            ("FLOWTEL_DETECT__CNI_DIR", cni_dir.display().to_string()),
            // Not the CNI source: the sources this test expects are the mesh's.
            ("FLOWTEL_CNI__ENABLED", "off".into()),
            ("FLOWTEL_EXPORT__LOGS__ENABLED", "true".into()),
            ("FLOWTEL_EXPORT__PROMETHEUS__LISTEN", "127.0.0.1:0".into()),
        ]
        .into_iter()
        .chain(mesh::scrape_env(felix, "2s", "1500ms"))
        .collect(),
    })
    .expect("starting flowtel");
    ft.wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");

    // Every bad target failed at least twice, and Hubble delivered all.
    let settled = common::wait_until(Duration::from_secs(40), Duration::from_millis(500), || {
        let all = points(&receiver);
        let errors = scrape_errors(&all);
        let flows = int_sum(&latest(&all, "flowtel.hubble.flows"));
        [
            "truncated",
            "not_utf8",
            "too_large",
            "timeout",
            "content_type",
        ]
        .iter()
        .all(|k| {
            errors
                .get(&("istio_sidecar".into(), (*k).into()))
                .is_some_and(|n| *n >= 2)
        }) && flows == 7
            && find(
                &all,
                "istio.tcp.sent",
                &[],
                &[("k8s.pod.name", "ztunnel-x7k2p")],
            )
            .is_some()
            && find(&all, "felix.iptables.rules", &[], &[]).is_some()
    });
    let all = points(&receiver);
    let errors = scrape_errors(&all);
    assert!(
        settled,
        "{test}: not everything arrived; scrape errors {errors:?}, metrics {:?}\n{}",
        all.iter()
            .map(|p| &p.metric)
            .collect::<std::collections::BTreeSet<_>>(),
        ft.output()
    );
    assert_eq!(
        ft.exit_status(),
        None,
        "{test}: flowtel exited\n{}",
        ft.output()
    );

    // Istio sidecar: the node's resource, the pod named by attributes, the
    // exposition's labels, exact values.
    let requests = find(
        &all,
        "istio.requests",
        &[("k8s.node.name", NODE), ("service.name", "flowtel")],
        &[
            ("k8s.pod.name", "api-77b9d6f4c-p8zlm"),
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.uid", &api_pod_uid),
            ("flowtel.k8s.workload.kind", "Pod"),
            ("flowtel.k8s.workload.name", "api-77b9d6f4c-p8zlm"),
            ("response_code", "503"),
            ("response_flags", "UF,URX"),
            ("source_workload", "web"),
            ("destination_workload", "api"),
            ("flowtel.istio.proxy", "istio_sidecar"),
        ],
    )
    .unwrap_or_else(|| panic!("{test}: no istio.requests 503 series of the api pod"));
    assert_eq!(requests.value, Value::Double(7.0));
    assert_eq!(requests.unit, "{request}");
    let ok = find(
        &all,
        "istio.requests",
        &[],
        &[
            ("k8s.pod.name", "api-77b9d6f4c-p8zlm"),
            ("response_code", "200"),
        ],
    )
    .expect("the 200 series");
    assert_eq!(ok.value, Value::Double(1042.0));
    let sent = find(
        &all,
        "istio.tcp.sent",
        &[],
        &[
            ("k8s.pod.name", "api-77b9d6f4c-p8zlm"),
            ("destination_service_name", "legacy \"billing\" \\ v2\nblue"),
        ],
    )
    .expect("the escaped label value, unescaped");
    assert_eq!(
        (sent.value.clone(), sent.unit.as_str()),
        (Value::Double(52_428_800.0), "By")
    );
    let duration = find(
        &all,
        "istio.request.duration",
        &[],
        &[("k8s.pod.name", "api-77b9d6f4c-p8zlm")],
    )
    .expect("the request duration histogram");
    assert_eq!(duration.unit, "ms");
    assert_eq!(
        duration.value,
        Value::Histogram {
            bounds: vec![
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0
            ],
            counts: vec![0, 3, 117, 580, 300, 40, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sum: 9876.5,
            count: 1042,
        }
    );
    assert!(
        find(&all, "envoy_cluster_upstream_cx_total", &[], &[]).is_none()
            && !all.iter().any(|p| p.metric.starts_with("envoy")),
        "{test}: Envoy's own families are not kept"
    );
    // ztunnel: OpenMetrics, its pod named by attributes.
    let zt = find(
        &all,
        "istio.tcp.sent",
        &[],
        &[
            ("k8s.pod.name", "ztunnel-x7k2p"),
            ("k8s.namespace.name", "istio-system"),
            ("reporter", "destination"),
            ("source_workload", "traffic-gen"),
            ("destination_workload", "productpage-v1"),
            ("flowtel.istio.proxy", "ztunnel"),
        ],
    )
    .expect("ztunnel's sent bytes");
    assert_eq!(zt.value, Value::Double(11_144_775.0));
    let opened = latest(&all, "istio.tcp.connections.opened");
    let zt_opened: Vec<&Value> = opened
        .iter()
        .filter(|(a, _)| a.get("flowtel.istio.proxy") == Some(&AttrValue::Str("ztunnel".into())))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(zt_opened.len(), 3, "{test}: ztunnel's three opened series");
    assert!(zt_opened.contains(&&Value::Double(831.0)));
    // Bad targets and the pod on another node sent nothing.
    for pod in [
        "truncated",
        "not-utf8",
        "huge",
        "slow-loris",
        "wrong-type",
        "elsewhere",
    ] {
        assert!(
            !all.iter()
                .any(|p| p.attrs.get("k8s.pod.name") == Some(&AttrValue::Str(pod.into()))),
            "{test}: metrics of {pod}"
        );
    }
    // One resource for everything: the node's.
    let resources: BTreeSet<&Attrs> = all.iter().map(|p| &p.resource).collect();
    assert_eq!(
        resources.len(),
        1,
        "{test}: one resource, the node's: {resources:?}"
    );
    assert_eq!(
        errors.get(&("istio_sidecar".into(), "request".into())),
        None,
        "{test}: the pod on another node was scraped"
    );

    // Felix: the node's resource, exact values.
    let rules = find(
        &all,
        "felix.iptables.rules",
        &[("k8s.node.name", NODE)],
        &[("table", "filter"), ("ip_version", "4")],
    )
    .expect("felix iptables rules");
    assert_eq!(rules.value, Value::Double(134.0));
    assert!(!rules.resource.contains_key("k8s.pod.name"));
    let messages = find(
        &all,
        "felix.dataplane.messages",
        &[],
        &[("type", "ServiceAccountUpdate")],
    )
    .expect("felix dataplane messages");
    assert_eq!(messages.value, Value::Double(44.0));
    assert_eq!(
        find(&all, "felix.resync.state", &[], &[]).map(|p| p.value.clone()),
        Some(Value::Double(3.0))
    );

    // Hubble: 7 flows, the stream broken once, the L7 pair joined.
    let flows = latest(&all, "flowtel.hubble.flows");
    assert_eq!(int_sum(&flows), 7, "{test}: hubble flows {flows:?}");
    let stream_errors = latest(&all, "flowtel.hubble.stream.errors");
    let stream = stream_errors
        .iter()
        .find(|(a, _)| a.get("error.type") == Some(&AttrValue::Str("stream".into())))
        .map(|(_, v)| v.clone());
    assert_eq!(stream, Some(Value::Int(1)), "{test}: {stream_errors:?}");
    let l7 = latest(&all, "flowtel.hubble.l7.requests");
    assert_eq!(int_sum(&l7), 2, "{test}: {l7:?}");
    let latency = find(
        &all,
        "flowtel.hubble.l7.duration",
        &[],
        &[
            ("flowtel.hubble.l7.protocol", "http"),
            ("flowtel.hubble.l7.type", "response"),
            ("source.k8s.workload.name", "web"),
            ("destination.k8s.workload.name", "api"),
        ],
    )
    .expect("the L7 duration");
    let Value::Histogram {
        counts,
        sum,
        count,
        bounds,
    } = &latency.value
    else {
        panic!("{test}: not a histogram: {latency:?}");
    };
    assert_eq!((*count, bounds.len(), counts.len()), (1, 14, 15));
    assert_eq!(
        counts[3], 1,
        "{test}: 30 ms falls in (25 ms, 50 ms]: {counts:?}"
    );
    assert!((sum - 0.03).abs() < 1e-9, "{test}: sum {sum}");
    assert!(
        hubble.accepted() >= 2,
        "{test}: flowtel reconnected to Hubble"
    );

    // Hubble's flows as log events, next to the kernel's flow records.
    let mut events = Vec::new();
    let logged = common::wait_until(Duration::from_secs(10), Duration::from_millis(250), || {
        events = receiver
            .log_events()
            .into_iter()
            .filter(|e| e.event_name == "flowtel.hubble.flow")
            .collect();
        events.len() >= 7
    });
    assert!(logged, "{test}: Hubble flow events: {events:?}");
    assert_eq!(events.len(), 7, "{test}: each flow once: {events:?}");
    let response = events
        .iter()
        .find(|e| e.str("flowtel.hubble.l7.type") == Some("response"))
        .expect("the HTTP response's event");
    assert_eq!(response.int("http.response.status_code"), Some(200));
    assert_eq!(response.str("http.request.method"), Some("GET"));
    assert_eq!(
        response.str("url.path"),
        Some("/v1/items"),
        "{test}: no query string"
    );
    assert_eq!(response.str("source.k8s.workload.name"), Some("api"));
    assert_eq!(response.str("destination.address"), Some("10.0.1.5"));
    assert_eq!(response.str("flowtel.hubble.verdict"), Some("FORWARDED"));

    // Detection: /readyz and the self-metrics.
    let (code, body) = ft.readyz().expect("/readyz");
    assert_eq!(code, 200);
    assert_eq!(body["sources"]["cni"], json!("calico"), "{test}: {body}");
    let active = body["sources"]["sources"].clone();
    assert_eq!(
        active,
        json!(["conntrack", "hubble", "istio", "felix", "firewall"]),
        "{test}: {body}"
    );
    let gauges = latest(&all, "flowtel.sources.active");
    for source in ["conntrack", "hubble", "istio", "felix", "firewall"] {
        let mut a = Attrs::new();
        a.insert("flowtel.source".into(), AttrValue::Str(source.into()));
        assert_eq!(gauges.get(&a), Some(&Value::Int(1)), "{test}: {gauges:?}");
    }
    let cni = find(
        &all,
        "flowtel.cni.detected",
        &[],
        &[("flowtel.cni.name", "calico")],
    )
    .expect("flowtel.cni.detected");
    assert_eq!(cni.value, Value::Int(1));

    // The Prometheus endpoint of the same run: every mesh point received
    // over OTLP, translated, and nothing else.
    let addr = ft
        .prometheus_addr()
        .unwrap_or_else(|| panic!("{test}: no Prometheus endpoint:\n{}", ft.output()));
    let mut report = String::new();
    let matched = common::wait_until(Duration::from_secs(10), Duration::from_millis(500), || {
        let otlp = points(&receiver);
        let text = match http_get(addr, "/metrics") {
            Ok((200, text)) => text,
            other => {
                report = format!("GET /metrics: {other:?}");
                return false;
            }
        };
        let problems = compare_with_prometheus(&otlp, &exposition(&text));
        report = problems.join("\n");
        problems.is_empty()
    });
    assert!(
        matched,
        "{test}: /metrics and the OTLP mesh points differ:\n{report}"
    );
    let compared = expected_samples(&points(&receiver)).map_or(0, |e| e.len());
    println!("{test}: {compared} mesh series over OTLP, each on /metrics with its Prometheus name, labels and value, and no other");

    // The CNI configuration changing at run time is noticed.
    std::fs::remove_file(cni_dir.join("10-calico.conflist")).expect("remove the Calico conflist");
    std::fs::write(cni_dir.join("05-cilium.conflist"), CILIUM_CONFLIST).expect("a Cilium conflist");
    let mut last = serde_json::Value::Null;
    let noticed = common::wait_until(Duration::from_secs(20), Duration::from_millis(250), || {
        last = ft.readyz().map(|(_, b)| b).unwrap_or_default();
        last["sources"]["cni"] == json!("cilium")
    });
    assert!(noticed, "{test}: the new CNI was not noticed: {last}");
    let renamed = common::wait_until(Duration::from_secs(10), Duration::from_millis(250), || {
        find(
            &points(&receiver),
            "flowtel.cni.detected",
            &[],
            &[("flowtel.cni.name", "cilium")],
        )
        .is_some()
    });
    assert!(renamed, "{test}: flowtel.cni.detected never named cilium");

    // Each failing kind is logged once per round, not once per scrape.
    let output = ft.output();
    for kind in [
        "truncated",
        "not_utf8",
        "too_large",
        "timeout",
        "content_type",
    ] {
        let lines = output
            .lines()
            .filter(|l| {
                l.contains("scrapes failed this round") && l.contains(&format!("error=\"{kind}\""))
            })
            .count();
        assert!(lines >= 1, "{test}: {kind} was not logged\n{output}");
    }

    let status = ft.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{test}: exit {status:?}\n{}",
        ft.output()
    );
    drop(hubble);
    rt.block_on(api.stop());
}

/// The sample of `name` whose labels include every pair of `labels`.
fn sample<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

#[test]
fn mesh_sources_on_the_prometheus_endpoint_alone() {
    let test = "mesh_sources_on_the_prometheus_endpoint_alone";
    let Some((tools, bins)) = common::prerequisites_with(test, &[PROMTOOL], &[]) else {
        return;
    };
    let mut guard = NetnsGuard::new(&tools);
    let ns = guard
        .add("meshprom")
        .expect("a namespace for the kernel source");
    guard.enable_conntrack(&ns).expect("conntrack in it");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the servers");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let at = |last: u8| SocketAddr::new(IpAddr::from([127, 0, 0, last]), 0);
    let (sidecar, ztunnel, felix) = rt.block_on(async {
        (
            serve(at(12), Behaviour::Serve(TEXT, ENVOY)).await,
            serve(at(13), Behaviour::Serve(OPENMETRICS, ZTUNNEL)).await,
            serve(at(11), Behaviour::Serve(TEXT, FELIX)).await,
        )
    });
    let api = KubeApi::new();
    rt.block_on(api.start());
    let checkout = fx::workload("Deployment", "shop", "checkout");
    let replicaset = fx::replicaset("shop", "checkout-5d8f7c9b6", Some(&checkout));
    let pod = common::mesh::with_proxy(
        fx::PodFx::new("shop", "checkout-5d8f7c9b6-q7x2m")
            .on(NODE, "192.0.2.10")
            .ips(&["127.0.0.12"])
            .owned_by(&replicaset),
        sidecar.port(),
        false,
    );
    api.load([
        fx::node(NODE, "zone-a", "region-1", &["192.0.2.10"], None),
        replicaset,
        pod,
        meshed_pod(
            "istio-system",
            "ztunnel-m4q8d",
            NODE,
            "127.0.0.13",
            ztunnel.port(),
            true,
        ),
    ]);
    let kubeconfig = api.write_kubeconfig(dir.path());
    let cni_dir = dir.path().join("net.d");
    std::fs::create_dir(&cni_dir).expect("the CNI directory");
    std::fs::write(cni_dir.join("10-calico.conflist"), CALICO_CONFLIST).expect("a conflist");

    let netns = ns.path();
    let mut ft = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: "",
        protocol: "grpc",
        interval: "1s",
        env: vec![
            (
                "FLOWTEL_KUBERNETES__KUBECONFIG",
                kubeconfig.display().to_string(),
            ),
            ("FLOWTEL_RESOURCE__NODE_NAME", NODE.into()),
            ("FLOWTEL_RESOURCE__CLUSTER_NAME", "mesh-test".into()),
            ("FLOWTEL_DETECT__CNI_DIR", cni_dir.display().to_string()),
            ("FLOWTEL_CNI__ENABLED", "off".into()),
            ("FLOWTEL_EXPORT__PROMETHEUS__LISTEN", "127.0.0.1:0".into()),
            ("FLOWTEL_EXPORT__CONSOLE__MODE", "never".into()),
        ]
        .into_iter()
        .chain(mesh::scrape_env(felix, "1s", "800ms"))
        .collect(),
    })
    .expect("starting flowtel");
    ft.wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");
    let mut addr = None;
    common::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        addr = ft.prometheus_addr();
        addr.is_some()
    });
    let addr = addr.unwrap_or_else(|| panic!("{test}: no Prometheus endpoint:\n{}", ft.output()));
    let output = ft.output();
    assert!(
        !output.contains("exporting OTLP metrics"),
        "{test}: OTLP must be off:\n{output}"
    );

    let mut text = String::new();
    let mut samples = Vec::new();
    let served = common::wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        if let Ok((200, t)) = http_get(addr, "/metrics") {
            samples = exposition(&t);
            text = t;
        }
        sample(
            &samples,
            "istio_tcp_connections_opened_total",
            &[("k8s_pod_name", "ztunnel-m4q8d")],
        )
        .is_some()
            && sample(&samples, "istio_requests_total", &[]).is_some()
            && sample(&samples, "felix_iptables_rules", &[]).is_some()
    });
    assert!(
        served,
        "{test}: /metrics lacks the mesh sources:\n{text}\n{}",
        ft.output()
    );

    let scope = [
        ("otel_scope_name", "flowtel.mesh"),
        ("otel_scope_version", env!("CARGO_PKG_VERSION")),
    ];
    let pod = [
        ("k8s_namespace_name", "shop"),
        ("k8s_pod_name", "checkout-5d8f7c9b6-q7x2m"),
        ("flowtel_k8s_workload_kind", "Deployment"),
        ("flowtel_k8s_workload_name", "checkout"),
        ("k8s_deployment_name", "checkout"),
        ("flowtel_istio_proxy", "istio_sidecar"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        scope.iter().chain(&pod).chain(extra).copied().collect()
    };
    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&samples, name, labels)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("{test}: no {name} {labels:?} in:\n{text}"))
    };
    // (name, labels the sample must have, value)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);
    let cases: Vec<Case> = vec![
        (
            "istio_requests_total",
            with(&[("response_code", "503"), ("response_flags", "UF,URX")]),
            7.0,
        ),
        (
            "istio_requests_total",
            with(&[("response_code", "200"), ("source_workload", "web")]),
            1042.0,
        ),
        (
            "istio_request_duration_milliseconds_bucket",
            with(&[("le", "10")]),
            700.0,
        ),
        (
            "istio_request_duration_milliseconds_bucket",
            with(&[("le", "+Inf")]),
            1042.0,
        ),
        ("istio_request_duration_milliseconds_sum", with(&[]), 9876.5),
        (
            "istio_request_duration_milliseconds_count",
            with(&[]),
            1042.0,
        ),
        (
            "istio_tcp_sent_bytes_total",
            with(&[("destination_service_name", "legacy \"billing\" \\ v2\nblue")]),
            52_428_800.0,
        ),
        ("istio_tcp_received_bytes_total", with(&[]), 1_048_576.0),
        ("istio_tcp_connections_opened_total", with(&[]), 13.0),
        ("istio_tcp_connections_closed_total", with(&[]), 12.0),
        (
            "istio_tcp_connections_opened_total",
            vec![
                ("k8s_pod_name", "ztunnel-m4q8d"),
                ("flowtel_istio_proxy", "ztunnel"),
                ("source_workload", "productpage-v1"),
                ("destination_workload", "details-v1"),
            ],
            831.0,
        ),
        (
            "felix_iptables_rules",
            vec![("table", "filter"), ("ip_version", "4")],
            134.0,
        ),
        ("felix_active_local_endpoints", vec![], 4.0),
        ("felix_resync_state_ratio", vec![], 3.0),
        (
            "felix_dataplane_messages_total",
            vec![("type", "ServiceAccountUpdate")],
            44.0,
        ),
        ("felix_resyncs_started_total", vec![], 1.0),
        (
            "flowtel_sources_active_ratio",
            vec![("flowtel_source", "istio")],
            1.0,
        ),
        (
            "flowtel_sources_active_ratio",
            vec![("flowtel_source", "felix")],
            1.0,
        ),
        (
            "flowtel_cni_detected_ratio",
            vec![("flowtel_cni_name", "calico")],
            1.0,
        ),
    ];
    for (name, labels, want) in &cases {
        let got = value(name, labels);
        println!("{test}: {name} {labels:?} = {got}");
        assert_eq!(got, *want, "{test}: {name} {labels:?}");
    }
    assert!(
        value(
            "flowtel_scrape_successes_total",
            &[("flowtel_scrape_target", "istio_sidecar")]
        ) >= 1.0
    );
    // Felix's own spelling is not served: only the OTel names translated.
    assert!(
        sample(&samples, "felix_int_dataplane_messages", &[]).is_none()
            && sample(&samples, "felix_int_dataplane_messages_total", &[]).is_none(),
        "{test}: Felix's names are not translated back"
    );
    let info: Vec<&Sample> = samples.iter().filter(|s| s.name == "target_info").collect();
    assert_eq!(info.len(), 1, "{test}: one target_info: {info:?}");
    assert_eq!(
        info[0].labels.get("k8s_cluster_name").map(String::as_str),
        Some("mesh-test")
    );
    let mesh_series = samples
        .iter()
        .filter(|s| s.labels.get("otel_scope_name").map(String::as_str) == Some("flowtel.mesh"))
        .count();
    println!(
        "{test}: /metrics: {} lines, {} samples, {mesh_series} of the mesh sources",
        text.lines().count(),
        samples.len()
    );

    let (code, body) = ft.readyz().expect("/readyz");
    assert_eq!(code, 200);
    assert_eq!(
        body["sources"],
        json!({"cni": "calico", "sources": ["conntrack", "istio", "felix", "firewall"]}),
        "{test}: /readyz without OTLP"
    );
    // promtool parses the text and lints the names. Its one complaint may
    // be Istio's own name, which keeps its milliseconds so that Istio's
    // dashboards work: anything else fails.
    let (ok, said) = promtool_check_metrics(&bins[0], &text).expect("running promtool");
    println!("{test}: promtool check metrics: {ok} {said:?}");
    let istio_unit =
        "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
    assert!(
        ok || said.lines().all(|l| l.trim().is_empty() || l == istio_unit),
        "{test}: promtool check metrics rejected /metrics: {said}"
    );

    let status = ft.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{test}: exit {status:?}\n{}",
        ft.output()
    );
    rt.block_on(api.stop());
}
