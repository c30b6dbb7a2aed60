//! The CNI source: every execution of a CNI plugin on the node, seen in the
//! kernel (`bpf/cni.bpf.c`: exec, stdout writes, exit) rather than in
//! logs. Each execution becomes one `flowtel.cni.operation` log event (the
//! plugin, command, container, network namespace, interface, pod, the
//! addresses of an ADD result or the plugin's error, duration, exit code
//! and the plugin that delegated to it) and counts in the operation and
//! duration metrics. When the Kubernetes cache knows the pod, both carry its
//! workload, named through [`PodNaming`] as the flow stage names flows.

mod probe;
pub mod raw;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use self::raw::{PluginOutput, RawEvent};
use super::hubble::Enabled;
use super::{Source, SourceContext};
use crate::component::{positive, ConfigError};
use crate::flow::mesh::{
    Family, FamilyGroup, HistogramValue, LogEvent, MeshUpdate, Point, PointValue, Severity, Value,
};
use crate::flow::names::{EndName, PodNaming};
use crate::flow::SourceEvent;
use crate::telemetry::catalogue;

pub use probe::MAX_BIN_DIRS;

/// `cni`: CNI plugin executions.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniEventsConfig {
    /// `auto`: trace when the programs load (a failure is a warning); `on`:
    /// a failure stops flowtel; `off`.
    pub enabled: Enabled,
    /// Where the plugins live: executions of binaries under these are
    /// reported (at most 8).
    pub bin_dirs: Vec<PathBuf>,
    /// Operation events kept between two exports; more are dropped and
    /// counted in `flowtel.cni.records.dropped`.
    pub max_records: usize,
    /// Plugins tracked at once, from exec to exit.
    pub max_running: usize,
    /// A plugin whose exit is not seen within this is forgotten and counted
    /// as lost (`unfinished`).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The ring buffer's size in bytes: a power of two, at least 64 KiB.
    pub ring_buffer_bytes: u32,
    /// Series of the operation metrics (plugin, command, result and the
    /// pod's workload) at most; operations of further series are counted
    /// in one overflow series (`otel.metric.overflow`) and in
    /// `flowtel.cni.series.folded`.
    pub max_series: usize,
    /// Read what plugins write to stdout (the ADD result's addresses, the
    /// error object): a program on the raw `sys_enter` tracepoint, which
    /// runs on every system call of the node. Off: only exec and exit are
    /// traced, at no cost to other system calls, and records carry no
    /// `flowtel.cni.ips`/`gateways`/`error.*` (a plugin that fails without
    /// a non-zero exit code counts as a success).
    pub capture_output: bool,
}

impl Default for CniEventsConfig {
    fn default() -> Self {
        Self {
            // Opt-in: the `sys_enter` program runs on every system call of
            // the node.
            enabled: Enabled::Off,
            bin_dirs: vec![
                PathBuf::from("/opt/cni/bin"),
                PathBuf::from("/usr/libexec/cni"),
                PathBuf::from("/usr/lib/cni"),
            ],
            max_records: 10_000,
            max_running: 4096,
            timeout: Duration::from_secs(600),
            ring_buffer_bytes: 4 << 20,
            max_series: 1000,
            capture_output: true,
        }
    }
}

impl CniEventsConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.bin_dirs.is_empty() || self.bin_dirs.len() > MAX_BIN_DIRS {
            return Err(ConfigError::new(
                "bin_dirs",
                format!("must list 1 to {MAX_BIN_DIRS} directories"),
            ));
        }
        for dir in &self.bin_dirs {
            probe::dir_prefix(dir).map_err(|e| ConfigError::new("bin_dirs", e))?;
        }
        if self.max_records == 0 {
            return Err(ConfigError::new("max_records", "must be at least 1"));
        }
        if self.max_running == 0 {
            return Err(ConfigError::new("max_running", "must be at least 1"));
        }
        if self.max_series == 0 {
            return Err(ConfigError::new("max_series", "must be at least 1"));
        }
        positive("timeout", self.timeout, "10m")?;
        let r = self.ring_buffer_bytes;
        if r < 64 << 10 || !r.is_power_of_two() {
            return Err(ConfigError::new(
                "ring_buffer_bytes",
                "must be a power of two of at least 65536",
            ));
        }
        Ok(())
    }
}

/// Upper bounds of the duration histogram, in seconds.
const DURATION_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// stdout kept per execution.
const MAX_OUTPUT: usize = 16 << 10;

/// A plugin between exec and exit.
#[derive(Debug)]
struct Running {
    path: String,
    start_ns: u64,
    env: raw::CniEnv,
    env_truncated: bool,
    parent: Option<(u32, String)>,
    output: Vec<u8>,
    seen: Instant,
}

/// Whose operations a series counts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    /// No pod in `CNI_ARGS`, or one the Kubernetes cache does not know.
    Unknown,
    /// The pod's namespace, workload kind and workload name.
    Workload(Arc<str>, Arc<str>, Arc<str>),
    /// Series beyond `cni.max_series`.
    Overflow,
}

/// (plugin, command, result, whose).
type OpKey = (String, &'static str, &'static str, Owner);

/// A plugin that exited, counted and reported at the next export. Its pod
/// is named at the exit (a DEL's pod may be deleted right after) or, when
/// the Kubernetes cache did not know it yet, at the export.
#[derive(Debug)]
struct Done {
    pod: Option<Arc<EndName>>,
    pid: u32,
    /// Its stdout already parsed into `output`, and emptied.
    r: Running,
    output: PluginOutput,
    end_ns: u64,
    status: i32,
    /// When flowtel read its exit: the time of its event.
    seen: SystemTime,
}

/// What the source has seen, shared by the reading task and `request`.
#[derive(Debug, Default)]
struct Tracker {
    running: HashMap<u32, Running>,
    /// Exited, not counted yet: at most `cni.max_records`, the oldest
    /// counted at once beyond that.
    done: VecDeque<Done>,
    operations: BTreeMap<OpKey, u64>,
    durations: BTreeMap<OpKey, HistogramValue>,
    /// Kernel-side losses, cumulative ([`probe::LOST_KINDS`]).
    kernel_lost: [u64; 4],
    /// User-side losses by kind: `unfinished`, `running_full`, `decode`.
    lost: BTreeMap<&'static str, u64>,
    events: VecDeque<LogEvent>,
    records_dropped: u64,
    /// Operations counted in the overflow series.
    series_folded: u64,
    active: bool,
}

/// The CNI variables from the environment the kernel copied. When it was
/// longer than the copy and the command is not in it, from
/// `/proc/<pid>/environ` while the plugin still runs; once it has exited
/// the fields stay empty (`flowtel.cni.env.truncated` on its event).
fn read_env(pid: u32, env: &[u8], truncated: bool) -> raw::CniEnv {
    let parsed = raw::parse_env(env, truncated);
    if !truncated || parsed.command.is_some() {
        return parsed;
    }
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(full) => raw::parse_env(&full, false),
        Err(_) => parsed,
    }
}

/// The pod `CNI_ARGS` names, as the Kubernetes cache knows it now.
fn name_pod(r: &Running, pods: Option<&dyn PodNaming>) -> Option<Arc<EndName>> {
    match (&r.env.pod_namespace, &r.env.pod_name, pods) {
        (Some(ns), Some(name), Some(pods)) => pods.pod(ns, name),
        _ => None,
    }
}

fn bump(map: &mut BTreeMap<&'static str, u64>, key: &'static str) {
    *map.entry(key).or_default() += 1;
}

impl Tracker {
    fn apply(&mut self, event: RawEvent, cfg: &CniEventsConfig, pods: Option<&dyn PodNaming>) {
        match event {
            RawEvent::Exec {
                pid,
                ppid,
                ts_ns,
                path,
                env,
                env_truncated,
            } => {
                if self.running.len() >= cfg.max_running && !self.running.contains_key(&pid) {
                    bump(&mut self.lost, "running_full");
                    return;
                }
                let parent = self
                    .running
                    .get(&ppid)
                    .map(|p| (ppid, raw::plugin_name(&p.path).to_owned()));
                self.running.insert(
                    pid,
                    Running {
                        path,
                        start_ns: ts_ns,
                        env: read_env(pid, &env, env_truncated),
                        env_truncated,
                        parent,
                        output: Vec::new(),
                        seen: Instant::now(),
                    },
                );
            }
            RawEvent::Output { pid, data } => {
                if let Some(r) = self.running.get_mut(&pid) {
                    let room = MAX_OUTPUT.saturating_sub(r.output.len());
                    r.output.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            RawEvent::Exit { pid, ts_ns, status } => {
                // No entry: its exec was dropped for `running_full`, already
                // counted.
                if let Some(mut r) = self.running.remove(&pid) {
                    let output = raw::parse_output(&std::mem::take(&mut r.output));
                    self.done.push_back(Done {
                        pod: name_pod(&r, pods),
                        pid,
                        r,
                        output,
                        end_ns: ts_ns,
                        status,
                        seen: SystemTime::now(),
                    });
                    if self.done.len() > cfg.max_records {
                        if let Some(d) = self.done.pop_front() {
                            self.finish(d, pods, cfg);
                        }
                    }
                }
            }
        }
    }

    /// Counts and reports every plugin that exited, its pod named now.
    fn settle(&mut self, pods: Option<&dyn PodNaming>, cfg: &CniEventsConfig) {
        while let Some(d) = self.done.pop_front() {
            self.finish(d, pods, cfg);
        }
    }

    fn finish(&mut self, done: Done, pods: Option<&dyn PodNaming>, cfg: &CniEventsConfig) {
        let Done {
            pod,
            pid,
            r,
            output,
            end_ns,
            status,
            seen,
        } = done;
        let pod = pod.or_else(|| name_pod(&r, pods));
        let pod = pod.as_deref();
        let plugin = raw::plugin_name(&r.path).to_owned();
        let command = raw::command_name(r.env.command.as_deref());
        let code = raw::exit_code(status);
        let result = if code == 0 && output.error.is_none() {
            "success"
        } else {
            "failure"
        };
        let seconds = end_ns.saturating_sub(r.start_ns) as f64 / 1e9;
        let owner = match pod {
            Some(EndName {
                namespace: Some(ns),
                workload_kind: Some(kind),
                workload: Some(name),
                ..
            }) => Owner::Workload(ns.clone(), kind.clone(), name.clone()),
            _ => Owner::Unknown,
        };
        let mut key = (plugin.clone(), command, result, owner);
        if !self.operations.contains_key(&key) && self.operations.len() >= cfg.max_series {
            key.3 = Owner::Overflow;
        }
        if key.3 == Owner::Overflow {
            self.series_folded += 1;
        }
        *self.operations.entry(key.clone()).or_default() += 1;
        self.durations
            .entry(key)
            .or_insert_with(|| HistogramValue::empty(DURATION_BOUNDS))
            .observe(seconds);
        let mut event = operation_event(
            pid, &plugin, command, result, code, seconds, &r, &output, pod,
        );
        event.time = seen;
        if self.events.len() >= cfg.max_records {
            self.events.pop_front();
            self.records_dropped += 1;
        }
        self.events.push_back(event);
    }

    /// Forgets plugins whose exit was not seen within the timeout.
    fn expire(&mut self, timeout: Duration) {
        let before = self.running.len();
        self.running.retain(|_, r| r.seen.elapsed() < timeout);
        for _ in self.running.len()..before {
            bump(&mut self.lost, "unfinished");
        }
    }

    fn update(&mut self, pods: Option<&dyn PodNaming>, cfg: &CniEventsConfig) -> MeshUpdate {
        self.settle(pods, cfg);
        let points = |map: &BTreeMap<OpKey, u64>| {
            map.iter()
                .map(|(key, n)| op_point(key, PointValue::Int(*n)))
                .collect()
        };
        let mut lost: Vec<Point> = probe::LOST_KINDS
            .iter()
            .zip(self.kernel_lost)
            .map(|(kind, n)| lost_point(kind, n))
            .collect();
        lost.extend(self.lost.iter().map(|(kind, n)| lost_point(kind, *n)));
        let families = vec![
            Family {
                metric: &catalogue::CNI_OPERATIONS,
                points: points(&self.operations),
            },
            Family {
                metric: &catalogue::CNI_OPERATION_DURATION,
                points: self
                    .durations
                    .iter()
                    .map(|(key, h)| op_point(key, PointValue::Histogram(h.clone())))
                    .collect(),
            },
            Family {
                metric: &catalogue::CNI_EVENTS_LOST,
                points: lost,
            },
            Family {
                metric: &catalogue::CNI_RECORDS_DROPPED,
                points: vec![Point::new(
                    Vec::new(),
                    PointValue::Int(self.records_dropped),
                )],
            },
            Family {
                metric: &catalogue::CNI_SERIES_FOLDED,
                points: vec![Point::new(Vec::new(), PointValue::Int(self.series_folded))],
            },
            Family {
                metric: &catalogue::CNI_RUNNING,
                points: vec![Point::new(
                    Vec::new(),
                    PointValue::Int(self.running.len() as u64),
                )],
            },
        ];
        MeshUpdate {
            source: "cni",
            active: self.active,
            groups: vec![FamilyGroup {
                attributes: Vec::new(),
                families,
            }],
            events: self.events.drain(..).collect(),
        }
    }
}

fn op_labels((plugin, command, result, owner): &OpKey) -> Vec<(String, String)> {
    let mut labels = vec![
        (catalogue::CNI_PLUGIN.to_owned(), plugin.clone()),
        (catalogue::CNI_COMMAND.to_owned(), (*command).to_owned()),
        (catalogue::CNI_RESULT.to_owned(), (*result).to_owned()),
    ];
    match owner {
        Owner::Unknown => {}
        Owner::Workload(ns, kind, name) => {
            labels.push((catalogue::K8S_NAMESPACE.to_owned(), ns.to_string()));
            labels.push((catalogue::K8S_WORKLOAD_KIND.to_owned(), kind.to_string()));
            labels.push((catalogue::K8S_WORKLOAD.to_owned(), name.to_string()));
            if let Some(key) = catalogue::workload_attribute(kind) {
                labels.push((key.to_owned(), name.to_string()));
            }
        }
        // Marked by the point (`otel.metric.overflow` on export).
        Owner::Overflow => {}
    }
    labels
}

fn op_point(key: &OpKey, value: PointValue) -> Point {
    Point {
        overflow: key.3 == Owner::Overflow,
        ..Point::new(op_labels(key), value)
    }
}

fn lost_point(kind: &str, n: u64) -> Point {
    Point::new(
        vec![(catalogue::ERROR_TYPE.to_owned(), kind.to_owned())],
        PointValue::Int(n),
    )
}

#[allow(clippy::too_many_arguments)]
fn operation_event(
    pid: u32,
    plugin: &str,
    command: &'static str,
    result: &'static str,
    code: i64,
    seconds: f64,
    r: &Running,
    output: &PluginOutput,
    pod: Option<&EndName>,
) -> LogEvent {
    let mut attributes: Vec<(&'static str, Value)> = vec![
        (
            catalogue::EVENT_NAME,
            Value::Str(catalogue::EVENT_CNI_OPERATION.into()),
        ),
        (catalogue::CNI_PLUGIN, Value::Str(plugin.to_owned())),
        (catalogue::CNI_COMMAND, Value::Str(command.to_owned())),
        (catalogue::CNI_RESULT, Value::Str(result.to_owned())),
        (catalogue::CNI_DURATION, Value::Double(seconds)),
        (catalogue::PROCESS_EXIT_CODE, Value::Int(code)),
        (catalogue::PROCESS_PID, Value::Int(i64::from(pid))),
        (
            catalogue::PROCESS_EXECUTABLE_PATH,
            Value::Str(r.path.clone()),
        ),
    ];
    let mut add = |key: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            attributes.push((key, Value::Str(v.clone())));
        }
    };
    add(catalogue::CONTAINER_ID, &r.env.container_id);
    add(catalogue::CNI_NETNS, &r.env.netns);
    add(catalogue::NETWORK_INTERFACE_NAME, &r.env.ifname);
    add(catalogue::K8S_NAMESPACE, &r.env.pod_namespace);
    add(catalogue::K8S_POD, &r.env.pod_name);
    add(catalogue::K8S_POD_UID, &r.env.pod_uid);
    add(catalogue::CNI_ERROR_MESSAGE, &output.error);
    if let Some(c) = output.error_code {
        attributes.push((catalogue::CNI_ERROR_CODE, Value::Int(c)));
    }
    if let Some(pod) = pod {
        let mut put = |key: &'static str, v: &Option<Arc<str>>| {
            if let Some(v) = v {
                attributes.push((key, Value::Str(v.to_string())));
            }
        };
        if r.env.pod_uid.is_none() {
            put(catalogue::K8S_POD_UID, &pod.pod_uid);
        }
        put(catalogue::K8S_WORKLOAD_KIND, &pod.workload_kind);
        put(catalogue::K8S_WORKLOAD, &pod.workload);
        put(catalogue::K8S_NODE, &pod.node);
        if let (Some(kind), Some(name)) = (&pod.workload_kind, &pod.workload) {
            if let Some(key) = catalogue::workload_attribute(kind) {
                attributes.push((key, Value::Str(name.to_string())));
            }
        }
    }
    if let Some((ppid, parent)) = &r.parent {
        attributes.push((catalogue::CNI_PARENT_PLUGIN, Value::Str(parent.clone())));
        attributes.push((catalogue::PROCESS_PARENT_PID, Value::Int(i64::from(*ppid))));
    }
    if !output.ips.is_empty() {
        let join = |f: &dyn Fn(&raw::ResultIp) -> Option<String>| {
            output
                .ips
                .iter()
                .filter_map(f)
                .collect::<Vec<_>>()
                .join(",")
        };
        attributes.push((
            catalogue::CNI_IPS,
            Value::Str(join(&|i| Some(i.address.clone()))),
        ));
        let gateways = join(&|i| i.gateway.map(|g| g.to_string()));
        if !gateways.is_empty() {
            attributes.push((catalogue::CNI_GATEWAYS, Value::Str(gateways)));
        }
    }
    if r.env_truncated && r.env.command.is_none() {
        attributes.push((catalogue::CNI_ENV_TRUNCATED, Value::Bool(true)));
    }
    let pod = match (&r.env.pod_namespace, &r.env.pod_name) {
        (Some(ns), Some(name)) => format!(" {ns}/{name}"),
        _ => String::new(),
    };
    let ifname = r.env.ifname.as_deref().unwrap_or("-");
    let mut body = format!(
        "{command} {plugin}{pod} {ifname}: {result} in {:.1} ms",
        seconds * 1e3
    );
    if let Some(e) = &output.error {
        body.push_str(&format!(" (exit {code}): {e}"));
    } else if code != 0 {
        body.push_str(&format!(" (exit {code})"));
    }
    LogEvent {
        time: SystemTime::now(),
        severity: if result == "success" {
            Severity::Info
        } else {
            Severity::Warn
        },
        name: catalogue::EVENT_CNI_OPERATION,
        body,
        attributes,
    }
}

/// The running source.
pub struct CniSource {
    tracker: Arc<Mutex<Tracker>>,
    task: tokio::task::JoinHandle<()>,
    events: mpsc::Sender<SourceEvent>,
    cfg: CniEventsConfig,
    pods: Option<Arc<dyn PodNaming>>,
}

/// Starts the source unless `cni.enabled` is `off`. With `auto`, programs
/// that do not load are a warning and the source stays off.
pub fn build(
    cfg: &CniEventsConfig,
    ctx: &SourceContext,
) -> anyhow::Result<Option<Box<dyn Source>>> {
    if cfg.enabled == Enabled::Off {
        return Ok(None);
    }
    let started = probe::Probe::start(&cfg.bin_dirs, cfg.ring_buffer_bytes, cfg.capture_output)
        .and_then(probe::Probe::into_async);
    let probe = match started {
        Ok(p) => p,
        Err(e) if cfg.enabled == Enabled::Auto => {
            tracing::warn!(error = %format!("{e:#}"), "cni source: not tracing CNI plugin executions");
            return Ok(None);
        }
        Err(e) => return Err(e.context("starting the CNI source (cni.enabled: on)")),
    };
    tracing::info!(
        bin_dirs = ?cfg.bin_dirs,
        capture_output = cfg.capture_output,
        "cni source: tracing CNI plugin executions"
    );
    let tracker = Arc::new(Mutex::new(Tracker {
        active: true,
        ..Tracker::default()
    }));
    let task = tokio::spawn(read_loop(
        probe,
        cfg.clone(),
        Arc::clone(&tracker),
        ctx.pods.clone(),
    ));
    Ok(Some(Box::new(CniSource {
        tracker,
        task,
        events: ctx.events.clone(),
        cfg: cfg.clone(),
        pods: ctx.pods.clone(),
    })))
}

/// Drains the ring buffer whenever it is readable, and once a second reads
/// the kernel's loss counters and forgets plugins past the timeout.
async fn read_loop(
    mut probe: AsyncFd<probe::Probe>,
    cfg: CniEventsConfig,
    tracker: Arc<Mutex<Tracker>>,
    pods: Option<Arc<dyn PodNaming>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let readable = tokio::select! {
            guard = probe.readable_mut() => match guard {
                Ok(g) => Some(g),
                Err(e) => {
                    tracing::error!(error = %e, "cni source: polling the ring buffer failed");
                    return;
                }
            },
            _ = tick.tick() => None,
        };
        let mut batch = Vec::new();
        let timed = if let Some(mut guard) = readable {
            let p = guard.get_inner_mut();
            while let Some(item) = p.events.next() {
                batch.push(raw::decode(&item));
            }
            guard.clear_ready();
            false
        } else {
            let p = probe.get_mut();
            while let Some(item) = p.events.next() {
                batch.push(raw::decode(&item));
            }
            true
        };
        let mut t = tracker.lock().unwrap_or_else(PoisonError::into_inner);
        for event in batch {
            match event {
                Ok(e) => t.apply(e, &cfg, pods.as_deref()),
                Err(why) => {
                    tracing::debug!(%why, "cni source: undecodable record");
                    bump(&mut t.lost, "decode");
                }
            }
        }
        if timed {
            t.kernel_lost = probe.get_ref().lost(t.kernel_lost);
            t.expire(cfg.timeout);
        }
    }
}

impl Source for CniSource {
    fn name(&self) -> &'static str {
        "cni"
    }

    fn request(&mut self, _epoch: u64) -> bool {
        let update = self
            .tracker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(self.pods.as_deref(), &self.cfg);
        match self.events.try_send(SourceEvent::Mesh(Box::new(update))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(SourceEvent::Mesh(update))) => {
                // Its events go with the next interval's.
                let mut t = self.tracker.lock().unwrap_or_else(PoisonError::into_inner);
                for e in update.events.into_iter().rev() {
                    t.events.push_front(e);
                }
                true
            }
            Err(_) => false,
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.task.abort();
        Box::pin(async move {
            let _ = self.task.await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str, pod: &str) -> Vec<u8> {
        format!(
            "PATH=/bin\0CNI_COMMAND={command}\0CNI_IFNAME=eth0\0CNI_ARGS=K8S_POD_NAMESPACE=ns;K8S_POD_NAME={pod}"
        )
        .into_bytes()
    }

    fn exec(pid: u32, ppid: u32, ts_ns: u64, plugin: &str, command: &str) -> RawEvent {
        RawEvent::Exec {
            pid,
            ppid,
            ts_ns,
            path: format!("/opt/cni/bin/{plugin}"),
            env: env(command, "web"),
            env_truncated: false,
        }
    }

    fn exit(pid: u32, ts_ns: u64, code: i32) -> RawEvent {
        RawEvent::Exit {
            pid,
            ts_ns,
            status: code << 8,
        }
    }

    fn attr<'a>(e: &'a LogEvent, key: &str) -> Option<&'a Value> {
        e.attributes.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    #[test]
    fn a_delegated_plugin_names_its_parent_and_each_execution_counts_once() {
        let cfg = CniEventsConfig::default();
        let mut t = Tracker::default();
        t.apply(exec(10, 1, 1_000_000, "bridge", "ADD"), &cfg, None);
        t.apply(exec(11, 10, 2_000_000, "host-local", "ADD"), &cfg, None);
        t.apply(
            RawEvent::Output {
                pid: 11,
                data: br#"{"ips":[{"address":"10.0.0.5/24","gateway":"10.0.0.1"}]}"#.to_vec(),
            },
            &cfg,
            None,
        );
        t.apply(exit(11, 4_000_000, 0), &cfg, None);
        t.apply(exit(10, 9_000_000, 0), &cfg, None);
        // An exit of a process never seen at exec is not an execution.
        t.apply(exit(99, 9_000_000, 0), &cfg, None);
        let u = t.update(None, &cfg);
        assert_eq!(u.events.len(), 2);
        let child = &u.events[0];
        assert_eq!(
            attr(child, catalogue::CNI_PARENT_PLUGIN),
            Some(&Value::Str("bridge".into()))
        );
        assert_eq!(
            attr(child, catalogue::CNI_IPS),
            Some(&Value::Str("10.0.0.5/24".into()))
        );
        assert_eq!(
            attr(child, catalogue::CNI_DURATION),
            Some(&Value::Double(0.002))
        );
        assert_eq!(attr(&u.events[1], catalogue::CNI_PARENT_PLUGIN), None);
        let ops = &u.groups[0].families[0];
        let total: u64 = ops
            .points
            .iter()
            .map(|p| match p.value {
                PointValue::Int(n) => n,
                _ => 0,
            })
            .sum();
        assert_eq!(total, 2);
        assert!(t.running.is_empty());
    }

    #[test]
    fn an_error_object_is_a_failure_even_with_exit_code_0() {
        let cfg = CniEventsConfig::default();
        let mut t = Tracker::default();
        t.apply(exec(20, 1, 0, "calico", "DEL"), &cfg, None);
        t.apply(
            RawEvent::Output {
                pid: 20,
                data: br#"{"code":11,"msg":"datastore unreachable"}"#.to_vec(),
            },
            &cfg,
            None,
        );
        t.apply(exit(20, 5, 0), &cfg, None);
        let e = &t.update(None, &cfg).events[0];
        assert_eq!(e.severity, Severity::Warn);
        assert_eq!(
            attr(e, catalogue::CNI_RESULT),
            Some(&Value::Str("failure".into()))
        );
        assert_eq!(
            attr(e, catalogue::CNI_ERROR_MESSAGE),
            Some(&Value::Str("datastore unreachable".into()))
        );
        assert_eq!(attr(e, catalogue::CNI_ERROR_CODE), Some(&Value::Int(11)));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let key = |cfg: CniEventsConfig| cfg.validate().map_err(|e| e.to_string());
        assert!(key(CniEventsConfig::default()).is_ok());
        for (cfg, name) in [
            (
                CniEventsConfig {
                    bin_dirs: vec!["opt/cni/bin".into()],
                    ..CniEventsConfig::default()
                },
                "bin_dirs",
            ),
            (
                CniEventsConfig {
                    bin_dirs: Vec::new(),
                    ..CniEventsConfig::default()
                },
                "bin_dirs",
            ),
            (
                CniEventsConfig {
                    ring_buffer_bytes: 100_000,
                    ..CniEventsConfig::default()
                },
                "ring_buffer_bytes",
            ),
            (
                CniEventsConfig {
                    max_records: 0,
                    ..CniEventsConfig::default()
                },
                "max_records",
            ),
        ] {
            let err = key(cfg).expect_err(name);
            assert!(err.contains(name), "{err}");
        }
    }

    /// Every pod `web-N` belongs to the Deployment `web-N`.
    struct Pods;

    impl PodNaming for Pods {
        fn pod(&self, namespace: &str, name: &str) -> Option<Arc<EndName>> {
            name.starts_with("web").then(|| {
                Arc::new(EndName {
                    namespace: Some(namespace.into()),
                    workload_kind: Some("Deployment".into()),
                    workload: Some(name.into()),
                    pod: Some(name.into()),
                    ..EndName::default()
                })
            })
        }
    }

    fn exec_of(pid: u32, pod: &str) -> RawEvent {
        RawEvent::Exec {
            pid,
            ppid: 0,
            ts_ns: 0,
            path: "/opt/cni/bin/bridge".into(),
            env: env("ADD", pod),
            env_truncated: false,
        }
    }

    #[test]
    fn workloads_label_the_series_up_to_max_series_then_overflow() {
        let cfg = CniEventsConfig {
            max_series: 2,
            ..CniEventsConfig::default()
        };
        let mut t = Tracker::default();
        for (pid, pod) in [
            (1, "web-a"),
            (2, "web-a"),
            (3, "web-b"),
            (4, "web-c"),
            (5, "db"),
        ] {
            t.apply(exec_of(pid, pod), &cfg, None);
            t.apply(exit(pid, 1, 0), &cfg, None);
        }
        // Named when the interval is reported.
        let u = t.update(Some(&Pods), &cfg);
        let ops = &u.groups[0].families[0];
        let value = |key: &str, v: &str| -> Vec<u64> {
            ops.points
                .iter()
                .filter(|p| p.labels.iter().any(|(k, x)| k == key && x == v))
                .map(|p| match p.value {
                    PointValue::Int(n) => n,
                    _ => 0,
                })
                .collect()
        };
        assert_eq!(value(catalogue::K8S_DEPLOYMENT, "web-a"), vec![2]);
        assert_eq!(value(catalogue::K8S_DEPLOYMENT, "web-b"), vec![1]);
        // The third workload and the unknown pod fold into one series.
        let folded: Vec<&Point> = ops.points.iter().filter(|p| p.overflow).collect();
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].value, PointValue::Int(2));
        assert_eq!(folded[0].labels.len(), 3, "{:?}", folded[0].labels);
        assert_eq!(ops.points.len(), 3);
        assert_eq!(t.series_folded, 2);
        let first = &u.events[0];
        assert_eq!(
            attr(first, catalogue::K8S_DEPLOYMENT),
            Some(&Value::Str("web-a".into()))
        );
        assert_eq!(attr(&u.events[4], catalogue::K8S_WORKLOAD), None);
    }

    #[test]
    fn a_pod_named_at_its_exit_keeps_the_name_when_gone_by_the_export() {
        let cfg = CniEventsConfig::default();
        let mut t = Tracker::default();
        t.apply(exec_of(1, "web-a"), &cfg, Some(&Pods));
        t.apply(exit(1, 1, 0), &cfg, Some(&Pods));
        // Deleted from the cache before the export: no naming then.
        let u = t.update(None, &cfg);
        assert_eq!(
            attr(&u.events[0], catalogue::K8S_DEPLOYMENT),
            Some(&Value::Str("web-a".into()))
        );
    }

    #[test]
    fn what_cannot_be_kept_is_counted() {
        let cfg = CniEventsConfig {
            max_running: 1,
            max_records: 1,
            ..CniEventsConfig::default()
        };
        let mut t = Tracker::default();
        t.apply(exec(1, 0, 0, "bridge", "ADD"), &cfg, None);
        t.apply(exec(2, 0, 0, "bridge", "ADD"), &cfg, None);
        assert_eq!(t.lost.get("running_full"), Some(&1));
        t.expire(Duration::ZERO);
        assert_eq!(t.lost.get("unfinished"), Some(&1));
        for pid in [3, 4] {
            t.apply(exec(pid, 0, 0, "bridge", "CHECK"), &cfg, None);
            t.apply(exit(pid, 1, 0), &cfg, None);
        }
        // Beyond max_records exited plugins, the oldest is counted at once.
        assert_eq!((t.done.len(), t.operations.values().sum::<u64>()), (1, 1));
        let u = t.update(None, &cfg);
        assert_eq!(t.records_dropped, 1);
        assert_eq!(u.events.len(), 1);
        assert_eq!(t.operations.values().sum::<u64>(), 2);
    }
}
