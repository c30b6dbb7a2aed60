//! The flow table: remembers each connection's last cumulative counters so a
//! source's reports become exact per-interval deltas.
//!
//! Three hazards are handled here rather than in each source:
//! * a tuple reused by a new connection (different generation, or counters
//!   that went backwards) is counted afresh, never as a negative delta;
//! * a dump that raced a DESTROY event and still lists the dead connection
//!   must not count it a second time (tombstones, cleared once a dump that
//!   started after the end has completed);
//! * a connection that vanished without a final event is swept after the
//!   next complete dump, and counted in `flows_ended_unseen`.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::enrich::FlowNames;
use crate::flow::aggregate::{Aggregator, DirectionalCounters};
use crate::flow::{Counters, FlowId, FlowUpdate, SourceEvent};
use crate::stats::SelfStats;

#[derive(Debug)]
struct Tracked {
    generation: u32,
    to_server: Counters,
    to_client: Counters,
    /// The epoch of the latest dump started when this flow was last reported.
    epoch_seen: u64,
    /// Both ends named when the flow was first seen (see `crate::enrich`).
    names: Option<Arc<FlowNames>>,
}

#[derive(Debug)]
struct Tombstone {
    generation: u32,
    epoch: u64,
    /// Set when the flow was swept (missing from a complete dump) rather
    /// than ended by an event: its last counters, so a DESTROY event that
    /// arrives after the sweep adds only what came since.
    swept: Option<(Counters, Counters)>,
}

/// Per-connection state, bounded by `flows.max_flows`.
#[derive(Debug)]
pub struct FlowTable {
    // foldhash, randomly seeded per process: several times faster than
    // SipHash on these small keys, and tuples still cannot be chosen to collide.
    flows: HashMap<FlowId, Tracked, RandomState>,
    tombstones: HashMap<FlowId, Tombstone, RandomState>,
    max_flows: usize,
    epoch: u64,
    stats: Arc<SelfStats>,
}

impl FlowTable {
    pub fn new(max_flows: usize, stats: Arc<SelfStats>) -> Self {
        Self {
            flows: HashMap::default(),
            tombstones: HashMap::default(),
            max_flows,
            epoch: 0,
            stats,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Applies one source event, recording any delta in `agg`.
    pub fn apply(&mut self, event: SourceEvent, agg: &mut Aggregator) {
        match event {
            SourceEvent::Flow(update) => self.apply_update(update, agg),
            SourceEvent::Tcp(event) => agg.record_tcp(&event),
            SourceEvent::Drop(record) => agg.record_drop(&record),
            SourceEvent::DumpStarted { epoch } => self.epoch = epoch,
            SourceEvent::DumpFinished { epoch, complete } => {
                if complete {
                    self.sweep(epoch);
                }
            }
        }
        self.stats
            .flows_tracked
            .store(self.flows.len() as u64, Ordering::Relaxed);
    }

    fn apply_update(&mut self, u: FlowUpdate, agg: &mut Aggregator) {
        SelfStats::inc(&self.stats.flow_updates);
        if u.generation != 0 {
            if let Some(t) = self.tombstones.get_mut(&u.id) {
                if t.generation == u.generation {
                    if let (true, Some((ts, tc))) = (u.ended, t.swept) {
                        // The final event of a flow swept a moment ago.
                        t.swept = None;
                        let delta = DirectionalCounters {
                            to_server: u.to_server.since(ts).unwrap_or_default(),
                            to_client: u.to_client.since(tc).unwrap_or_default(),
                        };
                        let mut names = None;
                        agg.record(&u.id, &u.nat, u.source, delta, &mut names);
                        agg.record_flow(&u, delta, names);
                    }
                    // Otherwise a stale dump entry (or duplicate end) of a
                    // connection already counted to its end.
                    return;
                }
            }
        }
        let fresh = DirectionalCounters {
            to_server: u.to_server,
            to_client: u.to_client,
        };
        let room = self.flows.len() < self.max_flows;
        let mut names = None;
        let delta = match self.flows.get_mut(&u.id) {
            Some(t) => {
                let delta = if t.generation == u.generation {
                    DirectionalCounters {
                        to_server: u.to_server.since(t.to_server).unwrap_or(u.to_server),
                        to_client: u.to_client.since(t.to_client).unwrap_or(u.to_client),
                    }
                } else {
                    // The tuple now belongs to a new connection. The old
                    // one's DESTROY event may still be on the way: keep its
                    // last counters so that event adds only the rest.
                    if t.generation != 0 && self.tombstones.len() < self.max_flows {
                        self.tombstones.insert(
                            u.id,
                            Tombstone {
                                generation: t.generation,
                                epoch: self.epoch,
                                swept: Some((t.to_server, t.to_client)),
                            },
                        );
                    } else {
                        SelfStats::inc(&self.stats.flows_ended_unseen);
                    }
                    t.generation = u.generation;
                    t.names = None;
                    fresh
                };
                t.to_server = u.to_server;
                t.to_client = u.to_client;
                t.epoch_seen = self.epoch;
                names = agg.names(&u.id, &u.nat, &mut t.names);
                delta
            }
            None if u.ended => {
                SelfStats::inc(&self.stats.flows_seen);
                fresh
            }
            None if room => {
                SelfStats::inc(&self.stats.flows_seen);
                let t = self.flows.entry(u.id).or_insert(Tracked {
                    generation: u.generation,
                    to_server: u.to_server,
                    to_client: u.to_client,
                    epoch_seen: self.epoch,
                    names: None,
                });
                names = agg.names(&u.id, &u.nat, &mut t.names);
                fresh
            }
            None => {
                // Table full: this connection is counted once, at its end
                // (and seen then).
                SelfStats::inc(&self.stats.flows_untracked);
                return;
            }
        };
        if u.ended {
            self.flows.remove(&u.id);
            if u.generation != 0 && self.tombstones.len() < self.max_flows {
                self.tombstones.insert(
                    u.id,
                    Tombstone {
                        generation: u.generation,
                        epoch: self.epoch,
                        swept: None,
                    },
                );
            }
        }
        agg.record(&u.id, &u.nat, u.source, delta, &mut names);
        agg.record_flow(&u, delta, names);
    }

    fn sweep(&mut self, epoch: u64) {
        // Flows swept one complete dump ago whose final event never came.
        let mut unseen = 0;
        self.tombstones.retain(|_, t| {
            let keep = t.epoch >= epoch;
            if !keep && t.swept.is_some() {
                unseen += 1;
            }
            keep
        });
        let mut gone = Vec::new();
        self.flows.retain(|id, t| {
            let keep = t.epoch_seen >= epoch;
            if !keep {
                gone.push((*id, t.generation, t.to_server, t.to_client));
            }
            keep
        });
        for (id, generation, to_server, to_client) in gone {
            if generation != 0 && self.tombstones.len() < self.max_flows {
                // Its DESTROY event may still be on the way (the dump and
                // the event socket are read by different threads).
                self.tombstones.insert(
                    id,
                    Tombstone {
                        generation,
                        epoch,
                        swept: Some((to_server, to_client)),
                    },
                );
            } else {
                unseen += 1;
            }
        }
        SelfStats::add(&self.stats.flows_ended_unseen, unseen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::aggregate::KeySpec;
    use crate::flow::{Endpoint, Nat, SourceKind, Transport};
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    fn id(port: u16) -> FlowId {
        FlowId {
            transport: Transport::Udp,
            client: Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), port),
            server: Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 53),
            zone: 0,
        }
    }

    fn update(port: u16, generation: u32, bytes: u64, ended: bool) -> SourceEvent {
        SourceEvent::Flow(FlowUpdate {
            id: id(port),
            generation,
            nat: Nat::default(),
            to_server: Counters::new(bytes, bytes / 100),
            to_client: Counters::new(bytes * 2, bytes / 50),
            ended,
            source: SourceKind::Conntrack,
        })
    }

    fn setup(max_flows: usize) -> (FlowTable, Aggregator, Arc<SelfStats>) {
        let stats = Arc::new(SelfStats::default());
        let spec = KeySpec::from_fields(&crate::config::FlowsConfig::default().key);
        (
            FlowTable::new(max_flows, stats.clone()),
            Aggregator::new(spec, 1000, Duration::from_secs(600), stats.clone()),
            stats,
        )
    }

    fn to_server_bytes(agg: &mut Aggregator) -> u64 {
        agg.finish_interval()
            .points
            .iter()
            .map(|p| p.interval.to_server.bytes)
            .sum()
    }

    #[test]
    fn deltas_between_dumps() {
        let (mut t, mut a, _) = setup(10);
        t.apply(update(1, 7, 1000, false), &mut a);
        assert_eq!(to_server_bytes(&mut a), 1000);
        t.apply(update(1, 7, 1500, false), &mut a);
        assert_eq!(to_server_bytes(&mut a), 500);
        t.apply(update(1, 7, 1500, false), &mut a);
        assert_eq!(to_server_bytes(&mut a), 0);
    }

    #[test]
    fn reused_tuple_and_counter_reset_never_go_negative() {
        let (mut t, mut a, stats) = setup(10);
        t.apply(update(1, 7, 1000, false), &mut a);
        t.apply(update(1, 8, 300, false), &mut a);
        assert_eq!(to_server_bytes(&mut a), 1300);
        // The old connection's DESTROY arrives late: only its rest counts.
        t.apply(update(1, 7, 1100, true), &mut a);
        assert_eq!(to_server_bytes(&mut a), 100);
        assert_eq!(SelfStats::get(&stats.flows_ended_unseen), 0);
        assert_eq!(t.len(), 1, "the new connection is still tracked");
        t.apply(update(1, 8, 100, false), &mut a);
        assert_eq!(
            to_server_bytes(&mut a),
            100,
            "a reset counts the new value afresh"
        );
    }

    #[test]
    fn stale_dump_after_destroy_is_not_counted_twice() {
        let (mut t, mut a, _) = setup(10);
        t.apply(SourceEvent::DumpStarted { epoch: 1 }, &mut a);
        t.apply(update(1, 7, 1000, false), &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 1,
                complete: true,
            },
            &mut a,
        );
        t.apply(SourceEvent::DumpStarted { epoch: 2 }, &mut a);
        t.apply(update(1, 7, 1200, true), &mut a);
        // the dump began before the end and still lists the connection
        t.apply(update(1, 7, 1100, false), &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 2,
                complete: true,
            },
            &mut a,
        );
        assert_eq!(to_server_bytes(&mut a), 1200);
        assert!(t.is_empty());
    }

    #[test]
    fn short_connection_seen_only_at_its_end_is_counted() {
        let (mut t, mut a, _) = setup(10);
        t.apply(update(9, 3, 640, true), &mut a);
        assert_eq!(to_server_bytes(&mut a), 640);
        assert!(t.is_empty());
    }

    #[test]
    fn vanished_flows_are_swept_and_counted() {
        let (mut t, mut a, stats) = setup(10);
        t.apply(SourceEvent::DumpStarted { epoch: 1 }, &mut a);
        t.apply(update(1, 1, 10, false), &mut a);
        t.apply(update(2, 2, 10, false), &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 1,
                complete: true,
            },
            &mut a,
        );
        t.apply(SourceEvent::DumpStarted { epoch: 2 }, &mut a);
        t.apply(update(1, 1, 20, false), &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 2,
                complete: false,
            },
            &mut a,
        );
        assert_eq!(t.len(), 2, "an incomplete dump removes nothing");
        t.apply(SourceEvent::DumpStarted { epoch: 3 }, &mut a);
        t.apply(update(1, 1, 20, false), &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 3,
                complete: true,
            },
            &mut a,
        );
        assert_eq!(t.len(), 1);
        // Its DESTROY event may still come; after one more complete dump
        // without it, it counts as ended unseen.
        assert_eq!(SelfStats::get(&stats.flows_ended_unseen), 0);
        t.apply(SourceEvent::DumpStarted { epoch: 4 }, &mut a);
        t.apply(update(1, 1, 20, false), &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 4,
                complete: true,
            },
            &mut a,
        );
        assert_eq!(SelfStats::get(&stats.flows_ended_unseen), 1);
    }

    #[test]
    fn destroy_after_the_sweep_adds_only_the_rest() {
        let (mut t, mut a, stats) = setup(10);
        t.apply(SourceEvent::DumpStarted { epoch: 1 }, &mut a);
        t.apply(update(1, 7, 1000, false), &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 1,
                complete: true,
            },
            &mut a,
        );
        assert_eq!(to_server_bytes(&mut a), 1000);
        // The entry expired; the next dump skips it and the kernel sends
        // its DESTROY event, which arrives after that dump finished.
        t.apply(SourceEvent::DumpStarted { epoch: 2 }, &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 2,
                complete: true,
            },
            &mut a,
        );
        t.apply(update(1, 7, 1200, true), &mut a);
        assert_eq!(
            to_server_bytes(&mut a),
            200,
            "only the bytes since the last dump"
        );
        t.apply(SourceEvent::DumpStarted { epoch: 3 }, &mut a);
        t.apply(
            SourceEvent::DumpFinished {
                epoch: 3,
                complete: true,
            },
            &mut a,
        );
        assert_eq!(SelfStats::get(&stats.flows_ended_unseen), 0);
    }

    #[test]
    fn full_table_counts_untracked_flows_at_their_end() {
        let (mut t, mut a, stats) = setup(1);
        t.apply(update(1, 1, 10, false), &mut a);
        t.apply(update(2, 2, 10, false), &mut a);
        assert_eq!(SelfStats::get(&stats.flows_untracked), 1);
        t.apply(update(2, 2, 50, true), &mut a);
        assert_eq!(to_server_bytes(&mut a), 60);
    }
}
