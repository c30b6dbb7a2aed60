//! Scraping Envoy, ztunnel and Felix endpoints served by local HTTP servers:
//! real-shaped expositions come out as OTel-named families, and every bad
//! response is a typed error within the time cap, with bounded memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use flowtel::flow::mesh::{Family, HistogramValue, PointValue};
use flowtel::source::scrape::{ScrapeError, ScrapeLimits, Scraper, DEFAULT_MAX_SERIES};
use flowtel::source::{felix, istio};
use flowtel::telemetry::catalogue::Instrument;
use tokio::io::AsyncWriteExt;

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The full label set an Envoy sidecar puts on Istio's standard metrics, in
/// Envoy's order, for a productpage -> reviews call seen by the reviews pod.
fn envoy_labels(code: &str, flags: &str, extra: &str) -> String {
    format!(
        "reporter=\"destination\",source_workload=\"productpage-v1\",source_canonical_service=\"productpage\",\
source_canonical_revision=\"v1\",source_workload_namespace=\"bookinfo\",\
source_principal=\"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage\",source_app=\"productpage\",\
source_version=\"v1\",source_cluster=\"Kubernetes\",destination_workload=\"reviews-v2\",\
destination_workload_namespace=\"bookinfo\",destination_principal=\"spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews\",\
destination_app=\"reviews\",destination_version=\"v2\",destination_service=\"reviews.bookinfo.svc.cluster.local\",\
destination_canonical_service=\"reviews\",destination_canonical_revision=\"v2\",destination_service_name=\"reviews\",\
destination_service_namespace=\"bookinfo\",destination_cluster=\"Kubernetes\",request_protocol=\"http\",\
response_code=\"{code}\",grpc_response_status=\"\",response_flags=\"{flags}\",connection_security_policy=\"mutual_tls\"{extra}"
    )
}

const DURATION_BOUNDS: [&str; 20] = [
    "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000",
    "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf",
];

/// An Envoy sidecar's `:15090/stats/prometheus`: Envoy writes `# TYPE` lines
/// only, `_total` in counter family names, `{}` on unlabelled stats, and its
/// own `envoy_*` families around Istio's.
fn envoy_scrape() -> String {
    let ok = envoy_labels("200", "-", "");
    let failed = envoy_labels("503", "UF,URX", "");
    // A Telemetry API custom tag, with the three escapes.
    let agent = envoy_labels(
        "200",
        "-",
        ",user_agent=\"curl/8.5 \\\"probe\\\" C:\\\\x\\nnext\"",
    );
    let cumulative = [
        0, 2, 31, 77, 101, 110, 114, 117, 118, 119, 120, 120, 120, 120, 120, 120, 120, 120, 120,
        120,
    ];
    let mut s = String::new();
    s.push_str("# TYPE envoy_cluster_upstream_cx_total counter\n");
    s.push_str("envoy_cluster_upstream_cx_total{cluster_name=\"outbound|9080||ratings.bookinfo.svc.cluster.local\"} 17\n");
    s.push_str("envoy_cluster_upstream_cx_total{cluster_name=\"inbound|9080||\"} 42\n");
    s.push_str("# TYPE istio_requests_total counter\n");
    s.push_str(&format!("istio_requests_total{{{ok}}} 120\n"));
    s.push_str(&format!("istio_requests_total{{{failed}}} 3\n"));
    s.push_str(&format!("istio_requests_total{{{agent}}} 1\n"));
    s.push_str("# TYPE istio_tcp_connections_opened_total counter\n");
    s.push_str(&format!(
        "istio_tcp_connections_opened_total{{{}}} 9\n",
        envoy_labels("0", "-", "").replace("\"http\"", "\"tcp\"")
    ));
    s.push_str("# TYPE envoy_server_uptime gauge\n");
    s.push_str("envoy_server_uptime{} 3412\n");
    s.push_str("# TYPE istio_request_duration_milliseconds histogram\n");
    for (le, count) in DURATION_BOUNDS.iter().zip(cumulative) {
        s.push_str(&format!(
            "istio_request_duration_milliseconds_bucket{{{ok},le=\"{le}\"}} {count}\n"
        ));
    }
    s.push_str(&format!(
        "istio_request_duration_milliseconds_sum{{{ok}}} 10523.5499999999999545\n"
    ));
    s.push_str(&format!(
        "istio_request_duration_milliseconds_count{{{ok}}} 120\n"
    ));
    s.push_str("# TYPE envoy_http_downstream_rq_time histogram\n");
    s.push_str("envoy_http_downstream_rq_time_bucket{http_conn_manager_prefix=\"inbound_0.0.0.0_9080\",le=\"0.5\"} 0\n");
    s.push_str("envoy_http_downstream_rq_time_bucket{http_conn_manager_prefix=\"inbound_0.0.0.0_9080\",le=\"+Inf\"} 123\n");
    s.push_str("envoy_http_downstream_rq_time_sum{http_conn_manager_prefix=\"inbound_0.0.0.0_9080\"} 10600\n");
    s.push_str("envoy_http_downstream_rq_time_count{http_conn_manager_prefix=\"inbound_0.0.0.0_9080\"} 123\n");
    s
}

/// ztunnel's `:15020/metrics` (ambient mode): OpenMetrics, with the family
/// named without `_total` in `# TYPE`, `# UNIT`, `{}` and a final `# EOF`.
fn ztunnel_scrape() -> String {
    let l4 = "reporter=\"destination\",source_workload=\"sleep\",source_canonical_service=\"sleep\",\
source_canonical_revision=\"latest\",source_workload_namespace=\"apps\",\
source_principal=\"spiffe://cluster.local/ns/apps/sa/sleep\",source_app=\"sleep\",source_version=\"latest\",\
source_cluster=\"Kubernetes\",destination_service=\"httpbin.apps.svc.cluster.local\",\
destination_service_namespace=\"apps\",destination_service_name=\"httpbin\",destination_workload=\"httpbin\",\
destination_canonical_service=\"httpbin\",destination_canonical_revision=\"v1\",destination_workload_namespace=\"apps\",\
destination_principal=\"spiffe://cluster.local/ns/apps/sa/httpbin\",destination_app=\"httpbin\",destination_version=\"v1\",\
destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"";
    format!(
        "# HELP istio_build Istio component build info.\n\
# TYPE istio_build gauge\n\
istio_build{{component=\"ztunnel\",tag=\"1.24.2\"}} 1\n\
# HELP istio_tcp_connections_opened The total number of TCP connections opened.\n\
# TYPE istio_tcp_connections_opened counter\n\
istio_tcp_connections_opened_total{{{l4}}} 14\n\
# HELP istio_tcp_connections_closed The total number of TCP connections closed.\n\
# TYPE istio_tcp_connections_closed counter\n\
istio_tcp_connections_closed_total{{{l4}}} 12\n\
# HELP istio_tcp_received_bytes The size of total bytes received during request in case of a TCP connection.\n\
# TYPE istio_tcp_received_bytes counter\n\
istio_tcp_received_bytes_total{{{l4}}} 9041\n\
# HELP istio_tcp_sent_bytes The size of total bytes sent during response in case of a TCP connection.\n\
# TYPE istio_tcp_sent_bytes counter\n\
istio_tcp_sent_bytes_total{{{l4}}} 1183402\n\
# HELP istio_dns_upstream_request_duration_seconds Total time in seconds Istio takes to get DNS response from upstream (unstable).\n\
# TYPE istio_dns_upstream_request_duration_seconds histogram\n\
# UNIT istio_dns_upstream_request_duration_seconds seconds\n\
# HELP workload_manager_active_proxy_count The total number current workloads with active proxies (unstable).\n\
# TYPE workload_manager_active_proxy_count gauge\n\
workload_manager_active_proxy_count{{}} 3\n\
# EOF\n"
    )
}

/// Felix's `:9091/metrics` (Go client): `# HELP`/`# TYPE`, counters without
/// `_total`, summaries, and the policy reporter's denied counters with an
/// escaped policy name.
const FELIX_SCRAPE: &str = r#"# HELP calico_denied_bytes Total number of bytes denied by calico policies.
# TYPE calico_denied_bytes gauge
calico_denied_bytes{policy="default|tenant-a/knp.default.deny-all|deny|-1",srcIP="10.244.1.17"} 5120
calico_denied_bytes{policy="profile|kns.\"odd\\name\"|deny|0",srcIP="fd00:10:244::5"} 60
# HELP calico_denied_packets Total number of packets denied by calico policies.
# TYPE calico_denied_packets gauge
calico_denied_packets{policy="default|tenant-a/knp.default.deny-all|deny|-1",srcIP="10.244.1.17"} 80
calico_denied_packets{policy="profile|kns.\"odd\\name\"|deny|0",srcIP="fd00:10:244::5"} 1
# HELP felix_active_local_endpoints Number of active endpoints on this host.
# TYPE felix_active_local_endpoints gauge
felix_active_local_endpoints 11
# HELP felix_int_dataplane_apply_time_seconds Time in seconds that it took to apply a dataplane update.
# TYPE felix_int_dataplane_apply_time_seconds summary
felix_int_dataplane_apply_time_seconds{quantile="0.5"} 0.003172415
felix_int_dataplane_apply_time_seconds{quantile="0.9"} 0.010398762
felix_int_dataplane_apply_time_seconds{quantile="0.99"} NaN
felix_int_dataplane_apply_time_seconds_sum 12.802541739000006
felix_int_dataplane_apply_time_seconds_count 3109
# HELP felix_int_dataplane_failures Number of times dataplane updates failed and will be retried.
# TYPE felix_int_dataplane_failures counter
felix_int_dataplane_failures 2
# HELP felix_int_dataplane_messages Number dataplane messages by type.
# TYPE felix_int_dataplane_messages counter
felix_int_dataplane_messages{type="ifaceAddrsUpdate"} 31
felix_int_dataplane_messages{type="ifaceUpdate"} 58
felix_int_dataplane_messages{type="inSync"} 1
# HELP felix_iptables_rules Number of active iptables rules.
# TYPE felix_iptables_rules gauge
felix_iptables_rules{ip_version="4",table="filter"} 212
felix_iptables_rules{ip_version="4",table="nat"} 17
# HELP felix_resync_state Current datastore state.
# TYPE felix_resync_state gauge
felix_resync_state 3
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 121
"#;

fn with_type(content_type: &'static str, body: impl Into<Body>) -> Response {
    ([(CONTENT_TYPE, content_type)], body.into()).into_response()
}

/// Endless exposition-looking text in 64 KiB chunks, generated as sent.
fn endless() -> Body {
    let chunk = Bytes::from("x_total{a=\"b\"} 1\n".repeat(64 << 10 >> 4));
    let total_chunks = (100 << 20) / chunk.len();
    Body::from_stream(futures::stream::iter(
        (0..total_chunks).map(move |_| Ok::<_, Infallible>(chunk.clone())),
    ))
}

/// `n` distinct `istio_requests_total` series, `source_workload` `w0`,
/// `w1`, ... in that order.
fn distinct_series(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "istio_requests_total{{reporter=\"destination\",source_workload=\"w{i}\",destination_workload=\"d\",response_code=\"200\"}} {i}\n"
            )
        })
        .collect()
}

/// One byte every 100 ms, forever.
fn trickle() -> Body {
    Body::from_stream(futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, Infallible>(Bytes::from_static(b"#")), ()))
    }))
}

async fn serve() -> SocketAddr {
    let app = Router::new()
        .route("/stats/prometheus", get(|| async { with_type("text/plain; charset=UTF-8", envoy_scrape()) }))
        .route("/metrics", get(|| async { with_type(OPENMETRICS, ztunnel_scrape()) }))
        .route("/felix/metrics", get(|| async { with_type(PROMETHEUS_TEXT, FELIX_SCRAPE) }))
        .route("/html", get(|| async { with_type("text/html; charset=utf-8", "<html>istio_requests_total 1</html>\n") }))
        .route("/protobuf", get(|| async { with_type("application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited", "x") }))
        .route("/untyped", get(|| async { Response::new(Body::from("istio_requests_total 1\n")) }))
        .route("/latin1", get(|| async { with_type(PROMETHEUS_TEXT, b"istio_requests_total{user=\"Jos\xe9\"} 1\n".to_vec()) }))
        .route("/garbled", get(|| async { with_type(PROMETHEUS_TEXT, "istio_requests_total{reporter=\"source\" 1\n") }))
        .route("/huge", get(|| async { with_type(PROMETHEUS_TEXT, endless()) }))
        .route("/slow", get(|| async { with_type(PROMETHEUS_TEXT, trickle()) }))
        .route("/distinct", get(|| async { with_type(PROMETHEUS_TEXT, distinct_series(20_000)) }))
        .route("/unavailable", get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no\n").into_response() }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

/// A server that writes `response` byte for byte on every connection, then
/// waits `linger` before closing: for what a well-behaved framework will not
/// send (a body shorter than its Content-Length, trickled headers).
async fn raw_server(response: Vec<u8>, per_byte: Option<Duration>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut request).await;
                match per_byte {
                    Some(delay) => {
                        for byte in response {
                            if stream.write_all(&[byte]).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(delay).await;
                        }
                    }
                    None => {
                        let _ = stream.write_all(&response).await;
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    address
}

fn scraper(max_bytes: usize, timeout: Duration) -> Scraper {
    Scraper::new(ScrapeLimits {
        max_bytes,
        timeout,
        max_series: DEFAULT_MAX_SERIES,
    })
    .expect("a client")
}

fn family<'a>(families: &'a [Family], name: &str) -> &'a Family {
    families
        .iter()
        .find(|f| f.metric.name == name)
        .unwrap_or_else(|| {
            panic!(
                "{name} missing from {:?}",
                families.iter().map(|f| f.metric.name).collect::<Vec<_>>()
            )
        })
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn envoy_sidecar_families_with_otel_names() {
    let address = serve().await;
    let families = istio::scrape(
        &scraper(1 << 20, Duration::from_secs(5)),
        &format!("http://{address}/stats/prometheus"),
    )
    .await
    .expect("a good scrape")
    .families;
    let names: Vec<_> = families.iter().map(|f| f.metric.name).collect();
    assert_eq!(
        names,
        [
            "istio.requests",
            "istio.request.duration",
            "istio.tcp.connections.opened"
        ]
    );

    let requests = family(&families, "istio.requests");
    assert_eq!(
        (requests.metric.instrument, requests.metric.unit),
        (Instrument::Counter, "{request}")
    );
    assert_eq!(requests.points.len(), 3);
    let first = &requests.points[0];
    assert_eq!(first.labels.len(), 25, "every label Envoy wrote is kept");
    assert_eq!(
        label(&first.labels, "destination_workload"),
        Some("reviews-v2")
    );
    assert_eq!(label(&first.labels, "grpc_response_status"), Some(""));
    assert_eq!(first.value, PointValue::Number(120.0));
    assert_eq!(
        label(&requests.points[1].labels, "response_flags"),
        Some("UF,URX")
    );
    assert_eq!(
        label(&requests.points[2].labels, "user_agent"),
        Some("curl/8.5 \"probe\" C:\\x\nnext")
    );

    let duration = family(&families, "istio.request.duration");
    assert_eq!(
        (duration.metric.instrument, duration.metric.unit),
        (Instrument::Histogram, "ms")
    );
    assert_eq!(duration.points.len(), 1);
    assert!(label(&duration.points[0].labels, "le").is_none());
    let PointValue::Histogram(HistogramValue {
        bounds,
        counts,
        sum,
        count,
    }) = &duration.points[0].value
    else {
        panic!("not a histogram: {:?}", duration.points[0].value);
    };
    assert_eq!(bounds.len(), 19);
    assert_eq!((bounds[0], bounds[18]), (0.5, 3_600_000.0));
    assert_eq!(&counts[..5], &[0, 2, 29, 46, 24]);
    assert_eq!(counts.iter().sum::<u64>(), 120);
    assert_eq!(*count, 120);
    assert!((sum - 10523.55).abs() < 1e-6);
}

#[tokio::test]
async fn ztunnel_openmetrics_families() {
    let address = serve().await;
    let families = istio::scrape(
        &scraper(1 << 20, Duration::from_secs(5)),
        &format!("http://{address}/metrics"),
    )
    .await
    .expect("a good scrape")
    .families;
    let names: Vec<_> = families
        .iter()
        .map(|f| (f.metric.name, f.metric.unit))
        .collect();
    assert_eq!(
        names,
        [
            ("istio.tcp.sent", "By"),
            ("istio.tcp.received", "By"),
            ("istio.tcp.connections.opened", "{connection}"),
            ("istio.tcp.connections.closed", "{connection}"),
        ]
    );
    let sent = family(&families, "istio.tcp.sent");
    assert_eq!(sent.points[0].value, PointValue::Number(1_183_402.0));
    assert_eq!(
        label(&sent.points[0].labels, "source_principal"),
        Some("spiffe://cluster.local/ns/apps/sa/sleep")
    );
    assert_eq!(sent.points[0].labels.len(), 23);
}

#[tokio::test]
async fn felix_dataplane_and_policy_families() {
    let address = serve().await;
    let url = format!("http://{address}/felix/metrics");
    let families = scraper(1 << 20, Duration::from_secs(5))
        .scrape(&url, felix::FELIX_FAMILIES)
        .await
        .expect("a good scrape")
        .families;
    let denied = family(&families, "calico.denied.packets");
    assert_eq!(denied.metric.instrument, Instrument::Gauge);
    assert_eq!(denied.points.len(), 2);
    assert_eq!(
        label(&denied.points[1].labels, "policy"),
        Some("profile|kns.\"odd\\name\"|deny|0")
    );
    assert_eq!(
        label(&denied.points[1].labels, "srcIP"),
        Some("fd00:10:244::5")
    );
    assert_eq!(
        family(&families, "calico.denied.bytes").points[0].value,
        PointValue::Number(5120.0)
    );
    let failures = family(&families, "felix.dataplane.failures");
    assert_eq!(
        (failures.metric.instrument, &failures.points[0].value),
        (Instrument::Counter, &PointValue::Number(2.0))
    );
    assert_eq!(
        family(&families, "felix.dataplane.messages").points.len(),
        3
    );
    assert_eq!(family(&families, "felix.iptables.rules").points.len(), 2);
    assert!(families.iter().all(|f| !f.metric.name.starts_with("go")));
    assert_eq!(
        felix::metrics_url(address),
        format!("http://{address}/metrics")
    );
}

/// The series budget over HTTP: the Envoy scrape's five series (three
/// request counters, one TCP counter, one histogram, in that order) and
/// 20,000 distinct series against the default budget of 10,000.
#[tokio::test]
async fn series_past_max_series_are_shed_and_counted() {
    let address = serve().await;
    let envoy = format!("http://{address}/stats/prometheus");
    let within = |max_series| {
        Scraper::new(ScrapeLimits {
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(5),
            max_series,
        })
        .expect("a client")
    };
    for (max_series, requests, tcp, histograms, shed) in [
        (5, 3, 1, 1, 0),
        (4, 3, 1, 0, 1),
        (3, 3, 0, 0, 2),
        (1, 1, 0, 0, 4),
    ] {
        let parsed = istio::scrape(&within(max_series), &envoy)
            .await
            .expect("a good scrape");
        let len = |name: &str| {
            parsed
                .families
                .iter()
                .find(|f| f.metric.name == name)
                .map_or(0, |f| f.points.len())
        };
        assert_eq!(
            (
                len("istio.requests"),
                len("istio.tcp.connections.opened"),
                len("istio.request.duration"),
                parsed.series_shed
            ),
            (requests, tcp, histograms, shed),
            "max_series {max_series}"
        );
    }

    let parsed = scraper(16 << 20, Duration::from_secs(10))
        .scrape(&format!("http://{address}/distinct"), istio::ISTIO_FAMILIES)
        .await
        .expect("a good scrape");
    assert_eq!(DEFAULT_MAX_SERIES, 10_000);
    assert_eq!(parsed.series_shed, 10_000);
    let requests = family(&parsed.families, "istio.requests");
    assert_eq!(requests.points.len(), 10_000);
    assert_eq!(
        label(&requests.points[9_999].labels, "source_workload"),
        Some("w9999")
    );
    assert_eq!(requests.points[9_999].value, PointValue::Number(9_999.0));
}

/// Scrapes `path` and returns the error and how long it took.
async fn failing(scraper: &Scraper, url: String) -> (ScrapeError, Duration) {
    let start = Instant::now();
    let result = istio::scrape(scraper, &url).await;
    let elapsed = start.elapsed();
    (result.expect_err("an error"), elapsed)
}

#[tokio::test]
async fn wrong_content_type_and_status() {
    let address = serve().await;
    let scraper = scraper(1 << 20, Duration::from_secs(5));
    for path in ["html", "protobuf", "untyped"] {
        let (error, _) = failing(&scraper, format!("http://{address}/{path}")).await;
        assert!(
            matches!(error, ScrapeError::ContentType(_)),
            "{path}: {error:?}"
        );
        assert_eq!(error.kind(), "content_type");
    }
    let (error, _) = failing(&scraper, format!("http://{address}/unavailable")).await;
    assert_eq!(error, ScrapeError::Status(503));
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address");
    let (error, _) = failing(&scraper, format!("http://{closed}/stats/prometheus")).await;
    assert_eq!(error.kind(), "request", "{error}");
}

#[tokio::test]
async fn non_utf8_and_garbled_bodies() {
    let address = serve().await;
    let scraper = scraper(1 << 20, Duration::from_secs(5));
    let (error, _) = failing(&scraper, format!("http://{address}/latin1")).await;
    assert_eq!(error, ScrapeError::NotUtf8 { offset: 30 });
    let (error, _) = failing(&scraper, format!("http://{address}/garbled")).await;
    assert_eq!(
        error,
        ScrapeError::Parse {
            line: 1,
            reason: "malformed labels"
        }
    );
}

#[tokio::test]
async fn truncated_bodies() {
    let scraper = scraper(1 << 20, Duration::from_secs(5));
    let body = envoy_scrape();
    let cut = &body.as_bytes()[..body.len() / 2];

    // Fewer bytes than Content-Length promised, then the connection closes.
    let mut short = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {PROMETHEUS_TEXT}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    short.extend_from_slice(cut);
    let address = raw_server(short, None).await;
    let (error, _) = failing(&scraper, format!("http://{address}/stats/prometheus")).await;
    assert!(matches!(error, ScrapeError::Truncated(_)), "{error:?}");

    // Close-delimited (no length): only the half line at the end shows it.
    let mut unframed =
        format!("HTTP/1.1 200 OK\r\nContent-Type: {PROMETHEUS_TEXT}\r\nConnection: close\r\n\r\n")
            .into_bytes();
    unframed.extend_from_slice(cut);
    let address = raw_server(unframed, None).await;
    let (error, _) = failing(&scraper, format!("http://{address}/stats/prometheus")).await;
    assert!(matches!(error, ScrapeError::Truncated(_)), "{error:?}");

    // OpenMetrics cut at a line boundary: the missing `# EOF` shows it.
    let ztunnel = ztunnel_scrape();
    let lines: Vec<&str> = ztunnel.lines().take(8).collect();
    let mut no_eof =
        format!("HTTP/1.1 200 OK\r\nContent-Type: {OPENMETRICS}\r\nConnection: close\r\n\r\n")
            .into_bytes();
    no_eof.extend_from_slice(format!("{}\n", lines.join("\n")).as_bytes());
    let address = raw_server(no_eof, None).await;
    let (error, _) = failing(&scraper, format!("http://{address}/metrics")).await;
    assert_eq!(error, ScrapeError::Truncated("no # EOF".into()));
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn a_100_mb_response_stops_at_the_cap() {
    let address = serve().await;
    let scraper = scraper(4 << 20, Duration::from_secs(10));
    let (error, elapsed) = failing(&scraper, format!("http://{address}/huge")).await;
    assert_eq!(error, ScrapeError::TooLarge { limit: 4 << 20 });
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    // Announced up front: refused before reading the body.
    let declared = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {PROMETHEUS_TEXT}\r\nContent-Length: {}\r\n\r\nistio_requests_total 1\n",
        100u64 << 20
    );
    let address = raw_server(declared.into_bytes(), None).await;
    let (error, _) = failing(&scraper, format!("http://{address}/stats/prometheus")).await;
    assert_eq!(error, ScrapeError::TooLarge { limit: 4 << 20 });

    // The whole test process never held anything near 100 MB.
    let peak = peak_rss_bytes();
    assert!(peak < 80 << 20, "peak RSS {} MiB", peak >> 20);
}

#[tokio::test]
async fn slow_loris_is_cut_at_the_time_cap() {
    let address = serve().await;
    let cap = Duration::from_millis(800);
    let scraper = scraper(1 << 20, cap);
    let (error, elapsed) = failing(&scraper, format!("http://{address}/slow")).await;
    assert_eq!(error, ScrapeError::Timeout(cap));
    assert!(elapsed < cap + Duration::from_millis(500), "{elapsed:?}");

    // Headers trickled too.
    let response = format!("HTTP/1.1 200 OK\r\nContent-Type: {PROMETHEUS_TEXT}\r\nContent-Length: 23\r\n\r\nistio_requests_total 1\n");
    let address = raw_server(response.into_bytes(), Some(Duration::from_millis(50))).await;
    let (error, elapsed) = failing(&scraper, format!("http://{address}/stats/prometheus")).await;
    assert_eq!(error, ScrapeError::Timeout(cap));
    assert!(elapsed < cap + Duration::from_millis(500), "{elapsed:?}");
}
