//! The conntrack source against the real kernel, inside throwaway network
//! namespaces. Needs root, `ip`, `nft`, `python3` and `conntrack`; otherwise
//! the tests are skipped ([`common::skip`]), or fail under `CI`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowtel::flow::table::FlowTable;
use flowtel::flow::{Counters, Endpoint, FlowId, FlowUpdate, SourceEvent, Transport};
use flowtel::source::conntrack;
use flowtel::source::conntrack::{ConntrackConfig, ConntrackMode};
use flowtel::source::kernel::KernelStats;
use tokio::sync::mpsc;

/// A uniquely named network namespace, deleted on drop (also on panic).
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ctsrc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        // Any `ct` expression makes the kernel track this namespace.
        let rules = "table inet ctsrc {\n chain out {\n  type filter hook output priority 0\n  \
                     ct state established,related accept\n }\n}\n";
        ns.nft(rules);
        ns
    }

    /// Loads an nft ruleset into the namespace.
    fn nft(&self, rules: &str) {
        let mut nft = self
            .command("nft", &["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("spawn nft");
        nft.stdin
            .take()
            .expect("nft stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        assert!(nft.wait().expect("nft").success(), "nft failed");
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program, args).output().expect("run in netns");
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sysctl(&self, key: &str) -> String {
        self.run("sysctl", &["-n", key]).trim().to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().expect("spawn");
    assert!(status.success(), "{program} {args:?} failed");
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("flowtel=debug")
        .with_test_writer()
        .try_init();
}

fn skip_reason() -> Option<String> {
    init_logs();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    for tool in ["ip", "nft", "python3", "conntrack"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

/// A Python helper in the namespace that makes TCP/UDP traffic on command
/// and reports the ports it used, one JSON-ish line per command.
const TRAFFIC: &str = r#"
import socket, sys
keep = []
def tcp(fam, host, up, down, close):
    l = socket.socket(fam, socket.SOCK_STREAM); l.bind((host, 0)); l.listen()
    c = socket.socket(fam, socket.SOCK_STREAM); c.connect(l.getsockname()[:2]); s, _ = l.accept()
    c.sendall(b"x" * up); got = 0
    while got < up: got += len(s.recv(65536))
    s.sendall(b"y" * down); got = 0
    while got < down: got += len(c.recv(65536))
    cport, sport = c.getsockname()[1], l.getsockname()[1]
    if close:
        c.close(); s.recv(10); s.close(); l.close()
    else:
        keep.extend([l, c, s])
    return cport, sport
def udp(fam, host, up, down):
    a = socket.socket(fam, socket.SOCK_DGRAM); a.bind((host, 0))
    b = socket.socket(fam, socket.SOCK_DGRAM); b.bind((host, 0))
    b.sendto(b"u" * up, a.getsockname()[:2]); _, peer = a.recvfrom(65536)
    a.sendto(b"d" * down, peer); b.recv(65536)
    keep.extend([a, b])
    return b.getsockname()[1], a.getsockname()[1]
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "tcp4": r = tcp(socket.AF_INET, "127.0.0.1", int(cmd[1]), int(cmd[2]), cmd[3] == "close")
    elif cmd[0] == "tcp6": r = tcp(socket.AF_INET6, "::1", int(cmd[1]), int(cmd[2]), cmd[3] == "close")
    elif cmd[0] == "udp4": r = udp(socket.AF_INET, "127.0.0.1", int(cmd[1]), int(cmd[2]))
    else: break
    print(r[0], r[1], flush=True)
"#;

struct Traffic {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Traffic {
    fn start(ns: &Netns) -> Traffic {
        let mut child = ns
            .command("python3", &["-c", TRAFFIC])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Traffic {
            child,
            stdin,
            stdout,
        }
    }

    /// Runs one command; returns (client port, server port).
    fn go(&mut self, cmd: &str) -> (u16, u16) {
        writeln!(self.stdin, "{cmd}").expect("write command");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read ports");
        let mut it = line
            .split_whitespace()
            .map(|p| p.parse::<u16>().expect("port"));
        (
            it.next().expect("client port"),
            it.next().expect("server port"),
        )
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cfg(ns: &Netns, mode: ConntrackMode, events: bool) -> ConntrackConfig {
    ConntrackConfig {
        mode,
        netns: Some(ns.path()),
        events,
        enable_accounting: true,
        ..ConntrackConfig::default()
    }
}

/// Requests one dump and collects its flows.
fn dump(
    handle: &conntrack::ConntrackHandle,
    rx: &mut mpsc::Receiver<SourceEvent>,
    epoch: u64,
) -> (Vec<FlowUpdate>, Duration) {
    let t0 = Instant::now();
    assert!(handle.request_dump(epoch));
    let mut flows = Vec::new();
    let mut started = false;
    loop {
        match rx.blocking_recv().expect("channel open") {
            SourceEvent::DumpStarted { epoch: e } if e == epoch => started = true,
            SourceEvent::Flow(f) if started && !f.ended => flows.push(f),
            SourceEvent::DumpFinished { epoch: e, complete } if e == epoch => {
                assert!(complete, "dump {epoch} incomplete");
                return (flows, t0.elapsed());
            }
            _ => {}
        }
    }
}

fn find(flows: &[FlowUpdate], t: Transport, client_port: u16, server_port: u16) -> FlowUpdate {
    *flows
        .iter()
        .find(|f| {
            f.id.transport == t
                && f.id.client.port == client_port
                && f.id.server.port == server_port
        })
        .unwrap_or_else(|| panic!("no {t} flow {client_port}->{server_port} in {flows:#?}"))
}

/// L3 bytes of `payload` carried in `c.packets` packets with `min`..`max`
/// header bytes each.
fn assert_bytes(c: Counters, payload: u64, min: u64, max: u64, what: &str) {
    assert!((2..=12).contains(&c.packets), "{what}: {c:?}");
    let (lo, hi) = (payload + min * c.packets, payload + max * c.packets);
    assert!(
        (lo..=hi).contains(&c.bytes),
        "{what}: {c:?} not within {lo}..={hi}"
    );
}

fn ep(ip: &str, port: u16) -> Endpoint {
    Endpoint::new(ip.parse::<IpAddr>().expect("address"), port)
}

#[test]
fn conntrack_source_in_a_namespace() {
    if let Some(why) = skip_reason() {
        common::skip("conntrack_source_in_a_namespace", &why);
        return;
    }
    let ns = Netns::create();
    assert_eq!(ns.sysctl("net.netfilter.nf_conntrack_acct"), "0");
    // Short TIME_WAIT so a closed connection's entry is destroyed quickly.
    ns.run(
        "sysctl",
        &["-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1"],
    );

    let stats = Arc::new(KernelStats::default());
    let (tx, mut rx) = mpsc::channel(1024);
    let handle =
        conntrack::start(&cfg(&ns, ConntrackMode::Auto, true), stats.clone(), tx).expect("start");
    assert_eq!(handle.mode(), "netlink");
    assert_eq!(
        ns.sysctl("net.netfilter.nf_conntrack_acct"),
        "1",
        "source enables accounting"
    );
    assert!(stats.byte_counters_available.flag());

    // Live connections (made after accounting was turned on).
    let mut traffic = Traffic::start(&ns);
    let (c4, s4) = traffic.go("tcp4 1000 3000 keep");
    let (c6, s6) = traffic.go("tcp6 2000 5000 keep");
    let (cu, su) = traffic.go("udp4 100 200");
    // Hand-made entries: ICMP, ICMPv6 and a DNAT'ed one (Service VIP -> pod).
    for args in [
        "-I -p icmp -s 198.18.0.1 -d 198.18.0.2 --icmp-type 8 --icmp-code 0 --icmp-id 4711 -t 60",
        "-I -p icmpv6 -s fd00::1 -d fd00::2 --icmpv6-type 128 --icmpv6-code 0 --icmpv6-id 77 -t 60",
        "-I -p tcp -s 198.18.1.5 -d 198.19.0.10 --sport 40000 --dport 80 -r 198.18.2.7 -q 198.18.1.5 \
         --reply-port-src 8080 --reply-port-dst 40000 --state ESTABLISHED -t 100 -u SEEN_REPLY",
    ] {
        ns.run("conntrack", &args.split_whitespace().collect::<Vec<_>>());
    }

    let (flows, took) = dump(&handle, &mut rx, 1);
    println!("netlink dump: {} flows in {took:?}", flows.len());
    for f in &flows {
        println!("  {f:?}");
    }

    let t4 = find(&flows, Transport::Tcp, c4, s4);
    assert_eq!(t4.id.client, ep("127.0.0.1", c4));
    assert_eq!(t4.id.server, ep("127.0.0.1", s4));
    assert_ne!(t4.generation, 0, "CTA_ID is reported");
    assert_eq!(t4.nat, Default::default());
    // IPv4 TCP with timestamps: 52..60 header bytes per packet.
    assert_bytes(t4.to_server, 1000, 40, 80, "tcp4 to_server");
    assert_bytes(t4.to_client, 3000, 40, 80, "tcp4 to_client");

    let t6 = find(&flows, Transport::Tcp, c6, s6);
    assert_eq!(t6.id.client, ep("::1", c6));
    assert_bytes(t6.to_server, 2000, 60, 100, "tcp6 to_server");
    assert_bytes(t6.to_client, 5000, 60, 100, "tcp6 to_client");

    let u = find(&flows, Transport::Udp, cu, su);
    assert_eq!(u.to_server, Counters::new(100 + 28, 1));
    assert_eq!(u.to_client, Counters::new(200 + 28, 1));

    let icmp = find(&flows, Transport::Icmp, 4711, 0);
    assert_eq!(icmp.id.client, ep("198.18.0.1", 4711));
    assert_eq!(icmp.id.server, ep("198.18.0.2", 0));
    assert_eq!(icmp.nat, Default::default());
    let icmp6 = find(&flows, Transport::Icmpv6, 77, 0);
    assert_eq!(icmp6.id.server, ep("fd00::2", 0));
    let dnat = find(&flows, Transport::Tcp, 40000, 80);
    assert_eq!(dnat.nat.server, Some(ep("198.18.2.7", 8080)));
    assert_eq!(dnat.nat.client, None);
    assert_eq!(stats.parse_errors.get(), 0);
    assert_eq!(stats.dumps.get(), 1);

    // The same table through procfs (a second source, in the same namespace).
    let pstats = Arc::new(KernelStats::default());
    let (ptx, mut prx) = mpsc::channel(1024);
    let procfs = conntrack::start(&cfg(&ns, ConntrackMode::Procfs, true), pstats.clone(), ptx)
        .expect("start procfs");
    assert_eq!(procfs.mode(), "procfs");
    let (pflows, ptook) = dump(&procfs, &mut prx, 1);
    println!("procfs dump: {} flows in {ptook:?}", pflows.len());
    let t0 = Instant::now();
    procfs.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "procfs stop took {:?}",
        t0.elapsed()
    );
    assert_eq!(pflows.len(), flows.len());
    for f in &flows {
        let p = pflows
            .iter()
            .find(|p| p.id == f.id)
            .unwrap_or_else(|| panic!("procfs lacks {f:?}"));
        assert_eq!(
            (p.nat, p.to_server, p.to_client),
            (f.nat, f.to_server, f.to_client),
            "{f:?}"
        );
    }

    // A connection that opens and closes while the source runs: a NEW event,
    // then a DESTROY event with its final counters.
    let (cc, sc) = traffic.go("tcp4 4000 6000 close");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("rt");
    let deadline = Instant::now() + Duration::from_secs(30);
    let closed = Instant::now();
    let (mut new, mut destroy) = (None, None);
    let mut deleted = false;
    while destroy.is_none() {
        // The kernel reaps the TIME_WAIT entry on its own, but its garbage
        // collector may take up to a minute; after a few seconds delete the
        // entry, which sends the same DESTROY event with the final counters.
        if !deleted && closed.elapsed() > Duration::from_secs(5) {
            deleted = true;
            let (cc, sc) = (cc.to_string(), sc.to_string());
            let _ = ns
                .command(
                    "conntrack",
                    &["-D", "-p", "tcp", "--sport", &cc, "--dport", &sc],
                )
                .output();
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        assert!(
            Instant::now() < deadline,
            "no DESTROY event for {cc}->{sc} (NEW seen: {new:?})"
        );
        let ev = rt.block_on(async { tokio::time::timeout(left, rx.recv()).await });
        match ev {
            Ok(Some(SourceEvent::Flow(f))) if f.id.client.port == cc && f.id.server.port == sc => {
                if f.ended {
                    destroy = Some((f, Instant::now()));
                } else {
                    new = Some(f);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("channel closed"),
            Err(_) => {}
        }
    }
    let new = new.expect("NEW event");
    assert!(!new.ended);
    let (destroy, _) = destroy.expect("DESTROY event");
    println!(
        "NEW event: {new:?}\nDESTROY event ({}, {:?} after close): {destroy:?}",
        if deleted {
            "after conntrack -D"
        } else {
            "kernel expiry"
        },
        closed.elapsed()
    );
    // The same kernel ID; only the DESTROY carries the start time.
    assert_eq!(destroy.generation as u32, new.generation as u32);
    assert_eq!(new.generation >> 32, 0);
    assert_ne!(
        destroy.generation >> 32,
        0,
        "no start time in the DESTROY event"
    );
    assert_bytes(destroy.to_server, 4000, 40, 80, "destroyed to_server");
    assert_bytes(destroy.to_client, 6000, 40, 80, "destroyed to_client");

    let t0 = Instant::now();
    handle.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t0.elapsed()
    );
    println!("stats: {stats:?}");
}

#[test]
fn netns_errors_are_reported() {
    if let Some(why) = skip_reason() {
        common::skip("netns_errors_are_reported", &why);
        return;
    }
    let (tx, _rx) = mpsc::channel(16);
    let stats = Arc::new(KernelStats::default());
    let bad = ConntrackConfig {
        netns: Some(PathBuf::from("/nonexistent/netns")),
        ..ConntrackConfig::default()
    };
    let err = conntrack::start(&bad, stats.clone(), tx.clone())
        .err()
        .expect("fails");
    assert!(format!("{err:#}").contains("/nonexistent/netns"), "{err:#}");
    let not_ns = ConntrackConfig {
        netns: Some(PathBuf::from("/proc/self/status")),
        ..ConntrackConfig::default()
    };
    let err = conntrack::start(&not_ns, stats, tx).err().expect("fails");
    assert!(
        format!("{err:#}").contains("not a network namespace"),
        "{err:#}"
    );
}

/// Set in the child process of `auto_falls_back_without_cap_net_admin`.
const CHILD_NETNS: &str = "FLOWTEL_CT_TEST_CHILD_NETNS";

#[test]
fn auto_falls_back_without_cap_net_admin() {
    if let Some(why) = skip_reason() {
        common::skip("auto_falls_back_without_cap_net_admin", &why);
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        common::skip(
            "auto_falls_back_without_cap_net_admin",
            "`setpriv` is not installed",
        );
        return;
    }
    let ns = Netns::create();
    ns.run("sysctl", &["-qw", "net.netfilter.nf_conntrack_acct=1"]);
    ns.run(
        "conntrack",
        &"-I -p udp -s 198.18.3.1 -d 198.18.3.2 --sport 5000 --dport 53 -t 60"
            .split_whitespace()
            .collect::<Vec<_>>(),
    );
    // Re-run this test binary without CAP_NET_ADMIN, to run `fallback_child`.
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-net_admin",
            "--inh-caps",
            "-net_admin",
            "--",
        ])
        .arg(exe)
        .args([
            "--exact",
            "fallback_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_NETNS, ns.path())
        .output()
        .expect("run child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "child failed");
    assert!(text.contains("child: fallback ok"), "child did not run");
}

#[test]
fn fallback_child() {
    let Some(path) = std::env::var_os(CHILD_NETNS) else {
        return;
    };
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let ns_cfg = |mode| ConntrackConfig {
        mode,
        netns: Some(PathBuf::from(&path)),
        events: true,
        ..ConntrackConfig::default()
    };
    let stats = Arc::new(KernelStats::default());
    let (tx, mut rx) = mpsc::channel(64);
    let err = conntrack::start(&ns_cfg(ConntrackMode::Netlink), stats.clone(), tx.clone())
        .err()
        .expect("netlink mode must not fall back");
    println!("child: netlink mode error: {err:#}");
    assert!(format!("{err:#}").contains("CAP_NET_ADMIN"), "{err:#}");
    let handle = conntrack::start(&ns_cfg(ConntrackMode::Auto), stats, tx).expect("auto starts");
    assert_eq!(handle.mode(), "procfs");
    let (flows, _) = dump(&handle, &mut rx, 9);
    handle.stop();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0].id.client, ep("198.18.3.1", 5000));
    assert_eq!(flows[0].id.server, ep("198.18.3.2", 53));
    println!("child: fallback ok");
}

#[test]
fn event_overruns_are_counted_and_reading_goes_on() {
    if let Some(why) = skip_reason() {
        common::skip("event_overruns_are_counted_and_reading_goes_on", &why);
        return;
    }
    let ns = Netns::create();
    let stats = Arc::new(KernelStats::default());
    // A tiny channel nobody reads: the event thread stalls, the socket
    // buffer (the 64 KiB minimum) fills and the kernel reports ENOBUFS.
    let (tx, mut rx) = mpsc::channel(16);
    let cfg = ConntrackConfig {
        event_buffer_bytes: 65_536,
        ..cfg(&ns, ConntrackMode::Netlink, true)
    };
    let handle = conntrack::start(&cfg, stats.clone(), tx).expect("start");
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let lines: String = (0..5000)
        .map(|i| {
            format!(
                "-I -p udp -s 198.18.{}.{} -d 198.19.0.1 --sport 4000 --dport 53 -t 60\n",
                i / 250,
                i % 250 + 1
            )
        })
        .collect();
    std::fs::write(file.path(), lines).expect("write entries");
    let path = file.path().to_string_lossy().into_owned();
    ns.run("conntrack", &["-R", &path]);
    // Drain what got through until the socket is empty (while it holds
    // anything the kernel keeps it marked congested and drops new events).
    let mut received = 0;
    let mut idle_since = Instant::now();
    while idle_since.elapsed() < Duration::from_millis(500) {
        match rx.try_recv() {
            Ok(_) => {
                received += 1;
                idle_since = Instant::now();
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let lost = stats.events_lost.get();
    println!("5000 NEW events: {received} received, {lost} overruns counted");
    assert!(lost > 0, "expected ENOBUFS overruns");
    ns.run(
        "conntrack",
        &"-I -p tcp -s 198.18.200.1 -d 198.19.0.1 --sport 1 --dport 2 --state ESTABLISHED -t 60"
            .split_whitespace()
            .collect::<Vec<_>>(),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match rx.try_recv() {
            Ok(SourceEvent::Flow(f)) if f.id.transport == Transport::Tcp => break,
            Ok(_) => received += 1,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!(
                "no event after the overrun: {e} (received {received}, lost {})",
                stats.events_lost.get()
            ),
        }
    }
    let t0 = Instant::now();
    handle.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t0.elapsed()
    );
}

#[test]
fn accounting_left_off_is_reported() {
    if let Some(why) = skip_reason() {
        common::skip("accounting_left_off_is_reported", &why);
        return;
    }
    let ns = Netns::create();
    let stats = Arc::new(KernelStats::default());
    stats.byte_counters_available.set_flag(true);
    let (tx, _rx) = mpsc::channel(16);
    let cfg = ConntrackConfig {
        enable_accounting: false,
        ..cfg(&ns, ConntrackMode::Auto, false)
    };
    let handle = conntrack::start(&cfg, stats.clone(), tx).expect("start");
    assert!(!stats.byte_counters_available.flag());
    assert_eq!(ns.sysctl("net.netfilter.nf_conntrack_acct"), "0");
    handle.stop();
}

#[test]
fn procfs_file_source_counts_errors() {
    init_logs();
    if !std::path::Path::new("/proc/sys/net/netfilter/nf_conntrack_acct").exists() {
        common::skip(
            "procfs_file_source_counts_errors",
            "nf_conntrack is not loaded (`modprobe nf_conntrack`)",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let table = dir.path().join("nf_conntrack");
    std::fs::write(
        &table,
        "ipv4     2 tcp      6 300 ESTABLISHED src=198.18.10.1 dst=198.18.10.2 sport=40000 dport=443 \
         packets=5 bytes=600 src=198.18.10.2 dst=198.18.10.1 sport=443 dport=40000 packets=4 bytes=4000 \
         [ASSURED] mark=0 zone=0 use=2\n\
         not a conntrack line\n\
         ipv6     10 udp      17 20 src=fd00:0000:0000:0000:0000:0000:0000:0001 \
         dst=fd00:0000:0000:0000:0000:0000:0000:0035 sport=5353 dport=53 [UNREPLIED] \
         src=fd00:0000:0000:0000:0000:0000:0000:0035 dst=fd00:0000:0000:0000:0000:0000:0000:0001 \
         sport=53 dport=5353 mark=0 zone=0 use=2\n",
    )
    .expect("write table");
    let stats = Arc::new(KernelStats::default());
    let (tx, mut rx) = mpsc::channel(16);
    let cfg = ConntrackConfig {
        mode: ConntrackMode::Procfs,
        // Never touch the host's sysctl from a test.
        enable_accounting: false,
        proc_path: table.clone(),
        ..ConntrackConfig::default()
    };
    let handle = conntrack::start(&cfg, stats.clone(), tx).expect("start");
    assert_eq!(handle.mode(), "procfs");
    let (flows, _) = dump(&handle, &mut rx, 1);
    assert_eq!(flows.len(), 2);
    assert_eq!(flows[0].to_client, Counters::new(4000, 4));
    assert_eq!(flows[1].id.server, ep("fd00::35", 53));
    assert_eq!(stats.parse_errors.get(), 1);
    assert_eq!(stats.dumps.get(), 1);
    // A table that cannot be read gives an incomplete dump, not a stop.
    std::fs::remove_file(&table).expect("remove");
    assert!(handle.request_dump(2));
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(rx.blocking_recv().expect("event"));
    }
    assert_eq!(
        got,
        vec![
            SourceEvent::DumpStarted { epoch: 2 },
            SourceEvent::DumpFinished {
                epoch: 2,
                complete: false
            }
        ]
    );
    assert_eq!(stats.dump_errors.get(), 1);
    handle.stop();
}

/// Reconnects from 50 fixed ports to a server that closes first: each new
/// SYN reopens the tuple's TIME_WAIT entry, and the kernel often gives the
/// new connection the ID of the one before it. With dumps racing the
/// events (one after another), the flow table still counts every packet
/// once: its totals equal nft's counters of the same packets in both
/// directions.
#[test]
fn reconnects_on_reused_tuples_are_counted_once() {
    if let Some(why) = skip_reason() {
        common::skip("reconnects_on_reused_tuples_are_counted_once", &why);
        return;
    }
    let run = reconnect(true);
    assert!(
        run.reused_ids > 0,
        "no kernel ID was reused: the hazard was not exercised"
    );
    assert_eq!(run.id_reused, 0);
    assert_eq!(run.counted, run.truth);
}

/// Without conntrack's start times the same reconnects cannot be told from
/// stale reports of the connection before them: what is missed is said, in
/// `flowtel.flows.id_reused`, and nothing is counted twice.
#[test]
fn reused_ids_without_start_times_are_counted_as_such() {
    if let Some(why) = skip_reason() {
        common::skip("reused_ids_without_start_times_are_counted_as_such", &why);
        return;
    }
    let run = reconnect(false);
    assert!(run.id_reused > 0, "flows.id_reused stayed 0");
    let ((c2s, s2c), (truth_c2s, truth_s2c)) = (run.counted, run.truth);
    assert!(
        c2s.packets < truth_c2s.packets && s2c.packets < truth_s2c.packets,
        "expected fewer packets than nft counted"
    );
}

/// What one reconnect run counted, against nft's counters.
struct ReconnectRun {
    counted: (Counters, Counters),
    truth: (Counters, Counters),
    /// NEW events (no start time) with the tuple's previous kernel ID.
    reused_ids: usize,
    /// `flowtel.flows.id_reused`.
    id_reused: u64,
}

/// 4,000 reconnects from 50 fixed ports, read with conntrack start times
/// on or off, replayed through a flow table.
fn reconnect(enable_timestamps: bool) -> ReconnectRun {
    const CONNECTIONS: usize = 4_000;
    let ns = Netns::create();
    let rules = "table inet truth {\n chain out {\n  type filter hook output priority 10\n  \
                 tcp dport 9000 counter\n  tcp sport 9000 counter\n }\n}\n";
    ns.nft(rules);

    let stats = Arc::new(KernelStats::default());
    let (tx, mut rx) = mpsc::channel(1 << 16);
    let cfg = ConntrackConfig {
        enable_timestamps,
        ..cfg(&ns, ConntrackMode::Netlink, true)
    };
    let handle = conntrack::start(&cfg, stats.clone(), tx).expect("start");
    assert_eq!(
        ns.sysctl("net.netfilter.nf_conntrack_timestamp"),
        if enable_timestamps { "1" } else { "0" }
    );
    let script = format!(
        r#"
import socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 9000)); l.listen(512)
def serve():
    while True:
        c, _ = l.accept(); c.recv(100); c.sendall(b"s" * 200); c.shutdown(socket.SHUT_WR); c.recv(10); c.close()
threading.Thread(target=serve, daemon=True).start()
for i in range({CONNECTIONS}):
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("127.0.0.1", 41000 + i % 50)); c.connect(("127.0.0.1", 9000)); c.sendall(b"c" * 100)
    while c.recv(1000): pass
    c.close()
print("done", flush=True)
"#
    );
    let mut client = ns
        .command("python3", &["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let telemetry = flowtel::telemetry::Telemetry::default();
    let mut replay = Replay {
        table: FlowTable::new(1 << 16, &telemetry),
        c2s: Counters::default(),
        s2c: Counters::default(),
        last_destroyed: HashMap::new(),
        reused_ids: 0,
    };
    let mut epoch = 0;
    while client.try_wait().expect("python3").is_none() {
        epoch += 1;
        replay.dump(&handle, &mut rx, epoch);
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut client.stdout.take().expect("stdout"), &mut out)
        .expect("read python3");
    assert_eq!(out.trim(), "done", "the client did not finish");
    // Every event has arrived once a NEW made now comes through; then one
    // more dump brings the entries still in TIME_WAIT up to date.
    ns.run(
        "conntrack",
        &"-I -p tcp -s 198.18.200.1 -d 198.19.0.1 --sport 1 --dport 2 --state ESTABLISHED -t 60"
            .split_whitespace()
            .collect::<Vec<_>>(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.try_recv() {
            Ok(SourceEvent::Flow(f)) if f.id.server.port == 2 => break,
            Ok(event) => replay.apply(event),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("the marker event did not arrive: {e}"),
        }
    }
    replay.dump(&handle, &mut rx, epoch + 1);
    handle.stop();
    let Replay {
        c2s,
        s2c,
        reused_ids,
        ..
    } = replay;

    let listing = ns.run("nft", &["list", "table", "inet", "truth"]);
    let counters: Vec<Counters> = listing
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "packets")?;
            Some(Counters::new(
                words.get(at + 3)?.parse().ok()?,
                words.get(at + 1)?.parse().ok()?,
            ))
        })
        .collect();
    let [truth_c2s, truth_s2c] = counters[..] else {
        panic!("expected two nft counters, got {listing}");
    };
    let id_reused = telemetry.value(&flowtel::telemetry::catalogue::FLOWS_ID_REUSED);
    println!(
        "start times {enable_timestamps}: {CONNECTIONS} connections from 50 ports, {reused_ids} \
         NEW events with the ID of the tuple's previous connection, flows.id_reused {id_reused}, \
         events lost {}; flow table c2s {c2s:?} s2c {s2c:?}, nft c2s {truth_c2s:?} s2c {truth_s2c:?}",
        stats.events_lost.get()
    );
    assert_eq!(
        stats.events_lost.get(),
        0,
        "events were lost: the count cannot be exact"
    );
    ReconnectRun {
        counted: (c2s, s2c),
        truth: (truth_c2s, truth_s2c),
        reused_ids,
        id_reused,
    }
}

/// The flow table fed with one port's events and dumps, as the flow stage
/// feeds it, and what the events show of the kernel's reused IDs.
struct Replay {
    table: FlowTable,
    c2s: Counters,
    s2c: Counters,
    /// The kernel ID of each tuple's last DESTROY.
    last_destroyed: HashMap<FlowId, u32>,
    /// NEW events (the reports without counters) with the ID of the
    /// tuple's previous connection.
    reused_ids: usize,
}

impl Replay {
    fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Flow(u) if u.id.server.port == 9000 => {
                let id = u.generation as u32;
                if u.ended {
                    self.last_destroyed.insert(u.id, id);
                } else if u.to_server.is_zero()
                    && u.to_client.is_zero()
                    && self.last_destroyed.get(&u.id) == Some(&id)
                {
                    self.reused_ids += 1;
                }
                if let Some(d) = self.table.apply(u, |_, _, _| None) {
                    self.c2s.add(d.delta.to_server);
                    self.s2c.add(d.delta.to_client);
                }
            }
            SourceEvent::DumpStarted { epoch } => self.table.dump_started(epoch),
            SourceEvent::DumpFinished { epoch, complete } => {
                self.table.dump_finished(epoch, complete)
            }
            _ => {}
        }
    }

    /// Requests dump `epoch` and applies everything up to its end.
    fn dump(
        &mut self,
        handle: &conntrack::ConntrackHandle,
        rx: &mut mpsc::Receiver<SourceEvent>,
        epoch: u64,
    ) {
        assert!(handle.request_dump(epoch), "the source stopped");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rx.try_recv() {
                Ok(SourceEvent::DumpFinished { epoch: e, complete }) if e == epoch => {
                    assert!(complete, "dump {epoch} was incomplete");
                    self.apply(SourceEvent::DumpFinished { epoch: e, complete });
                    return;
                }
                Ok(event) => self.apply(event),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("dump {epoch} did not finish: {e}"),
            }
        }
    }
}
