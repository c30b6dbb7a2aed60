//! The optional Prometheus endpoint (`export.prometheus.listen`): `/metrics`
//! serves the metrics the OTLP exporter registers, read by a pull reader on
//! the same meter provider at each scrape, always cumulative.
//!
//! Names, labels and `target_info` follow the OpenTelemetry specification's
//! "Prometheus and OpenMetrics Compatibility" rules, so a dashboard sees the
//! same names whether a Collector converted the data or Prometheus scraped
//! flowtel. The `prometheus` crate writes the text format; only the
//! translation is done here, because `opentelemetry-prometheus` appends a
//! unit a name already carries (`flowtel_flow_bytes_bytes_total`).

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ::prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use ::prometheus::{Encoder, TextEncoder};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use opentelemetry::{Key, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};

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

/// The `/metrics` listener and the reader it collects.
pub struct PrometheusEndpoint {
    listener: tokio::net::TcpListener,
    reader: PullReader,
}

impl PrometheusEndpoint {
    /// Binds now, so that a port clash is a start-up error.
    pub async fn bind(listen: SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {listen} for Prometheus (export.prometheus.listen): {e}"
            )
        })?;
        Ok(Self {
            listener,
            reader: PullReader(Arc::new(
                ManualReader::builder()
                    .with_temporality(Temporality::Cumulative)
                    .build(),
            )),
        })
    }

    /// The reader to add to the meter provider.
    pub fn reader(&self) -> impl MetricReader {
        self.reader.clone()
    }

    /// Serves `/metrics` in the background; returns the bound address.
    pub fn serve(self) -> anyhow::Result<SocketAddr> {
        let local = self.listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .with_state(self.reader);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(self.listener, app).await {
                tracing::error!("Prometheus endpoint stopped: {e}");
            }
        });
        Ok(local)
    }
}

async fn metrics(State(reader): State<PullReader>) -> Response {
    // Collecting runs every callback and walks every series: keep it off the
    // async workers.
    match tokio::task::spawn_blocking(move || scrape(&reader)).await {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn scrape(reader: &PullReader) -> anyhow::Result<String> {
    let mut rm = ResourceMetrics::default();
    reader
        .collect(&mut rm)
        .map_err(|e| anyhow::anyhow!("collecting metrics: {e}"))?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&families(&rm), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// Translates one collection into metric families, one per Prometheus name.
fn families(rm: &ResourceMetrics) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    if !rm.resource().is_empty() {
        let mut info = proto::Gauge::default();
        info.set_value(1.0);
        let mut m = proto::Metric::from_label(labels(rm.resource().iter(), &[]));
        m.set_gauge(info);
        out.push(family(
            "target_info",
            "Target metadata",
            MetricType::GAUGE,
            vec![m],
        ));
    }
    let mut by_name: BTreeMap<String, MetricFamily> = BTreeMap::new();
    for scope in rm.scope_metrics() {
        let mut scope_labels = vec![label("otel_scope_name", scope.scope().name())];
        if let Some(v) = scope.scope().version() {
            scope_labels.push(label("otel_scope_version", v));
        }
        for metric in scope.metrics() {
            let Some((kind, points)) = convert(metric, &scope_labels) else {
                continue;
            };
            let name = metric_name(metric.name(), metric.unit(), kind);
            match by_name.entry(name) {
                Entry::Vacant(e) => {
                    let f = family(e.key(), metric.description(), kind, points);
                    e.insert(f);
                }
                Entry::Occupied(mut e) if e.get().get_field_type() == kind => {
                    e.get_mut().mut_metric().extend(points);
                }
                Entry::Occupied(e) => tracing::warn!(
                    "Prometheus: {} is both {:?} and {kind:?}; dropping the {kind:?} ({})",
                    e.key(),
                    e.get().get_field_type(),
                    metric.name()
                ),
            }
        }
    }
    // The encoder refuses a family without points.
    out.extend(by_name.into_values().filter(|f| !f.get_metric().is_empty()));
    out
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
    match data {
        MetricData::Gauge(g) => {
            let points = g.data_points().map(|dp| {
                let mut v = proto::Gauge::default();
                v.set_value(dp.value().as_f64());
                let mut m = point(labels(
                    dp.attributes().map(|kv| (&kv.key, &kv.value)),
                    scope,
                ));
                m.set_gauge(v);
                m
            });
            Some((MetricType::GAUGE, points.collect()))
        }
        MetricData::Sum(s) if s.temporality() == Temporality::Cumulative => {
            let points = s.data_points().map(|dp| {
                let mut m = point(labels(
                    dp.attributes().map(|kv| (&kv.key, &kv.value)),
                    scope,
                ));
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
                let mut below = 0;
                let buckets = dp
                    .bounds()
                    .zip(dp.bucket_counts())
                    .map(|(bound, count)| {
                        below += count;
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(bound);
                        b.set_cumulative_count(below);
                        b
                    })
                    .collect();
                let mut v = proto::Histogram::default();
                v.set_bucket(buckets);
                v.set_sample_count(dp.count());
                v.set_sample_sum(dp.sum().as_f64());
                let mut m = point(labels(
                    dp.attributes().map(|kv| (&kv.key, &kv.value)),
                    scope,
                ));
                m.set_histogram(v);
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
    attributes: impl Iterator<Item = (&'a Key, &'a Value)>,
    extra: &[LabelPair],
) -> Vec<LabelPair> {
    let mut by_name: BTreeMap<String, Vec<(&str, String)>> = BTreeMap::new();
    for (k, v) in attributes {
        by_name
            .entry(sanitize(k.as_str(), false))
            .or_default()
            .push((k.as_str(), v.to_string()));
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

/// Replaces what a Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or
/// label name (no `:`) cannot hold with `_`, with no two `_` in a row.
fn sanitize(name: &str, metric: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    for c in name.chars() {
        let c = if c.is_ascii_alphanumeric() || (metric && c == ':') {
            c
        } else {
            '_'
        };
        if !(c == '_' && out.ends_with('_')) {
            out.push(c);
        }
    }
    out
}

/// The Prometheus name of an OTLP metric: sanitized, then the unit unless
/// the name already holds it, then `_total` for counters.
fn metric_name(name: &str, unit: &str, kind: MetricType) -> String {
    let mut out = sanitize(name, true);
    if let Some(unit) = unit_suffix(unit, kind == MetricType::GAUGE) {
        if !format!("_{out}_").contains(&format!("_{unit}_")) {
            out.push('_');
            out.push_str(&unit);
        }
    }
    if kind == MetricType::COUNTER && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

/// The name suffix for a UCUM unit: full words (`By` → `bytes`, `s` →
/// `seconds`), `{annotations}` dropped, `1` → `ratio` for gauges only,
/// `a/b` → `a_per_b`; other units sanitized.
fn unit_suffix(unit: &str, gauge: bool) -> Option<String> {
    let mut plain = String::with_capacity(unit.len());
    let mut depth = 0usize;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            c if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    let plain = plain.trim();
    if plain == "1" {
        return gauge.then(|| "ratio".to_string());
    }
    let per = |u: &str| -> Option<String> {
        let w = match u {
            "s" => "second",
            "min" => "minute",
            "h" => "hour",
            "d" => "day",
            "w" => "week",
            "mo" => "month",
            "y" => "year",
            other => return unit_word(other),
        };
        Some(w.to_string())
    };
    match plain.split_once('/') {
        Some((main, per_unit)) => match (unit_word(main), per(per_unit)) {
            (Some(m), Some(p)) => Some(format!("{m}_per_{p}")),
            (None, Some(p)) => Some(format!("per_{p}")),
            (m, None) => m,
        },
        None => unit_word(plain),
    }
}

/// One UCUM unit as a Prometheus word; unknown units keep their letters and
/// digits.
fn unit_word(unit: &str) -> Option<String> {
    let w = match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "bit" => "bits",
        "%" => "percent",
        "Hz" => "hertz",
        "Cel" => "celsius",
        "1" => return None,
        other => {
            let kept: String = other.chars().filter(char::is_ascii_alphanumeric).collect();
            return (!kept.is_empty()).then_some(kept);
        }
    };
    Some(w.to_string())
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::KeyValue;
    use opentelemetry_sdk::metrics::SdkMeterProvider;
    use opentelemetry_sdk::Resource;

    use super::*;

    #[test]
    fn names_follow_the_specification() {
        let cases = [
            (
                "flowtel.flow.bytes",
                "By",
                MetricType::COUNTER,
                "flowtel_flow_bytes_total",
            ),
            (
                "flowtel.flow.packets",
                "{packet}",
                MetricType::COUNTER,
                "flowtel_flow_packets_total",
            ),
            (
                "flowtel.tcp.rtt",
                "s",
                MetricType::HISTOGRAM,
                "flowtel_tcp_rtt_seconds",
            ),
            (
                "flowtel.flows.tracked",
                "{flow}",
                MetricType::GAUGE,
                "flowtel_flows_tracked",
            ),
            (
                "flowtel.source.byte_counters",
                "1",
                MetricType::GAUGE,
                "flowtel_source_byte_counters_ratio",
            ),
            (
                "flowtel.ebpf.overflow.bytes",
                "By",
                MetricType::COUNTER,
                "flowtel_ebpf_overflow_bytes_total",
            ),
            (
                "a.ratio.counter",
                "1",
                MetricType::COUNTER,
                "a_ratio_counter_total",
            ),
            (
                "net.io",
                "By/s",
                MetricType::GAUGE,
                "net_io_bytes_per_second",
            ),
            (
                "events",
                "{event}/s",
                MetricType::GAUGE,
                "events_per_second",
            ),
            (
                "2xx..requests_total",
                "",
                MetricType::COUNTER,
                "_2xx_requests_total",
            ),
            ("q.depth", "msgs", MetricType::GAUGE, "q_depth_msgs"),
        ];
        for (name, unit, kind, want) in cases {
            assert_eq!(
                metric_name(name, unit, kind),
                want,
                "{name} [{unit}] {kind:?}"
            );
        }
    }

    #[test]
    fn colliding_label_names_are_joined() {
        let a = Key::from("net.peer");
        let b = Key::from("net_peer");
        let (va, vb) = (Value::from("x"), Value::from(7_i64));
        let got = labels(
            [(&b, &vb), (&a, &va)].into_iter(),
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
        let text = scrape(&reader).expect("scrape");
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
}
