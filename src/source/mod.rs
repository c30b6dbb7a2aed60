//! Flow sources: each reads one kernel facility on its own threads and sends
//! [`SourceEvent`](crate::flow::SourceEvent)s down a bounded channel.

pub mod conntrack;
pub mod ebpf;
