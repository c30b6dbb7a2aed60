//! Configuration: defaults < YAML file < `OTEL_*` variables < `FLOWTEL_*`
//! variables < command-line flags.
//!
//! Every key has a default so `flowtel run` works with no file at all. A bad
//! value is reported with the dotted key that holds it and what to do, never
//! a panic: operators read these messages in `kubectl logs`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration. `deny_unknown_fields` everywhere: a typo in a key
/// is an error, not a silently ignored setting.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which kernel source counts flows.
    pub source: SourceChoice,
    /// How often flows are aggregated and exported.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub conntrack: ConntrackConfig,
    pub ebpf: crate::source::ebpf::EbpfConfig,
    pub flows: FlowsConfig,
    /// How both ends of a flow are named.
    pub enrich: crate::enrich::EnrichConfig,
    /// The Kubernetes API, read to name pods, workloads, services and nodes.
    pub kubernetes: crate::enrich::kubernetes::KubernetesConfig,
    pub export: ExportConfig,
    pub resource: ResourceConfig,
    pub health: HealthConfig,
    pub log: LogConfig,
    /// Cilium Hubble's Observer API on the node.
    pub hubble: crate::source::hubble::HubbleConfig,
    /// Istio proxies and Calico Felix, scraped.
    pub mesh: crate::source::mesh::MeshConfig,
    /// Where the CNI, Hubble and Felix are looked for.
    pub detect: crate::source::detect::DetectConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            source: SourceChoice::Auto,
            interval: Duration::from_secs(10),
            conntrack: ConntrackConfig::default(),
            ebpf: crate::source::ebpf::EbpfConfig::default(),
            flows: FlowsConfig::default(),
            enrich: crate::enrich::EnrichConfig::default(),
            kubernetes: crate::enrich::kubernetes::KubernetesConfig::default(),
            export: ExportConfig::default(),
            resource: ResourceConfig::default(),
            health: HealthConfig::default(),
            log: LogConfig::default(),
            hubble: crate::source::hubble::HubbleConfig::default(),
            mesh: crate::source::mesh::MeshConfig::default(),
            detect: crate::source::detect::DetectConfig::default(),
        }
    }
}

/// Kernel source selection. `auto` tries eBPF and falls back to conntrack,
/// saying why, where eBPF cannot load (old kernel, no BTF, no CAP_BPF).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceChoice {
    Auto,
    Ebpf,
    Conntrack,
}

/// How conntrack is read.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConntrackMode {
    /// ctnetlink, falling back to procfs when netlink is not permitted.
    Auto,
    Netlink,
    Procfs,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConntrackConfig {
    pub mode: ConntrackMode,
    /// Read the conntrack table of this network namespace (a path such as
    /// `/var/run/netns/NAME` or `/proc/PID/ns/net`) instead of flowtel's own.
    pub netns: Option<PathBuf>,
    /// Subscribe to NEW/DESTROY events so connections that end between two
    /// dumps still count their final bytes.
    pub events: bool,
    /// Turn on `net.netfilter.nf_conntrack_acct` if it is off; without it the
    /// kernel keeps no byte or packet counters.
    pub enable_accounting: bool,
    /// Add a match-only nft rule so the kernel tracks connections in a
    /// namespace where no firewall, kube-proxy or container runtime does
    /// (removed on exit). Off by default: nodes normally need no help.
    pub ensure_tracking: bool,
    /// The procfs table, used in `procfs` mode or when netlink is refused.
    pub proc_path: PathBuf,
    /// Receive buffer for the event socket, in bytes (set with
    /// `SO_RCVBUFFORCE`; a bigger buffer loses fewer events in bursts).
    pub event_buffer_bytes: usize,
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self {
            mode: ConntrackMode::Auto,
            netns: None,
            events: true,
            enable_accounting: true,
            ensure_tracking: false,
            proc_path: PathBuf::from("/proc/net/nf_conntrack"),
            event_buffer_bytes: 16 * 1024 * 1024,
        }
    }
}

/// One field of the aggregation key.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum KeyField {
    ClientAddress,
    /// Off by default: ephemeral client ports are unbounded cardinality.
    ClientPort,
    ServerAddress,
    ServerPort,
    Transport,
    /// Bytes client→server and server→client as separate points.
    Direction,
    /// The translated ends of NAT'ed flows (the backend behind a VIP).
    Nat,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsConfig {
    /// Hard cap on connections tracked for delta computation.
    pub max_flows: usize,
    /// Hard cap on metric series; further series fold into one overflow series.
    pub max_series: usize,
    /// Attributes that identify a series.
    pub key: Vec<KeyField>,
    /// A series with no traffic for this long is forgotten (its cumulative
    /// counter restarts if it comes back).
    #[serde(with = "humantime_serde")]
    pub series_idle_timeout: Duration,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            max_flows: 262_144,
            max_series: 20_000,
            key: vec![
                KeyField::ClientAddress,
                KeyField::ServerAddress,
                KeyField::ServerPort,
                KeyField::Transport,
                KeyField::Direction,
                KeyField::Nat,
            ],
            series_idle_timeout: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    pub otlp: OtlpConfig,
    pub console: ConsoleConfig,
    pub prometheus: PrometheusConfig,
    /// OTLP log events: flow records, connection and drop events.
    pub logs: crate::export::otlp_logs::LogsConfig,
    pub metrics: MetricsConfig,
}

/// How metrics are shaped, whichever way they leave (OTLP or Prometheus).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Per metric, the attributes it keeps; the others are summed over.
    /// A list, because metric names hold dots that a map key would split.
    pub attributes: Vec<AttributeSelection>,
}

/// One metric's kept attributes, e.g.
/// `{metric: flowtel.flow.packets, keep: [server.port, network.transport]}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributeSelection {
    pub metric: String,
    pub keep: Vec<String>,
}

/// The Prometheus exposition endpoint, for stacks that scrape instead of
/// running a Collector. Off by default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Where `/metrics` listens, e.g. `0.0.0.0:9811`; empty disables it.
    pub listen: String,
}

/// OTLP wire protocol, named as in `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
pub enum Protocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    fn parse(value: &str) -> Option<Self> {
        match value {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Temporality {
    Cumulative,
    Delta,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// Base URL of the collector, e.g. `http://localhost:4317` for gRPC or
    /// `http://localhost:4318` for HTTP. Empty: no OTLP export.
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: BTreeMap<String, String>,
    pub compression: Compression,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub temporality: Temporality,
    /// Requests are cut below this many bytes (before compression), so a
    /// Collector's gRPC receiver (4 MiB by default) takes every one.
    pub max_request_bytes: usize,
    pub tls: TlsConfig,
    pub retry: RetryConfig,
    /// Per-signal overrides (`OTEL_EXPORTER_OTLP_METRICS_*`).
    pub metrics: SignalOverrides,
    /// Per-signal overrides (`OTEL_EXPORTER_OTLP_LOGS_*`).
    pub logs: SignalOverrides,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: Protocol::Grpc,
            headers: BTreeMap::new(),
            compression: Compression::Gzip,
            timeout: Duration::from_secs(10),
            temporality: Temporality::Cumulative,
            max_request_bytes: 3 << 20,
            tls: TlsConfig::default(),
            retry: RetryConfig::default(),
            metrics: SignalOverrides::default(),
            logs: SignalOverrides::default(),
        }
    }
}

/// Settings of one signal that, when set, win over the shared ones. A
/// per-signal endpoint is used as is (no `/v1/metrics` is appended), as the
/// OpenTelemetry specification says.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SignalOverrides {
    pub endpoint: Option<String>,
    pub protocol: Option<Protocol>,
    pub headers: Option<BTreeMap<String, String>>,
    pub compression: Option<Compression>,
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM bundle of CAs that sign the collector's certificate. Without it an
    /// `https` endpoint is checked against the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS; set both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per export, the first included; 1 disables retries.
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// When flows are printed to the terminal.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleMode {
    /// Only when no OTLP endpoint is configured.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleFormat {
    /// A table refreshed every interval.
    Table,
    /// One JSON object a line per series per interval.
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    pub format: ConsoleFormat,
    /// Rows shown in the table (busiest first).
    pub rows: usize,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            mode: ConsoleMode::Auto,
            format: ConsoleFormat::Table,
            rows: 25,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceConfig {
    /// `service.name`; `OTEL_SERVICE_NAME` sets it too.
    pub service_name: String,
    /// `k8s.cluster.name`, when known.
    pub cluster_name: Option<String>,
    /// `k8s.node.name`; defaults to `K8S_NODE_NAME` from the downward API.
    pub node_name: Option<String>,
    /// Extra resource attributes; `OTEL_RESOURCE_ATTRIBUTES` adds to these.
    pub attributes: BTreeMap<String, String>,
}

impl Default for ResourceConfig {
    fn default() -> Self {
        Self {
            service_name: "flowtel".into(),
            cluster_name: None,
            node_name: None,
            attributes: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Where `/healthz` and `/readyz` listen; empty disables them.
    pub listen: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9810".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `flowtel=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// A configuration problem, always tied to the key (or variable) that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration at `{}`: {}",
            self.key, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// Values given on the command line; each wins over every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub source: Option<String>,
    pub interval: Option<String>,
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub console_format: Option<String>,
    pub netns: Option<PathBuf>,
    pub health_listen: Option<String>,
    pub ensure_tracking: bool,
}

/// Loads and validates the configuration. `env` is the process environment
/// (passed in so tests need not mutate the real one).
pub fn load(
    file: Option<&Path>,
    env: &HashMap<String, String>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::new(
                "--config",
                format!("{} is not a readable file", path.display()),
            ));
        }
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Yaml)
                .required(true),
        );
    }
    for (key, value) in otel_env(env)? {
        builder = builder
            .set_override(&key, value)
            .map_err(|e| ConfigError::new(key, e.to_string()))?;
    }
    let flowtel_env: HashMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("FLOWTEL_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("FLOWTEL")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("flows.key")
            .source(Some(flowtel_env.into_iter().collect())),
    );
    let flag_values = [
        ("source", &overrides.source),
        ("interval", &overrides.interval),
        ("export.otlp.endpoint", &overrides.endpoint),
        ("export.otlp.protocol", &overrides.protocol),
        ("export.console.format", &overrides.console_format),
        ("health.listen", &overrides.health_listen),
    ];
    for (key, value) in flag_values {
        if let Some(value) = value {
            builder = builder
                .set_override(key, value.as_str())
                .map_err(|e| ConfigError::new(key, e.to_string()))?;
        }
    }
    if overrides.ensure_tracking {
        builder = builder
            .set_override("conntrack.ensure_tracking", true)
            .map_err(|e| ConfigError::new("conntrack.ensure_tracking", e.to_string()))?;
    }
    if let Some(netns) = &overrides.netns {
        for key in ["conntrack.netns", "ebpf.netns"] {
            builder = builder
                .set_override(key, netns.to_string_lossy().as_ref())
                .map_err(|e| ConfigError::new(key, e.to_string()))?;
        }
    }
    let merged = builder.build().map_err(|e| from_config_error(&e))?;
    let mut cfg: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." || path.is_empty() {
            "(top level)".to_string()
        } else {
            path
        };
        let mut reason = e.inner().to_string();
        let var = format!("FLOWTEL_{}", key.to_ascii_uppercase().replace('.', "__"));
        if env.contains_key(&var) {
            reason.push_str(&format!(" (set by the environment variable {var})"));
        }
        ConfigError::new(key, reason)
    })?;
    if cfg.resource.node_name.is_none() {
        cfg.resource.node_name = env.get("K8S_NODE_NAME").cloned().filter(|s| !s.is_empty());
    }
    validate(&cfg)?;
    Ok(cfg)
}

fn from_config_error(e: &config::ConfigError) -> ConfigError {
    match e {
        config::ConfigError::Type { key: Some(key), .. } => {
            ConfigError::new(key.clone(), e.to_string())
        }
        config::ConfigError::FileParse { uri, cause } => ConfigError::new(
            "--config",
            format!(
                "{} is not valid YAML: {cause}",
                uri.as_deref().unwrap_or("the file")
            ),
        ),
        other => ConfigError::new("(configuration)", other.to_string()),
    }
}

/// Maps the standard OpenTelemetry variables onto flowtel keys. A malformed
/// value is an error naming the variable.
fn otel_env(env: &HashMap<String, String>) -> Result<Vec<(String, config::Value)>, ConfigError> {
    let mut out: Vec<(String, config::Value)> = Vec::new();
    let get = |name: &str| env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let signals: [(&str, &str); 3] = [
        ("", "export.otlp"),
        ("METRICS_", "export.otlp.metrics"),
        ("LOGS_", "export.otlp.logs"),
    ];
    for (infix, prefix) in signals {
        let var = |suffix: &str| format!("OTEL_EXPORTER_OTLP_{infix}{suffix}");
        if let Some(v) = get(&var("ENDPOINT")) {
            out.push((format!("{prefix}.endpoint"), v.into()));
        }
        if let Some(v) = get(&var("PROTOCOL")) {
            if Protocol::parse(v).is_none() {
                return Err(ConfigError::new(
                    var("PROTOCOL"),
                    format!("unsupported protocol {v:?}; use \"grpc\" or \"http/protobuf\""),
                ));
            }
            out.push((format!("{prefix}.protocol"), v.into()));
        }
        if let Some(v) = get(&var("COMPRESSION")) {
            if !matches!(v, "gzip" | "zstd" | "none") {
                return Err(ConfigError::new(
                    var("COMPRESSION"),
                    format!("unsupported compression {v:?}; use \"gzip\", \"zstd\" or \"none\""),
                ));
            }
            out.push((format!("{prefix}.compression"), v.into()));
        }
        if let Some(v) = get(&var("TIMEOUT")) {
            let ms: u64 = v.parse().map_err(|_| {
                ConfigError::new(
                    var("TIMEOUT"),
                    format!("{v:?} is not a whole number of milliseconds"),
                )
            })?;
            out.push((format!("{prefix}.timeout"), format!("{ms}ms").into()));
        }
        if let Some(v) = get(&var("HEADERS")) {
            let headers =
                parse_kv_list(v).map_err(|reason| ConfigError::new(var("HEADERS"), reason))?;
            out.push((format!("{prefix}.headers"), to_table(headers)));
        }
    }
    if let Some(v) = get("OTEL_EXPORTER_OTLP_CERTIFICATE") {
        out.push(("export.otlp.tls.ca_file".into(), v.into()));
    }
    if let Some(v) = get("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE") {
        out.push(("export.otlp.tls.cert_file".into(), v.into()));
    }
    if let Some(v) = get("OTEL_EXPORTER_OTLP_CLIENT_KEY") {
        out.push(("export.otlp.tls.key_file".into(), v.into()));
    }
    if let Some(v) = get("OTEL_METRIC_EXPORT_INTERVAL") {
        let ms: u64 = v.parse().map_err(|_| {
            ConfigError::new(
                "OTEL_METRIC_EXPORT_INTERVAL",
                format!("{v:?} is not a whole number of milliseconds"),
            )
        })?;
        out.push(("interval".into(), format!("{ms}ms").into()));
    }
    if let Some(v) = get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE") {
        let t = match v.to_ascii_lowercase().as_str() {
            "cumulative" => "cumulative",
            "delta" => "delta",
            _ => {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
                    format!("unsupported temporality {v:?}; use \"cumulative\" or \"delta\""),
                ))
            }
        };
        out.push(("export.otlp.temporality".into(), t.into()));
    }
    if let Some(v) = get("OTEL_SERVICE_NAME") {
        out.push(("resource.service_name".into(), v.into()));
    }
    if let Some(v) = get("OTEL_RESOURCE_ATTRIBUTES") {
        let attrs = parse_kv_list(v)
            .map_err(|reason| ConfigError::new("OTEL_RESOURCE_ATTRIBUTES", reason))?;
        out.push(("resource.attributes".into(), to_table(attrs)));
    }
    Ok(out)
}

fn to_table(pairs: Vec<(String, String)>) -> config::Value {
    let map: HashMap<String, config::Value> =
        pairs.into_iter().map(|(k, v)| (k, v.into())).collect();
    config::Value::from(map)
}

/// Parses the W3C-baggage-like `k1=v1,k2=v2` lists of the OTel variables,
/// percent-decoding values.
pub fn parse_kv_list(value: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not of the form key=value"))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("{item:?} has an empty key"));
        }
        let v =
            url::form_urlencoded::parse(format!("v={}", v.trim().replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
        out.push((k.to_string(), v));
    }
    Ok(out)
}

fn validate(cfg: &Config) -> Result<(), ConfigError> {
    if cfg.interval.is_zero() {
        return Err(ConfigError::new(
            "interval",
            "must be greater than 0, e.g. \"10s\"",
        ));
    }
    if cfg.flows.max_flows == 0 {
        return Err(ConfigError::new("flows.max_flows", "must be at least 1"));
    }
    if cfg.flows.max_series < 2 {
        return Err(ConfigError::new(
            "flows.max_series",
            "must be at least 2 (one series plus the overflow series)",
        ));
    }
    if cfg.flows.key.is_empty() {
        return Err(ConfigError::new(
            "flows.key",
            "must name at least one field (client_address, client_port, server_address, server_port, transport, direction, nat)",
        ));
    }
    if cfg.flows.series_idle_timeout < cfg.interval {
        return Err(ConfigError::new(
            "flows.series_idle_timeout",
            "must be at least one interval, or every series would be forgotten before it is exported",
        ));
    }
    if let Err(e) =
        crate::enrich::cidr::NamedNetworks::new(&cfg.enrich.networks, &cfg.enrich.unmatched_network)
    {
        return Err(ConfigError::new("enrich.networks", e));
    }
    if cfg.conntrack.event_buffer_bytes < 65_536 {
        return Err(ConfigError::new(
            "conntrack.event_buffer_bytes",
            "must be at least 65536",
        ));
    }
    crate::source::mesh::validate(&cfg.mesh)
        .map_err(|(key, reason)| ConfigError::new(key, reason))?;
    if cfg.hubble.max_series < 2 {
        return Err(ConfigError::new(
            "hubble.max_series",
            "must be at least 2 (one series plus the overflow series)",
        ));
    }
    if cfg.hubble.reconnect_backoff_max.is_zero() || cfg.hubble.log_interval.is_zero() {
        return Err(ConfigError::new(
            if cfg.hubble.log_interval.is_zero() {
                "hubble.log_interval"
            } else {
                "hubble.reconnect_backoff_max"
            },
            "must be greater than 0, e.g. \"30s\"",
        ));
    }
    if cfg.export.console.rows == 0 {
        return Err(ConfigError::new(
            "export.console.rows",
            "must be at least 1",
        ));
    }
    if !cfg.export.prometheus.listen.is_empty()
        && cfg.export.prometheus.listen.parse::<SocketAddr>().is_err()
    {
        return Err(ConfigError::new(
            "export.prometheus.listen",
            format!(
                "{:?} is not an address and port, e.g. \"0.0.0.0:9811\"",
                cfg.export.prometheus.listen
            ),
        ));
    }
    for (i, AttributeSelection { metric, keep }) in cfg.export.metrics.attributes.iter().enumerate()
    {
        if !crate::export::selection::SELECTABLE.contains(&metric.as_str()) {
            return Err(ConfigError::new(
                format!("export.metrics.attributes[{i}].metric"),
                format!(
                    "is not a metric whose attributes can be selected; one of: {}",
                    crate::export::selection::SELECTABLE.join(", ")
                ),
            ));
        }
        if keep.iter().any(|k| k.trim().is_empty()) {
            return Err(ConfigError::new(
                format!("export.metrics.attributes[{i}].keep"),
                "lists an empty attribute name",
            ));
        }
    }
    cfg.export
        .logs
        .validate()
        .map_err(|e| ConfigError::new(e.key, e.reason))?;
    let otlp = &cfg.export.otlp;
    if !otlp.endpoint.is_empty() {
        check_url("export.otlp.endpoint", &otlp.endpoint)?;
    }
    for (signal, o) in [("metrics", &otlp.metrics), ("logs", &otlp.logs)] {
        if let Some(endpoint) = &o.endpoint {
            check_url(&format!("export.otlp.{signal}.endpoint"), endpoint)?;
        }
        if o.timeout.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::new(
                format!("export.otlp.{signal}.timeout"),
                "must be greater than 0",
            ));
        }
        if let Some(headers) = &o.headers {
            check_headers(&format!("export.otlp.{signal}.headers"), headers)?;
        }
    }
    if otlp.timeout.is_zero() {
        return Err(ConfigError::new(
            "export.otlp.timeout",
            "must be greater than 0, e.g. \"10s\"",
        ));
    }
    check_headers("export.otlp.headers", &otlp.headers)?;
    if otlp.max_request_bytes < 64 << 10 {
        return Err(ConfigError::new(
            "export.otlp.max_request_bytes",
            "must be at least 65536; a Collector's gRPC receiver takes 4194304 (4 MiB) by default",
        ));
    }
    if otlp.retry.max_attempts == 0 {
        return Err(ConfigError::new(
            "export.otlp.retry.max_attempts",
            "must be at least 1 (1 = no retries)",
        ));
    }
    if otlp.retry.initial_backoff > otlp.retry.max_backoff {
        return Err(ConfigError::new(
            "export.otlp.retry.initial_backoff",
            "must not exceed export.otlp.retry.max_backoff",
        ));
    }
    let tls = &otlp.tls;
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        return Err(ConfigError::new(
            if tls.cert_file.is_some() {
                "export.otlp.tls.key_file"
            } else {
                "export.otlp.tls.cert_file"
            },
            "mutual TLS needs both cert_file and key_file",
        ));
    }
    for (key, file) in [
        ("export.otlp.tls.ca_file", &tls.ca_file),
        ("export.otlp.tls.cert_file", &tls.cert_file),
        ("export.otlp.tls.key_file", &tls.key_file),
    ] {
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    key,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
    }
    if cfg.ebpf.max_flows == 0 {
        return Err(ConfigError::new("ebpf.max_flows", "must be at least 1"));
    }
    if cfg.ebpf.nat_max_entries == 0 && cfg.ebpf.nat != crate::source::ebpf::NatMode::Off {
        return Err(ConfigError::new(
            "ebpf.nat_max_entries",
            "must be at least 1 (or set ebpf.nat: off)",
        ));
    }
    if cfg.ebpf.interfaces_include.is_empty() {
        return Err(ConfigError::new(
            "ebpf.interfaces_include",
            "must name at least one interface pattern, e.g. [\"*\"]",
        ));
    }
    if let Some(netns) = &cfg.ebpf.netns {
        if !netns.exists() {
            return Err(ConfigError::new(
                "ebpf.netns",
                format!(
                    "{} does not exist; give a path like /var/run/netns/NAME",
                    netns.display()
                ),
            ));
        }
    }
    if let Some(netns) = &cfg.conntrack.netns {
        if !netns.exists() {
            return Err(ConfigError::new(
                "conntrack.netns",
                format!(
                    "{} does not exist; give a path like /var/run/netns/NAME",
                    netns.display()
                ),
            ));
        }
    }
    if !cfg.health.listen.is_empty() && cfg.health.listen.parse::<SocketAddr>().is_err() {
        return Err(ConfigError::new(
            "health.listen",
            format!(
                "{:?} is not an address:port such as 127.0.0.1:9810",
                cfg.health.listen
            ),
        ));
    }
    if cfg.resource.service_name.is_empty() {
        return Err(ConfigError::new(
            "resource.service_name",
            "must not be empty",
        ));
    }
    if tracing_subscriber::EnvFilter::try_new(&cfg.log.level).is_err() {
        return Err(ConfigError::new(
            "log.level",
            format!(
                "{:?} is not a log filter such as \"info\" or \"flowtel=debug\"",
                cfg.log.level
            ),
        ));
    }
    Ok(())
}

fn check_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(value).map_err(|e| {
        ConfigError::new(
            key,
            format!("{value:?} is not a URL ({e}); expected e.g. http://localhost:4317"),
        )
    })?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(ConfigError::new(
            key,
            format!(
                "scheme {:?} is not supported; use http:// or https://",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(key, format!("{value:?} has no host")));
    }
    Ok(())
}

fn check_headers(key: &str, headers: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (name, value) in headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(ConfigError::new(
                format!("{key}.{name}"),
                "is not a valid HTTP header name",
            ));
        }
        if http::HeaderValue::from_str(value).is_err() {
            return Err(ConfigError::new(
                format!("{key}.{name}"),
                "is not a valid HTTP header value",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = load(None, &HashMap::new(), &Overrides::default()).expect("defaults load");
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f.yaml");
        std::fs::write(
            &file,
            "interval: 3s\nexport:\n  otlp:\n    endpoint: http://file:4317\n",
        )
        .expect("write");
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-a=1,x-b=two%20words"),
            ("FLOWTEL_INTERVAL", "4s"),
            ("FLOWTEL_FLOWS__KEY", "server_address,server_port"),
        ]);
        let cfg = load(Some(&file), &e, &Overrides::default()).expect("loads");
        assert_eq!(cfg.interval, Duration::from_secs(4));
        assert_eq!(cfg.export.otlp.endpoint, "http://otel:4317");
        assert_eq!(
            cfg.export.otlp.headers.get("x-b").map(String::as_str),
            Some("two words")
        );
        assert_eq!(
            cfg.flows.key,
            vec![KeyField::ServerAddress, KeyField::ServerPort]
        );
        let flags = Overrides {
            interval: Some("5s".into()),
            ..Default::default()
        };
        let cfg = load(Some(&file), &e, &flags).expect("loads");
        assert_eq!(cfg.interval, Duration::from_secs(5));
    }

    #[test]
    fn compression_comes_from_the_otel_variables() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
            ("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "none"),
        ]);
        let cfg = load(None, &e, &Overrides::default()).expect("loads");
        assert_eq!(cfg.export.otlp.compression, Compression::Zstd);
        assert_eq!(cfg.export.otlp.logs.compression, Some(Compression::None));
        let bad = env(&[("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION", "brotli")]);
        let err = load(None, &bad, &Overrides::default())
            .expect_err("brotli is refused")
            .to_string();
        assert!(
            err.contains("OTEL_EXPORTER_OTLP_METRICS_COMPRESSION")
                && err.contains("\"gzip\", \"zstd\" or \"none\""),
            "{err}"
        );
    }

    #[test]
    fn kv_lists_decode_percent_escapes() {
        let parsed = parse_kv_list("a=1, b = x%3Dy ,c=").expect("parses");
        assert_eq!(
            parsed,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x=y".into()),
                ("c".into(), String::new())
            ]
        );
        assert!(parse_kv_list("novalue").is_err());
    }
}
