//! A collector that stalls for several intervals costs no record silently:
//! every flow record flowtel makes is either received (later, once the
//! collector answers again) or counted in `flowtel.logs.records.dropped`,
//! exactly.
//!
//! Each record is one UDP flow from A to B: one datagram from its own
//! source port, never answered and never ended during the test (A's
//! `nf_conntrack_udp_timeout` is ten minutes), so each flow has exactly one
//! flow record, in the interval whose dump first saw its packet. The ground
//! truth is the number of flows the test sent. flowtel reads A's conntrack
//! with a 1 s interval, a 1 s export timeout and two attempts, and a queue
//! of one interval, so the stall exercises all three paths: requests that
//! fail after their retries, intervals skipped because the log exporter's
//! queue was full, and intervals that waited and were delivered after the
//! stall.
//!
//! Needs root, `ip` and `nft` (see `tests/common/mod.rs`).

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs};
use common::otlp_receiver::OtlpReceiver;
use common::scenario::{Lab, A_V4, B_V4};

const TEST: &str = "collector_stall";
/// Where every flow goes; each comes from its own source port.
const PORT: u16 = 7777;
const BEFORE: usize = 40;
/// Flows sent during the stall, per second.
const PER_SECOND: usize = 25;
const STALL: Duration = Duration::from_secs(7);
const AFTER: usize = 40;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one datagram from a fresh socket of A to B, and keeps the socket
/// open so its source port is not reused by a later flow (which would be
/// the same conntrack entry); its source port.
fn flow(lab: &Lab, open: &mut Vec<UdpSocket>) -> u16 {
    let socket = lab
        .a
        .in_ns(|| {
            let socket = UdpSocket::bind(SocketAddr::new(A_V4.parse().expect("A"), 0))
                .expect("a UDP socket in A");
            socket
                .send_to(
                    b"one record",
                    SocketAddr::new(B_V4.parse().expect("B"), PORT),
                )
                .expect("sending to B");
            socket
        })
        .expect("running in A");
    let port = socket.local_addr().expect("the socket's address").port();
    open.push(socket);
    port
}

/// The flow records received so far, by client port, of flows to `PORT`.
fn received(receiver: &OtlpReceiver) -> BTreeMap<i64, usize> {
    let mut out = BTreeMap::new();
    for e in receiver.log_events() {
        if e.event_name == "flowtel.flow" && e.int("destination.port") == Some(i64::from(PORT)) {
            let port = e
                .int("source.port")
                .expect("a flow record has a source port");
            *out.entry(port).or_default() += 1;
        }
    }
    out
}

#[test]
fn records_are_received_or_counted_when_the_collector_stalls() {
    let Some(tools) = common::prerequisites(TEST, false) else {
        return;
    };
    let lab = Lab::new(&tools).expect("namespaces");
    for ns in [&lab.a, &lab.b] {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
            .expect("IPv6 off: no neighbour discovery flows");
    }
    lab.a
        .sysctl("net.netfilter.nf_conntrack_udp_timeout", "600")
        .expect("UDP flows outlive the test");
    // Bound in B so the datagrams are taken, not answered with ICMP.
    let _sink = lab
        .b
        .in_ns(|| UdpSocket::bind(SocketAddr::new(B_V4.parse().expect("B"), PORT)))
        .expect("running in B")
        .expect("a UDP socket in B");
    let receiver = OtlpReceiver::start().expect("the test receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_EXPORT__LOGS__RATE_LIMIT", "0".into()),
            ("FLOWTEL_EXPORT__OTLP__TIMEOUT", "1s".into()),
            ("FLOWTEL_EXPORT__OTLP__RETRY__MAX_ATTEMPTS", "2".into()),
            (
                "FLOWTEL_EXPORT__OTLP__RETRY__INITIAL_BACKOFF",
                "100ms".into(),
            ),
            ("FLOWTEL_EXPORT__OTLP__RETRY__MAX_BACKOFF", "200ms".into()),
            ("FLOWTEL_EXPORT__QUEUE_SIZE", "1".into()),
        ],
    })
    .expect("flowtel starts");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel ready");

    let mut open = Vec::new();
    let before: Vec<u16> = (0..BEFORE).map(|_| flow(&lab, &mut open)).collect();
    assert!(
        common::wait_until(TIMEOUT, Duration::from_millis(100), || {
            received(&receiver).len() == BEFORE
        }),
        "{TEST}: the healthy collector got {} of {BEFORE} records",
        received(&receiver).len()
    );

    receiver.stall(true);
    let stalled_at = Instant::now();
    let mut during = Vec::new();
    while stalled_at.elapsed() < STALL {
        during.extend((0..PER_SECOND).map(|_| flow(&lab, &mut open)));
        std::thread::sleep(Duration::from_secs(1));
    }
    during.extend((0..PER_SECOND).map(|_| flow(&lab, &mut open)));
    receiver.stall(false);
    let after: Vec<u16> = (0..AFTER).map(|_| flow(&lab, &mut open)).collect();
    let sent = before.len() + during.len() + after.len();

    // Until every record is accounted for, one way or the other.
    let account = || {
        let got: usize = received(&receiver).values().sum();
        let dropped = flowtel.stat("records_dropped").unwrap_or(0);
        (got, dropped)
    };
    let mut last = (0, 0);
    let settled = common::wait_until(TIMEOUT, Duration::from_millis(200), || {
        last = account();
        last.0 + last.1 as usize >= sent
    });
    let stats = flowtel.stats().expect("flowtel's /readyz stats");
    println!(
        "{TEST}: sent {sent}, received {}, dropped {}; stats {stats}",
        last.0, last.1
    );
    assert!(
        settled,
        "{TEST}: {sent} records sent, {} received + {} counted as dropped after {TIMEOUT:?}: \
         records were lost silently",
        last.0, last.1
    );

    let got = received(&receiver);
    let duplicated: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "{TEST}: records received twice: {duplicated:?}"
    );
    let ours: std::collections::BTreeSet<i64> = before
        .iter()
        .chain(&during)
        .chain(&after)
        .map(|p| i64::from(*p))
        .collect();
    let strangers: Vec<_> = got.keys().filter(|p| !ours.contains(p)).collect();
    assert!(
        strangers.is_empty(),
        "{TEST}: records of flows the test did not send: {strangers:?}"
    );
    let (received_total, dropped) = (got.len(), flowtel.stat("records_dropped").expect("stat"));
    assert_eq!(
        received_total as u64 + dropped,
        sent as u64,
        "{TEST}: sent = received + counted as dropped must hold exactly"
    );
    assert!(
        before.iter().all(|p| got.contains_key(&i64::from(*p))),
        "{TEST}: a record from before the stall is missing"
    );
    let late = during
        .iter()
        .filter(|p| got.contains_key(&i64::from(**p)))
        .count();
    let skipped = flowtel.stat("intervals_skipped").expect("stat");
    println!(
        "{TEST}: of {} records made during the stall, {late} arrived after it; {dropped} dropped; \
         {skipped} intervals skipped; {} requests reached the stalled collector",
        during.len(),
        receiver.stalled_requests()
    );
    assert!(
        dropped > 0,
        "{TEST}: a {STALL:?} stall with 1 s timeouts must cost records"
    );
    assert!(
        skipped > 0,
        "{TEST}: a queue of one interval must overflow in the stall"
    );
    assert!(
        late > 0,
        "{TEST}: the interval that waited in the queue was not delivered later"
    );
    assert!(
        receiver.stalled_requests() > 0,
        "{TEST}: the collector never stalled a request"
    );
    let status = flowtel.stop(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "{TEST}: flowtel did not exit cleanly: {status:?}"
    );
}
