//! The mesh and CNI sources' metrics: Hubble's counters
//! (`flowtel.hubble.*`), the latest Istio proxy scrapes (each point naming
//! the proxy's pod), Felix's families, and the self-metrics saying which
//! sources are active and how scrapes fail.
//!
//! [`MeshSources`] reads the sources once per interval into a
//! [`MeshSnapshot`]. [`MeshSnapshot::write`] is the one description of what
//! is exported: it writes the snapshot into a [`MeshSink`], which is either
//! the OTLP encoder ([`MeshExporter`]) or the Prometheus endpoint's
//! translation ([`crate::export::prometheus`]), so the two cannot disagree.
//!
//! Everything is on the node's resource. A proxy's pod is named by point
//! attributes, as the local end of a flow is: one flowtel reports many pods,
//! and a resource per pod would, through a Collector's Prometheus
//! exporters, put many `target_info` series on one `job`/`instance`.
//!
//! Nothing here produces `flowtel.flow.*`: those stay the kernel source's,
//! so a flow Hubble or Istio also reported is never counted twice (see
//! docs/telemetry.md, "Mesh and CNI sources").

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::attributes::{
    workload_attribute, K8S_NAMESPACE, K8S_POD, K8S_POD_UID, K8S_WORKLOAD, K8S_WORKLOAD_KIND,
    OVERFLOW,
};
use super::otlp_wire::{
    self, Any, Batcher, Envelope, Kind, MetricHeader, Temporality, HISTOGRAM_POINT_ATTRIBUTES,
    NUMBER_POINT_ATTRIBUTES,
};
use super::transport::{OtlpClient, Signal, SignalTransport};
use crate::config::Config;
use crate::enrich::kubernetes::PodInfo;
use crate::source::detect::Detection;
use crate::source::hubble::{self, HubbleConfig, HubbleFlow, HubbleHandle, HubbleReport};
use crate::source::istio::ISTIO_FAMILIES;
use crate::source::mesh::{MeshHandle, MeshScrapes, PodScrape};
use crate::source::scrape::{HistogramValue, MetricKind, PointValue, ScrapedFamily};
use crate::stats::SelfStats;

/// The instrumentation scope of every metric here.
pub const SCOPE: &str = "flowtel.mesh";
/// The scope's version.
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");
const CUMULATIVE: Temporality = Temporality::Cumulative;
/// The attribute naming the kind of proxy an Istio point came from.
const ISTIO_PROXY: &str = "flowtel.istio.proxy";

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
pub type ActiveSourcesCell = Arc<Mutex<ActiveSources>>;

/// The mesh and CNI sources, read once per interval.
pub struct MeshSources {
    hubble_cfg: HubbleConfig,
    hubble: Option<HubbleHandle>,
    mesh: Option<MeshHandle>,
    detection: watch::Receiver<Detection>,
    kernel: &'static str,
    active: ActiveSourcesCell,
    started: u64,
}

impl MeshSources {
    /// Takes the running sources; `kernel` names the kernel source in use.
    pub fn new(
        hubble_cfg: HubbleConfig,
        hubble: Option<HubbleHandle>,
        mesh: Option<MeshHandle>,
        detection: watch::Receiver<Detection>,
        kernel: &'static str,
        active: ActiveSourcesCell,
    ) -> Self {
        Self {
            hubble_cfg,
            hubble,
            mesh,
            detection,
            kernel,
            active,
            started: nanos(SystemTime::now()),
        }
    }

    /// Reads every source now, updates `/readyz`'s active sources, and
    /// returns the snapshot with the Hubble flows received since the
    /// previous call (for flow records). Call once per interval, inside the
    /// tokio runtime.
    pub fn collect(&mut self) -> (MeshSnapshot, Vec<HubbleFlow>) {
        // `auto` picks Hubble up when the socket appears after start.
        if self.hubble.is_none()
            && self.hubble_cfg.enabled == hubble::Enabled::Auto
            && self.detection.borrow().hubble
        {
            self.hubble = hubble::start(&self.hubble_cfg);
        }
        let mut report = self.hubble.as_ref().map(HubbleHandle::report);
        let records = report
            .as_mut()
            .map(|r| std::mem::take(&mut r.records))
            .unwrap_or_default();
        let scrapes = self.mesh.as_ref().map(MeshHandle::latest);
        let active = active_sources(
            self.kernel,
            &self.detection.borrow(),
            report.as_ref(),
            scrapes.as_ref(),
        );
        *self.active.lock().unwrap_or_else(PoisonError::into_inner) = active.clone();
        let snapshot = MeshSnapshot {
            started: self.started,
            time: nanos(SystemTime::now()),
            hubble: report,
            scrapes,
            active,
        };
        (snapshot, records)
    }
}

/// What the mesh and CNI sources hold at one time. Counters are cumulative
/// from `started`.
#[derive(Debug, Clone, Default)]
pub struct MeshSnapshot {
    /// When flowtel started (ns since the epoch): the start of every
    /// counter and histogram here.
    pub started: u64,
    /// When it was read (ns since the epoch).
    pub time: u64,
    /// Hubble's counters; its flow records are handed out separately.
    pub hubble: Option<HubbleReport>,
    pub scrapes: Option<MeshScrapes>,
    pub active: ActiveSources,
}

/// The latest snapshot, shared with the Prometheus endpoint, which reads it
/// at each scrape.
#[derive(Debug, Clone, Default)]
pub struct LatestMesh(Arc<Mutex<Option<Arc<MeshSnapshot>>>>);

impl LatestMesh {
    pub fn publish(&self, snapshot: Arc<MeshSnapshot>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(snapshot);
    }

    /// `None` until the first interval was published.
    pub fn get(&self) -> Option<Arc<MeshSnapshot>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A point's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    Int(u64),
    Double(f64),
}

/// Where [`MeshSnapshot::write`] puts metrics: `begin`, the metric's points,
/// `end`. A metric that gets no point is left out.
pub trait MeshSink {
    /// Starts a metric whose points run from `start` to the snapshot's time
    /// (ns since the epoch).
    fn begin(&mut self, header: MetricHeader, start: u64);
    fn number(&mut self, attributes: &[(&str, Any<'_>)], value: Number);
    fn histogram(&mut self, attributes: &[(&str, Any<'_>)], value: &HistogramValue);
    fn end(&mut self);
}

impl MeshSnapshot {
    /// Writes every metric of the snapshot (names and attributes in
    /// docs/telemetry.md, "Mesh and CNI sources").
    pub fn write(&self, sink: &mut impl MeshSink) {
        write_active(sink, &self.active, self.time);
        if let Some(r) = &self.hubble {
            write_hubble(sink, r, self.started);
        }
        if let Some(s) = &self.scrapes {
            write_scrape_counts(sink, s, self.started);
            write_istio(sink, &s.istio, self.started, self.time);
            if let Some(felix) = &s.felix {
                write_families(sink, felix, &[], self.started, self.time);
            }
        }
    }
}

/// Exports the mesh and CNI sources' metrics over OTLP.
pub struct MeshExporter {
    client: OtlpClient,
    node: Envelope,
    limit: usize,
    /// Hubble's flows as log events, when `export.logs.enabled`.
    logs: Option<(OtlpClient, Envelope)>,
}

impl MeshExporter {
    /// Must run inside the tokio runtime.
    pub fn build(
        cfg: &Config,
        transport: &SignalTransport,
        stats: Arc<SelfStats>,
    ) -> anyhow::Result<Self> {
        let node_resource = super::resource::attributes(&cfg.resource);
        let node = Envelope::new(&node_resource, SCOPE, SCOPE_VERSION);
        let logs = if cfg.export.logs.enabled {
            SignalTransport::resolve(&cfg.export.otlp, &cfg.export.otlp.logs, "logs")
        } else {
            None
        };
        let logs = match logs {
            Some(t) => Some((
                OtlpClient::new(&t, Signal::Logs, stats.clone())?,
                node.clone(),
            )),
            None => None,
        };
        Ok(Self {
            client: OtlpClient::new(transport, Signal::Metrics, stats)?,
            node,
            limit: cfg.export.otlp.max_request_bytes,
            logs,
        })
    }

    /// Encodes and sends one interval's snapshot, and Hubble's flows as
    /// flow records.
    pub async fn export(&self, snapshot: &MeshSnapshot, records: &[HubbleFlow]) {
        let requests = self.encode(snapshot);
        let logs = async {
            if let Some((client, envelope)) = &self.logs {
                if !records.is_empty() {
                    let encoded = super::hubble_logs::encode(envelope, self.limit, records);
                    client.send_all(encoded).await;
                }
            }
        };
        tokio::join!(self.client.send_all(requests), logs);
    }

    /// The requests carrying `snapshot`, each below the size limit.
    fn encode(&self, snapshot: &MeshSnapshot) -> Vec<Vec<u8>> {
        let mut b = Batcher::new(&self.node, self.limit);
        snapshot.write(&mut OtlpSink::new(&mut b, snapshot.time));
        b.finish()
    }
}

/// Writes metrics as OTLP into a [`Batcher`].
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
            otlp_wire::attribute(&mut self.attributes, self.field, k, *v);
        }
    }
}

impl MeshSink for OtlpSink<'_> {
    fn begin(&mut self, header: MetricHeader, start: u64) {
        self.field = match header.kind {
            Kind::Histogram(_) => HISTOGRAM_POINT_ATTRIBUTES,
            Kind::Counter(_) | Kind::Gauge => NUMBER_POINT_ATTRIBUTES,
        };
        self.start = start;
        self.batcher.begin_metric(header);
    }

    fn number(&mut self, attributes: &[(&str, Any<'_>)], value: Number) {
        self.encode(attributes);
        let buf = self.batcher.points(self.attributes.len() + 32);
        match value {
            Number::Int(v) => {
                otlp_wire::number_point(buf, &[&self.attributes], self.start, self.time, v);
            }
            Number::Double(v) => {
                otlp_wire::double_point(buf, &self.attributes, self.start, self.time, v);
            }
        }
    }

    fn histogram(&mut self, attributes: &[(&str, Any<'_>)], h: &HistogramValue) {
        self.encode(attributes);
        let size = self.attributes.len() + 64 + 16 * h.counts.len();
        otlp_wire::histogram_point(
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

/// The attributes naming a proxy's pod, as a flow's local end is named
/// (`docs/telemetry.md`, "Attributes of a flow series"), always down to the
/// pod: two pods of one workload report series with the same Istio labels.
fn pod_attributes(pod: &PodInfo) -> Vec<(&'static str, &str)> {
    let kind = pod.workload.kind.as_str();
    let mut attrs = vec![
        (K8S_NAMESPACE, &*pod.namespace),
        (K8S_POD, &*pod.name),
        (K8S_POD_UID, &*pod.uid),
        (K8S_WORKLOAD_KIND, kind),
        (K8S_WORKLOAD, &*pod.workload.name),
    ];
    if let Some(key) = workload_attribute(kind) {
        attrs.push((key, &*pod.workload.name));
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

/// A metric of integer points; nothing is written when there are none.
fn int_metric<'a>(
    sink: &mut impl MeshSink,
    h: MetricHeader,
    start: u64,
    points: impl IntoIterator<Item = (Vec<(&'a str, Any<'a>)>, u64)>,
) {
    sink.begin(h, start);
    for (attrs, value) in points {
        sink.number(&attrs, Number::Int(value));
    }
    sink.end();
}

/// Owned attribute pairs, as string attributes.
fn string_attrs(attrs: &[(String, String)]) -> Vec<(&str, Any<'_>)> {
    attrs
        .iter()
        .map(|(k, v)| (k.as_str(), Any::Str(v.as_str())))
        .collect()
}

fn overflow_attrs() -> Vec<(&'static str, Any<'static>)> {
    vec![(OVERFLOW, Any::Bool(true))]
}

/// `flowtel.sources.active` (1 per active source) and
/// `flowtel.cni.detected` (1, with the CNI's name), gauges.
fn write_active(sink: &mut impl MeshSink, active: &ActiveSources, time: u64) {
    int_metric(
        sink,
        header(
            "flowtel.sources.active",
            "1",
            "Sources delivering data: the kernel source, hubble, istio, felix.",
            Kind::Gauge,
        ),
        time,
        active
            .sources
            .iter()
            .map(|s| (vec![("flowtel.source", Any::Str(s))], 1)),
    );
    int_metric(
        sink,
        header(
            "flowtel.cni.detected",
            "1",
            "The CNI plugin named by the node's CNI configuration (1 while detected).",
            Kind::Gauge,
        ),
        time,
        active
            .cni
            .iter()
            .map(|c| (vec![("flowtel.cni.name", Any::Str(c))], 1)),
    );
}

/// Hubble's metrics (names and attributes in docs/telemetry.md).
fn write_hubble(sink: &mut impl MeshSink, r: &HubbleReport, started: u64) {
    let counter = Kind::Counter(CUMULATIVE);
    let overflow = |n: u64| (n > 0).then(|| (overflow_attrs(), n));
    let flows: Vec<(Vec<(String, String)>, u64)> = r
        .flows
        .iter()
        .map(|s| (s.key.attributes(), s.count))
        .collect();
    int_metric(
        sink,
        header(
            "flowtel.hubble.flows",
            "{flow}",
            "Flow events Hubble reported, by verdict and ends.",
            counter,
        ),
        started,
        flows
            .iter()
            .map(|(a, n)| (string_attrs(a), *n))
            .chain(overflow(r.flows_overflow)),
    );
    let l7: Vec<(Vec<(String, String)>, u64)> = r
        .l7_requests
        .iter()
        .map(|s| (s.key.attributes(), s.count))
        .collect();
    int_metric(
        sink,
        header(
            "flowtel.hubble.l7.requests",
            "{request}",
            "L7 records Hubble reported (requests and responses).",
            counter,
        ),
        started,
        l7.iter()
            .map(|(a, n)| (string_attrs(a), *n))
            .chain(overflow(r.l7_requests_overflow)),
    );
    sink.begin(
        header(
            "flowtel.hubble.l7.duration",
            "s",
            "Request-to-response latency Hubble measured.",
            Kind::Histogram(CUMULATIVE),
        ),
        started,
    );
    for s in &r.l7_duration {
        sink.histogram(&string_attrs(&s.key.attributes()), &s.histogram);
    }
    if let Some(h) = &r.l7_duration_overflow {
        sink.histogram(&overflow_attrs(), h);
    }
    sink.end();
    let st = &r.stream;
    int_metric(
        sink,
        header(
            "flowtel.hubble.lost_events",
            "{event}",
            "Events Hubble lost before flowtel could read them.",
            counter,
        ),
        started,
        st.lost_events.iter().map(|(source, n)| {
            (
                vec![("flowtel.hubble.lost_events.source", Any::Str(source))],
                *n,
            )
        }),
    );
    int_metric(
        sink,
        header(
            "flowtel.hubble.stream.errors",
            "{error}",
            "Hubble stream failures, by kind.",
            counter,
        ),
        started,
        st.errors
            .iter()
            .map(|(kind, n)| (vec![("error.type", Any::Str(kind))], *n)),
    );
    int_metric(
        sink,
        header(
            "flowtel.hubble.stream.connected",
            "1",
            "1 while a GetFlows stream is open.",
            Kind::Gauge,
        ),
        started,
        [(Vec::new(), u64::from(st.connected))],
    );
    int_metric(
        sink,
        header(
            "flowtel.hubble.stream.reconnects",
            "{connection}",
            "GetFlows streams opened after the first.",
            counter,
        ),
        started,
        [(Vec::new(), st.reconnects)],
    );
    int_metric(
        sink,
        header(
            "flowtel.hubble.flows.duplicates",
            "{flow}",
            "Flows replayed after a reconnect and not counted again.",
            counter,
        ),
        started,
        [(Vec::new(), st.duplicates)],
    );
    int_metric(
        sink,
        header(
            "flowtel.hubble.flows.malformed",
            "{flow}",
            "Counted flows with a malformed part, by kind.",
            counter,
        ),
        started,
        st.malformed
            .iter()
            .map(|(kind, n)| (vec![("error.type", Any::Str(kind))], *n)),
    );
    int_metric(
        sink,
        header(
            "flowtel.hubble.records.dropped",
            "{flow}",
            "Flows dropped from the flow-record queue because it was full.",
            counter,
        ),
        started,
        [(Vec::new(), r.records_dropped)],
    );
}

/// `flowtel.scrape.errors` and `flowtel.scrape.successes`.
fn write_scrape_counts(sink: &mut impl MeshSink, s: &MeshScrapes, started: u64) {
    int_metric(
        sink,
        header(
            "flowtel.scrape.errors",
            "{scrape}",
            "Failed scrapes of Istio proxies and Felix, by target kind and error kind.",
            Kind::Counter(CUMULATIVE),
        ),
        started,
        s.errors.iter().map(|((target, kind), n)| {
            (
                vec![
                    ("flowtel.scrape.target", Any::Str(target.as_str())),
                    ("error.type", Any::Str(kind)),
                ],
                *n,
            )
        }),
    );
    int_metric(
        sink,
        header(
            "flowtel.scrape.successes",
            "{scrape}",
            "Successful scrapes, by target kind.",
            Kind::Counter(CUMULATIVE),
        ),
        started,
        s.scrapes.iter().map(|(target, n)| {
            (
                vec![("flowtel.scrape.target", Any::Str(target.as_str()))],
                *n,
            )
        }),
    );
}

/// The Istio families of every proxy, one metric per family, each point
/// naming its pod and the kind of proxy.
fn write_istio(sink: &mut impl MeshSink, pods: &[PodScrape], started: u64, time: u64) {
    let named: Vec<(Vec<(&str, &str)>, &PodScrape)> = pods
        .iter()
        .map(|p| {
            let mut attrs = pod_attributes(&p.pod);
            attrs.push((ISTIO_PROXY, p.kind.as_str()));
            (attrs, p)
        })
        .collect();
    for spec in ISTIO_FAMILIES {
        let mut begun = false;
        for (attrs, pod) in &named {
            let Some(f) = pod.families.iter().find(|f| f.name == spec.name) else {
                continue;
            };
            if !begun {
                sink.begin(family_header(f), family_start(f, started, time));
                begun = true;
            }
            write_points(sink, f, attrs);
        }
        if begun {
            sink.end();
        }
    }
}

fn family_header(f: &ScrapedFamily) -> MetricHeader {
    let kind = match f.kind {
        MetricKind::Counter => Kind::Counter(CUMULATIVE),
        MetricKind::Gauge => Kind::Gauge,
        MetricKind::Histogram => Kind::Histogram(CUMULATIVE),
    };
    header(f.name, f.unit, f.description, kind)
}

/// Counters and histograms are cumulative from flowtel's start (the
/// scraped process's own start is unknown); gauges are values at `time`.
fn family_start(f: &ScrapedFamily, started: u64, time: u64) -> u64 {
    match f.kind {
        MetricKind::Gauge => time,
        MetricKind::Counter | MetricKind::Histogram => started,
    }
}

/// The points of one family: `extra`, then the exposition's labels as
/// written, as attributes.
fn write_points(sink: &mut impl MeshSink, f: &ScrapedFamily, extra: &[(&str, &str)]) {
    let mut attrs: Vec<(&str, Any<'_>)> = Vec::new();
    for p in &f.points {
        attrs.clear();
        attrs.extend(extra.iter().map(|(k, v)| (*k, Any::Str(v))));
        attrs.extend(
            p.labels
                .iter()
                .map(|(k, v)| (k.as_str(), Any::Str(v.as_str()))),
        );
        match &p.value {
            PointValue::Number(v) => sink.number(&attrs, Number::Double(*v)),
            PointValue::Histogram(h) => sink.histogram(&attrs, h),
        }
    }
}

/// Scraped families, one metric each.
fn write_families(
    sink: &mut impl MeshSink,
    families: &[ScrapedFamily],
    extra: &[(&str, &str)],
    started: u64,
    time: u64,
) {
    for f in families {
        sink.begin(family_header(f), family_start(f, started, time));
        write_points(sink, f, extra);
        sink.end();
    }
}

/// Scraped families as OTel metrics into `b`: the exposition's labels
/// become point attributes as written, after `extra`. Counters and
/// histograms are cumulative from `start`.
pub fn encode_families(
    b: &mut Batcher,
    families: &[ScrapedFamily],
    extra: &[(&str, &str)],
    (start, time): (u64, u64),
) {
    write_families(&mut OtlpSink::new(b, time), families, extra, start, time);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::enrich::kubernetes::{Workload, WorkloadKind};
    use crate::source::hubble::LATENCY_BOUNDS;
    use crate::source::mesh::TargetKind;
    use crate::source::scrape::Point;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    use prost::Message;

    fn decode(requests: Vec<Vec<u8>>) -> Vec<ExportMetricsServiceRequest> {
        requests
            .iter()
            .map(|r| ExportMetricsServiceRequest::decode(r.as_slice()).expect("decodes"))
            .collect()
    }

    fn metrics(requests: Vec<Vec<u8>>) -> Vec<opentelemetry_proto::tonic::metrics::v1::Metric> {
        decode(requests)
            .into_iter()
            .flat_map(|r| r.resource_metrics)
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

    fn text(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> String {
        match attr(kvs, key) {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("{key}: {other:?}"),
        }
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
        write_hubble(&mut OtlpSink::new(&mut b, 2), &report, 1);
        let metrics = metrics(b.finish());
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
        assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (1, 2));
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

    pub(crate) fn pod(namespace: &str, name: &str, kind: WorkloadKind, workload: &str) -> PodInfo {
        PodInfo {
            uid: format!("uid-{name}").into(),
            namespace: namespace.into(),
            name: name.into(),
            node: Some("node-a".into()),
            workload: Workload {
                kind,
                name: workload.into(),
            },
            labels: Box::new([]),
            host_network: false,
            zone: None,
            region: None,
            mesh: None,
        }
    }

    pub(crate) fn requests(code: &str, value: f64) -> ScrapedFamily {
        let spec = &ISTIO_FAMILIES[0];
        ScrapedFamily {
            name: spec.name,
            description: spec.description,
            kind: spec.kind,
            unit: spec.unit,
            points: vec![Point {
                labels: vec![
                    ("reporter".into(), "destination".into()),
                    ("response_code".into(), code.into()),
                ],
                value: PointValue::Number(value),
            }],
        }
    }

    /// Two replicas of a Deployment and ztunnel: one metric per family on
    /// the node's resource, each point naming its pod.
    pub(crate) fn two_pods_and_ztunnel() -> MeshSnapshot {
        let scrape = |pod: PodInfo, kind, families| PodScrape {
            pod: Arc::new(pod),
            kind,
            families,
        };
        MeshSnapshot {
            started: 10,
            time: 20,
            hubble: None,
            scrapes: Some(MeshScrapes {
                istio: vec![
                    scrape(
                        pod("shop", "api-1", WorkloadKind::Deployment, "api"),
                        TargetKind::IstioSidecar,
                        vec![requests("200", 5.0)],
                    ),
                    scrape(
                        pod("shop", "api-2", WorkloadKind::Deployment, "api"),
                        TargetKind::IstioSidecar,
                        vec![requests("200", 7.0)],
                    ),
                    scrape(
                        pod(
                            "istio-system",
                            "ztunnel-x",
                            WorkloadKind::DaemonSet,
                            "ztunnel",
                        ),
                        TargetKind::Ztunnel,
                        Vec::new(),
                    ),
                ],
                felix: None,
                errors: [((TargetKind::Felix, "timeout"), 2)].into(),
                scrapes: [(TargetKind::IstioSidecar, 6)].into(),
            }),
            active: ActiveSources {
                cni: Some("calico".into()),
                sources: vec!["conntrack", "istio"],
            },
        }
    }

    #[test]
    fn istio_points_name_their_pod_on_the_node_resource() {
        let node = [opentelemetry::KeyValue::new("k8s.node.name", "node-a")];
        let envelope = Envelope::new(&node, SCOPE, SCOPE_VERSION);
        let mut b = Batcher::new(&envelope, 1 << 20);
        two_pods_and_ztunnel().write(&mut OtlpSink::new(&mut b, 20));
        let requests = decode(b.finish());
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
        let points: Vec<(String, String, String, String, String, f64, u64)> = sum
            .data_points
            .iter()
            .map(|p| {
                let value = match p.value {
                    Some(number_data_point::Value::AsDouble(v)) => v,
                    other => panic!("{other:?}"),
                };
                (
                    text(&p.attributes, "k8s.pod.name"),
                    text(&p.attributes, "k8s.namespace.name"),
                    text(&p.attributes, "flowtel.k8s.workload.name"),
                    text(&p.attributes, "k8s.deployment.name"),
                    text(&p.attributes, "flowtel.istio.proxy"),
                    value,
                    p.start_time_unix_nano,
                )
            })
            .collect();
        let row = |pod: &str, v: f64| {
            (
                pod.to_owned(),
                "shop".to_owned(),
                "api".to_owned(),
                "api".to_owned(),
                "istio_sidecar".to_owned(),
                v,
                10,
            )
        };
        assert_eq!(points, [row("api-1", 5.0), row("api-2", 7.0)]);
        let uids: Vec<String> = sum
            .data_points
            .iter()
            .map(|p| text(&p.attributes, "k8s.pod.uid"))
            .collect();
        assert_eq!(uids, ["uid-api-1", "uid-api-2"]);
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
        let gauges: Vec<&str> = all
            .iter()
            .filter(|m| matches!(m.data, Some(metric::Data::Gauge(_))))
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(gauges, ["flowtel.sources.active", "flowtel.cni.detected"]);
    }

    #[test]
    fn pod_attributes_name_the_workload() {
        let owned = pod("shop", "api-7c9d-x", WorkloadKind::Deployment, "api");
        assert_eq!(
            pod_attributes(&owned),
            [
                ("k8s.namespace.name", "shop"),
                ("k8s.pod.name", "api-7c9d-x"),
                ("k8s.pod.uid", "uid-api-7c9d-x"),
                ("flowtel.k8s.workload.kind", "Deployment"),
                ("flowtel.k8s.workload.name", "api"),
                ("k8s.deployment.name", "api"),
            ]
        );
        let bare = pod("shop", "debug", WorkloadKind::Pod, "debug");
        assert_eq!(
            pod_attributes(&bare).last(),
            Some(&("flowtel.k8s.workload.name", "debug")),
            "a bare pod has no k8s.<kind>.name"
        );
    }

    #[test]
    fn latest_mesh_is_empty_until_published() {
        let latest = LatestMesh::default();
        assert!(latest.get().is_none());
        latest.publish(Arc::new(two_pods_and_ztunnel()));
        assert_eq!(latest.get().map(|s| s.time), Some(20));
    }
}
