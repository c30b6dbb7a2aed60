//! The flow table: remembers each connection's last cumulative counters so a
//! source's reports become exact per-interval deltas.
//!
//! Three hazards are handled here rather than in each source:
//! * a tuple reused by a new connection (different generation, or counters
//!   that went backwards) is counted afresh, never as a negative delta;
//! * a dump that raced a DESTROY event and still lists the dead connection
//!   must not count it a second time (tombstones, one per tuple and
//!   generation, cleared once a dump that started after the end has
//!   completed), nor may a DESTROY that arrives after the dump reported the
//!   tuple's next connection disturb that one;
//! * a connection that vanished without a final event is swept after the
//!   next complete dump, and counted in `flows_ended_unseen`.

use std::collections::HashMap;
use std::sync::Arc;

use foldhash::fast::RandomState;

use super::model::{Counters, DirectionalCounters, FlowId, FlowUpdate, Nat};
use super::names::FlowNames;
use crate::telemetry::{catalogue, Counter, Gauge, Telemetry};

#[derive(Debug)]
struct Tracked {
    generation: u64,
    to_server: Counters,
    to_client: Counters,
    /// The epoch of the latest dump started when this flow was last reported.
    epoch_seen: u64,
    /// Both ends named when the flow was first seen (see `crate::enrich`).
    names: Option<Arc<FlowNames>>,
}

#[derive(Debug)]
struct Tombstone {
    generation: u64,
    epoch: u64,
    /// Set when the flow was swept (missing from a complete dump) rather
    /// than ended by an event: its last counters, so a DESTROY event that
    /// arrives after the sweep adds only what came since.
    swept: Option<(Counters, Counters)>,
}

/// The table's own counters.
#[derive(Debug)]
struct TableStats {
    tracked: Gauge,
    updates: Counter,
    seen: Counter,
    untracked: Counter,
    ended_unseen: Counter,
    id_reused: Counter,
}

/// One flow's traffic since its previous report, with its names.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowDelta {
    pub update: FlowUpdate,
    pub delta: DirectionalCounters,
    pub names: Option<Arc<FlowNames>>,
}

/// Per-connection state, bounded by `flows.max_flows`.
#[derive(Debug)]
pub struct FlowTable {
    // foldhash, randomly seeded per process: several times faster than
    // SipHash on these small keys, and tuples still cannot be chosen to collide.
    flows: HashMap<FlowId, Tracked, RandomState>,
    /// By tuple and generation: a tuple reused quickly has one per
    /// connection, so a newer end never hides an older one's.
    tombstones: HashMap<(FlowId, u64), Tombstone, RandomState>,
    max_flows: usize,
    epoch: u64,
    stats: TableStats,
}

impl FlowTable {
    pub fn new(max_flows: usize, telemetry: &Telemetry) -> Self {
        Self {
            flows: HashMap::default(),
            tombstones: HashMap::default(),
            max_flows,
            epoch: 0,
            stats: TableStats {
                tracked: telemetry.gauge(&catalogue::FLOWS_TRACKED),
                updates: telemetry.counter(&catalogue::FLOWS_UPDATES),
                seen: telemetry.counter(&catalogue::FLOWS_SEEN),
                untracked: telemetry.counter(&catalogue::FLOWS_UNTRACKED),
                ended_unseen: telemetry.counter(&catalogue::FLOWS_ENDED_UNSEEN),
                id_reused: telemetry.counter(&catalogue::FLOWS_ID_REUSED),
            },
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// A dump tagged `epoch` begins.
    pub fn dump_started(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The dump `epoch` is over; when `complete`, flows it did not report
    /// are swept.
    pub fn dump_finished(&mut self, epoch: u64, complete: bool) {
        if complete {
            self.sweep(epoch);
        }
        self.stats.tracked.set(self.flows.len() as u64);
    }

    /// Applies one source report of a flow's cumulative counters; returns
    /// the traffic it adds, if any, named by `name`. `name` gets the
    /// table's copy of the flow's names (`None` for a flow it does not
    /// keep) to fill or renew.
    pub fn apply(
        &mut self,
        u: FlowUpdate,
        mut name: impl FnMut(&FlowId, &Nat, &mut Option<Arc<FlowNames>>) -> Option<Arc<FlowNames>>,
    ) -> Option<FlowDelta> {
        let delta = self.apply_update(&u, &mut name);
        self.stats.tracked.set(self.flows.len() as u64);
        delta.map(|(delta, names)| FlowDelta {
            update: u,
            delta,
            names,
        })
    }

    fn apply_update(
        &mut self,
        u: &FlowUpdate,
        name: &mut impl FnMut(&FlowId, &Nat, &mut Option<Arc<FlowNames>>) -> Option<Arc<FlowNames>>,
    ) -> Option<(DirectionalCounters, Option<Arc<FlowNames>>)> {
        self.stats.updates.inc();
        if u.generation != 0 {
            if let Some(t) = self.tombstone_of(&u.id, u.generation) {
                if same_connection(t.generation, u.generation) {
                    if let (true, Some((ts, tc))) = (u.ended, t.swept) {
                        // The final event of a flow swept a moment ago.
                        t.swept = None;
                        let delta = DirectionalCounters {
                            to_server: u.to_server.since(ts).unwrap_or_default(),
                            to_client: u.to_client.since(tc).unwrap_or_default(),
                        };
                        let names = name(&u.id, &u.nat, &mut None);
                        return Some((delta, names));
                    }
                    // Otherwise a stale dump entry (or duplicate end) of a
                    // connection already counted to its end, or, for a NEW
                    // event (no counters, no start time), a new connection
                    // that got the ended one's kernel ID: events come in
                    // order, so it cannot be stale, but its reports cannot
                    // be told from that one's until the tombstone is gone.
                    if !u.ended && u.to_server.is_zero() && u.to_client.is_zero() {
                        self.stats.id_reused.inc();
                    }
                    return None;
                }
            }
        }
        let fresh = DirectionalCounters {
            to_server: u.to_server,
            to_client: u.to_client,
        };
        if u.ended
            && u.generation != 0
            && self
                .flows
                .get(&u.id)
                .is_some_and(|t| t.generation != 0 && !same_connection(t.generation, u.generation))
        {
            // The end of another connection on a tuple the table tracks,
            // one it never tracked itself (no tombstone matched). Events
            // come in the kernel's order, so a connection's DESTROY comes
            // before any later connection's on the same tuple: this one is
            // older than the tracked one, which a dump reported before the
            // event thread delivered this (a short connection whose tuple
            // was reused at once, on a loaded machine). It is counted whole;
            // the tracked connection stays as it is (treating this as a new
            // generation would count the tracked one a second time).
            self.stats.seen.inc();
            let names = name(&u.id, &u.nat, &mut None);
            // Its stale dump entries, if any, must not count either.
            if self.tombstones.len() < self.max_flows {
                self.tombstones.insert(
                    (u.id, u.generation),
                    Tombstone {
                        generation: u.generation,
                        epoch: self.epoch,
                        swept: None,
                    },
                );
            }
            return Some((fresh, names));
        }
        let room = self.flows.len() < self.max_flows;
        let names;
        let delta = match self.flows.get_mut(&u.id) {
            Some(t) => {
                let delta = if same_connection(t.generation, u.generation) {
                    // Lower counters of one connection are a report the
                    // table has already passed (a NEW event, which carries
                    // none, overtaken by a dump): they add nothing and must
                    // not lower the mark the next report is measured from.
                    // Without start times they may instead be a new
                    // connection with the old one's ID, counted afresh.
                    let stale = (t.generation >> 32 != 0 && t.generation == u.generation)
                        || (u.to_server.is_zero() && u.to_client.is_zero());
                    let since = |now: Counters, before: Counters| match now.since(before) {
                        Some(d) => d,
                        None if stale => Counters::default(),
                        None => now,
                    };
                    let delta = DirectionalCounters {
                        to_server: since(u.to_server, t.to_server),
                        to_client: since(u.to_client, t.to_client),
                    };
                    if stale {
                        t.to_server = t.to_server.high(u.to_server);
                        t.to_client = t.to_client.high(u.to_client);
                    } else {
                        t.to_server = u.to_server;
                        t.to_client = u.to_client;
                    }
                    if u.generation >> 32 != 0 {
                        t.generation = u.generation;
                    }
                    delta
                } else {
                    // The tuple now belongs to a new connection. The old
                    // one's DESTROY event may still be on the way: keep its
                    // last counters so that event adds only the rest.
                    if t.generation != 0 && self.tombstones.len() < self.max_flows {
                        self.tombstones.insert(
                            (u.id, t.generation),
                            Tombstone {
                                generation: t.generation,
                                epoch: self.epoch,
                                swept: Some((t.to_server, t.to_client)),
                            },
                        );
                    } else {
                        self.stats.ended_unseen.inc();
                    }
                    t.generation = u.generation;
                    t.names = None;
                    t.to_server = u.to_server;
                    t.to_client = u.to_client;
                    fresh
                };
                t.epoch_seen = self.epoch;
                names = name(&u.id, &u.nat, &mut t.names);
                delta
            }
            None if u.ended => {
                self.stats.seen.inc();
                names = name(&u.id, &u.nat, &mut None);
                fresh
            }
            None if room => {
                self.stats.seen.inc();
                let t = self.flows.entry(u.id).or_insert(Tracked {
                    generation: u.generation,
                    to_server: u.to_server,
                    to_client: u.to_client,
                    epoch_seen: self.epoch,
                    names: None,
                });
                names = name(&u.id, &u.nat, &mut t.names);
                fresh
            }
            None => {
                // Table full: this connection is counted once, at its end
                // (and seen then).
                self.stats.untracked.inc();
                return None;
            }
        };
        if u.ended {
            self.flows.remove(&u.id);
            if u.generation != 0 && self.tombstones.len() < self.max_flows {
                self.tombstones.insert(
                    (u.id, u.generation),
                    Tombstone {
                        generation: u.generation,
                        epoch: self.epoch,
                        swept: None,
                    },
                );
            }
        }
        Some((delta, names))
    }

    /// The tombstone of connection `generation` on `id`. One left by a
    /// connection known only from its NEW event (no start time) is found
    /// by the kernel ID alone.
    fn tombstone_of(&mut self, id: &FlowId, generation: u64) -> Option<&mut Tombstone> {
        let bare = generation & u64::from(u32::MAX);
        let key = if generation != bare && !self.tombstones.contains_key(&(*id, generation)) {
            (*id, bare)
        } else {
            (*id, generation)
        };
        self.tombstones.get_mut(&key)
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
                    (id, generation),
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
        self.stats.ended_unseen.add(unseen);
    }
}

/// Whether two reports of one tuple are of one connection: the same
/// generation, or the same kernel ID where one of them has no start time
/// (see [`FlowUpdate::generation`]).
fn same_connection(a: u64, b: u64) -> bool {
    a == b || (a as u32 == b as u32 && (a >> 32 == 0 || b >> 32 == 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::model::{Endpoint, SourceEvent, SourceKind, Transport};
    use std::net::{IpAddr, Ipv4Addr};

    fn id(port: u16) -> FlowId {
        FlowId {
            transport: Transport::Udp,
            client: Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)), port),
            server: Endpoint::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 53),
            zone: 0,
        }
    }

    fn update(port: u16, generation: u64, bytes: u64, ended: bool) -> SourceEvent {
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

    /// The table and the client-to-server bytes of the deltas it returned.
    struct Harness {
        table: FlowTable,
        bytes: u64,
    }

    impl Harness {
        fn apply(&mut self, event: SourceEvent) {
            match event {
                SourceEvent::Flow(u) => {
                    if let Some(d) = self.table.apply(u, |_, _, _| None) {
                        self.bytes += d.delta.to_server.bytes;
                    }
                }
                SourceEvent::DumpStarted { epoch } => self.table.dump_started(epoch),
                SourceEvent::DumpFinished { epoch, complete } => {
                    self.table.dump_finished(epoch, complete)
                }
                other => panic!("not a table event: {other:?}"),
            }
        }

        /// A complete dump `epoch` that lists `entries`.
        fn dump<const N: usize>(&mut self, epoch: u64, entries: [SourceEvent; N]) {
            self.apply(SourceEvent::DumpStarted { epoch });
            for e in entries {
                self.apply(e);
            }
            self.apply(SourceEvent::DumpFinished {
                epoch,
                complete: true,
            });
        }

        fn take_bytes(&mut self) -> u64 {
            std::mem::take(&mut self.bytes)
        }
    }

    fn setup(max_flows: usize) -> (Harness, Telemetry) {
        let telemetry = Telemetry::default();
        let table = FlowTable::new(max_flows, &telemetry);
        (Harness { table, bytes: 0 }, telemetry)
    }

    /// A NEW event (no counters, no start time) that a dump overtook adds
    /// nothing and leaves the mark where the dump put it: the next report
    /// counts only what came since (it used to count the dump's bytes twice).
    #[test]
    fn a_new_event_behind_a_dump_counts_nothing() {
        for generation in [7, (99 << 32) | 7] {
            let (mut t, _) = setup(10);
            t.apply(update(1, generation, 1000, false));
            t.apply(update(1, 7, 0, false));
            t.apply(update(1, generation, 1500, false));
            t.apply(update(1, generation, 1600, true));
            assert_eq!(t.take_bytes(), 1600, "generation {generation:#x}");
        }
    }

    /// The kernel gives a connection that reuses the tuple at once the ID
    /// of the one before it; their start times differ. A dump that reports
    /// the second before the event thread delivered the first one's end
    /// must not count the first twice.
    #[test]
    fn a_reused_kernel_id_is_told_apart_by_the_start_time() {
        let (first, second) = ((1 << 32) | 7, (2 << 32) | 7);
        let (mut t, telemetry) = setup(10);
        t.dump(1, [update(1, 7, 0, false), update(1, first, 1000, false)]);
        t.apply(SourceEvent::DumpStarted { epoch: 2 });
        // The dump sees the second connection ...
        t.apply(update(1, second, 300, false));
        // ... before the events of the first one's end and the second's start.
        t.apply(update(1, first, 1200, true));
        t.apply(update(1, 7, 0, false));
        t.apply(SourceEvent::DumpFinished {
            epoch: 2,
            complete: true,
        });
        t.apply(update(1, second, 500, true));
        // A stale entry of the first one after all that.
        t.apply(update(1, first, 1200, false));
        assert_eq!(t.take_bytes(), 1200 + 500);
        assert_eq!(telemetry.value(&catalogue::FLOWS_ENDED_UNSEEN), 0);
    }

    /// After the first connection's end, the second one's NEW event (bare
    /// ID) is a new connection, and its first dump entry with a start time
    /// continues it.
    #[test]
    fn a_new_event_after_an_end_with_the_same_id_starts_a_connection() {
        let (first, second) = ((1 << 32) | 7, (2 << 32) | 7);
        let (mut t, _) = setup(10);
        t.apply(update(1, first, 1000, false));
        t.apply(update(1, first, 1200, true));
        t.apply(update(1, 7, 0, false));
        t.apply(update(1, second, 300, false));
        t.apply(update(1, second, 500, true));
        assert_eq!(t.take_bytes(), 1200 + 500);
    }

    #[test]
    fn deltas_between_dumps() {
        let (mut t, _) = setup(10);
        t.apply(update(1, 7, 1000, false));
        assert_eq!(t.take_bytes(), 1000);
        t.apply(update(1, 7, 1500, false));
        assert_eq!(t.take_bytes(), 500);
        t.apply(update(1, 7, 1500, false));
        assert_eq!(t.take_bytes(), 0);
    }

    #[test]
    fn reused_tuple_and_counter_reset_never_go_negative() {
        let (mut t, stats) = setup(10);
        t.apply(update(1, 7, 1000, false));
        t.apply(update(1, 8, 300, false));
        assert_eq!(t.take_bytes(), 1300);
        // The old connection's DESTROY arrives late: only its rest counts.
        t.apply(update(1, 7, 1100, true));
        assert_eq!(t.take_bytes(), 100);
        assert_eq!(stats.value(&catalogue::FLOWS_ENDED_UNSEEN), 0);
        assert_eq!(t.table.len(), 1, "the new connection is still tracked");
        t.apply(update(1, 8, 100, false));
        assert_eq!(t.take_bytes(), 100, "a reset counts the new value afresh");
    }

    /// A short connection (generation 7) lives and ends between two dumps;
    /// its tuple is reused at once (generation 8), and the dump thread
    /// reports the new connection before the event thread delivers the old
    /// one's DESTROY (a loaded machine). Each is counted once: the late
    /// DESTROY of a connection the table never tracked does not displace
    /// the newer one it tracks.
    #[test]
    fn a_late_destroy_of_an_untracked_connection_leaves_the_newer_one_alone() {
        let (mut t, stats) = setup(10);
        t.dump(1, [update(1, 8, 300, false)]);
        assert_eq!(t.take_bytes(), 300);
        t.apply(update(1, 7, 1000, true));
        assert_eq!(t.take_bytes(), 1000, "the old connection, once, whole");
        assert_eq!(t.table.len(), 1, "the new connection is still tracked");
        // A stale entry of the old connection (a dump thread holding what
        // it read before the end) is not counted again.
        t.apply(update(1, 7, 1000, false));
        assert_eq!(t.take_bytes(), 0);
        t.dump(2, [update(1, 8, 500, false)]);
        assert_eq!(t.take_bytes(), 200, "only what the new one sent since");
        t.apply(update(1, 8, 600, true));
        assert_eq!(t.take_bytes(), 100);
        assert!(t.table.is_empty());
        assert_eq!(stats.value(&catalogue::FLOWS_ENDED_UNSEEN), 0);
    }

    /// The dump thread holds an entry of a connection (generation 7) it read
    /// alive; meanwhile the events of its end, of the next connection on
    /// the tuple (generation 8) and of that one's end are all applied. The
    /// stale entry still finds generation 7's tombstone: a tuple keeps one
    /// per generation, the newer end does not replace it.
    #[test]
    fn a_stale_entry_finds_its_tombstone_after_the_tuple_ended_again() {
        let (mut t, _) = setup(10);
        t.dump(1, [update(1, 7, 1000, false)]);
        t.apply(SourceEvent::DumpStarted { epoch: 2 });
        t.apply(update(1, 7, 1200, true));
        t.apply(update(1, 8, 100, false));
        t.apply(update(1, 8, 300, true));
        assert_eq!(t.take_bytes(), 1000 + 200 + 300);
        t.apply(update(1, 7, 1100, false));
        t.apply(SourceEvent::DumpFinished {
            epoch: 2,
            complete: true,
        });
        assert_eq!(t.take_bytes(), 0, "the stale entry of generation 7");
        assert!(t.table.is_empty());
    }

    #[test]
    fn stale_dump_after_destroy_is_not_counted_twice() {
        let (mut t, _) = setup(10);
        t.dump(1, [update(1, 7, 1000, false)]);
        t.apply(SourceEvent::DumpStarted { epoch: 2 });
        t.apply(update(1, 7, 1200, true));
        // the dump began before the end and still lists the connection
        t.apply(update(1, 7, 1100, false));
        t.apply(SourceEvent::DumpFinished {
            epoch: 2,
            complete: true,
        });
        assert_eq!(t.take_bytes(), 1200);
        assert!(t.table.is_empty());
    }

    #[test]
    fn short_connection_seen_only_at_its_end_is_counted() {
        let (mut t, _) = setup(10);
        t.apply(update(9, 3, 640, true));
        assert_eq!(t.take_bytes(), 640);
        assert!(t.table.is_empty());
    }

    #[test]
    fn vanished_flows_are_swept_and_counted() {
        let (mut t, stats) = setup(10);
        t.dump(1, [update(1, 1, 10, false), update(2, 2, 10, false)]);
        t.apply(SourceEvent::DumpStarted { epoch: 2 });
        t.apply(update(1, 1, 20, false));
        t.apply(SourceEvent::DumpFinished {
            epoch: 2,
            complete: false,
        });
        assert_eq!(t.table.len(), 2, "an incomplete dump removes nothing");
        t.dump(3, [update(1, 1, 20, false)]);
        assert_eq!(t.table.len(), 1);
        // Its DESTROY event may still come; after one more complete dump
        // without it, it counts as ended unseen.
        assert_eq!(stats.value(&catalogue::FLOWS_ENDED_UNSEEN), 0);
        t.dump(4, [update(1, 1, 20, false)]);
        assert_eq!(stats.value(&catalogue::FLOWS_ENDED_UNSEEN), 1);
    }

    #[test]
    fn destroy_after_the_sweep_adds_only_the_rest() {
        let (mut t, stats) = setup(10);
        t.dump(1, [update(1, 7, 1000, false)]);
        assert_eq!(t.take_bytes(), 1000);
        // The entry expired; the next dump skips it and the kernel sends
        // its DESTROY event, which arrives after that dump finished.
        t.dump(2, []);
        t.apply(update(1, 7, 1200, true));
        assert_eq!(t.take_bytes(), 200, "only the bytes since the last dump");
        t.dump(3, []);
        assert_eq!(stats.value(&catalogue::FLOWS_ENDED_UNSEEN), 0);
    }

    #[test]
    fn full_table_counts_untracked_flows_at_their_end() {
        let (mut t, stats) = setup(1);
        t.apply(update(1, 1, 10, false));
        t.apply(update(2, 2, 10, false));
        assert_eq!(stats.value(&catalogue::FLOWS_UNTRACKED), 1);
        t.apply(update(2, 2, 50, true));
        assert_eq!(t.take_bytes(), 60);
    }
}
