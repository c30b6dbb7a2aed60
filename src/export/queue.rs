//! One bounded queue and one task per exporter: the flow stage hands each
//! finished interval to every queue without waiting, and each exporter
//! takes everything that waited for it at once when it is free again. An
//! interval that finds a queue full is skipped for that exporter only and
//! counted: its metrics are carried by the next interval (they are
//! cumulative), its records and samples are counted as dropped, so nothing
//! is lost silently.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Carries, Exporter};
use crate::flow::report::IntervalReport;
use crate::flow::spans::SpanKeep;
use crate::telemetry::{catalogue, Counter, Telemetry};

struct Queue {
    name: &'static str,
    tx: mpsc::Sender<Arc<IntervalReport>>,
    task: JoinHandle<()>,
    carries: Carries,
    skipped: Counter,
}

/// The running exporters.
pub struct Exporters {
    queues: Vec<Queue>,
    records_dropped: Counter,
    samples_dropped: Counter,
    spans_dropped: Counter,
}

impl Exporters {
    /// Starts a task per exporter, each with a queue of `size` intervals.
    pub fn start(exporters: Vec<Box<dyn Exporter>>, size: usize, telemetry: &Telemetry) -> Self {
        let queues = exporters
            .into_iter()
            .map(|exporter| {
                let name = exporter.name();
                let carries = exporter.carries();
                let skipped = Counter::default();
                let read = skipped.clone();
                telemetry.register_points(&catalogue::EXPORT_INTERVALS_SKIPPED, move || {
                    vec![(vec![(catalogue::EXPORTER, name)], read.get())]
                });
                let (tx, rx) = mpsc::channel(size.max(1));
                Queue {
                    name,
                    tx,
                    task: tokio::spawn(run(exporter, rx)),
                    carries,
                    skipped,
                }
            })
            .collect();
        Self {
            queues,
            records_dropped: telemetry.counter(&catalogue::LOGS_RECORDS_DROPPED),
            samples_dropped: telemetry.counter(&catalogue::TCP_SAMPLES_DROPPED),
            spans_dropped: telemetry.counter(&catalogue::SPANS_DROPPED),
        }
    }

    /// Log records of each kind the flow stage should keep per interval:
    /// the most any exporter asks for.
    pub fn records(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.carries.records)
            .max()
            .unwrap_or(0)
    }

    /// The connection spans the flow stage should keep: those of the
    /// traces exporter, if there is one.
    pub fn spans(&self) -> Option<SpanKeep> {
        self.queues.iter().find_map(|q| q.carries.spans)
    }

    /// Whether the flow stage should keep answered DNS lookups as records
    /// (an exporter wants every lookup, not only the failed ones).
    pub fn dns_lookups(&self) -> bool {
        self.queues.iter().any(|q| q.carries.dns_lookups)
    }

    /// Queues a finished interval for every exporter, without waiting.
    pub fn deliver(&self, report: Arc<IntervalReport>) {
        for q in &self.queues {
            match q.tx.try_send(Arc::clone(&report)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(report)) => {
                    q.skipped.inc();
                    let records = if q.carries.records > 0 {
                        report.records.len() + report.mesh.events.len()
                    } else {
                        0
                    };
                    self.records_dropped.add(records as u64);
                    if q.carries.spans.is_some() {
                        self.spans_dropped.add(report.spans.len() as u64);
                    }
                    if q.carries.samples {
                        self.samples_dropped.add(report.samples() as u64);
                    }
                    tracing::warn!(
                        exporter = q.name,
                        records,
                        "the exporter is still busy with earlier intervals; this one's records \
                         and samples are dropped for it (its metrics come with the next)"
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::error!(exporter = q.name, "the exporter task has stopped");
                }
            }
        }
    }

    /// Lets every exporter finish what is queued, then shuts them down.
    pub async fn stop(self) {
        let tasks: Vec<_> = self.queues.into_iter().map(|q| (q.name, q.task)).collect();
        for (name, task) in tasks {
            if let Err(e) = task.await {
                tracing::error!(exporter = name, "exporter task failed: {e}");
            }
        }
    }
}

async fn run(mut exporter: Box<dyn Exporter>, mut rx: mpsc::Receiver<Arc<IntervalReport>>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(next) = rx.try_recv() {
            batch.push(next);
        }
        exporter.export(&batch).await;
    }
    exporter.shutdown().await;
}
