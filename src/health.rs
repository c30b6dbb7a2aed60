//! `/healthz` (the process is alive) and `/readyz` (the kernel source has
//! completed its first dump), with flowtel's own counters in the `/readyz`
//! body so an operator can see at a glance whether anything is being lost.
//! The body is derived from the telemetry registry: every catalogue metric
//! with a `/readyz` key that a running component reports.

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::component::ConfigError;
use crate::telemetry::catalogue::{self, Instrument};
use crate::telemetry::Telemetry;

/// The `health:` section.
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

impl HealthConfig {
    /// Checks the address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::new(
                "listen",
                format!(
                    "{:?} is not an address:port such as 127.0.0.1:9810",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

/// Binds the listener now (so a port clash is a start-up error) and serves
/// in the background; `None` when `health.listen` is empty.
pub async fn serve(cfg: &HealthConfig, telemetry: Telemetry) -> anyhow::Result<Option<SocketAddr>> {
    if cfg.listen.is_empty() {
        return Ok(None);
    }
    let listen: SocketAddr = cfg
        .listen
        .parse()
        .map_err(|e| anyhow::anyhow!("health.listen {:?}: {e}", cfg.listen))?;
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen} for health checks (health.listen): {e}")
    })?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(telemetry);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("health endpoint stopped: {e}");
        }
    });
    tracing::info!("health checks on http://{local}/healthz and /readyz");
    Ok(Some(local))
}

/// The `/readyz` body: `ready`, the kernel `source`, the counters of each
/// section (`stats` always complete, `kubernetes` when the cache runs) and
/// the active `sources`.
pub fn readiness(telemetry: &Telemetry) -> Value {
    let ready = telemetry.ready();
    let mut sections: Map<String, Value> = Map::new();
    // `stats` lists every key, 0 until its component reports it.
    let mut stats = Map::new();
    for m in catalogue::METRICS {
        if let Some(key) = m.readyz.and_then(|k| k.strip_prefix("stats.")) {
            stats.insert(key.to_owned(), value(m, 0));
        }
    }
    stats.insert("ready".into(), Value::Bool(ready));
    sections.insert("stats".into(), Value::Object(stats));
    for (m, points) in telemetry.read() {
        let Some((section, key)) = m.readyz.and_then(|k| k.split_once('.')) else {
            continue;
        };
        let total = points.iter().fold(0u64, |t, (_, v)| t.saturating_add(*v));
        if let Value::Object(s) = sections
            .entry(section.to_owned())
            .or_insert_with(|| Value::Object(Map::new()))
        {
            s.insert(key.to_owned(), value(m, total));
        }
    }
    let mut body = json!({
        "ready": ready,
        "source": telemetry.source(),
        "sources": telemetry.active(),
    });
    if let Value::Object(b) = &mut body {
        b.extend(sections);
    }
    body
}

/// A gauge of unit `1` is a flag: a boolean in `/readyz`.
fn value(m: &catalogue::Metric, v: u64) -> Value {
    if m.instrument == Instrument::Gauge && m.unit == "1" {
        Value::Bool(v != 0)
    } else {
        Value::from(v)
    }
}

async fn readyz(State(telemetry): State<Telemetry>) -> (StatusCode, Json<Value>) {
    let code = if telemetry.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness(&telemetry)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_every_stat_and_what_runs() {
        let t = Telemetry::default();
        let body = readiness(&t);
        assert_eq!(body["ready"], json!(false));
        assert_eq!(body["stats"]["dumps"], json!(0));
        assert_eq!(body["stats"]["byte_counters_available"], json!(false));
        assert!(body.get("kubernetes").is_none(), "{body}");
        t.counter(&catalogue::SOURCE_DUMPS).add(3);
        t.gauge(&catalogue::K8S_SYNCED).set_flag(true);
        t.set_ready();
        let body = readiness(&t);
        assert_eq!(body["stats"]["dumps"], json!(3));
        assert_eq!(body["stats"]["ready"], json!(true));
        assert_eq!(body["kubernetes"]["synced"], json!(true));
    }
}
