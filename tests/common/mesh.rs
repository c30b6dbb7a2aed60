//! Scrape targets for the mesh sources: local HTTP servers serving the
//! Envoy sidecar, ztunnel and Felix fixtures (`tests/fixtures/mesh/`), or
//! answering as broken endpoints do, and the Kubernetes pods that carry an
//! Istio proxy at their address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::kubeapi::fx;

pub const ENVOY: &str = include_str!("../fixtures/mesh/envoy_sidecar.txt");
pub const ZTUNNEL: &str = include_str!("../fixtures/mesh/ztunnel_1.24.txt");
pub const FELIX: &str = include_str!("../fixtures/mesh/felix.txt");

pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The settings that point flowtel's Felix scrape at `felix` and scrape
/// Felix and the Istio proxies every `every`, each within `timeout`.
pub fn scrape_env(felix: SocketAddr, every: &str, timeout: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FLOWTEL_DETECT__FELIX_ADDRESS", felix.to_string()),
        (
            "FLOWTEL_MESH__FELIX__URL",
            format!("http://{felix}/metrics"),
        ),
        ("FLOWTEL_MESH__FELIX__INTERVAL", every.into()),
        ("FLOWTEL_MESH__FELIX__TIMEOUT", timeout.into()),
        ("FLOWTEL_MESH__ISTIO__INTERVAL", every.into()),
        ("FLOWTEL_MESH__ISTIO__TIMEOUT", timeout.into()),
    ]
}

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one target answers to every request.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// This body, with this content type, every time.
    Serve(&'static str, &'static str),
    /// This body as its n-th scrape ([`advanced`]): counters grow.
    Growing(&'static str, &'static str),
    /// Announces more than it sends, then closes.
    Truncated,
    NotUtf8,
    /// 100 MB of valid lines, chunked.
    Huge,
    /// Headers, then one byte every 400 ms.
    SlowLoris,
    WrongType,
}

/// `text` (Prometheus text or OpenMetrics) as the endpoint would answer
/// its `n`-th scrape (from 0): every counter sample is `v × (n + 1) + n`,
/// every histogram sample (buckets, `_sum`, `_count`) `v × (n + 1)`, and
/// gauges stay as they are. So every counter moves, a counter at 0 too,
/// and histograms keep their shape (their quantiles do not change).
pub fn advanced(text: &str, n: u64) -> String {
    let mut kinds: HashMap<&str, &str> = HashMap::new();
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                kinds.insert(name, kind);
            }
        }
        let sample = !line.starts_with('#') && !line.trim().is_empty();
        let name = line
            .split(['{', ' '])
            .next()
            .filter(|_| sample)
            .unwrap_or_default();
        let kind = ["", "_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .and_then(|family| kinds.get(family))
            });
        let grown = match (kind, line.rsplit_once(' ')) {
            (Some(&kind), Some((head, value))) if kind == "counter" || kind == "histogram" => {
                value.parse::<f64>().ok().map(|v| {
                    let factor = (n + 1) as f64;
                    let v = if kind == "counter" {
                        v * factor + n as f64
                    } else {
                        v * factor
                    };
                    format!("{head} {v}")
                })
            }
            _ => None,
        };
        out.push_str(grown.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A minimal HTTP/1.1 server at `addr`: raw bytes, so that the bad
/// behaviours are exactly what a broken endpoint sends. Runs until the
/// runtime it was spawned on is dropped.
pub async fn serve(addr: SocketAddr, behaviour: Behaviour) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind a scrape target");
    let local = listener.local_addr().expect("its address");
    let scrapes = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let scrapes = Arc::clone(&scrapes);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = |ct: &str, len: Option<usize>| {
                    match len {
                    Some(n) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n"
                    ),
                    None => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    ),
                }
                };
                let _ = match behaviour {
                    Behaviour::Serve(ct, body) => {
                        conn.write_all(format!("{}{body}", head(ct, Some(body.len()))).as_bytes())
                            .await
                    }
                    Behaviour::Growing(ct, body) => {
                        let body = advanced(body, scrapes.fetch_add(1, Ordering::Relaxed));
                        conn.write_all(format!("{}{body}", head(ct, Some(body.len()))).as_bytes())
                            .await
                    }
                    Behaviour::Truncated => {
                        let body = &ENVOY[..ENVOY.len() / 2];
                        conn.write_all(
                            format!("{}{body}", head(TEXT, Some(ENVOY.len()))).as_bytes(),
                        )
                        .await
                    }
                    Behaviour::NotUtf8 => {
                        let body: &[u8] = b"istio_requests_total{a=\"\xff\xfe\"} 1\n";
                        let mut out = head(TEXT, Some(body.len())).into_bytes();
                        out.extend_from_slice(body);
                        conn.write_all(&out).await
                    }
                    Behaviour::Huge => {
                        let line = "envoy_cluster_upstream_cx_total{cluster_name=\"padding-padding-padding\"} 1\n";
                        let chunk = line.repeat(1 << 14);
                        let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                        let mut result = conn.write_all(head(TEXT, None).as_bytes()).await;
                        let mut sent = 0;
                        while result.is_ok() && sent < 100 << 20 {
                            result = conn.write_all(framed.as_bytes()).await;
                            sent += chunk.len();
                        }
                        if result.is_ok() {
                            result = conn.write_all(b"0\r\n\r\n").await;
                        }
                        result
                    }
                    Behaviour::SlowLoris => {
                        let mut result = conn
                            .write_all(head(TEXT, Some(ENVOY.len())).as_bytes())
                            .await;
                        for b in ENVOY.bytes() {
                            if result.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(400)).await;
                            result = conn.write_all(&[b]).await;
                        }
                        result
                    }
                    Behaviour::WrongType => {
                        let body = "<html><body>metrics moved</body></html>\n";
                        conn.write_all(
                            format!(
                                "{}{body}",
                                head("text/html; charset=utf-8", Some(body.len()))
                            )
                            .as_bytes(),
                        )
                        .await
                    }
                };
                let _ = conn.shutdown().await;
            });
        }
    });
    local
}

/// `pod` with an injected Istio sidecar (or, with `ztunnel`, as ztunnel's
/// own pod), whose `prometheus.io/port` is `port`.
pub fn with_proxy(pod: fx::PodFx, port: u16, ztunnel: bool) -> Value {
    let pod = if ztunnel {
        pod.label("app", "ztunnel")
    } else {
        pod
    };
    let mut pod = pod.build();
    let annotations = &mut pod["metadata"]["annotations"];
    annotations["prometheus.io/port"] = json!(port.to_string());
    if ztunnel {
        annotations["prometheus.io/path"] = json!("/metrics");
    } else {
        annotations["prometheus.io/path"] = json!("/stats/prometheus");
        annotations["prometheus.io/scrape"] = json!("true");
        annotations["sidecar.istio.io/status"] = json!(
            "{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"istio-envoy\",\"istio-data\"],\"imagePullSecrets\":null,\"revision\":\"default\"}"
        );
    }
    if let Some(containers) = pod["spec"]["containers"].as_array_mut() {
        containers.push(json!({
            "name": "istio-proxy",
            "image": "docker.io/istio/proxyv2:1.24.0",
            "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
        }));
    }
    pod
}

/// A pod of no workload on `node` at `ip`, with a proxy (see
/// [`with_proxy`]).
pub fn meshed_pod(
    namespace: &str,
    name: &str,
    node: &str,
    ip: &str,
    port: u16,
    ztunnel: bool,
) -> Value {
    let pod = fx::PodFx::new(namespace, name)
        .on(node, "192.0.2.10")
        .ips(&[ip]);
    with_proxy(pod, port, ztunnel)
}
