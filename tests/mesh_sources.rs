//! Mesh and CNI sources end to end: the flowtel binary, the test Kubernetes
//! API holding Istio-meshed pods whose addresses are 127.0.0.x, local HTTP
//! servers at those addresses serving Envoy sidecar, ztunnel and Felix
//! exposition text, and the test Hubble Observer on a Unix socket.
//!
//! Asserted on what the test OTLP receiver got:
//! * Istio families with OTel names, one resource per pod with its k8s
//!   attributes, the exposition's labels (escaped values unescaped) and
//!   the exact values, histograms included;
//! * Felix families on the node's resource, exact values;
//! * Hubble flows, L7 requests and durations, exact, with the stream broken
//!   mid-way once (counted in `flowtel.hubble.stream.errors`);
//! * the bad targets (truncated, non-UTF-8, 100 MB, slow-loris, wrong
//!   content type) each counted in `flowtel.scrape.errors` by kind, the good
//!   targets' metrics arriving anyway, and flowtel still running;
//! * the detected CNI and the active sources, in `/readyz` and in
//!   `flowtel.sources.active` / `flowtel.cni.detected`.
//!
//! Also, without root: the fixtures parse as real scrapes do.
//!
//! Needs root, `ip` and `nft` (flowtel's kernel source reads a throwaway
//! namespace; see `tests/common/mod.rs`).

mod common;
// Only part of the Hubble test server is used here.
#[allow(dead_code)]
#[path = "common/hubble_server.rs"]
mod hubble_server;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::flowtel::{Flowtel, FlowtelArgs};
use common::kubeapi::{fx, KubeApi};
use common::netns::NetnsGuard;
use common::otlp_receiver::{attrs_of, AttrValue, Attrs, OtlpReceiver};
use flowtel::source::hubble::proto;
use flowtel::source::scrape::{parse, Format, PointValue};
use hubble_server::{HubbleServer, Step};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ENVOY: &str = include_str!("fixtures/mesh/envoy_sidecar.txt");
const ZTUNNEL: &str = include_str!("fixtures/mesh/ztunnel_1.24.txt");
const FELIX: &str = include_str!("fixtures/mesh/felix.txt");

const NODE: &str = "node-m";
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

// ---------- fixtures parse as the real scrapes do ----------

#[test]
fn fixtures_parse_with_their_values() {
    let envoy = parse(ENVOY, Format::Text, flowtel::source::istio::ISTIO_FAMILIES)
        .expect("the Envoy fixture parses");
    let names: Vec<&str> = envoy.iter().map(|f| f.name).collect();
    assert_eq!(
        names,
        [
            "istio.requests",
            "istio.request.duration",
            "istio.tcp.sent",
            "istio.tcp.received",
            "istio.tcp.connections.opened",
            "istio.tcp.connections.closed"
        ]
    );
    let sent = &envoy[2].points[0];
    assert!(sent.labels.contains(&(
        "destination_service_name".into(),
        "legacy \"billing\" \\ v2\nblue".into()
    )));
    assert_eq!(sent.value, PointValue::Number(52_428_800.0));
    let ztunnel = parse(
        ZTUNNEL,
        Format::OpenMetrics,
        flowtel::source::istio::ISTIO_FAMILIES,
    )
    .expect("the ztunnel fixture parses");
    let opened = ztunnel
        .iter()
        .find(|f| f.name == "istio.tcp.connections.opened")
        .expect("ztunnel has opened connections");
    assert_eq!(opened.points.len(), 3);
    assert_eq!(opened.points[0].value, PointValue::Number(831.0));
    let felix = parse(FELIX, Format::Text, flowtel::source::felix::FELIX_FAMILIES)
        .expect("the Felix fixture parses");
    let rules = felix
        .iter()
        .find(|f| f.name == "felix.iptables.rules")
        .expect("felix has iptables rules");
    assert_eq!(rules.points.len(), 4);
}

// ---------- HTTP targets ----------

/// What one target answers to every request.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Serve(&'static str, &'static str),
    /// Announces more than it sends, then closes.
    Truncated,
    NotUtf8,
    /// 100 MB of valid lines, chunked.
    Huge,
    /// Headers, then one byte every 400 ms.
    SlowLoris,
    WrongType,
}

/// A minimal HTTP/1.1 server at `addr`: raw bytes, so that the bad
/// behaviours are exactly what a broken endpoint sends.
async fn serve(addr: SocketAddr, behaviour: Behaviour) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("bind a scrape target");
    let local = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = |ct: &str, len: Option<usize>| {
                    match len {
                    Some(n) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n"
                    ),
                    None => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: {ct}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
                    ),
                }
                };
                let _ = match behaviour {
                    Behaviour::Serve(ct, body) => {
                        conn.write_all(format!("{}{body}", head(ct, Some(body.len()))).as_bytes())
                            .await
                    }
                    Behaviour::Truncated => {
                        let body = &ENVOY[..ENVOY.len() / 2];
                        conn.write_all(
                            format!("{}{body}", head(TEXT, Some(ENVOY.len()))).as_bytes(),
                        )
                        .await
                    }
                    Behaviour::NotUtf8 => {
                        let body: &[u8] = b"istio_requests_total{a=\"\xff\xfe\"} 1\n";
                        let mut out = head(TEXT, Some(body.len())).into_bytes();
                        out.extend_from_slice(body);
                        conn.write_all(&out).await
                    }
                    Behaviour::Huge => {
                        let line = "envoy_cluster_upstream_cx_total{cluster_name=\"padding-padding-padding\"} 1\n";
                        let chunk = line.repeat(1 << 14);
                        let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                        let mut result = conn.write_all(head(TEXT, None).as_bytes()).await;
                        let mut sent = 0;
                        while result.is_ok() && sent < 100 << 20 {
                            result = conn.write_all(framed.as_bytes()).await;
                            sent += chunk.len();
                        }
                        if result.is_ok() {
                            result = conn.write_all(b"0\r\n\r\n").await;
                        }
                        result
                    }
                    Behaviour::SlowLoris => {
                        let mut result = conn
                            .write_all(head(TEXT, Some(ENVOY.len())).as_bytes())
                            .await;
                        for b in ENVOY.bytes() {
                            if result.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(400)).await;
                            result = conn.write_all(&[b]).await;
                        }
                        result
                    }
                    Behaviour::WrongType => {
                        let body = "<html><body>metrics moved</body></html>\n";
                        conn.write_all(
                            format!(
                                "{}{body}",
                                head("text/html; charset=utf-8", Some(body.len()))
                            )
                            .as_bytes(),
                        )
                        .await
                    }
                };
                let _ = conn.shutdown().await;
            });
        }
    });
    local
}

// ---------- Hubble ----------

fn endpoint(namespace: &str, pod: &str, workload: &str, identity: u32) -> proto::Endpoint {
    proto::Endpoint {
        id: identity % 1000,
        identity,
        namespace: namespace.into(),
        labels: vec![format!("k8s:app={workload}")],
        pod_name: pod.into(),
        workloads: vec![proto::Workload {
            name: workload.into(),
            kind: "Deployment".into(),
        }],
        cluster_name: "default".into(),
    }
}

fn web() -> proto::Endpoint {
    endpoint("shop", "web-6d9f7c8b5-x2k4q", "web", 41_231)
}

fn api() -> proto::Endpoint {
    endpoint("shop", "api-77b9d6f4c-p8zlm", "api", 18_944)
}

/// Forwarded TCP web → api, numbered; `l7` makes it an HTTP record.
fn hubble_flow(n: u32, l7: Option<(proto::L7FlowType, u64)>) -> Step {
    let reply = matches!(l7, Some((proto::L7FlowType::RESPONSE, _)));
    let (src, dst, sip, dip) = if reply {
        (api(), web(), "10.0.2.7", "10.0.1.5")
    } else {
        (web(), api(), "10.0.1.5", "10.0.2.7")
    };
    let time = proto::Timestamp {
        seconds: 1_771_990_000 + i64::from(n),
        nanos: 0,
    };
    let mut flow = proto::Flow {
        time: Some(time),
        uuid: format!("00000000-0000-4000-8000-{n:012}"),
        verdict: proto::Verdict::FORWARDED as i32,
        ip: Some(proto::Ip {
            source: sip.into(),
            destination: dip.into(),
            ip_version: proto::IpVersion::IPv4 as i32,
            encrypted: false,
        }),
        l4: Some(proto::Layer4 {
            protocol: Some(proto::Protocol::Tcp(proto::Tcp {
                source_port: if reply { 8080 } else { 40_000 + n },
                destination_port: if reply { 40_000 + n } else { 8080 },
                flags: Some(proto::TcpFlags {
                    ack: true,
                    ..proto::TcpFlags::default()
                }),
            })),
        }),
        source: Some(src),
        destination: Some(dst),
        r#type: proto::FlowType::L3_L4 as i32,
        node_name: NODE.into(),
        reply,
        is_reply: Some(proto::BoolValue { value: reply }),
        traffic_direction: proto::TrafficDirection::EGRESS as i32,
        event_type: Some(proto::CiliumEventType {
            r#type: 4,
            sub_type: 0,
        }),
        ..proto::Flow::default()
    };
    if let Some((kind, latency_ms)) = l7 {
        flow.r#type = proto::FlowType::L7 as i32;
        flow.event_type = Some(proto::CiliumEventType {
            r#type: 129,
            sub_type: 0,
        });
        flow.l7 = Some(proto::Layer7 {
            r#type: kind as i32,
            latency_ns: latency_ms * 1_000_000,
            record: Some(proto::Record::Http(proto::Http {
                code: if reply { 200 } else { 0 },
                method: "GET".into(),
                url: "http://api.shop:8080/v1/items?id=7".into(),
                protocol: "HTTP/1.1".into(),
                headers: Vec::new(),
            })),
        });
    }
    Step::Send(Box::new(proto::GetFlowsResponse {
        time: flow.time,
        node_name: NODE.into(),
        response_types: Some(proto::ResponseTypes::Flow(flow)),
    }))
}

/// First stream: 3 L3/L4 flows, an HTTP request, then an error status.
/// Second stream: 2 more flows and the response (30 ms), then it stays open.
fn hubble_script() -> Vec<Vec<Step>> {
    vec![
        vec![
            hubble_flow(1, None),
            hubble_flow(2, None),
            hubble_flow(3, None),
            hubble_flow(4, Some((proto::L7FlowType::REQUEST, 0))),
            Step::Fail(tonic::Status::internal("agent restarting")),
        ],
        vec![
            hubble_flow(5, None),
            hubble_flow(6, None),
            hubble_flow(7, Some((proto::L7FlowType::RESPONSE, 30))),
            Step::Wait(Duration::from_secs(3600)),
        ],
    ]
}

// ---------- what the receiver got ----------

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Int(i64),
    Double(f64),
    Histogram {
        bounds: Vec<f64>,
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

#[derive(Debug, Clone)]
struct Point {
    metric: String,
    unit: String,
    resource: Attrs,
    attrs: Attrs,
    value: Value,
    time: u64,
}

fn points(receiver: &OtlpReceiver) -> Vec<Point> {
    let mut out = Vec::new();
    for r in receiver.received(0) {
        for rm in &r.request.resource_metrics {
            let resource = rm
                .resource
                .as_ref()
                .map(|r| attrs_of(&r.attributes))
                .unwrap_or_default();
            for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
                let mut push = |attrs, value, time| {
                    out.push(Point {
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        resource: resource.clone(),
                        attrs,
                        value,
                        time,
                    })
                };
                let number = |v: &Option<number_data_point::Value>| match v {
                    Some(number_data_point::Value::AsInt(i)) => Value::Int(*i),
                    Some(number_data_point::Value::AsDouble(d)) => Value::Double(*d),
                    None => Value::Int(i64::MIN),
                };
                match &m.data {
                    Some(metric::Data::Sum(s)) => {
                        for p in &s.data_points {
                            push(attrs_of(&p.attributes), number(&p.value), p.time_unix_nano);
                        }
                    }
                    Some(metric::Data::Gauge(g)) => {
                        for p in &g.data_points {
                            push(attrs_of(&p.attributes), number(&p.value), p.time_unix_nano);
                        }
                    }
                    Some(metric::Data::Histogram(h)) => {
                        for p in &h.data_points {
                            push(
                                attrs_of(&p.attributes),
                                Value::Histogram {
                                    bounds: p.explicit_bounds.clone(),
                                    counts: p.bucket_counts.clone(),
                                    sum: p.sum.unwrap_or(f64::NAN),
                                    count: p.count,
                                },
                                p.time_unix_nano,
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// The newest point of `metric` whose resource and attributes include
/// every pair of `resource` and `attrs`.
fn find<'a>(
    all: &'a [Point],
    metric: &str,
    resource: &[(&str, &str)],
    attrs: &[(&str, &str)],
) -> Option<&'a Point> {
    let has = |set: &Attrs, pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .all(|(k, v)| set.get(*k) == Some(&AttrValue::Str((*v).into())))
    };
    all.iter()
        .filter(|p| p.metric == metric && has(&p.resource, resource) && has(&p.attrs, attrs))
        .max_by_key(|p| p.time)
}

/// The newest value of each attribute set of `metric`, on any resource.
fn latest(all: &[Point], metric: &str) -> BTreeMap<Attrs, Value> {
    let mut newest: BTreeMap<Attrs, (u64, Value)> = BTreeMap::new();
    for p in all.iter().filter(|p| p.metric == metric) {
        let key = p.attrs.clone();
        if newest.get(&key).is_none_or(|(t, _)| *t <= p.time) {
            newest.insert(key, (p.time, p.value.clone()));
        }
    }
    newest.into_iter().map(|(k, (_, v))| (k, v)).collect()
}

fn int_sum(values: &BTreeMap<Attrs, Value>) -> i64 {
    values
        .values()
        .map(|v| match v {
            Value::Int(i) => *i,
            _ => 0,
        })
        .sum()
}

fn scrape_errors(all: &[Point]) -> BTreeMap<(String, String), i64> {
    latest(all, "flowtel.scrape.errors")
        .into_iter()
        .filter_map(|(attrs, v)| {
            let s = |k: &str| match attrs.get(k) {
                Some(AttrValue::Str(s)) => s.clone(),
                _ => String::new(),
            };
            match v {
                Value::Int(i) => Some(((s("flowtel.scrape.target"), s("error.type")), i)),
                _ => None,
            }
        })
        .collect()
}

// ---------- the cluster ----------

/// A pod with an injected sidecar (or ztunnel's), at `ip`, whose
/// `prometheus.io/port` is `port`.
fn meshed_pod(
    namespace: &str,
    name: &str,
    node: &str,
    ip: &str,
    port: u16,
    ztunnel: bool,
) -> serde_json::Value {
    let mut pod = fx::PodFx::new(namespace, name)
        .on(node, "192.0.2.10")
        .ips(&[ip]);
    if ztunnel {
        pod = pod.label("app", "ztunnel");
    }
    let mut pod = pod.build();
    let annotations = &mut pod["metadata"]["annotations"];
    annotations["prometheus.io/port"] = json!(port.to_string());
    if ztunnel {
        annotations["prometheus.io/path"] = json!("/metrics");
    } else {
        annotations["prometheus.io/path"] = json!("/stats/prometheus");
        annotations["prometheus.io/scrape"] = json!("true");
        annotations["sidecar.istio.io/status"] = json!(
            "{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"istio-envoy\",\"istio-data\"],\"imagePullSecrets\":null,\"revision\":\"default\"}"
        );
    }
    let containers = pod["spec"]["containers"]
        .as_array_mut()
        .expect("the fixture pod has containers");
    containers.push(json!({
        "name": "istio-proxy",
        "image": "docker.io/istio/proxyv2:1.24.0",
        "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
    }));
    pod
}

const CALICO_CONFLIST: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {"type": "calico", "log_level": "info", "datastore_type": "kubernetes", "nodename": "node-m",
     "mtu": 0, "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}
"#;

const CILIUM_CONFLIST: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    {"type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log"}
  ]
}
"#;

#[test]
fn istio_felix_hubble_and_bad_targets_to_otlp() {
    let test = "istio_felix_hubble_and_bad_targets_to_otlp";
    let Some(tools) = common::prerequisites(test, false) else {
        return;
    };
    let mut guard = NetnsGuard::new(&tools);
    let ns = guard
        .add("mesh")
        .expect("a namespace for the kernel source");
    guard.enable_conntrack(&ns).expect("conntrack in it");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the servers");
    let dir = tempfile::tempdir().expect("a temporary directory");

    // Targets: each on its own loopback address, as pods have their own.
    let at = |last: u8| SocketAddr::new(IpAddr::from([127, 0, 0, last]), 0);
    let (sidecar, ztunnel, truncated, not_utf8, huge, slow, wrong, felix) = rt.block_on(async {
        (
            serve(at(2), Behaviour::Serve(TEXT, ENVOY)).await,
            serve(at(3), Behaviour::Serve(OPENMETRICS, ZTUNNEL)).await,
            serve(at(4), Behaviour::Truncated).await,
            serve(at(5), Behaviour::NotUtf8).await,
            serve(at(6), Behaviour::Huge).await,
            serve(at(7), Behaviour::SlowLoris).await,
            serve(at(8), Behaviour::WrongType).await,
            serve(at(1), Behaviour::Serve(TEXT, FELIX)).await,
        )
    });

    let api = KubeApi::new();
    rt.block_on(api.start());
    let pods = [
        meshed_pod(
            "shop",
            "api-77b9d6f4c-p8zlm",
            NODE,
            "127.0.0.2",
            sidecar.port(),
            false,
        ),
        meshed_pod(
            "istio-system",
            "ztunnel-x7k2p",
            NODE,
            "127.0.0.3",
            ztunnel.port(),
            true,
        ),
        meshed_pod(
            "shop",
            "truncated",
            NODE,
            "127.0.0.4",
            truncated.port(),
            false,
        ),
        meshed_pod(
            "shop",
            "not-utf8",
            NODE,
            "127.0.0.5",
            not_utf8.port(),
            false,
        ),
        meshed_pod("shop", "huge", NODE, "127.0.0.6", huge.port(), false),
        meshed_pod("shop", "slow-loris", NODE, "127.0.0.7", slow.port(), false),
        meshed_pod("shop", "wrong-type", NODE, "127.0.0.8", wrong.port(), false),
        // On another node: never scraped from this one (nothing listens).
        meshed_pod("shop", "elsewhere", "node-n", "127.0.0.9", 15090, false),
    ];
    let api_pod_uid = pods[0]["metadata"]["uid"]
        .as_str()
        .expect("a uid")
        .to_owned();
    api.load(
        std::iter::once(fx::node(NODE, "zone-a", "region-1", &["192.0.2.10"], None))
            .chain(pods.iter().cloned()),
    );
    let kubeconfig = api.write_kubeconfig(dir.path());

    let socket = dir.path().join("hubble.sock");
    let hubble = rt.block_on(async { HubbleServer::start(&socket, hubble_script()) });
    let cni_dir = dir.path().join("net.d");
    std::fs::create_dir(&cni_dir).expect("the CNI directory");
    std::fs::write(cni_dir.join("10-calico.conflist"), CALICO_CONFLIST).expect("a conflist");

    let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = ns.path();
    let mut ft = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            (
                "FLOWTEL_KUBERNETES__KUBECONFIG",
                kubeconfig.display().to_string(),
            ),
            ("FLOWTEL_RESOURCE__NODE_NAME", NODE.into()),
            ("FLOWTEL_HUBBLE__SOCKET", socket.display().to_string()),
            (
                "FLOWTEL_DETECT__HUBBLE_SOCKET",
                socket.display().to_string(),
            ),
            ("FLOWTEL_DETECT__CNI_DIR", cni_dir.display().to_string()),
            ("FLOWTEL_DETECT__FELIX_ADDRESS", felix.to_string()),
            (
                "FLOWTEL_MESH__FELIX__URL",
                format!("http://{felix}/metrics"),
            ),
            ("FLOWTEL_MESH__FELIX__INTERVAL", "2s".into()),
            ("FLOWTEL_MESH__FELIX__TIMEOUT", "1500ms".into()),
            ("FLOWTEL_MESH__ISTIO__INTERVAL", "2s".into()),
            ("FLOWTEL_MESH__ISTIO__TIMEOUT", "1500ms".into()),
            ("FLOWTEL_EXPORT__LOGS__ENABLED", "true".into()),
        ],
    })
    .expect("starting flowtel");
    ft.wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");

    // Every bad target failed at least twice, and Hubble delivered all.
    let settled = common::wait_until(Duration::from_secs(40), Duration::from_millis(500), || {
        let all = points(&receiver);
        let errors = scrape_errors(&all);
        let flows = int_sum(&latest(&all, "flowtel.hubble.flows"));
        [
            "truncated",
            "not_utf8",
            "too_large",
            "timeout",
            "content_type",
        ]
        .iter()
        .all(|k| {
            errors
                .get(&("istio_sidecar".into(), (*k).into()))
                .is_some_and(|n| *n >= 2)
        }) && flows == 7
            && find(
                &all,
                "istio.tcp.sent",
                &[("k8s.pod.name", "ztunnel-x7k2p")],
                &[],
            )
            .is_some()
            && find(&all, "felix.iptables.rules", &[], &[]).is_some()
    });
    let all = points(&receiver);
    let errors = scrape_errors(&all);
    assert!(
        settled,
        "{test}: not everything arrived; scrape errors {errors:?}, metrics {:?}\n{}",
        all.iter()
            .map(|p| &p.metric)
            .collect::<std::collections::BTreeSet<_>>(),
        ft.output()
    );
    assert_eq!(
        ft.exit_status(),
        None,
        "{test}: flowtel exited\n{}",
        ft.output()
    );

    // Istio sidecar: the pod's resource, the exposition's labels, exact values.
    let requests = find(
        &all,
        "istio.requests",
        &[
            ("k8s.pod.name", "api-77b9d6f4c-p8zlm"),
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.uid", &api_pod_uid),
            ("k8s.node.name", NODE),
            ("service.name", "flowtel"),
        ],
        &[
            ("response_code", "503"),
            ("response_flags", "UF,URX"),
            ("source_workload", "web"),
            ("destination_workload", "api"),
            ("flowtel.istio.proxy", "istio_sidecar"),
        ],
    )
    .unwrap_or_else(|| panic!("{test}: no istio.requests 503 series of the api pod"));
    assert_eq!(requests.value, Value::Double(7.0));
    assert_eq!(requests.unit, "{request}");
    let ok = find(
        &all,
        "istio.requests",
        &[("k8s.pod.name", "api-77b9d6f4c-p8zlm")],
        &[("response_code", "200")],
    )
    .expect("the 200 series");
    assert_eq!(ok.value, Value::Double(1042.0));
    let sent = find(
        &all,
        "istio.tcp.sent",
        &[("k8s.pod.name", "api-77b9d6f4c-p8zlm")],
        &[("destination_service_name", "legacy \"billing\" \\ v2\nblue")],
    )
    .expect("the escaped label value, unescaped");
    assert_eq!(
        (sent.value.clone(), sent.unit.as_str()),
        (Value::Double(52_428_800.0), "By")
    );
    let duration = find(
        &all,
        "istio.request.duration",
        &[("k8s.pod.name", "api-77b9d6f4c-p8zlm")],
        &[],
    )
    .expect("the request duration histogram");
    assert_eq!(duration.unit, "ms");
    assert_eq!(
        duration.value,
        Value::Histogram {
            bounds: vec![
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0
            ],
            counts: vec![0, 3, 117, 580, 300, 40, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sum: 9876.5,
            count: 1042,
        }
    );
    assert!(
        find(&all, "envoy_cluster_upstream_cx_total", &[], &[]).is_none()
            && !all.iter().any(|p| p.metric.starts_with("envoy")),
        "{test}: Envoy's own families are not kept"
    );
    // ztunnel: OpenMetrics, its own resource.
    let zt = find(
        &all,
        "istio.tcp.sent",
        &[
            ("k8s.pod.name", "ztunnel-x7k2p"),
            ("k8s.namespace.name", "istio-system"),
        ],
        &[
            ("reporter", "destination"),
            ("source_workload", "traffic-gen"),
            ("destination_workload", "productpage-v1"),
            ("flowtel.istio.proxy", "ztunnel"),
        ],
    )
    .expect("ztunnel's sent bytes");
    assert_eq!(zt.value, Value::Double(11_144_775.0));
    let opened = latest(&all, "istio.tcp.connections.opened");
    let zt_opened: Vec<&Value> = opened
        .iter()
        .filter(|(a, _)| a.get("flowtel.istio.proxy") == Some(&AttrValue::Str("ztunnel".into())))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(zt_opened.len(), 3, "{test}: ztunnel's three opened series");
    assert!(zt_opened.contains(&&Value::Double(831.0)));
    // Bad targets and the pod on another node sent nothing.
    for pod in [
        "truncated",
        "not-utf8",
        "huge",
        "slow-loris",
        "wrong-type",
        "elsewhere",
    ] {
        assert!(
            !all.iter()
                .any(|p| p.resource.get("k8s.pod.name") == Some(&AttrValue::Str(pod.into()))),
            "{test}: metrics with the resource of {pod}"
        );
    }
    assert_eq!(
        errors.get(&("istio_sidecar".into(), "request".into())),
        None,
        "{test}: the pod on another node was scraped"
    );

    // Felix: the node's resource, exact values.
    let rules = find(
        &all,
        "felix.iptables.rules",
        &[("k8s.node.name", NODE)],
        &[("table", "filter"), ("ip_version", "4")],
    )
    .expect("felix iptables rules");
    assert_eq!(rules.value, Value::Double(134.0));
    assert!(!rules.resource.contains_key("k8s.pod.name"));
    let messages = find(
        &all,
        "felix.dataplane.messages",
        &[],
        &[("type", "ServiceAccountUpdate")],
    )
    .expect("felix dataplane messages");
    assert_eq!(messages.value, Value::Double(44.0));
    assert_eq!(
        find(&all, "felix.resync.state", &[], &[]).map(|p| p.value.clone()),
        Some(Value::Double(3.0))
    );

    // Hubble: 7 flows, the stream broken once, the L7 pair joined.
    let flows = latest(&all, "flowtel.hubble.flows");
    assert_eq!(int_sum(&flows), 7, "{test}: hubble flows {flows:?}");
    let stream_errors = latest(&all, "flowtel.hubble.stream.errors");
    let stream = stream_errors
        .iter()
        .find(|(a, _)| a.get("error.type") == Some(&AttrValue::Str("stream".into())))
        .map(|(_, v)| v.clone());
    assert_eq!(stream, Some(Value::Int(1)), "{test}: {stream_errors:?}");
    let l7 = latest(&all, "flowtel.hubble.l7.requests");
    assert_eq!(int_sum(&l7), 2, "{test}: {l7:?}");
    let latency = find(
        &all,
        "flowtel.hubble.l7.duration",
        &[],
        &[
            ("flowtel.hubble.l7.protocol", "http"),
            ("flowtel.hubble.l7.type", "response"),
            ("source.k8s.workload.name", "web"),
            ("destination.k8s.workload.name", "api"),
        ],
    )
    .expect("the L7 duration");
    let Value::Histogram {
        counts,
        sum,
        count,
        bounds,
    } = &latency.value
    else {
        panic!("{test}: not a histogram: {latency:?}");
    };
    assert_eq!((*count, bounds.len(), counts.len()), (1, 14, 15));
    assert_eq!(
        counts[3], 1,
        "{test}: 30 ms falls in (25 ms, 50 ms]: {counts:?}"
    );
    assert!((sum - 0.03).abs() < 1e-9, "{test}: sum {sum}");
    assert!(
        hubble.accepted() >= 2,
        "{test}: flowtel reconnected to Hubble"
    );

    // Hubble's flows as log events, next to the kernel's flow records.
    let mut events = Vec::new();
    let logged = common::wait_until(Duration::from_secs(10), Duration::from_millis(250), || {
        events = receiver
            .log_events()
            .into_iter()
            .filter(|e| e.event_name == "flowtel.hubble.flow")
            .collect();
        events.len() >= 7
    });
    assert!(logged, "{test}: Hubble flow events: {events:?}");
    assert_eq!(events.len(), 7, "{test}: each flow once: {events:?}");
    let response = events
        .iter()
        .find(|e| e.str("flowtel.hubble.l7.type") == Some("response"))
        .expect("the HTTP response's event");
    assert_eq!(response.int("http.response.status_code"), Some(200));
    assert_eq!(response.str("http.request.method"), Some("GET"));
    assert_eq!(
        response.str("url.path"),
        Some("/v1/items"),
        "{test}: no query string"
    );
    assert_eq!(response.str("source.k8s.workload.name"), Some("api"));
    assert_eq!(response.str("destination.address"), Some("10.0.1.5"));
    assert_eq!(response.str("flowtel.hubble.verdict"), Some("FORWARDED"));

    // Detection: /readyz and the self-metrics.
    let (code, body) = ft.readyz().expect("/readyz");
    assert_eq!(code, 200);
    assert_eq!(body["sources"]["cni"], json!("calico"), "{test}: {body}");
    let active = body["sources"]["sources"].clone();
    assert_eq!(
        active,
        json!(["conntrack", "hubble", "istio", "felix"]),
        "{test}: {body}"
    );
    let gauges = latest(&all, "flowtel.sources.active");
    for source in ["conntrack", "hubble", "istio", "felix"] {
        let mut a = Attrs::new();
        a.insert("flowtel.source".into(), AttrValue::Str(source.into()));
        assert_eq!(gauges.get(&a), Some(&Value::Int(1)), "{test}: {gauges:?}");
    }
    let cni = find(
        &all,
        "flowtel.cni.detected",
        &[],
        &[("flowtel.cni.name", "calico")],
    )
    .expect("flowtel.cni.detected");
    assert_eq!(cni.value, Value::Int(1));

    // The CNI configuration changing at run time is noticed.
    std::fs::remove_file(cni_dir.join("10-calico.conflist")).expect("remove the Calico conflist");
    std::fs::write(cni_dir.join("05-cilium.conflist"), CILIUM_CONFLIST).expect("a Cilium conflist");
    let mut last = serde_json::Value::Null;
    let noticed = common::wait_until(Duration::from_secs(20), Duration::from_millis(250), || {
        last = ft.readyz().map(|(_, b)| b).unwrap_or_default();
        last["sources"]["cni"] == json!("cilium")
    });
    assert!(noticed, "{test}: the new CNI was not noticed: {last}");
    let renamed = common::wait_until(Duration::from_secs(10), Duration::from_millis(250), || {
        find(
            &points(&receiver),
            "flowtel.cni.detected",
            &[],
            &[("flowtel.cni.name", "cilium")],
        )
        .is_some()
    });
    assert!(renamed, "{test}: flowtel.cni.detected never named cilium");

    // Each failing kind is logged once per round, not once per scrape.
    let output = ft.output();
    for kind in [
        "truncated",
        "not_utf8",
        "too_large",
        "timeout",
        "content_type",
    ] {
        let lines = output
            .lines()
            .filter(|l| {
                l.contains("scrapes failed this round") && l.contains(&format!("error=\"{kind}\""))
            })
            .count();
        assert!(lines >= 1, "{test}: {kind} was not logged\n{output}");
    }

    let status = ft.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{test}: exit {status:?}\n{}",
        ft.output()
    );
    drop(hubble);
    rt.block_on(api.stop());
}
