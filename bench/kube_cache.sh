#!/usr/bin/env bash
# Kubernetes cache benchmark: memory per pod, address lookup time and initial
# sync time with 10 000 pods / 2 000 Services, as a markdown table.
#
# Runs `cargo bench --bench kube_cache` (benches/kube_cache.rs: the real kube
# client against the in-process test API server of tests/common/kubeapi.rs,
# with a counting global allocator) and reads criterion's lookup medians from
# its estimates.json files. Needs no root and no network.
#
# Usage: bench/kube_cache.sh
# Environment: CARGO_TARGET_DIR (where cargo builds and criterion writes).
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

cargo bench --locked --bench kube_cache 2>&1 | tee "$log"

field() { # LINE-PREFIX KEY: the value of KEY=... on the line starting with LINE-PREFIX
    grep "^$1 " "$log" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1
}
median_ns() { # BENCH: criterion's median for kube_cache_lookup/BENCH, in ns
    python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["median"]["point_estimate"])' \
        "$TARGET/criterion/kube_cache_lookup/$1/new/estimates.json"
}

pods=$(field "kube_cache cluster" pods)
services=$(field "kube_cache cluster" services)
per_pod=$(field "kube_cache memory" per_pod_bytes)
allocs=$(field "kube_cache memory" per_pod_allocations)
held=$(field "kube_cache memory" held_bytes)
fixed=$(field "kube_cache memory" client_fixed_bytes)
sync_median=$(field "kube_cache sync_ms" median)
sync_runs=$(field "kube_cache sync_ms" runs)

echo
echo "Kubernetes cache, $pods pods / $services Services ($(uname -m), $(nproc) CPUs):"
echo
echo "| measure | value | target |"
echo "| --- | --- | --- |"
echo "| memory per pod (cache + snapshot, all objects, / pods) | $per_pod B ($allocs allocations) | ≤ 2048 B |"
echo "| memory held after sync, total (kube client alone: $fixed B) | $held B | |"
echo "| lookup, pod IP, median | $(median_ns pod_ip) ns | ≤ 100 ns |"
echo "| lookup, Service IP, median | $(median_ns service_ip) ns | ≤ 100 ns |"
echo "| lookup, unknown IP, median | $(median_ns miss) ns | ≤ 100 ns |"
echo "| initial sync, median of runs $sync_runs ms | $sync_median ms | < 2000 ms |"
