//! The topology, traffic and checks shared by the end-to-end tests.
//!
//! Namespace A (client, conntrack with accounting on, read by flowtel) and
//! namespace B (server) are joined by one veth pair that carries nothing but
//! the test's traffic. A also DNATs the VIP 198.18.100.1:80 to B:8080 in its
//! output chain. Every connection starts in A, so flowtel's
//! `client_to_server` total must equal what A's veth sent and
//! `server_to_client` what it received (L3 bytes: the veth counters less 14
//! Ethernet bytes a packet).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::flowtel::{intervals_after, Health};
use super::netns::{IfStats, Netns, NetnsGuard, VethEnd};
use super::otlp_receiver::{total_where, AttrValue, Attrs, SumPoint};
use super::traffic::{self, Payload};
use super::{deviation_pct, within, Prerequisites};

pub const BYTES: &str = "flowtel.flow.bytes";
pub const PACKETS: &str = "flowtel.flow.packets";
pub const DIRECTION: &str = "flowtel.flow.direction";
pub const C2S: &str = "client_to_server";
pub const S2C: &str = "server_to_client";

pub const A_V4: &str = "198.18.0.1";
pub const B_V4: &str = "198.18.0.2";
pub const A_V6: &str = "fd00::1";
pub const B_V6: &str = "fd00::2";
pub const VIP: &str = "198.18.100.1";
pub const VIP_PORT: u16 = 80;
pub const NAT_BACKEND_PORT: u16 = 8080;
pub const TCP4_PORT: u16 = 5001;
pub const TCP6_PORT: u16 = 5002;
pub const UDP4_PORT: u16 = 5003;
pub const UDP6_PORT: u16 = 5004;
pub const SHORT_PORT: u16 = 9000;
pub const IF_A: &str = "ftA";
pub const IF_B: &str = "ftB";

/// Tolerance of the totals against the interface counters.
pub const TOTAL_TOLERANCE: f64 = 0.02;

/// A (client) and B (server), cleaned up on drop.
pub struct Lab {
    pub a: Netns,
    pub b: Netns,
    // Last: dropped after the handles above are no longer needed.
    pub guard: NetnsGuard,
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("literal address"), port)
}

impl Lab {
    pub fn new(tools: &Prerequisites) -> anyhow::Result<Lab> {
        let mut guard = NetnsGuard::new(tools);
        let a = guard.add("a")?;
        let b = guard.add("b")?;
        let ea = VethEnd {
            ifname: IF_A.into(),
            mac: "02:00:00:00:00:0a".into(),
            v4: format!("{A_V4}/24"),
            v6: format!("{A_V6}/64"),
        };
        let eb = VethEnd {
            ifname: IF_B.into(),
            mac: "02:00:00:00:00:0b".into(),
            v4: format!("{B_V4}/24"),
            v6: format!("{B_V6}/64"),
        };
        guard.veth(&a, &ea, &b, &eb)?;
        guard.enable_conntrack(&a)?;
        guard.nft(
            &a,
            "ip",
            "ft_nat",
            &format!(
                "chain out {{\n  type nat hook output priority -100; policy accept;\n  \
                 ip daddr {VIP} tcp dport {VIP_PORT} dnat to {B_V4}:{NAT_BACKEND_PORT}\n}}"
            ),
        )?;
        a.ip(&["route", "add", &format!("{VIP}/32"), "via", B_V4])?;
        // Closed connections leave the table a second after their end (as on
        // a busy node), so they are counted through DESTROY events rather
        // than lingering for the default two minutes.
        a.sysctl("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")?;
        Ok(Lab { a, b, guard })
    }

    /// A's veth counters.
    pub fn counters(&self) -> anyhow::Result<IfStats> {
        self.a.if_stats(IF_A)
    }

    /// Serves every port the flows use, in B.
    pub fn servers(&self) -> anyhow::Result<traffic::TrafficServer> {
        traffic::TrafficServer::start(
            &self.b,
            &[
                sock(B_V4, TCP4_PORT),
                sock(B_V6, TCP6_PORT),
                sock(B_V4, NAT_BACKEND_PORT),
                sock(B_V4, SHORT_PORT),
            ],
            &[sock(B_V4, UDP4_PORT), sock(B_V6, UDP6_PORT)],
        )
    }
}

/// What kind of traffic a flow carries, which sets its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One long connection: bytes within payload .. payload * 1.06 + 10 KB.
    Bulk,
    /// Many short connections to one port: handshakes and teardowns weigh
    /// more than 6 % of 1 KB, so the upper bound is per packet instead.
    Short,
}

/// One flow (series) the test expects, and what crossed in it.
#[derive(Debug, Clone)]
pub struct Flow {
    pub name: &'static str,
    pub kind: Kind,
    pub transport: &'static str,
    pub network_type: &'static str,
    pub client: &'static str,
    /// As the client addressed it (the VIP for the NAT'ed flow).
    pub server: &'static str,
    pub port: u16,
    /// The backend behind the VIP.
    pub nat: Option<(&'static str, u16)>,
    pub payload: Payload,
    /// TCP segments A and B retransmitted while the flow ran: a busy
    /// machine drops on the veth backlog, and retransmitted data is counted
    /// again, as it crossed again.
    pub retransmitted: (u64, u64),
}

impl Flow {
    /// The most L3+L4 header bytes one packet of this flow carries.
    fn max_header(&self) -> u64 {
        match (self.transport, self.network_type) {
            ("tcp", "ipv4") => 20 + 60,
            ("tcp", _) => 40 + 60,
            ("udp", "ipv4") => 20 + 8,
            _ => 40 + 8,
        }
    }

    /// The attributes flowtel must put on this flow's series (direction
    /// aside).
    pub fn attrs(&self, direction: &str) -> Attrs {
        let s = |v: &str| AttrValue::Str(v.to_string());
        let mut a = Attrs::new();
        a.insert("client.address".into(), s(self.client));
        a.insert("server.address".into(), s(self.server));
        a.insert("server.port".into(), AttrValue::Int(self.port.into()));
        a.insert("network.transport".into(), s(self.transport));
        a.insert("network.type".into(), s(self.network_type));
        a.insert("flowtel.source".into(), s("conntrack"));
        a.insert(DIRECTION.into(), s(direction));
        if let Some((ip, port)) = self.nat {
            a.insert("flowtel.nat.server.address".into(), s(ip));
            a.insert(
                "flowtel.nat.server.port".into(),
                AttrValue::Int(port.into()),
            );
        }
        a
    }
}

fn flow(
    name: &'static str,
    kind: Kind,
    transport: &'static str,
    v6: bool,
    port: u16,
    payload: Payload,
) -> Flow {
    Flow {
        name,
        kind,
        transport,
        network_type: if v6 { "ipv6" } else { "ipv4" },
        client: if v6 { A_V6 } else { A_V4 },
        server: if v6 { B_V6 } else { B_V4 },
        port,
        nat: None,
        payload,
        retransmitted: (0, 0),
    }
}

/// How much traffic of each kind to make.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub tcp4: Option<(u64, u64)>,
    pub tcp6: Option<(u64, u64)>,
    pub nat: Option<(u64, u64)>,
    /// (requests, bytes up, bytes down)
    pub udp4: Option<(u64, usize, usize)>,
    pub udp6: Option<(u64, usize, usize)>,
    /// (connections, bytes up, bytes down, batches): the connections are
    /// made in batches 400 ms apart, so their conntrack entries expire at
    /// different times.
    pub short: Option<(u64, u64, u64, u64)>,
}

/// Makes the planned traffic from A, one flow after the other; returns the
/// flows with the payload that crossed.
pub fn run(lab: &Lab, plan: &Plan) -> anyhow::Result<Vec<Flow>> {
    let before = (
        retransmitted_segments(&lab.a)?,
        retransmitted_segments(&lab.b)?,
    );
    let mut flows = run_flows(lab, plan)?;
    // Which flow retransmitted cannot be told apart: each TCP flow may
    // have carried all of it.
    let retransmitted = (
        retransmitted_segments(&lab.a)?.saturating_sub(before.0),
        retransmitted_segments(&lab.b)?.saturating_sub(before.1),
    );
    if retransmitted != (0, 0) {
        println!(
            "TCP segments retransmitted during the traffic: A {}, B {}",
            retransmitted.0, retransmitted.1
        );
    }
    for f in flows.iter_mut().filter(|f| f.transport == "tcp") {
        f.retransmitted = retransmitted;
    }
    Ok(flows)
}

/// `RetransSegs` of the namespace's TCP MIB (IPv4 and IPv6 together).
pub fn retransmitted_segments(ns: &Netns) -> anyhow::Result<u64> {
    let snmp = ns.run("cat", &["/proc/net/snmp"])?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        anyhow::bail!("no Tcp lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no RetransSegs in /proc/net/snmp"))
}

fn run_flows(lab: &Lab, plan: &Plan) -> anyhow::Result<Vec<Flow>> {
    let a = &lab.a;
    let mut flows = Vec::new();
    if let Some((up, down)) = plan.tcp4 {
        let p = traffic::tcp_connections(a, sock(B_V4, TCP4_PORT), 1, up, down)?;
        flows.push(flow("tcp4", Kind::Bulk, "tcp", false, TCP4_PORT, p));
    }
    if let Some((up, down)) = plan.tcp6 {
        let p = traffic::tcp_connections(a, sock(B_V6, TCP6_PORT), 1, up, down)?;
        flows.push(flow("tcp6", Kind::Bulk, "tcp", true, TCP6_PORT, p));
    }
    if let Some((n, up, down)) = plan.udp4 {
        let p = traffic::udp_exchange(a, sock(B_V4, UDP4_PORT), n, up, down)?;
        flows.push(flow("udp4", Kind::Bulk, "udp", false, UDP4_PORT, p));
    }
    if let Some((n, up, down)) = plan.udp6 {
        let p = traffic::udp_exchange(a, sock(B_V6, UDP6_PORT), n, up, down)?;
        flows.push(flow("udp6", Kind::Bulk, "udp", true, UDP6_PORT, p));
    }
    if let Some((up, down)) = plan.nat {
        let p = traffic::tcp_connections(a, sock(VIP, VIP_PORT), 1, up, down)?;
        let mut f = flow("nat", Kind::Bulk, "tcp", false, VIP_PORT, p);
        f.server = VIP;
        f.nat = Some((B_V4, NAT_BACKEND_PORT));
        flows.push(f);
    }
    if let Some((n, up, down, batches)) = plan.short {
        let batches = batches.clamp(1, n.max(1));
        let mut p = Payload::default();
        for batch in 0..batches {
            if batch > 0 {
                std::thread::sleep(Duration::from_millis(400));
            }
            let count = n / batches + u64::from(batch < n % batches);
            let started = Instant::now();
            p.add(traffic::tcp_connections(
                a,
                sock(B_V4, SHORT_PORT),
                count,
                up,
                down,
            )?);
            println!(
                "{count} short connections to port {SHORT_PORT} took {:?}",
                started.elapsed()
            );
        }
        flows.push(flow("short", Kind::Short, "tcp", false, SHORT_PORT, p));
    }
    Ok(flows)
}

/// Adds flows of the same series (same name) together.
pub fn merge(flows: impl IntoIterator<Item = Flow>) -> Vec<Flow> {
    let mut out: Vec<Flow> = Vec::new();
    for f in flows {
        match out.iter_mut().find(|o| o.name == f.name) {
            Some(o) => {
                o.payload.add(f.payload);
                o.retransmitted.0 += f.retransmitted.0;
                o.retransmitted.1 += f.retransmitted.1;
            }
            None => out.push(f),
        }
    }
    out
}

/// Bytes and packets per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub c2s_bytes: u64,
    pub c2s_packets: u64,
    pub s2c_bytes: u64,
    pub s2c_packets: u64,
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client_to_server {} B / {} pkts, server_to_client {} B / {} pkts",
            self.c2s_bytes, self.c2s_packets, self.s2c_bytes, self.s2c_packets
        )
    }
}

impl Totals {
    /// What A's veth carried between two readings, at L3.
    pub fn from_counters(before: &IfStats, after: &IfStats) -> Totals {
        let d = after.since(before);
        Totals {
            c2s_bytes: d.tx_l3_bytes(),
            c2s_packets: d.tx_packets,
            s2c_bytes: d.rx_l3_bytes(),
            s2c_packets: d.rx_packets,
        }
    }
}

/// The newest series of flowtel's two flow metrics.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub bytes: BTreeMap<Attrs, SumPoint>,
    pub packets: BTreeMap<Attrs, SumPoint>,
}

impl Series {
    pub fn from_points(points: &[SumPoint]) -> Series {
        Series {
            bytes: super::otlp_receiver::latest(points, BYTES),
            packets: super::otlp_receiver::latest(points, PACKETS),
        }
    }

    /// The series whose client is one of `clients` (A's veth addresses).
    pub fn of_clients(points: &[SumPoint], clients: &[&str]) -> Series {
        let mut s = Series::from_points(points);
        let keep = |attrs: &Attrs| matches!(attrs.get("client.address"), Some(AttrValue::Str(c)) if clients.contains(&c.as_str()));
        s.bytes.retain(|a, _| keep(a));
        s.packets.retain(|a, _| keep(a));
        s
    }

    /// The values of `flowtel.source` on the series.
    pub fn sources(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .bytes
            .keys()
            .filter_map(|a| match a.get("flowtel.source") {
                Some(AttrValue::Str(s)) => Some(s.clone()),
                _ => None,
            })
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Sums over all series, per direction.
    pub fn totals(&self) -> Totals {
        Totals {
            c2s_bytes: total_where(&self.bytes, DIRECTION, C2S),
            c2s_packets: total_where(&self.packets, DIRECTION, C2S),
            s2c_bytes: total_where(&self.bytes, DIRECTION, S2C),
            s2c_packets: total_where(&self.packets, DIRECTION, S2C),
        }
    }

    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (attrs, p) in &self.bytes {
            let packets = self.packets.get(attrs).map(|p| p.value).unwrap_or(0);
            out.push_str(&format!(
                "  {} B, {packets} pkts  {}\n",
                p.value,
                super::otlp_receiver::show(attrs)
            ));
        }
        out
    }
}

/// Waits until the receiving end holds everything flowtel counted before
/// this call ([`Health::wait_until_shown`]: a dump begun after the call,
/// applied, and an interval that ended after it, in what `read` returns),
/// and returns that. `read` gives the flow series as the receiving end (the
/// test receiver, a collector) holds them. Panics if flowtel exits or stops
/// dumping; if nothing newer shows within `timeout`, returns the last series
/// (the assertions then show what is missing).
pub fn wait_exported(
    what: &str,
    flowtel: &impl Health,
    timeout: Duration,
    mut read: impl FnMut() -> Series,
) -> Series {
    let started = Instant::now();
    let mut last = Series::default();
    let shown = flowtel
        .wait_until_shown(1, timeout, |at| {
            last = read();
            intervals_after(last.bytes.values(), at)
        })
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    if shown {
        println!(
            "{what}: exported, {:?} after the traffic: {}",
            started.elapsed(),
            last.totals()
        );
    } else {
        println!(
            "{what}: no interval after the traffic within {timeout:?}; checking the last \
             numbers: {}",
            last.totals()
        );
    }
    last
}

/// Asserts flowtel's totals per direction against the interface counters.
pub fn check_totals(what: &str, got: &Totals, truth: &Totals, series: &Series) {
    let rows = [
        (C2S, "bytes", got.c2s_bytes, truth.c2s_bytes),
        (C2S, "packets", got.c2s_packets, truth.c2s_packets),
        (S2C, "bytes", got.s2c_bytes, truth.s2c_bytes),
        (S2C, "packets", got.s2c_packets, truth.s2c_packets),
    ];
    for (direction, unit, g, t) in rows {
        println!(
            "{what}: {direction} {unit}: expected (veth) {t}, reported {g} ({:+.3} %)",
            deviation_pct(g, t)
        );
    }
    for (direction, unit, g, t) in rows {
        assert!(
            within(g, t, TOTAL_TOLERANCE),
            "{what}: {direction} {unit}: expected {t} (veth counters) ±{} %, flowtel reported {g} \
             ({:+.3} %)\nseries:\n{}",
            TOTAL_TOLERANCE * 100.0,
            deviation_pct(g, t),
            series.describe()
        );
    }
}

/// Asserts each flow's series: attributes, and bytes against its payload.
pub fn check_flows(what: &str, flows: &[Flow], series: &Series) {
    for f in flows {
        for (direction, payload, retransmitted) in [
            (C2S, f.payload.to_server, f.retransmitted.0),
            (S2C, f.payload.to_client, f.retransmitted.1),
        ] {
            let attrs = f.attrs(direction);
            let Some(bytes) = series.bytes.get(&attrs) else {
                panic!(
                    "{what}: flow {} has no {BYTES} series with attributes {}\nseries:\n{}",
                    f.name,
                    super::otlp_receiver::show(&attrs),
                    series.describe()
                );
            };
            let packets = series
                .packets
                .get(&attrs)
                .map(|p| p.value)
                .unwrap_or_else(|| {
                    panic!(
                        "{what}: flow {} has no {PACKETS} series {}",
                        f.name,
                        super::otlp_receiver::show(&attrs)
                    )
                });
            let got = bytes.value;
            // A retransmitted segment crosses again with at most an MTU.
            let resent = retransmitted * 1500;
            let (low, high) = match f.kind {
                Kind::Bulk => (payload, payload + payload * 6 / 100 + 10 * 1024 + resent),
                Kind::Short => (payload, payload + packets * f.max_header() + resent),
            };
            println!(
                "{what}: {} {direction}: payload {payload} B, reported {got} B in {packets} pkts \
                 (allowed {low}..={high})",
                f.name
            );
            assert!(
                (low..=high).contains(&got),
                "{what}: flow {} {direction}: expected {low}..={high} bytes (payload {payload}), \
                 flowtel reported {got} in {packets} packets",
                f.name
            );
            if f.kind == Kind::Short {
                let n = f.payload.exchanges;
                assert!(
                    (3 * n..=12 * n).contains(&packets),
                    "{what}: flow {} {direction}: expected {}..={} packets for {n} connections, \
                     flowtel reported {packets}",
                    f.name,
                    3 * n,
                    12 * n
                );
            }
        }
    }
}

/// Asserts what holds for every flow series: the metric's shape and a
/// start time that never moves (cumulative, no resets).
pub fn check_shape(what: &str, points: &[SumPoint]) {
    let mut starts: BTreeMap<(&str, &Attrs), (u64, u64)> = BTreeMap::new();
    for p in points
        .iter()
        .filter(|p| p.metric == BYTES || p.metric == PACKETS)
    {
        let unit = if p.metric == BYTES { "By" } else { "{packet}" };
        assert_eq!(p.unit, unit, "{what}: unit of {}", p.metric);
        assert!(p.monotonic, "{what}: {} must be monotonic", p.metric);
        assert_eq!(
            p.temporality,
            super::otlp_receiver::CUMULATIVE,
            "{what}: {} must be cumulative",
            p.metric
        );
        let entry = starts
            .entry((p.metric.as_str(), &p.attrs))
            .or_insert((p.start_unix_nano, 0));
        assert_eq!(
            entry.0,
            p.start_unix_nano,
            "{what}: the start time of {} {} moved (a counter reset)",
            p.metric,
            super::otlp_receiver::show(&p.attrs)
        );
        assert!(
            p.value >= entry.1,
            "{what}: {} {} went down from {} to {}",
            p.metric,
            super::otlp_receiver::show(&p.attrs),
            entry.1,
            p.value
        );
        entry.1 = entry.1.max(p.value);
    }
}

/// flowtel's own account must show that it saw every connection end: in
/// these tests every connection starts after flowtel subscribed to conntrack
/// events and no event is lost, so each end arrives as a DESTROY event. A
/// flow "ended unseen" here means flowtel dropped it from its table before
/// its DESTROY event was applied, and then counted that event's full
/// counters again (double counting).
pub fn check_self_stats(what: &str, stats: &serde_json::Value) {
    let get = |name: &str| stats.get(name).and_then(serde_json::Value::as_u64);
    let lost = get("events_lost");
    let unseen = get("flows_ended_unseen");
    assert_eq!(
        lost,
        Some(0),
        "{what}: expected no lost conntrack events, flowtel reports {lost:?} ({stats})"
    );
    assert_eq!(
        unseen,
        Some(0),
        "{what}: expected flows_ended_unseen 0 (every end was delivered as a DESTROY event), \
         flowtel reports {unseen:?}: it swept flows before applying their DESTROY events and \
         counted those events in full again ({stats})"
    );
}

/// The received-packet counters of the IP MIBs, one per ECN codepoint.
const IP_IN_FIELDS: [&str; 4] = ["InNoECTPkts", "InECT1Pkts", "InECT0Pkts", "InCEPkts"];

/// Wire packets `ns`'s IP layer received: IPv4 (`IpExt`), plus IPv6
/// (`Ip6`) when `v6`, summed over the four ECN codepoints. The kernel adds
/// `max(1, gso_segs)` per skb there, so these are GSO segments, as the eBPF
/// source counts them (the veth counts skbs).
pub fn ip_in_packets(ns: &Netns, v6: bool) -> u64 {
    let v4 = ip4_in_packets(ns);
    if !v6 {
        return v4;
    }
    v4 + ip6_in_packets(ns)
}

/// IPv4 wire packets `ns` received (`IpExt: In*Pkts` of
/// `/proc/net/netstat`); see [`ip_in_packets`].
pub fn ip4_in_packets(ns: &Netns) -> u64 {
    let netstat = ns
        .run("cat", &["/proc/net/netstat"])
        .expect("/proc/net/netstat");
    let lines: Vec<&str> = netstat
        .lines()
        .filter(|l| l.starts_with("IpExt:"))
        .collect();
    assert_eq!(lines.len(), 2, "IpExt lines in /proc/net/netstat");
    lines[0]
        .split_whitespace()
        .zip(lines[1].split_whitespace())
        .filter(|(n, _)| IP_IN_FIELDS.contains(n))
        .map(|(_, v)| v.parse::<u64>().expect("counter is a number"))
        .sum()
}

/// IPv6 wire packets `ns` received (`Ip6In*Pkts` of `/proc/net/snmp6`);
/// see [`ip_in_packets`].
pub fn ip6_in_packets(ns: &Netns) -> u64 {
    let snmp6 = ns
        .run("cat", &["/proc/net/snmp6"])
        .expect("/proc/net/snmp6");
    snmp6
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.strip_prefix("Ip6")?;
            IP_IN_FIELDS
                .contains(&name)
                .then(|| it.next()?.parse::<u64>().ok())?
        })
        .sum()
}

/// Asserts the eBPF source's totals within 1 % per direction: bytes against
/// A's veth (L3), packets against the receiving IP layers (`b_in` for
/// client to server, `a_in` for server to client; see [`ip_in_packets`]).
pub fn check_wire_totals(what: &str, series: &Series, veth: &Totals, a_in: u64, b_in: u64) {
    let got = series.totals();
    let rows = [
        (
            "client_to_server bytes",
            got.c2s_bytes,
            veth.c2s_bytes,
            "veth tx L3",
        ),
        (
            "server_to_client bytes",
            got.s2c_bytes,
            veth.s2c_bytes,
            "veth rx L3",
        ),
        ("client_to_server packets", got.c2s_packets, b_in, "B IP in"),
        ("server_to_client packets", got.s2c_packets, a_in, "A IP in"),
    ];
    for (row, g, t, basis) in rows {
        println!(
            "{what}: {row}: expected ({basis}) {t}, reported {g} ({:+.3} %)",
            deviation_pct(g, t)
        );
    }
    for (row, g, t, basis) in rows {
        assert!(
            within(g, t, 0.01),
            "{what}: {row}: expected {t} ({basis}) ±1 %, flowtel reported {g} ({:+.3} %)\n{}",
            deviation_pct(g, t),
            series.describe()
        );
    }
}
