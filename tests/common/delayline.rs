//! A userspace stand-in for `tc qdisc netem`, which this machine's kernel
//! lacks (`CONFIG_NET_SCH_NETEM` is not set; no sch_fq either): a TUN device
//! in a router namespace whose reader holds every packet for a fixed delay
//! and drops a fixed share of them before writing it back. Routes send the
//! forward path through the device, and a policy rule sends what comes out
//! of it on to the destination.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::netns::Netns;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; 22],
}

/// The running delay line; stopped (and its device gone) on drop.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Packets dropped on purpose so far.
    pub dropped: Arc<AtomicU64>,
    /// Packets passed on so far.
    pub passed: Arc<AtomicU64>,
}

impl DelayLine {
    /// Creates TUN device `ifname` in `ns` (up, no address) and starts
    /// delaying what is routed into it by `delay`, dropping `loss_permille`
    /// of every 1000 packets (deterministically spread).
    pub fn start(
        ns: &Netns,
        ifname: &str,
        delay: Duration,
        loss_permille: u32,
    ) -> anyhow::Result<DelayLine> {
        if ifname.len() >= libc::IFNAMSIZ {
            bail!("interface name {ifname:?} is too long");
        }
        let name = ifname.to_string();
        let tun = ns
            .in_ns(move || -> anyhow::Result<File> {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")
                    .context("opening /dev/net/tun")?;
                let mut req = IfReq {
                    name: [0; libc::IFNAMSIZ],
                    flags: IFF_TUN | IFF_NO_PI,
                    pad: [0; 22],
                };
                req.name[..name.len()].copy_from_slice(name.as_bytes());
                // SAFETY: TUNSETIFF reads and writes an ifreq we own.
                if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
                    return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
                }
                // SAFETY: fcntl on our own descriptor.
                unsafe {
                    let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
                }
                Ok(file)
            })
            .context("entering the router namespace")??;
        ns.ip(&["link", "set", "dev", ifname, "up"])?;
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let passed = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, dropped, passed) = (stop.clone(), dropped.clone(), passed.clone());
            std::thread::Builder::new()
                .name("delay-line".into())
                .spawn(move || run(tun, delay, loss_permille, &stop, &dropped, &passed))
                .context("spawning the delay line")?
        };
        Ok(DelayLine {
            stop,
            thread: Some(thread),
            dropped,
            passed,
        })
    }
}

fn run(
    mut tun: File,
    delay: Duration,
    loss_permille: u32,
    stop: &AtomicBool,
    dropped: &AtomicU64,
    passed: &AtomicU64,
) {
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65_536];
    let mut seen: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        loop {
            match tun.read(&mut buf) {
                Ok(n) if n > 0 => {
                    seen += 1;
                    // Every (1000 / loss)th packet, offset so the first
                    // packets (the handshake) pass.
                    let lose = loss_permille > 0
                        && (seen * u64::from(loss_permille)) % 1000 < u64::from(loss_permille)
                        && seen > 3;
                    if lose {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        queue.push_back((Instant::now() + delay, buf[..n].to_vec()));
                    }
                }
                Ok(_) => break,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, packet)) = queue.pop_front() {
                if tun.write_all(&packet).is_ok() {
                    passed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let wait = queue
            .front()
            .map_or(Duration::from_millis(1), |(due, _)| {
                due.saturating_duration_since(Instant::now())
            })
            .min(Duration::from_millis(1));
        let mut pfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as libc::c_int) };
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
