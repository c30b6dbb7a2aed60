#!/usr/bin/env bash
# CNI source benchmark: 1,000 real CNI plugin executions in 10 s, with and
# without flowtel tracing them, as a markdown table.
#
# Each execution is Debian's host-local plugin (containernetworking-plugins,
# /usr/lib/cni) run with CNI_COMMAND=VERSION and a pod's CNI_* variables,
# the way libcni runs it, started at 100 per second by a Python driver. The
# same 1,000 executions run first with no flowtel (the baseline: how long
# they take on their own), then with flowtel (`cni.enabled: on`, conntrack
# source in a throwaway network namespace, Prometheus endpoint on
# loopback). Reported: executions flowtel counted
# (`flowtel_cni_operations_total`) and lost (`flowtel_cni_events_lost_total`),
# flowtel's CPU time over the run (utime+stime from /proc/PID/stat), its RSS
# before and after and its peak (VmHWM), and the executions' own time with
# and without tracing.
#
# Usage (as root): bench/cni_executions.sh
# Environment: BENCH_BIN (a prebuilt flowtel; default: cargo build --release),
#   CARGO_TARGET_DIR (scripts/env.sh supplies the default), N (1000), RATE (100/s).
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-1000}
RATE=${RATE:-100}
PLUGIN=/usr/lib/cni/host-local
[[ -x $PLUGIN ]] || { echo "needs $PLUGIN (apt-get install containernetworking-plugins)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "run as root (flowtel loads BPF programs)" >&2; exit 1; }

if [[ -n ${BENCH_BIN:-} ]]; then
    BIN=$BENCH_BIN
else
    : "${CARGO_TARGET_DIR:=$ROOT/target}"
    echo "building flowtel (release) in $CARGO_TARGET_DIR ..." >&2
    (cd "$ROOT" && cargo build --quiet --release)
    BIN=$CARGO_TARGET_DIR/release/flowtel
fi

NS=ft-cnibench-$$
PORT=$((20000 + $$ % 20000))
HEALTH=$((PORT + 1))
work=$(mktemp -d)
AGENT=
cleanup() {
    [[ -n $AGENT ]] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add "$NS"

# Starts N executions at RATE per second (up to 32 at once); prints the
# seconds the plugins themselves took (spawn to exit, summed) and the wall
# time.
drive() {
    python3 - "$PLUGIN" "$N" "$RATE" <<'EOF'
import os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
plugin, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conf = b'{"cniVersion":"1.0.0","name":"bench","type":"host-local"}'
start = time.monotonic()

def run(i):
    pause = start + i / rate - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": "VERSION",
        "CNI_CONTAINERID": f"bench{i:06d}",
        "CNI_NETNS": f"/var/run/netns/bench-{i}",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=pod-{i}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": os.path.dirname(plugin),
    }
    t = time.monotonic()
    r = subprocess.run([plugin], input=conf, env=env, capture_output=True)
    if r.returncode != 0:
        sys.exit(f"{plugin} failed: {r.stdout!r} {r.stderr!r}")
    return time.monotonic() - t

# Started on schedule whatever the previous ones are doing, as a runtime
# setting up many pods at once would.
with ThreadPoolExecutor(max_workers=32) as pool:
    busy = sum(pool.map(run, range(n)))
print(f"{busy:.3f} {time.monotonic() - start:.3f}")
EOF
}

metric() { # NAME: the sum of every series of NAME on the Prometheus endpoint
    curl -sf "http://127.0.0.1:$PORT/metrics" |
        awk -v m="$1" 'index($1, m "{") == 1 || $1 == m { s += $NF } END { printf "%d\n", s }'
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

read -r base_busy base_wall < <(drive)

FLOWTEL_CNI__ENABLED=on FLOWTEL_EXPORT__PROMETHEUS__LISTEN=127.0.0.1:$PORT \
    FLOWTEL_EXPORT__CONSOLE__MODE=never RUST_LOG=warn \
    "$BIN" run --source conntrack --netns "/var/run/netns/$NS" --interval 1s \
    --health-listen "127.0.0.1:$HEALTH" >"$work/flowtel.log" 2>&1 &
AGENT=$!
# Ready once the cni source reports (its programs are attached by then).
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$HEALTH/readyz" 2>/dev/null | grep -q '"cni"' && break
    sleep 0.1
done
curl -sf "http://127.0.0.1:$HEALTH/readyz" | grep -q '"cni"' ||
    { cat "$work/flowtel.log" >&2; echo "flowtel's cni source did not start" >&2; exit 1; }

before_ops=$(metric flowtel_cni_operations_total)
rss_before=$(status_kib "$AGENT" VmRSS)
ticks_before=$(cpu_ticks "$AGENT")
read -r traced_busy traced_wall < <(drive)
# Everything the plugins did is counted within a few intervals.
for _ in $(seq 100); do
    ops=$(( $(metric flowtel_cni_operations_total) - before_ops ))
    lost=$(metric flowtel_cni_events_lost_total)
    (( ops + lost >= N )) && break
    sleep 0.1
done
ticks_after=$(cpu_ticks "$AGENT")
rss_after=$(status_kib "$AGENT" VmRSS)
hwm=$(status_kib "$AGENT" VmHWM)
hz=$(getconf CLK_TCK)
cpu_s=$(awk -v t=$((ticks_after - ticks_before)) -v hz="$hz" 'BEGIN { printf "%.2f", t / hz }')
cpu_pct=$(awk -v c="$cpu_s" -v w="$traced_wall" 'BEGIN { printf "%.1f", 100 * c / w }')
per_exec=$(awk -v b="$base_busy" -v t="$traced_busy" -v n="$N" 'BEGIN { printf "%.2f", 1000 * (t - b) / n }')

echo
echo "CNI executions: $N × $PLUGIN VERSION at $RATE/s ($(uname -r), $(nproc) CPUs):"
echo
echo "| measure | without flowtel (baseline) | with flowtel |"
echo "| --- | --- | --- |"
echo "| wall time of the run | ${base_wall} s | ${traced_wall} s |"
echo "| plugins' own time (spawn to exit, summed) | ${base_busy} s | ${traced_busy} s (${per_exec} ms per execution more) |"
echo "| executions counted / lost | | $ops / $lost of $N |"
echo "| flowtel CPU over the run | | ${cpu_s} s (${cpu_pct} % of one CPU) |"
echo "| flowtel RSS before / after / peak | | $((rss_before / 1024)) / $((rss_after / 1024)) / $((hwm / 1024)) MiB |"
