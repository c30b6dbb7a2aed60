//! flowtel: network flows from the kernel, named and shipped as OpenTelemetry.
//!
//! Data moves one way: [`source`] → [`flow`] (table, aggregation) →
//! [`export`]. [`pipeline`] wires them together for `flowtel run`.

pub mod config;
pub mod export;
pub mod flow;
pub mod health;
pub mod pipeline;
pub mod source;
pub mod stats;
