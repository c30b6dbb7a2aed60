//! The `kubernetes` section of the configuration.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::component::ConfigError;

/// The default of `kubernetes.max_objects`: room for a cluster at
/// Kubernetes' published scale limits (150,000 pods on 5,000 nodes) with
/// a ReplicaSet or Job, a Service and an EndpointSlice for every few pods.
pub const DEFAULT_MAX_OBJECTS: usize = 300_000;

/// Whether flowtel watches the Kubernetes API.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KubernetesMode {
    /// On inside a cluster (`KUBERNETES_SERVICE_HOST` is set) or when a
    /// kubeconfig file is configured; off on a plain host, where there is
    /// nothing to watch.
    #[default]
    Auto,
    /// Always on: an API server that cannot be reached is retried, never
    /// fatal.
    On,
    /// Never: no client is built and nothing is watched.
    Off,
}

/// How flowtel reads the Kubernetes API to name flow ends.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// `auto`, `on` or `off`.
    pub enabled: KubernetesMode,
    /// A kubeconfig file to use. Without it, the client is inferred
    /// (`KUBECONFIG` or `~/.kube/config`, else the pod's service account).
    pub kubeconfig: Option<PathBuf>,
    /// Pod label keys copied into pod identities, e.g. for a team or a
    /// version. Only these are kept: every kept label costs memory per pod.
    pub pod_labels: Vec<String>,
    /// How long a deleted (or finished) pod still owns its IP address for
    /// flows seen before it let the address go, so that late reports are
    /// still named after it even when another pod has the address now.
    #[serde(with = "humantime_serde")]
    pub ip_retention: Duration,
    /// Watch Warning Events about this node's pod networking
    /// (`FailedCreatePodSandBox`, ...) and export them as log events.
    pub network_events: bool,
    /// Export this node's pods' addresses appearing in and leaving
    /// `status.podIPs` as log events and metrics (`flowtel.cni.ips.*`).
    pub ip_events: bool,
    /// The most objects (pods, Services, EndpointSlices, nodes,
    /// ReplicaSets and Jobs together) the cache holds: past it, new objects
    /// are not cached, and counted in `flowtel.k8s.objects.shed`.
    pub max_objects: usize,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: KubernetesMode::Auto,
            kubeconfig: None,
            pod_labels: vec!["app.kubernetes.io/name".into()],
            ip_retention: Duration::from_secs(120),
            network_events: true,
            ip_events: true,
            max_objects: DEFAULT_MAX_OBJECTS,
        }
    }
}

impl KubernetesConfig {
    /// Whether the cache runs, given the process environment.
    pub fn is_enabled(&self) -> bool {
        self.is_enabled_with(
            std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty()),
        )
    }

    /// Checks the section's keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_objects == 0 {
            return Err(ConfigError::new(
                "max_objects",
                format!(
                    "must be at least 1, e.g. {DEFAULT_MAX_OBJECTS} (to watch nothing, set kubernetes.enabled: off)"
                ),
            ));
        }
        Ok(())
    }

    /// [`Self::is_enabled`] with the in-cluster test made by the caller.
    pub(crate) fn is_enabled_with(&self, in_cluster: bool) -> bool {
        match self.enabled {
            KubernetesMode::On => true,
            KubernetesMode::Off => false,
            KubernetesMode::Auto => in_cluster || self.kubeconfig.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_cluster_or_kubeconfig() {
        let auto = KubernetesConfig::default();
        assert!(!auto.is_enabled_with(false));
        assert!(auto.is_enabled_with(true));
        let with_file = KubernetesConfig {
            kubeconfig: Some("/etc/kube.yaml".into()),
            ..KubernetesConfig::default()
        };
        assert!(with_file.is_enabled_with(false));
        let off = KubernetesConfig {
            enabled: KubernetesMode::Off,
            ..with_file.clone()
        };
        assert!(!off.is_enabled_with(true));
        let on = KubernetesConfig {
            enabled: KubernetesMode::On,
            ..KubernetesConfig::default()
        };
        assert!(on.is_enabled_with(false));
    }

    #[test]
    fn parses_every_key_and_rejects_unknown_ones() {
        let cfg: KubernetesConfig = serde_json::from_value(serde_json::json!({
            "enabled": "on",
            "kubeconfig": "/k",
            "pod_labels": ["team"],
            "ip_retention": "30s",
            "max_objects": 1000,
        }))
        .expect("a complete section parses");
        assert_eq!(cfg.enabled, KubernetesMode::On);
        assert_eq!(cfg.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(cfg.pod_labels, vec!["team".to_string()]);
        assert_eq!(cfg.ip_retention, Duration::from_secs(30));
        assert_eq!(cfg.max_objects, 1000);
        assert!(cfg.validate().is_ok());
        let none = KubernetesConfig {
            max_objects: 0,
            ..cfg
        };
        let err = none.validate().expect_err("0 objects is refused");
        assert_eq!(err.key, "max_objects");
        let empty: KubernetesConfig =
            serde_json::from_value(serde_json::json!({})).expect("an empty section parses");
        assert_eq!(empty, KubernetesConfig::default());
        assert!(
            serde_json::from_value::<KubernetesConfig>(serde_json::json!({"enable": "on"}))
                .is_err()
        );
    }
}
