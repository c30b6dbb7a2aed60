//! TCP health per flow series: connections opened, closed and failed,
//! retransmits, and the RTT and duration samples of each interval, within
//! the same series budget as the flow series.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use foldhash::fast::RandomState;

use super::model::{Nat, SourceKind, TcpClose, TcpEvent, TcpEventKind, TcpFailure};
use super::names::FlowNames;
use super::series::{KeySpec, SeriesKey};
use crate::telemetry::{catalogue, Counter, Telemetry};

/// TCP connection counts of a series, cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub opened: u64,
    pub closed_fin: u64,
    pub closed_reset: u64,
    pub closed_timeout: u64,
    pub failed_refused: u64,
    pub failed_no_answer: u64,
    /// Retransmitted segments.
    pub retransmits: u64,
}

#[derive(Debug)]
struct TcpState {
    cumulative: TcpCounters,
    rtt: Vec<f64>,
    durations: Vec<f64>,
    start: SystemTime,
    last_active: Instant,
}

/// One series' TCP health as exported at the end of an interval.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpPoint {
    pub key: SeriesKey,
    pub cumulative: TcpCounters,
    /// Smoothed RTT samples taken during the interval, in seconds.
    pub rtt: Vec<f64>,
    /// Durations of the connections that closed during the interval, in
    /// seconds.
    pub durations: Vec<f64>,
    pub start: SystemTime,
}

/// RTT and duration samples kept per interval over all series: bounds the
/// memory a burst of short connections can take. Samples past it are
/// counted in `flowtel.tcp.samples.dropped`.
pub const MAX_SAMPLES_PER_INTERVAL: usize = 65_536;

/// The TCP series of the current interval and their cumulative counts.
#[derive(Debug)]
pub struct TcpSeries {
    spec: KeySpec,
    max_series: usize,
    idle_timeout: Duration,
    tcp: HashMap<SeriesKey, TcpState, RandomState>,
    /// Samples kept this interval, over all series.
    samples: usize,
    overflowed: Counter,
    samples_dropped: Counter,
}

impl TcpSeries {
    /// Series share `overflowed` with the flow series: one budget, one count.
    pub fn new(
        spec: KeySpec,
        max_series: usize,
        idle_timeout: Duration,
        overflowed: Counter,
        telemetry: &Telemetry,
    ) -> Self {
        Self {
            spec,
            max_series,
            idle_timeout,
            tcp: HashMap::default(),
            samples: 0,
            overflowed,
            samples_dropped: telemetry.counter(&catalogue::TCP_SAMPLES_DROPPED),
        }
    }

    /// Adds one TCP health observation to its series (the flow series key
    /// of the connection), within the same series budget as flows.
    pub fn record(&mut self, event: &TcpEvent, names: Option<&FlowNames>) {
        let key = self
            .spec
            .key_of(&event.id, &Nat::default(), SourceKind::Ebpf, names);
        let now = Instant::now();
        let key = if self.tcp.contains_key(&key) || self.tcp.len() + 1 < self.max_series {
            key
        } else {
            self.overflowed.inc();
            SeriesKey::overflow(SourceKind::Ebpf)
        };
        let state = self.tcp.entry(key).or_insert_with(|| TcpState {
            cumulative: TcpCounters::default(),
            rtt: Vec::new(),
            durations: Vec::new(),
            start: SystemTime::now(),
            last_active: now,
        });
        state.last_active = now;
        let c = &mut state.cumulative;
        let sample = match event.kind {
            TcpEventKind::Opened => {
                c.opened += 1;
                None
            }
            TcpEventKind::Closed { cause, duration } => {
                match cause {
                    TcpClose::Fin => c.closed_fin += 1,
                    TcpClose::Reset => c.closed_reset += 1,
                    TcpClose::Timeout => c.closed_timeout += 1,
                }
                duration.map(|d| (&mut state.durations, d))
            }
            TcpEventKind::Failed(TcpFailure::Refused) => {
                c.failed_refused += 1;
                None
            }
            TcpEventKind::Failed(TcpFailure::NoAnswer) => {
                c.failed_no_answer += 1;
                None
            }
            TcpEventKind::Retransmits(n) => {
                c.retransmits = c.retransmits.saturating_add(n);
                None
            }
            TcpEventKind::Rtt(rtt) => Some((&mut state.rtt, rtt)),
        };
        if let Some((samples, value)) = sample {
            if self.samples < MAX_SAMPLES_PER_INTERVAL {
                self.samples += 1;
                samples.push(value.as_secs_f64());
            } else {
                self.samples_dropped.inc();
            }
        }
    }

    /// Closes the interval: forgets idle series and hands out every live
    /// one with this interval's samples.
    pub fn finish(&mut self) -> Vec<TcpPoint> {
        let now = Instant::now();
        let idle = self.idle_timeout;
        self.tcp
            .retain(|_, s| now.duration_since(s.last_active) < idle);
        self.samples = 0;
        self.tcp
            .iter_mut()
            .map(|(key, s)| TcpPoint {
                key: key.clone(),
                cumulative: s.cumulative,
                rtt: std::mem::take(&mut s.rtt),
                durations: std::mem::take(&mut s.durations),
                start: s.start,
            })
            .collect()
    }
}
