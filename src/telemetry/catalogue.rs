//! Every metric and attribute name flowtel emits, written once.
//!
//! Exporters, `/readyz`, the attribute selection of `export.metrics` and the
//! Prometheus names all read these entries, and `tests/catalogue.rs` fails
//! when `docs/telemetry.md` and this file disagree, in either direction.
//! Adding a metric means adding its entry here (and to [`METRICS`]) and its
//! row in the docs.

/// How a metric is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instrument {
    /// A monotonic Sum.
    Counter,
    Gauge,
    /// Explicit-bucket.
    Histogram,
}

/// One metric: its name, UCUM unit and description, and where else it shows.
#[derive(Debug, PartialEq, Eq)]
pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub instrument: Instrument,
    /// Its key in `/readyz` (`stats.dumps`), for the counts an operator
    /// checks first. A gauge of unit `1` shows there as a boolean.
    pub readyz: Option<&'static str>,
    /// Whether `export.metrics.attributes` may export it with fewer
    /// attributes.
    pub selectable: bool,
}

const fn metric(
    name: &'static str,
    unit: &'static str,
    instrument: Instrument,
    description: &'static str,
) -> Metric {
    Metric {
        name,
        unit,
        description,
        instrument,
        readyz: None,
        selectable: false,
    }
}

const fn counter(name: &'static str, unit: &'static str, description: &'static str) -> Metric {
    metric(name, unit, Instrument::Counter, description)
}

const fn gauge(name: &'static str, unit: &'static str, description: &'static str) -> Metric {
    metric(name, unit, Instrument::Gauge, description)
}

const fn histogram(name: &'static str, unit: &'static str, description: &'static str) -> Metric {
    metric(name, unit, Instrument::Histogram, description)
}

impl Metric {
    const fn readyz(self, key: &'static str) -> Self {
        Self {
            readyz: Some(key),
            ..self
        }
    }

    const fn selectable(self) -> Self {
        Self {
            selectable: true,
            ..self
        }
    }

    /// Its name in the Prometheus exposition (see [`prometheus_name`]).
    pub fn prometheus_name(&self) -> String {
        prometheus_name(self.name, self.unit, self.instrument)
    }
}

/// The Prometheus name of a metric, by the OpenTelemetry specification's
/// "Prometheus and OpenMetrics Compatibility" rules (those a Collector
/// applies): sanitized, then the unit as a word unless the name already
/// holds it, then `_total` for monotonic sums. Histograms add `_bucket`,
/// `_sum` and `_count` to it.
pub fn prometheus_name(name: &str, unit: &str, instrument: Instrument) -> String {
    let mut out = sanitize(name, true);
    if let Some(unit) = unit_suffix(unit, instrument == Instrument::Gauge) {
        if !format!("_{out}_").contains(&format!("_{unit}_")) {
            out.push('_');
            out.push_str(&unit);
        }
    }
    if instrument == Instrument::Counter && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

/// Replaces what a Prometheus metric name (`[a-zA-Z_:][a-zA-Z0-9_:]*`) or
/// label name (no `:`) cannot hold with `_`, with no two `_` in a row.
pub fn sanitize(name: &str, metric: bool) -> String {
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

// ---- Flows (scope `flowtel`) ----

pub static FLOW_BYTES: Metric = counter(
    "flowtel.flow.bytes",
    "By",
    "Bytes carried by flows (L3, IP headers included), by direction",
)
.selectable();
pub static FLOW_PACKETS: Metric = counter(
    "flowtel.flow.packets",
    "{packet}",
    "Packets carried by flows, by direction",
)
.selectable();
pub static ZONE_BYTES: Metric = counter(
    "flowtel.zone.bytes",
    "By",
    "Bytes between this node's zone and each peer zone, same-zone and cross-zone",
)
.selectable();
pub static PACKET_DROPS: Metric = counter(
    "flowtel.packet.drops",
    "{packet}",
    "Packets the kernel dropped, by its drop reason",
)
.selectable();
pub static TCP_OPENED: Metric = counter(
    "flowtel.tcp.connections.opened",
    "{connection}",
    "TCP connections that completed the handshake",
)
.selectable();
pub static TCP_CLOSED: Metric = counter(
    "flowtel.tcp.connections.closed",
    "{connection}",
    "TCP connections that ended, by how (FIN, reset or timeout)",
)
.selectable();
pub static TCP_FAILED: Metric = counter(
    "flowtel.tcp.connections.failed",
    "{connection}",
    "TCP connection attempts that never opened, by why (refused or no answer)",
)
.selectable();
pub static TCP_RETRANSMITS: Metric = counter(
    "flowtel.tcp.retransmits",
    "{segment}",
    "TCP segments retransmitted, both ends of a connection summed",
)
.selectable();
pub static TCP_RTT: Metric = histogram(
    "flowtel.tcp.rtt",
    "s",
    "Smoothed round-trip time of TCP connections: one sample per connection and \
     interval in which it received data, and one at its close",
)
.selectable();
pub static TCP_DURATION: Metric = histogram(
    "flowtel.tcp.connection.duration",
    "s",
    "How long TCP connections lasted, from SYN to close",
)
.selectable();
pub static DNS_REQUESTS: Metric = counter(
    "flowtel.dns.requests",
    "{request}",
    "DNS queries seen by the eBPF source, by response code (TIMEOUT when unanswered) and \
     question type",
)
.selectable();
pub static DNS_NAME_REQUESTS: Metric = counter(
    "flowtel.dns.name.requests",
    "{request}",
    "DNS queries by query name: the top flows.dns_top_names names of each interval, the rest \
     in one overflow series",
);
pub static DNS_LATENCY: Metric = histogram(
    "flowtel.dns.latency",
    "s",
    "Time from a DNS query to its response, as the kernel saw them",
)
.selectable();

// ---- Self-telemetry (scope `flowtel`) ----

pub static FLOWS_TRACKED: Metric = gauge(
    "flowtel.flows.tracked",
    "{flow}",
    "Connections currently held in the flow table",
)
.readyz("stats.flows_tracked");
pub static FLOWS_UPDATES: Metric = counter(
    "flowtel.flows.updates",
    "{update}",
    "Source reports of a connection's counters applied to the flow table",
)
.readyz("stats.flow_updates");
pub static FLOWS_SEEN: Metric = counter(
    "flowtel.flows.seen",
    "{flow}",
    "Connections seen for the first time",
)
.readyz("stats.flows_seen");
pub static FLOWS_UNTRACKED: Metric = counter(
    "flowtel.flows.untracked",
    "{update}",
    "Flow updates not tracked because the flow table was full; those flows are counted at their end",
)
.readyz("stats.flows_untracked");
pub static FLOWS_ENDED_UNSEEN: Metric = counter(
    "flowtel.flows.ended_unseen",
    "{flow}",
    "Flows that ended without a final event; traffic after their last dump was missed",
)
.readyz("stats.flows_ended_unseen");
pub static FLOWS_ID_REUSED: Metric = counter(
    "flowtel.flows.id_reused",
    "{flow}",
    "Connections that reused a tuple and the kernel ID of the one before it, without start times to tell them apart; traffic before their next report was missed",
)
.readyz("stats.flows_id_reused");
pub static SERIES_ACTIVE: Metric = gauge(
    "flowtel.series.active",
    "{series}",
    "Metric series currently exported",
)
.readyz("stats.series_active");
pub static DNS_NAMES_OVERFLOWED: Metric = counter(
    "flowtel.dns.names.overflowed",
    "{request}",
    "DNS queries folded into the overflow series of flowtel.dns.name.requests",
)
.readyz("stats.dns_names_overflowed");
pub static SERIES_OVERFLOWED: Metric = counter(
    "flowtel.series.overflowed",
    "{update}",
    "Flow deltas folded into the overflow series because the series budget was used up",
)
.readyz("stats.series_overflowed");
pub static TCP_SAMPLES_DROPPED: Metric = counter(
    "flowtel.tcp.samples.dropped",
    "{sample}",
    "RTT and duration samples not kept (an interval already held the maximum, or an exporter fell \
     behind); counts stay exact",
)
.readyz("stats.tcp_samples_dropped");
pub static SOURCE_ACTIVE: Metric = gauge(
    "flowtel.source.active",
    "1",
    "1 for the kernel source in use, with its name and mode",
);
pub static SOURCE_EVENTS_LOST: Metric = counter(
    "flowtel.source.events.lost",
    "{overrun}",
    "Kernel event-queue overruns (each lost at least one event)",
)
.readyz("stats.events_lost");
pub static SOURCE_DECODE_ERRORS: Metric = counter(
    "flowtel.source.decode.errors",
    "{message}",
    "Source messages that could not be decoded and were skipped",
)
.readyz("stats.parse_errors");
pub static SOURCE_DUMPS: Metric =
    counter("flowtel.source.dumps", "{dump}", "Table dumps completed").readyz("stats.dumps");
pub static SOURCE_DUMPS_FAILED: Metric = counter(
    "flowtel.source.dumps.failed",
    "{dump}",
    "Table dumps that failed",
)
.readyz("stats.dump_errors");
pub static SOURCE_BYTE_COUNTERS: Metric = gauge(
    "flowtel.source.byte_counters",
    "1",
    "1 when the kernel source reports byte and packet counters, 0 when accounting is off",
)
.readyz("stats.byte_counters_available");
pub static EXPORT_SUCCESSES: Metric = counter(
    "flowtel.export.successes",
    "{request}",
    "OTLP export requests that succeeded",
)
.readyz("stats.exports_ok");
pub static EXPORT_FAILURES: Metric = counter(
    "flowtel.export.failures",
    "{request}",
    "OTLP export requests that failed after retries",
)
.readyz("stats.exports_failed");
pub static EXPORT_INTERVALS_SKIPPED: Metric = counter(
    "flowtel.export.intervals.skipped",
    "{interval}",
    "Finished intervals an exporter could not take because export.queue_size intervals were \
     already waiting for it; its metrics came with the next interval, its records and samples \
     were counted as dropped",
)
.readyz("stats.intervals_skipped");
pub static LOGS_RECORDS_DROPPED: Metric = counter(
    "flowtel.logs.records.dropped",
    "{record}",
    "Log records lost: past export.logs.max_records in one interval, in an interval the log \
     exporter could not take, or in a request that failed after retries",
)
.readyz("stats.records_dropped");
pub static LOGS_RECORDS_RATE_LIMITED: Metric = counter(
    "flowtel.logs.records.rate_limited",
    "{record}",
    "Log records dropped by export.logs.rate_limit",
)
.readyz("stats.log_records_rate_limited");
pub static LOGS_DNS_SAMPLED_OUT: Metric = counter(
    "flowtel.logs.dns.sampled_out",
    "{lookup}",
    "Answered DNS lookups that got no flowtel.dns.lookup record because of \
     export.logs.dns_sampling",
)
.readyz("stats.dns_lookups_sampled_out");
pub static LOGS_DNS_RATE_LIMITED: Metric = counter(
    "flowtel.logs.dns.rate_limited",
    "{lookup}",
    "Answered DNS lookups whose flowtel.dns.lookup record export.logs.dns_rate_limit dropped",
)
.readyz("stats.dns_lookups_rate_limited");
pub static SPANS_DROPPED: Metric = counter(
    "flowtel.spans.dropped",
    "{span}",
    "Sampled connection spans lost: past export.traces.max_spans in one interval, in an interval \
     the traces exporter could not take, or in a request that failed after retries",
)
.readyz("stats.spans_dropped");
pub static SPANS_RATE_LIMITED: Metric = counter(
    "flowtel.spans.rate_limited",
    "{span}",
    "Sampled connection spans dropped by export.traces.rate_limit",
)
.readyz("stats.spans_rate_limited");

// ---- The eBPF source ----

pub static EBPF_OVERFLOW_PACKETS: Metric = counter(
    "flowtel.ebpf.overflow.packets",
    "{packet}",
    "Packets that found the kernel flow map full and were not recorded (raise ebpf.max_flows)",
);
pub static EBPF_OVERFLOW_BYTES: Metric = counter(
    "flowtel.ebpf.overflow.bytes",
    "By",
    "Bytes of the packets that found the kernel flow map full",
);
pub static EBPF_OVERFLOW_NOMEM_PACKETS: Metric = counter(
    "flowtel.ebpf.overflow.nomem_packets",
    "{packet}",
    "Part of the overflow caused by the kernel allocator, not by max_flows",
);
pub static EBPF_ATTACH_FAILURES: Metric = counter(
    "flowtel.ebpf.attach.failures",
    "{failure}",
    "Interfaces flowtel could not attach to",
);
pub static EBPF_FLOWS_EXPIRED: Metric = counter(
    "flowtel.ebpf.flows.expired",
    "{flow}",
    "Idle flows reported ended and forgotten",
);
pub static EBPF_NAT_REFUSED: Metric = counter(
    "flowtel.ebpf.nat.refused",
    "{translation}",
    "NAT translations not kept because ebpf.nat_max_entries were held; those connections are \
     reported once per side",
);
pub static EBPF_TCP_EVENTS_LOST: Metric = counter(
    "flowtel.ebpf.tcp.events.lost",
    "{event}",
    "TCP open/close/fail events lost because the ring buffer was full",
);
pub static EBPF_TCP_SOCKETS_UNTRACKED: Metric = counter(
    "flowtel.ebpf.tcp.sockets.untracked",
    "{attempt}",
    "Times a TCP socket could not be followed because ebpf.tcp.max_sockets were",
);
pub static EBPF_DROPS_UNRECORDED: Metric = counter(
    "flowtel.ebpf.drops.unrecorded",
    "{packet}",
    "Dropped packets not recorded because ebpf.drops.max_entries pairs were held",
);
pub static EBPF_INTERFACES: Metric = gauge(
    "flowtel.ebpf.interfaces",
    "{interface}",
    "Interfaces with flowtel's TC programs attached",
);
pub static EBPF_MAP_ENTRIES: Metric = gauge(
    "flowtel.ebpf.map.entries",
    "{entry}",
    "Sightings (5-tuple, interface, hook) held after the last dump",
);
pub static EBPF_NAT_TRANSLATIONS: Metric = gauge(
    "flowtel.ebpf.nat.translations",
    "{translation}",
    "NAT translations held to fold the two tuples of NAT'ed connections",
);
pub static EBPF_TCP_SOCKETS: Metric = gauge(
    "flowtel.ebpf.tcp.sockets",
    "{socket}",
    "TCP sockets followed at the last dump",
);

pub static EBPF_INTERFACE_BYTES: Metric = counter(
    "flowtel.ebpf.interface.bytes",
    "By",
    "L3 bytes on the attached interfaces by hook, as their own counters and as flowtel saw them",
);

pub static EBPF_TCP_SOCKETS_SWEPT: Metric = counter(
    "flowtel.ebpf.tcp.sockets.swept",
    "{socket}",
    "Half-open sockets removed after 5 minutes because their close was never seen",
);

pub static ANOMALIES: Metric = counter(
    "flowtel.anomalies",
    "{anomaly}",
    "Anomalies detected on this node (flowtel.anomaly events that started), by flowtel.anomaly.kind",
);
pub static ANOMALY_UNTRACKED: Metric = counter(
    "flowtel.anomaly.untracked",
    "{attempt}",
    "Attempts, lookups and flow updates the anomaly detectors did not follow because flows.anomaly.max_tracked keys (or a workload's remembered edges and protocols) were full",
)
.readyz("stats.anomaly_untracked");
pub static EBPF_DNS_ERRORS: Metric = counter(
    "flowtel.ebpf.dns.errors",
    "{message}",
    "DNS messages not (or not fully) recorded, by flowtel.dns.error",
);

// ---- The Kubernetes cache ----

pub static K8S_WATCH_ERRORS: Metric = counter(
    "flowtel.k8s.watch.errors",
    "{error}",
    "Failed Kubernetes list, watch or connection attempts (each retried)",
)
.readyz("kubernetes.watch_errors");
pub static K8S_RELISTS: Metric = counter(
    "flowtel.k8s.relists",
    "{list}",
    "Complete re-lists after a 410 Gone, an API server restart or a broken watch",
)
.readyz("kubernetes.relists");
pub static K8S_OBJECTS_REJECTED: Metric = counter(
    "flowtel.k8s.objects.rejected",
    "{object}",
    "Kubernetes objects skipped because a field flowtel needs was missing or malformed",
)
.readyz("kubernetes.objects_rejected");
pub static K8S_OBJECTS_SHED: Metric = counter(
    "flowtel.k8s.objects.shed",
    "{object}",
    "New Kubernetes objects not cached because the cache held kubernetes.max_objects already",
)
.readyz("kubernetes.objects_shed");
pub static K8S_OBJECTS_CACHED: Metric = gauge(
    "flowtel.k8s.objects.cached",
    "{object}",
    "Kubernetes objects of all kinds in the last published snapshot of the cache (at most kubernetes.max_objects)",
)
.readyz("kubernetes.objects_cached");
pub static K8S_SYNCED: Metric = gauge(
    "flowtel.k8s.synced",
    "1",
    "1 once every watched kind has been listed completely, 0 before",
)
.readyz("kubernetes.synced");
pub static K8S_ENDS_NAMED: Metric = counter(
    "flowtel.k8s.ends.named",
    "{end}",
    "Flow ends the Kubernetes cache named as a pod, Service or node",
)
.readyz("stats.k8s_ends_named");
pub static K8S_ENDS_UNKNOWN: Metric = counter(
    "flowtel.k8s.ends.unknown",
    "{end}",
    "Flow ends no Kubernetes object claimed, named by their network instead",
)
.readyz("stats.k8s_ends_unknown");

// ---- Mesh and CNI sources (scope `flowtel.mesh`) ----

pub static SOURCES_ACTIVE: Metric = gauge(
    "flowtel.sources.active",
    "1",
    "Sources delivering data: the kernel source, hubble, istio, felix, firewall, cni.",
);
pub static CNI_DETECTED: Metric = gauge(
    "flowtel.cni.detected",
    "1",
    "The CNI plugin named by the node's CNI configuration (1 while detected).",
);
pub static CNI_OPERATIONS: Metric = counter(
    "flowtel.cni.operations",
    "{operation}",
    "CNI plugin executions that ended, by plugin, command and result.",
);
pub static CNI_OPERATION_DURATION: Metric = histogram(
    "flowtel.cni.operation.duration",
    "s",
    "How long CNI plugin executions took, exec to exit.",
);
pub static CNI_EVENTS_LOST: Metric = counter(
    "flowtel.cni.events.lost",
    "{event}",
    "CNI plugin executions (or their stdout) not reported, by cause.",
);
pub static CNI_RECORDS_DROPPED: Metric = counter(
    "flowtel.cni.records.dropped",
    "{event}",
    "CNI operation events dropped because more than cni.max_records waited.",
);
pub static CNI_RUNNING: Metric = gauge(
    "flowtel.cni.running",
    "{process}",
    "CNI plugins running now (exec seen, exit not yet).",
);
pub static CNI_SERIES_FOLDED: Metric = counter(
    "flowtel.cni.series.folded",
    "{operation}",
    "CNI operations counted in the overflow series because cni.max_series was reached.",
);
pub static CNI_IPS_ALLOCATED: Metric = counter(
    "flowtel.cni.ips.allocated",
    "{address}",
    "Pod addresses that appeared in status.podIPs of this node's pods, by workload.",
);
pub static CNI_IPS_RELEASED: Metric = counter(
    "flowtel.cni.ips.released",
    "{address}",
    "Pod addresses this node's pods let go (deleted, finished or removed from status.podIPs), by workload.",
);
pub static CNI_SCHEDULED_TO_IP: Metric = histogram(
    "flowtel.cni.scheduled_to_ip.duration",
    "s",
    "Time from a pod's PodScheduled condition to its first address, by workload.",
);
pub static CNI_IP_EVENTS_DROPPED: Metric = counter(
    "flowtel.cni.ip_events.dropped",
    "{event}",
    "IP allocation and release events dropped because more than 10,000 waited for the pipeline.",
);
pub static CNI_CONFIG_CHANGES: Metric = counter(
    "flowtel.cni.config.changes",
    "{change}",
    "Changes of the node's active CNI configuration seen by detection.",
);
pub static K8S_NETWORK_EVENTS: Metric = counter(
    "flowtel.cni.k8s_events",
    "{event}",
    "Kubernetes Warning Events about this node's pod networking, by reason.",
);
pub static SCRAPE_ERRORS: Metric = counter(
    "flowtel.scrape.errors",
    "{scrape}",
    "Failed scrapes of Istio proxies and Felix, by target kind and error kind.",
);
pub static SCRAPE_SUCCESSES: Metric = counter(
    "flowtel.scrape.successes",
    "{scrape}",
    "Successful scrapes, by target kind.",
);
pub static SCRAPE_SERIES_SHED: Metric = counter(
    "flowtel.scrape.series.shed",
    "{series}",
    "Series past a scrape's max_series, not kept, by target kind.",
);
pub static HUBBLE_FLOWS: Metric = counter(
    "flowtel.hubble.flows",
    "{flow}",
    "Flow events Hubble reported, by verdict and ends.",
);
pub static HUBBLE_L7_REQUESTS: Metric = counter(
    "flowtel.hubble.l7.requests",
    "{request}",
    "L7 records Hubble reported (requests and responses).",
);
pub static HUBBLE_L7_DURATION: Metric = histogram(
    "flowtel.hubble.l7.duration",
    "s",
    "Request-to-response latency Hubble measured.",
);
pub static HUBBLE_LOST_EVENTS: Metric = counter(
    "flowtel.hubble.lost_events",
    "{event}",
    "Events Hubble lost before flowtel could read them.",
);
pub static HUBBLE_STREAM_ERRORS: Metric = counter(
    "flowtel.hubble.stream.errors",
    "{error}",
    "Hubble stream failures, by kind.",
);
pub static HUBBLE_STREAM_CONNECTED: Metric = gauge(
    "flowtel.hubble.stream.connected",
    "1",
    "1 while a GetFlows stream is open.",
);
pub static HUBBLE_STREAM_RECONNECTS: Metric = counter(
    "flowtel.hubble.stream.reconnects",
    "{connection}",
    "GetFlows streams opened after the first.",
);
pub static HUBBLE_FLOWS_DUPLICATES: Metric = counter(
    "flowtel.hubble.flows.duplicates",
    "{flow}",
    "Flows replayed after a reconnect and not counted again.",
);
pub static HUBBLE_FLOWS_MALFORMED: Metric = counter(
    "flowtel.hubble.flows.malformed",
    "{flow}",
    "Counted flows with a malformed part, by kind.",
);
pub static HUBBLE_RECORDS_DROPPED: Metric = counter(
    "flowtel.hubble.records.dropped",
    "{flow}",
    "Flows dropped from the flow-record queue because it was full.",
);

// Istio's families, as the Istio source renames them.
pub static ISTIO_REQUESTS: Metric = counter(
    "istio.requests",
    "{request}",
    "Requests handled by an Istio proxy.",
);
pub static ISTIO_REQUEST_DURATION: Metric = histogram(
    "istio.request.duration",
    "ms",
    "Request durations seen by an Istio proxy.",
);
pub static ISTIO_TCP_SENT: Metric = counter(
    "istio.tcp.sent",
    "By",
    "Bytes sent by an Istio proxy on TCP connections.",
);
pub static ISTIO_TCP_RECEIVED: Metric = counter(
    "istio.tcp.received",
    "By",
    "Bytes received by an Istio proxy on TCP connections.",
);
pub static ISTIO_TCP_OPENED: Metric = counter(
    "istio.tcp.connections.opened",
    "{connection}",
    "TCP connections an Istio proxy opened.",
);
pub static ISTIO_TCP_CLOSED: Metric = counter(
    "istio.tcp.connections.closed",
    "{connection}",
    "TCP connections an Istio proxy closed.",
);

// Calico Felix's families, as the Felix source renames them.
pub static CALICO_DENIED_PACKETS: Metric = gauge(
    "calico.denied.packets",
    "{packet}",
    "Packets denied by Calico policy, per policy and source address.",
);
pub static CALICO_DENIED_BYTES: Metric = gauge(
    "calico.denied.bytes",
    "By",
    "Bytes denied by Calico policy, per policy and source address.",
);
pub static FELIX_ACTIVE_LOCAL_ENDPOINTS: Metric = gauge(
    "felix.active.local.endpoints",
    "{endpoint}",
    "Endpoints active on this node.",
);
pub static FELIX_ACTIVE_LOCAL_POLICIES: Metric = gauge(
    "felix.active.local.policies",
    "{policy}",
    "Policies active on this node.",
);
pub static FELIX_CLUSTER_POLICIES: Metric = gauge(
    "felix.cluster.policies",
    "{policy}",
    "Policies in the cluster.",
);
pub static FELIX_IPTABLES_RULES: Metric = gauge(
    "felix.iptables.rules",
    "{rule}",
    "iptables rules Felix programmed, per table and IP version.",
);
pub static FELIX_IPSETS: Metric = gauge(
    "felix.ipsets",
    "{ipset}",
    "Calico IP sets in the dataplane.",
);
pub static FELIX_BPF_ENDPOINTS: Metric = gauge(
    "felix.bpf.dataplane.endpoints",
    "{endpoint}",
    "Endpoints the BPF dataplane manages.",
);
pub static FELIX_BPF_ENDPOINTS_DIRTY: Metric = gauge(
    "felix.bpf.dataplane.endpoints.dirty",
    "{endpoint}",
    "BPF endpoints left unprogrammed after a failure.",
);
pub static FELIX_RESYNC_STATE: Metric = gauge(
    "felix.resync.state",
    "1",
    "Felix's datastore sync state (3: in sync).",
);
pub static FELIX_DATAPLANE_FAILURES: Metric = counter(
    "felix.dataplane.failures",
    "{failure}",
    "Dataplane updates that failed and will be retried.",
);
pub static FELIX_DATAPLANE_MESSAGES: Metric = counter(
    "felix.dataplane.messages",
    "{message}",
    "Dataplane messages, per type.",
);
pub static FELIX_IPTABLES_RESTORE_ERRORS: Metric = counter(
    "felix.iptables.restore.errors",
    "{error}",
    "iptables-restore failures.",
);
pub static FELIX_IPTABLES_SAVE_ERRORS: Metric = counter(
    "felix.iptables.save.errors",
    "{error}",
    "iptables-save failures.",
);
pub static FELIX_IPSET_ERRORS: Metric =
    counter("felix.ipset.errors", "{error}", "ipset command failures.");
pub static FELIX_RESYNCS_STARTED: Metric = counter(
    "felix.resyncs.started",
    "{resync}",
    "Datastore resyncs Felix started.",
);

// ---- Firewall (scope `flowtel.mesh`) ----

pub static FIREWALL_PACKETS: Metric = counter(
    "flowtel.firewall.packets",
    "{packet}",
    "Packets matched by a firewall rule (nftables or legacy xtables), per rule, from its kernel counter.",
);
pub static FIREWALL_BYTES: Metric = counter(
    "flowtel.firewall.bytes",
    "By",
    "Bytes matched by a firewall rule, per rule, from its kernel counter.",
);
pub static FIREWALL_DROPS: Metric = counter(
    "flowtel.firewall.drops",
    "{packet}",
    "Packets dropped or rejected by firewall rules, per policy or Service and chain.",
);
pub static FIREWALL_RULES: Metric = gauge(
    "flowtel.firewall.rules",
    "{rule}",
    "Rules with counters in the latest read, per back end and family.",
);
pub static FIREWALL_READ_FAILURES: Metric = counter(
    "flowtel.firewall.read.failures",
    "{read}",
    "Firewall reads that failed, per back end and reason.",
);
pub static FIREWALL_DECODE_ERRORS: Metric = counter(
    "flowtel.firewall.decode.errors",
    "{error}",
    "Unexpected kernel data in firewall reads (unknown expressions, long comments, malformed messages), per back end and kind.",
);
pub static FIREWALL_COUNTER_RESETS: Metric = counter(
    "flowtel.firewall.counter.resets",
    "{reset}",
    "Rule counters that went back (a rule reloaded or reset), counted from zero instead.",
);
pub static FIREWALL_SERIES_FOLDED: Metric = counter(
    "flowtel.firewall.series.folded",
    "{reading}",
    "Rule readings counted in the overflow series because firewall.max_series was reached.",
);
pub static FIREWALL_EVENTS_DROPPED: Metric = counter(
    "flowtel.firewall.events.dropped",
    "{event}",
    "Firewall drop events not sent (over firewall.max_events, or the pipeline full).",
);

/// Every metric above.
pub static METRICS: &[&Metric] = &[
    &FLOW_BYTES,
    &FLOW_PACKETS,
    &ZONE_BYTES,
    &PACKET_DROPS,
    &TCP_OPENED,
    &TCP_CLOSED,
    &TCP_FAILED,
    &TCP_RETRANSMITS,
    &TCP_RTT,
    &TCP_DURATION,
    &DNS_REQUESTS,
    &DNS_NAME_REQUESTS,
    &DNS_LATENCY,
    &FLOWS_TRACKED,
    &FLOWS_UPDATES,
    &FLOWS_SEEN,
    &FLOWS_UNTRACKED,
    &FLOWS_ENDED_UNSEEN,
    &FLOWS_ID_REUSED,
    &SERIES_ACTIVE,
    &SERIES_OVERFLOWED,
    &DNS_NAMES_OVERFLOWED,
    &TCP_SAMPLES_DROPPED,
    &SOURCE_ACTIVE,
    &SOURCE_EVENTS_LOST,
    &SOURCE_DECODE_ERRORS,
    &SOURCE_DUMPS,
    &SOURCE_DUMPS_FAILED,
    &SOURCE_BYTE_COUNTERS,
    &EXPORT_SUCCESSES,
    &EXPORT_FAILURES,
    &EXPORT_INTERVALS_SKIPPED,
    &LOGS_RECORDS_DROPPED,
    &LOGS_RECORDS_RATE_LIMITED,
    &LOGS_DNS_SAMPLED_OUT,
    &LOGS_DNS_RATE_LIMITED,
    &SPANS_DROPPED,
    &SPANS_RATE_LIMITED,
    &EBPF_OVERFLOW_PACKETS,
    &EBPF_OVERFLOW_BYTES,
    &EBPF_OVERFLOW_NOMEM_PACKETS,
    &EBPF_ATTACH_FAILURES,
    &EBPF_FLOWS_EXPIRED,
    &EBPF_NAT_REFUSED,
    &EBPF_TCP_EVENTS_LOST,
    &EBPF_TCP_SOCKETS_UNTRACKED,
    &EBPF_DROPS_UNRECORDED,
    &EBPF_INTERFACES,
    &EBPF_MAP_ENTRIES,
    &EBPF_NAT_TRANSLATIONS,
    &EBPF_TCP_SOCKETS,
    &EBPF_TCP_SOCKETS_SWEPT,
    &EBPF_INTERFACE_BYTES,
    &EBPF_DNS_ERRORS,
    &ANOMALIES,
    &ANOMALY_UNTRACKED,
    &K8S_WATCH_ERRORS,
    &K8S_RELISTS,
    &K8S_OBJECTS_REJECTED,
    &K8S_OBJECTS_SHED,
    &K8S_OBJECTS_CACHED,
    &K8S_SYNCED,
    &K8S_ENDS_NAMED,
    &K8S_ENDS_UNKNOWN,
    &SOURCES_ACTIVE,
    &CNI_DETECTED,
    &CNI_OPERATIONS,
    &CNI_OPERATION_DURATION,
    &CNI_EVENTS_LOST,
    &CNI_RECORDS_DROPPED,
    &CNI_RUNNING,
    &CNI_SERIES_FOLDED,
    &CNI_IPS_ALLOCATED,
    &CNI_IPS_RELEASED,
    &CNI_SCHEDULED_TO_IP,
    &CNI_IP_EVENTS_DROPPED,
    &K8S_NETWORK_EVENTS,
    &CNI_CONFIG_CHANGES,
    &SCRAPE_ERRORS,
    &SCRAPE_SUCCESSES,
    &SCRAPE_SERIES_SHED,
    &HUBBLE_FLOWS,
    &HUBBLE_L7_REQUESTS,
    &HUBBLE_L7_DURATION,
    &HUBBLE_LOST_EVENTS,
    &HUBBLE_STREAM_ERRORS,
    &HUBBLE_STREAM_CONNECTED,
    &HUBBLE_STREAM_RECONNECTS,
    &HUBBLE_FLOWS_DUPLICATES,
    &HUBBLE_FLOWS_MALFORMED,
    &HUBBLE_RECORDS_DROPPED,
    &ISTIO_REQUESTS,
    &ISTIO_REQUEST_DURATION,
    &ISTIO_TCP_SENT,
    &ISTIO_TCP_RECEIVED,
    &ISTIO_TCP_OPENED,
    &ISTIO_TCP_CLOSED,
    &CALICO_DENIED_PACKETS,
    &CALICO_DENIED_BYTES,
    &FELIX_ACTIVE_LOCAL_ENDPOINTS,
    &FELIX_ACTIVE_LOCAL_POLICIES,
    &FELIX_CLUSTER_POLICIES,
    &FELIX_IPTABLES_RULES,
    &FELIX_IPSETS,
    &FELIX_BPF_ENDPOINTS,
    &FELIX_BPF_ENDPOINTS_DIRTY,
    &FELIX_RESYNC_STATE,
    &FELIX_DATAPLANE_FAILURES,
    &FELIX_DATAPLANE_MESSAGES,
    &FELIX_IPTABLES_RESTORE_ERRORS,
    &FELIX_IPTABLES_SAVE_ERRORS,
    &FELIX_IPSET_ERRORS,
    &FELIX_RESYNCS_STARTED,
    &FIREWALL_PACKETS,
    &FIREWALL_BYTES,
    &FIREWALL_DROPS,
    &FIREWALL_RULES,
    &FIREWALL_READ_FAILURES,
    &FIREWALL_DECODE_ERRORS,
    &FIREWALL_COUNTER_RESETS,
    &FIREWALL_SERIES_FOLDED,
    &FIREWALL_EVENTS_DROPPED,
];

/// The metrics `export.metrics.attributes` may select.
pub fn selectable() -> impl Iterator<Item = &'static Metric> {
    METRICS.iter().copied().filter(|m| m.selectable)
}

// ---- Attributes of the resource ----

pub const SERVICE_NAME: &str = "service.name";
pub const SERVICE_VERSION: &str = "service.version";
pub const HOST_NAME: &str = "host.name";
pub const K8S_CLUSTER: &str = "k8s.cluster.name";
/// Of a connection span's resource: the local end's namespace.
pub const SERVICE_NAMESPACE: &str = "service.namespace";

// ---- Attributes of flow series, TCP and drop metrics ----

pub const NETWORK_TRANSPORT: &str = "network.transport";
pub const NETWORK_TYPE: &str = "network.type";
pub const CLIENT_ADDRESS: &str = "client.address";
pub const CLIENT_PORT: &str = "client.port";
pub const SERVER_ADDRESS: &str = "server.address";
pub const SERVER_PORT: &str = "server.port";
pub const FLOW_DIRECTION: &str = "flowtel.flow.direction";
pub const NAT_SERVER_ADDRESS: &str = "flowtel.nat.server.address";
pub const NAT_SERVER_PORT: &str = "flowtel.nat.server.port";
pub const NAT_CLIENT_ADDRESS: &str = "flowtel.nat.client.address";
pub const NAT_CLIENT_PORT: &str = "flowtel.nat.client.port";
pub const SOURCE: &str = "flowtel.source";
pub const SOURCE_MODE: &str = "flowtel.source.mode";
pub const OVERFLOW: &str = "otel.metric.overflow";
pub const TCP_CLOSE_CAUSE: &str = "flowtel.tcp.close.cause";
pub const TCP_FAILURE: &str = "flowtel.tcp.failure";
pub const DROP_REASON: &str = "flowtel.drop.reason";
pub const LOCAL_ROLE: &str = "flowtel.local.role";
pub const K8S_NAMESPACE: &str = "k8s.namespace.name";
pub const K8S_POD: &str = "k8s.pod.name";
pub const K8S_POD_UID: &str = "k8s.pod.uid";
pub const K8S_NODE: &str = "k8s.node.name";
pub const K8S_WORKLOAD_KIND: &str = "flowtel.k8s.workload.kind";
pub const K8S_WORKLOAD: &str = "flowtel.k8s.workload.name";
pub const K8S_SERVICE: &str = "flowtel.k8s.service.name";
/// The semantic-conventions names of a local pod's workload, by kind.
pub const K8S_DEPLOYMENT: &str = "k8s.deployment.name";
pub const K8S_STATEFULSET: &str = "k8s.statefulset.name";
pub const K8S_DAEMONSET: &str = "k8s.daemonset.name";
pub const K8S_REPLICASET: &str = "k8s.replicaset.name";
pub const K8S_JOB: &str = "k8s.job.name";
pub const K8S_CRONJOB: &str = "k8s.cronjob.name";
/// `k8s.pod.label.<key>`, for each label in `kubernetes.pod_labels`.
pub const K8S_POD_LABEL_PREFIX: &str = "k8s.pod.label.";
pub const ZONE: &str = "cloud.availability_zone";
pub const NETWORK: &str = "flowtel.network";
pub const PEER_K8S_NAMESPACE: &str = "flowtel.peer.k8s.namespace.name";
pub const PEER_K8S_POD: &str = "flowtel.peer.k8s.pod.name";
pub const PEER_K8S_WORKLOAD_KIND: &str = "flowtel.peer.k8s.workload.kind";
pub const PEER_K8S_WORKLOAD: &str = "flowtel.peer.k8s.workload.name";
pub const PEER_K8S_SERVICE: &str = "flowtel.peer.k8s.service.name";
pub const PEER_K8S_NODE: &str = "flowtel.peer.k8s.node.name";
/// `flowtel.peer.k8s.pod.label.<key>`.
pub const PEER_K8S_POD_LABEL_PREFIX: &str = "flowtel.peer.k8s.pod.label.";
pub const PEER_ZONE: &str = "flowtel.peer.zone";
pub const PEER_NETWORK: &str = "flowtel.peer.network";
pub const ENRICHMENT_PENDING: &str = "flowtel.enrichment.pending";
pub const ZONE_CROSSING: &str = "flowtel.zone.crossing";
/// Who counted `flowtel.ebpf.interface.bytes`: `kernel` or `flowtel`.
pub const OBSERVER: &str = "flowtel.observer";
/// The TC hook of `flowtel.ebpf.interface.bytes`: `ingress` or `egress`.
pub const HOOK: &str = "flowtel.hook";
/// Why a DNS message was not (fully) recorded: `map_full`, `ring_full`,
/// `parse_error`, `name_truncated`, `unmatched`.
pub const DNS_ERROR: &str = "flowtel.dns.error";
/// The RCODE mnemonic of a DNS response (`NOERROR`, `NXDOMAIN`, ...), or
/// `TIMEOUT`.
pub const DNS_RCODE: &str = "flowtel.dns.rcode";
/// The question type mnemonic (`A`, `AAAA`, ...).
pub const DNS_QUESTION_TYPE: &str = "flowtel.dns.question.type";
/// Which exporter a self-metric is about.
pub const EXPORTER: &str = "flowtel.exporter";

// ---- Attributes of the mesh and CNI sources' metrics ----

pub const CNI_NAME: &str = "flowtel.cni.name";
pub const CNI_PLUGIN: &str = "flowtel.cni.plugin";
pub const CNI_COMMAND: &str = "flowtel.cni.command";
pub const CNI_RESULT: &str = "flowtel.cni.result";
pub const K8S_EVENT_REASON: &str = "flowtel.k8s.event.reason";
pub const ISTIO_PROXY: &str = "flowtel.istio.proxy";
pub const SCRAPE_TARGET: &str = "flowtel.scrape.target";
pub const ERROR_TYPE: &str = "error.type";
pub const HUBBLE_VERDICT: &str = "flowtel.hubble.verdict";
pub const HUBBLE_DROP_REASON: &str = "flowtel.hubble.drop_reason";
pub const HUBBLE_TRAFFIC_DIRECTION: &str = "flowtel.hubble.traffic_direction";
pub const HUBBLE_IS_REPLY: &str = "flowtel.hubble.is_reply";
pub const HUBBLE_L7_PROTOCOL: &str = "flowtel.hubble.l7.protocol";
pub const HUBBLE_L7_TYPE: &str = "flowtel.hubble.l7.type";
pub const HUBBLE_L7_OPERATION: &str = "flowtel.hubble.l7.operation";
pub const HUBBLE_L7_STATUS: &str = "flowtel.hubble.l7.status";
pub const HUBBLE_LOST_EVENTS_SOURCE: &str = "flowtel.hubble.lost_events.source";
pub const SOURCE_K8S_NAMESPACE: &str = "source.k8s.namespace.name";
pub const SOURCE_K8S_WORKLOAD_KIND: &str = "source.k8s.workload.kind";
pub const SOURCE_K8S_WORKLOAD: &str = "source.k8s.workload.name";
pub const DESTINATION_K8S_NAMESPACE: &str = "destination.k8s.namespace.name";
pub const DESTINATION_K8S_WORKLOAD_KIND: &str = "destination.k8s.workload.kind";
pub const DESTINATION_K8S_WORKLOAD: &str = "destination.k8s.workload.name";

// ---- Attributes of the firewall source ----

pub const FIREWALL_BACKEND: &str = "flowtel.firewall.backend";
pub const FIREWALL_FAMILY: &str = "flowtel.firewall.family";
pub const FIREWALL_TABLE: &str = "flowtel.firewall.table";
pub const FIREWALL_CHAIN: &str = "flowtel.firewall.chain";
pub const FIREWALL_RULE_POSITION: &str = "flowtel.firewall.rule.position";
pub const FIREWALL_RULE_HANDLE: &str = "flowtel.firewall.rule.handle";
pub const FIREWALL_RULE_COMMENT: &str = "flowtel.firewall.rule.comment";
pub const FIREWALL_VERDICT: &str = "flowtel.firewall.verdict";
pub const FIREWALL_TARGET: &str = "flowtel.firewall.target";
pub const FIREWALL_OWNER: &str = "flowtel.firewall.owner";
pub const FIREWALL_SERVICE_PORT: &str = "flowtel.firewall.service.port";
pub const FIREWALL_ENDPOINT: &str = "flowtel.firewall.endpoint";
pub const FIREWALL_POLICY_KIND: &str = "flowtel.firewall.policy.kind";
pub const FIREWALL_POLICY: &str = "flowtel.firewall.policy.name";

// ---- Attributes of log events ----

pub const EVENT_NAME: &str = "event.name";
pub const SOURCE_ADDRESS: &str = "source.address";
pub const SOURCE_PORT: &str = "source.port";
pub const DESTINATION_ADDRESS: &str = "destination.address";
pub const DESTINATION_PORT: &str = "destination.port";
pub const FLOW_IO_BYTES: &str = "flow.io.bytes";
pub const FLOW_IO_PACKETS: &str = "flow.io.packets";
pub const FLOW_START: &str = "flow.start";
pub const FLOW_END: &str = "flow.end";
pub const FLOW_SAMPLING_RATE: &str = "flow.sampling_rate";
pub const FLOW_REVERSE_BYTES: &str = "flowtel.flow.reverse.io.bytes";
pub const FLOW_REVERSE_PACKETS: &str = "flowtel.flow.reverse.io.packets";
pub const FLOW_ENDED: &str = "flowtel.flow.ended";
/// On flow records, as the metric of the same name.
pub const TCP_RTT_ATTRIBUTE: &str = "flowtel.tcp.rtt";
pub const TCP_RETRANSMITS_ATTRIBUTE: &str = "flowtel.tcp.retransmits";
pub const TCP_DURATION_ATTRIBUTE: &str = "flowtel.tcp.connection.duration";

// ---- Attributes of connection spans ----

/// The peer's workload (or Service, or address): the virtual node of
/// Tempo's service graph when the peer sends no server span.
pub const PEER_SERVICE: &str = "peer.service";
pub const SPAN_SENT_BYTES: &str = "flowtel.connection.sent.bytes";
pub const SPAN_SENT_PACKETS: &str = "flowtel.connection.sent.packets";
pub const SPAN_RECEIVED_BYTES: &str = "flowtel.connection.received.bytes";
pub const SPAN_RECEIVED_PACKETS: &str = "flowtel.connection.received.packets";
pub const DROP_PACKETS: &str = "flowtel.drop.packets";
pub const DROP_BYTES: &str = "flowtel.drop.bytes";
pub const HUBBLE_FLOW_TYPE: &str = "flowtel.hubble.flow_type";
pub const HUBBLE_UUID: &str = "flowtel.hubble.uuid";
pub const HUBBLE_SOURCE_IDENTITY: &str = "flowtel.hubble.source.identity";
pub const HUBBLE_DESTINATION_IDENTITY: &str = "flowtel.hubble.destination.identity";
pub const HUBBLE_L7_DURATION_ATTRIBUTE: &str = "flowtel.hubble.l7.duration";
pub const SOURCE_K8S_POD: &str = "source.k8s.pod.name";
pub const DESTINATION_K8S_POD: &str = "destination.k8s.pod.name";
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
pub const URL_PATH: &str = "url.path";
pub const DNS_QUESTION_NAME: &str = "dns.question.name";
pub const HUBBLE_DNS_RCODE: &str = "flowtel.hubble.dns.rcode";
pub const HUBBLE_KAFKA_API_KEY: &str = "flowtel.hubble.kafka.api_key";
pub const MESSAGING_DESTINATION_NAME: &str = "messaging.destination.name";
pub const HUBBLE_KAFKA_ERROR_CODE: &str = "flowtel.hubble.kafka.error_code";

pub const CNI_DURATION: &str = "flowtel.cni.duration";
pub const CNI_NETNS: &str = "flowtel.cni.netns";
pub const CNI_ERROR_MESSAGE: &str = "flowtel.cni.error.message";
pub const CNI_ERROR_CODE: &str = "flowtel.cni.error.code";
pub const CNI_PARENT_PLUGIN: &str = "flowtel.cni.parent.plugin";
pub const CNI_IPS: &str = "flowtel.cni.ips";
pub const CNI_GATEWAYS: &str = "flowtel.cni.gateways";
pub const CNI_ENV_TRUNCATED: &str = "flowtel.cni.env.truncated";
/// On `flowtel.cni.ip_allocated`: PodScheduled to the first address, in
/// seconds.
pub const CNI_SCHEDULED_TO_IP_ATTRIBUTE: &str = "flowtel.cni.scheduled_to_ip";
pub const CONTAINER_ID: &str = "container.id";
pub const NETWORK_INTERFACE_NAME: &str = "network.interface.name";
pub const PROCESS_PID: &str = "process.pid";
pub const PROCESS_PARENT_PID: &str = "process.parent_pid";
pub const PROCESS_EXIT_CODE: &str = "process.exit.code";
pub const PROCESS_EXECUTABLE_PATH: &str = "process.executable.path";
pub const K8S_EVENT_COUNT: &str = "flowtel.k8s.event.count";
pub const CNI_CONFIG_FILE: &str = "flowtel.cni.config.file";
pub const CNI_CONFIG_OLD_PLUGINS: &str = "flowtel.cni.config.old_plugins";
pub const CNI_CONFIG_NEW_PLUGINS: &str = "flowtel.cni.config.new_plugins";

/// `event.name` of each kind of log event.
pub const EVENT_FLOW: &str = "flowtel.flow";
pub const EVENT_OPENED: &str = "flowtel.connection.opened";
pub const EVENT_CLOSED: &str = "flowtel.connection.closed";
pub const EVENT_FAILED: &str = "flowtel.connection.failed";
pub const EVENT_DROP: &str = "flowtel.packet.dropped";
pub const EVENT_DNS_FAILED: &str = "flowtel.dns.failed";
pub const EVENT_DNS_LOOKUP: &str = "flowtel.dns.lookup";
pub const EVENT_HUBBLE_FLOW: &str = "flowtel.hubble.flow";
pub const EVENT_CNI_OPERATION: &str = "flowtel.cni.operation";
pub const EVENT_K8S_NETWORK: &str = "flowtel.cni.k8s_event";
pub const EVENT_CNI_CONFIG_CHANGED: &str = "flowtel.cni.config_changed";
pub const EVENT_CNI_IP_ALLOCATED: &str = "flowtel.cni.ip_allocated";
pub const EVENT_CNI_IP_RELEASED: &str = "flowtel.cni.ip_released";
pub const EVENT_FIREWALL_DROP: &str = "flowtel.firewall.drop";
pub const EVENT_ANOMALY: &str = "flowtel.anomaly";
pub const ANOMALY_KIND: &str = "flowtel.anomaly.kind";
pub const ANOMALY_STATE: &str = "flowtel.anomaly.state";
pub const ANOMALY_COUNT: &str = "flowtel.anomaly.count";
pub const ANOMALY_THRESHOLD: &str = "flowtel.anomaly.threshold";
pub const ANOMALY_WINDOW: &str = "flowtel.anomaly.window";
pub const ANOMALY_CLIENT: &str = "flowtel.anomaly.client";
pub const ANOMALY_PEER: &str = "flowtel.anomaly.peer";
pub const ANOMALY_VALUE: &str = "flowtel.anomaly.value";
pub const ANOMALY_BASELINE: &str = "flowtel.anomaly.baseline";
pub const ANOMALY_STDDEV: &str = "flowtel.anomaly.baseline.stddev";
pub const ANOMALY_LIMIT: &str = "flowtel.anomaly.limit";
pub const ANOMALY_CONNECTIONS: &str = "flowtel.anomaly.connections";

/// Every attribute name above (prefixes stand for their family).
pub const ATTRIBUTES: &[&str] = &[
    ANOMALY_KIND,
    ANOMALY_STATE,
    ANOMALY_COUNT,
    ANOMALY_THRESHOLD,
    ANOMALY_WINDOW,
    ANOMALY_CLIENT,
    ANOMALY_PEER,
    ANOMALY_VALUE,
    ANOMALY_BASELINE,
    ANOMALY_STDDEV,
    ANOMALY_LIMIT,
    ANOMALY_CONNECTIONS,
    DNS_ERROR,
    DNS_RCODE,
    DNS_QUESTION_TYPE,
    SERVICE_NAME,
    SERVICE_VERSION,
    HOST_NAME,
    K8S_CLUSTER,
    SERVICE_NAMESPACE,
    PEER_SERVICE,
    SPAN_SENT_BYTES,
    SPAN_SENT_PACKETS,
    SPAN_RECEIVED_BYTES,
    SPAN_RECEIVED_PACKETS,
    NETWORK_TRANSPORT,
    NETWORK_TYPE,
    CLIENT_ADDRESS,
    CLIENT_PORT,
    SERVER_ADDRESS,
    SERVER_PORT,
    FLOW_DIRECTION,
    NAT_SERVER_ADDRESS,
    NAT_SERVER_PORT,
    NAT_CLIENT_ADDRESS,
    NAT_CLIENT_PORT,
    SOURCE,
    SOURCE_MODE,
    OVERFLOW,
    TCP_CLOSE_CAUSE,
    TCP_FAILURE,
    DROP_REASON,
    LOCAL_ROLE,
    K8S_NAMESPACE,
    K8S_POD,
    K8S_POD_UID,
    K8S_NODE,
    K8S_WORKLOAD_KIND,
    K8S_WORKLOAD,
    K8S_SERVICE,
    K8S_DEPLOYMENT,
    K8S_STATEFULSET,
    K8S_DAEMONSET,
    K8S_REPLICASET,
    K8S_JOB,
    K8S_CRONJOB,
    K8S_POD_LABEL_PREFIX,
    ZONE,
    NETWORK,
    PEER_K8S_NAMESPACE,
    PEER_K8S_POD,
    PEER_K8S_WORKLOAD_KIND,
    PEER_K8S_WORKLOAD,
    PEER_K8S_SERVICE,
    PEER_K8S_NODE,
    PEER_K8S_POD_LABEL_PREFIX,
    PEER_ZONE,
    PEER_NETWORK,
    ENRICHMENT_PENDING,
    ZONE_CROSSING,
    EXPORTER,
    CNI_NAME,
    CNI_PLUGIN,
    CNI_COMMAND,
    CNI_RESULT,
    K8S_EVENT_REASON,
    ISTIO_PROXY,
    SCRAPE_TARGET,
    ERROR_TYPE,
    HUBBLE_VERDICT,
    HUBBLE_DROP_REASON,
    HUBBLE_TRAFFIC_DIRECTION,
    HUBBLE_IS_REPLY,
    HUBBLE_L7_PROTOCOL,
    HUBBLE_L7_TYPE,
    HUBBLE_L7_OPERATION,
    HUBBLE_L7_STATUS,
    HUBBLE_LOST_EVENTS_SOURCE,
    SOURCE_K8S_NAMESPACE,
    SOURCE_K8S_WORKLOAD_KIND,
    SOURCE_K8S_WORKLOAD,
    DESTINATION_K8S_NAMESPACE,
    DESTINATION_K8S_WORKLOAD_KIND,
    DESTINATION_K8S_WORKLOAD,
    FIREWALL_BACKEND,
    FIREWALL_FAMILY,
    FIREWALL_TABLE,
    FIREWALL_CHAIN,
    FIREWALL_RULE_POSITION,
    FIREWALL_RULE_HANDLE,
    FIREWALL_RULE_COMMENT,
    FIREWALL_VERDICT,
    FIREWALL_TARGET,
    FIREWALL_OWNER,
    FIREWALL_SERVICE_PORT,
    FIREWALL_ENDPOINT,
    FIREWALL_POLICY_KIND,
    FIREWALL_POLICY,
    EVENT_NAME,
    SOURCE_ADDRESS,
    SOURCE_PORT,
    DESTINATION_ADDRESS,
    DESTINATION_PORT,
    FLOW_IO_BYTES,
    FLOW_IO_PACKETS,
    FLOW_START,
    FLOW_END,
    FLOW_SAMPLING_RATE,
    FLOW_REVERSE_BYTES,
    FLOW_REVERSE_PACKETS,
    FLOW_ENDED,
    TCP_RTT_ATTRIBUTE,
    TCP_RETRANSMITS_ATTRIBUTE,
    TCP_DURATION_ATTRIBUTE,
    DROP_PACKETS,
    DROP_BYTES,
    HUBBLE_FLOW_TYPE,
    HUBBLE_UUID,
    HUBBLE_SOURCE_IDENTITY,
    HUBBLE_DESTINATION_IDENTITY,
    HUBBLE_L7_DURATION_ATTRIBUTE,
    SOURCE_K8S_POD,
    DESTINATION_K8S_POD,
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
    URL_PATH,
    DNS_QUESTION_NAME,
    HUBBLE_DNS_RCODE,
    HUBBLE_KAFKA_API_KEY,
    MESSAGING_DESTINATION_NAME,
    HUBBLE_KAFKA_ERROR_CODE,
    CNI_DURATION,
    CNI_NETNS,
    CNI_ERROR_MESSAGE,
    CNI_ERROR_CODE,
    CNI_PARENT_PLUGIN,
    CNI_IPS,
    CNI_GATEWAYS,
    CNI_ENV_TRUNCATED,
    CNI_SCHEDULED_TO_IP_ATTRIBUTE,
    CONTAINER_ID,
    NETWORK_INTERFACE_NAME,
    PROCESS_PID,
    PROCESS_PARENT_PID,
    PROCESS_EXIT_CODE,
    PROCESS_EXECUTABLE_PATH,
    K8S_EVENT_COUNT,
    CNI_CONFIG_FILE,
    CNI_CONFIG_OLD_PLUGINS,
    CNI_CONFIG_NEW_PLUGINS,
];

/// The semantic-conventions attribute naming a workload of this kind
/// (`k8s.deployment.name`, ...), for the end on this node.
pub fn workload_attribute(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Deployment" => K8S_DEPLOYMENT,
        "StatefulSet" => K8S_STATEFULSET,
        "DaemonSet" => K8S_DAEMONSET,
        "ReplicaSet" => K8S_REPLICASET,
        "Job" => K8S_JOB,
        "CronJob" => K8S_CRONJOB,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut metrics: Vec<_> = METRICS.iter().map(|m| m.name).collect();
        metrics.sort_unstable();
        metrics.dedup();
        assert_eq!(metrics.len(), METRICS.len(), "a metric is listed twice");
        let mut keys: Vec<_> = METRICS.iter().filter_map(|m| m.readyz).collect();
        let n = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), n, "two metrics share a /readyz key");
    }

    #[test]
    fn names_follow_the_specification() {
        let cases = [
            (
                "flowtel.flow.bytes",
                "By",
                Instrument::Counter,
                "flowtel_flow_bytes_total",
            ),
            (
                "flowtel.flow.packets",
                "{packet}",
                Instrument::Counter,
                "flowtel_flow_packets_total",
            ),
            (
                "flowtel.tcp.rtt",
                "s",
                Instrument::Histogram,
                "flowtel_tcp_rtt_seconds",
            ),
            (
                "flowtel.flows.tracked",
                "{flow}",
                Instrument::Gauge,
                "flowtel_flows_tracked",
            ),
            (
                "flowtel.source.byte_counters",
                "1",
                Instrument::Gauge,
                "flowtel_source_byte_counters_ratio",
            ),
            (
                "flowtel.ebpf.overflow.bytes",
                "By",
                Instrument::Counter,
                "flowtel_ebpf_overflow_bytes_total",
            ),
            (
                "a.ratio.counter",
                "1",
                Instrument::Counter,
                "a_ratio_counter_total",
            ),
            (
                "net.io",
                "By/s",
                Instrument::Gauge,
                "net_io_bytes_per_second",
            ),
            (
                "events",
                "{event}/s",
                Instrument::Gauge,
                "events_per_second",
            ),
            (
                "2xx..requests_total",
                "",
                Instrument::Counter,
                "_2xx_requests_total",
            ),
            ("q.depth", "msgs", Instrument::Gauge, "q_depth_msgs"),
        ];
        for (name, unit, kind, want) in cases {
            assert_eq!(
                prometheus_name(name, unit, kind),
                want,
                "{name} [{unit}] {kind:?}"
            );
        }
    }

    #[test]
    fn catalogue_entries_have_their_prometheus_names() {
        assert_eq!(
            ISTIO_REQUEST_DURATION.prometheus_name(),
            "istio_request_duration_milliseconds"
        );
        assert_eq!(
            ISTIO_TCP_SENT.prometheus_name(),
            "istio_tcp_sent_bytes_total"
        );
        assert_eq!(
            FELIX_CLUSTER_POLICIES.prometheus_name(),
            "felix_cluster_policies"
        );
    }
}
