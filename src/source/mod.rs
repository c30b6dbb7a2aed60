//! Sources: each reads one facility (the kernel, the CNI configuration,
//! Hubble, Istio proxies, Felix) on its own threads or tasks and sends
//! [`SourceEvent`]s into the pipeline's one bounded channel. Each is a
//! component: its own settings, builder and self-telemetry.
//!
//! Once per interval the flow stage asks every source for that interval's
//! data ([`Source::request`]): the kernel source answers with a full dump,
//! the others with their latest state and the log events since the last
//! request.

pub mod cni;
pub mod conntrack;
pub mod detect;
pub mod ebpf;
pub mod felix;
pub mod firewall;
pub mod hubble;
pub mod istio;
pub mod kernel;
pub mod netns;
pub mod out;
pub mod scrape;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use std::sync::Arc;

use crate::flow::mesh::ProxyTargets;
use crate::flow::names::PodNaming;
use crate::flow::SourceEvent;
use crate::telemetry::Telemetry;

/// A running source.
pub trait Source: Send {
    /// `ebpf`, `conntrack`, `detect`, `hubble`, `istio`, `felix` or `cni`.
    fn name(&self) -> &'static str;

    /// Asks for what interval `epoch` needs. False once the source has
    /// stopped for good.
    fn request(&mut self, epoch: u64) -> bool;

    /// Stops the source and waits until its threads or tasks are gone
    /// (and, for the kernel sources, everything they attached is detached).
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Sends a source's state for this interval without waiting. State is sent
/// again each interval, so when the channel is full this interval's copy is
/// skipped and the next one brings it. False once the pipeline is gone.
pub fn offer_state(events: &mpsc::Sender<SourceEvent>, event: SourceEvent) -> bool {
    !matches!(
        events.try_send(event),
        Err(mpsc::error::TrySendError::Closed(_))
    )
}

/// What every source builder gets.
pub struct SourceContext {
    /// Where the source sends what it reads.
    pub events: mpsc::Sender<SourceEvent>,
    pub telemetry: Telemetry,
    /// What detection found on the node, kept current.
    pub detection: watch::Receiver<detect::Detection>,
    /// The Istio proxies of this node's pods, when the Kubernetes cache
    /// runs.
    pub proxies: Option<ProxyTargets>,
    /// Names a pod by namespace and name, when the Kubernetes cache runs.
    pub pods: Option<Arc<dyn PodNaming>>,
}

/// The settings of every source, as the configuration holds them.
pub struct SourcesConfig<'a> {
    pub kernel: kernel::SourceChoice,
    pub detect: &'a detect::DetectConfig,
    pub ebpf: &'a ebpf::EbpfConfig,
    pub conntrack: &'a conntrack::ConntrackConfig,
    pub hubble: &'a hubble::HubbleConfig,
    pub istio: &'a istio::IstioConfig,
    pub felix: &'a felix::FelixConfig,
    pub cni: &'a cni::CniEventsConfig,
    pub firewall: &'a firewall::FirewallConfig,
}

/// The running sources, the kernel source first.
pub struct Sources(Vec<Box<dyn Source>>);

impl Sources {
    /// Starts every source the configuration turns on, sending into
    /// `events`. Only the kernel source is required; an error says why it
    /// could not start. `proxies` finds the Istio proxies to scrape, `pods`
    /// names the pods of the CNI source's records.
    pub async fn start(
        cfg: SourcesConfig<'_>,
        events: mpsc::Sender<SourceEvent>,
        telemetry: &Telemetry,
        proxies: Option<ProxyTargets>,
        pods: Option<Arc<dyn PodNaming>>,
    ) -> anyhow::Result<Self> {
        let detector = detect::Detector::start(cfg.detect.clone(), events.clone()).await;
        let mut ctx = SourceContext {
            events,
            telemetry: telemetry.clone(),
            detection: detector.detection(),
            proxies,
            pods,
        };
        let mut all = vec![kernel::build(cfg.kernel, cfg.ebpf, cfg.conntrack, &ctx)?];
        all.push(Box::new(detector));
        all.extend(hubble::build(cfg.hubble, &ctx));
        all.extend(istio::build(cfg.istio, &mut ctx)?);
        all.extend(felix::build(cfg.felix, &ctx)?);
        all.extend(cni::build(cfg.cni, &ctx)?);
        all.extend(firewall::build(cfg.firewall, &ctx)?);
        Ok(Self(all))
    }

    /// Asks every source for interval `epoch`; false once the kernel source
    /// has stopped.
    pub fn request(&mut self, epoch: u64) -> bool {
        let mut kernel = true;
        for (i, s) in self.0.iter_mut().enumerate() {
            let ok = s.request(epoch);
            if i == 0 {
                kernel = ok;
            } else if !ok {
                tracing::debug!(source = s.name(), "source did not take the request");
            }
        }
        kernel
    }

    /// Stops every source, the kernel source last.
    pub async fn stop(mut self) {
        while let Some(s) = self.0.pop() {
            s.stop().await;
        }
    }
}
