#!/usr/bin/env bash
# CPU profile of the proxy on the keyed path (unique push bodies, base-URL mode) under wrk:
# perf stat, then perf record with DWARF call graphs, summarised by component in us/request.
#   DURATION=10 bench/profile.sh        PERF_OUT=DIR keeps perf.data there
# Needs perf (Debian: linux-perf) besides what bench/run.sh needs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${BENCH_NO_BUILD:-}" ]]; then
  cargo build --release --locked --quiet --bin line-retry-proxy
  CARGO_TARGET_DIR="$PWD/target" cargo build --release --locked --quiet \
    --manifest-path bench/connect-load/Cargo.toml
fi
exec python3 bench/harness.py profile "$@"
