#!/usr/bin/env bash
# Memory benchmark: stores N distinct push answers (default 1,000,000) in a running proxy and
# prints bytes per entry from its RSS and its /metrics, then fills a small store
# (STORE_BOUND, default 64 MiB) past its bound and reports the largest size it was seen at.
#   N=1000000 STORE_BOUND=67108864 bench/memory.sh      bench/memory.sh --smoke
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
  cargo build --release --locked --quiet --bin line-retry-proxy
  CARGO_TARGET_DIR="$PWD/target" cargo build --release --locked --quiet \
    --manifest-path bench/connect-load/Cargo.toml
fi
exec python3 bench/harness.py memory "$@"
