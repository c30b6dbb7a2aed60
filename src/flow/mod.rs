//! Flows: the model every source speaks, the table that turns cumulative
//! counters into deltas, and the bounded aggregation into metric series.

pub mod aggregate;
pub mod model;
pub mod table;

pub use model::{
    Counters, DropRecord, Endpoint, FlowId, FlowUpdate, Nat, SourceEvent, SourceKind, TcpClose,
    TcpEvent, TcpEventKind, TcpFailure, Transport,
};
