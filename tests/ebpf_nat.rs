//! The eBPF source on a router that DNATs a Service VIP, as kube-proxy does
//! in a node's namespace: each connection must be reported once, as the
//! client dialled it, with the backend in `flowtel.nat.server.*`.
//!
//! Three namespaces: client A — router R — server B, joined by two veth
//! pairs. R forwards, tracks connections and DNATs VIP:80 to B:8080 in its
//! prerouting chain. flowtel runs with `source: ebpf` in R (`--netns`), so
//! its programs sit on both of R's veths: the client side sees A → VIP:80,
//! the server side A → B:8080. One known TCP transfer A → VIP crosses,
//! open for several intervals.
//!
//! Asserted from what the test-side OTLP receiver got:
//! * with `ebpf.nat: auto` (the default), exactly one series per direction,
//!   with `server.address` VIP, `server.port` 80 and
//!   `flowtel.nat.server.address`/`port` B:8080, and bytes per direction
//!   equal to R's veth counters (L3: minus 14 B a packet) within 1 %:
//!   counted once, not twice;
//! * with `ebpf.nat: off`, the same traffic gives two series (the VIP and
//!   the backend), each carrying the whole transfer: the double count the
//!   translation removes, which shows this test can fail;
//! * the closed connection expires, and afterwards the kernel flow map is
//!   empty (`flowtel.ebpf.map.entries` 0): expiry deleted the keys of both
//!   tuples of the folded connection.
//!
//! Needs root, `ip`, `nft` and a flowtel built with eBPF support; otherwise
//! the tests are skipped ([`common::skip`]), or fail under `CI`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs};
use common::netns::IfStats;
use common::otlp_receiver::{show, AttrValue, Attrs, OtlpReceiver};
use common::router::{RouterLab, A_V4, BACKEND_PORT, B_V4, IF_RA, IF_RB, VIP, VIP_PORT};
use common::scenario::{Series, BYTES, C2S, DIRECTION, PACKETS, S2C};
use common::traffic::{self, TrafficServer};
use common::{deviation_pct, within};

const UP: u64 = 32 << 20;
const DOWN: u64 = 16 << 20;
/// The upload goes in parts over about 3 s, so several dumps (and
/// conntrack dumps) see the connection running.
const PIECES: u64 = 8;
const PAUSE: Duration = Duration::from_millis(400);
const INTERVAL: &str = "1s";
const TOLERANCE: f64 = 0.01;

const STABLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A closed TCP connection expires after 5 s of quiet, at the next dump.
const EXPIRY_TIMEOUT: Duration = Duration::from_secs(30);

/// Both tests count on the same two CPUs; one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("literal address"), port)
}

#[test]
fn dnat_on_the_router_is_reported_once_with_the_backend() {
    let Some(run) = Run::new("dnat_on_the_router_is_reported_once_with_the_backend", None) else {
        return;
    };
    let outcome = run.transfer();
    let connections = outcome.connections();
    println!(
        "{}: nat auto: {} series (without direction), expected 1",
        run.test,
        connections.len()
    );
    assert_eq!(
        connections.len(),
        1,
        "{}: expected exactly one series per direction for the connection, got:\n{}",
        run.test,
        outcome.series.describe()
    );
    let want = |direction: &str| {
        let s = |v: &str| AttrValue::Str(v.to_string());
        let mut a = Attrs::new();
        a.insert("client.address".into(), s(A_V4));
        a.insert("server.address".into(), s(VIP));
        a.insert("server.port".into(), AttrValue::Int(VIP_PORT.into()));
        a.insert("network.transport".into(), s("tcp"));
        a.insert("network.type".into(), s("ipv4"));
        a.insert("flowtel.source".into(), s("ebpf"));
        a.insert("flowtel.nat.server.address".into(), s(B_V4));
        a.insert(
            "flowtel.nat.server.port".into(),
            AttrValue::Int(BACKEND_PORT.into()),
        );
        a.insert(DIRECTION.into(), s(direction));
        a
    };
    for (direction, truth) in [(C2S, outcome.c2s_truth()), (S2C, outcome.s2c_truth())] {
        let attrs = want(direction);
        let got = outcome.value(BYTES, &attrs).unwrap_or_else(|| {
            panic!(
                "{}: no {BYTES} series {}\nseries:\n{}",
                run.test,
                show(&attrs),
                outcome.series.describe()
            )
        });
        let packets = outcome.value(PACKETS, &attrs).unwrap_or(0);
        println!(
            "{}: nat auto: {direction}: expected (R's veths, L3) {} / {} B, reported {got} B \
             in {packets} pkts ({:+.3} %)",
            run.test,
            truth.0,
            truth.1,
            deviation_pct(got, truth.0)
        );
        for t in [truth.0, truth.1] {
            assert!(
                within(got, t, TOLERANCE),
                "{}: {direction}: expected {t} B (R's veth counters) ±1 %, flowtel reported \
                 {got} ({:+.3} %): counted {}\nseries:\n{}",
                run.test,
                deviation_pct(got, t),
                if got > t { "more than once" } else { "short" },
                outcome.series.describe()
            );
        }
    }
    assert!(
        outcome
            .log
            .contains("conntrack reader for NAT translations started")
            && !outcome.log.contains("translations are unavailable"),
        "{}: expected the NAT reader to start without a warning; flowtel's log:\n{}",
        run.test,
        outcome.log
    );
    println!("{}: passed in {:?}", run.test, run.t0.elapsed());
}

#[test]
fn without_translations_each_side_is_its_own_series() {
    let Some(run) = Run::new(
        "without_translations_each_side_is_its_own_series",
        Some("off"),
    ) else {
        return;
    };
    let outcome = run.transfer();
    let connections = outcome.connections();
    println!(
        "{}: nat off: {} series (without direction), expected 2",
        run.test,
        connections.len()
    );
    assert_eq!(
        connections.len(),
        2,
        "{}: with ebpf.nat: off the VIP side and the backend side should be separate series, \
         got:\n{}",
        run.test,
        outcome.series.describe()
    );
    let servers: Vec<(String, String)> = connections
        .iter()
        .map(|a| {
            let get = |k: &str| a.get(k).map(ToString::to_string).unwrap_or_default();
            (get("server.address"), get("server.port"))
        })
        .collect();
    let expected = [
        (format!("{VIP:?}"), VIP_PORT.to_string()),
        (format!("{B_V4:?}"), BACKEND_PORT.to_string()),
    ];
    for e in &expected {
        assert!(
            servers.contains(e),
            "{}: expected a series to {e:?}; got {servers:?}",
            run.test
        );
    }
    assert!(
        connections
            .iter()
            .all(|a| !a.contains_key("flowtel.nat.server.address")),
        "{}: with ebpf.nat: off no series may carry a translation:\n{}",
        run.test,
        outcome.series.describe()
    );
    for (direction, truth) in [(C2S, outcome.c2s_truth()), (S2C, outcome.s2c_truth())] {
        let mut total = 0;
        for c in &connections {
            let mut attrs = c.clone();
            attrs.insert(DIRECTION.into(), AttrValue::Str(direction.into()));
            let got = outcome.value(BYTES, &attrs).unwrap_or(0);
            println!(
                "{}: nat off: {direction} {}: expected (R's veths, L3) {} B, reported {got} B \
                 ({:+.3} %)",
                run.test,
                show(c),
                truth.0,
                deviation_pct(got, truth.0)
            );
            assert!(
                within(got, truth.0, TOLERANCE),
                "{}: {direction} {}: each side alone carries the whole transfer ({} B), got {got}",
                run.test,
                show(c),
                truth.0
            );
            total += got;
        }
        println!(
            "{}: nat off: {direction}: sum over the series {total} B = {:.3} × the veth counters",
            run.test,
            total as f64 / truth.0 as f64
        );
    }
    assert!(
        !outcome
            .log
            .contains("conntrack reader for NAT translations started"),
        "{}: ebpf.nat: off must not read conntrack; flowtel's log:\n{}",
        run.test,
        outcome.log
    );
    println!("{}: passed in {:?}", run.test, run.t0.elapsed());
}

/// One test's namespaces, receiver and settings.
struct Run {
    test: &'static str,
    t0: Instant,
    nat: Option<&'static str>,
    lab: RouterLab,
    // Released after the namespaces are gone.
    _serial: MutexGuard<'static, ()>,
}

/// What one transfer produced.
struct Outcome {
    series: Series,
    /// R's veth counters over the transfer: towards A, towards B.
    ra: IfStats,
    rb: IfStats,
    log: String,
}

impl Outcome {
    /// Client-to-server L3 bytes: in from A, and out to B.
    fn c2s_truth(&self) -> (u64, u64) {
        (self.ra.rx_l3_bytes(), self.rb.tx_l3_bytes())
    }

    /// Server-to-client L3 bytes: in from B, and out to A.
    fn s2c_truth(&self) -> (u64, u64) {
        (self.rb.rx_l3_bytes(), self.ra.tx_l3_bytes())
    }

    /// The distinct connections reported: attribute sets without the
    /// direction.
    fn connections(&self) -> Vec<Attrs> {
        let mut out: Vec<Attrs> = Vec::new();
        for attrs in self.series.bytes.keys() {
            let mut a = attrs.clone();
            a.remove(DIRECTION);
            if !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    fn value(&self, metric: &str, attrs: &Attrs) -> Option<u64> {
        let map = if metric == BYTES {
            &self.series.bytes
        } else {
            &self.series.packets
        };
        map.get(attrs).map(|p| p.value)
    }
}

impl Run {
    fn new(test: &'static str, nat: Option<&'static str>) -> Option<Run> {
        let tools = common::prerequisites(test, false)?;
        if !flowtel::source::ebpf::built_with_ebpf()
            || !Path::new("/sys/kernel/btf/vmlinux").exists()
        {
            common::skip(
                test,
                "flowtel was built without eBPF support, or the kernel has no BTF",
            );
            return None;
        }
        let serial = serial();
        let t0 = Instant::now();
        let lab = RouterLab::new(&tools).expect("setting up A — R — B");
        Some(Run {
            test,
            t0,
            nat,
            lab,
            _serial: serial,
        })
    }

    /// Starts flowtel in R, makes the transfer, waits until the numbers
    /// are exported and the connection expired, and stops flowtel.
    fn transfer(&self) -> Outcome {
        let test = self.test;
        let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
        let endpoint = receiver.grpc_endpoint();
        let netns = self.lab.r.path();
        let mut env = Vec::new();
        if let Some(mode) = self.nat {
            env.push(("FLOWTEL_EBPF__NAT", mode.to_string()));
        }
        let mut ft = Flowtel::start(&FlowtelArgs {
            source: "ebpf",
            netns: &netns,
            endpoint: &endpoint,
            protocol: "grpc",
            interval: INTERVAL,
            env,
        })
        .expect("starting flowtel");
        ft.wait_ready(Duration::from_secs(30))
            .expect("flowtel becomes ready");
        let server = TrafficServer::start(&self.lab.b, &[sock(B_V4, BACKEND_PORT)], &[])
            .expect("starting the server in B");
        let ra0 = self.lab.r.if_stats(IF_RA).expect("R's veth counters");
        let rb0 = self.lab.r.if_stats(IF_RB).expect("R's veth counters");
        let payload = traffic::tcp_paced(&self.lab.a, sock(VIP, VIP_PORT), UP, DOWN, PIECES, PAUSE)
            .expect("the transfer A -> VIP");
        let errors = server.errors();
        drop(server);
        assert!(
            errors.is_empty(),
            "{test}: the server in B failed: {errors:?}"
        );
        let ra = self
            .lab
            .r
            .if_stats(IF_RA)
            .expect("R's veth counters")
            .since(&ra0);
        let rb = self
            .lab
            .r
            .if_stats(IF_RB)
            .expect("R's veth counters")
            .since(&rb0);
        println!(
            "{test}: {:.1}s: sent {payload:?} A -> {VIP}:{VIP_PORT}; R {IF_RA}: {ra:?}; \
             R {IF_RB}: {rb:?}",
            self.t0.elapsed().as_secs_f64()
        );
        let series = common::scenario::wait_exported("receiver", &ft, STABLE_TIMEOUT, || {
            Series::from_points(&receiver.sum_points(0))
        });
        println!("{test}: series:\n{}", series.describe());
        self.wait_expired(&receiver, &ft);
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
        Outcome {
            series,
            ra,
            rb,
            log: ft.output(),
        }
    }

    /// Waits until every connection of the transfer expired and the kernel
    /// map is empty: expiry must delete the keys of both tuples.
    fn wait_expired(&self, receiver: &OtlpReceiver, ft: &Flowtel) {
        let expected = if self.nat == Some("off") { 2 } else { 1 };
        let expired = || {
            let sums = common::otlp_receiver::latest(
                &receiver.sum_points(0),
                "flowtel.ebpf.flows.expired",
            );
            sums.values().map(|p| p.value).max().unwrap_or(0)
        };
        let entries = || {
            receiver
                .gauge_values("flowtel.ebpf.map.entries", 0)
                .last()
                .copied()
        };
        let done = common::wait_until(EXPIRY_TIMEOUT, Duration::from_millis(250), || {
            expired() >= expected && entries() == Some(0)
        });
        let (e, n) = (expired(), entries());
        println!(
            "{}: {:.1}s: connections expired {e} (expected {expected}), kernel map entries {n:?}",
            self.test,
            self.t0.elapsed().as_secs_f64()
        );
        assert!(
            done,
            "{}: expected {expected} expired connection(s) and an empty kernel map within \
             {EXPIRY_TIMEOUT:?}; got {e} expired and {n:?} entries\n{}",
            self.test,
            ft.output()
        );
    }
}
