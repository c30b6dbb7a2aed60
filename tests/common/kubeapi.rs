//! An in-process Kubernetes API server on 127.0.0.1 for the kube client
//! to list and watch, speaking the real HTTP protocol:
//!
//! * `GET /api/v1/{pods,services,nodes}`,
//!   `/apis/discovery.k8s.io/v1/endpointslices`, `/apis/apps/v1/replicasets`
//!   `/apis/batch/v1/jobs` and `/apis/events.k8s.io/v1/events`
//!   (cluster-wide: flowtel watches every namespace);
//! * lists paged with `limit`/`continue`, `metadata.resourceVersion` on the
//!   list and on every object, items without `apiVersion`/`kind` as the
//!   API server sends them;
//! * `watch=true&resourceVersion=N`: newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}`, every
//!   change after N replayed first, `BOOKMARK`s when
//!   `allowWatchBookmarks=true`, the stream closed after `timeoutSeconds`,
//!   and a `resourceVersion` older than the kept history answered with an
//!   `ERROR` event carrying a `Status` with code 410 (`Expired`);
//! * `Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`
//!   (and `as=PartialObjectMetadata` for watches): metadata only;
//! * a bearer token, as in the kubeconfig [`KubeApi::write_kubeconfig`]
//!   writes; requests without it get a 401 `Status`.
//!
//! Label and field selectors are ignored: flowtel sends one only for
//! Events (`type=Warning`), and filters what it gets itself as well.
//!
//! The test drives it: [`KubeApi::apply`] and [`KubeApi::delete`] change
//! objects at run time, [`KubeApi::force_gone`] breaks every watch with a
//! 410, [`KubeApi::stop`] and [`KubeApi::start`] take it down and up again
//! on the same port. [`fx`] builds objects shaped like real ones.
//!
//! The file is self-contained so that the benchmark can include it with
//! `#[path]`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

/// The bearer token the server accepts.
const TOKEN: &str = "flowtel-test-token";
/// What clients put in `Accept` for metadata-only lists and watches.
const METADATA_ACCEPT: &str = "as=PartialObjectMetadata";

/// The resources the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Pods,
    Services,
    EndpointSlices,
    Nodes,
    ReplicaSets,
    Jobs,
    /// `events.k8s.io/v1` Events, watched by the networking Events watcher
    /// (not by the cache, so not in [`Resource::ALL`]).
    Events,
}

impl Resource {
    pub const ALL: [Resource; 6] = [
        Resource::Pods,
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
        Resource::ReplicaSets,
        Resource::Jobs,
    ];

    /// Every resource served.
    pub const SERVED: [Resource; 7] = [
        Resource::Pods,
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
        Resource::ReplicaSets,
        Resource::Jobs,
        Resource::Events,
    ];

    fn path(self) -> &'static str {
        match self {
            Resource::Pods => "/api/v1/pods",
            Resource::Services => "/api/v1/services",
            Resource::Nodes => "/api/v1/nodes",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::ReplicaSets => "/apis/apps/v1/replicasets",
            Resource::Jobs => "/apis/batch/v1/jobs",
            Resource::Events => "/apis/events.k8s.io/v1/events",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::Pods | Resource::Services | Resource::Nodes => "v1",
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            Resource::ReplicaSets => "apps/v1",
            Resource::Jobs => "batch/v1",
            Resource::Events => "events.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Pods => "Pod",
            Resource::Services => "Service",
            Resource::Nodes => "Node",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::ReplicaSets => "ReplicaSet",
            Resource::Jobs => "Job",
            Resource::Events => "Event",
        }
    }

    fn from_path(path: &str) -> Option<Self> {
        Self::SERVED.into_iter().find(|r| r.path() == path)
    }

    /// The resource an object is, from its `apiVersion` and `kind`.
    pub fn of(object: &Value) -> Option<Self> {
        let api = object["apiVersion"].as_str()?;
        let kind = object["kind"].as_str()?;
        Self::SERVED
            .into_iter()
            .find(|r| r.api_version() == api && r.kind() == kind)
    }
}

/// Objects are kept in (resource, namespace, name) order, the order lists
/// come out in.
type Key = (Resource, String, String);

fn key_of(resource: Resource, object: &Value) -> Key {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        resource,
        text(&object["metadata"]["namespace"]),
        text(&object["metadata"]["name"]),
    )
}

/// One recorded change, serialised once for full and metadata-only
/// watchers.
#[derive(Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    full: Bytes,
    metadata: Bytes,
}

/// What live watches are sent.
#[derive(Debug, Clone)]
enum Live {
    Change(Arc<Change>),
    /// End every watch with a 410.
    Gone,
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .expect("a JSON value serialises");
    line.push(b'\n');
    Bytes::from(line)
}

fn metadata_object(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"],
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// An object and its list-item encodings, made once when it is written,
/// as the API server's watch cache keeps them.
#[derive(Debug)]
struct Stored {
    object: Value,
    /// As a list item: without `apiVersion` and `kind`.
    item: Bytes,
    /// As a `PartialObjectMetadataList` item.
    metadata_item: Bytes,
}

impl Stored {
    fn new(object: Value) -> Self {
        let mut item = object.clone();
        if let Some(fields) = item.as_object_mut() {
            fields.remove("apiVersion");
            fields.remove("kind");
        }
        let encode =
            |v: &Value| Bytes::from(serde_json::to_vec(v).expect("a JSON value serialises"));
        Self {
            item: encode(&item),
            metadata_item: encode(&json!({"metadata": object["metadata"]})),
            object,
        }
    }
}

#[derive(Debug, Default)]
struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    objects: BTreeMap<Key, Stored>,
    history: Vec<Arc<Change>>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest_watchable: u64,
    /// Changes are recorded but not sent to open watches.
    paused: bool,
    /// Requests served, by resource and verb (`list` or `watch`).
    requests: BTreeMap<(Resource, &'static str), u64>,
    /// Of those, the metadata-only ones.
    metadata_requests: BTreeMap<Resource, u64>,
    /// The server was started before (a restart drops the watch history).
    started_before: bool,
}

#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    live: broadcast::Sender<Live>,
    bookmark_every: Duration,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A test that panicked while holding the lock has failed already;
        // the data is still consistent enough to answer.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct Serving {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The test API server. Objects survive [`KubeApi::stop`]; the watch
/// history does not survive a restart, as with a real API server whose
/// watch cache starts afresh.
#[derive(Debug)]
pub struct KubeApi {
    shared: Arc<Shared>,
    port: u16,
    /// The port's socket, bound but not listening (so connections are
    /// refused, as with a server that is down), from `new` until the first
    /// start, so nothing else can take the port in between.
    held: Mutex<Option<TcpSocket>>,
    serving: Mutex<Option<Serving>>,
}

/// A socket bound to `addr` and not listening yet.
fn bound(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

impl KubeApi {
    /// A server that is not listening yet, on a port it holds until it
    /// starts.
    pub fn new() -> Self {
        let probe = bound(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind an ephemeral port on 127.0.0.1");
        let port = probe
            .local_addr()
            .expect("local address of the probe")
            .port();
        let (live, _) = broadcast::channel(65_536);
        Self {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                live,
                bookmark_every: Duration::from_secs(1),
            }),
            port,
            held: Mutex::new(Some(probe)),
            serving: Mutex::new(None),
        }
    }

    /// A server that is listening.
    pub async fn started() -> Self {
        let api = Self::new();
        api.start().await;
        api
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Binds the server's port again after a stop; the old socket may take
    /// a moment to close.
    async fn rebind(&self) -> TcpSocket {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match bound(addr) {
                Ok(l) => return l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        }
    }

    /// Starts listening (again) on the server's port.
    pub async fn start(&self) {
        assert!(
            self.serving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none(),
            "the test API server is already running"
        );
        {
            let mut store = self.shared.store();
            if store.started_before {
                store.history.clear();
                store.oldest_watchable = store.rv + 1;
            }
            store.started_before = true;
        }
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let listener = match held {
            Some(listener) => listener,
            None => self.rebind().await,
        };
        let listener = listener.listen(1024).expect("listen on the bound port");
        let (stop, mut stopped) = watch::channel(false);
        let app = Router::new()
            .fallback(handle)
            .with_state((self.shared.clone(), stop.subscribe()));
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                eprintln!("test API server: {e}");
            }
        });
        *self.serving.lock().unwrap_or_else(|e| e.into_inner()) = Some(Serving { stop, task });
    }

    /// Stops listening and ends every open connection.
    pub async fn stop(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(Serving { stop, task }) = serving {
            let _ = stop.send(true);
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    fn record(&self, store: &mut Store, resource: Resource, kind: &str, object: &Value) {
        let change = Arc::new(Change {
            rv: store.rv,
            resource,
            full: watch_line(kind, object),
            metadata: watch_line(kind, &metadata_object(object)),
        });
        store.history.push(change.clone());
        if !store.paused {
            // No receiver is fine: nobody is watching.
            let _ = self.shared.live.send(Live::Change(change));
        }
    }

    /// Creates or replaces an object, as a controller or kubelet would.
    /// The server sets `resourceVersion`, and `uid` and
    /// `creationTimestamp` when the object is new and has none. Returns
    /// the stored object.
    pub fn apply(&self, object: &Value) -> Value {
        let resource = Resource::of(object).unwrap_or_else(|| {
            panic!(
                "not a served resource: {} {}",
                object["apiVersion"], object["kind"]
            )
        });
        let mut object = object.clone();
        let key = key_of(resource, &object);
        let mut store = self.shared.store();
        store.rv += 1;
        let previous = store.objects.get(&key).map(|p| p.object.clone());
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(store.rv.to_string());
        if meta["uid"].is_null() {
            meta["uid"] = previous
                .as_ref()
                .map_or_else(|| json!(fx::uid()), |p| p["metadata"]["uid"].clone());
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = json!(fx::timestamp(SystemTime::now()));
        }
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(&mut store, resource, kind, &object);
        store.objects.insert(key, Stored::new(object.clone()));
        object
    }

    /// Deletes an object (by kind, namespace and name). False if there was
    /// none.
    pub fn delete(&self, object: &Value) -> bool {
        let Some(resource) = Resource::of(object) else {
            return false;
        };
        let key = key_of(resource, object);
        let mut store = self.shared.store();
        let Some(Stored {
            object: mut gone, ..
        }) = store.objects.remove(&key)
        else {
            return false;
        };
        store.rv += 1;
        gone["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        self.record(&mut store, resource, "DELETED", &gone);
        true
    }

    /// Loads many objects at once with no watch history, as a cluster
    /// that has been running for a while looks to a new client.
    pub fn load(&self, objects: impl IntoIterator<Item = Value>) {
        let mut store = self.shared.store();
        for mut object in objects {
            let resource = Resource::of(&object).expect("a served resource");
            store.rv += 1;
            object["metadata"]["resourceVersion"] = json!(store.rv.to_string());
            store
                .objects
                .insert(key_of(resource, &object), Stored::new(object));
        }
        store.history.clear();
        store.oldest_watchable = store.rv + 1;
    }

    /// Changes from now on reach open watches only through a re-list:
    /// they are recorded, not sent, until [`KubeApi::force_gone`].
    pub fn pause_watches(&self) {
        self.shared.store().paused = true;
    }

    /// Ends every open watch with an `ERROR` event carrying a 410 Gone
    /// `Status` and forgets the watch history, so that clients must
    /// re-list.
    pub fn force_gone(&self) {
        let mut store = self.shared.store();
        store.history.clear();
        store.oldest_watchable = store.rv + 1;
        store.paused = false;
        let _ = self.shared.live.send(Live::Gone);
    }

    /// How many list (`"list"`) or watch (`"watch"`) requests `resource`
    /// got.
    pub fn requests(&self, resource: Resource, verb: &str) -> u64 {
        let store = self.shared.store();
        store
            .requests
            .iter()
            .find(|((r, v), _)| *r == resource && *v == verb)
            .map_or(0, |(_, n)| *n)
    }

    /// How many list and watch requests for `resource` asked for metadata
    /// only.
    pub fn metadata_requests(&self, resource: Resource) -> u64 {
        self.shared
            .store()
            .metadata_requests
            .get(&resource)
            .copied()
            .unwrap_or(0)
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig.yaml");
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: flowtel-test\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: flowtel-test\n  context:\n    cluster: flowtel-test\n    user: flowtel-test\n\
             current-context: flowtel-test\n\
             preferences: {{}}\n\
             users:\n\
             - name: flowtel-test\n  user:\n    token: {TOKEN}\n",
            url = self.url()
        );
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }
}

impl Default for KubeApi {
    fn default() -> Self {
        Self::new()
    }
}

fn respond(code: StatusCode, body: Vec<u8>) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("a valid response")
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    respond(
        code,
        serde_json::to_vec(value).expect("a JSON value serialises"),
    )
}

fn failure(code: StatusCode, reason: &str, message: &str) -> Response {
    json_response(code, &status(code.as_u16(), reason, message))
}

async fn handle(
    State((shared, stop)): State<(Arc<Shared>, watch::Receiver<bool>)>,
    request: Request,
) -> Response {
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        return failure(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let Some(resource) = Resource::from_path(request.uri().path()) else {
        return failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if request.method() != axum::http::Method::GET {
        return failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        );
    }
    let query: BTreeMap<String, String> = request
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let metadata_only = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(METADATA_ACCEPT));
    if metadata_only {
        *shared
            .store()
            .metadata_requests
            .entry(resource)
            .or_default() += 1;
    }
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        watch_response(&shared, stop, resource, &query, metadata_only)
    } else {
        list_response(&shared, resource, &query, metadata_only)
    }
}

fn list_response(
    shared: &Shared,
    resource: Resource,
    query: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let mut store = shared.store();
    *store.requests.entry((resource, "list")).or_default() += 1;
    // A continue token is "rv|namespace|name" of the page's last object.
    let (list_rv, after) = match query.get("continue") {
        Some(token) => {
            let mut parts = token.splitn(3, '|');
            match (
                parts.next().and_then(|rv| rv.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) {
                (Some(rv), Some(ns), Some(name)) => (rv, Some((ns.to_string(), name.to_string()))),
                _ => {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "invalid continue token",
                    )
                }
            }
        }
        None => (store.rv, None),
    };
    let start = (
        resource,
        after.clone().map(|a| a.0).unwrap_or_default(),
        after.clone().map(|a| a.1).unwrap_or_default(),
    );
    let mut page: Vec<(&Key, &Stored)> = store
        .objects
        .range(start..)
        .take_while(|(k, _)| k.0 == resource)
        .filter(|(k, _)| {
            after
                .as_ref()
                .is_none_or(|(ns, name)| (&k.1, &k.2) != (ns, name))
        })
        .take(limit.map_or(usize::MAX, |l| l + 1))
        .collect();
    let more = limit.is_some_and(|l| page.len() > l);
    if more {
        page.pop();
    }
    let continue_token = match (more, page.last()) {
        (true, Some((k, _))) => format!("{list_rv}|{}|{}", k.1, k.2),
        _ => String::new(),
    };
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if !continue_token.is_empty() {
        metadata["continue"] = json!(continue_token);
    }
    let (api_version, kind) = if metadata_only {
        ("meta.k8s.io/v1", "PartialObjectMetadataList".to_string())
    } else {
        (resource.api_version(), format!("{}List", resource.kind()))
    };
    let head =
        serde_json::to_vec(&json!({"kind": kind, "apiVersion": api_version, "metadata": metadata}))
            .expect("a JSON value serialises");
    // `{...}` becomes `{...,"items":[item,item]}`.
    let mut body = head[..head.len() - 1].to_vec();
    body.extend_from_slice(br#","items":["#);
    for (i, (_, stored)) in page.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(if metadata_only {
            &stored.metadata_item
        } else {
            &stored.item
        });
    }
    body.extend_from_slice(b"]}");
    respond(StatusCode::OK, body)
}

fn watch_response(
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    resource: Resource,
    query: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Response {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let from = query
        .get("resourceVersion")
        .filter(|rv| !rv.is_empty() && *rv != "0")
        .map(|rv| rv.parse::<u64>());
    let line_of = move |c: &Change| {
        if metadata_only {
            c.metadata.clone()
        } else {
            c.full.clone()
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let mut replay: Vec<Bytes> = Vec::new();
    let mut live = shared.live.subscribe();
    let mut last_rv;
    {
        let mut store = shared.store();
        *store.requests.entry((resource, "watch")).or_default() += 1;
        last_rv = store.rv;
        match from {
            Some(Err(_)) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "resourceVersion is not a number",
                )
            }
            Some(Ok(rv)) if rv < store.oldest_watchable.saturating_sub(1) => {
                let message = format!(
                    "too old resource version: {rv} ({})",
                    store.oldest_watchable.saturating_sub(1)
                );
                replay.push(watch_line("ERROR", &status(410, "Expired", &message)));
                drop(store);
                return stream_response(replay, rx_closed(tx, rx));
            }
            Some(Ok(rv)) => replay.extend(
                store
                    .history
                    .iter()
                    .filter(|c| c.resource == resource && c.rv > rv)
                    .map(|c| line_of(c)),
            ),
            None => replay.extend(
                store
                    .objects
                    .range((resource, String::new(), String::new())..)
                    .take_while(|(k, _)| k.0 == resource)
                    .map(|(_, stored)| {
                        let object = if metadata_only {
                            metadata_object(&stored.object)
                        } else {
                            stored.object.clone()
                        };
                        watch_line("ADDED", &object)
                    }),
            ),
        }
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        for line in replay {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(shared.bookmark_every);
        bookmark.tick().await;
        loop {
            let line = tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => return,
                () = &mut deadline => return,
                _ = bookmark.tick(), if bookmarks => {
                    // Every change up to `last_rv` has been sent (or was
                    // another resource's): that is what a bookmark promises.
                    let rv = last_rv;
                    let object = if metadata_only {
                        json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": {"resourceVersion": rv.to_string()}})
                    } else {
                        json!({"kind": resource.kind(), "apiVersion": resource.api_version(),
                            "metadata": {"resourceVersion": rv.to_string()}})
                    };
                    watch_line("BOOKMARK", &object)
                }
                message = live.recv() => match message {
                    Ok(Live::Change(c)) if c.rv > last_rv => {
                        last_rv = c.rv;
                        if c.resource != resource {
                            continue;
                        }
                        line_of(&c)
                    }
                    Ok(Live::Change(_)) => continue,
                    Ok(Live::Gone) => {
                        let message = "too old resource version: the watch cache was reset";
                        let _ = tx.send(watch_line("ERROR", &status(410, "Expired", message))).await;
                        return;
                    }
                    // A slow reader loses its watch, as with a real server.
                    Err(_) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    stream_response(Vec::new(), rx)
}

/// A receiver whose sender is gone: the stream ends after the replay.
fn rx_closed(tx: mpsc::Sender<Bytes>, rx: mpsc::Receiver<Bytes>) -> mpsc::Receiver<Bytes> {
    drop(tx);
    rx
}

fn stream_response(first: Vec<Bytes>, rx: mpsc::Receiver<Bytes>) -> Response {
    let head = futures::stream::iter(first.into_iter().map(Ok::<Bytes, Infallible>));
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<Bytes, Infallible>(line), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures::StreamExt::chain(head, rest)))
        .expect("a valid response")
}

/// Builders of objects shaped like a real API server's: every field a
/// controller, the scheduler and the kubelet fill in, so the client parses
/// (and throws away) as much as it would in a cluster.
pub mod fx {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use serde_json::{json, Map, Value};

    /// A fresh uid in the usual 8-4-4-4-12 form.
    pub fn uid() -> String {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut h = DefaultHasher::new();
        (n, std::process::id()).hash(&mut h);
        let a = h.finish();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            (a & 0xfff) as u16,
            (n >> 48) as u16 & 0xfff,
            n & 0xffff_ffff_ffff
        )
    }

    /// RFC 3339 in UTC to the second, as Kubernetes writes times.
    pub fn timestamp(t: SystemTime) -> String {
        let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }

    fn now() -> String {
        timestamp(SystemTime::now())
    }

    /// A deterministic suffix like the ones controllers generate.
    fn suffix(seed: &str, len: usize) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut h = DefaultHasher::new();
        seed.hash(&mut h);
        let mut x = h.finish();
        (0..len)
            .map(|_| {
                let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
                x /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn hex(seed: &str, len: usize) -> String {
        let mut out = String::new();
        let mut i = 0u64;
        while out.len() < len {
            let mut h = DefaultHasher::new();
            (seed, i).hash(&mut h);
            out.push_str(&format!("{:016x}", h.finish()));
            i += 1;
        }
        out.truncate(len);
        out
    }

    /// An owner reference with `controller: true` pointing at `owner`.
    pub fn controller_ref(owner: &Value) -> Value {
        json!({
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": true,
            "blockOwnerDeletion": true,
        })
    }

    fn managed_field(
        manager: &str,
        api_version: &str,
        fields: Value,
        subresource: Option<&str>,
    ) -> Value {
        let mut entry = json!({
            "manager": manager,
            "operation": "Update",
            "apiVersion": api_version,
            "time": now(),
            "fieldsType": "FieldsV1",
            "fieldsV1": fields,
        });
        if let Some(s) = subresource {
            entry["subresource"] = json!(s);
        }
        entry
    }

    /// A workload object that pods or ReplicaSets/Jobs point at but that
    /// the server need not serve: `Deployment`, `StatefulSet`, `DaemonSet`
    /// or `CronJob`.
    pub fn workload(kind: &str, namespace: &str, name: &str) -> Value {
        let api_version = if kind == "CronJob" {
            "batch/v1"
        } else {
            "apps/v1"
        };
        json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid(),
                "generation": 1,
                "creationTimestamp": now(),
                "labels": {"app.kubernetes.io/name": name},
                "annotations": {"deployment.kubernetes.io/revision": "1"},
            },
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": name}}},
        })
    }

    fn container(name: &str, ports: &[(u16, Option<u16>)]) -> Value {
        let ports: Vec<Value> = ports
            .iter()
            .map(|(port, host)| {
                let mut p =
                    json!({"containerPort": port, "name": format!("p{port}"), "protocol": "TCP"});
                if let Some(h) = host {
                    p["hostPort"] = json!(h);
                }
                p
            })
            .collect();
        json!({
            "name": name,
            "image": format!("registry.example.com/{name}:1.4.2"),
            "imagePullPolicy": "IfNotPresent",
            "ports": ports,
            "resources": {
                "limits": {"cpu": "500m", "memory": "256Mi"},
                "requests": {"cpu": "100m", "memory": "128Mi"},
            },
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "volumeMounts": [{
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "name": format!("kube-api-access-{}", suffix(name, 5)),
                "readOnly": true,
            }],
        })
    }

    /// A ReplicaSet, controlled by `deployment` if given.
    pub fn replicaset(namespace: &str, name: &str, deployment: Option<&Value>) -> Value {
        let app = deployment
            .and_then(|d| d["metadata"]["name"].as_str())
            .unwrap_or(name)
            .to_string();
        let hash = name.rsplit('-').next().unwrap_or("5f6c7d8b9").to_string();
        let labels = json!({"app.kubernetes.io/name": app, "pod-template-hash": hash});
        let mut rs = json!({
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid(),
                "generation": 1,
                "creationTimestamp": now(),
                "labels": labels,
                "annotations": {
                    "deployment.kubernetes.io/desired-replicas": "2",
                    "deployment.kubernetes.io/max-replicas": "3",
                    "deployment.kubernetes.io/revision": "1",
                },
                "managedFields": [managed_field("kube-controller-manager", "apps/v1",
                    json!({"f:metadata": {"f:annotations": {}, "f:labels": {}, "f:ownerReferences": {}},
                           "f:spec": {"f:replicas": {}, "f:selector": {}, "f:template": {}}}), None)],
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [container(&app, &[(8080, None)])], "restartPolicy": "Always"},
                },
            },
            "status": {"availableReplicas": 2, "fullyLabeledReplicas": 2, "observedGeneration": 1,
                "readyReplicas": 2, "replicas": 2},
        });
        if let Some(d) = deployment {
            rs["metadata"]["ownerReferences"] = json!([controller_ref(d)]);
        }
        rs
    }

    /// A Job, controlled by `cronjob` if given.
    pub fn job(namespace: &str, name: &str, cronjob: Option<&Value>) -> Value {
        let id = uid();
        let labels = json!({
            "batch.kubernetes.io/controller-uid": id,
            "batch.kubernetes.io/job-name": name,
            "controller-uid": id,
            "job-name": name,
        });
        let mut job = json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": id,
                "generation": 1,
                "creationTimestamp": now(),
                "labels": labels,
                "annotations": {"batch.kubernetes.io/job-tracking": ""},
            },
            "spec": {
                "backoffLimit": 6,
                "completionMode": "NonIndexed",
                "completions": 1,
                "parallelism": 1,
                "selector": {"matchLabels": {"batch.kubernetes.io/controller-uid": id}},
                "suspend": false,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [container("task", &[])], "restartPolicy": "OnFailure"},
                },
            },
            "status": {"active": 1, "ready": 1, "startTime": now(), "terminating": 0,
                "uncountedTerminatedPods": {}},
        });
        if let Some(c) = cronjob {
            job["metadata"]["ownerReferences"] = json!([controller_ref(c)]);
        }
        job
    }

    /// A pod, built step by step.
    #[derive(Debug, Clone)]
    pub struct PodFx {
        namespace: String,
        name: String,
        node: Option<String>,
        host_ip: Option<String>,
        ips: Vec<String>,
        host_network: bool,
        owner: Option<Value>,
        labels: Map<String, Value>,
        ports: Vec<(u16, Option<u16>)>,
        phase: String,
    }

    impl PodFx {
        pub fn new(namespace: &str, name: &str) -> Self {
            Self {
                namespace: namespace.into(),
                name: name.into(),
                node: None,
                host_ip: None,
                ips: Vec::new(),
                host_network: false,
                owner: None,
                labels: Map::new(),
                ports: vec![(8080, None)],
                phase: "Running".into(),
            }
        }

        /// Scheduled on `node`, whose InternalIP is `host_ip`.
        pub fn on(mut self, node: &str, host_ip: &str) -> Self {
            self.node = Some(node.into());
            self.host_ip = Some(host_ip.into());
            self
        }

        /// `status.podIPs`, IPv4 first in a dual-stack cluster.
        pub fn ips(mut self, ips: &[&str]) -> Self {
            self.ips = ips.iter().map(|s| (*s).to_string()).collect();
            self
        }

        /// On the node's network: its address is the node's, and each of
        /// `ports` is both a containerPort and a hostPort.
        pub fn host_network(mut self, ports: &[u16]) -> Self {
            self.host_network = true;
            self.ports = ports.iter().map(|p| (*p, Some(*p))).collect();
            self
        }

        /// Controlled by `owner` (a ReplicaSet, Job, StatefulSet, ...).
        pub fn owned_by(mut self, owner: &Value) -> Self {
            self.owner = Some(owner.clone());
            self
        }

        pub fn label(mut self, key: &str, value: &str) -> Self {
            self.labels.insert(key.into(), json!(value));
            self
        }

        pub fn phase(mut self, phase: &str) -> Self {
            self.phase = phase.into();
            self
        }

        pub fn build(self) -> Value {
            let created = now();
            let mut labels = self.labels.clone();
            let mut generate_name = None;
            if let Some(owner) = &self.owner {
                let owner_name = owner["metadata"]["name"].as_str().unwrap_or_default();
                generate_name = Some(format!("{owner_name}-"));
                match owner["kind"].as_str() {
                    Some("ReplicaSet") => {
                        let hash = owner_name.rsplit('-').next().unwrap_or_default();
                        labels.insert("pod-template-hash".into(), json!(hash));
                    }
                    Some("Job") => {
                        labels.insert(
                            "batch.kubernetes.io/controller-uid".into(),
                            owner["metadata"]["uid"].clone(),
                        );
                        labels.insert("batch.kubernetes.io/job-name".into(), json!(owner_name));
                    }
                    Some("StatefulSet") => {
                        labels.insert(
                            "statefulset.kubernetes.io/pod-name".into(),
                            json!(self.name),
                        );
                        labels.insert(
                            "controller-revision-hash".into(),
                            json!(format!("{owner_name}-{}", suffix(owner_name, 10))),
                        );
                    }
                    Some("DaemonSet") => {
                        labels.insert(
                            "controller-revision-hash".into(),
                            json!(suffix(owner_name, 10)),
                        );
                        labels.insert("pod-template-generation".into(), json!("1"));
                    }
                    _ => {}
                }
            }
            let volume = format!("kube-api-access-{}", suffix(&self.name, 5));
            let mut metadata = json!({
                "name": self.name,
                "namespace": self.namespace,
                "uid": uid(),
                "creationTimestamp": created,
                "labels": labels,
                "annotations": {"kubectl.kubernetes.io/restartedAt": created},
                "managedFields": [
                    managed_field("kube-controller-manager", "v1", json!({"f:metadata": {
                        "f:generateName": {}, "f:labels": {}, "f:ownerReferences": {}},
                        "f:spec": {"f:containers": {}, "f:dnsPolicy": {}, "f:restartPolicy": {}}}), None),
                    managed_field("kubelet", "v1", json!({"f:status": {"f:conditions": {},
                        "f:containerStatuses": {}, "f:hostIP": {}, "f:hostIPs": {}, "f:phase": {},
                        "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}), Some("status")),
                ],
            });
            if let Some(g) = generate_name {
                metadata["generateName"] = json!(g);
            }
            if let Some(owner) = &self.owner {
                metadata["ownerReferences"] = json!([controller_ref(owner)]);
            }
            let mut spec = json!({
                "containers": [container("app", &self.ports)],
                "dnsPolicy": if self.host_network { "ClusterFirstWithHostNet" } else { "ClusterFirst" },
                "enableServiceLinks": true,
                "preemptionPolicy": "PreemptLowerPriority",
                "priority": 0,
                "restartPolicy": "Always",
                "schedulerName": "default-scheduler",
                "securityContext": {},
                "serviceAccount": "default",
                "serviceAccountName": "default",
                "terminationGracePeriodSeconds": 30,
                "tolerations": [
                    {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
                    {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300},
                ],
                "volumes": [{"name": volume, "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
                    {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}, "path": "namespace"}]}},
                ]}}],
            });
            if let Some(node) = &self.node {
                spec["nodeName"] = json!(node);
            }
            if self.host_network {
                spec["hostNetwork"] = json!(true);
            }
            let running = self.phase == "Running";
            let condition = |kind: &str| {
                json!({"lastProbeTime": null, "lastTransitionTime": created,
                "status": if running || kind == "PodScheduled" { "True" } else { "False" }, "type": kind})
            };
            let state = if running {
                json!({"running": {"startedAt": created}})
            } else {
                json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": created, "finishedAt": now(),
                    "containerID": format!("containerd://{}", hex(&self.name, 64))}})
            };
            let conditions: Vec<Value> = [
                "PodReadyToStartContainers",
                "Initialized",
                "Ready",
                "ContainersReady",
                "PodScheduled",
            ]
            .iter()
            .map(|k| condition(k))
            .collect();
            let mut status = json!({
                "phase": self.phase,
                "conditions": conditions,
                "containerStatuses": [{
                    "containerID": format!("containerd://{}", hex(&self.name, 64)),
                    "image": "registry.example.com/app:1.4.2",
                    "imageID": format!("registry.example.com/app@sha256:{}", hex("app", 64)),
                    "lastState": {},
                    "name": "app",
                    "ready": running,
                    "restartCount": 0,
                    "started": running,
                    "state": state,
                }],
                "qosClass": "Burstable",
                "startTime": created,
            });
            if let Some(host_ip) = &self.host_ip {
                status["hostIP"] = json!(host_ip);
                status["hostIPs"] = json!([{"ip": host_ip}]);
            }
            if let Some(first) = self.ips.first() {
                status["podIP"] = json!(first);
                status["podIPs"] = json!(self
                    .ips
                    .iter()
                    .map(|ip| json!({"ip": ip}))
                    .collect::<Vec<_>>());
            }
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status})
        }
    }

    /// A ClusterIP Service on port 80 (target 8080) with one cluster IP
    /// per family in `cluster_ips`.
    pub fn service(namespace: &str, name: &str, cluster_ips: &[&str]) -> Value {
        let families: Vec<&str> = cluster_ips
            .iter()
            .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
            .collect();
        let policy = if cluster_ips.len() > 1 {
            "PreferDualStack"
        } else {
            "SingleStack"
        };
        let applied = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"annotations": {}, "name": name, "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                "selector": {"app.kubernetes.io/name": name}}});
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid(),
                "creationTimestamp": now(),
                "labels": {"app.kubernetes.io/name": name},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{applied}\n")},
                "managedFields": [managed_field("kubectl-client-side-apply", "v1",
                    json!({"f:metadata": {"f:annotations": {}, "f:labels": {}},
                           "f:spec": {"f:internalTrafficPolicy": {}, "f:ports": {}, "f:selector": {},
                                      "f:sessionAffinity": {}, "f:type": {}}}), None)],
            },
            "spec": {
                "clusterIP": cluster_ips.first(),
                "clusterIPs": cluster_ips,
                "internalTrafficPolicy": "Cluster",
                "ipFamilies": families,
                "ipFamilyPolicy": policy,
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                "selector": {"app.kubernetes.io/name": name},
                "sessionAffinity": "None",
                "type": "ClusterIP",
            },
            "status": {"loadBalancer": {}},
        })
    }

    /// The EndpointSlice the EndpointSlice controller would write for
    /// `service` backed by `pods`, for one address family (`IPv4` or
    /// `IPv6`).
    pub fn endpoint_slice(service: &Value, family: &str, pods: &[&Value]) -> Value {
        let name = service["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = service["metadata"]["namespace"].clone();
        let endpoints: Vec<Value> = pods
            .iter()
            .filter_map(|pod| {
                let ip = pod["status"]["podIPs"]
                    .as_array()?
                    .iter()
                    .filter_map(|e| e["ip"].as_str())
                    .find(|ip| ip.contains(':') == (family == "IPv6"))?;
                Some(json!({
                    "addresses": [ip],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": pod["spec"]["nodeName"],
                    "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"],
                        "namespace": pod["metadata"]["namespace"], "uid": pod["metadata"]["uid"]},
                }))
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-{}", suffix(&format!("{name}{family}"), 5)),
                "generateName": format!("{name}-"),
                "namespace": namespace,
                "uid": uid(),
                "creationTimestamp": now(),
                "generation": 1,
                "labels": {
                    "app.kubernetes.io/name": name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": name,
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now()},
                "ownerReferences": [controller_ref(service)],
            },
            "addressType": family,
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        })
    }

    /// A Ready node in `zone` of `region` with the given InternalIPs (and
    /// an ExternalIP if given).
    pub fn node(
        name: &str,
        zone: &str,
        region: &str,
        internal: &[&str],
        external: Option<&str>,
    ) -> Value {
        let mut addresses: Vec<Value> = internal
            .iter()
            .map(|ip| json!({"address": ip, "type": "InternalIP"}))
            .collect();
        if let Some(ip) = external {
            addresses.push(json!({"address": ip, "type": "ExternalIP"}));
        }
        addresses.push(json!({"address": name, "type": "Hostname"}));
        addresses.push(json!({"address": format!("{name}.internal"), "type": "InternalDNS"}));
        let stamp = now();
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "uid": uid(),
                "creationTimestamp": stamp,
                "labels": {
                    "beta.kubernetes.io/arch": "amd64",
                    "beta.kubernetes.io/instance-type": "m5.large",
                    "beta.kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "node.kubernetes.io/instance-type": "m5.large",
                    "topology.kubernetes.io/region": region,
                    "topology.kubernetes.io/zone": zone,
                },
                "annotations": {
                    "node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                },
            },
            "spec": {
                "podCIDR": "10.244.1.0/24",
                "podCIDRs": ["10.244.1.0/24"],
                "providerID": format!("aws:///{zone}/i-{}", hex(name, 17)),
            },
            "status": {
                "addresses": addresses,
                "allocatable": {"cpu": "1930m", "ephemeral-storage": "76224326324", "hugepages-2Mi": "0",
                    "memory": "7291848Ki", "pods": "110"},
                "capacity": {"cpu": "2", "ephemeral-storage": "83873772Ki", "hugepages-2Mi": "0",
                    "memory": "7902152Ki", "pods": "110"},
                "conditions": [
                    {"lastHeartbeatTime": stamp, "lastTransitionTime": stamp, "message": "kubelet has sufficient memory available",
                        "reason": "KubeletHasSufficientMemory", "status": "False", "type": "MemoryPressure"},
                    {"lastHeartbeatTime": stamp, "lastTransitionTime": stamp, "message": "kubelet is posting ready status",
                        "reason": "KubeletReady", "status": "True", "type": "Ready"},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": uid(),
                    "containerRuntimeVersion": "containerd://1.7.22",
                    "kernelVersion": "6.1.0-25-amd64",
                    "kubeProxyVersion": "v1.33.1",
                    "kubeletVersion": "v1.33.1",
                    "machineID": hex(name, 32),
                    "operatingSystem": "linux",
                    "osImage": "Debian GNU/Linux 12 (bookworm)",
                    "systemUUID": uid(),
                },
            },
        })
    }

    /// A Warning Event about `pod` as kubelet on `node` reports it, in its
    /// `events.k8s.io/v1` form (legacy fields under `deprecated*`).
    pub fn event(pod: &Value, node: &str, reason: &str, note: &str, kind: &str) -> Value {
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let stamp = now();
        json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": format!("{name}.{}", &hex(&uid(), 16)),
                "namespace": namespace,
                "uid": uid(),
                "creationTimestamp": stamp,
            },
            "eventTime": null,
            "reason": reason,
            "note": note,
            "type": kind,
            "action": "",
            "reportingController": "kubelet",
            "reportingInstance": node,
            "regarding": {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": namespace,
                "name": name,
                "uid": pod["metadata"]["uid"],
                "resourceVersion": pod["metadata"]["resourceVersion"],
            },
            "deprecatedSource": {"component": "kubelet", "host": node},
            "deprecatedFirstTimestamp": stamp,
            "deprecatedLastTimestamp": stamp,
            "deprecatedCount": 1,
        })
    }
}
