//! Histogram data points out of what the test OTLP receiver stored.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::metrics::v1::metric;

use super::otlp_receiver::{attrs_of, Attrs, Received};

/// One Histogram data point.
#[derive(Debug, Clone, PartialEq)]
pub struct HistPoint {
    pub metric: String,
    pub unit: String,
    pub attrs: Attrs,
    pub count: u64,
    pub sum: f64,
    pub time_unix_nano: u64,
}

impl HistPoint {
    /// The mean of the recorded values, if any were recorded.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Every Histogram data point of `metric` in `received`.
pub fn histogram_points(received: &[Received], metric: &str) -> Vec<HistPoint> {
    let mut out = Vec::new();
    let metrics = received
        .iter()
        .flat_map(|r| &r.request.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .filter(|m| m.name == metric);
    for m in metrics {
        let Some(metric::Data::Histogram(h)) = &m.data else {
            continue;
        };
        for dp in &h.data_points {
            out.push(HistPoint {
                metric: m.name.clone(),
                unit: m.unit.clone(),
                attrs: attrs_of(&dp.attributes),
                count: dp.count,
                sum: dp.sum.unwrap_or(0.0),
                time_unix_nano: dp.time_unix_nano,
            });
        }
    }
    out
}

/// For each attribute set, its newest point (cumulative temporality: the
/// totals so far).
pub fn latest_histograms(points: &[HistPoint]) -> BTreeMap<Attrs, HistPoint> {
    let mut out: BTreeMap<Attrs, HistPoint> = BTreeMap::new();
    for p in points {
        match out.get(&p.attrs) {
            Some(old) if old.time_unix_nano > p.time_unix_nano => {}
            _ => {
                out.insert(p.attrs.clone(), p.clone());
            }
        }
    }
    out
}
