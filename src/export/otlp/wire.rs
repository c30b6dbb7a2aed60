//! OTLP requests encoded straight from flowtel's own types.
//!
//! The OpenTelemetry SDK spent most of an export hashing attribute sets and
//! allocating `KeyValue`s (39,600 data points/s, see README "OTLP export
//! throughput"). flowtel already holds every series once, keyed, so it
//! writes the protobuf itself: attribute lists are encoded once per series
//! and reused, each data point is a copy plus three fixed64s, and requests
//! are cut below `export.otlp.max_request_bytes` so a Collector's 4 MiB gRPC
//! limit never rejects a whole interval.
//!
//! Field numbers are those of opentelemetry-proto v1 (`metrics.proto`,
//! `logs.proto`, `common.proto`); the tests decode the output with the
//! `opentelemetry-proto` crate to check them.

use opentelemetry::{KeyValue, Value};

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;

/// `ExportMetricsServiceRequest.resource_metrics` and
/// `ExportLogsServiceRequest.resource_logs`.
const REQUEST_RESOURCES: u32 = 1;
/// `Resource{Metrics,Logs}.resource` and `.scope_{metrics,logs}`.
const RESOURCE_RESOURCE: u32 = 1;
const RESOURCE_SCOPES: u32 = 2;
/// `Scope{Metrics,Logs}.scope` and `.metrics` / `.log_records`.
const SCOPE_SCOPE: u32 = 1;
const SCOPE_ITEMS: u32 = 2;

/// Attribute fields of the messages flowtel writes.
pub const NUMBER_POINT_ATTRIBUTES: u32 = 7;
pub const HISTOGRAM_POINT_ATTRIBUTES: u32 = 9;
pub const LOG_RECORD_ATTRIBUTES: u32 = 6;
const RESOURCE_ATTRIBUTES: u32 = 1;

/// Bytes a request may need beyond its items: the envelope's tags and
/// lengths, and one metric's header.
const ENVELOPE_SLACK: usize = 512;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn varint_len(v: u64) -> usize {
    // One byte per started group of 7 bits; 0 still takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn tag(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from(field << 3 | wire));
}

fn len_field(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    len_prefix(buf, field, bytes.len());
    buf.extend_from_slice(bytes);
}

fn len_prefix(buf: &mut Vec<u8>, field: u32, len: usize) {
    tag(buf, field, LEN);
    varint(buf, len as u64);
}

fn string_field(buf: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        len_field(buf, field, s.as_bytes());
    }
}

fn fixed64_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    tag(buf, field, FIXED64);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    tag(buf, field, VARINT);
    varint(buf, v);
}

/// A nested message written in place: the body goes after a one-byte length
/// that is widened afterwards when the body turned out longer.
fn nested(buf: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    tag(buf, field, LEN);
    let at = buf.len();
    buf.push(0);
    body(buf);
    let len = buf.len() - at - 1;
    let width = varint_len(len as u64);
    if width > 1 {
        buf.splice(at + 1..at + 1, std::iter::repeat_n(0, width - 1));
    }
    let mut prefix = Vec::with_capacity(width);
    varint(&mut prefix, len as u64);
    buf[at..at + width].copy_from_slice(&prefix);
}

/// An `AnyValue` holding a string, integer, double or boolean.
#[derive(Debug, Clone, Copy)]
pub enum Any<'a> {
    Str(&'a str),
    Int(i64),
    Double(f64),
    Bool(bool),
}

impl Any<'_> {
    fn write(self, buf: &mut Vec<u8>) {
        match self {
            Any::Str(s) => len_field(buf, 1, s.as_bytes()),
            Any::Bool(b) => varint_field(buf, 2, u64::from(b)),
            Any::Int(i) => varint_field(buf, 3, i as u64),
            Any::Double(d) => fixed64_field(buf, 4, d.to_bits()),
        }
    }
}

/// Appends one `KeyValue` as repeated field `field` of the enclosing
/// message.
pub fn attribute(buf: &mut Vec<u8>, field: u32, key: &str, value: Any<'_>) {
    nested(buf, field, |b| {
        len_field(b, 1, key.as_bytes());
        nested(b, 2, |v| value.write(v));
    });
}

/// Appends an OpenTelemetry API attribute; arrays (which flowtel does not
/// produce) are written as their text.
pub fn api_attribute(buf: &mut Vec<u8>, field: u32, kv: &KeyValue) {
    let text;
    let value = match &kv.value {
        Value::Bool(b) => Any::Bool(*b),
        Value::I64(i) => Any::Int(*i),
        Value::F64(f) => Any::Double(*f),
        Value::String(s) => Any::Str(s.as_str()),
        other => {
            text = other.as_str();
            Any::Str(&text)
        }
    };
    attribute(buf, field, kv.key.as_str(), value);
}

/// A whole attribute list, encoded once and copied into every data point
/// of its series.
pub fn attributes(field: u32, attrs: &[KeyValue]) -> Box<[u8]> {
    let mut buf = Vec::with_capacity(attrs.len() * 40);
    for kv in attrs {
        api_attribute(&mut buf, field, kv);
    }
    buf.into_boxed_slice()
}

/// What a metric is: its data field and the fields after the points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A monotonic `Sum` with this aggregation temporality.
    Counter(Temporality),
    /// An integer `Gauge`.
    Gauge,
    /// An explicit-bucket `Histogram`.
    Histogram(Temporality),
}

/// `AggregationTemporality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temporality {
    Delta = 1,
    Cumulative = 2,
}

/// A metric's name, unit, description and kind.
#[derive(Debug, Clone, Copy)]
pub struct MetricHeader {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub kind: Kind,
}

/// Appends an integer `NumberDataPoint` (as repeated field 1 of its `Sum`
/// or `Gauge`).
/// `attrs` are encoded attribute lists, written one after the other (a
/// series' own, then a per-metric extra).
pub fn number_point(buf: &mut Vec<u8>, attrs: &[&[u8]], start: u64, time: u64, value: u64) {
    let len = attrs.iter().map(|a| a.len()).sum::<usize>() + 27;
    len_prefix(buf, 1, len);
    for a in attrs {
        buf.extend_from_slice(a);
    }
    fixed64_field(buf, 2, start);
    fixed64_field(buf, 3, time);
    // as_int, sfixed64: counts above i64::MAX do not happen.
    fixed64_field(buf, 6, value.min(i64::MAX as u64));
}

/// Appends a double `NumberDataPoint`: scraped Prometheus values are
/// floats, and a gauge such as Felix's may be fractional.
pub fn double_point(buf: &mut Vec<u8>, attrs: &[u8], start: u64, time: u64, value: f64) {
    len_prefix(buf, 1, attrs.len() + 27);
    buf.extend_from_slice(attrs);
    fixed64_field(buf, 2, start);
    fixed64_field(buf, 3, time);
    // as_double.
    fixed64_field(buf, 4, value.to_bits());
}

/// Appends an explicit-bucket `HistogramDataPoint`; `counts` has one more
/// entry than `bounds`.
pub fn histogram_point(
    buf: &mut Vec<u8>,
    attrs: &[u8],
    (start, time): (u64, u64),
    counts: &[u64],
    sum: f64,
    bounds: &[f64],
) {
    nested(buf, 1, |b| {
        b.extend_from_slice(attrs);
        fixed64_field(b, 2, start);
        fixed64_field(b, 3, time);
        fixed64_field(b, 4, counts.iter().sum());
        fixed64_field(b, 5, sum.to_bits());
        len_prefix(b, 6, counts.len() * 8);
        for c in counts {
            b.extend_from_slice(&c.to_le_bytes());
        }
        len_prefix(b, 7, bounds.len() * 8);
        for x in bounds {
            b.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    });
}

/// The resource and scope every request of one signal repeats.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `Resource`, encoded (field 1 of `Resource{Metrics,Logs}`).
    resource: Vec<u8>,
    /// `InstrumentationScope`, encoded (field 1 of `Scope{Metrics,Logs}`).
    scope: Vec<u8>,
}

impl Envelope {
    pub fn new(resource: &[KeyValue], scope_name: &str, scope_version: &str) -> Self {
        let mut r = Vec::new();
        nested(&mut r, RESOURCE_RESOURCE, |b| {
            for kv in resource {
                api_attribute(b, RESOURCE_ATTRIBUTES, kv);
            }
        });
        let mut s = Vec::new();
        nested(&mut s, SCOPE_SCOPE, |b| {
            string_field(b, 1, scope_name);
            string_field(b, 2, scope_version);
        });
        Self {
            resource: r,
            scope: s,
        }
    }
}

/// Builds the requests of one export: items (metrics, or log records) go in
/// until the next would pass the size limit, then a new request starts with
/// the same resource and scope. A metric with more points than fit is split
/// across requests under the same name.
#[derive(Debug)]
pub struct Batcher {
    envelope: Envelope,
    limit: usize,
    requests: Vec<Vec<u8>>,
    /// Finished items of the request being filled, each with its tag.
    items: Vec<u8>,
    /// The metric being filled, and its points so far.
    metric: Option<MetricHeader>,
    points: Vec<u8>,
    /// Items added with [`Self::item`] to the request being filled, and to
    /// each finished request.
    counted: usize,
    counts: Vec<usize>,
}

impl Batcher {
    /// `limit` is the encoded size a request should stay below; an item
    /// larger than that on its own still goes, alone.
    pub fn new(envelope: &Envelope, limit: usize) -> Self {
        Self {
            envelope: envelope.clone(),
            limit: limit
                .saturating_sub(envelope.resource.len() + envelope.scope.len())
                .saturating_sub(ENVELOPE_SLACK)
                .max(1),
            requests: Vec::new(),
            items: Vec::new(),
            metric: None,
            points: Vec::new(),
            counted: 0,
            counts: Vec::new(),
        }
    }

    fn filled(&self) -> usize {
        self.items.len() + self.points.len()
    }

    /// Starts a metric; its points follow through [`Self::points`].
    pub fn begin_metric(&mut self, header: MetricHeader) {
        self.end_metric();
        self.metric = Some(header);
    }

    /// The buffer the next point of the current metric is appended to; it
    /// first cuts the request when `next` more bytes would not fit.
    pub fn points(&mut self, next: usize) -> &mut Vec<u8> {
        if self.filled() > 0 && self.filled() + next > self.limit {
            self.cut();
        }
        &mut self.points
    }

    /// Closes the current metric into the request, if it has points.
    pub fn end_metric(&mut self) {
        if let Some(h) = self.metric {
            if !self.points.is_empty() {
                write_metric(&mut self.items, &h, &self.points);
                self.points.clear();
            }
        }
    }

    /// Adds one encoded item (a `LogRecord`'s fields).
    pub fn item(&mut self, body: &[u8]) {
        self.end_metric();
        self.metric = None;
        if self.filled() > 0 && self.filled() + body.len() + 6 > self.limit {
            self.cut();
        }
        len_field(&mut self.items, SCOPE_ITEMS, body);
        self.counted += 1;
    }

    /// Ends the request being filled; the current metric, if any, goes on
    /// in the next one.
    fn cut(&mut self) {
        self.end_metric();
        if self.items.is_empty() {
            return;
        }
        let e = &self.envelope;
        let scope_len = e.scope.len() + self.items.len();
        let resource_len = e.resource.len() + 1 + varint_len(scope_len as u64) + scope_len;
        let mut request = Vec::with_capacity(resource_len + 8);
        len_prefix(&mut request, REQUEST_RESOURCES, resource_len);
        request.extend_from_slice(&e.resource);
        len_prefix(&mut request, RESOURCE_SCOPES, scope_len);
        request.extend_from_slice(&e.scope);
        request.extend_from_slice(&self.items);
        self.items.clear();
        self.requests.push(request);
        self.counts.push(std::mem::take(&mut self.counted));
    }

    /// The encoded `Export{Metrics,Logs}ServiceRequest`s, in order.
    pub fn finish(self) -> Vec<Vec<u8>> {
        self.finish_counted().into_iter().map(|(r, _)| r).collect()
    }

    /// The requests, each with the number of items ([`Self::item`]) it
    /// holds.
    pub fn finish_counted(mut self) -> Vec<(Vec<u8>, usize)> {
        self.cut();
        self.requests.into_iter().zip(self.counts).collect()
    }
}

/// Bytes of a string field as [`string_field`] writes it.
fn string_field_len(field: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        varint_len(u64::from(field << 3)) + varint_len(s.len() as u64) + s.len()
    }
}

/// Appends a `Metric` (repeated field 2 of `ScopeMetrics`) holding `points`.
/// Lengths are computed first: `points` can be megabytes, and is copied
/// once.
fn write_metric(buf: &mut Vec<u8>, h: &MetricHeader, points: &[u8]) {
    let (field, temporality, monotonic) = match h.kind {
        Kind::Counter(t) => (7, Some(t), true),
        Kind::Gauge => (5, None, false),
        Kind::Histogram(t) => (9, Some(t), false),
    };
    let data_len =
        points.len() + if temporality.is_some() { 2 } else { 0 } + if monotonic { 2 } else { 0 };
    let metric_len = string_field_len(1, h.name)
        + string_field_len(2, h.description)
        + string_field_len(3, h.unit)
        + 1
        + varint_len(data_len as u64)
        + data_len;
    buf.reserve(metric_len + 6);
    len_prefix(buf, SCOPE_ITEMS, metric_len);
    string_field(buf, 1, h.name);
    string_field(buf, 2, h.description);
    string_field(buf, 3, h.unit);
    len_prefix(buf, field, data_len);
    buf.extend_from_slice(points);
    if let Some(t) = temporality {
        varint_field(buf, 2, t as u64);
    }
    if monotonic {
        varint_field(buf, 3, 1);
    }
}

/// The fields of one `LogRecord`, written in order into a reused buffer.
#[derive(Debug, Default)]
pub struct LogRecordWriter {
    buf: Vec<u8>,
    /// Reused for text that is formatted (bodies, addresses), so a record
    /// allocates nothing once the buffers have grown.
    text: String,
}

impl LogRecordWriter {
    /// Starts a record: time, observed time, severity and event name.
    pub fn begin(&mut self, time: u64, observed: u64, severity: (u8, &str), event: &str) {
        self.buf.clear();
        fixed64_field(&mut self.buf, 1, time);
        varint_field(&mut self.buf, 2, u64::from(severity.0));
        string_field(&mut self.buf, 3, severity.1);
        fixed64_field(&mut self.buf, 11, observed);
        string_field(&mut self.buf, 12, event);
    }

    /// The body, formatted into the reused text buffer.
    pub fn body(&mut self, args: std::fmt::Arguments<'_>) {
        let text = self.format(args);
        nested(&mut self.buf, 5, |b| Any::Str(&text).write(b));
        self.text = text;
    }

    /// A string attribute whose value is formatted (an address, ...).
    pub fn display(&mut self, key: &str, value: impl std::fmt::Display) {
        let text = self.format(format_args!("{value}"));
        attribute(&mut self.buf, LOG_RECORD_ATTRIBUTES, key, Any::Str(&text));
        self.text = text;
    }

    fn format(&mut self, args: std::fmt::Arguments<'_>) -> String {
        use std::fmt::Write as _;
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        // Writing into a String cannot fail.
        let _ = text.write_fmt(args);
        text
    }

    pub fn attribute(&mut self, key: &str, value: Any<'_>) {
        attribute(&mut self.buf, LOG_RECORD_ATTRIBUTES, key, value);
    }

    pub fn api_attribute(&mut self, kv: &KeyValue) {
        api_attribute(&mut self.buf, LOG_RECORD_ATTRIBUTES, kv);
    }

    /// The record's encoded fields, for [`Batcher::item`].
    pub fn encoded(&self) -> &[u8] {
        &self.buf
    }
}

/// `Span.attributes`.
const SPAN_ATTRIBUTES: u32 = 9;

/// `Span.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server = 2,
    Client = 3,
}

/// The fields of one `Span` (`trace.proto`), written in order into a
/// reused buffer. Requests of spans have the layout of the other signals
/// (`ResourceSpans` → `ScopeSpans` → `Span`), so [`Batcher`] cuts them.
#[derive(Debug, Default)]
pub struct SpanWriter {
    buf: Vec<u8>,
    text: String,
}

impl SpanWriter {
    /// Starts a span: ids, name, kind and times.
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        &mut self,
        trace: &[u8; 16],
        span: &[u8; 8],
        parent: Option<&[u8; 8]>,
        name: &str,
        kind: SpanKind,
        start: u64,
        end: u64,
    ) {
        self.buf.clear();
        len_field(&mut self.buf, 1, trace);
        len_field(&mut self.buf, 2, span);
        if let Some(p) = parent {
            len_field(&mut self.buf, 4, p);
        }
        string_field(&mut self.buf, 5, name);
        varint_field(&mut self.buf, 6, kind as u64);
        fixed64_field(&mut self.buf, 7, start);
        fixed64_field(&mut self.buf, 8, end);
    }

    pub fn attribute(&mut self, key: &str, value: Any<'_>) {
        attribute(&mut self.buf, SPAN_ATTRIBUTES, key, value);
    }

    /// A string attribute whose value is formatted (an address, ...).
    pub fn display(&mut self, key: &str, value: impl std::fmt::Display) {
        use std::fmt::Write as _;
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        // Writing into a String cannot fail.
        let _ = write!(text, "{value}");
        attribute(&mut self.buf, SPAN_ATTRIBUTES, key, Any::Str(&text));
        self.text = text;
    }

    /// `Status{code: STATUS_CODE_ERROR, message}`.
    pub fn error(&mut self, message: &str) {
        nested(&mut self.buf, 15, |b| {
            string_field(b, 2, message);
            varint_field(b, 3, 2);
        });
    }

    /// The span's encoded fields, for [`Batcher::item`].
    pub fn encoded(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    use prost::Message;

    fn envelope() -> Envelope {
        Envelope::new(
            &[KeyValue::new("service.name", "flowtel")],
            "flowtel",
            "0.1.0",
        )
    }

    const BYTES: MetricHeader = MetricHeader {
        name: "flowtel.flow.bytes",
        unit: "By",
        description: "Bytes",
        kind: Kind::Counter(Temporality::Cumulative),
    };

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn sums_decode_with_the_reference_types() {
        let e = envelope();
        let mut batcher = Batcher::new(&e, 4 << 20);
        batcher.begin_metric(BYTES);
        let attrs = attributes(
            NUMBER_POINT_ATTRIBUTES,
            &[
                KeyValue::new("server.port", 443_i64),
                KeyValue::new("network.transport", "tcp".repeat(100)),
                KeyValue::new("otel.metric.overflow", true),
            ],
        );
        for i in 0..3 {
            number_point(
                batcher.points(attrs.len() + 40),
                &[&attrs],
                10,
                20,
                1_000 + i,
            );
        }
        let requests = batcher.finish();
        assert_eq!(requests.len(), 1);
        let r = ExportMetricsServiceRequest::decode(requests[0].as_slice()).expect("decodes");
        let rm = &r.resource_metrics[0];
        let resource = rm.resource.as_ref().expect("a resource");
        assert_eq!(resource.attributes[0].key, "service.name");
        let sm = &rm.scope_metrics[0];
        let scope = sm.scope.as_ref().expect("a scope");
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("flowtel", "0.1.0")
        );
        let m = &sm.metrics[0];
        assert_eq!(
            (m.name.as_str(), m.unit.as_str()),
            ("flowtel.flow.bytes", "By")
        );
        let Some(metric::Data::Sum(sum)) = &m.data else {
            panic!("not a sum: {m:?}");
        };
        assert!(sum.is_monotonic);
        assert_eq!(sum.aggregation_temporality, 2);
        let values: Vec<_> = sum
            .data_points
            .iter()
            .map(|p| (p.start_time_unix_nano, p.time_unix_nano, p.value))
            .collect();
        assert_eq!(
            values,
            (0..3)
                .map(|i| (10, 20, Some(number_data_point::Value::AsInt(1_000 + i))))
                .collect::<Vec<_>>()
        );
        let a = &sum.data_points[2].attributes;
        let v = |i: usize| a[i].value.as_ref().and_then(|v| v.value.clone());
        assert_eq!(v(0), Some(any_value::Value::IntValue(443)));
        assert_eq!(v(1), Some(any_value::Value::StringValue("tcp".repeat(100))));
        assert_eq!(v(2), Some(any_value::Value::BoolValue(true)));
    }

    #[test]
    fn requests_are_cut_below_the_limit_and_keep_every_point() {
        let e = envelope();
        let limit = 64 << 10;
        let mut batcher = Batcher::new(&e, limit);
        let attrs = attributes(
            NUMBER_POINT_ATTRIBUTES,
            &[KeyValue::new("client.address", "10.0.0.1")],
        );
        for header in [
            BYTES,
            MetricHeader {
                name: "flowtel.flow.packets",
                ..BYTES
            },
        ] {
            batcher.begin_metric(header);
            for i in 0..5_000 {
                number_point(batcher.points(attrs.len() + 40), &[&attrs], 1, 2, i);
            }
        }
        let requests = batcher.finish();
        assert!(requests.len() > 2, "{} requests", requests.len());
        let mut per_metric = std::collections::BTreeMap::new();
        for r in &requests {
            assert!(r.len() <= limit, "{} > {limit}", r.len());
            let r = ExportMetricsServiceRequest::decode(r.as_slice()).expect("decodes");
            for m in &r.resource_metrics[0].scope_metrics[0].metrics {
                let Some(metric::Data::Sum(s)) = &m.data else {
                    panic!("not a sum");
                };
                *per_metric.entry(m.name.clone()).or_insert(0) += s.data_points.len();
            }
        }
        assert_eq!(
            per_metric.into_iter().collect::<Vec<_>>(),
            [
                ("flowtel.flow.bytes".to_string(), 5_000),
                ("flowtel.flow.packets".to_string(), 5_000)
            ]
        );
    }

    #[test]
    fn histograms_and_gauges_decode() {
        let e = envelope();
        let mut batcher = Batcher::new(&e, 4 << 20);
        let attrs = attributes(HISTOGRAM_POINT_ATTRIBUTES, &[KeyValue::new("a", "b")]);
        batcher.begin_metric(MetricHeader {
            name: "flowtel.tcp.rtt",
            unit: "s",
            description: "",
            kind: Kind::Histogram(Temporality::Delta),
        });
        histogram_point(
            batcher.points(200),
            &attrs,
            (1, 2),
            &[1, 0, 3],
            0.5,
            &[0.1, 0.2],
        );
        batcher.begin_metric(MetricHeader {
            name: "flowtel.flows.tracked",
            unit: "{flow}",
            description: "",
            kind: Kind::Gauge,
        });
        number_point(batcher.points(40), &[], 0, 2, 7);
        let requests = batcher.finish();
        let r = ExportMetricsServiceRequest::decode(requests[0].as_slice()).expect("decodes");
        let metrics = &r.resource_metrics[0].scope_metrics[0].metrics;
        let Some(metric::Data::Histogram(h)) = &metrics[0].data else {
            panic!("not a histogram");
        };
        let p = &h.data_points[0];
        assert_eq!(h.aggregation_temporality, 1);
        assert_eq!(
            (p.count, p.sum, p.bucket_counts.as_slice()),
            (4, Some(0.5), &[1, 0, 3][..])
        );
        assert_eq!(p.explicit_bounds, [0.1, 0.2]);
        assert_eq!(p.attributes[0].key, "a");
        let Some(metric::Data::Gauge(g)) = &metrics[1].data else {
            panic!("not a gauge");
        };
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsInt(7))
        );
    }

    #[test]
    fn log_records_decode() {
        let e = envelope();
        let mut batcher = Batcher::new(&e, 4 << 20);
        let mut w = LogRecordWriter::default();
        w.begin(5, 6, (13, "WARN"), "flowtel.connection.failed");
        w.body(format_args!("{}", "x".repeat(300)));
        w.attribute("flow.io.bytes", Any::Int(42));
        w.attribute("flowtel.tcp.rtt", Any::Double(0.25));
        batcher.item(w.encoded());
        let requests = batcher.finish();
        let r = ExportLogsServiceRequest::decode(requests[0].as_slice()).expect("decodes");
        let l = &r.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!((l.time_unix_nano, l.observed_time_unix_nano), (5, 6));
        assert_eq!((l.severity_number, l.severity_text.as_str()), (13, "WARN"));
        assert_eq!(l.event_name, "flowtel.connection.failed");
        let body = l.body.as_ref().and_then(|b| b.value.clone());
        assert_eq!(body, Some(any_value::Value::StringValue("x".repeat(300))));
        let v = |i: usize| l.attributes[i].value.as_ref().and_then(|v| v.value.clone());
        assert_eq!(v(0), Some(any_value::Value::IntValue(42)));
        assert_eq!(v(1), Some(any_value::Value::DoubleValue(0.25)));
    }
}
