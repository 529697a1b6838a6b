#!/usr/bin/env bash
# docker-compose.yml: `docker-compose config` (Debian 12's docker-compose 1.29)
# accepts it, and it publishes what the README documents: clients 8080 and
# metrics 9464 on the host, the control plane on the host's loopback only
# (mutations through the on-demand grpcurl service in the broker's network
# namespace), the broker under an init, health checks everywhere, the Grafana and Prometheus files mounted.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
workdir="$(mktemp -d -t fdbroker-compose-test.XXXXXX)"
trap 'rm -rf "${workdir}"' EXIT

echo "== docker-compose config"
docker-compose -f docker-compose.yml config -q
echo "valid"

echo "== contents"
docker-compose -f docker-compose.yml --profile tools config >"${workdir}/config.yml"
/usr/bin/python3 - "${workdir}/config.yml" <<'PY'
import re
import sys
from pathlib import Path

import yaml

config = yaml.safe_load(Path(sys.argv[1]).read_text())
services = config["services"]
errors = []


def check(condition, message):
    if not condition:
        errors.append(message)


def published(service):
    out = set()
    for port in services[service].get("ports", []):
        if isinstance(port, dict):
            host_ip = port.get("host_ip")
            text = f"{port['published']}:{port['target']}"
            out.add(f"{host_ip}:{text}" if host_ip else text)
        else:
            out.add(re.sub(r"/tcp$", "", str(port)))
    return out


def seconds(text):
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u]
               for n, u in re.findall(r"([\d.]+)([smh])", str(text)))


check(set(services) == {"fdbroker", "prometheus", "grafana", "grpcurl"},
      f"services are {sorted(services)}")
# The operator's tool: runs on demand only (profile), inside the broker's
# network namespace (the broker lets local root callers mutate), publishes
# nothing.
tool = services.get("grpcurl", {})
check(tool.get("profiles") == ["tools"], "grpcurl is not in the tools profile")
check(tool.get("network_mode") == "service:fdbroker",
      "grpcurl does not share the broker's network namespace")
check(not tool.get("ports"), "grpcurl publishes ports")
broker = services["fdbroker"]
check(broker["build"]["dockerfile"] == "deploy/Dockerfile",
      "fdbroker is not built from deploy/Dockerfile")
# Docker's init as PID 1 too (the image's ENTRYPOINT starts tini -s, a
# subreaper under it): the broker is never PID 1.
check(broker.get("init") is True, "fdbroker has no `init: true`")
ports = published("fdbroker")
check(ports == {"8080:8080", "9464:9464", "127.0.0.1:50051:50051"},
      f"fdbroker publishes {sorted(ports)}")
ports = published("prometheus") | published("grafana")
check(ports and all(p.startswith("127.0.0.1:") for p in ports),
      f"Prometheus and Grafana publish {sorted(ports)}, not on loopback")
for name, service in services.items():
    check("healthcheck" in service or name == "grpcurl",
          f"{name} has no healthcheck")

# SIGTERM drains within --drain_timeout; the grace period must be longer.
drain = next((a.split("=", 1)[1] for a in broker.get("command", [])
              if a.startswith("--drain_timeout=")), "30s")
grace = broker.get("stop_grace_period", "10s")
check(seconds(grace) > seconds(drain),
      f"stop_grace_period {grace} must exceed --drain_timeout {drain}")

env = services["grafana"]["environment"]
check(env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true", "anonymous access off")
check(env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer",
      "anonymous role is not Viewer")
home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")

# Every bind mount exists; the home dashboard is the shipped fdbroker.json.
dashboard = (Path.cwd() / "deploy/grafana/dashboards/fdbroker.json").resolve()
home_found = False
for name, service in services.items():
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            kind, source, target = (volume.get("type"), volume.get("source", ""),
                                    volume["target"])
        else:
            source, target = volume.split(":")[:2]
            kind = "bind" if source.startswith("/") else "volume"
        if kind != "bind":
            continue
        check(Path(source).exists(), f"{name}: {source} does not exist")
        if home.startswith(target + "/"):
            home_found = (Path(source) / home[len(target) + 1:]).resolve() == dashboard
check(home_found, f"home dashboard {home!r} is not {dashboard}")

prometheus_volumes = " ".join(map(str, services["prometheus"].get("volumes", [])))
check("deploy/prometheus" in prometheus_volumes, "deploy/prometheus is not mounted")

for error in errors:
    print("docker-compose.yml:", error, file=sys.stderr)
if errors:
    sys.exit(1)
print("ports, health checks, grace period, mounts and Grafana settings as documented")
PY
echo "ok"
