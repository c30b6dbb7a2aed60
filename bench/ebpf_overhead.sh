#!/usr/bin/env bash
# Overhead benchmark: what flowtel's eBPF source costs the traffic it counts,
# side by side with no agent and with libpcap-based NetFlow exporters from
# Debian (softflowd, pmacctd with the nfprobe plugin only).
#
# As root: creates two network namespaces joined by a veth pair (sender and
# receiver), then in ROUNDS rounds, with the order of the scenarios rotated
# each round, runs
#   no agent
#   flowtel run, source ebpf, attached (ebpf.netns) to the sender's veth,
#     interval 10 s, exporting OTLP to a local rotel collector that discards
#     everything (or exporting nowhere when rotel is not installed)
#   softflowd -i <sender veth>, NetFlow v9 to a local UDP sink
#   pmacctd, nfprobe plugin only, on the same veth, NetFlow v9 to the sink
# and under each scenario three kinds of iperf3 TCP traffic, DURATION s each:
#   1 flow, unlimited            -> throughput
#   1000 flows, unlimited        -> throughput (iperf3 allows at most 128
#                                   streams a process, so 8 client/server
#                                   pairs of -P 125 run at once)
#   10 flows at RATE_GBIT total  -> CPU at the same traffic for every scenario
# Then, separately, flowtel alone with ACTIVE_FLOWS UDP flows kept active
# (each sends one datagram a second and is echoed back), to measure its
# userspace CPU with that many flows and a 10 s interval.
#
# Measured per run: iperf3's received throughput; the whole machine's busy
# CPU time from /proc/stat; the agent's utime+stime (its process and its
# children) from /proc/PID/stat. The throughput and CPU runs are made with
# kernel.bpf_stats_enabled=0: the statistics read the clock twice for every
# program run, which on this VM costs about 100 ns a run, as much as the TC
# program itself. The run time of flowtel's programs is then measured in a
# separate pass, one run of each traffic kind with the statistics on, and in
# the many-flows window (restored to its old value on exit). The table
# shows medians. Everything it created is removed on exit, also on failure or
# Ctrl-C.
#
# Usage: sudo bench/ebpf_overhead.sh
# Environment: ROUNDS (default 3), DURATION (seconds per iperf3 run,
#   default 10), RATE_GBIT (total for the fixed-rate runs, default 5),
#   ACTIVE_FLOWS (multiple of 100, default 10000), ACTIVE_SECONDS (window for
#   the many-flows run, default 30, at least 30), PEERS (libpcap peers to run,
#   default: those installed of "softflowd pmacctd"), BPF_STATS (1 default; 0
#   skips the run-time pass and shows no BPF column figures),
#   QUIET_PCT and QUIET_WAIT (before each run, wait at most QUIET_WAIT s,
#   default 180, for the machine to be below QUIET_PCT % busy, default 10,
#   so that another build or test run does not land in the figures),
#   FOREIGN_PCT and RETRIES (a run during which processes not started by this
#   script used more than FOREIGN_PCT % of the machine, default 3, is
#   repeated up to RETRIES times, default 2),
#   BENCH_BIN (a prebuilt binary; default: cargo build --release),
#   CARGO_TARGET_DIR (as usual; scripts/env.sh supplies the default).
# With the defaults a run takes about 10 minutes with both peers installed.
#
# Throughput on 2 vCPUs varies by +-30 % between runs: raise ROUNDS for
# tighter medians, and do not run it while something else is compiling.
set -euo pipefail
export LC_ALL=C

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
RATE_GBIT=${RATE_GBIT:-5}
ACTIVE_FLOWS=${ACTIVE_FLOWS:-10000}
QUIET_PCT=${QUIET_PCT:-10}
QUIET_WAIT=${QUIET_WAIT:-180}
FOREIGN_PCT=${FOREIGN_PCT:-3}
RETRIES=${RETRIES:-2}
ACTIVE_SECONDS=${ACTIVE_SECONDS:-30}
BPF_STATS=${BPF_STATS:-1}
MANY_FLOWS=1000
MANY_CLIENTS=8 # 8 x 125 streams; iperf3 3.x refuses -P above 128
RATE_FLOWS=10
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    echo "ebpf_overhead.sh: $*" >&2
    exit 1
}
note() { echo "ebpf_overhead.sh: $*" >&2; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it creates network namespaces and loads eBPF programs)"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "ROUNDS must be a positive number"
[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 3 ]] || die "DURATION must be a number of seconds >= 3"
[[ $RATE_GBIT =~ ^[0-9]+$ && $RATE_GBIT -ge 1 ]] || die "RATE_GBIT must be a whole number of Gbit/s >= 1"
[[ $ACTIVE_FLOWS =~ ^[0-9]+$ && $ACTIVE_FLOWS -ge 100 && $((ACTIVE_FLOWS % 100)) -eq 0 ]] ||
    die "ACTIVE_FLOWS must be a multiple of 100"
[[ $ACTIVE_SECONDS =~ ^[0-9]+$ && $ACTIVE_SECONDS -ge 30 ]] || die "ACTIVE_SECONDS must be at least 30"
[[ $BPF_STATS == [01] ]] || die "BPF_STATS must be 0 or 1"
for v in QUIET_PCT QUIET_WAIT FOREIGN_PCT RETRIES; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done

missing=()
for tool in ip iperf3 python3 bpftool sysctl ps curl timeout; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    die "missing: ${missing[*]}; on Debian: apt-get install iperf3 iproute2 python3 bpftool procps curl coreutils"
fi

# The libpcap peers. softflowd is in scripts/install-test-deps.sh; pmacct is not
# (it pulls in MariaDB, PostgreSQL, Kafka and ZeroMQ client libraries).
if [[ -z ${PEERS+set} ]]; then
    PEERS=
    command -v softflowd >/dev/null && PEERS+="softflowd "
    command -v pmacctd >/dev/null && PEERS+="pmacctd "
    [[ -n $PEERS ]] || die "no libpcap flow exporter to compare with; install one or both: apt-get install --no-install-recommends softflowd pmacct"
    command -v pmacctd >/dev/null || note "pmacctd is not installed, so only softflowd is compared (apt-get install --no-install-recommends pmacct to add it)"
fi
read -r -a PEER_LIST <<<"$PEERS"
for p in "${PEER_LIST[@]}"; do
    case $p in
    softflowd) command -v softflowd >/dev/null || die "PEERS names softflowd, which is not installed: apt-get install softflowd" ;;
    pmacctd) command -v pmacctd >/dev/null || die "PEERS names pmacctd, which is not installed: apt-get install --no-install-recommends pmacct" ;;
    *) die "unknown peer \`$p\` in PEERS (softflowd, pmacctd)" ;;
    esac
done

# shellcheck source=/dev/null # scripts/env.sh
source "$ROOT/scripts/env.sh"

# --- flowtel -------------------------------------------------------------------------
BUILT_FROM=
if [[ -n ${BENCH_BIN:-} ]]; then
    BIN=$BENCH_BIN
else
    note "building flowtel (release) in $CARGO_TARGET_DIR ..."
    (cd "$ROOT" && cargo build --quiet --release)
    BIN=$CARGO_TARGET_DIR/release/flowtel
    BUILT_FROM="built from $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo "an unknown revision")"
fi
BUILT_FROM=${BUILT_FROM:-"binary $BIN"}
[[ -x $BIN ]] || die "no flowtel binary at $BIN"

# --- state and cleanup -----------------------------------------------------------------
ID=$$
NS_SND=ftbench-$ID-snd
NS_RCV=ftbench-$ID-rcv
IF_SND=ftbs$ID
IF_RCV=ftbr$ID
ADDR_SND=198.18.77.1
ADDR_RCV=198.18.77.2
WORK=$(mktemp -d /tmp/flowtel-ebpf-bench.XXXXXX)
SAVED_BPF_STATS=
AGENT_PID=
PIDS=() # long-lived helpers: iperf3 servers, sinks, rotel, generators

kill_wait() { # kill_wait PID...: TERM, then KILL after 10 s
    local p i
    for p in "$@"; do
        kill -TERM "$p" 2>/dev/null || continue
        for i in $(seq 1 100); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
}

cleanup() {
    local rc=$?
    set +e
    [[ -n $AGENT_PID ]] && kill_wait "$AGENT_PID"
    ((${#PIDS[@]})) && kill_wait "${PIDS[@]}"
    ip netns del "$NS_SND" 2>/dev/null
    ip netns del "$NS_RCV" 2>/dev/null
    if [[ -n $SAVED_BPF_STATS ]]; then
        sysctl -qw kernel.bpf_stats_enabled="$SAVED_BPF_STATS" &&
            echo "restored kernel.bpf_stats_enabled=$SAVED_BPF_STATS" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# A private copy, so that a build elsewhere cannot swap the binary mid-run.
cp "$BIN" "$WORK/flowtel"
BIN=$WORK/flowtel

# Background processes are started with `ip netns exec` directly (it execs,
# so $! is the process itself and can be killed by its PID).

listening() { # listening NAMESPACE|"" PORT: is a TCP socket listening there?
    if [[ -n $1 ]]; then
        ip netns exec "$1" ss -Htln "sport = :$2" | grep -q .
    else
        ss -Htln "sport = :$2" | grep -q .
    fi
}

free_port() { # a free TCP port on 127.0.0.1 of the root namespace
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # wait_for SECONDS DESCRIPTION LOG COMMAND...: poll until COMMAND succeeds
    local secs=$1 what=$2 log=$3 i
    shift 3
    for i in $(seq 1 $((secs * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    [[ -n $log ]] && tail -n 5 "$log" >&2
    die "timed out after ${secs} s waiting for $what"
}

# --- namespaces, servers, sinks --------------------------------------------------------
ip netns add "$NS_SND"
ip netns add "$NS_RCV"
ip link add "$IF_SND" netns "$NS_SND" type veth peer name "$IF_RCV" netns "$NS_RCV"
ip -n "$NS_SND" addr add "$ADDR_SND/30" dev "$IF_SND"
ip -n "$NS_RCV" addr add "$ADDR_RCV/30" dev "$IF_RCV"
for ns in "$NS_SND" "$NS_RCV"; do
    ip -n "$ns" link set lo up
done
ip -n "$NS_SND" link set "$IF_SND" up
ip -n "$NS_RCV" link set "$IF_RCV" up

# One iperf3 server per port: 3.x serves one test at a time per process.
IPERF_BASE=5201
for i in $(seq 0 $((MANY_CLIENTS - 1))); do
    ip netns exec "$NS_RCV" iperf3 -s -p $((IPERF_BASE + i)) >"$WORK/iperf3-server-$i.log" 2>&1 &
    PIDS+=("$!")
done

# NetFlow sink for the libpcap peers: counts datagrams, drops them.
cat >"$WORK/sink.py" <<'PY'
import signal, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
n = nbytes = 0
def done(*_):
    with open(sys.argv[2], "w") as f:
        f.write(f"{n} {nbytes}\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    d = s.recv(65535)
    n += 1
    nbytes += len(d)
PY
NETFLOW_PORT=2055
ip netns exec "$NS_SND" python3 "$WORK/sink.py" "$NETFLOW_PORT" "$WORK/sink.count" &
SINK_PID=$!
PIDS+=("$SINK_PID")

# OTLP sink for flowtel: rotel (a real collector) with its blackhole exporter.
EXPORT_DESC="no OTLP endpoint, console off (nothing exported)"
OTLP_ENDPOINT=
if [[ -n ${ROTEL_AGENT:-} && -x ${ROTEL_AGENT:-} ]]; then
    grpc_port=$(free_port)
    http_port=$(free_port)
    "$ROTEL_AGENT" start --otlp-grpc-endpoint "127.0.0.1:$grpc_port" --otlp-http-endpoint "127.0.0.1:$http_port" \
        --exporter blackhole --log-file "$WORK/rotel.log" --pid-file "$WORK/rotel.pid" >"$WORK/rotel.out" 2>&1 &
    PIDS+=("$!")
    wait_for 20 "rotel on 127.0.0.1:$grpc_port" "$WORK/rotel.log" listening "" "$grpc_port"
    OTLP_ENDPOINT=http://127.0.0.1:$grpc_port
    EXPORT_DESC="OTLP gRPC+gzip to a local rotel collector (blackhole exporter)"
else
    note "rotel is not installed (scripts/install-test-deps.sh installs it): flowtel will export nowhere"
fi
for i in $(seq 0 $((MANY_CLIENTS - 1))); do
    wait_for 10 "iperf3 server $i" "$WORK/iperf3-server-$i.log" listening "$NS_RCV" $((IPERF_BASE + i))
done

SAVED_BPF_STATS=$(sysctl -n kernel.bpf_stats_enabled)
sysctl -qw kernel.bpf_stats_enabled=0

# --- measuring helpers -----------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)

# Machine CPU as "busy_us total_us" counters (differences give the busy and
# the elapsed CPU time of all CPUs). This kernel accounts user and system time
# by sampling at the tick, and traffic paced by timers (iperf3 -b) can run
# between ticks and be missed; idle time, though, is measured exactly on a
# tickless kernel. So busy = CPUs x wall time - idle - iowait.
machine_us() {
    local now=${EPOCHREALTIME/./} _cpu i w
    read -r _cpu _ _ _ i w _ </proc/stat
    local total=$((now * NCPU)) idle=$(((i + w) * 1000000 / CLK_TCK))
    echo "$((total - idle)) $total"
}

tree_pids() { # PID and all its descendants
    local c
    echo "$1"
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        tree_pids "$c"
    done
}

proc_ticks() { # utime+stime of PID and its descendants, in clock ticks
    local sum=0 p line
    local -a f
    for p in $(tree_pids "$1"); do
        line=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        read -r -a f <<<"${line##*) }"
        sum=$((sum + f[11] + f[12]))
    done
    echo "$sum"
}

FT_PROGS=()
bpf_ns() { # total run_time_ns of flowtel's programs (0 without stats)
    local sum=0 id t
    for id in "${FT_PROGS[@]}"; do
        t=$(bpftool prog show id "$id" 2>/dev/null | grep -o 'run_time_ns [0-9]*' | cut -d' ' -f2) || t=0
        sum=$((sum + ${t:-0}))
    done
    echo "$sum"
}

others_compiling() { pgrep -c -x rustc 2>/dev/null || true; }

# CPU used by processes that are not this script's (other sessions' builds
# and tests) during a run: snapshot before, compare after. Kernel threads are
# left out (ksoftirqd does the benchmark's own packet work). A process new at
# the end counts in full; a foreign parent's cutime counts what it reaped.
cat >"$WORK/procsnap.py" <<'PY'
import json, os, sys
def snap(root):
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                line = f.read()
        except OSError:
            continue
        comm = line[line.index("(") + 1:line.rindex(")")]
        f = line[line.rindex(")") + 2:].split()
        procs[d] = (int(f[1]), comm, int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]), int(f[19]))
    ours, grew = {str(root)}, True
    while grew:
        grew = False
        for pid, (ppid, *_rest) in procs.items():
            if pid not in ours and str(ppid) in ours:
                ours.add(pid)
                grew = True
    return {pid: p for pid, p in procs.items() if pid not in ours and p[0] != 2 and pid != "2"}
if sys.argv[1] == "snap":
    json.dump(snap(int(sys.argv[2])), open(sys.argv[3], "w"))
else:  # diff BEFORE ROOT: prints foreign ticks and the busiest names
    before, after = json.load(open(sys.argv[2])), snap(int(sys.argv[3]))
    used = {}
    for pid, (ppid, comm, t, start) in after.items():
        b = before.get(pid)
        d = t - b[2] if b and b[3] == start else t
        if d > 0:
            used[comm] = used.get(comm, 0) + d
    top = sorted(used.items(), key=lambda kv: -kv[1])[:3]
    print(sum(used.values()), ",".join(f"{c}:{t}" for c, t in top) or "-")
PY

# Before each run: wait (at most QUIET_WAIT s) until the machine has been
# below QUIET_PCT % busy for one second, so another session's build or tests
# do not land in the figures. Sets QUIET_LAST to the last one-second busy %.
QUIET_WAITED=0
QUIET_LAST=
quiet() {
    local start=$SECONDS m0 m1 pct
    while :; do
        m0=$(machine_us)
        sleep 1
        m1=$(machine_us)
        pct=$(((${m1% *} - ${m0% *}) * 100 / (${m1#* } - ${m0#* } + 1)))
        if ((pct < QUIET_PCT)); then
            break
        fi
        if ((SECONDS - start >= QUIET_WAIT)); then
            note "  the machine is still ${pct} % busy after ${QUIET_WAIT} s; measuring anyway"
            break
        fi
        ((SECONDS - start > 1)) || note "  machine ${pct} % busy (rustc processes: $(others_compiling)); waiting up to ${QUIET_WAIT} s for it to calm down"
    done
    QUIET_WAITED=$((QUIET_WAITED + SECONDS - start - 1))
    QUIET_LAST=$pct
}

# --- agents ----------------------------------------------------------------------------
started_or_gone() { # started_or_gone PID LOG PATTERN
    grep -q "$3" "$2" || ! kill -0 "$1" 2>/dev/null
}

FT_HEALTH=
start_agent() { # start_agent SCENARIO: sets AGENT_PID (empty for none)
    local scen=$1 log=$WORK/agent-$1.log
    AGENT_PID=
    FT_PROGS=()
    case $scen in
    none) return 0 ;;
    flowtel)
        cat >"$WORK/flowtel.yaml" <<EOF
source: ebpf
interval: 10s
ebpf:
  netns: /var/run/netns/$NS_SND
export:
  console:
    mode: never
  otlp:
    endpoint: "$OTLP_ENDPOINT"
health:
  listen: 127.0.0.1:0
EOF
        # Only the file configures it: FLOWTEL_* and OTEL_* variables would too.
        local unset=() v
        for v in $(compgen -e); do
            [[ $v == FLOWTEL_* || $v == OTEL_* ]] && unset+=(-u "$v")
        done
        env "${unset[@]}" "$BIN" run --config "$WORK/flowtel.yaml" >"$log" 2>&1 &
        AGENT_PID=$!
        wait_for 30 "flowtel to attach" "$log" started_or_gone "$AGENT_PID" "$log" "eBPF source started"
        kill -0 "$AGENT_PID" 2>/dev/null || die "flowtel exited at start: $(tail -n 5 "$log")"
        FT_HEALTH=$(grep -o 'health checks on http://[0-9.:]*' "$log" | head -n 1 | cut -d' ' -f4)
        mapfile -t FT_PROGS < <(grep -h '^prog_id:' /proc/"$AGENT_PID"/fdinfo/* 2>/dev/null | awk '{ print $2 }' | sort -u)
        ((${#FT_PROGS[@]})) || die "found no eBPF program among flowtel's file descriptors"
        ;;
    softflowd)
        ip netns exec "$NS_SND" softflowd -i "$IF_SND" -n "127.0.0.1:$NETFLOW_PORT" -v 9 -m 65536 -N -d \
            -t maxlife=10 -t expint=10 -p "$WORK/softflowd.pid" -c "$WORK/softflowd.ctl" >"$log" 2>&1 &
        AGENT_PID=$!
        wait_for 10 "softflowd's control socket" "$log" bash -c "[[ -S $WORK/softflowd.ctl ]] || ! kill -0 $AGENT_PID"
        ;;
    pmacctd)
        cat >"$WORK/pmacctd.conf" <<EOF
daemonize: false
promisc: false
pcap_interface: $IF_SND
pidfile: $WORK/pmacctd.pid
logfile: $log.pmacct
plugins: nfprobe
nfprobe_receiver: 127.0.0.1:$NETFLOW_PORT
nfprobe_version: 9
nfprobe_maxflows: 65536
nfprobe_timeouts: maxlife=10:expint=10:tcp.fin=10:tcp.rst=10
EOF
        ip netns exec "$NS_SND" pmacctd -f "$WORK/pmacctd.conf" >"$log" 2>&1 &
        AGENT_PID=$!
        # Ready once the core process has forked its plugin.
        wait_for 15 "pmacctd's nfprobe plugin" "$log.pmacct" \
            bash -c "[[ -n \$(ps -o pid= --ppid $AGENT_PID) ]] || ! kill -0 $AGENT_PID"
        sleep 1
        ;;
    esac
    kill -0 "$AGENT_PID" 2>/dev/null || die "$scen exited at start: $(tail -n 5 "$log" "$log.pmacct" 2>/dev/null)"
}

FT_READYZ=
stop_agent() {
    [[ -n $AGENT_PID ]] || return 0
    if [[ -n $FT_HEALTH ]]; then
        FT_READYZ=$(curl -s "$FT_HEALTH/readyz" || true)
        FT_HEALTH=
    fi
    kill_wait "$AGENT_PID"
    AGENT_PID=
}

# --- traffic ---------------------------------------------------------------------------
# Results: R[scenario|pattern|metric] = "v1 v2 ..." (one value a round).
declare -A R
DISTURBED=0
KEPT_DISTURBED=0
RUNS=0
STATS_ON=0

# run_traffic PATTERN: iperf3 clients in the sender namespace; prints
# "bytes gbit_per_s" summed over the clients.
run_traffic() {
    local pattern=$1 i pids=() files=()
    rm -f "$WORK"/client-*.json
    case $pattern in
    one)
        timeout $((DURATION + 60)) ip netns exec "$NS_SND" iperf3 -c "$ADDR_RCV" -p $IPERF_BASE -t "$DURATION" -P 1 -J \
            >"$WORK/client-0.json" 2>&1 &
        pids+=("$!")
        ;;
    many)
        for i in $(seq 0 $((MANY_CLIENTS - 1))); do
            timeout $((DURATION + 60)) ip netns exec "$NS_SND" iperf3 -c "$ADDR_RCV" -p $((IPERF_BASE + i)) -t "$DURATION" \
                -P $((MANY_FLOWS / MANY_CLIENTS)) -J >"$WORK/client-$i.json" 2>&1 &
            pids+=("$!")
        done
        ;;
    rate)
        timeout $((DURATION + 60)) ip netns exec "$NS_SND" iperf3 -c "$ADDR_RCV" -p $IPERF_BASE -t "$DURATION" \
            -P $RATE_FLOWS -b "$((RATE_GBIT * 1000 / RATE_FLOWS))M" -J >"$WORK/client-0.json" 2>&1 &
        pids+=("$!")
        ;;
    esac
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || die "iperf3 client $i ($pattern) failed: $(grep -m1 '"error"' "$WORK/client-$i.json" || tail -n 3 "$WORK/client-$i.json")"
    done
    files=("$WORK"/client-*.json)
    python3 - "${files[@]}" <<'PY'
import json, sys
nbytes = bps = 0
for path in sys.argv[1:]:
    with open(path) as f:
        end = json.load(f)["end"]
    nbytes += end["sum_received"]["bytes"]
    bps += end["sum_received"]["bits_per_second"]
print(nbytes, bps / 1e9)
PY
}

measure() { # measure SCENARIO PATTERN: one run, repeated while disturbed
    local scen=$1 pat=$2 m0 m1 a0=0 a1=0 t0 t1 out nbytes gbps busy total foreign top attempt
    for attempt in $(seq 0 "$RETRIES"); do
        quiet
        if [[ -n $AGENT_PID ]] && ! kill -0 "$AGENT_PID" 2>/dev/null; then
            die "$scen died: $(tail -n 5 "$WORK/agent-$scen.log")"
        fi
        python3 "$WORK/procsnap.py" snap $$ "$WORK/snap.json"
        [[ -n $AGENT_PID ]] && a0=$(proc_ticks "$AGENT_PID")
        m0=$(machine_us)
        t0=${EPOCHREALTIME/./}
        out=$(run_traffic "$pat")
        t1=${EPOCHREALTIME/./}
        m1=$(machine_us)
        [[ -n $AGENT_PID ]] && a1=$(proc_ticks "$AGENT_PID")
        read -r foreign top < <(python3 "$WORK/procsnap.py" diff "$WORK/snap.json" $$)
        busy=$((${m1% *} - ${m0% *}))
        total=$((${m1#* } - ${m0#* }))
        # Foreign CPU in % of the machine over the run.
        foreign=$((foreign * 100000000 / CLK_TCK / total))
        ((foreign <= FOREIGN_PCT)) && break
        DISTURBED=$((DISTURBED + 1))
        if ((attempt < RETRIES)); then
            note "  $scen $pat: other processes used $foreign % of the machine during the run ($top ticks); repeating it"
        else
            note "  $scen $pat: other processes used $foreign % of the machine during the run ($top ticks); keeping it after $RETRIES repeats"
            KEPT_DISTURBED=$((KEPT_DISTURBED + 1))
        fi
    done
    read -r nbytes gbps <<<"$out"
    RUNS=$((RUNS + 1))
    R[$scen|$pat|background]+="$QUIET_LAST "
    if [[ $(sysctl -n kernel.bpf_stats_enabled) != 0 ]]; then
        # Someone else switched the statistics on during the run.
        STATS_ON=$((STATS_ON + 1))
        sysctl -qw kernel.bpf_stats_enabled=0
    fi
    local k="$scen|$pat"
    R[$k|gbps]+="$gbps "
    R[$k|machine]+="$(awk -v b="$busy" -v t="$total" 'BEGIN { printf "%.2f", 100 * b / t }') "
    R[$k|cpu_per_gb]+="$(awk -v b="$busy" -v n="$nbytes" 'BEGIN { printf "%.4f", (b / 1e6) / (n / 1e9) }') "
    R[$k|agent]+="$(awk -v a=$((a1 - a0)) -v hz="$CLK_TCK" -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", 100 * (a / hz) / (us / 1e6) }') "
    note "  $scen $pat: $(awk -v g="$gbps" 'BEGIN { printf "%.2f", g }') Gbit/s, machine $(awk -v b="$busy" -v t="$total" 'BEGIN { printf "%.0f", 100 * b / t }') %, agent $((a1 - a0)) ticks"
}

measure_bpf() { # measure_bpf PATTERN: run time of flowtel's programs, statistics on
    local pat=$1 b0 b1 t0 t1
    quiet
    b0=$(bpf_ns)
    t0=${EPOCHREALTIME/./}
    run_traffic "$pat" >/dev/null
    t1=${EPOCHREALTIME/./}
    b1=$(bpf_ns)
    R[flowtel|$pat|bpf]="$(awk -v ns=$((b1 - b0)) -v us=$((t1 - t0)) 'BEGIN { printf "%.4f", 100 * ns / (us * 1000) }')"
    note "  flowtel $pat, statistics on: bpf $(((b1 - b0) / 1000000)) ms"
}

SCENARIOS=(none flowtel "${PEER_LIST[@]}")
PATTERNS=(one many rate)
note "namespaces $NS_SND / $NS_RCV, veth $IF_SND <-> $IF_RCV; scenarios: ${SCENARIOS[*]}; $ROUNDS rounds of ${#PATTERNS[@]} x ${DURATION} s each"
for round in $(seq 1 "$ROUNDS"); do
    n=${#SCENARIOS[@]}
    for j in $(seq 0 $((n - 1))); do
        scen=${SCENARIOS[$(((j + round - 1) % n))]}
        note "round $round/$ROUNDS: $scen"
        start_agent "$scen"
        for pat in "${PATTERNS[@]}"; do
            measure "$scen" "$pat"
            sleep 1
        done
        stop_agent
    done
done
READYZ_TCP=$FT_READYZ

if ((BPF_STATS)); then
    note "run time of flowtel's programs: one run of each traffic kind with kernel.bpf_stats_enabled=1"
    sysctl -qw kernel.bpf_stats_enabled=1
    start_agent flowtel
    for pat in "${PATTERNS[@]}"; do
        measure_bpf "$pat"
        sleep 1
    done
    stop_agent
fi

# --- flowtel with ACTIVE_FLOWS active UDP flows ----------------------------------------
# 100 sender sockets x ACTIVE_FLOWS/100 server ports: ACTIVE_FLOWS distinct
# 5-tuples (and, with the default key, 2 x ACTIVE_FLOWS/100 series). Each flow
# sends one 64-byte datagram a second; the receiver echoes it back, so every
# flow has both directions.
cat >"$WORK/udp_echo.py" <<'PY'
import selectors, socket, sys
addr, base, nports = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sel = selectors.DefaultSelector()
for p in range(base, base + nports):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, p))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        while True:
            try:
                data, peer = s.recvfrom(2048)
            except BlockingIOError:
                break
            s.sendto(data, peer)
PY
cat >"$WORK/udp_flows.py" <<'PY'
import socket, sys, time
src, dst, base, nports = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
socks = []
for i in range(100):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # replies are dropped here, after TC
    s.bind((src, 20000 + i))
    socks.append(s)
payload = b"f" * 64
dests = [(dst, p) for p in range(base, base + nports)]
next_t = time.monotonic()
while True:
    for s in socks:
        for d in dests:
            s.sendto(payload, d)
    next_t += 1.0
    time.sleep(max(0.0, next_t - time.monotonic()))
PY
UDP_BASE=30000
UDP_PORTS=$((ACTIVE_FLOWS / 100))
note "flowtel with $ACTIVE_FLOWS active UDP flows: warming up, then measuring ${ACTIVE_SECONDS} s ..."
ip netns exec "$NS_RCV" python3 "$WORK/udp_echo.py" "$ADDR_RCV" "$UDP_BASE" "$UDP_PORTS" &
PIDS+=("$!")
ECHO_PID=$!
sleep 0.5
start_agent flowtel
ip netns exec "$NS_SND" python3 "$WORK/udp_flows.py" "$ADDR_SND" "$ADDR_RCV" "$UDP_BASE" "$UDP_PORTS" &
PIDS+=("$!")
GEN_PID=$!

readyz_field() { # readyz_field JSON FIELD
    python3 -c 'import json, sys; print(json.loads(sys.argv[1])["stats"][sys.argv[2]])' "$1" "$2" 2>/dev/null || echo "?"
}
# Warm up: two dumps, so the first interval (every flow new) is not measured.
for _ in $(seq 1 60); do
    rz=$(curl -s "$FT_HEALTH/readyz" || true)
    [[ $(readyz_field "$rz" dumps) =~ ^[0-9]+$ ]] && (($(readyz_field "$rz" dumps) >= 2)) && break
    sleep 1
done
for attempt in $(seq 0 "$RETRIES"); do
    quiet
    python3 "$WORK/procsnap.py" snap $$ "$WORK/snap.json"
    b0=$(bpf_ns)
    a0=$(proc_ticks "$AGENT_PID")
    g0=$(($(proc_ticks "$GEN_PID") + $(proc_ticks "$ECHO_PID")))
    m0=$(machine_us)
    t0=${EPOCHREALTIME/./}
    sleep "$ACTIVE_SECONDS"
    t1=${EPOCHREALTIME/./}
    m1=$(machine_us)
    g1=$(($(proc_ticks "$GEN_PID") + $(proc_ticks "$ECHO_PID")))
    a1=$(proc_ticks "$AGENT_PID")
    b1=$(bpf_ns)
    read -r foreign top < <(python3 "$WORK/procsnap.py" diff "$WORK/snap.json" $$)
    ACTIVE_FOREIGN=$((foreign * 100000000 / CLK_TCK / (${m1#* } - ${m0#* })))
    ((ACTIVE_FOREIGN <= FOREIGN_PCT)) && break
    note "  other processes used $ACTIVE_FOREIGN % of the machine during the window ($top ticks)$( ((attempt < RETRIES)) && echo "; repeating it")"
done
RZ_ACTIVE=$(curl -s "$FT_HEALTH/readyz" || true)
kill -0 "$GEN_PID" 2>/dev/null || die "the UDP flow generator died"
ACTIVE_TRACKED=$(readyz_field "$RZ_ACTIVE" flows_tracked)
ACTIVE_SERIES=$(readyz_field "$RZ_ACTIVE" series_active)
ACTIVE_EXPORTS=$(readyz_field "$RZ_ACTIVE" exports_ok)
ACTIVE_EXPORT_FAIL=$(readyz_field "$RZ_ACTIVE" exports_failed)
ACTIVE_UNTRACKED=$(readyz_field "$RZ_ACTIVE" flows_untracked)
ACTIVE_AGENT=$(awk -v a=$((a1 - a0)) -v hz="$CLK_TCK" -v us=$((t1 - t0)) 'BEGIN { printf "%.2f", 100 * (a / hz) / (us / 1e6) }')
ACTIVE_GEN=$(awk -v a=$((g1 - g0)) -v hz="$CLK_TCK" -v us=$((t1 - t0)) 'BEGIN { printf "%.1f", 100 * (a / hz) / (us / 1e6) }')
ACTIVE_BPF=$(awk -v ns=$((b1 - b0)) -v us=$((t1 - t0)) 'BEGIN { printf "%.3f", 100 * ns / (us * 1000) }')
ACTIVE_MACHINE=$(awk -v b=$((${m1% *} - ${m0% *})) -v t=$((${m1#* } - ${m0#* })) 'BEGIN { printf "%.1f", 100 * b / t }')
stop_agent
kill_wait "$GEN_PID"

# --- the table -----------------------------------------------------------------------
kill_wait "$SINK_PID"
SINK_COUNT=$(cat "$WORK/sink.count" 2>/dev/null || echo "? ?")

median() { # median NUMBERS...
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
med() { # med SCENARIO PATTERN METRIC
    # shellcheck disable=SC2086 # the value lists are meant to split
    median ${R[$1|$2|$3]}
}
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { printf f, v }'; }
loss() { # loss SCENARIO PATTERN: % below no agent
    awk -v a="$(med "$1" "$2" gbps)" -v b="$(med none "$2" gbps)" 'BEGIN { printf "%+.1f %%", -100 * (1 - a / b) }'
}

declare -A NAME=(
    [none]="no agent"
    [flowtel]="flowtel (eBPF TC, $(grep 'eBPF source started' "$WORK/agent-flowtel.log" | grep -o 'mode="[a-z]*"' | head -n 1 | cut -d'"' -f2))"
    [softflowd]="softflowd $(softflowd -h 2>&1 | grep -o 'version [0-9.]*[0-9]' | cut -d' ' -f2) (libpcap)"
    [pmacctd]="pmacctd $(pmacctd -V 2>&1 | grep -o 'pmacctd [0-9.]*' | cut -d' ' -f2) nfprobe (libpcap)"
)
declare -A PAT_FLOWS=(
    [one]="1 TCP"
    [many]="$MANY_FLOWS TCP ($MANY_CLIENTS × iperf3 -P $((MANY_FLOWS / MANY_CLIENTS)))"
    [rate]="$RATE_FLOWS TCP at $RATE_GBIT Gbit/s"
)
declare -A PAT_SHORT=([one]="1 flow" [many]="$MANY_FLOWS flows")
bpf_cell() { # bpf_cell SCENARIO PATTERN
    if [[ $1 != flowtel ]]; then
        echo "–"
    elif ((BPF_STATS)); then
        fmt "$(med "$1" "$2" bpf)" "%.2f %%"
    else
        echo "(not measured)"
    fi
}

iperf_ver=$(iperf3 --version | head -n 1 | cut -d' ' -f2)
{
    echo
    echo "command: ROUNDS=$ROUNDS DURATION=$DURATION RATE_GBIT=$RATE_GBIT ACTIVE_FLOWS=$ACTIVE_FLOWS ACTIVE_SECONDS=$ACTIVE_SECONDS PEERS=\"${PEER_LIST[*]}\" bench/ebpf_overhead.sh"
    echo "machine: kernel $(uname -r), $NCPU CPUs; iperf3 $iperf_ver; veth pair between two namespaces; medians of $ROUNDS rounds, ${DURATION} s per run"
    echo "flowtel: $BUILT_FROM, source ebpf on the sender's veth, interval 10 s, $EXPORT_DESC"
    echo
    echo "| scenario | flows | median Gbit/s | vs no agent | machine CPU (% of $NCPU CPUs) | machine CPU-s per GB | agent process CPU (% of 1 core) | BPF programs (% of 1 core) |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
    for pat in "${PATTERNS[@]}"; do
        for scen in "${SCENARIOS[@]}"; do
            if [[ $scen == none ]]; then
                vs="–"
                agent="–"
            else
                vs=$(loss "$scen" "$pat")
                agent=$(fmt "$(med "$scen" "$pat" agent)" "%.2f %%")
            fi
            echo "| ${NAME[$scen]} | ${PAT_FLOWS[$pat]} | $(fmt "$(med "$scen" "$pat" gbps)" "%.2f") | $vs | $(fmt "$(med "$scen" "$pat" machine)" "%.1f %%") | $(fmt "$(med "$scen" "$pat" cpu_per_gb)" "%.3f") | $agent | $(bpf_cell "$scen" "$pat") |"
        done
    done
    bpf_active="(not measured)"
    ((BPF_STATS)) && bpf_active="$ACTIVE_BPF %"
    echo "| ${NAME[flowtel]}, ${ACTIVE_SECONDS} s window | $ACTIVE_FLOWS UDP, 1 datagram/s each way ($ACTIVE_TRACKED tracked, $ACTIVE_SERIES series) | – | – | $ACTIVE_MACHINE % (of which generator and echo $ACTIVE_GEN % of 1 core) | – | **$ACTIVE_AGENT %** | $bpf_active |"
    echo
    echo "Machine CPU: all CPUs' time over the run minus their idle and iowait time from /proc/stat (exact on a tickless kernel, unlike the tick-sampled user and system figures), so it includes iperf3 itself and all packet processing. On the unlimited runs it is near 100 % whatever the agent: compare CPU-s per GB there, and machine CPU on the fixed-rate runs. Agent process CPU: utime+stime of the agent and its children (pmacctd forks its plugin); the kernel's copying of packets to libpcap and the run time of TC programs are not in it, but are in machine CPU. BPF programs: run_time_ns of all of flowtel's programs (TC and tracepoints) from bpftool, in a separate run of each traffic kind with kernel.bpf_stats_enabled=1; every other column comes from runs with the statistics off, since they add two clock reads to each program run."

    # Targets, computed from the medians above.
    echo
    echo "Targets:"
    for pat in one many; do
        l=$(awk -v a="$(med flowtel "$pat" gbps)" -v b="$(med none "$pat" gbps)" 'BEGIN { printf "%.1f", 100 * (1 - a / b) }')
        verdict=$(awk -v l="$l" 'BEGIN { print (l <= 3 ? "met" : "NOT met") }')
        echo "- throughput loss ≤ 3 % with ${PAT_SHORT[$pat]}: $l % → $verdict"
    done
    for peer in "${PEER_LIST[@]}"; do
        ft_cpu=$(med flowtel rate machine)
        peer_cpu=$(med "$peer" rate machine)
        verdict=$(awk -v f="$ft_cpu" -v p="$peer_cpu" 'BEGIN { print (f < p ? "met" : "NOT met") }')
        echo "- lower machine CPU than $peer at $RATE_GBIT Gbit/s: flowtel $ft_cpu % vs $peer $peer_cpu % → $verdict (CPU-s per GB, 1 000 flows: flowtel $(med flowtel many cpu_per_gb) vs $peer $(med "$peer" many cpu_per_gb))"
    done
    verdict=$(awk -v a="$ACTIVE_AGENT" 'BEGIN { print (a <= 2 ? "met" : "NOT met") }')
    echo "- flowtel userspace ≤ 2 % of one core at $ACTIVE_FLOWS active flows, 10 s interval: $ACTIVE_AGENT % → $verdict"

    echo
    read -r sink_n sink_b <<<"$SINK_COUNT"
    echo "Checks: NetFlow sink received $sink_n datagrams ($sink_b bytes) from the libpcap peers; flowtel /readyz after the last TCP round: $(python3 -c 'import json, sys; s = json.loads(sys.argv[1])["stats"]; print(", ".join(f"{k}={s[k]}" for k in ("dumps", "exports_ok", "exports_failed", "flows_untracked", "events_lost")))' "$READYZ_TCP" 2>/dev/null || echo "?"); at $ACTIVE_FLOWS flows: exports_ok=$ACTIVE_EXPORTS exports_failed=$ACTIVE_EXPORT_FAIL flows_untracked=$ACTIVE_UNTRACKED."
    echo "Other processes (another session's builds or tests): $DISTURBED of $((RUNS + DISTURBED - KEPT_DISTURBED)) iperf3 runs saw them use more than ${FOREIGN_PCT} % of the machine and were repeated; $KEPT_DISTURBED disturbed runs were kept after $RETRIES repeats; during the ${ACTIVE_FLOWS}-flow window they used ${ACTIVE_FOREIGN} %.$( ((STATS_ON)) && echo " kernel.bpf_stats_enabled was switched on by someone else during $STATS_ON runs.")"
    # shellcheck disable=SC2046 # one number a run
    echo "Background before each run (1 s, no traffic): median $(median $(for k in "${!R[@]}"; do [[ $k == *'|background' ]] && echo "${R[$k]}"; done)) % busy; waited ${QUIET_WAITED} s in all for the machine to be below ${QUIET_PCT} %."
}
