//! CNI plugin executions, seen in the kernel, against Debian's real
//! plugins (`containernetworking-plugins`: bridge with host-local IPAM)
//! run the way a container runtime runs them through libcni
//! (`tests/common/cni.rs`): ADD, CHECK and DEL of N pods give exactly N
//! events of each (and N of the host-local IPAM that bridge delegates to,
//! with bridge as its parent), with the pod, interface, the address
//! host-local gave and a duration; a conflist naming a missing IPAM binary
//! and an exhausted IPAM range give failure events with the plugin's error
//! message; and every execution run is counted, or counted as lost.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::cni::{debian_plugins, Attachment, CniNetwork, LinkGuard, Ran, SHOW_TIMEOUT};
use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::histogram::{histogram_points, latest_histograms};
use common::kubeapi::{fx, KubeApi, Resource};
use common::netns::{Netns, NetnsGuard};
use common::otlp_receiver::{AttrValue, LogEvent, OtlpReceiver};
use common::{ebpf_conditions, prerequisites_with, wait_until};
use serde_json::{json, Value};

const N: usize = 5;

fn network(name: &str, bridge: &str, ipam: Value, bin_dir: &std::path::Path) -> CniNetwork {
    CniNetwork {
        bin_dir: bin_dir.to_path_buf(),
        conflist: json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": ipam,
            }],
        }),
        // A runtime's own environment besides the CNI variables.
        padding: vec![("FT_RUNTIME_ENV".into(), "x".repeat(6000))],
    }
}

fn attachment(tag: &str, i: usize, ns: &Netns) -> Attachment {
    Attachment {
        container_id: format!("{tag}c{i:04}"),
        netns: ns.path(),
        ifname: "eth0".into(),
        pod_namespace: format!("{tag}-ns"),
        pod_name: format!("pod-{i}"),
        pod_uid: format!("uid-{tag}-{i}"),
    }
}

fn cni_events(receiver: &OtlpReceiver, tag: &str) -> Vec<LogEvent> {
    receiver
        .log_events()
        .into_iter()
        .filter(|e| e.event_name == "flowtel.cni.operation")
        .filter(|e| {
            e.str("k8s.namespace.name")
                .is_some_and(|ns| ns.starts_with(tag))
        })
        .collect()
}

/// The newest total of a counter over all its series.
fn counter_total(receiver: &OtlpReceiver, metric: &str) -> (u64, BTreeMap<String, u64>) {
    let series = receiver.latest(metric, 0);
    let mut by = BTreeMap::new();
    for p in series.values() {
        let key = p
            .attrs
            .values()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",");
        *by.entry(key).or_default() += p.value;
    }
    (series.values().map(|p| p.value).sum(), by)
}

fn double(e: &LogEvent, key: &str) -> Option<f64> {
    match e.attrs.get(key) {
        Some(AttrValue::Other(s)) => s
            .trim_start_matches("Double(")
            .trim_end_matches(')')
            .parse()
            .ok(),
        _ => None,
    }
}

#[test]
fn plugin_executions_give_exact_events_with_pod_ip_duration_and_errors() {
    const TEST: &str = "plugin_executions_give_exact_events_with_pod_ip_duration_and_errors";
    let mut conditions = ebpf_conditions().to_vec();
    let bin_dir = debian_plugins();
    conditions.push((
        bin_dir.is_some(),
        "Debian's containernetworking-plugins is not installed (/usr/lib/cni/bridge)",
    ));
    let Some((tools, _)) = prerequisites_with(TEST, &[], &conditions) else {
        return;
    };
    let Some(bin_dir) = bin_dir else { return };
    let pid = std::process::id();
    let tag = format!("ft{pid}");
    let octet = 20 + pid % 200;
    let data = tempfile::tempdir().expect("temp dir");
    let mut guard = NetnsGuard::new(&tools);
    let host = guard.add("host").expect("flowtel's namespace");
    let _bridges: Vec<LinkGuard> = ["a", "b", "c"]
        .iter()
        .map(|s| LinkGuard {
            ip: tools.ip.clone(),
            name: format!("ftc{}{s}", pid % 10_000_000),
        })
        .collect();

    let mut receiver = OtlpReceiver::start().expect("OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = host.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![("FLOWTEL_CNI__ENABLED", "on".into())],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");
    // The programs are attached before the source first reports.
    assert!(
        wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
            flowtel.readyz().is_ok_and(|(_, b)| {
                b.pointer("/sources/sources")
                    .and_then(Value::as_array)
                    .is_some_and(|s| s.iter().any(|v| v == "cni"))
            })
        }),
        "the cni source never became active:\n{}",
        flowtel.output()
    );

    let mut runs: Vec<Ran> = Vec::new();

    // ---- N pods: ADD, CHECK, DEL ----
    let good = network(
        &format!("{tag}-good"),
        &format!("ftc{}a", pid % 10_000_000),
        json!({
            "type": "host-local",
            "ranges": [[{"subnet": format!("198.18.{octet}.0/24")}]],
            "dataDir": data.path().join("good"),
        }),
        &bin_dir,
    );
    let pods: Vec<(Attachment, Netns)> = (0..N)
        .map(|i| {
            let ns = guard.add(&format!("p{i}")).expect("pod namespace");
            (attachment(&format!("{tag}a"), i, &ns), ns)
        })
        .collect();
    let mut results = BTreeMap::new();
    for (at, _) in &pods {
        let result = good.add(at, &mut runs).expect("ADD succeeds");
        let ip = result["ips"][0]["address"]
            .as_str()
            .expect("the ADD result has an address")
            .to_owned();
        results.insert(at.pod_name.clone(), (ip, result));
    }
    for (at, _) in &pods {
        good.check(at, &results[&at.pod_name].1, &mut runs)
            .expect("CHECK succeeds");
    }
    for (at, _) in &pods {
        good.del(at, Some(&results[&at.pod_name].1), &mut runs)
            .expect("DEL succeeds");
    }
    // bridge delegates each ADD, CHECK and DEL to host-local.
    let good_children = 3 * N;

    // ---- an exhausted range: two addresses, three pods ----
    let small = network(
        &format!("{tag}-small"),
        &format!("ftc{}b", pid % 10_000_000),
        json!({
            "type": "host-local",
            "ranges": [[{
                "subnet": format!("198.19.{octet}.0/24"),
                "rangeStart": format!("198.19.{octet}.10"),
                "rangeEnd": format!("198.19.{octet}.11"),
            }]],
            "dataDir": data.path().join("small"),
        }),
        &bin_dir,
    );
    let mut exhausted_error = String::new();
    for i in 0..3 {
        let ns = guard.add(&format!("s{i}")).expect("pod namespace");
        let at = attachment(&format!("{tag}b"), i, &ns);
        match small.add(&at, &mut runs) {
            Ok(result) => small
                .del(&at, Some(&result), &mut runs)
                .map(|_| ())
                .unwrap_or_else(|e| panic!("DEL failed: {e}")),
            Err(e) => exhausted_error = e,
        }
        if i == 1 {
            // Keep both addresses taken: ADD them again.
            for j in 0..2 {
                let ns = guard.add(&format!("k{j}")).expect("pod namespace");
                small
                    .add(&attachment(&format!("{tag}b"), 10 + j, &ns), &mut runs)
                    .expect("ADD in the small range");
            }
        }
    }
    assert!(
        exhausted_error.contains("no IP addresses available"),
        "the third pod of the small range did not fail for lack of addresses: {exhausted_error}"
    );
    // 2 ADD + 2 DEL, 2 ADD that keep the range full, 1 failed ADD.
    let small_children = 7;

    // ---- a missing IPAM binary ----
    let missing = network(
        &format!("{tag}-missing"),
        &format!("ftc{}c", pid % 10_000_000),
        json!({"type": "ft-no-such-ipam"}),
        &bin_dir,
    );
    let ns = guard.add("m0").expect("pod namespace");
    let missing_error = missing
        .add(&attachment(&format!("{tag}c"), 0, &ns), &mut runs)
        .expect_err("ADD with a missing IPAM plugin fails");
    assert!(
        missing_error.contains("failed to find plugin"),
        "{missing_error}"
    );

    let executions = (runs.len() + good_children + small_children) as u64;

    // ---- every execution counted, or counted as lost ----
    let mut seen = (0, BTreeMap::new());
    let mut lost = (0, BTreeMap::new());
    let shown = wait_until(SHOW_TIMEOUT, Duration::from_millis(200), || {
        seen = counter_total(&receiver, "flowtel.cni.operations");
        lost = counter_total(&receiver, "flowtel.cni.events.lost");
        seen.0 + lost.0 >= executions
    });
    assert!(
        shown,
        "flowtel counted {} executions and {} lost of {executions} run: {:?} lost {:?}\n{}",
        seen.0,
        lost.0,
        seen.1,
        lost.1,
        flowtel.output()
    );
    assert_eq!(
        seen.0 + lost.0,
        executions,
        "seen {:?}, lost {:?}",
        seen.1,
        lost.1
    );
    assert_eq!(lost.0, 0, "executions lost: {:?}", lost.1);

    // The log events of the last interval arrive with its metrics or one
    // interval later.
    let expected_events = executions as usize;
    let mut events = Vec::new();
    wait_until(SHOW_TIMEOUT, Duration::from_millis(200), || {
        events = cni_events(&receiver, &tag);
        events.len() >= expected_events
    });
    assert_eq!(
        events.len(),
        expected_events,
        "operation events: {:#?}",
        events.iter().map(|e| &e.body).collect::<Vec<_>>()
    );

    // ADD, CHECK and DEL of the N pods: N each, of bridge and of host-local.
    let good_ns = format!("{tag}a-ns");
    let pods_ns: Vec<std::path::PathBuf> = pods.iter().map(|(_, ns)| ns.path()).collect();
    for command in ["ADD", "CHECK", "DEL"] {
        for plugin in ["bridge", "host-local"] {
            let of: Vec<&LogEvent> = events
                .iter()
                .filter(|e| e.str("k8s.namespace.name") == Some(&good_ns))
                .filter(|e| e.str("flowtel.cni.command") == Some(command))
                .filter(|e| e.str("flowtel.cni.plugin") == Some(plugin))
                .collect();
            assert_eq!(of.len(), N, "{command} {plugin}: {of:#?}");
            let mut names: Vec<&str> = of.iter().filter_map(|e| e.str("k8s.pod.name")).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), N, "{command} {plugin}: one event per pod");
            for e in of {
                let pod = e.str("k8s.pod.name").expect("pod name");
                let (ip, _) = &results[pod];
                assert_eq!(e.str("flowtel.cni.result"), Some("success"), "{e:?}");
                assert_eq!(e.severity_text, "INFO", "{e:?}");
                assert_eq!(e.str("network.interface.name"), Some("eth0"));
                assert_eq!(e.int("process.exit.code"), Some(0));
                let n: usize = pod.trim_start_matches("pod-").parse().expect("pod index");
                assert_eq!(
                    e.str("container.id"),
                    Some(format!("{tag}ac{n:04}").as_str())
                );
                assert_eq!(e.str("flowtel.cni.netns"), pods_ns[n].to_str(), "{e:?}");
                assert!(
                    double(e, "flowtel.cni.duration").is_some_and(|d| d > 0.0 && d < 60.0),
                    "{e:?}"
                );
                if command == "ADD" {
                    assert_eq!(e.str("flowtel.cni.ips"), Some(ip.as_str()), "{e:?}");
                }
                if plugin == "host-local" {
                    assert_eq!(e.str("flowtel.cni.parent.plugin"), Some("bridge"), "{e:?}");
                } else {
                    assert_eq!(e.str("flowtel.cni.parent.plugin"), None, "{e:?}");
                }
            }
        }
    }

    // The exhausted range: host-local and bridge fail, with the message.
    let small_ns = format!("{tag}b-ns");
    let failed: Vec<&LogEvent> = events
        .iter()
        .filter(|e| e.str("k8s.namespace.name") == Some(&small_ns))
        .filter(|e| e.str("flowtel.cni.result") == Some("failure"))
        .collect();
    assert_eq!(failed.len(), 2, "{failed:#?}");
    for e in &failed {
        assert_eq!(e.severity_text, "WARN");
        assert_eq!(e.str("k8s.pod.name"), Some("pod-2"));
        assert!(
            e.str("flowtel.cni.error.message")
                .is_some_and(|m| m.contains("no IP addresses available")),
            "{e:?}"
        );
        assert_ne!(e.int("process.exit.code"), Some(0));
    }

    // The missing IPAM binary: bridge fails, saying so.
    let missing_ns = format!("{tag}c-ns");
    let failed: Vec<&LogEvent> = events
        .iter()
        .filter(|e| e.str("k8s.namespace.name") == Some(&missing_ns))
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0].str("flowtel.cni.plugin"), Some("bridge"));
    assert_eq!(failed[0].str("flowtel.cni.result"), Some("failure"));
    assert!(
        failed[0]
            .str("flowtel.cni.error.message")
            .is_some_and(|m| m.contains("failed to find plugin \"ft-no-such-ipam\"")),
        "{:?}",
        failed[0]
    );

    flowtel.stop(Duration::from_secs(10));
    receiver.stop();
}

/// The CNI ADD and DEL of a pod the test API server holds (controlled by a
/// ReplicaSet that a Deployment controls) carry the Deployment, on the
/// records and on the operation metrics, named by the Kubernetes cache; a
/// pod the API server does not know is reported without a workload.
#[test]
fn cni_operations_of_a_deployment_pod_name_the_deployment() {
    const TEST: &str = "cni_operations_of_a_deployment_pod_name_the_deployment";
    let mut conditions = ebpf_conditions().to_vec();
    let bin_dir = debian_plugins();
    conditions.push((
        bin_dir.is_some(),
        "Debian's containernetworking-plugins is not installed (/usr/lib/cni/bridge)",
    ));
    let Some((tools, _)) = prerequisites_with(TEST, &[], &conditions) else {
        return;
    };
    let Some(bin_dir) = bin_dir else { return };
    const NODE: &str = "node-cni";
    let pid = std::process::id();
    let tag = format!("fw{pid}");
    let namespace = format!("{tag}-shop");
    let octet = 20 + pid % 200;
    let data = tempfile::tempdir().expect("temp dir");
    let mut guard = NetnsGuard::new(&tools);
    let host = guard.add("wl").expect("flowtel's namespace");
    let bridge = format!("ftw{}", pid % 10_000_000);
    let _bridge = LinkGuard {
        ip: tools.ip.clone(),
        name: bridge.clone(),
    };

    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the API server");
    let api = KubeApi::new();
    rt.block_on(api.start());
    let deployment = fx::workload("Deployment", &namespace, "checkout");
    let rs = api.apply(&fx::replicaset(
        &namespace,
        "checkout-6b7f9c5d4",
        Some(&deployment),
    ));
    // Scheduled here, no address yet: as when kubelet sets up its sandbox.
    api.apply(
        &fx::PodFx::new(&namespace, "checkout-6b7f9c5d4-x2x9p")
            .on(NODE, "198.18.0.1")
            .owned_by(&rs)
            .build(),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.write_kubeconfig(dir.path());

    let mut receiver = OtlpReceiver::start().expect("OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = host.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_CNI__ENABLED", "on".into()),
            (
                "FLOWTEL_KUBERNETES__KUBECONFIG",
                kubeconfig.display().to_string(),
            ),
            ("FLOWTEL_RESOURCE__NODE_NAME", NODE.to_string()),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");
    flowtel
        .wait_for_kube_synced(SHOW_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", flowtel.output()));
    assert!(
        wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
            flowtel.readyz().is_ok_and(|(_, b)| {
                b.pointer("/sources/sources")
                    .and_then(Value::as_array)
                    .is_some_and(|s| s.iter().any(|v| v == "cni"))
            })
        }),
        "the cni source never became active:\n{}",
        flowtel.output()
    );

    // The default captures stdout: a program on sys_enter too.
    assert_eq!(
        link_tracepoints(flowtel.pid()),
        vec!["sched_process_exec", "sched_process_exit", "sys_enter"],
        "flowtel's BPF links"
    );
    let net = network(
        &format!("{tag}-net"),
        &bridge,
        json!({
            "type": "host-local",
            "ranges": [[{"subnet": format!("198.18.{octet}.0/24")}]],
            "dataDir": data.path().join("ipam"),
        }),
        &bin_dir,
    );
    let mut runs = Vec::new();
    let known_ns = guard.add("wk").expect("pod namespace");
    let known = Attachment {
        pod_namespace: namespace.clone(),
        pod_name: "checkout-6b7f9c5d4-x2x9p".into(),
        ..attachment(&tag, 0, &known_ns)
    };
    let unknown_ns = guard.add("wu").expect("pod namespace");
    let unknown = Attachment {
        pod_namespace: namespace.clone(),
        pod_name: "not-in-the-api".into(),
        ..attachment(&tag, 1, &unknown_ns)
    };
    for at in [&known, &unknown] {
        let result = net.add(at, &mut runs).expect("ADD succeeds");
        net.del(at, Some(&result), &mut runs).expect("DEL succeeds");
    }
    // bridge and host-local, ADD and DEL, two pods.
    let expected = 8;
    let mut events = Vec::new();
    wait_until(SHOW_TIMEOUT, Duration::from_millis(200), || {
        events = cni_events(&receiver, &tag);
        events.len() >= expected
    });
    assert_eq!(
        events.len(),
        expected,
        "{:#?}",
        events.iter().map(|e| &e.body).collect::<Vec<_>>()
    );
    for e in &events {
        let pod = e.str("k8s.pod.name").expect("pod name");
        if pod == known.pod_name {
            assert_eq!(e.str("k8s.deployment.name"), Some("checkout"), "{e:?}");
            assert_eq!(e.str("flowtel.k8s.workload.kind"), Some("Deployment"));
            assert_eq!(e.str("flowtel.k8s.workload.name"), Some("checkout"));
            assert_eq!(e.str("k8s.node.name"), Some(NODE));
        } else {
            assert_eq!(pod, unknown.pod_name);
            assert_eq!(e.str("k8s.deployment.name"), None, "{e:?}");
            assert_eq!(e.str("flowtel.k8s.workload.name"), None, "{e:?}");
        }
    }
    // The operation metrics: one ADD and one DEL per plugin for the
    // Deployment, and as many without a workload for the unknown pod.
    let mut ops = (0, BTreeMap::new());
    let counted = wait_until(SHOW_TIMEOUT, Duration::from_millis(200), || {
        ops = counter_total(&receiver, "flowtel.cni.operations");
        ops.0 >= expected as u64
    });
    assert!(counted, "{:?}\n{}", ops.1, flowtel.output());
    let series = receiver.latest("flowtel.cni.operations", 0);
    for plugin in ["bridge", "host-local"] {
        for command in ["ADD", "DEL"] {
            let of = |deployment: Option<&str>| -> Vec<u64> {
                series
                    .values()
                    .filter(|p| {
                        p.attrs.get("flowtel.cni.plugin") == Some(&AttrValue::Str(plugin.into()))
                            && p.attrs.get("flowtel.cni.command")
                                == Some(&AttrValue::Str(command.into()))
                            && p.attrs.get("k8s.deployment.name")
                                == deployment.map(|d| AttrValue::Str(d.into())).as_ref()
                    })
                    .map(|p| p.value)
                    .collect()
            };
            assert_eq!(
                of(Some("checkout")),
                vec![1],
                "{plugin} {command}: {series:#?}"
            );
            assert_eq!(of(None), vec![1], "{plugin} {command}: {series:#?}");
        }
    }
    let named = series
        .values()
        .find(|p| p.attrs.contains_key("k8s.deployment.name"))
        .expect("a named series");
    assert_eq!(
        named.attrs.get("k8s.namespace.name"),
        Some(&AttrValue::Str(namespace.clone()))
    );
    assert_eq!(
        named.attrs.get("flowtel.k8s.workload.kind"),
        Some(&AttrValue::Str("Deployment".into()))
    );
    assert_eq!(counter_total(&receiver, "flowtel.cni.series.folded").0, 0);
    flowtel.stop(Duration::from_secs(10));
    receiver.stop();
    rt.block_on(api.stop());
}

/// The tracepoints of the BPF links process `pid` holds (from
/// `/proc/PID/fdinfo`), sorted.
fn link_tracepoints(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.contains("link_type:") {
            continue;
        }
        if let Some(tp) = info
            .lines()
            .find_map(|l| l.strip_prefix("tp_name:"))
            .map(str::trim)
        {
            out.push(tp.to_owned());
        }
    }
    out.sort();
    out
}

/// With `cni.capture_output: false` only exec and exit are traced (no
/// program on `sys_enter`, so no cost to other system calls): the ADD and
/// DEL of a pod still give one record per plugin execution with the pod,
/// command, result and duration, but no addresses; a plugin that fails
/// (a missing IPAM binary) is a failure by its exit code, without the
/// message it wrote.
#[test]
fn without_output_capture_executions_are_traced_by_exec_and_exit_only() {
    const TEST: &str = "without_output_capture_executions_are_traced_by_exec_and_exit_only";
    let mut conditions = ebpf_conditions().to_vec();
    let bin_dir = debian_plugins();
    conditions.push((
        bin_dir.is_some(),
        "Debian's containernetworking-plugins is not installed (/usr/lib/cni/bridge)",
    ));
    let Some((tools, _)) = prerequisites_with(TEST, &[], &conditions) else {
        return;
    };
    let Some(bin_dir) = bin_dir else { return };
    let pid = std::process::id();
    let tag = format!("fo{pid}");
    let octet = 20 + pid % 200;
    let data = tempfile::tempdir().expect("temp dir");
    let mut guard = NetnsGuard::new(&tools);
    let host = guard.add("oo").expect("flowtel's namespace");
    let bridges: Vec<String> = ["a", "b"]
        .iter()
        .map(|s| format!("fto{}{s}", pid % 10_000_000))
        .collect();
    let _bridges: Vec<LinkGuard> = bridges
        .iter()
        .map(|name| LinkGuard {
            ip: tools.ip.clone(),
            name: name.clone(),
        })
        .collect();
    let mut receiver = OtlpReceiver::start().expect("OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = host.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_CNI__ENABLED", "on".into()),
            ("FLOWTEL_CNI__CAPTURE_OUTPUT", "false".into()),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");
    assert!(
        wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
            flowtel.readyz().is_ok_and(|(_, b)| {
                b.pointer("/sources/sources")
                    .and_then(Value::as_array)
                    .is_some_and(|s| s.iter().any(|v| v == "cni"))
            })
        }),
        "the cni source never became active:\n{}",
        flowtel.output()
    );
    assert_eq!(
        link_tracepoints(flowtel.pid()),
        vec!["sched_process_exec", "sched_process_exit"],
        "flowtel's BPF links"
    );

    let good = network(
        &format!("{tag}-good"),
        &bridges[0],
        json!({
            "type": "host-local",
            "ranges": [[{"subnet": format!("198.19.{octet}.0/24")}]],
            "dataDir": data.path().join("good"),
        }),
        &bin_dir,
    );
    let mut runs = Vec::new();
    let ns = guard.add("o0").expect("pod namespace");
    let at = attachment(&format!("{tag}a"), 0, &ns);
    let result = good.add(&at, &mut runs).expect("ADD succeeds");
    good.del(&at, Some(&result), &mut runs)
        .expect("DEL succeeds");
    let missing = network(
        &format!("{tag}-missing"),
        &bridges[1],
        json!({"type": "ft-no-such-ipam"}),
        &bin_dir,
    );
    let ns = guard.add("o1").expect("pod namespace");
    missing
        .add(&attachment(&format!("{tag}b"), 0, &ns), &mut runs)
        .expect_err("ADD with a missing IPAM plugin fails");
    // bridge and host-local for ADD and DEL; bridge alone for the failure.
    let expected = 5;
    let mut events = Vec::new();
    wait_until(SHOW_TIMEOUT, Duration::from_millis(200), || {
        events = cni_events(&receiver, &tag);
        events.len() >= expected
    });
    assert_eq!(
        events.len(),
        expected,
        "{:#?}",
        events.iter().map(|e| &e.body).collect::<Vec<_>>()
    );
    for e in &events {
        assert_eq!(e.str("flowtel.cni.ips"), None, "{e:?}");
        assert_eq!(e.str("flowtel.cni.error.message"), None, "{e:?}");
        assert!(double(e, "flowtel.cni.duration").is_some_and(|d| d > 0.0 && d < 60.0));
        assert_eq!(e.str("k8s.pod.name"), Some("pod-0"));
        let failed = e.str("k8s.namespace.name") == Some(&format!("{tag}b-ns"));
        assert_eq!(
            e.str("flowtel.cni.result"),
            Some(if failed { "failure" } else { "success" }),
            "{e:?}"
        );
        if failed {
            assert_eq!(e.str("flowtel.cni.plugin"), Some("bridge"));
            assert_ne!(e.int("process.exit.code"), Some(0));
        }
    }
    let (seen, _) = counter_total(&receiver, "flowtel.cni.operations");
    let (lost, by) = counter_total(&receiver, "flowtel.cni.events.lost");
    assert_eq!((seen, lost), (expected as u64, 0), "lost {by:?}");
    flowtel.stop(Duration::from_secs(10));
    receiver.stop();
}

/// Sets a pod's `PodScheduled` condition to `scheduled` and, when given,
/// `PodReadyToStartContainers` to `ready` (else not ready yet), as the
/// scheduler and kubelet do.
fn set_conditions(pod: &mut Value, scheduled: SystemTime, ready: Option<SystemTime>) {
    let mut conditions = vec![json!({"type": "PodScheduled", "status": "True",
        "lastProbeTime": null, "lastTransitionTime": fx::timestamp(scheduled)})];
    conditions.push(match ready {
        Some(r) => json!({"type": "PodReadyToStartContainers", "status": "True",
            "lastProbeTime": null, "lastTransitionTime": fx::timestamp(r)}),
        None => json!({"type": "PodReadyToStartContainers", "status": "False",
            "lastProbeTime": null, "lastTransitionTime": fx::timestamp(scheduled)}),
    });
    pod["status"]["conditions"] = json!(conditions);
}

/// Sets `status.podIPs` (and `podIP`).
fn set_ips(pod: &mut Value, ips: &[&str]) {
    pod["status"]["podIP"] = json!(ips.first());
    pod["status"]["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
}

/// Pods of this node getting and losing addresses in the test API server
/// give exactly one `flowtel.cni.ip_allocated` / `ip_released` record per
/// pod and exact address counts, with the seconds from `PodScheduled` to
/// `PodReadyToStartContainers` the test set; a pod listed with its address
/// before flowtel watched, a pod of another node and a host-network pod
/// allocate nothing.
#[test]
fn pod_address_allocation_and_release_from_the_pod_cache() {
    const TEST: &str = "pod_address_allocation_and_release_from_the_pod_cache";
    let Some((tools, _)) = prerequisites_with(TEST, &[], &[]) else {
        return;
    };
    const NODE: &str = "node-ips";
    let mut guard = NetnsGuard::new(&tools);
    let host = guard.add("ips").expect("flowtel's namespace");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the API server");
    let api = KubeApi::new();
    rt.block_on(api.start());
    let ns = "ipshop";
    let deployment = fx::workload("Deployment", ns, "web");
    let rs = api.apply(&fx::replicaset(ns, "web-7c9d8f6b5", Some(&deployment)));
    // Whole seconds, as Kubernetes writes times.
    let t0 = UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("after 1970")
                .as_secs()
                - 600,
        );
    let secs = |s: u64| t0 + Duration::from_secs(s);
    // Running with its address before flowtel starts: not an allocation
    // flowtel saw, but its release later is.
    let mut old = fx::PodFx::new(ns, "web-7c9d8f6b5-old00")
        .on(NODE, "198.18.0.1")
        .owned_by(&rs)
        .ips(&["198.18.7.1"])
        .build();
    set_conditions(&mut old, secs(0), Some(secs(1)));
    let old = api.apply(&old);

    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.write_kubeconfig(dir.path());
    let mut receiver = OtlpReceiver::start().expect("OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = host.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
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
            ("FLOWTEL_RESOURCE__NODE_NAME", NODE.to_string()),
            ("FLOWTEL_CNI__ENABLED", "off".into()),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");
    flowtel
        .wait_for_kube_synced(SHOW_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", flowtel.output()));

    // Nothing to report: another node's pod, a host-network pod.
    let mut other = fx::PodFx::new(ns, "web-7c9d8f6b5-other")
        .on("node-other", "198.18.0.2")
        .owned_by(&rs)
        .ips(&["198.18.7.9"])
        .build();
    set_conditions(&mut other, secs(10), Some(secs(11)));
    api.apply(&other);
    let mut agent = fx::PodFx::new("kube-system", "agent-x7k2p")
        .on(NODE, "198.18.0.1")
        .host_network(&[9100])
        .ips(&["198.18.0.1"])
        .build();
    set_conditions(&mut agent, secs(10), Some(secs(11)));
    api.apply(&agent);

    // a: created without an address, then given one 3 s after it was
    // scheduled.
    let mut a = fx::PodFx::new(ns, "web-7c9d8f6b5-aaaaa")
        .on(NODE, "198.18.0.1")
        .owned_by(&rs)
        .phase("Pending")
        .build();
    set_conditions(&mut a, secs(100), None);
    let mut a = api.apply(&a);
    a["status"]["phase"] = json!("Running");
    set_ips(&mut a, &["198.18.7.10"]);
    set_conditions(&mut a, secs(100), Some(secs(103)));
    let mut a = api.apply(&a);
    // b: first seen with two addresses, 7 s after it was scheduled.
    let mut b = fx::PodFx::new(ns, "web-7c9d8f6b5-bbbbb")
        .on(NODE, "198.18.0.1")
        .owned_by(&rs)
        .ips(&["198.18.7.11", "fd00::7:11"])
        .build();
    set_conditions(&mut b, secs(200), Some(secs(207)));
    let b = api.apply(&b);

    let allocated = |r: &OtlpReceiver| counter_total(r, "flowtel.cni.ips.allocated").0;
    let released = |r: &OtlpReceiver| counter_total(r, "flowtel.cni.ips.released").0;
    assert!(
        wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || allocated(
            &receiver
        ) >= 3),
        "allocated {}:\n{}",
        allocated(&receiver),
        flowtel.output()
    );
    assert_eq!(allocated(&receiver), 3);
    assert_eq!(released(&receiver), 0);

    // a finishes, b and the old pod are deleted.
    a["status"]["phase"] = json!("Succeeded");
    api.apply(&a);
    assert!(api.delete(&b));
    assert!(api.delete(&old));
    assert!(
        wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || released(
            &receiver
        ) >= 4),
        "released {}:\n{}",
        released(&receiver),
        flowtel.output()
    );

    let (total, by) = counter_total(&receiver, "flowtel.cni.ips.allocated");
    assert_eq!(total, 3, "{by:?}");
    let (total, by) = counter_total(&receiver, "flowtel.cni.ips.released");
    assert_eq!(total, 4, "{by:?}");
    for metric in ["flowtel.cni.ips.allocated", "flowtel.cni.ips.released"] {
        let series = receiver.latest(metric, 0);
        assert_eq!(series.len(), 1, "{metric}: {series:#?}");
        let p = series.values().next().expect("one series");
        assert_eq!(
            p.attrs.get("k8s.deployment.name"),
            Some(&AttrValue::Str("web".into()))
        );
        assert_eq!(
            p.attrs.get("k8s.namespace.name"),
            Some(&AttrValue::Str(ns.into()))
        );
    }
    let hist = latest_histograms(&histogram_points(
        &receiver.received(0),
        "flowtel.cni.scheduled_to_ip.duration",
    ));
    assert_eq!(hist.len(), 1, "{hist:#?}");
    let h = hist.values().next().expect("one series");
    assert_eq!((h.count, h.sum), (2, 10.0), "{h:?}");
    assert_eq!(h.unit, "s");

    // The records: two allocations, three releases, once each.
    let mut records = Vec::new();
    wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
        records = receiver
            .log_events()
            .into_iter()
            .filter(|e| e.event_name.starts_with("flowtel.cni.ip_"))
            .collect();
        records.len() >= 5
    });
    let mut seen: Vec<(String, String, String, Option<f64>)> = records
        .iter()
        .map(|e| {
            assert_eq!(e.severity_text, "INFO", "{e:?}");
            assert_eq!(e.str("k8s.deployment.name"), Some("web"), "{e:?}");
            assert_eq!(e.str("flowtel.k8s.workload.kind"), Some("Deployment"));
            assert_eq!(e.str("k8s.node.name"), Some(NODE));
            (
                e.event_name.clone(),
                e.str("k8s.pod.name").unwrap_or_default().to_owned(),
                e.str("flowtel.cni.ips").unwrap_or_default().to_owned(),
                double(e, "flowtel.cni.scheduled_to_ip"),
            )
        })
        .collect();
    seen.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
    let row = |event: &str, pod: &str, ips: &str, delay: Option<f64>| {
        (event.to_owned(), pod.to_owned(), ips.to_owned(), delay)
    };
    assert_eq!(
        seen,
        vec![
            row(
                "flowtel.cni.ip_allocated",
                "web-7c9d8f6b5-aaaaa",
                "198.18.7.10",
                Some(3.0)
            ),
            row(
                "flowtel.cni.ip_allocated",
                "web-7c9d8f6b5-bbbbb",
                "198.18.7.11,fd00::7:11",
                Some(7.0)
            ),
            row(
                "flowtel.cni.ip_released",
                "web-7c9d8f6b5-aaaaa",
                "198.18.7.10",
                None
            ),
            row(
                "flowtel.cni.ip_released",
                "web-7c9d8f6b5-bbbbb",
                "198.18.7.11,fd00::7:11",
                None
            ),
            row(
                "flowtel.cni.ip_released",
                "web-7c9d8f6b5-old00",
                "198.18.7.1",
                None
            ),
        ]
    );
    assert_eq!(
        counter_total(&receiver, "flowtel.cni.ip_events.dropped").0,
        0
    );
    flowtel.stop(Duration::from_secs(10));
    receiver.stop();
    rt.block_on(api.stop());
}

/// The networking Events of this node's pods, from the test API server,
/// arrive as WARN records; other reasons, Normal Events and Events of other
/// nodes do not.
#[test]
fn failed_sandbox_event_arrives_as_a_warn_record() {
    const TEST: &str = "failed_sandbox_event_arrives_as_a_warn_record";
    let Some((tools, _)) = prerequisites_with(TEST, &[], &[]) else {
        return;
    };
    const NODE: &str = "node-cni";
    let mut guard = NetnsGuard::new(&tools);
    let host = guard.add("kev").expect("flowtel's namespace");
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime for the API server");
    let api = KubeApi::new();
    rt.block_on(api.start());
    let pod = fx::PodFx::new("shop", "web-7d9c")
        .on(NODE, "198.18.0.1")
        .build();
    let pod = api.apply(&pod);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = api.write_kubeconfig(dir.path());
    let mut receiver = OtlpReceiver::start().expect("OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = host.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
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
            ("FLOWTEL_RESOURCE__NODE_NAME", NODE.to_string()),
            ("FLOWTEL_CNI__ENABLED", "off".into()),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");
    assert!(
        wait_until(SHOW_TIMEOUT, Duration::from_millis(50), || api
            .requests(Resource::Events, "watch")
            > 0),
        "flowtel never watched Events:\n{}",
        flowtel.output()
    );
    let note = "Failed to create pod sandbox: rpc error: code = Unknown desc = failed to setup \
                network for sandbox \"4c1f\": plugin type=\"bridge\" failed (add): failed to \
                allocate for range 0: no IP addresses available in range set";
    for event in [
        fx::event(&pod, NODE, "FailedCreatePodSandBox", note, "Warning"),
        fx::event(
            &pod,
            "node-other",
            "FailedCreatePodSandBox",
            note,
            "Warning",
        ),
        fx::event(
            &pod,
            NODE,
            "BackOff",
            "Back-off restarting failed container",
            "Warning",
        ),
        fx::event(
            &pod,
            NODE,
            "Scheduled",
            "Successfully assigned shop/web-7d9c",
            "Normal",
        ),
    ] {
        api.apply(&event);
    }
    let mut records = Vec::new();
    let shown = wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
        records = receiver
            .log_events()
            .into_iter()
            .filter(|e| e.event_name == "flowtel.cni.k8s_event")
            .collect();
        !records.is_empty()
    });
    assert!(shown, "no networking Event arrived:\n{}", flowtel.output());
    // The metric counts what was kept: one, once its interval is exported.
    let kept = wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
        counter_total(&receiver, "flowtel.cni.k8s_events").0 == 1
    });
    assert!(
        kept,
        "{:?}",
        counter_total(&receiver, "flowtel.cni.k8s_events")
    );
    records = receiver
        .log_events()
        .into_iter()
        .filter(|e| e.event_name == "flowtel.cni.k8s_event")
        .collect();
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r.severity_text, "WARN");
    assert_eq!(
        r.str("flowtel.k8s.event.reason"),
        Some("FailedCreatePodSandBox")
    );
    assert_eq!(r.str("k8s.namespace.name"), Some("shop"));
    assert_eq!(r.str("k8s.pod.name"), Some("web-7d9c"));
    assert_eq!(r.str("k8s.node.name"), Some(NODE));
    assert!(r.body.contains("no IP addresses available"), "{}", r.body);
    flowtel.stop(Duration::from_secs(10));
    receiver.stop();
    rt.block_on(api.stop());
}

/// A conflist rewritten at run time gives one `flowtel.cni.config_changed`
/// event with the old and the new plugin chain.
#[test]
fn config_change_is_an_event_with_the_old_and_new_chain() {
    const TEST: &str = "config_change_is_an_event_with_the_old_and_new_chain";
    let Some((tools, _)) = prerequisites_with(TEST, &[], &[]) else {
        return;
    };
    let mut guard = NetnsGuard::new(&tools);
    let host = guard.add("cfg").expect("flowtel's namespace");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("10-pods.conflist");
    let conflist = |plugins: &[&str]| {
        let list: Vec<Value> = plugins.iter().map(|p| json!({"type": p})).collect();
        json!({"cniVersion": "1.0.0", "name": "pods", "plugins": list}).to_string()
    };
    std::fs::write(&file, conflist(&["bridge", "portmap"])).expect("writing the conflist");
    let mut receiver = OtlpReceiver::start().expect("OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = host.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_DETECT__CNI_DIR", dir.path().display().to_string()),
            ("FLOWTEL_CNI__ENABLED", "off".into()),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");
    // One interval has gone by with the first configuration.
    assert!(
        wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
            counter_total(&receiver, "flowtel.cni.config.changes")
                .1
                .len()
                == 1
        }),
        "no interval exported:\n{}",
        flowtel.output()
    );
    std::fs::write(&file, conflist(&["bridge", "firewall", "portmap"]))
        .expect("rewriting the conflist");
    let mut records = Vec::new();
    let shown = wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
        records = receiver
            .log_events()
            .into_iter()
            .filter(|e| e.event_name == "flowtel.cni.config_changed")
            .collect();
        !records.is_empty()
    });
    assert!(shown, "no config change event:\n{}", flowtel.output());
    assert!(wait_until(SHOW_TIMEOUT, Duration::from_millis(100), || {
        counter_total(&receiver, "flowtel.cni.config.changes").0 == 1
    }));
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r.severity_text, "INFO");
    assert_eq!(
        r.str("flowtel.cni.config.old_plugins"),
        Some("bridge,portmap")
    );
    assert_eq!(
        r.str("flowtel.cni.config.new_plugins"),
        Some("bridge,firewall,portmap")
    );
    assert_eq!(r.str("flowtel.cni.config.file"), file.to_str(), "{r:?}");
    flowtel.stop(Duration::from_secs(10));
    receiver.stop();
}
