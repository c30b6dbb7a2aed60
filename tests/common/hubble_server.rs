//! A local Hubble Observer for tests: `observer.Observer/GetFlows` over a
//! Unix socket, served by hyper's HTTP/2 server and tonic's server-side
//! gRPC framing. Each accepted connection plays the next scripted session
//! (send a message, send raw bytes, fail with a status, drop the
//! connection without a status, end cleanly); connections past the script
//! get a stream that stays open and silent, as an idle agent's would.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowtel::source::hubble::proto;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::bytes::{Buf, Bytes};
use prost::Message;
use tokio::sync::Notify;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// One thing the server does on a stream.
#[derive(Debug, Clone)]
pub enum Step {
    /// A well-formed response.
    Send(Box<proto::GetFlowsResponse>),
    /// These bytes as one gRPC message, whatever they are.
    Raw(Vec<u8>),
    /// End the stream with this status (the agent's error path).
    Fail(Status),
    /// Close the connection with no status, as a crashing agent does.
    Drop,
    /// End the stream with status OK.
    End,
    Wait(Duration),
}

/// What a client sent: the method path and the decoded request.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub request: proto::GetFlowsRequest,
}

pub struct HubbleServer {
    received: Arc<Mutex<Vec<Received>>>,
    accepted: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl HubbleServer {
    /// Listens on `path` now; connection `i` plays `sessions[i]`.
    pub fn start(path: &Path, sessions: Vec<Vec<Step>>) -> Self {
        let listener = tokio::net::UnixListener::bind(path).expect("bind the Hubble socket");
        let sessions = Arc::new(Mutex::new(VecDeque::from(sessions)));
        let received = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(0));
        let task = {
            let received = Arc::clone(&received);
            let accepted = Arc::clone(&accepted);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    *accepted.lock().unwrap() += 1;
                    let steps = sessions.lock().unwrap().pop_front().unwrap_or_default();
                    tokio::spawn(serve(stream, steps, Arc::clone(&received)));
                }
            })
        };
        Self {
            received,
            accepted,
            task,
        }
    }

    /// Every GetFlows request so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }
}

impl Drop for HubbleServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    stream: tokio::net::UnixStream,
    steps: Vec<Step>,
    received: Arc<Mutex<Vec<Received>>>,
) {
    let kill = Arc::new(Notify::new());
    let steps = Arc::new(Mutex::new(Some(steps)));
    let service = {
        let kill = Arc::clone(&kill);
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let path = request.uri().path().to_owned();
            let steps = steps.lock().unwrap().take().unwrap_or_default();
            let received = Arc::clone(&received);
            let kill = Arc::clone(&kill);
            async move {
                let flows =
                    tower::service_fn(move |req: tonic::Request<proto::GetFlowsRequest>| {
                        received.lock().unwrap().push(Received {
                            path: path.clone(),
                            request: req.into_inner(),
                        });
                        let stream = play(steps.clone(), Arc::clone(&kill));
                        async move { Ok::<_, Status>(tonic::Response::new(stream)) }
                    });
                let mut grpc = tonic::server::Grpc::new(ServerCodec);
                Ok::<_, Infallible>(grpc.server_streaming(flows, request).await)
            }
        })
    };
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = connection => {}
        // Dropping the connection closes the socket mid-stream.
        _ = kill.notified() => {}
    }
}

type Item = Result<Bytes, Status>;

fn play(
    steps: Vec<Step>,
    kill: Arc<Notify>,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = Item> + Send>> {
    let state = (steps.into_iter(), kill, false);
    Box::pin(futures::stream::unfold(
        state,
        |(mut steps, kill, done)| async move {
            if done {
                return None;
            }
            loop {
                match steps.next() {
                    Some(Step::Send(message)) => {
                        let bytes = Bytes::from(message.encode_to_vec());
                        return Some((Ok(bytes), (steps, kill, false)));
                    }
                    Some(Step::Raw(bytes)) => {
                        return Some((Ok(Bytes::from(bytes)), (steps, kill, false)))
                    }
                    Some(Step::Fail(status)) => return Some((Err(status), (steps, kill, true))),
                    Some(Step::End) => return None,
                    Some(Step::Wait(duration)) => tokio::time::sleep(duration).await,
                    Some(Step::Drop) => {
                        // Let what was sent reach the socket first.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        kill.notify_one();
                        futures::future::pending::<()>().await;
                    }
                    None => futures::future::pending::<()>().await,
                }
            }
        },
    ))
}

/// Decodes the request with prost, sends response bytes as given.
struct ServerCodec;

impl Codec for ServerCodec {
    type Encode = Bytes;
    type Decode = proto::GetFlowsRequest;
    type Encoder = RawEncoder;
    type Decoder = RequestDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RequestDecoder {
        RequestDecoder
    }
}

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

struct RequestDecoder;

impl Decoder for RequestDecoder {
    type Item = proto::GetFlowsRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        proto::GetFlowsRequest::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// A forwarded L3/L4 flow between two ends (endpoint, address, port) as
/// the agent on `kind-worker` reports it; a `uuid` ending in "syn" marks a
/// connection's first packet.
#[allow(clippy::too_many_arguments)]
pub fn flow(
    uuid: &str,
    time: proto::Timestamp,
    (src, src_ip, src_port): (proto::Endpoint, &str, u32),
    (dst, dst_ip, dst_port): (proto::Endpoint, &str, u32),
    udp: bool,
    direction: proto::TrafficDirection,
    is_reply: bool,
) -> proto::Flow {
    let l4 = if udp {
        proto::Protocol::Udp(proto::Udp {
            source_port: src_port,
            destination_port: dst_port,
        })
    } else {
        proto::Protocol::Tcp(proto::Tcp {
            source_port: src_port,
            destination_port: dst_port,
            flags: Some(proto::TcpFlags {
                ack: true,
                syn: !is_reply && uuid.ends_with("syn"),
                ..proto::TcpFlags::default()
            }),
        })
    };
    proto::Flow {
        time: Some(time),
        uuid: uuid.into(),
        verdict: proto::Verdict::FORWARDED as i32,
        ip: Some(proto::Ip {
            source: src_ip.into(),
            destination: dst_ip.into(),
            ip_version: proto::IpVersion::IPv4 as i32,
            encrypted: false,
        }),
        l4: Some(proto::Layer4 { protocol: Some(l4) }),
        source: Some(src),
        destination: Some(dst),
        r#type: proto::FlowType::L3_L4 as i32,
        node_name: "kind-worker".into(),
        reply: is_reply,
        is_reply: Some(proto::BoolValue { value: is_reply }),
        traffic_direction: direction as i32,
        event_type: Some(proto::CiliumEventType {
            r#type: 4,
            sub_type: 0,
        }),
        ..proto::Flow::default()
    }
}

/// `flow` turned into an L7 record of `kind`.
pub fn l7(
    mut flow: proto::Flow,
    kind: proto::L7FlowType,
    latency_ms: u64,
    record: proto::Record,
) -> proto::Flow {
    flow.r#type = proto::FlowType::L7 as i32;
    flow.event_type = Some(proto::CiliumEventType {
        r#type: 129,
        sub_type: 0,
    });
    flow.l7 = Some(proto::Layer7 {
        r#type: kind as i32,
        latency_ns: latency_ms * 1_000_000,
        record: Some(record),
    });
    flow
}

/// The agent's message carrying `flow`.
pub fn respond(flow: proto::Flow) -> Step {
    Step::Send(Box::new(proto::GetFlowsResponse {
        time: flow.time,
        node_name: flow.node_name.clone(),
        response_types: Some(proto::ResponseTypes::Flow(flow)),
    }))
}
