//! Traffic between this node's zone and each peer zone, for the cost of
//! cross-zone transfer. Only flows whose two ends have a zone count; kept
//! for flowtel's lifetime, whatever the series budget does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use foldhash::fast::RandomState;

use super::model::DirectionalCounters;
use super::names::{FlowNames, Role};

/// Traffic between this node's zone and a peer's, for the cost of
/// cross-zone transfer. Only flows whose two ends have a zone count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ZoneKey {
    /// The zone of the end on this node.
    pub local: Arc<str>,
    pub peer: Arc<str>,
}

/// Bytes and packets between two zones, cumulative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZonePoint {
    pub key: ZoneKey,
    pub counters: DirectionalCounters,
    pub start: SystemTime,
}

/// The zone pairs, cumulative since each started.
#[derive(Debug, Default)]
pub struct ZoneSeries {
    zones: HashMap<ZoneKey, (DirectionalCounters, SystemTime), RandomState>,
}

impl ZoneSeries {
    /// Adds a named flow's delta to its zone pair, when both ends have one.
    pub fn record(&mut self, names: &FlowNames, delta: DirectionalCounters) {
        if let Some(zone) = zone_key(names) {
            self.zones
                .entry(zone)
                .or_insert_with(|| (DirectionalCounters::default(), SystemTime::now()))
                .0
                .add(delta);
        }
    }

    /// Every zone pair now.
    pub fn points(&self) -> Vec<ZonePoint> {
        self.zones
            .iter()
            .map(|(key, (counters, start))| ZonePoint {
                key: key.clone(),
                counters: *counters,
                start: *start,
            })
            .collect()
    }
}

/// The zones of a flow's two ends, the local one first (the client's when
/// neither end is on this node).
fn zone_key(names: &FlowNames) -> Option<ZoneKey> {
    let (local, peer) = match names.local.unwrap_or(Role::Client) {
        Role::Client => (&names.client, &names.server),
        Role::Server => (&names.server, &names.client),
    };
    Some(ZoneKey {
        local: local.zone.clone()?,
        peer: peer.zone.clone()?,
    })
}
