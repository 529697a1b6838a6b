#!/usr/bin/env bash
# deploy/grafana/: the dashboard is valid JSON, every panel has queries, and
# every metric, label and function in them (and in the alerting rules) is one
# fdbroker exports (tests/deploy/exported_metrics.txt); every query is valid
# PromQL (promtool, offline); the provisioning points at the dashboard and at
# the datasource uid the panels use. Then proves the check is not vacuous.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
python=/usr/bin/python3
workdir="$(mktemp -d -t fdbroker-dashboard-test.XXXXXX)"
trap 'rm -rf "${workdir}"' EXIT

echo "== metric references"
"${python}" "${here}/promql_refs.py" check

echo "== PromQL syntax (promtool check rules on the dashboard's queries)"
"${python}" "${here}/promql_refs.py" rules >"${workdir}/dashboard_rules.yml"
promtool check rules "${workdir}/dashboard_rules.yml"

echo "== provisioning"
"${python}" - "${repo}" <<'PY'
import json, sys, yaml
from pathlib import Path

repo = Path(sys.argv[1])
grafana = repo / "deploy/grafana"
datasources = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
(source,) = datasources["datasources"]
assert source["type"] == "prometheus" and source["uid"] == "prometheus", source
assert source["url"] == "http://prometheus:9090", source["url"]
providers = yaml.safe_load((grafana / "provisioning/dashboards/fdbroker.yml").read_text())
(provider,) = providers["providers"]
path = provider["options"]["path"]
compose = yaml.safe_load((repo / "docker-compose.yml").read_text())
mounts = {}  # container path -> host path
for volume in compose["services"]["grafana"]["volumes"]:
    source, target = volume.split(":")[:2]
    mounts[target] = source
assert mounts.get(path) == "./deploy/grafana/dashboards", (path, mounts)
dashboard = json.loads((grafana / "dashboards/fdbroker.json").read_text())
assert dashboard["uid"] == "fdbroker"
print("datasource uid prometheus, dashboards from", path)
PY

echo "== the check rejects what it should"
mutate() {
  local description="$1" expression="$2"
  sed "${expression}" "${repo}/deploy/grafana/dashboards/fdbroker.json" >"${workdir}/bad.json"
  if cmp -s "${workdir}/bad.json" "${repo}/deploy/grafana/dashboards/fdbroker.json"; then
    echo "mutation '${description}' changed nothing" >&2
    exit 1
  fi
  if "${python}" "${here}/promql_refs.py" check --dashboard="${workdir}/bad.json" 2>/dev/null; then
    echo "check accepted a dashboard with ${description}" >&2
    exit 1
  fi
  echo "rejected: ${description}"
}
mutate "an unknown metric" 's/fdbroker_connections_handed_off_total/fdbroker_connections_handed_total/'
mutate "an unknown label" 's/state=\\"ready\\"/status=\\"ready\\"/'
mutate "a histogram's base name" 's/fdbroker_handoff_latency_seconds_bucket/fdbroker_handoff_latency_seconds/'
mutate "a legend label the result lacks" 's/{{reason}}/{{cause}}/'
mutate "a panel without a query" '0,/"expr": "[^"]*"/s//"expr": ""/'
echo "ok"
