//! A test-side OTLP receiver on 127.0.0.1: gRPC `MetricsService/Export`,
//! `LogsService/Export` and `TraceService/Export` (tonic, gzip accepted)
//! and HTTP `POST /v1/metrics`, `/v1/logs` and `/v1/traces` (axum,
//! protobuf, gzip or not). It keeps every request, can be stopped and
//! restarted on the same ports, can answer UNAVAILABLE (HTTP 503) for a
//! while, noting when each refused request came, can serve TLS with a given
//! certificate, and flattens what it got into [`SumPoint`]s and
//! [`LogEvent`]s.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
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
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An attribute value, typed as OTLP carries it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
    /// Doubles, arrays, maps and bytes, in their debug form.
    Other(String),
}

impl std::fmt::Display for AttrValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Str(s) => write!(f, "{s:?}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::Other(o) => f.write_str(o),
        }
    }
}

/// An attribute set, sorted by key.
pub type Attrs = BTreeMap<String, AttrValue>;

/// Shows an attribute set on one line.
pub fn show(attrs: &Attrs) -> String {
    let parts: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", parts.join(", "))
}

fn value_of(v: Option<&AnyValue>) -> AttrValue {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => AttrValue::Str(s.clone()),
        Some(any_value::Value::IntValue(i)) => AttrValue::Int(*i),
        Some(any_value::Value::BoolValue(b)) => AttrValue::Bool(*b),
        Some(any_value::Value::DoubleValue(d)) => AttrValue::Other(format!("Double({d})")),
        other => AttrValue::Other(format!("{other:?}")),
    }
}

pub fn attrs_of(kvs: &[KeyValue]) -> Attrs {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_of(kv.value.as_ref())))
        .collect()
}

/// One OTLP log record, flattened. Doubles show as `Other("Double(x)")`,
/// the way rotel prints them.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    pub resource: Attrs,
    pub event_name: String,
    pub severity_number: i32,
    pub severity_text: String,
    pub body: String,
    pub attrs: Attrs,
    pub time_unix_nano: u64,
}

impl LogEvent {
    /// The attribute `key` as a string, if it is one.
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attrs.get(key) {
            Some(AttrValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The attribute `key` as an integer, if it is one.
    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attrs.get(key) {
            Some(AttrValue::Int(i)) => Some(*i),
            _ => None,
        }
    }
}

/// One data point of a Sum metric.
#[derive(Debug, Clone, PartialEq)]
pub struct SumPoint {
    pub metric: String,
    pub unit: String,
    pub monotonic: bool,
    /// `AggregationTemporality` as its number (2 = cumulative).
    pub temporality: i32,
    pub resource: Attrs,
    pub attrs: Attrs,
    pub value: u64,
    pub start_unix_nano: u64,
    pub time_unix_nano: u64,
}

pub const CUMULATIVE: i32 = 2;

/// For each attribute set of `metric`, its newest point (by timestamp; the
/// later one in `points` on a tie).
pub fn latest(points: &[SumPoint], metric: &str) -> BTreeMap<Attrs, SumPoint> {
    let mut out: BTreeMap<Attrs, SumPoint> = BTreeMap::new();
    for p in points.iter().filter(|p| p.metric == metric) {
        match out.get(&p.attrs) {
            Some(old) if old.time_unix_nano > p.time_unix_nano => {}
            _ => {
                out.insert(p.attrs.clone(), p.clone());
            }
        }
    }
    out
}

/// The sum of the values of the series whose attribute `key` is `value`.
pub fn total_where(series: &BTreeMap<Attrs, SumPoint>, key: &str, value: &str) -> u64 {
    series
        .values()
        .filter(|p| p.attrs.get(key) == Some(&AttrValue::Str(value.to_string())))
        .map(|p| p.value)
        .sum()
}

/// How a request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// A request answered UNAVAILABLE: over what, from whom (its `x-agent`
/// header), when.
#[derive(Debug, Clone)]
pub struct Refused {
    pub transport: Transport,
    pub agent: String,
    pub at: Instant,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub transport: Transport,
    pub gzip: bool,
    pub at: Instant,
    pub request: ExportMetricsServiceRequest,
}

#[derive(Default)]
struct Shared {
    /// False while stopped: a request that still reaches a lingering
    /// connection is refused, not stored.
    up: AtomicBool,
    /// While set, requests get no answer until it is cleared, and are then
    /// refused, never stored: a collector that hangs.
    stalled: AtomicBool,
    /// Requests that arrived while stalled.
    stalled_requests: AtomicUsize,
    /// While set, requests are answered UNAVAILABLE (HTTP 503) at once and
    /// not stored; when each came is kept in `refused`.
    unavailable: AtomicBool,
    refused: Mutex<Vec<Refused>>,
    received: Mutex<Vec<Received>>,
    logs: Mutex<Vec<ExportLogsServiceRequest>>,
    traces: Mutex<Vec<ExportTraceServiceRequest>>,
}

impl Shared {
    /// Holds a request that arrives while stalled until the stall ends;
    /// true when it must then be refused.
    async fn hold(&self) -> bool {
        if !self.stalled.load(Ordering::SeqCst) {
            return false;
        }
        self.stalled_requests.fetch_add(1, Ordering::SeqCst);
        while self.stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// True (and the time noted) when a request must be refused as
    /// UNAVAILABLE.
    fn refuse(&self, transport: Transport, headers: &HeaderMap) -> bool {
        if !self.unavailable.load(Ordering::SeqCst) {
            return false;
        }
        let agent = headers
            .get("x-agent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if let Ok(mut v) = self.refused.lock() {
            v.push(Refused {
                transport,
                agent,
                at: Instant::now(),
            });
        }
        true
    }

    fn store(&self, r: Received) {
        if let Ok(mut v) = self.received.lock() {
            v.push(r);
        }
    }

    fn store_logs(&self, r: ExportLogsServiceRequest) {
        if let Ok(mut v) = self.logs.lock() {
            v.push(r);
        }
    }
}

struct Grpc(Arc<Shared>);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        if self.0.hold().await {
            return Err(tonic::Status::unavailable("test receiver stalled"));
        }
        if !self.0.up.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("test receiver stopped"));
        }
        if self
            .0
            .refuse(Transport::Grpc, &request.metadata().clone().into_headers())
        {
            return Err(tonic::Status::unavailable("test receiver unavailable"));
        }
        let gzip = request
            .metadata()
            .get("grpc-encoding")
            .is_some_and(|v| v == "gzip");
        self.0.store(Received {
            transport: Transport::Grpc,
            gzip,
            at: Instant::now(),
            request: request.into_inner(),
        });
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

struct GrpcTraces(Arc<Shared>);

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.hold().await {
            return Err(tonic::Status::unavailable("test receiver stalled"));
        }
        if !self.0.up.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("test receiver stopped"));
        }
        if let Ok(mut v) = self.0.traces.lock() {
            v.push(request.into_inner());
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_export_traces(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if shared.hold().await {
        return (StatusCode::SERVICE_UNAVAILABLE, "test receiver stalled").into_response();
    }
    match decode_http::<ExportTraceServiceRequest>(&shared, &headers, &body) {
        Ok((request, _)) => {
            if let Ok(mut v) = shared.traces.lock() {
                v.push(request);
            }
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec(),
            )
                .into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

/// One span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub resource: Attrs,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub name: String,
    /// `SpanKind`: 2 server, 3 client.
    pub kind: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attrs: Attrs,
    /// `StatusCode` (0 unset, 2 error) and message.
    pub status: (i32, String),
}

impl ReceivedSpan {
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.attrs.get(key) {
            Some(AttrValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.attrs.get(key) {
            Some(AttrValue::Int(i)) => Some(*i),
            _ => None,
        }
    }
}

struct GrpcLogs(Arc<Shared>);

#[tonic::async_trait]
impl LogsService for GrpcLogs {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        if self.0.hold().await {
            return Err(tonic::Status::unavailable("test receiver stalled"));
        }
        if !self.0.up.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("test receiver stopped"));
        }
        self.0.store_logs(request.into_inner());
        Ok(tonic::Response::new(ExportLogsServiceResponse {
            partial_success: None,
        }))
    }
}

/// The protobuf request of an HTTP export (and whether it was gzipped), or
/// why it is refused.
fn decode_http<M: Message + Default>(
    shared: &Shared,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(M, bool), (StatusCode, String)> {
    if !shared.up.load(Ordering::SeqCst) {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "test receiver stopped".into(),
        ));
    }
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v == "gzip");
    let raw = if gzip {
        let mut out = Vec::new();
        if let Err(e) = flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out) {
            return Err((StatusCode::BAD_REQUEST, format!("bad gzip body: {e}")));
        }
        out
    } else {
        body.to_vec()
    };
    M::decode(&raw[..])
        .map(|m| (m, gzip))
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("bad protobuf body: {e}")))
}

async fn http_export_logs(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if shared.hold().await {
        return (StatusCode::SERVICE_UNAVAILABLE, "test receiver stalled").into_response();
    }
    match decode_http::<ExportLogsServiceRequest>(&shared, &headers, &body) {
        Ok((request, _)) => {
            shared.store_logs(request);
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                ExportLogsServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec(),
            )
                .into_response()
        }
        Err(refused) => refused.into_response(),
    }
}

async fn http_export(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if shared.hold().await {
        return (StatusCode::SERVICE_UNAVAILABLE, "test receiver stalled").into_response();
    }
    if shared.refuse(Transport::Http, &headers) {
        return (StatusCode::SERVICE_UNAVAILABLE, "test receiver unavailable").into_response();
    }
    let (request, gzip) = match decode_http::<ExportMetricsServiceRequest>(&shared, &headers, &body)
    {
        Ok(r) => r,
        Err(refused) => return refused.into_response(),
    };
    shared.store(Received {
        transport: Transport::Http,
        gzip,
        at: Instant::now(),
        request,
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportMetricsServiceResponse {
            partial_success: None,
        }
        .encode_to_vec(),
    )
        .into_response()
}

struct Running {
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

/// The receiver. Dropping it stops it.
pub struct OtlpReceiver {
    rt: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    running: Option<Running>,
    /// The certificate chain and key (PEM) both servers present, if TLS.
    tls: Option<(Vec<u8>, Vec<u8>)>,
}

impl OtlpReceiver {
    /// Starts on ephemeral ports.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on(0, 0)
    }

    /// Starts on the given ports of 127.0.0.1 (0: any free port).
    pub fn start_on(grpc_port: u16, http_port: u16) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .context("building the receiver's runtime")?;
        let mut r = OtlpReceiver {
            rt: Some(rt),
            shared: Arc::new(Shared::default()),
            grpc_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, grpc_port)),
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, http_port)),
            running: None,
            tls: None,
        };
        r.serve()?;
        Ok(r)
    }

    /// Starts on ephemeral ports, both servers speaking TLS with the
    /// certificate chain `cert` and its `key` (PEM); the endpoints are
    /// `https://localhost:PORT`.
    pub fn start_tls(cert: &[u8], key: &[u8]) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .context("building the receiver's runtime")?;
        let mut r = OtlpReceiver {
            rt: Some(rt),
            shared: Arc::new(Shared::default()),
            grpc_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            running: None,
            tls: Some((cert.to_vec(), key.to_vec())),
        };
        r.serve()?;
        Ok(r)
    }

    /// Answers every request UNAVAILABLE (gRPC) or 503 (HTTP) while
    /// `unavailable`, storing nothing.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// When each request refused as UNAVAILABLE came, and over which
    /// transport.
    pub fn refused(&self) -> Vec<Refused> {
        self.shared
            .refused
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    fn rt(&self) -> anyhow::Result<&tokio::runtime::Runtime> {
        self.rt.as_ref().context("the receiver's runtime is gone")
    }

    fn serve(&mut self) -> anyhow::Result<()> {
        let rt = self.rt()?;
        let bind = |addr: SocketAddr| {
            rt.block_on(async move {
                // After a stop the old socket may take a moment to close.
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => return Ok(l),
                        Err(e) if Instant::now() < deadline => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            })
            .with_context(|| format!("binding the OTLP receiver to {addr}"))
        };
        let grpc_listener = bind(self.grpc_addr)?;
        let http_listener = bind(self.http_addr)?;
        let grpc_addr = grpc_listener.local_addr()?;
        let http_addr = http_listener.local_addr()?;

        let tls = self.tls.as_ref().map(|(cert, key)| {
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key))
        });
        let (grpc_stop, grpc_stopped) = oneshot::channel::<()>();
        let service = MetricsServiceServer::new(Grpc(self.shared.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(64 * 1024 * 1024);
        let logs = LogsServiceServer::new(GrpcLogs(self.shared.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(64 * 1024 * 1024);
        let grpc_tls = tls.clone();
        let traces = TraceServiceServer::new(GrpcTraces(self.shared.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(64 * 1024 * 1024);
        let grpc = rt.spawn(async move {
            let mut server = tonic::transport::Server::builder();
            if let Some(tls) = grpc_tls {
                server = match server.tls_config(tls) {
                    Ok(s) => s,
                    Err(e) => return eprintln!("test OTLP gRPC receiver: TLS: {e}"),
                };
            }
            let result = server
                .add_service(service)
                .add_service(logs)
                .add_service(traces)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(grpc_listener),
                    async {
                        let _ = grpc_stopped.await;
                    },
                )
                .await;
            if let Err(e) = result {
                eprintln!("test OTLP gRPC receiver: {e}");
            }
        });

        let (http_stop, http_stopped) = oneshot::channel::<()>();
        let app = axum::Router::new()
            .route("/v1/metrics", axum::routing::post(http_export))
            .route("/v1/logs", axum::routing::post(http_export_logs))
            .route("/v1/traces", axum::routing::post(http_export_traces))
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(self.shared.clone());
        let http = rt.spawn(async move {
            let stopped = async {
                let _ = http_stopped.await;
            };
            let result = match tls {
                // Over TLS the same routes are served by tonic's server
                // (HTTP/2, as a client negotiates it with ALPN).
                Some(tls) => match tonic::transport::Server::builder().tls_config(tls) {
                    Ok(server) => server
                        .accept_http1(true)
                        .add_routes(tonic::service::Routes::from(app))
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(http_listener),
                            stopped,
                        )
                        .await
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                },
                None => axum::serve(http_listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
                    .map_err(anyhow::Error::from),
            };
            if let Err(e) = result {
                eprintln!("test OTLP HTTP receiver: {e}");
            }
        });

        self.grpc_addr = grpc_addr;
        self.http_addr = http_addr;
        self.shared.up.store(true, Ordering::SeqCst);
        self.running = Some(Running {
            stop: vec![grpc_stop, http_stop],
            tasks: vec![grpc, http],
        });
        Ok(())
    }

    /// `http://127.0.0.1:PORT` of the gRPC receiver
    /// (`https://localhost:PORT` over TLS).
    pub fn grpc_endpoint(&self) -> String {
        self.endpoint(self.grpc_addr)
    }

    /// `http://127.0.0.1:PORT` of the HTTP receiver (flowtel appends
    /// `/v1/metrics`; `https://localhost:PORT` over TLS).
    pub fn http_endpoint(&self) -> String {
        self.endpoint(self.http_addr)
    }

    fn endpoint(&self, addr: SocketAddr) -> String {
        match self.tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops both servers: listeners closed, open connections told to go
    /// away (and refused if they still send).
    pub fn stop(&mut self) {
        self.shared.up.store(false, Ordering::SeqCst);
        let Some(running) = self.running.take() else {
            return;
        };
        for s in running.stop {
            let _ = s.send(());
        }
        if let Some(rt) = &self.rt {
            for task in running.tasks {
                let abort = task.abort_handle();
                let done =
                    rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), task).await });
                if done.is_err() {
                    abort.abort();
                }
            }
        }
    }

    /// Stalls (`true`): requests get no answer, and are refused without
    /// being stored once the stall ends (`false`).
    pub fn stall(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::SeqCst);
    }

    /// Requests that arrived while stalled.
    pub fn stalled_requests(&self) -> usize {
        self.shared.stalled_requests.load(Ordering::SeqCst)
    }

    /// Starts again on the same ports, keeping what was received before.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.running.is_some() {
            bail!("the receiver is already running");
        }
        self.serve()
    }

    /// How many export requests were stored so far.
    pub fn request_count(&self) -> usize {
        self.shared.received.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// A copy of the stored requests from index `since` on.
    pub fn received(&self, since: usize) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .map(|v| v.get(since..).map(<[_]>::to_vec).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Every Sum data point of the requests from index `since` on.
    pub fn sum_points(&self, since: usize) -> Vec<SumPoint> {
        let mut out = Vec::new();
        for r in self.received(since) {
            for rm in &r.request.resource_metrics {
                let resource = rm
                    .resource
                    .as_ref()
                    .map(|r| attrs_of(&r.attributes))
                    .unwrap_or_default();
                for sm in &rm.scope_metrics {
                    for m in &sm.metrics {
                        let Some(metric::Data::Sum(sum)) = &m.data else {
                            continue;
                        };
                        for dp in &sum.data_points {
                            let value = match dp.value {
                                Some(number_data_point::Value::AsInt(i)) => {
                                    u64::try_from(i).unwrap_or(0)
                                }
                                Some(number_data_point::Value::AsDouble(d)) => d as u64,
                                None => 0,
                            };
                            out.push(SumPoint {
                                metric: m.name.clone(),
                                unit: m.unit.clone(),
                                monotonic: sum.is_monotonic,
                                temporality: sum.aggregation_temporality,
                                resource: resource.clone(),
                                attrs: attrs_of(&dp.attributes),
                                value,
                                start_unix_nano: dp.start_time_unix_nano,
                                time_unix_nano: dp.time_unix_nano,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// The integer values of gauge `metric` in the requests from index
    /// `since` on, in the order they arrived (self-metrics such as
    /// `flowtel.ebpf.map.entries`).
    pub fn gauge_values(&self, metric: &str, since: usize) -> Vec<i64> {
        let mut out = Vec::new();
        for r in self.received(since) {
            let metrics = r
                .request
                .resource_metrics
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .flat_map(|sm| &sm.metrics)
                .filter(|m| m.name == metric);
            for m in metrics {
                let Some(metric::Data::Gauge(g)) = &m.data else {
                    continue;
                };
                out.extend(g.data_points.iter().filter_map(|dp| match dp.value {
                    Some(number_data_point::Value::AsInt(i)) => Some(i),
                    _ => None,
                }));
            }
        }
        out
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let requests = self
            .shared
            .traces
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for request in &requests {
            for rs in &request.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| attrs_of(&r.attributes))
                    .unwrap_or_default();
                for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                    let status = span
                        .status
                        .as_ref()
                        .map(|s| (s.code, s.message.clone()))
                        .unwrap_or_default();
                    out.push(ReceivedSpan {
                        resource: resource.clone(),
                        trace_id: span.trace_id.clone(),
                        span_id: span.span_id.clone(),
                        parent_span_id: span.parent_span_id.clone(),
                        name: span.name.clone(),
                        kind: span.kind,
                        start_unix_nano: span.start_time_unix_nano,
                        end_unix_nano: span.end_time_unix_nano,
                        attrs: attrs_of(&span.attributes),
                        status,
                    });
                }
            }
        }
        out
    }

    /// Every log record received so far.
    pub fn log_events(&self) -> Vec<LogEvent> {
        let requests = self
            .shared
            .logs
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for request in &requests {
            for rl in &request.resource_logs {
                let resource = rl
                    .resource
                    .as_ref()
                    .map(|r| attrs_of(&r.attributes))
                    .unwrap_or_default();
                for record in rl.scope_logs.iter().flat_map(|sl| &sl.log_records) {
                    let body = match value_of(record.body.as_ref()) {
                        AttrValue::Str(s) => s,
                        other => other.to_string(),
                    };
                    out.push(LogEvent {
                        resource: resource.clone(),
                        event_name: record.event_name.clone(),
                        severity_number: record.severity_number,
                        severity_text: record.severity_text.clone(),
                        body,
                        attrs: attrs_of(&record.attributes),
                        time_unix_nano: record.time_unix_nano,
                    });
                }
            }
        }
        out
    }

    /// The newest point of each series of `metric`, from requests `since` on.
    pub fn latest(&self, metric: &str, since: usize) -> BTreeMap<Attrs, SumPoint> {
        latest(&self.sum_points(since), metric)
    }

    /// The resource attributes of the newest request, if any.
    pub fn resource_attributes(&self) -> Option<Attrs> {
        let received = self.shared.received.lock().ok()?;
        let last = received.last()?;
        last.request
            .resource_metrics
            .first()
            .and_then(|rm| rm.resource.as_ref())
            .map(|r| attrs_of(&r.attributes))
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
