//! OTLP log events: flow records, connection events and drop events, for
//! "which connection, when" questions in Loki and similar log stores.
//!
//! Each finished interval is turned into log records, filtered, sampled and
//! rate-limited here, encoded straight into `ExportLogsServiceRequest`s
//! ([`super::otlp::wire`]; the SDK's logger and batch processor
//! managed about 45,000 records/s) and sent with the same transport
//! settings as metrics. Each interval's records leave right after it.
//!
//! Attribute names follow the Collector's netflow receiver where they fit
//! (`source.*`, `destination.*`, `flow.io.*`, `flow.start`, `flow.end`,
//! `flow.sampling_rate`), so queries written for it keep working; the
//! Kubernetes names are those of the metrics. `docs/telemetry.md` lists them.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::attributes;
use super::families::{nanos, SCOPE, SCOPE_VERSION};
use super::otlp::transport::{OtlpClient, Signal, SignalTransport};
use super::otlp::wire::{Any, Batcher, Envelope, LogRecordWriter};
use super::resource;
use super::{Carries, ExportContext, Exporter};
use crate::component::ConfigError;
use crate::flow::mesh::{self, LogEvent};
use crate::flow::names::{EndName, FlowNames};
use crate::flow::records::{ConnectionEvent, FlowRecord};
use crate::flow::report::IntervalReport;
use crate::flow::dns::{qtype_name, rcode_name, DnsLookup, DnsOutcome, DnsRecord};
use crate::flow::{DropRecord, Endpoint, FlowId, Nat, TcpClose, TcpEventKind};
use crate::telemetry::catalogue::*;
use crate::telemetry::Counter;

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
    /// DNS lookups (eBPF source only): `failed` (error RCODEs and
    /// timeouts, `true`), `all` (also the answered ones, sampled and
    /// rate-limited) or `off` (`false`).
    pub dns: DnsLogs,
    /// With `dns: all`, the fraction of answered lookups that get a
    /// `flowtel.dns.lookup` record (failed ones always do).
    pub dns_sampling: f64,
    /// With `dns: all`, `flowtel.dns.lookup` records per second; 0 means
    /// no limit.
    pub dns_rate_limit: u32,
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
            dns: DnsLogs::Failed,
            dns_sampling: 1.0,
            dns_rate_limit: 100,
            sampling: 1.0,
            filter: LogsFilter::default(),
            rate_limit: 500,
            max_records: 10_000,
        }
    }
}

/// Which DNS lookups get log records (`export.logs.dns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsLogs {
    /// None.
    Off,
    /// Failed lookups (`flowtel.dns.failed`).
    Failed,
    /// Failed lookups, and answered ones sampled and rate-limited
    /// (`flowtel.dns.lookup`).
    All,
}

impl<'de> Deserialize<'de> for DnsLogs {
    /// `off`, `failed`, `all`, and the booleans of earlier versions
    /// (`true` is `failed`), also as strings (environment variables).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DnsLogs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`off`, `failed` or `all`")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<DnsLogs, E> {
                Ok(if v { DnsLogs::Failed } else { DnsLogs::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DnsLogs, E> {
                match v {
                    "off" | "false" => Ok(DnsLogs::Off),
                    "failed" | "true" => Ok(DnsLogs::Failed),
                    "all" => Ok(DnsLogs::All),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
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

/// The most records an interval may keep: past it the per-interval vectors
/// alone would take gigabytes.
const MAX_RECORDS_LIMIT: usize = 1_000_000;

impl LogsConfig {
    /// Checks the values serde cannot; keys are relative to `export.logs`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, reason: String| ConfigError::new(key, reason);
        if !(0.0..=1.0).contains(&self.sampling) {
            return Err(err(
                "sampling",
                format!(
                    "{} is not a fraction between 0 and 1, e.g. 0.1 for one flow in ten",
                    self.sampling
                ),
            ));
        }
        if !(0.0..=1.0).contains(&self.dns_sampling) {
            return Err(err(
                "dns_sampling",
                format!(
                    "{} is not a fraction between 0 and 1, e.g. 0.1 for one answered lookup in ten",
                    self.dns_sampling
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

/// Which flows get a record, resolved once from the config.
#[derive(Debug)]
struct Selector {
    flows: bool,
    connections: bool,
    drops: bool,
    dns: DnsLogs,
    /// Answered lookups whose hash is below this get records (`u64::MAX`
    /// with `dns_sampling` 1).
    dns_threshold: u64,
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
    fn new(cfg: &LogsConfig) -> Result<Self, ConfigError> {
        let cidrs = cfg
            .filter
            .cidrs
            .iter()
            .map(|c| parse_cidr(c).map_err(|e| ConfigError::new("export.logs.filter.cidrs", e)))
            .collect::<Result<_, _>>()?;
        let threshold_of = |fraction: f64| {
            if fraction >= 1.0 {
                u64::MAX
            } else {
                (fraction.max(0.0) * u64::MAX as f64) as u64
            }
        };
        let threshold = threshold_of(cfg.sampling);
        Ok(Self {
            flows: cfg.flows,
            connections: cfg.connections,
            drops: cfg.drops,
            dns: cfg.dns,
            dns_threshold: threshold_of(cfg.dns_sampling),
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

    /// An answered lookup is sampled by a hash of its client, id and name:
    /// the same lookup seen on two nodes is sampled on both or neither.
    fn dns_sampled(&self, r: &DnsRecord) -> bool {
        if self.dns_threshold == u64::MAX {
            return true;
        }
        let id = FlowId {
            transport: r.transport,
            client: r.client,
            server: r.server,
            zone: 0,
        };
        let name = r
            .name
            .bytes()
            .fold(u64::from(r.id), |h, b| h.rotate_left(8) ^ u64::from(b));
        mix(flow_hash(&id) ^ name) < self.dns_threshold
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

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A hash of the flow's tuple that is the same in every process and on
/// every node, so a sampled flow is sampled wherever it is seen.
fn flow_hash(id: &FlowId) -> u64 {
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
pub(super) struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: u32, interval: Duration) -> Option<Self> {
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

    pub(super) fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    pub(super) fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// `SeverityNumber` and its text, for the two severities flowtel uses.
type Severity = (u8, &'static str);
const INFO: Severity = (9, "INFO");
const WARN: Severity = (13, "WARN");

/// Ships the log events of each finished interval over OTLP.
pub struct OtlpLogsExporter {
    envelope: Envelope,
    limit: usize,
    max_records: usize,
    client: OtlpClient,
    writer: LogRecordWriter,
    selector: Selector,
    bucket: Option<TokenBucket>,
    rate_limited: Counter,
    /// `export.logs.dns_rate_limit`, for `flowtel.dns.lookup` records.
    dns_bucket: Option<TokenBucket>,
    dns_sampled_out: Counter,
    dns_rate_limited: Counter,
    /// Records in requests that failed after retries.
    dropped: Counter,
}

/// The exporter, when `export.logs.enabled` and an OTLP endpoint for logs
/// is configured; must run inside the tokio runtime (tonic needs it).
pub fn build(
    cfg: &LogsConfig,
    ctx: &ExportContext<'_>,
) -> anyhow::Result<Option<Box<dyn Exporter>>> {
    let otlp = &ctx.export.otlp;
    if !cfg.enabled {
        return Ok(None);
    }
    let Some(transport) = SignalTransport::resolve(otlp, &otlp.logs, "logs") else {
        return Ok(None);
    };
    tracing::info!(endpoint = %transport.url, protocol = ?transport.protocol, "exporting OTLP log events");
    Ok(Some(Box::new(OtlpLogsExporter::new(
        cfg,
        ctx,
        OtlpClient::new(&transport, Signal::Logs, ctx.telemetry)?,
    )?)))
}

impl Exporter for OtlpLogsExporter {
    fn name(&self) -> &'static str {
        "otlp_logs"
    }

    fn carries(&self) -> Carries {
        Carries {
            records: self.max_records,
            dns_lookups: self.selector.dns == DnsLogs::All,
            ..Carries::default()
        }
    }

    fn export<'a>(&'a mut self, reports: &'a [Arc<IntervalReport>]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut requests = Vec::new();
            for r in reports {
                requests.extend(self.encode(r));
            }
            let (bodies, counts): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
            let delivered = self.client.send_all(bodies).await;
            let lost: usize = counts
                .iter()
                .zip(delivered)
                .filter(|(_, ok)| !ok)
                .map(|(n, _)| n)
                .sum();
            self.dropped.add(lost as u64);
        })
    }
}

impl OtlpLogsExporter {
    /// The exporter sending with `client`.
    pub fn new(
        cfg: &LogsConfig,
        ctx: &ExportContext<'_>,
        client: OtlpClient,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            envelope: Envelope::new(&resource::attributes(ctx.resource), SCOPE, SCOPE_VERSION),
            limit: ctx.export.otlp.max_request_bytes,
            max_records: cfg.max_records,
            client,
            writer: LogRecordWriter::default(),
            selector: Selector::new(cfg)?,
            bucket: TokenBucket::new(cfg.rate_limit, ctx.interval),
            rate_limited: ctx.telemetry.counter(&LOGS_RECORDS_RATE_LIMITED),
            dns_bucket: TokenBucket::new(cfg.dns_rate_limit, ctx.interval),
            dns_sampled_out: ctx.telemetry.counter(&LOGS_DNS_SAMPLED_OUT),
            dns_rate_limited: ctx.telemetry.counter(&LOGS_DNS_RATE_LIMITED),
            dropped: ctx.telemetry.counter(&LOGS_RECORDS_DROPPED),
        })
    }

    /// One interval's records, encoded, each request with the records it
    /// holds: drop and connection events first (rarer, and what alerts are
    /// built on), then flow records, then the mesh sources' events.
    pub fn encode(&mut self, report: &IntervalReport) -> Vec<(Vec<u8>, usize)> {
        for b in [&mut self.bucket, &mut self.dns_bucket].into_iter().flatten() {
            b.refill();
        }
        let window = (nanos(report.start), nanos(report.end));
        let observed = nanos(SystemTime::now());
        let mut batch = Batcher::new(&self.envelope, self.limit);
        if self.selector.drops {
            for d in &report.records.drops {
                if self.admit() {
                    let rule = report.records.firewall_rule.as_deref();
                    drop_record(&mut self.writer, d, rule, observed, window);
                    batch.item(self.writer.encoded());
                }
            }
        }
        if self.selector.dns != DnsLogs::Off {
            for f in &report.records.dns {
                let failed = f.record.failed();
                // Answered lookups come only with `all`: sampled, then
                // their own rate limit, each drop counted.
                if !failed && !self.admit_answered(&f.record) {
                    continue;
                }
                if self.admit() {
                    dns_record(&mut self.writer, f, observed);
                    batch.item(self.writer.encoded());
                }
            }
        }
        if self.selector.connections {
            for c in &report.records.connections {
                if is_connection_event(c) && self.admit() {
                    connection_record(&mut self.writer, c, observed);
                    batch.item(self.writer.encoded());
                }
            }
        }
        if self.selector.flows {
            for f in &report.records.flows {
                if self.selector.keeps(f) && self.admit() {
                    let rate = self.selector.sampling_rate;
                    flow_record(&mut self.writer, f, observed, window, rate);
                    batch.item(self.writer.encoded());
                }
            }
        }
        for e in report.mesh.events.iter().chain(&report.anomalies) {
            event_record(&mut self.writer, e, observed);
            batch.item(self.writer.encoded());
        }
        batch.finish_counted()
    }

    /// Whether an answered lookup gets a record: the selector's sampling,
    /// then `dns_rate_limit`; what either drops is counted.
    fn admit_answered(&mut self, r: &DnsRecord) -> bool {
        if self.selector.dns != DnsLogs::All {
            return false;
        }
        if !self.selector.dns_sampled(r) {
            self.dns_sampled_out.inc();
            return false;
        }
        let admitted = self.dns_bucket.as_mut().is_none_or(TokenBucket::take);
        if !admitted {
            self.dns_rate_limited.inc();
        }
        admitted
    }

    /// Takes a token, or counts the record the rate limit drops.
    fn admit(&mut self) -> bool {
        let admitted = self.bucket.as_mut().is_none_or(TokenBucket::take);
        if !admitted {
            self.rate_limited.inc();
        }
        admitted
    }
}

/// A mesh source's event (a Hubble flow): `event.name` as field and
/// attribute, then its own attributes.
fn event_record(w: &mut LogRecordWriter, e: &LogEvent, observed: u64) {
    let severity = match e.severity {
        mesh::Severity::Info => INFO,
        mesh::Severity::Warn => WARN,
    };
    begin(w, e.name, severity, nanos(e.time), observed);
    w.body(format_args!("{}", e.body));
    for (key, value) in &e.attributes {
        let value = match value {
            mesh::Value::Str(s) => Any::Str(s),
            mesh::Value::Int(i) => Any::Int(*i),
            mesh::Value::Bool(b) => Any::Bool(*b),
            mesh::Value::Double(d) => Any::Double(*d),
        };
        w.attribute(key, value);
    }
}

fn begin(w: &mut LogRecordWriter, event: &str, severity: Severity, at: u64, observed: u64) {
    w.begin(at, observed, severity, event);
    // Also as an attribute: Loki and older collectors only see attributes.
    w.attribute(EVENT_NAME, Any::Str(event));
}

fn put_u64(w: &mut LogRecordWriter, key: &str, value: u64) {
    w.attribute(key, Any::Int(i64::try_from(value).unwrap_or(i64::MAX)));
}

fn put_ip(w: &mut LogRecordWriter, key: &str, ip: IpAddr) {
    w.display(key, ip);
}

fn endpoints(w: &mut LogRecordWriter, id: &FlowId) {
    put_ip(w, SOURCE_ADDRESS, id.client.ip);
    if id.transport.has_ports() {
        w.attribute(SOURCE_PORT, Any::Int(id.client.port.into()));
    }
    put_ip(w, DESTINATION_ADDRESS, id.server.ip);
    if id.transport.has_ports() {
        w.attribute(DESTINATION_PORT, Any::Int(id.server.port.into()));
    }
    w.attribute(NETWORK_TRANSPORT, Any::Str(id.transport.as_str()));
    w.attribute(NETWORK_TYPE, Any::Str(network_type(id.client.ip)));
}

fn network_type(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

fn nat(w: &mut LogRecordWriter, nat: &Nat) {
    let mut one = |e: Option<Endpoint>, address: &'static str, port: &'static str| {
        if let Some(e) = e {
            put_ip(w, address, e.ip);
            w.attribute(port, Any::Int(e.port.into()));
        }
    };
    one(nat.server, NAT_SERVER_ADDRESS, NAT_SERVER_PORT);
    one(nat.client, NAT_CLIENT_ADDRESS, NAT_CLIENT_PORT);
}

/// Both ends' names, framed exactly as in the metrics
/// ([`attributes::name_attributes`]).
fn names(w: &mut LogRecordWriter, names: Option<&FlowNames>) {
    let Some(n) = names else {
        return;
    };
    fn named(end: &EndName) -> Option<&EndName> {
        end.is_named().then_some(end)
    }
    let mut attrs = Vec::new();
    attributes::name_attributes(
        n.local,
        named(&n.client),
        named(&n.server),
        !n.settled,
        &mut attrs,
    );
    for kv in &attrs {
        w.api_attribute(kv);
    }
}

fn flow_record(
    w: &mut LogRecordWriter,
    f: &FlowRecord,
    observed: u64,
    (from, to): (u64, u64),
    sampling_rate: i64,
) {
    begin(w, EVENT_FLOW, INFO, from, observed);
    let (up, down) = (f.delta.to_server, f.delta.to_client);
    w.body(format_args!(
        "{} {} → {} {} B → {} B ←{}",
        f.id.transport,
        f.id.client,
        f.id.server,
        up.bytes,
        down.bytes,
        if f.ended { " ended" } else { "" }
    ));
    endpoints(w, &f.id);
    put_u64(w, FLOW_IO_BYTES, up.bytes);
    put_u64(w, FLOW_IO_PACKETS, up.packets);
    put_u64(w, FLOW_REVERSE_BYTES, down.bytes);
    put_u64(w, FLOW_REVERSE_PACKETS, down.packets);
    put_u64(w, FLOW_START, from);
    put_u64(w, FLOW_END, to);
    w.attribute(FLOW_SAMPLING_RATE, Any::Int(sampling_rate));
    w.attribute(FLOW_ENDED, Any::Bool(f.ended));
    w.attribute(SOURCE, Any::Str(f.source.as_str()));
    if let Some(rtt) = f.rtt {
        w.attribute(TCP_RTT_ATTRIBUTE, Any::Double(rtt.as_secs_f64()));
    }
    // The socket tracer either saw the connection (an RTT) or counted
    // retransmits; otherwise the count is unknown, not zero.
    if f.rtt.is_some() || f.retransmits > 0 {
        put_u64(w, TCP_RETRANSMITS_ATTRIBUTE, f.retransmits);
    }
    nat(w, &f.nat);
    names(w, f.names.as_deref());
}

/// Whether `c` is an opened, closed or failed connection: the samples
/// (RTT, retransmits) travel in the flow records instead.
fn is_connection_event(c: &ConnectionEvent) -> bool {
    !matches!(
        c.event.kind,
        TcpEventKind::Retransmits(_) | TcpEventKind::Rtt(_)
    )
}

/// The record of a connection opened, closed or failed.
fn connection_record(w: &mut LogRecordWriter, c: &ConnectionEvent, observed: u64) {
    let (event, severity, detail) = match c.event.kind {
        TcpEventKind::Closed { cause, .. } => (
            EVENT_CLOSED,
            if cause == TcpClose::Fin { INFO } else { WARN },
            Some((TCP_CLOSE_CAUSE, cause.as_str())),
        ),
        TcpEventKind::Failed(why) => (EVENT_FAILED, WARN, Some((TCP_FAILURE, why.as_str()))),
        TcpEventKind::Opened | TcpEventKind::Retransmits(_) | TcpEventKind::Rtt(_) => {
            (EVENT_OPENED, INFO, None)
        }
    };
    begin(w, event, severity, nanos(c.at), observed);
    let id = &c.event.id;
    let what = event.trim_start_matches("flowtel.connection.");
    match detail {
        Some((_, d)) => w.body(format_args!(
            "{} {} → {} {what} ({d})",
            id.transport, id.client, id.server
        )),
        None => w.body(format_args!(
            "{} {} → {} {what}",
            id.transport, id.client, id.server
        )),
    }
    endpoints(w, id);
    w.attribute(SOURCE, Any::Str("ebpf"));
    if let Some((key, value)) = detail {
        w.attribute(key, Any::Str(value));
    }
    if let TcpEventKind::Closed {
        duration: Some(d), ..
    } = c.event.kind
    {
        w.attribute(TCP_DURATION_ATTRIBUTE, Any::Double(d.as_secs_f64()));
    }
    names(w, c.names.as_deref());
}

/// A DNS lookup: who asked what of whom, and how it ended; a failed one
/// is `flowtel.dns.failed` (WARN), an answered one `flowtel.dns.lookup`.
fn dns_record(w: &mut LogRecordWriter, f: &DnsLookup, observed: u64) {
    let r = &f.record;
    if r.failed() {
        begin(w, EVENT_DNS_FAILED, WARN, nanos(f.at), observed);
    } else {
        begin(w, EVENT_DNS_LOOKUP, INFO, nanos(f.at), observed);
    }
    let (rcode, qtype) = (
        match r.outcome {
            DnsOutcome::Answered { rcode, .. } => rcode_name(rcode),
            DnsOutcome::Timeout => "TIMEOUT".into(),
        },
        qtype_name(r.qtype),
    );
    w.body(format_args!(
        "{} {} {}: {rcode} from {} ({})",
        r.name, qtype, r.transport, r.server, r.client
    ));
    w.attribute(DNS_RCODE, Any::Str(&rcode));
    w.attribute(DNS_QUESTION_TYPE, Any::Str(&qtype));
    w.attribute(DNS_QUESTION_NAME, Any::Str(&r.name));
    endpoints(
        w,
        &FlowId {
            transport: r.transport,
            client: r.client,
            server: r.server,
            zone: 0,
        },
    );
    w.attribute(SOURCE, Any::Str("ebpf"));
    names(w, f.names.as_deref());
}

/// A kernel drop event; `rule` names the firewall drop rule that alone
/// moved in the interval, put on `NETFILTER_DROP` drops.
fn drop_record(
    w: &mut LogRecordWriter,
    d: &DropRecord,
    rule: Option<&[(&'static str, String)]>,
    observed: u64,
    (from, to): (u64, u64),
) {
    begin(w, EVENT_DROP, WARN, from, observed);
    let show = |e: Option<Endpoint>| e.map_or_else(|| "?".to_string(), |e| e.to_string());
    w.body(format_args!(
        "{} {} → {} {} packets dropped ({})",
        d.transport,
        show(d.src),
        show(d.dst),
        d.counters.packets,
        d.reason
    ));
    w.attribute(DROP_REASON, Any::Str(d.reason));
    w.attribute(NETWORK_TRANSPORT, Any::Str(d.transport.as_str()));
    let ports = d.transport.has_ports();
    if let Some(src) = d.src {
        w.attribute(NETWORK_TYPE, Any::Str(network_type(src.ip)));
        put_ip(w, SOURCE_ADDRESS, src.ip);
        if ports {
            w.attribute(SOURCE_PORT, Any::Int(src.port.into()));
        }
    }
    if let Some(dst) = d.dst {
        put_ip(w, DESTINATION_ADDRESS, dst.ip);
        if ports {
            w.attribute(DESTINATION_PORT, Any::Int(dst.port.into()));
        }
    }
    put_u64(w, DROP_PACKETS, d.counters.packets);
    put_u64(w, DROP_BYTES, d.counters.bytes);
    put_u64(w, FLOW_START, from);
    put_u64(w, FLOW_END, to);
    w.attribute(SOURCE, Any::Str("ebpf"));
    if d.reason == "NETFILTER_DROP" {
        for (k, v) in rule.into_iter().flatten() {
            w.attribute(k, Any::Str(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Counters, DirectionalCounters, SourceKind, Transport};
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
        assert_eq!(bad(|c| c.sampling = 1.5), "sampling");
        assert_eq!(bad(|c| c.max_records = 0), "max_records");
        assert_eq!(
            bad(|c| c.filter.cidrs = vec!["10.0.0.0/8".into(), "nope".into()]),
            "filter.cidrs[1]"
        );
        assert!(LogsConfig::default().validate().is_ok());
    }
}
