//! OTLP transport: the endpoint, protocol, headers, compression, timeout
//! and TLS of each signal once per-signal overrides are applied, and the
//! client that sends encoded requests with them (gRPC through tonic, or
//! HTTP/protobuf through reqwest), retrying what the OTLP specification
//! calls retryable.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::{BufMut as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::ServiceExt as _;

use super::{Compression, OtlpConfig, Protocol, RetryConfig, SignalOverrides, TlsConfig};
use crate::telemetry::{catalogue, Counter, Telemetry};

/// The settings of one signal after overrides.
#[derive(Debug, Clone)]
pub struct SignalTransport {
    /// The URL the exporter posts to (for HTTP, with `/v1/<signal>`).
    pub url: String,
    pub protocol: Protocol,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    pub timeout: Duration,
    pub tls: TlsConfig,
    pub retry: RetryConfig,
}

impl SignalTransport {
    /// Resolves the transport of `signal` ("metrics" or "logs"); `None` when
    /// no endpoint is configured for it.
    pub fn resolve(otlp: &OtlpConfig, overrides: &SignalOverrides, signal: &str) -> Option<Self> {
        let protocol = overrides.protocol.unwrap_or(otlp.protocol);
        let url = match (&overrides.endpoint, otlp.endpoint.is_empty()) {
            (Some(specific), _) => specific.clone(),
            (None, true) => return None,
            (None, false) => match protocol {
                Protocol::Grpc => otlp.endpoint.clone(),
                Protocol::HttpProtobuf => {
                    format!("{}/v1/{signal}", otlp.endpoint.trim_end_matches('/'))
                }
            },
        };
        Some(Self {
            url,
            protocol,
            headers: overrides
                .headers
                .clone()
                .unwrap_or_else(|| otlp.headers.clone()),
            compression: overrides.compression.unwrap_or(otlp.compression),
            timeout: overrides.timeout.unwrap_or(otlp.timeout),
            tls: otlp.tls.clone(),
            retry: otlp.retry.clone(),
        })
    }

    fn wants_tls(&self) -> bool {
        self.url.starts_with("https://") || self.tls.ca_file.is_some()
    }

    fn read(path: &Option<std::path::PathBuf>, what: &str) -> anyhow::Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| {
                std::fs::read(p).with_context(|| format!("reading the TLS {what} {}", p.display()))
            })
            .transpose()
    }

    fn grpc(&self, signal: Signal) -> anyhow::Result<Inner> {
        let mut metadata = http::HeaderMap::new();
        for (name, value) in &self.headers {
            let key = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .ok()
                .filter(|k| !k.as_str().starts_with("grpc-"))
                .with_context(|| format!("header name {name:?} is not valid gRPC metadata"))?;
            let value = http::HeaderValue::from_str(value).with_context(|| {
                format!("header {name:?} has a value that is not valid gRPC metadata")
            })?;
            metadata.insert(key, value);
        }
        let encoding = match self.compression {
            Compression::None => None,
            Compression::Gzip => Some("gzip"),
            Compression::Zstd => Some("zstd"),
        };
        metadata.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        metadata.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        if let Some(encoding) = encoding {
            metadata.insert("grpc-encoding", http::HeaderValue::from_static(encoding));
        }
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .with_context(|| format!("{:?} is not a valid gRPC endpoint", self.url))?
            .timeout(self.timeout)
            .connect_timeout(self.timeout);
        if self.wants_tls() {
            let mut tls = ClientTlsConfig::new();
            tls = match Self::read(&self.tls.ca_file, "CA file")? {
                Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                None => tls.with_webpki_roots(),
            };
            if let (Some(cert), Some(key)) = (
                Self::read(&self.tls.cert_file, "client certificate")?,
                Self::read(&self.tls.key_file, "client key")?,
            ) {
                tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .context("the TLS settings of the OTLP endpoint")?;
        }
        Ok(Inner::Grpc {
            channel: endpoint.connect_lazy(),
            headers: metadata,
            path: http::Uri::from_static(signal.grpc_path()),
        })
    }

    fn http(&self) -> anyhow::Result<Inner> {
        // reqwest is built without a default TLS provider; main installs
        // ring, and this covers library users (an Err means one is set).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut client = reqwest::Client::builder().timeout(self.timeout);
        if let Some(ca) = Self::read(&self.tls.ca_file, "CA file")? {
            let cert =
                reqwest::Certificate::from_pem(&ca).context("the TLS CA file is not valid PEM")?;
            client = client.add_root_certificate(cert);
        }
        if let (Some(mut cert), Some(key)) = (
            Self::read(&self.tls.cert_file, "client certificate")?,
            Self::read(&self.tls.key_file, "client key")?,
        ) {
            cert.extend_from_slice(&key);
            let identity = reqwest::Identity::from_pem(&cert)
                .context("the TLS client certificate and key are not valid PEM")?;
            client = client.identity(identity);
        }
        let mut headers = http::HeaderMap::new();
        for (name, value) in &self.headers {
            let key = http::HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("header name {name:?} is not a valid HTTP header"))?;
            let value = http::HeaderValue::from_str(value)
                .with_context(|| format!("header {name:?} has a value HTTP cannot carry"))?;
            headers.insert(key, value);
        }
        Ok(Inner::Http {
            client: client.build().context("building the OTLP HTTP client")?,
            headers,
        })
    }
}

/// Which OTLP service a client talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Metrics,
    Logs,
    Traces,
}

impl Signal {
    fn grpc_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
            Signal::Traces => "traces",
        }
    }

    /// What a failure costs, for the log line.
    fn consequence(self) -> &'static str {
        match self {
            Signal::Metrics => {
                "flowtel keeps counting and will send cumulative totals when the collector is back"
            }
            Signal::Logs => "those log records are lost",
            Signal::Traces => "those spans are lost",
        }
    }
}

enum Inner {
    Grpc {
        channel: Channel,
        /// `content-type`, `te`, `grpc-encoding` and the user's headers.
        headers: http::HeaderMap,
        path: http::Uri,
    },
    Http {
        client: reqwest::Client,
        headers: http::HeaderMap,
    },
}

/// Sends encoded `Export*ServiceRequest`s to one collector endpoint and
/// counts the outcome of each in the self-metrics.
pub struct OtlpClient {
    inner: Inner,
    signal: Signal,
    url: String,
    compression: Compression,
    retry: RetryConfig,
    successes: Counter,
    failures: Counter,
    /// Set while exports fail, so a streak is logged once.
    failing: AtomicBool,
}

/// Why one request was not delivered.
#[derive(Debug)]
struct Failure {
    message: String,
    retryable: bool,
}

impl OtlpClient {
    /// Builds the client, counting its requests in `telemetry`; the
    /// connection is made at the first send. Must run inside the tokio
    /// runtime.
    pub fn new(
        transport: &SignalTransport,
        signal: Signal,
        telemetry: &Telemetry,
    ) -> anyhow::Result<Self> {
        let inner = match transport.protocol {
            Protocol::Grpc => transport.grpc(signal)?,
            Protocol::HttpProtobuf => transport.http()?,
        };
        Ok(Self {
            inner,
            signal,
            url: transport.url.clone(),
            compression: transport.compression,
            retry: transport.retry.clone(),
            successes: telemetry.counter(&catalogue::EXPORT_SUCCESSES),
            failures: telemetry.counter(&catalogue::EXPORT_FAILURES),
            failing: AtomicBool::new(false),
        })
    }

    /// Sends one request, retrying with exponential backoff while the
    /// failure is retryable; returns whether it was delivered.
    pub async fn send(&self, request: Vec<u8>) -> bool {
        let body = compress(self.compression, request);
        let mut backoff = self.retry.initial_backoff;
        let mut attempt = 1;
        let outcome = loop {
            match self.attempt(body.clone()).await {
                Ok(rejected) => break Ok(rejected),
                Err(f) if f.retryable && attempt < self.retry.max_attempts => {
                    tracing::debug!(endpoint = %self.url, attempt, "OTLP {} export: {}; retrying", self.signal.name(), f.message);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                Err(f) => break Err(f),
            }
        };
        match outcome {
            Ok(rejected) => {
                self.successes.inc();
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.url, "OTLP {} export recovered", self.signal.name());
                }
                if let Some((count, message)) = rejected {
                    tracing::warn!(endpoint = %self.url, "the collector rejected {count} OTLP {}: {message}", self.signal.name());
                }
                true
            }
            Err(f) => {
                self.failures.inc();
                if !self.failing.swap(true, Ordering::Relaxed) {
                    // Not every receiver takes zstd (rotel answers gRPC
                    // UNIMPLEMENTED or HTTP 400); say what to change.
                    let hint = if self.compression == Compression::Zstd && !f.retryable {
                        "; if the collector does not accept zstd, set export.otlp.compression \
                         to gzip"
                    } else {
                        ""
                    };
                    tracing::warn!(
                        endpoint = %self.url,
                        "OTLP {} export failed ({}){hint}; {}",
                        self.signal.name(),
                        f.message,
                        self.signal.consequence()
                    );
                }
                false
            }
        }
    }

    /// Sends the requests of one interval concurrently over the one
    /// connection, so the collector decodes one while the next is on the
    /// wire; returns whether each was delivered, in order.
    pub async fn send_all(&self, requests: Vec<Vec<u8>>) -> Vec<bool> {
        futures::future::join_all(requests.into_iter().map(|r| self.send(r))).await
    }

    /// One attempt with the compressed body; a partial success comes back
    /// as what was rejected.
    async fn attempt(&self, body: Bytes) -> Result<Option<(i64, String)>, Failure> {
        let response = match &self.inner {
            Inner::Grpc {
                channel,
                headers,
                path,
            } => grpc_unary(channel.clone(), path, headers, body, self.compression).await?,
            Inner::Http { client, headers } => {
                let mut post = client
                    .post(&self.url)
                    .headers(headers.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf");
                post = match self.compression {
                    Compression::None => post,
                    Compression::Gzip => post.header(http::header::CONTENT_ENCODING, "gzip"),
                    Compression::Zstd => post.header(http::header::CONTENT_ENCODING, "zstd"),
                }
                .body(body);
                let response = post.send().await.map_err(|e| Failure {
                    message: e.to_string(),
                    retryable: true,
                })?;
                let status = response.status();
                if !status.is_success() {
                    return Err(Failure {
                        message: format!("HTTP {status}"),
                        retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
                    });
                }
                response.bytes().await.map_err(|e| Failure {
                    message: format!("reading the answer: {e}"),
                    retryable: true,
                })?
            }
        };
        Ok(partial_success(&response))
    }
}

/// The codes the OTLP specification lists as retryable.
fn grpc_retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss
    )
}

/// The compression levels: the fastest of each, because flowtel shares the
/// node with the workloads it watches. Level 1 costs a quarter of the CPU
/// of gzip's default 6 for about a quarter more bytes (see README, "OTLP
/// export").
const GZIP_LEVEL: u32 = 1;
const ZSTD_LEVEL: i32 = 1;

/// The request body as it goes on the wire.
pub fn compress(compression: Compression, body: Vec<u8>) -> Bytes {
    match compression {
        Compression::None => body.into(),
        Compression::Gzip => {
            let mut out = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 8),
                flate2::Compression::new(GZIP_LEVEL),
            );
            // Writing into a Vec cannot fail.
            let _ = out.write_all(&body);
            out.finish().unwrap_or_default().into()
        }
        // Compressing from a slice into a Vec cannot fail.
        Compression::Zstd => zstd::bulk::compress(&body, ZSTD_LEVEL)
            .unwrap_or_default()
            .into(),
    }
}

/// One unary gRPC call with flowtel's own framing (a 5-byte prefix, then
/// the message), because tonic compresses at fixed levels (gzip 6, zstd 3)
/// that cost more CPU than the export itself. Returns the answer's message.
async fn grpc_unary(
    channel: Channel,
    path: &http::Uri,
    headers: &http::HeaderMap,
    message: Bytes,
    compression: Compression,
) -> Result<Bytes, Failure> {
    let len = u32::try_from(message.len()).map_err(|_| Failure {
        message: format!(
            "a {} byte request exceeds gRPC's 4 GiB frame",
            message.len()
        ),
        retryable: false,
    })?;
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(u8::from(compression != Compression::None));
    frame.put_u32(len);
    frame.put_slice(&message);
    let mut request = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(
        frame.freeze(),
    )));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = path.clone();
    *request.headers_mut() = headers.clone();
    let response = channel.oneshot(request).await.map_err(|e| Failure {
        message: format!("connecting: {e}"),
        retryable: true,
    })?;
    let (head, body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        // gRPC's mapping of HTTP statuses: these become UNAVAILABLE.
        return Err(Failure {
            message: format!("HTTP {}", head.status),
            retryable: matches!(head.status.as_u16(), 429 | 502 | 503 | 504),
        });
    }
    // A "trailers-only" answer carries its status in the headers.
    grpc_status(&head.headers)?;
    let answer = body.collect().await.map_err(|e| Failure {
        message: format!("reading the answer: {e}"),
        retryable: true,
    })?;
    match answer.trailers() {
        Some(trailers) => grpc_status(trailers)?,
        None if head.headers.contains_key("grpc-status") => {}
        None => {
            return Err(Failure {
                message: "the answer ended without a grpc-status".into(),
                retryable: true,
            })
        }
    }
    let data = answer.to_bytes();
    // An uncompressed message after its prefix; flowtel does not offer the
    // server compression, and a partial-success answer is small anyway.
    Ok(match data.first() {
        Some(0) if data.len() >= 5 => data.slice(5..),
        _ => Bytes::new(),
    })
}

/// An error for a `grpc-status` other than OK.
fn grpc_status(headers: &http::HeaderMap) -> Result<(), Failure> {
    let Some(code) = headers.get("grpc-status") else {
        return Ok(());
    };
    let code = tonic::Code::from_bytes(code.as_bytes());
    if code == tonic::Code::Ok {
        return Ok(());
    }
    // `Status::from_header_map` would panic on a malformed
    // `grpc-status-details-bin`, which flowtel does not need.
    let mut headers = headers.clone();
    headers.remove("grpc-status-details-bin");
    let message = tonic::Status::from_header_map(&headers)
        .map(|s| s.message().to_string())
        .unwrap_or_default();
    Err(Failure {
        message: format!("{code:?}: {message}"),
        retryable: grpc_retryable(code),
    })
}

/// `Export{Metrics,Logs}ServiceResponse`: both have the same shape.
#[derive(Clone, PartialEq, prost::Message)]
struct ExportResponse {
    #[prost(message, optional, tag = "1")]
    partial_success: Option<PartialSuccess>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PartialSuccess {
    /// `rejected_data_points` or `rejected_log_records`.
    #[prost(int64, tag = "1")]
    rejected: i64,
    #[prost(string, tag = "2")]
    error_message: String,
}

/// What a response says was rejected, if anything. An answer that does not
/// decode is a success without details: the collector took the request.
fn partial_success(response: &[u8]) -> Option<(i64, String)> {
    let p = <ExportResponse as prost::Message>::decode(response)
        .ok()?
        .partial_success?;
    (p.rejected > 0 || !p.error_message.is_empty()).then_some((p.rejected, p.error_message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use std::io::Read as _;
    use std::sync::Mutex;

    /// What the test collector saw: per request, its headers and the
    /// decompressed body.
    type Seen = Arc<Mutex<Vec<(http::HeaderMap, Vec<u8>)>>>;

    /// An OTLP/HTTP collector on 127.0.0.1 that answers the given statuses
    /// in turn (then 200).
    async fn collector(statuses: Vec<u16>) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let answers = Arc::new(Mutex::new(statuses.into_iter()));
        let s = seen.clone();
        let app = axum::Router::new().route(
            "/v1/metrics",
            axum::routing::post(move |headers: http::HeaderMap, body: Bytes| {
                let (s, answers) = (s.clone(), answers.clone());
                async move {
                    let mut raw = Vec::new();
                    match headers.get("content-encoding").map(|v| v.as_bytes()) {
                        Some(b"gzip") => {
                            flate2::read::GzDecoder::new(&body[..])
                                .read_to_end(&mut raw)
                                .expect("gzip");
                        }
                        Some(b"zstd") => raw = zstd::decode_all(&body[..]).expect("zstd"),
                        Some(other) => panic!("unexpected content-encoding {other:?}"),
                        None => raw = body.to_vec(),
                    }
                    s.lock().expect("lock").push((headers, raw));
                    let status = answers.lock().expect("lock").next().unwrap_or(200);
                    http::StatusCode::from_u16(status).expect("a status")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), seen)
    }

    fn client(endpoint: &str, compression: Compression, stats: &Telemetry) -> OtlpClient {
        let mut otlp = OtlpConfig {
            endpoint: endpoint.to_string(),
            protocol: Protocol::HttpProtobuf,
            compression,
            ..OtlpConfig::default()
        };
        otlp.headers.insert("X-Tenant".into(), "team-a".into());
        otlp.retry.initial_backoff = Duration::from_millis(10);
        otlp.retry.max_backoff = Duration::from_millis(20);
        let t = SignalTransport::resolve(&otlp, &otlp.metrics, "metrics").expect("a transport");
        OtlpClient::new(&t, Signal::Metrics, stats).expect("a client")
    }

    #[tokio::test]
    async fn http_sends_headers_and_gzip_and_retries_what_is_retryable() {
        let (endpoint, seen) = collector(vec![503, 429]).await;
        let stats = Telemetry::default();
        let c = client(&endpoint, Compression::Gzip, &stats);
        assert!(
            c.send(b"request one".to_vec()).await,
            "delivered on the third try"
        );
        let got = seen.lock().expect("lock").clone();
        assert_eq!(got.len(), 3);
        for (headers, body) in &got {
            assert_eq!(headers["x-tenant"], "team-a");
            assert_eq!(headers["content-type"], "application/x-protobuf");
            assert_eq!(headers["content-encoding"], "gzip");
            assert_eq!(body, b"request one");
        }
        assert_eq!(stats.value(&catalogue::EXPORT_SUCCESSES), 1);
        assert_eq!(stats.value(&catalogue::EXPORT_FAILURES), 0);
    }

    #[tokio::test]
    async fn http_sends_zstd_or_nothing_as_configured() {
        let (endpoint, seen) = collector(vec![]).await;
        let stats = Telemetry::default();
        let body = b"a request a request a request".to_vec();
        assert!(
            client(&endpoint, Compression::Zstd, &stats)
                .send(body.clone())
                .await
        );
        assert!(
            client(&endpoint, Compression::None, &stats)
                .send(body.clone())
                .await
        );
        let got = seen.lock().expect("lock").clone();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0["content-encoding"], "zstd");
        assert!(got[1].0.get("content-encoding").is_none());
        assert!(got.iter().all(|(_, b)| *b == body));
    }

    #[tokio::test]
    async fn http_does_not_retry_a_rejected_request() {
        let (endpoint, seen) = collector(vec![400, 400]).await;
        let stats = Telemetry::default();
        let c = client(&endpoint, Compression::Gzip, &stats);
        assert!(!c.send(b"bad".to_vec()).await);
        assert_eq!(seen.lock().expect("lock").len(), 1, "400 is not retried");
        assert_eq!(stats.value(&catalogue::EXPORT_FAILURES), 1);
    }

    /// A gRPC collector that fails the first `failures` requests with
    /// UNAVAILABLE and records each request's tenant header, encoding and
    /// resources.
    #[derive(Clone)]
    struct Grpc {
        failures: Arc<Mutex<u32>>,
        seen: Arc<Mutex<Vec<(String, String, usize)>>>,
    }

    #[tonic::async_trait]
    impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
        for Grpc
    {
        async fn export(
            &self,
            request: tonic::Request<
                opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
            >,
        ) -> Result<
            tonic::Response<
                opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
            >,
            tonic::Status,
        > {
            let header = |name: &str| {
                request
                    .metadata()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let (tenant, encoding) = (header("x-tenant"), header("grpc-encoding"));
            let resources = request.into_inner().resource_metrics.len();
            self.seen
                .lock()
                .expect("lock")
                .push((tenant, encoding, resources));
            let mut failures = self.failures.lock().expect("lock");
            if *failures > 0 {
                *failures -= 1;
                return Err(tonic::Status::unavailable("warming up"));
            }
            use opentelemetry_proto::tonic::collector::metrics::v1::{
                ExportMetricsPartialSuccess, ExportMetricsServiceResponse,
            };
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: Some(ExportMetricsPartialSuccess {
                    rejected_data_points: 3,
                    error_message: "three points too old".into(),
                }),
            }))
        }
    }

    #[tokio::test]
    async fn grpc_frames_compresses_retries_and_reads_partial_success() {
        use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
        use tonic::codec::CompressionEncoding;
        for (compression, encoding) in [
            (Compression::Gzip, "gzip"),
            (Compression::Zstd, "zstd"),
            (Compression::None, ""),
        ] {
            let collector = Grpc {
                failures: Arc::new(Mutex::new(1)),
                seen: Arc::default(),
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("address");
            let server = MetricsServiceServer::new(collector.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(server)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
            let mut otlp = OtlpConfig {
                endpoint: format!("http://{addr}"),
                compression,
                ..OtlpConfig::default()
            };
            otlp.headers.insert("X-Tenant".into(), "team-a".into());
            otlp.retry.initial_backoff = Duration::from_millis(10);
            let t = SignalTransport::resolve(&otlp, &otlp.metrics, "metrics").expect("a transport");
            let stats = Telemetry::default();
            let c = OtlpClient::new(&t, Signal::Metrics, &stats).expect("a client");
            let envelope = super::super::wire::Envelope::new(&[], "flowtel", "0");
            let mut batch = super::super::wire::Batcher::new(&envelope, 1 << 20);
            batch.begin_metric(super::super::wire::MetricHeader {
                name: "m",
                unit: "1",
                description: "",
                kind: super::super::wire::Kind::Gauge,
            });
            super::super::wire::number_point(batch.points(40), &[], 0, 1, 1);
            let requests = batch.finish();
            let Inner::Grpc {
                channel,
                headers,
                path,
            } = &c.inner
            else {
                panic!("a gRPC client");
            };
            // The framing itself: UNAVAILABLE, then the answer's partial
            // success.
            let call = || {
                let body = compress(compression, requests[0].clone());
                grpc_unary(channel.clone(), path, headers, body, compression)
            };
            let failure = call().await.expect_err("UNAVAILABLE first");
            assert!(failure.retryable, "{}", failure.message);
            assert_eq!(failure.message, "Unavailable: warming up");
            let answer = call().await.expect("delivered");
            assert_eq!(
                partial_success(&answer),
                Some((3, "three points too old".to_string())),
                "{encoding:?}: the partial success is read from the answer"
            );
            // The client: retried after UNAVAILABLE, delivered once.
            *collector.failures.lock().expect("lock") = 1;
            collector.seen.lock().expect("lock").clear();
            assert_eq!(c.send_all(requests.clone()).await, [true]);
            let seen = collector.seen.lock().expect("lock").clone();
            let sent = ("team-a".to_string(), encoding.to_string(), 1);
            assert_eq!(
                seen,
                [sent.clone(), sent],
                "{encoding:?}: one UNAVAILABLE, then delivered"
            );
            assert_eq!(stats.value(&catalogue::EXPORT_SUCCESSES), 1);
        }
    }
}
