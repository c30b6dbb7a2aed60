//! nftables over netlink: one `NFT_MSG_GETRULE` dump of every family's
//! rules, decoded here (no crate dumps rules with their counters and
//! handles without libnftnl). This also reads `iptables-nft` rules, which
//! are nftables rules with `xt` match and target expressions.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::rules::{Backend, DecodeIssue, Issues, Rule, Verdict, MAX_COMMENT};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// The dump was interrupted by a ruleset change and is inconsistent.
const NLM_F_DUMP_INTR: u16 = 0x10;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_TARGET_NAME: u16 = 1;
const NFTA_MATCH_NAME: u16 = 1;
const NFTA_MATCH_INFO: u16 = 3;
/// `NFTNL_UDATA_RULE_COMMENT`, the type of the comment in a rule's user data.
const UDATA_RULE_COMMENT: u8 = 0;

/// Every expression type the kernel had by 6.18; any other is counted.
const KNOWN_EXPRESSIONS: &[&str] = &[
    "bitwise",
    "byteorder",
    "cmp",
    "connlimit",
    "counter",
    "ct",
    "dup",
    "dynset",
    "exthdr",
    "fib",
    "flow_offload",
    "fwd",
    "hash",
    "immediate",
    "inner",
    "last",
    "limit",
    "log",
    "lookup",
    "masq",
    "match",
    "meta",
    "nat",
    "notrack",
    "numgen",
    "objref",
    "osf",
    "payload",
    "queue",
    "quota",
    "range",
    "redir",
    "reject",
    "rt",
    "secmark",
    "socket",
    "synproxy",
    "target",
    "tproxy",
    "tunnel",
    "xfrm",
];

const RECV_BUF: usize = 64 * 1024;
const RECV_TIMEOUT: Duration = Duration::from_millis(200);
const DUMP_STALL: Duration = Duration::from_secs(5);
/// Dumps interrupted by a ruleset change are tried this often in a row.
const DUMP_TRIES: usize = 3;

/// The nftables family name of an `NFPROTO_*` number.
fn family_name(family: u8) -> &'static str {
    match family {
        1 => "inet",
        2 => "ip",
        3 => "arp",
        5 => "netdev",
        7 => "bridge",
        10 => "ip6",
        _ => "unknown",
    }
}

/// A bounds-checked walk over netlink attributes: (masked type, value).
struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8]), DecodeIssue>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let (Some(len), Some(kind)) = (ne_u16(self.rest, 0), ne_u16(self.rest, 2)) else {
            self.rest = &[];
            return Some(Err(DecodeIssue::Malformed("attribute header")));
        };
        let len = usize::from(len);
        if len < NLA_HDRLEN || len > self.rest.len() {
            self.rest = &[];
            return Some(Err(DecodeIssue::Malformed("attribute length")));
        }
        let value = &self.rest[NLA_HDRLEN..len];
        let aligned = align4(len).min(self.rest.len());
        self.rest = &self.rest[aligned..];
        Some(Ok((kind & NLA_TYPE_MASK, value)))
    }
}

fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn ne_u16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes([b[0], b[1]]))
}

fn ne_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn be_u64(v: &[u8], what: &'static str) -> Result<u64, DecodeIssue> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| DecodeIssue::Malformed(what))
}

fn be_u32(v: &[u8], what: &'static str) -> Result<u32, DecodeIssue> {
    <[u8; 4]>::try_from(v)
        .map(u32::from_be_bytes)
        .map_err(|_| DecodeIssue::Malformed(what))
}

/// A netlink string: up to the first NUL, lossily UTF-8.
fn nl_str(v: &[u8]) -> String {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// What one netlink message of a rule dump is.
#[derive(Debug)]
pub enum Message {
    Rule(Rule),
    /// The end of the dump (0) or an error code (negative errno).
    Done(i32),
    /// An ack or a message of no interest.
    Other,
}

/// Decodes one netlink message (header included) of a rule dump. Issues
/// that do not make the rule unusable (an unknown expression, a comment
/// cut to [`MAX_COMMENT`]) are added to `issues`; a message that cannot be
/// read is an error.
pub fn decode(msg: &[u8], issues: &mut Issues) -> Result<Message, DecodeIssue> {
    let len = ne_u32(msg, 0).ok_or(DecodeIssue::Malformed("netlink header"))? as usize;
    let kind = ne_u16(msg, 4).ok_or(DecodeIssue::Malformed("netlink header"))?;
    if len < NLMSG_HDRLEN || len > msg.len() {
        return Err(DecodeIssue::Malformed("netlink length"));
    }
    let payload = &msg[NLMSG_HDRLEN..len];
    match kind {
        NLMSG_DONE | NLMSG_ERROR => {
            let code = ne_u32(payload, 0).map_or(0, |c| c as i32);
            Ok(if kind == NLMSG_DONE || code != 0 {
                Message::Done(code)
            } else {
                Message::Other
            })
        }
        k if k == (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE) => {
            let family = *payload.first().ok_or(DecodeIssue::Malformed("nfgenmsg"))?;
            let attrs_buf = payload
                .get(NFGENMSG_LEN..)
                .ok_or(DecodeIssue::Malformed("nfgenmsg"))?;
            decode_rule(family, attrs_buf, issues).map(Message::Rule)
        }
        _ => Ok(Message::Other),
    }
}

fn decode_rule(family: u8, buf: &[u8], issues: &mut Issues) -> Result<Rule, DecodeIssue> {
    let mut table = None;
    let mut chain = None;
    let mut handle = None;
    let mut comment = None;
    let mut counters = None;
    let mut verdict = Verdict::Continue;
    let mut signature = DefaultHasher::new();
    for a in attrs(buf) {
        let (kind, value) = a?;
        match kind {
            NFTA_RULE_TABLE => table = Some(nl_str(value)),
            NFTA_RULE_CHAIN => chain = Some(nl_str(value)),
            NFTA_RULE_HANDLE => handle = Some(be_u64(value, "rule handle")?),
            NFTA_RULE_USERDATA => {
                value.hash(&mut signature);
                comment = udata_comment(value, issues)?;
            }
            NFTA_RULE_EXPRESSIONS => {
                for e in attrs(value) {
                    let (kind, elem) = e?;
                    if kind != NFTA_LIST_ELEM {
                        continue;
                    }
                    let expr = decode_expression(elem, issues)?;
                    match expr {
                        Expression::Counter { packets, bytes } => {
                            // A second counter in one rule counts the same
                            // packets; the first is the rule's.
                            counters.get_or_insert((packets, bytes));
                            "counter".hash(&mut signature);
                        }
                        Expression::Verdict(v) => {
                            v.hash(&mut signature);
                            verdict = v;
                        }
                        Expression::Comment(text) => {
                            text.hash(&mut signature);
                            // Calico writes its `cali:` id and a
                            // description: the description is kept.
                            if comment.is_none() || !text.starts_with("cali:") {
                                comment = Some(text);
                            }
                        }
                        Expression::Other { name, data } => {
                            name.hash(&mut signature);
                            data.hash(&mut signature);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let table = table.ok_or(DecodeIssue::Malformed("rule without a table"))?;
    let chain = chain.ok_or(DecodeIssue::Malformed("rule without a chain"))?;
    let handle = handle.ok_or(DecodeIssue::Malformed("rule without a handle"))?;
    Ok(Rule {
        backend: Backend::Nftables,
        family: family_name(family),
        table,
        chain,
        position: 0,
        handle: Some(handle),
        verdict,
        comment,
        signature: signature.finish(),
        counters,
    })
}

enum Expression<'a> {
    Counter {
        packets: u64,
        bytes: u64,
    },
    /// `iptables-nft`'s `-m comment`: an xt match holding the text.
    Comment(String),
    Verdict(Verdict),
    Other {
        name: String,
        data: &'a [u8],
    },
}

fn decode_expression<'a>(
    elem: &'a [u8],
    issues: &mut Issues,
) -> Result<Expression<'a>, DecodeIssue> {
    let mut name = None;
    let mut data: &[u8] = &[];
    for a in attrs(elem) {
        let (kind, value) = a?;
        match kind {
            NFTA_EXPR_NAME => name = Some(nl_str(value)),
            NFTA_EXPR_DATA => data = value,
            _ => {}
        }
    }
    let name = name.ok_or(DecodeIssue::Malformed("expression without a name"))?;
    match name.as_str() {
        "counter" => {
            let (mut packets, mut bytes) = (None, None);
            for a in attrs(data) {
                let (kind, value) = a?;
                match kind {
                    NFTA_COUNTER_PACKETS => packets = Some(be_u64(value, "counter packets")?),
                    NFTA_COUNTER_BYTES => bytes = Some(be_u64(value, "counter bytes")?),
                    _ => {}
                }
            }
            match (packets, bytes) {
                (Some(packets), Some(bytes)) => Ok(Expression::Counter { packets, bytes }),
                _ => Err(DecodeIssue::Malformed("counter without packets or bytes")),
            }
        }
        "immediate" => match immediate_verdict(data)? {
            Some(v) => Ok(Expression::Verdict(v)),
            None => Ok(Expression::Other { name, data }),
        },
        "match" => {
            let mut match_name = String::new();
            let mut info: &[u8] = &[];
            for a in attrs(data) {
                let (kind, value) = a?;
                match kind {
                    NFTA_MATCH_NAME => match_name = nl_str(value),
                    NFTA_MATCH_INFO => info = value,
                    _ => {}
                }
            }
            if match_name == "comment" {
                Ok(Expression::Comment(comment(&nl_str(info), issues)))
            } else {
                Ok(Expression::Other { name, data })
            }
        }
        "reject" => Ok(Expression::Verdict(Verdict::Reject)),
        "queue" => Ok(Expression::Verdict(Verdict::Queue)),
        "target" => {
            let target = attrs(data)
                .filter_map(Result::ok)
                .find(|(k, _)| *k == NFTA_TARGET_NAME)
                .map(|(_, v)| nl_str(v))
                .unwrap_or_default();
            Ok(Expression::Verdict(Verdict::from_target(&target)))
        }
        other => {
            if !KNOWN_EXPRESSIONS.contains(&other) {
                issues.push(DecodeIssue::UnknownExpression(truncate(other, 64)));
            }
            Ok(Expression::Other { name, data })
        }
    }
}

/// The verdict an `immediate` expression loads into the verdict register,
/// if that is what it does.
fn immediate_verdict(data: &[u8]) -> Result<Option<Verdict>, DecodeIssue> {
    let mut dreg = None;
    let mut verdict = None;
    for a in attrs(data) {
        let (kind, value) = a?;
        match kind {
            NFTA_IMMEDIATE_DREG => dreg = Some(be_u32(value, "immediate register")?),
            NFTA_IMMEDIATE_DATA => {
                for d in attrs(value) {
                    let (kind, v) = d?;
                    if kind == NFTA_DATA_VERDICT {
                        verdict = Some(decode_verdict(v)?);
                    }
                }
            }
            _ => {}
        }
    }
    // NFT_REG_VERDICT is register 0.
    Ok(if dreg == Some(0) { verdict } else { None })
}

fn decode_verdict(buf: &[u8]) -> Result<Verdict, DecodeIssue> {
    let mut code = None;
    let mut chain = String::new();
    for a in attrs(buf) {
        let (kind, value) = a?;
        match kind {
            NFTA_VERDICT_CODE => code = Some(be_u32(value, "verdict code")? as i32),
            NFTA_VERDICT_CHAIN => chain = nl_str(value),
            _ => {}
        }
    }
    Ok(
        match code.ok_or(DecodeIssue::Malformed("verdict without a code"))? {
            0 => Verdict::Drop,
            1 => Verdict::Accept,
            3 => Verdict::Queue,
            -1 | -2 => Verdict::Continue,
            -3 => Verdict::Jump(chain),
            -4 => Verdict::Goto(chain),
            -5 => Verdict::Return,
            other => Verdict::Other(format!("verdict {other}")),
        },
    )
}

/// The comment in a rule's user data (type-length-value records).
fn udata_comment(buf: &[u8], issues: &mut Issues) -> Result<Option<String>, DecodeIssue> {
    let mut rest = buf;
    while let [kind, len, tail @ ..] = rest {
        let len = usize::from(*len);
        let value = tail
            .get(..len)
            .ok_or(DecodeIssue::Malformed("rule user data"))?;
        if *kind == UDATA_RULE_COMMENT {
            return Ok(Some(comment(&nl_str(value), issues)));
        }
        rest = &tail[len..];
    }
    if !rest.is_empty() {
        return Err(DecodeIssue::Malformed("rule user data"));
    }
    Ok(None)
}

/// `text` cut to [`MAX_COMMENT`] bytes, noting the cut.
pub fn comment(text: &str, issues: &mut Issues) -> String {
    if text.len() > MAX_COMMENT {
        issues.push(DecodeIssue::CommentTooLong(text.len()));
        return truncate(text, MAX_COMMENT);
    }
    text.to_owned()
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The `NFT_MSG_GETRULE` dump request for every family.
pub fn dump_request(seq: u32) -> Vec<u8> {
    let mut e = Encoder::new(
        NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETRULE,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        0,
    );
    e.finish()
}

/// A growing netlink message (the dump request; rule messages in tests).
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// Starts a message: the netlink header and an nfgenmsg for `family`.
    pub fn new(kind: u16, flags: u16, seq: u32, family: u8) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&[family, 0, 0, 0]);
        Self { buf }
    }

    /// A rule message of a dump, as the kernel sends it.
    #[cfg(test)]
    pub fn rule(family: u8) -> Self {
        Self::new(NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE, 0x2, 1, family)
    }

    /// Adds an attribute; a value too long for one is cut to fit.
    pub fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let value = &value[..value.len().min(usize::from(u16::MAX) - NLA_HDRLEN)];
        let len = (NLA_HDRLEN + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Opens a nested attribute; close it with [`Encoder::end`].
    pub fn begin(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub fn end(&mut self, at: usize) -> &mut Self {
        let len = u16::try_from(self.buf.len() - at).unwrap_or(u16::MAX);
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Writes the total length and returns the message.
    pub fn finish(&mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        std::mem::take(&mut self.buf)
    }
}

/// A NETLINK_NETFILTER socket for rule dumps, kept between reads.
pub struct Dumper {
    sock: Option<Socket>,
    seq: u32,
    buf: Vec<u8>,
}

impl Default for Dumper {
    fn default() -> Self {
        Self {
            sock: None,
            seq: 0,
            buf: vec![0u8; RECV_BUF],
        }
    }
}

fn open() -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind(&SocketAddr::new(0, 0))?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: RECV_TIMEOUT.as_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a live timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Why a dump failed, as `error.type`.
#[derive(Debug)]
pub struct DumpError {
    pub kind: &'static str,
    pub message: String,
}

impl DumpError {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl Dumper {
    /// Every rule of every nftables table, with positions numbered per
    /// chain from 1 in the kernel's order. Undecodable messages and
    /// unexpected content go to `issues`.
    pub fn dump(&mut self, issues: &mut Issues) -> Result<Vec<Rule>, DumpError> {
        let mut last = None;
        for _ in 0..DUMP_TRIES {
            match self.dump_once(issues) {
                Ok(Some(rules)) => return Ok(rules),
                Ok(None) => {
                    last = Some(DumpError::new(
                        "interrupted",
                        "the ruleset changed during every dump",
                    ))
                }
                Err(e) => {
                    self.sock = None;
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| DumpError::new("interrupted", "no dump")))
    }

    /// `None` when the kernel flagged the dump as interrupted.
    fn dump_once(&mut self, issues: &mut Issues) -> Result<Option<Vec<Rule>>, DumpError> {
        if self.sock.is_none() {
            let sock = open()
                .map_err(|e| DumpError::new("socket", format!("opening a netlink socket: {e}")))?;
            self.sock = Some(sock);
        }
        let Some(sock) = &self.sock else {
            return Err(DumpError::new("socket", "no netlink socket"));
        };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let req = dump_request(seq);
        match sock.send(&req, 0) {
            Ok(n) if n == req.len() => {}
            Ok(_) => return Err(DumpError::new("send", "short netlink send")),
            Err(e) => {
                return Err(DumpError::new(
                    "send",
                    format!("sending the dump request: {e}"),
                ))
            }
        }
        let mut rules = Vec::new();
        let mut interrupted = false;
        let mut last_data = Instant::now();
        loop {
            let mut window: &mut [u8] = &mut self.buf;
            let cap = window.len();
            let n = match sock.recv(&mut window, libc::MSG_TRUNC) {
                Ok(n) if n > cap => {
                    issues.push(DecodeIssue::Malformed("datagram larger than the buffer"));
                    continue;
                }
                Ok(n) => n,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        if last_data.elapsed() > DUMP_STALL {
                            return Err(DumpError::new(
                                "timeout",
                                format!("no answer for {DUMP_STALL:?}"),
                            ));
                        }
                        continue;
                    }
                    _ => return Err(DumpError::new("receive", format!("receiving: {e}"))),
                },
            };
            last_data = Instant::now();
            let mut rest = &self.buf[..n];
            while !rest.is_empty() {
                let len = ne_u32(rest, 0).map_or(0, |l| l as usize);
                if len < NLMSG_HDRLEN || len > rest.len() {
                    issues.push(DecodeIssue::Malformed("netlink length"));
                    break;
                }
                let msg = &rest[..len];
                rest = &rest[align4(len).min(rest.len())..];
                let (Some(flags), Some(msg_seq)) = (ne_u16(msg, 6), ne_u32(msg, 8)) else {
                    continue;
                };
                if msg_seq != seq {
                    continue;
                }
                if flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match decode(msg, issues) {
                    Ok(Message::Rule(r)) => rules.push(r),
                    Ok(Message::Done(0)) => {
                        if interrupted {
                            return Ok(None);
                        }
                        number(&mut rules);
                        return Ok(Some(rules));
                    }
                    Ok(Message::Done(code)) => {
                        let err = io::Error::from_raw_os_error(-code);
                        let kind = if -code == libc::EPERM {
                            "permission"
                        } else {
                            "kernel"
                        };
                        return Err(DumpError::new(
                            kind,
                            format!("the kernel refused the rule dump: {err}"),
                        ));
                    }
                    Ok(Message::Other) => {}
                    Err(e) => issues.push(e),
                }
            }
        }
    }
}

/// Numbers each rule's position within its chain, from 1, in dump order.
fn number(rules: &mut [Rule]) {
    let mut at: std::collections::HashMap<(&'static str, String, String), u32> =
        std::collections::HashMap::new();
    for r in rules.iter_mut() {
        let n = at
            .entry((r.family, r.table.clone(), r.chain.clone()))
            .or_insert(0);
        *n += 1;
        r.position = *n;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn expr(e: &mut Encoder, name: &str, data: impl FnOnce(&mut Encoder)) {
        let elem = e.begin(NFTA_LIST_ELEM);
        e.attr(NFTA_EXPR_NAME, format!("{name}\0").as_bytes());
        let d = e.begin(NFTA_EXPR_DATA);
        data(e);
        e.end(d);
        e.end(elem);
    }

    fn verdict(e: &mut Encoder, code: i32, chain: Option<&str>) {
        e.attr(NFTA_IMMEDIATE_DREG, &0u32.to_be_bytes());
        let data = e.begin(NFTA_IMMEDIATE_DATA);
        let v = e.begin(NFTA_DATA_VERDICT);
        e.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            e.attr(NFTA_VERDICT_CHAIN, format!("{c}\0").as_bytes());
        }
        e.end(v);
        e.end(data);
    }

    /// A rule as the kernel dumps it: `counter`, an expression of `extra`
    /// name, and a verdict; `udata` as its user data.
    pub(crate) fn rule_message(
        extra: &str,
        code: i32,
        chain: Option<&str>,
        udata: &[u8],
    ) -> Vec<u8> {
        let mut e = Encoder::rule(2);
        e.attr(NFTA_RULE_TABLE, b"filter\0")
            .attr(NFTA_RULE_CHAIN, b"cali-pi-_x\0")
            .attr(NFTA_RULE_HANDLE, &42u64.to_be_bytes());
        let list = e.begin(NFTA_RULE_EXPRESSIONS);
        expr(&mut e, "counter", |e| {
            e.attr(NFTA_COUNTER_BYTES, &500u64.to_be_bytes())
                .attr(NFTA_COUNTER_PACKETS, &5u64.to_be_bytes());
        });
        expr(&mut e, extra, |e| {
            e.attr(1, &[1, 2, 3, 4]);
        });
        expr(&mut e, "immediate", |e| verdict(e, code, chain));
        e.end(list);
        if !udata.is_empty() {
            e.attr(NFTA_RULE_USERDATA, udata);
        }
        e.finish()
    }

    pub(crate) fn comment_udata(text: &[u8]) -> Vec<u8> {
        let mut u = vec![UDATA_RULE_COMMENT, (text.len() + 1) as u8];
        u.extend_from_slice(text);
        u.push(0);
        u
    }

    #[test]
    fn decodes_a_rule_with_counter_verdict_and_comment() {
        let msg = rule_message(
            "payload",
            -3,
            Some("KUBE-MARK-DROP"),
            &comment_udata(b"Policy default/knp.default.deny ingress"),
        );
        let mut issues = Issues::new();
        let Ok(Message::Rule(r)) = decode(&msg, &mut issues) else {
            panic!("not a rule");
        };
        assert!(issues.is_empty());
        assert_eq!(
            (
                r.family,
                r.table.as_str(),
                r.chain.as_str(),
                r.handle,
                r.counters
            ),
            ("ip", "filter", "cali-pi-_x", Some(42), Some((5, 500)))
        );
        assert_eq!(r.verdict, Verdict::Jump("KUBE-MARK-DROP".into()));
        assert_eq!(
            r.comment.as_deref(),
            Some("Policy default/knp.default.deny ingress")
        );
        // The same rule with other counts has the same signature.
        let mut again = msg.clone();
        let at = again
            .windows(8)
            .position(|w| w == 5u64.to_be_bytes())
            .expect("packets");
        again[at..at + 8].copy_from_slice(&9u64.to_be_bytes());
        let Ok(Message::Rule(r2)) = decode(&again, &mut issues) else {
            panic!("not a rule");
        };
        assert_eq!((r2.counters, r2.signature), (Some((9, 500)), r.signature));
    }

    #[test]
    fn unknown_expressions_and_long_comments_are_noted_not_fatal() {
        let longest = vec![b'c'; 254];
        let msg = rule_message("frobnicate", 0, None, &comment_udata(&longest));
        let mut issues = Issues::new();
        let Ok(Message::Rule(r)) = decode(&msg, &mut issues) else {
            panic!("not a rule");
        };
        assert_eq!(r.verdict, Verdict::Drop);
        assert_eq!(r.comment.map(|c| c.len()), Some(254));
        assert_eq!(
            issues,
            vec![DecodeIssue::UnknownExpression("frobnicate".into())]
        );
        // A huge expression name is cut in what is reported.
        let mut issues = Issues::new();
        let name = "x".repeat(60_000);
        let msg = rule_message(&name, 1, None, &[]);
        let Ok(Message::Rule(r)) = decode(&msg, &mut issues) else {
            panic!("not a rule");
        };
        assert_eq!(r.verdict, Verdict::Accept);
        assert_eq!(issues, vec![DecodeIssue::UnknownExpression("x".repeat(64))]);
        // User data of 60 KB whose comment record runs past its end.
        let mut udata = [7u8, 0].repeat(30_000);
        udata.extend_from_slice(&[UDATA_RULE_COMMENT, 200, b'a', b'b']);
        let msg = rule_message("cmp", 1, None, &udata);
        assert_eq!(
            decode(&msg, &mut issues).map(|_| ()),
            Err(DecodeIssue::Malformed("rule user data"))
        );
    }

    #[test]
    fn iptables_nft_comments_are_read_from_the_xt_match() {
        let mut e = Encoder::rule(2);
        e.attr(NFTA_RULE_TABLE, b"filter\0")
            .attr(NFTA_RULE_CHAIN, b"KUBE-SERVICES\0")
            .attr(NFTA_RULE_HANDLE, &7u64.to_be_bytes());
        let list = e.begin(NFTA_RULE_EXPRESSIONS);
        for text in ["cali:Zz9", "default/web:http has no endpoints"] {
            expr(&mut e, "match", |e| {
                let mut info = text.as_bytes().to_vec();
                info.resize(256, 0);
                e.attr(NFTA_MATCH_NAME, b"comment\0")
                    .attr(2, &0u32.to_be_bytes())
                    .attr(NFTA_MATCH_INFO, &info);
            });
        }
        expr(&mut e, "counter", |e| {
            e.attr(NFTA_COUNTER_BYTES, &60u64.to_be_bytes())
                .attr(NFTA_COUNTER_PACKETS, &1u64.to_be_bytes());
        });
        expr(&mut e, "target", |e| {
            e.attr(NFTA_TARGET_NAME, b"REJECT\0");
        });
        e.end(list);
        let mut issues = Issues::new();
        let Ok(Message::Rule(r)) = decode(&e.finish(), &mut issues) else {
            panic!("not a rule");
        };
        assert!(issues.is_empty());
        assert_eq!(
            (r.comment.as_deref(), r.verdict, r.counters),
            (
                Some("default/web:http has no endpoints"),
                Verdict::Reject,
                Some((1, 60))
            )
        );
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let good = rule_message("cmp", 1, None, &comment_udata(b"hi"));
        let mut issues = Issues::new();
        // Every truncation and every single-byte corruption.
        for cut in 0..good.len() {
            let mut m = good[..cut].to_vec();
            if m.len() >= 4 {
                let len = (m.len() as u32).to_ne_bytes();
                m[..4].copy_from_slice(&len);
            }
            let _ = decode(&m, &mut issues);
        }
        for at in 0..good.len() {
            for v in [0u8, 0xff, 0x7f] {
                let mut m = good.clone();
                m[at] = v;
                let _ = decode(&m, &mut issues);
            }
        }
        // A rule without its table is malformed.
        let mut e = Encoder::rule(10);
        e.attr(NFTA_RULE_CHAIN, b"c\0")
            .attr(NFTA_RULE_HANDLE, &1u64.to_be_bytes());
        assert_eq!(
            decode(&e.finish(), &mut issues).map(|_| ()),
            Err(DecodeIssue::Malformed("rule without a table"))
        );
    }
}
