//! The metrics flowtel derives from each interval report, described once
//! for the OTLP encoder and the Prometheus endpoint's SDK meter.

use crate::export::attributes::{TCP_CLOSE_CAUSE, TCP_FAILURE};
use crate::flow::aggregate::TcpCounters;
use crate::flow::{TcpClose, TcpFailure};

/// A metric's name, unit and description.
#[derive(Debug, Clone, Copy)]
pub struct Describe {
    pub name: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
}

pub const FLOW_BYTES: Describe = Describe {
    name: "flowtel.flow.bytes",
    unit: "By",
    description: "Bytes carried by flows (L3, IP headers included), by direction",
};
pub const FLOW_PACKETS: Describe = Describe {
    name: "flowtel.flow.packets",
    unit: "{packet}",
    description: "Packets carried by flows, by direction",
};
pub const ZONE_BYTES: Describe = Describe {
    name: "flowtel.zone.bytes",
    unit: "By",
    description: "Bytes between this node's zone and each peer zone, same-zone and cross-zone",
};
pub const PACKET_DROPS: Describe = Describe {
    name: "flowtel.packet.drops",
    unit: "{packet}",
    description: "Packets the kernel dropped, by its drop reason",
};
pub const TCP_RTT: Describe = Describe {
    name: "flowtel.tcp.rtt",
    unit: "s",
    description: "Smoothed round-trip time of TCP connections: one sample per connection and \
                  interval in which it received data, and one at its close",
};
pub const TCP_DURATION: Describe = Describe {
    name: "flowtel.tcp.connection.duration",
    unit: "s",
    description: "How long TCP connections lasted, from SYN to close",
};

/// Histogram bucket bounds for RTTs, in seconds: 50 µs (same host) to 5 s.
pub const RTT_BOUNDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
/// Connection durations, in seconds: 1 ms to 1 h.
pub const DURATION_BOUNDS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Reads one count of a TCP series.
pub type Pick = fn(&TcpCounters) -> u64;
/// One TCP counter: name, unit, description, and per extra attribute (none,
/// or one key and value) the count it reports.
pub type HealthCounter = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(Option<(&'static str, &'static str)>, Pick)>,
);

/// The TCP counters, each with the outcomes it splits into.
pub fn health_counters() -> [HealthCounter; 4] {
    [
        (
            "flowtel.tcp.connections.opened",
            "{connection}",
            "TCP connections that completed the handshake",
            vec![(None, |c| c.opened)],
        ),
        (
            "flowtel.tcp.connections.closed",
            "{connection}",
            "TCP connections that ended, by how (FIN, reset or timeout)",
            vec![
                (Some((TCP_CLOSE_CAUSE, TcpClose::Fin.as_str())), |c| {
                    c.closed_fin
                }),
                (Some((TCP_CLOSE_CAUSE, TcpClose::Reset.as_str())), |c| {
                    c.closed_reset
                }),
                (Some((TCP_CLOSE_CAUSE, TcpClose::Timeout.as_str())), |c| {
                    c.closed_timeout
                }),
            ],
        ),
        (
            "flowtel.tcp.connections.failed",
            "{connection}",
            "TCP connection attempts that never opened, by why (refused or no answer)",
            vec![
                (Some((TCP_FAILURE, TcpFailure::Refused.as_str())), |c| {
                    c.failed_refused
                }),
                (Some((TCP_FAILURE, TcpFailure::NoAnswer.as_str())), |c| {
                    c.failed_no_answer
                }),
            ],
        ),
        (
            "flowtel.tcp.retransmits",
            "{segment}",
            "TCP segments retransmitted, both ends of a connection summed",
            vec![(None, |c| c.retransmits)],
        ),
    ]
}
