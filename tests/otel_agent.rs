//! flowtel → node agent → gateway, with the agent's settings taken from
//! `otel-config/agent.yaml` and run by rotel, a real collector.
//!
//! No OpenTelemetry Collector with an OTLP receiver can be installed here
//! (otel-config/README.md), so rotel plays the agent. Its command line is
//! derived from agent.yaml, setting by setting:
//! * `receivers.otlp.protocols.grpc`/`http` → `--otlp-grpc-endpoint` and
//!   `--otlp-http-endpoint` (on 127.0.0.1 and free ports instead of
//!   0.0.0.0:4317/4318, which a shared test machine cannot promise);
//! * pipelines: a signal without one → `--otlp-receiver-<signal>-disabled`;
//! * `batch` → `--batch-max-size` (`send_batch_size`) and `--batch-timeout`;
//! * `resource/instance` (insert `service.instance.id` from
//!   `k8s.node.name`) → a rotel Python processor written from the
//!   processor's `attributes`, for metrics and logs;
//! * `otlp/gateway` → `--exporter otlp` over gRPC with its `compression` and
//!   `retry_on_failure.max_elapsed_time`, to the test's OTLP receiver
//!   standing in for the gateway;
//! * `memory_limiter` has no rotel counterpart and is left out (the test
//!   prints it).
//!
//! Two flowtel processes (conntrack source, the same namespace, one over
//! gRPC and one over HTTP/protobuf, each tagged) send to the agent while
//! known traffic crosses a veth pair. Asserted at the gateway, per flowtel:
//! * metrics: the sums over all series per direction match A's veth
//!   counters (L3) within 2 %, bytes and packets, and each flow has its
//!   series with the right attributes and bytes;
//! * logs: the flow records' `flow.io.bytes` and
//!   `flowtel.flow.reverse.io.bytes`, summed, match the same counters within
//!   2 %;
//! * the resource of both carries `service.instance.id` = the node name
//!   (the agent's resource processor ran) and `service.name` flowtel;
//! * rotel forwarded over gRPC with gzip, as the agent's exporter says.
//!
//! Needs root, `ip`, `nft` and rotel-agent.

mod common;
#[path = "common/otel_config.rs"]
mod otel_config;

use std::path::Path;
use std::time::{Duration, Instant};

use common::flowtel::{intervals_after, Flowtel, FlowtelArgs, Health};
use common::otlp_receiver::{AttrValue, LogEvent, OtlpReceiver, SumPoint, Transport};
use common::rotel::Rotel;
use common::scenario::{self, Lab, Plan, Series, Totals};
use common::{deviation_pct, within};
use serde_json::Value;

const TEST: &str = "agent_forwards_flowtel_metrics_and_logs_to_the_gateway";
const NODE: &str = "node-agent-test";
const INTERVAL: &str = "1s";
/// An upper bound (not pacing) for the gateway to show everything.
const STABLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Intervals the gateway must show after the traffic before the flow
/// records are all there: the agent batches for up to 1 s (agent.yaml), one
/// interval, so the records of the first interval after the traffic, which
/// leave flowtel before the second's metrics, are at the gateway before the
/// third's metrics.
const LOG_INTERVALS: usize = 3;

const PLAN: Plan = Plan {
    tcp4: Some((4 << 20, 3 << 20)),
    tcp6: Some((2 << 20, 2 << 20)),
    nat: Some((1 << 20, 2 << 20)),
    udp4: Some((1500, 1200, 1200)),
    udp6: None,
    short: Some((50, 1000, 1000, 1)),
};

/// rotel's command line (less the receiver endpoints, which the harness
/// sets) for agent.yaml, the Python processor source it needs, and what
/// had no counterpart.
fn rotel_args(
    agent: &Value,
    gateway: &str,
    processor: &Path,
) -> (Vec<String>, String, Vec<String>) {
    let mut args = Vec::new();
    let mut left_out = Vec::new();
    let pipelines = agent["service"]["pipelines"]
        .as_object()
        .expect("agent.yaml has pipelines");
    for signal in otel_config::SIGNALS {
        if !pipelines.keys().any(|p| otel_config::type_of(p) == signal) {
            args.push(format!("--otlp-receiver-{signal}-disabled"));
        }
    }
    let protocols = &agent["receivers"]["otlp"]["protocols"];
    assert!(
        protocols["grpc"].is_object() && protocols["http"].is_object(),
        "agent.yaml: the OTLP receiver takes gRPC and HTTP (rotel always listens on both)"
    );
    // Every pipeline has the same processors and exporter (checked here).
    let first = pipelines.values().next().expect("a pipeline");
    for p in pipelines.values() {
        assert_eq!(
            (
                otel_config::ids(p, "processors"),
                otel_config::ids(p, "exporters")
            ),
            (
                otel_config::ids(first, "processors"),
                otel_config::ids(first, "exporters")
            ),
            "agent.yaml: rotel applies one set of settings to every signal"
        );
    }
    let mut python = String::from("from rotel_sdk.open_telemetry.common.v1 import KeyValue\n\n");
    python.push_str("def _apply(resource_data):\n    attrs = resource_data.resource.attributes\n");
    let mut has_processor = false;
    for id in otel_config::ids(first, "processors") {
        let c = &agent["processors"][id];
        match otel_config::type_of(id) {
            "batch" => {
                if let Some(n) = c["send_batch_size"].as_u64() {
                    args.extend(["--batch-max-size".into(), n.to_string()]);
                }
                if let Some(t) = c["timeout"].as_str() {
                    args.extend(["--batch-timeout".into(), t.to_string()]);
                }
            }
            "resource" => {
                for a in c["attributes"].as_array().into_iter().flatten() {
                    let (key, from, action) = (
                        a["key"].as_str().expect("resource: key"),
                        a["from_attribute"]
                            .as_str()
                            .expect("resource: from_attribute"),
                        a["action"].as_str().expect("resource: action"),
                    );
                    assert_eq!(action, "insert", "only `insert` is translated");
                    python.push_str(&format!(
                        "    if not any(kv.key == {key:?} for kv in attrs):\n        \
                         for kv in list(attrs):\n            if kv.key == {from:?}:\n                \
                         attrs.append(KeyValue.new_string_value({key:?}, kv.value.value))\n                \
                         break\n"
                    ));
                    has_processor = true;
                }
            }
            other => left_out.push(format!("{id} ({other}: no rotel counterpart)")),
        }
    }
    if has_processor {
        // rotel calls process_logs / process_metrics / process_spans.
        python.push_str("    return\n");
        for signal in pipelines.keys() {
            let (function, data) = match otel_config::type_of(signal) {
                "traces" => ("process_spans", "resource_spans"),
                "logs" => ("process_logs", "resource_logs"),
                _ => ("process_metrics", "resource_metrics"),
            };
            python.push_str(&format!(
                "\n\ndef {function}({data}):\n    _apply({data})\n"
            ));
        }
        for signal in pipelines.keys() {
            // rotel spells this one flag in the singular.
            let flag = if signal == "traces" {
                "trace"
            } else {
                signal.as_str()
            };
            args.push(format!("--otlp-with-{flag}-processor"));
            args.push(processor.display().to_string());
        }
    }
    let exporters = otel_config::ids(first, "exporters");
    assert_eq!(exporters.len(), 1, "agent.yaml: one exporter");
    let e = &agent["exporters"][exporters[0]];
    assert_eq!(
        otel_config::type_of(exporters[0]),
        "otlp",
        "agent.yaml: OTLP gRPC to the gateway"
    );
    args.extend(["--exporter".into(), "otlp".into()]);
    args.extend(["--otlp-exporter-endpoint".into(), gateway.to_string()]);
    args.extend(["--otlp-exporter-protocol".into(), "grpc".into()]);
    if let Some(c) = e["compression"].as_str() {
        args.extend(["--otlp-exporter-compression".into(), c.to_string()]);
    }
    if let Some(t) = e["retry_on_failure"]["max_elapsed_time"].as_str() {
        args.extend([
            "--otlp-exporter-retry-max-elapsed-time".into(),
            t.to_string(),
        ]);
    }
    (args, python, left_out)
}

fn tagged<'a, T>(
    items: &'a [T],
    resource: impl Fn(&T) -> &common::otlp_receiver::Attrs,
    tag: &str,
) -> Vec<&'a T> {
    let want = AttrValue::Str(tag.to_string());
    items
        .iter()
        .filter(|i| resource(i).get("flowtel.test.run") == Some(&want))
        .collect()
}

/// Flow-record bytes per direction, summed.
fn record_totals(events: &[&LogEvent]) -> (u64, u64, usize) {
    let flows: Vec<&&LogEvent> = events
        .iter()
        .filter(|e| e.event_name == "flowtel.flow")
        .collect();
    let sum = |key: &str| -> u64 {
        flows
            .iter()
            .filter_map(|e| e.int(key))
            .map(|v| v.max(0) as u64)
            .sum()
    };
    (
        sum("flow.io.bytes"),
        sum("flowtel.flow.reverse.io.bytes"),
        flows.len(),
    )
}

#[test]
fn agent_forwards_flowtel_metrics_and_logs_to_the_gateway() {
    let Some(tools) = common::prerequisites(TEST, true) else {
        return;
    };
    let t0 = Instant::now();
    let rotel_bin = tools
        .rotel
        .clone()
        .expect("prerequisites found rotel-agent");
    let agent = otel_config::load(&Path::new(otel_config::DIR).join("agent.yaml"))
        .expect("otel-config/agent.yaml");
    let gateway = OtlpReceiver::start().expect("starting the gateway stand-in");
    let dir = tempfile::tempdir().expect("temp dir");
    let processor = dir.path().join("resource_instance.py");
    let (args, python, left_out) = rotel_args(&agent, &gateway.grpc_endpoint(), &processor);
    std::fs::write(&processor, &python).expect("writing the rotel processor");
    println!("{TEST}: rotel as agent.yaml: {}", args.join(" "));
    println!("{TEST}: resource processor:\n{python}");
    println!("{TEST}: left out: {left_out:?}");
    let rotel = Rotel::start_with(&rotel_bin, &args).expect("starting rotel as the agent");

    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let run = format!("{TEST}-{}", std::process::id());
    let netns = lab.a.path();
    let start = |endpoint: &str, protocol: &str, tag: &str| {
        let mut f = Flowtel::start(&FlowtelArgs {
            source: "conntrack",
            netns: &netns,
            endpoint,
            protocol,
            interval: INTERVAL,
            env: vec![
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    format!("flowtel.test.run={tag}"),
                ),
                ("FLOWTEL_RESOURCE__NODE_NAME", NODE.to_string()),
                ("FLOWTEL_EXPORT__LOGS__RATE_LIMIT", "0".to_string()),
            ],
        })
        .expect("starting flowtel");
        f.wait_ready(Duration::from_secs(20))
            .expect("flowtel becomes ready");
        f
    };
    let runs = [
        (format!("{run}.grpc"), rotel.grpc_endpoint(), "grpc"),
        (
            format!("{run}.http"),
            rotel.http_endpoint(),
            "http/protobuf",
        ),
    ];
    let mut flowtels: Vec<Flowtel> = runs
        .iter()
        .map(|(tag, endpoint, protocol)| start(endpoint, protocol, tag))
        .collect();

    let before = lab.counters().expect("reading A's veth counters");
    let servers = lab.servers().expect("starting the servers in B");
    let flows = scenario::run(&lab, &PLAN).expect("making the traffic");
    let server_errors = servers.errors();
    drop(servers);
    assert!(
        server_errors.is_empty(),
        "the servers in B failed: {server_errors:?}"
    );

    for (i, (tag, _, protocol)) in runs.iter().enumerate() {
        let what = format!("gateway, flowtel {protocol} -> agent");
        let points = || -> Vec<SumPoint> {
            tagged(&gateway.sum_points(0), |p: &SumPoint| &p.resource, tag)
                .into_iter()
                .cloned()
                .collect()
        };
        let series = scenario::wait_exported(&what, &flowtels[i], STABLE_TIMEOUT, || {
            Series::from_points(&points())
        });
        let after = lab.counters().expect("reading A's veth counters");
        let truth = Totals::from_counters(&before, &after);
        println!("{what}: expected (veth, L3): {truth}");
        scenario::check_totals(&what, &series.totals(), &truth, &series);
        scenario::check_flows(&what, &flows, &series);
        scenario::check_shape(&what, &points());

        // Logs: the records of every interval up to one after the traffic.
        let shown = flowtels[i]
            .wait_until_shown(LOG_INTERVALS, STABLE_TIMEOUT, |at| {
                intervals_after(&points(), at)
            })
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        if !shown {
            println!(
                "{what}: the gateway shows no {LOG_INTERVALS} intervals after the traffic \
                 within {STABLE_TIMEOUT:?}; checking the records it has"
            );
        }
        let events: Vec<LogEvent> = tagged(&gateway.log_events(), |e: &LogEvent| &e.resource, tag)
            .into_iter()
            .cloned()
            .collect();
        let refs: Vec<&LogEvent> = events.iter().collect();
        let (c2s, s2c, records) = record_totals(&refs);
        println!(
            "{what}: {} log records, {records} flow records: client_to_server {c2s} B \
             ({:+.3} %), server_to_client {s2c} B ({:+.3} %)",
            events.len(),
            deviation_pct(c2s, truth.c2s_bytes),
            deviation_pct(s2c, truth.s2c_bytes)
        );
        assert!(
            records > 0
                && within(c2s, truth.c2s_bytes, scenario::TOTAL_TOLERANCE)
                && within(s2c, truth.s2c_bytes, scenario::TOTAL_TOLERANCE),
            "{what}: flow records must sum to the veth's L3 bytes within 2 %: got {c2s} / {s2c}, \
             expected {} / {}",
            truth.c2s_bytes,
            truth.s2c_bytes
        );

        let instance = AttrValue::Str(NODE.to_string());
        let metric_resource = points()
            .first()
            .map(|p| p.resource.clone())
            .unwrap_or_default();
        for (signal, resource) in [("metrics", &metric_resource), ("logs", &events[0].resource)] {
            println!(
                "{what}: {signal} resource: {}",
                common::otlp_receiver::show(resource)
            );
            assert_eq!(
                resource.get("service.instance.id"),
                Some(&instance),
                "{what}: {signal}: the agent's resource processor sets service.instance.id from \
                 k8s.node.name"
            );
            assert_eq!(
                resource.get("service.name"),
                Some(&AttrValue::Str("flowtel".into())),
                "{what}: {signal}"
            );
        }
        let f = &mut flowtels[i];
        assert!(
            f.exit_status().is_none(),
            "flowtel {protocol} exited:\n{}",
            f.output()
        );
    }
    let received = gateway.received(0);
    assert!(
        !received.is_empty()
            && received
                .iter()
                .all(|r| r.transport == Transport::Grpc && r.gzip),
        "the agent forwards over gRPC with gzip: {:?}",
        received
            .iter()
            .map(|r| (r.transport, r.gzip))
            .collect::<Vec<_>>()
    );
    println!(
        "{TEST}: the gateway got {} metric requests from the agent, all gRPC + gzip",
        received.len()
    );
    for mut f in flowtels {
        let status = f.stop(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "flowtel did not exit cleanly: {status:?}\n{}",
            f.output()
        );
    }
    drop(rotel);
    println!("{TEST}: passed in {:?}", t0.elapsed());
}
