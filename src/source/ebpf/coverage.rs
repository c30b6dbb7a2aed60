//! The coverage self-check: the L3 bytes each attached interface's own
//! counters say crossed it, next to the bytes flowtel counted there.
//!
//! Another program on the same hook that drops or redirects packets before
//! flowtel (Cilium's, a firewall's) makes flowtel undercount without any
//! error. The interface counters are independent of every TC program:
//! veth and NIC drivers count `rx` before TC ingress runs, and `tx` as they
//! send. Their L3 bytes are `bytes - L2 header × packets` (the counters
//! count skbs with their full length, as flowtel's `skb->len - L2` does).
//! The ratio of the two, summed over the attached interfaces per hook, is
//! flowtel's coverage; `FlowtelUndercounting` fires when it drops.
//!
//! Traffic that is not IP (ARP, LLDP) is in the interface counters only,
//! so coverage reads a little below 1 on a quiet link.

use std::collections::HashMap;
use std::io;

use super::maps::{DIR_EGRESS, DIR_INGRESS};

/// One interface's counters, as `/proc/net/dev` gives them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Parses `/proc/net/dev`: interface name to its counters. Lines that do
/// not parse are skipped (the two header lines among them).
pub fn parse_net_dev(text: &str) -> HashMap<String, IfCounters> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map_while(|f| f.parse().ok())
            .collect();
        if fields.len() < 10 {
            continue;
        }
        out.insert(
            name.trim().to_string(),
            IfCounters {
                rx_bytes: fields[0],
                rx_packets: fields[1],
                tx_bytes: fields[8],
                tx_packets: fields[9],
            },
        );
    }
    out
}

/// The interface counters of the calling thread's network namespace (the
/// source thread has entered `ebpf.netns`; `/proc/self` would show the
/// process's).
fn read_net_dev() -> io::Result<HashMap<String, IfCounters>> {
    Ok(parse_net_dev(&std::fs::read_to_string(
        "/proc/thread-self/net/dev",
    )?))
}

/// The kernel's L3 bytes per (ifindex, hook) since the previous sample.
#[derive(Debug, Default)]
pub struct Coverage {
    /// Each interface's counters at the previous sample, by ifindex.
    last: HashMap<u32, (String, IfCounters)>,
}

impl Coverage {
    /// Reads the counters of `interfaces` ((ifindex, name, L2 length)) and
    /// returns the L3 bytes since the previous sample per (ifindex, hook).
    /// An interface seen for the first time (or renamed) only sets its
    /// baseline. Errors leave the baseline alone.
    pub fn sample<'a>(
        &mut self,
        interfaces: impl Iterator<Item = (u32, &'a str, u64)>,
    ) -> io::Result<HashMap<(u32, u8), u64>> {
        let now = read_net_dev()?;
        Ok(self.advance(interfaces, &now))
    }

    fn advance<'a>(
        &mut self,
        interfaces: impl Iterator<Item = (u32, &'a str, u64)>,
        now: &HashMap<String, IfCounters>,
    ) -> HashMap<(u32, u8), u64> {
        let mut deltas = HashMap::new();
        let mut next = HashMap::new();
        for (idx, name, l2) in interfaces {
            let Some(c) = now.get(name) else { continue };
            if let Some((last_name, last)) = self.last.get(&idx) {
                if last_name == name {
                    let l3 = |bytes: u64, last_bytes: u64, packets: u64, last_packets: u64| {
                        bytes
                            .saturating_sub(last_bytes)
                            .saturating_sub(l2 * packets.saturating_sub(last_packets))
                    };
                    deltas.insert(
                        (idx, DIR_INGRESS),
                        l3(c.rx_bytes, last.rx_bytes, c.rx_packets, last.rx_packets),
                    );
                    deltas.insert(
                        (idx, DIR_EGRESS),
                        l3(c.tx_bytes, last.tx_bytes, c.tx_packets, last.tx_packets),
                    );
                }
            }
            next.insert(idx, (name.to_string(), *c));
        }
        self.last = next;
        deltas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_DEV: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
veth-a:   14140     10    0    0    0     0          0         0     2140      10    0    0    0     0       0          0
";

    #[test]
    fn net_dev_parses() {
        let c = parse_net_dev(NET_DEV);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c["veth-a"],
            IfCounters {
                rx_bytes: 14140,
                rx_packets: 10,
                tx_bytes: 2140,
                tx_packets: 10
            }
        );
        assert!(parse_net_dev("garbage\nx: 1 2\n").is_empty());
    }

    #[test]
    fn deltas_are_l3_bytes_after_a_baseline() {
        let mut cov = Coverage::default();
        let first = parse_net_dev(NET_DEV);
        let ifs = || [(7u32, "veth-a", 14u64)].into_iter();
        assert!(cov.advance(ifs(), &first).is_empty(), "a baseline only");
        let mut later = first.clone();
        later.insert(
            "veth-a".into(),
            IfCounters {
                rx_bytes: 14140 + 10_140,
                rx_packets: 20,
                tx_bytes: 2140 + 1_140,
                tx_packets: 20,
            },
        );
        let d = cov.advance(ifs(), &later);
        assert_eq!(d[&(7, DIR_INGRESS)], 10_000);
        assert_eq!(d[&(7, DIR_EGRESS)], 1_000);
        // Renamed (or a new device under the old index): a new baseline.
        assert!(cov
            .advance([(7u32, "veth-b", 14u64)].into_iter(), &later)
            .is_empty());
    }
}
