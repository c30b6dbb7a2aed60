//! The Kubernetes cache at cluster scale: 10 000 pods (1 990 Deployments
//! of 5 pods, 50 Jobs of 1), 2 000 Services with one EndpointSlice each,
//! 100 nodes in 3 zones, served by the test API server of
//! `tests/common/kubeapi.rs` and read by the real kube client through
//! `enrich::kubernetes::start`.
//!
//! * **sync**: from `start` until the snapshot is synced with every pod,
//!   three times;
//! * **memory**: bytes the process holds after the sync minus before it,
//!   counted by the global allocator below (requested sizes, not allocator
//!   rounding), less what the same client costs against an empty cluster;
//!   divided by the pod count (Services, slices and nodes included);
//! * **lookup**: `Snapshot::lookup` of pod, Service and unknown addresses
//!   (criterion; its median is what `bench/kube_cache.sh` reports).
//!
//! Run with `cargo bench --bench kube_cache` (or `bench/kube_cache.sh` for
//! the table). Under `cargo test` it runs once on a tiny cluster.

#[allow(dead_code)]
#[path = "common/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../tests/common/kubeapi.rs"]
mod kubeapi;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cluster::{cluster, pod_ip, service_ip, Scale};
use criterion::Criterion;
use flowtel::enrich::kubernetes::{self, KubernetesConfig, KubernetesMode, Snapshot};
use flowtel::telemetry::Telemetry;
use kubeapi::KubeApi;

/// Bytes and allocations currently live.
static BYTES: AtomicIsize = AtomicIsize::new(0);
static BLOCKS: AtomicIsize = AtomicIsize::new(0);

/// The system allocator, counting what is live.
struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            BLOCKS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> (isize, isize) {
    (
        BYTES.load(Ordering::Relaxed),
        BLOCKS.load(Ordering::Relaxed),
    )
}

fn config(kubeconfig: &Path) -> KubernetesConfig {
    KubernetesConfig {
        enabled: KubernetesMode::On,
        kubeconfig: Some(kubeconfig.to_path_buf()),
        ..KubernetesConfig::default()
    }
}

/// One cold start against `kubeconfig`: time to a synced snapshot with
/// `pods` pods, bytes and allocations held once synced, and the snapshot.
async fn sync_once(kubeconfig: &Path, pods: usize) -> (Duration, (isize, isize), Arc<Snapshot>) {
    let before = live();
    let started = Instant::now();
    let handle = kubernetes::start(&config(kubeconfig), &Telemetry::default())
        .expect("the cache starts")
        .expect("enabled");
    let deadline = started + Duration::from_secs(120);
    let snapshot = loop {
        let s = handle.snapshot();
        if s.synced() && s.counts().pods == pods {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no sync in 2 min: {:?}",
            s.counts()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let took = started.elapsed();
    // Let the list pages and decode buffers go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = live();
    handle.stop().await;
    (took, (after.0 - before.0, after.1 - before.1), snapshot)
}

fn lookups(c: &mut Criterion, snapshot: &Snapshot, scale: Scale) {
    let now = SystemTime::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let pods: Vec<IpAddr> = (0..4096)
        .map(|_| IpAddr::V4(pod_ip(next(scale.pods()))))
        .collect();
    let services: Vec<IpAddr> = (0..4096)
        .map(|_| IpAddr::V4(service_ip(next(scale.services))))
        .collect();
    let misses: Vec<IpAddr> = (0..4096)
        .map(|i| IpAddr::V4(Ipv4Addr::new(172, 16, (i >> 8) as u8, i as u8)))
        .collect();
    let mut group = c.benchmark_group("kube_cache_lookup");
    for (name, addresses) in [
        ("pod_ip", &pods),
        ("service_ip", &services),
        ("miss", &misses),
    ] {
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                black_box(snapshot.lookup(black_box(addresses[i]), Some(8080), now))
            })
        });
    }
    group.finish();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let scale = if full {
        Scale {
            deployments: 1990,
            pods_per_deployment: 5,
            old_replicasets_per_deployment: 0,
            jobs: 50,
            services: 2000,
            nodes: 100,
        }
    } else {
        Scale {
            deployments: 40,
            pods_per_deployment: 5,
            old_replicasets_per_deployment: 0,
            jobs: 5,
            services: 40,
            nodes: 5,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let snapshot = runtime.block_on(async {
        // What the client itself holds with nothing to cache.
        let empty = KubeApi::started().await;
        let empty_dir = dir.path().join("empty");
        std::fs::create_dir_all(&empty_dir).expect("a directory");
        let (_, fixed, _) = sync_once(&empty.write_kubeconfig(&empty_dir), 0).await;
        empty.stop().await;

        let api = KubeApi::started().await;
        let objects = cluster(scale);
        let json_bytes: usize = objects
            .iter()
            .map(|o| serde_json::to_vec(o).map_or(0, |v| v.len()))
            .sum();
        api.load(objects);
        let kubeconfig = api.write_kubeconfig(dir.path());
        let runs = if full { 3 } else { 1 };
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..runs {
            let (took, held, snapshot) = sync_once(&kubeconfig, scale.pods()).await;
            times.push(took);
            last = Some((held, snapshot));
        }
        api.stop().await;
        let ((bytes, blocks), snapshot) = last.expect("at least one run");
        let pods = scale.pods() as f64;
        let counts = snapshot.counts();
        println!(
            "kube_cache cluster pods={} services={} endpoint_slices={} nodes={} replicasets={} jobs={} api_json_mib={:.1}",
            counts.pods,
            counts.services,
            counts.endpoint_slices,
            counts.nodes,
            counts.replicasets,
            counts.jobs,
            json_bytes as f64 / 1048576.0
        );
        let ms: Vec<String> = times.iter().map(|t| format!("{:.0}", t.as_secs_f64() * 1000.0)).collect();
        times.sort();
        println!(
            "kube_cache sync_ms runs={} median={:.0}",
            ms.join(","),
            times[times.len() / 2].as_secs_f64() * 1000.0
        );
        println!(
            "kube_cache memory held_bytes={bytes} held_allocations={blocks} client_fixed_bytes={} \
             per_pod_bytes={:.0} per_pod_allocations={:.1}",
            fixed.0,
            (bytes - fixed.0) as f64 / pods,
            (blocks - fixed.1) as f64 / pods
        );
        snapshot
    });
    let mut criterion = Criterion::default().configure_from_args();
    lookups(&mut criterion, &snapshot, scale);
    criterion.final_summary();
}
