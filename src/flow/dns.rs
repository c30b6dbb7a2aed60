//! DNS lookups seen by the kernel source: one [`DnsRecord`] per query,
//! answered or timed out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use foldhash::fast::RandomState;

use super::model::{Endpoint, Transport};
use super::names::FlowNames;
use crate::telemetry::Counter;

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

/// One query-name series at the end of an interval: a name, or the
/// overflow series (`name` `None`) where every other name's lookups go.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsNamePoint {
    pub name: Option<Arc<str>>,
    /// Lookups since `start`.
    pub requests: u64,
    pub start: SystemTime,
}

/// A name's cumulative lookups and those of this interval.
#[derive(Debug)]
struct NameCount {
    total: u64,
    interval: u64,
    start: SystemTime,
}

/// The top query names (`flows.dns_top_names`), the series budget's rule
/// applied to names: at the end of each interval the `k` names with the
/// most lookups in it keep a series of their own and every other name's
/// lookups fold into one overflow series, their cumulative counts moving
/// with them (totals stay exact and monotonic). Between two ends of
/// interval at most `k` new names wait as candidates; past that, lookups
/// of new names go straight to the overflow series. Every lookup folded
/// either way is counted (`flowtel.dns.names.overflowed`). `k` 0: off.
#[derive(Debug)]
pub struct DnsNames {
    k: usize,
    kept: HashMap<Arc<str>, NameCount, RandomState>,
    candidates: HashMap<Arc<str>, NameCount, RandomState>,
    overflow: u64,
    overflow_start: SystemTime,
    overflowed: Counter,
}

impl DnsNames {
    pub fn new(k: usize, overflowed: Counter) -> Self {
        Self {
            k,
            kept: HashMap::default(),
            candidates: HashMap::default(),
            overflow: 0,
            overflow_start: SystemTime::now(),
            overflowed,
        }
    }

    /// Counts one lookup of `name`.
    pub fn record(&mut self, name: &Arc<str>) {
        if self.k == 0 {
            return;
        }
        if let Some(c) = self.kept.get_mut(name) {
            c.total += 1;
            c.interval += 1;
        } else if let Some(c) = self.candidates.get_mut(name) {
            c.total += 1;
            c.interval += 1;
        } else if self.candidates.len() < self.k {
            self.candidates.insert(
                Arc::clone(name),
                NameCount {
                    total: 1,
                    interval: 1,
                    start: SystemTime::now(),
                },
            );
        } else {
            self.overflow += 1;
            self.overflowed.inc();
        }
    }

    /// Keeps this interval's top `k` names (ties: names already kept, then
    /// by name), folds the rest into the overflow series, and returns every
    /// series now. Empty when off.
    pub fn finish(&mut self) -> Vec<DnsNamePoint> {
        if self.k == 0 {
            return Vec::new();
        }
        let mut all: Vec<(Arc<str>, NameCount, bool)> = self
            .kept
            .drain()
            .map(|(n, c)| (n, c, true))
            .chain(self.candidates.drain().map(|(n, c)| (n, c, false)))
            .collect();
        all.sort_by(|a, b| {
            b.1.interval
                .cmp(&a.1.interval)
                .then(b.2.cmp(&a.2))
                .then_with(|| a.0.cmp(&b.0))
        });
        for (i, (name, mut count, _)) in all.into_iter().enumerate() {
            if i < self.k {
                count.interval = 0;
                self.kept.insert(name, count);
            } else {
                self.overflow += count.total;
                self.overflowed.add(count.total);
            }
        }
        let mut points: Vec<DnsNamePoint> = self
            .kept
            .iter()
            .map(|(name, c)| DnsNamePoint {
                name: Some(Arc::clone(name)),
                requests: c.total,
                start: c.start,
            })
            .collect();
        if self.overflow > 0 {
            points.push(DnsNamePoint {
                name: None,
                requests: self.overflow,
                start: self.overflow_start,
            });
        }
        points
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(points: &[DnsNamePoint]) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = points
            .iter()
            .map(|p| {
                (
                    p.name.as_deref().unwrap_or("<overflow>").to_string(),
                    p.requests,
                )
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_top_names_keep_series_and_the_rest_fold_exactly() {
        let overflowed = Counter::default();
        let mut names = DnsNames::new(2, overflowed.clone());
        let (a, b, c, d): (Arc<str>, Arc<str>, Arc<str>, Arc<str>) =
            ("a".into(), "b".into(), "c".into(), "d".into());
        // c and d arrive after a and b took the candidate places.
        for (name, n) in [(&a, 1), (&b, 2), (&c, 5), (&d, 1)] {
            for _ in 0..n {
                names.record(name);
            }
        }
        assert_eq!(
            counts(&names.finish()),
            [("<overflow>".into(), 6), ("a".into(), 1), ("b".into(), 2)]
        );
        assert_eq!(overflowed.get(), 6);
        // Next interval c is a candidate and outdoes a, which folds with
        // its cumulative count.
        for _ in 0..3 {
            names.record(&c);
        }
        names.record(&b);
        assert_eq!(
            counts(&names.finish()),
            [("<overflow>".into(), 7), ("b".into(), 3), ("c".into(), 3)]
        );
        assert_eq!(overflowed.get(), 7);
        // Ties keep the names already kept.
        let mut quiet = names.finish();
        quiet.retain(|p| p.name.is_some());
        assert_eq!(counts(&quiet), [("b".into(), 3), ("c".into(), 3)]);
    }

    #[test]
    fn off_counts_nothing() {
        let mut names = DnsNames::new(0, Counter::default());
        names.record(&"a".into());
        assert!(names.finish().is_empty());
    }

    #[test]
    fn mnemonics() {
        assert_eq!(&*rcode_name(3), "NXDOMAIN");
        assert_eq!(&*rcode_name(9), "RCODE9");
        assert_eq!(&*qtype_name(28), "AAAA");
        assert_eq!(&*qtype_name(99), "TYPE99");
    }
}
