//! Finding interfaces and attaching the TC programs to them.
//!
//! Everything here runs on the source's own thread, which has entered the
//! configured network namespace: interface names, netlink sockets and TCX
//! link creation all resolve in the calling thread's namespace.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;

use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::Ebpf;

/// Program names in bpf/flow.bpf.c, by L2 kind and hook.
pub const PROGRAMS: [&str; 4] = [
    "flowtel_in_eth",
    "flowtel_out_eth",
    "flowtel_in_ip",
    "flowtel_out_ip",
];

/// clsact filter priority and handle of flowtel's cls_bpf filters: fixed and
/// unusual so they never collide with Cilium (priority 1), Calico or tc's
/// automatic priorities (49152 downwards), and so leftovers are recognisable.
pub const TC_PRIORITY: u16 = 0x0f10;
pub const TC_HANDLE: u32 = 0xf10e;

/// How the programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// TCX links (kernel 6.6+): owned by our file descriptors, gone when
    /// flowtel exits, however it exits.
    Tcx,
    /// clsact qdisc + cls_bpf filters in direct-action mode.
    Clsact,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }
}

/// Where the IP header starts in what TC sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2 {
    /// An Ethernet header first (veth, NICs, bridges, VLANs, vxlan, lo).
    Ethernet,
    /// The IP header first (WireGuard, tun, ipip, sit, gre).
    None,
}

impl L2 {
    fn programs(self) -> (&'static str, &'static str) {
        match self {
            Self::Ethernet => (PROGRAMS[0], PROGRAMS[1]),
            Self::None => (PROGRAMS[2], PROGRAMS[3]),
        }
    }
}

/// A `*`/`?` glob, as used by `interfaces_include`/`interfaces_exclude`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The interfaces of the calling thread's network namespace.
pub fn interfaces() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // freed below with if_freenameindex; names are NUL-terminated.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// The device's L2 kind from its ARPHRD type; `None` for types whose
/// packets we cannot parse (InfiniBand, CAN, ...).
pub fn link_kind(name: &str) -> io::Result<Option<L2>> {
    /// Not in libc: `if_arp.h`'s raw IP (519) and IPv6-in-GRE (823).
    const ARPHRD_RAWIP: u16 = 519;
    const ARPHRD_IP6GRE: u16 = 823;
    let hw = hardware_type(name)?;
    Ok(match hw {
        libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => Some(L2::Ethernet),
        libc::ARPHRD_NONE
        | ARPHRD_RAWIP
        | libc::ARPHRD_TUNNEL
        | libc::ARPHRD_TUNNEL6
        | libc::ARPHRD_SIT
        | libc::ARPHRD_IPGRE
        | ARPHRD_IP6GRE
        | libc::ARPHRD_PPP => Some(L2::None),
        _ => None,
    })
}

fn hardware_type(name: &str) -> io::Result<u16> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    // SAFETY: a plain socket used only for the ioctl and closed right after;
    // ifreq is zeroed and the name is NUL-terminated within IFNAMSIZ.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
        Ok(req.ifr_ifru.ifru_hwaddr.sa_family)
    }
}

/// The OS error behind an aya program error, if there is one.
pub fn os_error(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(s) => s.io_error.raw_os_error(),
        ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
        ProgramError::TcError(t) => tc_os_error(t),
        _ => None,
    }
}

fn tc_os_error(e: &tc::TcError) -> Option<i32> {
    match e {
        tc::TcError::NetlinkError(n) => n.raw_os_error(),
        tc::TcError::IoError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// One attached interface.
struct Attached {
    name: String,
    kind: L2,
    links: Vec<(&'static str, SchedClassifierLinkId)>,
}

/// What a rescan changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanResult {
    pub attached: usize,
    pub detached: usize,
    pub failed: usize,
}

/// The interfaces flowtel is attached to, kept in step with the namespace.
pub struct Attacher {
    mode: Mode,
    /// Whether a TCX failure may switch to clsact (`attach: auto`).
    fallback: bool,
    position: super::AttachPosition,
    include: Vec<String>,
    exclude: Vec<String>,
    attached: HashMap<u32, Attached>,
    /// Interfaces whose attach failed or that cannot be parsed, by
    /// (ifindex, name), so each is reported once rather than every rescan.
    refused: HashSet<(u32, String)>,
}

impl Attacher {
    pub fn new(
        mode: Mode,
        fallback: bool,
        position: super::AttachPosition,
        include: Vec<String>,
        exclude: Vec<String>,
    ) -> Self {
        Self {
            mode,
            fallback,
            position,
            include,
            exclude,
            attached: HashMap::new(),
            refused: HashSet::new(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The attached interfaces: (ifindex, name, L2 header length).
    pub fn interfaces(&self) -> impl Iterator<Item = (u32, &str, u64)> {
        self.attached.iter().map(|(idx, a)| {
            let l2 = match a.kind {
                L2::Ethernet => 14,
                L2::None => 0,
            };
            (*idx, a.name.as_str(), l2)
        })
    }

    pub fn count(&self) -> usize {
        self.attached.len()
    }

    pub fn wanted(&self, name: &str) -> bool {
        self.include.iter().any(|p| glob_match(p, name))
            && !self.exclude.iter().any(|p| glob_match(p, name))
    }

    /// Attaches to new matching interfaces and forgets vanished ones.
    /// Returns an error only when the very mode is unusable (so `start`
    /// can fail clearly); single-interface failures are logged and counted.
    pub fn rescan(&mut self, bpf: &mut Ebpf) -> anyhow::Result<ScanResult> {
        let mut result = ScanResult::default();
        let present =
            interfaces().map_err(|e| anyhow::anyhow!("listing network interfaces: {e}"))?;
        let present_idx: HashSet<u32> = present.iter().map(|(i, _)| *i).collect();

        // Gone, or renamed to something excluded.
        let stale: Vec<u32> = self
            .attached
            .iter()
            .filter(|(idx, a)| {
                !present
                    .iter()
                    .any(|(i, n)| i == *idx && (n == &a.name || self.wanted(n)))
            })
            .map(|(idx, _)| *idx)
            .collect();
        for idx in stale {
            if let Some(a) = self.attached.remove(&idx) {
                let still_there = present_idx.contains(&idx);
                tracing::debug!(interface = %a.name, ifindex = idx, "detaching");
                detach(bpf, a, still_there);
                result.detached += 1;
            }
        }
        self.refused.retain(|(i, _)| present_idx.contains(i));

        for (idx, name) in present {
            if let Some(a) = self.attached.get_mut(&idx) {
                a.name = name; // a rename: TC follows the device, not the name
                continue;
            }
            if !self.wanted(&name) || self.refused.contains(&(idx, name.clone())) {
                continue;
            }
            let kind = match link_kind(&name) {
                Ok(Some(kind)) => kind,
                Ok(None) => {
                    tracing::info!(interface = %name, "not attaching: its link type carries no IP packets flowtel can parse");
                    self.refused.insert((idx, name));
                    continue;
                }
                // Vanished between listing and now.
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => continue,
                Err(e) => {
                    tracing::warn!(interface = %name, "not attaching: cannot read its link type: {e}");
                    self.refused.insert((idx, name));
                    result.failed += 1;
                    continue;
                }
            };
            match self.attach_one(bpf, &name, kind) {
                Ok(links) => {
                    tracing::debug!(interface = %name, ifindex = idx, mode = self.mode.as_str(), "attached");
                    self.attached.insert(idx, Attached { name, kind, links });
                    result.attached += 1;
                }
                Err(AttachError::Unsupported(e))
                    if self.mode == Mode::Tcx && self.fallback && self.attached.is_empty() =>
                {
                    tracing::warn!(
                        "TCX attach is not supported here ({e}); using clsact + cls_bpf filters instead"
                    );
                    self.mode = Mode::Clsact;
                    return self.rescan(bpf).map(|r| ScanResult {
                        detached: r.detached + result.detached,
                        ..r
                    });
                }
                Err(AttachError::Unsupported(e))
                    if self.mode == Mode::Tcx && self.attached.is_empty() =>
                {
                    anyhow::bail!(
                        "the kernel refused a TCX link on {name} ({e}): TCX needs kernel 6.6 or \
                         later; use ebpf.attach: auto or netlink"
                    );
                }
                Err(AttachError::Permission(e)) => {
                    anyhow::bail!(
                        "attaching to {name} was refused ({e}): flowtel needs CAP_NET_ADMIN (and CAP_BPF) \
                         for the eBPF source; grant them, or use source: conntrack"
                    );
                }
                Err(AttachError::Gone) => {}
                Err(AttachError::Unsupported(e) | AttachError::Other(e)) => {
                    tracing::warn!(interface = %name, mode = self.mode.as_str(), "cannot attach: {e}");
                    self.refused.insert((idx, name));
                    result.failed += 1;
                }
            }
        }
        Ok(result)
    }

    fn attach_one(
        &self,
        bpf: &mut Ebpf,
        name: &str,
        kind: L2,
    ) -> Result<Vec<(&'static str, SchedClassifierLinkId)>, AttachError> {
        let (ingress, egress) = kind.programs();
        if self.mode == Mode::Clsact {
            match tc::qdisc_add_clsact(name) {
                Ok(()) => {}
                Err(e) if tc_os_error(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(AttachError::classify(tc_os_error(&e), e.to_string())),
            }
        }
        let mut links = Vec::new();
        for (prog_name, hook) in [
            (ingress, TcAttachType::Ingress),
            (egress, TcAttachType::Egress),
        ] {
            match self.attach_hook(bpf, prog_name, name, hook) {
                Ok(id) => links.push((prog_name, id)),
                Err(e) => {
                    for (p, id) in links {
                        let _ = program(bpf, p)
                            .and_then(|prog| prog.detach(id).map_err(|e| e.to_string()));
                    }
                    return Err(e);
                }
            }
        }
        Ok(links)
    }

    fn attach_hook(
        &self,
        bpf: &mut Ebpf,
        prog_name: &'static str,
        ifname: &str,
        hook: TcAttachType,
    ) -> Result<SchedClassifierLinkId, AttachError> {
        let prog = program(bpf, prog_name).map_err(AttachError::Other)?;
        let options = || match self.mode {
            // First by default: flowtel only observes, so it should see
            // packets before another program redirects or drops them.
            Mode::Tcx => TcAttachOptions::TcxOrder(match self.position {
                super::AttachPosition::First => LinkOrder::first(),
                super::AttachPosition::Last => LinkOrder::last(),
            }),
            Mode::Clsact => TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIORITY,
                handle: TcHandle::from(TC_HANDLE),
                classid: None,
            }),
        };
        match prog.attach_with_options(ifname, hook, options()) {
            Ok(id) => Ok(id),
            Err(e) if self.mode == Mode::Clsact && os_error(&e) == Some(libc::EEXIST) => {
                // Our priority and handle are taken: a filter left by a
                // flowtel that did not exit cleanly. Remove filters with
                // flowtel's program names only, then try once more.
                let mut removed = false;
                for name in PROGRAMS {
                    removed |= tc::qdisc_detach_program(ifname, hook, name).is_ok();
                }
                if !removed {
                    return Err(AttachError::Other(format!(
                        "tc priority {TC_PRIORITY} handle {TC_HANDLE:#x} is used by a filter that is \
                         not flowtel's; leaving it alone"
                    )));
                }
                tracing::info!(
                    interface = ifname,
                    "replaced a clsact filter left by an earlier flowtel"
                );
                let prog = program(bpf, prog_name).map_err(AttachError::Other)?;
                prog.attach_with_options(ifname, hook, options())
                    .map_err(|e| AttachError::classify(os_error(&e), e.to_string()))
            }
            Err(e) => Err(AttachError::classify(os_error(&e), e.to_string())),
        }
    }

    /// Detaches everything (flowtel's own links and filters only).
    pub fn detach_all(&mut self, bpf: &mut Ebpf) {
        for (_, a) in std::mem::take(&mut self.attached) {
            detach(bpf, a, true);
        }
    }
}

fn program<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, String> {
    bpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?
        .try_into()
        .map_err(|e: ProgramError| format!("program {name}: {e}"))
}

fn detach(bpf: &mut Ebpf, a: Attached, report: bool) {
    for (prog_name, id) in a.links {
        let result = program(bpf, prog_name).and_then(|p| p.detach(id).map_err(|e| e.to_string()));
        if let Err(e) = result {
            // A vanished device took its filters and links with it.
            if report {
                tracing::warn!(interface = %a.name, "detaching {prog_name}: {e}");
            }
        }
    }
}

#[derive(Debug)]
enum AttachError {
    /// The kernel does not know the attach type (TCX before 6.6).
    Unsupported(String),
    Permission(String),
    /// The interface vanished meanwhile.
    Gone,
    Other(String),
}

impl AttachError {
    fn classify(errno: Option<i32>, msg: String) -> Self {
        match errno {
            Some(libc::EINVAL | libc::EOPNOTSUPP) => Self::Unsupported(msg),
            Some(libc::EPERM | libc::EACCES) => Self::Permission(msg),
            Some(libc::ENODEV | libc::ENXIO) => Self::Gone,
            _ => Self::Other(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "eth0"));
        assert!(glob_match("veth*", "veth1a2b"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("e?h0", "eth0"));
        assert!(glob_match("lo", "lo"));
        assert!(!glob_match("lo", "lo0"));
        assert!(glob_match("*0", "eth0"));
        assert!(glob_match("c*i*0", "cni0"));
        assert!(!glob_match("", "x"));
        assert!(glob_match("", ""));
    }

    #[test]
    fn include_minus_exclude() {
        let a = Attacher::new(
            Mode::Tcx,
            true,
            super::super::AttachPosition::First,
            vec!["*".into()],
            vec!["lo".into(), "docker*".into()],
        );
        assert!(a.wanted("eth0"));
        assert!(!a.wanted("lo"));
        assert!(!a.wanted("docker0"));
    }
}
