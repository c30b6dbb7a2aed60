//! Flow sources: each reads one kernel facility on its own threads and sends
//! [`SourceEvent`](crate::flow::SourceEvent)s down a bounded channel.

pub mod conntrack;
pub mod detect;
pub mod ebpf;
pub mod felix;
pub mod hubble;
pub mod istio;
pub mod mesh;
pub mod netns;
pub mod out;
pub mod scrape;

/// Which source is running and how, for logs, `/readyz` and the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SourceInfo {
    /// `ebpf` or `conntrack`.
    pub name: &'static str,
    /// How it reads the kernel: `tcx`/`clsact` or `netlink`/`procfs`.
    pub mode: &'static str,
}

impl std::fmt::Display for SourceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.mode)
    }
}
