//! The OTLP resource: who is reporting (flowtel on which host and node).

use std::collections::BTreeMap;

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};

use crate::component::ConfigError;
use crate::telemetry::catalogue::{
    HOST_NAME, K8S_CLUSTER, K8S_NODE, SERVICE_NAME, SERVICE_VERSION,
};

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

impl ResourceConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.service_name.is_empty() {
            return Err(ConfigError::new("service_name", "must not be empty"));
        }
        Ok(())
    }
}

/// The attributes of the resource shared by metrics and logs. Configured
/// attributes (and `OTEL_RESOURCE_ATTRIBUTES`) come first so flowtel's own
/// keys win.
pub fn attributes(cfg: &ResourceConfig) -> Vec<KeyValue> {
    let mut attrs: Vec<KeyValue> = cfg
        .attributes
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    attrs.push(KeyValue::new(SERVICE_NAME, cfg.service_name.clone()));
    attrs.push(KeyValue::new(SERVICE_VERSION, env!("CARGO_PKG_VERSION")));
    if let Some(host) = hostname::get().ok().and_then(|h| h.into_string().ok()) {
        attrs.push(KeyValue::new(HOST_NAME, host));
    }
    if let Some(node) = &cfg.node_name {
        attrs.push(KeyValue::new(K8S_NODE, node.clone()));
    }
    if let Some(cluster) = &cfg.cluster_name {
        attrs.push(KeyValue::new(K8S_CLUSTER, cluster.clone()));
    }
    // A key set twice keeps its last value, as the SDK's resource did.
    let mut seen = std::collections::HashSet::new();
    let mut unique: Vec<KeyValue> = attrs
        .into_iter()
        .rev()
        .filter(|kv| seen.insert(kv.key.clone()))
        .collect();
    unique.reverse();
    unique
}

/// The same resource, for the SDK meter behind the Prometheus endpoint.
pub fn sdk(cfg: &ResourceConfig) -> Resource {
    Resource::builder_empty()
        .with_attributes(attributes(cfg))
        .build()
}
