//! Aggregation of flow deltas into a bounded set of metric series.
//!
//! A series is what the configured key keeps of a flow (by default no client
//! port, so ephemeral ports never become cardinality). At most
//! `flows.max_series` are exported: at the end of each interval the series
//! that carried the most bytes in it are kept and the rest fold into one
//! overflow series marked `otel.metric.overflow=true` (their cumulative
//! counts move with them, so totals stay exact and monotonic). Between two
//! ends of interval, half a budget more series may wait as candidates; past
//! that, new series go straight to the overflow series. `series_overflowed`
//! counts every flow update folded either way, so nothing is lost silently
//! and memory stays bounded whatever a port scan does.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::config::KeyField;
use crate::enrich::{EndName, FlowNames, Namer, Role};
use crate::flow::{
    Counters, DropRecord, Endpoint, FlowId, Nat, SourceKind, TcpClose, TcpEvent, TcpEventKind,
    TcpFailure, Transport,
};
use crate::stats::SelfStats;

/// Which flow fields identify a series, resolved once from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeySpec {
    pub client_address: bool,
    pub client_port: bool,
    pub server_address: bool,
    pub server_port: bool,
    pub transport: bool,
    pub direction: bool,
    pub nat: bool,
}

impl KeySpec {
    pub fn from_fields(fields: &[KeyField]) -> Self {
        let has = |f| fields.contains(&f);
        Self {
            client_address: has(KeyField::ClientAddress),
            client_port: has(KeyField::ClientPort),
            server_address: has(KeyField::ServerAddress),
            server_port: has(KeyField::ServerPort),
            transport: has(KeyField::Transport),
            direction: has(KeyField::Direction),
            nat: has(KeyField::Nat),
        }
    }

    /// The series a flow belongs to. An end that `names` identifies is
    /// keyed by its name instead of its address (and, behind NAT, the
    /// translated address is left out too: the name says who answered).
    pub fn key_of(
        &self,
        id: &FlowId,
        nat: &Nat,
        source: SourceKind,
        names: Option<&FlowNames>,
    ) -> SeriesKey {
        let ports = id.transport.has_ports();
        let named = |end: Option<&Arc<EndName>>| end.filter(|n| n.is_named()).cloned();
        let client_name = named(names.map(|n| &n.client));
        let server_name = named(names.map(|n| &n.server));
        SeriesKey {
            transport: self.transport.then_some(id.transport),
            client: (self.client_address && client_name.is_none()).then_some(id.client.ip),
            client_port: (self.client_port && ports).then_some(id.client.port),
            server: (self.server_address && server_name.is_none()).then_some(id.server.ip),
            server_port: (self.server_port && ports).then_some(id.server.port),
            nat_server: if self.nat && server_name.is_none() {
                nat.server
            } else {
                None
            },
            nat_client: if self.nat && client_name.is_none() {
                nat.client
            } else {
                None
            },
            client_name,
            server_name,
            local: names.and_then(|n| n.local),
            pending: names.is_some_and(|n| !n.settled),
            // Kept whenever an address could have been: a name that stands
            // in for the address keeps its family.
            network_type: (self.client_address
                || self.server_address
                || (self.nat && nat.server.is_some()))
            .then_some(if id.client.ip.is_ipv4() {
                "ipv4"
            } else {
                "ipv6"
            }),
            source,
            overflow: false,
        }
    }
}

/// The identity of one exported series. Fields left out of the key are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub transport: Option<Transport>,
    pub client: Option<IpAddr>,
    pub client_port: Option<u16>,
    pub server: Option<IpAddr>,
    pub server_port: Option<u16>,
    pub nat_server: Option<Endpoint>,
    pub nat_client: Option<Endpoint>,
    /// What the client is, when enrichment named it (its address is then
    /// left out).
    pub client_name: Option<Arc<EndName>>,
    pub server_name: Option<Arc<EndName>>,
    /// Which end is on this node, when enrichment could tell.
    pub local: Option<Role>,
    /// Named before the Kubernetes cache had synced: the names may be
    /// missing, and are retried.
    pub pending: bool,
    /// `ipv4` or `ipv6` (the `network.type` attribute).
    pub network_type: Option<&'static str>,
    pub source: SourceKind,
    /// The series that holds everything past the series budget.
    pub overflow: bool,
}

impl SeriesKey {
    fn overflow(source: SourceKind) -> Self {
        Self {
            transport: None,
            client: None,
            client_port: None,
            server: None,
            server_port: None,
            nat_server: None,
            nat_client: None,
            client_name: None,
            server_name: None,
            local: None,
            pending: false,
            network_type: None,
            source,
            overflow: true,
        }
    }
}

/// Bytes and packets of a series in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionalCounters {
    pub to_server: Counters,
    pub to_client: Counters,
}

impl DirectionalCounters {
    pub fn add(&mut self, other: DirectionalCounters) {
        self.to_server.add(other.to_server);
        self.to_client.add(other.to_client);
    }

    pub fn total(&self) -> Counters {
        let mut t = self.to_server;
        t.add(self.to_client);
        t
    }

    pub fn is_zero(&self) -> bool {
        self.to_server.is_zero() && self.to_client.is_zero()
    }
}

#[derive(Debug)]
struct SeriesState {
    cumulative: DirectionalCounters,
    interval: DirectionalCounters,
    start: SystemTime,
    last_active: Instant,
    /// Flow updates recorded into the series, counted as overflowed if it
    /// is ever folded.
    updates: u64,
}

impl SeriesState {
    fn new(now: Instant) -> Self {
        Self {
            cumulative: DirectionalCounters::default(),
            interval: DirectionalCounters::default(),
            start: SystemTime::now(),
            last_active: now,
            updates: 0,
        }
    }

    fn add(&mut self, delta: DirectionalCounters, updates: u64, now: Instant) {
        self.cumulative.add(delta);
        self.interval.add(delta);
        self.last_active = now;
        self.updates += updates;
    }
}

/// One series as exported at the end of an interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesPoint {
    pub key: SeriesKey,
    /// Since `start` (cumulative temporality).
    pub cumulative: DirectionalCounters,
    /// During the interval just ended.
    pub interval: DirectionalCounters,
    /// When this series started counting.
    pub start: SystemTime,
}

/// TCP connection counts of a series, cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub opened: u64,
    pub closed_fin: u64,
    pub closed_reset: u64,
    pub closed_timeout: u64,
    pub failed_refused: u64,
    pub failed_no_answer: u64,
    /// Retransmitted segments.
    pub retransmits: u64,
}

#[derive(Debug)]
struct TcpState {
    cumulative: TcpCounters,
    rtt: Vec<f64>,
    durations: Vec<f64>,
    start: SystemTime,
    last_active: Instant,
}

/// One series' TCP health as exported at the end of an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpPoint {
    pub key: SeriesKey,
    pub cumulative: TcpCounters,
    /// Smoothed RTT samples taken during the interval, in seconds.
    pub rtt: Vec<f64>,
    /// Durations of the connections that closed during the interval, in
    /// seconds.
    pub durations: Vec<f64>,
    pub start: SystemTime,
}

/// What identifies a drop series: few values, so no budget is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub reason: &'static str,
    pub transport: Transport,
    /// `ipv4`, `ipv6`, or `None` for packets that were not IP.
    pub network_type: Option<&'static str>,
}

/// Traffic between this node's zone and a peer's, for the cost of
/// cross-zone transfer. Only flows whose two ends have a zone count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ZoneKey {
    /// The zone of the end on this node.
    pub local: Arc<str>,
    pub peer: Arc<str>,
}

/// Bytes and packets between two zones, cumulative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZonePoint {
    pub key: ZoneKey,
    pub counters: DirectionalCounters,
    pub start: SystemTime,
}

/// Dropped packets of one drop series, cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropPoint {
    pub key: DropKey,
    pub counters: Counters,
    pub start: SystemTime,
}

/// RTT and duration samples kept per interval over all series: bounds the
/// memory a burst of short connections can take. Samples past it are
/// counted in `SelfStats::tcp_samples_dropped`.
pub const MAX_SAMPLES_PER_INTERVAL: usize = 65_536;

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

/// What the log events of one interval are built from. Empty unless
/// [`Aggregator::with_records`] turned it on.
#[derive(Debug, Clone, Default)]
pub struct Records {
    pub flows: Vec<FlowRecord>,
    pub connections: Vec<ConnectionEvent>,
    pub drops: Vec<DropRecord>,
}

/// Everything the exporters need about one finished interval.
#[derive(Debug, Clone)]
pub struct IntervalReport {
    pub points: Vec<SeriesPoint>,
    pub tcp: Vec<TcpPoint>,
    pub drops: Vec<DropPoint>,
    pub zones: Vec<ZonePoint>,
    pub records: Records,
    pub spec: KeySpec,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// The bounded series store.
#[derive(Debug)]
pub struct Aggregator {
    spec: KeySpec,
    max_series: usize,
    idle_timeout: Duration,
    series: HashMap<SeriesKey, SeriesState, RandomState>,
    tcp: HashMap<SeriesKey, TcpState, RandomState>,
    drops: HashMap<DropKey, (Counters, SystemTime), RandomState>,
    zones: HashMap<ZoneKey, (DirectionalCounters, SystemTime), RandomState>,
    samples: usize,
    interval_start: SystemTime,
    namer: Option<Namer>,
    /// At most this many flow records, and as many connection and drop
    /// events, per interval; 0 keeps none.
    max_records: usize,
    flow_records: HashMap<FlowId, FlowRecord, RandomState>,
    records: Records,
    stats: Arc<SelfStats>,
}

impl Aggregator {
    pub fn new(
        spec: KeySpec,
        max_series: usize,
        idle_timeout: Duration,
        stats: Arc<SelfStats>,
    ) -> Self {
        Self {
            spec,
            max_series: max_series.max(2),
            idle_timeout,
            series: HashMap::default(),
            tcp: HashMap::default(),
            drops: HashMap::default(),
            zones: HashMap::default(),
            samples: 0,
            interval_start: SystemTime::now(),
            namer: None,
            max_records: 0,
            flow_records: HashMap::default(),
            records: Records::default(),
            stats,
        }
    }

    /// Keeps up to `max` flow records, connection events and drop events
    /// per interval for the log exporter; past that they are counted in
    /// `SelfStats::records_dropped`.
    pub fn with_records(mut self, max: usize) -> Self {
        self.max_records = max;
        self
    }

    /// Adds a flow's delta to its record of the interval.
    pub fn record_flow(
        &mut self,
        u: &crate::flow::FlowUpdate,
        delta: DirectionalCounters,
        names: Option<Arc<FlowNames>>,
    ) {
        if self.max_records == 0 || (delta.is_zero() && !u.ended) {
            return;
        }
        if let Some(r) = self.flow_records.get_mut(&u.id) {
            r.delta.add(delta);
            r.ended |= u.ended;
            return;
        }
        if self.flow_records.len() >= self.max_records {
            SelfStats::inc(&self.stats.records_dropped);
            return;
        }
        self.flow_records.insert(
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
    fn record_tcp_event(&mut self, event: &TcpEvent, names: Option<Arc<FlowNames>>) {
        if self.max_records == 0 {
            return;
        }
        match event.kind {
            TcpEventKind::Rtt(rtt) => {
                if let Some(r) = self.flow_records.get_mut(&event.id) {
                    r.rtt = Some(rtt);
                }
            }
            TcpEventKind::Retransmits(n) => {
                if let Some(r) = self.flow_records.get_mut(&event.id) {
                    r.retransmits = r.retransmits.saturating_add(n);
                }
            }
            _ if self.records.connections.len() < self.max_records => {
                self.records.connections.push(ConnectionEvent {
                    event: *event,
                    names,
                    at: SystemTime::now(),
                });
            }
            _ => SelfStats::inc(&self.stats.records_dropped),
        }
    }

    /// Names both ends of every flow from now on.
    pub fn with_namer(mut self, namer: Option<Namer>) -> Self {
        self.namer = namer;
        self
    }

    /// Names flows seen from now on with this view of the cluster.
    pub fn set_snapshot(&mut self, snapshot: Arc<crate::enrich::kubernetes::Snapshot>) {
        if let Some(n) = &mut self.namer {
            n.set_snapshot(snapshot);
        }
    }

    /// The names of a flow: `cached` (the flow table's copy) unless it is
    /// missing or not yet settled, in which case the flow is named afresh
    /// and the cache updated.
    pub fn names(
        &mut self,
        id: &FlowId,
        nat: &Nat,
        cached: &mut Option<Arc<FlowNames>>,
    ) -> Option<Arc<FlowNames>> {
        let namer = self.namer.as_ref()?;
        match cached {
            Some(n) if n.settled => {}
            _ => {
                let names = namer.name(id, nat);
                if namer.uses_kubernetes() {
                    for end in [&names.client, &names.server] {
                        SelfStats::inc(if end.is_kubernetes() {
                            &self.stats.k8s_ends_named
                        } else {
                            &self.stats.k8s_ends_unknown
                        });
                    }
                }
                *cached = Some(Arc::new(names));
            }
        }
        cached.clone()
    }

    pub fn spec(&self) -> KeySpec {
        self.spec
    }

    /// Adds one flow's delta to its series (or to the overflow series).
    /// `names` is the flow table's cache of the flow's names (see
    /// [`Aggregator::names`]); pass `&mut None` for a flow it does not keep.
    pub fn record(
        &mut self,
        id: &FlowId,
        nat: &Nat,
        source: SourceKind,
        delta: DirectionalCounters,
        names: &mut Option<Arc<FlowNames>>,
    ) {
        if delta.is_zero() {
            return;
        }
        let names = self.names(id, nat, names);
        if let Some(zone) = names.as_deref().and_then(zone_key) {
            self.zones
                .entry(zone)
                .or_insert_with(|| (DirectionalCounters::default(), SystemTime::now()))
                .0
                .add(delta);
        }
        let key = self.spec.key_of(id, nat, source, names.as_deref());
        let now = Instant::now();
        if let Some(state) = self.series.get_mut(&key) {
            state.add(delta, 1, now);
            return;
        }
        let state = if self.series.len() < self.admission_limit() {
            self.series.entry(key)
        } else {
            SelfStats::inc(&self.stats.series_overflowed);
            self.series.entry(SeriesKey::overflow(source))
        };
        state
            .or_insert_with(|| SeriesState::new(now))
            .add(delta, 1, now);
    }

    /// Series held between two ends of interval: the budget plus half a
    /// budget of candidates for the top.
    fn admission_limit(&self) -> usize {
        self.max_series + self.max_series / 2
    }

    /// Keeps the `max_series - 1` series that carried the most bytes in the
    /// interval (ties: the most since they started) and folds the others
    /// into the overflow series of their source.
    fn keep_top(&mut self) {
        let keep = self.max_series - 1;
        let mut live: Vec<(u64, u64, SeriesKey)> = self
            .series
            .iter()
            .filter(|(k, _)| !k.overflow)
            .map(|(k, s)| {
                (
                    s.interval.total().bytes,
                    s.cumulative.total().bytes,
                    k.clone(),
                )
            })
            .collect();
        if live.len() <= keep {
            return;
        }
        live.sort_unstable_by_key(|(interval, cumulative, _)| (*interval, *cumulative));
        let excess = live.len() - keep;
        for (_, _, key) in live.into_iter().take(excess) {
            let Some(folded) = self.series.remove(&key) else {
                continue;
            };
            SelfStats::add(&self.stats.series_overflowed, folded.updates);
            let overflow = self
                .series
                .entry(SeriesKey::overflow(key.source))
                .or_insert_with(|| SeriesState::new(folded.last_active));
            overflow.cumulative.add(folded.cumulative);
            overflow.interval.add(folded.interval);
            overflow.updates += folded.updates;
            overflow.last_active = overflow.last_active.max(folded.last_active);
        }
    }

    /// Adds one TCP health observation to its series (the flow series key
    /// of the connection), within the same series budget as flows.
    pub fn record_tcp(&mut self, event: &TcpEvent) {
        let names = self.names(&event.id, &Nat::default(), &mut None);
        self.record_tcp_event(event, names.clone());
        let key = self.spec.key_of(
            &event.id,
            &Nat::default(),
            SourceKind::Ebpf,
            names.as_deref(),
        );
        let now = Instant::now();
        let key = if self.tcp.contains_key(&key) || self.tcp.len() + 1 < self.max_series {
            key
        } else {
            SelfStats::inc(&self.stats.series_overflowed);
            SeriesKey::overflow(SourceKind::Ebpf)
        };
        let state = self.tcp.entry(key).or_insert_with(|| TcpState {
            cumulative: TcpCounters::default(),
            rtt: Vec::new(),
            durations: Vec::new(),
            start: SystemTime::now(),
            last_active: now,
        });
        state.last_active = now;
        let c = &mut state.cumulative;
        let sample = match event.kind {
            TcpEventKind::Opened => {
                c.opened += 1;
                None
            }
            TcpEventKind::Closed { cause, duration } => {
                match cause {
                    TcpClose::Fin => c.closed_fin += 1,
                    TcpClose::Reset => c.closed_reset += 1,
                    TcpClose::Timeout => c.closed_timeout += 1,
                }
                duration.map(|d| (&mut state.durations, d))
            }
            TcpEventKind::Failed(TcpFailure::Refused) => {
                c.failed_refused += 1;
                None
            }
            TcpEventKind::Failed(TcpFailure::NoAnswer) => {
                c.failed_no_answer += 1;
                None
            }
            TcpEventKind::Retransmits(n) => {
                c.retransmits = c.retransmits.saturating_add(n);
                None
            }
            TcpEventKind::Rtt(rtt) => Some((&mut state.rtt, rtt)),
        };
        if let Some((samples, value)) = sample {
            if self.samples < MAX_SAMPLES_PER_INTERVAL {
                self.samples += 1;
                samples.push(value.as_secs_f64());
            } else {
                SelfStats::inc(&self.stats.tcp_samples_dropped);
            }
        }
    }

    /// Adds dropped packets to their reason's series.
    pub fn record_drop(&mut self, record: &DropRecord) {
        if self.max_records > 0 {
            if self.records.drops.len() < self.max_records {
                self.records.drops.push(*record);
            } else {
                SelfStats::inc(&self.stats.records_dropped);
            }
        }
        let network_type = record
            .src
            .map(|e| if e.ip.is_ipv4() { "ipv4" } else { "ipv6" });
        let key = DropKey {
            reason: record.reason,
            transport: record.transport,
            network_type,
        };
        self.drops
            .entry(key)
            .or_insert_with(|| (Counters::default(), SystemTime::now()))
            .0
            .add(record.counters);
    }

    /// Closes the interval: returns every live series and forgets the ones
    /// idle for longer than the idle timeout.
    pub fn finish_interval(&mut self) -> IntervalReport {
        let now = Instant::now();
        let idle = self.idle_timeout;
        self.series
            .retain(|_, s| now.duration_since(s.last_active) < idle);
        self.tcp
            .retain(|_, s| now.duration_since(s.last_active) < idle);
        self.keep_top();
        self.samples = 0;
        let tcp = self
            .tcp
            .iter_mut()
            .map(|(key, s)| TcpPoint {
                key: key.clone(),
                cumulative: s.cumulative,
                rtt: std::mem::take(&mut s.rtt),
                durations: std::mem::take(&mut s.durations),
                start: s.start,
            })
            .collect();
        let drops = self
            .drops
            .iter()
            .map(|(key, (counters, start))| DropPoint {
                key: *key,
                counters: *counters,
                start: *start,
            })
            .collect();
        let zones = self
            .zones
            .iter()
            .map(|(key, (counters, start))| ZonePoint {
                key: key.clone(),
                counters: *counters,
                start: *start,
            })
            .collect();
        let mut points = Vec::with_capacity(self.series.len());
        for (key, state) in self.series.iter_mut() {
            points.push(SeriesPoint {
                key: key.clone(),
                cumulative: state.cumulative,
                interval: state.interval,
                start: state.start,
            });
            state.interval = DirectionalCounters::default();
        }
        self.stats
            .series_active
            .store(points.len() as u64, Ordering::Relaxed);
        let end = SystemTime::now();
        let report = IntervalReport {
            points,
            tcp,
            drops,
            zones,
            records: Records {
                flows: self.flow_records.drain().map(|(_, r)| r).collect(),
                ..std::mem::take(&mut self.records)
            },
            spec: self.spec,
            start: self.interval_start,
            end,
        };
        self.interval_start = end;
        report
    }
}

/// The zones of a flow's two ends, the local one first (the client's when
/// neither end is on this node).
fn zone_key(names: &FlowNames) -> Option<ZoneKey> {
    let (local, peer) = match names.local.unwrap_or(Role::Client) {
        Role::Client => (&names.client, &names.server),
        Role::Server => (&names.server, &names.client),
    };
    Some(ZoneKey {
        local: local.zone.clone()?,
        peer: peer.zone.clone()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn flow(client_port: u16, server: u8) -> FlowId {
        FlowId {
            transport: Transport::Tcp,
            client: Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), client_port),
            server: Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 1, server)), 443),
            zone: 0,
        }
    }

    fn delta(bytes: u64) -> DirectionalCounters {
        DirectionalCounters {
            to_server: Counters::new(bytes, 1),
            to_client: Counters::new(2 * bytes, 2),
        }
    }

    fn agg(max_series: usize) -> (Aggregator, Arc<SelfStats>) {
        let stats = Arc::new(SelfStats::default());
        let spec = KeySpec::from_fields(&crate::config::FlowsConfig::default().key);
        (
            Aggregator::new(spec, max_series, Duration::from_secs(60), stats.clone()),
            stats,
        )
    }

    #[test]
    fn ephemeral_ports_share_a_series() {
        let (mut a, _) = agg(100);
        for port in 40_000..40_100 {
            a.record(
                &flow(port, 1),
                &Nat::default(),
                SourceKind::Conntrack,
                delta(10),
                &mut None,
            );
        }
        let report = a.finish_interval();
        assert_eq!(report.points.len(), 1);
        assert_eq!(
            report.points[0].cumulative.to_server,
            Counters::new(1000, 100)
        );
        assert_eq!(
            report.points[0].cumulative.to_client,
            Counters::new(2000, 200)
        );
    }

    #[test]
    fn named_ends_replace_addresses() {
        let stats = Arc::new(SelfStats::default());
        let spec = KeySpec::from_fields(&crate::config::FlowsConfig::default().key);
        let cfg = crate::enrich::EnrichConfig {
            unknown_addresses: crate::enrich::UnknownAddresses::Network,
            ..Default::default()
        };
        let namer = Namer::new(&cfg, false, None).expect("default networks are valid");
        let mut a = Aggregator::new(spec, 100, Duration::from_secs(60), stats).with_namer(namer);
        for server in 1..=10 {
            a.record(
                &flow(40_000 + u16::from(server), server),
                &Nat::default(),
                SourceKind::Conntrack,
                delta(3),
                &mut None,
            );
        }
        let report = a.finish_interval();
        assert_eq!(report.points.len(), 1, "ten servers, one network");
        let key = &report.points[0].key;
        assert_eq!((key.client, key.server), (None, None));
        let network = |n: &Option<Arc<EndName>>| n.as_ref().and_then(|n| n.network.clone());
        assert_eq!(network(&key.server_name).as_deref(), Some("internet"));
        assert_eq!(network(&key.client_name).as_deref(), Some("internet"));
        assert_eq!(report.points[0].cumulative.to_server.bytes, 30);
    }

    #[test]
    fn budget_folds_into_overflow_and_counts() {
        let (mut a, stats) = agg(4);
        for server in 1..=10 {
            a.record(
                &flow(1000, server),
                &Nat::default(),
                SourceKind::Conntrack,
                delta(5),
                &mut None,
            );
        }
        let report = a.finish_interval();
        assert_eq!(report.points.len(), 4, "3 series plus overflow");
        let overflow: Vec<_> = report.points.iter().filter(|p| p.key.overflow).collect();
        assert_eq!(overflow.len(), 1);
        assert_eq!(overflow[0].cumulative.to_server.bytes, 7 * 5);
        assert_eq!(SelfStats::get(&stats.series_overflowed), 7);
        let total: u64 = report
            .points
            .iter()
            .map(|p| p.cumulative.to_server.bytes)
            .sum();
        assert_eq!(total, 50, "nothing lost");
    }

    #[test]
    fn the_heaviest_series_of_the_interval_are_kept() {
        let (mut a, stats) = agg(4);
        let heavy = flow(1000, 6);
        for server in 1..=5 {
            a.record(
                &flow(1000, server),
                &Nat::default(),
                SourceKind::Ebpf,
                delta(1),
                &mut None,
            );
        }
        a.record(
            &heavy,
            &Nat::default(),
            SourceKind::Ebpf,
            delta(100),
            &mut None,
        );
        let report = a.finish_interval();
        assert_eq!(report.points.len(), 4, "3 series plus overflow");
        assert!(
            report
                .points
                .iter()
                .any(|p| p.key.server == Some(heavy.server.ip)),
            "the series with the most bytes must be kept: {:?}",
            report.points
        );
        assert_eq!(
            SelfStats::get(&stats.series_overflowed),
            3,
            "3 light series folded"
        );
        let total: u64 = report
            .points
            .iter()
            .map(|p| p.cumulative.to_server.bytes)
            .sum();
        assert_eq!(total, 105, "nothing lost");
        // A later interval: the folded series stay folded, totals keep growing.
        a.record(
            &flow(1000, 1),
            &Nat::default(),
            SourceKind::Ebpf,
            delta(1),
            &mut None,
        );
        let next = a.finish_interval();
        let total: u64 = next
            .points
            .iter()
            .map(|p| p.cumulative.to_server.bytes)
            .sum();
        assert!(total >= 106, "cumulative totals never go back: {total}");
    }

    #[test]
    fn interval_resets_but_cumulative_grows() {
        let (mut a, _) = agg(10);
        a.record(
            &flow(1, 1),
            &Nat::default(),
            SourceKind::Conntrack,
            delta(10),
            &mut None,
        );
        let first = a.finish_interval();
        assert_eq!(first.points[0].interval.to_server.bytes, 10);
        a.record(
            &flow(1, 1),
            &Nat::default(),
            SourceKind::Conntrack,
            delta(5),
            &mut None,
        );
        let second = a.finish_interval();
        assert_eq!(second.points[0].interval.to_server.bytes, 5);
        assert_eq!(second.points[0].cumulative.to_server.bytes, 15);
        let third = a.finish_interval();
        assert_eq!(third.points[0].interval.to_server.bytes, 0);
    }
}
