//! How the TCP metrics are derived from each interval report, described
//! once for the OTLP encoder and the Prometheus endpoint's SDK meter: the
//! outcomes each counter splits into, and the histograms' bucket bounds.

use crate::flow::model::{TcpClose, TcpFailure};
use crate::flow::tcp::TcpCounters;
use crate::telemetry::catalogue::{self, Metric};

/// Histogram bucket bounds for RTTs, in seconds: 50 µs (same host) to 5 s.
pub const RTT_BOUNDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
/// Connection durations, in seconds: 1 ms to 1 h.
/// `flowtel.dns.latency`: 100 µs to 10 s.
pub const DNS_LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
pub const DURATION_BOUNDS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Reads one count of a TCP series.
pub type Pick = fn(&TcpCounters) -> u64;
/// One TCP counter, and per extra attribute (none, or one key and value)
/// the count it reports.
pub type HealthCounter = (
    &'static Metric,
    Vec<(Option<(&'static str, &'static str)>, Pick)>,
);

/// The TCP counters, each with the outcomes it splits into.
pub fn health_counters() -> [HealthCounter; 4] {
    [
        (&catalogue::TCP_OPENED, vec![(None, |c| c.opened)]),
        (
            &catalogue::TCP_CLOSED,
            vec![
                (
                    Some((catalogue::TCP_CLOSE_CAUSE, TcpClose::Fin.as_str())),
                    |c| c.closed_fin,
                ),
                (
                    Some((catalogue::TCP_CLOSE_CAUSE, TcpClose::Reset.as_str())),
                    |c| c.closed_reset,
                ),
                (
                    Some((catalogue::TCP_CLOSE_CAUSE, TcpClose::Timeout.as_str())),
                    |c| c.closed_timeout,
                ),
            ],
        ),
        (
            &catalogue::TCP_FAILED,
            vec![
                (
                    Some((catalogue::TCP_FAILURE, TcpFailure::Refused.as_str())),
                    |c| c.failed_refused,
                ),
                (
                    Some((catalogue::TCP_FAILURE, TcpFailure::NoAnswer.as_str())),
                    |c| c.failed_no_answer,
                ),
            ],
        ),
        (&catalogue::TCP_RETRANSMITS, vec![(None, |c| c.retransmits)]),
    ]
}
