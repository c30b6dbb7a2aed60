//! OTLP: the settings shared by every OTLP exporter (`export.otlp`), the
//! transport that sends encoded requests ([`transport`]), and the wire
//! encoding ([`wire`]).

pub mod transport;
pub mod wire;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::component::{positive, ConfigError};

/// OTLP wire protocol, named as in `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum Protocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    /// The protocol named `value` (`grpc`, `http/protobuf`), or why not.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" => Ok(Self::HttpProtobuf),
            "http/json" => Err("\"http/json\" is not supported: flowtel encodes OTLP as \
                 protobuf only; use \"http/protobuf\" (the same endpoint and port, every \
                 OTLP/HTTP receiver accepts it) or \"grpc\""
                .into()),
            other => Err(format!(
                "unsupported protocol {other:?}; use \"grpc\" or \"http/protobuf\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Self::parse(&name).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Temporality {
    Cumulative,
    Delta,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Base URL of the collector, e.g. `http://localhost:4317` for gRPC or
    /// `http://localhost:4318` for HTTP. Empty: no OTLP export.
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub temporality: Temporality,
    /// Requests are cut below this many bytes (before compression), so a
    /// Collector's gRPC receiver (4 MiB by default) takes every one.
    pub max_request_bytes: usize,
    /// For an endpoint given without a scheme (`host:port`): plaintext when
    /// true, TLS when false (`OTEL_EXPORTER_OTLP_INSECURE`).
    pub insecure: bool,
    pub tls: TlsConfig,
    pub retry: RetryConfig,
    /// Per-signal overrides (`OTEL_EXPORTER_OTLP_METRICS_*`).
    pub metrics: SignalOverrides,
    /// Per-signal overrides (`OTEL_EXPORTER_OTLP_LOGS_*`).
    pub logs: SignalOverrides,
    /// Per-signal overrides (`OTEL_EXPORTER_OTLP_TRACES_*`).
    pub traces: SignalOverrides,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: Protocol::Grpc,
            headers: BTreeMap::new(),
            compression: Compression::Gzip,
            timeout: Duration::from_secs(10),
            temporality: Temporality::Cumulative,
            max_request_bytes: 3 << 20,
            insecure: false,
            tls: TlsConfig::default(),
            retry: RetryConfig::default(),
            metrics: SignalOverrides::default(),
            logs: SignalOverrides::default(),
            traces: SignalOverrides::default(),
        }
    }
}

/// Settings of one signal that, when set, win over the shared ones. A
/// per-signal endpoint is used as is (no `/v1/metrics` is appended), as the
/// OpenTelemetry specification says.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SignalOverrides {
    pub endpoint: Option<String>,
    pub protocol: Option<Protocol>,
    pub headers: Option<BTreeMap<String, String>>,
    pub compression: Option<Compression>,
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub insecure: Option<bool>,
    /// Each file set here wins over the shared `tls` one
    /// (`OTEL_EXPORTER_OTLP_<SIGNAL>_CERTIFICATE`, `_CLIENT_CERTIFICATE`,
    /// `_CLIENT_KEY`).
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM bundle of CAs that sign the collector's certificate, trusted in
    /// addition to the system's store (`SSL_CERT_FILE`, `SSL_CERT_DIR`, or
    /// the distribution's bundle), for gRPC and HTTP alike.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS; set both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// These files, each falling back to `shared`'s.
    pub fn over(&self, shared: &TlsConfig) -> TlsConfig {
        TlsConfig {
            ca_file: self.ca_file.clone().or_else(|| shared.ca_file.clone()),
            cert_file: self.cert_file.clone().or_else(|| shared.cert_file.clone()),
            key_file: self.key_file.clone().or_else(|| shared.key_file.clone()),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per export, the first included; 1 disables retries.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// The longest one request may spend being retried, from its first
    /// attempt; a wait that would end later gives up instead.
    #[serde(with = "humantime_serde")]
    pub max_elapsed_time: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
            max_elapsed_time: Duration::from_secs(60),
        }
    }
}

impl OtlpConfig {
    /// Checks what serde cannot; keys are relative to `export.otlp`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.endpoint.is_empty() {
            check_url("endpoint", &self.endpoint)?;
        }
        check_tls("tls", &self.tls)?;
        for (signal, o) in [
            ("metrics", &self.metrics),
            ("logs", &self.logs),
            ("traces", &self.traces),
        ] {
            if let Some(endpoint) = &o.endpoint {
                check_url(&format!("{signal}.endpoint"), endpoint)?;
            }
            if o.timeout.is_some_and(|t| t.is_zero()) {
                return Err(ConfigError::new(
                    format!("{signal}.timeout"),
                    "must be greater than 0",
                ));
            }
            if let Some(headers) = &o.headers {
                check_headers(&format!("{signal}.headers"), headers)?;
            }
            check_tls(&format!("{signal}.tls"), &o.tls.over(&self.tls))?;
        }
        positive("timeout", self.timeout, "10s")?;
        check_headers("headers", &self.headers)?;
        if self.max_request_bytes < 64 << 10 {
            return Err(ConfigError::new(
                "max_request_bytes",
                "must be at least 65536; a Collector's gRPC receiver takes 4194304 (4 MiB) by default",
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::new(
                "retry.max_attempts",
                "must be at least 1 (1 = no retries)",
            ));
        }
        if self.retry.initial_backoff > self.retry.max_backoff {
            return Err(ConfigError::new(
                "retry.initial_backoff",
                "must not exceed export.otlp.retry.max_backoff",
            ));
        }
        positive("retry.max_elapsed_time", self.retry.max_elapsed_time, "60s")?;
        if self.retry.max_elapsed_time < self.retry.initial_backoff {
            return Err(ConfigError::new(
                "retry.max_elapsed_time",
                "must not be below export.otlp.retry.initial_backoff",
            ));
        }
        Ok(())
    }
}

fn check_tls(key: &str, tls: &TlsConfig) -> Result<(), ConfigError> {
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(ConfigError::new(
            if tls.cert_file.is_some() {
                format!("{key}.key_file")
            } else {
                format!("{key}.cert_file")
            },
            "mutual TLS needs both cert_file and key_file",
        ));
    }
    for (name, file) in [
        ("ca_file", &tls.ca_file),
        ("cert_file", &tls.cert_file),
        ("key_file", &tls.key_file),
    ] {
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    format!("{key}.{name}"),
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
    }
    Ok(())
}

/// `value` with a scheme: a `host:port` endpoint gets `http://` when
/// `insecure`, else `https://`.
pub fn with_scheme(value: &str, insecure: bool) -> String {
    if value.contains("://") {
        value.to_string()
    } else if insecure {
        format!("http://{value}")
    } else {
        format!("https://{value}")
    }
}

fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let scheme_less = !value.contains("://");
    let value = &with_scheme(value, true);
    let url = url::Url::parse(value).map_err(|e| {
        ConfigError::new(
            key,
            format!("{value:?} is not a URL ({e}); expected e.g. http://localhost:4317"),
        )
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(ConfigError::new(
            key,
            format!(
                "scheme {:?} is not supported; use http:// or https://",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(key, format!("{value:?} has no host")));
    }
    if scheme_less && url.port().is_none() {
        return Err(ConfigError::new(
            key,
            format!(
                "{:?} is not a URL; expected e.g. http://localhost:4317, or host:port \
                 (TLS unless export.otlp.insecure is true)",
                value.trim_start_matches("http://")
            ),
        ));
    }
    Ok(())
}

fn check_headers(key: &str, headers: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ConfigError::new(
                format!("{key}.{name}"),
                "is not a valid HTTP header name",
            ));
        }
        if http::HeaderValue::from_str(value).is_err() {
            return Err(ConfigError::new(
                format!("{key}.{name}"),
                "is not a valid HTTP header value",
            ));
        }
    }
    Ok(())
}
