//! Packets the kernel dropped, summed per reason, transport and family:
//! few values, so no budget is needed.

use std::collections::HashMap;
use std::time::SystemTime;

use foldhash::fast::RandomState;

use super::model::{Counters, DropRecord, Transport};

/// What identifies a drop series: few values, so no budget is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub reason: &'static str,
    pub transport: Transport,
    /// `ipv4`, `ipv6`, or `None` for packets that were not IP.
    pub network_type: Option<&'static str>,
}

/// Dropped packets of one drop series, cumulative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropPoint {
    pub key: DropKey,
    pub counters: Counters,
    pub start: SystemTime,
}

/// The drop series, cumulative since each started.
#[derive(Debug, Default)]
pub struct DropSeries {
    drops: HashMap<DropKey, (Counters, SystemTime), RandomState>,
}

impl DropSeries {
    /// Adds dropped packets to their reason's series.
    pub fn record(&mut self, record: &DropRecord) {
        let network_type = record
            .src
            .map(|e| if e.ip.is_ipv4() { "ipv4" } else { "ipv6" });
        let key = DropKey {
            reason: record.reason,
            transport: record.transport,
            network_type,
        };
        self.drops
            .entry(key)
            .or_insert_with(|| (Counters::default(), SystemTime::now()))
            .0
            .add(record.counters);
    }

    /// Every drop series now.
    pub fn points(&self) -> Vec<DropPoint> {
        self.drops
            .iter()
            .map(|(key, (counters, start))| DropPoint {
                key: *key,
                counters: *counters,
                start: *start,
            })
            .collect()
    }
}
