//! The flowtel binary under test, run as a child process.
//!
//! Tests wait for flowtel through what it shows, never a fixed sleep
//! ([`Health`]): `/readyz` ([`Health::progress`],
//! [`Health::wait_for_dump_after`], [`Health::wait_for_interval_after`],
//! [`Health::wait_for_kube_synced`]) and what the receiving end holds
//! ([`Health::wait_until_shown`] with [`intervals_after`]).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use super::otlp_receiver::SumPoint;
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
    // Behind a lock so that the waits below, which notice an exit, need
    // only `&self` (a test may read flowtel while it waits, e.g. its RSS).
    child: Mutex<Child>,
    dir: tempfile::TempDir,
    pub health: SocketAddr,
    exited: Mutex<Option<ExitStatus>>,
}

/// What flowtel has done so far, as `/readyz` showed it at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// `stats.dumps`: source dumps completed.
    pub dumps: u64,
    /// `stats.exports_ok`: export requests delivered.
    pub exports_ok: u64,
    /// When `/readyz` answered.
    pub at: SystemTime,
}

/// Nanoseconds since the Unix epoch, as OTLP timestamps count them.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// How many distinct intervals that ended after `at` the flow points in
/// `points` come from: flowtel stamps every point of an interval with the
/// interval's end, and exports every flow series every interval.
pub fn intervals_after<'a>(
    points: impl IntoIterator<Item = &'a SumPoint>,
    at: SystemTime,
) -> usize {
    let at = unix_nanos(at);
    points
        .into_iter()
        .filter(|p| p.metric == "flowtel.flow.bytes" && p.time_unix_nano > at)
        .map(|p| p.time_unix_nano)
        .collect::<BTreeSet<u64>>()
        .len()
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
            child: Mutex::new(child),
            dir,
            health,
            exited: Mutex::new(None),
        })
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut exited = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        if exited.is_none() {
            *exited = self.child().try_wait().ok().flatten();
        }
        *exited
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
        get_readyz(self.health)
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
        let timeout = super::slow(timeout);
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
            let pid = self.pid() as libc::pid_t;
            // SAFETY: plain kill(2) on our own child, which has not been reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let exited = wait_until(grace, Duration::from_millis(20), || {
                self.exit_status().is_some()
            });
            if !exited {
                let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
                let _ = child.kill();
                let status = child.wait().ok();
                *self.exited.get_mut().unwrap_or_else(|e| e.into_inner()) = status;
            }
        }
        self.exit_status()
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

/// `GET /readyz` on `health`: the status code and the JSON body.
pub fn get_readyz(health: SocketAddr) -> anyhow::Result<(u16, serde_json::Value)> {
    let mut s = TcpStream::connect_timeout(&health, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: {health}\r\nConnection: close\r\n\r\n"
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

/// A running flowtel as the waits see it: its `/readyz` and whether it
/// has exited. [`Flowtel`] is one; a test that starts flowtel its own way
/// (through `setpriv`, say) implements it too, and gets the waits.
pub trait Health {
    /// `GET /readyz`: the status code and the JSON body.
    fn readyz(&self) -> anyhow::Result<(u16, serde_json::Value)>;

    /// `Some(status)` once the process has exited.
    fn exit_status(&self) -> Option<ExitStatus>;

    /// What it logged, for failure messages.
    fn output(&self) -> String;

    /// `stats.dumps` and `stats.exports_ok` now.
    fn progress(&self) -> anyhow::Result<Progress> {
        let (_, body) = self.readyz()?;
        let stats = &body["stats"];
        let get = |name: &str| {
            stats
                .get(name)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("no counter {name} in {stats}"))
        };
        Ok(Progress {
            dumps: get("dumps")?,
            exports_ok: get("exports_ok")?,
            at: SystemTime::now(),
        })
    }

    /// Polls `/readyz` every 50 ms until `done` holds for its body; the
    /// progress read then. An error if flowtel exits or `timeout` passes
    /// first (with the last body and flowtel's output).
    fn wait_for_readyz(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> anyhow::Result<Progress> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                bail!(
                    "flowtel exited ({status}) while the test waited for {what}:\n{}",
                    self.output()
                );
            }
            let last = match self.readyz() {
                Ok((_, body)) if done(&body) => return self.progress(),
                Ok((code, body)) => format!("{code} {body}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "flowtel: no {what} within {timeout:?} (last /readyz: {last}):\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a dump that began after `since` was read has completed:
    /// `stats.dumps` at least `since.dumps + 2`. flowtel runs one dump at a
    /// time, and the one running when `since` was read may have begun
    /// before it.
    fn wait_for_dump_after(&self, since: &Progress, timeout: Duration) -> anyhow::Result<Progress> {
        let at_least = since.dumps + 2;
        self.wait_for_readyz("a dump begun after the last reading", timeout, |body| {
            body["stats"]["dumps"]
                .as_u64()
                .is_some_and(|d| d >= at_least)
        })
    }

    /// Waits until flowtel has applied a dump begun after `since`, and
    /// what that dump set off (conntrack's DESTROY events of the entries it
    /// found expired): [`Health::wait_for_dump_after`] `since`, then again
    /// after that. flowtel asks for a dump only once it has applied the
    /// previous one (and the events queued before it) and handed that
    /// interval to the exporter, so every interval that ends after the
    /// returned `at` holds everything the source counted before `since`.
    fn wait_for_interval_after(
        &self,
        since: &Progress,
        timeout: Duration,
    ) -> anyhow::Result<Progress> {
        let deadline = Instant::now() + timeout;
        let first = self.wait_for_dump_after(since, timeout)?;
        self.wait_for_dump_after(&first, deadline.saturating_duration_since(Instant::now()))
    }

    /// Waits until `/readyz` says the Kubernetes cache has synced
    /// (`kubernetes.synced`: every kind listed; the cache publishes that
    /// view at once, and flowtel takes it before its next dump, so
    /// [`Health::wait_for_dump_after`] the returned progress names flows
    /// after it).
    fn wait_for_kube_synced(&self, timeout: Duration) -> anyhow::Result<Progress> {
        self.wait_for_readyz("the Kubernetes cache to sync", timeout, |body| {
            body["kubernetes"]["synced"].as_bool() == Some(true)
        })
    }

    /// Waits until the receiving end shows everything flowtel counted
    /// before this call: [`Health::wait_for_interval_after`] the progress
    /// read now, then until `shown(at)`, how many intervals that ended after
    /// that point the receiving end holds (see [`intervals_after`]), reaches
    /// `intervals`. One is enough for the metrics, which are cumulative.
    /// Logs need two: an interval's records leave flowtel with its metrics,
    /// and before the next interval's metrics do (plus one per interval a
    /// collector in between may hold a batch). `Ok(false)` if they did not
    /// show within `timeout`.
    fn wait_until_shown(
        &self,
        intervals: usize,
        timeout: Duration,
        mut shown: impl FnMut(SystemTime) -> usize,
    ) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        let since = self.progress()?;
        let applied = self.wait_for_interval_after(&since, timeout)?;
        Ok(wait_until(
            deadline.saturating_duration_since(Instant::now()),
            Duration::from_millis(100),
            || shown(applied.at) >= intervals,
        ))
    }
}

impl Health for Flowtel {
    fn readyz(&self) -> anyhow::Result<(u16, serde_json::Value)> {
        Flowtel::readyz(self)
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        Flowtel::exit_status(self)
    }

    fn output(&self) -> String {
        Flowtel::output(self)
    }
}
