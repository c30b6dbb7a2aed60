//! DNS lookups seen by the kernel source: one [`DnsRecord`] per query,
//! answered or timed out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use foldhash::fast::RandomState;

use super::model::{Endpoint, Transport};
use super::names::FlowNames;

/// How a query ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsOutcome {
    /// A response came back with this RCODE (0 NOERROR, 2 SERVFAIL,
    /// 3 NXDOMAIN, 5 REFUSED, ...).
    Answered { rcode: u8, latency: Duration },
    /// No response within `ebpf.dns.timeout`.
    Timeout,
}

/// One DNS query and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsRecord {
    pub client: Endpoint,
    /// The server the client addressed (a Service VIP before its DNAT).
    pub server: Endpoint,
    pub transport: Transport,
    /// The DNS transaction id.
    pub id: u16,
    pub opcode: u8,
    /// The question type (1 A, 28 AAAA, ...); 0 when the name was too long
    /// for the type to be copied.
    pub qtype: u16,
    /// The query name, dotted, without the final dot (`.` for the root);
    /// bytes other than letters, digits, `-` and `_` as `\DDD`.
    pub name: Arc<str>,
    /// Only the start of the name was copied (`name` ends early).
    pub name_truncated: bool,
    pub outcome: DnsOutcome,
}

/// The mnemonic of an RCODE (RFC 6895), `RCODE<n>` for the rest.
pub fn rcode_name(rcode: u8) -> Arc<str> {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}").into(),
    }
}

/// The mnemonic of a question type, `TYPE<n>` (RFC 3597) for the rest.
pub fn qtype_name(qtype: u16) -> Arc<str> {
    match qtype {
        1 => "A".into(),
        2 => "NS".into(),
        5 => "CNAME".into(),
        6 => "SOA".into(),
        12 => "PTR".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        28 => "AAAA".into(),
        33 => "SRV".into(),
        64 => "SVCB".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        n => format!("TYPE{n}").into(),
    }
}

/// What identifies a DNS series: the client (its name, else its address),
/// the server it addressed, how the lookup ended and its question type.
/// Query names are never part of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsKey {
    /// Both ends' names, when naming is on.
    pub names: Option<Arc<FlowNames>>,
    /// The client's address when nothing names it.
    pub client: Option<IpAddr>,
    pub server: Endpoint,
    pub transport: Transport,
    /// `None`: timed out.
    pub rcode: Option<u8>,
    pub qtype: u16,
}

/// One DNS series at the end of an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsPoint {
    pub key: DnsKey,
    /// Lookups since `start`.
    pub requests: u64,
    /// Latencies of this interval's answered lookups, in seconds.
    pub latency: Vec<f64>,
    pub start: SystemTime,
}

/// A lookup for the logs, with both ends' names: every failed one (an error
/// RCODE or a timeout), and the answered ones too when an exporter asks
/// for them (`export.logs.dns: all`).
#[derive(Debug, Clone)]
pub struct DnsLookup {
    pub record: DnsRecord,
    pub names: Option<Arc<FlowNames>>,
    pub at: SystemTime,
}

impl DnsRecord {
    /// NXDOMAIN, SERVFAIL, REFUSED, any other error RCODE, or a timeout.
    pub fn failed(&self) -> bool {
        !matches!(self.outcome, DnsOutcome::Answered { rcode: 0, .. })
    }
}

/// The DNS series, cumulative.
#[derive(Debug, Default)]
pub struct DnsSeries {
    series: HashMap<DnsKey, (u64, Vec<f64>, SystemTime), RandomState>,
}

impl DnsSeries {
    pub fn record(&mut self, record: &DnsRecord, names: Option<Arc<FlowNames>>) {
        let (rcode, latency) = match record.outcome {
            DnsOutcome::Answered { rcode, latency } => (Some(rcode), Some(latency)),
            DnsOutcome::Timeout => (None, None),
        };
        let named = names.as_ref().is_some_and(|n| n.client.is_named());
        let key = DnsKey {
            names,
            client: (!named).then_some(record.client.ip),
            server: record.server,
            transport: record.transport,
            rcode,
            qtype: record.qtype,
        };
        let entry = self
            .series
            .entry(key)
            .or_insert_with(|| (0, Vec::new(), SystemTime::now()));
        entry.0 += 1;
        if let Some(l) = latency {
            entry.1.push(l.as_secs_f64());
        }
    }

    /// Every series now (this interval's latencies move into the points).
    pub fn finish(&mut self) -> Vec<DnsPoint> {
        self.series
            .iter_mut()
            .map(|(key, (requests, latency, start))| DnsPoint {
                key: key.clone(),
                requests: *requests,
                latency: std::mem::take(latency),
                start: *start,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnemonics() {
        assert_eq!(&*rcode_name(3), "NXDOMAIN");
        assert_eq!(&*rcode_name(9), "RCODE9");
        assert_eq!(&*qtype_name(28), "AAAA");
        assert_eq!(&*qtype_name(99), "TYPE99");
    }
}
