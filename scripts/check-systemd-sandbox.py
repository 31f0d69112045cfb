#!/usr/bin/env python3
"""Whether the proxy keeps within the sandbox its systemd unit sets, found without
systemd: the binary runs under strace through what a service does (start with the
sample config and a new CA, the admin endpoints, a base-URL push and an intercepted
push through CONNECT, to an upstream on loopback that refuses, SIGHUP, SIGTERM), and every system
call it made is held against the unit's own lines:
  - SystemCallFilter: each system call is in the allowed set, as
    `systemd-analyze syscall-filter` expands the unit's groups;
  - RestrictAddressFamilies: each socket() is of a family the unit allows;
  - MemoryDenyWriteExecute: no mapping is made writable and executable at once;
  - ProtectSystem=strict with StateDirectory: nothing is written outside the CA
    directory (the state directory);
  - ProcSubset=pid and PrivateDevices: no /proc file outside a process's own
    directory, no device beyond those PrivateDevices leaves.
And TimeoutStopSec is above the shutdown-grace the sample config gives, as
check-config reads it, so that systemd never kills a drain.
What it cannot show: the paths a run did not take (a Redis store, an egress proxy),
and the kernel's own enforcement, which needs systemd as PID 1.

Usage: check-systemd-sandbox.py UNIT BINARY CONFIG
Only loopback is used: the upstream is https://localhost on a closed port.
"""
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

failures = []


def unit_settings(unit):
    settings = {}
    for line in Path(unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def syscall_groups():
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups, current = {}, None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), set())
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.add(line.strip())
    return groups


def expand(names, groups):
    out = set()
    for name in names:
        if name.startswith("@"):
            out |= expand(groups[name], groups)
        else:
            out.add(name)
    return out


def allowed_syscalls(settings):
    groups = syscall_groups()
    allowed = None
    for value in settings.get("SystemCallFilter", []):
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        if deny:
            allowed = (allowed if allowed is not None else set()) - names
        else:
            allowed = names if allowed is None else allowed | names
    return allowed


def request(addr, raw, tls_host=None, cafile=None):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        if tls_host:
            sock.sendall(f"CONNECT {tls_host}:443 HTTP/1.1\r\nHost: {tls_host}:443\r\n\r\n".encode())
            head = sock.recv(4096)
            if b" 200" not in head.split(b"\r\n")[0]:
                return head.decode(errors="replace")
            ctx = ssl.create_default_context(cafile=cafile)
            sock = ctx.wrap_socket(sock, server_hostname=tls_host)
        sock.sendall(raw.encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.decode(errors="replace")


def wait_for(log, text, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines() if log.exists() else []:
            if text in line:
                return json.loads(line)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    sys.exit(f"check-systemd-sandbox: no `{text}` in the log:\n{log.read_text() if log.exists() else ''}")


def exercise(binary, config, work):
    """Runs the proxy under strace through a service's life; returns the trace."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    upstream_port = closed.getsockname()[1]
    closed.close()
    ca_dir = work / "state/ca"
    env = dict(os.environ,
               LINE_RETRY_PROXY_LISTEN="127.0.0.1:0", LINE_RETRY_PROXY_ADMIN_LISTEN="127.0.0.1:0",
               LINE_RETRY_PROXY_CA_DIR=str(ca_dir), LINE_RETRY_PROXY_LOG_FORMAT="json",
               LINE_RETRY_PROXY_UPSTREAM=f"https://localhost:{upstream_port}",
               LINE_RETRY_PROXY_MAX_ATTEMPTS="2", LINE_RETRY_PROXY_RETRY_BASE_DELAY="10ms")
    (work / "state").mkdir(mode=0o700)
    trace, log = work / "trace", work / "log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(["strace", "-f", "-qq", "-s", "256", "-o", str(trace), binary,
                                 "serve", "--config", config], env=env, stderr=stderr, cwd=work)
    try:
        ready = wait_for(log, "line-retry-proxy ready", proc)
        listen, admin = ready["listen"], ready["admin"]
        for path in ("/healthz", "/readyz", "/metrics"):
            answer = request(admin, f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            if " 200 " not in answer.split("\r\n")[0]:
                failures.append(f"admin {path} answered {answer.splitlines()[:1]}")
        body = '{"to":"U0","messages":[{"type":"text","text":"sandbox"}]}'
        push = ("POST /v2/bot/message/push HTTP/1.1\r\nHost: api.line.me\r\nAuthorization: Bearer sandbox\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}")
        for how, answer in (("base-URL push", request(listen, push)),
                            ("intercepted push", request(listen, push, "api.line.me", str(ca_dir / "ca.pem")))):
            # The upstream refuses every connection: the proxy's own error answer.
            if not answer.startswith("HTTP/1.1 5") or "x-line-retry-proxy-error" not in answer.lower():
                failures.append(f"{how}: expected the proxy's 5xx error, got {answer.splitlines()[:1]}")
        # Signals go to the proxy, strace's child, not to strace.
        pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
        wait_for(log, "configuration reloaded", proc)
        os.kill(pid, signal.SIGTERM)
        code = proc.wait(timeout=40)
        if code != 0:
            failures.append(f"exit {code} after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return trace.read_text(), ca_dir


CALL = re.compile(r"^\d+\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()(.*)$")
WRITE_CALLS = {"mkdir", "mkdirat", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat",
               "unlink", "unlinkat", "rmdir", "truncate", "chmod", "fchmodat", "chown", "fchownat"}
DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx", "/dev/shm"}


def check_trace(text, settings, allowed, ca_dir):
    families = set(settings.get("RestrictAddressFamilies", [""])[-1].split())
    seen, sockets = set(), set()
    for line in text.splitlines():
        m = CALL.match(line)
        if not m:
            continue
        name, args = m.group(1) or m.group(2), m.group(3)
        if m.group(1):
            continue  # a resumed call was counted when it began
        seen.add(name)
        if name == "socket":
            sockets.add(args.split(",")[0])
        if name in ("mmap", "mprotect", "pkey_mprotect") and "PROT_WRITE" in args and "PROT_EXEC" in args:
            failures.append(f"MemoryDenyWriteExecute: {line}")
        paths = re.findall(r'"(/[^"]*)"', args)
        writes = name in WRITE_CALLS or (name in ("open", "openat", "openat2", "creat")
                                         and re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", args))
        for path in paths:
            if writes and not path.startswith(str(ca_dir)):
                failures.append(f"ProtectSystem=strict: writes {path} outside the state directory ({name})")
            if path.startswith("/proc/") and not re.match(r"/proc/(self|thread-self|\d+)(/|$)", path):
                failures.append(f"ProcSubset=pid: reads {path}")
            if path.startswith("/dev/") and path not in DEVICES and not path.startswith(("/dev/pts/", "/dev/shm/")):
                failures.append(f"PrivateDevices: opens {path}")
    if allowed is not None:
        for name in sorted(seen - allowed):
            failures.append(f"SystemCallFilter: {name} is not allowed by the unit")
    if families:
        for family in sorted(sockets - families):
            failures.append(f"RestrictAddressFamilies: a socket of family {family}")
    return seen, sockets


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600}
    found = re.findall(r"(\d+)\s*(ms|min|s|m|h)?", duration)
    return sum(int(n) * units[u or "s"] for n, u in found)


def check_stop_timeout(settings, binary, config, work):
    effective = subprocess.run([binary, "check-config", "--config", config], capture_output=True, text=True,
                               env=dict(os.environ, LINE_RETRY_PROXY_CA_DIR=str(work / "ca")), check=True).stdout
    grace = re.search(r'^shutdown-grace = "([^"]+)"', effective, re.M).group(1)
    stop = settings.get("TimeoutStopSec", ["90s"])[-1]
    if not seconds(stop) > seconds(grace):
        failures.append(f"TimeoutStopSec={stop} must be above shutdown-grace {grace}, or systemd kills the drain")
    return stop, grace


def main():
    unit, binary, config = sys.argv[1], os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3])
    settings = unit_settings(unit)
    allowed = allowed_syscalls(settings)
    with tempfile.TemporaryDirectory(prefix="check-systemd-") as tmp:
        work = Path(tmp)
        stop, grace = check_stop_timeout(settings, binary, config, work)
        text, ca_dir = exercise(binary, config, work)
        seen, sockets = check_trace(text, settings, allowed, ca_dir)
    for f in sorted(set(failures)):
        print(f"FAIL {f}")
    if failures:
        print(f"check-systemd-sandbox: {len(set(failures))} problem(s)")
        sys.exit(1)
    print(f"check-systemd-sandbox: ok ({len(seen)} distinct system calls, all within the unit's SystemCallFilter "
          f"({len(allowed)} allowed); sockets {', '.join(sorted(sockets))}; no writable and executable mapping; "
          f"writes only in the CA directory; no /proc file beyond the process's own, no device beyond PrivateDevices; "
          f"TimeoutStopSec={stop} above shutdown-grace {grace})")


if __name__ == "__main__":
    main()
