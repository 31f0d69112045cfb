"""CPU profile of the proxy's keyed path with perf, summarised by component in microseconds
of proxy CPU per request. Run through bench/profile.sh."""

import os
import re
import subprocess
import sys
import tempfile
import time

from benchlib import (
    PUSH, Proxy, cleanup, cpu_split, env_int, free_port, machine_info, make_pki, proc_tree,
    run_wrk, start_nginx, stop_all,
)


# Per request, from `perf stat`: software events and syscall tracepoints (no hardware
# counters needed). Tracepoints need tracefs; without it only the first four are shown.
SOFT = ["task-clock", "context-switches", "cpu-migrations", "page-faults"]
SYSCALLS = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{c}" for c in (
    "writev", "write", "sendto", "sendmsg", "read", "readv", "recvfrom", "epoll_wait",
    "futex")]


def profile(smoke):
    """The keyed path (unique bodies, base-URL mode) under wrk: perf stat of the proxy and of
    nginx as a plain proxy doing the same forwarding, then perf record of the proxy."""
    seconds = 2 if smoke else env_int("DURATION", 10)
    conns, threads = env_int("CONNECTIONS", 32), env_int("THREADS", 2)
    d = tempfile.mkdtemp(prefix="lrp-bench-prof-")
    out = os.environ.get("PERF_OUT") or d
    os.makedirs(out, exist_ok=True)
    try:
        make_pki(d)
        up_port, ng_port = free_port(), free_port()
        start_nginx(d, "upstream", {"PORT": up_port})
        nginx = start_nginx(d, "proxy", {"PORT": ng_port, "UPSTREAM_PORT": up_port,
                                         "WORKERS": os.environ.get("NGINX_WORKERS", "auto")})
        proxy = Proxy(d, up_port, env_int("STORE_MAX_BYTES", 16 << 30))
        targets = {
            "proxy": (f"http://127.0.0.1:{proxy.port}{PUSH}", lambda: [proxy.proc.pid]),
            "nginx": (f"http://127.0.0.1:{ng_port}{PUSH}", lambda: proc_tree(nginx.pid)),
        }
        for url, _ in targets.values():
            run_wrk(url, 2, conns, threads, f"warm{os.getpid()}")
        print(f"machine: {machine_info()}")

        def under(perf_argv, target, nonce):
            url, pids = targets[target]
            pids = pids()
            perf = subprocess.Popen(
                ["perf", *perf_argv, "-p", ",".join(map(str, pids)), "--", "sleep",
                 str(seconds + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.3)  # perf watches from before the load starts until after it ends
            user0, sys0 = cpu_split(pids)
            r = run_wrk(url, seconds, conns, threads, f"{nonce}{os.getpid()}{time.time()}")
            user1, sys1 = cpu_split(pids)
            _, err = perf.communicate(timeout=seconds + 120)
            if perf.returncode:
                sys.exit(f"perf {perf_argv[0]} failed: {err.decode(errors='replace')}")
            n = r["requests"]
            return r, ((user1 - user0) + (sys1 - sys0)) * 1e6 / n, (user1 - user0) * 1e6 / n

        per_req = {}
        for target in ("nginx", "proxy"):
            stat = os.path.join(out, f"perf-stat-{target}.txt")
            events = SOFT + (SYSCALLS if tracepoints() else [])
            r, us, user_us = under(["stat", "-x", ",", "-o", stat, "-e", ",".join(events)],
                                   target, "stat")
            per_req[target] = {"req/s": r["requests"] / r["seconds"], "CPU us": us,
                               "  of it user us": user_us, "  of it kernel us": us - user_us}
            with open(stat) as f:
                for line in f:
                    parts = line.strip().split(",")
                    if len(parts) > 2 and parts[2] in events[1:] and parts[0].isdigit():
                        name = parts[2].split("sys_enter_")[-1].replace("raw_syscalls:", "")
                        per_req[target][name] = int(parts[0]) / r["requests"]
        print("\nper request, keyed push with unique bodies (perf stat over "
              f"{seconds}s of wrk):")
        print(f"  {'':<18}{'nginx proxy':>12}{'line-retry-proxy':>18}")
        for key in per_req["proxy"]:
            fmt = "{:,.0f}" if key == "req/s" else "{:.2f}"
            print(f"  {key:<18}{fmt.format(per_req['nginx'].get(key, 0)):>12}"
                  f"{fmt.format(per_req['proxy'][key]):>18}")

        data = os.path.join(out, "perf.data")
        _, us_per_req, _ = under(["record", "-e", "cpu-clock", "-F",
                               os.environ.get("PERF_FREQ", "999"), "--call-graph",
                               "dwarf,16384", "-o", data], "proxy", "record")
        script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso"],
                                capture_output=True, text=True, timeout=600)
        # The shares come from the profiled run, the microseconds from the unprofiled one:
        # perf's own unwinding slows the proxy while it records.
        summarise(script.stdout, per_req["proxy"]["CPU us"])
        print(f"(while perf recorded: {us_per_req:.1f} us per request)")
        if os.environ.get("PERF_OUT"):
            print(f"perf data: {data}")
        return 0
    finally:
        stop_all()
        cleanup(d)


def tracepoints():
    probe = subprocess.run(["perf", "stat", "-e", "raw_syscalls:sys_enter", "true"],
                           capture_output=True)
    return probe.returncode == 0


# Exclusive breakdown: each sample counts once, for the first component that matches,
# checked in this order against its stack (or, for the LEAF ones, its leaf function). So
# the logger's own allocations and write(2) count as logging, the kernel's work under
# rustls as upstream socket I/O, and a malloc under hyper as allocation.
INCLUSIVE = [
    ("logging (request span, access line, write)", r"tracing_subscriber|tracing_core::event|"
     r"tracing::__macro_support|line_retry_proxy::telemetry"),
    ("metrics", r"line_retry_proxy::metrics"),
    ("fingerprint + key (sha2, uuid)", r"sha2::|uuid::|pipeline::fingerprint|pipeline::key"),
    ("store (shards, records, moka sightings)", r"moka::|store::memory|store::record|"
     r"crossbeam_epoch|crossbeam_channel"),
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
    ("bot connection task (hyper server + handler)", r"listener::serve_connection"),
    ("  Pipeline::handle (all but the upstream task)", r"pipeline::handle|Pipeline::handle"),
    ("    fingerprint + key", r"pipeline::fingerprint|pipeline::key"),
    ("    store claim", r"Store>::claim"),
    ("    upstream work moved to a task (bot gone)", r"tokio::task::spawn::spawn"),
    ("    request span (debug logging only)", r"Subscriber>::(new_span|record|enter|"
     r"exit|try_close|clone_span)|Registry as .*(new_span|try_close)"),
    ("    access log line", r"telemetry::access|Subscriber>::event"),
    ("  upstream work (send + settle, in the handler's task)", r"own::\{\{closure\}\}::\{\{closure\}\}"),
    ("    Upstream::request (hyper-util Client)", r"Upstream>?::request"),
    ("    settle + store settle", r"pipeline::settle|Ticket>::settle"),
    ("upstream connection task (hyper client conn)", r"role::Client|futures_util::future::"
     r"future::Map<Fut,F> as"),
    ("rustls (TLS + its socket I/O), both tasks", r"rustls"),
    ("kernel (leaf in the kernel)", r"^\[kernel"),
]


def summarise(script, us_per_req):
    """Share of samples per component, and the same as microseconds of CPU per request."""
    incl = [(n, re.compile(p)) for n, p in INCLUSIVE]
    kern = [(n, re.compile(p)) for n, p in KERNEL]
    user = [(n, re.compile(p), where) for n, p, where in USER]
    spans = [(n, re.compile(p)) for n, p in SPANS]
    counts, leaves, inside, syscalls, total = {}, {}, {}, {}, 0
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
        if in_kernel:
            call = syscall_of([sym for sym, _ in frames])
            syscalls[call] = syscalls.get(call, 0) + 1
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
    print("\nkernel time by the syscall (or fault, interrupt) it ran under:")
    for name, c in sorted(syscalls.items(), key=lambda kv: -kv[1])[:8]:
        print(line(name, c))
    print("\nhottest leaf functions (self time):")
    for sym, c in sorted(leaves.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {100 * c / total:5.1f}% {us_per_req * c / total:6.2f} us  {sym[:110]}")


def syscall_of(stack):
    """The syscall a kernel stack ran under: the frame just below do_syscall_64."""
    if "do_syscall_64" in stack:
        handler = stack[stack.index("do_syscall_64") - 1]
        return re.sub(r"^(__x64_sys_|__do_sys_|do_|__sys_|ksys_)", "", handler) + "(2)"
    entry = next((f for f in stack if f.startswith("asm_")), "other")
    return "no syscall: " + entry.replace("asm_", "")
