//! Writing metric families (the mesh and CNI sources' metrics, and
//! flowtel's self-metrics) into a [`MetricSink`]: the OTLP encoder
//! ([`OtlpSink`]) or the Prometheus endpoint's translation. There is one
//! description of what is written, so the two cannot disagree.
//!
//! Everything is on the node's resource. A proxy's pod is named by point
//! attributes, as the local end of a flow is: one flowtel reports many
//! pods, and a resource per pod would, through a Collector's Prometheus
//! exporters, put many `target_info` series on one `job`/`instance`.
//!
//! Nothing here produces `flowtel.flow.*`: those stay the kernel source's,
//! so a flow Hubble or Istio also reported is never counted twice (see
//! docs/telemetry.md, "Mesh and CNI sources").

use std::time::{SystemTime, UNIX_EPOCH};

use super::otlp::wire::{
    self, Any, Batcher, Kind, MetricHeader, Temporality, HISTOGRAM_POINT_ATTRIBUTES,
    NUMBER_POINT_ATTRIBUTES,
};
use crate::flow::mesh::{Family, HistogramValue, PointValue};
use crate::flow::report::MeshReport;
use crate::telemetry::catalogue::{self, Instrument, Metric};

/// The instrumentation scope of the mesh and CNI sources' metrics.
pub const MESH_SCOPE: &str = "flowtel.mesh";
/// The scope of flow metrics and self-metrics.
pub const SCOPE: &str = "flowtel";
/// Both scopes' version.
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Nanoseconds since the epoch.
pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A point's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(u64),
    Double(f64),
}

/// Where metrics are written: `begin`, the metric's points, `end`.
pub trait MetricSink {
    /// Starts a metric whose points run from `start` (ns since the epoch);
    /// counters and histograms are cumulative.
    fn begin(&mut self, metric: &'static Metric, start: u64);
    fn number(&mut self, attributes: &[(&str, Any<'_>)], value: Number);
    fn histogram(&mut self, attributes: &[(&str, Any<'_>)], value: &HistogramValue);
    fn end(&mut self);
}

/// The OTLP header of a cumulative metric.
pub fn header(metric: &Metric, temporality: Temporality) -> MetricHeader {
    MetricHeader {
        name: metric.name,
        unit: metric.unit,
        description: metric.description,
        kind: match metric.instrument {
            Instrument::Counter => Kind::Counter(temporality),
            Instrument::Gauge => Kind::Gauge,
            Instrument::Histogram => Kind::Histogram(temporality),
        },
    }
}

/// Writes every metric of the mesh report at `time`: one metric per
/// catalogue entry, its points gathered from every group (each group's
/// attributes first, then the point's own labels), in the order first seen.
/// A metric with no point is left out. Counters and histograms run from
/// flowtel's start, gauges are values at `time`.
pub fn write_mesh(sink: &mut impl MetricSink, mesh: &MeshReport, time: u64) {
    let mut order: Vec<&'static Metric> = Vec::new();
    for g in &mesh.groups {
        for f in &g.families {
            if !f.points.is_empty() && !order.iter().any(|m| m.name == f.metric.name) {
                order.push(f.metric);
            }
        }
    }
    let started = nanos(mesh.started);
    let mut attrs: Vec<(&str, Any<'_>)> = Vec::new();
    for metric in order {
        let start = match metric.instrument {
            Instrument::Gauge => time,
            Instrument::Counter | Instrument::Histogram => started,
        };
        sink.begin(metric, start);
        for g in &mesh.groups {
            for f in g.families.iter().filter(|f| f.metric.name == metric.name) {
                write_points(sink, f, &g.attributes, &mut attrs);
            }
        }
        sink.end();
    }
}

fn write_points<'a>(
    sink: &mut impl MetricSink,
    f: &'a Family,
    extra: &'a [(&'static str, String)],
    attrs: &mut Vec<(&'a str, Any<'a>)>,
) {
    for p in &f.points {
        attrs.clear();
        attrs.extend(extra.iter().map(|(k, v)| (*k, Any::Str(v))));
        if p.overflow {
            attrs.push((catalogue::OVERFLOW, Any::Bool(true)));
        }
        attrs.extend(
            p.labels
                .iter()
                .map(|(k, v)| (k.as_str(), Any::Str(v.as_str()))),
        );
        match &p.value {
            PointValue::Int(v) => sink.number(attrs, Number::Int(*v)),
            PointValue::Number(v) => sink.number(attrs, Number::Double(*v)),
            PointValue::Histogram(h) => sink.histogram(attrs, h),
        }
    }
}

/// Writes self-metrics as read from the registry: counters from `started`,
/// gauges at `time`.
pub fn write_self(
    sink: &mut impl MetricSink,
    readings: &[(&'static Metric, Vec<crate::telemetry::Point>)],
    started: u64,
) {
    let mut attrs: Vec<(&str, Any<'_>)> = Vec::new();
    for (metric, points) in readings {
        if points.is_empty() {
            continue;
        }
        sink.begin(metric, started);
        for (labels, value) in points {
            attrs.clear();
            attrs.extend(labels.iter().map(|(k, v)| (*k, Any::Str(v))));
            sink.number(&attrs, Number::Int(*value));
        }
        sink.end();
    }
}

/// Writes metrics as OTLP into a [`Batcher`], cumulative.
pub struct OtlpSink<'b> {
    batcher: &'b mut Batcher,
    time: u64,
    start: u64,
    field: u32,
    attributes: Vec<u8>,
}

impl<'b> OtlpSink<'b> {
    /// Points end at `time` (ns since the epoch).
    pub fn new(batcher: &'b mut Batcher, time: u64) -> Self {
        Self {
            batcher,
            time,
            start: time,
            field: NUMBER_POINT_ATTRIBUTES,
            attributes: Vec::new(),
        }
    }

    fn encode(&mut self, attributes: &[(&str, Any<'_>)]) {
        self.attributes.clear();
        for (k, v) in attributes {
            wire::attribute(&mut self.attributes, self.field, k, *v);
        }
    }
}

impl MetricSink for OtlpSink<'_> {
    fn begin(&mut self, metric: &'static Metric, start: u64) {
        self.field = match metric.instrument {
            Instrument::Histogram => HISTOGRAM_POINT_ATTRIBUTES,
            Instrument::Counter | Instrument::Gauge => NUMBER_POINT_ATTRIBUTES,
        };
        self.start = start;
        self.batcher
            .begin_metric(header(metric, Temporality::Cumulative));
    }

    fn number(&mut self, attributes: &[(&str, Any<'_>)], value: Number) {
        self.encode(attributes);
        let buf = self.batcher.points(self.attributes.len() + 32);
        match value {
            Number::Int(v) => {
                wire::number_point(buf, &[&self.attributes], self.start, self.time, v);
            }
            Number::Double(v) => {
                wire::double_point(buf, &self.attributes, self.start, self.time, v);
            }
        }
    }

    fn histogram(&mut self, attributes: &[(&str, Any<'_>)], h: &HistogramValue) {
        self.encode(attributes);
        let size = self.attributes.len() + 64 + 16 * h.counts.len();
        wire::histogram_point(
            self.batcher.points(size),
            &self.attributes,
            (self.start, self.time),
            &h.counts,
            h.sum,
            &h.bounds,
        );
    }

    fn end(&mut self) {
        self.batcher.end_metric();
    }
}

/// Families as OTLP into `b`, each point's labels after `extra`; counters
/// and histograms cumulative from `start`.
pub fn encode_families(
    b: &mut Batcher,
    families: &[Family],
    extra: &[(&'static str, String)],
    (start, time): (u64, u64),
) {
    let mut sink = OtlpSink::new(b, time);
    let mut attrs = Vec::new();
    for f in families {
        let from = match f.metric.instrument {
            Instrument::Gauge => time,
            Instrument::Counter | Instrument::Histogram => start,
        };
        sink.begin(f.metric, from);
        write_points(&mut sink, f, extra, &mut attrs);
        sink.end();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::flow::mesh::{FamilyGroup, Point};
    use crate::telemetry::catalogue;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    use prost::Message;
    use std::time::Duration;

    fn text(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> String {
        match kvs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
        {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("{key}: {other:?}"),
        }
    }

    fn pod(name: &str) -> Vec<(&'static str, String)> {
        vec![
            (catalogue::K8S_NAMESPACE, "shop".into()),
            (catalogue::K8S_POD, name.into()),
            (catalogue::K8S_POD_UID, format!("uid-{name}")),
            (catalogue::K8S_WORKLOAD_KIND, "Deployment".into()),
            (catalogue::K8S_WORKLOAD, "api".into()),
            ("k8s.deployment.name", "api".into()),
            (catalogue::ISTIO_PROXY, "istio_sidecar".into()),
        ]
    }

    pub(crate) fn requests(code: &str, value: f64) -> Family {
        Family {
            metric: &catalogue::ISTIO_REQUESTS,
            points: vec![Point::new(
                vec![
                    ("reporter".into(), "destination".into()),
                    ("response_code".into(), code.into()),
                ],
                PointValue::Number(value),
            )],
        }
    }

    fn gauge(metric: &'static Metric, key: &str, value: &str) -> Family {
        Family {
            metric,
            points: vec![Point::new(
                vec![(key.to_owned(), value.to_owned())],
                PointValue::Int(1),
            )],
        }
    }

    /// Two replicas of a Deployment, the node's sources and a scrape error,
    /// as the flow stage reports them (started at 10 ns).
    pub(crate) fn two_pods() -> MeshReport {
        MeshReport {
            started: UNIX_EPOCH + Duration::from_nanos(10),
            groups: vec![
                FamilyGroup {
                    attributes: Vec::new(),
                    families: vec![
                        gauge(&catalogue::SOURCES_ACTIVE, catalogue::SOURCE, "istio"),
                        gauge(&catalogue::CNI_DETECTED, catalogue::CNI_NAME, "calico"),
                    ],
                },
                FamilyGroup {
                    attributes: pod("api-1"),
                    families: vec![requests("200", 5.0)],
                },
                FamilyGroup {
                    attributes: pod("api-2"),
                    families: vec![requests("200", 7.0)],
                },
                FamilyGroup {
                    attributes: Vec::new(),
                    families: vec![
                        Family {
                            metric: &catalogue::SCRAPE_ERRORS,
                            points: vec![Point::new(
                                vec![
                                    ("flowtel.scrape.target".into(), "felix".into()),
                                    ("error.type".into(), "timeout".into()),
                                ],
                                PointValue::Int(2),
                            )],
                        },
                        Family {
                            metric: &catalogue::SCRAPE_SUCCESSES,
                            points: vec![Point::new(
                                vec![("flowtel.scrape.target".into(), "istio_sidecar".into())],
                                PointValue::Int(6),
                            )],
                        },
                    ],
                },
            ],
            events: Vec::new(),
        }
    }

    #[test]
    fn istio_points_name_their_pod_on_the_node_resource() {
        let node = [opentelemetry::KeyValue::new("k8s.node.name", "node-a")];
        let envelope = wire::Envelope::new(&node, MESH_SCOPE, SCOPE_VERSION);
        let mut b = Batcher::new(&envelope, 1 << 20);
        write_mesh(&mut OtlpSink::new(&mut b, 20), &two_pods(), 20);
        let requests: Vec<_> = b
            .finish()
            .iter()
            .map(|r| ExportMetricsServiceRequest::decode(r.as_slice()).expect("decodes"))
            .collect();
        let resources: Vec<_> = requests.iter().flat_map(|r| &r.resource_metrics).collect();
        assert_eq!(resources.len(), 1, "one resource: the node's");
        let all: Vec<_> = resources[0]
            .scope_metrics
            .iter()
            .flat_map(|s| &s.metrics)
            .collect();
        let istio: Vec<_> = all.iter().filter(|m| m.name == "istio.requests").collect();
        assert_eq!(istio.len(), 1, "one istio.requests metric for both pods");
        let Some(metric::Data::Sum(sum)) = &istio[0].data else {
            panic!("istio.requests is not a Sum");
        };
        let points: Vec<(String, String, String, f64, u64)> = sum
            .data_points
            .iter()
            .map(|p| {
                let value = match p.value {
                    Some(number_data_point::Value::AsDouble(v)) => v,
                    other => panic!("{other:?}"),
                };
                (
                    text(&p.attributes, "k8s.pod.name"),
                    text(&p.attributes, "k8s.pod.uid"),
                    text(&p.attributes, "flowtel.istio.proxy"),
                    value,
                    p.start_time_unix_nano,
                )
            })
            .collect();
        let row = |pod: &str, v: f64| {
            (
                pod.to_owned(),
                format!("uid-{pod}"),
                "istio_sidecar".to_owned(),
                v,
                10,
            )
        };
        assert_eq!(points, [row("api-1", 5.0), row("api-2", 7.0)]);
        let errors = all
            .iter()
            .find(|m| m.name == "flowtel.scrape.errors")
            .expect("scrape errors");
        let Some(metric::Data::Sum(errors)) = &errors.data else {
            panic!("scrape errors is not a Sum");
        };
        assert_eq!(
            errors.data_points[0].value,
            Some(number_data_point::Value::AsInt(2))
        );
        let gauges: Vec<(&str, u64)> = all
            .iter()
            .filter_map(|m| match &m.data {
                Some(metric::Data::Gauge(g)) => {
                    Some((m.name.as_str(), g.data_points[0].start_time_unix_nano))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            gauges,
            [("flowtel.sources.active", 20), ("flowtel.cni.detected", 20)],
            "gauges are values at the report's time"
        );
    }

    #[test]
    fn metrics_without_points_are_left_out() {
        let mut mesh = two_pods();
        mesh.groups.push(FamilyGroup {
            attributes: Vec::new(),
            families: vec![Family {
                metric: &catalogue::HUBBLE_L7_REQUESTS,
                points: Vec::new(),
            }],
        });
        let envelope = wire::Envelope::new(&[], MESH_SCOPE, SCOPE_VERSION);
        let mut b = Batcher::new(&envelope, 1 << 20);
        write_mesh(&mut OtlpSink::new(&mut b, 20), &mesh, 20);
        let names: Vec<String> = b
            .finish()
            .iter()
            .map(|r| ExportMetricsServiceRequest::decode(r.as_slice()).expect("decodes"))
            .flat_map(|r| r.resource_metrics)
            .flat_map(|r| r.scope_metrics)
            .flat_map(|s| s.metrics)
            .map(|m| m.name)
            .collect();
        assert!(
            !names.iter().any(|n| n == "flowtel.hubble.l7.requests"),
            "{names:?}"
        );
    }
}
