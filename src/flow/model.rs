//! The flow model shared by every source and exporter.
//!
//! A source reports *cumulative* counters per connection (what conntrack and
//! eBPF maps hold); the flow table turns them into per-interval deltas, so
//! sources never need to remember what they already reported.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::mesh::MeshUpdate;

/// The transport protocol of a flow, as carried in the IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Sctp,
    /// Any other IP protocol number (GRE, ESP, ...), kept so nothing is dropped.
    Other(u8),
}

impl Transport {
    /// Maps an IP protocol number (`IPPROTO_*`) to a transport.
    pub fn from_protocol(number: u8) -> Self {
        match number {
            6 => Self::Tcp,
            17 => Self::Udp,
            1 => Self::Icmp,
            58 => Self::Icmpv6,
            132 => Self::Sctp,
            other => Self::Other(other),
        }
    }

    /// The IP protocol number.
    pub fn protocol(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp => 1,
            Self::Icmpv6 => 58,
            Self::Sctp => 132,
            Self::Other(n) => n,
        }
    }

    /// The value of the `network.transport` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
            Self::Sctp => "sctp",
            Self::Other(_) => "other",
        }
    }

    /// Whether ports mean anything for this transport (ICMP has ids, not ports).
    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(n) => write!(f, "proto-{n}"),
            t => f.write_str(t.as_str()),
        }
    }
}

impl Serialize for Transport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One end of a flow. For ICMP the port holds the echo identifier on the
/// client side and 0 on the server side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl Endpoint {
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self { ip, port }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// Bytes (L3, IP header included, as conntrack and TC count them) and packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub bytes: u64,
    pub packets: u64,
}

impl Counters {
    pub fn new(bytes: u64, packets: u64) -> Self {
        Self { bytes, packets }
    }

    /// `self - earlier`, or `None` when either counter went backwards (a reset
    /// or a reused tuple), in which case the caller counts `self` afresh.
    pub fn since(self, earlier: Counters) -> Option<Counters> {
        Some(Counters {
            bytes: self.bytes.checked_sub(earlier.bytes)?,
            packets: self.packets.checked_sub(earlier.packets)?,
        })
    }

    /// The larger of two counters, field by field: the high-water mark of
    /// two reports of one connection.
    pub fn high(self, other: Counters) -> Counters {
        Counters::new(self.bytes.max(other.bytes), self.packets.max(other.packets))
    }

    pub fn add(&mut self, other: Counters) {
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.packets = self.packets.saturating_add(other.packets);
    }

    pub fn is_zero(self) -> bool {
        self.bytes == 0 && self.packets == 0
    }
}

/// Bytes and packets in each direction of a flow or series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionalCounters {
    pub to_server: Counters,
    pub to_client: Counters,
}

impl DirectionalCounters {
    pub fn add(&mut self, other: DirectionalCounters) {
        self.to_server.add(other.to_server);
        self.to_client.add(other.to_client);
    }

    pub fn total(&self) -> Counters {
        let mut t = self.to_server;
        t.add(self.to_client);
        t
    }

    pub fn is_zero(&self) -> bool {
        self.to_server.is_zero() && self.to_client.is_zero()
    }
}

/// Which kernel facility saw the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Conntrack,
    Ebpf,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Conntrack => "conntrack",
            Self::Ebpf => "ebpf",
        }
    }
}

/// The identity of one connection: its original-direction tuple. The client
/// is the side that sent the first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowId {
    pub transport: Transport,
    pub client: Endpoint,
    pub server: Endpoint,
    /// conntrack zone (0 when zones are not used).
    pub zone: u16,
}

/// Address translation seen on a flow: where the packets really went (DNAT,
/// e.g. a Service VIP to the pod that answered) and where they really came
/// from (SNAT/masquerade). Only translated ends are set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Nat {
    pub server: Option<Endpoint>,
    pub client: Option<Endpoint>,
}

/// A source's latest view of one connection, with counters cumulative since
/// the connection began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowUpdate {
    pub id: FlowId,
    /// Distinguishes two connections that reuse one tuple; 0 when the
    /// source cannot tell. For conntrack: `CTA_ID` in the low 32 bits and,
    /// when the entry has a start time (`nf_conntrack_timestamp`), that time
    /// folded into the high 32, because the kernel gives a connection that
    /// reuses a tuple at once the ID of the one before it about one time in
    /// eight (the freed entry's memory, hashed again). A NEW event carries no
    /// start time: its high half is 0.
    pub generation: u64,
    pub nat: Nat,
    /// Client to server.
    pub to_server: Counters,
    /// Server to client.
    pub to_client: Counters,
    /// The connection is gone; these are its final counters.
    pub ended: bool,
    pub source: SourceKind,
}

/// Why a TCP connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpClose {
    /// Closed with FINs (either side may have closed first).
    Fin,
    /// A reset was sent or received, or the connection was aborted.
    Reset,
    /// The kernel gave up on an unanswered connection (retransmission or
    /// keepalive timeout).
    Timeout,
}

impl TcpClose {
    /// The value of the `flowtel.tcp.close.cause` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
        }
    }
}

/// Why a TCP connection never opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpFailure {
    /// The peer answered the SYN with a reset: nothing listens there (or a
    /// firewall rejects with resets).
    Refused,
    /// No usable answer before the connect gave up: timed out, unreachable,
    /// or abandoned by the application.
    NoAnswer,
}

impl TcpFailure {
    /// The value of the `flowtel.tcp.failure` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::NoAnswer => "no_answer",
        }
    }
}

/// Something that happened to a TCP connection, as seen from its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpEventKind {
    Opened,
    Closed {
        cause: TcpClose,
        /// From the SYN to the close; `None` when the connection predates
        /// flowtel.
        duration: Option<Duration>,
    },
    Failed(TcpFailure),
    /// Segments retransmitted since the last report of this connection.
    Retransmits(u64),
    /// The connection's smoothed RTT (one sample per connection and interval
    /// in which it received data, and one at its close).
    Rtt(Duration),
}

/// A TCP health observation about one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEvent {
    pub id: FlowId,
    pub kind: TcpEventKind,
}

/// Which end of a TCP connection a socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionRole {
    /// It connected (a `CLIENT` span).
    Client,
    /// It accepted (a `SERVER` span).
    Server,
}

/// How one end of a TCP connection saw it end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectionOutcome {
    Closed(TcpClose),
    Failed(TcpFailure),
}

/// One end of a TCP connection from its opening to its close, as its
/// socket saw it: the record a connection span is made of. Only sockets
/// seen opening have one (their initial sequence numbers are known).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionEnd {
    /// Addresses as this socket saw them (a client's server is the address
    /// it connected to, e.g. a Service VIP).
    pub id: FlowId,
    /// This node's address translation of the connection (conntrack's, when
    /// the eBPF source follows it): on a client that dialled a Service VIP,
    /// the backend that answered.
    pub nat: Nat,
    pub role: ConnectionRole,
    /// The client's initial sequence number.
    pub isn_client: u32,
    /// The server's, unless the server never answered the SYN.
    pub isn_server: Option<u32>,
    /// The SYN (sent or received) and the close, wall clock.
    pub start: SystemTime,
    pub end: SystemTime,
    pub outcome: ConnectionOutcome,
    /// L3 bytes (payload plus IP and TCP headers) and segments this end
    /// sent, retransmissions included.
    pub sent: Counters,
    /// The same, received (in-order payload plus headers).
    pub received: Counters,
    /// Segments this end retransmitted.
    pub retransmits: u64,
    /// Smoothed RTT at the close.
    pub rtt: Option<Duration>,
}

/// Packets the kernel dropped, summed per tuple and reason over part of an
/// interval. Addresses are `None` when the packet was not IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropRecord {
    /// The kernel's `enum skb_drop_reason` name without its
    /// `SKB_DROP_REASON_` prefix, e.g. `NETFILTER_DROP`, `NO_SOCKET`.
    pub reason: &'static str,
    pub transport: Transport,
    pub src: Option<Endpoint>,
    pub dst: Option<Endpoint>,
    pub counters: Counters,
}

/// What a source sends down the pipeline's channel to the flow stage.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceEvent {
    Flow(FlowUpdate),
    Tcp(TcpEvent),
    /// One end of a TCP connection that closed or failed.
    Connection(ConnectionEnd),
    Drop(DropRecord),
    /// A DNS query, answered or timed out.
    Dns(super::dns::DnsRecord),
    /// A mesh or CNI source's metrics and log events.
    Mesh(Box<MeshUpdate>),
    /// The CNI the node's configuration names now (`None`: none found).
    Cni(Option<Arc<str>>),
    /// A full table dump begins; every live flow will be reported before the
    /// matching `DumpFinished`.
    DumpStarted {
        epoch: u64,
    },
    /// The dump is over. When `complete`, flows not reported since the
    /// matching `DumpStarted` ended without a final event; an incomplete
    /// (failed) dump removes nothing.
    DumpFinished {
        epoch: u64,
        complete: bool,
    },
}
