#!/usr/bin/env bash
# The project's test command (README "Run the tests"): prepares the real-client
# environments, runs every Rust test, and checks the deployment examples.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-sdk-env.sh
.venv/bin/pip install --quiet --disable-pip-version-check pyyaml
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"
# The end-to-end suites again on the shared Redis store (a redis-server per test process).
LINE_RETRY_PROXY_TEST_STORE=redis cargo test --locked --test base_url --test https_proxy --test channels \
  --test exactly_once --test regressions 2>&1 | tee -a "$log"
.venv/bin/python scripts/check-examples.py target/debug/line-retry-proxy
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
