//! Anomaly events from real traffic (root needed). flowtel (eBPF source,
//! 1 s intervals) runs on namespace A with dnsmasq serving in B. First
//! ordinary traffic (transfers to B, lookups of known names) that must make
//! no event; then from A a TCP connect scan of 1,000 closed ports of B, a
//! sweep of 256 addresses routed to B (which drops them) on one port, and
//! 25 lookups of random 60-character labels. Each must arrive as exactly
//! one `started` `flowtel.anomaly` event of its kind, whose count over its
//! events reaches exactly what the test sent, and `flowtel.anomalies` must
//! count each kind once.

mod common;
#[path = "common/prometheus.rs"]
#[allow(dead_code)]
mod prometheus;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::dns::{self, DIG, DNSMASQ};
use common::flowtel::{Flowtel, FlowtelArgs};
use common::otlp_receiver::{LogEvent, OtlpReceiver};
use common::scenario::{B_V4, TCP4_PORT};
use common::traffic;

const TEST: &str = "scans_sweeps_and_tunnels_each_make_one_event";
const TIMEOUT: Duration = Duration::from_secs(30);
const SCAN_PORTS: std::ops::Range<u16> = 20_000..21_000;
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

/// Per kind: (`started` events, the highest count, the `ongoing` events).
fn by_kind(events: &[LogEvent]) -> BTreeMap<String, (u32, i64, u32)> {
    let mut out: BTreeMap<String, (u32, i64, u32)> = BTreeMap::new();
    for e in events {
        let kind = e.str("flowtel.anomaly.kind").unwrap_or("?").to_string();
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
    let Some((base, found)) =
        common::prerequisites_with(TEST, &[DNSMASQ, DIG], &common::ebpf_conditions())
    else {
        return;
    };
    let [dnsmasq, dig_bin]: [std::path::PathBuf; 2] = found.try_into().expect("two tools");
    let lab = dns::lab_with_dnsmasq(&base, (&dnsmasq, &dig_bin), &["alpha.test", "bravo.test"]);
    lab.a
        .ip(&["route", "add", SWEEP_NET, "via", B_V4])
        .expect("a route to the swept network");
    let _servers = lab.servers().expect("the servers in B");
    let receiver = OtlpReceiver::start().expect("the OTLP receiver");
    let netns = lab.a.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &receiver.grpc_endpoint(),
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_EXPORT__CONSOLE__MODE", "never".to_string()),
            ("FLOWTEL_EXPORT__LOGS__RATE_LIMIT", "0".to_string()),
            (
                "FLOWTEL_EXPORT__PROMETHEUS__LISTEN",
                "127.0.0.1:0".to_string(),
            ),
        ],
    })
    .expect("starting flowtel");
    flowtel.wait_ready(TIMEOUT).expect("flowtel ready");
    let dumps = || flowtel.stat("dumps").unwrap_or(0);
    let after = |n: u64| {
        let target = dumps() + n;
        assert!(
            common::wait_until(TIMEOUT, Duration::from_millis(50), || dumps() >= target),
            "{TEST}: flowtel did not dump {n} more times:\n{}",
            flowtel.output()
        );
    };

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
        ("host_sweep".to_string(), 256),
        ("port_scan".to_string(), SCAN_PORTS.len() as i64),
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
    println!("{TEST}: (started, highest count, ongoing) by kind: {got:?}");
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
        .find(|e| e.str("flowtel.anomaly.kind") == Some("port_scan"))
        .expect("a port scan event");
    assert_eq!(scan.str("client.address"), Some(common::scenario::A_V4));
    assert_eq!(scan.str("server.address"), Some(B_V4));
    let sweep = events
        .iter()
        .find(|e| e.str("flowtel.anomaly.kind") == Some("host_sweep"))
        .expect("a sweep event");
    assert_eq!(sweep.int("server.port"), Some(SWEEP_PORT.into()));
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
    for kind in want.keys() {
        assert!(
            metric
                .iter()
                .any(|l| l.contains(&format!("flowtel_anomaly_kind=\"{kind}\""))
                    && l.ends_with(" 1")),
            "{TEST}: flowtel_anomalies_total of {kind} is not 1: {metric:?}"
        );
    }
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly: {status:?}"
    );
}
