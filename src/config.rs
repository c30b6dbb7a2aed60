//! Loading the configuration: defaults < YAML file < `OTEL_*` variables <
//! `FLOWTEL_*` variables < command-line flags, then each component checks
//! its own section. The settings themselves live with their components.
//!
//! Every key has a default so `flowtel run` works with no file at all. A bad
//! value is reported with the dotted key that holds it and what to do, never
//! a panic: operators read these messages in `kubectl logs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::component::positive;
pub use crate::component::ConfigError;
use crate::enrich::kubernetes::KubernetesConfig;
use crate::enrich::EnrichConfig;
use crate::export::otlp::Protocol;
use crate::export::resource::ResourceConfig;
use crate::export::ExportConfig;
use crate::flow::FlowsConfig;
use crate::health::HealthConfig;
use crate::source::cni::CniEventsConfig;
use crate::source::conntrack::ConntrackConfig;
use crate::source::detect::DetectConfig;
use crate::source::ebpf::EbpfConfig;
use crate::source::felix::FelixConfig;
use crate::source::firewall::FirewallConfig;
use crate::source::hubble::HubbleConfig;
use crate::source::istio::IstioConfig;
use crate::source::kernel::SourceChoice;

/// The whole configuration: one section per component. `deny_unknown_fields`
/// everywhere: a typo in a key is an error, not a silently ignored setting.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which kernel source counts flows.
    pub source: SourceChoice,
    /// How often flows are aggregated and exported.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub conntrack: ConntrackConfig,
    pub ebpf: EbpfConfig,
    pub flows: FlowsConfig,
    /// How both ends of a flow are named.
    pub enrich: EnrichConfig,
    /// The Kubernetes API, read to name pods, workloads, services and nodes.
    pub kubernetes: KubernetesConfig,
    pub export: ExportConfig,
    pub resource: ResourceConfig,
    pub health: HealthConfig,
    pub log: LogConfig,
    /// Cilium Hubble's Observer API on the node.
    pub hubble: HubbleConfig,
    /// Istio proxies and Calico Felix, scraped.
    pub mesh: MeshConfig,
    /// Where the CNI, Hubble and Felix are looked for.
    pub detect: DetectConfig,
    /// CNI plugin executions, traced in the kernel.
    pub cni: CniEventsConfig,
    /// The node's firewall rule counters (nftables, legacy xtables).
    pub firewall: FirewallConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            source: SourceChoice::Auto,
            interval: Duration::from_secs(10),
            conntrack: ConntrackConfig::default(),
            ebpf: EbpfConfig::default(),
            flows: FlowsConfig::default(),
            enrich: EnrichConfig::default(),
            kubernetes: KubernetesConfig::default(),
            export: ExportConfig::default(),
            resource: ResourceConfig::default(),
            health: HealthConfig::default(),
            log: LogConfig::default(),
            hubble: HubbleConfig::default(),
            mesh: MeshConfig::default(),
            detect: DetectConfig::default(),
            cni: CniEventsConfig::default(),
            firewall: FirewallConfig::default(),
        }
    }
}

/// The `mesh:` section: the scraped sources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    pub istio: IstioConfig,
    pub felix: FelixConfig,
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

/// `FLOWTEL_` variables that name no configuration key: the file to read
/// (`--config`).
const NOT_KEYS: &[&str] = &["FLOWTEL_CONFIG"];

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
        .filter(|(k, _)| k.starts_with("FLOWTEL_") && !NOT_KEYS.contains(&k.as_str()))
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
        for key in ["conntrack.netns", "ebpf.netns", "firewall.netns"] {
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
    let signals: [(&str, &str); 4] = [
        ("", "export.otlp"),
        ("METRICS_", "export.otlp.metrics"),
        ("LOGS_", "export.otlp.logs"),
        ("TRACES_", "export.otlp.traces"),
    ];
    for (infix, prefix) in signals {
        let var = |suffix: &str| format!("OTEL_EXPORTER_OTLP_{infix}{suffix}");
        if let Some(v) = get(&var("ENDPOINT")) {
            out.push((format!("{prefix}.endpoint"), v.into()));
        }
        if let Some(v) = get(&var("PROTOCOL")) {
            Protocol::parse(v).map_err(|reason| ConfigError::new(var("PROTOCOL"), reason))?;
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
        if let Some(v) = get(&var("INSECURE")) {
            let insecure = match v.to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(ConfigError::new(
                        var("INSECURE"),
                        format!("{v:?} is not a boolean; use \"true\" or \"false\""),
                    ))
                }
            };
            out.push((format!("{prefix}.insecure"), insecure.into()));
        }
        for (suffix, key) in [
            ("CERTIFICATE", "ca_file"),
            ("CLIENT_CERTIFICATE", "cert_file"),
            ("CLIENT_KEY", "key_file"),
        ] {
            if let Some(v) = get(&var(suffix)) {
                out.push((format!("{prefix}.tls.{key}"), v.into()));
            }
        }
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

/// Every section checks its own keys; the error says which section.
fn validate(cfg: &Config) -> Result<(), ConfigError> {
    positive("interval", cfg.interval, "10s")?;
    if tracing_subscriber::EnvFilter::try_new(&cfg.log.level).is_err() {
        return Err(ConfigError::new(
            "log.level",
            format!(
                "{:?} is not a log filter such as \"info\" or \"flowtel=debug\"",
                cfg.log.level
            ),
        ));
    }
    let within = |section: &'static str| move |e: ConfigError| e.within(section);
    cfg.flows.validate(cfg.interval).map_err(within("flows"))?;
    cfg.enrich.validate().map_err(within("enrich"))?;
    cfg.kubernetes.validate().map_err(within("kubernetes"))?;
    cfg.conntrack.validate().map_err(within("conntrack"))?;
    cfg.ebpf.validate().map_err(within("ebpf"))?;
    cfg.hubble.validate().map_err(within("hubble"))?;
    cfg.mesh.istio.validate().map_err(within("mesh.istio"))?;
    cfg.mesh.felix.validate().map_err(within("mesh.felix"))?;
    cfg.cni.validate().map_err(within("cni"))?;
    cfg.firewall.validate().map_err(within("firewall"))?;
    cfg.export.validate().map_err(within("export"))?;
    cfg.resource.validate().map_err(within("resource"))?;
    cfg.health.validate().map_err(within("health"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::export::otlp::Compression;
    use crate::flow::series::KeyField;

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
    fn insecure_and_per_signal_certificates_come_from_the_otel_variables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (shared, logs) = (dir.path().join("shared.pem"), dir.path().join("logs.pem"));
        std::fs::write(&shared, "").expect("write");
        std::fs::write(&logs, "").expect("write");
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "otel:4317"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "TRUE"),
            ("OTEL_EXPORTER_OTLP_METRICS_INSECURE", "false"),
            (
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                shared.to_str().expect("utf-8"),
            ),
            (
                "OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE",
                logs.to_str().expect("utf-8"),
            ),
        ]);
        let otlp = load(None, &e, &Overrides::default())
            .expect("loads")
            .export
            .otlp;
        assert!(otlp.insecure);
        assert_eq!(otlp.metrics.insecure, Some(false));
        assert_eq!(otlp.tls.ca_file.as_deref(), Some(shared.as_path()));
        assert_eq!(otlp.logs.tls.ca_file.as_deref(), Some(logs.as_path()));
        assert_eq!(otlp.metrics.tls.ca_file, None);
        for (var, value, says) in [
            (
                "OTEL_EXPORTER_OTLP_INSECURE",
                "yes",
                "\"true\" or \"false\"",
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "http/json",
                "use \"http/protobuf\"",
            ),
            (
                "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL",
                "http/json",
                "use \"http/protobuf\"",
            ),
        ] {
            let err = load(None, &env(&[(var, value)]), &Overrides::default())
                .expect_err("refused")
                .to_string();
            assert!(err.contains(var) && err.contains(says), "{err}");
        }
    }

    #[test]
    fn the_file_variable_is_not_a_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f.yaml");
        std::fs::write(&file, "interval: 3s\n").expect("write");
        let e = env(&[("FLOWTEL_CONFIG", file.to_str().expect("utf-8 path"))]);
        let cfg = load(Some(&file), &e, &Overrides::default()).expect("loads");
        assert_eq!(cfg.interval, Duration::from_secs(3));
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
