//! TCP health and packet drops from BTF tracepoints (`bpf/tcp.bpf.c`):
//! connections opened, closed (by FIN or reset) and failed, retransmitted
//! segments, smoothed RTT, and the packets the kernel dropped with its
//! reason. Loaded beside the TC flow counter but separately, so a kernel
//! that refuses these programs still gets flow counts.
//!
//! One connection has a socket at each end, and both can be on this node
//! (pod to pod). Connection counts and RTT samples are taken once per
//! connection: from the client socket when it is here, else from the server
//! socket. Retransmits are summed over both, since each side retransmits its
//! own segments.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use aya::maps::{MapData, RingBuf};
use serde::{Deserialize, Serialize};

use super::merge::ConnKey;
use super::nat::NatTable;
use super::{btf, maps};
use crate::flow::{
    ConnectionEnd, ConnectionOutcome, ConnectionRole, Counters, DropRecord, Endpoint, FlowId, Nat,
    SourceEvent, TcpClose, TcpEvent, TcpEventKind, TcpFailure, Transport,
};
use crate::source::kernel::KernelStats;
use crate::source::out::{Halt, Out};

/// Built by build.rs from `bpf/tcp.bpf.c` (empty without clang).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcp.bpf.o"));
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// `ebpf.tcp:` in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TcpHealthConfig {
    /// Connection lifecycle, retransmits and RTT from TCP tracepoints.
    pub enabled: bool,
    /// TCP sockets followed at once (about 100 bytes each in the kernel).
    /// Sockets past it are counted (`flowtel.ebpf.tcp.sockets.untracked`)
    /// and still reported when they open and close, without RTT.
    pub max_sockets: u32,
}

impl Default for TcpHealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_sockets: 65_536,
        }
    }
}

/// `ebpf.drops:` in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DropsConfig {
    /// Packets dropped by the kernel, by reason, from `skb/kfree_skb`.
    pub enabled: bool,
    /// Distinct (tuple, reason) pairs summed in the kernel per interval.
    /// Drops past it are counted (`flowtel.ebpf.drops.unrecorded`).
    pub max_entries: u32,
}

impl Default for DropsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_entries: 16_384,
        }
    }
}

/// The health programs' own counters. Monotonic unless noted.
#[derive(Debug, Default)]
pub struct HealthStats {
    /// Connection events lost because the ring buffer was full.
    pub events_lost: AtomicU64,
    /// Times a socket could not be followed because `max_sockets` were.
    pub sockets_untracked: AtomicU64,
    /// Dropped packets not recorded because `drops.max_entries` was reached.
    pub drops_unrecorded: AtomicU64,
    /// Sockets followed at the last dump (a gauge).
    pub sockets_tracked: AtomicU64,
    /// Entries of `socks` removed by userspace: half-open far longer than
    /// any handshake lasts, so their close was never seen.
    pub sockets_swept: AtomicU64,
}

/// A socket still opening after this long lost its close event: connect()
/// gives up after about 127 s (6 SYN retries) and a server's SYN_RECV
/// after about 63 s, so it is removed from `socks`.
const HALF_OPEN_MAX: Duration = Duration::from_secs(300);

/// Whether the entry `s` is a half-open socket older than [`HALF_OPEN_MAX`]
/// at `now_ns` (CLOCK_MONOTONIC, the clock of `open_ns`).
fn half_open_stale(s: &SockState, now_ns: u64) -> bool {
    s.established == 0
        && s.open_ns != 0
        && now_ns.saturating_sub(s.open_ns) > HALF_OPEN_MAX.as_nanos() as u64
}

const EV_OPENED: u8 = 1;
const EV_CLOSED: u8 = 2;
const EV_FAILED: u8 = 3;
const ROLE_CLIENT: u8 = 1;
const ROLE_SERVER: u8 = 2;
const RST_RECEIVED: u8 = 1;
const TIMED_OUT: u8 = 8;
/// `isn_known`: both ISNs, or only the local one (a SYN never answered).
const ISN_BOTH: u8 = 1;
const ISN_LOCAL: u8 = 2;
/// Indexes of the kernel's `lost` array.
const LOST_EVENTS: u32 = 0;
const LOST_SOCKS: u32 = 1;
const LOST_DROPS: u32 = 2;

/// `struct ft_sock`: one socket as the kernel follows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    pub lport: u16,
    pub rport: u16,
    pub family: u8,
    pub role: u8,
    pub rst: u8,
    pub established: u8,
    pub open_ns: u64,
    pub retransmits: u32,
    pub srtt_us: u32,
    pub rtt_updates: u64,
    pub isn_local: u32,
    pub isn_remote: u32,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub segs_out: u32,
    pub segs_in: u32,
    pub tcp_hdr_len: u16,
    pub isn_known: u8,
    pub pad: [u8; 5],
}

// SAFETY: plain integers and byte arrays, no padding (104 bytes).
unsafe impl aya::Pod for SockState {}

/// `struct ft_tcp_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawEvent {
    s: SockState,
    sk: u64,
    ts_ns: u64,
    kind: u8,
    oldstate: u8,
    pad: [u8; 6],
}

/// `struct ft_drop_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RawDropKey {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    reason: u32,
    proto: u8,
    family: u8,
    pad: [u8; 2],
}

// SAFETY: plain integers and byte arrays, no padding (44 bytes).
unsafe impl aya::Pod for RawDropKey {}

/// `struct ft_drop_val`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RawDropValue {
    packets: u64,
    bytes: u64,
}

// SAFETY: two u64s.
unsafe impl aya::Pod for RawDropValue {}

fn address(family: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        6 => {
            let v6 = Ipv6Addr::from(*bytes);
            // A dual-stack socket talking IPv4: the wire (and TC) sees IPv4.
            Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4))
        }
        _ => None,
    }
}

impl SockState {
    /// The connection this socket is one end of, oriented client → server.
    fn flow_id(&self) -> Option<FlowId> {
        let local = Endpoint::new(address(self.family, &self.laddr)?, self.lport);
        let remote = Endpoint::new(address(self.family, &self.raddr)?, self.rport);
        let local_is_client = match self.role {
            ROLE_CLIENT => true,
            ROLE_SERVER => false,
            // Opened before flowtel: the lower port is the service's.
            _ => self.lport > self.rport,
        };
        let (client, server) = if local_is_client {
            (local, remote)
        } else {
            (remote, local)
        };
        Some(FlowId {
            transport: Transport::Tcp,
            client,
            server,
            zone: 0,
        })
    }
}

/// The wall-clock time of a CLOCK_MONOTONIC timestamp.
fn wall_clock(ns: u64) -> SystemTime {
    let ago = super::monotonic_ns().saturating_sub(ns);
    SystemTime::now()
        .checked_sub(Duration::from_nanos(ago))
        .unwrap_or(UNIX_EPOCH)
}

/// A closed or failed socket seen opening, as one end of its connection
/// (its span). Bytes are L3: payload plus an IP and a TCP header per
/// segment (the TCP header with the options the connection uses).
fn connection_end(raw: &RawEvent, id: FlowId) -> Option<ConnectionEnd> {
    let s = &raw.s;
    let role = match s.role {
        ROLE_CLIENT => ConnectionRole::Client,
        ROLE_SERVER => ConnectionRole::Server,
        _ => return None,
    };
    let isn_remote = match s.isn_known {
        ISN_BOTH => Some(s.isn_remote),
        ISN_LOCAL if role == ConnectionRole::Client => None,
        _ => return None,
    };
    let (isn_client, isn_server) = match role {
        ConnectionRole::Client => (s.isn_local, isn_remote),
        ConnectionRole::Server => (s.isn_remote, Some(s.isn_local)),
    };
    let ip_header = if id.client.ip.is_ipv4() { 20 } else { 40 };
    let header = ip_header + u64::from(s.tcp_hdr_len.max(20));
    let l3 = |bytes: u64, segs: u32| {
        Counters::new(
            bytes.saturating_add(u64::from(segs).saturating_mul(header)),
            u64::from(segs),
        )
    };
    let outcome = if raw.kind == EV_FAILED {
        ConnectionOutcome::Failed(if s.rst & RST_RECEIVED != 0 {
            TcpFailure::Refused
        } else {
            TcpFailure::NoAnswer
        })
    } else {
        ConnectionOutcome::Closed(close_cause(s.rst))
    };
    let end = wall_clock(raw.ts_ns);
    Some(ConnectionEnd {
        id,
        nat: Nat::default(),
        role,
        isn_client,
        isn_server,
        start: if s.open_ns == 0 {
            end
        } else {
            wall_clock(s.open_ns)
        },
        end,
        outcome,
        sent: l3(s.bytes_out, s.segs_out),
        received: l3(s.bytes_in, s.segs_in),
        retransmits: u64::from(s.retransmits),
        rtt: (s.srtt_us > 0).then(|| Duration::from_micros(u64::from(s.srtt_us))),
    })
}

/// The translation conntrack made of a client's connection, by its
/// original tuple (the one the socket knows); none for a server's socket,
/// which sees the translated tuple.
fn translation_of(table: &NatTable, end: &ConnectionEnd) -> Nat {
    if end.role != ConnectionRole::Client {
        return Nat::default();
    }
    let id = &end.id;
    table
        .by_original(&ConnKey::new(id.transport, id.client, id.server))
        .filter(|t| t.original.client == id.client && t.original.server == id.server)
        .map_or_else(Nat::default, |t| t.nat)
}

/// Why an established connection ended, from its `rst` flags.
fn close_cause(rst: u8) -> TcpClose {
    if rst & TIMED_OUT != 0 {
        TcpClose::Timeout
    } else if rst != 0 {
        TcpClose::Reset
    } else {
        TcpClose::Fin
    }
}

/// What userspace remembers of a socket between reports.
#[derive(Debug, Clone, Copy)]
struct SockMemo {
    id: FlowId,
    /// Whether this socket speaks for its connection (see the module docs).
    counted: bool,
    /// Retransmits and RTT refreshes already reported.
    retransmits: u32,
    rtt_updates: u64,
}

/// The loaded programs and what userspace keeps about live sockets.
pub struct Health {
    /// Owns the programs and their tracepoint links: dropping it detaches.
    _bpf: aya::Ebpf,
    events: Option<RingBuf<MapData>>,
    socks: Option<aya::maps::HashMap<MapData, u64, SockState>>,
    drops: Option<maps::EpochMaps>,
    lost: aya::maps::PerCpuArray<MapData, u64>,
    possible_cpus: usize,
    memo: HashMap<u64, SockMemo>,
    /// Client sockets open on this node, by connection: a server socket of
    /// the same connection then does not count it again.
    local_clients: HashMap<FlowId, u64>,
    lost_seen: [u64; 3],
    stats: Arc<HealthStats>,
    self_stats: Arc<KernelStats>,
}

/// (program, tracepoint, is a TCP program rather than the drop program).
const PROGRAMS: &[(&str, &str, bool)] = &[
    ("flowtel_tcp_state", "inet_sock_set_state", true),
    ("flowtel_tcp_rst_in", "tcp_receive_reset", true),
    ("flowtel_tcp_rst_out", "tcp_send_reset", true),
    ("flowtel_tcp_probe", "tcp_probe", true),
    ("flowtel_tcp_retransmit", "tcp_retransmit_skb", true),
    ("flowtel_drop", "kfree_skb", false),
];

impl Health {
    /// Loads and attaches the enabled programs. `netns_ino` restricts them
    /// to one network namespace (0: all, what a node agent wants).
    /// `Ok(None)` when both parts are disabled.
    pub fn start(
        tcp: &TcpHealthConfig,
        drops: &DropsConfig,
        netns_ino: u32,
        possible_cpus: usize,
        stats: Arc<HealthStats>,
        self_stats: Arc<KernelStats>,
    ) -> anyhow::Result<Option<Health>> {
        if !tcp.enabled && !drops.enabled {
            return Ok(None);
        }
        if OBJECT.is_empty() {
            return Err(anyhow!(
                "flowtel was built without its TCP health programs (clang missing at build time)"
            ));
        }
        if tcp.max_sockets == 0 || drops.max_entries == 0 {
            return Err(anyhow!(
                "ebpf.tcp.max_sockets and ebpf.drops.max_entries must be at least 1"
            ));
        }
        let mut bpf = aya::EbpfLoader::new()
            .override_global("netns_ino", &netns_ino, true)
            .map_max_entries("socks", tcp.max_sockets)
            .map_max_entries("drops_a", drops.max_entries)
            .map_max_entries("drops_b", drops.max_entries)
            .load(OBJECT)
            .map_err(|e| anyhow!("loading the TCP health programs failed: {e}"))?;
        let btf = aya::Btf::from_sys_fs()
            .with_context(|| format!("reading the kernel's BTF from {KERNEL_BTF}"))?;
        for &(name, tracepoint, is_tcp) in PROGRAMS {
            if (is_tcp && !tcp.enabled) || (!is_tcp && !drops.enabled) {
                continue;
            }
            let prog: &mut aya::programs::BtfTracePoint = bpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} is missing from flowtel's TCP object"))?
                .try_into()
                .map_err(|e| anyhow!("program {name}: {e}"))?;
            prog.load(tracepoint, &btf).map_err(|e| {
                anyhow!(
                    "loading {name} for tracepoint {tracepoint} failed: {e} (needs CAP_BPF and \
                     CAP_PERFMON, and a kernel with BTF tracepoints, 5.5+)"
                )
            })?;
            prog.attach()
                .map_err(|e| anyhow!("attaching {name} to tracepoint {tracepoint} failed: {e}"))?;
        }
        let take = |bpf: &mut aya::Ebpf, name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| anyhow!("map `{name}` is missing from flowtel's TCP object"))
        };
        let events = if tcp.enabled {
            Some(
                RingBuf::try_from(take(&mut bpf, "tcp_events")?)
                    .map_err(|e| anyhow!("map tcp_events: {e}"))?,
            )
        } else {
            None
        };
        let socks = if tcp.enabled {
            Some(
                aya::maps::HashMap::try_from(take(&mut bpf, "socks")?)
                    .map_err(|e| anyhow!("map socks: {e}"))?,
            )
        } else {
            None
        };
        let drops_map = if drops.enabled {
            Some(maps::EpochMaps::take(
                &mut bpf,
                ["drops_a", "drops_b"],
                "drop_epoch",
            )?)
        } else {
            None
        };
        let lost = aya::maps::PerCpuArray::try_from(take(&mut bpf, "lost")?)
            .map_err(|e| anyhow!("map lost: {e}"))?;
        // Resolve the drop reason names now, so a problem shows at start.
        drop_reason_name(0);
        Ok(Some(Health {
            _bpf: bpf,
            events,
            socks,
            drops: drops_map,
            lost,
            possible_cpus,
            memo: HashMap::new(),
            local_clients: HashMap::new(),
            lost_seen: [0; 3],
            stats,
            self_stats,
        }))
    }

    /// Handles every connection event waiting in the ring buffer.
    /// Sends the connection events the ring buffer holds; `nat` gives a
    /// client's span the backend its NAT'ed connection reached.
    pub(crate) fn poll(&mut self, out: &Out, nat: Option<&NatTable>) -> Result<(), Halt> {
        let mut batch = Vec::new();
        if let Some(ring) = self.events.as_mut() {
            while let Some(item) = ring.next() {
                if item.len() < std::mem::size_of::<RawEvent>() {
                    self.self_stats.parse_errors.inc();
                    continue;
                }
                // SAFETY: the length was checked; RawEvent is plain data
                // and read_unaligned copes with the ring's 8-byte alignment.
                batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RawEvent>()) });
            }
        }
        for raw in &batch {
            self.on_event(raw, out, nat)?;
        }
        Ok(())
    }

    fn on_event(&mut self, raw: &RawEvent, out: &Out, nat: Option<&NatTable>) -> Result<(), Halt> {
        let Some(id) = raw.s.flow_id() else {
            self.self_stats.parse_errors.inc();
            return Ok(());
        };
        let send = |kind| out.send(SourceEvent::Tcp(TcpEvent { id, kind }));
        match raw.kind {
            EV_OPENED => {
                let counted = self.speaks_for(raw.sk, &raw.s, &id);
                let memo = self.memo.entry(raw.sk).or_insert(SockMemo {
                    id,
                    counted,
                    retransmits: raw.s.retransmits,
                    rtt_updates: raw.s.rtt_updates,
                });
                memo.counted = counted;
                if counted {
                    send(TcpEventKind::Opened)?;
                }
            }
            EV_CLOSED | EV_FAILED => {
                tracing::trace!(
                    kind = raw.kind,
                    oldstate = raw.oldstate,
                    flags = raw.s.rst,
                    %id.client,
                    %id.server,
                    "TCP socket closed"
                );
                let memo = self.memo.remove(&raw.sk);
                let id = memo.map_or(id, |m| m.id);
                let counted = match memo {
                    Some(m) => m.counted,
                    None => self.speaks_for(raw.sk, &raw.s, &id),
                };
                if self.local_clients.get(&id) == Some(&raw.sk) {
                    self.local_clients.remove(&id);
                }
                if let Some(mut end) = connection_end(raw, id) {
                    end.nat = nat.map_or_else(Nat::default, |t| translation_of(t, &end));
                    out.send(SourceEvent::Connection(end))?;
                }
                let send = |kind| out.send(SourceEvent::Tcp(TcpEvent { id, kind }));
                // Retransmits not reported yet; for a socket that predates
                // flowtel and was never seen, its history is not ours.
                let already = match memo {
                    Some(m) => m.retransmits,
                    None if raw.s.open_ns == 0 => raw.s.retransmits,
                    None => 0,
                };
                let fresh = raw.s.retransmits.saturating_sub(already);
                if fresh > 0 {
                    send(TcpEventKind::Retransmits(u64::from(fresh)))?;
                }
                if !counted {
                    return Ok(());
                }
                if raw.kind == EV_FAILED {
                    let cause = if raw.s.rst & RST_RECEIVED != 0 {
                        TcpFailure::Refused
                    } else {
                        TcpFailure::NoAnswer
                    };
                    return send(TcpEventKind::Failed(cause));
                }
                let rtt_fresh = memo.is_none_or(|m| m.rtt_updates != raw.s.rtt_updates);
                if raw.s.srtt_us > 0 && rtt_fresh {
                    send(TcpEventKind::Rtt(Duration::from_micros(u64::from(
                        raw.s.srtt_us,
                    ))))?;
                }
                let cause = close_cause(raw.s.rst);
                let duration = (raw.s.open_ns != 0)
                    .then(|| Duration::from_nanos(raw.ts_ns.saturating_sub(raw.s.open_ns)));
                send(TcpEventKind::Closed { cause, duration })?;
            }
            _ => self.self_stats.parse_errors.inc(),
        }
        Ok(())
    }

    /// Whether this socket reports its connection's opens, closes and RTT:
    /// a client always; a server only when the client is not on this node.
    fn speaks_for(&mut self, sk: u64, s: &SockState, id: &FlowId) -> bool {
        if s.role == ROLE_CLIENT {
            self.local_clients.insert(*id, sk);
            return true;
        }
        !self.local_clients.contains_key(id)
    }

    /// Reports retransmits and RTT of the live sockets, the drops summed
    /// since the last dump, and what the kernel could not record.
    pub(crate) fn dump(&mut self, out: &Out, nat: Option<&NatTable>) -> Result<(), Halt> {
        self.poll(out, nat)?;
        self.dump_sockets(out)?;
        self.dump_drops(out)?;
        self.read_lost();
        Ok(())
    }

    fn dump_sockets(&mut self, out: &Out) -> Result<(), Halt> {
        let Some(socks) = self.socks.as_mut() else {
            return Ok(());
        };
        let mut live = Vec::new();
        for item in socks.iter() {
            match item {
                Ok((sk, s)) => live.push((sk, s)),
                Err(e) => {
                    tracing::warn!("reading the TCP socket map failed: {e}");
                    break;
                }
            }
        }
        // `socks` is bounded by max_sockets (refusals are counted); this
        // sweep removes what the kernel can no longer remove itself.
        let now = super::monotonic_ns();
        let mut swept = 0;
        for (sk, _) in live.iter().filter(|(_, s)| half_open_stale(s, now)) {
            if socks.remove(sk).is_ok() {
                swept += 1;
            }
        }
        self.stats.sockets_swept.fetch_add(swept, Ordering::Relaxed);
        self.stats
            .sockets_tracked
            .store(live.len() as u64 - swept, Ordering::Relaxed);
        let mut present = HashSet::with_capacity(live.len());
        for (sk, s) in live {
            if s.established == 0 || !present.insert(sk) {
                continue;
            }
            let memo = match self.memo.get(&sk) {
                Some(m) => *m,
                None => {
                    let Some(id) = s.flow_id() else {
                        continue;
                    };
                    let counted = self.speaks_for(sk, &s, &id);
                    SockMemo {
                        id,
                        counted,
                        // A socket older than flowtel: its past is not ours.
                        retransmits: if s.open_ns == 0 { s.retransmits } else { 0 },
                        rtt_updates: 0,
                    }
                }
            };
            let mut next = memo;
            if s.retransmits > memo.retransmits {
                next.retransmits = s.retransmits;
                out.send(SourceEvent::Tcp(TcpEvent {
                    id: memo.id,
                    kind: TcpEventKind::Retransmits(u64::from(s.retransmits - memo.retransmits)),
                }))?;
            }
            if s.rtt_updates != memo.rtt_updates && s.srtt_us > 0 {
                next.rtt_updates = s.rtt_updates;
                if memo.counted {
                    out.send(SourceEvent::Tcp(TcpEvent {
                        id: memo.id,
                        kind: TcpEventKind::Rtt(Duration::from_micros(u64::from(s.srtt_us))),
                    }))?;
                }
            }
            self.memo.insert(sk, next);
        }
        // Sockets gone without a close event (the ring buffer was full).
        self.memo.retain(|sk, _| present.contains(sk));
        self.local_clients.retain(|_, sk| present.contains(sk));
        Ok(())
    }

    fn dump_drops(&mut self, out: &Out) -> Result<(), Halt> {
        let Some(maps) = self.drops.as_mut() else {
            return Ok(());
        };
        let map = match maps.flip() {
            Ok(map) => map,
            Err(e) => {
                tracing::warn!("drops are read at the next dump: {e}");
                return Ok(());
            }
        };
        let aya::maps::Map::PerCpuHashMap(data) = map else {
            tracing::warn!("the drop map is not a per-CPU hash map");
            return Ok(());
        };
        let view: aya::maps::PerCpuHashMap<&MapData, RawDropKey, RawDropValue> =
            match map.try_into() {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("the drop map cannot be read: {e}");
                    return Ok(());
                }
            };
        let keys: Vec<RawDropKey> = view.keys().filter_map(Result::ok).collect();
        for key in keys {
            // No program writes this map any more: read and remove.
            let values: Vec<RawDropValue> = match maps::take_percpu(data, &key, self.possible_cpus)
            {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("removing a drop record from the kernel map failed: {e}");
                    return Ok(());
                }
            };
            let counters = values.iter().fold(Counters::default(), |mut c, v| {
                c.add(Counters::new(v.bytes, v.packets));
                c
            });
            let src = address(key.family, &key.src).map(|ip| Endpoint::new(ip, key.sport));
            let dst = address(key.family, &key.dst).map(|ip| Endpoint::new(ip, key.dport));
            out.send(SourceEvent::Drop(DropRecord {
                reason: drop_reason_name(key.reason),
                transport: Transport::from_protocol(key.proto),
                src,
                dst,
                counters,
            }))?;
        }
        Ok(())
    }

    fn read_lost(&mut self) {
        let counters = [
            (LOST_EVENTS, &self.stats.events_lost),
            (LOST_SOCKS, &self.stats.sockets_untracked),
            (LOST_DROPS, &self.stats.drops_unrecorded),
        ];
        for (index, counter) in counters {
            match self.lost.get(&index, 0) {
                Ok(values) => {
                    let total = values.iter().fold(0u64, |t, v| t.saturating_add(*v));
                    let slot = &mut self.lost_seen[index as usize];
                    let fresh = total.saturating_sub(*slot);
                    *slot = total;
                    counter.store(total, Ordering::Relaxed);
                    if fresh > 0 {
                        let what = match index {
                            LOST_EVENTS => "TCP connection events were lost (ring buffer full)",
                            LOST_SOCKS => {
                                "TCP sockets could not be followed; raise ebpf.tcp.max_sockets"
                            }
                            _ => "dropped packets were not recorded; raise ebpf.drops.max_entries",
                        };
                        tracing::warn!(count = fresh, "{fresh} {what}");
                    }
                }
                Err(e) => tracing::warn!("reading the eBPF loss counters failed: {e}"),
            }
        }
    }
}

/// The running kernel's name for a drop reason, e.g. `NETFILTER_DROP`, read
/// from its BTF (`enum skb_drop_reason`): the numbers differ between kernel
/// versions, so a table built into flowtel would lie.
pub fn drop_reason_name(reason: u32) -> &'static str {
    static NAMES: OnceLock<HashMap<u32, String>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        match std::fs::read(KERNEL_BTF)
            .map_err(|e| e.to_string())
            .and_then(|data| btf::enum_members(&data, "skb_drop_reason"))
        {
            Ok(members) => members
                .into_iter()
                .map(|(name, value)| {
                    let short = name
                        .strip_prefix("SKB_DROP_REASON_")
                        .or_else(|| name.strip_prefix("SKB_"))
                        .unwrap_or(&name)
                        .to_string();
                    (value, short)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(
                    "drop reasons are reported as UNKNOWN: enum skb_drop_reason could not be read \
                     from {KERNEL_BTF}: {e}"
                );
                HashMap::new()
            }
        }
    });
    names.get(&reason).map_or("UNKNOWN", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every mirror against the struct's BTF in the compiled `tcp.bpf.o`.
    #[test]
    #[cfg(not(flowtel_no_ebpf))]
    fn layouts_match_the_compiled_object() {
        use crate::source::ebpf::btf::assert_mirrors;
        #[rustfmt::skip]
        assert_mirrors!(OBJECT, "ft_sock", SockState, [laddr, raddr, lport, rport, family, role,
            rst, established, open_ns, retransmits, srtt_us, rtt_updates, isn_local, isn_remote,
            bytes_out, bytes_in, segs_out, segs_in, tcp_hdr_len, isn_known, pad]);
        assert_mirrors!(
            OBJECT,
            "ft_tcp_event",
            RawEvent,
            [s, sk, ts_ns, kind, oldstate, pad]
        );
        #[rustfmt::skip]
        assert_mirrors!(OBJECT, "ft_drop_key", RawDropKey, [src, dst, sport, dport, reason, proto,
            family, pad]);
        assert_mirrors!(OBJECT, "ft_drop_val", RawDropValue, [packets, bytes]);
    }

    #[test]
    fn half_open_sockets_are_swept_after_five_minutes() {
        let min = 60_000_000_000u64;
        let opening = SockState {
            open_ns: 10 * min,
            ..SockState::default()
        };
        assert!(!half_open_stale(&opening, 14 * min));
        assert!(half_open_stale(&opening, 16 * min));
        let open = SockState {
            established: 1,
            ..opening
        };
        assert!(!half_open_stale(&open, 100 * min), "open sockets stay");
        let unknown = SockState {
            open_ns: 0,
            ..SockState::default()
        };
        assert!(!half_open_stale(&unknown, 100 * min));
    }

    #[test]
    fn socket_orientation_follows_its_role() {
        let mut s = SockState {
            family: 4,
            lport: 40_000,
            rport: 80,
            role: ROLE_SERVER,
            ..SockState::default()
        };
        s.laddr[..4].copy_from_slice(&[198, 18, 0, 1]);
        s.raddr[..4].copy_from_slice(&[198, 18, 0, 2]);
        let id = s.flow_id().expect("valid");
        assert_eq!(id.server.port, 40_000, "a server socket is the server");
        s.role = ROLE_CLIENT;
        assert_eq!(s.flow_id().expect("valid").server.port, 80);
        s.role = 0;
        assert_eq!(s.flow_id().expect("valid").server.port, 80, "lower port");
        s.family = 9;
        assert!(s.flow_id().is_none(), "unknown family is refused");
    }

    #[test]
    fn v4_mapped_addresses_become_ipv4() {
        let mut b = [0u8; 16];
        b[10] = 0xff;
        b[11] = 0xff;
        b[12..].copy_from_slice(&[198, 18, 0, 9]);
        assert_eq!(
            address(6, &b),
            Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)))
        );
    }

    #[test]
    fn this_kernel_names_its_drop_reasons() {
        if !std::path::Path::new(KERNEL_BTF).exists() {
            return;
        }
        let data = std::fs::read(KERNEL_BTF).expect("readable");
        let members = btf::enum_members(&data, "skb_drop_reason").expect("found");
        assert!(members
            .iter()
            .any(|(n, _)| n == "SKB_DROP_REASON_NETFILTER_DROP"));
    }
}
