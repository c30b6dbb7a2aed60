//! Traffic of known size between namespaces, with plain std sockets made on
//! threads that entered the namespaces (no external traffic tool).
//!
//! TCP: the client sends a 16-byte header (bytes up, bytes down as two
//! big-endian u64) and the bytes up; the server reads them, sends the bytes
//! down and closes; the client reads to the end and closes. So the payload
//! is exactly `16 + up` to the server and `down` to the client.
//!
//! UDP: request/response. Each request datagram of `up` bytes starts with
//! the size of the reply (big-endian u32); the server answers each one.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};

use super::netns::Netns;

const CHUNK: usize = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Payload bytes (above L4) that crossed in each direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Payload {
    pub to_server: u64,
    pub to_client: u64,
    /// TCP connections made, or UDP requests sent.
    pub exchanges: u64,
    /// UDP requests that got no reply (0 for TCP).
    pub lost: u64,
    /// The kernel's smoothed RTT of each TCP connection when its transfer
    /// was done (`TCP_INFO` `tcpi_rtt`), summed, µs: ground truth for the
    /// RTT flowtel reports.
    pub srtt_sum_us: u64,
}

impl Payload {
    pub fn add(&mut self, other: Payload) {
        self.to_server += other.to_server;
        self.to_client += other.to_client;
        self.exchanges += other.exchanges;
        self.lost += other.lost;
        self.srtt_sum_us += other.srtt_sum_us;
    }
}

/// Servers bound inside a namespace; stopped and joined on drop.
pub struct TrafficServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl TrafficServer {
    /// Binds TCP listeners and UDP sockets on the given addresses inside
    /// `ns` and serves them until dropped.
    pub fn start(ns: &Netns, tcp: &[SocketAddr], udp: &[SocketAddr]) -> anyhow::Result<Self> {
        let (listeners, sockets) = ns
            .in_ns(|| -> std::io::Result<_> {
                let listeners = tcp
                    .iter()
                    .map(TcpListener::bind)
                    .collect::<std::io::Result<Vec<_>>>()?;
                let sockets = udp
                    .iter()
                    .map(UdpSocket::bind)
                    .collect::<std::io::Result<Vec<_>>>()?;
                Ok((listeners, sockets))
            })?
            .with_context(|| format!("binding servers {tcp:?} {udp:?} in {}", ns.name))?;
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for listener in listeners {
            listener.set_nonblocking(true)?;
            let (stop, errors) = (stop.clone(), errors.clone());
            threads.push(std::thread::spawn(move || {
                accept_loop(&listener, &stop, &errors)
            }));
        }
        for socket in sockets {
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (stop, errors) = (stop.clone(), errors.clone());
            threads.push(std::thread::spawn(move || {
                udp_loop(&socket, &stop, &errors)
            }));
        }
        Ok(TrafficServer {
            stop,
            threads,
            errors,
        })
    }

    /// Errors the servers met so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Drop for TrafficServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn note(errors: &Mutex<Vec<String>>, e: String) {
    if let Ok(mut v) = errors.lock() {
        v.push(e);
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, errors: &Mutex<Vec<String>>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = serve_tcp(stream) {
                    note(errors, format!("serving {peer}: {e}"));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                note(errors, format!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_tcp(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut header = [0u8; 16];
    s.read_exact(&mut header)?;
    let (up, down) = header.split_at(8);
    let up = u64::from_be_bytes(up.try_into().unwrap_or_default());
    let down = u64::from_be_bytes(down.try_into().unwrap_or_default());
    let mut buf = vec![0u8; CHUNK];
    let mut left = up;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(CHUNK));
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("client closed with {left} of {up} bytes unsent"),
            ));
        }
        left -= n as u64;
    }
    write_n(&mut s, down, b'd')?;
    s.shutdown(Shutdown::Write)?;
    // Wait for the client's close, so it never sees a reset.
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

fn write_n(s: &mut TcpStream, n: u64, fill: u8) -> std::io::Result<()> {
    let buf = vec![fill; CHUNK];
    let mut left = n;
    while left > 0 {
        let take = buf.len().min(usize::try_from(left).unwrap_or(CHUNK));
        s.write_all(&buf[..take])?;
        left -= take as u64;
    }
    Ok(())
}

fn udp_loop(socket: &UdpSocket, stop: &AtomicBool, errors: &Mutex<Vec<String>>) {
    let mut buf = vec![0u8; 65_536];
    let reply = vec![b'r'; 65_507];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let Some(size) = buf.get(..4).filter(|_| n >= 4) else {
                    note(errors, format!("short UDP request ({n} bytes) from {peer}"));
                    continue;
                };
                let size = u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize;
                if let Err(e) = socket.send_to(&reply[..size.min(reply.len())], peer) {
                    note(errors, format!("UDP reply to {peer}: {e}"));
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                note(errors, format!("UDP receive: {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `count` TCP connections from `ns` to `dst`, one after the other, each
/// sending `up` bytes (plus the 16-byte header) and receiving `down`.
pub fn tcp_connections(
    ns: &Netns,
    dst: SocketAddr,
    count: u64,
    up: u64,
    down: u64,
) -> anyhow::Result<Payload> {
    ns.in_ns(|| -> anyhow::Result<Payload> {
        let mut total = Payload::default();
        let mut buf = vec![0u8; CHUNK];
        for i in 0..count {
            let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)
                .with_context(|| format!("connection {i} to {dst}"))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            let mut header = [0u8; 16];
            header[..8].copy_from_slice(&up.to_be_bytes());
            header[8..].copy_from_slice(&down.to_be_bytes());
            s.write_all(&header)?;
            write_n(&mut s, up, b'u').with_context(|| format!("sending to {dst}"))?;
            let mut got = 0u64;
            loop {
                let n = s
                    .read(&mut buf)
                    .with_context(|| format!("receiving from {dst}"))?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            if got != down {
                bail!("{dst} sent {got} bytes, expected {down}");
            }
            let srtt = srtt_us(&s)?;
            drop(s);
            total.add(Payload {
                to_server: 16 + up,
                to_client: down,
                exchanges: 1,
                lost: 0,
                srtt_sum_us: srtt,
            });
        }
        Ok(total)
    })?
}

/// The kernel's smoothed RTT of `s` (`TCP_INFO`), µs.
fn srtt_us(s: &TcpStream) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain data, all zeros is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from(info.tcpi_rtt))
}

/// One TCP connection from `ns` to `dst` that sends `up` bytes (plus the
/// 16-byte header) in `pieces` parts with `pause` between them, then
/// receives `down`: a transfer that stays open across several intervals.
pub fn tcp_paced(
    ns: &Netns,
    dst: SocketAddr,
    up: u64,
    down: u64,
    pieces: u64,
    pause: Duration,
) -> anyhow::Result<Payload> {
    ns.in_ns(|| -> anyhow::Result<Payload> {
        let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)
            .with_context(|| format!("connecting to {dst}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&up.to_be_bytes());
        header[8..].copy_from_slice(&down.to_be_bytes());
        s.write_all(&header)?;
        let pieces = pieces.max(1);
        for i in 0..pieces {
            if i > 0 {
                std::thread::sleep(pause);
            }
            let part = up / pieces + u64::from(i < up % pieces);
            write_n(&mut s, part, b'u').with_context(|| format!("sending to {dst}"))?;
        }
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        loop {
            let n = s
                .read(&mut buf)
                .with_context(|| format!("receiving from {dst}"))?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        if got != down {
            bail!("{dst} sent {got} bytes, expected {down}");
        }
        Ok(Payload {
            to_server: 16 + up,
            to_client: down,
            exchanges: 1,
            lost: 0,
            srtt_sum_us: srtt_us(&s)?,
        })
    })?
}

/// `count` UDP requests of `up` bytes from `ns` to `dst`, each answered by
/// `down` bytes; waits up to a second for each reply.
pub fn udp_exchange(
    ns: &Netns,
    dst: SocketAddr,
    count: u64,
    up: usize,
    down: usize,
) -> anyhow::Result<Payload> {
    assert!(up >= 4, "a UDP request carries the reply size in 4 bytes");
    ns.in_ns(|| -> anyhow::Result<Payload> {
        let local: SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let s = UdpSocket::bind(local)?;
        s.connect(dst)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut request = vec![b'q'; up];
        request[..4].copy_from_slice(&u32::try_from(down)?.to_be_bytes());
        let mut buf = vec![0u8; 65_536];
        let mut replies = 0u64;
        for _ in 0..count {
            s.send(&request)
                .with_context(|| format!("UDP send to {dst}"))?;
            // A lost request or reply is a timeout here, and counted.
            match s.recv(&mut buf) {
                Ok(n) if n == down => replies += 1,
                Ok(n) => bail!("UDP reply of {n} bytes from {dst}, expected {down}"),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context(format!("UDP receive from {dst}")),
            }
        }
        Ok(Payload {
            to_server: count * up as u64,
            to_client: replies * down as u64,
            exchanges: count,
            lost: count - replies,
            srtt_sum_us: 0,
        })
    })?
}

/// SO_LINGER with a zero timeout: close() then aborts with an RST.
pub fn linger_zero(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connections that fail in each way flowtel reports, sent from the
/// namespace the caller is in (call `run` inside `Netns::in_ns`).
pub struct Failures {
    /// A listening port: one connection to it is aborted with an RST.
    pub reset: SocketAddr,
    /// A closed port, and how many connects it refuses.
    pub refused: (SocketAddr, u64),
    /// A port whose SYNs are dropped: one connect times out after 1 s.
    pub unanswered: SocketAddr,
    /// Where 100-byte UDP datagrams go that a firewall drops, from which
    /// local address, and how many.
    pub udp_dropped: (SocketAddr, SocketAddr, u64),
}

impl Failures {
    /// Returns the connects refused and whether the unanswered one timed
    /// out.
    pub fn run(&self) -> std::io::Result<(u64, bool)> {
        // SO_LINGER 0 makes close() send an RST.
        let s = TcpStream::connect_timeout(&self.reset, IO_TIMEOUT)?;
        linger_zero(&s)?;
        (&s).write_all(&[0u8; 16])?;
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        let (closed, attempts) = self.refused;
        let mut refused = 0;
        for _ in 0..attempts {
            match TcpStream::connect_timeout(&closed, IO_TIMEOUT) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        let timed_out = matches!(
            TcpStream::connect_timeout(&self.unanswered, Duration::from_secs(1)),
            Err(e) if e.kind() == ErrorKind::TimedOut
        );
        let (from, to, datagrams) = self.udp_dropped;
        let udp = UdpSocket::bind(from)?;
        for _ in 0..datagrams {
            // nft drops it in the output hook; the send itself may report
            // EPERM, which is the drop.
            let _ = udp.send_to(&[0u8; 100], to);
        }
        Ok((refused, timed_out))
    }
}
