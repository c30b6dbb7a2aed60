//! The `flows.anomaly` section: one threshold (or list) per detector, 0
//! (or empty) turning it off, and the limits that bound their memory.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::component::{positive, ConfigError};

/// Ports where a first connection between two workloads is worth an event:
/// databases, caches, search, message brokers, remote shells and the
/// Kubernetes control plane.
pub const DEFAULT_LATERAL_PORTS: &[u16] = &[
    22, 1433, 1521, 2379, 2380, 3306, 3389, 5432, 5672, 5900, 5984, 6379, 6443, 9042, 9092, 9200,
    10250, 11211, 27017,
];

/// The `flows.anomaly` section. A threshold of 0 turns its detector off.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Distinct ports of one host one client tries without exchanging
    /// payload within `window`: a port scan.
    pub scan_ports: usize,
    /// Distinct hosts one client tries on one port without exchanging
    /// payload within `window`: a sweep.
    pub sweep_hosts: usize,
    /// Distinct suspicious names (a label of `dns_label_length` characters
    /// or more, or a random-looking label of 20 or more) one client looks
    /// up within `window`: DNS tunnelling.
    pub dns_tunnel_names: usize,
    pub dns_label_length: usize,
    /// TXT and NULL lookups one client makes within `window`: data carried
    /// in DNS answers (`dns_txt_volume`).
    pub dns_txt_queries: usize,
    /// How long a detector counts towards its threshold, and how long an
    /// anomaly stays ongoing after its last new member or anomalous
    /// interval.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Keys each detector follows at once (client and host, client and
    /// port, client, workload pair).
    pub max_tracked: usize,
    /// How long a baseline is learned before it can alarm: a pair's
    /// traffic, a workload's egress, edges and protocols.
    #[serde(with = "humantime_serde")]
    pub learning: Duration,
    /// A pair's bytes in an interval at this many times its mean (and
    /// `traffic_sigma` deviations above it): a spike.
    pub spike_factor: f64,
    /// A pair's bytes in an interval at its mean divided by this (and
    /// `traffic_sigma` deviations below it): a drop.
    pub drop_factor: f64,
    /// The variance band: deviations from the mean a spike or a drop must
    /// also pass, so noisy pairs need a larger change.
    pub traffic_sigma: f64,
    /// Bytes per interval below which a pair never alarms: the spike's
    /// interval, and the drop's mean.
    pub traffic_min_bytes: u64,
    /// Bytes per interval one workload sends to `exfil_networks` that
    /// count as exfiltration when also `spike_factor` times and
    /// `traffic_sigma` deviations above its baseline.
    pub exfil_min_bytes: u64,
    /// Named networks (`enrich.networks`, `enrich.unmatched_network`) that
    /// are outside the cluster.
    pub exfil_networks: Vec<String>,
    /// Server ports where a workload's first connection to a peer it never
    /// reached before is lateral movement; empty turns it off.
    pub lateral_ports: Vec<u16>,
    /// Report a transport and server port a workload never used before.
    pub unusual_protocols: bool,
    /// Share of a pair's connections on one port that failed, were reset
    /// or timed out within an interval: a high error rate.
    pub error_ratio: f64,
    /// Connections that ended within the interval below which the error
    /// rate is not judged.
    pub error_min_connections: u64,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            scan_ports: 100,
            sweep_hosts: 64,
            dns_tunnel_names: 20,
            dns_label_length: 40,
            dns_txt_queries: 100,
            window: Duration::from_secs(60),
            max_tracked: 4_096,
            learning: Duration::from_secs(600),
            spike_factor: 5.0,
            drop_factor: 5.0,
            traffic_sigma: 4.0,
            traffic_min_bytes: 1_000_000,
            exfil_min_bytes: 100_000_000,
            exfil_networks: vec!["internet".into()],
            lateral_ports: DEFAULT_LATERAL_PORTS.to_vec(),
            unusual_protocols: true,
            error_ratio: 0.5,
            error_min_connections: 20,
        }
    }
}

/// A factor of 0 (off) or more than 1.
fn factor(key: &str, v: f64) -> Result<(), ConfigError> {
    if v == 0.0 || (v.is_finite() && v > 1.0) {
        return Ok(());
    }
    Err(ConfigError::new(
        key,
        "must be 0 (off) or a number above 1, e.g. 5",
    ))
}

impl AnomalyConfig {
    /// Checks what serde cannot; keys are relative to `flows.anomaly`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("window", self.window, "60s")?;
        positive("learning", self.learning, "10m")?;
        if self.max_tracked == 0 {
            return Err(ConfigError::new(
                "max_tracked",
                "must be at least 1 (turn detectors off with a threshold of 0)",
            ));
        }
        for (key, v) in [
            ("scan_ports", self.scan_ports),
            ("sweep_hosts", self.sweep_hosts),
            ("dns_tunnel_names", self.dns_tunnel_names),
            ("dns_txt_queries", self.dns_txt_queries),
        ] {
            if v == 1 {
                return Err(ConfigError::new(
                    key,
                    "1 would report every attempt: use 0 to turn the detector off, or a count such as 100",
                ));
            }
        }
        if self.dns_label_length < 20 && self.dns_tunnel_names > 0 {
            return Err(ConfigError::new(
                "dns_label_length",
                "must be at least 20 (ordinary names have labels that long), e.g. 40",
            ));
        }
        factor("spike_factor", self.spike_factor)?;
        factor("drop_factor", self.drop_factor)?;
        if !(self.traffic_sigma.is_finite() && self.traffic_sigma >= 0.0) {
            return Err(ConfigError::new(
                "traffic_sigma",
                "must be a number of standard deviations, 0 or more, e.g. 4",
            ));
        }
        let traffic = self.spike_factor > 0.0 || self.drop_factor > 0.0;
        if traffic && self.traffic_min_bytes == 0 {
            return Err(ConfigError::new(
                "traffic_min_bytes",
                "must be at least 1 byte per interval, or idle pairs would alarm, e.g. 1000000",
            ));
        }
        if self.exfil_min_bytes > 0 && self.exfil_networks.iter().all(|n| n.trim().is_empty()) {
            return Err(ConfigError::new(
                "exfil_networks",
                "must name at least one network outside the cluster, e.g. [internet] (or set exfil_min_bytes to 0)",
            ));
        }
        if self.exfil_min_bytes > 0 && self.spike_factor == 0.0 {
            return Err(ConfigError::new(
                "spike_factor",
                "exfiltration compares with the baseline by spike_factor: set it above 1, e.g. 5, or exfil_min_bytes to 0",
            ));
        }
        if self.lateral_ports.contains(&0) {
            return Err(ConfigError::new(
                "lateral_ports",
                "port 0 is no server port: list ports such as [5432, 3306]",
            ));
        }
        if !(self.error_ratio.is_finite() && (0.0..=1.0).contains(&self.error_ratio)) {
            return Err(ConfigError::new(
                "error_ratio",
                "must be a share between 0 (off) and 1, e.g. 0.5",
            ));
        }
        if self.error_ratio > 0.0 && self.error_min_connections < 2 {
            return Err(ConfigError::new(
                "error_min_connections",
                "must be at least 2, or one failed connection would alarm, e.g. 20",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        let key = |f: fn(&mut AnomalyConfig)| {
            let mut c = AnomalyConfig::default();
            f(&mut c);
            c.validate().err().map(|e| e.key)
        };
        assert_eq!(key(|_| {}), None);
        assert_eq!(
            key(|c| c.spike_factor = 1.0).as_deref(),
            Some("spike_factor")
        );
        assert_eq!(
            key(|c| c.drop_factor = f64::NAN).as_deref(),
            Some("drop_factor")
        );
        assert_eq!(
            key(|c| c.traffic_sigma = -1.0).as_deref(),
            Some("traffic_sigma")
        );
        assert_eq!(
            key(|c| c.traffic_min_bytes = 0).as_deref(),
            Some("traffic_min_bytes")
        );
        assert_eq!(
            key(|c| c.exfil_networks.clear()).as_deref(),
            Some("exfil_networks")
        );
        assert_eq!(
            key(|c| c.lateral_ports = vec![0]).as_deref(),
            Some("lateral_ports")
        );
        assert_eq!(key(|c| c.error_ratio = 1.5).as_deref(), Some("error_ratio"));
        assert_eq!(
            key(|c| c.error_min_connections = 1).as_deref(),
            Some("error_min_connections")
        );
        assert_eq!(
            key(|c| c.dns_txt_queries = 1).as_deref(),
            Some("dns_txt_queries")
        );
        assert_eq!(
            key(|c| c.learning = Duration::ZERO).as_deref(),
            Some("learning")
        );
        // Every detector off is valid.
        assert_eq!(
            key(|c| {
                c.spike_factor = 0.0;
                c.drop_factor = 0.0;
                c.traffic_min_bytes = 0;
                c.exfil_min_bytes = 0;
                c.exfil_networks.clear();
                c.lateral_ports.clear();
                c.error_ratio = 0.0;
                c.error_min_connections = 0;
            }),
            None
        );
    }
}
