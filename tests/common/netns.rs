//! Throwaway network namespaces joined by veth pairs.
//!
//! [`NetnsGuard`] creates uniquely named namespaces (`ft-<pid>-<n>-<suffix>`,
//! so tests can run in parallel), and on drop, also during a panic, kills the
//! processes it started, deletes the nftables tables it added and deletes
//! the namespaces.
//!
//! The links are made quiet so that their interface counters hold only the
//! test's own traffic: no IPv6 link-local address (so no router
//! solicitations or DAD), permanent neighbour entries (so no ARP or
//! neighbour discovery), and MLD reports dropped before they leave.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};
use nix::sched::{setns, CloneFlags};

use super::Prerequisites;

/// One namespace (a cheap handle; the [`NetnsGuard`] owns its lifetime).
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
    ip: PathBuf,
    nft: PathBuf,
}

/// Interface counters, as `/sys/class/net/IF/statistics` shows them (L2
/// bytes: each packet's 14-byte Ethernet header included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

impl IfStats {
    /// The counters accumulated since `earlier`.
    pub fn since(&self, earlier: &IfStats) -> IfStats {
        IfStats {
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            rx_dropped: self.rx_dropped.saturating_sub(earlier.rx_dropped),
            tx_dropped: self.tx_dropped.saturating_sub(earlier.tx_dropped),
        }
    }

    /// Sent L3 bytes (IP header included, Ethernet header excluded): what
    /// conntrack counts.
    pub fn tx_l3_bytes(&self) -> u64 {
        self.tx_bytes.saturating_sub(14 * self.tx_packets)
    }

    pub fn rx_l3_bytes(&self) -> u64 {
        self.rx_bytes.saturating_sub(14 * self.rx_packets)
    }
}

impl Netns {
    /// The path flowtel's `--netns` takes.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// `program args...` inside the namespace (`ip netns exec`), which also
    /// gives it the namespace's view of `/sys`.
    pub fn command(&self, program: impl AsRef<Path>, args: &[&str]) -> Command {
        let mut c = Command::new(&self.ip);
        c.args(["netns", "exec", &self.name])
            .arg(program.as_ref())
            .args(args);
        c
    }

    /// Runs a command inside the namespace; its stdout, or an error with its
    /// stderr.
    pub fn run(&self, program: impl AsRef<Path>, args: &[&str]) -> anyhow::Result<String> {
        let program = program.as_ref();
        let out = self
            .command(program, args)
            .output()
            .with_context(|| format!("running {} in {}", program.display(), self.name))?;
        if !out.status.success() {
            bail!(
                "`{} {}` in namespace {} failed ({}): {}",
                program.display(),
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n NAME args...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.ip)
            .args(["-n", &self.name])
            .args(args)
            .output()
            .with_context(|| format!("running ip -n {}", self.name))?;
        if !out.status.success() {
            bail!(
                "`ip -n {} {}` failed ({}): {}",
                self.name,
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Loads an nftables ruleset (`nft -f -`) inside the namespace.
    pub fn nft_load(&self, ruleset: &str) -> anyhow::Result<()> {
        let mut child = self
            .command(&self.nft, &["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning nft in {}", self.name))?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())
            .context("writing the ruleset to nft")?;
        let out = child.wait_with_output().context("waiting for nft")?;
        if !out.status.success() {
            bail!(
                "nft in {} rejected the ruleset ({}): {}\n{ruleset}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created
    /// there belong to the namespace for good, whichever thread uses them.
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        let name = &self.name;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> anyhow::Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering namespace {name}"))?;
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Writes a sysctl of this namespace (`net.netfilter.x` as dotted key)
    /// and reads it back.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let written = self.in_ns(|| -> std::io::Result<String> {
            std::fs::write(&path, format!("{value}\n"))?;
            std::fs::read_to_string(&path)
        })?;
        let written = written.with_context(|| format!("sysctl {key}={value} in {}", self.name))?;
        if written.trim() != value {
            bail!(
                "sysctl {key} in {} reads {:?} after writing {value:?}",
                self.name,
                written.trim()
            );
        }
        Ok(())
    }

    /// Reads a sysctl of this namespace.
    pub fn read_sysctl(&self, key: &str) -> anyhow::Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let text = self.in_ns(|| std::fs::read_to_string(&path))?;
        Ok(text
            .with_context(|| format!("reading {path} in {}", self.name))?
            .trim()
            .to_string())
    }

    /// The counters of interface `ifname` in this namespace.
    pub fn if_stats(&self, ifname: &str) -> anyhow::Result<IfStats> {
        let names = [
            "rx_bytes",
            "rx_packets",
            "tx_bytes",
            "tx_packets",
            "rx_dropped",
            "tx_dropped",
        ];
        let files: Vec<String> = names
            .iter()
            .map(|n| format!("/sys/class/net/{ifname}/statistics/{n}"))
            .collect();
        let args: Vec<&str> = files.iter().map(String::as_str).collect();
        let out = self.run("cat", &args)?;
        let values: Vec<u64> = out
            .split_whitespace()
            .map(|v| {
                v.parse::<u64>()
                    .with_context(|| format!("counter {v:?} of {ifname} in {}", self.name))
            })
            .collect::<anyhow::Result<_>>()?;
        let [rx_bytes, rx_packets, tx_bytes, tx_packets, rx_dropped, tx_dropped] = values[..]
        else {
            bail!(
                "expected 6 counters of {ifname} in {}, got {out:?}",
                self.name
            );
        };
        Ok(IfStats {
            rx_bytes,
            rx_packets,
            tx_bytes,
            tx_packets,
            rx_dropped,
            tx_dropped,
        })
    }
}

/// Addresses of one end of a veth pair.
#[derive(Debug, Clone)]
pub struct VethEnd {
    pub ifname: String,
    pub mac: String,
    /// With prefix length, e.g. `198.18.0.1/24`.
    pub v4: String,
    /// With prefix length, e.g. `fd00::1/64` (added with `nodad`).
    pub v6: String,
}

impl VethEnd {
    pub fn v4_addr(&self) -> &str {
        self.v4.split('/').next().unwrap_or(&self.v4)
    }

    pub fn v6_addr(&self) -> &str {
        self.v6.split('/').next().unwrap_or(&self.v6)
    }
}

/// Owns namespaces, nftables tables and processes; removes them on drop.
pub struct NetnsGuard {
    prefix: String,
    ip: PathBuf,
    nft: PathBuf,
    namespaces: Vec<String>,
    /// (namespace, family, table)
    tables: Vec<(Netns, String, String)>,
    children: Vec<Child>,
}

impl NetnsGuard {
    pub fn new(tools: &Prerequisites) -> NetnsGuard {
        static N: AtomicU32 = AtomicU32::new(0);
        NetnsGuard {
            prefix: format!(
                "ft-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            ip: tools.ip.clone(),
            nft: tools.nft.clone(),
            namespaces: Vec::new(),
            tables: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Creates namespace `<prefix>-<suffix>` with `lo` up and MLD reports
    /// and router solicitations dropped on output.
    pub fn add(&mut self, suffix: &str) -> anyhow::Result<Netns> {
        let name = format!("{}-{suffix}", self.prefix);
        let out = Command::new(&self.ip)
            .args(["netns", "add", &name])
            .output()
            .context("running ip netns add")?;
        if !out.status.success() {
            bail!(
                "ip netns add {name} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.namespaces.push(name.clone());
        let ns = Netns {
            name,
            ip: self.ip.clone(),
            nft: self.nft.clone(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        self.nft(
            &ns,
            "inet",
            "ft_quiet",
            "chain out {\n  type filter hook output priority 10; policy accept;\n  \
             icmpv6 type { mld-listener-report, mld2-listener-report, nd-router-solicit } drop\n}",
        )?;
        Ok(ns)
    }

    /// Adds nftables table `family name { body }` in `ns`, deleted on drop.
    pub fn nft(&mut self, ns: &Netns, family: &str, name: &str, body: &str) -> anyhow::Result<()> {
        ns.nft_load(&format!("table {family} {name} {{\n{body}\n}}\n"))?;
        self.tables
            .push((ns.clone(), family.to_string(), name.to_string()));
        Ok(())
    }

    /// Joins `a` and `b` with a veth pair: addresses, permanent neighbour
    /// entries, no link-local addresses, both ends up.
    pub fn veth(&mut self, a: &Netns, ea: &VethEnd, b: &Netns, eb: &VethEnd) -> anyhow::Result<()> {
        a.ip(&[
            "link", "add", &ea.ifname, "address", &ea.mac, "type", "veth", "peer", "name",
            &eb.ifname, "address", &eb.mac, "netns", &b.name,
        ])?;
        for (ns, me, peer) in [(a, ea, eb), (b, eb, ea)] {
            ns.ip(&["link", "set", "dev", &me.ifname, "addrgenmode", "none"])?;
            ns.ip(&["addr", "add", &me.v4, "dev", &me.ifname])?;
            ns.ip(&["-6", "addr", "add", &me.v6, "dev", &me.ifname, "nodad"])?;
            for addr in [peer.v4_addr(), peer.v6_addr()] {
                ns.ip(&[
                    "neigh",
                    "replace",
                    addr,
                    "lladdr",
                    &peer.mac,
                    "dev",
                    &me.ifname,
                    "nud",
                    "permanent",
                ])?;
            }
        }
        for (ns, me) in [(a, ea), (b, eb)] {
            ns.ip(&["link", "set", "dev", &me.ifname, "up"])?;
        }
        Ok(())
    }

    /// Makes the kernel track connections in `ns` (an nftables table with a
    /// `ct state` rule), with byte and packet accounting on.
    pub fn enable_conntrack(&mut self, ns: &Netns) -> anyhow::Result<()> {
        self.nft(
            ns,
            "inet",
            "ft_conntrack",
            "chain out {\n  type filter hook output priority 0; policy accept;\n  \
             ct state established,related accept\n}\n\
             chain in {\n  type filter hook input priority 0; policy accept;\n  \
             ct state established,related accept\n}",
        )?;
        ns.sysctl("net.netfilter.nf_conntrack_acct", "1")
    }

    /// Starts `program args...` inside `ns`; it is killed on drop.
    pub fn spawn(
        &mut self,
        ns: &Netns,
        program: impl AsRef<Path>,
        args: &[&str],
    ) -> anyhow::Result<u32> {
        self.spawn_command(ns, ns.command(program.as_ref(), args))
    }

    /// [`NetnsGuard::spawn`] with stdout and stderr discarded, for a chatty
    /// server such as `iperf3 -s`.
    pub fn spawn_quiet(
        &mut self,
        ns: &Netns,
        program: impl AsRef<Path>,
        args: &[&str],
    ) -> anyhow::Result<u32> {
        let mut command = ns.command(program.as_ref(), args);
        command.stdout(Stdio::null()).stderr(Stdio::null());
        self.spawn_command(ns, command)
    }

    fn spawn_command(&mut self, ns: &Netns, mut command: Command) -> anyhow::Result<u32> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {command:?} in {}", ns.name))?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (ns, family, table) in self.tables.drain(..).rev() {
            let _ = ns
                .command(&self.nft, &["delete", "table", &family, &table])
                .stderr(Stdio::null())
                .status();
        }
        for name in self.namespaces.drain(..).rev() {
            match Command::new(&self.ip)
                .args(["netns", "del", &name])
                .output()
            {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "warning: ip netns del {name}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("warning: ip netns del {name}: {e}"),
            }
        }
    }
}
