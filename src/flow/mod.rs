//! The flow stage, and the model every stage speaks: what sources send
//! ([`model`], [`mesh`]), what ends are called ([`names`]), the table that
//! turns cumulative counters into exact deltas, the bounded series, and the
//! [`report::IntervalReport`] each interval closes into, with the
//! [`anomaly`] events seen in it.

pub mod anomaly;
pub mod dns;
pub mod drops;
pub mod interval;
pub mod mesh;
pub mod model;
pub mod names;
pub mod records;
pub mod report;
pub mod series;
pub mod spans;
pub mod table;
pub mod tcp;
pub mod zones;

pub use interval::{FlowStage, FlowsConfig};
pub use model::{
    ConnectionEnd, ConnectionOutcome, ConnectionRole, Counters, DirectionalCounters, DropRecord,
    Endpoint, FlowId, FlowUpdate, Nat, SourceEvent, SourceKind, TcpClose, TcpEvent, TcpEventKind,
    TcpFailure, Transport,
};
