//! OTLP metrics: flow bytes and packets, TCP health and drops as monotonic
//! Sums and Histograms, plus flowtel's own counters, encoded from each
//! finished interval ([`crate::export::otlp_wire`]) and sent with
//! [`OtlpClient`].
//!
//! The flow table is the source of truth for cumulative values. Each
//! series' attributes are encoded once and reused while the series lives;
//! delta temporality is computed here from the previous export. The same
//! report feeds the Prometheus endpoint when it is on
//! ([`crate::export::sdk_meter`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use foldhash::fast::RandomState;
use opentelemetry::KeyValue;

use crate::config::{Config, Temporality as ConfigTemporality};
use crate::enrich::kubernetes::KubeStats;
use crate::export::attributes::{drop_attributes, series_attributes, zone_attributes, Direction};
use crate::export::instruments::{
    health_counters, Describe, DURATION_BOUNDS, FLOW_BYTES, FLOW_PACKETS, PACKET_DROPS, RTT_BOUNDS,
    TCP_DURATION, TCP_RTT, ZONE_BYTES,
};
use crate::export::mesh::{LatestMesh, MeshSnapshot};
use crate::export::otlp_wire::{
    self, Batcher, Envelope, Kind, MetricHeader, Temporality, HISTOGRAM_POINT_ATTRIBUTES,
    NUMBER_POINT_ATTRIBUTES,
};
use crate::export::prometheus::PrometheusEndpoint;
use crate::export::resource;
use crate::export::sdk_meter::SdkMeter;
use crate::export::selection::Selection;
use crate::export::self_metrics::{self, SelfMetric};
use crate::export::transport::{OtlpClient, Signal, SignalTransport};
use crate::flow::aggregate::{IntervalReport, SeriesKey};
use crate::source::ebpf::EbpfStats;
use crate::source::SourceInfo;
use crate::stats::SelfStats;

/// Ships each finished interval to an OTLP collector, and publishes it to
/// the Prometheus endpoint when that is on.
pub struct OtlpMetricsExporter {
    otlp: Option<(MetricsEncoder, OtlpClient)>,
    /// The SDK meter the endpoint collects, and where the mesh sources'
    /// snapshot goes for it.
    prometheus: Option<(SdkMeter, LatestMesh)>,
}

impl OtlpMetricsExporter {
    /// Builds the exporter, with an OTLP client when `transport` is set and
    /// a Prometheus endpoint when `export.prometheus.listen` is; must run
    /// inside the tokio runtime (tonic and the listener need it).
    pub async fn build(
        cfg: &Config,
        transport: Option<&SignalTransport>,
        stats: Arc<SelfStats>,
        ebpf_stats: Option<Arc<EbpfStats>>,
        kube_stats: Option<Arc<KubeStats>>,
        source: SourceInfo,
    ) -> anyhow::Result<Self> {
        let describe = || self_metrics::all(&stats, ebpf_stats.clone(), kube_stats.clone(), source);
        let prometheus = match cfg.export.prometheus.listen.as_str() {
            "" => None,
            listen => {
                let addr = listen
                    .parse()
                    .with_context(|| format!("export.prometheus.listen {listen:?}"))?;
                let endpoint = PrometheusEndpoint::bind(addr).await?;
                let meter = SdkMeter::build(cfg, endpoint.reader(), describe());
                let mesh = endpoint.mesh();
                let local = endpoint.serve()?;
                tracing::info!("Prometheus metrics on http://{local}/metrics");
                Some((meter, mesh))
            }
        };
        let otlp = match transport {
            Some(t) => Some((
                MetricsEncoder::new(cfg, describe()),
                OtlpClient::new(t, Signal::Metrics, stats.clone())?,
            )),
            None => None,
        };
        Ok(Self { otlp, prometheus })
    }

    /// Publishes a finished interval and exports it now, in as many
    /// requests as `export.otlp.max_request_bytes` needs, sent together.
    pub async fn export(&mut self, report: &IntervalReport) {
        if let Some((p, _)) = &self.prometheus {
            p.publish(report);
        }
        if let Some((encoder, client)) = &mut self.otlp {
            client.send_all(encoder.encode(report)).await;
        }
    }

    /// Makes the mesh sources' snapshot what the Prometheus endpoint serves
    /// from now on; their OTLP export is [`crate::export::mesh::MeshExporter`].
    pub fn publish_mesh(&self, snapshot: Arc<MeshSnapshot>) {
        if let Some((_, mesh)) = &self.prometheus {
            mesh.publish(snapshot);
        }
    }

    /// Releases the exporter; the last interval was exported by
    /// [`Self::export`].
    pub async fn shutdown(self) {
        if let Some((p, _)) = self.prometheus {
            p.shutdown();
        }
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
    self_metrics: Vec<SelfMetric>,
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
    generation: u64,
    hasher: RandomState,
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl MetricsEncoder {
    pub fn new(cfg: &Config, self_metrics: Vec<SelfMetric>) -> Self {
        Self {
            envelope: Envelope::new(
                &resource::attributes(&cfg.resource),
                "flowtel",
                env!("CARGO_PKG_VERSION"),
            ),
            limit: cfg.export.otlp.max_request_bytes,
            temporality: match cfg.export.otlp.temporality {
                ConfigTemporality::Cumulative => Temporality::Cumulative,
                ConfigTemporality::Delta => Temporality::Delta,
            },
            selection: Selection::new(&cfg.export.metrics.attributes),
            self_metrics,
            started: nanos(SystemTime::now()),
            series: HashMap::default(),
            previous: HashMap::default(),
            last_time: None,
            rtt: HashMap::default(),
            durations: HashMap::default(),
            generation: 0,
            hasher: RandomState::default(),
        }
    }

    /// The requests that carry `report`, each below the size limit.
    pub fn encode(&mut self, report: &IntervalReport) -> Vec<Vec<u8>> {
        self.generation += 1;
        let time = nanos(report.end);
        let mut b = Batcher::new(&self.envelope, self.limit);
        self.flows(&mut b, report, time);
        self.tcp_counters(&mut b, report, time);
        self.histograms(&mut b, report, time);
        let drops = report
            .drops
            .iter()
            .map(|p| (drop_attributes(&p.key), p.counters.packets, nanos(p.start)))
            .collect();
        self.selected(&mut b, PACKET_DROPS, drops, time);
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
        self.selected(&mut b, ZONE_BYTES, zones, time);
        self.self_metrics(&mut b, time);
        let generation = self.generation;
        self.series.retain(|_, s| s.seen == generation);
        self.previous.retain(|_, (_, seen)| *seen == generation);
        self.last_time = Some(time);
        b.finish()
    }

    fn counter(&self, d: Describe) -> MetricHeader {
        MetricHeader {
            name: d.name,
            unit: d.unit,
            description: d.description,
            kind: Kind::Counter(self.temporality),
        }
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
        otlp_wire::number_point(b.points(size), attrs, start, time, value);
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
        for d in [FLOW_BYTES, FLOW_PACKETS] {
            let pick = |c: crate::flow::Counters| {
                if d.name == FLOW_BYTES.name {
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
                                    otlp_wire::attributes(
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
                    otlp_wire::attributes(NUMBER_POINT_ATTRIBUTES, &series_attributes(key, None))
                        .into()
                })
                .clone()
        })
    }

    /// The TCP connection counters: one point per series and outcome seen.
    fn tcp_counters(&mut self, b: &mut Batcher, report: &IntervalReport, time: u64) {
        for (name, unit, description, parts) in health_counters() {
            let d = Describe {
                name,
                unit,
                description,
            };
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
                        otlp_wire::attributes(NUMBER_POINT_ATTRIBUTES, &[KeyValue::new(*k, *v)])
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

    /// RTT and connection-duration histograms, from this interval's
    /// samples and, when cumulative, everything before.
    fn histograms(&mut self, b: &mut Batcher, report: &IntervalReport, time: u64) {
        let generation = self.generation;
        for (d, bounds) in [(TCP_RTT, RTT_BOUNDS), (TCP_DURATION, DURATION_BOUNDS)] {
            let is_rtt = d.name == TCP_RTT.name;
            for p in &report.tcp {
                let attrs: Arc<[u8]> = if self.selection.selects(d.name) {
                    let kept = self
                        .selection
                        .filter(d.name, &series_attributes(&p.key, None));
                    otlp_wire::attributes(HISTOGRAM_POINT_ATTRIBUTES, &kept).into()
                } else {
                    self.cached(&p.key, |s| {
                        s.histogram
                            .get_or_insert_with(|| {
                                otlp_wire::attributes(
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
            let states = if is_rtt {
                &mut self.rtt
            } else {
                &mut self.durations
            };
            states.retain(|_, s| s.seen == generation);
            b.begin_metric(MetricHeader {
                name: d.name,
                unit: d.unit,
                description: d.description,
                kind: Kind::Histogram(self.temporality),
            });
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
                otlp_wire::histogram_point(
                    b.points(size),
                    attrs,
                    (start, time),
                    counts,
                    sum,
                    bounds,
                );
            }
            b.end_metric();
        }
    }

    /// A counter whose points are built as attribute lists: the selection
    /// (if any) is applied and points that become equal are summed.
    fn selected(
        &mut self,
        b: &mut Batcher,
        d: Describe,
        points: Vec<(Vec<KeyValue>, u64, u64)>,
        time: u64,
    ) {
        let mut merged: Vec<(Box<[u8]>, u64, u64)> = Vec::with_capacity(points.len());
        let mut index: HashMap<Box<[u8]>, usize, RandomState> = HashMap::default();
        for (attrs, value, start) in points {
            let kept = self.selection.filter(d.name, &attrs);
            let encoded = otlp_wire::attributes(NUMBER_POINT_ATTRIBUTES, &kept);
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

    fn self_metrics(&mut self, b: &mut Batcher, time: u64) {
        let metrics = std::mem::take(&mut self.self_metrics);
        for m in &metrics {
            b.begin_metric(MetricHeader {
                name: m.name,
                unit: m.unit,
                description: m.description,
                kind: if m.gauge {
                    Kind::Gauge
                } else {
                    Kind::Counter(self.temporality)
                },
            });
            for (attrs, value) in m.read() {
                let encoded = otlp_wire::attributes(NUMBER_POINT_ATTRIBUTES, &attrs);
                if m.gauge {
                    otlp_wire::number_point(
                        b.points(encoded.len() + 32),
                        &[&encoded],
                        0,
                        time,
                        value,
                    );
                } else {
                    self.push(b, m.name, &[&encoded], (value, self.started, time));
                }
            }
            b.end_metric();
        }
        self.self_metrics = metrics;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::aggregate::{Aggregator, DirectionalCounters, KeySpec};
    use crate::flow::{Counters, Endpoint, FlowId, Nat, SourceKind, Transport};
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
                let (true, Some(metric::Data::Sum(s))) = (m.name == FLOW_BYTES.name, &m.data)
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
        let mut cfg = Config::default();
        cfg.export.otlp.temporality = ConfigTemporality::Delta;
        let stats = Arc::new(SelfStats::default());
        let mut encoder = MetricsEncoder::new(&cfg, Vec::new());
        let spec = KeySpec::from_fields(&cfg.flows.key);
        let mut agg = Aggregator::new(spec, 100, Duration::from_secs(3600), stats);
        let send = |agg: &mut Aggregator, up: u64, down: u64| {
            agg.record(
                &flow(40_000),
                &Nat::default(),
                SourceKind::Ebpf,
                DirectionalCounters {
                    to_server: Counters::new(up, 1),
                    to_client: Counters::new(down, 1),
                },
                &mut None,
            );
        };
        send(&mut agg, 100, 1_000);
        let first = agg.finish_interval();
        let first_points = bytes(&encoder.encode(&first));
        assert_eq!(
            first_points.iter().map(|p| p.1).collect::<Vec<_>>(),
            [100, 1_000]
        );
        send(&mut agg, 5, 50);
        let second = agg.finish_interval();
        let second_points = bytes(&encoder.encode(&second));
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
