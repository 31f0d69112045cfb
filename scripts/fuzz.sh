#!/usr/bin/env bash
# Fuzzes every parser the proxy owns (fuzz/fuzz_targets/) with libFuzzer, each for a
# bounded time (FUZZ_SECONDS, default 20) starting from its committed corpus in
# fuzz/corpus/<target>/. New inputs go to a scratch directory, so the committed corpus
# only changes by hand. Exits non-zero on the first crash; the input that caused it
# is left in fuzz/artifacts/<target>/, to become a regression test in the ordinary suite.
#
# libFuzzer's instrumentation takes unstable compiler flags: a nightly toolchain if one is
# installed, else the machine's stable one with RUSTC_BOOTSTRAP=1 (which admits them; the
# sanitizer runtimes ship with stable too). Installs cargo-fuzz if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=+nightly
else
  echo "fuzz: no nightly toolchain; the stable one with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  toolchain=
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cd fuzz
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo $toolchain fuzz build
for target in $(cargo $toolchain fuzz list); do
  mkdir -p "$scratch/$target"
  echo "== fuzz $target: ${seconds}s from $(find "corpus/$target" -type f | wc -l) seed(s)"
  if ! cargo $toolchain fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
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
