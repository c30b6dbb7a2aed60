//! flowtel's container image run the way the Helm chart runs it.
//!
//! The image is built from the repository (`deploy/image/build.sh` with the
//! release binary `scripts/test.sh` builds first: the binary, its shared
//! libraries, the CA bundle and nsswitch.conf on `scratch`), the chart is rendered by the real Helm SDK
//! (`deploy/render.py`), and the rendered DaemonSet is translated into one
//! `podman run` ([`PodmanPod::from_daemonset`]): its command, environment,
//! `readOnlyRootFilesystem`, capabilities (drop ALL, add BPF, PERFMON,
//! NET_ADMIN), `allowPrivilegeEscalation`, `runAsUser`, seccomp profile, the
//! node's network (network namespace A of [`Lab`], standing in for the
//! node) and every volume it mounts: the rendered ConfigMap as
//! `/etc/flowtel/flowtel.yaml` and the host paths, read-only. The collector
//! is a real rotel on A's loopback, where the ConfigMap's endpoint points.
//!
//! * `chart_pod_counts_with_ebpf_and_detaches_on_stop`: the chart's own
//!   settings (seccomp `Unconfined`). Traffic from A to B must arrive at
//!   rotel with `flowtel.source=ebpf`, bytes and packets per direction
//!   within 1 % of A's veth counters; after `podman stop` (SIGTERM) no
//!   flowtel program, link, TCX attachment or tc filter may be left. Prints
//!   the image's size and the time from `podman run` to the first export
//!   rotel received.
//! * `net_admin_only_falls_back_to_conntrack`: the same pod with
//!   `--cap-drop=ALL --cap-add=NET_ADMIN`: `source: auto` must fall back to
//!   conntrack and count within 2 %.
//! * `runtime_default_seccomp_warns_naming_seccomp`: the chart rendered with
//!   `seccompProfile: RuntimeDefault` (podman's default profile, which
//!   allows bpf() only with CAP_SYS_ADMIN): flowtel must fall back to
//!   conntrack with a warning that names the seccomp profile as the cause.
//!
//! Needs root, podman, runc, buildah, the tools venv (Helm SDK, PyYAML),
//! rotel, bpftool, tc and an eBPF build; missing → skipped with the reason
//! ([`common::skip`]), or a failure under `CI`. podman runs with runc (crun
//! cannot run on this machine's cgroup hybrid) and with no default ulimits
//! (podman's fail here): ../shared/notes/platform-facts.md, "Containers".

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::flowtel::{get_readyz, Health};
use common::netns::Netns;
use common::rotel::Rotel;
use common::scenario::{self, Lab, Plan, Series, Totals};
use common::{strip_ansi, wait_until, Tool, BPFTOOL, TC};
use serde_json::{json, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

const PODMAN: Tool = Tool {
    name: "podman",
    env: "PODMAN_BIN",
    fallbacks: &["/usr/bin/podman"],
};
const RUNC: Tool = Tool {
    name: "runc",
    env: "RUNC_BIN",
    fallbacks: &["/usr/sbin/runc", "/usr/bin/runc"],
};
const BUILDAH: Tool = Tool {
    name: "buildah",
    env: "BUILDAH_BIN",
    fallbacks: &["/usr/bin/buildah"],
};

/// One pod at a time: they share the two CPUs, and test 1 counts the
/// flowtel programs loaded on the machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the tests need besides [`common::Prerequisites`].
struct Env {
    lab_tools: common::Prerequisites,
    podman: PathBuf,
    runc: PathBuf,
    python: PathBuf,
    rotel: PathBuf,
    bpftool: PathBuf,
    tc: PathBuf,
}

fn env(test: &str) -> Option<Env> {
    let python = std::env::var_os("TOOLS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/flowtel-tools"))
        .join("venv/bin/python");
    let helm_sdk = Command::new(&python)
        .args(["-c", "import helm_python, yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut conditions = common::ebpf_conditions().to_vec();
    conditions.push((
        helm_sdk,
        "the tools venv cannot import helm_python and yaml (run scripts/install-test-deps.sh)",
    ));
    let (lab_tools, found) = common::prerequisites_with(
        test,
        &[PODMAN, RUNC, BUILDAH, common::ROTEL_AGENT, BPFTOOL, TC],
        &conditions,
    )?;
    // In the order asked; buildah is run by deploy/image/build.sh.
    let [podman, runc, _buildah, rotel, bpftool, tc]: [PathBuf; 6] =
        found.try_into().expect("one path per tool");
    Some(Env {
        lab_tools,
        podman,
        runc,
        python,
        rotel,
        bpftool,
        tc,
    })
}

/// The image `deploy/image/build.sh` built, once per test binary: its name
/// and uncompressed size.
struct Image {
    name: String,
    size: u64,
}

fn image(podman: &Path) -> &'static Image {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    let built = IMAGE.get_or_init(|| {
        let t0 = Instant::now();
        let binary = release_binary()?;
        let out = Command::new(Path::new(ROOT).join("deploy/image/build.sh"))
            .arg("--binary")
            .arg(&binary)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running deploy/image/build.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "deploy/image/build.sh failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let size = podman_output(
            podman,
            &["image", "inspect", "--format", "{{.Size}}", &name],
        )?
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("podman image inspect: size: {e}"))?;
        println!(
            "image {name}: {size} bytes ({:.1} MiB) uncompressed, built in {:.1}s",
            size as f64 / (1 << 20) as f64,
            t0.elapsed().as_secs_f64()
        );
        Ok(Image { name, size })
    });
    built.as_ref().unwrap_or_else(|e| panic!("{e}"))
}

/// The release flowtel of this target directory, which `scripts/test.sh`
/// builds before the tests (`cargo build --release --bin flowtel`). Not
/// built here: cargo run from a test sees the test's environment and would
/// rebuild the release dependencies. An error if it is missing or older
/// than the sources.
fn release_binary() -> Result<PathBuf, String> {
    // This test is TARGET/PROFILE/deps/container-HASH.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let target = exe
        .ancestors()
        .nth(3)
        .ok_or_else(|| format!("{} is not in a target directory", exe.display()))?;
    let binary = target.join("release/flowtel");
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .map_err(|e| {
            format!(
                "{}: {e}: run `cargo build --release --bin flowtel` first (scripts/test.sh does)",
                binary.display()
            )
        })?;
    let mut newer = Vec::new();
    let mut dirs = vec![Path::new(ROOT).join("src"), Path::new(ROOT).join("bpf")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m > built)
            {
                newer.push(path);
            }
        }
    }
    if newer.is_empty() {
        Ok(binary)
    } else {
        Err(format!(
            "{} is older than {newer:?}: run `cargo build --release --bin flowtel` (scripts/test.sh does)",
            binary.display()
        ))
    }
}

/// A containers.conf for podman here: no default ulimits (podman's
/// RLIMIT_NOFILE/NPROC defaults are refused on this machine).
fn containers_conf() -> &'static Path {
    static CONF: OnceLock<PathBuf> = OnceLock::new();
    CONF.get_or_init(|| {
        // One file in the target directory, rewritten by every run.
        let exe = std::env::current_exe().expect("current_exe");
        let target = exe.ancestors().nth(3).unwrap_or(Path::new("/tmp"));
        let path = target.join("flowtel-test-containers.conf");
        std::fs::write(&path, "[containers]\ndefault_ulimits = []\n")
            .expect("writing containers.conf");
        path
    })
}

fn podman_cmd(podman: &Path) -> Command {
    let mut cmd = Command::new(podman);
    cmd.env("CONTAINERS_CONF", containers_conf());
    cmd
}

fn podman_output(podman: &Path, args: &[&str]) -> Result<String, String> {
    let out = podman_cmd(podman)
        .args(args)
        .output()
        .map_err(|e| format!("podman {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "podman {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The chart rendered with `values` (YAML) over its defaults, as JSON
/// documents.
fn render(python: &Path, values: &str) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values).expect("writing values");
    let script = "import json, subprocess, sys, yaml\n\
        out = subprocess.run([sys.executable, sys.argv[1], '-f', sys.argv[2], '-o', '-'],\n\
                             check=True, capture_output=True, text=True).stdout\n\
        print(json.dumps([d for d in yaml.safe_load_all(out) if d]))";
    let out = Command::new(python)
        .args(["-c", script])
        .arg(Path::new(ROOT).join("deploy/render.py"))
        .arg(&file)
        .output()
        .expect("running deploy/render.py");
    assert!(
        out.status.success(),
        "deploy/render.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("rendered documents as JSON")
}

fn doc<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == json!(kind))
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// Values for the tests: export to rotel on A's loopback every second.
fn values(rotel_grpc_port: u16, extra: &str) -> String {
    format!(
        "config:\n  interval: 1s\n  export:\n    otlp:\n      endpoint: \
         http://127.0.0.1:{rotel_grpc_port}\n      protocol: grpc\n  log:\n    level: \
         info\n{extra}"
    )
}

/// The rendered DaemonSet's flowtel container as `podman run` arguments.
struct PodmanPod {
    args: Vec<String>,
    /// Holds the ConfigMap's files, mounted at the config volume's path.
    _config: tempfile::TempDir,
    /// `host:port` of `/readyz`, from the probes.
    health: std::net::SocketAddr,
}

impl PodmanPod {
    /// `caps_add`: `None` for the DaemonSet's own capabilities.
    fn from_daemonset(docs: &[Value], node: &Netns, caps_add: Option<&[&str]>) -> PodmanPod {
        let ds = doc(docs, "DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        let mut args: Vec<String> = Vec::new();
        let mut arg = |a: String| args.push(a);

        // hostNetwork: the node's network namespace, which is A here.
        assert_eq!(
            pod["hostNetwork"],
            json!(true),
            "the chart uses hostNetwork"
        );
        arg(format!("--network=ns:{}", node.path().display()));
        if sc["readOnlyRootFilesystem"] == json!(true) {
            // Without podman's writable /tmp, /var/tmp and /run: a pod has none.
            arg("--read-only".into());
            arg("--read-only-tmpfs=false".into());
        }
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        arg("--cap-drop=ALL".into());
        let chart_caps: Vec<String> = sc["capabilities"]["add"]
            .as_array()
            .expect("capabilities.add")
            .iter()
            .map(|v| v.as_str().expect("capability name").to_string())
            .collect();
        let caps = caps_add.map_or(chart_caps, |c| c.iter().map(|s| s.to_string()).collect());
        arg(format!("--cap-add={}", caps.join(",")));
        if sc["allowPrivilegeEscalation"] == json!(false) {
            arg("--security-opt=no-new-privileges".into());
        }
        if let Some(uid) = sc["runAsUser"].as_u64() {
            arg(format!("--user={uid}"));
        }
        // The container's seccomp profile wins over the pod's.
        let seccomp = if sc["seccompProfile"].is_object() {
            &sc["seccompProfile"]
        } else {
            &pod["securityContext"]["seccompProfile"]
        };
        match seccomp["type"].as_str() {
            Some("Unconfined") => arg("--security-opt=seccomp=unconfined".into()),
            // podman's default profile, as a runtime's default.
            Some("RuntimeDefault") | None => {}
            Some(other) => panic!("seccompProfile {other} has no podman translation here"),
        }

        // Volumes: the ConfigMap's data as files, host paths read-only.
        let config = tempfile::tempdir().expect("temp dir for the ConfigMap");
        let configmap = doc(docs, "ConfigMap");
        let volumes = pod["volumes"].as_array().expect("volumes");
        for mount in c["volumeMounts"].as_array().expect("volumeMounts") {
            let name = mount["name"].as_str().expect("volume name");
            let target = mount["mountPath"].as_str().expect("mountPath");
            let ro = if mount["readOnly"] == json!(true) {
                ":ro"
            } else {
                ""
            };
            let volume = volumes
                .iter()
                .find(|v| v["name"] == json!(name))
                .unwrap_or_else(|| panic!("volume {name} is mounted but not declared"));
            let source = if volume["configMap"].is_object() {
                assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);
                for (file, text) in configmap["data"].as_object().expect("ConfigMap data") {
                    std::fs::write(config.path().join(file), text.as_str().expect("text"))
                        .expect("writing the ConfigMap's file");
                }
                config.path().to_path_buf()
            } else if let Some(path) = volume["hostPath"]["path"].as_str() {
                let path = PathBuf::from(path);
                if !path.exists() && volume["hostPath"]["type"] == json!("DirectoryOrCreate") {
                    // The kubelet would create it empty; so does a temp dir.
                    config.path().join(name)
                } else {
                    path
                }
            } else {
                panic!("volume {volume} has no podman translation here");
            };
            if !source.exists() {
                std::fs::create_dir_all(&source).expect("creating an empty host path");
            }
            arg(format!("--volume={}:{target}{ro}", source.display()));
        }

        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().expect("env name");
            let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::String(f)) if f == "spec.nodeName" => "flowtel-test-node".into(),
                _ => panic!("env {e} has no podman translation here"),
            };
            arg(format!("--env={name}={value}"));
        }
        let command = serde_json::to_string(&c["command"]).expect("command");
        arg(format!("--entrypoint={command}"));

        let probe = &c["readinessProbe"]["httpGet"];
        let health = format!(
            "{}:{}",
            probe["host"].as_str().expect("probe host"),
            probe["port"].as_u64().expect("probe port")
        )
        .parse()
        .expect("probe address");
        PodmanPod {
            args,
            _config: config,
            health,
        }
    }
}

/// A container started in the foreground (`podman run`, so its exit is our
/// child's), stopped with `podman stop` and removed.
struct Container {
    podman: PathBuf,
    name: String,
    child: Mutex<Child>,
    exited: Mutex<Option<ExitStatus>>,
    dir: tempfile::TempDir,
    ns: Netns,
    health: std::net::SocketAddr,
    started: Instant,
}

impl Container {
    fn run(env: &Env, image: &Image, pod: &PodmanPod, ns: &Netns, test: &str) -> Container {
        let dir = tempfile::tempdir().expect("temp dir");
        let name = format!("flowtel-{test}-{}", std::process::id())
            .chars()
            .take(60)
            .collect::<String>();
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("log file");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let mut cmd = podman_cmd(&env.podman);
        cmd.arg(format!("--runtime={}", env.runc.display()))
            .args(["run", "--rm", "--name", &name, "--log-driver=none"])
            .args(&pod.args)
            .arg(&image.name);
        println!("{test}: {cmd:?}");
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("starting podman run");
        Container {
            podman: env.podman.clone(),
            name,
            child: Mutex::new(child),
            exited: Mutex::new(None),
            dir,
            ns: ns.clone(),
            health: pod.health,
            started,
        }
    }

    fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default())
    }

    fn wait_ready(&self, timeout: Duration) {
        let ready = wait_until(timeout, Duration::from_millis(50), || {
            self.exit_status().is_some() || self.readyz().is_ok_and(|(code, _)| code == 200)
        });
        assert!(
            ready && self.exit_status().is_none(),
            "the container is not ready after {timeout:?} (exit {:?}):\n{}",
            self.exit_status(),
            self.stderr()
        );
    }

    /// `podman stop` (SIGTERM, SIGKILL after `grace`); the exit status of
    /// flowtel, which `podman run` passes on.
    fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        if self.exit_status().is_none() {
            let out = podman_cmd(&self.podman)
                .args(["stop", "--time", &grace.as_secs().to_string(), &self.name])
                .output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("podman stop {}: {out:?}", self.name);
            }
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            let status = child.wait().ok();
            *self.exited.lock().unwrap_or_else(|e| e.into_inner()) = status;
        }
        self.exit_status()
    }
}

impl Health for Container {
    fn readyz(&self) -> anyhow::Result<(u16, Value)> {
        let health = self.health;
        self.ns.in_ns(move || get_readyz(health))?
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        let mut exited = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        if exited.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            *exited = child.try_wait().ok().flatten();
        }
        *exited
    }

    fn output(&self) -> String {
        self.stderr()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let status = self.stop(Duration::from_secs(5));
        let _ = podman_cmd(&self.podman)
            .args(["rm", "--force", "--ignore", &self.name])
            .output();
        if std::thread::panicking() {
            eprintln!(
                "container {} ({status:?}) stderr:\n{}",
                self.name,
                self.stderr()
            );
        }
    }
}

/// Rotel on A's loopback, where the rendered ConfigMap points.
fn rotel_in(ns: &Netns, bin: &Path) -> Rotel {
    let bin = bin.to_path_buf();
    ns.in_ns(move || Rotel::start(&bin))
        .expect("entering A")
        .expect("starting rotel in A")
}

/// What crossed A's veth while [`traffic`] ran: its counters (L3), and
/// the packets the IP layers of A and B received (the eBPF source counts
/// GSO segments, the veth the larger packets before segmentation); A's
/// without what its loopback carried (flowtel's exports to rotel and the
/// `/readyz` polls: small, one segment each).
struct Crossed {
    veth: Totals,
    a_in: u64,
    b_in: u64,
}

/// TCP both ways and UDP from A to B.
fn traffic(lab: &Lab, test: &str) -> Crossed {
    let plan = Plan {
        tcp4: Some((4 << 20, 1 << 20)),
        tcp6: None,
        nat: None,
        udp4: Some((500, 1200, 1200)),
        udp6: None,
        short: None,
    };
    let before = lab.counters().expect("reading A's veth counters");
    let lo_before = lab.a.if_stats("lo").expect("reading A's loopback counters");
    let in_before = (
        scenario::ip_in_packets(&lab.a, false),
        scenario::ip_in_packets(&lab.b, false),
    );
    let servers = lab.servers().expect("starting the servers in B");
    let flows = scenario::run(lab, &plan).expect("making the traffic");
    let errors = servers.errors();
    drop(servers);
    assert!(errors.is_empty(), "servers in B failed: {errors:?}");
    for f in &flows {
        println!("{test}: sent {:<5} {:?}", f.name, f.payload);
    }
    // Let the FINs and last ACKs cross before the counters are read.
    std::thread::sleep(Duration::from_millis(500));
    let after = lab.counters().expect("reading A's veth counters");
    let a_in = scenario::ip_in_packets(&lab.a, false) - in_before.0;
    let lo = lab
        .a
        .if_stats("lo")
        .expect("reading A's loopback counters")
        .since(&lo_before);
    Crossed {
        veth: Totals::from_counters(&before, &after),
        a_in: a_in.saturating_sub(lo.rx_packets),
        b_in: scenario::ip_in_packets(&lab.b, false) - in_before.1,
    }
}

/// Ids of loaded programs named like flowtel's (`flowtel_*`).
fn flowtel_progs(bpftool: &Path) -> Vec<u64> {
    let out = Command::new(bpftool)
        .args(["-j", "prog", "show"])
        .output()
        .expect("running bpftool prog show");
    let progs: Value = serde_json::from_slice(&out.stdout).expect("bpftool prog show JSON");
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("flowtel_"))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// The BPF links (seen from `ns`) that run one of `progs`.
fn links_of(ns: &Netns, bpftool: &Path, progs: &[u64]) -> Vec<Value> {
    let out = ns
        .run(bpftool, &["-j", "link", "show"])
        .expect("bpftool link show");
    let all: Value = serde_json::from_str(&out).expect("bpftool link show JSON");
    all.as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| progs.contains(&id)))
        .cloned()
        .collect()
}

fn tc_filters(ns: &Netns, tc: &Path) -> String {
    ["ingress", "egress"]
        .map(|hook| {
            ns.run(tc, &["filter", "show", "dev", scenario::IF_A, hook])
                .unwrap_or_else(|e| panic!("tc filter show {hook}: {e}"))
        })
        .join("")
}

#[test]
fn chart_pod_counts_with_ebpf_and_detaches_on_stop() {
    const TEST: &str = "chart_pod_counts_with_ebpf_and_detaches_on_stop";
    let Some(env) = env(TEST) else {
        return;
    };
    let _serial = serial();
    let t0 = Instant::now();
    let image = image(&env.podman);
    let lab = Lab::new(&env.lab_tools).expect("setting up the namespaces");
    let rotel = rotel_in(&lab.a, &env.rotel);
    let docs = render(&env.python, &values(rotel.grpc_port, ""));
    let pod = PodmanPod::from_daemonset(&docs, &lab.a, None);
    let progs_before = flowtel_progs(&env.bpftool);

    let container = Container::run(&env, image, &pod, &lab.a, "ebpf");
    // The first export rotel received, timed from `podman run`.
    let exported = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
        container.exit_status().is_some() || rotel.log().contains("flowtel.flows.seen")
    });
    let first_export = container.started.elapsed();
    let exported_at = common::flowtel::unix_nanos(std::time::SystemTime::now());
    assert!(
        exported && container.exit_status().is_none(),
        "nothing exported within 30 s (exit {:?}):\n{}",
        container.exit_status(),
        container.stderr()
    );
    container.wait_ready(Duration::from_secs(20));
    let stderr = container.stderr();
    assert!(
        stderr.contains("eBPF source started"),
        "the eBPF source did not start in the chart's pod:\n{stderr}"
    );
    let ours: Vec<u64> = flowtel_progs(&env.bpftool)
        .into_iter()
        .filter(|id| !progs_before.contains(id))
        .collect();
    assert!(
        !ours.is_empty(),
        "no flowtel_* program loaded while running"
    );
    // When runc started flowtel, by podman's record.
    let started_at: u64 = podman_output(
        &env.podman,
        &[
            "inspect",
            "--format",
            "{{.State.StartedAt.UnixNano}}",
            &container.name,
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .trim()
    .parse()
    .expect("StartedAt in nanoseconds");
    println!(
        "{TEST}: image {} is {} bytes ({:.1} MiB); first export at rotel {:.2} s after `podman \
         run`, {:.2} s after the container started (interval 1s); programs {ours:?}",
        image.name,
        image.size,
        image.size as f64 / (1 << 20) as f64,
        first_export.as_secs_f64(),
        exported_at.saturating_sub(started_at) as f64 / 1e9
    );

    let crossed = traffic(&lab, TEST);
    let series = scenario::wait_exported("rotel", &container, Duration::from_secs(30), || {
        Series::of_clients(&rotel.sum_points(), &[scenario::A_V4])
    });
    println!("{TEST}: veth (L3): {}\n{}", crossed.veth, series.describe());
    assert_eq!(series.sources(), ["ebpf"], "{}", series.describe());
    scenario::check_wire_totals(TEST, &series, &crossed.veth, crossed.a_in, crossed.b_in);

    let status = container.stop(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit 0 on podman stop: {status:?}\n{}",
        container.stderr()
    );
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        flowtel_progs(&env.bpftool)
            .iter()
            .all(|id| !ours.contains(id))
    });
    assert!(
        gone,
        "flowtel's programs still loaded 5 s after podman stop"
    );
    let links = links_of(&lab.a, &env.bpftool, &ours);
    assert!(links.is_empty(), "links left after podman stop: {links:?}");
    let net = lab
        .a
        .run(&env.bpftool, &["net", "show", "dev", scenario::IF_A])
        .expect("bpftool net show");
    assert!(
        !net.contains("tcx") && !net.contains("flowtel"),
        "bpftool net show dev {} still shows attachments:\n{net}",
        scenario::IF_A
    );
    let filters = tc_filters(&lab.a, &env.tc);
    assert!(!filters.contains("flowtel"), "tc filters left: {filters}");
    println!(
        "{TEST}: after podman stop ({status:?}): no flowtel program, link, TCX attachment or tc \
         filter left; passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn net_admin_only_falls_back_to_conntrack() {
    const TEST: &str = "net_admin_only_falls_back_to_conntrack";
    let Some(env) = env(TEST) else {
        return;
    };
    let _serial = serial();
    let t0 = Instant::now();
    let image = image(&env.podman);
    let lab = Lab::new(&env.lab_tools).expect("setting up the namespaces");
    let rotel = rotel_in(&lab.a, &env.rotel);
    let docs = render(&env.python, &values(rotel.grpc_port, ""));
    let pod = PodmanPod::from_daemonset(&docs, &lab.a, Some(&["NET_ADMIN"]));
    let container = Container::run(&env, image, &pod, &lab.a, "conntrack");
    container.wait_ready(Duration::from_secs(20));

    let truth = traffic(&lab, TEST).veth;
    let series = scenario::wait_exported("rotel", &container, Duration::from_secs(30), || {
        Series::of_clients(&rotel.sum_points(), &[scenario::A_V4])
    });
    println!("{TEST}: veth (L3): {truth}\n{}", series.describe());
    let stderr = container.stderr();
    let warning = stderr
        .lines()
        .find(|l| l.contains("eBPF source unavailable"))
        .unwrap_or_else(|| panic!("no fallback warning:\n{stderr}"));
    println!("{TEST}: {warning}");
    assert!(
        warning.contains("needs CAP_BPF"),
        "the warning must name the missing capabilities: {warning}"
    );
    assert_eq!(series.sources(), ["conntrack"], "{}", series.describe());
    scenario::check_totals(TEST, &series.totals(), &truth, &series);
    let status = container.stop(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit 0 on podman stop: {status:?}\n{}",
        container.stderr()
    );
    println!("{TEST}: passed in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn runtime_default_seccomp_warns_naming_seccomp() {
    const TEST: &str = "runtime_default_seccomp_warns_naming_seccomp";
    let Some(env) = env(TEST) else {
        return;
    };
    let _serial = serial();
    let image = image(&env.podman);
    let lab = Lab::new(&env.lab_tools).expect("setting up the namespaces");
    let rotel = rotel_in(&lab.a, &env.rotel);
    let docs = render(
        &env.python,
        &values(
            rotel.grpc_port,
            "podSecurityContext:\n  seccompProfile:\n    type: RuntimeDefault\n",
        ),
    );
    let pod = PodmanPod::from_daemonset(&docs, &lab.a, None);
    assert!(
        !pod.args.iter().any(|a| a.contains("seccomp")),
        "RuntimeDefault is podman's own profile: {:?}",
        pod.args
    );
    let container = Container::run(&env, image, &pod, &lab.a, "seccomp");
    container.wait_ready(Duration::from_secs(20));
    let (_, body) = container.readyz().expect("/readyz");
    let stderr = container.stderr();
    let warning = stderr
        .lines()
        .find(|l| l.contains("eBPF source unavailable"))
        .unwrap_or_else(|| panic!("no fallback warning:\n{stderr}"));
    println!("{TEST}: {warning}");
    assert!(
        warning.contains("WARN") && warning.contains("seccomp profile is the cause"),
        "the warning must name the seccomp profile: {warning}"
    );
    println!("{TEST}: /readyz: {body}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("flowtel started") && l.contains("conntrack")),
        "flowtel did not start with conntrack:\n{stderr}"
    );
    let status = container.stop(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
