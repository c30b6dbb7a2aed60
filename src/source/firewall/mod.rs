//! The firewall source: the node's nftables and legacy xtables rule
//! counters, read each interval, as exact per-rule deltas summed into
//! `flowtel.firewall.*`, named after the Kubernetes Services and network
//! policies the rules belong to, with a log event when a drop rule's
//! counter moves.
//!
//! One thread (in `firewall.netns` when set) does the reads: a netlink
//! dump for nftables, `iptables-legacy-save -c` and
//! `ip6tables-legacy-save -c` for legacy tables. Reading counters needs
//! CAP_NET_ADMIN.

pub mod counters;
pub mod names;
pub mod nft;
pub mod rules;
pub mod xtables;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::hubble::Enabled;
use super::{netns, Source, SourceContext};
use crate::component::ConfigError;
use crate::flow::mesh::{Family, FamilyGroup, LogEvent, MeshUpdate, Point, PointValue};
use crate::flow::SourceEvent;
use crate::telemetry::catalogue;
use counters::{Labels, Totals, Tracker};
use rules::{Backend, DecodeIssue, Issues, Rule};

/// `firewall`: the rule counters of nftables and legacy xtables.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirewallConfig {
    /// `auto` and `on` both read every interval; `auto` logs a refused
    /// read once at info level, `on` as a warning every time it changes.
    pub enabled: Enabled,
    /// Read nftables (also what `iptables-nft` writes).
    pub nftables: bool,
    /// Legacy xtables: `auto` reads them while legacy tables are loaded
    /// (and counts a missing save program as a failure), `on` always.
    pub xtables: Enabled,
    /// The programs that print legacy tables with counters: a name looked
    /// up on `PATH`, or a path.
    pub iptables_legacy_save: String,
    pub ip6tables_legacy_save: String,
    /// Read the rules of this network namespace instead of flowtel's own.
    pub netns: Option<PathBuf>,
    /// At most this many rule series; further rules fold into one overflow
    /// series (and so do drop-view series).
    pub max_series: usize,
    /// A series no rule has had for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub series_idle_timeout: Duration,
    /// At most this many drop events per interval; the rest are counted.
    pub max_events: usize,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        Self {
            enabled: Enabled::Auto,
            nftables: true,
            xtables: Enabled::Auto,
            iptables_legacy_save: "iptables-legacy-save".into(),
            ip6tables_legacy_save: "ip6tables-legacy-save".into(),
            netns: None,
            max_series: 2000,
            series_idle_timeout: Duration::from_secs(3600),
            max_events: 100,
        }
    }
}

impl FirewallConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_series == 0 {
            return Err(ConfigError::new("max_series", "must be at least 1"));
        }
        if self.series_idle_timeout.is_zero() {
            return Err(ConfigError::new(
                "series_idle_timeout",
                "must be greater than 0, e.g. \"1h\"",
            ));
        }
        for (key, v) in [
            ("iptables_legacy_save", &self.iptables_legacy_save),
            ("ip6tables_legacy_save", &self.ip6tables_legacy_save),
        ] {
            if v.trim().is_empty() {
                return Err(ConfigError::new(key, "must name a program or a path"));
            }
        }
        Ok(())
    }
}

/// Starts the source unless `firewall.enabled` is `off`.
pub fn build(cfg: &FirewallConfig, ctx: &SourceContext) -> anyhow::Result<Option<Box<dyn Source>>> {
    if cfg.enabled == Enabled::Off {
        return Ok(None);
    }
    let ns = match &cfg.netns {
        Some(p) => Some(
            File::open(p)
                .map_err(|e| anyhow::anyhow!("firewall.netns: cannot open {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let (requests, rx) = std_mpsc::sync_channel(1);
    let (cfg, events) = (cfg.clone(), ctx.events.clone());
    let thread = std::thread::Builder::new()
        .name("firewall".into())
        .spawn(move || {
            if let Err(e) = netns::enter(ns.as_ref(), cfg.netns.as_deref(), "firewall.netns") {
                tracing::error!("firewall source: {e}");
                return;
            }
            Reader::new(cfg).run(&rx, &events);
        })?;
    Ok(Some(Box::new(FirewallSource {
        requests: Some(requests),
        thread: Some(thread),
    })))
}

struct FirewallSource {
    requests: Option<std_mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Source for FirewallSource {
    fn name(&self) -> &'static str {
        "firewall"
    }

    fn request(&mut self, _epoch: u64) -> bool {
        match self.requests.as_ref().map(|r| r.try_send(())) {
            // A read still running answers this interval too.
            Some(Ok(())) | Some(Err(std_mpsc::TrySendError::Full(()))) => true,
            _ => false,
        }
    }

    fn stop(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        self.requests = None;
        let thread = self.thread.take();
        Box::pin(async move {
            if let Some(t) = thread {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
        })
    }
}

/// Logs at most once a minute per key.
#[derive(Default)]
struct LogLimit(BTreeMap<String, Instant>);

impl LogLimit {
    fn ready(&mut self, key: &str) -> bool {
        let now = Instant::now();
        match self.0.get(key) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(60) => false,
            _ => {
                self.0.insert(key.to_owned(), now);
                true
            }
        }
    }
}

/// The reading thread's state.
struct Reader {
    cfg: FirewallConfig,
    dumper: nft::Dumper,
    tracker: Tracker,
    /// (backend, error.type) → count.
    failures: BTreeMap<(Backend, &'static str), u64>,
    decode_errors: BTreeMap<(Backend, &'static str), u64>,
    events_dropped: u64,
    rules: BTreeMap<(Backend, &'static str), u64>,
    active: bool,
    logs: LogLimit,
}

impl Reader {
    fn new(cfg: FirewallConfig) -> Self {
        let tracker = Tracker::new(cfg.max_series, cfg.series_idle_timeout);
        Self {
            cfg,
            dumper: nft::Dumper::default(),
            tracker,
            failures: BTreeMap::new(),
            decode_errors: BTreeMap::new(),
            events_dropped: 0,
            rules: BTreeMap::new(),
            active: false,
            logs: LogLimit::default(),
        }
    }

    fn run(mut self, requests: &std_mpsc::Receiver<()>, events: &mpsc::Sender<SourceEvent>) {
        while requests.recv().is_ok() {
            let update = self.read();
            let lost = update.events.len() as u64;
            match events.try_send(SourceEvent::Mesh(Box::new(update))) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => self.events_dropped += lost,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }

    /// One read of every back end, as this interval's update.
    fn read(&mut self) -> MeshUpdate {
        let mut rules = Vec::new();
        let mut read = Vec::new();
        if self.cfg.nftables {
            let mut issues = Issues::new();
            match self.dumper.dump(&mut issues) {
                Ok(r) => {
                    rules.extend(r);
                    read.push(Backend::Nftables);
                }
                Err(e) => self.failed(Backend::Nftables, e.kind, &e.message),
            }
            self.note(Backend::Nftables, &issues);
        }
        if let Some(r) = self.read_xtables() {
            rules.extend(r);
            read.push(Backend::Xtables);
        }
        self.active = !read.is_empty();
        let changes = self.tracker.apply(&read, &rules, Instant::now());
        for b in &read {
            self.rules.retain(|(backend, _), _| backend != b);
        }
        for ((b, family), n) in changes.rules {
            self.rules.insert((b, family), n);
        }
        let mut events = changes.drops;
        if events.len() > self.cfg.max_events {
            self.events_dropped += (events.len() - self.cfg.max_events) as u64;
            events.truncate(self.cfg.max_events);
        }
        self.update(events)
    }

    /// Both legacy families, or `None` when neither was read.
    fn read_xtables(&mut self) -> Option<Vec<Rule>> {
        if self.cfg.xtables == Enabled::Off {
            return None;
        }
        let mut out = Vec::new();
        let mut any = false;
        for (i, &(_, family)) in xtables::SAVE_PROGRAMS.iter().enumerate() {
            let configured = if i == 0 {
                self.cfg.iptables_legacy_save.clone()
            } else {
                self.cfg.ip6tables_legacy_save.clone()
            };
            if self.cfg.xtables == Enabled::Auto && !xtables::tables_loaded(family) {
                continue;
            }
            // Legacy tables are loaded (or `on`): not reading them is a
            // failure each time.
            let Some(program) = find_program(&configured) else {
                self.failed(
                    Backend::Xtables,
                    "not_found",
                    &format!("{configured} was not found; legacy {family} tables are not read"),
                );
                continue;
            };
            let mut issues = Issues::new();
            match xtables::read(&program, family, &mut issues) {
                Ok(r) => {
                    out.extend(r);
                    any = true;
                }
                Err(e) => self.failed(Backend::Xtables, "command", &e),
            }
            self.note(Backend::Xtables, &issues);
        }
        any.then_some(out)
    }

    fn failed(&mut self, backend: Backend, kind: &'static str, message: &str) {
        *self.failures.entry((backend, kind)).or_insert(0) += 1;
        if self
            .logs
            .ready(&format!("fail {} {kind}", backend.as_str()))
        {
            let hint = if kind == "permission" {
                "; reading rule counters needs CAP_NET_ADMIN"
            } else {
                ""
            };
            if self.cfg.enabled == Enabled::On {
                tracing::warn!(
                    backend = backend.as_str(),
                    "firewall source: {message}{hint}"
                );
            } else {
                tracing::info!(
                    backend = backend.as_str(),
                    "firewall source: {message}{hint}"
                );
            }
        }
    }

    fn note(&mut self, backend: Backend, issues: &[DecodeIssue]) {
        for issue in issues {
            *self
                .decode_errors
                .entry((backend, issue.kind()))
                .or_insert(0) += 1;
            if self.logs.ready(issue.kind()) {
                tracing::warn!(
                    backend = backend.as_str(),
                    "firewall source: {issue}; counted in flowtel.firewall.decode.errors"
                );
            }
        }
    }

    fn update(&self, events: Vec<LogEvent>) -> MeshUpdate {
        let (packets, bytes) = totals(&self.tracker.rules);
        let (drops, _) = totals(&self.tracker.drops);
        let by_backend = |m: &BTreeMap<(Backend, &'static str), u64>, second: &'static str| {
            m.iter()
                .map(|((b, k), n)| {
                    Point::new(
                        vec![
                            (catalogue::FIREWALL_BACKEND.into(), b.as_str().into()),
                            (second.into(), (*k).into()),
                        ],
                        PointValue::Int(*n),
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut resets: Vec<_> = self.tracker.resets.iter().collect();
        resets.sort();
        let families = vec![
            family(&catalogue::FIREWALL_PACKETS, packets),
            family(&catalogue::FIREWALL_BYTES, bytes),
            family(&catalogue::FIREWALL_DROPS, drops),
            family(
                &catalogue::FIREWALL_RULES,
                by_backend(&self.rules, catalogue::FIREWALL_FAMILY),
            ),
            family(
                &catalogue::FIREWALL_READ_FAILURES,
                by_backend(&self.failures, catalogue::ERROR_TYPE),
            ),
            family(
                &catalogue::FIREWALL_DECODE_ERRORS,
                by_backend(&self.decode_errors, catalogue::ERROR_TYPE),
            ),
            family(
                &catalogue::FIREWALL_COUNTER_RESETS,
                resets
                    .into_iter()
                    .map(|(b, n)| {
                        Point::new(
                            vec![(catalogue::FIREWALL_BACKEND.into(), b.as_str().into())],
                            PointValue::Int(*n),
                        )
                    })
                    .collect(),
            ),
            family(
                &catalogue::FIREWALL_SERIES_FOLDED,
                vec![Point::new(
                    Vec::new(),
                    PointValue::Int(self.tracker.rules.folded + self.tracker.drops.folded),
                )],
            ),
            family(
                &catalogue::FIREWALL_EVENTS_DROPPED,
                vec![Point::new(Vec::new(), PointValue::Int(self.events_dropped))],
            ),
        ];
        MeshUpdate {
            source: "firewall",
            active: self.active,
            groups: vec![FamilyGroup {
                attributes: Vec::new(),
                families,
            }],
            events,
        }
    }
}

fn family(metric: &'static catalogue::Metric, points: Vec<Point>) -> Family {
    Family { metric, points }
}

fn labels(l: &Labels) -> Vec<(String, String)> {
    l.iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// (packets points, bytes points) of `totals`, with the overflow series.
fn totals(t: &Totals) -> (Vec<Point>, Vec<Point>) {
    let mut packets = Vec::with_capacity(t.series() + 1);
    let mut bytes = Vec::with_capacity(t.series() + 1);
    for (l, p, b) in t.points() {
        packets.push(Point::new(labels(l), PointValue::Int(p)));
        bytes.push(Point::new(labels(l), PointValue::Int(b)));
    }
    if t.folded > 0 {
        for (v, out) in [(t.overflow.0, &mut packets), (t.overflow.1, &mut bytes)] {
            out.push(Point {
                labels: Vec::new(),
                overflow: true,
                value: PointValue::Int(v),
            });
        }
    }
    (packets, bytes)
}

/// `name` as a path (when it has a `/`) or found on `PATH`.
fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
