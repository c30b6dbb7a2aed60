//! The eBPF source end to end: iperf3 TCP and UDP over IPv4 and IPv6 from
//! namespace A to namespace B, flowtel `--source ebpf --netns A` exporting
//! over OTLP to the test receiver, and per-direction totals compared with
//! what the kernel itself counted:
//!
//! * bytes: A's veth counters less 14 Ethernet bytes a packet (L3, as TC and
//!   conntrack count them);
//! * packets: the receiving side's IP layer (`IpExt In*Pkts` and
//!   `Ip6In*Pkts`, which add `max(1, gso_segs)` per skb): wire packets, as
//!   flowtel counts them, while the veth counts GSO skbs.
//!
//! Needs root, `ip`, `nft`, `iperf3` and a binary built with eBPF on a kernel
//! with BTF. Missing → skipped with the reason ([`common::skip`]), or a
//! failure under `CI`.

mod common;

use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs};
use common::netns::NetnsGuard;
use common::otlp_receiver::OtlpReceiver;
use common::scenario::{self, Lab, Series};
use common::IPERF3;

const IPERF_PORT: &str = "5201";
/// Each iperf3 run, seconds.
const SECONDS: &str = "2";

#[test]
fn iperf3_tcp_udp_v4_v6_counted_within_one_percent_over_otlp() {
    const TEST: &str = "iperf3_tcp_udp_v4_v6_counted_within_one_percent_over_otlp";
    let Some((tools, extra)) =
        common::prerequisites_with(TEST, &[IPERF3], &common::ebpf_conditions())
    else {
        return;
    };
    let iperf3 = &extra[0];
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let mut procs = NetnsGuard::new(&tools);
    procs
        .spawn(&lab.b, iperf3, &["-s", "-p", IPERF_PORT])
        .expect("iperf3 server in B");
    let receiver = OtlpReceiver::start().expect("test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: Vec::new(),
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(20))
        .expect("flowtel becomes ready");

    let before = lab.counters().expect("A's veth counters");
    let (a_in0, b_in0) = (
        scenario::ip_in_packets(&lab.a, true),
        scenario::ip_in_packets(&lab.b, true),
    );
    let runs: [(&str, Vec<&str>); 4] = [
        ("tcp4", vec!["-c", scenario::B_V4]),
        ("tcp6", vec!["-c", scenario::B_V6]),
        (
            "udp4",
            vec!["-c", scenario::B_V4, "-u", "-b", "200M", "-l", "1400"],
        ),
        (
            "udp6",
            vec!["-c", scenario::B_V6, "-u", "-b", "200M", "-l", "1400"],
        ),
    ];
    for (name, args) in &runs {
        let mut args = args.clone();
        args.extend(["-p", IPERF_PORT, "-t", SECONDS]);
        // The server may need a moment after the previous test.
        let started = Instant::now();
        let out = loop {
            match lab.a.run(iperf3, &args) {
                Ok(out) => break out,
                Err(e) if started.elapsed() < Duration::from_secs(10) => {
                    println!("{TEST}: {name}: retrying: {e}");
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => panic!("iperf3 {name}: {e}"),
            }
        };
        let summary: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("sender") || l.contains("receiver"))
            .collect();
        println!("{TEST}: iperf3 {name}: {}", summary.join(" | "));
    }
    let clients = [scenario::A_V4, scenario::A_V6];
    let series = scenario::wait_exported("receiver", &flowtel, Duration::from_secs(30), || {
        Series::of_clients(&receiver.sum_points(0), &clients)
    });
    let after = lab.counters().expect("A's veth counters");
    let (a_in, b_in) = (
        scenario::ip_in_packets(&lab.a, true) - a_in0,
        scenario::ip_in_packets(&lab.b, true) - b_in0,
    );
    println!("{TEST}: series:\n{}", series.describe());
    assert_eq!(series.sources(), ["ebpf"], "{}", series.describe());
    for (transport, network_type) in [
        ("tcp", "ipv4"),
        ("tcp", "ipv6"),
        ("udp", "ipv4"),
        ("udp", "ipv6"),
    ] {
        let found = series.bytes.keys().any(|a| {
            a.get("network.transport")
                == Some(&common::otlp_receiver::AttrValue::Str(transport.into()))
                && a.get("network.type")
                    == Some(&common::otlp_receiver::AttrValue::Str(network_type.into()))
        });
        assert!(found, "no {transport}/{network_type} series");
    }
    let veth = scenario::Totals::from_counters(&before, &after);
    scenario::check_wire_totals(TEST, &series, &veth, a_in, b_in);
    let status = flowtel.stop(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "flowtel did not exit 0: {status:?}"
    );
}
