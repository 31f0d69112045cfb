#!/usr/bin/env python3
"""Offline checks of the deployment examples: they parse, and they agree with the
binary, with the Dockerfile and with each other on ports, paths, image tags and
environment names; the bot never gets the CA's private key; the admin port can be
scraped.

Usage: check-examples.py PATH/TO/line-retry-proxy
No container engine is needed: this reads the files, and asks the binary its --help.
Whether the Dockerfile builds is proved by scripts/replay-dockerfile.py, whose parser
this reuses.
"""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
failures = []
TRUST_VARS = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")


def load_replay():
    spec = importlib.util.spec_from_file_location("replay_dockerfile", ROOT / "scripts/replay-dockerfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cargo_version():
    text = (ROOT / "Cargo.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def check_image(where, image, pull_policy="not kubernetes"):
    name, _, tag = image.rpartition(":")
    check(name == "line-retry-proxy", f"{where}: image {image} is not line-retry-proxy")
    check(tag == cargo_version(), f"{where}: image tag must be the crate version {cargo_version()}, not {tag or 'none'}")
    if pull_policy != "not kubernetes":
        check(pull_policy == "IfNotPresent", f"{where}: imagePullPolicy must be IfNotPresent (the image is built and loaded, not published)")


def check(cond, what):
    if not cond:
        failures.append(what)
    return cond


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


def compose_mounts(name, service):
    """(source, target) of each volume of a compose service, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v["source"], v["target"]
            if v.get("type") == "bind":
                check(v.get("bind", {}).get("create_host_path") is False,
                      f"compose: {name} bind mount {source} must set create_host_path: false")
        out.append((source, target))
    return out


def check_compose_hardening(where, services):
    """Every service: a restart policy, CPU and memory limits, a read-only root
    filesystem, no capabilities, no-new-privileges."""
    for name, service in services.items():
        sw = f"{where}: {name}"
        check(service.get("restart") in ("always", "unless-stopped", "on-failure"), f"{sw} needs a restart policy")
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        check({"cpus", "memory"} <= set(limits), f"{sw} needs deploy.resources.limits for cpus and memory")
        check(service.get("read_only") is True, f"{sw} must have a read-only root filesystem (read_only: true)")
        check(service.get("cap_drop") == ["ALL"], f"{sw} must drop every capability (cap_drop: [ALL])")
        check("no-new-privileges:true" in service.get("security_opt", []), f"{sw} must set security_opt no-new-privileges:true")
        check(not service.get("cap_add") and not service.get("privileged"), f"{sw} must not add privileges back")


def check_compose_prometheus(path, services, admin_port):
    """The monitoring profile: its files exist, sit side by side as prometheus.yml
    expects, and it scrapes the proxy's admin port."""
    prom = services.get("prometheus")
    check(prom is not None, "compose: no prometheus service (profile monitoring)")
    if prom is None:
        return
    mounts = dict(compose_mounts("prometheus", prom))
    for source in mounts:
        check((path.parent / source).is_file(), f"compose: prometheus mounts {source}, which does not exist")
    config_source = next((s for s, t in mounts.items() if t == "/etc/prometheus/prometheus.yml"), None)
    check(config_source is not None, "compose: prometheus must mount prometheus.yml at /etc/prometheus/prometheus.yml")
    if config_source is None or not (path.parent / config_source).is_file():
        return
    config = yaml.safe_load((path.parent / config_source).read_text())
    for rule_file in config.get("rule_files", []):
        target = f"/etc/prometheus/{rule_file}"
        source = next((s for s, t in mounts.items() if t == target), None)
        check(source is not None, f"compose: prometheus.yml loads {rule_file}, not mounted at {target}")
        check(source is None or (path.parent / source).resolve() == (path.parent / config_source).parent.resolve() / rule_file,
              f"compose: {target} is not the {rule_file} beside prometheus.yml")
    targets = [t for job in config.get("scrape_configs", []) for sc in job.get("static_configs", []) for t in sc["targets"]]
    check(f"proxy:{admin_port}" in targets, f"compose: prometheus.yml must scrape proxy:{admin_port}")


def check_compose(known, image):
    binary, image_ca_dir = image
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
    check(proxy["healthcheck"]["test"] == ["CMD", binary, "healthcheck"], "compose: healthcheck must run the image's healthcheck subcommand")
    check((path.parent / proxy["build"] / "Dockerfile").resolve().is_file(), "compose: build context has no Dockerfile")

    check_image("compose proxy", proxy.get("image", ""))
    check(penv.get("LINE_RETRY_PROXY_ADMIN_LISTEN", "").startswith("0.0.0.0:"),
          "compose: the admin listener must be on 0.0.0.0 so Prometheus on the network can scrape it")

    ca_dir = penv["LINE_RETRY_PROXY_CA_DIR"]
    # The image's CA dir is owned by the non-root user; a new volume there inherits that.
    check(ca_dir == image_ca_dir, f"compose: the CA dir must be the image's {image_ca_dir}")
    pmounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    check(ca_dir in pmounts, "compose: the proxy's CA dir is not a volume")
    volume = pmounts.get(ca_dir)
    check(volume in (doc.get("volumes") or {}), "compose: the CA volume is not declared")
    # No other service may see the CA directory: it holds ca.key.
    for name, service in services.items():
        if name == "proxy":
            continue
        for source, _ in compose_mounts(name, service):
            check(source != volume, f"compose: {name} mounts the proxy's CA volume, and with it ca.key")
    bmounts = {target: source for source, target in compose_mounts("bot", bot)}
    bundle = benv.get("SSL_CERT_FILE", "")
    check(bundle in bmounts, "compose: the bot's SSL_CERT_FILE is not a file the bot mounts")
    check(Path(bmounts.get(bundle, "")).name == "bundle.pem",
          "compose: the bot must trust a bundle (system roots + proxy CA) made with `ca --bundle`")
    for var in TRUST_VARS:
        check(benv.get(var) == bundle, f"compose: bot {var} must be {bundle}")
    check_compose_prometheus(path, services, admin_port)
    check_compose_hardening("compose", services)
    check("ca --bundle > bundle.pem" in path.read_text(),
          "compose: the header must show how bundle.pem is made (ca --bundle > bundle.pem)")


def check_replicas(known, image):
    """The two-replica file: every replica shares one Redis and one CA; the bot gets
    the bundle, never the CA's key."""
    binary, image_ca_dir = image
    path = ROOT / "examples/compose/replicas.yml"
    doc = yaml.safe_load(path.read_text())
    services = doc["services"]
    proxy, bot, redis = (services[n] for n in ("proxy", "bot", "redis"))
    penv, benv = env_of(proxy), env_of(bot)
    check_env_names("replicas proxy", penv, known)
    check_image("replicas proxy", proxy.get("image", ""))
    check(proxy.get("deploy", {}).get("replicas", 1) >= 2, "replicas: the proxy must run at least two replicas")
    check((path.parent / proxy["build"] / "Dockerfile").resolve().is_file(), "replicas: build context has no Dockerfile")
    check(proxy["healthcheck"]["test"] == ["CMD", binary, "healthcheck"], "replicas: healthcheck must run the image's healthcheck subcommand")

    store = penv.get("LINE_RETRY_PROXY_STORE", "")
    m = re.match(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?(?:/(\d+))?$", store)
    check(m is not None, f"replicas: LINE_RETRY_PROXY_STORE is not a redis URL: {store}")
    if m:
        check(m.group(1) == "redis", "replicas: the store must be the redis service")
    check("redis-server" in redis["command"], "replicas: the redis service must run redis-server")
    check(proxy.get("depends_on", {}).get("redis", {}).get("condition") == "service_healthy",
          "replicas: the proxy must wait for a healthy redis")
    check("${REDIS_PASSWORD" in store and any("REDIS_PASSWORD" in str(a) for a in redis["command"]),
          "replicas: the store URL and redis-server must share REDIS_PASSWORD")

    listen = penv.get("LINE_RETRY_PROXY_LISTEN", "")
    check(listen.startswith("0.0.0.0:"), "replicas: the proxy must listen on 0.0.0.0 explicitly")
    check(benv.get("HTTPS_PROXY") == f"http://proxy:{port_of(listen)}", "replicas: bot HTTPS_PROXY must point at proxy:<listen port>")

    ca_dir = penv["LINE_RETRY_PROXY_CA_DIR"]
    check(ca_dir == image_ca_dir, f"replicas: the CA dir must be the image's {image_ca_dir}")
    pmounts = {target: source for source, target in compose_mounts("proxy", proxy)}
    volume = pmounts.get(ca_dir)
    check(volume in (doc.get("volumes") or {}), "replicas: the replicas' CA dir must be one declared volume, shared by all")
    for name, service in services.items():
        if name == "proxy":
            continue
        for source, _ in compose_mounts(name, service):
            check(source != volume, f"replicas: {name} mounts the proxy's CA volume, and with it ca.key")
    bmounts = {target: source for source, target in compose_mounts("bot", bot)}
    bundle = benv.get("SSL_CERT_FILE", "")
    check(Path(bmounts.get(bundle, "")).name == "bundle.pem",
          "replicas: the bot must trust a bundle (system roots + proxy CA) made with `ca --bundle`")
    for var in TRUST_VARS:
        check(benv.get(var) == bundle, f"replicas: bot {var} must be {bundle}")
    check("ca --bundle > bundle.pem" in path.read_text(),
          "replicas: the header must show how bundle.pem is made (ca --bundle > bundle.pem)")
    check_compose_hardening("replicas", services)


def k8s_probe_target(container, probe):
    """(path, port number) of an httpGet probe, the port resolved by name."""
    get = container.get(probe, {}).get("httpGet", {})
    port = get.get("port")
    if not isinstance(port, int):
        port = next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)
    return get.get("path"), port


def check_k8s_proxy(where, proxy, known, binary, image_ca_dir):
    """What a proxy container in a Kubernetes example must agree on with the binary and
    the image: env names, declared ports, probes on the admin port, the CA directory."""
    penv = env_of(proxy)
    check_env_names(f"{where} proxy", penv, known)
    check_image(f"{where} proxy", proxy.get("image", ""), proxy.get("imagePullPolicy"))
    listen = penv.get("LINE_RETRY_PROXY_LISTEN", "127.0.0.1:8080")
    admin = penv.get("LINE_RETRY_PROXY_ADMIN_LISTEN", "127.0.0.1:9090")
    ports = {p["containerPort"] for p in proxy["ports"]}
    check(port_of(listen) in ports, f"{where}: listen port not declared")
    check(port_of(admin) in ports, f"{where}: admin port not declared")
    check(admin.startswith("0.0.0.0:"), f"{where}: the admin listener must be on 0.0.0.0 for the kubelet's probes and Prometheus")
    # Distinct probes: liveness must not fail while the proxy drains (/readyz is 503 then).
    check(k8s_probe_target(proxy, "readinessProbe") == ("/readyz", port_of(admin)), f"{where}: readinessProbe must GET /readyz on the admin port")
    check(k8s_probe_target(proxy, "livenessProbe") == ("/healthz", port_of(admin)), f"{where}: livenessProbe must GET /healthz on the admin port")
    check(proxy.get("command") in (None, [binary]), f"{where}: the proxy must run the image's entrypoint")
    ca_dir = penv.get("LINE_RETRY_PROXY_CA_DIR")
    check(ca_dir == image_ca_dir, f"{where}: the CA dir must be the image's {image_ca_dir}")
    return penv, listen


def check_pod(known, image):
    binary, image_ca_dir = image
    doc = yaml.safe_load((ROOT / "examples/kubernetes/pod.yaml").read_text())
    check(doc["kind"] == "Pod", "pod: kind must be Pod")
    # The proxy is a native sidecar (an init container that keeps running); the bot is
    # the pod's container.
    sidecars = {c["name"]: c for c in doc["spec"].get("initContainers", [])}
    containers = {c["name"]: c for c in doc["spec"]["containers"]}
    proxy = sidecars.get("line-retry-proxy") or containers.get("line-retry-proxy")
    if not check(proxy is not None, "pod: no line-retry-proxy container"):
        return
    check(proxy in containers.values() or proxy.get("restartPolicy") == "Always",
          "pod: the proxy as an init container must be a sidecar (restartPolicy: Always), or the bot never starts")
    bot = next(c for n, c in containers.items() if n != "line-retry-proxy")
    penv, listen = check_k8s_proxy("pod", proxy, known, binary, image_ca_dir)
    benv = env_of(bot)
    check(benv.get("HTTPS_PROXY") == f"http://127.0.0.1:{port_of(listen)}", "pod: bot HTTPS_PROXY must be the sidecar on loopback")
    check(listen.startswith("127.0.0.1:"), "pod: the proxy listener must stay on loopback (the bot shares it)")
    admin = penv.get("LINE_RETRY_PROXY_ADMIN_LISTEN", "127.0.0.1:9090")
    annotations = doc["metadata"].get("annotations", {})
    check(annotations.get("prometheus.io/port") == str(port_of(admin)), "pod: prometheus.io/port must be the admin port")
    check(annotations.get("prometheus.io/scrape") == "true", "pod: prometheus.io/scrape must be \"true\"")

    volumes = {v["name"]: v for v in doc["spec"]["volumes"]}
    ca_dir = penv["LINE_RETRY_PROXY_CA_DIR"]
    pmounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    check(ca_dir in pmounts, "pod: the proxy's CA dir is not mounted")
    ca_secret = volumes.get(pmounts.get(ca_dir), {}).get("secret", {}).get("secretName")
    check(ca_secret is not None, "pod: the proxy's CA dir must come from a Secret")
    # No volume the bot mounts may carry ca.key: not the proxy's, not the same Secret.
    for m in bot.get("volumeMounts", []):
        v = volumes.get(m["name"], {})
        check(m["name"] != pmounts.get(ca_dir), "pod: the bot mounts the proxy's CA volume, and with it ca.key")
        secret = v.get("secret", {})
        if secret.get("secretName") == ca_secret:
            keys = [i["key"] for i in secret.get("items", [])]
            check(keys and "ca.key" not in keys, "pod: the bot mounts the CA Secret with ca.key")
    bmounts = {m["mountPath"]: m["name"] for m in bot["volumeMounts"]}
    bundle = benv.get("SSL_CERT_FILE", "")
    mount_dir, _, file_name = bundle.rpartition("/")
    check(mount_dir in bmounts, "pod: the bot's SSL_CERT_FILE is not in a volume the bot mounts")
    check(file_name == "bundle.pem", "pod: the bot must trust a bundle (system roots + proxy CA) made with `ca --bundle`")
    for var in TRUST_VARS:
        check(benv.get(var) == bundle, f"pod: bot {var} must be {bundle}")
    check(doc["spec"]["securityContext"].get("runAsNonRoot") is True, "pod: must run as non-root")
    check("ca --bundle > bundle.pem" in (ROOT / "examples/kubernetes/pod.yaml").read_text(),
          "pod: the header must show how bundle.pem is made (ca --bundle > bundle.pem)")


def check_k8s_replicas(known, image):
    """The shared-service Deployment: it listens beyond loopback for the Service, keeps
    its answers in a Redis named by a Secret, and its CA comes from a Secret too."""
    binary, image_ca_dir = image
    path = ROOT / "examples/kubernetes/replicas/deployment.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    deployment = next((d for d in docs if d["kind"] == "Deployment"), None)
    if not check(deployment is not None, "k8s replicas: no Deployment"):
        return
    spec = deployment["spec"]["template"]["spec"]
    proxy = next((c for c in spec["containers"] if c["name"] == "line-retry-proxy"), None)
    if not check(proxy is not None, "k8s replicas: no line-retry-proxy container"):
        return
    check(deployment["spec"].get("replicas", 1) >= 2, "k8s replicas: the proxy must run at least two replicas")
    penv, listen = check_k8s_proxy("k8s replicas", proxy, known, binary, image_ca_dir)
    check(listen.startswith("0.0.0.0:"), "k8s replicas: the proxy must listen on 0.0.0.0 explicitly to serve other pods")
    store = next((e for e in proxy["env"] if e["name"] == "LINE_RETRY_PROXY_STORE"), {})
    check("secretKeyRef" in store.get("valueFrom", {}), "k8s replicas: LINE_RETRY_PROXY_STORE must come from a Secret")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in proxy.get("volumeMounts", [])}
    check("secret" in volumes.get(mounts.get(penv.get("LINE_RETRY_PROXY_CA_DIR")), {}),
          "k8s replicas: the CA dir must come from a Secret, one CA for every replica")
    check("ca --bundle > bundle.pem" in path.read_text(),
          "k8s replicas: the header must show how bundle.pem is made (ca --bundle > bundle.pem)")


def default_ports(binary):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    return {int(p) for p in re.findall(r"listen <[^>]+>\s+.*?\[default: [^\]]*:(\d+)\]", out, re.S)}


def check_dockerfile(binary):
    """The runtime stage as parsed (the parser of replay-dockerfile.py); returns what
    the examples must agree with: the binary's path and the CA directory."""
    replay = load_replay()
    stages = replay.split_stages(replay.parse_dockerfile((ROOT / "Dockerfile").read_text()))
    check(len(stages) >= 2, "Dockerfile: must be multi-stage")
    build, final = stages[0], stages[-1]
    runs = [i.args for i in build.instructions if i.keyword == "RUN"]
    release = [r for r in runs if re.search(r"(^|&&\s*)scripts/build-release\.sh", r)]
    check(release, "Dockerfile: must build with scripts/build-release.sh (what CI runs)")
    # The dependency layer: cargo builds stand-in crate roots before the sources are
    # copied. COPY keeps the sources' older modification times, so the release build
    # must touch the roots, or cargo takes the stand-in for up to date and ships it.
    copy_src = next((n for n, i in enumerate(build.instructions)
                     if i.keyword == "COPY" and replay.copy_operands(i)[1] == ["src"]), None)
    deps = [i for i in build.instructions[:copy_src or 0] if i.keyword == "RUN" and "cargo build" in i.args]
    check(deps, "Dockerfile: no dependency layer (cargo build before COPY src), so every source change rebuilds every crate")
    check(not deps or all(re.search(r"touch src/main\.rs src/lib\.rs &&", r) for r in release),
          "Dockerfile: after the dependency layer the release build must `touch src/main.rs src/lib.rs` first")
    last = {}
    envs, labels, volumes, exposed, copied_to = {}, {}, [], set(), []
    for ins in final.instructions:
        last[ins.keyword] = ins.args
        if ins.keyword == "ENV":
            envs.update(replay.parse_env(ins.args, ins))
        elif ins.keyword == "LABEL":
            labels.update(replay.parse_env(ins.args, ins))
        elif ins.keyword == "VOLUME":
            volumes.extend(json.loads(ins.args) if ins.args.startswith("[") else ins.args.split())
        elif ins.keyword == "EXPOSE":
            exposed.update(int(p.split("/")[0]) for p in ins.args.split())
        elif ins.keyword == "COPY":
            copied_to.append(replay.copy_operands(ins)[2])
    manifest = (ROOT / "Cargo.toml").read_text()
    license_ = re.search(r'^license = "([^"]+)"', manifest, re.M).group(1)
    oci = "org.opencontainers.image."
    check(labels.get(oci + "version") == cargo_version(),
          f"Dockerfile: label {oci}version must be the crate version {cargo_version()}")
    check(labels.get(oci + "licenses") == license_, f"Dockerfile: label {oci}licenses must be the crate's {license_}")
    for key in ("title", "description", "source"):
        check(oci + key in labels, f"Dockerfile: no label {oci}{key}")
    header = "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("#"))
    check(f"docker build -t line-retry-proxy:{cargo_version()} ." in header,
          f"Dockerfile: the header must build the versioned tag line-retry-proxy:{cargo_version()}")
    user = last.get("USER", "0").split(":")[0]
    check(user not in ("0", "root"), "Dockerfile: must run as non-root")
    ca_dir = envs.get("LINE_RETRY_PROXY_CA_DIR")
    check(ca_dir is not None and ca_dir in volumes, "Dockerfile: the CA dir must be a volume")
    check(not {"LINE_RETRY_PROXY_LISTEN", "LINE_RETRY_PROXY_ADMIN_LISTEN"} & set(envs),
          "Dockerfile: 0.0.0.0 only by explicit setting, not baked in")
    entry = json.loads(last.get("ENTRYPOINT", "[]") or "[]")
    check(len(entry) == 1 and entry[0] in copied_to, "Dockerfile: ENTRYPOINT must be the binary copied from the build stage")
    health = last.get("HEALTHCHECK", "")
    health_cmd = json.loads(health[health.index("CMD") + 3:]) if "CMD [" in health else []
    check(health_cmd == entry + ["healthcheck"], "Dockerfile: HEALTHCHECK must run the healthcheck subcommand")
    check(exposed == default_ports(binary), f"Dockerfile: EXPOSE {sorted(exposed)} must be the default ports {sorted(default_ports(binary))}")
    return (entry or [""])[0], ca_dir


def main():
    binary = sys.argv[1]
    known = known_env_names(binary)
    check("LINE_RETRY_PROXY_LISTEN" in known, "binary --help does not list its env names")
    image = check_dockerfile(binary)
    check_compose(known, image)
    check_replicas(known, image)
    check_pod(known, image)
    check_k8s_replicas(known, image)
    for f in failures:
        print(f"FAIL {f}")
    checks = ("compose with its monitoring profile, replicas with Redis, Kubernetes sidecar pod and replicas, "
              "Dockerfile dependency layer, labels and runtime stage")
    if failures:
        print(f"examples: {len(failures)} problem(s)")
        sys.exit(1)
    print(f"examples: ok ({checks})")


if __name__ == "__main__":
    main()
