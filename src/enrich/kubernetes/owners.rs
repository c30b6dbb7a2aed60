//! Naming a pod's workload by following `ownerReferences` with
//! `controller: true`, never by guessing from names:
//!
//! * Pod → ReplicaSet → Deployment (or whatever controls the ReplicaSet);
//! * Pod → Job → CronJob;
//! * Pod → StatefulSet, DaemonSet or any other controller, directly;
//! * a Pod without controller is its own workload (kind `Pod`);
//! * a ReplicaSet or Job without controller, or one not (yet) known to the
//!   cache, is the workload itself.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::intern::{Interner, Map};
use super::model::{Workload, WorkloadKind};

/// The controlling owner reference of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Controller {
    pub kind: Arc<str>,
    pub name: Arc<str>,
    pub uid: Arc<str>,
}

/// The one owner reference with `controller: true`, if any. Kubernetes
/// allows at most one; should there be more, the first wins.
pub(crate) fn controller_of(
    refs: Option<&[OwnerReference]>,
    strings: &mut Interner,
) -> Option<Controller> {
    refs?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| Controller {
            kind: strings.get(&r.kind),
            name: strings.get(&r.name),
            uid: strings.get(&r.uid),
        })
}

/// What the cache keeps of a ReplicaSet or a Job: only who controls it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnerRecord {
    pub controller: Option<Controller>,
    /// The list generation that last saw it (see `Cache::end_list`).
    pub generation: u64,
}

/// The ReplicaSets and Jobs known to the cache, by uid.
pub(crate) struct Owners<'a> {
    pub replicasets: &'a Map<Arc<str>, OwnerRecord>,
    pub jobs: &'a Map<Arc<str>, OwnerRecord>,
}

impl Owners<'_> {
    /// The workload of a pod named `pod` whose controller is `controller`.
    pub(crate) fn workload(&self, pod: &Arc<str>, controller: Option<&Controller>) -> Workload {
        let Some(direct) = controller else {
            return Workload {
                kind: WorkloadKind::Pod,
                name: pod.clone(),
            };
        };
        let intermediate = match &*direct.kind {
            "ReplicaSet" => self.replicasets.get(&direct.uid),
            "Job" => self.jobs.get(&direct.uid),
            _ => None,
        };
        let top = intermediate
            .and_then(|owner| owner.controller.as_ref())
            .unwrap_or(direct);
        Workload {
            kind: WorkloadKind::from_owner_kind(&top.kind),
            name: top.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(kind: &str, name: &str, uid: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
            controller,
            block_owner_deletion: Some(true),
        }
    }

    fn controller(kind: &str, name: &str, uid: &str) -> Controller {
        Controller {
            kind: kind.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    fn record(controller: Option<Controller>) -> OwnerRecord {
        OwnerRecord {
            controller,
            generation: 1,
        }
    }

    #[test]
    fn only_the_controlling_reference_counts() {
        let mut strings = Interner::default();
        let refs = [
            reference("ConfigMap", "not-me", "u1", None),
            reference("ReplicaSet", "web-7d4b5", "u2", Some(false)),
            reference("ReplicaSet", "web-5f6c7", "u3", Some(true)),
        ];
        assert_eq!(
            controller_of(Some(&refs), &mut strings),
            Some(controller("ReplicaSet", "web-5f6c7", "u3"))
        );
        assert_eq!(controller_of(Some(&refs[..2]), &mut strings), None);
        assert_eq!(controller_of(None, &mut strings), None);
    }

    #[test]
    fn follows_replicasets_and_jobs_to_the_top_controller() {
        let replicasets: Map<Arc<str>, OwnerRecord> = [
            (
                Arc::from("rs-1"),
                record(Some(controller("Deployment", "checkout", "d-1"))),
            ),
            (Arc::from("rs-2"), record(None)),
            (
                Arc::from("rs-3"),
                record(Some(controller("Rollout", "canary", "r-1"))),
            ),
        ]
        .into_iter()
        .collect();
        let jobs: Map<Arc<str>, OwnerRecord> = [
            (
                Arc::from("job-1"),
                record(Some(controller("CronJob", "nightly", "c-1"))),
            ),
            (Arc::from("job-2"), record(None)),
        ]
        .into_iter()
        .collect();
        let owners = Owners {
            replicasets: &replicasets,
            jobs: &jobs,
        };
        let pod: Arc<str> = "p".into();
        let named = |c: Controller| owners.workload(&pod, Some(&c));
        let expect = |kind: WorkloadKind, name: &str| Workload {
            kind,
            name: name.into(),
        };

        assert_eq!(
            named(controller("ReplicaSet", "checkout-5f6c7", "rs-1")),
            expect(WorkloadKind::Deployment, "checkout")
        );
        assert_eq!(
            named(controller("ReplicaSet", "bare-rs", "rs-2")),
            expect(WorkloadKind::ReplicaSet, "bare-rs")
        );
        assert_eq!(
            named(controller("ReplicaSet", "canary-abc", "rs-3")),
            expect(WorkloadKind::Other("Rollout".into()), "canary")
        );
        // Not known (yet): the ReplicaSet itself, not a name guessed from it.
        assert_eq!(
            named(controller("ReplicaSet", "web-5f6c7", "rs-unknown")),
            expect(WorkloadKind::ReplicaSet, "web-5f6c7")
        );
        assert_eq!(
            named(controller("Job", "nightly-28911", "job-1")),
            expect(WorkloadKind::CronJob, "nightly")
        );
        assert_eq!(
            named(controller("Job", "migrate", "job-2")),
            expect(WorkloadKind::Job, "migrate")
        );
        assert_eq!(
            named(controller("StatefulSet", "db", "s-1")),
            expect(WorkloadKind::StatefulSet, "db")
        );
        assert_eq!(
            named(controller("DaemonSet", "node-exporter", "ds-1")),
            expect(WorkloadKind::DaemonSet, "node-exporter")
        );
        // A uid of a ReplicaSet under the Job kind is not followed.
        assert_eq!(
            named(controller("Job", "odd", "rs-1")),
            expect(WorkloadKind::Job, "odd")
        );
        assert_eq!(owners.workload(&pod, None), expect(WorkloadKind::Pod, "p"));
    }
}
