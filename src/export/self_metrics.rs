//! flowtel's own metrics, described once: the OTLP encoder and the
//! Prometheus endpoint both read these descriptors, so the two can never
//! disagree on a name, unit or description.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry::KeyValue;

use crate::enrich::kubernetes::KubeStats;
use crate::export::attributes::SOURCE;
use crate::source::ebpf::EbpfStats;
use crate::source::SourceInfo;
use crate::stats::SelfStats;

/// Reads the current points of one metric.
type Read = Box<dyn Fn() -> Vec<(Vec<KeyValue>, u64)> + Send + Sync>;

/// One self-metric: a monotonic counter or a gauge, read when exported.
pub struct SelfMetric {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub gauge: bool,
    read: Read,
}

impl SelfMetric {
    /// Its points now: attributes and value.
    pub fn read(&self) -> Vec<(Vec<KeyValue>, u64)> {
        (self.read)()
    }
}

/// One self-metric read from an atomic counter: name, unit, description, field.
type AtomicMetric<S> = (
    &'static str,
    &'static str,
    &'static str,
    fn(&S) -> &AtomicU64,
);

fn atomics<S: Send + Sync + 'static>(
    out: &mut Vec<SelfMetric>,
    stats: &Arc<S>,
    metrics: &[AtomicMetric<S>],
    gauge: bool,
) {
    for &(name, unit, description, pick) in metrics {
        let s = stats.clone();
        out.push(SelfMetric {
            name,
            unit,
            description,
            gauge,
            read: Box::new(move || vec![(Vec::new(), pick(&s).load(Ordering::Relaxed))]),
        });
    }
}

/// Every self-metric of this process: the pipeline's, the kernel source's
/// and, when enrichment is on, the Kubernetes cache's.
pub fn all(
    stats: &Arc<SelfStats>,
    ebpf: Option<Arc<EbpfStats>>,
    kube: Option<Arc<KubeStats>>,
    source: SourceInfo,
) -> Vec<SelfMetric> {
    let mut out = Vec::new();
    let counters: [AtomicMetric<SelfStats>; 13] = [
        ("flowtel.logs.records.rate_limited", "{record}", "Log records dropped by export.logs.rate_limit", |s| &s.log_records_rate_limited),
        ("flowtel.flows.seen", "{flow}", "Connections seen for the first time", |s| &s.flows_seen),
        ("flowtel.export.successes", "{request}", "OTLP export requests that succeeded", |s| &s.exports_ok),
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
    atomics(&mut out, stats, &counters, false);
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
    atomics(&mut out, stats, &gauges, true);
    let s = stats.clone();
    out.push(SelfMetric {
        name: "flowtel.source.byte_counters",
        unit: "1",
        description:
            "1 when the kernel source reports byte and packet counters, 0 when accounting is off",
        gauge: true,
        read: Box::new(move || {
            vec![(
                Vec::new(),
                u64::from(s.byte_counters_available.load(Ordering::Relaxed)),
            )]
        }),
    });
    out.push(SelfMetric {
        name: "flowtel.source.active",
        unit: "1",
        description: "1 for the kernel source in use, with its name and mode",
        gauge: true,
        read: Box::new(move || {
            vec![(
                vec![
                    KeyValue::new(SOURCE, source.name),
                    KeyValue::new("flowtel.source.mode", source.mode),
                ],
                1,
            )]
        }),
    });
    if let Some(k) = kube {
        kube_metrics(&mut out, k, stats);
    }
    if let Some(e) = ebpf {
        ebpf_metrics(&mut out, &e);
    }
    out
}

/// A counter read from the Kubernetes cache: name, unit, description, getter.
type KubeCounter = (
    &'static str,
    &'static str,
    &'static str,
    fn(&KubeStats) -> u64,
);

/// The Kubernetes cache's health and how many flow ends it could name.
fn kube_metrics(out: &mut Vec<SelfMetric>, kube: Arc<KubeStats>, stats: &Arc<SelfStats>) {
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
        out.push(SelfMetric {
            name,
            unit,
            description,
            gauge: false,
            read: Box::new(move || vec![(Vec::new(), read(&k))]),
        });
    }
    out.push(SelfMetric {
        name: "flowtel.k8s.synced",
        unit: "1",
        description: "1 once every watched kind has been listed completely, 0 before",
        gauge: true,
        read: Box::new(move || vec![(Vec::new(), u64::from(kube.synced()))]),
    });
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
    atomics(out, stats, &counters, false);
}

fn ebpf_metrics(out: &mut Vec<SelfMetric>, stats: &Arc<EbpfStats>) {
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
    atomics(out, stats, &counters, false);
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
    atomics(out, stats, &gauges, true);
}
