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
//! with BTF. Missing → skip with the reason, or fail under `CI`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs};
use common::netns::{Netns, NetnsGuard};
use common::otlp_receiver::OtlpReceiver;
use common::scenario::{self, Lab, Series};
use common::{deviation_pct, find_tool, within, Prerequisites, Tool};

const IPERF3: Tool = Tool {
    name: "iperf3",
    env: "IPERF3_BIN",
    fallbacks: &["/usr/bin/iperf3"],
};
const IPERF_PORT: &str = "5201";
/// Each iperf3 run, seconds.
const SECONDS: &str = "2";

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

fn prerequisites(test: &str) -> Option<(Prerequisites, PathBuf)> {
    let tools = common::prerequisites(test, false)?;
    let mut missing = Vec::new();
    let iperf3 = find_tool(&IPERF3).map_err(|e| missing.push(e)).ok();
    if !flowtel::source::ebpf::built_with_ebpf() {
        missing.push("flowtel was built without eBPF support (clang/bpftool missing)".into());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("the kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    match (missing.is_empty(), iperf3) {
        (true, Some(p)) => Some((tools, p)),
        _ => {
            let why = missing.join("; ");
            assert!(!in_ci(), "{test}: prerequisites missing under CI: {why}");
            println!("skipping {test}: {why}");
            None
        }
    }
}

/// Wire packets the namespace's IP layer received, IPv4 and IPv6: the sum
/// over the four ECN codepoints, which the kernel adds `max(1, gso_segs)` to
/// per skb.
fn ip_in_packets(ns: &Netns) -> u64 {
    const FIELDS: [&str; 4] = ["InNoECTPkts", "InECT1Pkts", "InECT0Pkts", "InCEPkts"];
    let netstat = ns
        .run("cat", &["/proc/net/netstat"])
        .expect("/proc/net/netstat");
    let lines: Vec<&str> = netstat
        .lines()
        .filter(|l| l.starts_with("IpExt:"))
        .collect();
    assert_eq!(lines.len(), 2, "IpExt lines in /proc/net/netstat");
    let v4: u64 = lines[0]
        .split_whitespace()
        .zip(lines[1].split_whitespace())
        .filter(|(n, _)| FIELDS.contains(n))
        .map(|(_, v)| v.parse::<u64>().expect("counter is a number"))
        .sum();
    let snmp6 = ns
        .run("cat", &["/proc/net/snmp6"])
        .expect("/proc/net/snmp6");
    let v6: u64 = snmp6
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.strip_prefix("Ip6")?;
            FIELDS
                .contains(&name)
                .then(|| it.next()?.parse::<u64>().ok())?
        })
        .sum();
    v4 + v6
}

#[test]
fn iperf3_tcp_udp_v4_v6_counted_within_one_percent_over_otlp() {
    const TEST: &str = "iperf3_tcp_udp_v4_v6_counted_within_one_percent_over_otlp";
    let Some((tools, iperf3)) = prerequisites(TEST) else {
        return;
    };
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let mut procs = NetnsGuard::new(&tools);
    procs
        .spawn(&lab.b, &iperf3, &["-s", "-p", IPERF_PORT])
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
    let (a_in0, b_in0) = (ip_in_packets(&lab.a), ip_in_packets(&lab.b));
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
            match lab.a.run(&iperf3, &args) {
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
    let traffic_end = Instant::now();
    let clients = [scenario::A_V4, scenario::A_V6];
    let series = scenario::wait_stable(
        "receiver",
        traffic_end,
        Duration::from_secs(3),
        Duration::from_secs(3),
        Duration::from_secs(30),
        || Series::of_clients(&receiver.sum_points(0), &clients),
    );
    let after = lab.counters().expect("A's veth counters");
    let (a_in, b_in) = (ip_in_packets(&lab.a) - a_in0, ip_in_packets(&lab.b) - b_in0);
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
    let got = series.totals();
    let veth = scenario::Totals::from_counters(&before, &after);
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
    for (what, g, t, basis) in rows {
        println!(
            "{TEST}: {what}: expected ({basis}) {t}, reported {g} ({:+.3} %)",
            deviation_pct(g, t)
        );
    }
    for (what, g, t, basis) in rows {
        assert!(
            within(g, t, 0.01),
            "{what}: expected {t} ({basis}) ±1 %, flowtel reported {g} ({:+.3} %)\n{}",
            deviation_pct(g, t),
            series.describe()
        );
    }
    let status = flowtel.stop(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "flowtel did not exit 0: {status:?}"
    );
}
