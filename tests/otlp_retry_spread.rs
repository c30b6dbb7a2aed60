//! 50 agents lose their collector at once: it answers UNAVAILABLE (gRPC)
//! or 503 (HTTP) for an outage, then recovers. Each agent is flowtel's own
//! OTLP client (25 over gRPC, 25 over HTTP) sending one request that
//! counts its own number of flows.
//!
//! - Their retries spread out: the histogram of retry times is printed next
//!   to what lock-step backoff (no jitter) would give, where every agent's
//!   n-th retry lands in the same instant; the busiest 10 ms of the jittered
//!   retries must hold at most half of the agents.
//! - Every request arrives exactly once after the recovery, and the totals
//!   are exact.
//!
//! Scaled down tenfold to keep CI short: a 3 s outage (the 30 s)
//! with backoff from 50 ms to 500 ms (flowtel's defaults are 500 ms to 5 s).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::otlp_receiver::{AttrValue, OtlpReceiver, Transport};
use flowtel::export::otlp::transport::{OtlpClient, Signal, SignalTransport};
use flowtel::export::otlp::{OtlpConfig, Protocol};
use flowtel::telemetry::{catalogue, Telemetry};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

const AGENTS: usize = 50;
const OUTAGE: Duration = Duration::from_secs(3);
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// The width of the buckets the spread is judged on.
const BUCKET: Duration = Duration::from_millis(10);

/// Agent `i`'s one request: `i + 1` flows, under resource `agent.id = i`.
fn request(agent: usize) -> Vec<u8> {
    let kv = |key: &str, value: String| KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("agent.id", agent.to_string())],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics: vec![Metric {
                    name: "flows".into(),
                    unit: "{flow}".into(),
                    data: Some(metric::Data::Sum(Sum {
                        data_points: vec![NumberDataPoint {
                            value: Some(number_data_point::Value::AsInt(agent as i64 + 1)),
                            time_unix_nano: 1,
                            ..Default::default()
                        }],
                        aggregation_temporality: 2,
                        is_monotonic: true,
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

fn client(receiver: &OtlpReceiver, agent: usize, stats: &Telemetry) -> OtlpClient {
    let (endpoint, protocol) = if agent.is_multiple_of(2) {
        (receiver.grpc_endpoint(), Protocol::Grpc)
    } else {
        (receiver.http_endpoint(), Protocol::HttpProtobuf)
    };
    let mut otlp = OtlpConfig {
        endpoint,
        protocol,
        ..OtlpConfig::default()
    };
    otlp.headers.insert("x-agent".into(), agent.to_string());
    otlp.retry.max_attempts = 1000;
    otlp.retry.initial_backoff = INITIAL_BACKOFF;
    otlp.retry.max_backoff = MAX_BACKOFF;
    otlp.retry.max_elapsed_time = OUTAGE * 10;
    let transport = SignalTransport::resolve(&otlp, &otlp.metrics, "metrics").expect("a transport");
    OtlpClient::new(&transport, Signal::Metrics, stats).expect("a client")
}

/// Counts per bucket of `width` since `start`, as `(bucket, count)`.
fn histogram(times: &[Duration], width: Duration) -> BTreeMap<u128, usize> {
    let mut out = BTreeMap::new();
    for t in times {
        *out.entry(t.as_nanos() / width.as_nanos()).or_insert(0) += 1;
    }
    out
}

fn print_histogram(title: &str, times: &[Duration], width: Duration) {
    println!("{title} ({} in {width:?} buckets):", times.len());
    for (bucket, count) in histogram(times, width) {
        let from = width * bucket as u32;
        println!(
            "  {:>6.2}s {:>3} {}",
            from.as_secs_f64(),
            count,
            "#".repeat(count)
        );
    }
}

#[test]
fn retries_spread_out_and_everything_arrives_after_the_outage() {
    let receiver = OtlpReceiver::start().expect("the test receiver starts");
    receiver.set_unavailable(true);
    let stats = Telemetry::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let clients: Vec<OtlpClient> = rt.block_on(async {
        (0..AGENTS)
            .map(|agent| client(&receiver, agent, &stats))
            .collect()
    });
    let start = Instant::now();
    let sends = rt.spawn(async move {
        let sends = clients
            .iter()
            .enumerate()
            .map(|(agent, c)| c.send(request(agent)));
        futures::future::join_all(sends).await
    });
    // The outage is the scenario, not a synchronisation: the collector is
    // down for this long whatever the agents do.
    std::thread::sleep(OUTAGE);
    receiver.set_unavailable(false);
    let recovered = start.elapsed();
    let delivered = rt.block_on(sends).expect("the agents run");

    // Every request arrived, once, with its exact total.
    assert!(delivered.iter().all(|d| *d), "{delivered:?}");
    assert_eq!(stats.value(&catalogue::EXPORT_SUCCESSES), AGENTS as u64);
    assert_eq!(stats.value(&catalogue::EXPORT_FAILURES), 0);
    let received = receiver.received(0);
    assert_eq!(received.len(), AGENTS, "one request per agent");
    let points = receiver.sum_points(0);
    let mut per_agent: BTreeMap<String, u64> = BTreeMap::new();
    for p in &points {
        let Some(AttrValue::Str(agent)) = p.resource.get("agent.id") else {
            panic!("a point without agent.id: {p:?}");
        };
        *per_agent.entry(agent.clone()).or_insert(0) += p.value;
    }
    let expected: BTreeMap<String, u64> =
        (0..AGENTS).map(|a| (a.to_string(), a as u64 + 1)).collect();
    assert_eq!(per_agent, expected, "each agent's flows, exactly once");
    let total: u64 = per_agent.values().sum();
    assert_eq!(total, (AGENTS * (AGENTS + 1) / 2) as u64);

    // The retries: every refused attempt but each agent's first.
    let refused = receiver.refused();
    let mut attempts: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for r in &refused {
        attempts
            .entry(r.agent.as_str())
            .or_default()
            .push(r.at.duration_since(start));
    }
    assert_eq!(attempts.len(), AGENTS, "every agent was refused");
    let retries: Vec<Duration> = attempts
        .values()
        .flat_map(|times| times.iter().skip(1).copied())
        .collect();
    let grpc = refused
        .iter()
        .filter(|r| r.transport == Transport::Grpc)
        .count();
    println!(
        "{AGENTS} agents, outage {OUTAGE:?} (recovered at {recovered:?}), backoff {INITIAL_BACKOFF:?}..{MAX_BACKOFF:?} with full jitter: {} refused attempts ({grpc} gRPC, {} HTTP), {} retries",
        refused.len(),
        refused.len() - grpc,
        retries.len()
    );
    print_histogram(
        "retries during the outage",
        &retries,
        Duration::from_millis(100),
    );
    let arrivals: Vec<Duration> = received
        .iter()
        .map(|r| r.at.duration_since(start))
        .collect();
    print_histogram(
        "arrivals after the recovery",
        &arrivals,
        Duration::from_millis(100),
    );

    // Lock-step: every agent's n-th retry at the same instant.
    let mut lockstep = Vec::new();
    let (mut at, mut backoff) = (Duration::ZERO, INITIAL_BACKOFF);
    while at < OUTAGE {
        at += backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        lockstep.extend(std::iter::repeat_n(at, AGENTS));
    }
    let lockstep_busiest = histogram(&lockstep, BUCKET)
        .into_values()
        .max()
        .unwrap_or(0);
    let busiest = histogram(&retries, BUCKET).into_values().max().unwrap_or(0);
    let spans = histogram(&retries, BUCKET).len();
    println!(
        "busiest {BUCKET:?}: {busiest} retries jittered, {lockstep_busiest} in lock-step; {spans} buckets used jittered, {} in lock-step",
        histogram(&lockstep, BUCKET).len()
    );
    assert_eq!(lockstep_busiest, AGENTS);
    assert!(
        busiest * 2 <= AGENTS,
        "the busiest {BUCKET:?} holds {busiest} of {AGENTS} agents' retries"
    );
}
