//! The Helm chart (`deploy/helm/flowtel`), rendered by the real Helm v4 SDK
//! (`deploy/render.py`, PyPI `helm-python-sdk`):
//!
//! - `deploy/manifests/flowtel.yaml` is exactly the default render;
//! - the default and a non-default render validate against the Kubernetes
//!   1.33 schemas (`kubernetes-validate --strict`), CRD kinds excepted;
//! - `helm lint --strict` passes;
//! - the DaemonSet is least-privilege as the README documents, the RBAC is
//!   `deploy/rbac.yaml`'s, and the ConfigMap is a configuration the real
//!   `flowtel check-config` accepts;
//! - the PrometheusRule carries `deploy/alerts/flowtel.rules.yaml`;
//! - with `dashboards.enabled`, a ConfigMap with Grafana's sidecar label
//!   carries `dashboards/*.json` unchanged (the chart's copy must match).
//!
//! Needs the tools venv (`$TOOLS_DIR/venv`, default `/opt/flowtel-tools/venv`)
//! with helm-python-sdk, PyYAML and kubernetes-validate. Without them the
//! tests fail under `CI` and are otherwise reported as skipped
//! ([`common::skip`]).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Values far from the defaults: conntrack, an OTLP endpoint over TLS with
/// headers from a Secret, the Prometheus endpoint with Service and
/// PodMonitor, named networks, another namespace's netns access.
const CUSTOM_VALUES: &str = r#"
config:
  source: conntrack
  interval: 15s
  conntrack:
    mode: netlink
  ebpf:
    dns:
      max_requests: 1024
      timeout: 2s
  flows:
    max_series: 5000
    key: [client_address, server_address, server_port, transport]
  enrich:
    level: namespace
    networks:
      - {name: vpc, cidrs: [10.0.0.0/16]}
      - {name: private, cidrs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]}
  export:
    otlp:
      endpoint: https://otel-gateway.observability.svc:4317
      protocol: http/protobuf
      tls:
        ca_file: /etc/flowtel-tls/ca.crt
    metrics:
      attributes:
        - {metric: flowtel.flow.packets, keep: [server.port, network.transport]}
    logs:
      sampling: 0.1
      rate_limit: 100
      dns: all
      dns_sampling: 0.25
      dns_rate_limit: 50
    console:
      mode: never
  resource:
    cluster_name: prod-eu-1
  health:
    listen: "0.0.0.0:19810"
otlpHeaders:
  secretName: flowtel-otlp
  secretKey: headers
otlpTls:
  secretName: flowtel-otlp-tls
prometheus:
  enabled: true
  port: 19811
  service:
    enabled: true
  podMonitor:
    enabled: true
    labels: {release: kube-prometheus-stack}
hostPID: true
extraCapabilities: [SYS_ADMIN]
priorityClassName: ""
updateStrategy:
  type: RollingUpdate
  rollingUpdate:
    maxUnavailable: 2
"#;

/// Kinds whose schemas are CRDs (prometheus-operator), not in the core
/// Kubernetes schemas: checked for shape only.
const CRD_KINDS: &[(&str, &str)] = &[
    ("PodMonitor", "monitoring.coreos.com/v1"),
    ("PrometheusRule", "monitoring.coreos.com/v1"),
];

struct Tools {
    python: PathBuf,
    kubernetes_validate: PathBuf,
}

/// The tools venv, or `None` (after [`common::skip`]) when it is missing.
fn tools(test: &str) -> Option<Tools> {
    let venv = std::env::var_os("TOOLS_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| PathBuf::from(d).join("venv"))
        .unwrap_or_else(|| PathBuf::from("/opt/flowtel-tools/venv"));
    let python = venv.join("bin/python");
    let kubernetes_validate = venv.join("bin/kubernetes-validate");
    let mut missing = Vec::new();
    if !python.is_file() {
        missing.push(format!(
            "{} does not exist (run scripts/install-test-deps.sh)",
            python.display()
        ));
    } else {
        let probe = Command::new(&python)
            .args(["-c", "import helm_python, yaml"])
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            missing.push(format!(
                "{} cannot import helm_python and yaml (pip install helm-python-sdk pyyaml)",
                python.display()
            ));
        }
    }
    if !kubernetes_validate.is_file() {
        missing.push(format!(
            "{} does not exist (pip install kubernetes-validate)",
            kubernetes_validate.display()
        ));
    }
    if !missing.is_empty() {
        common::skip(test, &missing.join("; "));
        return None;
    }
    Some(Tools {
        python,
        kubernetes_validate,
    })
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn render_py(tools: &Tools) -> Command {
    let mut cmd = Command::new(&tools.python);
    cmd.arg(Path::new(ROOT).join("deploy/render.py"));
    cmd
}

/// The chart rendered with `values` (YAML) on top of the defaults.
fn render(tools: &Tools, values: Option<&str>) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = render_py(tools);
    if let Some(values) = values {
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, values).expect("write values");
        cmd.arg("-f").arg(&file);
    }
    let out = run(cmd.args(["-o", "-"]));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8 manifests"))
    } else {
        Err(text(&out))
    }
}

/// One rendered document: its YAML text and its value.
struct Doc {
    yaml: String,
    value: Value,
}

/// Splits a multi-document YAML stream and parses each document (PyYAML,
/// through JSON); documents that are only comments are left out.
fn parse_docs(tools: &Tools, stream: &str) -> Vec<Doc> {
    let mut chunks = vec![String::new()];
    for line in stream.lines() {
        if line == "---" {
            chunks.push(String::new());
        } else {
            let last = chunks.last_mut().expect("one chunk");
            last.push_str(line);
            last.push('\n');
        }
    }
    // An explicit `---` before each chunk: an empty one is a null document.
    let joined: String = chunks.iter().map(|c| format!("---\n{c}")).collect();
    let values = yaml_to_json(tools, &joined);
    let values = values.as_array().expect("a list of documents").clone();
    assert_eq!(values.len(), chunks.len(), "one value per document");
    chunks
        .into_iter()
        .zip(values)
        .filter(|(_, v)| !v.is_null())
        .map(|(yaml, value)| Doc { yaml, value })
        .collect()
}

/// A YAML stream as a JSON list of its documents.
fn yaml_to_json(tools: &Tools, yaml: &str) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("in.yaml");
    std::fs::write(&file, yaml).expect("write YAML");
    let out = run(Command::new(&tools.python)
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
         print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        )
        .arg(&file));
    assert!(out.status.success(), "YAML does not parse:\n{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("JSON from PyYAML")
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Doc], k: &str) -> Option<&'a Value> {
    docs.iter().map(|d| &d.value).find(|v| kind(v) == k)
}

fn get<'a>(docs: &'a [Doc], k: &str) -> &'a Value {
    find(docs, k).unwrap_or_else(|| panic!("no {k} in the render"))
}

/// `kubernetes-validate --strict -k 1.33.0` on the core kinds; the CRD kinds
/// must have their apiVersion and a name. Prints what the validator said.
fn validate(tools: &Tools, label: &str, docs: &[Doc]) {
    let mut core = String::new();
    for doc in docs {
        let k = kind(&doc.value);
        if let Some((_, api)) = CRD_KINDS.iter().find(|(name, _)| *name == k) {
            assert_eq!(
                doc.value["apiVersion"],
                json!(api),
                "{label}: {k} apiVersion"
            );
            assert!(
                doc.value["metadata"]["name"].is_string(),
                "{label}: {k} has no name"
            );
            assert!(doc.value["spec"].is_object(), "{label}: {k} has no spec");
            println!("{label}: {k} ({api}) parsed; CRD kind, not schema-validated");
        } else {
            core.push_str("---\n");
            core.push_str(&doc.yaml);
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(format!("{label}.yaml"));
    std::fs::write(&file, core).expect("write manifests");
    let out = run(Command::new(&tools.kubernetes_validate)
        .args(["--strict", "-k", "1.33.0"])
        .arg(&file));
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    print!("{said}");
    assert!(
        out.status.success(),
        "{label}: kubernetes-validate failed:\n{}",
        text(&out)
    );
    let passed = said.matches(" passed for resource ").count();
    let expected = docs
        .iter()
        .filter(|d| !CRD_KINDS.iter().any(|(k, _)| *k == kind(&d.value)))
        .count();
    assert_eq!(passed, expected, "{label}: every core document must pass");
    assert!(
        !said.contains("WARN") && !said.contains("ERROR"),
        "{label}: kubernetes-validate warned:\n{said}"
    );
}

/// The ConfigMap's flowtel.yaml, loaded by the real binary. `mounted`:
/// directories the pod mounts (e.g. the TLS Secret), recreated here with
/// `files` so that flowtel's "is a readable file" checks see them.
fn check_config(label: &str, docs: &[Doc], mounted: &[(&str, &[&str])]) -> Value {
    let config = get(docs, "ConfigMap")["data"]["flowtel.yaml"]
        .as_str()
        .unwrap_or_else(|| panic!("{label}: the ConfigMap has no flowtel.yaml"))
        .to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rewritten = config.clone();
    for (i, (mount, files)) in mounted.iter().enumerate() {
        let local = dir.path().join(format!("mount{i}"));
        std::fs::create_dir(&local).expect("mount dir");
        for name in *files {
            std::fs::write(local.join(name), "").expect("mounted file");
        }
        rewritten = rewritten.replace(mount, &local.to_string_lossy());
    }
    let file = dir.path().join("flowtel.yaml");
    std::fs::write(&file, &rewritten).expect("write config");
    let out = run(Command::new(env!("CARGO_BIN_EXE_flowtel"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .arg("check-config")
        .arg("--config")
        .arg(&file));
    assert!(
        out.status.success(),
        "{label}: flowtel check-config rejects the chart's configuration:\n{config}\n{}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json_start = stdout.find('{').expect("effective settings as JSON");
    println!("{label}: flowtel check-config accepted the ConfigMap");
    serde_json::from_str(&stdout[json_start..]).expect("check-config prints JSON")
}

fn container(docs: &[Doc]) -> &Value {
    let containers = &get(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"];
    assert_eq!(
        containers.as_array().map(Vec::len),
        Some(1),
        "one container"
    );
    &containers[0]
}

fn contains_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| k == key || contains_key(v, key)),
        Value::Array(items) => items.iter().any(|v| contains_key(v, key)),
        _ => false,
    }
}

/// The capabilities the README's "Capabilities" section says the eBPF
/// source needs ("needs exactly **CAP_BPF**, ..."), without `CAP_`.
fn documented_capabilities() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let line = readme
        .lines()
        .find(|l| l.contains("needs exactly"))
        .expect("README.md says which capabilities the eBPF source `needs exactly`");
    let caps: Vec<String> = line
        .split("**")
        .filter(|s| s.starts_with("CAP_"))
        .map(|s| s.trim_start_matches("CAP_").to_string())
        .collect();
    assert!(!caps.is_empty(), "no **CAP_...** in: {line}");
    caps
}

#[test]
fn deploy_manifests_are_the_default_render() {
    let Some(tools) = tools("deploy_manifests_are_the_default_render") else {
        return;
    };
    let out = run(render_py(&tools).arg("--check"));
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "deploy/manifests/flowtel.yaml differs from the chart; run deploy/render.py:\n{}",
        text(&out)
    );
}

#[test]
fn chart_passes_helm_lint_strict() {
    let Some(tools) = tools("chart_passes_helm_lint_strict") else {
        return;
    };
    for (label, values) in [("default", None), ("custom", Some(CUSTOM_VALUES))] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = render_py(&tools);
        cmd.arg("--lint");
        if let Some(values) = values {
            let file = dir.path().join("values.yaml");
            std::fs::write(&file, values).expect("write values");
            cmd.arg("-f").arg(&file);
        }
        let out = run(&mut cmd);
        println!("helm lint --strict ({label} values):");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(out.status.success(), "helm lint failed:\n{}", text(&out));
    }
}

#[test]
fn default_render_validates_and_is_least_privilege() {
    let Some(tools) = tools("default_render_validates_and_is_least_privilege") else {
        return;
    };
    let manifests = render(&tools, None).expect("default render");
    let docs = parse_docs(&tools, &manifests);
    validate(&tools, "default", &docs);
    let kinds: Vec<&str> = docs.iter().map(|d| kind(&d.value)).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ConfigMap",
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet"
        ],
        "the default render: no Service, PodMonitor or PrometheusRule"
    );
    for doc in &docs {
        let v = &doc.value;
        if !matches!(kind(v), "ClusterRole" | "ClusterRoleBinding") {
            assert_eq!(v["metadata"]["namespace"], json!("flowtel"), "{}", kind(v));
        }
    }

    // The DaemonSet: not privileged, exactly the documented capabilities.
    let ds = get(&docs, "DaemonSet");
    assert!(
        !contains_key(ds, "privileged"),
        "the DaemonSet must not mention `privileged`"
    );
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(&docs);
    let sc = &c["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let mut added: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_string())
        .collect();
    let mut documented = documented_capabilities();
    added.sort();
    documented.sort();
    assert_eq!(added, documented, "exactly the README's capabilities");
    assert_eq!(sc["readOnlyRootFilesystem"], json!(true));
    assert_eq!(sc["allowPrivilegeEscalation"], json!(false));

    // Host namespaces: the network (eBPF on host interfaces and veths), not PIDs.
    assert_eq!(pod["hostNetwork"], json!(true));
    assert_eq!(pod["hostPID"], json!(false));
    assert_eq!(pod["dnsPolicy"], json!("ClusterFirstWithHostNet"));
    assert!(pod["hostIPC"].is_null());

    // Every node; rolling updates; a priority class; requests and limits.
    assert!(
        pod["tolerations"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == &json!({"operator": "Exists"}))),
        "a toleration for every taint"
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], json!("RollingUpdate"));
    assert!(!ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null());
    assert!(pod["priorityClassName"].is_string());
    for side in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                c["resources"][side][res].is_string(),
                "resources.{side}.{res}"
            );
        }
    }

    // The command, the node name from the downward API.
    assert_eq!(
        c["command"],
        json!(["flowtel", "run", "--config", "/etc/flowtel/flowtel.yaml"])
    );
    let env = c["env"].as_array().expect("env");
    let node = env
        .iter()
        .find(|e| e["name"] == json!("K8S_NODE_NAME"))
        .expect("K8S_NODE_NAME");
    assert_eq!(
        node["valueFrom"]["fieldRef"]["fieldPath"],
        json!("spec.nodeName")
    );

    // Host mounts: read-only, and only these.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mut host_paths: Vec<(String, String)> = volumes
        .iter()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_string(),
                v["hostPath"]["path"].as_str()?.to_string(),
            ))
        })
        .collect();
    host_paths.sort_by(|a, b| a.1.cmp(&b.1));
    let paths: Vec<&str> = host_paths.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["/etc/cni/net.d", "/sys/fs/bpf", "/sys/kernel/btf"],
        "host mounts (no /proc: hostNetwork makes /proc/net the node's)"
    );
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    for (name, path) in &host_paths {
        let mount = mounts
            .iter()
            .find(|m| m["name"] == json!(name))
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        assert_eq!(mount["mountPath"], json!(path));
        assert_eq!(mount["readOnly"], json!(true), "{path} must be read-only");
    }

    // RBAC: deploy/rbac.yaml's rules, bound to the pods' ServiceAccount.
    let rbac_text = std::fs::read_to_string(Path::new(ROOT).join("deploy/rbac.yaml"))
        .expect("deploy/rbac.yaml");
    let rbac = parse_docs(&tools, &rbac_text);
    assert_eq!(
        get(&docs, "ClusterRole")["rules"],
        get(&rbac, "ClusterRole")["rules"],
        "the chart's ClusterRole rules must equal deploy/rbac.yaml's"
    );
    let sa = get(&docs, "ServiceAccount")["metadata"]["name"].clone();
    assert_eq!(pod["serviceAccountName"], sa);
    let binding = get(&docs, "ClusterRoleBinding");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": sa, "namespace": "flowtel"}])
    );
    assert_eq!(
        binding["roleRef"]["name"],
        get(&docs, "ClusterRole")["metadata"]["name"]
    );

    // The ConfigMap is a configuration flowtel accepts, with no Prometheus
    // endpoint and health on loopback (what the probes use).
    let cfg = check_config("default", &docs, &[]);
    assert_eq!(cfg["export"]["prometheus"]["listen"], json!(""));
    assert_eq!(cfg["health"]["listen"], json!("127.0.0.1:9810"));
    // DNS tracking and its failed-lookup events, as values.yaml documents.
    assert_eq!(
        cfg["ebpf"]["dns"],
        json!({"enabled": true, "max_requests": 4096, "timeout": "5s"})
    );
    assert_eq!(cfg["export"]["logs"]["dns"], json!("failed"));
    assert_eq!(c["livenessProbe"]["httpGet"]["host"], json!("127.0.0.1"));
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], json!(9810));

    // The image defaults to flowtel's version.
    assert_eq!(
        c["image"],
        json!(format!("localhost/flowtel:{}", env!("CARGO_PKG_VERSION")))
    );
}

#[test]
fn custom_render_validates() {
    let Some(tools) = tools("custom_render_validates") else {
        return;
    };
    let manifests = render(&tools, Some(CUSTOM_VALUES)).expect("custom render");
    let docs = parse_docs(&tools, &manifests);
    validate(&tools, "custom", &docs);

    let cfg = check_config("custom", &docs, &[("/etc/flowtel-tls", &["ca.crt"])]);
    assert_eq!(cfg["source"], json!("conntrack"));
    assert_eq!(
        cfg["export"]["otlp"]["endpoint"],
        json!("https://otel-gateway.observability.svc:4317")
    );
    assert_eq!(
        cfg["export"]["prometheus"]["listen"],
        json!("0.0.0.0:19811")
    );
    assert_eq!(cfg["enrich"]["networks"][0]["name"], json!("vpc"));
    assert_eq!(
        cfg["ebpf"]["dns"],
        json!({"enabled": true, "max_requests": 1024, "timeout": "2s"})
    );
    assert_eq!(cfg["export"]["logs"]["dns"], json!("all"));
    assert_eq!(cfg["export"]["logs"]["dns_sampling"], json!(0.25));
    assert_eq!(cfg["export"]["logs"]["dns_rate_limit"], json!(50));

    let c = container(&docs);
    let env = c["env"].as_array().expect("env");
    let headers = env
        .iter()
        .find(|e| e["name"] == json!("OTEL_EXPORTER_OTLP_HEADERS"))
        .expect("OTEL_EXPORTER_OTLP_HEADERS from the Secret");
    assert_eq!(
        headers["valueFrom"]["secretKeyRef"],
        json!({"name": "flowtel-otlp", "key": "headers"})
    );
    assert!(
        !get(&docs, "ConfigMap")["data"]["flowtel.yaml"]
            .as_str()
            .unwrap_or_default()
            .contains("headers"),
        "headers stay out of the ConfigMap"
    );
    assert_eq!(
        c["ports"],
        json!([{"name": "metrics", "containerPort": 19811, "protocol": "TCP"}])
    );
    // Health on every address: the kubelet probes loopback.
    assert_eq!(c["readinessProbe"]["httpGet"]["host"], json!("127.0.0.1"));
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], json!(19810));
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    assert!(mounts
        .iter()
        .any(|m| m["mountPath"] == json!("/etc/flowtel-tls") && m["readOnly"] == json!(true)));
    let mut added: Vec<&str> = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]);
    let pod = &get(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], json!(true));
    assert!(pod["priorityClassName"].is_null());

    let service = get(&docs, "Service");
    assert_eq!(service["spec"]["clusterIP"], json!("None"));
    assert_eq!(service["spec"]["ports"][0]["port"], json!(19811));
    let monitor = get(&docs, "PodMonitor");
    assert_eq!(
        monitor["metadata"]["labels"]["release"],
        json!("kube-prometheus-stack")
    );
    assert_eq!(
        monitor["spec"]["podMetricsEndpoints"][0]["port"],
        json!("metrics")
    );
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        get(&docs, "DaemonSet")["spec"]["selector"]["matchLabels"]
    );

    // A PodMonitor without the endpoint it scrapes is refused.
    let err = render(
        &tools,
        Some("prometheus:\n  podMonitor:\n    enabled: true\n"),
    )
    .expect_err("a PodMonitor without prometheus.enabled must not render");
    assert!(err.contains("needs prometheus.enabled"), "{err}");
}

#[test]
fn prometheus_rule_carries_the_alert_rules() {
    let Some(tools) = tools("prometheus_rule_carries_the_alert_rules") else {
        return;
    };
    let source = Path::new(ROOT).join("deploy/alerts/flowtel.rules.yaml");
    let copy = Path::new(ROOT).join("deploy/helm/flowtel/files/flowtel.rules.yaml");
    let on = Some("prometheusRule:\n  enabled: true\n  labels: {release: kube-prometheus-stack}\n");
    if !copy.exists() {
        assert!(
            !source.exists(),
            "copy {} to {} (Helm reads only files inside the chart)",
            source.display(),
            copy.display()
        );
        let err = render(&tools, on).expect_err("no rules file: the PrometheusRule must fail");
        assert!(err.contains("is missing from the chart"), "{err}");
        println!(
            "{} does not exist yet: checked that prometheusRule.enabled fails with a clear message",
            source.display()
        );
        return;
    }
    let rules_text = std::fs::read_to_string(&copy).expect("the chart's rules");
    if source.exists() {
        let original = std::fs::read_to_string(&source).expect("deploy/alerts rules");
        assert!(
            original == rules_text,
            "{} differs from {}: copy it again",
            copy.display(),
            source.display()
        );
    }
    let docs = parse_docs(
        &tools,
        &render(&tools, on).expect("render with PrometheusRule"),
    );
    validate(&tools, "prometheus-rule", &docs);
    let rule = get(&docs, "PrometheusRule");
    let expected = yaml_to_json(&tools, &rules_text);
    assert_eq!(rule["spec"]["groups"], expected[0]["groups"]);
    let alerts = rule["spec"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter(|r| r["alert"].is_string())
        .count();
    assert!(alerts > 0, "the PrometheusRule has no alerts");
    println!("PrometheusRule carries {alerts} alerts");
}

#[test]
fn dashboards_configmap_carries_the_dashboards() {
    let Some(tools) = tools("dashboards_configmap_carries_the_dashboards") else {
        return;
    };
    let json_files = |dir: &Path| -> Vec<(String, String)> {
        let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| {
                let name = p
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let text = std::fs::read_to_string(&p).expect("reading a dashboard");
                (name, text)
            })
            .collect();
        files.sort();
        files
    };
    let source = json_files(&Path::new(ROOT).join("dashboards"));
    let copy = json_files(&Path::new(ROOT).join("deploy/helm/flowtel/dashboards"));
    assert!(!source.is_empty(), "no dashboards in dashboards/");
    assert!(
        source == copy,
        "deploy/helm/flowtel/dashboards/ differs from dashboards/ (Helm reads only files inside \
         the chart): cp dashboards/*.json deploy/helm/flowtel/dashboards/"
    );

    let default = parse_docs(&tools, &render(&tools, None).expect("default render"));
    assert!(
        default
            .iter()
            .all(|d| d.value["metadata"]["name"] != json!("flowtel-dashboards")),
        "dashboards are off by default"
    );
    let on = "dashboards:\n  enabled: true\n  namespace: monitoring\n  annotations: {grafana_folder: flowtel}\n";
    let docs = parse_docs(
        &tools,
        &render(&tools, Some(on)).expect("render with dashboards"),
    );
    validate(&tools, "dashboards", &docs);
    let cm = docs
        .iter()
        .map(|d| &d.value)
        .find(|v| kind(v) == "ConfigMap" && v["metadata"]["name"] == json!("flowtel-dashboards"))
        .expect("the dashboards ConfigMap");
    assert_eq!(cm["metadata"]["namespace"], json!("monitoring"));
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], json!("1"));
    assert_eq!(
        cm["metadata"]["annotations"]["grafana_folder"],
        json!("flowtel")
    );
    let data = cm["data"].as_object().expect("data");
    let names: Vec<&String> = data.keys().collect();
    assert_eq!(
        names,
        source.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "one key per dashboard"
    );
    for (name, text) in &source {
        let rendered: Value = serde_json::from_str(data[name].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{name} in the ConfigMap is not JSON: {e}"));
        let original: Value = serde_json::from_str(text).expect("dashboard JSON");
        assert_eq!(rendered, original, "{name} changed in the ConfigMap");
    }
    let size: usize = data.values().filter_map(Value::as_str).map(str::len).sum();
    assert!(
        size < 1 << 20,
        "a ConfigMap holds at most 1 MiB, the dashboards take {size} B"
    );
    println!(
        "the dashboards ConfigMap carries {} dashboards ({size} B), label grafana_dashboard=\"1\"",
        data.len()
    );
}
