//! The scrape series budget end to end: the flowtel binary scrapes the
//! Felix fixture (`tests/common/mesh.rs`, served over HTTP every second)
//! with `mesh.felix.max_series` four below the fixture's series, and the
//! test OTLP receiver must get, in one export request:
//!
//! - exactly `max_series` series of the Felix families, the first ones of
//!   the fixture in its order (counted from the fixture's lines here, not
//!   by flowtel's parser);
//! - `flowtel.scrape.series.shed{flowtel.scrape.target="felix"}` equal to
//!   4 × `flowtel.scrape.successes{felix}` of the same request.
//!
//! Needs root, `ip` and `nft` (flowtel's kernel source reads a throwaway
//! namespace; see `tests/common/mod.rs`).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::flowtel::{Flowtel, FlowtelArgs};
use common::mesh::{self, Behaviour};
use common::otlp_receiver::{attrs_of, AttrValue, OtlpReceiver};
use common::scenario::Lab;
use flowtel::source::felix::FELIX_FAMILIES;
use flowtel::telemetry::catalogue::Instrument;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point, NumberDataPoint};

const TEST: &str = "scrape_budget";
/// Series of the fixture past the budget.
const SHED: usize = 4;

/// The fixture's samples of the kept Felix families, in its order, as
/// (OTel metric name, label text): a counter's samples are written with or
/// without `_total`, a gauge's as its name.
fn fixture_series() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for line in mesh::FELIX.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let (name, rest) = line.split_at(name_end);
        let labels = rest
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
            .map_or(String::new(), |(l, _)| l.to_string());
        let spec = FELIX_FAMILIES.iter().find(|f| {
            name == f.source
                || (f.metric.instrument == Instrument::Counter
                    && name.strip_suffix("_total") == Some(f.source))
        });
        if let Some(spec) = spec {
            out.push((spec.metric.name, labels));
        }
    }
    out
}

fn int(dp: &NumberDataPoint) -> Option<i64> {
    match dp.value {
        Some(number_data_point::Value::AsInt(i)) => Some(i),
        Some(number_data_point::Value::AsDouble(d)) => Some(d as i64),
        None => None,
    }
}

/// In one request: the Felix family points (metric name and their label
/// set as `k="v"` text in flowtel's order), and the Felix scrape
/// successes and series shed.
struct Seen {
    series: Vec<(String, BTreeSet<String>)>,
    successes: Option<i64>,
    shed: Option<i64>,
}

fn seen(request: &ExportMetricsServiceRequest) -> Seen {
    let felix_names: BTreeSet<&str> = FELIX_FAMILIES.iter().map(|f| f.metric.name).collect();
    let mut out = Seen {
        series: Vec::new(),
        successes: None,
        shed: None,
    };
    let metrics = request
        .resource_metrics
        .iter()
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics);
    for m in metrics {
        let points: &[NumberDataPoint] = match &m.data {
            Some(metric::Data::Sum(s)) => &s.data_points,
            Some(metric::Data::Gauge(g)) => &g.data_points,
            _ => continue,
        };
        for dp in points {
            let attrs = attrs_of(&dp.attributes);
            let felix = matches!(attrs.get("flowtel.scrape.target"), Some(AttrValue::Str(t)) if t == "felix");
            match m.name.as_str() {
                "flowtel.scrape.successes" if felix => out.successes = int(dp),
                "flowtel.scrape.series.shed" if felix => out.shed = int(dp),
                name if felix_names.contains(name) => {
                    let labels = attrs
                        .iter()
                        .map(|(k, v)| match v {
                            AttrValue::Str(s) => format!("{k}=\"{s}\""),
                            other => format!("{k}={other:?}"),
                        })
                        .collect();
                    out.series.push((name.to_string(), labels));
                }
                _ => {}
            }
        }
    }
    out
}

/// The label text of a fixture line as a set of `k="v"` (the fixture's
/// values have no commas or escapes).
fn label_set(labels: &str) -> BTreeSet<String> {
    labels
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn felix_series_past_max_series_are_shed_and_counted() {
    let Some(tools) = common::prerequisites(TEST, false) else {
        return;
    };
    let series = fixture_series();
    assert!(series.len() > SHED + 10, "{} series", series.len());
    assert!(
        series.iter().all(|(_, l)| !l.contains('\\')),
        "the fixture's labels are plain"
    );
    let max_series = series.len() - SHED;
    let lab = Lab::new(&tools).expect("setting up the namespaces");
    let receiver = OtlpReceiver::start().expect("starting the receiver");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime for the scrape target");
    let felix = runtime.block_on(mesh::serve(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Behaviour::Serve(mesh::TEXT, mesh::FELIX),
    ));
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let mut env = mesh::scrape_env(felix, "1s", "500ms");
    env.push(("FLOWTEL_MESH__FELIX__ENABLED", "on".into()));
    env.push(("FLOWTEL_MESH__FELIX__MAX_SERIES", max_series.to_string()));
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env,
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(20))
        .expect("flowtel becomes ready");

    // A request holding the families of at least two scrapes.
    let mut found = None;
    let shown = common::wait_until(
        common::slow(Duration::from_secs(30)),
        Duration::from_millis(100),
        || {
            found = receiver
                .received(0)
                .iter()
                .rev()
                .map(|r| seen(&r.request))
                .find(|s| s.successes.is_some_and(|n| n >= 2) && !s.series.is_empty());
            found.is_some()
        },
    );
    assert!(
        shown,
        "no export with two Felix scrapes within 30 s:\n{}",
        flowtel.output()
    );
    let found = found.expect("found");
    let successes = found.successes.unwrap_or(0);
    assert_eq!(
        found.shed,
        Some(successes * SHED as i64),
        "flowtel.scrape.series.shed after {successes} scrapes of {SHED} series over the budget"
    );
    let expected: Vec<(String, BTreeSet<String>)> = series[..max_series]
        .iter()
        .map(|(name, labels)| (name.to_string(), label_set(labels)))
        .collect();
    let mut got = found.series.clone();
    got.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(got.len(), max_series, "Felix series exported");
    assert_eq!(got, want, "the first {max_series} series of the fixture");
    println!(
        "{TEST}: fixture {} series, max_series {max_series}: {} exported, shed {:?} after {successes} scrapes",
        series.len(),
        found.series.len(),
        found.shed
    );
    drop(flowtel);
    drop(runtime);
}
