#!/usr/bin/env bash
# Every check and every test, as CI runs them (.ci/run calls this).
# Installs what is missing, starts ClickHouse, PostgreSQL and Redis
# (deploy/services.sh), then: fmt, clippy, the build the tests start, every
# Rust test, and the ClickHouse DDL through a current ClickHouse (chdb).
# Each test makes its own databases, Redis instances, ports and ring files.
set -euo pipefail
cd "$(dirname "$0")/.."

./deploy/install.sh
./deploy/services.sh start

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build (binaries the tests start)"
cargo build --workspace --bins --locked
echo "== tests"
cargo test --workspace --locked -- --test-threads="${AFFGATE_TEST_THREADS:-4}"
echo "== ClickHouse DDL on a current ClickHouse (chdb)"
python3 -c "import chdb" 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check chdb
python3 tests/chdb/check_ddl.py
