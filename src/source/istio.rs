//! Istio's standard metrics from Envoy sidecars and ztunnel: which families
//! flowtel keeps, their OTel names, and where each proxy serves them.

use std::net::{IpAddr, SocketAddr};

use super::detect::MeshRole;
use super::scrape::{FamilySpec, MetricKind, ScrapeError, ScrapedFamily, Scraper};

/// Envoy's own Prometheus endpoint in a sidecar.
pub const SIDECAR_PORT: u16 = 15090;
pub const SIDECAR_PATH: &str = "/stats/prometheus";
/// ztunnel's metrics endpoint (OpenMetrics).
pub const ZTUNNEL_PORT: u16 = 15020;
pub const ZTUNNEL_PATH: &str = "/metrics";

/// The kept `istio_*` families. Names follow OTel conventions and map back
/// to the Istio names under the standard OTLP→Prometheus translation, so
/// dashboards written for Istio keep working.
pub static ISTIO_FAMILIES: &[FamilySpec] = &[
    FamilySpec {
        source: "istio_requests",
        name: "istio.requests",
        kind: MetricKind::Counter,
        unit: "{request}",
        description: "Requests handled by an Istio proxy.",
    },
    FamilySpec {
        source: "istio_request_duration_milliseconds",
        name: "istio.request.duration",
        kind: MetricKind::Histogram,
        unit: "ms",
        description: "Request durations seen by an Istio proxy.",
    },
    FamilySpec {
        source: "istio_tcp_sent_bytes",
        name: "istio.tcp.sent",
        kind: MetricKind::Counter,
        unit: "By",
        description: "Bytes sent by an Istio proxy on TCP connections.",
    },
    FamilySpec {
        source: "istio_tcp_received_bytes",
        name: "istio.tcp.received",
        kind: MetricKind::Counter,
        unit: "By",
        description: "Bytes received by an Istio proxy on TCP connections.",
    },
    FamilySpec {
        source: "istio_tcp_connections_opened",
        name: "istio.tcp.connections.opened",
        kind: MetricKind::Counter,
        unit: "{connection}",
        description: "TCP connections an Istio proxy opened.",
    },
    FamilySpec {
        source: "istio_tcp_connections_closed",
        name: "istio.tcp.connections.closed",
        kind: MetricKind::Counter,
        unit: "{connection}",
        description: "TCP connections an Istio proxy closed.",
    },
];

/// Where to scrape a pod's proxy: the `prometheus.io/port` and
/// `prometheus.io/path` annotations when set (Istio's metrics merging points
/// them at the agent's merged endpoint), else the proxy's own endpoint.
/// `None` for ambient pods, whose traffic is reported by the node's ztunnel.
pub fn scrape_url(pod_ip: IpAddr, role: MeshRole, annotations: &[(&str, &str)]) -> Option<String> {
    let (default_port, default_path) = match role {
        MeshRole::IstioSidecar => (SIDECAR_PORT, SIDECAR_PATH),
        MeshRole::IstioZtunnel => (ZTUNNEL_PORT, ZTUNNEL_PATH),
        MeshRole::IstioAmbient => return None,
    };
    let annotation = |key: &str| annotations.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let port = annotation("prometheus.io/port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(default_port);
    let path = annotation("prometheus.io/path")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(default_path);
    Some(format!("http://{}{path}", SocketAddr::new(pod_ip, port)))
}

/// Scrapes one proxy and keeps [`ISTIO_FAMILIES`].
pub async fn scrape(scraper: &Scraper, url: &str) -> Result<Vec<ScrapedFamily>, ScrapeError> {
    scraper.scrape(url, ISTIO_FAMILIES).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_from_role_and_annotations() {
        let ip: IpAddr = [10, 0, 1, 7].into();
        assert_eq!(
            scrape_url(ip, MeshRole::IstioSidecar, &[]).as_deref(),
            Some("http://10.0.1.7:15090/stats/prometheus")
        );
        assert_eq!(
            scrape_url(
                ip,
                MeshRole::IstioSidecar,
                &[
                    ("prometheus.io/port", "15020"),
                    ("prometheus.io/path", "/stats/prometheus")
                ]
            )
            .as_deref(),
            Some("http://10.0.1.7:15020/stats/prometheus")
        );
        assert_eq!(
            scrape_url(
                "fd00::7".parse().expect("an address"),
                MeshRole::IstioZtunnel,
                &[("prometheus.io/port", "x")]
            )
            .as_deref(),
            Some("http://[fd00::7]:15020/metrics")
        );
        assert_eq!(scrape_url(ip, MeshRole::IstioAmbient, &[]), None);
    }
}
