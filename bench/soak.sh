#!/usr/bin/env bash
# Soak: flowtel (release build, conntrack source) under constant connection
# churn (short TCP connections and UDP exchanges between two network
# namespaces, about 1 500 connections/s on 2 CPUs), pods of the test
# Kubernetes API server replaced 5 per round (200 at any time), a collector
# that goes away for the last fifth of every few minutes and a Felix
# scrape target that goes away for the fifth from 40 to 60 % of each.
# Prints a markdown table: RSS at start, after warm-up (the first third)
# and at the end, the RSS slope after warm-up, CPU, open fds, flowtel's
# own account, pods churned and the cache's objects, Felix scrapes; fails
# if the totals are not exact, RSS grew more than 8 MiB after warm-up, the
# cache does not hold exactly the API server's objects at the end, or an
# outage of the scrape target went unseen.
#
# It runs tests/soak.rs (the 5-minute CI version) in a release build with a
# longer duration. The default is 1 hour; the release gate is 24 hours
# (SOAK_SECS=86400).
#
# Usage: sudo bench/soak.sh [SECONDS]   (default 3600)
# Environment: SOAK_OUTAGE_EVERY_SECS (default 180), CARGO_TARGET_DIR.
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
. scripts/env.sh
secs=${1:-${SOAK_SECS:-3600}}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "soak: ${secs}s, collector away for the last fifth and the Felix target for the middle fifth of every ${SOAK_OUTAGE_EVERY_SECS:-180}s ($(uname -m), $(nproc) CPUs)"
CI=true FLOWTEL_SOAK_SECS="$secs" FLOWTEL_SOAK_OUTAGE_EVERY_SECS="${SOAK_OUTAGE_EVERY_SECS:-180}" \
    cargo test --locked --release --test soak -- --nocapture >"$log" 2>&1 || status=$?
grep -E '^(soak:|\||the whole soak: (client|server)|test result)' "$log"
if [ "${status:-0}" -ne 0 ]; then
    grep -E 'panicked|RSS grew|expected' "$log" | head -n 20
    exit "$status"
fi
