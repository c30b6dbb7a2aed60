//! High error rate: the share of a pair's TCP connections on one server
//! port that failed (refused, unanswered), were reset or timed out, from
//! the eBPF source's connection events (conntrack has no close causes).
//!
//! Keyed by the server port too, so a scan (one failure per port) never
//! counts, and judged per interval above a minimum of connections.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AnomalyConfig, AnomalyKind, Finding, Party, State};
use crate::flow::mesh::Value;
use crate::flow::model::{TcpClose, TcpEventKind, TcpFailure, Transport};
use crate::flow::names::EndName;
use crate::telemetry::{catalogue, Counter};

/// Connections that ended, by how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Outcomes {
    pub ended: u64,
    pub refused: u64,
    pub no_answer: u64,
    pub reset: u64,
    pub timeout: u64,
}

impl Outcomes {
    fn bad(&self) -> u64 {
        self.refused + self.no_answer + self.reset + self.timeout
    }

    fn add(&mut self, o: &Outcomes) {
        self.ended += o.ended;
        self.refused += o.refused;
        self.no_answer += o.no_answer;
        self.reset += o.reset;
        self.timeout += o.timeout;
    }
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    last_bad: Instant,
    total: Outcomes,
    peak: u64,
}

#[derive(Debug)]
struct PairErrors {
    interval: Outcomes,
    episode: Option<Episode>,
    names: Option<Arc<EndName>>,
}

type Key = (Party, Party, Transport, u16);

/// Error rates per pair and server port.
#[derive(Debug)]
pub(super) struct ErrorRates {
    pairs: HashMap<Key, PairErrors, RandomState>,
    ratio: f64,
    min: u64,
    window: Duration,
    max: usize,
    untracked: Counter,
}

impl ErrorRates {
    pub(super) fn new(cfg: &AnomalyConfig, untracked: Counter) -> Self {
        Self {
            pairs: HashMap::default(),
            ratio: cfg.error_ratio,
            min: cfg.error_min_connections,
            window: cfg.window,
            max: cfg.max_tracked,
            untracked,
        }
    }

    pub(super) fn on(&self) -> bool {
        self.ratio > 0.0
    }

    /// A TCP connection's end (other events are ignored).
    pub(super) fn tcp(&mut self, key: Key, kind: TcpEventKind, names: Option<&Arc<EndName>>) {
        let field: Option<fn(&mut Outcomes)> = match kind {
            TcpEventKind::Closed { cause, .. } => match cause {
                TcpClose::Fin => None,
                TcpClose::Reset => Some(|o: &mut Outcomes| o.reset += 1),
                TcpClose::Timeout => Some(|o: &mut Outcomes| o.timeout += 1),
            },
            TcpEventKind::Failed(TcpFailure::Refused) => Some(|o: &mut Outcomes| o.refused += 1),
            TcpEventKind::Failed(TcpFailure::NoAnswer) => Some(|o: &mut Outcomes| o.no_answer += 1),
            _ => return,
        };
        if !self.pairs.contains_key(&key) && self.pairs.len() >= self.max {
            self.untracked.inc();
            return;
        }
        let p = self.pairs.entry(key).or_insert_with(|| PairErrors {
            interval: Outcomes::default(),
            episode: None,
            names: names.cloned(),
        });
        p.interval.ended += 1;
        if let Some(count) = field {
            count(&mut p.interval);
        }
    }

    pub(super) fn finish(&mut self, now: Instant, out: &mut Vec<Finding>) {
        let (ratio, min, window) = (self.ratio, self.min, self.window);
        self.pairs.retain(|(client, server, transport, port), p| {
            let o = p.interval;
            let anomalous = o.ended >= min && o.bad() as f64 >= ratio * o.ended as f64;
            let state = match (&mut p.episode, anomalous) {
                (None, true) => {
                    p.episode = Some(Episode {
                        last_bad: now,
                        total: o,
                        peak: o.bad(),
                    });
                    Some(State::Started)
                }
                (Some(e), true) => {
                    e.last_bad = now;
                    e.total.add(&o);
                    (o.bad() > e.peak).then(|| {
                        e.peak = o.bad();
                        State::Ongoing
                    })
                }
                (Some(e), false) => {
                    e.total.add(&o);
                    (now.duration_since(e.last_bad) >= window).then_some(State::Ended)
                }
                (None, false) => None,
            };
            if let (Some(state), Some(e)) = (state, p.episode) {
                let t = e.total;
                let tally = format!(
                    "{} of {} connections went wrong since it started ({} refused, {} unanswered, {} reset, {} timed out)",
                    t.bad(),
                    t.ended,
                    t.refused,
                    t.no_answer,
                    t.reset,
                    t.timeout
                );
                let body = match state {
                    State::Ended => format!(
                        "high error rate: {client} → {server} {} port {port} under the ratio for {} s; {tally}",
                        transport.as_str(),
                        window.as_secs()
                    ),
                    _ => format!(
                        "high error rate: {client} → {server} {} port {port}: {} of {} connections in this interval went wrong; {tally}",
                        transport.as_str(),
                        o.bad(),
                        o.ended
                    ),
                };
                let int = |v: u64| Value::Int(i64::try_from(v).unwrap_or(i64::MAX));
                out.push(Finding {
                    kind: AnomalyKind::HighErrorRate,
                    state,
                    count: t.bad(),
                    threshold: (ratio * 100.0).round() as u64,
                    client: client.clone(),
                    client_names: p.names.clone(),
                    peer: Some(server.clone()),
                    body,
                    attributes: vec![
                        (catalogue::SERVER_PORT, Value::Int((*port).into())),
                        (
                            catalogue::NETWORK_TRANSPORT,
                            Value::Str(transport.as_str().into()),
                        ),
                        (catalogue::ANOMALY_VALUE, int(o.bad())),
                        (catalogue::ANOMALY_CONNECTIONS, int(t.ended)),
                    ],
                });
                if state == State::Ended {
                    p.episode = None;
                }
            }
            p.interval = Outcomes::default();
            p.episode.is_some() || o.ended > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Telemetry;

    fn key(port: u16) -> Key {
        let ip = |s: &str| Party::Address(s.parse().expect("literal"));
        (ip("10.0.0.1"), ip("10.0.0.2"), Transport::Tcp, port)
    }

    const FIN: TcpEventKind = TcpEventKind::Closed {
        cause: TcpClose::Fin,
        duration: None,
    };
    const RESET: TcpEventKind = TcpEventKind::Closed {
        cause: TcpClose::Reset,
        duration: None,
    };
    const REFUSED: TcpEventKind = TcpEventKind::Failed(TcpFailure::Refused);

    #[test]
    fn a_failing_port_starts_once_and_ends_with_its_totals() {
        let cfg = AnomalyConfig {
            window: Duration::from_secs(2),
            ..AnomalyConfig::default()
        };
        let t = Telemetry::default();
        let mut e = ErrorRates::new(&cfg, t.counter(&catalogue::ANOMALY_UNTRACKED));
        let t0 = Instant::now();
        let mut run = |second: u64, events: &[(u16, TcpEventKind, usize)]| {
            for (port, kind, n) in events {
                for _ in 0..*n {
                    e.tcp(key(*port), *kind, None);
                }
            }
            let mut out = Vec::new();
            e.finish(t0 + Duration::from_secs(second), &mut out);
            out.iter()
                .map(|f| (f.state, f.count, f.threshold))
                .collect::<Vec<_>>()
        };
        // Below the minimum, below the ratio, a scan (one failure per
        // port): nothing.
        assert!(run(0, &[(80, REFUSED, 19)]).is_empty());
        assert!(run(1, &[(80, RESET, 10), (80, FIN, 11)]).is_empty());
        let scan: Vec<_> = (1000..1100).map(|p| (p, REFUSED, 1)).collect();
        assert!(run(2, &scan).is_empty());
        // Half of 40 reset: started; more: ongoing; fewer: nothing; a
        // window without: ended with every connection since the start.
        assert_eq!(
            run(3, &[(80, RESET, 20), (80, FIN, 20)]),
            vec![(State::Started, 20, 50)]
        );
        assert_eq!(run(4, &[(80, REFUSED, 30)]), vec![(State::Ongoing, 50, 50)]);
        assert!(run(5, &[(80, REFUSED, 25), (80, FIN, 5)]).is_empty());
        assert!(run(6, &[(80, FIN, 10)]).is_empty());
        assert_eq!(run(7, &[]), vec![(State::Ended, 75, 50)]);
        assert!(e.pairs.is_empty());
    }
}
