//! OTLP encode+export throughput, against a local gRPC receiver.
//!
//! * `metrics`: one interval of 20 000 series through `OtlpMetricsExporter`
//!   (`flowtel.flow.bytes` and `flowtel.flow.packets`, both directions:
//!   80 000 flow data points per export); throughput in flow data points.
//! * `logs`: one interval of 20 000 flow records through `OtlpLogsExporter`
//!   (no rate limit); throughput in log records.
//!
//! Each runs with gzip (the default), zstd and without compression, and once
//! encoding only (no network). The exporter
//! side (its runtime, blocking pool and criterion's thread) is pinned to
//! CPU 0 and the receiver to CPU 1, so "thrpt" is what one core exports.
//! The receiver counts what it decoded, and the run fails if that is not
//! everything that was exported.
//!
//! Run with `cargo bench --bench otlp_export` (about five minutes plus the
//! build).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flowtel::export::otlp::transport::{self, OtlpClient, Signal, SignalTransport};
use flowtel::export::otlp::Compression;
use flowtel::export::otlp_logs::OtlpLogsExporter;
use flowtel::export::otlp_metrics::{self, MetricsEncoder};
use flowtel::export::resource::ResourceConfig;
use flowtel::export::{otlp_logs, ExportConfig, ExportContext};
use flowtel::flow::report::IntervalReport;
use flowtel::flow::{
    Counters, Endpoint, FlowId, FlowStage, FlowUpdate, FlowsConfig, Nat, SourceEvent, SourceKind,
    Transport,
};
use flowtel::telemetry::{catalogue, Telemetry};

/// Series per metrics export, and flow records per logs export.
const SERIES: usize = 20_000;
const RECORDS: usize = 20_000;

/// What the receiver decoded.
#[derive(Default)]
struct Counts {
    flow_points: AtomicU64,
    log_records: AtomicU64,
}

// The receiver decodes requests into skeletons of the OTLP messages that
// keep only what it counts (prost skips the other fields), so that decoding
// costs it less than encoding costs flowtel and the bench measures the
// exporter. Field numbers as in opentelemetry-proto v1.

/// `ExportMetricsServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct MetricsRequest {
    #[prost(message, repeated, tag = "1")]
    resources: Vec<ResourceMetrics>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceMetrics {
    #[prost(message, repeated, tag = "2")]
    scopes: Vec<ScopeMetrics>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeMetrics {
    #[prost(message, repeated, tag = "2")]
    metrics: Vec<Metric>,
}

/// A `Metric`: its name and Sum.
#[derive(Clone, PartialEq, prost::Message)]
struct Metric {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "7")]
    sum: Option<Sum>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sum {
    #[prost(message, repeated, tag = "1")]
    points: Vec<Point>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Point {
    #[prost(sfixed64, tag = "6")]
    value: i64,
}

/// `ExportLogsServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct LogsRequest {
    #[prost(message, repeated, tag = "1")]
    resources: Vec<ResourceLogs>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResourceLogs {
    #[prost(message, repeated, tag = "2")]
    scopes: Vec<ScopeLogs>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScopeLogs {
    #[prost(message, repeated, tag = "2")]
    records: Vec<LogRecord>,
}

/// A `LogRecord`: its time.
#[derive(Clone, PartialEq, prost::Message)]
struct LogRecord {
    #[prost(fixed64, tag = "1")]
    time: u64,
}

/// `Export*ServiceResponse` without a partial success.
#[derive(Clone, PartialEq, prost::Message)]
struct Response {}

/// A request the receiver can count.
trait Counted: prost::Message + Default + Send + 'static {
    fn count(&self, counts: &Counts);
}

impl Counted for MetricsRequest {
    fn count(&self, counts: &Counts) {
        let points: usize = self
            .resources
            .iter()
            .flat_map(|r| &r.scopes)
            .flat_map(|s| &s.metrics)
            .filter(|m| m.name.starts_with("flowtel.flow."))
            .map(|m| m.sum.as_ref().map_or(0, |s| s.points.len()))
            .sum();
        counts
            .flow_points
            .fetch_add(points as u64, Ordering::Relaxed);
    }
}

impl Counted for LogsRequest {
    fn count(&self, counts: &Counts) {
        let records: usize = self
            .resources
            .iter()
            .flat_map(|r| &r.scopes)
            .map(|s| s.records.len())
            .sum();
        counts
            .log_records
            .fetch_add(records as u64, Ordering::Relaxed);
    }
}

struct Export<M>(Arc<Counts>, std::marker::PhantomData<M>);

impl<M: Counted> tonic::server::UnaryService<M> for Export<M> {
    type Response = Response;
    type Future = std::future::Ready<Result<tonic::Response<Response>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<M>) -> Self::Future {
        request.into_inner().count(&self.0);
        std::future::ready(Ok(tonic::Response::new(Response {})))
    }
}

type BoxedResponse = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// Decodes one export request with the skeleton codec and counts it.
fn serve<M: Counted, B>(counts: Arc<Counts>, req: http::Request<B>) -> BoxedResponse
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    Box::pin(async move {
        let mut accepted = tonic::codec::EnabledCompressionEncodings::default();
        accepted.enable(tonic::codec::CompressionEncoding::Gzip);
        accepted.enable(tonic::codec::CompressionEncoding::Zstd);
        let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Response, M>::default())
            .apply_compression_config(accepted, Default::default())
            .apply_max_message_size_config(Some(256 << 20), None);
        Ok(grpc
            .unary(Export(counts, std::marker::PhantomData), req)
            .await)
    })
}

/// One OTLP export service, named for tonic's router.
macro_rules! receiver {
    ($name:ident, $path:literal, $request:ty) => {
        #[derive(Clone)]
        struct $name(Arc<Counts>);

        impl tonic::server::NamedService for $name {
            const NAME: &'static str = $path;
        }

        impl<B> tower::Service<http::Request<B>> for $name
        where
            B: http_body::Body + Send + 'static,
            B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
        {
            type Response = http::Response<tonic::body::Body>;
            type Error = std::convert::Infallible;
            type Future = BoxedResponse;

            fn poll_ready(
                &mut self,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Result<(), Self::Error>> {
                std::task::Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: http::Request<B>) -> Self::Future {
                serve::<$request, B>(self.0.clone(), req)
            }
        }
    };
}

receiver!(
    MetricsReceiver,
    "opentelemetry.proto.collector.metrics.v1.MetricsService",
    MetricsRequest
);
receiver!(
    LogsReceiver,
    "opentelemetry.proto.collector.logs.v1.LogsService",
    LogsRequest
);

/// Pins the calling thread to one CPU (best effort: a machine with one CPU
/// keeps both sides on it).
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
    // sched_setaffinity only read and write that set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPU seconds used so far by this process's threads that run on `cpu`
/// only (user and system, from `/proc/self/task/*/stat`): the exporter's
/// side, since it is pinned to CPU 0 and the receiver to CPU 1.
fn cpu_seconds_on(cpu: usize) -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = task.path();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let only_here = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .is_some_and(|list| list.trim() == cpu.to_string());
        if !only_here {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the command name's closing parenthesis; utime and
        // stime are the 14th and 15th of the whole line.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        for i in [11, 12] {
            total += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total as f64 / ticks
}

/// One row of the closing table: what was exported, in how many exports,
/// and the exporter's CPU time over them.
struct Row {
    name: String,
    items: u64,
    exports: u64,
    cpu: f64,
}

fn runtime(cpu: usize, workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .on_thread_start(move || pin(cpu))
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Starts the receiver on CPU 1; returns its address.
fn start_receiver(rt: &tokio::runtime::Runtime, counts: Arc<Counts>) -> SocketAddr {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binding the receiver");
    let addr = listener.local_addr().expect("the receiver's address");
    rt.spawn(
        // Windows as large as a Collector's (grpc-go grows its windows to
        // the bandwidth-delay product); h2's 64 KiB default would make the
        // bench measure flow-control round trips.
        tonic::transport::Server::builder()
            .initial_stream_window_size(Some(16 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .add_service(MetricsReceiver(counts.clone()))
            .add_service(LogsReceiver(counts))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

fn config(endpoint: &str, compression: Compression) -> ExportConfig {
    let mut cfg = ExportConfig::default();
    cfg.otlp.endpoint = endpoint.to_string();
    cfg.otlp.compression = compression;
    cfg.otlp.retry.max_attempts = 1;
    cfg.logs.rate_limit = 0;
    cfg.logs.max_records = RECORDS;
    cfg
}

/// The context the exporters are built with: an hour-long interval, room
/// for `SERIES` series.
fn context<'a>(
    export: &'a ExportConfig,
    resource: &'a ResourceConfig,
    telemetry: &'a Telemetry,
) -> ExportContext<'a> {
    ExportContext {
        export,
        resource,
        interval: Duration::from_secs(3600),
        max_series: SERIES + 2,
        telemetry,
    }
}

fn flow(i: usize) -> FlowId {
    let i = i as u32;
    FlowId {
        transport: if i.is_multiple_of(4) {
            Transport::Udp
        } else {
            Transport::Tcp
        },
        client: Endpoint::new(
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i % 256))),
            40_000 + (i % 20_000) as u16,
        ),
        server: Endpoint::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 | (i / 8))), 443),
        zone: 0,
    }
}

/// The `i`-th flow, first seen with these counters.
fn update(i: usize) -> SourceEvent {
    SourceEvent::Flow(FlowUpdate {
        id: flow(i),
        generation: 0,
        nat: Nat::default(),
        to_server: Counters::new(1_000 + i as u64, 10),
        to_client: Counters::new(50_000 + i as u64, 40),
        ended: i.is_multiple_of(3),
        source: SourceKind::Ebpf,
    })
}

/// One interval of `SERIES` distinct series (client address, server
/// address and port differ).
fn metrics_report() -> Arc<IntervalReport> {
    let flows = FlowsConfig {
        max_series: SERIES + 2,
        series_idle_timeout: Duration::from_secs(3600),
        ..FlowsConfig::default()
    };
    let mut stage = FlowStage::new(&flows, 0, None, &Telemetry::default());
    for i in 0..SERIES {
        stage.apply(update(i));
    }
    let report = stage.finish();
    assert_eq!(report.points.len(), SERIES, "distinct series");
    Arc::new(report)
}

/// One interval of `RECORDS` flow records.
fn logs_report() -> Arc<IntervalReport> {
    let mut stage = FlowStage::new(
        &FlowsConfig::default(),
        RECORDS,
        None,
        &Telemetry::default(),
    );
    for i in 0..RECORDS {
        stage.apply(update(i));
    }
    let mut report = stage.finish();
    report.start = SystemTime::now() - Duration::from_secs(10);
    assert_eq!(report.records.flows.len(), RECORDS, "distinct flows");
    Arc::new(report)
}

/// A logs exporter whose `encode` the bench calls directly.
fn logs_exporter(ctx: &ExportContext<'_>) -> OtlpLogsExporter {
    let otlp = &ctx.export.otlp;
    let transport = SignalTransport::resolve(otlp, &otlp.logs, "logs").expect("a logs transport");
    let client = OtlpClient::new(&transport, Signal::Logs, ctx.telemetry).expect("the logs client");
    OtlpLogsExporter::new(&ctx.export.logs, ctx, client).expect("the logs exporter")
}

fn bench(c: &mut Criterion) {
    pin(0);
    let counts = Arc::new(Counts::default());
    let receiver_rt = runtime(1, 1);
    let addr = start_receiver(&receiver_rt, counts.clone());
    let endpoint = format!("http://{addr}");
    let rt = runtime(0, 1);
    let metrics = metrics_report();
    let logs = logs_report();
    let mut group = c.benchmark_group("otlp_export");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    let mut rows = Vec::new();
    // Encoding alone, no network: what the exporter's own CPU time allows.
    let cfg = config(&endpoint, Compression::None);
    let resource = ResourceConfig::default();
    let telemetry = Telemetry::default();
    let ctx = context(&cfg, &resource, &telemetry);
    let mut encoder = MetricsEncoder::new(&ctx, telemetry.clone());
    let metrics = [metrics];
    group.throughput(Throughput::Elements((SERIES * 4) as u64));
    group.bench_function("metrics_data_points/encode_only", |b| {
        b.iter(|| encoder.encode(&metrics))
    });
    let mut logs_encoder = rt.block_on(async { logs_exporter(&ctx) });
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.bench_function("log_records/encode_only", |b| {
        b.iter(|| logs_encoder.encode(&logs))
    });
    let logs = [logs];
    for (name, compression) in [
        ("gzip", Compression::Gzip),
        ("zstd", Compression::Zstd),
        ("none", Compression::None),
    ] {
        let cfg = config(&endpoint, compression);
        let telemetry = Telemetry::default();
        let ctx = context(&cfg, &resource, &telemetry);
        let mut exporter = rt
            .block_on(async { otlp_metrics::build(&ctx) })
            .expect("the metrics exporter")
            .expect("an OTLP endpoint is set");
        let before = counts.flow_points.load(Ordering::Relaxed);
        let cpu = cpu_seconds_on(0);
        let mut exports = 0u64;
        group.throughput(Throughput::Elements((SERIES * 4) as u64));
        group.bench_function(format!("metrics_data_points/{name}"), |b| {
            b.iter(|| {
                rt.block_on(exporter.export(&metrics));
                exports += 1;
            })
        });
        rows.push(Row {
            name: format!("metrics/{name}"),
            items: (SERIES * 4) as u64,
            exports,
            cpu: cpu_seconds_on(0) - cpu,
        });
        let got = counts.flow_points.load(Ordering::Relaxed) - before;
        assert_eq!(
            got,
            exports * (SERIES * 4) as u64,
            "the receiver did not get every flow data point"
        );
        rt.block_on(exporter.shutdown());

        let mut exporter = rt
            .block_on(async { otlp_logs::build(&cfg.logs, &ctx) })
            .expect("the logs exporter")
            .expect("an OTLP endpoint is set");
        let before = counts.log_records.load(Ordering::Relaxed);
        let cpu = cpu_seconds_on(0);
        let mut exports = 0u64;
        group.throughput(Throughput::Elements(RECORDS as u64));
        group.bench_function(format!("log_records/{name}"), |b| {
            b.iter(|| {
                rt.block_on(exporter.export(&logs));
                exports += 1;
            })
        });
        rows.push(Row {
            name: format!("logs/{name}"),
            items: RECORDS as u64,
            exports,
            cpu: cpu_seconds_on(0) - cpu,
        });
        let got = counts.log_records.load(Ordering::Relaxed) - before;
        assert_eq!(
            got,
            exports * RECORDS as u64,
            "the receiver did not get every log record ({} export failures)",
            telemetry.value(&catalogue::EXPORT_FAILURES)
        );
        rt.block_on(exporter.shutdown());
    }
    group.finish();
    println!("exporter CPU (threads pinned to CPU 0, user + system):");
    println!("| export | exports | CPU per export | per exporter CPU-second |");
    println!("| --- | --- | --- | --- |");
    for r in rows.iter().filter(|r| r.exports > 0) {
        let per_export = r.cpu / r.exports as f64;
        println!(
            "| {} | {} | {:.1} ms | {:.0} |",
            r.name,
            r.exports,
            per_export * 1e3,
            r.items as f64 / per_export
        );
    }
    println!("requests per interval (uncompressed size):");
    for (signal, requests) in [
        ("metrics", encoder.encode(&metrics)),
        (
            "logs",
            logs_encoder
                .encode(&logs[0])
                .into_iter()
                .map(|(r, _)| r)
                .collect(),
        ),
    ] {
        let largest = requests.iter().map(Vec::len).max().unwrap_or(0);
        let total: usize = requests.iter().map(Vec::len).sum();
        let wire = |c: Compression| -> usize {
            requests
                .iter()
                .map(|r| transport::compress(c, r.clone()).len())
                .sum()
        };
        let mib = |b: usize| b as f64 / f64::from(1 << 20);
        println!(
            "  {signal}: {} requests, {:.1} MiB in all, largest {:.2} MiB; on the wire \
             {:.2} MiB with gzip, {:.2} MiB with zstd",
            requests.len(),
            mib(total),
            mib(largest),
            mib(wire(Compression::Gzip)),
            mib(wire(Compression::Zstd))
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
