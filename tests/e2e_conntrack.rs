//! End to end: flowtel reads the conntrack table of a client namespace while
//! known traffic crosses a dedicated veth pair, and exports OTLP to a
//! test-side receiver and to a real collector (rotel).
//!
//! Two runs, each with its own namespaces, receiver, rotel and two flowtel
//! processes on the same namespace:
//! * flowtel → test receiver over gRPC, flowtel → rotel over HTTP/protobuf;
//! * flowtel → test receiver over HTTP/protobuf, flowtel → rotel over gRPC.
//!
//! Traffic: TCP over IPv4 and IPv6, UDP over IPv4 and IPv6, a TCP connection
//! to a VIP that A DNATs to B, and 100 short TCP connections that open, carry
//! about 1 KB each way and close within one interval (their conntrack entries
//! are gone a second later, so they count through DESTROY events).
//!
//! Asserted, for what the receiver got and for what rotel printed:
//! * the sums over all series per direction match A's veth counters (L3)
//!   within 2 %, bytes and packets;
//! * each flow has its series with the right attributes, and bytes within
//!   its payload .. payload * 1.06 + 10 KB (short connections: payload ..
//!   payload + max headers of the packets reported);
//! * the NAT'ed flow shows the VIP as server and the backend in
//!   `flowtel.nat.server.*`;
//! * the flow metrics are cumulative monotonic sums in `By` / `{packet}`
//!   whose start time never moves, the transport is the one configured and
//!   the resource carries `service.name` and the test's attribute;
//! * flowtel's own counters (`/readyz`) show no lost conntrack event and no
//!   flow that ended unseen: every connection here ends with a DESTROY event,
//!   so an unseen end means a flow was swept and then counted twice;
//! * both flowtel processes are still running, and exit cleanly on SIGTERM.
//!
//! Needs root, `ip`, `nft` and rotel-agent (see `tests/common/mod.rs`).

mod common;

use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs};
use common::otlp_receiver::{AttrValue, OtlpReceiver, SumPoint, Transport};
use common::rotel::Rotel;
use common::scenario::{self, Lab, Plan, Series, Totals};

const INTERVAL: &str = "1s";

const PLAN: Plan = Plan {
    tcp4: Some((6 << 20, 6 << 20)),
    tcp6: Some((4 << 20, 4 << 20)),
    nat: Some((2 << 20, 3 << 20)),
    udp4: Some((1500, 1200, 1200)),
    udp6: Some((1500, 1200, 1200)),
    short: Some((100, 1000, 1000, 1)),
};

/// The most the exported numbers may take to show everything after the
/// traffic (an upper bound: the test goes on as soon as they do).
const STABLE_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn grpc_to_receiver_and_http_to_rotel() {
    run_scenario("grpc_to_receiver_and_http_to_rotel", Transport::Grpc);
}

#[test]
fn http_to_receiver_and_grpc_to_rotel() {
    run_scenario("http_to_receiver_and_grpc_to_rotel", Transport::Http);
}

/// The points rotel printed for the flowtel tagged `run`.
fn rotel_points(rotel: &Rotel, run: &str) -> Vec<SumPoint> {
    let tag = AttrValue::Str(run.to_string());
    rotel
        .sum_points()
        .into_iter()
        .filter(|p| p.resource.get("flowtel.test.run") == Some(&tag))
        .collect()
}

fn run_scenario(test: &str, to_receiver: Transport) {
    let Some(tools) = common::prerequisites(test, true) else {
        return;
    };
    let t0 = Instant::now();
    let rotel_bin = tools
        .rotel
        .clone()
        .expect("prerequisites found rotel-agent");
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
    let rotel = Rotel::start(&rotel_bin).expect("starting rotel-agent");
    let (receiver_endpoint, receiver_protocol, rotel_endpoint, rotel_protocol) = match to_receiver {
        Transport::Grpc => (
            receiver.grpc_endpoint(),
            "grpc",
            rotel.http_endpoint(),
            "http/protobuf",
        ),
        Transport::Http => (
            receiver.http_endpoint(),
            "http/protobuf",
            rotel.grpc_endpoint(),
            "grpc",
        ),
    };
    let run = format!("{test}-{}", std::process::id());
    let receiver_run = format!("{run}.receiver");
    let rotel_run = format!("{run}.rotel");
    let netns = lab.a.path();
    let start = |endpoint: &str, protocol: &str, tag: &str| {
        let mut f = Flowtel::start(&FlowtelArgs {
            source: "conntrack",
            netns: &netns,
            endpoint,
            protocol,
            interval: INTERVAL,
            env: vec![(
                "OTEL_RESOURCE_ATTRIBUTES",
                format!("flowtel.test.run={tag}"),
            )],
        })
        .expect("starting flowtel");
        f.wait_ready(Duration::from_secs(20))
            .expect("flowtel becomes ready");
        f
    };
    let mut to_receiver_ft = start(&receiver_endpoint, receiver_protocol, &receiver_run);
    let mut to_rotel_ft = start(&rotel_endpoint, rotel_protocol, &rotel_run);
    println!(
        "{test}: {:.1}s: flowtel {} -> receiver {receiver_endpoint} ({receiver_protocol}), \
         flowtel {} -> rotel {rotel_endpoint} ({rotel_protocol}), namespace {}",
        t0.elapsed().as_secs_f64(),
        to_receiver_ft.pid(),
        to_rotel_ft.pid(),
        lab.a.name
    );

    let before = lab.counters().expect("reading A's veth counters");
    let servers = lab.servers().expect("starting the servers in B");
    let flows = scenario::run(&lab, &PLAN).expect("making the traffic");
    println!("{test}: {:.1}s: traffic done", t0.elapsed().as_secs_f64());
    for f in &flows {
        println!("{test}: sent {:<5} {:?}", f.name, f.payload);
    }
    let server_errors = servers.errors();
    drop(servers);
    assert!(
        server_errors.is_empty(),
        "the servers in B failed: {server_errors:?}"
    );

    let series = scenario::wait_exported("receiver", &to_receiver_ft, STABLE_TIMEOUT, || {
        Series::from_points(&receiver.sum_points(0))
    });
    let after = lab.counters().expect("reading A's veth counters");
    let veth = after.since(&before);
    let truth = Totals::from_counters(&before, &after);
    println!("{test}: veth {} during the test: {veth:?}", scenario::IF_A);
    println!("{test}: expected (veth, L3): {truth}");
    println!("{test}: receiver series:\n{}", series.describe());
    let stats: Vec<(&str, serde_json::Value)> =
        [("receiver", &to_receiver_ft), ("rotel", &to_rotel_ft)]
            .into_iter()
            .map(|(name, f)| {
                let stats = f.stats().expect("flowtel's /readyz stats");
                println!("{test}: flowtel -> {name} self stats: {stats}");
                (name, stats)
            })
            .collect();

    scenario::check_totals("receiver", &series.totals(), &truth, &series);
    scenario::check_flows("receiver", &flows, &series);
    for (name, stats) in &stats {
        scenario::check_self_stats(&format!("flowtel -> {name}"), stats);
    }
    let points = receiver.sum_points(0);
    scenario::check_shape("receiver", &points);
    let received = receiver.received(0);
    let wrong: Vec<_> = received
        .iter()
        .filter(|r| r.transport != to_receiver)
        .map(|r| r.transport)
        .collect();
    assert!(
        wrong.is_empty(),
        "expected every export over {to_receiver:?}, got {wrong:?}"
    );
    let arrivals: Vec<String> = received
        .iter()
        .map(|r| format!("{:.1}s", r.at.duration_since(t0).as_secs_f64()))
        .collect();
    println!(
        "{test}: receiver got {} requests over {to_receiver:?} ({} gzip-encoded), at {}",
        received.len(),
        received.iter().filter(|r| r.gzip).count(),
        arrivals.join(" ")
    );
    let resource = receiver
        .resource_attributes()
        .expect("the receiver has a request with a resource");
    assert_eq!(
        resource.get("service.name"),
        Some(&AttrValue::Str("flowtel".into())),
        "resource: {}",
        common::otlp_receiver::show(&resource)
    );
    assert_eq!(
        resource.get("flowtel.test.run"),
        Some(&AttrValue::Str(receiver_run.clone())),
        "resource: {}",
        common::otlp_receiver::show(&resource)
    );

    // rotel: the same checks on what its debug exporter printed.
    let rotel_series = scenario::wait_exported("rotel", &to_rotel_ft, STABLE_TIMEOUT, || {
        Series::from_points(&rotel_points(&rotel, &rotel_run))
    });
    let log = rotel.log();
    let shown = rotel_series
        .bytes
        .iter()
        .find(|(attrs, p)| p.value > 0 && attrs.contains_key(scenario::DIRECTION));
    assert!(
        log.contains("Name: flowtel.flow.bytes") && shown.is_some(),
        "rotel ({rotel_protocol}) shows no {} data point with a value and attributes; its log \
         ends with:\n{}",
        scenario::BYTES,
        tail(&log, 80)
    );
    if let Some((attrs, p)) = shown {
        println!(
            "{test}: rotel ({rotel_protocol}) shows {} = {} {}",
            scenario::BYTES,
            p.value,
            common::otlp_receiver::show(attrs)
        );
    }
    println!("{test}: rotel series:\n{}", rotel_series.describe());
    scenario::check_totals(
        &format!("rotel ({rotel_protocol})"),
        &rotel_series.totals(),
        &truth,
        &rotel_series,
    );
    scenario::check_flows(&format!("rotel ({rotel_protocol})"), &flows, &rotel_series);
    scenario::check_shape(
        &format!("rotel ({rotel_protocol})"),
        &rotel_points(&rotel, &rotel_run),
    );

    for (name, f) in [
        ("receiver", &mut to_receiver_ft),
        ("rotel", &mut to_rotel_ft),
    ] {
        assert!(
            f.exit_status().is_none(),
            "flowtel -> {name} exited: {:?}\n{}",
            f.exit_status(),
            f.output()
        );
        let status = f.stop(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "flowtel -> {name} did not exit cleanly on SIGTERM within 10 s: {status:?}\n{}",
            f.output()
        );
    }
    println!("{test}: passed in {:?}", t0.elapsed());
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
