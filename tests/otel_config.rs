//! The OpenTelemetry Collector configurations in `otel-config/`.
//!
//! * Every file passes the structural check of `tests/common/otel_config.rs`
//!   (YAML parses; every component a pipeline names is defined and can carry
//!   the pipeline's signal; memory_limiter first, batch present; nothing
//!   defined and unused), and the check rejects broken variants of the
//!   agent's configuration, one fault each.
//! * Each file does its job: the agent receives OTLP gRPC and HTTP and
//!   forwards metrics and logs to the gateway's OTLP port; the gateways send
//!   metrics by remote write or OTLP, logs to Loki's OTLP endpoint and traces
//!   to Tempo.
//! * A real Collector validates every file (`otelcol validate`, which also
//!   builds the pipelines): the only one the reachable registries have is an
//!   otelcol-contrib 0.135.0 build with few components (filelog receiver,
//!   batch and memory_limiter processors, otlphttp exporter; see
//!   otel-config/README.md), so each file is validated with the components
//!   that build has, the others replaced by stand-ins, and the test prints
//!   which. It must also reject a memory_limiter whose spike limit is above
//!   its limit, so the validation is not a formality. The binary is a
//!   third-party build: as root it runs as `nobody`.
//!
//! The Collector is `$OTELCOL_CONTRIB` (scripts/env.sh) or the install
//! location of scripts/install-test-deps.sh; missing, the third test is skipped
//! ([`common::skip`]: reported as skipped, a failure under `CI`).

mod common;
#[path = "common/otel_config.rs"]
mod otel_config;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Tool;
use serde_json::{json, Value};

const OTELCOL: Tool = Tool {
    name: "otelcol-contrib",
    env: "OTELCOL_CONTRIB",
    fallbacks: &[
        "/opt/flowtel-tools/venv/lib/python3.11/site-packages/otel_collector/bin/otelcol-contrib_linux_amd64",
    ],
};

fn name(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn configs() -> Vec<(String, Value)> {
    let files = otel_config::files();
    assert!(
        files.len() >= 3,
        "otel-config/ should hold agent.yaml, gateway.yaml and gateway-otlp.yaml, found {files:?}"
    );
    files
        .iter()
        .map(|f| {
            let v = otel_config::load(f).unwrap_or_else(|e| panic!("{e:#}"));
            (name(f), v)
        })
        .collect()
}

#[test]
fn every_config_passes_the_structural_check() {
    let mut pipelines = 0;
    for (file, config) in configs() {
        let errors = otel_config::check(&config);
        let names: Vec<&String> = config["service"]["pipelines"]
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        pipelines += names.len();
        println!(
            "{file}: pipelines {names:?}: {}",
            if errors.is_empty() { "ok" } else { "FAILED" }
        );
        assert!(errors.is_empty(), "{file}:\n  {}", errors.join("\n  "));
    }
    println!("{pipelines} pipelines checked");
}

/// The agent's configuration with one fault; the check must name it.
#[test]
fn the_check_rejects_broken_configs() {
    let agent =
        otel_config::load(&Path::new(otel_config::DIR).join("agent.yaml")).expect("agent.yaml");
    assert!(
        otel_config::check(&agent).is_empty(),
        "agent.yaml must be clean"
    );
    type Break = fn(&mut Value);
    let cases: [(&str, Break, &str); 9] = [
        (
            "memory_limiter not first",
            |c| {
                c["service"]["pipelines"]["metrics"]["processors"] =
                    json!(["batch", "memory_limiter", "resource/instance"])
            },
            "memory_limiter must be the first processor",
        ),
        (
            "no batch",
            |c| {
                c["service"]["pipelines"]["logs"]["processors"] =
                    json!(["memory_limiter", "resource/instance"])
            },
            "no batch processor",
        ),
        (
            "undefined exporter",
            |c| {
                c["service"]["pipelines"]["logs"]["exporters"] =
                    json!(["otlp/gateway", "otlp/missing"])
            },
            "`otlp/missing` is not defined",
        ),
        (
            "unknown component type",
            |c| c["exporters"]["kafka"] = json!({"brokers": ["k:9092"]}),
            "unknown component type `kafka`",
        ),
        (
            "metrics-only exporter in a logs pipeline",
            |c| {
                c["exporters"]["prometheusremotewrite"] =
                    json!({"endpoint": "http://p/api/v1/write"});
                c["service"]["pipelines"]["logs"]["exporters"] = json!(["prometheusremotewrite"]);
                c["service"]["pipelines"]["metrics"]["exporters"] = json!(["otlp/gateway"]);
            },
            "cannot carry logs",
        ),
        (
            "defined but unused",
            |c| c["exporters"]["debug"] = json!({"verbosity": "basic"}),
            "`debug` is defined but no pipeline uses it",
        ),
        (
            "no receivers",
            |c| c["service"]["pipelines"]["metrics"]["receivers"] = json!([]),
            "no receivers",
        ),
        (
            "bad pipeline signal",
            |c| {
                let p = c["service"]["pipelines"]["logs"].clone();
                c["service"]["pipelines"]["profiles"] = p;
            },
            "pipeline `profiles`",
        ),
        (
            "spike limit above the limit",
            |c| c["processors"]["memory_limiter"]["spike_limit_mib"] = json!(500),
            "limit_mib must be set and above spike_limit_mib",
        ),
    ];
    for (what, breaker, expected) in cases {
        let mut c = agent.clone();
        breaker(&mut c);
        let errors = otel_config::check(&c);
        println!("{what}: {errors:?}");
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{what}: expected an error containing {expected:?}, got {errors:?}"
        );
    }
    let bad_yaml = otel_config::parse("receivers:\n  otlp: [\n");
    assert!(bad_yaml.is_err(), "broken YAML must not parse");
}

fn port(endpoint: &str) -> Option<u16> {
    endpoint
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// The exporter types of `pipeline` in `config`.
fn exporters(config: &Value, pipeline: &str) -> Vec<String> {
    otel_config::ids(&config["service"]["pipelines"][pipeline], "exporters")
        .into_iter()
        .map(String::from)
        .collect()
}

#[test]
fn each_config_does_its_job() {
    let all: BTreeMap<String, Value> = configs().into_iter().collect();
    let agent = &all["agent.yaml"];
    let grpc = agent["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        .as_str()
        .expect("agent: OTLP gRPC receiver");
    let http = agent["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
        .as_str()
        .expect("agent: OTLP HTTP receiver");
    assert_eq!(
        (port(grpc), port(http)),
        (Some(4317), Some(4318)),
        "agent: flowtel sends to the standard OTLP ports"
    );
    for signal in ["metrics", "logs"] {
        let p = &agent["service"]["pipelines"][signal];
        assert_eq!(otel_config::ids(p, "receivers"), ["otlp"], "agent {signal}");
        assert_eq!(exporters(agent, signal), ["otlp/gateway"], "agent {signal}");
    }
    let to_gateway = otel_config::env_default(
        agent["exporters"]["otlp/gateway"]["endpoint"]
            .as_str()
            .expect("agent: the gateway endpoint"),
    );
    println!("agent: OTLP on {grpc} and {http}, forwards metrics and logs to {to_gateway}");
    for gateway in ["gateway.yaml", "gateway-otlp.yaml"] {
        let g = &all[gateway];
        let grpc = g["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            port(grpc),
            port(&to_gateway),
            "{gateway}: the agent forwards to the gateway's OTLP gRPC port"
        );
        let endpoint = |id: &str| {
            otel_config::env_default(g["exporters"][id]["endpoint"].as_str().unwrap_or_default())
        };
        let logs = exporters(g, "logs");
        assert_eq!(logs, ["otlphttp/loki"], "{gateway}: logs go to Loki");
        assert!(
            endpoint("otlphttp/loki").ends_with("/otlp"),
            "{gateway}: Loki's OTLP base URL ends in /otlp (the exporter appends /v1/logs): {}",
            endpoint("otlphttp/loki")
        );
        assert_eq!(
            exporters(g, "traces"),
            ["otlp/tempo"],
            "{gateway}: traces go to Tempo"
        );
        let metrics = exporters(g, "metrics");
        let metrics_endpoint = endpoint(&metrics[0]);
        match gateway {
            "gateway.yaml" => {
                assert_eq!(metrics, ["prometheusremotewrite"]);
                assert!(
                    metrics_endpoint.ends_with("/api/v1/write"),
                    "{metrics_endpoint}"
                );
            }
            _ => assert_eq!(metrics, ["otlphttp/metrics"]),
        }
        println!(
            "{gateway}: metrics -> {} {metrics_endpoint}, logs -> {}, traces -> {}",
            metrics[0],
            endpoint("otlphttp/loki"),
            endpoint("otlp/tempo")
        );
    }
}

/// The signals each component type of the binary handles (`otelcol
/// components`: stability other than `Undefined`), by kind.
fn components(bin: &Path) -> BTreeMap<(String, String), Vec<String>> {
    let out = Command::new(bin)
        .arg("components")
        .output()
        .expect("running otelcol components");
    assert!(out.status.success(), "otelcol components: {out:?}");
    let listed = otel_config::parse(&String::from_utf8_lossy(&out.stdout))
        .expect("otelcol components prints YAML");
    let mut map = BTreeMap::new();
    for kind in ["receivers", "processors", "exporters"] {
        for c in listed[kind].as_array().into_iter().flatten() {
            let signals = c["stability"]
                .as_object()
                .map(|s| {
                    s.iter()
                        .filter(|(_, v)| v.as_str() != Some("Undefined"))
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            map.insert(
                (
                    kind.to_string(),
                    c["name"].as_str().unwrap_or_default().to_string(),
                ),
                signals,
            );
        }
    }
    map
}

/// `config` rewritten to what `available` can build: each pipeline keeps
/// the components the binary has for its signal, or becomes a logs
/// pipeline when no receiver of the binary carries its signal; a pipeline
/// with no receiver or exporter left gets a stand-in (`filelog` reading an
/// empty file, `otlphttp/standin`). Returns the config and, per pipeline,
/// what was kept and what was left out.
fn derive(
    config: &Value,
    available: &BTreeMap<(String, String), Vec<String>>,
    empty_log: &Path,
) -> (Value, Vec<String>) {
    let has = |kind: &str, id: &str, signal: &str| {
        available
            .get(&(kind.to_string(), otel_config::type_of(id).to_string()))
            .is_some_and(|s| s.iter().any(|x| x == signal))
    };
    let mut out =
        json!({"receivers": {}, "processors": {}, "exporters": {}, "service": {"pipelines": {}}});
    let mut report = Vec::new();
    for (name, p) in config["service"]["pipelines"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let signal = otel_config::type_of(name);
        let receivers = otel_config::ids(p, "receivers");
        let target = if receivers.iter().any(|r| has("receivers", r, signal))
            || has("receivers", "filelog", signal)
        {
            signal
        } else {
            "logs"
        };
        let mut pipeline = json!({});
        let mut kept = Vec::new();
        let mut left = Vec::new();
        for kind in ["receivers", "processors", "exporters"] {
            let mut ids = Vec::new();
            for id in otel_config::ids(p, kind) {
                if has(kind, id, target) {
                    out[kind][id] = config[kind][id].clone();
                    ids.push(id.to_string());
                    kept.push(id.to_string());
                } else {
                    left.push(id.to_string());
                }
            }
            if ids.is_empty() && kind == "receivers" {
                out[kind]["filelog"] = json!({"include": [empty_log], "start_at": "end"});
                ids.push("filelog".into());
            }
            if ids.is_empty() && kind == "exporters" {
                out[kind]["otlphttp/standin"] = json!({"endpoint": "http://127.0.0.1:9"});
                ids.push("otlphttp/standin".into());
            }
            pipeline[kind] = json!(ids);
        }
        let derived_name = format!("{target}/{}", name.replace('/', "_"));
        report.push(format!(
            "{name} (as {derived_name}): validated {kept:?}, not in this build {left:?}"
        ));
        out["service"]["pipelines"][derived_name] = pipeline;
    }
    (out, report)
}

/// `otelcol validate --config FILE`, as `nobody` when running as root.
fn validate(bin: &Path, file: &Path) -> (bool, String) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd
        .arg("validate")
        .arg(format!("--config={}", file.display()))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("running otelcol validate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said.trim().to_string())
}

#[test]
fn a_real_collector_validates_every_config() {
    const TEST: &str = "a_real_collector_validates_every_config";
    let bin: PathBuf = match common::find_tool(&OTELCOL) {
        Ok(b) => b,
        Err(e) => {
            common::skip(
                TEST,
                &format!("no Collector: {e} (scripts/install-test-deps.sh installs it)"),
            );
            return;
        }
    };
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let available = components(&bin);
    println!(
        "{TEST}: {version} ({}), components: {:?}",
        bin.display(),
        available.keys().collect::<Vec<_>>()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    // Readable by `nobody`.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the temp dir");
    let empty_log = dir.path().join("empty.log");
    std::fs::write(&empty_log, "").expect("the empty log file");
    let mut validated = 0;
    for (file, config) in configs() {
        let (derived, report) = derive(&config, &available, &empty_log);
        let path = dir.path().join(&file);
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&derived).expect("JSON, which is YAML"),
        )
        .expect("writing the derived config");
        let (ok, said) = validate(&bin, &path);
        for line in &report {
            println!("{TEST}: {file}: {line}");
        }
        println!(
            "{TEST}: {file}: otelcol validate: {}",
            if ok { "ok" } else { "FAILED" }
        );
        assert!(
            ok,
            "{file}: otelcol validate failed: {said}\nconfig: {derived:#}"
        );
        // Whatever the build has of memory_limiter and batch is validated
        // in every pipeline (with this build: both, everywhere).
        for (kind, t) in [("processors", "memory_limiter"), ("processors", "batch")] {
            if available.contains_key(&(kind.to_string(), t.to_string())) {
                let pipelines = derived["service"]["pipelines"]
                    .as_object()
                    .expect("pipelines");
                assert!(
                    pipelines.values().all(|p| otel_config::ids(p, kind)
                        .iter()
                        .any(|id| otel_config::type_of(id) == t)),
                    "{file}: {t} must be validated in every pipeline: {derived:#}"
                );
            }
        }
        validated += 1;

        // The same with a spike limit above the limit: must be refused.
        let mut broken = derived.clone();
        if let Some(ml) = broken["processors"]["memory_limiter"].as_object_mut() {
            ml.insert("spike_limit_mib".into(), json!(100_000));
            std::fs::write(&path, broken.to_string()).expect("writing the broken config");
            let (ok, said) = validate(&bin, &path);
            println!(
                "{TEST}: {file} with spike_limit_mib 100000: {}",
                said.lines().next().unwrap_or_default()
            );
            assert!(
                !ok && said.contains("spike_limit_mib"),
                "{file}: otelcol must refuse a spike limit above the limit: {said}"
            );
        }
    }
    println!("{TEST}: {validated} configs validated by {version}");
}
