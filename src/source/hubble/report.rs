//! Aggregation of Hubble flows into cumulative counters with a bounded
//! number of series, a bounded queue of recent flows for flow records, and
//! the stream's own health, read by the exporter as one [`HubbleReport`]
//! per interval.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::convert::{rcode_name, Converted, HubbleEnd, HubbleFlow, L7Record};
use crate::flow::mesh::HistogramValue;
use crate::telemetry::catalogue;

/// The keys of a series' source end: namespace, workload kind and name.
const SOURCE_KEYS: [&str; 3] = [
    catalogue::SOURCE_K8S_NAMESPACE,
    catalogue::SOURCE_K8S_WORKLOAD_KIND,
    catalogue::SOURCE_K8S_WORKLOAD,
];
const DESTINATION_KEYS: [&str; 3] = [
    catalogue::DESTINATION_K8S_NAMESPACE,
    catalogue::DESTINATION_K8S_WORKLOAD_KIND,
    catalogue::DESTINATION_K8S_WORKLOAD,
];

/// Upper bounds, in seconds, of the L7 duration histogram: those of the
/// OpenTelemetry HTTP semantic conventions (`http.server.request.duration`),
/// so dashboards built for them work unchanged.
pub const LATENCY_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The HTTP methods kept as they are; any other becomes `_OTHER`, as the
/// semantic conventions ask, because a method is chosen by the client and
/// would otherwise be an unbounded attribute.
const HTTP_METHODS: [&str; 9] = [
    "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE",
];

/// Namespace, workload kind and name of one end of a series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndKey {
    /// Empty when the end is not a pod.
    pub namespace: String,
    /// `Deployment`, ..., `Pod` for a bare pod, `reserved` for Cilium's
    /// reserved identities (`world`, `host`, ...), empty when unknown.
    pub workload_kind: String,
    pub workload: String,
}

impl EndKey {
    fn of(end: &HubbleEnd) -> Self {
        let (kind, name) = end.workload_key();
        Self {
            namespace: end.namespace.clone().unwrap_or_default(),
            workload_kind: kind.to_owned(),
            workload: name.to_owned(),
        }
    }

    /// Its attributes, under the keys of its side: namespace, workload
    /// kind, workload name.
    fn attributes(&self, [namespace, kind, name]: [&str; 3], out: &mut Vec<(String, String)>) {
        if !self.namespace.is_empty() {
            out.push((namespace.to_owned(), self.namespace.clone()));
        }
        if !self.workload_kind.is_empty() {
            out.push((kind.to_owned(), self.workload_kind.clone()));
        }
        out.push((name.to_owned(), self.workload.clone()));
    }
}

/// The attribute set of `flowtel.hubble.flows`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub verdict: &'static str,
    /// Empty unless the verdict is `DROPPED`.
    pub drop_reason: String,
    /// `ingress`, `egress` or `unknown`.
    pub direction: &'static str,
    /// `true`, `false`, or `unknown`.
    pub is_reply: &'static str,
    pub source: EndKey,
    pub destination: EndKey,
}

impl FlowKey {
    fn of(flow: &HubbleFlow) -> Self {
        Self {
            verdict: flow.verdict,
            drop_reason: flow.drop_reason.clone().unwrap_or_default(),
            direction: flow.direction.as_str(),
            is_reply: match flow.is_reply {
                Some(true) => "true",
                Some(false) => "false",
                None => "unknown",
            },
            source: EndKey::of(&flow.source),
            destination: EndKey::of(&flow.destination),
        }
    }

    /// The proposed OTel attributes (see docs/telemetry.md, "Cilium Hubble").
    pub fn attributes(&self) -> Vec<(String, String)> {
        let mut out = vec![
            (
                catalogue::HUBBLE_VERDICT.to_owned(),
                self.verdict.to_owned(),
            ),
            (
                catalogue::HUBBLE_TRAFFIC_DIRECTION.to_owned(),
                self.direction.to_owned(),
            ),
            (
                catalogue::HUBBLE_IS_REPLY.to_owned(),
                self.is_reply.to_owned(),
            ),
        ];
        if !self.drop_reason.is_empty() {
            out.push((
                catalogue::HUBBLE_DROP_REASON.to_owned(),
                self.drop_reason.clone(),
            ));
        }
        self.source.attributes(SOURCE_KEYS, &mut out);
        self.destination.attributes(DESTINATION_KEYS, &mut out);
        out
    }
}

/// The attribute set of `flowtel.hubble.l7.requests` and
/// `flowtel.hubble.l7.duration`. Source and destination are those of the
/// request: a response (which Hubble reports from server to client) is
/// counted under the same ends as its request, so the two join.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct L7Key {
    /// `http`, `dns` or `kafka`.
    pub protocol: &'static str,
    /// `request`, `response`, `sample` or `unknown`.
    pub l7_type: &'static str,
    /// HTTP method (`_OTHER` for non-standard ones), Kafka API key, first
    /// DNS query type; empty when absent.
    pub operation: String,
    /// On responses: HTTP status class (`2xx`..`5xx`), DNS RCODE name
    /// (`NXDOMAIN`), Kafka error code (`0` is success); empty otherwise.
    pub status: String,
    pub source: EndKey,
    pub destination: EndKey,
}

impl L7Key {
    fn of(flow: &HubbleFlow) -> Option<Self> {
        let l7 = flow.l7.as_ref()?;
        let (operation, status) = match &l7.record {
            L7Record::Http(http) => (
                http_method(&http.method).to_owned(),
                http.status_code
                    .map(|c| format!("{}xx", c / 100))
                    .unwrap_or_default(),
            ),
            L7Record::Dns(dns) => (
                dns.qtypes.first().cloned().unwrap_or_default(),
                dns.rcode.map(rcode_name).unwrap_or_default(),
            ),
            L7Record::Kafka(kafka) => (
                kafka.api_key.clone(),
                if l7.l7_type == "response" {
                    kafka.error_code.to_string()
                } else {
                    String::new()
                },
            ),
        };
        let (requester, responder) = if l7.l7_type == "response" {
            (&flow.destination, &flow.source)
        } else {
            (&flow.source, &flow.destination)
        };
        Some(Self {
            protocol: l7.record.protocol(),
            l7_type: l7.l7_type,
            operation,
            status,
            source: EndKey::of(requester),
            destination: EndKey::of(responder),
        })
    }

    /// The proposed OTel attributes (see docs/telemetry.md, "Cilium Hubble").
    pub fn attributes(&self) -> Vec<(String, String)> {
        let mut out = vec![
            (
                catalogue::HUBBLE_L7_PROTOCOL.to_owned(),
                self.protocol.to_owned(),
            ),
            (
                catalogue::HUBBLE_L7_TYPE.to_owned(),
                self.l7_type.to_owned(),
            ),
        ];
        if !self.operation.is_empty() {
            out.push((
                catalogue::HUBBLE_L7_OPERATION.to_owned(),
                self.operation.clone(),
            ));
        }
        if !self.status.is_empty() {
            out.push((catalogue::HUBBLE_L7_STATUS.to_owned(), self.status.clone()));
        }
        self.source.attributes(SOURCE_KEYS, &mut out);
        self.destination.attributes(DESTINATION_KEYS, &mut out);
        out
    }
}

fn http_method(method: &str) -> &str {
    HTTP_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or(if method.is_empty() { "" } else { "_OTHER" })
}

/// One counter series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series<K> {
    pub key: K,
    pub count: u64,
}

/// One histogram series of L7 durations, in seconds, bounds
/// [`LATENCY_BOUNDS`].
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySeries {
    pub key: L7Key,
    pub histogram: HistogramValue,
}

/// How the stream to the agent is doing, cumulative since start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// A GetFlows stream is open now.
    pub connected: bool,
    /// Streams opened, the first included.
    pub connects: u64,
    /// Streams opened after the first.
    pub reconnects: u64,
    /// By kind: `socket_absent`, `connect`, `rpc` (GetFlows refused),
    /// `stream` (error mid-stream), `stream_ended` (the agent closed a
    /// follow stream), `decode` (a message that is not a GetFlowsResponse).
    pub errors: BTreeMap<&'static str, u64>,
    /// Events Hubble reported lost before flowtel could see them, by
    /// `LostEventSource` name (`PERF_EVENT_RING_BUFFER`, ...).
    pub lost_events: BTreeMap<String, u64>,
    /// Flows received and counted.
    pub flows: u64,
    /// Flows received again after a reconnect (replayed with `since`) and
    /// not counted twice.
    pub duplicates: u64,
    /// Counted flows with something malformed, by kind (see
    /// [`Converted::anomalies`]).
    pub malformed: BTreeMap<&'static str, u64>,
}

/// One interval's view of the Hubble source. Counters are cumulative since
/// start; `records` holds the flows received since the previous report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HubbleReport {
    /// `flowtel.hubble.flows`, sorted by key.
    pub flows: Vec<Series<FlowKey>>,
    /// Flows whose key did not fit in the series budget.
    pub flows_overflow: u64,
    /// `flowtel.hubble.l7.requests`, sorted by key.
    pub l7_requests: Vec<Series<L7Key>>,
    pub l7_requests_overflow: u64,
    /// `flowtel.hubble.l7.duration`, sorted by key.
    pub l7_duration: Vec<LatencySeries>,
    /// Durations whose key did not fit in the series budget.
    pub l7_duration_overflow: Option<HistogramValue>,
    pub stream: StreamStats,
    /// Flows for flow records, oldest first.
    pub records: Vec<HubbleFlow>,
    /// Flows dropped from the record queue because it was full
    /// (cumulative).
    pub records_dropped: u64,
}

/// The caps that keep memory bounded whatever the agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Series per metric; the rest is folded into an overflow bucket.
    pub max_series: usize,
    /// Flows kept between two reports for flow records.
    pub max_records: usize,
}

/// Accumulates flows between reports.
#[derive(Debug)]
pub struct Aggregator {
    limits: Limits,
    flows: HashMap<FlowKey, u64>,
    flows_overflow: u64,
    l7: HashMap<L7Key, u64>,
    l7_overflow: u64,
    latency: HashMap<L7Key, HistogramValue>,
    latency_overflow: Option<HistogramValue>,
    records: VecDeque<HubbleFlow>,
    records_dropped: u64,
    stats: StreamStats,
}

impl Aggregator {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            flows: HashMap::new(),
            flows_overflow: 0,
            l7: HashMap::new(),
            l7_overflow: 0,
            latency: HashMap::new(),
            latency_overflow: None,
            records: VecDeque::new(),
            records_dropped: 0,
            stats: StreamStats::default(),
        }
    }

    /// Counts one converted flow and queues it for flow records.
    pub fn record(&mut self, converted: Converted) {
        let Converted { flow, anomalies } = converted;
        self.stats.flows += 1;
        for kind in anomalies {
            *self.stats.malformed.entry(kind).or_default() += 1;
        }
        let max = self.limits.max_series;
        if !bump(&mut self.flows, FlowKey::of(&flow), max) {
            self.flows_overflow += 1;
        }
        if let Some(key) = L7Key::of(&flow) {
            let latency = flow.l7.as_ref().and_then(|l7| l7.latency);
            if let Some(latency) = latency {
                let seconds = latency.as_secs_f64();
                if self.latency.len() < max || self.latency.contains_key(&key) {
                    self.latency
                        .entry(key.clone())
                        .or_insert_with(empty)
                        .observe(seconds);
                } else {
                    self.latency_overflow
                        .get_or_insert_with(empty)
                        .observe(seconds);
                }
            }
            if !bump(&mut self.l7, key, max) {
                self.l7_overflow += 1;
            }
        }
        if self.limits.max_records == 0 {
            self.records_dropped += 1;
            return;
        }
        if self.records.len() >= self.limits.max_records {
            self.records.pop_front();
            self.records_dropped += 1;
        }
        self.records.push_back(flow);
    }

    /// Counts events Hubble says it lost.
    pub fn lost(&mut self, source: &str, count: u64) {
        let entry = self.stats.lost_events.entry(source.to_owned()).or_default();
        *entry = entry.saturating_add(count);
    }

    /// Counts a flow skipped as already counted.
    pub fn duplicate(&mut self) {
        self.stats.duplicates += 1;
    }

    /// Counts an error of the stream by kind.
    pub fn error(&mut self, kind: &'static str) {
        *self.stats.errors.entry(kind).or_default() += 1;
    }

    /// Notes that a stream opened (`true`) or closed (`false`).
    pub fn connected(&mut self, up: bool) {
        if up {
            if self.stats.connects > 0 {
                self.stats.reconnects += 1;
            }
            self.stats.connects += 1;
        }
        self.stats.connected = up;
    }

    /// The cumulative counters, and the queued flows (which it takes).
    pub fn report(&mut self) -> HubbleReport {
        let mut flows: Vec<_> = self
            .flows
            .iter()
            .map(|(key, count)| Series {
                key: key.clone(),
                count: *count,
            })
            .collect();
        flows.sort_by(|a, b| a.key.cmp(&b.key));
        let mut l7_requests: Vec<_> = self
            .l7
            .iter()
            .map(|(key, count)| Series {
                key: key.clone(),
                count: *count,
            })
            .collect();
        l7_requests.sort_by(|a, b| a.key.cmp(&b.key));
        let mut l7_duration: Vec<_> = self
            .latency
            .iter()
            .map(|(key, histogram)| LatencySeries {
                key: key.clone(),
                histogram: histogram.clone(),
            })
            .collect();
        l7_duration.sort_by(|a, b| a.key.cmp(&b.key));
        HubbleReport {
            flows,
            flows_overflow: self.flows_overflow,
            l7_requests,
            l7_requests_overflow: self.l7_overflow,
            l7_duration,
            l7_duration_overflow: self.latency_overflow.clone(),
            stream: self.stats.clone(),
            records: self.records.drain(..).collect(),
            records_dropped: self.records_dropped,
        }
    }
}

/// Adds one to `key`'s count if it exists or there is room for it.
fn bump<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u64>, key: K, max: usize) -> bool {
    if let Some(count) = map.get_mut(&key) {
        *count += 1;
        return true;
    }
    if map.len() >= max {
        return false;
    }
    map.insert(key, 1);
    true
}

fn empty() -> HistogramValue {
    HistogramValue::empty(&LATENCY_BOUNDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_inclusive() {
        let mut h = empty();
        h.observe(0.005);
        h.observe(0.0051);
        h.observe(11.0);
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[14], 1);
        assert_eq!(h.count, 3);
    }

    #[test]
    fn record_queue_drops_the_oldest_and_counts_them() {
        let flow = |uuid: &str| {
            super::super::convert::convert(super::super::proto::Flow {
                uuid: uuid.into(),
                ..Default::default()
            })
        };
        let mut aggregator = Aggregator::new(Limits {
            max_series: 10,
            max_records: 2,
        });
        for uuid in ["a", "b", "c", "d", "e"] {
            aggregator.record(flow(uuid));
        }
        let report = aggregator.report();
        let uuids: Vec<_> = report.records.iter().map(|f| f.uuid.as_str()).collect();
        assert_eq!(uuids, ["d", "e"]);
        assert_eq!(report.records_dropped, 3);
        assert_eq!(report.stream.flows, 5);
        // Counted even without addresses, and the lack of them is counted.
        assert_eq!(report.flows.iter().map(|s| s.count).sum::<u64>(), 5);
        assert_eq!(report.stream.malformed.get("no_ip"), Some(&5));
        let again = aggregator.report();
        assert!(again.records.is_empty());
        assert_eq!(again.records_dropped, 3);
    }

    #[test]
    fn http_methods_are_bounded() {
        assert_eq!(http_method("GET"), "GET");
        assert_eq!(http_method("get"), "_OTHER");
        assert_eq!(http_method("X-EVIL-METHOD"), "_OTHER");
        assert_eq!(http_method(""), "");
    }
}
