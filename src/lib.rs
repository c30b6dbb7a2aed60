//! flowtel: network flows from the kernel, named and shipped as OpenTelemetry.
//!
//! Data moves one way through four stages: [`source`] → [`flow`] (the
//! table, the series, and the model every stage speaks) → [`enrich`]
//! (naming both ends) → [`export`]. A stage imports only itself, the flow
//! model and the shared modules ([`telemetry`], [`component`]), never
//! another stage (`tests/layering.rs` checks it). [`pipeline`] assembles
//! the components for `flowtel run`; [`config`] loads their settings.

pub mod component;
pub mod config;
pub mod enrich;
pub mod export;
pub mod flow;
#[cfg(test)]
mod fuzz;
pub mod health;
pub mod pipeline;
pub mod source;
pub mod telemetry;
