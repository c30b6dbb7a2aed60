//! Kubernetes enrichment end to end: real traffic between network
//! namespaces whose addresses a (test) API server assigns to pods, named in
//! the OTLP metrics flowtel exports.
//!
//! Three namespaces: client A — node R — server B. R forwards, tracks
//! connections and DNATs the ClusterIP VIP:80 to B:8080, as kube-proxy
//! does. flowtel runs in R (`source: ebpf`, `--netns`), as node `node-r`
//! in zone `zone-a`, with a kubeconfig pointing at the test API server
//! (`tests/common/kubeapi.rs`, the real list/watch protocol), which says:
//!
//! * A is pod `checkout-…` of Deployment `shop/checkout` (through its
//!   ReplicaSet) on `node-r`;
//! * B is pod `payments-…` of Deployment `shop/payments` on `node-b` in
//!   `zone-b`, behind Service `shop/payments` (VIP, with an EndpointSlice).
//!
//! Asserted from what the test-side OTLP receiver got:
//! * A → VIP:80 is one series per direction naming the local end
//!   (`k8s.namespace.name` shop, `k8s.deployment.name` checkout, its zone,
//!   its `app.kubernetes.io/name` label) and the peer
//!   (`flowtel.peer.k8s.*`: shop/payments behind Service payments, zone-b),
//!   with no addresses, and bytes equal to R's veth counters within 1 %;
//! * `flowtel.zone.bytes` carries the same bytes as `cross_zone`;
//! * B's address reused: a connection to B:8080 while the payments pod has
//!   it is named payments; the pod is deleted, a pod of Deployment
//!   `bank/ledger` gets the same address, and the next connection is named
//!   ledger. Each series has its own transfer's bytes.
//!
//! A second test takes the API server away: unreachable at start (flows
//! are still exported, marked `flowtel.enrichment.pending`), started (names
//! appear), stopped mid-run (flows keep their names from the last view,
//! flowtel keeps running) and restarted after the payments pod's address
//! passed to the ledger pod while it was down (the change is picked up).
//!
//! Needs root, `ip`, `nft` and a flowtel built with eBPF support; otherwise
//! the tests are skipped ([`common::skip`]), or fail under `CI`.

mod common;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::kubeapi::{self, fx, KubeApi};
use common::netns::IfStats;
use common::otlp_receiver::{show, AttrValue, Attrs, OtlpReceiver};
use common::router::{
    RouterLab, A_V4, BACKEND_PORT, B_V4, IF_RA, IF_RB, RA_V4, RB_V4, VIP, VIP_PORT,
};
use common::scenario::{Series, BYTES, C2S, DIRECTION, S2C};
use common::traffic::{self, TrafficServer};
use common::{deviation_pct, within};
use serde_json::Value;

const NODE: &str = "node-r";
const NODE_ZONE: &str = "zone-a";
const PEER_ZONE: &str = "zone-b";

const UP: u64 = 8 << 20;
const DOWN: u64 = 4 << 20;
const PIECES: u64 = 4;
const PAUSE: Duration = Duration::from_millis(300);
const INTERVAL: &str = "1s";
const TOLERANCE: f64 = 0.01;
const STABLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bounds for the cache to sync, and for a change to reach the names.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
const NAMING_TIMEOUT: Duration = Duration::from_secs(60);
/// A port nothing listens on in B: connects to it are refused, and each is a
/// flow of its own that shows how flowtel names B (see `wait_named`).
const PROBE_PORT: u16 = 8081;

/// Both tests load eBPF programs and count on the same two CPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("literal address"), port)
}

fn s(v: &str) -> AttrValue {
    AttrValue::Str(v.to_string())
}

#[test]
fn flows_are_named_after_pods_workloads_services_and_zones() {
    let test = "flows_are_named_after_pods_workloads_services_and_zones";
    let Some(run) = Run::new(test, true) else {
        return;
    };
    let (lab, api, receiver) = (&run.lab, &run.api, &run.receiver);
    let mut ft = run.flowtel();
    wait_synced(test, &ft);

    // 1. Through the Service.
    let (vip_c2s, vip_s2c) = transfer(lab, sock(VIP, VIP_PORT));
    let series = settle(&ft, receiver);
    check(test, &series, &vip_attrs(C2S), vip_c2s, "via the Service");
    check(test, &series, &vip_attrs(S2C), vip_s2c, "via the Service");
    let zone = |direction: &str| {
        let mut a = Attrs::new();
        a.insert("cloud.availability_zone".into(), s(NODE_ZONE));
        a.insert("flowtel.peer.zone".into(), s(PEER_ZONE));
        a.insert("flowtel.zone.crossing".into(), s("cross_zone"));
        a.insert(DIRECTION.into(), s(direction));
        a
    };
    let zones = receiver.latest("flowtel.zone.bytes", 0);
    for (direction, truth) in [(C2S, vip_c2s), (S2C, vip_s2c)] {
        let got = zones.get(&zone(direction)).map_or(0, |p| p.value);
        println!(
            "{test}: flowtel.zone.bytes cross_zone {direction}: {got} B, veth {truth} B ({:+.3} %)",
            deviation_pct(got, truth)
        );
        assert!(
            within(got, truth, TOLERANCE),
            "{test}: flowtel.zone.bytes {} should be {truth} B ±1 %, got {got}; all: {zones:?}",
            show(&zone(direction))
        );
    }

    // 2. Straight to the pod, then the address passes to another pod.
    let (old_c2s, old_s2c) = transfer(lab, sock(B_V4, BACKEND_PORT));
    let series = settle(&ft, receiver);
    check(
        test,
        &series,
        &direct_attrs("shop", "payments", C2S),
        old_c2s,
        "to the payments pod",
    );
    check(
        test,
        &series,
        &direct_attrs("shop", "payments", S2C),
        old_s2c,
        "to the payments pod",
    );
    reuse_address(api, &run.payments_pod);
    wait_named(test, &ft, lab, receiver, "bank", "ledger");
    let (new_c2s, new_s2c) = transfer(lab, sock(B_V4, BACKEND_PORT));
    let series = settle(&ft, receiver);
    check(
        test,
        &series,
        &direct_attrs("bank", "ledger", C2S),
        new_c2s,
        "to the ledger pod",
    );
    check(
        test,
        &series,
        &direct_attrs("bank", "ledger", S2C),
        new_s2c,
        "to the ledger pod",
    );
    // The first connection stays the payments pod's.
    check(
        test,
        &series,
        &direct_attrs("shop", "payments", C2S),
        old_c2s,
        "payments, after the reuse",
    );
    run.finish(&mut ft);
}

#[test]
fn flows_keep_flowing_while_the_api_server_is_away() {
    let test = "flows_keep_flowing_while_the_api_server_is_away";
    let Some(run) = Run::new(test, false) else {
        return;
    };
    let (lab, api, receiver) = (&run.lab, &run.api, &run.receiver);
    let mut ft = run.flowtel();

    // 1. No API server: flows are counted and marked.
    let (c2s, s2c) = transfer(lab, sock(VIP, VIP_PORT));
    let series = settle(&ft, receiver);
    let pending = |direction: &str| -> u64 {
        series
            .bytes
            .iter()
            .filter(|(a, _)| {
                a.get("flowtel.enrichment.pending") == Some(&AttrValue::Bool(true))
                    && a.get(DIRECTION) == Some(&s(direction))
            })
            .map(|(_, p)| p.value)
            .sum()
    };
    for (direction, truth) in [(C2S, c2s), (S2C, s2c)] {
        let got = pending(direction);
        println!(
            "{test}: API server down: pending {direction}: veth {truth} B, reported {got} B ({:+.3} %)",
            deviation_pct(got, truth)
        );
        assert!(
            within(got, truth, TOLERANCE),
            "{test}: with the API server unreachable the flow must still be counted, marked \
             flowtel.enrichment.pending: expected {truth} B, got {got}\nseries:\n{}",
            series.describe()
        );
    }

    // 2. The API server comes up: names appear.
    run.rt.block_on(api.start());
    let synced = common::wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        api.requests(kubeapi::Resource::Pods, "watch") > 0
    });
    assert!(
        synced,
        "{test}: flowtel never watched pods:\n{}",
        ft.output()
    );
    wait_synced(test, &ft);
    let (c2s, s2c) = transfer(lab, sock(VIP, VIP_PORT));
    let series = settle(&ft, receiver);
    check(
        test,
        &series,
        &vip_attrs(C2S),
        c2s,
        "after the API server started",
    );
    check(
        test,
        &series,
        &vip_attrs(S2C),
        s2c,
        "after the API server started",
    );

    // 3. Gone mid-run: flowtel keeps counting with the names it had.
    run.rt.block_on(api.stop());
    let before = series.bytes.get(&vip_attrs(C2S)).map_or(0, |p| p.value);
    let (c2s, _) = transfer(lab, sock(VIP, VIP_PORT));
    let series = settle(&ft, receiver);
    let after = series.bytes.get(&vip_attrs(C2S)).map_or(0, |p| p.value);
    println!(
        "{test}: API server stopped: the named series grew by {} B, veth {c2s} B ({:+.3} %)",
        after - before,
        deviation_pct(after - before, c2s)
    );
    assert!(
        within(after - before, c2s, TOLERANCE),
        "{test}: with the API server gone the series must keep counting: grew by {} B, \
         expected {c2s}\nseries:\n{}",
        after - before,
        series.describe()
    );
    assert!(
        ft.exit_status().is_none(),
        "{test}: flowtel exited:\n{}",
        ft.output()
    );

    // 4. Changed while it was down, then back: the change is picked up.
    reuse_address(api, &run.payments_pod);
    run.rt.block_on(api.start());
    let resumed = common::wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let (c2s, _) = transfer(lab, sock(B_V4, BACKEND_PORT));
        let series = settle(&ft, receiver);
        let named = series
            .bytes
            .get(&direct_attrs("bank", "ledger", C2S))
            .map_or(0, |p| p.value);
        named >= c2s
    });
    assert!(
        resumed,
        "{test}: after the API server came back, connections to {B_V4} were never named \
         bank/ledger:\n{}",
        Series::from_points(&receiver.sum_points(0)).describe()
    );
    println!("{test}: after the restart, connections to {B_V4} are named bank/ledger");
    run.finish(&mut ft);
}

/// The attributes of the end on this node: pod `checkout` of Deployment
/// `shop/checkout`.
fn local(a: &mut Attrs) {
    a.insert("k8s.namespace.name".into(), s("shop"));
    a.insert("flowtel.k8s.workload.kind".into(), s("Deployment"));
    a.insert("flowtel.k8s.workload.name".into(), s("checkout"));
    a.insert("k8s.deployment.name".into(), s("checkout"));
    a.insert("k8s.pod.label.app.kubernetes.io/name".into(), s("checkout"));
    a.insert("cloud.availability_zone".into(), s(NODE_ZONE));
    a.insert("flowtel.local.role".into(), s("client"));
    a.insert("network.transport".into(), s("tcp"));
    a.insert("network.type".into(), s("ipv4"));
    a.insert("flowtel.source".into(), s("ebpf"));
}

/// The attributes of a pod of Deployment `ns/workload` at the other end.
fn peer(a: &mut Attrs, ns: &str, workload: &str) {
    a.insert("flowtel.peer.k8s.namespace.name".into(), s(ns));
    a.insert("flowtel.peer.k8s.workload.kind".into(), s("Deployment"));
    a.insert("flowtel.peer.k8s.workload.name".into(), s(workload));
    a.insert(
        "flowtel.peer.k8s.pod.label.app.kubernetes.io/name".into(),
        s(workload),
    );
    a.insert("flowtel.peer.zone".into(), s(PEER_ZONE));
}

/// A connection to the payments Service.
fn vip_attrs(direction: &str) -> Attrs {
    let mut a = Attrs::new();
    local(&mut a);
    peer(&mut a, "shop", "payments");
    a.insert("flowtel.peer.k8s.service.name".into(), s("payments"));
    a.insert("server.port".into(), AttrValue::Int(VIP_PORT.into()));
    a.insert(DIRECTION.into(), s(direction));
    a
}

/// A connection straight to a pod of `ns/workload`.
fn direct_attrs(ns: &str, workload: &str, direction: &str) -> Attrs {
    let mut a = Attrs::new();
    local(&mut a);
    peer(&mut a, ns, workload);
    a.insert("server.port".into(), AttrValue::Int(BACKEND_PORT.into()));
    a.insert(DIRECTION.into(), s(direction));
    a
}

/// The payments pod is deleted and a pod of Deployment `bank/ledger` gets
/// its address.
fn reuse_address(api: &KubeApi, payments_pod: &Value) {
    assert!(api.delete(payments_pod), "deleting the payments pod");
    let ledger = fx::workload("Deployment", "bank", "ledger");
    let ledger_rs = fx::replicaset("bank", "ledger-7c9d5f8b4", Some(&ledger));
    api.apply(&ledger_rs);
    api.apply(
        &fx::PodFx::new("bank", "ledger")
            .on("node-b", RB_V4)
            .ips(&[B_V4])
            .owned_by(&ledger_rs)
            .label("app.kubernetes.io/name", "ledger")
            .build(),
    );
}

/// One test's namespaces, API server, receiver and traffic server.
struct Run {
    test: &'static str,
    t0: Instant,
    payments_pod: Value,
    server: TrafficServer,
    receiver: OtlpReceiver,
    _kubeconfig_dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    api: KubeApi,
    rt: tokio::runtime::Runtime,
    lab: RouterLab,
    // Released last.
    _serial: MutexGuard<'static, ()>,
}

impl Run {
    /// With `api_up`, the API server is listening from the start.
    fn new(test: &'static str, api_up: bool) -> Option<Run> {
        let (tools, _) = common::prerequisites_with(test, &[], &common::ebpf_conditions())?;
        let serial = serial();
        let t0 = Instant::now();
        let lab = RouterLab::new(&tools).expect("setting up A — R — B");
        let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the API server");
        let api = KubeApi::new();
        if api_up {
            rt.block_on(api.start());
        }
        let payments_pod = cluster(&api);
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kubeconfig = api.write_kubeconfig(dir.path());
        let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
        let server = TrafficServer::start(&lab.b, &[sock(B_V4, BACKEND_PORT)], &[])
            .expect("starting the server in B");
        Some(Run {
            test,
            t0,
            payments_pod,
            server,
            receiver,
            _kubeconfig_dir: dir,
            kubeconfig,
            api,
            rt,
            lab,
            _serial: serial,
        })
    }

    /// flowtel in R, as node `node-r`, reading the test API server.
    fn flowtel(&self) -> Flowtel {
        let endpoint = self.receiver.grpc_endpoint();
        let netns = self.lab.r.path();
        let mut ft = Flowtel::start(&FlowtelArgs {
            source: "ebpf",
            netns: &netns,
            endpoint: &endpoint,
            protocol: "grpc",
            interval: INTERVAL,
            env: vec![
                (
                    "FLOWTEL_KUBERNETES__KUBECONFIG",
                    self.kubeconfig.display().to_string(),
                ),
                ("FLOWTEL_RESOURCE__NODE_NAME", NODE.to_string()),
                ("FLOWTEL_EBPF__TCP__ENABLED", "false".to_string()),
                ("FLOWTEL_EBPF__DROPS__ENABLED", "false".to_string()),
            ],
        })
        .expect("starting flowtel");
        ft.wait_ready(Duration::from_secs(30))
            .expect("flowtel becomes ready");
        assert!(
            ft.output()
                .contains("naming flow ends from the Kubernetes API"),
            "{}: flowtel did not turn Kubernetes enrichment on:\n{}",
            self.test,
            ft.output()
        );
        ft
    }

    /// Stops flowtel (which must still be running and exit cleanly) and
    /// checks the traffic server saw no error.
    fn finish(self, ft: &mut Flowtel) {
        let test = self.test;
        assert!(
            ft.exit_status().is_none(),
            "{test}: flowtel exited: {:?}\n{}",
            ft.exit_status(),
            ft.output()
        );
        let status = ft.stop(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{test}: flowtel did not exit cleanly on SIGTERM: {status:?}\n{}",
            ft.output()
        );
        let errors = self.server.errors();
        assert!(
            errors.is_empty(),
            "{test}: the server in B failed: {errors:?}"
        );
        self.rt.block_on(self.api.stop());
        println!("{test}: passed in {:?}", self.t0.elapsed());
    }
}

/// The cluster: two nodes, the pods of the checkout and payments
/// Deployments (the Deployments themselves are only owners: flowtel does not
/// watch them) and the payments Service. Returns the payments pod.
fn cluster(api: &KubeApi) -> Value {
    let checkout = fx::workload("Deployment", "shop", "checkout");
    let checkout_rs = fx::replicaset("shop", "checkout-5d8f7c9b6", Some(&checkout));
    let payments = fx::workload("Deployment", "shop", "payments");
    let payments_rs = fx::replicaset("shop", "payments-6b7f9c4d2", Some(&payments));
    let checkout_pod = fx::PodFx::new("shop", "checkout")
        .on(NODE, RA_V4)
        .ips(&[A_V4])
        .owned_by(&checkout_rs)
        .label("app.kubernetes.io/name", "checkout")
        .build();
    let payments_pod = fx::PodFx::new("shop", "payments")
        .on("node-b", RB_V4)
        .ips(&[B_V4])
        .owned_by(&payments_rs)
        .label("app.kubernetes.io/name", "payments")
        .build();
    let service = fx::service("shop", "payments", &[VIP]);
    let slice = fx::endpoint_slice(&service, "IPv4", &[&payments_pod]);
    api.load([
        fx::node(NODE, NODE_ZONE, "region-1", &[RA_V4], None),
        fx::node("node-b", PEER_ZONE, "region-1", &[RB_V4], None),
        checkout_rs,
        payments_rs,
        checkout_pod,
        payments_pod.clone(),
        service,
        slice,
    ]);
    payments_pod
}

/// One paced TCP transfer from A; returns the L3 bytes R forwarded each way
/// (in from A, in from B).
fn transfer(lab: &RouterLab, to: SocketAddr) -> (u64, u64) {
    let ra0 = lab.r.if_stats(IF_RA).expect("R's veth counters");
    let rb0 = lab.r.if_stats(IF_RB).expect("R's veth counters");
    let sent =
        traffic::tcp_paced(&lab.a, to, UP, DOWN, PIECES, PAUSE).expect("the transfer from A");
    let ra: IfStats = lab
        .r
        .if_stats(IF_RA)
        .expect("R's veth counters")
        .since(&ra0);
    let rb: IfStats = lab
        .r
        .if_stats(IF_RB)
        .expect("R's veth counters")
        .since(&rb0);
    println!("sent {sent:?} A -> {to}; R {IF_RA}: {ra:?}; R {IF_RB}: {rb:?}");
    (ra.rx_l3_bytes(), rb.rx_l3_bytes())
}

/// What the receiver holds once flowtel exported everything so far.
fn settle(ft: &Flowtel, receiver: &OtlpReceiver) -> Series {
    common::scenario::wait_exported("receiver", ft, STABLE_TIMEOUT, || {
        Series::from_points(&receiver.sum_points(0))
    })
}

/// Waits until the cache has listed every kind (`/readyz`
/// `kubernetes.synced`) and flowtel has taken that view: it does so before
/// each dump, so a dump begun after the sync names flows after it.
fn wait_synced(test: &str, ft: &Flowtel) {
    let synced = ft
        .wait_for_kube_synced(SYNC_TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: {e:#}"));
    ft.wait_for_dump_after(&synced, SYNC_TIMEOUT)
        .unwrap_or_else(|e| panic!("{test}: {e:#}"));
}

/// Waits until flowtel names B's address after Deployment `ns/workload`, as
/// the API server now says. /readyz does not show which objects the cache
/// holds, so this asks flowtel itself: a connect from A to B's closed
/// `PROBE_PORT` (a series of its own) until the receiver shows one named
/// so. Connections that start afterwards are named after it too.
fn wait_named(
    test: &str,
    ft: &Flowtel,
    lab: &RouterLab,
    receiver: &OtlpReceiver,
    ns: &str,
    workload: &str,
) {
    let deadline = Instant::now() + NAMING_TIMEOUT;
    let probe = AttrValue::Int(PROBE_PORT.into());
    for attempt in 1.. {
        let connect = lab
            .a
            .in_ns(|| TcpStream::connect_timeout(&sock(B_V4, PROBE_PORT), Duration::from_secs(5)))
            .expect("entering A");
        assert!(
            matches!(&connect, Err(e) if e.kind() == ErrorKind::ConnectionRefused),
            "{test}: a connect to {B_V4}:{PROBE_PORT} must be refused: {connect:?}"
        );
        let series = settle(ft, receiver);
        let named = series.bytes.keys().any(|a| {
            a.get("server.port") == Some(&probe)
                && a.get("flowtel.peer.k8s.namespace.name") == Some(&s(ns))
                && a.get("flowtel.peer.k8s.workload.name") == Some(&s(workload))
        });
        if named {
            println!("{test}: probe {attempt}: {B_V4} is named {ns}/{workload}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{test}: flowtel did not name {B_V4} {ns}/{workload} within {NAMING_TIMEOUT:?}\n\
             series:\n{}",
            series.describe()
        );
    }
}

fn check(test: &str, series: &Series, attrs: &Attrs, truth: u64, what: &str) {
    let got = series.bytes.get(attrs).map(|p| p.value).unwrap_or_else(|| {
        panic!(
            "{test}: {what}: no {BYTES} series {}\nseries:\n{}",
            show(attrs),
            series.describe()
        )
    });
    let direction = attrs
        .get(DIRECTION)
        .map(ToString::to_string)
        .unwrap_or_default();
    println!(
        "{test}: {what} {direction}: veth {truth} B, reported {got} B ({:+.3} %)",
        deviation_pct(got, truth)
    );
    assert!(
        within(got, truth, TOLERANCE),
        "{test}: {what}: expected {truth} B ±1 % for {}, got {got} ({:+.3} %)\nseries:\n{}",
        show(attrs),
        deviation_pct(got, truth),
        series.describe()
    );
}
