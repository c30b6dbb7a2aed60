//! OTLP metrics: flow bytes and packets as monotonic Sums, plus flowtel's own
//! counters, through the OpenTelemetry SDK and its OTLP exporter.
//!
//! The flow table is the source of truth for cumulative values; the SDK
//! reads them through observable counters at each forced flush, so one
//! export follows each finished interval and series that were forgotten stop
//! being exported. The SDK turns them into deltas when delta temporality is
//! configured.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use opentelemetry::metrics::{Meter, MeterProvider as _};
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
use crate::export::attributes::{series_attributes, Direction};
use crate::export::resource;
use crate::export::transport::SignalTransport;
use crate::flow::aggregate::IntervalReport;
use crate::source::ebpf::EbpfStats;
use crate::stats::SelfStats;

/// One data point ready for the SDK callback.
#[derive(Debug, Clone)]
struct PreparedPoint {
    attributes: Vec<KeyValue>,
    bytes: u64,
    packets: u64,
}

/// Ships each finished interval to an OTLP collector.
pub struct OtlpMetricsExporter {
    provider: SdkMeterProvider,
    latest: Arc<Mutex<Arc<Vec<PreparedPoint>>>>,
}

impl OtlpMetricsExporter {
    /// Builds the exporter; must run inside the tokio runtime (tonic needs it).
    pub fn build(
        cfg: &Config,
        transport: &SignalTransport,
        stats: Arc<SelfStats>,
        ebpf_stats: Option<Arc<EbpfStats>>,
    ) -> anyhow::Result<Self> {
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
        let export_budget = (transport.timeout + cfg.export.otlp.retry.max_backoff) * attempts
            + Duration::from_secs(1);
        let reader = PeriodicReader::builder(
            CountingExporter {
                inner: exporter,
                stats: stats.clone(),
                failing: AtomicBool::new(false),
                url: transport.url.clone(),
            },
            opentelemetry_sdk::runtime::Tokio,
        )
        // Exports are driven by `export` after each interval; the timer is a
        // backstop only.
        .with_interval(Duration::from_secs(3600))
        .with_timeout(export_budget)
        .build();
        let series_limit = cfg.flows.max_series * 2 + 2;
        let provider = SdkMeterProvider::builder()
            .with_resource(resource::build(&cfg.resource))
            .with_reader(reader)
            .with_view(move |i: &Instrument| {
                i.name()
                    .starts_with("flowtel.flow.")
                    .then(|| {
                        Stream::builder()
                            .with_cardinality_limit(series_limit)
                            .build()
                            .ok()
                    })
                    .flatten()
            })
            .build();
        let latest: Arc<Mutex<Arc<Vec<PreparedPoint>>>> = Arc::default();
        let meter = provider.meter("flowtel");
        register_flow_instruments(&meter, &latest);
        register_self_instruments(&meter, stats);
        if let Some(e) = ebpf_stats {
            register_ebpf_instruments(&meter, e);
        }
        Ok(Self { provider, latest })
    }

    /// Publishes a finished interval and exports it now.
    pub async fn export(&self, report: &IntervalReport) {
        let prepared = Arc::new(prepare(report));
        if let Ok(mut latest) = self.latest.lock() {
            *latest = prepared;
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

fn prepare(report: &IntervalReport) -> Vec<PreparedPoint> {
    let mut out = Vec::with_capacity(report.points.len() * 2);
    for p in &report.points {
        if report.spec.direction {
            for (direction, c) in [
                (Direction::ClientToServer, p.cumulative.to_server),
                (Direction::ServerToClient, p.cumulative.to_client),
            ] {
                out.push(PreparedPoint {
                    attributes: series_attributes(&p.key, Some(direction)),
                    bytes: c.bytes,
                    packets: c.packets,
                });
            }
        } else {
            let c = p.cumulative.total();
            out.push(PreparedPoint {
                attributes: series_attributes(&p.key, None),
                bytes: c.bytes,
                packets: c.packets,
            });
        }
    }
    out
}

fn register_flow_instruments(meter: &Meter, latest: &Arc<Mutex<Arc<Vec<PreparedPoint>>>>) {
    let snapshot = |latest: &Arc<Mutex<Arc<Vec<PreparedPoint>>>>| {
        latest.lock().map(|l| Arc::clone(&l)).unwrap_or_default()
    };
    let l = latest.clone();
    meter
        .u64_observable_counter("flowtel.flow.bytes")
        .with_unit("By")
        .with_description("Bytes carried by flows (L3, IP headers included), by direction")
        .with_callback(move |o| {
            for p in snapshot(&l).iter() {
                o.observe(p.bytes, &p.attributes);
            }
        })
        .build();
    let l = latest.clone();
    meter
        .u64_observable_counter("flowtel.flow.packets")
        .with_unit("{packet}")
        .with_description("Packets carried by flows, by direction")
        .with_callback(move |o| {
            for p in snapshot(&l).iter() {
                o.observe(p.packets, &p.attributes);
            }
        })
        .build();
}

fn register_self_instruments(meter: &Meter, stats: Arc<SelfStats>) {
    let counters: [AtomicMetric<SelfStats>; 8] = [
        ("flowtel.flows.untracked", "{update}", "Flow updates not tracked because the flow table was full; those flows are counted at their end", |s| &s.flows_untracked),
        ("flowtel.flows.ended_unseen", "{flow}", "Flows that ended without a final event; traffic after their last dump was missed", |s| &s.flows_ended_unseen),
        ("flowtel.series.overflowed", "{flow}", "Flow deltas folded into the overflow series because the series budget was used up", |s| &s.series_overflowed),
        ("flowtel.source.events.lost", "{overrun}", "Kernel event-queue overruns (each lost at least one event)", |s| &s.events_lost),
        ("flowtel.source.decode.errors", "{message}", "Source messages that could not be decoded and were skipped", |s| &s.parse_errors),
        ("flowtel.source.dumps.failed", "{dump}", "Table dumps that failed", |s| &s.dump_errors),
        ("flowtel.source.dumps", "{dump}", "Table dumps completed", |s| &s.dumps),
        ("flowtel.export.failures", "{request}", "OTLP export requests that failed after retries", |s| &s.exports_failed),
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

fn register_ebpf_instruments(meter: &Meter, stats: Arc<EbpfStats>) {
    let counters: [AtomicMetric<EbpfStats>; 5] = [
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
    ];
    observe_atomics(meter, &stats, &counters, false);
    let gauges: [AtomicMetric<EbpfStats>; 2] = [
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
