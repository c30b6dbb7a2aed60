//! The sending end every source thread uses to reach the flow table.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;

use crate::flow::SourceEvent;

/// The sending side shared by the threads: never blocks past a stop request,
/// even if the consumer stopped reading.
#[derive(Clone)]
pub(crate) struct Out {
    pub(crate) tx: tokio::sync::mpsc::Sender<SourceEvent>,
    pub(crate) stop: Arc<AtomicBool>,
}

/// The consumer is gone or a stop was requested.
#[derive(Debug)]
pub(crate) struct Halt;

impl Out {
    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sends like `blocking_send`, but waits for room in short sleeps so a
    /// stop request is noticed even when the channel stays full.
    pub(crate) fn send(&self, event: SourceEvent) -> Result<(), Halt> {
        let mut event = match self.tx.try_send(event) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(Halt),
            Err(TrySendError::Full(event)) => event,
        };
        let mut wait = Duration::from_micros(20);
        loop {
            if self.stopping() {
                return Err(Halt);
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(5));
            event = match self.tx.try_send(event) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(_)) => return Err(Halt),
                Err(TrySendError::Full(event)) => event,
            };
        }
    }
}
