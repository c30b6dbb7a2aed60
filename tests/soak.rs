//! Soak: flowtel (conntrack source) under constant connection churn, with
//! a collector that goes away and comes back, pods created and deleted in
//! the Kubernetes API it watches and a scrape target that flaps, for
//! `FLOWTEL_SOAK_SECS` (5 minutes in CI; `bench/soak.sh` runs it for an
//! hour in a release build).
//!
//! Every round makes short TCP connections and UDP exchanges from A to B,
//! and replaces [`CHURN_PER_ROUND`] of the [`PODS`] pods of the test API
//! server (`tests/common/kubeapi.rs`) with new ones (new names, uids and
//! addresses, none of them A's or B's). In every
//! `FLOWTEL_SOAK_OUTAGE_EVERY_SECS` (10 s in CI, 180 s in `bench/soak.sh`)
//! the test receiver is stopped for the last fifth (exports fail, flowtel
//! keeps counting), and the Felix scrape target (`tests/common/mesh.rs`,
//! the growing Felix fixture, scraped every second) for the fifth from 40
//! to 60 %, coming back on the same port with its counters restarted, as
//! a restarted Felix does. Each round samples flowtel's RSS, open file
//! descriptors, CPU time and self-counters. At the end it prints the table
//! (RSS at start, after warm-up, at the end, the slope after warm-up, CPU,
//! fds, pods churned, scrapes) and asserts:
//!
//! - RSS grew at most [`RSS_GROWTH_LIMIT_KIB`] after warm-up (the first
//!   third of the run), and open fds did not grow;
//! - the cumulative totals received after the last restart equal the veth
//!   counters of the whole run exactly, each flow's bytes cover its
//!   payload, and flowtel's own
//!   account is exact: no lost conntrack event, no flow ended unseen;
//! - the Kubernetes cache holds exactly the API server's objects at the end
//!   (`kubernetes.objects_cached`), with no object rejected or shed and no
//!   re-list;
//! - every outage of the scrape target was seen (a failed Felix scrape per
//!   outage at least) and scrapes succeeded again after the last one.
//!
//! Needs root, `ip` and `nft` (see `tests/common/mod.rs`).

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::kubeapi::{fx, KubeApi};
use common::mesh::{self, Behaviour};
use common::otlp_receiver::{self as receiver, OtlpReceiver};
use common::scenario::{self, Lab, Plan, Series, Totals};
use serde_json::Value;

const TEST: &str = "soak";
const INTERVAL: &str = "1s";
const DEFAULT_SECS: u64 = 300;
/// Pods in the test API server at any time (besides its one node).
const PODS: usize = 200;
/// Pods replaced (one deleted, one created) per round.
const CHURN_PER_ROUND: usize = 5;
/// How long a deleted pod keeps its address in flowtel's cache: shorter
/// than the warm-up, so that the ended claims level off within it.
const IP_RETENTION: &str = "20s";
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

/// The Felix scrape target: serving on its own runtime while up, gone
/// (connections refused) while down, always on the same address.
struct FlappingTarget {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    outages: u64,
}

impl FlappingTarget {
    fn start() -> Self {
        let mut target = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], common::free_port())),
            runtime: None,
            outages: 0,
        };
        target.up();
        target
    }

    fn is_up(&self) -> bool {
        self.runtime.is_some()
    }

    /// Serves the Felix fixture (growing from its first scrape again).
    fn up(&mut self) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the scrape target");
        let served = runtime.block_on(mesh::serve(
            self.addr,
            Behaviour::Growing(mesh::TEXT, mesh::FELIX),
        ));
        assert_eq!(served, self.addr);
        self.runtime = Some(runtime);
    }

    /// Stops serving: the listener and open connections close.
    fn down(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
            self.outages += 1;
        }
    }
}

/// The test API server with [`PODS`] pods on one node, replaced a few at a
/// time.
struct Cluster {
    runtime: tokio::runtime::Runtime,
    api: KubeApi,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
    pods: VecDeque<Value>,
    created: usize,
    deleted: usize,
}

impl Cluster {
    fn start() -> Self {
        let runtime = tokio::runtime::Runtime::new().expect("a runtime for the API server");
        let api = runtime.block_on(KubeApi::started());
        let dir = tempfile::tempdir().expect("a directory for the kubeconfig");
        let kubeconfig = api.write_kubeconfig(dir.path());
        api.apply(&fx::node(
            "node-soak",
            "zone-a",
            "region-a",
            &["192.0.2.10"],
            None,
        ));
        let mut cluster = Self {
            runtime,
            api,
            _dir: dir,
            kubeconfig,
            pods: VecDeque::new(),
            created: 0,
            deleted: 0,
        };
        for _ in 0..PODS {
            cluster.create();
        }
        cluster
    }

    /// A new pod, at an address of 10.200.0.0/16 (reused only long after
    /// its last holder is gone).
    fn create(&mut self) {
        let n = self.created;
        let ip = format!("10.200.{}.{}", (n >> 8) & 0xff, n & 0xff);
        let pod = fx::PodFx::new("soak", &format!("churn-{n}"))
            .on("node-soak", "192.0.2.10")
            .ips(&[&ip])
            .build();
        self.pods.push_back(self.api.apply(&pod));
        self.created += 1;
    }

    /// Replaces the oldest `n` pods with new ones.
    fn churn(&mut self, n: usize) {
        for _ in 0..n {
            if let Some(old) = self.pods.pop_front() {
                assert!(self.api.delete(&old), "the pod to delete is there");
                self.deleted += 1;
            }
            self.create();
        }
    }

    /// Objects the API server holds: the node and the pods.
    fn objects(&self) -> u64 {
        1 + self.pods.len() as u64
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.runtime.block_on(self.api.stop());
    }
}

/// The latest cumulative value of `metric` for `flowtel.scrape.target`
/// `felix`, summed over its other attributes (`error.type`).
fn felix_scrapes(points: &[receiver::SumPoint], metric: &str) -> u64 {
    receiver::latest(points, metric)
        .iter()
        .filter(|(attrs, _)| {
            matches!(attrs.get("flowtel.scrape.target"), Some(receiver::AttrValue::Str(t)) if t == "felix")
        })
        .map(|(_, p)| p.value)
        .sum()
}

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
    let mut cluster = Cluster::start();
    let mut felix = FlappingTarget::start();
    let mut env = vec![
        ("FLOWTEL_EXPORT__OTLP__RETRY__MAX_ATTEMPTS", "2".into()),
        ("FLOWTEL_EXPORT__OTLP__TIMEOUT", "1s".into()),
        (
            "FLOWTEL_KUBERNETES__KUBECONFIG",
            cluster.kubeconfig.display().to_string(),
        ),
        ("FLOWTEL_KUBERNETES__IP_RETENTION", IP_RETENTION.into()),
        ("FLOWTEL_RESOURCE__NODE_NAME", "node-soak".into()),
        // A and B are no pod's: their flows keep their addresses.
        ("FLOWTEL_ENRICH__UNKNOWN_ADDRESSES", "address".into()),
        ("FLOWTEL_MESH__FELIX__ENABLED", "on".into()),
    ];
    env.extend(mesh::scrape_env(felix.addr, "1s", "500ms"));
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: INTERVAL,
        env,
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(20))
        .expect("flowtel becomes ready");
    flowtel
        .wait_for_kube_synced(STABLE_TIMEOUT)
        .expect("flowtel's Kubernetes cache syncs");
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
        let flap = (0.4..0.6).contains(&(phase / outage_every.as_secs_f64()));
        if flap && felix.is_up() {
            felix.down();
        } else if !flap && !felix.is_up() {
            felix.up();
        }
        cluster.churn(CHURN_PER_ROUND);
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
    if !felix.is_up() {
        felix.up();
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
    // The cache converges on the API server's objects (its snapshot is
    // published at most every 250 ms).
    let objects = cluster.objects();
    flowtel
        .wait_for_readyz(
            "the Kubernetes cache to hold the API server's objects",
            STABLE_TIMEOUT,
            |body| body["kubernetes"]["objects_cached"].as_u64() == Some(objects),
        )
        .expect("the cache converges");
    let (_, readyz) = flowtel.readyz().expect("flowtel's /readyz");
    let kubernetes = readyz["kubernetes"].clone();
    // Felix scrapes succeeded again after the target's last comeback: the
    // count grows past what was exported then.
    let successes_before = felix_scrapes(&receiver.sum_points(0), "flowtel.scrape.successes");
    let mut scrapes = (0, 0);
    let seen_again = common::wait_until(STABLE_TIMEOUT, Duration::from_millis(200), || {
        let points = receiver.sum_points(0);
        scrapes = (
            felix_scrapes(&points, "flowtel.scrape.successes"),
            felix_scrapes(&points, "flowtel.scrape.errors"),
        );
        scrapes.0 > successes_before
    });

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
    println!(
        "| pods created / deleted in the API server | {} / {} |",
        cluster.created, cluster.deleted
    );
    println!(
        "| Kubernetes cache at the end (objects cached, API server objects, rejected, shed, relists, watch errors) | {}, {objects}, {}, {}, {}, {} |",
        kubernetes["objects_cached"],
        kubernetes["objects_rejected"],
        kubernetes["objects_shed"],
        kubernetes["relists"],
        kubernetes["watch_errors"]
    );
    println!(
        "| Felix scrapes ok / failed, target outages | {} / {}, {} |",
        scrapes.0, scrapes.1, felix.outages
    );

    scenario::check_totals("the whole soak", &series.totals(), &truth, &series);
    // Exact, not only within the end-to-end tolerance: every packet that
    // crossed A's veth counted once, however its tuple and kernel ID were
    // reused.
    assert_eq!(
        series.totals(),
        truth,
        "the whole soak: flowtel's totals differ from the veth counters"
    );
    scenario::check_flows("the whole soak", &scenario::merge(flows), &series);
    scenario::check_self_stats(TEST, &stats);
    for key in ["objects_rejected", "objects_shed", "relists"] {
        assert_eq!(
            kubernetes[key].as_u64(),
            Some(0),
            "kubernetes.{key}: {kubernetes}"
        );
    }
    assert!(
        seen_again,
        "no successful Felix scrape after the target's last comeback: {scrapes:?}"
    );
    assert!(
        scrapes.1 >= felix.outages,
        "{} Felix scrapes failed in {} outages of the target",
        scrapes.1,
        felix.outages
    );
    drop(cluster);
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
