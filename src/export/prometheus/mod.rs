//! The optional Prometheus endpoint (`export.prometheus.listen`): `/metrics`
//! serves the flow and TCP metrics of the latest interval, read through the
//! OpenTelemetry SDK's pull reader at each scrape ([`meter`]), always
//! cumulative; the mesh and CNI sources' metrics of that interval and the
//! self-metrics, written by the same [`families`] code that feeds their
//! OTLP export.
//!
//! Names, labels and `target_info` follow the OpenTelemetry specification's
//! "Prometheus and OpenMetrics Compatibility" rules, so a dashboard sees the
//! same names whether a Collector converted the data or Prometheus scraped
//! flowtel. The `prometheus` crate writes the text format; only the
//! translation is done here, because `opentelemetry-prometheus` appends a
//! unit a name already carries (`flowtel_flow_bytes_bytes_total`).

pub mod meter;

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use ::prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use ::prometheus::{Encoder, TextEncoder};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::families::{self, nanos, MetricSink, Number, MESH_SCOPE, SCOPE, SCOPE_VERSION};
use super::otlp::wire::Any;
use super::{Carries, ExportContext, Exporter};
use crate::component::ConfigError;
use crate::flow::mesh::HistogramValue;
use crate::flow::report::IntervalReport;
use crate::telemetry::catalogue::{
    prometheus_name, sanitize, Instrument, Metric as CatalogueMetric,
};
use crate::telemetry::Telemetry;
use meter::SdkMeter;

/// The Prometheus exposition endpoint, for stacks that scrape instead of
/// running a Collector. Off by default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Where `/metrics` listens, e.g. `0.0.0.0:9811`; empty disables it.
    pub listen: String,
}

impl PrometheusConfig {
    /// Checks the address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::new(
                "listen",
                format!(
                    "{:?} is not an address and port, e.g. \"0.0.0.0:9811\"",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

/// The interval the next scrapes read its mesh metrics from.
type Latest = Arc<Mutex<Option<Arc<IntervalReport>>>>;

/// Serves the latest interval on `/metrics`.
pub struct PrometheusExporter {
    meter: SdkMeter,
    latest: Latest,
}

/// The exporter, when `export.prometheus.listen` is set; binds now, so a
/// port clash is a start-up error. Must run inside the tokio runtime.
pub fn build(
    cfg: &PrometheusConfig,
    ctx: &ExportContext<'_>,
) -> anyhow::Result<Option<Box<dyn Exporter>>> {
    if cfg.listen.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = cfg
        .listen
        .parse()
        .map_err(|e| anyhow::anyhow!("export.prometheus.listen {:?}: {e}", cfg.listen))?;
    let endpoint = PrometheusEndpoint::bind(addr, ctx.telemetry.clone())?;
    let meter = SdkMeter::build(ctx, endpoint.reader());
    let latest = endpoint.latest();
    let local = endpoint.serve()?;
    tracing::info!("Prometheus metrics on http://{local}/metrics");
    Ok(Some(Box::new(PrometheusExporter { meter, latest })))
}

impl Exporter for PrometheusExporter {
    fn name(&self) -> &'static str {
        "prometheus"
    }

    fn carries(&self) -> Carries {
        Carries {
            samples: true,
            ..Carries::default()
        }
    }

    fn export<'a>(&'a mut self, reports: &'a [Arc<IntervalReport>]) -> BoxFuture<'a, ()> {
        for r in reports {
            self.meter.publish(r);
        }
        if let Some(newest) = reports.last() {
            *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(newest));
        }
        Box::pin(async {})
    }

    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.meter.shutdown();
        Box::pin(async {})
    }
}

/// Content type of the text exposition format 0.0.4.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A pull reader shared by the meter provider, which registers it, and the
/// HTTP handler, which collects it on each scrape.
#[derive(Debug, Clone)]
struct PullReader(Arc<ManualReader>);

impl MetricReader for PullReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    /// Prometheus counters are cumulative, whatever OTLP is configured with.
    fn temporality(&self, _kind: InstrumentKind) -> Temporality {
        Temporality::Cumulative
    }
}

/// What a scrape reads: the SDK's instruments, the latest interval's mesh
/// metrics and the self-metrics.
#[derive(Debug, Clone)]
struct Sources {
    reader: PullReader,
    latest: Latest,
    telemetry: Telemetry,
    /// When this process started: the start of self-metric counters.
    started: u64,
}

/// The `/metrics` listener and what it serves.
pub struct PrometheusEndpoint {
    listener: tokio::net::TcpListener,
    sources: Sources,
}

impl PrometheusEndpoint {
    /// Binds now, so that a port clash is a start-up error. Must run
    /// inside the tokio runtime.
    pub fn bind(listen: SocketAddr, telemetry: Telemetry) -> anyhow::Result<Self> {
        let refused = |e: std::io::Error| {
            anyhow::anyhow!(
                "cannot listen on {listen} for Prometheus (export.prometheus.listen): {e}"
            )
        };
        let std_listener = std::net::TcpListener::bind(listen).map_err(refused)?;
        std_listener.set_nonblocking(true).map_err(refused)?;
        let listener = tokio::net::TcpListener::from_std(std_listener).map_err(refused)?;
        Ok(Self {
            listener,
            sources: Sources {
                reader: PullReader(Arc::new(
                    ManualReader::builder()
                        .with_temporality(Temporality::Cumulative)
                        .build(),
                )),
                latest: Latest::default(),
                telemetry,
                started: nanos(SystemTime::now()),
            },
        })
    }

    /// The reader to add to the meter provider.
    pub fn reader(&self) -> impl MetricReader {
        self.sources.reader.clone()
    }

    /// Where the latest interval is published for the next scrapes.
    fn latest(&self) -> Latest {
        Arc::clone(&self.sources.latest)
    }

    /// Serves `/metrics` in the background; returns the bound address.
    pub fn serve(self) -> anyhow::Result<SocketAddr> {
        let local = self.listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .with_state(self.sources);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(self.listener, app).await {
                tracing::error!("Prometheus endpoint stopped: {e}");
            }
        });
        Ok(local)
    }
}

async fn metrics(State(sources): State<Sources>) -> Response {
    // Collecting runs every callback and walks every series: keep it off the
    // async workers.
    match tokio::task::spawn_blocking(move || scrape(&sources)).await {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn scrape(sources: &Sources) -> anyhow::Result<String> {
    let mut rm = ResourceMetrics::default();
    sources
        .reader
        .collect(&mut rm)
        .map_err(|e| anyhow::anyhow!("collecting metrics: {e}"))?;
    let latest = sources
        .latest
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let readings = sources.telemetry.read();
    let mut out = Vec::new();
    TextEncoder::new().encode(
        &families(&rm, latest.as_deref(), (&readings, sources.started)),
        &mut out,
    )?;
    Ok(String::from_utf8(out)?)
}

/// Self-metrics as read, and when their counters started (ns).
type SelfReadings<'a> = (
    &'a [(&'static CatalogueMetric, Vec<crate::telemetry::Point>)],
    u64,
);

/// Translates one collection, the latest interval's mesh metrics and the
/// self-metrics into metric families, one per Prometheus name. All are on
/// the same resource (the node's), so there is one `target_info`.
fn families(
    rm: &ResourceMetrics,
    latest: Option<&IntervalReport>,
    (readings, started): SelfReadings<'_>,
) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    if !rm.resource().is_empty() {
        let mut info = proto::Gauge::default();
        info.set_value(1.0);
        let attributes = rm
            .resource()
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_string()));
        let mut m = proto::Metric::from_label(labels(attributes, &[]));
        m.set_gauge(info);
        out.push(family(
            "target_info",
            "Target metadata",
            MetricType::GAUGE,
            vec![m],
        ));
    }
    let mut by_name = Families::default();
    for scope in rm.scope_metrics() {
        let of_scope = scope_labels(scope.scope().name(), scope.scope().version());
        for metric in scope.metrics() {
            let Some((kind, points)) = convert(metric, &of_scope) else {
                continue;
            };
            by_name.add(
                metric.name(),
                metric.unit(),
                metric.description(),
                kind,
                points,
            );
        }
    }
    if let Some(report) = latest {
        let time = nanos(report.end);
        families::write_mesh(
            &mut FamilySink::new(&mut by_name, MESH_SCOPE),
            &report.mesh,
            time,
        );
    }
    families::write_self(&mut FamilySink::new(&mut by_name, SCOPE), readings, started);
    // The encoder refuses a family without points.
    out.extend(
        by_name
            .0
            .into_values()
            .filter(|f| !f.get_metric().is_empty()),
    );
    out
}

/// `otel_scope_name` and, when the scope has one, `otel_scope_version`.
fn scope_labels(name: &str, version: Option<&str>) -> Vec<LabelPair> {
    let mut out = vec![label("otel_scope_name", name)];
    if let Some(v) = version {
        out.push(label("otel_scope_version", v));
    }
    out
}

/// Metric families by Prometheus name.
#[derive(Default)]
struct Families(BTreeMap<String, MetricFamily>);

impl Families {
    /// Adds the points of the OTLP metric `name` to the family its
    /// Prometheus name makes.
    fn add(
        &mut self,
        name: &str,
        unit: &str,
        description: &str,
        kind: MetricType,
        points: Vec<proto::Metric>,
    ) {
        let instrument = match kind {
            MetricType::COUNTER => Instrument::Counter,
            MetricType::HISTOGRAM => Instrument::Histogram,
            _ => Instrument::Gauge,
        };
        match self.0.entry(prometheus_name(name, unit, instrument)) {
            Entry::Vacant(e) => {
                let f = family(e.key(), description, kind, points);
                e.insert(f);
            }
            Entry::Occupied(mut e) if e.get().get_field_type() == kind => {
                e.get_mut().mut_metric().extend(points);
            }
            Entry::Occupied(e) => tracing::warn!(
                "Prometheus: {} is both {:?} and {kind:?}; dropping the {kind:?} ({name})",
                e.key(),
                e.get().get_field_type(),
            ),
        }
    }
}

/// Metrics written by [`families`] as Prometheus families, in a scope.
struct FamilySink<'f> {
    families: &'f mut Families,
    scope: Vec<LabelPair>,
    metric: Option<(&'static CatalogueMetric, MetricType)>,
    points: Vec<proto::Metric>,
}

impl<'f> FamilySink<'f> {
    fn new(families: &'f mut Families, scope: &str) -> Self {
        Self {
            families,
            scope: scope_labels(scope, Some(SCOPE_VERSION)),
            metric: None,
            points: Vec::new(),
        }
    }

    fn point(&self, attributes: &[(&str, Any<'_>)]) -> proto::Metric {
        let attributes = attributes.iter().map(|(k, v)| (*k, any_text(v)));
        proto::Metric::from_label(labels(attributes, &self.scope))
    }
}

/// An attribute value as a label value.
fn any_text(v: &Any<'_>) -> String {
    match v {
        Any::Str(s) => (*s).to_string(),
        Any::Int(i) => i.to_string(),
        Any::Double(d) => d.to_string(),
        Any::Bool(b) => b.to_string(),
    }
}

impl MetricSink for FamilySink<'_> {
    fn begin(&mut self, metric: &'static CatalogueMetric, _start: u64) {
        let kind = match metric.instrument {
            Instrument::Counter => MetricType::COUNTER,
            Instrument::Gauge => MetricType::GAUGE,
            Instrument::Histogram => MetricType::HISTOGRAM,
        };
        self.metric = Some((metric, kind));
        self.points.clear();
    }

    fn number(&mut self, attributes: &[(&str, Any<'_>)], value: Number) {
        let Some((_, kind)) = self.metric else {
            return;
        };
        let value = match value {
            Number::Int(v) => v.as_f64(),
            Number::Double(v) => v,
        };
        let mut m = self.point(attributes);
        if kind == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.points.push(m);
    }

    fn histogram(&mut self, attributes: &[(&str, Any<'_>)], h: &HistogramValue) {
        let mut m = self.point(attributes);
        m.set_histogram(histogram(
            h.bounds.iter().copied(),
            h.counts.iter().copied(),
            h.count,
            h.sum,
        ));
        self.points.push(m);
    }

    fn end(&mut self) {
        if let Some((m, kind)) = self.metric.take() {
            let points = std::mem::take(&mut self.points);
            self.families
                .add(m.name, m.unit, m.description, kind, points);
        }
    }
}

/// A histogram from its bounds and the counts between them (not
/// cumulative; the count above the last bound is implied by `count`).
fn histogram(
    bounds: impl Iterator<Item = f64>,
    counts: impl Iterator<Item = u64>,
    count: u64,
    sum: f64,
) -> proto::Histogram {
    let mut below = 0;
    let buckets = bounds
        .zip(counts)
        .map(|(bound, n)| {
            below += n;
            let mut b = proto::Bucket::default();
            b.set_upper_bound(bound);
            b.set_cumulative_count(below);
            b
        })
        .collect();
    let mut v = proto::Histogram::default();
    v.set_bucket(buckets);
    v.set_sample_count(count);
    v.set_sample_sum(sum);
    v
}

fn family(name: &str, help: &str, kind: MetricType, points: Vec<proto::Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(points);
    f
}

/// Values as Prometheus holds them.
trait AsF64: Copy {
    fn as_f64(self) -> f64;
}

impl AsF64 for u64 {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl AsF64 for i64 {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl AsF64 for f64 {
    fn as_f64(self) -> f64 {
        self
    }
}

/// The Prometheus type and points of one metric; `None` for what the text
/// format cannot carry (exponential histograms, and delta points, which this
/// cumulative reader never produces).
fn convert(metric: &Metric, scope: &[LabelPair]) -> Option<(MetricType, Vec<proto::Metric>)> {
    match metric.data() {
        AggregatedMetrics::U64(d) => convert_data(d, scope),
        AggregatedMetrics::I64(d) => convert_data(d, scope),
        AggregatedMetrics::F64(d) => convert_data(d, scope),
    }
}

fn convert_data<T: AsF64>(
    data: &MetricData<T>,
    scope: &[LabelPair],
) -> Option<(MetricType, Vec<proto::Metric>)> {
    let point = |attrs: Vec<LabelPair>| proto::Metric::from_label(attrs);
    let attributes = |dp: &mut dyn Iterator<Item = &opentelemetry::KeyValue>| {
        labels(dp.map(|kv| (kv.key.as_str(), kv.value.to_string())), scope)
    };
    match data {
        MetricData::Gauge(g) => {
            let points = g.data_points().map(|dp| {
                let mut v = proto::Gauge::default();
                v.set_value(dp.value().as_f64());
                let mut m = point(attributes(&mut dp.attributes()));
                m.set_gauge(v);
                m
            });
            Some((MetricType::GAUGE, points.collect()))
        }
        MetricData::Sum(s) if s.temporality() == Temporality::Cumulative => {
            let points = s.data_points().map(|dp| {
                let mut m = point(attributes(&mut dp.attributes()));
                let value = dp.value().as_f64();
                if s.is_monotonic() {
                    let mut c = proto::Counter::default();
                    c.set_value(value);
                    m.set_counter(c);
                } else {
                    let mut g = proto::Gauge::default();
                    g.set_value(value);
                    m.set_gauge(g);
                }
                m
            });
            let kind = if s.is_monotonic() {
                MetricType::COUNTER
            } else {
                MetricType::GAUGE
            };
            Some((kind, points.collect()))
        }
        MetricData::Histogram(h) if h.temporality() == Temporality::Cumulative => {
            let points = h.data_points().map(|dp| {
                let mut m = point(attributes(&mut dp.attributes()));
                m.set_histogram(histogram(
                    dp.bounds(),
                    dp.bucket_counts(),
                    dp.count(),
                    dp.sum().as_f64(),
                ));
                m
            });
            Some((MetricType::HISTOGRAM, points.collect()))
        }
        _ => None,
    }
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

/// Attributes as labels: names sanitized, and values of attributes whose
/// names collide after sanitizing joined with `;` in the order of the
/// original names, as the specification asks.
fn labels<'a>(
    attributes: impl Iterator<Item = (&'a str, String)>,
    extra: &[LabelPair],
) -> Vec<LabelPair> {
    let mut by_name: BTreeMap<String, Vec<(&str, String)>> = BTreeMap::new();
    for (k, v) in attributes {
        by_name.entry(sanitize(k, false)).or_default().push((k, v));
    }
    let mut out: Vec<LabelPair> = by_name
        .into_iter()
        .map(|(name, mut values)| {
            values.sort_by(|a, b| a.0.cmp(b.0));
            let joined: Vec<String> = values.into_iter().map(|(_, v)| v).collect();
            label(&name, &joined.join(";"))
        })
        .collect();
    out.extend_from_slice(extra);
    out
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_sdk::metrics::SdkMeterProvider;
    use opentelemetry_sdk::Resource;

    use super::*;

    fn sources(reader: PullReader) -> Sources {
        Sources {
            reader,
            latest: Latest::default(),
            telemetry: Telemetry::default(),
            started: 0,
        }
    }

    #[test]
    fn colliding_label_names_are_joined() {
        let got = labels(
            [("net_peer", "7".to_string()), ("net.peer", "x".to_string())].into_iter(),
            &[label("otel_scope_name", "s")],
        );
        let got: Vec<(String, String)> = got
            .iter()
            .map(|l| (l.name().to_string(), l.value().to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("net_peer".to_string(), "x;7".to_string()),
                ("otel_scope_name".to_string(), "s".to_string())
            ]
        );
    }

    /// A provider with one pull reader and the kinds of instruments flowtel
    /// registers, rendered as the endpoint would.
    #[test]
    fn renders_counters_gauges_histograms_and_target_info() {
        let reader = PullReader(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_resource(
                Resource::builder_empty()
                    .with_attributes([
                        KeyValue::new("service.name", "flowtel"),
                        KeyValue::new("k8s.node.name", "node-a"),
                    ])
                    .build(),
            )
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter("flowtel");
        meter
            .u64_observable_counter("flowtel.flow.bytes")
            .with_unit("By")
            .with_description("Bytes")
            .with_callback(|o| {
                o.observe(
                    1234,
                    &[
                        KeyValue::new("server.port", 5001_i64),
                        KeyValue::new("flowtel.flow.direction", "client_to_server"),
                    ],
                )
            })
            .build();
        meter
            .u64_observable_gauge("flowtel.source.byte_counters")
            .with_unit("1")
            .with_description("Accounting on")
            .with_callback(|o| o.observe(1, &[]))
            .build();
        let rtt = meter
            .f64_histogram("flowtel.tcp.rtt")
            .with_unit("s")
            .with_description("RTT")
            .with_boundaries(vec![0.001, 0.01, 0.1])
            .build();
        for v in [0.0005, 0.005, 0.005, 0.5] {
            rtt.record(v, &[KeyValue::new("network.transport", "tcp")]);
        }
        let text = scrape(&sources(reader)).expect("scrape");
        for line in [
            "# TYPE target_info gauge",
            "target_info{k8s_node_name=\"node-a\",service_name=\"flowtel\"} 1",
            "# TYPE flowtel_flow_bytes_total counter",
            "flowtel_flow_bytes_total{flowtel_flow_direction=\"client_to_server\",server_port=\"5001\",otel_scope_name=\"flowtel\"} 1234",
            "# TYPE flowtel_source_byte_counters_ratio gauge",
            "flowtel_source_byte_counters_ratio{otel_scope_name=\"flowtel\"} 1",
            "# TYPE flowtel_tcp_rtt_seconds histogram",
            "flowtel_tcp_rtt_seconds_bucket{network_transport=\"tcp\",otel_scope_name=\"flowtel\",le=\"0.001\"} 1",
            "flowtel_tcp_rtt_seconds_bucket{network_transport=\"tcp\",otel_scope_name=\"flowtel\",le=\"0.01\"} 3",
            "flowtel_tcp_rtt_seconds_bucket{network_transport=\"tcp\",otel_scope_name=\"flowtel\",le=\"0.1\"} 3",
            "flowtel_tcp_rtt_seconds_bucket{network_transport=\"tcp\",otel_scope_name=\"flowtel\",le=\"+Inf\"} 4",
            "flowtel_tcp_rtt_seconds_count{network_transport=\"tcp\",otel_scope_name=\"flowtel\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        let sum = text
            .lines()
            .find_map(|l| l.strip_prefix("flowtel_tcp_rtt_seconds_sum{network_transport=\"tcp\",otel_scope_name=\"flowtel\"} "))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(
            sum.is_some_and(|s| (s - 0.5105).abs() < 1e-9),
            "sum {sum:?} in:\n{text}"
        );
    }

    /// The mesh snapshot, through the same translation, next to the SDK's
    /// metrics: one `target_info`, Istio's own names back, the pod's
    /// identity and the scope as labels.
    #[test]
    fn renders_the_mesh_snapshot() {
        use crate::export::families::tests::two_pods;
        use crate::flow::mesh::{Family, Point, PointValue};
        use crate::flow::{FlowStage, FlowsConfig};
        use crate::telemetry::catalogue;

        let reader = PullReader(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_resource(
                Resource::builder_empty()
                    .with_attributes([KeyValue::new("k8s.node.name", "node-a")])
                    .build(),
            )
            .with_reader(reader.clone())
            .build();
        provider
            .meter("flowtel")
            .u64_observable_counter("flowtel.flow.bytes")
            .with_unit("By")
            .with_callback(|o| o.observe(1, &[]))
            .build();
        let telemetry = Telemetry::default();
        let mut report = FlowStage::new(&FlowsConfig::default(), 0, None, &telemetry).finish();
        report.mesh = two_pods();
        report.mesh.groups[1].families.push(Family {
            metric: &catalogue::ISTIO_REQUEST_DURATION,
            points: vec![Point::new(
                vec![("response_code".into(), "200".into())],
                PointValue::Histogram(HistogramValue {
                    bounds: vec![1.0, 5.0],
                    counts: vec![1, 2, 1],
                    sum: 9.5,
                    count: 4,
                }),
            )],
        });
        let sources = sources(reader);
        *sources.latest.lock().expect("not poisoned") = Some(Arc::new(report));
        let text = scrape(&sources).expect("scrape");
        let scope = format!(
            "otel_scope_name=\"flowtel.mesh\",otel_scope_version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        );
        let pod = |name: &str| {
            format!(
                "flowtel_istio_proxy=\"istio_sidecar\",flowtel_k8s_workload_kind=\"Deployment\",\
                 flowtel_k8s_workload_name=\"api\",k8s_deployment_name=\"api\",\
                 k8s_namespace_name=\"shop\",k8s_pod_name=\"{name}\",k8s_pod_uid=\"uid-{name}\""
            )
        };
        let expected = [
            "target_info{k8s_node_name=\"node-a\"} 1".to_string(),
            "flowtel_flow_bytes_total{otel_scope_name=\"flowtel\"} 1".to_string(),
            "# TYPE istio_requests_total counter".to_string(),
            format!(
                "istio_requests_total{{{},reporter=\"destination\",response_code=\"200\",{scope}}} 5",
                pod("api-1")
            ),
            format!(
                "istio_requests_total{{{},reporter=\"destination\",response_code=\"200\",{scope}}} 7",
                pod("api-2")
            ),
            "# TYPE istio_request_duration_milliseconds histogram".to_string(),
            format!(
                "istio_request_duration_milliseconds_bucket{{{},response_code=\"200\",{scope},le=\"5\"}} 3",
                pod("api-1")
            ),
            format!(
                "istio_request_duration_milliseconds_bucket{{{},response_code=\"200\",{scope},le=\"+Inf\"}} 4",
                pod("api-1")
            ),
            format!(
                "istio_request_duration_milliseconds_sum{{{},response_code=\"200\",{scope}}} 9.5",
                pod("api-1")
            ),
            "# TYPE flowtel_sources_active_ratio gauge".to_string(),
            format!("flowtel_sources_active_ratio{{flowtel_source=\"istio\",{scope}}} 1"),
            format!("flowtel_cni_detected_ratio{{flowtel_cni_name=\"calico\",{scope}}} 1"),
            format!(
                "flowtel_scrape_errors_total{{error_type=\"timeout\",flowtel_scrape_target=\"felix\",{scope}}} 2"
            ),
            format!(
                "flowtel_scrape_successes_total{{flowtel_scrape_target=\"istio_sidecar\",{scope}}} 6"
            ),
        ];
        for line in &expected {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        for once in [
            "# TYPE target_info gauge",
            "# TYPE istio_requests_total counter",
        ] {
            assert_eq!(
                text.lines().filter(|l| *l == once).count(),
                1,
                "{once:?} in:\n{text}"
            );
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("target_info"))
                .count(),
            1,
            "one target_info:\n{text}"
        );
    }
}
