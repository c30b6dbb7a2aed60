//! flowtel's account of itself, shared by every stage: the one
//! [`catalogue`] of metric and attribute names, the counters components
//! keep of what they could not count, and the registry that exporters and
//! `/readyz` read them from.
//!
//! A component creates its counters from a [`Telemetry`] (which registers
//! them under their catalogue entry) and increments them lock-free; readers
//! take [`Telemetry::read`] whenever they export. Two components may count
//! into one metric (the flow stage and the log exporter both drop records):
//! their points are summed.

pub mod catalogue;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use catalogue::{Instrument, Metric};

/// A monotonic count. Clones share the value.
#[derive(Debug, Default, Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (a flag is 0 or 1). Clones share it.
#[derive(Debug, Default, Clone)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn set_flag(&self, on: bool) {
        self.set(u64::from(on));
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn flag(&self) -> bool {
        self.get() != 0
    }
}

/// One point of a self-metric: its attributes and value.
pub type Point = (Vec<(&'static str, &'static str)>, u64);

type ReadPoints = Box<dyn Fn() -> Vec<Point> + Send + Sync>;

enum Reader {
    Value(Arc<AtomicU64>),
    Points(ReadPoints),
}

struct Entry {
    metric: &'static Metric,
    reader: Reader,
}

/// Which kernel source runs, and how: for logs, `/readyz` and the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SourceInfo {
    /// `ebpf` or `conntrack`.
    pub name: &'static str,
    /// How it reads the kernel: `tcx`/`clsact` or `netlink`/`procfs`.
    pub mode: &'static str,
}

impl std::fmt::Display for SourceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.mode)
    }
}

/// Which sources deliver now, for `/readyz` and `flowtel.sources.active`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ActiveSources {
    /// The CNI named by the CNI configuration directory, if any.
    pub cni: Option<String>,
    /// The kernel source first, then `hubble`, `istio`, `felix` when each
    /// is delivering.
    pub sources: Vec<&'static str>,
}

#[derive(Default)]
struct Inner {
    entries: Mutex<Vec<Entry>>,
    ready: AtomicBool,
    source: Mutex<Option<SourceInfo>>,
    active: Mutex<ActiveSources>,
}

/// The registry of self-metrics and the process's status. Cheap to clone;
/// clones share everything.
#[derive(Clone, Default)]
pub struct Telemetry(Arc<Inner>);

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Telemetry {
    fn push(&self, metric: &'static Metric, reader: Reader) {
        lock(&self.0.entries).push(Entry { metric, reader });
    }

    /// A new counter, reported as `metric`.
    pub fn counter(&self, metric: &'static Metric) -> Counter {
        debug_assert_eq!(metric.instrument, Instrument::Counter, "{}", metric.name);
        let c = Counter::default();
        self.push(metric, Reader::Value(Arc::clone(&c.0)));
        c
    }

    /// A new gauge, reported as `metric`.
    pub fn gauge(&self, metric: &'static Metric) -> Gauge {
        debug_assert_eq!(metric.instrument, Instrument::Gauge, "{}", metric.name);
        let g = Gauge::default();
        self.push(metric, Reader::Value(Arc::clone(&g.0)));
        g
    }

    /// Reports `metric` with the points `read` returns when it is read.
    pub fn register_points(
        &self,
        metric: &'static Metric,
        read: impl Fn() -> Vec<Point> + Send + Sync + 'static,
    ) {
        self.push(metric, Reader::Points(Box::new(read)));
    }

    /// Every registered metric with its points now, in registration order;
    /// points of one metric with the same attributes are summed.
    pub fn read(&self) -> Vec<(&'static Metric, Vec<Point>)> {
        let entries = lock(&self.0.entries);
        let mut out: Vec<(&'static Metric, Vec<Point>)> = Vec::new();
        for e in entries.iter() {
            let points = match &e.reader {
                Reader::Value(v) => vec![(Vec::new(), v.load(Ordering::Relaxed))],
                Reader::Points(read) => read(),
            };
            let slot = match out.iter().position(|(m, _)| m.name == e.metric.name) {
                Some(i) => &mut out[i].1,
                None => {
                    out.push((e.metric, Vec::new()));
                    &mut out.last_mut().expect("just pushed").1
                }
            };
            for (attrs, value) in points {
                match slot.iter_mut().find(|(a, _)| *a == attrs) {
                    Some((_, v)) => *v = v.saturating_add(value),
                    None => slot.push((attrs, value)),
                }
            }
        }
        out
    }

    /// The sum of every point of `metric` now (0 when nothing reports it).
    pub fn value(&self, metric: &Metric) -> u64 {
        self.read()
            .iter()
            .filter(|(m, _)| m.name == metric.name)
            .flat_map(|(_, points)| points.iter().map(|(_, v)| *v))
            .fold(0, u64::saturating_add)
    }

    /// Set once the first interval's dump completed.
    pub fn set_ready(&self) {
        self.0.ready.store(true, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed)
    }

    /// Records which kernel source runs.
    pub fn set_source(&self, info: SourceInfo) {
        *lock(&self.0.source) = Some(info);
    }

    pub fn source(&self) -> Option<SourceInfo> {
        *lock(&self.0.source)
    }

    /// Records which sources deliver, once per interval.
    pub fn set_active(&self, active: ActiveSources) {
        *lock(&self.0.active) = active;
    }

    pub fn active(&self) -> ActiveSources {
        lock(&self.0.active).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_of_one_metric_are_summed() {
        let t = Telemetry::default();
        let a = t.counter(&catalogue::LOGS_RECORDS_DROPPED);
        let b = t.counter(&catalogue::LOGS_RECORDS_DROPPED);
        a.add(2);
        b.add(3);
        let g = t.gauge(&catalogue::FLOWS_TRACKED);
        g.set(7);
        let read = t.read();
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].0.name, "flowtel.logs.records.dropped");
        assert_eq!(read[0].1, vec![(vec![], 5)]);
        assert_eq!(read[1].1, vec![(vec![], 7)]);
    }
}
