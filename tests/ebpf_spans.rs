//! Connection spans across two nodes: namespaces A (client, pod `checkout`)
//! and B (server, pod `payments`), each with its own flowtel (`--source ebpf
//! --netns A` and `--netns B`, nodes `node-a` and `node-b`) naming pods from
//! the test API server and exporting spans to the test receiver. In the
//! first test the spans go through rotel (a real collector, forwarding over
//! OTLP gRPC) to the test receiver, which checks them exactly.
//!
//! * One connection A → B directly and one through the Service VIP that A
//!   DNATs to B: the client span from A and the server span from B share
//!   the trace id, the server span's parent is the client span, their
//!   bytes are within 1 % of A's veth counters (L3: less 14 Ethernet bytes
//!   a frame; both veths send one segment per skb, `gso_max_segs 1`, so the
//!   counters see wire segments), and each resource's `service.name` is
//!   the pod's Deployment.
//! * One more connection whose SYN and SYN-ACK a packet socket in B
//!   captures: its spans' trace id is the one derived from the sequence
//!   numbers on the wire, so the kernel fields read are the ISNs.
//! * A refused, a reset and an unanswered connection: client spans with
//!   status ERROR and the reason.
//! * 2,000 connections sampled at 10 %: the same connections on both
//!   nodes, and as many as the binomial bound allows.
//!
//! Needs root and a binary built with eBPF on a kernel with BTF.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::kubeapi::{fx, KubeApi};
use common::netns::{IfStats, Netns};
use common::otlp_receiver::{AttrValue, OtlpReceiver, ReceivedSpan};
use common::rotel::Rotel;
use common::scenario::{
    Lab, A_V4, B_V4, IF_A, IF_B, NAT_BACKEND_PORT, SHORT_PORT, TCP4_PORT, VIP, VIP_PORT,
};
use common::traffic::{self, Failures};
use common::{deviation_pct, within};
use flowtel::flow::spans::SpanIds;

const TOLERANCE: f64 = 0.01;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Nothing listens there in B: connects are refused.
const CLOSED_PORT: u16 = 9999;
/// A's nftables drops SYNs to it: the connect is never answered.
const DROPPED_PORT: u16 = 9997;
const SERVER_KIND: i32 = 2;
const CLIENT_KIND: i32 = 3;
const STATUS_ERROR: i32 = 2;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("literal address"), port)
}

/// The lab, with one segment per skb on both veths.
fn lab(tools: &common::Prerequisites) -> Lab {
    let mut lab = Lab::new(tools).expect("setting up the namespaces");
    for (ns, ifname) in [(&lab.a, IF_A), (&lab.b, IF_B)] {
        ns.ip(&["link", "set", "dev", ifname, "gso_max_segs", "1"])
            .expect("one segment per skb");
    }
    let a = lab.a.clone();
    lab.guard
        .nft(
            &a,
            "inet",
            "ft_spans",
            &format!(
                "chain out {{\n  type filter hook output priority 0; policy accept;\n  \
                 tcp dport {DROPPED_PORT} drop\n}}"
            ),
        )
        .expect("dropping SYNs to the unanswered port");
    lab
}

fn flowtel(
    ns: &Netns,
    node: &str,
    receiver: &OtlpReceiver,
    sampling: &str,
    kubeconfig: Option<&std::path::Path>,
    traces_endpoint: Option<String>,
) -> Flowtel {
    let endpoint = receiver.grpc_endpoint();
    let netns = ns.path();
    let mut env = vec![
        ("FLOWTEL_RESOURCE__NODE_NAME", node.to_string()),
        ("FLOWTEL_EXPORT__TRACES__ENABLED", "true".to_string()),
        ("FLOWTEL_EXPORT__TRACES__SAMPLING", sampling.to_string()),
        ("FLOWTEL_EBPF__DROPS__ENABLED", "false".to_string()),
    ];
    if let Some(t) = traces_endpoint {
        env.push(("FLOWTEL_EXPORT__OTLP__TRACES__ENDPOINT", t));
    }
    if let Some(k) = kubeconfig {
        env.push(("FLOWTEL_KUBERNETES__KUBECONFIG", k.display().to_string()));
    }
    let mut ft = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env,
    })
    .expect("starting flowtel");
    ft.wait_ready(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("flowtel for {node} not ready: {e:#}\n{}", ft.output()));
    ft
}

fn int(span: &ReceivedSpan, key: &str) -> u64 {
    span.int(key)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or_else(|| panic!("span without {key}: {span:?}"))
}

fn service(span: &ReceivedSpan) -> Option<&str> {
    match span.resource.get("service.name") {
        Some(AttrValue::Str(s)) => Some(s),
        _ => None,
    }
}

fn check_bytes(what: &str, actual: u64, expected: u64) {
    println!(
        "{what}: span {actual}, veth {expected} ({:+.3} %)",
        deviation_pct(actual, expected)
    );
    assert!(
        within(actual, expected, TOLERANCE),
        "{what}: span says {actual} bytes, the veth counted {expected} ({:+.2} %)",
        deviation_pct(actual, expected)
    );
}

#[test]
fn both_nodes_spans_join_into_one_trace_direct_and_through_a_vip() {
    const TEST: &str = "both_nodes_spans_join_into_one_trace_direct_and_through_a_vip";
    let Some((tools, extra)) =
        common::prerequisites_with(TEST, &[common::ROTEL_AGENT], &common::ebpf_conditions())
    else {
        return;
    };
    let _serial = serial();
    let lab = lab(&tools);
    let _server = lab.servers().expect("servers in B");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the API server");
    let api = KubeApi::new();
    rt.block_on(api.start());
    let checkout = fx::workload("Deployment", "shop", "checkout");
    let checkout_rs = fx::replicaset("shop", "checkout-5d8f7c9b6", Some(&checkout));
    let payments = fx::workload("Deployment", "shop", "payments");
    let payments_rs = fx::replicaset("shop", "payments-6b7f9c4d2", Some(&payments));
    let checkout_pod = fx::PodFx::new("shop", "checkout")
        .on("node-a", A_V4)
        .ips(&[A_V4])
        .owned_by(&checkout_rs)
        .build();
    let payments_pod = fx::PodFx::new("shop", "payments")
        .on("node-b", B_V4)
        .ips(&[B_V4])
        .owned_by(&payments_rs)
        .build();
    let svc = fx::service("shop", "payments", &[VIP]);
    let slice = fx::endpoint_slice(&svc, "IPv4", &[&payments_pod]);
    api.load([
        fx::node("node-a", "zone-a", "region-1", &[A_V4], None),
        fx::node("node-b", "zone-a", "region-1", &[B_V4], None),
        checkout_rs,
        payments_rs,
        checkout_pod,
        payments_pod,
        svc,
        slice,
    ]);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = api.write_kubeconfig(dir.path());
    let receiver = OtlpReceiver::start().expect("test OTLP receiver");
    let args: Vec<String> = [
        "--exporter",
        "otlp",
        "--otlp-exporter-protocol",
        "grpc",
        "--otlp-exporter-endpoint",
        &receiver.grpc_endpoint(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let rotel = Rotel::start_with(&extra[0], &args).expect("starting rotel");
    let via_rotel = || Some(rotel.grpc_endpoint());
    let ft_a = flowtel(
        &lab.a,
        "node-a",
        &receiver,
        "1",
        Some(&kubeconfig),
        via_rotel(),
    );
    let ft_b = flowtel(
        &lab.b,
        "node-b",
        &receiver,
        "1",
        Some(&kubeconfig),
        via_rotel(),
    );
    for ft in [&ft_a, &ft_b] {
        let synced = ft
            .wait_for_kube_synced(TIMEOUT)
            .unwrap_or_else(|e| panic!("{TEST}: {e:#}"));
        ft.wait_for_dump_after(&synced, TIMEOUT)
            .unwrap_or_else(|e| panic!("{TEST}: {e:#}"));
    }

    let mut measured: Vec<(u16, u16, IfStats)> = Vec::new();
    for (dst, backend_port) in [
        (sock(B_V4, TCP4_PORT), TCP4_PORT),
        (sock(VIP, VIP_PORT), NAT_BACKEND_PORT),
    ] {
        let before = lab.counters().expect("A's veth counters");
        traffic::tcp_connections(&lab.a, dst, 1, 300_000, 600_000).expect("a transfer from A");
        let delta = lab.counters().expect("A's veth counters").since(&before);
        measured.push((dst.port(), backend_port, delta));
    }
    // A socket that sees every frame in B, opened before the connection.
    let capture = lab
        .b
        .in_ns(packet_socket)
        .expect("entering B")
        .expect("a packet socket in B");
    traffic::tcp_connections(&lab.a, sock(B_V4, SHORT_PORT), 1, 0, 0).expect("a probe from A");
    let (probe_port, isn_client, isn_server) =
        handshake(&capture, SHORT_PORT).expect("the probe's SYN and SYN-ACK");
    let failures = Failures {
        reset: sock(B_V4, TCP4_PORT),
        refused: (sock(B_V4, CLOSED_PORT), 1),
        unanswered: sock(B_V4, DROPPED_PORT),
        udp_dropped: (sock(A_V4, 0), sock(B_V4, 9), 0),
    };
    let (refused, timed_out) = lab
        .a
        .in_ns(|| failures.run())
        .expect("entering A")
        .expect("the failing connections");
    assert_eq!((refused, timed_out), (1, true), "the failures did not fail");

    // 6 client spans (2 transfers, probe, reset, refused, unanswered), 4
    // server spans (2 transfers, probe, reset).
    let arrived = common::wait_until(TIMEOUT, Duration::from_millis(200), || {
        let spans = receiver.spans();
        spans.iter().filter(|s| s.kind == CLIENT_KIND).count() >= 6
            && spans.iter().filter(|s| s.kind == SERVER_KIND).count() >= 4
    });
    let spans = receiver.spans();
    assert!(
        arrived,
        "{TEST}: spans missing: {spans:#?}\nA: {}\nB: {}\nrotel: {}",
        ft_a.output(),
        ft_b.output(),
        rotel.log()
    );
    let client_to = |port: u16| {
        spans
            .iter()
            .find(|s| s.kind == CLIENT_KIND && s.int("server.port") == Some(port.into()))
            .unwrap_or_else(|| panic!("no client span to port {port}: {spans:#?}"))
    };
    for (port, backend_port, veth) in &measured {
        let c = client_to(*port);
        let s = spans
            .iter()
            .find(|s| s.kind == SERVER_KIND && s.trace_id == c.trace_id)
            .unwrap_or_else(|| panic!("no server span in the trace of {c:#?}: {spans:#?}"));
        println!(
            "port {port}: trace {} client span {} server span {} parent {}",
            hex(&c.trace_id),
            hex(&c.span_id),
            hex(&s.span_id),
            hex(&s.parent_span_id)
        );
        assert_eq!(s.parent_span_id, c.span_id, "the server span's parent");
        assert!(c.parent_span_id.is_empty(), "a client span is a root");
        assert_eq!(s.int("server.port"), Some((*backend_port).into()));
        assert_eq!(c.str("client.address"), Some(A_V4));
        assert_eq!(s.str("client.address"), Some(A_V4));
        // Through the VIP, A's conntrack names the backend that answered.
        let nat = (
            c.str("flowtel.nat.server.address"),
            c.int("flowtel.nat.server.port"),
        );
        if *port == VIP_PORT {
            assert_eq!(nat, (Some(B_V4), Some((*backend_port).into())), "{c:?}");
        } else {
            assert_eq!(nat, (None, None), "a direct connection: {c:?}");
        }
        // The peer is named from the pod that answered, not only the VIP's
        // Service.
        let peer = (
            c.str("peer.service"),
            c.str("flowtel.peer.k8s.workload.name"),
        );
        assert_eq!(peer, (Some("payments"), Some("payments")), "{c:?}");
        println!(
            "port {port}: client span server.address {:?}, flowtel.nat.server {:?}, (peer.service, flowtel.peer.k8s.workload.name) {:?}",
            c.str("server.address"),
            nat,
            peer
        );
        assert_eq!(
            service(c),
            Some("checkout"),
            "client resource {:?}",
            c.resource
        );
        assert_eq!(
            service(s),
            Some("payments"),
            "server resource {:?}",
            s.resource
        );
        assert_eq!(c.status.0, 0, "an orderly close is no error: {c:?}");
        let (tx, rx) = (veth.tx_l3_bytes(), veth.rx_l3_bytes());
        check_bytes("client sent", int(c, "flowtel.connection.sent.bytes"), tx);
        check_bytes(
            "client received",
            int(c, "flowtel.connection.received.bytes"),
            rx,
        );
        check_bytes(
            "server received",
            int(s, "flowtel.connection.received.bytes"),
            tx,
        );
        check_bytes("server sent", int(s, "flowtel.connection.sent.bytes"), rx);
    }
    let probe = spans
        .iter()
        .find(|s| s.kind == CLIENT_KIND && s.int("client.port") == Some(probe_port.into()))
        .unwrap_or_else(|| panic!("no client span from port {probe_port}: {spans:#?}"));
    let wire = SpanIds::of(isn_client, Some(isn_server));
    println!(
        "wire ISNs client {isn_client:#010x} server {isn_server:#010x}: trace {}, span trace {}",
        hex(&wire.trace),
        hex(&probe.trace_id)
    );
    assert_eq!(probe.trace_id, wire.trace, "trace id from the wire's ISNs");
    assert_eq!(
        probe.span_id, wire.client,
        "client span id from the wire's ISNs"
    );
    for (port, message) in [
        (CLOSED_PORT, "connection failed: refused"),
        (DROPPED_PORT, "connection failed: no_answer"),
    ] {
        let c = client_to(port);
        assert_eq!(c.status, (STATUS_ERROR, message.to_string()), "{c:?}");
    }
    let reset: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.kind == CLIENT_KIND && s.int("server.port") == Some(TCP4_PORT.into()))
        .filter(|s| s.status.0 == STATUS_ERROR)
        .collect();
    assert_eq!(reset.len(), 1, "one reset connection: {spans:#?}");
    assert_eq!(reset[0].status.1, "connection closed by reset");

    // The service graph Tempo's metrics generator and the Collector's
    // servicegraph connector draw from these spans alone: 4 paired edges
    // (2 transfers, the probe, the reset one, which failed) and 2 virtual
    // ones (refused, unanswered, both failed).
    let graph = service_graph(&spans);
    println!("service graph: {graph:?}");
    let edge = |connection_type| Edge {
        client: "checkout".into(),
        server: "payments".into(),
        connection_type,
    };
    assert_eq!(
        graph,
        BTreeMap::from([(edge(""), (4, 1)), (edge("virtual_node"), (2, 2))]),
        "{spans:#?}"
    );
}

/// One edge of a service graph, as the servicegraph metrics label it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Edge {
    client: String,
    server: String,
    connection_type: &'static str,
}

/// The service graph by the rules of Tempo's metrics generator and the
/// Collector's servicegraph connector (neither can run here: no package
/// ships Tempo, and the PyPI Collector lacks the connector): a `CLIENT` span
/// and the `SERVER` span whose parent it is, in one trace, make an edge
/// from the client's resource `service.name` to the server's; a client span
/// left without one makes an edge to the virtual node its `peer.service`
/// names. An edge fails when either span has status `ERROR`. Edge → (
/// requests, failed).
fn service_graph(spans: &[ReceivedSpan]) -> BTreeMap<Edge, (u64, u64)> {
    let mut graph = BTreeMap::new();
    for c in spans.iter().filter(|s| s.kind == CLIENT_KIND) {
        let server = spans.iter().find(|s| {
            s.kind == SERVER_KIND && s.trace_id == c.trace_id && s.parent_span_id == c.span_id
        });
        let (to, connection_type, failed) = match server {
            Some(s) => (
                service(s),
                "",
                c.status.0 == STATUS_ERROR || s.status.0 == STATUS_ERROR,
            ),
            None => (
                c.str("peer.service"),
                "virtual_node",
                c.status.0 == STATUS_ERROR,
            ),
        };
        let edge = Edge {
            client: service(c).unwrap_or_default().to_string(),
            server: to.unwrap_or_default().to_string(),
            connection_type,
        };
        let e: &mut (u64, u64) = graph.entry(edge).or_default();
        e.0 += 1;
        e.1 += u64::from(failed);
    }
    graph
}

/// An `AF_PACKET` socket receiving every frame of the namespace it is
/// opened in, non-blocking.
fn packet_socket() -> std::io::Result<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be() as i32;
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, all) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor just opened and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The client port and both ISNs of the first handshake to `port` the
/// packet socket holds: the SYN's sequence number and the SYN-ACK's.
fn handshake(fd: &OwnedFd, port: u16) -> Option<(u16, u32, u32)> {
    let (mut syn, mut syn_ack) = (None, None);
    let mut frame = [0u8; 2048];
    loop {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            break;
        };
        // Ethernet, IPv4 (no options on these), TCP.
        let f = &frame[..n];
        if n < 14 + 20 + 20 || f[12..14] != [0x08, 0x00] || f[14 + 9] != 6 {
            continue;
        }
        let tcp = &f[14 + usize::from(f[14] & 0x0f) * 4..];
        let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
        let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let flags = tcp[13];
        match (flags & 0x12, sport, dport) {
            (0x02, _, d) if d == port && syn.is_none() => syn = Some((sport, seq)),
            (0x12, s, d) if s == port && syn.is_some_and(|(p, _)| p == d) => {
                syn_ack = Some(seq);
            }
            _ => {}
        }
    }
    let (client_port, isn_client) = syn?;
    Some((client_port, isn_client, syn_ack?))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn sampling_picks_the_same_connections_on_both_nodes() {
    const TEST: &str = "sampling_picks_the_same_connections_on_both_nodes";
    const CONNECTIONS: u64 = 2_000;
    const RATE: f64 = 0.1;
    let Some((tools, _)) = common::prerequisites_with(TEST, &[], &common::ebpf_conditions()) else {
        return;
    };
    let _serial = serial();
    let lab = lab(&tools);
    let _server = lab.servers().expect("servers in B");
    let receiver = OtlpReceiver::start().expect("test OTLP receiver");
    let ft_a = flowtel(&lab.a, "node-a", &receiver, "0.1", None, None);
    let ft_b = flowtel(&lab.b, "node-b", &receiver, "0.1", None, None);
    traffic::tcp_connections(&lab.a, sock(B_V4, SHORT_PORT), CONNECTIONS, 0, 0)
        .expect("connections from A");
    // Every close is in the ring buffer by now; an interval that began
    // after this reading has taken them, and its export is done when the
    // next dump starts.
    for ft in [&ft_a, &ft_b] {
        let now = ft.progress().expect("readyz");
        ft.wait_for_interval_after(&now, TIMEOUT)
            .unwrap_or_else(|e| panic!("{TEST}: {e:#}"));
    }
    let ids = |kind: i32| -> BTreeSet<Vec<u8>> {
        receiver
            .spans()
            .iter()
            .filter(|s| s.kind == kind && s.int("server.port") == Some(SHORT_PORT.into()))
            .map(|s| s.trace_id.clone())
            .collect()
    };
    // The two exporters finish on their own schedule: wait until both
    // nodes' spans are in (or time out and compare what came).
    common::wait_until(TIMEOUT, Duration::from_millis(200), || {
        let clients = ids(CLIENT_KIND);
        !clients.is_empty() && clients == ids(SERVER_KIND)
    });
    let (clients, servers) = (ids(CLIENT_KIND), ids(SERVER_KIND));
    let n = CONNECTIONS as f64;
    let (mean, sd) = (n * RATE, (n * RATE * (1.0 - RATE)).sqrt());
    println!(
        "sampled: {} on A, {} on B, {} on both; expected {mean} ± {sd:.1} (5 sigma: ±{:.0})",
        clients.len(),
        servers.len(),
        clients.intersection(&servers).count(),
        5.0 * sd
    );
    assert_eq!(
        clients, servers,
        "the two nodes sampled different connections"
    );
    assert!(
        (clients.len() as f64 - mean).abs() <= 5.0 * sd,
        "{} sampled of {CONNECTIONS} at {RATE}: outside {mean} ± 5 × {sd:.1}",
        clients.len()
    );
}
