#!/usr/bin/python3
"""docker/validate.py - static checks of the deployment files (part of
`make docker-check`; needs Debian's python3-yaml).

Parses every YAML and JSON file under docker/, checks that each saserve_*
metric they name is one server/metrics.c exports, and that the pieces agree:
the Deployment runs the Dockerfile's user, binds 0.0.0.0, probes /health; the
Service selects the pods; the HPA's metric is the one the adapter rule
produces; compose mounts the Prometheus config and Grafana provisioning that
exist.  Prints one line per file; exits 1 on the first problem."""
import glob
import json
import os
import re
import sys

import yaml

os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def fail(msg):
    print("validate: FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


src = open("server/metrics.c").read()
exported = set(re.findall(r'"(saserve_[a-z0-9_]+)', src))
check(exported, "no metric names found in server/metrics.c")


def known(name):
    if name in exported:
        return True
    for suf in ("_bucket", "_sum", "_count"):
        if name.endswith(suf) and name[: -len(suf)] in exported:
            return True
    return False


def metric_names(text):
    return set(re.findall(r"\bsaserve_[a-z0-9_]+", text))


docs = {}
for path in sorted(glob.glob("docker/**/*.yaml", recursive=True) + glob.glob("docker/**/*.yml", recursive=True)):
    with open(path) as f:
        text = f.read()
    try:
        docs[path] = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        fail(f"{path}: {e}")
    check(docs[path], f"{path}: empty")
    print(f"validate: {path}: {len(docs[path])} YAML document(s)")

dashboards = sorted(glob.glob("docker/grafana/dashboards/*.json"))
check(dashboards, "no Grafana dashboard in docker/grafana/dashboards")
for path in dashboards:
    with open(path) as f:
        try:
            dash = json.load(f)
        except json.JSONDecodeError as e:
            fail(f"{path}: {e}")
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    names = set().union(*(metric_names(e) for e in exprs))
    for n in sorted(names):
        check(known(n), f"{path}: metric {n} is not exported by server/metrics.c")
    for need in ("saserve_generation_tokens_total", "saserve_time_to_first_token_seconds_bucket",
                 "saserve_num_requests_waiting", "saserve_kv_cache_usage_ratio", "saserve_kv_cache_saved_bytes"):
        check(need in names, f"{path}: no panel uses {need}")
    ids = [p["id"] for p in dash["panels"]]
    check(len(ids) == len(set(ids)), f"{path}: duplicate panel ids")
    print(f"validate: {path}: {len(dash['panels'])} panels, {len(names)} metrics, all exported")

# Every metric named in the YAML files exists too.
for path, ds in docs.items():
    for n in sorted(metric_names(json.dumps(ds))):
        check(known(n), f"{path}: metric {n} is not exported by server/metrics.c")


def one(path, kind):
    for d in docs.get(path, []):
        if d.get("kind") == kind:
            return d
    fail(f"{path}: no {kind}")


# Dockerfile: the user and the environment of its last stage.
dockerfile = open("docker/Dockerfile").read().split("\nFROM ")[-1]
user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
check(user, "docker/Dockerfile: last stage has no numeric USER uid:gid")
check(re.search(r"^ENV SASERVE_HOST=0\.0\.0\.0$", dockerfile, re.M), "docker/Dockerfile: no ENV SASERVE_HOST=0.0.0.0")
check(re.search(r"^HEALTHCHECK .*saserve-healthcheck", dockerfile, re.M), "docker/Dockerfile: no HEALTHCHECK")

# Kubernetes.
dep = one("docker/k8s/deployment.yaml", "Deployment")
pod = dep["spec"]["template"]["spec"]
labels = dep["spec"]["template"]["metadata"]["labels"]
check(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "Deployment selector does not match its pods")
sc = pod["securityContext"]
check(sc.get("runAsNonRoot") is True, "Deployment: runAsNonRoot is not true")
check(str(sc.get("runAsUser")) == user.group(1), "Deployment: runAsUser differs from the Dockerfile's USER")
(c,) = pod["containers"]
env = {e["name"]: e.get("value") for e in c["env"]}
check(env.get("SASERVE_HOST") == "0.0.0.0", "Deployment: SASERVE_HOST is not 0.0.0.0")
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    check(c.get(probe, {}).get("httpGet", {}).get("path") == "/health", f"Deployment: {probe} is not GET /health")
check(c["securityContext"].get("allowPrivilegeEscalation") is False, "Deployment: allowPrivilegeEscalation")
for k in ("requests", "limits"):
    check(c["resources"].get(k), f"Deployment: no resources.{k}")
svc = one("docker/k8s/service.yaml", "Service")
check(svc["spec"]["selector"].items() <= labels.items(), "Service selector does not match the Deployment's pods")
ports = {p["name"] for p in c["ports"]}
check(all(p["targetPort"] in ports or p["targetPort"] == 8080 for p in svc["spec"]["ports"]), "Service targetPort")
hpa = one("docker/k8s/hpa.yaml", "HorizontalPodAutoscaler")
check(hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "HPA does not target the Deployment")
hpa_metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
check(hpa_metric == "saserve_num_requests_waiting", "HPA does not scale on saserve_num_requests_waiting")
cm = one("docker/k8s/prometheus-adapter.yaml", "ConfigMap")
rules = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
check(any(r["name"]["as"] == hpa_metric and hpa_metric in r["seriesQuery"] for r in rules),
      "prometheus-adapter rule does not produce the HPA's metric")
kust = one("docker/k8s/kustomization.yaml", "Kustomization")
for r in kust["resources"]:
    check(os.path.exists(os.path.join("docker/k8s", r)), f"kustomization: {r} missing")
print("validate: docker/k8s: Deployment, Service, HPA and adapter rule agree")

# Compose.
(compose,) = docs["docker/compose.yaml"]
for s in ("saserve", "prometheus", "grafana"):
    check(s in compose["services"], f"compose: no service {s}")
check(compose["services"]["saserve"]["environment"].get("SASERVE_HOST") == "0.0.0.0", "compose: SASERVE_HOST")
for s in ("prometheus", "grafana"):
    for v in compose["services"][s].get("volumes", []):
        host = v.split(":")[0]
        if host.startswith("."):
            check(os.path.exists(os.path.join("docker", host)), f"compose: {s} mounts missing {host}")
(prom,) = docs["docker/prometheus.yml"]
targets = [t for sc_ in prom["scrape_configs"] for st in sc_.get("static_configs", []) for t in st["targets"]]
check("saserve:8080" in targets, "prometheus.yml does not scrape saserve:8080")
print("validate: docker/compose.yaml: saserve, Prometheus and Grafana wired to files that exist")
print("validate: OK")
