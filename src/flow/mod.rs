//! Flows: the model every source speaks, the table that turns cumulative
//! counters into deltas, and the bounded aggregation into metric series.

pub mod aggregate;
pub mod model;
pub mod table;

pub use model::{Counters, Endpoint, FlowId, FlowUpdate, Nat, SourceEvent, SourceKind, Transport};
