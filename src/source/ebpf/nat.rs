//! NAT translations for the eBPF source, from conntrack.
//!
//! A connection DNATed or SNATed on this node crosses the attached hooks
//! under two tuples: the original one (client → Service VIP) before the
//! translation and the translated one (client → backend pod) after it. The
//! kernel map therefore holds two connections for one. conntrack knows that
//! they are one: its entry carries both tuples. This module keeps, for every
//! translated entry, the original tuple and the [`Nat`], keyed by the
//! translated tuple as the wire shows it, so a dump can fold the second
//! connection into the first ([`super::merge::Connections::fold_nat`]).
//!
//! The table is fed by a conntrack reader the eBPF source starts for itself
//! (ctnetlink dump plus NEW/DESTROY events, in `ebpf.netns`); its counters
//! are never reported. It is bounded by `ebpf.nat_max_entries`, and what did
//! not fit is counted.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc::error::TryRecvError;

use super::merge::ConnKey;
use super::{EbpfConfig, EbpfStats, NatMode};
use crate::flow::{Endpoint, FlowId, Nat, SourceEvent};
use crate::source::conntrack::{self, ConntrackHandle, Every};
use crate::source::conntrack::{ConntrackConfig, ConntrackMode};
use crate::source::kernel::KernelStats;

/// Events buffered between two drains by the eBPF thread (every 100 ms and
/// at each dump). When full, the conntrack threads wait; the event socket's
/// buffer (16 MiB) holds what arrives meanwhile.
const CHANNEL: usize = 32_768;

/// One NAT'ed connection as conntrack describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The original tuple: the client and the endpoint it dialled.
    pub original: FlowId,
    /// The translated ends (reply tuple), only those that changed.
    pub nat: Nat,
}

impl Translation {
    /// The client as the wire shows it beyond the translation (SNAT).
    pub fn translated_client(&self) -> Endpoint {
        self.nat.client.unwrap_or(self.original.client)
    }

    /// The server as the wire shows it beyond the translation (DNAT).
    pub fn translated_server(&self) -> Endpoint {
        self.nat.server.unwrap_or(self.original.server)
    }

    /// The connection key of the original tuple.
    pub fn original_key(&self) -> ConnKey {
        ConnKey::new(
            self.original.transport,
            self.original.client,
            self.original.server,
        )
    }

    /// The connection key of the translated tuple.
    pub fn translated_key(&self) -> ConnKey {
        ConnKey::new(
            self.original.transport,
            self.translated_client(),
            self.translated_server(),
        )
    }
}

#[derive(Debug)]
struct Entry {
    translation: Translation,
    /// The conntrack dump epoch in progress when it was last reported.
    seen: u64,
    /// conntrack no longer has it. It is kept while the kernel flow map
    /// still holds its traffic, so that traffic keeps being folded.
    ended: bool,
}

/// Translations keyed by the translated tuple, bounded.
#[derive(Debug)]
pub struct NatTable {
    by_translated: HashMap<ConnKey, Entry>,
    /// Original tuple → translated tuple, to give the translation to a
    /// connection seen only before the NAT.
    by_original: HashMap<ConnKey, ConnKey>,
    max_entries: usize,
    /// The latest conntrack dump started.
    epoch: u64,
    /// Translations not stored because the table was full (monotonic).
    refused: u64,
}

impl NatTable {
    pub fn new(max_entries: usize) -> NatTable {
        NatTable {
            by_translated: HashMap::new(),
            by_original: HashMap::new(),
            max_entries,
            epoch: 0,
            refused: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_translated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_translated.is_empty()
    }

    /// Translations that did not fit, since the start.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The translation of the connection seen under `key` beyond the NAT.
    pub fn by_translated(&self, key: &ConnKey) -> Option<Translation> {
        self.by_translated.get(key).map(|e| e.translation)
    }

    /// The translation of the connection whose original tuple is `key`.
    pub fn by_original(&self, key: &ConnKey) -> Option<Translation> {
        self.by_original
            .get(key)
            .and_then(|t| self.by_translated(t))
    }

    /// Applies one event of the conntrack reader.
    pub fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Flow(u) if u.nat != Nat::default() => {
                let t = Translation {
                    original: u.id,
                    nat: u.nat,
                };
                self.record(t, u.ended);
            }
            SourceEvent::DumpStarted { epoch } => self.epoch = epoch,
            // Gone from conntrack without a DESTROY event (lost, or never
            // sent for entries older than the listener). An incomplete dump
            // ends nothing.
            SourceEvent::DumpFinished {
                epoch,
                complete: true,
            } => {
                for e in self.by_translated.values_mut() {
                    if e.seen < epoch {
                        e.ended = true;
                    }
                }
            }
            // Untranslated connections, and anything else a source may send.
            _ => {}
        }
    }

    fn record(&mut self, t: Translation, ended: bool) {
        let key = t.translated_key();
        if let Some(e) = self.by_translated.get_mut(&key) {
            if ended && e.translation != t {
                // The end of an older connection on the same tuple.
                return;
            }
            if e.translation != t {
                let old = e.translation.original_key();
                if self.by_original.get(&old) == Some(&key) {
                    self.by_original.remove(&old);
                }
            }
            e.translation = t;
            e.seen = self.epoch;
            e.ended = ended;
        } else if self.by_translated.len() >= self.max_entries {
            self.refused += 1;
            return;
        } else {
            // Also an end whose NEW event was lost: kept until the flow map
            // no longer has its traffic, which is folded meanwhile.
            self.by_translated.insert(
                key,
                Entry {
                    translation: t,
                    seen: self.epoch,
                    ended,
                },
            );
        }
        self.by_original.insert(t.original_key(), key);
    }

    /// Forgets the ended translations whose traffic is no longer in the
    /// kernel flow map: `live` holds the translated keys of the
    /// connections a complete dump still reported as running.
    pub fn retire(&mut self, live: &HashSet<ConnKey>) {
        let by_original = &mut self.by_original;
        self.by_translated.retain(|key, e| {
            let keep = !e.ended || live.contains(key);
            if !keep {
                let original = e.translation.original_key();
                if by_original.get(&original) == Some(key) {
                    by_original.remove(&original);
                }
            }
            keep
        });
    }
}

/// The conntrack reader and the table it feeds. Owned by the eBPF thread.
pub struct Translations {
    handle: ConntrackHandle,
    rx: tokio::sync::mpsc::Receiver<SourceEvent>,
    table: NatTable,
    /// The reader's own counters: its dumps and byte counters are not the
    /// eBPF source's, so they must not show in the pipeline's.
    reader_stats: Arc<KernelStats>,
    /// Lost events and decode errors already passed on to the pipeline's
    /// counters, which they do concern (a lost NEW event means a NAT'ed
    /// flow reported per side until the next conntrack dump).
    passed_on: (u64, u64),
    /// `table.refused()` at the last warning about it.
    refused_warned: u64,
    refused_log: Every,
    epoch: u64,
    /// A conntrack dump was requested and has not finished.
    dumping: bool,
    /// The reader's threads are gone; warned once.
    gone: bool,
}

impl Translations {
    /// Starts the conntrack reader as `ebpf.nat` asks: `None` when off, or
    /// when `auto` finds conntrack unusable (one warning line saying what
    /// that means and how to fix it).
    pub fn start(cfg: &EbpfConfig) -> anyhow::Result<Option<Translations>> {
        if cfg.nat == NatMode::Off {
            return Ok(None);
        }
        // Netlink only: procfs has no events, so every new NAT'ed flow
        // would be reported per side until the next dump.
        let ct = ConntrackConfig {
            mode: ConntrackMode::Netlink,
            netns: cfg.netns.clone(),
            events: true,
            ensure_tracking: false,
            ..ConntrackConfig::default()
        };
        let reader_stats = Arc::new(KernelStats::default());
        let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL);
        let handle = match conntrack::start_translations(&ct, reader_stats.clone(), tx) {
            Ok(h) => h,
            Err(e) if cfg.nat == NatMode::Auto => {
                tracing::warn!(
                    "ebpf.nat: conntrack translations are unavailable ({e:#}); flows NAT'ed on \
                     this node (Service VIPs, masquerade) may be reported once per side of the \
                     translation. Fix the cause (root or CAP_NET_ADMIN, `modprobe \
                     nf_conntrack_netlink`), or set ebpf.nat: off to accept it"
                );
                return Ok(None);
            }
            Err(e) => return Err(e).context("ebpf.nat: conntrack"),
        };
        let mut t = Translations {
            handle,
            rx,
            table: NatTable::new(cfg.nat_max_entries as usize),
            reader_stats,
            passed_on: (0, 0),
            refused_warned: 0,
            refused_log: Every::new(Duration::from_secs(60)),
            epoch: 0,
            dumping: false,
            gone: false,
        };
        // Entries older than the event subscription come only from a dump.
        t.request_dump();
        Ok(Some(t))
    }

    pub fn table(&self) -> &NatTable {
        &self.table
    }

    /// Applies everything the reader sent so far.
    pub fn drain(&mut self, stats: &KernelStats, ebpf_stats: &EbpfStats) {
        loop {
            match self.rx.try_recv() {
                Ok(event) => {
                    if let SourceEvent::DumpFinished { epoch, .. } = event {
                        if epoch == self.epoch {
                            self.dumping = false;
                        }
                    }
                    self.table.apply(event);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    if !self.gone {
                        self.gone = true;
                        tracing::warn!(
                            "the conntrack reader for NAT translations stopped; NAT'ed flows \
                             that start from now on may be reported once per side"
                        );
                    }
                    break;
                }
            }
        }
        let lost = self.reader_stats.events_lost.get();
        let bad = self.reader_stats.parse_errors.get();
        stats.events_lost.add(lost.saturating_sub(self.passed_on.0));
        stats.parse_errors.add(bad.saturating_sub(self.passed_on.1));
        self.passed_on = (lost, bad);
        let refused = self.table.refused();
        if refused > self.refused_warned && self.refused_log.ready() {
            tracing::warn!(
                refused = refused - self.refused_warned,
                "the NAT table was full: {} translations were not kept, so those connections are                  reported once per side of the translation; raise ebpf.nat_max_entries",
                refused - self.refused_warned
            );
            self.refused_warned = refused;
        }
        ebpf_stats
            .nat_translations
            .store(self.table.len() as u64, Ordering::Relaxed);
        ebpf_stats
            .nat_refused
            .store(self.table.refused(), Ordering::Relaxed);
    }

    /// See [`NatTable::retire`].
    pub fn retire(&mut self, live: &HashSet<ConnKey>) {
        self.table.retire(live);
    }

    /// Asks for a conntrack dump, unless one is still running: it removes
    /// translations whose DESTROY event was lost.
    pub fn request_dump(&mut self) {
        if self.dumping || self.gone {
            return;
        }
        self.epoch += 1;
        self.dumping = self.handle.request_dump(self.epoch);
    }

    pub fn stop(self) {
        self.handle.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::flow::{Counters, FlowUpdate, SourceKind, Transport};

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint::new(ip.parse::<IpAddr>().expect("literal"), port)
    }

    fn dnat(client_port: u16, ended: bool) -> SourceEvent {
        SourceEvent::Flow(FlowUpdate {
            id: FlowId {
                transport: Transport::Tcp,
                client: ep("198.18.0.1", client_port),
                server: ep("198.18.100.1", 80),
                zone: 0,
            },
            generation: 7,
            nat: Nat {
                server: Some(ep("198.19.0.4", 8080)),
                client: None,
            },
            to_server: Counters::new(100, 2),
            to_client: Counters::new(50, 1),
            ended,
            source: SourceKind::Conntrack,
        })
    }

    fn translated(client_port: u16) -> ConnKey {
        ConnKey::new(
            Transport::Tcp,
            ep("198.18.0.1", client_port),
            ep("198.19.0.4", 8080),
        )
    }

    fn original(client_port: u16) -> ConnKey {
        ConnKey::new(
            Transport::Tcp,
            ep("198.18.0.1", client_port),
            ep("198.18.100.1", 80),
        )
    }

    #[test]
    fn keys_are_the_wire_tuples_on_each_side() {
        let SourceEvent::Flow(u) = dnat(40000, false) else {
            panic!("a flow event");
        };
        let t = Translation {
            original: u.id,
            nat: u.nat,
        };
        assert_eq!(t.original_key(), original(40000));
        assert_eq!(t.translated_key(), translated(40000));
        // SNAT: the client changes, the server does not.
        let snat = Translation {
            original: u.id,
            nat: Nat {
                server: None,
                client: Some(ep("203.0.113.9", 61000)),
            },
        };
        assert_eq!(
            snat.translated_key(),
            ConnKey::new(
                Transport::Tcp,
                ep("203.0.113.9", 61000),
                ep("198.18.100.1", 80)
            )
        );
    }

    #[test]
    fn untranslated_entries_are_not_kept() {
        let mut table = NatTable::new(8);
        let SourceEvent::Flow(mut u) = dnat(40000, false) else {
            panic!("a flow event");
        };
        u.nat = Nat::default();
        table.apply(SourceEvent::Flow(u));
        assert!(table.is_empty());
    }

    #[test]
    fn lookups_by_either_tuple() {
        let mut table = NatTable::new(8);
        table.apply(dnat(40000, false));
        let t = table
            .by_translated(&translated(40000))
            .expect("by translated");
        assert_eq!(t.nat.server, Some(ep("198.19.0.4", 8080)));
        assert_eq!(table.by_original(&original(40000)), Some(t));
        assert_eq!(table.by_translated(&original(40000)), None);
    }

    #[test]
    fn ended_entries_stay_while_their_traffic_is_in_the_map() {
        let mut table = NatTable::new(8);
        table.apply(dnat(40000, false));
        table.apply(dnat(40000, true));
        let live: HashSet<ConnKey> = [translated(40000)].into_iter().collect();
        table.retire(&live);
        assert_eq!(table.len(), 1, "still folded while the map has it");
        table.retire(&HashSet::new());
        assert!(table.is_empty());
        assert_eq!(table.by_original(&original(40000)), None);
        // A running entry is never retired.
        table.apply(dnat(40001, false));
        table.retire(&HashSet::new());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn an_end_without_its_start_is_still_used() {
        let mut table = NatTable::new(8);
        table.apply(dnat(40000, true));
        assert!(table.by_translated(&translated(40000)).is_some());
        table.retire(&HashSet::new());
        assert!(table.is_empty());
    }

    #[test]
    fn a_complete_dump_ends_what_it_did_not_list() {
        let mut table = NatTable::new(8);
        table.apply(dnat(40000, false));
        table.apply(dnat(40001, false));
        table.apply(SourceEvent::DumpStarted { epoch: 1 });
        table.apply(dnat(40001, false));
        table.apply(SourceEvent::DumpFinished {
            epoch: 1,
            complete: true,
        });
        table.retire(&HashSet::new());
        assert_eq!(table.len(), 1);
        assert!(table.by_translated(&translated(40001)).is_some());
        // An incomplete dump ends nothing.
        table.apply(SourceEvent::DumpStarted { epoch: 2 });
        table.apply(SourceEvent::DumpFinished {
            epoch: 2,
            complete: false,
        });
        table.retire(&HashSet::new());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn the_table_is_bounded_and_counts_what_did_not_fit() {
        let mut table = NatTable::new(2);
        for port in 40000..40005 {
            table.apply(dnat(port, false));
        }
        assert_eq!(table.len(), 2);
        assert_eq!(table.refused(), 3);
        // Updating a known entry needs no room.
        table.apply(dnat(40000, false));
        assert_eq!(table.refused(), 3);
    }

    #[test]
    fn a_reused_translated_tuple_takes_the_new_original() {
        let mut table = NatTable::new(8);
        table.apply(dnat(40000, false));
        // Another VIP mapped to the same backend, same client port.
        let SourceEvent::Flow(mut u) = dnat(40000, false) else {
            panic!("a flow event");
        };
        u.id.server = ep("198.18.100.2", 80);
        table.apply(SourceEvent::Flow(u));
        assert_eq!(table.len(), 1);
        assert_eq!(table.by_original(&original(40000)), None);
        let t = table.by_translated(&translated(40000)).expect("entry");
        assert_eq!(t.original.server, ep("198.18.100.2", 80));
        // The old connection's late end does not end the new one.
        table.apply(dnat(40000, true));
        table.retire(&HashSet::new());
        assert_eq!(table.len(), 1);
    }
}
