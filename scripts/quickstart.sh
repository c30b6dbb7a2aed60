#!/usr/bin/env bash
# Installs what is needed, builds flowtel and runs it on this host. With no
# collector configured it prints this host's flows in the terminal; set
# OTEL_EXPORTER_OTLP_ENDPOINT (or pass --endpoint) to ship OTLP instead.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# shellcheck source=scripts/env.sh
. scripts/env.sh
cargo build --release --locked --quiet
exec "$CARGO_TARGET_DIR/release/flowtel" run --conntrack-ensure-tracking "$@"
