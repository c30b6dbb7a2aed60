//! The OpenTelemetry SDK meter behind the Prometheus endpoint: observable
//! instruments read the latest finished interval when a scrape collects
//! them, and the RTT and duration histograms aggregate the samples. OTLP
//! does not go through here ([`crate::export::otlp_metrics`] encodes it
//! directly); both read the same report and the same catalogue entries.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{Instrument, SdkMeterProvider, Stream};

use crate::export::attributes::{
    dns_attributes, dns_name_attributes, drop_attributes, series_attributes, zone_attributes, Direction,
};
use crate::export::families::SCOPE;
use crate::export::instruments::{
    health_counters, DNS_LATENCY_BOUNDS, DURATION_BOUNDS, RTT_BOUNDS,
};
use crate::export::resource;
use crate::export::selection::Selection;
use crate::export::ExportContext;
use crate::flow::model::Counters;
use crate::flow::report::IntervalReport;
use crate::telemetry::catalogue::{
    Metric as Describe, DNS_LATENCY, DNS_NAME_REQUESTS, DNS_REQUESTS, FLOW_BYTES, FLOW_PACKETS, PACKET_DROPS,
    TCP_DURATION, TCP_RTT, ZONE_BYTES,
};

/// Feeds a pull reader with flowtel's metrics.
pub struct SdkMeter {
    provider: SdkMeterProvider,
    latest: Latest,
    rtt: Histogram<f64>,
    duration: Histogram<f64>,
    dns_latency: Histogram<f64>,
    selection: Selection,
}

impl SdkMeter {
    /// A meter of the context's resource and attribute selection, read by
    /// `reader`.
    pub fn build(ctx: &ExportContext<'_>, reader: impl MetricReader) -> Self {
        // Two points per series with directions, and the overflow series:
        // the SDK's own limit (2000) must not fold the budget again. (The
        // SDK allocates its map for the limit up front.)
        let series_limit = ctx.max_series * 2 + 2;
        let provider = SdkMeterProvider::builder()
            .with_resource(resource::sdk(ctx.resource))
            .with_view(move |i: &Instrument| {
                (i.name().starts_with("flowtel.flow.") || i.name().starts_with("flowtel.tcp."))
                    .then(|| {
                        Stream::builder()
                            .with_cardinality_limit(series_limit)
                            .build()
                            .ok()
                    })
                    .flatten()
            })
            .with_reader(reader)
            .build();
        let latest: Latest = Arc::default();
        // The scope the OTLP requests carry, version included, so that the
        // labels are those a Collector would make of them.
        let meter = provider.meter_with_scope(
            InstrumentationScope::builder(SCOPE)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        register_flow_instruments(&meter, &latest);
        register_health_instruments(&meter, &latest);
        let rtt = meter
            .f64_histogram(TCP_RTT.name)
            .with_unit(TCP_RTT.unit)
            .with_description(TCP_RTT.description)
            .with_boundaries(RTT_BOUNDS.to_vec())
            .build();
        let duration = meter
            .f64_histogram(TCP_DURATION.name)
            .with_unit(TCP_DURATION.unit)
            .with_description(TCP_DURATION.description)
            .with_boundaries(DURATION_BOUNDS.to_vec())
            .build();
        let dns_latency = meter
            .f64_histogram(DNS_LATENCY.name)
            .with_unit(DNS_LATENCY.unit)
            .with_description(DNS_LATENCY.description)
            .with_boundaries(DNS_LATENCY_BOUNDS.to_vec())
            .build();
        Self {
            provider,
            latest,
            rtt,
            duration,
            dns_latency,
            selection: Selection::new(&ctx.export.metrics.attributes),
        }
    }

    /// Makes a finished interval what the next scrape reads.
    pub fn publish(&self, report: &IntervalReport) {
        let prepared = Arc::new(prepare(report, &self.selection));
        if let Ok(mut latest) = self.latest.lock() {
            *latest = prepared;
        }
        for p in &report.dns {
            if p.latency.is_empty() {
                continue;
            }
            let attributes = self
                .selection
                .filter(DNS_LATENCY.name, &dns_attributes(&p.key));
            for v in &p.latency {
                self.dns_latency.record(*v, &attributes);
            }
        }
        for p in &report.tcp {
            if p.rtt.is_empty() && p.durations.is_empty() {
                continue;
            }
            let attributes = series_attributes(&p.key, None);
            let rtt_attributes = self.selection.filter(TCP_RTT.name, &attributes);
            for v in &p.rtt {
                self.rtt.record(*v, &rtt_attributes);
            }
            let duration_attributes = self.selection.filter(TCP_DURATION.name, &attributes);
            for v in &p.durations {
                self.duration.record(*v, &duration_attributes);
            }
        }
    }

    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!("Prometheus meter shutdown: {e}");
        }
    }
}

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

fn prepare(report: &IntervalReport, selection: &Selection) -> Prepared {
    let mut counters = HashMap::new();
    let (bytes, packets) = prepare_flows(report);
    counters.insert(FLOW_BYTES.name, bytes);
    counters.insert(FLOW_PACKETS.name, packets);
    let tcp: Vec<_> = report
        .tcp
        .iter()
        .map(|p| (series_attributes(&p.key, None), p.cumulative))
        .collect();
    for (metric, parts) in health_counters() {
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
        counters.insert(metric.name, points);
    }
    let drops = report
        .drops
        .iter()
        .map(|p| (drop_attributes(&p.key), p.counters.packets))
        .collect();
    counters.insert(PACKET_DROPS.name, drops);
    let dns = report
        .dns
        .iter()
        .map(|p| (dns_attributes(&p.key), p.requests))
        .collect();
    counters.insert(DNS_REQUESTS.name, dns);
    let names = report
        .dns_names
        .iter()
        .map(|p| (dns_name_attributes(p), p.requests))
        .collect();
    counters.insert(DNS_NAME_REQUESTS.name, names);
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
    counters.insert(ZONE_BYTES.name, zones);
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
    let mut push = |attributes: Vec<KeyValue>, c: Counters| {
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
    for d in [&FLOW_BYTES, &ZONE_BYTES, &FLOW_PACKETS] {
        register_latest(meter, latest, d);
    }
}

/// An observable counter that reads metric `d` of the latest interval.
fn register_latest(meter: &Meter, latest: &Latest, d: &'static Describe) {
    let l = latest.clone();
    meter
        .u64_observable_counter(d.name)
        .with_unit(d.unit)
        .with_description(d.description)
        .with_callback(move |o| {
            for (attributes, v) in snapshot(&l).points(d.name) {
                o.observe(*v, attributes);
            }
        })
        .build();
}

/// TCP connection counters and drops, read from the latest interval.
fn register_health_instruments(meter: &Meter, latest: &Latest) {
    for (metric, _) in health_counters() {
        register_latest(meter, latest, metric);
    }
    register_latest(meter, latest, &PACKET_DROPS);
    register_latest(meter, latest, &DNS_REQUESTS);
    register_latest(meter, latest, &DNS_NAME_REQUESTS);
}
