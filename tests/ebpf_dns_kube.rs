//! A pod's DNS lookups through the kube-dns Service VIP, DNATed on the node
//! as kube-proxy does: flowtel (`source: ebpf`, in R) must count them for
//! the client pod's workload, with the server named as the `kube-dns`
//! Service (its VIP as `server.address`), not as the backend nor twice.
//!
//! A (client pod `shop/checkout`) — R (the node: routes, DNATs VIP:53 to
//! B:53) — B (dnsmasq, the CoreDNS pod). The test API server
//! (`common::kubeapi`) holds the pods, the node and the Service.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::dns::{self, DIG, DNSMASQ};
use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::kubeapi::{fx, KubeApi};
use common::netns::NetnsGuard;
use common::otlp_receiver::{AttrValue, OtlpReceiver};
use common::router::{RouterLab, A_V4, B_V4, RA_V4, RB_V4, VIP};

const NODE: &str = "node-r";
/// Lookups made through the VIP.
const LOOKUPS: u64 = 5;
const TIMEOUT: Duration = Duration::from_secs(60);

fn s(v: &str) -> AttrValue {
    AttrValue::Str(v.to_string())
}

#[test]
fn lookups_through_the_kube_dns_vip_are_named() {
    let test = "lookups_through_the_kube_dns_vip_are_named";
    let Some((tools, found)) =
        common::prerequisites_with(test, &[DNSMASQ, DIG], &common::ebpf_conditions())
    else {
        return;
    };
    let [dnsmasq, dig]: [PathBuf; 2] = found.try_into().expect("two tools");
    let lab = RouterLab::new(&tools).expect("setting up A — R — B");
    lab.r
        .run(
            &tools.nft,
            &[
                "add",
                "rule",
                "ip",
                "ft_nat",
                "pre",
                "ip",
                "daddr",
                VIP,
                "udp",
                "dport",
                "53",
                "dnat",
                "to",
                &format!("{B_V4}:53"),
            ],
        )
        .expect("the kube-dns DNAT rule");
    // After the lab: dnsmasq is killed before the namespaces go.
    let mut dns_guard = NetnsGuard::new(&tools);
    dns::start_dnsmasq(
        &mut dns_guard,
        &lab.b,
        &lab.a,
        (&dnsmasq, &dig),
        &dns::dnsmasq_args(
            &[B_V4],
            "/cluster.local/",
            &["payments.shop.svc.cluster.local,198.51.100.9".to_string()],
        ),
        (B_V4, "payments.shop.svc.cluster.local"),
    );

    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the API server");
    let api = KubeApi::new();
    rt.block_on(api.start());
    let checkout = fx::workload("Deployment", "shop", "checkout");
    let checkout_rs = fx::replicaset("shop", "checkout-5d8f7c9b6", Some(&checkout));
    let coredns = fx::workload("Deployment", "kube-system", "coredns");
    let coredns_rs = fx::replicaset("kube-system", "coredns-7db6d8ff4d", Some(&coredns));
    let client = fx::PodFx::new("shop", "checkout")
        .on(NODE, RA_V4)
        .ips(&[A_V4])
        .owned_by(&checkout_rs)
        .build();
    let dns_pod = fx::PodFx::new("kube-system", "coredns")
        .on("node-b", RB_V4)
        .ips(&[B_V4])
        .owned_by(&coredns_rs)
        .build();
    let service = fx::service("kube-system", "kube-dns", &[VIP]);
    let slice = fx::endpoint_slice(&service, "IPv4", &[&dns_pod]);
    api.load([
        fx::node(NODE, "zone-a", "region-1", &[RA_V4], None),
        fx::node("node-b", "zone-b", "region-1", &[RB_V4], None),
        checkout_rs,
        coredns_rs,
        client,
        dns_pod,
        service,
        slice,
    ]);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = api.write_kubeconfig(dir.path());
    let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.r.path();
    let mut ft = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            (
                "FLOWTEL_KUBERNETES__KUBECONFIG",
                kubeconfig.display().to_string(),
            ),
            ("FLOWTEL_RESOURCE__NODE_NAME", NODE.to_string()),
            ("FLOWTEL_EBPF__TCP__ENABLED", "false".to_string()),
            ("FLOWTEL_EBPF__DROPS__ENABLED", "false".to_string()),
        ],
    })
    .expect("starting flowtel");
    ft.wait_ready(TIMEOUT).expect("flowtel becomes ready");
    let synced = ft
        .wait_for_kube_synced(TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: {e:#}"));
    ft.wait_for_dump_after(&synced, TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: {e:#}"));

    for _ in 0..LOOKUPS {
        let out = lab
            .a
            .run(
                &dig,
                &[
                    &format!("@{VIP}"),
                    "payments.shop.svc.cluster.local",
                    "A",
                    "+tries=1",
                    "+timeout=2",
                    "+short",
                ],
            )
            .expect("dig through the VIP");
        assert_eq!(out.trim(), "198.51.100.9", "dig answered {out:?}");
    }

    let deadline = Instant::now() + TIMEOUT;
    let (attrs, value) = loop {
        let points = receiver.latest("flowtel.dns.requests", 0);
        if let Some((a, p)) = points.iter().find(|(_, p)| p.value >= LOOKUPS) {
            break (a.clone(), p.value);
        }
        assert!(
            Instant::now() < deadline,
            "{test}: no flowtel.dns.requests point reached {LOOKUPS}: {points:?}\n{}",
            ft.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("{test}: flowtel.dns.requests = {value} with {attrs:?}");
    assert_eq!(value, LOOKUPS, "each lookup counted once");
    for (key, want) in [
        ("flowtel.dns.rcode", s("NOERROR")),
        ("flowtel.dns.question.type", s("A")),
        ("network.transport", s("udp")),
        ("server.address", s(VIP)),
        ("server.port", AttrValue::Int(53)),
        ("flowtel.local.role", s("client")),
        ("k8s.namespace.name", s("shop")),
        ("flowtel.k8s.workload.name", s("checkout")),
        ("flowtel.peer.k8s.namespace.name", s("kube-system")),
        ("flowtel.peer.k8s.service.name", s("kube-dns")),
    ] {
        assert_eq!(attrs.get(key), Some(&want), "{test}: {key} in {attrs:?}");
    }
    let total: u64 = receiver
        .latest("flowtel.dns.requests", 0)
        .values()
        .map(|p| p.value)
        .sum();
    assert_eq!(total, LOOKUPS, "{test}: lookups counted elsewhere too");

    // A failed lookup is a log event naming the pod, the name and the
    // Service.
    let missing = "missing.shop.svc.cluster.local";
    let out = lab
        .a
        .run(
            &dig,
            &[&format!("@{VIP}"), missing, "A", "+tries=1", "+timeout=2"],
        )
        .expect("dig for a missing name");
    assert!(out.contains("status: NXDOMAIN"), "dig: {out}");
    let event = loop {
        let events = receiver.log_events();
        if let Some(e) = events
            .into_iter()
            .find(|e| e.event_name == "flowtel.dns.failed")
        {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: no flowtel.dns.failed event\n{}",
            ft.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("{test}: {} {:?}", event.body, event.attrs);
    for (key, want) in [
        ("dns.question.name", missing),
        ("flowtel.dns.rcode", "NXDOMAIN"),
        ("flowtel.dns.question.type", "A"),
        ("source.address", A_V4),
        ("destination.address", VIP),
        ("k8s.namespace.name", "shop"),
        ("flowtel.k8s.workload.name", "checkout"),
        ("flowtel.peer.k8s.service.name", "kube-dns"),
    ] {
        assert_eq!(
            event.str(key),
            Some(want),
            "{test}: {key} in {:?}",
            event.attrs
        );
    }
    ft.stop(Duration::from_secs(10));
}
