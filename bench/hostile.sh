#!/usr/bin/env bash
# Memory under hostile input (release build): a port scan of 65,535 ports ×
# 1,000 sources, 1 million short connections, a scrape target streaming
# 100 MB of distinct series, a scrape body of distinct series at the
# 16 MiB limit, and a Kubernetes API server listing 100,000 pods. Prints
# markdown tables: RSS before each case, its peak (VmHWM, reset per case),
# and what flowtel shed by its own counters; for the 100,000 pods, the
# time to synced and the RSS before, at peak and steady of a child process
# that runs only the Kubernetes cache, at two kubernetes.max_objects.
#
# Runs `cargo bench --bench hostile` (benches/hostile.rs: flowtel's flow
# stage, scraper and Kubernetes cache in process, the test API server of
# tests/common/kubeapi.rs). Needs no root and no network, and about 6 GB
# of memory (the API server holds 480 MiB of JSON in several forms).
#
# Usage: bench/hostile.sh [kube]   (kube: the 100,000-pod case only)
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
cargo bench --locked --bench hostile -- "$@" 2>/dev/null
