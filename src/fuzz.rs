//! Mutation fuzzing on stable Rust of every decoder of outside data:
//! ctnetlink messages, `/proc/net/nf_conntrack` lines, Prometheus and
//! OpenMetrics scrape bodies, Hubble protobuf flows, Kubernetes objects
//! into the cache, the configuration loader, the firewall's rule dumps
//! (`iptables-save` text and nftables netlink messages), DNS questions
//! copied by the kernel, and the CNI records and plugin results.
//!
//! Each harness starts from a seed corpus of real shapes (encoded
//! messages, `tests/fixtures/`), mutates it with a seeded generator (bit
//! flips, interesting bytes and integers, deletions, duplications,
//! splices; JSON and YAML values replaced whole), runs the decoder on
//! every input under `catch_unwind`, and keeps inputs the decoder accepted
//! as further seeds. A panic fails the test with the input saved under
//! the system's temporary directory; an input that takes longer than
//! [`SLOW`] fails it too (a hang in the making).
//!
//! `cargo test --lib fuzz -- --nocapture` runs [`DEFAULT_INPUTS`] inputs per
//! decoder (a third of that for the configuration loader, which writes a
//! file per input); `FLOWTEL_FUZZ_INPUTS` and `FLOWTEL_FUZZ_SEED` set the count and
//! the generator's seed for a longer run (the seed is printed, so a failure
//! can be replayed).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Inputs per decoder in CI.
const DEFAULT_INPUTS: usize = 3000;
/// The longest one input may take.
const SLOW: Duration = Duration::from_secs(2);
/// The largest input a mutation may make.
const MAX_INPUT: usize = 1 << 20;
/// Accepted inputs kept as further seeds, per decoder.
const MAX_CORPUS: usize = 500;

fn inputs() -> usize {
    std::env::var("FLOWTEL_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_INPUTS)
}

fn seed() -> u64 {
    std::env::var("FLOWTEL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f10e)
}

const INTERESTING_BYTES: &[u8] = &[0, 1, 0x7f, 0x80, 0xff, b'\n', b' ', b'"', b'{', b'=', b'\\'];
const INTERESTING_U32: &[u32] = &[0, 1, 3, 4, 8, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, u32::MAX];
const INTERESTING_TEXT: &[&str] = &[
    "-1",
    "NaN",
    "+Inf",
    "-Inf",
    "1e309",
    "18446744073709551616",
    "0x1p3",
    "\"",
    "{",
    "}",
    "\\",
    "\n",
    "# EOF\n",
    "# TYPE x counter\n",
    "# TYPE x histogram\n",
    "=",
    ",",
    "[",
    ": ",
    "- ",
    "~",
    "é",
    "\u{0}",
];

/// The seeded mutation engine.
struct Mutator {
    rng: fastrand::Rng,
}

impl Mutator {
    fn range(&mut self, len: usize) -> (usize, usize) {
        if len == 0 {
            return (0, 0);
        }
        let start = self.rng.usize(..len);
        let end = self.rng.usize(start..=len.min(start + 64));
        (start, end)
    }

    /// One to four byte-level mutations of `input`.
    fn bytes(&mut self, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut data = input.to_vec();
        for _ in 0..self.rng.usize(1..=4) {
            let len = data.len();
            match self.rng.u8(0..9) {
                0 if len > 0 => {
                    let i = self.rng.usize(..len);
                    data[i] ^= 1 << self.rng.u8(0..8);
                }
                1 if len > 0 => {
                    let i = self.rng.usize(..len);
                    data[i] = INTERESTING_BYTES[self.rng.usize(..INTERESTING_BYTES.len())];
                }
                2 => {
                    let (a, b) = self.range(len);
                    data.drain(a..b);
                }
                3 => {
                    let (a, b) = self.range(len);
                    let copy = data[a..b].to_vec();
                    let at = self.rng.usize(..=len);
                    data.splice(at..at, copy);
                }
                4 => {
                    let at = self.rng.usize(..=len);
                    let n = self.rng.usize(1..16);
                    let random: Vec<u8> = (0..n).map(|_| self.rng.u8(..)).collect();
                    data.splice(at..at, random);
                }
                5 => data.truncate(self.rng.usize(..=len)),
                6 if !corpus.is_empty() => {
                    let other = &corpus[self.rng.usize(..corpus.len())];
                    let (a, b) = self.range(other.len());
                    let at = self.rng.usize(..=len);
                    data.splice(at..at, other[a..b].iter().copied());
                }
                7 if len >= 4 => {
                    let at = self.rng.usize(..=len - 4);
                    let v = INTERESTING_U32[self.rng.usize(..INTERESTING_U32.len())];
                    let bytes = if self.rng.bool() {
                        v.to_be_bytes()
                    } else {
                        v.to_le_bytes()
                    };
                    if self.rng.bool() {
                        data[at..at + 2].copy_from_slice(&bytes[2..]);
                    } else {
                        data[at..at + 4].copy_from_slice(&bytes);
                    }
                }
                _ => {
                    let at = self.rng.usize(..=len);
                    let t = INTERESTING_TEXT[self.rng.usize(..INTERESTING_TEXT.len())];
                    data.splice(at..at, t.bytes());
                }
            }
        }
        data.truncate(MAX_INPUT);
        data
    }

    /// A JSON value with one node replaced by something of another shape.
    fn json(&mut self, value: &mut serde_json::Value) {
        use serde_json::{json, Value};
        let children = match value {
            Value::Object(m) => m.len(),
            Value::Array(a) => a.len(),
            _ => 0,
        };
        if children > 0 && self.rng.u8(0..4) != 0 {
            let i = self.rng.usize(..children);
            match value {
                Value::Object(m) => {
                    if let Some(child) = m.values_mut().nth(i) {
                        self.json(child);
                    }
                }
                Value::Array(a) => self.json(&mut a[i]),
                _ => {}
            }
            return;
        }
        *value = match self.rng.u8(0..12) {
            0 => Value::Null,
            1 => json!(-1),
            2 => json!(u64::MAX),
            3 => json!(1e300),
            4 => json!(""),
            5 => json!("\u{0}é::1/129"),
            6 => json!([]),
            7 => json!({}),
            8 => json!(true),
            9 => json!("256.256.256.256"),
            10 => json!(["fd00::1", "10.0.0.1", "not an ip"]),
            _ => json!("a".repeat(self.rng.usize(0..5000))),
        };
    }
}

/// What a decoder made of one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Rejected,
}

impl From<bool> for Outcome {
    fn from(accepted: bool) -> Self {
        if accepted {
            Self::Accepted
        } else {
            Self::Rejected
        }
    }
}

/// Runs `decode` on `count` mutations of `seeds`; fails on a panic or a
/// slow input. `structured` inputs (JSON) get value-level mutations half
/// the time.
fn run(
    name: &str,
    count: usize,
    seeds: Vec<Vec<u8>>,
    structured: bool,
    mut decode: impl FnMut(&[u8]) -> Outcome,
) {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let seed = seed();
    let mut m = Mutator {
        rng: fastrand::Rng::with_seed(seed),
    };
    let mut corpus = seeds.clone();
    let (mut accepted, mut panics) = (0usize, Vec::new());
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    // The seeds themselves first.
    let mut queue: Vec<Vec<u8>> = seeds;
    for n in 0..count {
        let input = match queue.pop() {
            Some(seed) => seed,
            None => {
                let base = &corpus[m.rng.usize(..corpus.len())];
                match structured {
                    true if m.rng.bool() => match serde_json::from_slice(base) {
                        Ok(mut value) => {
                            m.json(&mut value);
                            serde_json::to_vec(&value).unwrap_or_default()
                        }
                        Err(_) => m.bytes(base, &corpus),
                    },
                    _ => m.bytes(base, &corpus),
                }
            }
        };
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| decode(&input)));
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < SLOW,
            "{name}: input {n} took {took:?}; saved as {}",
            save(name, n, &input).display()
        );
        match outcome {
            Ok(Outcome::Accepted) => {
                accepted += 1;
                if corpus.len() < MAX_CORPUS {
                    corpus.push(input);
                }
            }
            Ok(Outcome::Rejected) => {}
            Err(_) => panics.push(save(name, n, &input)),
        }
    }
    println!(
        "fuzz {name:<22} {count:>7} inputs  {accepted:>7} accepted  {:>7} rejected  {} panics  slowest {slowest:?}  {:?} (seed {seed})",
        count - accepted - panics.len(),
        panics.len(),
        started.elapsed()
    );
    assert!(panics.is_empty(), "{name}: panics on {panics:?}");
}

fn save(name: &str, n: usize, input: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("flowtel-fuzz-{name}-{n}.bin"));
    let _ = std::fs::write(&path, input);
    path
}

fn fixture(relative: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn fuzz_ctnetlink_messages() {
    use crate::flow::{Counters, Endpoint, FlowId, FlowUpdate, Nat, SourceKind, Transport};
    use crate::source::conntrack::decode::{classify, decode_message, encode_message, MessageKind};
    let ep = |ip: &str, port| Endpoint::new(ip.parse().expect("address"), port);
    let mut seeds = Vec::new();
    for (transport, client, server) in [
        (
            Transport::Tcp,
            ep("10.244.1.7", 40312),
            ep("10.96.0.10", 443),
        ),
        (
            Transport::Udp,
            ep("10.244.1.7", 53211),
            ep("10.96.0.10", 53),
        ),
        (
            Transport::Sctp,
            ep("192.168.1.2", 3868),
            ep("192.168.1.3", 3868),
        ),
        (Transport::Tcp, ep("fd00::7", 40000), ep("fd00::a", 8080)),
    ] {
        let update = FlowUpdate {
            id: FlowId {
                transport,
                client,
                server,
                zone: 0,
            },
            generation: 7,
            nat: Nat::default(),
            to_server: Counters::new(5_820, 12),
            to_client: Counters::new(190_455, 131),
            ended: false,
            source: SourceKind::Conntrack,
        };
        for kind in [MessageKind::New, MessageKind::Destroy] {
            seeds.push(encode_message(&update, kind));
        }
    }
    run("ctnetlink", inputs(), seeds, false, |b| {
        let _ = classify(b);
        decode_message(b).is_ok_and(|u| u.is_some()).into()
    });
}

#[test]
fn fuzz_proc_nf_conntrack_lines() {
    use crate::source::conntrack::procfs::parse_proc_line;
    let text = fixture("fuzz/nf_conntrack.txt");
    let seeds = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    run("proc_nf_conntrack", inputs(), seeds, false, |b| {
        let text = String::from_utf8_lossy(b);
        let mut ok = false;
        for line in text.lines() {
            ok |= parse_proc_line(line).is_ok();
        }
        ok.into()
    });
}

#[test]
fn fuzz_scrape_bodies() {
    use crate::source::felix::FELIX_FAMILIES;
    use crate::source::istio::ISTIO_FAMILIES;
    use crate::source::scrape::{parse, parse_within, Format};
    let seeds = ["envoy_sidecar.txt", "felix.txt", "ztunnel_1.24.txt"]
        .iter()
        .map(|f| fixture(&format!("mesh/{f}")))
        .collect();
    run("scrape", inputs(), seeds, false, |b| {
        let text = String::from_utf8_lossy(b);
        let mut ok = false;
        for format in [Format::Text, Format::OpenMetrics] {
            for specs in [ISTIO_FAMILIES, FELIX_FAMILIES] {
                let all = parse(&text, format, specs);
                // Within a budget of 2 series: the same verdict, at most 2
                // series kept, and kept + shed = every series.
                let series = |families: &[crate::flow::mesh::Family]| -> u64 {
                    families.iter().map(|f| f.points.len() as u64).sum()
                };
                match (&all, parse_within(&text, format, specs, 2)) {
                    (Ok(all), Ok(within)) => {
                        assert!(series(&within.families) <= 2);
                        assert_eq!(series(&within.families) + within.series_shed, series(all));
                    }
                    (Err(a), Err(b)) => assert_eq!(a, &b),
                    (a, b) => panic!("the budget changed the verdict: {a:?} against {b:?}"),
                }
                ok |= all.is_ok_and(|f| !f.is_empty());
            }
        }
        ok.into()
    });
}

#[test]
fn fuzz_hubble_flows() {
    use crate::source::hubble::convert::convert;
    use crate::source::hubble::proto;
    use crate::source::hubble::records::record;
    use crate::source::hubble::report::{Aggregator, Limits};
    use prost::Message as _;
    let end = |namespace: &str, pod: &str, identity| proto::Endpoint {
        identity,
        namespace: namespace.into(),
        labels: vec![
            format!("k8s:io.kubernetes.pod.namespace={namespace}"),
            "k8s:app=web".into(),
        ],
        pod_name: pod.into(),
        workloads: vec![proto::Workload {
            name: "web".into(),
            kind: "Deployment".into(),
        }],
        ..Default::default()
    };
    let tcp = proto::Flow {
        time: Some(proto::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        }),
        uuid: "2f0c3b1e-7c55-4c55-9a53-0d7e7c1c9a11".into(),
        verdict: 1,
        ip: Some(proto::Ip {
            source: "10.0.1.15".into(),
            destination: "10.0.2.20".into(),
            ip_version: 1,
            encrypted: false,
        }),
        l4: Some(proto::Layer4 {
            protocol: Some(proto::Protocol::Tcp(proto::Tcp {
                source_port: 50_412,
                destination_port: 8080,
                flags: Some(proto::TcpFlags {
                    syn: true,
                    ..Default::default()
                }),
            })),
        }),
        source: Some(end("shop", "web-7d9f-abcde", 12_345)),
        destination: Some(end("shop", "api-5c8d-fghij", 23_456)),
        r#type: 1,
        node_name: "kind/worker-1".into(),
        traffic_direction: 2,
        ..Default::default()
    };
    let dropped = proto::Flow {
        verdict: 2,
        drop_reason_desc: 133,
        traffic_direction: 1,
        ..tcp.clone()
    };
    let dns = proto::Flow {
        l4: Some(proto::Layer4 {
            protocol: Some(proto::Protocol::Udp(proto::Udp {
                source_port: 41_000,
                destination_port: 53,
            })),
        }),
        l7: Some(proto::Layer7 {
            r#type: 2,
            latency_ns: 1_200_000,
            record: Some(proto::Record::Dns(proto::Dns {
                query: "api.shop.svc.cluster.local.".into(),
                ips: vec!["10.96.4.2".into()],
                ttl: 30,
                rcode: 0,
                qtypes: vec!["A".into()],
                ..Default::default()
            })),
        }),
        ..tcp.clone()
    };
    let seeds = [tcp, dropped, dns]
        .iter()
        .map(prost::Message::encode_to_vec)
        .collect();
    let mut aggregator = Aggregator::new(Limits {
        max_series: 100,
        max_records: 100,
    });
    let mut n = 0u32;
    run(
        "hubble_flow",
        inputs(),
        seeds,
        false,
        |b| match proto::Flow::decode(b) {
            Ok(flow) => {
                let converted = convert(flow);
                let _ = record(&converted.flow, SystemTime::UNIX_EPOCH);
                aggregator.record(converted);
                n += 1;
                if n.is_multiple_of(100) {
                    let _ = crate::source::hubble::metrics::families(&aggregator.report());
                }
                Outcome::Accepted
            }
            Err(_) => Outcome::Rejected,
        },
    );
}

#[test]
fn fuzz_kubernetes_objects_into_the_cache() {
    use crate::enrich::kubernetes::cache::{Cache, Object};
    use k8s_openapi::api::core::v1::{Node, Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let seeds = [
        "pod.json",
        "service.json",
        "endpointslice.json",
        "node.json",
        "replicaset.json",
    ]
    .iter()
    .map(|f| fixture(&format!("fuzz/k8s/{f}")))
    .collect();
    let mut cache = Cache::new(
        &["app.kubernetes.io/name".to_string()],
        Duration::from_secs(60),
    );
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    run("kubernetes_object", inputs(), seeds, true, |b| {
        let kind = serde_json::from_slice::<serde_json::Value>(b)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str().map(str::to_owned)));
        let object = match kind.as_deref() {
            Some("Pod") => serde_json::from_slice::<Pod>(b).map(|o| Object::Pod(Box::new(o))),
            Some("Service") => {
                serde_json::from_slice::<Service>(b).map(|o| Object::Service(Box::new(o)))
            }
            Some("EndpointSlice") => serde_json::from_slice::<EndpointSlice>(b)
                .map(|o| Object::EndpointSlice(Box::new(o))),
            Some("Node") => serde_json::from_slice::<Node>(b).map(|o| Object::Node(Box::new(o))),
            _ => serde_json::from_slice::<serde_json::Value>(b)
                .and_then(|v| serde_json::from_value::<ObjectMeta>(v["metadata"].clone()))
                .map(|m| Object::ReplicaSet(Box::new(m))),
        };
        match object {
            Ok(o) => cache.apply(&o, now).is_ok().into(),
            Err(_) => Outcome::Rejected,
        }
    });
}

#[test]
fn fuzz_config_loader() {
    use crate::config::{load, Overrides};
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("flowtel.yaml");
    let seeds = ["full.yaml", "otlp.yaml", "minimal.yaml"]
        .iter()
        .map(|f| fixture(&format!("fuzz/config/{f}")))
        .collect();
    let env = std::collections::HashMap::new();
    run("config", inputs() / 3, seeds, false, |b| {
        if std::fs::write(&file, b).is_err() {
            return Outcome::Rejected;
        }
        load(Some(&file), &env, &Overrides::default())
            .is_ok()
            .into()
    });
}

#[test]
fn fuzz_iptables_save_text() {
    use crate::source::firewall::xtables::{parse, tests::SAVE};
    let mut seeds = vec![SAVE.as_bytes().to_vec()];
    seeds.extend(
        SAVE.lines()
            .filter(|l| l.starts_with("-A") || l.starts_with(':'))
            .map(|l| format!("*filter\n{l}\nCOMMIT\n").into_bytes()),
    );
    run("iptables_save", inputs(), seeds, false, |b| {
        let mut issues = Vec::new();
        let text = String::from_utf8_lossy(b);
        let rules = parse(&text, "ip", &mut issues);
        (!rules.is_empty()).into()
    });
}

#[test]
fn fuzz_nftables_rule_messages() {
    use crate::source::firewall::nft::decode;
    use crate::source::firewall::nft::tests::{comment_udata, rule_message};
    let seeds = vec![
        rule_message("meta", 1, None, &[]),
        rule_message(
            "match",
            0,
            None,
            &comment_udata(b"default/web:http cluster IP"),
        ),
        rule_message("target", -3, Some("KUBE-SVC-X"), &[]),
        rule_message(
            "payload",
            -4,
            Some("cali-fw-x"),
            &comment_udata(b"cali:abc"),
        ),
    ];
    run("nftables_rule", inputs(), seeds, false, |b| {
        let mut issues = Vec::new();
        decode(b, &mut issues).is_ok().into()
    });
}

#[test]
fn fuzz_dns_questions() {
    use crate::source::ebpf::dns::decode_question;
    let wire = |name: &str, qtype: u16| {
        let mut q = Vec::new();
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    };
    let mut seeds = vec![
        wire("example.com", 1),
        wire("payments.shop.svc.cluster.local", 28),
        wire(&"a".repeat(63), 16),
        wire("_grpclb._tcp.api.example.org", 33),
    ];
    seeds.push(seeds[1][..20].to_vec());
    run("dns_question", inputs(), seeds, false, |b| {
        // As copied whole, and as the head of a longer question.
        let _ = decode_question(b, true);
        decode_question(b, false).is_ok().into()
    });
}

#[test]
fn fuzz_cni_records() {
    use crate::source::cni::raw::tests::record;
    use crate::source::cni::raw::{decode, parse_env, parse_output, RawEvent};
    let env = b"CNI_COMMAND=ADD\0CNI_CONTAINERID=4f1c\0CNI_NETNS=/var/run/netns/cni-1\0\
CNI_IFNAME=eth0\0CNI_ARGS=K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u-1\0";
    let mut exec = vec![0u8; 256];
    exec[..14].copy_from_slice(b"/opt/cni/b/ptp");
    exec.extend_from_slice(env);
    let result = br#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.244.1.7/24","gateway":"10.244.1.1","interface":0}]}"#;
    let error =
        br#"{"cniVersion":"1.0.0","code":7,"msg":"failed to allocate","details":"range full"}"#;
    let seeds = vec![
        record(1, 41, env.len() as u32, &exec, exec.len()),
        record(2, 41, result.len() as u32, result, 4096),
        record(2, 41, error.len() as u32, error, 4096),
        record(3, 41, 0, &[], 0),
    ];
    run("cni_record", inputs(), seeds, false, |b| match decode(b) {
        Ok(RawEvent::Exec {
            env, env_truncated, ..
        }) => {
            let _ = parse_env(&env, env_truncated);
            Outcome::Accepted
        }
        Ok(RawEvent::Output { data, .. }) => {
            let _ = parse_output(&data);
            Outcome::Accepted
        }
        Ok(RawEvent::Exit { .. }) => Outcome::Accepted,
        Err(_) => Outcome::Rejected,
    });
    run(
        "cni_result",
        inputs(),
        vec![result.to_vec(), error.to_vec()],
        true,
        |b| {
            let out = parse_output(b);
            (!out.ips.is_empty() || out.error.is_some()).into()
        },
    );
}
