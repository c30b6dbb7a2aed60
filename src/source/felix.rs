//! Calico Felix's Prometheus endpoint on the node: the dataplane and policy
//! families flowtel keeps and their OTel names. Felix's Go client writes
//! counters without `_total`; both spellings are read.

use std::net::SocketAddr;

use super::scrape::{FamilySpec, MetricKind, ScrapeError, ScrapedFamily, Scraper};

/// Felix's metrics path (`prometheusMetricsPort`, 9091 by default).
pub const METRICS_PATH: &str = "/metrics";

const fn counter(
    source: &'static str,
    name: &'static str,
    unit: &'static str,
    description: &'static str,
) -> FamilySpec {
    FamilySpec {
        source,
        name,
        kind: MetricKind::Counter,
        unit,
        description,
    }
}

const fn gauge(
    source: &'static str,
    name: &'static str,
    unit: &'static str,
    description: &'static str,
) -> FamilySpec {
    FamilySpec {
        source,
        name,
        kind: MetricKind::Gauge,
        unit,
        description,
    }
}

/// The kept Felix families. `calico_denied_*` come from Felix's policy
/// reporter (`prometheusReporterEnabled`), which Felix serves on its own
/// port (9092 by default); they are kept wherever they appear. They are
/// gauges in Felix: per source address and policy, and aged out.
pub static FELIX_FAMILIES: &[FamilySpec] = &[
    gauge(
        "calico_denied_packets",
        "calico.denied.packets",
        "{packet}",
        "Packets denied by Calico policy, per policy and source address.",
    ),
    gauge(
        "calico_denied_bytes",
        "calico.denied.bytes",
        "By",
        "Bytes denied by Calico policy, per policy and source address.",
    ),
    gauge(
        "felix_active_local_endpoints",
        "felix.active.local.endpoints",
        "{endpoint}",
        "Endpoints active on this node.",
    ),
    gauge(
        "felix_active_local_policies",
        "felix.active.local.policies",
        "{policy}",
        "Policies active on this node.",
    ),
    gauge(
        "felix_cluster_num_policies",
        "felix.cluster.policies",
        "{policy}",
        "Policies in the cluster.",
    ),
    gauge(
        "felix_iptables_rules",
        "felix.iptables.rules",
        "{rule}",
        "iptables rules Felix programmed, per table and IP version.",
    ),
    gauge(
        "felix_ipsets_calico",
        "felix.ipsets",
        "{ipset}",
        "Calico IP sets in the dataplane.",
    ),
    gauge(
        "felix_bpf_dataplane_endpoints",
        "felix.bpf.dataplane.endpoints",
        "{endpoint}",
        "Endpoints the BPF dataplane manages.",
    ),
    gauge(
        "felix_bpf_dirty_dataplane_endpoints",
        "felix.bpf.dataplane.endpoints.dirty",
        "{endpoint}",
        "BPF endpoints left unprogrammed after a failure.",
    ),
    gauge(
        "felix_resync_state",
        "felix.resync.state",
        "1",
        "Felix's datastore sync state (3: in sync).",
    ),
    counter(
        "felix_int_dataplane_failures",
        "felix.dataplane.failures",
        "{failure}",
        "Dataplane updates that failed and will be retried.",
    ),
    counter(
        "felix_int_dataplane_messages",
        "felix.dataplane.messages",
        "{message}",
        "Dataplane messages, per type.",
    ),
    counter(
        "felix_iptables_restore_errors",
        "felix.iptables.restore.errors",
        "{error}",
        "iptables-restore failures.",
    ),
    counter(
        "felix_iptables_save_errors",
        "felix.iptables.save.errors",
        "{error}",
        "iptables-save failures.",
    ),
    counter(
        "felix_ipset_errors",
        "felix.ipset.errors",
        "{error}",
        "ipset command failures.",
    ),
    counter(
        "felix_resyncs_started",
        "felix.resyncs.started",
        "{resync}",
        "Datastore resyncs Felix started.",
    ),
];

/// The URL of Felix's endpoint at `address`.
pub fn metrics_url(address: SocketAddr) -> String {
    format!("http://{address}{METRICS_PATH}")
}

/// Scrapes Felix at `address` and keeps [`FELIX_FAMILIES`].
pub async fn scrape(
    scraper: &Scraper,
    address: SocketAddr,
) -> Result<Vec<ScrapedFamily>, ScrapeError> {
    scraper.scrape(&metrics_url(address), FELIX_FAMILIES).await
}
