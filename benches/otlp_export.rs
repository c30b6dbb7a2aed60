//! OTLP encode+export throughput, against a local gRPC receiver.
//!
//! * `metrics`: one interval of 20 000 series through `OtlpMetricsExporter`
//!   (`flowtel.flow.bytes` and `flowtel.flow.packets`, both directions:
//!   80 000 flow data points per export); throughput in flow data points.
//! * `logs`: one interval of 20 000 flow records through `OtlpLogsExporter`
//!   (no rate limit); throughput in log records.
//!
//! Each runs with gzip (the default) and without compression. The exporter
//! side (its runtime, blocking pool and criterion's thread) is pinned to
//! CPU 0 and the receiver to CPU 1, so "thrpt" is what one core exports.
//! The receiver counts what it decoded, and the run fails if that is not
//! everything that was exported.
//!
//! Run with `cargo bench --bench otlp_export` (about two minutes plus the
//! build).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flowtel::config::{Compression, Config};
use flowtel::export::otlp_logs::OtlpLogsExporter;
use flowtel::export::otlp_metrics::OtlpMetricsExporter;
use flowtel::export::transport::SignalTransport;
use flowtel::flow::aggregate::{Aggregator, DirectionalCounters, IntervalReport, KeySpec};
use flowtel::flow::{Counters, Endpoint, FlowId, FlowUpdate, Nat, SourceKind, Transport};
use flowtel::stats::SelfStats;
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::metric;
use prost::Message;

/// Series per metrics export, and flow records per logs export.
const SERIES: usize = 20_000;
const RECORDS: usize = 20_000;

/// What the receiver decoded.
#[derive(Default)]
struct Counts {
    flow_points: AtomicU64,
    log_records: AtomicU64,
    /// The largest request of each signal, encoded (uncompressed) bytes.
    largest_metrics: AtomicU64,
    largest_logs: AtomicU64,
}

#[derive(Clone)]
struct Receiver(Arc<Counts>);

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        self.0
            .largest_metrics
            .fetch_max(request.encoded_len() as u64, Ordering::Relaxed);
        let points: usize = request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .filter(|m| m.name.starts_with("flowtel.flow."))
            .map(|m| match &m.data {
                Some(metric::Data::Sum(s)) => s.data_points.len(),
                _ => 0,
            })
            .sum();
        self.0
            .flow_points
            .fetch_add(points as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        self.0
            .largest_logs
            .fetch_max(request.encoded_len() as u64, Ordering::Relaxed);
        let records: usize = request
            .resource_logs
            .iter()
            .flat_map(|rl| &rl.scope_logs)
            .map(|sl| sl.log_records.len())
            .sum();
        self.0
            .log_records
            .fetch_add(records as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

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
    let r = Receiver(counts);
    let metrics = MetricsServiceServer::new(r.clone())
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(256 << 20);
    let logs = LogsServiceServer::new(r)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(256 << 20);
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(metrics)
            .add_service(logs)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    addr
}

fn config(endpoint: &str, compression: Compression) -> Config {
    let mut cfg = Config::default();
    cfg.export.otlp.endpoint = endpoint.to_string();
    cfg.export.otlp.compression = compression;
    cfg.export.otlp.retry.max_attempts = 1;
    cfg.flows.max_series = SERIES + 2;
    cfg.export.logs.rate_limit = 0;
    cfg.export.logs.max_records = RECORDS;
    cfg.interval = Duration::from_secs(3600);
    cfg
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

fn delta(i: usize) -> DirectionalCounters {
    DirectionalCounters {
        to_server: Counters::new(1_000 + i as u64, 10),
        to_client: Counters::new(50_000 + i as u64, 40),
    }
}

/// One interval of `SERIES` distinct series (client address, server
/// address and port differ).
fn metrics_report() -> IntervalReport {
    let spec = KeySpec::from_fields(&flowtel::config::FlowsConfig::default().key);
    let stats = Arc::new(SelfStats::default());
    let mut agg = Aggregator::new(spec, SERIES + 2, Duration::from_secs(3600), stats);
    for i in 0..SERIES {
        agg.record(
            &flow(i),
            &Nat::default(),
            SourceKind::Ebpf,
            delta(i),
            &mut None,
        );
    }
    let report = agg.finish_interval();
    assert_eq!(report.points.len(), SERIES, "distinct series");
    report
}

/// One interval of `RECORDS` flow records.
fn logs_report() -> IntervalReport {
    let spec = KeySpec::from_fields(&flowtel::config::FlowsConfig::default().key);
    let stats = Arc::new(SelfStats::default());
    let mut agg = Aggregator::new(spec, 16, Duration::from_secs(3600), stats).with_records(RECORDS);
    for i in 0..RECORDS {
        let update = FlowUpdate {
            id: flow(i),
            generation: 0,
            nat: Nat::default(),
            to_server: Counters::default(),
            to_client: Counters::default(),
            ended: i.is_multiple_of(3),
            source: SourceKind::Ebpf,
        };
        agg.record_flow(&update, delta(i), None);
    }
    let mut report = agg.finish_interval();
    report.start = SystemTime::now() - Duration::from_secs(10);
    assert_eq!(report.records.flows.len(), RECORDS, "distinct flows");
    report
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
    for (name, compression) in [("gzip", Compression::Gzip), ("none", Compression::None)] {
        let cfg = config(&endpoint, compression);
        let transport =
            SignalTransport::resolve(&cfg.export.otlp, &cfg.export.otlp.metrics, "metrics")
                .expect("a metrics transport");
        let exporter = rt
            .block_on(OtlpMetricsExporter::build(
                &cfg,
                Some(&transport),
                Arc::new(SelfStats::default()),
                None,
                None,
                flowtel::source::SourceInfo {
                    name: "ebpf",
                    mode: "tcx",
                },
            ))
            .expect("the metrics exporter");
        let before = counts.flow_points.load(Ordering::Relaxed);
        let mut exports = 0u64;
        group.throughput(Throughput::Elements((SERIES * 4) as u64));
        group.bench_function(format!("metrics_data_points/{name}"), |b| {
            b.iter(|| {
                rt.block_on(exporter.export(&metrics));
                exports += 1;
            })
        });
        let got = counts.flow_points.load(Ordering::Relaxed) - before;
        assert_eq!(
            got,
            exports * (SERIES * 4) as u64,
            "the receiver did not get every flow data point"
        );
        rt.block_on(exporter.shutdown());

        let transport = SignalTransport::resolve(&cfg.export.otlp, &cfg.export.otlp.logs, "logs")
            .expect("a logs transport");
        let stats = Arc::new(SelfStats::default());
        let mut exporter = rt
            .block_on(async { OtlpLogsExporter::build(&cfg, &transport, stats.clone()) })
            .expect("the logs exporter");
        let before = counts.log_records.load(Ordering::Relaxed);
        let mut exports = 0u64;
        group.throughput(Throughput::Elements(RECORDS as u64));
        group.bench_function(format!("log_records/{name}"), |b| {
            b.iter(|| {
                rt.block_on(exporter.export(&logs));
                exports += 1;
            })
        });
        let got = counts.log_records.load(Ordering::Relaxed) - before;
        assert_eq!(
            got,
            exports * RECORDS as u64,
            "the receiver did not get every log record ({} export failures)",
            SelfStats::get(&stats.exports_failed)
        );
        rt.block_on(exporter.shutdown());
    }
    group.finish();
    let mib = |v: &AtomicU64| v.load(Ordering::Relaxed) as f64 / f64::from(1 << 20);
    println!(
        "largest request (uncompressed): metrics {:.1} MiB, logs {:.1} MiB",
        mib(&counts.largest_metrics),
        mib(&counts.largest_logs)
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
