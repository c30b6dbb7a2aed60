//! The task that owns the cache: it connects, runs one kube-runtime
//! watcher per kind, applies their events and publishes snapshots.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, watch};
use tokio::time::sleep_until;

use super::cache::{Applied, Cache, Kind, ListEnd, Object};
use super::index::Snapshot;
use super::ips::IpReporter;
use super::KubeStats;

/// The shortest time between two snapshots: a burst of changes (a
/// rollout, a re-list) costs one rebuild, not one per object.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// The shortest time between two log lines about one kind's failures.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Where the client's configuration comes from.
pub(crate) enum ClientSource {
    /// A kubeconfig file, read (and checked) at start.
    File(Box<Kubeconfig>),
    /// `KUBECONFIG` or `~/.kube/config`, else the pod's service account.
    Infer,
}

pub(crate) async fn client(source: &ClientSource) -> anyhow::Result<Client> {
    let config = match source {
        ClientSource::File(kubeconfig) => {
            kube::Config::from_custom_kubeconfig(
                (**kubeconfig).clone(),
                &KubeConfigOptions::default(),
            )
            .await?
        }
        ClientSource::Infer => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// One item of the merged watch streams.
type Item = (Kind, watcher::Result<Event<Object>>);

fn lift<K>(event: Event<K>, wrap: fn(K) -> Object) -> Event<Object> {
    match event {
        Event::Apply(k) => Event::Apply(wrap(k)),
        Event::Delete(k) => Event::Delete(wrap(k)),
        Event::Init => Event::Init,
        Event::InitApply(k) => Event::InitApply(wrap(k)),
        Event::InitDone => Event::InitDone,
    }
}

/// A watcher on every object of one kind in the cluster, retried with the
/// client-go backoff after any error (410 Gone included: the watcher then
/// re-lists by itself).
fn events<K>(api: Api<K>, kind: Kind, wrap: fn(K) -> Object) -> BoxStream<'static, Item>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |result| (kind, result.map(|event| lift(event, wrap))))
        .boxed()
}

fn all_events(client: &Client) -> BoxStream<'static, Item> {
    stream::select_all([
        events(Api::<Pod>::all(client.clone()), Kind::Pod, |p| {
            Object::Pod(Box::new(p))
        }),
        events(Api::<Service>::all(client.clone()), Kind::Service, |s| {
            Object::Service(Box::new(s))
        }),
        events(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlice,
            |e| Object::EndpointSlice(Box::new(e)),
        ),
        events(Api::<Node>::all(client.clone()), Kind::Node, |n| {
            Object::Node(Box::new(n))
        }),
        // Metadata only: the owner references are all that is needed.
        events(
            Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()),
            Kind::ReplicaSet,
            |m| Object::ReplicaSet(Box::new(m.metadata)),
        ),
        events(
            Api::<PartialObjectMeta<Job>>::all(client.clone()),
            Kind::Job,
            |m| Object::Job(Box::new(m.metadata)),
        ),
    ])
    .boxed()
}

/// Lets one log line through per [`LOG_EVERY`], counting the rest.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(n)` to log now, `n` lines having been held back since the
    /// last one.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < LOG_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Per-kind logging state.
#[derive(Debug, Default)]
struct KindLog {
    errors: Throttle,
    malformed: Throttle,
    shed: Throttle,
    /// Errors since the last success, to say when a watch recovers.
    failing: u64,
}

/// The state of the running task.
struct Task {
    cache: Cache,
    publish: watch::Sender<Arc<Snapshot>>,
    stats: Arc<KubeStats>,
    logs: [KindLog; 6],
    /// When the next snapshot is due, if one is.
    due: Option<Instant>,
    last_publish: Option<Instant>,
    /// The pod address events, sent with each snapshot.
    ips: Option<IpReporter>,
}

impl Task {
    fn log(&mut self, kind: Kind) -> &mut KindLog {
        &mut self.logs[kind.index()]
    }

    /// Counts and (throttled) logs a failure. `expired` is a 410 Gone: the
    /// API server's watch window moved on, which happens in any cluster
    /// now and then and is only worth an info line.
    fn on_error(&mut self, kind: Kind, error: &dyn std::fmt::Display, expired: bool) {
        self.stats.watch_errors.inc();
        let log = self.log(kind);
        log.failing += 1;
        if let Some(held_back) = log.errors.allow(Instant::now()) {
            if expired {
                tracing::info!(
                    resource = kind.resource(),
                    similar_errors_not_logged = held_back,
                    "Kubernetes watch expired, listing again: {error}"
                );
            } else {
                tracing::warn!(
                    resource = kind.resource(),
                    similar_errors_not_logged = held_back,
                    "Kubernetes watch failed, retrying with backoff: {error}"
                );
            }
        }
    }

    fn on_success(&mut self, kind: Kind) {
        let log = self.log(kind);
        if log.failing > 0 {
            tracing::info!(
                resource = kind.resource(),
                errors = log.failing,
                "Kubernetes watch working again"
            );
            log.failing = 0;
        }
    }

    fn apply(&mut self, object: &Object, now: SystemTime) {
        let kind = object.kind();
        match self.cache.apply(object, now) {
            Ok(Applied::Taken) => {
                self.stats.applied.inc();
            }
            Ok(Applied::Shed) => {
                self.stats.shed.inc();
                if let Some(held_back) = self.log(kind).shed.allow(Instant::now()) {
                    tracing::warn!(
                        resource = kind.resource(),
                        objects = self.cache.len(),
                        similar_objects_not_logged = held_back,
                        "the Kubernetes cache is full (kubernetes.max_objects): a new object is not cached, and flows to or from it are not named after it"
                    );
                }
            }
            Err(malformed) => {
                self.stats.rejected.inc();
                if let Some(held_back) = self.log(kind).malformed.allow(Instant::now()) {
                    tracing::warn!(
                        resource = kind.resource(),
                        similar_objects_not_logged = held_back,
                        "skipping a malformed Kubernetes object: {malformed}"
                    );
                }
            }
        }
    }

    fn handle(&mut self, (kind, result): Item) {
        let event = match result {
            Ok(event) => event,
            Err(e) => {
                let expired =
                    matches!(&e, watcher::Error::WatchError(status) if status.code == 410);
                self.on_error(kind, &e, expired);
                return;
            }
        };
        // `Init` comes before every list attempt, failed ones included.
        if !matches!(event, Event::Init) {
            self.on_success(kind);
        }
        let now = SystemTime::now();
        match event {
            Event::Init => self.cache.begin_list(kind),
            Event::InitApply(object) | Event::Apply(object) => self.apply(&object, now),
            Event::Delete(object) => {
                self.stats.applied.inc();
                self.cache.delete(&object, now);
            }
            Event::InitDone => match self.cache.end_list(kind, now) {
                ListEnd::First => {
                    if self.cache.synced() {
                        self.stats.synced.set_flag(true);
                        tracing::info!(counts = ?self.cache.counts(), "Kubernetes cache synced");
                        // The first complete view goes out at once.
                        self.due = Some(Instant::now());
                    }
                }
                ListEnd::Again => {
                    self.stats.relists.inc();
                }
            },
        }
        if let Some(ips) = &mut self.ips {
            for change in self.cache.take_ip_changes() {
                ips.record(change);
            }
        }
    }

    /// Schedules a snapshot if something changed and none is due yet.
    fn schedule(&mut self) {
        if self.due.is_none() && self.cache.changed() {
            self.due = Some(self.earliest_publish());
        }
    }

    /// Now, or [`PUBLISH_EVERY`] after the last snapshot.
    fn earliest_publish(&self) -> Instant {
        let now = Instant::now();
        self.last_publish
            .map_or(now, |last| (last + PUBLISH_EVERY).max(now))
    }

    fn publish(&mut self) {
        let snapshot = self.cache.snapshot(SystemTime::now());
        self.stats.cached.set(self.cache.len() as u64);
        self.publish.send_replace(Arc::new(snapshot));
        self.last_publish = Some(Instant::now());
        self.due = None;
        // After the snapshot: a source that names the pod of an event
        // already finds it.
        if let Some(ips) = &mut self.ips {
            ips.flush();
        }
    }

    /// When ended claims next expire, as an instant.
    fn prune_at(&self) -> Option<Instant> {
        let at = self.cache.next_prune()?;
        let wait = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(Instant::now() + wait)
    }
}

/// Runs until `stop` fires or its sender is dropped.
pub(crate) async fn run(
    source: ClientSource,
    cache: Cache,
    publish: watch::Sender<Arc<Snapshot>>,
    stats: Arc<KubeStats>,
    ips: Option<IpReporter>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut task = Task {
        cache,
        publish,
        stats,
        logs: Default::default(),
        due: None,
        last_publish: None,
        ips,
    };
    let mut backoff = DefaultBackoff::default();
    let client = loop {
        match client(&source).await {
            Ok(client) => break client,
            Err(e) => {
                // Not tied to one kind: logged and counted under pods.
                task.on_error(
                    Kind::Pod,
                    &format!("cannot build a Kubernetes client: {e:#}"),
                    false,
                );
                let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                tokio::select! {
                    _ = &mut stop => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    let mut events = all_events(&client);
    loop {
        let prune_at = task.prune_at();
        tokio::select! {
            biased;
            _ = &mut stop => break,
            () = sleep_until(task.due.unwrap_or_else(Instant::now).into()), if task.due.is_some() => {
                task.publish();
            }
            () = sleep_until(prune_at.unwrap_or_else(Instant::now).into()), if task.due.is_none() && prune_at.is_some() => {
                task.due = Some(task.earliest_publish());
            }
            item = events.next() => match item {
                Some(item) => task.handle(item),
                // The watchers retry forever; the merged stream never ends.
                None => break,
            },
        }
        task.schedule();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_lets_one_through_per_period() {
        let mut t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.allow(start), Some(0));
        assert_eq!(t.allow(start + Duration::from_secs(1)), None);
        assert_eq!(t.allow(start + Duration::from_secs(2)), None);
        assert_eq!(t.allow(start + LOG_EVERY), Some(2));
    }
}
