//! `export.logs.dns: all`: answered DNS lookups become `flowtel.dns.lookup`
//! records, sampled (`export.logs.dns_sampling`) and rate-limited
//! (`export.logs.dns_rate_limit`), and every one is received or counted:
//! records received + `flowtel.logs.dns.sampled_out` +
//! `flowtel.logs.dns.rate_limited` = answered lookups sent, exactly; every
//! failed lookup is a `flowtel.dns.failed` record, never sampled.
//!
//! dnsmasq (Debian) serves in namespace B; the test's own client in A sends
//! the queries one after another; flowtel (`source: ebpf`) runs in A and
//! exports to the test receiver. Needs root, dnsmasq and an eBPF build;
//! missing, it is skipped ([`common::skip`]), or fails under `CI`.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::dns::{self, DIG, DNSMASQ};
use common::flowtel::{Flowtel, FlowtelArgs, Health};
use common::otlp_receiver::OtlpReceiver;
use common::scenario::{A_V4, B_V4};

const TEST: &str = "answered_lookups_are_sampled_rate_limited_and_counted";
/// Answered lookups sent, and failed ones (NXDOMAIN).
const ANSWERED: usize = 300;
const FAILED: usize = 10;
const SAMPLING: &str = "0.5";
/// Records per second: well below what the client sends.
const RATE_LIMIT: u32 = 20;
const KNOWN: [&str; 3] = ["alpha.known.test", "bravo.known.test", "charlie.known.test"];

#[test]
fn answered_lookups_are_sampled_rate_limited_and_counted() {
    let Some((tools, found)) =
        common::prerequisites_with(TEST, &[DNSMASQ, DIG], &common::ebpf_conditions())
    else {
        return;
    };
    let [dnsmasq, dig]: [PathBuf; 2] = found.try_into().expect("two tools");
    let lab = dns::lab_with_dnsmasq(&tools, (&dnsmasq, &dig), &KNOWN);

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
            ("FLOWTEL_EXPORT__LOGS__DNS", "all".to_string()),
            ("FLOWTEL_EXPORT__LOGS__DNS_SAMPLING", SAMPLING.to_string()),
            (
                "FLOWTEL_EXPORT__LOGS__DNS_RATE_LIMIT",
                RATE_LIMIT.to_string(),
            ),
            // Only the DNS limit applies: the records of all kinds together
            // are not limited.
            ("FLOWTEL_EXPORT__LOGS__RATE_LIMIT", "0".to_string()),
            ("FLOWTEL_EXPORT__LOGS__FLOWS", "false".to_string()),
            ("FLOWTEL_EBPF__TCP__ENABLED", "false".to_string()),
        ],
    })
    .expect("starting flowtel");
    flowtel
        .wait_ready(Duration::from_secs(30))
        .expect("flowtel becomes ready");

    let mut questions: Vec<(String, u16)> = (0..ANSWERED)
        .map(|i| (KNOWN[i % KNOWN.len()].to_string(), 1))
        .collect();
    questions.extend((0..FAILED).map(|i| (format!("missing{i}.test"), 1)));
    let rcodes = dns::udp_lookups(&lab.a, A_V4, B_V4, &questions, 0x1000);
    let mut sent: BTreeMap<Option<u8>, usize> = BTreeMap::new();
    for r in &rcodes {
        *sent.entry(*r).or_default() += 1;
    }
    println!("{TEST}: sent {} lookups, by RCODE {sent:?}", rcodes.len());
    assert_eq!(
        sent,
        BTreeMap::from([(Some(0), ANSWERED), (Some(3), FAILED)]),
        "what dnsmasq answered"
    );

    // Every answered lookup is a record or counted; every failed one is a
    // record. Wait on those counts, then check them exactly.
    let events = |name: &str| {
        receiver
            .log_events()
            .into_iter()
            .filter(|e| e.event_name == name)
            .collect::<Vec<_>>()
    };
    let counted = |stat: &str| flowtel.stat(stat).unwrap_or(0);
    let accounted = || {
        events("flowtel.dns.lookup").len() as u64
            + counted("dns_lookups_sampled_out")
            + counted("dns_lookups_rate_limited")
    };
    common::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        accounted() >= ANSWERED as u64 && events("flowtel.dns.failed").len() >= FAILED
    });
    // One more interval, so a record or count too many would show.
    let since = flowtel.progress().expect("/readyz");
    flowtel
        .wait_for_interval_after(&since, Duration::from_secs(10))
        .expect("an interval after the lookups were accounted for");
    let lookups = events("flowtel.dns.lookup");
    let failed = events("flowtel.dns.failed");
    let (sampled_out, rate_limited) = (
        counted("dns_lookups_sampled_out"),
        counted("dns_lookups_rate_limited"),
    );
    println!(
        "{TEST}: {ANSWERED} answered = {} flowtel.dns.lookup records + {sampled_out} sampled out + \
         {rate_limited} rate-limited; {FAILED} NXDOMAIN = {} flowtel.dns.failed records \
         (sampling {SAMPLING}, {RATE_LIMIT}/s)",
        lookups.len(),
        failed.len()
    );
    assert_eq!(
        lookups.len() as u64 + sampled_out + rate_limited,
        ANSWERED as u64,
        "{TEST}: records + sampled out + rate-limited = answered lookups"
    );
    assert_eq!(failed.len(), FAILED, "{TEST}: one record per failed lookup");
    assert!(
        sampled_out > 0 && rate_limited > 0 && !lookups.is_empty(),
        "{TEST}: sampling and the limit must each have dropped some, and records arrived"
    );
    assert_eq!(counted("records_dropped"), 0, "no record lost");
    assert_eq!(counted("log_records_rate_limited"), 0, "no global limit");
    for e in &lookups {
        assert_eq!(e.str("flowtel.dns.rcode"), Some("NOERROR"), "{e:?}");
        assert!(
            KNOWN.contains(&e.str("dns.question.name").unwrap_or_default()),
            "{e:?}"
        );
        assert_eq!(e.str("source.address"), Some(A_V4), "{e:?}");
        assert_eq!(e.str("destination.address"), Some(B_V4), "{e:?}");
    }
    for e in &failed {
        assert_eq!(e.str("flowtel.dns.rcode"), Some("NXDOMAIN"), "{e:?}");
    }
    let status = flowtel.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "flowtel did not exit cleanly: {status:?}\n{}",
        flowtel.output()
    );
}
