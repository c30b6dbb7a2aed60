//! What the flow stage hands every exporter at the end of an interval.

use std::time::SystemTime;

use super::dns::{DnsNamePoint, DnsPoint};
use super::drops::DropPoint;
use super::mesh::LogEvent as AnomalyEvent;
use super::mesh::{FamilyGroup, LogEvent};
use super::records::Records;
use super::series::{KeySpec, SeriesPoint};
use super::spans::ConnectionSpan;
use super::tcp::TcpPoint;
use super::zones::ZonePoint;

/// Everything the exporters need about one finished interval.
#[derive(Debug, Clone)]
pub struct IntervalReport {
    pub points: Vec<SeriesPoint>,
    pub tcp: Vec<TcpPoint>,
    pub drops: Vec<DropPoint>,
    /// DNS series, cumulative.
    pub dns: Vec<DnsPoint>,
    /// Query-name series (`flows.dns_top_names`), cumulative.
    pub dns_names: Vec<DnsNamePoint>,
    pub zones: Vec<ZonePoint>,
    pub records: Records,
    /// Sampled connection spans, for the traces exporter.
    pub spans: Vec<ConnectionSpan>,
    pub mesh: MeshReport,
    /// `flowtel.anomaly` events ([`super::anomaly`]).
    pub anomalies: Vec<AnomalyEvent>,
    pub spec: KeySpec,
    pub start: SystemTime,
    pub end: SystemTime,
}

impl IntervalReport {
    /// The RTT and duration samples of the interval.
    pub fn samples(&self) -> usize {
        self.tcp
            .iter()
            .map(|p| p.rtt.len() + p.durations.len())
            .sum()
    }
}

/// The mesh and CNI sources' part of an interval: their latest metrics
/// (cumulative since `started`), `flowtel.sources.active` and
/// `flowtel.cni.detected`, and the log events they sent during it.
#[derive(Debug, Clone)]
pub struct MeshReport {
    /// When flowtel started: the start of every counter and histogram here.
    pub started: SystemTime,
    pub groups: Vec<FamilyGroup>,
    pub events: Vec<LogEvent>,
}
