//! Detectors that count distinct members per key within a window: port
//! scans and host sweeps in the flows, DNS tunnelling and TXT/NULL volume
//! in the lookups.
//!
//! A scan or sweep is counted from attempts that exchanged no payload (a
//! refused, unanswered or immediately closed connection, a UDP datagram
//! without reply), so busy clients such as a Prometheus scraping hundreds
//! of pods never count. Every tally keeps at most `max_tracked` keys and at
//! most 16 × its threshold members per key.

use std::collections::{HashMap, HashSet};

use foldhash::fast::RandomState;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AnomalyConfig, AnomalyKind, Finding, Party, State};
use crate::flow::dns::DnsRecord;
use crate::flow::mesh::Value;
use crate::flow::model::{FlowUpdate, Transport};
use crate::flow::names::{EndName, FlowNames};
use crate::telemetry::{catalogue, Counter};

/// DNS question types that carry arbitrary data in their answers.
const TXT: u16 = 16;
const NULL: u16 = 10;

/// Members of one key, counted from its first one.
#[derive(Debug)]
pub(super) struct Tracked<M> {
    first: Instant,
    last_new: Instant,
    members: HashSet<M, RandomState>,
    /// Members at the last event; 0 before the first.
    reported: usize,
    /// The client's names when first seen, for the event.
    names: Option<Arc<EndName>>,
    /// An example member for the event (the longest DNS name).
    example: Option<Arc<str>>,
}

/// One detector's keys: distinct members per key within a window.
#[derive(Debug)]
pub(super) struct Tally<K, M> {
    threshold: usize,
    keys: HashMap<K, Tracked<M>, RandomState>,
}

impl<K: Hash + Eq + Clone, M: Hash + Eq> Tally<K, M> {
    pub(super) fn new(threshold: usize) -> Self {
        Self {
            threshold,
            keys: HashMap::default(),
        }
    }

    /// Adds `member` to `key`; `None` when a new key found `max` keys held.
    fn add(
        &mut self,
        key: &K,
        member: M,
        names: Option<&Arc<EndName>>,
        max: usize,
        now: Instant,
    ) -> Option<&mut Tracked<M>> {
        if !self.keys.contains_key(key) {
            if self.keys.len() >= max {
                return None;
            }
            self.keys.insert(
                key.clone(),
                Tracked {
                    first: now,
                    last_new: now,
                    members: HashSet::default(),
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

    /// Keys that reached the threshold and grew since their last event
    /// (started, ongoing), and those whose anomaly had nothing new for a
    /// window (ended, then forgotten); forgets keys whose window passed
    /// below the threshold.
    fn finish(&mut self, window: Duration, now: Instant) -> Vec<Report<K>> {
        let threshold = self.threshold;
        let mut out = Vec::new();
        self.keys.retain(|k, t| {
            if t.reported == 0 {
                return t.members.len() >= threshold || now.duration_since(t.first) < window;
            }
            let keep = now.duration_since(t.last_new) < window;
            if !keep {
                out.push(Report::of(k, t, State::Ended));
            }
            keep
        });
        for (k, t) in &mut self.keys {
            let n = t.members.len();
            if n >= threshold && n > t.reported {
                let state = if t.reported == 0 {
                    State::Started
                } else {
                    State::Ongoing
                };
                t.reported = n;
                out.push(Report::of(k, t, state));
            }
        }
        out
    }
}

/// One key's event: its count, state, client names and example member.
#[derive(Debug, PartialEq)]
struct Report<K> {
    key: K,
    count: u64,
    state: State,
    names: Option<Arc<EndName>>,
    example: Option<Arc<str>>,
}

impl<K: Clone> Report<K> {
    fn of<M>(key: &K, t: &Tracked<M>, state: State) -> Self {
        Self {
            key: key.clone(),
            count: t.members.len() as u64,
            state,
            names: t.names.clone(),
            example: t.example.clone(),
        }
    }
}

/// Whether a flow's attempt exchanged no payload: TCP segments of headers
/// only (at most 100 bytes each, IPv6 and options included) both ways, or
/// UDP without a reply.
pub(super) fn payload_free(u: &FlowUpdate) -> bool {
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

/// Port scans, host sweeps, DNS tunnelling and TXT/NULL volume.
#[derive(Debug)]
pub(super) struct Scans {
    scans: Tally<ScanKey, u16>,
    sweeps: Tally<SweepKey, IpAddr>,
    tunnels: Tally<IpAddr, Arc<str>>,
    /// TXT and NULL lookups, each a member of its own (a sequence number).
    txt: Tally<IpAddr, u64>,
    lookups: u64,
    max: usize,
    window: Duration,
    label_length: usize,
    untracked: Counter,
}

impl Scans {
    pub(super) fn new(cfg: &AnomalyConfig, untracked: Counter) -> Self {
        Self {
            scans: Tally::new(cfg.scan_ports),
            sweeps: Tally::new(cfg.sweep_hosts),
            tunnels: Tally::new(cfg.dns_tunnel_names),
            txt: Tally::new(cfg.dns_txt_queries),
            lookups: 0,
            max: cfg.max_tracked,
            window: cfg.window,
            label_length: cfg.dns_label_length,
            untracked,
        }
    }

    /// A payload-free attempt counts towards its client's scan of the
    /// server host and sweep of the server port.
    pub(super) fn flow(&mut self, u: &FlowUpdate, names: Option<&FlowNames>, now: Instant) {
        if !payload_free(u) {
            return;
        }
        let client = names.map(|n| &n.client);
        let id = &u.id;
        let scan = (id.client.ip, id.server.ip, id.transport);
        if self.scans.threshold > 0
            && self
                .scans
                .add(&scan, id.server.port, client, self.max, now)
                .is_none()
        {
            self.untracked.inc();
        }
        let sweep = (id.client.ip, id.server.port, id.transport);
        if self.sweeps.threshold > 0
            && self
                .sweeps
                .add(&sweep, id.server.ip, client, self.max, now)
                .is_none()
        {
            self.untracked.inc();
        }
    }

    /// A suspicious name counts towards its client's tunnel, a TXT or NULL
    /// lookup towards its volume.
    pub(super) fn dns(&mut self, r: &DnsRecord, names: Option<&FlowNames>, now: Instant) {
        let client = names.map(|n| &n.client);
        if self.tunnels.threshold > 0 && suspicious_name(&r.name, self.label_length) {
            match self
                .tunnels
                .add(&r.client.ip, Arc::clone(&r.name), client, self.max, now)
            {
                Some(t) => {
                    if t.example.as_ref().is_none_or(|e| e.len() < r.name.len()) {
                        t.example = Some(Arc::clone(&r.name));
                    }
                }
                None => self.untracked.inc(),
            }
        }
        if self.txt.threshold > 0 && matches!(r.qtype, TXT | NULL) {
            self.lookups += 1;
            match self
                .txt
                .add(&r.client.ip, self.lookups, client, self.max, now)
            {
                Some(t) => {
                    if t.example.is_none() {
                        t.example = Some(Arc::clone(&r.name));
                    }
                }
                None => self.untracked.inc(),
            }
        }
    }

    pub(super) fn finish(&mut self, now: Instant, out: &mut Vec<Finding>) {
        let (window, secs) = (self.window, self.window.as_secs());
        let transport =
            |t: Transport| (catalogue::NETWORK_TRANSPORT, Value::Str(t.as_str().into()));
        let example = |r: &Report<IpAddr>| {
            r.example
                .iter()
                .map(|n| (catalogue::DNS_QUESTION_NAME, Value::Str(n.to_string())))
                .collect::<Vec<_>>()
        };
        for r in self.scans.finish(window, now) {
            let ((client, server, t), n) = (r.key, r.count);
            let body = if r.state == State::Ended {
                format!(
                    "port scan: {client} tried no new port of {server} for {secs} s ({n} ports)"
                )
            } else {
                format!(
                    "port scan: {client} tried {n} {} ports of {server} without payload",
                    t.as_str()
                )
            };
            out.push(Finding {
                kind: AnomalyKind::PortScan,
                state: r.state,
                count: n,
                threshold: self.scans.threshold as u64,
                client: Party::Address(client),
                client_names: r.names,
                peer: Some(Party::Address(server)),
                body,
                attributes: vec![
                    (catalogue::SERVER_ADDRESS, Value::Str(server.to_string())),
                    transport(t),
                ],
            });
        }
        for r in self.sweeps.finish(window, now) {
            let ((client, port, t), n) = (r.key, r.count);
            let body = if r.state == State::Ended {
                format!("host sweep: {client} tried no new host on {} port {port} for {secs} s ({n} hosts)", t.as_str())
            } else {
                format!(
                    "host sweep: {client} tried {n} hosts on {} port {port} without payload",
                    t.as_str()
                )
            };
            out.push(Finding {
                kind: AnomalyKind::HostSweep,
                state: r.state,
                count: n,
                threshold: self.sweeps.threshold as u64,
                client: Party::Address(client),
                client_names: r.names,
                peer: None,
                body,
                attributes: vec![
                    (catalogue::SERVER_PORT, Value::Int(port.into())),
                    transport(t),
                ],
            });
        }
        for r in self.tunnels.finish(window, now) {
            let (client, n) = (r.key, r.count);
            let body = if r.state == State::Ended {
                format!("DNS tunnelling: {client} looked up no new random-looking name for {secs} s ({n} names)")
            } else {
                format!("DNS tunnelling: {client} looked up {n} random-looking names")
            };
            out.push(Finding {
                kind: AnomalyKind::DnsTunnel,
                state: r.state,
                count: n,
                threshold: self.tunnels.threshold as u64,
                client: Party::Address(client),
                attributes: example(&r),
                client_names: r.names,
                peer: None,
                body,
            });
        }
        for r in self.txt.finish(window, now) {
            let (client, n) = (r.key, r.count);
            let body = if r.state == State::Ended {
                format!(
                    "DNS tunnelling: {client} made no TXT/NULL lookup for {secs} s ({n} lookups)"
                )
            } else {
                format!("DNS tunnelling: {client} made {n} TXT/NULL lookups")
            };
            out.push(Finding {
                kind: AnomalyKind::DnsTxtVolume,
                state: r.state,
                count: n,
                threshold: self.txt.threshold as u64,
                client: Party::Address(client),
                attributes: example(&r),
                client_names: r.names,
                peer: None,
                body,
            });
        }
    }
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
        let states = |r: Vec<Report<u8>>| {
            r.into_iter()
                .map(|r| (r.key, r.count, r.state))
                .collect::<Vec<_>>()
        };
        assert!(t.finish(w, now).is_empty());
        t.add(&0, 3, None, 10, now);
        assert_eq!(states(t.finish(w, now)), vec![(0, 3, State::Started)]);
        assert!(t.finish(w, now).is_empty());
        t.add(&0, 4, None, 10, now);
        assert_eq!(states(t.finish(w, now)), vec![(0, 4, State::Ongoing)]);
        // Nothing new for a window: ended and forgotten, and a new scan
        // starts over.
        assert_eq!(states(t.finish(w, now + w)), vec![(0, 4, State::Ended)]);
        assert!(t.keys.is_empty());
        // Below the threshold when the window passes: forgotten.
        t.add(&1, 1, None, 10, now);
        assert!(t.finish(w, now + w).is_empty());
        assert!(t.keys.is_empty());
        // Keys past `max` are not tracked.
        assert!(t.add(&2, 1, None, 0, now).is_none());
    }
}
