//! Detectors of firsts: a workload reaching a peer on a port that matters
//! for the first time (lateral movement), or using a transport and server
//! port it never used (unusual protocol), once its own learning period is
//! over.
//!
//! What a workload does during its first `learning` is its normal; after
//! it, each first is remembered (so it alarms once) and counted towards
//! one anomaly per workload, ongoing while firsts keep coming.

use std::collections::{HashMap, HashSet};

use foldhash::fast::RandomState;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AnomalyConfig, AnomalyKind, Finding, Party, State};
use crate::flow::mesh::Value;
use crate::flow::model::Transport;
use crate::flow::names::EndName;
use crate::telemetry::{catalogue, Counter};

/// Members (edges, protocols) remembered per workload; past it, firsts
/// are neither learned nor reported, and counted as untracked.
pub const MAX_MEMBERS: usize = 1_024;

/// A workload not seen for this many learning periods is forgotten (and
/// learns again when it comes back).
const FORGET_AFTER: u32 = 6;

/// Firsts since an anomaly started.
#[derive(Debug, Clone)]
struct News<M> {
    last_new: Instant,
    count: u64,
    reported: u64,
    newest: M,
}

/// What a workload did in one respect (edges or protocols), and its
/// firsts after learning.
#[derive(Debug)]
struct Members<M> {
    members: HashSet<M, RandomState>,
    news: Option<News<M>>,
}

impl<M> Default for Members<M> {
    fn default() -> Self {
        Self {
            members: HashSet::default(),
            news: None,
        }
    }
}

impl<M: Hash + Eq + Clone> Members<M> {
    /// Remembers `member`; a first after learning counts towards the
    /// anomaly. False when the set is full.
    fn observe(&mut self, member: M, learning: bool, now: Instant) -> bool {
        if self.members.contains(&member) {
            return true;
        }
        if self.members.len() >= MAX_MEMBERS {
            return false;
        }
        self.members.insert(member.clone());
        if !learning {
            let f = self.news.get_or_insert(News {
                last_new: now,
                count: 0,
                reported: 0,
                newest: member.clone(),
            });
            f.last_new = now;
            f.count += 1;
            f.newest = member;
        }
        true
    }

    /// The state to report, if any: grown (started, ongoing), or a window
    /// without firsts (ended, then forgotten).
    fn finish(&mut self, now: Instant, window: Duration) -> Option<(News<M>, State)> {
        let f = self.news.as_mut()?;
        if f.count > f.reported {
            let state = if f.reported == 0 {
                State::Started
            } else {
                State::Ongoing
            };
            f.reported = f.count;
            return Some((f.clone(), state));
        }
        if now.duration_since(f.last_new) >= window {
            return self.news.take().map(|f| (f, State::Ended));
        }
        None
    }
}

type Edge = (Party, u16, Transport);

/// One workload: since when it is seen (its learning period starts
/// there), its edges on lateral ports and its protocols.
#[derive(Debug)]
struct Known {
    first: Instant,
    last_seen: Instant,
    edges: Members<Edge>,
    protocols: Members<(Transport, u16)>,
    names: Option<Arc<EndName>>,
}

/// Lateral movement and unusual protocols.
#[derive(Debug)]
pub(super) struct Firsts {
    clients: HashMap<Party, Known, RandomState>,
    lateral_ports: Vec<u16>,
    protocols_on: bool,
    learning: Duration,
    window: Duration,
    max: usize,
    untracked: Counter,
}

impl Firsts {
    pub(super) fn new(cfg: &AnomalyConfig, untracked: Counter) -> Self {
        Self {
            clients: HashMap::default(),
            lateral_ports: cfg.lateral_ports.clone(),
            protocols_on: cfg.unusual_protocols,
            learning: cfg.learning,
            window: cfg.window,
            max: cfg.max_tracked,
            untracked,
        }
    }

    /// Whether either detector is on.
    pub(super) fn on(&self) -> bool {
        self.protocols_on || !self.lateral_ports.is_empty()
    }

    /// Whether `port` is one where lateral movement is looked for.
    pub(super) fn lateral_port(&self, port: u16) -> bool {
        self.lateral_ports.contains(&port)
    }

    /// A flow of `client` (inside the cluster) this interval: `edge` when
    /// it went to a lateral port of a peer inside the cluster, `protocol`
    /// when it exchanged payload on another port.
    pub(super) fn observe(
        &mut self,
        client: &Party,
        edge: Option<Edge>,
        protocol: Option<(Transport, u16)>,
        names: Option<&Arc<EndName>>,
        now: Instant,
    ) {
        let known = match self.clients.get_mut(client) {
            Some(k) => k,
            None => {
                if self.clients.len() >= self.max {
                    self.untracked.inc();
                    return;
                }
                self.clients.entry(client.clone()).or_insert(Known {
                    first: now,
                    last_seen: now,
                    edges: Members::default(),
                    protocols: Members::default(),
                    names: names.cloned(),
                })
            }
        };
        known.last_seen = now;
        let learning = now.duration_since(known.first) < self.learning;
        let mut full = false;
        if let Some(e) = edge {
            full |= !known.edges.observe(e, learning, now);
        }
        if let Some(p) = protocol.filter(|_| self.protocols_on) {
            full |= !known.protocols.observe(p, learning, now);
        }
        if full {
            self.untracked.inc();
        }
    }

    pub(super) fn finish(&mut self, now: Instant, out: &mut Vec<Finding>) {
        let (window, forget) = (self.window, self.learning * FORGET_AFTER);
        let secs = window.as_secs();
        self.clients.retain(|client, k| {
            if let Some((f, state)) = k.edges.finish(now, window) {
                let (server, port, transport) = &f.newest;
                let known = k.edges.members.len() as u64 - f.count;
                let body = match state {
                    State::Ended => format!(
                        "lateral movement: {client} reached no new peer for {secs} s ({} new edges)",
                        f.count
                    ),
                    _ => format!(
                        "lateral movement: {client} reached {server} on {} port {port} for the first time ({} new edges, {known} known)",
                        transport.as_str(),
                        f.count
                    ),
                };
                out.push(Finding {
                    kind: AnomalyKind::LateralMovement,
                    state,
                    count: f.count,
                    threshold: 1,
                    client: client.clone(),
                    client_names: k.names.clone(),
                    peer: Some(server.clone()),
                    body,
                    attributes: first_attributes(*transport, *port, known),
                });
            }
            if let Some((f, state)) = k.protocols.finish(now, window) {
                let (transport, port) = f.newest;
                let known = k.protocols.members.len() as u64 - f.count;
                let body = match state {
                    State::Ended => format!(
                        "unusual protocol: {client} used no new protocol for {secs} s ({} new)",
                        f.count
                    ),
                    _ => format!(
                        "unusual protocol: {client} used {} port {port} for the first time ({} new, {known} known)",
                        transport.as_str(),
                        f.count
                    ),
                };
                out.push(Finding {
                    kind: AnomalyKind::UnusualProtocol,
                    state,
                    count: f.count,
                    threshold: 1,
                    client: client.clone(),
                    client_names: k.names.clone(),
                    peer: None,
                    body,
                    attributes: first_attributes(transport, port, known),
                });
            }
            k.edges.news.is_some()
                || k.protocols.news.is_some()
                || now.duration_since(k.last_seen) < forget
        });
    }
}

fn first_attributes(transport: Transport, port: u16, known: u64) -> Vec<(&'static str, Value)> {
    vec![
        (catalogue::SERVER_PORT, Value::Int(port.into())),
        (
            catalogue::NETWORK_TRANSPORT,
            Value::Str(transport.as_str().into()),
        ),
        (
            catalogue::ANOMALY_BASELINE,
            Value::Int(i64::try_from(known).unwrap_or(i64::MAX)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Telemetry;

    #[test]
    fn firsts_after_learning_alarm_once_per_member() {
        let cfg = AnomalyConfig {
            learning: Duration::from_secs(10),
            window: Duration::from_secs(3),
            ..AnomalyConfig::default()
        };
        let t = Telemetry::default();
        let mut n = Firsts::new(&cfg, t.counter(&catalogue::ANOMALY_UNTRACKED));
        let a = Party::Address("198.18.0.1".parse().expect("literal"));
        let db = || {
            Some((
                Party::Address("198.18.0.3".parse().expect("literal")),
                5432,
                Transport::Tcp,
            ))
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut states = Vec::new();
        let mut finish = |n: &mut Firsts, s| {
            let mut out = Vec::new();
            n.finish(at(s), &mut out);
            states.extend(out.iter().map(|f| (s, f.kind, f.state, f.count)));
        };
        // Seen from 0 (its learning starts there), a first edge at 12.
        n.observe(&a, None, Some((Transport::Tcp, 80)), None, at(0));
        n.observe(&a, None, Some((Transport::Udp, 53)), None, at(5));
        finish(&mut n, 5);
        n.observe(&a, None, Some((Transport::Tcp, 80)), None, at(11));
        finish(&mut n, 11);
        n.observe(&a, db(), None, None, at(12));
        finish(&mut n, 12);
        n.observe(&a, db(), Some((Transport::Tcp, 7000)), None, at(13));
        finish(&mut n, 13);
        finish(&mut n, 15);
        finish(&mut n, 16);
        n.observe(&a, db(), Some((Transport::Tcp, 7000)), None, at(17));
        finish(&mut n, 17);
        use AnomalyKind::{LateralMovement as L, UnusualProtocol as U};
        assert_eq!(
            states,
            vec![
                (12, L, State::Started, 1),
                (13, U, State::Started, 1),
                (15, L, State::Ended, 1),
                (16, U, State::Ended, 1)
            ]
        );
    }
}
