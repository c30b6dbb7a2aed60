//! ctnetlink I/O: the permission probe, table dumps and the event listener.
//!
//! Sockets are blocking with a short receive timeout so their threads notice
//! a stop request within a fraction of a second.

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::decode::{self, DecodeError, Message, Messages};
use super::{Every, Out};
use crate::flow::SourceEvent;
use crate::source::kernel::KernelStats;

/// How long a blocking receive waits before checking the stop flag.
const RECV_TIMEOUT: Duration = Duration::from_millis(200);
/// A dump that produces nothing for this long has failed.
const DUMP_STALL: Duration = Duration::from_secs(10);
/// Receive buffer: the kernel fills dump datagrams up to about 32 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Multicast groups NFNLGRP_CONNTRACK_NEW (1) and NFNLGRP_CONNTRACK_DESTROY (3).
const EVENT_GROUPS: u32 = (1 << 0) | (1 << 2);
/// Families asked for in one dump. AF_UNSPEC returns IPv4 and IPv6 entries
/// together (checked on kernel 6.18 by the integration test).
const DUMP_FAMILIES: &[u8] = &[libc::AF_UNSPEC as u8];

/// One received datagram, or why there was none.
enum Recv {
    Data(usize),
    /// The datagram was larger than the buffer; its content is unusable.
    Truncated,
    /// The receive timeout passed (time to check the stop flag).
    Timeout,
    /// The socket buffer overran and the kernel dropped messages.
    Overrun,
}

/// A NETLINK_NETFILTER socket in the calling thread's network namespace.
pub(crate) struct NlSocket {
    sock: Socket,
}

impl NlSocket {
    /// Opens and binds a socket; `groups` is the multicast bitmask (0 for
    /// request/response use).
    pub(crate) fn open(groups: u32) -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind(&SocketAddr::new(0, groups))?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: RECV_TIMEOUT.as_micros() as libc::suseconds_t,
        };
        setsockopt(&sock, libc::SO_RCVTIMEO, &tv)?;
        Ok(Self { sock })
    }

    /// Opens the event socket with a receive buffer of `bytes`: forced past
    /// `rmem_max` when allowed, else as large as `rmem_max` permits.
    pub(crate) fn open_events(bytes: usize) -> io::Result<Self> {
        let s = Self::open(EVENT_GROUPS)?;
        let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        if let Err(e) = setsockopt(&s.sock, libc::SO_RCVBUFFORCE, &want) {
            tracing::debug!(
                "SO_RCVBUFFORCE refused ({e}); using SO_RCVBUF, capped by net.core.rmem_max"
            );
            s.sock.set_rx_buf_sz(want)?;
        }
        tracing::debug!(
            requested = bytes,
            granted = s.sock.get_rx_buf_sz().unwrap_or(0),
            "conntrack event socket receive buffer"
        );
        Ok(s)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let sent = self.sock.send(msg, 0)?;
        if sent != msg.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            ));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Recv> {
        loop {
            let mut window: &mut [u8] = buf;
            let cap = window.len();
            match self.sock.recv(&mut window, libc::MSG_TRUNC) {
                Ok(n) if n > cap => return Ok(Recv::Truncated),
                Ok(n) => return Ok(Recv::Data(n)),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Ok(Recv::Timeout),
                    Some(libc::ENOBUFS) => return Ok(Recv::Overrun),
                    _ => return Err(e),
                },
            }
        }
    }
}

fn setsockopt<T>(sock: &Socket, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that ctnetlink answers us (same permission check as a dump, but
/// cheap). The error carries the errno so the caller can decide to fall back.
pub(crate) fn probe() -> io::Result<()> {
    let sock = NlSocket::open(0)?;
    let seq = 1;
    sock.send(&decode::stats_request(seq))?;
    let mut buf = vec![0u8; RECV_BUF];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let n = match sock.recv(&mut buf)? {
            Recv::Data(n) => n,
            Recv::Timeout | Recv::Truncated | Recv::Overrun => continue,
        };
        let data = buf.get(..n).unwrap_or_default();
        for msg in Messages::new(data) {
            let Ok(msg) = msg else { continue };
            match decode::classify(msg) {
                Ok(Message::Error(0)) => return Ok(()),
                Ok(Message::Error(code)) => return Err(io::Error::from_raw_os_error(-code)),
                _ => {}
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "ctnetlink did not answer",
    ))
}

/// How a dump ended.
#[derive(Debug)]
pub(crate) enum DumpEnd {
    Complete {
        entries: u64,
    },
    Failed(String),
    /// Stop was requested or the consumer went away.
    Halted,
}

/// Runs table dumps on one reusable socket (reopened after a failure, since
/// the kernel refuses a new dump while an old one is unfinished).
pub(crate) struct Dumper {
    sock: Option<NlSocket>,
    seq: u32,
    buf: Vec<u8>,
}

impl Dumper {
    pub(crate) fn new() -> Self {
        Self {
            sock: None,
            seq: 0,
            buf: vec![0u8; RECV_BUF],
        }
    }

    /// Dumps the whole table, sending one `Flow` per entry.
    pub(crate) fn run(&mut self, out: &Out, stats: &KernelStats) -> DumpEnd {
        let mut entries = 0;
        let mut warned = false;
        for &family in DUMP_FAMILIES {
            match self.run_family(family, out, stats, &mut entries, &mut warned) {
                DumpEnd::Complete { .. } => {}
                other => {
                    self.sock = None;
                    return other;
                }
            }
        }
        DumpEnd::Complete { entries }
    }

    fn run_family(
        &mut self,
        family: u8,
        out: &Out,
        stats: &KernelStats,
        entries: &mut u64,
        warned: &mut bool,
    ) -> DumpEnd {
        if self.sock.is_none() {
            match NlSocket::open(0) {
                Ok(s) => self.sock = Some(s),
                Err(e) => return DumpEnd::Failed(format!("opening the netlink socket: {e}")),
            }
        }
        let Some(sock) = &self.sock else {
            return DumpEnd::Failed("no netlink socket".into());
        };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        if let Err(e) = sock.send(&decode::dump_request(seq, family)) {
            return DumpEnd::Failed(format!("sending the dump request: {e}"));
        }
        let mut last_data = Instant::now();
        loop {
            if out.stopping() {
                return DumpEnd::Halted;
            }
            let n = match sock.recv(&mut self.buf) {
                Ok(Recv::Data(n)) => n,
                Ok(Recv::Timeout) => {
                    if last_data.elapsed() > DUMP_STALL {
                        return DumpEnd::Failed(format!("no answer for {DUMP_STALL:?}"));
                    }
                    continue;
                }
                Ok(Recv::Truncated) => {
                    stats.parse_errors.inc();
                    note_parse_error(
                        warned,
                        DecodeError::Truncated("datagram (larger than the buffer)"),
                    );
                    continue;
                }
                Ok(Recv::Overrun) => return DumpEnd::Failed("receive buffer overrun".into()),
                Err(e) => return DumpEnd::Failed(format!("receiving: {e}")),
            };
            last_data = Instant::now();
            let data = self.buf.get(..n).unwrap_or_default();
            for msg in Messages::new(data) {
                let parsed = msg.and_then(|m| Ok((decode::header(m)?, m)));
                let (hdr, msg) = match parsed {
                    Ok(p) => p,
                    Err(e) => {
                        stats.parse_errors.inc();
                        note_parse_error(warned, e);
                        continue;
                    }
                };
                if hdr.seq != seq {
                    // Left over from an abandoned request.
                    continue;
                }
                match decode::classify(msg) {
                    Ok(Message::Entry(update)) => {
                        *entries += 1;
                        if out.send(SourceEvent::Flow(update)).is_err() {
                            return DumpEnd::Halted;
                        }
                    }
                    Ok(Message::Done(0)) => return DumpEnd::Complete { entries: *entries },
                    Ok(Message::Done(code)) => {
                        return DumpEnd::Failed(format!(
                            "the kernel ended the dump with an error: {}",
                            io::Error::from_raw_os_error(-code)
                        ))
                    }
                    Ok(Message::Error(0)) | Ok(Message::Other) => {}
                    Ok(Message::Error(code)) => {
                        return DumpEnd::Failed(format!(
                            "the kernel refused the dump: {}",
                            io::Error::from_raw_os_error(-code)
                        ))
                    }
                    Err(e) => {
                        stats.parse_errors.inc();
                        note_parse_error(warned, e);
                    }
                }
            }
        }
    }
}

fn note_parse_error(warned: &mut bool, e: DecodeError) {
    if !*warned {
        *warned = true;
        tracing::warn!(
            "skipping a conntrack entry that could not be decoded ({e}); counted in parse_errors"
        );
    }
}

/// Reads NEW and DESTROY events until stop. Overruns are counted and
/// reading goes on: the periodic dump catches up on what was lost.
pub(crate) fn run_events(sock: NlSocket, out: &Out, stats: &KernelStats) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut overrun_log = Every::new(Duration::from_secs(60));
    let mut parse_log = Every::new(Duration::from_secs(60));
    let mut error_log = Every::new(Duration::from_secs(60));
    while !out.stopping() {
        let n = match sock.recv(&mut buf) {
            Ok(Recv::Data(n)) => n,
            Ok(Recv::Timeout) => continue,
            Ok(Recv::Overrun) => {
                stats.events_lost.inc();
                if overrun_log.ready() {
                    tracing::warn!(
                        lost_total = stats.events_lost.get(),
                        "conntrack events were lost (netlink receive buffer overrun); connections that \
                         ended meanwhile are caught by the periodic dump, but their last bytes may be \
                         missed. Raise conntrack.event_buffer_bytes"
                    );
                }
                continue;
            }
            Ok(Recv::Truncated) => {
                stats.parse_errors.inc();
                continue;
            }
            Err(e) => {
                if error_log.ready() {
                    tracing::warn!("reading conntrack events failed: {e}");
                }
                std::thread::sleep(RECV_TIMEOUT);
                continue;
            }
        };
        let data = buf.get(..n).unwrap_or_default();
        for msg in Messages::new(data) {
            match msg.and_then(decode::classify) {
                Ok(Message::Entry(update)) => {
                    if out.send(SourceEvent::Flow(update)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    stats.parse_errors.inc();
                    if parse_log.ready() {
                        tracing::warn!(
                            "skipping a conntrack event that could not be decoded ({e})"
                        );
                    }
                }
            }
        }
    }
}
