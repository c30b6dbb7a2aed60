#!/usr/bin/env bash
# The kernel matrix: flowtel's eBPF checks on Debian's 6.1 and 6.12 kernels,
# each booted in qemu with software emulation (TCG: KVM does not work inside
# these machines), and on the host's own kernel. Prints one table, kernel ×
# check, PASS / FAIL / n/a, with the time each took.
#
# As root. One build serves every kernel: the test executables (which embed
# flowtel's BPF objects, compiled once against the committed bpf/vmlinux.h)
# are built on the host and run unchanged in each guest.
#
# How a guest runs: the kernel package is fetched with `apt-get download`
# (Debian's linux-image-*-amd64-unsigned: the cloud flavour has no 9p) and unpacked with dpkg-deb
# into CACHE; a small initramfs (busybox-static plus the modules 9p needs)
# mounts the host's root filesystem read-only over virtio-9p, puts tmpfs on
# /tmp and /run, the guest's /proc, /sys, bpffs and tracefs, and the
# kernel's own modules on /lib/modules, then chroots into it and runs the
# checks with the host's tools (ip, nft, iperf3, bpftool). Results come back
# on the serial console. Nothing reaches the internet but Debian's archive.
#
# Checks (each a test of this repository; see docs/testing.md):
#   btf+race  lib tests of src/source/ebpf: the Rust mirrors against the
#             objects' BTF, the eviction race (BPF_PROG_TEST_RUN, 2 CPUs)
#   attach    tests/ebpf_source.rs iperf3_counts_match_interface_and_ip_counters:
#             attach with ebpf.attach auto (TCX by probing, else clsact) and
#             netlink, iperf3 per direction within 1 % of the veth counters
#   detach    tests/ebpf_source.rs stop_leaves_nothing_attached
#   health    tests/ebpf_health.rs: TCP health and drop tracepoints
#   fallback  tests/source_selection.rs auto_without_bpf_capability_falls_back_to_conntrack
#   coverage  tests/ebpf_coverage.rs: the coverage self-check with a foreign
#             TCX program (needs TCX: n/a below 6.6)
#
# Usage: sudo bench/kernel_matrix.sh
# Environment: KERNELS (Debian package names; default: the newest
#   linux-image-6.1.0-*-amd64-unsigned and
#   linux-image-6.12.*+deb12-amd64-unsigned apt knows), CHECKS (names from
#   the list above, default all), CACHE (default /var/tmp/flowtel-kernels),
#   MB (iperf3 traffic of the attach check in the guests, default 2; the
#   host uses the test's default), GUEST_TIMEOUT (seconds per guest,
#   default 2400), BOOT_WAIT (seconds for a guest to reach init before it
#   is booted once more, default 240), CARGO_TARGET_DIR (scripts/env.sh supplies the default).
# Installs what it needs from Debian when missing (qemu-system-x86,
# busybox-static, kmod, cpio) and what the tests need
# (scripts/install-test-deps.sh), so one command runs the whole matrix.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../scripts/env.sh
. "$ROOT/scripts/env.sh"
CACHE=${CACHE:-/var/tmp/flowtel-kernels}
MB=${MB:-2}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-2400}
ALL_CHECKS="btf+race attach detach health fallback coverage"
CHECKS=${CHECKS:-$ALL_CHECKS}

die() { echo "kernel_matrix: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v depmod >/dev/null ||
    ! command -v cpio >/dev/null || ! busybox --list 2>/dev/null | grep -qx modprobe; then
    echo "installing qemu-system-x86, busybox-static, kmod, cpio..." >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-x86 busybox-static kmod cpio >&2
fi
"$ROOT/scripts/install-test-deps.sh" >&2
for tool in qemu-system-x86_64 busybox depmod cpio gzip dpkg-deb apt-get apt-cache python3 cargo; do
    command -v "$tool" >/dev/null || die "missing: $tool (Debian: qemu-system-x86 busybox-static kmod cpio)"
done
busybox --list | grep -qx modprobe || die "busybox has no modprobe applet (install busybox-static)"

newest() { apt-cache search --names-only "$1" | awk '{print $1}' | sort -V | tail -n 1; }
if [ -z "${KERNELS:-}" ]; then
    KERNELS="$(newest '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$') $(newest '^linux-image-6\.12\.[0-9.]+\+deb12-amd64-unsigned$')"
fi

# The test executables, built once on the host.
echo "building the test executables..." >&2
exes=$(cd "$ROOT" && cargo test --no-run --lib --test ebpf_source --test ebpf_health \
    --test source_selection --test ebpf_coverage --message-format=json 2>"$CACHE/build.log" \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])')
exe() { echo "$exes" | awk -v n="$1" '$1 == n { print $2 }'; }
LIB=$(exe flowtel)
[ -n "$LIB" ] || die "no test executables built; see $CACHE/build.log"

# check name -> command (run as root, in the repository, with CI=true).
command_of() {
    case $1 in
        btf+race) echo "$LIB --test-threads=1 source::ebpf::" ;;
        attach) echo "$(exe ebpf_source) --exact iperf3_counts_match_interface_and_ip_counters --nocapture" ;;
        detach) echo "$(exe ebpf_source) --exact stop_leaves_nothing_attached --nocapture" ;;
        health) echo "$(exe ebpf_health) --nocapture" ;;
        fallback) echo "$(exe source_selection) --exact auto_without_bpf_capability_falls_back_to_conntrack --nocapture" ;;
        coverage) echo "$(exe ebpf_coverage) --test-threads=1 --nocapture" ;;
        *) die "unknown check $1" ;;
    esac
}

WORK=$(mktemp -d "$CACHE/run.XXXXXX" 2>/dev/null || { mkdir -p "$CACHE" && mktemp -d "$CACHE/run.XXXXXX"; })
trap 'rm -rf "$WORK"' EXIT

# The script every kernel runs: prints "FTCHECK <name> <PASS|FAIL|n/a> <s>".
{
    echo '#!/bin/sh'
    echo "cd '$ROOT'"
    # A missing prerequisite fails the check instead of skipping it.
    echo 'export CI=true'
    echo 'export FLOWTEL_TEST_MB="${FLOWTEL_TEST_MB:-}" FLOWTEL_TEST_SLOW="${FLOWTEL_TEST_SLOW:-}"'
    echo 'tcx=yes; case $(uname -r) in [1-5].*|6.[0-5].*) tcx=no ;; esac'
    for check in $CHECKS; do
        cmd=$(command_of "$check")
        echo "start=\$(date +%s)"
        if [ "$check" = coverage ]; then
            echo "if [ \$tcx = no ]; then echo 'FTCHECK $check n/a 0'; else"
        fi
        # A failure's message comes before flowtel's output in the log.
        echo "if $cmd > /tmp/ft-$check.log 2>&1; then r=PASS; else r=FAIL; grep -A 12 'panicked at' /tmp/ft-$check.log; tail -n 40 /tmp/ft-$check.log; fi"
        echo "grep -E '^(tcx|clsact|Auto|Netlink|First|Last|coverage|[0-9]+ runs)|ipv[46] (tcp|udp) .* bytes expected|RTT mean|skip|test result' /tmp/ft-$check.log | sed 's/^/FTLOG $check: /' || true"
        echo "echo \"FTCHECK $check \$r \$((\$(date +%s) - start))\""
        if [ "$check" = coverage ]; then echo "fi"; fi
    done
} >"$WORK/checks.sh"
chmod +x "$WORK/checks.sh"

declare -A result
kernels=()

run_host() {
    local k="host $(uname -r)"
    kernels+=("$k")
    echo "== $k" >&2
    local out
    out=$(FLOWTEL_TEST_MB='' sh "$WORK/checks.sh" 2>&1 | tee "$WORK/host.log" | grep '^FT' || true)
    record "$k" "$out"
}

record() { # kernel, FTCHECK lines
    local line name r secs
    while read -r line; do
        case $line in
            FTCHECK*)
                read -r _ name r secs <<<"$line"
                result[$1,$name]="$r ${secs}s"
                ;;
        esac
    done <<<"$2"
    echo "$2" | grep '^FTLOG' >&2 || true
}

initramfs() { # kernel dir, version, output
    local kdir=$1 kver=$2 out=$3 ir
    ir=$(mktemp -d "$WORK/ir.XXXXXX")
    mkdir -p "$ir"/{bin,sbin,proc,sys,dev,host,mods,lib/modules/"$kver"}
    cp "$(command -v busybox)" "$ir/bin/busybox"
    # 9p and what it needs, in load order (dependencies first).
    local mods
    mods=$(python3 - "$kdir/lib/modules/$kver" <<'EOF'
import os, sys
base = sys.argv[1]
deps = {}
for line in open(os.path.join(base, "modules.dep")):
    mod, _, rest = line.partition(":")
    deps[os.path.basename(mod).split(".ko")[0].replace("-", "_")] = (mod, rest.split())
order, seen = [], set()
def visit(name):
    if name in seen or name not in deps:
        return
    seen.add(name)
    for d in deps[name][1]:
        visit(os.path.basename(d).split(".ko")[0].replace("-", "_"))
    order.append(deps[name][0])
for want in ["virtio_pci", "9pnet_virtio", "9p"]:
    visit(want)
print("\n".join(order))
EOF
)
    : >"$ir/mods/order"
    local m
    for m in $mods; do
        cp "$kdir/lib/modules/$kver/$m" "$ir/mods/"
        basename "$m" >>"$ir/mods/order"
    done
    cat >"$ir/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
/bin/busybox --install -s /sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in \$(cat /mods/order); do
    case \$m in *.xz) xz -dc /mods/\$m > /tmp.ko 2>/dev/null || unxz -c /mods/\$m > /tmp.ko; insmod /tmp.ko ;; *) insmod /mods/\$m ;; esac
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host || { echo FTERROR 9p; poweroff -f; }
mount --bind /host$kdir/lib/modules/$kver /lib/modules/$kver
echo /sbin/modprobe > /proc/sys/kernel/modprobe
H=/host
mount -t tmpfs tmpfs \$H/tmp
mount -t tmpfs tmpfs \$H/run
mount -t proc proc \$H/proc
mount -t sysfs sys \$H/sys
mount -t devtmpfs dev \$H/dev
mkdir -p \$H/dev/pts \$H/dev/shm
mount -t devpts devpts \$H/dev/pts
mount -t tmpfs tmpfs \$H/dev/shm
mount -t bpf bpf \$H/sys/fs/bpf
mount -t tracefs tracefs \$H/sys/kernel/tracing 2>/dev/null
mount -t tmpfs tmpfs \$H/lib/modules
mkdir -p \$H/lib/modules/$kver
mount --bind /lib/modules/$kver \$H/lib/modules/$kver
ip link set lo up 2>/dev/null
echo "FTBOOT \$(uname -r) \$(nproc) CPUs"
for m in veth tun nf_conntrack nf_tables nft_ct nft_nat nft_chain_nat nf_nat sch_ingress cls_bpf ipv6; do
    modprobe \$m 2>/dev/null
done
chroot \$H /bin/sh -c 'FLOWTEL_TEST_MB=$MB FLOWTEL_TEST_SLOW=6 HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin $WORK/checks.sh'
echo FTDONE
poweroff -f
EOF
    chmod +x "$ir/init"
    (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
}

run_guest() { # package
    local pkg=$1 dir kver vmlinuz log start
    dir="$CACHE/$pkg"
    if [ ! -d "$dir/lib/modules" ]; then
        (cd "$CACHE" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
        mkdir -p "$dir"
        dpkg-deb -x "$CACHE/${pkg}"_*.deb "$dir"
    fi
    kver=$(ls "$dir/lib/modules" | head -n 1)
    [ -f "$dir/lib/modules/$kver/modules.dep" ] || depmod -b "$dir" "$kver"
    vmlinuz="$dir/boot/vmlinuz-$kver"
    [ -f "$vmlinuz" ] || die "no $vmlinuz in $pkg"
    local k="$kver (qemu)"
    kernels+=("$k")
    echo "== $k" >&2
    initramfs "$dir" "$kver" "$WORK/initramfs-$kver.gz"
    log="$WORK/guest-$kver.log"
    start=$(date +%s)
    local attempt pid waited
    for attempt in 1 2; do
        timeout "$GUEST_TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m 2048 \
            -nographic -no-reboot -kernel "$vmlinuz" -initrd "$WORK/initramfs-$kver.gz" \
            -append "console=ttyS0 panic=-1 quiet" \
            -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on \
            </dev/null >"$log" 2>&1 &
        pid=$!
        # An emulated SMP boot on a loaded host sometimes stalls before init
        # (RCU stall, soft lockup): give it BOOT_WAIT s, then boot again.
        waited=0
        while kill -0 "$pid" 2>/dev/null && ! grep -q FTBOOT "$log" && [ "$waited" -lt "${BOOT_WAIT:-240}" ]; do
            sleep 2
            waited=$((waited + 2))
        done
        if grep -q FTBOOT "$log"; then
            wait "$pid" || true
            break
        fi
        echo "guest $kver did not boot within ${BOOT_WAIT:-240} s (attempt $attempt)" >&2
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    tr -d '\r' <"$log" >"$log.txt"
    echo "guest $kver: $(( $(date +%s) - start )) s, $(grep -m1 '^FTBOOT' "$log.txt" || echo 'did not boot')" >&2
    grep -q '^FTDONE' "$log.txt" || { echo "guest $kver did not finish; its console:" >&2; tail -n 30 "$log.txt" >&2; }
    cp "$log.txt" "$CACHE/last-$kver.log"
    record "$k" "$(grep '^FT' "$log.txt" || true)"
}

for pkg in $KERNELS; do
    run_guest "$pkg"
done
run_host

echo
printf '%-28s' kernel
for check in $CHECKS; do printf '%-14s' "$check"; done
echo
for k in "${kernels[@]}"; do
    printf '%-28s' "$k"
    for check in $CHECKS; do printf '%-14s' "${result[$k,$check]:-missing}"; done
    echo
done
