//! Makes the kernel track connections in a namespace where nothing else asks
//! it to (a laptop, a fresh VM): conntrack only follows connections once a
//! netfilter rule uses it. Kubernetes nodes rarely need this, since
//! kube-proxy, Docker and most CNIs already do.
//!
//! The rule matches and counts, never drops or accepts anything, and the
//! table is removed when flowtel stops.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{anyhow, Context};

const TABLE: &str = "flowtel_track";

/// Holds the nft table; dropping it removes the table. Must be created and
/// dropped on a thread that is in the target network namespace.
pub struct TrackingRules(());

impl TrackingRules {
    pub fn install() -> anyhow::Result<Self> {
        let ruleset = format!(
            "table inet {TABLE}\nflush table inet {TABLE}\ntable inet {TABLE} {{\n\
             \tchain prerouting {{ type filter hook prerouting priority 0; policy accept; ct state new counter; }}\n\
             \tchain output {{ type filter hook output priority 0; policy accept; ct state new counter; }}\n}}\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft to enable connection tracking (install the nftables package)")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(ruleset.as_bytes())
                .context("writing the nft ruleset")?;
        }
        let out = child.wait_with_output().context("waiting for nft")?;
        if !out.status.success() {
            return Err(anyhow!(
                "nft refused the connection-tracking table: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        tracing::info!(
            "enabled connection tracking with the nft table inet {TABLE} (removed on exit)"
        );
        Ok(Self(()))
    }
}

impl Drop for TrackingRules {
    fn drop(&mut self) {
        let removed = Command::new("nft")
            .args(["delete", "table", "inet", TABLE])
            .stderr(Stdio::null())
            .status();
        if !removed.is_ok_and(|s| s.success()) {
            tracing::warn!("could not remove the nft table inet {TABLE}; remove it with: nft delete table inet {TABLE}");
        }
    }
}
