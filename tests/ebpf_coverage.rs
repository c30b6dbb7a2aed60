//! The coverage self-check against its real failure mode: another TCX
//! program on the same hook, ahead of flowtel, drops a known share of the
//! packets (as Cilium's programs do to traffic they redirect or deny).
//!
//! The "other vendor's program" is `bpf/foreign_drop.bpf.c`: it drops every
//! fourth IPv4 UDP packet at A's veth ingress. B sends 4,000 UDP datagrams
//! to A. The veth's receive counters count every datagram (veth counts
//! them as the peer transmits, before TC ingress runs).
//!
//! * `attach_position: last`: flowtel runs after the foreign program and
//!   counts three quarters. Its coverage (`flowtel.ebpf.interface.bytes`,
//!   flowtel over kernel, ingress) must be the share let through, 0.75,
//!   within 1 %.
//! * `attach_position: first`: flowtel runs before it and counts every
//!   packet: coverage 1, and the flow's bytes match the veth's within 1 %.
//!
//! Needs root, `ip`, `nft`, and a kernel with TCX (6.6+); skipped (failing
//! under `CI`) otherwise.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use common::scenario::{Lab, A_V4, B_V4, IF_A};
use common::{deviation_pct, Prerequisites};
use flowtel::flow::{Endpoint, FlowUpdate, SourceEvent};
use flowtel::source::ebpf::{self, AttachMode, AttachPosition, EbpfConfig, EbpfHandle};
use flowtel::source::kernel::KernelStats;
use tokio::sync::mpsc;

/// The foreign program, built by build.rs next to flowtel's own.
static FOREIGN: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/foreign_drop.bpf.o"));

const DATAGRAMS: u64 = 4_000;
const PAYLOAD: usize = 1_000;
const PORT: u16 = 7100;

fn prerequisites(test: &str) -> Option<Prerequisites> {
    let (base, _) = common::prerequisites_with(test, &[], &common::ebpf_conditions())?;
    Some(base)
}

/// The foreign program attached at A's ingress (TCX, in A), and its map.
struct Foreign {
    bpf: aya::Ebpf,
}

impl Foreign {
    /// (UDP packets seen, dropped).
    fn counts(&self) -> (u64, u64) {
        let map = self.bpf.map("counts").expect("map counts");
        let arr: aya::maps::Array<_, u64> = aya::maps::Array::try_from(map).expect("an array");
        (
            arr.get(&0, 0).expect("seen"),
            arr.get(&1, 0).expect("dropped"),
        )
    }
}

fn attach_foreign(lab: &Lab) -> Foreign {
    lab.a
        .in_ns(|| {
            let mut bpf = aya::Ebpf::load(FOREIGN).expect("loading the foreign program");
            let prog: &mut SchedClassifier = bpf
                .program_mut("foreign_drop")
                .expect("program")
                .try_into()
                .expect("a classifier");
            prog.load().expect("the foreign program loads");
            prog.attach_with_options(
                IF_A,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .expect("TCX attach of the foreign program (kernel 6.6+)");
            Foreign { bpf }
        })
        .expect("entering A")
}

/// Requests a dump and collects its flows.
fn dump(handle: &EbpfHandle, rx: &mut mpsc::Receiver<SourceEvent>, epoch: u64) -> Vec<FlowUpdate> {
    assert!(handle.request_dump(epoch), "the source stopped");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut flows, mut started) = (Vec::new(), false);
    loop {
        match rx.try_recv() {
            Ok(SourceEvent::DumpStarted { epoch: e }) => started |= e == epoch,
            Ok(SourceEvent::Flow(f)) if started => flows.push(f),
            Ok(SourceEvent::DumpFinished { epoch: e, complete }) if e == epoch => {
                assert!(complete, "the dump was incomplete");
                return flows;
            }
            Ok(_) => {}
            Err(mpsc::error::TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no dump within 30 s");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(mpsc::error::TryRecvError::Disconnected) => panic!("the source went away"),
        }
    }
}

/// What one run measured.
struct Run {
    /// flowtel's ingress bytes over the interface's, from the self-metric.
    coverage: f64,
    /// The UDP flow's client-to-server bytes, as flowtel reported them.
    flow_bytes: u64,
    /// A's veth: L3 bytes received.
    veth_l3: u64,
    /// UDP packets the foreign program dropped.
    dropped: u64,
}

fn run(position: AttachPosition, test: &str) -> Option<Run> {
    let tools = prerequisites(test)?;
    let lab = Lab::new(&tools).expect("namespaces A and B");
    // Ahead of flowtel's links from the start, as Cilium's would be.
    let foreign = attach_foreign(&lab);
    let cfg = EbpfConfig {
        interfaces_include: vec![IF_A.into()],
        netns: Some(lab.a.path()),
        attach: AttachMode::Tcx,
        attach_position: position,
        idle_timeout: Some(Duration::from_secs(3600)),
        ..EbpfConfig::default()
    };
    let (tx, mut rx) = mpsc::channel(65_536);
    let handle = ebpf::start(&cfg, Arc::new(KernelStats::default()), tx)
        .unwrap_or_else(|e| panic!("starting the eBPF source: {e:#}"));
    // The first dump sets the interface counters' baseline.
    dump(&handle, &mut rx, 1);
    let before = lab.counters().expect("A's counters");

    let (a, b): (IpAddr, IpAddr) = (
        A_V4.parse().expect("address"),
        B_V4.parse().expect("address"),
    );
    // Bound so that A answers no "port unreachable"; never read (what
    // overflows its buffer is dropped after TC, where nobody looks).
    let _receiver = lab
        .a
        .in_ns(|| UdpSocket::bind(SocketAddr::new(a, PORT)).expect("bind in A"))
        .expect("entering A");
    let sender = lab
        .b
        .in_ns(|| UdpSocket::bind(SocketAddr::new(b, 0)).expect("bind in B"))
        .expect("entering B");
    for _ in 0..DATAGRAMS {
        sender
            .send_to(&[7u8; PAYLOAD], SocketAddr::new(a, PORT))
            .expect("send");
    }
    // Synchronise on the foreign program's own counter: once it has seen
    // every datagram, TC ingress has run for all of them. (With flowtel
    // last, the final datagram may reach flowtel after the dump's flip:
    // one datagram, 0.03 % of the total.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while foreign.counts().0 < DATAGRAMS {
        assert!(
            Instant::now() < deadline,
            "the datagrams never reached A's ingress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Every datagram passed the foreign program (and, at its side, flowtel).
    let (seen, dropped) = foreign.counts();
    assert_eq!(seen, DATAGRAMS, "the foreign program saw every datagram");
    let flows = dump(&handle, &mut rx, 2);
    let veth = lab.counters().expect("A's counters").since(&before);
    let stats = handle.stats();
    let kernel = stats.interface_bytes_kernel[0].load(Ordering::Relaxed);
    let counted = stats.interface_bytes_counted[0].load(Ordering::Relaxed);
    let server = Endpoint::new(a, PORT);
    let flow_bytes = flows
        .iter()
        .filter(|f| f.id.server == server)
        .map(|f| f.to_server.bytes)
        .sum();
    handle.stop();
    println!(
        "{position:?}: kernel ingress {kernel} B, flowtel {counted} B, veth rx L3 {} B, \
         flow {flow_bytes} B, foreign dropped {dropped} of {seen}",
        veth.rx_l3_bytes()
    );
    Some(Run {
        coverage: counted as f64 / kernel as f64,
        flow_bytes,
        veth_l3: veth.rx_l3_bytes(),
        dropped,
    })
}

#[test]
fn coverage_reports_the_share_a_program_ahead_lets_through() {
    let Some(r) = run(AttachPosition::Last, "coverage_reports_the_share") else {
        return;
    };
    assert_eq!(r.dropped, DATAGRAMS / 4);
    let share = 0.75;
    let off = (r.coverage / share - 1.0) * 100.0;
    println!(
        "coverage {:.4}, share let through {share}: {off:+.3}%",
        r.coverage
    );
    assert!(
        off.abs() <= 1.0,
        "coverage {:.4} is not within 1 % of {share}",
        r.coverage
    );
    let d = deviation_pct(r.flow_bytes, r.veth_l3 * 3 / 4);
    assert!(
        d.abs() <= 1.0,
        "the flow's bytes are not three quarters of the veth's ({d:+.3}%)"
    );
}

#[test]
fn attach_position_first_sees_what_the_program_drops() {
    let Some(r) = run(AttachPosition::First, "attach_position_first") else {
        return;
    };
    assert_eq!(r.dropped, DATAGRAMS / 4);
    let off = (r.coverage - 1.0) * 100.0;
    println!("coverage {:.4}: {off:+.3}%", r.coverage);
    assert!(
        off.abs() <= 1.0,
        "coverage {:.4} is not within 1 % of 1",
        r.coverage
    );
    let d = deviation_pct(r.flow_bytes, r.veth_l3);
    println!(
        "flow bytes {} vs veth {}: {d:+.3}%",
        r.flow_bytes, r.veth_l3
    );
    assert!(
        d.abs() <= 1.0,
        "the flow's bytes are {d:+.3}% off the veth's"
    );
}
