//! OTLP metrics: flow bytes and packets, TCP health and drops as monotonic
//! Sums and Histograms, plus flowtel's own counters, encoded from each
//! finished interval ([`super::otlp::wire`]) and sent with
//! [`OtlpClient`].
//!
//! The flow table is the source of truth for cumulative values. Each
//! series' attributes are encoded once and reused while the series lives;
//! delta temporality is computed here from the previous export. The same
//! report feeds the Prometheus endpoint when it is on
//! ([`super::prometheus::meter`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use foldhash::fast::RandomState;
use futures::future::BoxFuture;
use opentelemetry::KeyValue;

use super::attributes::{
    dns_attributes, dns_name_attributes, drop_attributes, series_attributes, zone_attributes,
    Direction,
};
use super::families::{self, nanos, OtlpSink, MESH_SCOPE, SCOPE, SCOPE_VERSION};
use super::instruments::{health_counters, DNS_LATENCY_BOUNDS, DURATION_BOUNDS, RTT_BOUNDS};
use super::otlp::transport::{OtlpClient, Signal, SignalTransport};
use super::otlp::wire::{
    self, Batcher, Envelope, MetricHeader, Temporality, HISTOGRAM_POINT_ATTRIBUTES,
    NUMBER_POINT_ATTRIBUTES,
};
use super::otlp::Temporality as ConfigTemporality;
use super::resource;
use super::selection::Selection;
use super::{Carries, ExportContext, Exporter};
use crate::flow::model::Counters;
use crate::flow::report::IntervalReport;
use crate::flow::series::SeriesKey;
use crate::telemetry::catalogue::{self, Instrument, Metric};
use crate::telemetry::Telemetry;

/// Ships each finished interval's metrics to an OTLP collector: the flow,
/// TCP and self metrics in the scope `flowtel`, the mesh and CNI sources'
/// in `flowtel.mesh`, each in as many requests as
/// `export.otlp.max_request_bytes` needs, sent together.
pub struct OtlpMetricsExporter {
    encoder: MetricsEncoder,
    mesh: Envelope,
    client: OtlpClient,
}

/// The exporter, when an OTLP endpoint for metrics is configured; must run
/// inside the tokio runtime (tonic needs it).
pub fn build(ctx: &ExportContext<'_>) -> anyhow::Result<Option<Box<dyn Exporter>>> {
    let otlp = &ctx.export.otlp;
    let Some(transport) = SignalTransport::resolve(otlp, &otlp.metrics, "metrics") else {
        return Ok(None);
    };
    tracing::info!(endpoint = %transport.url, protocol = ?transport.protocol, "exporting OTLP metrics");
    let resource = resource::attributes(ctx.resource);
    Ok(Some(Box::new(OtlpMetricsExporter {
        encoder: MetricsEncoder::new(ctx, ctx.telemetry.clone()),
        mesh: Envelope::new(&resource, MESH_SCOPE, SCOPE_VERSION),
        client: OtlpClient::new(&transport, Signal::Metrics, ctx.telemetry)?,
    })))
}

impl OtlpMetricsExporter {
    /// The mesh and CNI sources' metrics of `report`, cumulative.
    fn encode_mesh(&self, report: &IntervalReport) -> Vec<Vec<u8>> {
        let time = nanos(report.end);
        let mut b = Batcher::new(&self.mesh, self.encoder.limit);
        families::write_mesh(&mut OtlpSink::new(&mut b, time), &report.mesh, time);
        b.finish()
    }
}

impl Exporter for OtlpMetricsExporter {
    fn name(&self) -> &'static str {
        "otlp_metrics"
    }

    fn carries(&self) -> Carries {
        Carries {
            samples: true,
            ..Carries::default()
        }
    }

    fn export<'a>(&'a mut self, reports: &'a [Arc<IntervalReport>]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(newest) = reports.last() else { return };
            let mut requests = self.encoder.encode(reports);
            requests.extend(self.encode_mesh(newest));
            self.client.send_all(requests).await;
        })
    }
}

/// A series' attribute lists, encoded when first exported.
#[derive(Debug, Default)]
struct SeriesAttributes {
    /// Without a direction (totals, TCP counters).
    plain: Option<Arc<[u8]>>,
    /// Per direction, client→server then server→client.
    directed: Option<[Arc<[u8]>; 2]>,
    /// For histogram points (a different field number).
    histogram: Option<Arc<[u8]>>,
    /// The last export that used it.
    seen: u64,
}

/// One histogram series: cumulative and this interval's buckets.
#[derive(Debug)]
struct HistogramState {
    total: Vec<u64>,
    total_sum: f64,
    interval: Vec<u64>,
    interval_sum: f64,
    start: u64,
    seen: u64,
}

impl HistogramState {
    fn new(buckets: usize, start: u64) -> Self {
        Self {
            total: vec![0; buckets],
            total_sum: 0.0,
            interval: vec![0; buckets],
            interval_sum: 0.0,
            start,
            seen: 0,
        }
    }

    fn add(&mut self, bounds: &[f64], samples: &[f64]) {
        for &v in samples {
            let i = bounds.partition_point(|b| *b < v);
            self.total[i] += 1;
            self.interval[i] += 1;
            self.total_sum += v;
            self.interval_sum += v;
        }
    }
}

/// Turns interval reports into encoded `ExportMetricsServiceRequest`s.
pub struct MetricsEncoder {
    envelope: Envelope,
    limit: usize,
    temporality: Temporality,
    selection: Selection,
    telemetry: Telemetry,
    /// When this process started: the start of self-metric counters.
    started: u64,
    series: HashMap<SeriesKey, SeriesAttributes, RandomState>,
    /// Delta temporality: each point's last cumulative value, by a hash of
    /// its metric and attributes, and the export that saw it.
    previous: HashMap<u64, (u64, u64), RandomState>,
    /// The time of the previous export: where delta points start.
    last_time: Option<u64>,
    rtt: HashMap<Arc<[u8]>, HistogramState, RandomState>,
    durations: HashMap<Arc<[u8]>, HistogramState, RandomState>,
    dns_latency: HashMap<Arc<[u8]>, HistogramState, RandomState>,
    generation: u64,
    hasher: RandomState,
}

impl MetricsEncoder {
    /// An encoder of the context's resource, temporality and attribute
    /// selection; self-metrics are read from `telemetry` at each export.
    pub fn new(ctx: &ExportContext<'_>, telemetry: Telemetry) -> Self {
        let otlp = &ctx.export.otlp;
        Self {
            envelope: Envelope::new(&resource::attributes(ctx.resource), SCOPE, SCOPE_VERSION),
            limit: otlp.max_request_bytes,
            temporality: match otlp.temporality {
                ConfigTemporality::Cumulative => Temporality::Cumulative,
                ConfigTemporality::Delta => Temporality::Delta,
            },
            selection: Selection::new(&ctx.export.metrics.attributes),
            telemetry,
            started: nanos(SystemTime::now()),
            series: HashMap::default(),
            previous: HashMap::default(),
            last_time: None,
            rtt: HashMap::default(),
            durations: HashMap::default(),
            dns_latency: HashMap::default(),
            generation: 0,
            hasher: RandomState::default(),
        }
    }

    /// The requests that carry the intervals that waited, oldest first:
    /// the counters of the newest (they are cumulative), the histogram
    /// samples of all; each request below the size limit.
    pub fn encode(&mut self, reports: &[Arc<IntervalReport>]) -> Vec<Vec<u8>> {
        let Some(report) = reports.last() else {
            return Vec::new();
        };
        self.generation += 1;
        for r in reports {
            self.absorb(r);
        }
        let time = nanos(report.end);
        let mut b = Batcher::new(&self.envelope, self.limit);
        self.flows(&mut b, report, time);
        self.tcp_counters(&mut b, report, time);
        self.histograms(&mut b, time);
        let drops = report
            .drops
            .iter()
            .map(|p| (drop_attributes(&p.key), p.counters.packets, nanos(p.start)))
            .collect();
        self.selected(&mut b, &catalogue::PACKET_DROPS, drops, time);
        let dns = report
            .dns
            .iter()
            .map(|p| (dns_attributes(&p.key), p.requests, nanos(p.start)))
            .collect();
        self.selected(&mut b, &catalogue::DNS_REQUESTS, dns, time);
        if !report.dns_names.is_empty() {
            let names = report
                .dns_names
                .iter()
                .map(|p| (dns_name_attributes(p), p.requests, nanos(p.start)))
                .collect();
            self.selected(&mut b, &catalogue::DNS_NAME_REQUESTS, names, time);
        }
        let zones = report
            .zones
            .iter()
            .flat_map(|p| {
                let start = nanos(p.start);
                [
                    (Direction::ClientToServer, p.counters.to_server.bytes),
                    (Direction::ServerToClient, p.counters.to_client.bytes),
                ]
                .map(|(d, bytes)| (zone_attributes(&p.key, d), bytes, start))
            })
            .collect();
        self.selected(&mut b, &catalogue::ZONE_BYTES, zones, time);
        self.self_metrics(&mut b, time);
        let generation = self.generation;
        self.series.retain(|_, s| s.seen == generation);
        self.previous.retain(|_, (_, seen)| *seen == generation);
        self.last_time = Some(time);
        b.finish()
    }

    fn counter(&self, d: &Metric) -> MetricHeader {
        families::header(d, self.temporality)
    }

    /// The value and start a counter point is exported with: as is when
    /// cumulative, the change since the previous export when delta.
    fn point_value(&mut self, metric: &str, attrs: &[&[u8]], value: u64, start: u64) -> (u64, u64) {
        if self.temporality == Temporality::Cumulative {
            return (value, start);
        }
        let mut h = self.hasher.build_hasher();
        h.write(metric.as_bytes());
        for a in attrs {
            h.write(a);
        }
        let id = h.finish();
        let before = self.previous.insert(id, (value, self.generation));
        match (before, self.last_time) {
            // A value below the last one is a restarted series: all of it
            // is new.
            (Some((last, _)), Some(since)) if last <= value => (value - last, since),
            _ => (value, start),
        }
    }

    fn push(
        &mut self,
        b: &mut Batcher,
        metric: &str,
        attrs: &[&[u8]],
        (value, start, time): (u64, u64, u64),
    ) {
        let (value, start) = self.point_value(metric, attrs, value, start);
        let size = attrs.iter().map(|a| a.len()).sum::<usize>() + 32;
        wire::number_point(b.points(size), attrs, start, time, value);
    }

    /// What `pick` reads from the attribute lists of `key` (encoding them
    /// now if this is the first export that needs them).
    fn cached<T>(&mut self, key: &SeriesKey, pick: impl FnOnce(&mut SeriesAttributes) -> T) -> T {
        let generation = self.generation;
        if let Some(s) = self.series.get_mut(key) {
            s.seen = generation;
            return pick(s);
        }
        let mut s = SeriesAttributes {
            seen: generation,
            ..SeriesAttributes::default()
        };
        let out = pick(&mut s);
        self.series.insert(key.clone(), s);
        out
    }

    fn flows(&mut self, b: &mut Batcher, report: &IntervalReport, time: u64) {
        for d in [&catalogue::FLOW_BYTES, &catalogue::FLOW_PACKETS] {
            let pick = |c: Counters| {
                if d.name == catalogue::FLOW_BYTES.name {
                    c.bytes
                } else {
                    c.packets
                }
            };
            if self.selection.selects(d.name) {
                let mut points = Vec::with_capacity(report.points.len() * 2);
                for p in &report.points {
                    let start = nanos(p.start);
                    if report.spec.direction {
                        points.push((
                            series_attributes(&p.key, Some(Direction::ClientToServer)),
                            pick(p.cumulative.to_server),
                            start,
                        ));
                        points.push((
                            series_attributes(&p.key, Some(Direction::ServerToClient)),
                            pick(p.cumulative.to_client),
                            start,
                        ));
                    } else {
                        points.push((
                            series_attributes(&p.key, None),
                            pick(p.cumulative.total()),
                            start,
                        ));
                    }
                }
                self.selected(b, d, points, time);
                continue;
            }
            b.begin_metric(self.counter(d));
            for p in &report.points {
                let start = nanos(p.start);
                if report.spec.direction {
                    let [up, down] = self.cached(&p.key, |s| {
                        s.directed
                            .get_or_insert_with(|| {
                                [Direction::ClientToServer, Direction::ServerToClient].map(|d| {
                                    wire::attributes(
                                        NUMBER_POINT_ATTRIBUTES,
                                        &series_attributes(&p.key, Some(d)),
                                    )
                                    .into()
                                })
                            })
                            .clone()
                    });
                    self.push(
                        b,
                        d.name,
                        &[&up],
                        (pick(p.cumulative.to_server), start, time),
                    );
                    self.push(
                        b,
                        d.name,
                        &[&down],
                        (pick(p.cumulative.to_client), start, time),
                    );
                } else {
                    let attrs = self.plain_attributes(&p.key);
                    self.push(
                        b,
                        d.name,
                        &[&attrs],
                        (pick(p.cumulative.total()), start, time),
                    );
                }
            }
            b.end_metric();
        }
    }

    fn plain_attributes(&mut self, key: &SeriesKey) -> Arc<[u8]> {
        self.cached(key, |s| {
            s.plain
                .get_or_insert_with(|| {
                    wire::attributes(NUMBER_POINT_ATTRIBUTES, &series_attributes(key, None)).into()
                })
                .clone()
        })
    }

    /// The TCP connection counters: one point per series and outcome seen.
    fn tcp_counters(&mut self, b: &mut Batcher, report: &IntervalReport, time: u64) {
        for (d, parts) in health_counters() {
            let name = d.name;
            let keeps = |extra: &Option<(&str, &str)>, v: u64, opened: u64| {
                // A series that never saw this outcome stays absent.
                v > 0 || (extra.is_none() && opened > 0)
            };
            if self.selection.selects(name) {
                let mut points = Vec::new();
                for p in &report.tcp {
                    for (extra, pick) in &parts {
                        let v = pick(&p.cumulative);
                        if keeps(extra, v, p.cumulative.opened) {
                            let mut a = series_attributes(&p.key, None);
                            if let Some((k, value)) = extra {
                                a.push(KeyValue::new(*k, *value));
                            }
                            points.push((a, v, nanos(p.start)));
                        }
                    }
                }
                self.selected(b, d, points, time);
                continue;
            }
            let extras: Vec<Box<[u8]>> = parts
                .iter()
                .map(|(extra, _)| match extra {
                    Some((k, v)) => {
                        wire::attributes(NUMBER_POINT_ATTRIBUTES, &[KeyValue::new(*k, *v)])
                    }
                    None => Box::default(),
                })
                .collect();
            b.begin_metric(self.counter(d));
            for p in &report.tcp {
                let attrs = self.plain_attributes(&p.key);
                for ((extra, pick), extra_attrs) in parts.iter().zip(&extras) {
                    let v = pick(&p.cumulative);
                    if keeps(extra, v, p.cumulative.opened) {
                        self.push(b, name, &[&attrs, extra_attrs], (v, nanos(p.start), time));
                    }
                }
            }
            b.end_metric();
        }
    }

    /// The histograms, and their bounds.
    const HISTOGRAMS: [(&'static Metric, &'static [f64]); 2] = [
        (&catalogue::TCP_RTT, RTT_BOUNDS),
        (&catalogue::TCP_DURATION, DURATION_BOUNDS),
    ];

    /// Adds the RTT and connection-duration samples of `report` to the
    /// histograms of this export.
    fn absorb(&mut self, report: &IntervalReport) {
        let generation = self.generation;
        for (d, bounds) in Self::HISTOGRAMS {
            let is_rtt = d.name == catalogue::TCP_RTT.name;
            for p in &report.tcp {
                let attrs: Arc<[u8]> = if self.selection.selects(d.name) {
                    let kept = self
                        .selection
                        .filter(d.name, &series_attributes(&p.key, None));
                    wire::attributes(HISTOGRAM_POINT_ATTRIBUTES, &kept).into()
                } else {
                    self.cached(&p.key, |s| {
                        s.histogram
                            .get_or_insert_with(|| {
                                wire::attributes(
                                    HISTOGRAM_POINT_ATTRIBUTES,
                                    &series_attributes(&p.key, None),
                                )
                                .into()
                            })
                            .clone()
                    })
                };
                let samples = if is_rtt { &p.rtt } else { &p.durations };
                let states = if is_rtt {
                    &mut self.rtt
                } else {
                    &mut self.durations
                };
                let state = match states.get_mut(&attrs) {
                    Some(s) => s,
                    None if samples.is_empty() => continue,
                    None => states
                        .entry(attrs)
                        .or_insert_with(|| HistogramState::new(bounds.len() + 1, nanos(p.start))),
                };
                if state.seen != generation {
                    state.seen = generation;
                    state.interval.iter_mut().for_each(|c| *c = 0);
                    state.interval_sum = 0.0;
                }
                state.add(bounds, samples);
            }
        }
        let d = &catalogue::DNS_LATENCY;
        for p in &report.dns {
            let kept = self.selection.filter(d.name, &dns_attributes(&p.key));
            let attrs: Arc<[u8]> = wire::attributes(HISTOGRAM_POINT_ATTRIBUTES, &kept).into();
            let state = match self.dns_latency.get_mut(&attrs) {
                Some(s) => s,
                None if p.latency.is_empty() => continue,
                None => self.dns_latency.entry(attrs).or_insert_with(|| {
                    HistogramState::new(DNS_LATENCY_BOUNDS.len() + 1, nanos(p.start))
                }),
            };
            if state.seen != generation {
                state.seen = generation;
                state.interval.iter_mut().for_each(|c| *c = 0);
                state.interval_sum = 0.0;
            }
            state.add(DNS_LATENCY_BOUNDS, &p.latency);
        }
    }

    /// RTT and connection-duration histograms: this export's samples and,
    /// when cumulative, everything before.
    fn histograms(&mut self, b: &mut Batcher, time: u64) {
        let generation = self.generation;
        let dns = (&catalogue::DNS_LATENCY, DNS_LATENCY_BOUNDS);
        for (d, bounds) in Self::HISTOGRAMS.into_iter().chain([dns]) {
            let states = if d.name == catalogue::TCP_RTT.name {
                &mut self.rtt
            } else if d.name == catalogue::DNS_LATENCY.name {
                &mut self.dns_latency
            } else {
                &mut self.durations
            };
            states.retain(|_, s| s.seen == generation);
            b.begin_metric(families::header(d, self.temporality));
            for (attrs, s) in states.iter() {
                let (counts, sum, start) = match self.temporality {
                    Temporality::Cumulative => (&s.total, s.total_sum, s.start),
                    Temporality::Delta => (
                        &s.interval,
                        s.interval_sum,
                        self.last_time.unwrap_or(s.start),
                    ),
                };
                if counts.iter().all(|c| *c == 0) {
                    continue;
                }
                let size = attrs.len() + 64 + 16 * counts.len();
                wire::histogram_point(b.points(size), attrs, (start, time), counts, sum, bounds);
            }
            b.end_metric();
        }
    }

    /// A counter whose points are built as attribute lists: the selection
    /// (if any) is applied and points that become equal are summed.
    fn selected(
        &mut self,
        b: &mut Batcher,
        d: &Metric,
        points: Vec<(Vec<KeyValue>, u64, u64)>,
        time: u64,
    ) {
        let mut merged: Vec<(Box<[u8]>, u64, u64)> = Vec::with_capacity(points.len());
        let mut index: HashMap<Box<[u8]>, usize, RandomState> = HashMap::default();
        for (attrs, value, start) in points {
            let kept = self.selection.filter(d.name, &attrs);
            let encoded = wire::attributes(NUMBER_POINT_ATTRIBUTES, &kept);
            match index.get(&encoded) {
                Some(&i) => {
                    merged[i].1 += value;
                    merged[i].2 = merged[i].2.min(start);
                }
                None => {
                    index.insert(encoded.clone(), merged.len());
                    merged.push((encoded, value, start));
                }
            }
        }
        b.begin_metric(self.counter(d));
        for (attrs, value, start) in merged {
            self.push(b, d.name, &[&attrs], (value, start, time));
        }
        b.end_metric();
    }

    /// flowtel's own metrics, as the registry holds them now.
    fn self_metrics(&mut self, b: &mut Batcher, time: u64) {
        for (m, points) in self.telemetry.read() {
            let gauge = m.instrument == Instrument::Gauge;
            b.begin_metric(families::header(m, self.temporality));
            for (labels, value) in points {
                let attrs: Vec<KeyValue> =
                    labels.iter().map(|(k, v)| KeyValue::new(*k, *v)).collect();
                let encoded = wire::attributes(NUMBER_POINT_ATTRIBUTES, &attrs);
                if gauge {
                    wire::number_point(b.points(encoded.len() + 32), &[&encoded], 0, time, value);
                } else {
                    let start = self.started;
                    self.push(b, m.name, &[&encoded], (value, start, time));
                }
            }
            b.end_metric();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::resource::ResourceConfig;
    use crate::export::ExportConfig;
    use crate::flow::{
        Endpoint, FlowId, FlowStage, FlowUpdate, FlowsConfig, Nat, SourceEvent, SourceKind,
        Transport,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    use prost::Message;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    fn flow(port: u16) -> FlowId {
        FlowId {
            transport: Transport::Tcp,
            client: Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), port),
            server: Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 443),
            zone: 0,
        }
    }

    /// `flowtel.flow.bytes` points of the requests: (direction, value, start).
    fn bytes(requests: &[Vec<u8>]) -> Vec<(String, i64, u64)> {
        let mut out = Vec::new();
        for r in requests {
            let r = ExportMetricsServiceRequest::decode(r.as_slice()).expect("decodes");
            for m in &r.resource_metrics[0].scope_metrics[0].metrics {
                let (true, Some(metric::Data::Sum(s))) =
                    (m.name == catalogue::FLOW_BYTES.name, &m.data)
                else {
                    continue;
                };
                for p in &s.data_points {
                    let direction = p
                        .attributes
                        .iter()
                        .find(|kv| kv.key == "flowtel.flow.direction")
                        .and_then(|kv| kv.value.clone())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    let Some(number_data_point::Value::AsInt(v)) = p.value else {
                        panic!("not an integer point");
                    };
                    out.push((direction, v, p.start_time_unix_nano));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn delta_points_are_the_change_since_the_last_export() {
        let mut export = ExportConfig::default();
        export.otlp.temporality = ConfigTemporality::Delta;
        let telemetry = Telemetry::default();
        let ctx = ExportContext {
            export: &export,
            resource: &ResourceConfig::default(),
            interval: Duration::from_secs(10),
            max_series: 100,
            telemetry: &telemetry,
        };
        let mut encoder = MetricsEncoder::new(&ctx, telemetry.clone());
        let mut stage = FlowStage::new(&FlowsConfig::default(), 0, None, &telemetry);
        let mut send = |up: u64, down: u64| {
            stage.apply(SourceEvent::Flow(FlowUpdate {
                id: flow(40_000),
                generation: 1,
                nat: Nat::default(),
                to_server: Counters::new(up, 1),
                to_client: Counters::new(down, 1),
                ended: false,
                source: SourceKind::Ebpf,
            }));
            Arc::new(stage.finish())
        };
        let first = send(100, 1_000);
        let first_points = bytes(&encoder.encode(std::slice::from_ref(&first)));
        assert_eq!(
            first_points.iter().map(|p| p.1).collect::<Vec<_>>(),
            [100, 1_000]
        );
        let second = send(105, 1_050);
        let second_points = bytes(&encoder.encode(std::slice::from_ref(&second)));
        assert_eq!(
            second_points.iter().map(|p| p.1).collect::<Vec<_>>(),
            [5, 50],
            "delta, not cumulative"
        );
        assert!(
            second_points
                .iter()
                .all(|p| p.2 == nanos(first.end) && p.2 > first_points[0].2),
            "delta points start at the previous export: {second_points:?}"
        );
    }
}
