#!/usr/bin/env python3
"""Checks examples/monitoring against a running proxy, so the dashboard and the alerts
cannot name a series the proxy does not export.

Usage: check-monitoring.py [PATH/TO/line-retry-proxy]   (default: target/debug/line-retry-proxy)

1. Starts the binary on 127.0.0.1:0 (admin on 127.0.0.1:0, a temporary CA directory, an
   upstream on a closed loopback port: no request is sent) and reads its /metrics.
2. Pulls every PromQL expression out of grafana-dashboard.json (panel targets and
   variable queries) and prometheus-rules.yml, and fails when one names a metric the
   proxy does not export (a histogram only as _bucket, _sum or _count), matches a label
   value no series has, or groups by a label none of its metrics carry; and when an
   exported metric is on no dashboard panel.
3. With promtool (taken from PATH, or extracted from Debian's prometheus package into
   target/tools without installing it): `check rules` on the rules and on the
   dashboard's expressions, `check config` on prometheus.yml, `test rules` with
   prometheus-rules.test.yml, and `check metrics` on the live exposition.
"""
import glob
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "examples/monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "prometheus-rules.yml"
RULES_TEST = MONITORING / "prometheus-rules.test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
PREFIX = "line_retry_proxy_"
# Labels Prometheus attaches to every scraped series (target labels, and the ones a
# Kubernetes or compose scrape config commonly adds).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "container", "service"}
STARTUP_TIMEOUT = 30

failures = []


def fail(what):
    failures.append(what)


# ---------------------------------------------------------------- the live proxy

def start_proxy(binary, workdir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINE_RETRY_PROXY_")}
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--log-format", "json", "--ca-dir", str(workdir / "ca"), "--upstream", "https://127.0.0.1:9"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
    lines = queue.Queue()

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen = []
    while True:
        try:
            line = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            proc.kill()
            sys.exit(f"check-monitoring: no 'line-retry-proxy ready' line within {STARTUP_TIMEOUT}s")
        if line is None:
            sys.exit("check-monitoring: the proxy exited before it was ready:\n" + "".join(seen[-20:]))
        seen.append(line)
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("message") == "line-retry-proxy ready":
            return proc, record["admin"]


def fetch_metrics(admin):
    # No proxy from the environment: the admin port is on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{admin}/metrics", timeout=10) as res:
        return res.read().decode()


def parse_exposition(text):
    """{family: type} and {sample name: [label dicts]}."""
    types, samples = {}, {}
    sample_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+\S+')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            m = sample_re.match(line)
            if m:
                labels = dict(label_re.findall(m.group(2) or ""))
                samples.setdefault(m.group(1), []).append(labels)
    return types, samples


def queryable_names(types):
    """The names a PromQL selector can use, each mapped to its family."""
    names = {}
    for family, kind in types.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[family + suffix] = family
        elif kind == "summary":
            for suffix in ("", "_sum", "_count"):
                names[family + suffix] = family
        else:
            names[family] = family
    return names


# ---------------------------------------------------------------- PromQL, enough of it

def string_spans(expr):
    spans, i = [], 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" and c != "`" else 1
            spans.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    return spans


def masked(expr):
    """The expression with string contents blanked, positions kept."""
    chars = list(expr)
    for a, b in string_spans(expr):
        for k in range(a + 1, max(a + 1, b - 1)):
            chars[k] = " "
    return "".join(chars)


def unquote(token):
    if token.startswith("`"):
        return token[1:-1]
    try:
        return json.loads('"' + token[1:-1].replace('\\"', '"').replace('"', '\\"') + '"')
    except json.JSONDecodeError:
        return token[1:-1]


NAME_RE = re.compile(r"(?<![a-zA-Z0-9_:])(" + PREFIX + r"[a-zA-Z0-9_:]*)")
MATCHER_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)\s*,?')
GROUPING_RE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def selectors(expr):
    """(metric name, [(label, op, value)]) for each line_retry_proxy_ selector."""
    plain = masked(expr)
    out = []
    for m in NAME_RE.finditer(plain):
        name, matchers = m.group(1), []
        rest = m.end()
        while rest < len(plain) and plain[rest].isspace():
            rest += 1
        if rest < len(plain) and plain[rest] == "{":
            end = plain.index("}", rest)
            body, pos = expr[rest + 1:end], 0
            while pos < len(body.strip()):
                mm = MATCHER_RE.match(body, pos)
                if not mm:
                    fail(f"cannot parse the matchers of {name} in: {expr}")
                    break
                matchers.append((mm.group(1), mm.group(2), unquote(mm.group(3))))
                pos = mm.end()
        out.append((name, matchers))
    return out


def grouping_labels(expr):
    labels = set()
    for m in GROUPING_RE.finditer(masked(expr)):
        labels.update(l.strip() for l in m.group(1).split(",") if l.strip())
    return labels


def check_expression(where, expr, types, names, samples):
    used = set()
    labels_here = set(TARGET_LABELS)
    for name, matchers in selectors(expr):
        family = names.get(name)
        if family is None:
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name in types:
                fail(f"{where}: {name} is a {types[name]}: it is queried as {name}_bucket, _sum or _count")
            elif base != name and base in types:
                fail(f"{where}: {name} does not exist: {base} is a {types[base]}")
            else:
                fail(f"{where}: {name} is not exported by the proxy")
            continue
        used.add(family)
        series = samples.get(name, [])
        present = {k for s in series for k in s}
        labels_here |= present
        for label, op, value in matchers:
            if label in TARGET_LABELS:
                continue
            if label not in present:
                fail(f"{where}: {name} has no label {label}")
                continue
            if "$" in value or op in ("!=", "!~"):
                continue
            values = {s.get(label) for s in series}
            if op == "=":
                ok = value in values
            else:
                try:
                    ok = any(v is not None and re.fullmatch(value, v) for v in values)
                except re.error as e:
                    fail(f"{where}: bad regex {value!r}: {e}")
                    continue
            if not ok:
                fail(f"{where}: no {name} series has {label}{op}\"{value}\" (values: {', '.join(sorted(v for v in values if v))})")
    for label in grouping_labels(expr) - labels_here:
        fail(f"{where}: groups by {label}, which none of its metrics carry")
    return used


# ---------------------------------------------------------------- the examples

def dashboard_expressions(dashboard):
    """(where, expr) for every panel target and every query variable."""
    out = []

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    ids = [p.get("id") for p in panels(dashboard.get("panels", []))]
    if len(ids) != len(set(ids)) or None in ids:
        fail("dashboard: every panel needs a unique id")
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    for p in panels(dashboard.get("panels", [])):
        if p.get("type") == "row":
            continue
        if "gridPos" not in p or not p.get("targets"):
            fail(f"dashboard panel {p.get('title')!r}: needs a gridPos and targets")
        for t in p.get("targets", []):
            out.append((f"dashboard panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            ds = (t.get("datasource") or p.get("datasource") or {}).get("uid", "")
            for var in re.findall(r"\$\{?(\w+)", ds + t["expr"]):
                if var not in variables and not var.startswith("__"):
                    fail(f"dashboard panel {p.get('title')!r}: ${var} is not a dashboard variable")
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", query)
            if m:
                out.append((f"dashboard variable {v['name']}", m.group(1)))
            else:
                out.append((f"dashboard variable {v['name']}", query))
    return out


def rules_expressions(rules):
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"])
            for g in rules["groups"] for r in g["rules"]]


def as_plain_promql(expr):
    """A dashboard expression with Grafana's variables replaced, for promtool."""
    expr = re.sub(r"\$\{?__(rate_)?interval\}?|\$\{?__range\}?", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


# ---------------------------------------------------------------- promtool

def promtool():
    found = shutil.which("promtool")
    if found:
        return found
    cached = ROOT / "target/tools/promtool"
    if cached.is_file():
        return str(cached)
    if not shutil.which("apt-get"):
        sys.exit("check-monitoring: promtool is not on PATH and apt-get is missing to fetch it; install Prometheus' promtool")
    with tempfile.TemporaryDirectory() as tmp:
        # Only the package file: nothing is installed, no service is started.
        subprocess.run(["apt-get", "download", "-q", "prometheus"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        deb = glob.glob(f"{tmp}/prometheus_*.deb")[0]
        subprocess.run(["dpkg-deb", "-x", deb, f"{tmp}/x"], check=True)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f"{tmp}/x/usr/bin/promtool", cached)
    return str(cached)


def run_promtool(tool, *args, stdin=None):
    proc = subprocess.run([tool, *args], input=stdin, capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def promtool_checks(tool, rules, dashboard_exprs, exposition):
    done = []
    code, out = run_promtool(tool, "check", "rules", str(RULES))
    if code:
        fail(f"promtool check rules {RULES.name}:\n{out}")
    done.append("check rules")
    code, out = run_promtool(tool, "check", "config", str(PROMETHEUS_CONFIG))
    if code:
        fail(f"promtool check config {PROMETHEUS_CONFIG.name}:\n{out}")
    done.append("check config")
    with tempfile.TemporaryDirectory() as tmp:
        # promtool compares annotations as rendered text; the tests are about firing.
        bare = {"groups": [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
                           for g in rules["groups"]]}
        (Path(tmp) / RULES.name).write_text(yaml.safe_dump(bare, sort_keys=False))
        shutil.copy(RULES_TEST, Path(tmp) / RULES_TEST.name)
        code, out = run_promtool(tool, "test", "rules", str(Path(tmp) / RULES_TEST.name))
        if code:
            fail(f"promtool test rules {RULES_TEST.name}:\n{out}")
        tests = len(yaml.safe_load(RULES_TEST.read_text())["tests"])
        done.append(f"test rules ({tests} cases)")

        recorded = {"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:expr_{i}", "expr": as_plain_promql(e)} for i, (_, e) in enumerate(dashboard_exprs)]}]}
        path = Path(tmp) / "dashboard-expressions.yml"
        path.write_text(yaml.safe_dump(recorded, sort_keys=False))
        code, out = run_promtool(tool, "check", "rules", str(path))
        if code:
            fail(f"promtool: the dashboard's expressions do not parse:\n{out}")
        done.append(f"{len(dashboard_exprs)} dashboard expressions parse")
    code, out = run_promtool(tool, "check", "metrics", stdin=exposition)
    if code:
        fail(f"promtool check metrics on the proxy's /metrics:\n{out}")
    done.append("check metrics")
    return done


def main():
    binary = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "target/debug/line-retry-proxy").resolve()
    with tempfile.TemporaryDirectory() as tmp:
        proc, admin = start_proxy(str(binary), Path(tmp))
        try:
            exposition = fetch_metrics(admin)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    types, samples = parse_exposition(exposition)
    types = {k: v for k, v in types.items() if k.startswith(PREFIX)}
    if not types:
        sys.exit("check-monitoring: the proxy's /metrics has no line_retry_proxy_ families")
    names = queryable_names(types)

    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(RULES.read_text())
    dash_exprs = dashboard_expressions(dashboard)
    rule_exprs = rules_expressions(rules)
    on_dashboard = set()
    for where, expr in dash_exprs:
        used = check_expression(where, expr, types, names, samples)
        if where.startswith("dashboard panel"):
            on_dashboard |= used
    in_rules = set()
    for where, expr in rule_exprs:
        in_rules |= check_expression(where, expr, types, names, samples)
    for family in sorted(set(types) - on_dashboard):
        fail(f"{family} is exported but on no dashboard panel: add it to {DASHBOARD.name}")
    for r in (r for g in rules["groups"] for r in g["rules"] if "alert" in r):
        if not r.get("annotations", {}).get("description") or "severity" not in r.get("labels", {}):
            fail(f"rule {r['alert']}: needs a severity label and a description that says what to check")

    done = promtool_checks(promtool(), rules, [(w, e) for w, e in dash_exprs if w.startswith("dashboard panel")], exposition)

    for f in failures:
        print(f"FAIL {f}")
    if failures:
        print(f"monitoring: {len(failures)} problem(s)")
        sys.exit(1)
    print(f"monitoring: ok ({len(types)} families exported, all on the dashboard; "
          f"{len(dash_exprs)} dashboard and {len(rule_exprs)} rule expressions use only exported series "
          f"({len(in_rules)} families alerted on); promtool: {', '.join(done)})")


if __name__ == "__main__":
    main()
