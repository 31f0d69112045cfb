#!/usr/bin/env python3
"""Offline checks of the deployment examples: they parse, and they agree with the
binary and with each other on ports, paths and environment names.

Usage: check-examples.py PATH/TO/line-retry-proxy
No container engine is needed: this reads the files, and asks the binary its --help.
"""
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def known_env_names(binary):
    names = set()
    for args in ([], ["ca"], ["healthcheck"], ["check-config"]):
        out = subprocess.run([binary, *args, "--help"], capture_output=True, text=True, check=True).stdout
        names.update(re.findall(r"env: (LINE_RETRY_PROXY_[A-Z0-9_]+)", out))
    return names


def env_of(container):
    env = container.get("environment") or container.get("env") or {}
    if isinstance(env, list):
        return {e["name"]: str(e.get("value", "")) for e in env}
    return {k: str(v) for k, v in env.items()}


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check_env_names(where, env, known):
    for name in env:
        if name.startswith("LINE_RETRY_PROXY_"):
            check(name in known, f"{where}: {name} is not an option of the binary")


def check_compose(known):
    path = ROOT / "examples/compose/docker-compose.yml"
    doc = yaml.safe_load(path.read_text())
    services = doc["services"]
    proxy, bot = services["proxy"], services["bot"]
    penv, benv = env_of(proxy), env_of(bot)
    check_env_names("compose proxy", penv, known)

    listen = penv.get("LINE_RETRY_PROXY_LISTEN", "")
    check(listen.startswith("0.0.0.0:"), "compose: the proxy must listen on 0.0.0.0 explicitly to serve the bot container")
    check(benv.get("HTTPS_PROXY") == f"http://proxy:{port_of(listen)}", "compose: bot HTTPS_PROXY must point at proxy:<listen port>")
    admin_port = port_of(penv.get("LINE_RETRY_PROXY_ADMIN_LISTEN", "127.0.0.1:9090"))
    check(any(str(p).endswith(f":{admin_port}") for p in proxy.get("ports", [])), "compose: admin port not published")
    check("healthcheck" in proxy["healthcheck"]["test"], "compose: healthcheck must use the healthcheck subcommand")
    check((path.parent / proxy["build"] / "Dockerfile").resolve().is_file(), "compose: build context has no Dockerfile")

    ca_dir = penv["LINE_RETRY_PROXY_CA_DIR"]
    pmounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    check(ca_dir in pmounts, "compose: the proxy's CA dir is not a volume")
    volume = pmounts.get(ca_dir)
    check(volume in (doc.get("volumes") or {}), "compose: the CA volume is not declared")
    bmounts = {v.split(":")[0]: v.split(":")[1] for v in bot["volumes"]}
    check(volume in bmounts, "compose: the bot does not mount the CA volume")
    bundle = f"{bmounts.get(volume)}/ca.pem"
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"):
        check(benv.get(var) == bundle, f"compose: bot {var} must be {bundle}")


def check_replicas(known):
    """The two-replica file: every replica shares one Redis and one CA, made once."""
    path = ROOT / "examples/compose/replicas.yml"
    doc = yaml.safe_load(path.read_text())
    services = doc["services"]
    proxy, bot, ca, redis = (services[n] for n in ("proxy", "bot", "ca", "redis"))
    penv, benv, caenv = env_of(proxy), env_of(bot), env_of(ca)
    check_env_names("replicas proxy", penv, known)
    check_env_names("replicas ca", caenv, known)
    check(proxy.get("deploy", {}).get("replicas", 1) >= 2, "replicas: the proxy must run at least two replicas")

    store = penv.get("LINE_RETRY_PROXY_STORE", "")
    m = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?(?:/(\d+))?$", store)
    check(m is not None, f"replicas: LINE_RETRY_PROXY_STORE is not a redis URL: {store}")
    if m:
        check(m.group(1) == "redis", "replicas: the store must be the redis service")
    check("redis-server" in redis["command"], "replicas: the redis service must run redis-server")
    check("redis" in proxy.get("depends_on", {}), "replicas: the proxy must wait for redis")
    check("${REDIS_PASSWORD" in store and any("REDIS_PASSWORD" in str(a) for a in redis["command"]),
          "replicas: the store URL and redis-server must share REDIS_PASSWORD")

    listen = penv.get("LINE_RETRY_PROXY_LISTEN", "")
    check(listen.startswith("0.0.0.0:"), "replicas: the proxy must listen on 0.0.0.0 explicitly")
    check(benv.get("HTTPS_PROXY") == f"http://proxy:{port_of(listen)}", "replicas: bot HTTPS_PROXY must point at proxy:<listen port>")
    check("healthcheck" in proxy["healthcheck"]["test"], "replicas: healthcheck must use the healthcheck subcommand")
    check((path.parent / ca["build"] / "Dockerfile").resolve().is_file(), "replicas: build context has no Dockerfile")

    ca_dir = penv["LINE_RETRY_PROXY_CA_DIR"]
    check(ca.get("command") == ["ca"] and caenv.get("LINE_RETRY_PROXY_CA_DIR") == ca_dir,
          "replicas: the ca service must create the CA in the replicas' CA dir")
    check(proxy.get("depends_on", {}).get("ca", {}).get("condition") == "service_completed_successfully",
          "replicas: the replicas must start after the CA exists")
    pmounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    cmounts = {v.split(":")[1]: v.split(":")[0] for v in ca["volumes"]}
    volume = pmounts.get(ca_dir)
    check(volume is not None and cmounts.get(ca_dir) == volume, "replicas: ca and proxy must share the CA volume")
    check(volume in (doc.get("volumes") or {}), "replicas: the CA volume is not declared")
    bmounts = {v.split(":")[0]: v.split(":")[1] for v in bot["volumes"]}
    bundle = f"{bmounts.get(volume)}/ca.pem"
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"):
        check(benv.get(var) == bundle, f"replicas: bot {var} must be {bundle}")


def check_pod(known):
    doc = yaml.safe_load((ROOT / "examples/kubernetes/pod.yaml").read_text())
    check(doc["kind"] == "Pod", "pod: kind must be Pod")
    containers = {c["name"]: c for c in doc["spec"]["containers"]}
    proxy, bot = containers["line-retry-proxy"], next(c for n, c in containers.items() if n != "line-retry-proxy")
    penv, benv = env_of(proxy), env_of(bot)
    check_env_names("pod proxy", penv, known)
    listen = penv.get("LINE_RETRY_PROXY_LISTEN", "127.0.0.1:8080")
    ports = {p["containerPort"] for p in proxy["ports"]}
    check(port_of(listen) in ports, "pod: listen port not declared")
    check(port_of(penv.get("LINE_RETRY_PROXY_ADMIN_LISTEN", "127.0.0.1:9090")) in ports, "pod: admin port not declared")
    check(benv.get("HTTPS_PROXY") == f"http://127.0.0.1:{port_of(listen)}", "pod: bot HTTPS_PROXY must be the sidecar on loopback")
    for probe in ("readinessProbe", "livenessProbe"):
        check("healthcheck" in proxy[probe]["exec"]["command"], f"pod: {probe} must use the healthcheck subcommand")
    ca_dir = penv["LINE_RETRY_PROXY_CA_DIR"]
    pmounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    check(ca_dir in pmounts, "pod: the proxy's CA dir is not mounted")
    bmounts = {m["name"]: m["mountPath"] for m in bot["volumeMounts"]}
    bundle = f"{bmounts.get(pmounts.get(ca_dir))}/ca.pem"
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS"):
        check(benv.get(var) == bundle, f"pod: bot {var} must be {bundle}")
    check(doc["spec"]["securityContext"].get("runAsNonRoot") is True, "pod: must run as non-root")


def check_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    check("RUN scripts/build-release.sh" in text, "Dockerfile: must build with scripts/build-release.sh (what CI runs)")
    check(re.search(r"^USER (?!0|root)\S+", text, re.M) is not None, "Dockerfile: must run as non-root")
    ca = re.search(r"^ENV LINE_RETRY_PROXY_CA_DIR=(\S+)", text, re.M)
    check(ca is not None and f'VOLUME ["{ca.group(1)}"]' in text, "Dockerfile: the CA dir must be a volume")
    check("LINE_RETRY_PROXY_LISTEN" not in re.sub(r"#.*", "", text), "Dockerfile: 0.0.0.0 only by explicit setting, not baked in")
    check(re.search(r"^HEALTHCHECK .*\n?.*healthcheck", text, re.M) is not None, "Dockerfile: HEALTHCHECK must use the subcommand")
    check("EXPOSE 8080 9090" in text, "Dockerfile: must expose 8080 and 9090")
    check(re.search(r"^FROM .* AS build", text, re.M) is not None and text.count("\nFROM ") >= 1, "Dockerfile: must be multi-stage")


def main():
    binary = sys.argv[1]
    known = known_env_names(binary)
    check("LINE_RETRY_PROXY_LISTEN" in known, "binary --help does not list its env names")
    check_compose(known)
    check_replicas(known)
    check_pod(known)
    check_dockerfile()
    for f in failures:
        print(f"FAIL {f}")
    checks = "compose, replicas, pod, Dockerfile"
    if failures:
        print(f"examples: {len(failures)} problem(s)")
        sys.exit(1)
    print(f"examples: ok ({checks})")


if __name__ == "__main__":
    main()
