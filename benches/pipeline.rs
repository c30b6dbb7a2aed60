//! Hot-path benchmarks: what every conntrack dump costs per entry.
//!
//! * `decode`: ctnetlink message decoding (`decode_message`) over a mix of
//!   pre-encoded IPv4/IPv6, TCP/UDP entries, some behind DNAT or SNAT;
//! * `procfs`: `/proc/net/nf_conntrack` line parsing (`parse_proc_line`)
//!   over the same mix, as the kernel prints it;
//! * `aggregate`: one interval of 100 000 flows through the flow stage
//!   (`FlowStage::apply`: the flow table, then the series), closed by
//!   `FlowStage::finish`. Each iteration is
//!   one interval, and the throughput is in flows, so criterion's
//!   "thrpt" is flows per second and "time" / 100 000 is the time per flow
//!   per interval (target: at most 1 µs). `steady` runs with the anomaly
//!   detectors at their defaults except a learning period of 1 ms (so
//!   every detector judges from the second interval on),
//!   `steady_anomaly_off` with all ten off (their cost is the difference,
//!   same run), and `scan_*` feed 100 000 payload-free attempts (a scan
//!   flood, the scan detectors' worst case) with them on and off. The RSS
//!   each case adds over its first interval is printed beside.
//!
//! Run with `cargo bench --bench pipeline`; the whole run takes under a minute
//! (plus the build).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use flowtel::flow::{
    Counters, Endpoint, FlowId, FlowStage, FlowUpdate, FlowsConfig, Nat, SourceEvent, SourceKind,
    Transport,
};
use flowtel::source::conntrack::{decode_message, encode_message, parse_proc_line, MessageKind};
use flowtel::telemetry::{catalogue, Telemetry};

/// Distinct entries in the decode and procfs corpora.
const CORPUS: usize = 4096;
/// Flows per interval in the aggregation benchmarks.
const FLOWS: usize = 100_000;

/// The `i`-th flow of a node's table: 256 client pods talking to 128 server
/// endpoints. 60 % IPv4 TCP, 15 % IPv4 UDP, 15 % IPv6 TCP, 10 % IPv6 UDP;
/// one flow in five goes through DNAT (Service VIP to a backend pod), one in
/// ten through SNAT (masquerade). `round` changes the client port, which
/// makes it a different connection.
fn flow(i: usize, round: usize) -> FlowUpdate {
    let slot = i % 20;
    let (v6, transport) = match slot {
        0..=11 => (false, Transport::Tcp),
        12..=14 => (false, Transport::Udp),
        15..=17 => (true, Transport::Tcp),
        _ => (true, Transport::Udp),
    };
    let pod = (i % 256) as u16;
    let svc = ((i / 7) % 128) as u16;
    let ip = |net: u16, host: u16| -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::new(0xfd00, net, 0, 0, 0, 0, 0, host + 1))
        } else {
            let [a, b] = (host + 1).to_be_bytes();
            IpAddr::V4(Ipv4Addr::new(198, 18 + (net as u8 & 1), a + net as u8, b))
        }
    };
    let server_port = match transport {
        Transport::Udp => 53,
        _ => [443, 80, 8080, 5432][usize::from(svc) % 4],
    };
    // Unique per (pod, i / 256, round) while round < 128.
    let client_port = 1024 + ((i / 256) as u16 % 400) * 128 + (round % 128) as u16;
    let client = Endpoint::new(ip(0x10, pod), client_port);
    let server = Endpoint::new(ip(0x21, svc), server_port);
    let mut nat = Nat::default();
    if i.is_multiple_of(5) {
        nat.server = Some(Endpoint::new(ip(0x30, svc % 50), 8443));
    } else if i % 10 == 3 {
        nat.client = Some(Endpoint::new(ip(0x40, 0), 20_000 + (i % 40_000) as u16));
    }
    let size = 40 + (i % 1400) as u64;
    FlowUpdate {
        id: FlowId {
            transport,
            client,
            server,
            zone: 0,
        },
        generation: u64::from((i as u32).wrapping_mul(2_654_435_761) ^ round as u32),
        nat,
        to_server: Counters::new(size * 10, 10),
        to_client: Counters::new(size * 30, 25),
        ended: false,
        source: SourceKind::Conntrack,
    }
}

/// How the kernel prints `u` in /proc/net/nf_conntrack (with accounting on).
fn proc_line(u: &FlowUpdate) -> String {
    let addr = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_string(),
        // The kernel prints every IPv6 group in full (%pI6).
        IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:04x}"))
            .collect::<Vec<_>>()
            .join(":"),
    };
    let id = &u.id;
    let (family, number) = if id.client.ip.is_ipv4() {
        ("ipv4", 2)
    } else {
        ("ipv6", 10)
    };
    let (proto, timeout, state) = match id.transport {
        Transport::Tcp => ("tcp", 431_999, "ESTABLISHED "),
        _ => ("udp", 178, ""),
    };
    let reply_src = u.nat.server.unwrap_or(id.server);
    let reply_dst = u.nat.client.unwrap_or(id.client);
    format!(
        "{family:<8} {number} {proto:<8} {} {timeout} {state}src={} dst={} sport={} dport={} \
         packets={} bytes={} src={} dst={} sport={} dport={} packets={} bytes={} [ASSURED] \
         mark=0 zone=0 use=2",
        id.transport.protocol(),
        addr(id.client.ip),
        addr(id.server.ip),
        id.client.port,
        id.server.port,
        u.to_server.packets,
        u.to_server.bytes,
        addr(reply_src.ip),
        addr(reply_dst.ip),
        reply_src.port,
        reply_dst.port,
        u.to_client.packets,
        u.to_client.bytes,
    )
}

fn bench_decode(c: &mut Criterion) {
    let messages: Vec<Vec<u8>> = (0..CORPUS)
        .map(|i| encode_message(&flow(i * 7, 0), MessageKind::New))
        .collect();
    for m in &messages {
        assert!(matches!(decode_message(m), Ok(Some(_))), "corpus decodes");
    }
    let bytes: usize = messages.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(CORPUS as u64));
    group.bench_function(
        format!("ctnetlink_mix/{CORPUS}msgs_avg{}B", bytes / CORPUS),
        |b| {
            b.iter(|| {
                for m in &messages {
                    let _ = black_box(decode_message(black_box(m)));
                }
            })
        },
    );
    group.finish();
}

fn bench_procfs(c: &mut Criterion) {
    let lines: Vec<String> = (0..CORPUS).map(|i| proc_line(&flow(i * 7, 0))).collect();
    for (i, l) in lines.iter().enumerate() {
        let parsed = parse_proc_line(l).expect("corpus parses");
        let want = flow(i * 7, 0);
        assert_eq!(
            (parsed.id, parsed.nat, parsed.to_client),
            (want.id, want.nat, want.to_client),
            "{l}"
        );
    }
    let bytes: usize = lines.iter().map(String::len).sum();
    let mut group = c.benchmark_group("procfs");
    group.throughput(Throughput::Elements(CORPUS as u64));
    group.bench_function(
        format!("parse_line_mix/{CORPUS}lines_avg{}B", bytes / CORPUS),
        |b| {
            b.iter(|| {
                for l in &lines {
                    let _ = black_box(parse_proc_line(black_box(l)));
                }
            })
        },
    );
    group.finish();
}

/// The flow stage configured as `flowtel run` defaults it (no names, no
/// log records).
struct Pipeline {
    stage: FlowStage,
    telemetry: Telemetry,
    epoch: u64,
}

impl Pipeline {
    /// Every detector on and past its learning period at once.
    fn new() -> Self {
        let mut cfg = FlowsConfig::default();
        cfg.anomaly.learning = Duration::from_millis(1);
        Self::with(&cfg)
    }

    fn with(cfg: &FlowsConfig) -> Self {
        let telemetry = Telemetry::default();
        Self {
            stage: FlowStage::new(cfg, 0, None, &telemetry),
            telemetry,
            epoch: 0,
        }
    }

    /// With the anomaly detectors off.
    fn without_anomalies() -> Self {
        let mut cfg = FlowsConfig::default();
        let a = &mut cfg.anomaly;
        a.scan_ports = 0;
        a.sweep_hosts = 0;
        a.dns_tunnel_names = 0;
        a.dns_txt_queries = 0;
        a.spike_factor = 0.0;
        a.drop_factor = 0.0;
        a.exfil_min_bytes = 0;
        a.lateral_ports.clear();
        a.unusual_protocols = false;
        a.error_ratio = 0.0;
        Self::with(&cfg)
    }

    /// One interval: a complete dump of `flows` (counters grown since the
    /// last interval), the events `ended` delivered during it, then the
    /// interval closed. Returns the number of series exported.
    fn interval(&mut self, flows: &[FlowUpdate], ended: &[FlowUpdate]) -> usize {
        self.epoch += 1;
        let epoch = self.epoch;
        let grown = |u: &FlowUpdate| {
            let mut u = *u;
            // Payload-free attempts (a scan) stay so.
            if u.to_server.bytes > 100 * u.to_server.packets {
                u.to_server.bytes += epoch * 1500;
                u.to_server.packets += epoch;
                u.to_client.bytes += epoch * 9000;
                u.to_client.packets += epoch * 6;
            }
            SourceEvent::Flow(u)
        };
        let s = &mut self.stage;
        s.apply(SourceEvent::DumpStarted { epoch });
        for u in ended {
            s.apply(grown(u));
        }
        for u in flows {
            s.apply(grown(u));
        }
        s.apply(SourceEvent::DumpFinished {
            epoch,
            complete: true,
        });
        s.finish().points.len()
    }
}

/// The system allocator, counting the bytes live on the heap: what a
/// pipeline holds, without the allocator's reuse of freed pages blurring it
/// the way RSS does.
struct Counting;

static HEAP: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; the counter
// only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HEAP.fetch_add(new_size, Ordering::Relaxed);
        HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes live on the heap, KiB.
fn heap_kib() -> u64 {
    (HEAP.load(Ordering::Relaxed) / 1024) as u64
}

/// This process's resident set, KiB (0 if /proc cannot say).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn bench_aggregate(c: &mut Criterion) {
    let flows: Vec<FlowUpdate> = (0..FLOWS).map(|i| flow(i, 0)).collect();
    let mut group = c.benchmark_group("aggregate");
    group.throughput(Throughput::Elements(FLOWS as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.warm_up_time(Duration::from_secs(1));

    // The daemon's usual interval: every flow already tracked. Each
    // pipeline's memory is what the heap and RSS grew by while it was made
    // and ran two intervals.
    let (heap, rss) = (heap_kib(), rss_kib());
    let mut off = Pipeline::without_anomalies();
    off.interval(&flows, &[]);
    off.interval(&flows, &[]);
    println!(
        "steady_anomaly_off: heap +{} KiB, RSS +{} KiB after two intervals",
        heap_kib().saturating_sub(heap),
        rss_kib().saturating_sub(rss)
    );
    let (heap, rss) = (heap_kib(), rss_kib());
    let mut steady = Pipeline::new();
    let series = steady.interval(&flows, &[]);
    steady.interval(&flows, &[]);
    assert_eq!(
        steady.telemetry.value(&catalogue::FLOWS_TRACKED),
        FLOWS as u64
    );
    println!(
        "steady (anomaly on): heap +{} KiB, RSS +{} KiB after two intervals, {} flow updates untracked",
        heap_kib().saturating_sub(heap),
        rss_kib().saturating_sub(rss),
        steady.telemetry.value(&catalogue::ANOMALY_UNTRACKED)
    );
    println!("aggregate: {FLOWS} flows fold into {series} series");
    group.bench_function(format!("steady/{FLOWS}flows"), |b| {
        b.iter(|| black_box(steady.interval(&flows, &[])))
    });

    group.bench_function(format!("steady_anomaly_off/{FLOWS}flows"), |b| {
        b.iter(|| black_box(off.interval(&flows, &[])))
    });

    // A scan flood: every one of the same tuples (256 clients, 128 servers)
    // a payload-free attempt, SYN out and RST back; the detectors follow
    // their first 4,096 keys each and count the rest as untracked.
    let scan: Vec<FlowUpdate> = flows
        .iter()
        .map(|u| {
            let mut u = *u;
            u.id.transport = Transport::Tcp;
            u.to_server = Counters::new(60, 1);
            u.to_client = Counters::new(40, 1);
            u
        })
        .collect();
    for (name, make) in [
        (
            "scan_anomaly_off",
            Pipeline::without_anomalies as fn() -> Pipeline,
        ),
        ("scan_anomaly_on", Pipeline::new),
    ] {
        let (heap, rss) = (heap_kib(), rss_kib());
        let mut p = make();
        p.interval(&scan, &[]);
        println!(
            "{name}: heap +{} KiB, RSS +{} KiB after the first interval, {} attempts untracked",
            heap_kib().saturating_sub(heap),
            rss_kib().saturating_sub(rss),
            p.telemetry.value(&catalogue::ANOMALY_UNTRACKED)
        );
        group.bench_function(format!("{name}/{FLOWS}flows"), |b| {
            b.iter(|| black_box(p.interval(&scan, &[])))
        });
    }

    // The first interval after start: every flow inserted.
    group.bench_function(format!("first_interval/{FLOWS}flows"), |b| {
        b.iter_batched(
            Pipeline::new,
            |mut p| {
                black_box(p.interval(&flows, &[]));
                p
            },
            BatchSize::PerIteration,
        )
    });

    // Churn: each interval a tenth of the connections end (a DESTROY event
    // with final counters) and as many new ones appear in the dump.
    let mut churn = Pipeline::new();
    let mut live = flows.clone();
    churn.interval(&live, &[]);
    let mut round = 0usize;
    group.bench_function(format!("churn10pct/{FLOWS}flows"), |b| {
        b.iter_batched(
            || {
                round += 1;
                let mut ended = Vec::with_capacity(FLOWS / 10);
                for (i, u) in live.iter_mut().enumerate().skip(round % 10).step_by(10) {
                    let mut gone = *u;
                    gone.ended = true;
                    ended.push(gone);
                    *u = flow(i, round);
                }
                (live.clone(), ended)
            },
            |(now_live, ended)| black_box(churn.interval(&now_live, &ended)),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_decode, bench_procfs, bench_aggregate
}
criterion_main!(benches);
