//! OTLP log events: flow records, connection events and drop events, for
//! "which connection, when" questions in Loki and similar log stores.
//!
//! Each finished interval is turned into log records, filtered, sampled and
//! rate-limited here, then handed to the SDK's logger provider, whose tokio
//! batch processor ships them with the OTLP exporter (gRPC or HTTP, with the
//! same transport settings as metrics). One flush follows each interval, so
//! a record leaves at most one interval after its traffic.
//!
//! Attribute names follow the Collector's netflow receiver where they fit
//! (`source.*`, `destination.*`, `flow.io.*`, `flow.start`, `flow.end`,
//! `flow.sampling_rate`), so queries written for it keep working; the
//! Kubernetes names are those of the metrics. `docs/telemetry.md` lists them.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ipnet::IpNet;
use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::log_processor_with_async_runtime::BatchLogProcessor;
use opentelemetry_sdk::logs::{
    BatchConfigBuilder, LogBatch, SdkLogRecord, SdkLogger, SdkLoggerProvider,
};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};

use crate::config::{Config, Protocol};
use crate::enrich::{EndName, FlowNames};
use crate::export::attributes as attr;
use crate::export::resource;
use crate::export::transport::SignalTransport;
use crate::flow::aggregate::{ConnectionEvent, FlowRecord, IntervalReport};
use crate::flow::{DropRecord, Endpoint, FlowId, Nat, TcpClose, TcpEventKind};
use crate::stats::SelfStats;

/// The `export.logs` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Send log events whenever an OTLP endpoint for logs is configured.
    pub enabled: bool,
    /// One flow record per flow and interval.
    pub flows: bool,
    /// TCP connections opened, closed and failed (eBPF source only).
    pub connections: bool,
    /// Packets the kernel dropped, with its reason (eBPF source only).
    pub drops: bool,
    /// The fraction of flows that get flow records, chosen by a hash of the
    /// flow's tuple: a flow is always or never sampled, on every node.
    pub sampling: f64,
    /// Which flows get flow records.
    pub filter: LogsFilter,
    /// Log records per second, all kinds together; 0 means no limit.
    pub rate_limit: u32,
    /// Flow records, and as many connection and drop events, kept per
    /// interval before they are filtered: bounds memory in a flood.
    pub max_records: usize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            flows: true,
            connections: true,
            drops: true,
            sampling: 1.0,
            filter: LogsFilter::default(),
            rate_limit: 500,
            max_records: 10_000,
        }
    }
}

/// Flow-record filters. Every non-empty list must match (a flow matches a
/// list when either of its ends does).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogsFilter {
    /// Kubernetes namespaces.
    pub namespaces: Vec<String>,
    /// Address prefixes, e.g. `10.0.0.0/8`.
    pub cidrs: Vec<String>,
    /// Ports (client or server).
    pub ports: Vec<u16>,
    /// Bytes in both directions during the interval.
    pub min_bytes: u64,
}

/// A problem in `export.logs`, with the key that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsConfigError {
    pub key: String,
    pub reason: String,
}

/// The most records an interval may keep: past it the per-interval vectors
/// alone would take gigabytes.
const MAX_RECORDS_LIMIT: usize = 1_000_000;

impl LogsConfig {
    /// Checks the values serde cannot.
    pub fn validate(&self) -> Result<(), LogsConfigError> {
        let err = |key: &str, reason: String| LogsConfigError {
            key: format!("export.logs.{key}"),
            reason,
        };
        if !(0.0..=1.0).contains(&self.sampling) {
            return Err(err(
                "sampling",
                format!(
                    "{} is not a fraction between 0 and 1, e.g. 0.1 for one flow in ten",
                    self.sampling
                ),
            ));
        }
        if self.max_records == 0 || self.max_records > MAX_RECORDS_LIMIT {
            return Err(err(
                "max_records",
                format!("must be between 1 and {MAX_RECORDS_LIMIT}"),
            ));
        }
        for (i, cidr) in self.filter.cidrs.iter().enumerate() {
            parse_cidr(cidr).map_err(|e| err(&format!("filter.cidrs[{i}]"), e))?;
        }
        Ok(())
    }
}

fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not an address prefix, e.g. \"10.0.0.0/8\""))
}

/// The OTLP `event.name` of each kind of record.
pub const EVENT_FLOW: &str = "flowtel.flow";
pub const EVENT_OPENED: &str = "flowtel.connection.opened";
pub const EVENT_CLOSED: &str = "flowtel.connection.closed";
pub const EVENT_FAILED: &str = "flowtel.connection.failed";
pub const EVENT_DROP: &str = "flowtel.packet.dropped";

const EVENT_NAME: &str = "event.name";
const SOURCE_ADDRESS: &str = "source.address";
const SOURCE_PORT: &str = "source.port";
const DESTINATION_ADDRESS: &str = "destination.address";
const DESTINATION_PORT: &str = "destination.port";
const FLOW_IO_BYTES: &str = "flow.io.bytes";
const FLOW_IO_PACKETS: &str = "flow.io.packets";
const FLOW_START: &str = "flow.start";
const FLOW_END: &str = "flow.end";
const FLOW_SAMPLING_RATE: &str = "flow.sampling_rate";
const REVERSE_BYTES: &str = "flowtel.flow.reverse.io.bytes";
const REVERSE_PACKETS: &str = "flowtel.flow.reverse.io.packets";
const FLOW_ENDED: &str = "flowtel.flow.ended";
const TCP_RTT: &str = "flowtel.tcp.rtt";
const TCP_RETRANSMITS: &str = "flowtel.tcp.retransmits";
const TCP_DURATION: &str = "flowtel.tcp.connection.duration";
const DROP_PACKETS: &str = "flowtel.drop.packets";
const DROP_BYTES: &str = "flowtel.drop.bytes";

/// Which flows get a record, resolved once from the config.
#[derive(Debug)]
struct Selector {
    flows: bool,
    connections: bool,
    drops: bool,
    /// Flows whose hash is below this are sampled (`u64::MAX` with
    /// sampling 1, where every flow is).
    threshold: u64,
    sampling_rate: i64,
    namespaces: Vec<String>,
    cidrs: Vec<IpNet>,
    ports: Vec<u16>,
    min_bytes: u64,
}

impl Selector {
    fn new(cfg: &LogsConfig) -> anyhow::Result<Self> {
        let cidrs = cfg
            .filter
            .cidrs
            .iter()
            .map(|c| parse_cidr(c).map_err(|e| anyhow::anyhow!("export.logs.filter.cidrs: {e}")))
            .collect::<anyhow::Result<_>>()?;
        let threshold = if cfg.sampling >= 1.0 {
            u64::MAX
        } else {
            (cfg.sampling.max(0.0) * u64::MAX as f64) as u64
        };
        Ok(Self {
            flows: cfg.flows,
            connections: cfg.connections,
            drops: cfg.drops,
            threshold,
            sampling_rate: if cfg.sampling > 0.0 {
                (1.0 / cfg.sampling).round() as i64
            } else {
                0
            },
            namespaces: cfg.filter.namespaces.clone(),
            cidrs,
            ports: cfg.filter.ports.clone(),
            min_bytes: cfg.filter.min_bytes,
        })
    }

    fn sampled(&self, id: &FlowId) -> bool {
        self.threshold == u64::MAX || flow_hash(id) < self.threshold
    }

    fn keeps(&self, r: &FlowRecord) -> bool {
        if r.delta.total().bytes < self.min_bytes || !self.sampled(&r.id) {
            return false;
        }
        if !self.ports.is_empty()
            && !self.ports.contains(&r.id.client.port)
            && !self.ports.contains(&r.id.server.port)
        {
            return false;
        }
        if !self.cidrs.is_empty() {
            let addresses = [
                Some(r.id.client),
                Some(r.id.server),
                r.nat.server,
                r.nat.client,
            ];
            let inside = addresses
                .iter()
                .flatten()
                .any(|e| self.cidrs.iter().any(|c| c.contains(&e.ip)));
            if !inside {
                return false;
            }
        }
        if !self.namespaces.is_empty() {
            let Some(names) = &r.names else {
                return false;
            };
            let inside = [&names.client, &names.server].iter().any(|end| {
                end.namespace
                    .as_deref()
                    .is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
            });
            if !inside {
                return false;
            }
        }
        true
    }
}

/// A hash of the flow's tuple that is the same in every process and on
/// every node, so a sampled flow is sampled wherever it is seen.
fn flow_hash(id: &FlowId) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let bits = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let (c, s) = (bits(id.client.ip), bits(id.server.ip));
    let ports = (u64::from(id.client.port) << 16) | u64::from(id.server.port);
    [
        c as u64,
        (c >> 64) as u64,
        s as u64,
        (s >> 64) as u64,
        ports | (u64::from(id.transport.protocol()) << 32),
    ]
    .into_iter()
    .fold(0x9e37_79b9_7f4a_7c15, |h, w| mix(h ^ w))
}

/// Records per second with a burst of one interval's worth: records are
/// emitted once per interval, so a smaller bucket would cap the rate below
/// what is configured.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, interval: Duration) -> Option<Self> {
        (rate > 0).then(|| {
            let rate = f64::from(rate);
            let capacity = rate * interval.as_secs_f64().max(1.0);
            Self {
                rate,
                capacity,
                tokens: capacity,
                last: Instant::now(),
            }
        })
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Ships the log events of each finished interval over OTLP.
pub struct OtlpLogsExporter {
    provider: SdkLoggerProvider,
    logger: SdkLogger,
    selector: Selector,
    bucket: Option<TokenBucket>,
    stats: Arc<SelfStats>,
}

impl OtlpLogsExporter {
    /// Builds the exporter; must run inside the tokio runtime (the batch
    /// processor's task and tonic need it).
    pub fn build(
        cfg: &Config,
        transport: &SignalTransport,
        stats: Arc<SelfStats>,
    ) -> anyhow::Result<Self> {
        let exporter = match transport.protocol {
            Protocol::Grpc => transport
                .apply_tonic(opentelemetry_otlp::LogExporter::builder().with_tonic())?
                .build(),
            Protocol::HttpProtobuf => transport
                .apply_http(opentelemetry_otlp::LogExporter::builder().with_http())?
                .build(),
        }
        .with_context(|| format!("building the OTLP logs exporter for {}", transport.url))?;
        let logs = &cfg.export.logs;
        let attempts = cfg.export.otlp.retry.max_attempts;
        let export_budget = (transport.timeout + cfg.export.otlp.retry.max_backoff) * attempts
            + Duration::from_secs(1);
        // The queue holds a whole interval, so nothing the rate limit let
        // through is dropped before the flush that follows it.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(logs.max_records.saturating_mul(3).saturating_add(16))
            .with_max_export_batch_size(2048)
            .with_scheduled_delay(cfg.interval)
            .with_max_export_timeout(export_budget)
            .build();
        let processor = BatchLogProcessor::builder(
            CountingExporter {
                inner: exporter,
                stats: stats.clone(),
                failing: AtomicBool::new(false),
                url: transport.url.clone(),
            },
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_batch_config(batch)
        .build();
        let provider = SdkLoggerProvider::builder()
            .with_resource(resource::build(&cfg.resource))
            .with_log_processor(processor)
            .build();
        Ok(Self {
            logger: provider.logger("flowtel"),
            provider,
            selector: Selector::new(logs)?,
            bucket: TokenBucket::new(logs.rate_limit, cfg.interval),
            stats,
        })
    }

    /// Emits the records of a finished interval and exports them now.
    pub async fn export(&mut self, report: &IntervalReport) {
        self.emit(report);
        let provider = self.provider.clone();
        // force_flush blocks until the batch processor has exported.
        let flushed = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        if let Ok(Err(e)) = flushed {
            tracing::debug!("logs flush: {e}");
        }
    }

    /// Exports what is left and releases the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!("logs exporter shutdown: {e}");
        }
    }

    /// Hands the interval's records to the batch processor: drop and
    /// connection events first (rarer, and what alerts are built on), then
    /// flow records. Returns how many were emitted.
    pub fn emit(&mut self, report: &IntervalReport) -> usize {
        if let Some(b) = &mut self.bucket {
            b.refill();
        }
        let window = (nanos(report.start), nanos(report.end));
        let mut emitted = 0;
        if self.selector.drops {
            for d in &report.records.drops {
                if self.admit() {
                    self.logger
                        .emit(drop_record(&self.logger, d, report.start, window));
                    emitted += 1;
                }
            }
        }
        if self.selector.connections {
            for c in &report.records.connections {
                if let Some(record) = connection_record(&self.logger, c) {
                    if self.admit() {
                        self.logger.emit(record);
                        emitted += 1;
                    }
                }
            }
        }
        if self.selector.flows {
            for f in &report.records.flows {
                if self.selector.keeps(f) && self.admit() {
                    let rate = self.selector.sampling_rate;
                    self.logger
                        .emit(flow_record(&self.logger, f, report.start, window, rate));
                    emitted += 1;
                }
            }
        }
        emitted
    }

    /// Takes a token, or counts the record the rate limit drops.
    fn admit(&mut self) -> bool {
        let admitted = self.bucket.as_mut().is_none_or(TokenBucket::take);
        if !admitted {
            SelfStats::inc(&self.stats.log_records_rate_limited);
        }
        admitted
    }
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn new_record(
    logger: &SdkLogger,
    event: &'static str,
    severity: Severity,
    at: SystemTime,
) -> SdkLogRecord {
    let mut r = logger.create_log_record();
    r.set_timestamp(at);
    r.set_observed_timestamp(SystemTime::now());
    r.set_severity_number(severity);
    r.set_severity_text(severity.name());
    r.set_event_name(event);
    // Also as an attribute: Loki and older collectors only see attributes.
    r.add_attribute(Key::from_static_str(EVENT_NAME), event);
    r
}

fn put(r: &mut SdkLogRecord, key: &'static str, value: impl Into<AnyValue>) {
    r.add_attribute(Key::from_static_str(key), value);
}

fn put_u64(r: &mut SdkLogRecord, key: &'static str, value: u64) {
    put(r, key, i64::try_from(value).unwrap_or(i64::MAX));
}

fn endpoints(r: &mut SdkLogRecord, id: &FlowId) {
    put(r, SOURCE_ADDRESS, id.client.ip.to_string());
    if id.transport.has_ports() {
        put(r, SOURCE_PORT, id.client.port);
    }
    put(r, DESTINATION_ADDRESS, id.server.ip.to_string());
    if id.transport.has_ports() {
        put(r, DESTINATION_PORT, id.server.port);
    }
    put(r, attr::NETWORK_TRANSPORT, id.transport.as_str());
    put(r, attr::NETWORK_TYPE, network_type(id.client.ip));
}

fn network_type(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

fn nat(r: &mut SdkLogRecord, nat: &Nat) {
    let mut one = |e: Option<Endpoint>, address: &'static str, port: &'static str| {
        if let Some(e) = e {
            put(r, address, e.ip.to_string());
            put(r, port, e.port);
        }
    };
    one(nat.server, attr::NAT_SERVER_ADDRESS, attr::NAT_SERVER_PORT);
    one(nat.client, attr::NAT_CLIENT_ADDRESS, attr::NAT_CLIENT_PORT);
}

/// Both ends' names, framed exactly as in the metrics
/// ([`attr::name_attributes`]).
fn names(r: &mut SdkLogRecord, names: Option<&FlowNames>) {
    let Some(n) = names else {
        return;
    };
    fn named(end: &EndName) -> Option<&EndName> {
        end.is_named().then_some(end)
    }
    let mut attrs = Vec::new();
    attr::name_attributes(
        n.local,
        named(&n.client),
        named(&n.server),
        !n.settled,
        &mut attrs,
    );
    for kv in attrs {
        let value = match kv.value {
            Value::Bool(b) => AnyValue::Boolean(b),
            Value::I64(i) => AnyValue::Int(i),
            Value::F64(f) => AnyValue::Double(f),
            other => AnyValue::String(other.as_str().into_owned().into()),
        };
        r.add_attribute(kv.key, value);
    }
}

fn flow_record(
    logger: &SdkLogger,
    f: &FlowRecord,
    start: SystemTime,
    (from, to): (i64, i64),
    sampling_rate: i64,
) -> SdkLogRecord {
    let mut r = new_record(logger, EVENT_FLOW, Severity::Info, start);
    let (up, down) = (f.delta.to_server, f.delta.to_client);
    r.set_body(AnyValue::String(
        format!(
            "{} {} → {} {} B → {} B ←{}",
            f.id.transport,
            f.id.client,
            f.id.server,
            up.bytes,
            down.bytes,
            if f.ended { " ended" } else { "" }
        )
        .into(),
    ));
    endpoints(&mut r, &f.id);
    put_u64(&mut r, FLOW_IO_BYTES, up.bytes);
    put_u64(&mut r, FLOW_IO_PACKETS, up.packets);
    put_u64(&mut r, REVERSE_BYTES, down.bytes);
    put_u64(&mut r, REVERSE_PACKETS, down.packets);
    put(&mut r, FLOW_START, from);
    put(&mut r, FLOW_END, to);
    put(&mut r, FLOW_SAMPLING_RATE, sampling_rate);
    put(&mut r, FLOW_ENDED, f.ended);
    put(&mut r, attr::SOURCE, f.source.as_str());
    if let Some(rtt) = f.rtt {
        put(&mut r, TCP_RTT, rtt.as_secs_f64());
    }
    // The socket tracer either saw the connection (an RTT) or counted
    // retransmits; otherwise the count is unknown, not zero.
    if f.rtt.is_some() || f.retransmits > 0 {
        put_u64(&mut r, TCP_RETRANSMITS, f.retransmits);
    }
    nat(&mut r, &f.nat);
    names(&mut r, f.names.as_deref());
    r
}

/// The record of a connection opened, closed or failed; `None` for the
/// samples (RTT, retransmits) that the flow records carry instead.
fn connection_record(logger: &SdkLogger, c: &ConnectionEvent) -> Option<SdkLogRecord> {
    let (event, severity, detail) = match c.event.kind {
        TcpEventKind::Opened => (EVENT_OPENED, Severity::Info, None),
        TcpEventKind::Closed { cause, .. } => (
            EVENT_CLOSED,
            if cause == TcpClose::Fin {
                Severity::Info
            } else {
                Severity::Warn
            },
            Some((attr::TCP_CLOSE_CAUSE, cause.as_str())),
        ),
        TcpEventKind::Failed(why) => (
            EVENT_FAILED,
            Severity::Warn,
            Some((attr::TCP_FAILURE, why.as_str())),
        ),
        TcpEventKind::Retransmits(_) | TcpEventKind::Rtt(_) => return None,
    };
    let mut r = new_record(logger, event, severity, c.at);
    let id = &c.event.id;
    let what = event.trim_start_matches("flowtel.connection.");
    r.set_body(AnyValue::String(
        match detail {
            Some((_, d)) => format!(
                "{} {} → {} {what} ({d})",
                id.transport, id.client, id.server
            ),
            None => format!("{} {} → {} {what}", id.transport, id.client, id.server),
        }
        .into(),
    ));
    endpoints(&mut r, id);
    put(&mut r, attr::SOURCE, "ebpf");
    if let Some((key, value)) = detail {
        put(&mut r, key, value);
    }
    if let TcpEventKind::Closed {
        duration: Some(d), ..
    } = c.event.kind
    {
        put(&mut r, TCP_DURATION, d.as_secs_f64());
    }
    names(&mut r, c.names.as_deref());
    Some(r)
}

fn drop_record(
    logger: &SdkLogger,
    d: &DropRecord,
    start: SystemTime,
    (from, to): (i64, i64),
) -> SdkLogRecord {
    let mut r = new_record(logger, EVENT_DROP, Severity::Warn, start);
    let show = |e: Option<Endpoint>| e.map_or_else(|| "?".to_string(), |e| e.to_string());
    r.set_body(AnyValue::String(
        format!(
            "{} {} → {} {} packets dropped ({})",
            d.transport,
            show(d.src),
            show(d.dst),
            d.counters.packets,
            d.reason
        )
        .into(),
    ));
    put(&mut r, attr::DROP_REASON, d.reason);
    put(&mut r, attr::NETWORK_TRANSPORT, d.transport.as_str());
    let ports = d.transport.has_ports();
    if let Some(src) = d.src {
        put(&mut r, attr::NETWORK_TYPE, network_type(src.ip));
        put(&mut r, SOURCE_ADDRESS, src.ip.to_string());
        if ports {
            put(&mut r, SOURCE_PORT, src.port);
        }
    }
    if let Some(dst) = d.dst {
        put(&mut r, DESTINATION_ADDRESS, dst.ip.to_string());
        if ports {
            put(&mut r, DESTINATION_PORT, dst.port);
        }
    }
    put_u64(&mut r, DROP_PACKETS, d.counters.packets);
    put_u64(&mut r, DROP_BYTES, d.counters.bytes);
    put(&mut r, FLOW_START, from);
    put(&mut r, FLOW_END, to);
    put(&mut r, attr::SOURCE, "ebpf");
    r
}

/// Counts export outcomes and logs a failure streak once, not every batch.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::LogExporter,
    stats: Arc<SelfStats>,
    failing: AtomicBool,
    url: String,
}

impl opentelemetry_sdk::logs::LogExporter for CountingExporter {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                SelfStats::inc(&self.stats.exports_ok);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.url, "OTLP logs export recovered");
                }
            }
            Err(e) => {
                SelfStats::inc(&self.stats.exports_failed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(endpoint = %self.url, "OTLP logs export failed ({e}); those log records are lost");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::aggregate::DirectionalCounters;
    use crate::flow::{Counters, SourceKind, Transport};
    use std::net::Ipv4Addr;

    fn id(port: u16) -> FlowId {
        FlowId {
            transport: Transport::Tcp,
            client: Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), port),
            server: Endpoint::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 443),
            zone: 0,
        }
    }

    fn record(port: u16, bytes: u64) -> FlowRecord {
        FlowRecord {
            id: id(port),
            nat: Nat::default(),
            source: SourceKind::Conntrack,
            names: None,
            delta: DirectionalCounters {
                to_server: Counters::new(bytes, 1),
                to_client: Counters::default(),
            },
            ended: false,
            rtt: None,
            retransmits: 0,
        }
    }

    fn selector(edit: impl FnOnce(&mut LogsConfig)) -> Selector {
        let mut cfg = LogsConfig::default();
        edit(&mut cfg);
        cfg.validate().expect("valid config");
        Selector::new(&cfg).expect("selector")
    }

    #[test]
    fn sampling_is_per_flow_and_close_to_the_fraction() {
        let s = selector(|c| c.sampling = 0.25);
        let kept = (1..=20_000u16).filter(|p| s.sampled(&id(*p))).count();
        assert!((4_500..=5_500).contains(&kept), "{kept} of 20000 at 0.25");
        for p in 1..=100 {
            assert_eq!(s.sampled(&id(p)), s.sampled(&id(p)), "stable");
        }
        assert_eq!(s.sampling_rate, 4);
        let all = selector(|_| {});
        assert!((1..=1000u16).all(|p| all.sampled(&id(p))));
        let none = selector(|c| c.sampling = 0.0);
        assert!((1..=1000u16).all(|p| !none.sampled(&id(p))));
    }

    #[test]
    fn filters_must_all_match() {
        let s = selector(|c| {
            c.filter.cidrs = vec!["192.0.2.0/24".into()];
            c.filter.ports = vec![443];
            c.filter.min_bytes = 100;
        });
        assert!(s.keeps(&record(1000, 100)));
        assert!(!s.keeps(&record(1000, 99)), "min_bytes");
        let outside = selector(|c| c.filter.cidrs = vec!["198.51.100.0/24".into()]);
        assert!(!outside.keeps(&record(1000, 100)), "cidrs");
        let port = selector(|c| c.filter.ports = vec![80]);
        assert!(!port.keeps(&record(1000, 100)), "ports");
        let ns = selector(|c| c.filter.namespaces = vec!["shop".into()]);
        assert!(!ns.keeps(&record(1000, 100)), "no names, no namespace");
    }

    #[test]
    fn token_bucket_allows_one_interval_then_refills() {
        let mut b = TokenBucket::new(10, Duration::from_secs(2)).expect("a limit");
        let taken = (0..100).filter(|_| b.take()).count();
        assert_eq!(taken, 20, "capacity is one interval's worth");
        b.last -= Duration::from_millis(500);
        b.refill();
        assert_eq!((0..100).filter(|_| b.take()).count(), 5);
        assert!(TokenBucket::new(0, Duration::from_secs(1)).is_none());
    }

    #[test]
    fn validation_names_the_key() {
        let bad = |edit: fn(&mut LogsConfig)| {
            let mut c = LogsConfig::default();
            edit(&mut c);
            c.validate().expect_err("invalid").key
        };
        assert_eq!(bad(|c| c.sampling = 1.5), "export.logs.sampling");
        assert_eq!(bad(|c| c.max_records = 0), "export.logs.max_records");
        assert_eq!(
            bad(|c| c.filter.cidrs = vec!["10.0.0.0/8".into(), "nope".into()]),
            "export.logs.filter.cidrs[1]"
        );
        assert!(LogsConfig::default().validate().is_ok());
    }
}
