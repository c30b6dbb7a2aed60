//! The flowtel binary under test, run as a child process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use super::{free_port, strip_ansi, wait_until};

/// How flowtel is started.
#[derive(Debug, Clone)]
pub struct FlowtelArgs<'a> {
    /// `--source` (these tests pin `conntrack` so `auto` cannot pick another).
    pub source: &'a str,
    pub netns: &'a Path,
    /// The OTLP endpoint (`http://127.0.0.1:PORT`).
    pub endpoint: &'a str,
    /// `grpc` or `http/protobuf`.
    pub protocol: &'a str,
    pub interval: &'a str,
    /// Extra environment, e.g. `FLOWTEL_EXPORT__OTLP__TIMEOUT=1s`.
    pub env: Vec<(&'a str, String)>,
}

/// A running flowtel; stopped with SIGTERM (then SIGKILL) on drop.
pub struct Flowtel {
    child: Child,
    dir: tempfile::TempDir,
    pub health: SocketAddr,
    exited: Option<ExitStatus>,
}

impl Flowtel {
    pub fn start(args: &FlowtelArgs) -> anyhow::Result<Flowtel> {
        let dir = tempfile::tempdir().context("temp dir for flowtel's output")?;
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let stdout = std::fs::File::create(dir.path().join("stdout.log"))?;
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowtel"));
        cmd.arg("run")
            .args(["--source", args.source])
            .arg("--netns")
            .arg(args.netns)
            .args(["--interval", args.interval])
            .args(["--endpoint", args.endpoint])
            .args(["--protocol", args.protocol])
            .args(["--health-listen", &health.to_string()]);
        // Settings of the developer's shell must not leak into the test.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("FLOWTEL_") || k.starts_with("OTEL_") {
                cmd.env_remove(&key);
            }
        }
        let log = std::env::var("FLOWTEL_TEST_LOG").unwrap_or_else(|_| "info,flowtel=debug".into());
        cmd.env("RUST_LOG", log);
        for (k, v) in &args.env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .context("spawning flowtel")?;
        Ok(Flowtel {
            child,
            dir,
            health,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// What flowtel logged (stderr) and printed (stdout), without colours.
    pub fn output(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        strip_ansi(&format!(
            "--- stderr ---\n{}--- stdout ---\n{}",
            read("stderr.log"),
            read("stdout.log")
        ))
    }

    /// Resident memory (`VmRSS` of /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .context("reading flowtel's /proc status")?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .context("no VmRSS line in /proc/PID/status")?;
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("cannot parse {line:?}"))
    }

    /// `GET /readyz`: the status code and the JSON body.
    pub fn readyz(&self) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut s = TcpStream::connect_timeout(&self.health, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /readyz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.health
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("malformed HTTP response {text:?}"))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status code in {head:?}"))?;
        let json = serde_json::from_str(body.trim())
            .with_context(|| format!("/readyz body is not JSON: {body:?}"))?;
        Ok((code, json))
    }

    /// Where the Prometheus endpoint listens, from flowtel's
    /// `Prometheus metrics on http://ADDR/metrics` line.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        let output = self.output();
        let line = output
            .lines()
            .find(|l| l.contains("Prometheus metrics on http://"))?;
        let rest = line.split("Prometheus metrics on http://").nth(1)?;
        rest.split("/metrics").next()?.parse().ok()
    }

    /// flowtel's own counters (the `stats` object of `/readyz`).
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = self.readyz()?;
        body.get("stats")
            .cloned()
            .with_context(|| format!("/readyz has no stats: {body}"))
    }

    /// One of flowtel's own counters, by name.
    pub fn stat(&self, name: &str) -> anyhow::Result<u64> {
        let stats = self.stats()?;
        stats
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("no counter {name} in {stats}"))
    }

    /// Waits until `/readyz` answers 200 (the source runs and its first
    /// dump is done, so conntrack events are subscribed).
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let mut last = String::new();
        let ready = wait_until(timeout, Duration::from_millis(50), || {
            if self.exit_status().is_some() {
                return true;
            }
            match self.readyz() {
                Ok((200, _)) => true,
                Ok((code, body)) => {
                    last = format!("{code} {body}");
                    false
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        if let Some(status) = self.exit_status() {
            bail!(
                "flowtel exited ({status}) while starting:\n{}",
                self.output()
            );
        }
        if !ready {
            bail!(
                "flowtel not ready after {timeout:?} (last /readyz: {last}):\n{}",
                self.output()
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.exit_status().is_none() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: plain kill(2) on our own child, which has not been reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let exited = wait_until(grace, Duration::from_millis(20), || {
                self.exit_status().is_some()
            });
            if !exited {
                let _ = self.child.kill();
                self.exited = self.child.wait().ok();
            }
        }
        self.exited
    }
}

impl Drop for Flowtel {
    fn drop(&mut self) {
        let status = self.stop(Duration::from_secs(10));
        if std::thread::panicking() {
            let output = self.output();
            let lines: Vec<&str> = output.lines().collect();
            eprintln!(
                "flowtel {} ({status:?}) output, last lines:\n{}",
                self.pid(),
                lines[lines.len().saturating_sub(60)..].join("\n")
            );
        }
    }
}
