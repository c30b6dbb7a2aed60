//! DNS peers for the tests: Debian's dnsmasq as the server, dig as a
//! client, and hand-made query messages (good and malformed).

use std::path::Path;
use std::time::{Duration, Instant};

use super::netns::{Netns, NetnsGuard};
use super::Tool;

pub const DNSMASQ: Tool = Tool {
    name: "dnsmasq",
    env: "DNSMASQ_BIN",
    fallbacks: &["/usr/sbin/dnsmasq"],
};
pub const DIG: Tool = Tool {
    name: "dig",
    env: "DIG_BIN",
    fallbacks: &["/usr/bin/dig"],
};
pub const GETENT: Tool = Tool {
    name: "getent",
    env: "GETENT_BIN",
    fallbacks: &["/usr/bin/getent"],
};

/// dnsmasq's arguments: in the foreground, answering only from `records`
/// (`name,address[,address]`, each a `--host-record`) on `listen`, and
/// NXDOMAIN for any other name under `local` (`/test/`).
pub fn dnsmasq_args(listen: &[&str], local: &str, records: &[String]) -> Vec<String> {
    let mut args = vec![
        "--keep-in-foreground".to_string(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={}", listen.join(",")),
        "--except-interface=lo".into(),
        format!("--local={local}"),
        "--pid-file=".into(),
        "--user=root".into(),
    ];
    args.extend(records.iter().map(|r| format!("--host-record={r}")));
    args
}

/// Starts dnsmasq in `ns` (killed when `guard` drops) and waits until it
/// answers dig from `client` at `probe` (server address, one of its names):
/// on that, not a sleep.
pub fn start_dnsmasq(
    guard: &mut NetnsGuard,
    ns: &Netns,
    client: &Netns,
    (dnsmasq, dig_bin): (&Path, &Path),
    args: &[String],
    (server, probe): (&str, &str),
) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    guard
        .spawn_quiet(ns, dnsmasq, &args)
        .expect("starting dnsmasq");
    let deadline = Instant::now() + Duration::from_secs(10);
    while dig(client, dig_bin, server, probe, "A", false).as_deref() != Some("NOERROR") {
        assert!(
            Instant::now() < deadline,
            "dnsmasq did not answer within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One dig from `ns`, one try with a 1 s timeout, no EDNS: the RCODE
/// mnemonic it printed, `None` when no response came.
pub fn dig(
    ns: &Netns,
    dig: &Path,
    server: &str,
    name: &str,
    qtype: &str,
    tcp: bool,
) -> Option<String> {
    let at = format!("@{server}");
    let mut args = vec![
        at.as_str(),
        name,
        qtype,
        "+tries=1",
        "+timeout=1",
        "+noedns",
        "+nocookie",
    ];
    if tcp {
        args.push("+tcp");
    }
    let out = ns.command(dig, &args).output().expect("running dig");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(str::to_string)
}

/// A query message: header (id, RD) and `question` as given.
pub fn query(id: u16, qdcount: u16, question: &[u8]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00]);
    m.extend_from_slice(&qdcount.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(question);
    m
}

/// A question for `name` (dotted, no final dot) of `qtype`, class IN.
pub fn question(name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// A query whose name is a compression pointer to itself: a parse error
/// for flowtel's source.
pub fn compression_loop(id: u16) -> Vec<u8> {
    query(id, 1, &[0xc0, 0x0c, 0, 1, 0, 1])
}

/// Sends one UDP query per `(name, qtype)` from `from` in `ns` to
/// `server`:53, ids from `first_id` up, each after the previous one's
/// response (or a 1 s timeout): the RCODE of each response, `None` when
/// none came.
pub fn udp_lookups(
    ns: &Netns,
    from: &str,
    server: &str,
    questions: &[(String, u16)],
    first_id: u16,
) -> Vec<Option<u8>> {
    let from: std::net::IpAddr = from.parse().expect("literal address");
    let server: std::net::IpAddr = server.parse().expect("literal address");
    ns.in_ns(|| -> std::io::Result<Vec<Option<u8>>> {
        let s = std::net::UdpSocket::bind((from, 0))?;
        s.connect((server, 53))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 1500];
        let mut out = Vec::new();
        for (i, (name, qtype)) in questions.iter().enumerate() {
            let id = first_id.wrapping_add(i as u16);
            s.send(&query(id, 1, &question(name, *qtype)))?;
            let rcode = loop {
                match s.recv(&mut buf) {
                    Ok(n) if n >= 12 && buf[..2] == id.to_be_bytes() => break Some(buf[3] & 0x0f),
                    Ok(_) => continue,
                    Err(_) => break None,
                }
            };
            out.push(rcode);
        }
        Ok(out)
    })
    .expect("entering the client's namespace")
    .expect("UDP lookups")
}

/// Namespaces A and B ([`Lab`](super::scenario::Lab)) with dnsmasq serving
/// in B at its IPv4 address: each of `names` (under `.test`) answered with
/// a 198.51.100.x address, NXDOMAIN for any other `.test` name. dnsmasq is
/// killed with the lab.
pub fn lab_with_dnsmasq(
    tools: &super::Prerequisites,
    (dnsmasq, dig_bin): (&Path, &Path),
    names: &[&str],
) -> super::scenario::Lab {
    let mut lab = super::scenario::Lab::new(tools).expect("setting up namespaces A and B");
    let records: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n},198.51.100.{}", i + 1))
        .collect();
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let server = super::scenario::B_V4;
    start_dnsmasq(
        &mut lab.guard,
        &b,
        &a,
        (dnsmasq, dig_bin),
        &dnsmasq_args(&[server], "/test/", &records),
        (server, names[0]),
    );
    lab
}
