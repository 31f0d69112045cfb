#!/usr/bin/env bash
# The one release build, used by the Dockerfile and by CI: what CI proves is what
# the image ships. Usage: scripts/build-release.sh [DEST_DIR]   (default: dist)
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-dist}"
cargo build --release --locked --bin line-retry-proxy
# CARGO_TARGET_DIR lets a caller share a warm target directory (the Dockerfile replay does).
install -D -m 0755 "${CARGO_TARGET_DIR:-target}/release/line-retry-proxy" "$dest/line-retry-proxy"
# The runtime image has no shell: pre-create the CA data directory owned by the
# non-root user (uid 65532) so the volume is writable.
mkdir -p "$dest/data/ca"
echo "built $dest/line-retry-proxy ($("$dest/line-retry-proxy" --version))"
