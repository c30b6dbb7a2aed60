//! Entering another network namespace, shared by the sources: a thread that
//! has entered it reads that namespace's conntrack table and interfaces.

use std::fs::File;
use std::path::Path;

use anyhow::anyhow;
use nix::sched::{setns, CloneFlags};

/// Moves the calling thread into `ns` (if any). `key` names the setting
/// (e.g. `conntrack.netns`) so the error says what to fix.
pub fn enter(ns: Option<&File>, path: Option<&Path>, key: &str) -> anyhow::Result<()> {
    let Some(ns) = ns else { return Ok(()) };
    let shown = path.map(|p| p.display().to_string()).unwrap_or_default();
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| {
        let hint = match e {
            nix::errno::Errno::EPERM => {
                "flowtel needs CAP_SYS_ADMIN to enter another network namespace".to_string()
            }
            nix::errno::Errno::EINVAL => {
                "the file is not a network namespace (use /var/run/netns/NAME or /proc/PID/ns/net)"
                    .to_string()
            }
            _ => format!("check {key}"),
        };
        anyhow!("cannot enter network namespace {shown}: {e}; {hint}")
    })
}
