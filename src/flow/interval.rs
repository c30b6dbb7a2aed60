//! The flow stage: one task that applies what the sources send to the flow
//! table and the series, and closes each interval into an
//! [`IntervalReport`] for the exporters.
//!
//! It owns all of its state (no locks on the hot path). Each interval it
//! asks the sources for their data; when the kernel source's dump is
//! complete, the interval is closed and delivered.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::anomaly::{AnomalyConfig, AnomalyDetector};
use super::dns::{DnsNames, DnsSeries};
use super::drops::DropSeries;
use super::mesh::{Family, FamilyGroup, LogEvent, MeshUpdate, Point, PointValue, Value};
use super::model::{FlowId, Nat, SourceEvent};
use super::names::{FlowNames, Naming};
use super::records::RecordCollector;
use super::report::{IntervalReport, MeshReport};
use super::series::{FlowSeries, KeyField, KeySpec};
use super::spans::{SpanCollector, SpanKeep};
use super::table::FlowTable;
use super::tcp::TcpSeries;
use super::zones::ZoneSeries;
use crate::component::ConfigError;
use crate::telemetry::{catalogue, ActiveSources, Telemetry};

/// How long shutdown waits for the final dump before exporting what it has.
const FINAL_DUMP_TIMEOUT: Duration = Duration::from_secs(5);

/// The `flows:` section: how flows are tracked and aggregated.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsConfig {
    /// Hard cap on connections tracked for delta computation.
    pub max_flows: usize,
    /// Hard cap on metric series; further series fold into one overflow series.
    pub max_series: usize,
    /// Attributes that identify a series.
    pub key: Vec<KeyField>,
    /// A series with no traffic for this long is forgotten (its cumulative
    /// counter restarts if it comes back).
    #[serde(with = "humantime_serde")]
    pub series_idle_timeout: Duration,
    /// Query names with a series of their own in `flowtel.dns.name.requests`:
    /// each interval's top this many by lookups, the rest folded into one
    /// overflow series. 0 (the default): no such metric.
    pub dns_top_names: usize,
    /// Scans, sweeps, DNS tunnelling, traffic spikes and drops,
    /// exfiltration, lateral movement, unusual protocols and high error
    /// rates, reported as `flowtel.anomaly` events.
    pub anomaly: AnomalyConfig,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            max_flows: 262_144,
            max_series: 20_000,
            key: vec![
                KeyField::ClientAddress,
                KeyField::ServerAddress,
                KeyField::ServerPort,
                KeyField::Transport,
                KeyField::Direction,
                KeyField::Nat,
            ],
            series_idle_timeout: Duration::from_secs(15 * 60),
            dns_top_names: 0,
            anomaly: AnomalyConfig::default(),
        }
    }
}

impl FlowsConfig {
    /// Checks what serde cannot; `interval` is the export interval.
    pub fn validate(&self, interval: Duration) -> Result<(), ConfigError> {
        if self.max_flows == 0 {
            return Err(ConfigError::new("max_flows", "must be at least 1"));
        }
        if self.max_series < 2 {
            return Err(ConfigError::new(
                "max_series",
                "must be at least 2 (one series plus the overflow series)",
            ));
        }
        if self.key.is_empty() {
            return Err(ConfigError::new(
                "key",
                "must name at least one field (client_address, client_port, server_address, server_port, transport, direction, nat)",
            ));
        }
        self.anomaly.validate().map_err(|e| e.within("anomaly"))?;
        if self.series_idle_timeout < interval {
            return Err(ConfigError::new(
                "series_idle_timeout",
                "must be at least one interval, or every series would be forgotten before it is exported",
            ));
        }
        Ok(())
    }
}

/// What names a firewall rule on a drop event it is attributed to.
const FIREWALL_RULE_ATTRIBUTES: &[&str] = &[
    catalogue::FIREWALL_BACKEND,
    catalogue::FIREWALL_FAMILY,
    catalogue::FIREWALL_TABLE,
    catalogue::FIREWALL_CHAIN,
    catalogue::FIREWALL_RULE_POSITION,
    catalogue::FIREWALL_RULE_COMMENT,
    catalogue::FIREWALL_VERDICT,
    catalogue::FIREWALL_OWNER,
    catalogue::K8S_NAMESPACE,
    catalogue::K8S_SERVICE,
    catalogue::FIREWALL_SERVICE_PORT,
    catalogue::FIREWALL_ENDPOINT,
    catalogue::FIREWALL_POLICY_KIND,
    catalogue::FIREWALL_POLICY,
];

/// The latest of each mesh source, and the log events since the last report.
#[derive(Debug, Default)]
struct MeshState {
    latest: Vec<MeshUpdate>,
    events: Vec<LogEvent>,
    cni: Option<Arc<str>>,
}

impl MeshState {
    fn update(&mut self, mut update: MeshUpdate) {
        self.events.append(&mut update.events);
        match self.latest.iter_mut().find(|u| u.source == update.source) {
            Some(u) => *u = update,
            None => self.latest.push(update),
        }
    }

    /// The sources that deliver now, the kernel source first.
    fn active(&self, kernel: Option<&'static str>) -> ActiveSources {
        let mut sources: Vec<&'static str> = kernel.into_iter().collect();
        for name in ["hubble", "istio", "felix", "firewall", "cni"] {
            if self.latest.iter().any(|u| u.source == name && u.active) {
                sources.push(name);
            }
        }
        ActiveSources {
            cni: self.cni.as_deref().map(str::to_owned),
            sources,
        }
    }

    /// The attributes of the one firewall drop rule whose counter moved in
    /// the firewall read of this interval; `None` when none or several did
    /// (then a kernel `NETFILTER_DROP` cannot be told apart).
    fn firewall_drop_rule(&self) -> Option<Vec<(&'static str, String)>> {
        let mut rules = self
            .events
            .iter()
            .filter(|e| e.name == catalogue::EVENT_FIREWALL_DROP)
            .map(|e| {
                e.attributes
                    .iter()
                    .filter(|(k, _)| FIREWALL_RULE_ATTRIBUTES.contains(k))
                    .filter_map(|(k, v)| match v {
                        Value::Str(s) => Some((*k, s.clone())),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            });
        let first = rules.next()?;
        rules.all(|r| r == first).then_some(first)
    }

    fn report(&mut self, started: SystemTime, active: &ActiveSources) -> MeshReport {
        let gauge = |metric, key: &'static str, values: Vec<String>| Family {
            metric,
            points: values
                .into_iter()
                .map(|v| Point::new(vec![(key.to_owned(), v)], PointValue::Int(1)))
                .collect(),
        };
        let status = FamilyGroup {
            attributes: Vec::new(),
            families: vec![
                gauge(
                    &catalogue::SOURCES_ACTIVE,
                    catalogue::SOURCE,
                    active.sources.iter().map(|s| (*s).to_owned()).collect(),
                ),
                gauge(
                    &catalogue::CNI_DETECTED,
                    catalogue::CNI_NAME,
                    active.cni.iter().cloned().collect(),
                ),
            ],
        };
        let mut groups = vec![status];
        groups.extend(self.latest.iter().flat_map(|u| u.groups.iter().cloned()));
        MeshReport {
            started,
            groups,
            events: std::mem::take(&mut self.events),
        }
    }
}

/// The flow stage's state between two reports.
pub struct FlowStage {
    table: FlowTable,
    naming: Option<Box<dyn Naming>>,
    series: FlowSeries,
    tcp: TcpSeries,
    drops: DropSeries,
    dns: DnsSeries,
    dns_names: DnsNames,
    /// Keep answered DNS lookups as records too, not only failed ones.
    dns_lookups: bool,
    zones: ZoneSeries,
    records: RecordCollector,
    spans: SpanCollector,
    anomaly: AnomalyDetector,
    /// The anomaly detectors' clock: read once per interval, not per flow.
    clock: Instant,
    mesh: MeshState,
    started: SystemTime,
    start: SystemTime,
    telemetry: Telemetry,
}

/// The names of a flow: `cached` (the flow table's copy) unless it is
/// missing or not yet settled, in which case the flow is named afresh and
/// the cache updated.
fn name_flow(
    naming: Option<&dyn Naming>,
    id: &FlowId,
    nat: &Nat,
    cached: &mut Option<Arc<FlowNames>>,
) -> Option<Arc<FlowNames>> {
    let naming = naming?;
    match cached {
        Some(n) if n.settled => {}
        _ => *cached = Some(Arc::new(naming.name(id, nat))),
    }
    cached.clone()
}

impl FlowStage {
    /// `records` is how many records of each kind an interval keeps for the
    /// log exporter (0 when there is none); `naming` names flow ends.
    pub fn new(
        cfg: &FlowsConfig,
        records: usize,
        naming: Option<Box<dyn Naming>>,
        telemetry: &Telemetry,
    ) -> Self {
        let spec = KeySpec::from_fields(&cfg.key);
        let series = FlowSeries::new(spec, cfg.max_series, cfg.series_idle_timeout, telemetry);
        let tcp = TcpSeries::new(
            spec,
            series.max_series(),
            cfg.series_idle_timeout,
            series.overflowed().clone(),
            telemetry,
        );
        let now = SystemTime::now();
        Self {
            table: FlowTable::new(cfg.max_flows, telemetry),
            naming,
            series,
            tcp,
            drops: DropSeries::default(),
            dns: DnsSeries::default(),
            dns_names: DnsNames::new(
                cfg.dns_top_names,
                telemetry.counter(&catalogue::DNS_NAMES_OVERFLOWED),
            ),
            dns_lookups: false,
            zones: ZoneSeries::default(),
            records: RecordCollector::new(records, telemetry),
            spans: SpanCollector::new(None, telemetry),
            anomaly: AnomalyDetector::new(&cfg.anomaly, telemetry, Instant::now()),
            clock: Instant::now(),
            mesh: MeshState::default(),
            started: now,
            start: now,
            telemetry: telemetry.clone(),
        }
    }

    /// Keeps the sampled connection spans for the traces exporter (`None`:
    /// there is none).
    pub fn with_spans(mut self, keep: Option<SpanKeep>) -> Self {
        self.spans = SpanCollector::new(keep, &self.telemetry);
        self
    }

    /// Keeps every DNS lookup as a record for the log exporter, not only
    /// the failed ones (`export.logs.dns: all`).
    pub fn with_dns_lookups(mut self, all: bool) -> Self {
        self.dns_lookups = all;
        self
    }

    /// Applies one event from a source.
    pub fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Flow(update) => {
                let naming = self.naming.as_deref();
                let Some(d) = self
                    .table
                    .apply(update, |id, nat, cached| name_flow(naming, id, nat, cached))
                else {
                    return;
                };
                let u = &d.update;
                if let Some(names) = d.names.as_deref() {
                    if !d.delta.is_zero() {
                        self.zones.record(names, d.delta);
                    }
                }
                self.series
                    .record(&u.id, &u.nat, u.source, d.delta, d.names.as_deref());
                self.anomaly
                    .flow(u, d.delta, d.names.as_deref(), self.clock);
                self.records.flow(u, d.delta, d.names);
            }
            SourceEvent::Tcp(event) => {
                let names = name_flow(
                    self.naming.as_deref(),
                    &event.id,
                    &Nat::default(),
                    &mut None,
                );
                self.tcp.record(&event, names.as_deref());
                self.anomaly.tcp(&event, names.as_deref());
                self.records.tcp(&event, names);
            }
            SourceEvent::Connection(end) => {
                if self.spans.wants(&end) {
                    let names = name_flow(self.naming.as_deref(), &end.id, &end.nat, &mut None);
                    self.spans.push(end, names);
                }
            }
            SourceEvent::Drop(record) => {
                self.drops.record(&record);
                self.records.packet_drop(&record);
            }
            SourceEvent::Dns(record) => {
                let id = FlowId {
                    transport: record.transport,
                    client: record.client,
                    server: record.server,
                    zone: 0,
                };
                let names = name_flow(self.naming.as_deref(), &id, &Nat::default(), &mut None);
                self.dns.record(&record, names.clone());
                self.anomaly.dns(&record, names.as_deref(), self.clock);
                self.dns_names.record(&record.name);
                if self.dns_lookups || record.failed() {
                    self.records.dns_lookup(record, names);
                }
            }
            SourceEvent::DumpStarted { epoch } => self.table.dump_started(epoch),
            SourceEvent::DumpFinished { epoch, complete } => {
                self.table.dump_finished(epoch, complete);
            }
            SourceEvent::Mesh(update) => self.mesh.update(*update),
            SourceEvent::Cni(cni) => self.mesh.cni = cni,
        }
    }

    /// Closes the interval.
    pub fn finish(&mut self) -> IntervalReport {
        let end = SystemTime::now();
        let active = self.mesh.active(self.telemetry.source().map(|s| s.name));
        let firewall_rule = self.mesh.firewall_drop_rule();
        let mesh = self.mesh.report(self.started, &active);
        self.telemetry.set_active(active);
        let mut records = self.records.finish();
        records.firewall_rule = firewall_rule;
        let report = IntervalReport {
            points: self.series.finish(),
            tcp: self.tcp.finish(),
            drops: self.drops.points(),
            dns: self.dns.finish(),
            dns_names: self.dns_names.finish(),
            zones: self.zones.points(),
            records,
            spans: self.spans.finish(),
            mesh,
            anomalies: self.anomaly.finish(Instant::now(), end),
            spec: self.series.spec(),
            start: self.start,
            end,
        };
        self.start = end;
        self.clock = Instant::now();
        report
    }

    /// Runs until `shutdown` resolves, then takes a final dump and delivers
    /// the last interval. Each `interval`, `request(epoch)` asks every
    /// source for that interval's data (false once the kernel source has
    /// stopped); `deliver` hands a finished interval to the exporters.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
        interval: Duration,
        mut request: impl FnMut(u64) -> bool,
        mut deliver: impl FnMut(Arc<IntervalReport>),
        shutdown: impl Future<Output = ()>,
    ) {
        self.refresh();
        let mut epoch = 1;
        let mut pending = request(epoch).then_some(epoch);
        let mut report_due = false;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                event = events.recv() => {
                    let Some(event) = event else {
                        tracing::error!("every source stopped unexpectedly");
                        break;
                    };
                    let finished = matches!(event, SourceEvent::DumpFinished { epoch: e, .. } if Some(e) == pending);
                    self.apply(event);
                    if finished {
                        pending = None;
                        self.telemetry
                            .set_active(self.mesh.active(self.telemetry.source().map(|s| s.name)));
                        self.telemetry.set_ready();
                        if std::mem::take(&mut report_due) {
                            deliver(Arc::new(self.finish()));
                        }
                    }
                }
                _ = ticker.tick() => {
                    if pending.is_some() {
                        tracing::warn!("the previous dump is still running after a whole interval; exporting what was counted so far");
                        deliver(Arc::new(self.finish()));
                        report_due = false;
                    } else {
                        epoch += 1;
                        self.refresh();
                        if request(epoch) {
                            pending = Some(epoch);
                            report_due = true;
                        }
                    }
                }
                _ = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: final dump and export");
        epoch += 1;
        if request(epoch) {
            let deadline = tokio::time::Instant::now() + FINAL_DUMP_TIMEOUT;
            while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
                let finished =
                    matches!(event, SourceEvent::DumpFinished { epoch: e, .. } if e == epoch);
                self.apply(event);
                if finished {
                    break;
                }
            }
        }
        // What the other sources answered to the final request.
        while let Ok(event) = events.try_recv() {
            self.apply(event);
        }
        deliver(Arc::new(self.finish()));
    }

    fn refresh(&mut self) {
        self.clock = Instant::now();
        if let Some(n) = &mut self.naming {
            n.refresh();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drop_event(policy: &str) -> LogEvent {
        LogEvent {
            time: SystemTime::now(),
            severity: super::super::mesh::Severity::Warn,
            name: catalogue::EVENT_FIREWALL_DROP,
            body: String::new(),
            attributes: vec![
                (catalogue::FIREWALL_CHAIN, Value::Str("cali-pi-_x".into())),
                (catalogue::FIREWALL_POLICY, Value::Str(policy.into())),
                (catalogue::DROP_PACKETS, Value::Int(3)),
            ],
        }
    }

    #[test]
    fn a_netfilter_drop_is_attributed_only_to_a_lone_moving_rule() {
        let mut mesh = MeshState::default();
        assert_eq!(mesh.firewall_drop_rule(), None);
        mesh.events.push(drop_event("deny-db"));
        let one = Some(vec![
            (catalogue::FIREWALL_CHAIN, "cali-pi-_x".to_owned()),
            (catalogue::FIREWALL_POLICY, "deny-db".to_owned()),
        ]);
        assert_eq!(mesh.firewall_drop_rule(), one);
        mesh.events.push(drop_event("deny-db"));
        assert_eq!(mesh.firewall_drop_rule(), one);
        mesh.events.push(drop_event("deny-all"));
        assert_eq!(mesh.firewall_drop_rule(), None);
    }
}
