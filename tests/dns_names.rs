//! `flows.dns_top_names`: query names as series of
//! `flowtel.dns.name.requests`, the top K of each interval keeping theirs
//! and every other name's lookups in one overflow series, counted in
//! `flowtel.dns.names.overflowed`. The counts per name, the overflow and
//! the counter must be exactly what the test's client asked.
//!
//! dnsmasq (Debian) serves in namespace B; the test's own client in A sends
//! the queries one after another, in rounds (each name once per round while
//! it has lookups left), so that in every interval a name with more lookups
//! in all has at least as many as one with fewer, whatever the interval
//! boundaries. flowtel (`source: ebpf`) runs in A and exports to the test
//! receiver. Needs root, dnsmasq and an eBPF build; missing, it is skipped
//! ([`common::skip`]), or fails under `CI`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::dns::{self, DIG, DNSMASQ};
use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::otlp_receiver::{AttrValue, OtlpReceiver};
use common::scenario::{A_V4, B_V4};

const TEST: &str = "the_top_query_names_are_series_and_the_rest_overflow";
/// `flows.dns_top_names`.
const K: usize = 3;
/// Names and how many lookups each gets: the first K keep series.
const NAMES: [(&str, usize); 5] = [
    ("alpha.known.test", 10),
    ("bravo.known.test", 8),
    ("charlie.known.test", 6),
    ("delta.known.test", 4),
    ("echo.known.test", 2),
];
const OVERFLOW: &str = "<overflow>";

#[test]
fn the_top_query_names_are_series_and_the_rest_overflow() {
    let Some((tools, found)) =
        common::prerequisites_with(TEST, &[DNSMASQ, DIG], &common::ebpf_conditions())
    else {
        return;
    };
    let [dnsmasq, dig]: [PathBuf; 2] = found.try_into().expect("two tools");
    let known: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
    let lab = dns::lab_with_dnsmasq(&tools, (&dnsmasq, &dig), &known);
    let receiver = OtlpReceiver::start().expect("starting the test OTLP receiver");
    let endpoint = receiver.grpc_endpoint();
    let netns = lab.a.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "ebpf",
        netns: &netns,
        endpoint: &endpoint,
        protocol: "grpc",
        interval: "1s",
        env: vec![
            ("FLOWTEL_FLOWS__DNS_TOP_NAMES", K.to_string()),
            ("FLOWTEL_EBPF__TCP__ENABLED", "false".to_string()),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");

    let rounds = NAMES.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let questions: Vec<(String, u16)> = (0..rounds)
        .flat_map(|r| {
            NAMES
                .iter()
                .filter(move |(_, n)| *n > r)
                .map(|(name, _)| (name.to_string(), 1))
        })
        .collect();
    let rcodes = dns::udp_lookups(&lab.a, A_V4, B_V4, &questions, 0x2000);
    assert!(
        rcodes.iter().all(|r| *r == Some(0)),
        "dnsmasq answered every lookup: {rcodes:?}"
    );
    let total: u64 = NAMES.iter().map(|(_, n)| *n as u64).sum();
    let mut want: BTreeMap<String, u64> = NAMES[..K]
        .iter()
        .map(|(name, n)| (name.to_string(), *n as u64))
        .collect();
    let folded: u64 = NAMES[K..].iter().map(|(_, n)| *n as u64).sum();
    want.insert(OVERFLOW.to_string(), folded);

    let series = || -> BTreeMap<String, u64> {
        receiver
            .latest("flowtel.dns.name.requests", 0)
            .iter()
            .map(|(attrs, p)| {
                let name = match (
                    attrs.get("dns.question.name"),
                    attrs.get("otel.metric.overflow"),
                ) {
                    (Some(AttrValue::Str(n)), None) => n.clone(),
                    (None, Some(AttrValue::Bool(true))) => OVERFLOW.to_string(),
                    _ => format!("unexpected {attrs:?}"),
                };
                (name, p.value)
            })
            .collect()
    };
    common::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        series().values().sum::<u64>() >= total
    });
    // One more interval, so a count too many would show.
    let since = flowtel.progress().expect("/readyz");
    flowtel
        .wait_for_interval_after(&since, Duration::from_secs(10))
        .expect("an interval after the lookups were counted");
    let got = series();
    let overflowed = flowtel.stat("dns_names_overflowed").expect("/readyz");
    println!(
        "{TEST}: sent {total} lookups {:?}; flowtel.dns.name.requests {got:?}; \
         flowtel.dns.names.overflowed {overflowed}",
        NAMES
    );
    assert_eq!(got, want, "{TEST}: series per name and the overflow");
    assert_eq!(overflowed, folded, "{TEST}: lookups folded");
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly: {status:?}\n{}",
        flowtel.output()
    );
}
