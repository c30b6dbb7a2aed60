//! CNI and mesh detection over real-shaped CNI configuration directories.

use std::path::Path;
use std::time::Duration;

use flowtel::enrich::kubernetes::mesh_of;
use flowtel::flow::mesh::MeshRole;
use flowtel::source::detect::{self, detect_cni, CniKind, DetectConfig};

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "log_file_path": "/var/log/calico/cni/cni.log",
      "datastore_type": "kubernetes",
      "nodename": "worker-1",
      "mtu": 0,
      "ipam": { "type": "calico-ipam" },
      "policy": { "type": "k8s" },
      "kubernetes": { "kubeconfig": "/etc/cni/net.d/calico-kubeconfig" }
    },
    { "type": "portmap", "snat": true, "capabilities": { "portMappings": true } },
    { "type": "bandwidth", "capabilities": { "bandwidth": true } }
  ]
}"#;

const CANAL: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "worker-1",
      "mtu": 1450,
      "ipam": { "type": "host-local", "subnet": "usePodCidr" },
      "policy": { "type": "k8s" },
      "kubernetes": { "kubeconfig": "/etc/cni/net.d/calico-kubeconfig" }
    },
    { "type": "portmap", "snat": true, "capabilities": { "portMappings": true } },
    { "type": "bandwidth", "capabilities": { "bandwidth": true } }
  ]
}"#;

/// The older Canal layout: Flannel delegating pod plumbing to Calico.
const CANAL_DELEGATE: &str = r#"{
  "name": "canal",
  "cniVersion": "0.3.1",
  "plugins": [
    { "type": "flannel", "delegate": { "type": "calico", "etcd_endpoints": "http://10.96.232.136:6666", "policy": { "type": "k8s" } } },
    { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }
  ]
}"#;

const CILIUM: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    { "type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log" }
  ]
}"#;

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "1.0.0",
  "plugins": [
    { "type": "flannel", "delegate": { "hairpinMode": true, "isDefaultGateway": true } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}"#;

const AWS_VPC: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "aws-cni",
  "disableCheck": true,
  "plugins": [
    {
      "name": "aws-cni",
      "type": "aws-cni",
      "vethPrefix": "eni",
      "mtu": "9001",
      "podSGEnforcingMode": "strict",
      "pluginLogFile": "/var/log/aws-routed-eni/plugin.log",
      "pluginLogLevel": "DEBUG"
    },
    {
      "name": "egress-cni",
      "type": "egress-cni",
      "mtu": "9001",
      "enabled": "false",
      "randomizeSNAT": "prng",
      "nodeIP": "",
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "fd00::ac:00/118" }]], "routes": [{ "dst": "::/0" }], "dataDir": "/run/cni/v4pd/egress-v6-ipam" },
      "pluginLogFile": "/var/log/aws-routed-eni/egress-v6-plugin.log",
      "pluginLogLevel": "DEBUG"
    },
    { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }
  ]
}"#;

/// Cilium in chaining mode on EKS: AWS VPC CNI owns the addresses.
const AWS_CHAINED_CILIUM: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "aws-cni",
  "plugins": [
    { "name": "aws-cni", "type": "aws-cni", "vethPrefix": "eni", "mtu": "9001", "pluginLogFile": "/var/log/aws-routed-eni/plugin.log", "pluginLogLevel": "Debug" },
    { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
    { "name": "cilium", "type": "cilium-cni", "enable-debug": false }
  ]
}"#;

const WEAVE: &str = r#"{
  "cniVersion": "0.3.0",
  "name": "weave",
  "plugins": [
    { "name": "weave", "type": "weave-net", "hairpinMode": true },
    { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }
  ]
}"#;

const AZURE: &str = r#"{
  "cniVersion": "0.3.0",
  "name": "azure",
  "plugins": [
    { "type": "azure-vnet", "mode": "transparent", "ipsToRouteViaHost": ["169.254.20.10"], "ipam": { "type": "azure-vnet-ipam" } },
    { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }
  ]
}"#;

/// A single-plugin `.conf`, as kind and containerd's defaults write them.
const BRIDGE_CONF: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "containerd-net",
  "type": "bridge",
  "bridge": "cni0",
  "isGateway": true,
  "ipMasq": true,
  "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.88.0.0/16" }]], "routes": [{ "dst": "0.0.0.0/0" }] }
}"#;

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write a config");
    }
    dir
}

fn kind_of(files: &[(&str, &str)]) -> (CniKind, Option<CniKind>) {
    let dir = dir_with(files);
    let found = detect_cni(dir.path());
    let active = found.active.expect("an active configuration");
    (active.kind, active.chained_on)
}

#[test]
fn names_each_cni_from_its_plugin_types() {
    let cases: &[(&str, &str, CniKind)] = &[
        ("10-calico.conflist", CALICO, CniKind::Calico),
        ("10-canal.conflist", CANAL, CniKind::Canal),
        ("10-canal.conflist", CANAL_DELEGATE, CniKind::Canal),
        ("05-cilium.conflist", CILIUM, CniKind::Cilium),
        ("10-flannel.conflist", FLANNEL, CniKind::Flannel),
        ("10-aws.conflist", AWS_VPC, CniKind::AwsVpc),
        ("10-weave.conflist", WEAVE, CniKind::Weave),
        ("10-azure.conflist", AZURE, CniKind::Azure),
        ("10-containerd-net.conf", BRIDGE_CONF, CniKind::Bridge),
    ];
    for (file, content, expected) in cases {
        assert_eq!(
            kind_of(&[(file, content)]),
            (expected.clone(), None),
            "{file}"
        );
    }
}

#[test]
fn file_names_do_not_decide() {
    // A Calico configuration under a Flannel-looking name is still Calico.
    assert_eq!(
        kind_of(&[("10-flannel.conflist", CALICO)]).0,
        CniKind::Calico
    );
}

#[test]
fn cilium_chained_on_aws_vpc_cni() {
    let dir = dir_with(&[("05-cilium.conflist", AWS_CHAINED_CILIUM)]);
    let active = detect_cni(dir.path()).active.expect("active");
    assert_eq!(active.kind, CniKind::Cilium);
    assert_eq!(active.chained_on, Some(CniKind::AwsVpc));
    assert_eq!(active.network, "aws-cni");
    assert_eq!(active.plugins, ["aws-cni", "portmap", "cilium-cni"]);
    assert_eq!(active.kind.as_str(), "cilium");
}

#[test]
fn first_valid_file_in_name_order_wins_and_malformed_ones_are_skipped() {
    let dir = dir_with(&[
        (
            "00-broken.conflist",
            "{ \"name\": \"x\", \"plugins\": [ { \"type\": ",
        ),
        ("01-empty.conflist", r#"{"name": "x", "plugins": []}"#),
        (
            "02-notype.conflist",
            r#"{"name": "x", "plugins": [{"mtu": 1500}]}"#,
        ),
        ("03-array.json", "[1, 2]"),
        ("04-binary.conf", "\u{0}\u{1}\u{2}"),
        (
            "05-noplugins.conflist",
            r#"{"name": "x", "type": "bridge"}"#,
        ),
        ("10-flannel.conflist", FLANNEL),
        ("20-calico.conflist", CALICO),
        ("99-loopback.conf.bak", CILIUM),
        ("calico-kubeconfig", "apiVersion: v1"),
    ]);
    std::fs::create_dir(dir.path().join("07-dir.conf")).expect("a directory");
    let found = detect_cni(dir.path());
    let active = found.active.expect("active");
    assert_eq!(active.file, dir.path().join("10-flannel.conflist"));
    assert_eq!(active.kind, CniKind::Flannel);
    let skipped: Vec<_> = found
        .skipped
        .iter()
        .map(|s| {
            s.file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        skipped,
        [
            "00-broken.conflist",
            "01-empty.conflist",
            "02-notype.conflist",
            "03-array.json",
            "04-binary.conf",
            "05-noplugins.conflist",
            "07-dir.conf"
        ]
    );
    assert!(found.skipped.iter().all(|s| !s.reason.is_empty()));
    assert!(
        found.skipped[0].reason.starts_with("not JSON"),
        "{:?}",
        found.skipped[0]
    );
}

#[test]
fn a_missing_directory_is_reported_not_fatal() {
    let found = detect_cni(Path::new("/nonexistent/flowtel/net.d"));
    assert!(found.active.is_none());
    assert!(found.dir_error.is_some());
}

#[test]
fn config_defaults_and_unknown_keys() {
    let config: DetectConfig = serde_json::from_str("{}").expect("defaults");
    assert_eq!(config.cni_dir, Path::new("/etc/cni/net.d"));
    assert_eq!(
        config.hubble_socket,
        Path::new("/var/run/cilium/hubble.sock")
    );
    assert_eq!(config.felix_address.to_string(), "127.0.0.1:9091");
    assert!(serde_json::from_str::<DetectConfig>(r#"{"cni_directory": "/x"}"#).is_err());
}

#[test]
fn istio_roles_from_pod_fields() {
    assert_eq!(
        mesh_of(
            &["app", "istio-proxy"],
            &[(
                "sidecar.istio.io/status",
                "{\"containers\":[\"istio-proxy\"]}"
            )],
            &[]
        ),
        Some(MeshRole::IstioSidecar)
    );
    assert_eq!(
        mesh_of(
            &["app"],
            &[("ambient.istio.io/redirection", "enabled")],
            &[]
        ),
        Some(MeshRole::IstioAmbient)
    );
    assert_eq!(
        mesh_of(&["istio-proxy"], &[], &[("app", "ztunnel")]),
        Some(MeshRole::IstioZtunnel)
    );
    assert_eq!(mesh_of(&["app"], &[], &[]), None);
    // A container merely named like the proxy, without injection, is not one.
    assert_eq!(mesh_of(&["istio-proxy"], &[], &[]), None);
}

#[tokio::test]
async fn hubble_socket_and_felix_port() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("hubble.sock");
    let felix = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("address")
    };
    let config = DetectConfig {
        cni_dir: dir.path().to_path_buf(),
        hubble_socket: socket.clone(),
        felix_address: closed,
    };
    let found = detect::detect(&config).await;
    assert!(!found.hubble && !found.felix);

    std::fs::write(&socket, "").expect("a plain file");
    assert!(
        !detect::hubble_present(&socket),
        "a regular file is not a socket"
    );
    std::fs::remove_file(&socket).expect("remove");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind a socket");
    let config = DetectConfig {
        felix_address: felix.local_addr().expect("address"),
        ..config
    };
    let found = detect::detect(&config).await;
    assert!(found.hubble && found.felix);
}

#[tokio::test]
async fn a_cni_change_at_run_time_is_noticed() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = DetectConfig {
        cni_dir: dir.path().to_path_buf(),
        hubble_socket: dir.path().join("hubble.sock"),
        felix_address: "127.0.0.1:1".parse().expect("an address"),
    };
    let (mut rx, task) = detect::watch(config, Duration::from_millis(50)).await;
    assert!(rx.borrow_and_update().cni.active.is_none());

    // The CNI is installed after flowtel started.
    std::fs::write(dir.path().join("10-flannel.conflist"), FLANNEL).expect("write");
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("noticed within 5 s")
        .expect("the watcher is running");
    let kind = rx
        .borrow_and_update()
        .cni
        .active
        .as_ref()
        .map(|a| a.kind.clone());
    assert_eq!(kind, Some(CniKind::Flannel));

    // Migrated to Cilium: a file sorting first takes over.
    std::fs::write(dir.path().join("05-cilium.conflist"), CILIUM).expect("write");
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("noticed within 5 s")
        .expect("the watcher is running");
    let kind = rx
        .borrow_and_update()
        .cni
        .active
        .as_ref()
        .map(|a| a.kind.clone());
    assert_eq!(kind, Some(CniKind::Cilium));

    // Nothing changes: nothing is published.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.changed())
            .await
            .is_err()
    );

    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the watcher stops once nobody listens")
        .expect("no panic");
}
