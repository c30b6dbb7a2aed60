//! A real Prometheus server (Debian's `prometheus` 2.x) that scrapes one
//! target, queried through its HTTP API, and `promtool check metrics`.
//!
//! Included with `#[path = "common/prometheus.rs"] mod prometheus;` next to
//! `mod common;`. Prometheus is stopped (SIGTERM, then SIGKILL by PID) on
//! drop, also when the test panics: when it has a remote-write target that
//! is gone, it can hang on stop for more than 30 s.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::common::{free_port, wait_until, Tool};

pub const PROMETHEUS: Tool = Tool {
    name: "prometheus",
    env: "PROMETHEUS_BIN",
    fallbacks: &["/usr/bin/prometheus"],
};
pub const PROMTOOL: Tool = Tool {
    name: "promtool",
    env: "PROMTOOL_BIN",
    fallbacks: &["/usr/bin/promtool"],
};

/// One sample of an instant query: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A running Prometheus with its own configuration and storage.
pub struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts `bin` on 127.0.0.1, scraping `target` (`/metrics`) as job
    /// `job` every `interval`, and waits until it is ready.
    pub fn start(
        bin: &Path,
        job: &str,
        target: SocketAddr,
        interval: &str,
    ) -> anyhow::Result<Prometheus> {
        let dir = tempfile::tempdir().context("temp dir for Prometheus")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  \
                 evaluation_interval: {interval}\nscrape_configs:\n  - job_name: {job}\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut p = Prometheus { child, dir, addr };
        let ready = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            p.exited() || matches!(http_get(addr, "/-/ready"), Ok((200, _)))
        });
        if p.exited() || !ready {
            bail!(
                "Prometheus did not become ready on {addr} (exited: {}):\n{}",
                p.exited(),
                p.log()
            );
        }
        Ok(p)
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/query`: the samples of an instant vector query.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let q: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let (code, body) = http_get(self.addr, &format!("/api/v1/query?query={q}"))?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql:?}: answer is not JSON ({code}): {body}"))?;
        if code != 200 || json["status"] != "success" {
            bail!("query {promql:?} failed ({code}): {body}");
        }
        let result = json["data"]["result"]
            .as_array()
            .with_context(|| format!("query {promql:?}: no result array in {body}"))?;
        result
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .with_context(|| format!("no labels in {r}"))?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .with_context(|| format!("no value in {r}"))?;
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// What Prometheus says about its scrape targets (health, last error).
    pub fn targets(&self) -> String {
        match http_get(self.addr, "/api/v1/targets") {
            Ok((_, body)) => body,
            Err(e) => format!("(no /api/v1/targets: {e})"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if !self.exited() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) on our own child, which has not been reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let stopped = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
                !matches!(self.child.try_wait(), Ok(None))
            });
            if !stopped {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "Prometheus log, last lines:\n{}",
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
    }
}

/// A plain HTTP/1.0 GET (no chunked answers): the status code, the headers
/// (lower-case names) and the body.
pub fn http_get_full(
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, BTreeMap<String, String>, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("malformed HTTP response {text:?}"))?;
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((code, headers, body.to_string()))
}

/// [`http_get_full`] without the headers.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_full(addr, path).map(|(code, _, body)| (code, body))
}

/// `promtool check metrics` on `text`: whether it passed, and what it said.
pub fn promtool_check_metrics(promtool: &Path, text: &str) -> anyhow::Result<(bool, String)> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", promtool.display()))?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), said))
}
