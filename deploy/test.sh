#!/usr/bin/env bash
# Every check and every test, as CI runs them (.ci/run calls this).
# Installs what is missing first; each test starts its own Redis and edge
# on ports of its own, so nothing needs to be running beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install.sh

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build (binaries the tests start)"
cargo build --workspace --bins --locked
echo "== tests"
cargo test --workspace --locked -- --test-threads="${AFFGATE_TEST_THREADS:-4}"
