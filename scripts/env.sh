# Shared settings for the scripts (sourced, not run).
TOOLS_DIR="${TOOLS_DIR:-/opt/flowtel-tools}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/flowtel-target}"
ROTEL_AGENT="$(find "$TOOLS_DIR/venv/lib" -path '*site-packages/rotel/rotel-agent' -type f 2>/dev/null | head -n 1 || true)"
export ROTEL_AGENT
OTELCOL_CONTRIB="$(find "$TOOLS_DIR/venv/lib" -path '*site-packages/otel_collector/bin/otelcol-contrib_linux_amd64' -type f 2>/dev/null | head -n 1 || true)"
export OTELCOL_CONTRIB
