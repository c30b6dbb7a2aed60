//! Anomaly detection on the node, each finding reported as a
//! `flowtel.anomaly` log event when it starts, updates while it grows, and
//! (for the detectors with a level) one when it ends:
//!
//! * [`scan`]: port scans, host sweeps, DNS tunnelling and TXT/NULL volume
//!   (distinct members per key within a window);
//! * [`baseline`]: traffic spikes and drops per pair, exfiltration per
//!   workload (bytes per interval against a learned baseline);
//! * [`novelty`]: lateral movement and unusual protocols (firsts after a
//!   workload's learning period);
//! * [`errors`]: high error rate per pair and server port (TCP outcomes).
//!
//! Every detector takes the time it is told (`now`), so tests and the
//! negative control run them on a virtual clock, keeps at most
//! `max_tracked` keys (what does not fit is counted in
//! `flowtel.anomaly.untracked`), and can be turned off on its own:
//! docs/telemetry.md ("Anomaly events") gives the figures.

mod baseline;
mod config;
mod errors;
mod novelty;
mod scan;

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

pub use baseline::ALPHA;
pub use config::{AnomalyConfig, DEFAULT_LATERAL_PORTS};
pub use novelty::MAX_MEMBERS;

use super::dns::DnsRecord;
use super::mesh::{LogEvent, Severity, Value};
use super::model::{DirectionalCounters, FlowUpdate, TcpEvent};
use super::names::{EndName, FlowNames};
use crate::telemetry::{catalogue, Counter, Telemetry};

/// What a detector reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyKind {
    PortScan,
    HostSweep,
    DnsTunnel,
    DnsTxtVolume,
    TrafficSpike,
    TrafficDrop,
    Exfiltration,
    LateralMovement,
    UnusualProtocol,
    HighErrorRate,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 10] = [
        Self::PortScan,
        Self::HostSweep,
        Self::DnsTunnel,
        Self::DnsTxtVolume,
        Self::TrafficSpike,
        Self::TrafficDrop,
        Self::Exfiltration,
        Self::LateralMovement,
        Self::UnusualProtocol,
        Self::HighErrorRate,
    ];

    /// The value of `flowtel.anomaly.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PortScan => "port_scan",
            Self::HostSweep => "host_sweep",
            Self::DnsTunnel => "dns_tunnel",
            Self::DnsTxtVolume => "dns_txt_volume",
            Self::TrafficSpike => "traffic_spike",
            Self::TrafficDrop => "traffic_drop",
            Self::Exfiltration => "exfiltration",
            Self::LateralMovement => "lateral_movement",
            Self::UnusualProtocol => "unusual_protocol",
            Self::HighErrorRate => "high_error_rate",
        }
    }
}

/// Where an anomaly is in its life: the value of `flowtel.anomaly.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Started,
    /// It grew since its last event.
    Ongoing,
    /// A whole window passed without it; the event carries its totals.
    Ended,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Ongoing => "ongoing",
            Self::Ended => "ended",
        }
    }
}

/// One end as the detectors key it: its workload when one is known (so a
/// rollout's new pods keep their baseline), the node, else its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Party {
    Workload { namespace: Arc<str>, name: Arc<str> },
    Node(Arc<str>),
    Address(IpAddr),
}

impl Party {
    fn of(end: Option<&EndName>, ip: IpAddr) -> Self {
        let Some(end) = end else {
            return Self::Address(ip);
        };
        match (
            &end.namespace,
            &end.workload,
            &end.pod,
            &end.service,
            &end.node,
        ) {
            (Some(ns), Some(name), ..)
            | (Some(ns), None, Some(name), ..)
            | (Some(ns), None, None, Some(name), _) => Self::Workload {
                namespace: Arc::clone(ns),
                name: Arc::clone(name),
            },
            (None, .., Some(node)) => Self::Node(Arc::clone(node)),
            _ => Self::Address(ip),
        }
    }
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workload { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Node(node) => write!(f, "node/{node}"),
            Self::Address(ip) => write!(f, "{ip}"),
        }
    }
}

/// What a detector found in an interval, before it becomes an event.
#[derive(Debug)]
struct Finding {
    kind: AnomalyKind,
    state: State,
    /// The anomaly's main figure so far (ports, hosts, names, lookups,
    /// bytes, firsts, failed connections).
    count: u64,
    threshold: u64,
    client: Party,
    client_names: Option<Arc<EndName>>,
    peer: Option<Party>,
    body: String,
    attributes: Vec<(&'static str, Value)>,
}

/// The detectors of the flow stage and the events of an interval.
#[derive(Debug)]
pub struct AnomalyDetector {
    cfg: AnomalyConfig,
    scans: scan::Scans,
    volumes: baseline::Volumes,
    firsts: novelty::Firsts,
    errors: errors::ErrorRates,
    detected: Arc<[AtomicU64; AnomalyKind::ALL.len()]>,
}

impl AnomalyDetector {
    /// Detectors learning from `now` on.
    pub fn new(cfg: &AnomalyConfig, telemetry: &Telemetry, now: Instant) -> Self {
        let detected: Arc<[AtomicU64; AnomalyKind::ALL.len()]> = Arc::new(Default::default());
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
        let untracked: Counter = telemetry.counter(&catalogue::ANOMALY_UNTRACKED);
        Self {
            cfg: cfg.clone(),
            scans: scan::Scans::new(cfg, untracked.clone()),
            volumes: baseline::Volumes::new(cfg, untracked.clone(), now),
            firsts: novelty::Firsts::new(cfg, untracked.clone()),
            errors: errors::ErrorRates::new(cfg, untracked),
            detected,
        }
    }

    /// Whether `end` is in one of the networks outside the cluster.
    fn external(&self, end: &EndName) -> bool {
        end.network
            .as_deref()
            .is_some_and(|n| self.cfg.exfil_networks.iter().any(|x| x == n))
    }

    /// A flow's latest counters and what they grew by this interval.
    pub fn flow(
        &mut self,
        u: &FlowUpdate,
        delta: DirectionalCounters,
        names: Option<&FlowNames>,
        now: Instant,
    ) {
        self.scans.flow(u, names, now);
        if delta.is_zero() {
            return;
        }
        let id = &u.id;
        let server_ip = u.nat.server.map_or(id.server.ip, |e| e.ip);
        let (client_end, server_end) = (names.map(|n| &*n.client), names.map(|n| &*n.server));
        let client_names = names.map(|n| &n.client);
        let client_out = client_end.is_some_and(|e| self.external(e));
        let server_out = server_end.is_some_and(|e| self.external(e));
        let port = if id.transport.has_ports() {
            id.server.port
        } else {
            0
        };
        let lateral = self.firsts.lateral_port(port) && id.transport.has_ports();
        let protocol = !lateral && !scan::payload_free(u);
        let client = Party::of(client_end, id.client.ip);
        if self.volumes.exfil_on() {
            if server_out && !client_out && delta.to_server.bytes > 0 {
                self.volumes
                    .egress(&client, delta.to_server.bytes, client_names, now);
            } else if client_out && !server_out && delta.to_client.bytes > 0 {
                let server = Party::of(server_end, server_ip);
                let server_names = names.map(|n| &n.server);
                self.volumes
                    .egress(&server, delta.to_client.bytes, server_names, now);
            }
        }
        if client_out {
            return;
        }
        let traffic = self.volumes.traffic_on();
        let firsts = self.firsts.on();
        if !(traffic || firsts) {
            return;
        }
        let server = Party::of(server_end, server_ip);
        if firsts {
            let edge = (lateral && !server_out).then(|| (server.clone(), port, id.transport));
            let protocol = protocol.then_some((id.transport, port));
            if edge.is_some() || protocol.is_some() {
                self.firsts
                    .observe(&client, edge, protocol, client_names, now);
            }
        }
        if traffic {
            let bytes = delta.total().bytes;
            self.volumes
                .pair(&(client, server), bytes, client_names, now);
        }
    }

    /// A TCP connection event: its end counts towards its pair's error
    /// rate.
    pub fn tcp(&mut self, e: &TcpEvent, names: Option<&FlowNames>) {
        if !self.errors.on() {
            return;
        }
        let client = Party::of(names.map(|n| &*n.client), e.id.client.ip);
        let server = Party::of(names.map(|n| &*n.server), e.id.server.ip);
        let key = (client, server, e.id.transport, e.id.server.port);
        self.errors.tcp(key, e.kind, names.map(|n| &n.client));
    }

    /// A lookup: a suspicious name counts towards its client's tunnel, a
    /// TXT or NULL lookup towards its volume.
    pub fn dns(&mut self, r: &DnsRecord, names: Option<&FlowNames>, now: Instant) {
        self.scans.dns(r, names, now);
    }

    /// The interval's events, as of `now` (`time` on the wall clock).
    pub fn finish(&mut self, now: Instant, time: SystemTime) -> Vec<LogEvent> {
        let mut found = Vec::new();
        self.scans.finish(now, &mut found);
        self.volumes.finish(now, &mut found);
        self.firsts.finish(now, &mut found);
        self.errors.finish(now, &mut found);
        found.into_iter().map(|f| self.event(f, time)).collect()
    }

    fn event(&self, f: Finding, time: SystemTime) -> LogEvent {
        if f.state == State::Started {
            if let Some(slot) = AnomalyKind::ALL.iter().position(|k| *k == f.kind) {
                self.detected[slot].fetch_add(1, Ordering::Relaxed);
            }
        }
        let int = |v: u64| Value::Int(i64::try_from(v).unwrap_or(i64::MAX));
        let mut attributes = vec![
            (catalogue::ANOMALY_KIND, Value::Str(f.kind.as_str().into())),
            (
                catalogue::ANOMALY_STATE,
                Value::Str(f.state.as_str().into()),
            ),
            (catalogue::ANOMALY_COUNT, int(f.count)),
            (catalogue::ANOMALY_THRESHOLD, int(f.threshold)),
            (
                catalogue::ANOMALY_WINDOW,
                Value::Double(self.cfg.window.as_secs_f64()),
            ),
            (catalogue::ANOMALY_CLIENT, Value::Str(f.client.to_string())),
        ];
        if let Party::Address(ip) = f.client {
            attributes.push((catalogue::CLIENT_ADDRESS, Value::Str(ip.to_string())));
        }
        if let Some(peer) = &f.peer {
            attributes.push((catalogue::ANOMALY_PEER, Value::Str(peer.to_string())));
        }
        if let Some(n) = f.client_names {
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
        attributes.extend(f.attributes);
        LogEvent {
            time,
            severity: if f.state == State::Ended {
                Severity::Info
            } else {
                Severity::Warn
            },
            name: catalogue::EVENT_ANOMALY,
            body: f.body,
            attributes,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::flow::model::{Counters, Endpoint, FlowId, Nat, SourceKind, Transport};
    use crate::flow::names::FlowNames;

    fn end(network: &str) -> Arc<EndName> {
        Arc::new(EndName {
            network: Some(network.into()),
            ..EndName::default()
        })
    }

    /// A flow of `up` and `down` bytes this interval, from 10.0.0.1.
    fn flow(server: &str, port: u16, up: u64, down: u64) -> (FlowUpdate, DirectionalCounters) {
        let delta = DirectionalCounters {
            to_server: Counters::new(up, up / 1000 + 1),
            to_client: Counters::new(down, down / 1000 + 1),
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("literal");
        let u = FlowUpdate {
            id: FlowId {
                transport: Transport::Tcp,
                client: Endpoint::new(ip("10.0.0.1"), 40_000),
                server: Endpoint::new(ip(server), port),
                zone: 0,
            },
            generation: 0,
            nat: Nat::default(),
            to_server: delta.to_server,
            to_client: delta.to_client,
            ended: false,
            source: SourceKind::Ebpf,
        };
        (u, delta)
    }

    fn kinds(events: &[LogEvent]) -> Vec<(String, String)> {
        let attr = |e: &LogEvent, key| {
            e.attributes
                .iter()
                .find_map(|(k, v)| match v {
                    Value::Str(s) if *k == key => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        events
            .iter()
            .map(|e| {
                (
                    attr(e, catalogue::ANOMALY_KIND),
                    attr(e, catalogue::ANOMALY_STATE),
                )
            })
            .collect()
    }

    #[test]
    fn an_upload_to_the_internet_is_exfiltration_and_nothing_else() {
        let cfg = AnomalyConfig {
            learning: Duration::from_secs(5),
            window: Duration::from_secs(2),
            exfil_min_bytes: 1_000_000,
            ..AnomalyConfig::default()
        };
        let telemetry = Telemetry::default();
        let t0 = Instant::now();
        let mut d = AnomalyDetector::new(&cfg, &telemetry, t0);
        let inside = FlowNames {
            client: end("cluster"),
            server: end("cluster"),
            local: None,
            settled: true,
        };
        let outside = FlowNames {
            server: end("internet"),
            ..inside.clone()
        };
        let mut events = Vec::new();
        for s in 0..12u64 {
            let now = t0 + Duration::from_secs(s);
            let (u, delta) = flow("10.0.0.2", 8080, 50_000, 200_000);
            d.flow(&u, delta, Some(&inside), now);
            if s == 8 {
                let (u, delta) = flow("203.0.113.1", 8080, 5_000_000, 100_000);
                d.flow(&u, delta, Some(&outside), now);
            }
            events.extend(d.finish(now, SystemTime::now()));
        }
        assert_eq!(
            kinds(&events),
            vec![
                ("exfiltration".into(), "started".into()),
                ("exfiltration".into(), "ended".into())
            ]
        );
        let count = events[1]
            .attributes
            .iter()
            .find(|(k, _)| *k == catalogue::ANOMALY_COUNT)
            .map(|(_, v)| v.clone());
        assert_eq!(count, Some(Value::Int(5_000_000)));
        assert_eq!(telemetry.value(&catalogue::ANOMALIES), 1);
    }
}
