//! Source precedence without double counting: the kernel source (conntrack)
//! and Cilium Hubble both on, Hubble reporting the very connection whose
//! bytes the kernel counts. `flowtel.flow.bytes` and `.packets` must equal
//! what crossed A's veth (within the 2 % the other end-to-end tests allow
//! for the kernel's own accounting), not that plus anything Hubble saw, and
//! Hubble's events must arrive under their own name.
//!
//! Needs root, `ip` and `nft` (see `tests/common/mod.rs`).

mod common;
// Only part of the Hubble test server is used here.
#[allow(dead_code)]
#[path = "common/hubble_server.rs"]
mod hubble_server;

use std::time::Duration;

use common::flowtel::{Flowtel, FlowtelArgs};
use common::otlp_receiver::{AttrValue, OtlpReceiver};
use common::scenario::{self, Lab, Plan, Series, Totals, A_V4, B_V4, TCP4_PORT};
use flowtel::source::hubble::proto;
use hubble_server::{respond, HubbleServer, Step};

const PLAN: Plan = Plan {
    tcp4: Some((4 << 20, 4 << 20)),
    tcp6: None,
    nat: None,
    udp4: None,
    udp6: None,
    short: None,
};

/// Hubble trace events of the same TCP connection A → B.
const HUBBLE_FLOWS: u32 = 40;

fn end(pod: &str, identity: u32) -> proto::Endpoint {
    proto::Endpoint {
        id: identity % 1000,
        identity,
        namespace: "lab".into(),
        labels: vec![format!("k8s:app={pod}")],
        pod_name: pod.into(),
        workloads: Vec::new(),
        cluster_name: "default".into(),
    }
}

fn trace(n: u32) -> Step {
    let reply = n % 2 == 1;
    let (src, dst, sip, dip, sport, dport) = if reply {
        (
            end("b", 2002),
            end("a", 1001),
            B_V4,
            A_V4,
            TCP4_PORT,
            45_000,
        )
    } else {
        (
            end("a", 1001),
            end("b", 2002),
            A_V4,
            B_V4,
            45_000,
            TCP4_PORT,
        )
    };
    let mut flow = hubble_server::flow(
        &format!("00000000-0000-4000-8000-{n:012}"),
        proto::Timestamp {
            seconds: 1_771_990_000 + i64::from(n),
            nanos: 0,
        },
        (src, sip, u32::from(sport)),
        (dst, dip, u32::from(dport)),
        false,
        proto::TrafficDirection::EGRESS,
        reply,
    );
    flow.node_name = "lab".into();
    respond(flow)
}

#[test]
fn kernel_and_hubble_on_the_same_traffic_count_bytes_once() {
    let test = "kernel_and_hubble_on_the_same_traffic_count_bytes_once";
    let Some(tools) = common::prerequisites(test, false) else {
        return;
    };
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the Hubble server");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("hubble.sock");
    let mut session: Vec<Step> = (0..HUBBLE_FLOWS).map(trace).collect();
    session.push(Step::Wait(Duration::from_secs(3600)));
    let _hubble = rt.block_on(async { HubbleServer::start(&socket, vec![session]) });

    let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let mut ft = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_HUBBLE__SOCKET", socket.display().to_string()),
            ("FLOWTEL_HUBBLE__ENABLED", "on".into()),
        ],
    })
    .expect("starting flowtel");
    ft.wait_ready(Duration::from_secs(20))
        .expect("flowtel becomes ready");

    let before = lab.counters().expect("reading A's veth counters");
    let servers = lab.servers().expect("starting the servers in B");
    let flows = scenario::run(&lab, &PLAN).expect("making the traffic");
    let errors = servers.errors();
    drop(servers);
    assert!(
        errors.is_empty(),
        "{test}: the servers in B failed: {errors:?}"
    );

    let series = scenario::wait_exported("receiver", &ft, Duration::from_secs(30), || {
        Series::from_points(&receiver.sum_points(0))
    });
    let after = lab.counters().expect("reading A's veth counters");
    let truth = Totals::from_counters(&before, &after);
    println!("{test}: expected (veth, L3): {truth}");
    println!("{test}: series:\n{}", series.describe());
    scenario::check_totals("receiver", &series.totals(), &truth, &series);
    scenario::check_flows("receiver", &flows, &series);

    // Hubble's events arrived, under their own name only.
    let points = receiver.sum_points(0);
    let hubble = common::otlp_receiver::latest(&points, "flowtel.hubble.flows");
    let hubble_total: u64 = hubble.values().map(|p| p.value).sum();
    assert_eq!(
        hubble_total,
        u64::from(HUBBLE_FLOWS),
        "{test}: flowtel.hubble.flows {hubble:?}"
    );
    let flow_names: Vec<&str> = points
        .iter()
        .filter(|p| p.metric.starts_with("flowtel.flow."))
        .filter(|p| {
            p.attrs.keys().any(|k| k.starts_with("flowtel.hubble."))
                || p.attrs.get("flowtel.source") == Some(&AttrValue::Str("hubble".into()))
        })
        .map(|p| p.metric.as_str())
        .collect();
    assert!(
        flow_names.is_empty(),
        "{test}: Hubble data in flowtel.flow.*: {flow_names:?}"
    );
    assert_eq!(
        ft.exit_status(),
        None,
        "{test}: flowtel exited\n{}",
        ft.output()
    );
    let status = ft.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{test}: exit {status:?}\n{}",
        ft.output()
    );
}
