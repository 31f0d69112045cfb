#!/usr/bin/env bash
# Throughput benchmark: nginx as a TLS stand-in for LINE, nginx as a plain reverse proxy,
# and line-retry-proxy, side by side in interleaved rounds, all on loopback.
#   bench/run.sh            DURATION=10 ROUNDS=3 CONNECTIONS=32 THREADS=2 WARMUP=2 (env)
#                           QUIET=300: before each run wait up to 300 s for an idle machine
#   bench/run.sh --smoke    1 s per mode, 1 round, then a 20,000-entry memory run (CI)
# Needs nginx, wrk, openssl, python3 and cargo. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
  cargo build --release --locked --quiet --bin line-retry-proxy
  CARGO_TARGET_DIR="$PWD/target" cargo build --release --locked --quiet \
    --manifest-path bench/connect-load/Cargo.toml
fi
exec python3 bench/harness.py throughput "$@"
