//! Kubernetes networking Events (`events.k8s.io/v1`) about this node's
//! pods, as WARN log events: a sandbox whose network could not be set up
//! (`FailedCreatePodSandBox`), a pod whose network could not be torn down
//! (`FailedKillPod`), a node whose CNI is not ready (`NetworkNotReady`),
//! and other Warnings that name the CNI.
//!
//! Only `type=Warning` Events are asked for (a field selector; the API has
//! no field for the node), and only those kubelet reported from this node
//! (`deprecatedSource.host` or `reportingInstance`) are kept. Events
//! already there when the watch starts (or re-lists) are not reported
//! again: only those added or updated while flowtel watches.

use std::time::SystemTime;

use futures::StreamExt;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::mpsc;

use super::watch::{client, ClientSource};
use crate::flow::mesh::{
    Family, FamilyGroup, LogEvent, MeshUpdate, Point, PointValue, Severity, Value,
};
use crate::flow::SourceEvent;
use crate::telemetry::catalogue;

/// The reasons kept whatever the message says.
pub const NETWORK_REASONS: &[&str] =
    &["FailedCreatePodSandBox", "FailedKillPod", "NetworkNotReady"];

/// Whether a Warning is about pod networking: a networking reason, or a
/// message that names the CNI.
pub fn is_network_event(reason: &str, note: &str) -> bool {
    NETWORK_REASONS.contains(&reason) || note.contains("CNI") || note.contains("cni")
}

/// Whether kubelet on `node` reported it (any node when `node` is unknown).
fn on_node(e: &K8sEvent, node: Option<&str>) -> bool {
    let Some(node) = node else {
        return true;
    };
    e.deprecated_source
        .as_ref()
        .and_then(|s| s.host.as_deref())
        .or(e.reporting_instance.as_deref())
        == Some(node)
}

/// The log event for one Kubernetes Event.
pub fn log_event(e: &K8sEvent) -> LogEvent {
    let reason = e.reason.clone().unwrap_or_default();
    let note = e.note.clone().unwrap_or_default();
    let mut attributes = vec![
        (
            catalogue::EVENT_NAME,
            Value::Str(catalogue::EVENT_K8S_NETWORK.into()),
        ),
        (catalogue::K8S_EVENT_REASON, Value::Str(reason.clone())),
    ];
    let regarding = e.regarding.as_ref();
    let mut add = |key: &'static str, v: Option<&String>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            attributes.push((key, Value::Str(v.clone())));
        }
    };
    add(
        catalogue::K8S_NAMESPACE,
        regarding.and_then(|r| r.namespace.as_ref()),
    );
    if regarding.and_then(|r| r.kind.as_deref()) == Some("Pod") {
        add(catalogue::K8S_POD, regarding.and_then(|r| r.name.as_ref()));
        add(
            catalogue::K8S_POD_UID,
            regarding.and_then(|r| r.uid.as_ref()),
        );
    }
    add(
        catalogue::K8S_NODE,
        e.deprecated_source
            .as_ref()
            .and_then(|s| s.host.as_ref())
            .or(e.reporting_instance.as_ref()),
    );
    let count = e
        .series
        .as_ref()
        .map(|s| i64::from(s.count))
        .or(e.deprecated_count.map(i64::from));
    if let Some(count) = count {
        attributes.push((catalogue::K8S_EVENT_COUNT, Value::Int(count)));
    }
    let object = regarding
        .map(|r| {
            format!(
                "{}/{}",
                r.namespace.as_deref().unwrap_or_default(),
                r.name.as_deref().unwrap_or_default()
            )
        })
        .unwrap_or_default();
    LogEvent {
        time: SystemTime::now(),
        severity: Severity::Warn,
        name: catalogue::EVENT_K8S_NETWORK,
        body: format!("{reason} {object}: {note}"),
        attributes,
    }
}

/// Watches Warning Events and sends the networking ones of `node` into the
/// pipeline as they come (retried with client-go's backoff). Those that
/// find the channel full wait for the next one; `flowtel.k8s.network_events`
/// counts every one kept, by reason.
pub(crate) async fn run(
    source: ClientSource,
    node: Option<String>,
    events: mpsc::Sender<SourceEvent>,
) {
    let client = match client(&source).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "Kubernetes Events: no client; networking Events are not watched");
            return;
        }
    };
    let api: Api<K8sEvent> = Api::all(client);
    let mut stream = watcher::watcher(api, watcher::Config::default().fields("type=Warning"))
        .default_backoff()
        .boxed();
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    let mut pending: Vec<LogEvent> = Vec::new();
    while let Some(item) = stream.next().await {
        let e = match item {
            Ok(Event::Apply(e)) => e,
            Ok(_) => continue,
            Err(err) => {
                tracing::debug!(error = %err, "Kubernetes Events: watch error (retried)");
                continue;
            }
        };
        let reason = e.reason.as_deref().unwrap_or_default();
        let note = e.note.as_deref().unwrap_or_default();
        if e.type_.as_deref() != Some("Warning")
            || !is_network_event(reason, note)
            || !on_node(&e, node.as_deref())
        {
            continue;
        }
        *counts.entry(reason.to_owned()).or_default() += 1;
        pending.push(log_event(&e));
        let update = MeshUpdate {
            source: "k8s_events",
            active: true,
            groups: vec![FamilyGroup {
                attributes: Vec::new(),
                families: vec![Family {
                    metric: &catalogue::K8S_NETWORK_EVENTS,
                    points: counts
                        .iter()
                        .map(|(r, n)| {
                            Point::new(
                                vec![(catalogue::K8S_EVENT_REASON.to_owned(), r.clone())],
                                PointValue::Int(*n),
                            )
                        })
                        .collect(),
                }],
            }],
            events: std::mem::take(&mut pending),
        };
        match events.try_send(SourceEvent::Mesh(Box::new(update))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(SourceEvent::Mesh(update))) => {
                pending = update.events;
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_reasons_and_cni_messages_are_kept() {
        assert!(is_network_event("FailedCreatePodSandBox", "anything"));
        assert!(is_network_event(
            "Failed",
            "plugin type=\"calico\" failed (add): CNI error"
        ));
        assert!(!is_network_event(
            "BackOff",
            "Back-off restarting failed container"
        ));
    }

    #[test]
    fn the_event_names_the_pod_reason_and_node() {
        let e: K8sEvent = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web.1", "namespace": "shop"},
            "eventTime": null,
            "reason": "FailedCreatePodSandBox",
            "note": "Failed to create pod sandbox: plugin type=\"bridge\" failed",
            "type": "Warning",
            "regarding": {"kind": "Pod", "namespace": "shop", "name": "web", "uid": "u1"},
            "deprecatedSource": {"component": "kubelet", "host": "node-a"},
            "deprecatedCount": 3
        }))
        .unwrap();
        assert!(on_node(&e, Some("node-a")));
        assert!(!on_node(&e, Some("node-b")));
        let l = log_event(&e);
        assert_eq!(l.severity, Severity::Warn);
        assert!(l
            .body
            .starts_with("FailedCreatePodSandBox shop/web: Failed to create"));
        assert!(l
            .attributes
            .contains(&(catalogue::K8S_POD, Value::Str("web".into()))));
        assert!(l
            .attributes
            .contains(&(catalogue::K8S_EVENT_COUNT, Value::Int(3))));
    }
}
