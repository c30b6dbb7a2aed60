//! OTLP export of the mesh and CNI sources, once per interval: Hubble's
//! counters (`flowtel.hubble.*`), the latest Istio proxy scrapes (one
//! resource per pod, with its k8s attributes), Felix's families, and the
//! self-metrics saying which sources are active and how scrapes fail.
//!
//! Nothing here produces `flowtel.flow.*`: those stay the kernel source's,
//! so a flow Hubble or Istio also reported is never counted twice (see
//! docs/telemetry.md, "Mesh and CNI sources").

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::KeyValue;
use tokio::sync::watch;

use super::otlp_wire::{
    self, Any, Batcher, Envelope, Kind, MetricHeader, Temporality, HISTOGRAM_POINT_ATTRIBUTES,
    NUMBER_POINT_ATTRIBUTES,
};
use super::transport::{OtlpClient, Signal, SignalTransport};
use crate::config::Config;
use crate::enrich::kubernetes::PodInfo;
use crate::source::detect::Detection;
use crate::source::hubble::{self, HubbleConfig, HubbleHandle, HubbleReport};
use crate::source::mesh::{MeshHandle, MeshScrapes};
use crate::source::scrape::{MetricKind, PointValue, ScrapedFamily};
use crate::stats::SelfStats;

const SCOPE: &str = "flowtel.mesh";
const CUMULATIVE: Temporality = Temporality::Cumulative;

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Which sources are on, for `/readyz` and `flowtel.sources.active`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ActiveSources {
    /// The CNI named by the CNI configuration directory, if any.
    pub cni: Option<String>,
    /// `ebpf`/`conntrack` first, then `hubble`, `istio`, `felix` when each
    /// is delivering.
    pub sources: Vec<&'static str>,
}

/// Shared with the health endpoint.
pub type ActiveSourcesCell = std::sync::Arc<std::sync::Mutex<ActiveSources>>;

/// Exports the mesh and CNI sources' metrics.
pub struct MeshExporter {
    client: OtlpClient,
    node_resource: Vec<KeyValue>,
    node: Envelope,
    limit: usize,
    started: u64,
    hubble_cfg: HubbleConfig,
    hubble: Option<HubbleHandle>,
    mesh: Option<MeshHandle>,
    detection: watch::Receiver<Detection>,
    kernel: &'static str,
    active: ActiveSourcesCell,
    /// Hubble's flows as log events, when `export.logs.enabled`.
    logs: Option<(OtlpClient, Envelope)>,
}

impl MeshExporter {
    /// Must run inside the tokio runtime.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        cfg: &Config,
        transport: &SignalTransport,
        stats: std::sync::Arc<SelfStats>,
        hubble: Option<HubbleHandle>,
        mesh: Option<MeshHandle>,
        detection: watch::Receiver<Detection>,
        kernel: &'static str,
        active: ActiveSourcesCell,
    ) -> anyhow::Result<Self> {
        let node_resource = super::resource::attributes(&cfg.resource);
        let logs = if cfg.export.logs.enabled {
            SignalTransport::resolve(&cfg.export.otlp, &cfg.export.otlp.logs, "logs")
        } else {
            None
        };
        let logs = match logs {
            Some(t) => Some((
                OtlpClient::new(&t, Signal::Logs, stats.clone())?,
                Envelope::new(&node_resource, SCOPE, env!("CARGO_PKG_VERSION")),
            )),
            None => None,
        };
        Ok(Self {
            client: OtlpClient::new(transport, Signal::Metrics, stats)?,
            node: Envelope::new(&node_resource, SCOPE, env!("CARGO_PKG_VERSION")),
            node_resource,
            limit: cfg.export.otlp.max_request_bytes,
            started: nanos(SystemTime::now()),
            hubble_cfg: cfg.hubble.clone(),
            hubble,
            mesh,
            detection,
            kernel,
            active,
            logs,
        })
    }

    /// Encodes and sends one interval.
    pub async fn export(&mut self) {
        // `auto` picks Hubble up when the socket appears after start.
        if self.hubble.is_none()
            && self.hubble_cfg.enabled == hubble::Enabled::Auto
            && self.detection.borrow().hubble
        {
            self.hubble = hubble::start(&self.hubble_cfg);
        }
        let time = nanos(SystemTime::now());
        let report = self.hubble.as_ref().map(HubbleHandle::report);
        let scrapes = self.mesh.as_ref().map(MeshHandle::latest);
        let active = active_sources(
            self.kernel,
            &self.detection.borrow(),
            report.as_ref(),
            scrapes.as_ref(),
        );
        *self
            .active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = active.clone();
        let requests = self.encode(report.as_ref(), scrapes.as_ref(), &active, time);
        let records = match (&self.logs, &report) {
            (Some((_, envelope)), Some(r)) if !r.records.is_empty() => {
                super::hubble_logs::encode(envelope, self.limit, &r.records)
            }
            _ => Vec::new(),
        };
        let logs = async {
            if let Some((client, _)) = &self.logs {
                client.send_all(records).await;
            }
        };
        tokio::join!(self.client.send_all(requests), logs);
    }

    /// The requests of one interval: the node's resource first, then one
    /// resource per scraped pod.
    fn encode(
        &self,
        report: Option<&HubbleReport>,
        scrapes: Option<&MeshScrapes>,
        active: &ActiveSources,
        time: u64,
    ) -> Vec<Vec<u8>> {
        let span = (self.started, time);
        let mut b = Batcher::new(&self.node, self.limit);
        encode_active(&mut b, active, time);
        if let Some(r) = report {
            encode_hubble(&mut b, r, span);
        }
        if let Some(s) = scrapes {
            encode_scrape_errors(&mut b, s, span);
            if let Some(felix) = &s.felix {
                encode_families(&mut b, felix, &[], span);
            }
        }
        let mut requests = b.finish();
        for pod in scrapes.iter().flat_map(|s| &s.istio) {
            let envelope = Envelope::new(
                &pod_resource(&self.node_resource, &pod.pod),
                SCOPE,
                env!("CARGO_PKG_VERSION"),
            );
            let mut b = Batcher::new(&envelope, self.limit);
            let proxy = [("flowtel.istio.proxy", pod.kind.as_str())];
            encode_families(&mut b, &pod.families, &proxy, span);
            requests.extend(b.finish());
        }
        requests
    }
}

/// Which sources deliver now.
pub fn active_sources(
    kernel: &'static str,
    detection: &Detection,
    report: Option<&HubbleReport>,
    scrapes: Option<&MeshScrapes>,
) -> ActiveSources {
    let mut sources = vec![kernel];
    if report.is_some_and(|r| r.stream.connected || r.stream.flows > 0) {
        sources.push("hubble");
    }
    if scrapes.is_some_and(|s| !s.istio.is_empty()) {
        sources.push("istio");
    }
    if scrapes.is_some_and(|s| s.felix.is_some()) {
        sources.push("felix");
    }
    ActiveSources {
        cni: detection
            .cni
            .active
            .as_ref()
            .map(|c| c.kind.as_str().to_owned()),
        sources,
    }
}

/// The node's resource with the pod's: the pod's keys win.
fn pod_resource(node: &[KeyValue], pod: &PodInfo) -> Vec<KeyValue> {
    // The pod's node replaces flowtel's own (they are the same unless the
    // node name was configured wrongly); an unscheduled pod keeps flowtel's.
    let mut attrs: Vec<KeyValue> = node
        .iter()
        .filter(|kv| pod.node.is_none() || kv.key.as_str() != "k8s.node.name")
        .cloned()
        .collect();
    attrs.push(KeyValue::new(
        "k8s.namespace.name",
        pod.namespace.to_string(),
    ));
    attrs.push(KeyValue::new("k8s.pod.name", pod.name.to_string()));
    attrs.push(KeyValue::new("k8s.pod.uid", pod.uid.to_string()));
    if let Some(n) = &pod.node {
        attrs.push(KeyValue::new("k8s.node.name", n.to_string()));
    }
    let workload_key = match pod.workload.kind.as_str() {
        "Deployment" => Some("k8s.deployment.name"),
        "StatefulSet" => Some("k8s.statefulset.name"),
        "DaemonSet" => Some("k8s.daemonset.name"),
        "ReplicaSet" => Some("k8s.replicaset.name"),
        "Job" => Some("k8s.job.name"),
        "CronJob" => Some("k8s.cronjob.name"),
        _ => None,
    };
    if let Some(k) = workload_key {
        attrs.push(KeyValue::new(k, pod.workload.name.to_string()));
    }
    attrs
}

fn header(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    kind: Kind,
) -> MetricHeader {
    MetricHeader {
        name,
        unit,
        description,
        kind,
    }
}

fn encode_attrs<'a>(field: u32, attrs: impl IntoIterator<Item = (&'a str, Any<'a>)>) -> Vec<u8> {
    let mut buf = Vec::new();
    for (k, v) in attrs {
        otlp_wire::attribute(&mut buf, field, k, v);
    }
    buf
}

fn string_attrs(field: u32, attrs: &[(String, String)]) -> Vec<u8> {
    encode_attrs(
        field,
        attrs
            .iter()
            .map(|(k, v)| (k.as_str(), Any::Str(v.as_str()))),
    )
}

fn overflow_attrs(field: u32) -> Vec<u8> {
    encode_attrs(field, [("otel.metric.overflow", Any::Bool(true))])
}

/// One integer point of the current metric.
fn int_point(b: &mut Batcher, attrs: &[u8], (start, time): (u64, u64), value: u64) {
    otlp_wire::number_point(b.points(attrs.len() + 32), &[attrs], start, time, value);
}

/// A metric of integer points from (encoded attributes, value) pairs;
/// nothing is written when there are none.
fn int_metric(
    b: &mut Batcher,
    h: MetricHeader,
    points: impl IntoIterator<Item = (Vec<u8>, u64)>,
    span: (u64, u64),
) {
    b.begin_metric(h);
    for (attrs, value) in points {
        int_point(b, &attrs, span, value);
    }
    b.end_metric();
}

/// `flowtel.sources.active` (1 per active source) and
/// `flowtel.cni.detected` (1, with the CNI's name), gauges.
fn encode_active(b: &mut Batcher, active: &ActiveSources, time: u64) {
    let span = (time, time);
    int_metric(
        b,
        header(
            "flowtel.sources.active",
            "1",
            "Sources delivering data: the kernel source, hubble, istio, felix.",
            Kind::Gauge,
        ),
        active.sources.iter().map(|s| {
            (
                encode_attrs(NUMBER_POINT_ATTRIBUTES, [("flowtel.source", Any::Str(s))]),
                1,
            )
        }),
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.cni.detected",
            "1",
            "The CNI plugin named by the node's CNI configuration (1 while detected).",
            Kind::Gauge,
        ),
        active.cni.iter().map(|c| {
            (
                encode_attrs(NUMBER_POINT_ATTRIBUTES, [("flowtel.cni.name", Any::Str(c))]),
                1,
            )
        }),
        span,
    );
}

/// Hubble's metrics (names and attributes in docs/telemetry.md).
pub fn encode_hubble(b: &mut Batcher, r: &HubbleReport, span: (u64, u64)) {
    const F: u32 = NUMBER_POINT_ATTRIBUTES;
    let counter = Kind::Counter(CUMULATIVE);
    let overflow = |n: u64| (n > 0).then(|| (overflow_attrs(F), n));
    int_metric(
        b,
        header(
            "flowtel.hubble.flows",
            "{flow}",
            "Flow events Hubble reported, by verdict and ends.",
            counter,
        ),
        r.flows
            .iter()
            .map(|s| (string_attrs(F, &s.key.attributes()), s.count))
            .chain(overflow(r.flows_overflow)),
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.hubble.l7.requests",
            "{request}",
            "L7 records Hubble reported (requests and responses).",
            counter,
        ),
        r.l7_requests
            .iter()
            .map(|s| (string_attrs(F, &s.key.attributes()), s.count))
            .chain(overflow(r.l7_requests_overflow)),
        span,
    );
    b.begin_metric(header(
        "flowtel.hubble.l7.duration",
        "s",
        "Request-to-response latency Hubble measured.",
        Kind::Histogram(CUMULATIVE),
    ));
    let latency = r
        .l7_duration
        .iter()
        .map(|s| {
            (
                string_attrs(HISTOGRAM_POINT_ATTRIBUTES, &s.key.attributes()),
                &s.histogram,
            )
        })
        .chain(
            r.l7_duration_overflow
                .iter()
                .map(|h| (overflow_attrs(HISTOGRAM_POINT_ATTRIBUTES), h)),
        );
    for (attrs, h) in latency {
        let size = attrs.len() + 64 + 16 * h.counts.len();
        otlp_wire::histogram_point(b.points(size), &attrs, span, &h.counts, h.sum, &h.bounds);
    }
    b.end_metric();
    let st = &r.stream;
    int_metric(
        b,
        header(
            "flowtel.hubble.lost_events",
            "{event}",
            "Events Hubble lost before flowtel could read them.",
            counter,
        ),
        st.lost_events.iter().map(|(source, n)| {
            (
                encode_attrs(F, [("flowtel.hubble.lost_events.source", Any::Str(source))]),
                *n,
            )
        }),
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.hubble.stream.errors",
            "{error}",
            "Hubble stream failures, by kind.",
            counter,
        ),
        st.errors
            .iter()
            .map(|(kind, n)| (encode_attrs(F, [("error.type", Any::Str(kind))]), *n)),
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.hubble.stream.connected",
            "1",
            "1 while a GetFlows stream is open.",
            Kind::Gauge,
        ),
        [(Vec::new(), u64::from(st.connected))],
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.hubble.stream.reconnects",
            "{connection}",
            "GetFlows streams opened after the first.",
            counter,
        ),
        [(Vec::new(), st.reconnects)],
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.hubble.flows.duplicates",
            "{flow}",
            "Flows replayed after a reconnect and not counted again.",
            counter,
        ),
        [(Vec::new(), st.duplicates)],
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.hubble.flows.malformed",
            "{flow}",
            "Counted flows with a malformed part, by kind.",
            counter,
        ),
        st.malformed
            .iter()
            .map(|(kind, n)| (encode_attrs(F, [("error.type", Any::Str(kind))]), *n)),
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.hubble.records.dropped",
            "{flow}",
            "Flows dropped from the flow-record queue because it was full.",
            counter,
        ),
        [(Vec::new(), r.records_dropped)],
        span,
    );
}

/// `flowtel.scrape.errors` and `flowtel.scrape.successes`.
fn encode_scrape_errors(b: &mut Batcher, s: &MeshScrapes, span: (u64, u64)) {
    int_metric(
        b,
        header(
            "flowtel.scrape.errors",
            "{scrape}",
            "Failed scrapes of Istio proxies and Felix, by target kind and error kind.",
            Kind::Counter(CUMULATIVE),
        ),
        s.errors.iter().map(|((target, kind), n)| {
            (
                encode_attrs(
                    NUMBER_POINT_ATTRIBUTES,
                    [
                        ("flowtel.scrape.target", Any::Str(target.as_str())),
                        ("error.type", Any::Str(kind)),
                    ],
                ),
                *n,
            )
        }),
        span,
    );
    int_metric(
        b,
        header(
            "flowtel.scrape.successes",
            "{scrape}",
            "Successful scrapes, by target kind.",
            Kind::Counter(CUMULATIVE),
        ),
        s.scrapes.iter().map(|(target, n)| {
            (
                encode_attrs(
                    NUMBER_POINT_ATTRIBUTES,
                    [("flowtel.scrape.target", Any::Str(target.as_str()))],
                ),
                *n,
            )
        }),
        span,
    );
}

/// Scraped families as OTel metrics: the exposition's labels become point
/// attributes as written, after `extra`. Counters and histograms are
/// cumulative from flowtel's start (the proxy's own start is unknown).
pub fn encode_families(
    b: &mut Batcher,
    families: &[ScrapedFamily],
    extra: &[(&str, &str)],
    (start, time): (u64, u64),
) {
    for f in families {
        let (kind, field) = match f.kind {
            MetricKind::Counter => (Kind::Counter(CUMULATIVE), NUMBER_POINT_ATTRIBUTES),
            MetricKind::Gauge => (Kind::Gauge, NUMBER_POINT_ATTRIBUTES),
            MetricKind::Histogram => (Kind::Histogram(CUMULATIVE), HISTOGRAM_POINT_ATTRIBUTES),
        };
        b.begin_metric(header(f.name, f.unit, f.description, kind));
        let start = if kind == Kind::Gauge { time } else { start };
        for p in &f.points {
            let attrs = encode_attrs(
                field,
                extra.iter().map(|(k, v)| (*k, Any::Str(v))).chain(
                    p.labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), Any::Str(v.as_str()))),
                ),
            );
            match &p.value {
                PointValue::Number(v) => {
                    otlp_wire::double_point(b.points(attrs.len() + 32), &attrs, start, time, *v);
                }
                PointValue::Histogram(h) => {
                    let size = attrs.len() + 64 + 16 * h.counts.len();
                    otlp_wire::histogram_point(
                        b.points(size),
                        &attrs,
                        (start, time),
                        &h.counts,
                        h.sum,
                        &h.bounds,
                    );
                }
            }
        }
        b.end_metric();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::hubble::LATENCY_BOUNDS;
    use crate::source::scrape::HistogramValue;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    use prost::Message;

    fn decode(requests: Vec<Vec<u8>>) -> Vec<opentelemetry_proto::tonic::metrics::v1::Metric> {
        requests
            .iter()
            .flat_map(|r| {
                ExportMetricsServiceRequest::decode(r.as_slice())
                    .expect("decodes")
                    .resource_metrics
            })
            .flat_map(|rm| rm.scope_metrics)
            .flat_map(|sm| sm.metrics)
            .collect()
    }

    fn attr(
        kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue],
        key: &str,
    ) -> Option<any_value::Value> {
        kvs.iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
    }

    #[test]
    fn hubble_overflow_and_stream_counters_are_encoded() {
        let mut counts = vec![0; LATENCY_BOUNDS.len() + 1];
        counts[2] = 4;
        let report = HubbleReport {
            flows_overflow: 3,
            l7_duration_overflow: Some(HistogramValue {
                bounds: LATENCY_BOUNDS.to_vec(),
                counts,
                sum: 0.08,
                count: 4,
            }),
            stream: hubble::StreamStats {
                lost_events: [("PERF_EVENT_RING_BUFFER".to_owned(), 9)].into(),
                errors: [("stream", 2)].into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let envelope = Envelope::new(&[], SCOPE, "test");
        let mut b = Batcher::new(&envelope, 1 << 20);
        encode_hubble(&mut b, &report, (1, 2));
        let metrics = decode(b.finish());
        let get = |name: &str| {
            metrics
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        let Some(metric::Data::Sum(flows)) = &get("flowtel.hubble.flows").data else {
            panic!("flows is not a Sum");
        };
        assert!(flows.is_monotonic);
        assert_eq!(flows.data_points.len(), 1);
        let p = &flows.data_points[0];
        assert_eq!(p.value, Some(number_data_point::Value::AsInt(3)));
        assert_eq!(
            attr(&p.attributes, "otel.metric.overflow"),
            Some(any_value::Value::BoolValue(true))
        );
        // No L7 request at all: the metric is left out, not sent empty.
        assert!(metrics
            .iter()
            .all(|m| m.name != "flowtel.hubble.l7.requests"));
        let Some(metric::Data::Histogram(h)) = &get("flowtel.hubble.l7.duration").data else {
            panic!("duration is not a Histogram");
        };
        let p = &h.data_points[0];
        assert_eq!((p.count, p.sum, p.bucket_counts[2]), (4, Some(0.08), 4));
        assert_eq!(p.explicit_bounds, LATENCY_BOUNDS.to_vec());
        assert_eq!(
            attr(&p.attributes, "otel.metric.overflow"),
            Some(any_value::Value::BoolValue(true))
        );
        let Some(metric::Data::Sum(lost)) = &get("flowtel.hubble.lost_events").data else {
            panic!("lost_events is not a Sum");
        };
        assert_eq!(
            lost.data_points[0].value,
            Some(number_data_point::Value::AsInt(9))
        );
        assert_eq!(
            attr(
                &lost.data_points[0].attributes,
                "flowtel.hubble.lost_events.source"
            ),
            Some(any_value::Value::StringValue(
                "PERF_EVENT_RING_BUFFER".into()
            ))
        );
        let Some(metric::Data::Sum(errors)) = &get("flowtel.hubble.stream.errors").data else {
            panic!("stream.errors is not a Sum");
        };
        assert_eq!(
            errors.data_points[0].value,
            Some(number_data_point::Value::AsInt(2))
        );
    }

    #[test]
    fn pod_resource_overrides_the_node_name_and_names_the_workload() {
        let pod = PodInfo {
            uid: "u-1".into(),
            namespace: "shop".into(),
            name: "api-7c9d-x".into(),
            node: Some("node-a".into()),
            workload: crate::enrich::kubernetes::Workload {
                kind: crate::enrich::kubernetes::WorkloadKind::Deployment,
                name: "api".into(),
            },
            labels: Box::new([]),
            host_network: false,
            zone: None,
            region: None,
            mesh: None,
        };
        let node = vec![
            KeyValue::new("service.name", "flowtel"),
            KeyValue::new("k8s.node.name", "stale"),
        ];
        let attrs: Vec<(String, String)> = pod_resource(&node, &pod)
            .into_iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect();
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            attrs,
            pairs(&[
                ("service.name", "flowtel"),
                ("k8s.namespace.name", "shop"),
                ("k8s.pod.name", "api-7c9d-x"),
                ("k8s.pod.uid", "u-1"),
                ("k8s.node.name", "node-a"),
                ("k8s.deployment.name", "api"),
            ])
        );
    }
}
