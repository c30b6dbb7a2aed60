#!/usr/bin/env bash
# Firewall source benchmark: what reading RULES firewall rules every
# interval costs flowtel, in CPU per read and RSS.
#
# As root: creates a throwaway network namespace and runs the release
# flowtel there (`--netns`, conntrack source, the Prometheus endpoint,
# scraped once per interval as Prometheus would) three times, for READS
# intervals of INTERVAL each:
#   baseline   firewall.enabled=off, no rules
#   nftables   RULES kube-proxy-shaped nftables rules (RULES/2 Services:
#              a `services` rule matching the ClusterIP and a service
#              chain's rule, each commented "ns/name:port")
#   xtables    the same shape as legacy iptables rules (iptables-legacy),
#              read through iptables-legacy-save -c
# Every rule starts with a non-zero counter, so every read makes a delta
# for each rule and fills the series budget (the rest folds into the
# overflow series): the worst case. CPU is utime+stime of flowtel and its
# waited-for children (iptables-legacy-save) from /proc/PID/stat; the
# firewall's cost per read is (run − baseline) / READS. Prints a markdown
# table. The namespace is removed on exit, also on failure or Ctrl-C.
#
# Usage: sudo bench/firewall_rules.sh
# Environment: RULES (default 10000), INTERVAL (seconds, default 10),
#   READS (default 6), FLOWTEL (a release binary; default: build it).
set -euo pipefail
export LC_ALL=C

RULES=${RULES:-10000}
INTERVAL=${INTERVAL:-10}
READS=${READS:-6}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    echo "firewall_rules.sh: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it creates a network namespace)"
[[ $RULES =~ ^[0-9]+$ && $RULES -ge 2 ]] || die "RULES must be a number >= 2"
[[ $INTERVAL =~ ^[0-9]+$ && $INTERVAL -ge 1 ]] || die "INTERVAL must be whole seconds >= 1"
[[ $READS =~ ^[0-9]+$ && $READS -ge 1 ]] || die "READS must be a positive number"
for tool in ip nft iptables-legacy-restore python3 curl; do
    command -v "$tool" >/dev/null || die "\`$tool\` is not installed"
done

if [[ -z ${FLOWTEL:-} ]]; then
    (cd "$ROOT" && cargo build --release --quiet)
    FLOWTEL=${CARGO_TARGET_DIR:-$ROOT/target}/release/flowtel
fi
[[ -x $FLOWTEL ]] || die "$FLOWTEL is not an executable"

NS=flowtel-fwbench-$$-$RANDOM
WORK=$(mktemp -d /tmp/flowtel-fwbench.XXXXXX)
PID=
cleanup() {
    local rc=$?
    set +e
    [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT INT TERM
ip netns add "$NS"
ip -n "$NS" link set lo up

SERVICES=$((RULES / 2))
python3 - "$SERVICES" "$WORK" <<'EOF'
import sys
n, work = int(sys.argv[1]), sys.argv[2]
def ip(i, base):
    return f"{base}.{(i >> 8) & 255}.{i & 255}"
with open(f"{work}/rules.nft", "w") as f:
    f.write("table ip kube-proxy {\n  chain services {\n")
    for i in range(n):
        f.write(f"    ip daddr {ip(i, '10.96')} tcp dport 80 counter packets 5 bytes 300 "
                f"jump service-{i:08X}-ns{i % 50}/svc-{i}/tcp/http\n")
    f.write("  }\n")
    for i in range(n):
        f.write(f"  chain service-{i:08X}-ns{i % 50}/svc-{i}/tcp/http {{\n"
                f"    counter packets 5 bytes 300 accept comment \"ns{i % 50}/svc-{i}:http\"\n  }}\n")
    f.write("}\n")
with open(f"{work}/rules.legacy", "w") as f:
    f.write("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n")
    for i in range(n):
        f.write(f":KUBE-SVC-{i:016X} - [0:0]\n")
    for i in range(n):
        f.write(f"[5:300] -A KUBE-SERVICES -d {ip(i, '10.96')}/32 -p tcp -m comment "
                f"--comment \"ns{i % 50}/svc-{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-{i:016X}\n")
        f.write(f"[5:300] -A KUBE-SVC-{i:016X} -m comment --comment \"ns{i % 50}/svc-{i}:http -> "
                f"{ip(i, '10.244')}:8080\" -j ACCEPT\n")
    f.write("COMMIT\n")
EOF

CLK_TCK=$(getconf CLK_TCK)
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
# utime + stime + cutime + cstime, in ticks.
cpu_ticks() {
    awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat"
}

# run NAME FIREWALL: prints "cpu_seconds rss_kib hwm_kib rules_read".
run() {
    local name=$1 firewall=$2 health prom
    health=$(free_port)
    prom=$(free_port)
    FLOWTEL_FIREWALL__ENABLED=$firewall FLOWTEL_FIREWALL__XTABLES=auto \
        FLOWTEL_EXPORT__PROMETHEUS__LISTEN=127.0.0.1:$prom RUST_LOG=warn \
        "$FLOWTEL" run --source conntrack --netns "/var/run/netns/$NS" \
        --interval "${INTERVAL}s" --health-listen "127.0.0.1:$health" \
        >"$WORK/$name.log" 2>&1 &
    PID=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$health/readyz" >/dev/null && break
        sleep 0.1
    done
    curl -sf "http://127.0.0.1:$health/readyz" >/dev/null || die "flowtel did not become ready: $(cat "$WORK/$name.log")"
    # Let the first read (which makes every series) pass, then measure.
    sleep "$INTERVAL"
    local t0 t1
    t0=$(cpu_ticks "$PID")
    for _ in $(seq "$READS"); do
        sleep "$INTERVAL"
        curl -sf "http://127.0.0.1:$prom/metrics" >"$WORK/$name.metrics" || die "scraping /metrics failed"
    done
    t1=$(cpu_ticks "$PID")
    local rss hwm rules
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$PID/status")
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$PID/status")
    rules=$(awk '/^flowtel_firewall_rules[{ ]/ { n += $NF } END { print n + 0 }' "$WORK/$name.metrics")
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
    echo "$(((t1 - t0)))" "$rss" "$hwm" "$rules"
}

read -r base_ticks base_rss base_hwm _ < <(run baseline off)
ip netns exec "$NS" nft -f "$WORK/rules.nft"
read -r nft_ticks nft_rss nft_hwm nft_rules < <(run nftables auto)
ip netns exec "$NS" nft flush ruleset
ip netns exec "$NS" iptables-legacy-restore -c <"$WORK/rules.legacy"
read -r xt_ticks xt_rss xt_hwm xt_rules < <(run xtables auto)

row() {
    local name=$1 ticks=$2 rss=$3 hwm=$4 rules=$5
    python3 - "$name" "$ticks" "$base_ticks" "$CLK_TCK" "$READS" "$INTERVAL" "$rss" "$hwm" "$rules" <<'EOF'
import sys
name, ticks, base, hz, reads, interval, rss, hwm, rules = sys.argv[1:]
ticks, base, hz, reads, interval = int(ticks), int(base), int(hz), int(reads), int(interval)
total = ticks / hz / reads
extra = (ticks - base) / hz / reads if name != "baseline" else 0.0
print(f"| {name} | {rules} | {total * 1000:.0f} | {extra * 1000:.0f} | "
      f"{extra / interval * 100:.2f} % | {int(rss) / 1024:.1f} | {int(hwm) / 1024:.1f} |")
EOF
}

echo
echo "RULES=$RULES INTERVAL=${INTERVAL}s READS=$READS, $(nproc) CPUs, $(uname -r), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo
echo "| run | rules read | CPU per interval (ms) | firewall CPU per read (ms) | of one core | RSS (MiB) | peak RSS (MiB) |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
row baseline "$base_ticks" "$base_rss" "$base_hwm" 0
row nftables "$nft_ticks" "$nft_rss" "$nft_hwm" "$nft_rules"
row xtables "$xt_ticks" "$xt_rss" "$xt_hwm" "$xt_rules"
