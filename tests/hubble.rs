//! The Hubble source against a local Observer server on a Unix socket:
//! realistic flows come out as exact counts and converted records; a
//! stream that fails or drops mid-way, a socket that appears late and a
//! message of garbage are counted and survived; the series budget holds.

#[path = "common/hubble_server.rs"]
mod hubble_server;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use flowtel::flow::model::Transport;
use flowtel::source::hubble::{
    self, proto, Direction, Enabled, HubbleConfig, HubbleFlow, HubbleHandle, HubbleReport, L7Record,
};
use hubble_server::{flow, l7, respond, HubbleServer, Step};
use tonic::Status;

// ---------- fixtures: flows shaped like a Cilium 1.19 agent's ----------

/// A pod end with the labels Cilium gives every pod.
fn pod(
    namespace: &str,
    pod: &str,
    workload: Option<(&str, &str)>,
    identity: u32,
    id: u32,
) -> proto::Endpoint {
    let app = workload.map_or(pod, |(name, _)| name);
    proto::Endpoint {
        id,
        identity,
        namespace: namespace.into(),
        labels: vec![
            format!("k8s:app={app}"),
            format!("k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name={namespace}"),
            "k8s:io.cilium.k8s.policy.cluster=default".into(),
            "k8s:io.cilium.k8s.policy.serviceaccount=default".into(),
            format!("k8s:io.kubernetes.pod.namespace={namespace}"),
        ],
        pod_name: pod.into(),
        workloads: workload
            .map(|(name, kind)| {
                vec![proto::Workload {
                    name: name.into(),
                    kind: kind.into(),
                }]
            })
            .into_iter()
            .flatten()
            .collect(),
        cluster_name: "default".into(),
    }
}

fn web() -> proto::Endpoint {
    pod(
        "shop",
        "web-6d9f7c8b5-x2k4q",
        Some(("web", "Deployment")),
        41_231,
        1207,
    )
}
fn api() -> proto::Endpoint {
    pod(
        "shop",
        "api-77b9d6f4c-p8zlm",
        Some(("api", "Deployment")),
        18_944,
        988,
    )
}
fn coredns() -> proto::Endpoint {
    pod(
        "kube-system",
        "coredns-5d78c9869d-8wq2n",
        Some(("coredns", "Deployment")),
        102,
        311,
    )
}
fn producer() -> proto::Endpoint {
    pod(
        "shop",
        "orders-5f6c7d8e9-q1w2e",
        Some(("orders", "Deployment")),
        27_310,
        640,
    )
}
fn kafka() -> proto::Endpoint {
    pod("data", "kafka-0", Some(("kafka", "StatefulSet")), 33_002, 0)
}
fn world() -> proto::Endpoint {
    proto::Endpoint {
        identity: 2,
        labels: vec!["reserved:world".into()],
        ..proto::Endpoint::default()
    }
}

const WEB_IP: &str = "10.0.1.5";
const API_IP: &str = "10.0.2.7";
const SCANNER_IP: &str = "10.0.3.9";
const DNS_IP: &str = "10.0.0.10";
const ORDERS_IP: &str = "10.0.1.22";
const KAFKA_IP: &str = "10.0.4.3";

fn at(seconds: i64, nanos: i32) -> proto::Timestamp {
    proto::Timestamp {
        seconds: 1_771_990_000 + seconds,
        nanos,
    }
}

fn http(method: &str, code: u32, url: &str) -> proto::Record {
    proto::Record::Http(proto::Http {
        code,
        method: method.into(),
        url: url.into(),
        protocol: "HTTP/1.1".into(),
        headers: vec![proto::HttpHeader {
            key: "X-Request-Id".into(),
            value: "9f1c2e".into(),
        }],
    })
}

fn lost(source: proto::LostEventSource, count: u64) -> Step {
    Step::Send(Box::new(proto::GetFlowsResponse {
        response_types: Some(proto::ResponseTypes::LostEvents(proto::LostEvent {
            source: source as i32,
            num_events_lost: count,
            cpu: Some(proto::Int32Value { value: 1 }),
        })),
        node_name: "kind-worker".into(),
        time: Some(at(0, 0)),
    }))
}

/// A plain forwarded web -> api TCP flow, numbered.
fn tcp_flow(n: i64) -> proto::Flow {
    flow(
        &format!("00000000-0000-4000-8000-{n:012}"),
        at(n, 0),
        (web(), WEB_IP, 40_000 + n as u32),
        (api(), API_IP, 8080),
        false,
        proto::TrafficDirection::EGRESS,
        false,
    )
}

/// The realistic mix of test (1), in the order the agent sends it.
fn realistic() -> Vec<Step> {
    use proto::L7FlowType::{REQUEST, RESPONSE};
    use proto::TrafficDirection::{EGRESS, INGRESS};
    let web_ = |port| (web(), WEB_IP, port);
    let api_ = |port| (api(), API_IP, port);
    let mut dropped = flow(
        "a1f0c3de-0003-4c2a-9d55-5b1e2f6a7c03",
        at(1, 300),
        (
            pod("default", "scanner", None, 55_001, 77),
            SCANNER_IP,
            51_000,
        ),
        api_(5432),
        false,
        INGRESS,
        false,
    );
    dropped.verdict = proto::Verdict::DROPPED as i32;
    dropped.drop_reason = 133;
    dropped.drop_reason_desc = proto::DropReason::POLICY_DENIED as i32;
    let url = "http://api.shop.svc.cluster.local:8080/v1/cart?session=s3cr3t-token";
    let dns_req = l7(
        flow(
            "a1f0c3de-0007-4c2a-9d55-5b1e2f6a7c07",
            at(3, 0),
            web_(36_001),
            (coredns(), DNS_IP, 53),
            true,
            EGRESS,
            false,
        ),
        REQUEST,
        0,
        proto::Record::Dns(proto::Dns {
            query: "nope.example.com.".into(),
            qtypes: vec!["A".into()],
            observation_source: "proxy".into(),
            ..proto::Dns::default()
        }),
    );
    let dns_resp = l7(
        flow(
            "a1f0c3de-0008-4c2a-9d55-5b1e2f6a7c08",
            at(3, 2_000_000),
            (coredns(), DNS_IP, 53),
            web_(36_001),
            true,
            EGRESS,
            true,
        ),
        RESPONSE,
        2,
        proto::Record::Dns(proto::Dns {
            query: "nope.example.com.".into(),
            rcode: 3,
            qtypes: vec!["A".into()],
            observation_source: "proxy".into(),
            ..proto::Dns::default()
        }),
    );
    let kafka_record = |error_code| {
        proto::Record::Kafka(proto::Kafka {
            error_code,
            api_version: 9,
            api_key: "produce".into(),
            correlation_id: 17,
            topic: "orders".into(),
        })
    };
    let kafka_req = l7(
        flow(
            "a1f0c3de-0009-4c2a-9d55-5b1e2f6a7c09",
            at(4, 0),
            (producer(), ORDERS_IP, 45_100),
            (kafka(), KAFKA_IP, 9092),
            false,
            EGRESS,
            false,
        ),
        REQUEST,
        0,
        kafka_record(0),
    );
    let kafka_resp = l7(
        flow(
            "a1f0c3de-0010-4c2a-9d55-5b1e2f6a7c10",
            at(4, 4_000_000),
            (kafka(), KAFKA_IP, 9092),
            (producer(), ORDERS_IP, 45_100),
            false,
            EGRESS,
            true,
        ),
        RESPONSE,
        4,
        kafka_record(0),
    );
    let from_world = flow(
        "a1f0c3de-0011-4c2a-9d55-5b1e2f6a7c11",
        at(5, 0),
        (world(), "203.0.113.50", 61_000),
        web_(443),
        false,
        INGRESS,
        false,
    );
    vec![
        respond(flow(
            "a1f0c3de-0001-4c2a-9d55-5b1e2f6a7c01-syn",
            at(1, 0),
            web_(43_512),
            api_(8080),
            false,
            EGRESS,
            false,
        )),
        respond(flow(
            "a1f0c3de-0002-4c2a-9d55-5b1e2f6a7c02",
            at(1, 100),
            api_(8080),
            web_(43_512),
            false,
            EGRESS,
            true,
        )),
        respond(dropped),
        lost(proto::LostEventSource::PERF_EVENT_RING_BUFFER, 17),
        respond(l7(
            flow(
                "a1f0c3de-0004-4c2a-9d55-5b1e2f6a7c04",
                at(2, 0),
                web_(43_512),
                api_(8080),
                false,
                EGRESS,
                false,
            ),
            REQUEST,
            0,
            http("GET", 0, url),
        )),
        respond(l7(
            flow(
                "a1f0c3de-0005-4c2a-9d55-5b1e2f6a7c05",
                at(2, 12_000_000),
                api_(8080),
                web_(43_512),
                false,
                EGRESS,
                true,
            ),
            RESPONSE,
            12,
            http("GET", 200, url),
        )),
        respond(l7(
            flow(
                "a1f0c3de-0006-4c2a-9d55-5b1e2f6a7c06",
                at(2, 900_000_000),
                api_(8080),
                web_(43_512),
                false,
                EGRESS,
                true,
            ),
            RESPONSE,
            1200,
            http("GET", 503, url),
        )),
        respond(dns_req),
        respond(dns_resp),
        respond(kafka_req),
        respond(kafka_resp),
        lost(proto::LostEventSource::OBSERVER_EVENTS_QUEUE, 3),
        respond(from_world),
    ]
}

// ---------- harness ----------

fn config(socket: &Path) -> HubbleConfig {
    // The client's warnings show with `--nocapture`.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    HubbleConfig {
        enabled: Enabled::On,
        socket: socket.to_path_buf(),
        reconnect_backoff_max: Duration::from_millis(200),
        max_series: 100,
        max_records: 100,
        log_interval: Duration::from_secs(60),
    }
}

/// Polls reports until `done` holds (10 s at most), keeping every record.
async fn wait_for(
    handle: &HubbleHandle,
    records: &mut Vec<HubbleFlow>,
    done: impl Fn(&HubbleReport) -> bool,
) -> HubbleReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut report = handle.report();
        records.append(&mut report.records);
        if done(&report) {
            return report;
        }
        assert!(
            Instant::now() < deadline,
            "timed out; last report: {:#?}",
            report.stream
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type FlowRow = (
    &'static str,
    String,
    &'static str,
    &'static str,
    String,
    String,
);

/// `flowtel.hubble.flows` as (verdict, drop reason, direction, is_reply,
/// "ns/kind/workload" of source, of destination) -> count.
fn flow_rows(report: &HubbleReport) -> BTreeMap<FlowRow, u64> {
    let end = |k: &hubble::EndKey| format!("{}/{}/{}", k.namespace, k.workload_kind, k.workload);
    report
        .flows
        .iter()
        .map(|s| {
            (
                (
                    s.key.verdict,
                    s.key.drop_reason.clone(),
                    s.key.direction,
                    s.key.is_reply,
                    end(&s.key.source),
                    end(&s.key.destination),
                ),
                s.count,
            )
        })
        .collect()
}

fn total_flows(report: &HubbleReport) -> u64 {
    report.flows.iter().map(|s| s.count).sum::<u64>() + report.flows_overflow
}

// ---------- (1) realistic stream ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realistic_flows_give_exact_counts_and_records() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hubble.sock");
    let server = HubbleServer::start(&socket, vec![realistic()]);
    let handle = hubble::start(&config(&socket)).expect("enabled: on starts");
    let mut records = Vec::new();
    let report = wait_for(&handle, &mut records, |r| {
        r.stream.flows == 11 && r.stream.lost_events.len() == 2
    })
    .await;

    // The stream.
    let stream = &report.stream;
    assert!(stream.connected);
    assert_eq!((stream.connects, stream.reconnects), (1, 0));
    assert!(stream.errors.is_empty(), "{:?}", stream.errors);
    assert!(stream.malformed.is_empty(), "{:?}", stream.malformed);
    assert_eq!(stream.duplicates, 0);
    assert_eq!(
        stream.lost_events,
        BTreeMap::from([
            ("OBSERVER_EVENTS_QUEUE".to_string(), 3),
            ("PERF_EVENT_RING_BUFFER".to_string(), 17),
        ])
    );
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path, "/observer.Observer/GetFlows");
    assert!(received[0].request.follow);
    assert_eq!(
        received[0].request.since, None,
        "first stream starts from now"
    );

    // flowtel.hubble.flows, every series.
    let web = "shop/Deployment/web".to_string();
    let api = "shop/Deployment/api".to_string();
    let fwd = |dir, reply, src: &str, dst: &str, n| {
        (
            (
                "FORWARDED",
                String::new(),
                dir,
                reply,
                src.to_string(),
                dst.to_string(),
            ),
            n,
        )
    };
    let expected: BTreeMap<FlowRow, u64> = BTreeMap::from([
        // SYN + HTTP request.
        fwd("egress", "false", &web, &api, 2),
        // TCP reply + two HTTP responses.
        fwd("egress", "true", &api, &web, 3),
        (
            (
                "DROPPED",
                "POLICY_DENIED".to_string(),
                "ingress",
                "false",
                "default/Pod/scanner".to_string(),
                api.clone(),
            ),
            1,
        ),
        fwd("egress", "false", &web, "kube-system/Deployment/coredns", 1),
        fwd("egress", "true", "kube-system/Deployment/coredns", &web, 1),
        fwd(
            "egress",
            "false",
            "shop/Deployment/orders",
            "data/StatefulSet/kafka",
            1,
        ),
        fwd(
            "egress",
            "true",
            "data/StatefulSet/kafka",
            "shop/Deployment/orders",
            1,
        ),
        fwd("ingress", "false", "/reserved/world", &web, 1),
    ]);
    assert_eq!(flow_rows(&report), expected);
    assert_eq!(report.flows_overflow, 0);

    // The drop's attributes, as the exporter will write them.
    let drop_series = report
        .flows
        .iter()
        .find(|s| s.key.verdict == "DROPPED")
        .unwrap();
    let attributes = drop_series.key.attributes();
    for (key, value) in [
        ("flowtel.hubble.verdict", "DROPPED"),
        ("flowtel.hubble.drop_reason", "POLICY_DENIED"),
        ("flowtel.hubble.traffic_direction", "ingress"),
        ("source.k8s.namespace.name", "default"),
        ("source.k8s.workload.kind", "Pod"),
        ("source.k8s.workload.name", "scanner"),
        ("destination.k8s.workload.name", "api"),
    ] {
        assert!(
            attributes.contains(&(key.to_string(), value.to_string())),
            "{key}={value} missing from {attributes:?}"
        );
    }

    // flowtel.hubble.l7.requests: responses counted under the request's ends.
    let l7: BTreeMap<_, u64> = report
        .l7_requests
        .iter()
        .map(|s| {
            (
                (
                    s.key.protocol,
                    s.key.l7_type,
                    s.key.operation.clone(),
                    s.key.status.clone(),
                    s.key.source.workload.clone(),
                    s.key.destination.workload.clone(),
                ),
                s.count,
            )
        })
        .collect();
    let row = |p, t, op: &str, st: &str, s: &str, d: &str| {
        (
            (
                p,
                t,
                op.to_string(),
                st.to_string(),
                s.to_string(),
                d.to_string(),
            ),
            1u64,
        )
    };
    assert_eq!(
        l7,
        BTreeMap::from([
            row("dns", "request", "A", "", "web", "coredns"),
            row("dns", "response", "A", "NXDOMAIN", "web", "coredns"),
            row("http", "request", "GET", "", "web", "api"),
            row("http", "response", "GET", "2xx", "web", "api"),
            row("http", "response", "GET", "5xx", "web", "api"),
            row("kafka", "request", "produce", "", "orders", "kafka"),
            row("kafka", "response", "produce", "0", "orders", "kafka"),
        ])
    );

    // flowtel.hubble.l7.duration: one observation per response, right bucket.
    let durations: BTreeMap<_, _> = report
        .l7_duration
        .iter()
        .map(|s| ((s.key.protocol, s.key.status.clone()), &s.histogram))
        .collect();
    assert_eq!(durations.len(), 4);
    let bucket_of = |h: &flowtel::flow::mesh::HistogramValue| {
        assert_eq!(h.count, 1);
        assert_eq!(h.bounds, hubble::LATENCY_BOUNDS.to_vec());
        h.counts.iter().position(|c| *c == 1).unwrap()
    };
    let h = durations[&("http", "2xx".to_string())];
    assert!((h.sum - 0.012).abs() < 1e-9);
    assert_eq!(bucket_of(h), 2, "12 ms is in (10 ms, 25 ms]");
    let h = durations[&("http", "5xx".to_string())];
    assert!((h.sum - 1.2).abs() < 1e-9);
    assert_eq!(bucket_of(h), 10, "1.2 s is in (1 s, 2.5 s]");
    assert_eq!(bucket_of(durations[&("dns", "NXDOMAIN".to_string())]), 0);
    assert_eq!(bucket_of(durations[&("kafka", "0".to_string())]), 0);

    // The flows for records, converted.
    assert_eq!(records.len(), 11);
    assert_eq!(report.records_dropped, 0);
    let first = &records[0];
    assert_eq!(first.verdict, "FORWARDED");
    assert_eq!(first.transport, Some(Transport::Tcp));
    assert_eq!(first.source.ip, Some(WEB_IP.parse::<IpAddr>().unwrap()));
    assert_eq!(first.source.port, Some(43_512));
    assert_eq!(first.destination.port, Some(8080));
    assert_eq!(first.source.namespace.as_deref(), Some("shop"));
    assert_eq!(first.source.pod.as_deref(), Some("web-6d9f7c8b5-x2k4q"));
    assert_eq!(
        first
            .source
            .workload
            .as_ref()
            .map(|w| (w.name.as_str(), w.kind.as_str())),
        Some(("web", "Deployment"))
    );
    assert_eq!(first.source.identity, 41_231);
    assert!(first.source.labels.contains(&"k8s:app=web".to_string()));
    assert_eq!(first.direction, Direction::Egress);
    assert_eq!(first.is_reply, Some(false));
    assert_eq!(first.flow_type, "L3_L4");
    assert_eq!(first.node_name, "kind-worker");
    assert_eq!(
        first.time,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_771_990_001))
    );
    assert_eq!(records[1].is_reply, Some(true));
    let dropped = &records[2];
    assert_eq!(dropped.verdict, "DROPPED");
    assert_eq!(dropped.drop_reason.as_deref(), Some("POLICY_DENIED"));
    assert_eq!(dropped.direction, Direction::Ingress);
    assert_eq!(dropped.source.workload, None);

    let response = records[4].l7.as_ref().expect("L7 record");
    assert_eq!(response.l7_type, "response");
    assert_eq!(response.latency, Some(Duration::from_millis(12)));
    match &response.record {
        L7Record::Http(h) => {
            assert_eq!(h.method, "GET");
            assert_eq!(h.status_code, Some(200));
            assert_eq!(h.host.as_deref(), Some("api.shop.svc.cluster.local"));
            assert_eq!(h.path.as_deref(), Some("/v1/cart"));
        }
        other => panic!("expected HTTP, got {other:?}"),
    }
    assert!(
        !format!("{records:?}").contains("s3cr3t"),
        "a query string leaked into a record"
    );
    match &records[7].l7.as_ref().expect("DNS").record {
        L7Record::Dns(d) => {
            assert_eq!(d.query, "nope.example.com.");
            assert_eq!(d.rcode, Some(3));
            assert_eq!(d.qtypes, vec!["A".to_string()]);
        }
        other => panic!("expected DNS, got {other:?}"),
    }
    assert_eq!(records[7].transport, Some(Transport::Udp));
    match &records[9].l7.as_ref().expect("Kafka").record {
        L7Record::Kafka(k) => {
            assert_eq!(
                (k.api_key.as_str(), k.topic.as_str(), k.error_code),
                ("produce", "orders", 0)
            );
        }
        other => panic!("expected Kafka, got {other:?}"),
    }
    let from_world = &records[10];
    assert_eq!(from_world.source.workload_key(), ("reserved", "world"));
    assert_eq!(
        from_world.source.ip,
        Some("203.0.113.50".parse::<IpAddr>().unwrap())
    );

    // The next report has no records left, and the same counters.
    let again = handle.report();
    assert!(again.records.is_empty());
    assert_eq!(again.flows, report.flows);
    handle.shutdown().await;
}

// ---------- (2) errors mid-stream ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_errors_are_counted_and_resumed_without_double_counting() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hubble.sock");
    let server = HubbleServer::start(
        &socket,
        vec![
            // Three flows, then the agent fails the stream.
            vec![
                respond(tcp_flow(1)),
                respond(tcp_flow(2)),
                respond(tcp_flow(3)),
                Step::Fail(Status::unavailable("hubble: observer shutting down")),
            ],
            // Resumed with `since`: the agent replays flow 3, then sends 4 and
            // dies without a status.
            vec![respond(tcp_flow(3)), respond(tcp_flow(4)), Step::Drop],
            // And once more: 4 replayed, 5 new; then idle.
            vec![respond(tcp_flow(4)), respond(tcp_flow(5))],
        ],
    );
    let handle = hubble::start(&config(&socket)).unwrap();
    let mut records = Vec::new();
    let report = wait_for(&handle, &mut records, |r| {
        r.stream.flows == 5 && r.stream.duplicates == 2 && r.stream.connected
    })
    .await;
    assert_eq!(report.stream.errors, BTreeMap::from([("stream", 2)]));
    assert_eq!((report.stream.connects, report.stream.reconnects), (3, 2));
    assert_eq!(total_flows(&report), 5);
    assert_eq!(
        records
            .iter()
            .map(|f| f.source.port.unwrap())
            .collect::<Vec<_>>(),
        vec![40_001, 40_002, 40_003, 40_004, 40_005]
    );
    let since: Vec<_> = server.received().iter().map(|r| r.request.since).collect();
    assert_eq!(since, vec![None, Some(at(3, 0)), Some(at(4, 0))]);

    // Nothing more arrives, nothing more is counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = handle.report();
    assert_eq!(later.stream.flows, 5);
    assert_eq!(total_flows(&later), 5);
    assert_eq!(server.accepted(), 3);
    handle.shutdown().await;
}

// ---------- (3) the socket appears late ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_socket_is_retried_until_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hubble.sock");

    // `auto` does not start without a socket, `off` never does.
    let auto = HubbleConfig {
        enabled: Enabled::Auto,
        ..config(&socket)
    };
    assert!(hubble::start(&auto).is_none());
    let off = HubbleConfig {
        enabled: Enabled::Off,
        ..config(&socket)
    };
    assert!(hubble::start(&off).is_none());

    let handle = hubble::start(&config(&socket)).expect("on starts without the socket");
    let mut records = Vec::new();
    let waiting = wait_for(&handle, &mut records, |r| {
        r.stream.errors.get("socket_absent").copied().unwrap_or(0) >= 2
    })
    .await;
    assert!(!waiting.stream.connected);
    assert_eq!(waiting.stream.connects, 0);

    let _server = HubbleServer::start(&socket, vec![vec![respond(tcp_flow(1))]]);
    let report = wait_for(&handle, &mut records, |r| r.stream.flows == 1).await;
    assert!(report.stream.connected);
    assert_eq!(report.stream.connects, 1);
    assert_eq!(records.len(), 1);
    assert_eq!(
        report.stream.errors.keys().copied().collect::<Vec<_>>(),
        vec!["socket_absent"]
    );
    assert!(
        hubble::start(&auto).is_some(),
        "auto starts once the socket exists"
    );
    handle.shutdown().await;
}

// ---------- (4) garbage in a message ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_message_is_counted_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hubble.sock");
    let server = HubbleServer::start(
        &socket,
        vec![
            vec![
                respond(tcp_flow(1)),
                // Field 1 (flow), length-delimited, claiming 2^32 bytes.
                Step::Raw(vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02]),
                // Not protobuf at all: an invalid wire type.
                Step::Raw(b"\xff\xfe garbage \x00\x07".to_vec()),
                respond(tcp_flow(2)),
                Step::Wait(Duration::from_millis(500)),
                // Then the agent ends the follow stream cleanly.
                Step::End,
            ],
            vec![respond(tcp_flow(3))],
        ],
    );
    let handle = hubble::start(&config(&socket)).unwrap();
    let mut records = Vec::new();
    let report = wait_for(&handle, &mut records, |r| r.stream.flows == 2).await;
    assert_eq!(report.stream.errors, BTreeMap::from([("decode", 2)]));
    assert_eq!(
        report.stream.connects, 1,
        "bad messages do not restart the stream"
    );
    assert!(report.stream.connected);

    let report = wait_for(&handle, &mut records, |r| r.stream.flows == 3).await;
    assert_eq!(
        report.stream.errors,
        BTreeMap::from([("decode", 2), ("stream_ended", 1)])
    );
    assert_eq!((report.stream.connects, server.accepted()), (2, 2));
    assert_eq!(total_flows(&report), 3);
    assert_eq!(
        records
            .iter()
            .map(|f| f.source.port.unwrap())
            .collect::<Vec<_>>(),
        vec![40_001, 40_002, 40_003]
    );
    handle.shutdown().await;
}

// ---------- (5) series budget ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_budget_folds_the_excess_into_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hubble.sock");
    let mut steps = Vec::new();
    // Five client workloads, two flows each, and an HTTP response each.
    for w in 0..5i64 {
        let client = pod(
            "load",
            &format!("client-{w}-abc"),
            Some((&format!("client-{w}"), "Deployment")),
            60_000 + w as u32,
            0,
        );
        for i in 0..2i64 {
            let mut f = tcp_flow(w * 10 + i);
            f.source = Some(client.clone());
            steps.push(respond(f));
        }
        let mut response = l7(
            tcp_flow(w * 10 + 5),
            proto::L7FlowType::RESPONSE,
            30,
            http("POST", 201, "http://api/orders"),
        );
        response.source = Some(api());
        response.destination = Some(client);
        steps.push(respond(response));
    }
    let _server = HubbleServer::start(&socket, vec![steps]);
    let handle = hubble::start(&HubbleConfig {
        max_series: 3,
        ..config(&socket)
    })
    .unwrap();
    let mut records = Vec::new();
    let report = wait_for(&handle, &mut records, |r| r.stream.flows == 15).await;

    // 15 flows in 10 distinct flow keys (5 clients x {request, response}):
    // the first three keys (client-0 both ways, client-1 requests) keep
    // their 5 flows, the other 10 are folded.
    assert_eq!(report.flows.len(), 3);
    assert_eq!(report.flows.iter().map(|s| s.count).sum::<u64>(), 5);
    assert_eq!(report.flows_overflow, 10);
    // 5 distinct L7 keys, one response each: 3 kept, 2 folded.
    assert_eq!(report.l7_requests.len(), 3);
    assert_eq!(report.l7_requests_overflow, 2);
    assert_eq!(report.l7_duration.len(), 3);
    let overflow = report
        .l7_duration_overflow
        .as_ref()
        .expect("overflow histogram");
    assert_eq!(overflow.count, 2);
    assert!((overflow.sum - 0.06).abs() < 1e-9);
    assert_eq!(records.len(), 15);
    handle.shutdown().await;
}

#[test]
fn config_reads_on_off_auto_and_rejects_unknown_keys() {
    let parse = |yaml: &str| -> Result<HubbleConfig, String> {
        config::Config::builder()
            .add_source(config::File::from_str(yaml, config::FileFormat::Yaml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| e.to_string())
    };
    let c = parse("enabled: on\nsocket: /run/h.sock\nreconnect_backoff_max: 5s\nmax_series: 10\n")
        .unwrap();
    assert_eq!(c.enabled, Enabled::On);
    assert_eq!(c.socket, Path::new("/run/h.sock"));
    assert_eq!(c.reconnect_backoff_max, Duration::from_secs(5));
    assert_eq!(c.max_series, 10);
    assert_eq!(c.max_records, HubbleConfig::default().max_records);
    assert_eq!(parse("enabled: off\n").unwrap().enabled, Enabled::Off);
    assert_eq!(parse("enabled: auto\n").unwrap().enabled, Enabled::Auto);
    assert_eq!(parse("enabled: false\n").unwrap().enabled, Enabled::Off);
    assert!(parse("enabled: sometimes\n").is_err());
    assert!(parse("socket_path: /x\n")
        .unwrap_err()
        .contains("socket_path"));
    let d = HubbleConfig::default();
    assert_eq!(d.enabled, Enabled::Auto);
    assert_eq!(d.socket, Path::new("/var/run/cilium/hubble.sock"));
}
