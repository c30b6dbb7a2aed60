//! Soak: flowtel (conntrack source) under constant connection churn, with
//! a collector that goes away and comes back, for `FLOWTEL_SOAK_SECS`
//! (60 s in CI; `bench/soak.sh` runs it for an hour in a release build).
//!
//! Every round makes short TCP connections and UDP exchanges from A to B.
//! The test receiver is stopped for the last fifth of every
//! `FLOWTEL_SOAK_OUTAGE_EVERY_SECS` (10 s in CI, 180 s in `bench/soak.sh`):
//! exports fail, flowtel keeps counting. Each round samples flowtel's RSS, open
//! file descriptors, CPU time and self-counters. At the end it prints the
//! table (RSS at start, after warm-up, at the end, the slope after warm-up,
//! CPU, fds) and asserts:
//!
//! - RSS grew at most [`RSS_GROWTH_LIMIT_KIB`] after warm-up (the first
//!   third of the run), and open fds did not grow;
//! - the cumulative totals received after the last restart match the veth
//!   counters of the whole run (the tolerance of the other end-to-end
//!   tests), each flow's bytes cover its payload, and flowtel's own
//!   account is exact: no lost conntrack event, no flow ended unseen.
//!
//! Needs root, `ip` and `nft` (see `tests/common/mod.rs`).

mod common;

use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs};
use common::otlp_receiver::OtlpReceiver;
use common::scenario::{self, Lab, Plan, Series, Totals};

const TEST: &str = "soak";
const INTERVAL: &str = "1s";
const DEFAULT_SECS: u64 = 60;
const DEFAULT_OUTAGE_EVERY_SECS: u64 = 10;
const RSS_GROWTH_LIMIT_KIB: u64 = 8 * 1024;
const STABLE_TIMEOUT: Duration = Duration::from_secs(30);

const ROUND: Plan = Plan {
    tcp4: None,
    tcp6: None,
    nat: None,
    udp4: Some((50, 1000, 1000)),
    udp6: Some((50, 1000, 1000)),
    short: Some((300, 1000, 1000, 1)),
};

/// One sample of flowtel's process.
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
    cpu_ticks: u64,
}

fn sample(flowtel: &Flowtel, start: Instant) -> Sample {
    let pid = flowtel.pid();
    let rss_kib = flowtel
        .rss_kib()
        .unwrap_or_else(|e| panic!("flowtel's RSS (has it exited?): {e:#}"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    // utime and stime: fields 14 and 15, after the parenthesised name.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cpu_ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Sample {
        at: start.elapsed(),
        rss_kib,
        fds,
        cpu_ticks,
    }
}

/// The least-squares slope of RSS over time, in KiB per minute.
fn slope_kib_per_min(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let xs: Vec<f64> = samples.iter().map(|s| s.at.as_secs_f64() / 60.0).collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.rss_kib as f64).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var
    }
}

#[test]
fn soak() {
    let Some(tools) = common::prerequisites(TEST, false) else {
        return;
    };
    let secs = |var: &str, default: u64| {
        Duration::from_secs(
            std::env::var(var)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default),
        )
    };
    let duration = secs("FLOWTEL_SOAK_SECS", DEFAULT_SECS);
    let outage_every = secs("FLOWTEL_SOAK_OUTAGE_EVERY_SECS", DEFAULT_OUTAGE_EVERY_SECS);
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let mut receiver = OtlpReceiver::start().expect("starting the receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: INTERVAL,
        env: vec![
            ("FLOWTEL_EXPORT__OTLP__RETRY__MAX_ATTEMPTS", "2".into()),
            ("FLOWTEL_EXPORT__OTLP__TIMEOUT", "1s".into()),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(20))
        .expect("flowtel becomes ready");
    let start = Instant::now();
    let mut samples = vec![sample(&flowtel, start)];
    let before = lab.counters().expect("reading A's veth counters");
    let servers = lab.servers().expect("starting the servers in B");

    let mut flows = Vec::new();
    let (mut round, mut outages) = (0u64, 0u64);
    while start.elapsed() < duration {
        round += 1;
        let phase = start.elapsed().as_secs_f64() % outage_every.as_secs_f64();
        let down = phase >= outage_every.as_secs_f64() * 0.8;
        if down && receiver.is_running() {
            receiver.stop();
            outages += 1;
        } else if !down && !receiver.is_running() {
            receiver
                .restart()
                .expect("restarting the receiver on the same port");
        }
        flows.extend(scenario::run(&lab, &ROUND).expect("a round of traffic"));
        samples.push(sample(&flowtel, start));
        assert!(
            flowtel.exit_status().is_none(),
            "flowtel exited in round {round}: {:?}\n{}",
            flowtel.exit_status(),
            flowtel.output()
        );
    }
    if !receiver.is_running() {
        receiver
            .restart()
            .expect("restarting the receiver on the same port");
    }
    let since = receiver.request_count();
    let series = scenario::wait_exported("at the end", &flowtel, STABLE_TIMEOUT, || {
        Series::from_points(&receiver.sum_points(since))
    });
    samples.push(sample(&flowtel, start));
    let server_errors = servers.errors();
    drop(servers);
    assert!(
        server_errors.is_empty(),
        "the servers in B failed: {server_errors:?}"
    );
    let after = lab.counters().expect("reading A's veth counters");
    let truth = Totals::from_counters(&before, &after);
    let stats = flowtel.stats().expect("flowtel's /readyz stats");

    // The table.
    let warm = samples.len() / 3;
    let (first, warmed, last) = (&samples[0], &samples[warm], &samples[samples.len() - 1]);
    let slope = slope_kib_per_min(&samples[warm..]);
    let ticks = last.cpu_ticks.saturating_sub(first.cpu_ticks) as f64;
    let cpu_pct = ticks / 100.0 / last.at.as_secs_f64() * 100.0;
    let connections: u64 = flows
        .iter()
        .filter(|f| f.name == "short")
        .map(|f| f.payload.exchanges)
        .sum();
    println!("{TEST}: {round} rounds over {:?}, {outages} collector outages, {connections} short connections ({:.0}/s)", last.at, connections as f64 / last.at.as_secs_f64());
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| RSS at start | {} KiB |", first.rss_kib);
    println!(
        "| RSS after warm-up ({:.0} s) | {} KiB |",
        warmed.at.as_secs_f64(),
        warmed.rss_kib
    );
    println!("| RSS at the end | {} KiB |", last.rss_kib);
    println!(
        "| RSS max | {} KiB |",
        samples.iter().map(|s| s.rss_kib).max().unwrap_or(0)
    );
    println!("| RSS slope after warm-up | {slope:+.1} KiB/min |");
    println!("| CPU (average) | {cpu_pct:.1} % of a core |");
    println!(
        "| open fds start / warm / end | {} / {} / {} |",
        first.fds, warmed.fds, last.fds
    );
    for key in [
        "events_lost",
        "flows_ended_unseen",
        "exports_failed",
        "exports_ok",
    ] {
        println!(
            "| {key} | {} |",
            stats.get(key).unwrap_or(&serde_json::Value::Null)
        );
    }

    scenario::check_totals("the whole soak", &series.totals(), &truth, &series);
    scenario::check_flows("the whole soak", &scenario::merge(flows), &series);
    scenario::check_self_stats(TEST, &stats);
    let growth = last.rss_kib.saturating_sub(warmed.rss_kib);
    assert!(
        growth <= RSS_GROWTH_LIMIT_KIB,
        "RSS grew {growth} KiB after warm-up ({} -> {} KiB), limit {RSS_GROWTH_LIMIT_KIB} KiB",
        warmed.rss_kib,
        last.rss_kib
    );
    assert!(
        last.fds <= warmed.fds + 4,
        "open fds grew after warm-up: {} -> {}",
        warmed.fds,
        last.fds
    );
}
