"""Shared parts of the benchmark (Python 3 standard library only): the processes it starts
and stops, readings from /proc, the TLS upstream and nginx proxy, the proxy under test, and
the two load generators. Used by harness.py and perfprofile.py.

Everything listens on 127.0.0.1 on ports the kernel picks; every process started here is
stopped by stop_all(), which the entry points call on any exit (Ctrl-C and SIGTERM included).
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
import subprocess
import sys
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
    # Once: a second signal must not cut short the cleanup the first one started.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
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


def cpu_split(pids):
    """(user, system) CPU seconds of `pids`, from utime and stime in /proc/PID/stat."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / TICK, system / TICK


def cpu_seconds(pids):
    return sum(cpu_split(pids))


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
    """(all, process, stolen) ticks of the whole machine: process time is user + nice +
    system, leaving out idle, I/O wait, interrupts, softirqs (often charged to no process)
    and the time the hypervisor gave to other guests (steal)."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return sum(cpu), cpu[0] + cpu[1] + cpu[2], cpu[7] if len(cpu) > 7 else 0


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
        now = (metric(m, "line_retry_proxy_store_entries"),
               metric(m, "line_retry_proxy_store_bytes"))
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
