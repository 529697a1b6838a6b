#!/usr/bin/env bash
# deploy/kubernetes/: every file parses as YAML with the expected kinds, and
# the pieces fit together: selectors match the pod labels, Services and the
# PodMonitor name real container ports, the probes use the control plane's
# gRPC health and the client port, the grace period covers preStop plus
# --drain_timeout, and the pod runs as the image's non-root user.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

/usr/bin/python3 - "${repo}" <<'PY'
import re
import sys
from pathlib import Path

import yaml

repo = Path(sys.argv[1])
manifests = repo / "deploy/kubernetes"
errors = []


def check(condition, message):
    if not condition:
        errors.append(message)


docs = {}  # (kind, name) -> (file, document)
for path in sorted(manifests.glob("*.yaml")):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        kind = doc.get("kind")
        name = doc.get("metadata", {}).get("name", "")
        check(doc.get("apiVersion") and kind, f"{path.name}: no apiVersion/kind")
        check(name or kind == "Kustomization", f"{path.name}: {kind} without a name")
        docs[(kind, name)] = (path.name, doc)

expected = {("Deployment", "fdbroker"), ("Service", "fdbroker"),
            ("Service", "fdbroker-control"), ("NetworkPolicy", "fdbroker"),
            ("PodDisruptionBudget", "fdbroker"), ("PodMonitor", "fdbroker"),
            ("Kustomization", "")}
check(set(docs) == expected, f"kinds: {sorted(docs)}")
check(docs[("PodMonitor", "fdbroker")][1]["apiVersion"] == "monitoring.coreos.com/v1",
      "PodMonitor is not monitoring.coreos.com/v1")

kustomization = docs[("Kustomization", "")][1]
for resource in kustomization["resources"]:
    check((manifests / resource).exists(), f"kustomization: {resource} missing")
check("podmonitor.yaml" not in kustomization["resources"],
      "podmonitor.yaml needs the operator's CRD: keep it out of the kustomization")

deployment = docs[("Deployment", "fdbroker")][1]
pod = deployment["spec"]["template"]
pod_labels = pod["metadata"]["labels"]


def selects(selector):
    return selector and all(pod_labels.get(k) == v for k, v in selector.items())


check(selects(deployment["spec"]["selector"]["matchLabels"]), "Deployment selector")
for kind, name, selector in [
        ("Service", "fdbroker", lambda d: d["spec"]["selector"]),
        ("Service", "fdbroker-control", lambda d: d["spec"]["selector"]),
        ("NetworkPolicy", "fdbroker", lambda d: d["spec"]["podSelector"]["matchLabels"]),
        ("PodDisruptionBudget", "fdbroker", lambda d: d["spec"]["selector"]["matchLabels"]),
        ("PodMonitor", "fdbroker", lambda d: d["spec"]["selector"]["matchLabels"])]:
    check(selects(selector(docs[(kind, name)][1])), f"{kind} {name} selects no broker pod")

(container,) = pod["spec"]["containers"]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
check(ports == {"clients": 8080, "metrics": 9464, "control": 50051}, f"ports {ports}")

clients = docs[("Service", "fdbroker")][1]["spec"]
check(clients["type"] in ("LoadBalancer", "ClusterIP"), "clients Service type")
check([(p["port"], p["targetPort"]) for p in clients["ports"]] == [(8080, "clients")],
      "the clients' Service exposes exactly 8080 (never the control plane)")
control = docs[("Service", "fdbroker-control")][1]["spec"]
check(control.get("clusterIP") == "None", "fdbroker-control is not headless")
check(control.get("publishNotReadyAddresses") is True,
      "a drained (not ready) broker must stay reachable on fdbroker-control")
for port in control["ports"]:
    check(port["targetPort"] in ports, f"fdbroker-control targets unknown port {port}")
check(any(p["port"] == 50051 for p in control["ports"]), "fdbroker-control lacks 50051")

annotations = pod["metadata"].get("annotations", {})
check(annotations.get("prometheus.io/scrape") == "true", "no scrape annotation")
check(annotations.get("prometheus.io/port") == str(ports["metrics"]), "scrape port")
check(annotations.get("prometheus.io/path") == "/metrics", "scrape path")
podmonitor = docs[("PodMonitor", "fdbroker")][1]["spec"]
for endpoint in podmonitor["podMetricsEndpoints"]:
    check(endpoint["port"] in ports, f"PodMonitor port {endpoint['port']}")
check(pod_labels.get(podmonitor.get("jobLabel")) == "fdbroker",
      "PodMonitor jobLabel must give job=\"fdbroker\" (alerts.yml selects it)")

check(container["readinessProbe"].get("grpc", {}).get("port") == 50051,
      "readiness must be the gRPC health probe on 50051")
check(container["livenessProbe"].get("tcpSocket", {}).get("port") == 8080,
      "liveness must be TCP on 8080")


def seconds(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", text))


args = container.get("args", [])
drain = next((a.split("=", 1)[1] for a in args if a.startswith("--drain_timeout=")), "30s")
pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
check(pre_stop[0] == "sleep", f"preStop {pre_stop}")
grace = pod["spec"]["terminationGracePeriodSeconds"]
check(grace > float(pre_stop[1]) + seconds(drain),
      f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop[1]}s "
      f"+ --drain_timeout {drain}")

# The image's flags: control on 0.0.0.0 (probes and the headless Service reach
# the pod address), the socket below the mounted emptyDir.
dockerfile = (repo / "deploy/Dockerfile").read_text()
entrypoint = re.search(r"^ENTRYPOINT\s+\[(.*?)\]\s*$", dockerfile, re.M | re.S).group(1)
flags = re.findall(r'"([^"]*)"', entrypoint) + args
check("--control=0.0.0.0:50051" in flags, "the control plane must bind 0.0.0.0:50051")
socket = next(f.split("=", 1)[1] for f in reversed(flags) if f.startswith("--socket="))
mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
# The broker creates the socket's directory (0700) if missing: an emptyDir
# (0777) is the parent it is created in.
check(str(Path(socket).parent.parent) in mounts,
      f"{socket}'s directory is not a subdirectory of a mounted volume")

user = re.search(r"^USER\s+(\d+)", dockerfile, re.M).group(1)
security = pod["spec"].get("securityContext", {})
check(security.get("runAsNonRoot") is True, "runAsNonRoot")
check(str(security.get("runAsUser")) == user, f"runAsUser is not the image's USER {user}")
check(container.get("securityContext", {}).get("readOnlyRootFilesystem") is True,
      "readOnlyRootFilesystem")

for error in errors:
    print("deploy/kubernetes:", error, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{len(docs)} manifests: {', '.join(sorted(k for k, _ in docs))}")
PY
echo "ok"
