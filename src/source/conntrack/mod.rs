//! The conntrack source: the kernel's connection table, read over ctnetlink
//! (periodic dumps plus NEW/DESTROY events) or, when netlink is refused,
//! from `/proc/net/nf_conntrack` (dumps only).
//!
//! Everything runs on plain threads doing blocking I/O, each of which first
//! enters the configured network namespace: namespaces are per thread, so
//! netlink sockets, sysctls and `/proc/thread-self/net` then all belong to
//! that namespace.

pub(crate) mod decode;
mod netlink;
pub(crate) mod procfs;
mod sysctl;
mod tracking;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

pub use decode::{decode_message, encode_message, DecodeError, MessageKind};
pub use procfs::{parse_proc_line, ProcParseError};

use serde::{Deserialize, Serialize};

use crate::component::ConfigError;
use crate::flow::SourceEvent;
use crate::source::kernel::KernelStats;
use crate::source::netns;
use crate::source::out::Out;

/// How conntrack is read.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConntrackMode {
    /// ctnetlink, falling back to procfs when netlink is not permitted.
    Auto,
    Netlink,
    Procfs,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    pub mode: ConntrackMode,
    /// Read the conntrack table of this network namespace (a path such as
    /// `/var/run/netns/NAME` or `/proc/PID/ns/net`) instead of flowtel's own.
    pub netns: Option<PathBuf>,
    /// Subscribe to NEW/DESTROY events so connections that end between two
    /// dumps still count their final bytes.
    pub events: bool,
    /// Turn on `net.netfilter.nf_conntrack_acct` if it is off; without it the
    /// kernel keeps no byte or packet counters.
    pub enable_accounting: bool,
    /// Turn on `net.netfilter.nf_conntrack_timestamp` if it is off: the
    /// start times tell apart two connections on one tuple that the kernel
    /// gave the same ID, which would otherwise be counted together.
    pub enable_timestamps: bool,
    /// Add a match-only nft rule so the kernel tracks connections in a
    /// namespace where no firewall, kube-proxy or container runtime does
    /// (removed on exit). Off by default: nodes normally need no help.
    pub ensure_tracking: bool,
    /// The procfs table, used in `procfs` mode or when netlink is refused.
    pub proc_path: PathBuf,
    /// Receive buffer for the event socket, in bytes (set with
    /// `SO_RCVBUFFORCE`; a bigger buffer loses fewer events in bursts).
    pub event_buffer_bytes: usize,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self {
            mode: ConntrackMode::Auto,
            netns: None,
            events: true,
            enable_accounting: true,
            enable_timestamps: true,
            ensure_tracking: false,
            proc_path: PathBuf::from("/proc/net/nf_conntrack"),
            event_buffer_bytes: 16 * 1024 * 1024,
        }
    }
}

impl ConntrackConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.event_buffer_bytes < 65_536 {
            return Err(ConfigError::new(
                "event_buffer_bytes",
                "must be at least 65536",
            ));
        }
        check_netns("netns", self.netns.as_deref())
    }
}

/// An error at `key` when `netns` is set but does not exist.
pub fn check_netns(key: &str, netns: Option<&Path>) -> Result<(), ConfigError> {
    match netns {
        Some(path) if !path.exists() => Err(ConfigError::new(
            key,
            format!(
                "{} does not exist; give a path like /var/run/netns/NAME",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// How often idle threads look at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// How long `start` waits for the threads to set themselves up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The default procfs table, which follows the thread-group leader's
/// namespace; the per-thread view is used instead so `netns` applies.
const DEFAULT_PROC_PATH: &str = "/proc/net/nf_conntrack";
const THREAD_PROC_PATH: &str = "/proc/thread-self/net/nf_conntrack";

/// A running conntrack source. Dropping it without [`stop`](Self::stop)
/// also ends the threads, but does not wait for them.
pub struct ConntrackHandle {
    requests: mpsc::Sender<u64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    mode: &'static str,
}

impl ConntrackHandle {
    /// Ask for a full dump tagged `epoch`; the dump thread answers on the channel with
    /// SourceEvent::DumpStarted{epoch}, one SourceEvent::Flow per entry, then
    /// SourceEvent::DumpFinished{epoch, complete}. Returns false if the source has stopped.
    pub fn request_dump(&self, epoch: u64) -> bool {
        !self.stop.load(Ordering::Relaxed) && self.requests.send(epoch).is_ok()
    }

    /// "netlink" or "procfs": what is actually in use.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Stop all threads and join them (must return within ~1 s).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            if t.join().is_err() {
                tracing::error!("a conntrack source thread panicked");
            }
        }
    }
}

impl Drop for ConntrackHandle {
    /// Dropping without `stop` still tells the threads to end (within about
    /// 200 ms), just without waiting for them.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts the source. Errors (conntrack module not loaded, no permission and no procfs fallback, netns unusable) are returned with a message saying what to do.
pub fn start(
    cfg: &ConntrackConfig,
    stats: Arc<KernelStats>,
    tx: tokio::sync::mpsc::Sender<SourceEvent>,
) -> anyhow::Result<ConntrackHandle> {
    start_reader(cfg, stats, tx, Reader::Counters)
}

/// Starts a reader whose consumer needs only the tuples (the eBPF source's
/// NAT table), not the byte counters: it neither turns on
/// `nf_conntrack_acct` nor warns that it is off, since the eBPF source
/// counts the bytes itself.
pub fn start_translations(
    cfg: &ConntrackConfig,
    stats: Arc<KernelStats>,
    tx: tokio::sync::mpsc::Sender<SourceEvent>,
) -> anyhow::Result<ConntrackHandle> {
    start_reader(cfg, stats, tx, Reader::Translations)
}

/// What the consumer of a conntrack reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// Counters and tuples: the conntrack flow source.
    Counters,
    /// Tuples only.
    Translations,
}

fn start_reader(
    cfg: &ConntrackConfig,
    stats: Arc<KernelStats>,
    tx: tokio::sync::mpsc::Sender<SourceEvent>,
    reader: Reader,
) -> anyhow::Result<ConntrackHandle> {
    let netns = match &cfg.netns {
        Some(path) => Some(Arc::new(File::open(path).with_context(|| {
            format!(
                "cannot open network namespace {} (conntrack.netns); give a path like \
                 /var/run/netns/NAME or /proc/PID/ns/net that flowtel can read",
                path.display()
            )
        })?)),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let out = Out {
        tx,
        stop: stop.clone(),
    };
    let proc_path = if cfg.proc_path == Path::new(DEFAULT_PROC_PATH) {
        PathBuf::from(THREAD_PROC_PATH)
    } else {
        cfg.proc_path.clone()
    };

    let (requests, request_rx) = mpsc::channel::<u64>();
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<Mode>>();
    let dump_thread = {
        let (cfg, stats, out, netns) = (cfg.clone(), stats.clone(), out.clone(), netns.clone());
        std::thread::Builder::new()
            .name("ct-dump".into())
            .spawn(move || {
                let setup = netns::enter(netns.as_deref(), cfg.netns.as_deref(), "conntrack.netns")
                    .and_then(|()| match reader {
                        Reader::Counters => {
                            sysctl::ensure_accounting(cfg.enable_accounting, &stats)
                                .map(|_| sysctl::ensure_timestamps(cfg.enable_timestamps))
                        }
                        Reader::Translations => sysctl::check_loaded(),
                    })
                    .and_then(|()| choose_mode(&cfg, &proc_path));
                let mode = match setup {
                    Ok(mode) => mode,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let tracking = if cfg.ensure_tracking {
                    match tracking::TrackingRules::install() {
                        Ok(rules) => Some(rules),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                } else {
                    None
                };
                let _ = ready_tx.send(Ok(mode));
                dump_loop(mode, &proc_path, &request_rx, &out, &stats);
                drop(tracking);
            })
            .context("spawning the conntrack dump thread")?
    };
    let mut threads = vec![dump_thread];
    let abort = |threads: Vec<JoinHandle<()>>| {
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
    };
    let mode = match wait_ready(&ready_rx) {
        Ok(mode) => mode,
        Err(e) => {
            drop(requests);
            abort(threads);
            return Err(e);
        }
    };

    if mode == Mode::Netlink && cfg.events {
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<Mode>>();
        let (netns_path, buffer) = (cfg.netns.clone(), cfg.event_buffer_bytes);
        let (stats, out, netns) = (stats.clone(), out.clone(), netns.clone());
        let spawned = std::thread::Builder::new()
            .name("ct-events".into())
            .spawn(move || {
                let setup = netns::enter(netns.as_deref(), netns_path.as_deref(), "conntrack.netns").and_then(|()| {
                    netlink::NlSocket::open_events(buffer).map_err(|e| {
                        anyhow!(
                            "cannot subscribe to conntrack events: {e}; grant CAP_NET_ADMIN or set \
                             conntrack.events: false (dumps alone miss the last bytes of short connections)"
                        )
                    })
                });
                match setup {
                    Ok(sock) => {
                        let _ = ready_tx.send(Ok(Mode::Netlink));
                        netlink::run_events(sock, &out, &stats);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                drop(requests);
                abort(threads);
                return Err(anyhow!(e).context("spawning the conntrack event thread"));
            }
        }
        if let Err(e) = wait_ready(&ready_rx) {
            drop(requests);
            abort(threads);
            return Err(e);
        }
    } else if cfg.events {
        tracing::info!("conntrack events need netlink; relying on periodic procfs dumps only");
    }

    match reader {
        Reader::Counters => {
            tracing::info!(mode = mode.as_str(), netns = ?cfg.netns, "conntrack source started")
        }
        Reader::Translations => tracing::info!(
            mode = mode.as_str(),
            netns = ?cfg.netns,
            "conntrack reader for NAT translations started"
        ),
    }
    Ok(ConntrackHandle {
        requests,
        stop,
        threads,
        mode: mode.as_str(),
    })
}

fn wait_ready(rx: &mpsc::Receiver<anyhow::Result<Mode>>) -> anyhow::Result<Mode> {
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(result) => result,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            bail!("the conntrack source did not start within {START_TIMEOUT:?}")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            bail!("the conntrack source thread exited while starting")
        }
    }
}

/// What the dump thread reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Netlink,
    Procfs,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Netlink => "netlink",
            Self::Procfs => "procfs",
        }
    }
}

/// Picks netlink or procfs according to `cfg.mode` and what the kernel allows.
fn choose_mode(cfg: &ConntrackConfig, proc_path: &Path) -> anyhow::Result<Mode> {
    let check_proc = || {
        File::open(proc_path).map(drop).map_err(|e| {
            anyhow!(
                "cannot read {} ({e}); run flowtel as root, or point conntrack.proc_path at the table",
                proc_path.display()
            )
        })
    };
    match cfg.mode {
        ConntrackMode::Procfs => check_proc().map(|()| Mode::Procfs),
        ConntrackMode::Netlink => match netlink::probe() {
            Ok(()) => Ok(Mode::Netlink),
            Err(e) => Err(anyhow!(
                "ctnetlink is not usable: {e}; {} (or set conntrack.mode: procfs)",
                netlink_hint(&e)
            )),
        },
        ConntrackMode::Auto => {
            match netlink::probe() {
                Ok(()) => Ok(Mode::Netlink),
                Err(e) if falls_back(&e) => {
                    check_proc().map_err(|pe| {
                    anyhow!("ctnetlink is not usable ({e}; {}) and the procfs fallback failed: {pe}", netlink_hint(&e))
                })?;
                    tracing::warn!(
                    "ctnetlink is not usable ({e}); reading {} instead: no conntrack events, so \
                     connections that end between dumps lose their last bytes. {}",
                    proc_path.display(),
                    netlink_hint(&e)
                );
                    Ok(Mode::Procfs)
                }
                Err(e) => Err(anyhow!(
                    "ctnetlink is not usable: {e}; {}",
                    netlink_hint(&e)
                )),
            }
        }
    }
}

/// Errors that mean "netlink is not for us here", as opposed to a fault.
fn falls_back(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EPERM
                | libc::EACCES
                | libc::EPROTONOSUPPORT
                | libc::EAFNOSUPPORT
                | libc::EOPNOTSUPP
                | libc::ENOENT
        )
    )
}

fn netlink_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => "flowtel needs CAP_NET_ADMIN to use ctnetlink",
        Some(libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT | libc::EOPNOTSUPP | libc::ENOENT) => {
            "load ctnetlink with `modprobe nf_conntrack_netlink`"
        }
        _ => "check the kernel log",
    }
}

/// Serves dump requests until stopped or the consumer goes away.
fn dump_loop(
    mode: Mode,
    proc_path: &Path,
    requests: &mpsc::Receiver<u64>,
    out: &Out,
    stats: &KernelStats,
) {
    let mut dumper = netlink::Dumper::new();
    while !out.stopping() {
        let epoch = match requests.recv_timeout(POLL) {
            Ok(epoch) => epoch,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if out.send(SourceEvent::DumpStarted { epoch }).is_err() {
            return;
        }
        let started = Instant::now();
        let complete = match mode {
            Mode::Netlink => match dumper.run(out, stats) {
                netlink::DumpEnd::Complete { entries } => {
                    tracing::debug!(epoch, entries, elapsed = ?started.elapsed(), "conntrack dump done");
                    true
                }
                netlink::DumpEnd::Failed(why) => {
                    tracing::warn!(
                        epoch,
                        "conntrack dump failed: {why}; nothing is removed until the next one"
                    );
                    false
                }
                netlink::DumpEnd::Halted => return,
            },
            Mode::Procfs => match procfs_dump(proc_path, out, stats) {
                Some(complete) => {
                    if complete {
                        tracing::debug!(epoch, elapsed = ?started.elapsed(), "conntrack procfs dump done");
                    }
                    complete
                }
                None => return,
            },
        };
        if complete {
            stats.dumps.inc();
        } else {
            stats.dump_errors.inc();
        }
        if out
            .send(SourceEvent::DumpFinished { epoch, complete })
            .is_err()
        {
            return;
        }
    }
}

/// One pass over the procfs table: Some(complete), or None when halted.
fn procfs_dump(path: &Path, out: &Out, stats: &KernelStats) -> Option<bool> {
    let mut halted = false;
    let result = procfs::dump_file(path, |update| {
        let ok = !out.stopping() && out.send(SourceEvent::Flow(update)).is_ok();
        halted = !ok;
        ok
    });
    match result {
        Ok(d) => {
            if d.halted || halted {
                return None;
            }
            if d.malformed > 0 {
                stats.parse_errors.add(d.malformed);
                if let Some(e) = d.first_error {
                    tracing::warn!(
                        skipped = d.malformed,
                        "skipping malformed lines in {}: {e}",
                        path.display()
                    );
                }
            }
            Some(true)
        }
        Err(e) => {
            tracing::warn!(
                "reading {} failed: {e}; nothing is removed until the next dump",
                path.display()
            );
            Some(false)
        }
    }
}

/// A simple rate limiter for log lines.
pub(crate) struct Every {
    period: Duration,
    last: Option<Instant>,
}

impl Every {
    pub(crate) fn new(period: Duration) -> Self {
        Self { period, last: None }
    }

    /// True at most once per period.
    pub(crate) fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.period)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}
