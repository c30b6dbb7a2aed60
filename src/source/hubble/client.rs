//! The gRPC client: `observer.Observer/GetFlows` in follow mode over the
//! Cilium agent's local Unix socket, reconnecting with bounded exponential
//! backoff. Every failure (socket absent, connection refused, the call
//! refused, the stream breaking, a message that does not decode) is
//! counted by kind and logged at most once per interval per kind; none
//! ends the task.
//!
//! Responses are received as raw bytes and decoded here rather than by
//! tonic's codec: a message that fails to decode is then one counted
//! error and the stream goes on, instead of a `Status` that ends it.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use prost::bytes::{Buf, Bytes};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Endpoint;
use tonic::Status;

use super::convert::{convert, timestamp, to_timestamp};
use super::proto;
use super::report::Aggregator;

/// The gRPC method, as `/package.Service/Method`.
pub const GET_FLOWS_PATH: &str = "/observer.Observer/GetFlows";

/// The first wait after a failure; it doubles up to the configured maximum.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// Flow UUIDs remembered to skip flows replayed after a reconnect; Hubble's
/// default ring buffer holds 4095 flows, so a replay never reaches further.
const DEDUP_CAPACITY: usize = 8192;

/// How long a local connection may take: the agent is on this node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the client task needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub socket: PathBuf,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Each kind of error is logged at most once per this interval.
    pub log_interval: Duration,
}

/// Runs until aborted: connect, stream, count, back off, again.
pub async fn run(settings: ClientSettings, shared: Arc<Mutex<Aggregator>>) {
    let floor = Duration::from_millis(10);
    let max = settings.backoff_max.max(floor);
    let initial = settings.backoff_initial.clamp(floor, max);
    let mut backoff = initial;
    let mut dedup = Dedup::new(DEDUP_CAPACITY);
    let mut log = ErrorLog::new(settings.log_interval);
    loop {
        let delivered = session(&settings.socket, &shared, &mut dedup, &mut log).await;
        lock(&shared).connected(false);
        if delivered {
            backoff = initial;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max);
    }
}

fn lock(shared: &Mutex<Aggregator>) -> std::sync::MutexGuard<'_, Aggregator> {
    // Nothing panics while holding it; if something did, the counters are
    // still better than none.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn fail(
    shared: &Mutex<Aggregator>,
    log: &mut ErrorLog,
    kind: &'static str,
    message: impl std::fmt::Display,
) {
    lock(shared).error(kind);
    log.record(kind, message, Instant::now());
}

/// One connection and stream. Returns whether any message arrived, which
/// resets the backoff.
async fn session(
    socket: &Path,
    shared: &Mutex<Aggregator>,
    dedup: &mut Dedup,
    log: &mut ErrorLog,
) -> bool {
    if let Err(e) = std::fs::metadata(socket) {
        fail(
            shared,
            log,
            "socket_absent",
            format_args!("{}: {e}", socket.display()),
        );
        return false;
    }
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    // The authority is only a header here; the connector picks the socket.
    let channel = match Endpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
    {
        Ok(channel) => channel,
        Err(e) => {
            fail(
                shared,
                log,
                "connect",
                format_args!("{}: {}", socket.display(), error_chain(&e)),
            );
            return false;
        }
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        fail(shared, log, "connect", error_chain(&e));
        return false;
    }
    let request = proto::GetFlowsRequest {
        follow: true,
        since: dedup.resume_from().map(to_timestamp),
        ..proto::GetFlowsRequest::default()
    };
    let path = http::uri::PathAndQuery::from_static(GET_FLOWS_PATH);
    let mut stream = match grpc
        .server_streaming(tonic::Request::new(request), path, RawCodec)
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            fail(shared, log, "rpc", status_text(&status));
            return false;
        }
    };
    lock(shared).connected(true);
    dedup.start_session();
    let mut delivered = false;
    loop {
        match stream.message().await {
            Ok(Some(bytes)) => {
                delivered = true;
                handle(bytes, shared, dedup, log);
            }
            Ok(None) => {
                fail(
                    shared,
                    log,
                    "stream_ended",
                    "the agent ended the GetFlows stream",
                );
                return delivered;
            }
            Err(status) => {
                fail(shared, log, "stream", status_text(&status));
                return delivered;
            }
        }
    }
}

fn handle(bytes: Bytes, shared: &Mutex<Aggregator>, dedup: &mut Dedup, log: &mut ErrorLog) {
    let response = match proto::GetFlowsResponse::decode(bytes) {
        Ok(response) => response,
        Err(e) => {
            fail(
                shared,
                log,
                "decode",
                format_args!("a GetFlows response did not decode: {e}"),
            );
            return;
        }
    };
    match response.response_types {
        Some(proto::ResponseTypes::Flow(flow)) => {
            let time = flow.time.or(response.time).and_then(timestamp);
            if dedup.is_duplicate(&flow.uuid, time) {
                lock(shared).duplicate();
                return;
            }
            let converted = convert(flow);
            lock(shared).record(converted);
        }
        Some(proto::ResponseTypes::LostEvents(lost)) => {
            let source = match proto::LostEventSource::try_from(lost.source) {
                Ok(source) => source.as_str_name().to_owned(),
                Err(_) => format!("UNKNOWN_{}", lost.source),
            };
            lock(shared).lost(&source, lost.num_events_lost);
        }
        // Relay's node status (a local agent sends none), or an empty
        // message: nothing to count.
        Some(proto::ResponseTypes::NodeStatus(_)) | None => {}
    }
}

fn status_text(status: &Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(&format!(" ({})", error_chain(source)));
    }
    text
}

/// An error and its causes on one line (tonic's transport errors say only
/// "transport error" at the top).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// Encodes the request with prost, passes response bytes through.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = proto::GetFlowsRequest;
    type Decode = Bytes;
    type Encoder = RequestEncoder;
    type Decoder = BytesDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesDecoder
    }
}

#[derive(Debug, Clone, Copy)]
struct RequestEncoder;

impl Encoder for RequestEncoder {
    type Item = proto::GetFlowsRequest;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding GetFlowsRequest: {e}")))
    }
}

#[derive(Debug, Clone, Copy)]
struct BytesDecoder;

impl Decoder for BytesDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len)))
    }
}

/// Skips flows counted before a reconnect. After a break the client asks
/// for flows `since` the newest one it saw, so none in the gap is lost;
/// the ones it already counted come again and are recognised by UUID (or,
/// for agents too old to send UUIDs, by being no newer than that time).
#[derive(Debug)]
pub struct Dedup {
    capacity: usize,
    order: VecDeque<String>,
    seen: HashSet<String>,
    newest: Option<SystemTime>,
    /// In a resumed session: flows without UUID up to this time are old.
    cutoff: Option<SystemTime>,
}

impl Dedup {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            seen: HashSet::new(),
            newest: None,
            cutoff: None,
        }
    }

    /// Where a new stream should start: `None` on the first connection
    /// (only new flows), the newest flow's time after that.
    pub fn resume_from(&self) -> Option<SystemTime> {
        self.newest
    }

    /// Marks the start of a stream.
    pub fn start_session(&mut self) {
        self.cutoff = self.newest;
    }

    /// Whether this flow was already counted; remembers it if not.
    pub fn is_duplicate(&mut self, uuid: &str, time: Option<SystemTime>) -> bool {
        if uuid.is_empty() {
            if let (Some(time), Some(cutoff)) = (time, self.cutoff) {
                if time <= cutoff {
                    return true;
                }
            }
        } else {
            if self.seen.contains(uuid) {
                return true;
            }
            if self.order.len() >= self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
            self.order.push_back(uuid.to_owned());
            self.seen.insert(uuid.to_owned());
        }
        if let Some(time) = time {
            if self.newest.is_none_or(|newest| time > newest) {
                self.newest = Some(time);
            }
        }
        false
    }
}

/// Logs each kind of error at most once per interval: the first at once,
/// the rest summed into the next line of that kind.
#[derive(Debug)]
pub struct ErrorLog {
    interval: Duration,
    kinds: Vec<(&'static str, Option<Instant>, u64)>,
}

impl ErrorLog {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            kinds: Vec::new(),
        }
    }

    /// Notes one error; returns whether it was logged.
    pub fn record(
        &mut self,
        kind: &'static str,
        message: impl std::fmt::Display,
        now: Instant,
    ) -> bool {
        let index = match self.kinds.iter().position(|(k, _, _)| *k == kind) {
            Some(index) => index,
            None => {
                self.kinds.push((kind, None, 0));
                self.kinds.len() - 1
            }
        };
        let Some((_, last, suppressed)) = self.kinds.get_mut(index) else {
            return false;
        };
        let due = last.is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if !due {
            *suppressed += 1;
            return false;
        }
        tracing::warn!(
            kind,
            suppressed_since_last_log = *suppressed,
            "hubble source: {message}"
        );
        *last = Some(now);
        *suppressed = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_logged_once_per_interval_per_kind() {
        let mut log = ErrorLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(log.record("stream", "a", t0));
        assert!(!log.record("stream", "b", t0 + Duration::from_secs(1)));
        assert!(log.record("decode", "c", t0 + Duration::from_secs(1)));
        assert!(!log.record("stream", "d", t0 + Duration::from_secs(9)));
        assert!(log.record("stream", "e", t0 + Duration::from_secs(10)));
    }

    #[test]
    fn replayed_flows_are_skipped() {
        let t = |s| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let mut dedup = Dedup::new(2);
        assert_eq!(dedup.resume_from(), None);
        assert!(!dedup.is_duplicate("a", t(10)));
        assert!(!dedup.is_duplicate("", t(11)));
        assert!(dedup.is_duplicate("a", t(10)));
        assert_eq!(dedup.resume_from(), t(11));
        dedup.start_session();
        // Without UUID: no newer than the cutoff means already seen.
        assert!(dedup.is_duplicate("", t(11)));
        assert!(!dedup.is_duplicate("", t(12)));
        // The UUID memory is bounded: the oldest is forgotten.
        assert!(!dedup.is_duplicate("b", t(12)));
        assert!(!dedup.is_duplicate("c", t(12)));
        assert!(!dedup.is_duplicate("a", t(13)));
    }
}
