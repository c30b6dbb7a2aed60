#!/usr/bin/env bash
# What the CNI source's stdout hook costs every system call of the node, as
# a markdown table: nanoseconds per getppid() and per 1-byte write() to
# /dev/null (a tight loop of 2,000,000 of each, bench/cni_syscall/loop.c),
# with
#   none       no BPF program;
#   sys_enter  flowtel's CNI programs (bpf/cni.bpf.c as build.rs compiles
#              it: exec, exit and the raw BTF tracepoint sys_enter, which
#              runs for every system call and returns unless it is a write
#              of a running plugin);
#   exec_exit  the same programs without the sys_enter one, as
#              `cni.capture_output: false` attaches them;
#   sys_enter_write  the candidate replacement: the classic tracepoint
#              syscalls/sys_enter_write (bench/cni_syscall/write_tp.bpf.c,
#              same filter), which needs tracefs: mounted here in a private
#              mount namespace, so the host's mounts are left alone.
# The programs are loaded and attached with libbpf by
# bench/cni_syscall/attach.c for the duration of one loop; no plugin runs,
# so what is measured is the cost to every other process. The modes
# alternate, ROUNDS times; the table shows the median and the range.
#
# Usage (as root): bench/cni_syscall_overhead.sh
# Needs: clang, bpftool, libbpf-dev. Environment: ROUNDS (7), N (2000000),
#   CPU (pin the loop to this CPU; default 1).
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-7}
N=${N:-2000000}
CPU=${CPU:-1}
[[ $(id -u) == 0 ]] || { echo "run as root (loads BPF programs)" >&2; exit 1; }
for t in clang bpftool unshare taskset; do
    command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$ROOT/bench/cni_syscall
bpftool btf dump file /sys/kernel/btf/vmlinux format c >"$work/vmlinux.h"
clang -O2 -o "$work/loop" "$src/loop.c"
clang -O2 -o "$work/attach" "$src/attach.c" -lbpf
bpf() { clang -O2 -g -target bpfel -Wall -D__TARGET_ARCH_x86 -I"$work" -I"$ROOT/bpf" -c "$1" -o "$2"; }
bpf "$ROOT/bpf/cni.bpf.c" "$work/sys_enter.o"
bpf "$src/write_tp.bpf.c" "$work/sys_enter_write.o"

# MODE SYSCALL: nanoseconds per call.
measure() {
    local loop=(taskset -c "$CPU" "$work/loop" "$N" "$2")
    case $1 in
    none) "${loop[@]}" ;;
    sys_enter) "$work/attach" "$work/sys_enter.o" "${loop[@]}" ;;
    exec_exit) SKIP=flowtel_cni_write "$work/attach" "$work/sys_enter.o" "${loop[@]}" ;;
    sys_enter_write)
        unshare -m --propagation private sh -c \
            'mount -t tracefs tracefs /sys/kernel/tracing && exec "$@"' sh \
            "$work/attach" "$work/sys_enter_write.o" "${loop[@]}"
        ;;
    esac
}

MODES=(none sys_enter exec_exit sys_enter_write)
for r in $(seq "$ROUNDS"); do
    for m in "${MODES[@]}"; do
        for s in getppid write; do
            echo "$m $s $(measure "$m" "$s")" >>"$work/samples"
        done
    done
    echo "round $r of $ROUNDS done" >&2
done

stats() { # MODE SYSCALL -> "median min max"
    awk -v m="$1" -v s="$2" '$1 == m && $2 == s { print $3 }' "$work/samples" | sort -g |
        awk '{ v[NR] = $1 } END { printf "%.1f %.1f %.1f\n", v[int((NR + 1) / 2)], v[1], v[NR] }'
}
echo
echo "Per-system-call cost of the CNI stdout hook ($(uname -r), $(nproc) CPUs, $ROUNDS rounds of $N calls, load average $(cut -d' ' -f1-3 /proc/loadavg)):"
echo
echo "| hook | getppid ns/call (median, range) | added | write ns/call (median, range) | added |"
echo "| --- | --- | --- | --- | --- |"
read -r g0 _ _ < <(stats none getppid)
read -r w0 _ _ < <(stats none write)
for m in "${MODES[@]}"; do
    read -r g gmin gmax < <(stats "$m" getppid)
    read -r w wmin wmax < <(stats "$m" write)
    ga=$(awk -v a="$g" -v b="$g0" 'BEGIN { printf "%+.1f", a - b }')
    wa=$(awk -v a="$w" -v b="$w0" 'BEGIN { printf "%+.1f", a - b }')
    echo "| $m | $g ($gmin–$gmax) | $ga | $w ($wmin–$wmax) | $wa |"
done
