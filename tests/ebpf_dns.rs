//! DNS tracking on the real kernel (root needed): dnsmasq (Debian) serves in
//! namespace B, dig and the libc resolver (`getent`) ask from namespace A,
//! and the source attached to A's veth must report exactly the lookups the
//! clients made, by RCODE, type and transport, each with the latency dig
//! measured within 1 ms. Malformed messages sent by the test are counted as
//! parse errors and leave the next query's record intact.

mod common;

use std::collections::HashMap;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::dns::{self, compression_loop, query, question, DIG, DNSMASQ, GETENT};
use common::scenario::{Lab, A_V4, A_V6, B_V4, B_V6, IF_A};
use flowtel::flow::dns::{DnsOutcome, DnsRecord};
use flowtel::flow::{SourceEvent, Transport};
use flowtel::source::ebpf::{self, dns::DnsConfig, EbpfConfig};
use flowtel::source::kernel::KernelStats;
use tokio::sync::mpsc;

/// B's address that drops DNS (the "server that never answers").
const DEAD_V4: &str = "198.18.0.3";
const DEAD_V6: &str = "fd00::3";
/// How long the source waits for a response (`ebpf.dns.timeout`).
const TIMEOUT: Duration = Duration::from_secs(1);

/// What one dig from A printed: the RCODE mnemonic, `None` without a
/// response.
fn dig(lab: &Lab, dig: &Path, server: &str, name: &str, qtype: &str, tcp: bool) -> Option<String> {
    dns::dig(&lab.a, dig, server, name, qtype, tcp)
}

/// Records until `want` arrived (or 30 s passed).
fn collect(rx: &mut mpsc::Receiver<SourceEvent>, want: usize) -> Vec<DnsRecord> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        match rx.try_recv() {
            Ok(SourceEvent::Dns(r)) => out.push(r),
            Ok(_) => {}
            Err(mpsc::error::TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(5)),
            Err(mpsc::error::TryRecvError::Disconnected) => panic!("the source went away"),
        }
    }
    out
}

/// One A query from A with the test's own client, timed from just before
/// the send to the response's arrival as the kernel stamped it (dig
/// reports whole milliseconds of a 4 ms clock here, and a client woken late
/// on a loaded machine would measure its own delay). Over TCP the
/// connection is made first: the handshake is not part of the query.
fn timed_query(lab: &Lab, server: &str, name: &str, id: u16, tcp: bool) -> Duration {
    let server: std::net::IpAddr = server.parse().expect("literal address");
    let msg = query(id, 1, &question(name, 1));
    let result = lab
        .a
        .in_ns(|| -> std::io::Result<Duration> {
            let mut buf = [0u8; 1500];
            if tcp {
                use std::io::Write;
                let mut s = std::net::TcpStream::connect((server, 53))?;
                stamp_receptions(s.as_raw_fd())?;
                let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&msg);
                let t0 = SystemTime::now();
                s.write_all(&framed)?;
                let (n, at) = recv_stamped(s.as_raw_fd(), &mut buf)?;
                assert!(n > 4 && buf[2..4] == id.to_be_bytes(), "bad TCP response");
                Ok(at.duration_since(t0).unwrap_or_default())
            } else {
                let bind: std::net::IpAddr = if server.is_ipv4() { A_V4 } else { A_V6 }
                    .parse()
                    .expect("literal address");
                let s = UdpSocket::bind((bind, 0))?;
                s.connect((server, 53))?;
                stamp_receptions(s.as_raw_fd())?;
                let t0 = SystemTime::now();
                s.send(&msg)?;
                let (n, at) = recv_stamped(s.as_raw_fd(), &mut buf)?;
                assert!(n > 2 && buf[..2] == id.to_be_bytes(), "bad UDP response");
                Ok(at.duration_since(t0).unwrap_or_default())
            }
        })
        .expect("entering A");
    result.expect("a timed query")
}

/// Asks the kernel to stamp each received packet with its arrival time
/// (`SO_TIMESTAMPNS`), so a client that a loaded machine wakes late still
/// measures the latency the wire saw.
fn stamp_receptions(fd: RawFd) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One `recvmsg` into `buf`: the bytes read and the kernel's arrival time.
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, SystemTime)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers of the lengths it gives.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel filled msg_control; the CMSG macros walk within it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is a header inside msg_control (see above).
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS {
            // SAFETY: SCM_TIMESTAMPNS carries a struct timespec.
            let ts: libc::timespec =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
            let at = SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
            return Ok((n as usize, at));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Err(std::io::Error::other("no SCM_TIMESTAMPNS on the response"))
}

#[test]
fn dns_lookups_are_reported_exactly() {
    let Some((base, found)) = common::prerequisites_with(
        "dns_lookups_are_reported_exactly",
        &[DNSMASQ, DIG, GETENT],
        &common::ebpf_conditions(),
    ) else {
        return;
    };
    let [dnsmasq, dig_bin, getent]: [PathBuf; 3] = found.try_into().expect("three tools");
    let mut lab = Lab::new(&base).expect("setting up namespaces A and B");
    lab.b
        .ip(&["addr", "add", &format!("{DEAD_V4}/32"), "dev", "ftB"])
        .expect("adding the dead v4 address");
    lab.b
        .ip(&[
            "-6",
            "addr",
            "add",
            &format!("{DEAD_V6}/128"),
            "dev",
            "ftB",
            "nodad",
        ])
        .expect("adding the dead v6 address");
    lab.a
        .ip(&["route", "add", &format!("{DEAD_V4}/32"), "via", B_V4])
        .expect("route to the dead v4 address");
    lab.a
        .ip(&["-6", "route", "add", &format!("{DEAD_V6}/128"), "via", B_V6])
        .expect("route to the dead v6 address");
    let (b, guard) = (lab.b.clone(), &mut lab.guard);
    guard
        .nft(
            &b,
            "inet",
            "ft_dead",
            &format!(
                "chain in {{\n  type filter hook input priority 0; policy accept;\n  \
                 ip daddr {DEAD_V4} udp dport 53 drop\n  ip6 daddr {DEAD_V6} udp dport 53 drop\n}}"
            ),
        )
        .expect("the dropping server");
    let known = ["alpha", "bravo", "charlie"];
    let records: Vec<String> = known
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n}.known.test,198.51.100.{},2001:db8::{}", i + 1, i + 1))
        .collect();
    let args = dns::dnsmasq_args(&[B_V4, B_V6], "/test/", &records);
    dns::start_dnsmasq(
        guard,
        &b,
        &lab.a,
        (&dnsmasq, &dig_bin),
        &args,
        (B_V4, "alpha.known.test"),
    );

    let (tx, mut rx) = mpsc::channel(65_536);
    let cfg = EbpfConfig {
        interfaces_include: vec![IF_A.into()],
        netns: Some(lab.a.path()),
        dns: DnsConfig {
            timeout: TIMEOUT,
            ..DnsConfig::default()
        },
        ..EbpfConfig::default()
    };
    let handle =
        ebpf::start(&cfg, Arc::new(KernelStats::default()), tx).expect("starting the source");
    let stats = handle.stats();

    // (transport, server, rcode or None for a timeout, qtype) → count, and
    // dig's latency per name.
    let mut expected: HashMap<(Transport, String, Option<u8>, u16), u64> = HashMap::new();
    // The test's own client's latency per (transport, id).
    let mut measured: HashMap<(Transport, u16), Duration> = HashMap::new();
    let mut total = 0usize;
    for (server, dead) in [(B_V4, DEAD_V4), (B_V6, DEAD_V6)] {
        for tcp in [false, true] {
            let t = if tcp { Transport::Tcp } else { Transport::Udp };
            let tag = format!(
                "{}{}",
                if tcp { "t" } else { "u" },
                if server == B_V4 { 4 } else { 6 }
            );
            for (qtype, code) in [("A", 1u16), ("AAAA", 28)] {
                for n in known {
                    let name = format!("{n}.known.test");
                    let d = dig(&lab, &dig_bin, server, &name, qtype, tcp);
                    assert_eq!(d.as_deref(), Some("NOERROR"), "{name} {qtype} {tag}");
                    *expected
                        .entry((t, server.into(), Some(0), code))
                        .or_default() += 1;
                    total += 1;
                }
                for i in 0..2 {
                    let name = format!("missing{i}.{tag}.test");
                    let d = dig(&lab, &dig_bin, server, &name, qtype, tcp);
                    assert_eq!(d.as_deref(), Some("NXDOMAIN"), "{name}");
                    *expected
                        .entry((t, server.into(), Some(3), code))
                        .or_default() += 1;
                    total += 1;
                }
            }
            for (i, n) in known.iter().enumerate() {
                let id = 0x7000 + (measured.len() * 8 + i) as u16;
                let took = timed_query(&lab, server, &format!("{n}.known.test"), id, tcp);
                measured.insert((t, id), took);
                *expected.entry((t, server.into(), Some(0), 1)).or_default() += 1;
                total += 1;
            }
            // TCP to a server that drops: no connection, hence no query.
            if !tcp {
                for i in 0..2 {
                    let d = dig(&lab, &dig_bin, dead, &format!("lost{i}.test"), "A", false);
                    assert!(d.is_none(), "the dead server answered");
                    *expected.entry((t, dead.into(), None, 1)).or_default() += 1;
                    total += 1;
                }
            }
        }
    }
    // The libc resolver: one A query per name.
    let resolv = format!("/etc/netns/{}", lab.a.name);
    std::fs::create_dir_all(&resolv).expect("creating /etc/netns/A");
    std::fs::write(
        format!("{resolv}/resolv.conf"),
        format!("nameserver {B_V4}\noptions attempts:1 timeout:1\n"),
    )
    .expect("writing A's resolv.conf");
    for n in known {
        let out = lab
            .a
            .run(&getent, &["ahostsv4", &format!("{n}.known.test")])
            .expect("getent");
        assert!(out.contains("198.51.100."), "getent: {out}");
        *expected
            .entry((Transport::Udp, B_V4.into(), Some(0), 1))
            .or_default() += 1;
        total += 1;
    }
    let _ = std::fs::remove_dir_all(&resolv);

    let records = collect(&mut rx, total);
    let mut got: HashMap<(Transport, String, Option<u8>, u16), u64> = HashMap::new();
    for r in &records {
        let rcode = match r.outcome {
            DnsOutcome::Answered { rcode, latency } => {
                if let Some(took) = measured.remove(&(r.transport, r.id)) {
                    let (ours, client) = (latency.as_secs_f64() * 1e3, took.as_secs_f64() * 1e3);
                    println!(
                        "{:?} {} {}: flowtel {ours:.3} ms, client {client:.3} ms",
                        r.transport, r.server.ip, r.name
                    );
                    assert!(
                        (ours - client).abs() <= 1.0,
                        "{}: flowtel {ours:.3} ms, client {client:.3} ms",
                        r.name
                    );
                }
                Some(rcode)
            }
            DnsOutcome::Timeout => None,
        };
        assert_eq!(r.client.ip.is_ipv4(), r.server.ip.is_ipv4());
        let client = if r.client.ip.is_ipv4() { A_V4 } else { A_V6 };
        assert_eq!(r.client.ip.to_string(), client);
        *got.entry((r.transport, r.server.ip.to_string(), rcode, r.qtype))
            .or_default() += 1;
    }
    let mut rows: Vec<_> = expected.iter().collect();
    rows.sort_by_key(|(k, _)| format!("{k:?}"));
    for (k, n) in &rows {
        println!(
            "{k:?}: expected {n}, flowtel {}",
            got.get(k).copied().unwrap_or(0)
        );
    }
    assert_eq!(got, expected, "lookups by transport, server, rcode, type");
    assert!(
        measured.is_empty(),
        "timed queries without a record: {measured:?}"
    );

    // Malformed queries: a compression loop, a name running past the end,
    // a bogus question count; then a good query from the same port with the
    // same id.
    let errors = || {
        stats.dns.parse_errors.load(Ordering::Relaxed)
            + stats.dns.kernel_parse_errors.load(Ordering::Relaxed)
    };
    let before = errors();
    let socket = lab
        .a
        .in_ns(|| UdpSocket::bind((A_V4, 0)))
        .expect("entering A")
        .expect("binding in A");
    socket.connect((B_V4, 53)).expect("connecting");
    // One at a time: they share port and id, and a query whose key is
    // still pending (no answer or timeout yet) is not recorded again.
    for (i, bad) in [
        compression_loop(9),
        query(9, 1, &[9, b'a', b'b']),
        query(9, 40, &[1, b'x', 0, 0, 1, 0, 1]),
    ]
    .iter()
    .enumerate()
    {
        socket.send(bad).expect("sending a malformed query");
        let deadline = Instant::now() + 3 * TIMEOUT + Duration::from_secs(5);
        while errors() < before + i as u64 + 1 {
            assert!(
                Instant::now() < deadline,
                "malformed query {} not counted: {} of {} counted",
                i + 1,
                errors() - before,
                i + 1
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    socket
        .send(&query(9, 1, &question("good.test", 1)))
        .expect("sending the good query");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut good = None;
    while good.is_none() {
        assert!(Instant::now() < deadline, "no record of the good query");
        good = collect(&mut rx, 1).into_iter().find(|r| r.id == 9);
    }
    let good = good.expect("the good query");
    assert_eq!(&*good.name, "good.test");
    assert_eq!(good.qtype, 1);
    assert!(matches!(
        good.outcome,
        DnsOutcome::Answered { rcode: 3, .. }
    ));
    println!(
        "parse errors: {} (kernel {}), map full {}, ring full {}",
        stats.dns.parse_errors.load(Ordering::Relaxed),
        stats.dns.kernel_parse_errors.load(Ordering::Relaxed),
        stats.dns.map_full.load(Ordering::Relaxed),
        stats.dns.ring_full.load(Ordering::Relaxed)
    );
    assert_eq!(stats.dns.map_full.load(Ordering::Relaxed), 0);
    handle.stop();
}
