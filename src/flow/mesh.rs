//! What the mesh and CNI sources (Hubble, Istio, Felix) deliver, in a form
//! every exporter writes without knowing the source: metric families named
//! by the catalogue, with labelled points, and log events.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use super::names::EndName;
use crate::telemetry::catalogue::Metric;

/// One metric with every series a source has for it now. Counters and
/// histograms are cumulative since flowtel started.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub metric: &'static Metric,
    pub points: Vec<Point>,
}

/// One series: its labels, in the order the source wrote them, and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub labels: Vec<(String, String)>,
    /// The series that holds what did not fit a source's series budget
    /// (`otel.metric.overflow=true`).
    pub overflow: bool,
    pub value: PointValue,
}

impl Point {
    pub fn new(labels: Vec<(String, String)>, value: PointValue) -> Self {
        Self {
            labels,
            overflow: false,
            value,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum PointValue {
    Int(u64),
    Number(f64),
    Histogram(HistogramValue),
}

/// A histogram in OTel's explicit-bucket form: `counts[i]` observations fell
/// in `(bounds[i-1], bounds[i]]`, the last count above every bound (the
/// exposition format's buckets are cumulative; these are not).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramValue {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl HistogramValue {
    /// No observations yet, with these bucket bounds.
    pub fn empty(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts one observation in the first bucket whose bound it does not
    /// exceed (bounds are upper-inclusive), else in the last.
    pub fn observe(&mut self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get_mut(bucket) {
            *count += 1;
        }
        self.sum += value;
        self.count += 1;
    }
}

/// Families whose points share attributes, written before each point's own
/// labels (an Istio proxy's families, naming its pod).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FamilyGroup {
    pub attributes: Vec<(&'static str, String)>,
    pub families: Vec<Family>,
}

/// How bad a log event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warn,
}

/// A log attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
}

/// A log event a source made (a Hubble flow), ready to export.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEvent {
    pub time: SystemTime,
    pub severity: Severity,
    /// Its `event.name`.
    pub name: &'static str,
    /// A one-line summary for people.
    pub body: String,
    pub attributes: Vec<(&'static str, Value)>,
}

/// What a mesh or CNI source delivers when asked, once per interval.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshUpdate {
    /// `hubble`, `istio` or `felix`.
    pub source: &'static str,
    /// The source delivers data now (`flowtel.sources.active`).
    pub active: bool,
    /// Its metrics now (replacing what it delivered before).
    pub groups: Vec<FamilyGroup>,
    /// Its log events since the previous update.
    pub events: Vec<LogEvent>,
}

/// How a pod takes part in an Istio mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MeshRole {
    /// An injected Envoy sidecar (`istio-proxy`), scraped on its own port.
    IstioSidecar,
    /// Ambient mode: ztunnel on the node carries the pod's traffic, so the
    /// pod has no proxy to scrape.
    IstioAmbient,
    /// The node's ztunnel itself, scraped for every ambient pod.
    IstioZtunnel,
}

/// A proxy of this node's pods, found by the Kubernetes cache, for the
/// Istio source to scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyTarget {
    /// The pod, named down to the pod whatever `enrich.level`.
    pub pod: Arc<EndName>,
    pub ip: IpAddr,
    pub role: MeshRole,
    /// The `prometheus.io/port` and `prometheus.io/path` annotations.
    pub port: Option<u16>,
    pub path: Option<Arc<str>>,
}

/// Where the Istio source finds the proxies to scrape, each round.
pub type ProxyTargets = Box<dyn Fn() -> Vec<ProxyTarget> + Send + Sync>;
