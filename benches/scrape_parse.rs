//! Parse+convert throughput of an Envoy sidecar scrape of about 1 MB: the
//! Istio families flowtel keeps among Envoy's own, with Envoy's full label
//! sets and the 20-bucket request-duration histogram. `envoy_1mb` parses
//! into families; `envoy_1mb_to_otlp` also encodes them as the OTLP
//! request flowtel sends (`export::families::encode_families`, with the pod's
//! attributes). Target: 50 MB/s on one core. Run with
//! `cargo bench --bench scrape_parse`; criterion prints the throughput
//! (`thrpt`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flowtel::export::families::encode_families;
use flowtel::export::otlp::wire::{Batcher, Envelope};
use flowtel::source::istio::ISTIO_FAMILIES;
use flowtel::source::scrape::{parse, Format};

const BOUNDS: [&str; 20] = [
    "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000",
    "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf",
];

fn labels(source: usize, destination: usize, code: u16) -> String {
    format!(
        "reporter=\"destination\",source_workload=\"frontend-{source}\",source_canonical_service=\"frontend-{source}\",\
source_canonical_revision=\"v1\",source_workload_namespace=\"shop\",\
source_principal=\"spiffe://cluster.local/ns/shop/sa/frontend-{source}\",source_app=\"frontend-{source}\",\
source_version=\"v1\",source_cluster=\"Kubernetes\",destination_workload=\"api-{destination}\",\
destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/api-{destination}\",\
destination_app=\"api-{destination}\",destination_version=\"v1\",destination_service=\"api-{destination}.shop.svc.cluster.local\",\
destination_canonical_service=\"api-{destination}\",destination_canonical_revision=\"v1\",destination_service_name=\"api-{destination}\",\
destination_service_namespace=\"shop\",destination_cluster=\"Kubernetes\",request_protocol=\"http\",\
response_code=\"{code}\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"mutual_tls\""
    )
}

/// About `target` bytes of Envoy exposition: Envoy's own cluster stats and
/// Istio's request counters and histograms, in Envoy's layout.
fn envoy_scrape(target: usize) -> String {
    let mut out = String::with_capacity(target + 4096);
    let mut pair = 0;
    while out.len() < target {
        let (source, destination) = (pair % 17, pair / 17);
        out.push_str("# TYPE envoy_cluster_upstream_rq_total counter\n");
        out.push_str(&format!(
            "envoy_cluster_upstream_rq_total{{cluster_name=\"outbound|8080||api-{destination}.shop.svc.cluster.local\"}} {pair}\n"
        ));
        out.push_str("# TYPE istio_requests_total counter\n");
        for code in [200, 404, 503] {
            let labels = labels(source, destination, code);
            out.push_str(&format!(
                "istio_requests_total{{{labels}}} {}\n",
                pair * 7 + 1
            ));
        }
        out.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
        let labels = labels(source, destination, 200);
        for (i, le) in BOUNDS.iter().enumerate() {
            out.push_str(&format!(
                "istio_request_duration_milliseconds_bucket{{{labels},le=\"{le}\"}} {}\n",
                i * 3
            ));
        }
        out.push_str(&format!(
            "istio_request_duration_milliseconds_sum{{{labels}}} 1523.5499999999999545\n"
        ));
        out.push_str(&format!(
            "istio_request_duration_milliseconds_count{{{labels}}} 57\n"
        ));
        pair += 1;
    }
    out
}

fn bench(c: &mut Criterion) {
    let text = envoy_scrape(1 << 20);
    let families = parse(&text, Format::Text, ISTIO_FAMILIES).expect("the generated scrape parses");
    assert_eq!(families.len(), 2);
    let mut group = c.benchmark_group("scrape_parse");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("envoy_1mb", |b| {
        b.iter(|| parse(black_box(&text), Format::Text, ISTIO_FAMILIES))
    });
    let envelope = Envelope::new(&[], "flowtel", "bench");
    group.bench_function("envoy_1mb_to_otlp", |b| {
        b.iter(|| {
            let families = parse(black_box(&text), Format::Text, ISTIO_FAMILIES)
                .expect("the generated scrape parses");
            let mut batch = Batcher::new(&envelope, 3 << 20);
            encode_families(
                &mut batch,
                &families,
                &[
                    ("k8s.pod.name", "api-0-7d9f".to_owned()),
                    ("k8s.namespace.name", "shop".to_owned()),
                ],
                (1, 2),
            );
            batch.finish()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
