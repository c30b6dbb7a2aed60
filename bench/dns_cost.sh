#!/usr/bin/env bash
# Per-packet cost of the DNS parsing in flowtel's TC program (issue 21),
# with and without DNS traffic, in one run.
#
# As root: builds two objects with clang against the committed
# bpf/vmlinux.h
#   minimal  one per-CPU array counter of bytes and packets (the baseline)
#   nodns    bpf/flow.bpf.c at git revision BEFORE (default 089b46b^, the
#            last without DNS parsing)
#   flow     bpf/flow.bpf.c of the working tree, loaded twice:
#            dns_off with its dns_on map 0 (as with ebpf.dns.enabled false)
#            dns_on  with dns_on 1 (the default)
# loads them with bpftool into a private bpffs, attaches all four as clsact
# direct-action filters on the ingress of both ends of a veth pair between
# two namespaces (each returns "continue", so every packet runs all four,
# in rotated priority order each round; queries are parsed at the server's
# end, responses at the client's), turns kernel.bpf_stats_enabled on
# (restored on exit) and, each round, runs DURATION s each of iperf3 TCP,
# iperf3 UDP (not DNS) and DNS: the client sends queries one after another
# (a known name and a missing one in turn) to dnsmasq, which answers
# NOERROR and NXDOMAIN. A drainer empties dns_on's ring buffer every
# millisecond (as flowtel's reader would), so answered queries take the
# submit path. Reads each program's run_time_ns / run_cnt with bpftool and
# prints one table: ns per packet (skb) per program, median over ROUNDS,
# and the ratios that matter: nodns → dns_off → dns_on on the same
# packets. Everything it creates is removed on exit.
#
# Usage: sudo bench/dns_cost.sh
# Environment: ROUNDS (default 5), DURATION (default 3), BEFORE (a git
#   revision holding bpf/flow.bpf.c without DNS parsing), CLANG (default
#   clang).
# Takes about ROUNDS × 3 × (DURATION + 1) seconds: about 60 s by default.
set -euo pipefail
export LC_ALL=C

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-3}
CLANG=${CLANG:-clang}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=${BEFORE:-089b46b^}
PROGS=(minimal nodns dns_off dns_on)

die() { echo "dns_cost: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
for tool in "$CLANG" bpftool tc ip iperf3 sysctl dnsmasq python3; do
    command -v "$tool" >/dev/null || die "missing: $tool (Debian: clang bpftool iproute2 iperf3 procps dnsmasq python3)"
done

# No "." in the path: libbpf turns dots of map pin paths into "_".
WORK=$(mktemp -d /tmp/dns_cost_XXXXXX)
NS_S="dnscost-s-$$"
NS_R="dnscost-r-$$"
OLD_STATS=$(sysctl -n kernel.bpf_stats_enabled)
DRAINER=
cleanup() {
    [ -n "$DRAINER" ] && kill "$DRAINER" 2>/dev/null || true
    sysctl -q -w kernel.bpf_stats_enabled="$OLD_STATS" || true
    ip netns pids "$NS_R" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns pids "$NS_S" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$NS_S" 2>/dev/null || true
    ip netns del "$NS_R" 2>/dev/null || true
    umount "$WORK/bpffs" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

cat >"$WORK/minimal.bpf.c" <<'EOF'
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64[2]);
} totals SEC(".maps");
SEC("classifier")
int minimal(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&totals, &zero);

	if (v) {
		v[0] += skb->len;
		v[1] += 1;
	}
	return -1;
}
char LICENSE[] SEC("license") = "Apache-2.0";
EOF
git -C "$ROOT" show "$BEFORE:bpf/flow.bpf.c" >"$WORK/nodns.bpf.c" \
    || die "no bpf/flow.bpf.c at $BEFORE"
cp "$ROOT/bpf/flow.bpf.c" "$WORK/flow.bpf.c"
for name in minimal nodns flow; do
    "$CLANG" -O2 -g -target bpfel -D__TARGET_ARCH_x86 -DFT_PREALLOC -Wall -I"$ROOT/bpf" \
        -c "$WORK/$name.bpf.c" -o "$WORK/$name.bpf.o"
done

mkdir -p "$WORK/bpffs"
mount -t bpf bpf "$WORK/bpffs"
for name in "${PROGS[@]}"; do
    obj=$name
    case $name in dns_*) obj=flow ;; esac
    mkdir -p "$WORK/bpffs/${name}_maps"
    bpftool prog loadall "$WORK/$obj.bpf.o" "$WORK/bpffs/$name" type classifier \
        pinmaps "$WORK/bpffs/${name}_maps"
done
bpftool map update pinned "$WORK/bpffs/dns_on_maps/dns_on" key 0 0 0 0 value 1 0 0 0
bpftool map update pinned "$WORK/bpffs/dns_off_maps/dns_on" key 0 0 0 0 value 0 0 0 0
prog_path() {
    case $1 in
        minimal) echo "$WORK/bpffs/minimal/minimal" ;;
        *) echo "$WORK/bpffs/$1/flowtel_in_eth" ;;
    esac
}

ip netns add "$NS_S"
ip netns add "$NS_R"
ip link add dnscs type veth peer name dnscr
ip link set dnscs netns "$NS_S"
ip link set dnscr netns "$NS_R"
ip -n "$NS_S" addr add 198.18.7.1/24 dev dnscs
ip -n "$NS_R" addr add 198.18.7.2/24 dev dnscr
ip -n "$NS_S" link set dnscs up
ip -n "$NS_R" link set dnscr up
ip -n "$NS_S" link set lo up
ip -n "$NS_R" link set lo up
ip netns exec "$NS_S" tc qdisc add dev dnscs clsact
ip netns exec "$NS_R" tc qdisc add dev dnscr clsact
ip netns exec "$NS_R" iperf3 -s -D -p 5201 -I "$WORK/iperf3.pid" >/dev/null
ip netns exec "$NS_R" dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces \
    --listen-address=198.18.7.2 --except-interface=lo --local=/test/ --pid-file= --user=root \
    --host-record=known.test,198.51.100.1 >/dev/null 2>&1 &

attach() { # names in priority order, on both ingresses
    local ns dev prio name
    for pair in "$NS_S dnscs" "$NS_R dnscr"; do
        read -r ns dev <<<"$pair"
        ip netns exec "$ns" tc filter del dev "$dev" ingress 2>/dev/null || true
        prio=1
        for name in "$@"; do
            ip netns exec "$ns" tc filter add dev "$dev" ingress prio $prio handle 1 \
                bpf da pinned "$(prog_path "$name")"
            prio=$((prio + 1))
        done
    done
}

stats() { # "run_time_ns run_cnt" of a pinned program
    bpftool prog show pinned "$(prog_path "$1")" \
        | awk '{for (i = 1; i < NF; i++) { if ($i == "run_time_ns") t = $(i+1); if ($i == "run_cnt") c = $(i+1) }} END { print (t ? t : 0), (c ? c : 0) }'
}

# The DNS client: queries one after another for $1 seconds, a known name
# and a missing one in turn; prints "sent answered".
cat >"$WORK/client.py" <<'EOF'
import socket, struct, sys, time
def q(i, name):
    m = struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        m += bytes([len(label)]) + label.encode()
    return m + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("198.18.7.2", 53))
s.settimeout(1)
end, sent, answered = time.monotonic() + float(sys.argv[1]), 0, 0
while time.monotonic() < end:
    s.send(q(sent, "known.test" if sent % 2 == 0 else "missing%d.test" % (sent % 100)))
    sent += 1
    try:
        while struct.unpack(">H", s.recv(1500)[:2])[0] != (sent - 1) & 0xffff:
            pass
        answered += 1
    except socket.timeout:
        pass
print(sent, answered)
EOF

# Empties a pinned ring buffer every millisecond (consumer = producer), as
# flowtel's reader does, so the kernel side keeps taking its submit path.
cat >"$WORK/drain.py" <<'EOF'
import ctypes, mmap, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
path = ctypes.create_string_buffer(sys.argv[1].encode())
attr = struct.pack("=QII", ctypes.addressof(path), 0, 0) + bytes(128 - 16)
buf = ctypes.create_string_buffer(attr, len(attr))
fd = libc.syscall(321, 7, buf, len(attr))  # bpf(BPF_OBJ_GET)
if fd < 0:
    sys.exit("BPF_OBJ_GET failed: errno %d" % ctypes.get_errno())
page = mmap.PAGESIZE
cons = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
prod = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
while True:
    cons[0:8] = prod[0:8]
    time.sleep(0.001)
EOF
python3 "$WORK/drain.py" "$WORK/bpffs/dns_on_maps/dns_events" &
DRAINER=$!

# Wait for both servers.
for _ in $(seq 50); do
    ip netns exec "$NS_S" iperf3 -c 198.18.7.2 -p 5201 -n 1K >/dev/null 2>&1 && break
    sleep 0.1
done
for _ in $(seq 50); do
    [ "$(ip netns exec "$NS_S" python3 "$WORK/client.py" 0.05 | awk '{print $2}')" -gt 0 ] && break
    sleep 0.1
done

sysctl -q -w kernel.bpf_stats_enabled=1
orders=("minimal nodns dns_off dns_on" "nodns dns_off dns_on minimal"
        "dns_off dns_on minimal nodns" "dns_on minimal nodns dns_off")
declare -A results
dns_sent=0
dns_answered=0
for round in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086
    attach ${orders[$(((round - 1) % 4))]}
    for kind in tcp udp dns; do
        declare -A t0 c0
        for name in "${PROGS[@]}"; do read -r t0[$name] c0[$name] < <(stats "$name"); done
        case $kind in
            tcp) ip netns exec "$NS_S" iperf3 -c 198.18.7.2 -p 5201 -t "$DURATION" >/dev/null ;;
            udp) ip netns exec "$NS_S" iperf3 -c 198.18.7.2 -p 5201 -u -b 200M -l 1000 -t "$DURATION" >/dev/null ;;
            dns)
                read -r s a < <(ip netns exec "$NS_S" python3 "$WORK/client.py" "$DURATION")
                dns_sent=$((dns_sent + s)); dns_answered=$((dns_answered + a)) ;;
        esac
        for name in "${PROGS[@]}"; do
            read -r t c < <(stats "$name")
            dt=$((t - t0[$name])); dc=$((c - c0[$name]))
            [ "$dc" -gt 0 ] || die "$name ran 0 times"
            results[$kind,$name]+="$(awk -v t=$dt -v c=$dc 'BEGIN { printf "%.1f", t / c }') "
            [ "$name" = minimal ] && results[$kind,packets]+="$dc "
        done
    done
done

# dns_on's own counters (bpf/dns.h dns_stats), summed over CPUs.
dns_stats=$(bpftool -j map dump pinned "$WORK/bpffs/dns_on_maps/dns_stats" 2>/dev/null \
    | python3 -c 'import json,sys
rows = json.load(sys.stdin)
out = []
for r in rows:
    k = r.get("key", 0)
    k = k if isinstance(k, int) else int.from_bytes(bytes(int(b, 16) for b in k), "little")
    v = r.get("values") or r.get("value")
    if isinstance(v, list):
        v = sum((x["value"] if isinstance(x.get("value"), int) else int.from_bytes(bytes(int(b, 16) for b in x["value"]), "little")) for x in v)
    out.append("%s=%d" % (["map_full", "parse_error", "ring_full", "unmatched"][k], v))
print(" ".join(out))' || echo "unreadable")

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
echo
echo "Per-packet (skb) run time at both veth ingresses, ns, median of $ROUNDS rounds of ${DURATION} s"
echo "(kernel $(uname -r), $(nproc) CPUs, nodns = flow.bpf.c at $(git -C "$ROOT" rev-parse --short "$BEFORE"), flow = working tree at $(git -C "$ROOT" rev-parse --short HEAD))"
echo "DNS: $dns_sent queries sent, $dns_answered answered; dns_on's dns_stats: $dns_stats"
printf '%-6s %10s %9s %9s %9s %9s %16s %15s %15s\n' traffic "skb/round" minimal nodns dns_off dns_on "dns_off/nodns" "dns_on/dns_off" "dns_on/nodns"
for kind in tcp udp dns; do
    p=$(echo "${results[$kind,packets]}" | median)
    m=$(echo "${results[$kind,minimal]}" | median)
    n=$(echo "${results[$kind,nodns]}" | median)
    f=$(echo "${results[$kind,dns_off]}" | median)
    o=$(echo "${results[$kind,dns_on]}" | median)
    awk -v k="$kind" -v p="$p" -v m="$m" -v n="$n" -v f="$f" -v o="$o" \
        'BEGIN { printf "%-6s %10d %9.1f %9.1f %9.1f %9.1f %+15.1f%% %+14.1f%% %+14.1f%%\n", k, p, m, n, f, o, (f / n - 1) * 100, (o / f - 1) * 100, (o / n - 1) * 100 }'
done
