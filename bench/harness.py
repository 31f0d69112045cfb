#!/usr/bin/env python3
"""The benchmark of bench/README.md (Python 3 standard library only).

    harness.py throughput [--smoke]   behind bench/run.sh
    harness.py memory [--smoke]       behind bench/memory.sh

Everything listens on 127.0.0.1 on ports the kernel picks; every process started here is
stopped and the temporary directory removed on exit, also on Ctrl-C or SIGTERM.
"""

import ctypes
import grp
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PROXY_BIN = os.environ.get("PROXY_BIN", os.path.join(ROOT, "target/release/line-retry-proxy"))
LOAD_BIN = os.environ.get("LOAD_BIN", os.path.join(ROOT, "target/release/connect-load"))
PUSH = "/v2/bot/message/push"
TICK = os.sysconf("SC_CLK_TCK")


def env_int(name, default):
    raw = os.environ.get(name, "")
    try:
        return int(raw.rstrip("s")) if raw else default
    except ValueError:
        sys.exit(f"{name}={raw!r}: expected a whole number")


# ---------------------------------------------------------------- processes and cleanup

_started = []  # every Popen of this run, stopped in reverse order on exit
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    # PR_SET_PDEATHSIG = 1: if this harness is killed outright, its servers get SIGTERM.
    _libc.prctl(1, signal.SIGTERM)


def start(argv, log_path, **kw):
    log = open(log_path, "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent, **kw)
    _started.append(proc)
    return proc


def stop_all():
    for proc in reversed(_started):
        if proc.poll() is None:
            proc.terminate()
    for proc in reversed(_started):
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _started.clear()


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=15):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


# ---------------------------------------------------------------- /proc readings


def proc_tree(pid):
    """pid and its direct children (nginx: master and workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return pids


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / TICK


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pids):
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            pass


def machine_ticks():
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return sum(cpu), cpu[3] + cpu[4]  # all, idle + iowait


def machine_info():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs, {model}, Linux {os.uname().release}"


# ---------------------------------------------------------------- the servers


def make_pki(d):
    """A throwaway CA and a server certificate for api.line.me and 127.0.0.1."""
    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, cwd=d,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench test CA")
    ossl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=api.line.me")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:api.line.me,IP:127.0.0.1\n")
    ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext")


def start_nginx(d, name, values):
    with open(os.path.join(BENCH, "nginx", f"{name}.conf")) as f:
        conf = f.read()
    # As root, nginx would hand its workers to a user of the system's config: keep ours.
    user = (f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
            if os.geteuid() == 0 else "")
    values = {"DIR": d, "USER": user, **values}
    conf = re.sub(r"@([A-Z_]+)@", lambda m: str(values[m.group(1)]), conf)
    path = os.path.join(d, f"{name}.conf")
    with open(path, "w") as f:
        f.write(conf)
    proc = start(["nginx", "-e", os.path.join(d, f"{name}-error.log"), "-p", d, "-c", path,
                  "-g", "daemon off;"], os.path.join(d, f"{name}-stdout.log"))
    wait_port(values["PORT"], proc, f"nginx ({name})")
    return proc


class Proxy:
    def __init__(self, d, upstream_port, store_max_bytes, tag="proxy"):
        self.ca_dir = os.path.join(d, f"{tag}-ca")
        self.log = os.path.join(d, f"{tag}.log")
        self.proc = start([PROXY_BIN, "serve", "--listen", "127.0.0.1:0",
                           "--admin-listen", "127.0.0.1:0",
                           "--upstream", f"https://127.0.0.1:{upstream_port}",
                           "--upstream-ca", os.path.join(d, "ca.pem"), "--ca-dir", self.ca_dir,
                           "--store-max-bytes", str(store_max_bytes), "--log-format", "json"],
                          self.log)
        self.store_max_bytes = store_max_bytes
        self.port, self.admin = self._ready()
        self.ca_pem = os.path.join(self.ca_dir, "ca.pem")

    def _ready(self, timeout=15):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                sys.exit(f"line-retry-proxy exited with {self.proc.returncode}; see {self.log}")
            with open(self.log, errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    fields = {**rec, **rec.get("fields", {})}
                    if fields.get("message") == "line-retry-proxy ready":
                        port = int(fields["listen"].rsplit(":", 1)[1])
                        return port, fields["admin"]
            time.sleep(0.05)
        sys.exit(f"no 'line-retry-proxy ready' log line within {timeout}s; see {self.log}")

    def metrics(self):
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def rss_kb(self):
        return status_kb(self.proc.pid, "VmRSS")


def metric(m, name, **labels):
    """Sum of a metric over the series whose labels include `labels`."""
    total = 0.0
    for key, value in m.items():
        series, _, rest = key.partition("{")
        if series == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def post(port, body, tls_ca=None, headers=None):
    """One POST /v2/bot/message/push; returns (status, headers, body)."""
    if tls_ca:
        ctx = ssl.create_default_context(cafile=tls_ca)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", PUSH, body=body, headers={
            "Authorization": "Bearer bench-channel-access-token",
            "Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- load generators


def run_wrk(url, seconds, conns, threads, nonce, body="unique"):
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s",
            "-s", os.path.join(BENCH, "wrk-push.lua"), url, "--", nonce, body]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            r = json.loads(line[6:])
            r["seconds"] = r.pop("duration_us") / 1e6
            return r
    sys.exit(f"wrk printed no result (exit {out.returncode}):\n{out.stdout}{out.stderr}")


def run_load(target_port, seconds, conns, threads, nonce, connect_ca=None, requests=None):
    argv = [LOAD_BIN, "--target", f"127.0.0.1:{target_port}", "--connections", str(conns),
            "--threads", str(threads), "--duration", str(seconds), "--nonce", nonce]
    if connect_ca:
        argv += ["--connect", "api.line.me:443", "--ca", connect_ca]
    if requests is not None:
        argv += ["--requests", str(requests)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        sys.exit(f"connect-load printed no result (exit {out.returncode}):\n{out.stderr}")


# ---------------------------------------------------------------- throughput


def throughput(smoke):
    seconds = 1 if smoke else env_int("DURATION", 10)
    rounds = 1 if smoke else env_int("ROUNDS", 3)
    warmup = 1 if smoke else env_int("WARMUP", 2)
    conns = env_int("CONNECTIONS", 32)
    threads = env_int("THREADS", 2)
    d = tempfile.mkdtemp(prefix="lrp-bench-")
    try:
        make_pki(d)
        up_port, ng_port = free_port(), free_port()
        upstream = start_nginx(d, "upstream", {"PORT": up_port})
        nginx = start_nginx(d, "proxy", {"PORT": ng_port, "UPSTREAM_PORT": up_port,
                                         "WORKERS": os.environ.get("NGINX_WORKERS", "auto")})
        proxy = Proxy(d, up_port, env_int("STORE_MAX_BYTES", 16 << 30))
        sanity(up_port, ng_port, proxy, os.path.join(d, "ca.pem"))

        run_id = f"{os.getpid():x}{int(time.time()):x}"
        https = lambda p: f"https://127.0.0.1:{p}{PUSH}"
        http_ = lambda p: f"http://127.0.0.1:{p}{PUSH}"
        # (name, pids under test, how to drive it for s seconds with a nonce, expected outcome)
        modes = [
            ("direct", lambda: proc_tree(upstream.pid),
             lambda s, n: run_wrk(https(up_port), s, conns, threads, n), None),
            ("nginx proxy", lambda: proc_tree(nginx.pid),
             lambda s, n: run_wrk(http_(ng_port), s, conns, threads, n), None),
            ("proxy unique", lambda: [proxy.proc.pid],
             lambda s, n: run_wrk(http_(proxy.port), s, conns, threads, n), "fresh"),
            ("proxy replayed", lambda: [proxy.proc.pid],
             lambda s, n: run_wrk(http_(proxy.port), s, conns, threads, "same", "same"),
             "replayed"),
            ("HTTPS_PROXY unique*", lambda: [proxy.proc.pid],
             lambda s, n: run_load(proxy.port, s, conns, threads, n, connect_ca=proxy.ca_pem),
             "fresh"),
            ("base-URL unique*", lambda: [proxy.proc.pid],
             lambda s, n: run_load(proxy.port, s, conns, threads, n), "fresh"),
        ]
        print(f"machine: {machine_info()}")
        print(f"{rounds} round(s) of {seconds}s per mode, {conns} connections, {threads} "
              f"client threads, {warmup}s warm-up per mode; * = connect-load, else wrk")
        # Each mode, warm-up and round its own nonce: no body is ever repeated across them.
        for i, (name, _, drive, _) in enumerate(modes):
            drive(warmup, f"{run_id}m{i}w")
        results = {name: [] for name, *_ in modes}
        for rnd in range(rounds):
            order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]  # rotate: no fixed order
            for name, pids, drive, expect in order:
                nonce = f"{run_id}m{modes.index((name, pids, drive, expect))}r{rnd}"
                res = measure(pids(), lambda: drive(seconds, nonce),
                              proxy if expect else None, expect)
                results[name].append(res)
                time.sleep(0.3)
            print(f"round {rnd + 1}: " + ", ".join(
                f"{n} {results[n][-1]['rps']:,.0f}" for n, *_ in modes))
        report(results, smoke)
        broken = [n for n, rs in results.items()
                  if any(r["requests"] == 0 or r["errors"] or r["non_2xx"] or r["check"] is False
                         for r in rs)]
        if broken:
            print(f"\nBROKEN: {', '.join(broken)} had failed requests or wrong outcomes; "
                  f"logs in {d}", file=sys.stderr)
            return 1
        return 0
    finally:
        stop_all()
        cleanup(d)


def sanity(up_port, ng_port, proxy, ca):
    """One push through each path, so a misconfigured path fails before any number is printed."""
    body = json.dumps({"to": "Usanity", "messages": [{"type": "text", "text": str(time.time())}]})
    for what, port, tls in (("upstream", up_port, ca), ("nginx proxy", ng_port, None),
                            ("proxy", proxy.port, None)):
        status, headers, answer = post(port, body, tls)
        if status != 200 or b"sentMessages" not in answer or "x-line-request-id" not in headers:
            sys.exit(f"sanity: {what} answered {status} {headers} {answer[:200]!r}")
    status, headers, _ = post(proxy.port, body)
    if headers.get("x-line-retry-proxy") != "replayed" or "x-line-retry-key" not in headers:
        sys.exit(f"sanity: a resend through the proxy was not replayed: {status} {headers}")


def measure(pids, drive, proxy, expect):
    reset_peak_rss(pids)
    before_m = proxy.metrics() if proxy else None
    cpu0, (all0, idle0) = cpu_seconds(pids), machine_ticks()
    r = drive()
    cpu1, (all1, idle1) = cpu_seconds(pids), machine_ticks()
    r["rps"] = r["requests"] / r["seconds"] if r["seconds"] else 0.0
    r["cpu_ms_per_1k"] = (cpu1 - cpu0) * 1e6 / r["requests"] if r["requests"] else 0.0
    r["peak_rss_kb"] = sum(status_kb(p, "VmHWM") for p in pids)
    r["machine_busy"] = 100.0 * (1 - (idle1 - idle0) / max(1, all1 - all0))
    r["check"] = None
    if proxy:
        after = proxy.metrics()
        delta = lambda o: (metric(after, "line_retry_proxy_requests_total", endpoint="push",
                                  outcome=o)
                           - metric(before_m, "line_retry_proxy_requests_total", endpoint="push",
                                    outcome=o))
        counted = sum(delta(o) for o in ("fresh", "replayed", "coalesced", "conflict_resolved",
                                         "error"))
        share = delta(expect) / counted if counted else 0.0
        r["outcome_share"] = share
        r["check"] = share >= 0.99  # requests in flight at the cut may land in either run
    return r


def report(results, smoke):
    med = lambda name, key: statistics.median(r[key] for r in results[name])
    rounds = len(results["direct"])

    def ratio(name, base):
        return statistics.median(results[name][i]["rps"] / results[base][i]["rps"]
                                 for i in range(rounds) if results[base][i]["rps"])

    print(f"\n{'mode':<21}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'+p99 ms':>9}"
          f"{'CPU ms/1k':>10}{'peak RSS':>10}{'busy':>6}{'x direct':>9}{'x nginx':>8}  check")
    direct_p99 = med("direct", "p99_us")
    for name, rs in results.items():
        cpu = sum(r["cpu_ms_per_1k"] * r["requests"] for r in rs) / max(1, sum(
            r["requests"] for r in rs))
        check = ""
        if rs[0]["check"] is not None:
            check = f"{min(r['outcome_share'] for r in rs):.0%} " + (
                "replayed" if "replayed" in name else "fresh")
        fails = sum(r["errors"] + r["non_2xx"] for r in rs)
        if fails:
            check += f" {fails} FAILED"
        print(f"{name:<21}{med(name, 'rps'):>9,.0f}{med(name, 'p50_us') / 1e3:>8.2f}"
              f"{med(name, 'p99_us') / 1e3:>8.2f}"
              f"{(med(name, 'p99_us') - direct_p99) / 1e3:>+9.2f}{cpu:>10.1f}"
              f"{max(r['peak_rss_kb'] for r in rs) / 1024:>8.1f}Mi{med(name, 'machine_busy'):>5.0f}%"
              f"{ratio(name, 'direct'):>9.2f}{ratio(name, 'nginx proxy'):>8.2f}  {check}")
    print("req/s, p50, p99, busy: medians over rounds; +p99: over direct; CPU: of the server "
          "under test\n(nginx: master + workers; proxy: its process), per 1,000 requests; peak "
          "RSS: VmHWM during the run;\nratios: per-round, median.")
    nginx_p99_added = med("nginx proxy", "p99_us") - direct_p99
    proxy_p99_added = med("proxy unique", "p99_us") - direct_p99
    cpu_of = lambda n: sum(r["cpu_ms_per_1k"] for r in results[n]) / rounds
    same_client = statistics.median(results["HTTPS_PROXY unique*"][i]["rps"]
                                    / results["base-URL unique*"][i]["rps"]
                                    for i in range(rounds))
    print(f"\ntargets of issue 12{' (smoke: too short to mean anything)' if smoke else ''}:")
    for label, value, goal, ok in (
        ("base-URL unique vs nginx, throughput", ratio("proxy unique", "nginx proxy"), ">= 1.00x",
         ratio("proxy unique", "nginx proxy") >= 1.0),
        ("p99 added, proxy vs nginx (ms)", f"{proxy_p99_added / 1e3:.2f} vs "
         f"{nginx_p99_added / 1e3:.2f}", "<=", proxy_p99_added <= nginx_p99_added),
        ("CPU per 1k requests, proxy vs nginx (ms)",
         f"{cpu_of('proxy unique'):.0f} vs {cpu_of('nginx proxy'):.0f}", "<=",
         cpu_of("proxy unique") <= cpu_of("nginx proxy")),
        ("replayed vs nginx", ratio("proxy replayed", "nginx proxy"), ">= 1.50x",
         ratio("proxy replayed", "nginx proxy") >= 1.5),
        ("HTTPS_PROXY vs base-URL (same client)", same_client, ">= 0.80x", same_client >= 0.8),
    ):
        shown = f"{value:.2f}x" if isinstance(value, float) else value
        print(f"  {label:<42}{shown:>16}  goal {goal:<9}{'met' if ok else 'NOT met'}")
    out = os.environ.get("RESULTS")
    if out:
        with open(out, "w") as f:
            json.dump({"machine": machine_info(), "results": results}, f, indent=1)


# ---------------------------------------------------------------- memory


def memory(smoke):
    n = 20_000 if smoke else env_int("N", 1_000_000)
    bound = (1 << 20) if smoke else env_int("STORE_BOUND", 64 << 20)
    conns = env_int("CONNECTIONS", 32)
    d = tempfile.mkdtemp(prefix="lrp-bench-mem-")
    try:
        make_pki(d)
        up_port = free_port()
        start_nginx(d, "upstream", {"PORT": up_port})
        print(f"machine: {machine_info()}")

        # 1. Bytes per stored answer, with room for all of them.
        proxy = Proxy(d, up_port, env_int("STORE_MAX_BYTES", 16 << 30), "fill")
        status, headers, answer = post(proxy.port, '{"to":"Uprobe","messages":[]}')
        if status != 200:
            sys.exit(f"probe push answered {status}")
        body_len = len(answer)
        run_load(proxy.port, 60, conns, 2, "warm", requests=2_000)  # pools, buffers, runtime
        settle(proxy)
        rss0, m0 = proxy.rss_kb() * 1024, proxy.metrics()
        t0 = time.monotonic()
        r = run_load(proxy.port, 3600, conns, 2, "fill", requests=n)
        took = time.monotonic() - t0
        m1 = settle(proxy)
        rss1 = proxy.rss_kb() * 1024
        entries = metric(m1, "line_retry_proxy_store_entries") - metric(
            m0, "line_retry_proxy_store_entries")
        weighed = metric(m1, "line_retry_proxy_store_bytes") - metric(
            m0, "line_retry_proxy_store_bytes")
        if r["errors"] or r["non_2xx"] or entries <= 0:
            sys.exit(f"fill failed: {r}, {entries:.0f} new entries")
        per = (rss1 - rss0) / entries
        print(f"\nstored {entries:,.0f} push answers ({r['requests']:,} requests in {took:.0f}s, "
              f"{r['rps']:,.0f} req/s)")
        print(f"  answer body                 {body_len:>10} bytes (headers not counted)")
        print(f"  RSS before / after          {rss0 / 2**20:>10.1f} / {rss1 / 2**20:.1f} MiB")
        print(f"  RSS growth per entry        {per:>10.0f} bytes")
        print(f"  beyond the body             {per - body_len:>10.0f} bytes   (goal <= 512: "
              f"{'met' if per - body_len <= 512 else 'NOT met'})")
        print(f"  store's own weight / entry  {weighed / entries:>10.0f} bytes "
              f"(line_retry_proxy_store_bytes / store_entries)")
        stop_all_but_upstream()

        # 2. The bound: fill past store-max-bytes, watching the store's bytes as it goes.
        proxy = Proxy(d, up_port, bound, "bound")
        peak = {"bytes": 0.0, "entries": 0.0}
        done = threading.Event()

        def watch():
            while not done.wait(0.2):
                try:
                    m = proxy.metrics()
                except OSError:
                    continue
                peak["bytes"] = max(peak["bytes"], metric(m, "line_retry_proxy_store_bytes"))
                peak["entries"] = max(peak["entries"], metric(m, "line_retry_proxy_store_entries"))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        r = run_load(proxy.port, 3600, conns, 2, "bound", requests=n)
        done.set()
        watcher.join()
        m = settle(proxy)
        held = peak["bytes"] <= bound
        print(f"\nstore-max-bytes {bound:,}: {r['requests']:,} distinct pushes, sampled every "
              f"0.2s: peak store_bytes {peak['bytes']:,.0f} ({peak['entries']:,.0f} entries), "
              f"final {metric(m, 'line_retry_proxy_store_bytes'):,.0f}; RSS "
              f"{proxy.rss_kb() / 1024:.0f} MiB: bound {'held' if held else 'EXCEEDED'}")
        if peak["bytes"] < bound / 2:
            print("  (the fill did not reach the bound: raise N or lower STORE_BOUND)")
        return 0 if r["errors"] == 0 and r["non_2xx"] == 0 else 1
    finally:
        stop_all()
        cleanup(d)


def stop_all_but_upstream():
    proxies = [p for p in _started if p.args[0] == PROXY_BIN]
    for p in proxies:
        p.terminate()
        p.wait(timeout=40)
        _started.remove(p)


def settle(proxy, timeout=20):
    """Metrics once the store's gauges stop moving (moka applies writes in batches)."""
    last, end = None, time.monotonic() + timeout
    while time.monotonic() < end:
        m = proxy.metrics()
        now = (metric(m, "line_retry_proxy_store_entries"), metric(m, "line_retry_proxy_store_bytes"))
        if now == last:
            return m
        last = now
        time.sleep(0.5)
    return m


def cleanup(d):
    if os.environ.get("BENCH_KEEP"):
        print(f"kept {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


def main():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if len(sys.argv) < 2 or sys.argv[1] not in ("throughput", "memory"):
        sys.exit(__doc__)
    smoke = "--smoke" in sys.argv[2:]
    for tool in ("nginx", "wrk", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install nginx-light wrk openssl")
    for binary in (PROXY_BIN, LOAD_BIN):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} missing: run bench/run.sh, which builds it")
    sys.exit(throughput(smoke) if sys.argv[1] == "throughput" else memory(smoke))


if __name__ == "__main__":
    main()
