//! Shared harness of flowtel's end-to-end tests: throwaway network
//! namespaces, traffic of known size, a test-side OTLP receiver, a real
//! collector (rotel) and the flowtel binary itself.
//!
//! Every external program is looked up the same way ([`find_tool`]): an
//! environment variable naming its path, then `PATH`, then known install
//! locations. When something a test needs is missing (a tool, or root), the
//! test goes through [`skip`]: it fails if `CI` is set, and otherwise says
//! why on stderr and in `$TEST_SKIP_LOG` and returns without checking
//! anything, which `scripts/test.sh` then counts as skipped, not passed.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]

pub mod cni;
pub mod delayline;
pub mod dns;
pub mod flowtel;
pub mod histogram;
pub mod kubeapi;
pub mod mesh;
pub mod netns;
pub mod otlp_receiver;
pub mod rotel;
pub mod router;
pub mod scenario;
pub mod traffic;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// An external program a test runs.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// The program name looked up on `PATH`.
    pub name: &'static str,
    /// The environment variable that may name its path.
    pub env: &'static str,
    /// Further places to look when it is not on `PATH`.
    pub fallbacks: &'static [&'static str],
}

pub const IP: Tool = Tool {
    name: "ip",
    env: "IP_BIN",
    fallbacks: &["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"],
};
pub const NFT: Tool = Tool {
    name: "nft",
    env: "NFT_BIN",
    fallbacks: &["/usr/sbin/nft", "/sbin/nft"],
};
pub const ROTEL_AGENT: Tool = Tool {
    name: "rotel-agent",
    env: "ROTEL_AGENT",
    fallbacks: &["/opt/flowtel-venv/lib/python3.11/site-packages/rotel/rotel-agent"],
};
pub const IPERF3: Tool = Tool {
    name: "iperf3",
    env: "IPERF3_BIN",
    fallbacks: &["/usr/bin/iperf3"],
};
pub const BPFTOOL: Tool = Tool {
    name: "bpftool",
    env: "BPFTOOL_BIN",
    fallbacks: &["/usr/sbin/bpftool", "/sbin/bpftool"],
};
pub const TC: Tool = Tool {
    name: "tc",
    env: "TC_BIN",
    fallbacks: &["/usr/sbin/tc", "/sbin/tc"],
};

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `tool`: `$ENV` (which must then be an executable file), else the
/// first executable `name` on `PATH`, else the first existing fallback.
pub fn find_tool(tool: &Tool) -> Result<PathBuf, String> {
    if let Some(value) = std::env::var_os(tool.env).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&value);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "${} is {} which is not an executable file",
                tool.env,
                path.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(tool.name))
        .find(|p| is_executable(p));
    if let Some(p) = on_path {
        return Ok(p);
    }
    tool.fallbacks
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            format!(
                "`{}` was not found (set ${} to its path, or put it on PATH)",
                tool.name, tool.env
            )
        })
}

/// What a test needs from the machine, resolved once.
#[derive(Debug, Clone)]
pub struct Prerequisites {
    pub ip: PathBuf,
    pub nft: PathBuf,
    pub rotel: Option<PathBuf>,
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// The one way a test skips itself because something it needs is missing
/// (root, a tool, an eBPF build); the caller returns right after.
///
/// * Under `CI` (set and not empty) it panics with `why`: CI must never pass
///   a test that checked nothing.
/// * Otherwise it writes `SKIPPED <test>: <why>` straight to the process's
///   stderr (not `eprintln!`, which libtest captures and hides when the test
///   passes) and appends the same line to the file named by
///   `$TEST_SKIP_LOG`, if set, so `scripts/test.sh` reports the test as
///   skipped instead of passed (libtest has no runtime skip). Failing to
///   append is a panic: the skip would otherwise pass unnoticed.
pub fn skip(test: &str, why: &str) {
    assert!(!in_ci(), "{test}: prerequisites missing under CI: {why}");
    let line = format!("SKIPPED {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("TEST_SKIP_LOG").filter(|p| !p.is_empty()) {
        // One write of one short line to an O_APPEND file: lines of tests
        // running in parallel (threads or binaries) do not interleave.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .unwrap_or_else(|e| {
                panic!(
                    "{test}: cannot record the skip in $TEST_SKIP_LOG ({}): {e}",
                    Path::new(&path).display()
                )
            });
    }
}

/// Checks root and the tools; `None` means "skip" (after [`skip`] said
/// why). Under `CI` a missing prerequisite is a failure instead.
pub fn prerequisites(test: &str, with_rotel: bool) -> Option<Prerequisites> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("not running as root (network namespaces need it)".to_string());
    }
    let mut get = |tool: &Tool| match find_tool(tool) {
        Ok(p) => Some(p),
        Err(e) => {
            missing.push(e);
            None
        }
    };
    let ip = get(&IP);
    let nft = get(&NFT);
    let rotel = if with_rotel { get(&ROTEL_AGENT) } else { None };
    for module in ["/proc/sys/net/netfilter/nf_conntrack_acct"] {
        if !Path::new(module).exists() {
            missing.push(format!(
                "{module} does not exist (load nf_conntrack: `modprobe nf_conntrack`)"
            ));
        }
    }
    if !missing.is_empty() {
        skip(test, &missing.join("; "));
        return None;
    }
    Some(Prerequisites {
        ip: ip?,
        nft: nft?,
        rotel,
    })
}

/// [`prerequisites`] plus `extra` tools and `conditions` (met, or why
/// not); the tools are returned in the order asked.
pub fn prerequisites_with(
    test: &str,
    extra: &[Tool],
    conditions: &[(bool, &str)],
) -> Option<(Prerequisites, Vec<PathBuf>)> {
    let tools = prerequisites(test, false)?;
    let mut missing = Vec::new();
    let mut found = Vec::new();
    for tool in extra {
        match find_tool(tool) {
            Ok(p) => found.push(p),
            Err(e) => missing.push(e),
        }
    }
    for (ok, why) in conditions {
        if !ok {
            missing.push(why.to_string());
        }
    }
    if !missing.is_empty() {
        skip(test, &missing.join("; "));
        return None;
    }
    Some((tools, found))
}

/// What the eBPF source needs from the build and the kernel, as conditions
/// for [`prerequisites_with`].
pub fn ebpf_conditions() -> [(bool, &'static str); 2] {
    [
        (
            ::flowtel::source::ebpf::built_with_ebpf(),
            "flowtel was built without eBPF support (clang or libbpf-dev missing)",
        ),
        (
            Path::new("/sys/kernel/btf/vmlinux").exists(),
            "the kernel has no BTF (/sys/kernel/btf/vmlinux)",
        ),
    ]
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .expect("bind an ephemeral port on 127.0.0.1");
    l.local_addr().expect("local address of the probe").port()
}

/// Waits until `ready()` is true, polling every `every`; false on timeout.
pub fn wait_until(timeout: Duration, every: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Removes ANSI colour sequences (`ESC [ ... m`) from log text.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `|actual - expected| <= tolerance * expected`.
pub fn within(actual: u64, expected: u64, tolerance: f64) -> bool {
    (actual as f64 - expected as f64).abs() <= tolerance * expected as f64
}

/// Relative deviation in percent, for messages.
/// `timeout` times `FLOWTEL_TEST_SLOW` (default 1): the kernel matrix's
/// emulated CPUs (bench/kernel_matrix.sh) start flowtel many times slower.
pub fn slow(timeout: std::time::Duration) -> std::time::Duration {
    let factor: u32 = std::env::var("FLOWTEL_TEST_SLOW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    timeout * factor.max(1)
}

pub fn deviation_pct(actual: u64, expected: u64) -> f64 {
    if expected == 0 {
        return if actual == 0 { 0.0 } else { f64::INFINITY };
    }
    (actual as f64 - expected as f64) / expected as f64 * 100.0
}
