#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and integration tests
# (real conntrack, network namespaces, a real OTLP collector). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
# shellcheck source=scripts/env.sh
. scripts/env.sh
cargo fmt --all -- --check
# The manifests in deploy/ against the Kubernetes 1.33 schemas.
"$TOOLS_DIR/venv/bin/kubernetes-validate" --strict -k 1.33.0 deploy/*.yaml deploy/manifests/*.yaml
cargo clippy --locked --all-targets -- -D warnings
log="$(mktemp)"
# A test whose prerequisite is missing says so here (tests/common: skip) and
# returns, which libtest counts as passed; outside CI it is a skip.
TEST_SKIP_LOG="$(mktemp)"
export TEST_SKIP_LOG
trap 'rm -f "$log" "$TEST_SKIP_LOG"' EXIT
status=0
# The release binary goes into the image tests/container.rs builds and runs
# (deploy/image/build.sh); built here, so the test finds it current.
cargo build --locked --release --bin flowtel
cargo test --locked --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line over every test binary (cargo prints one per binary):
# skipped = ignored + skipped at run time, and those are not passed.
runtime_skips="$(grep -c '^SKIPPED ' "$TEST_SKIP_LOG" || true)"
ignored="$(sed -n -e 's/^test \(.*\) \.\.\. ignored, \(.*\)$/  \1: ignored: \2/p' \
  -e 's/^test \(.*\) \.\.\. ignored$/  \1: ignored/p' "$log")"
if [ "$runtime_skips" -gt 0 ] || [ -n "$ignored" ]; then
  echo "Skipped:"
  sed -n 's/^SKIPPED /  /p' "$TEST_SKIP_LOG"
  [ -z "$ignored" ] || printf '%s\n' "$ignored"
fi
awk -v s="$runtime_skips" '/^test result:/ {p += $4; f += $6; i += $8}
  END {printf "%d passed, %d failed, %d skipped\n", p - s, f, i + s}' "$log"
exit "$status"
