"""CPU profile of the proxy's keyed path with perf, summarised by component in microseconds
of proxy CPU per request. Run through bench/profile.sh."""

import os
import re
import subprocess
import sys
import tempfile
import time

from benchlib import (
    PUSH, Proxy, cleanup, cpu_seconds, env_int, free_port, machine_info, make_pki,
    run_wrk, start_nginx, stop_all,
)


def profile(smoke):
    """CPU profile of the proxy on the keyed path (unique bodies, base-URL mode): perf stat for
    CPU and context switches per request, then perf record with DWARF call graphs."""
    seconds = 2 if smoke else env_int("DURATION", 10)
    conns, threads = env_int("CONNECTIONS", 32), env_int("THREADS", 2)
    d = tempfile.mkdtemp(prefix="lrp-bench-prof-")
    out = os.environ.get("PERF_OUT") or d
    try:
        make_pki(d)
        up_port = free_port()
        start_nginx(d, "upstream", {"PORT": up_port})
        proxy = Proxy(d, up_port, env_int("STORE_MAX_BYTES", 16 << 30))
        pid = str(proxy.proc.pid)
        url = f"http://127.0.0.1:{proxy.port}{PUSH}"
        run_wrk(url, 2, conns, threads, "warm")
        print(f"machine: {machine_info()}")

        def under(perf_argv, nonce):
            perf = subprocess.Popen(["perf", *perf_argv, "-p", pid, "--", "sleep", str(seconds)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.2)  # perf attached before the load starts
            cpu0 = cpu_seconds([proxy.proc.pid])
            r = run_wrk(url, seconds, conns, threads, nonce)
            cpu = cpu_seconds([proxy.proc.pid]) - cpu0
            _, err = perf.communicate(timeout=seconds + 120)
            if perf.returncode:
                sys.exit(f"perf {perf_argv[0]} failed: {err.decode(errors='replace')}")
            return r, cpu

        stat = os.path.join(out, "perf-stat.txt")
        r, cpu = under(["stat", "-x", ",", "-o", stat, "-e",
                        "task-clock,context-switches,cpu-migrations,page-faults"], "stat")
        us_per_req = cpu * 1e6 / r["requests"]
        print(f"\nkeyed push, unique bodies, base-URL mode: {r['requests'] / r['seconds']:,.0f} "
              f"req/s, proxy CPU {us_per_req:.1f} us per request (utime+stime)")
        with open(stat) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) > 2 and parts[0] and parts[2] in ("context-switches",
                                                               "cpu-migrations", "page-faults"):
                    print(f"  {parts[2]:<18}{float(parts[0]) / r['requests']:8.2f} per request")

        data = os.path.join(out, "perf.data")
        under(["record", "-e", "cpu-clock", "-F", os.environ.get("PERF_FREQ", "999"),
               "--call-graph", "dwarf,16384", "-o", data], "record")
        script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"],
                                capture_output=True, text=True, timeout=600)
        summarise(script.stdout, us_per_req)
        print(f"\nperf data: {data} (kept)" if os.environ.get("PERF_OUT") else "")
        return 0
    finally:
        stop_all()
        if not os.environ.get("PERF_OUT"):
            cleanup(d)


# Exclusive breakdown: each sample counts once, for the first component that matches,
# checked in this order against its stack (or, for the LEAF ones, its leaf function). So
# the logger's own allocations and write(2) count as logging, the kernel's work under
# rustls as upstream socket I/O, and a malloc under hyper as allocation.
INCLUSIVE = [
    ("logging (tracing, JSON, write to the log)", r"tracing_subscriber|tracing_core::event|"
     r"tracing::__macro_support|line_retry_proxy::telemetry"),
    ("metrics", r"line_retry_proxy::metrics"),
    ("fingerprint + key (sha2, uuid)", r"sha2::|uuid::|pipeline::fingerprint|pipeline::key"),
    ("store (moka)", r"moka::|store::memory|crossbeam_epoch|crossbeam_channel"),
    ("task spawn/teardown (tokio task cells)", r"tokio::task::spawn::spawn|Harness<T,S>::"
     r"(complete|dealloc)|task::raw::dealloc|Cell<T,S>::new|OwnedTasks<S>::(bind_inner|remove)"),
]
KERNEL = [
    ("kernel: upstream socket (TLS records)", r"rustls"),
    ("kernel: bot socket, epoll, futex, sched", r""),
]
USER = [
    ("upstream TLS (rustls, ring)", r"rustls::|tokio_rustls|ring::|ring_core_", "stack"),
    ("allocation (malloc/free)", r"malloc|free|realloc|_int_|tcache|arena|unlink_chunk", "leaf"),
    ("memcpy/memmove/memset", r"mem(cpy|move|set)", "leaf"),
    ("hyper + http (parse, encode, pool)", r"hyper::|hyper_util::|httparse|http::|want::", "leaf"),
    ("tokio (scheduler, wakers, timers, io)", r"tokio::|tokio_util::|mio::|std::sys::", "leaf"),
    ("request path (pipeline, app)", r"line_retry_proxy::", "leaf"),
]
# Inclusive: the share of samples with this function anywhere on the stack (they overlap).
SPANS = [
    ("bot connection (hyper server, the keyed path)", r"listener::serve_connection"),
    ("  pipeline::handle (all but the upstream task)", r"pipeline::handle"),
    ("    fingerprint + key", r"pipeline::fingerprint|pipeline::key"),
    ("    store claim", r"Store>::claim"),
    ("    spawn of the upstream task", r"tokio::task::spawn::spawn"),
    ("    access log line", r"tracing_core::event|tracing_subscriber"),
    ("upstream task: Upstream::request (hyper-util)", r"Upstream::request"),
    ("upstream task: settle + store settle", r"pipeline::settle|Ticket>::settle"),
    ("upstream connection (hyper client)", r"hyper::client::conn"),
    ("  rustls (TLS + its socket I/O)", r"rustls"),
    ("kernel (leaf in the kernel)", r"^\[kernel"),
]


def summarise(script, us_per_req):
    """Share of samples per component, and the same as microseconds of CPU per request."""
    incl = [(n, re.compile(p)) for n, p in INCLUSIVE]
    kern = [(n, re.compile(p)) for n, p in KERNEL]
    user = [(n, re.compile(p), where) for n, p, where in USER]
    spans = [(n, re.compile(p)) for n, p in SPANS]
    counts, leaves, inside, total = {}, {}, {}, 0
    for sample in script.split("\n\n"):
        frames = []
        for line in sample.strip().splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) == 2:
                sym, _, dso = parts[1].rpartition(" (")
                frames.append((sym or "[unknown]", dso.rstrip(")")))
        if not frames:
            continue
        total += 1
        text = "\n".join(s for s, _ in frames)
        in_kernel = frames[0][1].startswith("[kernel")
        top = ("[kernel] " if in_kernel else "") + frames[0][0]
        name = next((n for n, rx in incl if rx.search(text)), None)
        if name is None and in_kernel:
            name = next(n for n, rx in kern if rx.search(text))
        if name is None:
            name = next((n for n, rx, where in user
                         if rx.search(text if where == "stack" else top)),
                        "other: " + os.path.basename(frames[0][1]))
        counts[name] = counts.get(name, 0) + 1
        leaves[top] = leaves.get(top, 0) + 1
        for n, rx in spans:
            if rx.search(top if rx.pattern.startswith("^") else text):
                inside[n] = inside.get(n, 0) + 1
    line = lambda n, c: f"  {n:<46}{100 * c / total:6.1f}% {us_per_req * c / total:7.1f} us"
    print(f"\n{total:,} samples. Where a request's {us_per_req:.1f} us of proxy CPU go "
          "(exclusive, adds up to 100%):")
    for name, c in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(line(name, c))
    print("\ninclusive (a function and everything it calls; rows overlap):")
    for name, _ in SPANS:
        print(line(name, inside.get(name, 0)))
    print("\nhottest leaf functions (self time):")
    for sym, c in sorted(leaves.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {100 * c / total:5.1f}% {us_per_req * c / total:6.2f} us  {sym[:110]}")
