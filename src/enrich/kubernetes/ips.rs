//! Pod address allocation and release, from the pod cache: when a pod of
//! this node first shows addresses in `status.podIPs`, and when it lets
//! them go (deleted, finished, or its addresses removed). Each is an INFO
//! log event (`flowtel.cni.ip_allocated`, `flowtel.cni.ip_released`) and
//! counts in `flowtel.cni.ips.allocated`/`released`; an allocation also
//! gives the time from the pod's `PodScheduled` condition to its first
//! address (`flowtel.cni.scheduled_to_ip.duration`).
//!
//! The cache finds the changes ([`IpChange`], only once pods have been
//! listed completely: what was there before flowtel watched is not news);
//! [`IpReporter`] turns them into what the pipeline exports, sent with
//! each snapshot the cache task publishes.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::mpsc;

use super::model::PodInfo;
use crate::flow::mesh::{
    Family, FamilyGroup, HistogramValue, LogEvent, MeshUpdate, Point, PointValue, Severity, Value,
};
use crate::flow::SourceEvent;
use crate::telemetry::catalogue;

/// Events kept while the pipeline cannot take them; older ones are dropped
/// and counted in `flowtel.cni.ip_events.dropped`.
pub(crate) const MAX_PENDING: usize = 10_000;

/// Workloads with their own series; the rest share the overflow series.
pub(crate) const MAX_SERIES: usize = 1000;

/// Upper bounds of the scheduled-to-address histogram, in seconds
/// (Kubernetes condition times are whole seconds).
const DELAY_BOUNDS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// What happened to a pod's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IpChangeKind {
    /// Its first addresses appeared.
    Allocated,
    /// It let them go: `deleted`, `finished` or `removed` from its status.
    Released(&'static str),
}

/// One pod's addresses appearing or going.
#[derive(Debug, Clone)]
pub(crate) struct IpChange {
    pub kind: IpChangeKind,
    pub pod: Arc<PodInfo>,
    pub ips: Box<[IpAddr]>,
    /// Allocations: `PodScheduled` to the first address, in seconds.
    pub scheduled_to_ip: Option<f64>,
}

/// Seconds from `scheduled` to `addressed` (0 when the clocks disagree).
pub(crate) fn seconds_between(scheduled: SystemTime, addressed: SystemTime) -> f64 {
    addressed
        .duration_since(scheduled)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A series' workload: namespace, kind and name; `None` for the overflow
/// series.
type Owner = Option<(Arc<str>, Arc<str>, Arc<str>)>;

/// Counts the changes and sends them into the pipeline.
#[derive(Debug)]
pub(crate) struct IpReporter {
    events: mpsc::Sender<SourceEvent>,
    allocated: BTreeMap<Owner, u64>,
    released: BTreeMap<Owner, u64>,
    delays: BTreeMap<Owner, HistogramValue>,
    pending: VecDeque<LogEvent>,
    dropped: u64,
    /// Something to send since the last send.
    dirty: bool,
}

impl IpReporter {
    pub(crate) fn new(events: mpsc::Sender<SourceEvent>) -> Self {
        Self {
            events,
            allocated: BTreeMap::new(),
            released: BTreeMap::new(),
            delays: BTreeMap::new(),
            pending: VecDeque::new(),
            dropped: 0,
            // The zero counts go out with the first snapshot.
            dirty: true,
        }
    }

    /// The series `pod` counts in: its workload's, or the overflow series
    /// once [`MAX_SERIES`] workloads have one in `map`.
    fn owner<V>(map: &BTreeMap<Owner, V>, pod: &PodInfo) -> Owner {
        let key = Some((
            pod.namespace.clone(),
            Arc::from(pod.workload.kind.as_str()),
            pod.workload.name.clone(),
        ));
        if map.contains_key(&key) || map.len() < MAX_SERIES {
            key
        } else {
            None
        }
    }

    pub(crate) fn record(&mut self, change: IpChange) {
        let n = change.ips.len() as u64;
        match change.kind {
            IpChangeKind::Allocated => {
                let owner = Self::owner(&self.allocated, &change.pod);
                *self.allocated.entry(owner).or_default() += n;
                if let Some(seconds) = change.scheduled_to_ip {
                    let owner = Self::owner(&self.delays, &change.pod);
                    self.delays
                        .entry(owner)
                        .or_insert_with(|| HistogramValue::empty(DELAY_BOUNDS))
                        .observe(seconds);
                }
            }
            IpChangeKind::Released(_) => {
                let owner = Self::owner(&self.released, &change.pod);
                *self.released.entry(owner).or_default() += n;
            }
        }
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            self.dropped += 1;
        }
        self.pending.push_back(log_event(&change));
        self.dirty = true;
    }

    /// Sends the counts and the waiting events when something changed.
    /// When the pipeline is full they wait for the next snapshot.
    pub(crate) fn flush(&mut self) {
        if !self.dirty {
            return;
        }
        let update = MeshUpdate {
            source: "k8s_ips",
            active: true,
            groups: vec![FamilyGroup {
                attributes: Vec::new(),
                families: vec![
                    Family {
                        metric: &catalogue::CNI_IPS_ALLOCATED,
                        points: points(&self.allocated, |n| PointValue::Int(*n)),
                    },
                    Family {
                        metric: &catalogue::CNI_IPS_RELEASED,
                        points: points(&self.released, |n| PointValue::Int(*n)),
                    },
                    Family {
                        metric: &catalogue::CNI_SCHEDULED_TO_IP,
                        points: points(&self.delays, |h| PointValue::Histogram(h.clone())),
                    },
                    Family {
                        metric: &catalogue::CNI_IP_EVENTS_DROPPED,
                        points: vec![Point::new(Vec::new(), PointValue::Int(self.dropped))],
                    },
                ],
            }],
            events: self.pending.drain(..).collect(),
        };
        match self.events.try_send(SourceEvent::Mesh(Box::new(update))) {
            Ok(()) => self.dirty = false,
            Err(mpsc::error::TrySendError::Full(SourceEvent::Mesh(update))) => {
                for e in update.events.into_iter().rev() {
                    self.pending.push_front(e);
                }
            }
            // The pipeline is gone: nothing to send to.
            Err(_) => self.dirty = false,
        }
    }
}

fn points<V>(map: &BTreeMap<Owner, V>, value: impl Fn(&V) -> PointValue) -> Vec<Point> {
    map.iter()
        .map(|(owner, v)| match owner {
            Some((ns, kind, name)) => {
                let mut labels = vec![
                    (catalogue::K8S_NAMESPACE.to_owned(), ns.to_string()),
                    (catalogue::K8S_WORKLOAD_KIND.to_owned(), kind.to_string()),
                    (catalogue::K8S_WORKLOAD.to_owned(), name.to_string()),
                ];
                if let Some(key) = catalogue::workload_attribute(kind) {
                    labels.push((key.to_owned(), name.to_string()));
                }
                Point::new(labels, value(v))
            }
            None => Point {
                overflow: true,
                ..Point::new(Vec::new(), value(v))
            },
        })
        .collect()
}

/// The log event of one change.
fn log_event(change: &IpChange) -> LogEvent {
    let pod = &change.pod;
    let (name, verb) = match change.kind {
        IpChangeKind::Allocated => (catalogue::EVENT_CNI_IP_ALLOCATED, "allocated to"),
        IpChangeKind::Released(_) => (catalogue::EVENT_CNI_IP_RELEASED, "released by"),
    };
    let ips = change
        .ips
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut attributes: Vec<(&'static str, Value)> = vec![
        (catalogue::EVENT_NAME, Value::Str(name.into())),
        (
            catalogue::K8S_NAMESPACE,
            Value::Str(pod.namespace.to_string()),
        ),
        (catalogue::K8S_POD, Value::Str(pod.name.to_string())),
        (catalogue::K8S_POD_UID, Value::Str(pod.uid.to_string())),
        (
            catalogue::K8S_WORKLOAD_KIND,
            Value::Str(pod.workload.kind.as_str().to_owned()),
        ),
        (
            catalogue::K8S_WORKLOAD,
            Value::Str(pod.workload.name.to_string()),
        ),
        (catalogue::CNI_IPS, Value::Str(ips.clone())),
    ];
    if let Some(key) = catalogue::workload_attribute(pod.workload.kind.as_str()) {
        attributes.push((key, Value::Str(pod.workload.name.to_string())));
    }
    if let Some(node) = &pod.node {
        attributes.push((catalogue::K8S_NODE, Value::Str(node.to_string())));
    }
    let mut body = format!("IP {verb} {}/{}: {ips}", pod.namespace, pod.name);
    match change.kind {
        IpChangeKind::Allocated => {
            if let Some(s) = change.scheduled_to_ip {
                attributes.push((catalogue::CNI_SCHEDULED_TO_IP_ATTRIBUTE, Value::Double(s)));
                body.push_str(&format!(" ({s:.1} s after it was scheduled)"));
            }
        }
        IpChangeKind::Released(why) => body.push_str(&format!(" ({why})")),
    }
    LogEvent {
        time: SystemTime::now(),
        severity: Severity::Info,
        name,
        body,
        attributes,
    }
}
