//! The firewall source against the real kernel: namespaces A and B joined
//! by a veth pair; in B, nftables rules shaped like kube-proxy's nftables
//! mode and like Calico's (`cali-*` chains, `Policy ...` comments), a
//! kube-proxy reject written by `iptables-nft` (xt match and target
//! expressions), and legacy xtables rules shaped like
//! kube-proxy's iptables mode and Calico's, loaded with Debian's
//! `iptables-legacy`. A sends UDP datagrams of known size to five ports:
//! two are accepted, two dropped, one rejected. flowtel (`--netns B`) exports over OTLP
//! to the test receiver.
//!
//! * Every rule's packets and bytes must equal the kernel's own counters
//!   (`nft -j list ruleset`, `iptables-legacy -L -v -x`) once the traffic
//!   has stopped; the drop rules' packets must equal what A sent them; the
//!   drop view must name the policies; the drop events must carry the
//!   deltas.
//! * Then the rulesets are replaced as a kube-proxy resync or a Calico
//!   update does (nftables tables flushed and loaded again, one with its
//!   counters restored; the legacy table restored without counters) and
//!   the traffic sent again: every total must be the sum of both rounds,
//!   never less (a negative delta) and never more (a doubled one).
//!
//! Needs root, `ip`, `nft`, `iptables-legacy` (Debian's `iptables`).

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::flowtel::{Flowtel, FlowtelArgs};
use common::netns::{Netns, NetnsGuard, VethEnd};
use common::otlp_receiver::{AttrValue, OtlpReceiver, SumPoint};
use common::{wait_until, Tool};

const A_V4: &str = "198.18.18.1";
const B_V4: &str = "198.18.18.2";
const WAIT: Duration = Duration::from_secs(30);

const IPTABLES_LEGACY: Tool = Tool {
    name: "iptables-legacy",
    env: "IPTABLES_LEGACY_BIN",
    fallbacks: &["/usr/sbin/iptables-legacy", "/sbin/iptables-legacy"],
};
const IPTABLES_NFT: Tool = Tool {
    name: "iptables-nft",
    env: "IPTABLES_NFT_BIN",
    fallbacks: &["/usr/sbin/iptables-nft", "/sbin/iptables-nft"],
};
const IPTABLES_LEGACY_RESTORE: Tool = Tool {
    name: "iptables-legacy-restore",
    env: "IPTABLES_LEGACY_RESTORE_BIN",
    fallbacks: &[
        "/usr/sbin/iptables-legacy-restore",
        "/sbin/iptables-legacy-restore",
    ],
};

/// The ports A sends to, what B's rules do with them, how many datagrams
/// of how many payload bytes.
const KUBE_NFT_PORT: u16 = 7001;
const CALICO_NFT_PORT: u16 = 7002;
const KUBE_LEGACY_PORT: u16 = 7003;
const CALICO_LEGACY_PORT: u16 = 7004;
/// Rejected by an `iptables-nft` rule (nftables with xt expressions).
const KUBE_IPTABLES_NFT_PORT: u16 = 7005;
const SENDS: &[(u16, u64, usize)] = &[
    (KUBE_NFT_PORT, 23, 100),
    (CALICO_NFT_PORT, 17, 300),
    (KUBE_LEGACY_PORT, 11, 500),
    (CALICO_LEGACY_PORT, 7, 700),
    (KUBE_IPTABLES_NFT_PORT, 5, 200),
];

const KUBE_NFT: &str = "chain input {\n  type filter hook input priority 0; policy accept;\n  \
    udp dport 7001 counter jump service-ULMVA6XW-default/web/udp/http\n}\n\
    chain service-ULMVA6XW-default/web/udp/http {\n  \
    counter jump endpoint-5OJB2KTY-default/web/udp/http__198.18.18.2/7001 comment \"default/web:http\"\n}\n\
    chain endpoint-5OJB2KTY-default/web/udp/http__198.18.18.2/7001 {\n  \
    counter accept comment \"default/web:http\"\n}";

const CALICO_NFT: &str =
    "chain cali-INPUT {\n  type filter hook input priority 5; policy accept;\n  \
    udp dport 7002 counter jump cali-pi-_AbCdEf comment \"cali:Zz9\"\n}\n\
    chain cali-pi-_AbCdEf {\n  \
    counter drop comment \"Policy default/knp.default.deny-db ingress\"\n}";

const LEGACY: &str = "*filter\n\
:INPUT ACCEPT [0:0]\n\
:FORWARD ACCEPT [0:0]\n\
:OUTPUT ACCEPT [0:0]\n\
:KUBE-SVC-API - [0:0]\n\
:cali-pi-_Qq9 - [0:0]\n\
-A INPUT -p udp -m udp --dport 7003 -m comment --comment \"default/api:grpc cluster IP\" -j KUBE-SVC-API\n\
-A INPUT -p udp -m udp --dport 7004 -m comment --comment \"cali:Yy8\" -j cali-pi-_Qq9\n\
-A KUBE-SVC-API -m comment --comment \"default/api:grpc -> 198.18.18.2:7003\" -j ACCEPT\n\
-A cali-pi-_Qq9 -m comment --comment \"cali:Xx7\" -m comment --comment \"Policy prod/knp.default.deny-all ingress\" -j DROP\n\
COMMIT\n";

/// (backend, family, table, chain, position) → (packets, bytes).
type Counts = BTreeMap<(String, String, String, String, String), (u64, u64)>;

fn key(
    backend: &str,
    family: &str,
    table: &str,
    chain: &str,
    position: u32,
) -> (String, String, String, String, String) {
    (
        backend.into(),
        family.into(),
        table.into(),
        chain.into(),
        position.to_string(),
    )
}

/// The kernel's counters once the datagrams sent so far (`rounds` times
/// [`SENDS`]) have all reached their last rule and two reads agree.
fn settled_kernel_counts(b: &Netns, iptables: &PathBuf, rounds: u64) -> Counts {
    let mut last = Counts::new();
    let ok = wait_until(WAIT, Duration::from_millis(100), || {
        let now = kernel_counts(b, iptables);
        let done = now == last
            && [
                (
                    "endpoint-5OJB2KTY-default/web/udp/http__198.18.18.2/7001",
                    23,
                ),
                ("cali-pi-_AbCdEf", 17),
                ("KUBE-SVC-API", 11),
                ("cali-pi-_Qq9", 7),
            ]
            .iter()
            .all(|(chain, n)| {
                // ft_kube keeps its counts across the reload; the other
                // tables start again from zero.
                let want = if chain.starts_with("endpoint-") {
                    n * rounds
                } else {
                    *n
                };
                sum(&now, chain).0 >= want
            })
            // iptables-nft's reject rule keeps its counts.
            && now
                .get(&key("nftables", "ip", "filter", "INPUT", 1))
                .is_some_and(|c| c.0 >= 5 * rounds);
        last = now;
        done
    });
    assert!(ok, "the kernel's counters did not settle: {last:#?}");
    last
}

/// Every rule counter of the test's tables as the kernel shows them:
/// `nft -j list ruleset` and `iptables-legacy -L -v -x -n --line-numbers`.
fn kernel_counts(b: &Netns, iptables: &PathBuf) -> Counts {
    let mut out = Counts::new();
    let json = b
        .run("nft", &["-j", "list", "ruleset"])
        .expect("nft -j list ruleset");
    let v: serde_json::Value = serde_json::from_str(&json).expect("nft JSON");
    let mut position: BTreeMap<(String, String, String), u32> = BTreeMap::new();
    for item in v["nftables"].as_array().expect("nftables array") {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        let s = |k: &str| rule[k].as_str().unwrap_or_default().to_owned();
        let n = position
            .entry((s("family"), s("table"), s("chain")))
            .or_insert(0);
        *n += 1;
        let counter = rule["expr"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|e| e.get("counter"));
        if let Some(c) = counter {
            let (p, by) = (
                c["packets"].as_u64().unwrap_or(0),
                c["bytes"].as_u64().unwrap_or(0),
            );
            if p > 0 {
                out.insert(
                    key("nftables", &s("family"), &s("table"), &s("chain"), *n),
                    (p, by),
                );
            }
        }
    }
    let text = b
        .run(
            iptables,
            &["-t", "filter", "-L", "-v", "-x", "-n", "--line-numbers"],
        )
        .expect("iptables-legacy -L");
    let mut chain = String::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Chain", name, "(policy", _verdict, p, "packets,", by, ..] => {
                chain = (*name).to_owned();
                let (p, by) = (
                    p.parse().unwrap_or(0),
                    by.trim_end_matches("bytes)").parse().unwrap_or(0),
                );
                if p > 0 {
                    out.insert(key("xtables", "ip", "filter", &chain, 0), (p, by));
                }
            }
            ["Chain", name, ..] => chain = (*name).to_owned(),
            [num, p, by, ..] if num.parse::<u32>().is_ok() => {
                let (p, by): (u64, u64) = (p.parse().expect("pkts"), by.parse().expect("bytes"));
                if p > 0 {
                    out.insert(
                        key("xtables", "ip", "filter", &chain, num.parse().unwrap_or(0)),
                        (p, by),
                    );
                }
            }
            _ => {}
        }
    }
    out
}

fn attr<'a>(p: &'a SumPoint, k: &str) -> &'a str {
    match p.attrs.get(k) {
        Some(AttrValue::Str(s)) => s,
        _ => "",
    }
}

/// flowtel's latest totals per rule, for the test's tables (every table
/// but the harness's own, which have no counters).
fn flowtel_counts(receiver: &OtlpReceiver) -> Counts {
    let packets = receiver.latest("flowtel.firewall.packets", 0);
    let bytes = receiver.latest("flowtel.firewall.bytes", 0);
    let mut out = Counts::new();
    for (attrs, p) in &packets {
        let k = key(
            attr(p, "flowtel.firewall.backend"),
            attr(p, "flowtel.firewall.family"),
            attr(p, "flowtel.firewall.table"),
            attr(p, "flowtel.firewall.chain"),
            attr(p, "flowtel.firewall.rule.position")
                .parse()
                .unwrap_or(u32::MAX),
        );
        let by = bytes.get(attrs).map_or(0, |b| b.value);
        *out.entry(k).or_insert((0, 0)) = (p.value, by);
    }
    out
}

fn send(a: &Netns, rounds: &[(u16, u64, usize)]) {
    a.in_ns(|| -> std::io::Result<()> {
        let udp = UdpSocket::bind(SocketAddr::new(A_V4.parse().expect("literal"), 0))?;
        for &(port, count, size) in rounds {
            for _ in 0..count {
                udp.send_to(
                    &vec![0u8; size],
                    SocketAddr::new(B_V4.parse().expect("literal"), port),
                )?;
            }
        }
        Ok(())
    })
    .expect("entering A")
    .expect("sending UDP");
}

fn sum(rules: &Counts, chain: &str) -> (u64, u64) {
    rules
        .iter()
        .filter(|(k, _)| k.3 == chain)
        .fold((0, 0), |acc, (_, v)| (acc.0 + v.0, acc.1 + v.1))
}

fn metric_total(receiver: &OtlpReceiver, metric: &str, label: &str, value: &str) -> u64 {
    receiver
        .latest(metric, 0)
        .values()
        .filter(|p| attr(p, label) == value)
        .map(|p| p.value)
        .sum()
}

/// Waits until flowtel's totals equal `expected`, then returns them.
fn wait_for(receiver: &OtlpReceiver, expected: &Counts, flowtel: &Flowtel) -> Counts {
    let mut seen = Counts::new();
    let ok = wait_until(WAIT, Duration::from_millis(100), || {
        seen = flowtel_counts(receiver);
        &seen == expected
    });
    assert!(
        ok,
        "flowtel's rule counts never matched.\nexpected (kernel): {expected:#?}\nflowtel: {seen:#?}\n{}",
        flowtel.output()
    );
    seen
}

#[test]
fn rule_counters_match_the_kernel_across_ruleset_replacement() {
    let Some((tools, extra)) = common::prerequisites_with(
        "rule_counters_match_the_kernel_across_ruleset_replacement",
        &[IPTABLES_LEGACY, IPTABLES_LEGACY_RESTORE, IPTABLES_NFT],
        &[],
    ) else {
        return;
    };
    let (iptables, restore, iptables_nft) = (&extra[0], &extra[1], &extra[2]);
    let mut guard = NetnsGuard::new(&tools);
    let a = guard.add("fwa").expect("namespace A");
    let b = guard.add("fwb").expect("namespace B");
    let end = |ifname: &str, mac: &str, v4: &str, v6: &str| VethEnd {
        ifname: ifname.into(),
        mac: mac.into(),
        v4: format!("{v4}/24"),
        v6: format!("{v6}/64"),
    };
    guard
        .veth(
            &a,
            &end("ftfwA", "02:00:00:00:18:0a", A_V4, "fd00:18::1"),
            &b,
            &end("ftfwB", "02:00:00:00:18:0b", B_V4, "fd00:18::2"),
        )
        .expect("veth A-B");
    guard
        .nft(&b, "ip", "ft_kube", KUBE_NFT)
        .expect("kube-proxy-shaped nft table");
    guard
        .nft(&b, "inet", "ft_calico", CALICO_NFT)
        .expect("Calico-shaped nft table");
    let load_legacy = || {
        let mut child = b
            .command(restore, &[])
            .stdin(Stdio::piped())
            .spawn()
            .expect("iptables-legacy-restore");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(LEGACY.as_bytes())
            .expect("writing the rules");
        assert!(
            child.wait().expect("restore").success(),
            "iptables-legacy-restore failed"
        );
    };
    load_legacy();
    // kube-proxy's reject of a Service without endpoints, through
    // iptables-nft (its table `ip filter` is not replaced below).
    b.run(
        iptables_nft,
        &[
            "-A",
            "INPUT",
            "-p",
            "udp",
            "--dport",
            "7005",
            "-m",
            "comment",
            "--comment",
            "default/nosvc:http has no endpoints",
            "-j",
            "REJECT",
        ],
    )
    .expect("iptables-nft rule");

    let receiver = OtlpReceiver::start().expect("OTLP receiver");
    let netns = b.path();
    let mut flowtel = Flowtel::start(&FlowtelArgs {
        source: "conntrack",
        netns: &netns,
        endpoint: &receiver.grpc_endpoint(),
        protocol: "grpc",
        interval: "1s",
        env: vec![("FLOWTEL_FIREWALL__XTABLES", "on".into())],
    })
    .expect("starting flowtel");
    flowtel.wait_ready(WAIT).expect("flowtel ready");

    // Round 1.
    send(&a, SENDS);
    let kernel1 = settled_kernel_counts(&b, iptables, 1);
    let seen1 = wait_for(&receiver, &kernel1, &flowtel);
    let drop_nft = sum(&seen1, "cali-pi-_AbCdEf");
    let drop_legacy = sum(&seen1, "cali-pi-_Qq9");
    eprintln!("round 1: {} rules with counts equal the kernel's; nft drop rule {drop_nft:?}, legacy drop rule {drop_legacy:?}", seen1.len());
    assert_eq!(
        drop_nft.0, 17,
        "the nft drop rule's packets = datagrams sent to it"
    );
    assert_eq!(
        drop_legacy.0, 7,
        "the legacy drop rule's packets = datagrams sent to it"
    );
    // Each datagram: payload + 8 (UDP) + 20 (IPv4).
    assert_eq!(drop_nft.1, 17 * 328);
    assert_eq!(drop_legacy.1, 7 * 728);
    assert_eq!(
        sum(
            &seen1,
            "endpoint-5OJB2KTY-default/web/udp/http__198.18.18.2/7001"
        )
        .0,
        23
    );
    assert_eq!(sum(&seen1, "KUBE-SVC-API").0, 11);

    // The names.
    let packets = receiver.latest("flowtel.firewall.packets", 0);
    let named = |chain: &str| {
        packets
            .values()
            .find(|p| attr(p, "flowtel.firewall.chain") == chain)
            .unwrap_or_else(|| panic!("no series for {chain}"))
            .clone()
    };
    let svc = named("KUBE-SVC-API");
    assert_eq!(
        (
            attr(&svc, "flowtel.firewall.owner"),
            attr(&svc, "k8s.namespace.name"),
            attr(&svc, "flowtel.k8s.service.name"),
            attr(&svc, "flowtel.firewall.service.port"),
            attr(&svc, "flowtel.firewall.endpoint"),
            attr(&svc, "flowtel.firewall.verdict"),
        ),
        (
            "kube-proxy",
            "default",
            "api",
            "grpc",
            "198.18.18.2:7003",
            "accept"
        )
    );
    let ep = named("endpoint-5OJB2KTY-default/web/udp/http__198.18.18.2/7001");
    assert_eq!(
        (
            attr(&ep, "flowtel.k8s.service.name"),
            attr(&ep, "flowtel.firewall.endpoint")
        ),
        ("web", "198.18.18.2:7001")
    );
    let reject = packets
        .values()
        .find(|p| attr(p, "flowtel.firewall.verdict") == "reject")
        .expect("the iptables-nft reject rule")
        .clone();
    assert_eq!(
        (
            attr(&reject, "flowtel.firewall.backend"),
            attr(&reject, "flowtel.firewall.table"),
            attr(&reject, "flowtel.k8s.service.name"),
            attr(&reject, "flowtel.firewall.rule.comment"),
            reject.value,
        ),
        (
            "nftables",
            "filter",
            "nosvc",
            "default/nosvc:http has no endpoints",
            5
        )
    );
    let pol = named("cali-pi-_AbCdEf");
    assert_eq!(
        (
            attr(&pol, "flowtel.firewall.owner"),
            attr(&pol, "flowtel.firewall.policy.kind"),
            attr(&pol, "flowtel.firewall.policy.name"),
            attr(&pol, "flowtel.firewall.verdict"),
            attr(&pol, "flowtel.firewall.family"),
        ),
        ("calico", "NetworkPolicy", "deny-db", "drop", "inet")
    );
    // The drop view answers "which policy dropped how much".
    let drops = |policy: &str| {
        metric_total(
            &receiver,
            "flowtel.firewall.drops",
            "flowtel.firewall.policy.name",
            policy,
        )
    };
    assert_eq!((drops("deny-db"), drops("deny-all")), (17, 7));

    // Round 2: every ruleset replaced. ft_kube is loaded again from its own
    // listing (counters restored, as `nft -f` of a saved ruleset does);
    // ft_calico flushed and loaded again (counters from zero, as Felix
    // does); the legacy table restored without counters (kube-proxy).
    let resets_before = metric_total(
        &receiver,
        "flowtel.firewall.counter.resets",
        "flowtel.firewall.backend",
        "nftables",
    ) + metric_total(
        &receiver,
        "flowtel.firewall.counter.resets",
        "flowtel.firewall.backend",
        "xtables",
    );
    let kube_listing = b
        .run("nft", &["list", "table", "ip", "ft_kube"])
        .expect("nft list table");
    let handles_before = b
        .run("nft", &["-a", "list", "table", "ip", "ft_kube"])
        .expect("nft -a list");
    b.nft_load(&format!("flush table ip ft_kube\n{kube_listing}"))
        .expect("reloading ft_kube with its counters");
    b.nft_load(&format!(
        "flush table inet ft_calico\ntable inet ft_calico {{\n{CALICO_NFT}\n}}\n"
    ))
    .expect("reloading ft_calico");
    load_legacy();
    let handles_after = b
        .run("nft", &["-a", "list", "table", "ip", "ft_kube"])
        .expect("nft -a list");
    assert_ne!(
        handles_before, handles_after,
        "the reload must give the rules new handles"
    );
    // Reset rules: every counted rule of ft_calico and of the legacy table.
    let expected_resets = seen1
        .keys()
        .filter(|k| k.2 == "ft_calico" || k.0 == "xtables")
        .count() as u64;
    let mut resets = 0;
    assert!(
        wait_until(WAIT, Duration::from_millis(100), || {
            resets = metric_total(
                &receiver,
                "flowtel.firewall.counter.resets",
                "flowtel.firewall.backend",
                "nftables",
            ) + metric_total(
                &receiver,
                "flowtel.firewall.counter.resets",
                "flowtel.firewall.backend",
                "xtables",
            );
            resets - resets_before >= expected_resets
        }),
        "flowtel did not see the {expected_resets} reset counters (saw {resets}):\n{}",
        flowtel.output()
    );
    assert_eq!(resets - resets_before, expected_resets, "resets seen");
    send(&a, SENDS);
    let kernel2 = settled_kernel_counts(&b, iptables, 2);
    // ft_kube kept its counts; the others start again from zero.
    let mut expected = kernel2.clone();
    for (k, v) in expected.iter_mut() {
        // ft_kube was reloaded with its counters; iptables-nft's table was
        // not touched.
        let kept = k.2 == "ft_kube" || (k.0 == "nftables" && k.2 == "filter");
        if !kept {
            let before = kernel1.get(k).copied().unwrap_or((0, 0));
            *v = (v.0 + before.0, v.1 + before.1);
        }
    }
    for (k, v) in &kernel1 {
        expected.entry(k.clone()).or_insert(*v);
    }
    let seen2 = wait_for(&receiver, &expected, &flowtel);
    for (k, v) in &seen2 {
        let before = seen1.get(k).copied().unwrap_or((0, 0));
        assert!(
            v.0 >= before.0 && v.1 >= before.1,
            "{k:?} went back: {before:?} → {v:?}"
        );
    }
    let drop_nft2 = sum(&seen2, "cali-pi-_AbCdEf");
    let drop_legacy2 = sum(&seen2, "cali-pi-_Qq9");
    let kube2 = sum(
        &seen2,
        "endpoint-5OJB2KTY-default/web/udp/http__198.18.18.2/7001",
    );
    eprintln!(
        "round 2 after the replacement: nft drop rule {drop_nft2:?} (kernel now {:?}), legacy drop rule {drop_legacy2:?} (kernel now {:?}), \
         kube endpoint rule {kube2:?} (kernel, counters restored, {:?}); {} resets seen",
        sum(&kernel2, "cali-pi-_AbCdEf"),
        sum(&kernel2, "cali-pi-_Qq9"),
        sum(&kernel2, "endpoint-5OJB2KTY-default/web/udp/http__198.18.18.2/7001"),
        resets - resets_before,
    );
    assert_eq!(
        (drop_nft2.0, drop_legacy2.0, kube2.0),
        (34, 14, 46),
        "sent twice: no delta lost or doubled"
    );

    // Drop events: the deltas add up to the packets dropped.
    let mut events = Vec::new();
    assert!(
        wait_until(WAIT, Duration::from_millis(100), || {
            events = receiver
                .log_events()
                .into_iter()
                .filter(|e| e.event_name == "flowtel.firewall.drop")
                .collect();
            let total = |policy: &str| -> i64 {
                events
                    .iter()
                    .filter(|e| e.str("flowtel.firewall.policy.name") == Some(policy))
                    .filter_map(|e| e.int("flowtel.drop.packets"))
                    .sum()
            };
            total("deny-db") == 34 && total("deny-all") == 14
        }),
        "drop events do not add up: {events:#?}"
    );
    assert!(events.iter().all(|e| e.severity_text == "WARN"));
    assert!(events
        .iter()
        .filter(|e| e.str("flowtel.firewall.backend") == Some("nftables"))
        .all(|e| e.int("flowtel.firewall.rule.handle").is_some()));
}
