#!/usr/bin/env bash
# Fuzzes every parser the proxy owns (fuzz/fuzz_targets/) with libFuzzer, each for a
# bounded time (FUZZ_SECONDS, default 20) starting from its committed corpus in
# fuzz/corpus/<target>/. New inputs go to a scratch directory, so the committed corpus
# only changes by hand. Exits non-zero on the first crash; the input that caused it
# is left in fuzz/artifacts/<target>/, to become a regression test in the ordinary suite.
#
# Needs a nightly toolchain (libFuzzer's instrumentation); installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: no nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cd fuzz
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo +nightly fuzz build
for target in $(cargo +nightly fuzz list); do
  mkdir -p "$scratch/$target"
  echo "== fuzz $target: ${seconds}s from $(find "corpus/$target" -type f | wc -l) seed(s)"
  if ! cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
    grep -E -A2 'panicked|ERROR: ' "$scratch/$target.log" | head -n 20
    echo "fuzz: $target crashed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  # What it covered: the last status line (edges, features, corpus) and the run count.
  grep -E '^#[0-9]+' "$scratch/$target.log" | tail -n 1
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$scratch/$target.log" | tr '\n' ' '
  echo
done
echo "fuzz: every target ran ${seconds}s without a crash"
