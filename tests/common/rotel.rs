//! rotel, a real OpenTelemetry collector (the `rotel-agent` binary of the
//! `rotel` Python wheel), with its debug exporter printing what it receives.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use super::otlp_receiver::{AttrValue, Attrs, LogEvent, SumPoint, CUMULATIVE};
use super::{free_port, strip_ansi, wait_until};

/// A running rotel-agent; killed on drop.
pub struct Rotel {
    child: Child,
    dir: tempfile::TempDir,
    pub grpc_port: u16,
    pub http_port: u16,
}

impl Rotel {
    /// Starts rotel-agent on two free ports of 127.0.0.1 and waits until
    /// both accept connections.
    pub fn start(bin: &Path) -> anyhow::Result<Rotel> {
        Self::start_with(bin, &["--exporter".into(), "blackhole".into()])
    }

    /// [`Rotel::start`] with `args` (exporters, batching, processors, ...)
    /// instead of `--exporter blackhole`. The debug exporter still prints
    /// metrics and logs.
    pub fn start_with(bin: &Path, args: &[String]) -> anyhow::Result<Rotel> {
        let mut last_error = None;
        for _ in 0..3 {
            match Self::try_start(bin, args) {
                Ok(r) => return Ok(r),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("rotel did not start")))
    }

    fn try_start(bin: &Path, args: &[String]) -> anyhow::Result<Rotel> {
        let dir = tempfile::tempdir().context("temp dir for rotel")?;
        let (grpc_port, http_port) = (free_port(), free_port());
        let stdout = std::fs::File::create(dir.path().join("stdout.log"))?;
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let child = Command::new(bin)
            .arg("start")
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .args(["--debug-log", "metrics", "--debug-log", "logs"])
            .args(["--debug-log-verbosity", "detailed"])
            .args(args)
            .arg("--log-file")
            .arg(dir.path().join("rotel-agent.log"))
            .arg("--pid-file")
            .arg(dir.path().join("rotel-agent.pid"))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut rotel = Rotel {
            child,
            dir,
            grpc_port,
            http_port,
        };
        let listening = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
            let up = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            up(grpc_port) && up(http_port)
        });
        if let Ok(Some(status)) = rotel.child.try_wait() {
            bail!(
                "rotel-agent exited ({status}) while starting:\n{}",
                rotel.log()
            );
        }
        if !listening {
            bail!(
                "rotel-agent is not listening on {grpc_port} and {http_port} after 15 s:\n{}",
                rotel.log()
            );
        }
        Ok(rotel)
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn files(&self) -> Vec<PathBuf> {
        ["stdout.log", "stderr.log", "rotel-agent.log"]
            .iter()
            .map(|f| self.dir.path().join(f))
            .collect()
    }

    /// Everything rotel printed (stdout, stderr and its log file), without
    /// ANSI colours.
    pub fn log(&self) -> String {
        let text: String = self
            .files()
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .collect::<Vec<_>>()
            .join("\n");
        strip_ansi(&text)
    }

    /// The Sum data points rotel's debug exporter printed.
    pub fn sum_points(&self) -> Vec<SumPoint> {
        parse_debug_log(&self.log())
    }

    /// The log records rotel's debug exporter printed.
    pub fn log_events(&self) -> Vec<LogEvent> {
        parse_debug_logs(&self.log())
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let exited = wait_until(Duration::from_secs(3), Duration::from_millis(20), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `Str(x)`, `Int(5)`, `Bool(true)` as rotel prints attribute values.
fn parse_value(text: &str) -> AttrValue {
    let inner = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|t| t.strip_suffix(')'))
            .map(str::to_string)
    };
    if let Some(s) = inner("Str(") {
        AttrValue::Str(s)
    } else if let Some(i) = inner("Int(").and_then(|i| i.parse().ok()) {
        AttrValue::Int(i)
    } else if let Some(b) = inner("Bool(").and_then(|b| b.parse().ok()) {
        AttrValue::Bool(b)
    } else {
        AttrValue::Other(text.to_string())
    }
}

/// Parses the Collector-style debug output (`ResourceMetrics #0`,
/// `Resource attributes:`, `Metric #0`, `Descriptor:`, `-> Name: ...`,
/// `NumberDataPoints #0`, `Data point attributes:`, `Value: ...`) into the
/// Sum data points it shows.
pub fn parse_debug_log(log: &str) -> Vec<SumPoint> {
    #[derive(PartialEq)]
    enum Section {
        None,
        Resource,
        Descriptor,
        Point,
    }
    let mut out = Vec::new();
    let mut section = Section::None;
    let mut resource = Attrs::new();
    let mut metric = SumPoint {
        metric: String::new(),
        unit: String::new(),
        monotonic: false,
        temporality: 0,
        resource: Attrs::new(),
        attrs: Attrs::new(),
        value: 0,
        start_unix_nano: 0,
        time_unix_nano: 0,
    };
    let mut is_sum = false;
    for line in log.lines() {
        let t = line.trim();
        if t.starts_with("ResourceMetrics #") {
            resource.clear();
            section = Section::None;
        } else if t == "Resource attributes:" {
            section = Section::Resource;
        } else if t.starts_with("Metric #") {
            is_sum = false;
            metric.metric.clear();
            metric.unit.clear();
            metric.monotonic = false;
            metric.temporality = 0;
            section = Section::None;
        } else if t == "Descriptor:" {
            section = Section::Descriptor;
        } else if t.starts_with("NumberDataPoints #") {
            metric.attrs.clear();
            metric.start_unix_nano = 0;
            metric.time_unix_nano = 0;
            section = Section::None;
        } else if t == "Data point attributes:" {
            section = Section::Point;
        } else if let Some(kv) = t.strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            match section {
                Section::Resource => {
                    resource.insert(k.to_string(), parse_value(v));
                }
                Section::Point => {
                    metric.attrs.insert(k.to_string(), parse_value(v));
                }
                Section::Descriptor => match k {
                    "Name" => metric.metric = v.to_string(),
                    "Unit" => metric.unit = v.to_string(),
                    "DataType" => is_sum = v == "Sum",
                    "IsMonotonic" => metric.monotonic = v == "true",
                    "AggregationTemporality" => {
                        metric.temporality = if v.ends_with("CUMULATIVE") {
                            CUMULATIVE
                        } else {
                            1
                        }
                    }
                    _ => {}
                },
                Section::None => {}
            }
        } else if let Some(v) = t.strip_prefix("StartTimestamp: ") {
            metric.start_unix_nano = v.parse().unwrap_or(0);
            section = Section::None;
        } else if let Some(v) = t.strip_prefix("Timestamp: ") {
            metric.time_unix_nano = v.parse().unwrap_or(0);
            section = Section::None;
        } else if let Some(v) = t.strip_prefix("Value: ") {
            section = Section::None;
            if is_sum {
                let value = v
                    .parse::<u64>()
                    .ok()
                    .or_else(|| v.parse::<f64>().ok().map(|f| f as u64));
                if let Some(value) = value {
                    let mut p = metric.clone();
                    p.value = value;
                    p.resource = resource.clone();
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Parses the Collector-style debug output of logs (`ResourceLog #0`,
/// `Resource attributes:`, `LogRecord #0`, `Timestamp: ...`,
/// `SeverityText: WARN`, `SeverityNumber: SEVERITY_NUMBER_WARN(13)`,
/// `EventName: ...`, `Body: Str(...)`, `Attributes:`) into records.
pub fn parse_debug_logs(log: &str) -> Vec<LogEvent> {
    let mut out: Vec<LogEvent> = Vec::new();
    let mut resource = Attrs::new();
    let mut in_resource = false;
    let mut current: Option<LogEvent> = None;
    let mut in_attrs = false;
    for line in log.lines() {
        let t = line.trim();
        if t.starts_with("ResourceLog #") {
            out.extend(current.take());
            resource.clear();
            in_resource = false;
            in_attrs = false;
        } else if t == "Resource attributes:" {
            in_resource = true;
        } else if t.starts_with("LogRecord #") {
            out.extend(current.take());
            in_resource = false;
            in_attrs = false;
            current = Some(LogEvent {
                resource: resource.clone(),
                event_name: String::new(),
                severity_number: 0,
                severity_text: String::new(),
                body: String::new(),
                attrs: Attrs::new(),
                time_unix_nano: 0,
            });
        } else if let Some(kv) = t.strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            if in_resource {
                resource.insert(k.to_string(), parse_value(v));
            } else if let (true, Some(r)) = (in_attrs, current.as_mut()) {
                r.attrs.insert(k.to_string(), parse_value(v));
            }
        } else if let Some(r) = current.as_mut() {
            in_attrs = t == "Attributes:";
            if let Some(v) = t.strip_prefix("Timestamp: ") {
                r.time_unix_nano = v.parse().unwrap_or(0);
            } else if let Some(v) = t.strip_prefix("SeverityText: ") {
                r.severity_text = v.to_string();
            } else if let Some(v) = t.strip_prefix("SeverityNumber: ") {
                r.severity_number = v
                    .rsplit_once('(')
                    .and_then(|(_, n)| n.strip_suffix(')'))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            } else if let Some(v) = t.strip_prefix("EventName: ") {
                r.event_name = v.to_string();
            } else if let Some(v) = t.strip_prefix("Body: ") {
                r.body = match parse_value(v) {
                    AttrValue::Str(s) => s,
                    other => other.to_string(),
                };
            }
        }
    }
    out.extend(current);
    out
}
