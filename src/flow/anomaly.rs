//! Anomaly detection on the node: port scans and host sweeps in the flows,
//! DNS tunnelling in the lookups, each reported as one `flowtel.anomaly`
//! log event when it starts and an update per interval while it grows.
//!
//! A scan or sweep is counted from attempts that exchanged no payload (a
//! refused, unanswered or immediately closed connection, a UDP datagram
//! without reply), so busy clients such as a Prometheus scraping hundreds
//! of pods never count. Every detector keeps at most `max_tracked` keys
//! (what does not fit is counted in `flowtel.anomaly.untracked`) and at most
//! 16 × its threshold members per key, so memory is bounded whatever the
//! traffic: docs/telemetry.md ("Anomaly events") gives the figures.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::dns::DnsRecord;
use super::mesh::{LogEvent, Severity, Value};
use super::model::{FlowUpdate, Transport};
use super::names::{EndName, FlowNames};
use crate::component::{positive, ConfigError};
use crate::telemetry::{catalogue, Counter, Telemetry};

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
    /// How long a detector counts towards its threshold, and how long an
    /// anomaly stays ongoing after its last new member.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Keys each detector follows at once (client and host, client and
    /// port, client).
    pub max_tracked: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            scan_ports: 100,
            sweep_hosts: 64,
            dns_tunnel_names: 20,
            dns_label_length: 40,
            window: Duration::from_secs(60),
            max_tracked: 4_096,
        }
    }
}

impl AnomalyConfig {
    /// Checks what serde cannot; keys are relative to `flows.anomaly`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("window", self.window, "60s")?;
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
        Ok(())
    }
}

/// What a detector reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyKind {
    PortScan,
    HostSweep,
    DnsTunnel,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 3] = [Self::PortScan, Self::HostSweep, Self::DnsTunnel];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PortScan => "port_scan",
            Self::HostSweep => "host_sweep",
            Self::DnsTunnel => "dns_tunnel",
        }
    }
}

/// Members of one key, counted from its first one.
#[derive(Debug)]
struct Tracked<M> {
    first: Instant,
    last_new: Instant,
    members: HashSet<M>,
    /// Members at the last event; 0 before the first.
    reported: usize,
    /// The client's names when first seen, for the event.
    names: Option<Arc<EndName>>,
    /// An example member for the event (the longest DNS name).
    example: Option<Arc<str>>,
}

/// One detector's keys: distinct members per key within a window.
#[derive(Debug)]
struct Tally<K, M> {
    threshold: usize,
    keys: HashMap<K, Tracked<M>>,
}

impl<K: Hash + Eq + Clone, M: Hash + Eq> Tally<K, M> {
    fn new(threshold: usize) -> Self {
        Self {
            threshold,
            keys: HashMap::new(),
        }
    }

    /// Adds `member` to `key`; false when a new key found `max` keys held.
    fn add(
        &mut self,
        key: &K,
        member: M,
        names: Option<&Arc<EndName>>,
        max: usize,
        now: Instant,
    ) -> Option<&mut Tracked<M>> {
        if self.threshold == 0 {
            return None;
        }
        if !self.keys.contains_key(key) {
            if self.keys.len() >= max {
                return None;
            }
            self.keys.insert(
                key.clone(),
                Tracked {
                    first: now,
                    last_new: now,
                    members: HashSet::new(),
                    reported: 0,
                    names: names.cloned(),
                    example: None,
                },
            );
        }
        let t = self.keys.get_mut(key)?;
        if t.members.len() < self.threshold.saturating_mul(16) && t.members.insert(member) {
            t.last_new = now;
        }
        Some(t)
    }

    /// Keys that reached the threshold and grew since their last event,
    /// with their count and whether this is their first event; forgets
    /// keys whose window passed below the threshold, or with nothing new
    /// for a window.
    fn finish(&mut self, window: Duration, now: Instant) -> Vec<(K, usize, bool)> {
        let threshold = self.threshold;
        self.keys.retain(|_, t| {
            if t.reported == 0 {
                t.members.len() >= threshold || now.duration_since(t.first) < window
            } else {
                now.duration_since(t.last_new) < window
            }
        });
        let mut out = Vec::new();
        for (k, t) in &mut self.keys {
            let n = t.members.len();
            if n >= threshold && n > t.reported {
                out.push((k.clone(), n, t.reported == 0));
                t.reported = n;
            }
        }
        out
    }
}

/// Whether a flow's attempt exchanged no payload: TCP segments of headers
/// only (at most 100 bytes each, IPv6 and options included) both ways, or
/// UDP without a reply.
fn payload_free(u: &FlowUpdate) -> bool {
    match u.id.transport {
        Transport::Tcp => [u.to_server, u.to_client]
            .iter()
            .all(|c| c.bytes <= c.packets.saturating_mul(100)),
        Transport::Udp => u.to_client.packets == 0,
        _ => false,
    }
}

/// Whether a DNS name looks like data carried in its labels.
fn suspicious_name(name: &str, long: usize) -> bool {
    name.split('.')
        .any(|l| l.len() >= long || (l.len() >= 20 && entropy(l) >= 4.0))
}

/// Shannon entropy of `label`'s bytes, bits per character.
fn entropy(label: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in label.bytes() {
        counts[usize::from(b)] += 1;
    }
    let n = label.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / n;
            -p * p.log2()
        })
        .sum()
}

type ScanKey = (IpAddr, IpAddr, Transport);
type SweepKey = (IpAddr, u16, Transport);

/// The detectors of the flow stage and the events of an interval.
#[derive(Debug)]
pub struct AnomalyDetector {
    cfg: AnomalyConfig,
    scans: Tally<ScanKey, u16>,
    sweeps: Tally<SweepKey, IpAddr>,
    tunnels: Tally<IpAddr, Arc<str>>,
    detected: Arc<[AtomicU64; 3]>,
    untracked: Counter,
}

impl AnomalyDetector {
    pub fn new(cfg: &AnomalyConfig, telemetry: &Telemetry) -> Self {
        let detected: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
        let read = Arc::clone(&detected);
        telemetry.register_points(&catalogue::ANOMALIES, move || {
            AnomalyKind::ALL
                .iter()
                .zip(read.iter())
                .map(|(k, n)| {
                    (
                        vec![(catalogue::ANOMALY_KIND, k.as_str())],
                        n.load(Ordering::Relaxed),
                    )
                })
                .collect()
        });
        Self {
            cfg: cfg.clone(),
            scans: Tally::new(cfg.scan_ports),
            sweeps: Tally::new(cfg.sweep_hosts),
            tunnels: Tally::new(cfg.dns_tunnel_names),
            detected,
            untracked: telemetry.counter(&catalogue::ANOMALY_UNTRACKED),
        }
    }

    /// A flow's latest counters: a payload-free attempt counts towards its
    /// client's scan of the server host and sweep of the server port.
    pub fn flow(&mut self, u: &FlowUpdate, names: Option<&FlowNames>) {
        if !payload_free(u) {
            return;
        }
        let (max, now) = (self.cfg.max_tracked, Instant::now());
        let client = names.map(|n| &n.client);
        let id = &u.id;
        if self.scans.threshold > 0
            && self
                .scans
                .add(
                    &(id.client.ip, id.server.ip, id.transport),
                    id.server.port,
                    client,
                    max,
                    now,
                )
                .is_none()
        {
            self.untracked.inc();
        }
        if self.sweeps.threshold > 0
            && self
                .sweeps
                .add(
                    &(id.client.ip, id.server.port, id.transport),
                    id.server.ip,
                    client,
                    max,
                    now,
                )
                .is_none()
        {
            self.untracked.inc();
        }
    }

    /// A lookup: a suspicious name counts towards its client's tunnel.
    pub fn dns(&mut self, r: &DnsRecord, names: Option<&FlowNames>) {
        if self.tunnels.threshold == 0 || !suspicious_name(&r.name, self.cfg.dns_label_length) {
            return;
        }
        let client = names.map(|n| &n.client);
        match self.tunnels.add(
            &r.client.ip,
            Arc::clone(&r.name),
            client,
            self.cfg.max_tracked,
            Instant::now(),
        ) {
            Some(t) => {
                if t.example.as_ref().is_none_or(|e| e.len() < r.name.len()) {
                    t.example = Some(Arc::clone(&r.name));
                }
            }
            None => self.untracked.inc(),
        }
    }

    /// The interval's events.
    pub fn finish(&mut self) -> Vec<LogEvent> {
        let (window, now, time) = (self.cfg.window, Instant::now(), SystemTime::now());
        let mut events = Vec::new();
        for ((client, server, transport), n, first) in self.scans.finish(window, now) {
            let names = self
                .scans
                .keys
                .get(&(client, server, transport))
                .and_then(|t| t.names.clone());
            let body = format!(
                "port scan: {client} tried {n} {} ports of {server} without payload",
                transport.as_str()
            );
            let mut e = self.event(AnomalyKind::PortScan, first, n, body, time, names);
            e.attributes.extend([
                (catalogue::SERVER_ADDRESS, Value::Str(server.to_string())),
                (
                    catalogue::NETWORK_TRANSPORT,
                    Value::Str(transport.as_str().into()),
                ),
            ]);
            events.push(with_client(e, client));
        }
        for ((client, port, transport), n, first) in self.sweeps.finish(window, now) {
            let names = self
                .sweeps
                .keys
                .get(&(client, port, transport))
                .and_then(|t| t.names.clone());
            let body = format!(
                "host sweep: {client} tried {n} hosts on {} port {port} without payload",
                transport.as_str()
            );
            let mut e = self.event(AnomalyKind::HostSweep, first, n, body, time, names);
            e.attributes.extend([
                (catalogue::SERVER_PORT, Value::Int(port.into())),
                (
                    catalogue::NETWORK_TRANSPORT,
                    Value::Str(transport.as_str().into()),
                ),
            ]);
            events.push(with_client(e, client));
        }
        for (client, n, first) in self.tunnels.finish(window, now) {
            let t = self.tunnels.keys.get(&client);
            let names = t.and_then(|t| t.names.clone());
            let example = t.and_then(|t| t.example.clone());
            let body = format!("DNS tunnelling: {client} looked up {n} random-looking names");
            let mut e = self.event(AnomalyKind::DnsTunnel, first, n, body, time, names);
            if let Some(name) = example {
                e.attributes
                    .push((catalogue::DNS_QUESTION_NAME, Value::Str(name.to_string())));
            }
            events.push(with_client(e, client));
        }
        events
    }

    fn event(
        &self,
        kind: AnomalyKind,
        first: bool,
        count: usize,
        body: String,
        time: SystemTime,
        names: Option<Arc<EndName>>,
    ) -> LogEvent {
        if first {
            let slot = AnomalyKind::ALL
                .iter()
                .position(|k| *k == kind)
                .unwrap_or(0);
            self.detected[slot].fetch_add(1, Ordering::Relaxed);
        }
        let threshold = match kind {
            AnomalyKind::PortScan => self.cfg.scan_ports,
            AnomalyKind::HostSweep => self.cfg.sweep_hosts,
            AnomalyKind::DnsTunnel => self.cfg.dns_tunnel_names,
        };
        let mut attributes = vec![
            (catalogue::ANOMALY_KIND, Value::Str(kind.as_str().into())),
            (
                catalogue::ANOMALY_STATE,
                Value::Str(if first { "started" } else { "ongoing" }.into()),
            ),
            (
                catalogue::ANOMALY_COUNT,
                Value::Int(i64::try_from(count).unwrap_or(i64::MAX)),
            ),
            (
                catalogue::ANOMALY_THRESHOLD,
                Value::Int(i64::try_from(threshold).unwrap_or(i64::MAX)),
            ),
            (
                catalogue::ANOMALY_WINDOW,
                Value::Double(self.cfg.window.as_secs_f64()),
            ),
        ];
        if let Some(n) = names {
            for (key, v) in [
                (catalogue::K8S_NAMESPACE, &n.namespace),
                (catalogue::K8S_POD, &n.pod),
                (catalogue::K8S_WORKLOAD, &n.workload),
            ] {
                if let Some(v) = v {
                    attributes.push((key, Value::Str(v.to_string())));
                }
            }
        }
        LogEvent {
            time,
            severity: Severity::Warn,
            name: catalogue::EVENT_ANOMALY,
            body,
            attributes,
        }
    }
}

fn with_client(mut e: LogEvent, client: IpAddr) -> LogEvent {
    e.attributes
        .push((catalogue::CLIENT_ADDRESS, Value::Str(client.to_string())));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_labels_are_suspicious_and_ordinary_names_are_not() {
        for name in [
            "payments.shop.svc.cluster.local",
            "www.example.com",
            "internal-checkout-lb.eu-west-1.elb.amazonaws.com",
        ] {
            assert!(!suspicious_name(name, 40), "{name}");
        }
        assert!(suspicious_name(
            "mzxw6ytboi4dmnrxgq3tmnzugu2dqojrgiydgnbv.t.example",
            40
        ));
        assert!(suspicious_name("q8Zk2LmX0pRt7VbN4cYw.t.example", 40));
    }

    #[test]
    fn a_key_reports_once_at_the_threshold_then_only_when_it_grows() {
        let mut t: Tally<u8, u16> = Tally::new(3);
        let now = Instant::now();
        let w = Duration::from_secs(60);
        for p in [1, 2, 2] {
            t.add(&0, p, None, 10, now);
        }
        assert!(t.finish(w, now).is_empty());
        t.add(&0, 3, None, 10, now);
        assert_eq!(t.finish(w, now), vec![(0, 3, true)]);
        assert!(t.finish(w, now).is_empty());
        t.add(&0, 4, None, 10, now);
        assert_eq!(t.finish(w, now), vec![(0, 4, false)]);
        // Nothing new for a window: forgotten, and a new scan starts over.
        assert!(t.finish(w, now + w).is_empty());
        assert!(t.keys.is_empty());
        // Below the threshold when the window passes: forgotten.
        t.add(&1, 1, None, 10, now);
        assert!(t.finish(w, now + w).is_empty());
        assert!(t.keys.is_empty());
        // Keys past `max` are not tracked.
        assert!(t.add(&2, 1, None, 0, now).is_none());
    }
}
