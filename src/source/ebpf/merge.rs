//! Turns the kernel's per-sighting, per-direction entries into flowtel's
//! connections: pairs the two directions, deduplicates sightings and decides
//! which side is the client.
//!
//! Deduplication: a packet that crosses several attached hooks (veth host
//! side ingress then the egress device, a VLAN and its parent, ...) lands in
//! one entry per hook. Per direction the connection's counters are the
//! MAXIMUM over its sightings, so each packet counts once. See bpf/README.md.
//!
//! NAT: a connection translated between two hooks is seen under two tuples.
//! [`Connections::fold_nat`] folds the translated one into the original one
//! (by the same maximum rule) using conntrack's translations, so it is
//! reported once, under the tuple the client used, with its [`Nat`].

use std::collections::HashMap;

use crate::flow::{Counters, Endpoint, FlowId, FlowUpdate, SourceKind, Transport};

use super::maps::{FlowKey, FlowValue, FLAG_SYN_ONLY, TCP_FIN, TCP_RST};
use super::nat::{NatTable, Translation};

/// Ports below this are "well known": such a side is the server.
const WELL_KNOWN: u16 = 1024;
/// Ports at or above this look ephemeral (Linux's default range starts here).
const EPHEMERAL: u16 = 32768;

/// One direction of a connection, merged over its sightings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Direction {
    /// The maximum over sightings (bytes and packets taken separately).
    pub counters: Counters,
    /// Earliest first packet over sightings; 0 when never seen.
    pub first_ns: u64,
    pub last_ns: u64,
    /// TCP flags OR'ed over sightings, plus `FLAG_SYN_ONLY`.
    pub flags: u32,
}

impl Direction {
    fn add_sighting(&mut self, v: &FlowValue) {
        self.counters.bytes = self.counters.bytes.max(v.bytes);
        self.counters.packets = self.counters.packets.max(v.packets);
        if v.first_ns != 0 && (self.first_ns == 0 || v.first_ns < self.first_ns) {
            self.first_ns = v.first_ns;
        }
        self.last_ns = self.last_ns.max(v.last_ns);
        self.flags |= v.flags;
    }

    /// Folds in the same direction as seen under another tuple: the same
    /// maximum rule as between sightings.
    fn merge(&mut self, other: &Direction) {
        self.add_sighting(&FlowValue {
            bytes: other.counters.bytes,
            packets: other.counters.packets,
            first_ns: other.first_ns,
            last_ns: other.last_ns,
            flags: other.flags,
            pad: 0,
        });
    }

    fn seen(&self) -> bool {
        self.first_ns != 0 || !self.counters.is_zero()
    }
}

/// The canonical identity of a connection: its two ends in sorted order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub transport: Transport,
    /// The lower endpoint (by address, then port).
    pub a: Endpoint,
    pub b: Endpoint,
}

impl ConnKey {
    /// The key of the connection between `x` and `y`, in either order.
    pub fn new(transport: Transport, x: Endpoint, y: Endpoint) -> ConnKey {
        let (a, b) = if x <= y { (x, y) } else { (y, x) };
        ConnKey { transport, a, b }
    }
}

/// All entries of one connection.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// Packets from `a` to `b`.
    pub ab: Direction,
    pub ba: Direction,
    /// Every map key that belongs to the connection (to delete it), under
    /// both tuples when it was NAT'ed.
    pub keys: Vec<FlowKey>,
    /// conntrack's translation, when the connection was NAT'ed on this node:
    /// it fixes which side is the client and is reported with the flow.
    pub nat: Option<Translation>,
}

/// Entries grouped into connections.
#[derive(Debug, Default)]
pub struct Connections {
    pub map: HashMap<ConnKey, Connection>,
}

impl Connections {
    /// Adds one map entry (per-CPU values already summed). False when the
    /// key is malformed (an address family the program never writes).
    pub fn add(&mut self, key: &FlowKey, value: &FlowValue) -> bool {
        let Some((conn, forward)) = conn_key(key) else {
            return false;
        };
        let c = self.map.entry(conn).or_default();
        c.keys.push(*key);
        if forward {
            c.ab.add_sighting(value);
        } else {
            c.ba.add_sighting(value);
        }
        true
    }

    /// Applies conntrack's translations: a connection seen under a
    /// translated tuple (beyond a DNAT or SNAT on this node) is folded into
    /// its original connection, which is created if no hook saw the
    /// original tuple; an original connection whose translated tuple was
    /// not seen still gets the translation.
    pub fn fold_nat(&mut self, table: &NatTable) {
        if table.is_empty() {
            return;
        }
        let translated: Vec<Translation> = self
            .map
            .keys()
            .filter_map(|key| table.by_translated(key))
            .collect();
        for t in &translated {
            self.fold(t);
        }
        for (key, conn) in &mut self.map {
            if conn.nat.is_none() {
                conn.nat = table.by_original(key);
            }
        }
    }

    /// Folds the connection under `t`'s translated tuple (if any) into the
    /// one under its original tuple, and marks the latter with `t`.
    pub fn fold(&mut self, t: &Translation) {
        let (original, translated) = (t.original_key(), t.translated_key());
        let moved = if original == translated {
            None
        } else {
            self.map.remove(&translated)
        };
        if moved.is_none() && !self.map.contains_key(&original) {
            return;
        }
        let into = self.map.entry(original).or_default();
        into.nat = Some(*t);
        let Some(from) = moved else { return };
        // Each side's packets, named by the side that sent them.
        let (from_client, from_server) = if t.translated_client() == translated.a {
            (&from.ab, &from.ba)
        } else {
            (&from.ba, &from.ab)
        };
        let (to_client_side, to_server_side) = if t.original.client == original.a {
            (&mut into.ab, &mut into.ba)
        } else {
            (&mut into.ba, &mut into.ab)
        };
        to_client_side.merge(from_client);
        to_server_side.merge(from_server);
        into.keys.extend_from_slice(&from.keys);
    }
}

/// What the source has reported for each live connection: a generation and
/// the counters sent, per direction.
///
/// * The generation (never 0) is new for each connection that appears and
///   kept while it is reported, so the flow table tells a connection that
///   ended and came back on the same tuple from a continuing one, and
///   ignores a stale report of one that ended.
/// * The counters sent never go back. The per-direction maximum over
///   sightings can shrink between dumps: a NAT fold present in one dump and
///   missing from the next, or a sighting read a moment later than another.
///   A smaller value is a partial view of the same connection, never a new
///   one, so the high-water mark is sent instead (the flow table would
///   otherwise take a counter that went backwards for a new connection and
///   add it whole).
#[derive(Debug, Default)]
pub struct Reported {
    last: u32,
    map: HashMap<FlowId, Stamp>,
}

#[derive(Debug, Clone, Copy)]
struct Stamp {
    generation: u32,
    to_server: Counters,
    to_client: Counters,
    /// The dump that last reported the connection.
    dump: u64,
}

impl Reported {
    /// Stamps one update of the dump `dump` before it is sent: the
    /// connection's generation, and counters no lower than sent before.
    pub fn stamp(&mut self, mut u: FlowUpdate, dump: u64) -> FlowUpdate {
        let stamp = match self.map.get_mut(&u.id) {
            Some(s) => s,
            None => {
                self.last = self.last.wrapping_add(1).max(1);
                self.map.entry(u.id).or_insert(Stamp {
                    generation: self.last,
                    to_server: Counters::default(),
                    to_client: Counters::default(),
                    dump,
                })
            }
        };
        stamp.to_server = stamp.to_server.high(u.to_server);
        stamp.to_client = stamp.to_client.high(u.to_client);
        stamp.dump = dump;
        u.generation = u64::from(stamp.generation);
        u.to_server = stamp.to_server;
        u.to_client = stamp.to_client;
        if u.ended {
            self.map.remove(&u.id);
        }
        u
    }

    /// Forgets connections the complete dump `dump` did not report.
    pub fn sweep(&mut self, dump: u64) {
        self.map.retain(|_, s| s.dump == dump);
    }

    /// Connections followed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// The connection a key belongs to, and whether the key runs a→b.
pub fn conn_key(key: &FlowKey) -> Option<(ConnKey, bool)> {
    let src = Endpoint::new(key.src_ip()?, key.sport);
    let dst = Endpoint::new(key.dst_ip()?, key.dport);
    let key = ConnKey::new(Transport::from_protocol(key.proto), src, dst);
    Some((key, key.a == src))
}

impl Connection {
    /// Newest packet in either direction.
    pub fn last_ns(&self) -> u64 {
        self.ab.last_ns.max(self.ba.last_ns)
    }

    /// A TCP connection that was reset, or closed by both sides.
    pub fn tcp_closed(&self, key: &ConnKey) -> bool {
        key.transport == Transport::Tcp
            && ((self.ab.flags | self.ba.flags) & TCP_RST != 0
                || (self.ab.flags & TCP_FIN != 0 && self.ba.flags & TCP_FIN != 0))
    }

    /// Whether `a` is the client. The rules use only facts that never
    /// change once seen (flags, ports, first-packet times), so a connection
    /// keeps its orientation from one dump to the next.
    pub fn client_is_a(&self, key: &ConnKey) -> bool {
        // conntrack saw the first packet: its original tuple decides.
        if let Some(t) = &self.nat {
            return t.original.client == key.a;
        }
        let (a, b) = (key.a.port, key.b.port);
        match key.transport {
            // Echo: the requester's id is its "port", the responder's is 0.
            Transport::Icmp | Transport::Icmpv6 => {
                if a != 0 && b == 0 {
                    return true;
                }
                if b != 0 && a == 0 {
                    return false;
                }
            }
            Transport::Tcp => {
                let (sa, sb) = (
                    self.ab.flags & FLAG_SYN_ONLY != 0,
                    self.ba.flags & FLAG_SYN_ONLY != 0,
                );
                if sa != sb {
                    return sa;
                }
            }
            _ => {}
        }
        if key.transport.has_ports() {
            if (a < WELL_KNOWN) != (b < WELL_KNOWN) {
                return b < WELL_KNOWN;
            }
            if (a >= EPHEMERAL) != (b >= EPHEMERAL) {
                return a >= EPHEMERAL;
            }
        }
        // The side that spoke first (for a one-way flow: its sender).
        match (self.ab.seen(), self.ba.seen()) {
            (true, false) => return true,
            (false, true) => return false,
            _ => {}
        }
        if self.ab.first_ns != self.ba.first_ns {
            return self.ab.first_ns < self.ba.first_ns;
        }
        if a != b {
            return a > b;
        }
        true
    }

    /// The flowtel update for this connection.
    pub fn update(&self, key: &ConnKey, ended: bool) -> FlowUpdate {
        let (client, server, to_server, to_client) = if self.client_is_a(key) {
            (key.a, key.b, self.ab.counters, self.ba.counters)
        } else {
            (key.b, key.a, self.ba.counters, self.ab.counters)
        };
        FlowUpdate {
            id: FlowId {
                transport: key.transport,
                client,
                server,
                zone: 0,
            },
            generation: 0,
            nat: self.nat.map(|t| t.nat).unwrap_or_default(),
            to_server,
            to_client,
            ended,
            source: SourceKind::Ebpf,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;
    use crate::flow::{Nat, SourceEvent};
    use crate::source::ebpf::maps::{DIR_EGRESS, DIR_INGRESS};

    fn v4key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> FlowKey {
        let mut k = FlowKey {
            sport,
            dport,
            proto,
            family: 4,
            dir: DIR_EGRESS,
            ifindex: 2,
            ..FlowKey::default()
        };
        k.src[..4].copy_from_slice(&src);
        k.dst[..4].copy_from_slice(&dst);
        k
    }

    fn val(bytes: u64, packets: u64, first: u64, flags: u32) -> FlowValue {
        FlowValue {
            bytes,
            packets,
            first_ns: first,
            last_ns: first + 10,
            flags,
            pad: 0,
        }
    }

    const C: [u8; 4] = [198, 18, 0, 1];
    const S: [u8; 4] = [198, 18, 0, 2];

    fn one(conns: &Connections) -> FlowUpdate {
        assert_eq!(conns.map.len(), 1);
        let (k, c) = conns.map.iter().next().expect("one connection");
        c.update(k, false)
    }

    #[test]
    fn syn_decides_even_against_port_heuristics() {
        let mut conns = Connections::default();
        // Client uses port 80 as its source (odd, but the SYN says so).
        conns.add(
            &v4key(C, 80, S, 40000, 6),
            &val(100, 2, 5, 0x02 | FLAG_SYN_ONLY | 0x10),
        );
        conns.add(&v4key(S, 40000, C, 80, 6), &val(60, 1, 6, 0x12));
        let u = one(&conns);
        assert_eq!(u.id.client, Endpoint::new(IpAddr::V4(C.into()), 80));
        assert_eq!(u.to_server, Counters::new(100, 2));
        assert_eq!(u.to_client, Counters::new(60, 1));
        assert_eq!(u.source, SourceKind::Ebpf);
    }

    #[test]
    fn ports_decide_mid_stream() {
        let mut conns = Connections::default();
        // Only the reply direction was seen first; 443 is still the server.
        conns.add(&v4key(S, 443, C, 51000, 6), &val(900, 3, 1, 0x10));
        conns.add(&v4key(C, 51000, S, 443, 6), &val(50, 1, 9, 0x10));
        let u = one(&conns);
        assert_eq!(u.id.server.port, 443);
        assert_eq!(u.to_client, Counters::new(900, 3));
        // Both ephemeral-or-not ties: the ephemeral one is the client.
        let mut conns = Connections::default();
        conns.add(&v4key(S, 5201, C, 40000, 17), &val(10, 1, 1, 0));
        assert_eq!(one(&conns).id.client.port, 40000);
    }

    #[test]
    fn first_sender_is_client_when_ports_say_nothing() {
        let mut conns = Connections::default();
        conns.add(&v4key(S, 5000, C, 6000, 17), &val(10, 1, 1, 0));
        conns.add(&v4key(C, 6000, S, 5000, 17), &val(20, 2, 4, 0));
        let u = one(&conns);
        assert_eq!(u.id.client, Endpoint::new(IpAddr::V4(S.into()), 5000));
        assert_eq!(u.to_server, Counters::new(10, 1));
        assert_eq!(u.to_client, Counters::new(20, 2));
    }

    #[test]
    fn sightings_take_the_maximum_not_the_sum() {
        let mut conns = Connections::default();
        let mut k = v4key(C, 40000, S, 80, 6);
        k.dir = DIR_INGRESS;
        k.ifindex = 5;
        conns.add(&k, &val(1000, 10, 3, 0x10));
        k.dir = DIR_EGRESS;
        k.ifindex = 7;
        conns.add(&k, &val(990, 9, 4, 0x10));
        let u = one(&conns);
        assert_eq!(u.to_server, Counters::new(1000, 10));
        assert_eq!(conns.map.values().next().map(|c| c.keys.len()), Some(2));
    }

    #[test]
    fn icmp_echo_pairs_on_the_identifier() {
        let mut conns = Connections::default();
        let mut req = FlowKey {
            sport: 77,
            dport: 0,
            proto: 58,
            family: 6,
            ..FlowKey::default()
        };
        let c6: Ipv6Addr = "fd00::1".parse().expect("v6");
        let s6: Ipv6Addr = "fd00::2".parse().expect("v6");
        req.src = c6.octets();
        req.dst = s6.octets();
        let mut rep = req;
        rep.src = s6.octets();
        rep.dst = c6.octets();
        rep.sport = 0;
        rep.dport = 77;
        conns.add(&rep, &val(104, 1, 1, 0));
        conns.add(&req, &val(104, 1, 2, 0));
        let u = one(&conns);
        assert_eq!(u.id.transport, Transport::Icmpv6);
        assert_eq!(u.id.client, Endpoint::new(IpAddr::V6(c6), 77));
        assert_eq!(u.id.server, Endpoint::new(IpAddr::V6(s6), 0));
    }

    #[test]
    fn tcp_close_detection() {
        let mut conns = Connections::default();
        conns.add(&v4key(C, 40000, S, 80, 6), &val(1, 1, 1, TCP_FIN | 0x10));
        let (k, c) = conns.map.iter().next().expect("one");
        assert!(!c.tcp_closed(k));
        conns.add(&v4key(S, 80, C, 40000, 6), &val(1, 1, 1, TCP_FIN | 0x10));
        let (k, c) = conns.map.iter().next().expect("one");
        assert!(c.tcp_closed(k));
    }

    /// conntrack's report of `client` → `server` translated to `nat`.
    fn translations(client: Endpoint, server: Endpoint, nat: Nat) -> NatTable {
        let mut table = NatTable::new(16);
        table.apply(SourceEvent::Flow(FlowUpdate {
            id: FlowId {
                transport: Transport::Tcp,
                client,
                server,
                zone: 0,
            },
            generation: 1,
            nat,
            to_server: Counters::default(),
            to_client: Counters::default(),
            ended: false,
            source: SourceKind::Conntrack,
        }));
        table
    }

    fn ep(ip: [u8; 4], port: u16) -> Endpoint {
        Endpoint::new(IpAddr::V4(ip.into()), port)
    }

    const VIP: [u8; 4] = [198, 18, 100, 1];
    const POD: [u8; 4] = [198, 19, 0, 4];

    /// A dialled VIP:80, DNATed to POD:8080 between the two hooks.
    fn dnat_table() -> NatTable {
        translations(
            ep(C, 40000),
            ep(VIP, 80),
            Nat {
                server: Some(ep(POD, 8080)),
                client: None,
            },
        )
    }

    fn sighting(mut k: FlowKey, dir: u8, ifindex: u32) -> FlowKey {
        k.dir = dir;
        k.ifindex = ifindex;
        k
    }

    #[test]
    fn dnat_sides_fold_into_one_flow_with_the_backend() {
        let mut conns = Connections::default();
        // Client side (ifindex 5): before DNAT on the way in, after the
        // reverse translation on the way out.
        let req = v4key(C, 40000, VIP, 80, 6);
        let rep = v4key(VIP, 80, C, 40000, 6);
        conns.add(
            &sighting(req, DIR_INGRESS, 5),
            &val(10_000, 20, 1, FLAG_SYN_ONLY | 0x02),
        );
        conns.add(&sighting(rep, DIR_EGRESS, 5), &val(50_000, 40, 2, 0x12));
        // Server side (ifindex 7): the translated tuple.
        let req = v4key(C, 40000, POD, 8080, 6);
        let rep = v4key(POD, 8080, C, 40000, 6);
        conns.add(
            &sighting(req, DIR_EGRESS, 7),
            &val(10_040, 20, 1, FLAG_SYN_ONLY | 0x02),
        );
        conns.add(&sighting(rep, DIR_INGRESS, 7), &val(49_000, 39, 2, 0x12));
        assert_eq!(conns.map.len(), 2, "two tuples before folding");
        conns.fold_nat(&dnat_table());
        let u = one(&conns);
        assert_eq!(u.id.client, ep(C, 40000));
        assert_eq!(u.id.server, ep(VIP, 80));
        assert_eq!(u.nat.server, Some(ep(POD, 8080)));
        assert_eq!(u.nat.client, None);
        // The maximum per direction over all four sightings, not the sum.
        assert_eq!(u.to_server, Counters::new(10_040, 20));
        assert_eq!(u.to_client, Counters::new(50_000, 40));
        let keys = conns.map.values().next().map(|c| c.keys.len());
        assert_eq!(keys, Some(4), "every kernel key, to delete them at expiry");
    }

    #[test]
    fn snat_reply_direction_maps_across_a_different_sort_order() {
        // P (198.18.0.1) → S (198.18.50.5):443, masqueraded to
        // M (203.0.113.9):61000. Sorted, P < S but S < M: the original key
        // runs a=client, the translated one a=server.
        let s = [198, 18, 50, 5];
        let m = [203, 0, 113, 9];
        let table = translations(
            ep(C, 51000),
            ep(s, 443),
            Nat {
                server: None,
                client: Some(ep(m, 61000)),
            },
        );
        let mut conns = Connections::default();
        conns.add(&v4key(C, 51000, s, 443, 6), &val(700, 7, 1, 0x10));
        conns.add(&v4key(s, 443, C, 51000, 6), &val(9_000, 9, 2, 0x10));
        conns.add(&v4key(m, 61000, s, 443, 6), &val(800, 8, 1, 0x10));
        conns.add(&v4key(s, 443, m, 61000, 6), &val(8_000, 8, 2, 0x10));
        conns.fold_nat(&table);
        let u = one(&conns);
        assert_eq!((u.id.client, u.id.server), (ep(C, 51000), ep(s, 443)));
        assert_eq!(u.nat.client, Some(ep(m, 61000)));
        assert_eq!(u.to_server, Counters::new(800, 8));
        assert_eq!(u.to_client, Counters::new(9_000, 9));
    }

    #[test]
    fn conntrack_orientation_wins_over_the_heuristics() {
        // Mid-stream, no SYN; the "client" uses a well-known port and the
        // server an ephemeral one, and the server spoke first: every
        // heuristic says C:80 is the server. conntrack says otherwise.
        let table = translations(
            ep(C, 80),
            ep(VIP, 40000),
            Nat {
                server: Some(ep(POD, 40001)),
                client: None,
            },
        );
        let mut conns = Connections::default();
        conns.add(&v4key(POD, 40001, C, 80, 6), &val(30, 1, 1, 0x10));
        conns.add(&v4key(C, 80, POD, 40001, 6), &val(20, 1, 5, 0x10));
        conns.fold_nat(&table);
        let u = one(&conns);
        assert_eq!((u.id.client, u.id.server), (ep(C, 80), ep(VIP, 40000)));
        assert_eq!(u.to_server, Counters::new(20, 1));
        assert_eq!(u.to_client, Counters::new(30, 1));
        // The same tuples over UDP are another connection.
        let mut udp = Connections::default();
        udp.add(&v4key(POD, 40001, C, 80, 17), &val(30, 1, 1, 0));
        udp.fold_nat(&table);
        assert_eq!(one(&udp).nat, Nat::default());
    }

    #[test]
    fn one_side_alone_still_carries_the_translation() {
        // Only the server-side hook is attached: the flow is reported as
        // the client dialled it.
        let mut conns = Connections::default();
        conns.add(&v4key(C, 40000, POD, 8080, 6), &val(100, 2, 1, 0x10));
        conns.add(&v4key(POD, 8080, C, 40000, 6), &val(200, 3, 2, 0x10));
        conns.fold_nat(&dnat_table());
        let u = one(&conns);
        assert_eq!(u.id.server, ep(VIP, 80));
        assert_eq!(u.nat.server, Some(ep(POD, 8080)));
        assert_eq!(
            (u.to_server, u.to_client),
            (Counters::new(100, 2), Counters::new(200, 3))
        );
        // Only the client-side hook: the translation is attached as well.
        let mut conns = Connections::default();
        conns.add(&v4key(C, 40000, VIP, 80, 6), &val(100, 2, 1, 0x10));
        conns.fold_nat(&dnat_table());
        let u = one(&conns);
        assert_eq!(u.id.server, ep(VIP, 80));
        assert_eq!(u.nat.server, Some(ep(POD, 8080)));
    }

    #[test]
    fn unrelated_flows_and_an_empty_table_change_nothing() {
        let mut conns = Connections::default();
        conns.add(&v4key(C, 40000, S, 443, 6), &val(100, 2, 1, 0x10));
        conns.fold_nat(&dnat_table());
        conns.fold_nat(&NatTable::new(1));
        let u = one(&conns);
        assert_eq!(u.nat, Nat::default());
        assert_eq!(u.id.server, ep(S, 443));
    }

    #[test]
    fn refolding_one_translation_rebuilds_the_same_flow() {
        // What expiry does with the final values read while deleting.
        let table = dnat_table();
        let t = table
            .by_translated(&ConnKey::new(Transport::Tcp, ep(C, 40000), ep(POD, 8080)))
            .expect("translation");
        let mut fresh = Connections::default();
        fresh.add(&v4key(C, 40000, VIP, 80, 6), &val(100, 2, 1, 0x10));
        fresh.add(&v4key(POD, 8080, C, 40000, 6), &val(300, 4, 2, 0x10));
        fresh.fold(&t);
        let u = one(&fresh);
        assert_eq!(u.id.server, ep(VIP, 80));
        assert_eq!(
            (u.to_server, u.to_client),
            (Counters::new(100, 2), Counters::new(300, 4))
        );
    }

    /// Feeds the connections of one dump through `reported` into `table`
    /// and returns the client-to-server bytes the table counted.
    fn dump_into(
        table: &mut crate::flow::table::FlowTable,
        reported: &mut Reported,
        conns: &Connections,
        dump: u64,
    ) -> u64 {
        table.dump_started(dump);
        let mut bytes = 0;
        for (key, conn) in &conns.map {
            let u = reported.stamp(conn.update(key, false), dump);
            if let Some(d) = table.apply(u, |_, _, _| None) {
                bytes += d.delta.to_server.bytes;
            }
        }
        reported.sweep(dump);
        table.dump_finished(dump, true);
        bytes
    }

    /// The race of issue 17: one dump folds the translated sightings into
    /// the connection (their maximum, 10_040 bytes, is the larger), the
    /// next has lost the fold and sees only the client side (10_020 bytes,
    /// packets still between the two hooks at the first read). The
    /// per-direction maximum shrank; that must not count the connection
    /// again.
    #[test]
    fn a_shrinking_maximum_after_a_lost_fold_is_not_counted_twice() {
        let telemetry = crate::telemetry::Telemetry::default();
        let mut table = crate::flow::table::FlowTable::new(16, &telemetry);
        let mut reported = Reported::default();
        let req = v4key(C, 40000, VIP, 80, 6);
        let rep = v4key(VIP, 80, C, 40000, 6);
        let treq = v4key(C, 40000, POD, 8080, 6);

        let mut first = Connections::default();
        first.add(
            &sighting(req, DIR_INGRESS, 5),
            &val(10_000, 20, 1, FLAG_SYN_ONLY | 0x02),
        );
        first.add(&sighting(rep, DIR_EGRESS, 5), &val(50_000, 40, 2, 0x12));
        first.add(
            &sighting(treq, DIR_EGRESS, 7),
            &val(10_040, 20, 1, FLAG_SYN_ONLY | 0x02),
        );
        first.fold_nat(&dnat_table());
        let counted = dump_into(&mut table, &mut reported, &first, 1);
        assert_eq!(counted, 10_040);

        let mut second = Connections::default();
        second.add(
            &sighting(req, DIR_INGRESS, 5),
            &val(10_020, 20, 1, FLAG_SYN_ONLY | 0x02),
        );
        second.add(&sighting(rep, DIR_EGRESS, 5), &val(50_000, 40, 2, 0x12));
        second.fold_nat(&NatTable::new(16));
        let counted = counted + dump_into(&mut table, &mut reported, &second, 2);
        assert_eq!(
            counted, 10_040,
            "the connection carried 10_040 bytes to the server"
        );

        // More traffic: only what is new beyond the high-water mark counts.
        let mut third = Connections::default();
        third.add(
            &sighting(req, DIR_INGRESS, 5),
            &val(12_000, 24, 1, FLAG_SYN_ONLY | 0x02),
        );
        third.add(&sighting(rep, DIR_EGRESS, 5), &val(50_000, 40, 2, 0x12));
        let counted = counted + dump_into(&mut table, &mut reported, &third, 3);
        assert_eq!(counted, 12_000);
    }

    #[test]
    fn generations_are_new_per_connection_and_kept_while_it_lives() {
        let mut reported = Reported::default();
        let mut conns = Connections::default();
        conns.add(&v4key(C, 40000, S, 80, 6), &val(100, 1, 1, 0));
        let one = one(&conns);
        let first = reported.stamp(one, 1);
        assert_ne!(first.generation, 0);
        assert_eq!(reported.stamp(one, 2).generation, first.generation);
        let ended = reported.stamp(FlowUpdate { ended: true, ..one }, 3);
        assert_eq!(ended.generation, first.generation);
        assert_eq!(reported.len(), 0, "forgotten at its end");
        // The same tuple again: a new connection.
        let again = reported.stamp(one, 4);
        assert_ne!(again.generation, first.generation);
        reported.sweep(5);
        assert_eq!(reported.len(), 0, "not in the complete dump 5");
    }

    #[test]
    fn malformed_family_is_refused() {
        let mut conns = Connections::default();
        let k = FlowKey {
            family: 9,
            ..FlowKey::default()
        };
        assert!(!conns.add(&k, &val(1, 1, 1, 0)));
    }
}
