#!/usr/bin/env bash
# Memory under hostile input (release build): a port scan of 65,535 ports ×
# 1,000 sources, 1 million short connections, a scrape target streaming
# 100 MB of distinct series, and a scrape body of distinct series at the
# 16 MiB limit. Prints a markdown table: RSS before each case, its peak
# (VmHWM, reset per case), and what flowtel shed by its own counters.
#
# Runs `cargo bench --bench hostile` (benches/hostile.rs: flowtel's flow
# stage and scraper in process). Needs no root and no network.
# Not covered yet: a Kubernetes API server listing 100,000 pods (see
# bench/kube_cache.sh for the cache's memory per pod).
#
# Usage: bench/hostile.sh
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
cargo bench --locked --bench hostile 2>/dev/null
