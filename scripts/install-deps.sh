#!/usr/bin/env bash
# Installs what flowtel needs to build, run and be tested on Debian/Ubuntu.
# Idempotent and quick when everything is already there. Run as root.
set -euo pipefail

TOOLS_DIR="${TOOLS_DIR:-/opt/flowtel-tools}"
# softflowd (about 160 KiB plus libpcap) is the libpcap peer of bench/ebpf_overhead.sh.
# pmacct, the other one, is left out: it pulls in MariaDB, PostgreSQL, Kafka and
# ZeroMQ client libraries (the benchmark says how to install it).
PACKAGES=(clang llvm libbpf-dev bpftool conntrack iperf3 nftables iproute2 procps util-linux
          prometheus python3-venv ca-certificates softflowd)

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (it installs Debian packages and loads kernel modules)" >&2
  exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
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

# conntrack must be loaded for the conntrack source.
modprobe nf_conntrack 2>/dev/null || true

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: no Rust toolchain found. Install one with rustup (https://rustup.rs), then run this again." >&2
  exit 1
fi
