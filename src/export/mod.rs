//! Exporters: where finished intervals go. Each is a component (its own
//! settings, builder and self-telemetry) implementing [`Exporter`], and runs
//! behind its own bounded queue ([`queue`]) so a slow one never blocks the
//! flow stage or the others.
//!
//! A new exporter is one module with a `build` function and one line in
//! `exporters!` below.

pub mod attributes;
pub mod families;
pub mod instruments;
pub mod otlp;
pub mod otlp_metrics;
pub mod queue;
pub mod resource;
pub mod selection;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::component::ConfigError;
use crate::flow::report::IntervalReport;
use crate::flow::spans::SpanKeep;
use crate::telemetry::Telemetry;

/// A running exporter.
pub trait Exporter: Send + 'static {
    /// `otlp_metrics`, `otlp_logs`, `prometheus` or `console`: the
    /// `flowtel.exporter` attribute of its self-metrics.
    fn name(&self) -> &'static str;

    /// What the exporter loses when an interval cannot wait for it.
    fn carries(&self) -> Carries;

    /// Exports the intervals that waited for it, oldest first (at least
    /// one). Metrics are cumulative, so the newest carries them; records
    /// and samples come from each.
    fn export<'a>(&'a mut self, reports: &'a [Arc<IntervalReport>]) -> BoxFuture<'a, ()>;

    /// Releases the exporter after its last export.
    fn shutdown(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// What an interval holds that only this exporter would export, and so is
/// counted as dropped when the interval cannot be queued for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carries {
    /// Log records of each kind it wants kept per interval (0: none); the
    /// flow stage keeps the largest any exporter asks for.
    pub records: usize,
    /// RTT and duration samples.
    pub samples: bool,
    /// Connection spans: which, and how many per interval.
    pub spans: Option<SpanKeep>,
    /// Answered DNS lookups as well as failed ones (`export.logs.dns: all`).
    pub dns_lookups: bool,
}

/// What every exporter builder gets.
pub struct ExportContext<'a> {
    /// The `export:` section: shared settings such as `export.otlp`.
    pub export: &'a ExportConfig,
    /// Who is reporting.
    pub resource: &'a resource::ResourceConfig,
    pub interval: Duration,
    /// The most flow series an interval holds (`flows.max_series`).
    pub max_series: usize,
    pub telemetry: &'a Telemetry,
}

/// Declares the exporters that have their own section under `export:`
/// (its key, the module and its settings type): the module is declared,
/// the section is added to [`ExportConfig`] and validated with it, and the
/// module's `build` is called.
macro_rules! exporters {
    ($($(#[$doc:meta])* $key:ident: $module:ident::$config:ident,)*) => {
        $(pub mod $module;)*

        /// The `export:` section: the settings shared by every exporter,
        /// then each exporter's own.
        #[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
        #[serde(deny_unknown_fields, default)]
        pub struct ExportConfig {
            /// Finished intervals each exporter may have waiting while it
            /// is busy (a slow or retrying collector). Past it, an interval
            /// is skipped for that exporter: its metrics come with the next
            /// one (they are cumulative), its records and samples are
            /// counted as dropped.
            pub queue_size: usize,
            /// The OTLP transport: endpoint, protocol, TLS, retries.
            pub otlp: otlp::OtlpConfig,
            /// How metrics are shaped, whichever way they leave.
            pub metrics: selection::MetricsConfig,
            $($(#[$doc])* pub $key: $module::$config,)*
        }

        impl Default for ExportConfig {
            fn default() -> Self {
                Self {
                    queue_size: 4,
                    otlp: otlp::OtlpConfig::default(),
                    metrics: selection::MetricsConfig::default(),
                    $($key: $module::$config::default(),)*
                }
            }
        }

        impl ExportConfig {
            /// Checks every section; keys are relative to `export`.
            pub fn validate(&self) -> Result<(), ConfigError> {
                if self.queue_size == 0 {
                    return Err(ConfigError::new("queue_size", "must be at least 1"));
                }
                self.otlp.validate().map_err(|e| e.within("otlp"))?;
                self.metrics.validate().map_err(|e| e.within("metrics"))?;
                $(self.$key.validate().map_err(|e| e.within(stringify!($key)))?;)*
                Ok(())
            }
        }

        /// Builds every exporter the configuration turns on.
        fn build_all(ctx: &ExportContext<'_>) -> anyhow::Result<Vec<Box<dyn Exporter>>> {
            let mut all: Vec<Box<dyn Exporter>> = Vec::new();
            all.extend(otlp_metrics::build(ctx)?);
            $(all.extend($module::build(&ctx.export.$key, ctx)?);)*
            Ok(all)
        }
    };
}

exporters! {
    /// OTLP log events: flow records, connection and drop events.
    logs: otlp_logs::LogsConfig,
    /// The Prometheus exposition endpoint.
    prometheus: prometheus::PrometheusConfig,
    /// OTLP spans: one per TCP connection end.
    traces: otlp_traces::TracesConfig,
    /// The terminal view used when no collector is configured.
    console: console::ConsoleConfig,
}

/// Builds the exporters and starts each behind its queue.
pub fn start(ctx: &ExportContext<'_>) -> anyhow::Result<queue::Exporters> {
    let exporters = build_all(ctx)?;
    if exporters.is_empty() {
        tracing::warn!(
            "no OTLP endpoint, no Prometheus endpoint and the console is off: flows are counted but not shown anywhere"
        );
    }
    Ok(queue::Exporters::start(
        exporters,
        ctx.export.queue_size,
        ctx.telemetry,
    ))
}
