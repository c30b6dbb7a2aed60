//! OTLP metrics: flow bytes and packets as monotonic Sums, plus flowtel's own
//! counters, through the OpenTelemetry SDK and its OTLP exporter.
//!
//! The flow table is the source of truth for cumulative values; the SDK
//! reads them through observable counters at each forced flush, so one
//! export follows each finished interval and series that were forgotten stop
//! being exported. The SDK turns them into deltas when delta temporality is
//! configured.
//!
//! The same meter provider feeds the Prometheus endpoint when it is on
//! ([`crate::export::prometheus`]): a second, pull reader that is collected
//! at each scrape, so both see exactly the same instruments.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::MetricExporter;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{
    periodic_reader_with_async_runtime::PeriodicReader, Instrument, SdkMeterProvider, Stream,
    Temporality as SdkTemporality,
};

use crate::config::{Config, Protocol, Temporality};
use crate::enrich::kubernetes::KubeStats;
use crate::export::attributes::{
    drop_attributes, series_attributes, zone_attributes, Direction, SOURCE, TCP_CLOSE_CAUSE,
    TCP_FAILURE,
};
use crate::export::prometheus::PrometheusEndpoint;
use crate::export::resource;
use crate::export::selection::Selection;
use crate::export::transport::SignalTransport;
use crate::flow::aggregate::{IntervalReport, TcpCounters};
use crate::flow::{TcpClose, TcpFailure};
use crate::source::ebpf::EbpfStats;
use crate::source::SourceInfo;
use crate::stats::SelfStats;

/// Data points of one metric: attributes and cumulative value.
type Points = Vec<(Vec<KeyValue>, u64)>;

/// The latest interval in the shape the SDK callbacks read: per counter
/// metric, its points with `export.metrics.attributes` applied.
#[derive(Debug, Default)]
struct Prepared {
    counters: HashMap<&'static str, Points>,
}

impl Prepared {
    fn points(&self, metric: &str) -> &[(Vec<KeyValue>, u64)] {
        self.counters.get(metric).map_or(&[], Vec::as_slice)
    }
}

type Latest = Arc<Mutex<Arc<Prepared>>>;

/// Histogram bucket bounds for RTTs, in seconds: 50 µs (same host) to 5 s.
const RTT_BOUNDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
/// Connection durations, in seconds: 1 ms to 1 h.
const DURATION_BOUNDS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Ships each finished interval to an OTLP collector, and publishes it to
/// the Prometheus endpoint when that is on.
pub struct OtlpMetricsExporter {
    provider: SdkMeterProvider,
    latest: Latest,
    rtt: Histogram<f64>,
    duration: Histogram<f64>,
    selection: Selection,
}

impl OtlpMetricsExporter {
    /// Builds the exporter, with an OTLP reader when `transport` is set and a
    /// Prometheus endpoint when `export.prometheus.listen` is; must run inside
    /// the tokio runtime (tonic and the listener need it).
    pub async fn build(
        cfg: &Config,
        transport: Option<&SignalTransport>,
        stats: Arc<SelfStats>,
        ebpf_stats: Option<Arc<EbpfStats>>,
        kube_stats: Option<Arc<KubeStats>>,
        source: SourceInfo,
    ) -> anyhow::Result<Self> {
        let series_limit = cfg.flows.max_series * 2 + 2;
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource::build(&cfg.resource))
            .with_view(move |i: &Instrument| {
                (i.name().starts_with("flowtel.flow.") || i.name().starts_with("flowtel.tcp."))
                    .then(|| {
                        Stream::builder()
                            .with_cardinality_limit(series_limit)
                            .build()
                            .ok()
                    })
                    .flatten()
            });
        if let Some(transport) = transport {
            builder = builder.with_reader(otlp_reader(cfg, transport, &stats)?);
        }
        let prometheus = match cfg.export.prometheus.listen.as_str() {
            "" => None,
            listen => {
                let addr = listen
                    .parse()
                    .with_context(|| format!("export.prometheus.listen {listen:?}"))?;
                Some(PrometheusEndpoint::bind(addr).await?)
            }
        };
        if let Some(p) = &prometheus {
            builder = builder.with_reader(p.reader());
        }
        let provider = builder.build();
        let latest: Latest = Arc::default();
        let meter = provider.meter("flowtel");
        register_flow_instruments(&meter, &latest);
        register_health_instruments(&meter, &latest);
        if let Some(k) = kube_stats {
            register_kube_instruments(&meter, k, stats.clone());
        }
        register_self_instruments(&meter, stats);
        meter
            .u64_observable_gauge("flowtel.source.active")
            .with_unit("1")
            .with_description("1 for the kernel source in use, with its name and mode")
            .with_callback(move |o| {
                o.observe(
                    1,
                    &[
                        KeyValue::new(SOURCE, source.name),
                        KeyValue::new("flowtel.source.mode", source.mode),
                    ],
                )
            })
            .build();
        if let Some(e) = ebpf_stats {
            register_ebpf_instruments(&meter, e);
        }
        let rtt = meter
            .f64_histogram("flowtel.tcp.rtt")
            .with_unit("s")
            .with_description(
                "Smoothed round-trip time of TCP connections: one sample per connection and \
                 interval in which it received data, and one at its close",
            )
            .with_boundaries(RTT_BOUNDS.to_vec())
            .build();
        let duration = meter
            .f64_histogram("flowtel.tcp.connection.duration")
            .with_unit("s")
            .with_description("How long TCP connections lasted, from SYN to close")
            .with_boundaries(DURATION_BOUNDS.to_vec())
            .build();
        if let Some(p) = prometheus {
            let local = p.serve()?;
            tracing::info!("Prometheus metrics on http://{local}/metrics");
        }
        Ok(Self {
            provider,
            latest,
            rtt,
            duration,
            selection: Selection::new(&cfg.export.metrics.attributes),
        })
    }

    /// Publishes a finished interval and exports it now.
    pub async fn export(&self, report: &IntervalReport) {
        let prepared = Arc::new(prepare(report, &self.selection));
        if let Ok(mut latest) = self.latest.lock() {
            *latest = prepared;
        }
        for p in &report.tcp {
            if p.rtt.is_empty() && p.durations.is_empty() {
                continue;
            }
            let attributes = series_attributes(&p.key, None);
            let rtt_attributes = self.selection.filter("flowtel.tcp.rtt", &attributes);
            for v in &p.rtt {
                self.rtt.record(*v, &rtt_attributes);
            }
            let duration_attributes = self
                .selection
                .filter("flowtel.tcp.connection.duration", &attributes);
            for v in &p.durations {
                self.duration.record(*v, &duration_attributes);
            }
        }
        let provider = self.provider.clone();
        // force_flush blocks until the export (with its retries) is done.
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        if let Ok(Err(e)) = flushed {
            tracing::debug!("metrics flush: {e}");
        }
    }

    /// Exports once more and releases the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!("metrics exporter shutdown: {e}");
        }
    }
}

/// The periodic reader that pushes to the collector. Exports are driven by
/// [`OtlpMetricsExporter::export`] after each interval; its timer is a
/// backstop only.
fn otlp_reader(
    cfg: &Config,
    transport: &SignalTransport,
    stats: &Arc<SelfStats>,
) -> anyhow::Result<PeriodicReader<CountingExporter>> {
    let temporality = match cfg.export.otlp.temporality {
        Temporality::Cumulative => SdkTemporality::Cumulative,
        Temporality::Delta => SdkTemporality::Delta,
    };
    let exporter = match transport.protocol {
        Protocol::Grpc => transport
            .apply_tonic(
                MetricExporter::builder()
                    .with_tonic()
                    .with_temporality(temporality),
            )?
            .build(),
        Protocol::HttpProtobuf => transport
            .apply_http(
                MetricExporter::builder()
                    .with_http()
                    .with_temporality(temporality),
            )?
            .build(),
    }
    .with_context(|| format!("building the OTLP metrics exporter for {}", transport.url))?;
    let attempts = cfg.export.otlp.retry.max_attempts;
    let export_budget =
        (transport.timeout + cfg.export.otlp.retry.max_backoff) * attempts + Duration::from_secs(1);
    Ok(PeriodicReader::builder(
        CountingExporter {
            inner: exporter,
            stats: stats.clone(),
            failing: AtomicBool::new(false),
            url: transport.url.clone(),
        },
        opentelemetry_sdk::runtime::Tokio,
    )
    .with_interval(Duration::from_secs(3600))
    .with_timeout(export_budget)
    .build())
}

fn prepare(report: &IntervalReport, selection: &Selection) -> Prepared {
    let mut counters = HashMap::new();
    let (bytes, packets) = prepare_flows(report);
    counters.insert("flowtel.flow.bytes", bytes);
    counters.insert("flowtel.flow.packets", packets);
    let tcp: Vec<_> = report
        .tcp
        .iter()
        .map(|p| (series_attributes(&p.key, None), p.cumulative))
        .collect();
    for (name, _, _, parts) in health_counters() {
        let mut points = Vec::new();
        for (attrs, c) in &tcp {
            for (extra, pick) in &parts {
                let v = pick(c);
                // A series that never saw this outcome stays absent.
                if v > 0 || (extra.is_none() && c.opened > 0) {
                    let mut a = attrs.clone();
                    if let Some((k, value)) = extra {
                        a.push(KeyValue::new(*k, *value));
                    }
                    points.push((a, v));
                }
            }
        }
        counters.insert(name, points);
    }
    let drops = report
        .drops
        .iter()
        .map(|p| (drop_attributes(&p.key), p.counters.packets))
        .collect();
    counters.insert("flowtel.packet.drops", drops);
    let zones = report
        .zones
        .iter()
        .flat_map(|p| {
            [
                (Direction::ClientToServer, p.counters.to_server.bytes),
                (Direction::ServerToClient, p.counters.to_client.bytes),
            ]
            .map(|(d, bytes)| (zone_attributes(&p.key, d), bytes))
        })
        .collect();
    counters.insert("flowtel.zone.bytes", zones);
    let counters = counters
        .into_iter()
        .map(|(name, points)| (name, selection.apply(name, points)))
        .collect();
    Prepared { counters }
}

/// Bytes and packets of every flow series, per direction when the key has
/// one.
fn prepare_flows(report: &IntervalReport) -> (Points, Points) {
    let mut bytes = Vec::with_capacity(report.points.len() * 2);
    let mut packets = Vec::with_capacity(report.points.len() * 2);
    let mut push = |attributes: Vec<KeyValue>, c: crate::flow::Counters| {
        packets.push((attributes.clone(), c.packets));
        bytes.push((attributes, c.bytes));
    };
    for p in &report.points {
        if report.spec.direction {
            for (direction, c) in [
                (Direction::ClientToServer, p.cumulative.to_server),
                (Direction::ServerToClient, p.cumulative.to_client),
            ] {
                push(series_attributes(&p.key, Some(direction)), c);
            }
        } else {
            push(series_attributes(&p.key, None), p.cumulative.total());
        }
    }
    (bytes, packets)
}

fn snapshot(latest: &Latest) -> Arc<Prepared> {
    latest.lock().map(|l| Arc::clone(&l)).unwrap_or_default()
}

fn register_flow_instruments(meter: &Meter, latest: &Latest) {
    let l = latest.clone();
    meter
        .u64_observable_counter("flowtel.flow.bytes")
        .with_unit("By")
        .with_description("Bytes carried by flows (L3, IP headers included), by direction")
        .with_callback(move |o| {
            for (attributes, v) in snapshot(&l).points("flowtel.flow.bytes") {
                o.observe(*v, attributes);
            }
        })
        .build();
    let l = latest.clone();
    meter
        .u64_observable_counter("flowtel.zone.bytes")
        .with_unit("By")
        .with_description(
            "Bytes between this node's zone and each peer zone, same-zone and cross-zone",
        )
        .with_callback(move |o| {
            for (attributes, v) in snapshot(&l).points("flowtel.zone.bytes") {
                o.observe(*v, attributes);
            }
        })
        .build();
    let l = latest.clone();
    meter
        .u64_observable_counter("flowtel.flow.packets")
        .with_unit("{packet}")
        .with_description("Packets carried by flows, by direction")
        .with_callback(move |o| {
            for (attributes, v) in snapshot(&l).points("flowtel.flow.packets") {
                o.observe(*v, attributes);
            }
        })
        .build();
}

/// Reads one count of a TCP series.
type Pick = fn(&TcpCounters) -> u64;
/// One TCP counter: name, unit, description, and per extra attribute (none,
/// or one key and value) the count it reports.
type HealthCounter = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(Option<(&'static str, &'static str)>, Pick)>,
);

/// The TCP counters, each with the outcomes it splits into.
fn health_counters() -> [HealthCounter; 4] {
    [
        (
            "flowtel.tcp.connections.opened",
            "{connection}",
            "TCP connections that completed the handshake",
            vec![(None, |c| c.opened)],
        ),
        (
            "flowtel.tcp.connections.closed",
            "{connection}",
            "TCP connections that ended, by how (FIN, reset or timeout)",
            vec![
                (Some((TCP_CLOSE_CAUSE, TcpClose::Fin.as_str())), |c| {
                    c.closed_fin
                }),
                (Some((TCP_CLOSE_CAUSE, TcpClose::Reset.as_str())), |c| {
                    c.closed_reset
                }),
                (Some((TCP_CLOSE_CAUSE, TcpClose::Timeout.as_str())), |c| {
                    c.closed_timeout
                }),
            ],
        ),
        (
            "flowtel.tcp.connections.failed",
            "{connection}",
            "TCP connection attempts that never opened, by why (refused or no answer)",
            vec![
                (Some((TCP_FAILURE, TcpFailure::Refused.as_str())), |c| {
                    c.failed_refused
                }),
                (Some((TCP_FAILURE, TcpFailure::NoAnswer.as_str())), |c| {
                    c.failed_no_answer
                }),
            ],
        ),
        (
            "flowtel.tcp.retransmits",
            "{segment}",
            "TCP segments retransmitted, both ends of a connection summed",
            vec![(None, |c| c.retransmits)],
        ),
    ]
}

/// TCP connection counters and drops, read from the latest interval.
fn register_health_instruments(meter: &Meter, latest: &Latest) {
    for (name, unit, description, _) in health_counters() {
        let l = latest.clone();
        meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |o| {
                for (attributes, v) in snapshot(&l).points(name) {
                    o.observe(*v, attributes);
                }
            })
            .build();
    }
    let l = latest.clone();
    meter
        .u64_observable_counter("flowtel.packet.drops")
        .with_unit("{packet}")
        .with_description("Packets the kernel dropped, by its drop reason")
        .with_callback(move |o| {
            for (attributes, v) in snapshot(&l).points("flowtel.packet.drops") {
                o.observe(*v, attributes);
            }
        })
        .build();
}

fn register_self_instruments(meter: &Meter, stats: Arc<SelfStats>) {
    let counters: [AtomicMetric<SelfStats>; 13] = [
        ("flowtel.logs.records.rate_limited", "{record}", "Log records dropped by export.logs.rate_limit", |s| &s.log_records_rate_limited),
        ("flowtel.flows.seen", "{flow}", "Connections seen for the first time", |s| &s.flows_seen),
        ("flowtel.export.successes", "{request}", "OTLP metric export requests that succeeded", |s| &s.exports_ok),
        ("flowtel.logs.records.dropped", "{record}", "Flow records, connection and drop events not kept because an interval already held export.logs.max_records", |s| &s.records_dropped),
        ("flowtel.flows.untracked", "{update}", "Flow updates not tracked because the flow table was full; those flows are counted at their end", |s| &s.flows_untracked),
        ("flowtel.flows.ended_unseen", "{flow}", "Flows that ended without a final event; traffic after their last dump was missed", |s| &s.flows_ended_unseen),
        ("flowtel.series.overflowed", "{flow}", "Flow deltas folded into the overflow series because the series budget was used up", |s| &s.series_overflowed),
        ("flowtel.source.events.lost", "{overrun}", "Kernel event-queue overruns (each lost at least one event)", |s| &s.events_lost),
        ("flowtel.source.decode.errors", "{message}", "Source messages that could not be decoded and were skipped", |s| &s.parse_errors),
        ("flowtel.source.dumps.failed", "{dump}", "Table dumps that failed", |s| &s.dump_errors),
        ("flowtel.source.dumps", "{dump}", "Table dumps completed", |s| &s.dumps),
        ("flowtel.export.failures", "{request}", "OTLP export requests that failed after retries", |s| &s.exports_failed),
        ("flowtel.tcp.samples.dropped", "{sample}", "RTT and duration samples not kept because an interval already held the maximum; counts stay exact", |s| &s.tcp_samples_dropped),
    ];
    observe_atomics(meter, &stats, &counters, false);
    let gauges: [AtomicMetric<SelfStats>; 2] = [
        (
            "flowtel.flows.tracked",
            "{flow}",
            "Connections currently held in the flow table",
            |s| &s.flows_tracked,
        ),
        (
            "flowtel.series.active",
            "{series}",
            "Metric series currently exported",
            |s| &s.series_active,
        ),
    ];
    observe_atomics(meter, &stats, &gauges, true);
    meter
        .u64_observable_gauge("flowtel.source.byte_counters")
        .with_unit("1")
        .with_description(
            "1 when the kernel source reports byte and packet counters, 0 when accounting is off",
        )
        .with_callback(move |o| {
            o.observe(
                u64::from(stats.byte_counters_available.load(Ordering::Relaxed)),
                &[],
            )
        })
        .build();
}

/// A counter read from the Kubernetes cache: name, unit, description, getter.
type KubeCounter = (
    &'static str,
    &'static str,
    &'static str,
    fn(&KubeStats) -> u64,
);

/// The Kubernetes cache's health and how many flow ends it could name.
fn register_kube_instruments(meter: &Meter, kube: Arc<KubeStats>, stats: Arc<SelfStats>) {
    let sums: [KubeCounter; 3] = [
        (
            "flowtel.k8s.watch.errors",
            "{error}",
            "Failed Kubernetes list, watch or connection attempts (each retried)",
            KubeStats::watch_errors,
        ),
        (
            "flowtel.k8s.relists",
            "{list}",
            "Complete re-lists after a 410 Gone, an API server restart or a broken watch",
            KubeStats::relists,
        ),
        (
            "flowtel.k8s.objects.rejected",
            "{object}",
            "Kubernetes objects skipped because a field flowtel needs was missing or malformed",
            KubeStats::objects_rejected,
        ),
    ];
    for (name, unit, description, read) in sums {
        let k = kube.clone();
        meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |o| o.observe(read(&k), &[]))
            .build();
    }
    meter
        .u64_observable_gauge("flowtel.k8s.synced")
        .with_unit("1")
        .with_description("1 once every watched kind has been listed completely, 0 before")
        .with_callback(move |o| o.observe(u64::from(kube.synced()), &[]))
        .build();
    let counters: [AtomicMetric<SelfStats>; 2] = [
        (
            "flowtel.k8s.ends.named",
            "{end}",
            "Flow ends the Kubernetes cache named as a pod, Service or node",
            |s| &s.k8s_ends_named,
        ),
        (
            "flowtel.k8s.ends.unknown",
            "{end}",
            "Flow ends no Kubernetes object claimed, named by their network instead",
            |s| &s.k8s_ends_unknown,
        ),
    ];
    observe_atomics(meter, &stats, &counters, false);
}

fn register_ebpf_instruments(meter: &Meter, stats: Arc<EbpfStats>) {
    let counters: [AtomicMetric<EbpfStats>; 9] = [
        (
            "flowtel.ebpf.overflow.packets",
            "{packet}",
            "Packets that found the kernel flow map full and were not recorded (raise ebpf.max_flows)",
            |s| &s.overflow_packets,
        ),
        (
            "flowtel.ebpf.overflow.bytes",
            "By",
            "Bytes of the packets that found the kernel flow map full",
            |s| &s.overflow_bytes,
        ),
        (
            "flowtel.ebpf.overflow.nomem_packets",
            "{packet}",
            "Part of the overflow caused by the kernel allocator, not by max_flows",
            |s| &s.overflow_nomem_packets,
        ),
        (
            "flowtel.ebpf.attach.failures",
            "{failure}",
            "Interfaces flowtel could not attach to",
            |s| &s.attach_failures,
        ),
        (
            "flowtel.ebpf.flows.expired",
            "{flow}",
            "Idle flows reported ended and removed from the kernel map",
            |s| &s.flows_expired,
        ),
        (
            "flowtel.ebpf.nat.refused",
            "{translation}",
            "NAT translations not kept because ebpf.nat_max_entries were held; those connections are reported once per side",
            |s| &s.nat_refused,
        ),
        (
            "flowtel.ebpf.tcp.events.lost",
            "{event}",
            "TCP open/close/fail events lost because the ring buffer was full",
            |s| &s.health.events_lost,
        ),
        (
            "flowtel.ebpf.tcp.sockets.untracked",
            "{attempt}",
            "Times a TCP socket could not be followed because ebpf.tcp.max_sockets were",
            |s| &s.health.sockets_untracked,
        ),
        (
            "flowtel.ebpf.drops.unrecorded",
            "{packet}",
            "Dropped packets not recorded because ebpf.drops.max_entries pairs were held",
            |s| &s.health.drops_unrecorded,
        ),
    ];
    observe_atomics(meter, &stats, &counters, false);
    let gauges: [AtomicMetric<EbpfStats>; 4] = [
        (
            "flowtel.ebpf.interfaces",
            "{interface}",
            "Interfaces with flowtel's TC programs attached",
            |s| &s.interfaces_attached,
        ),
        (
            "flowtel.ebpf.map.entries",
            "{entry}",
            "Entries in the kernel flow map at the last dump",
            |s| &s.map_entries,
        ),
        (
            "flowtel.ebpf.nat.translations",
            "{translation}",
            "NAT translations held to fold the two tuples of NAT'ed connections",
            |s| &s.nat_translations,
        ),
        (
            "flowtel.ebpf.tcp.sockets",
            "{socket}",
            "TCP sockets followed at the last dump",
            |s| &s.health.sockets_tracked,
        ),
    ];
    observe_atomics(meter, &stats, &gauges, true);
}

/// One self-metric read from an atomic counter: name, unit, description, field.
type AtomicMetric<S> = (
    &'static str,
    &'static str,
    &'static str,
    fn(&S) -> &AtomicU64,
);

/// Registers observable counters (or gauges) that read atomics of `stats`.
fn observe_atomics<S: Send + Sync + 'static>(
    meter: &Meter,
    stats: &Arc<S>,
    metrics: &[AtomicMetric<S>],
    gauge: bool,
) {
    for &(name, unit, description, pick) in metrics {
        let s = stats.clone();
        let read = move |s: &S| pick(s).load(Ordering::Relaxed);
        if gauge {
            meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |o| o.observe(read(&s), &[]))
                .build();
        } else {
            meter
                .u64_observable_counter(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |o| o.observe(read(&s), &[]))
                .build();
        }
    }
}

/// Counts export outcomes and logs a failure streak once, not every interval.
struct CountingExporter {
    inner: MetricExporter,
    stats: Arc<SelfStats>,
    failing: AtomicBool,
    url: String,
}

impl PushMetricExporter for CountingExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        match &result {
            Ok(()) => {
                SelfStats::inc(&self.stats.exports_ok);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.url, "OTLP metrics export recovered");
                }
            }
            Err(e) => {
                SelfStats::inc(&self.stats.exports_failed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        endpoint = %self.url,
                        "OTLP metrics export failed ({e}); flowtel keeps counting and will send cumulative totals when the collector is back"
                    );
                }
            }
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> SdkTemporality {
        self.inner.temporality()
    }
}
