//! The terminal view used when no collector is configured: a table of the
//! busiest series refreshed each interval, or JSON lines for scripts.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::attributes::{series_attributes, Direction};
use super::otlp::transport::SignalTransport;
use super::{Carries, ExportContext, Exporter};
use crate::component::ConfigError;
use crate::flow::names::EndName;
use crate::flow::report::IntervalReport;
use crate::flow::series::{SeriesKey, SeriesPoint};
use crate::telemetry::{catalogue, Telemetry};

/// When flows are printed to the terminal.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleMode {
    /// Only when no OTLP endpoint is configured.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleFormat {
    /// A table refreshed every interval.
    Table,
    /// One JSON object a line per series per interval.
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    pub format: ConsoleFormat,
    /// Rows shown in the table (busiest first).
    pub rows: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            mode: ConsoleMode::Auto,
            format: ConsoleFormat::Table,
            rows: 25,
        }
    }
}

impl ConsoleConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rows == 0 {
            return Err(ConfigError::new("rows", "must be at least 1"));
        }
        Ok(())
    }
}

/// Prints finished intervals to stdout.
pub struct ConsoleExporter {
    cfg: ConsoleConfig,
    clear_screen: bool,
    telemetry: Telemetry,
    /// Set once stdout refused a write (a closed pipe): flowtel goes on.
    closed: bool,
}

/// The console, when `mode` asks for it: `auto` prints only when neither
/// an OTLP metrics endpoint nor the Prometheus endpoint is set, so a node
/// that exports does not also flood its log with tables.
pub fn build(
    cfg: &ConsoleConfig,
    ctx: &ExportContext<'_>,
) -> anyhow::Result<Option<Box<dyn Exporter>>> {
    let otlp = &ctx.export.otlp;
    let on = match cfg.mode {
        ConsoleMode::Always => true,
        ConsoleMode::Never => false,
        ConsoleMode::Auto => {
            SignalTransport::resolve(otlp, &otlp.metrics, "metrics").is_none()
                && ctx.export.prometheus.listen.is_empty()
        }
    };
    Ok(on.then(|| {
        Box::new(ConsoleExporter {
            cfg: cfg.clone(),
            clear_screen: std::io::stdout().is_terminal(),
            telemetry: ctx.telemetry.clone(),
            closed: false,
        }) as Box<dyn Exporter>
    }))
}

impl Exporter for ConsoleExporter {
    fn name(&self) -> &'static str {
        "console"
    }

    fn carries(&self) -> Carries {
        Carries::default()
    }

    fn export<'a>(&'a mut self, reports: &'a [Arc<IntervalReport>]) -> BoxFuture<'a, ()> {
        if let (Some(report), false) = (reports.last(), self.closed) {
            if let Err(e) = self.print(report) {
                tracing::warn!("stopped printing flows to the terminal: {e}");
                self.closed = true;
            }
        }
        Box::pin(async {})
    }
}

impl ConsoleExporter {
    /// Writes one interval. Errors (a closed pipe) are returned so the caller
    /// can stop printing without stopping flowtel.
    fn print(&self, report: &IntervalReport) -> std::io::Result<()> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        match self.cfg.format {
            ConsoleFormat::Json => write_json(&mut out, report)?,
            ConsoleFormat::Table => {
                if self.clear_screen {
                    out.write_all(b"\x1b[2J\x1b[H")?;
                }
                let text = render_table(report, &self.telemetry, self.cfg.rows);
                out.write_all(text.as_bytes())?;
            }
        }
        out.flush()
    }
}

fn write_json(out: &mut impl Write, report: &IntervalReport) -> std::io::Result<()> {
    let start = report
        .start
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let end = report
        .end
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    for p in report.points.iter().filter(|p| !p.interval.is_zero()) {
        let mut obj = serde_json::Map::new();
        obj.insert("interval_start_ms".into(), start.into());
        obj.insert("interval_end_ms".into(), end.into());
        for kv in series_attributes(&p.key, None) {
            obj.insert(kv.key.to_string(), json_value(&kv.value));
        }
        for (direction, c) in [
            (Direction::ClientToServer, p.interval.to_server),
            (Direction::ServerToClient, p.interval.to_client),
        ] {
            obj.insert(
                direction.as_str().into(),
                serde_json::json!({ "bytes": c.bytes, "packets": c.packets }),
            );
        }
        serde_json::to_writer(&mut *out, &serde_json::Value::Object(obj))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn json_value(v: &opentelemetry::Value) -> serde_json::Value {
    match v {
        opentelemetry::Value::Bool(b) => (*b).into(),
        opentelemetry::Value::I64(i) => (*i).into(),
        opentelemetry::Value::F64(f) => (*f).into(),
        other => other.as_str().into_owned().into(),
    }
}

fn endpoint_text(ip: Option<std::net::IpAddr>, port: Option<u16>) -> String {
    match (ip, port) {
        (Some(ip), Some(port)) if ip.is_ipv6() => format!("[{ip}]:{port}"),
        (Some(ip), Some(port)) => format!("{ip}:{port}"),
        (Some(ip), None) => ip.to_string(),
        (None, Some(port)) => format!("*:{port}"),
        (None, None) => "*".into(),
    }
}

fn describe(key: &SeriesKey) -> (String, String, String, String) {
    if key.overflow {
        return (
            "-".into(),
            "(overflow)".into(),
            "(overflow)".into(),
            String::new(),
        );
    }
    let transport = key
        .transport
        .map(|t| t.to_string())
        .unwrap_or_else(|| "*".into());
    let end = |name: &Option<Arc<EndName>>, ip, port| match name {
        Some(n) => match port {
            Some(port) => format!("{}:{port}", n.label()),
            None => n.label(),
        },
        None => endpoint_text(ip, port),
    };
    let client = end(&key.client_name, key.client, key.client_port);
    let server = end(&key.server_name, key.server, key.server_port);
    let nat = key.nat_server.map(|e| format!("→ {e}")).unwrap_or_default();
    (transport, client, server, nat)
}

/// Human-readable byte count (1024-based, as `ip -s link` users expect).
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Renders the table: busiest series in the interval first.
pub fn render_table(report: &IntervalReport, telemetry: &Telemetry, rows: usize) -> String {
    let stat = |m| telemetry.value(m);
    let source = telemetry
        .source()
        .map_or_else(|| "-".to_owned(), |s| s.to_string());
    let mut points: Vec<&SeriesPoint> = report.points.iter().collect();
    points
        .sort_by_key(|p| std::cmp::Reverse((p.interval.total().bytes, p.cumulative.total().bytes)));
    let secs = report
        .end
        .duration_since(report.start)
        .unwrap_or_default()
        .as_secs_f64()
        .max(0.001);
    let mut s = format!(
        "flowtel {} — source: {source} — {} series, {} flows tracked{}\n\n",
        env!("CARGO_PKG_VERSION"),
        points.len(),
        stat(&catalogue::FLOWS_TRACKED),
        if stat(&catalogue::SOURCE_BYTE_COUNTERS) > 0 {
            ""
        } else {
            " — BYTE COUNTERS UNAVAILABLE (conntrack accounting off)"
        },
    );
    s.push_str(&format!(
        "{:<6} {:<41} {:<47} {:>10} {:>10} {:>9} {:>11}  {}\n",
        "PROTO", "CLIENT", "SERVER", "→ SERVER", "← CLIENT", "PACKETS", "RATE", "NAT"
    ));
    for p in points.iter().take(rows) {
        let (transport, client, server, nat) = describe(&p.key);
        let total = p.interval.total();
        s.push_str(&format!(
            "{:<6} {:<41} {:<47} {:>10} {:>10} {:>9} {:>9}/s  {}\n",
            transport,
            client,
            server,
            human_bytes(p.interval.to_server.bytes),
            human_bytes(p.interval.to_client.bytes),
            total.packets,
            human_bytes((total.bytes as f64 / secs) as u64),
            nat,
        ));
    }
    if points.len() > rows {
        s.push_str(&format!("… {} more series\n", points.len() - rows));
    }
    s.push_str(&format!(
        "\nlost: {} untracked updates, {} flows ended unseen, {} folded into overflow, {} event overruns, {} export failures\n",
        stat(&catalogue::FLOWS_UNTRACKED),
        stat(&catalogue::FLOWS_ENDED_UNSEEN),
        stat(&catalogue::SERIES_OVERFLOWED),
        stat(&catalogue::SOURCE_EVENTS_LOST),
        stat(&catalogue::EXPORT_FAILURES)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_humane() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
