//! The Felix source: Calico Felix's Prometheus endpoint on the node,
//! scraped every `mesh.felix.interval`, and the dataplane and policy
//! families flowtel keeps under their OTel names. Felix's Go client writes
//! counters without `_total`; both spellings are read.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::detect::Detection;
use super::hubble::Enabled;
use super::scrape::{
    self, FamilySpec, ScrapeCounts, ScrapeLimits, ScrapeState, Scraped, Scraper, TargetKind,
};
use super::{Source, SourceContext};
use crate::component::ConfigError;
use crate::flow::mesh::{Family, FamilyGroup, MeshUpdate};
use crate::telemetry::catalogue;

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
    /// Most series of the kept families one scrape may produce.
    pub max_series: usize,
}

impl Default for FelixConfig {
    fn default() -> Self {
        Self {
            enabled: Enabled::Auto,
            url: "http://127.0.0.1:9091/metrics".into(),
            interval: Duration::from_secs(15),
            max_bytes: scrape::DEFAULT_MAX_BYTES,
            timeout: scrape::DEFAULT_TIMEOUT,
            max_series: scrape::DEFAULT_MAX_SERIES,
        }
    }
}

impl FelixConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        scrape::check_settings(
            self.interval,
            &ScrapeLimits {
                max_bytes: self.max_bytes,
                timeout: self.timeout,
                max_series: self.max_series,
            },
        )?;
        match url::Url::parse(&self.url) {
            Ok(u) if u.scheme() == "http" && u.host().is_some() => Ok(()),
            _ => Err(ConfigError::new(
                "url",
                "must be an http:// URL, e.g. \"http://127.0.0.1:9091/metrics\"",
            )),
        }
    }
}

/// Felix's metrics path (`prometheusMetricsPort`, 9091 by default).
pub const METRICS_PATH: &str = "/metrics";

/// The kept Felix families. `calico_denied_*` come from Felix's policy
/// reporter (`prometheusReporterEnabled`), which Felix serves on its own
/// port (9092 by default); they are kept wherever they appear. They are
/// gauges in Felix: per source address and policy, and aged out.
pub static FELIX_FAMILIES: &[FamilySpec] = &[
    FamilySpec {
        source: "calico_denied_packets",
        metric: &catalogue::CALICO_DENIED_PACKETS,
    },
    FamilySpec {
        source: "calico_denied_bytes",
        metric: &catalogue::CALICO_DENIED_BYTES,
    },
    FamilySpec {
        source: "felix_active_local_endpoints",
        metric: &catalogue::FELIX_ACTIVE_LOCAL_ENDPOINTS,
    },
    FamilySpec {
        source: "felix_active_local_policies",
        metric: &catalogue::FELIX_ACTIVE_LOCAL_POLICIES,
    },
    FamilySpec {
        source: "felix_cluster_num_policies",
        metric: &catalogue::FELIX_CLUSTER_POLICIES,
    },
    FamilySpec {
        source: "felix_iptables_rules",
        metric: &catalogue::FELIX_IPTABLES_RULES,
    },
    FamilySpec {
        source: "felix_ipsets_calico",
        metric: &catalogue::FELIX_IPSETS,
    },
    FamilySpec {
        source: "felix_bpf_dataplane_endpoints",
        metric: &catalogue::FELIX_BPF_ENDPOINTS,
    },
    FamilySpec {
        source: "felix_bpf_dirty_dataplane_endpoints",
        metric: &catalogue::FELIX_BPF_ENDPOINTS_DIRTY,
    },
    FamilySpec {
        source: "felix_resync_state",
        metric: &catalogue::FELIX_RESYNC_STATE,
    },
    FamilySpec {
        source: "felix_int_dataplane_failures",
        metric: &catalogue::FELIX_DATAPLANE_FAILURES,
    },
    FamilySpec {
        source: "felix_int_dataplane_messages",
        metric: &catalogue::FELIX_DATAPLANE_MESSAGES,
    },
    FamilySpec {
        source: "felix_iptables_restore_errors",
        metric: &catalogue::FELIX_IPTABLES_RESTORE_ERRORS,
    },
    FamilySpec {
        source: "felix_iptables_save_errors",
        metric: &catalogue::FELIX_IPTABLES_SAVE_ERRORS,
    },
    FamilySpec {
        source: "felix_ipset_errors",
        metric: &catalogue::FELIX_IPSET_ERRORS,
    },
    FamilySpec {
        source: "felix_resyncs_started",
        metric: &catalogue::FELIX_RESYNCS_STARTED,
    },
];

/// The URL of Felix's endpoint at `address`.
pub fn metrics_url(address: SocketAddr) -> String {
    format!("http://{address}{METRICS_PATH}")
}

/// Felix's latest good scrape and the scrape counts.
#[derive(Debug, Default)]
struct State {
    families: Option<Vec<Family>>,
    counts: ScrapeCounts,
}

impl ScrapeState for State {
    fn update(&self) -> MeshUpdate {
        let mut groups = vec![FamilyGroup {
            attributes: Vec::new(),
            families: self.counts.families(),
        }];
        if let Some(families) = &self.families {
            groups.push(FamilyGroup {
                attributes: Vec::new(),
                families: families.clone(),
            });
        }
        MeshUpdate {
            source: "felix",
            active: self.families.is_some(),
            groups,
            events: Vec::new(),
        }
    }
}

/// Starts the source unless `mesh.felix.enabled` is `off`.
pub fn build(cfg: &FelixConfig, ctx: &SourceContext) -> anyhow::Result<Option<Box<dyn Source>>> {
    if cfg.enabled == Enabled::Off {
        return Ok(None);
    }
    let scraper = Scraper::new(ScrapeLimits {
        max_bytes: cfg.max_bytes,
        timeout: cfg.timeout,
        max_series: cfg.max_series,
    })
    .map_err(|e| anyhow::anyhow!("starting the Felix scrapes: {e}"))?;
    let (cfg, detection) = (cfg.clone(), ctx.detection.clone());
    Ok(Some(Box::new(Scraped::spawn(
        "felix",
        ctx.events.clone(),
        |state: Arc<Mutex<State>>| scrape_loop(scraper, cfg, detection, state),
    ))))
}

async fn scrape_loop(
    scraper: Scraper,
    cfg: FelixConfig,
    detection: watch::Receiver<Detection>,
    state: Arc<Mutex<State>>,
) {
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        let result = scraper.scrape(&cfg.url, FELIX_FAMILIES).await;
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(parsed) => {
                s.counts.scraped(TargetKind::Felix, &parsed);
                s.families = Some(parsed.families);
            }
            Err(e) => s.counts.failure(TargetKind::Felix, &e),
        }
        s.counts.log_round(TargetKind::Felix);
    }
}
