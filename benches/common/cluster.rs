//! A simulated cluster for the benchmarks that sync the Kubernetes cache
//! from the test API server of `tests/common/kubeapi.rs` (included by the
//! bench as `mod kubeapi`): nodes in three zones, Deployments of a few
//! pods each with their ReplicaSets (the current one and, as after
//! rollouts, older ones scaled to zero), a Service and an EndpointSlice
//! per Deployment, and CronJob Jobs of one pod each, as real API servers
//! shape them.

use std::net::Ipv4Addr;

use serde_json::Value;

use crate::kubeapi::fx;

/// The size of the simulated cluster.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub deployments: usize,
    pub pods_per_deployment: usize,
    /// ReplicaSets of earlier rollouts per Deployment, scaled to zero
    /// (Kubernetes keeps up to `revisionHistoryLimit`, 10 by default).
    pub old_replicasets_per_deployment: usize,
    pub jobs: usize,
    pub services: usize,
    pub nodes: usize,
}

impl Scale {
    pub fn pods(&self) -> usize {
        self.deployments * self.pods_per_deployment + self.jobs
    }

    /// Every object [`cluster`] makes that the API server serves
    /// (Deployments and CronJobs are only pointed at).
    pub fn objects(&self) -> usize {
        let slices = self.services.min(self.deployments);
        self.nodes
            + self.pods()
            + self.services
            + slices
            + self.deployments * (1 + self.old_replicasets_per_deployment)
            + self.jobs
    }
}

pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

pub fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8)
}

/// Distinct for the first 61,440 nodes; the last octet stays in 10..250.
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, (i / 240) as u8, (10 + i % 240) as u8)
}

/// Every object of the cluster, shaped like a real API server's.
pub fn cluster(scale: Scale) -> Vec<Value> {
    let mut objects = Vec::new();
    let nodes: Vec<(String, String)> = (0..scale.nodes)
        .map(|n| (format!("node-{n:03}"), node_ip(n).to_string()))
        .collect();
    for (n, (name, address)) in nodes.iter().enumerate() {
        let zone = format!("eu-west-1{}", ["a", "b", "c"][n % 3]);
        objects.push(fx::node(name, &zone, "eu-west-1", &[address], None));
    }
    let mut pod = 0;
    let mut place = |p: fx::PodFx| {
        let (node, host) = &nodes[pod % nodes.len()];
        let built = p.on(node, host).ips(&[&pod_ip(pod).to_string()]).build();
        pod += 1;
        built
    };
    let mut services = 0;
    for d in 0..scale.deployments {
        let namespace = format!("team-{}", d % 40);
        let name = format!("app-{d}");
        let deployment = fx::workload("Deployment", &namespace, &name);
        let rs = fx::replicaset(&namespace, &format!("{name}-5f6c7d8b9"), Some(&deployment));
        for old in 0..scale.old_replicasets_per_deployment {
            objects.push(fx::replicaset(
                &namespace,
                &format!("{name}-6d7f8{old:04}"),
                Some(&deployment),
            ));
        }
        let pods: Vec<Value> = (0..scale.pods_per_deployment)
            .map(|k| {
                place(
                    fx::PodFx::new(&namespace, &format!("{name}-5f6c7d8b9-{k:05}"))
                        .owned_by(&rs)
                        .label("app.kubernetes.io/name", &name),
                )
            })
            .collect();
        if services < scale.services {
            let service = fx::service(&namespace, &name, &[&service_ip(services).to_string()]);
            let refs: Vec<&Value> = pods.iter().collect();
            objects.push(fx::endpoint_slice(&service, "IPv4", &refs));
            objects.push(service);
            services += 1;
        }
        objects.push(rs);
        objects.extend(pods);
    }
    for j in 0..scale.jobs {
        let cronjob = fx::workload("CronJob", "batch", &format!("report-{j}"));
        let job = fx::job("batch", &format!("report-{j}-28911520"), Some(&cronjob));
        objects.push(place(
            fx::PodFx::new("batch", &format!("report-{j}-28911520-x{j:04}")).owned_by(&job),
        ));
        objects.push(job);
    }
    while services < scale.services {
        objects.push(fx::service(
            "extra",
            &format!("svc-{services}"),
            &[&service_ip(services).to_string()],
        ));
        services += 1;
    }
    objects
}
