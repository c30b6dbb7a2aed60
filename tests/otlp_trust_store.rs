//! gRPC and HTTP trust the same store: the system's (here a private CA put
//! where `SSL_CERT_FILE` points, as a node's CA bundle would be) plus
//! `export.otlp.tls.ca_file`.
//!
//! A private CA and a `localhost` certificate it signs are made at test
//! time; the test receiver serves both OTLP/gRPC and OTLP/HTTP over TLS
//! with that certificate.
//!
//! 1. The system store holds another CA only: gRPC and HTTP both refuse
//!    the collector's certificate.
//! 2. The system store holds the private CA: both deliver.
//! 3. The system store holds the other CA, `tls.ca_file` the private one:
//!    both deliver.
//!
//! The test owns the process environment: it is the only test in this
//! binary.

mod common;

use std::path::Path;

use common::otlp_receiver::OtlpReceiver;
use flowtel::export::otlp::transport::{OtlpClient, Signal, SignalTransport};
use flowtel::export::otlp::{OtlpConfig, Protocol};
use flowtel::telemetry::Telemetry;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A CA named `name`: its issuer (certificate and key).
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a CA key")).expect("a CA")
}

/// Sends one request over `protocol` with the trust settings of the moment;
/// whether it was delivered.
fn send(endpoint: String, protocol: Protocol, ca_file: Option<&Path>) -> bool {
    let mut otlp = OtlpConfig {
        endpoint,
        protocol,
        ..OtlpConfig::default()
    };
    otlp.tls.ca_file = ca_file.map(Path::to_path_buf);
    otlp.retry.max_attempts = 1;
    let transport = SignalTransport::resolve(&otlp, &otlp.metrics, "metrics").expect("a transport");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let client =
            OtlpClient::new(&transport, Signal::Metrics, &Telemetry::default()).expect("a client");
        client.send(Vec::new()).await
    })
}

#[test]
fn grpc_and_http_trust_the_system_store_and_the_ca_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let private = ca("flowtel test private CA");
    let other = ca("flowtel test other CA");
    let server_key = KeyPair::generate().expect("a server key");
    let mut params =
        CertificateParams::new(vec!["localhost".to_string()]).expect("server parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = params
        .signed_by(&server_key, &private)
        .expect("the server certificate");
    let private_pem = dir.path().join("private-ca.pem");
    let other_pem = dir.path().join("other-ca.pem");
    let empty_dir = dir.path().join("certs");
    std::fs::write(&private_pem, private.pem()).expect("write");
    std::fs::write(&other_pem, other.pem()).expect("write");
    std::fs::create_dir(&empty_dir).expect("mkdir");
    // SSL_CERT_DIR names an empty directory so the machine's own bundle
    // plays no part.
    std::env::set_var("SSL_CERT_DIR", &empty_dir);

    let receiver = OtlpReceiver::start_tls(
        server.pem().as_bytes(),
        server_key.serialize_pem().as_bytes(),
    )
    .expect("the TLS receiver starts");
    let (grpc, http) = (receiver.grpc_endpoint(), receiver.http_endpoint());
    println!("gRPC {grpc}, HTTP {http}");

    std::env::set_var("SSL_CERT_FILE", &other_pem);
    assert!(
        !send(grpc.clone(), Protocol::Grpc, None),
        "gRPC must refuse a CA the system does not trust"
    );
    assert!(
        !send(http.clone(), Protocol::HttpProtobuf, None),
        "HTTP must refuse a CA the system does not trust"
    );
    assert_eq!(receiver.request_count(), 0);

    std::env::set_var("SSL_CERT_FILE", &private_pem);
    assert!(
        send(grpc.clone(), Protocol::Grpc, None),
        "gRPC trusts the system store"
    );
    assert!(
        send(http.clone(), Protocol::HttpProtobuf, None),
        "HTTP trusts the system store"
    );
    assert_eq!(receiver.request_count(), 2);

    std::env::set_var("SSL_CERT_FILE", &other_pem);
    assert!(
        send(grpc, Protocol::Grpc, Some(&private_pem)),
        "gRPC trusts tls.ca_file besides the system store"
    );
    assert!(
        send(http, Protocol::HttpProtobuf, Some(&private_pem)),
        "HTTP trusts tls.ca_file besides the system store"
    );
    assert_eq!(receiver.request_count(), 4);
}
