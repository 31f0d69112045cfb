#!/usr/bin/env python3
"""The throughput and memory benchmarks of bench/README.md (Python 3 standard library only).

    harness.py throughput [--smoke]   behind bench/run.sh
    harness.py memory [--smoke]       behind bench/memory.sh
    harness.py profile [--smoke]      behind bench/profile.sh (perfprofile.py)
"""

import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

from benchlib import (
    PROXY_BIN, LOAD_BIN, PUSH, TICK, Proxy, cleanup, cpu_seconds, env_int, free_port,
    machine_info, machine_ticks, make_pki, metric, on_signal, post, proc_tree, reset_peak_rss,
    run_load, run_wrk, settle, start_nginx, status_kb, stop_all, stop_all_but_upstream,
)

# ---------------------------------------------------------------- throughput


def throughput(smoke):
    seconds = 1 if smoke else env_int("DURATION", 10)
    rounds = 1 if smoke else env_int("ROUNDS", 3)
    warmup = 1 if smoke else env_int("WARMUP", 2)
    conns = env_int("CONNECTIONS", 32)
    threads = env_int("THREADS", 2)
    quiet = env_int("QUIET", 0)  # on a shared machine: wait up to QUIET s for it to be idle
    d = tempfile.mkdtemp(prefix="lrp-bench-")
    try:
        make_pki(d)
        up_port, ng_port = free_port(), free_port()
        upstream = start_nginx(d, "upstream", {"PORT": up_port})
        nginx = start_nginx(d, "proxy", {"PORT": ng_port, "UPSTREAM_PORT": up_port,
                                         "WORKERS": os.environ.get("NGINX_WORKERS", "auto")})
        proxy = Proxy(d, up_port, env_int("STORE_MAX_BYTES", 16 << 30))
        sanity(up_port, ng_port, proxy, os.path.join(d, "ca.pem"))

        ours = lambda: proc_tree(upstream.pid) + proc_tree(nginx.pid) + [proxy.proc.pid]
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
                if quiet:
                    wait_quiet(quiet)
                nonce = f"{run_id}m{modes.index((name, pids, drive, expect))}r{rnd}"
                res = measure(pids(), ours(), lambda: drive(seconds, nonce),
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


def wait_quiet(limit, idle_enough=0.9):
    """Waits (at most `limit` seconds) for a second in which the machine is at least 90% idle,
    so that a run starts when nothing else is busy; the run's `other` column still says how
    quiet it stayed."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        all0, proc0, _ = machine_ticks()
        time.sleep(1)
        all1, proc1, _ = machine_ticks()
        if proc1 - proc0 <= (1 - idle_enough) * (all1 - all0):
            return


def children_cpu():
    """CPU of the load generators this harness has waited for."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(pids, ours, drive, proxy, expect):
    """Runs `drive` and reads what it cost `pids`; `ours` are all the servers of the bench, so
    that CPU used by anything else on the machine during the run can be reported beside it."""
    reset_peak_rss(pids)
    before_m = proxy.metrics() if proxy else None
    cpu0, ours0, load0 = cpu_seconds(pids), cpu_seconds(ours), children_cpu()
    all0, proc0, steal0 = machine_ticks()
    r = drive()
    all1, proc1, steal1 = machine_ticks()
    cpu1, ours1, load1 = cpu_seconds(pids), cpu_seconds(ours), children_cpu()
    r["rps"] = r["requests"] / r["seconds"] if r["seconds"] else 0.0
    r["cpu_ms_per_1k"] = (cpu1 - cpu0) * 1e6 / r["requests"] if r["requests"] else 0.0
    r["peak_rss_kb"] = sum(status_kb(p, "VmHWM") for p in pids)
    foreign = (proc1 - proc0) / TICK - (ours1 - ours0) - (load1 - load0)
    r["foreign_cpu"] = max(0.0, 100.0 * foreign / max(1e-9, (all1 - all0) / TICK))
    r["steal"] = 100.0 * (steal1 - steal0) / max(1, all1 - all0)
    r["chain_ms_per_1k"] = ((ours1 - ours0) + (load1 - load0)) * 1e6 / max(1, r["requests"])
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


LEGEND = """\
req/s, p50, p99: medians over rounds; +p99: over direct's; ratios of req/s: per round, then
the median. other: the largest share of the machine's CPU that processes outside the
benchmark took during a run; steal: the largest share the hypervisor gave to other guests
(above a few %, every number here is disturbed). server CPU: of the server under test
(nginx: master + workers); all CPU: of the load generator, both nginx and the proxy
together; x nginx by CPU: nginx's all CPU over this mode's, the throughput ratio to expect
when the benchmark has the machine to itself; peak RSS: VmHWM during the run."""


def report(results, smoke):
    med = lambda name, key: statistics.median(r[key] for r in results[name])
    rounds = len(results["direct"])

    def ratio(name, base):
        return statistics.median(results[name][i]["rps"] / results[base][i]["rps"]
                                 for i in range(rounds) if results[base][i]["rps"])

    per_1k = lambda name, key: sum(r[key] * r["requests"] for r in results[name]) / max(
        1, sum(r["requests"] for r in results[name]))
    direct_p99 = med("direct", "p99_us")
    print(f"\n{'mode':<21}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'+p99 ms':>9}{'x direct':>9}"
          f"{'x nginx':>8}{'other':>7}{'steal':>6}  check")
    for name, rs in results.items():
        check = ""
        if rs[0]["check"] is not None:
            check = f"{min(r['outcome_share'] for r in rs):.0%} " + (
                "replayed" if "replayed" in name else "fresh")
        fails = sum(r["errors"] + r["non_2xx"] for r in rs)
        if fails:
            check += f" {fails} FAILED"
        print(f"{name:<21}{med(name, 'rps'):>9,.0f}{med(name, 'p50_us') / 1e3:>8.2f}"
              f"{med(name, 'p99_us') / 1e3:>8.2f}{(med(name, 'p99_us') - direct_p99) / 1e3:>+9.2f}"
              f"{ratio(name, 'direct'):>9.2f}{ratio(name, 'nginx proxy'):>8.2f}"
              f"{max(r['foreign_cpu'] for r in rs):>6.0f}%{max(r['steal'] for r in rs):>5.0f}%"
              f"  {check}")
    print(f"\n{'mode':<21}{'server CPU':>11}{'all CPU':>9}{'x nginx':>9}{'peak RSS':>11}")
    print(f"{'':<21}{'ms/1k req':>11}{'ms/1k':>9}{'by CPU':>9}{'of server':>11}")
    chain_nginx = per_1k("nginx proxy", "chain_ms_per_1k")
    for name, rs in results.items():
        chain = per_1k(name, "chain_ms_per_1k")
        print(f"{name:<21}{per_1k(name, 'cpu_ms_per_1k'):>11.1f}{chain:>9.1f}"
              f"{chain_nginx / chain if chain else 0:>9.2f}"
              f"{max(r['peak_rss_kb'] for r in rs) / 1024:>9.1f}Mi")
    print(LEGEND)
    nginx_p99_added = med("nginx proxy", "p99_us") - direct_p99
    proxy_p99_added = med("proxy unique", "p99_us") - direct_p99
    cpu_of = lambda n: per_1k(n, "cpu_ms_per_1k")
    same_client = statistics.median(results["HTTPS_PROXY unique*"][i]["rps"]
                                    / results["base-URL unique*"][i]["rps"]
                                    for i in range(rounds))
    print(f"\ntargets{' (smoke: too short to mean anything)' if smoke else ''}:")
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
        run_load(proxy.port, 60, conns, 2, "warm", requests=2_000)
        settle(proxy)
        rss0 = proxy.rss_kb() * 1024
        peak = {"bytes": 0.0, "entries": 0.0, "rss": 0}
        done = threading.Event()

        def watch():
            while not done.wait(0.2):
                try:
                    m = proxy.metrics()
                except OSError:
                    continue
                peak["bytes"] = max(peak["bytes"], metric(m, "line_retry_proxy_store_bytes"))
                peak["entries"] = max(peak["entries"], metric(m, "line_retry_proxy_store_entries"))
                peak["rss"] = max(peak["rss"], proxy.rss_kb() * 1024)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        r = run_load(proxy.port, 3600, conns, 2, "bound", requests=n)
        done.set()
        watcher.join()
        m = settle(proxy)
        held = peak["bytes"] <= bound
        grown = max(peak["rss"], proxy.rss_kb() * 1024) - rss0
        print(f"\nstore-max-bytes {bound:,}: {r['requests']:,} distinct pushes, sampled every 0.2s")
        print(f"  peak store_bytes            {peak['bytes']:>14,.0f}  ({peak['entries']:,.0f} "
              f"entries; final {metric(m, 'line_retry_proxy_store_bytes'):,.0f}): "
              f"{'held' if held else 'EXCEEDED'}")
        print(f"  peak RSS growth over start  {grown:>14,.0f}  ({grown / bound:.2f}x the bound: "
              f"what the bound costs in memory)")
        if peak["bytes"] < bound / 2:
            print("  (the fill did not reach the bound: raise N or lower STORE_BOUND)")
        return 0 if r["errors"] == 0 and r["non_2xx"] == 0 else 1
    finally:
        stop_all()
        cleanup(d)


def main():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if len(sys.argv) < 2 or sys.argv[1] not in ("throughput", "memory", "profile"):
        sys.exit(__doc__)
    smoke = "--smoke" in sys.argv[2:]
    for tool in ("nginx", "wrk", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install nginx wrk openssl")
    for binary in (PROXY_BIN, LOAD_BIN):
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary} missing: run bench/run.sh, which builds it")
    if sys.argv[1] == "profile":
        if not shutil.which("perf"):
            sys.exit("perf not found: apt-get install linux-perf")
        from perfprofile import profile
        sys.exit(profile(smoke))
    if sys.argv[1] == "throughput" and smoke:
        # The smoke CI runs: both benchmarks, briefly, in one process.
        sys.exit(throughput(True) or memory(True))
    sys.exit({"throughput": throughput, "memory": memory}[sys.argv[1]](smoke))


if __name__ == "__main__":
    main()
