//! One full conntrack dump plus aggregation, timed, the way `flowtel run`
//! does it each interval: the conntrack source dumps the table of a network
//! namespace onto a channel, and the flow stage (`FlowStage`: the flow table
//! and the series) consumes it until `DumpFinished`, then `finish` closes
//! the interval.
//!
//! Used by `bench/conntrack_dump.sh`, which fills a throwaway namespace with
//! 100 000 entries first. Run it as root:
//!
//! ```text
//! cargo build --release --example dump_bench
//! target/release/examples/dump_bench --netns /run/netns/NAME --mode netlink --dumps 2
//! ```
//!
//! Dump 1 starts with an empty flow table (every entry is inserted), later
//! dumps find the table populated (the steady state of a running daemon).
//! Each dump prints one `RESULT key=value ...` line; the peak RSS (VmHWM) is
//! the whole process's, after all dumps.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use flowtel::flow::{FlowStage, FlowsConfig, SourceEvent};
use flowtel::source::conntrack::{self, ConntrackConfig, ConntrackMode};
use flowtel::source::kernel::KernelStats;
use flowtel::telemetry::{catalogue, Telemetry};

/// The channel between source and table, as in `flowtel run`.
const CHANNEL: usize = 65_536;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Netlink,
    Procfs,
}

#[derive(Parser, Debug)]
#[command(about = "Time a full conntrack dump + aggregation with the flowtel library")]
struct Args {
    /// Network namespace whose table is dumped (/run/netns/NAME or /proc/PID/ns/net).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// How the table is read.
    #[arg(long, value_enum, default_value = "netlink")]
    mode: Mode,
    /// Dumps to run one after another in this process.
    #[arg(long, default_value_t = 2)]
    dumps: u64,
    /// Subscribe to NEW/DESTROY events too, as `flowtel run` does by default.
    #[arg(long)]
    events: bool,
    /// Only drain the channel: no flow table, no aggregation (isolates the
    /// cost of reading and decoding the table).
    #[arg(long)]
    drain_only: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.dumps == 0 {
        bail!("--dumps must be at least 1");
    }
    let telemetry = Telemetry::default();
    let stats = Arc::new(KernelStats::new(&telemetry));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SourceEvent>(CHANNEL);
    let cfg = ConntrackConfig {
        mode: match args.mode {
            Mode::Netlink => ConntrackMode::Netlink,
            Mode::Procfs => ConntrackMode::Procfs,
        },
        netns: args.netns.clone(),
        events: args.events,
        ..ConntrackConfig::default()
    };
    let started = Instant::now();
    let source =
        conntrack::start(&cfg, stats.clone(), tx).context("starting the conntrack source")?;
    let startup = started.elapsed();
    let mode = source.mode();

    let mut stage = FlowStage::new(&FlowsConfig::default(), 0, None, &telemetry);

    for epoch in 1..=args.dumps {
        let t0 = Instant::now();
        if !source.request_dump(epoch) {
            bail!("the conntrack source stopped before dump {epoch}");
        }
        let mut entries = 0u64;
        let complete = loop {
            let event = rx
                .blocking_recv()
                .context("the conntrack source closed its channel")?;
            let done = match event {
                SourceEvent::Flow(_) => {
                    entries += 1;
                    None
                }
                SourceEvent::DumpFinished { epoch: e, complete } if e == epoch => Some(complete),
                _ => None,
            };
            if !args.drain_only {
                stage.apply(event);
            }
            if let Some(complete) = done {
                break complete;
            }
        };
        let dumped = t0.elapsed();
        let series = if args.drain_only {
            0
        } else {
            stage.finish().points.len()
        };
        let total = t0.elapsed();
        if !complete {
            bail!("dump {epoch} failed (see the log); nothing to measure");
        }
        println!(
            "RESULT mode={mode} dump={epoch} entries={entries} flows={flows} series={series} \
             dump_aggregate_ms={total:.1} finish_interval_ms={finish:.2} ns_per_entry={per:.0} \
             startup_ms={startup:.1} drain_only={drain}",
            flows = telemetry.value(&catalogue::FLOWS_TRACKED),
            total = ms(total),
            finish = ms(total - dumped),
            per = total.as_nanos() as f64 / entries.max(1) as f64,
            startup = ms(startup),
            drain = args.drain_only,
        );
    }
    let (hwm, rss) = (status_kib("VmHWM:"), status_kib("VmRSS:"));
    println!(
        "RESULT mode={mode} vmhwm_kib={hwm} vmrss_kib={rss} parse_errors={} series_overflowed={} \
         flows_untracked={}",
        telemetry.value(&catalogue::SOURCE_DECODE_ERRORS),
        telemetry.value(&catalogue::SERIES_OVERFLOWED),
        telemetry.value(&catalogue::FLOWS_UNTRACKED),
    );
    source.stop();
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A `kB` field of /proc/self/status, or 0 when it cannot be read.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
