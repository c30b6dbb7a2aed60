//! The flow series: flow deltas aggregated into a bounded set of metric
//! series.
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
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use foldhash::fast::RandomState;
use serde::{Deserialize, Serialize};

use super::model::{DirectionalCounters, Endpoint, FlowId, Nat, SourceKind, Transport};
use super::names::{EndName, FlowNames, Role};
use crate::telemetry::{catalogue, Counter, Gauge, Telemetry};

/// One field of the aggregation key (`flows.key`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum KeyField {
    ClientAddress,
    /// Off by default: ephemeral client ports are unbounded cardinality.
    ClientPort,
    ServerAddress,
    ServerPort,
    Transport,
    /// Bytes client→server and server→client as separate points.
    Direction,
    /// The translated ends of NAT'ed flows (the backend behind a VIP).
    Nat,
}

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
    pub(crate) fn overflow(source: SourceKind) -> Self {
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

/// The flow series of the current interval and their cumulative counts.
#[derive(Debug)]
pub struct FlowSeries {
    spec: KeySpec,
    max_series: usize,
    idle_timeout: Duration,
    series: HashMap<SeriesKey, SeriesState, RandomState>,
    overflowed: Counter,
    active: Gauge,
}

impl FlowSeries {
    pub fn new(
        spec: KeySpec,
        max_series: usize,
        idle_timeout: Duration,
        telemetry: &Telemetry,
    ) -> Self {
        Self {
            spec,
            max_series: max_series.max(2),
            idle_timeout,
            series: HashMap::default(),
            overflowed: telemetry.counter(&catalogue::SERIES_OVERFLOWED),
            active: telemetry.gauge(&catalogue::SERIES_ACTIVE),
        }
    }

    pub fn spec(&self) -> KeySpec {
        self.spec
    }

    /// The series budget, shared with the TCP series.
    pub fn max_series(&self) -> usize {
        self.max_series
    }

    /// The counter of updates folded into an overflow series, shared with
    /// the TCP series.
    pub fn overflowed(&self) -> &Counter {
        &self.overflowed
    }

    /// Adds one flow's delta to its series (or to the overflow series).
    pub fn record(
        &mut self,
        id: &FlowId,
        nat: &Nat,
        source: SourceKind,
        delta: DirectionalCounters,
        names: Option<&FlowNames>,
    ) {
        if delta.is_zero() {
            return;
        }
        let key = self.spec.key_of(id, nat, source, names);
        let now = Instant::now();
        if let Some(state) = self.series.get_mut(&key) {
            state.add(delta, 1, now);
            return;
        }
        let state = if self.series.len() < self.admission_limit() {
            self.series.entry(key)
        } else {
            self.overflowed.inc();
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
            self.overflowed.add(folded.updates);
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

    /// Closes the interval: forgets the series idle for longer than the
    /// idle timeout, keeps the top of the budget and returns every live
    /// series.
    pub fn finish(&mut self) -> Vec<SeriesPoint> {
        let now = Instant::now();
        let idle = self.idle_timeout;
        self.series
            .retain(|_, s| now.duration_since(s.last_active) < idle);
        self.keep_top();
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
        self.active.set(points.len() as u64);
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::model::Counters;
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

    fn agg(max_series: usize) -> (FlowSeries, Telemetry) {
        let telemetry = Telemetry::default();
        let spec = KeySpec::from_fields(&crate::flow::FlowsConfig::default().key);
        (
            FlowSeries::new(spec, max_series, Duration::from_secs(60), &telemetry),
            telemetry,
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
                None,
            );
        }
        let points = a.finish();
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].cumulative.to_server, Counters::new(1000, 100));
        assert_eq!(points[0].cumulative.to_client, Counters::new(2000, 200));
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
                None,
            );
        }
        let points = a.finish();
        assert_eq!(points.len(), 4, "3 series plus overflow");
        let overflow: Vec<_> = points.iter().filter(|p| p.key.overflow).collect();
        assert_eq!(overflow.len(), 1);
        assert_eq!(overflow[0].cumulative.to_server.bytes, 7 * 5);
        assert_eq!(stats.value(&catalogue::SERIES_OVERFLOWED), 7);
        let total: u64 = points.iter().map(|p| p.cumulative.to_server.bytes).sum();
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
                None,
            );
        }
        a.record(&heavy, &Nat::default(), SourceKind::Ebpf, delta(100), None);
        let points = a.finish();
        assert_eq!(points.len(), 4, "3 series plus overflow");
        assert!(
            points.iter().any(|p| p.key.server == Some(heavy.server.ip)),
            "the series with the most bytes must be kept: {:?}",
            points
        );
        assert_eq!(
            stats.value(&catalogue::SERIES_OVERFLOWED),
            3,
            "3 light series folded"
        );
        let total: u64 = points.iter().map(|p| p.cumulative.to_server.bytes).sum();
        assert_eq!(total, 105, "nothing lost");
        // A later interval: the folded series stay folded, totals keep growing.
        a.record(
            &flow(1000, 1),
            &Nat::default(),
            SourceKind::Ebpf,
            delta(1),
            None,
        );
        let next = a.finish();
        let total: u64 = next.iter().map(|p| p.cumulative.to_server.bytes).sum();
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
            None,
        );
        let first = a.finish();
        assert_eq!(first[0].interval.to_server.bytes, 10);
        a.record(
            &flow(1, 1),
            &Nat::default(),
            SourceKind::Conntrack,
            delta(5),
            None,
        );
        let second = a.finish();
        assert_eq!(second[0].interval.to_server.bytes, 5);
        assert_eq!(second[0].cumulative.to_server.bytes, 15);
        let third = a.finish();
        assert_eq!(third[0].interval.to_server.bytes, 0);
    }
}
