//! Memory under hostile input, in a release build: for each case, the
//! process's resident memory before it and its peak during it (`VmHWM`,
//! reset per case through `/proc/self/clear_refs`), and what flowtel shed,
//! from its own counters. Prints a markdown table; `bench/hostile.sh`
//! runs it.
//!
//! - A port scan: 1,000 sources × 65,535 ports, one UDP flow each, in one
//!   interval of the flow stage (table and series at their defaults).
//! - 1 million short connections, 100,000 per interval, each ending.
//! - A scrape target streaming 100 MB of distinct series: the scraper's
//!   body limit (16 MiB) stops it.
//! - A scrape body just under that limit, all distinct `istio_requests`
//!   series, parsed.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use flowtel::flow::{
    Counters, Endpoint, FlowId, FlowStage, FlowUpdate, FlowsConfig, Nat, SourceEvent, SourceKind,
    Transport,
};
use flowtel::source::istio::ISTIO_FAMILIES;
use flowtel::source::scrape::{parse, Format, ScrapeLimits, Scraper, DEFAULT_MAX_BYTES};
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
            Ok(f) => format!("NOT SHED: {} families parsed", f.len()),
            Err(e) => format!("refused: {e}"),
        }
    })
}

fn parse_at_limit() -> String {
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
    let families = parse(&body, Format::Text, ISTIO_FAMILIES).expect("parses");
    let points: usize = families.iter().map(|f| f.points.len()).sum();
    format!(
        "{} bytes, {i} distinct series: {} families, {points} points kept",
        body.len(),
        families.len()
    )
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter.
    println!(
        "Memory under hostile input ({} CPUs, release build)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| case | RSS before (MiB) | peak RSS (MiB) | peak − before (MiB) | time | shed (flowtel's counters) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    row("port scan, 1,000 sources × 65,535 ports", port_scan);
    row("1 million short connections", short_connections);
    row(
        "scrape target streaming 100 MB of distinct series",
        scrape_100mb,
    );
    row(
        "scrape body at the 16 MiB limit, all distinct series",
        parse_at_limit,
    );
}
