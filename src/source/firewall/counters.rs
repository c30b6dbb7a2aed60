//! Rule counters → exact deltas → cumulative series.
//!
//! A rule is followed by its identity: the nftables handle, or for legacy
//! xtables (no handles) its chain, text and order among identical rules.
//! A counter that went down was reset (the rule reloaded): the delta is
//! the new value. A rule with a new identity that replaces a vanished one
//! with the same signature in the same chain (a ruleset reload) continues
//! it when its counter is at least the old one (counters restored, as
//! `nft -f` of a saved ruleset or `iptables-restore -c` do), and is counted
//! from zero otherwise. So no delta is negative, and a restored counter is
//! not counted twice. What cannot be told apart: a counter reset and then
//! pushed past its old value within one interval looks like growth.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use super::names::{self, RuleNames};
use super::rules::{Backend, Rule, Verdict};
use crate::flow::mesh::{LogEvent, Severity, Value};
use crate::telemetry::catalogue;

/// How a rule is followed from one read to the next.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Identity {
    Handle {
        family: &'static str,
        table: String,
        handle: u64,
    },
    Spec {
        backend: Backend,
        family: &'static str,
        table: String,
        chain: String,
        signature: u64,
        occurrence: u32,
    },
}

/// Where a rule's counts go: the rule's labels.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy)]
struct Previous {
    packets: u64,
    bytes: u64,
    signature: u64,
}

#[derive(Debug)]
struct Series {
    packets: u64,
    bytes: u64,
    seen: Instant,
}

/// A rule's counts of one read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub packets: u64,
    pub bytes: u64,
    /// The counter had been reset (or the rule reloaded without its counts).
    pub reset: bool,
}

/// Cumulative totals per series, bounded by a budget.
#[derive(Debug)]
pub struct Totals {
    series: HashMap<Labels, Series>,
    /// What did not fit the budget: (packets, bytes).
    pub overflow: (u64, u64),
    /// Rule readings folded into the overflow series.
    pub folded: u64,
    max: usize,
    idle: Duration,
}

impl Totals {
    pub fn new(max: usize, idle: Duration) -> Self {
        Self {
            series: HashMap::new(),
            overflow: (0, 0),
            folded: 0,
            max,
            idle,
        }
    }

    /// Adds to the series `labels` (which the rule's presence keeps alive);
    /// a series is only made for counts above zero, and only within the
    /// budget.
    fn add(&mut self, labels: Labels, packets: u64, bytes: u64, now: Instant) {
        if let Some(s) = self.series.get_mut(&labels) {
            s.packets += packets;
            s.bytes += bytes;
            s.seen = now;
        } else if packets > 0 || bytes > 0 {
            if self.series.len() < self.max {
                self.series.insert(
                    labels,
                    Series {
                        packets,
                        bytes,
                        seen: now,
                    },
                );
            } else {
                self.overflow.0 += packets;
                self.overflow.1 += bytes;
                self.folded += 1;
            }
        }
    }

    /// Forgets series no rule has had for the idle time.
    fn expire(&mut self, now: Instant) {
        let idle = self.idle;
        self.series
            .retain(|_, s| now.saturating_duration_since(s.seen) < idle);
    }

    /// (labels, packets, bytes) of every series, sorted by labels.
    pub fn points(&self) -> Vec<(&Labels, u64, u64)> {
        let mut out: Vec<_> = self
            .series
            .iter()
            .map(|(l, s)| (l, s.packets, s.bytes))
            .collect();
        out.sort_by(|a, b| a.0.cmp(b.0));
        out
    }

    pub fn series(&self) -> usize {
        self.series.len()
    }
}

/// The firewall's counts, read after read.
#[derive(Debug)]
pub struct Tracker {
    previous: HashMap<Identity, Previous>,
    /// Per rule.
    pub rules: Totals,
    /// Per drop or reject rule's policy or Service: "which policy dropped
    /// how much".
    pub drops: Totals,
    /// Counter resets and reloads seen, per back end.
    pub resets: HashMap<Backend, u64>,
}

/// What one read changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Drop and reject rules whose counters moved, with their deltas.
    pub drops: Vec<LogEvent>,
    /// Rules with counters read, per back end and family.
    pub rules: HashMap<(Backend, &'static str), u64>,
}

impl Tracker {
    pub fn new(max_series: usize, idle: Duration) -> Self {
        Self {
            previous: HashMap::new(),
            rules: Totals::new(max_series, idle),
            drops: Totals::new(max_series, idle),
            resets: HashMap::new(),
        }
    }

    /// Applies one read of `backends` (the rules of those back ends that
    /// were read; the others keep their previous state).
    pub fn apply(&mut self, backends: &[Backend], rules: &[Rule], now: Instant) -> Changes {
        let mut changes = Changes::default();
        let mut current: HashMap<Identity, Previous> = HashMap::with_capacity(rules.len());
        let mut fresh = Vec::new();
        let mut deltas: Vec<(usize, Delta)> = Vec::with_capacity(rules.len());
        let mut occurrences: HashMap<(Backend, &str, &str, &str, u64), u32> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            let Some((packets, bytes)) = r.counters else {
                continue;
            };
            *changes.rules.entry((r.backend, r.family)).or_insert(0) += 1;
            let id = match r.handle {
                Some(handle) => Identity::Handle {
                    family: r.family,
                    table: r.table.clone(),
                    handle,
                },
                None => {
                    let n = occurrences
                        .entry((r.backend, r.family, &r.table, &r.chain, r.signature))
                        .or_insert(0);
                    *n += 1;
                    Identity::Spec {
                        backend: r.backend,
                        family: r.family,
                        table: r.table.clone(),
                        chain: r.chain.clone(),
                        signature: r.signature,
                        occurrence: *n,
                    }
                }
            };
            let now_counts = Previous {
                packets,
                bytes,
                signature: r.signature,
            };
            // A handle reused by another rule (its table deleted and made
            // again) is a new rule.
            match self
                .previous
                .get(&id)
                .filter(|p| p.signature == r.signature)
            {
                Some(p) => deltas.push((i, delta(p, packets, bytes))),
                None => fresh.push(i),
            }
            current.insert(id, now_counts);
        }
        // Rules of this read's back ends that are gone, by what they were.
        let mut vanished: HashMap<(Backend, &str, &str, u64), Vec<Previous>> = HashMap::new();
        for (id, p) in &self.previous {
            if current.contains_key(id) {
                continue;
            }
            let key = match id {
                Identity::Handle { family, table, .. } => {
                    (Backend::Nftables, *family, table.as_str(), p.signature)
                }
                Identity::Spec {
                    backend,
                    family,
                    table,
                    signature,
                    ..
                } => (*backend, *family, table.as_str(), *signature),
            };
            if backends.contains(&key.0) {
                vanished.entry(key).or_default().push(*p);
            }
        }
        for i in fresh {
            let r = &rules[i];
            let Some((packets, bytes)) = r.counters else {
                continue;
            };
            let key = (r.backend, r.family, r.table.as_str(), r.signature);
            let d = match vanished.get_mut(&key).and_then(Vec::pop) {
                Some(p) => delta(&p, packets, bytes),
                None => Delta {
                    packets,
                    bytes,
                    reset: false,
                },
            };
            deltas.push((i, d));
        }
        // Keep the other back ends' rules as they were.
        self.previous
            .retain(|id, _| !backends.contains(&identity_backend(id)));
        self.previous.extend(current);

        for (i, d) in deltas {
            let r = &rules[i];
            if d.reset {
                *self.resets.entry(r.backend).or_insert(0) += 1;
            }
            let names = names::name(&r.chain, r.comment.as_deref());
            self.rules
                .add(rule_labels(r, &names), d.packets, d.bytes, now);
            if r.verdict.drops() {
                self.drops
                    .add(drop_labels(r, &names), d.packets, d.bytes, now);
                if d.packets > 0 {
                    changes.drops.push(drop_event(r, &names, &d));
                }
            }
        }
        self.rules.expire(now);
        self.drops.expire(now);
        changes
    }
}

fn identity_backend(id: &Identity) -> Backend {
    match id {
        Identity::Handle { .. } => Backend::Nftables,
        Identity::Spec { backend, .. } => *backend,
    }
}

fn delta(p: &Previous, packets: u64, bytes: u64) -> Delta {
    if packets >= p.packets && bytes >= p.bytes {
        Delta {
            packets: packets - p.packets,
            bytes: bytes - p.bytes,
            reset: false,
        }
    } else {
        Delta {
            packets,
            bytes,
            reset: true,
        }
    }
}

/// A rule's series labels: where it is, what it does, whom it belongs to.
fn rule_labels(r: &Rule, names: &RuleNames) -> Labels {
    let mut l = vec![
        (catalogue::FIREWALL_BACKEND, r.backend.as_str().to_owned()),
        (catalogue::FIREWALL_FAMILY, r.family.to_owned()),
        (catalogue::FIREWALL_TABLE, r.table.clone()),
        (catalogue::FIREWALL_CHAIN, r.chain.clone()),
        (catalogue::FIREWALL_RULE_POSITION, r.position.to_string()),
        (catalogue::FIREWALL_VERDICT, r.verdict.as_str().to_owned()),
    ];
    if let Some(t) = r.verdict.target() {
        l.push((catalogue::FIREWALL_TARGET, t.to_owned()));
    }
    if let Some(c) = &r.comment {
        l.push((catalogue::FIREWALL_RULE_COMMENT, c.clone()));
    }
    l.extend(names.attributes());
    l
}

/// The drop view's labels: the policy or Service, the chain it is in.
fn drop_labels(r: &Rule, names: &RuleNames) -> Labels {
    let mut l = vec![
        (catalogue::FIREWALL_BACKEND, r.backend.as_str().to_owned()),
        (catalogue::FIREWALL_FAMILY, r.family.to_owned()),
        (catalogue::FIREWALL_TABLE, r.table.clone()),
        (catalogue::FIREWALL_CHAIN, r.chain.clone()),
        (catalogue::FIREWALL_VERDICT, r.verdict.as_str().to_owned()),
    ];
    l.extend(names.attributes());
    l
}

fn drop_event(r: &Rule, names: &RuleNames, d: &Delta) -> LogEvent {
    let mut attributes: Vec<(&'static str, Value)> = rule_labels(r, names)
        .into_iter()
        .map(|(k, v)| (k, Value::Str(v)))
        .collect();
    if let Some(h) = r.handle {
        attributes.push((
            catalogue::FIREWALL_RULE_HANDLE,
            Value::Int(i64::try_from(h).unwrap_or(i64::MAX)),
        ));
    }
    attributes.push((
        catalogue::DROP_PACKETS,
        Value::Int(i64::try_from(d.packets).unwrap_or(i64::MAX)),
    ));
    attributes.push((
        catalogue::DROP_BYTES,
        Value::Int(i64::try_from(d.bytes).unwrap_or(i64::MAX)),
    ));
    let who = names
        .policy
        .as_deref()
        .or(names.service.as_deref())
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    LogEvent {
        time: SystemTime::now(),
        severity: Severity::Warn,
        name: catalogue::EVENT_FIREWALL_DROP,
        body: format!(
            "{} {} {} rule {}{who}: {} packets, {} bytes {}",
            r.family,
            r.table,
            r.chain,
            r.position,
            d.packets,
            d.bytes,
            if r.verdict == Verdict::Reject {
                "rejected"
            } else {
                "dropped"
            },
        ),
        attributes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nft(handle: u64, chain: &str, signature: u64, packets: u64, verdict: Verdict) -> Rule {
        Rule {
            backend: Backend::Nftables,
            family: "ip",
            table: "t".into(),
            chain: chain.into(),
            position: 1,
            handle: Some(handle),
            verdict,
            comment: None,
            signature,
            counters: Some((packets, packets * 100)),
        }
    }

    fn total(t: &Tracker, chain: &str) -> u64 {
        t.rules
            .points()
            .iter()
            .filter(|(l, _, _)| {
                l.iter()
                    .any(|(k, v)| *k == catalogue::FIREWALL_CHAIN && v == chain)
            })
            .map(|(_, p, _)| *p)
            .sum()
    }

    #[test]
    fn reload_with_reset_and_with_restored_counters() {
        let mut t = Tracker::new(100, Duration::from_secs(3600));
        let now = Instant::now();
        let b = [Backend::Nftables];
        t.apply(&b, &[nft(1, "a", 7, 10, Verdict::Accept)], now);
        t.apply(&b, &[nft(1, "a", 7, 15, Verdict::Accept)], now);
        assert_eq!(total(&t, "a"), 15);
        // Reloaded (new handle), counter back to 3: counted from zero.
        t.apply(&b, &[nft(9, "a", 7, 3, Verdict::Accept)], now);
        assert_eq!(total(&t, "a"), 18);
        assert_eq!(t.resets.get(&Backend::Nftables), Some(&1));
        // Reloaded with its counter restored (and 2 more): not doubled.
        t.apply(&b, &[nft(12, "a", 7, 5, Verdict::Accept)], now);
        assert_eq!(total(&t, "a"), 20);
        // The same handle's counter reset in place.
        t.apply(&b, &[nft(12, "a", 7, 1, Verdict::Accept)], now);
        assert_eq!(total(&t, "a"), 21);
        assert_eq!(t.resets.get(&Backend::Nftables), Some(&2));
    }

    #[test]
    fn drops_make_events_and_the_budget_folds() {
        let mut t = Tracker::new(1, Duration::from_secs(3600));
        let now = Instant::now();
        let b = [Backend::Nftables];
        let c = t.apply(
            &b,
            &[
                nft(1, "a", 1, 4, Verdict::Drop),
                nft(2, "b", 2, 6, Verdict::Accept),
                nft(3, "c", 3, 0, Verdict::Accept),
            ],
            now,
        );
        assert_eq!(c.drops.len(), 1);
        assert_eq!(t.rules.series(), 1);
        assert_eq!(t.rules.overflow, (6, 600));
        assert_eq!(t.rules.folded, 1);
        assert_eq!(t.drops.points()[0].1, 4);
        // Nothing moved: no event.
        let c = t.apply(
            &b,
            &[
                nft(1, "a", 1, 4, Verdict::Drop),
                nft(2, "b", 2, 6, Verdict::Accept),
            ],
            now,
        );
        assert!(c.drops.is_empty());
        assert_eq!(t.rules.overflow, (6, 600));
    }

    #[test]
    fn other_backends_keep_their_state() {
        let mut t = Tracker::new(100, Duration::from_secs(3600));
        let now = Instant::now();
        let mut x = nft(0, "x", 5, 10, Verdict::Drop);
        x.backend = Backend::Xtables;
        x.handle = None;
        t.apply(&[Backend::Xtables], std::slice::from_ref(&x), now);
        t.apply(
            &[Backend::Nftables],
            &[nft(1, "a", 1, 1, Verdict::Accept)],
            now,
        );
        x.counters = Some((12, 1200));
        t.apply(&[Backend::Xtables], &[x], now);
        assert_eq!(total(&t, "x"), 12);
    }
}
