//! The Kubernetes cache with the real kube client (through
//! `enrich::kubernetes::start`) against the in-process API server of
//! `common::kubeapi`: workload naming through owner references, host
//! network, dual stack, address reuse, 410 Gone, an API server that is
//! down at start or restarts mid-run, and malformed objects.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::kubeapi::{fx, KubeApi, Resource};
use flowtel::enrich::kubernetes::{
    self, KubeHandle, KubernetesConfig, KubernetesMode, Peer, PodInfo, Snapshot, WorkloadKind,
};
use flowtel::telemetry::Telemetry;
use serde_json::{json, Value};

/// Longer than the watcher's backoff after a few failed attempts.
const WAIT: Duration = Duration::from_secs(60);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a literal address")
}

fn start(kubeconfig: &Path, retention: Duration) -> KubeHandle {
    let cfg = KubernetesConfig {
        enabled: KubernetesMode::On,
        kubeconfig: Some(kubeconfig.to_path_buf()),
        pod_labels: vec!["app.kubernetes.io/name".into(), "team".into()],
        ip_retention: retention,
        network_events: false,
        ip_events: false,
        max_objects: kubernetes::DEFAULT_MAX_OBJECTS,
    };
    kubernetes::start(&cfg, &Telemetry::default())
        .expect("the cache starts")
        .expect("enabled by the configuration")
}

/// Polls the snapshot until `ready` holds; fails naming `what` after
/// [`WAIT`].
async fn wait_for(
    handle: &KubeHandle,
    what: &str,
    ready: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let deadline = Instant::now() + WAIT;
    loop {
        let snapshot = handle.snapshot();
        if ready(&snapshot) {
            return snapshot;
        }
        let stats = handle.stats();
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: counts {:?}, synced {}, watch errors {}, relists {}, rejected {}",
            snapshot.counts(),
            snapshot.synced(),
            stats.watch_errors(),
            stats.relists(),
            stats.objects_rejected()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pod_at(snapshot: &Snapshot, address: &str, port: Option<u16>, at: SystemTime) -> Arc<PodInfo> {
    match snapshot.lookup(ip(address), port, at) {
        Some(Peer::Pod(p)) => p,
        other => panic!("expected a pod at {address} port {port:?}, got {other:?}"),
    }
}

fn pod_named(snapshot: &Snapshot, address: &str, at: SystemTime) -> Option<String> {
    match snapshot.lookup(ip(address), None, at) {
        Some(Peer::Pod(p)) => Some(format!("{}/{}", p.namespace, p.name)),
        _ => None,
    }
}

fn node_at(snapshot: &Snapshot, address: &str, port: Option<u16>) -> String {
    match snapshot.lookup(ip(address), port, SystemTime::now()) {
        Some(Peer::Node(n)) => n.name.to_string(),
        other => panic!("expected a node at {address} port {port:?}, got {other:?}"),
    }
}

fn service_at(snapshot: &Snapshot, address: &str) -> String {
    match snapshot.lookup(ip(address), Some(80), SystemTime::now()) {
        Some(Peer::Service(s)) => format!("{}/{}", s.namespace, s.name),
        other => panic!("expected a service at {address}, got {other:?}"),
    }
}

/// The objects of a small cluster, in the order controllers create them.
struct Cluster {
    objects: Vec<Value>,
}

impl Cluster {
    fn new() -> Self {
        let mut objects = Vec::new();
        let node_a = fx::node(
            "node-a",
            "eu-west-1a",
            "eu-west-1",
            &["192.168.0.10"],
            Some("203.0.113.10"),
        );
        let node_b = fx::node(
            "node-b",
            "eu-west-1b",
            "eu-west-1",
            &["192.168.0.11", "fd00:192::11"],
            None,
        );
        let on_a = ("node-a", "192.168.0.10");
        let on_b = ("node-b", "192.168.0.11");

        let checkout = fx::workload("Deployment", "shop", "checkout");
        let checkout_rs = fx::replicaset("shop", "checkout-5f6c7d8b9", Some(&checkout));
        let checkout_1 = fx::PodFx::new("shop", "checkout-5f6c7d8b9-x2x9z")
            .on(on_a.0, on_a.1)
            .ips(&["10.1.0.10", "fd00:10:1::10"])
            .owned_by(&checkout_rs)
            .label("app.kubernetes.io/name", "checkout")
            .label("team", "web")
            .build();
        let checkout_2 = fx::PodFx::new("shop", "checkout-5f6c7d8b9-p8k2m")
            .on(on_b.0, on_b.1)
            .ips(&["10.1.1.11", "fd00:10:1::11"])
            .owned_by(&checkout_rs)
            .label("app.kubernetes.io/name", "checkout")
            .build();
        let payments = fx::workload("Deployment", "pay", "payments");
        let payments_rs = fx::replicaset("pay", "payments-7d4b578979", Some(&payments));
        let payments_1 = fx::PodFx::new("pay", "payments-7d4b578979-q7w4r")
            .on(on_b.0, on_b.1)
            .ips(&["10.1.1.20"])
            .owned_by(&payments_rs)
            .build();
        let nightly = fx::workload("CronJob", "ops", "nightly");
        let nightly_job = fx::job("ops", "nightly-28911520", Some(&nightly));
        let nightly_pod = fx::PodFx::new("ops", "nightly-28911520-zk4lw")
            .on(on_a.0, on_a.1)
            .ips(&["10.1.0.30"])
            .owned_by(&nightly_job)
            .build();
        let migrate_job = fx::job("ops", "migrate", None);
        let migrate_pod = fx::PodFx::new("ops", "migrate-b8x7v")
            .on(on_a.0, on_a.1)
            .ips(&["10.1.0.31"])
            .owned_by(&migrate_job)
            .build();
        let db = fx::workload("StatefulSet", "shop", "db");
        let db_0 = fx::PodFx::new("shop", "db-0")
            .on(on_b.0, on_b.1)
            .ips(&["10.1.1.40"])
            .owned_by(&db)
            .build();
        let exporter = fx::workload("DaemonSet", "monitoring", "node-exporter");
        let exporter_a = fx::PodFx::new("monitoring", "node-exporter-4xk2p")
            .on(on_a.0, on_a.1)
            .ips(&[on_a.1])
            .host_network(&[9100])
            .owned_by(&exporter)
            .build();
        let bare_rs = fx::replicaset("shop", "legacy-6c9f8", None);
        let legacy = fx::PodFx::new("shop", "legacy-6c9f8-m2n4b")
            .on(on_a.0, on_a.1)
            .ips(&["10.1.0.50"])
            .owned_by(&bare_rs)
            .build();
        let debug = fx::PodFx::new("shop", "debug")
            .on(on_b.0, on_b.1)
            .ips(&["10.1.1.60"])
            .build();

        let checkout_svc = fx::service("shop", "checkout", &["10.96.0.10", "fd00:96::10"]);
        let checkout_v4 = fx::endpoint_slice(&checkout_svc, "IPv4", &[&checkout_1, &checkout_2]);
        let checkout_v6 = fx::endpoint_slice(&checkout_svc, "IPv6", &[&checkout_1, &checkout_2]);
        let payments_svc = fx::service("pay", "payments", &["10.96.0.20"]);
        let payments_eps = fx::endpoint_slice(&payments_svc, "IPv4", &[&payments_1]);

        objects.extend([
            node_a,
            node_b,
            checkout_rs,
            payments_rs,
            nightly_job,
            migrate_job,
            bare_rs,
        ]);
        objects.extend([
            checkout_1,
            checkout_2,
            payments_1,
            nightly_pod,
            migrate_pod,
            db_0,
            exporter_a,
            legacy,
            debug,
        ]);
        objects.extend([
            checkout_svc,
            checkout_v4,
            checkout_v6,
            payments_svc,
            payments_eps,
        ]);
        Self { objects }
    }

    fn apply_to(&self, api: &KubeApi) {
        for o in &self.objects {
            api.apply(o);
        }
    }
}

/// Everything [`Cluster`] should resolve to.
fn assert_cluster(s: &Snapshot) {
    let now = SystemTime::now();
    let counts = s.counts();
    assert_eq!(
        (
            counts.pods,
            counts.services,
            counts.endpoint_slices,
            counts.nodes,
            counts.replicasets,
            counts.jobs
        ),
        (9, 2, 3, 2, 3, 2),
        "{counts:?}"
    );

    let workload = |address: &str| {
        let p = pod_at(s, address, None, now);
        (p.workload.kind.clone(), p.workload.name.to_string())
    };
    for address in ["10.1.0.10", "fd00:10:1::10", "10.1.1.11", "fd00:10:1::11"] {
        assert_eq!(
            workload(address),
            (WorkloadKind::Deployment, "checkout".into()),
            "{address}"
        );
    }
    assert_eq!(
        workload("10.1.1.20"),
        (WorkloadKind::Deployment, "payments".into())
    );
    assert_eq!(
        workload("10.1.0.30"),
        (WorkloadKind::CronJob, "nightly".into())
    );
    assert_eq!(workload("10.1.0.31"), (WorkloadKind::Job, "migrate".into()));
    assert_eq!(
        workload("10.1.1.40"),
        (WorkloadKind::StatefulSet, "db".into())
    );
    assert_eq!(
        workload("10.1.0.50"),
        (WorkloadKind::ReplicaSet, "legacy-6c9f8".into())
    );
    assert_eq!(workload("10.1.1.60"), (WorkloadKind::Pod, "debug".into()));

    let checkout = pod_at(s, "10.1.0.10", None, now);
    assert_eq!(&*checkout.namespace, "shop");
    assert_eq!(&*checkout.name, "checkout-5f6c7d8b9-x2x9z");
    assert_eq!(checkout.node.as_deref(), Some("node-a"));
    assert_eq!(checkout.zone.as_deref(), Some("eu-west-1a"));
    assert_eq!(checkout.region.as_deref(), Some("eu-west-1"));
    assert_eq!(
        checkout.label("app.kubernetes.io/name").map(|v| &**v),
        Some("checkout")
    );
    assert_eq!(checkout.label("team").map(|v| &**v), Some("web"));
    assert!(!checkout.host_network);
    assert_eq!(checkout.uid.len(), 36);
    let db = pod_at(s, "10.1.1.40", None, now);
    assert_eq!(db.zone.as_deref(), Some("eu-west-1b"));
    assert!(db.label("team").is_none());

    // Host network: the node's address is the node, unless the port is
    // one the pod declares.
    let exporter = pod_at(s, "192.168.0.10", Some(9100), now);
    assert_eq!(
        (&*exporter.name, exporter.host_network),
        ("node-exporter-4xk2p", true)
    );
    assert_eq!(exporter.workload.kind, WorkloadKind::DaemonSet);
    assert_eq!(node_at(s, "192.168.0.10", None), "node-a");
    assert_eq!(node_at(s, "192.168.0.10", Some(10250)), "node-a");
    assert_eq!(node_at(s, "203.0.113.10", None), "node-a");
    assert_eq!(node_at(s, "192.168.0.11", Some(9100)), "node-b");
    assert_eq!(node_at(s, "fd00:192::11", None), "node-b");

    assert_eq!(service_at(s, "10.96.0.10"), "shop/checkout");
    assert_eq!(service_at(s, "fd00:96::10"), "shop/checkout");
    assert_eq!(service_at(s, "10.96.0.20"), "pay/payments");
    let behind = |address: &str| -> Vec<String> {
        s.services_backed_by(ip(address))
            .iter()
            .map(|v| format!("{}/{}", v.namespace, v.name))
            .collect()
    };
    assert_eq!(behind("10.1.1.20"), ["pay/payments"]);
    assert_eq!(behind("fd00:10:1::11"), ["shop/checkout"]);
    assert!(behind("10.1.1.40").is_empty());

    let node_b = s.node("node-b").expect("node-b is known");
    assert_eq!(node_b.zone.as_deref(), Some("eu-west-1b"));
    assert_eq!(
        node_b.addresses.to_vec(),
        vec![ip("192.168.0.11"), ip("fd00:192::11")]
    );
    assert_eq!(s.lookup(ip("10.99.0.1"), None, now), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_workloads_services_nodes_and_host_network_pods() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let api = KubeApi::started().await;
    Cluster::new().apply_to(&api);
    let handle = start(&api.write_kubeconfig(dir.path()), Duration::from_secs(120));
    let s = wait_for(&handle, "the first sync", |s| s.synced()).await;
    assert_cluster(&s);
    let stats = handle.stats();
    assert!(stats.synced());
    assert_eq!(stats.objects_rejected(), 0);
    assert!(stats.objects_applied() >= 21, "{}", stats.objects_applied());
    // Every kind was listed once and then watched (the watches start right after).
    let deadline = Instant::now() + WAIT;
    for resource in Resource::ALL {
        assert_eq!(api.requests(resource, "list"), 1, "{resource:?}");
        while api.requests(resource, "watch") == 0 {
            assert!(Instant::now() < deadline, "{resource:?} is not watched");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // ReplicaSets and Jobs are read as metadata only.
        let everything = api.requests(resource, "list") + api.requests(resource, "watch");
        let expected = match resource {
            Resource::ReplicaSets | Resource::Jobs => everything,
            _ => 0,
        };
        assert_eq!(api.metadata_requests(resource), expected, "{resource:?}");
    }

    // A change at run time arrives through the watch.
    let cache = fx::workload("StatefulSet", "shop", "cache");
    api.apply(
        &fx::PodFx::new("shop", "cache-0")
            .on("node-a", "192.168.0.10")
            .ips(&["10.1.0.70"])
            .owned_by(&cache)
            .build(),
    );
    let s = wait_for(&handle, "the new pod", |s| {
        pod_named(s, "10.1.0.70", SystemTime::now()).is_some()
    })
    .await;
    assert_eq!(
        pod_at(&s, "10.1.0.70", None, SystemTime::now())
            .zone
            .as_deref(),
        Some("eu-west-1a")
    );
    assert_eq!(api.requests(Resource::Pods, "list"), 1);

    handle.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_objects_new_objects_are_shed_and_counted() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let api = KubeApi::started().await;
    api.apply(&fx::node(
        "node-a",
        "eu-west-1a",
        "eu-west-1",
        &["192.168.0.10"],
        None,
    ));
    let pods: Vec<Value> = (1..=5)
        .map(|i| {
            api.apply(
                &fx::PodFx::new("shop", &format!("web-{i}"))
                    .on("node-a", "192.168.0.10")
                    .ips(&[&format!("10.1.0.{i}")])
                    .build(),
            )
        })
        .collect();
    let cfg = KubernetesConfig {
        enabled: KubernetesMode::On,
        kubeconfig: Some(api.write_kubeconfig(dir.path())),
        network_events: false,
        max_objects: 4,
        ..KubernetesConfig::default()
    };
    let telemetry = Telemetry::default();
    let handle = kubernetes::start(&cfg, &telemetry)
        .expect("the cache starts")
        .expect("enabled by the configuration");
    // Six objects listed, room for four: which two are shed depends on
    // the order the kinds' lists arrive in, how many does not.
    let s = wait_for(&handle, "the first sync", |s| s.synced()).await;
    let stats = handle.stats();
    assert_eq!(stats.objects_shed(), 2);
    assert_eq!(stats.objects_cached(), 4);
    let counts = s.counts();
    assert_eq!(counts.pods + counts.nodes, 4, "{counts:?}");
    let named = (1..=5)
        .filter(|i| pod_named(&s, &format!("10.1.0.{i}"), SystemTime::now()).is_some())
        .count();
    assert_eq!(named, counts.pods);
    assert_eq!(
        telemetry.value(&flowtel::telemetry::catalogue::K8S_OBJECTS_SHED),
        2
    );

    // Deletions make room: a new pod is taken in and named.
    for pod in &pods {
        assert!(api.delete(pod));
    }
    wait_for(&handle, "the pods' deletion", |s| s.counts().pods == 0).await;
    api.apply(
        &fx::PodFx::new("shop", "late")
            .on("node-a", "192.168.0.10")
            .ips(&["10.1.0.9"])
            .build(),
    );
    let s = wait_for(&handle, "the late pod", |s| {
        pod_named(s, "10.1.0.9", SystemTime::now()).is_some()
    })
    .await;
    assert_eq!(
        pod_named(&s, "10.1.0.9", SystemTime::now()).as_deref(),
        Some("shop/late")
    );
    assert_eq!(stats.objects_shed(), 2);

    handle.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_address_is_named_by_time() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let api = KubeApi::started().await;
    api.apply(&fx::node("node-a", "z1", "r1", &["192.168.0.10"], None));
    let web = fx::replicaset(
        "shop",
        "web-5f6c7",
        Some(&fx::workload("Deployment", "shop", "web")),
    );
    api.apply(&web);
    let old = api.apply(
        &fx::PodFx::new("shop", "web-5f6c7-aaaaa")
            .on("node-a", "192.168.0.10")
            .ips(&["10.1.2.7"])
            .owned_by(&web)
            .build(),
    );
    let retention = Duration::from_secs(3);
    let handle = start(&api.write_kubeconfig(dir.path()), retention);
    wait_for(&handle, "the first sync", |s| {
        s.synced() && pod_named(s, "10.1.2.7", SystemTime::now()).is_some()
    })
    .await;
    let while_old = SystemTime::now();

    assert!(api.delete(&old));
    wait_for(&handle, "the deletion", |s| {
        pod_named(s, "10.1.2.7", SystemTime::now()).is_none()
    })
    .await;
    let cache = fx::workload("StatefulSet", "shop", "cache");
    api.apply(
        &fx::PodFx::new("shop", "cache-0")
            .on("node-a", "192.168.0.10")
            .ips(&["10.1.2.7"])
            .owned_by(&cache)
            .build(),
    );
    let s = wait_for(&handle, "the new holder", |s| {
        pod_named(s, "10.1.2.7", SystemTime::now()).as_deref() == Some("shop/cache-0")
    })
    .await;
    let then = pod_at(&s, "10.1.2.7", None, while_old);
    assert_eq!(
        (&*then.name, &*then.workload.name),
        ("web-5f6c7-aaaaa", "web")
    );
    assert_eq!(
        pod_at(&s, "10.1.2.7", None, SystemTime::now())
            .workload
            .kind,
        WorkloadKind::StatefulSet
    );

    // A finished pod keeps its podIP in the API but lets the address go.
    let job = fx::job("ops", "once", None);
    api.apply(&job);
    let running = api.apply(
        &fx::PodFx::new("ops", "once-q2w3e")
            .on("node-a", "192.168.0.10")
            .ips(&["10.1.2.8"])
            .owned_by(&job)
            .build(),
    );
    wait_for(&handle, "the job pod", |s| {
        pod_named(s, "10.1.2.8", SystemTime::now()).is_some()
    })
    .await;
    let while_running = SystemTime::now();
    let mut done = running.clone();
    done["status"]["phase"] = json!("Succeeded");
    api.apply(&done);
    wait_for(&handle, "the finished pod to free its address", |s| {
        pod_named(s, "10.1.2.8", SystemTime::now()).is_none()
    })
    .await;
    api.apply(
        &fx::PodFx::new("ops", "next-r5t6y")
            .on("node-a", "192.168.0.10")
            .ips(&["10.1.2.8"])
            .build(),
    );
    let s = wait_for(&handle, "the next pod", |s| {
        pod_named(s, "10.1.2.8", SystemTime::now()).as_deref() == Some("ops/next-r5t6y")
    })
    .await;
    assert_eq!(
        pod_named(&s, "10.1.2.8", while_running).as_deref(),
        Some("ops/once-q2w3e")
    );
    assert_eq!(s.counts().pods, 3, "the finished pod is still an object");

    // After the retention the old holders are forgotten: the current one
    // is the only one known, for any time.
    let s = wait_for(&handle, "the retention to pass", |s| {
        pod_named(s, "10.1.2.7", while_old).as_deref() == Some("shop/cache-0")
            && pod_named(s, "10.1.2.8", while_running).as_deref() == Some("ops/next-r5t6y")
    })
    .await;
    assert_eq!(
        pod_named(&s, "10.1.2.7", SystemTime::now()).as_deref(),
        Some("shop/cache-0")
    );

    handle.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relists_after_410_gone_and_catches_up() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let api = KubeApi::started().await;
    let cluster = Cluster::new();
    cluster.apply_to(&api);
    let handle = start(&api.write_kubeconfig(dir.path()), Duration::from_secs(120));
    wait_for(&handle, "the first sync", |s| s.synced()).await;
    let stats = handle.stats();
    let (relists, errors) = (stats.relists(), stats.watch_errors());
    let lists = api.requests(Resource::Pods, "list");

    // Changes the open watches never see: only a re-list can find them.
    api.pause_watches();
    let debug = cluster
        .objects
        .iter()
        .find(|o| o["metadata"]["name"] == "debug")
        .expect("the debug pod");
    assert!(api.delete(debug));
    api.apply(
        &fx::PodFx::new("shop", "late")
            .on("node-b", "192.168.0.11")
            .ips(&["10.1.1.61"])
            .build(),
    );
    let mut node_a = cluster.objects[0].clone();
    node_a["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-west-1c");
    api.apply(&node_a);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = handle.snapshot();
    assert_eq!(
        pod_named(&s, "10.1.1.60", SystemTime::now()).as_deref(),
        Some("shop/debug"),
        "paused watches delivered a change"
    );

    api.force_gone();
    let s = wait_for(&handle, "the re-list", |s| {
        let now = SystemTime::now();
        pod_named(s, "10.1.1.60", now).is_none()
            && pod_named(s, "10.1.1.61", now).is_some()
            && pod_at(s, "10.1.0.10", None, now).zone.as_deref() == Some("eu-west-1c")
    })
    .await;
    // Each watch re-lists after its own backoff.
    let deadline = Instant::now() + WAIT;
    while stats.relists() < relists + 6 {
        assert!(
            Instant::now() < deadline,
            "every watch re-lists: {relists} -> {}",
            stats.relists()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        stats.watch_errors() >= errors + 6,
        "every watch saw the 410"
    );
    assert!(api.requests(Resource::Pods, "list") > lists);
    assert_eq!(s.counts().pods, 9);
    assert!(s.synced());
    // Everything else is as before.
    assert_eq!(
        pod_at(&s, "10.1.1.40", None, SystemTime::now())
            .workload
            .kind,
        WorkloadKind::StatefulSet
    );
    assert_eq!(service_at(&s, "fd00:96::10"), "shop/checkout");

    handle.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_then_synced() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let api = KubeApi::new();
    Cluster::new().apply_to(&api);
    let started = Instant::now();
    let handle = start(&api.write_kubeconfig(dir.path()), Duration::from_secs(120));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "start must not wait for the API server"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = handle.snapshot();
    let stats = handle.stats();
    assert!(!s.synced() && !stats.synced());
    assert_eq!(s.counts().pods, 0);
    assert_eq!(s.lookup(ip("10.1.0.10"), None, SystemTime::now()), None);
    assert!(stats.watch_errors() > 0, "connection failures are counted");

    api.start().await;
    let s = wait_for(&handle, "the sync once the API server is up", |s| {
        s.synced()
    })
    .await;
    assert_cluster(&s);
    assert!(stats.synced());

    handle.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_up_changes_made_while_the_api_server_was_down() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let api = KubeApi::started().await;
    let cluster = Cluster::new();
    cluster.apply_to(&api);
    let handle = start(&api.write_kubeconfig(dir.path()), Duration::from_secs(120));
    wait_for(&handle, "the first sync", |s| s.synced()).await;
    let stats = handle.stats();
    let errors = stats.watch_errors();

    api.stop().await;
    let db_0 = cluster
        .objects
        .iter()
        .find(|o| o["metadata"]["name"] == "db-0")
        .expect("db-0");
    assert!(api.delete(db_0));
    api.apply(
        &fx::PodFx::new("shop", "db-1")
            .on("node-a", "192.168.0.10")
            .ips(&["10.1.0.41"])
            .owned_by(&fx::workload("StatefulSet", "shop", "db"))
            .build(),
    );
    api.apply(&fx::service("shop", "db", &["10.96.0.40"]));
    let mut node_b = cluster.objects[1].clone();
    node_b["metadata"]["labels"]["topology.kubernetes.io/zone"] = json!("eu-west-1c");
    api.apply(&node_b);

    // Down: the last view stays in use, and nothing breaks.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = handle.snapshot();
    assert!(s.synced());
    assert_eq!(
        pod_named(&s, "10.1.1.40", SystemTime::now()).as_deref(),
        Some("shop/db-0")
    );
    assert!(
        stats.watch_errors() > errors,
        "the broken watches are counted"
    );

    api.start().await;
    let s = wait_for(&handle, "the changes made while down", |s| {
        let now = SystemTime::now();
        pod_named(s, "10.1.1.40", now).is_none()
            && pod_named(s, "10.1.0.41", now).is_some()
            && matches!(
                s.lookup(ip("10.96.0.40"), None, now),
                Some(Peer::Service(_))
            )
            && pod_at(s, "10.1.1.20", None, now).zone.as_deref() == Some("eu-west-1c")
    })
    .await;
    assert_eq!(s.counts().services, 3);
    assert!(
        stats.relists() >= 1,
        "the restarted server forgot the watch history"
    );
    assert_eq!(service_at(&s, "10.96.0.10"), "shop/checkout");

    handle.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_objects_are_counted_and_skipped() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let api = KubeApi::started().await;
    Cluster::new().apply_to(&api);
    let bad_ip = fx::PodFx::new("shop", "bad-ip")
        .on("node-a", "192.168.0.10")
        .ips(&["10.1.3.300"])
        .build();
    let mut no_name = fx::PodFx::new("shop", "x")
        .on("node-a", "192.168.0.10")
        .ips(&["10.1.3.2"])
        .build();
    no_name["metadata"]
        .as_object_mut()
        .expect("metadata")
        .remove("name");
    let mut bad_service = fx::service("shop", "broken", &["10.96.0.99"]);
    bad_service["spec"]["clusterIPs"] = json!(["10.96.0.999"]);
    let bad_node = fx::node("node-x", "z", "r", &["192.168.0.300"], None);
    let mut bad_slice = fx::endpoint_slice(
        &fx::service("shop", "checkout", &["10.96.0.10"]),
        "IPv4",
        &[],
    );
    bad_slice["metadata"]["name"] = json!("checkout-bad01");
    bad_slice["endpoints"] = json!([{"addresses": ["10.1.0.x"], "conditions": {"ready": true}}]);
    for o in [&bad_ip, &no_name, &bad_service, &bad_node, &bad_slice] {
        api.apply(o);
    }
    let handle = start(&api.write_kubeconfig(dir.path()), Duration::from_secs(120));
    let s = wait_for(&handle, "the first sync", |s| s.synced()).await;
    let stats = handle.stats();
    assert_eq!(stats.objects_rejected(), 5);
    assert_cluster(&s);

    // A good pod turned bad keeps its last good version.
    let mut legacy = fx::PodFx::new("shop", "fine")
        .on("node-a", "192.168.0.10")
        .ips(&["10.1.3.3"])
        .build();
    legacy = api.apply(&legacy);
    wait_for(&handle, "the good pod", |s| {
        pod_named(s, "10.1.3.3", SystemTime::now()).is_some()
    })
    .await;
    legacy["status"]["podIPs"] = json!([{"ip": "10.1.3.3"}, {"ip": "nope"}]);
    api.apply(&legacy);
    let deadline = Instant::now() + WAIT;
    while stats.objects_rejected() < 6 {
        assert!(Instant::now() < deadline, "the bad update was not rejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pod_named(&handle.snapshot(), "10.1.3.3", SystemTime::now()).as_deref(),
        Some("shop/fine")
    );
    assert!(stats.synced());

    handle.stop().await;
    api.stop().await;
}

#[test]
fn off_means_no_cache_and_a_missing_kubeconfig_is_an_error() {
    let off = KubernetesConfig {
        enabled: KubernetesMode::Off,
        ..KubernetesConfig::default()
    };
    assert!(kubernetes::start(&off, &Telemetry::default())
        .expect("off is not an error")
        .is_none());
    let missing = KubernetesConfig {
        enabled: KubernetesMode::On,
        kubeconfig: Some("/nonexistent/kubeconfig.yaml".into()),
        ..KubernetesConfig::default()
    };
    let err =
        kubernetes::start(&missing, &Telemetry::default()).expect_err("an unreadable kubeconfig");
    assert!(
        err.to_string().contains("/nonexistent/kubeconfig.yaml"),
        "{err:#}"
    );
}
