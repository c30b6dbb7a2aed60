//! Connection spans: the identifiers both ends of a TCP connection derive
//! on their own, head sampling by the same hash, and the spans an interval
//! keeps for the traces exporter.
//!
//! Both ends' kernels know the two initial sequence numbers (ISNs) of a
//! connection, and NAT rewrites addresses and ports but not sequence
//! numbers. From the 64-bit key `isn_client << 32 | isn_server`, each
//! identifier is the SplitMix64 finaliser of the key XORed with its own
//! constant: the trace id (two finalisers, 128 bits), the client span id
//! and the server span id (the server span's parent). The finaliser is a
//! bijection, so two connections get one trace id only when their ISN
//! pairs are equal. docs/telemetry.md ("Connection spans") gives the
//! collision odds and the cases where the two ends cannot agree.

use std::sync::Arc;

use super::model::ConnectionEnd;
use super::names::FlowNames;
use crate::telemetry::{catalogue, Counter, Telemetry};

const TRACE_HIGH: u64 = 0x666c_6f77_7465_6c54; // "flowtelT"
const TRACE_LOW: u64 = 0x7472_6163_6569_6421; // "traceid!"
const CLIENT: u64 = 0x636c_6965_6e74_5350; // "clientSP"
const SERVER: u64 = 0x7365_7276_6572_5350; // "serverSP"
const SAMPLE: u64 = 0x7361_6d70_6c65_2121; // "sample!!"
/// Mixed into the key of a connection the server never answered, which has
/// no server ISN (and no server span to join).
const UNANSWERED: u64 = 0x6e6f_2d73_796e_6163; // "no-synac"

/// SplitMix64's finaliser: a bijection on u64 that spreads every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key both ends compute from the ISNs.
fn key(isn_client: u32, isn_server: Option<u32>) -> u64 {
    match isn_server {
        Some(s) => (u64::from(isn_client) << 32) | u64::from(s),
        None => mix(u64::from(isn_client) ^ UNANSWERED),
    }
}

/// The identifiers of a connection's trace and its two spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace: [u8; 16],
    pub client: [u8; 8],
    /// Its parent is `client`.
    pub server: [u8; 8],
}

/// A span id is never all zeros (OTLP reads that as "none").
fn span_id(v: u64) -> [u8; 8] {
    v.max(1).to_be_bytes()
}

impl SpanIds {
    pub fn of(isn_client: u32, isn_server: Option<u32>) -> Self {
        let k = key(isn_client, isn_server);
        let mut trace = [0; 16];
        trace[..8].copy_from_slice(&mix(k ^ TRACE_HIGH).to_be_bytes());
        trace[8..].copy_from_slice(&mix(k ^ TRACE_LOW).to_be_bytes());
        if trace == [0; 16] {
            trace[15] = 1;
        }
        Self {
            trace,
            client: span_id(mix(k ^ CLIENT)),
            server: span_id(mix(k ^ SERVER)),
        }
    }
}

/// Which connections get spans: the same answer on both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sampler {
    /// A connection is sampled when its hash is below this; `u64::MAX`
    /// samples every one.
    below: u64,
}

impl Sampler {
    /// `rate` is a fraction between 0 and 1 (validated by the exporter).
    pub fn new(rate: f64) -> Self {
        let below = if rate >= 1.0 {
            u64::MAX
        } else {
            // 2^64 * rate, exact enough: the error is below 2^-52 * rate.
            (rate.max(0.0) * 18_446_744_073_709_551_616.0) as u64
        };
        Self { below }
    }

    pub fn sampled(&self, isn_client: u32, isn_server: Option<u32>) -> bool {
        self.below == u64::MAX || mix(key(isn_client, isn_server) ^ SAMPLE) < self.below
    }
}

/// What the traces exporter wants kept per interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanKeep {
    pub sampler: Sampler,
    /// Spans held per interval; past it they are counted as dropped.
    pub max: usize,
}

/// One end of a connection with the names of its ends.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionSpan {
    pub end: ConnectionEnd,
    pub names: Option<Arc<FlowNames>>,
}

/// Collects the sampled spans of an interval, at most `max`.
#[derive(Debug)]
pub struct SpanCollector {
    keep: Option<SpanKeep>,
    spans: Vec<ConnectionSpan>,
    dropped: Counter,
}

impl SpanCollector {
    /// `keep` is `None` when no exporter wants spans.
    pub fn new(keep: Option<SpanKeep>, telemetry: &Telemetry) -> Self {
        Self {
            keep,
            spans: Vec::new(),
            dropped: telemetry.counter(&catalogue::SPANS_DROPPED),
        }
    }

    /// Whether `end` is sampled and would be kept: naming is then worth it.
    pub fn wants(&self, end: &ConnectionEnd) -> bool {
        self.keep
            .is_some_and(|k| k.sampler.sampled(end.isn_client, end.isn_server))
    }

    /// Keeps a sampled span, unless the interval holds `max` already.
    pub fn push(&mut self, end: ConnectionEnd, names: Option<Arc<FlowNames>>) {
        let Some(keep) = self.keep else {
            return;
        };
        if self.spans.len() >= keep.max {
            self.dropped.inc();
            return;
        }
        self.spans.push(ConnectionSpan { end, names });
    }

    /// The interval's spans; the next interval starts empty.
    pub fn finish(&mut self) -> Vec<ConnectionSpan> {
        std::mem::take(&mut self.spans)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_derive_the_same_ids_and_different_connections_do_not() {
        let a = SpanIds::of(0x1234_5678, Some(0x9abc_def0));
        assert_eq!(a, SpanIds::of(0x1234_5678, Some(0x9abc_def0)));
        assert_ne!(a.client, a.server);
        // Swapped ISNs are another connection.
        let b = SpanIds::of(0x9abc_def0, Some(0x1234_5678));
        assert_ne!(a.trace, b.trace);
        assert_ne!(a.trace, SpanIds::of(0x1234_5678, None).trace);
        assert_ne!(a.trace, SpanIds::of(0x1234_5679, Some(0x9abc_def0)).trace);
    }

    #[test]
    fn sampling_keeps_the_rate_and_is_all_or_nothing_at_the_ends() {
        let all = Sampler::new(1.0);
        let none = Sampler::new(0.0);
        let tenth = Sampler::new(0.1);
        let mut kept = 0;
        let n = 100_000u32;
        for i in 0..n {
            let (c, s) = (i.wrapping_mul(2_654_435_761), i ^ 0x5555_5555);
            assert!(all.sampled(c, Some(s)));
            assert!(!none.sampled(c, Some(s)));
            if tenth.sampled(c, Some(s)) {
                kept += 1;
            }
        }
        // Binomial: mean 10,000, standard deviation about 95; 5 sigma.
        assert!((kept as i64 - 10_000).abs() < 475, "{kept}");
    }
}
