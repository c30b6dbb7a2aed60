//! TCP health and drops from the eBPF source, end to end through the binary
//! and OTLP (root and a kernel with BTF needed).
//!
//! Namespace A (client) reaches B (server) through router R. R sends the
//! A→B direction through a delay line that holds every packet 20 ms and
//! drops 2 % of them: `tc qdisc netem` does that job elsewhere, but this
//! machine's kernel has no netem (nor fq), so the delay line is a TUN device
//! and a thread (tests/common/delayline.rs). flowtel runs with
//! `--source ebpf --netns A`, so its tracepoints see A's sockets only.
//! Then, from A:
//!
//! * one bulk connection of 2 MiB up: RTT samples, retransmits (the loss);
//! * 5 short connections, each opened and closed within one interval;
//! * one connection aborted with `SO_LINGER` 0: closed by reset;
//! * 3 connects to a port nothing listens on: failed, refused;
//! * 1 connect to a port A's nftables drops, given up after 1 s: failed, no
//!   answer, and its SYNs dropped with reason `NETFILTER_DROP`;
//! * 10 UDP datagrams to a port A's nftables drops: exactly 10 drops.
//!
//! Every count is exact because A holds nothing but these sockets.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::delayline::DelayLine;
use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::histogram::{histogram_points, latest_histograms, HistPoint};
use common::netns::{NetnsGuard, VethEnd};
use common::otlp_receiver::{show, AttrValue, Attrs, OtlpReceiver, SumPoint};
use common::traffic::{self, TrafficServer};

const A_V4: &str = "198.18.4.1";
const RA_V4: &str = "198.18.4.254";
const RB_V4: &str = "198.18.5.254";
const B_V4: &str = "198.18.5.2";
const IF_DELAY: &str = "fthDelay";
const SERVE_PORT: u16 = 5001;
const CLOSED_PORT: u16 = 5555;
const DROPPED_TCP_PORT: u16 = 9999;
const DROPPED_UDP_PORT: u16 = 9998;
const DELAY_MS: f64 = 20.0;
/// 2 % of the packets routed through the delay line.
const LOSS_PERMILLE: u32 = 20;
const SHORT: u64 = 5;
const REFUSED: u64 = 3;
const UDP_DROPPED: u64 = 10;

fn end(ifname: &str, mac: &str, v4: &str, v6: &str) -> VethEnd {
    VethEnd {
        ifname: ifname.into(),
        mac: mac.into(),
        v4: v4.into(),
        v6: v6.into(),
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal address"), port)
}

/// The series of `metric` between A and B on `port`, by their remaining
/// attributes (client, server, port and the constant ones removed).
fn series_on(points: &[SumPoint], metric: &str, port: u16) -> BTreeMap<Attrs, u64> {
    let mut out = BTreeMap::new();
    for (attrs, p) in common::otlp_receiver::latest(points, metric) {
        let str_is = |k: &str, v: &str| attrs.get(k) == Some(&AttrValue::Str(v.into()));
        if str_is("client.address", A_V4)
            && str_is("server.address", B_V4)
            && attrs.get("server.port") == Some(&AttrValue::Int(port.into()))
        {
            let rest: Attrs = attrs
                .iter()
                .filter(|(k, _)| k.starts_with("flowtel.tcp."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            *out.entry(rest).or_insert(0) += p.value;
        }
    }
    out
}

fn value_where(series: &BTreeMap<Attrs, u64>, key: &str, value: &str) -> u64 {
    series
        .iter()
        .filter(|(a, _)| a.get(key) == Some(&AttrValue::Str(value.into())))
        .map(|(_, v)| *v)
        .sum()
}

fn total(series: &BTreeMap<Attrs, u64>) -> u64 {
    series.values().sum()
}

fn rtt_of(points: &[HistPoint], port: u16) -> Option<HistPoint> {
    latest_histograms(points).into_values().find(|p| {
        p.attrs.get("server.address") == Some(&AttrValue::Str(B_V4.into()))
            && p.attrs.get("server.port") == Some(&AttrValue::Int(port.into()))
    })
}

#[test]
fn tcp_health_and_drops_match_what_was_done() {
    const TEST: &str = "tcp_health_and_drops_match_what_was_done";
    let [ebpf_built, btf] = common::ebpf_conditions();
    let tun = (
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing (the delay line needs a TUN device)",
    );
    let Some((tools, _)) = common::prerequisites_with(TEST, &[], &[ebpf_built, btf, tun]) else {
        return;
    };
    let mut guard = NetnsGuard::new(&tools);
    let a = guard.add("ha").expect("namespace A");
    let r = guard.add("hr").expect("namespace R");
    let b = guard.add("hb").expect("namespace B");
    guard
        .veth(
            &a,
            &end(
                "fthA",
                "02:00:00:00:04:0a",
                &format!("{A_V4}/24"),
                "fd00:4::1/64",
            ),
            &r,
            &end(
                "fthRa",
                "02:00:00:00:04:fe",
                &format!("{RA_V4}/24"),
                "fd00:4::fe/64",
            ),
        )
        .expect("veth A-R");
    guard
        .veth(
            &r,
            &end(
                "fthRb",
                "02:00:00:00:05:fe",
                &format!("{RB_V4}/24"),
                "fd00:5::fe/64",
            ),
            &b,
            &end(
                "fthB",
                "02:00:00:00:05:0b",
                &format!("{B_V4}/24"),
                "fd00:5::2/64",
            ),
        )
        .expect("veth R-B");
    a.ip(&["route", "add", "default", "via", RA_V4])
        .expect("A's route");
    b.ip(&["route", "add", "default", "via", RB_V4])
        .expect("B's route");
    for key in ["net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"] {
        r.sysctl(key, if key.ends_with("forward") { "1" } else { "0" })
            .expect("R's sysctls");
    }
    let delay = DelayLine::start(
        &r,
        IF_DELAY,
        Duration::from_secs_f64(DELAY_MS / 1000.0),
        LOSS_PERMILLE,
    )
    .expect("the delay line in R");
    r.sysctl(&format!("net.ipv4.conf.{IF_DELAY}.rp_filter"), "0")
        .expect("rp_filter off on the delay line");
    // A→B goes into the delay line; what comes out goes on to B.
    r.ip(&["route", "add", &format!("{B_V4}/32"), "dev", IF_DELAY])
        .expect("route into the delay line");
    r.ip(&[
        "rule", "add", "iif", IF_DELAY, "lookup", "100", "pref", "100",
    ])
    .expect("policy rule out of the delay line");
    r.ip(&[
        "route",
        "add",
        &format!("{B_V4}/32"),
        "dev",
        "fthRb",
        "table",
        "100",
    ])
    .expect("route out of the delay line");
    guard
        .nft(
            &a,
            "inet",
            "ft_health_drop",
            &format!(
                "chain out {{\n  type filter hook output priority 0; policy accept;\n  \
                 tcp dport {DROPPED_TCP_PORT} drop\n  udp dport {DROPPED_UDP_PORT} drop\n}}"
            ),
        )
        .expect("nft drop rules in A");

    let receiver = OtlpReceiver::start().expect("test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = a.path();
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
    let log = flowtel.output();
    assert!(
        !log.contains("TCP health unavailable"),
        "the TCP health programs did not load:\n{log}"
    );

    let server = TrafficServer::start(&b, &[addr(B_V4, SERVE_PORT)], &[]).expect("server in B");
    let bulk = traffic::tcp_connections(&a, addr(B_V4, SERVE_PORT), 1, 2 << 20, 64 << 10)
        .expect("bulk connection");
    let short = traffic::tcp_connections(&a, addr(B_V4, SERVE_PORT), SHORT, 1000, 1000)
        .expect("short connections");
    println!("{TEST}: bulk {bulk:?}, short {short:?}");
    let results = a
        .in_ns(|| {
            traffic::Failures {
                reset: addr(B_V4, SERVE_PORT),
                refused: (addr(B_V4, CLOSED_PORT), REFUSED),
                unanswered: addr(B_V4, DROPPED_TCP_PORT),
                udp_dropped: (addr(A_V4, 0), addr(B_V4, DROPPED_UDP_PORT), UDP_DROPPED),
            }
            .run()
        })
        .expect("entering A")
        .expect("client sockets in A");
    assert_eq!(results, (REFUSED, true), "(refused, timed out) as arranged");
    drop(server);
    // The last closes and the next dumps: flowtel has applied a dump begun
    // after the traffic (two intervals or more, time enough for a close
    // whose FIN the delay line dropped to be retransmitted).
    let now = flowtel.progress().expect("flowtel's /readyz");
    flowtel
        .wait_for_interval_after(&now, Duration::from_secs(30))
        .expect("flowtel dumps after the traffic");
    let status = flowtel.stop(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "flowtel did not exit 0: {status:?}\n{}",
        flowtel.output()
    );

    let points = receiver.sum_points(0);
    let opened = series_on(&points, "flowtel.tcp.connections.opened", SERVE_PORT);
    let closed = series_on(&points, "flowtel.tcp.connections.closed", SERVE_PORT);
    let retransmits = series_on(&points, "flowtel.tcp.retransmits", SERVE_PORT);
    let refused = series_on(&points, "flowtel.tcp.connections.failed", CLOSED_PORT);
    let unanswered = series_on(&points, "flowtel.tcp.connections.failed", DROPPED_TCP_PORT);
    let received = receiver.received(0);
    let rtt = rtt_of(&histogram_points(&received, "flowtel.tcp.rtt"), SERVE_PORT);
    let durations = rtt_of(
        &histogram_points(&received, "flowtel.tcp.connection.duration"),
        SERVE_PORT,
    );
    let drops: BTreeMap<Attrs, SumPoint> =
        common::otlp_receiver::latest(&points, "flowtel.packet.drops");
    for (what, s) in [
        ("opened", &opened),
        ("closed", &closed),
        ("retransmits", &retransmits),
        ("failed (closed port)", &refused),
        ("failed (dropped port)", &unanswered),
    ] {
        let shown: Vec<String> = s.iter().map(|(a, v)| format!("{}={v}", show(a))).collect();
        println!("{TEST}: {what}: {}", shown.join(" "));
    }
    println!(
        "{TEST}: delay line: {} packets passed, {} dropped",
        delay.passed.load(std::sync::atomic::Ordering::Relaxed),
        delay.dropped.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("{TEST}: rtt {rtt:?}");
    println!("{TEST}: duration {durations:?}");
    for (a, p) in &drops {
        println!("{TEST}: drops {} = {}", show(a), p.value);
    }

    let connections = 1 + SHORT + 1;
    assert_eq!(
        total(&opened),
        connections,
        "opened: bulk + short + aborted"
    );
    assert_eq!(
        value_where(&closed, "flowtel.tcp.close.cause", "fin"),
        1 + SHORT,
        "closed by FIN"
    );
    assert_eq!(
        value_where(&closed, "flowtel.tcp.close.cause", "reset"),
        1,
        "closed by reset (SO_LINGER 0)"
    );
    assert!(
        total(&retransmits) > 0,
        "2 % loss on 2 MiB must cause retransmits"
    );
    assert_eq!(
        value_where(&refused, "flowtel.tcp.failure", "refused"),
        REFUSED,
        "refused connects"
    );
    assert_eq!(
        value_where(&unanswered, "flowtel.tcp.failure", "no_answer"),
        1,
        "the connect whose SYNs nftables dropped"
    );
    let rtt = rtt.expect("an RTT histogram for the served port");
    let mean_ms = rtt.mean().unwrap_or(0.0) * 1000.0;
    // Ground truth: the kernel's own smoothed RTT of the same sockets when
    // their transfers were done. Under emulation (qemu TCG) the delay line
    // adds its own latency, so the nominal delay is not it.
    let kernel_ms = (bulk.srtt_sum_us + short.srtt_sum_us) as f64
        / (bulk.exchanges + short.exchanges) as f64
        / 1000.0;
    println!(
        "{TEST}: RTT mean {mean_ms:.2} ms over {} samples; the sockets' own srtt {kernel_ms:.2} ms ({:+.1} %); delay line {DELAY_MS} ms",
        rtt.count,
        (mean_ms - kernel_ms) / kernel_ms * 100.0
    );
    assert_eq!(rtt.unit, "s");
    assert!(
        kernel_ms >= DELAY_MS * 0.8,
        "the sockets' srtt {kernel_ms:.2} ms is below the {DELAY_MS} ms delay: the delay line is not in the path"
    );
    assert!(
        (mean_ms - kernel_ms).abs() <= kernel_ms * 0.2,
        "RTT mean {mean_ms:.2} ms is not within 20 % of the sockets' own srtt {kernel_ms:.2} ms"
    );
    let durations = durations.expect("a duration histogram for the served port");
    assert_eq!(
        durations.count, connections,
        "one duration per closed connection"
    );
    let drop_count = |reason: &str, transport: &str| -> u64 {
        drops
            .iter()
            .filter(|(a, _)| {
                a.get("flowtel.drop.reason") == Some(&AttrValue::Str(reason.into()))
                    && a.get("network.transport") == Some(&AttrValue::Str(transport.into()))
            })
            .map(|(_, p)| p.value)
            .sum()
    };
    assert_eq!(
        drop_count("NETFILTER_DROP", "udp"),
        UDP_DROPPED,
        "every UDP datagram nftables dropped"
    );
    assert!(
        drop_count("NETFILTER_DROP", "tcp") >= 1,
        "the SYNs nftables dropped"
    );
    assert!(
        drops.keys().all(|a| matches!(
            a.get("flowtel.drop.reason"),
            Some(AttrValue::Str(r)) if !r.is_empty() && r != "UNKNOWN"
        )),
        "every drop has a named reason"
    );
}
