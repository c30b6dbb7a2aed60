#!/usr/bin/env bash
# Installs what building and running flowtel needs on Debian/Ubuntu: the
# eBPF toolchain (clang, llvm, libbpf headers, bpftool), nftables (for
# --conntrack-ensure-tracking) and the CA bundle (TLS to a collector).
# The test tooling is scripts/install-test-deps.sh's. Idempotent and quick
# when everything is there. Run as root.
set -euo pipefail

PACKAGES=(clang llvm libbpf-dev bpftool nftables ca-certificates)

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

# conntrack must be loaded for the conntrack source.
modprobe nf_conntrack 2>/dev/null || true

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: no Rust toolchain found. Install one with rustup (https://rustup.rs), then run this again." >&2
  exit 1
fi
