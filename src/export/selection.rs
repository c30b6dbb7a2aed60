//! Per-metric attribute selection (`export.metrics.attributes`): a metric
//! can be exported with fewer attributes than its series key has, its
//! points summed over the attributes left out. Fewer attributes, fewer
//! series in the backend, and the totals stay exact.

use std::collections::{BTreeMap, HashMap};

use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};

use crate::component::ConfigError;
use crate::telemetry::catalogue;

/// How metrics are shaped, whichever way they leave (OTLP or Prometheus).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Per metric, the attributes it keeps; the others are summed over.
    /// A list, because metric names hold dots that a map key would split.
    pub attributes: Vec<AttributeSelection>,
}

/// One metric's kept attributes, e.g.
/// `{metric: flowtel.flow.packets, keep: [server.port, network.transport]}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributeSelection {
    pub metric: String,
    pub keep: Vec<String>,
}

impl MetricsConfig {
    /// Checks that every selection names a selectable metric; keys are
    /// relative to `export.metrics`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, AttributeSelection { metric, keep }) in self.attributes.iter().enumerate() {
            if !catalogue::selectable().any(|m| m.name == metric) {
                let names: Vec<_> = catalogue::selectable().map(|m| m.name).collect();
                return Err(ConfigError::new(
                    format!("attributes[{i}].metric"),
                    format!(
                        "is not a metric whose attributes can be selected; one of: {}",
                        names.join(", ")
                    ),
                ));
            }
            if keep.iter().any(|k| k.trim().is_empty()) {
                return Err(ConfigError::new(
                    format!("attributes[{i}].keep"),
                    "lists an empty attribute name",
                ));
            }
        }
        Ok(())
    }
}

/// Which attributes each configured metric keeps.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    keep: BTreeMap<String, Vec<String>>,
}

impl Selection {
    pub fn new(selections: &[AttributeSelection]) -> Self {
        Self {
            keep: selections
                .iter()
                .map(|s| (s.metric.clone(), s.keep.clone()))
                .collect(),
        }
    }

    /// Whether `metric` has a selection (its points may need merging).
    pub fn selects(&self, metric: &str) -> bool {
        self.keep.contains_key(metric)
    }

    /// `attrs` without the attributes `metric` does not keep.
    pub fn filter(&self, metric: &str, attrs: &[KeyValue]) -> Vec<KeyValue> {
        match self.keep.get(metric) {
            Some(keep) => attrs
                .iter()
                .filter(|kv| keep.iter().any(|k| k.as_str() == kv.key.as_str()))
                .cloned()
                .collect(),
            None => attrs.to_vec(),
        }
    }

    /// The points of `metric` with its selection applied: points that
    /// become equal are summed, so no value is lost or counted twice.
    pub fn apply(
        &self,
        metric: &str,
        points: Vec<(Vec<KeyValue>, u64)>,
    ) -> Vec<(Vec<KeyValue>, u64)> {
        if !self.keep.contains_key(metric) {
            return points;
        }
        let mut merged: HashMap<String, (Vec<KeyValue>, u64)> = HashMap::new();
        for (attrs, value) in points {
            let mut kept = self.filter(metric, &attrs);
            kept.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
            let id = kept
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect::<Vec<_>>()
                .join("\u{1f}");
            merged.entry(id).or_insert_with(|| (kept, 0)).1 += value;
        }
        merged.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_attributes_are_summed_over() {
        let s = Selection::new(&[AttributeSelection {
            metric: "flowtel.flow.bytes".into(),
            keep: vec!["server.port".into()],
        }]);
        let point = |client: &str, port: i64, v: u64| {
            (
                vec![
                    KeyValue::new("client.address", client.to_string()),
                    KeyValue::new("server.port", port),
                ],
                v,
            )
        };
        let mut out = s.apply(
            "flowtel.flow.bytes",
            vec![point("a", 80, 1), point("b", 80, 2), point("a", 443, 4)],
        );
        out.sort_by_key(|(_, v)| *v);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], (vec![KeyValue::new("server.port", 80)], 3));
        assert_eq!(out[1], (vec![KeyValue::new("server.port", 443)], 4));
        let untouched = s.apply("flowtel.flow.packets", vec![point("a", 80, 1)]);
        assert_eq!(untouched.len(), 1);
        assert_eq!(untouched[0].0.len(), 2);
    }
}
