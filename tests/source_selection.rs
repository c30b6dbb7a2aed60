//! Which kernel source flowtel picks, end to end through the binary.
//!
//! * `auto_without_bpf_capability_falls_back_to_conntrack`: flowtel runs as
//!   root but without CAP_BPF, CAP_SYS_ADMIN and CAP_PERFMON (setpriv drops
//!   them from every capability set), keeping CAP_NET_ADMIN. `--source auto`
//!   must then warn that eBPF is unavailable, count with conntrack and
//!   export conntrack series whose totals match the veth counters.
//!
//!   Without CAP_SYS_ADMIN flowtel cannot `setns` into another network
//!   namespace (the kernel requires it for CLONE_NEWNET), so `--netns A`
//!   would make the conntrack fallback fail as well. flowtel is therefore
//!   started inside A (`ip netns exec A setpriv ... flowtel run --source
//!   auto`, no `--netns`), and the test OTLP receiver listens on A's
//!   loopback. The export and health-check connections on A's loopback are
//!   also flows conntrack sees; only the series of A's veth address are
//!   compared with the veth.
//!
//! * `ebpf_runs_with_only_the_documented_capabilities`: as above but with
//!   every capability dropped except CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN
//!   (what the Helm chart grants). `--source ebpf` must start, attach its TC
//!   and TCP health programs, and count A's traffic within 1 %.
//!
//! * `ebpf_sigterm_exports_final_interval_and_detaches`: `--source ebpf`
//!   with a 30 s interval; known TCP traffic, then SIGTERM before the first
//!   tick. flowtel must exit 0 after exporting the final interval (eBPF
//!   series whose bytes match the veth's L3 bytes within 1 % and whose
//!   packets match the receiving IP layer within 1 %), and leave no TCX
//!   link, no tc filter and none of its programs behind.
//!
//! Needs root, `ip`, `nft`, `setpriv` (test 1), `bpftool`, `tc` and a
//! binary built with eBPF on a kernel with BTF (test 2). Missing → skipped
//! with the reason ([`common::skip`]), or a failure under `CI`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::flowtel::{get_readyz, Flowtel, FlowtelArgs, Health};
use common::netns::Netns;
use common::otlp_receiver::{AttrValue, OtlpReceiver};
use common::scenario::{self, Lab, Plan, Series, Totals};
use common::{deviation_pct, strip_ansi, wait_until, within, Tool, BPFTOOL, TC};

/// Both tests compare counters on two shared CPUs; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const SETPRIV: Tool = Tool {
    name: "setpriv",
    env: "SETPRIV_BIN",
    fallbacks: &["/usr/bin/setpriv", "/bin/setpriv"],
};

/// Capabilities flowtel runs without in test 1.
const DROPPED_CAPS: &str = "-bpf,-sys_admin,-perfmon";
/// The whole capability set the eBPF source is documented to need
/// (docs/configuration.md, "Capabilities"): nothing else is left in any set.
const EBPF_CAPS: &str = "-all,+bpf,+perfmon,+net_admin";

/// flowtel started as `ip netns exec NS setpriv ... flowtel run ...`: in
/// the namespace itself (as a hostNetwork pod is in the node's), with the
/// capability sets changed by `caps` (setpriv syntax, e.g. `-bpf`).
struct Unprivileged {
    // Behind locks so that the waits of `Health` need only `&self`.
    child: Mutex<Child>,
    dir: tempfile::TempDir,
    ns: Netns,
    health: SocketAddr,
    caps: &'static str,
    exited: Mutex<Option<ExitStatus>>,
}

impl Unprivileged {
    fn start(
        ns: &Netns,
        setpriv: &PathBuf,
        endpoint: &str,
        caps: &'static str,
        source: &str,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        // Any port is free on the fresh namespace's loopback.
        let health = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        let stdout = std::fs::File::create(dir.path().join("stdout.log"))?;
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let health_arg = health.to_string();
        let mut cmd = ns.command(
            setpriv,
            &[
                &format!("--inh-caps={caps}"),
                &format!("--ambient-caps={caps}"),
                &format!("--bounding-set={caps}"),
                "--",
                env!("CARGO_BIN_EXE_flowtel"),
                "run",
                "--source",
                source,
                "--interval",
                "1s",
                "--endpoint",
                endpoint,
                "--protocol",
                "grpc",
                "--health-listen",
                &health_arg,
            ],
        );
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("FLOWTEL_") || k.starts_with("OTEL_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("RUST_LOG", "info,flowtel=debug");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()?;
        Ok(Unprivileged {
            child: Mutex::new(child),
            dir,
            ns: ns.clone(),
            health,
            caps,
            exited: Mutex::new(None),
        })
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        let mut exited = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        if exited.is_none() {
            *exited = self.child().try_wait().ok().flatten();
        }
        *exited
    }

    fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default())
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let timeout = common::slow(timeout);
        let ready = wait_until(timeout, Duration::from_millis(50), || {
            self.exit_status().is_some() || self.readyz().is_ok_and(|(code, _)| code == 200)
        });
        let exit = self.exit_status();
        assert!(
            ready && exit.is_none(),
            "flowtel (capabilities {}) not ready after {timeout:?} (exit {exit:?}):\n{}",
            self.caps,
            self.stderr()
        );
    }

    /// SIGTERM to `ip netns exec` (which exec'd setpriv, which exec'd
    /// flowtel: one process), SIGKILL after `grace`.
    fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.exit_status().is_none() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(self.child().id() as libc::pid_t, libc::SIGTERM);
            }
            if !wait_until(grace, Duration::from_millis(20), || {
                self.exit_status().is_some()
            }) {
                let mut child = self.child();
                let _ = child.kill();
                let status = child.wait().ok();
                drop(child);
                *self.exited.lock().unwrap_or_else(|e| e.into_inner()) = status;
            }
        }
        self.exit_status()
    }
}

impl Health for Unprivileged {
    /// `GET /readyz` on the namespace's loopback.
    fn readyz(&self) -> anyhow::Result<(u16, serde_json::Value)> {
        let health = self.health;
        self.ns.in_ns(move || get_readyz(health))?
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        Unprivileged::exit_status(self)
    }

    fn output(&self) -> String {
        self.stderr()
    }
}

impl Drop for Unprivileged {
    fn drop(&mut self) {
        let status = self.stop(Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!("flowtel ({status:?}) stderr:\n{}", self.stderr());
        }
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The `Name` and `CapEff` of /proc/PID/status.
fn effective_caps(pid: u32) -> (String, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
            .to_string()
    };
    let caps = u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff is hex");
    (field("Name:"), caps)
}

#[test]
fn auto_without_bpf_capability_falls_back_to_conntrack() {
    const TEST: &str = "auto_without_bpf_capability_falls_back_to_conntrack";
    let Some((tools, extra)) = common::prerequisites_with(TEST, &[SETPRIV], &[]) else {
        return;
    };
    let _serial = serial();
    let t0 = Instant::now();
    let setpriv = &extra[0];
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    // The receiver's sockets are made in A, so flowtel reaches it on A's
    // loopback.
    let receiver = lab
        .a
        .in_ns(OtlpReceiver::start)
        .expect("entering A")
        .expect("starting the test OTLP receiver in A");
    let endpoint = receiver.grpc_endpoint();
    let mut flowtel = Unprivileged::start(&lab.a, setpriv, &endpoint, DROPPED_CAPS, "auto")
        .expect("starting flowtel");
    flowtel.wait_ready(Duration::from_secs(20));
    let (name, caps) = effective_caps(flowtel.child().id());
    println!("{TEST}: process {name:?}, CapEff {caps:#x}");
    assert_eq!(
        name, "flowtel",
        "ip netns exec and setpriv exec flowtel in place"
    );
    for (bit, cap, want) in [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN", false),
        (CAP_PERFMON, "CAP_PERFMON", false),
        (CAP_BPF, "CAP_BPF", false),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN", true),
    ] {
        assert_eq!(
            caps & (1 << bit) != 0,
            want,
            "flowtel's effective capabilities {caps:#x}: {cap} should be {}",
            if want { "kept" } else { "dropped" }
        );
    }
    println!(
        "{TEST}: {:.1}s: flowtel {} ready in {} without {DROPPED_CAPS}, exporting to {endpoint}",
        t0.elapsed().as_secs_f64(),
        flowtel.child().id(),
        lab.a.name
    );

    let plan = Plan {
        tcp4: Some((4 << 20, 4 << 20)),
        tcp6: None,
        nat: None,
        udp4: Some((500, 1200, 1200)),
        udp6: None,
        short: None,
    };
    let before = lab.counters().expect("reading A's veth counters");
    let servers = lab.servers().expect("starting the servers in B");
    let flows = scenario::run(&lab, &plan).expect("making the traffic");
    let server_errors = servers.errors();
    drop(servers);
    assert!(
        server_errors.is_empty(),
        "servers in B failed: {server_errors:?}"
    );
    for f in &flows {
        println!("{TEST}: sent {:<5} {:?}", f.name, f.payload);
    }

    let series = scenario::wait_exported("receiver", &flowtel, Duration::from_secs(30), || {
        Series::of_clients(&receiver.sum_points(0), &[scenario::A_V4, scenario::A_V6])
    });
    let after = lab.counters().expect("reading A's veth counters");
    let truth = Totals::from_counters(&before, &after);
    println!("{TEST}: expected (veth {}, L3): {truth}", scenario::IF_A);
    println!(
        "{TEST}: receiver series (A's veth address):\n{}",
        series.describe()
    );

    let stderr = flowtel.stderr();
    let warn = stderr
        .lines()
        .find(|l| l.contains("eBPF source unavailable"))
        .unwrap_or_else(|| panic!("no \"eBPF source unavailable\" warning in:\n{stderr}"));
    println!("{TEST}: {warn}");
    assert!(
        warn.contains("WARN"),
        "the fallback is logged at warn level: {warn}"
    );
    assert!(
        stderr.lines().any(
            |l| l.contains("flowtel started") && l.contains("source=\"conntrack\"")
                || l.contains("flowtel started") && l.contains("source=conntrack")
        ),
        "flowtel did not log that it started with conntrack:\n{stderr}"
    );
    assert_eq!(
        series.sources(),
        ["conntrack"],
        "every exported flow series must carry flowtel.source=conntrack\n{}",
        series.describe()
    );
    scenario::check_totals("receiver", &series.totals(), &truth, &series);
    scenario::check_flows("receiver", &flows, &series);

    assert!(
        flowtel.exit_status().is_none(),
        "flowtel exited early: {:?}\n{}",
        flowtel.exit_status(),
        flowtel.stderr()
    );
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly on SIGTERM: {status:?}\n{}",
        flowtel.stderr()
    );
    println!("{TEST}: passed in {:?}", t0.elapsed());
}

#[test]
fn ebpf_runs_with_only_the_documented_capabilities() {
    const TEST: &str = "ebpf_runs_with_only_the_documented_capabilities";
    let Some((tools, extra)) = common::prerequisites_with(
        TEST,
        &[SETPRIV],
        &[(
            flowtel::source::ebpf::built_with_ebpf(),
            "flowtel was built without eBPF support (clang or libbpf-dev missing)",
        )],
    ) else {
        return;
    };
    let _serial = serial();
    let setpriv = &extra[0];
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let receiver = lab
        .a
        .in_ns(OtlpReceiver::start)
        .expect("entering A")
        .expect("starting the test OTLP receiver in A");
    let endpoint = receiver.grpc_endpoint();
    let mut flowtel = Unprivileged::start(&lab.a, setpriv, &endpoint, EBPF_CAPS, "ebpf")
        .expect("starting flowtel");
    flowtel.wait_ready(Duration::from_secs(20));
    let (name, caps) = effective_caps(flowtel.child().id());
    let wanted = (1u64 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
    println!("{TEST}: process {name:?}, CapEff {caps:#x} (wanted {wanted:#x})");
    assert_eq!(name, "flowtel");
    assert_eq!(
        caps, wanted,
        "flowtel must hold exactly CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
    );
    let stderr = flowtel.stderr();
    assert!(
        stderr.contains("eBPF source started"),
        "the eBPF source did not start with {EBPF_CAPS}:\n{stderr}"
    );
    assert!(
        !stderr.contains("TCP health unavailable"),
        "the TCP health programs need more than {EBPF_CAPS}:\n{stderr}"
    );

    let plan = Plan {
        tcp4: Some((4 << 20, 1 << 20)),
        tcp6: None,
        nat: None,
        udp4: Some((500, 1200, 1200)),
        udp6: None,
        short: None,
    };
    let before = lab.counters().expect("reading A's veth counters");
    let servers = lab.servers().expect("starting the servers in B");
    scenario::run(&lab, &plan).expect("making the traffic");
    drop(servers);
    let series = scenario::wait_exported("receiver", &flowtel, Duration::from_secs(30), || {
        Series::of_clients(&receiver.sum_points(0), &[scenario::A_V4])
    });
    let after = lab.counters().expect("reading A's veth counters");
    let truth = Totals::from_counters(&before, &after);
    let got = series.totals();
    assert_eq!(series.sources(), ["ebpf"], "{}", series.describe());
    for (what, g, t) in [
        ("client_to_server bytes", got.c2s_bytes, truth.c2s_bytes),
        ("server_to_client bytes", got.s2c_bytes, truth.s2c_bytes),
    ] {
        println!(
            "{TEST}: {what}: expected (veth L3) {t}, reported {g} ({:+.3} %)",
            deviation_pct(g, t)
        );
        assert!(
            within(g, t, 0.01),
            "{what}: {g} is not within 1 % of {t}\n{}",
            series.describe()
        );
    }
    let opened: u64 = receiver
        .latest("flowtel.tcp.connections.opened", 0)
        .iter()
        .filter(|(a, _)| a.get("client.address") == Some(&AttrValue::Str(scenario::A_V4.into())))
        .map(|(_, p)| p.value)
        .sum();
    println!("{TEST}: TCP connections opened from A: {opened}");
    assert!(opened >= 1, "TCP health reported no connection from A");
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly on SIGTERM: {status:?}\n{}",
        flowtel.stderr()
    );
}

/// Program ids of loaded programs named like flowtel's (bpf/flow.bpf.c:
/// flowtel_in_eth, flowtel_out_eth, flowtel_in_ip, flowtel_out_ip; the
/// kernel keeps the first 15 characters).
fn flowtel_prog_ids(bpftool: &PathBuf) -> Vec<u64> {
    let out = Command::new(bpftool)
        .args(["-j", "prog", "show"])
        .output()
        .expect("running bpftool prog show");
    assert!(out.status.success(), "bpftool prog show: {out:?}");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
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

/// `bpftool link show` (run in `ns`): the links that run one of `progs`,
/// and the tcx links of any program.
/// How many BPF links of `progs` exist, and how many of those are TCX
/// links (the others are the TCP health tracepoints).
fn links(ns: &Netns, bpftool: &PathBuf, progs: &[u64]) -> (usize, usize, String) {
    let out = ns
        .run(bpftool, &["-j", "link", "show"])
        .expect("bpftool link show");
    let all: serde_json::Value = serde_json::from_str(&out).expect("bpftool json");
    let ours: Vec<&serde_json::Value> = all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| progs.contains(&id)))
        .collect();
    let tcx = ours
        .iter()
        .filter(|l| l["type"] == "tcx" || l["type"] == 11)
        .count();
    (ours.len(), tcx, out)
}

fn tc_filters(ns: &Netns, tc: &PathBuf) -> String {
    ["ingress", "egress"]
        .map(|hook| {
            ns.run(tc, &["filter", "show", "dev", scenario::IF_A, hook])
                .unwrap_or_else(|e| panic!("tc filter show {hook}: {e}"))
        })
        .join("")
}

#[test]
fn ebpf_sigterm_exports_final_interval_and_detaches() {
    const TEST: &str = "ebpf_sigterm_exports_final_interval_and_detaches";
    let Some((tools, extra)) = common::prerequisites_with(
        TEST,
        &[BPFTOOL, TC],
        &[
            (
                flowtel::source::ebpf::built_with_ebpf(),
                "flowtel was built without eBPF support (clang or libbpf-dev missing)",
            ),
            (
                std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
                "the kernel has no BTF (/sys/kernel/btf/vmlinux)",
            ),
        ],
    ) else {
        return;
    };
    let _serial = serial();
    let (bpftool, tc) = (&extra[0], &extra[1]);
    let t0 = Instant::now();
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let progs_before = flowtel_prog_ids(bpftool);
    let filters_before = tc_filters(&lab.a, tc);

    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "30s",
        env: Vec::new(),
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(20))
        .expect("flowtel becomes ready");
    let started = Instant::now();
    let ours: Vec<u64> = flowtel_prog_ids(bpftool)
        .into_iter()
        .filter(|id| !progs_before.contains(id))
        .collect();
    let (_, our_links, _) = links(&lab.a, bpftool, &ours);
    let filters = tc_filters(&lab.a, tc);
    println!(
        "{TEST}: {:.1}s: flowtel {} ready on {}, programs {ours:?}, {our_links} links, \
         tc filters: {:?}",
        t0.elapsed().as_secs_f64(),
        flowtel.pid(),
        lab.a.name,
        filters.trim()
    );
    assert!(
        !ours.is_empty(),
        "no flowtel_* program loaded while running"
    );
    assert!(
        our_links == 2 || filters.matches("flowtel_").count() == 2,
        "expected flowtel on {}'s ingress and egress (2 tcx links or 2 tc filters): \
         {our_links} links, filters {filters:?}",
        scenario::IF_A
    );

    let plan = Plan {
        tcp4: Some((6 << 20, 3 << 20)),
        tcp6: None,
        nat: None,
        udp4: None,
        udp6: None,
        short: None,
    };
    let before = lab.counters().expect("reading A's veth counters");
    let (a_in0, b_in0) = (
        scenario::ip_in_packets(&lab.a, false),
        scenario::ip_in_packets(&lab.b, false),
    );
    let servers = lab.servers().expect("starting the servers in B");
    let flows = scenario::run(&lab, &plan).expect("making the traffic");
    let server_errors = servers.errors();
    drop(servers);
    assert!(
        server_errors.is_empty(),
        "servers in B failed: {server_errors:?}"
    );
    // Let the FINs and last ACKs cross before the counters are read.
    std::thread::sleep(Duration::from_millis(500));
    let after = lab.counters().expect("reading A's veth counters");
    let (a_in, b_in) = (
        scenario::ip_in_packets(&lab.a, false) - a_in0,
        scenario::ip_in_packets(&lab.b, false) - b_in0,
    );
    for f in &flows {
        println!("{TEST}: sent {:<5} {:?}", f.name, f.payload);
    }
    let before_signal = receiver.request_count();
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "the traffic took too long: the first 30 s tick may come before SIGTERM"
    );

    let status = flowtel.stop(Duration::from_secs(15));
    let stopped = Instant::now();
    println!(
        "{TEST}: {:.1}s: SIGTERM after {:.1}s of running: {status:?}; {before_signal} \
         exports before the signal, {} after",
        t0.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64(),
        receiver.request_count() - before_signal
    );
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "flowtel did not exit 0 on SIGTERM: {status:?}\n{}",
        flowtel.output()
    );

    let points = receiver.sum_points(before_signal);
    let series = Series::of_clients(&points, &[scenario::A_V4, scenario::B_V4]);
    println!("{TEST}: final interval series:\n{}", series.describe());
    assert!(
        !series.bytes.is_empty(),
        "the receiver got no flow series after SIGTERM (final interval missing); \
         all points: {}\n{}",
        points.len(),
        flowtel.output()
    );
    assert_eq!(
        series.sources(),
        ["ebpf"],
        "every exported flow series must carry flowtel.source=ebpf\n{}",
        series.describe()
    );
    let veth = Totals::from_counters(&before, &after);
    scenario::check_wire_totals(TEST, &series, &veth, a_in, b_in);

    // Nothing of flowtel is left on A's veth. Links and filters go with
    // the process; the kernel frees the programs after an RCU grace period.
    let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        flowtel_prog_ids(bpftool)
            .iter()
            .all(|id| !ours.contains(id))
    });
    let left: Vec<u64> = flowtel_prog_ids(bpftool)
        .into_iter()
        .filter(|id| ours.contains(id))
        .collect();
    assert!(
        gone,
        "flowtel's programs still loaded 5 s after exit: {left:?}"
    );
    let (our_links, _, all_links) = links(&lab.a, bpftool, &ours);
    assert_eq!(
        our_links, 0,
        "flowtel's links left after exit:\n{all_links}"
    );
    let net = lab
        .a
        .run(bpftool, &["net", "show", "dev", scenario::IF_A])
        .expect("bpftool net show");
    assert!(
        !net.contains("tcx") && !net.contains("flowtel"),
        "bpftool net show dev {} in A still shows attachments:\n{net}",
        scenario::IF_A
    );
    let filters = tc_filters(&lab.a, tc);
    assert!(
        !filters.contains("flowtel"),
        "tc filters left on {}: {filters}",
        scenario::IF_A
    );
    assert_eq!(filters, filters_before, "the tc filters changed");
    println!(
        "{TEST}: {:.1}s after exit: no flowtel program ({} before), link, tcx attachment or tc \
         filter left; bpftool net show dev {}: {:?}",
        stopped.elapsed().as_secs_f64(),
        ours.len(),
        scenario::IF_A,
        net.trim()
    );
    println!("{TEST}: passed in {:?}", t0.elapsed());
}
