//! The OTLP resource: who is reporting (flowtel on which host and node).

use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

use crate::config::ResourceConfig;

/// Builds the resource shared by metrics and logs. Configured attributes
/// (and `OTEL_RESOURCE_ATTRIBUTES`) come first so flowtel's own keys win.
pub fn build(cfg: &ResourceConfig) -> Resource {
    let mut attrs: Vec<KeyValue> = cfg
        .attributes
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    attrs.push(KeyValue::new("service.name", cfg.service_name.clone()));
    attrs.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if let Some(host) = hostname::get().ok().and_then(|h| h.into_string().ok()) {
        attrs.push(KeyValue::new("host.name", host));
    }
    if let Some(node) = &cfg.node_name {
        attrs.push(KeyValue::new("k8s.node.name", node.clone()));
    }
    if let Some(cluster) = &cfg.cluster_name {
        attrs.push(KeyValue::new("k8s.cluster.name", cluster.clone()));
    }
    Resource::builder_empty().with_attributes(attrs).build()
}
