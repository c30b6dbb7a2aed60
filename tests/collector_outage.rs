//! flowtel keeps counting while its collector is away, and the cumulative
//! totals it sends once the collector is back cover everything.
//!
//! 1. flowtel starts with the collector down (nothing listens on the port);
//!    traffic crosses the namespaces; flowtel's exports fail.
//! 2. The test receiver starts on that port: the totals it gets match the
//!    veth counters within 2 %.
//! 3. The receiver stops; more traffic; exports fail again.
//! 4. The receiver restarts on the same port: the cumulative totals reported
//!    after the restart match everything the veth carried since the start,
//!    within 2 %, and no series restarted (its start time never moved).
//!
//! Throughout, flowtel stays alive and its RSS stays below 64 MiB; its own
//! counters show no lost event and no flow that ended unseen, and it exits
//! cleanly on SIGTERM at the end. Short export timeouts and two attempts
//! keep the outages from stalling it.
//!
//! Needs root, `ip` and `nft` (see `tests/common/mod.rs`).

mod common;

use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs};
use common::otlp_receiver::OtlpReceiver;
use common::scenario::{self, Lab, Plan, Series, Totals};

const TEST: &str = "collector_outage";
const INTERVAL: &str = "1s";
const RSS_LIMIT_KIB: u64 = 64 * 1024;
const STABLE_TIMEOUT: Duration = Duration::from_secs(20);
const FAILURE_TIMEOUT: Duration = Duration::from_secs(15);

const PHASE_1: Plan = Plan {
    tcp4: Some((1 << 20, 1 << 20)),
    tcp6: None,
    nat: None,
    udp4: Some((300, 1000, 1000)),
    udp6: None,
    short: Some((40, 1000, 1000, 1)),
};

const PHASE_2: Plan = Plan {
    tcp4: Some((512 << 10, 512 << 10)),
    tcp6: Some((1 << 20, 1 << 20)),
    nat: Some((512 << 10, 512 << 10)),
    udp4: None,
    udp6: Some((300, 1000, 1000)),
    short: Some((40, 1000, 1000, 1)),
};

/// flowtel's RSS, sampled whenever the test waits.
struct RssWatch {
    samples: Vec<u64>,
}

impl RssWatch {
    fn sample(&mut self, flowtel: &Flowtel) {
        match flowtel.rss_kib() {
            Ok(kib) => self.samples.push(kib),
            Err(e) => panic!("cannot read flowtel's RSS (has it exited?): {e:#}"),
        }
    }

    fn max(&self) -> u64 {
        self.samples.iter().copied().max().unwrap_or(0)
    }
}

/// Waits until flowtel has counted at least `at_least` failed exports.
fn wait_for_failures(flowtel: &Flowtel, rss: &mut RssWatch, at_least: u64, phase: &str) {
    let mut failed = 0;
    let seen = common::wait_until(FAILURE_TIMEOUT, Duration::from_millis(100), || {
        rss.sample(flowtel);
        failed = flowtel.stat("exports_failed").unwrap_or(0);
        failed >= at_least
    });
    assert!(
        seen,
        "{phase}: expected at least {at_least} failed exports while the collector is down, \
         flowtel counted {failed} after {FAILURE_TIMEOUT:?}"
    );
    println!("{TEST}: {phase}: flowtel counted {failed} failed exports");
}

#[test]
fn collector_outage() {
    let Some(tools) = common::prerequisites(TEST, false) else {
        return;
    };
    let t0 = Instant::now();
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let (grpc_port, http_port) = (common::free_port(), common::free_port());
    let endpoint = format!("http://127.0.0.1:{grpc_port}");
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
    let mut rss = RssWatch {
        samples: Vec::new(),
    };
    rss.sample(&flowtel);
    println!(
        "{TEST}: flowtel {} -> {endpoint} (nothing listens yet), namespace {}",
        flowtel.pid(),
        lab.a.name
    );

    let before = lab.counters().expect("reading A's veth counters");
    let servers = lab.servers().expect("starting the servers in B");

    // 1. Collector down from the start.
    let flows_1 = scenario::run(&lab, &PHASE_1).expect("phase 1 traffic");
    wait_for_failures(&flowtel, &mut rss, 2, "collector down at start");

    // 2. Collector up: everything so far arrives.
    let mut receiver =
        OtlpReceiver::start_on(grpc_port, http_port).expect("starting the receiver late");
    let series =
        scenario::wait_exported("after the first outage", &flowtel, STABLE_TIMEOUT, || {
            rss.sample(&flowtel);
            Series::from_points(&receiver.sum_points(0))
        });
    let mid = lab.counters().expect("reading A's veth counters");
    let truth_1 = Totals::from_counters(&before, &mid);
    println!("{TEST}: phase 1 series:\n{}", series.describe());
    scenario::check_totals("phase 1", &series.totals(), &truth_1, &series);
    scenario::check_flows("phase 1", &flows_1, &series);

    // 3. Collector down again while more traffic flows.
    receiver.stop();
    let stored_at_stop = receiver.request_count();
    let failed_before = flowtel.stat("exports_failed").expect("flowtel's stats");
    let flows_2 = scenario::run(&lab, &PHASE_2).expect("phase 2 traffic");
    wait_for_failures(&flowtel, &mut rss, failed_before + 2, "collector stopped");
    assert_eq!(
        receiver.request_count(),
        stored_at_stop,
        "the stopped receiver must not store anything"
    );

    // 4. Back on the same port: the cumulative totals cover everything.
    receiver
        .restart()
        .expect("restarting the receiver on the same port");
    let since = receiver.request_count();
    let series =
        scenario::wait_exported("after the second outage", &flowtel, STABLE_TIMEOUT, || {
            rss.sample(&flowtel);
            Series::from_points(&receiver.sum_points(since))
        });
    let server_errors = servers.errors();
    drop(servers);
    assert!(
        server_errors.is_empty(),
        "the servers in B failed: {server_errors:?}"
    );
    let after = lab.counters().expect("reading A's veth counters");
    let truth = Totals::from_counters(&before, &after);
    println!("{TEST}: veth during the test: {:?}", after.since(&before));
    println!("{TEST}: series after the restart:\n{}", series.describe());
    let stats = flowtel.stats().expect("flowtel's /readyz stats");
    println!("{TEST}: flowtel self stats: {stats}");
    scenario::check_totals(
        "after the restart (everything sent)",
        &series.totals(),
        &truth,
        &series,
    );
    let all_flows = scenario::merge(flows_1.into_iter().chain(flows_2));
    scenario::check_flows("after the restart", &all_flows, &series);
    scenario::check_shape(TEST, &receiver.sum_points(0));
    scenario::check_self_stats(TEST, &stats);

    rss.sample(&flowtel);
    assert!(
        flowtel.exit_status().is_none(),
        "flowtel exited: {:?}\n{}",
        flowtel.exit_status(),
        flowtel.output()
    );
    println!(
        "{TEST}: RSS over {} samples: max {} KiB, last {} KiB (limit {RSS_LIMIT_KIB} KiB)",
        rss.samples.len(),
        rss.max(),
        rss.samples.last().copied().unwrap_or(0)
    );
    assert!(
        rss.max() < RSS_LIMIT_KIB,
        "flowtel's RSS reached {} KiB, expected below {RSS_LIMIT_KIB} KiB; samples: {:?}",
        rss.max(),
        rss.samples
    );
    // Stopped before the receiver goes away, so its last export lands.
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly on SIGTERM within 10 s: {status:?}\n{}",
        flowtel.output()
    );
    println!("{TEST}: passed in {:?}", t0.elapsed());
}
