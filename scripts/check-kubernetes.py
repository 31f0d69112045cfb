#!/usr/bin/env python3
"""Checks the Kubernetes examples offline (run by scripts/check-kubernetes.sh, which
installs what this imports and then runs checkov on the same files).

Usage: check-kubernetes.py K8S_VERSION... (e.g. 1.30 1.37)

For every document of every examples/kubernetes/**/*.yaml:
  - Kubernetes kinds: validated against the API schema of each version given, strict
    (an unknown or misspelt field fails). A kind without a schema fails too: the
    kubernetes-validate command would only warn, so a misspelt kind would pass.
  - Prometheus Operator kinds (PodMonitor): the Kubernetes schema has no CRDs.
    metadata is validated strictly against the API's ObjectMeta; the whole document
    against the models cloudcoil generates from the operator's CRDs (field types, and
    every field name must be one the CRD declares). Not checked: the CRD's enums and
    patterns, which those models do not carry, and whether the operator installed
    in a cluster is that version.
Then, for every pod (a Pod, or a Deployment's template):
  - the `restricted` Pod Security Standard, as the API server's admission applies it
    (namespaces.yaml enforces it; this finds a violation before a cluster does);
  - for the proxy's containers (image line-retry-proxy:*): distinct readiness
    (/readyz) and liveness (/healthz) probes on the admin port, a read-only root
    filesystem, requests and limits, the CA from a Secret, and a termination grace
    above the shutdown grace plus any preStop sleep;
  - for a Deployment of the proxy: a shared Redis store from a Secret when it has more
    than one replica, and a Service, a PodDisruptionBudget, a NetworkPolicy (with the
    ports the proxy needs) and a PodMonitor that select its pods.
"""
import re
import sys
from pathlib import Path

import yaml
from kubernetes_validate import utils as kv
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples/kubernetes"
CRD_MODELS = {("monitoring.coreos.com/v1", "PodMonitor"): prometheus_operator.PodMonitor,
              ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor}
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
    return cond


def load():
    docs = []
    for path in sorted(EXAMPLES.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.relative_to(ROOT), doc))
    return docs


def name_of(where, doc):
    return f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def validate_schema(where, doc, versions):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_MODELS:
        validate_crd(where, doc, CRD_MODELS[key], versions)
        return
    for version in versions:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            failures.append(f"{where}: invalid for Kubernetes {version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            failures.append(f"{where}: {e.message}")


def validate_crd(where, doc, model, versions):
    # ObjectMeta, strict, through the schema of a kind that has nothing else required.
    probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    for version in versions:
        try:
            kv.validate(probe, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            failures.append(f"{where}: metadata invalid for Kubernetes {version}: {path}: {e.message}")
    try:
        parsed = model.model_validate(doc)
    except Exception as e:  # pydantic.ValidationError: the message names the field
        failures.append(f"{where}: invalid {doc['kind']}: {e}")
        return
    # The models ignore unknown fields: a field the dump lacks is one the CRD lacks.
    for path in unknown_keys(doc, parsed.model_dump(by_alias=True, exclude_unset=True)):
        failures.append(f"{where}: {path} is not a field of {doc['kind']}")


def unknown_keys(given, known, path=""):
    if isinstance(given, dict) and isinstance(known, dict):
        for k, v in given.items():
            here = f"{path}.{k}" if path else k
            if k not in known:
                yield here
            elif not here.endswith(("labels", "annotations", "matchLabels")):
                yield from unknown_keys(v, known[k], here)
    elif isinstance(given, list) and isinstance(known, list):
        for i, (g, k) in enumerate(zip(given, known)):
            yield from unknown_keys(g, k, f"{path}[{i}]")


# --- the restricted Pod Security Standard ------------------------------------------

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def all_containers(spec):
    return [c for kind in ("initContainers", "containers", "ephemeralContainers") for c in spec.get(kind, [])]


def check_restricted(where, spec):
    """Each rule of the baseline and restricted profiles (Kubernetes' Pod Security
    Standards page), as the admission controller evaluates it: a container's setting
    overrides the pod's."""
    pod_sc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        check(not spec.get(field), f"{where}: {field} is not allowed (baseline)")
    for sysctl in pod_sc.get("sysctls", []):
        check(sysctl["name"] in SAFE_SYSCTLS, f"{where}: sysctl {sysctl['name']} is not allowed (baseline)")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        check(kinds <= RESTRICTED_VOLUMES, f"{where}: volume {volume['name']} of type {sorted(kinds)} is not allowed (restricted)")
    check(pod_sc.get("runAsUser") != 0, f"{where}: runAsUser 0 (restricted)")
    pod_seccomp = pod_sc.get("seccompProfile", {}).get("type")
    check(pod_seccomp in (None, "RuntimeDefault", "Localhost"), f"{where}: pod seccompProfile {pod_seccomp} (restricted)")
    for c in all_containers(spec):
        cw = f"{where}: container {c['name']}"
        sc = c.get("securityContext", {})
        check(not sc.get("privileged"), f"{cw}: privileged (baseline)")
        check(not sc.get("windowsOptions", {}).get("hostProcess"), f"{cw}: hostProcess (baseline)")
        check(sc.get("procMount", "Default") == "Default", f"{cw}: procMount (baseline)")
        check(all(not p.get("hostPort") for p in c.get("ports", [])), f"{cw}: hostPort (baseline)")
        apparmor = sc.get("appArmorProfile", pod_sc.get("appArmorProfile", {})).get("type")
        check(apparmor in (None, "RuntimeDefault", "Localhost"), f"{cw}: appArmorProfile {apparmor} (baseline)")
        selinux = sc.get("seLinuxOptions", pod_sc.get("seLinuxOptions", {}))
        check(selinux.get("type", "") in ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t")
              and not selinux.get("user") and not selinux.get("role"), f"{cw}: seLinuxOptions (baseline)")
        check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation must be false (restricted)")
        check(sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{cw}: runAsNonRoot must be true (restricted)")
        check(sc.get("runAsUser") != 0, f"{cw}: runAsUser 0 (restricted)")
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        check(seccomp in ("RuntimeDefault", "Localhost"), f"{cw}: seccompProfile must be RuntimeDefault or Localhost (restricted)")
        caps = sc.get("capabilities", {})
        check("ALL" in caps.get("drop", []), f"{cw}: capabilities must drop ALL (restricted)")
        added = set(caps.get("add", []))
        check(added <= {"NET_BIND_SERVICE"} and added <= BASELINE_CAPABILITIES, f"{cw}: capabilities added {sorted(added)} (restricted)")


# --- the proxy's own needs ------------------------------------------------------------

def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def seconds(duration):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h)", duration):
        total += int(number) * units[unit]
    return total


def port_number(container, port):
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def proxy_containers(spec):
    return [c for c in all_containers(spec) if c.get("image", "").split(":")[0] == "line-retry-proxy"]


def check_proxy(where, spec):
    proxies = proxy_containers(spec)
    for c in proxies:
        cw = f"{where}: container {c['name']}"
        env = env_of(c)
        tag = c["image"].rpartition(":")[2]
        check(":" in c["image"] and tag != "latest", f"{cw}: the image must name a version, not {tag or 'none'}")
        admin = env.get("LINE_RETRY_PROXY_ADMIN_LISTEN", {}).get("value", "127.0.0.1:9090")
        check(admin.startswith("0.0.0.0:"), f"{cw}: the admin listener must be on 0.0.0.0 for the kubelet's probes")
        admin_port = int(admin.rsplit(":", 1)[1])
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c.get(probe, {}).get("httpGet", {})
            check(get.get("path") == path and port_number(c, get.get("port")) == admin_port,
                  f"{cw}: {probe} must GET {path} on the admin port {admin_port}")
        if "startupProbe" in c:
            get = c["startupProbe"].get("httpGet", {})
            check(get.get("path") == "/readyz", f"{cw}: startupProbe must GET /readyz")
        check(c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, f"{cw}: readOnlyRootFilesystem must be true")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            check({"cpu", "memory"} <= set(res.get(kind, {})), f"{cw}: resources.{kind} must set cpu and memory")
        grace_env = env.get("LINE_RETRY_PROXY_SHUTDOWN_GRACE", {}).get("value")
        if check(grace_env is not None, f"{cw}: set LINE_RETRY_PROXY_SHUTDOWN_GRACE, so the grace period below is measured against it"):
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            need = seconds(grace_env) + pre_stop
            have = spec.get("terminationGracePeriodSeconds", 30)
            check(have > need, f"{cw}: terminationGracePeriodSeconds {have} must be above shutdown-grace + preStop ({need:g}s)")
        ca_dir = env.get("LINE_RETRY_PROXY_CA_DIR", {}).get("value")
        mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == ca_dir), None)
        volume = next((v for v in spec.get("volumes", []) if mount and v["name"] == mount["name"]), {})
        check("secret" in volume, f"{cw}: the CA dir {ca_dir} must be mounted from a Secret")
    return proxies


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_deployment(where, doc, by_kind):
    ns = doc["metadata"].get("namespace")
    template = doc["spec"]["template"]
    labels = template["metadata"].get("labels", {})
    spec = template["spec"]
    proxy = proxy_containers(spec)[0]
    env = env_of(proxy)
    ports = {p["name"]: p["containerPort"] for p in proxy.get("ports", [])}
    if doc["spec"].get("replicas", 1) > 1:
        store = env.get("LINE_RETRY_PROXY_STORE", {})
        check("secretKeyRef" in store.get("valueFrom", {}),
              f"{where}: {doc['spec']['replicas']} replicas need the shared Redis store, its URL from a Secret")

    def same_ns(kind):
        return [d for d in by_kind.get(kind, []) if d["metadata"].get("namespace") == ns]

    services = [s for s in same_ns("Service") if selects(s["spec"].get("selector"), labels)]
    if check(services, f"{where}: no Service selects its pods"):
        for s in services:
            for p in s["spec"]["ports"]:
                target = p.get("targetPort", p["port"])
                check(target in ports or target in ports.values(), f"{where}: Service port {p['name']} targets {target}, not a port of the proxy")
    check([p for p in same_ns("PodDisruptionBudget") if selects(p["spec"]["selector"].get("matchLabels"), labels)],
          f"{where}: no PodDisruptionBudget selects its pods")
    monitors = [m for m in same_ns("PodMonitor") if selects(m["spec"]["selector"].get("matchLabels"), labels)]
    if check(monitors, f"{where}: no PodMonitor selects its pods"):
        for m in monitors:
            for e in m["spec"]["podMetricsEndpoints"]:
                check(e.get("port") == "admin" and e.get("path", "/metrics") == "/metrics",
                      f"{where}: the PodMonitor must scrape /metrics on the admin port")
    policies = [p for p in same_ns("NetworkPolicy") if selects(p["spec"]["podSelector"].get("matchLabels"), labels)]
    if check(policies, f"{where}: no NetworkPolicy selects its pods"):
        def allowed(direction):
            return {(p.get("protocol", "TCP"), p["port"]) for pol in policies
                    for rule in pol["spec"].get(direction, []) for p in rule.get("ports", [])}
        listen = int(env.get("LINE_RETRY_PROXY_LISTEN", {}).get("value", "127.0.0.1:8080").rsplit(":", 1)[1])
        admin = int(env.get("LINE_RETRY_PROXY_ADMIN_LISTEN", {}).get("value", "127.0.0.1:9090").rsplit(":", 1)[1])
        for need in (("TCP", listen), ("TCP", admin)):
            check(need in allowed("ingress"), f"{where}: the NetworkPolicy must let {need[0]} {need[1]} in")
        for need in (("TCP", 443), ("TCP", 6379), ("UDP", 53), ("TCP", 53)):
            check(need in allowed("egress"), f"{where}: the NetworkPolicy must let {need[0]} {need[1]} out")


POD_KINDS = {"Pod": lambda d: d["spec"], "Deployment": lambda d: d["spec"]["template"]["spec"]}


def main():
    versions = sys.argv[1:]
    if not versions:
        sys.exit("usage: check-kubernetes.py K8S_VERSION...")
    docs = load()
    by_kind = {}
    for where, doc in docs:
        by_kind.setdefault(doc.get("kind"), []).append(doc)
    pods = proxies = 0
    for where, doc in docs:
        label = name_of(where, doc)
        validate_schema(label, doc, versions)
        if doc.get("kind") in POD_KINDS:
            spec = POD_KINDS[doc["kind"]](doc)
            pods += 1
            check_restricted(label, spec)
            found = check_proxy(label, spec)
            proxies += len(found)
            if doc["kind"] == "Deployment" and found:
                check_deployment(label, doc, by_kind)
    check(proxies > 0, "no proxy container found in examples/kubernetes")
    for f in failures:
        print(f"FAIL {f}")
    if failures:
        print(f"kubernetes examples: {len(failures)} problem(s)")
        sys.exit(1)
    kinds = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
    print(f"kubernetes examples: ok ({len(docs)} documents: {kinds}; schemas of Kubernetes {', '.join(versions)}, strict; "
          f"{pods} pod specs within the restricted Pod Security Standard; {proxies} proxy containers)")


if __name__ == "__main__":
    main()
