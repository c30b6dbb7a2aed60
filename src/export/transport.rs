//! OTLP transport settings shared by every signal: the endpoint, protocol,
//! headers, compression, timeout and TLS that apply once per-signal
//! overrides are taken into account.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use opentelemetry_otlp::{
    Compression as OtlpCompression, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};

use crate::config::{Compression, OtlpConfig, Protocol, SignalOverrides, TlsConfig};

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
    pub retry: RetryPolicy,
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
        let r = &otlp.retry;
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
            retry: RetryPolicy::default()
                .with_max_retries(r.max_attempts.saturating_sub(1) as usize)
                .with_initial_delay(r.initial_backoff)
                .with_max_delay(r.max_backoff),
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

    /// Applies these settings to a gRPC (tonic) exporter builder.
    pub fn apply_tonic<B>(&self, builder: B) -> anyhow::Result<B>
    where
        B: WithExportConfig + WithTonicConfig,
    {
        let mut metadata = tonic::metadata::MetadataMap::new();
        for (name, value) in &self.headers {
            let key =
                tonic::metadata::MetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .with_context(|| format!("header name {name:?} is not valid gRPC metadata"))?;
            let value = value.parse().with_context(|| {
                format!("header {name:?} has a value that is not valid gRPC metadata")
            })?;
            metadata.insert(key, value);
        }
        let mut builder = builder
            .with_endpoint(self.url.clone())
            .with_timeout(self.timeout)
            .with_metadata(metadata)
            .with_retry_policy(self.retry.clone());
        if self.compression == Compression::Gzip {
            builder = builder.with_compression(OtlpCompression::Gzip);
        }
        if self.wants_tls() {
            let mut tls = tonic::transport::ClientTlsConfig::new();
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
            builder = builder.with_tls_config(tls);
        }
        Ok(builder)
    }

    /// Applies these settings to an HTTP/protobuf exporter builder.
    pub fn apply_http<B>(&self, builder: B) -> anyhow::Result<B>
    where
        B: WithExportConfig + WithHttpConfig,
    {
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
        let client = client.build().context("building the OTLP HTTP client")?;
        let headers: HashMap<String, String> = self.headers.clone().into_iter().collect();
        let mut builder = builder
            .with_endpoint(self.url.clone())
            .with_timeout(self.timeout)
            .with_headers(headers)
            .with_http_client(client)
            .with_retry_policy(self.retry.clone());
        if self.compression == Compression::Gzip {
            builder = builder.with_compression(OtlpCompression::Gzip);
        }
        Ok(builder)
    }
}
