//! `net.netfilter.nf_conntrack_acct`: without it conntrack keeps no byte or
//! packet counters, and every flow would report zero traffic; and
//! `net.netfilter.nf_conntrack_timestamp`, whose start times tell apart two
//! connections the kernel gave one ID (see `FlowUpdate::generation`).
//!
//! Must run on a thread already inside the target network namespace: the
//! netfilter sysctls are per namespace and resolve to the opener's.

use std::io::ErrorKind;
use std::path::Path;

use anyhow::{bail, Context};

use crate::source::kernel::KernelStats;

const NETFILTER_DIR: &str = "/proc/sys/net/netfilter";
const ACCT: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";
const TSTAMP: &str = "/proc/sys/net/netfilter/nf_conntrack_timestamp";

/// Whether conntrack is loaded at all in this namespace.
pub(crate) fn check_loaded() -> anyhow::Result<()> {
    if Path::new(ACCT).exists() {
        return Ok(());
    }
    let reason = if Path::new(NETFILTER_DIR).exists() {
        format!("{NETFILTER_DIR} has no nf_conntrack_acct")
    } else {
        format!("{NETFILTER_DIR} does not exist")
    };
    bail!(
        "the nf_conntrack kernel module is not loaded ({reason}); load it with `modprobe nf_conntrack` \
         (on Kubernetes nodes kube-proxy or the CNI normally does this)"
    )
}

fn read_switch(path: &str) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text.trim() != "0")
}

fn read_acct() -> anyhow::Result<bool> {
    read_switch(ACCT)
}

/// Turns on conntrack's start times if asked, allowed and off. Without
/// them a connection that reuses a tuple at once and gets the kernel ID of
/// the one before it can have that one's bytes counted a second time, so a
/// refusal is a warning.
pub(crate) fn ensure_timestamps(enable: bool) {
    let on = match read_switch(TSTAMP) {
        Ok(true) => return,
        Ok(false) if !enable => return,
        Ok(false) => std::fs::write(TSTAMP, "1\n")
            .map_err(anyhow::Error::from)
            .and_then(|()| read_switch(TSTAMP)),
        Err(e) => Err(e),
    };
    match on {
        Ok(true) => tracing::info!("enabled net.netfilter.nf_conntrack_timestamp"),
        Ok(false) => tracing::warn!("net.netfilter.nf_conntrack_timestamp did not stay on"),
        Err(e) => tracing::warn!(
            "cannot turn on net.netfilter.nf_conntrack_timestamp ({e:#}): a connection that \
             reuses a tuple at once may be counted together with the one before it. Fix: \
             `sysctl -w net.netfilter.nf_conntrack_timestamp=1` in the node's network namespace, \
             or run flowtel with CAP_NET_ADMIN and a writable /proc/sys"
        ),
    }
}

/// Reads the accounting switch, turns it on if asked and allowed, records
/// the outcome in `stats.byte_counters_available` and returns it. A refusal
/// to write is a warning, not an error: flows are still seen, just without
/// byte counts.
pub(crate) fn ensure_accounting(enable: bool, stats: &KernelStats) -> anyhow::Result<bool> {
    check_loaded()?;
    let mut on = read_acct()?;
    let mut write_error = None;
    if !on && enable {
        match std::fs::write(ACCT, "1\n") {
            Ok(()) => {
                on = read_acct()?;
                if on {
                    tracing::info!(
                        "enabled net.netfilter.nf_conntrack_acct; connections that already existed \
                         keep reporting zero bytes and packets"
                    );
                }
            }
            Err(e) => write_error = Some(e),
        }
    }
    if !on {
        let why = match &write_error {
            Some(e)
                if matches!(
                    e.kind(),
                    ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                format!("turning it on was refused ({e}); run with CAP_NET_ADMIN and a writable /proc/sys")
            }
            Some(e) => format!("turning it on failed ({e})"),
            None if enable => "it did not stay on".to_string(),
            None => "conntrack.enable_accounting is false".to_string(),
        };
        tracing::warn!(
            "conntrack byte and packet counts are unavailable: net.netfilter.nf_conntrack_acct is 0 and {why}. \
             Flows are still reported, with zero traffic. Fix: `sysctl -w net.netfilter.nf_conntrack_acct=1` \
             in the node's network namespace, or run flowtel with CAP_NET_ADMIN and \
             conntrack.enable_accounting: true"
        );
    }
    stats.byte_counters_available.set_flag(on);
    Ok(on)
}
