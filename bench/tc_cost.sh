#!/usr/bin/env bash
# Per-packet cost of flowtel's TC program, before and after the race fixes
# of issue 17 (two flow maps and an epoch lookup per packet), as a ratio to
# a minimal counting program measured on the same packets in the same run.
#
# As root: builds three objects with clang against the committed
# bpf/vmlinux.h
#   minimal  one per-CPU array counter of bytes and packets (the baseline)
#   before   bpf/flow.bpf.c at git revision BEFORE (default 5f583a9, the
#            last with one flow map)
#   after    bpf/flow.bpf.c of the working tree
# loads them with bpftool into a private bpffs, attaches all three as
# clsact direct-action filters on the receiving veth's ingress of a
# namespace pair (each returns "continue", so every packet runs all three,
# in rotated priority order each round), turns kernel.bpf_stats_enabled on
# (restored on exit), sends DURATION s of iperf3 TCP and of UDP each round
# and reads each program's run_time_ns / run_cnt from bpftool. Prints one
# table: ns per packet (skb) per program, and before/after as a ratio to
# minimal, median over ROUNDS. Everything it creates is removed on exit.
#
# Usage: sudo bench/tc_cost.sh
# Environment: ROUNDS (default 5), DURATION (default 5), BEFORE (a git
#   revision holding the old bpf/flow.bpf.c), CLANG (default clang).
# Takes about ROUNDS × 2 × (DURATION + 2) seconds: about 70 s by default.
set -euo pipefail
export LC_ALL=C

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5}
CLANG=${CLANG:-clang}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The last revision with one flow map.
BEFORE=${BEFORE:-5f583a9}

die() { echo "tc_cost: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
for tool in "$CLANG" bpftool tc ip iperf3 sysctl; do
    command -v "$tool" >/dev/null || die "missing: $tool (Debian: clang bpftool iproute2 iperf3 procps)"
done

WORK=$(mktemp -d /tmp/tc_cost.XXXXXX)
NS_S="tccost-s-$$"
NS_R="tccost-r-$$"
OLD_STATS=$(sysctl -n kernel.bpf_stats_enabled)
cleanup() {
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
git -C "$ROOT" show "$BEFORE:bpf/flow.bpf.c" >"$WORK/before.bpf.c" \
    || die "no bpf/flow.bpf.c at $BEFORE"
cp "$ROOT/bpf/flow.bpf.c" "$WORK/after.bpf.c"
for name in minimal before after; do
    "$CLANG" -O2 -g -target bpfel -D__TARGET_ARCH_x86 -DFT_PREALLOC -Wall -I"$ROOT/bpf" \
        -c "$WORK/$name.bpf.c" -o "$WORK/$name.bpf.o"
done

mkdir -p "$WORK/bpffs"
mount -t bpf bpf "$WORK/bpffs"
for name in minimal before after; do
    bpftool prog loadall "$WORK/$name.bpf.o" "$WORK/bpffs/$name" type classifier
done
prog_path() {
    case $1 in
        minimal) echo "$WORK/bpffs/minimal/minimal" ;;
        *) echo "$WORK/bpffs/$1/flowtel_in_eth" ;;
    esac
}

ip netns add "$NS_S"
ip netns add "$NS_R"
ip link add tccs type veth peer name tccr
ip link set tccs netns "$NS_S"
ip link set tccr netns "$NS_R"
ip -n "$NS_S" addr add 198.18.7.1/24 dev tccs
ip -n "$NS_R" addr add 198.18.7.2/24 dev tccr
ip -n "$NS_S" link set tccs up
ip -n "$NS_R" link set tccr up
ip -n "$NS_S" link set lo up
ip -n "$NS_R" link set lo up
ip netns exec "$NS_R" tc qdisc add dev tccr clsact
ip netns exec "$NS_R" iperf3 -s -D -p 5201 -I "$WORK/iperf3.pid" >/dev/null

attach() { # order of names: priority 1, 2, 3
    ip netns exec "$NS_R" tc filter del dev tccr ingress 2>/dev/null || true
    local prio=1
    for name in "$@"; do
        ip netns exec "$NS_R" tc filter add dev tccr ingress prio $prio handle 1 \
            bpf da pinned "$(prog_path "$name")"
        prio=$((prio + 1))
    done
}

stats() { # "run_time_ns run_cnt" of a pinned program
    bpftool prog show pinned "$(prog_path "$1")" \
        | awk '{for (i = 1; i < NF; i++) { if ($i == "run_time_ns") t = $(i+1); if ($i == "run_cnt") c = $(i+1) }} END { print (t ? t : 0), (c ? c : 0) }'
}

# Wait for the server.
for _ in $(seq 50); do
    ip netns exec "$NS_S" iperf3 -c 198.18.7.2 -p 5201 -n 1K >/dev/null 2>&1 && break
    sleep 0.1
done

sysctl -q -w kernel.bpf_stats_enabled=1
orders=("minimal before after" "before after minimal" "after minimal before")
declare -A results
for round in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086
    attach ${orders[$(((round - 1) % 3))]}
    for kind in tcp udp; do
        declare -A t0 c0
        for name in minimal before after; do read -r t0[$name] c0[$name] < <(stats $name); done
        if [ "$kind" = tcp ]; then
            ip netns exec "$NS_S" iperf3 -c 198.18.7.2 -p 5201 -t "$DURATION" >/dev/null
        else
            ip netns exec "$NS_S" iperf3 -c 198.18.7.2 -p 5201 -u -b 200M -l 1000 -t "$DURATION" >/dev/null
        fi
        for name in minimal before after; do
            read -r t c < <(stats $name)
            dt=$((t - t0[$name])); dc=$((c - c0[$name]))
            [ "$dc" -gt 0 ] || die "$name ran 0 times"
            results[$kind,$name]+="$(awk -v t=$dt -v c=$dc 'BEGIN { printf "%.1f", t / c }') "
        done
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
echo
echo "Per-packet (skb) run time at veth ingress, ns, median of $ROUNDS rounds"
echo "(kernel $(uname -r), $(nproc) CPUs, before = flow.bpf.c at $(git -C "$ROOT" rev-parse --short "$BEFORE"))"
printf '%-6s %10s %10s %10s %14s %14s %10s\n' traffic minimal before after before/minimal after/minimal after/before
for kind in tcp udp; do
    m=$(echo "${results[$kind,minimal]}" | median)
    b=$(echo "${results[$kind,before]}" | median)
    a=$(echo "${results[$kind,after]}" | median)
    awk -v k="$kind" -v m="$m" -v b="$b" -v a="$a" \
        'BEGIN { printf "%-6s %10.1f %10.1f %10.1f %14.2f %14.2f %+9.1f%%\n", k, m, b, a, b / m, a / m, (a / b - 1) * 100 }'
done
