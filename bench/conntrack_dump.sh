#!/usr/bin/env bash
# Dump benchmark: how long reading (and, for flowtel, aggregating) a conntrack
# table of ENTRIES connections takes, compared with the usual tools.
#
# As root: creates a throwaway network namespace, turns conntrack accounting
# on there, fills its table with ENTRIES connections (a mix of IPv4/IPv6,
# TCP/UDP, some behind DNAT or SNAT), then in rounds measures
#   conntrack -L > /dev/null              (inside the namespace)
#   cat /proc/net/nf_conntrack > /dev/null (inside the namespace)
#   examples/dump_bench (flowtel's conntrack source and flow stage)
#     in netlink and procfs mode
# and prints a markdown table of medians. Everything it created (namespace,
# temporary files, a raised nf_conntrack_max) is undone on exit, also on
# failure or Ctrl-C.
#
# Usage: sudo bench/conntrack_dump.sh
# Environment: ENTRIES (default 100000), RUNS (default 5),
#   DUMP_BENCH (a prebuilt dump_bench binary; default: build it with cargo),
#   CARGO_TARGET_DIR (where cargo builds, as usual).
#
# Filling: 60 % TCP via `conntrack -R FILE` (one `-I ...` line per entry,
# about 1 s for 100k; these carry zero counters since ctnetlink cannot set
# them), 40 % UDP via real packets sent out of a veth with no one behind it (these have
# byte and packet counters, so the aggregation does real work on them).
set -euo pipefail
export LC_ALL=C

ENTRIES=${ENTRIES:-100000}
RUNS=${RUNS:-5}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    echo "conntrack_dump.sh: $*" >&2
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root (it creates a network namespace)"
[[ $ENTRIES =~ ^[0-9]+$ && $ENTRIES -ge 100 ]] || die "ENTRIES must be a number >= 100"
[[ $RUNS =~ ^[0-9]+$ && $RUNS -ge 1 ]] || die "RUNS must be a positive number"
for tool in ip nft conntrack nsenter python3; do
    command -v "$tool" >/dev/null || die "\`$tool\` is not installed"
done
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time, Debian package \`time\`) is needed for the RSS column"

NS=flowtel-bench-$$-$RANDOM
NS_PATH=/var/run/netns/$NS
WORK=$(mktemp -d /tmp/flowtel-bench.XXXXXX)
CT_MAX=/proc/sys/net/netfilter/nf_conntrack_max
SAVED_MAX=

cleanup() {
    local rc=$?
    set +e
    ip netns del "$NS" 2>/dev/null
    if [[ -n $SAVED_MAX ]]; then
        echo "$SAVED_MAX" >"$CT_MAX" && echo "restored nf_conntrack_max=$SAVED_MAX" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

in_ns() {
    nsenter --net="$NS_PATH" "$@"
}

# --- the flowtel side --------------------------------------------------------
if [[ -n ${DUMP_BENCH:-} ]]; then
    BIN=$DUMP_BENCH
else
    echo "building examples/dump_bench (release) ..." >&2
    (cd "$ROOT" && cargo build --quiet --release --example dump_bench)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/dump_bench
fi
[[ -x $BIN ]] || die "no dump_bench binary at $BIN"

# --- the namespace ------------------------------------------------------------
ip netns add "$NS"
ip -n "$NS" link set lo up
# Packets to the test servers leave through veth0 and vanish (nobody is at
# the other end); `arp off` sends them without neighbour resolution.
ip -n "$NS" link add veth0 type veth peer name veth1
ip -n "$NS" link set veth0 arp off up
ip -n "$NS" link set veth1 up
ip -n "$NS" addr add 198.18.0.1/15 dev veth0
ip -n "$NS" addr add fd00::1/16 dev veth0 nodad
for i in $(seq 1 16); do
    ip -n "$NS" addr add "198.18.3.$i/32" dev veth0
    ip -n "$NS" addr add "fd00:4::$(printf %x "$i")/128" dev veth0 nodad
done

# A `ct` rule makes the kernel track this namespace; the nat chains give some
# UDP flows translated reply tuples (one backend per VIP, so no port clashes).
python3 - >"$WORK/rules.nft" <<'PY'
dnat4 = ", ".join(f"198.19.1.{d} : 198.18.2.{d}" for d in range(1, 20))
dnat6 = ", ".join(f"fd00:5::{d:x} : fd00:6::{d:x}" for d in range(1, 6))
print(f"""table inet flowtel_bench {{
  chain out {{
    type filter hook output priority 0;
    ct state established,related accept
  }}
}}
table ip flowtel_bench_nat {{
  chain out {{
    type nat hook output priority -100;
    ip daddr 198.19.1.1-198.19.1.19 dnat to ip daddr map {{ {dnat4} }}
  }}
  chain post {{
    type nat hook postrouting priority 100;
    ip daddr 198.19.1.60-198.19.1.75 snat to 198.18.0.254
  }}
}}
table ip6 flowtel_bench_nat6 {{
  chain out {{
    type nat hook output priority -100;
    ip6 daddr fd00:5::1-fd00:5::5 dnat to ip6 daddr map {{ {dnat6} }}
  }}
}}""")
PY
in_ns nft -f "$WORK/rules.nft"
in_ns sysctl -qw net.netfilter.nf_conntrack_acct=1
in_ns sysctl -qw net.netfilter.nf_conntrack_udp_timeout=3600

# nf_conntrack_max is global (read-only inside a namespace) and is checked
# against each namespace's own count.
current_max=$(cat "$CT_MAX")
if ((current_max < ENTRIES + 1000)); then
    SAVED_MAX=$current_max
    echo $((ENTRIES + 1000)) >"$CT_MAX"
    echo "raised nf_conntrack_max from $SAVED_MAX to $((ENTRIES + 1000)) (restored on exit)" >&2
fi

# --- filling the table ----------------------------------------------------------
N_TCP=$((ENTRIES * 6 / 10))
N_UDP=$((ENTRIES - N_TCP))

# TCP: 200 client pods, 120 server endpoints; 20 % DNAT'ed (Service VIP to a
# backend pod), 10 % SNAT'ed (masquerade); a quarter over IPv6.
python3 - "$N_TCP" >"$WORK/tcp.restore" <<'PY'
import sys
n = int(sys.argv[1])
n6 = n // 4
ports = (443, 80, 8080, 5432)
out = []
for i in range(n):
    v6 = i < n6
    j = i if v6 else i - n6
    client_n, cport = j % 200 + 1, 10000 + j // 200
    svc, dport = (j * 7) % 120 + 1, ports[j % 4]
    if v6:
        client, server = f"fd00:1::{client_n:x}", f"fd00:2::{svc:x}"
        backend, masq = f"fd00:3::{svc % 50 + 1:x}", "fd00::fe"
    else:
        client, server = f"198.18.1.{client_n}", f"198.19.0.{svc}"
        backend, masq = f"198.18.2.{svc % 50 + 101}", "198.18.0.254"
    line = (f"-I -s {client} -d {server} -p tcp --sport {cport} --dport {dport} "
            "--state ESTABLISHED -t 3600 -u SEEN_REPLY,ASSURED")
    if j % 5 == 0:  # DNAT: the reply comes from a backend
        line += f" -r {backend} -q {client} --reply-port-src 8443 --reply-port-dst {cport}"
    elif j % 10 == 3:  # SNAT: the reply goes to the masquerade address
        line += f" -r {server} -q {masq} --reply-port-src {dport} --reply-port-dst {20000 + j // 10}"
    out.append(line)
sys.stdout.write("\n".join(out) + "\n")
PY

# UDP: real packets from 16 local addresses x N sockets to 75 (IPv4) or 25
# (IPv6) servers, one datagram per flow, 40-1240 bytes of payload.
cat >"$WORK/udp.py" <<'PY'
import socket, sys
n = int(sys.argv[1])
n6 = n // 4
def send(count, family, sources, servers):
    sent, k = 0, 0
    keep = []
    while sent < count:
        for src in sources:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((src, 0))
            keep.append(s)
            for dst in servers:
                if sent == count:
                    return
                s.sendto(b"x" * (40 + k % 1200), dst)
                sent += 1
                k += 1
v4_servers = [(f"198.19.1.{d}", 53 if d % 2 else 123) for d in range(1, 76)]
v6_servers = [(f"fd00:5::{d:x}", 53) for d in range(1, 26)]
send(n - n6, socket.AF_INET, [f"198.18.3.{i}" for i in range(1, 17)], v4_servers)
send(n6, socket.AF_INET6, [f"fd00:4::{i:x}" for i in range(1, 17)], v6_servers)
PY

echo "filling namespace $NS with $ENTRIES entries ($N_TCP TCP via conntrack -R, $N_UDP UDP via packets) ..." >&2
t0=${EPOCHREALTIME/./}
in_ns conntrack -R "$WORK/tcp.restore" 2>"$WORK/restore.err" ||
    die "conntrack -R failed: $(tail -n 3 "$WORK/restore.err")"
t1=${EPOCHREALTIME/./}
in_ns python3 "$WORK/udp.py" "$N_UDP"
t2=${EPOCHREALTIME/./}
count=$(in_ns conntrack -C)
printf 'filled in %.2f s (conntrack -R: %.2f s, UDP packets: %.2f s); conntrack -C says %s\n' \
    "$(((t2 - t0) / 1000))e-3" "$(((t1 - t0) / 1000))e-3" "$(((t2 - t1) / 1000))e-3" "$count" >&2
((count >= ENTRIES)) || die "the table holds $count entries, not $ENTRIES"

# --- measuring --------------------------------------------------------------------
# Each sample: wall time in microseconds and max RSS in KiB (GNU time).
declare -A TIMES RSS
sample() { # sample KEY COMMAND... (stdout to /dev/null)
    local key=$1 t0 t1
    shift
    t0=${EPOCHREALTIME/./}
    /usr/bin/time -f %M -o "$WORK/rss" "$@" >/dev/null 2>"$WORK/err" ||
        die "$* failed: $(tail -n 3 "$WORK/err")"
    t1=${EPOCHREALTIME/./}
    TIMES[$key]+="$((t1 - t0)) "
    RSS[$key]+="$(tail -n 1 "$WORK/rss") "
}

declare -A FT # flowtel results: KEY -> "ms ms ...", KEY.rss, KEY.entries, KEY.flows
flowtel() { # flowtel KEY ARGS...
    local key=$1 line k
    shift
    "$BIN" --netns "$NS_PATH" "$@" >"$WORK/ft.out" 2>"$WORK/ft.err" ||
        die "dump_bench $* failed: $(tail -n 5 "$WORK/ft.err")"
    while read -r line; do
        declare -A kv=()
        for k in $line; do
            [[ $k == *=* ]] && kv[${k%%=*}]=${k#*=}
        done
        if [[ -n ${kv[dump]:-} ]]; then
            FT[$key.${kv[dump]}]+="${kv[dump_aggregate_ms]} "
            FT[$key.${kv[dump]}.entries]=${kv[entries]}
            FT[$key.${kv[dump]}.flows]=${kv[flows]}
            FT[$key.${kv[dump]}.series]=${kv[series]}
        else
            FT[$key.rss]+="${kv[vmhwm_kib]} "
            FT[$key.errors]=${kv[parse_errors]}
        fi
    done < <(grep '^RESULT ' "$WORK/ft.out")
}

median() { # median NUMBERS...
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

entries_L=$(in_ns conntrack -L 2>/dev/null | wc -l)
entries_proc=$(in_ns cat /proc/net/nf_conntrack | wc -l)

for round in $(seq 1 "$RUNS"); do
    echo "round $round/$RUNS ..." >&2
    sample L nsenter --net="$NS_PATH" conntrack -L
    sample proc nsenter --net="$NS_PATH" cat /proc/net/nf_conntrack
    flowtel netlink --mode netlink --dumps 2
    flowtel procfs --mode procfs --dumps 2
    flowtel drain --mode netlink --dumps 1 --drain-only
done

mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
ms_of_us() { awk -v u="$1" 'BEGIN { printf "%.0f ms", u / 1000 }'; }
ms() { awk -v m="$1" 'BEGIN { printf "%.0f ms", m }'; }

# shellcheck disable=SC2086 # the sample lists are meant to split
{
    echo
    echo "conntrack table: $count entries in namespace $NS (kernel $(uname -r), $(nproc) CPUs, $(conntrack --version 2>&1 | head -n 1 | cut -d' ' -f1-2)); median of $RUNS runs"
    echo
    echo "| what | median time | entries | RSS |"
    echo "| --- | --- | --- | --- |"
    echo "| \`nsenter --net=$NS_PATH conntrack -L > /dev/null\` | $(ms_of_us "$(median ${TIMES[L]})") | $entries_L | $(mib "$(median ${RSS[L]})") |"
    echo "| \`nsenter --net=$NS_PATH cat /proc/net/nf_conntrack > /dev/null\` | $(ms_of_us "$(median ${TIMES[proc]})") | $entries_proc | $(mib "$(median ${RSS[proc]})") |"
    for mode in netlink procfs; do
        cmd="$BIN --netns $NS_PATH --mode $mode --dumps 2"
        echo "| flowtel $mode dump + aggregate, first interval (empty flow table): \`${cmd#"$ROOT"/}\` | $(ms "$(median ${FT[$mode.1]})") | ${FT[$mode.1.entries]} (${FT[$mode.1.flows]} flows, ${FT[$mode.1.series]} series) | $(mib "$(median ${FT[$mode.rss]})") |"
        echo "| flowtel $mode dump + aggregate, steady state (2nd dump, same process) | $(ms "$(median ${FT[$mode.2]})") | ${FT[$mode.2.entries]} (${FT[$mode.2.flows]} flows, ${FT[$mode.2.series]} series) | (same process) |"
    done
    cmd="$BIN --netns $NS_PATH --mode netlink --dumps 1 --drain-only"
    echo "| flowtel netlink dump + decode only, no table: \`${cmd#"$ROOT"/}\` | $(ms "$(median ${FT[drain.1]})") | ${FT[drain.1.entries]} | $(mib "$(median ${FT[drain.rss]})") |"
    echo
    echo "Times are wall clock. conntrack and cat: the whole process, as started by /usr/bin/time. flowtel: from the dump request to finish_interval returning, as timed inside dump_bench (source start-up excluded). RSS: peak resident set (GNU time's max RSS; VmHWM for flowtel, over both dumps). flowtel parse errors: netlink ${FT[netlink.errors]}, procfs ${FT[procfs.errors]}."
}
