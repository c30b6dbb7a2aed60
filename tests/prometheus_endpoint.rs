//! The Prometheus endpoint, scraped by a real Prometheus server.
//!
//! flowtel reads the conntrack table of a client namespace with no OTLP
//! endpoint and `export.prometheus.listen: 127.0.0.1:0` (the port is read
//! from its log). OTLP temporality is set to `delta`, which the endpoint must
//! ignore. Debian's Prometheus scrapes it every second. Known traffic
//! crosses a dedicated veth pair: TCP over IPv4 and IPv6 and UDP over IPv4,
//! one flow at a time, with the veth counters read around each.
//!
//! Asserted through Prometheus's query API:
//! * `flowtel_flow_bytes_total` has one series per flow and direction, with
//!   the flow's attributes as labels (`client_address`, `server_port`,
//!   `network_transport`, `flowtel_flow_direction`, ...), and its value is
//!   within 1 % of the L3 bytes the veth carried for that flow (and at least
//!   the payload): cumulative totals, not per-interval deltas;
//! * `flowtel_flow_packets_total` is there for each of them;
//! * the self-metrics `flowtel_source_dumps_total` (counter),
//!   `flowtel_flows_tracked` (gauge) and `flowtel_source_byte_counters_ratio`
//!   (`1`, a gauge) are there, and `target_info` carries the resource;
//! * no counter reset was seen (`resets(...)` is 0).
//!
//! And `promtool check metrics` accepts the raw `/metrics` text.
//!
//! Needs root, `ip`, `nft`, `prometheus` and `promtool` (Debian's
//! `prometheus` package, see `scripts/install-test-deps.sh`).

mod common;
#[path = "common/prometheus.rs"]
mod prometheus;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::otlp_receiver::AttrValue;
use common::scenario::{self, Flow, Lab, Plan, Totals, C2S, S2C};
use common::{deviation_pct, within};
use prometheus::{Prometheus, Sample, PROMETHEUS, PROMTOOL};

const TEST: &str = "prometheus_endpoint";
const JOB: &str = "flowtel";
const SCRAPE_INTERVAL: &str = "1s";
const TOLERANCE: f64 = 0.01;
/// An upper bound (not pacing) for Prometheus to hold everything.
const STABLE_TIMEOUT: Duration = Duration::from_secs(40);

const NONE: Plan = Plan {
    tcp4: None,
    tcp6: None,
    nat: None,
    udp4: None,
    udp6: None,
    short: None,
};

/// One flow at a time, so that the veth counters around it are its bytes.
const PLANS: [Plan; 3] = [
    Plan {
        tcp4: Some((4 << 20, 2 << 20)),
        ..NONE
    },
    Plan {
        tcp6: Some((2 << 20, 3 << 20)),
        ..NONE
    },
    Plan {
        udp4: Some((300, 1200, 1000)),
        ..NONE
    },
];

/// The Prometheus labels flowtel must put on `flow`'s series: its OTLP
/// attributes with `.` turned into `_`.
fn expected_labels(flow: &Flow, direction: &str) -> BTreeMap<String, String> {
    flow.attrs(direction)
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                AttrValue::Str(s) | AttrValue::Other(s) => s,
                AttrValue::Int(i) => i.to_string(),
                AttrValue::Bool(b) => b.to_string(),
            };
            (k.replace('.', "_"), v)
        })
        .collect()
}

/// Whether `sample` carries every label of `want`.
fn has_labels(sample: &Sample, want: &BTreeMap<String, String>) -> bool {
    want.iter()
        .all(|(k, v)| sample.label(k) == Some(v.as_str()))
}

fn show(samples: &[Sample]) -> String {
    samples
        .iter()
        .map(|s| format!("  {} {:?}\n", s.value, s.labels))
        .collect()
}

/// The address in flowtel's `Prometheus metrics on http://ADDR/metrics`.
fn metrics_addr(flowtel: &Flowtel) -> Option<SocketAddr> {
    let output = flowtel.output();
    let line = output
        .lines()
        .find(|l| l.contains("Prometheus metrics on http://"))?;
    let rest = line.split("Prometheus metrics on http://").nth(1)?;
    rest.split("/metrics").next()?.parse().ok()
}

/// `flowtel_flow_bytes_total` once Prometheus holds everything flowtel
/// counted before this call: flowtel applied a dump begun after the call
/// (and handed every later interval to its endpoint, which, with no OTLP
/// endpoint, takes it at once), and every series has a sample Prometheus
/// scraped after that.
fn wait_scraped(prom: &Prometheus, flowtel: &Flowtel) -> Vec<Sample> {
    let started = Instant::now();
    let since = flowtel.progress().expect("flowtel's /readyz");
    let applied = flowtel
        .wait_for_interval_after(&since, STABLE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{TEST}: {e:#}"));
    let after = applied
        .at
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs_f64();
    let query = format!("flowtel_flow_bytes_total{{job=\"{JOB}\"}}");
    let scraped = common::wait_until(
        STABLE_TIMEOUT.saturating_sub(started.elapsed()),
        Duration::from_millis(250),
        || {
            let at = prom
                .query(&format!("timestamp({query})"))
                .unwrap_or_default();
            !at.is_empty() && at.iter().all(|s| s.value > after)
        },
    );
    if scraped {
        println!(
            "{TEST}: Prometheus scraped everything {:?} after the traffic",
            started.elapsed()
        );
    } else {
        println!("{TEST}: no scrape after the traffic within {STABLE_TIMEOUT:?}; checking the last numbers");
    }
    prom.query(&query).unwrap_or_default()
}

#[test]
fn prometheus_scrapes_flow_bytes_with_labels_and_values() {
    let Some((tools, bins)) = common::prerequisites_with(TEST, &[PROMETHEUS, PROMTOOL], &[]) else {
        return;
    };
    let (prometheus_bin, promtool_bin) = (&bins[0], &bins[1]);
    let t0 = Instant::now();
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let run = format!("{TEST}-{}", std::process::id());
    let netns = lab.a.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: "",
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_EXPORT__PROMETHEUS__LISTEN", "127.0.0.1:0".into()),
            ("FLOWTEL_EXPORT__CONSOLE__MODE", "never".into()),
            ("FLOWTEL_EXPORT__OTLP__TEMPORALITY", "delta".into()),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                format!("flowtel.test.run={run}"),
            ),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(20))
        .expect("flowtel becomes ready");
    let mut addr = None;
    common::wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        addr = metrics_addr(&flowtel);
        addr.is_some()
    });
    let addr = addr.unwrap_or_else(|| {
        panic!(
            "flowtel logged no `Prometheus metrics on http://ADDR/metrics` line:\n{}",
            flowtel.output()
        )
    });
    let prom =
        Prometheus::start(prometheus_bin, JOB, addr, SCRAPE_INTERVAL).expect("starting Prometheus");
    println!(
        "{TEST}: {:.1}s: flowtel {} serves http://{addr}/metrics, Prometheus on {}",
        t0.elapsed().as_secs_f64(),
        flowtel.pid(),
        prom.addr
    );

    let servers = lab.servers().expect("starting the servers in B");
    let mut flows: Vec<(Flow, Totals)> = Vec::new();
    for plan in &PLANS {
        let before = lab.counters().expect("reading A's veth counters");
        let ran = scenario::run(&lab, plan).expect("making the traffic");
        // The last ACKs of a TCP close arrive just after the call returns.
        std::thread::sleep(Duration::from_millis(300));
        let after = lab.counters().expect("reading A's veth counters");
        let truth = Totals::from_counters(&before, &after);
        for f in ran {
            println!(
                "{TEST}: sent {:<5} {:?}; veth (L3): {truth}",
                f.name, f.payload
            );
            flows.push((f, truth));
        }
    }
    let server_errors = servers.errors();
    drop(servers);
    assert!(
        server_errors.is_empty(),
        "the servers in B failed: {server_errors:?}"
    );

    let bytes = wait_scraped(&prom, &flowtel);
    println!(
        "{TEST}: flowtel_flow_bytes_total in Prometheus:\n{}",
        show(&bytes)
    );
    assert!(
        !bytes.is_empty(),
        "Prometheus has no flowtel_flow_bytes_total; its targets: {}\nflowtel:\n{}",
        prom.targets(),
        flowtel.output()
    );
    let packets = prom
        .query(&format!("flowtel_flow_packets_total{{job=\"{JOB}\"}}"))
        .expect("querying flowtel_flow_packets_total");

    for (f, truth) in &flows {
        for (direction, payload, expected) in [
            (C2S, f.payload.to_server, truth.c2s_bytes),
            (S2C, f.payload.to_client, truth.s2c_bytes),
        ] {
            let want = expected_labels(f, direction);
            let found: Vec<&Sample> = bytes.iter().filter(|s| has_labels(s, &want)).collect();
            assert_eq!(
                found.len(),
                1,
                "flow {} {direction}: expected one flowtel_flow_bytes_total series with labels \
                 {want:?}, found {}:\n{}",
                f.name,
                found.len(),
                show(&bytes)
            );
            let got = found[0].value as u64;
            println!(
                "{TEST}: {} {direction}: veth L3 {expected} B, payload {payload} B, Prometheus \
                 {got} B ({:+.3} %) {:?}",
                f.name,
                deviation_pct(got, expected),
                found[0].labels
            );
            assert!(
                within(got, expected, TOLERANCE) && got >= payload,
                "flow {} {direction}: expected {expected} bytes (veth L3) ±1 % and at least the \
                 payload {payload}, Prometheus has {got} ({:+.3} %)",
                f.name,
                deviation_pct(got, expected)
            );
            let pkts = packets.iter().find(|s| has_labels(s, &want));
            assert!(
                pkts.is_some_and(|p| p.value > 0.0),
                "flow {} {direction}: no flowtel_flow_packets_total {want:?}:\n{}",
                f.name,
                show(&packets)
            );
        }
    }

    let resets = prom
        .query(&format!(
            "resets(flowtel_flow_bytes_total{{job=\"{JOB}\"}}[5m])"
        ))
        .expect("querying resets()");
    assert!(
        !resets.is_empty() && resets.iter().all(|s| s.value == 0.0),
        "flowtel_flow_bytes_total must be cumulative (no resets):\n{}",
        show(&resets)
    );

    for (query, check) in [
        (
            format!("flowtel_source_dumps_total{{job=\"{JOB}\"}}"),
            (|v: f64| v >= 1.0) as fn(f64) -> bool,
        ),
        (format!("flowtel_flows_tracked{{job=\"{JOB}\"}}"), |v| {
            v >= 0.0
        }),
        (
            format!("flowtel_source_byte_counters_ratio{{job=\"{JOB}\"}}"),
            |v| v == 1.0,
        ),
        (
            format!(
                "target_info{{job=\"{JOB}\",service_name=\"flowtel\",flowtel_test_run=\"{run}\"}}"
            ),
            |v| v == 1.0,
        ),
        (format!("up{{job=\"{JOB}\"}}"), |v| v == 1.0),
    ] {
        let samples = prom.query(&query).expect("querying Prometheus");
        println!("{TEST}: {query}:\n{}", show(&samples));
        assert!(
            samples.len() == 1 && check(samples[0].value),
            "{query}: expected one sample with a fitting value, got:\n{}",
            show(&samples)
        );
    }

    let (code, headers, text) =
        prometheus::http_get_full(addr, "/metrics").expect("GET /metrics from flowtel");
    assert_eq!(code, 200, "GET /metrics: {text}");
    let content_type = headers.get("content-type").cloned().unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type:?}"
    );
    let (passed, said) =
        prometheus::promtool_check_metrics(promtool_bin, &text).expect("running promtool");
    println!(
        "{TEST}: promtool check metrics on {} lines: {} {said:?}",
        text.lines().count(),
        if passed { "passed" } else { "FAILED" }
    );
    assert!(
        passed,
        "promtool check metrics rejected /metrics: {said}\n{text}"
    );

    assert!(
        flowtel.exit_status().is_none(),
        "flowtel exited: {:?}\n{}",
        flowtel.exit_status(),
        flowtel.output()
    );
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly on SIGTERM within 10 s: {status:?}\n{}",
        flowtel.output()
    );
    println!("{TEST}: passed in {:?}", t0.elapsed());
}
