//! OTLP transport: the endpoint, protocol, headers, compression, timeout
//! and TLS of each signal once per-signal overrides are applied, and the
//! client that sends encoded requests with them (gRPC through tonic, or
//! HTTP/protobuf through reqwest), retrying what the OTLP specification
//! calls retryable: after a wait drawn with full jitter, or the one the
//! collector asks for (HTTP `Retry-After`, gRPC `RetryInfo`), within a
//! bounded total time per request.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut as _, Bytes, BytesMut};
use http_body_util::BodyExt as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::ServiceExt as _;

use super::{
    with_scheme, Compression, OtlpConfig, Protocol, RetryConfig, SignalOverrides, TlsConfig,
};
use crate::telemetry::{catalogue, Counter, Telemetry};

/// What flowtel calls itself in `user-agent` (tonic appends its own name
/// on gRPC).
pub const USER_AGENT: &str = concat!("flowtel/", env!("CARGO_PKG_VERSION"));

/// The largest answer read from a collector: an export answer carries at
/// most a partial-success message.
pub const MAX_REPLY_BYTES: usize = 1 << 20;

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
        let insecure = overrides.insecure.unwrap_or(otlp.insecure);
        let url = match (&overrides.endpoint, otlp.endpoint.is_empty()) {
            (Some(specific), _) => with_scheme(specific, insecure),
            (None, true) => return None,
            (None, false) => {
                let base = with_scheme(&otlp.endpoint, insecure);
                match protocol {
                    Protocol::Grpc => base,
                    Protocol::HttpProtobuf => {
                        format!("{}/v1/{signal}", base.trim_end_matches('/'))
                    }
                }
            }
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
            tls: overrides.tls.over(&otlp.tls),
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

    /// The CAs the collector's certificate is checked against, for gRPC
    /// and HTTP alike: the system's store (`SSL_CERT_FILE`, `SSL_CERT_DIR`,
    /// or the distribution's bundle) plus `tls.ca_file`.
    fn trust_roots(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let system = rustls_native_certs::load_native_certs();
        for e in &system.errors {
            tracing::debug!("reading the system's CA store: {e}");
        }
        // A system certificate that is not a usable trust anchor is
        // skipped, as each TLS stack would skip it.
        let mut roots: Vec<CertificateDer<'static>> = system
            .certs
            .into_iter()
            .filter(|c| rustls::RootCertStore::empty().add(c.clone()).is_ok())
            .collect();
        if let Some(ca) = Self::read(&self.tls.ca_file, "CA file")? {
            let before = roots.len();
            for cert in CertificateDer::pem_slice_iter(&ca) {
                roots.push(cert.context("export.otlp.tls.ca_file is not valid PEM")?);
            }
            if roots.len() == before {
                bail!("export.otlp.tls.ca_file holds no PEM certificate");
            }
        }
        if roots.is_empty() {
            bail!(
                "no CA to check the collector's certificate against: the system's store is \
                 empty (see SSL_CERT_FILE, SSL_CERT_DIR) and export.otlp.tls.ca_file is not set"
            );
        }
        Ok(roots)
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
        metadata.insert("grpc-timeout", grpc_timeout(self.timeout));
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .with_context(|| format!("{:?} is not a valid gRPC endpoint", self.url))?
            .user_agent(USER_AGENT)
            .context("the user-agent")?
            .timeout(self.timeout)
            .connect_timeout(self.timeout);
        if self.wants_tls() {
            let mut tls = ClientTlsConfig::new().ca_certificate(
                tonic::transport::Certificate::from_pem(pem(&self.trust_roots()?)),
            );
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
        let mut client = reqwest::Client::builder()
            .timeout(self.timeout)
            .user_agent(USER_AGENT);
        if self.wants_tls() {
            let roots = self
                .trust_roots()?
                .iter()
                .map(|der| reqwest::Certificate::from_der(der))
                .collect::<Result<Vec<_>, _>>()
                .context("a trusted CA certificate")?;
            client = client.tls_certs_only(roots);
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
    /// The wait the collector asked for (`Retry-After`, `RetryInfo`).
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(message: impl Into<String>, retryable: bool) -> Self {
        Self {
            message: message.into(),
            retryable,
            retry_after: None,
        }
    }
}

/// "Full jitter": the wait before attempt `attempt + 1` is drawn uniformly
/// between zero and the exponential backoff, so the agents of a DaemonSet
/// that lost the same collector do not come back in lock-step.
fn full_jitter(retry: &RetryConfig, attempt: u32) -> Duration {
    let exponential = retry
        .initial_backoff
        .saturating_mul(1 << attempt.saturating_sub(1).min(20));
    exponential.min(retry.max_backoff).mul_f64(fastrand::f64())
}

/// `timeout` as a `grpc-timeout` value: at most 8 digits, in milliseconds
/// (or seconds past that).
fn grpc_timeout(timeout: Duration) -> http::HeaderValue {
    let ms = timeout.as_millis();
    let value = if ms < 100_000_000 {
        format!("{ms}m")
    } else {
        format!("{}S", timeout.as_secs().min(99_999_999))
    };
    http::HeaderValue::from_str(&value).unwrap_or(http::HeaderValue::from_static("99999999S"))
}

/// The CAs as one PEM bundle, which is how tonic takes them.
fn pem(roots: &[CertificateDer]) -> Vec<u8> {
    use base64::Engine as _;
    let mut out = Vec::new();
    for der in roots {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    out
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

    /// Sends one request, retrying while the failure is retryable (after
    /// the wait the collector asked for, else a jittered exponential
    /// backoff) until `retry.max_attempts` or `retry.max_elapsed_time`;
    /// returns whether it was delivered.
    pub async fn send(&self, request: Vec<u8>) -> bool {
        let body = compress(self.compression, request);
        let started = Instant::now();
        let mut attempt = 1;
        let outcome = loop {
            match self.attempt(body.clone()).await {
                Ok(rejected) => break Ok(rejected),
                Err(f) if !f.retryable || attempt >= self.retry.max_attempts => break Err(f),
                Err(mut f) => {
                    let wait = f
                        .retry_after
                        .unwrap_or_else(|| full_jitter(&self.retry, attempt));
                    if started.elapsed() + wait > self.retry.max_elapsed_time {
                        f.message = format!(
                            "{}; gave up: waiting {wait:?} more would pass \
                             export.otlp.retry.max_elapsed_time ({:?})",
                            f.message, self.retry.max_elapsed_time
                        );
                        break Err(f);
                    }
                    tracing::debug!(endpoint = %self.url, attempt, ?wait, "OTLP {} export: {}; retrying", self.signal.name(), f.message);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
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
                let response = post
                    .send()
                    .await
                    .map_err(|e| Failure::new(e.to_string(), true))?;
                let status = response.status();
                if !status.is_success() {
                    return Err(http_failure(status, response.headers()));
                }
                read_capped(response).await?
            }
        };
        Ok(partial_success(&response))
    }
}

/// The codes the OTLP specification lists as retryable; RESOURCE_EXHAUSTED
/// only when the collector says when to come back.
fn grpc_retryable(code: tonic::Code, retry_info: bool) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled | DeadlineExceeded | Aborted | OutOfRange | Unavailable | DataLoss
    ) || (code == ResourceExhausted && retry_info)
}

/// A refused HTTP answer: retryable as the specification says, with the
/// `Retry-After` of a 429 or 503 (seconds or an HTTP date).
fn http_failure(status: http::StatusCode, headers: &http::HeaderMap) -> Failure {
    let code = status.as_u16();
    let retry_after = matches!(code, 429 | 503)
        .then(|| headers.get(http::header::RETRY_AFTER)?.to_str().ok())
        .flatten()
        .and_then(|v| {
            let v = v.trim();
            match v.parse::<u64>() {
                Ok(seconds) => Some(Duration::from_secs(seconds)),
                Err(_) => httpdate::parse_http_date(v)
                    .ok()?
                    .duration_since(std::time::SystemTime::now())
                    .ok()
                    .or(Some(Duration::ZERO)),
            }
        });
    Failure {
        message: format!("HTTP {status}"),
        retryable: matches!(code, 429 | 502 | 503 | 504),
        retry_after,
    }
}

/// The body of a delivered HTTP answer, up to [`MAX_REPLY_BYTES`]; a longer
/// one is not read (the status already said the data was taken).
async fn read_capped(mut response: reqwest::Response) -> Result<Bytes, Failure> {
    let too_long = || {
        tracing::warn!(
            "the collector's answer exceeds {MAX_REPLY_BYTES} bytes; not read (the export \
             succeeded, any partial-success details are lost)"
        );
        Ok(Bytes::new())
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_REPLY_BYTES as u64)
    {
        return too_long();
    }
    let mut out = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Failure::new(format!("reading the answer: {e}"), true))?
    {
        if out.len() + chunk.len() > MAX_REPLY_BYTES {
            return too_long();
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
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
    let len = u32::try_from(message.len()).map_err(|_| {
        Failure::new(
            format!(
                "a {} byte request exceeds gRPC's 4 GiB frame",
                message.len()
            ),
            false,
        )
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
    let response = channel
        .oneshot(request)
        .await
        .map_err(|e| Failure::new(format!("connecting: {e}"), true))?;
    let (head, body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        // gRPC's mapping of HTTP statuses: these become UNAVAILABLE.
        return Err(http_failure(head.status, &head.headers));
    }
    // A "trailers-only" answer carries its status in the headers.
    grpc_status(&head.headers)?;
    // Without its trailers the outcome is unknown; not retried, so a
    // collector that took the data does not get it twice.
    let answer = http_body_util::Limited::new(body, MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Failure::new(
                    format!("the answer exceeds {MAX_REPLY_BYTES} bytes; not read"),
                    false,
                )
            } else {
                Failure::new(format!("reading the answer: {e}"), true)
            }
        })?;
    match answer.trailers() {
        Some(trailers) => grpc_status(trailers)?,
        None if head.headers.contains_key("grpc-status") => {}
        None => return Err(Failure::new("the answer ended without a grpc-status", true)),
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
    // `grpc-status-details-bin`, which is read here instead.
    let retry_after = headers
        .get("grpc-status-details-bin")
        .and_then(|v| retry_info(v.as_bytes()));
    let mut headers = headers.clone();
    headers.remove("grpc-status-details-bin");
    let message = tonic::Status::from_header_map(&headers)
        .map(|s| s.message().to_string())
        .unwrap_or_default();
    Err(Failure {
        message: format!("{code:?}: {message}"),
        retryable: grpc_retryable(code, retry_after.is_some()),
        retry_after,
    })
}

/// `google.rpc.Status`, as `grpc-status-details-bin` carries it.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// The `retry_delay` of a `RetryInfo` in a `grpc-status-details-bin` value
/// (base64, padded or not); `None` when there is none or it does not
/// decode.
fn retry_info(value: &[u8]) -> Option<Duration> {
    use base64::Engine as _;
    let trimmed = value.strip_suffix(b"==").or(value.strip_suffix(b"="));
    let raw = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed.unwrap_or(value))
        .ok()?;
    let status = <RpcStatus as prost::Message>::decode(&raw[..]).ok()?;
    let info = status
        .details
        .iter()
        .find(|d| d.type_url.ends_with("/google.rpc.RetryInfo"))?;
    let delay = <RetryInfo as prost::Message>::decode(&info.value[..])
        .ok()?
        .retry_delay?;
    let seconds = u64::try_from(delay.seconds).ok()?;
    let nanos = u32::try_from(delay.nanos).ok()?.min(999_999_999);
    Some(Duration::new(seconds, nanos))
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
        collector_answering(statuses.into_iter().map(|s| (s, None)).collect(), 0).await
    }

    /// An OTLP/HTTP collector that answers the given statuses, each with
    /// its `Retry-After` if any, in turn (then 200 with a body of
    /// `answer_bytes` zeros).
    async fn collector_answering(
        statuses: Vec<(u16, Option<&'static str>)>,
        answer_bytes: usize,
    ) -> (String, Seen) {
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
                    let (status, retry_after) =
                        answers.lock().expect("lock").next().unwrap_or((200, None));
                    let mut answer = http::Response::builder().status(status);
                    if let Some(after) = retry_after {
                        answer = answer.header(http::header::RETRY_AFTER, after);
                    }
                    answer
                        .body(axum::body::Body::from(vec![0u8; answer_bytes]))
                        .expect("an answer")
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
            assert_eq!(headers["user-agent"], USER_AGENT);
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
    async fn http_honours_retry_after_within_the_total_retry_time() {
        let (endpoint, seen) =
            collector_answering(vec![(503, Some("1")), (429, Some("1"))], 0).await;
        let stats = Telemetry::default();
        let mut c = client(&endpoint, Compression::None, &stats);
        c.retry.max_attempts = 10;
        let started = Instant::now();
        assert!(c.send(b"one".to_vec()).await);
        // Two waits of the 1 s asked for, not the 10-20 ms backoff.
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert_eq!(seen.lock().expect("lock").len(), 3);
        // A wait past retry.max_elapsed_time gives up at once.
        let (endpoint, seen) = collector_answering(vec![(503, Some("5"))], 0).await;
        let mut c = client(&endpoint, Compression::None, &stats);
        c.retry.max_attempts = 10;
        c.retry.max_elapsed_time = Duration::from_secs(2);
        assert!(!c.send(b"two".to_vec()).await);
        assert_eq!(seen.lock().expect("lock").len(), 1, "not retried");
        assert_eq!(stats.value(&catalogue::EXPORT_FAILURES), 1);
    }

    #[tokio::test]
    async fn http_gives_up_after_the_total_retry_time() {
        let (endpoint, seen) = collector(vec![503; 1000]).await;
        let stats = Telemetry::default();
        let mut c = client(&endpoint, Compression::None, &stats);
        c.retry.max_attempts = 1000;
        c.retry.max_elapsed_time = Duration::from_millis(200);
        assert!(!c.send(b"one".to_vec()).await);
        let attempts = seen.lock().expect("lock").len();
        assert!((2..1000).contains(&attempts), "{attempts} attempts");
    }

    #[tokio::test]
    async fn http_does_not_read_an_answer_past_the_cap() {
        let (endpoint, seen) = collector_answering(vec![], MAX_REPLY_BYTES + 1).await;
        let stats = Telemetry::default();
        let c = client(&endpoint, Compression::None, &stats);
        assert!(c.send(b"one".to_vec()).await, "the status says delivered");
        assert_eq!(seen.lock().expect("lock").len(), 1);
    }

    #[test]
    fn full_jitter_spreads_waits_up_to_the_exponential_backoff() {
        let retry = RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryConfig::default()
        };
        for (attempt, ceiling) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let ceiling = Duration::from_millis(ceiling);
            let waits: Vec<Duration> = (0..1000).map(|_| full_jitter(&retry, attempt)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "attempt {attempt}");
            // Each quarter of the range is drawn.
            for q in 0..4 {
                let (low, high) = (ceiling * q / 4, ceiling * (q + 1) / 4);
                assert!(
                    waits.iter().any(|w| *w >= low && *w < high),
                    "attempt {attempt}: nothing in [{low:?}, {high:?})"
                );
            }
        }
    }

    #[tokio::test]
    async fn both_transports_take_the_systems_store() {
        for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
            let otlp = OtlpConfig {
                endpoint: "https://collector.example:4317".into(),
                protocol,
                ..OtlpConfig::default()
            };
            let t = SignalTransport::resolve(&otlp, &otlp.metrics, "metrics").expect("a transport");
            assert!(!t.trust_roots().expect("the system's CAs").is_empty());
            OtlpClient::new(&t, Signal::Metrics, &Telemetry::default())
                .unwrap_or_else(|e| panic!("{protocol:?}: {e:#}"));
        }
    }

    #[test]
    fn grpc_timeout_fits_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_secs(10)), "10000m");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(grpc_timeout(Duration::MAX), "99999999S");
    }

    /// `grpc-status-details-bin` with a `RetryInfo` of `delay`.
    fn details_with_retry_info(delay: Duration) -> Vec<u8> {
        let info = RetryInfo {
            retry_delay: Some(ProtoDuration {
                seconds: i64::try_from(delay.as_secs()).expect("seconds"),
                nanos: i32::try_from(delay.subsec_nanos()).expect("nanos"),
            }),
        };
        prost::Message::encode_to_vec(&RpcStatus {
            details: vec![ProtoAny {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: prost::Message::encode_to_vec(&info),
            }],
        })
    }

    #[test]
    fn retry_info_is_read_padded_or_not_and_garbage_is_ignored() {
        use base64::Engine as _;
        let raw = details_with_retry_info(Duration::from_millis(1500));
        for engine in [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
        ] {
            let value = engine.encode(&raw);
            assert_eq!(
                retry_info(value.as_bytes()),
                Some(Duration::from_millis(1500))
            );
        }
        for garbage in [&b"%%%"[..], b"", b"AAAA", b"CgA="] {
            assert_eq!(retry_info(garbage), None);
        }
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
        /// The failure's code and the `RetryInfo` delay it carries.
        failure: (tonic::Code, Option<Duration>),
        /// Bytes of the partial success's message.
        answer_bytes: usize,
        /// `user-agent` and `grpc-timeout` of the last request.
        agent: Arc<Mutex<(String, String)>>,
    }

    impl Grpc {
        fn new(failures: u32) -> Self {
            Grpc {
                failures: Arc::new(Mutex::new(failures)),
                seen: Arc::default(),
                failure: (tonic::Code::Unavailable, None),
                answer_bytes: 20,
                agent: Arc::default(),
            }
        }

        /// Serves on 127.0.0.1; returns the endpoint.
        async fn serve(&self) -> String {
            use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
            use tonic::codec::CompressionEncoding;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("address");
            let server = MetricsServiceServer::new(self.clone())
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Zstd);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(server)
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
            format!("http://{addr}")
        }
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
            *self.agent.lock().expect("lock") = (header("user-agent"), header("grpc-timeout"));
            let resources = request.into_inner().resource_metrics.len();
            self.seen
                .lock()
                .expect("lock")
                .push((tenant, encoding, resources));
            let mut failures = self.failures.lock().expect("lock");
            if *failures > 0 {
                *failures -= 1;
                let (code, delay) = self.failure;
                return Err(match delay {
                    Some(d) => tonic::Status::with_details(
                        code,
                        "warming up",
                        details_with_retry_info(d).into(),
                    ),
                    None => tonic::Status::new(code, "warming up"),
                });
            }
            use opentelemetry_proto::tonic::collector::metrics::v1::{
                ExportMetricsPartialSuccess, ExportMetricsServiceResponse,
            };
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: Some(ExportMetricsPartialSuccess {
                    rejected_data_points: 3,
                    error_message: "three points too old"
                        .chars()
                        .cycle()
                        .take(self.answer_bytes)
                        .collect(),
                }),
            }))
        }
    }

    #[tokio::test]
    async fn grpc_frames_compresses_retries_and_reads_partial_success() {
        for (compression, encoding) in [
            (Compression::Gzip, "gzip"),
            (Compression::Zstd, "zstd"),
            (Compression::None, ""),
        ] {
            let collector = Grpc::new(1);
            let mut otlp = OtlpConfig {
                endpoint: collector.serve().await,
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
            let (agent, timeout) = collector.agent.lock().expect("lock").clone();
            assert!(agent.starts_with(&format!("{USER_AGENT} ")), "{agent}");
            assert_eq!(timeout, "10000m");
        }
    }

    /// A gRPC client of `endpoint` retrying up to 10 times, 10-20 ms apart.
    fn grpc_client(endpoint: String, stats: &Telemetry) -> OtlpClient {
        let mut otlp = OtlpConfig {
            endpoint,
            ..OtlpConfig::default()
        };
        otlp.retry.max_attempts = 10;
        otlp.retry.initial_backoff = Duration::from_millis(10);
        otlp.retry.max_backoff = Duration::from_millis(20);
        let t = SignalTransport::resolve(&otlp, &otlp.metrics, "metrics").expect("a transport");
        OtlpClient::new(&t, Signal::Metrics, stats).expect("a client")
    }

    #[tokio::test]
    async fn grpc_honours_retry_info_and_retries_resource_exhausted_only_with_it() {
        for (code, delay, delivered, attempts) in [
            (
                tonic::Code::Unavailable,
                Some(Duration::from_millis(700)),
                true,
                2,
            ),
            (
                tonic::Code::ResourceExhausted,
                Some(Duration::from_millis(700)),
                true,
                2,
            ),
            (tonic::Code::ResourceExhausted, None, false, 1),
        ] {
            let mut collector = Grpc::new(1);
            collector.failure = (code, delay);
            let stats = Telemetry::default();
            let c = grpc_client(collector.serve().await, &stats);
            let started = Instant::now();
            assert_eq!(c.send(b"".to_vec()).await, delivered, "{code:?}");
            assert_eq!(
                collector.seen.lock().expect("lock").len(),
                attempts,
                "{code:?}"
            );
            if let Some(d) = delay {
                assert!(started.elapsed() >= d, "{code:?}: waited as asked");
            }
        }
    }

    #[tokio::test]
    async fn grpc_does_not_read_an_answer_past_the_cap() {
        let mut collector = Grpc::new(0);
        collector.answer_bytes = MAX_REPLY_BYTES + 1;
        let stats = Telemetry::default();
        let c = grpc_client(collector.serve().await, &stats);
        assert!(!c.send(b"".to_vec()).await);
        assert_eq!(collector.seen.lock().expect("lock").len(), 1, "not retried");
        assert_eq!(stats.value(&catalogue::EXPORT_FAILURES), 1);
    }
}
