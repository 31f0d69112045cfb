#!/usr/bin/env bash
# The project's test command (README "Run the tests"): prepares the real-client
# environments, runs every Rust test, and checks the deployment examples.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-sdk-env.sh
.venv/bin/pip install --quiet --disable-pip-version-check pyyaml
cargo test --locked
.venv/bin/python scripts/check-examples.py target/debug/line-retry-proxy
