//! Exporters: where finished intervals go. Each takes an
//! [`IntervalReport`](crate::flow::aggregate::IntervalReport) and never
//! blocks the flow table.

pub mod attributes;
pub mod console;
pub mod hubble_logs;
pub mod instruments;
pub mod mesh;
pub mod otlp_logs;
pub mod otlp_metrics;
pub mod otlp_wire;
pub mod prometheus;
pub mod resource;
pub mod sdk_meter;
pub mod selection;
pub mod self_metrics;
pub mod transport;
