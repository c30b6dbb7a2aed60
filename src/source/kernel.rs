//! The kernel source, always on: eBPF TC programs where the kernel allows
//! them, else conntrack (`source: auto`), or the one the configuration
//! names.

use std::sync::Arc;

use anyhow::Context;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::conntrack::{self, ConntrackConfig, ConntrackHandle};
use super::ebpf::{self, EbpfConfig, EbpfHandle};
use super::{Source, SourceContext};
use crate::telemetry::{catalogue, Counter, Gauge, SourceInfo, Telemetry};

/// Which kernel source counts flows (`source:`). `auto` tries eBPF and
/// falls back to conntrack, saying why, where eBPF cannot load (old kernel,
/// no BTF, no CAP_BPF).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceChoice {
    #[default]
    Auto,
    Ebpf,
    Conntrack,
}

/// The kernel source's counters of what it could not read.
#[derive(Debug, Default)]
pub struct KernelStats {
    /// Kernel events lost (netlink ENOBUFS overruns, ring buffer overruns).
    pub events_lost: Counter,
    /// Source messages that could not be decoded and were skipped.
    pub parse_errors: Counter,
    /// Table dumps completed.
    pub dumps: Counter,
    /// Table dumps that failed.
    pub dump_errors: Counter,
    /// 1 when the kernel reports byte and packet counters (conntrack
    /// accounting is on).
    pub byte_counters_available: Gauge,
}

impl KernelStats {
    /// Counters reported to `telemetry`.
    pub fn new(telemetry: &Telemetry) -> Self {
        Self {
            events_lost: telemetry.counter(&catalogue::SOURCE_EVENTS_LOST),
            parse_errors: telemetry.counter(&catalogue::SOURCE_DECODE_ERRORS),
            dumps: telemetry.counter(&catalogue::SOURCE_DUMPS),
            dump_errors: telemetry.counter(&catalogue::SOURCE_DUMPS_FAILED),
            byte_counters_available: telemetry.gauge(&catalogue::SOURCE_BYTE_COUNTERS),
        }
    }
}

/// The running kernel source.
enum Kernel {
    Conntrack(ConntrackHandle),
    Ebpf(EbpfHandle),
}

impl Source for Kernel {
    fn name(&self) -> &'static str {
        match self {
            Self::Conntrack(_) => "conntrack",
            Self::Ebpf(_) => "ebpf",
        }
    }

    fn request(&mut self, epoch: u64) -> bool {
        match self {
            Self::Conntrack(h) => h.request_dump(epoch),
            Self::Ebpf(h) => h.request_dump(epoch),
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let stopped = tokio::task::spawn_blocking(move || match *self {
                Kernel::Conntrack(h) => h.stop(),
                Kernel::Ebpf(h) => h.stop(),
            });
            if let Err(e) = stopped.await {
                tracing::error!("stopping the kernel source failed: {e}");
            }
        })
    }
}

/// Starts the kernel source `choice` names; an error says why none could.
pub fn build(
    choice: SourceChoice,
    ebpf_cfg: &EbpfConfig,
    conntrack_cfg: &ConntrackConfig,
    ctx: &SourceContext,
) -> anyhow::Result<Box<dyn Source>> {
    let stats = Arc::new(KernelStats::new(&ctx.telemetry));
    let tx = ctx.events.clone();
    let start_conntrack = |tx| {
        conntrack::start(conntrack_cfg, stats.clone(), tx)
            .map(Kernel::Conntrack)
            .context("starting the conntrack source")
    };
    let kernel = match choice {
        SourceChoice::Conntrack => start_conntrack(tx)?,
        SourceChoice::Ebpf => ebpf::start(ebpf_cfg, stats.clone(), tx)
            .map(Kernel::Ebpf)
            .context("starting the eBPF source")?,
        SourceChoice::Auto => match ebpf::start(ebpf_cfg, stats.clone(), tx.clone()) {
            Ok(h) => Kernel::Ebpf(h),
            Err(e) => {
                tracing::warn!("eBPF source unavailable, counting with conntrack instead: {e:#}");
                start_conntrack(tx)?
            }
        },
    };
    let mode = match &kernel {
        Kernel::Conntrack(h) => h.mode(),
        Kernel::Ebpf(h) => {
            h.stats().register(&ctx.telemetry);
            h.mode()
        }
    };
    let info = SourceInfo {
        name: kernel.name(),
        mode,
    };
    ctx.telemetry.set_source(info);
    ctx.telemetry
        .register_points(&catalogue::SOURCE_ACTIVE, move || {
            vec![(
                vec![
                    (catalogue::SOURCE, info.name),
                    (catalogue::SOURCE_MODE, info.mode),
                ],
                1,
            )]
        });
    Ok(Box::new(kernel))
}
