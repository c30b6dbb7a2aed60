//! flowtel's own counters: what it could not count, and why.
//!
//! Every component increments these lock-free; the OTLP exporter and
//! `/readyz` read them. They are the answer to "is flowtel undercounting?".

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Counters shared by all components. Monotonic unless noted.
#[derive(Debug, Default)]
pub struct SelfStats {
    /// Flows currently held in the flow table (a gauge).
    pub flows_tracked: AtomicU64,
    /// Source updates applied to the flow table.
    pub flow_updates: AtomicU64,
    /// Connections seen for the first time (tracked or not).
    pub flows_seen: AtomicU64,
    /// New flows not tracked because the flow table was at `flows.max_flows`;
    /// their counters are still counted once, at their end, if the source
    /// reports the end.
    pub flows_untracked: AtomicU64,
    /// Flows that vanished from a dump without a final event: traffic after
    /// their last dump was not seen.
    pub flows_ended_unseen: AtomicU64,
    /// Flow deltas folded into the overflow series because the series budget
    /// was used up.
    pub series_overflowed: AtomicU64,
    /// Metric series currently exported (a gauge).
    pub series_active: AtomicU64,
    /// Kernel events lost (netlink ENOBUFS overruns).
    pub events_lost: AtomicU64,
    /// RTT and connection-duration samples not kept because an interval
    /// already held `MAX_SAMPLES_PER_INTERVAL` (the counts are still exact).
    pub tcp_samples_dropped: AtomicU64,
    /// Source messages that could not be decoded and were skipped.
    pub parse_errors: AtomicU64,
    /// Table dumps that failed.
    pub dump_errors: AtomicU64,
    /// Table dumps completed.
    pub dumps: AtomicU64,
    /// Export requests that succeeded / failed (after the exporter's retries).
    pub exports_ok: AtomicU64,
    pub exports_failed: AtomicU64,
    /// Flow records, connection events and drop events not kept for the
    /// log exporter because an interval already held `export.logs.max_records`.
    pub records_dropped: AtomicU64,
    /// Log records (flow records, connection and drop events) that passed
    /// the filters but not `export.logs.rate_limit`.
    pub log_records_rate_limited: AtomicU64,
    /// Flow ends the Kubernetes cache named (a pod, Service or node) and
    /// ends it did not know, counted when a flow is named.
    pub k8s_ends_named: AtomicU64,
    pub k8s_ends_unknown: AtomicU64,
    /// Whether the kernel reports byte and packet counters (conntrack accounting).
    pub byte_counters_available: AtomicBool,
    /// Set once the first dump of any source has completed.
    pub ready: AtomicBool,
}

impl SelfStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// A consistent-enough copy for `/readyz` and the console.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            flows_tracked: Self::get(&self.flows_tracked),
            flow_updates: Self::get(&self.flow_updates),
            flows_seen: Self::get(&self.flows_seen),
            flows_untracked: Self::get(&self.flows_untracked),
            flows_ended_unseen: Self::get(&self.flows_ended_unseen),
            series_overflowed: Self::get(&self.series_overflowed),
            series_active: Self::get(&self.series_active),
            events_lost: Self::get(&self.events_lost),
            tcp_samples_dropped: Self::get(&self.tcp_samples_dropped),
            parse_errors: Self::get(&self.parse_errors),
            dump_errors: Self::get(&self.dump_errors),
            dumps: Self::get(&self.dumps),
            exports_ok: Self::get(&self.exports_ok),
            exports_failed: Self::get(&self.exports_failed),
            records_dropped: Self::get(&self.records_dropped),
            log_records_rate_limited: Self::get(&self.log_records_rate_limited),
            k8s_ends_named: Self::get(&self.k8s_ends_named),
            k8s_ends_unknown: Self::get(&self.k8s_ends_unknown),
            byte_counters_available: self.byte_counters_available.load(Ordering::Relaxed),
            ready: self.ready.load(Ordering::Relaxed),
        }
    }
}

/// A plain copy of [`SelfStats`], serialisable for `/readyz`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StatsSnapshot {
    pub flows_tracked: u64,
    pub flow_updates: u64,
    pub flows_seen: u64,
    pub flows_untracked: u64,
    pub flows_ended_unseen: u64,
    pub series_overflowed: u64,
    pub series_active: u64,
    pub events_lost: u64,
    pub tcp_samples_dropped: u64,
    pub parse_errors: u64,
    pub dump_errors: u64,
    pub dumps: u64,
    pub exports_ok: u64,
    pub exports_failed: u64,
    pub records_dropped: u64,
    pub log_records_rate_limited: u64,
    pub k8s_ends_named: u64,
    pub k8s_ends_unknown: u64,
    pub byte_counters_available: bool,
    pub ready: bool,
}
