#!/usr/bin/env bash
# Checks examples/kubernetes offline, with no cluster: every manifest against the
# Kubernetes API schema (strict) and, for the pods, the restricted Pod Security
# Standard and what the proxy needs (scripts/check-kubernetes.py says what exactly);
# then checkov's Kubernetes policies. Any finding fails: fix it, or skip it on the
# resource with a `checkov.io/skipN: CKV_K8S_xx=why` annotation saying why.
#
# Kubernetes 1.30 is the oldest version the examples need (native sidecars, the
# preStop sleep action); 1.37 is the newest schema the pinned kubernetes-validate has.
# The tools live in a virtualenv of their own under target/ (ignored by git and by
# the Docker context), apart from the SDK tests' .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=(1.30 1.37)
venv="${DEPLOY_VENV:-target/venv-deploy}"

if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  kubernetes-validate==1.37.0 checkov==3.3.30 cloudcoil-models-prometheus-operator==0.80.1.0

# Both checks run, whatever the first finds, so one run shows every finding.
failed=0
"$venv/bin/python" scripts/check-kubernetes.py "${versions[@]}" || failed=1

# Offline: no guidelines or policies from the vendor's platform, no update check.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
BC_SKIP_MAPPING=TRUE CKV_SKIP_PACKAGE_UPDATE_CHECK=true \
  "$venv/bin/checkov" -d examples/kubernetes --framework kubernetes --skip-download \
  -o cli -o json --output-file-path "$out" >"$out/stdout" 2>&1 || status=$?
"$venv/bin/python" - "$out/results_json.json" "$status" <<'PY' || failed=1
import json
import sys
from pathlib import Path

import yaml

path, status = Path(sys.argv[1]), int(sys.argv[2])
if not path.is_file():
    sys.exit(f"checkov: FAIL, no results (exit {status}): {Path(path.parent, 'stdout').read_text()[-2000:]}")
report = json.loads(path.read_text())
summary, results = report.get("summary"), report.get("results", {})
if not summary:
    sys.exit(f"checkov: FAIL, it found nothing to check in examples/kubernetes (exit {status})")
failed = False
for c in results.get("failed_checks", []):
    failed = True
    print(f"FAIL {c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path'].lstrip('/')})")
for e in results.get("parsing_errors", []):
    failed = True
    print(f"FAIL checkov could not parse {e}")
# checkov passes over a file it cannot read as Kubernetes: every file with a pod must
# appear in its results.
seen = {c["file_path"].lstrip("/") for kind in ("passed_checks", "failed_checks", "skipped_checks")
        for c in results.get(kind, [])}
for manifest in sorted(Path("examples/kubernetes").rglob("*.y*ml")):
    kinds = {d.get("kind") for d in yaml.safe_load_all(manifest.read_text()) if d}
    if kinds & {"Pod", "Deployment"} and str(manifest) not in seen:
        failed = True
        print(f"FAIL checkov did not check {manifest}")
for c in results.get("skipped_checks", []):
    print(f"skipped {c['check_id']} on {c['resource']}: {c['check_result'].get('suppress_comment', '(no reason given)')}")
    if not c["check_result"].get("suppress_comment"):
        failed = True
        print(f"FAIL {c['check_id']} on {c['resource']} is skipped without a reason")
print(f"checkov {summary['checkov_version']}: {summary['passed']} passed, {summary['failed']} failed, "
      f"{summary['skipped']} skipped, {summary['resource_count']} resources")
if failed or status != 0:
    sys.exit(f"checkov: FAIL (exit {status})")
PY
if [ "$failed" -ne 0 ]; then
  echo "check-kubernetes: FAIL" >&2
  exit 1
fi
echo "check-kubernetes: ok"
