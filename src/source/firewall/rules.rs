//! One firewall rule as both back ends read it, and what can be wrong with
//! what the kernel gave.

use std::fmt;

/// Comments longer than this are cut (the kernel's own limit for both
/// nftables user data and the xtables comment match is 256 bytes).
pub const MAX_COMMENT: usize = 256;

/// Where a rule was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// nftables over netlink (also `iptables-nft`).
    Nftables,
    /// Legacy xtables (`iptables-legacy`, `ip6tables-legacy`).
    Xtables,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::Xtables => "xtables",
        }
    }
}

/// What a rule does with a packet it matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
    Queue,
    Return,
    Jump(String),
    Goto(String),
    /// No verdict: the packet goes on to the next rule (a counter, a
    /// mark, NAT in nftables).
    Continue,
    /// An xtables target (DNAT, MARK, LOG...) or an unknown verdict code.
    Other(String),
}

impl Verdict {
    /// The `flowtel.firewall.verdict` value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Accept => "accept",
            Self::Drop => "drop",
            Self::Reject => "reject",
            Self::Queue => "queue",
            Self::Return => "return",
            Self::Jump(_) => "jump",
            Self::Goto(_) => "goto",
            Self::Continue => "continue",
            Self::Other(_) => "target",
        }
    }

    /// The chain or target, for jumps, gotos and targets.
    pub fn target(&self) -> Option<&str> {
        match self {
            Self::Jump(t) | Self::Goto(t) | Self::Other(t) => Some(t),
            _ => None,
        }
    }

    /// Whether matched packets are discarded.
    pub fn drops(&self) -> bool {
        matches!(self, Self::Drop | Self::Reject)
    }

    /// An xtables `-j` target: the standard verdicts by name, REJECT, or
    /// else a jump to a user chain (upper-case names are extension targets).
    pub fn from_target(target: &str) -> Self {
        match target {
            "ACCEPT" => Self::Accept,
            "DROP" => Self::Drop,
            "REJECT" => Self::Reject,
            "RETURN" => Self::Return,
            "QUEUE" | "NFQUEUE" => Self::Queue,
            t => Self::Other(t.to_owned()),
        }
    }
}

/// One rule with its counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub backend: Backend,
    /// `ip`, `ip6`, `inet`, `arp`, `bridge` or `netdev`.
    pub family: &'static str,
    pub table: String,
    pub chain: String,
    /// From 1 within the chain; 0 is the chain's policy (xtables built-in
    /// chains count their policy's packets).
    pub position: u32,
    /// The kernel's handle (nftables): stable across re-ordering.
    pub handle: Option<u64>,
    pub verdict: Verdict,
    pub comment: Option<String>,
    /// A hash of what the rule matches and does, without its counters: the
    /// same rule loaded again has the same signature.
    pub signature: u64,
    /// (packets, bytes); `None` for an nftables rule without a counter.
    pub counters: Option<(u64, u64)>,
}

/// Something unexpected in what the kernel gave, as `error.type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeIssue {
    /// An nftables expression this version does not know (the rule is
    /// still read).
    UnknownExpression(String),
    /// A comment longer than [`MAX_COMMENT`] bytes, cut (its length).
    CommentTooLong(usize),
    /// A message, attribute or line that could not be read (what).
    Malformed(&'static str),
}

impl DecodeIssue {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownExpression(_) => "unknown_expression",
            Self::CommentTooLong(_) => "comment_too_long",
            Self::Malformed(_) => "malformed",
        }
    }
}

impl fmt::Display for DecodeIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownExpression(name) => write!(f, "unknown nftables expression {name:?}"),
            Self::CommentTooLong(len) => {
                write!(f, "a rule comment of {len} bytes, cut to {MAX_COMMENT}")
            }
            Self::Malformed(what) => write!(f, "malformed {what}"),
        }
    }
}

/// The issues of one read.
pub type Issues = Vec<DecodeIssue>;
