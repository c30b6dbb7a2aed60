//! The records of an interval, for the log exporter: one per flow with
//! traffic, each TCP connection opened, closed or failed, and each drop,
//! at most `export.logs.max_records` of each kind; past it they are
//! counted in `flowtel.logs.records.dropped`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use foldhash::fast::RandomState;

use super::dns::{DnsLookup, DnsRecord};
use super::model::{
    DirectionalCounters, DropRecord, FlowId, FlowUpdate, Nat, SourceKind, TcpEvent, TcpEventKind,
};
use super::names::FlowNames;
use crate::telemetry::{catalogue, Counter, Telemetry};

/// One flow's traffic in one interval, for the flow-record log events.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowRecord {
    pub id: FlowId,
    pub nat: Nat,
    pub source: SourceKind,
    pub names: Option<Arc<FlowNames>>,
    /// Bytes and packets during the interval.
    pub delta: DirectionalCounters,
    /// The connection ended during the interval (this is its last record).
    pub ended: bool,
    /// The latest smoothed RTT sample of the connection in the interval.
    pub rtt: Option<Duration>,
    /// Segments retransmitted during the interval.
    pub retransmits: u64,
}

/// A TCP connection opened, closed or failed (not RTT or retransmit
/// samples), for the connection log events.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionEvent {
    pub event: TcpEvent,
    pub names: Option<Arc<FlowNames>>,
    pub at: SystemTime,
}

/// What the log events of one interval are built from. Empty unless the
/// log exporter asked for records (`export.logs`).
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub flows: Vec<FlowRecord>,
    pub connections: Vec<ConnectionEvent>,
    pub drops: Vec<DropRecord>,
    /// The firewall drop rule that alone moved during the interval: its
    /// attributes, put on the interval's `NETFILTER_DROP` drop events.
    pub firewall_rule: Option<Vec<(&'static str, String)>>,
    /// Failed DNS lookups.
    pub dns: Vec<DnsLookup>,
}

impl Records {
    /// Records of all kinds.
    pub fn len(&self) -> usize {
        self.flows.len() + self.connections.len() + self.drops.len() + self.dns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Collects an interval's records.
#[derive(Debug)]
pub struct RecordCollector {
    /// At most this many flow records, and as many connection and drop
    /// events, per interval; 0 keeps none.
    max_records: usize,
    flows: HashMap<FlowId, FlowRecord, RandomState>,
    connections: Vec<ConnectionEvent>,
    drops: Vec<DropRecord>,
    dns: Vec<DnsLookup>,
    dropped: Counter,
}

impl RecordCollector {
    pub fn new(max_records: usize, telemetry: &Telemetry) -> Self {
        Self {
            max_records,
            flows: HashMap::default(),
            connections: Vec::new(),
            drops: Vec::new(),
            dns: Vec::new(),
            dropped: telemetry.counter(&catalogue::LOGS_RECORDS_DROPPED),
        }
    }

    /// Adds a flow's delta to its record of the interval.
    pub fn flow(
        &mut self,
        u: &FlowUpdate,
        delta: DirectionalCounters,
        names: Option<Arc<FlowNames>>,
    ) {
        if self.max_records == 0 || (delta.is_zero() && !u.ended) {
            return;
        }
        if let Some(r) = self.flows.get_mut(&u.id) {
            r.delta.add(delta);
            r.ended |= u.ended;
            return;
        }
        if self.flows.len() >= self.max_records {
            self.dropped.inc();
            return;
        }
        self.flows.insert(
            u.id,
            FlowRecord {
                id: u.id,
                nat: u.nat,
                source: u.source,
                names,
                delta,
                ended: u.ended,
                rtt: None,
                retransmits: 0,
            },
        );
    }

    /// Keeps a connection event, or joins an RTT or retransmit sample to
    /// the connection's flow record.
    pub fn tcp(&mut self, event: &TcpEvent, names: Option<Arc<FlowNames>>) {
        if self.max_records == 0 {
            return;
        }
        match event.kind {
            TcpEventKind::Rtt(rtt) => {
                if let Some(r) = self.flows.get_mut(&event.id) {
                    r.rtt = Some(rtt);
                }
            }
            TcpEventKind::Retransmits(n) => {
                if let Some(r) = self.flows.get_mut(&event.id) {
                    r.retransmits = r.retransmits.saturating_add(n);
                }
            }
            _ if self.connections.len() < self.max_records => {
                self.connections.push(ConnectionEvent {
                    event: *event,
                    names,
                    at: SystemTime::now(),
                });
            }
            _ => self.dropped.inc(),
        }
    }

    /// Keeps a drop event.
    pub fn packet_drop(&mut self, record: &DropRecord) {
        if self.max_records == 0 {
            return;
        }
        if self.drops.len() < self.max_records {
            self.drops.push(*record);
        } else {
            self.dropped.inc();
        }
    }

    /// Keeps a DNS lookup.
    pub fn dns_lookup(&mut self, record: DnsRecord, names: Option<Arc<FlowNames>>) {
        if self.max_records == 0 {
            return;
        }
        if self.dns.len() < self.max_records {
            self.dns.push(DnsLookup {
                record,
                names,
                at: SystemTime::now(),
            });
        } else {
            self.dropped.inc();
        }
    }

    /// The interval's records; the next interval starts empty.
    pub fn finish(&mut self) -> Records {
        Records {
            flows: self.flows.drain().map(|(_, r)| r).collect(),
            connections: std::mem::take(&mut self.connections),
            drops: std::mem::take(&mut self.drops),
            firewall_rule: None,
            dns: std::mem::take(&mut self.dns),
        }
    }
}
