//! Detectors that compare an interval's bytes with a learned baseline: a
//! pair's traffic spike or drop, a workload's exfiltration to networks
//! outside the cluster.
//!
//! The baseline is an exponentially weighted mean and variance of the
//! bytes per interval (weight [`ALPHA`]), with an envelope: the highest and
//! lowest normal intervals, each drifting back towards the mean by
//! [`ENVELOPE_DRIFT`] per interval. A spike must pass [`ENVELOPE`] × the
//! highest, a drop fall below the lowest ÷ [`ENVELOPE`] (so a pair that
//! has had idle intervals never drops): request-driven pairs, whose
//! volume varies with their request count, then stay quiet. An anomalous
//! interval enters the mean clipped to the limit it crossed and leaves the
//! envelope alone, so a burst barely moves the baseline while a lasting
//! change of level is learned within tens of intervals.

use std::collections::HashMap;

use foldhash::fast::RandomState;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{AnomalyConfig, AnomalyKind, Finding, Party, State};
use crate::flow::mesh::Value;
use crate::flow::names::EndName;
use crate::telemetry::{catalogue, Counter};

/// The weight of the newest interval in the baseline (about the last 20
/// intervals count).
pub const ALPHA: f64 = 0.05;

/// How far outside the envelope of normal intervals an anomaly must be.
pub const ENVELOPE: f64 = 4.0;

/// The share of its distance to the mean the envelope drifts back per
/// interval (a time constant of 100 intervals).
pub const ENVELOPE_DRIFT: f64 = 0.01;

/// Samples a baseline needs besides `learning` before it can alarm.
const MIN_SAMPLES: u32 = 5;

/// An exponentially weighted mean and variance of a figure per interval.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Ewma {
    mean: f64,
    var: f64,
    /// The highest and lowest normal intervals, drifting to the mean.
    peak: f64,
    trough: f64,
    samples: u32,
}

impl Ewma {
    /// Learns `x`; `normal` intervals also move the envelope.
    fn update(&mut self, x: f64, normal: bool) {
        if self.samples == 0 {
            self.mean = x;
            self.peak = x;
            self.trough = x;
        } else {
            let d = x - self.mean;
            self.mean += ALPHA * d;
            self.var = (1.0 - ALPHA) * (self.var + ALPHA * d * d);
            if normal {
                self.peak = x.max(self.peak - ENVELOPE_DRIFT * (self.peak - self.mean));
                self.trough = x.min(self.trough + ENVELOPE_DRIFT * (self.mean - self.trough));
            }
        }
        self.samples = self.samples.saturating_add(1);
    }

    fn stddev(&self) -> f64 {
        self.var.sqrt()
    }
}

/// One anomaly of a key from its first anomalous interval to a window
/// without one.
#[derive(Debug, Clone, Copy)]
struct Episode {
    last_anomalous: Instant,
    /// Bytes of every interval since it started.
    total: u64,
    /// The most extreme interval so far (bytes; for a drop, unused).
    peak: u64,
    /// A spike (else a drop).
    above: bool,
}

/// The state of one key.
#[derive(Debug)]
struct Baseline {
    ewma: Ewma,
    first: Instant,
    /// Bytes so far in this interval.
    bytes: u64,
    episode: Option<Episode>,
    names: Option<Arc<EndName>>,
}

/// Which way an interval left the band.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Deviation {
    Above(f64),
    Below(f64),
}

/// Keys with a baseline of bytes per interval.
#[derive(Debug)]
struct Baselines<K> {
    keys: HashMap<K, Baseline, RandomState>,
}

impl<K: std::hash::Hash + Eq + Clone> Baselines<K> {
    /// Adds `bytes` to `key`'s interval; false when the key is new and
    /// `max` keys are held.
    fn add(
        &mut self,
        key: &K,
        bytes: u64,
        names: Option<&Arc<EndName>>,
        max: usize,
        now: Instant,
    ) -> bool {
        if let Some(b) = self.keys.get_mut(key) {
            b.bytes = b.bytes.saturating_add(bytes);
            return true;
        }
        if self.keys.len() >= max {
            return false;
        }
        self.keys.insert(
            key.clone(),
            Baseline {
                ewma: Ewma::default(),
                first: now,
                bytes,
                episode: None,
                names: names.cloned(),
            },
        );
        true
    }
}

/// Thresholds of one detector.
#[derive(Debug, Clone, Copy)]
struct Band {
    spike: f64,
    drop: f64,
    sigma: f64,
    min_bytes: f64,
    learning: Duration,
    window: Duration,
}

impl Band {
    /// The bytes above which an interval is a spike, below which a drop,
    /// and whether `b` has learned enough to judge.
    fn limits(&self, b: &Baseline, now: Instant) -> Option<(f64, f64)> {
        let learned = now.duration_since(b.first) >= self.learning;
        if !learned || b.ewma.samples < MIN_SAMPLES {
            return None;
        }
        let (m, sd) = (b.ewma.mean, b.ewma.stddev());
        let high = (m * self.spike)
            .max(m + self.sigma * sd)
            .max(b.ewma.peak * ENVELOPE)
            .max(self.min_bytes);
        let low = (m / self.drop)
            .min(m - self.sigma * sd)
            .min(b.ewma.trough / ENVELOPE);
        Some((high, low))
    }

    fn judge(&self, b: &Baseline, now: Instant) -> Option<Deviation> {
        let (high, low) = self.limits(b, now)?;
        let x = b.bytes as f64;
        if self.spike > 0.0 && x >= high {
            return Some(Deviation::Above(high));
        }
        if self.drop > 0.0 && b.ewma.mean >= self.min_bytes && x < low {
            return Some(Deviation::Below(low));
        }
        None
    }

    /// Closes the interval of every key: judges it, learns it (clipped
    /// when anomalous), and says what changed. `idle` keys (no bytes, a
    /// mean below it, no anomaly) are forgotten.
    fn finish<K: Clone + std::hash::Hash + Eq>(
        &self,
        keys: &mut Baselines<K>,
        idle: f64,
        now: Instant,
        mut report: impl FnMut(&K, &Baseline, State, Option<Deviation>),
    ) {
        keys.keys.retain(|k, b| {
            let deviation = self.judge(b, now);
            let x = b.bytes;
            let learned = match deviation {
                Some(Deviation::Above(high)) => high,
                Some(Deviation::Below(low)) => low.max(0.0),
                None => x as f64,
            };
            let mut keep = true;
            match (&mut b.episode, deviation) {
                (None, Some(d)) => {
                    b.episode = Some(Episode {
                        last_anomalous: now,
                        total: x,
                        peak: x,
                        above: matches!(d, Deviation::Above(_)),
                    });
                    report(k, b, State::Started, Some(d));
                }
                (Some(e), Some(d)) => {
                    e.last_anomalous = now;
                    e.total = e.total.saturating_add(x);
                    if e.above && matches!(d, Deviation::Above(_)) && x > e.peak {
                        e.peak = x;
                        report(k, b, State::Ongoing, Some(d));
                    }
                }
                (Some(e), None) => {
                    e.total = e.total.saturating_add(x);
                    if now.duration_since(e.last_anomalous) >= self.window {
                        report(k, b, State::Ended, None);
                        b.episode = None;
                    }
                }
                (None, None) => keep = x > 0 || b.ewma.mean >= idle,
            }
            b.ewma.update(learned, deviation.is_none());
            b.bytes = 0;
            keep
        });
    }
}

fn figures(b: &Baseline, d: Option<Deviation>) -> Vec<(&'static str, Value)> {
    let int = |v: f64| Value::Int(v.round().clamp(0.0, i64::MAX as f64) as i64);
    let mut out = vec![
        (catalogue::ANOMALY_VALUE, int(b.bytes as f64)),
        (catalogue::ANOMALY_BASELINE, int(b.ewma.mean)),
        (catalogue::ANOMALY_STDDEV, int(b.ewma.stddev())),
    ];
    if let Some(Deviation::Above(t) | Deviation::Below(t)) = d {
        out.push((catalogue::ANOMALY_LIMIT, int(t)));
    }
    out
}

/// Traffic spikes and drops per pair, exfiltration per workload.
#[derive(Debug)]
pub(super) struct Volumes {
    pairs: Baselines<(Party, Party)>,
    egress: Baselines<Party>,
    traffic: Band,
    exfil: Band,
    exfil_on: bool,
    /// When the detector started: a workload not yet seen sending out has
    /// a baseline of nothing once this is `learning` old.
    start: Instant,
    max: usize,
    untracked: Counter,
}

impl Volumes {
    pub(super) fn new(cfg: &AnomalyConfig, untracked: Counter, now: Instant) -> Self {
        let traffic = Band {
            spike: cfg.spike_factor,
            drop: cfg.drop_factor,
            sigma: cfg.traffic_sigma,
            min_bytes: cfg.traffic_min_bytes as f64,
            learning: cfg.learning,
            window: cfg.window,
        };
        Self {
            pairs: Baselines {
                keys: HashMap::default(),
            },
            egress: Baselines {
                keys: HashMap::default(),
            },
            traffic,
            exfil: Band {
                drop: 0.0,
                min_bytes: cfg.exfil_min_bytes as f64,
                ..traffic
            },
            exfil_on: cfg.exfil_min_bytes > 0,
            start: now,
            max: cfg.max_tracked,
            untracked,
        }
    }

    pub(super) fn traffic_on(&self) -> bool {
        self.traffic.spike > 0.0 || self.traffic.drop > 0.0
    }

    pub(super) fn exfil_on(&self) -> bool {
        self.exfil_on
    }

    /// Bytes both ways between a pair this interval.
    pub(super) fn pair(
        &mut self,
        key: &(Party, Party),
        bytes: u64,
        names: Option<&Arc<EndName>>,
        now: Instant,
    ) {
        if !self.pairs.add(key, bytes, names, self.max, now) {
            self.untracked.inc();
        }
    }

    /// Bytes a workload sent to a network outside the cluster.
    pub(super) fn egress(
        &mut self,
        party: &Party,
        bytes: u64,
        names: Option<&Arc<EndName>>,
        now: Instant,
    ) {
        if !self.egress.keys.contains_key(party) && self.egress.keys.len() >= self.max {
            self.untracked.inc();
            return;
        }
        // A workload seen first once the detector has learned: its
        // baseline is nothing sent out, already learned.
        let learned_at = if now.duration_since(self.start) >= self.exfil.learning {
            now.checked_sub(self.exfil.learning).unwrap_or(self.start)
        } else {
            now
        };
        self.egress.add(party, bytes, names, self.max, learned_at);
        if let Some(b) = self.egress.keys.get_mut(party) {
            if b.ewma.samples == 0 && learned_at < now {
                b.ewma.samples = MIN_SAMPLES;
            }
        }
    }

    pub(super) fn finish(&mut self, now: Instant, out: &mut Vec<Finding>) {
        let window = self.traffic.window.as_secs();
        let idle = self.traffic.min_bytes / 16.0;
        self.traffic
            .finish(&mut self.pairs, idle, now, |(client, peer), b, state, d| {
                let kind = if b.episode.is_some_and(|e| e.above) {
                    AnomalyKind::TrafficSpike
                } else {
                    AnomalyKind::TrafficDrop
                };
                let total = b.episode.map_or(b.bytes, |e| e.total);
                let body = match state {
                    State::Ended => format!(
                        "{}: {client} ↔ {peer} back within its band for {window} s ({total} bytes during it)",
                        kind.as_str()
                    ),
                    _ => format!(
                        "{}: {client} ↔ {peer} exchanged {} bytes in an interval against a baseline of {:.0} ± {:.0}",
                        kind.as_str(),
                        b.bytes,
                        b.ewma.mean,
                        b.ewma.stddev()
                    ),
                };
                out.push(Finding {
                    kind,
                    state,
                    count: total,
                    threshold: self.traffic.min_bytes as u64,
                    client: client.clone(),
                    client_names: b.names.clone(),
                    peer: Some(peer.clone()),
                    body,
                    attributes: figures(b, d),
                });
            });
        let idle = self.exfil.min_bytes / 1000.0;
        self.exfil.finish(&mut self.egress, idle, now, |client, b, state, d| {
            let total = b.episode.map_or(b.bytes, |e| e.total);
            let body = match state {
                State::Ended => format!(
                    "exfiltration: {client} back within its baseline for {window} s ({total} bytes sent out during it)"
                ),
                _ => format!(
                    "exfiltration: {client} sent {} bytes out of the cluster in an interval against a baseline of {:.0} ± {:.0}",
                    b.bytes,
                    b.ewma.mean,
                    b.ewma.stddev()
                ),
            };
            out.push(Finding {
                kind: AnomalyKind::Exfiltration,
                state,
                count: total,
                threshold: self.exfil.min_bytes as u64,
                client: client.clone(),
                client_names: b.names.clone(),
                peer: None,
                body,
                attributes: figures(b, d),
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn band() -> Band {
        Band {
            spike: 5.0,
            drop: 5.0,
            sigma: 4.0,
            min_bytes: 1000.0,
            learning: Duration::from_secs(10),
            window: Duration::from_secs(3),
        }
    }

    /// Runs `series` (bytes per 1 s interval) through one pair; returns
    /// the (interval, state, spike?) of each report.
    fn run(series: &[u64]) -> Vec<(usize, State, bool)> {
        let band = band();
        let mut keys: Baselines<u8> = Baselines {
            keys: HashMap::default(),
        };
        let t0 = Instant::now();
        let mut out = Vec::new();
        for (i, x) in series.iter().enumerate() {
            let now = t0 + Duration::from_secs(i as u64);
            keys.add(&0, *x, None, 4, now);
            band.finish(&mut keys, 10.0, now, |_, b, s, _| {
                out.push((i, s, b.episode.is_some_and(|e| e.above)));
            });
        }
        out
    }

    #[test]
    fn a_burst_after_learning_starts_once_and_ends_after_a_window() {
        let mut s = vec![10_000u64; 20];
        s.extend([200_000, 200_000, 250_000]);
        s.extend([10_000; 6]);
        assert_eq!(
            run(&s),
            vec![
                (20, State::Started, true),
                (22, State::Ongoing, true),
                (25, State::Ended, true)
            ]
        );
    }

    #[test]
    fn nothing_during_learning_and_idle_pairs_never_alarm() {
        let mut s = vec![10_000u64; 5];
        s.push(500_000);
        assert!(run(&s).is_empty());
        // Below min_bytes both ways.
        let mut s = vec![100u64; 20];
        s.extend([900, 0, 0, 0]);
        assert!(run(&s).is_empty());
    }

    #[test]
    fn a_pair_that_goes_silent_is_a_drop() {
        let mut s = vec![10_000u64; 20];
        s.extend([0; 2]);
        assert_eq!(run(&s), vec![(20, State::Started, false)]);
    }
}
