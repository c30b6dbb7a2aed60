#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and integration tests
# (real conntrack, network namespaces, a real OTLP collector). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# shellcheck source=scripts/env.sh
. scripts/env.sh
cargo fmt --all -- --check
# The manifests in deploy/ against the Kubernetes 1.33 schemas.
"$TOOLS_DIR/venv/bin/kubernetes-validate" --strict -k 1.33.0 deploy/*.yaml deploy/manifests/*.yaml
cargo clippy --locked --all-targets -- -D warnings
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --locked --all-targets 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ {p += $4; f += $6; i += $8} END {printf "%d passed, %d failed, %d skipped\n", p, f, i}' "$log"
