//! flowtel: network flows from the kernel, named and shipped as OpenTelemetry.
//!
//! Data moves one way: [`source`] → [`flow`] (table, aggregation, with
//! both ends named by [`enrich`]) → [`export`]. [`pipeline`] wires them
//! together for `flowtel run`.

pub mod config;
pub mod enrich;
pub mod export;
pub mod flow;
pub mod health;
pub mod pipeline;
pub mod source;
pub mod stats;
