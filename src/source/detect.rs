//! What the node runs besides the kernel: which CNI plugin wires its pods
//! (from the CNI configuration directory, read the way the container runtime
//! reads it), whether Cilium's Hubble socket and Calico Felix's metrics port
//! are there, and which pods carry an Istio proxy. The richer sources are
//! used only when this finds them; the kernel source is always on.

use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::{offer_state, Source};
use crate::flow::mesh::{
    Family, FamilyGroup, LogEvent, MeshUpdate, Point, PointValue, Severity, Value,
};
use crate::flow::SourceEvent;
use crate::telemetry::catalogue;

/// Where detection looks.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// The CNI configuration directory kubelet's runtime reads.
    pub cni_dir: PathBuf,
    /// The Cilium agent's local Hubble Observer socket.
    pub hubble_socket: PathBuf,
    /// Felix's Prometheus endpoint on the node (host network).
    pub felix_address: SocketAddr,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            cni_dir: PathBuf::from("/etc/cni/net.d"),
            hubble_socket: PathBuf::from("/var/run/cilium/hubble.sock"),
            felix_address: SocketAddr::from(([127, 0, 0, 1], 9091)),
        }
    }
}

/// How long the Felix port gets to accept a connection: it is local, so
/// anything slower means it is not there.
pub const FELIX_CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

/// How often [`watch`] re-checks when run as a source.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Config files larger than this are not CNI configurations; the cap keeps a
/// stray big file in the directory from being read whole.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The CNI plugin that wires the node's pods.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CniKind {
    Cilium,
    Calico,
    /// Calico for policy and pod plumbing, Flannel for the overlay.
    Canal,
    Flannel,
    Weave,
    AwsVpc,
    Azure,
    /// The reference `bridge` plugin (kind, containerd's default, kubenet-like setups).
    Bridge,
    /// Anything else, named by the first plugin's `type`.
    Other(String),
}

impl CniKind {
    /// The value of `flowtel.cni.name`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Cilium => "cilium",
            Self::Calico => "calico",
            Self::Canal => "canal",
            Self::Flannel => "flannel",
            Self::Weave => "weave",
            Self::AwsVpc => "aws-vpc-cni",
            Self::Azure => "azure-cni",
            Self::Bridge => "bridge",
            Self::Other(kind) => kind,
        }
    }
}

impl std::fmt::Display for CniKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The active CNI configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniConfig {
    /// The file the runtime uses: the lexicographically first valid one.
    pub file: PathBuf,
    /// The network's `name`.
    pub network: String,
    pub kind: CniKind,
    /// When Cilium runs chained after another plugin (e.g. on AWS VPC CNI),
    /// the plugin that owns the pod addresses.
    pub chained_on: Option<CniKind>,
    /// Every plugin `type`, in chain order (delegates included).
    pub plugins: Vec<String>,
}

/// A candidate file that is not a usable CNI configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    pub file: PathBuf,
    pub reason: String,
}

/// What the CNI configuration directory says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniDetection {
    /// `None` when the directory is missing or holds no valid configuration
    /// (a node whose CNI has not been installed yet).
    pub active: Option<CniConfig>,
    /// Candidates before or after the active one that could not be used.
    pub skipped: Vec<SkippedFile>,
    /// Why the directory itself could not be read, if it could not.
    pub dir_error: Option<String>,
}

/// Everything detection found on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detection {
    pub cni: CniDetection,
    /// The Hubble socket exists and is a Unix socket.
    pub hubble: bool,
    /// Something accepts connections on the Felix metrics address.
    pub felix: bool,
}

/// Reads `dir` as kubelet's runtime does: files ending in `.conf`,
/// `.conflist` or `.json`, sorted by name, the first that parses is active.
/// Never fails: unreadable or malformed files are listed with a reason.
pub fn detect_cni(dir: &Path) -> CniDetection {
    let mut out = CniDetection::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            out.dir_error = Some(format!("{}: {e}", dir.display()));
            return out;
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            )
        })
        .collect();
    files.sort();
    for file in files {
        match load(&file) {
            Ok(config) if out.active.is_none() => out.active = Some(config),
            Ok(_) => {}
            Err(reason) => out.skipped.push(SkippedFile { file, reason }),
        }
    }
    out
}

fn load(file: &Path) -> Result<CniConfig, String> {
    let meta = std::fs::metadata(file).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    let bytes = std::fs::read(file).map_err(|e| e.to_string())?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("not JSON: {e}"))?;
    let object = value.as_object().ok_or("not a JSON object")?;
    let is_list = file.extension().and_then(|e| e.to_str()) == Some("conflist")
        || object.contains_key("plugins");
    let mut plugins = Vec::new();
    if is_list {
        let list = object
            .get("plugins")
            .and_then(|p| p.as_array())
            .ok_or("a .conflist needs a \"plugins\" array")?;
        if list.is_empty() {
            return Err("\"plugins\" is empty".into());
        }
        for (i, plugin) in list.iter().enumerate() {
            collect_types(plugin, &mut plugins).map_err(|e| format!("plugins[{i}]: {e}"))?;
        }
    } else {
        collect_types(&value, &mut plugins)?;
    }
    let (kind, chained_on) = classify(&value, &plugins);
    Ok(CniConfig {
        file: file.to_path_buf(),
        network: object
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_owned(),
        kind,
        chained_on,
        plugins,
    })
}

/// Appends the `type` of one plugin and of the plugins it delegates to
/// (Flannel's `delegate`, Multus' `delegates`), which do the real wiring.
fn collect_types(plugin: &serde_json::Value, out: &mut Vec<String>) -> Result<(), String> {
    let kind = plugin
        .get("type")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or("no \"type\"")?;
    out.push(kind.to_owned());
    if let Some(delegate) = plugin.get("delegate").filter(|d| d.get("type").is_some()) {
        collect_types(delegate, out)?;
    }
    for delegate in plugin
        .get("delegates")
        .and_then(|d| d.as_array())
        .into_iter()
        .flatten()
    {
        match delegate.get("plugins").and_then(|p| p.as_array()) {
            Some(list) => {
                for inner in list {
                    collect_types(inner, out)?;
                }
            }
            None => collect_types(delegate, out)?,
        }
    }
    Ok(())
}

/// Names the CNI from its plugin types; `config` is the whole file, needed
/// only to tell Canal's Calico (host-local IPAM on the Flannel-owned pod
/// CIDR) from Calico's own (calico-ipam).
fn classify(config: &serde_json::Value, types: &[String]) -> (CniKind, Option<CniKind>) {
    let has = |t: &str| types.iter().any(|x| x == t);
    let primary = if has("calico") {
        if has("flannel") || calico_on_pod_cidr(config) {
            CniKind::Canal
        } else {
            CniKind::Calico
        }
    } else if has("flannel") {
        CniKind::Flannel
    } else if has("aws-cni") {
        CniKind::AwsVpc
    } else if types.iter().any(|t| t.starts_with("azure-vnet")) {
        CniKind::Azure
    } else if types
        .iter()
        .any(|t| t == "weave-net" || t.starts_with("weave-plugin"))
    {
        CniKind::Weave
    } else if has("cilium-cni") {
        return (CniKind::Cilium, None);
    } else if types.first().is_some_and(|t| t == "bridge") {
        CniKind::Bridge
    } else {
        CniKind::Other(types.first().cloned().unwrap_or_default())
    };
    if has("cilium-cni") {
        (CniKind::Cilium, Some(primary))
    } else {
        (primary, None)
    }
}

fn calico_on_pod_cidr(config: &serde_json::Value) -> bool {
    let single = std::slice::from_ref(config);
    let plugins = config
        .get("plugins")
        .and_then(|p| p.as_array())
        .map_or(single, Vec::as_slice);
    plugins.iter().any(|p| {
        p.get("type").and_then(|t| t.as_str()) == Some("calico")
            && p.pointer("/ipam/type").and_then(|t| t.as_str()) == Some("host-local")
            && p.pointer("/ipam/subnet").and_then(|s| s.as_str()) == Some("usePodCidr")
    })
}

/// Whether `path` is a Unix socket (a stale regular file left behind is not).
pub fn hubble_present(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Whether something accepts TCP connections on `address` within
/// [`FELIX_CONNECT_TIMEOUT`].
pub async fn felix_present(address: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(
            FELIX_CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(address)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Runs every check once.
pub async fn detect(config: &DetectConfig) -> Detection {
    let dir = config.cni_dir.clone();
    let cni = match tokio::task::spawn_blocking(move || detect_cni(&dir)).await {
        Ok(cni) => cni,
        Err(e) => CniDetection {
            dir_error: Some(format!("the directory scan failed: {e}")),
            ..CniDetection::default()
        },
    };
    Detection {
        cni,
        hubble: hubble_present(&config.hubble_socket),
        felix: felix_present(config.felix_address).await,
    }
}

/// Detects once, then re-checks every `interval` and publishes a new
/// [`Detection`] whenever anything changed (the CNI directory is re-read
/// whole, so a file rewritten in place within the same second is seen too).
/// The task ends when every receiver is dropped.
pub async fn watch(
    config: DetectConfig,
    interval: Duration,
) -> (watch::Receiver<Detection>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(detect(&config).await);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tick.tick() => {}
            }
            let next = detect(&config).await;
            tx.send_if_modified(|current| {
                if *current == next {
                    return false;
                }
                *current = next;
                true
            });
        }
    });
    (rx, task)
}

/// Detection as a source: checks the node every [`POLL_INTERVAL`] and sends
/// the CNI it names each interval, for `/readyz` and `flowtel.cni.detected`,
/// and a `flowtel.cni.config_changed` log event when the active
/// configuration changed since the previous interval.
pub struct Detector {
    detection: watch::Receiver<Detection>,
    task: tokio::task::JoinHandle<()>,
    events: mpsc::Sender<SourceEvent>,
    /// The active configuration at the previous interval.
    last: Option<CniConfig>,
    /// Change events not delivered yet (the channel was full).
    pending: Vec<LogEvent>,
    changes: u64,
}

impl Detector {
    /// Detects once (and says what it found), then keeps checking.
    pub async fn start(config: DetectConfig, events: mpsc::Sender<SourceEvent>) -> Self {
        let (detection, task) = watch(config, POLL_INTERVAL).await;
        log_detection(&detection.borrow());
        let last = detection.borrow().cni.active.clone();
        Self {
            detection,
            task,
            events,
            last,
            pending: Vec::new(),
            changes: 0,
        }
    }

    /// What detection finds, kept current.
    pub fn detection(&self) -> watch::Receiver<Detection> {
        self.detection.clone()
    }
}

impl Source for Detector {
    fn name(&self) -> &'static str {
        "detect"
    }

    fn request(&mut self, _epoch: u64) -> bool {
        let active = self.detection.borrow().cni.active.clone();
        if active != self.last {
            self.changes += 1;
            self.pending
                .push(config_changed(self.last.as_ref(), active.as_ref()));
            self.last = active.clone();
        }
        let cni = active.map(|c| std::sync::Arc::from(c.kind.as_str()));
        if !offer_state(&self.events, SourceEvent::Cni(cni)) {
            return false;
        }
        let update = MeshUpdate {
            source: "detect",
            active: false,
            groups: vec![FamilyGroup {
                attributes: Vec::new(),
                families: vec![Family {
                    metric: &catalogue::CNI_CONFIG_CHANGES,
                    points: vec![Point::new(Vec::new(), PointValue::Int(self.changes))],
                }],
            }],
            events: std::mem::take(&mut self.pending),
        };
        match self.events.try_send(SourceEvent::Mesh(Box::new(update))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(SourceEvent::Mesh(update))) => {
                self.pending = update.events;
                true
            }
            Err(_) => false,
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.task.abort();
        Box::pin(async {})
    }
}

/// The log event for a change of the active CNI configuration.
fn config_changed(old: Option<&CniConfig>, new: Option<&CniConfig>) -> LogEvent {
    let chain = |c: Option<&CniConfig>| c.map(|c| c.plugins.join(",")).unwrap_or_default();
    let (old_chain, new_chain) = (chain(old), chain(new));
    let mut attributes = vec![
        (
            catalogue::EVENT_NAME,
            Value::Str(catalogue::EVENT_CNI_CONFIG_CHANGED.into()),
        ),
        (
            catalogue::CNI_CONFIG_OLD_PLUGINS,
            Value::Str(old_chain.clone()),
        ),
        (
            catalogue::CNI_CONFIG_NEW_PLUGINS,
            Value::Str(new_chain.clone()),
        ),
    ];
    let file = new.or(old).map(|c| c.file.display().to_string());
    if let Some(f) = &file {
        attributes.push((catalogue::CNI_CONFIG_FILE, Value::Str(f.clone())));
    }
    if let Some(c) = new {
        attributes.push((catalogue::CNI_NAME, Value::Str(c.kind.as_str().to_owned())));
    }
    let show = |s: &str| {
        if s.is_empty() {
            "none".to_owned()
        } else {
            s.to_owned()
        }
    };
    LogEvent {
        time: std::time::SystemTime::now(),
        severity: Severity::Info,
        name: catalogue::EVENT_CNI_CONFIG_CHANGED,
        body: format!(
            "CNI configuration changed ({}): {} -> {}",
            file.as_deref().unwrap_or("no file"),
            show(&old_chain),
            show(&new_chain)
        ),
        attributes,
    }
}

/// Says once at start what the node runs besides the kernel.
fn log_detection(d: &Detection) {
    match &d.cni.active {
        Some(c) => tracing::info!(
            cni = %c.kind,
            chained_on = ?c.chained_on.as_ref().map(|k| k.as_str()),
            file = %c.file.display(),
            hubble = d.hubble,
            felix = d.felix,
            "detected the node's CNI"
        ),
        None => tracing::info!(
            reason = d
                .cni
                .dir_error
                .as_deref()
                .unwrap_or("no valid configuration"),
            hubble = d.hubble,
            felix = d.felix,
            "no CNI configuration found"
        ),
    }
}
