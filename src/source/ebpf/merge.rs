//! Turns the kernel's per-sighting, per-direction entries into flowtel's
//! connections: pairs the two directions, deduplicates sightings and decides
//! which side is the client.
//!
//! Deduplication: a packet that crosses several attached hooks (veth host
//! side ingress then the egress device, a VLAN and its parent, ...) lands in
//! one entry per hook. Per direction the connection's counters are the
//! MAXIMUM over its sightings, so each packet counts once. See bpf/README.md.

use std::collections::HashMap;

use crate::flow::{Counters, Endpoint, FlowId, FlowUpdate, Nat, SourceKind, Transport};

use super::maps::{FlowKey, FlowValue, FLAG_SYN_ONLY, TCP_FIN, TCP_RST};

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

/// All entries of one connection.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    /// Packets from `a` to `b`.
    pub ab: Direction,
    pub ba: Direction,
    /// Every map key that belongs to the connection (to delete it).
    pub keys: Vec<FlowKey>,
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
}

/// The connection a key belongs to, and whether the key runs a→b.
pub fn conn_key(key: &FlowKey) -> Option<(ConnKey, bool)> {
    let src = Endpoint::new(key.src_ip()?, key.sport);
    let dst = Endpoint::new(key.dst_ip()?, key.dport);
    let transport = Transport::from_protocol(key.proto);
    Some(if src <= dst {
        (
            ConnKey {
                transport,
                a: src,
                b: dst,
            },
            true,
        )
    } else {
        (
            ConnKey {
                transport,
                a: dst,
                b: src,
            },
            false,
        )
    })
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
            nat: Nat::default(),
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
