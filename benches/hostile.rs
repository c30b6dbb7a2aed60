//! Memory under hostile input, in a release build: each case runs in a
//! fresh process (this program again), which prints its resident memory
//! before the case and its peak during it (`VmHWM`), and what flowtel
//! shed, from its own counters. Prints markdown tables; `bench/hostile.sh`
//! runs it.
//!
//! - A port scan: 1,000 sources × 65,535 ports, one UDP flow each, in one
//!   interval of the flow stage (table and series at their defaults).
//! - 1 million short connections, 100,000 per interval, each ending.
//! - A scrape target streaming 100 MB of distinct series: the scraper's
//!   body limit (16 MiB) stops it.
//! - A scrape body just under that limit, all distinct `istio_requests`
//!   series, parsed within the default series budget (`max_series`), and
//!   again with no budget, as before there was one.
//! - A Kubernetes API server listing 100,000 pods (19,900 Deployments of 5
//!   pods with their current and one older ReplicaSet, 500 CronJob Jobs of
//!   one pod, 20,000 Services and 19,900 EndpointSlices, 1,000 nodes):
//!   the test API server of `tests/common/kubeapi.rs` serves it from this
//!   process, and a child process (this program again) runs flowtel's
//!   Kubernetes cache with the real kube client until it is synced, so
//!   that its RSS is the cache's alone: before, peak, steady (after 10 s
//!   idle) and the time to synced; once with `kubernetes.max_objects` at
//!   its default and once at 100,000, where the rest is shed and counted.

#[allow(dead_code)]
#[path = "common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../tests/common/kubeapi.rs"]
mod kubeapi;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flowtel::enrich::kubernetes::{self, KubernetesConfig, KubernetesMode};
use flowtel::flow::{
    Counters, Endpoint, FlowId, FlowStage, FlowUpdate, FlowsConfig, Nat, SourceEvent, SourceKind,
    Transport,
};
use flowtel::source::istio::ISTIO_FAMILIES;
use flowtel::source::scrape::{
    parse_within, Format, ScrapeLimits, Scraper, DEFAULT_MAX_BYTES, DEFAULT_MAX_SERIES,
};
use flowtel::telemetry::{catalogue, Telemetry};

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Runs `case`, printing its row: RSS before, peak during, what was shed.
fn row(name: &str, case: impl FnOnce() -> String) {
    // Writing 5 resets the peak RSS (VmHWM) to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status_kib("VmRSS:");
    let started = Instant::now();
    let shed = case();
    let peak = status_kib("VmHWM:");
    println!(
        "| {name} | {} | {} | {} | {:.1} s | {shed} |",
        before / 1024,
        peak / 1024,
        peak.saturating_sub(before) / 1024,
        started.elapsed().as_secs_f64()
    );
}

fn udp(source: u32, port: u16, ended: bool) -> FlowUpdate {
    let [a, b, c, d] = (0x0a00_0000 | source).to_be_bytes();
    FlowUpdate {
        id: FlowId {
            transport: Transport::Udp,
            client: Endpoint::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), 40_000),
            server: Endpoint::new(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)), port),
            zone: 0,
        },
        generation: 0,
        nat: Nat::default(),
        to_server: Counters::new(60, 1),
        to_client: Counters::new(0, 0),
        ended,
        source: SourceKind::Conntrack,
    }
}

fn port_scan() -> String {
    let telemetry = Telemetry::default();
    let mut stage = FlowStage::new(&FlowsConfig::default(), 0, None, &telemetry);
    for source in 0..1_000u32 {
        for port in 1..=65_535u16 {
            stage.apply(SourceEvent::Flow(udp(source, port, false)));
        }
    }
    let report = stage.finish();
    std::hint::black_box(&report);
    format!(
        "{} flows offered; {} tracked, {} not tracked (flows.max_flows), {} folded into the overflow series (flows.max_series)",
        1_000u64 * 65_535,
        telemetry.value(&catalogue::FLOWS_TRACKED),
        telemetry.value(&catalogue::FLOWS_UNTRACKED),
        telemetry.value(&catalogue::SERIES_OVERFLOWED)
    )
}

fn short_connections() -> String {
    let telemetry = Telemetry::default();
    let mut stage = FlowStage::new(&FlowsConfig::default(), 0, None, &telemetry);
    for interval in 0..10u32 {
        for i in 0..100_000u32 {
            let n = interval * 100_000 + i;
            let mut u = udp(n / 60_000, 1024 + (n % 60_000) as u16, true);
            u.id.transport = Transport::Tcp;
            stage.apply(SourceEvent::Flow(u));
        }
        std::hint::black_box(stage.finish());
    }
    format!(
        "1000000 connections; {} tracked at the end, {} not tracked, {} folded",
        telemetry.value(&catalogue::FLOWS_TRACKED),
        telemetry.value(&catalogue::FLOWS_UNTRACKED),
        telemetry.value(&catalogue::SERIES_OVERFLOWED)
    )
}

/// `count` distinct `istio_requests_total` samples, `per_line` bytes or so.
fn series_line(i: u64) -> String {
    format!(
        "istio_requests_total{{reporter=\"destination\",source_workload=\"w{i}\",source_workload_namespace=\"ns{}\",destination_workload=\"d{i}\",destination_workload_namespace=\"shop\",destination_service=\"s{i}.shop.svc.cluster.local\",request_protocol=\"http\",response_code=\"200\"}} {i}\n",
        i % 97
    )
}

fn scrape_100mb() -> String {
    const TOTAL: u64 = 100 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async {
                let chunks = futures::stream::unfold(0u64, |sent| async move {
                    if sent >= TOTAL {
                        return None;
                    }
                    let mut chunk = String::with_capacity(64 << 10);
                    let mut i = sent;
                    while chunk.len() < 60 << 10 {
                        chunk.push_str(&series_line(i));
                        i += 1;
                    }
                    let next = sent + chunk.len() as u64;
                    Some((Ok::<_, std::io::Error>(chunk), next))
                });
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    axum::body::Body::from_stream(chunks),
                )
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let scraper = Scraper::new(ScrapeLimits::default()).expect("a scraper");
        match scraper
            .scrape(&format!("http://{addr}/metrics"), ISTIO_FAMILIES)
            .await
        {
            Ok(p) => format!("NOT SHED: {} families parsed", p.families.len()),
            Err(e) => format!("refused: {e}"),
        }
    })
}

fn parse_at_limit() -> String {
    parse_distinct(DEFAULT_MAX_SERIES)
}

fn parse_at_limit_unbounded() -> String {
    parse_distinct(usize::MAX)
}

/// A body of distinct series just under the scrape size limit, parsed
/// within `max_series`.
fn parse_distinct(max_series: usize) -> String {
    let mut body = String::with_capacity(DEFAULT_MAX_BYTES);
    let mut i = 0;
    loop {
        let line = series_line(i);
        if body.len() + line.len() > DEFAULT_MAX_BYTES {
            break;
        }
        body.push_str(&line);
        i += 1;
    }
    let parsed = parse_within(&body, Format::Text, ISTIO_FAMILIES, max_series).expect("parses");
    std::hint::black_box(&parsed);
    let points: usize = parsed.families.iter().map(|f| f.points.len()).sum();
    format!(
        "{} bytes, {i} distinct series: {points} kept, {} shed (flowtel.scrape.series.shed)",
        body.len(),
        parsed.series_shed
    )
}

/// Set in the child process: the kubeconfig of the parent's API server.
const CHILD_KUBECONFIG: &str = "FLOWTEL_HOSTILE_KUBECONFIG";
/// Set in the child process: `kubernetes.max_objects`.
const CHILD_MAX_OBJECTS: &str = "FLOWTEL_HOSTILE_MAX_OBJECTS";
/// How long the child stays up after the sync before its steady RSS.
const STEADY_AFTER: Duration = Duration::from_secs(10);

/// The 100,000-pod cluster.
const CLUSTER: cluster::Scale = cluster::Scale {
    deployments: 19_900,
    pods_per_deployment: 5,
    old_replicasets_per_deployment: 1,
    jobs: 500,
    services: 20_000,
    nodes: 1_000,
};

/// The child: flowtel's Kubernetes cache alone against the parent's API
/// server. Prints one `kube_cache key=value ...` line.
fn kube_child(kubeconfig: &Path) {
    let max_objects = std::env::var(CHILD_MAX_OBJECTS)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(kubernetes::DEFAULT_MAX_OBJECTS);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let before = status_kib("VmRSS:");
        let telemetry = Telemetry::default();
        let cfg = KubernetesConfig {
            enabled: KubernetesMode::On,
            kubeconfig: Some(kubeconfig.to_path_buf()),
            network_events: false,
            max_objects,
            ..KubernetesConfig::default()
        };
        let started = Instant::now();
        let handle = kubernetes::start(&cfg, &telemetry)
            .expect("the cache starts")
            .expect("enabled");
        let mut snapshots = handle.snapshots();
        let synced = tokio::time::timeout(
            Duration::from_secs(600),
            snapshots.wait_for(|s| s.synced()),
        )
        .await
        .expect("synced within 10 minutes")
        .map(|s| s.clone())
        .expect("the cache task runs");
        let took = started.elapsed();
        let peak_at_sync = status_kib("VmHWM:");
        // Steady: nothing changes in the cluster; the watches stay open.
        let mut steady = 0;
        let idle_until = Instant::now() + STEADY_AFTER;
        while Instant::now() < idle_until {
            tokio::time::sleep(Duration::from_secs(1)).await;
            steady = status_kib("VmRSS:");
        }
        let stats = handle.stats();
        let counts = handle.snapshot().counts();
        let cached = counts.pods
            + counts.services
            + counts.endpoint_slices
            + counts.nodes
            + counts.replicasets
            + counts.jobs;
        println!(
            "kube_cache max_objects={max_objects} synced_ms={} before_kib={before} peak_at_sync_kib={peak_at_sync} \
             peak_kib={} steady_kib={steady} pods={} cached={cached} synced_pods={} shed={} rejected={} \
             watch_errors={} relists={}",
            took.as_millis(),
            status_kib("VmHWM:"),
            counts.pods,
            synced.counts().pods,
            stats.objects_shed(),
            stats.objects_rejected(),
            stats.watch_errors(),
            stats.relists(),
        );
        handle.stop().await;
    });
}

/// The 100,000-pod case: serves [`CLUSTER`], runs one child per bound and
/// prints their rows.
fn kube_100k() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let objects = cluster::cluster(CLUSTER);
    assert_eq!(objects.len(), CLUSTER.objects());
    let total = objects.len();
    let json_bytes: usize = objects
        .iter()
        .map(|o| serde_json::to_vec(o).map_or(0, |v| v.len()))
        .sum();
    let (api, kubeconfig) = runtime.block_on(async {
        let api = kubeapi::KubeApi::started().await;
        api.load(objects);
        let kubeconfig = api.write_kubeconfig(dir.path());
        (api, kubeconfig)
    });
    println!();
    println!(
        "Kubernetes API server listing {} pods: {total} objects ({} nodes, {} Services, {} EndpointSlices, {} ReplicaSets of {} Deployments, {} Jobs), {:.0} MiB of JSON",
        CLUSTER.pods(),
        CLUSTER.nodes,
        CLUSTER.services,
        CLUSTER.services.min(CLUSTER.deployments),
        CLUSTER.deployments * (1 + CLUSTER.old_replicasets_per_deployment),
        CLUSTER.deployments,
        CLUSTER.jobs,
        json_bytes as f64 / 1048576.0
    );
    println!("| kubernetes.max_objects | objects cached | pods cached | shed (`flowtel.k8s.objects.shed`) | time to synced | RSS before (MiB) | peak RSS (MiB) | steady RSS, 10 s after sync (MiB) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let exe = std::env::current_exe().expect("this program's path");
    for max_objects in [kubernetes::DEFAULT_MAX_OBJECTS, 100_000] {
        let output = Command::new(&exe)
            .env(CHILD_KUBECONFIG, &kubeconfig)
            .env(CHILD_MAX_OBJECTS, max_objects.to_string())
            .output()
            .expect("running the child");
        let text = String::from_utf8_lossy(&output.stdout);
        let Some(line) = text.lines().find(|l| l.starts_with("kube_cache ")) else {
            panic!(
                "the child printed no result ({}): {text}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let field = |key: &str| -> u64 {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        let expected_shed = total.saturating_sub(max_objects) as u64;
        assert_eq!(
            field("shed"),
            expected_shed,
            "shed objects against the bound: {line}"
        );
        assert_eq!(field("cached") + field("shed"), total as u64, "{line}");
        let mib = |kib: u64| format!("{:.0}", kib as f64 / 1024.0);
        println!(
            "| {max_objects} | {} | {} | {} | {:.1} s | {} | {} | {} |",
            field("cached"),
            field("pods"),
            field("shed"),
            field("synced_ms") as f64 / 1000.0,
            mib(field("before_kib")),
            mib(field("peak_kib")),
            mib(field("steady_kib")),
        );
        eprintln!("{line}");
    }
    runtime.block_on(api.stop());
}

/// Set in a child process: the case (an index into [`CASES`]) to run.
const CHILD_CASE: &str = "FLOWTEL_HOSTILE_CASE";

type Case = (&'static str, fn() -> String);

/// The cases of the first table, each run in a fresh process.
const CASES: &[Case] = &[
    ("port scan, 1,000 sources × 65,535 ports", port_scan),
    ("1 million short connections", short_connections),
    (
        "scrape target streaming 100 MB of distinct series",
        scrape_100mb,
    ),
    (
        "scrape body at the 16 MiB limit, all distinct series, max_series at its default",
        parse_at_limit,
    ),
    (
        "the same with no series budget (as before max_series)",
        parse_at_limit_unbounded,
    ),
];

fn main() {
    if let Some(kubeconfig) = std::env::var_os(CHILD_KUBECONFIG) {
        kube_child(Path::new(&kubeconfig));
        return;
    }
    if let Some(case) = std::env::var(CHILD_CASE)
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .and_then(|i| CASES.get(i))
    {
        row(case.0, case.1);
        return;
    }
    let only_kube = std::env::args().any(|a| a == "kube");
    if only_kube {
        kube_100k();
        return;
    }
    // `cargo bench` passes `--bench`; nothing to filter.
    println!(
        "Memory under hostile input ({} CPUs, release build, each case in a fresh process)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| case | RSS before (MiB) | peak RSS (MiB) | peak − before (MiB) | time | shed (flowtel's counters) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let exe = std::env::current_exe().expect("this program's path");
    for (i, (name, _)) in CASES.iter().enumerate() {
        let output = Command::new(&exe)
            .env(CHILD_CASE, i.to_string())
            .output()
            .expect("running the case");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && text.starts_with('|'),
            "case {name:?} failed ({}): {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        print!("{text}");
    }
    kube_100k();
}
