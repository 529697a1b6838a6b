#!/usr/bin/env bash
# Tests prometheus_e2e.sh, the dashboard's queries and the alerting rules
# against a real Prometheus, with fake_exporter.py standing in for the broker
# (it exports every family of exported_metrics.txt): the scrape passes
# `promtool check metrics`, Prometheus accepts every dashboard query, and each
# returns data. The same check against the real broker under load is the
# end-to-end test of the metrics themselves.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "${here}/../.." && pwd)"
python=/usr/bin/python3

workdir="$(mktemp -d -t fdbroker-e2e-test.XXXXXX)"
exporter_pid=""
cleanup() {
  if [[ -n "${exporter_pid}" ]]; then
    kill "${exporter_pid}" 2>/dev/null || true
    wait "${exporter_pid}" 2>/dev/null || true
  fi
  rm -rf "${workdir}"
}
trap cleanup EXIT

"${python}" "${here}/fake_exporter.py" >"${workdir}/exporter.out" &
exporter_pid=$!
port=""
for _ in $(seq 100); do
  port="$(sed -n 's/^port //p' "${workdir}/exporter.out")"
  [[ -n "${port}" ]] && break
  kill -0 "${exporter_pid}" || { echo "fake_exporter.py exited" >&2; exit 1; }
  sleep 0.1
done
[[ -n "${port}" ]] || { echo "fake_exporter.py printed no port" >&2; exit 1; }

echo "== promtool check metrics on the fake scrape"
curl -fsS "http://127.0.0.1:${port}/metrics" | promtool check metrics

echo "== every dashboard query through a real Prometheus"
mapfile -t queries < <("${python}" "${here}/promql_refs.py" exprs)
((${#queries[@]} > 10)) || { echo "too few dashboard queries" >&2; exit 1; }
# Two scrapes of a growing counter, so rate() has data.
"${here}/prometheus_e2e.sh" --timeout=60 \
  --rules="${repo}/deploy/prometheus/alerts.yml" \
  --wait-for='rate(fdbroker_connections_accepted_total[1m]) > 0' \
  "127.0.0.1:${port}" "${queries[@]}" >"${workdir}/results.tsv"

empty=0
for i in "${!queries[@]}"; do
  if ! cut -f1 "${workdir}/results.tsv" | grep -qx "${i}"; then
    echo "no data: ${queries[i]}" >&2
    empty=$((empty + 1))
  fi
done
((empty == 0)) || { echo "${empty} dashboard queries returned no data" >&2; exit 1; }

echo "== helper output format"
value="$("${here}/prometheus_e2e.sh" "127.0.0.1:${port}" \
  'sum(fdbroker_workers{state="ready"})' 'fdbroker_accepting' | sort)"
echo "${value}"
expected_ready="$(curl -fsS "http://127.0.0.1:${port}/metrics" |
  awk '/^fdbroker_workers\{state="ready"\}/ {print $2}')"
grep -qxF "0	{}	${expected_ready}" <<<"${value}"
grep -qxF '1	fdbroker_accepting{instance="127.0.0.1:'"${port}"'", job="fdbroker"}	1' <<<"${value}"

echo "== a query Prometheus rejects exits 3"
status=0
"${here}/prometheus_e2e.sh" "127.0.0.1:${port}" 'sum(' 2>"${workdir}/err" || status=$?
cat "${workdir}/err"
((status == 3))

echo "${#queries[@]} dashboard queries evaluated, all with data"
