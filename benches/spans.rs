//! Connection spans: what 10 000 connections cost flowtel in user space,
//! from the source's record to compressed `ExportTraceServiceRequest`s.
//!
//! * `flow stage`: 10 000 `SourceEvent::Connection`s applied (sampled at
//!   1, kept) and the interval finished. Baseline in the same run: the
//!   10 000 `SourceEvent::Tcp` close events the same connections already
//!   cost (series and connection-event records).
//! * `encode + gzip`: the interval's 10 000 spans encoded by the traces
//!   exporter (grouped by resource, cut below 3 MiB) and gzipped as the
//!   transport sends them. Baseline: the same connections' close events
//!   as OTLP log records through the logs exporter.
//!
//! Sending is left out (the collector's side of the wire; see
//! `otlp_export` for a local receiver) and so is naming (no Kubernetes
//! cache). Each figure is the median of 15 runs on one thread; "CPU at 10k
//! conn/s" is that time per second, as a share of one core.
//!
//! Run with `cargo bench --bench spans`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use flowtel::export::otlp::transport::{self, OtlpClient, Signal, SignalTransport};
use flowtel::export::otlp::{Compression, Protocol};
use flowtel::export::otlp_logs::OtlpLogsExporter;
use flowtel::export::otlp_traces::OtlpTracesExporter;
use flowtel::export::resource::ResourceConfig;
use flowtel::export::{ExportConfig, ExportContext};
use flowtel::flow::report::IntervalReport;
use flowtel::flow::spans::{Sampler, SpanKeep};
use flowtel::flow::{
    ConnectionEnd, ConnectionOutcome, ConnectionRole, Counters, Endpoint, FlowId, FlowStage,
    FlowsConfig, Nat, SourceEvent, TcpClose, TcpEvent, TcpEventKind, Transport,
};
use flowtel::telemetry::Telemetry;

const CONNECTIONS: usize = 10_000;
const RUNS: usize = 15;

fn id(i: usize) -> FlowId {
    let i = i as u32;
    FlowId {
        transport: Transport::Tcp,
        client: Endpoint::new(
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i % 256))),
            30_000 + (i % 30_000) as u16,
        ),
        server: Endpoint::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 | (i % 64))), 443),
        zone: 0,
    }
}

fn connection(i: usize) -> SourceEvent {
    let now = SystemTime::now();
    SourceEvent::Connection(ConnectionEnd {
        id: id(i),
        nat: Nat::default(),
        role: ConnectionRole::Client,
        isn_client: (i as u32).wrapping_mul(2_654_435_761),
        isn_server: Some((i as u32) ^ 0x5555_5555),
        start: now - Duration::from_millis(20),
        end: now,
        outcome: ConnectionOutcome::Closed(TcpClose::Fin),
        sent: Counters::new(1_500 + i as u64, 12),
        received: Counters::new(40_000 + i as u64, 30),
        retransmits: 0,
        rtt: Some(Duration::from_micros(180)),
    })
}

fn closed(i: usize) -> SourceEvent {
    SourceEvent::Tcp(TcpEvent {
        id: id(i),
        kind: TcpEventKind::Closed {
            cause: TcpClose::Fin,
            duration: Some(Duration::from_millis(20)),
        },
    })
}

fn keep() -> SpanKeep {
    SpanKeep {
        sampler: Sampler::new(1.0),
        max: CONNECTIONS,
    }
}

fn stage(records: usize) -> FlowStage {
    FlowStage::new(
        &FlowsConfig::default(),
        records,
        None,
        &Telemetry::default(),
    )
    .with_spans(Some(keep()))
}

/// The median of `RUNS` timings of `f`.
fn median(mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[RUNS / 2]
}

fn gzip_all(requests: Vec<(Vec<u8>, usize)>) -> (usize, usize) {
    let mut bytes = 0;
    let mut items = 0;
    for (body, n) in requests {
        bytes += transport::compress(Compression::Gzip, body).len();
        items += n;
    }
    (bytes, items)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let _guard = rt.enter();
    let mut export = ExportConfig::default();
    export.otlp.endpoint = "http://127.0.0.1:4318".into();
    export.otlp.protocol = Protocol::HttpProtobuf;
    export.traces.enabled = true;
    export.traces.sampling = 1.0;
    export.traces.rate_limit = 0;
    export.traces.max_spans = CONNECTIONS;
    export.logs.rate_limit = 0;
    export.logs.max_records = CONNECTIONS;
    let resource = ResourceConfig::default();
    let telemetry = Telemetry::default();
    let ctx = ExportContext {
        export: &export,
        resource: &resource,
        interval: Duration::from_secs(10),
        max_series: 100_000,
        telemetry: &telemetry,
    };
    let otlp = &export.otlp;
    let client = |overrides, signal, name| {
        let t = SignalTransport::resolve(otlp, overrides, name).expect("a transport");
        OtlpClient::new(&t, signal, &telemetry).expect("a client")
    };
    let mut traces = OtlpTracesExporter::new(
        &export.traces,
        &ctx,
        client(&otlp.traces, Signal::Traces, "traces"),
    );
    let mut logs =
        OtlpLogsExporter::new(&export.logs, &ctx, client(&otlp.logs, Signal::Logs, "logs"))
            .expect("the logs exporter");

    let spans_events: Vec<SourceEvent> = (0..CONNECTIONS).map(connection).collect();
    let close_events: Vec<SourceEvent> = (0..CONNECTIONS).map(closed).collect();
    let run_stage = |events: &[SourceEvent], records: usize| -> IntervalReport {
        let mut s = stage(records);
        for e in events {
            s.apply(e.clone());
        }
        s.finish()
    };
    let stage_spans = median(|| {
        run_stage(&spans_events, 0);
    });
    let stage_closes = median(|| {
        run_stage(&close_events, CONNECTIONS);
    });
    let report = Arc::new(run_stage(&spans_events, 0));
    assert_eq!(report.spans.len(), CONNECTIONS, "every span kept");
    let log_report = Arc::new(run_stage(&close_events, CONNECTIONS));
    let mut span_out = (0, 0);
    let encode_spans = median(|| span_out = gzip_all(traces.encode(&report.spans)));
    let mut log_out = (0, 0);
    let encode_logs = median(|| log_out = gzip_all(logs.encode(&log_report)));
    assert_eq!(span_out.1, CONNECTIONS, "every span encoded");

    let share = |d: Duration| d.as_secs_f64() * 100.0;
    println!(
        "\n{CONNECTIONS} connections, median of {RUNS} runs (one thread)\n\n\
         | step | spans | baseline: close events | \n| --- | --- | --- |"
    );
    println!(
        "| flow stage | {:.1} ms | {:.1} ms |",
        stage_spans.as_secs_f64() * 1e3,
        stage_closes.as_secs_f64() * 1e3
    );
    println!(
        "| encode + gzip | {:.1} ms ({} items, {} bytes gzipped) | {:.1} ms ({} log records, {} bytes) |",
        encode_spans.as_secs_f64() * 1e3,
        span_out.1,
        span_out.0,
        encode_logs.as_secs_f64() * 1e3,
        log_out.1,
        log_out.0
    );
    let total = stage_spans + encode_spans;
    println!(
        "| spans/s, one core | {:.0} | {:.0} |",
        CONNECTIONS as f64 / total.as_secs_f64(),
        CONNECTIONS as f64 / (stage_closes + encode_logs).as_secs_f64()
    );
    println!(
        "| CPU at 10k conn/s | {:.1} % of a core | {:.1} % of a core |",
        share(total),
        share(stage_closes + encode_logs)
    );
}
