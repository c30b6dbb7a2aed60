//! Attribute names and values, in one place so OTLP, JSON and (later) the
//! Prometheus endpoint agree with `docs/telemetry.md`.

use opentelemetry::KeyValue;

use crate::flow::aggregate::{DropKey, SeriesKey};

pub const NETWORK_TRANSPORT: &str = "network.transport";
pub const NETWORK_TYPE: &str = "network.type";
pub const CLIENT_ADDRESS: &str = "client.address";
pub const CLIENT_PORT: &str = "client.port";
pub const SERVER_ADDRESS: &str = "server.address";
pub const SERVER_PORT: &str = "server.port";
pub const FLOW_DIRECTION: &str = "flowtel.flow.direction";
pub const NAT_SERVER_ADDRESS: &str = "flowtel.nat.server.address";
pub const NAT_SERVER_PORT: &str = "flowtel.nat.server.port";
pub const NAT_CLIENT_ADDRESS: &str = "flowtel.nat.client.address";
pub const NAT_CLIENT_PORT: &str = "flowtel.nat.client.port";
pub const SOURCE: &str = "flowtel.source";
pub const OVERFLOW: &str = "otel.metric.overflow";
pub const TCP_CLOSE_CAUSE: &str = "flowtel.tcp.close.cause";
pub const TCP_FAILURE: &str = "flowtel.tcp.failure";
pub const DROP_REASON: &str = "flowtel.drop.reason";

/// Which way the bytes of a data point travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientToServer => "client_to_server",
            Self::ServerToClient => "server_to_client",
        }
    }
}

/// The attributes of one series, and of one direction when given.
pub fn series_attributes(key: &SeriesKey, direction: Option<Direction>) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(12);
    attrs.push(KeyValue::new(SOURCE, key.source.as_str()));
    if key.overflow {
        attrs.push(KeyValue::new(OVERFLOW, true));
    }
    if let Some(t) = key.transport {
        attrs.push(KeyValue::new(NETWORK_TRANSPORT, t.as_str()));
    }
    if let Some(nt) = key.network_type() {
        attrs.push(KeyValue::new(NETWORK_TYPE, nt));
    }
    if let Some(ip) = key.client {
        attrs.push(KeyValue::new(CLIENT_ADDRESS, ip.to_string()));
    }
    if let Some(port) = key.client_port {
        attrs.push(KeyValue::new(CLIENT_PORT, i64::from(port)));
    }
    if let Some(ip) = key.server {
        attrs.push(KeyValue::new(SERVER_ADDRESS, ip.to_string()));
    }
    if let Some(port) = key.server_port {
        attrs.push(KeyValue::new(SERVER_PORT, i64::from(port)));
    }
    if let Some(nat) = key.nat_server {
        attrs.push(KeyValue::new(NAT_SERVER_ADDRESS, nat.ip.to_string()));
        attrs.push(KeyValue::new(NAT_SERVER_PORT, i64::from(nat.port)));
    }
    if let Some(nat) = key.nat_client {
        attrs.push(KeyValue::new(NAT_CLIENT_ADDRESS, nat.ip.to_string()));
        attrs.push(KeyValue::new(NAT_CLIENT_PORT, i64::from(nat.port)));
    }
    if let Some(d) = direction {
        attrs.push(KeyValue::new(FLOW_DIRECTION, d.as_str()));
    }
    attrs
}

/// The attributes of one drop series.
pub fn drop_attributes(key: &DropKey) -> Vec<KeyValue> {
    let mut attrs = vec![
        KeyValue::new(DROP_REASON, key.reason),
        KeyValue::new(NETWORK_TRANSPORT, key.transport.as_str()),
    ];
    if let Some(nt) = key.network_type {
        attrs.push(KeyValue::new(NETWORK_TYPE, nt));
    }
    attrs
}
