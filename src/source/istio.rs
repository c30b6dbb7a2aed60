//! The Istio source: the Envoy sidecars and ztunnel of this node's pods
//! (found in the Kubernetes cache), each scraped every
//! `mesh.istio.interval` on its own within the [`Scraper`] limits, and
//! Istio's standard families kept under their OTel names. A proxy that
//! fails is counted by kind and logged once per round; the others go on,
//! and its last good values stay (the series are cumulative, and a missed
//! scrape must not make them vanish).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::hubble::Enabled;
use super::scrape::{
    self, FamilySpec, Parsed, ScrapeCounts, ScrapeError, ScrapeLimits, ScrapeState, Scraped,
    Scraper, TargetKind,
};
use super::{Source, SourceContext};
use crate::component::ConfigError;
use crate::flow::mesh::{Family, FamilyGroup, MeshRole, MeshUpdate, ProxyTarget, ProxyTargets};
use crate::telemetry::catalogue;

/// `mesh.istio`: the Envoy sidecars and ztunnel of this node's pods.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IstioConfig {
    /// `auto` and `on` both scrape the proxies the Kubernetes cache finds
    /// (there is nothing to scrape without it); `off` never does.
    pub enabled: Enabled,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Scrape this port on every proxy instead of the pod's
    /// `prometheus.io/port` annotation or the proxy's default (15090/15020).
    pub port: Option<u16>,
    /// Largest response accepted from one proxy.
    pub max_bytes: usize,
    /// Time allowed for one proxy's whole scrape.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most series of the kept families one proxy's scrape may produce.
    pub max_series: usize,
}

impl Default for IstioConfig {
    fn default() -> Self {
        Self {
            enabled: Enabled::Auto,
            interval: Duration::from_secs(15),
            port: None,
            max_bytes: scrape::DEFAULT_MAX_BYTES,
            timeout: scrape::DEFAULT_TIMEOUT,
            max_series: scrape::DEFAULT_MAX_SERIES,
        }
    }
}

impl IstioConfig {
    /// The limits of each proxy's scrape.
    pub fn limits(&self) -> ScrapeLimits {
        ScrapeLimits {
            max_bytes: self.max_bytes,
            timeout: self.timeout,
            max_series: self.max_series,
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        scrape::check_settings(self.interval, &self.limits())?;
        if self.port == Some(0) {
            return Err(ConfigError::new(
                "port",
                "must be a port between 1 and 65535",
            ));
        }
        Ok(())
    }
}

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
        metric: &catalogue::ISTIO_REQUESTS,
    },
    FamilySpec {
        source: "istio_request_duration_milliseconds",
        metric: &catalogue::ISTIO_REQUEST_DURATION,
    },
    FamilySpec {
        source: "istio_tcp_sent_bytes",
        metric: &catalogue::ISTIO_TCP_SENT,
    },
    FamilySpec {
        source: "istio_tcp_received_bytes",
        metric: &catalogue::ISTIO_TCP_RECEIVED,
    },
    FamilySpec {
        source: "istio_tcp_connections_opened",
        metric: &catalogue::ISTIO_TCP_OPENED,
    },
    FamilySpec {
        source: "istio_tcp_connections_closed",
        metric: &catalogue::ISTIO_TCP_CLOSED,
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

/// Scrapes one proxy and keeps [`ISTIO_FAMILIES`], within the scraper's
/// series budget.
pub async fn scrape(scraper: &Scraper, url: &str) -> Result<Parsed, ScrapeError> {
    scraper.scrape(url, ISTIO_FAMILIES).await
}

/// Proxies scraped at the same time.
const MAX_CONCURRENT_SCRAPES: usize = 32;

/// The latest good scrape of one pod's proxy.
#[derive(Debug, Clone)]
struct PodScrape {
    target: ProxyTarget,
    kind: TargetKind,
    families: Vec<Family>,
}

/// What the scrape task keeps for the source to send.
#[derive(Debug, Default)]
struct State {
    /// One per pod whose proxy answered at its latest scrape.
    pods: Vec<PodScrape>,
    counts: ScrapeCounts,
}

impl ScrapeState for State {
    /// Each proxy's families, named by its pod, and the scrape counts.
    fn update(&self) -> MeshUpdate {
        let mut groups: Vec<FamilyGroup> = self
            .pods
            .iter()
            .map(|p| FamilyGroup {
                attributes: pod_attributes(&p.target, p.kind),
                families: p.families.clone(),
            })
            .collect();
        groups.push(FamilyGroup {
            attributes: Vec::new(),
            families: self.counts.families(),
        });
        MeshUpdate {
            source: "istio",
            active: !self.pods.is_empty(),
            groups,
            events: Vec::new(),
        }
    }
}

/// The attributes naming a proxy's pod, as a flow's local end is named
/// (`docs/telemetry.md`, "Attributes of a flow series"), and the kind of
/// proxy.
fn pod_attributes(target: &ProxyTarget, kind: TargetKind) -> Vec<(&'static str, String)> {
    let pod = &target.pod;
    let mut attrs = Vec::new();
    let mut put = |key, value: &Option<Arc<str>>| {
        if let Some(v) = value {
            attrs.push((key, v.to_string()));
        }
    };
    put(catalogue::K8S_NAMESPACE, &pod.namespace);
    put(catalogue::K8S_POD, &pod.pod);
    put(catalogue::K8S_POD_UID, &pod.pod_uid);
    put(catalogue::K8S_WORKLOAD_KIND, &pod.workload_kind);
    put(catalogue::K8S_WORKLOAD, &pod.workload);
    if let (Some(kind), Some(name)) = (&pod.workload_kind, &pod.workload) {
        if let Some(key) = catalogue::workload_attribute(kind) {
            attrs.push((key, name.to_string()));
        }
    }
    attrs.push((catalogue::ISTIO_PROXY, kind.as_str().to_owned()));
    attrs
}

/// Starts the source when the configuration and the Kubernetes cache
/// allow it (`ctx.proxies` is taken: only this source scrapes proxies).
pub fn build(
    cfg: &IstioConfig,
    ctx: &mut SourceContext,
) -> anyhow::Result<Option<Box<dyn Source>>> {
    if cfg.enabled == Enabled::Off {
        return Ok(None);
    }
    let Some(targets) = ctx.proxies.take() else {
        if cfg.enabled == Enabled::On {
            tracing::warn!(
                "mesh.istio.enabled is on but the Kubernetes cache is off: Istio proxies are found through it, so none will be scraped"
            );
        }
        return Ok(None);
    };
    let scraper = Scraper::new(cfg.limits())
        .map_err(|e| anyhow::anyhow!("starting the Istio scrapes: {e}"))?;
    tracing::info!(interval = ?cfg.interval, "istio source: scraping the proxies of this node's pods");
    let cfg = cfg.clone();
    Ok(Some(Box::new(Scraped::spawn(
        "istio",
        ctx.events.clone(),
        |state: Arc<Mutex<State>>| scrape_loop(scraper, cfg, targets, state),
    ))))
}

/// Where to scrape each proxy, with `port` overriding the annotations.
fn urls(targets: &[ProxyTarget], port: Option<u16>) -> Vec<Option<String>> {
    targets
        .iter()
        .map(|t| {
            let port_text;
            let mut annotations: Vec<(&str, &str)> = Vec::new();
            if let Some(p) = port.or(t.port) {
                port_text = p.to_string();
                annotations.push(("prometheus.io/port", &port_text));
            }
            if let Some(path) = &t.path {
                annotations.push(("prometheus.io/path", path));
            }
            scrape_url(t.ip, t.role, &annotations)
        })
        .collect()
}

async fn scrape_loop(
    scraper: Scraper,
    cfg: IstioConfig,
    targets: ProxyTargets,
    state: Arc<Mutex<State>>,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let targets = targets();
        let urls = urls(&targets, cfg.port);
        // Concurrently, so one slow proxy costs one timeout, not one per
        // proxy after it; bounded, so a node with hundreds of meshed pods
        // does not open hundreds of connections at once.
        let scrapes: Vec<_> = urls
            .iter()
            .map(|url| {
                let (scraper, url) = (scraper.clone(), url.clone());
                async move {
                    match url {
                        Some(url) => Some(scrape(&scraper, &url).await),
                        None => None,
                    }
                }
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(scrapes)
            .buffered(MAX_CONCURRENT_SCRAPES)
            .collect()
            .await;
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut previous = std::mem::take(&mut s.pods);
        for ((target, url), result) in targets.into_iter().zip(urls).zip(results) {
            let kind = match target.role {
                MeshRole::IstioZtunnel => TargetKind::Ztunnel,
                _ => TargetKind::IstioSidecar,
            };
            match result {
                None => {}
                Some(Ok(parsed)) => {
                    s.counts.scraped(kind, &parsed);
                    s.pods.push(PodScrape {
                        target,
                        kind,
                        families: parsed.families,
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(url = url.as_deref().unwrap_or(""), "scrape failed: {e}");
                    s.counts.failure(kind, &e);
                    // The last good values stay: the series are cumulative,
                    // and a missed scrape must not make them vanish.
                    let uid = &target.pod.pod_uid;
                    if let Some(i) = previous.iter().position(|p| p.target.pod.pod_uid == *uid) {
                        s.pods.push(previous.swap_remove(i));
                    }
                }
            }
        }
        s.counts.log_round(TargetKind::IstioSidecar);
    }
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
