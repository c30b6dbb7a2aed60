//! `/proc/net/nf_conntrack` parsing: the fallback when ctnetlink is refused.
//!
//! The file is streamed line by line through one reused buffer, so memory
//! stays flat however big the table is.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::IpAddr;
use std::path::Path;

use crate::flow::{Counters, Endpoint, FlowId, FlowUpdate, Nat, SourceKind, Transport};

/// Why a procfs line was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed nf_conntrack line: {0}")]
pub struct ProcParseError(&'static str);

/// One direction's fields.
#[derive(Default, Clone, Copy)]
struct Side {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: u16,
    dport: u16,
    id: u16,
    packets: u64,
    bytes: u64,
}

impl Side {
    /// (source, destination), with the ICMP id on the client's side as in
    /// the netlink decoder.
    fn endpoints(&self, transport: Transport, reply: bool) -> Option<(Endpoint, Endpoint)> {
        super::decode::tuple_endpoints(
            (self.src?, self.dst?),
            (self.sport, self.dport),
            self.id,
            transport,
            reply,
        )
    }
}

fn num<T: std::str::FromStr>(v: &str, what: &'static str) -> Result<T, ProcParseError> {
    v.parse().map_err(|_| ProcParseError(what))
}

/// Parses one line of `/proc/net/nf_conntrack` into a (not ended) update.
///
/// Line layout: family name and number, protocol name and number, timeout,
/// an optional state word, the original `key=value` group, an optional
/// `[UNREPLIED]`, the reply group (a second `src=` starts it), then flags
/// and `mark=`/`zone=`/`use=`. Byte and packet fields are absent without
/// accounting, which leaves the counters at zero.
pub fn parse_proc_line(line: &str) -> Result<FlowUpdate, ProcParseError> {
    let mut tokens = line.split_ascii_whitespace();
    let family = tokens.next().ok_or(ProcParseError("empty line"))?;
    let want_v4 = match family {
        "ipv4" => true,
        "ipv6" => false,
        _ => return Err(ProcParseError("unknown address family")),
    };
    let _family_number: u8 = num(
        tokens.next().ok_or(ProcParseError("no family number"))?,
        "family number",
    )?;
    let _protocol_name = tokens.next().ok_or(ProcParseError("no protocol"))?;
    let protocol: u8 = num(
        tokens.next().ok_or(ProcParseError("no protocol number"))?,
        "protocol number",
    )?;
    let _timeout: u64 = num(
        tokens.next().ok_or(ProcParseError("no timeout"))?,
        "timeout",
    )?;

    let mut sides = [Side::default(); 2];
    let mut dir = 0usize;
    let mut zone = 0u16;
    for token in tokens {
        let Some((key, value)) = token.split_once('=') else {
            // State words (ESTABLISHED) and flags ([ASSURED], [UNREPLIED]).
            continue;
        };
        match key {
            "src" => {
                if sides[0].src.is_some() {
                    if sides[1].src.is_some() {
                        return Err(ProcParseError("more than two tuples"));
                    }
                    dir = 1;
                }
                sides[dir].src = Some(num(value, "src address")?);
            }
            "dst" => sides[dir].dst = Some(num(value, "dst address")?),
            "sport" => sides[dir].sport = num(value, "sport")?,
            "dport" => sides[dir].dport = num(value, "dport")?,
            "id" => sides[dir].id = num(value, "icmp id")?,
            "packets" => sides[dir].packets = num(value, "packets")?,
            "bytes" => sides[dir].bytes = num(value, "bytes")?,
            "zone" => zone = num(value, "zone")?,
            _ => {}
        }
    }
    let transport = Transport::from_protocol(protocol);
    let (client, server) = sides[0]
        .endpoints(transport, false)
        .ok_or(ProcParseError("no original src/dst"))?;
    if client.ip.is_ipv4() != want_v4 || server.ip.is_ipv4() != want_v4 {
        return Err(ProcParseError("address does not match the family"));
    }
    let mut nat = Nat::default();
    if let Some((reply_src, reply_dst)) = sides[1].endpoints(transport, true) {
        if reply_src != server {
            nat.server = Some(reply_src);
        }
        if reply_dst != client {
            nat.client = Some(reply_dst);
        }
    }
    Ok(FlowUpdate {
        id: FlowId {
            transport,
            client,
            server,
            zone,
        },
        generation: 0,
        nat,
        to_server: Counters::new(sides[0].bytes, sides[0].packets),
        to_client: Counters::new(sides[1].bytes, sides[1].packets),
        ended: false,
        source: SourceKind::Conntrack,
    })
}

/// What one pass over the file produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcDump {
    pub entries: u64,
    pub malformed: u64,
    /// The first malformed line's reason, for the once-per-dump log line.
    pub first_error: Option<ProcParseError>,
    /// `emit` asked to stop (shutdown or channel closed).
    pub halted: bool,
}

/// Streams `path`, calling `emit` for every parsed entry; `emit` returns
/// false to stop early.
pub(crate) fn dump_file(
    path: &Path,
    mut emit: impl FnMut(FlowUpdate) -> bool,
) -> io::Result<ProcDump> {
    let file = File::open(path)?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut line = Vec::with_capacity(512);
    let mut out = ProcDump::default();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(out);
        }
        let parsed = std::str::from_utf8(&line)
            .map_err(|_| ProcParseError("not UTF-8"))
            .and_then(|text| {
                let text = text.trim_end();
                if text.is_empty() {
                    return Ok(None);
                }
                parse_proc_line(text).map(Some)
            });
        match parsed {
            Ok(None) => {}
            Ok(Some(update)) => {
                out.entries += 1;
                if !emit(update) {
                    out.halted = true;
                    return Ok(out);
                }
            }
            Err(e) => {
                out.malformed += 1;
                out.first_error.get_or_insert(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint::new(ip.parse().expect("test address"), port)
    }

    #[test]
    fn tcp_with_accounting() {
        let u = parse_proc_line(
            "ipv4     2 tcp      6 299 ESTABLISHED src=198.18.4.1 dst=198.18.4.2 sport=51000 dport=8080 \
             packets=12 bytes=1500 src=198.18.4.2 dst=198.18.4.1 sport=8080 dport=51000 packets=9 bytes=7200 \
             [ASSURED] mark=0 zone=0 use=2",
        )
        .expect("parses");
        assert_eq!(u.id.transport, Transport::Tcp);
        assert_eq!(u.id.client, ep("198.18.4.1", 51000));
        assert_eq!(u.id.server, ep("198.18.4.2", 8080));
        assert_eq!(u.to_server, Counters::new(1500, 12));
        assert_eq!(u.to_client, Counters::new(7200, 9));
        assert_eq!(u.nat, Nat::default());
        assert_eq!(u.id.zone, 0);
        assert!(!u.ended);
        assert_eq!(u.source, SourceKind::Conntrack);
    }

    #[test]
    fn udp_unreplied_without_accounting() {
        let u = parse_proc_line(
            "ipv4     2 udp      17 25 src=198.18.5.9 dst=198.18.5.53 sport=33333 dport=53 [UNREPLIED] \
             src=198.18.5.53 dst=198.18.5.9 sport=53 dport=33333 mark=0 zone=3 use=2",
        )
        .expect("parses");
        assert_eq!(u.id.transport, Transport::Udp);
        assert_eq!(u.id.server, ep("198.18.5.53", 53));
        assert_eq!(u.to_server, Counters::default());
        assert_eq!(u.to_client, Counters::default());
        assert_eq!(u.id.zone, 3);
    }

    #[test]
    fn ipv6_full_groups_and_dnat() {
        let u = parse_proc_line(
            "ipv6     10 tcp      6 86390 ESTABLISHED src=fd00:0000:0000:0000:0000:0000:0000:0011 \
             dst=fd00:0000:0000:0000:0000:0000:00aa:0001 sport=45678 dport=443 packets=3 bytes=240 \
             src=fd00:0000:0000:0000:0000:0000:0000:0042 dst=fd00:0000:0000:0000:0000:0000:0000:0011 \
             sport=8443 dport=45678 packets=2 bytes=160 [ASSURED] mark=0 zone=0 use=2",
        )
        .expect("parses");
        assert_eq!(u.id.client, ep("fd00::11", 45678));
        assert_eq!(u.id.server, ep("fd00::aa:1", 443));
        assert_eq!(u.nat.server, Some(ep("fd00::42", 8443)));
        assert_eq!(u.nat.client, None);
        assert_eq!(u.to_client, Counters::new(160, 2));
    }

    #[test]
    fn snat_is_detected() {
        let u = parse_proc_line(
            "ipv4     2 tcp      6 100 SYN_SENT src=198.18.6.2 dst=198.19.1.1 sport=40001 dport=443 \
             [UNREPLIED] src=198.19.1.1 dst=198.18.0.254 sport=443 dport=61001 mark=0 use=1",
        )
        .expect("parses");
        assert_eq!(u.nat.client, Some(ep("198.18.0.254", 61001)));
        assert_eq!(u.nat.server, None);
    }

    #[test]
    fn icmp_and_icmpv6() {
        let u = parse_proc_line(
            "ipv4     2 icmp     1 29 src=198.18.7.1 dst=198.18.7.2 type=8 code=0 id=3100 packets=4 bytes=336 \
             src=198.18.7.2 dst=198.18.7.1 type=0 code=0 id=3100 packets=4 bytes=336 mark=0 zone=0 use=2",
        )
        .expect("parses");
        assert_eq!(u.id.transport, Transport::Icmp);
        assert_eq!(u.id.client, ep("198.18.7.1", 3100));
        assert_eq!(u.id.server, ep("198.18.7.2", 0));
        assert_eq!(u.nat, Nat::default());
        assert_eq!(u.to_server, Counters::new(336, 4));
        let u = parse_proc_line(
            "ipv6     10 icmpv6   58 29 src=fd00:0000:0000:0000:0000:0000:0000:0001 \
             dst=fd00:0000:0000:0000:0000:0000:0000:0002 type=128 code=0 id=77 \
             src=fd00:0000:0000:0000:0000:0000:0000:0002 dst=fd00:0000:0000:0000:0000:0000:0000:0001 \
             type=129 code=0 id=77 mark=0 zone=0 use=2",
        )
        .expect("parses");
        assert_eq!(u.id.transport, Transport::Icmpv6);
        assert_eq!(u.id.client, ep("fd00::1", 77));
        assert_eq!(u.nat, Nat::default());
    }

    #[test]
    fn unknown_protocols_are_kept() {
        let u = parse_proc_line(
            "ipv4     2 unknown  2 580 src=198.18.8.1 dst=224.0.0.22 [UNREPLIED] src=224.0.0.22 \
             dst=198.18.8.1 mark=0 zone=0 use=2",
        )
        .expect("parses");
        assert_eq!(u.id.transport, Transport::Other(2));
        assert_eq!(u.id.client, ep("198.18.8.1", 0));
        assert_eq!(u.nat, Nat::default());
        let gre = parse_proc_line(
            "ipv4     2 gre      47 170 timeout=180, stream_timeout=180 src=198.18.9.1 dst=198.18.9.2 \
             srckey=0x0 dstkey=0x0 src=198.18.9.2 dst=198.18.9.1 srckey=0x0 dstkey=0x0 [ASSURED] mark=0 use=2",
        )
        .expect("parses");
        assert_eq!(gre.id.transport, Transport::Other(47));
    }

    #[test]
    fn garbage_is_an_error() {
        for line in [
            "",
            "ipv4",
            "ipv4 2 tcp six 10",
            "ipx 2 tcp 6 10 src=198.18.0.1 dst=198.18.0.2",
            "ipv4 2 tcp 6 10 ESTABLISHED",
            "ipv4 2 tcp 6 10 src=198.18.0.1",
            "ipv4 2 tcp 6 10 src=198.18.0.999 dst=198.18.0.2",
            "ipv4 2 tcp 6 10 src=198.18.0.1 dst=198.18.0.2 sport=70000",
            "ipv4 2 tcp 6 10 src=198.18.0.1 dst=198.18.0.2 packets=-1",
            "ipv6 10 tcp 6 10 src=198.18.0.1 dst=198.18.0.2",
            "ipv4 2 tcp 6 10 src=198.18.0.1 dst=198.18.0.2 src=198.18.0.2 dst=198.18.0.1 src=1.1.1.1",
        ] {
            assert!(parse_proc_line(line).is_err(), "{line:?}");
        }
    }

    #[test]
    fn streams_a_file_skipping_bad_lines() {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            f,
            "ipv4     2 udp      17 20 src=198.18.0.1 dst=198.18.0.2 sport=1 dport=2 packets=1 bytes=60 \
             src=198.18.0.2 dst=198.18.0.1 sport=2 dport=1 packets=1 bytes=70 mark=0 zone=0 use=2"
        )
        .expect("write");
        writeln!(f, "this is not conntrack").expect("write");
        f.write_all(b"\xff\xfe\n").expect("write");
        write!(
            f,
            "ipv4     2 udp      17 20 src=198.18.0.3 dst=198.18.0.2 sport=1 dport=2 \
             src=198.18.0.2 dst=198.18.0.3 sport=2 dport=1 mark=0 zone=0 use=2"
        )
        .expect("write");
        let mut seen = Vec::new();
        let out = dump_file(f.path(), |u| {
            seen.push(u);
            true
        })
        .expect("reads");
        assert_eq!(out.entries, 2);
        assert_eq!(out.malformed, 2);
        assert!(out.first_error.is_some());
        assert_eq!(seen[1].id.client, ep("198.18.0.3", 1));
        let out = dump_file(f.path(), |_| false).expect("reads");
        assert!(out.halted);
        assert_eq!(out.entries, 1);
    }
}
