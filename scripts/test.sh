#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit and integration tests
# (real conntrack, network namespaces, a real OTLP collector). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# shellcheck source=scripts/env.sh
. scripts/env.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked --all-targets
