//! End-to-end tests of the eBPF source on the real kernel (root needed).
//!
//! Each test builds throwaway network namespaces joined by veth pairs
//! (unique names, removed by a Drop guard even on panic), starts the source
//! inside one of them, makes traffic and compares what the source counted
//! with what the kernel itself counted:
//!
//! * bytes: the veth's interface counters. veth counts each skb once with
//!   its full length, so the L3 bytes that crossed are
//!   `bytes - 14 × packets` (the Ethernet header), the same basis as the
//!   source's `skb->len - L2`.
//! * packets: the source counts wire packets (`gso_segs`), while the veth
//!   counts skbs, and one GSO skb carries tens of segments. The ground truth
//!   for wire packets is the receiver's IP layer: `IpExt: In*Pkts`
//!   (`/proc/net/netstat`) and `Ip6In*Pkts` (`/proc/net/snmp6`) add
//!   `max(1, gso_segs)` per received skb, split by ECN codepoint; summed over
//!   the four codepoints they are the wire packets that arrived.
//!
//! The links are made quiet so that the counters hold only the test's own
//! traffic: no IPv6 link-local address (no router solicitation or DAD),
//! permanent neighbour entries (no ARP or ND), MLD reports dropped by nft
//! before they reach TC.
//!
//! When something is missing (root, ip, iperf3, bpftool, tc, nft, or a
//! binary built without eBPF) a test is skipped ([`common::skip`]), or
//! fails under `CI`.

mod common;

use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flowtel::flow::{Counters, FlowUpdate, SourceEvent, SourceKind};
use flowtel::source::ebpf::{self, AttachMode, EbpfConfig, EbpfHandle};
use flowtel::stats::SelfStats;
use tokio::sync::mpsc;

/// The tests share the two CPUs and compare counters; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Skips ([`common::skip`]: reported as skipped, or under CI a failure).
fn skip(test: &str, why: &str) -> Option<Tools> {
    common::skip(test, why);
    None
}

struct Tools {
    ip: PathBuf,
    iperf3: PathBuf,
    bpftool: PathBuf,
    tc: PathBuf,
    nft: PathBuf,
}

fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn tools(test: &str) -> Option<Tools> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(test, "not running as root (namespaces and BPF need it)");
    }
    if !ebpf::built_with_ebpf() {
        return skip(
            test,
            "flowtel was built without eBPF support (clang/bpftool missing)",
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return skip(test, "the kernel has no BTF (/sys/kernel/btf/vmlinux)");
    }
    let mut missing = Vec::new();
    let mut get = |n: &str| {
        let p = find(n);
        if p.is_none() {
            missing.push(n.to_string());
        }
        p.unwrap_or_default()
    };
    let t = Tools {
        ip: get("ip"),
        iperf3: get("iperf3"),
        bpftool: get("bpftool"),
        tc: get("tc"),
        nft: get("nft"),
    };
    if !missing.is_empty() {
        return skip(test, &format!("not found on PATH: {}", missing.join(", ")));
    }
    Some(t)
}

fn run(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Namespaces and processes, removed on drop (also during a panic).
struct Lab<'t> {
    t: &'t Tools,
    prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl<'t> Lab<'t> {
    fn new(t: &'t Tools) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        Lab {
            t,
            prefix: format!(
                "fte-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            namespaces: Vec::new(),
            children: Vec::new(),
        }
    }

    /// A namespace with lo up and MLD reports/router solicitations dropped.
    fn ns(&mut self, suffix: &str) -> String {
        let name = format!("{}-{suffix}", self.prefix);
        run(&self.t.ip, &["netns", "add", &name]);
        self.namespaces.push(name.clone());
        self.exec(&name, &self.t.ip, &["link", "set", "lo", "up"]);
        self.nft(
            &name,
            "table inet ftquiet {\n chain out {\n type filter hook output priority 10; policy accept;\n \
             icmpv6 type { mld-listener-report, mld2-listener-report, nd-router-solicit } drop\n }\n}",
        );
        name
    }

    /// Loads an nft ruleset (through a file: `nft -f` wants one).
    fn nft(&self, ns: &str, ruleset: &str) {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "{}-{}.nft",
            self.prefix,
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, format!("{ruleset}\n")).expect("writing the nft ruleset");
        let path_s = path.to_string_lossy().into_owned();
        self.exec(ns, &self.t.nft, &["-f", &path_s]);
        let _ = std::fs::remove_file(&path);
    }

    fn exec(&self, ns: &str, program: &Path, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", ns, program.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        run(&self.t.ip, &all)
    }

    fn spawn(&mut self, ns: &str, program: &Path, args: &[&str]) {
        let child = Command::new(&self.t.ip)
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        self.children.push(child);
    }

    /// Joins `a`/`ia` and `b`/`ib` with a veth pair: addresses, permanent
    /// neighbours, no link-local addresses, both ends up.
    fn veth(&self, a: (&str, &str, &End), b: (&str, &str, &End)) {
        let ip = &self.t.ip;
        run(
            ip,
            &[
                "-n", a.0, "link", "add", a.1, "address", &a.2.mac, "type", "veth", "peer", "name",
                b.1, "address", &b.2.mac, "netns", b.0,
            ],
        );
        for (me, peer) in [(a, b), (b, a)] {
            let (ns, ifname, end) = me;
            run(
                ip,
                &[
                    "-n",
                    ns,
                    "link",
                    "set",
                    "dev",
                    ifname,
                    "addrgenmode",
                    "none",
                ],
            );
            run(ip, &["-n", ns, "addr", "add", &end.v4, "dev", ifname]);
            run(
                ip,
                &[
                    "-n", ns, "-6", "addr", "add", &end.v6, "dev", ifname, "nodad",
                ],
            );
            for addr in [peer.2.v4_addr(), peer.2.v6_addr()] {
                run(
                    ip,
                    &[
                        "-n",
                        ns,
                        "neigh",
                        "replace",
                        addr,
                        "lladdr",
                        &peer.2.mac,
                        "dev",
                        ifname,
                        "nud",
                        "permanent",
                    ],
                );
            }
        }
        for (ns, ifname, _) in [a, b] {
            run(ip, &["-n", ns, "link", "set", "dev", ifname, "up"]);
        }
    }

    fn netns_path(ns: &str) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{ns}"))
    }
}

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new(&self.t.ip)
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One end of a veth pair.
struct End {
    mac: String,
    v4: String,
    v6: String,
}

impl End {
    fn new(n: u8) -> End {
        End {
            mac: format!("02:f1:0e:00:00:{n:02x}"),
            v4: format!("198.18.0.{n}/24"),
            v6: format!("fd00:f10e::{n}/64"),
        }
    }

    fn v4_addr(&self) -> &str {
        self.v4.split('/').next().unwrap_or_default()
    }

    fn v6_addr(&self) -> &str {
        self.v6.split('/').next().unwrap_or_default()
    }
}

/// A running source plus its event channel.
struct Source {
    handle: Option<EbpfHandle>,
    rx: mpsc::Receiver<SourceEvent>,
    epoch: u64,
}

impl Source {
    fn start(cfg: EbpfConfig) -> Source {
        let (tx, rx) = mpsc::channel(65_536);
        let handle = ebpf::start(&cfg, Arc::new(SelfStats::default()), tx)
            .unwrap_or_else(|e| panic!("starting the eBPF source: {e:#}"));
        Source {
            handle: Some(handle),
            rx,
            epoch: 0,
        }
    }

    fn handle(&self) -> &EbpfHandle {
        self.handle.as_ref().expect("source running")
    }

    /// Requests a dump and collects it.
    fn dump(&mut self) -> Vec<FlowUpdate> {
        self.epoch += 1;
        let epoch = self.epoch;
        assert!(self.handle().request_dump(epoch), "the source stopped");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut flows = Vec::new();
        let mut started = false;
        loop {
            match self.rx.try_recv() {
                Ok(SourceEvent::DumpStarted { epoch: e }) => started |= e == epoch,
                Ok(SourceEvent::Flow(f)) if started => flows.push(f),
                // TCP health and drops are checked by tests/ebpf_health.rs.
                Ok(SourceEvent::Flow(_) | SourceEvent::Tcp(_) | SourceEvent::Drop(_)) => {}
                Ok(SourceEvent::DumpFinished { epoch: e, complete }) if e == epoch => {
                    assert!(started, "DumpFinished without DumpStarted");
                    assert!(complete, "the dump was incomplete");
                    return flows;
                }
                Ok(SourceEvent::DumpFinished { .. }) => {}
                Err(mpsc::error::TryRecvError::Empty) => {
                    assert!(Instant::now() < deadline, "no dump within 30 s");
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(mpsc::error::TryRecvError::Disconnected) => panic!("the source went away"),
            }
        }
    }

    fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
    }
}

fn config(netns: &str, include: &[&str]) -> EbpfConfig {
    EbpfConfig {
        interfaces_include: include.iter().map(|s| s.to_string()).collect(),
        netns: Some(Lab::netns_path(netns)),
        // Long enough that nothing expires while a test runs.
        idle_timeout: Some(Duration::from_secs(3600)),
        ..EbpfConfig::default()
    }
}

/// veth counters of one interface.
#[derive(Debug, Clone, Copy, Default)]
struct IfStats {
    tx_bytes: u64,
    tx_packets: u64,
    rx_bytes: u64,
    rx_packets: u64,
}

impl IfStats {
    fn read(lab: &Lab, ns: &str, ifname: &str) -> IfStats {
        let files = ["tx_bytes", "tx_packets", "rx_bytes", "rx_packets"]
            .map(|f| format!("/sys/class/net/{ifname}/statistics/{f}"));
        let args: Vec<&str> = files.iter().map(String::as_str).collect();
        let out = lab.exec(ns, Path::new("/bin/cat"), &args);
        let v: Vec<u64> = out
            .split_whitespace()
            .map(|s| s.parse().expect("counter is a number"))
            .collect();
        assert_eq!(v.len(), 4, "reading {ifname} counters: {out:?}");
        IfStats {
            tx_bytes: v[0],
            tx_packets: v[1],
            rx_bytes: v[2],
            rx_packets: v[3],
        }
    }

    fn since(&self, before: &IfStats) -> IfStats {
        IfStats {
            tx_bytes: self.tx_bytes - before.tx_bytes,
            tx_packets: self.tx_packets - before.tx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            rx_packets: self.rx_packets - before.rx_packets,
        }
    }

    /// L3 bytes sent / received: minus one Ethernet header per skb.
    fn tx_l3(&self) -> u64 {
        self.tx_bytes - 14 * self.tx_packets
    }

    fn rx_l3(&self) -> u64 {
        self.rx_bytes - 14 * self.rx_packets
    }
}

/// Wire packets received by a namespace's IP layer (all ECN codepoints).
fn ip_in_packets(lab: &Lab, ns: &str, v6: bool) -> u64 {
    if v6 {
        let out = lab.exec(ns, Path::new("/bin/cat"), &["/proc/net/snmp6"]);
        out.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let (k, v) = (it.next()?, it.next()?);
                [
                    "Ip6InNoECTPkts",
                    "Ip6InECT1Pkts",
                    "Ip6InECT0Pkts",
                    "Ip6InCEPkts",
                ]
                .contains(&k)
                .then(|| v.parse::<u64>().ok())?
            })
            .sum()
    } else {
        let out = lab.exec(ns, Path::new("/bin/cat"), &["/proc/net/netstat"]);
        let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("IpExt:")).collect();
        assert_eq!(lines.len(), 2, "IpExt lines in /proc/net/netstat");
        let names = lines[0].split_whitespace();
        let values = lines[1].split_whitespace();
        names
            .zip(values)
            .filter(|(n, _)| ["InNoECTPkts", "InECT1Pkts", "InECT0Pkts", "InCEPkts"].contains(n))
            .map(|(_, v)| v.parse::<u64>().expect("counter is a number"))
            .sum()
    }
}

/// Sums the flows between `a` and `b` touching `port`, per direction.
fn directional(flows: &[FlowUpdate], a: IpAddr, b: IpAddr, port: u16) -> (Counters, Counters) {
    let (mut ab, mut ba) = (Counters::default(), Counters::default());
    for f in flows {
        assert_eq!(f.source, SourceKind::Ebpf);
        assert_eq!(f.generation, 0);
        if f.id.client.port != port && f.id.server.port != port {
            continue;
        }
        if f.id.client.ip == a && f.id.server.ip == b {
            ab.add(f.to_server);
            ba.add(f.to_client);
        } else if f.id.client.ip == b && f.id.server.ip == a {
            ab.add(f.to_client);
            ba.add(f.to_server);
        }
    }
    (ab, ba)
}

fn pct(measured: u64, expected: u64) -> f64 {
    if expected == 0 {
        return if measured == 0 { 0.0 } else { f64::INFINITY };
    }
    (measured as f64 - expected as f64) / expected as f64 * 100.0
}

/// Prints and checks one direction within 1 %.
fn check(label: &str, measured: Counters, bytes: u64, packets: u64) {
    let (db, dp) = (pct(measured.bytes, bytes), pct(measured.packets, packets));
    println!(
        "{label:<32} bytes expected {bytes:>11} measured {:>11} ({db:+.3}%)   packets expected \
         {packets:>8} measured {:>8} ({dp:+.3}%)",
        measured.bytes, measured.packets
    );
    assert!(db.abs() <= 1.0, "{label}: bytes off by {db:.3}%");
    assert!(dp.abs() <= 1.0, "{label}: packets off by {dp:.3}%");
}

/// Runs one iperf3 test from `client_ns` to `server` (an address in
/// `server_ns`) on `port`, retrying until the one-off server listens.
fn iperf(lab: &mut Lab, client_ns: &str, server_ns: &str, server: &str, port: u16, args: &[&str]) {
    let port_s = port.to_string();
    let iperf3 = lab.t.iperf3.clone();
    lab.spawn(
        server_ns,
        &iperf3,
        &["-s", "-1", "-B", server, "-p", &port_s],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = vec![
            "netns",
            "exec",
            client_ns,
            iperf3.to_str().unwrap_or_default(),
            "-c",
            server,
            "-p",
            &port_s,
        ];
        all.extend_from_slice(args);
        let out = Command::new(&lab.t.ip)
            .args(&all)
            .stdin(Stdio::null())
            .output()
            .expect("running iperf3");
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            Instant::now() < deadline && err.contains("refused"),
            "iperf3 {args:?} failed: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Counts iperf3 traffic between two namespaces, with the source attached
/// to one veth end, and compares per direction with the kernel's counters.
#[test]
fn iperf3_counts_match_interface_and_ip_counters() {
    let Some(t) = tools("iperf3_counts_match_interface_and_ip_counters") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nb) = (lab.ns("a"), lab.ns("b"));
    let (ea, eb) = (End::new(1), End::new(2));
    lab.veth((&na, "fta", &ea), (&nb, "ftb", &eb));

    // Both attach modes: the counting must not depend on the hook flavour.
    for (m, attach) in [AttachMode::Tcx, AttachMode::Netlink]
        .into_iter()
        .enumerate()
    {
        let mut cfg = config(&na, &["fta"]);
        cfg.attach = attach;
        let mut src = Source::start(cfg);
        let mode = src.handle().mode();
        let cases: [(&str, bool, &[&str]); 4] = [
            ("ipv4 tcp", false, &["-n", "50M"]),
            ("ipv4 udp", false, &["-u", "-b", "100M", "-n", "20M"]),
            ("ipv6 tcp", true, &["-n", "50M"]),
            ("ipv6 udp", true, &["-u", "-b", "100M", "-n", "20M"]),
        ];
        for (i, (case, v6, args)) in cases.into_iter().enumerate() {
            let label = format!("{mode} {case}");
            let port = 5301 + (m * 10 + i) as u16;
            let (a, b) = if v6 {
                (ea.v6_addr(), eb.v6_addr())
            } else {
                (ea.v4_addr(), eb.v4_addr())
            };
            let if_before = IfStats::read(&lab, &na, "fta");
            let (in_a0, in_b0) = (ip_in_packets(&lab, &na, v6), ip_in_packets(&lab, &nb, v6));
            iperf(&mut lab, &na, &nb, b, port, args);
            std::thread::sleep(Duration::from_millis(300));
            let ifs = IfStats::read(&lab, &na, "fta").since(&if_before);
            let (in_a, in_b) = (
                ip_in_packets(&lab, &na, v6) - in_a0,
                ip_in_packets(&lab, &nb, v6) - in_b0,
            );
            let flows = src.dump();
            let (ab, ba) = directional(
                &flows,
                a.parse().expect("address"),
                b.parse().expect("address"),
                port,
            );
            // iperf3 in a is the client of every connection on the port.
            let a_ip: IpAddr = a.parse().expect("address");
            for f in flows
                .iter()
                .filter(|f| f.id.client.port == port || f.id.server.port == port)
            {
                assert_eq!((f.id.client.ip, f.id.server.port), (a_ip, port), "{f:?}");
            }
            check(&format!("{label} a->b (egress)"), ab, ifs.tx_l3(), in_b);
            check(&format!("{label} b->a (ingress)"), ba, ifs.rx_l3(), in_a);
            // Wire packets exceed skbs once GSO is in play (TCP here).
            if case.ends_with("tcp") {
                println!(
                    "{label:<32} veth skbs a->b {} vs wire packets {}",
                    ifs.tx_packets, ab.packets
                );
            }
        }
        let (op, ob) = src.handle().overflow();
        assert_eq!((op, ob), (0, 0), "nothing may overflow here");
        src.stop();
    }
}

/// A packet crossing two attached interfaces (in on one veth, forwarded out
/// of another: the pod-to-pod path on a node) is counted once, not twice.
#[test]
fn forwarded_packets_are_counted_once() {
    let Some(t) = tools("forwarded_packets_are_counted_once") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nr, nb) = (lab.ns("a"), lab.ns("r"), lab.ns("b"));
    let (ea, er0) = (End::new(1), End::new(2));
    let mut er1 = End::new(3);
    let mut eb = End::new(4);
    // Second link on its own subnets.
    er1.v4 = "198.19.0.3/24".into();
    er1.v6 = "fd00:f10f::3/64".into();
    eb.v4 = "198.19.0.4/24".into();
    eb.v6 = "fd00:f10f::4/64".into();
    lab.veth((&na, "fta", &ea), (&nr, "ftr0", &er0));
    lab.veth((&nr, "ftr1", &er1), (&nb, "ftb", &eb));
    lab.exec(
        &nr,
        &find("sysctl").expect("sysctl"),
        &["-qw", "net.ipv4.ip_forward=1"],
    );
    lab.exec(
        &nr,
        &find("sysctl").expect("sysctl"),
        &["-qw", "net.ipv6.conf.all.forwarding=1"],
    );
    for (ns, via4, via6) in [
        (&na, er0.v4_addr(), er0.v6_addr()),
        (&nb, er1.v4_addr(), er1.v6_addr()),
    ] {
        run(&t.ip, &["-n", ns, "route", "add", "default", "via", via4]);
        run(
            &t.ip,
            &["-n", ns, "-6", "route", "add", "default", "via", via6],
        );
    }

    let mut src = Source::start(config(&nr, &["ftr*"]));
    for (i, v6) in [false, true].into_iter().enumerate() {
        let port = 5401 + i as u16;
        let label = if v6 {
            "routed ipv6 tcp"
        } else {
            "routed ipv4 tcp"
        };
        let (a, b) = if v6 {
            (ea.v6_addr(), eb.v6_addr())
        } else {
            (ea.v4_addr(), eb.v4_addr())
        };
        let r0_before = IfStats::read(&lab, &nr, "ftr0");
        let r1_before = IfStats::read(&lab, &nr, "ftr1");
        let (in_a0, in_b0) = (ip_in_packets(&lab, &na, v6), ip_in_packets(&lab, &nb, v6));
        iperf(&mut lab, &na, &nb, b, port, &["-n", "50M"]);
        std::thread::sleep(Duration::from_millis(300));
        let r0 = IfStats::read(&lab, &nr, "ftr0").since(&r0_before);
        let r1 = IfStats::read(&lab, &nr, "ftr1").since(&r1_before);
        let (in_a, in_b) = (
            ip_in_packets(&lab, &na, v6) - in_a0,
            ip_in_packets(&lab, &nb, v6) - in_b0,
        );
        let flows = src.dump();
        let (ab, ba) = directional(
            &flows,
            a.parse().expect("address"),
            b.parse().expect("address"),
            port,
        );
        println!(
            "{label:<32} seen on ftr0 in {} B, on ftr1 out {} B (each alone is the whole flow)",
            r0.rx_l3(),
            r1.tx_l3()
        );
        check(&format!("{label} a->b (2 hooks)"), ab, r0.rx_l3(), in_b);
        check(&format!("{label} b->a (2 hooks)"), ba, r1.rx_l3(), in_a);
    }
    src.stop();
}

/// With a tiny map, what cannot be recorded is counted as overflow:
/// recorded + overflow == sent, exactly.
#[test]
fn full_map_counts_overflow() {
    let Some(t) = tools("full_map_counts_overflow") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nb) = (lab.ns("a"), lab.ns("b"));
    let (ea, eb) = (End::new(1), End::new(2));
    lab.veth((&na, "fta", &ea), (&nb, "ftb", &eb));
    // No ICMP port-unreachable answers: drop the datagrams in b's input.
    lab.nft(
        &nb,
        "table inet ftdrop {\n chain in {\n type filter hook input priority 0; policy accept;\n \
         udp dport 20000-29999 drop\n }\n}",
    );
    let mut cfg = config(&na, &["fta"]);
    cfg.max_flows = 64;
    let mut src = Source::start(cfg);

    const N: u16 = 10_000;
    let target: IpAddr = eb.v4_addr().parse().expect("address");
    let local: IpAddr = ea.v4_addr().parse().expect("address");
    let ns_path = Lab::netns_path(&na);
    let sent = std::thread::spawn(move || {
        let ns = File::open(&ns_path).expect("open netns");
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let sock = UdpSocket::bind(SocketAddr::new(local, 0)).expect("bind in a");
        let payload = [0u8; 64];
        let mut sent = 0u64;
        for i in 0..N {
            let to = SocketAddr::new(target, 20000 + i);
            if sock.send_to(&payload, to).is_ok() {
                sent += 1;
            }
            if i % 500 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    })
    .join()
    .expect("sender thread");

    let flows = src.dump();
    let udp: Vec<&FlowUpdate> = flows
        .iter()
        .filter(|f| {
            f.id.transport == flowtel::flow::Transport::Udp
                && (20000..30000).contains(&f.id.server.port)
        })
        .collect();
    let recorded: u64 = udp
        .iter()
        .map(|f| f.to_server.packets + f.to_client.packets)
        .sum();
    let (overflow, overflow_bytes) = src.handle().overflow();
    println!(
        "map full: sent {sent}, recorded {recorded} in {} flows, overflow {overflow} packets \
         ({overflow_bytes} bytes)",
        udp.len()
    );
    assert_eq!(
        sent,
        u64::from(N),
        "every datagram was handed to the kernel"
    );
    assert!(udp.len() <= 64, "more flows than max_flows: {}", udp.len());
    assert!(overflow > 0, "the map should have overflowed");
    assert_eq!(recorded + overflow, sent, "recorded + overflow != sent");
    let nomem = src
        .handle()
        .stats()
        .overflow_nomem_packets
        .load(Ordering::Relaxed);
    assert_eq!(
        nomem, 0,
        "a small map is preallocated: only E2BIG, no ENOMEM"
    );
    // 64-byte payload + 8 UDP + 20 IPv4 per datagram.
    assert_eq!(overflow_bytes, overflow * 92);
    src.stop();
}

/// Program ids of flowtel's loaded programs, from `bpftool prog show`.
fn flowtel_prog_ids(t: &Tools) -> Vec<u64> {
    let out = run(&t.bpftool, &["-j", "prog", "show"]);
    let progs: serde_json::Value = serde_json::from_str(&out).expect("bpftool json");
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

/// Links (any type) that run one of `progs`.
fn links_of(t: &Tools, progs: &[u64]) -> usize {
    let out = run(&t.bpftool, &["-j", "link", "show"]);
    let links: serde_json::Value = serde_json::from_str(&out).expect("bpftool json");
    links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| progs.contains(&id)))
        .count()
}

fn tc_filters(lab: &Lab, ns: &str, ifname: &str) -> String {
    ["ingress", "egress"]
        .map(|hook| {
            Command::new(&lab.t.ip)
                .args(["netns", "exec", ns])
                .arg(&lab.t.tc)
                .args(["filter", "show", "dev", ifname, hook])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        })
        .join("")
}

/// After stop() nothing of flowtel is left: no TCX link, no tc filter, no
/// program; and a foreign tc filter on the same hook is left alone.
#[test]
fn stop_leaves_nothing_attached() {
    let Some(t) = tools("stop_leaves_nothing_attached") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nb) = (lab.ns("a"), lab.ns("b"));
    let (ea, eb) = (End::new(1), End::new(2));
    lab.veth((&na, "fta", &ea), (&nb, "ftb", &eb));
    // Someone else's filters (u32, matching nothing in particular) must survive.
    lab.exec(&na, &t.tc, &["qdisc", "add", "dev", "fta", "clsact"]);
    for hook in ["ingress", "egress"] {
        lab.exec(
            &na,
            &t.tc,
            &[
                "filter", "add", "dev", "fta", hook, "pref", "7", "u32", "match", "u32", "0", "0",
            ],
        );
    }

    let foreign = tc_filters(&lab, &na, "fta");
    assert!(foreign.contains("u32"), "{foreign}");
    let before = flowtel_prog_ids(&t);
    for (attach, want_mode) in [(AttachMode::Tcx, "tcx"), (AttachMode::Netlink, "clsact")] {
        let mut cfg = config(&na, &["fta"]);
        cfg.attach = attach;
        // The TC programs only; tests/source_selection.rs checks that the
        // tracepoint programs go too.
        cfg.tcp.enabled = false;
        cfg.drops.enabled = false;
        let src = Source::start(cfg);
        assert_eq!(src.handle().mode(), want_mode);
        let ours: Vec<u64> = flowtel_prog_ids(&t)
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        assert_eq!(ours.len(), 4, "four programs loaded: {ours:?}");
        let filters = tc_filters(&lab, &na, "fta");
        match attach {
            AttachMode::Tcx => assert_eq!(links_of(&t, &ours), 2, "ingress + egress links"),
            _ => assert_eq!(
                filters.matches("handle 0xf10e flowtel_").count(),
                2,
                "ingress + egress filters: {filters}"
            ),
        }
        src.stop();
        // Filters and links go at once; the kernel frees the programs
        // after an RCU grace period, so allow it a moment.
        let filters = tc_filters(&lab, &na, "fta");
        assert!(!filters.contains("flowtel"), "filters left: {filters}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let after: Vec<u64> = flowtel_prog_ids(&t)
                .into_iter()
                .filter(|id| ours.contains(id))
                .collect();
            if after.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "programs still loaded 5 s after stop: {after:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(links_of(&t, &ours), 0, "links left after stop");
        assert_eq!(filters, foreign, "the foreign filters changed");
        println!("{want_mode}: attached, stopped, nothing left; foreign filter intact");
    }
}

/// Interfaces that appear after start are attached by the re-scan, and
/// vanished ones are dropped.
#[test]
fn new_interfaces_are_attached() {
    let Some(t) = tools("new_interfaces_are_attached") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nb) = (lab.ns("a"), lab.ns("b"));
    let src = Source::start(config(&na, &["ft*"]));
    let stats = src.handle().stats();
    assert_eq!(stats.interfaces_attached.load(Ordering::Relaxed), 0);
    let (ea, eb) = (End::new(1), End::new(2));
    lab.veth((&na, "fta", &ea), (&nb, "ftb", &eb));
    let deadline = Instant::now() + Duration::from_secs(6);
    while stats.interfaces_attached.load(Ordering::Relaxed) != 1 {
        assert!(
            Instant::now() < deadline,
            "fta was not attached by the re-scan"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run(&t.ip, &["-n", &na, "link", "del", "fta"]);
    let deadline = Instant::now() + Duration::from_secs(6);
    while stats.interfaces_attached.load(Ordering::Relaxed) != 0 {
        assert!(
            Instant::now() < deadline,
            "fta was not dropped after it vanished"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    src.stop();
}

/// A bad namespace path is one clear error, not a panic or a hang.
#[test]
fn bad_netns_is_a_clear_error() {
    if !ebpf::built_with_ebpf() || unsafe { libc::geteuid() } != 0 {
        common::skip("bad_netns_is_a_clear_error", "needs root and an eBPF build");
        return;
    }
    let (tx, _rx) = mpsc::channel(16);
    let cfg = EbpfConfig {
        netns: Some(PathBuf::from("/nonexistent/netns")),
        ..EbpfConfig::default()
    };
    let err = match ebpf::start(&cfg, Arc::new(SelfStats::default()), tx) {
        Ok(_) => panic!("a missing namespace must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("cannot open network namespace"), "{err}");
}

/// Runs `f` on a thread that has entered namespace `ns`; sockets made there
/// stay in that namespace wherever they are used afterwards.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = Lab::netns_path(ns);
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Sends one ICMP echo request (id `id`) to `to` from a raw socket in the
/// calling thread's namespace; the peer's kernel answers it.
fn send_echo(to: IpAddr, id: u16) {
    // SAFETY: plain socket calls on buffers that live across the calls.
    unsafe {
        let (domain, proto, ty) = match to {
            IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
            IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
        };
        let fd = libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut msg = [
            ty,
            0,
            0,
            0,
            (id >> 8) as u8,
            id as u8,
            0,
            1,
            0xab,
            0xcd,
            0xef,
            0x01,
        ];
        if to.is_ipv4() {
            // ICMPv4 checksum (ICMPv6's is filled in by the kernel).
            let mut sum: u32 = msg
                .chunks(2)
                .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            let csum = !(sum as u16);
            msg[2] = (csum >> 8) as u8;
            msg[3] = csum as u8;
        }
        let rc = match to {
            IpAddr::V4(v4) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.octets()),
                    },
                    sin_zero: [0; 8],
                };
                libc::sendto(
                    fd,
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            IpAddr::V6(v6) => {
                let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_addr.s6_addr = v6.octets();
                libc::sendto(
                    fd,
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        };
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert!(rc > 0, "sending an echo request: {err}");
    }
}

/// Idle flows are reported once with `ended` and their final counters, then
/// removed from the kernel map; new packets on the same tuple start afresh.
/// ICMP echo pairs request and reply with the requester as client.
#[test]
fn idle_flows_end_and_icmp_echo_pairs() {
    let Some(t) = tools("idle_flows_end_and_icmp_echo_pairs") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nb) = (lab.ns("a"), lab.ns("b"));
    let (ea, eb) = (End::new(1), End::new(2));
    lab.veth((&na, "fta", &ea), (&nb, "ftb", &eb));
    let mut cfg = config(&na, &["fta"]);
    cfg.idle_timeout = Some(Duration::from_secs(1));
    let mut src = Source::start(cfg);

    let a: IpAddr = ea.v4_addr().parse().expect("address");
    let b: IpAddr = eb.v4_addr().parse().expect("address");
    let server = in_ns(&nb, move || {
        UdpSocket::bind(SocketAddr::new(b, 7000)).expect("bind b")
    });
    let client = in_ns(&na, move || {
        UdpSocket::bind(SocketAddr::new(a, 40000)).expect("bind a")
    });
    let send = |n: usize| {
        for _ in 0..n {
            client
                .send_to(&[7u8; 100], SocketAddr::new(b, 7000))
                .expect("send");
        }
    };
    let find = |flows: &[FlowUpdate]| -> Option<FlowUpdate> {
        flows
            .iter()
            .find(|f| f.id.server == flowtel::flow::Endpoint::new(b, 7000))
            .copied()
    };
    // 100 bytes payload + 8 UDP + 20 IPv4.
    send(5);
    let f = find(&src.dump()).expect("the UDP flow is reported");
    assert_eq!(f.id.client, flowtel::flow::Endpoint::new(a, 40000));
    assert_eq!(f.to_server, Counters::new(640, 5));
    assert!(!f.ended);
    std::thread::sleep(Duration::from_millis(1300));
    let f = find(&src.dump()).expect("the idle flow is reported once more");
    assert!(f.ended, "quiet for longer than idle_timeout: ended");
    assert_eq!(f.to_server, Counters::new(640, 5), "final counters");
    assert!(
        find(&src.dump()).is_none(),
        "removed from the map after ending"
    );
    send(3);
    let f = find(&src.dump()).expect("the tuple is counted afresh");
    assert_eq!(f.to_server, Counters::new(384, 3));
    assert!(!f.ended);
    drop(server);

    // An IPv6 datagram bigger than the MTU leaves in fragments (1448 bytes
    // of payload each at MTU 1500, so three here): the first carries the
    // UDP header (counted under the ports), the others only the fragment
    // header (counted under UDP with ports 0).
    let (a6, b6): (IpAddr, IpAddr) = (
        ea.v6_addr().parse().expect("v6"),
        eb.v6_addr().parse().expect("v6"),
    );
    let _sink = in_ns(&nb, move || {
        UdpSocket::bind(SocketAddr::new(b6, 7001)).expect("bind")
    });
    in_ns(&na, move || {
        let s = UdpSocket::bind(SocketAddr::new(a6, 40001)).expect("bind");
        s.send_to(&[1u8; 3000], SocketAddr::new(b6, 7001))
            .expect("send");
    });
    let flows = src.dump();
    let first = flows
        .iter()
        .find(|f| f.id.server == flowtel::flow::Endpoint::new(b6, 7001))
        .expect("first fragment under the ports");
    let rest = flows
        .iter()
        .find(|f| {
            f.id.transport == flowtel::flow::Transport::Udp
                && f.id.server.ip == b6
                && f.id.server.port == 0
        })
        .expect("later fragment under UDP, ports 0");
    assert_eq!((first.to_server.packets, rest.to_server.packets), (1, 2));
    // 3000 + 8 UDP + 3 × (40 IPv6 + 8 fragment header).
    assert_eq!(
        first.to_server.bytes + rest.to_server.bytes,
        3000 + 8 + 3 * 48
    );

    for (to, id) in [(b, 0x1234u16), (eb.v6_addr().parse().expect("v6"), 0x4321)] {
        in_ns(&na, move || {
            send_echo(to, id);
            send_echo(to, id);
        });
    }
    std::thread::sleep(Duration::from_millis(200));
    let flows = src.dump();
    for (to, id) in [(b, 0x1234u16), (eb.v6_addr().parse().expect("v6"), 0x4321)] {
        let f = flows
            .iter()
            .find(|f| f.id.server.ip == to && f.id.client.port == id)
            .unwrap_or_else(|| panic!("echo flow to {to} id {id:#x}: {flows:#?}"));
        assert_eq!(f.id.server.port, 0, "the responder's port is 0");
        assert_eq!((f.to_server.packets, f.to_client.packets), (2, 2), "{f:?}");
        println!(
            "icmp echo {}: {} -> {} ok",
            f.id.transport, f.id.client, f.id.server
        );
    }
    src.stop();
}

/// The child half of `leftover_filters_are_replaced`: starts the source in
/// clsact mode in `$FLOWTEL_EBPF_HELPER_NETNS` and waits to be killed.
#[test]
#[ignore = "helper run by leftover_filters_are_replaced"]
fn helper_attach_and_wait() {
    let Some(ns) = std::env::var_os("FLOWTEL_EBPF_HELPER_NETNS") else {
        return;
    };
    let mut cfg = config(&ns.to_string_lossy(), &["fta"]);
    cfg.attach = AttachMode::Netlink;
    let _src = Source::start(cfg);
    println!("attached");
    std::thread::sleep(Duration::from_secs(60));
}

/// A flowtel killed with SIGKILL leaves its clsact filters behind (TCX links
/// would vanish with it); the next start replaces them instead of failing or
/// counting twice, and its stop removes them.
#[test]
fn leftover_filters_are_replaced() {
    let Some(t) = tools("leftover_filters_are_replaced") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nb) = (lab.ns("a"), lab.ns("b"));
    let (ea, eb) = (End::new(1), End::new(2));
    lab.veth((&na, "fta", &ea), (&nb, "ftb", &eb));

    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "helper_attach_and_wait",
            "--ignored",
            "--nocapture",
        ])
        .env("FLOWTEL_EBPF_HELPER_NETNS", &na)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the helper");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tc_filters(&lab, &na, "fta")
        .matches("handle 0xf10e flowtel_")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the helper never attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("SIGKILL the helper");
    let _ = child.wait();
    let left = tc_filters(&lab, &na, "fta");
    assert_eq!(left.matches("handle 0xf10e flowtel_").count(), 2, "{left}");

    let mut cfg = config(&na, &["fta"]);
    cfg.attach = AttachMode::Netlink;
    let src = Source::start(cfg);
    let now = tc_filters(&lab, &na, "fta");
    assert_eq!(
        now.matches("handle 0xf10e flowtel_").count(),
        2,
        "exactly one flowtel filter per hook: {now}"
    );
    assert_ne!(now, left, "the leftover programs were replaced by ours");
    src.stop();
    let after = tc_filters(&lab, &na, "fta");
    assert!(!after.contains("flowtel"), "filters left: {after}");
    println!("leftover clsact filters replaced and removed");
}

/// How long a dump of 100 000 kernel entries takes (`--ignored`; a
/// measurement, not a check: conntrack -L takes 0.55-0.59 s at 100k here).
#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn dump_time_100k_flows() {
    let Some(t) = tools("dump_time_100k_flows") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nb) = (lab.ns("a"), lab.ns("b"));
    let (ea, eb) = (End::new(1), End::new(2));
    lab.veth((&na, "fta", &ea), (&nb, "ftb", &eb));
    lab.nft(
        &nb,
        "table inet ftdrop {\n chain in {\n type filter hook input priority 0; policy accept;\n \
         udp dport 1-65535 drop\n }\n}",
    );
    for prealloc in [true, false] {
        let mut cfg = config(&na, &["fta"]);
        cfg.max_flows = 131_072;
        cfg.preallocate = Some(prealloc);
        let mut src = Source::start(cfg);
        let a: IpAddr = ea.v4_addr().parse().expect("address");
        let b: IpAddr = eb.v4_addr().parse().expect("address");
        in_ns(&na, move || {
            // 2 source ports × 50 000 destination ports = 100 000 tuples.
            for sport in [40000u16, 40001] {
                let s = UdpSocket::bind(SocketAddr::new(a, sport)).expect("bind");
                for dport in 1000..51000u16 {
                    let _ = s.send_to(&[0u8; 8], SocketAddr::new(b, dport));
                    if dport % 1000 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        });
        for round in 0..3 {
            let started = Instant::now();
            let flows = src.dump();
            println!(
                "preallocated {prealloc}: dump {round}: {} flows in {:?} (overflow {:?}, of which \
             allocation failures {})",
                flows.len(),
                started.elapsed(),
                src.handle().overflow(),
                src.handle()
                    .stats()
                    .overflow_nomem_packets
                    .load(Ordering::Relaxed)
            );
        }
        src.stop();
    }
}

/// CPU cost per program run (`--ignored`; a measurement): turns on
/// `kernel.bpf_stats_enabled` for the run and restores it afterwards.
#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn per_packet_cost() {
    let Some(t) = tools("per_packet_cost") else {
        return;
    };
    let _serial = serial();
    let mut lab = Lab::new(&t);
    let (na, nb) = (lab.ns("a"), lab.ns("b"));
    let (ea, eb) = (End::new(1), End::new(2));
    lab.veth((&na, "fta", &ea), (&nb, "ftb", &eb));
    let sysctl = find("sysctl").expect("sysctl");
    let old = run(&sysctl, &["-n", "kernel.bpf_stats_enabled"]);
    run(&sysctl, &["-qw", "kernel.bpf_stats_enabled=1"]);
    struct Restore(PathBuf, String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = Command::new(&self.0)
                .args([
                    "-qw",
                    &format!("kernel.bpf_stats_enabled={}", self.1.trim()),
                ])
                .status();
        }
    }
    let _restore = Restore(sysctl, old);
    let before = flowtel_prog_ids(&t);
    let src = Source::start(config(&na, &["fta"]));
    iperf(&mut lab, &na, &nb, eb.v4_addr(), 5501, &["-n", "200M"]);
    iperf(
        &mut lab,
        &na,
        &nb,
        eb.v4_addr(),
        5502,
        &["-u", "-b", "200M", "-n", "50M"],
    );
    let out = run(&t.bpftool, &["-j", "prog", "show"]);
    let progs: serde_json::Value = serde_json::from_str(&out).expect("bpftool json");
    for p in progs.as_array().into_iter().flatten() {
        let (Some(id), Some(name)) = (p["id"].as_u64(), p["name"].as_str()) else {
            continue;
        };
        if !name.starts_with("flowtel_") || before.contains(&id) {
            continue;
        }
        let (ns, cnt) = (
            p["run_time_ns"].as_u64().unwrap_or(0),
            p["run_cnt"].as_u64().unwrap_or(0),
        );
        if cnt > 0 {
            println!(
                "{name}: {cnt} runs, {:.0} ns per run",
                ns as f64 / cnt as f64
            );
        }
    }
    src.stop();
}
