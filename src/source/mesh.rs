//! The scrape side of the mesh and CNI sources: one task that, every
//! `mesh.*.interval`, scrapes the Istio proxies of this node's pods (found
//! in the Kubernetes cache) and Calico Felix, each target on its own with
//! the [`Scraper`] limits, and keeps the latest result of each for the
//! exporter. A target that fails is counted by kind and logged once per
//! round; the others go on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::detect::{Detection, MeshRole};
use super::hubble::Enabled;
use super::scrape::{ScrapeError, ScrapeErrorTally, ScrapeLimits, ScrapedFamily, Scraper};
use super::{felix, istio};
use crate::enrich::kubernetes::{PodInfo, Snapshot};

/// The `mesh:` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    pub istio: IstioConfig,
    pub felix: FelixConfig,
}

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
}

impl Default for IstioConfig {
    fn default() -> Self {
        Self {
            enabled: Enabled::Auto,
            interval: Duration::from_secs(15),
            port: None,
            max_bytes: super::scrape::DEFAULT_MAX_BYTES,
            timeout: super::scrape::DEFAULT_TIMEOUT,
        }
    }
}

/// `mesh.felix`: Calico Felix's metrics endpoint on the node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FelixConfig {
    /// `auto`: while detection finds something listening on
    /// `detect.felix_address`; `on`: always (failures are counted); `off`.
    pub enabled: Enabled,
    pub url: String,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub max_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for FelixConfig {
    fn default() -> Self {
        Self {
            enabled: Enabled::Auto,
            url: "http://127.0.0.1:9091/metrics".into(),
            interval: Duration::from_secs(15),
            max_bytes: super::scrape::DEFAULT_MAX_BYTES,
            timeout: super::scrape::DEFAULT_TIMEOUT,
        }
    }
}

/// What kind of endpoint a scrape target is; the `flowtel.scrape.target`
/// attribute of `flowtel.scrape.errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    IstioSidecar,
    Ztunnel,
    Felix,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IstioSidecar => "istio_sidecar",
            Self::Ztunnel => "ztunnel",
            Self::Felix => "felix",
        }
    }
}

/// The latest good scrape of one pod's proxy.
#[derive(Debug, Clone)]
pub struct PodScrape {
    pub pod: Arc<PodInfo>,
    pub kind: TargetKind,
    pub families: Vec<ScrapedFamily>,
}

/// What the exporter reads each interval.
#[derive(Debug, Clone, Default)]
pub struct MeshScrapes {
    /// One per pod whose proxy answered at its latest scrape, by pod uid.
    pub istio: Vec<PodScrape>,
    /// Felix's latest good scrape, if it is scraped and answered.
    pub felix: Option<Vec<ScrapedFamily>>,
    /// Failed scrapes since start, by target kind and error kind.
    pub errors: BTreeMap<(TargetKind, &'static str), u64>,
    /// Scrapes that succeeded since start, by target kind.
    pub scrapes: BTreeMap<TargetKind, u64>,
}

/// The running scrape tasks; dropping it stops them.
#[derive(Debug)]
pub struct MeshHandle {
    shared: Arc<Mutex<MeshScrapes>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MeshHandle {
    /// A copy of the latest results.
    pub fn latest(&self) -> MeshScrapes {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether Istio proxies answered at the latest round.
    pub fn istio_active(&self) -> bool {
        !self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .istio
            .is_empty()
    }
}

impl Drop for MeshHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Where the scrape task finds pods: the Kubernetes cache's latest view.
pub type PodSource = Box<dyn Fn() -> Arc<Snapshot> + Send + Sync>;

/// Starts the scrape tasks the configuration asks for; `None` when none
/// is. `pods` is `None` without Kubernetes, which leaves Istio off.
pub fn start(
    cfg: &MeshConfig,
    node: Option<String>,
    pods: Option<PodSource>,
    detection: watch::Receiver<Detection>,
) -> Result<Option<MeshHandle>, ScrapeError> {
    let shared = Arc::new(Mutex::new(MeshScrapes::default()));
    let mut tasks = Vec::new();
    if cfg.istio.enabled == Enabled::On && pods.is_none() {
        tracing::warn!(
            "mesh.istio.enabled is on but the Kubernetes cache is off: Istio proxies are found through it, so none will be scraped"
        );
    }
    if let (Some(pods), true) = (pods, cfg.istio.enabled != Enabled::Off) {
        let scraper = Scraper::new(ScrapeLimits {
            max_bytes: cfg.istio.max_bytes,
            timeout: cfg.istio.timeout,
        })?;
        tracing::info!(interval = ?cfg.istio.interval, "istio source: scraping the proxies of this node's pods");
        tasks.push(tokio::spawn(istio_loop(
            scraper,
            cfg.istio.clone(),
            node,
            pods,
            Arc::clone(&shared),
        )));
    }
    if cfg.felix.enabled != Enabled::Off {
        let scraper = Scraper::new(ScrapeLimits {
            max_bytes: cfg.felix.max_bytes,
            timeout: cfg.felix.timeout,
        })?;
        tasks.push(tokio::spawn(felix_loop(
            scraper,
            cfg.felix.clone(),
            detection,
            Arc::clone(&shared),
        )));
    }
    Ok((!tasks.is_empty()).then_some(MeshHandle { shared, tasks }))
}

/// Proxies scraped at the same time.
const MAX_CONCURRENT_SCRAPES: usize = 32;

fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Logs the errors of one round: one line per target kind and error kind,
/// with the count and the first message.
fn log_round(kind: TargetKind, tally: &mut ScrapeErrorTally) {
    for (error, count, first) in tally.take() {
        tracing::warn!(
            target_kind = kind.as_str(),
            error = error,
            count,
            "scrapes failed this round; first: {first}"
        );
    }
}

/// The proxies of this node's pods and where to scrape each.
fn targets(
    snapshot: &Snapshot,
    node: Option<&str>,
    port: Option<u16>,
) -> Vec<(Arc<PodInfo>, TargetKind, String)> {
    let mut out = Vec::new();
    for (ip, pod) in snapshot.mesh_pods(node) {
        let Some(mesh) = &pod.mesh else { continue };
        let kind = match mesh.role {
            MeshRole::IstioSidecar => TargetKind::IstioSidecar,
            MeshRole::IstioZtunnel => TargetKind::Ztunnel,
            MeshRole::IstioAmbient => continue,
        };
        let port_text;
        let mut annotations: Vec<(&str, &str)> = Vec::new();
        if let Some(p) = port.or(mesh.port) {
            port_text = p.to_string();
            annotations.push(("prometheus.io/port", &port_text));
        }
        if let Some(path) = &mesh.path {
            annotations.push(("prometheus.io/path", path));
        }
        if let Some(url) = istio::scrape_url(ip, mesh.role, &annotations) {
            out.push((pod, kind, url));
        }
    }
    out
}

async fn istio_loop(
    scraper: Scraper,
    cfg: IstioConfig,
    node: Option<String>,
    pods: PodSource,
    shared: Arc<Mutex<MeshScrapes>>,
) {
    let mut tick = ticker(cfg.interval);
    let mut tally = ScrapeErrorTally::default();
    loop {
        tick.tick().await;
        let targets = targets(&pods(), node.as_deref(), cfg.port);
        // Concurrently, so one slow proxy costs one timeout, not one per
        // proxy after it; bounded, so a node with hundreds of meshed pods
        // does not open hundreds of connections at once.
        let scrapes: Vec<_> = targets
            .iter()
            .map(|(_, _, url)| {
                let (scraper, url) = (scraper.clone(), url.clone());
                async move { istio::scrape(&scraper, &url).await }
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(scrapes)
            .buffered(MAX_CONCURRENT_SCRAPES)
            .collect()
            .await;
        let mut good = Vec::with_capacity(targets.len());
        let mut failed: Vec<(TargetKind, &'static str)> = Vec::new();
        let mut previous = shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .istio
            .clone();
        for ((pod, kind, url), result) in targets.into_iter().zip(results) {
            match result {
                Ok(families) => good.push(PodScrape {
                    pod,
                    kind,
                    families,
                }),
                Err(e) => {
                    tracing::debug!(%url, "scrape failed: {e}");
                    tally.record(&e);
                    failed.push((kind, e.kind()));
                    // The last good values stay: the series are cumulative,
                    // and a missed scrape must not make them vanish.
                    if let Some(i) = previous.iter().position(|p| p.pod.uid == pod.uid) {
                        good.push(previous.swap_remove(i));
                    }
                }
            }
        }
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        for p in &good {
            *s.scrapes.entry(p.kind).or_default() += 1;
        }
        for key in failed {
            *s.errors.entry(key).or_default() += 1;
        }
        s.istio = good;
        drop(s);
        log_round(TargetKind::IstioSidecar, &mut tally);
    }
}

async fn felix_loop(
    scraper: Scraper,
    cfg: FelixConfig,
    detection: watch::Receiver<Detection>,
    shared: Arc<Mutex<MeshScrapes>>,
) {
    let mut tick = ticker(cfg.interval);
    let mut tally = ScrapeErrorTally::default();
    let mut announced = false;
    loop {
        tick.tick().await;
        if cfg.enabled == Enabled::Auto && !detection.borrow().felix {
            continue;
        }
        if !announced {
            tracing::info!(url = %cfg.url, "felix source: scraping");
            announced = true;
        }
        let result = scraper.scrape(&cfg.url, felix::FELIX_FAMILIES).await;
        let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(families) => {
                *s.scrapes.entry(TargetKind::Felix).or_default() += 1;
                s.felix = Some(families);
            }
            Err(e) => {
                *s.errors.entry((TargetKind::Felix, e.kind())).or_default() += 1;
                drop(s);
                tally.record(&e);
                log_round(TargetKind::Felix, &mut tally);
            }
        }
    }
}

/// Checks a `mesh:` section; errors name the key.
pub fn validate(cfg: &MeshConfig) -> Result<(), (String, String)> {
    let err = |k: &str, r: &str| Err((format!("mesh.{k}"), r.to_owned()));
    for (name, interval, max_bytes, timeout) in [
        (
            "istio",
            cfg.istio.interval,
            cfg.istio.max_bytes,
            cfg.istio.timeout,
        ),
        (
            "felix",
            cfg.felix.interval,
            cfg.felix.max_bytes,
            cfg.felix.timeout,
        ),
    ] {
        if interval.is_zero() {
            return err(
                &format!("{name}.interval"),
                "must be greater than 0, e.g. \"15s\"",
            );
        }
        if max_bytes < 4096 {
            return err(&format!("{name}.max_bytes"), "must be at least 4096");
        }
        if timeout.is_zero() || timeout > interval {
            return err(
                &format!("{name}.timeout"),
                "must be greater than 0 and at most the interval",
            );
        }
    }
    if cfg.istio.port == Some(0) {
        return err("istio.port", "must be a port between 1 and 65535");
    }
    match url::Url::parse(&cfg.felix.url) {
        Ok(u) if u.scheme() == "http" && u.host().is_some() => Ok(()),
        _ => err(
            "felix.url",
            "must be an http:// URL, e.g. \"http://127.0.0.1:9091/metrics\"",
        ),
    }
}
