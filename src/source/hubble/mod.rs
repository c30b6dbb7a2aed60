//! Cilium Hubble as a source: the agent's Observer API streams every flow
//! Cilium's datapath and L7 proxy saw on this node, with verdicts
//! (forwarded, dropped and why), security identities and L7 records (HTTP,
//! DNS, Kafka) the kernel sources cannot see.
//!
//! [`start`] spawns the client, which aggregates into a [`HubbleReport`];
//! each interval the source sends that report's metrics ([`metrics`]) and
//! the flows received since as log events ([`records`]) into the pipeline
//! (names in `docs/telemetry.md`, "Mesh and CNI sources").

pub mod client;
pub mod convert;
pub mod metrics;
pub mod proto;
pub mod records;
pub mod report;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::detect::Detection;
use super::{Source, SourceContext};
use crate::component::{positive, ConfigError};
use crate::flow::mesh::{FamilyGroup, MeshUpdate};
use crate::flow::SourceEvent;

pub use convert::{
    Direction, Dns, Http, HubbleEnd, HubbleFlow, Kafka, L7Record, ServiceName, Workload, L7,
};
pub use report::{
    EndKey, FlowKey, HubbleReport, L7Key, LatencySeries, Series, StreamStats, LATENCY_BOUNDS,
};

/// Whether to read Hubble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enabled {
    /// Use it when the socket exists at start.
    #[default]
    Auto,
    /// Always: a missing socket is counted and retried until it appears.
    On,
    Off,
}

impl Enabled {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

impl Serialize for Enabled {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Accepts `auto`, `on` and `off`, and also YAML 1.1 booleans, because
/// some YAML writers turn a bare `on`/`off` into `true`/`false`.
impl<'de> Deserialize<'de> for Enabled {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Enabled;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("one of `auto`, `on`, `off`")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Enabled, E> {
                Ok(if v { Enabled::On } else { Enabled::Off })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Enabled, E> {
                match v {
                    "auto" => Ok(Enabled::Auto),
                    "on" | "true" => Ok(Enabled::On),
                    "off" | "false" => Ok(Enabled::Off),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The `hubble:` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubbleConfig {
    pub enabled: Enabled,
    /// The Cilium agent's Observer socket (mount it from the host).
    pub socket: PathBuf,
    /// The longest wait between two connection attempts; waits start at
    /// 100 ms and double.
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    /// Series per metric; flows past it are counted in an overflow series
    /// so that a cluster with many workloads cannot grow memory without end.
    pub max_series: usize,
    /// Flows kept for flow records between two reports; the oldest are
    /// dropped (and counted) first.
    pub max_records: usize,
    /// Each kind of stream error is logged at most once per this interval.
    #[serde(with = "humantime_serde")]
    pub log_interval: Duration,
}

impl Default for HubbleConfig {
    fn default() -> Self {
        Self {
            enabled: Enabled::Auto,
            socket: PathBuf::from("/var/run/cilium/hubble.sock"),
            reconnect_backoff_max: Duration::from_secs(30),
            max_series: 2000,
            max_records: 10_000,
            log_interval: Duration::from_secs(60),
        }
    }
}

impl HubbleConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_series < 2 {
            return Err(ConfigError::new(
                "max_series",
                "must be at least 2 (one series plus the overflow series)",
            ));
        }
        positive("reconnect_backoff_max", self.reconnect_backoff_max, "30s")?;
        positive("log_interval", self.log_interval, "60s")
    }
}

/// The running client and its counters. Dropping it stops the client.
#[derive(Debug)]
pub struct HubbleHandle {
    shared: Arc<Mutex<report::Aggregator>>,
    task: tokio::task::JoinHandle<()>,
    socket: PathBuf,
}

impl HubbleHandle {
    /// The cumulative counters and stream state, and the flows received
    /// since the previous call (for flow records). Call once per interval.
    pub fn report(&self) -> HubbleReport {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report()
    }

    /// The socket it reads.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Stops the client and waits for it to be gone.
    pub async fn shutdown(mut self) {
        self.task.abort();
        // Cancelled is the expected outcome; nothing is left to clean up.
        let _ = (&mut self.task).await;
    }
}

impl Drop for HubbleHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the client on the current tokio runtime, or returns `None` when
/// `enabled` is `off`, or `auto` and the socket is not there now (call it
/// again when [`crate::source::detect`] reports the socket, to pick Hubble
/// up later).
pub fn start(config: &HubbleConfig) -> Option<HubbleHandle> {
    match config.enabled {
        Enabled::Off => return None,
        Enabled::Auto if !crate::source::detect::hubble_present(&config.socket) => return None,
        Enabled::Auto | Enabled::On => {}
    }
    let shared = Arc::new(Mutex::new(report::Aggregator::new(report::Limits {
        max_series: config.max_series,
        max_records: config.max_records,
    })));
    let settings = client::ClientSettings {
        socket: config.socket.clone(),
        backoff_initial: client::BACKOFF_INITIAL,
        backoff_max: config.reconnect_backoff_max,
        log_interval: config.log_interval,
    };
    tracing::info!(socket = %config.socket.display(), "hubble source: starting");
    let task = tokio::spawn(client::run(settings, Arc::clone(&shared)));
    Some(HubbleHandle {
        shared,
        task,
        socket: config.socket.clone(),
    })
}

/// The Hubble source: starts the client when the socket is there (`auto`)
/// or always (`on`), and each interval sends the report.
struct HubbleSource {
    cfg: HubbleConfig,
    handle: Option<HubbleHandle>,
    detection: watch::Receiver<Detection>,
    events: mpsc::Sender<SourceEvent>,
    /// An update the channel had no room for, sent with the next one.
    pending: Option<MeshUpdate>,
    /// Flow records dropped because pending ones filled `max_records`.
    records_dropped: u64,
}

impl HubbleSource {
    fn update(&mut self, handle: &HubbleHandle) -> MeshUpdate {
        let mut report = handle.report();
        let observed = SystemTime::now();
        let mut events: Vec<_> = match self.pending.take() {
            Some(p) => p.events,
            None => Vec::new(),
        };
        events.extend(report.records.iter().map(|f| records::record(f, observed)));
        let excess = events.len().saturating_sub(self.cfg.max_records);
        if excess > 0 {
            // The oldest go first, as in the client's own queue.
            events.drain(..excess);
            self.records_dropped += excess as u64;
        }
        report.records_dropped += self.records_dropped;
        MeshUpdate {
            source: "hubble",
            active: report.stream.connected || report.stream.flows > 0,
            groups: vec![FamilyGroup {
                attributes: Vec::new(),
                families: metrics::families(&report),
            }],
            events,
        }
    }
}

impl Source for HubbleSource {
    fn name(&self) -> &'static str {
        "hubble"
    }

    fn request(&mut self, _epoch: u64) -> bool {
        // `auto` picks Hubble up when the socket appears after start.
        if self.handle.is_none() && self.detection.borrow().hubble {
            self.handle = start(&self.cfg);
        }
        let Some(handle) = self.handle.take() else {
            return true;
        };
        let update = self.update(&handle);
        self.handle = Some(handle);
        match self.events.try_send(SourceEvent::Mesh(Box::new(update))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(SourceEvent::Mesh(update))) => {
                // Its flow records go with the next interval's.
                self.pending = Some(*update);
                true
            }
            Err(_) => false,
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(h) = self.handle {
                h.shutdown().await;
            }
        })
    }
}

/// The source, unless `hubble.enabled` is `off`.
pub fn build(cfg: &HubbleConfig, ctx: &SourceContext) -> Option<Box<dyn Source>> {
    if cfg.enabled == Enabled::Off {
        return None;
    }
    Some(Box::new(HubbleSource {
        cfg: cfg.clone(),
        handle: start(cfg),
        detection: ctx.detection.clone(),
        events: ctx.events.clone(),
        pending: None,
        records_dropped: 0,
    }))
}
