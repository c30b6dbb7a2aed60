//! Cardinality under a port scan: 50 000 UDP datagrams from namespace A to
//! 50 000 different ports of B within a second, counted by the eBPF source
//! in A with the default key (which has `server.port`) and a series budget
//! of 1 000.
//!
//! Asserted from what the test-side OTLP receiver got:
//! * at most `max_series` series in the latest export (the kept ones plus
//!   the overflow series), and `flowtel.series.active` never above the
//!   budget;
//! * the overflow series (`otel.metric.overflow=true`) is present;
//! * `flowtel.series.overflowed` equals the flows folded: every one of the
//!   50 000 flows is a single datagram, hence a single update, so the
//!   folded flows are 50 000 less the scanned ports that kept a series;
//! * the bytes of all series together equal A's veth counters: nothing is
//!   lost by folding;
//! * flowtel's RSS stays under `RSS_BOUND_KIB`, the bound docs/testing.md gives.
//!
//! IPv6 is switched off on both veth ends and B drops the datagrams without
//! an ICMP answer, so the scan is the only traffic.
//!
//! Needs root, `ip`, `nft` and a flowtel built with eBPF support; otherwise
//! it is skipped ([`common::skip`]), or fails under `CI`.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs};
use common::otlp_receiver::{AttrValue, OtlpReceiver};
use common::scenario::{Lab, Series, A_V4, B_V4, DIRECTION, IF_A};
use common::{deviation_pct, within};

const PORTS: u16 = 50_000;
const FIRST_PORT: u16 = 10_000;
const MAX_SERIES: usize = 1_000;
const PAYLOAD: usize = 32;
/// flowtel's resident memory during and after the scan must stay below this
/// (the figure docs/testing.md gives for this configuration).
const RSS_BOUND_KIB: u64 = 128 * 1024;

#[test]
fn a_port_scan_stays_within_the_series_budget() {
    const TEST: &str = "a_port_scan_stays_within_the_series_budget";
    let Some((tools, _)) = common::prerequisites_with(TEST, &[], &common::ebpf_conditions()) else {
        return;
    };
    let t0 = Instant::now();
    let mut lab = Lab::new(&tools).expect("setting up the namespaces");
    for ns in [&lab.a, &lab.b] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
            .expect("switching IPv6 off");
    }
    lab.guard
        .nft(
            &lab.b,
            "inet",
            "ft_scan",
            &format!(
                "chain in {{\n  type filter hook input priority 0; policy accept;\n  \
                 udp dport {FIRST_PORT}-{} drop\n}}",
                FIRST_PORT + PORTS - 1
            ),
        )
        .expect("B drops the scan silently");
    let receiver = OtlpReceiver::start().expect("test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let mut ft = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_FLOWS__MAX_SERIES", MAX_SERIES.to_string()),
            ("FLOWTEL_EBPF__TCP__ENABLED", "false".to_string()),
            ("FLOWTEL_EBPF__DROPS__ENABLED", "false".to_string()),
        ],
    })
    .expect("starting flowtel");
    ft.wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");

    let rss_idle = ft.rss_kib().expect("flowtel's RSS");
    let before = lab.a.if_stats(IF_A).expect("A's veth counters");
    let sent = lab
        .a
        .in_ns(|| -> std::io::Result<u64> {
            let socket = UdpSocket::bind(SocketAddr::new(A_V4.parse().expect("literal"), 0))?;
            let payload = [0x5a_u8; PAYLOAD];
            let server: std::net::IpAddr = B_V4.parse().expect("literal");
            let mut sent = 0;
            for port in FIRST_PORT..FIRST_PORT + PORTS {
                sent += socket.send_to(&payload, SocketAddr::new(server, port))? as u64;
            }
            Ok(sent)
        })
        .expect("entering A")
        .expect("sending the scan");
    let truth = lab
        .a
        .if_stats(IF_A)
        .expect("A's veth counters")
        .since(&before);
    println!(
        "{TEST}: {:.1}s: sent {PORTS} datagrams ({sent} B of payload); A's veth: {truth:?}",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        truth.tx_packets,
        u64::from(PORTS),
        "{TEST}: A sent only the scan"
    );

    let series = common::scenario::wait_exported(
        "receiver",
        &ft,
        Duration::from_secs(60),
        // The latest flow export only: a series folded into the overflow
        // series is no longer exported (its last value would be counted
        // twice). Requests without flow points (the mesh exporter's
        // self-metrics) may arrive after it.
        || {
            (0..receiver.request_count())
                .rev()
                .map(|i| Series::from_points(&receiver.sum_points(i)))
                .find(|s| !s.bytes.is_empty())
                .unwrap_or_default()
        },
    );
    let rss = ft.rss_kib().expect("flowtel's RSS");
    let distinct: std::collections::BTreeSet<_> = series
        .bytes
        .keys()
        .map(|a| {
            let mut a = a.clone();
            a.remove(DIRECTION);
            a
        })
        .collect();
    let overflow = distinct
        .iter()
        .filter(|a| a.get("otel.metric.overflow") == Some(&AttrValue::Bool(true)))
        .count();
    let kept_scan = distinct
        .iter()
        .filter(|a| {
            a.get("network.transport") == Some(&AttrValue::Str("udp".into()))
                && matches!(a.get("server.port"), Some(AttrValue::Int(p))
                    if (i64::from(FIRST_PORT)..i64::from(FIRST_PORT + PORTS)).contains(p))
        })
        .count() as u64;
    let overflowed = receiver
        .latest("flowtel.series.overflowed", 0)
        .values()
        .map(|p| p.value)
        .max()
        .unwrap_or(0);
    let active_max = receiver
        .gauge_values("flowtel.series.active", 0)
        .into_iter()
        .max()
        .unwrap_or(0);
    let total: u64 = series.bytes.values().map(|p| p.value).sum();
    println!(
        "{TEST}: {} series (without direction), {overflow} overflow series, {kept_scan} scanned \
         ports kept; flowtel.series.overflowed {overflowed} (expected {}); \
         flowtel.series.active at most {active_max}; bytes in all series {total}, A's veth (L3) \
         {} ({:+.3} %); RSS {rss} KiB ({rss_idle} KiB before the scan)",
        distinct.len(),
        u64::from(PORTS) - kept_scan,
        truth.tx_l3_bytes(),
        deviation_pct(total, truth.tx_l3_bytes())
    );
    assert!(
        distinct.len() <= MAX_SERIES,
        "{TEST}: {} series, budget {MAX_SERIES}",
        distinct.len()
    );
    assert!(
        active_max <= MAX_SERIES as i64,
        "{TEST}: flowtel.series.active reached {active_max}"
    );
    assert_eq!(overflow, 1, "{TEST}: expected one overflow series");
    assert!(kept_scan > 0, "{TEST}: no scanned port kept a series");
    assert_eq!(
        overflowed,
        u64::from(PORTS) - kept_scan,
        "{TEST}: flowtel.series.overflowed must equal the folded flows"
    );
    assert!(
        within(total, truth.tx_l3_bytes(), 0.01),
        "{TEST}: the series together carry {total} B, A's veth {} B",
        truth.tx_l3_bytes()
    );
    assert!(
        rss < RSS_BOUND_KIB,
        "{TEST}: RSS {rss} KiB, bound {RSS_BOUND_KIB} KiB"
    );
    let status = ft.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{TEST}: flowtel did not exit cleanly: {status:?}\n{}",
        ft.output()
    );
    println!("{TEST}: passed in {:?}", t0.elapsed());
}
