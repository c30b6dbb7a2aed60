//! Anomaly events from real traffic (root needed). flowtel (eBPF source,
//! 1 s intervals) runs on namespace A with dnsmasq serving in B.
//!
//! `scans_sweeps_and_tunnels_each_make_one_event`: first ordinary traffic
//! (transfers to B, lookups of known names) that must make no event; then
//! from A a TCP connect scan and a UDP scan of 1,000 closed ports of B each,
//! a TCP and a UDP sweep of 256 addresses routed to B (which drops them) on
//! one port, and 25 lookups of random 60-character labels. Each must
//! arrive as exactly one `started` `flowtel.anomaly` event of its kind and
//! transport, whose count over its events reaches exactly what the test
//! sent, and `flowtel.anomalies` must count each kind as often.
//!
//! `baselines_and_firsts_each_make_one_event`: with a 4 s learning period,
//! steady transfers and lookups from A while it learns, then one scenario
//! at a time, each followed by exactly one `started` event of its kind
//! within two intervals and nothing else: a 20× burst on the learned pair,
//! a 200 MB upload to an "internet" address (outside the configured cluster
//! network, routed to B), a first connection to a database port, a first
//! use of a new server port, 200 refused connects to one port, and 60 TXT
//! lookups. The totals in the `ended` events are checked against the
//! interface counters and what was sent.
//!
//! The two run one after the other (one lock): the eBPF source's
//! tracepoints see every namespace.

mod common;
#[path = "common/prometheus.rs"]
#[allow(dead_code)]
mod prometheus;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::dns::{self, DIG, DNSMASQ};
use common::flowtel::{Flowtel, FlowtelArgs};
use common::otlp_receiver::{LogEvent, OtlpReceiver};
use common::scenario::{Lab, A_V4, B_V4, IF_B, TCP4_PORT};
use common::traffic::{self, TrafficServer};

const TEST: &str = "scans_sweeps_and_tunnels_each_make_one_event";
const TIMEOUT: Duration = Duration::from_secs(30);
const SCAN_PORTS: std::ops::Range<u16> = 20_000..21_000;
const UDP_SCAN_PORTS: std::ops::Range<u16> = 21_000..22_000;
const UDP_SWEEP_PORT: u16 = 8081;

/// One test at a time: each flowtel's tracepoints see the other's traffic.
static SERIAL: Mutex<()> = Mutex::new(());
/// Routed to B, which does not forward: no SYN is answered. The
/// sweep tries .1 to .128 of 198.19.1 and 198.19.2.
const SWEEP_NET: &str = "198.19.0.0/16";
const SWEEP_PORT: u16 = 8080;
const TUNNEL_NAMES: usize = 25;

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("literal address"), port)
}

fn anomalies(receiver: &OtlpReceiver) -> Vec<LogEvent> {
    receiver
        .log_events()
        .into_iter()
        .filter(|e| e.event_name == "flowtel.anomaly")
        .collect()
}

/// Per kind and transport (`kind/tcp`, `kind/udp`, or the kind alone for
/// those without one): (`started` events, the highest count, the other
/// events).
fn by_kind(events: &[LogEvent]) -> BTreeMap<String, (u32, i64, u32)> {
    let mut out: BTreeMap<String, (u32, i64, u32)> = BTreeMap::new();
    for e in events {
        let mut kind = e.str("flowtel.anomaly.kind").unwrap_or("?").to_string();
        if let Some(t) = e.str("network.transport") {
            kind = format!("{kind}/{t}");
        }
        let entry = out.entry(kind).or_default();
        match e.str("flowtel.anomaly.state") {
            Some("started") => entry.0 += 1,
            _ => entry.2 += 1,
        }
        entry.1 = entry.1.max(e.int("flowtel.anomaly.count").unwrap_or(0));
    }
    out
}

/// A label of 60 characters from a 32-letter alphabet, different for each
/// `i` (a fixed linear congruential sequence: no `rand` needed).
/// The two namespaces with dnsmasq serving `alpha.test` and `bravo.test`
/// in B, and dig's path; `None` when a prerequisite is missing (outside CI).
fn dnsmasq_lab(test: &str) -> Option<(Lab, PathBuf)> {
    let (base, found) =
        common::prerequisites_with(test, &[DNSMASQ, DIG], &common::ebpf_conditions())?;
    let [dnsmasq, dig_bin]: [PathBuf; 2] = found.try_into().expect("two tools");
    let lab = dns::lab_with_dnsmasq(&base, (&dnsmasq, &dig_bin), &["alpha.test", "bravo.test"]);
    Some((lab, dig_bin))
}

/// flowtel with the eBPF source on A's veth, exporting to `receiver`
/// every second, with the configuration file `config` if given.
fn start_flowtel(lab: &Lab, receiver: &OtlpReceiver, config: Option<&Path>) -> Flowtel {
    let netns = lab.a.path();
    let mut env = vec![
        ("FLOWTEL_EXPORT__CONSOLE__MODE", "never".to_string()),
        ("FLOWTEL_EXPORT__LOGS__RATE_LIMIT", "0".to_string()),
        (
            "FLOWTEL_EXPORT__PROMETHEUS__LISTEN",
            "127.0.0.1:0".to_string(),
        ),
    ];
    if let Some(config) = config {
        env.push(("FLOWTEL_CONFIG", config.display().to_string()));
    }
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &receiver.grpc_endpoint(),
        protocol: "grpc",
        interval: "1s",
        env,
    })
    .expect("starting flowtel");
    flowtel.wait_ready(TIMEOUT).expect("flowtel ready");
    flowtel
}

/// Waits until flowtel has dumped `n` more times.
fn wait_dumps(test: &str, flowtel: &Flowtel, n: u64) {
    let dumps = || flowtel.stat("dumps").unwrap_or(0);
    let target = dumps() + n;
    assert!(
        common::wait_until(TIMEOUT, Duration::from_millis(50), || dumps() >= target),
        "{test}: flowtel did not dump {n} more times:\n{}",
        flowtel.output()
    );
}

fn random_label(i: usize) -> String {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (0..60)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            char::from(b"abcdefghijklmnopqrstuvwxyz234567"[(x >> 59) as usize])
        })
        .collect()
}

#[test]
fn scans_sweeps_and_tunnels_each_make_one_event() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, dig_bin)) = dnsmasq_lab(TEST) else {
        return;
    };
    lab.a
        .ip(&["route", "add", SWEEP_NET, "via", B_V4])
        .expect("a route to the swept network");
    let _servers = lab.servers().expect("the servers in B");
    let receiver = OtlpReceiver::start().expect("the OTLP receiver");
    let mut flowtel = start_flowtel(&lab, &receiver, None);
    let after = |n: u64| wait_dumps(TEST, &flowtel, n);

    // Ordinary traffic: transfers, short connections and lookups.
    traffic::tcp_connections(&lab.a, sock(B_V4, TCP4_PORT), 30, 20_000, 40_000)
        .expect("transfers to B");
    for name in ["alpha.test", "bravo.test", "alpha.test"] {
        assert_eq!(
            dns::dig(&lab.a, &dig_bin, B_V4, name, "A", false).as_deref(),
            Some("NOERROR")
        );
    }
    after(3);
    let quiet = anomalies(&receiver);
    println!("{TEST}: ordinary traffic: {} anomaly events", quiet.len());
    assert!(quiet.is_empty(), "{TEST}: false positives: {quiet:#?}");

    // A connect scan of B's closed ports.
    let refused = lab
        .a
        .in_ns(|| {
            SCAN_PORTS
                .filter(|p| {
                    TcpStream::connect_timeout(&sock(B_V4, *p), Duration::from_secs(1))
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                })
                .count()
        })
        .expect("entering A");
    assert_eq!(refused, SCAN_PORTS.len(), "closed ports refuse");
    // A sweep: 256 addresses, 32 connects at a time, each given up after
    // 300 ms.
    let unanswered = lab
        .a
        .in_ns(|| {
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..32u16)
                    .map(|w| {
                        s.spawn(move || {
                            (0..8u16)
                                .filter(|i| {
                                    let n = w * 8 + i;
                                    let host = format!("198.19.{}.{}", 1 + n / 128, 1 + n % 128);
                                    // B answers the first ones with ICMP net
                                    // unreachable, then its rate limit
                                    // lets the rest time out.
                                    TcpStream::connect_timeout(
                                        &sock(&host, SWEEP_PORT),
                                        Duration::from_millis(300),
                                    )
                                    .is_err_and(|e| {
                                        matches!(
                                            e.kind(),
                                            std::io::ErrorKind::TimedOut
                                                | std::io::ErrorKind::NetworkUnreachable
                                        )
                                    })
                                })
                                .count()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().unwrap_or(0))
                    .sum::<usize>()
            })
        })
        .expect("entering A");
    assert_eq!(unanswered, 256, "swept addresses never answer");
    // A UDP scan of other closed ports of B and a UDP sweep of 256 more
    // routed addresses: one datagram each, answered (at most) by ICMP.
    let sent = lab
        .a
        .in_ns(|| -> std::io::Result<usize> {
            let s = UdpSocket::bind((A_V4, 0))?;
            let mut sent = 0;
            for p in UDP_SCAN_PORTS {
                sent += usize::from(s.send_to(b"probe", sock(B_V4, p)).is_ok());
            }
            for n in 0..256u16 {
                let host = format!("198.19.{}.{}", 3 + n / 128, 1 + n % 128);
                sent += usize::from(s.send_to(b"probe", sock(&host, UDP_SWEEP_PORT)).is_ok());
            }
            Ok(sent)
        })
        .expect("entering A")
        .expect("a UDP socket in A");
    assert_eq!(sent, UDP_SCAN_PORTS.len() + 256, "every datagram sent");
    // Lookups of names that carry data.
    for i in 0..TUNNEL_NAMES {
        let name = format!("{}.tunnel.test", random_label(i));
        assert_eq!(
            dns::dig(&lab.a, &dig_bin, B_V4, &name, "TXT", false).as_deref(),
            Some("NXDOMAIN"),
            "{name}"
        );
    }

    let want = BTreeMap::from([
        ("dns_tunnel".to_string(), TUNNEL_NAMES as i64),
        ("host_sweep/tcp".to_string(), 256),
        ("host_sweep/udp".to_string(), 256),
        ("port_scan/tcp".to_string(), SCAN_PORTS.len() as i64),
        ("port_scan/udp".to_string(), UDP_SCAN_PORTS.len() as i64),
    ]);
    let reached = || {
        let got = by_kind(&anomalies(&receiver));
        want.iter()
            .all(|(k, n)| got.get(k).is_some_and(|(_, max, _)| max == n))
    };
    let arrived = common::wait_until(TIMEOUT, Duration::from_millis(200), reached);
    // Two more intervals: a duplicate `started` would show by then.
    after(2);
    let events = anomalies(&receiver);
    let got = by_kind(&events);
    println!("{TEST}: (started, highest count, other events) by kind: {got:?}");
    for e in events
        .iter()
        .filter(|e| e.str("flowtel.anomaly.state") == Some("started"))
    {
        println!("{TEST}: {}", e.body);
    }
    assert!(
        arrived,
        "{TEST}: events missing: {events:#?}\n{}",
        flowtel.output()
    );
    let started: BTreeMap<&String, u32> = got.iter().map(|(k, v)| (k, v.0)).collect();
    assert_eq!(
        started,
        want.keys().map(|k| (k, 1)).collect(),
        "one started event per kind"
    );
    let scan = events
        .iter()
        .find(|e| {
            e.str("flowtel.anomaly.kind") == Some("port_scan")
                && e.str("network.transport") == Some("tcp")
        })
        .expect("a port scan event");
    assert_eq!(scan.str("client.address"), Some(common::scenario::A_V4));
    assert_eq!(scan.str("server.address"), Some(B_V4));
    for (transport, port) in [("tcp", SWEEP_PORT), ("udp", UDP_SWEEP_PORT)] {
        let sweep = events
            .iter()
            .find(|e| {
                e.str("flowtel.anomaly.kind") == Some("host_sweep")
                    && e.str("network.transport") == Some(transport)
            })
            .expect("a sweep event");
        assert_eq!(sweep.int("server.port"), Some(port.into()));
    }
    let counted = flowtel
        .stats()
        .expect("/readyz")
        .get("anomaly_untracked")
        .and_then(serde_json::Value::as_u64);
    assert_eq!(counted, Some(0), "nothing untracked");
    let addr = flowtel.prometheus_addr().expect("the Prometheus endpoint");
    let (code, text) = prometheus::http_get(addr, "/metrics").expect("scraping /metrics");
    assert_eq!(code, 200);
    let mut metric: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("flowtel_anomalies_total{"))
        .collect();
    metric.sort_unstable();
    println!("{TEST}: {metric:?}");
    for (kind, n) in [("dns_tunnel", 1), ("host_sweep", 2), ("port_scan", 2)] {
        assert!(
            metric
                .iter()
                .any(|l| l.contains(&format!("flowtel_anomaly_kind=\"{kind}\""))
                    && l.ends_with(&format!(" {n}"))),
            "{TEST}: flowtel_anomalies_total of {kind} is not {n}: {metric:?}"
        );
    }
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly: {status:?}"
    );
}

const BASELINE_TEST: &str = "baselines_and_firsts_each_make_one_event";
/// Where the test's "database", new-port server and refusing host live
/// (extra addresses of B), and the "internet" address routed to B.
const DB: &str = "198.18.0.3";
const DB_PORT: u16 = 5432;
const REFUSER: &str = "198.18.0.4";
const NEW_PORT_HOST: &str = "198.18.0.5";
const NEW_PORT: u16 = 7000;
const INTERNET: &str = "203.0.113.10";
const UPLOAD: u64 = 200_000_000;
const BURST: u64 = 4_000_000;
const REFUSED: u64 = 200;
const TXT_LOOKUPS: usize = 60;

/// The events of `kind` in `state`.
fn of(events: &[LogEvent], kind: &str, state: &str) -> Vec<LogEvent> {
    events
        .iter()
        .filter(|e| {
            e.str("flowtel.anomaly.kind") == Some(kind)
                && e.str("flowtel.anomaly.state") == Some(state)
        })
        .cloned()
        .collect()
}

#[test]
fn baselines_and_firsts_each_make_one_event() {
    const TEST: &str = BASELINE_TEST;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((lab, _)) = dnsmasq_lab(TEST) else {
        return;
    };
    for addr in [DB, REFUSER, NEW_PORT_HOST, INTERNET] {
        lab.b
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", IF_B])
            .expect("an extra address of B");
    }
    lab.a
        .ip(&["route", "add", &format!("{INTERNET}/32"), "via", B_V4])
        .expect("a route to the internet address");
    let _servers = lab.servers().expect("the servers in B");
    let _extra = TrafficServer::start(
        &lab.b,
        &[
            sock(DB, DB_PORT),
            sock(NEW_PORT_HOST, NEW_PORT),
            sock(INTERNET, TCP4_PORT),
        ],
        &[],
    )
    .expect("the database, new-port and internet servers in B");
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("flowtel.yaml");
    std::fs::write(
        &config,
        "flows:\n  anomaly:\n    learning: 4s\n    window: 3s\n    exfil_min_bytes: 10000000\n    \
         dns_txt_queries: 50\nenrich:\n  unknown_addresses: network\n  networks:\n    \
         - name: cluster\n      cidrs: [198.18.0.0/16]\n",
    )
    .expect("writing the configuration");
    let receiver = OtlpReceiver::start().expect("the OTLP receiver");
    let mut flowtel = start_flowtel(&lab, &receiver, Some(&config));
    let dumps = || flowtel.stat("dumps").unwrap_or(0);
    let after = |n: u64| wait_dumps(TEST, &flowtel, n);
    let events = || anomalies(&receiver);
    let lookups = |qtype: u16, n: usize, first_id: u16| {
        let questions: Vec<(String, u16)> = (0..n).map(|_| ("alpha.test".into(), qtype)).collect();
        let answered = dns::udp_lookups(&lab.a, A_V4, B_V4, &questions, first_id);
        assert!(answered.iter().all(|r| *r == Some(0)), "{answered:?}");
    };

    // Learning: 200 KB/s from A to B in 100 ms transfers, and lookups,
    // for more than the learning period and five intervals.
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let steady = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                traffic::tcp_connections(&lab.a, sock(B_V4, TCP4_PORT), 1, 20_000, 0)
                    .expect("steady transfers");
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        lookups(1, 5, 1);
        after(7);
        stop.store(true, Ordering::Relaxed);
        steady.join().expect("the steady sender");
    });
    let quiet = events();
    println!("{TEST}: learning: {} anomaly events", quiet.len());
    assert!(quiet.is_empty(), "{TEST}: false positives: {quiet:#?}");

    // Each scenario: its traffic, then its kind's `started` event within
    // two intervals, and (for the levels) the `ended` one with the totals.
    let mut kinds_seen = Vec::new();
    let started_within = |kind: &str, kinds_seen: &mut Vec<String>| -> LogEvent {
        let d0 = dumps();
        assert!(
            common::wait_until(TIMEOUT, Duration::from_millis(50), || !of(
                &events(),
                kind,
                "started"
            )
            .is_empty()),
            "{TEST}: no {kind} event: {:#?}\n{}",
            events(),
            flowtel.output()
        );
        let took = dumps() - d0;
        println!("{TEST}: {kind} started {took} intervals after its traffic");
        assert!(took <= 2, "{TEST}: {kind} took {took} intervals");
        kinds_seen.push(kind.to_string());
        of(&events(), kind, "started").remove(0)
    };
    let ended = |kind: &str| -> LogEvent {
        assert!(
            common::wait_until(TIMEOUT, Duration::from_millis(50), || !of(
                &events(),
                kind,
                "ended"
            )
            .is_empty()),
            "{TEST}: {kind} never ended: {:#?}",
            events()
        );
        of(&events(), kind, "ended").remove(0)
    };

    // A 20× burst on the learned pair.
    after(1);
    let before = lab.counters().expect("A's counters");
    let sent =
        traffic::tcp_connections(&lab.a, sock(B_V4, TCP4_PORT), 1, BURST, 0).expect("the burst");
    let spike = started_within("traffic_spike", &mut kinds_seen);
    let end = ended("traffic_spike");
    let wire = lab.counters().expect("A's counters").since(&before);
    let truth = wire.tx_l3_bytes() + wire.rx_l3_bytes();
    println!(
        "{TEST}: spike: {} bytes in its interval against a baseline of {:?} ± {:?}; {} bytes during it, {truth} on the wire ({:?} payload sent)",
        spike.int("flowtel.anomaly.value").unwrap_or(0),
        spike.int("flowtel.anomaly.baseline"),
        spike.int("flowtel.anomaly.baseline.stddev"),
        end.int("flowtel.anomaly.count").unwrap_or(0),
        sent
    );
    assert_eq!(spike.str("flowtel.anomaly.client"), Some(A_V4));
    assert_eq!(spike.str("flowtel.anomaly.peer"), Some(B_V4));
    let baseline = spike.int("flowtel.anomaly.baseline").unwrap_or(0);
    assert!(
        (100_000..=400_000).contains(&baseline),
        "the learned baseline is about 200 KB per interval: {baseline}"
    );
    let during = end.int("flowtel.anomaly.count").unwrap_or(0) as u64;
    assert!(
        common::within(during, truth, 0.01),
        "{TEST}: spike total {during} against {truth} on the wire"
    );

    // A 200 MB upload to the internet address, from the start of an
    // interval.
    after(1);
    let before = lab.counters().expect("A's counters");
    traffic::tcp_connections(&lab.a, sock(INTERNET, TCP4_PORT), 1, UPLOAD, 0).expect("the upload");
    let exfil = started_within("exfiltration", &mut kinds_seen);
    let end = ended("exfiltration");
    let wire = lab.counters().expect("A's counters").since(&before);
    let out = end.int("flowtel.anomaly.count").unwrap_or(0) as u64;
    println!(
        "{TEST}: exfiltration: {} bytes in its first interval (baseline {:?}); {out} bytes sent out during it, {} sent by A on the wire",
        exfil.int("flowtel.anomaly.value").unwrap_or(0),
        exfil.int("flowtel.anomaly.baseline"),
        wire.tx_l3_bytes()
    );
    assert_eq!(exfil.str("flowtel.anomaly.client"), Some(A_V4));
    assert_eq!(exfil.int("flowtel.anomaly.baseline"), Some(0));
    assert!(out >= UPLOAD, "{TEST}: {out} bytes is less than the upload");
    assert!(
        common::within(out, wire.tx_l3_bytes(), 0.01),
        "{TEST}: exfiltration total {out} against {} sent",
        wire.tx_l3_bytes()
    );

    // A first connection to a database port.
    traffic::tcp_connections(&lab.a, sock(DB, DB_PORT), 1, 1_000, 1_000)
        .expect("the database connection");
    let lateral = started_within("lateral_movement", &mut kinds_seen);
    assert_eq!(lateral.str("flowtel.anomaly.peer"), Some(DB));
    assert_eq!(lateral.int("server.port"), Some(DB_PORT.into()));
    assert_eq!(lateral.int("flowtel.anomaly.count"), Some(1));

    // A first use of a new server port.
    traffic::tcp_connections(&lab.a, sock(NEW_PORT_HOST, NEW_PORT), 1, 1_000, 1_000)
        .expect("the new port");
    let unusual = started_within("unusual_protocol", &mut kinds_seen);
    assert_eq!(unusual.int("server.port"), Some(NEW_PORT.into()));
    assert_eq!(unusual.int("flowtel.anomaly.count"), Some(1));

    // Refused connects to one port.
    let refused = lab
        .a
        .in_ns(|| {
            (0..REFUSED)
                .filter(|_| {
                    TcpStream::connect_timeout(&sock(REFUSER, TCP4_PORT), Duration::from_secs(1))
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                })
                .count() as u64
        })
        .expect("entering A");
    assert_eq!(refused, REFUSED, "nothing listens there");
    let errors = started_within("high_error_rate", &mut kinds_seen);
    let end = ended("high_error_rate");
    println!("{TEST}: error rate: {}; ended: {}", errors.body, end.body);
    assert_eq!(errors.str("flowtel.anomaly.peer"), Some(REFUSER));
    assert_eq!(end.int("flowtel.anomaly.count"), Some(REFUSED as i64));
    assert_eq!(end.int("flowtel.anomaly.connections"), Some(REFUSED as i64));

    // TXT lookups in volume (of an ordinary name).
    lookups(16, TXT_LOOKUPS, 1000);
    started_within("dns_txt_volume", &mut kinds_seen);
    assert!(
        common::wait_until(TIMEOUT, Duration::from_millis(50), || {
            by_kind(&events())
                .get("dns_txt_volume")
                .is_some_and(|(_, n, _)| *n == TXT_LOOKUPS as i64)
        }),
        "{TEST}: the TXT count never reached {TXT_LOOKUPS}: {:?}",
        by_kind(&events())
    );

    // Two more intervals: a duplicate or another kind would show by then.
    after(2);
    let all = events();
    let got = by_kind(&all);
    println!("{TEST}: (started, highest count, other events) by kind: {got:?}");
    for e in &all {
        println!(
            "{TEST}: {} {}",
            e.str("flowtel.anomaly.state").unwrap_or("?"),
            e.body
        );
    }
    let started: BTreeMap<String, u32> = all
        .iter()
        .filter(|e| e.str("flowtel.anomaly.state") == Some("started"))
        .fold(BTreeMap::new(), |mut m, e| {
            *m.entry(e.str("flowtel.anomaly.kind").unwrap_or("?").to_string())
                .or_default() += 1;
            m
        });
    kinds_seen.sort();
    assert_eq!(
        started,
        kinds_seen.iter().map(|k| (k.clone(), 1)).collect(),
        "{TEST}: exactly one started event per scenario's kind, and no other"
    );
    let counted = flowtel
        .stats()
        .expect("/readyz")
        .get("anomaly_untracked")
        .and_then(serde_json::Value::as_u64);
    assert_eq!(counted, Some(0), "nothing untracked");
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly: {status:?}"
    );
}
