//! DNS tracking (`bpf/dns.h`): reads the completed queries from the
//! `dns_events` ring, expires the queries that got no answer, decodes the
//! question the program copied and counts what could not be recorded.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use serde::{Deserialize, Serialize};

use crate::component::ConfigError;
use crate::flow::dns::{DnsOutcome, DnsRecord};
use crate::flow::{Endpoint, SourceEvent, Transport};
use crate::source::out::{Halt, Out};
use crate::telemetry::{catalogue, Telemetry};

/// Question bytes the program copies (`FT_DNS_QBYTES`).
const QBYTES: usize = 128;
/// How often outstanding queries are checked for timeouts.
const EXPIRE_EVERY: Duration = Duration::from_millis(200);

/// `ebpf.dns:` in the configuration.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Match DNS queries (UDP and TCP port 53) with their responses.
    pub enabled: bool,
    /// Queries awaiting their response at once (about 250 bytes each in the
    /// kernel). Queries past it are counted (`flowtel.ebpf.dns.errors`,
    /// reason `map_full`) and not reported.
    pub max_requests: u32,
    /// A query with no response after this long is reported as a timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_requests: 4096,
            timeout: Duration::from_secs(5),
        }
    }
}

impl DnsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_requests == 0 {
            return Err(ConfigError::new("max_requests", "must be at least 1"));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::new("timeout", "must be longer than 0s"));
        }
        Ok(())
    }
}

/// `struct dns_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsKey {
    pub client: [u8; 16],
    pub cport: u16,
    pub id: u16,
    pub proto: u8,
    pub family: u8,
    pub pad: u16,
}

// SAFETY: integers only, `repr(C)`, no implicit padding (24 bytes).
unsafe impl aya::Pod for DnsKey {}

/// `struct dns_req`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsRequest {
    pub start_ns: u64,
    pub server: [u8; 16],
    pub sport: u16,
    pub flags: u16,
    pub qlen: u16,
    pub pad: u16,
    pub q: [u8; QBYTES],
}

// SAFETY: integers only, `repr(C)`, no implicit padding (160 bytes).
unsafe impl aya::Pod for DnsRequest {}

/// `struct dns_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsEvent {
    pub key: DnsKey,
    pub req: DnsRequest,
    pub latency_ns: u64,
    pub rflags: u16,
    pub ancount: u16,
    pub pad: u32,
}

/// `dns_stats` slots (`FT_DNS_*` in bpf/dns.h).
const STAT_MAP_FULL: usize = 0;
const STAT_PARSE_ERROR: usize = 1;
const STAT_RING_FULL: usize = 2;
const STAT_UNMATCHED: usize = 3;
const STATS: usize = 4;

/// DNS self-telemetry, cumulative.
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Queries not tracked because `dns_reqs` was full.
    pub map_full: AtomicU64,
    /// Answered queries lost because the ring to userspace was full (they
    /// are reported as timeouts).
    pub ring_full: AtomicU64,
    /// Malformed DNS messages: short headers, question counts other than 1,
    /// bad TCP length prefixes, names with compression pointers or running
    /// past the message.
    pub parse_errors: AtomicU64,
    /// The program's share of `parse_errors` (headers), kept apart because
    /// it is read as a running total.
    pub kernel_parse_errors: AtomicU64,
    /// Names longer than the copied question, reported truncated.
    pub names_truncated: AtomicU64,
    /// Responses whose query was not held (sent before flowtel started,
    /// already expired, or the second sighting of a response on a later
    /// hook).
    pub unmatched: AtomicU64,
}

impl DnsStats {
    /// Reports `flowtel.ebpf.dns.errors` by reason.
    pub fn register(self: &Arc<Self>, telemetry: &Telemetry) {
        let stats = Arc::clone(self);
        telemetry.register_points(&catalogue::EBPF_DNS_ERRORS, move || {
            let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
            [
                ("map_full", load(&stats.map_full)),
                ("ring_full", load(&stats.ring_full)),
                (
                    "parse_error",
                    load(&stats.parse_errors) + load(&stats.kernel_parse_errors),
                ),
                ("name_truncated", load(&stats.names_truncated)),
                ("unmatched", load(&stats.unmatched)),
            ]
            .into_iter()
            .map(|(reason, v)| (vec![(catalogue::DNS_ERROR, reason)], v))
            .collect()
        });
    }
}

/// The decoded question: name, type, and whether the name was cut short.
#[derive(Debug, PartialEq, Eq)]
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub truncated: bool,
}

/// Why a question could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum QuestionError {
    /// A compression pointer (or a reserved label type): never valid in the
    /// only question of a query, and the way to build loops.
    Pointer,
    /// The name or its type runs past the end of the message.
    Truncated,
    /// A name longer than 255 bytes.
    TooLong,
}

/// Decodes the question's name and type from the `len` bytes the program
/// copied (`full`: the message went on past them).
pub fn decode_question(q: &[u8], full: bool) -> Result<Question, QuestionError> {
    let mut name = String::new();
    let mut pos = 0usize;
    loop {
        let Some(&len) = q.get(pos) else {
            return if full {
                Ok(Question {
                    name,
                    qtype: 0,
                    truncated: true,
                })
            } else {
                Err(QuestionError::Truncated)
            };
        };
        if len & 0xc0 != 0 {
            return Err(QuestionError::Pointer);
        }
        pos += 1;
        if len == 0 {
            break;
        }
        if pos + len as usize > 255 {
            return Err(QuestionError::TooLong);
        }
        if !name.is_empty() {
            name.push('.');
        }
        for i in 0..len as usize {
            let Some(&b) = q.get(pos + i) else {
                return if full {
                    Ok(Question {
                        name,
                        qtype: 0,
                        truncated: true,
                    })
                } else {
                    Err(QuestionError::Truncated)
                };
            };
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(b as char);
            } else {
                name.push_str(&format!("\\{b:03}"));
            }
        }
        pos += len as usize;
    }
    if name.is_empty() {
        name.push('.');
    }
    match q.get(pos..pos + 2) {
        Some(t) => Ok(Question {
            name,
            qtype: u16::from_be_bytes([t[0], t[1]]),
            truncated: false,
        }),
        None if full => Ok(Question {
            name,
            qtype: 0,
            truncated: false,
        }),
        None => Err(QuestionError::Truncated),
    }
}

fn ip(family: u8, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::from([raw[0], raw[1], raw[2], raw[3]])),
        6 => Some(IpAddr::from(*raw)),
        _ => None,
    }
}

/// The running DNS tracker of the flow object.
pub(crate) struct Dns {
    events: RingBuf<MapData>,
    reqs: BpfHashMap<MapData, DnsKey, DnsRequest>,
    kernel: PerCpuArray<MapData, u64>,
    timeout_ns: u64,
    next_expiry: Instant,
    stats: Arc<DnsStats>,
}

impl Dns {
    /// Takes the DNS maps from the loaded flow object and switches tracking
    /// on. `Ok(None)` when disabled.
    pub(crate) fn start(
        cfg: &DnsConfig,
        bpf: &mut aya::Ebpf,
        stats: Arc<DnsStats>,
    ) -> anyhow::Result<Option<Dns>> {
        let take = |bpf: &mut aya::Ebpf, name: &str| {
            bpf.take_map(name)
                .ok_or_else(|| anyhow!("map `{name}` is missing from flowtel's eBPF object"))
        };
        if !cfg.enabled {
            return Ok(None);
        }
        let mut on: aya::maps::Array<MapData, u32> = take(bpf, "dns_on")?
            .try_into()
            .map_err(|e| anyhow!("map dns_on: {e}"))?;
        let dns = Dns {
            events: RingBuf::try_from(take(bpf, "dns_events")?)
                .map_err(|e| anyhow!("map dns_events: {e}"))?,
            reqs: take(bpf, "dns_reqs")?
                .try_into()
                .map_err(|e| anyhow!("map dns_reqs: {e}"))?,
            kernel: take(bpf, "dns_stats")?
                .try_into()
                .map_err(|e| anyhow!("map dns_stats: {e}"))?,
            timeout_ns: cfg.timeout.as_nanos() as u64,
            next_expiry: Instant::now(),
            stats,
        };
        on.set(0, 1, 0)
            .map_err(|e| anyhow!("switching DNS tracking on: {e}"))?;
        Ok(Some(dns))
    }

    /// Reports the answered queries waiting in the ring, and now and then
    /// the ones that timed out.
    pub(crate) fn poll(&mut self, out: &Out) -> Result<(), Halt> {
        let mut batch = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() < std::mem::size_of::<DnsEvent>() {
                self.stats.parse_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // SAFETY: the length was checked; DnsEvent is plain data and
            // read_unaligned copes with the ring's 8-byte alignment.
            batch.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DnsEvent>()) });
        }
        for ev in &batch {
            let outcome = DnsOutcome::Answered {
                rcode: (ev.rflags & 0x0f) as u8,
                latency: Duration::from_nanos(ev.latency_ns),
            };
            if let Some(record) = self.record(&ev.key, &ev.req, outcome) {
                out.send(SourceEvent::Dns(record))?;
            }
        }
        if Instant::now() >= self.next_expiry {
            self.next_expiry = Instant::now() + EXPIRE_EVERY;
            self.read_kernel_stats();
            for record in self.expire() {
                out.send(SourceEvent::Dns(record))?;
            }
        }
        Ok(())
    }

    /// Removes the queries older than the timeout; the ones whose delete
    /// succeeded (the program did not match them meanwhile) are timeouts.
    fn expire(&mut self) -> Vec<DnsRecord> {
        let now = super::monotonic_ns();
        let old: Vec<(DnsKey, DnsRequest)> = self
            .reqs
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| now.saturating_sub(r.start_ns) >= self.timeout_ns)
            .collect();
        let mut records = Vec::new();
        for (key, req) in old {
            if self.reqs.remove(&key).is_ok() {
                if let Some(r) = self.record(&key, &req, DnsOutcome::Timeout) {
                    records.push(r);
                }
            }
        }
        records
    }

    fn record(&self, key: &DnsKey, req: &DnsRequest, outcome: DnsOutcome) -> Option<DnsRecord> {
        let bump = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
            None
        };
        let (Some(client), Some(server)) =
            (ip(key.family, &key.client), ip(key.family, &req.server))
        else {
            return bump(&self.stats.parse_errors);
        };
        let len = (req.qlen as usize).min(QBYTES);
        let question = match decode_question(&req.q[..len], len == QBYTES) {
            Ok(q) => q,
            Err(_) => return bump(&self.stats.parse_errors),
        };
        if question.truncated {
            self.stats.names_truncated.fetch_add(1, Ordering::Relaxed);
        }
        Some(DnsRecord {
            client: Endpoint::new(client, key.cport),
            server: Endpoint::new(server, req.sport),
            transport: Transport::from_protocol(key.proto),
            id: key.id,
            opcode: ((req.flags >> 11) & 0x0f) as u8,
            qtype: question.qtype,
            name: question.name.into(),
            name_truncated: question.truncated,
            outcome,
        })
    }

    /// Copies the program's counters (summed over CPUs) into the stats.
    fn read_kernel_stats(&self) {
        let mut sums = [0u64; STATS];
        for (slot, sum) in sums.iter_mut().enumerate() {
            if let Ok(values) = self.kernel.get(&(slot as u32), 0) {
                *sum = values.iter().fold(0u64, |a, v| a.saturating_add(*v));
            }
        }
        self.stats
            .map_full
            .store(sums[STAT_MAP_FULL], Ordering::Relaxed);
        self.stats
            .ring_full
            .store(sums[STAT_RING_FULL], Ordering::Relaxed);
        self.stats
            .unmatched
            .store(sums[STAT_UNMATCHED], Ordering::Relaxed);
        self.stats
            .kernel_parse_errors
            .store(sums[STAT_PARSE_ERROR], Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn questions_decode() {
        let q = decode_question(&wire("www.example.org", 28), false).expect("valid");
        assert_eq!(
            q,
            Question {
                name: "www.example.org".into(),
                qtype: 28,
                truncated: false
            }
        );
        assert_eq!(
            decode_question(&wire(".", 2), false).expect("root").name,
            "."
        );
        let odd = decode_question(&[3, b'a', b'.', 0xff, 0, 0, 1], false).expect("escaped");
        assert_eq!(odd.name, "a\\046\\255");
    }

    #[test]
    fn malformed_questions_are_errors() {
        // A pointer to itself: a compression loop.
        assert_eq!(
            decode_question(&[0xc0, 0x0c, 0, 1], false),
            Err(QuestionError::Pointer)
        );
        assert_eq!(
            decode_question(&[3, b'w', b'w', b'w', 0xc0, 0x0c], false),
            Err(QuestionError::Pointer)
        );
        // A label running past the message, and a missing type.
        assert_eq!(
            decode_question(&[9, b'a', b'b'], false),
            Err(QuestionError::Truncated)
        );
        assert_eq!(
            decode_question(&[1, b'a', 0, 0], false),
            Err(QuestionError::Truncated)
        );
        assert_eq!(decode_question(&[], false), Err(QuestionError::Truncated));
    }

    #[test]
    fn long_names_are_truncated_not_errors() {
        let long = format!("{}.example", "a".repeat(63) + "." + &"b".repeat(63));
        let q = wire(&long, 1);
        let cut = decode_question(&q[..QBYTES], true).expect("truncated");
        assert!(cut.truncated);
        assert_eq!(cut.qtype, 0);
        assert!(long.starts_with(&cut.name));
        let mut too_long = Vec::new();
        for _ in 0..5 {
            too_long.push(63);
            too_long.extend_from_slice(&[b'x'; 63]);
        }
        assert_eq!(
            decode_question(&too_long, false),
            Err(QuestionError::TooLong)
        );
    }

    #[test]
    #[cfg(not(flowtel_no_ebpf))]
    fn layouts_match_the_compiled_objects() {
        use crate::source::ebpf::btf::assert_mirrors;
        for object in [super::super::OBJECT, super::super::OBJECT_PREALLOC] {
            #[rustfmt::skip]
            assert_mirrors!(object, "dns_key", DnsKey, [client, cport, id, proto, family, pad]);
            #[rustfmt::skip]
            assert_mirrors!(object, "dns_req", DnsRequest, [start_ns, server, sport, flags, qlen,
                pad, q]);
            #[rustfmt::skip]
            assert_mirrors!(object, "dns_event", DnsEvent, [key, req, latency_ns, rflags,
                ancount, pad]);
        }
    }
}
