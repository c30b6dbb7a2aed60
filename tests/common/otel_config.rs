//! The OpenTelemetry Collector configurations in `otel-config/`: loading
//! (YAML into JSON values) and the structural check that
//! `tests/otel_config.rs` runs on each of them.
//!
//! Included with `#[path = "common/otel_config.rs"] mod otel_config;`.

// Each test binary uses a different part.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{Map, Value};

pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/otel-config");

/// The signals a pipeline can carry.
pub const SIGNALS: [&str; 3] = ["metrics", "logs", "traces"];

/// Every component type the configurations may use, with its kind and the
/// signals it handles (from each component's documentation in the
/// Collector core and contrib repositories). A type missing here fails the
/// check: add it with its signals.
pub const KNOWN: &[(&str, &str, &[&str])] = &[
    ("receivers", "otlp", &SIGNALS),
    ("processors", "memory_limiter", &SIGNALS),
    ("processors", "batch", &SIGNALS),
    ("processors", "resource", &SIGNALS),
    ("exporters", "otlp", &SIGNALS),
    ("exporters", "otlphttp", &SIGNALS),
    ("exporters", "debug", &SIGNALS),
    ("exporters", "prometheusremotewrite", &["metrics"]),
    ("extensions", "health_check", &[]),
];

const KINDS: [&str; 3] = ["receivers", "processors", "exporters"];
const TOP_LEVEL: [&str; 6] = [
    "receivers",
    "processors",
    "exporters",
    "connectors",
    "extensions",
    "service",
];

/// The `.yaml` files of `otel-config/`, sorted.
pub fn files() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(DIR)
        .expect("reading otel-config/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    out.sort();
    out
}

fn yaml_to_json(y: &yaml_rust2::Yaml) -> anyhow::Result<Value> {
    use yaml_rust2::Yaml;
    Ok(match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => Value::from(
            r.parse::<f64>()
                .with_context(|| format!("bad number {r:?}"))?,
        ),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => bail!("unsupported mapping key {other:?}"),
                };
                if m.insert(key.clone(), yaml_to_json(v)?).is_some() {
                    bail!("duplicate key {key:?}");
                }
            }
            Value::Object(m)
        }
        other => bail!("unsupported YAML node {other:?} (aliases are not used here)"),
    })
}

/// Parses one YAML document into a JSON value.
pub fn parse(text: &str) -> anyhow::Result<Value> {
    let docs = yaml_rust2::YamlLoader::load_from_str(text).context("YAML does not parse")?;
    match docs.as_slice() {
        [one] => yaml_to_json(one),
        _ => bail!("expected one YAML document, found {}", docs.len()),
    }
}

pub fn load(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| path.display().to_string())
}

/// `type/name` → `type`.
pub fn type_of(id: &str) -> &str {
    id.split_once('/').map_or(id, |(t, _)| t)
}

fn valid_id(id: &str) -> bool {
    let (t, name) = id.split_once('/').unwrap_or((id, "x"));
    !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.is_empty()
        && !name.contains('/')
}

fn signals_of(kind: &str, t: &str) -> Option<&'static [&'static str]> {
    KNOWN
        .iter()
        .find(|(k, ty, _)| *k == kind && *ty == t)
        .map(|(_, _, s)| *s)
}

/// The ids listed under `pipeline[kind]`.
pub fn ids<'a>(pipeline: &'a Value, kind: &str) -> Vec<&'a str> {
    pipeline[kind]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn duration_secs(v: &Value) -> Option<f64> {
    let s = v.as_str()?;
    let (n, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    })
}

/// Every structural problem of one configuration (empty: none):
/// * only the Collector's top-level sections;
/// * every component id is `type` or `type/name` with a known type;
/// * `service.pipelines` is not empty, each pipeline is `SIGNAL[/name]`
///   with at least one receiver, processor and exporter, each of them
///   defined in its section, listed once, and able to carry the signal;
/// * in every pipeline `memory_limiter` comes first and `batch` is there;
/// * every defined component is used (by a pipeline or `service.extensions`);
/// * `memory_limiter` has a positive `check_interval` and a `limit_mib`
///   above its `spike_limit_mib`; every exporter names an `endpoint`.
pub fn check(config: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(top) = config.as_object() else {
        return vec!["the configuration is not a mapping".into()];
    };
    for key in top.keys() {
        if !TOP_LEVEL.contains(&key.as_str()) {
            errors.push(format!("unknown top-level section `{key}`"));
        }
    }
    let defined = |kind: &str| -> BTreeSet<String> {
        config[kind]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    for kind in KINDS.iter().chain(&["extensions"]) {
        if !config[*kind].is_null() && !config[*kind].is_object() {
            errors.push(format!("`{kind}` is not a mapping"));
        }
        for id in defined(kind) {
            if !valid_id(&id) {
                errors.push(format!(
                    "{kind}: `{id}` is not a component id (type[/name])"
                ));
            } else if signals_of(kind, type_of(&id)).is_none() {
                errors.push(format!(
                    "{kind}: unknown component type `{}` (add it to KNOWN with its signals)",
                    type_of(&id)
                ));
            }
        }
    }
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    let pipelines = config["service"]["pipelines"].as_object();
    match pipelines {
        None => errors.push("service.pipelines is missing or not a mapping".into()),
        Some(p) if p.is_empty() => errors.push("service.pipelines is empty".into()),
        Some(_) => {}
    }
    for (name, pipeline) in pipelines.into_iter().flatten() {
        let signal = type_of(name);
        if !SIGNALS.contains(&signal) || !valid_id(name) {
            errors.push(format!(
                "pipeline `{name}`: not metrics, logs or traces[/name]"
            ));
            continue;
        }
        if let Some(extra) = pipeline
            .as_object()
            .and_then(|m| m.keys().find(|k| !KINDS.contains(&k.as_str())))
        {
            errors.push(format!("pipeline `{name}`: unknown key `{extra}`"));
        }
        for kind in KINDS {
            let list = ids(pipeline, kind);
            if !pipeline[kind].is_array()
                || list.len() != pipeline[kind].as_array().map_or(0, Vec::len)
            {
                errors.push(format!("pipeline `{name}`: `{kind}` must be a list of ids"));
            }
            if list.is_empty() {
                errors.push(format!("pipeline `{name}`: no {kind}"));
            }
            let have = defined(kind);
            let mut seen = BTreeSet::new();
            for id in &list {
                if !seen.insert(*id) {
                    errors.push(format!("pipeline `{name}`: {kind} `{id}` listed twice"));
                }
                if !have.contains(*id) {
                    errors.push(format!(
                        "pipeline `{name}`: {kind} `{id}` is not defined under `{kind}`"
                    ));
                    continue;
                }
                used.insert((kind.to_string(), id.to_string()));
                if let Some(signals) = signals_of(kind, type_of(id)) {
                    if !signals.contains(&signal) {
                        errors.push(format!(
                            "pipeline `{name}`: {kind} `{id}` cannot carry {signal}"
                        ));
                    }
                }
            }
        }
        let processors = ids(pipeline, "processors");
        if processors.first().map(|p| type_of(p)) != Some("memory_limiter") {
            errors.push(format!(
                "pipeline `{name}`: memory_limiter must be the first processor, got {processors:?}"
            ));
        }
        if !processors.iter().any(|p| type_of(p) == "batch") {
            errors.push(format!("pipeline `{name}`: no batch processor"));
        }
    }
    let extensions: Vec<&str> = config["service"]["extensions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for id in extensions {
        if defined("extensions").contains(id) {
            used.insert(("extensions".into(), id.into()));
        } else {
            errors.push(format!(
                "service.extensions: `{id}` is not defined under `extensions`"
            ));
        }
    }
    for kind in KINDS.iter().chain(&["extensions"]) {
        for id in defined(kind) {
            if !used.contains(&(kind.to_string(), id.clone())) {
                errors.push(format!("{kind}: `{id}` is defined but no pipeline uses it"));
            }
        }
    }
    for (id, c) in config["processors"].as_object().into_iter().flatten() {
        if type_of(id) != "memory_limiter" {
            continue;
        }
        if !duration_secs(&c["check_interval"]).is_some_and(|s| s > 0.0) {
            errors.push(format!("{id}: check_interval must be a positive duration"));
        }
        match (c["limit_mib"].as_u64(), c["spike_limit_mib"].as_u64()) {
            (Some(limit), spike) if limit > spike.unwrap_or(0) => {}
            _ => errors.push(format!(
                "{id}: limit_mib must be set and above spike_limit_mib"
            )),
        }
    }
    for (id, c) in config["exporters"].as_object().into_iter().flatten() {
        if type_of(id) != "debug" && c["endpoint"].as_str().is_none_or(str::is_empty) {
            errors.push(format!("exporters: `{id}` has no endpoint"));
        }
    }
    errors
}

/// `${env:NAME:-default}` → `default` (the Collector's expansion when NAME
/// is unset); other text unchanged.
pub fn env_default(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${env:") {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let Some(end) = after.find('}') else {
            out.push_str(after);
            return out;
        };
        let inner = &after["${env:".len()..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, d)| d));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}
