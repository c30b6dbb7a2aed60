//! Cilium Hubble as a flow source (messages and conversion; the client
//! follows).

pub mod convert;
pub mod proto;
