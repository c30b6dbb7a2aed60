//! OTLP traces: one span per TCP connection end, `CLIENT` on the node that
//! connected and `SERVER` on the node that accepted, joined into one trace
//! by identifiers both nodes derive from the connection's initial sequence
//! numbers ([`crate::flow::spans`]), with no coordination between them.
//!
//! Each span's resource is the local end (`service.name` = its workload,
//! `service.namespace`, `k8s.*`), as Tempo's and the Collector's service
//! graph expect; the peer is named by `peer.service` (the virtual node when
//! the peer sends no span). Spans are sampled by the flow stage (the same
//! hash on every node), limited here to `rate_limit` per second, encoded
//! straight into `ExportTraceServiceRequest`s and sent with the transport
//! of the other signals.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};

use super::attributes::{local_attributes, peer_attributes};
use super::families::{nanos, SCOPE, SCOPE_VERSION};
use super::otlp::transport::{OtlpClient, Signal, SignalTransport};
use super::otlp::wire::{Any, Batcher, Envelope, SpanKind, SpanWriter};
use super::otlp_logs::TokenBucket;
use super::resource::{self, ResourceConfig};
use super::{Carries, ExportContext, Exporter};
use crate::component::ConfigError;
use crate::flow::names::EndName;
use crate::flow::report::IntervalReport;
use crate::flow::spans::{ConnectionSpan, Sampler, SpanIds, SpanKeep};
use crate::flow::{ConnectionOutcome, ConnectionRole, Endpoint};
use crate::telemetry::catalogue::*;
use crate::telemetry::Counter;

/// The `export.traces` section.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracesConfig {
    /// Send connection spans when an OTLP endpoint for traces is
    /// configured. Off by default: spans grow with the connection rate, not
    /// with the number of series.
    pub enabled: bool,
    /// The fraction of connections that get spans, decided by a hash of
    /// their initial sequence numbers: the same on both ends' nodes.
    pub sampling: f64,
    /// Spans per second; 0 means no limit.
    pub rate_limit: u32,
    /// Sampled spans held per interval; past it they are counted as
    /// dropped.
    pub max_spans: usize,
}

impl Default for TracesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            sampling: 0.1,
            rate_limit: 1_000,
            max_spans: 20_000,
        }
    }
}

/// The most spans an interval may hold (about 300 bytes each).
const MAX_SPANS_LIMIT: usize = 1_000_000;

impl TracesConfig {
    /// Checks the values serde cannot; keys are relative to
    /// `export.traces`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sampling) {
            return Err(ConfigError::new(
                "sampling",
                format!(
                    "{} is not a fraction between 0 and 1, e.g. 0.1 for one connection in ten",
                    self.sampling
                ),
            ));
        }
        if self.max_spans == 0 || self.max_spans > MAX_SPANS_LIMIT {
            return Err(ConfigError::new(
                "max_spans",
                format!("must be between 1 and {MAX_SPANS_LIMIT}"),
            ));
        }
        Ok(())
    }
}

/// Ships the connection spans of each finished interval over OTLP.
pub struct OtlpTracesExporter {
    /// Resource attributes every span's resource starts from (the
    /// configured ones, `k8s.cluster.name`, `host.name`), without
    /// flowtel's own `service.*`.
    base: Vec<KeyValue>,
    limit: usize,
    keep: SpanKeep,
    client: OtlpClient,
    writer: SpanWriter,
    bucket: Option<TokenBucket>,
    rate_limited: Counter,
    /// Spans in requests that failed after retries.
    dropped: Counter,
}

/// The exporter, when `export.traces.enabled` and an OTLP endpoint for
/// traces is configured; must run inside the tokio runtime.
pub fn build(
    cfg: &TracesConfig,
    ctx: &ExportContext<'_>,
) -> anyhow::Result<Option<Box<dyn Exporter>>> {
    let otlp = &ctx.export.otlp;
    if !cfg.enabled {
        return Ok(None);
    }
    let Some(transport) = SignalTransport::resolve(otlp, &otlp.traces, "traces") else {
        return Ok(None);
    };
    tracing::info!(endpoint = %transport.url, protocol = ?transport.protocol, sampling = cfg.sampling, "exporting connection spans");
    Ok(Some(Box::new(OtlpTracesExporter::new(
        cfg,
        ctx,
        OtlpClient::new(&transport, Signal::Traces, ctx.telemetry)?,
    ))))
}

impl Exporter for OtlpTracesExporter {
    fn name(&self) -> &'static str {
        "otlp_traces"
    }

    fn carries(&self) -> Carries {
        Carries {
            spans: Some(self.keep),
            ..Carries::default()
        }
    }

    fn export<'a>(&'a mut self, reports: &'a [Arc<IntervalReport>]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut requests = Vec::new();
            for r in reports {
                requests.extend(self.encode(&r.spans));
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

impl OtlpTracesExporter {
    pub fn new(cfg: &TracesConfig, ctx: &ExportContext<'_>, client: OtlpClient) -> Self {
        Self {
            base: base_resource(ctx.resource),
            limit: ctx.export.otlp.max_request_bytes,
            keep: SpanKeep {
                sampler: Sampler::new(cfg.sampling),
                max: cfg.max_spans,
            },
            client,
            writer: SpanWriter::default(),
            bucket: TokenBucket::new(cfg.rate_limit, ctx.interval),
            rate_limited: ctx.telemetry.counter(&SPANS_RATE_LIMITED),
            dropped: ctx.telemetry.counter(&SPANS_DROPPED),
        }
    }

    /// One interval's spans, encoded, each request with the spans it
    /// holds. Spans are grouped by resource (the local end); the groups'
    /// requests are then packed together below the size limit (encoded
    /// protobuf messages concatenate into their merge).
    pub fn encode(&mut self, spans: &[ConnectionSpan]) -> Vec<(Vec<u8>, usize)> {
        if let Some(b) = &mut self.bucket {
            b.refill();
        }
        // By the local end's names and service: what its resource is made of.
        let mut groups: HashMap<(Option<EndName>, String), Vec<Vec<u8>>> = HashMap::new();
        for s in spans {
            if !self.bucket.as_mut().is_none_or(TokenBucket::take) {
                self.rate_limited.inc();
                continue;
            }
            write_span(&mut self.writer, s);
            let (local, _, local_name, _) = ends(s);
            groups
                .entry((local_name.cloned(), service_of(local_name, &local)))
                .or_default()
                .push(self.writer.encoded().to_vec());
        }
        let mut parts = Vec::new();
        for ((name, service), items) in groups {
            let attrs = span_resource(&self.base, name.as_ref(), service);
            let mut batch = Batcher::new(&Envelope::new(&attrs, SCOPE, SCOPE_VERSION), self.limit);
            for item in &items {
                batch.item(item);
            }
            parts.extend(batch.finish_counted());
        }
        pack(parts, self.limit)
    }
}

/// Concatenates requests while they stay below `limit`.
fn pack(parts: Vec<(Vec<u8>, usize)>, limit: usize) -> Vec<(Vec<u8>, usize)> {
    let mut out: Vec<(Vec<u8>, usize)> = Vec::new();
    for (body, n) in parts {
        match out.last_mut() {
            Some((last, count)) if last.len() + body.len() <= limit => {
                last.extend_from_slice(&body);
                *count += n;
            }
            _ => out.push((body, n)),
        }
    }
    out
}

/// The configured resource without flowtel's own `service.name` and
/// `service.version`: a span's service is its local workload.
fn base_resource(cfg: &ResourceConfig) -> Vec<KeyValue> {
    resource::attributes(cfg)
        .into_iter()
        .filter(|kv| kv.key.as_str() != SERVICE_NAME && kv.key.as_str() != SERVICE_VERSION)
        .collect()
}

/// The local and the peer end of a span's connection.
fn ends(s: &ConnectionSpan) -> (Endpoint, Endpoint, Option<&EndName>, Option<&EndName>) {
    let id = &s.end.id;
    let names = s.names.as_deref();
    match s.end.role {
        ConnectionRole::Client => (
            id.client,
            id.server,
            names.map(|n| &*n.client),
            names.map(|n| &*n.server),
        ),
        ConnectionRole::Server => (
            id.server,
            id.client,
            names.map(|n| &*n.server),
            names.map(|n| &*n.client),
        ),
    }
}

/// What names an end in the service graph: its workload, else its pod,
/// else the Service it was reached by, else its address.
fn service_of(end: Option<&EndName>, address: &Endpoint) -> String {
    end.and_then(|e| {
        e.workload
            .as_ref()
            .or(e.pod.as_ref())
            .or(e.service.as_ref())
    })
    .map_or_else(|| address.ip.to_string(), |n| n.to_string())
}

/// A span's resource: its local end.
fn span_resource(base: &[KeyValue], local: Option<&EndName>, service: String) -> Vec<KeyValue> {
    let mut attrs = base.to_vec();
    attrs.push(KeyValue::new(SERVICE_NAME, service));
    if let Some(end) = local {
        if let Some(ns) = &end.namespace {
            attrs.push(KeyValue::new(SERVICE_NAMESPACE, ns.to_string()));
        }
        local_attributes(end, &mut attrs);
    }
    attrs
}

fn put_u64(w: &mut SpanWriter, key: &str, value: u64) {
    w.attribute(key, Any::Int(i64::try_from(value).unwrap_or(i64::MAX)));
}

/// One span: ids, times, semantic-convention and flowtel attributes, and
/// the status.
fn write_span(w: &mut SpanWriter, s: &ConnectionSpan) {
    let e = &s.end;
    let ids = SpanIds::of(e.isn_client, e.isn_server);
    let (kind, span, parent, name) = match e.role {
        ConnectionRole::Client => (SpanKind::Client, &ids.client, None, "tcp connect"),
        ConnectionRole::Server => (SpanKind::Server, &ids.server, Some(&ids.client), "tcp accept"),
    };
    w.begin(
        &ids.trace,
        span,
        parent,
        name,
        kind,
        nanos(e.start),
        nanos(e.end),
    );
    let (_, peer, _, peer_name) = ends(s);
    w.attribute(NETWORK_TRANSPORT, Any::Str("tcp"));
    w.attribute(
        NETWORK_TYPE,
        Any::Str(if e.id.client.ip.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        }),
    );
    w.display(CLIENT_ADDRESS, e.id.client.ip);
    w.attribute(CLIENT_PORT, Any::Int(e.id.client.port.into()));
    w.display(SERVER_ADDRESS, e.id.server.ip);
    w.attribute(SERVER_PORT, Any::Int(e.id.server.port.into()));
    if let Some(backend) = e.nat.server {
        w.display(NAT_SERVER_ADDRESS, backend.ip);
        w.attribute(NAT_SERVER_PORT, Any::Int(backend.port.into()));
    }
    w.attribute(PEER_SERVICE, Any::Str(&service_of(peer_name, &peer)));
    if let Some(end) = peer_name {
        let mut attrs = Vec::new();
        peer_attributes(end, &mut attrs);
        for kv in &attrs {
            w.display(kv.key.as_str(), &kv.value);
        }
    }
    put_u64(w, SPAN_SENT_BYTES, e.sent.bytes);
    put_u64(w, SPAN_SENT_PACKETS, e.sent.packets);
    put_u64(w, SPAN_RECEIVED_BYTES, e.received.bytes);
    put_u64(w, SPAN_RECEIVED_PACKETS, e.received.packets);
    put_u64(w, TCP_RETRANSMITS_ATTRIBUTE, e.retransmits);
    if let Some(rtt) = e.rtt {
        w.attribute(TCP_RTT_ATTRIBUTE, Any::Double(rtt.as_secs_f64()));
    }
    match e.outcome {
        ConnectionOutcome::Closed(cause) => {
            w.attribute(TCP_CLOSE_CAUSE, Any::Str(cause.as_str()));
            if cause != crate::flow::TcpClose::Fin {
                w.error(&format!("connection closed by {}", cause.as_str()));
            }
        }
        ConnectionOutcome::Failed(why) => {
            w.attribute(TCP_FAILURE, Any::Str(why.as_str()));
            w.error(&format!("connection failed: {}", why.as_str()));
        }
    }
}
