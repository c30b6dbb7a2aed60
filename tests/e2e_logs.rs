//! OTLP log events end to end: traffic between two namespaces, the real
//! flowtel binary (`--source ebpf --netns A`), and the log records it sends
//! to the test receiver (gRPC) and to rotel, a real collector (HTTP).
//!
//! Namespace A (client) and B (server) are joined by one veth pair that
//! carries nothing but the test's traffic, so the flow records' bytes,
//! summed, must equal A's veth counters (L3). A's nftables drops UDP to one
//! port, which the kernel reports as drops with reason `NETFILTER_DROP`.
//!
//! Needs root, `ip`, `nft`, rotel and a binary built with eBPF on a kernel
//! with BTF. Missing → skipped with the reason ([`common::skip`]), or a
//! failure under `CI`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::flowtel::{intervals_after, Flowtel, FlowtelArgs, Health};
use common::netns::{Netns, NetnsGuard, VethEnd};
use common::otlp_receiver::{AttrValue, LogEvent, OtlpReceiver};
use common::rotel::Rotel;
use common::traffic::{self, TrafficServer};

const A_V4: &str = "198.18.8.1";
const B_V4: &str = "198.18.8.2";
const IF_A: &str = "ftlgA";
const IF_B: &str = "ftlgB";
const TCP_PORT: u16 = 5001;
const UDP_PORT: u16 = 5003;
const CLOSED_PORT: u16 = 5555;
const DROPPED_PORT: u16 = 9998;
const SHORT: u64 = 5;
const UDP_DROPPED: u64 = 10;
/// Upper bounds (not pacing) for what the tests wait for.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(30);
const ENDED_TIMEOUT: Duration = Duration::from_secs(30);
/// Severity numbers of the OpenTelemetry log data model.
const INFO: i32 = 9;
const WARN: i32 = 13;

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal address"), port)
}

/// A and B joined by a veth pair, B serving TCP and UDP, A dropping UDP to
/// `DROPPED_PORT`. The guard removes everything on drop.
struct Topology {
    a: Netns,
    b: Netns,
    guard: NetnsGuard,
}

impl Topology {
    fn new(tools: &common::Prerequisites, tag: &str) -> Topology {
        let mut guard = NetnsGuard::new(tools);
        let a = guard.add(&format!("{tag}a")).expect("namespace A");
        let b = guard.add(&format!("{tag}b")).expect("namespace B");
        let end = |ifname: &str, mac: &str, v4: &str, v6: &str| VethEnd {
            ifname: ifname.into(),
            mac: mac.into(),
            v4: format!("{v4}/24"),
            v6: format!("{v6}/64"),
        };
        guard
            .veth(
                &a,
                &end(IF_A, "02:00:00:00:08:0a", A_V4, "fd00:8::1"),
                &b,
                &end(IF_B, "02:00:00:00:08:0b", B_V4, "fd00:8::2"),
            )
            .expect("veth A-B");
        guard
            .nft(
                &a,
                "inet",
                "ft_logs_drop",
                &format!(
                    "chain out {{\n  type filter hook output priority 0; policy accept;\n  \
                     udp dport {DROPPED_PORT} drop\n}}"
                ),
            )
            .expect("nft drop rule in A");
        Topology { a, b, guard }
    }

    fn start_flowtel(&self, endpoint: &str, protocol: &str, env: Vec<(&str, String)>) -> Flowtel {
        let netns = self.a.path();
        let mut flowtel = Flowtel::start(&FlowtelArgs {
            source: "ebpf",
            netns: &netns,
            endpoint,
            protocol,
            interval: "1s",
            env,
        })
        .expect("starting flowtel");
        flowtel
            .wait_ready(Duration::from_secs(20))
            .expect("flowtel becomes ready");
        let log = flowtel.output();
        assert!(
            !log.contains("TCP health unavailable"),
            "the TCP health programs did not load:\n{log}"
        );
        assert!(
            log.contains("exporting OTLP log events"),
            "log events are not on:\n{log}"
        );
        flowtel
    }
}

/// From A: one aborted connection (reset), one refused connect and
/// `UDP_DROPPED` datagrams nftables drops. Returns how many connects were
/// refused.
fn resets_refusals_and_drops(a: &Netns) -> u64 {
    a.in_ns(|| -> std::io::Result<u64> {
        let s = TcpStream::connect_timeout(&addr(B_V4, TCP_PORT), Duration::from_secs(10))?;
        traffic::linger_zero(&s)?;
        // The server waits for a 16-byte header; it gets one and no more.
        (&s).write_all(&[0u8; 16])?;
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        let refused =
            match TcpStream::connect_timeout(&addr(B_V4, CLOSED_PORT), Duration::from_secs(10)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => 1,
                Err(e) => return Err(e),
                Ok(_) => 0,
            };
        let udp = UdpSocket::bind(addr(A_V4, 0))?;
        for _ in 0..UDP_DROPPED {
            // nft drops it in the output hook; the send may report EPERM.
            let _ = udp.send_to(&[0u8; 100], addr(B_V4, DROPPED_PORT));
        }
        Ok(refused)
    })
    .expect("entering A")
    .expect("client sockets in A")
}

fn events<'a>(all: &'a [LogEvent], name: &str) -> Vec<&'a LogEvent> {
    all.iter().filter(|e| e.event_name == name).collect()
}

fn int(e: &LogEvent, key: &str) -> u64 {
    e.int(key)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or_else(|| panic!("{key} missing or negative in {e:?}"))
}

/// The identity of a flow in its records.
fn tuple(e: &LogEvent) -> (String, String, Option<i64>, Option<i64>, String) {
    (
        e.str("network.transport").unwrap_or("").to_string(),
        e.str("source.address").unwrap_or("").to_string(),
        e.int("source.port"),
        e.int("destination.port"),
        e.str("destination.address").unwrap_or("").to_string(),
    )
}

fn describe(all: &[LogEvent]) -> String {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in all {
        *counts
            .entry((e.event_name.clone(), e.severity_text.clone()))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|((n, s), c)| format!("{n} {s}: {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The log records rotel shows once flowtel has exported everything it
/// counted before this call: flowtel applied a dump begun after the call,
/// and rotel printed the metrics of two intervals that ended after that (an
/// interval's records leave flowtel before the next interval's metrics do,
/// and rotel's batches, 200 ms by default, are shorter than an interval).
fn rotel_logs_shown(what: &str, flowtel: &Flowtel, rotel: &Rotel) -> Vec<LogEvent> {
    let shown = flowtel
        .wait_until_shown(2, EXPORT_TIMEOUT, |at| {
            intervals_after(&rotel.sum_points(), at)
        })
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert!(
        shown,
        "{what}: rotel printed no two intervals after the traffic within {EXPORT_TIMEOUT:?}:\n{}",
        flowtel.output()
    );
    let all = rotel.log_events();
    println!("{what}: {} log records", all.len());
    all
}

/// The events both runs must show: `served` connections to `TCP_PORT`
/// closed by FIN, one aborted by reset, `refused` connects refused and the
/// UDP datagrams nftables dropped, with their documented attributes and
/// severities; and the shape of every flow record.
fn check_events(what: &str, all: &[LogEvent], served: u64, refused: u64) {
    let opened = events(all, "flowtel.connection.opened");
    let closed = events(all, "flowtel.connection.closed");
    let failed = events(all, "flowtel.connection.failed");
    let drops = events(all, "flowtel.packet.dropped");
    let to_served = |e: &&&LogEvent| {
        e.str("destination.address") == Some(B_V4)
            && e.int("destination.port") == Some(TCP_PORT.into())
    };
    assert!(
        opened.iter().filter(to_served).count() as u64 > served,
        "{what}: opened events (served + aborted)"
    );
    for e in opened.iter().chain(&closed).chain(&failed).chain(&drops) {
        assert_eq!(e.str("event.name"), Some(e.event_name.as_str()), "{e:?}");
        assert_eq!(e.str("flowtel.source"), Some("ebpf"), "{e:?}");
        assert!(
            e.str("network.transport").is_some() && e.str("source.address").is_some(),
            "{what}: endpoints in {e:?}"
        );
    }
    for e in &opened {
        assert_eq!(
            (e.severity_number, e.severity_text.as_str()),
            (INFO, "INFO")
        );
        assert_eq!(e.str("source.address"), Some(A_V4), "{e:?}");
    }
    let by_cause = |cause: &str| -> Vec<&&LogEvent> {
        closed
            .iter()
            .filter(|e| e.str("flowtel.tcp.close.cause") == Some(cause))
            .filter(to_served)
            .collect()
    };
    let fin = by_cause("fin");
    let reset = by_cause("reset");
    assert!(fin.len() as u64 >= served, "{what}: closed by FIN: {fin:?}");
    assert_eq!(reset.len(), 1, "{what}: closed by reset (SO_LINGER 0)");
    assert!(fin
        .iter()
        .all(|e| e.severity_number == INFO && e.severity_text == "INFO"));
    assert!(reset
        .iter()
        .all(|e| e.severity_number == WARN && e.severity_text == "WARN"));
    assert!(
        fin.iter()
            .all(|e| matches!(e.attrs.get("flowtel.tcp.connection.duration"), Some(common::otlp_receiver::AttrValue::Other(d)) if d.starts_with("Double("))),
        "{what}: closed connections carry their duration"
    );
    let refusals: Vec<_> = failed
        .iter()
        .filter(|e| {
            e.int("destination.port") == Some(CLOSED_PORT.into())
                && e.str("flowtel.tcp.failure") == Some("refused")
        })
        .collect();
    assert_eq!(refusals.len() as u64, refused, "{what}: refused connects");
    assert!(refusals
        .iter()
        .all(|e| e.severity_number == WARN && e.severity_text == "WARN"));
    let dropped: u64 = drops
        .iter()
        .filter(|e| {
            e.str("flowtel.drop.reason") == Some("NETFILTER_DROP")
                && e.str("network.transport") == Some("udp")
                && e.int("destination.port") == Some(DROPPED_PORT.into())
        })
        .map(|e| {
            assert_eq!(
                (e.severity_number, e.severity_text.as_str()),
                (WARN, "WARN")
            );
            assert!(e.int("flow.start") < e.int("flow.end"), "{e:?}");
            int(e, "flowtel.drop.packets")
        })
        .sum();
    assert_eq!(dropped, UDP_DROPPED, "{what}: packets nftables dropped");
    for e in events(all, "flowtel.flow") {
        assert_eq!(
            (e.severity_number, e.severity_text.as_str()),
            (INFO, "INFO")
        );
        for key in [
            "flow.io.bytes",
            "flow.io.packets",
            "flowtel.flow.reverse.io.bytes",
            "flowtel.flow.reverse.io.packets",
            "flow.start",
            "flow.end",
        ] {
            assert!(e.int(key).is_some(), "{what}: {key} in {e:?}");
        }
        assert_eq!(e.int("flow.sampling_rate"), Some(1));
        assert_eq!(e.str("network.type"), Some("ipv4"), "{e:?}");
        assert!(e.int("flow.start") < e.int("flow.end"), "{e:?}");
    }
}

#[test]
fn flow_records_and_events_match_the_traffic() {
    const TEST: &str = "flow_records_and_events_match_the_traffic";
    let Some((tools, _)) = common::prerequisites_with(TEST, &[], &common::ebpf_conditions()) else {
        return;
    };
    let topo = Topology::new(&tools, "lg");
    let receiver = OtlpReceiver::start().expect("test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let mut flowtel = topo.start_flowtel(
        &endpoint,
        "grpc",
        vec![
            ("FLOWTEL_EXPORT__LOGS__RATE_LIMIT", "0".into()),
            // Flows idle for 2 s end, and get their last record, in the test.
            ("FLOWTEL_EBPF__IDLE_TIMEOUT", "2s".into()),
        ],
    );
    let server = TrafficServer::start(&topo.b, &[addr(B_V4, TCP_PORT)], &[addr(B_V4, UDP_PORT)])
        .expect("servers in B");
    let before = topo.a.if_stats(IF_A).expect("A's veth counters");

    // A transfer that stays open across several intervals.
    let paced = traffic::tcp_paced(
        &topo.a,
        addr(B_V4, TCP_PORT),
        400_000,
        100_000,
        8,
        Duration::from_millis(500),
    )
    .expect("paced connection");
    let short = traffic::tcp_connections(&topo.a, addr(B_V4, TCP_PORT), SHORT, 1000, 1000)
        .expect("short connections");
    let udp =
        traffic::udp_exchange(&topo.a, addr(B_V4, UDP_PORT), 20, 200, 300).expect("UDP exchanges");
    let refused = resets_refusals_and_drops(&topo.a);
    println!("{TEST}: paced {paced:?}, short {short:?}, udp {udp:?}, refused {refused}");
    // The paced flow, idle for FLOWTEL_EBPF__IDLE_TIMEOUT, ends: its last
    // record reaches the receiver before SIGTERM.
    let paced_ended = common::wait_until(ENDED_TIMEOUT, Duration::from_millis(100), || {
        let all = receiver.log_events();
        let flows = events(&all, "flowtel.flow");
        let paced: BTreeSet<_> = flows
            .iter()
            .filter(|e| e.int("destination.port") == Some(TCP_PORT.into()))
            .filter(|e| e.int("flow.io.bytes").unwrap_or(0) > 100_000)
            .map(|e| tuple(e))
            .collect();
        flows.iter().any(|e| {
            paced.contains(&tuple(e))
                && e.attrs.get("flowtel.flow.ended") == Some(&AttrValue::Bool(true))
        })
    });
    assert!(
        paced_ended,
        "{TEST}: no last record (flowtel.flow.ended) of the paced transfer within \
         {ENDED_TIMEOUT:?}: {}",
        describe(&receiver.log_events())
    );
    // A last datagram right before SIGTERM: only the final interval's
    // export can carry its record.
    let last_port = topo
        .a
        .in_ns(|| -> std::io::Result<u16> {
            let s = UdpSocket::bind(addr(A_V4, 0))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.send_to(&300u32.to_be_bytes(), addr(B_V4, UDP_PORT))?;
            let mut buf = [0u8; 1024];
            s.recv(&mut buf)?;
            Ok(s.local_addr()?.port())
        })
        .expect("entering A")
        .expect("last datagram");
    let after = topo.a.if_stats(IF_A).expect("A's veth counters");
    let status = flowtel.stop(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "flowtel did not exit 0: {status:?}\n{}",
        flowtel.output()
    );
    drop(server);

    let all = receiver.log_events();
    println!("{TEST}: {} records: {}", all.len(), describe(&all));
    check_events("receiver", &all, 1 + SHORT, refused);
    let resource = &all.first().expect("log records").resource;
    assert_eq!(
        resource.get("service.name"),
        Some(&common::otlp_receiver::AttrValue::Str("flowtel".into())),
        "the node resource"
    );

    let flows = events(&all, "flowtel.flow");
    // One record per flow per interval: no flow twice in one window.
    let mut windows = BTreeSet::new();
    for e in &flows {
        assert!(
            windows.insert((tuple(e), int(e, "flow.start"))),
            "two records of one flow in one interval: {e:?}"
        );
    }
    let paced_records: Vec<_> = flows
        .iter()
        .filter(|e| e.int("destination.port") == Some(TCP_PORT.into()))
        .filter(|e| int(e, "flow.io.bytes") > 100_000)
        .collect();
    assert!(!paced_records.is_empty(), "the paced transfer's records");
    let paced_tuple = tuple(paced_records[0]);
    let paced_all: Vec<_> = flows.iter().filter(|e| tuple(e) == paced_tuple).collect();
    let paced_bytes: u64 = paced_all.iter().map(|e| int(e, "flow.io.bytes")).sum();
    println!(
        "{TEST}: paced flow: {} records, {paced_bytes} B to the server",
        paced_all.len()
    );
    assert!(
        paced_all.len() >= 3,
        "a 4 s transfer spans at least 3 one-second intervals"
    );
    assert!(
        paced_bytes >= paced.to_server,
        "paced bytes at least its payload"
    );
    let ended = paced_all
        .iter()
        .filter(|e| {
            e.attrs.get("flowtel.flow.ended") == Some(&common::otlp_receiver::AttrValue::Bool(true))
        })
        .count();
    assert_eq!(ended, 1, "exactly one last record of the paced flow");
    assert!(
        flows
            .iter()
            .any(|e| e.int("source.port") == Some(last_port.into())),
        "the final interval (SIGTERM) was exported: no record of source port {last_port}"
    );

    let c2s: u64 = flows.iter().map(|e| int(e, "flow.io.bytes")).sum();
    let s2c: u64 = flows
        .iter()
        .map(|e| int(e, "flowtel.flow.reverse.io.bytes"))
        .sum();
    let veth = after.since(&before);
    let (tx, rx) = (veth.tx_l3_bytes(), veth.rx_l3_bytes());
    println!(
        "{TEST}: flow records {c2s} B client→server vs veth {tx} B ({:+.3} %), {s2c} B server→client vs veth {rx} B ({:+.3} %)",
        common::deviation_pct(c2s, tx),
        common::deviation_pct(s2c, rx)
    );
    assert!(
        common::within(c2s, tx, 0.01),
        "client→server bytes within 1 %"
    );
    assert!(
        common::within(s2c, rx, 0.01),
        "server→client bytes within 1 %"
    );
    drop(topo.guard);
}

#[test]
fn rotel_receives_events_and_the_rate_limit_counts_what_it_drops() {
    const TEST: &str = "rotel_receives_events_and_the_rate_limit_counts_what_it_drops";
    let Some(tools) = common::prerequisites(TEST, true) else {
        return;
    };
    let Some((_, _)) = common::prerequisites_with(TEST, &[], &common::ebpf_conditions()) else {
        return;
    };
    let rotel_bin = tools
        .rotel
        .clone()
        .expect("prerequisites found rotel-agent");
    let topo = Topology::new(&tools, "lr");
    let rotel = Rotel::start(&rotel_bin).expect("rotel");
    const RATE: u64 = 40;
    const CONNECTIONS: u64 = 150;
    let started = Instant::now();
    let mut flowtel = topo.start_flowtel(
        &rotel.http_endpoint(),
        "http/protobuf",
        vec![("FLOWTEL_EXPORT__LOGS__RATE_LIMIT", RATE.to_string())],
    );
    let server = TrafficServer::start(&topo.b, &[addr(B_V4, TCP_PORT)], &[]).expect("server in B");
    let refused = resets_refusals_and_drops(&topo.a);
    // These events leave before the flood (and its bucket is full again).
    let first = rotel_logs_shown("rotel before the flood", &flowtel, &rotel);
    check_events("rotel", &first, 0, refused);
    let short = traffic::tcp_connections(&topo.a, addr(B_V4, TCP_PORT), CONNECTIONS, 100, 100)
        .expect("a burst of short connections");
    println!("{TEST}: burst {short:?}");
    // Every interval holding the burst was encoded (the rate limit counts
    // there) and its records are in rotel.
    let all = rotel_logs_shown("rotel after the flood", &flowtel, &rotel);
    let limited = flowtel
        .stat("log_records_rate_limited")
        .expect("the rate-limit counter");
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{TEST}: rotel got {} records ({}), rate limit dropped {limited}, over {elapsed:.1} s",
        all.len(),
        describe(&all)
    );
    let status = flowtel.stop(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "flowtel did not exit 0: {status:?}\n{}",
        flowtel.output()
    );
    drop(server);
    assert!(limited > 0, "the burst must exceed {RATE} records/s");
    // Each connection gives an opened, a closed and a flow record; every
    // one of them is either in rotel or counted.
    let offered = 3 * CONNECTIONS;
    assert!(
        all.len() as u64 - first.len() as u64 + limited >= offered,
        "records lost without being counted: {} sent + {limited} limited < {offered}",
        all.len() - first.len()
    );
    let budget = (RATE as f64 * (elapsed + 1.0)) as usize;
    assert!(
        all.len() <= budget,
        "{} records exceed {RATE}/s over {elapsed:.1} s",
        all.len()
    );
    drop(topo.guard);
}
