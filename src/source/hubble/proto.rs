//! The subset of the public Hubble API that flowtel reads, written by hand
//! so the build needs neither `protoc` nor `tonic-build`.
//!
//! Field numbers and enum values are those of the public Cilium API:
//! `api/v1/flow/flow.proto` (package `flow`), `api/v1/observer/observer.proto`
//! (package `observer`) and `api/v1/relay/relay.proto` (package `relay`) in
//! the `cilium/cilium` repository. Fields flowtel does not need are left
//! out; protobuf skips unknown fields, so newer agents stay readable.
//! Enum fields are kept as `i32`, as prost does, so that a value a newer
//! agent adds decodes instead of failing the whole message.

#![allow(non_camel_case_types, clippy::enum_variant_names)]

/// Declares a protobuf enum with its `.proto` value names, and
/// `as_str_name` returning them (those names are what Hubble's own CLI and
/// metrics print, so flowtel's attributes use them too).
macro_rules! proto_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $value:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
        #[repr(i32)]
        pub enum $name {
            $($variant = $value,)*
        }

        impl $name {
            /// The value's name in the `.proto` file.
            pub fn as_str_name(self) -> &'static str {
                match self {
                    $(Self::$variant => stringify!($variant),)*
                }
            }
        }
    };
}

// ---- well-known types (google/protobuf/timestamp.proto, wrappers.proto) ----

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `google.protobuf.BoolValue`: a bool that can be absent.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct BoolValue {
    #[prost(bool, tag = "1")]
    pub value: bool,
}

/// `google.protobuf.Int32Value`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Int32Value {
    #[prost(int32, tag = "1")]
    pub value: i32,
}

// ---- observer/observer.proto ----

/// `observer.GetFlowsRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetFlowsRequest {
    /// How many past flows to return first (0: none, with `follow`).
    #[prost(uint64, tag = "1")]
    pub number: u64,
    #[prost(bool, tag = "9")]
    pub first: bool,
    /// Keep streaming new flows.
    #[prost(bool, tag = "3")]
    pub follow: bool,
    #[prost(message, repeated, tag = "5")]
    pub blacklist: Vec<FlowFilter>,
    #[prost(message, repeated, tag = "6")]
    pub whitelist: Vec<FlowFilter>,
    /// Replay flows from this time on (from Hubble's ring buffer).
    #[prost(message, optional, tag = "7")]
    pub since: Option<Timestamp>,
    #[prost(message, optional, tag = "8")]
    pub until: Option<Timestamp>,
}

/// `observer.GetFlowsResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetFlowsResponse {
    #[prost(oneof = "ResponseTypes", tags = "1, 2, 3")]
    pub response_types: Option<ResponseTypes>,
    #[prost(string, tag = "1000")]
    pub node_name: String,
    #[prost(message, optional, tag = "1001")]
    pub time: Option<Timestamp>,
}

/// The `response_types` oneof of `observer.GetFlowsResponse`. Almost every
/// response is a flow, so boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ResponseTypes {
    #[prost(message, tag = "1")]
    Flow(Flow),
    #[prost(message, tag = "2")]
    NodeStatus(NodeStatusEvent),
    #[prost(message, tag = "3")]
    LostEvents(LostEvent),
}

// ---- relay/relay.proto ----

/// `relay.NodeStatusEvent` (sent by Hubble Relay; a local agent sends none).
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeStatusEvent {
    #[prost(enumeration = "NodeState", tag = "1")]
    pub state_change: i32,
    #[prost(string, repeated, tag = "2")]
    pub node_names: Vec<String>,
    #[prost(string, tag = "3")]
    pub message: String,
}

proto_enum! {
    /// `relay.NodeState`.
    NodeState {
        UNKNOWN_NODE_STATE = 0,
        NODE_CONNECTED = 1,
        NODE_UNAVAILABLE = 2,
        NODE_GONE = 3,
        NODE_ERROR = 4,
    }
}

// ---- flow/flow.proto ----

/// `flow.LostEvent`: events Hubble itself lost before a client saw them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LostEvent {
    #[prost(enumeration = "LostEventSource", tag = "1")]
    pub source: i32,
    #[prost(uint64, tag = "2")]
    pub num_events_lost: u64,
    #[prost(message, optional, tag = "3")]
    pub cpu: Option<Int32Value>,
}

proto_enum! {
    /// `flow.LostEventSource`.
    LostEventSource {
        UNKNOWN_LOST_EVENT_SOURCE = 0,
        PERF_EVENT_RING_BUFFER = 1,
        OBSERVER_EVENTS_QUEUE = 2,
        HUBBLE_RING_BUFFER = 3,
    }
}

/// `flow.FlowFilter`, only the fields a node-local filter would use.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FlowFilter {
    #[prost(string, repeated, tag = "2")]
    pub source_pod: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub destination_pod: Vec<String>,
    #[prost(enumeration = "Verdict", repeated, tag = "5")]
    pub verdict: Vec<i32>,
    #[prost(string, repeated, tag = "12")]
    pub protocol: Vec<String>,
    #[prost(bool, repeated, tag = "15")]
    pub reply: Vec<bool>,
    #[prost(string, repeated, tag = "24")]
    pub node_name: Vec<String>,
}

/// `flow.Flow`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Flow {
    #[prost(message, optional, tag = "1")]
    pub time: Option<Timestamp>,
    #[prost(string, tag = "34")]
    pub uuid: String,
    #[prost(enumeration = "Verdict", tag = "2")]
    pub verdict: i32,
    /// Deprecated numeric drop reason; `drop_reason_desc` replaces it.
    #[prost(uint32, tag = "3")]
    pub drop_reason: u32,
    #[prost(message, optional, tag = "5")]
    pub ip: Option<Ip>,
    #[prost(message, optional, tag = "6")]
    pub l4: Option<Layer4>,
    #[prost(message, optional, tag = "8")]
    pub source: Option<Endpoint>,
    #[prost(message, optional, tag = "9")]
    pub destination: Option<Endpoint>,
    #[prost(enumeration = "FlowType", tag = "10")]
    pub r#type: i32,
    #[prost(string, tag = "11")]
    pub node_name: String,
    #[prost(string, repeated, tag = "13")]
    pub source_names: Vec<String>,
    #[prost(string, repeated, tag = "14")]
    pub destination_names: Vec<String>,
    /// Set if and only if `type` is L7.
    #[prost(message, optional, tag = "15")]
    pub l7: Option<Layer7>,
    /// Deprecated (false when absent); `is_reply` replaces it.
    #[prost(bool, tag = "16")]
    pub reply: bool,
    #[prost(message, optional, tag = "19")]
    pub event_type: Option<CiliumEventType>,
    #[prost(message, optional, tag = "20")]
    pub source_service: Option<Service>,
    #[prost(message, optional, tag = "21")]
    pub destination_service: Option<Service>,
    #[prost(enumeration = "TrafficDirection", tag = "22")]
    pub traffic_direction: i32,
    #[prost(enumeration = "DropReason", tag = "25")]
    pub drop_reason_desc: i32,
    /// Absent when Hubble cannot tell.
    #[prost(message, optional, tag = "26")]
    pub is_reply: Option<BoolValue>,
}

/// `flow.CiliumEventType`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct CiliumEventType {
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(int32, tag = "2")]
    pub sub_type: i32,
}

/// `flow.IP`: addresses as text.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ip {
    #[prost(string, tag = "1")]
    pub source: String,
    #[prost(string, tag = "2")]
    pub destination: String,
    #[prost(enumeration = "IpVersion", tag = "3")]
    pub ip_version: i32,
    #[prost(bool, tag = "4")]
    pub encrypted: bool,
}

proto_enum! {
    /// `flow.IPVersion`.
    IpVersion {
        IP_NOT_USED = 0,
        IPv4 = 1,
        IPv6 = 2,
    }
}

/// `flow.Layer4`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Layer4 {
    #[prost(oneof = "Protocol", tags = "1, 2, 3, 4, 5")]
    pub protocol: Option<Protocol>,
}

/// The `protocol` oneof of `flow.Layer4`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Protocol {
    #[prost(message, tag = "1")]
    Tcp(Tcp),
    #[prost(message, tag = "2")]
    Udp(Udp),
    #[prost(message, tag = "3")]
    IcmpV4(Icmp),
    #[prost(message, tag = "4")]
    IcmpV6(Icmp),
    #[prost(message, tag = "5")]
    Sctp(Udp),
}

/// `flow.TCP`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tcp {
    #[prost(uint32, tag = "1")]
    pub source_port: u32,
    #[prost(uint32, tag = "2")]
    pub destination_port: u32,
    #[prost(message, optional, tag = "3")]
    pub flags: Option<TcpFlags>,
}

/// `flow.TCPFlags`.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct TcpFlags {
    #[prost(bool, tag = "1")]
    pub fin: bool,
    #[prost(bool, tag = "2")]
    pub syn: bool,
    #[prost(bool, tag = "3")]
    pub rst: bool,
    #[prost(bool, tag = "4")]
    pub psh: bool,
    #[prost(bool, tag = "5")]
    pub ack: bool,
    #[prost(bool, tag = "6")]
    pub urg: bool,
    #[prost(bool, tag = "7")]
    pub ece: bool,
    #[prost(bool, tag = "8")]
    pub cwr: bool,
    #[prost(bool, tag = "9")]
    pub ns: bool,
}

/// `flow.UDP`, and `flow.SCTP`, which has the same fields.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Udp {
    #[prost(uint32, tag = "1")]
    pub source_port: u32,
    #[prost(uint32, tag = "2")]
    pub destination_port: u32,
}

/// `flow.ICMPv4` and `flow.ICMPv6`, which have the same fields.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Icmp {
    #[prost(uint32, tag = "1")]
    pub r#type: u32,
    #[prost(uint32, tag = "2")]
    pub code: u32,
}

/// `flow.Endpoint`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Endpoint {
    /// Cilium's local endpoint ID (0 for remote ends).
    #[prost(uint32, tag = "1")]
    pub id: u32,
    /// The security identity.
    #[prost(uint32, tag = "2")]
    pub identity: u32,
    #[prost(string, tag = "3")]
    pub namespace: String,
    /// `source:key=value`, e.g. `k8s:app=nginx`, `reserved:world`.
    #[prost(string, repeated, tag = "4")]
    pub labels: Vec<String>,
    #[prost(string, tag = "5")]
    pub pod_name: String,
    #[prost(message, repeated, tag = "6")]
    pub workloads: Vec<Workload>,
    #[prost(string, tag = "7")]
    pub cluster_name: String,
}

/// `flow.Workload`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Workload {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub kind: String,
}

/// `flow.Service`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
}

/// `flow.Layer7`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Layer7 {
    #[prost(enumeration = "L7FlowType", tag = "1")]
    pub r#type: i32,
    /// Set on responses.
    #[prost(uint64, tag = "2")]
    pub latency_ns: u64,
    #[prost(oneof = "Record", tags = "100, 101, 102")]
    pub record: Option<Record>,
}

/// The `record` oneof of `flow.Layer7`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Record {
    #[prost(message, tag = "100")]
    Dns(Dns),
    #[prost(message, tag = "101")]
    Http(Http),
    #[prost(message, tag = "102")]
    Kafka(Kafka),
}

/// `flow.DNS`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dns {
    #[prost(string, tag = "1")]
    pub query: String,
    #[prost(string, repeated, tag = "2")]
    pub ips: Vec<String>,
    #[prost(uint32, tag = "3")]
    pub ttl: u32,
    #[prost(string, repeated, tag = "4")]
    pub cnames: Vec<String>,
    #[prost(string, tag = "5")]
    pub observation_source: String,
    /// IANA DNS RCODE (meaningful on responses).
    #[prost(uint32, tag = "6")]
    pub rcode: u32,
    #[prost(string, repeated, tag = "7")]
    pub qtypes: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    pub rrtypes: Vec<String>,
}

/// `flow.HTTPHeader`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct HttpHeader {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `flow.HTTP`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Http {
    /// Set on responses.
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub method: String,
    /// The full URL, query string included: flowtel keeps host and path only.
    #[prost(string, tag = "3")]
    pub url: String,
    #[prost(string, tag = "4")]
    pub protocol: String,
    #[prost(message, repeated, tag = "5")]
    pub headers: Vec<HttpHeader>,
}

/// `flow.Kafka`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Kafka {
    #[prost(int32, tag = "1")]
    pub error_code: i32,
    #[prost(int32, tag = "2")]
    pub api_version: i32,
    #[prost(string, tag = "3")]
    pub api_key: String,
    #[prost(int32, tag = "4")]
    pub correlation_id: i32,
    #[prost(string, tag = "5")]
    pub topic: String,
}

proto_enum! {
    /// `flow.FlowType`.
    FlowType {
        UNKNOWN_TYPE = 0,
        L3_L4 = 1,
        L7 = 2,
        SOCK = 3,
    }
}

proto_enum! {
    /// `flow.L7FlowType`.
    L7FlowType {
        UNKNOWN_L7_TYPE = 0,
        REQUEST = 1,
        RESPONSE = 2,
        SAMPLE = 3,
    }
}

proto_enum! {
    /// `flow.TrafficDirection`.
    TrafficDirection {
        TRAFFIC_DIRECTION_UNKNOWN = 0,
        INGRESS = 1,
        EGRESS = 2,
    }
}

proto_enum! {
    /// `flow.Verdict`.
    Verdict {
        VERDICT_UNKNOWN = 0,
        FORWARDED = 1,
        DROPPED = 2,
        ERROR = 3,
        AUDIT = 4,
        REDIRECTED = 5,
        TRACED = 6,
        TRANSLATED = 7,
    }
}

proto_enum! {
    /// `flow.DropReason`: shared with Cilium's `bpf/lib/common.h`. Values a
    /// newer agent adds are reported as `UNKNOWN_<n>`.
    DropReason {
        DROP_REASON_UNKNOWN = 0,
        INVALID_SOURCE_MAC = 130,
        INVALID_DESTINATION_MAC = 131,
        INVALID_SOURCE_IP = 132,
        POLICY_DENIED = 133,
        INVALID_PACKET_DROPPED = 134,
        CT_TRUNCATED_OR_INVALID_HEADER = 135,
        CT_MISSING_TCP_ACK_FLAG = 136,
        CT_UNKNOWN_L4_PROTOCOL = 137,
        CT_CANNOT_CREATE_ENTRY_FROM_PACKET = 138,
        UNSUPPORTED_L3_PROTOCOL = 139,
        MISSED_TAIL_CALL = 140,
        ERROR_WRITING_TO_PACKET = 141,
        UNKNOWN_L4_PROTOCOL = 142,
        UNKNOWN_ICMPV4_CODE = 143,
        UNKNOWN_ICMPV4_TYPE = 144,
        UNKNOWN_ICMPV6_CODE = 145,
        UNKNOWN_ICMPV6_TYPE = 146,
        ERROR_RETRIEVING_TUNNEL_KEY = 147,
        ERROR_RETRIEVING_TUNNEL_OPTIONS = 148,
        INVALID_GENEVE_OPTION = 149,
        UNKNOWN_L3_TARGET_ADDRESS = 150,
        STALE_OR_UNROUTABLE_IP = 151,
        NO_MATCHING_LOCAL_CONTAINER_FOUND = 152,
        ERROR_WHILE_CORRECTING_L3_CHECKSUM = 153,
        ERROR_WHILE_CORRECTING_L4_CHECKSUM = 154,
        CT_MAP_INSERTION_FAILED = 155,
        INVALID_IPV6_EXTENSION_HEADER = 156,
        IP_FRAGMENTATION_NOT_SUPPORTED = 157,
        SERVICE_BACKEND_NOT_FOUND = 158,
        NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT = 160,
        FAILED_TO_INSERT_INTO_PROXYMAP = 161,
        REACHED_EDT_RATE_LIMITING_DROP_HORIZON = 162,
        UNKNOWN_CONNECTION_TRACKING_STATE = 163,
        LOCAL_HOST_IS_UNREACHABLE = 164,
        NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION = 165,
        UNSUPPORTED_L2_PROTOCOL = 166,
        NO_MAPPING_FOR_NAT_MASQUERADE = 167,
        UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE = 168,
        FIB_LOOKUP_FAILED = 169,
        ENCAPSULATION_TRAFFIC_IS_PROHIBITED = 170,
        INVALID_IDENTITY = 171,
        UNKNOWN_SENDER = 172,
        NAT_NOT_NEEDED = 173,
        IS_A_CLUSTERIP = 174,
        FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND = 175,
        FORBIDDEN_ICMPV6_MESSAGE = 176,
        DENIED_BY_LB_SRC_RANGE_CHECK = 177,
        SOCKET_LOOKUP_FAILED = 178,
        SOCKET_ASSIGN_FAILED = 179,
        PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL = 180,
        POLICY_DENY = 181,
        VLAN_FILTERED = 182,
        INVALID_VNI = 183,
        INVALID_TC_BUFFER = 184,
        NO_SID = 185,
        MISSING_SRV6_STATE = 186,
        NAT46 = 187,
        NAT64 = 188,
        AUTH_REQUIRED = 189,
        CT_NO_MAP_FOUND = 190,
        SNAT_NO_MAP_FOUND = 191,
        INVALID_CLUSTER_ID = 192,
        UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP = 193,
        NO_EGRESS_GATEWAY = 194,
        TTL_EXCEEDED = 196,
        NO_NODE_ID = 197,
        DROP_HOST_NOT_READY = 202,
        DROP_EP_NOT_READY = 203,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn enum_names_are_the_proto_names() {
        assert_eq!(DropReason::POLICY_DENIED.as_str_name(), "POLICY_DENIED");
        assert_eq!(DropReason::try_from(133), Ok(DropReason::POLICY_DENIED));
        assert!(DropReason::try_from(159).is_err());
        assert_eq!(
            Verdict::try_from(2).map(Verdict::as_str_name),
            Ok("DROPPED")
        );
    }

    /// Field numbers decide the wire bytes: a flow with `uuid` (34) and
    /// `is_reply` (26) must encode to exactly these tags.
    #[test]
    fn wire_tags_match_the_public_api() {
        let flow = Flow {
            uuid: "u".into(),
            is_reply: Some(BoolValue { value: true }),
            ..Flow::default()
        };
        // tag 26, wire type 2 => (26 << 3) | 2 = 210 = 0xd2 0x01 as a varint;
        // tag 34, wire type 2 => 274 = 0x92 0x02.
        assert_eq!(
            flow.encode_to_vec(),
            vec![0xd2, 0x01, 0x02, 0x08, 0x01, 0x92, 0x02, 0x01, b'u']
        );
        let response = GetFlowsResponse {
            node_name: "n".into(),
            ..GetFlowsResponse::default()
        };
        // tag 1000, wire type 2 => 8002 = 0xc2 0x3e.
        assert_eq!(response.encode_to_vec(), vec![0xc2, 0x3e, 0x01, b'n']);
    }
}
