//! ctnetlink message decoding (and, for tests and benchmarks, encoding).
//!
//! A busy node holds hundreds of thousands of conntrack entries and every
//! dump walks all of them, so decoding works in place on the receive buffer:
//! no allocation per entry, every length checked, and a malformed message is
//! an error value rather than a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::flow::{Counters, Endpoint, FlowId, FlowUpdate, Nat, SourceKind, Transport};

/// Size of `struct nlmsghdr`.
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// Size of `struct nfgenmsg`.
const NFGENMSG_LEN: usize = 4;

pub(crate) const NLMSG_NOOP: u16 = 1;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSG_OVERRUN: u16 = 4;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x100 | 0x200;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

pub(crate) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
pub(crate) const IPCTNL_MSG_CT_NEW: u16 = 0;
pub(crate) const IPCTNL_MSG_CT_GET: u16 = 1;
pub(crate) const IPCTNL_MSG_CT_DELETE: u16 = 2;
pub(crate) const IPCTNL_MSG_CT_GET_STATS: u16 = 5;

const NLA_HDRLEN: usize = 4;
/// Attribute type bits; the top two are NLA_F_NESTED and NLA_F_NET_BYTEORDER.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_USE: u16 = 11;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_TIMESTAMP: u16 = 20;

const CTA_TIMESTAMP_START: u16 = 1;

const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;

const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;

const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: u16 = 2;
const CTA_PROTOINFO_TCP_WSCALE_REPLY: u16 = 3;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;

/// Why a message could not be decoded. Carries only static text so building
/// one never allocates, even when a whole dump is garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ends before the structure it should hold.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A length field is impossible (shorter than its header, longer than its container).
    #[error("bad length in {0}")]
    BadLength(&'static str),
    /// An attribute has the wrong size for its type.
    #[error("attribute {0} has the wrong size")]
    BadAttribute(&'static str),
    /// A conntrack entry lacks an attribute every entry has.
    #[error("entry has no {0}")]
    Missing(&'static str),
}

/// Which ctnetlink message [`encode_message`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// `IPCTNL_MSG_CT_NEW` as sent for a NEW event (and, with `NLM_F_MULTI`, dump entries).
    New,
    /// `IPCTNL_MSG_CT_DELETE`, the DESTROY event carrying final counters.
    Destroy,
}

/// One netlink message, classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Message {
    /// A conntrack entry (dump answer or event).
    Entry(FlowUpdate),
    /// `NLMSG_DONE`, with the dump's error code (0 or a negative errno).
    Done(i32),
    /// `NLMSG_ERROR`: 0 is an acknowledgement, otherwise a negative errno.
    Error(i32),
    /// Anything else (noop, other ctnetlink types, other subsystems).
    Other,
}

/// The fixed netlink header fields the source looks at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub kind: u16,
    pub seq: u32,
}

/// Splits a received datagram into netlink messages. Stops (with an error)
/// at the first impossible length, since nothing after it can be trusted.
pub(crate) struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<&'a [u8], DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some(len) = read_ne_u32(self.rest, 0) else {
            self.rest = &[];
            return Some(Err(DecodeError::Truncated("netlink header")));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return Some(Err(DecodeError::BadLength("netlink header")));
        }
        let msg = &self.rest[..len];
        let aligned = align4(len).min(self.rest.len());
        self.rest = &self.rest[aligned..];
        Some(Ok(msg))
    }
}

/// Reads the header of one netlink message (whose length was already checked).
pub(crate) fn header(msg: &[u8]) -> Result<Header, DecodeError> {
    match (read_ne_u16(msg, 4), read_ne_u32(msg, 8)) {
        (Some(kind), Some(seq)) => Ok(Header { kind, seq }),
        _ => Err(DecodeError::Truncated("netlink header")),
    }
}

/// Decodes one complete netlink message (header included).
///
/// Returns `Ok(None)` for messages that are not conntrack entries (done,
/// errors, other subsystems), so callers can feed it everything they receive.
pub fn decode_message(buf: &[u8]) -> Result<Option<FlowUpdate>, DecodeError> {
    match classify(buf)? {
        Message::Entry(update) => Ok(Some(update)),
        _ => Ok(None),
    }
}

/// Classifies one complete netlink message and decodes it if it is an entry.
pub(crate) fn classify(buf: &[u8]) -> Result<Message, DecodeError> {
    let len = read_ne_u32(buf, 0).ok_or(DecodeError::Truncated("netlink header"))? as usize;
    if len < NLMSG_HDRLEN || len > buf.len() {
        return Err(DecodeError::BadLength("netlink header"));
    }
    let msg = &buf[..len];
    let hdr = header(msg)?;
    let payload = &msg[NLMSG_HDRLEN..];
    match hdr.kind {
        NLMSG_DONE => {
            // Older kernels may send DONE without the error code.
            Ok(Message::Done(read_ne_i32(payload, 0).unwrap_or(0)))
        }
        NLMSG_ERROR => Ok(Message::Error(
            read_ne_i32(payload, 0).ok_or(DecodeError::Truncated("netlink error"))?,
        )),
        NLMSG_NOOP | NLMSG_OVERRUN => Ok(Message::Other),
        kind if kind >> 8 == NFNL_SUBSYS_CTNETLINK => match kind & 0xff {
            IPCTNL_MSG_CT_NEW | IPCTNL_MSG_CT_GET => {
                decode_entry(payload, false).map(Message::Entry)
            }
            IPCTNL_MSG_CT_DELETE => decode_entry(payload, true).map(Message::Entry),
            _ => Ok(Message::Other),
        },
        _ => Ok(Message::Other),
    }
}

/// One direction's tuple, as far as it was present.
#[derive(Default, Clone, Copy)]
struct Tuple {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    proto: Option<u8>,
    sport: u16,
    dport: u16,
    icmp_id: u16,
}

/// The (source, destination) endpoints of one conntrack tuple, shared by the
/// netlink and procfs decoders. ICMP has no ports: the echo id goes on the
/// client's side (the source of the original direction, the destination of
/// the reply), 0 on the server's.
pub(super) fn tuple_endpoints(
    (src, dst): (IpAddr, IpAddr),
    (sport, dport): (u16, u16),
    icmp_id: u16,
    transport: Transport,
    reply: bool,
) -> Option<(Endpoint, Endpoint)> {
    let (sport, dport) = match transport {
        t if t.has_ports() => (sport, dport),
        Transport::Icmp | Transport::Icmpv6 if reply => (0, icmp_id),
        Transport::Icmp | Transport::Icmpv6 => (icmp_id, 0),
        _ => (0, 0),
    };
    Some((Endpoint::new(src, sport), Endpoint::new(dst, dport)))
}

impl Tuple {
    /// (source, destination) endpoints. ICMP has no ports: the echo id goes
    /// on the client's side (the source of the original direction, the
    /// destination of the reply), 0 on the server's.
    fn endpoints(&self, transport: Transport, reply: bool) -> Option<(Endpoint, Endpoint)> {
        tuple_endpoints(
            (self.src?, self.dst?),
            (self.sport, self.dport),
            self.icmp_id,
            transport,
            reply,
        )
    }
}

fn decode_entry(payload: &[u8], ended: bool) -> Result<FlowUpdate, DecodeError> {
    let attrs = payload
        .get(NFGENMSG_LEN..)
        .ok_or(DecodeError::Truncated("nfgenmsg"))?;
    let mut orig = None;
    let mut reply = None;
    let mut to_server = Counters::default();
    let mut to_client = Counters::default();
    let mut id = 0;
    let mut started = 0;
    let mut zone = 0;
    for attr in Attrs::new(attrs) {
        let (kind, value) = attr?;
        match kind {
            CTA_TUPLE_ORIG => orig = Some(decode_tuple(value)?),
            CTA_TUPLE_REPLY => reply = Some(decode_tuple(value)?),
            CTA_COUNTERS_ORIG => to_server = decode_counters(value)?,
            CTA_COUNTERS_REPLY => to_client = decode_counters(value)?,
            CTA_ID => id = be_u32(value, "CTA_ID")?,
            CTA_TIMESTAMP => started = decode_start(value)?,
            CTA_ZONE => zone = be_u16(value, "CTA_ZONE")?,
            _ => {}
        }
    }
    let orig = orig.ok_or(DecodeError::Missing("CTA_TUPLE_ORIG"))?;
    let transport =
        Transport::from_protocol(orig.proto.ok_or(DecodeError::Missing("CTA_PROTO_NUM"))?);
    let (client, server) = orig
        .endpoints(transport, false)
        .ok_or(DecodeError::Missing("original addresses"))?;
    let mut nat = Nat::default();
    if let Some((reply_src, reply_dst)) = reply.and_then(|r| r.endpoints(transport, true)) {
        if reply_src != server {
            nat.server = Some(reply_src);
        }
        if reply_dst != client {
            nat.client = Some(reply_dst);
        }
    }
    Ok(FlowUpdate {
        id: FlowId {
            transport,
            client,
            server,
            zone,
        },
        generation: generation(id, started),
        nat,
        to_server,
        to_client,
        ended,
        source: SourceKind::Conntrack,
    })
}

fn decode_tuple(buf: &[u8]) -> Result<Tuple, DecodeError> {
    let mut t = Tuple::default();
    for attr in Attrs::new(buf) {
        let (kind, value) = attr?;
        match kind {
            CTA_TUPLE_IP => {
                for attr in Attrs::new(value) {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_IP_V4_SRC => t.src = Some(ipv4(value, "CTA_IP_V4_SRC")?),
                        CTA_IP_V4_DST => t.dst = Some(ipv4(value, "CTA_IP_V4_DST")?),
                        CTA_IP_V6_SRC => t.src = Some(ipv6(value, "CTA_IP_V6_SRC")?),
                        CTA_IP_V6_DST => t.dst = Some(ipv6(value, "CTA_IP_V6_DST")?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for attr in Attrs::new(value) {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_PROTO_NUM => {
                            t.proto = Some(
                                *value
                                    .first()
                                    .ok_or(DecodeError::BadAttribute("CTA_PROTO_NUM"))?,
                            )
                        }
                        CTA_PROTO_SRC_PORT => t.sport = be_u16(value, "CTA_PROTO_SRC_PORT")?,
                        CTA_PROTO_DST_PORT => t.dport = be_u16(value, "CTA_PROTO_DST_PORT")?,
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                            t.icmp_id = be_u16(value, "CTA_PROTO_ICMP_ID")?
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(t)
}

/// The flow table's generation of an entry: its `CTA_ID` in the low half
/// and its start time, when it has one, folded into the high half (never
/// 0 then), so that a connection the kernel gave the ID of the one before
/// it on the same tuple is still told apart.
fn generation(id: u32, started: u64) -> u64 {
    if started == 0 {
        return u64::from(id);
    }
    let folded = (started ^ (started >> 32)) as u32;
    (u64::from(folded.max(1)) << 32) | u64::from(id)
}

/// `CTA_TIMESTAMP_START` (nanoseconds) in a `CTA_TIMESTAMP` nest; 0 when absent.
fn decode_start(buf: &[u8]) -> Result<u64, DecodeError> {
    let mut start = 0;
    for attr in Attrs::new(buf) {
        let (kind, value) = attr?;
        if kind == CTA_TIMESTAMP_START {
            start = be_u64(value, "CTA_TIMESTAMP_START")?;
        }
    }
    Ok(start)
}

fn decode_counters(buf: &[u8]) -> Result<Counters, DecodeError> {
    let mut c = Counters::default();
    for attr in Attrs::new(buf) {
        let (kind, value) = attr?;
        match kind {
            CTA_COUNTERS_PACKETS => c.packets = be_u64(value, "CTA_COUNTERS_PACKETS")?,
            CTA_COUNTERS_BYTES => c.bytes = be_u64(value, "CTA_COUNTERS_BYTES")?,
            CTA_COUNTERS32_PACKETS => {
                c.packets = u64::from(be_u32(value, "CTA_COUNTERS32_PACKETS")?)
            }
            CTA_COUNTERS32_BYTES => c.bytes = u64::from(be_u32(value, "CTA_COUNTERS32_BYTES")?),
            _ => {}
        }
    }
    Ok(c)
}

/// A bounds-checked walk over netlink attributes, yielding the masked type
/// and the value. Ends with one error at the first impossible length.
struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), DecodeError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let (Some(len), Some(kind)) = (read_ne_u16(self.rest, 0), read_ne_u16(self.rest, 2)) else {
            self.rest = &[];
            return Some(Err(DecodeError::Truncated("attribute header")));
        };
        let len = usize::from(len);
        if len < NLA_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return Some(Err(DecodeError::BadLength("attribute")));
        }
        let value = &self.rest[NLA_HDRLEN..len];
        let aligned = align4(len).min(self.rest.len());
        self.rest = &self.rest[aligned..];
        Some(Ok((kind & NLA_TYPE_MASK, value)))
    }
}

#[inline]
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[inline]
fn read_ne_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes([bytes[0], bytes[1]]))
}

#[inline]
fn read_ne_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

#[inline]
fn read_ne_i32(buf: &[u8], at: usize) -> Option<i32> {
    read_ne_u32(buf, at).map(|v| v as i32)
}

#[inline]
fn be_u16(v: &[u8], what: &'static str) -> Result<u16, DecodeError> {
    <[u8; 2]>::try_from(v)
        .map(u16::from_be_bytes)
        .map_err(|_| DecodeError::BadAttribute(what))
}

#[inline]
fn be_u32(v: &[u8], what: &'static str) -> Result<u32, DecodeError> {
    <[u8; 4]>::try_from(v)
        .map(u32::from_be_bytes)
        .map_err(|_| DecodeError::BadAttribute(what))
}

#[inline]
fn be_u64(v: &[u8], what: &'static str) -> Result<u64, DecodeError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| DecodeError::BadAttribute(what))
}

#[inline]
fn ipv4(v: &[u8], what: &'static str) -> Result<IpAddr, DecodeError> {
    <[u8; 4]>::try_from(v)
        .map(|b| IpAddr::V4(Ipv4Addr::from(b)))
        .map_err(|_| DecodeError::BadAttribute(what))
}

#[inline]
fn ipv6(v: &[u8], what: &'static str) -> Result<IpAddr, DecodeError> {
    <[u8; 16]>::try_from(v)
        .map(|b| IpAddr::V6(Ipv6Addr::from(b)))
        .map_err(|_| DecodeError::BadAttribute(what))
}

// ---------------------------------------------------------------------------
// Encoding: requests for the kernel, and realistic entries for tests/benches.

/// A growing netlink message with nested-attribute support.
pub(crate) struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// Starts a message with the nlmsghdr and an nfgenmsg.
    pub(crate) fn new(kind: u16, flags: u16, seq: u32, family: u8) -> Self {
        let mut buf = Vec::with_capacity(320);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version (NFNETLINK_V0), res_id (big endian).
        buf.extend_from_slice(&[family, 0, 0, 0]);
        Self { buf }
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = NLA_HDRLEN + value.len();
        // Attribute values built here are all tiny.
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    fn pad(&mut self) {
        let aligned = align4(self.buf.len());
        self.buf.resize(aligned, 0);
    }

    fn nest_start(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Writes the total length and returns the message.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn encode_tuple(
    e: &mut Encoder,
    kind: u16,
    transport: Transport,
    src: Endpoint,
    dst: Endpoint,
    reply: bool,
) {
    let tuple = e.nest_start(kind);
    let ip = e.nest_start(CTA_TUPLE_IP);
    match (src.ip, dst.ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            e.attr(CTA_IP_V4_SRC, &s.octets());
            e.attr(CTA_IP_V4_DST, &d.octets());
        }
        (s, d) => {
            e.attr(CTA_IP_V6_SRC, &to_v6(s).octets());
            e.attr(CTA_IP_V6_DST, &to_v6(d).octets());
        }
    }
    e.nest_end(ip);
    let proto = e.nest_start(CTA_TUPLE_PROTO);
    e.attr(CTA_PROTO_NUM, &[transport.protocol()]);
    match transport {
        Transport::Icmp | Transport::Icmpv6 => {
            let v6 = transport == Transport::Icmpv6;
            // Echo request one way, echo reply the other.
            let (id, kind) = match (v6, reply) {
                (false, false) => (src.port, 8u8),
                (false, true) => (dst.port, 0),
                (true, false) => (src.port, 128),
                (true, true) => (dst.port, 129),
            };
            let (id_attr, type_attr, code_attr) = if v6 {
                (
                    CTA_PROTO_ICMPV6_ID,
                    CTA_PROTO_ICMPV6_TYPE,
                    CTA_PROTO_ICMPV6_CODE,
                )
            } else {
                (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
            };
            e.attr(id_attr, &id.to_be_bytes());
            e.attr(type_attr, &[kind]);
            e.attr(code_attr, &[0]);
        }
        t if t.has_ports() => {
            e.attr(CTA_PROTO_SRC_PORT, &src.port.to_be_bytes());
            e.attr(CTA_PROTO_DST_PORT, &dst.port.to_be_bytes());
        }
        _ => {}
    }
    e.nest_end(proto);
    e.nest_end(tuple);
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn encode_counters(e: &mut Encoder, kind: u16, c: Counters) {
    let nest = e.nest_start(kind);
    e.attr(CTA_COUNTERS_PACKETS, &c.packets.to_be_bytes());
    e.attr(CTA_COUNTERS_BYTES, &c.bytes.to_be_bytes());
    e.nest_end(nest);
}

/// Builds a ctnetlink message for `update` shaped like the kernel's (same
/// attributes, nesting flags, padding and rough size), so the decoder can be
/// round-trip tested and benchmarked without a kernel.
///
/// The reply tuple is derived from `update.nat`; `update.ended` is ignored in
/// favour of `kind`. Only for tests and benchmarks.
pub fn encode_message(update: &FlowUpdate, kind: MessageKind) -> Vec<u8> {
    let id = &update.id;
    let family = if id.client.ip.is_ipv4() && id.server.ip.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    };
    let (msg_type, flags) = match kind {
        MessageKind::New => (IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL),
        MessageKind::Destroy => (IPCTNL_MSG_CT_DELETE, 0),
    };
    let mut e = Encoder::new((NFNL_SUBSYS_CTNETLINK << 8) | msg_type, flags, 0, family);
    let reply_src = update.nat.server.unwrap_or(id.server);
    let reply_dst = update.nat.client.unwrap_or(id.client);
    encode_tuple(
        &mut e,
        CTA_TUPLE_ORIG,
        id.transport,
        id.client,
        id.server,
        false,
    );
    encode_tuple(
        &mut e,
        CTA_TUPLE_REPLY,
        id.transport,
        reply_src,
        reply_dst,
        true,
    );
    // IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED, plus the NAT bits when translated.
    let mut status: u32 = 0x8 | 0x2 | 0x4;
    if update.nat.client.is_some() {
        status |= 0x10 | 0x80; // IPS_SRC_NAT | IPS_SRC_NAT_DONE
    }
    if update.nat.server.is_some() {
        status |= 0x20 | 0x100; // IPS_DST_NAT | IPS_DST_NAT_DONE
    }
    e.attr(CTA_STATUS, &status.to_be_bytes());
    if kind == MessageKind::New {
        e.attr(CTA_TIMEOUT, &431_999u32.to_be_bytes());
    }
    e.attr(CTA_MARK, &0u32.to_be_bytes());
    encode_counters(&mut e, CTA_COUNTERS_ORIG, update.to_server);
    encode_counters(&mut e, CTA_COUNTERS_REPLY, update.to_client);
    if id.zone != 0 {
        e.attr(CTA_ZONE, &id.zone.to_be_bytes());
    }
    if id.transport == Transport::Tcp {
        let info = e.nest_start(CTA_PROTOINFO);
        let tcp = e.nest_start(CTA_PROTOINFO_TCP);
        e.attr(CTA_PROTOINFO_TCP_STATE, &[3]); // ESTABLISHED
        e.attr(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, &[7]);
        e.attr(CTA_PROTOINFO_TCP_WSCALE_REPLY, &[7]);
        e.attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, &[0x23, 0]);
        e.attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, &[0x23, 0]);
        e.nest_end(tcp);
        e.nest_end(info);
    }
    let started = update.generation >> 32;
    if started != 0 {
        // Folds back to itself: the high half of the generation.
        let ts = e.nest_start(CTA_TIMESTAMP);
        e.attr(CTA_TIMESTAMP_START, &started.to_be_bytes());
        e.nest_end(ts);
    }
    e.attr(CTA_USE, &1u32.to_be_bytes());
    e.attr(CTA_ID, &(update.generation as u32).to_be_bytes());
    e.finish()
}

/// The ctnetlink table dump request (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`).
pub(crate) fn dump_request(seq: u32, family: u8) -> Vec<u8> {
    Encoder::new(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
    )
    .finish()
}

/// A cheap request that needs the same permission as a dump
/// (`IPCTNL_MSG_CT_GET_STATS`), used to decide between netlink and procfs.
pub(crate) fn stats_request(seq: u32) -> Vec<u8> {
    Encoder::new(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET_STATS,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        libc::AF_UNSPEC as u8,
    )
    .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NLM_F_MULTI: u16 = 0x2;

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint::new(ip.parse().expect("test address"), port)
    }

    fn update(transport: Transport, client: Endpoint, server: Endpoint) -> FlowUpdate {
        FlowUpdate {
            id: FlowId {
                transport,
                client,
                server,
                zone: 0,
            },
            generation: 0xdead_beef,
            nat: Nat::default(),
            to_server: Counters::new(1_234_567_890_123, 987_654),
            to_client: Counters::new(42, 1),
            ended: false,
            source: SourceKind::Conntrack,
        }
    }

    fn round_trip(u: FlowUpdate) {
        for kind in [MessageKind::New, MessageKind::Destroy] {
            let msg = encode_message(&u, kind);
            let got = decode_message(&msg).expect("decodes").expect("is an entry");
            let mut want = u;
            want.ended = kind == MessageKind::Destroy;
            assert_eq!(got, want, "{kind:?}");
        }
    }

    #[test]
    fn round_trips_every_transport() {
        let v4c = ep("198.18.0.1", 40000);
        let v4s = ep("198.18.0.2", 80);
        let v6c = ep("fd00::1", 40001);
        let v6s = ep("fd00::2", 443);
        round_trip(update(Transport::Tcp, v4c, v4s));
        round_trip(update(Transport::Udp, v4c, ep("198.18.0.2", 53)));
        round_trip(update(Transport::Sctp, v4c, ep("198.18.0.2", 3868)));
        round_trip(update(Transport::Tcp, v6c, v6s));
        round_trip(update(Transport::Udp, v6c, ep("fd00::2", 53)));
        round_trip(update(Transport::Sctp, v6c, ep("fd00::2", 3868)));
        round_trip(update(
            Transport::Icmp,
            ep("198.18.0.1", 4711),
            ep("198.18.0.2", 0),
        ));
        round_trip(update(
            Transport::Icmpv6,
            ep("fd00::1", 4711),
            ep("fd00::2", 0),
        ));
        round_trip(update(
            Transport::Other(47),
            ep("198.18.0.1", 0),
            ep("198.18.0.2", 0),
        ));
        let mut zoned = update(Transport::Udp, v4c, v4s);
        zoned.id.zone = 7;
        zoned.generation = 0;
        zoned.to_server = Counters::default();
        zoned.to_client = Counters::default();
        round_trip(zoned);
    }

    /// The kernel reuses a `CTA_ID` for a connection that reuses the tuple
    /// at once; the start time tells the two apart, and an entry without
    /// one (a NEW event, or timestamps off) keeps the bare ID.
    #[test]
    fn the_start_time_tells_apart_two_connections_with_one_id() {
        let v4c = ep("198.18.0.1", 40000);
        let v4s = ep("198.18.0.2", 80);
        let mut first = update(Transport::Tcp, v4c, v4s);
        first.generation = (0x1234_5678 << 32) | 0xdead_beef;
        round_trip(first);
        let mut second = first;
        second.generation = (0x1234_5679 << 32) | 0xdead_beef;
        round_trip(second);
        assert_eq!(generation(0xdead_beef, 0), 0xdead_beef);
        let (a, b) = (
            generation(0xdead_beef, 1_765_000_000_123_456_789),
            generation(0xdead_beef, 1_765_000_000_123_459_999),
        );
        assert_ne!(a, b);
        assert_eq!(a as u32, 0xdead_beef);
        assert_ne!(a >> 32, 0);
        // A start that folds to 0 still marks the generation as timed.
        assert_eq!(generation(7, 0x0000_0001_0000_0001) >> 32, 1);
    }

    #[test]
    fn detects_dnat_and_snat() {
        // A Service VIP answered by a pod (DNAT) ...
        let mut u = update(
            Transport::Tcp,
            ep("198.18.1.5", 40000),
            ep("198.19.0.10", 80),
        );
        u.nat.server = Some(ep("198.18.2.7", 8080));
        round_trip(u);
        // ... and masquerade to the outside (SNAT).
        let mut u = update(
            Transport::Udp,
            ep("198.18.1.5", 40000),
            ep("198.19.9.9", 53),
        );
        u.nat.client = Some(ep("198.18.0.1", 61000));
        round_trip(u);
        // Both at once, and ICMP id remapping by masquerade.
        let mut u = update(Transport::Icmp, ep("198.18.1.5", 77), ep("198.19.9.9", 0));
        u.nat.client = Some(ep("198.18.0.1", 78));
        u.nat.server = Some(ep("198.18.3.3", 0));
        round_trip(u);
    }

    #[test]
    fn untranslated_flows_have_no_nat() {
        let u = update(Transport::Tcp, ep("198.18.0.1", 1), ep("198.18.0.2", 2));
        let got = decode_message(&encode_message(&u, MessageKind::New))
            .expect("ok")
            .expect("entry");
        assert_eq!(got.nat, Nat::default());
    }

    #[test]
    fn counters32_and_missing_counters() {
        let mut e = Encoder::new(NFNL_SUBSYS_CTNETLINK << 8, 0, 0, 2);
        let c = ep("198.18.0.1", 1);
        let s = ep("198.18.0.2", 2);
        encode_tuple(&mut e, CTA_TUPLE_ORIG, Transport::Udp, c, s, false);
        let n = e.nest_start(CTA_COUNTERS_ORIG);
        e.attr(CTA_COUNTERS32_PACKETS, &3u32.to_be_bytes());
        e.attr(CTA_COUNTERS32_BYTES, &300u32.to_be_bytes());
        e.nest_end(n);
        let got = decode_message(&e.finish()).expect("ok").expect("entry");
        assert_eq!(got.to_server, Counters::new(300, 3));
        assert_eq!(got.to_client, Counters::default());
        assert_eq!(got.generation, 0);
        assert_eq!(got.nat, Nat::default());
    }

    #[test]
    fn control_messages_are_not_entries() {
        let done = Encoder::new(NLMSG_DONE, NLM_F_MULTI, 1, 0).finish();
        assert_eq!(classify(&done), Ok(Message::Done(0)));
        assert_eq!(decode_message(&done), Ok(None));
        let mut err = Encoder::new(NLMSG_ERROR, 0, 1, 0).finish();
        err[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(classify(&err), Ok(Message::Error(-libc::EPERM)));
        let other = Encoder::new(2 << 8, 0, 1, 0).finish();
        assert_eq!(decode_message(&other), Ok(None));
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        let u = update(Transport::Tcp, ep("fd00::1", 1), ep("fd00::2", 2));
        let msg = encode_message(&u, MessageKind::Destroy);
        // Every prefix: an error or (for the header-only cut) never a panic.
        for cut in 0..msg.len() {
            let mut m = msg[..cut].to_vec();
            if m.len() >= 4 {
                // Claim the truncated length so attribute parsing is exercised.
                let len = m.len() as u32;
                m[0..4].copy_from_slice(&len.to_ne_bytes());
            }
            let _ = decode_message(&m);
        }
        assert!(decode_message(&msg[..10]).is_err());
        assert!(decode_message(&msg[..msg.len() - 1]).is_err());
        // Pseudo-random garbage, deterministically.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let mut m = msg.clone();
            for _ in 0..(round % 7 + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x as usize) % m.len();
                m[at] = (x >> 32) as u8;
            }
            let _ = decode_message(&m);
            for part in Messages::new(&m).flatten() {
                let _ = classify(part);
            }
        }
        // Wrong attribute sizes are reported.
        let mut e = Encoder::new(NFNL_SUBSYS_CTNETLINK << 8, 0, 0, 2);
        let t = e.nest_start(CTA_TUPLE_ORIG);
        let ip = e.nest_start(CTA_TUPLE_IP);
        e.attr(CTA_IP_V4_SRC, &[1, 2, 3]);
        e.nest_end(ip);
        e.nest_end(t);
        assert_eq!(
            decode_message(&e.finish()),
            Err(DecodeError::BadAttribute("CTA_IP_V4_SRC"))
        );
        // An entry without its tuple.
        let e = Encoder::new(NFNL_SUBSYS_CTNETLINK << 8, 0, 0, 2);
        assert_eq!(
            decode_message(&e.finish()),
            Err(DecodeError::Missing("CTA_TUPLE_ORIG"))
        );
    }

    #[test]
    fn splits_datagrams_into_messages() {
        let a = encode_message(
            &update(Transport::Tcp, ep("198.18.0.1", 1), ep("198.18.0.2", 2)),
            MessageKind::New,
        );
        let b = Encoder::new(NLMSG_DONE, NLM_F_MULTI, 1, 0).finish();
        let mut dgram = a.clone();
        dgram.extend_from_slice(&b);
        let parts: Vec<_> = Messages::new(&dgram).collect();
        assert_eq!(parts.len(), 2);
        assert!(matches!(
            classify(parts[0].expect("ok")),
            Ok(Message::Entry(_))
        ));
        assert_eq!(classify(parts[1].expect("ok")), Ok(Message::Done(0)));
        let mut bad = dgram.clone();
        bad[0..4].copy_from_slice(&3u32.to_ne_bytes()); // below the header size
        assert!(Messages::new(&bad).next().expect("one item").is_err());
    }
}
